//! The 82540EM's 64-word Microwire EEPROM (a 93C46 in x16 mode), read by
//! bit-banging EECD or, more simply, through EERD.
//!
//! Linux's e1000 driver reads it over EECD only (the 82540 is not one of
//! its EERD parts): raise REQ and wait for GNT, raise CS, clock out the
//! start bit, READ opcode and 6 address bits on DI, then clock in 16 data
//! bits from DO, sampling DO just after each rising edge of SK.

use super::regs::{
    EECD_CS, EECD_DI, EECD_DO, EECD_GNT, EECD_PRES, EECD_REQ, EECD_SK, EERD_ADDR_SHIFT,
    EERD_DATA_SHIFT, EERD_DONE, EERD_START,
};

/// Words in the part; with EECD.SIZE (bit 9) clear Linux expects 64 of
/// them and 6 address bits.
pub const WORDS: usize = 64;
const ADDR_BITS: u32 = 6;
/// The word that makes words 0x00..=0x3f sum to [`CHECKSUM_SUM`].
const CHECKSUM_WORD: usize = 0x3f;
/// What Linux's e1000_validate_eeprom_checksum wants the sum to be.
pub const CHECKSUM_SUM: u16 = 0xbaba;
/// Microwire READ opcode (after the start bit).
const OP_READ: u16 = 0b10;

/// EECD bits the guest may set; the rest read back as the device decides.
const EECD_WRITABLE: u32 = EECD_SK | EECD_CS | EECD_DI | EECD_REQ;

/// Where the Microwire state machine is in a transfer (CS high).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the start bit: leading zeros on DI are ignored.
    Idle,
    /// Clocking in opcode (2 bits) and address (6 bits).
    Command { bits: u16, count: u32 },
    /// Shifting out `addr`; `bit` data bits of it already shown on DO.
    Reading { addr: usize, bit: u32 },
    /// Write/erase/EWEN/EWDS: swallowed until CS drops.
    Ignore,
}

pub struct Eeprom {
    words: [u16; WORDS],
    /// The pins (SK, CS, DI) and REQ as the guest last wrote them.
    eecd: u32,
    phase: Phase,
    /// The DO pin.
    dout: bool,
    eerd: u32,
}

impl Eeprom {
    /// Contents for MAC `mac`, laid out as in the 8254x manual's EEPROM
    /// map; only the words Linux reads on an 82540 matter much.
    pub fn new(mac: [u8; 6]) -> Self {
        // Unprogrammed cells read all ones, and drivers treat 0xffff in
        // optional words (ID LED settings, boot agent) as "absent".
        let mut w = [0xffff_u16; WORDS];
        w[0x00] = u16::from_le_bytes([mac[0], mac[1]]);
        w[0x01] = u16::from_le_bytes([mac[2], mac[3]]);
        w[0x02] = u16::from_le_bytes([mac[4], mac[5]]);
        // Compatibility: a plain add-in NIC, no special handling.
        w[0x03] = 0x0000;
        // 0x04 ID LED settings stay 0xffff: Linux then uses its defaults.
        // EEPROM image version and two OEM words.
        w[0x05] = 0x0100;
        w[0x06] = 0x0000;
        w[0x07] = 0x0000;
        // PBA number, printed by Linux as "c91016-000" (arbitrary).
        w[0x08] = 0xc910;
        w[0x09] = 0x1600;
        // Initialization control 1: signature 01b (bits 15:14) marks the
        // image valid, full duplex (bit 10), load the PCI ids below
        // (bits 1:0).
        w[0x0a] = 0x4403;
        // Subsystem id / subsystem vendor, device id, vendor: the same
        // ids the PCI function shows (PRO/1000 MT Desktop).
        w[0x0b] = 0x001e;
        w[0x0c] = 0x8086;
        w[0x0d] = 0x100e;
        w[0x0e] = 0x8086;
        // Initialization control 2: PAUSE and ASM_DIR (bits 13:12), so
        // Linux picks full flow control by default.
        w[0x0f] = 0x3000;
        // 0x10..=0x23: pin, circuit and power settings, unused by the
        // emulation; zero rather than "unprogrammed".
        for x in &mut w[0x10..=0x23] {
            *x = 0;
        }
        // Initialization control 3 (port A): APM wake-up off (bit 10),
        // since nothing here can wake a guest.
        w[0x24] = 0x0000;
        // 0x25..=0x3e (boot agent and the like) stay unprogrammed.
        let sum = w[..CHECKSUM_WORD]
            .iter()
            .fold(0u16, |s, &x| s.wrapping_add(x));
        w[CHECKSUM_WORD] = CHECKSUM_SUM.wrapping_sub(sum);
        Eeprom {
            words: w,
            eecd: 0,
            phase: Phase::Idle,
            dout: true,
            eerd: 0,
        }
    }

    /// Word `i`, or 0 past the end.
    pub fn word(&self, i: usize) -> u16 {
        self.words.get(i).copied().unwrap_or(0)
    }

    /// EECD as the guest reads it: the part is always present and the
    /// grant is immediate (there is no firmware to share it with).
    pub fn read_eecd(&self) -> u32 {
        let mut v = self.eecd | EECD_PRES;
        if v & EECD_REQ != 0 {
            v |= EECD_GNT;
        }
        if self.dout {
            v |= EECD_DO;
        }
        v
    }

    /// EECD write: the guest drives SK, CS and DI; DO, GNT and PRES are
    /// ours (drivers write back what they read, so those are ignored).
    pub fn write_eecd(&mut self, value: u32) {
        let old = self.eecd;
        self.eecd = value & EECD_WRITABLE;
        if value & EECD_CS == 0 {
            // Deselected: abort any transfer. DO floats high, which a
            // driver polling after a write takes as "ready".
            self.phase = Phase::Idle;
            self.dout = true;
            return;
        }
        if old & EECD_SK == 0 && value & EECD_SK != 0 {
            self.clock(value & EECD_DI != 0);
        }
    }

    /// One rising edge of SK with CS high: sample DI, update DO.
    fn clock(&mut self, di: bool) {
        self.phase = match self.phase {
            Phase::Idle if di => Phase::Command { bits: 0, count: 0 },
            Phase::Idle => Phase::Idle,
            Phase::Command { bits, count } => {
                let bits = (bits << 1) | u16::from(di);
                let count = count + 1;
                if count < 2 + ADDR_BITS {
                    Phase::Command { bits, count }
                } else if bits >> ADDR_BITS == OP_READ {
                    // The dummy 0 real parts show after the last address
                    // bit; the driver clocks past it unsampled.
                    self.dout = false;
                    let addr = usize::from(bits) & (WORDS - 1);
                    Phase::Reading { addr, bit: 0 }
                } else {
                    Phase::Ignore
                }
            }
            Phase::Reading { addr, bit } => {
                self.dout = (self.word(addr) >> (15 - bit)) & 1 != 0;
                if bit + 1 < 16 {
                    Phase::Reading { addr, bit: bit + 1 }
                } else {
                    // Sequential read: keep clocking to get the next word.
                    Phase::Reading {
                        addr: (addr + 1) % WORDS,
                        bit: 0,
                    }
                }
            }
            Phase::Ignore => Phase::Ignore,
        };
    }

    /// EERD write: with START the read completes at once.
    pub fn write_eerd(&mut self, value: u32) {
        let addr_field = value & (0xff << EERD_ADDR_SHIFT);
        self.eerd = if value & EERD_START != 0 {
            let addr = (addr_field >> EERD_ADDR_SHIFT) as usize;
            // START self-clears; DONE and the data stay until the next
            // write.
            addr_field | EERD_DONE | (u32::from(self.word(addr)) << EERD_DATA_SHIFT)
        } else {
            addr_field
        };
    }

    pub fn read_eerd(&self) -> u32 {
        self.eerd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MACS: [[u8; 6]; 4] = [
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        [0; 6],
        [0xff; 6],
        [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01],
    ];

    fn sum(e: &Eeprom) -> u16 {
        (0..WORDS).fold(0u16, |s, i| s.wrapping_add(e.word(i)))
    }

    /// Reads `count` words from `offset` exactly as Linux's e1000 does on
    /// an 82540 (e1000_acquire_eeprom, e1000_shift_out_ee_bits,
    /// e1000_shift_in_ee_bits, e1000_standby_eeprom,
    /// e1000_release_eeprom): every write starts from what EECD read.
    fn linux_read(e: &mut Eeprom, offset: u16, count: usize) -> Vec<u16> {
        // Acquire: request, wait for the grant, then select the part.
        let mut eecd = e.read_eecd() | EECD_REQ;
        e.write_eecd(eecd);
        eecd = e.read_eecd();
        assert_ne!(eecd & EECD_GNT, 0, "no grant");
        eecd &= !(EECD_DI | EECD_SK);
        e.write_eecd(eecd);
        eecd |= EECD_CS;
        e.write_eecd(eecd);

        let mut out = Vec::new();
        for i in 0..count {
            shift_out(e, 0b110, 3);
            shift_out(e, offset + i as u16, 6);
            out.push(shift_in(e));
            // Standby: deselect, clock high, select, clock low.
            let mut eecd = e.read_eecd();
            eecd &= !(EECD_CS | EECD_SK);
            e.write_eecd(eecd);
            eecd |= EECD_SK;
            e.write_eecd(eecd);
            eecd |= EECD_CS;
            e.write_eecd(eecd);
            eecd &= !EECD_SK;
            e.write_eecd(eecd);
        }

        // Release: deselect with one more clock, drop the request.
        let mut eecd = e.read_eecd();
        eecd &= !(EECD_CS | EECD_DI);
        e.write_eecd(eecd);
        eecd |= EECD_SK;
        e.write_eecd(eecd);
        eecd &= !EECD_SK;
        e.write_eecd(eecd);
        eecd &= !EECD_REQ;
        e.write_eecd(eecd);
        assert_eq!(e.read_eecd() & EECD_GNT, 0);
        out
    }

    fn shift_out(e: &mut Eeprom, data: u16, count: u32) {
        let mut eecd = e.read_eecd() & !EECD_DO;
        let mut mask = 1u16 << (count - 1);
        while mask != 0 {
            eecd &= !EECD_DI;
            if data & mask != 0 {
                eecd |= EECD_DI;
            }
            e.write_eecd(eecd);
            eecd |= EECD_SK;
            e.write_eecd(eecd);
            eecd &= !EECD_SK;
            e.write_eecd(eecd);
            mask >>= 1;
        }
        eecd &= !EECD_DI;
        e.write_eecd(eecd);
    }

    fn shift_in(e: &mut Eeprom) -> u16 {
        let mut eecd = e.read_eecd() & !(EECD_DO | EECD_DI);
        let mut data = 0u16;
        for _ in 0..16 {
            data <<= 1;
            eecd |= EECD_SK;
            e.write_eecd(eecd);
            eecd = e.read_eecd() & !EECD_DI;
            if eecd & EECD_DO != 0 {
                data |= 1;
            }
            eecd &= !EECD_SK;
            e.write_eecd(eecd);
        }
        data
    }

    /// A tiny xorshift so the fuzz tests need no crates.
    fn rng(seed: &mut u64) -> u32 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed >> 16) as u32
    }

    #[test]
    fn checksum_sums_to_baba() {
        for mac in MACS {
            assert_eq!(sum(&Eeprom::new(mac)), CHECKSUM_SUM, "{mac:02x?}");
        }
    }

    #[test]
    fn mac_words() {
        let e = Eeprom::new([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        assert_eq!(e.word(0), 0x5452);
        assert_eq!(e.word(1), 0x1200);
        assert_eq!(e.word(2), 0x5634);
    }

    #[test]
    fn ids_and_out_of_range() {
        let e = Eeprom::new(MACS[0]);
        assert_eq!(e.word(0x0d), 0x100e);
        assert_eq!(e.word(0x0e), 0x8086);
        assert_eq!(e.word(0x0b), 0x001e);
        assert_eq!(e.word(0x0c), 0x8086);
        assert_eq!(e.word(64), 0);
        assert_eq!(e.word(usize::MAX), 0);
    }

    #[test]
    fn eecd_static_bits() {
        let mut e = Eeprom::new(MACS[0]);
        let v = e.read_eecd();
        assert_ne!(v & EECD_PRES, 0);
        assert_eq!(v & EECD_GNT, 0);
        // SIZE (bit 9) must read 0: Linux then assumes 64 words.
        assert_eq!(v & (1 << 9), 0);
        e.write_eecd(EECD_REQ | EECD_SK | EECD_DI);
        let v = e.read_eecd();
        assert_eq!(
            v & (EECD_REQ | EECD_GNT | EECD_SK | EECD_DI | EECD_CS),
            EECD_REQ | EECD_GNT | EECD_SK | EECD_DI
        );
        // Read-only bits written by the guest do not stick.
        e.write_eecd(!0);
        e.write_eecd(0);
        assert_eq!(e.read_eecd() & !EECD_DO, EECD_PRES);
    }

    #[test]
    fn microwire_reads_every_word() {
        for mac in MACS {
            let mut e = Eeprom::new(mac);
            for i in 0..WORDS {
                assert_eq!(linux_read(&mut e, i as u16, 1), [e.word(i)], "word {i}");
            }
            // Several words under one acquire, as e1000_read_eeprom does.
            let all = linux_read(&mut e, 0, WORDS);
            let expect: Vec<u16> = (0..WORDS).map(|i| e.word(i)).collect();
            assert_eq!(all, expect);
        }
    }

    #[test]
    fn microwire_dummy_bit_then_sequential_read() {
        let mut e = Eeprom::new(MACS[0]);
        e.write_eecd(EECD_REQ | EECD_CS);
        shift_out(&mut e, 0b110, 3);
        shift_out(&mut e, 0x3f, 6);
        assert_eq!(e.read_eecd() & EECD_DO, 0, "dummy bit");
        assert_eq!(shift_in(&mut e), e.word(0x3f));
        // Keep clocking: the address wraps to word 0.
        assert_eq!(shift_in(&mut e), e.word(0));
        assert_eq!(shift_in(&mut e), e.word(1));
    }

    #[test]
    fn other_opcodes_are_ignored() {
        let mut e = Eeprom::new(MACS[0]);
        let before = e.words;
        e.write_eecd(EECD_REQ | EECD_CS);
        // EWEN (1 00 11xxxx), then WRITE (1 01 addr) with data.
        shift_out(&mut e, 0b100, 3);
        shift_out(&mut e, 0x30, 6);
        e.write_eecd(EECD_REQ);
        e.write_eecd(EECD_REQ | EECD_CS);
        shift_out(&mut e, 0b101, 3);
        shift_out(&mut e, 0x01, 6);
        shift_out(&mut e, 0xdead, 16);
        e.write_eecd(EECD_REQ);
        e.write_eecd(EECD_REQ | EECD_CS);
        // Ready as soon as the guest polls DO.
        assert_ne!(e.read_eecd() & EECD_DO, 0);
        e.write_eecd(0);
        assert_eq!(e.words, before);
        assert_eq!(linux_read(&mut e, 1, 1), [before[1]]);
    }

    #[test]
    fn eerd_reads() {
        let mut e = Eeprom::new(MACS[3]);
        assert_eq!(e.read_eerd() & EERD_DONE, 0);
        for i in 0..WORDS as u32 {
            e.write_eerd(EERD_START | (i << EERD_ADDR_SHIFT));
            let v = e.read_eerd();
            assert_ne!(v & EERD_DONE, 0);
            assert_eq!(v & EERD_START, 0);
            assert_eq!((v >> EERD_ADDR_SHIFT) & 0xff, i);
            assert_eq!((v >> EERD_DATA_SHIFT) as u16, e.word(i as usize));
        }
        e.write_eerd(EERD_START | (200 << EERD_ADDR_SHIFT));
        let v = e.read_eerd();
        assert_ne!(v & EERD_DONE, 0);
        assert_eq!(v >> EERD_DATA_SHIFT, 0);
        // Without START nothing is read and DONE clears.
        e.write_eerd(5 << EERD_ADDR_SHIFT);
        assert_eq!(e.read_eerd(), 5 << EERD_ADDR_SHIFT);
        e.write_eerd(!0);
        assert_ne!(e.read_eerd() & EERD_DONE, 0);
        assert_eq!(e.read_eerd() >> EERD_DATA_SHIFT, 0);
    }

    #[test]
    fn garbage_eecd_never_breaks_a_later_read() {
        let mut e = Eeprom::new(MACS[0]);
        let mut seed = 0x1234_5678_9abc_def0;
        for round in 0..200 {
            for _ in 0..(rng(&mut seed) % 200) {
                let v = rng(&mut seed);
                // Mostly keep CS high so the state machine goes deep.
                let v = if round % 2 == 0 { v | EECD_CS } else { v };
                e.write_eecd(v);
                let _ = e.read_eecd();
                e.write_eerd(rng(&mut seed));
                let _ = e.read_eerd();
            }
            // Linux's acquire does not drop CS, so a part left selected
            // mid-transfer is recovered, as on real hardware, only by
            // deselecting it (a release, or a device reset).
            e.write_eecd(0);
            let addr = (rng(&mut seed) % WORDS as u32) as u16;
            assert_eq!(linux_read(&mut e, addr, 2)[0], e.word(addr as usize));
        }
        assert_eq!(sum(&e), CHECKSUM_SUM);
    }
}
