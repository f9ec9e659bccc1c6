//! Identity-mapped page tables and a flat GDT, so the vCPU can start
//! directly in 64-bit long mode at the kernel's 64-bit entry point.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{GDT_START, IDT_START, PDPT_START, PD_COUNT, PD_START, PML4_START};
use crate::error::{Error, Result};
use crate::vmm::memory::GuestRam;

const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M_PAGE: u64 = 0x80;

/// GDT: null, 64-bit code, data, TSS; flat, base 0.
pub const GDT_TABLE: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const CODE_SELECTOR: u16 = 1 << 3;
pub const DATA_SELECTOR: u16 = 2 << 3;
pub const TSS_SELECTOR: u16 = 3 << 3;

/// Packs a segment descriptor from its flags (the access byte in bits 0..8,
/// the granularity nibble in bits 12..16), base and 20-bit limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM view of a GDT entry, as the vCPU's hidden segment state.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: (table_index as u16) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Writes the GDT and an empty IDT.
pub fn write_gdt_idt(mem: &GuestRam) -> Result<()> {
    for (i, entry) in GDT_TABLE.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_START + (i as u64) * 8))
            .map_err(|e| Error::BootSetup(format!("GDT: {e}")))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|e| Error::BootSetup(format!("IDT: {e}")))?;
    Ok(())
}

/// Writes page tables identity-mapping the first 4 GiB with 2 MiB pages and
/// returns the value for CR3. The kernel, boot_params and command line must
/// be mapped at entry; the kernel builds its own tables right after.
pub fn write_identity_page_tables(mem: &GuestRam) -> Result<u64> {
    let err = |e: vm_memory::GuestMemoryError| Error::BootSetup(format!("page tables: {e}"));
    mem.write_obj(PDPT_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(err)?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_START + pd * 0x1000;
        mem.write_obj(pd_addr | PTE_PRESENT_RW, GuestAddress(PDPT_START + pd * 8))
            .map_err(err)?;
        for i in 0..512u64 {
            let phys = ((pd * 512 + i) << 21) | PDE_2M_PAGE | PTE_PRESENT_RW;
            mem.write_obj(phys, GuestAddress(pd_addr + i * 8))
                .map_err(err)?;
        }
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestRam {
        crate::vmm::memory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_long_mode_segments() {
        let code = segment_from_gdt(GDT_TABLE[1], 1);
        assert_eq!(
            (code.l, code.db, code.present, code.s, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        assert_eq!((code.base, code.limit, code.g), (0, 0xffff_ffff, 1));
        assert_eq!(code.selector, CODE_SELECTOR);
        let data = segment_from_gdt(GDT_TABLE[2], 2);
        assert_eq!((data.l, data.db, data.type_, data.present), (0, 1, 0x3, 1));
        let tss = segment_from_gdt(GDT_TABLE[3], 3);
        assert_eq!((tss.s, tss.type_, tss.selector), (0, 0xb, TSS_SELECTOR));
        let null = segment_from_gdt(GDT_TABLE[0], 0);
        assert_eq!((null.present, null.unusable), (0, 1));
        // Known encodings (as in the kernel's GDT_ENTRY macro).
        assert_eq!(GDT_TABLE[1], 0x00af_9b00_0000_ffff);
        assert_eq!(GDT_TABLE[2], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn page_tables_identity_map_4gib() {
        let m = mem();
        assert_eq!(write_identity_page_tables(&m).unwrap(), PML4_START);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPT_START | 3);
        // Walk a few addresses through the tables by hand.
        for addr in [
            0u64,
            0x10_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            let pdpte: u64 = m
                .read_obj(GuestAddress(PDPT_START + ((addr >> 30) & 511) * 8))
                .unwrap();
            assert_eq!(pdpte & 3, 3);
            let pde: u64 = m
                .read_obj(GuestAddress((pdpte & !0xfff) + ((addr >> 21) & 511) * 8))
                .unwrap();
            assert_eq!(pde & 0x83, 0x83, "2M page, present, writable");
            assert_eq!((pde & !0x1f_ffff) | (addr & 0x1f_ffff), addr);
        }
        let beyond: u64 = m.read_obj(GuestAddress(PDPT_START + 4 * 8)).unwrap();
        assert_eq!(beyond, 0, "nothing mapped above 4 GiB");
    }

    #[test]
    fn gdt_written_where_sregs_point() {
        let m = mem();
        write_gdt_idt(&m).unwrap();
        for (i, e) in GDT_TABLE.iter().enumerate() {
            let v: u64 = m.read_obj(GuestAddress(GDT_START + i as u64 * 8)).unwrap();
            assert_eq!(v, *e);
        }
    }
}
