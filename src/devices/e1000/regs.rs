//! Register offsets and bits of the 82540EM that Linux's e1000 driver
//! uses (Intel's "PCI/PCI-X Family of Gigabit Ethernet Controllers
//! Software Developer's Manual", section 13).

pub const CTRL: u32 = 0x0000;
pub const STATUS: u32 = 0x0008;
pub const EECD: u32 = 0x0010;
pub const EERD: u32 = 0x0014;
pub const CTRL_EXT: u32 = 0x0018;
pub const MDIC: u32 = 0x0020;
pub const FCAL: u32 = 0x0028;
pub const FCAH: u32 = 0x002c;
pub const FCT: u32 = 0x0030;
pub const VET: u32 = 0x0038;
pub const ICR: u32 = 0x00c0;
pub const ITR: u32 = 0x00c4;
pub const ICS: u32 = 0x00c8;
pub const IMS: u32 = 0x00d0;
pub const IMC: u32 = 0x00d8;
pub const RCTL: u32 = 0x0100;
pub const FCTTV: u32 = 0x0170;
pub const TXCW: u32 = 0x0178;
pub const RXCW: u32 = 0x0180;
pub const TCTL: u32 = 0x0400;
pub const TIPG: u32 = 0x0410;
pub const LEDCTL: u32 = 0x0e00;
pub const PBA: u32 = 0x1000;
pub const FCRTL: u32 = 0x2160;
pub const FCRTH: u32 = 0x2168;
pub const RDBAL: u32 = 0x2800;
pub const RDBAH: u32 = 0x2804;
pub const RDLEN: u32 = 0x2808;
pub const RDH: u32 = 0x2810;
pub const RDT: u32 = 0x2818;
pub const RDTR: u32 = 0x2820;
pub const RADV: u32 = 0x282c;
pub const RSRPD: u32 = 0x2c00;
pub const TDBAL: u32 = 0x3800;
pub const TDBAH: u32 = 0x3804;
pub const TDLEN: u32 = 0x3808;
pub const TDH: u32 = 0x3810;
pub const TDT: u32 = 0x3818;
pub const TIDV: u32 = 0x3820;
pub const TXDCTL: u32 = 0x3828;
pub const TADV: u32 = 0x382c;
/// Statistics: 0x4000..0x4100, every one cleared by a read.
pub const STATS_START: u32 = 0x4000;
pub const STATS_END: u32 = 0x4100;
pub const RXCSUM: u32 = 0x5000;
/// Multicast table array: 128 registers, a bit per hash value.
pub const MTA: u32 = 0x5200;
pub const MTA_LEN: u32 = 128;
/// Receive addresses: 16 pairs of RAL/RAH.
pub const RA: u32 = 0x5400;
pub const RA_PAIRS: u32 = 16;
pub const VFTA: u32 = 0x5600;
pub const WUC: u32 = 0x5800;
pub const WUFC: u32 = 0x5808;
pub const MANC: u32 = 0x5820;

// Statistics the device counts (all others read 0).
pub const STAT_MPC: u32 = 0x4010;
pub const STAT_GPRC: u32 = 0x4074;
pub const STAT_BPRC: u32 = 0x4078;
pub const STAT_MPRC: u32 = 0x407c;
pub const STAT_GPTC: u32 = 0x4080;
pub const STAT_GORCL: u32 = 0x4088;
pub const STAT_GORCH: u32 = 0x408c;
pub const STAT_GOTCL: u32 = 0x4090;
pub const STAT_GOTCH: u32 = 0x4094;
pub const STAT_RNBC: u32 = 0x40a0;
pub const STAT_ROC: u32 = 0x40ac;
pub const STAT_TORL: u32 = 0x40c0;
pub const STAT_TORH: u32 = 0x40c4;
pub const STAT_TOTL: u32 = 0x40c8;
pub const STAT_TOTH: u32 = 0x40cc;
pub const STAT_TPR: u32 = 0x40d0;
pub const STAT_TPT: u32 = 0x40d4;

pub const CTRL_SLU: u32 = 1 << 6;
pub const CTRL_RST: u32 = 1 << 26;
pub const CTRL_PHY_RST: u32 = 1 << 31;

pub const STATUS_FD: u32 = 1 << 0;
pub const STATUS_LU: u32 = 1 << 1;
pub const STATUS_SPEED_1000: u32 = 2 << 6;
pub const STATUS_ASDV_1000: u32 = 2 << 8;

/// Interrupt causes (ICR, ICS, IMS, IMC).
pub const ICR_TXDW: u32 = 1 << 0;
pub const ICR_TXQE: u32 = 1 << 1;
pub const ICR_LSC: u32 = 1 << 2;
pub const ICR_RXDMT0: u32 = 1 << 4;
pub const ICR_RXO: u32 = 1 << 6;
pub const ICR_RXT0: u32 = 1 << 7;
pub const ICR_INT_ASSERTED: u32 = 1 << 31;

pub const RCTL_EN: u32 = 1 << 1;
pub const RCTL_SBP: u32 = 1 << 2;
pub const RCTL_UPE: u32 = 1 << 3;
pub const RCTL_MPE: u32 = 1 << 4;
pub const RCTL_LPE: u32 = 1 << 5;
pub const RCTL_MO_SHIFT: u32 = 12;
pub const RCTL_BAM: u32 = 1 << 15;
pub const RCTL_BSIZE_SHIFT: u32 = 16;
pub const RCTL_BSEX: u32 = 1 << 25;
pub const RCTL_SECRC: u32 = 1 << 26;

pub const TCTL_EN: u32 = 1 << 1;

pub const RAH_AV: u32 = 1 << 31;

/// EERD: start, done, word address and data (82540 layout).
pub const EERD_START: u32 = 1 << 0;
pub const EERD_DONE: u32 = 1 << 4;
pub const EERD_ADDR_SHIFT: u32 = 8;
pub const EERD_DATA_SHIFT: u32 = 16;

/// EECD: the Microwire pins and the software access handshake.
pub const EECD_SK: u32 = 1 << 0;
pub const EECD_CS: u32 = 1 << 1;
pub const EECD_DI: u32 = 1 << 2;
pub const EECD_DO: u32 = 1 << 3;
pub const EECD_REQ: u32 = 1 << 6;
pub const EECD_GNT: u32 = 1 << 7;
pub const EECD_PRES: u32 = 1 << 8;

/// MDIC: PHY register access.
pub const MDIC_DATA_MASK: u32 = 0xffff;
pub const MDIC_REG_SHIFT: u32 = 16;
pub const MDIC_PHY_SHIFT: u32 = 21;
pub const MDIC_OP_WRITE: u32 = 1 << 26;
pub const MDIC_OP_READ: u32 = 2 << 26;
pub const MDIC_READY: u32 = 1 << 28;
pub const MDIC_ERROR: u32 = 1 << 30;

/// Descriptors are 16 bytes, legacy and extended alike.
pub const DESC_LEN: u64 = 16;
