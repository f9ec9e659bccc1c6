//! Legacy platform devices a Linux guest expects on a PC.

pub mod i8042;
pub mod serial;

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
