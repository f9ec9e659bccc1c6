//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI finds its CPUs, its IOAPIC, and which IOAPIC pin each ISA and PCI
//! interrupt arrives on.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_DEFAULT_PHYS_BASE, IOAPIC_ADDR, MPTABLE_START};
use crate::error::{Error, Result};
use crate::vmm::memory::GuestRam;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u8 = 24;
/// ISA interrupts 0..16 go to the IOAPIC pin of the same number.
const ISA_IRQS: u8 = 16;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Polarity and trigger "conform to the bus": edge/high for ISA, level/low for PCI.
const IRQ_FLAGS_CONFORM: u16 = 0;

pub const PCI_BUS_ID: u8 = 0;
pub const ISA_BUS_ID: u8 = 1;

/// A PCI INTx line routed to an IOAPIC pin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciIrqRoute {
    /// PCI device number on bus 0 (0..32).
    pub device: u8,
    /// Interrupt pin: 1 = INTA# .. 4 = INTD#.
    pub pin: u8,
    /// IOAPIC input.
    pub ioapic_pin: u8,
}

/// The IOAPIC's id: the one after the last CPU's APIC id.
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the floating pointer and configuration table for a table placed
/// at guest address `base`.
pub fn build(base: u64, vcpus: u8, pci_routes: &[PciIrqRoute]) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    let ioapic = ioapic_id(vcpus);

    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    for (id, name) in [(PCI_BUS_ID, b"PCI   "), (ISA_BUS_ID, b"ISA   ")] {
        entries.extend_from_slice(&[ENTRY_BUS, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;

    let mut io_int = |kind: u8, bus: u8, bus_irq: u8, pin: u8| {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind]);
        entries.extend_from_slice(&IRQ_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[bus, bus_irq, ioapic, pin]);
        count += 1;
    };
    // ISA IRQs map 1:1 onto IOAPIC pins, as KVM's default GSI routing does.
    for irq in 0..ISA_IRQS {
        io_int(INT_TYPE_INT, ISA_BUS_ID, irq, irq);
    }
    for r in pci_routes {
        // A PCI source is encoded as device << 2 | (pin - 1).
        io_int(
            INT_TYPE_INT,
            PCI_BUS_ID,
            (r.device << 2) | (r.pin.saturating_sub(1) & 3),
            r.ioapic_pin,
        );
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&IRQ_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.extend_from_slice(&[SPEC_REV, 0]); // checksum filled below
    header.extend_from_slice(b"RVM     ");
    header.extend_from_slice(b"RVM-MPTABLE ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_DEFAULT_PHYS_BASE.to_le_bytes());
    header.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_LEN);

    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    fp.extend_from_slice(&table);
    fp
}

/// Writes the MP table at [`MPTABLE_START`].
pub fn write(mem: &GuestRam, vcpus: u8, pci_routes: &[PciIrqRoute]) -> Result<()> {
    let bytes = build(MPTABLE_START, vcpus, pci_routes);
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|e| Error::BootSetup(format!("MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Parses the table like Linux's mpparse does and returns entry types.
    fn parse(bytes: &[u8], base: u64) -> Vec<(u8, Vec<u8>)> {
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0, "floating pointer checksum");
        let ptr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        let t = &bytes[(ptr - base) as usize..];
        assert_eq!(&t[..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(sum(&t[..len]), 0, "table checksum");
        let count = u16::from_le_bytes([t[34], t[35]]);
        let mut off = HEADER_LEN;
        let mut out = vec![];
        for _ in 0..count {
            let size = if t[off] == ENTRY_PROCESSOR { 20 } else { 8 };
            out.push((t[off], t[off..off + size].to_vec()));
            off += size;
        }
        assert_eq!(off, len, "entries fill the table exactly");
        out
    }

    #[test]
    fn table_for_four_cpus() {
        let b = build(MPTABLE_START, 4, &[]);
        let entries = parse(&b, MPTABLE_START);
        let cpus: Vec<_> = entries.iter().filter(|e| e.0 == ENTRY_PROCESSOR).collect();
        assert_eq!(cpus.len(), 4);
        assert_eq!(cpus[0].1[3], CPU_ENABLED | CPU_BSP);
        assert_eq!(cpus[3].1[1], 3, "APIC id");
        assert_eq!(cpus[3].1[3], CPU_ENABLED);
        let ioapic = entries.iter().find(|e| e.0 == ENTRY_IOAPIC).unwrap();
        assert_eq!(ioapic.1[1], 4, "IOAPIC id follows the CPUs");
        assert_eq!(
            u32::from_le_bytes(ioapic.1[4..8].try_into().unwrap()),
            IOAPIC_ADDR
        );
        let ints: Vec<_> = entries
            .iter()
            .filter(|e| e.0 == ENTRY_IO_INTERRUPT)
            .collect();
        assert_eq!(ints.len(), 16);
        // ISA IRQ 4 (the UART) on pin 4.
        assert!(ints
            .iter()
            .any(|e| e.1[1] == INT_TYPE_INT && e.1[4] == ISA_BUS_ID && e.1[5] == 4 && e.1[7] == 4));
        let lints: Vec<_> = entries
            .iter()
            .filter(|e| e.0 == ENTRY_LOCAL_INTERRUPT)
            .collect();
        assert_eq!(lints.len(), 2);
        assert_eq!((lints[1].1[1], lints[1].1[7]), (INT_TYPE_NMI, 1));
    }

    #[test]
    fn pci_routes_are_encoded() {
        let routes = [
            PciIrqRoute {
                device: 3,
                pin: 1,
                ioapic_pin: 10,
            },
            PciIrqRoute {
                device: 4,
                pin: 2,
                ioapic_pin: 11,
            },
        ];
        let b = build(MPTABLE_START, 1, &routes);
        let entries = parse(&b, MPTABLE_START);
        let pci: Vec<_> = entries
            .iter()
            .filter(|e| e.0 == ENTRY_IO_INTERRUPT && e.1[4] == PCI_BUS_ID)
            .collect();
        assert_eq!(pci.len(), 2);
        assert_eq!((pci[0].1[5], pci[0].1[7]), (3 << 2, 10));
        assert_eq!((pci[1].1[5], pci[1].1[7]), ((4 << 2) | 1, 11));
    }

    #[test]
    fn max_cpus_fit_below_1mib() {
        let b = build(MPTABLE_START, crate::config::MAX_VCPUS, &[]);
        parse(&b, MPTABLE_START);
        assert!(MPTABLE_START + b.len() as u64 <= 0x10_0000);
        let m = crate::vmm::memory::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        write(&m, crate::config::MAX_VCPUS, &[]).unwrap();
        let mut sig = [0u8; 4];
        m.read_slice(&mut sig, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
