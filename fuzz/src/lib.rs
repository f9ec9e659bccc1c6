//! What the fuzz targets share: guest addresses a fuzzer can aim, and a
//! virtio-net NIC behind its PCI transport whose worker runs on the
//! fuzzer's thread (rvm's `fuzzing` feature), so an input always does the
//! same thing and a crash reproduces.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use arbitrary::Arbitrary;
use rvm::devices::test_backend::{fake_tap, peer_try_send, FakeTap};
use rvm::devices::virtio_net::fuzzing::{Passes, SyncNet};
use rvm::devices::virtio_net::{features, NetParams, VirtioNet};
use rvm::net::backend::NetBackend;
use rvm::net::stage::{Direction, Frame as StageFrame, Stage, Verdict};
use rvm::net::NicStats;
use rvm::virtio::features::VERSION_1;
use rvm::virtio::sim::{SimDriver, DATA_START};
use rvm::vmm::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory of the virtio rigs. Small, so that a random address has
/// a fair chance of landing in it; the simulated driver's rings start at
/// 1 MiB and its data area at 4 MiB.
pub const VIRTIO_MEM_MIB: u64 = 6;
const RINGS_START: u64 = 0x10_0000;

/// The biggest frame the host side sends: a 64 KiB GSO frame with its
/// Ethernet and virtio-net headers, and a little more to overflow.
pub const MAX_HOST_FRAME: usize = 65_550 + 12 + 64;

/// A guest-physical address as a hostile driver would pick it: mostly
/// where something lives, sometimes at the edge of memory, sometimes
/// anywhere.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Addr {
    /// In the data area, where buffers and indirect tables go.
    Data(u32),
    /// In the area of the rings: buffers overlapping rings and tables.
    Rings(u32),
    /// Just below the end of memory: buffers that run past it.
    End(u16),
    Raw(u64),
}

impl Addr {
    /// The address in a memory of `mem_size` bytes whose data area
    /// starts at `data` and rings at `rings`.
    pub fn resolve(self, mem_size: u64, data: u64, rings: u64) -> u64 {
        match self {
            Addr::Data(x) => data + u64::from(x) % (mem_size - data),
            Addr::Rings(x) => rings + u64::from(x) % 0x4_0000,
            Addr::End(x) => mem_size.wrapping_sub(u64::from(x)),
            Addr::Raw(x) => x,
        }
    }
}

/// A buffer length: short ones are the interesting ones.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum Len {
    Small(u8),
    Medium(u16),
    Raw(u32),
}

impl Len {
    pub fn get(self) -> u32 {
        match self {
            Len::Small(x) => u32::from(x),
            Len::Medium(x) => u32::from(x),
            Len::Raw(x) => x,
        }
    }
}

/// One split-virtqueue descriptor, every field the driver's to choose.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Desc {
    pub addr: Addr,
    pub len: Len,
    /// NEXT, WRITE, INDIRECT and whatever else.
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    pub fn bytes(&self, mem_size: u64) -> [u8; 16] {
        let mut b = [0u8; 16];
        let addr = self.addr.resolve(mem_size, DATA_START, RINGS_START);
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.get().to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// What the driver negotiates and how big it makes its queues.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub struct Setup {
    /// Masked by what the device offers; VERSION_1 is always accepted
    /// (the transport refuses a driver without it).
    pub features: u64,
    /// log2 of each queue's size (RX, TX, control), capped at its maximum.
    pub size_log2: [u8; 3],
    /// The TAP has a virtio-net header (offloads offered).
    pub vnet: bool,
    /// The verdicts of a stage on the NIC's data path, in turn (no stage
    /// when None): see [`ScriptedStage`].
    pub stage: Option<[u8; 8]>,
    /// Queue pairs beyond the first (modulo 3): with more than one the
    /// device offers MQ, and the driver's VQ_PAIRS_SET commands (on the
    /// control queue) turn the other pairs' backends on and off.
    pub more_pairs: u8,
}

/// A stage whose verdicts the fuzzer picks, one per frame in turn: pass,
/// drop, or hold until now (the next pass asks again), so that drops and
/// held frames meet hostile rings, resets and bus-mastering changes. It
/// reads a slice of each frame, as a capture or policy stage would.
pub struct ScriptedStage {
    script: Vec<u8>,
    at: usize,
}

impl ScriptedStage {
    /// None for an empty script.
    pub fn boxed(script: &[u8]) -> Option<Box<Self>> {
        (!script.is_empty()).then(|| {
            Box::new(ScriptedStage {
                script: script.to_vec(),
                at: 0,
            })
        })
    }
}

impl Stage for ScriptedStage {
    fn name(&self) -> &str {
        "fuzz"
    }

    fn frame(&mut self, _dir: Direction, frame: &StageFrame<'_>, now: Instant) -> Verdict {
        let mut b = [0u8; 64];
        let v = self.script[self.at % self.script.len()];
        self.at = self.at.wrapping_add(1);
        let _ = frame.read(usize::from(v) * 7, &mut b);
        match v % 3 {
            0 => Verdict::Pass,
            1 => Verdict::Drop,
            _ => Verdict::Hold { until: now },
        }
    }
}

/// A virtio-net NIC behind its transport, driven by a simulated driver
/// over in-process memory, with a socketpair for a TAP.
pub struct NetRig {
    pub drv: SimDriver,
    pub passes: Passes,
    /// The host's end of the TAP (pair 0's queue).
    pub peer: OwnedFd,
    pub tap: Arc<FakeTap>,
    /// The other pairs' TAP queues and host ends.
    pub more: Vec<(Arc<FakeTap>, OwnedFd)>,
    /// The transport's number of the control queue (a number beyond the
    /// queues when the driver has none).
    pub ctrlq: usize,
    pub stats: Arc<NicStats>,
    pub stages: rvm::net::stage::Stages,
    pub mem_size: u64,
}

impl NetRig {
    /// A NIC of `pairs` queue pairs (at least one), not yet initialised
    /// by the driver.
    pub fn new(vnet: bool, pairs: usize) -> Self {
        let (tap, peer) = fake_tap(vnet);
        let more: Vec<_> = (1..pairs).map(|_| fake_tap(vnet)).collect();
        let mut backends: Vec<Arc<dyn NetBackend>> = vec![tap.clone()];
        backends.extend(more.iter().map(|(t, _)| t.clone() as Arc<dyn NetBackend>));
        let net = VirtioNet::with_pairs(
            NetParams {
                mac: [0x52, 0x54, 0, 0xf, 0x22, 0x01],
                mtu: 1500,
                name: "fuzz-net".into(),
            },
            backends,
            Vec::new(),
        );
        let stats = net.stats();
        let stages = net.stages();
        let (dev, passes) = SyncNet::new(net);
        NetRig {
            drv: SimDriver::new(Box::new(dev), VIRTIO_MEM_MIB),
            passes,
            peer,
            tap,
            more,
            ctrlq: CTRLQ,
            stats,
            stages,
            mem_size: VIRTIO_MEM_MIB << 20,
        }
    }

    /// A NIC the driver brought to DRIVER_OK as `setup` says.
    pub fn ready(setup: &Setup) -> Self {
        let mut r = NetRig::new(setup.vnet, 1 + usize::from(setup.more_pairs % 3));
        if let Some(s) = setup.stage.and_then(|s| ScriptedStage::boxed(&s)) {
            r.stages.push(s).expect("no vhost-net here");
        }
        r.init(setup);
        r
    }

    /// The driver's initialisation with `setup`'s features and sizes.
    pub fn init(&mut self, setup: &Setup) {
        let offered = self.drv.device_features();
        let acked = (setup.features & offered) | VERSION_1;
        let ctrl = acked & features::CTRL_VQ != 0;
        let pairs = if acked & features::MQ != 0 {
            1 + self.more.len()
        } else {
            1
        };
        let data = 2 * pairs;
        use rvm::devices::virtio_net::{CTRL_QUEUE_SIZE, DATA_QUEUE_SIZE};
        // Every RX queue takes the RX size, every TX queue the TX one.
        let mut sizes: Vec<u16> = (0..data)
            .map(|i| (1u16 << (setup.size_log2[i % 2] % 16)).min(DATA_QUEUE_SIZE))
            .collect();
        if ctrl {
            sizes.push((1u16 << (setup.size_log2[2] % 16)).min(CTRL_QUEUE_SIZE));
        }
        self.ctrlq = data;
        self.drv.init(acked, &sizes);
    }

    /// Writes `bytes` at `at`, as much as fits in memory.
    pub fn poke(&self, at: u64, bytes: &[u8]) {
        poke(&self.drv.mem, at, bytes);
    }

    /// A frame from the host; dropped when the socket is full.
    pub fn host_send(&self, frame: &[u8]) {
        let _ = peer_try_send(&self.peer, frame);
    }

    /// Empties the host's receive queues, so that TX does not stall on
    /// them.
    pub fn host_drain(&self) {
        let mut buf = vec![0u8; MAX_HOST_FRAME];
        for peer in std::iter::once(&self.peer).chain(self.more.iter().map(|(_, p)| p)) {
            // A bounded number of frames: the queue holds far fewer.
            for _ in 0..1024 {
                // SAFETY: buf is a live, writable buffer of the given length.
                let n = unsafe {
                    libc::recv(
                        peer.as_raw_fd(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 {
                    break;
                }
            }
        }
    }
}

/// Writes `bytes` at `at` in `mem`, silently dropping what falls outside.
pub fn poke(mem: &GuestRam, at: u64, bytes: &[u8]) {
    let _ = mem.write_slice(bytes, GuestAddress(at));
}

/// A frame of `len` bytes (at most [`MAX_HOST_FRAME`]) starting with
/// `head`, the rest a pattern.
pub fn frame(head: &[u8], len: u16, extra: u8) -> Vec<u8> {
    let total = (usize::from(len) + head.len() + usize::from(extra) * 256).min(MAX_HOST_FRAME);
    let mut f: Vec<u8> = (0..total).map(|i| (i as u8).wrapping_mul(31)).collect();
    let n = head.len().min(total);
    f[..n].copy_from_slice(&head[..n]);
    f
}

/// Access sizes a vCPU can produce: 1 to 8 bytes (KVM splits wider or
/// page-crossing accesses into pieces of any of these lengths).
pub fn access_len(x: u8) -> usize {
    usize::from(x % 8) + 1
}

/// Which data path a virtio-net target is about.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Focus {
    /// The TX queue, with the control queue as the other one.
    Tx,
    /// The RX queue, with the TX queue as the other one.
    Rx,
}

const RXQ: usize = 0;
const TXQ: usize = 1;
const CTRLQ: usize = 2;

impl Focus {
    /// The transport's number of the queue an op is about (`ctrlq`: where
    /// the control queue is, after every pair's queues).
    fn queue(self, other: bool, ctrlq: usize) -> usize {
        match (self, other) {
            (Focus::Tx, false) => TXQ,
            (Focus::Tx, true) => ctrlq,
            (Focus::Rx, false) => RXQ,
            (Focus::Rx, true) => TXQ,
        }
    }
}

/// What a hostile driver (and the host behind the TAP) does to a running
/// virtio-net NIC, one step at a time.
#[derive(Arbitrary, Debug)]
pub enum NetOp {
    /// Writes descriptor `slot` (modulo the size) of the focused queue's
    /// table, or of the other queue's.
    Desc {
        other: bool,
        slot: u16,
        d: Desc,
    },
    /// A well-formed chain of these buffers, posted and published the way
    /// a correct driver does: the fast way to the deep end of a pass.
    Chain {
        other: bool,
        bufs: Vec<(Addr, Len)>,
        writable: bool,
    },
    /// A descriptor table anywhere, for INDIRECT descriptors to point at.
    Table {
        at: Addr,
        descs: Vec<Desc>,
    },
    /// Puts heads on the available ring and publishes them.
    Publish {
        other: bool,
        heads: Vec<u16>,
    },
    /// An available index of the driver's choosing, however hostile.
    AvailIdx {
        other: bool,
        idx: u16,
    },
    AvailFlags {
        other: bool,
        flags: u16,
    },
    /// With EVENT_IDX: used_event after the available ring.
    UsedEvent {
        other: bool,
        idx: u16,
    },
    /// Any bytes anywhere: frames, headers, rings, tables.
    Poke {
        at: Addr,
        bytes: Vec<u8>,
    },
    /// The host sends a frame to the guest.
    HostFrame {
        head: Vec<u8>,
        len: u16,
        extra: u8,
    },
    /// The host reads everything the guest sent.
    HostDrain,
    /// The focused queue's pass (what a kick or a readable TAP runs).
    Pass,
    /// The other queue's pass.
    OtherPass,
    /// A notify-region write, as a guest kick that no ioeventfd caught.
    Kick {
        queue: u16,
    },
    /// The driver resets the device and initialises it again.
    Reinit(Setup),
}

/// Runs `ops` against `rig`; any panic is a bug in rvm (or in this
/// harness, which must only do what a guest or a host could).
pub fn run_net(rig: &mut NetRig, focus: Focus, ops: &[NetOp]) {
    let size = rig.mem_size;
    for op in ops {
        let ctrlq = rig.ctrlq;
        match op {
            NetOp::Desc { other, slot, d } => {
                if let Some(q) = rig.drv.queues.get(focus.queue(*other, ctrlq)) {
                    let at = q.desc + 16 * u64::from(slot % q.size);
                    poke(&rig.drv.mem, at, &d.bytes(size));
                }
            }
            NetOp::Chain {
                other,
                bufs,
                writable,
            } => {
                if let Some(q) = rig.drv.queues.get_mut(focus.queue(*other, ctrlq)) {
                    // A chain longer than the ring would wrap onto itself.
                    let n = bufs.len().min(usize::from(q.size));
                    if n > 0 {
                        let bufs: Vec<(u64, u32)> = bufs[..n]
                            .iter()
                            .map(|(a, l)| (a.resolve(size, DATA_START, RINGS_START), l.get()))
                            .collect();
                        q.add_chain(&rig.drv.mem, &bufs, *writable);
                    }
                }
            }
            NetOp::Table { at, descs } => {
                let at = at.resolve(size, DATA_START, RINGS_START);
                for (i, d) in descs.iter().enumerate() {
                    poke(&rig.drv.mem, at.wrapping_add(16 * i as u64), &d.bytes(size));
                }
            }
            NetOp::Publish { other, heads } => {
                if let Some(q) = rig.drv.queues.get_mut(focus.queue(*other, ctrlq)) {
                    for h in heads {
                        q.stage(&rig.drv.mem, *h);
                    }
                    q.flush(&rig.drv.mem);
                }
            }
            NetOp::AvailIdx { other, idx } => {
                if let Some(q) = rig.drv.queues.get(focus.queue(*other, ctrlq)) {
                    poke(&rig.drv.mem, q.avail + 2, &idx.to_le_bytes());
                }
            }
            NetOp::AvailFlags { other, flags } => {
                if let Some(q) = rig.drv.queues.get(focus.queue(*other, ctrlq)) {
                    poke(&rig.drv.mem, q.avail, &flags.to_le_bytes());
                }
            }
            NetOp::UsedEvent { other, idx } => {
                if let Some(q) = rig.drv.queues.get_mut(focus.queue(*other, ctrlq)) {
                    q.set_used_event(&rig.drv.mem, *idx);
                }
            }
            NetOp::Poke { at, bytes } => {
                rig.poke(at.resolve(size, DATA_START, RINGS_START), bytes);
            }
            NetOp::HostFrame { head, len, extra } => rig.host_send(&frame(head, *len, *extra)),
            NetOp::HostDrain => rig.host_drain(),
            NetOp::Pass | NetOp::OtherPass => {
                match focus.queue(matches!(op, NetOp::OtherPass), ctrlq) {
                    RXQ => rig.passes.rx(),
                    TXQ => rig.passes.tx(),
                    _ => rig.passes.ctrl(),
                }
                // The host keeps up, as it would on a real TAP.
                rig.host_drain();
            }
            NetOp::Kick { queue } => rig.drv.kick(*queue),
            NetOp::Reinit(setup) => rig.init(setup),
        }
    }
}
