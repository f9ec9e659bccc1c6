//! What kind of KVM this host has. A KVM backed by PVM (a paravirtual
//! backend for machines without VT-x/AMD-V) answers every ioctl, yet runs
//! only guest kernels built for it: a stock kernel stops after its setup
//! code without a word. rvm says so once at start, and carries on, since a
//! PVM guest kernel does work there.

use std::path::Path;

/// Why this host cannot boot a stock kernel, when it cannot: `cpuinfo` is
/// /proc/cpuinfo, `pvm_loaded` whether the kvm_pvm module is loaded.
pub fn pvm_warning(cpuinfo: &str, pvm_loaded: bool) -> Option<&'static str> {
    let hardware = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    (pvm_loaded && !hardware).then_some(
        "this host's /dev/kvm is PVM (the kvm_pvm module, and no VT-x/AMD-V in the CPU flags): \
         only a guest kernel built for PVM (CONFIG_PVM_GUEST) boots here, a stock kernel hangs \
         silently after its setup code; use a PVM guest kernel, or run rvm on a host with \
         VT-x/AMD-V or inside a nested host (scripts/nested-host)",
    )
}

/// [`pvm_warning`] for this host.
pub fn this_host_pvm_warning() -> Option<&'static str> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    pvm_warning(&cpuinfo, Path::new("/sys/module/kvm_pvm").exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_without_hardware_virtualisation_is_named() {
        let no_hw = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae hypervisor\n";
        let vmx = "flags\t\t: fpu vme vmx pae\n";
        let svm = "flags\t\t: fpu svm pae\n";
        let w = pvm_warning(no_hw, true).expect("PVM without VT-x/AMD-V");
        assert!(
            w.contains("PVM") && w.contains("scripts/nested-host"),
            "{w}"
        );
        // Hardware virtualisation, or no PVM module: no warning.
        assert_eq!(pvm_warning(vmx, true), None);
        assert_eq!(pvm_warning(svm, true), None);
        assert_eq!(pvm_warning(no_hw, false), None);
        // "vmx" inside another flag's name is not VT-x.
        assert!(pvm_warning("flags\t: vmx_ept svmlock\n", true).is_some());
    }
}
