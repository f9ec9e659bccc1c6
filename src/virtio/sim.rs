//! A simulated virtio driver over in-process guest memory: it programs a
//! [`VirtioPciDevice`] through its BAR exactly as a guest would, lays out
//! split virtqueues, posts descriptor chains (well-formed or hostile) and
//! reads the used ring. Device unit tests and the data-path benchmark use
//! it; no KVM is involved.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::pci::{VirtioPciDevice, BAR};
use super::{status, VirtioDevice};
use crate::pci::msix::{MsixTable, MsixVectors, NoRoutes};
use crate::pci::PciDevice;
use crate::vmm::memory::GuestRam;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;

/// Where the simulated driver keeps its rings: low memory, clear of the
/// data area the tests use from [`DATA_START`].
const RINGS_START: u64 = 0x10_0000;
const RING_STRIDE: u64 = 0x1_0000;
pub const DATA_START: u64 = 0x40_0000;

/// One split virtqueue as the driver sees it.
pub struct SimQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl SimQueue {
    pub(crate) fn new(index: u64, size: u16) -> Self {
        let base = RINGS_START + index * RING_STRIDE;
        SimQueue {
            size,
            desc: base,
            avail: base + 16 * u64::from(size),
            used: base + 0x8000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// Writes descriptors (addr, len, flags, next) starting at the next
    /// free table slot, without publishing them. Returns the first index.
    pub fn write_descs(&mut self, mem: &GuestRam, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let first = self.next_desc;
        for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
            let slot = (first + i as u16) % self.size;
            let at = GuestAddress(self.desc + 16 * u64::from(slot));
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, at.unchecked_add(8)).unwrap();
            mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            mem.write_obj(next, at.unchecked_add(14)).unwrap();
        }
        self.next_desc = (first + descs.len() as u16) % self.size;
        first
    }

    /// Posts a well-formed chain of buffers (addr, len), all device-
    /// writable or all device-readable. Returns the head index.
    pub fn add_chain(&mut self, mem: &GuestRam, bufs: &[(u64, u32)], writable: bool) -> u16 {
        let head = self.write_chain(mem, bufs, writable);
        self.publish(mem, head);
        head
    }

    /// Writes a well-formed chain into the table without publishing it.
    pub fn write_chain(&mut self, mem: &GuestRam, bufs: &[(u64, u32)], writable: bool) -> u16 {
        let first = self.next_desc;
        let descs: Vec<_> = bufs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len))| {
                let last = i + 1 == bufs.len();
                let mut flags = if writable { DESC_F_WRITE } else { 0 };
                if !last {
                    flags |= DESC_F_NEXT;
                }
                (addr, len, flags, (first + i as u16 + 1) % self.size)
            })
            .collect();
        self.write_descs(mem, &descs)
    }

    /// Puts `head` on the available ring.
    pub fn publish(&mut self, mem: &GuestRam, head: u16) {
        self.stage(mem, head);
        self.flush(mem);
    }

    /// Fills the next available-ring slot without moving the index: the
    /// device cannot see it before [`SimQueue::flush`].
    pub fn stage(&mut self, mem: &GuestRam, head: u16) {
        let slot = self.avail_idx % self.size;
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * u64::from(slot)))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes every staged slot with one index write.
    pub fn flush(&mut self, mem: &GuestRam) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// With EVENT_IDX: ask for an interrupt once the used index passes
    /// `idx` (the used_event field after the available ring).
    pub fn set_used_event(&mut self, mem: &GuestRam, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(idx, GuestAddress(at)).unwrap();
    }

    /// The driver's available index (staged slots included).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Used elements the driver has consumed so far (its used index).
    pub fn used_seen(&self) -> u16 {
        self.used_seen
    }

    /// The next used element (id, len), if the device returned one.
    pub fn pop_used(&mut self, mem: &GuestRam) -> Option<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        if idx == self.used_seen {
            return None;
        }
        let slot = self.used_seen % self.size;
        let at = self.used + 4 + 8 * u64::from(slot);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }

    /// Waits up to `timeout` for a used element.
    pub fn wait_used(&mut self, mem: &GuestRam, timeout: Duration) -> Option<(u32, u32)> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(u) = self.pop_used(mem) {
                return Some(u);
            }
            if Instant::now() > end {
                return None;
            }
            std::thread::yield_now();
        }
    }

    /// Free descriptor slots left before the table wraps onto chains the
    /// caller has not reclaimed (the caller tracks that itself).
    pub fn reset_desc_cursor(&mut self) {
        self.next_desc = 0;
    }
}

/// A device behind its virtio-pci transport, driven like a guest would.
pub struct SimDriver {
    pub mem: GuestRam,
    pub pci: VirtioPciDevice,
    pub queues: Vec<SimQueue>,
    pub vectors: Arc<MsixVectors>,
}

impl SimDriver {
    /// Memory of `mem_mib` MiB and the device behind a transport, not yet
    /// initialised by the driver.
    pub fn new(device: Box<dyn VirtioDevice>, mem_mib: u64) -> Self {
        let mem = crate::vmm::memory::from_ranges(&[(GuestAddress(0), (mem_mib << 20) as usize)])
            .expect("guest memory");
        let nq = device.queue_max_sizes().len();
        let fds = (0..=nq)
            .map(|i| (EventFd::new(libc::EFD_NONBLOCK).unwrap(), 24 + i as u32))
            .collect();
        let vectors = Arc::new(MsixVectors::new(fds));
        let msix = MsixTable::new(vectors.clone(), Arc::new(NoRoutes));
        let pci =
            VirtioPciDevice::new(device, mem.clone(), None, 0xc000_0000, msix).expect("transport");
        SimDriver {
            mem,
            pci,
            queues: Vec::new(),
            vectors,
        }
    }

    pub fn write(&mut self, off: u64, v: &[u8]) {
        self.pci.bar_write(BAR, off, v);
    }

    pub fn read(&mut self, off: u64, data: &mut [u8]) {
        self.pci.bar_read(BAR, off, data);
    }

    pub fn read32(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.pci.bar_read(BAR, off, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn status(&mut self) -> u8 {
        let mut b = [0u8; 1];
        self.pci.bar_read(BAR, 0x14, &mut b);
        b[0]
    }

    /// The device's feature bits, read through the two 32-bit windows.
    pub fn device_features(&mut self) -> u64 {
        self.write(0x00, &0u32.to_le_bytes());
        let lo = self.read32(0x04);
        self.write(0x00, &1u32.to_le_bytes());
        let hi = self.read32(0x04);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// The driver's initialisation (virtio 1.x, 3.1.1) accepting
    /// `features`, with `sizes` queue sizes (0: that queue stays disabled)
    /// and MSI-X vector i for queue i. Returns the device status after
    /// DRIVER_OK.
    pub fn init(&mut self, features: u64, sizes: &[u16]) -> u8 {
        self.enable_msix();
        self.write(0x14, &[0]);
        self.write(0x14, &[status::ACKNOWLEDGE]);
        self.write(0x14, &[status::ACKNOWLEDGE | status::DRIVER]);
        for (sel, word) in [(0u32, features as u32), (1, (features >> 32) as u32)] {
            self.write(0x08, &sel.to_le_bytes());
            self.write(0x0c, &word.to_le_bytes());
        }
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write(0x14, &[s]);
        if self.status() & status::FEATURES_OK == 0 {
            return self.status();
        }
        self.queues.clear();
        for (i, &size) in sizes.iter().enumerate() {
            let q = SimQueue::new(i as u64, size);
            if size == 0 {
                // Size 0: the driver leaves this queue disabled.
                self.queues.push(q);
                continue;
            }
            // Fresh rings: nothing left from a driver before a reset.
            self.mem
                .write_slice(&[0u8; RING_STRIDE as usize], GuestAddress(q.desc))
                .unwrap();
            self.write(0x16, &(i as u16).to_le_bytes());
            self.write(0x18, &size.to_le_bytes());
            self.write(0x1a, &(i as u16).to_le_bytes());
            for (off, addr) in [(0x20, q.desc), (0x28, q.avail), (0x30, q.used)] {
                self.write(off, &(addr as u32).to_le_bytes());
                self.write(off + 4, &((addr >> 32) as u32).to_le_bytes());
            }
            self.write(0x1c, &1u16.to_le_bytes());
            self.queues.push(q);
        }
        self.write(0x14, &[s | status::DRIVER_OK]);
        self.status()
    }

    /// Enables memory space and bus mastering (as Linux's probe does), then
    /// MSI-X in config space, and unmasks every vector.
    fn enable_msix(&mut self) {
        use crate::pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
        let cmd = (COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes();
        self.pci.config_mut().write(COMMAND, &cmd);
        self.pci.config_written(COMMAND, &cmd);
        let cfg = self.pci.config();
        let mut cap = cfg.bytes()[crate::pci::config::CAPABILITIES_POINTER] as usize;
        while cap != 0 && cfg.bytes()[cap] != crate::pci::msix::CAP_ID {
            cap = cfg.bytes()[cap + 1] as usize;
        }
        assert_ne!(cap, 0, "no MSI-X capability");
        let on = (1u16 << 15).to_le_bytes();
        self.pci.config_mut().write(cap + 2, &on);
        self.pci.config_written(cap + 2, &on);
        for v in 0..self.vectors.len() as u64 {
            self.pci
                .bar_write(BAR, 0x4000 + 16 * v + 12, &0u32.to_le_bytes());
        }
    }

    /// Rings queue `q`'s doorbell (a notify-region write).
    pub fn kick(&mut self, q: u16) {
        self.write(0x3000 + 4 * u64::from(q), &q.to_le_bytes());
    }

    /// Interrupts delivered on vector `v` since the last call.
    pub fn interrupts(&self, v: u16) -> u64 {
        self.vectors
            .irqfd(v)
            .and_then(|e| e.read().ok())
            .unwrap_or(0)
    }
}
