//! What the userspace policy stage reads of a frame (its flow: addresses,
//! protocol, ports) and the answers it writes for a refused one: a TCP RST,
//! or an ICMP / ICMPv6 "administratively prohibited", as the kernel's
//! `reject` would. Everything here reads guest-written bytes: every offset
//! is checked, and a frame that does not parse is "cannot judge".

use std::net::IpAddr;

use crate::net::csum;

const ETH_LEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
/// IPv6 extension headers walked to find the transport header, at most.
const MAX_EXT_HEADERS: usize = 8;
/// Bytes of a frame the stage reads: headers, with IPv6 extension headers
/// and the quote an ICMPv6 error carries.
pub const HEAD: usize = 512;

/// One direction of a flow; ports are ICMP echo identifiers for ICMP
/// (both ports the id, so an echo and its reply are one flow), 0 for other
/// protocols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
}

impl Flow {
    /// The same flow seen from the other end.
    pub fn reverse(&self) -> Flow {
        Flow {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }
}

/// A fragment's datagram: the fragments after the first carry no ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub id: u32,
}

/// What a frame is, for the policy.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind {
    /// ARP, IPv6 neighbour discovery and MLD, DHCP from the client: they
    /// always pass.
    Housekeeping,
    /// Not ARP, IPv4 or IPv6 (a VLAN tag, PPPoE, ...), or malformed:
    /// nothing the rules could judge.
    Unjudgeable,
    /// A fragment after the first of `key`'s datagram.
    LaterFragment(FragKey),
    /// An IP packet of `flow`; `first_fragment` when it starts a datagram
    /// that more fragments follow.
    Ip {
        flow: Flow,
        first_fragment: Option<FragKey>,
    },
}

/// Where the parts of an IP packet are in the frame.
struct Layout {
    v6: bool,
    /// Offset of the transport header.
    l4: usize,
    /// The transport protocol (after IPv6 extension headers).
    proto: u8,
    /// Where the IP packet ends (its length field), at most the frame's.
    end: usize,
    /// Fragment offset (in 8-byte units) and more-fragments, with the id.
    frag: Option<(u16, bool, u32)>,
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn addr(b: &[u8], at: usize, v6: bool) -> Option<IpAddr> {
    Some(if v6 {
        IpAddr::from(<[u8; 16]>::try_from(b.get(at..at + 16)?).ok()?)
    } else {
        IpAddr::from(<[u8; 4]>::try_from(b.get(at..at + 4)?).ok()?)
    })
}

fn layout(f: &[u8], len: usize) -> Option<Layout> {
    match be16(f, 12)? {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(f.get(ETH_LEN)? & 0x0f) * 4;
            if f[ETH_LEN] >> 4 != 4 || ihl < 20 {
                return None;
            }
            let total = usize::from(be16(f, ETH_LEN + 2)?);
            let flags = be16(f, ETH_LEN + 6)?;
            let (offset, more) = (flags & 0x1fff, flags & 0x2000 != 0);
            let id = u32::from(be16(f, ETH_LEN + 4)?);
            Some(Layout {
                v6: false,
                l4: ETH_LEN + ihl,
                proto: *f.get(ETH_LEN + 9)?,
                end: (ETH_LEN + total).min(len),
                frag: (offset != 0 || more).then_some((offset, more, id)),
            })
        }
        ETHERTYPE_IPV6 => {
            if f.get(ETH_LEN)? >> 4 != 6 {
                return None;
            }
            let payload = usize::from(be16(f, ETH_LEN + 4)?);
            let mut next = *f.get(ETH_LEN + 6)?;
            let mut at = ETH_LEN + 40;
            let mut frag = None;
            for _ in 0..MAX_EXT_HEADERS {
                match next {
                    // Hop-by-hop, routing, destination options.
                    0 | 43 | 60 => {
                        next = *f.get(at)?;
                        at += (usize::from(*f.get(at + 1)?) + 1) * 8;
                    }
                    44 => {
                        let off = be16(f, at + 2)?;
                        frag = Some((off >> 3, off & 1 != 0, be32(f, at + 4)?));
                        next = *f.get(at)?;
                        at += 8;
                    }
                    _ => {
                        return Some(Layout {
                            v6: true,
                            l4: at,
                            proto: next,
                            end: (ETH_LEN + 40 + payload).min(len),
                            frag,
                        })
                    }
                }
            }
            None
        }
        _ => None,
    }
}

/// What `f` (the first bytes of a frame of `len` bytes) is.
pub fn classify(f: &[u8], len: usize) -> Kind {
    if be16(f, 12) == Some(ETHERTYPE_ARP) {
        return Kind::Housekeeping;
    }
    let Some(l) = layout(f, len) else {
        return Kind::Unjudgeable;
    };
    let (Some(src), Some(dst)) = (
        addr(f, ETH_LEN + if l.v6 { 8 } else { 12 }, l.v6),
        addr(f, ETH_LEN + if l.v6 { 24 } else { 16 }, l.v6),
    ) else {
        return Kind::Unjudgeable;
    };
    let mut first_fragment = None;
    if let Some((offset, more, id)) = l.frag {
        let key = FragKey { src, dst, id };
        if offset != 0 {
            return Kind::LaterFragment(key);
        }
        if more {
            first_fragment = Some(key);
        }
    }
    let (sport, dport) = match l.proto {
        TCP | UDP => match (be16(f, l.l4), be16(f, l.l4 + 2)) {
            (Some(s), Some(d)) => (s, d),
            _ => return Kind::Unjudgeable,
        },
        ICMP | ICMPV6 => {
            let Some(&ty) = f.get(l.l4) else {
                return Kind::Unjudgeable;
            };
            // Neighbour discovery (133-137) and MLD (130-132, 143).
            if l.proto == ICMPV6 && matches!(ty, 130..=137 | 143) {
                return Kind::Housekeeping;
            }
            let id = be16(f, l.l4 + 4).unwrap_or(0);
            (id, id)
        }
        _ => (0, 0),
    };
    if l.proto == UDP && ((sport, dport) == (68, 67) || (sport, dport) == (546, 547)) {
        return Kind::Housekeeping;
    }
    Kind::Ip {
        flow: Flow {
            src,
            dst,
            proto: l.proto,
            sport,
            dport,
        },
        first_fragment,
    }
}

/// The answer to a refused frame `f` (its first bytes; `len` in all): a
/// RST for TCP (none for a RST), ICMP(v6) "administratively prohibited"
/// for the rest (none for an ICMP error, which gets no error back), from
/// the refused destination to the guest.
pub fn refusal(f: &[u8], len: usize) -> Option<Vec<u8>> {
    let l = layout(f, len)?;
    if l.frag.is_some_and(|(offset, _, _)| offset != 0) {
        return None;
    }
    let ip_at = ETH_LEN;
    let (src_at, dst_at, alen) = if l.v6 { (8, 24, 16) } else { (12, 16, 4) };
    let src = f.get(ip_at + src_at..ip_at + src_at + alen)?;
    let dst = f.get(ip_at + dst_at..ip_at + dst_at + alen)?;
    let (body, proto) = match l.proto {
        TCP => (tcp_rst(f, &l)?, TCP),
        ICMP | ICMPV6 if is_icmp_error(f.get(l.l4).copied()?, l.v6) => return None,
        _ => (icmp_prohibited(f, &l), if l.v6 { ICMPV6 } else { ICMP }),
    };
    // Ethernet: back to the guest's MAC, from the one it sent to.
    let mut out = Vec::with_capacity(ETH_LEN + 40 + body.len());
    out.extend_from_slice(f.get(6..12)?);
    out.extend_from_slice(f.get(0..6)?);
    out.extend_from_slice(&f[12..14]);
    let mut body = body;
    if l.v6 {
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(body.len() as u16).to_be_bytes());
        ip[6] = proto;
        ip[7] = 64;
        ip[8..24].copy_from_slice(dst);
        ip[24..40].copy_from_slice(src);
        let sum = csum::pseudo_v6(
            ip[8..24].try_into().ok()?,
            ip[24..40].try_into().ok()?,
            proto,
            body.len() as u32,
        );
        let c = csum::finish(csum::sum(&body, sum));
        let at = if proto == TCP { 16 } else { 2 };
        body[at..at + 2].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&ip);
    } else {
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + body.len()) as u16).to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(dst);
        ip[16..20].copy_from_slice(src);
        let c = csum::finish(csum::sum(&ip, 0));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        if proto == TCP {
            let sum = csum::pseudo_v4(
                ip[12..16].try_into().ok()?,
                ip[16..20].try_into().ok()?,
                TCP,
                body.len() as u32,
            );
            let c = csum::finish(csum::sum(&body, sum));
            body[16..18].copy_from_slice(&c.to_be_bytes());
        } else {
            let c = csum::finish(csum::sum(&body, 0));
            body[2..4].copy_from_slice(&c.to_be_bytes());
        }
        out.extend_from_slice(&ip);
    }
    out.extend_from_slice(&body);
    Some(out)
}

fn is_icmp_error(ty: u8, v6: bool) -> bool {
    if v6 {
        ty < 128
    } else {
        matches!(ty, 3 | 4 | 5 | 11 | 12)
    }
}

/// A RST as RFC 793 answers a segment that reaches no connection: with
/// ACK set, the RST takes the segment's acknowledgement as its sequence;
/// without, it acknowledges the segment. None for a RST.
fn tcp_rst(f: &[u8], l: &Layout) -> Option<Vec<u8>> {
    let t = l.l4;
    let flags = *f.get(t + 13)?;
    if flags & 0x04 != 0 {
        return None;
    }
    let data_off = usize::from(f.get(t + 12)? >> 4) * 4;
    let payload = l.end.saturating_sub(t + data_off) as u32;
    let seq = be32(f, t + 4)?;
    let ack = be32(f, t + 8)?;
    let mut h = vec![0u8; 20];
    h[0..2].copy_from_slice(&f[t + 2..t + 4]);
    h[2..4].copy_from_slice(&f[t..t + 2]);
    h[12] = 5 << 4;
    if flags & 0x10 != 0 {
        h[4..8].copy_from_slice(&ack.to_be_bytes());
        h[13] = 0x04;
    } else {
        let syn_fin = u32::from(flags & 0x02 != 0) + u32::from(flags & 0x01 != 0);
        let acked = seq.wrapping_add(payload).wrapping_add(syn_fin);
        h[8..12].copy_from_slice(&acked.to_be_bytes());
        h[13] = 0x14;
    }
    Some(h)
}

/// ICMP type 3 code 13 / ICMPv6 type 1 code 1, quoting the packet: its
/// IP header and 8 bytes (IPv4, RFC 792), or as much as the stage read
/// (IPv6, RFC 4443: as much as fits the minimum MTU).
fn icmp_prohibited(f: &[u8], l: &Layout) -> Vec<u8> {
    let quote_end = if l.v6 {
        l.end.min(f.len())
    } else {
        (l.l4 + 8).min(l.end).min(f.len())
    };
    let quote = f.get(ETH_LEN..quote_end).unwrap_or_default();
    let mut b = vec![0u8; 8];
    (b[0], b[1]) = if l.v6 { (1, 1) } else { (3, 13) };
    b.extend_from_slice(quote);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    /// An IPv4 TCP segment from 10.0.0.2:40000 to `dst`:`dport`.
    fn tcp4(dst: [u8; 4], dport: u16, flags: u8, payload: usize) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&GW_MAC);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = (40 + payload) as u16;
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64;
        ip[9] = TCP;
        ip[12..16].copy_from_slice(&[10, 0, 0, 2]);
        ip[16..20].copy_from_slice(&dst);
        f.extend_from_slice(&ip);
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[4..8].copy_from_slice(&1000u32.to_be_bytes());
        t[8..12].copy_from_slice(&7777u32.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        f.extend_from_slice(&t);
        f.extend(std::iter::repeat_n(0xab, payload));
        f
    }

    #[test]
    fn a_tcp_segment_is_its_flow() {
        let f = tcp4([192, 0, 2, 2], 5001, 0x02, 0);
        let Kind::Ip {
            flow,
            first_fragment,
        } = classify(&f, f.len())
        else {
            panic!("not IP")
        };
        assert_eq!(first_fragment, None);
        assert_eq!(flow.dst, IpAddr::from([192, 0, 2, 2]));
        assert_eq!((flow.proto, flow.sport, flow.dport), (TCP, 40000, 5001));
        assert_eq!(flow.reverse().reverse(), flow);
    }

    #[test]
    fn a_syn_gets_a_rst_that_acknowledges_it_with_valid_checksums() {
        let f = tcp4([192, 0, 2, 2], 5001, 0x02, 0);
        let r = refusal(&f, f.len()).unwrap();
        assert_eq!(&r[0..6], &GUEST_MAC);
        assert_eq!(&r[6..12], &GW_MAC);
        let ip = &r[14..34];
        assert_eq!(&ip[12..16], &[192, 0, 2, 2], "from the refused destination");
        assert_eq!(&ip[16..20], &[10, 0, 0, 2]);
        assert_eq!(csum::fold(csum::sum(ip, 0)), 0xffff, "IP checksum");
        let t = &r[34..];
        assert_eq!(t.len(), 20);
        assert_eq!(u16::from_be_bytes([t[0], t[1]]), 5001);
        assert_eq!(u16::from_be_bytes([t[2], t[3]]), 40000);
        assert_eq!(t[13], 0x14, "RST|ACK");
        assert_eq!(u32::from_be_bytes(t[8..12].try_into().unwrap()), 1001);
        let pseudo = csum::pseudo_v4([192, 0, 2, 2], [10, 0, 0, 2], TCP, 20);
        assert_eq!(csum::fold(csum::sum(t, pseudo)), 0xffff, "TCP checksum");
        // With ACK set: seq is its ack, no ACK.
        let r = refusal(&tcp4([192, 0, 2, 2], 5001, 0x18, 100), 154).unwrap();
        assert_eq!(r[34 + 13], 0x04);
        assert_eq!(u32::from_be_bytes(r[38..42].try_into().unwrap()), 7777);
        // A RST gets nothing.
        assert_eq!(refusal(&tcp4([192, 0, 2, 2], 5001, 0x04, 0), 54), None);
    }

    #[test]
    fn an_echo_gets_admin_prohibited_quoting_it() {
        let mut f = tcp4([192, 0, 2, 2], 0, 0, 0);
        f[14 + 9] = ICMP;
        f[34] = 8; // echo request
        f[38..40].copy_from_slice(&0x1234u16.to_be_bytes());
        let Kind::Ip { flow, .. } = classify(&f, f.len()) else {
            panic!()
        };
        assert_eq!((flow.proto, flow.sport, flow.dport), (ICMP, 0x1234, 0x1234));
        let r = refusal(&f, f.len()).unwrap();
        let icmp = &r[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 13));
        assert_eq!(&icmp[8..28], &f[14..34], "the IP header quoted");
        assert_eq!(icmp.len(), 8 + 20 + 8);
        assert_eq!(csum::fold(csum::sum(icmp, 0)), 0xffff);
        // An ICMP error gets no error back.
        f[34] = 3;
        assert_eq!(refusal(&f, f.len()), None);
    }

    #[test]
    fn housekeeping_and_what_cannot_be_judged() {
        let mut arp = tcp4([0; 4], 0, 0, 0);
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        assert_eq!(classify(&arp, arp.len()), Kind::Housekeeping);
        let mut vlan = tcp4([0; 4], 0, 0, 0);
        vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        assert_eq!(classify(&vlan, vlan.len()), Kind::Unjudgeable);
        let mut dhcp = tcp4([255; 4], 67, 0, 0);
        dhcp[14 + 9] = UDP;
        dhcp[34..36].copy_from_slice(&68u16.to_be_bytes());
        assert_eq!(classify(&dhcp, dhcp.len()), Kind::Housekeeping);
        // Cut short, or a bad header length: nothing to judge, no panic.
        let f = tcp4([192, 0, 2, 2], 5001, 0x02, 0);
        for n in 0..f.len() {
            let k = classify(&f[..n], n);
            assert!(
                matches!(k, Kind::Unjudgeable | Kind::Ip { .. }),
                "{n}: {k:?}"
            );
            let _ = refusal(&f[..n], n);
        }
        let mut bad = f.clone();
        bad[14] = 0x41;
        assert_eq!(classify(&bad, bad.len()), Kind::Unjudgeable);
    }

    #[test]
    fn fragments_after_the_first_are_known_by_their_datagram() {
        let mut f = tcp4([192, 0, 2, 2], 5001, 0, 0);
        f[18..20].copy_from_slice(&77u16.to_be_bytes());
        f[20..22].copy_from_slice(&0x2000u16.to_be_bytes()); // MF, offset 0
        let Kind::Ip { first_fragment, .. } = classify(&f, f.len()) else {
            panic!()
        };
        let key = first_fragment.unwrap();
        assert_eq!(key.id, 77);
        f[20..22].copy_from_slice(&0x0003u16.to_be_bytes()); // offset 24
        assert_eq!(classify(&f, f.len()), Kind::LaterFragment(key));
        assert_eq!(refusal(&f, f.len()), None);
    }

    #[test]
    fn ipv6_neighbour_discovery_passes_and_tcp_gets_a_rst() {
        let mut f = Vec::new();
        f.extend_from_slice(&GW_MAC);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        let mut ip = [0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&20u16.to_be_bytes());
        ip[6] = TCP;
        ip[7] = 64;
        ip[8..24].copy_from_slice(&"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
        ip[24..40].copy_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        f.extend_from_slice(&ip);
        let mut t = [0u8; 20];
        t[2..4].copy_from_slice(&443u16.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x02;
        f.extend_from_slice(&t);
        let Kind::Ip { flow, .. } = classify(&f, f.len()) else {
            panic!()
        };
        assert_eq!((flow.proto, flow.dport), (TCP, 443));
        let r = refusal(&f, f.len()).unwrap();
        assert_eq!(r.len(), 14 + 40 + 20);
        let pseudo = csum::pseudo_v6(
            &r[22..38].try_into().unwrap(),
            &r[38..54].try_into().unwrap(),
            TCP,
            20,
        );
        assert_eq!(csum::fold(csum::sum(&r[54..], pseudo)), 0xffff);
        let mut ns = f.clone();
        ns[14 + 6] = ICMPV6;
        ns[54] = 135;
        assert_eq!(classify(&ns, ns.len()), Kind::Housekeeping);
    }
}
