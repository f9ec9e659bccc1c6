//! One PCI function's 256-byte configuration space: read-only identity
//! registers, writable command/status bits, BARs that answer the sizing
//! probe, and a capability list. Everything a guest writes goes through a
//! per-byte write mask, so no write can change what it must not.

pub const VENDOR_ID: usize = 0x00;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const CLASS_REVISION: usize = 0x08;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
pub const CONFIG_SIZE: usize = 256;
pub const NUM_BARS: usize = 6;

pub const COMMAND_IO: u16 = 0x1;
pub const COMMAND_MEMORY: u16 = 0x2;
pub const COMMAND_BUS_MASTER: u16 = 0x4;
pub const COMMAND_INTX_DISABLE: u16 = 0x400;
const STATUS_CAPABILITIES: u16 = 0x10;
/// First byte after the standard header, where capabilities start.
const CAPS_START: usize = 0x40;

/// What a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32,
    /// Takes two BAR slots.
    Memory64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bar {
    kind: BarKind,
    size: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} is taken or out of range")]
    BarSlot(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes (4 for I/O)")]
    BarSize(u64),
    #[error("no room for a {0}-byte capability")]
    CapabilitySpace(usize),
}

/// A type-0 configuration header plus capabilities.
#[derive(Clone)]
pub struct PciConfig {
    bytes: [u8; CONFIG_SIZE],
    writable: [u8; CONFIG_SIZE],
    bars: [Option<Bar>; NUM_BARS],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfig {
    /// `class` is class << 16 | subclass << 8 | prog-if.
    pub fn new(vendor: u16, device: u16, class: u32, subsys_vendor: u16, subsys: u16) -> Self {
        let mut c = PciConfig {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: CAPS_START,
        };
        c.set_u16(VENDOR_ID, vendor);
        c.set_u16(VENDOR_ID + 2, device);
        c.set_u32(CLASS_REVISION, class << 8);
        c.set_u16(SUBSYSTEM_VENDOR_ID, subsys_vendor);
        c.set_u16(SUBSYSTEM_VENDOR_ID + 2, subsys);
        let command = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.writable[COMMAND..COMMAND + 2].copy_from_slice(&command.to_le_bytes());
        c.writable[INTERRUPT_LINE] = 0xff;
        c
    }

    fn set_u16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn set_u32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn read_u16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    pub fn read_u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().unwrap_or([0; 4]))
    }

    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND)
    }

    /// Bus Master Enable: whether the function may access memory (DMA).
    pub fn bus_master(&self) -> bool {
        self.command() & COMMAND_BUS_MASTER != 0
    }

    /// Whether a configuration write of `len` bytes at `offset` touched
    /// the command register.
    pub fn touches_command(offset: usize, len: usize) -> bool {
        offset < COMMAND + 2 && offset + len > COMMAND
    }

    /// Declares the legacy interrupt pin (1 = INTA#) and the line the
    /// platform routed it to.
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.bytes[INTERRUPT_PIN] = pin;
        self.bytes[INTERRUPT_LINE] = line;
    }

    /// Declares BAR `index` and places it at `addr`.
    pub fn add_bar(
        &mut self,
        index: usize,
        kind: BarKind,
        size: u64,
        addr: u64,
    ) -> Result<(), ConfigError> {
        let slots = if kind == BarKind::Memory64 { 2 } else { 1 };
        if index + slots > NUM_BARS || self.bars[index..index + slots].iter().any(Option::is_some) {
            return Err(ConfigError::BarSlot(index));
        }
        let min = if kind == BarKind::Io { 4 } else { 16 };
        if !size.is_power_of_two() || size < min || (kind != BarKind::Memory64 && size > 1 << 31) {
            return Err(ConfigError::BarSize(size));
        }
        self.bars[index] = Some(Bar { kind, size });
        if kind == BarKind::Memory64 {
            // The upper half is described by the lower slot's entry.
            self.bars[index + 1] = Some(Bar { kind, size: 0 });
        }
        self.set_bar_addr(index, addr);
        Ok(())
    }

    fn set_bar_addr(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars[index] else { return };
        let off = BAR0 + index * 4;
        match bar.kind {
            BarKind::Io => {
                self.set_u32(off, (addr as u32 & !(bar.size as u32 - 1)) | 0x1);
                self.writable[off..off + 4]
                    .copy_from_slice(&(!(bar.size as u32 - 1) & !0x3).to_le_bytes());
            }
            BarKind::Memory32 => {
                self.set_u32(off, addr as u32 & !(bar.size as u32 - 1));
                self.writable[off..off + 4]
                    .copy_from_slice(&(!(bar.size as u32 - 1) & !0xf).to_le_bytes());
            }
            BarKind::Memory64 => {
                let mask = !(bar.size - 1);
                self.set_u32(off, (addr & mask) as u32 | 0x4);
                self.set_u32(off + 4, ((addr & mask) >> 32) as u32);
                self.writable[off..off + 4].copy_from_slice(&((mask as u32) & !0xf).to_le_bytes());
                self.writable[off + 4..off + 8]
                    .copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
            }
        }
    }

    /// Where BAR `index` is now, as the guest programmed it; None for an
    /// absent BAR or the upper half of a 64-bit one.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let bar = self
            .bars
            .get(index)
            .copied()
            .flatten()
            .filter(|b| b.size > 0)?;
        let lo = self.read_u32(BAR0 + index * 4);
        Some(match bar.kind {
            BarKind::Io => u64::from(lo & !0x3),
            BarKind::Memory32 => u64::from(lo & !0xf),
            BarKind::Memory64 => {
                u64::from(lo & !0xf) | (u64::from(self.read_u32(BAR0 + index * 4 + 4)) << 32)
            }
        })
    }

    /// The kind of BAR `index` (None for an absent BAR or an upper half).
    pub fn bar_kind(&self, index: usize) -> Option<BarKind> {
        self.bars
            .get(index)
            .copied()
            .flatten()
            .filter(|b| b.size > 0)
            .map(|b| b.kind)
    }

    pub fn bar_size(&self, index: usize) -> Option<u64> {
        self.bars
            .get(index)
            .copied()
            .flatten()
            .map(|b| b.size)
            .filter(|s| *s > 0)
    }

    /// Appends a capability whose body (after the ID and next-pointer bytes)
    /// is `body`, with `writable` masking the guest-writable body bytes.
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let len = (2 + body.len()).next_multiple_of(4);
        let off = self.next_cap;
        if off + len > CONFIG_SIZE {
            return Err(ConfigError::CapabilitySpace(len));
        }
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + 2 + body.len()].copy_from_slice(body);
        for (i, w) in writable.iter().take(body.len()).enumerate() {
            self.writable[off + 2 + i] = *w;
        }
        match self.last_cap {
            Some(prev) => self.bytes[prev + 1] = off as u8,
            None => {
                self.bytes[CAPABILITIES_POINTER] = off as u8;
                let status = self.read_u16(STATUS) | STATUS_CAPABILITIES;
                self.set_u16(STATUS, status);
            }
        }
        self.last_cap = Some(off);
        self.next_cap = off + len;
        Ok(off)
    }

    /// Bytes of the config space for the device model's own use (for
    /// example a capability it updates itself).
    pub fn bytes(&self) -> &[u8; CONFIG_SIZE] {
        &self.bytes
    }

    /// Sets bytes regardless of the write mask (device side).
    pub fn set_bytes(&mut self, off: usize, data: &[u8]) {
        if let Some(dst) = off
            .checked_add(data.len())
            .and_then(|end| self.bytes.get_mut(off..end))
        {
            dst.copy_from_slice(data);
        }
    }

    /// A guest read; out-of-range offsets read as all-ones.
    pub fn read(&self, off: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(off + i).copied().unwrap_or(0xff);
        }
    }

    /// A guest write, through the write mask; out-of-range bytes are dropped.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let Some(o) = off.checked_add(i).filter(|o| *o < CONFIG_SIZE) else {
                return;
            };
            let mask = self.writable[o];
            self.bytes[o] = (self.bytes[o] & !mask) | (b & mask);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        PciConfig::new(0x1af4, 0x1041, 0x02_00_00, 0x1af4, 0x1100)
    }

    fn probe(c: &mut PciConfig, off: usize) -> u32 {
        let saved = c.read_u32(off);
        c.write(off, &u32::MAX.to_le_bytes());
        let sized = c.read_u32(off);
        c.write(off, &saved.to_le_bytes());
        sized
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = cfg();
        c.write(0, &[0xff; 16]);
        assert_eq!(c.read_u16(VENDOR_ID), 0x1af4);
        assert_eq!(c.read_u16(VENDOR_ID + 2), 0x1041);
        assert_eq!(c.read_u32(CLASS_REVISION) >> 8, 0x02_00_00);
        assert_eq!(
            c.command(),
            COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE
        );
        c.write(COMMAND, &0u16.to_le_bytes());
        assert_eq!(c.command(), 0);
    }

    #[test]
    fn bar_sizing_probe_like_linux() {
        let mut c = cfg();
        c.add_bar(0, BarKind::Memory32, 0x2_0000, 0xc000_0000)
            .unwrap();
        c.add_bar(1, BarKind::Io, 0x40, 0xc000).unwrap();
        c.add_bar(2, BarKind::Memory64, 0x4000, 0x1_0000_0000)
            .unwrap();
        assert_eq!(probe(&mut c, BAR0), 0xfffe_0000);
        assert_eq!(probe(&mut c, BAR0 + 4), 0xffff_ffc1);
        assert_eq!(probe(&mut c, BAR0 + 8), 0xffff_c004);
        assert_eq!(probe(&mut c, BAR0 + 12), 0xffff_ffff);
        assert_eq!(probe(&mut c, BAR0 + 16), 0, "absent BAR reads 0");
        assert_eq!(c.bar_addr(0), Some(0xc000_0000));
        assert_eq!(c.bar_addr(1), Some(0xc000));
        assert_eq!(c.bar_addr(2), Some(0x1_0000_0000));
        assert_eq!(c.bar_addr(3), None);
        // The guest moves BAR 0; low bits it cannot set stay clear.
        c.write(BAR0, &0xd000_1234u32.to_le_bytes());
        assert_eq!(c.bar_addr(0), Some(0xd000_0000));
        assert_eq!(c.bar_size(0), Some(0x2_0000));
    }

    #[test]
    fn bad_bars_are_rejected() {
        let mut c = cfg();
        assert_eq!(
            c.add_bar(0, BarKind::Memory32, 0x3000, 0),
            Err(ConfigError::BarSize(0x3000))
        );
        assert_eq!(
            c.add_bar(5, BarKind::Memory64, 0x1000, 0),
            Err(ConfigError::BarSlot(5))
        );
        c.add_bar(0, BarKind::Memory64, 0x1000, 0).unwrap();
        assert_eq!(
            c.add_bar(1, BarKind::Io, 0x10, 0),
            Err(ConfigError::BarSlot(1))
        );
    }

    #[test]
    fn capabilities_chain() {
        let mut c = cfg();
        let a = c
            .add_capability(0x11, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], &[0xff, 0])
            .unwrap();
        let b = c.add_capability(0x09, &[0xaa; 14], &[]).unwrap();
        assert_eq!(
            c.read_u16(STATUS) & STATUS_CAPABILITIES,
            STATUS_CAPABILITIES
        );
        assert_eq!(c.bytes()[CAPABILITIES_POINTER] as usize, a);
        assert_eq!(c.bytes()[a + 1] as usize, b);
        assert_eq!(c.bytes()[b + 1], 0);
        assert_eq!(a % 4, 0);
        assert_eq!(b % 4, 0);
        c.write(a + 2, &[0x55, 0x66]);
        assert_eq!((c.bytes()[a + 2], c.bytes()[a + 3]), (0x55, 2));
        while c.add_capability(0x09, &[0; 30], &[]).is_ok() {}
    }

    #[test]
    fn hostile_offsets() {
        let mut c = cfg();
        let mut d = [0u8; 4];
        c.read(254, &mut d);
        assert_eq!(d[2..], [0xff, 0xff]);
        c.write(usize::MAX - 1, &[1, 2, 3, 4]);
        c.write(255, &[1, 2, 3, 4]);
        c.set_bytes(usize::MAX, &[1]);
        c.set_bytes(250, &[1; 10]);
    }
}
