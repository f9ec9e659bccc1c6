//! rvm: a small KVM virtual machine monitor whose networking is its reason
//! to exist.
//!
//! The crate is both the `rvm` command and a library for programs that embed
//! VMs. The embedding API is [`VmConfig`] (what to boot) and [`Vm`] (the
//! machine): build a `Vm` from a config, [`Vm::start`] it, and wait on the
//! returned [`RunningVm`].
//!
//! Layout, from the bottom up:
//! - [`arch`]: the x86_64 boot contract (memory map, page tables, boot_params,
//!   MP table, CPUID, initial registers). Pure functions over guest memory.
//! - [`bus`]: port-I/O and MMIO address maps that route vCPU exits to devices.
//! - [`pci`]: configuration space, the root bus, BAR placement, MSI-X.
//! - [`virtio`]: the virtio 1.x PCI transport and the device contract.
//! - [`devices`]: device models: legacy (8250 UART, i8042 reset line) and
//!   NICs ([`devices::virtio_net`]).
//! - [`net`]: the host side of a NIC: TAP, bridge, scripts, NIC options.
//! - [`vmm`]: the KVM VM, its memory, vCPU threads and their shutdown.

pub mod arch;
pub mod bus;
pub mod config;
pub mod devices;
pub mod error;
pub mod net;
pub mod pci;
pub mod virtio;
pub mod vmm;

pub use config::{parse_mem_size, VmConfig, DEFAULT_CMDLINE};
pub use error::{Error, Result};
pub use vmm::{ExitReason, RunningVm, Vm};
