//! The virtio 1.x PCI transport (modern only). One 32-bit memory BAR holds
//! every structure the capabilities point at:
//!
//! | offset | what                                   |
//! |--------|----------------------------------------|
//! | 0x0000 | common configuration                   |
//! | 0x1000 | ISR status                             |
//! | 0x2000 | device-specific configuration          |
//! | 0x3000 | notifications, 4 bytes per queue       |
//! | 0x4000 | MSI-X table                            |
//! | 0x6000 | MSI-X pending-bit array                |
//!
//! Queue notifications are ioeventfds on KVM: a guest kick never leaves
//! the kernel, it wakes the device's thread.

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{features, status, Activation, ActiveQueue, Interrupt, VirtioDevice, NO_VECTOR};
use crate::pci::config::{BarKind, PciConfig};
use crate::pci::msix::{self, MsixTable, MsixVectors};
use crate::pci::PciDevice;
use crate::vmm::memory::GuestRam;

pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern devices are 0x1040 + the virtio device type.
const MODERN_DEVICE_BASE: u16 = 0x1040;
const CAP_VENDOR: u8 = 0x09;
const CFG_COMMON: u8 = 1;
const CFG_NOTIFY: u8 = 2;
const CFG_ISR: u8 = 3;
const CFG_DEVICE: u8 = 4;

pub const BAR: usize = 0;
pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x40;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x6000;

const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// A queue's registers as the driver programs them before DRIVER_OK.
#[derive(Clone, Copy)]
struct QueueRegs {
    max: u16,
    size: u16,
    enabled: bool,
    vector: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegs {
    fn new(max: u16) -> Self {
        QueueRegs {
            max,
            size: max,
            enabled: false,
            vector: NO_VECTOR,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }
}

/// The driver-facing interrupt of one function: MSI-X when the driver
/// enabled it; otherwise only the ISR bit (rvm offers no INTx for virtio).
pub struct PciInterrupt {
    msix: Arc<MsixVectors>,
    isr: AtomicU8,
    config_vector: AtomicU16,
}

impl Interrupt for PciInterrupt {
    fn queue(&self, vector: u16) {
        self.isr.fetch_or(ISR_QUEUE, Ordering::AcqRel);
        if vector != NO_VECTOR {
            self.msix.trigger(vector);
        }
    }

    fn queue_irqfd(&self, vector: u16) -> Option<EventFd> {
        // With MSI-X off the driver polls the ISR, which only rvm can set.
        if vector == NO_VECTOR || !self.msix.enabled() {
            return None;
        }
        self.msix.irqfd(vector)?.try_clone().ok()
    }

    fn config(&self) {
        self.isr.fetch_or(ISR_CONFIG, Ordering::AcqRel);
        let v = self.config_vector.load(Ordering::Acquire);
        if v != NO_VECTOR {
            self.msix.trigger(v);
        }
    }
}

pub struct VirtioPciDevice {
    config: PciConfig,
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    /// Registers ioeventfds; None in unit tests, where kicks come through
    /// the notify region as ordinary writes.
    vm: Option<Arc<VmFd>>,
    status: u8,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    queues: Vec<QueueRegs>,
    kicks: Vec<EventFd>,
    msix: MsixTable,
    msix_cap: usize,
    interrupt: Arc<PciInterrupt>,
    config_generation: u8,
    /// Where the ioeventfds are registered now.
    notify_base: Option<u64>,
    /// Bus Master Enable as the device last heard it.
    bus_master: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("virtio-pci config space: {0}")]
    Config(#[from] crate::pci::config::ConfigError),
    #[error("virtio-pci: {0}")]
    Io(#[from] std::io::Error),
}

impl VirtioPciDevice {
    /// The device model behind the transport (its owner's controls).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Wraps `device`; `bar_addr` is where BAR 0 starts, `vectors` the MSI-X
    /// vectors (one per queue plus one for configuration changes is best).
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        vm: Option<Arc<VmFd>>,
        bar_addr: u64,
        msix: MsixTable,
    ) -> Result<Self, TransportError> {
        let device_id = MODERN_DEVICE_BASE + device.device_type();
        // Class: network controller for a NIC, "other" otherwise.
        let class = if device.device_type() == 1 {
            0x02_00_00
        } else {
            0xff_00_00
        };
        let mut config = PciConfig::new(
            VIRTIO_PCI_VENDOR,
            device_id,
            class,
            VIRTIO_PCI_VENDOR,
            0x1100,
        );
        // Modern-only devices have revision 1 or more.
        config.set_bytes(crate::pci::config::CLASS_REVISION, &[1]);
        config.add_bar(BAR, BarKind::Memory32, BAR_SIZE, bar_addr)?;
        let nqueues = device.queue_max_sizes().len() as u64;
        for (kind, off, len) in [
            (CFG_COMMON, COMMON, COMMON_LEN),
            (CFG_ISR, ISR, 4),
            (CFG_DEVICE, DEVICE, DEVICE_LEN),
        ] {
            config.add_capability(CAP_VENDOR, &vendor_cap(kind, off, len, 16), &[])?;
        }
        let mut notify = vendor_cap(CFG_NOTIFY, NOTIFY, nqueues * NOTIFY_MULTIPLIER, 20).to_vec();
        notify.extend_from_slice(&(NOTIFY_MULTIPLIER as u32).to_le_bytes());
        config.add_capability(CAP_VENDOR, &notify, &[])?;
        let (body, writable) = msix.capability(BAR as u8, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(msix::CAP_ID, &body, &writable)?;

        let queues: Vec<QueueRegs> = device
            .queue_max_sizes()
            .iter()
            .map(|m| QueueRegs::new(*m))
            .collect();
        let kicks = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<std::io::Result<Vec<_>>>()?;
        let interrupt = Arc::new(PciInterrupt {
            msix: msix.vectors(),
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
        });
        Ok(VirtioPciDevice {
            config,
            device,
            mem,
            vm,
            status: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            queues,
            kicks,
            msix,
            msix_cap,
            interrupt,
            config_generation: 0,
            notify_base: None,
            bus_master: false,
        })
    }

    /// Features offered: the device's plus the transport's.
    fn offered(&self) -> u64 {
        self.device.features() | features::VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut QueueRegs> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// The common configuration structure as bytes, for reads of any width.
    fn common_image(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        let feature_word = match self.device_feature_select {
            0 => self.offered() as u32,
            1 => (self.offered() >> 32) as u32,
            _ => 0,
        };
        let driver_word = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(0x00, &self.device_feature_select.to_le_bytes());
        put(0x04, &feature_word.to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        put(0x0c, &driver_word.to_le_bytes());
        put(
            0x10,
            &self
                .interrupt
                .config_vector
                .load(Ordering::Acquire)
                .to_le_bytes(),
        );
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status]);
        put(0x15, &[self.config_generation]);
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &q.vector.to_le_bytes());
            put(0x1c, &u16::from(q.enabled).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes());
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.avail.to_le_bytes());
            put(0x30, &q.used.to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut v = [0u8; 8];
        let Some(dst) = v.get_mut(..data.len()) else {
            return;
        };
        dst.copy_from_slice(data);
        let value = u64::from_le_bytes(v);
        // Queue layout is fixed once the driver is running.
        let live = self.status & status::DRIVER_OK != 0;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) if self.status & status::FEATURES_OK == 0 => {
                match self.driver_feature_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32)
                    }
                    _ => {}
                }
            }
            (0x10, 2) => self
                .interrupt
                .config_vector
                .store(self.valid_vector(value as u16), Ordering::Release),
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) if !live => {
                if let Some(q) = self.selected_queue() {
                    // Split queues: a power of two up to the maximum.
                    let size = value as u16;
                    if size.is_power_of_two() && size <= q.max {
                        q.size = size;
                    }
                }
            }
            (0x1a, 2) => {
                let vector = self.valid_vector(value as u16);
                if let Some(q) = self.selected_queue() {
                    q.vector = vector;
                }
            }
            (0x1c, 2) if !live => {
                if let Some(q) = self.selected_queue() {
                    // Only 1 may be written; a queue is disabled by reset.
                    q.enabled |= value == 1;
                }
            }
            (0x20..=0x37, 4 | 8) if !live && offset.is_multiple_of(4) => {
                let Some(q) = self.selected_queue() else {
                    return;
                };
                let field = match offset & !7 {
                    0x20 => &mut q.desc,
                    0x28 => &mut q.avail,
                    _ => &mut q.used,
                };
                *field = match (offset % 8, data.len()) {
                    (0, 8) => value,
                    (0, _) => (*field & !0xffff_ffff) | value,
                    _ => (*field & 0xffff_ffff) | (value << 32),
                };
            }
            _ => crate::guest_log!(
                log::Level::Debug,
                "virtio-pci: ignored common write {offset:#x}/{}",
                data.len()
            ),
        }
    }

    /// The driver may only name vectors that exist; anything else reads
    /// back as NO_VECTOR, which tells it the assignment failed.
    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix.vectors().len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        if newly & status::FEATURES_OK != 0 {
            let ok = self.driver_features & !self.offered() == 0
                && self.driver_features & features::VERSION_1 != 0;
            if !ok {
                crate::guest_log!(
                    log::Level::Warn,
                    "virtio-pci: driver asked for features {:#x}, offered {:#x}",
                    self.driver_features,
                    self.offered()
                );
                // Leaving FEATURES_OK clear tells the driver we refused.
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if newly & status::DRIVER_OK != 0 {
            if self.status & status::FEATURES_OK == 0 {
                self.fail("DRIVER_OK before FEATURES_OK".into());
            } else if let Err(e) = self.activate() {
                self.fail(e);
            }
        }
    }

    fn fail(&mut self, why: String) {
        crate::guest_log!(log::Level::Warn, "virtio-pci: device needs reset: {why}");
        self.status |= status::NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.config();
    }

    fn activate(&mut self) -> Result<(), String> {
        let mut queues = Vec::new();
        let event_idx = self.driver_features & features::RING_EVENT_IDX != 0;
        for (i, r) in self.queues.iter().enumerate() {
            if !r.enabled {
                continue;
            }
            let mut q = Queue::new(r.max).map_err(|e| format!("queue {i}: {e}"))?;
            q.try_set_size(r.size)
                .map_err(|e| format!("queue {i}: {e}"))?;
            q.try_set_desc_table_address(GuestAddress(r.desc))
                .map_err(|e| format!("queue {i} descriptors: {e}"))?;
            q.try_set_avail_ring_address(GuestAddress(r.avail))
                .map_err(|e| format!("queue {i} available ring: {e}"))?;
            q.try_set_used_ring_address(GuestAddress(r.used))
                .map_err(|e| format!("queue {i} used ring: {e}"))?;
            q.set_event_idx(event_idx);
            q.set_ready(true);
            if !q.is_valid(&self.mem) {
                return Err(format!("queue {i} lies outside guest memory"));
            }
            let kick = self.kicks[i].try_clone().map_err(|e| e.to_string())?;
            queues.push(ActiveQueue {
                index: i as u16,
                queue: q,
                kick,
                vector: r.vector,
            });
        }
        self.device
            .activate(Activation {
                mem: self.mem.clone(),
                features: self.driver_features,
                queues,
                interrupt: self.interrupt.clone(),
            })
            .map_err(|e| e.to_string())
    }

    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            *q = QueueRegs::new(q.max);
        }
        // Kicks that arrived for the old queues mean nothing now.
        for k in &self.kicks {
            let _ = k.read();
        }
        self.interrupt.isr.store(0, Ordering::Release);
        self.interrupt
            .config_vector
            .store(NO_VECTOR, Ordering::Release);
    }

    /// Stops the device for good (the VM is ending).
    pub fn shutdown(&mut self) {
        self.device.reset();
        self.move_ioeventfds(None);
    }

    fn notify(&mut self, offset: u64) {
        // Reached only when no ioeventfd caught the write.
        let q = offset / NOTIFY_MULTIPLIER;
        if let Some(k) = self.kicks.get(q as usize) {
            let _ = k.write(1);
        }
    }

    fn move_ioeventfds(&mut self, base: Option<u64>) {
        let Some(vm) = self.vm.clone() else {
            self.notify_base = base;
            return;
        };
        if let Some(old) = self.notify_base.take() {
            for (i, k) in self.kicks.iter().enumerate() {
                let addr = IoEventAddress::Mmio(old + NOTIFY + i as u64 * NOTIFY_MULTIPLIER);
                let _ = vm.unregister_ioevent(k, &addr, NoDatamatch);
            }
        }
        if let Some(new) = base {
            for (i, k) in self.kicks.iter().enumerate() {
                let addr = IoEventAddress::Mmio(new + NOTIFY + i as u64 * NOTIFY_MULTIPLIER);
                if let Err(e) = vm.register_ioevent(k, &addr, NoDatamatch) {
                    // Kicks still work, through a vCPU exit.
                    crate::guest_log!(
                        log::Level::Warn,
                        "virtio-pci: no ioeventfd for queue {i}: {e}"
                    );
                }
            }
            self.notify_base = Some(new);
        }
    }
}

/// A virtio vendor capability body (after ID and next): cap_len, cfg_type,
/// bar, id, padding, offset, length.
fn vendor_cap(kind: u8, offset: u64, len: u64, cap_len: u8) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0] = cap_len;
    b[1] = kind;
    b[2] = BAR as u8;
    b[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
    b[10..14].copy_from_slice(&(len as u32).to_le_bytes());
    b
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, offset: usize, data: &[u8]) {
        if PciConfig::touches_command(offset, data.len()) {
            let on = self.config.bus_master();
            if on != self.bus_master {
                self.bus_master = on;
                self.device.set_bus_master(on);
                if on {
                    // Work held while DMA was off resumes.
                    for k in &self.kicks {
                        let _ = k.write(1);
                    }
                }
            }
        }
        let control = self.msix_cap + 2;
        if offset < control + 2 && offset + data.len() > control {
            let value = self.config.read_u16(control);
            self.msix.set_control(value);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != BAR {
            return;
        }
        let len = data.len() as u64;
        match offset {
            o if o + len <= COMMON_LEN => {
                let image = self.common_image();
                data.copy_from_slice(&image[o as usize..(o + len) as usize]);
            }
            ISR => {
                // Reading ISR acknowledges it.
                data[0] = self.interrupt.isr.swap(0, Ordering::AcqRel);
            }
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE, data)
            }
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.msix.read_table(o - MSIX_TABLE, data),
            o if (MSIX_PBA..BAR_SIZE).contains(&o) => self.msix.read_pba(o - MSIX_PBA, data),
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != BAR {
            return;
        }
        match offset {
            o if o + data.len() as u64 <= COMMON_LEN => self.common_write(o, data),
            o if (DEVICE..DEVICE + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE, data);
            }
            o if (NOTIFY..NOTIFY + NOTIFY_LEN).contains(&o) => self.notify(o - NOTIFY),
            o if (MSIX_TABLE..MSIX_PBA).contains(&o) => self.msix.write_table(o - MSIX_TABLE, data),
            _ => {}
        }
    }

    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        if bar == BAR {
            self.move_ioeventfds(addr);
        }
    }
}
