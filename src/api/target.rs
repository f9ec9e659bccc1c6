//! What the control API acts on: a running VM, through its
//! [`VmController`], behind a trait so that the request handling can be
//! tested without one. These calls run on the API's executor thread, which
//! is not confined (setting an egress policy runs nft, a capture opens a
//! file); the HTTP thread only parses.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::net::egress::EgressPolicy;
use crate::net::rate_limit::RateLimits;
use crate::net::NetCounters;
use crate::vmm::{DataPath, NicInfo, VmController};

/// The VM as `GET /v1/vm` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmState {
    /// `running`, `shutting_down` (asked to, not ended yet) or `stopped`.
    pub state: &'static str,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub kernel: String,
    pub uptime_s: f64,
}

/// What the API asks of a VM. Errors are the library's own; the routes
/// turn them into status codes.
pub trait ApiTarget: Send + Sync + 'static {
    fn vm(&self) -> VmState;
    fn nic_count(&self) -> usize;
    fn nics(&self) -> Vec<NicInfo>;
    /// The TAP's own counters, as the guest sees them (what the TAP sent
    /// is what the guest received), for a NIC whose frames vhost-net
    /// moves; None where there is no TAP to read.
    fn kernel_counters(&self, nic: &NicInfo) -> Option<NetCounters>;
    fn set_link(&self, index: usize, up: bool) -> crate::Result<()>;
    fn set_limits(&self, index: usize, limits: RateLimits) -> crate::Result<()>;
    fn start_capture(&self, index: usize, path: &Path, snap_len: u32) -> crate::Result<()>;
    fn stop_capture(&self, index: usize) -> crate::Result<()>;
    fn set_egress(&self, index: usize, policy: Option<EgressPolicy>) -> crate::Result<()>;
    /// Ctrl-Alt-Del now, a forced stop after `grace`; false if the VM was
    /// already ending.
    fn shutdown(&self, grace: Duration) -> bool;
    /// A forced stop now; false if the VM was already ending.
    fn stop(&self) -> bool;
}

/// A running VM as the API's target.
pub struct VmTarget {
    ctl: VmController,
    vcpus: u32,
    mem_mib: u64,
    kernel: String,
    started: Instant,
    shutting_down: AtomicBool,
}

impl VmTarget {
    pub fn new(ctl: VmController, config: &crate::VmConfig) -> Self {
        VmTarget {
            ctl,
            vcpus: u32::from(config.vcpus),
            mem_mib: config.mem_mib,
            kernel: config.kernel.display().to_string(),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
        }
    }
}

impl ApiTarget for VmTarget {
    fn vm(&self) -> VmState {
        let state = if self.ctl.has_ended() && !self.shutting_down.load(Ordering::SeqCst) {
            "stopped"
        } else if self.shutting_down.load(Ordering::SeqCst) {
            "shutting_down"
        } else {
            "running"
        };
        VmState {
            state,
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            kernel: self.kernel.clone(),
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }

    fn nic_count(&self) -> usize {
        self.ctl.nic_count()
    }

    fn nics(&self) -> Vec<NicInfo> {
        self.ctl.nic_counters()
    }

    fn kernel_counters(&self, nic: &NicInfo) -> Option<NetCounters> {
        if nic.data_path != DataPath::VhostNet {
            return None;
        }
        let stat = |name: &str| -> Option<u64> {
            let p = format!("/sys/class/net/{}/statistics/{name}", nic.name);
            std::fs::read_to_string(p).ok()?.trim().parse().ok()
        };
        Some(NetCounters {
            rx_frames: stat("tx_packets")?,
            rx_bytes: stat("tx_bytes")?,
            rx_dropped: stat("tx_dropped")?,
            tx_frames: stat("rx_packets")?,
            tx_bytes: stat("rx_bytes")?,
            tx_dropped: stat("rx_dropped")?,
            ..NetCounters::default()
        })
    }

    fn set_link(&self, index: usize, up: bool) -> crate::Result<()> {
        self.ctl.set_nic_link(index, up)
    }

    fn set_limits(&self, index: usize, limits: RateLimits) -> crate::Result<()> {
        self.ctl.set_nic_rate_limits(index, limits)
    }

    fn start_capture(&self, index: usize, path: &Path, snap_len: u32) -> crate::Result<()> {
        self.ctl.start_nic_capture(index, path, snap_len)
    }

    fn stop_capture(&self, index: usize) -> crate::Result<()> {
        self.ctl.stop_nic_capture(index)
    }

    fn set_egress(&self, index: usize, policy: Option<EgressPolicy>) -> crate::Result<()> {
        self.ctl.set_nic_egress(index, policy)
    }

    fn shutdown(&self, grace: Duration) -> bool {
        if self.ctl.has_ended() || self.shutting_down.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.ctl.request_shutdown();
        let ctl = self.ctl.clone();
        // The grace runs out on a thread of its own, so the API answers
        // at once; a VM that ended meanwhile is left alone.
        std::thread::Builder::new()
            .name("rvm-api-grace".into())
            .spawn(move || {
                let t = Instant::now();
                while t.elapsed() < grace && !ctl.has_ended() {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if !ctl.has_ended() {
                    ctl.stop();
                }
            })
            .is_ok()
    }

    fn stop(&self) -> bool {
        if self.ctl.has_ended() {
            return false;
        }
        self.ctl.stop();
        true
    }
}
