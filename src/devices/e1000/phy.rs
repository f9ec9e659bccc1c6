//! The copper PHY behind MDIC: a Marvell 88E1011 at MDIO address 1, the
//! part the 82540EM pairs with and the one Linux's e1000 looks for
//! (e1000_detect_gig_phy wants M88E1011_I_PHY_ID on an 82540).
//!
//! Nothing here is timed: MDIC accesses, resets and auto-negotiation
//! complete at once, and the link is whatever the host side says.

use super::regs::{
    MDIC_DATA_MASK, MDIC_ERROR, MDIC_OP_READ, MDIC_OP_WRITE, MDIC_PHY_SHIFT, MDIC_READY,
    MDIC_REG_SHIFT,
};

/// The only MDIO address that answers.
pub const PHY_ADDR: u32 = 1;

const CTRL: usize = 0;
const STATUS: usize = 1;
const ID1: usize = 2;
const ID2: usize = 3;
const AUTONEG_ADV: usize = 4;
const LP_ABILITY: usize = 5;
const AUTONEG_EXP: usize = 6;
const GBT_CTRL: usize = 9;
const GBT_STATUS: usize = 10;
const EXT_STATUS: usize = 15;
const M88_PSCR: usize = 16;
const M88_PSSR: usize = 17;
const M88_INT_STATUS: usize = 19;
const M88_EPSCR: usize = 20;
const M88_RX_ERR: usize = 21;

/// PHY_CTRL bits that clear themselves once their action is done.
const CTRL_RESET: u16 = 0x8000;
const CTRL_RESTART_AN: u16 = 0x0200;

/// 10/100 half/full abilities, extended status, preamble suppression,
/// autoneg ability, extended registers; plus autoneg complete (0x20) and
/// link (0x04) when up.
const STATUS_DOWN: u16 = 0x7949;
const STATUS_UP: u16 = STATUS_DOWN | 0x0020 | 0x0004;
/// The link partner: acknowledge, PAUSE, 10/100 half/full, 802.3.
const LP_ABILITY_UP: u16 = 0x45e1;
/// The link partner is autoneg capable.
const AUTONEG_EXP_UP: u16 = 0x0001;
/// Local and remote receivers OK, partner does 1000BASE-T full/half.
const GBT_STATUS_UP: u16 = 0x3c00;
/// M88 specific status: 1000 Mb/s (15:14 = 10b), full duplex (13),
/// speed/duplex resolved (11), real-time link (10).
const PSSR_UP: u16 = 0xac00;

/// Registers that only the PHY changes: status, ids, what the partner
/// advertised, counters. Guest writes to them are dropped.
const READ_ONLY: u32 = 1 << STATUS
    | 1 << ID1
    | 1 << ID2
    | 1 << LP_ABILITY
    | 1 << AUTONEG_EXP
    | 1 << GBT_STATUS
    | 1 << EXT_STATUS
    | 1 << M88_PSSR
    | 1 << M88_INT_STATUS
    | 1 << M88_RX_ERR;

pub struct Phy {
    regs: [u16; 32],
    link: bool,
}

impl Default for Phy {
    fn default() -> Self {
        Self::new()
    }
}

impl Phy {
    /// A PHY after power-on, with the link up.
    pub fn new() -> Self {
        let mut phy = Phy {
            regs: [0; 32],
            link: true,
        };
        phy.reset();
        phy
    }

    /// Back to power-on register values (CTRL.PHY_RST); the link stays
    /// whatever the host side last said.
    pub fn reset(&mut self) {
        let mut r = [0u16; 32];
        // Autoneg enabled, full duplex, 1000 Mb/s.
        r[CTRL] = 0x1140;
        // Marvell's OUI and the 88E1011 model, revision 0; Linux masks
        // the revision (low 4 bits) before comparing.
        r[ID1] = 0x0141;
        r[ID2] = 0x0c20;
        // Advertise 10/100 half/full, PAUSE and ASM_DIR.
        r[AUTONEG_ADV] = 0x0de1;
        // Advertise 1000BASE-T full duplex, multi-port, manual master.
        r[GBT_CTRL] = 0x0e00;
        // 1000BASE-T full and half capable.
        r[EXT_STATUS] = 0x3000;
        // Auto MDI/MDI-X and the M88's reset defaults.
        r[M88_PSCR] = 0x0360;
        r[M88_EPSCR] = 0x0d60;
        self.regs = r;
        self.refresh();
    }

    /// A guest write of MDIC; returns what MDIC reads back afterwards.
    pub fn mdic_write(&mut self, value: u32) -> u32 {
        let reg = ((value >> MDIC_REG_SHIFT) & 0x1f) as usize;
        let addr = (value >> MDIC_PHY_SHIFT) & 0x1f;
        let op = value & (3 << 26);
        // The command fields (and the I bit, 29) read back as written.
        let mut out = (value & !(MDIC_READY | MDIC_ERROR | 1 << 31)) | MDIC_READY;
        if addr != PHY_ADDR || (op != MDIC_OP_READ && op != MDIC_OP_WRITE) {
            // No PHY drives the bus there: data floats high.
            if op == MDIC_OP_READ {
                out |= MDIC_DATA_MASK;
            }
            return out | MDIC_ERROR;
        }
        if op == MDIC_OP_READ {
            out = (out & !MDIC_DATA_MASK) | u32::from(self.regs[reg]);
        } else {
            self.write(reg, (value & MDIC_DATA_MASK) as u16);
        }
        out
    }

    /// `reg` is below 32 (MDIC's field is 5 bits).
    fn write(&mut self, reg: usize, data: u16) {
        if READ_ONLY & (1 << reg) != 0 {
            return;
        }
        self.regs[reg] = if reg == CTRL {
            // Software reset keeps the registers (the M88 only applies
            // pending settings), and autoneg finishes at once; both bits
            // are done by the time the driver polls.
            data & !(CTRL_RESET | CTRL_RESTART_AN)
        } else {
            data
        };
    }

    /// Follow the host side's link.
    pub fn set_link(&mut self, up: bool) {
        self.link = up;
        self.refresh();
    }

    pub fn link_up(&self) -> bool {
        self.link
    }

    /// Recompute the status registers from the link state; without a
    /// link there is no partner and nothing resolved.
    fn refresh(&mut self) {
        let up = self.link;
        let pick = |v: u16| if up { v } else { 0 };
        self.regs[STATUS] = if up { STATUS_UP } else { STATUS_DOWN };
        self.regs[LP_ABILITY] = pick(LP_ABILITY_UP);
        self.regs[AUTONEG_EXP] = pick(AUTONEG_EXP_UP);
        self.regs[GBT_STATUS] = pick(GBT_STATUS_UP);
        self.regs[M88_PSSR] = pick(PSSR_UP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(addr: u32, reg: u32, op: u32, data: u16) -> u32 {
        (reg << MDIC_REG_SHIFT) | (addr << MDIC_PHY_SHIFT) | op | u32::from(data)
    }

    /// As Linux's e1000_read_phy_reg_ex: write the command, then trust
    /// READY and ERROR.
    fn read(phy: &mut Phy, addr: u32, reg: u32) -> Result<u16, ()> {
        let m = phy.mdic_write(cmd(addr, reg, MDIC_OP_READ, 0));
        assert_ne!(m & MDIC_READY, 0);
        if m & MDIC_ERROR != 0 {
            return Err(());
        }
        Ok(m as u16)
    }

    fn write(phy: &mut Phy, addr: u32, reg: u32, data: u16) -> Result<(), ()> {
        let m = phy.mdic_write(cmd(addr, reg, MDIC_OP_WRITE, data));
        assert_ne!(m & MDIC_READY, 0);
        if m & MDIC_ERROR != 0 {
            return Err(());
        }
        Ok(())
    }

    #[test]
    fn ids_match_linux_m88e1011() {
        let mut p = Phy::new();
        let hi = read(&mut p, 1, 2).unwrap();
        let lo = read(&mut p, 1, 3).unwrap();
        // e1000_detect_gig_phy: id high << 16 | low & PHY_REVISION_MASK.
        let id = (u32::from(hi) << 16) | (u32::from(lo) & 0xffff_fff0);
        assert_eq!(id, 0x0141_0c20);
    }

    #[test]
    fn status_follows_link() {
        let mut p = Phy::new();
        assert!(p.link_up());
        assert_eq!(read(&mut p, 1, 1), Ok(0x796d));
        assert_eq!(read(&mut p, 1, 17), Ok(0xac00));
        assert_eq!(read(&mut p, 1, 10), Ok(0x3c00));
        p.set_link(false);
        assert!(!p.link_up());
        assert_eq!(read(&mut p, 1, 1), Ok(0x7949));
        let pssr = read(&mut p, 1, 17).unwrap();
        assert_eq!(pssr & (1 << 10), 0, "PSSR link");
        assert_eq!(pssr & (1 << 11), 0, "PSSR resolved");
        assert_eq!(read(&mut p, 1, 5), Ok(0));
        p.set_link(true);
        assert_eq!(read(&mut p, 1, 1), Ok(0x796d));
        assert_eq!(read(&mut p, 1, 5), Ok(0x45e1));
    }

    #[test]
    fn defaults() {
        let mut p = Phy::new();
        for (reg, v) in [
            (0, 0x1140),
            (4, 0x0de1),
            (9, 0x0e00),
            (15, 0x3000),
            (16, 0x0360),
            (20, 0x0d60),
        ] {
            assert_eq!(read(&mut p, 1, reg), Ok(v), "reg {reg}");
        }
    }

    #[test]
    fn writable_round_trip() {
        let mut p = Phy::new();
        for reg in [4, 7, 9, 16, 20, 31] {
            write(&mut p, 1, reg, 0x1234).unwrap();
            assert_eq!(read(&mut p, 1, reg), Ok(0x1234), "reg {reg}");
        }
        // Power down and back up, as e1000_power_down_phy does.
        write(&mut p, 1, 0, 0x1140 | 0x0800).unwrap();
        assert_eq!(read(&mut p, 1, 0), Ok(0x1940));
        write(&mut p, 1, 0, 0x1140).unwrap();
        assert_eq!(read(&mut p, 1, 0), Ok(0x1140));
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut p = Phy::new();
        for reg in [1, 2, 3, 5, 6, 10, 15, 17, 19, 21] {
            let before = read(&mut p, 1, reg).unwrap();
            write(&mut p, 1, reg, !before).unwrap();
            assert_eq!(read(&mut p, 1, reg), Ok(before), "reg {reg}");
        }
    }

    #[test]
    fn wrong_address_is_an_error() {
        let mut p = Phy::new();
        for addr in [0, 2, 31] {
            assert_eq!(read(&mut p, addr, 2), Err(()));
            assert_eq!(write(&mut p, addr, 4, 0), Err(()));
        }
        assert_eq!(read(&mut p, 1, 4), Ok(0x0de1), "write went elsewhere");
        // Reserved opcodes are errors too.
        let m = p.mdic_write(cmd(1, 2, 0, 0));
        assert_ne!(m & MDIC_ERROR, 0);
        let m = p.mdic_write(cmd(1, 2, 3 << 26, 0));
        assert_ne!(m & MDIC_ERROR, 0);
    }

    #[test]
    fn readback_keeps_command_fields() {
        let mut p = Phy::new();
        let c = cmd(1, 4, MDIC_OP_WRITE, 0x01e1);
        assert_eq!(p.mdic_write(c), c | MDIC_READY);
        let c = cmd(1, 4, MDIC_OP_READ, 0xffff);
        assert_eq!(p.mdic_write(c), (c & !0xffff) | MDIC_READY | 0x01e1);
        // Stale READY/ERROR in a write do not leak into the result.
        let m = p.mdic_write(cmd(1, 2, MDIC_OP_READ, 0) | MDIC_ERROR | MDIC_READY);
        assert_eq!(m & MDIC_ERROR, 0);
    }

    #[test]
    fn reset_and_restart_self_clear() {
        let mut p = Phy::new();
        write(&mut p, 1, 0, 0x1140 | 0x8000).unwrap();
        assert_eq!(read(&mut p, 1, 0), Ok(0x1140));
        write(&mut p, 1, 0, 0x1140 | 0x0200).unwrap();
        assert_eq!(read(&mut p, 1, 0), Ok(0x1140));
        // Autoneg is complete as soon as the driver looks.
        assert_ne!(read(&mut p, 1, 1).unwrap() & 0x20, 0);
    }

    #[test]
    fn hardware_reset_restores_defaults_keeps_link() {
        let mut p = Phy::new();
        write(&mut p, 1, 16, 0).unwrap();
        p.set_link(false);
        p.reset();
        assert_eq!(read(&mut p, 1, 16), Ok(0x0360));
        assert!(!p.link_up());
        assert_eq!(read(&mut p, 1, 1), Ok(0x7949));
    }

    #[test]
    fn random_mdic_never_panics() {
        let mut p = Phy::new();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..100_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let m = p.mdic_write((seed >> 8) as u32);
            assert_ne!(m & MDIC_READY, 0);
        }
        assert_eq!(read(&mut p, 1, 2), Ok(0x0141));
        assert_eq!(read(&mut p, 1, 3), Ok(0x0c20));
        assert_eq!(read(&mut p, 1, 1), Ok(0x796d));
    }
}
