//! virtio-net against a simulated driver and a socketpair standing in for
//! the TAP: the data path, the header handling, and hostile chains.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::features::*;
use super::{NetParams, VirtioNet, HDR_LEN};
use crate::devices::test_backend::{
    fake_tap, pattern, peer_recv, peer_recv_nothing, peer_send, FakeTap, T,
};
use crate::net::stage::testing::{AnswerTx, DropFirstByte, Trickle};
use crate::net::stage::Direction;
use crate::virtio::features::{RING_EVENT_IDX, VERSION_1};
use crate::virtio::sim::{SimDriver, DATA_START, DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::status;

struct Rig {
    drv: SimDriver,
    peer: OwnedFd,
    tap: Arc<FakeTap>,
    stats: Arc<crate::net::NicStats>,
    stages: crate::net::stage::Stages,
}

fn rig(vnet: bool) -> Rig {
    rig_named(vnet, "net-test")
}

/// A rig whose worker thread has a name of its own (`name`), so a test can
/// tell its log lines from other tests'.
fn rig_named(vnet: bool, name: &str) -> Rig {
    rig_with(vnet, name, 1500)
}

/// A rig whose device offers the driver `mtu`.
fn rig_with(vnet: bool, name: &str, mtu: u16) -> Rig {
    let (tap, b) = fake_tap(vnet);
    let params = NetParams {
        mac: [0x52, 0x54, 0, 1, 2, 3],
        mtu,
        name: name.into(),
    };
    let net = VirtioNet::new(params, tap.clone(), None);
    let stats = net.stats();
    let stages = net.stages();
    Rig {
        drv: SimDriver::new(Box::new(net), 16),
        peer: b,
        tap,
        stats,
        stages,
    }
}

fn all_features(vnet: bool) -> u64 {
    let mut f = VERSION_1 | RING_EVENT_IDX | MAC | STATUS | MTU | MRG_RXBUF | CTRL_VQ;
    if vnet {
        f |= CSUM | GUEST_CSUM | HOST_TSO4 | HOST_TSO6 | GUEST_TSO4 | GUEST_TSO6;
    }
    f
}

const RXQ: usize = 0;
const TXQ: usize = 1;
const CTRLQ: usize = 2;

#[test]
fn offers_the_issue_features_and_offloads_only_with_a_vnet_header() {
    let mut r = rig(true);
    let f = r.drv.device_features();
    for bit in [
        VERSION_1,
        MAC,
        STATUS,
        MTU,
        CSUM,
        GUEST_CSUM,
        HOST_TSO4,
        HOST_TSO6,
        GUEST_TSO4,
        GUEST_TSO6,
        HOST_ECN,
        GUEST_ECN,
        MRG_RXBUF,
        RING_EVENT_IDX,
        crate::virtio::features::RING_INDIRECT_DESC,
        CTRL_VQ,
    ] {
        assert_ne!(f & bit, 0, "feature {bit:#x} not offered");
    }
    let mut r = rig(false);
    let f = r.drv.device_features();
    assert_eq!(f & (CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4), 0);
    // Config space: MAC, link up, MTU.
    let mut cfg = [0u8; 12];
    for (i, b) in cfg.iter_mut().enumerate() {
        let mut x = [0u8];
        r.drv.read(0x2000 + i as u64, &mut x);
        *b = x[0];
    }
    assert_eq!(&cfg[..6], &[0x52, 0x54, 0, 1, 2, 3]);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), 1);
    assert_eq!(u16::from_le_bytes([cfg[10], cfg[11]]), 1500);
}

#[test]
fn refuses_features_it_did_not_offer_and_version_0() {
    let mut r = rig(false);
    let s = r
        .drv
        .init(all_features(false) | GUEST_TSO4, &[256, 256, 64]);
    assert_eq!(s & status::FEATURES_OK, 0);
    let s = r
        .drv
        .init(all_features(false) & !VERSION_1, &[256, 256, 64]);
    assert_eq!(s & status::FEATURES_OK, 0);
    let s = r.drv.init(all_features(false), &[256, 256, 64]);
    assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK);
    assert_eq!(s & status::NEEDS_RESET, 0);
}

#[test]
fn tx_frame_goes_out_whole_with_its_header_and_tap_offloads_are_set() {
    let mut r = rig(true);
    assert_eq!(
        r.drv.init(all_features(true), &[256, 256, 64]) & status::NEEDS_RESET,
        0
    );
    assert_eq!(
        *r.tap.offloads.lock().unwrap(),
        Some((HDR_LEN, 0x1 | 0x2 | 0x4)),
        "TUNSETVNETHDRSZ 12 and CSUM|TSO4|TSO6"
    );
    let frame = pattern(HDR_LEN + 1000, 7);
    // Split across two descriptors, as Linux does for header and data.
    r.drv
        .mem
        .write_slice(&frame, GuestAddress(DATA_START))
        .unwrap();
    let q = &mut r.drv.queues[TXQ];
    q.add_chain(
        &r.drv.mem,
        &[
            (DATA_START, HDR_LEN as u32),
            (DATA_START + HDR_LEN as u64, 1000),
        ],
        false,
    );
    r.drv.kick(TXQ as u16);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&frame[..]));
    let (id, len) = r.drv.queues[TXQ].wait_used(&r.drv.mem, T).expect("used");
    assert_eq!((id, len), (0, 0));
    std::thread::sleep(Duration::from_millis(20));
    assert!(r.drv.interrupts(TXQ as u16) >= 1, "TX interrupt");
    let s = r.stats.snapshot();
    assert_eq!((s.tx_frames, s.tx_bytes, s.malformed), (1, 1000, 0));
}

#[test]
fn tx_without_vnet_header_strips_it() {
    let mut r = rig(false);
    r.drv.init(all_features(false), &[256, 256, 64]);
    let frame = pattern(HDR_LEN + 60, 3);
    r.drv
        .mem
        .write_slice(&frame, GuestAddress(DATA_START))
        .unwrap();
    r.drv.queues[TXQ].add_chain(&r.drv.mem, &[(DATA_START, frame.len() as u32)], false);
    r.drv.kick(TXQ as u16);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&frame[HDR_LEN..]));
}

/// Posts `n` RX buffers of `size` bytes each.
fn post_rx(r: &mut Rig, n: usize, size: u32) -> Vec<u64> {
    let addrs: Vec<u64> = (0..n as u64)
        .map(|i| DATA_START + 0x10_0000 + i * 0x1_0000)
        .collect();
    for &a in &addrs {
        r.drv.queues[RXQ].add_chain(&r.drv.mem, &[(a, size)], true);
    }
    r.drv.kick(RXQ as u16);
    addrs
}

#[test]
fn rx_frame_spans_merged_buffers_with_num_buffers_set() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    // Room for the largest GSO frame (43 x 1536 > 65562) even after the
    // first frame took two buffers: Linux keeps its ring full.
    let addrs = post_rx(&mut r, 45, 1536);
    // A header as the TAP writes it (10 bytes + 2 the device fills in).
    let mut pkt = vec![0u8; HDR_LEN];
    pkt[0] = 1; // NEEDS_CSUM, passed through untouched
    pkt.extend(pattern(3000, 9));
    peer_send(&r.peer, &pkt);
    let (id0, len0) = r.drv.queues[RXQ].wait_used(&r.drv.mem, T).expect("used 0");
    let (id1, len1) = r.drv.queues[RXQ].wait_used(&r.drv.mem, T).expect("used 1");
    assert_eq!((id0, id1), (0, 1));
    assert_eq!((len0, len1), (1536, (pkt.len() - 1536) as u32));
    let mut got = vec![0u8; pkt.len()];
    r.drv
        .mem
        .read_slice(&mut got[..1536], GuestAddress(addrs[0]))
        .unwrap();
    r.drv
        .mem
        .read_slice(&mut got[1536..], GuestAddress(addrs[1]))
        .unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    got[10] = 0;
    assert_eq!(got, pkt);
    assert!(r.drv.queues[RXQ].pop_used(&r.drv.mem).is_none());
    // The next frame uses the buffers left in the pool.
    peer_send(&r.peer, &pkt[..HDR_LEN + 100]);
    let (id2, len2) = r.drv.queues[RXQ].wait_used(&r.drv.mem, T).expect("used 2");
    assert_eq!((id2, len2), (2, (HDR_LEN + 100) as u32));
    let s = r.stats.snapshot();
    assert_eq!((s.rx_frames, s.rx_bytes), (2, 3100));
}

#[test]
fn rx_without_merging_or_vnet_header_gets_a_header_from_us() {
    let mut r = rig(false);
    r.drv.init(VERSION_1 | MAC, &[256, 256]);
    let addrs = post_rx(&mut r, 2, 1600);
    let frame = pattern(1514, 1);
    peer_send(&r.peer, &frame);
    let (id, len) = r.drv.queues[RXQ].wait_used(&r.drv.mem, T).expect("used");
    assert_eq!((id, len), (0, (HDR_LEN + 1514) as u32));
    let mut got = vec![0u8; HDR_LEN + 1514];
    r.drv
        .mem
        .read_slice(&mut got, GuestAddress(addrs[0]))
        .unwrap();
    let mut hdr = [0u8; HDR_LEN];
    hdr[10] = 1;
    assert_eq!(&got[..HDR_LEN], &hdr);
    assert_eq!(&got[HDR_LEN..], &frame[..]);
}

#[test]
fn hostile_tx_chains_are_dropped_counted_and_returned() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    let mem = r.drv.mem.clone();
    let q = &mut r.drv.queues[TXQ];
    let d = DATA_START;
    let hostile: Vec<Vec<(u64, u32, u16, u16)>> = vec![
        vec![(d, 0, 0, 0)],               // zero length
        vec![(d, 8, 0, 0)],               // shorter than the header
        vec![(1 << 40, 64, 0, 0)],        // outside memory
        vec![(16 << 20, 64, 0, 0)],       // straddles the end of memory
        vec![(d, 64, DESC_F_WRITE, 0)],   // write-only TX buffer
        vec![(d, 64, DESC_F_NEXT, 9999)], // next outside the table
    ];
    let mut heads = vec![];
    for descs in hostile {
        let first = q.write_descs(&mem, &[]);
        let mut descs = descs;
        for (i, x) in descs.iter_mut().enumerate() {
            if x.2 & DESC_F_NEXT != 0 && x.3 == 0 {
                x.3 = first + i as u16 + 1;
            }
        }
        let head = q.write_descs(&mem, &descs);
        q.publish(&mem, head);
        heads.push(head);
    }
    // A loop: a descriptor whose next is itself.
    let head = q.write_descs(&mem, &[(d, 64, DESC_F_NEXT, 0)]);
    q.write_descs(&mem, &[]);
    mem.write_obj(head, GuestAddress(q.desc + 16 * u64::from(head) + 14))
        .unwrap();
    q.publish(&mem, head);
    heads.push(head);
    r.drv.kick(TXQ as u16);
    for h in &heads {
        let (id, len) = r.drv.queues[TXQ].wait_used(&mem, T).expect("returned");
        assert_eq!((id, len), (u32::from(*h), 0));
    }
    assert!(
        peer_recv_nothing(&r.peer),
        "nothing hostile reached the TAP"
    );
    assert_eq!(r.stats.snapshot().malformed, heads.len() as u64);
    assert_still_transmits(&mut r, 5);
}

/// The device still works: a well-formed TX frame reaches the TAP whole.
fn assert_still_transmits(r: &mut Rig, seed: u8) {
    let mem = r.drv.mem.clone();
    let frame = pattern(HDR_LEN + 64, seed);
    mem.write_slice(&frame, GuestAddress(DATA_START)).unwrap();
    r.drv.queues[TXQ].add_chain(&mem, &[(DATA_START, frame.len() as u32)], false);
    r.drv.kick(TXQ as u16);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&frame[..]));
}

#[test]
fn hostile_rx_chains_are_refused_and_good_ones_still_fill() {
    let mut r = rig(true);
    r.drv.init(all_features(true) & !MRG_RXBUF, &[256, 256, 64]);
    let mem = r.drv.mem.clone();
    let q = &mut r.drv.queues[RXQ];
    let d = DATA_START;
    let bad_ro = q.add_chain(&mem, &[(d, 2048)], false); // read-only RX buffer
    let bad_oom = q.add_chain(&mem, &[(1 << 33, 2048)], true);
    let bad_short = q.add_chain(&mem, &[(d, 4)], true);
    let good = q.add_chain(&mem, &[(d, 2048)], true);
    r.drv.kick(RXQ as u16);
    let frame = pattern(HDR_LEN + 500, 2);
    peer_send(&r.peer, &frame);
    let mut seen = vec![];
    for _ in 0..4 {
        seen.push(r.drv.queues[RXQ].wait_used(&mem, T).expect("used"));
    }
    assert!(seen.contains(&(u32::from(bad_ro), 0)));
    assert!(seen.contains(&(u32::from(bad_oom), 0)));
    assert!(seen.contains(&(u32::from(bad_short), 0)));
    assert!(seen.contains(&(u32::from(good), frame.len() as u32)));
    assert_eq!(r.stats.snapshot().malformed, 3);
}

#[test]
fn control_commands_are_acknowledged() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    let mem = r.drv.mem.clone();
    let d = DATA_START;
    // VIRTIO_NET_CTRL_RX / PROMISC on; then an unknown class.
    for (class, want) in [(0u8, 0u8), (42, 1)] {
        mem.write_obj(0xeeu8, GuestAddress(d + 0x100)).unwrap();
        assert_eq!(ctrl_command(&mut r, class, (d + 0x100, 1)), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(d + 0x100)).unwrap(), want);
    }
}

/// With merged buffers a frame is read only once the pool can hold the
/// largest one: reading into less would make the TAP drop a big frame.
#[test]
fn rx_waits_for_room_for_the_largest_frame_instead_of_dropping() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    post_rx(&mut r, 4, 1536);
    let mut pkt = vec![0u8; HDR_LEN];
    pkt.extend(pattern(5000, 3));
    peer_send(&r.peer, &pkt);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        r.drv.queues[RXQ].pop_used(&r.drv.mem).is_none(),
        "read too early"
    );
    // More buffers: now 44 x 1536 bytes; the frame arrives whole.
    let base = DATA_START + 0x80_0000;
    for i in 0..40u64 {
        r.drv.queues[RXQ].add_chain(&r.drv.mem, &[(base + i * 0x800, 1536)], true);
    }
    r.drv.kick(RXQ as u16);
    let mut total = 0;
    for _ in 0..4 {
        let (_, len) = r.drv.queues[RXQ].wait_used(&r.drv.mem, T).expect("used");
        total += len as usize;
    }
    assert_eq!(total, pkt.len());
    assert_eq!(r.stats.snapshot().rx_dropped, 0);
}

/// A ring too small to ever hold the largest frame still gets frames: the
/// pool takes them once it holds every descriptor the ring has.
#[test]
fn a_ring_smaller_than_the_largest_frame_still_receives() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[16, 256, 64]);
    post_rx(&mut r, 16, 1536);
    let mut pkt = vec![0u8; HDR_LEN];
    pkt.extend(pattern(1000, 4));
    peer_send(&r.peer, &pkt);
    let (id, len) = r.drv.queues[RXQ].wait_used(&r.drv.mem, T).expect("used");
    assert_eq!((id, len as usize), (0, pkt.len()));
}

#[test]
fn reset_stops_the_device_and_a_reloaded_driver_works() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    r.drv.write(0x14, &[0]);
    assert_eq!(r.drv.status(), 0, "reset reads back 0");
    // Reset ended the worker: a frame from the host is not read.
    post_rx(&mut r, 1, 2048);
    peer_send(&r.peer, &pattern(HDR_LEN + 10, 0));
    std::thread::sleep(Duration::from_millis(50));
    assert!(r.drv.queues[RXQ].pop_used(&r.drv.mem).is_none());
    // The driver comes back (rmmod/modprobe) with fresh rings.
    let s = r.drv.init(all_features(true), &[128, 128, 64]);
    assert_eq!(s & status::NEEDS_RESET, 0);
    post_rx(&mut r, 33, 2048);
    let (_, len) = r.drv.queues[RXQ]
        .wait_used(&r.drv.mem, T)
        .expect("frame after reload");
    assert_eq!(len, (HDR_LEN + 10) as u32);
}

#[test]
fn rings_outside_memory_make_the_device_ask_for_a_reset() {
    let mut r = rig(true);
    r.drv.init(0, &[]);
    r.drv.write(0x14, &[0]);
    r.drv.write(0x14, &[status::ACKNOWLEDGE | status::DRIVER]);
    r.drv.write(0x08, &1u32.to_le_bytes());
    r.drv.write(0x0c, &1u32.to_le_bytes());
    r.drv.write(
        0x14,
        &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK],
    );
    for q in 0..2u16 {
        r.drv.write(0x16, &q.to_le_bytes());
        r.drv.write(0x20, &0xffff_f000u32.to_le_bytes());
        r.drv.write(0x24, &0x10u32.to_le_bytes());
        r.drv.write(0x1c, &1u16.to_le_bytes());
    }
    r.drv.write(0x14, &[0x0f]);
    assert_ne!(r.drv.status() & status::NEEDS_RESET, 0);
}

#[test]
fn hostile_register_accesses_do_not_panic() {
    let mut r = rig(true);
    for off in (0..0x8000u64)
        .step_by(1)
        .filter(|o| o % 97 == 0 || *o < 0x48)
    {
        for len in [1usize, 2, 4, 8] {
            let v = vec![0xffu8; len];
            r.drv.write(off, &v);
            let mut b = vec![0u8; len];
            r.drv.read(off, &mut b);
        }
    }
    // Queue select far out of range, then queue registers.
    r.drv.write(0x16, &0xfffeu16.to_le_bytes());
    r.drv.write(0x18, &4u16.to_le_bytes());
    r.drv.write(0x14, &[0x0f]);
}

/// An available index that claims more new chains than the ring holds:
/// nothing is sent or used, the device stays alive, and a reset and a new
/// driver bring it back.
#[test]
fn hostile_available_index_is_ignored_until_reset() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    for q in [RXQ, TXQ] {
        let avail = r.drv.queues[q].avail;
        r.drv
            .mem
            .write_obj(1000u16, GuestAddress(avail + 2))
            .unwrap();
    }
    for _ in 0..50 {
        r.drv.kick(TXQ as u16);
        r.drv.kick(RXQ as u16);
    }
    peer_send(&r.peer, &pattern(HDR_LEN + 100, 9));
    assert!(peer_recv_nothing(&r.peer));
    for q in [RXQ, TXQ] {
        assert!(r.drv.queues[q].pop_used(&r.drv.mem).is_none());
    }
    // The driver starts over; the device works again.
    r.drv.init(all_features(true), &[256, 256, 64]);
    let frame = pattern(HDR_LEN + 100, 5);
    r.drv
        .mem
        .write_slice(&frame, GuestAddress(DATA_START))
        .unwrap();
    let mem = r.drv.mem.clone();
    r.drv.queues[TXQ].add_chain(&mem, &[(DATA_START, frame.len() as u32)], false);
    r.drv.kick(TXQ as u16);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&frame[..]));
}

#[test]
fn with_vhost_only_ring_features_the_kernel_implements_are_offered() {
    let offered = all_features(true);
    // A kernel without merged buffers or event idx.
    let vhost = VERSION_1 | crate::virtio::features::RING_INDIRECT_DESC;
    let f = super::restrict_to_vhost(offered, vhost);
    assert_eq!(f & (MRG_RXBUF | RING_EVENT_IDX), 0);
    assert_ne!(f & VERSION_1, 0);
    // Offloads live in the TAP, not in vhost: all still offered.
    let tap_side = CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO6 | CTRL_VQ | MAC | MTU;
    assert_eq!(f & tap_side, offered & tap_side);
    // A kernel with everything changes nothing.
    assert_eq!(super::restrict_to_vhost(offered, u64::MAX), offered);
}

/// The fuzz targets' threadless NIC: nothing moves until the caller runs a
/// pass, then exactly what the worker would have done happens.
#[test]
fn sync_net_moves_frames_only_when_a_pass_runs() {
    let (tap, peer) = fake_tap(true);
    let params = NetParams {
        mac: [0x52, 0x54, 0, 1, 2, 3],
        mtu: 1500,
        name: "net-sync".into(),
    };
    let (net, passes) = super::fuzzing::SyncNet::new(VirtioNet::new(params, tap, None));
    let mut drv = SimDriver::new(Box::new(net), 16);
    assert!(!passes.active());
    drv.init(all_features(true), &[256, 256, 64]);
    assert!(passes.active());
    let frame = pattern(HDR_LEN + 100, 5);
    drv.mem
        .write_slice(&frame, GuestAddress(DATA_START))
        .unwrap();
    drv.queues[TXQ].add_chain(&drv.mem, &[(DATA_START, frame.len() as u32)], false);
    drv.kick(TXQ as u16);
    assert!(peer_recv_nothing(&peer), "no thread sends it");
    passes.tx();
    assert_eq!(peer_recv(&peer).as_deref(), Some(&frame[..]));
    assert_eq!(drv.queues[TXQ].pop_used(&drv.mem), Some((0, 0)));
    // A reset takes the worker away: passes do nothing until DRIVER_OK.
    drv.write(0x14, &[0]);
    assert!(!passes.active());
    passes.rx();
}

#[test]
fn a_ring_of_out_of_range_heads_prints_a_bounded_number_of_lines() {
    crate::logging::capture::install();
    let mut r = rig_named(true, "net-flood-tx");
    r.drv.init(all_features(true), &[256, 256, 64]);
    let mem = r.drv.mem.clone();
    // Heads at and beyond the queue size, each published with a kick (no
    // more than the ring holds: more would be a hostile available index,
    // which stalls the queue instead).
    const N: u64 = 250;
    for i in 0..N {
        r.drv.queues[TXQ].publish(&mem, 256 + i as u16);
        r.drv.kick(TXQ as u16);
    }
    let t0 = std::time::Instant::now();
    while r.stats.snapshot().malformed < N {
        assert!(t0.elapsed() < T, "{:?}", r.stats.snapshot());
        std::thread::sleep(Duration::from_millis(5));
    }
    let lines = crate::logging::capture::lines_of("net-flood-tx");
    // Two call sites a bad chain reaches (refused, and its used entry),
    // each bounded per minute; without the bound, a line per entry each.
    assert!(
        lines.len() <= 2 * crate::logging::LINES_PER_WINDOW as usize,
        "{} lines for {N} bad heads, first: {:?}",
        lines.len(),
        lines.first()
    );
    assert_still_transmits(&mut r, 9);
}

#[test]
fn a_driver_repeating_a_refused_features_ok_prints_a_bounded_number_of_lines() {
    crate::logging::capture::install();
    let mut r = rig(false);
    let s = r
        .drv
        .init(all_features(false) | GUEST_TSO4, &[256, 256, 64]);
    assert_eq!(s & status::FEATURES_OK, 0);
    // The same refused FEATURES_OK, written again and again.
    let asked = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    for _ in 0..500 {
        r.drv.write(0x14, &[asked]);
    }
    // Logged on this thread (the vCPU's, in a real VM).
    let lines = crate::logging::capture::lines_of(
        "a_driver_repeating_a_refused_features_ok_prints_a_bounded_number_of_lines",
    );
    assert!(
        lines.len() <= crate::logging::LINES_PER_WINDOW as usize,
        "{} lines for 501 refusals: {:?}",
        lines.len(),
        lines.first()
    );
    assert!(!lines.is_empty(), "the refusal is still said");
}

/// One control command: `class`, command 0, one data byte, then the ack
/// buffer `(addr, len)`. Returns the used length.
fn ctrl_command(r: &mut Rig, class: u8, ack: (u64, u32)) -> u32 {
    let mem = r.drv.mem.clone();
    let d = DATA_START;
    mem.write_slice(&[class, 0, 1], GuestAddress(d)).unwrap();
    let q = &mut r.drv.queues[CTRLQ];
    let first = q.write_descs(&mem, &[]);
    let head = q.write_descs(
        &mem,
        &[
            (d, 2, DESC_F_NEXT, first + 1),
            (d + 2, 1, DESC_F_NEXT, first + 2),
            (ack.0, ack.1, DESC_F_WRITE, 0),
        ],
    );
    q.publish(&mem, head);
    r.drv.kick(CTRLQ as u16);
    r.drv.queues[CTRLQ].wait_used(&mem, T).expect("returned").1
}

#[test]
fn a_control_ack_needs_a_buffer_of_at_least_one_byte() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    let mem = r.drv.mem.clone();
    let at = DATA_START + 0x100;
    mem.write_obj(0xeeu8, GuestAddress(at)).unwrap();
    assert_eq!(ctrl_command(&mut r, 0, (at, 0)), 0, "nothing written");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(at)).unwrap(), 0xee);
    assert_eq!(r.stats.snapshot().malformed, 1);
    // A one-byte ack buffer still gets its ack.
    assert_eq!(ctrl_command(&mut r, 0, (at, 1)), 1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(at)).unwrap(), 0);
}

#[test]
fn a_control_chain_beyond_the_descriptor_cap_is_refused_unread() {
    use crate::virtio::sim::DESC_F_INDIRECT;
    let mut r = rig(true);
    r.drv.init(
        all_features(true) | crate::virtio::features::RING_INDIRECT_DESC,
        &[256, 256, 64],
    );
    let mem = r.drv.mem.clone();
    let d = DATA_START;
    mem.write_slice(&[0u8, 0, 1], GuestAddress(d)).unwrap();
    // An indirect table of 2000 one-byte readable descriptors, then the ack.
    let n = 2001u64;
    let table = d + 0x1_0000;
    let ack = d + 0x100;
    mem.write_obj(0xeeu8, GuestAddress(ack)).unwrap();
    for i in 0..n {
        let at = table + 16 * i;
        let (addr, len, flags) = if i + 1 == n {
            (ack, 1u32, DESC_F_WRITE)
        } else {
            (d, 1, DESC_F_NEXT)
        };
        mem.write_obj(addr, GuestAddress(at)).unwrap();
        mem.write_obj(len, GuestAddress(at + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
        mem.write_obj((i + 1) as u16, GuestAddress(at + 14))
            .unwrap();
    }
    let q = &mut r.drv.queues[CTRLQ];
    let head = q.write_descs(&mem, &[(table, (16 * n) as u32, DESC_F_INDIRECT, 0)]);
    q.publish(&mem, head);
    r.drv.kick(CTRLQ as u16);
    let (_, len) = r.drv.queues[CTRLQ].wait_used(&mem, T).expect("returned");
    assert_eq!(len, 0, "refused, not acknowledged");
    assert_eq!(mem.read_obj::<u8>(GuestAddress(ack)).unwrap(), 0xee);
    assert_eq!(r.stats.snapshot().malformed, 1);
}

#[test]
fn queues_are_never_renumbered_a_missing_one_makes_the_device_ask_for_a_reset() {
    let no_ctrl = all_features(false) & !CTRL_VQ;
    // RX and the control ring's slot enabled, TX left out: the control
    // ring must not be taken for TX.
    let mut r = rig(false);
    let s = r.drv.init(no_ctrl, &[256, 0, 64]);
    assert_eq!(
        s & status::NEEDS_RESET,
        status::NEEDS_RESET,
        "status {s:#x}"
    );
    // With CTRL_VQ, the control queue missing is the same.
    let s = r.drv.init(all_features(false), &[256, 256, 0]);
    assert_eq!(
        s & status::NEEDS_RESET,
        status::NEEDS_RESET,
        "status {s:#x}"
    );
    // The whole set works.
    let s = r.drv.init(all_features(false), &[256, 256, 64]);
    assert_eq!(
        s & (status::DRIVER_OK | status::NEEDS_RESET),
        status::DRIVER_OK
    );
}

/// Reads the frame of `len` bytes the device spread over RX buffers of
/// `size` bytes at `addrs` (num_buffers of them).
fn merged_frame(r: &Rig, addrs: &[u64], size: u32, len: usize) -> Vec<u8> {
    let mut got = vec![0u8; len];
    for (i, chunk) in got.chunks_mut(size as usize).enumerate() {
        r.drv.mem.read_slice(chunk, GuestAddress(addrs[i])).unwrap();
    }
    got
}

/// A device offering MTU 16000 to a driver without GUEST_TSO, with RX
/// queue size `rx_size` and `buffers` 4 KiB RX buffers posted; returns
/// the rig and the buffers' addresses.
fn mtu_16000_rig(rx_size: u16, buffers: usize) -> (Rig, Vec<u64>) {
    let mut r = rig_with(true, "net-test", 16000);
    let no_tso = all_features(true) & !(GUEST_TSO4 | GUEST_TSO6);
    r.drv.init(no_tso, &[rx_size, 256, 64]);
    let addrs = post_rx(&mut r, buffers, 4096);
    (r, addrs)
}

/// A frame from the host: a zeroed vnet header, then `len` bytes.
fn host_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut pkt = vec![0u8; HDR_LEN];
    pkt.extend(pattern(len, seed));
    pkt
}

/// The device offers MTU 16000 without GUEST_TSO: before it reads a frame
/// it must hold buffers for the largest frame that MTU allows, not for a
/// 9000-byte one (the rest would be cut off, and the frame delivered as
/// if whole).
#[test]
fn rx_holds_buffers_for_the_mtu_it_offers() {
    let (mut r, addrs) = mtu_16000_rig(256, 8);
    let pkt = host_frame(14 + 16000, 3);
    peer_send(&r.peer, &pkt);
    let mut total = 0;
    for i in 0..4 {
        let (id, len) = r.drv.queues[RXQ].wait_used(&r.drv.mem, T).expect("used");
        assert_eq!(id, i);
        total += len as usize;
    }
    assert_eq!(total, pkt.len(), "the whole frame");
    let mut got = merged_frame(&r, &addrs, 4096, pkt.len());
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 4, "num_buffers");
    got[10] = 0;
    assert_eq!(got, pkt);
    assert_eq!(r.stats.snapshot().rx_dropped, 0);
}

/// A frame larger than all the buffers the ring can give (a small ring)
/// is cut by the read; tun still says how long it was. The device must
/// drop it (rx_dropped), not hand the guest the cut frame as whole, and
/// go on with the next frame in the same buffers.
#[test]
fn a_frame_cut_by_the_read_is_dropped_not_delivered() {
    let (mut r, addrs) = mtu_16000_rig(2, 2);
    peer_send(&r.peer, &host_frame(14 + 16000, 4));
    let small = host_frame(100, 5);
    peer_send(&r.peer, &small);
    let (id, len) = r.drv.queues[RXQ].wait_used(&r.drv.mem, T).expect("used");
    assert_eq!(
        (id, len as usize),
        (0, small.len()),
        "the small frame, first buffer"
    );
    let mut got = merged_frame(&r, &addrs, 4096, small.len());
    got[10] = 0;
    assert_eq!(got, small);
    assert!(r.drv.queues[RXQ].pop_used(&r.drv.mem).is_none());
    let s = r.stats.snapshot();
    assert_eq!((s.rx_frames, s.rx_dropped), (1, 1));
}

/// Writes the PCI command register as a driver does (memory space on, bus
/// mastering as `master`).
fn set_bus_master(r: &mut Rig, master: bool) {
    use crate::pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY};
    use crate::pci::PciDevice;
    let cmd = COMMAND_MEMORY | if master { COMMAND_BUS_MASTER } else { 0 };
    r.drv.pci.config_mut().write(COMMAND, &cmd.to_le_bytes());
    r.drv.pci.config_written(COMMAND, &cmd.to_le_bytes());
}

/// With Bus Master Enable clear (kexec, a driver unbound without a reset)
/// the device may not touch guest memory: no TX chain is read, no RX
/// buffer written, no used entry; it all happens once the bit is set.
#[test]
fn no_dma_while_bus_mastering_is_off() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    set_bus_master(&mut r, false);
    let mem = r.drv.mem.clone();
    let frame = pattern(HDR_LEN + 64, 7);
    mem.write_slice(&frame, GuestAddress(DATA_START)).unwrap();
    r.drv.queues[TXQ].add_chain(&mem, &[(DATA_START, frame.len() as u32)], false);
    r.drv.kick(TXQ as u16);
    let addrs = post_rx(&mut r, 45, 1536);
    let mut pkt = vec![0u8; HDR_LEN];
    pkt.extend(pattern(100, 8));
    peer_send(&r.peer, &pkt);
    assert!(peer_recv_nothing(&r.peer), "a TX chain was read");
    std::thread::sleep(Duration::from_millis(100));
    assert!(r.drv.queues[TXQ].pop_used(&mem).is_none(), "TX used entry");
    assert!(r.drv.queues[RXQ].pop_used(&mem).is_none(), "RX used entry");
    let mut untouched = vec![0u8; pkt.len()];
    mem.read_slice(&mut untouched, GuestAddress(addrs[0]))
        .unwrap();
    assert!(
        untouched.iter().all(|&b| b == 0),
        "an RX buffer was written"
    );
    // Bus mastering on: both go through.
    set_bus_master(&mut r, true);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&frame[..]));
    let (_, len) = r.drv.queues[RXQ].wait_used(&mem, T).expect("RX after BME");
    assert_eq!(len as usize, pkt.len());
}

/// A backend that answers EAGAIN (a TAP with a small sndbuf=, whose
/// queue is full) holds the guest back instead of losing its frames: the
/// chains stay in the ring, unanswered, until the backend takes writes
/// again, then every frame goes out in order.
#[test]
fn tx_waits_for_a_backend_that_would_block_instead_of_dropping() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    let mem = r.drv.mem.clone();
    // The device's side of the socketpair is full: its writes block.
    let queued = crate::devices::test_backend::fill_until_blocked(&r.tap, 1000);
    let frames: Vec<Vec<u8>> = (0..8).map(|i| pattern(HDR_LEN + 200, 40 + i)).collect();
    for (i, f) in frames.iter().enumerate() {
        let at = DATA_START + 0x1000 * i as u64;
        mem.write_slice(f, GuestAddress(at)).unwrap();
        r.drv.queues[TXQ].add_chain(&mem, &[(at, f.len() as u32)], false);
    }
    r.drv.kick(TXQ as u16);
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        r.drv.queues[TXQ].pop_used(&mem).is_none(),
        "a chain was answered while the backend was full"
    );
    assert_eq!(r.stats.snapshot().tx_dropped, 0, "frames were dropped");
    // The host reads what was queued: the device's writes go through.
    crate::devices::test_backend::expect_after_filler(&r.peer, queued, &frames);
    for _ in 0..frames.len() {
        r.drv.queues[TXQ]
            .wait_used(&mem, T)
            .expect("answered after");
    }
    let s = r.stats.snapshot();
    assert_eq!((s.tx_frames, s.tx_dropped), (frames.len() as u64, 0));
    assert!(s.tx_waits >= 1, "the wait is counted: {s:?}");
}

/// A guest TX frame: a zero vnet header, then `len` bytes starting `first`.
fn marked_tx(first: u8, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; HDR_LEN];
    f.push(first);
    f.extend(pattern(len - 1, first));
    f
}

/// Posts `frames` (header included) as TX chains and kicks.
fn send_tx(r: &mut Rig, frames: &[Vec<u8>]) {
    let mem = r.drv.mem.clone();
    for (i, f) in frames.iter().enumerate() {
        let at = DATA_START + 0x1000 * i as u64;
        mem.write_slice(f, GuestAddress(at)).unwrap();
        r.drv.queues[TXQ].add_chain(&mem, &[(at, f.len() as u32)], false);
    }
    r.drv.kick(TXQ as u16);
}

#[test]
fn a_stage_drops_frames_both_ways_and_the_guest_gets_its_buffers_back() {
    let mut r = rig(false);
    r.drv.init(VERSION_1 | MAC, &[256, 256]);
    for (dir, first) in [(Direction::Tx, 0xee), (Direction::Rx, 0xdd)] {
        r.stages
            .push(Box::new(DropFirstByte { dir, first }))
            .unwrap();
    }
    let mem = r.drv.mem.clone();
    let frames = [marked_tx(0xee, 60), marked_tx(0x11, 60)];
    send_tx(&mut r, &frames);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&frames[1][HDR_LEN..]));
    assert!(peer_recv_nothing(&r.peer), "the dropped frame went out");
    for _ in 0..2 {
        r.drv.queues[TXQ]
            .wait_used(&mem, T)
            .expect("both chains answered");
    }
    // RX: the dropped frame's buffer takes the next frame.
    let addrs = post_rx(&mut r, 2, 1600);
    let (dropped, kept) = (vec![0xddu8; 100], vec![0x22u8; 90]);
    peer_send(&r.peer, &dropped);
    peer_send(&r.peer, &kept);
    let (id, len) = r.drv.queues[RXQ].wait_used(&mem, T).expect("used");
    assert_eq!((id, len), (0, (HDR_LEN + kept.len()) as u32));
    let mut got = vec![0u8; kept.len()];
    mem.read_slice(&mut got, GuestAddress(addrs[0] + HDR_LEN as u64))
        .unwrap();
    assert_eq!(got, kept);
    std::thread::sleep(Duration::from_millis(50));
    assert!(r.drv.queues[RXQ].pop_used(&mem).is_none());
    let s = r.stats.snapshot();
    assert_eq!(
        (s.tx_frames, s.tx_dropped, s.rx_frames, s.rx_dropped),
        (1, 1, 1, 1)
    );
    let c = r.stages.counters();
    assert_eq!((c[0].dropped, c[1].dropped), (1, 1));
}

/// A stage that answers a TX frame (an egress policy's RST) puts the
/// answer in the guest's RX buffers in the same pass, before anything
/// from the backend, with a clean vnet header; the frame itself goes
/// nowhere.
#[test]
fn a_stages_answer_to_a_tx_frame_reaches_rx_at_once() {
    for vnet in [true, false] {
        let mut r = rig(vnet);
        r.drv.init(VERSION_1 | MAC, &[256, 256]);
        let answer = vec![0x77u8; 74];
        r.stages
            .push(Box::new(AnswerTx {
                first: 0xee,
                answer: answer.clone(),
                injector: r.stages.injector().clone(),
            }))
            .unwrap();
        let mem = r.drv.mem.clone();
        let addrs = post_rx(&mut r, 2, 1600);
        send_tx(&mut r, &[marked_tx(0xee, 60)]);
        let (id, len) = r.drv.queues[RXQ].wait_used(&mem, T).expect("the answer");
        assert_eq!(
            (id, len),
            (0, (HDR_LEN + answer.len()) as u32),
            "vnet {vnet}"
        );
        let mut got = vec![0u8; HDR_LEN + answer.len()];
        mem.read_slice(&mut got, GuestAddress(addrs[0])).unwrap();
        assert_eq!(&got[..10], &[0u8; 10], "a clean header");
        assert_eq!(&got[HDR_LEN..], &answer[..]);
        assert!(peer_recv_nothing(&r.peer), "the answered frame went out");
        let s = r.stats.snapshot();
        assert_eq!((s.tx_dropped, s.rx_frames), (1, 1), "vnet {vnet}");
    }
}

/// A stage that holds TX frames (a rate limit's shape) slows the guest
/// without losing or reordering anything: each held chain stays in the
/// ring, unanswered, until the loop's timer brings the stage's time.
#[test]
fn a_stage_holding_tx_releases_the_frames_in_order_on_its_timer() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    let hold = Duration::from_millis(300);
    r.stages
        .push(Trickle::one_then_every(Direction::Tx, hold))
        .unwrap();
    let mem = r.drv.mem.clone();
    let frames: Vec<Vec<u8>> = (0..3).map(|i| marked_tx(0x30 + i, 200)).collect();
    let t0 = std::time::Instant::now();
    send_tx(&mut r, &frames);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&frames[0][..]));
    r.drv.queues[TXQ]
        .wait_used(&mem, T)
        .expect("the first is answered");
    assert!(peer_recv_nothing(&r.peer), "a held frame went out early");
    assert!(
        r.drv.queues[TXQ].pop_used(&mem).is_none(),
        "a held chain was answered"
    );
    for (i, f) in frames.iter().enumerate().skip(1) {
        assert_eq!(peer_recv(&r.peer).as_deref(), Some(&f[..]), "frame {i}");
        assert!(
            t0.elapsed() >= hold * i as u32,
            "frame {i} came before its time"
        );
        r.drv.queues[TXQ].wait_used(&mem, T).expect("answered");
    }
    let s = r.stats.snapshot();
    assert_eq!((s.tx_frames, s.tx_dropped, s.tx_waits), (3, 0, 0));
    assert_eq!(r.stages.counters()[0].held, 2);
}

/// Held on RX, a frame waits in the guest's buffers, unpublished, and
/// nothing more is read from the backend until the stage lets it go.
#[test]
fn a_stage_holding_rx_delivers_later_in_order_and_reads_nothing_meanwhile() {
    let mut r = rig(true);
    r.drv.init(all_features(true) & !MRG_RXBUF, &[256, 256, 64]);
    let hold = Duration::from_millis(300);
    r.stages
        .push(Trickle::one_then_every(Direction::Rx, hold))
        .unwrap();
    let mem = r.drv.mem.clone();
    let addrs = post_rx(&mut r, 4, 2048);
    let frames: Vec<Vec<u8>> = (0..3u8)
        .map(|i| {
            let mut f = vec![0u8; HDR_LEN];
            f.extend(pattern(300, 0x50 + i));
            f
        })
        .collect();
    let t0 = std::time::Instant::now();
    for f in &frames {
        peer_send(&r.peer, f);
    }
    for (i, f) in frames.iter().enumerate() {
        let (id, len) = r.drv.queues[RXQ].wait_used(&mem, T).expect("used");
        assert_eq!((id, len), (i as u32, f.len() as u32), "frame {i}");
        assert!(
            t0.elapsed() >= hold * i as u32,
            "frame {i} came before its time"
        );
        let mut got = vec![0u8; f.len()];
        mem.read_slice(&mut got, GuestAddress(addrs[i])).unwrap();
        got[10] = 0; // num_buffers
        assert_eq!(got, *f, "frame {i}");
        if i == 0 {
            std::thread::sleep(Duration::from_millis(50));
            assert!(
                r.drv.queues[RXQ].pop_used(&mem).is_none(),
                "published early"
            );
        }
    }
    let s = r.stats.snapshot();
    assert_eq!((s.rx_frames, s.rx_dropped), (3, 0));
}

/// The worker starts on the vCPU thread that wrote DRIVER_OK, under rvm's
/// seccomp filter, and its thread inherits it: activation and a data path
/// with a held frame (the hold timer) must get every call they make.
#[test]
fn the_data_path_and_its_hold_timer_work_under_the_seccomp_filter() {
    use crate::vmm::seccomp::{SeccompMode, ThreadFilter};
    let filter = ThreadFilter::new(SeccompMode::Enforce).unwrap().unwrap();
    let mut r = rig(true);
    let hold = Duration::from_millis(50);
    r.stages
        .push(Trickle::one_then_every(Direction::Tx, hold))
        .unwrap();
    let mut r = std::thread::spawn(move || {
        filter.confine_current_thread().unwrap();
        let s = r.drv.init(all_features(true), &[256, 256, 64]);
        assert_eq!(
            s & status::NEEDS_RESET,
            0,
            "activation failed under the filter"
        );
        r
    })
    .join()
    .unwrap();
    let mem = r.drv.mem.clone();
    let frames: Vec<Vec<u8>> = (0..2).map(|i| marked_tx(0x60 + i, 100)).collect();
    send_tx(&mut r, &frames);
    for f in &frames {
        assert_eq!(peer_recv(&r.peer).as_deref(), Some(&f[..]));
        r.drv.queues[TXQ].wait_used(&mem, T).expect("answered");
    }
    // (RX reads the fake TAP with recvmsg, which the filter refuses: a
    // real TAP is read with readv. The guest suites cover RX confined.)
}

/// A backend whose reads keep failing without consuming anything (here
/// EPERM, as the seccomp filter answers a refused call) must not spin the
/// worker: a pass gives up after a bounded number of errors in a row and
/// waits for the next event.
#[test]
fn a_backend_whose_reads_keep_failing_does_not_spin_the_worker() {
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
    use std::sync::atomic::{AtomicU64, Ordering};
    struct FailingReads {
        readable: vmm_sys_util::eventfd::EventFd,
        reads: AtomicU64,
    }
    impl AsRawFd for FailingReads {
        fn as_raw_fd(&self) -> RawFd {
            self.readable.as_raw_fd()
        }
    }
    impl AsFd for FailingReads {
        fn as_fd(&self) -> BorrowedFd<'_> {
            // SAFETY: the eventfd lives as long as self.
            unsafe { BorrowedFd::borrow_raw(self.readable.as_raw_fd()) }
        }
    }
    impl crate::net::backend::NetBackend for FailingReads {
        unsafe fn readv(&self, _iov: &[libc::iovec]) -> std::io::Result<usize> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            Err(std::io::Error::from_raw_os_error(libc::EPERM))
        }
        unsafe fn writev(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
            Ok(iov.iter().map(|v| v.iov_len).sum())
        }
        fn vnet_hdr(&self) -> bool {
            false
        }
        fn configure_offloads(&self, _: usize, _: u32) -> std::io::Result<()> {
            Ok(())
        }
    }
    let backend = Arc::new(FailingReads {
        readable: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        reads: AtomicU64::new(0),
    });
    // Readable for good (an eventfd with a count).
    backend.readable.write(1).unwrap();
    let params = NetParams {
        mac: [0x52, 0x54, 0, 1, 2, 3],
        mtu: 1500,
        name: "net-failing".into(),
    };
    let net = VirtioNet::new(params, backend.clone(), None);
    let stats = net.stats();
    let mut drv = SimDriver::new(Box::new(net), 16);
    drv.init(VERSION_1 | MAC, &[256, 256]);
    for i in 0..4u64 {
        drv.queues[RXQ].add_chain(&drv.mem, &[(DATA_START + i * 0x1000, 2048)], true);
    }
    drv.kick(RXQ as u16);
    std::thread::sleep(Duration::from_millis(300));
    let reads = backend.reads.load(Ordering::SeqCst);
    if !(1..=64).contains(&reads) {
        // A spinning worker never sees its stop: do not join it.
        std::mem::forget(drv);
        panic!("{reads} reads of a backend that keeps failing in 300 ms");
    }
    assert!(drv.queues[RXQ].pop_used(&drv.mem).is_none());
    assert_eq!(stats.snapshot().rx_frames, 0);
}

/// A stage that holds every frame until "now": the worker's timer still
/// waits a little (MIN_HOLD) between asks instead of spinning.
#[test]
fn a_stage_holding_until_now_does_not_spin_the_worker() {
    use crate::net::stage::testing::HoldUntilNow;
    use std::sync::atomic::{AtomicU64, Ordering};
    for dir in [Direction::Tx, Direction::Rx] {
        let mut r = rig(false);
        r.drv.init(VERSION_1 | MAC, &[256, 256]);
        let calls = Arc::new(AtomicU64::new(0));
        r.stages
            .push(Box::new(HoldUntilNow {
                dir,
                calls: calls.clone(),
            }))
            .unwrap();
        post_rx(&mut r, 2, 2048);
        send_tx(&mut r, &[marked_tx(0x11, 100)]);
        peer_send(&r.peer, &pattern(100, 3));
        std::thread::sleep(Duration::from_millis(300));
        let n = calls.load(Ordering::SeqCst);
        // 300 ms / 50 us = 6000 at most; a spinning worker asks millions.
        assert!((1..=6000).contains(&n), "{dir:?}: {n} asks in 300 ms");
    }
}

fn set_link(r: &mut Rig, up: bool) {
    r.drv
        .pci
        .device_mut()
        .as_any_mut()
        .downcast_mut::<VirtioNet>()
        .expect("a VirtioNet")
        .set_link(up);
}

/// The link status the driver reads in the device configuration.
fn link_status(r: &mut Rig) -> u16 {
    let mut b = [0u8; 2];
    r.drv.read(0x2000 + 6, &mut b);
    u16::from_le_bytes(b)
}

/// The owner pulls the cable: STATUS reads 0 after a config-change
/// interrupt; the TAP keeps the host's frame (no buffer is filled), the
/// guest's chain is returned unsent and counted as dropped. Plugged in
/// again: STATUS 1, another config interrupt, the waiting frame arrives
/// without a new kick, and TX goes out.
#[test]
fn link_down_moves_no_frame_either_way_and_up_resumes() {
    let mut r = rig(true);
    r.drv.init(all_features(true), &[256, 256, 64]);
    // Configuration changes on vector 3 (after the three queues').
    r.drv.write(0x10, &3u16.to_le_bytes());
    assert_eq!(link_status(&mut r), 1);
    set_link(&mut r, false);
    assert_eq!(link_status(&mut r), 0);
    assert_eq!(r.drv.interrupts(3), 1, "config-change interrupt");
    let mem = r.drv.mem.clone();
    post_rx(&mut r, 45, 1536);
    let mut pkt = vec![0u8; HDR_LEN];
    pkt.extend(pattern(100, 8));
    peer_send(&r.peer, &pkt);
    let frame = pattern(HDR_LEN + 64, 7);
    mem.write_slice(&frame, GuestAddress(DATA_START)).unwrap();
    r.drv.queues[TXQ].add_chain(&mem, &[(DATA_START, frame.len() as u32)], false);
    r.drv.kick(TXQ as u16);
    assert!(
        r.drv.queues[TXQ].wait_used(&mem, T).is_some(),
        "TX chain returned"
    );
    assert!(
        peer_recv_nothing(&r.peer),
        "a frame went out with the link down"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        r.drv.queues[RXQ].pop_used(&mem).is_none(),
        "a frame came in"
    );
    let s = r.stats.snapshot();
    assert_eq!((s.tx_dropped, s.tx_frames, s.rx_frames), (1, 0, 0));
    set_link(&mut r, true);
    assert_eq!(link_status(&mut r), 1);
    assert_eq!(r.drv.interrupts(3), 1);
    assert!(
        r.drv.queues[RXQ].wait_used(&mem, T).is_some(),
        "the kept frame"
    );
    r.drv.queues[TXQ].add_chain(&mem, &[(DATA_START, frame.len() as u32)], false);
    r.drv.kick(TXQ as u16);
    // With a vnet header on the TAP the header goes too.
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&frame[..]));
}
