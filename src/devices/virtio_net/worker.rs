//! The NIC's thread: one event loop (event-manager) per activated device,
//! woken by the TAP becoming readable, by the guest's queue kicks, and by
//! a timer when a stage holds a frame until a time.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::features::{CTRL_VQ, GUEST_TSO4, GUEST_TSO6, MRG_RXBUF};
use crate::net::backend::NetBackend;
use crate::net::stage::{HoldAt, Stages, MIN_HOLD};
use crate::net::NetStats;
use crate::virtio::chain::{Segment, MAX_IOV};
use crate::virtio::{queue, Activation, Interrupt};

const TAP: u32 = 0;
const RX_KICK: u32 = 1;
const TX_KICK: u32 = 2;
const CTRL_KICK: u32 = 3;
const STOP: u32 = 4;
const TIMER: u32 = 5;

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
    pub kick: EventFd,
    pub vector: u16,
}

/// RX buffers popped from the queue and not yet filled, in ring order.
#[derive(Default)]
pub(super) struct RxPool {
    /// (head index, total length, number of segments) per chain.
    pub chains: VecDeque<(u16, u32, usize)>,
    pub segs: VecDeque<Segment>,
    pub bytes: u64,
    /// One more chain would pass MAX_IOV segments.
    pub iov_full: bool,
}

pub struct Worker {
    pub(super) mem: GuestMemoryMmap,
    pub(super) rx: QueueCtx,
    pub(super) tx: QueueCtx,
    pub(super) ctrl: Option<QueueCtx>,
    pub(super) interrupt: Arc<dyn Interrupt>,
    pub(super) backend: Arc<dyn NetBackend>,
    pub(super) stats: Arc<NetStats>,
    pub(super) stop: EventFd,
    pub(super) stopped: bool,
    /// vhost-net moves RX and TX: only the control queue is ours.
    pub(super) data_in_kernel: bool,
    /// The TAP may have frames we have not read (edge-triggered epoll).
    pub(super) tap_readable: bool,
    pub(super) mergeable: bool,
    /// The largest frame (with header) the backend can hand us.
    pub(super) max_frame: usize,
    pub(super) pool: RxPool,
    /// Scratch space reused for every frame: no allocation per frame.
    pub(super) segs: Vec<Segment>,
    pub(super) iov: Vec<libc::iovec>,
    /// Bus Master Enable: while off, no queue is touched (the transport
    /// kicks every queue when it comes back on).
    pub(super) bus_master: Arc<std::sync::atomic::AtomicBool>,
    /// TX is parked: the backend would block, the chain is back in the
    /// ring, and the TAP is watched for room (EPOLLOUT) to go on.
    pub(super) tx_parked: bool,
    /// Whether the TAP's epoll registration includes EPOLLOUT now.
    tap_watch_out: bool,
    pub(super) stages: Stages,
    /// Wakes the loop when a held frame's time comes.
    timer: TimerFd,
    /// TX is held by a stage until a time: the chain is back in the ring;
    /// (until, the stage that held it).
    pub(super) tx_hold: Option<HoldAt>,
    pub(super) rx_held: Option<HeldRx>,
}

// SAFETY: the iovecs in `iov` point into guest memory that `mem` keeps
// mapped; the worker is the only user of them once moved to its thread.
unsafe impl Send for Worker {}

impl Worker {
    /// `mtu` is the MTU the device offered the driver.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        a: Activation,
        backend: Arc<dyn NetBackend>,
        stats: Arc<NetStats>,
        stages: Stages,
        stop: EventFd,
        data_in_kernel: bool,
        mtu: u16,
        bus_master: Arc<std::sync::atomic::AtomicBool>,
    ) -> std::io::Result<Self> {
        let mut queues = a.queues.into_iter().map(|q| QueueCtx {
            queue: q.queue,
            kick: q.kick,
            vector: q.vector,
        });
        // The device checked the count (2, or 3 with CTRL_VQ) before this.
        let (rx, tx) = (queues.next(), queues.next());
        let ctrl = if a.features & CTRL_VQ != 0 {
            queues.next()
        } else {
            None
        };
        let big = a.features & (GUEST_TSO4 | GUEST_TSO6) != 0;
        Ok(Worker {
            mem: a.mem,
            rx: rx.expect("virtio-net activated without an RX queue"),
            tx: tx.expect("virtio-net activated without a TX queue"),
            ctrl,
            interrupt: a.interrupt,
            backend,
            stats,
            stop,
            stopped: false,
            data_in_kernel,
            tap_readable: true,
            mergeable: a.features & MRG_RXBUF != 0,
            max_frame: super::HDR_LEN + max_frame(big, mtu),
            pool: RxPool::default(),
            segs: Vec::with_capacity(MAX_IOV),
            iov: Vec::with_capacity(MAX_IOV),
            bus_master,
            tx_parked: false,
            tap_watch_out: false,
            stages,
            timer: TimerFd::new()?,
            tx_hold: None,
            rx_held: None,
        })
    }

    /// Arms the timer for the earliest held frame, if any. A timer that
    /// fires with nothing due is harmless: each side checks its own time.
    pub(super) fn arm_timer(&mut self) {
        let due = [self.tx_hold.map(|h| h.until), self.rx_held.map(|h| h.until)]
            .into_iter()
            .flatten()
            .min();
        if let Some(due) = due {
            let wait = due.saturating_duration_since(Instant::now()).max(MIN_HOLD);
            if let Err(e) = self.timer.reset(wait, None) {
                crate::guest_log!(
                    log::Level::Error,
                    "virtio-net: cannot arm the hold timer: {e}"
                );
            }
        }
    }

    fn on_timer(&mut self) {
        // Read only an expired timer: one re-armed since it woke us has no
        // count, and a read would block.
        if !self.timer.is_armed().unwrap_or(true) {
            let _ = self.timer.wait();
        }
        let now = Instant::now();
        if self.tx_hold.is_some_and(|h| now >= h.until) {
            self.process_tx();
        }
        if self.rx_held.is_some_and(|h| now >= h.until) {
            self.process_rx();
        }
        self.arm_timer();
    }

    /// Watches the TAP for room (EPOLLOUT) exactly while TX is parked: a
    /// TAP with room is writable almost always, so watching it otherwise
    /// would wake the loop for nothing.
    fn sync_tap_watch(&mut self, ops: &mut EventOps) {
        if self.tx_parked == self.tap_watch_out || self.data_in_kernel {
            return;
        }
        let mut set = EventSet::IN | EventSet::EDGE_TRIGGERED;
        if self.tx_parked {
            set |= EventSet::OUT;
        }
        let fd = self.backend.as_raw_fd();
        match ops.modify(Events::with_data_raw(fd, TAP, set)) {
            Ok(()) => self.tap_watch_out = self.tx_parked,
            Err(e) => crate::guest_log!(
                log::Level::Error,
                "virtio-net: cannot watch the TAP for room: {e:?}"
            ),
        }
    }

    /// Whether the device may touch guest memory now. Every pass (RX, TX,
    /// control) begins by asking: while bus mastering is off the work
    /// waits (kicks are still read, and a TAP event still noted), and the
    /// transport kicks every queue when it comes back on.
    pub(super) fn may_dma(&self) -> bool {
        self.bus_master.load(Ordering::SeqCst)
    }

    /// Runs the event loop until the device is reset or the VM stops.
    pub fn run(self) {
        let mut em = match EventManager::<Worker>::new() {
            Ok(em) => em,
            Err(e) => {
                crate::guest_log!(log::Level::Error, "virtio-net: no event loop: {e:?}");
                return;
            }
        };
        let id = em.add_subscriber(self);
        loop {
            if let Err(e) = em.run() {
                crate::guest_log!(log::Level::Error, "virtio-net: event loop failed: {e:?}");
                break;
            }
            if em.subscriber_mut(id).map_or(true, |w| w.stopped) {
                break;
            }
        }
    }

    pub(super) fn signal(&mut self, which: u32) {
        let ctx = match which {
            RX_KICK => &mut self.rx,
            TX_KICK => &mut self.tx,
            _ => match self.ctrl.as_mut() {
                Some(c) => c,
                None => return,
            },
        };
        if queue::should_interrupt(&self.mem, &mut ctx.queue) {
            self.interrupt.queue(ctx.vector);
        }
    }
}

pub(super) const SIGNAL_RX: u32 = RX_KICK;
pub(super) const SIGNAL_TX: u32 = TX_KICK;
pub(super) const SIGNAL_CTRL: u32 = CTRL_KICK;

impl MutEventSubscriber for Worker {
    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &dyn std::os::fd::AsRawFd, data, set| {
            if let Err(e) = ops.add(Events::with_data_raw(fd.as_raw_fd(), data, set)) {
                crate::guest_log!(
                    log::Level::Error,
                    "virtio-net: cannot watch fd {}: {e:?}",
                    fd.as_raw_fd()
                );
            }
        };
        if let Some(c) = &self.ctrl {
            add(&c.kick, CTRL_KICK, EventSet::IN);
        }
        add(&self.stop, STOP, EventSet::IN);
        if self.data_in_kernel {
            return;
        }
        add(&self.timer, TIMER, EventSet::IN);
        add(&*self.backend, TAP, EventSet::IN | EventSet::EDGE_TRIGGERED);
        add(&self.rx.kick, RX_KICK, EventSet::IN);
        add(&self.tx.kick, TX_KICK, EventSet::IN);
        // Frames may have been queued before the driver came up.
        self.process_tx();
        self.process_rx();
        self.sync_tap_watch(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TAP => {
                let set = events.event_set();
                if set.contains(EventSet::OUT) && self.tx_parked {
                    // Room again: the parked chain goes first.
                    self.tx_parked = false;
                    self.process_tx();
                }
                if !set.contains(EventSet::OUT) || set.contains(EventSet::IN) {
                    self.tap_readable = true;
                    self.process_rx();
                }
            }
            RX_KICK => {
                let _ = self.rx.kick.read();
                self.process_rx();
            }
            TX_KICK => {
                let _ = self.tx.kick.read();
                self.process_tx();
            }
            CTRL_KICK => {
                if let Some(c) = &self.ctrl {
                    let _ = c.kick.read();
                }
                self.process_ctrl();
            }
            STOP => {
                let _ = self.stop.read();
                self.stopped = true;
            }
            TIMER => self.on_timer(),
            _ => {}
        }
        self.sync_tap_watch(ops);
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
