//! The root bus (bus 0) and configuration mechanism #1: the guest writes
//! an address to 0xCF8 and reads or writes the dword at 0xCFC..0xCFF.
//! The root also keeps every BAR mapped on the PIO or MMIO bus where the
//! guest last programmed it, while the command register enables decoding.

use std::sync::{Arc, Mutex, Weak};

use super::config::{BarKind, BAR0, COMMAND, COMMAND_IO, COMMAND_MEMORY, NUM_BARS};
use super::PciDevice;
use crate::bus::{Bus, BusDevice};

pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
pub const CONFIG_DATA_PORT: u64 = 0xcfc;
/// The bus device covers 0xCF8..0xD00.
pub const PORT_LEN: u64 = 8;
pub const MAX_DEVICES: usize = 32;
const ENABLE: u32 = 0x8000_0000;

pub type SharedDevice = Arc<Mutex<dyn PciDevice>>;

/// One BAR as a bus range: accesses go to the device with the BAR index.
struct BarWindow {
    dev: SharedDevice,
    bar: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut d = crate::lock_or_recover(&self.dev);
        d.bar_read(self.bar, offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut d = crate::lock_or_recover(&self.dev);
        d.bar_write(self.bar, offset, data);
    }
}

struct Slot {
    dev: SharedDevice,
    /// Where each BAR is mapped on its bus now.
    mapped: [Option<u64>; NUM_BARS],
}

/// Bus 0's functions by device number (function 0 only).
pub struct PciRoot {
    address: u32,
    devices: [Option<Slot>; MAX_DEVICES],
    // Weak: the port bus holds the root (0xCF8), so strong references
    // would make a cycle that keeps an ended VM's devices, TAPs and guest
    // memory alive for as long as the process (a library user's) runs.
    pio: Weak<Bus>,
    mmio: Weak<Bus>,
}

impl PciRoot {
    pub fn new(pio: &Arc<Bus>, mmio: &Arc<Bus>) -> Self {
        PciRoot {
            address: 0,
            devices: std::array::from_fn(|_| None),
            pio: Arc::downgrade(pio),
            mmio: Arc::downgrade(mmio),
        }
    }

    /// Plugs `dev` in at the lowest free device number, with decoding on
    /// for the kinds of BAR it has (as firmware leaves it), and returns
    /// the device number.
    pub fn add(&mut self, dev: SharedDevice) -> Option<u8> {
        let slot = self.devices.iter().position(Option::is_none)?;
        {
            let mut d = crate::lock_or_recover(&dev);
            let cfg = d.config_mut();
            let mut command = cfg.command();
            for i in 0..NUM_BARS {
                match cfg.bar_kind(i) {
                    Some(BarKind::Io) => command |= COMMAND_IO,
                    Some(_) => command |= COMMAND_MEMORY,
                    None => {}
                }
            }
            cfg.set_bytes(COMMAND, &command.to_le_bytes());
        }
        self.devices[slot] = Some(Slot {
            dev,
            mapped: [None; NUM_BARS],
        });
        self.sync_bars(slot);
        Some(slot as u8)
    }

    /// The function the current address selects, and the register offset.
    fn selected(&self, port_offset: u64) -> Option<(usize, usize)> {
        let a = self.address;
        let (bus, dev, func) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 0x7);
        if a & ENABLE == 0 || bus != 0 || func != 0 {
            return None;
        }
        let reg = (a & 0xfc) as usize + port_offset as usize;
        self.devices[dev as usize]
            .as_ref()
            .map(|_| (dev as usize, reg))
    }

    pub fn config_read(&self, port_offset: u64, data: &mut [u8]) {
        match self.selected(port_offset) {
            Some((slot, reg)) => self.devices[slot]
                .as_ref()
                .map(|s| crate::lock_or_recover(&s.dev))
                .map(|d| d.config().read(reg, data))
                .unwrap_or(()),
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&mut self, port_offset: u64, data: &[u8]) {
        let Some((slot, reg)) = self.selected(port_offset) else {
            return;
        };
        if let Some(s) = &self.devices[slot] {
            let mut d = crate::lock_or_recover(&s.dev);
            d.config_mut().write(reg, data);
            d.config_written(reg, data);
        }
        let end = reg + data.len();
        let touches = |lo: usize, hi: usize| reg < hi && end > lo;
        if touches(COMMAND, COMMAND + 2) || touches(BAR0, BAR0 + 4 * NUM_BARS) {
            self.sync_bars(slot);
        }
    }

    /// Maps each BAR of `slot` where its register says, if its kind of
    /// decoding is enabled; unmaps it otherwise. A BAR the guest points at
    /// a range that is taken stays unmapped (and the guest sees all-ones).
    fn sync_bars(&mut self, slot: usize) {
        let Some(s) = self.devices[slot].as_mut() else {
            return;
        };
        let mut dev = crate::lock_or_recover(&s.dev);
        for bar in 0..NUM_BARS {
            let cfg = dev.config();
            let (Some(kind), Some(size)) = (cfg.bar_kind(bar), cfg.bar_size(bar)) else {
                continue;
            };
            let enabled = match kind {
                BarKind::Io => cfg.command() & COMMAND_IO != 0,
                _ => cfg.command() & COMMAND_MEMORY != 0,
            };
            let limit = if kind == BarKind::Io {
                1 << 16
            } else {
                u64::MAX
            };
            let want = cfg
                .bar_addr(bar)
                .filter(|a| enabled && *a != 0 && a.checked_add(size).is_some_and(|e| e <= limit));
            if want == s.mapped[bar] {
                continue;
            }
            let bus = if kind == BarKind::Io {
                self.pio.upgrade()
            } else {
                self.mmio.upgrade()
            };
            // Gone only while the VM is being torn down.
            let Some(bus) = bus else { return };
            if let Some(old) = s.mapped[bar].take() {
                bus.remove(old);
            }
            if let Some(addr) = want {
                let window = Arc::new(Mutex::new(BarWindow {
                    dev: s.dev.clone(),
                    bar,
                }));
                match bus.insert(addr, size, window) {
                    Ok(()) => s.mapped[bar] = Some(addr),
                    Err(e) => crate::guest_log!(
                        log::Level::Warn,
                        "PCI 00:{slot:02x}.0 BAR {bar}: {e}; left unmapped"
                    ),
                }
            }
            dev.bar_moved(bar, s.mapped[bar]);
        }
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if offset as usize - 4 + data.len() <= 4 => self.config_read(offset - 4, data),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            // Only dword writes hit CONFIG_ADDRESS; byte writes to 0xCF9
            // are the reset control register, which rvm does not model.
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]])
            }
            4..=7 if offset as usize - 4 + data.len() <= 4 => self.config_write(offset - 4, data),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::HostBridge;

    fn root() -> PciRoot {
        // The root only refers to its buses; these live as long as the test.
        let buses: &'static [Arc<Bus>; 2] = Box::leak(Box::new([Arc::default(), Arc::default()]));
        PciRoot::new(&buses[0], &buses[1])
    }

    #[test]
    fn the_root_on_the_port_bus_does_not_keep_the_buses_alive() {
        let (pio, mmio) = (Arc::new(Bus::new()), Arc::new(Bus::new()));
        let root = Arc::new(Mutex::new(PciRoot::new(&pio, &mmio)));
        pio.insert(CONFIG_ADDRESS_PORT, PORT_LEN, root.clone())
            .unwrap();
        let (weak_pio, weak_root) = (Arc::downgrade(&pio), Arc::downgrade(&root));
        drop((pio, mmio, root));
        assert!(weak_pio.upgrade().is_none() && weak_root.upgrade().is_none());
    }

    fn addr(dev: u32, reg: u32) -> [u8; 4] {
        (ENABLE | (dev << 11) | reg).to_le_bytes()
    }

    #[test]
    fn host_bridge_at_00_0_and_nothing_else() {
        let mut root = root();
        assert_eq!(root.add(Arc::new(Mutex::new(HostBridge::new()))), Some(0));
        let mut d = [0u8; 4];
        root.write(0, &addr(0, 0));
        root.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0d57_8086);
        root.write(0, &addr(0, 8));
        root.read(4, &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_00_00);
        // A byte read at 0xCFE reads the class code's top byte.
        let mut b = [0u8; 1];
        root.read(7, &mut b);
        assert_eq!(b[0], 0x06);
        // An empty slot, another bus and function 1 read as all-ones.
        for a in [
            addr(1, 0),
            (ENABLE | (1 << 16)).to_le_bytes(),
            (ENABLE | (1 << 8)).to_le_bytes(),
        ] {
            root.write(0, &a);
            root.read(4, &mut d);
            assert_eq!(d, [0xff; 4]);
        }
        // CONFIG_ADDRESS reads back; disabled addresses reach nothing.
        root.write(0, &0x0000_0000u32.to_le_bytes());
        root.read(4, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn writes_reach_the_device_through_its_mask() {
        let mut root = root();
        let hb = Arc::new(Mutex::new(HostBridge::new()));
        root.add(hb.clone());
        root.write(0, &addr(0, 0x3c));
        root.write(4, &[9]);
        assert_eq!(hb.lock().unwrap().config().bytes()[0x3c], 9);
        root.write(0, &addr(0, 0));
        root.write(4, &[0, 0, 0, 0]);
        assert_eq!(hb.lock().unwrap().config().read_u16(0), 0x8086);
        // Straddling the data window is ignored, not a panic.
        root.write(6, &[1, 2, 3, 4]);
        let mut d = [0u8; 4];
        root.read(7, &mut d);
        assert_eq!(d, [0xff; 4]);
    }

    #[test]
    fn bus_is_full_after_32_devices() {
        let mut root = root();
        for i in 0..32 {
            assert_eq!(root.add(Arc::new(Mutex::new(HostBridge::new()))), Some(i));
        }
        assert_eq!(root.add(Arc::new(Mutex::new(HostBridge::new()))), None);
    }
}
