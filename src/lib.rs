//! rvm: a small KVM virtual machine monitor whose networking is its reason
//! to exist.
//!
//! The crate is both the `rvm` command and a library for programs that
//! embed VMs (sandbox platforms, test suites). The command is a thin layer
//! over the same API:
//! - [`VmConfig`] says what to boot: kernel, initrd, command line, vCPUs,
//!   memory and NICs ([`NetConfig`]: every `--net` option, including a TAP
//!   fd the caller opened, [`NetConfig::tap_fd`]).
//! - [`Vm::new`] checks it, sets up the host side (TAPs, bridges, scripts)
//!   and builds the machine; the guest's serial console goes to any
//!   `Write + Send` the caller gives. [`Vm::start`] returns at once with a
//!   [`RunningVm`].
//! - [`RunningVm`] waits for the end ([`RunningVm::wait`],
//!   [`RunningVm::wait_timeout`]), stops the guest gracefully with a
//!   deadline and then by force ([`RunningVm::shutdown`]), and reads each
//!   NIC's frame, byte and drop counters ([`RunningVm::nic_counters`]).
//!   [`VmController`] does the same from other threads. Dropping a
//!   `RunningVm` stops the VM and removes what rvm created on the host.
//! - [`api`] serves a running VM's controller as HTTP/JSON on a UNIX
//!   socket (`rvm run --api-sock`); [`VmConfig::from_file`] reads a VM
//!   as JSON (`rvm run --config`).
//!
//! ```no_run
//! use std::time::Duration;
//! use rvm::{ExitReason, NetConfig, Vm, VmConfig};
//!
//! # fn main() -> Result<(), rvm::Error> {
//! let mut config = VmConfig::new("/boot/vmlinuz");
//! config.initrd = Some("initramfs.cpio.gz".into());
//! config.vcpus = 2;
//! config.mem_mib = 512;
//! let mut nic = NetConfig::tap("tap0");
//! nic.bridge = Some("br0".into());
//! config.nics.push(nic);
//!
//! // The console: any writer, here a buffer shared with this thread.
//! let console = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
//! struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
//! impl std::io::Write for Shared {
//!     fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
//!         self.0.lock().unwrap().extend_from_slice(b);
//!         Ok(b.len())
//!     }
//!     fn flush(&mut self) -> std::io::Result<()> { Ok(()) }
//! }
//!
//! let mut vm = Vm::new(&config, Box::new(Shared(console.clone())))?.start()?;
//! if vm.wait_timeout(Duration::from_secs(30)).is_none() {
//!     for nic in vm.nic_counters() {
//!         println!("{}: {} frames in, {} out", nic.name, nic.counters.rx_frames,
//!                  nic.counters.tx_frames);
//!     }
//!     // Ctrl-Alt-Del, then a forced stop if the guest ignores it for 10 s.
//!     match vm.shutdown(Duration::from_secs(10)) {
//!         ExitReason::Stopped => println!("forced"),
//!         other => println!("the guest ended: {other:?}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! A complete program is `examples/embed.rs`.
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

pub mod api;
pub mod arch;
pub mod bus;
pub mod config;
pub mod config_file;
pub mod devices;
pub mod error;
pub mod logging;
pub mod net;
pub mod pci;
pub mod virtio;
pub mod vmm;

pub use config::{parse_mem_size, VmConfig, DEFAULT_CMDLINE};
pub use error::{Error, Result};
pub use net::NetCounters;
pub use net::{MacAddr, NetConfig, NicModel, VhostMode};
pub use vmm::{
    DataPath, ExitReason, NicInfo, RunningVm, VcpuRegisters, VcpuReport, Vm, VmController,
};

/// Locks `m`, taking the data as it is if a thread panicked holding the
/// lock: every structure rvm locks stays consistent between statements
/// that could panic, and a VM must not stop because one thread died.
pub fn lock_or_recover<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
