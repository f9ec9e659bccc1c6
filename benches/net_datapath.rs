//! Data-path benchmark, no guest: the virtio-net device behind its
//! virtio-pci transport, driven by the simulated driver in process, moving
//! frames to and from a real TAP in a private network namespace; against
//! the raw rate of writev/readv on the same TAP with the same frames.
//!
//! `cargo bench --bench net_datapath` (root: it unshares a network
//! namespace for itself; it needs no KVM). RVM_BENCH_SECS sets the timed
//! seconds per measurement (default 2). `-- limit` adds (only when asked)
//! the accuracy of TX rate limits: 16 Mbit/s, 100 Mbit/s and 1 Gbit/s for
//! RVM_LIMIT_SECS (default 10) each. `-- egress` (also in the default
//! run) times TX with and without the egress policy's userspace stage.
//!
//! What is timed, in rounds that alternate raw and device on the same TAP:
//! - TX: the driver streams N frames through a 256-entry ring as a busy
//!   Linux guest does (reposting as chains come back, kicking only when the
//!   device asks via EVENT_IDX), until the device has written all N to the
//!   TAP. Raw: N writev calls of the same frames from the same guest
//!   buffers, in the same pieces.
//! - RX: N frames wait in the TAP (put there beforehand by an AF_PACKET
//!   socket on it); the driver streams buffers until the device has read
//!   all N into them. Raw: N readv calls into the same guest buffers.
//!
//! Two figures each: the wall-clock rate (which also pays for the
//! simulated driver and for waking the worker), and the CPU time per frame
//! of the thread doing the work (the raw loop, or rvm's NIC worker thread,
//! from /proc/self/task/*/schedstat), which is the data path's own cost.
//!
//! Frames are Ethernet/IPv4/TCP addressed to a MAC nobody has, so the host
//! stack drops what the TAP delivers at once. A 1514-byte frame travels in
//! one descriptor (TX) or one 2 KiB merged buffer (RX); a 64 KiB TSO frame
//! (vnet header with GSO TCPv4) in one indirect table of 4 KiB pieces (TX)
//! or 16 merged 4 KiB buffers (RX), as a Linux guest sends and posts them.
//! The driver runs on its own thread, as a guest's vCPU would.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rvm::devices::virtio_net::features::*;
use rvm::devices::virtio_net::{NetParams, VirtioNet, HDR_LEN};
use rvm::net::backend::{offload, NetBackend};
use rvm::net::rate_limit::{Bucket, DirectionLimits, RateLimiter, RateLimits};
use rvm::net::stage::Stages;
use rvm::net::tap::Tap;
use rvm::virtio::features::{RING_EVENT_IDX, RING_INDIRECT_DESC, VERSION_1};
use rvm::virtio::sim::{SimDriver, DATA_START, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const TAP_NAME: &str = "rvmbench0";
/// The NIC worker thread's name.
const WORKER: &str = "net-bench";
const RXQ: usize = 0;
const TXQ: usize = 1;
const QSIZE: u16 = 256;
/// Where the RX buffers and the TX indirect table live in the simulated
/// guest's memory (the TX frame itself is at DATA_START).
const RX_BUFS: u64 = DATA_START + (8 << 20);
const TX_TABLE: u64 = DATA_START + (4 << 20);

#[derive(Clone, Copy)]
enum Shape {
    Mtu,
    Tso,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Mtu => "1514-byte frames",
            Shape::Tso => "64 KiB TSO frames",
        }
    }
    fn key(self) -> &'static str {
        match self {
            Shape::Mtu => "1514",
            Shape::Tso => "tso",
        }
    }
    /// Ethernet frame length, without the vnet header.
    fn frame_len(self) -> usize {
        match self {
            Shape::Mtu => 1514,
            // 45 segments of 1448 bytes: the frame stays under the TAP's
            // gso_max_size (64 KiB), as a real TSO frame does.
            Shape::Tso => 54 + 45 * 1448,
        }
    }
    /// TX descriptor buffers of one chain (header + frame, split in 4 KiB).
    fn tx_bufs(self, at: u64) -> Vec<(u64, u32)> {
        let total = (HDR_LEN + self.frame_len()) as u64;
        match self {
            Shape::Mtu => vec![(at, total as u32)],
            Shape::Tso => (0..total)
                .step_by(4096)
                .map(|o| (at + o, (total - o).min(4096) as u32))
                .collect(),
        }
    }
    fn rx_buf_len(self) -> u32 {
        match self {
            Shape::Mtu => 2048,
            Shape::Tso => 4096,
        }
    }
    /// Frames per timed round (the TAP queues this many for RX).
    fn round(self) -> usize {
        match self {
            Shape::Mtu => 2048,
            Shape::Tso => 512,
        }
    }
}

/// virtio_net_hdr_v1 (12 bytes) followed by an Ethernet/IPv4/TCP frame.
fn packet(shape: Shape) -> Vec<u8> {
    let len = shape.frame_len();
    let mut p = vec![0u8; HDR_LEN + len];
    if let Shape::Tso = shape {
        p[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
        p[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        p[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        p[4..6].copy_from_slice(&1448u16.to_le_bytes()); // gso_size
        p[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        p[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
    }
    let f = &mut p[HDR_LEN..];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]); // nobody's MAC
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((len - 14) as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 1]);
    let sum = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x10; // ACK
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

fn check(what: &str, r: libc::c_int) {
    if r < 0 {
        panic!("{what}: {}", std::io::Error::last_os_error());
    }
}

/// A private network namespace for this process: the TAP and everything
/// it delivers stay in it.
fn enter_private_netns() {
    // SAFETY: unshare takes no pointers; we are still single-threaded.
    check("unshare(CLONE_NEWNET) (run as root)", unsafe {
        libc::unshare(libc::CLONE_NEWNET)
    });
    // No IPv6 autoconfiguration chatter on the TAP.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
}

/// An AF_PACKET socket on the TAP: what it sends comes out of the TAP's fd,
/// GSO frames included (PACKET_VNET_HDR takes a 10-byte virtio_net_hdr).
fn injector(ifindex: i32) -> OwnedFd {
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    check("AF_PACKET socket", fd);
    // SAFETY: fd was just created and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: PACKET_VNET_HDR reads one int from a live local.
    check("PACKET_VNET_HDR", unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    });
    // SAFETY: sockaddr_ll is plain data; zero is a valid start.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_ifindex = ifindex;
    // SAFETY: bind reads a sockaddr_ll of the size given.
    check("bind AF_PACKET", unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    });
    fd
}

fn inject(sock: &OwnedFd, pkt: &[u8], n: usize) {
    // The socket's virtio_net_hdr is the first 10 bytes of ours.
    let mut p = pkt[..10].to_vec();
    p.extend_from_slice(&pkt[HDR_LEN..]);
    for _ in 0..n {
        // SAFETY: p is a live buffer of the given length.
        let r = unsafe { libc::send(sock.as_raw_fd(), p.as_ptr().cast(), p.len(), 0) };
        check("send on the TAP", r as i32);
    }
}

/// Reads and discards whatever waits in the TAP.
fn drain(tap: &Tap) -> usize {
    let mut buf = vec![0u8; 70_000];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let mut n = 0;
    // SAFETY: `buf` lives, untouched, until the loop ends.
    while unsafe { tap.readv(&iov) }.is_ok() {
        n += 1;
    }
    n
}

fn open_tap() -> Arc<Tap> {
    let tap = Tap::open(TAP_NAME, true).expect("TAP");
    tap.set_up().expect("TAP up");
    // A TAP queues up to txqueuelen frames for its reader: room for a round.
    let ok = std::process::Command::new("ip")
        .args(["link", "set", TAP_NAME, "txqueuelen", "4096"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip link set {TAP_NAME} txqueuelen 4096 failed");
    tap.configure_offloads(HDR_LEN, offload::CSUM | offload::TSO4 | offload::TSO6)
        .expect("offloads");
    Arc::new(tap)
}

#[derive(Default)]
struct Figures {
    frames: u64,
    bytes: u64,
    /// Wall-clock time of the rounds.
    time: Duration,
    /// CPU time of the thread doing the work (the raw loop, or the NIC's
    /// worker thread) during the rounds.
    cpu: Duration,
}

impl Figures {
    fn add(&mut self, shape: Shape, frames: usize, (time, cpu): (Duration, Duration)) {
        self.frames += frames as u64;
        self.bytes += (frames * shape.frame_len()) as u64;
        self.time += time;
        self.cpu += cpu;
    }
    fn ns_per_frame(&self) -> f64 {
        self.cpu.as_nanos() as f64 / self.frames as f64
    }
    fn fps(&self) -> f64 {
        self.frames as f64 / self.time.as_secs_f64()
    }
    fn gbps(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.time.as_secs_f64() / 1e9
    }
}

/// CPU time of the calling thread.
fn own_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    check("clock_gettime", unsafe {
        libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts)
    });
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of the NIC's worker threads (named after NetParams::name), from
/// /proc/self/task/*/schedstat.
fn worker_cpu() -> Duration {
    let mut ns = 0;
    for task in std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // Pair k > 0's thread is WORKER.qk.
        if comm.trim().starts_with(WORKER) {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            ns += stat
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}

fn budget() -> Duration {
    let secs = std::env::var("RVM_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    Duration::from_secs_f64(secs)
}

/// Host pointers to guest buffers: raw calls use the very buffers the
/// device uses, so both touch the same memory.
fn host_iov(drv: &SimDriver, bufs: &[(u64, u32)]) -> Vec<libc::iovec> {
    bufs.iter()
        .map(|&(gpa, len)| {
            let slice = drv
                .mem
                .get_slice(GuestAddress(gpa), len as usize)
                .expect("buffer in guest memory");
            libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: len as usize,
            }
        })
        .collect()
}

/// N writev calls of the frame as the TX chain lays it out.
fn raw_tx_round(tap: &Tap, shape: Shape, drv: &SimDriver) -> (Duration, Duration) {
    let iov = host_iov(drv, &shape.tx_bufs(DATA_START));
    let want = HDR_LEN + shape.frame_len();
    let (t, c) = (Instant::now(), own_cpu());
    for _ in 0..shape.round() {
        // SAFETY: host_iov points into the driver's guest RAM, mapped for
        // the whole round.
        let n = unsafe { tap.writev(&iov) }.expect("raw writev");
        assert_eq!(n, want, "short write");
    }
    (t.elapsed(), own_cpu() - c)
}

/// N readv calls into the RX buffers in ring order, as many per frame as
/// the frame needs (the device itself offers its whole pool).
fn raw_rx_round(
    tap: &Tap,
    shape: Shape,
    pkt: &[u8],
    sock: &OwnedFd,
    drv: &SimDriver,
) -> (Duration, Duration) {
    let len = shape.rx_buf_len();
    let per_frame = pkt.len().div_ceil(len as usize) as u64;
    let ring: Vec<_> = (0..u64::from(QSIZE))
        .map(|i| (RX_BUFS + i * u64::from(len), len))
        .collect();
    let ring = host_iov(drv, &ring);
    inject(sock, pkt, shape.round());
    let (t, c) = (Instant::now(), own_cpu());
    let mut next = 0;
    for _ in 0..shape.round() {
        if next + per_frame as usize > ring.len() {
            next = 0;
        }
        let iov = &ring[next..next + per_frame as usize];
        next += per_frame as usize;
        // SAFETY: the ring's iovecs point into the driver's guest RAM,
        // mapped for the whole round and read by nothing meanwhile.
        let n = unsafe { tap.readv(iov) }.expect("raw readv: a frame should be waiting");
        assert_eq!(n, pkt.len(), "frame of the wrong size");
    }
    (t.elapsed(), own_cpu() - c)
}

/// What a Linux guest's virtio_net driver accepts from rvm.
const FEATURES: u64 = VERSION_1
    | RING_EVENT_IDX
    | RING_INDIRECT_DESC
    | MAC
    | STATUS
    | MTU
    | MRG_RXBUF
    | CTRL_VQ
    | CSUM
    | GUEST_CSUM
    | HOST_TSO4
    | HOST_TSO6
    | GUEST_TSO4
    | GUEST_TSO6;

/// The device with the features a Linux guest takes, initialised.
fn device(tap: &Arc<Tap>) -> (SimDriver, Arc<rvm::net::NicStats>) {
    let (drv, stats, _) = device_with_stages(tap);
    (drv, stats)
}

/// [`device`], with a handle on its stages.
fn device_with_stages(tap: &Arc<Tap>) -> (SimDriver, Arc<rvm::net::NicStats>, Stages) {
    let params = NetParams {
        mac: [0x52, 0x54, 0, 0xbe, 0x9c, 0x01],
        mtu: 1500,
        name: WORKER.into(),
    };
    let net = VirtioNet::new(params, tap.clone(), None);
    let stats = net.stats();
    let stages = net.stages();
    let mut drv = SimDriver::new(Box::new(net), 64);
    let s = drv.init(FEATURES, &[QSIZE, QSIZE, 64]);
    assert_ne!(s & rvm::virtio::status::DRIVER_OK, 0, "driver init failed");
    (drv, stats, stages)
}

/// A busy guest's driver loop on queue `q`, whose descriptor table was
/// written beforehand (one chain per slot, as a driver reusing its
/// buffers has): keeps the ring full with chains k = 0..limit, reaps used
/// chains, kicks only when the device's avail_event asks for it, until
/// `done(chains, bytes)`. Returns the time from the first kick to then,
/// the worker thread's CPU time in it, and the used bytes.
fn stream(
    drv: &mut SimDriver,
    q: usize,
    limit: usize,
    done: impl Fn(usize, u64) -> bool,
) -> (Duration, Duration, u64) {
    let post = |_: &mut SimDriver, k: usize| (k % usize::from(QSIZE)) as u16;
    let mem = drv.mem.clone();
    let size = drv.queues[q].size;
    let avail_event = GuestAddress(drv.queues[q].used + 4 + 8 * u64::from(size));
    let mut posted = 0;
    while posted < limit.min(usize::from(size)) {
        let head = post(drv, posted);
        drv.queues[q].stage(&mem, head);
        posted += 1;
    }
    let (mut reaped, mut bytes) = (0, 0u64);
    let cpu0 = worker_cpu();
    let mut spins = 0u64;
    let t = Instant::now();
    let mut progress = t;
    let mut flushed = drv.queues[q].avail_idx();
    drv.queues[q].flush(&mem);
    drv.kick(q as u16);
    while !done(reaped, bytes) {
        let mut more = false;
        while let Some((_, len)) = drv.queues[q].pop_used(&mem) {
            reaped += 1;
            progress = Instant::now();
            bytes += u64::from(len);
            if posted < limit {
                let head = post(drv, posted);
                drv.queues[q].stage(&mem, head);
                posted += 1;
                more = true;
            }
        }
        if more {
            let new = drv.queues[q].avail_idx();
            drv.queues[q].flush(&mem);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let event: u16 = mem.read_obj(avail_event).expect("avail_event");
            // vring_need_event: did the index pass the one the device named?
            if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(flushed) {
                drv.kick(q as u16);
            }
            flushed = new;
        } else {
            spins += 1;
            assert!(
                !spins.is_multiple_of(4096) || progress.elapsed() < Duration::from_secs(10),
                "the device stalled: {reaped} chains and {bytes} bytes used, {posted} posted"
            );
            std::hint::spin_loop();
        }
    }
    (t.elapsed(), worker_cpu() - cpu0, bytes)
}

fn device_tx_round(drv: &mut SimDriver, shape: Shape) -> (Duration, Duration) {
    let n = shape.round();
    let (took, cpu, _) = stream(drv, TXQ, n, |k, _| k == n);
    (took, cpu)
}

/// Every TX slot holds the frame: in one descriptor, or (TSO) in one
/// indirect table of 4 KiB pieces.
fn write_tx_ring(drv: &mut SimDriver, shape: Shape) {
    let bufs = shape.tx_bufs(DATA_START);
    for (i, &(addr, len)) in bufs.iter().enumerate() {
        let at = TX_TABLE + 16 * i as u64;
        let flags = if i + 1 < bufs.len() { DESC_F_NEXT } else { 0 };
        drv.mem.write_obj(addr, GuestAddress(at)).unwrap();
        drv.mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        drv.mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        drv.mem
            .write_obj(i as u16 + 1, GuestAddress(at + 14))
            .unwrap();
    }
    let slot = match shape {
        Shape::Mtu => (bufs[0].0, bufs[0].1, 0, 0),
        Shape::Tso => (TX_TABLE, (16 * bufs.len()) as u32, DESC_F_INDIRECT, 0),
    };
    let mem = drv.mem.clone();
    drv.queues[TXQ].write_descs(&mem, &vec![slot; usize::from(QSIZE)]);
}

/// One RX round, then a device reset (so that no buffer of this round
/// takes frames meant for a raw round): the frames wait in the
/// TAP, the driver streams buffers, with room for the largest frame to
/// spare as a Linux guest always has, until every frame arrived.
fn device_rx_round(
    drv: &mut SimDriver,
    shape: Shape,
    pkt: &[u8],
    sock: &OwnedFd,
) -> (Duration, Duration) {
    let len = shape.rx_buf_len();
    let spare = (HDR_LEN as u32 + 65_550).div_ceil(len) as usize;
    let want = (shape.round() * pkt.len()) as u64;
    inject(sock, pkt, shape.round());
    let limit = shape.round() * pkt.len().div_ceil(len as usize) + spare;
    let (took, cpu, bytes) = stream(drv, RXQ, limit, |_, b| b >= want);
    assert_eq!(bytes, want, "bytes read");
    // Reset and start again: the spare buffers must not take raw's frames.
    let s = drv.init(FEATURES, &[QSIZE, QSIZE, 64]);
    assert_ne!(
        s & rvm::virtio::status::DRIVER_OK,
        0,
        "driver re-init failed"
    );
    write_rx_ring(drv, shape);
    (took, cpu)
}

/// Every RX slot holds its own buffer.
fn write_rx_ring(drv: &mut SimDriver, shape: Shape) {
    let len = shape.rx_buf_len();
    let mem = drv.mem.clone();
    let descs: Vec<_> = (0..u64::from(QSIZE))
        .map(|i| (RX_BUFS + i * u64::from(len), len, DESC_F_WRITE, 0))
        .collect();
    drv.queues[RXQ].write_descs(&mem, &descs);
}

/// Alternating raw and device rounds until each has `budget()` of time.
fn measure(tap: &Arc<Tap>, shape: Shape, dir: &str) -> (Figures, Figures) {
    let pkt = packet(shape);
    let sock = injector(tap.ifindex().expect("ifindex"));
    let (mut drv, stats) = device(tap);
    drv.mem
        .write_slice(&pkt, GuestAddress(DATA_START))
        .expect("frame in guest memory");
    write_tx_ring(&mut drv, shape);
    write_rx_ring(&mut drv, shape);
    let (mut raw, mut dev) = (Figures::default(), Figures::default());
    drain(tap);
    while raw.time < budget() || dev.time < budget() {
        let n = shape.round();
        if dir == "TX" {
            raw.add(shape, n, raw_tx_round(tap, shape, &drv));
            dev.add(shape, n, device_tx_round(&mut drv, shape));
        } else {
            raw.add(shape, n, raw_rx_round(tap, shape, &pkt, &sock, &drv));
            dev.add(shape, n, device_rx_round(&mut drv, shape, &pkt, &sock));
        }
    }
    let c = stats.snapshot();
    let (frames, lost) = if dir == "TX" {
        (c.tx_frames, c.tx_dropped + c.malformed)
    } else {
        (c.rx_frames, c.rx_dropped + c.malformed)
    };
    assert_eq!(frames, dev.frames, "frames the device moved");
    assert_eq!(lost, 0, "frames the device dropped or refused");
    (raw, dev)
}

/// TX under a rate limit of `bits` per second for RVM_LIMIT_SECS (default
/// 10) of streaming: the rate the TAP got (bits of frames as the guest
/// sends them, no vnet header) and the throttle episodes.
fn measure_limit(tap: &Arc<Tap>, shape: Shape, bits: u64) -> (f64, u64) {
    let secs = std::env::var("RVM_LIMIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let (mut drv, stats, stages) = device_with_stages(tap);
    let limiter = RateLimiter::new(RateLimits {
        tx: DirectionLimits {
            bandwidth: Some(Bucket::bandwidth(bits, None).expect("a valid rate")),
            ops: None,
        },
        ..RateLimits::default()
    });
    stages.push(limiter.stage()).expect("the stage");
    drv.mem
        .write_slice(&packet(shape), GuestAddress(DATA_START))
        .expect("frame in guest memory");
    write_tx_ring(&mut drv, shape);
    let span = Duration::from_secs_f64(secs);
    let t = Instant::now();
    stream(&mut drv, TXQ, usize::MAX, |_, _| t.elapsed() >= span);
    let took = t.elapsed().as_secs_f64();
    let c = stats.snapshot();
    assert_eq!(c.tx_dropped + c.malformed, 0, "frames the device dropped");
    (c.tx_bytes as f64 * 8.0 / took, limiter.throttled().tx)
}

/// TX of `shape` frames, with the egress policy's userspace stage on the
/// NIC (`Some`: eight rules that do not match before the one that allows
/// the frames' flow, under `egress=deny`) or without (`None`).
fn measure_egress(tap: &Arc<Tap>, shape: Shape, policy: Option<&[&str]>) -> Figures {
    use rvm::net::egress::stage::{EgressStage, Shared};
    use rvm::net::egress::{Action, EgressDefault, EgressPolicy};
    let (mut drv, stats, stages) = device_with_stages(tap);
    if let Some(rules) = policy {
        let mut p = EgressPolicy::new(EgressDefault::Deny);
        for r in rules {
            let (action, rule) = r.split_once('=').expect("allow=R or deny=R");
            let action = if action == "allow" {
                Action::Allow
            } else {
                Action::Deny
            };
            p = p.rule(action, rule).expect("a valid rule");
        }
        let stage = EgressStage::new(Shared::new(p), stages.injector().clone());
        stages.push(Box::new(stage)).expect("the stage");
    }
    drv.mem
        .write_slice(&packet(shape), GuestAddress(DATA_START))
        .expect("frame in guest memory");
    write_tx_ring(&mut drv, shape);
    let mut f = Figures::default();
    drain(tap);
    while f.time < budget() {
        f.add(shape, shape.round(), device_tx_round(&mut drv, shape));
        drain(tap);
    }
    let c = stats.snapshot();
    assert_eq!(c.tx_frames, f.frames, "frames the device moved");
    assert_eq!(c.tx_dropped, 0, "the policy refused the frames");
    f
}

/// TX of 1514-byte frames on `pairs` queue pairs at once (a worker thread
/// each, one multi-queue TAP), the driver feeding every TX queue in turn
/// from one thread: frames/s and CPU per frame of all workers.
fn measure_pairs(pairs: usize) -> Figures {
    let shape = Shape::Mtu;
    let name = format!("rvmbench{pairs}");
    let taps = Tap::open_queues(&name, true, pairs).expect("multi-queue TAP");
    taps[0].set_up().expect("TAP up");
    let backends: Vec<Arc<dyn NetBackend>> = taps.into_iter().map(|t| Arc::new(t) as _).collect();
    let params = NetParams {
        mac: [0x52, 0x54, 0, 0xbe, 0x9c, 0x02],
        mtu: 1500,
        name: WORKER.into(),
    };
    let net = VirtioNet::with_pairs(params, backends, Vec::new());
    let mut drv = SimDriver::new(Box::new(net), 64);
    let mut sizes = vec![QSIZE; 2 * pairs];
    sizes.push(64);
    let mq = if pairs > 1 { MQ } else { 0 };
    let st = drv.init(FEATURES | CTRL_VQ | mq, &sizes);
    assert_ne!(st & rvm::virtio::status::DRIVER_OK, 0, "driver init failed");
    if pairs > 1 {
        pairs_set(&mut drv, 2 * pairs, pairs as u16);
    }
    let pkt = packet(shape);
    drv.mem
        .write_slice(&pkt, GuestAddress(DATA_START))
        .expect("frame in guest memory");
    let txqs: Vec<usize> = (0..pairs).map(|k| 2 * k + 1).collect();
    for &q in &txqs {
        let mem = drv.mem.clone();
        let bufs = shape.tx_bufs(DATA_START);
        drv.queues[q].write_descs(
            &mem,
            &vec![(bufs[0].0, bufs[0].1, 0, 0); usize::from(QSIZE)],
        );
    }
    let mut f = Figures::default();
    // The same frames in all: `round` per round, spread over the pairs.
    let per_queue = shape.round() / pairs;
    while f.time < budget() {
        let (took, cpu) = stream_queues(&mut drv, &txqs, per_queue);
        f.add(shape, per_queue * pairs, (took, cpu));
    }
    f
}

/// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET `n` on control queue `c`.
fn pairs_set(drv: &mut SimDriver, c: usize, n: u16) {
    let mem = drv.mem.clone();
    let at = DATA_START + (12 << 20);
    mem.write_slice(&[4, 0], GuestAddress(at)).unwrap();
    mem.write_slice(&n.to_le_bytes(), GuestAddress(at + 16))
        .unwrap();
    let q = &mut drv.queues[c];
    let first = q.write_descs(&mem, &[]);
    let head = q.write_descs(
        &mem,
        &[
            (at, 2, DESC_F_NEXT, first + 1),
            (at + 16, 2, DESC_F_NEXT, first + 2),
            (at + 32, 1, DESC_F_WRITE, 0),
        ],
    );
    q.publish(&mem, head);
    drv.kick(c as u16);
    drv.queues[c]
        .wait_used(&mem, Duration::from_secs(5))
        .expect("VQ_PAIRS_SET answered");
    let ack: u8 = mem.read_obj(GuestAddress(at + 32)).unwrap();
    assert_eq!(ack, 0, "VQ_PAIRS_SET {n} refused");
}

/// The busy driver of [`stream`] on several TX queues at once, in turn:
/// `n` chains each. Returns the wall time and the workers' CPU time.
fn stream_queues(drv: &mut SimDriver, qs: &[usize], n: usize) -> (Duration, Duration) {
    let mem = drv.mem.clone();
    let mut posted = vec![0usize; qs.len()];
    let mut reaped = vec![0usize; qs.len()];
    let mut flushed = vec![0u16; qs.len()];
    for (i, &q) in qs.iter().enumerate() {
        while posted[i] < n.min(usize::from(QSIZE)) {
            let head = (posted[i] % usize::from(QSIZE)) as u16;
            drv.queues[q].stage(&mem, head);
            posted[i] += 1;
        }
    }
    let cpu0 = worker_cpu();
    let t = Instant::now();
    for (i, &q) in qs.iter().enumerate() {
        flushed[i] = drv.queues[q].avail_idx();
        drv.queues[q].flush(&mem);
        drv.kick(q as u16);
    }
    while reaped.iter().any(|&r| r < n) {
        for (i, &q) in qs.iter().enumerate() {
            let mut more = false;
            while drv.queues[q].pop_used(&mem).is_some() {
                reaped[i] += 1;
                if posted[i] < n {
                    let head = (posted[i] % usize::from(QSIZE)) as u16;
                    drv.queues[q].stage(&mem, head);
                    posted[i] += 1;
                    more = true;
                }
            }
            if more {
                let size = drv.queues[q].size;
                let avail_event = GuestAddress(drv.queues[q].used + 4 + 8 * u64::from(size));
                let new = drv.queues[q].avail_idx();
                drv.queues[q].flush(&mem);
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                let event: u16 = mem.read_obj(avail_event).expect("avail_event");
                if new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(flushed[i]) {
                    drv.kick(q as u16);
                }
                flushed[i] = new;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the device stalled: {reaped:?} of {n} used"
        );
        std::hint::spin_loop();
    }
    (t.elapsed(), worker_cpu() - cpu0)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs us without --bench: time nothing.
        println!(
            "data-path benchmark: not run under cargo test; run `cargo bench --bench net_datapath`"
        );
        return;
    }
    enter_private_netns();
    let tap = open_tap();
    println!(
        "virtio-net data path vs raw readv/writev on one TAP ({} s timed per figure)\n",
        budget().as_secs_f64()
    );
    println!(
        "{:<3} {:<17} | {:>12} {:>8} {:>12} {:>8} {:>6} | {:>8} {:>8} {:>6}",
        "dir",
        "frames",
        "raw frame/s",
        "raw Gb/s",
        "rvm frame/s",
        "rvm Gb/s",
        "ratio",
        "raw ns",
        "rvm ns",
        "ratio"
    );
    // Free arguments pick rows: "tx", "rx", "1514", "tso", "tx-tso"...
    let picks: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .map(|a| a.to_lowercase())
        .collect();
    for shape in [Shape::Mtu, Shape::Tso] {
        for dir in ["TX", "RX"] {
            let key = format!("{}-{}", dir.to_lowercase(), shape.key());
            if !picks.is_empty() && !picks.iter().any(|p| key.contains(p.as_str())) {
                continue;
            }
            let (raw, dev) = measure(&tap, shape, dir);
            println!(
                "{:<3} {:<17} | {:>12.0} {:>8.2} {:>12.0} {:>8.2} {:>5.1}% | {:>8.0} {:>8.0} {:>5.1}%",
                dir,
                shape.name(),
                raw.fps(),
                raw.gbps(),
                dev.fps(),
                dev.gbps(),
                100.0 * dev.fps() / raw.fps(),
                raw.ns_per_frame(),
                dev.ns_per_frame(),
                100.0 * raw.ns_per_frame() / dev.ns_per_frame()
            );
        }
    }
    if picks.is_empty() || picks.iter().any(|p| p == "pairs") {
        // One pair, then two on two worker threads: does TX scale?
        let one = measure_pairs(1);
        let two = measure_pairs(2);
        println!(
            "\nTX 1514-byte frames, one multi-queue TAP: 1 pair {:.0} frame/s ({:.0} ns CPU/frame), 2 pairs {:.0} frame/s ({:.0} ns CPU/frame): {:.2}x",
            one.fps(),
            one.ns_per_frame(),
            two.fps(),
            two.ns_per_frame(),
            two.fps() / one.fps()
        );
    }
    if picks.is_empty() || picks.iter().any(|p| p == "egress") {
        // The policy's stage: the first frame of the flow is judged, the
        // rest find it in the flow table.
        let rules = [
            "deny=192.0.2.0/24",
            "deny=198.51.100.0/24",
            "deny=203.0.113.0/24",
            "deny=10.9.0.0/16",
            "deny=10.0.0.1:22/tcp",
            "deny=10.0.0.1:25",
            "deny=2001:db8::/32",
            "deny=fd00::/8",
            "allow=10.0.0.1:5001/tcp",
        ];
        println!();
        for shape in [Shape::Mtu, Shape::Tso] {
            let plain = measure_egress(&tap, shape, None);
            let policed = measure_egress(&tap, shape, Some(&rules));
            println!(
                "TX {:<17} with the egress stage (9 rules): {:.0} frame/s, {:.0} ns CPU/frame; without: {:.0} frame/s, {:.0} ns CPU/frame (+{:.0} ns per frame)",
                shape.name(),
                policed.fps(),
                policed.ns_per_frame(),
                plain.fps(),
                plain.ns_per_frame(),
                policed.ns_per_frame() - plain.ns_per_frame()
            );
        }
    }
    if picks.iter().any(|p| p == "limit") {
        // Not by default: 10 s per figure.
        println!();
        for (bits, shape) in [
            (16_000_000, Shape::Mtu),
            (100_000_000, Shape::Mtu),
            (1_000_000_000, Shape::Mtu),
            (1_000_000_000, Shape::Tso),
        ] {
            let (got, throttled) = measure_limit(&tap, shape, bits);
            println!(
                "TX limited to {:>5} Mbit/s, {:<17}: {:>8.2} Mbit/s ({:.1}% of the limit), throttled {throttled} times",
                bits / 1_000_000,
                shape.name(),
                got / 1e6,
                100.0 * got / bits as f64
            );
        }
    }
    println!(
        "\nframe/s and Gb/s: wall clock, the device fed by a simulated driver on another thread."
    );
    println!("ns: CPU time per frame of the thread doing the work (raw loop; rvm's NIC worker).");
}
