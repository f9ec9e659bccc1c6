//! What a VM is made of: the configuration the CLI builds and embedders fill in.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Kernel command line used when none is given: the console on the 8250 at
/// 0x3f8, a guest reboot through the keyboard controller (which ends rvm),
/// an immediate reboot on panic, and an i8042 probe that does not wait for a
/// mouse or multiplexer rvm does not emulate.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// The smallest guest rvm accepts: a compressed kernel must decompress in it.
pub const MIN_MEM_MIB: u64 = 32;

/// APIC ids are 8 bits in the MP table, 0xff is broadcast and the IOAPIC
/// takes the id after the last CPU.
pub const MAX_VCPUS: u8 = 254;

/// A virtual machine's description. As JSON (`rvm run --config FILE`)
/// only `kernel` is required; see crate::config_file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// A Linux bzImage with a 64-bit entry point.
    pub kernel: PathBuf,
    /// An optional initramfs, loaded high in low memory.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs, 1..=MAX_VCPUS.
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    /// NICs, in PCI slot order.
    #[serde(default)]
    pub nics: Vec<crate::net::NetConfig>,
    /// The seccomp filter of the VM's vCPU and NIC threads.
    #[serde(default, with = "crate::config_file::text")]
    pub seccomp: crate::vmm::seccomp::SeccompMode,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}

fn one() -> u8 {
    1
}

fn default_mem() -> u64 {
    VmConfig::new("").mem_mib
}

impl VmConfig {
    /// A configuration with rvm's defaults: one vCPU, 256 MiB, [`DEFAULT_CMDLINE`].
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            mem_mib: 256,
            nics: Vec::new(),
            seccomp: Default::default(),
        }
    }

    /// Checks what can be checked without opening KVM: ranges, and host
    /// memory from /proc/meminfo.
    pub fn validate(&self) -> Result<()> {
        if self.vcpus == 0 {
            return Err(Error::InvalidConfig(
                "--cpus must be at least 1".to_string(),
            ));
        }
        if self.vcpus > MAX_VCPUS {
            return Err(Error::InvalidConfig(format!(
                "--cpus {} is more than rvm supports ({MAX_VCPUS})",
                self.vcpus
            )));
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(Error::InvalidConfig(format!(
                "--mem {} MiB is too small: a Linux guest needs at least {MIN_MEM_MIB} MiB",
                self.mem_mib
            )));
        }
        if let Some(host_mib) = host_memory_mib() {
            if self.mem_mib > host_mib {
                return Err(Error::InvalidConfig(format!(
                    "--mem {} MiB is more than this host has ({host_mib} MiB); use a smaller --mem",
                    self.mem_mib
                )));
            }
        }
        for nic in &self.nics {
            if nic.model == crate::net::NicModel::E1000 && nic.vhost == crate::net::VhostMode::On {
                return Err(Error::InvalidConfig(format!(
                    "NIC {}: vhost=on needs model=virtio (vhost-net serves virtio queues only)",
                    nic.label()
                )));
            }
        }
        crate::net::config::validate_all(&mut self.nics.clone(), self.vcpus)
            .map_err(|e| Error::InvalidConfig(e.to_string()))?;
        if self.cmdline.as_bytes().contains(&0) {
            return Err(Error::Cmdline("it contains a NUL byte".to_string()));
        }
        Ok(())
    }
}

/// Parses a memory size in MiB: a bare number is MiB, and K, M, G or T
/// suffixes (optionally followed by "B" or "iB", any case) scale it. The
/// result must be a whole number of MiB.
pub fn parse_mem_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, kib_per_unit): (&str, u64) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1),
        Some('m') => (&body[..body.len() - 1], 1 << 10),
        Some('g') => (&body[..body.len() - 1], 1 << 20),
        Some('t') => (&body[..body.len() - 1], 1 << 30),
        Some(c) if c.is_ascii_digit() => (body, 1 << 10),
        _ => return Err(format!("'{s}' is not a size (examples: 512, 512M, 2G)")),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 512, 512M, 2G)"))?;
    let kib = n
        .checked_mul(kib_per_unit)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if kib % 1024 != 0 {
        return Err(format!("'{s}' is not a whole number of MiB"));
    }
    Ok(kib / 1024)
}

/// MemTotal from /proc/meminfo, in MiB; None when it cannot be read.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("512"), Ok(512));
        assert_eq!(parse_mem_size("512M"), Ok(512));
        assert_eq!(parse_mem_size("512MiB"), Ok(512));
        assert_eq!(parse_mem_size("2G"), Ok(2048));
        assert_eq!(parse_mem_size("2gb"), Ok(2048));
        assert_eq!(parse_mem_size("1048576K"), Ok(1024));
        assert_eq!(parse_mem_size("1T"), Ok(1 << 20));
        assert!(parse_mem_size("1500K").is_err());
        assert!(parse_mem_size("").is_err());
        assert!(parse_mem_size("M").is_err());
        assert!(parse_mem_size("-1").is_err());
        assert!(parse_mem_size("12X").is_err());
        assert!(parse_mem_size("99999999999999999999G").is_err());
    }

    #[test]
    fn validation() {
        let mut c = VmConfig::new("/k");
        assert!(c.validate().is_ok());
        c.vcpus = 0;
        assert!(c.validate().unwrap_err().to_string().contains("at least 1"));
        c.vcpus = 255;
        assert!(c.validate().unwrap_err().to_string().contains("254"));
        c.vcpus = 2;
        c.mem_mib = 8;
        assert!(c.validate().unwrap_err().to_string().contains("too small"));
        c.mem_mib = host_memory_mib().unwrap() + 1;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("more than this host"));
        c.mem_mib = 64;
        c.cmdline = "a\0b".into();
        assert!(c.validate().is_err());
    }
}
