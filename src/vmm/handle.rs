//! A running VM, as its owner sees it: wait for the end, ask the guest to
//! shut down, force a stop, read the NICs' counters. [`RunningVm`] owns the
//! threads and joins them; [`VmController`] is a cheap clone that other
//! threads keep to stop the VM or read counters.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::VmFd;

use super::exit::{ExitReason, ExitSignal};
use super::inspect::{VcpuInspector, VcpuReport, ANSWER_TIMEOUT};
use super::{memory, rss, stop_vcpus, NicHandle};
use crate::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::serial::{SerialDevice, SerialInput};
use crate::net::capture::{CaptureControl, CaptureCounters};
use crate::net::egress::{EgressControl, EgressInfo, EgressPolicy};
use crate::net::rate_limit::{LimitControl, RateLimits, Throttled};
use crate::net::{HostNic, NicModel};
use crate::net::{NetCounters, NicStats};
use crate::vmm::memory::GuestRam;

/// One NIC's identity and counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicInfo {
    /// The host TAP's name (`netN` for a NIC added with a custom backend).
    pub name: String,
    pub model: NicModel,
    /// The guest's MAC.
    pub mac: crate::net::MacAddr,
    /// Who moves its frames now.
    pub data_path: DataPath,
    /// Frames, bytes and drops per direction on rvm's userspace data path.
    /// While vhost-net carries a NIC's frames the host kernel counts them
    /// instead: read the TAP's own counters (`ip -s link show NAME`).
    pub counters: NetCounters,
    /// The same per queue pair (RX queue k and TX queue k), in order.
    pub queues: Vec<NetCounters>,
    /// Whether the guest sees a link (see [`VmController::set_nic_link`]).
    pub link_up: bool,
    /// Its rate limits now (none: unlimited).
    pub limits: RateLimits,
    /// How often each direction began to be held back by them.
    pub throttled: Throttled,
    /// The packet capture running now, or the last one.
    pub capture: CaptureCounters,
    /// Its egress policy and what each rule has matched; None: none.
    pub egress: Option<EgressInfo>,
}

/// Who moves a NIC's frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    /// rvm's own threads (the NIC loop).
    Userspace,
    /// The host kernel's vhost-net (the guest's driver is up and every
    /// stage on the NIC lets it).
    VhostNet,
}

impl std::fmt::Display for DataPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DataPath::Userspace => "userspace",
            DataPath::VhostNet => "vhost-net",
        })
    }
}

/// What the controller keeps of a NIC.
#[derive(Clone)]
struct NicControl {
    name: String,
    model: NicModel,
    mac: [u8; 6],
    stages: crate::net::stage::Stages,
    stats: Arc<NicStats>,
    limits: Arc<LimitControl>,
    capture: Arc<CaptureControl>,
    egress: Arc<EgressControl>,
    device: super::NicDevice,
}

/// What a thread other than the owner may do with a running VM. Clone it
/// freely; it stays valid (and harmless) after the VM has ended.
#[derive(Clone)]
pub struct VmController {
    exit: Arc<ExitSignal>,
    inspector: Arc<VcpuInspector>,
    i8042: Arc<Mutex<I8042>>,
    nics: Vec<NicControl>,
}

impl VmController {
    /// Stops the VM now, whatever the guest is doing: the owner's
    /// [`RunningVm::wait`] returns [`ExitReason::Stopped`].
    pub fn stop(&self) {
        self.exit.request(ExitReason::Stopped);
    }

    /// Asks the guest to shut down by typing Ctrl-Alt-Del on its keyboard
    /// controller, and returns at once. A Linux guest with the AT keyboard
    /// driver and a VT (any distribution kernel) reboots cleanly, which
    /// ends the VM with [`ExitReason::Reset`]; a guest without them ignores
    /// it, so pair this with a timeout ([`RunningVm::shutdown`] does).
    pub fn request_shutdown(&self) {
        if !self.exit.is_stopping() {
            crate::lock_or_recover(&self.i8042).ctrl_alt_del();
        }
    }

    /// Whether the VM has ended or is ending.
    pub fn has_ended(&self) -> bool {
        self.exit.is_stopping()
    }

    /// Where every vCPU is now: its registers, whether it is halted and
    /// whether it takes interrupts. Each vCPU is briefly taken out of the
    /// guest to read them; one that does not answer within a second (its
    /// thread busy in a device) or has ended says so instead. For a guest
    /// that seems stuck: run it twice, and an unchanged RIP means it is.
    pub fn vcpu_states(&self) -> Vec<VcpuReport> {
        self.inspector.request(ANSWER_TIMEOUT)
    }

    /// How many NICs the VM has.
    pub fn nic_count(&self) -> usize {
        self.nics.len()
    }

    /// Every NIC's counters, in the order of the configuration.
    pub fn nic_counters(&self) -> Vec<NicInfo> {
        self.nics
            .iter()
            .map(|n| NicInfo {
                name: n.name.clone(),
                model: n.model,
                mac: crate::net::MacAddr(n.mac),
                data_path: if n.stages.in_kernel() {
                    DataPath::VhostNet
                } else {
                    DataPath::Userspace
                },
                counters: n.stats.snapshot(),
                queues: n.stats.per_pair(),
                link_up: n.device.link_up(),
                limits: n.limits.limits(),
                throttled: n.limits.throttled(),
                capture: n.capture.counters(),
                egress: n.egress.info(),
            })
            .collect()
    }

    /// Plugs NIC `index`'s cable in (`up`) or pulls it out, while the VM
    /// runs: the guest sees its carrier change (virtio-net's STATUS with a
    /// config-change interrupt; the e1000's STATUS.LU with LSC), and while
    /// it is down no frame moves either way: the TAP keeps what the host
    /// sends, what the guest sends is dropped and counted in
    /// `tx_dropped` (vhost-net is paused). The e1000 also needs its TAP up.
    pub fn set_nic_link(&self, index: usize, up: bool) -> crate::Result<()> {
        let nic = self.nics.get(index).ok_or(crate::Error::NoSuchNic(index))?;
        nic.device.set_link(up);
        Ok(())
    }

    /// Starts capturing NIC `index`'s frames, both ways, to the pcap file
    /// `path` (created or truncated), cut at `snap_len` bytes (65535 as
    /// QEMU's default): as the guest sees them on rvm's data path, from
    /// the TAP's side while vhost-net moves them. A capture already
    /// running on the NIC ends first. A file that fails later never holds
    /// the guest back: the capture ends with one error line, and
    /// `NicInfo::capture` counts the frames lost.
    pub fn start_nic_capture(
        &self,
        index: usize,
        path: &std::path::Path,
        snap_len: u32,
    ) -> crate::Result<()> {
        let nic = self.nics.get(index).ok_or(crate::Error::NoSuchNic(index))?;
        nic.capture
            .start(path, snap_len)
            .map_err(|source| crate::Error::Capture {
                nic: nic.name.clone(),
                source,
            })
    }

    /// Stops NIC `index`'s capture, if one runs; the file is complete when
    /// this returns.
    pub fn stop_nic_capture(&self, index: usize) -> crate::Result<()> {
        let nic = self.nics.get(index).ok_or(crate::Error::NoSuchNic(index))?;
        nic.capture.stop();
        Ok(())
    }

    /// Sets, replaces or (None) lifts NIC `index`'s egress policy while the
    /// VM runs, in the host kernel (nftables) in one transaction: new
    /// connections meet the new rules at once, flows already allowed go
    /// on, and the rule counts start again. Needs what `egress=` needs at
    /// start: a TAP and CAP_NET_ADMIN over it.
    pub fn set_nic_egress(&self, index: usize, policy: Option<EgressPolicy>) -> crate::Result<()> {
        let nic = self.nics.get(index).ok_or(crate::Error::NoSuchNic(index))?;
        nic.egress
            .set(policy)
            .map_err(|source| crate::Error::Egress {
                nic: nic.name.clone(),
                source,
            })
    }

    /// Sets NIC `index`'s rate limits (configuration order) while the VM
    /// runs: they apply to the next frame, and a frame held under the old
    /// ones is looked at again within 50 ms. No limits lifts them. Refused
    /// while vhost-net moves the NIC's frames (start it with vhost=auto
    /// and a limit, or vhost=off, to change limits later).
    pub fn set_nic_rate_limits(&self, index: usize, limits: RateLimits) -> crate::Result<()> {
        let nic = self.nics.get(index).ok_or(crate::Error::NoSuchNic(index))?;
        nic.limits
            .set(limits)
            .map_err(|source| crate::Error::Stage {
                nic: nic.name.clone(),
                source,
            })
    }
}

/// A VM whose vCPUs are running. Dropping it stops the VM (forced) and
/// cleans up as [`RunningVm::wait`] does, so an owner that forgets to wait
/// leaves no thread, TAP or bridge port behind.
pub struct RunningVm {
    threads: Vec<JoinHandle<()>>,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<SerialDevice>>,
    control: VmController,
    memory: GuestRam,
    nics: Vec<NicHandle>,
    /// Held only to be dropped after the NIC threads stopped: that undoes
    /// each NIC's host setup (downscript, bridge port, TAP).
    _host_nics: Vec<HostNic>,
    _buses: [Arc<Bus>; 2],
    _fd: Arc<VmFd>,
}

impl RunningVm {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        threads: Vec<JoinHandle<()>>,
        exit: Arc<ExitSignal>,
        inspector: Arc<VcpuInspector>,
        serial: Arc<Mutex<SerialDevice>>,
        i8042: Arc<Mutex<I8042>>,
        memory: GuestRam,
        nics: Vec<NicHandle>,
        host_nics: Vec<HostNic>,
        buses: [Arc<Bus>; 2],
        fd: Arc<VmFd>,
    ) -> RunningVm {
        let control = VmController {
            exit: exit.clone(),
            inspector,
            i8042,
            nics: nics
                .iter()
                .map(|n| NicControl {
                    name: n.name.clone(),
                    model: n.model,
                    mac: n.mac,
                    stages: n.stages.clone(),
                    stats: n.stats.clone(),
                    limits: n.limits.clone(),
                    capture: n.capture.clone(),
                    egress: n.egress.clone(),
                    device: n.device.clone(),
                })
                .collect(),
        };
        RunningVm {
            threads,
            exit,
            serial,
            control,
            memory,
            nics,
            _host_nics: host_nics,
            _buses: buses,
            _fd: fd,
        }
    }

    /// Blocks until the VM ends, stops every vCPU and NIC thread and
    /// returns why it ended. Calling it again returns the same reason.
    /// Guest memory stays mapped and the TAPs stay until the `RunningVm` is
    /// dropped, so both can still be inspected.
    pub fn wait(&mut self) -> ExitReason {
        let reason = self.exit.wait();
        self.finish();
        reason
    }

    /// Like [`RunningVm::wait`], but returns None if the VM still runs
    /// after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitReason> {
        let reason = self.exit.wait_timeout(Some(timeout))?;
        self.finish();
        Some(reason)
    }

    /// Asks the guest to shut down ([`VmController::request_shutdown`]),
    /// waits up to `grace` for it to do so, then stops it by force. Returns
    /// how it ended: the guest's own [`ExitReason::Reset`] or
    /// [`ExitReason::PowerOff`] when it complied, [`ExitReason::Stopped`]
    /// when it had to be forced.
    pub fn shutdown(&mut self, grace: Duration) -> ExitReason {
        self.control.request_shutdown();
        if let Some(reason) = self.wait_timeout(grace) {
            return reason;
        }
        self.control.stop();
        self.wait()
    }

    /// Stops the VM now; [`RunningVm::wait`] then returns [`ExitReason::Stopped`].
    pub fn stop(&self) {
        self.control.stop();
    }

    /// A handle for other threads: stop, shutdown request, counters.
    pub fn controller(&self) -> VmController {
        self.control.clone()
    }

    /// Every NIC's counters, in the order of the configuration.
    pub fn nic_counters(&self) -> Vec<NicInfo> {
        self.control.nic_counters()
    }

    /// NIC `index`'s stages (configuration order), to add or remove while
    /// the VM runs. A stage that needs the frames in rvm is refused while
    /// vhost-net moves them.
    pub fn nic_stages(&self, index: usize) -> Option<crate::net::stage::Stages> {
        self.nics.get(index).map(|n| n.stages.clone())
    }

    /// Where every vCPU is now ([`VmController::vcpu_states`]).
    pub fn vcpu_states(&self) -> Vec<VcpuReport> {
        self.control.vcpu_states()
    }

    /// The exit signal, for owners that stop the VM from a signal handler
    /// (writing its eventfd is async-signal-safe; see `src/main.rs`).
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// A handle that feeds input to the guest's serial console.
    pub fn serial_input(&self) -> SerialInput {
        SerialInput(self.serial.clone())
    }

    /// rvm's peak RSS and the part of it that is touched guest RAM, in KiB.
    pub fn memory_usage_kib(&self) -> (u64, u64) {
        let guest = rss::resident_kib_of(&memory::host_ranges(&self.memory));
        (rss::peak_rss_kib().unwrap_or(0), guest)
    }

    /// Stops the vCPUs, then the NICs' threads (before their backends are
    /// torn down, which happens when `self` is dropped).
    fn finish(&mut self) {
        stop_vcpus(std::mem::take(&mut self.threads));
        for nic in &self.nics {
            nic.device.shutdown();
            // The file complete and closed when the VM ends.
            nic.capture.stop();
        }
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.control.stop();
        self.finish();
    }
}
