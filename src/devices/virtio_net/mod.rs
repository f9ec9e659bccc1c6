//! The virtio-net device model: feature set, configuration space, and the
//! worker thread that moves frames between the virtqueues and a backend.
//!
//! Where a frame goes:
//! - guest to host: [`tx`] pops a TX chain, writes header and frame to the
//!   backend with one writev straight from guest memory;
//! - host to guest: [`rx`] reads a frame with one readv straight into the
//!   guest's RX buffers (several chains when buffers are merged);
//! - [`worker`] runs both from an event loop (event-manager) woken by the
//!   TAP and by the guest's kicks (ioeventfds);
//! - or, with vhost-net, the host kernel runs RX and TX
//!   ([`crate::net::vhost`]) and the worker keeps only the control queue.

pub mod ctrl;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod rx;
#[cfg(test)]
mod tests;
pub mod tx;
pub mod worker;

use std::fs::File;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use crate::net::backend::{offload, NetBackend};
use crate::net::stage::Stages;
use crate::net::vhost::{VhostNet, VringSetup};
use crate::net::NetStats;
use crate::virtio::features::{RING_EVENT_IDX, RING_INDIRECT_DESC, VERSION_1};
use crate::virtio::{ActivateError, Activation, VirtioDevice};

pub const DEVICE_TYPE: u16 = 1;
/// RX, TX, control.
pub const QUEUE_SIZES: [u16; 3] = [256, 256, 64];
/// struct virtio_net_hdr_v1: the guest's header is the TAP's.
pub const HDR_LEN: usize = crate::net::backend::VNET_HDR_LEN;

/// Feature bits (virtio 1.x, 5.1.3).
pub mod features {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
}
use features::*;

const LINK_UP: u16 = 1;

/// How one virtio-net NIC is set up.
pub struct NetParams {
    pub mac: [u8; 6],
    pub mtu: u16,
    /// Thread name, for `top -H` and logs.
    pub name: String,
}

pub struct VirtioNet {
    params: NetParams,
    backend: Arc<dyn NetBackend>,
    stats: Arc<NetStats>,
    avail_features: u64,
    running: Option<(EventFd, JoinHandle<()>)>,
    /// The kernel data path, when the NIC may use one.
    vhost: Option<VhostNet>,
    /// Bus Master Enable, shared with the worker: no guest memory is
    /// touched while it is off.
    bus_master: Arc<AtomicBool>,
    /// What every frame passes (the worker's path; vhost-net only when no
    /// stage needs the frames in rvm).
    stages: Stages,
}

/// The feature bits vhost-net interprets itself: the guest may only have
/// those of them the kernel implements.
const VHOST_OWNED: u64 = VERSION_1 | RING_EVENT_IDX | RING_INDIRECT_DESC | MRG_RXBUF;

/// What the device offers when vhost-net (implementing `vhost`) may run
/// its queues: a driver must get what either data path can honour, since
/// a session falls back to userspace when vhost cannot take it.
pub(crate) fn restrict_to_vhost(offered: u64, vhost: u64) -> u64 {
    offered & (!VHOST_OWNED | vhost)
}

impl VirtioNet {
    /// A NIC on `backend`; with `vhost`, the kernel moves its frames
    /// whenever the driver's setup allows it.
    pub fn new(params: NetParams, backend: Arc<dyn NetBackend>, vhost: Option<VhostNet>) -> Self {
        let mut f = VERSION_1
            | RING_EVENT_IDX
            | RING_INDIRECT_DESC
            | MAC
            | STATUS
            | MTU
            | MRG_RXBUF
            | CTRL_VQ;
        // Offloads need the header to cross the TAP; without IFF_VNET_HDR
        // the guest must finish every frame itself.
        if backend.vnet_hdr() {
            f |= CSUM | GUEST_CSUM | HOST_TSO4 | HOST_TSO6 | HOST_ECN;
            f |= GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN;
        }
        let vhost = vhost.filter(|v| v.features() & VERSION_1 != 0);
        if let Some(v) = &vhost {
            f = restrict_to_vhost(f, v.features());
        }
        VirtioNet {
            params,
            backend,
            stats: Arc::new(NetStats::default()),
            avail_features: f,
            running: None,
            vhost,
            bus_master: Arc::new(AtomicBool::new(false)),
            stages: Stages::new(),
        }
    }

    /// The NIC's stages: a handle to add or remove them while it runs.
    pub fn stages(&self) -> Stages {
        self.stages.clone()
    }

    /// Hands RX and TX to vhost-net. Needs an irqfd per queue (MSI-X on,
    /// a vector each); Err says why not, and nothing stays with the kernel.
    fn start_vhost(&mut self, a: &Activation) -> Result<(), String> {
        let Some(vhost) = self.vhost.as_mut() else {
            return Err("no vhost-net".into());
        };
        let data = &a.queues[..2];
        let calls = data
            .iter()
            .map(|q| {
                a.interrupt
                    .queue_irqfd(q.vector)
                    .ok_or("the driver did not give each queue an MSI-X vector")
            })
            .collect::<Result<Vec<_>, _>>()?;
        let rings: Vec<VringSetup> = data
            .iter()
            .zip(&calls)
            .map(|(q, call)| VringSetup {
                size: q.queue.size(),
                desc: q.queue.desc_table(),
                avail: q.queue.avail_ring(),
                used: q.queue.used_ring(),
                next_avail: q.queue.next_avail(),
                kick: &q.kick,
                call,
            })
            .collect();
        let tap = Self::tap_file(&self.backend)?;
        // Last: from here on a stage that needs the frames is refused.
        self.stages.enter_kernel()?;
        vhost
            .start(a.features, self.backend.vnet_hdr(), &rings, &tap)
            .map_err(|e| {
                self.stages.leave_kernel();
                e.to_string()
            })
    }

    /// The TAP as a file of its own, for the kernel's data path.
    fn tap_file(backend: &Arc<dyn NetBackend>) -> Result<File, String> {
        backend
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)
            .map_err(|e| format!("cannot share the TAP: {e}"))
    }

    fn shared_tap(&self) -> Result<File, String> {
        Self::tap_file(&self.backend)
    }

    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    /// TUNSETOFFLOAD flags for what the guest said it can take unfinished.
    fn tap_offloads(acked: u64) -> u32 {
        let mut flags = 0;
        if acked & GUEST_CSUM != 0 {
            flags |= offload::CSUM;
            if acked & GUEST_TSO4 != 0 {
                flags |= offload::TSO4;
            }
            if acked & GUEST_TSO6 != 0 {
                flags |= offload::TSO6;
            }
            if acked & GUEST_ECN != 0 {
                flags |= offload::TSO_ECN;
            }
        }
        flags
    }

    fn stop_worker(&mut self) {
        if let Some(v) = self.vhost.as_mut() {
            v.stop();
        }
        self.stages.leave_kernel();
        if let Some((stop, thread)) = self.running.take() {
            let _ = stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu.
        let mut cfg = [0u8; 12];
        cfg[0..6].copy_from_slice(&self.params.mac);
        cfg[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
        cfg[10..12].copy_from_slice(&self.params.mtu.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // The MAC is read-only for VERSION_1 drivers.
        crate::guest_log!(
            log::Level::Debug,
            "virtio-net: ignored config write at {offset:#x}"
        );
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        let (w, stop) = self.prepare_worker(a)?;
        let thread = std::thread::Builder::new()
            .name(self.params.name.clone())
            .spawn(move || w.run())
            .map_err(|e| ActivateError::Start(format!("worker thread: {e}")))?;
        self.running = Some((stop, thread));
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn set_bus_master(&mut self, on: bool) {
        self.bus_master.store(on, Ordering::SeqCst);
        // The kernel's data path holds still too, and carries on after.
        let tap = self.shared_tap();
        if let Some(v) = self.vhost.as_mut().filter(|v| v.running()) {
            if !on {
                v.pause();
            } else if let Err(e) = tap.and_then(|t| v.resume(&t).map_err(|e| e.to_string())) {
                crate::guest_log!(
                    log::Level::Warn,
                    "{}: vhost-net did not resume after bus mastering came back: {e}",
                    self.params.name
                );
            }
        }
    }
}

impl VirtioNet {
    /// Everything activation does short of starting the thread: the
    /// worker, and the eventfd that stops it. Kept apart so that a fuzzer
    /// can run the worker's passes on its own thread, deterministically.
    fn prepare_worker(
        &mut self,
        a: Activation,
    ) -> Result<(worker::Worker, EventFd), ActivateError> {
        self.stop_worker();
        // Exactly RX, TX and (with CTRL_VQ) the control queue, each at its
        // own number: a driver that left one out gets NEEDS_RESET rather
        // than another ring in its place.
        let want: u16 = if a.features & CTRL_VQ != 0 { 3 } else { 2 };
        if !a.queues.iter().map(|q| q.index).eq(0..want) {
            return Err(ActivateError::QueueSet {
                got: a.queues.iter().map(|q| q.index).collect(),
                want,
            });
        }
        if self.backend.vnet_hdr() {
            self.backend
                .configure_offloads(HDR_LEN, Self::tap_offloads(a.features))
                .map_err(|e| ActivateError::Start(format!("TAP offloads: {e}")))?;
        }
        // With bus mastering off at DRIVER_OK (no Linux does that) the
        // session stays in userspace, held until it comes on.
        let in_kernel = self.vhost.is_some()
            && self.bus_master.load(Ordering::SeqCst)
            && match self.start_vhost(&a) {
                Ok(()) => {
                    crate::guest_log!(
                        log::Level::Info,
                        "{}: data path: vhost-net",
                        self.params.name
                    );
                    true
                }
                Err(e) => {
                    crate::guest_log!(
                        log::Level::Warn,
                        "{}: vhost-net cannot take this driver's queues ({e}); data path: userspace",
                        self.params.name
                    );
                    false
                }
            };
        let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
            .map_err(|e| ActivateError::Start(e.to_string()))?;
        let w = worker::Worker::new(
            a,
            self.backend.clone(),
            self.stats.clone(),
            self.stages.clone(),
            stop.try_clone()
                .map_err(|e| ActivateError::Start(e.to_string()))?,
            in_kernel,
            self.params.mtu,
            self.bus_master.clone(),
        )
        .map_err(|e| ActivateError::Start(format!("worker: {e}")))?;
        Ok((w, stop))
    }
}
