//! Device models: the legacy platform devices a Linux guest expects on a
//! PC, and the NICs.

pub mod e1000;
pub mod i8042;
pub mod serial;
#[cfg(any(test, feature = "fuzzing"))]
pub mod test_backend;
pub mod virtio_net;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line backed by an eventfd registered with KVM as an irqfd:
/// writing it asserts the GSI in the in-kernel IOAPIC/PIC.
pub struct IrqLine(pub EventFd);

impl IrqLine {
    pub fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}

/// A level-triggered interrupt input (PCI INTx): the device says whether
/// it wants service; the line is the OR of every device on it.
pub trait LevelIrq: Send + Sync {
    fn set_level(&self, asserted: bool);
}
