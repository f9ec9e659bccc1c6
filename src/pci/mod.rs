//! PCI: configuration space for each function and the root bus that the
//! guest reaches through the 0xCF8/0xCFC configuration mechanism #1.
//! Device models (virtio-pci, e1000) implement [`PciDevice`].

pub mod alloc;
pub mod config;
pub mod msix;
pub mod root;

pub use alloc::PciAllocator;
pub use config::{BarKind, PciConfig};
pub use root::{PciRoot, CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT};

/// A PCI function on bus 0.
pub trait PciDevice: Send {
    /// The function's configuration space.
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;

    /// A configuration write, after the config space applied it. Devices
    /// override this to react (for example to a BAR move or a command bit).
    fn config_written(&mut self, _offset: usize, _data: &[u8]) {}

    /// A guest access inside BAR `bar`, at `offset` from its base.
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}

    /// BAR `bar` now decodes at `addr` (None: it stopped decoding). Devices
    /// with ioeventfds inside a BAR move them here.
    fn bar_moved(&mut self, _bar: usize, _addr: Option<u64>) {}
}

/// The host bridge at 00:00.0: present so that Linux finds a PCI root.
pub struct HostBridge(PciConfig);

impl HostBridge {
    pub fn new() -> Self {
        // Intel's id for a generic host bridge; class 06/00/00.
        HostBridge(PciConfig::new(0x8086, 0x0d57, 0x06_00_00, 0, 0))
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.0
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.0
    }
}
