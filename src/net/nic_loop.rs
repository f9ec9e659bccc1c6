//! The loop every NIC's data path runs on, whatever the model: one thread
//! per NIC, woken by typed events (the backend has frames, the backend has
//! room, the guest kicked a queue, a time came, stop), level-triggered.
//!
//! The device model says what it handles ([`NicEngine::handle`]) and,
//! after every event, what it waits for ([`NicEngine::wants`]); the loop
//! does the watching. So back-pressure is one rule for both models: while
//! the guest has no buffers (or a stage holds a frame) the backend's
//! frames are not watched, and stay in the backend; while the backend
//! would block, its room is watched; a hold, a retry or a periodic look
//! is a time, and the loop's timer wakes it then, never sooner than
//! [`MIN_HOLD`] from now.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::stage::MIN_HOLD;

/// What woke the loop, as the device model sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Token {
    /// The backend has frames to read.
    BackendReadable,
    /// The backend has room for writes again.
    BackendWritable,
    /// The backend failed for good (its TAP deleted): no longer watched.
    BackendFailed,
    /// The guest kicked queue `n` (the model's own numbering).
    QueueKick(usize),
    /// The time the model asked for came (or passed).
    Timer,
}

/// What the model waits for next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wants {
    /// Frames from the backend: false while the guest has no buffers, a
    /// stage holds RX, or there is no backend in userspace.
    pub frames: bool,
    /// Room in the backend: true exactly while TX waits for it (a TAP
    /// with room is writable almost always).
    pub room: bool,
    /// The earliest time to be woken ([`Token::Timer`]).
    pub wake_at: Option<Instant>,
    /// The backend's fd is not to be polled at all: a detached queue of
    /// a multi-queue TAP polls as an error until it is attached again.
    pub detached: bool,
}

/// A NIC model's data path, driven by [`run`].
pub trait NicEngine: Send {
    /// Once, before the first event: what was queued before the loop.
    fn start(&mut self) {}
    fn handle(&mut self, token: Token);
    fn wants(&self) -> Wants;
}

const STOP: u32 = 0;
const TIMER: u32 = 1;
const FRAMES: u32 = 2;
const ROOM: u32 = 3;
/// The kick at index `i` of [`Sources::kicks`] is event data KICK + i.
const KICK: u32 = 4;

/// The fds a NIC's loop watches besides its timer.
pub struct Sources {
    /// The backend's fd, None when the kernel moves the frames (vhost).
    pub backend: Option<RawFd>,
    /// The guest's queue kicks, each with its queue's number in the
    /// model's numbering ([`Token::QueueKick`]).
    pub kicks: Vec<(usize, EventFd)>,
    /// Ends the loop.
    pub stop: EventFd,
}

struct Looper<E> {
    engine: E,
    backend: Option<RawFd>,
    /// The backend again under a second fd: the one watched for room,
    /// so that frames and room are watched apart.
    room: Option<OwnedFd>,
    kicks: Vec<(usize, EventFd)>,
    stop: EventFd,
    timer: TimerFd,
    /// What is watched now.
    watching: Wants,
    /// The backend's fds are out of the epoll set (detached or failed).
    out_of_set: bool,
    /// The time the timer was last set for. It is not set again for the
    /// same time: an engine that cannot act when woken (bus mastering
    /// off) and keeps asking for that time is woken once, not every
    /// MIN_HOLD; it asks for a new time when it has one.
    armed_for: Option<Instant>,
    backend_failed: bool,
    stopped: bool,
}

/// Runs `engine` until `sources.stop` is written. Errors setting up the
/// loop are logged and end it: the NIC then moves no frames.
pub fn run<E: NicEngine + 'static>(engine: E, sources: Sources) {
    let looper = match Looper::new(engine, sources) {
        Ok(l) => l,
        Err(e) => {
            crate::guest_log!(log::Level::Error, "NIC: no event loop: {e}");
            return;
        }
    };
    let mut em = match EventManager::<Looper<E>>::new() {
        Ok(em) => em,
        Err(e) => {
            crate::guest_log!(log::Level::Error, "NIC: no event loop: {e:?}");
            return;
        }
    };
    let id = em.add_subscriber(looper);
    loop {
        if let Err(e) = em.run() {
            crate::guest_log!(log::Level::Error, "NIC: event loop failed: {e:?}");
            break;
        }
        if em.subscriber_mut(id).map_or(true, |l| l.stopped) {
            break;
        }
    }
}

impl<E: NicEngine> Looper<E> {
    fn new(engine: E, s: Sources) -> std::io::Result<Self> {
        let room = match s.backend {
            Some(fd) => {
                // SAFETY: fcntl(F_DUPFD_CLOEXEC) on an fd the caller keeps
                // open; the result is checked and owned by `room` alone.
                let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
                if dup < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: `dup` was just created and nothing else owns it.
                Some(unsafe { OwnedFd::from_raw_fd(dup) })
            }
            None => None,
        };
        let timer = TimerFd::new()?;
        // Non-blocking: a timer re-armed after epoll reported it has no
        // count, and reading it then must not block the loop.
        // SAFETY: F_SETFL on the timer's own fd, which it keeps open.
        if unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Looper {
            engine,
            backend: s.backend,
            room,
            kicks: s.kicks,
            stop: s.stop,
            timer,
            watching: Wants::default(),
            out_of_set: false,
            armed_for: None,
            backend_failed: false,
            stopped: false,
        })
    }

    /// Watches what the engine wants now: the backend's frames and room
    /// (each fd registered once, switched between its event and none, or
    /// out of the set while there is nothing to poll), and the timer.
    fn sync(&mut self, ops: &mut EventOps) {
        let want = self.engine.wants();
        let out = self.backend.is_none() || self.backend_failed || want.detached;
        if out != self.out_of_set {
            // Out: no event of the fds, not even an error. Back in: as
            // wanted now, against nothing watched.
            self.backend_fds(ops, !out);
            self.out_of_set = out;
            self.watching = Wants::default();
        }
        if !out {
            let fds = [
                (
                    self.backend,
                    FRAMES,
                    want.frames,
                    self.watching.frames,
                    EventSet::IN,
                ),
                (
                    self.room_fd(),
                    ROOM,
                    want.room,
                    self.watching.room,
                    EventSet::OUT,
                ),
            ];
            for (fd, data, wanted, watched, on) in fds {
                if let Some(fd) = fd.filter(|_| wanted != watched) {
                    let set = if wanted { on } else { EventSet::empty() };
                    if let Err(e) = ops.modify(Events::with_data_raw(fd, data, set)) {
                        crate::guest_log!(log::Level::Error, "NIC: cannot watch fd {fd}: {e:?}");
                    }
                }
            }
            self.watching.frames = want.frames;
            self.watching.room = want.room;
        }
        if let Some(at) = want.wake_at.filter(|&at| Some(at) != self.armed_for) {
            self.arm(at);
        }
    }

    /// Puts the backend's two fds in the epoll set, watching nothing yet
    /// (`add`), or takes them out.
    fn backend_fds(&self, ops: &mut EventOps, add: bool) {
        for (fd, data) in [(self.backend, FRAMES), (self.room_fd(), ROOM)] {
            let Some(fd) = fd else { continue };
            let ev = Events::with_data_raw(fd, data, EventSet::empty());
            if let Err(e) = if add { ops.add(ev) } else { ops.remove(ev) } {
                crate::guest_log!(log::Level::Error, "NIC: cannot watch fd {fd}: {e:?}");
            }
        }
    }

    fn room_fd(&self) -> Option<RawFd> {
        self.room.as_ref().map(|r| r.as_raw_fd())
    }

    fn arm(&mut self, at: Instant) {
        // A model that keeps asking for "now" (a stage holding until now)
        // must not spin its thread.
        let wait = at.saturating_duration_since(Instant::now()).max(MIN_HOLD);
        match self.timer.reset(wait, None) {
            Ok(()) => self.armed_for = Some(at),
            Err(e) => crate::guest_log!(log::Level::Error, "NIC: cannot arm its timer: {e}"),
        }
    }

    /// The backend failed for good (EPOLLERR or EPOLLHUP): it would be
    /// reported again and again, so the sync after this takes it out.
    fn backend_gone(&mut self) {
        if !self.backend_failed {
            self.backend_failed = true;
            self.engine.handle(Token::BackendFailed);
        }
    }
}

impl<E: NicEngine> MutEventSubscriber for Looper<E> {
    fn init(&mut self, ops: &mut EventOps) {
        let mut fds: Vec<(RawFd, u32)> = vec![
            (self.stop.as_raw_fd(), STOP),
            (self.timer.as_raw_fd(), TIMER),
        ];
        for (i, (_, k)) in self.kicks.iter().enumerate() {
            fds.push((k.as_raw_fd(), KICK + i as u32));
        }
        for (fd, data) in fds {
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                crate::guest_log!(log::Level::Error, "NIC: cannot watch fd {fd}: {e:?}");
            }
        }
        // The backend's two fds, watching nothing until the engine wants.
        self.backend_fds(ops, true);
        self.engine.start();
        self.sync(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        match events.data() {
            STOP => {
                let _ = self.stop.read();
                self.stopped = true;
                return;
            }
            TIMER => {
                // EAGAIN when re-armed since epoll saw it: not due yet.
                let _ = self.timer.wait();
                self.engine.handle(Token::Timer);
            }
            FRAMES | ROOM if set.intersects(EventSet::ERROR | EventSet::HANG_UP) => {
                self.backend_gone();
            }
            FRAMES => self.engine.handle(Token::BackendReadable),
            ROOM => self.engine.handle(Token::BackendWritable),
            data => {
                let i = data.saturating_sub(KICK) as usize;
                if let Some((n, k)) = self.kicks.get(i) {
                    let _ = k.read();
                    self.engine.handle(Token::QueueKick(*n));
                }
            }
        }
        self.sync(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// An engine that records what it was handed and wants what the test
    /// says (the test kicks queue 0 after a change, as a guest would).
    #[derive(Clone, Default)]
    struct Probe {
        seen: Arc<Mutex<Vec<Token>>>,
        wants: Arc<Mutex<Wants>>,
        /// Read the backend on BackendReadable (else it stays readable).
        drain: Option<Arc<UnixStream>>,
        /// Ask to be woken at the time of asking, each time.
        always_now: Arc<Mutex<bool>>,
    }

    impl NicEngine for Probe {
        fn handle(&mut self, token: Token) {
            self.seen.lock().unwrap().push(token);
            if let (Token::BackendReadable, Some(s)) = (token, &self.drain) {
                let mut buf = [0u8; 64];
                let _ = std::io::Read::read(&mut &**s, &mut buf);
            }
        }
        fn wants(&self) -> Wants {
            let mut w = *self.wants.lock().unwrap();
            if *self.always_now.lock().unwrap() {
                w.wake_at = Some(Instant::now());
            }
            w
        }
    }

    impl Probe {
        fn count(&self, t: Token) -> usize {
            self.seen
                .lock()
                .unwrap()
                .iter()
                .filter(|&&s| s == t)
                .count()
        }
        fn set(&self, w: Wants) {
            *self.wants.lock().unwrap() = w;
        }
    }

    struct Running {
        kick: EventFd,
        stop: EventFd,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Running {
        fn start(probe: &Probe, backend: &UnixStream) -> Running {
            backend.set_nonblocking(true).unwrap();
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let sources = Sources {
                backend: Some(backend.as_raw_fd()),
                kicks: vec![(7, kick.try_clone().unwrap())],
                stop: stop.try_clone().unwrap(),
            };
            let engine = probe.clone();
            let thread = std::thread::spawn(move || run(engine, sources));
            Running {
                kick,
                stop,
                thread: Some(thread),
            }
        }
        /// Kicks and waits a little: the loop re-reads what is wanted.
        fn kick(&self) {
            self.kick.write(1).unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        fn stop(mut self) {
            self.stop.write(1).unwrap();
            self.thread.take().unwrap().join().unwrap();
        }
    }

    #[test]
    fn frames_are_watched_only_while_wanted_and_kicks_carry_their_number() {
        let (backend, mut peer) = UnixStream::pair().unwrap();
        let probe = Probe::default();
        let r = Running::start(&probe, &backend);
        // Frames wait in the backend, unread: not wanted, not reported
        // (a level-triggered watch would report them without end).
        std::io::Write::write_all(&mut peer, b"frame").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(probe.count(Token::BackendReadable), 0);
        probe.set(Wants {
            frames: true,
            ..Wants::default()
        });
        r.kick();
        assert_eq!(probe.count(Token::QueueKick(7)), 1);
        // Wanted and never read: reported again and again.
        assert!(probe.count(Token::BackendReadable) > 1);
        probe.set(Wants::default());
        r.kick();
        let n = probe.count(Token::BackendReadable);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(probe.count(Token::BackendReadable), n);
        r.stop();
    }

    #[test]
    fn room_is_watched_only_while_tx_waits_for_it() {
        let (backend, _peer) = UnixStream::pair().unwrap();
        let probe = Probe::default();
        let r = Running::start(&probe, &backend);
        std::thread::sleep(Duration::from_millis(100));
        // An idle socket is writable all the time: not watched, not told.
        assert_eq!(probe.count(Token::BackendWritable), 0);
        probe.set(Wants {
            room: true,
            ..Wants::default()
        });
        r.kick();
        assert!(probe.count(Token::BackendWritable) > 0);
        probe.set(Wants::default());
        r.kick();
        let n = probe.count(Token::BackendWritable);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(probe.count(Token::BackendWritable), n);
        r.stop();
    }

    #[test]
    fn a_time_wakes_the_loop_once_then_and_asking_for_now_never_spins_it() {
        let (backend, _peer) = UnixStream::pair().unwrap();
        let probe = Probe::default();
        let r = Running::start(&probe, &backend);
        let at = Instant::now() + Duration::from_millis(200);
        probe.set(Wants {
            wake_at: Some(at),
            ..Wants::default()
        });
        r.kick();
        assert_eq!(probe.count(Token::Timer), 0);
        while Instant::now() < at + Duration::from_millis(100) {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Once: the engine still asks for `at`, which came and went.
        assert_eq!(probe.count(Token::Timer), 1);
        // Asking for "now" each time (a stage holding until now): woken
        // at most every MIN_HOLD (6,000 times in 300 ms; a spin is
        // millions), and woken (the hold goes on being asked).
        *probe.always_now.lock().unwrap() = true;
        r.kick();
        std::thread::sleep(Duration::from_millis(300));
        let n = probe.count(Token::Timer);
        assert!((100..=6_000).contains(&n), "{n} timer events in 300 ms");
        r.stop();
    }

    #[test]
    fn a_backend_that_hangs_up_is_reported_once_and_unwatched() {
        let (backend, peer) = UnixStream::pair().unwrap();
        let probe = Probe {
            drain: Some(Arc::new(backend.try_clone().unwrap())),
            ..Probe::default()
        };
        probe.set(Wants {
            frames: true,
            room: true,
            ..Wants::default()
        });
        let r = Running::start(&probe, &backend);
        drop(peer);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(probe.count(Token::BackendFailed), 1);
        let seen = probe.seen.lock().unwrap().len();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(probe.seen.lock().unwrap().len(), seen, "the loop spins");
        r.stop();
    }
}
