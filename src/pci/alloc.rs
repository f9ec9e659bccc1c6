//! Where BARs go: a bump allocator over the MMIO window below 4 GiB and
//! the I/O port window, playing the part firmware plays on a real PC.

use super::BarKind;
use crate::arch::x86_64::layout;

/// I/O ports from here up are free on a PC (legacy devices live lower).
pub const IO_WINDOW: (u64, u64) = (0xc000, 0x1_0000);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no room for a {size:#x}-byte {kind:?} BAR in the PCI window")]
pub struct AllocError {
    pub kind: BarKind,
    pub size: u64,
}

pub struct PciAllocator {
    next_mmio: u64,
    mmio_end: u64,
    next_io: u64,
    io_end: u64,
}

impl Default for PciAllocator {
    fn default() -> Self {
        Self::new()
    }
}

impl PciAllocator {
    pub fn new() -> Self {
        PciAllocator {
            next_mmio: layout::PCI_MMIO_START,
            mmio_end: layout::PCI_MMIO_END,
            next_io: IO_WINDOW.0,
            io_end: IO_WINDOW.1,
        }
    }

    /// A naturally aligned range of `size` bytes (BARs must be aligned to
    /// their size), or an error when the window is full.
    pub fn allocate(&mut self, kind: BarKind, size: u64) -> Result<u64, AllocError> {
        let err = AllocError { kind, size };
        if !size.is_power_of_two() {
            return Err(err);
        }
        let (next, end) = match kind {
            BarKind::Io => (&mut self.next_io, self.io_end),
            BarKind::Memory32 | BarKind::Memory64 => (&mut self.next_mmio, self.mmio_end),
        };
        let base = next.next_multiple_of(size);
        match base.checked_add(size) {
            Some(top) if top <= end => {
                *next = top;
                Ok(base)
            }
            _ => Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_disjoint_and_bounded() {
        let mut a = PciAllocator::new();
        let x = a.allocate(BarKind::Memory32, 0x4000).unwrap();
        let y = a.allocate(BarKind::Memory32, 0x2_0000).unwrap();
        assert_eq!(x, layout::PCI_MMIO_START);
        assert_eq!(y % 0x2_0000, 0);
        assert!(y >= x + 0x4000);
        let p = a.allocate(BarKind::Io, 0x40).unwrap();
        assert_eq!(p, IO_WINDOW.0);
        assert_eq!(a.allocate(BarKind::Io, 0x40).unwrap(), IO_WINDOW.0 + 0x40);
        assert!(a.allocate(BarKind::Io, 0x1_0000).is_err());
        assert!(a.allocate(BarKind::Memory32, 3).is_err());
        assert!(a.allocate(BarKind::Memory64, 1 << 40).is_err());
    }
}
