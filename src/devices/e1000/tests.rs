//! The e1000 against in-process guest memory and a socketpair standing in
//! for the TAP: both register windows, the rings, the interrupt line and
//! hostile programming.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::regs::*;
use super::{E1000Params, E1000};
use crate::devices::test_backend::{fake_tap, pattern, peer_recv, peer_recv_nothing, peer_send};
use crate::devices::LevelIrq;
use crate::net::stage::testing::{AnswerTx, DropFirstByte, Trickle};
use crate::net::stage::Direction;
use crate::pci::PciDevice;
use crate::vmm::memory::GuestRam;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0xe1, 0, 1];
const MEM: u64 = 1 << 20;
const TX_RING: u64 = 0x1000;
const RX_RING: u64 = 0x2000;
const BUFS: u64 = 0x10000;

struct Line(Arc<AtomicBool>);

impl LevelIrq for Line {
    fn set_level(&self, asserted: bool) {
        self.0.store(asserted, Ordering::SeqCst);
    }
}

struct Rig {
    dev: E1000,
    mem: GuestRam,
    peer: OwnedFd,
    irq: Arc<AtomicBool>,
    /// The device's end of the fake TAP.
    tap: Arc<crate::devices::test_backend::FakeTap>,
}

fn rig() -> Rig {
    rig_with_tap(false)
}

/// A rig whose TAP has a vnet header (`vnet`) or not.
fn rig_with_tap(vnet: bool) -> Rig {
    let mem = crate::vmm::memory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let (tap, peer) = fake_tap(vnet);
    let irq = Arc::new(AtomicBool::new(false));
    let fake = tap.clone();
    let dev = E1000::new(
        E1000Params {
            mac: MAC,
            tap_name: None,
            mmio_addr: 0xe000_0000,
            io_addr: 0xc000,
            irq_line: 16,
            name: "e1000-test".into(),
            seccomp: None,
        },
        mem.clone(),
        tap,
        Box::new(Line(irq.clone())),
    )
    .unwrap();
    let mut r = Rig {
        dev,
        mem,
        peer,
        irq,
        tap: fake,
    };
    // As Linux's driver does at probe (pci_set_master).
    r.bus_master(true);
    r
}

impl Rig {
    /// Writes the PCI command register: I/O and memory space on, bus
    /// mastering as `on`.
    fn bus_master(&mut self, on: bool) {
        use crate::pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_IO, COMMAND_MEMORY};
        let cmd = COMMAND_IO | COMMAND_MEMORY | if on { COMMAND_BUS_MASTER } else { 0 };
        self.dev.config_mut().write(COMMAND, &cmd.to_le_bytes());
        self.dev.config_written(COMMAND, &cmd.to_le_bytes());
    }

    fn w(&mut self, reg: u32, v: u32) {
        self.dev.bar_write(0, u64::from(reg), &v.to_le_bytes());
    }
    fn r(&mut self, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(0, u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }
    fn io_w(&mut self, reg: u32, v: u32) {
        self.dev.bar_write(1, 0, &reg.to_le_bytes());
        self.dev.bar_write(1, 4, &v.to_le_bytes());
    }
    fn io_r(&mut self, reg: u32) -> u32 {
        self.dev.bar_write(1, 0, &reg.to_le_bytes());
        let mut b = [0u8; 4];
        self.dev.bar_read(1, 4, &mut b);
        u32::from_le_bytes(b)
    }

    /// A TX ring of `n` descriptors, enabled.
    fn tx_ring(&mut self, n: u32) {
        self.w(TDBAL, TX_RING as u32);
        self.w(TDBAH, 0);
        self.w(TDLEN, n * 16);
        self.w(TDH, 0);
        self.w(TDT, 0);
        self.w(TCTL, TCTL_EN);
    }

    /// A legacy TX descriptor at index i: one whole frame, RS set.
    fn tx_desc(&mut self, i: u64, addr: u64, len: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..10].copy_from_slice(&len.to_le_bytes());
        d[11] = 0x01 | 0x02 | 0x08; // EOP, IFCS, RS
        self.mem
            .write_slice(&d, GuestAddress(TX_RING + 16 * i))
            .unwrap();
    }

    /// An RX ring of `n` 2 KiB buffers, all given to the device.
    fn rx_ring(&mut self, n: u32) {
        for i in 0..u64::from(n) {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&(BUFS + i * 2048).to_le_bytes());
            self.mem
                .write_slice(&d, GuestAddress(RX_RING + 16 * i))
                .unwrap();
        }
        self.w(RDBAL, RX_RING as u32);
        self.w(RDBAH, 0);
        self.w(RDLEN, n * 16);
        self.w(RDH, 0);
        self.w(RDT, n - 1);
        self.w(RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC);
    }

    fn wait_rdh(&mut self, want: u32) -> bool {
        self.wait_reg(RDH, want)
    }

    /// The NIC's thread works on its own: wait for it.
    fn wait_reg(&mut self, reg: u32, want: u32) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if self.r(reg) == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }
}

fn frame_to(dst: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut f = pattern(len, seed);
    f[..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    f
}

#[test]
fn linux_style_reset_through_the_io_window_lands() {
    let mut r = rig();
    r.w(IMS, ICR_RXT0 | ICR_TXDW);
    r.w(RCTL, RCTL_EN);
    // What e1000_reset_hw does for the 82540: E1000_WRITE_REG_IO(CTRL, RST).
    let ctrl = r.r(CTRL);
    r.io_w(CTRL, ctrl | CTRL_RST);
    let resets = r.dev.resets();
    assert_eq!(resets.io.load(Ordering::SeqCst), 1);
    assert_eq!(resets.mmio.load(Ordering::SeqCst), 0);
    assert_eq!(r.r(IMS), 0, "the reset cleared the interrupt mask");
    assert_eq!(r.r(RCTL), 0, "and receive");
    assert_eq!(r.r(CTRL) & CTRL_RST, 0, "RST reads back 0 once done");
    // The receive address is reloaded from the EEPROM.
    assert_eq!(r.r(RA).to_le_bytes(), MAC[..4]);
    assert_eq!(
        r.r(RA + 4),
        u32::from(u16::from_le_bytes([MAC[4], MAC[5]])) | RAH_AV
    );
}

#[test]
fn io_window_reads_the_same_registers_as_mmio() {
    let mut r = rig();
    r.w(IMS, 0x9d);
    r.w(TIPG, 0x0060_200a);
    for reg in [CTRL, STATUS, RA, RA + 4, IMS, TIPG, MANC] {
        assert_eq!(r.io_r(reg), r.r(reg), "register {reg:#x}");
    }
    assert_ne!(r.io_r(STATUS) & STATUS_LU, 0, "link up");
    // Writes through IODATA land where MMIO reads them.
    r.io_w(TIDV, 0x1234);
    assert_eq!(r.r(TIDV), 0x1234);
    // IOADDR reads back; offsets beyond IODATA read 0.
    r.dev.bar_write(1, 0, &STATUS.to_le_bytes());
    let mut b = [0u8; 4];
    r.dev.bar_read(1, 0, &mut b);
    assert_eq!(u32::from_le_bytes(b), STATUS);
    r.dev.bar_read(1, 8, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn eerd_reads_the_mac_from_the_eeprom() {
    let mut r = rig();
    for (i, pair) in MAC.chunks(2).enumerate() {
        r.w(EERD, EERD_START | ((i as u32) << EERD_ADDR_SHIFT));
        let v = r.r(EERD);
        assert_ne!(v & EERD_DONE, 0);
        assert_eq!(
            (v >> EERD_DATA_SHIFT) as u16,
            u16::from_le_bytes([pair[0], pair[1]])
        );
    }
}

#[test]
fn tx_frame_reaches_the_tap_and_the_interrupt_follows_icr_and_ims() {
    let mut r = rig();
    r.tx_ring(8);
    r.w(IMS, ICR_TXDW);
    let f = frame_to([2, 0, 0, 0, 0, 9], 200, 3);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    r.tx_desc(0, BUFS, f.len() as u16);
    r.w(TDT, 1);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&f[..]));
    assert!(r.wait_reg(TDH, 1));
    let status: u8 = r.mem.read_obj(GuestAddress(TX_RING + 12)).unwrap();
    assert_eq!(status & 1, 1, "DD written back");
    assert!(r.irq.load(Ordering::SeqCst), "TXDW is enabled: line high");
    let icr = r.r(ICR);
    assert_ne!(icr & ICR_TXDW, 0);
    assert!(
        !r.irq.load(Ordering::SeqCst),
        "reading ICR clears it: line low"
    );
    assert_eq!(r.r(ICR), 0);
    // Masked causes do not raise the line.
    r.w(IMC, ICR_TXDW);
    r.tx_desc(1, BUFS, f.len() as u16);
    r.w(TDT, 2);
    assert!(peer_recv(&r.peer).is_some());
    assert!(r.wait_reg(TDH, 2));
    assert!(!r.irq.load(Ordering::SeqCst));
    assert_eq!(r.r(STAT_GPTC), 2, "good packets sent (read to clear)");
    assert_eq!(r.r(STAT_GPTC), 0);
}

#[test]
fn tx_ring_wraps_around() {
    let mut r = rig();
    r.tx_ring(8);
    r.w(TDH, 6);
    r.w(TDT, 6);
    let frames: Vec<Vec<u8>> = (0..4)
        .map(|i| frame_to([2, 0, 0, 0, 0, 9], 100 + i, i as u8))
        .collect();
    for (k, f) in frames.iter().enumerate() {
        let at = BUFS + 4096 * k as u64;
        r.mem.write_slice(f, GuestAddress(at)).unwrap();
        r.tx_desc((6 + k as u64) % 8, at, f.len() as u16);
    }
    r.w(TDT, 2);
    for f in &frames {
        assert_eq!(peer_recv(&r.peer).as_deref(), Some(&f[..]));
    }
    assert!(r.wait_reg(TDH, 2));
}

#[test]
fn rx_frames_land_in_the_ring_and_others_are_filtered() {
    let mut r = rig();
    r.w(IMS, ICR_RXT0);
    r.rx_ring(8);
    let mine = frame_to(MAC, 300, 7);
    peer_send(&r.peer, &frame_to([2, 0, 0, 0, 0, 0x77], 300, 1)); // not ours
    peer_send(&r.peer, &mine);
    assert!(r.wait_rdh(1), "RDH advanced past one descriptor");
    let mut got = vec![0u8; mine.len()];
    r.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    assert_eq!(got, mine, "the foreign frame was not written over it");
    let len: u16 = r.mem.read_obj(GuestAddress(RX_RING + 8)).unwrap();
    let status: u8 = r.mem.read_obj(GuestAddress(RX_RING + 12)).unwrap();
    assert_eq!(usize::from(len), mine.len());
    assert_eq!(status & 3, 3, "DD and EOP");
    assert!(r.irq.load(Ordering::SeqCst));
    assert_ne!(r.r(ICR) & ICR_RXT0, 0);
    // Broadcast with BAM.
    peer_send(&r.peer, &frame_to([0xff; 6], 64, 2));
    assert!(r.wait_rdh(2));
}

#[test]
fn rx_without_secrc_reports_room_for_the_crc_and_jumbo_spans_buffers() {
    let mut r = rig();
    r.rx_ring(16);
    r.w(RCTL, RCTL_EN | RCTL_LPE); // keeps the CRC; 2 KiB buffers
    let big = frame_to(MAC, 5000, 4);
    peer_send(&r.peer, &big);
    assert!(r.wait_rdh(3), "5004 bytes take three 2 KiB buffers");
    let mut total = 0usize;
    for i in 0..3u64 {
        let len: u16 = r.mem.read_obj(GuestAddress(RX_RING + 16 * i + 8)).unwrap();
        let status: u8 = r.mem.read_obj(GuestAddress(RX_RING + 16 * i + 12)).unwrap();
        assert_eq!(status & 2 != 0, i == 2, "EOP only on the last");
        total += usize::from(len);
    }
    assert_eq!(total, big.len() + 4);
    let mut got = vec![0u8; big.len()];
    for i in 0..3u64 {
        let from = (i * 2048) as usize;
        let n = (big.len() - from).min(2048);
        r.mem
            .read_slice(&mut got[from..from + n], GuestAddress(BUFS + i * 2048))
            .unwrap();
    }
    assert_eq!(got, big);
}

#[test]
fn rx_without_lpe_never_writes_past_1522_bytes_of_a_buffer() {
    // Linux's e1000 posts 1522-byte buffers with RCTL.BSIZE at 2048 and
    // LPE off: the device must stop at 1522 bytes, CRC included.
    let mut r = rig();
    r.rx_ring(8);
    r.w(RCTL, RCTL_EN); // keeps the CRC, no long packets, 2 KiB buffers
    let canary = [0xa5u8; 2048];
    r.mem.write_slice(&canary, GuestAddress(BUFS)).unwrap();
    peer_send(&r.peer, &frame_to(MAC, 1600, 3)); // too long
    let biggest = frame_to(MAC, 1518, 5); // a VLAN-tagged full frame
    peer_send(&r.peer, &biggest);
    assert!(r.wait_rdh(1), "the 1518-byte frame arrived");
    assert_eq!(r.r(STAT_ROC), 1, "the 1600-byte one was counted oversize");
    let len: u16 = r.mem.read_obj(GuestAddress(RX_RING + 8)).unwrap();
    assert_eq!(len, 1522, "the frame and room for its CRC");
    let mut got = vec![0u8; 2048];
    r.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    assert_eq!(&got[..1518], &biggest[..]);
    assert!(
        got[1522..].iter().all(|&b| b == 0xa5),
        "nothing written past byte 1522 of the buffer"
    );
    assert_eq!(r.r(RDH), 1, "the oversize frame took no descriptor");
}

#[test]
fn rx_waits_for_buffers_instead_of_dropping() {
    let mut r = rig();
    r.rx_ring(8);
    r.w(RDT, 0); // no buffers given yet
    let f = frame_to(MAC, 100, 9);
    peer_send(&r.peer, &f);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.r(RDH), 0);
    r.w(RDT, 7);
    assert!(r.wait_rdh(1), "the frame arrived once buffers came");
}

#[test]
fn hostile_programming_is_ignored_and_a_reset_recovers() {
    let mut r = rig();
    // Rings outside memory, empty, or with indices past their end.
    for (base, len, head, tail) in [
        (MEM - 16, 128u32, 0u32, 1u32),
        (u64::MAX - 15, 128, 0, 1),
        (TX_RING, 0, 0, 1),
        (TX_RING, 128, 100, 101),
        (TX_RING, 128, 0, 5000),
    ] {
        r.w(TDBAL, base as u32);
        r.w(TDBAH, (base >> 32) as u32);
        r.w(TDLEN, len);
        r.w(TDH, head);
        r.w(TCTL, TCTL_EN);
        r.w(TDT, tail);
        r.w(RDBAL, base as u32);
        r.w(RDBAH, (base >> 32) as u32);
        r.w(RDLEN, len);
        r.w(RDH, head);
        r.w(RCTL, RCTL_EN | RCTL_UPE);
        r.w(RDT, tail);
        peer_send(&r.peer, &frame_to(MAC, 80, 1));
    }
    // Descriptors whose buffers are outside memory.
    r.tx_ring(8);
    r.tx_desc(0, MEM + 4096, 1000);
    r.tx_desc(1, u64::MAX - 10, 0xffff);
    r.w(TDT, 2);
    assert!(peer_recv_nothing(&r.peer));
    // Every register, every width, garbage.
    for off in (0..super::MMIO_SIZE).step_by(4) {
        if off as u32 == CTRL {
            continue;
        }
        r.dev.bar_write(0, off, &0xffff_ffffu32.to_le_bytes());
        let mut b = [0u8; 4];
        r.dev.bar_read(0, off, &mut b);
    }
    for (off, len) in [(1u64, 1usize), (2, 2), (3, 4), (0x1_ffff, 4), (0x2_0000, 4)] {
        let mut b = vec![0u8; len];
        r.dev.bar_read(0, off, &mut b);
        r.dev.bar_write(0, off, &b);
        r.dev.bar_read(1, off, &mut b);
        r.dev.bar_write(1, off, &b);
    }
    // A reset brings back a working device.
    r.w(CTRL, CTRL_RST);
    r.tx_ring(8);
    let f = frame_to([2, 0, 0, 0, 0, 9], 120, 5);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    r.tx_desc(0, BUFS, f.len() as u16);
    r.w(TDT, 1);
    // Frames queued by the hostile phase may come first.
    let end = Instant::now() + Duration::from_secs(5);
    let mut seen = false;
    while Instant::now() < end && !seen {
        seen = peer_recv(&r.peer).is_some_and(|g| g == f);
    }
    assert!(seen);
    assert_eq!(r.dev.resets().mmio.load(Ordering::SeqCst), 1);
}

#[test]
fn buffer_sizes_follow_rctl() {
    use super::rx::buffer_size_for_tests as bs;
    assert_eq!(bs(0), 2048);
    assert_eq!(bs(1 << RCTL_BSIZE_SHIFT), 1024);
    assert_eq!(bs(3 << RCTL_BSIZE_SHIFT), 256);
    assert_eq!(bs((1 << RCTL_BSIZE_SHIFT) | RCTL_BSEX), 16384);
    assert_eq!(bs((3 << RCTL_BSIZE_SHIFT) | RCTL_BSEX), 4096);
}

#[test]
fn link_follows_the_host_side_and_raises_lsc() {
    let mut r = rig();
    r.w(IMS, ICR_LSC);
    r.dev.core().set_link(false);
    assert_eq!(r.r(STATUS) & STATUS_LU, 0);
    assert!(r.irq.load(Ordering::SeqCst));
    assert_ne!(r.r(ICR) & ICR_LSC, 0);
    // No link, no receive.
    r.rx_ring(8);
    peer_send(&r.peer, &frame_to(MAC, 100, 1));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.r(RDH), 0);
    r.dev.core().set_link(true);
    assert_ne!(r.r(STATUS) & STATUS_LU, 0);
    assert_ne!(r.r(ICR) & ICR_LSC, 0);
    // The frame waiting in the TAP comes in with no write to RDT: Linux
    // moves RDT only after it received something, so a receiver that
    // waited for one would stay stalled after a link flap.
    assert!(r.wait_rdh(1));
}

/// Regression: a TAP deleted under a running guest polls as an error
/// forever; the RX thread spun on it at 100% CPU. Now it drops the TAP
/// from its epoll set once, takes the link down (LSC), and stays idle.
#[test]
fn a_failed_tap_takes_the_link_down_and_the_rx_thread_idles() {
    let mut r = rig();
    r.w(IMS, ICR_LSC);
    r.rx_ring(8);
    assert_ne!(r.r(STATUS) & STATUS_LU, 0);
    // The socketpair's far end closing: the stand-in's "TAP deleted".
    let Rig { peer, .. } = &mut r;
    drop(std::mem::replace(
        peer,
        std::fs::File::open("/dev/null").unwrap().into(),
    ));
    let end = Instant::now() + Duration::from_secs(5);
    while r.r(STATUS) & STATUS_LU != 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(r.r(STATUS) & STATUS_LU, 0, "link still up");
    assert_ne!(r.r(ICR) & ICR_LSC, 0);
    let before = rx_thread_cpu_secs(&r.dev);
    std::thread::sleep(Duration::from_millis(500));
    let used = rx_thread_cpu_secs(&r.dev) - before;
    assert!(used < 0.1, "the RX thread spins: {used} s of CPU in 0.5 s");
    // A kick (the driver refilling its ring) does not bring it back.
    r.w(RDT, 6);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.r(STATUS) & STATUS_LU, 0);
}

/// CPU time the device's RX thread has used, from its pthread CPU clock.
fn rx_thread_cpu_secs(dev: &E1000) -> f64 {
    use std::os::unix::thread::JoinHandleExt;
    let (_, t) = dev.rx_thread.as_ref().unwrap();
    let mut clock: libc::clockid_t = 0;
    // SAFETY: the thread is running (not joined), so its pthread_t is valid,
    // and `clock` is a valid place for the id.
    assert_eq!(
        unsafe { libc::pthread_getcpuclockid(t.as_pthread_t(), &mut clock) },
        0
    );
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a valid timespec to fill.
    assert_eq!(unsafe { libc::clock_gettime(clock, &mut ts) }, 0);
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// The fuzz targets' threadless e1000: a TDT write sends nothing until
/// the caller does the NIC thread's work.
#[test]
fn synchronous_e1000_transmits_only_when_asked() {
    let mem = crate::vmm::memory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let (tap, peer) = fake_tap(false);
    let fake = tap.clone();
    let dev = E1000::new_synchronous(
        E1000Params {
            mac: MAC,
            tap_name: None,
            mmio_addr: 0xe000_0000,
            io_addr: 0xc000,
            irq_line: 16,
            name: "e1000-sync".into(),
            seccomp: None,
        },
        mem.clone(),
        tap,
        Box::new(Line(Arc::new(AtomicBool::new(false)))),
    )
    .unwrap();
    let mut r = Rig {
        dev,
        mem,
        peer,
        irq: Arc::new(AtomicBool::new(false)),
        tap: fake,
    };
    r.bus_master(true);
    r.tx_ring(8);
    let f = frame_to([2, 0, 0, 0, 0, 9], 100, 1);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    r.tx_desc(0, BUFS, f.len() as u16);
    r.w(TDT, 1);
    assert!(peer_recv_nothing(&r.peer));
    assert_eq!(r.r(TDH), 0);
    r.dev.transmit_now();
    assert_eq!(r.r(TDH), 1);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&f[..]));
    // RX: the frame waits in the TAP until the caller receives.
    r.rx_ring(8);
    peer_send(&r.peer, &frame_to([0xff; 6], 60, 2));
    assert_eq!(r.r(RDH), 0);
    assert!(!r.dev.receive_now(), "drained, not short of buffers");
    assert_eq!(r.r(RDH), 1);
}

/// Byte enables per register, as the hardware applies them: a partial
/// write changes only its bytes, and on write-1-to-clear/set registers the
/// bytes not written act as zeros.
#[test]
fn partial_writes_touch_only_their_bytes() {
    let mut r = rig();
    let causes = ICR_TXDW | ICR_LSC | ICR_RXO | (1 << 7) | (1 << 16);
    r.w(IMS, causes);
    // One byte of 0x01 to IMC masks TXDW only.
    r.dev.bar_write(0, u64::from(IMC), &[0x01]);
    assert_eq!(r.r(IMS), causes & !ICR_TXDW);
    // One byte to ICR clears the causes it names, and no other.
    r.w(ICS, causes);
    r.dev.bar_write(0, u64::from(ICR), &[ICR_LSC as u8]);
    let mut b = [0u8; 4];
    r.dev.bar_read(0, u64::from(ICR), &mut b); // (reading clears: last)
    assert_eq!(u32::from_le_bytes(b), causes & !ICR_LSC);
    // The upper half of IMS, written alone, sets only its own bits.
    r.w(IMC, u32::MAX);
    r.dev.bar_write(0, u64::from(IMS) + 2, &[0x01, 0x00]);
    assert_eq!(r.r(IMS), 1 << 16);
    // A byte written through IODATA lands in the register IOADDR names,
    // merged with that register's other bytes, and IOADDR stays.
    r.w(RCTL, 0x0400_8000);
    r.dev.bar_write(1, 0, &RCTL.to_le_bytes());
    r.dev.bar_write(1, 4, &[0x02]);
    assert_eq!(r.r(RCTL), 0x0400_8002);
    let mut a = [0u8; 4];
    r.dev.bar_read(1, 0, &mut a);
    assert_eq!(u32::from_le_bytes(a), RCTL, "IOADDR unchanged");
}

/// The transport of a TSO frame the tests post.
#[derive(Clone, Copy)]
enum L4 {
    Udp,
    Tcp,
}

/// Writes `frames` TSO frames of `payload` bytes (IPv4, UDP or TCP, one
/// context and one data descriptor each, the frame itself at BUFS) into a
/// ring with room for them (a multiple of 8 descriptors, as TDLEN is of
/// 128 bytes, and one to spare: TDT stays below the ring's size), without
/// handing them over. Returns the tail to write to TDT.
fn write_tso_frames(r: &mut Rig, frames: u32, l4: L4, payload: u32, mss: u16) -> u32 {
    let n = (2 * frames + 1).next_multiple_of(8);
    r.tx_ring(n);
    let (l4_len, proto, tucso, tcp) = match l4 {
        L4::Udp => (8, 17, 40, 0),
        L4::Tcp => (20, 6, 50, 0x01),
    };
    let hdr_len = 14 + 20 + l4_len;
    let len = hdr_len + payload;
    let mut f = frame_to([2, 0, 0, 0, 0, 9], len as usize, 1);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[22] = 64; // TTL
    f[23] = proto;
    if let L4::Tcp = l4 {
        f[46] = 0x50; // data offset: 20 bytes
    }
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    let mut ctx = [0u8; 16];
    ctx[0] = 14; // IPCSS
    ctx[1] = 24; // IPCSO
    ctx[2..4].copy_from_slice(&33u16.to_le_bytes()); // IPCSE
    ctx[4] = 34; // TUCSS
    ctx[5] = tucso; // the UDP or TCP checksum
                    // PAYLEN, context type, TUCMD = DEXT | TSE | IP, and TCP or not.
    ctx[8..12].copy_from_slice(&(payload | (0x20 | 0x04 | 0x02 | tcp) << 24).to_le_bytes());
    ctx[13] = hdr_len as u8; // HDRLEN
    ctx[14..16].copy_from_slice(&mss.to_le_bytes()); // MSS
    let mut data = [0u8; 16];
    data[..8].copy_from_slice(&BUFS.to_le_bytes());
    // Length, data type, DCMD = DEXT | TSE | EOP; POPTS = TXSM.
    data[8..12].copy_from_slice(&(len | 1 << 20 | (0x20 | 0x04 | 0x01) << 24).to_le_bytes());
    data[13] = 0x02;
    for i in 0..u64::from(frames) {
        for (j, d) in [ctx, data].iter().enumerate() {
            let at = TX_RING + 16 * (2 * i + j as u64);
            r.mem.write_slice(d, GuestAddress(at)).unwrap();
        }
    }
    2 * frames
}

/// Posts `frames` UDP TSO frames with an MSS of 1 (software segmentation:
/// 4096 writes each) and hands them to the device.
fn post_heavy_tx(r: &mut Rig, frames: u32) -> u32 {
    let tail = write_tso_frames(r, frames, L4::Udp, 4096, 1);
    r.w(TDT, tail);
    // The pass has begun once the first segment is out.
    assert!(peer_recv(&r.peer).is_some(), "TX did not start");
    tail
}

/// A ring full of frames that cost thousands of writes each: the RX/TX
/// thread works through it in bounded passes, so a vCPU reading a
/// register (the interrupt handler reading ICR) gets in between passes,
/// and shutdown does not wait for the whole ring.
#[test]
fn a_long_tx_ring_neither_holds_the_registers_nor_delays_shutdown() {
    let mut r = rig();
    let tail = post_heavy_tx(&mut r, 1003);
    let tdh = r.r(TDH);
    assert!(
        tdh < tail,
        "the register read waited for the whole ring (TDH {tdh})"
    );

    let mut r = rig();
    let tail = post_heavy_tx(&mut r, 1003);
    let t = Instant::now();
    r.dev.shutdown();
    let took = t.elapsed();
    let tdh = r.r(TDH);
    assert!(tdh < tail, "shutdown waited for the whole ring ({took:?})");
    assert!(took < Duration::from_secs(1), "shutdown took {took:?}");
}

/// With Bus Master Enable clear the e1000 neither reads TX descriptors nor
/// writes RX buffers or descriptors; both resume when the bit is set.
#[test]
fn no_dma_while_bus_mastering_is_off() {
    let mut r = rig();
    r.tx_ring(8);
    r.rx_ring(8);
    r.bus_master(false);
    let f = frame_to([2, 0, 0, 0, 0, 9], 200, 3);
    r.mem.write_slice(&f, GuestAddress(BUFS + 0x8000)).unwrap();
    r.tx_desc(0, BUFS + 0x8000, f.len() as u16);
    r.w(TDT, 1);
    let incoming = frame_to(MAC, 100, 4);
    peer_send(&r.peer, &incoming);
    assert!(peer_recv_nothing(&r.peer), "a TX descriptor was read");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!((r.r(TDH), r.r(RDH)), (0, 0), "descriptors were processed");
    let mut untouched = vec![0u8; incoming.len()];
    r.mem
        .read_slice(&mut untouched, GuestAddress(BUFS))
        .unwrap();
    assert!(
        untouched.iter().all(|&b| b == 0),
        "an RX buffer was written"
    );
    let status: u8 = r.mem.read_obj(GuestAddress(TX_RING + 12)).unwrap();
    assert_eq!(status, 0, "a TX status was written back");
    r.bus_master(true);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&f[..]));
    assert!(r.wait_rdh(1), "RX after bus mastering came back");
}

/// A TAP answering EAGAIN (a small sndbuf=, its queue full) holds the
/// guest back instead of losing its frames: TDH stays at the frame that
/// could not go, no drop is counted, and once the TAP takes writes again
/// every frame goes out in order.
#[test]
fn tx_waits_for_a_tap_that_would_block_instead_of_dropping() {
    let mut r = rig();
    r.tx_ring(8);
    let queued = crate::devices::test_backend::fill_until_blocked(&r.tap, 1000);
    let frames: Vec<Vec<u8>> = (0..4)
        .map(|i| frame_to([2, 0, 0, 0, 0, 9], 200, 50 + i))
        .collect();
    for (i, f) in frames.iter().enumerate() {
        let at = BUFS + 0x1000 * i as u64;
        r.mem.write_slice(f, GuestAddress(at)).unwrap();
        r.tx_desc(i as u64, at, f.len() as u16);
    }
    r.w(TDT, 4);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.r(TDH), 0, "a frame was consumed while the TAP was full");
    assert_eq!(
        r.dev.stats().snapshot().tx_dropped,
        0,
        "frames were dropped"
    );
    crate::devices::test_backend::expect_after_filler(&r.peer, queued, &frames);
    assert!(r.wait_reg(TDH, 4));
    let s = r.dev.stats().snapshot();
    assert_eq!((s.tx_frames, s.tx_dropped), (4, 0));
    assert!(s.tx_waits >= 1, "the wait is counted: {s:?}");
}

/// TX blocked on a full TAP, then the driver turns TX off (a reset, an
/// ifdown) and the TAP drains: the NIC thread must stop watching the TAP
/// for room, not spin on a writable TAP it has nothing to write to.
#[test]
fn a_blocked_tx_turned_off_does_not_spin_on_the_taps_room() {
    let mut r = rig();
    r.tx_ring(8);
    let queued = crate::devices::test_backend::fill_until_blocked(&r.tap, 1000);
    let f = frame_to([2, 0, 0, 0, 0, 9], 200, 60);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    r.tx_desc(0, BUFS, f.len() as u16);
    r.w(TDT, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.r(TDH), 0, "blocked");
    r.w(TCTL, 0);
    crate::devices::test_backend::expect_after_filler(&r.peer, queued, &[]);
    std::thread::sleep(Duration::from_millis(300));
    let before = rx_thread_cpu_secs(&r.dev);
    std::thread::sleep(Duration::from_secs(2));
    let used = rx_thread_cpu_secs(&r.dev) - before;
    assert!(used < 0.5, "the NIC thread used {used:.2} CPU-s in 2 s");
}

#[test]
fn a_stage_drops_frames_both_ways_and_the_ring_goes_on() {
    let mut r = rig();
    let stages = r.dev.stages();
    stages
        .push(Box::new(DropFirstByte {
            dir: Direction::Tx,
            first: 0xee,
        }))
        .unwrap();
    stages
        .push(Box::new(DropFirstByte {
            dir: Direction::Rx,
            first: 0xff,
        }))
        .unwrap();
    r.tx_ring(8);
    let frames = [
        frame_to([0xee, 0, 0, 0, 0, 9], 200, 3),
        frame_to([2, 0, 0, 0, 0, 9], 200, 4),
    ];
    for (k, f) in frames.iter().enumerate() {
        let at = BUFS + 4096 * k as u64;
        r.mem.write_slice(f, GuestAddress(at)).unwrap();
        r.tx_desc(k as u64, at, f.len() as u16);
    }
    r.w(TDT, 2);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&frames[1][..]));
    assert!(peer_recv_nothing(&r.peer), "the dropped frame went out");
    assert!(r.wait_reg(TDH, 2), "both descriptors completed");
    // RX: the broadcast is dropped, its buffer takes the next frame.
    r.rx_ring(8);
    let mine = frame_to(MAC, 300, 7);
    peer_send(&r.peer, &frame_to([0xff; 6], 300, 1));
    peer_send(&r.peer, &mine);
    assert!(r.wait_rdh(1));
    let mut got = vec![0u8; mine.len()];
    r.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    assert_eq!(got, mine);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.r(RDH), 1, "the dropped frame took no descriptor");
    let s = r.dev.stats().snapshot();
    assert_eq!(
        (s.tx_frames, s.tx_dropped, s.rx_frames, s.rx_dropped),
        (1, 1, 1, 1)
    );
    let c = stages.counters();
    assert_eq!((c[0].dropped, c[1].dropped), (1, 1));
}

/// A stage's answer to a TX frame (an egress policy's RST) lands in the
/// RX ring in the same pass; the frame itself goes nowhere.
#[test]
fn a_stages_answer_to_a_tx_frame_reaches_rx_at_once() {
    let mut r = rig();
    let stages = r.dev.stages();
    let answer = frame_to(MAC, 74, 5);
    stages
        .push(Box::new(AnswerTx {
            first: 0xee,
            answer: answer.clone(),
            injector: stages.injector().clone(),
        }))
        .unwrap();
    r.rx_ring(8);
    r.tx_ring(8);
    let f = frame_to([0xee, 0, 0, 0, 0, 9], 200, 3);
    let at = BUFS + 4096 * 4;
    r.mem.write_slice(&f, GuestAddress(at)).unwrap();
    r.tx_desc(0, at, f.len() as u16);
    r.w(TDT, 1);
    assert!(r.wait_rdh(1), "the answer was not received");
    let mut got = vec![0u8; answer.len()];
    r.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    assert_eq!(got, answer);
    assert!(peer_recv_nothing(&r.peer), "the answered frame went out");
    let s = r.dev.stats().snapshot();
    assert_eq!((s.tx_dropped, s.rx_frames), (1, 1));
}

/// A stage that holds TX leaves the frame's descriptors to the guest (TDH
/// stays at them, no DD) until the NIC thread's timer brings its time.
#[test]
fn a_stage_holding_tx_releases_the_frames_in_order_on_time() {
    let mut r = rig();
    let hold = Duration::from_millis(300);
    r.dev
        .stages()
        .push(Trickle::one_then_every(Direction::Tx, hold))
        .unwrap();
    r.tx_ring(8);
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|i| frame_to([2, 0, 0, 0, 0, 9], 200, 10 + i))
        .collect();
    for (k, f) in frames.iter().enumerate() {
        let at = BUFS + 4096 * k as u64;
        r.mem.write_slice(f, GuestAddress(at)).unwrap();
        r.tx_desc(k as u64, at, f.len() as u16);
    }
    let t0 = Instant::now();
    r.w(TDT, 3);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&frames[0][..]));
    assert!(peer_recv_nothing(&r.peer), "a held frame went out early");
    assert_eq!(r.r(TDH), 1, "TX waits at the held frame");
    let status: u8 = r.mem.read_obj(GuestAddress(TX_RING + 16 + 12)).unwrap();
    assert_eq!(status & 1, 0, "no DD on a held frame");
    for (i, f) in frames.iter().enumerate().skip(1) {
        assert_eq!(peer_recv(&r.peer).as_deref(), Some(&f[..]), "frame {i}");
        assert!(
            t0.elapsed() >= hold * i as u32,
            "frame {i} came before its time"
        );
    }
    assert!(r.wait_reg(TDH, 3));
    let s = r.dev.stats().snapshot();
    assert_eq!((s.tx_frames, s.tx_dropped, s.tx_waits), (3, 0, 0));
}

/// Held on RX, a frame waits in the guest's buffers with no descriptor
/// written back, and nothing more is read until the stage lets it go.
#[test]
fn a_stage_holding_rx_delivers_later_in_order() {
    let mut r = rig();
    let hold = Duration::from_millis(300);
    r.dev
        .stages()
        .push(Trickle::one_then_every(Direction::Rx, hold))
        .unwrap();
    r.rx_ring(8);
    let frames: Vec<Vec<u8>> = (0..3).map(|i| frame_to(MAC, 300, 20 + i)).collect();
    let t0 = Instant::now();
    for f in &frames {
        peer_send(&r.peer, f);
    }
    assert!(r.wait_rdh(1));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.r(RDH), 1, "a held frame was handed over early");
    for i in 1..frames.len() {
        assert!(r.wait_rdh(i as u32 + 1), "frame {i}");
        assert!(
            t0.elapsed() >= hold * i as u32,
            "frame {i} came before its time"
        );
    }
    for (i, f) in frames.iter().enumerate() {
        let mut got = vec![0u8; f.len()];
        r.mem
            .read_slice(&mut got, GuestAddress(BUFS + 2048 * i as u64))
            .unwrap();
        assert_eq!(got, *f, "frame {i}");
    }
    let s = r.dev.stats().snapshot();
    assert_eq!((s.rx_frames, s.rx_dropped), (3, 0));
}

/// A stage that holds every frame until "now" makes the NIC thread ask
/// again after a short sleep, not spin: a bounded number of asks.
#[test]
fn a_stage_holding_until_now_does_not_spin_the_nic_thread() {
    use crate::net::stage::testing::HoldUntilNow;
    for dir in [Direction::Tx, Direction::Rx] {
        let mut r = rig();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        r.dev
            .stages()
            .push(Box::new(HoldUntilNow {
                dir,
                calls: calls.clone(),
            }))
            .unwrap();
        r.tx_ring(8);
        r.rx_ring(8);
        let f = frame_to(MAC, 200, 5);
        r.mem.write_slice(&f, GuestAddress(BUFS + 0x8000)).unwrap();
        r.tx_desc(0, BUFS + 0x8000, f.len() as u16);
        r.w(TDT, 1);
        peer_send(&r.peer, &f);
        std::thread::sleep(Duration::from_millis(300));
        let n = calls.load(Ordering::SeqCst);
        // The shared loop sleeps MIN_HOLD (50 us) at least between asks:
        // 6000 at most; the thread spinning asked 68,718 times.
        assert!((1..=6000).contains(&n), "{dir:?}: {n} asks in 300 ms");
    }
}

/// The owner pulls the cable (`E1000::set_link(false)`): STATUS.LU off
/// with LSC, nothing received (the frame stays in the TAP), what the
/// guest sends dropped and counted; the TAP's own state cannot bring the
/// link back meanwhile; plugged in again, the waiting frame comes in and
/// TX goes out.
#[test]
fn the_owners_link_down_moves_no_frame_either_way() {
    let mut r = rig();
    r.w(IMS, ICR_LSC);
    r.tx_ring(8);
    r.rx_ring(8);
    r.dev.set_link(false);
    assert!(!r.dev.link_up());
    assert_eq!(r.r(STATUS) & STATUS_LU, 0);
    assert_ne!(r.r(ICR) & ICR_LSC, 0);
    // The TAP is up: still no link while the owner says down.
    r.dev.core().set_link(true);
    assert_eq!(r.r(STATUS) & STATUS_LU, 0);
    peer_send(&r.peer, &frame_to(MAC, 100, 1));
    let f = frame_to([2, 0, 0, 0, 0, 9], 200, 3);
    r.mem.write_slice(&f, GuestAddress(BUFS + 0x4000)).unwrap();
    r.tx_desc(0, BUFS + 0x4000, f.len() as u16);
    r.w(TDT, 1);
    assert!(r.wait_reg(TDH, 1), "the descriptor is done");
    assert!(
        peer_recv_nothing(&r.peer),
        "a frame went out with the link down"
    );
    assert_eq!(r.r(RDH), 0, "a frame came in with the link down");
    assert_eq!(r.dev.stats().snapshot().tx_dropped, 1);
    r.dev.set_link(true);
    assert_ne!(r.r(STATUS) & STATUS_LU, 0);
    assert_ne!(r.r(ICR) & ICR_LSC, 0);
    assert!(r.wait_rdh(1), "the frame the TAP kept comes in");
    r.tx_desc(1, BUFS + 0x4000, f.len() as u16);
    r.w(TDT, 2);
    assert_eq!(peer_recv(&r.peer).as_deref(), Some(&f[..]));
}

/// A rate limit on the e1000: one frame per 200 ms from the guest, so of
/// three frames one goes at once and the rest wait at TDH (held, not
/// dropped), then follow on the NIC thread's timer.
#[test]
fn a_rate_limit_holds_tx_at_tdh_and_lets_it_go_on_time() {
    use crate::net::rate_limit::{Bucket, DirectionLimits, RateLimiter, RateLimits};
    let mut r = rig();
    let l = RateLimiter::new(RateLimits {
        tx: DirectionLimits {
            bandwidth: None,
            ops: Some(Bucket::new(1, Duration::from_millis(200), 0).unwrap()),
        },
        ..RateLimits::default()
    });
    r.dev.stages().push(l.stage()).unwrap();
    r.tx_ring(8);
    let f = frame_to([2, 0, 0, 0, 0, 9], 200, 3);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    for i in 0..3 {
        r.tx_desc(i, BUFS, f.len() as u16);
    }
    let t = std::time::Instant::now();
    r.w(TDT, 3);
    assert!(peer_recv(&r.peer).is_some());
    assert!(peer_recv_nothing(&r.peer), "the second frame went at once");
    assert_eq!(r.r(TDH), 1, "held at the second frame");
    assert!(peer_recv(&r.peer).is_some());
    assert!(peer_recv(&r.peer).is_some());
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.dev.stats().snapshot().tx_dropped, 0);
}

/// The bytes of the frames that reach the TAP's peer in the next second,
/// less `header` bytes of each.
fn bytes_in_a_second(r: &Rig, header: usize) -> usize {
    let t = Instant::now();
    let mut bytes = 0;
    let mut buf = vec![0u8; 70_000];
    while t.elapsed() < Duration::from_secs(1) {
        // SAFETY: recv into a live buffer of its length.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&r.peer),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(n) {
            Ok(n) if n > 0 => bytes += n.saturating_sub(header),
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
    bytes
}

/// A byte limit on TSO frames (8 KiB of TCP payload each): what reaches
/// the TAP in a second is the limit's worth (plus the first bucket and,
/// when rvm segments them, the segments' extra headers), not more; as
/// one GSO frame each to a TAP with a vnet header, or segmented by rvm.
#[test]
fn a_byte_limit_holds_tso_frames_to_the_rate() {
    for vnet in [false, true] {
        tso_under_a_byte_limit(vnet);
    }
}

fn tso_under_a_byte_limit(vnet: bool) {
    use crate::net::rate_limit::{Bucket, DirectionLimits, RateLimiter, RateLimits};
    let mut r = rig_with_tap(vnet);
    let l = RateLimiter::new(RateLimits {
        tx: DirectionLimits {
            bandwidth: Some(Bucket::new(20_000, Duration::from_millis(100), 0).unwrap()),
            ops: None,
        },
        ..RateLimits::default()
    });
    r.dev.stages().push(l.stage()).unwrap();
    let payload = 8192u32;
    let len = 14 + 20 + 20 + payload;
    let tail = write_tso_frames(&mut r, 60, L4::Tcp, payload, 1448);
    r.w(TDT, tail);
    // The vnet header is not the frame's.
    let bytes = bytes_in_a_second(&r, if vnet { 12 } else { 0 });
    // 200 KB/s: 20 KB at once, 200 KB in the second, one frame of debt,
    // 6 segments per frame each with 54 bytes of headers.
    let most = (20_000 + 200_000 + len as usize) * (8192 + 6 * 54) / 8192;
    assert!(
        bytes <= most,
        "vnet {vnet}: {bytes} bytes in a second, at most {most}"
    );
    assert!(bytes >= 150_000, "vnet {vnet}: {bytes} bytes in a second");
}

/// The same for plain 1514-byte frames, from a ring of 200.
#[test]
fn a_byte_limit_holds_plain_frames_to_the_rate() {
    use crate::net::rate_limit::{Bucket, DirectionLimits, RateLimiter, RateLimits};
    let mut r = rig();
    let l = RateLimiter::new(RateLimits {
        tx: DirectionLimits {
            bandwidth: Some(Bucket::bandwidth(800_000, None).unwrap()),
            ops: None,
        },
        ..RateLimits::default()
    });
    r.dev.stages().push(l.stage()).unwrap();
    r.tx_ring(256);
    let f = frame_to([2, 0, 0, 0, 0, 9], 1514, 3);
    r.mem.write_slice(&f, GuestAddress(BUFS)).unwrap();
    for i in 0..200 {
        r.tx_desc(i, BUFS, f.len() as u16);
    }
    r.w(TDT, 200);
    let bytes = bytes_in_a_second(&r, 0);
    // 100 KB/s with a 16 KiB bucket, plus one frame.
    assert!(
        bytes <= 100_000 + 16_384 + 1514,
        "{bytes} bytes in a second"
    );
    assert!(bytes >= 80_000, "{bytes} bytes in a second");
}
