//! The 82540EM transmit engine (SDM section 3.3): walks the TX ring the
//! guest posted, gathers frames from descriptor buffers, applies checksum
//! offload and TCP segmentation, and hands finished frames to the backend.
//!
//! Everything read from the guest is hostile: the ring registers,
//! descriptor bytes, buffer addresses and lengths, the offsets in context
//! descriptors and the packet headers themselves. Guest memory is only
//! touched through vm-memory's bounds-checked copies, every offset into the
//! frame buffer is checked before use, and every loop has a fixed bound.

use std::io;

use vm_memory::{Bytes, GuestAddress};

use super::regs::DESC_LEN;
use crate::net::csum;

use crate::net::backend::VNET_HDR_LEN;
use crate::vmm::memory::GuestRam;
/// The largest frame gathered from descriptors: a 64 KiB TSO payload plus
/// headers. Larger frames are dropped.
pub const MAX_FRAME: usize = 65536 + 256;
/// A TSO frame that would become more segments than this is dropped, which
/// bounds the work a single frame can cause (mss >= 17 for a full frame;
/// Linux never goes below an MSS of 48).
pub const MAX_SEGMENTS: usize = 4096;

const VLAN_TAG_LEN: usize = 4;
/// Room in front of a frame for the vnet header and an inserted VLAN tag,
/// so that neither needs the frame copied.
const HEADROOM: usize = VNET_HDR_LEN + VLAN_TAG_LEN;
/// Destination and source MAC: a VLAN tag goes right after them.
const ETH_ADDRS_LEN: usize = 12;
/// Anything shorter is not an Ethernet frame; the TAP would refuse it.
const ETH_HLEN: usize = 14;
const IPV6_HLEN: usize = 40;

// Byte 11 is the command field in all three descriptor formats: CMD
// (legacy), TUCMD (context) and DCMD (data).
const CMD_EOP: u8 = 0x01;
const CMD_IC: u8 = 0x04;
const CMD_RS: u8 = 0x08;
const CMD_DEXT: u8 = 0x20;
const CMD_VLE: u8 = 0x40;
const DCMD_TSE: u8 = 0x04;
const TUCMD_TCP: u8 = 0x01;
const TUCMD_IP: u8 = 0x02;
const TUCMD_TSE: u8 = 0x04;
const DTYP_CONTEXT: u32 = 0;
const DTYP_DATA: u32 = 1;
const POPTS_IXSM: u8 = 0x01;
const POPTS_TXSM: u8 = 0x02;
const STA_DD: u8 = 0x01;
/// Excess collisions, late collision, transmit underrun: never on a TAP.
const STA_ERRORS: u8 = 0x02 | 0x04 | 0x08;

const VNET_F_NEEDS_CSUM: u8 = 1;
const VNET_GSO_TCPV4: u8 = 1;
const VNET_GSO_TCPV6: u8 = 4;
const VNET_GSO_ECN: u8 = 0x80;

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The TX ring as the guest programmed it (TDBAL/TDBAH, TDLEN, TDH, TDT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxRing {
    pub base: u64,
    pub len_bytes: u32,
    pub head: u32,
    pub tail: u32,
}

/// What one [`TxEngine::process`] call did.
///
/// `frames` and `bytes` count packets as they leave on the wire: a TSO
/// frame counts as its segments also when it goes to the TAP as one GSO
/// frame, and bytes include an inserted VLAN tag but no vnet header.
/// `dropped` counts guest frames refused (bad buffer, too big, malformed
/// TSO, shorter than an Ethernet header) and sends that failed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TxReport {
    /// The new TDH.
    pub head: u32,
    /// Descriptors consumed (all types).
    pub descriptors: u32,
    pub frames: u64,
    pub bytes: u64,
    pub dropped: u64,
    /// The ring registers are unusable or a descriptor lies outside guest
    /// memory; `head` stops at the offending descriptor.
    pub ring_error: bool,
    /// The pass used up its budget with descriptors left: run another.
    pub more: bool,
    /// The backend would block (EAGAIN): `head` is the first descriptor
    /// of the frame that could not go, to be sent again once there is
    /// room; nothing of that frame went out and nothing was dropped.
    pub blocked: bool,
    /// A stage held the frame at `head` (TxSink::admit): as `blocked`,
    /// but the sink's owner knows until when.
    pub held: bool,
}

/// What [`TxSink::admit`] says about a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Send,
    /// Lost: counted in `dropped`, its descriptors completed.
    Drop,
    /// Not now: TX stops at the frame's first descriptor (`held`).
    Hold,
}

/// Where finished frames go.
pub trait TxSink {
    /// The frame as the guest gathered it (before any vnet header, VLAN
    /// tag or segmentation), once per frame.
    fn admit(&mut self, _frame: &[u8]) -> Admit {
        Admit::Send
    }
    /// The bytes for the TAP, vnet header included when it has one.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()>;
}

/// A plain function sends everything.
impl<F: FnMut(&[u8]) -> io::Result<()>> TxSink for F {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self(bytes)
    }
}

/// Counts the writes of a pass against its budget.
struct Counted<'a> {
    sink: &'a mut dyn TxSink,
    writes: u64,
}

impl TxSink for Counted<'_> {
    fn admit(&mut self, frame: &[u8]) -> Admit {
        self.sink.admit(frame)
    }
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writes += 1;
        self.sink.send(bytes)
    }
}

/// Writes to the backend one pass may start before it stops at the next
/// descriptor (a pass holds the device lock that vCPUs need; a single
/// frame adds at most MAX_SEGMENTS).
pub const PASS_WRITES: u64 = 1024;
/// Descriptors one pass walks at most.
pub const PASS_DESCRIPTORS: u32 = 256;

/// Offload parameters from a context descriptor.
#[derive(Debug, Default, Clone, Copy)]
struct Context {
    ipcss: u8,
    ipcso: u8,
    ipcse: u16,
    tucss: u8,
    tucso: u8,
    tucse: u16,
    tucmd: u8,
    hdr_len: u8,
    mss: u16,
}

impl Context {
    fn parse(d: &[u8; 16]) -> Self {
        Context {
            ipcss: d[0],
            ipcso: d[1],
            ipcse: u16::from_le_bytes([d[2], d[3]]),
            tucss: d[4],
            tucso: d[5],
            tucse: u16::from_le_bytes([d[6], d[7]]),
            tucmd: d[11],
            hdr_len: d[13],
            mss: u16::from_le_bytes([d[14], d[15]]),
        }
    }
}

/// The frame being gathered.
#[derive(Debug, Default, Clone, Copy)]
struct Frame {
    /// A descriptor without EOP has been seen: more belongs to this frame.
    started: bool,
    len: usize,
    /// Something was wrong with it: swallow descriptors up to EOP.
    dropping: bool,
    /// The frame's offloads come from its first descriptor: legacy, or a
    /// data descriptor's POPTS and TSE.
    legacy: bool,
    popts: u8,
    tse: bool,
    /// Legacy IC: (CSS, CSO) of the latest legacy descriptor, which is the
    /// EOP one by the time the frame is finished (SDM: valid with EOP).
    ic: Option<(u8, u8)>,
}

#[derive(Debug, Default, Clone, Copy)]
struct VnetHdr {
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
}

impl VnetHdr {
    fn bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        // num_buffers (10..12) is for the receive side: 0.
        b
    }
}

/// A checked TSO request: every offset below has been verified to lie in
/// the headers, and the headers in the frame.
#[derive(Debug, Clone, Copy)]
struct Tso {
    hdr_len: usize,
    mss: usize,
    payload: usize,
    segments: usize,
    v4: bool,
    tcp: bool,
    ipcss: usize,
    ipcso: usize,
    /// End (exclusive) of the IPv4 header checksum range.
    ip_end: usize,
    tucss: usize,
    tucso: usize,
}

pub struct TxEngine {
    vnet_hdr: bool,
    /// The VLAN ethertype (VET) to insert for descriptors with VLE, or
    /// None when CTRL.VME is clear.
    vlan_tpid: Option<u16>,
    /// The 8254x keeps two contexts: one for checksum offload and one for
    /// segmentation, picked by TUCMD.TSE. Drivers that cache the checksum
    /// context across TSO frames (BSD's em) depend on this.
    csum_ctx: Context,
    tso_ctx: Context,
    frame: Frame,
    /// HEADROOM bytes, then the frame.
    buf: Box<[u8]>,
    /// The original headers of the TSO frame being segmented.
    hdr_save: [u8; 256],
    /// The ring index of the current frame's first descriptor: where TX
    /// starts again if the backend would block on the frame.
    frame_head: u32,
    /// The last send of the frame being finished would have blocked.
    would_block: bool,
}

impl TxEngine {
    /// `vnet_hdr`: the TAP takes a 12-byte struct virtio_net_hdr_v1 (flags
    /// u8, gso_type u8, hdr_len u16, gso_size u16, csum_start u16,
    /// csum_offset u16, num_buffers u16; little endian) in front of every
    /// frame.
    pub fn new(vnet_hdr: bool) -> Self {
        TxEngine {
            vnet_hdr,
            // Linux only sets VLE with CTRL.VME on; inserting by default
            // keeps tagged traffic working if the core never calls set_vlan.
            vlan_tpid: Some(0x8100),
            csum_ctx: Context::default(),
            tso_ctx: Context::default(),
            frame: Frame::default(),
            buf: vec![0u8; HEADROOM + MAX_FRAME].into_boxed_slice(),
            hdr_save: [0u8; 256],
            frame_head: 0,
            would_block: false,
        }
    }

    /// VLAN tag insertion: `enabled` is CTRL.VME, `tpid` the VET register.
    /// With it off, VLE in a descriptor is ignored as on the real device.
    pub fn set_vlan(&mut self, enabled: bool, tpid: u16) {
        self.vlan_tpid = enabled.then_some(tpid);
    }

    /// Device reset: forget the context and any partial frame.
    pub fn reset(&mut self) {
        self.csum_ctx = Context::default();
        self.tso_ctx = Context::default();
        self.frame = Frame::default();
    }

    /// Processes descriptors from ring.head up to (not including)
    /// ring.tail, emitting each finished frame through `send` (the whole
    /// bytes to write to the TAP, vnet header included when vnet_hdr).
    /// One pass does a bounded amount of work (PASS_WRITES,
    /// PASS_DESCRIPTORS) and says when it left descriptors (`more`).
    /// Returns the new head and counters. Writes back DD (status bit 0)
    /// into descriptors that have RS (report status) set.
    pub fn process(&mut self, mem: &GuestRam, ring: &TxRing, send: &mut dyn TxSink) -> TxReport {
        let mut rep = TxReport {
            head: ring.head,
            ..TxReport::default()
        };
        // TDLEN is meant to be a multiple of 128; a ragged end is ignored.
        let count = ring.len_bytes / DESC_LEN as u32;
        if count == 0 || ring.head >= count || ring.tail >= count {
            rep.ring_error = true;
            return rep;
        }
        let mut head = ring.head;
        // Every backend write counts against the pass's budget.
        let mut counted = Counted {
            sink: send,
            writes: 0,
        };
        // head == tail ends the walk within one lap; the bound says so.
        for _ in 0..count {
            if head == ring.tail {
                break;
            }
            if counted.writes >= PASS_WRITES || rep.descriptors >= PASS_DESCRIPTORS {
                rep.more = true;
                break;
            }
            let Some(addr) = ring.base.checked_add(u64::from(head) * DESC_LEN) else {
                rep.ring_error = true;
                break;
            };
            // One snapshot: the guest may rewrite the descriptor meanwhile.
            let mut d = [0u8; 16];
            if mem.read_slice(&mut d, GuestAddress(addr)).is_err() {
                rep.ring_error = true;
                break;
            }
            if !self.frame.started {
                self.frame_head = head;
            }
            self.would_block = false;
            self.descriptor(mem, &d, &mut counted, &mut rep);
            if self.would_block {
                // Back to the frame's first descriptor, to be gathered and
                // sent again when the backend has room (or the stage that
                // held it lets it go): the guest's buffers stay its own
                // until then (no DD on them).
                self.frame = Frame::default();
                rep.head = self.frame_head;
                rep.blocked = !rep.held;
                return rep;
            }
            if d[11] & CMD_RS != 0 {
                let status = (d[12] | STA_DD) & !STA_ERRORS;
                let written = addr
                    .checked_add(12)
                    .is_some_and(|a| mem.write_slice(&[status], GuestAddress(a)).is_ok());
                if !written {
                    crate::guest_log!(
                        log::Level::Debug,
                        "e1000: TX descriptor {head}: status write-back failed"
                    );
                }
            }
            head = if head + 1 == count { 0 } else { head + 1 };
            rep.descriptors += 1;
        }
        rep.head = head;
        rep
    }

    fn descriptor(
        &mut self,
        mem: &GuestRam,
        d: &[u8; 16],
        send: &mut dyn TxSink,
        rep: &mut TxReport,
    ) {
        let addr = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
        let lower = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
        let cmd = d[11];
        // VLE and the tag (special) count in the EOP descriptor.
        let vlan = (cmd & CMD_VLE != 0).then(|| u16::from_le_bytes([d[14], d[15]]));
        if cmd & CMD_DEXT == 0 {
            if !self.frame.started {
                self.frame = Frame {
                    started: true,
                    legacy: true,
                    ..Frame::default()
                };
            }
            self.frame.ic = (cmd & CMD_IC != 0).then_some((d[13], d[10]));
            self.gather(mem, addr, usize::from(u16::from_le_bytes([d[8], d[9]])));
        } else {
            match (lower >> 20) & 0xf {
                DTYP_CONTEXT => {
                    let c = Context::parse(d);
                    if c.tucmd & TUCMD_TSE != 0 {
                        self.tso_ctx = c;
                    } else {
                        self.csum_ctx = c;
                    }
                    return;
                }
                DTYP_DATA => {
                    if !self.frame.started {
                        self.frame = Frame {
                            started: true,
                            popts: d[13],
                            tse: cmd & DCMD_TSE != 0,
                            ..Frame::default()
                        };
                    }
                    self.gather(mem, addr, (lower & 0xf_ffff) as usize);
                }
                t => {
                    crate::guest_log!(
                        log::Level::Debug,
                        "e1000: TX descriptor type {t} is reserved; skipped"
                    );
                    return;
                }
            }
        }
        if cmd & CMD_EOP != 0 {
            self.finish(vlan, send, rep);
        }
    }

    /// Appends a descriptor's buffer to the frame.
    fn gather(&mut self, mem: &GuestRam, addr: u64, len: usize) {
        let f = &mut self.frame;
        // A zero-length buffer is legal and its address meaningless.
        if f.dropping || len == 0 {
            return;
        }
        if len > MAX_FRAME - f.len {
            crate::guest_log!(
                log::Level::Debug,
                "e1000: TX frame over {MAX_FRAME} bytes dropped"
            );
            f.dropping = true;
            return;
        }
        let start = HEADROOM + f.len;
        let ok = self
            .buf
            .get_mut(start..start + len)
            .is_some_and(|dst| mem.read_slice(dst, GuestAddress(addr)).is_ok());
        if ok {
            f.len += len;
        } else {
            crate::guest_log!(
                log::Level::Debug,
                "e1000: TX buffer {addr:#x}+{len} outside guest memory"
            );
            f.dropping = true;
        }
    }

    /// The frame is complete (EOP): offload and send it.
    fn finish(&mut self, vlan: Option<u16>, send: &mut dyn TxSink, rep: &mut TxReport) {
        let f = std::mem::take(&mut self.frame);
        if f.dropping || f.len < ETH_HLEN {
            rep.dropped += 1;
            return;
        }
        match send.admit(&self.buf[HEADROOM..HEADROOM + f.len]) {
            Admit::Send => {}
            Admit::Drop => {
                rep.dropped += 1;
                return;
            }
            Admit::Hold => {
                // Like a full backend: process() goes back to the frame's
                // first descriptor.
                self.would_block = true;
                rep.held = true;
                return;
            }
        }
        let tag = match (self.vlan_tpid, vlan) {
            (Some(tpid), Some(tci)) => {
                let [a, b] = tpid.to_be_bytes();
                let [c, d] = tci.to_be_bytes();
                Some([a, b, c, d])
            }
            _ => None,
        };
        let len = f.len;
        let frame = &mut self.buf[HEADROOM..HEADROOM + len];
        let hdr = if f.legacy {
            // Legacy IC: checksum from CSS to the end, stored at CSO.
            if let Some((css, cso)) = f.ic {
                insert_checksum(frame, usize::from(css), len, usize::from(cso), false);
            }
            VnetHdr::default()
        } else if f.tse {
            self.tso(len, tag, send, rep);
            return;
        } else {
            checksum_offload(frame, &self.csum_ctx, f.popts, self.vnet_hdr)
        };
        let r = self.emit(HEADROOM, len, hdr, tag, send);
        if !self.blocked_on(&r) {
            count(rep, r, 1, 0);
        }
    }

    /// Whether a send would have blocked (EAGAIN); notes it for process()
    /// to start the frame again later.
    fn blocked_on(&mut self, r: &io::Result<usize>) -> bool {
        let blocked = matches!(r, Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        self.would_block |= blocked;
        blocked
    }

    /// Writes the vnet header and the VLAN tag around the frame at
    /// `buf[start..start + len]` (clobbering up to HEADROOM bytes before
    /// it) and sends it. Returns the length on the wire.
    fn emit(
        &mut self,
        start: usize,
        len: usize,
        mut hdr: VnetHdr,
        tag: Option<[u8; 4]>,
        send: &mut dyn TxSink,
    ) -> io::Result<usize> {
        let end = start + len;
        if start < HEADROOM || end > self.buf.len() || len < ETH_ADDRS_LEN {
            // Unreachable by construction; refuse rather than panic.
            return Err(io::Error::other("e1000: frame outside the TX buffer"));
        }
        let mut first = start;
        if let Some(tag) = tag {
            // Slide the MAC addresses forward to open a gap for the tag.
            first -= VLAN_TAG_LEN;
            self.buf.copy_within(start..start + ETH_ADDRS_LEN, first);
            self.buf[first + ETH_ADDRS_LEN..start + ETH_ADDRS_LEN].copy_from_slice(&tag);
            // Offsets in the vnet header count from the frame's start.
            if hdr.flags & VNET_F_NEEDS_CSUM != 0 {
                hdr.csum_start += VLAN_TAG_LEN as u16;
            }
            if hdr.gso_type != 0 {
                hdr.hdr_len += VLAN_TAG_LEN as u16;
            }
        }
        let wire = end - first;
        if self.vnet_hdr {
            first -= VNET_HDR_LEN;
            self.buf[first..first + VNET_HDR_LEN].copy_from_slice(&hdr.bytes());
        }
        send.send(&self.buf[first..end]).map(|()| wire)
    }

    /// A TSE frame: one GSO frame for a TAP with vnet headers, otherwise
    /// segmented here.
    fn tso(&mut self, len: usize, tag: Option<[u8; 4]>, send: &mut dyn TxSink, rep: &mut TxReport) {
        let Some(t) = tso_plan(&self.tso_ctx, len) else {
            crate::guest_log!(
                log::Level::Debug,
                "e1000: malformed TSO frame dropped: {:?}",
                self.tso_ctx
            );
            rep.dropped += 1;
            return;
        };
        // virtio can describe TCP GSO only, with the checksum field after
        // its start, and IP lengths must fit their 16 bits for the frame as
        // a whole. A frame that is one segment anyway is finished here.
        let ip_len = len - t.ipcss - if t.v4 { 0 } else { IPV6_HLEN };
        if self.vnet_hdr && t.tcp && t.segments > 1 && t.tucso >= t.tucss && ip_len <= 0xffff {
            self.tso_gso(len, &t, tag, send, rep);
        } else {
            self.tso_segment(&t, tag, send, rep);
        }
    }

    fn tso_gso(
        &mut self,
        len: usize,
        t: &Tso,
        tag: Option<[u8; 4]>,
        send: &mut dyn TxSink,
        rep: &mut TxReport,
    ) {
        let frame = &mut self.buf[HEADROOM..HEADROOM + len];
        // The guest zeroed the IP lengths (they differ per segment); the
        // host stack checks them on the big frame, so fill them in.
        if t.v4 {
            put16(frame, t.ipcss + 2, (len - t.ipcss) as u16);
            ipv4_checksum(frame, t);
        } else {
            put16(frame, t.ipcss + 4, (len - t.ipcss - IPV6_HLEN) as u16);
        }
        // The guest left the pseudo-header sum without the length; virtio's
        // NEEDS_CSUM wants it with the length (not complemented).
        let seed = u64::from(be16(frame, t.tucso));
        put16(frame, t.tucso, csum::fold(seed + (len - t.tucss) as u64));
        let mut gso_type = if t.v4 { VNET_GSO_TCPV4 } else { VNET_GSO_TCPV6 };
        if frame[t.tucss + 13] & TCP_CWR != 0 {
            gso_type |= VNET_GSO_ECN;
        }
        let hdr = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            gso_type,
            hdr_len: t.hdr_len as u16,
            gso_size: t.mss as u16,
            csum_start: t.tucss as u16,
            csum_offset: (t.tucso - t.tucss) as u16,
        };
        let r = self.emit(HEADROOM, len, hdr, tag, send);
        if self.blocked_on(&r) {
            return;
        }
        // Every segment after the first repeats the headers (and tag).
        let tag_len = if tag.is_some() { VLAN_TAG_LEN } else { 0 };
        let extra = (t.segments - 1) * (t.hdr_len + tag_len);
        count(rep, r, t.segments as u64, extra as u64);
    }

    /// Software segmentation, in place: segment i is built right before
    /// its payload, over bytes that earlier segments already sent, so the
    /// payload is never copied.
    fn tso_segment(
        &mut self,
        t: &Tso,
        tag: Option<[u8; 4]>,
        send: &mut dyn TxSink,
        rep: &mut TxReport,
    ) {
        let hl = t.hdr_len;
        self.hdr_save[..hl].copy_from_slice(&self.buf[HEADROOM..HEADROOM + hl]);
        let saved = &self.hdr_save;
        let ip_id = be16(saved, t.ipcss + 4);
        // A UDP header is only 8 bytes: no sequence number or flags.
        let (seq, flags) = if t.tcp {
            (be32(saved, t.tucss + 4), saved[t.tucss + 13])
        } else {
            (0, 0)
        };
        for i in 0..t.segments {
            let off = i * t.mss;
            let plen = t.mss.min(t.payload - off);
            let start = HEADROOM + off;
            let seg_len = hl + plen;
            let seg = &mut self.buf[start..start + seg_len];
            seg[..hl].copy_from_slice(&self.hdr_save[..hl]);
            if t.v4 {
                put16(seg, t.ipcss + 2, (seg_len - t.ipcss) as u16);
                put16(seg, t.ipcss + 4, ip_id.wrapping_add(i as u16));
                ipv4_checksum(seg, t);
            } else {
                put16(seg, t.ipcss + 4, (seg_len - t.ipcss - IPV6_HLEN) as u16);
            }
            let l4_len = seg_len - t.tucss;
            let proto = if t.tcp {
                put32(seg, t.tucss + 4, seq.wrapping_add(off as u32));
                let mut f = flags;
                if i + 1 < t.segments {
                    f &= !(TCP_FIN | TCP_PSH);
                }
                if i > 0 {
                    // CWR belongs to the first segment only (RFC 3168).
                    f &= !TCP_CWR;
                }
                seg[t.tucss + 13] = f;
                IPPROTO_TCP
            } else {
                put16(seg, t.tucss + 4, l4_len as u16);
                IPPROTO_UDP
            };
            // The full checksum: pseudo header with this segment's length.
            put16(seg, t.tucso, 0);
            let ph = pseudo_header(seg, t, proto, l4_len as u32);
            let mut c = csum::finish(csum::sum(&seg[t.tucss..], ph));
            if !t.tcp && c == 0 {
                c = 0xffff; // 0 means "no checksum" in UDP
            }
            put16(seg, t.tucso, c);
            let r = self.emit(start, seg_len, VnetHdr::default(), tag, send);
            // Only the first segment can wait for room: once some went
            // out, sending the frame again would repeat them, so the rest
            // of a frame cut short by a full backend is lost (counted).
            if i == 0 && self.blocked_on(&r) {
                return;
            }
            count(rep, r, 1, 0);
        }
    }
}

/// Accounts a send: `segments` wire packets of the returned length plus
/// `extra` bytes, or one drop.
fn count(rep: &mut TxReport, r: io::Result<usize>, segments: u64, extra: u64) {
    match r {
        Ok(wire) => {
            rep.frames += segments;
            rep.bytes += wire as u64 + extra;
        }
        Err(e) => {
            // A full TAP queue or a frame the host refused: lost, as on a
            // wire. The ring keeps going.
            crate::guest_log!(log::Level::Debug, "e1000: TX frame dropped: {e}");
            rep.dropped += 1;
        }
    }
}

/// Non-TSO offloads of an extended frame (POPTS with the checksum
/// context). Returns the vnet header the frame needs.
fn checksum_offload(frame: &mut [u8], c: &Context, popts: u8, vnet_hdr: bool) -> VnetHdr {
    let len = frame.len();
    if popts & POPTS_IXSM != 0 {
        let end = range_end(c.ipcse, len);
        insert_checksum(frame, c.ipcss.into(), end, c.ipcso.into(), false);
    }
    if popts & POPTS_TXSM != 0 {
        let (start, off) = (usize::from(c.tucss), usize::from(c.tucso));
        let end = range_end(c.tucse, len);
        // NEEDS_CSUM always sums to the end of the frame, so a range that
        // stops short of it (trailing padding) is done here instead.
        if vnet_hdr && start < len && off >= start && off + 2 <= len && end == len {
            return VnetHdr {
                flags: VNET_F_NEEDS_CSUM,
                csum_start: start as u16,
                csum_offset: (off - start) as u16,
                ..VnetHdr::default()
            };
        }
        insert_checksum(frame, start, end, off, c.tucmd & TUCMD_TCP == 0);
    }
    VnetHdr::default()
}

/// End (exclusive) of a checksum range whose inclusive end is `cse`; 0
/// means the end of the frame.
fn range_end(cse: u16, len: usize) -> usize {
    if cse == 0 {
        len
    } else {
        (usize::from(cse) + 1).min(len)
    }
}

/// Stores at `off` the checksum of `frame[start..end]`, seeded with the
/// value already at `off` (the guest's pseudo-header sum, or 0). A range
/// or field outside the frame leaves it untouched, as the device would
/// send it.
fn insert_checksum(frame: &mut [u8], start: usize, end: usize, off: usize, udp: bool) {
    let len = frame.len();
    if start >= end || end > len || off >= len || len - off < 2 {
        crate::guest_log!(
            log::Level::Debug,
            "e1000: TX checksum {start}..{end} at {off} outside a {len}-byte frame"
        );
        return;
    }
    let mut acc = csum::sum(&frame[start..end], 0);
    if off + 2 <= start || off >= end {
        // A field inside the range is already in the sum.
        acc += u64::from(be16(frame, off));
    }
    let mut c = csum::finish(acc);
    if udp && c == 0 {
        c = 0xffff;
    }
    put16(frame, off, c);
}

/// Checks a TSO frame's context against the frame; None if the offsets
/// do not describe Ethernet + IP + TCP/UDP headers inside the frame.
fn tso_plan(c: &Context, len: usize) -> Option<Tso> {
    let hdr_len = usize::from(c.hdr_len);
    let mss = usize::from(c.mss);
    let v4 = c.tucmd & TUCMD_IP != 0;
    let tcp = c.tucmd & TUCMD_TCP != 0;
    let (ipcss, ipcso) = (usize::from(c.ipcss), usize::from(c.ipcso));
    let (tucss, tucso) = (usize::from(c.tucss), usize::from(c.tucso));
    let l4_min = if tcp { 20 } else { 8 };
    let ip_min = if v4 { 20 } else { IPV6_HLEN };
    if mss == 0 || hdr_len > len || tucss + l4_min > hdr_len || tucso + 2 > hdr_len {
        return None;
    }
    // The IP header lies between ipcss and tucss.
    if ipcss + ip_min > tucss {
        return None;
    }
    let ip_end = if c.ipcse == 0 {
        tucss
    } else {
        (usize::from(c.ipcse) + 1).min(hdr_len)
    };
    if v4 && (ipcso + 2 > hdr_len || ip_end < ipcss + 20) {
        return None;
    }
    let payload = len - hdr_len;
    let segments = payload.div_ceil(mss).max(1);
    if segments > MAX_SEGMENTS {
        return None;
    }
    // Each segment's IP length field must hold it.
    let largest = hdr_len + mss.min(payload);
    if largest - ipcss - if v4 { 0 } else { IPV6_HLEN } > 0xffff {
        return None;
    }
    Some(Tso {
        hdr_len,
        mss,
        payload,
        segments,
        v4,
        tcp,
        ipcss,
        ipcso,
        ip_end,
        tucss,
        tucso,
    })
}

/// Recomputes the IPv4 header checksum over ipcss..ip_end into ipcso.
fn ipv4_checksum(frame: &mut [u8], t: &Tso) {
    put16(frame, t.ipcso, 0);
    let c = csum::finish(csum::sum(&frame[t.ipcss..t.ip_end], 0));
    put16(frame, t.ipcso, c);
}

fn pseudo_header(seg: &[u8], t: &Tso, proto: u8, l4_len: u32) -> u64 {
    let ip = &seg[t.ipcss..];
    if t.v4 {
        let src = [ip[12], ip[13], ip[14], ip[15]];
        let dst = [ip[16], ip[17], ip[18], ip[19]];
        csum::pseudo_v4(src, dst, proto, l4_len)
    } else {
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&ip[8..24]);
        dst.copy_from_slice(&ip[24..40]);
        csum::pseudo_v6(&src, &dst, proto, l4_len)
    }
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use csum::{fold, pseudo_v4, pseudo_v6, sum};

    const MEM: u64 = 1 << 20;
    const RING: u64 = 0x1000;
    const BUFS: u64 = 0x10000;
    /// A 64-descriptor ring unless a test says otherwise.
    const RING_LEN: u32 = 64 * 16;

    const SRC4: [u8; 4] = [10, 0, 0, 1];
    const DST4: [u8; 4] = [10, 0, 0, 2];
    const SRC6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    const DST6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const SEQ: u32 = 0xfffff000; // wraps during segmentation
    const IP_ID: u16 = 0x1234;
    const ACK_PSH_FIN: u8 = 0x10 | TCP_PSH | TCP_FIN;

    fn mem() -> GuestRam {
        crate::vmm::memory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn legacy(addr: u64, len: u16, cmd: u8) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..10].copy_from_slice(&len.to_le_bytes());
        d[11] = cmd;
        d
    }

    fn legacy_ic(addr: u64, len: u16, cmd: u8, css: u8, cso: u8) -> [u8; 16] {
        let mut d = legacy(addr, len, cmd | CMD_IC);
        d[10] = cso;
        d[13] = css;
        d
    }

    fn data(addr: u64, len: u32, dcmd: u8, popts: u8) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        let lower = (len & 0xf_ffff) | (DTYP_DATA << 20) | (u32::from(dcmd | CMD_DEXT) << 24);
        d[8..12].copy_from_slice(&lower.to_le_bytes());
        d[13] = popts;
        d
    }

    #[derive(Clone, Copy, Default)]
    struct Ctx {
        ipcss: u8,
        ipcso: u8,
        ipcse: u16,
        tucss: u8,
        tucso: u8,
        tucse: u16,
        tucmd: u8,
        paylen: u32,
        hdr_len: u8,
        mss: u16,
    }

    impl Ctx {
        /// Linux's checksum context for Ethernet + IPv4 + TCP/UDP.
        fn csum_v4(tcp: bool) -> Self {
            Ctx {
                ipcss: 14,
                ipcso: 24,
                ipcse: 33,
                tucss: 34,
                tucso: if tcp { 50 } else { 40 },
                tucmd: TUCMD_IP | if tcp { TUCMD_TCP } else { 0 },
                ..Ctx::default()
            }
        }

        /// Linux's TSO context for Ethernet + IPv4 + TCP.
        fn tso_v4(payload: usize, mss: u16) -> Self {
            Ctx {
                tucmd: TUCMD_TSE | TUCMD_TCP | TUCMD_IP,
                paylen: payload as u32,
                hdr_len: 54,
                mss,
                ..Ctx::csum_v4(true)
            }
        }

        /// Linux's TSO context for Ethernet + IPv6 + TCP.
        fn tso_v6(payload: usize, mss: u16) -> Self {
            Ctx {
                ipcss: 14,
                tucss: 54,
                tucso: 70,
                tucmd: TUCMD_TSE | TUCMD_TCP,
                paylen: payload as u32,
                hdr_len: 74,
                mss,
                ..Ctx::default()
            }
        }

        fn desc(&self, cmd: u8) -> [u8; 16] {
            let mut d = [0u8; 16];
            d[0] = self.ipcss;
            d[1] = self.ipcso;
            d[2..4].copy_from_slice(&self.ipcse.to_le_bytes());
            d[4] = self.tucss;
            d[5] = self.tucso;
            d[6..8].copy_from_slice(&self.tucse.to_le_bytes());
            let lower = (self.paylen & 0xf_ffff)
                | (DTYP_CONTEXT << 20)
                | (u32::from(self.tucmd | cmd | CMD_DEXT) << 24);
            d[8..12].copy_from_slice(&lower.to_le_bytes());
            d[13] = self.hdr_len;
            d[14..16].copy_from_slice(&self.mss.to_le_bytes());
            d
        }
    }

    fn put_desc(m: &GuestRam, base: u64, idx: u32, d: &[u8; 16]) {
        m.write_slice(d, GuestAddress(base + u64::from(idx) * 16))
            .unwrap();
    }

    fn read_desc(m: &GuestRam, base: u64, idx: u32) -> [u8; 16] {
        let mut d = [0u8; 16];
        m.read_slice(&mut d, GuestAddress(base + u64::from(idx) * 16))
            .unwrap();
        d
    }

    /// Writes descriptors from index 0 of the ring at RING; returns the
    /// ring with head 0 and tail after them.
    fn post(m: &GuestRam, descs: &[[u8; 16]]) -> TxRing {
        for (i, d) in descs.iter().enumerate() {
            put_desc(m, RING, i as u32, d);
        }
        TxRing {
            base: RING,
            len_bytes: RING_LEN,
            head: 0,
            tail: descs.len() as u32,
        }
    }

    /// One TCP frame sent with TSO: its context, then one data descriptor.
    fn tso_one(frame: &[u8], ctx: Ctx, vnet_hdr: bool) -> (TxReport, Vec<Vec<u8>>) {
        let m = mem();
        write(&m, BUFS, frame);
        let d = data(BUFS, frame.len() as u32, DCMD_TSE | CMD_EOP, POPTS_TXSM);
        let ring = post(&m, &[ctx.desc(0), d]);
        run(&mut TxEngine::new(vnet_hdr), &m, &ring)
    }

    fn run(e: &mut TxEngine, m: &GuestRam, ring: &TxRing) -> (TxReport, Vec<Vec<u8>>) {
        let mut out = Vec::new();
        let rep = e.process(m, ring, &mut |b: &[u8]| {
            out.push(b.to_vec());
            Ok(())
        });
        (rep, out)
    }

    fn write(m: &GuestRam, addr: u64, bytes: &[u8]) {
        m.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    fn eth(ethertype: u16) -> Vec<u8> {
        let mut f = vec![0x52, 0x54, 0, 0, 0, 1, 0x52, 0x54, 0, 0, 0, 2];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f
    }

    fn ipv4(f: &mut Vec<u8>, proto: u8, l4_len: usize, tso: bool) {
        let tot = if tso { 0 } else { (20 + l4_len) as u16 };
        let start = f.len();
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&tot.to_be_bytes());
        f.extend_from_slice(&IP_ID.to_be_bytes());
        f.extend_from_slice(&[0x40, 0, 64, proto, 0, 0]);
        f.extend_from_slice(&SRC4);
        f.extend_from_slice(&DST4);
        if !tso {
            let c = csum::finish(sum(&f[start..], 0));
            f[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
        }
    }

    fn ipv6(f: &mut Vec<u8>, l4_len: usize, tso: bool) {
        let plen = if tso { 0 } else { l4_len as u16 };
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&plen.to_be_bytes());
        f.extend_from_slice(&[IPPROTO_TCP, 64]);
        f.extend_from_slice(&SRC6);
        f.extend_from_slice(&DST6);
    }

    /// A TCP header whose checksum field holds what Linux leaves for the
    /// device: the pseudo-header sum, with the length unless `tso`.
    fn tcp(f: &mut Vec<u8>, flags: u8, pseudo: u64) {
        f.extend_from_slice(&[0x04, 0xd2, 0x00, 0x50]);
        f.extend_from_slice(&SEQ.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 1, 0x50, flags, 0xff, 0xff]);
        f.extend_from_slice(&fold(pseudo).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }

    fn ipv4_tcp(payload: &[u8], flags: u8, tso: bool) -> Vec<u8> {
        let l4 = 20 + payload.len();
        let mut f = eth(0x0800);
        ipv4(&mut f, IPPROTO_TCP, l4, tso);
        let len = if tso { 0 } else { l4 as u32 };
        tcp(&mut f, flags, pseudo_v4(SRC4, DST4, IPPROTO_TCP, len));
        f.extend_from_slice(payload);
        f
    }

    fn ipv6_tcp(payload: &[u8], flags: u8, tso: bool) -> Vec<u8> {
        let l4 = 20 + payload.len();
        let mut f = eth(0x86dd);
        ipv6(&mut f, l4, tso);
        let len = if tso { 0 } else { l4 as u32 };
        tcp(&mut f, flags, pseudo_v6(&SRC6, &DST6, IPPROTO_TCP, len));
        f.extend_from_slice(payload);
        f
    }

    fn ipv4_udp(payload: &[u8]) -> Vec<u8> {
        let l4 = 8 + payload.len();
        let mut f = eth(0x0800);
        ipv4(&mut f, IPPROTO_UDP, l4, false);
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35]);
        f.extend_from_slice(&(l4 as u16).to_be_bytes());
        let ph = pseudo_v4(SRC4, DST4, IPPROTO_UDP, l4 as u32);
        f.extend_from_slice(&fold(ph).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn ipv4_header_ok(f: &[u8]) -> bool {
        fold(sum(&f[14..34], 0)) == 0xffff
    }

    fn l4_v4_ok(f: &[u8], proto: u8) -> bool {
        let l4 = &f[34..];
        fold(sum(l4, pseudo_v4(SRC4, DST4, proto, l4.len() as u32))) == 0xffff
    }

    fn l4_v6_ok(f: &[u8]) -> bool {
        let l4 = &f[54..];
        fold(sum(
            l4,
            pseudo_v6(&SRC6, &DST6, IPPROTO_TCP, l4.len() as u32),
        )) == 0xffff
    }

    fn vnet(b: &[u8]) -> VnetHdr {
        let le = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        assert_eq!(le(10), 0, "num_buffers");
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        }
    }

    /// What the host does with NEEDS_CSUM: sum from csum_start to the end
    /// (the field holds the seed) and store the complement.
    fn complete(f: &mut [u8], h: &VnetHdr) {
        let (s, o) = (usize::from(h.csum_start), usize::from(h.csum_offset));
        let c = csum::finish(sum(&f[s..], 0));
        f[s + o..s + o + 2].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn legacy_frames_and_dd_only_where_rs() {
        let m = mem();
        let a = pattern(60, 1);
        let b = pattern(350, 2);
        write(&m, BUFS, &a);
        write(&m, BUFS + 0x1000, &b);
        let mut descs = [
            legacy(BUFS, 60, CMD_EOP | CMD_RS),
            legacy(BUFS + 0x1000, 100, CMD_RS),
            legacy(BUFS + 0x1000 + 100, 200, 0),
            legacy(BUFS + 0x1000 + 300, 50, CMD_EOP | CMD_RS),
        ];
        // Reserved status bits and the other fields must survive.
        descs[2][12] = 0xf0;
        descs[3][12] = 0xf0 | 0x02;
        descs[3][14] = 0xab;
        let ring = post(&m, &descs);
        let mut e = TxEngine::new(false);
        let (rep, out) = run(&mut e, &m, &ring);
        assert_eq!(
            rep,
            TxReport {
                head: 4,
                descriptors: 4,
                frames: 2,
                bytes: 410,
                dropped: 0,
                ring_error: false,
                more: false,
                blocked: false,
                held: false,
            }
        );
        assert_eq!(out, vec![a, b]);
        let status: Vec<u8> = (0..4).map(|i| read_desc(&m, RING, i)[12]).collect();
        assert_eq!(status, [STA_DD, STA_DD, 0xf0, 0xf0 | STA_DD]);
        for (i, d) in descs.iter().enumerate() {
            let now = read_desc(&m, RING, i as u32);
            assert_eq!((&now[..12], &now[13..]), (&d[..12], &d[13..]), "desc {i}");
        }
        // Nothing more to do: head == tail.
        let (rep, out) = run(&mut e, &m, &TxRing { head: 4, ..ring });
        assert_eq!((rep.head, rep.descriptors, out.len()), (4, 0, 0));
    }

    #[test]
    fn legacy_frame_with_vnet_hdr_gets_empty_header() {
        let m = mem();
        let a = pattern(64, 3);
        write(&m, BUFS, &a);
        let ring = post(&m, &[legacy(BUFS, 64, CMD_EOP)]);
        let mut e = TxEngine::new(true);
        let (rep, out) = run(&mut e, &m, &ring);
        assert_eq!((rep.frames, rep.bytes), (1, 64));
        assert_eq!(out[0][..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        assert_eq!(out[0][VNET_HDR_LEN..], a[..]);
    }

    #[test]
    fn legacy_ic_inserts_checksum() {
        let m = mem();
        let f = ipv4_udp(&pattern(101, 4));
        write(&m, BUFS, &f);
        let (a, b) = (f.len() as u16 - 30, 30u16);
        let ring = post(
            &m,
            &[
                // CSS/CSO count in the EOP descriptor.
                legacy_ic(BUFS, a, 0, 0, 0),
                legacy_ic(BUFS + u64::from(a), b, CMD_EOP, 34, 40),
            ],
        );
        let (rep, out) = run(&mut TxEngine::new(false), &m, &ring);
        assert_eq!(rep.frames, 1);
        assert!(l4_v4_ok(&out[0], IPPROTO_UDP));
        assert_eq!(out[0][..40], f[..40]);
    }

    #[test]
    fn ring_wraps_and_frames_span_calls() {
        let m = mem();
        let (a, b, c) = (pattern(70, 5), pattern(900, 6), pattern(80, 7));
        write(&m, BUFS, &a);
        write(&m, BUFS + 0x1000, &b);
        write(&m, BUFS + 0x2000, &c);
        let n = 8;
        put_desc(&m, RING, 6, &legacy(BUFS, 70, CMD_EOP | CMD_RS));
        put_desc(&m, RING, 7, &legacy(BUFS + 0x1000, 400, CMD_RS));
        put_desc(&m, RING, 0, &data(BUFS + 0x1000 + 400, 500, CMD_EOP, 0));
        put_desc(&m, RING, 1, &legacy(BUFS + 0x2000, 80, CMD_EOP | CMD_RS));
        let ring = TxRing {
            base: RING,
            len_bytes: n * 16,
            head: 6,
            tail: 2,
        };
        let (rep, out) = run(&mut TxEngine::new(false), &m, &ring);
        assert_eq!((rep.head, rep.descriptors, rep.frames), (2, 4, 3));
        assert_eq!(out, vec![a.clone(), b.clone(), c.clone()]);
        assert_eq!(read_desc(&m, RING, 7)[12], STA_DD);
        assert_eq!(read_desc(&m, RING, 0)[12], 0);

        // The same ring in two steps: the second frame is half posted when
        // the first call ends.
        let mut e = TxEngine::new(false);
        let (rep, out) = run(&mut e, &m, &TxRing { tail: 0, ..ring });
        assert_eq!((rep.head, rep.descriptors, rep.frames), (0, 2, 1));
        assert_eq!(out, vec![a]);
        let (rep, out) = run(&mut e, &m, &TxRing { head: 0, ..ring });
        assert_eq!((rep.head, rep.descriptors, rep.frames), (2, 2, 2));
        assert_eq!(out, vec![b, c]);
    }

    #[test]
    fn context_reuse_checksum_offload() {
        let m = mem();
        let mut f1 = ipv4_tcp(&pattern(1000, 8), 0x18, false);
        // IXSM must fill in the IP checksum.
        f1[24] = 0;
        f1[25] = 0;
        let f2 = ipv4_tcp(&pattern(333, 9), 0x10, false);
        let u = ipv4_udp(&pattern(77, 10));
        write(&m, BUFS, &f1);
        write(&m, BUFS + 0x1000, &f2);
        write(&m, BUFS + 0x2000, &u);
        let both = POPTS_TXSM | POPTS_IXSM;
        let ring = post(
            &m,
            &[
                Ctx::csum_v4(true).desc(CMD_RS),
                data(BUFS, 100, 0, both),
                data(BUFS + 100, f1.len() as u32 - 100, CMD_EOP, 0),
                data(BUFS + 0x1000, f2.len() as u32, CMD_EOP, POPTS_TXSM),
                // A TSO context in between must not replace the checksum
                // context (two contexts, as on the 8254x).
                Ctx::tso_v4(1000, 500).desc(0),
                data(BUFS + 0x1000, f2.len() as u32, CMD_EOP, POPTS_TXSM),
                Ctx::csum_v4(false).desc(0),
                data(BUFS + 0x2000, u.len() as u32, CMD_EOP, POPTS_TXSM),
            ],
        );
        let (rep, out) = run(&mut TxEngine::new(false), &m, &ring);
        assert_eq!((rep.descriptors, rep.frames, rep.dropped), (8, 4, 0));
        assert_eq!(read_desc(&m, RING, 0)[12], STA_DD);
        assert!(ipv4_header_ok(&out[0]));
        assert!(l4_v4_ok(&out[0], IPPROTO_TCP));
        assert!(l4_v4_ok(&out[1], IPPROTO_TCP));
        assert_eq!(out[1], out[2]);
        assert!(l4_v4_ok(&out[3], IPPROTO_UDP));
        // Only the checksum fields changed.
        assert_eq!(out[1][..50], f2[..50]);
        assert_eq!(out[1][52..], f2[52..]);
    }

    #[test]
    fn checksum_offload_with_vnet_hdr_is_needs_csum() {
        let m = mem();
        let f = ipv4_tcp(&pattern(500, 11), 0x18, false);
        let mut padded = ipv4_udp(&pattern(3, 12));
        let udp_end = padded.len() as u16 - 1;
        padded.resize(60, 0); // Ethernet padding after the datagram
        write(&m, BUFS, &f);
        write(&m, BUFS + 0x1000, &padded);
        let ring = post(
            &m,
            &[
                Ctx::csum_v4(true).desc(0),
                data(BUFS, f.len() as u32, CMD_EOP, POPTS_TXSM),
                Ctx {
                    tucse: udp_end,
                    ..Ctx::csum_v4(false)
                }
                .desc(0),
                data(BUFS + 0x1000, 60, CMD_EOP, POPTS_TXSM),
            ],
        );
        let (rep, out) = run(&mut TxEngine::new(true), &m, &ring);
        assert_eq!((rep.frames, rep.bytes), (2, (f.len() + 60) as u64));
        let h = vnet(&out[0]);
        assert_eq!(
            (h.flags, h.gso_type, h.csum_start, h.csum_offset),
            (VNET_F_NEEDS_CSUM, 0, 34, 16)
        );
        // The frame goes as the guest wrote it; the host finishes it.
        let mut g = out[0][VNET_HDR_LEN..].to_vec();
        assert_eq!(g, f);
        complete(&mut g, &h);
        assert!(l4_v4_ok(&g, IPPROTO_TCP));
        // The checksum stops before the padding: done here.
        assert_eq!(vnet(&out[1]).flags, 0);
        let p = &out[1][VNET_HDR_LEN..];
        assert!(l4_v4_ok(&p[..usize::from(udp_end) + 1], IPPROTO_UDP));
    }

    fn check_v4_segments(out: &[Vec<u8>], payload: &[u8], mss: usize, skip: usize) {
        let segs = payload.len().div_ceil(mss);
        assert_eq!(out.len(), segs);
        for (i, o) in out.iter().enumerate() {
            let s = &o[skip..];
            let chunk = &payload[i * mss..payload.len().min((i + 1) * mss)];
            assert_eq!(s.len(), 54 + chunk.len());
            assert_eq!(be16(s, 16) as usize, 40 + chunk.len(), "tot_len");
            assert_eq!(be16(s, 18), IP_ID + i as u16, "ip id");
            assert!(ipv4_header_ok(s), "ip checksum of segment {i}");
            assert!(l4_v4_ok(s, IPPROTO_TCP), "tcp checksum of segment {i}");
            assert_eq!(be32(s, 38), SEQ.wrapping_add((i * mss) as u32));
            let flags = if i + 1 == segs { ACK_PSH_FIN } else { 0x10 };
            assert_eq!(s[47], flags, "flags of segment {i}");
            assert_eq!(&s[54..], chunk);
        }
    }

    #[test]
    fn tso_ipv4_segmented_in_software() {
        let m = mem();
        let payload = pattern(3000, 13);
        let f = ipv4_tcp(&payload, ACK_PSH_FIN, true);
        write(&m, BUFS, &f);
        let tse = POPTS_TXSM | POPTS_IXSM;
        let ring = post(
            &m,
            &[
                Ctx::tso_v4(3000, 1000).desc(CMD_RS),
                data(BUFS, 54, DCMD_TSE, tse),
                data(BUFS + 54, 1500, DCMD_TSE, tse),
                data(BUFS + 1554, 1500, DCMD_TSE | CMD_EOP | CMD_RS, tse),
            ],
        );
        let mut e = TxEngine::new(false);
        let (rep, out) = run(&mut e, &m, &ring);
        assert_eq!((rep.frames, rep.bytes, rep.dropped), (3, 3 * 1054, 0));
        check_v4_segments(&out, &payload, 1000, 0);

        // The context stays: the next TSO frame uses it too, and a
        // payload that is not a multiple of the MSS leaves a short tail.
        let payload = pattern(2100, 14);
        let f = ipv4_tcp(&payload, ACK_PSH_FIN, true);
        write(&m, BUFS, &f);
        put_desc(
            &m,
            RING,
            4,
            &data(BUFS, f.len() as u32, DCMD_TSE | CMD_EOP, tse),
        );
        let (rep, out) = run(
            &mut e,
            &m,
            &TxRing {
                head: 4,
                tail: 5,
                ..ring
            },
        );
        assert_eq!(rep.frames, 3);
        check_v4_segments(&out, &payload, 1000, 0);
    }

    #[test]
    fn tso_ipv6_segmented_in_software() {
        let payload = pattern(2500, 15);
        let (rep, out) = tso_one(
            &ipv6_tcp(&payload, ACK_PSH_FIN, true),
            Ctx::tso_v6(2500, 1200),
            false,
        );
        assert_eq!(rep.frames, 3);
        for (i, s) in out.iter().enumerate() {
            let chunk = &payload[i * 1200..2500.min((i + 1) * 1200)];
            assert_eq!(s.len(), 74 + chunk.len());
            assert_eq!(be16(s, 18) as usize, 20 + chunk.len(), "payload_len");
            assert!(l4_v6_ok(s), "tcp checksum of segment {i}");
            assert_eq!(be32(s, 58), SEQ.wrapping_add(i as u32 * 1200));
            assert_eq!(s[67], if i == 2 { ACK_PSH_FIN } else { 0x10 });
            assert_eq!(&s[74..], chunk);
        }
    }

    #[test]
    fn tso_with_vnet_hdr_is_one_gso_frame() {
        let m = mem();
        let payload = pattern(3000, 16);
        let f = ipv4_tcp(&payload, ACK_PSH_FIN, true);
        write(&m, BUFS, &f);
        let mut cwr = ipv4_tcp(&payload, 0x10 | TCP_CWR, true);
        cwr.truncate(54 + 1500);
        write(&m, BUFS + 0x2000, &cwr);
        let ring = post(
            &m,
            &[
                Ctx::tso_v4(3000, 1000).desc(0),
                data(BUFS, f.len() as u32, DCMD_TSE | CMD_EOP, POPTS_TXSM),
                data(
                    BUFS + 0x2000,
                    cwr.len() as u32,
                    DCMD_TSE | CMD_EOP,
                    POPTS_TXSM,
                ),
            ],
        );
        let (rep, out) = run(&mut TxEngine::new(true), &m, &ring);
        assert_eq!(out.len(), 2);
        // Counted as the wire would see it: 3 + 2 segments.
        assert_eq!((rep.frames, rep.dropped), (5, 0));
        assert_eq!(rep.bytes, (3 * 54 + 3000 + 2 * 54 + 1500) as u64);
        let h = vnet(&out[0]);
        assert_eq!(
            (h.flags, h.gso_type, h.hdr_len, h.gso_size),
            (VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4, 54, 1000)
        );
        assert_eq!((h.csum_start, h.csum_offset), (34, 16));
        let g = &out[0][VNET_HDR_LEN..];
        assert_eq!(g.len(), f.len());
        assert_eq!(be16(g, 16) as usize, f.len() - 14, "tot_len");
        assert!(ipv4_header_ok(g));
        let tcp_len = (f.len() - 34) as u32;
        assert_eq!(
            be16(g, 50),
            fold(pseudo_v4(SRC4, DST4, IPPROTO_TCP, tcp_len))
        );
        assert_eq!(g[54..], payload[..]);
        let mut done = g.to_vec();
        complete(&mut done, &h);
        assert!(l4_v4_ok(&done, IPPROTO_TCP));
        assert_eq!(vnet(&out[1]).gso_type, VNET_GSO_TCPV4 | VNET_GSO_ECN);
    }

    #[test]
    fn tso_ipv6_with_vnet_hdr() {
        let payload = pattern(4000, 17);
        let (rep, out) = tso_one(
            &ipv6_tcp(&payload, 0x10, true),
            Ctx::tso_v6(4000, 1440),
            true,
        );
        assert_eq!(rep.frames, 3);
        let h = vnet(&out[0]);
        assert_eq!(
            (h.gso_type, h.hdr_len, h.gso_size),
            (VNET_GSO_TCPV6, 74, 1440)
        );
        assert_eq!((h.csum_start, h.csum_offset), (54, 16));
        let mut g = out[0][VNET_HDR_LEN..].to_vec();
        assert_eq!(be16(&g, 18), 4020, "payload_len");
        complete(&mut g, &h);
        assert!(l4_v6_ok(&g));
    }

    #[test]
    fn tso_single_segment_with_vnet_hdr_is_finished_here() {
        let payload = pattern(700, 18);
        let (rep, out) = tso_one(
            &ipv4_tcp(&payload, ACK_PSH_FIN, true),
            Ctx::tso_v4(700, 1000),
            true,
        );
        assert_eq!(rep.frames, 1);
        assert_eq!(vnet(&out[0]).flags, 0);
        check_v4_segments(&out, &payload, 1000, VNET_HDR_LEN);
    }

    #[test]
    fn vlan_tag_inserted_with_vle() {
        let m = mem();
        let f = ipv4_tcp(&pattern(200, 19), 0x18, false);
        write(&m, BUFS, &f);
        let mut d = data(BUFS, f.len() as u32, CMD_EOP | CMD_VLE, POPTS_TXSM);
        d[14..16].copy_from_slice(&0x2064u16.to_le_bytes());
        let ring = post(&m, &[Ctx::csum_v4(true).desc(0), d]);
        let mut e = TxEngine::new(true);
        let (rep, out) = run(&mut e, &m, &ring);
        assert_eq!(rep.bytes, f.len() as u64 + 4);
        let h = vnet(&out[0]);
        assert_eq!((h.csum_start, h.csum_offset), (38, 16));
        let g = &out[0][VNET_HDR_LEN..];
        assert_eq!(g[..12], f[..12]);
        assert_eq!(g[12..16], [0x81, 0x00, 0x20, 0x64]);
        assert_eq!(g[16..], f[12..]);

        // CTRL.VME off: VLE is ignored.
        e.set_vlan(false, 0x8100);
        let (_, out) = run(&mut e, &m, &ring);
        assert_eq!(out[0][VNET_HDR_LEN..], f[..]);

        // Software TSO tags every segment.
        let payload = pattern(2000, 20);
        let f = ipv4_tcp(&payload, ACK_PSH_FIN, true);
        write(&m, BUFS, &f);
        let mut d = data(BUFS, f.len() as u32, DCMD_TSE | CMD_EOP | CMD_VLE, 0);
        d[14..16].copy_from_slice(&5u16.to_le_bytes());
        let ring = post(&m, &[Ctx::tso_v4(2000, 1000).desc(0), d]);
        let mut e = TxEngine::new(false);
        e.set_vlan(true, 0x88a8);
        let (rep, out) = run(&mut e, &m, &ring);
        assert_eq!((rep.frames, rep.bytes), (2, 2 * (1054 + 4)));
        let untagged: Vec<Vec<u8>> = out
            .iter()
            .map(|s| {
                assert_eq!(s[12..16], [0x88, 0xa8, 0, 5]);
                [&s[..12], &s[16..]].concat()
            })
            .collect();
        check_v4_segments(&untagged, &payload, 1000, 0);
    }

    #[test]
    fn hostile_ring_registers() {
        let m = mem();
        let f = pattern(60, 21);
        write(&m, BUFS, &f);
        for i in 0..8 {
            put_desc(&m, RING, i, &legacy(BUFS, 60, CMD_EOP | CMD_RS));
        }
        let mut e = TxEngine::new(false);
        let ok = TxRing {
            base: RING,
            len_bytes: 8 * 16,
            head: 1,
            tail: 3,
        };
        let bad = [
            TxRing { len_bytes: 0, ..ok },
            TxRing {
                len_bytes: 15,
                ..ok
            },
            TxRing { head: 8, ..ok },
            TxRing { tail: 8, ..ok },
            TxRing {
                head: u32::MAX,
                ..ok
            },
            // 100 bytes are 6 descriptors: tail 6 is beyond them.
            TxRing {
                len_bytes: 100,
                tail: 6,
                ..ok
            },
        ];
        for r in bad {
            let (rep, out) = run(&mut e, &m, &r);
            assert!(rep.ring_error, "{r:?}");
            assert_eq!(
                (rep.head, rep.descriptors, out.len()),
                (r.head, 0, 0),
                "{r:?}"
            );
        }
        // A ragged TDLEN is rounded down, not refused.
        let (rep, out) = run(
            &mut e,
            &m,
            &TxRing {
                len_bytes: 100,
                tail: 5,
                ..ok
            },
        );
        assert!(!rep.ring_error);
        assert_eq!((rep.head, out.len()), (5, 4));
        // The biggest ring the registers allow costs nothing when empty.
        let (rep, _) = run(
            &mut e,
            &m,
            &TxRing {
                len_bytes: u32::MAX,
                head: 7,
                tail: 7,
                ..ok
            },
        );
        assert_eq!((rep.head, rep.descriptors, rep.ring_error), (7, 0, false));
    }

    #[test]
    fn hostile_ring_outside_memory() {
        let m = mem();
        let mut e = TxEngine::new(false);
        let r = TxRing {
            base: MEM,
            len_bytes: 64,
            head: 2,
            tail: 0,
        };
        let (rep, _) = run(&mut e, &m, &r);
        assert!(rep.ring_error);
        assert_eq!((rep.head, rep.descriptors), (2, 0));
        // The ring runs off the end of memory after two descriptors.
        let f = pattern(60, 22);
        write(&m, BUFS, &f);
        let base = MEM - 32;
        put_desc(&m, base, 0, &legacy(BUFS, 60, CMD_EOP | CMD_RS));
        put_desc(&m, base, 1, &legacy(BUFS, 60, CMD_EOP | CMD_RS));
        let r = TxRing {
            base,
            len_bytes: 4 * 16,
            head: 0,
            tail: 3,
        };
        let (rep, out) = run(&mut e, &m, &r);
        assert!(rep.ring_error);
        assert_eq!((rep.head, rep.descriptors, out.len()), (2, 2, 2));
        // Descriptor addresses that overflow u64.
        for base in [u64::MAX - 15, u64::MAX - 7, u64::MAX] {
            let r = TxRing {
                base,
                len_bytes: 4 * 16,
                head: 1,
                tail: 3,
            };
            let (rep, _) = run(&mut e, &m, &r);
            assert!(rep.ring_error);
            assert_eq!((rep.head, rep.descriptors), (1, 0));
        }
    }

    #[test]
    fn hostile_buffers() {
        let m = mem();
        let f = pattern(60, 23);
        write(&m, BUFS, &f);
        let good = legacy(BUFS, 60, CMD_EOP);
        let mut reserved = data(BUFS, 60, CMD_EOP | CMD_RS, 0);
        reserved[10] |= 0x70; // DTYP 7
        let ring = post(
            &m,
            &[
                legacy(MEM - 10, 20, CMD_EOP),
                good,
                data(u64::MAX - 5, 100, CMD_EOP, 0),
                good,
                // The second buffer is bad: the whole frame goes.
                legacy(BUFS, 30, 0),
                legacy(MEM, 30, 0),
                legacy(BUFS, 30, CMD_EOP),
                good,
                // Longer than any frame.
                data(0, 0xf_ffff, CMD_EOP, 0),
                legacy(0, 0xffff, 0),
                legacy(0, 0xffff, 0),
                legacy(0, 0xffff, CMD_EOP),
                good,
                // Too short to be Ethernet, and empty.
                legacy(BUFS, 13, CMD_EOP),
                legacy(MEM * 4, 0, CMD_EOP),
                // Zero-length buffers inside a frame are fine, whatever
                // their address.
                legacy(u64::MAX, 0, 0),
                good,
                // A reserved descriptor type is skipped.
                reserved,
            ],
        );
        let (rep, out) = run(&mut TxEngine::new(false), &m, &ring);
        assert_eq!(rep.descriptors, 18);
        assert_eq!(rep.frames, 5);
        assert_eq!(rep.dropped, 7);
        assert!(out.iter().all(|o| *o == f));
        assert_eq!(read_desc(&m, RING, 17)[12], STA_DD);

        // A frame of exactly MAX_FRAME bytes still goes.
        let ring = post(
            &m,
            &[
                data(0, 65536, 0, 0),
                data(0, 256, CMD_EOP, 0),
                data(0, 65536, 0, 0),
                data(0, 257, CMD_EOP, 0),
            ],
        );
        let (rep, out) = run(&mut TxEngine::new(true), &m, &ring);
        assert_eq!((rep.frames, rep.dropped), (1, 1));
        assert_eq!(out[0].len(), VNET_HDR_LEN + MAX_FRAME);
    }

    #[test]
    fn hostile_frame_without_eop_fills_the_ring() {
        let m = mem();
        let n = 16;
        for i in 0..n {
            put_desc(&m, RING, i, &data(0, 0xf_ffff, CMD_RS, 0));
        }
        let r = TxRing {
            base: RING,
            len_bytes: n * 16,
            head: 5,
            tail: 4,
        };
        let mut e = TxEngine::new(false);
        let (rep, out) = run(&mut e, &m, &r);
        assert_eq!(
            (rep.head, rep.descriptors, rep.frames, rep.dropped),
            (4, 15, 0, 0)
        );
        assert!(out.is_empty());
        // The frame is still open: its EOP drops it.
        put_desc(&m, RING, 4, &legacy(0, 60, CMD_EOP));
        let (rep, _) = run(
            &mut e,
            &m,
            &TxRing {
                head: 4,
                tail: 5,
                ..r
            },
        );
        assert_eq!((rep.frames, rep.dropped), (0, 1));

        // Small buffers without EOP: after a reset the next frame is clean.
        let f = pattern(60, 24);
        write(&m, BUFS, &f);
        for i in 0..n {
            put_desc(&m, RING, i, &legacy(BUFS, 60, 0));
        }
        let (rep, _) = run(
            &mut e,
            &m,
            &TxRing {
                head: 0,
                tail: 15,
                ..r
            },
        );
        assert_eq!((rep.descriptors, rep.frames, rep.dropped), (15, 0, 0));
        e.reset();
        put_desc(&m, RING, 15, &legacy(BUFS, 60, CMD_EOP));
        let (rep, out) = run(
            &mut e,
            &m,
            &TxRing {
                head: 15,
                tail: 0,
                ..r
            },
        );
        assert_eq!((rep.frames, rep.dropped), (1, 0));
        assert_eq!(out, vec![f]);
    }

    #[test]
    fn hostile_tso_contexts() {
        let m = mem();
        let payload = pattern(3000, 25);
        let f = ipv4_tcp(&payload, ACK_PSH_FIN, true);
        write(&m, BUFS, &f);
        let len = f.len() as u32;
        let frame = data(BUFS, len, DCMD_TSE | CMD_EOP, POPTS_TXSM);
        let base = Ctx::tso_v4(3000, 1000);
        let bad = [
            Ctx { mss: 0, ..base },
            Ctx { tucss: 40, ..base },
            Ctx { tucso: 53, ..base },
            Ctx { tucso: 255, ..base },
            Ctx { ipcss: 20, ..base },
            Ctx { ipcso: 60, ..base },
            Ctx { ipcse: 20, ..base },
            Ctx { hdr_len: 0, ..base },
            // UDP with the header at the end of hdr_len.
            Ctx {
                tucmd: TUCMD_TSE | TUCMD_IP,
                tucss: 250,
                tucso: 252,
                hdr_len: 255,
                ..base
            },
            // IPv6 needs 40 bytes of IP header.
            Ctx {
                tucmd: TUCMD_TSE | TUCMD_TCP,
                ..base
            },
        ];
        for vnet in [false, true] {
            for (i, c) in bad.iter().enumerate() {
                let mut e = TxEngine::new(vnet);
                let ring = post(&m, &[c.desc(0), frame]);
                let (rep, out) = run(&mut e, &m, &ring);
                assert_eq!((rep.frames, rep.dropped, out.len()), (0, 1, 0), "{i}");
            }
        }
        // More than MAX_SEGMENTS segments.
        let big = ipv4_tcp(&pattern(MAX_SEGMENTS + 1, 28), ACK_PSH_FIN, true);
        write(&m, BUFS + 0x4000, &big);
        let d = data(BUFS + 0x4000, big.len() as u32, DCMD_TSE | CMD_EOP, 0);
        let ring = post(&m, &[Ctx { mss: 1, ..base }.desc(0), d]);
        let (rep, _) = run(&mut TxEngine::new(false), &m, &ring);
        assert_eq!((rep.frames, rep.dropped), (0, 1));
        // Headers longer than the frame.
        let short = data(BUFS, 100, DCMD_TSE | CMD_EOP, POPTS_TXSM);
        let ring = post(
            &m,
            &[
                Ctx {
                    hdr_len: 101,
                    ..base
                }
                .desc(0),
                short,
            ],
        );
        let (rep, _) = run(&mut TxEngine::new(true), &m, &ring);
        assert_eq!((rep.frames, rep.dropped), (0, 1));
        // TSE without any TSO context.
        let ring = post(&m, &[Ctx::csum_v4(true).desc(0), frame]);
        let (rep, _) = run(&mut TxEngine::new(false), &m, &ring);
        assert_eq!((rep.frames, rep.dropped), (0, 1));
        // A tiny MSS within the bound works: 3000 one-byte segments.
        let ring = post(&m, &[Ctx { mss: 1, ..base }.desc(0), frame]);
        let (rep, out) = run(&mut TxEngine::new(false), &m, &ring);
        assert_eq!((rep.frames, rep.dropped), (3000, 0));
        check_v4_segments(&out, &payload, 1, 0);
        // Odd offsets the guest asked for are honoured, not trusted: a
        // checksum field before the TCP header goes the software way.
        let ring = post(&m, &[Ctx { tucso: 30, ..base }.desc(0), frame]);
        let (rep, _) = run(&mut TxEngine::new(true), &m, &ring);
        assert_eq!((rep.frames, rep.dropped), (3, 0));
    }

    #[test]
    fn send_errors_are_drops() {
        let m = mem();
        let f = pattern(60, 26);
        write(&m, BUFS, &f);
        let d = legacy(BUFS, 60, CMD_EOP | CMD_RS);
        let ring = post(&m, &[d, d, d, d]);
        let mut calls = 0;
        let rep = TxEngine::new(false).process(&m, &ring, &mut |_: &[u8]| {
            calls += 1;
            if calls % 2 == 0 {
                // A frame the host refused (EAGAIN is not a drop: below).
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                Ok(())
            }
        });
        assert_eq!(
            (rep.head, rep.frames, rep.bytes, rep.dropped),
            (4, 2, 120, 2)
        );
        assert!((0..4).all(|i| read_desc(&m, RING, i)[12] == STA_DD));
    }

    /// EAGAIN stops the ring at the frame's first descriptor, untouched
    /// (no DD), and the next pass sends it from there.
    #[test]
    fn a_send_that_would_block_waits_at_its_frame() {
        let m = mem();
        let f = pattern(60, 26);
        write(&m, BUFS, &f);
        // Frame 0 in one descriptor, frame 1 in two.
        let ring = post(
            &m,
            &[
                legacy(BUFS, 60, CMD_EOP | CMD_RS),
                legacy(BUFS, 30, CMD_RS),
                legacy(BUFS + 30, 30, CMD_EOP | CMD_RS),
            ],
        );
        let mut e = TxEngine::new(false);
        let mut calls = 0;
        let rep = e.process(&m, &ring, &mut |_: &[u8]| {
            calls += 1;
            if calls == 2 {
                Err(io::Error::from_raw_os_error(libc::EAGAIN))
            } else {
                Ok(())
            }
        });
        assert!(rep.blocked);
        assert_eq!((rep.head, rep.frames, rep.dropped), (1, 1, 0));
        assert_eq!(read_desc(&m, RING, 2)[12], 0, "no DD on the frame's end");
        let rest = TxRing {
            head: rep.head,
            ..ring
        };
        let (rep, out) = run(&mut e, &m, &rest);
        assert!(!rep.blocked);
        assert_eq!((rep.head, rep.frames, rep.dropped), (3, 1, 0));
        assert_eq!(out, vec![f.clone()], "frame 1 whole, gathered again");
        assert_eq!(read_desc(&m, RING, 2)[12], STA_DD);
    }

    #[test]
    fn reset_forgets_contexts() {
        let m = mem();
        let f = ipv4_tcp(&pattern(3000, 27), ACK_PSH_FIN, true);
        write(&m, BUFS, &f);
        let frame = data(BUFS, f.len() as u32, DCMD_TSE | CMD_EOP, POPTS_TXSM);
        let mut e = TxEngine::new(false);
        let (rep, _) = run(
            &mut e,
            &m,
            &post(&m, &[Ctx::tso_v4(3000, 1000).desc(0), frame]),
        );
        assert_eq!(rep.frames, 3);
        e.reset();
        let (rep, _) = run(&mut e, &m, &post(&m, &[frame]));
        assert_eq!((rep.frames, rep.dropped), (0, 1));
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Random descriptors, contexts and packet bytes: no panic, counters
    /// that add up, frames no bigger than the buffer.
    #[test]
    fn fuzz_random_descriptors() {
        let m = mem();
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        // Random bytes where buffers point, so headers are garbage too.
        let mut junk = vec![0u8; 0x10000];
        junk.iter_mut().for_each(|b| *b = rng.next() as u8);
        write(&m, BUFS, &junk);
        let plausible = Ctx::tso_v4(1000, 100);
        let mut totals = [0u64; 4];
        for iter in 0..3000 {
            let mut e = TxEngine::new(iter % 2 == 0);
            e.set_vlan(iter % 3 == 0, 0x8100);
            let n = 1 + rng.below(32) as u32;
            for i in 0..n {
                let mut d = [0u8; 16];
                d.iter_mut().for_each(|b| *b = rng.next() as u8);
                match rng.below(6) {
                    // Mostly buffers inside the junk, of modest length.
                    0..=2 => {
                        let addr = BUFS + rng.below(0x10000);
                        d[..8].copy_from_slice(&addr.to_le_bytes());
                        // Under 4 KiB; DTYP data, rarely context.
                        d[9] &= 0x0f;
                        d[10] = if rng.below(8) == 0 { 0 } else { 0x10 };
                    }
                    // Contexts close to a real one, with a few bytes off.
                    3 => {
                        d = plausible.desc(d[11] & CMD_RS);
                        d[11] |= TUCMD_TSE | (rng.next() as u8 & (TUCMD_IP | TUCMD_TCP));
                        let k = rng.below(16) as usize;
                        d[k] = rng.next() as u8;
                    }
                    _ => {}
                }
                put_desc(&m, RING, i, &d);
            }
            // Sometimes a few valid TSO frames over the junk.
            if iter % 7 == 0 {
                put_desc(&m, RING, 0, &plausible.desc(0));
                put_desc(
                    &m,
                    RING,
                    n - 1,
                    &data(BUFS, 1054, DCMD_TSE | CMD_EOP, POPTS_TXSM),
                );
            }
            let ring = TxRing {
                base: if rng.below(50) == 0 { rng.next() } else { RING },
                len_bytes: match rng.below(20) {
                    0 => rng.next() as u32,
                    _ => n * 16 + rng.below(16) as u32,
                },
                head: rng.below(u64::from(n) + 1) as u32,
                tail: rng.below(u64::from(n) + 1) as u32,
            };
            let (mut sent, mut failed) = (0u64, 0u64);
            let fail = iter % 5 == 0;
            let rep = e.process(&m, &ring, &mut |b: &[u8]| {
                assert!(b.len() <= VNET_HDR_LEN + VLAN_TAG_LEN + MAX_FRAME);
                if fail && (sent + failed) % 3 == 2 {
                    failed += 1;
                    Err(io::Error::other("full"))
                } else {
                    sent += 1;
                    Ok(())
                }
            });
            let count = ring.len_bytes / 16;
            assert!(rep.descriptors <= count);
            if !rep.ring_error && !rep.more {
                assert_eq!(rep.head, ring.tail);
            }
            if rep.more {
                assert!(rep.descriptors >= PASS_DESCRIPTORS || sent + failed >= PASS_WRITES);
                assert_ne!(rep.head, ring.tail);
            }
            assert!(rep.dropped >= failed);
            // Only a GSO frame counts as more than one.
            if e.vnet_hdr {
                assert!(rep.frames >= sent);
            } else {
                assert_eq!(rep.frames, sent);
            }
            totals[0] += sent;
            totals[1] += rep.dropped;
            totals[2] += u64::from(rep.ring_error);
            totals[3] += rep.frames;
        }
        // The run reached the interesting paths: frames went out, GSO
        // frames among them, and some rings were refused.
        let [sent, dropped, ring_errors, frames] = totals;
        assert!(sent > 1000 && frames > sent && dropped > 0 && ring_errors > 0);
    }
}
