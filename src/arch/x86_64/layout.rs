//! The guest physical memory map.
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_0520  IDT (empty)
//! 0x0000_7000  boot_params    0x0000_8ff0  initial stack (grows down)
//! 0x0000_9000  PML4           0x0000_a000  PDPT
//! 0x0000_b000  4 page directories (identity map of the first 4 GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (last KiB of base memory, where Linux scans)
//! 0x0010_0000  kernel (bzImage protected-mode part)
//! ...          initrd, at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: PCI windows, IOAPIC, LAPIC
//! 4 GiB        RAM above the hole, when the guest has more than 3 GiB
//! ```

use vm_memory::GuestAddress;

pub const GDT_START: u64 = 0x500;
pub const IDT_START: u64 = 0x520;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Page directories mapping 1 GiB each with 2 MiB pages.
pub const PD_COUNT: u64 = 4;
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line rvm writes (the kernel may accept less).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// End of usable base memory; the MP table sits just above.
pub const EBDA_START: u64 = 0x9_fc00;
pub const MPTABLE_START: u64 = EBDA_START;
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole (no RAM from here to 4 GiB).
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 1 << 32;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Where PCI memory BARs are placed: the hole up to the IOAPIC.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
pub const PCI_MMIO_END: u64 = IOAPIC_ADDR as u64;
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;

// The stack grows down from between boot_params and the page tables, and
// the MP table's floating pointer is in the KiB below 640 KiB where Linux scans.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START && BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000);
const _: () = assert!(MPTABLE_START + 0x400 <= 0xa_0000);

/// The RAM ranges of a guest with `mem_bytes` of memory: below the MMIO
/// hole, and the rest above 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(GuestAddress, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_bytes)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), mem_bytes - MMIO_HOLE_START),
        ]
    }
}

/// The end (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_around_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(GuestAddress(0), 3 << 30)]);
        assert_eq!(
            ram_ranges(5 << 30),
            vec![(GuestAddress(0), 3 << 30), (GuestAddress(4 << 30), 2 << 30)]
        );
        assert_eq!(low_ram_end(5 << 30), 3 << 30);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let mut areas = [
            (GDT_START, 0x20),
            (IDT_START, 8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPT_START, 0x1000),
            (PD_START, PD_COUNT * 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, 0x400),
        ];
        areas.sort();
        for w in areas.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
    }
}
