//! KVM's GSI routing table. KVM_SET_GSI_ROUTING replaces the whole table,
//! so rvm keeps it: the PC's legacy routes (GSI 0–23 to the IOAPIC, 0–15
//! to the PICs, as KVM sets them by default) plus one MSI route per MSI-X
//! vector, each GSI with an irqfd.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::error::Result;
use crate::pci::msix::MsiRouter;

/// GSIs below this are the IOAPIC's pins.
pub const IOAPIC_PINS: u32 = 24;

pub struct GsiRouter {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

struct State {
    msi: BTreeMap<u32, (u64, u32)>,
    next_gsi: u32,
}

impl GsiRouter {
    pub fn new(vm: Arc<VmFd>) -> Self {
        GsiRouter {
            vm,
            state: Mutex::new(State {
                msi: BTreeMap::new(),
                next_gsi: IOAPIC_PINS,
            }),
        }
    }

    /// A fresh GSI and the eventfd that will signal it, for one MSI-X
    /// vector. The eventfd is connected to the GSI (KVM_IRQFD) only while
    /// the guest lets the vector signal: [`MsiRouter::connect`].
    pub fn msi_irqfd(&self) -> Result<(EventFd, u32)> {
        let gsi = {
            let mut s = crate::lock_or_recover(&self.state);
            let gsi = s.next_gsi;
            s.next_gsi += 1;
            gsi
        };
        let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        Ok((evt, gsi))
    }

    fn commit(&self, s: &State) -> std::io::Result<()> {
        let mut entries = Vec::with_capacity(40 + s.msi.len());
        for gsi in 0..IOAPIC_PINS {
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 8 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
        }
        for (&gsi, &(addr, data)) in &s.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = addr as u32;
            e.u.msi.address_hi = (addr >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| std::io::Error::other(format!("GSI routing table: {e:?}")))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl MsiRouter for GsiRouter {
    fn route(&self, gsi: u32, addr: u64, data: u32) -> std::io::Result<()> {
        let mut s = crate::lock_or_recover(&self.state);
        s.msi.insert(gsi, (addr, data));
        self.commit(&s)
    }

    fn connect(&self, evt: &EventFd, gsi: u32, on: bool) -> std::io::Result<()> {
        // KVM injects at once when an eventfd connected here already has
        // a count, so a signal that came while disconnected is not lost.
        let r = if on {
            self.vm.register_irqfd(evt, gsi)
        } else {
            self.vm.unregister_irqfd(evt, gsi)
        };
        r.map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// The PCI INTx inputs of the IOAPIC, driven with KVM_IRQ_LINE. Several
/// devices may share one: the line is high while any of them asserts it,
/// so one device's deassert cannot swallow another's interrupt.
pub struct IntxLines {
    vm: Arc<VmFd>,
    asserted: Mutex<BTreeMap<u32, u64>>,
    next_source: Mutex<u32>,
}

impl IntxLines {
    pub fn new(vm: Arc<VmFd>) -> Self {
        IntxLines {
            vm,
            asserted: Mutex::new(BTreeMap::new()),
            next_source: Mutex::new(0),
        }
    }

    /// A device's handle on IOAPIC input `gsi` (at most 64 per VM).
    pub fn line(self: &Arc<Self>, gsi: u32) -> Option<IntxLine> {
        let mut n = crate::lock_or_recover(&self.next_source);
        if *n >= 64 {
            return None;
        }
        let source = 1u64 << *n;
        *n += 1;
        Some(IntxLine {
            lines: self.clone(),
            gsi,
            source,
        })
    }
}

pub struct IntxLine {
    lines: Arc<IntxLines>,
    gsi: u32,
    source: u64,
}

impl crate::devices::LevelIrq for IntxLine {
    fn set_level(&self, asserted: bool) {
        let mut all = crate::lock_or_recover(&self.lines.asserted);
        let mask = all.entry(self.gsi).or_insert(0);
        let was = *mask != 0;
        if asserted {
            *mask |= self.source;
        } else {
            *mask &= !self.source;
        }
        let now = *mask != 0;
        if now != was {
            if let Err(e) = self.lines.vm.set_irq_line(self.gsi, now) {
                crate::guest_log!(log::Level::Warn, "KVM_IRQ_LINE {} = {now}: {e}", self.gsi);
            }
        }
    }
}
