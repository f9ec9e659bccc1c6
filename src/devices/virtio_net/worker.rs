//! virtio-net's data path as an engine of the shared NIC loop
//! (net::nic_loop): which event runs which queue's pass, and what the
//! device waits for between passes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::features::{GUEST_TSO4, GUEST_TSO6, MRG_RXBUF};
use super::mq::MqControl;
use crate::net::backend::NetBackend;
use crate::net::nic_loop::{self, NicEngine, Sources, Token, Wants};
use crate::net::stage::{HoldAt, Stages};
use crate::net::NetStats;
use crate::virtio::chain::{Segment, MAX_IOV};
use crate::virtio::iov_queue::IovQueue;
use crate::virtio::queue::UsedRing;
use crate::virtio::Interrupt;
use crate::vmm::memory::GuestRam;

/// A pair's queues, as its worker numbers them (also their kicks'
/// tokens; the transport's numbers are 2k, 2k + 1 and the last).
pub(super) const RX: usize = 0;
pub(super) const TX: usize = 1;
pub(super) const CTRL: usize = 2;
/// Not a queue: the pairs the driver uses changed (VQ_PAIRS_SET).
const PAIRS: usize = 3;

/// An RX frame a stage held: read into the pool's first chains, not yet
/// handed to the driver, and nothing more is read until it is.
#[derive(Clone, Copy)]
pub(super) struct HeldRx {
    /// Bytes read, the header included.
    pub n: usize,
    pub until: Instant,
    /// The stage that held it, asked again first.
    pub stage: usize,
}

pub(super) struct QueueCtx {
    pub queue: Queue,
    /// Chains returned and not yet published.
    pub used: UsedRing,
    pub kick: EventFd,
    pub vector: u16,
}

/// RX buffers popped from the queue and not yet filled, in ring order.
#[derive(Default)]
pub(super) struct RxPool {
    /// (head index, total length, number of segments) per chain.
    pub chains: VecDeque<(u16, u32, usize)>,
    pub segs: VecDeque<Segment>,
    /// The same buffers as iovecs for the backend's readv (and their
    /// total length).
    pub iov: IovQueue,
    /// One more chain would pass MAX_IOV segments.
    pub iov_full: bool,
}

pub struct Worker {
    pub(super) mem: GuestRam,
    pub(super) rx: QueueCtx,
    pub(super) tx: QueueCtx,
    pub(super) ctrl: Option<QueueCtx>,
    pub(super) interrupt: Arc<dyn Interrupt>,
    pub(super) backend: Arc<dyn NetBackend>,
    pub(super) stats: Arc<NetStats>,
    pub(super) stop: EventFd,
    /// vhost-net moves RX and TX: only the control queue is ours.
    pub(super) data_in_kernel: bool,
    /// RX reads nothing until the driver's next RX kick: it has too few
    /// buffers posted (or the backend keeps failing, see `rx_retry_at`).
    pub(super) rx_paused: bool,
    /// The backend kept failing reads: RX tries again at this time, or at
    /// the driver's next RX kick.
    pub(super) rx_retry_at: Option<Instant>,
    /// The backend failed for good (its TAP deleted).
    pub(super) backend_failed: bool,
    pub(super) mergeable: bool,
    /// The largest frame (with header) the backend can hand us.
    pub(super) max_frame: usize,
    pub(super) pool: RxPool,
    /// Scratch space reused for every frame: no allocation per frame.
    pub(super) segs: Vec<Segment>,
    pub(super) iov: Vec<libc::iovec>,
    /// Bus Master Enable: while off, no queue is touched (the transport
    /// kicks every queue when it comes back on).
    pub(super) bus_master: Arc<AtomicBool>,
    /// The link the owner set: while down nothing is read from the
    /// backend and what the guest sends is dropped (counted).
    pub(super) link_up: Arc<AtomicBool>,
    /// TX is parked: the backend would block, the chain is back in the
    /// ring, and the loop watches the backend for room to go on.
    pub(super) tx_parked: bool,
    pub(super) stages: Stages,
    /// TX is held by a stage until a time: the chain is back in the ring;
    /// (until, the stage that held it).
    pub(super) tx_hold: Option<HoldAt>,
    pub(super) rx_held: Option<HeldRx>,
    /// This pair's backend queue is attached: the driver uses the pair.
    pub(super) attached: bool,
    /// With VIRTIO_NET_F_MQ: this pair's number and the pairs' state.
    pub(super) mq: Option<(usize, Arc<MqControl>)>,
}

// SAFETY: the iovecs in `iov` point into guest memory that `mem` keeps
// mapped; the worker is the only user of them once moved to its thread.
unsafe impl Send for Worker {}

/// One queue pair's share of an activation: what its worker needs.
pub(super) struct PairSetup {
    pub mem: GuestRam,
    /// The features the driver accepted.
    pub features: u64,
    pub interrupt: Arc<dyn Interrupt>,
    pub rx: QueueCtx,
    pub tx: QueueCtx,
    /// The control queue, pair 0's to serve.
    pub ctrl: Option<QueueCtx>,
    pub backend: Arc<dyn NetBackend>,
    /// This pair's counters.
    pub stats: Arc<NetStats>,
    pub stages: Stages,
    pub stop: EventFd,
    /// vhost-net moves this pair's frames.
    pub data_in_kernel: bool,
    /// The MTU the device offered the driver.
    pub mtu: u16,
    pub bus_master: Arc<AtomicBool>,
    pub link_up: Arc<AtomicBool>,
    /// With VIRTIO_NET_F_MQ: this pair's number and the pairs' shared
    /// state.
    pub mq: Option<(usize, Arc<MqControl>)>,
}

impl Worker {
    pub(super) fn new(p: PairSetup) -> Self {
        let big = p.features & (GUEST_TSO4 | GUEST_TSO6) != 0;
        Worker {
            mem: p.mem,
            rx: p.rx,
            tx: p.tx,
            ctrl: p.ctrl,
            interrupt: p.interrupt,
            backend: p.backend,
            stats: p.stats,
            stop: p.stop,
            data_in_kernel: p.data_in_kernel,
            rx_paused: false,
            rx_retry_at: None,
            backend_failed: false,
            mergeable: p.features & MRG_RXBUF != 0,
            max_frame: super::HDR_LEN + max_frame(big, p.mtu),
            pool: RxPool::default(),
            segs: Vec::with_capacity(MAX_IOV),
            iov: Vec::with_capacity(MAX_IOV),
            bus_master: p.bus_master,
            link_up: p.link_up,
            tx_parked: false,
            stages: p.stages,
            tx_hold: None,
            rx_held: None,
            // A multi-queue TAP's queues start attached; `start` makes
            // them follow the pairs the driver uses.
            attached: true,
            mq: p.mq,
        }
    }

    /// Attaches or detaches this pair's backend queue to follow the pairs
    /// the driver uses (VQ_PAIRS_SET): a pair it does not use gets no
    /// frames from the host.
    fn follow_pairs(&mut self) {
        let Some((pair, mq)) = &self.mq else { return };
        let want = *pair < usize::from(mq.active());
        if let Err(e) = self.backend.set_queue_enabled(want) {
            crate::guest_log!(
                log::Level::Warn,
                "virtio-net: cannot {} the TAP queue of pair {pair}: {e}",
                if want { "attach" } else { "detach" }
            );
            return;
        }
        let was = self.attached;
        self.attached = want;
        if want && !was {
            // Frames may wait, and buffers be posted, since it went off.
            self.rx_paused = false;
            self.process_rx();
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        if self.tx_hold.is_some_and(|h| now >= h.until) {
            self.process_tx();
        }
        let retry = self.rx_retry_at.is_some_and(|t| now >= t);
        if retry {
            self.rx_retry_at = None;
            self.rx_paused = false;
        }
        if retry || self.rx_held.is_some_and(|h| now >= h.until) {
            self.process_rx();
        }
    }

    /// Whether the device may touch guest memory now. Every pass (RX, TX,
    /// control) begins by asking: while bus mastering is off the work
    /// waits (kicks are still read, and a TAP event still noted), and the
    /// transport kicks every queue when it comes back on.
    pub(super) fn may_dma(&self) -> bool {
        self.bus_master.load(Ordering::SeqCst)
    }

    pub(super) fn link_up(&self) -> bool {
        self.link_up.load(Ordering::Relaxed)
    }

    /// Runs the data path on the shared NIC loop until the device is
    /// reset or the VM stops.
    pub fn run(self) {
        let kicks: Vec<(usize, &EventFd)> = if self.data_in_kernel {
            // vhost-net reads RX's and TX's kicks in the kernel.
            Vec::new()
        } else {
            vec![(RX, &self.rx.kick), (TX, &self.tx.kick)]
        };
        let ctrl = self.ctrl.as_ref().map(|c| (CTRL, &c.kick));
        let pairs = self
            .mq
            .as_ref()
            .and_then(|(k, mq)| mq.wake(*k))
            .map(|w| (PAIRS, w));
        let sources = kicks
            .into_iter()
            .chain(ctrl)
            .chain(pairs)
            .map(|(n, k)| k.try_clone().map(|k| (n, k)))
            .collect::<std::io::Result<Vec<_>>>()
            .and_then(|kicks| {
                Ok(Sources {
                    backend: (!self.data_in_kernel).then(|| self.backend.as_raw_fd()),
                    kicks,
                    stop: self.stop.try_clone()?,
                })
            });
        match sources {
            Ok(sources) => nic_loop::run(self, sources),
            Err(e) => crate::guest_log!(log::Level::Error, "virtio-net: no event loop: {e}"),
        }
    }

    pub(super) fn signal(&mut self, which: u32) {
        let ctx = match which {
            SIGNAL_RX => &mut self.rx,
            SIGNAL_TX => &mut self.tx,
            _ => match self.ctrl.as_mut() {
                Some(c) => c,
                None => return,
            },
        };
        ctx.used.publish(&mut ctx.queue, &self.mem);
        if ctx.used.should_interrupt(&ctx.queue, &self.mem) {
            self.interrupt.queue(ctx.vector);
        }
    }
}

pub(super) const SIGNAL_RX: u32 = RX as u32;
pub(super) const SIGNAL_TX: u32 = TX as u32;
pub(super) const SIGNAL_CTRL: u32 = CTRL as u32;

impl NicEngine for Worker {
    fn start(&mut self) {
        self.follow_pairs();
        // Chains may have been posted before the driver came up.
        if !self.data_in_kernel {
            self.process_tx();
            self.process_rx();
        }
        self.process_ctrl();
    }

    fn handle(&mut self, token: Token) {
        match token {
            Token::BackendReadable => self.process_rx(),
            Token::BackendWritable => {
                // Room again: the parked chain goes first.
                self.tx_parked = false;
                self.process_tx();
            }
            Token::BackendFailed => {
                self.backend_failed = true;
                crate::guest_log!(
                    log::Level::Warn,
                    "virtio-net: its backend failed (TAP deleted, or the user-mode network gone); frames from the guest are dropped (counted)"
                );
                // Parked TX would wait for room forever: it goes on, and
                // its frames are dropped as the writes fail.
                self.tx_parked = false;
                self.process_tx();
            }
            Token::QueueKick(RX) => {
                self.rx_paused = false;
                self.rx_retry_at = None;
                self.process_rx();
            }
            Token::QueueKick(TX) => self.process_tx(),
            Token::QueueKick(CTRL) => self.process_ctrl(),
            Token::QueueKick(PAIRS) => self.follow_pairs(),
            Token::QueueKick(_) => {}
            Token::Timer => self.on_timer(),
        }
        // A stage answered a frame the guest sent (a refused connection's
        // RST): into the guest's buffers now, not at the next frame.
        if self.stages.injector().pending() {
            self.process_rx();
        }
    }

    fn wants(&self) -> Wants {
        let wake_at = [
            self.tx_hold.map(|h| h.until),
            self.rx_held.map(|h| h.until),
            self.rx_retry_at,
        ]
        .into_iter()
        .flatten()
        .min();
        Wants {
            frames: !self.data_in_kernel
                && !self.backend_failed
                && !self.rx_paused
                && self.rx_held.is_none()
                && self.may_dma()
                && self.link_up(),
            room: self.tx_parked,
            wake_at,
            detached: !self.attached,
        }
    }
}

/// The largest frame (Ethernet header and a VLAN tag included) the backend
/// may hand the guest: a GSO frame of 64 KiB of IP when the guest takes
/// them, else one MTU's worth, and never less than a standard frame.
pub(super) fn max_frame(gso: bool, mtu: u16) -> usize {
    const ETH_VLAN: usize = 14 + 4;
    let one = usize::from(mtu).max(1500) + ETH_VLAN;
    if gso {
        one.max(65_532 + ETH_VLAN)
    } else {
        one
    }
}
