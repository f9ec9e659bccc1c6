//! MSI-X: the capability in config space, the vector table and the
//! pending-bit array (PBA) in a BAR, and delivery of each vector through an
//! irqfd bound to its own GSI.
//!
//! Two sides share the state. The vCPU side ([`MsixTable`]) decodes the
//! guest's table writes and keeps KVM's GSI routes in step. The device side
//! ([`MsixVectors`]) fires a vector from any thread: an eventfd write when
//! the vector is unmasked, a pending bit otherwise, delivered on unmask.
//!
//! A vector's eventfd may also be written by the kernel (vhost-net signals
//! it without rvm in the way), so masking cannot be left to rvm's own
//! writes: the eventfd is connected to KVM only while the vector may
//! signal (enabled, neither it nor the function masked). While it is
//! disconnected a write stays in the eventfd's counter; a PBA read or the
//! unmask moves it into the pending bit, and the unmask delivers it.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// Capability ID of MSI-X.
pub const CAP_ID: u8 = 0x11;
pub const ENTRY_SIZE: u64 = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// Installs MSI routes on the hypervisor: one GSI per vector.
pub trait MsiRouter: Send + Sync {
    /// Routes `gsi` to the message (address, data).
    fn route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()>;
    /// Connects the eventfd `evt` to `gsi` (`on`), so that a write to it
    /// interrupts the guest, or disconnects it, so that a write only
    /// counts in the eventfd.
    fn connect(&self, evt: &EventFd, gsi: u32, on: bool) -> std::io::Result<()>;
}

/// A router for device models run without a hypervisor (unit tests, the
/// simulated driver, fuzzing): routes go nowhere, and a vector's eventfd
/// is read by whoever plays the guest.
pub struct NoRoutes;

impl MsiRouter for NoRoutes {
    fn route(&self, _gsi: u32, _addr: u64, _data: u32) -> std::io::Result<()> {
        Ok(())
    }

    fn connect(&self, _evt: &EventFd, _gsi: u32, _on: bool) -> std::io::Result<()> {
        Ok(())
    }
}

/// One vector's delivery path.
pub struct Vector {
    pub irqfd: EventFd,
    pub gsi: u32,
    masked: AtomicBool,
    pending: AtomicBool,
}

/// The device side: fire vector `n` from any thread.
pub struct MsixVectors {
    vectors: Vec<Vector>,
    enabled: AtomicBool,
    function_masked: AtomicBool,
}

impl MsixVectors {
    /// `vectors` pairs each irqfd with the GSI it was registered on.
    pub fn new(vectors: Vec<(EventFd, u32)>) -> Self {
        MsixVectors {
            vectors: vectors
                .into_iter()
                .map(|(irqfd, gsi)| Vector {
                    irqfd,
                    gsi,
                    masked: AtomicBool::new(true),
                    pending: AtomicBool::new(false),
                })
                .collect(),
            enabled: AtomicBool::new(false),
            function_masked: AtomicBool::new(false),
        }
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Signals vector `n`; returns false when there is no such vector or
    /// MSI-X is off (the caller may fall back to another interrupt).
    pub fn trigger(&self, n: u16) -> bool {
        let Some(v) = self.vectors.get(usize::from(n)) else {
            return false;
        };
        if !self.enabled() {
            return false;
        }
        if self.blocked(v) {
            v.pending.store(true, Ordering::SeqCst);
            // The guest may have unmasked meanwhile and looked at the
            // pending bit before we set it: then delivering is ours to do.
            if self.blocked(v) || !v.pending.swap(false, Ordering::SeqCst) {
                return true;
            }
        }
        if let Err(e) = v.irqfd.write(1) {
            crate::guest_log!(
                log::Level::Warn,
                "MSI-X vector {n}: irqfd write failed: {e}"
            );
        }
        true
    }

    /// Whether the vector may not signal now: masked itself, the whole
    /// function masked, or MSI-X disabled (a pending bit then waits).
    fn blocked(&self, v: &Vector) -> bool {
        v.masked.load(Ordering::SeqCst)
            || self.function_masked.load(Ordering::SeqCst)
            || !self.enabled()
    }

    /// The eventfd that delivers vector `n` (for a handoff to vhost).
    pub fn irqfd(&self, n: u16) -> Option<&EventFd> {
        self.vectors.get(usize::from(n)).map(|v| &v.irqfd)
    }

    fn deliver_pending(&self, n: usize) {
        let Some(v) = self.vectors.get(n) else { return };
        if !self.blocked(v) && v.pending.swap(false, Ordering::SeqCst) {
            let _ = v.irqfd.write(1);
        }
    }

    /// Moves what was written to a disconnected vector's eventfd (by
    /// vhost-net, or a trigger racing a mask) into its pending bit.
    fn collect_signals(&self, n: usize) {
        let Some(v) = self.vectors.get(n) else { return };
        // Non-blocking: EAGAIN means the counter is zero.
        if v.irqfd.read().is_ok_and(|c| c > 0) {
            v.pending.store(true, Ordering::SeqCst);
        }
    }
}

#[derive(Clone, Copy, Default)]
struct Entry {
    addr: u64,
    data: u32,
    ctrl: u32,
    /// The route KVM has for this vector is stale.
    dirty: bool,
    /// The vector's eventfd is connected to KVM (it may signal now).
    connected: bool,
}

/// The vCPU side: the table and PBA as the guest sees them.
pub struct MsixTable {
    entries: Vec<Entry>,
    shared: Arc<MsixVectors>,
    router: Arc<dyn MsiRouter>,
}

impl MsixTable {
    pub fn new(shared: Arc<MsixVectors>, router: Arc<dyn MsiRouter>) -> Self {
        let entries = vec![
            Entry {
                ctrl: VECTOR_MASKED,
                ..Default::default()
            };
            shared.len()
        ];
        MsixTable {
            entries,
            shared,
            router,
        }
    }

    pub fn vectors(&self) -> Arc<MsixVectors> {
        self.shared.clone()
    }

    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    pub fn pba_size(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// The capability body (after ID and next pointer) with the table at
    /// `table_off` and the PBA at `pba_off`, both in BAR `bar`.
    pub fn capability(&self, bar: u8, table_off: u32, pba_off: u32) -> ([u8; 10], [u8; 10]) {
        let mut body = [0u8; 10];
        let n = self.entries.len().saturating_sub(1) as u16;
        body[0..2].copy_from_slice(&n.to_le_bytes());
        body[2..6].copy_from_slice(&(table_off | u32::from(bar)).to_le_bytes());
        body[6..10].copy_from_slice(&(pba_off | u32::from(bar)).to_le_bytes());
        let mut writable = [0u8; 10];
        writable[1] = ((CTRL_ENABLE | CTRL_FUNCTION_MASK) >> 8) as u8;
        (body, writable)
    }

    /// The guest wrote the capability's message control word.
    pub fn set_control(&mut self, control: u16) {
        let (enable, fmask) = (
            control & CTRL_ENABLE != 0,
            control & CTRL_FUNCTION_MASK != 0,
        );
        let is_on = enable && !fmask;
        if is_on {
            // Routes and connections first: device threads (and the
            // kernel) fire vectors as soon as they see them on.
            for n in 0..self.entries.len() {
                self.gate(n, is_on);
            }
        }
        self.shared.function_masked.store(fmask, Ordering::SeqCst);
        self.shared.enabled.store(enable, Ordering::SeqCst);
        if is_on {
            for n in 0..self.entries.len() {
                self.shared.deliver_pending(n);
            }
        } else {
            for n in 0..self.entries.len() {
                self.gate(n, is_on);
            }
        }
    }

    /// Whether the function as a whole may signal (enabled, not masked).
    fn function_on(&self) -> bool {
        self.shared.enabled() && !self.shared.function_masked.load(Ordering::SeqCst)
    }

    /// Connects vector `n`'s eventfd to KVM if it may signal (`function_on`
    /// and the vector unmasked), with its route up to date, and
    /// disconnects it otherwise.
    fn gate(&mut self, n: usize, function_on: bool) {
        let Some(e) = self.entries.get(n) else { return };
        let deliverable = function_on && e.ctrl & VECTOR_MASKED == 0;
        if deliverable == e.connected {
            if deliverable {
                self.sync_route(n);
            }
            return;
        }
        let gsi = self.shared.vectors[n].gsi;
        if deliverable {
            self.sync_route(n);
            // What came while disconnected becomes a pending bit, which
            // the caller delivers once the vector is marked unmasked.
            self.shared.collect_signals(n);
        }
        let irqfd = &self.shared.vectors[n].irqfd;
        match self.router.connect(irqfd, gsi, deliverable) {
            Ok(()) => self.entries[n].connected = deliverable,
            Err(err) => crate::guest_log!(
                log::Level::Warn,
                "MSI-X vector {n}: cannot {} the irqfd of GSI {gsi}: {err}",
                if deliverable { "connect" } else { "disconnect" }
            ),
        }
    }

    /// A guest read in the table; anything out of range or misaligned reads 0.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let (n, field) = ((offset / ENTRY_SIZE) as usize, offset % ENTRY_SIZE);
        let Some(e) = self.entries.get(n) else { return };
        let value: u64 = match (field, data.len()) {
            (0, 8) => e.addr,
            (0, 4) => e.addr & 0xffff_ffff,
            (4, 4) => e.addr >> 32,
            (8, 8) => u64::from(e.data) | (u64::from(e.ctrl) << 32),
            (8, 4) => u64::from(e.data),
            (12, 4) => u64::from(e.ctrl),
            _ => return,
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    /// A guest write in the table. Routes are updated when a vector is
    /// unmasked, or at once when the guest reprograms an unmasked one.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let (n, field) = ((offset / ENTRY_SIZE) as usize, offset % ENTRY_SIZE);
        let Some(e) = self.entries.get_mut(n) else {
            return;
        };
        let mut v = [0u8; 8];
        let Some(dst) = v.get_mut(..data.len()) else {
            return;
        };
        dst.copy_from_slice(data);
        let value = u64::from_le_bytes(v);
        let old = *e;
        match (field, data.len()) {
            (0, 8) => e.addr = value,
            (0, 4) => e.addr = (e.addr & !0xffff_ffff) | value,
            (4, 4) => e.addr = (e.addr & 0xffff_ffff) | (value << 32),
            (8, 8) => {
                e.data = value as u32;
                e.ctrl = (value >> 32) as u32;
            }
            (8, 4) => e.data = value as u32,
            (12, 4) => e.ctrl = value as u32,
            _ => return,
        }
        if e.addr != old.addr || e.data != old.data {
            e.dirty = true;
        }
        let masked = e.ctrl & VECTOR_MASKED != 0;
        let function_on = self.function_on();
        if !masked {
            // Route and connection first: a device thread that sees the
            // vector unmasked fires it at once.
            self.gate(n, function_on);
        }
        self.shared.vectors[n]
            .masked
            .store(masked, Ordering::SeqCst);
        if masked {
            self.gate(n, function_on);
        } else {
            self.shared.deliver_pending(n);
        }
    }

    fn sync_route(&mut self, n: usize) {
        let Some(e) = self.entries.get_mut(n) else {
            return;
        };
        if e.dirty {
            e.dirty = false;
            let gsi = self.shared.vectors[n].gsi;
            if let Err(err) = self.router.route(gsi, e.addr, e.data) {
                crate::guest_log!(
                    log::Level::Warn,
                    "MSI-X vector {n}: cannot route GSI {gsi}: {err}"
                );
            }
        }
    }

    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (n, e) in self.entries.iter().enumerate() {
            if !e.connected {
                self.shared.collect_signals(n);
            }
        }
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset as usize).saturating_add(i).saturating_mul(8);
            for bit in 0..8 {
                if self
                    .shared
                    .vectors
                    .get(first + bit)
                    .is_some_and(|v| v.pending.load(Ordering::Acquire))
                {
                    *b |= 1 << bit;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records routes, and which GSIs have an eventfd connected the way
    /// KVM_IRQFD refuses a second connection or a missing one.
    #[derive(Default)]
    struct Routes(Mutex<Vec<(u32, u64, u32)>>, Mutex<Vec<u32>>);
    impl MsiRouter for Routes {
        fn route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push((gsi, addr, data));
            Ok(())
        }

        fn connect(&self, _evt: &EventFd, gsi: u32, on: bool) -> std::io::Result<()> {
            let mut connected = self.1.lock().unwrap();
            match (on, connected.iter().position(|&g| g == gsi)) {
                (true, None) => connected.push(gsi),
                (false, Some(i)) => {
                    connected.remove(i);
                }
                (true, Some(_)) => return Err(std::io::Error::from_raw_os_error(libc::EBUSY)),
                (false, None) => return Err(std::io::Error::from_raw_os_error(libc::ENOENT)),
            }
            Ok(())
        }
    }

    impl Routes {
        fn connected(&self) -> Vec<u32> {
            let mut c = self.1.lock().unwrap().clone();
            c.sort_unstable();
            c
        }
    }

    fn setup(n: usize) -> (MsixTable, Arc<MsixVectors>, Arc<Routes>) {
        let v = (0..n)
            .map(|i| (EventFd::new(libc::EFD_NONBLOCK).unwrap(), 24 + i as u32))
            .collect();
        let shared = Arc::new(MsixVectors::new(v));
        let routes = Arc::new(Routes::default());
        (
            MsixTable::new(shared.clone(), routes.clone()),
            shared,
            routes,
        )
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let (mut t, v, routes) = setup(3);
        assert!(!v.trigger(0), "MSI-X off: nothing delivered");
        t.set_control(CTRL_ENABLE);
        t.write_table(16, &0xfee0_0000u32.to_le_bytes());
        t.write_table(16 + 8, &0x4041u32.to_le_bytes());
        assert!(routes.0.lock().unwrap().is_empty(), "masked: no route yet");
        assert!(v.trigger(1));
        assert!(v.irqfd(1).unwrap().read().is_err(), "masked: no irq");
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        t.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(*routes.0.lock().unwrap(), vec![(25, 0xfee0_0000, 0x4041)]);
        assert_eq!(v.irqfd(1).unwrap().read().unwrap(), 1, "pending delivered");
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        assert!(v.trigger(1));
        assert_eq!(v.irqfd(1).unwrap().read().unwrap(), 1);
        let mut d = [0u8; 4];
        t.read_table(16 + 8, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x4041);
    }

    #[test]
    fn a_pending_vector_waits_while_msix_is_disabled() {
        let (mut t, v, _) = setup(1);
        t.set_control(CTRL_ENABLE);
        assert!(v.trigger(0), "masked: pending");
        t.set_control(0);
        // Unmasked while MSI-X is off: the function may not signal.
        t.write_table(12, &0u32.to_le_bytes());
        assert!(v.irqfd(0).unwrap().read().is_err(), "MSI-X off: no irq");
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 1, "still pending");
        t.set_control(CTRL_ENABLE);
        assert_eq!(
            v.irqfd(0).unwrap().read().unwrap(),
            1,
            "delivered on enable"
        );
    }

    #[test]
    fn function_mask_holds_everything() {
        let (mut t, v, _) = setup(1);
        t.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        t.write_table(12, &0u32.to_le_bytes());
        assert!(v.trigger(0));
        assert!(v.irqfd(0).unwrap().read().is_err());
        t.set_control(CTRL_ENABLE);
        assert_eq!(v.irqfd(0).unwrap().read().unwrap(), 1);
    }

    #[test]
    fn what_vhost_signals_on_a_masked_vector_pends() {
        let (mut t, v, routes) = setup(2);
        t.set_control(CTRL_ENABLE);
        assert!(routes.connected().is_empty(), "masked: KVM not listening");
        // The kernel's vhost worker writes the vector's eventfd directly.
        v.irqfd(1).unwrap().write(1).unwrap();
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0b10, "a masked vector's signal shows as pending");
        t.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(routes.connected(), vec![25], "unmasked: connected");
        assert_eq!(v.irqfd(1).unwrap().read().unwrap(), 1, "delivered once");
        t.read_pba(0, &mut pba);
        assert_eq!(pba[0], 0);
        // Masked again while the kernel signals twice: one pending bit,
        // one interrupt on unmask.
        t.write_table(16 + 12, &1u32.to_le_bytes());
        assert!(routes.connected().is_empty());
        v.irqfd(1).unwrap().write(1).unwrap();
        v.irqfd(1).unwrap().write(1).unwrap();
        t.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(v.irqfd(1).unwrap().read().unwrap(), 1);
    }

    #[test]
    fn disabling_or_function_masking_disconnects_every_vector() {
        let (mut t, v, routes) = setup(3);
        t.set_control(CTRL_ENABLE);
        t.write_table(12, &0u32.to_le_bytes());
        t.write_table(2 * 16 + 12, &0u32.to_le_bytes());
        assert_eq!(routes.connected(), vec![24, 26]);
        t.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        assert!(routes.connected().is_empty(), "function masked");
        v.irqfd(2).unwrap().write(1).unwrap();
        t.set_control(CTRL_ENABLE);
        assert_eq!(routes.connected(), vec![24, 26]);
        assert_eq!(v.irqfd(2).unwrap().read().unwrap(), 1, "held, then sent");
        assert!(v.irqfd(0).unwrap().read().is_err(), "nothing for vector 0");
        t.set_control(0);
        assert!(routes.connected().is_empty(), "MSI-X disabled");
        // Re-enabling twice connects once (KVM would refuse a second).
        t.set_control(CTRL_ENABLE);
        t.set_control(CTRL_ENABLE);
        assert_eq!(routes.connected(), vec![24, 26]);
    }

    #[test]
    fn hostile_offsets_and_sizes_are_ignored() {
        let (mut t, v, _) = setup(2);
        for (off, len) in [
            (32u64, 4usize),
            (u64::MAX - 3, 4),
            (2, 4),
            (0, 16),
            (0, 3),
            (4, 8),
        ] {
            t.write_table(off, &vec![0u8; len]);
            let mut d = vec![0xaau8; len];
            t.read_table(off, &mut d);
        }
        assert!(!v.trigger(7));
        let mut big = [0u8; 64];
        t.read_pba(u64::from(u32::MAX), &mut big);
        assert_eq!(big, [0u8; 64]);
    }
}
