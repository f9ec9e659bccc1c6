//! The Intel 82540EM (e1000): a fallback NIC for guests without virtio
//! drivers. The PCI function ([`E1000`]) decodes two windows onto one
//! register file ([`Core`]): BAR0 (128 KiB MMIO) and BAR1 (I/O ports:
//! IOADDR at +0 selects a register, IODATA at +4 reads or writes it).
//! Linux's driver resets the 82540 through the I/O window, so both must
//! reach the same registers.
//!
//! Where a frame goes:
//! - guest to host: a TDT write (vCPU thread) wakes the NIC's thread,
//!   which runs [`tx`] over the new descriptors and writes each frame to
//!   the TAP (the vCPU goes back to the guest at once: segmenting a 64 KiB
//!   TSO frame in software takes long enough to stall a guest CPU);
//! - host to guest: the same thread ([`rx`]) reads the TAP straight into
//!   the guest's RX buffers with readv.
//!
//! Interrupts are legacy INTx, level-triggered: the line is high while
//! ICR & IMS is not 0.

pub mod eeprom;
mod engine;
pub mod phy;
pub mod regs;
pub mod rx;
#[cfg(test)]
mod tests;
pub mod tx;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::LevelIrq;
use crate::net::backend::NetBackend;
use crate::net::stage::{self, Direction, Frame, HoldAt, Outcome, Stages};
use crate::net::{NetStats, NicStats};
use crate::pci::config::PciConfig;
use crate::pci::PciDevice;
use crate::vmm::memory::GuestRam;
use eeprom::Eeprom;
use phy::Phy;
use regs::*;
use tx::{Admit, TxEngine, TxRing, TxSink};

pub const VENDOR_ID: u16 = 0x8086;
pub const DEVICE_ID: u16 = 0x100e;
pub const SUBSYSTEM_ID: u16 = 0x001e;
pub const MMIO_SIZE: u64 = 128 << 10;
pub const IO_SIZE: u64 = 64;
pub use crate::net::backend::VNET_HDR_LEN;

const REG_WORDS: usize = (MMIO_SIZE / 4) as usize;

/// Registers that simply hold what the driver writes.
const PLAIN: &[u32] = &[
    CTRL_EXT, FCAL, FCAH, FCT, VET, ITR, FCTTV, TXCW, RXCW, TIPG, LEDCTL, PBA, FCRTL, FCRTH, RDTR,
    RADV, RSRPD, TIDV, TXDCTL, TADV, RXCSUM, WUC, WUFC, MANC, TCTL, RDBAL, RDBAH, TDBAL, TDBAH,
];

/// CTRL.RST writes that landed, by window: Linux resets the 82540
/// through the I/O window, and a test checks that it arrived.
#[derive(Default, Debug)]
pub struct ResetCounts {
    pub mmio: AtomicU64,
    pub io: AtomicU64,
}

/// Which window an access came through.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Window {
    Mmio,
    Io,
}

/// The register file and everything the registers drive.
pub struct Core {
    regs: Vec<u32>,
    mac: [u8; 6],
    eeprom: Eeprom,
    phy: Phy,
    tx: TxEngine,
    mem: GuestRam,
    backend: Arc<dyn NetBackend>,
    irq: Box<dyn LevelIrq>,
    stats: Arc<NetStats>,
    resets: Arc<ResetCounts>,
    /// The RX thread waits on this when it ran out of descriptors.
    rx_kick: EventFd,
    /// Wakes the NIC thread to transmit (TDT written).
    tx_kick: EventFd,
    /// IOADDR of the I/O window.
    io_addr: u32,
    /// Registers already reported as unknown (each logged once).
    unknown: BTreeSet<u32>,
    irq_high: bool,
    pub(crate) rx: rx::RxState,
    /// Bus Master Enable (PCI command register, not a device register:
    /// CTRL.RST leaves it): no descriptor or buffer is touched while off.
    bus_master: bool,
    /// The TAP would block: TX waits at TDH for room (the NIC thread
    /// watches the TAP for it).
    pub(crate) tx_blocked: bool,
    /// What every frame passes, both ways.
    stages: Stages,
    /// A stage holds TX at TDH until a time (the NIC thread wakes then);
    /// (until, the stage that held).
    pub(crate) tx_hold: Option<HoldAt>,
    /// The link is up when the TAP is and the owner has not taken it
    /// down; the PHY shows the result.
    tap_link: bool,
    owner_link: bool,
}

/// The TAP behind the NIC's stages, for one TX pass.
struct StagedTap<'a> {
    /// Without a link every frame is dropped (counted), as with the cable out.
    link_up: bool,
    backend: &'a Arc<dyn NetBackend>,
    stages: &'a Stages,
    /// The stage the first frame starts at (where a hold left it).
    from: usize,
    hold: Option<HoldAt>,
}

impl TxSink for StagedTap<'_> {
    fn admit(&mut self, frame: &[u8]) -> Admit {
        if !self.link_up {
            return Admit::Drop;
        }
        let from = std::mem::take(&mut self.from);
        match self
            .stages
            .run_now(Direction::Tx, &Frame::Bytes(frame), from)
        {
            Outcome::Pass => Admit::Send,
            Outcome::Drop => Admit::Drop,
            Outcome::Hold { until, stage } => {
                self.hold = Some(HoldAt { until, stage });
                Admit::Hold
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let iov = [libc::iovec {
            iov_base: bytes.as_ptr() as *mut libc::c_void,
            iov_len: bytes.len(),
        }];
        // SAFETY: `bytes` is borrowed, readable, for the call.
        unsafe { self.backend.writev(&iov) }.map(|_| ())
    }
}

impl Core {
    fn new(
        mac: [u8; 6],
        mem: GuestRam,
        backend: Arc<dyn NetBackend>,
        irq: Box<dyn LevelIrq>,
        rx_kick: EventFd,
        tx_kick: EventFd,
    ) -> Self {
        let vnet = backend.vnet_hdr();
        let mut c = Core {
            regs: vec![0; REG_WORDS],
            mac,
            eeprom: Eeprom::new(mac),
            phy: Phy::new(),
            tx: TxEngine::new(vnet),
            mem,
            backend,
            irq,
            stats: Arc::new(NetStats::default()),
            resets: Arc::new(ResetCounts::default()),
            rx_kick,
            tx_kick,
            io_addr: 0,
            unknown: BTreeSet::new(),
            irq_high: false,
            rx: rx::RxState::new(vnet),
            bus_master: false,
            tap_link: true,
            owner_link: true,
            tx_blocked: false,
            stages: Stages::new(),
            tx_hold: None,
        };
        c.reset();
        c
    }

    fn reg(&self, off: u32) -> u32 {
        self.regs.get((off / 4) as usize).copied().unwrap_or(0)
    }

    fn set(&mut self, off: u32, v: u32) {
        if let Some(r) = self.regs.get_mut((off / 4) as usize) {
            *r = v;
        }
    }

    /// Power-on state; also CTRL.RST. The EEPROM keeps its contents and
    /// RAL0/RAH0 are loaded from it, as the hardware does.
    fn reset(&mut self) {
        self.regs.iter_mut().for_each(|r| *r = 0);
        self.set(CTRL, CTRL_SLU | (1 << 3) /* ASDE */);
        self.set(PBA, 0x0010_0030);
        self.set(LEDCTL, 0x0708_0402);
        let m = self.mac;
        self.set(RA, u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        self.set(RA + 4, u32::from(u16::from_le_bytes([m[4], m[5]])) | RAH_AV);
        self.tx.reset();
        self.tx_hold = None;
        self.rx.reset();
        // The link is the host's to say; the PHY's registers start over.
        self.phy.reset();
        self.eeprom.write_eecd(0);
        self.update_irq();
    }

    fn status(&self) -> u32 {
        let link = if self.phy.link_up() { STATUS_LU } else { 0 };
        STATUS_FD | link | STATUS_SPEED_1000 | STATUS_ASDV_1000
    }

    /// Raises interrupt causes.
    pub(crate) fn cause(&mut self, bits: u32) {
        let v = self.reg(ICR) | bits;
        self.set(ICR, v);
        self.update_irq();
    }

    fn update_irq(&mut self) {
        let high = self.reg(ICR) & self.reg(IMS) != 0;
        if high != self.irq_high {
            self.irq_high = high;
            self.irq.set_level(high);
        }
    }

    fn count(&mut self, lo: u32, hi: Option<u32>, n: u64) {
        let cur = u64::from(self.reg(lo)) | hi.map_or(0, |h| u64::from(self.reg(h)) << 32);
        let v = cur.saturating_add(n);
        self.set(lo, v as u32);
        if let Some(h) = hi {
            self.set(h, (v >> 32) as u32);
        } else if v > u64::from(u32::MAX) {
            self.set(lo, u32::MAX);
        }
    }

    pub fn read(&mut self, off: u32) -> u32 {
        let off = off & !3;
        match off {
            STATUS => self.status(),
            EECD => self.eeprom.read_eecd(),
            EERD => self.eeprom.read_eerd(),
            ICR => {
                let v = self.reg(ICR);
                self.set(ICR, 0);
                self.update_irq();
                v
            }
            IMS | ICS => self.reg(IMS),
            IMC => 0,
            STATS_START..STATS_END => {
                let v = self.reg(off);
                self.set(off, 0);
                v
            }
            CTRL | MDIC | RCTL | RDLEN | RDH | RDT | TDLEN | TDH | TDT => self.reg(off),
            _ if self.is_table(off) || PLAIN.contains(&off) => self.reg(off),
            _ => {
                self.unknown_access(off, "read");
                0
            }
        }
    }

    pub fn write(&mut self, off: u32, v: u32, window: Window) {
        let off = off & !3;
        if matches!(off, RDBAL | RDBAH | RDLEN | RDH | RDT) {
            // The driver reprograms the ring: give it another chance.
            self.rx.reset();
        }
        match off {
            CTRL => {
                if v & CTRL_RST != 0 {
                    let n = match window {
                        Window::Mmio => &self.resets.mmio,
                        Window::Io => &self.resets.io,
                    };
                    n.fetch_add(1, Ordering::Relaxed);
                    crate::guest_log!(
                        log::Level::Info,
                        "e1000: device reset (CTRL.RST) through the {window:?} window"
                    );
                    self.reset();
                    return;
                }
                self.set(CTRL, v & !(CTRL_RST | CTRL_PHY_RST));
            }
            EECD => self.eeprom.write_eecd(v),
            EERD => self.eeprom.write_eerd(v),
            MDIC => {
                let r = self.phy.mdic_write(v);
                self.set(MDIC, r);
            }
            ICR => {
                // Write 1 to clear.
                let left = self.reg(ICR) & !v;
                self.set(ICR, left);
                self.update_irq();
            }
            ICS => self.cause(v),
            IMS => {
                let m = self.reg(IMS) | v;
                self.set(IMS, m);
                self.update_irq();
            }
            IMC => {
                let m = self.reg(IMS) & !v;
                self.set(IMS, m);
                self.update_irq();
            }
            RCTL => {
                self.set(RCTL, v);
                self.kick_rx();
            }
            // A ring is a multiple of 128 bytes, indices are 16 bits.
            RDLEN | TDLEN => self.set(off, v & 0x000f_ff80),
            RDH | TDH => self.set(off, v & 0xffff),
            RDT => {
                self.set(RDT, v & 0xffff);
                self.kick_rx();
            }
            TDT => {
                self.set(TDT, v & 0xffff);
                let _ = self.tx_kick.write(1);
            }
            STATUS | STATS_START..STATS_END => {}
            _ if self.is_table(off) || PLAIN.contains(&off) => self.set(off, v),
            _ => self.unknown_access(off, "write"),
        }
    }

    /// A write with byte enables: `mask` has 0xff in each byte lane the
    /// access covers. Write-1-to-clear/set registers take the missing bytes
    /// as zeros (no effect); every other register keeps its other bytes.
    pub fn write_masked(&mut self, off: u32, v: u32, mask: u32, window: Window) {
        let off = off & !3;
        let v = if mask == u32::MAX || matches!(off, ICR | ICS | IMS | IMC) {
            v & mask
        } else {
            let cur = match off {
                EECD => self.eeprom.read_eecd(),
                _ => self.reg(off),
            };
            (cur & !mask) | (v & mask)
        };
        self.write(off, v, window);
    }

    fn is_table(&self, off: u32) -> bool {
        (MTA..MTA + 4 * MTA_LEN).contains(&off)
            || (RA..RA + 8 * RA_PAIRS).contains(&off)
            || (VFTA..VFTA + 4 * 128).contains(&off)
    }

    fn unknown_access(&mut self, off: u32, what: &str) {
        if self.unknown.len() < 256 && self.unknown.insert(off) {
            crate::guest_log!(
                log::Level::Debug,
                "e1000: {what} of unknown register {off:#x} (reads 0, writes ignored)"
            );
        }
    }

    fn kick_rx(&self) {
        let _ = self.rx_kick.write(1);
    }

    /// Sends what the driver queued between TDH and TDT.
    /// Whether the NIC may touch guest memory (Bus Master Enable).
    pub(crate) fn may_dma(&self) -> bool {
        self.bus_master
    }

    /// Bus Master Enable changed; work held while it was off resumes.
    fn set_bus_master(&mut self, on: bool) {
        if on != self.bus_master {
            self.bus_master = on;
            if on {
                self.kick_rx();
                let _ = self.tx_kick.write(1);
            }
        }
    }

    pub(crate) fn transmit(&mut self) {
        // Only a pass that hits a full TAP leaves TX waiting for room; TX
        // off (or DMA off) has nothing to wait for, and the NIC thread
        // must stop watching the TAP, or it would spin on its room.
        self.tx_blocked = false;
        if self.reg(TCTL) & TCTL_EN == 0 || !self.bus_master {
            return;
        }
        let ring = TxRing {
            base: u64::from(self.reg(TDBAL)) | (u64::from(self.reg(TDBAH)) << 32),
            len_bytes: self.reg(TDLEN),
            head: self.reg(TDH),
            tail: self.reg(TDT),
        };
        // Held by a stage: the NIC thread comes back at its time.
        let Some(from) = stage::resume(&mut self.tx_hold) else {
            return;
        };
        let mut tap = StagedTap {
            link_up: self.phy.link_up(),
            backend: &self.backend,
            stages: &self.stages,
            from,
            hold: None,
        };
        let report = self.tx.process(&self.mem, &ring, &mut tap);
        self.tx_hold = tap.hold.filter(|_| report.held);
        if report.ring_error {
            crate::guest_log!(
                log::Level::Debug,
                "e1000: TX ring unusable (base, length or indices out of range)"
            );
        }
        self.set(TDH, report.head);
        self.tx_blocked = report.blocked;
        if report.blocked {
            self.stats.tx_waits.fetch_add(1, Ordering::Relaxed);
        }
        if report.more {
            // Bounded passes: the RX/TX thread comes back for the rest
            // after it released the lock (vCPUs get the registers in
            // between) and looked at its other events (a stop).
            let _ = self.tx_kick.write(1);
        }
        let s = self.stats.clone();
        s.tx_frames.fetch_add(report.frames, Ordering::Relaxed);
        s.tx_bytes.fetch_add(report.bytes, Ordering::Relaxed);
        s.tx_dropped.fetch_add(report.dropped, Ordering::Relaxed);
        self.count(STAT_GPTC, None, report.frames);
        self.count(STAT_TPT, None, report.frames);
        self.count(STAT_GOTCL, Some(STAT_GOTCH), report.bytes);
        self.count(STAT_TOTL, Some(STAT_TOTH), report.bytes);
        if report.descriptors > 0 {
            let empty = if report.head == ring.tail {
                ICR_TXQE
            } else {
                0
            };
            self.cause(ICR_TXDW | empty);
        }
    }

    /// The host side's link changed (the TAP went down or up).
    pub(crate) fn set_link(&mut self, up: bool) {
        self.tap_link = up;
        self.apply_link();
    }

    /// The owner's link (a cable plugged in or pulled out), whatever the
    /// TAP's state: the link is up when both are.
    pub(crate) fn set_owner_link(&mut self, up: bool) {
        self.owner_link = up;
        self.apply_link();
    }

    fn apply_link(&mut self) {
        let up = self.tap_link && self.owner_link;
        if self.phy.link_up() != up {
            self.phy.set_link(up);
            self.cause(ICR_LSC);
            if up {
                // Receiving stopped while the link was down (the RX thread
                // stops watching the TAP when it cannot receive), and the
                // driver will not write RDT before it received something.
                self.kick_rx();
            }
        }
    }

    /// An access through the I/O window: IOADDR at 0, IODATA at 4.
    fn io_read(&mut self, offset: u64) -> u32 {
        match offset {
            0 => self.io_addr,
            4 => {
                let a = self.io_addr;
                if u64::from(a) < MMIO_SIZE {
                    self.read(a)
                } else {
                    0
                }
            }
            _ => 0,
        }
    }

    /// A write through the I/O window with byte enables (see
    /// [`Core::write_masked`]): IOADDR keeps its other bytes, IODATA
    /// passes them on to the register IOADDR names.
    fn io_write(&mut self, offset: u64, v: u32, mask: u32) {
        match offset {
            0 => self.io_addr = ((self.io_addr & !mask) | (v & mask)) & 0x1_fffc,
            4 => {
                let a = self.io_addr;
                self.write_masked(a, v, mask, Window::Io);
            }
            _ => {}
        }
    }
}

/// The PCI function: config space, the two windows, the RX thread.
pub struct E1000 {
    config: PciConfig,
    core: Arc<Mutex<Core>>,
    /// One queue pair's block, the core's.
    stats: Arc<NicStats>,
    resets: Arc<ResetCounts>,
    rx_thread: Option<(EventFd, JoinHandle<()>)>,
}

/// How one e1000 is set up.
pub struct E1000Params {
    pub mac: [u8; 6],
    /// The TAP's name, to follow its link state (None: an fd we were given).
    pub tap_name: Option<String>,
    pub mmio_addr: u64,
    pub io_addr: u64,
    /// The IOAPIC input its INTA# is routed to (interrupt line register).
    pub irq_line: u8,
    /// Thread name.
    pub name: String,
    /// The filter its RX thread runs under (it starts here, on the thread
    /// building the VM, so it inherits none).
    pub seccomp: Option<crate::vmm::seccomp::ThreadFilter>,
}

#[derive(Debug, thiserror::Error)]
pub enum E1000Error {
    #[error("e1000 BAR: {0}")]
    Bar(#[from] crate::pci::config::ConfigError),
    #[error("e1000: {0}")]
    Io(#[from] std::io::Error),
}

impl E1000 {
    pub fn new(
        p: E1000Params,
        mem: GuestRam,
        backend: Arc<dyn NetBackend>,
        irq: Box<dyn LevelIrq>,
    ) -> Result<Self, E1000Error> {
        let name = p.name.clone();
        let seccomp = p.seccomp.clone();
        let (mut dev, worker) = Self::unstarted(p, mem, backend, irq)?;
        let stop = worker.stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                crate::vmm::seccomp::confine(seccomp.as_ref(), &name);
                worker.run()
            })?;
        dev.rx_thread = Some((stop, thread));
        Ok(dev)
    }

    /// The function and the work of its NIC thread, not started.
    fn unstarted(
        p: E1000Params,
        mem: GuestRam,
        backend: Arc<dyn NetBackend>,
        irq: Box<dyn LevelIrq>,
    ) -> Result<(Self, engine::NicThread), E1000Error> {
        let mut config = PciConfig::new(VENDOR_ID, DEVICE_ID, 0x02_00_00, VENDOR_ID, SUBSYSTEM_ID);
        config.add_bar(0, crate::pci::BarKind::Memory32, MMIO_SIZE, p.mmio_addr)?;
        config.add_bar(1, crate::pci::BarKind::Io, IO_SIZE, p.io_addr)?;
        config.set_interrupt(1, p.irq_line);
        if backend.vnet_hdr() {
            // Frames from the TAP must be finished: the e1000 has no way
            // to hand the guest a partial checksum or a GSO frame.
            backend.configure_offloads(VNET_HDR_LEN, 0)?;
        }
        let rx_kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let tx_kick = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let mut core = Core::new(
            p.mac,
            mem,
            backend.clone(),
            irq,
            rx_kick.try_clone()?,
            tx_kick.try_clone()?,
        );
        let stats = Arc::new(NicStats::new(1));
        core.stats = stats.pair(0);
        let resets = core.resets.clone();
        let core = Arc::new(Mutex::new(core));
        let worker = engine::NicThread {
            core: core.clone(),
            backend,
            rx_kick,
            tx_kick,
            stop: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            tap_name: p.tap_name,
        };
        let dev = E1000 {
            config,
            core,
            stats,
            resets,
            rx_thread: None,
        };
        Ok((dev, worker))
    }

    pub fn stats(&self) -> Arc<NicStats> {
        self.stats.clone()
    }

    /// The NIC's stages: a handle to add or remove them while it runs.
    pub fn stages(&self) -> Stages {
        self.core().stages.clone()
    }

    pub fn resets(&self) -> Arc<ResetCounts> {
        self.resets.clone()
    }

    /// Sets the link up or down (a cable plugged in or pulled out):
    /// STATUS.LU and a link-status-change interrupt; while down nothing is
    /// received and what the guest sends is dropped (counted). The link
    /// also needs the TAP up.
    pub fn set_link(&self, up: bool) {
        self.core().set_owner_link(up);
    }

    /// Whether the guest sees a link now.
    pub fn link_up(&self) -> bool {
        self.core().phy.link_up()
    }

    /// Stops the RX thread (at VM exit, before the TAP goes away).
    pub fn shutdown(&mut self) {
        if let Some((stop, t)) = self.rx_thread.take() {
            let _ = stop.write(1);
            let _ = t.join();
        }
    }

    fn core(&self) -> std::sync::MutexGuard<'_, Core> {
        crate::lock_or_recover(&self.core)
    }
}

/// An e1000 without its NIC thread, for fuzzing and deterministic tests:
/// the caller does the thread's work when it chooses, so every run of the
/// same accesses does the same thing.
#[cfg(any(test, feature = "fuzzing"))]
impl E1000 {
    pub fn new_synchronous(
        p: E1000Params,
        mem: GuestRam,
        backend: Arc<dyn NetBackend>,
        irq: Box<dyn LevelIrq>,
    ) -> Result<Self, E1000Error> {
        Ok(Self::unstarted(p, mem, backend, irq)?.0)
    }

    /// What the NIC thread does after a TDT write.
    pub fn transmit_now(&self) {
        self.core().transmit();
    }

    /// What the NIC thread does when the TAP is readable or the driver
    /// gave back buffers. True when it stopped for want of buffers.
    pub fn receive_now(&self) -> bool {
        self.core().receive() == rx::RxStop::NeedBuffers
    }
}

impl Drop for E1000 {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Registers are 32 bits; narrower or misaligned accesses are merged into
/// or taken out of the aligned word (Linux uses 32-bit accesses only).
fn word_of(offset: u64) -> (u32, usize) {
    ((offset & !3) as u32, (offset & 3) as usize)
}

impl PciDevice for E1000 {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, offset: usize, data: &[u8]) {
        if PciConfig::touches_command(offset, data.len()) {
            let on = self.config.bus_master();
            self.core().set_bus_master(on);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (off, shift) = word_of(offset);
        let v = match bar {
            0 if offset < MMIO_SIZE => self.core().read(off),
            1 => self.core().io_read(u64::from(off)),
            _ => return,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(shift + i).copied().unwrap_or(0);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let (off, shift) = word_of(offset);
        if data.is_empty() || shift + data.len() > 4 {
            return;
        }
        // The bytes written, in their lanes, and which lanes they are.
        let (mut b, mut m) = ([0u8; 4], [0u8; 4]);
        b[shift..shift + data.len()].copy_from_slice(data);
        m[shift..shift + data.len()].fill(0xff);
        let (v, mask) = (u32::from_le_bytes(b), u32::from_le_bytes(m));
        let mut core = self.core();
        match bar {
            0 if offset < MMIO_SIZE => core.write_masked(off, v, mask, Window::Mmio),
            1 => core.io_write(u64::from(off), v, mask),
            _ => {}
        }
    }
}
