//! The Internet checksum (RFC 1071): a ones-complement sum of 16-bit
//! big-endian words. Sums are carried in a u64 so that whole buffers can be
//! added before folding; ones-complement addition is associative, so the
//! accumulator can be folded to 16 bits at any point.

/// Bytes summed into a plain u64 before folding: 2^20 bytes are 2^18
/// 32-bit words of at most 2^32 - 1 each, far below 2^64.
const BLOCK: usize = 1 << 20;

/// Ones-complement addition of two 64-bit accumulators (end-around carry).
#[inline]
pub fn add(a: u64, b: u64) -> u64 {
    let (s, carry) = a.overflowing_add(b);
    s + u64::from(carry)
}

/// Adds `data`, as big-endian 16-bit words (an odd last byte is padded
/// with a zero byte after it), to `initial`. The result is not folded.
pub fn sum(data: &[u8], initial: u64) -> u64 {
    let mut acc = initial;
    for block in data.chunks(BLOCK) {
        // Summing 32-bit words is the same as summing 16-bit words once
        // folded, since 2^16 == 1 modulo 2^16 - 1, and takes half the adds.
        let mut s: u64 = 0;
        let mut words = block.chunks_exact(4);
        for w in &mut words {
            s += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
        }
        match *words.remainder() {
            [a] => s += u64::from(a) << 8,
            [a, b] => s += u64::from(u16::from_be_bytes([a, b])),
            [a, b, c] => s += u64::from(u16::from_be_bytes([a, b])) + (u64::from(c) << 8),
            _ => {}
        }
        acc = add(acc, s);
    }
    acc
}

/// Folds an accumulator to 16 bits (not complemented).
#[inline]
pub fn fold(acc: u64) -> u16 {
    let mut a = acc;
    // Each round at least halves the width; four rounds reach 16 bits.
    while a > 0xffff {
        a = (a & 0xffff) + (a >> 16);
    }
    a as u16
}

/// The checksum to store in a header: the complement of the folded sum.
#[inline]
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// The IPv4 pseudo header (RFC 793/768): addresses, protocol and the
/// transport length.
pub fn pseudo_v4(src: [u8; 4], dst: [u8; 4], proto: u8, len: u32) -> u64 {
    u64::from(u32::from_be_bytes(src))
        + u64::from(u32::from_be_bytes(dst))
        + u64::from(proto)
        + u64::from(len)
}

/// The IPv6 pseudo header (RFC 8200 8.1): addresses, the 32-bit upper
/// layer length and the next header.
pub fn pseudo_v6(src: &[u8; 16], dst: &[u8; 16], proto: u8, len: u32) -> u64 {
    sum(dst, sum(src, 0)) + u64::from(proto) + u64::from(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: 00 01 f2 03 f4 f5 f6 f7 sums to 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data, 0)), 0xddf2);
        assert_eq!(finish(sum(&data, 0)), !0xddf2);
    }

    #[test]
    fn odd_lengths_pad_with_zero() {
        assert_eq!(fold(sum(&[0xab], 0)), 0xab00);
        assert_eq!(fold(sum(&[0x12, 0x34, 0x56], 0)), 0x1234 + 0x5600);
        assert_eq!(
            fold(sum(&[1, 2, 3, 4, 5, 6, 7], 0)),
            0x0102 + 0x0304 + 0x0506 + 0x0700
        );
        assert_eq!(fold(sum(&[], 0x1234)), 0x1234);
    }

    #[test]
    fn matches_naive_16_bit_sum() {
        let mut x: u32 = 0x1234_5678;
        let data: Vec<u8> = (0..4099)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        for len in [0, 1, 2, 3, 4, 5, 63, 64, 65, 1500, 4098, 4099] {
            let d = &data[..len];
            let mut naive: u32 = 0;
            for c in d.chunks(2) {
                let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
                naive += u32::from(w);
                naive = (naive & 0xffff) + (naive >> 16);
            }
            assert_eq!(u32::from(fold(sum(d, 0))), naive, "len {len}");
        }
    }

    #[test]
    fn fold_and_add_carry() {
        assert_eq!(fold(0), 0);
        assert_eq!(fold(0xffff), 0xffff);
        assert_eq!(fold(0x1_0000), 1);
        assert_eq!(fold(0x1_fffe), 0xffff);
        assert_eq!(fold(u64::MAX), 0xffff);
        assert_eq!(add(u64::MAX, 1), 1);
        assert_eq!(
            fold(sum(&[0xff; 64], u64::MAX - 3)),
            fold(add(u64::MAX - 3, 32 * 0xffff))
        );
    }

    #[test]
    fn ipv4_header_checksum() {
        // A well-known header (Wikipedia's IPv4 checksum example): its
        // checksum is 0xb861, and with it in place the header sums to
        // 0xffff.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(finish(sum(&h, 0)), 0xb861);
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(fold(sum(&h, 0)), 0xffff);
    }

    #[test]
    fn pseudo_headers_match_byte_layout() {
        let (s4, d4) = ([10, 0, 0, 1], [192, 168, 1, 200]);
        let mut ph = Vec::new();
        ph.extend_from_slice(&s4);
        ph.extend_from_slice(&d4);
        ph.extend_from_slice(&[0, 6, 0x05, 0xdc]);
        assert_eq!(fold(pseudo_v4(s4, d4, 6, 1500)), fold(sum(&ph, 0)));

        let s6: [u8; 16] = core::array::from_fn(|i| (i * 17) as u8);
        let d6: [u8; 16] = core::array::from_fn(|i| 0xff - i as u8);
        let mut ph = Vec::new();
        ph.extend_from_slice(&s6);
        ph.extend_from_slice(&d6);
        ph.extend_from_slice(&70000u32.to_be_bytes());
        ph.extend_from_slice(&[0, 0, 0, 17]);
        assert_eq!(fold(pseudo_v6(&s6, &d6, 17, 70000)), fold(sum(&ph, 0)));
    }

    #[test]
    fn udp_ipv4_vector() {
        // 192.168.0.31:20 -> 192.168.0.30:10, payload "Hi". By hand: the
        // pseudo header sums to 0x181a8, the datagram to 0x4891, together
        // 0x1ca39, folded 0xca3a, complemented 0x35c5.
        let (s, d) = ([192, 168, 0, 31], [192, 168, 0, 30]);
        let mut u = [0x00, 0x14, 0x00, 0x0a, 0x00, 0x0a, 0x00, 0x00, b'H', b'i'];
        let c = finish(sum(&u, pseudo_v4(s, d, 17, 10)));
        assert_eq!(c, 0x35c5);
        // The receiver's rule: with the checksum in place, all folds to
        // 0xffff.
        u[6..8].copy_from_slice(&c.to_be_bytes());
        assert_eq!(fold(sum(&u, pseudo_v4(s, d, 17, 10))), 0xffff);
    }
}
