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
pub mod mq;
#[cfg(test)]
mod mq_tests;
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
use crate::net::config::MAX_QUEUE_PAIRS;
use crate::net::stage::Stages;
use crate::net::vhost::{VhostNet, VringSetup};
use crate::net::NicStats;
use crate::virtio::features::{RING_EVENT_IDX, RING_INDIRECT_DESC, VERSION_1};
use crate::virtio::queue::UsedRing;
use crate::virtio::{ActivateError, Activation, VirtioDevice};
use mq::MqControl;
use worker::{PairSetup, QueueCtx};

pub const DEVICE_TYPE: u16 = 1;
/// Queue sizes: each RX and TX queue, and the control queue.
pub const DATA_QUEUE_SIZE: u16 = 256;
pub const CTRL_QUEUE_SIZE: u16 = 64;
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
    pub const MQ: u64 = 1 << 22;
}
use features::*;

const LINK_UP: u16 = 1;

/// How one virtio-net NIC is set up.
pub struct NetParams {
    pub mac: [u8; 6],
    pub mtu: u16,
    /// Thread name, for `top -H` and logs (pair k's is `NAME.qk`).
    pub name: String,
}

pub struct VirtioNet {
    params: NetParams,
    /// One per queue pair: the queues of a multi-queue TAP.
    backends: Vec<Arc<dyn NetBackend>>,
    stats: Arc<NicStats>,
    avail_features: u64,
    /// RX and TX for each pair, then the control queue.
    queue_sizes: Vec<u16>,
    /// Each working pair's thread and the eventfd that stops it.
    running: Vec<(EventFd, JoinHandle<()>)>,
    /// The kernel data path, one per pair, when the NIC may use one.
    vhost: Vec<VhostNet>,
    /// Bus Master Enable, shared with the workers: no guest memory is
    /// touched while it is off.
    bus_master: Arc<AtomicBool>,
    /// What every frame passes (the workers' path; vhost-net only when no
    /// stage needs the frames in rvm).
    stages: Stages,
    /// The link (carrier) the owner set: while down no frame moves either
    /// way, shared with the workers.
    link_up: Arc<AtomicBool>,
    /// What a link change must reach while the driver runs: its config
    /// interrupt, and each pair's RX kick (to wake the worker).
    session: Option<LinkSession>,
}

struct LinkSession {
    interrupt: Arc<dyn crate::virtio::Interrupt>,
    wake: Vec<EventFd>,
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
        Self::with_pairs(params, vec![backend], vhost.into_iter().collect())
    }

    /// A NIC with one RX/TX pair per backend (the queues of one
    /// multi-queue TAP; at most 16 are used) and VIRTIO_NET_F_MQ when
    /// there are several; with `vhost` (one per pair), the kernel moves
    /// the frames whenever the driver's setup allows it.
    ///
    /// # Panics
    /// With no backend at all: a NIC needs one (`Vm::add_virtio_net_pairs`
    /// refuses that with an error before it gets here).
    pub fn with_pairs(
        params: NetParams,
        backends: Vec<Arc<dyn NetBackend>>,
        vhost: Vec<VhostNet>,
    ) -> Self {
        assert!(!backends.is_empty(), "a virtio-net NIC needs a backend");
        let pairs = backends.len().min(usize::from(MAX_QUEUE_PAIRS));
        let backends: Vec<_> = backends.into_iter().take(pairs).collect();
        let mut f = VERSION_1
            | RING_EVENT_IDX
            | RING_INDIRECT_DESC
            | MAC
            | STATUS
            | MTU
            | MRG_RXBUF
            | CTRL_VQ;
        if pairs > 1 {
            f |= MQ;
        }
        // Offloads need the header to cross the TAP; without IFF_VNET_HDR
        // the guest must finish every frame itself.
        if backends[0].vnet_hdr() {
            f |= CSUM | GUEST_CSUM | HOST_TSO4 | HOST_TSO6 | HOST_ECN;
            f |= GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN;
        }
        // The kernel path for every pair or for none.
        let vhost: Vec<VhostNet> =
            if vhost.len() == pairs && vhost.iter().all(|v| v.features() & VERSION_1 != 0) {
                vhost
            } else {
                Vec::new()
            };
        if let Some(v) = vhost.first() {
            f = restrict_to_vhost(f, v.features());
        }
        let mut queue_sizes = vec![DATA_QUEUE_SIZE; 2 * pairs];
        queue_sizes.push(CTRL_QUEUE_SIZE);
        VirtioNet {
            params,
            backends,
            stats: Arc::new(NicStats::new(pairs)),
            avail_features: f,
            queue_sizes,
            running: Vec::new(),
            vhost,
            bus_master: Arc::new(AtomicBool::new(false)),
            stages: Stages::new(),
            link_up: Arc::new(AtomicBool::new(true)),
            session: None,
        }
    }

    /// Sets the link up or down (a cable plugged in or pulled out): the
    /// driver gets the new STATUS and a config-change interrupt; while
    /// down, the workers read nothing from the TAP and drop (and count)
    /// what the guest sends, and vhost-net is paused, so no frame moves.
    pub fn set_link(&mut self, up: bool) {
        if self.link_up.swap(up, Ordering::SeqCst) == up {
            return;
        }
        let Some(s) = &self.session else { return };
        for (v, backend) in self.vhost.iter_mut().zip(&self.backends) {
            if !v.running() {
                continue;
            }
            if !up {
                v.pause();
            } else if self.bus_master.load(Ordering::SeqCst) {
                if let Err(e) =
                    Self::tap_file(backend).and_then(|t| v.resume(&t).map_err(|e| e.to_string()))
                {
                    crate::guest_log!(
                        log::Level::Warn,
                        "{}: vhost-net did not resume when the link came up: {e}",
                        self.params.name
                    );
                }
            }
        }
        for w in &s.wake {
            let _ = w.write(1);
        }
        s.interrupt.config();
    }

    pub fn link_up(&self) -> bool {
        self.link_up.load(Ordering::SeqCst)
    }

    /// RX/TX queue pairs.
    pub fn pairs(&self) -> usize {
        self.backends.len()
    }

    /// The NIC's stages: a handle to add or remove them while it runs.
    pub fn stages(&self) -> Stages {
        self.stages.clone()
    }

    /// Hands RX and TX of the first `pairs` pairs to vhost-net, one
    /// device per pair. Needs an irqfd per queue (MSI-X on, a vector
    /// each); Err says why not, and nothing stays with the kernel.
    fn start_vhost(&mut self, a: &Activation, pairs: usize) -> Result<(), String> {
        if self.vhost.len() < pairs {
            return Err("no vhost-net".into());
        }
        let calls = a.queues[..2 * pairs]
            .iter()
            .map(|q| {
                a.interrupt
                    .queue_irqfd(q.vector)
                    .ok_or("the driver did not give each queue an MSI-X vector")
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Last: from here on a stage that needs the frames is refused.
        self.stages.enter_kernel()?;
        let vnet_hdr = self.backends[0].vnet_hdr();
        for k in 0..pairs {
            let rings: Vec<VringSetup> = a.queues[2 * k..2 * k + 2]
                .iter()
                .zip(&calls[2 * k..2 * k + 2])
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
            let started = Self::tap_file(&self.backends[k]).and_then(|tap| {
                self.vhost[k]
                    .start(a.features, vnet_hdr, &rings, &tap)
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = started {
                for v in &mut self.vhost[..k] {
                    v.stop();
                }
                self.stages.leave_kernel();
                return Err(if pairs > 1 {
                    format!("pair {k}: {e}")
                } else {
                    e
                });
            }
        }
        Ok(())
    }

    /// A TAP queue as a file of its own, for the kernel's data path.
    fn tap_file(backend: &Arc<dyn NetBackend>) -> Result<File, String> {
        backend
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)
            .map_err(|e| format!("cannot share the TAP: {e}"))
    }

    pub fn stats(&self) -> Arc<NicStats> {
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

    fn stop_workers(&mut self) {
        self.session = None;
        for v in &mut self.vhost {
            v.stop();
        }
        self.stages.leave_kernel();
        for (stop, _) in &self.running {
            let _ = stop.write(1);
        }
        for (_, thread) in self.running.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac, status, max_virtqueue_pairs, mtu.
        let mut cfg = [0u8; 12];
        cfg[0..6].copy_from_slice(&self.params.mac);
        let status = if self.link_up() { LINK_UP } else { 0 };
        cfg[6..8].copy_from_slice(&status.to_le_bytes());
        cfg[8..10].copy_from_slice(&(self.pairs() as u16).to_le_bytes());
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
        let workers = self.prepare_workers(a)?;
        for (k, (w, stop)) in workers.into_iter().enumerate() {
            let name = if k == 0 {
                self.params.name.clone()
            } else {
                format!("{}.q{k}", self.params.name)
            };
            match std::thread::Builder::new()
                .name(name)
                .spawn(move || w.run())
            {
                Ok(thread) => self.running.push((stop, thread)),
                Err(e) => {
                    self.stop_workers();
                    return Err(ActivateError::Start(format!("worker thread: {e}")));
                }
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn set_bus_master(&mut self, on: bool) {
        self.bus_master.store(on, Ordering::SeqCst);
        // The kernel's data path holds still too, and carries on after
        // (unless the link is down: then it waits for the link).
        for (v, backend) in self.vhost.iter_mut().zip(&self.backends) {
            if !v.running() || (on && !self.link_up.load(Ordering::SeqCst)) {
                continue;
            }
            if !on {
                v.pause();
            } else if let Err(e) =
                Self::tap_file(backend).and_then(|t| v.resume(&t).map_err(|e| e.to_string()))
            {
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
    /// Everything activation does short of starting the threads: a
    /// worker per pair the driver set up, each with the eventfd that
    /// stops it. Kept apart so that a fuzzer can run a worker's passes on
    /// its own thread, deterministically.
    fn prepare_workers(
        &mut self,
        a: Activation,
    ) -> Result<Vec<(worker::Worker, EventFd)>, ActivateError> {
        self.stop_workers();
        // With MQ every pair's RX and TX, then control; without, one
        // pair, and control if CTRL_VQ. Each queue at its own number: a
        // driver that left one out gets NEEDS_RESET rather than another
        // ring in its place.
        let mq = a.features & MQ != 0;
        if mq && a.features & CTRL_VQ == 0 {
            return Err(ActivateError::Start(
                "the driver accepted MQ without CTRL_VQ".into(),
            ));
        }
        let pairs = if mq { self.pairs() } else { 1 };
        let want = 2 * pairs as u16 + u16::from(a.features & CTRL_VQ != 0);
        if !a.queues.iter().map(|q| q.index).eq(0..want) {
            return Err(ActivateError::QueueSet {
                got: a.queues.iter().map(|q| q.index).collect(),
                want,
            });
        }
        let offloads = Self::tap_offloads(a.features);
        for b in self.backends.iter().filter(|b| b.vnet_hdr()) {
            b.configure_offloads(HDR_LEN, offloads)
                .map_err(|e| ActivateError::Start(format!("TAP offloads: {e}")))?;
        }
        // Pairs without a worker (a driver without MQ) get no frames.
        for b in &self.backends[pairs..] {
            if let Err(e) = b.set_queue_enabled(false) {
                crate::guest_log!(
                    log::Level::Warn,
                    "{}: cannot detach an unused TAP queue: {e}",
                    self.params.name
                );
            }
        }
        // With bus mastering off at DRIVER_OK (no Linux does that) the
        // session stays in userspace, held until it comes on.
        let in_kernel = !self.vhost.is_empty()
            && self.bus_master.load(Ordering::SeqCst)
            && match self.start_vhost(&a, pairs) {
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
        if in_kernel && !self.link_up() {
            // Activated with the link down: the kernel waits for it.
            for v in &mut self.vhost[..pairs] {
                v.pause();
            }
        }
        let start = |e: std::io::Error| ActivateError::Start(e.to_string());
        let control = if mq {
            Some(Arc::new(MqControl::new(pairs as u16).map_err(start)?))
        } else {
            None
        };
        let mut queues = a.queues.into_iter().map(|q| QueueCtx {
            used: UsedRing::new(&q.queue),
            queue: q.queue,
            kick: q.kick,
            vector: q.vector,
        });
        let mut data: Vec<(QueueCtx, QueueCtx)> = Vec::with_capacity(pairs);
        for _ in 0..pairs {
            // The count was checked above.
            match (queues.next(), queues.next()) {
                (Some(rx), Some(tx)) => data.push((rx, tx)),
                _ => return Err(ActivateError::Start("a queue pair is missing".into())),
            }
        }
        let mut ctrl = queues.next();
        let wake = data
            .iter()
            .map(|(rx, _)| rx.kick.try_clone())
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(start)?;
        self.session = Some(LinkSession {
            interrupt: a.interrupt.clone(),
            wake,
        });
        let mut workers = Vec::with_capacity(pairs);
        for (k, (rx, tx)) in data.into_iter().enumerate() {
            let stop = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(start)?;
            let w = worker::Worker::new(PairSetup {
                mem: a.mem.clone(),
                features: a.features,
                interrupt: a.interrupt.clone(),
                rx,
                tx,
                ctrl: ctrl.take(),
                backend: self.backends[k].clone(),
                stats: self.stats.pair(k),
                stages: self.stages.clone(),
                stop: stop.try_clone().map_err(start)?,
                data_in_kernel: in_kernel,
                mtu: self.params.mtu,
                bus_master: self.bus_master.clone(),
                link_up: self.link_up.clone(),
                mq: control.clone().map(|c| (k, c)),
            });
            workers.push((w, stop));
        }
        Ok(workers)
    }
}
