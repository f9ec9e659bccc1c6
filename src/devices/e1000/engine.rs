//! The e1000's data path as an engine of the shared NIC loop
//! (net::nic_loop): a TDT write or room in the TAP runs a TX pass
//! ([`super::tx`]), frames in the TAP or an RDT write an RX pass
//! ([`super::rx`]), and once a second the TAP's link state is looked at.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::rx::RxStop;
use super::Core;
use crate::net::backend::NetBackend;
use crate::net::nic_loop::{self, NicEngine, Sources, Token, Wants};

/// The kicks, in the loop's numbering: RDT and TDT writes.
const RX: usize = 0;
const TX: usize = 1;
/// How often the TAP's link state is looked at.
const LINK_POLL: Duration = Duration::from_secs(1);

/// What the NIC's thread runs: built with the device, run on its thread.
pub(crate) struct NicThread {
    pub core: Arc<Mutex<Core>>,
    pub backend: Arc<dyn NetBackend>,
    pub rx_kick: EventFd,
    pub tx_kick: EventFd,
    pub stop: EventFd,
    pub tap_name: Option<String>,
}

impl NicThread {
    pub(crate) fn run(self) {
        let sources = Sources {
            backend: Some(self.backend.as_raw_fd()),
            kicks: vec![(RX, self.rx_kick), (TX, self.tx_kick)],
            stop: self.stop,
        };
        let engine = Engine {
            core: self.core,
            _backend: self.backend,
            tap_name: self.tap_name,
            waiting_for_buffers: false,
            tap_failed: false,
            tx_blocked: false,
            tx_due: None,
            rx_due: None,
            last_link: Instant::now(),
        };
        nic_loop::run(engine, sources);
    }
}

struct Engine {
    core: Arc<Mutex<Core>>,
    /// Keeps the TAP open while the loop watches its fd.
    _backend: Arc<dyn NetBackend>,
    tap_name: Option<String>,
    /// RX waits for the driver's descriptors (or a stage's hold): the TAP
    /// keeps its frames meanwhile.
    waiting_for_buffers: bool,
    /// The TAP failed for good (deleted under a running guest).
    tap_failed: bool,
    /// TX waits for room in the TAP.
    tx_blocked: bool,
    /// When a stage's hold ends, each way.
    tx_due: Option<Instant>,
    rx_due: Option<Instant>,
    last_link: Instant,
}

impl Engine {
    fn lock(&self) -> std::sync::MutexGuard<'_, Core> {
        crate::lock_or_recover(&self.core)
    }

    fn transmit(&mut self) {
        let mut core = self.lock();
        core.transmit();
        let (due, blocked) = (core.tx_hold.map(|h| h.until), core.tx_blocked);
        // A stage answered a frame the guest sent (a refused connection's
        // RST): into the guest's buffers now, not at the next frame.
        let answered = core.stages.injector().pending();
        drop(core);
        self.tx_due = due;
        self.tx_blocked = blocked;
        if answered {
            self.receive();
        }
    }

    fn receive(&mut self) {
        if self.tap_failed {
            return;
        }
        let stop = self.lock().receive();
        self.rx_due = match stop {
            RxStop::Held(until) => Some(until),
            _ => None,
        };
        self.waiting_for_buffers = matches!(stop, RxStop::NeedBuffers | RxStop::Held(_));
        if stop == RxStop::TapFailed {
            self.tap_gone();
        }
    }

    fn tap_gone(&mut self) {
        if self.tap_failed {
            return;
        }
        self.tap_failed = true;
        crate::guest_log!(
            log::Level::Warn,
            "e1000: its backend failed (TAP deleted, or the user-mode network gone); the link is down and frames from the guest are dropped (counted)"
        );
        self.lock().set_link(false);
    }

    fn poll_link(&mut self) {
        self.last_link = Instant::now();
        if let Some(name) = &self.tap_name {
            // A TAP that is gone is a cable pulled out.
            let up = !self.tap_failed
                && match crate::net::sys::is_up(name) {
                    Ok(up) => up,
                    Err(e) => e.raw_os_error() != Some(libc::ENODEV),
                };
            self.lock().set_link(up);
        }
    }
}

impl NicEngine for Engine {
    fn handle(&mut self, token: Token) {
        match token {
            Token::BackendReadable | Token::QueueKick(RX) => self.receive(),
            Token::BackendWritable | Token::QueueKick(TX) => self.transmit(),
            Token::QueueKick(_) => {}
            Token::BackendFailed => self.tap_gone(),
            Token::Timer => {
                let now = Instant::now();
                if self.tx_due.is_some_and(|t| now >= t) {
                    self.transmit();
                }
                if self.rx_due.is_some_and(|t| now >= t) {
                    self.rx_due = None;
                    self.receive();
                }
                if now >= self.last_link + LINK_POLL {
                    self.poll_link();
                }
            }
        }
    }

    fn wants(&self) -> Wants {
        let wake_at = [Some(self.last_link + LINK_POLL), self.tx_due, self.rx_due]
            .into_iter()
            .flatten()
            .min();
        Wants {
            frames: !self.tap_failed && !self.waiting_for_buffers,
            room: self.tx_blocked && !self.tap_failed,
            wake_at,
            detached: false,
        }
    }
}
