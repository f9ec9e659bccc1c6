//! One thread per vCPU: run it, route its exits to the buses, and stop
//! when the VM stops.

use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use super::exit::{ExitReason, ExitSignal};
use super::inspect::{VcpuInspector, VcpuRegisters};
use crate::bus::Bus;

/// The signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs a no-op handler for the kick signal: its only job is to make
/// KVM_RUN return EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

pub struct Vcpu {
    pub id: usize,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub inspector: Arc<VcpuInspector>,
}

impl Vcpu {
    /// Logs where the guest was: the only evidence a triple fault leaves.
    /// (On AMD, KVM reinitialises the VMCB on shutdown, so this shows the
    /// reset state there; on Intel it is the faulting state.)
    fn log_state(&self, why: &str) {
        match VcpuRegisters::read(&self.fd) {
            Ok(r) => log::error!("vCPU {} {why}: {r}", self.id),
            Err(e) => log::error!("vCPU {} {why}: registers unreadable: {e}", self.id),
        }
    }

    /// Runs until the VM stops; every way out records an exit reason.
    pub fn run(mut self) {
        let inspector = self.inspector.clone();
        let mut seat = inspector.enter(self.id);
        while !self.exit.is_stopping() {
            seat.answer_if_asked(|| VcpuRegisters::read(&self.fd));
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff); // nothing there: an open bus reads all-ones
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                }
                Ok(VcpuExit::Shutdown) => {
                    self.log_state("triple fault");
                    self.exit.request(ExitReason::TripleFault)
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    let reason = match kind {
                        kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                        _ => ExitReason::Reset,
                    };
                    self.exit.request(reason);
                }
                // With the in-kernel LAPIC, HLT is handled by KVM; seeing it
                // means the guest stopped a CPU for good.
                Ok(VcpuExit::Hlt) => self.exit.request(ExitReason::PowerOff),
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    self.exit.request(ExitReason::Error(format!(
                    "vCPU {} failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})",
                    self.id
                )))
                }
                Ok(VcpuExit::InternalError) => self.exit.request(ExitReason::Error(format!(
                    "KVM internal error on vCPU {} (emulation failure)",
                    self.id
                ))),
                Ok(other) => {
                    crate::guest_log!(
                        log::Level::Debug,
                        "vCPU {}: ignored exit {other:?}",
                        self.id
                    );
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                }
                Err(e) => self.exit.request(ExitReason::Error(format!(
                    "KVM_RUN on vCPU {} failed: {e}",
                    self.id
                ))),
            }
        }
    }
}
