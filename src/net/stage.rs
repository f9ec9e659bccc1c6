//! The stage seam: an ordered list of stages that every frame of a NIC
//! passes, in both directions and on both NIC models, between the backend
//! and the guest's buffers. A stage sees the frame as the guest sees it
//! (no vnet header) and passes it, drops it, or holds it until a time
//! (back-pressure: a TX frame stays in the guest's ring, an RX frame in
//! the guest's buffers, unpublished, and nothing more is read meanwhile).
//! Rate limits, capture and egress policy are stages.
//!
//! The list is shared: the NIC's thread runs it, others may change it
//! while the VM runs. The NIC takes its lock once per frame, never across
//! a system call.
//!
//! A stage may also answer the guest: an egress policy answers a refused
//! connection with a RST. Such frames go to the [`Injector`], and the NIC
//! reads them before the backend's ([`Injector::readv`]) the next time it
//! fills RX buffers, which it does right after the TX pass that made them.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};

use crate::virtio::chain::Segment;
use crate::vmm::memory::GuestRam;

/// Which way a frame goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Guest to host.
    Tx,
    /// Host to guest.
    Rx,
}

/// What a stage says about a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    /// The frame is lost (counted in tx_dropped or rx_dropped and in the
    /// stage's own counter); the guest's buffers are returned or reused.
    Drop,
    /// Not before `until`: the NIC keeps the frame where it is, sends or
    /// reads nothing more that way, and asks this stage again then.
    Hold {
        until: Instant,
    },
}

/// A frame as the guest sees it: the Ethernet header first, no vnet header.
pub enum Frame<'a> {
    /// In guest memory: `len` bytes of `segs` after the first `skip`
    /// (the vnet header).
    Guest {
        mem: &'a GuestRam,
        segs: &'a [Segment],
        skip: usize,
        len: usize,
    },
    /// In rvm's memory (the e1000 gathers its TX frames).
    Bytes(&'a [u8]),
}

impl Frame<'_> {
    pub fn len(&self) -> usize {
        match self {
            Frame::Guest { len, .. } => *len,
            Frame::Bytes(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies the frame's bytes from `offset` into `buf`; returns how many
    /// (fewer at the frame's end, or where guest memory cannot be read).
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> usize {
        match self {
            Frame::Bytes(b) => {
                let src = b.get(offset..).unwrap_or_default();
                let n = src.len().min(buf.len());
                buf[..n].copy_from_slice(&src[..n]);
                n
            }
            Frame::Guest {
                mem,
                segs,
                skip,
                len,
            } => {
                let want = buf.len().min(len.saturating_sub(offset));
                let mut skip = skip.saturating_add(offset);
                let mut done = 0;
                for s in segs.iter() {
                    if done == want {
                        break;
                    }
                    let seg_len = s.iov.iov_len;
                    if skip >= seg_len {
                        skip -= seg_len;
                        continue;
                    }
                    let n = (seg_len - skip).min(want - done);
                    let at = GuestAddress(s.gpa.wrapping_add(skip as u64));
                    if mem.read_slice(&mut buf[done..done + n], at).is_err() {
                        break;
                    }
                    done += n;
                    skip = 0;
                }
                done
            }
        }
    }
}

/// One stage of a NIC's data path.
pub trait Stage: Send {
    /// A short name for logs and counters ("rate-limit", "capture", ...).
    fn name(&self) -> &str;

    /// Whether the stage must see the frames in rvm's process. Such a stage
    /// makes vhost-net decline: `vhost=auto` falls back to the userspace
    /// path with this stage named, `vhost=on` fails before the guest starts.
    fn needs_userspace(&self) -> bool {
        true
    }

    /// The frame `frame` going `dir`.
    fn frame(&mut self, dir: Direction, frame: &Frame<'_>, now: Instant) -> Verdict;
}

/// What each stage did, for the library API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StageCounters {
    pub name: String,
    pub dropped: u64,
    /// Times the stage held a frame back.
    pub held: u64,
}

struct Entry {
    stage: Box<dyn Stage>,
    dropped: u64,
    held: u64,
}

/// A NIC's stages, in order. Cloning gives another handle on the same list.
#[derive(Clone, Default)]
pub struct Stages {
    inner: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    list: Mutex<Vec<Entry>>,
    /// Frames the stages made for the guest.
    injector: Arc<Injector>,
    /// How many stages there are: a NIC without any takes no lock per frame.
    len: AtomicUsize,
    /// The kernel moves this NIC's frames now (vhost-net), past any stage.
    in_kernel: AtomicBool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StageError {
    #[error("the {0} stage needs the frames in rvm, but vhost-net moves them in the kernel now; start the VM with vhost=off (or auto) to use it")]
    KernelDataPath(String),
}

/// The shortest wait a hold makes a NIC's loop sleep: a stage that holds
/// until now (or the past) must not make the loop spin.
pub const MIN_HOLD: std::time::Duration = std::time::Duration::from_micros(50);

/// A direction of a NIC held by a stage: until when, and which stage to
/// ask first then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HoldAt {
    pub until: Instant,
    pub stage: usize,
}

/// Whether a NIC may take its next frame in a direction held by `hold`:
/// None while the hold lasts; else the stage that frame starts at (the one
/// that held, or the first), the hold cleared.
pub fn resume(hold: &mut Option<HoldAt>) -> Option<usize> {
    match *hold {
        Some(h) if Instant::now() < h.until => None,
        Some(h) => {
            *hold = None;
            Some(h.stage)
        }
        None => Some(0),
    }
}

/// Where a frame's pass through the stages ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Drop,
    /// Held by the stage at `stage` (ask again from there, so the stages
    /// before it do not see the frame twice).
    Hold {
        until: Instant,
        stage: usize,
    },
}

impl Stages {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        crate::lock_or_recover(&self.inner.list)
    }

    /// Adds `stage` at the end (frames meet it last on TX and RX alike).
    /// A stage that needs the frames in rvm is refused while vhost-net
    /// moves them: it would see nothing, silently.
    pub fn push(&self, stage: Box<dyn Stage>) -> Result<(), StageError> {
        let mut list = self.lock();
        if stage.needs_userspace() && self.inner.in_kernel.load(Ordering::SeqCst) {
            return Err(StageError::KernelDataPath(stage.name().to_string()));
        }
        list.push(Entry {
            stage,
            dropped: 0,
            held: 0,
        });
        self.inner.len.store(list.len(), Ordering::SeqCst);
        Ok(())
    }

    /// Removes the stages named `name`; returns how many.
    pub fn remove(&self, name: &str) -> usize {
        let mut list = self.lock();
        let before = list.len();
        list.retain(|e| e.stage.name() != name);
        self.inner.len.store(list.len(), Ordering::SeqCst);
        before - list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.len.load(Ordering::Relaxed) == 0
    }

    /// The kernel takes over this NIC's frames, if no stage needs them in
    /// rvm: Err names the stage that does. From then on such stages are
    /// refused, until [`Stages::leave_kernel`].
    pub fn enter_kernel(&self) -> Result<(), String> {
        let list = self.lock();
        if let Some(e) = list.iter().find(|e| e.stage.needs_userspace()) {
            return Err(format!(
                "the {} stage needs the frames in rvm",
                e.stage.name()
            ));
        }
        self.inner.in_kernel.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Where stages put frames for the guest, and the NIC reads them.
    pub fn injector(&self) -> &Arc<Injector> {
        &self.inner.injector
    }

    /// Whether the kernel moves this NIC's frames now (vhost-net).
    pub fn in_kernel(&self) -> bool {
        self.inner.in_kernel.load(Ordering::SeqCst)
    }

    /// The frames are rvm's again.
    pub fn leave_kernel(&self) {
        self.inner.in_kernel.store(false, Ordering::SeqCst);
    }

    /// The first stage that needs the frames in rvm's process, by name:
    /// why vhost-net must decline.
    pub fn needs_userspace(&self) -> Option<String> {
        self.lock()
            .iter()
            .find(|e| e.stage.needs_userspace())
            .map(|e| e.stage.name().to_string())
    }

    pub fn counters(&self) -> Vec<StageCounters> {
        self.lock()
            .iter()
            .map(|e| StageCounters {
                name: e.stage.name().to_string(),
                dropped: e.dropped,
                held: e.held,
            })
            .collect()
    }

    /// [`Stages::run`] at the present time; with no stage, nothing is
    /// locked or looked at (the hot path of a NIC without stages).
    pub fn run_now(&self, dir: Direction, frame: &Frame<'_>, from: usize) -> Outcome {
        if self.is_empty() {
            return Outcome::Pass;
        }
        self.run(dir, frame, from, Instant::now())
    }

    /// Runs `frame` through the stages from `from` (0, or where a hold
    /// left it). A list changed meanwhile is taken as it is now.
    pub fn run(&self, dir: Direction, frame: &Frame<'_>, from: usize, now: Instant) -> Outcome {
        let mut list = self.lock();
        for (i, e) in list.iter_mut().enumerate().skip(from) {
            match e.stage.frame(dir, frame, now) {
                Verdict::Pass => {}
                Verdict::Drop => {
                    e.dropped += 1;
                    return Outcome::Drop;
                }
                Verdict::Hold { until } => {
                    e.held += 1;
                    return Outcome::Hold { until, stage: i };
                }
            }
        }
        Outcome::Pass
    }
}

/// Frames the stages made for the guest, waiting for its RX buffers.
#[derive(Default)]
pub struct Injector {
    queue: Mutex<std::collections::VecDeque<Vec<u8>>>,
    pending: AtomicUsize,
}

/// Frames kept for the guest at most: a guest that keeps knocking where it
/// is refused gets as many answers as its RX buffers take, the rest is not
/// answered (its connections then time out instead).
const MAX_INJECTED: usize = 64;

impl Injector {
    /// Queues `frame` (Ethernet, no vnet header) for the guest; false when
    /// the queue is full and it was not.
    pub fn push(&self, frame: Vec<u8>) -> bool {
        let mut q = crate::lock_or_recover(&self.queue);
        if q.len() >= MAX_INJECTED {
            return false;
        }
        q.push_back(frame);
        self.pending.store(q.len(), Ordering::SeqCst);
        true
    }

    /// Whether a frame waits for the guest (no lock taken).
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Relaxed) != 0
    }

    /// Reads the next waiting frame into `iov` as `backend.readv` would
    /// (a zeroed vnet header first when the backend has them; the frame's
    /// whole length returned even when `iov` held less, as tun does), or,
    /// with none waiting, reads from `backend`.
    ///
    /// # Safety
    /// As [`NetBackend::readv`](super::backend::NetBackend::readv): every iovec points to memory that may be
    /// written for its length and that nothing else uses meanwhile.
    pub unsafe fn readv(
        &self,
        backend: &dyn super::backend::NetBackend,
        iov: &[libc::iovec],
    ) -> std::io::Result<usize> {
        let frame = if self.pending() {
            let mut q = crate::lock_or_recover(&self.queue);
            let f = q.pop_front();
            self.pending.store(q.len(), Ordering::SeqCst);
            f
        } else {
            None
        };
        let Some(frame) = frame else {
            // SAFETY: the caller's promise, passed on.
            return unsafe { backend.readv(iov) };
        };
        let hdr = [0u8; super::backend::VNET_HDR_LEN];
        let hdr: &[u8] = if backend.vnet_hdr() { &hdr } else { &[] };
        let mut src = hdr.iter().chain(frame.iter()).copied();
        let total = hdr.len() + frame.len();
        for v in iov {
            let base = v.iov_base.cast::<u8>();
            for i in 0..v.iov_len {
                let Some(b) = src.next() else {
                    return Ok(total);
                };
                // SAFETY: i < iov_len, inside memory the caller says may
                // be written.
                unsafe { base.add(i).write(b) };
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Stages for the NICs' unit tests.
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// Drops every frame going `dir` whose first byte is `first` (the
    /// tests' frames start with a marker in the destination MAC).
    pub struct DropFirstByte {
        pub dir: Direction,
        pub first: u8,
    }

    impl Stage for DropFirstByte {
        fn name(&self) -> &str {
            "drop-first-byte"
        }
        fn frame(&mut self, dir: Direction, frame: &Frame<'_>, _now: Instant) -> Verdict {
            let mut b = [0u8; 1];
            if dir == self.dir && frame.read(0, &mut b) == 1 && b[0] == self.first {
                Verdict::Drop
            } else {
                Verdict::Pass
            }
        }
    }

    /// Drops every TX frame whose first byte is `first` and answers it
    /// with `answer` for the guest (a refusal's shape).
    pub struct AnswerTx {
        pub first: u8,
        pub answer: Vec<u8>,
        pub injector: Arc<Injector>,
    }

    impl Stage for AnswerTx {
        fn name(&self) -> &str {
            "answer-tx"
        }
        fn frame(&mut self, dir: Direction, frame: &Frame<'_>, _now: Instant) -> Verdict {
            let mut b = [0u8; 1];
            if dir == Direction::Tx && frame.read(0, &mut b) == 1 && b[0] == self.first {
                self.injector.push(self.answer.clone());
                Verdict::Drop
            } else {
                Verdict::Pass
            }
        }
    }

    /// Lets `budget` frames go `dir`, then holds each further one for
    /// `hold`, after which it lets one more through (and holds again):
    /// the shape of a rate limit.
    pub struct Trickle {
        pub dir: Direction,
        pub budget: u64,
        pub hold: Duration,
        pub next_at: Option<Instant>,
        pub seen: Arc<AtomicU64>,
    }

    /// Holds every frame going `dir` until "now", forever: a NIC must
    /// still sleep between asks ([`MIN_HOLD`]), not spin.
    pub struct HoldUntilNow {
        pub dir: Direction,
        pub calls: Arc<AtomicU64>,
    }

    impl Stage for HoldUntilNow {
        fn name(&self) -> &str {
            "hold-until-now"
        }
        fn frame(&mut self, dir: Direction, _frame: &Frame<'_>, now: Instant) -> Verdict {
            if dir != self.dir {
                return Verdict::Pass;
            }
            self.calls.fetch_add(1, Ordering::SeqCst);
            Verdict::Hold { until: now }
        }
    }

    impl Trickle {
        /// One frame at once, then one per `hold`.
        pub fn one_then_every(dir: Direction, hold: Duration) -> Box<Self> {
            Box::new(Trickle {
                dir,
                budget: 1,
                hold,
                next_at: None,
                seen: Default::default(),
            })
        }
    }

    impl Stage for Trickle {
        fn name(&self) -> &str {
            "trickle"
        }
        fn frame(&mut self, dir: Direction, _frame: &Frame<'_>, now: Instant) -> Verdict {
            if dir != self.dir {
                return Verdict::Pass;
            }
            if self.budget > 0 {
                self.budget -= 1;
                self.seen.fetch_add(1, Ordering::SeqCst);
                return Verdict::Pass;
            }
            match self.next_at {
                Some(t) if now >= t => {
                    self.next_at = None;
                    self.seen.fetch_add(1, Ordering::SeqCst);
                    Verdict::Pass
                }
                Some(t) => Verdict::Hold { until: t },
                None => {
                    let t = now + self.hold;
                    self.next_at = Some(t);
                    Verdict::Hold { until: t }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Duration;
    use vm_memory::GuestMemoryBackend;

    /// Records the frames it sees.
    struct Tap(Arc<Mutex<Vec<Vec<u8>>>>);
    impl Stage for Tap {
        fn name(&self) -> &str {
            "tap"
        }
        fn needs_userspace(&self) -> bool {
            false
        }
        fn frame(&mut self, _dir: Direction, frame: &Frame<'_>, _now: Instant) -> Verdict {
            let mut b = vec![0u8; frame.len()];
            let n = frame.read(0, &mut b);
            b.truncate(n);
            self.0.lock().unwrap().push(b);
            Verdict::Pass
        }
    }

    #[test]
    fn a_guest_frame_reads_across_segments_without_its_header() {
        let mem = crate::vmm::memory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        // A 12-byte header and 20 bytes of frame in three buffers.
        let bytes: Vec<u8> = (0u8..32).collect();
        mem.write_slice(&bytes[..8], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&bytes[8..20], GuestAddress(0x3000))
            .unwrap();
        mem.write_slice(&bytes[20..], GuestAddress(0x2000)).unwrap();
        let seg = |gpa: u64, len: usize| Segment {
            gpa,
            iov: libc::iovec {
                iov_base: mem
                    .get_slice(GuestAddress(gpa), len)
                    .unwrap()
                    .ptr_guard_mut()
                    .as_ptr()
                    .cast(),
                iov_len: len,
            },
        };
        let segs = [seg(0x1000, 8), seg(0x3000, 12), seg(0x2000, 12)];
        let f = Frame::Guest {
            mem: &mem,
            segs: &segs,
            skip: 12,
            len: 20,
        };
        let mut all = [0u8; 64];
        assert_eq!(
            f.read(0, &mut all),
            20,
            "the frame's length, not the buffers'"
        );
        assert_eq!(&all[..20], &bytes[12..]);
        let mut mid = [0u8; 5];
        assert_eq!(f.read(6, &mut mid), 5);
        assert_eq!(mid, [18, 19, 20, 21, 22]);
        assert_eq!(f.read(20, &mut mid), 0, "past the end");
        assert_eq!(f.read(usize::MAX, &mut mid), 0);
    }

    #[test]
    fn stages_run_in_order_and_a_hold_resumes_where_it_stopped() {
        let stages = Stages::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        stages.push(Box::new(Tap(seen.clone()))).unwrap();
        let passed = Arc::new(AtomicU64::new(0));
        stages
            .push(Box::new(Trickle {
                dir: Direction::Tx,
                budget: 1,
                hold: Duration::from_millis(5),
                next_at: None,
                seen: passed.clone(),
            }))
            .unwrap();
        stages
            .push(Box::new(DropFirstByte {
                dir: Direction::Tx,
                first: 0xee,
            }))
            .unwrap();
        let t0 = Instant::now();
        let frame = [0xeeu8, 1, 2];
        let f = Frame::Bytes(&frame);
        assert_eq!(stages.run(Direction::Tx, &f, 0, t0), Outcome::Drop);
        let until = t0 + Duration::from_millis(5);
        assert_eq!(
            stages.run(Direction::Tx, &f, 0, t0),
            Outcome::Hold { until, stage: 1 }
        );
        // Asked again from the holding stage: the first does not see it twice.
        assert_eq!(
            stages.run(Direction::Tx, &f, 1, t0),
            Outcome::Hold { until, stage: 1 }
        );
        assert_eq!(stages.run(Direction::Tx, &f, 1, until), Outcome::Drop);
        assert_eq!(seen.lock().unwrap().len(), 2);
        // RX frames pass all three.
        assert_eq!(stages.run(Direction::Rx, &f, 0, t0), Outcome::Pass);
        let c = stages.counters();
        assert_eq!(
            c.iter()
                .map(|c| (c.name.as_str(), c.dropped, c.held))
                .collect::<Vec<_>>(),
            vec![("tap", 0, 0), ("trickle", 0, 2), ("drop-first-byte", 2, 0)]
        );
        assert_eq!(stages.needs_userspace().as_deref(), Some("trickle"));
        assert_eq!(stages.remove("trickle"), 1);
        assert_eq!(stages.needs_userspace().as_deref(), Some("drop-first-byte"));
        stages.remove("drop-first-byte");
        assert_eq!(
            stages.needs_userspace(),
            None,
            "the tap stage works anywhere"
        );
    }

    #[test]
    fn the_kernel_data_path_and_userspace_stages_exclude_each_other() {
        let stages = Stages::new();
        let drop = || {
            Box::new(DropFirstByte {
                dir: Direction::Rx,
                first: 1,
            })
        };
        stages.push(drop()).unwrap();
        assert_eq!(
            stages.enter_kernel(),
            Err("the drop-first-byte stage needs the frames in rvm".into())
        );
        stages.remove("drop-first-byte");
        stages.enter_kernel().unwrap();
        assert_eq!(
            stages.push(drop()),
            Err(StageError::KernelDataPath("drop-first-byte".into()))
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        stages.push(Box::new(Tap(seen))).unwrap();
        stages.leave_kernel();
        stages.push(drop()).unwrap();
        assert_eq!(stages.counters().len(), 2);
        assert_eq!(
            stages.run_now(Direction::Rx, &Frame::Bytes(&[1, 2]), 0),
            Outcome::Drop
        );
        assert_eq!(
            Stages::new().run_now(Direction::Rx, &Frame::Bytes(&[1]), 0),
            Outcome::Pass
        );
    }
}
