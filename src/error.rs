//! The library's error type. Each message names the problem and, where the
//! user can do something about it, what to do.

use std::path::PathBuf;

/// Everything that can go wrong while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range; the string says which and why.
    #[error("{0}")]
    InvalidConfig(String),

    #[error("cannot read kernel {path}: {source} (check the path given to --kernel)")]
    KernelRead {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path} is not a bzImage ({why}); pass a Linux bzImage such as arch/x86/boot/bzImage or /boot/vmlinuz-*")]
    NotBzImage { path: PathBuf, why: &'static str },

    #[error("cannot read initrd {path}: {source} (check the path given to --initrd)")]
    InitrdRead {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("initrd of {size} bytes does not fit in guest memory below {limit:#x}; give the guest more memory with --mem")]
    InitrdTooLarge { size: u64, limit: u64 },

    #[error("kernel does not fit in guest memory ({0}); give the guest more memory with --mem")]
    KernelLoad(String),

    #[error("kernel command line is invalid: {0}")]
    Cmdline(String),

    #[error("cannot open /dev/kvm: {0}; load kvm_intel or kvm_amd and make sure this user can read and write /dev/kvm (for example, add it to the kvm group)")]
    KvmOpen(std::io::Error),

    #[error(
        "/dev/kvm does not support {0}, which rvm needs; use a host kernel with KVM support for it"
    )]
    KvmMissingCap(&'static str),

    #[error("KVM {op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },

    #[error("cannot allocate {mib} MiB of guest memory: {why}; use a smaller --mem")]
    GuestMemory { mib: u64, why: String },

    #[error("writing boot data into guest memory failed: {0}")]
    BootSetup(String),

    #[error("{0}")]
    HostNic(#[from] crate::net::HostNicError),

    #[error("NIC {nic}: vhost=on, but {source}")]
    Vhost {
        nic: String,
        source: crate::net::vhost::VhostError,
    },

    #[error("NIC {nic}: vhost=on, but the {stage} stage needs the frames in rvm; use vhost=auto (falls back to rvm's data path) or vhost=off")]
    StageNeedsUserspace { nic: String, stage: String },

    #[error("NIC {nic}: {source}")]
    Egress {
        nic: String,
        source: crate::net::egress::NftError,
    },

    #[error("NIC {nic}: {source}")]
    Stage {
        nic: String,
        source: crate::net::stage::StageError,
    },

    #[error("NIC {nic}: {source}")]
    Capture {
        nic: String,
        source: crate::net::capture::CaptureError,
    },

    #[error("there is no NIC {0} (NICs are numbered from 0 in configuration order)")]
    NoSuchNic(usize),

    #[error("{0} (--seccomp off runs without the filter)")]
    Seccomp(crate::vmm::seccomp::SeccompError),

    #[error("device setup failed: {0}")]
    Device(String),

    #[error("cannot start a vCPU thread: {0}")]
    VcpuThread(std::io::Error),

    #[error("vCPU {cpu} stopped with an error: {why}")]
    VcpuRun { cpu: usize, why: String },

    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Wraps a failed KVM ioctl with the name of the operation.
    pub fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
}

/// The library's result type.
pub type Result<T> = std::result::Result<T, Error>;
