//! The root bus (bus 0) and configuration mechanism #1: the guest writes
//! an address to 0xCF8 and reads or writes the dword at 0xCFC..0xCFF.

use std::sync::{Arc, Mutex};

use super::PciDevice;
use crate::bus::BusDevice;

pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
pub const CONFIG_DATA_PORT: u64 = 0xcfc;
/// The bus device covers 0xCF8..0xD00.
pub const PORT_LEN: u64 = 8;
pub const MAX_DEVICES: usize = 32;
const ENABLE: u32 = 0x8000_0000;

/// Bus 0's functions by device number (function 0 only).
pub struct PciRoot {
    address: u32,
    devices: [Option<Arc<Mutex<dyn PciDevice>>>; MAX_DEVICES],
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    pub fn new() -> Self {
        PciRoot {
            address: 0,
            devices: std::array::from_fn(|_| None),
        }
    }

    /// Plugs `dev` in at the lowest free device number and returns it.
    pub fn add(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Option<u8> {
        let slot = self.devices.iter().position(Option::is_none)?;
        self.devices[slot] = Some(dev);
        Some(slot as u8)
    }

    /// The function the current address selects, and the register offset.
    fn selected(&self, port_offset: u64) -> Option<(Arc<Mutex<dyn PciDevice>>, usize)> {
        let a = self.address;
        let (bus, dev, func) = ((a >> 16) & 0xff, (a >> 11) & 0x1f, (a >> 8) & 0x7);
        if a & ENABLE == 0 || bus != 0 || func != 0 {
            return None;
        }
        let reg = (a & 0xfc) as usize + port_offset as usize;
        self.devices[dev as usize].clone().map(|d| (d, reg))
    }

    pub fn config_read(&self, port_offset: u64, data: &mut [u8]) {
        match self.selected(port_offset) {
            Some((dev, reg)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .config()
                .read(reg, data),
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&self, port_offset: u64, data: &[u8]) {
        if let Some((dev, reg)) = self.selected(port_offset) {
            let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
            d.config_mut().write(reg, data);
            d.config_written(reg, data);
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

    fn addr(dev: u32, reg: u32) -> [u8; 4] {
        (ENABLE | (dev << 11) | reg).to_le_bytes()
    }

    #[test]
    fn host_bridge_at_00_0_and_nothing_else() {
        let mut root = PciRoot::new();
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
        let mut root = PciRoot::new();
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
        let mut root = PciRoot::new();
        for i in 0..32 {
            assert_eq!(root.add(Arc::new(Mutex::new(HostBridge::new()))), Some(i));
        }
        assert_eq!(root.add(Arc::new(Mutex::new(HostBridge::new()))), None);
    }
}
