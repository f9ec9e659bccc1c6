//! Packet capture to a pcap file, as QEMU's `-net dump`: every frame of a
//! NIC in both directions, Ethernet link type, microsecond timestamps,
//! cut at a snap length.
//!
//! Two views feed one file. On rvm's own data path a stage copies each
//! frame as the guest sees it (no vnet header; a TSO frame whole). While
//! vhost-net moves the frames, the kernel does, and an AF_PACKET socket on
//! the TAP sees them from the host's side instead (a GSO frame whole too;
//! frames the TAP dropped before the guest took them are in it). Each
//! records only while its path carries the NIC, so a session that falls
//! back from one to the other is captured throughout.
//!
//! Frames go to a writer thread through a bounded queue: a slow disk never
//! holds the guest back; a full queue or a failed write loses frames, and
//! `lost` counts them. A write error ends the capture with one log line.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use vmm_sys_util::eventfd::EventFd;

use super::stage::{Direction, Frame, Stage, StageError, Stages, Verdict};

/// The stage's name in logs and counters.
pub const STAGE_NAME: &str = "capture";
/// QEMU's default snap length, and pcap's usual one.
pub const DEFAULT_SNAP_LEN: u32 = 65535;
/// Frames waiting for the writer before more are lost.
const QUEUE: usize = 1024;
const LINKTYPE_ETHERNET: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("cannot create the capture file {path}: {source} (check that its folder exists and is writable)")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("dump_len must be at least 14 (an Ethernet header); {0} given")]
    SnapLen(u32),
    #[error("cannot start the capture thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot capture on the TAP from the kernel's side (AF_PACKET, needs CAP_NET_RAW), so vhost-net's frames would be missed: {0}; use vhost=off or run with CAP_NET_RAW")]
    Kernel(std::io::Error),
    #[error(transparent)]
    Stage(#[from] StageError),
}

/// What a capture wrote and lost so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaptureCounters {
    /// The file, while a capture runs or after it ended.
    pub path: Option<PathBuf>,
    pub captured: u64,
    /// Frames not captured: the writer fell behind, or the file failed.
    pub lost: u64,
    /// Why the capture ended by itself (a write error).
    pub error: Option<String>,
}

/// A frame on its way to the writer.
struct Record {
    when: SystemTime,
    orig_len: u32,
    data: Vec<u8>,
}

/// The part shared by the stage, the kernel-side reader and the writer.
struct Sink {
    queue: Mutex<Option<SyncSender<Record>>>,
    /// Buffers the writer is done with, for the next frames.
    free: Mutex<Receiver<Vec<u8>>>,
    snap_len: u32,
    captured: AtomicU64,
    lost: AtomicU64,
    error: Mutex<Option<String>>,
    path: PathBuf,
}

impl Sink {
    /// Queues the frame of `len` bytes that `copy` writes into a buffer
    /// (at most the snap length), or counts it lost.
    fn record(&self, len: usize, copy: impl FnOnce(&mut [u8]) -> usize) {
        let queue = crate::lock_or_recover(&self.queue);
        let Some(q) = queue.as_ref() else {
            self.lost.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let mut data = crate::lock_or_recover(&self.free)
            .try_recv()
            .unwrap_or_default();
        data.resize(len.min(self.snap_len as usize), 0);
        let n = copy(&mut data);
        data.truncate(n);
        let r = Record {
            when: SystemTime::now(),
            orig_len: u32::try_from(len).unwrap_or(u32::MAX),
            data,
        };
        match q.try_send(r) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn error(&self) -> Option<String> {
        crate::lock_or_recover(&self.error).clone()
    }

    fn end_with(&self, why: String) {
        crate::guest_log!(
            log::Level::Error,
            "capture to {}: {why}; capture ended",
            self.path.display()
        );
        *crate::lock_or_recover(&self.error) = Some(why);
        *crate::lock_or_recover(&self.queue) = None;
    }
}

/// The pcap file header (the classic format, microseconds).
fn file_header(snap_len: u32) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    h[16..20].copy_from_slice(&snap_len.to_le_bytes());
    h[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

fn record_header(r: &Record) -> [u8; 16] {
    let t = r.when.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&(t.as_secs() as u32).to_le_bytes());
    h[4..8].copy_from_slice(&t.subsec_micros().to_le_bytes());
    h[8..12].copy_from_slice(&(r.data.len() as u32).to_le_bytes());
    h[12..16].copy_from_slice(&r.orig_len.to_le_bytes());
    h
}

/// The writer thread: records to the file, flushed whenever the queue is
/// empty (so the file can be read while the capture runs).
fn write_loop(sink: Arc<Sink>, out: impl Write, rx: Receiver<Record>, free: SyncSender<Vec<u8>>) {
    let mut out = BufWriter::with_capacity(256 << 10, out);
    if let Err(e) = out.write_all(&file_header(sink.snap_len)) {
        sink.end_with(format!("cannot write: {e}"));
    }
    let write = |r: &Record, out: &mut BufWriter<_>| -> std::io::Result<()> {
        out.write_all(&record_header(r))?;
        out.write_all(&r.data)
    };
    loop {
        let r = match rx.try_recv() {
            Ok(r) => r,
            Err(_) => {
                if let Err(e) = out.flush() {
                    sink.end_with(format!("cannot write: {e}"));
                    break;
                }
                match rx.recv() {
                    Ok(r) => r,
                    Err(_) => break, // stopped
                }
            }
        };
        if let Err(e) = write(&r, &mut out) {
            sink.lost.fetch_add(1, Ordering::Relaxed);
            sink.end_with(format!("cannot write: {e}"));
            break;
        }
        sink.captured.fetch_add(1, Ordering::Relaxed);
        let _ = free.try_send(r.data);
    }
    // What was still queued is lost.
    let left = rx.try_iter().count() as u64;
    sink.lost.fetch_add(left, Ordering::Relaxed);
}

/// The stage: frames on rvm's path.
struct CaptureStage(Arc<Sink>);

impl Stage for CaptureStage {
    fn name(&self) -> &str {
        STAGE_NAME
    }

    /// vhost-net's frames are captured from the TAP instead: the stage
    /// does not keep the kernel from taking the queues.
    fn needs_userspace(&self) -> bool {
        false
    }

    fn frame(&mut self, _dir: Direction, frame: &Frame<'_>, _now: Instant) -> Verdict {
        self.0.record(frame.len(), |buf| frame.read(0, buf));
        Verdict::Pass
    }
}

/// An AF_PACKET socket on the TAP, read while the kernel moves the NIC's
/// frames.
struct KernelSide {
    stop: EventFd,
    thread: JoinHandle<()>,
}

fn kernel_side(sink: Arc<Sink>, ifindex: i32, stages: Stages) -> Result<KernelSide, CaptureError> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments; the result is checked
    // and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(CaptureError::Kernel(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = ifindex;
    // SAFETY: bind(2) with a sockaddr_ll of the given size that lives for
    // the call.
    let r = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(CaptureError::Kernel(std::io::Error::last_os_error()));
    }
    // The reader may fall behind the kernel's data path (64 KiB GSO
    // frames, a busy host): a large buffer, past rmem_max when rvm may
    // (CAP_NET_ADMIN); what still overflows is counted (PACKET_STATISTICS).
    let size: libc::c_int = 32 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt(2) with an int that lives for the call.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if r == 0 {
            break;
        }
    }
    let stop =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(CaptureError::Thread)?;
    let stop2 = stop.try_clone().map_err(CaptureError::Thread)?;
    let thread = std::thread::Builder::new()
        .name("capture".into())
        .spawn(move || read_kernel_side(&sink, &sock, &stop2, &stages))
        .map_err(CaptureError::Thread)?;
    Ok(KernelSide { stop, thread })
}

fn read_kernel_side(sink: &Sink, sock: &OwnedFd, stop: &EventFd, stages: &Stages) {
    let mut buf = vec![0u8; 65536 + 64];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: poll(2) on two pollfds that live for the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            sink.lost.fetch_add(kernel_drops(sock), Ordering::Relaxed);
            return;
        }
        // MSG_TRUNC: the frame's whole length, even when the buffer
        // holds less.
        // SAFETY: recv(2) into `buf`, which lives for the call.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        let Ok(len) = usize::try_from(n) else {
            continue;
        };
        // Only while the kernel moves the frames: else the stage saw them.
        if stages.in_kernel() {
            let got = len.min(buf.len());
            sink.record(len, |out| {
                let k = out.len().min(got);
                out[..k].copy_from_slice(&buf[..k]);
                k
            });
        }
    }
}

/// Frames the kernel dropped on the socket for want of room since the
/// last call (PACKET_STATISTICS resets them).
fn kernel_drops(sock: &OwnedFd) -> u64 {
    let mut st = libc::tpacket_stats {
        tp_packets: 0,
        tp_drops: 0,
    };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: getsockopt(2) into a tpacket_stats and its length, both
    // living for the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&mut st as *mut libc::tpacket_stats).cast(),
            &mut len,
        )
    };
    if r == 0 {
        u64::from(st.tp_drops)
    } else {
        0
    }
}

/// A NIC's capture as its owner starts and stops it while the VM runs.
pub struct CaptureControl {
    stages: Stages,
    /// The TAP's interface index, for the kernel-side view (None for a
    /// backend that is no TAP).
    ifindex: Option<i32>,
    /// vhost-net may carry this NIC: the kernel-side view is required.
    vhost_possible: bool,
    running: Mutex<Option<Running>>,
    /// The counters of the last capture, kept after it ended.
    last: Mutex<Option<Arc<Sink>>>,
}

struct Running {
    sink: Arc<Sink>,
    writer: JoinHandle<()>,
    kernel: Option<KernelSide>,
}

impl CaptureControl {
    pub fn new(stages: Stages, ifindex: Option<i32>, vhost_possible: bool) -> Self {
        CaptureControl {
            stages,
            ifindex,
            vhost_possible,
            running: Mutex::new(None),
            last: Mutex::new(None),
        }
    }

    /// Starts capturing to `path` (created or truncated), frames cut at
    /// `snap_len` bytes; a capture already running is stopped first.
    pub fn start(&self, path: &Path, snap_len: u32) -> Result<(), CaptureError> {
        if snap_len < 14 {
            return Err(CaptureError::SnapLen(snap_len));
        }
        self.stop();
        let create = |source| CaptureError::Create {
            path: path.to_path_buf(),
            source,
        };
        let file = File::create(path).map_err(create)?;
        let (tx, rx) = sync_channel(QUEUE);
        let (free_tx, free_rx) = sync_channel(QUEUE);
        let sink = Arc::new(Sink {
            queue: Mutex::new(Some(tx)),
            free: Mutex::new(free_rx),
            snap_len,
            captured: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            error: Mutex::new(None),
            path: path.to_path_buf(),
        });
        let kernel = match self.ifindex.filter(|_| self.vhost_possible) {
            Some(i) => Some(kernel_side(sink.clone(), i, self.stages.clone())?),
            None => None,
        };
        let s = sink.clone();
        let writer = std::thread::Builder::new()
            .name("capture-writer".into())
            .spawn(move || write_loop(s, file, rx, free_tx))
            .map_err(CaptureError::Thread)?;
        if let Err(e) = self.stages.push(Box::new(CaptureStage(sink.clone()))) {
            *crate::lock_or_recover(&sink.queue) = None;
            let _ = writer.join();
            return Err(e.into());
        }
        *crate::lock_or_recover(&self.last) = Some(sink.clone());
        *crate::lock_or_recover(&self.running) = Some(Running {
            sink,
            writer,
            kernel,
        });
        Ok(())
    }

    /// Stops the capture, if one runs: what was queued is written and the
    /// file closed before this returns.
    pub fn stop(&self) {
        let Some(r) = crate::lock_or_recover(&self.running).take() else {
            return;
        };
        self.stages.remove(STAGE_NAME);
        if let Some(k) = r.kernel {
            let _ = k.stop.write(1);
            let _ = k.thread.join();
        }
        *crate::lock_or_recover(&r.sink.queue) = None;
        let _ = r.writer.join();
    }

    pub fn counters(&self) -> CaptureCounters {
        let Some(s) = crate::lock_or_recover(&self.last).clone() else {
            return CaptureCounters::default();
        };
        CaptureCounters {
            path: Some(s.path.clone()),
            captured: s.captured.load(Ordering::Relaxed),
            lost: s.lost.load(Ordering::Relaxed),
            error: s.error(),
        }
    }

    /// Whether a capture runs (it ends by itself on a write error).
    pub fn running(&self) -> bool {
        crate::lock_or_recover(&self.running)
            .as_ref()
            .is_some_and(|r| crate::lock_or_recover(&r.sink.queue).is_some())
    }
}

impl Drop for CaptureControl {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("rvm-capture-{}-{name}", std::process::id()))
    }

    /// The records of a pcap file: (incl_len, orig_len, data).
    fn records(bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let mut out = Vec::new();
        let mut o = 24;
        while o + 16 <= bytes.len() {
            let (incl, orig) = (u32_at(o + 8), u32_at(o + 12));
            out.push((incl, orig, bytes[o + 16..o + 16 + incl as usize].to_vec()));
            o += 16 + incl as usize;
        }
        assert_eq!(o, bytes.len(), "a record cut short");
        out
    }

    #[test]
    fn frames_both_ways_land_in_a_pcap_file_cut_at_the_snap_length() {
        let stages = Stages::new();
        let c = CaptureControl::new(stages.clone(), None, false);
        let path = tmp("snap");
        c.start(&path, 100).unwrap();
        assert!(c.running());
        let big: Vec<u8> = (0..1514).map(|i| i as u8).collect();
        let small = [7u8; 60];
        let now = Instant::now();
        assert_eq!(
            stages.run(Direction::Tx, &Frame::Bytes(&big), 0, now),
            super::super::stage::Outcome::Pass
        );
        assert_eq!(
            stages.run(Direction::Rx, &Frame::Bytes(&small), 0, now),
            super::super::stage::Outcome::Pass
        );
        c.stop();
        assert!(!c.running() && stages.is_empty());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..4], &0xa1b2_c3d4u32.to_le_bytes());
        assert_eq!(
            u32::from_le_bytes(bytes[16..20].try_into().unwrap()),
            100,
            "snap length"
        );
        assert_eq!(
            u32::from_le_bytes(bytes[20..24].try_into().unwrap()),
            1,
            "Ethernet"
        );
        let r = records(&bytes);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].0, r[0].1, &r[0].2[..]), (100, 1514, &big[..100]));
        assert_eq!((r[1].0, r[1].1, &r[1].2[..]), (60, 60, &small[..]));
        let n = c.counters();
        assert_eq!((n.captured, n.lost, n.error), (2, 0, None));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_capture_that_cannot_write_ends_with_one_error_and_counts_what_it_lost() {
        let stages = Stages::new();
        let c = CaptureControl::new(stages.clone(), None, false);
        c.start(Path::new("/dev/full"), DEFAULT_SNAP_LEN).unwrap();
        let f = [1u8; 1000];
        let t = Instant::now();
        // The guest's frames pass whatever the file does.
        for _ in 0..2000 {
            assert_eq!(
                stages.run(Direction::Tx, &Frame::Bytes(&f), 0, t),
                super::super::stage::Outcome::Pass
            );
        }
        while c.running() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!c.running(), "the capture should have ended");
        for _ in 0..10 {
            stages.run(Direction::Rx, &Frame::Bytes(&f), 0, Instant::now());
        }
        let n = c.counters();
        assert!(
            n.error
                .as_deref()
                .is_some_and(|e| e.contains("No space left")),
            "{n:?}"
        );
        assert_eq!(n.captured + n.lost, 2010, "{n:?}");
        assert!(n.lost >= 10);
        c.stop();
    }

    #[test]
    fn bad_paths_and_snap_lengths_are_refused_before_anything_runs() {
        let stages = Stages::new();
        let c = CaptureControl::new(stages.clone(), None, false);
        let e = c
            .start(Path::new("/nonexistent/dir/x.pcap"), 65535)
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir/x.pcap"), "{e}");
        assert!(c
            .start(&tmp("short"), 10)
            .unwrap_err()
            .to_string()
            .contains("at least 14"));
        assert!(stages.is_empty() && !c.running());
    }

    #[test]
    fn the_stage_lets_vhost_net_take_the_frames() {
        let stages = Stages::new();
        let c = CaptureControl::new(stages.clone(), None, false);
        let path = tmp("vhost");
        c.start(&path, 65535).unwrap();
        assert!(stages.needs_userspace().is_none());
        stages.enter_kernel().unwrap();
        c.stop();
        let _ = std::fs::remove_file(&path);
    }
}
