//! Address maps for port I/O and MMIO: a vCPU exit names an address, the
//! bus finds the device whose range holds it and hands over the offset.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device reachable through a bus. Offsets are relative to the range the
/// device was inserted at; data lengths are what the guest used (1, 2, 4, 8).
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} is empty or overlaps a registered device")]
    Overlap { base: u64, len: u64 },
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base + len)` to `dev`.
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let overlaps = |end: u64| {
            // The nearest range starting below `end` is the only one that can overlap.
            ranges
                .range(..end)
                .next_back()
                .is_some_and(|(b, (l, _))| b + l > base)
        };
        match end {
            Some(end) if !overlaps(end) => {
                ranges.insert(base, (len, dev));
                Ok(())
            }
            _ => Err(BusError::Overlap { base, len }),
        }
    }

    /// Removes the device mapped at exactly `base`.
    pub fn remove(&self, base: u64) -> bool {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        ranges.remove(&base).is_some()
    }

    fn resolve(&self, addr: u64, len: usize) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (base, (size, dev)) = ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        // The whole access must fall inside the device's range.
        if offset.checked_add(len as u64)? <= *size {
            Some((offset, dev.clone()))
        } else {
            None
        }
    }

    /// Routes a read; returns false (and leaves `data` alone) when no
    /// device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                crate::lock_or_recover(&dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                crate::lock_or_recover(&dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, u8)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data[0]));
        }
    }

    #[test]
    fn routes_by_range() {
        let bus = Bus::new();
        let a = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x400, &mut b));
        assert!(!bus.read(0x3f7, &mut b));
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(a.lock().unwrap().0, vec![(7, 9)]);
        // An access straddling the end is not routed.
        let mut w = [0u8; 4];
        assert!(!bus.read(0x3fe, &mut w));
    }

    #[test]
    fn rejects_overlaps() {
        let bus = Bus::new();
        let d = || Arc::new(Mutex::new(Echo(vec![]))) as Arc<Mutex<dyn BusDevice>>;
        bus.insert(0x100, 0x10, d()).unwrap();
        assert!(bus.insert(0x10f, 1, d()).is_err());
        assert!(bus.insert(0xf8, 0x9, d()).is_err());
        assert!(bus.insert(0x0, 0, d()).is_err());
        assert!(bus.insert(u64::MAX, 2, d()).is_err());
        bus.insert(0x110, 1, d()).unwrap();
        bus.insert(0xf0, 0x10, d()).unwrap();
        assert!(bus.remove(0x100));
        bus.insert(0x108, 8, d()).unwrap();
    }
}
