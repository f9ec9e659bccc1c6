//! Multiqueue against the simulated driver: one fake TAP queue per pair.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::features::*;
use super::{NetParams, VirtioNet, HDR_LEN};
use crate::devices::test_backend::{fake_tap, pattern, peer_recv, peer_send, FakeTap, T};
use crate::net::backend::NetBackend;
use crate::net::NicStats;
use crate::virtio::features::VERSION_1;
use crate::virtio::sim::{SimDriver, DATA_START, DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::status;

struct MqRig {
    drv: SimDriver,
    taps: Vec<Arc<FakeTap>>,
    peers: Vec<OwnedFd>,
    stats: Arc<NicStats>,
    pairs: usize,
}

fn mq_rig(pairs: usize) -> MqRig {
    let (taps, peers): (Vec<_>, Vec<_>) = (0..pairs).map(|_| fake_tap(false)).unzip();
    let backends = taps
        .iter()
        .map(|t| t.clone() as Arc<dyn NetBackend>)
        .collect();
    let params = NetParams {
        mac: [0x52, 0x54, 0, 1, 2, 4],
        mtu: 1500,
        name: "net-mq-test".into(),
    };
    let net = VirtioNet::with_pairs(params, backends, Vec::new());
    let stats = net.stats();
    MqRig {
        drv: SimDriver::new(Box::new(net), 16),
        taps,
        peers,
        stats,
        pairs,
    }
}

const MQ_FEATURES: u64 = VERSION_1 | MAC | CTRL_VQ | MQ;

impl MqRig {
    /// The transport's numbers of pair `k`'s queues, and the control queue.
    fn rxq(k: usize) -> usize {
        2 * k
    }
    fn txq(k: usize) -> usize {
        2 * k + 1
    }
    fn ctrlq(&self) -> usize {
        2 * self.pairs
    }

    /// Initialises with MQ: every pair's queues and the control queue.
    fn init_mq(&mut self) -> u8 {
        let mut sizes = vec![256u16; 2 * self.pairs];
        sizes.push(64);
        self.drv.init(MQ_FEATURES, &sizes)
    }

    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET `n`: the device's ack.
    fn pairs_set(&mut self, n: u16) -> u8 {
        let mem = self.drv.mem.clone();
        let (cmd, arg, ack) = (
            DATA_START + 0x8000,
            DATA_START + 0x8010,
            DATA_START + 0x8020,
        );
        mem.write_slice(&[4, 0], GuestAddress(cmd)).unwrap();
        mem.write_slice(&n.to_le_bytes(), GuestAddress(arg))
            .unwrap();
        mem.write_obj(0xeeu8, GuestAddress(ack)).unwrap();
        let c = self.ctrlq();
        let q = &mut self.drv.queues[c];
        let first = q.write_descs(&mem, &[]);
        let head = q.write_descs(
            &mem,
            &[
                (cmd, 2, DESC_F_NEXT, first + 1),
                (arg, 2, DESC_F_NEXT, first + 2),
                (ack, 1, DESC_F_WRITE, 0),
            ],
        );
        q.publish(&mem, head);
        self.drv.kick(c as u16);
        self.drv.queues[c].wait_used(&mem, T).expect("returned");
        mem.read_obj::<u8>(GuestAddress(ack)).unwrap()
    }

    /// Which TAP queues are on, once they settle (each pair's thread
    /// follows the pairs in use on its own).
    fn queues_on(&self, want: &[bool]) -> Vec<bool> {
        let end = Instant::now() + T;
        loop {
            let on: Vec<bool> = self.taps.iter().map(|t| t.queue_is_on()).collect();
            if on == want || Instant::now() > end {
                return on;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A frame of pair `k`'s guest: TX on its queue, out of its TAP queue.
    fn send_on(&mut self, k: usize, seed: u8) -> Vec<u8> {
        let frame = pattern(HDR_LEN + 200, seed);
        let at = DATA_START + 0x1000 * k as u64;
        let mem = self.drv.mem.clone();
        mem.write_slice(&frame, GuestAddress(at)).unwrap();
        let q = Self::txq(k);
        self.drv.queues[q].add_chain(&mem, &[(at, frame.len() as u32)], false);
        self.drv.kick(q as u16);
        frame
    }
}

#[test]
fn mq_is_offered_with_the_pairs_and_the_driver_turns_them_on_and_off() {
    let mut r = mq_rig(3);
    assert_ne!(r.drv.device_features() & MQ, 0);
    // max_virtqueue_pairs, at 8 in the device configuration.
    let mut pairs = [0u8; 2];
    r.drv.read(0x2000 + 8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 3);
    assert_eq!(r.init_mq() & status::NEEDS_RESET, 0);
    // Until VQ_PAIRS_SET only pair 0 is used: the other queues are off.
    assert_eq!(r.queues_on(&[true, false, false]), [true, false, false]);
    assert_eq!(r.pairs_set(3), 0, "VIRTIO_NET_OK");
    assert_eq!(r.queues_on(&[true, true, true]), [true, true, true]);

    // Pair 2 moves its own frames, both ways, and counts them apart.
    let out = r.send_on(2, 7);
    assert_eq!(peer_recv(&r.peers[2]).as_deref(), Some(&out[HDR_LEN..]));
    let mem = r.drv.mem.clone();
    let buf = DATA_START + 0x10_0000;
    r.drv.queues[MqRig::rxq(2)].add_chain(&mem, &[(buf, 2048)], true);
    r.drv.kick(MqRig::rxq(2) as u16);
    peer_send(&r.peers[2], &pattern(300, 3));
    let (_, len) = r.drv.queues[MqRig::rxq(2)]
        .wait_used(&mem, T)
        .expect("pair 2 received");
    assert_eq!(len as usize, HDR_LEN + 300);
    let mut got = vec![0u8; 300];
    mem.read_slice(&mut got, GuestAddress(buf + HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, pattern(300, 3));
    let per: Vec<(u64, u64)> = r
        .stats
        .per_pair()
        .iter()
        .map(|c| (c.rx_frames, c.tx_frames))
        .collect();
    assert_eq!(per, [(0, 0), (0, 0), (1, 1)]);
    assert_eq!(r.stats.snapshot().tx_frames, 1);

    // Back to one pair: the others are off again; nonsense is refused.
    assert_eq!(r.pairs_set(1), 0);
    assert_eq!(r.queues_on(&[true, false, false]), [true, false, false]);
    for bad in [0, 4, u16::MAX] {
        assert_eq!(r.pairs_set(bad), 1, "VIRTIO_NET_ERR for {bad}");
    }
    assert_eq!(r.queues_on(&[true, false, false]), [true, false, false]);
    // Pair 0 still works.
    let out = r.send_on(0, 9);
    assert_eq!(peer_recv(&r.peers[0]).as_deref(), Some(&out[HDR_LEN..]));
}

#[test]
fn a_driver_without_mq_gets_one_pair_and_the_rest_gets_no_frames() {
    let mut r = mq_rig(2);
    assert_eq!(
        r.drv.init(VERSION_1 | MAC | CTRL_VQ, &[256, 256, 64]) & status::NEEDS_RESET,
        0
    );
    assert_eq!(r.queues_on(&[true, false]), [true, false]);
    let out = r.send_on(0, 5);
    assert_eq!(peer_recv(&r.peers[0]).as_deref(), Some(&out[HDR_LEN..]));
    // Queue 2 is the control queue here, and MQ commands are refused.
    assert_eq!(r.pairs_set_on(2, 2), 1);
}

#[test]
fn an_mq_driver_must_set_up_every_pair_and_mq_needs_the_control_queue() {
    let mut r = mq_rig(2);
    // Pair 1 left out: the device asks for a reset, nothing runs.
    let s = r.drv.init(MQ_FEATURES, &[256, 256, 0, 0, 64]);
    assert_ne!(s & status::NEEDS_RESET, 0);
    let mut r = mq_rig(2);
    let s = r.drv.init(VERSION_1 | MAC | MQ, &[256, 256, 256, 256]);
    assert_ne!(s & status::NEEDS_RESET, 0);
}

impl MqRig {
    /// VQ_PAIRS_SET `n` on transport queue `c` (a driver without MQ has
    /// its control queue at 2).
    fn pairs_set_on(&mut self, c: usize, n: u16) -> u8 {
        let saved = self.pairs;
        self.pairs = c / 2;
        let ack = self.pairs_set(n);
        self.pairs = saved;
        ack
    }
}
