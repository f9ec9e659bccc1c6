//! Per-vCPU CPUID: what KVM supports, plus the identity and topology each
//! vCPU reports (APIC id, one core per vCPU in one package), so Linux
//! counts the CPUs the MP table lists and knows it runs on a hypervisor.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_VENDOR: u32 = 0x0;
const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_ADDR_SIZES: u32 = 0x8000_0008;
const LEAF_EXT_TOPOLOGY: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
const AMD_ECX_TOPOEXT: u32 = 1 << 22;
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Bits of the APIC id that number cores: ceil(log2(vcpus)).
fn core_id_bits(vcpus: u8) -> u32 {
    (vcpus.max(1) as u32).next_power_of_two().trailing_zeros()
}

fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries
        .iter()
        .find(|e| e.function == LEAF_VENDOR)
        .is_some_and(|e| e.ebx == u32::from_le_bytes(*b"Auth"))
}

fn topology_entries(function: u32, apic_id: u8, vcpus: u8) -> Vec<kvm_cpuid_entry2> {
    let entry = |index: u32, eax: u32, ebx: u32, level: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: apic_id as u32,
        ..Default::default()
    };
    vec![
        entry(0, 0, 1, TOPOLOGY_LEVEL_SMT),
        entry(1, core_id_bits(vcpus), vcpus as u32, TOPOLOGY_LEVEL_CORE),
        // An invalid level ends the enumeration.
        entry(2, 0, 0, 0),
    ]
}

/// Returns the CPUID entries for vCPU `apic_id` of `vcpus`, derived from
/// KVM's supported entries.
pub fn for_vcpu(supported: &[kvm_cpuid_entry2], apic_id: u8, vcpus: u8) -> Vec<kvm_cpuid_entry2> {
    let amd = is_amd(supported);
    let multi = vcpus > 1;
    let mut out: Vec<kvm_cpuid_entry2> = Vec::with_capacity(supported.len() + 6);
    let mut topology_done = [false; 2];
    for e in supported {
        let mut e = *e;
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0xff)
                    | (8 << 8) // CLFLUSH line size in 8-byte units
                    | ((vcpus as u32) << 16)
                    | ((apic_id as u32) << 24);
                e.ecx |= ECX_HYPERVISOR;
                e.edx = if multi {
                    e.edx | EDX_HTT
                } else {
                    e.edx & !EDX_HTT
                };
            }
            LEAF_CACHE_PARAMS => {
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 {
                    vcpus as u32 - 1
                } else {
                    0
                };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((vcpus as u32 - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                let slot = (e.function == LEAF_TOPOLOGY_V2) as usize;
                if !topology_done[slot] {
                    out.extend(topology_entries(e.function, apic_id, vcpus));
                    topology_done[slot] = true;
                }
                continue;
            }
            LEAF_EXT_FEATURES if amd => {
                e.ecx &= !AMD_ECX_TOPOEXT;
                e.ecx = if multi {
                    e.ecx | AMD_ECX_CMP_LEGACY
                } else {
                    e.ecx & !AMD_ECX_CMP_LEGACY
                };
            }
            LEAF_EXT_ADDR_SIZES if amd => {
                e.ecx = (e.ecx & !0xf0ff) | (vcpus as u32 - 1) | (core_id_bits(vcpus) << 12);
            }
            // Without TOPOEXT the guest must not read the extended topology.
            LEAF_EXT_TOPOLOGY if amd => continue,
            _ => {}
        }
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn intel() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, 0x1f, u32::from_le_bytes(*b"Genu"), 0, 0),
            leaf(1, 0, 0x806f8, 0xff_ff_ff_ff, 0, 0xffff_ffff),
            leaf(4, 0, (1 << 5) | 1, 0, 0, 0),
            leaf(4, 1, (3 << 5) | 3, 0, 0, 0),
            leaf(0xb, 0, 1, 2, 0x100, 7),
            leaf(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0, 0),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn apic_id_and_hypervisor_bit() {
        let v = for_vcpu(&intel(), 3, 4);
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & EDX_HTT, 0);
        let single = find(&for_vcpu(&intel(), 0, 1), 1, 0);
        assert_eq!(single.edx & EDX_HTT, 0);
        // KVM's paravirt leaves pass through.
        assert_eq!(find(&v, 0x4000_0000, 0).ebx, 0x4b4d_564b);
    }

    #[test]
    fn topology_leaf_describes_one_package() {
        let v = for_vcpu(&intel(), 5, 6);
        let smt = find(&v, 0xb, 0);
        let core = find(&v, 0xb, 1);
        let end = find(&v, 0xb, 2);
        assert_eq!((smt.eax, smt.ebx, smt.ecx >> 8, smt.edx), (0, 1, 1, 5));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8, core.edx), (3, 6, 2, 5));
        assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
        assert_eq!(v.iter().filter(|e| e.function == 0xb).count(), 3);
        let l3 = find(&v, 4, 1);
        assert_eq!(l3.eax >> 26, 5);
        assert_eq!((l3.eax >> 14) & 0xfff, 5);
        assert_eq!((find(&v, 4, 0).eax >> 14) & 0xfff, 0);
    }

    #[test]
    fn amd_core_count() {
        let amd = vec![
            leaf(0, 0, 0x10, u32::from_le_bytes(*b"Auth"), 0, 0),
            leaf(1, 0, 0, 0, 0, 0),
            leaf(0x8000_0001, 0, 0, 0, AMD_ECX_TOPOEXT, 0),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
            leaf(0x8000_001e, 0, 0, 0x100, 0, 0),
        ];
        let v = for_vcpu(&amd, 1, 2);
        assert_eq!(find(&v, 0x8000_0001, 0).ecx, AMD_ECX_CMP_LEGACY);
        assert_eq!(find(&v, 0x8000_0008, 0).ecx & 0xff, 1);
        assert_eq!((find(&v, 0x8000_0008, 0).ecx >> 12) & 0xf, 1);
        assert!(v.iter().all(|e| e.function != 0x8000_001e));
    }

    #[test]
    fn core_bits() {
        assert_eq!(core_id_bits(1), 0);
        assert_eq!(core_id_bits(2), 1);
        assert_eq!(core_id_bits(3), 2);
        assert_eq!(core_id_bits(254), 8);
    }
}
