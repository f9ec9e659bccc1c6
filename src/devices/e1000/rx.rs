//! Host to guest: each frame is read with one readv straight into the
//! guest buffers that RDH..RDT describe; the descriptors are written back
//! and RXT0 raised once per batch (the moderation: one interrupt for
//! everything that was waiting). The NIC's loop ([`super::engine`]) runs
//! a pass when the TAP has frames or the driver gave back descriptors.

use std::io::ErrorKind;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::regs::*;
use super::{Core, VNET_HDR_LEN};
use crate::net::counters::bump;
use crate::net::stage::{Direction, Frame, Outcome};
use crate::virtio::chain::Segment;

/// The largest frame the device takes, CRC included: with RCTL.LPE (jumbo)
/// 16 KiB, else a VLAN-tagged 1522 bytes. Linux's e1000 relies on the
/// second: with LPE off it posts 1522-byte buffers while RCTL.BSIZE says
/// 2048, so a longer frame written whole would run into its skb's tail.
const MAX_JUMBO: usize = 16_384;
const MAX_NORMAL: usize = 1_522;
const CRC_LEN: usize = 4;
/// Frames read per wakeup before the lock is let go.
const BATCH: usize = 64;
const MAX_SEGS: usize = 1 + MAX_JUMBO / 256 + 2;

pub(crate) struct RxState {
    vnet_hdr: bool,
    /// Where the TAP's vnet header lands (ignored: no offloads are on).
    hdr: [u8; VNET_HDR_LEN],
    /// Past the guest's buffers: a byte landing here means the frame was
    /// too long for them (it is dropped, counted in ROC).
    overflow: [u8; 1],
    iov: Vec<libc::iovec>,
    /// The guest buffers of the frame being read, for the stages.
    segs: Vec<Segment>,
    /// The ring was found unusable; wait for the driver to rewrite it.
    broken: bool,
    /// A frame a stage held: in the buffers at RDH, no descriptor written
    /// back, and nothing more read until the stage lets it go.
    held: Option<HeldRx>,
}

#[derive(Clone, Copy)]
struct HeldRx {
    len: usize,
    until: Instant,
    /// The stage that held it, asked again first.
    stage: usize,
}

/// How one read went.
enum Read {
    /// The frame took this many descriptors.
    Delivered(u32),
    /// Not for us (the receive filter), too long, or dropped by a stage:
    /// the buffers stay the guest's.
    Refused,
    /// A stage held it.
    Held,
}

// SAFETY: the iovecs point into guest memory kept mapped by the core's
// GuestRam (or into `hdr`); they are rebuilt before each readv and
// only used under the core's lock.
unsafe impl Send for RxState {}

impl RxState {
    pub(crate) fn new(vnet_hdr: bool) -> Self {
        RxState {
            vnet_hdr,
            hdr: [0; VNET_HDR_LEN],
            overflow: [0],
            iov: Vec::with_capacity(MAX_SEGS),
            segs: Vec::with_capacity(MAX_SEGS),
            broken: false,
            held: None,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.broken = false;
        self.held = None;
    }
}

/// How a frame fits the ring's buffers, from RCTL.
#[derive(Clone, Copy)]
struct Fit {
    /// Bytes per buffer (RCTL.BSIZE/BSEX).
    bsize: usize,
    /// The most frame bytes taken (RCTL.LPE), CRC not counted.
    room: usize,
    /// The 4-byte CRC the driver will cut off, unless it asked for it to be
    /// stripped (RCTL.SECRC); the TAP has none, so zeros stand in.
    crc: usize,
    /// Buffers a frame of `room` bytes and its CRC take.
    need: usize,
}

impl Fit {
    fn new(rctl: u32) -> Self {
        let bsize = buffer_size(rctl);
        let max = if rctl & RCTL_LPE != 0 {
            MAX_JUMBO
        } else {
            MAX_NORMAL
        };
        let room = max - CRC_LEN;
        let crc = if rctl & RCTL_SECRC != 0 { 0 } else { CRC_LEN };
        Fit {
            bsize,
            room,
            crc,
            need: (room + crc).div_ceil(bsize),
        }
    }
}

/// Why receiving stopped.
#[derive(PartialEq, Eq, Debug)]
pub(crate) enum RxStop {
    /// The TAP has nothing more.
    Drained,
    /// Not enough descriptors (or receive off): wait for the driver.
    NeedBuffers,
    /// The TAP itself failed (deleted under us: EBADFD): nothing will
    /// ever come from it again.
    TapFailed,
    /// A stage holds a frame until this time: read nothing before.
    Held(Instant),
}

fn buffer_size(rctl: u32) -> usize {
    let base = match (rctl >> RCTL_BSIZE_SHIFT) & 3 {
        0 => 2048,
        1 => 1024,
        2 => 512,
        _ => 256,
    };
    if rctl & RCTL_BSEX != 0 && base != 2048 {
        base * 16
    } else {
        base
    }
}

impl Core {
    /// Reads frames from the TAP into the ring until either runs out.
    pub(crate) fn receive(&mut self) -> RxStop {
        let rctl = self.reg(RCTL);
        if rctl & RCTL_EN == 0 || !self.phy.link_up() || self.rx.broken || !self.may_dma() {
            return RxStop::NeedBuffers;
        }
        let n = self.reg(RDLEN) / 16;
        let base = u64::from(self.reg(RDBAL)) | (u64::from(self.reg(RDBAH)) << 32);
        let fit = Fit::new(rctl);
        let mut received = 0u64;
        let mut stop = RxStop::Drained;
        if let Some(h) = self.rx.held {
            match self.release_held(base, n, fit, h) {
                Ok(Some(delivered)) => received += u64::from(delivered),
                Ok(None) => return RxStop::Held(self.rx.held.map_or(h.until, |h| h.until)),
                Err(e) => {
                    crate::guest_log!(log::Level::Debug, "e1000: RX: {e}");
                    self.rx.broken = true;
                    return RxStop::NeedBuffers;
                }
            }
        }
        for _ in 0..BATCH {
            let (head, tail) = (self.reg(RDH), self.reg(RDT));
            if n == 0 || head >= n || tail >= n {
                self.rx.broken = true;
                crate::guest_log!(
                    log::Level::Debug,
                    "e1000: RX ring unusable (RDLEN {n}, RDH {head}, RDT {tail})"
                );
                stop = RxStop::NeedBuffers;
                break;
            }
            let free = (tail + n - head) % n;
            if (free as usize) < fit.need {
                stop = RxStop::NeedBuffers;
                break;
            }
            match self.read_frame(base, n, head, fit) {
                Ok(Read::Delivered(used)) => {
                    self.set(RDH, (head + used) % n);
                    received += 1;
                }
                Ok(Read::Refused) => {} // the buffers stay the guest's
                Ok(Read::Held) => {
                    stop = RxStop::Held(self.rx.held.map_or_else(Instant::now, |h| h.until));
                    break;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::InvalidData => {
                    // The guest's ring is bad, not the TAP.
                    crate::guest_log!(log::Level::Debug, "e1000: RX: {e}");
                    bump(&self.stats.rx_dropped, 1);
                    self.rx.broken = true;
                    stop = RxStop::NeedBuffers;
                    break;
                }
                Err(e) => {
                    crate::guest_log!(
                        log::Level::Warn,
                        "e1000: reading the TAP failed: {e}; receiving stops"
                    );
                    stop = RxStop::TapFailed;
                    break;
                }
            }
        }
        if received > 0 {
            self.cause(ICR_RXT0);
        }
        if stop == RxStop::NeedBuffers && rctl & RCTL_EN != 0 && !self.rx.broken {
            // Tell the driver its ring is short (it refills in its poll).
            self.cause(ICR_RXDMT0);
        }
        stop
    }

    /// The held frame, asked about again once its time has come: Some(1)
    /// when it went to the driver, Some(0) when a stage dropped it, None
    /// while it is still held.
    fn release_held(
        &mut self,
        base: u64,
        n: u32,
        fit: Fit,
        h: HeldRx,
    ) -> std::io::Result<Option<u32>> {
        let now = Instant::now();
        if now < h.until {
            return Ok(None);
        }
        let head = self.reg(RDH);
        if head >= n {
            return Err(std::io::Error::new(
                ErrorKind::InvalidData,
                "RDH out of range",
            ));
        }
        // The buffers again (the driver may have rewritten the descriptors
        // meanwhile: then it gets its own bytes back, bounds-checked).
        self.rx_segments(base, n, head, fit)?;
        let frame = Frame::Guest {
            mem: &self.mem,
            segs: &self.rx.segs,
            skip: 0,
            len: h.len,
        };
        self.rx.held = None;
        match self.stages.run(Direction::Rx, &frame, h.stage, now) {
            Outcome::Pass => {
                let used = self.write_back(base, n, head, fit, h.len)?;
                self.set(RDH, (head + used) % n);
                Ok(Some(1))
            }
            Outcome::Drop => {
                bump(&self.stats.rx_dropped, 1);
                Ok(Some(0))
            }
            Outcome::Hold { until, stage } => {
                self.rx.held = Some(HeldRx {
                    len: h.len,
                    until,
                    stage,
                });
                Ok(None)
            }
        }
    }

    /// The guest buffers of the `fit.need` descriptors from `head`, into
    /// `self.rx.segs`.
    fn rx_segments(&mut self, base: u64, n: u32, head: u32, fit: Fit) -> std::io::Result<()> {
        let bad = || std::io::Error::new(ErrorKind::InvalidData, "RX descriptor outside memory");
        self.rx.segs.clear();
        let mut left = fit.room;
        for i in 0..fit.need as u32 {
            let d = base
                .checked_add(u64::from((head + i) % n) * DESC_LEN)
                .ok_or_else(bad)?;
            let addr: u64 = self.mem.read_obj(GuestAddress(d)).map_err(|_| bad())?;
            let len = fit.bsize.min(left);
            left -= len;
            let slice = self
                .mem
                .get_slice(GuestAddress(addr), len)
                .map_err(|_| bad())?;
            self.rx.segs.push(Segment {
                gpa: addr,
                iov: libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                    iov_len: len,
                },
            });
        }
        Ok(())
    }

    /// One frame into the `fit.need` descriptors from `head`.
    fn read_frame(&mut self, base: u64, n: u32, head: u32, fit: Fit) -> std::io::Result<Read> {
        let bad = || std::io::Error::new(ErrorKind::InvalidData, "RX descriptor outside memory");
        self.rx_segments(base, n, head, fit)?;
        self.rx.iov.clear();
        if self.rx.vnet_hdr {
            self.rx.iov.push(libc::iovec {
                iov_base: self.rx.hdr.as_mut_ptr().cast(),
                iov_len: VNET_HDR_LEN,
            });
        }
        self.rx.iov.extend(self.rx.segs.iter().map(|s| s.iov));
        self.rx.iov.push(libc::iovec {
            iov_base: self.rx.overflow.as_mut_ptr().cast(),
            iov_len: self.rx.overflow.len(),
        });
        // SAFETY: the iovecs are bounds-checked slices of guest RAM (mapped
        // while self.mem lives) and the header and overflow buffers self.rx
        // owns, which nothing else touches during the call.
        // (A frame a stage made for the guest comes first.)
        let got = unsafe { self.stages.injector().readv(&*self.backend, &self.rx.iov) }?;
        let hdr = if self.rx.vnet_hdr { VNET_HDR_LEN } else { 0 };
        let len = got.saturating_sub(hdr);
        if len > fit.room {
            // Too long for the buffers (and cut by the read): the guest
            // already has its first bytes, but no descriptor says so.
            self.count(STAT_ROC, None, 1);
            bump(&self.stats.rx_dropped, 1);
            return Ok(Read::Refused);
        }
        if len < 14 {
            return Ok(Read::Refused);
        }
        let first = self.rx.segs.first().ok_or_else(bad)?.gpa;
        let mut dst = [0u8; 6];
        self.mem
            .read_slice(&mut dst, GuestAddress(first))
            .map_err(|_| bad())?;
        if self.accepts(&dst).is_none() {
            self.count(STAT_MPC, None, 0);
            return Ok(Read::Refused);
        }
        let frame = Frame::Guest {
            mem: &self.mem,
            segs: &self.rx.segs,
            skip: 0,
            len,
        };
        match self.stages.run_now(Direction::Rx, &frame, 0) {
            Outcome::Pass => {}
            Outcome::Drop => {
                bump(&self.stats.rx_dropped, 1);
                return Ok(Read::Refused);
            }
            Outcome::Hold { until, stage } => {
                self.rx.held = Some(HeldRx { len, until, stage });
                return Ok(Read::Held);
            }
        }
        self.write_back(base, n, head, fit, len)
            .map(Read::Delivered)
    }

    /// Hands the driver the frame of `len` bytes in the buffers from
    /// `head`: the CRC's zeros, each descriptor's length and status, the
    /// statistics. Returns the descriptors used.
    fn write_back(
        &mut self,
        base: u64,
        n: u32,
        head: u32,
        Fit { bsize, crc, .. }: Fit,
        len: usize,
    ) -> std::io::Result<u32> {
        let bad = || std::io::Error::new(ErrorKind::InvalidData, "RX descriptor outside memory");
        let mem = self.mem.clone();
        let desc_at = |i: u32| base.checked_add(u64::from((head + i) % n) * DESC_LEN);
        let first: u64 = mem
            .read_obj(GuestAddress(desc_at(0).ok_or_else(bad)?))
            .map_err(|_| bad())?;
        let mut dst = [0u8; 6];
        mem.read_slice(&mut dst, GuestAddress(first))
            .map_err(|_| bad())?;
        let kind = self.accepts(&dst);
        // The CRC the driver strips: zeros after the frame.
        let total = len + crc;
        let used = total.div_ceil(bsize).max(1) as u32;
        for i in 0..used {
            let d = desc_at(i).ok_or_else(bad)?;
            let addr: u64 = mem.read_obj(GuestAddress(d)).map_err(|_| bad())?;
            let start = i as usize * bsize;
            let seg = (total - start).min(bsize);
            if crc > 0 {
                // Zero what of the CRC falls in this buffer.
                let crc_from = len.max(start);
                if crc_from < start + seg {
                    let z = [0u8; 4];
                    let k = start + seg - crc_from;
                    let at = addr + (crc_from - start) as u64;
                    let _ = mem.write_slice(&z[..k.min(4)], GuestAddress(at));
                }
            }
            let last = i + 1 == used;
            // length u16 @8, checksum u16 @10, status @12 (DD, EOP), errors @13.
            let status: u8 = 0x01 | if last { 0x02 } else { 0 };
            let mut wb = [0u8; 8];
            wb[0..2].copy_from_slice(&(seg as u16).to_le_bytes());
            wb[4] = status;
            mem.write_slice(&wb, GuestAddress(d + 8))
                .map_err(|_| bad())?;
        }
        bump(&self.stats.rx_frames, 1);
        bump(&self.stats.rx_bytes, len as u64);
        self.count(STAT_GPRC, None, 1);
        self.count(STAT_TPR, None, 1);
        self.count(STAT_GORCL, Some(STAT_GORCH), total as u64);
        self.count(STAT_TORL, Some(STAT_TORH), total as u64);
        match kind {
            Some(Dest::Broadcast) => self.count(STAT_BPRC, None, 1),
            Some(Dest::Multicast) => self.count(STAT_MPRC, None, 1),
            _ => {}
        }
        Ok(used)
    }

    /// The receive filter: our addresses (RAL/RAH with AV), broadcast with
    /// BAM, multicast through the MTA hash or MPE, everything with UPE.
    fn accepts(&self, dst: &[u8; 6]) -> Option<Dest> {
        let rctl = self.reg(RCTL);
        if dst == &[0xff; 6] {
            return (rctl & RCTL_BAM != 0 || rctl & RCTL_UPE != 0).then_some(Dest::Broadcast);
        }
        if dst[0] & 1 != 0 {
            if rctl & (RCTL_MPE | RCTL_UPE) != 0 {
                return Some(Dest::Multicast);
            }
            // RCTL.MO picks which 12 bits of the address index the table.
            let shift = [4u32, 3, 2, 0][((rctl >> RCTL_MO_SHIFT) & 3) as usize];
            let bits = (u32::from(dst[4]) >> shift) | (u32::from(dst[5]) << (8 - shift));
            let hash = bits & 0xfff;
            let word = self.reg(MTA + 4 * (hash >> 5));
            return (word & (1 << (hash & 31)) != 0).then_some(Dest::Multicast);
        }
        if rctl & RCTL_UPE != 0 {
            return Some(Dest::Unicast);
        }
        let mine = (0..RA_PAIRS).any(|i| {
            let (lo, hi) = (self.reg(RA + 8 * i), self.reg(RA + 8 * i + 4));
            hi & RAH_AV != 0
                && lo.to_le_bytes() == dst[..4]
                && (hi as u16).to_le_bytes() == dst[4..]
        });
        mine.then_some(Dest::Unicast)
    }
}

enum Dest {
    Unicast,
    Broadcast,
    Multicast,
}

#[cfg(test)]
pub(crate) fn buffer_size_for_tests(rctl: u32) -> usize {
    buffer_size(rctl)
}
