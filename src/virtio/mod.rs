//! Virtio: the contract between a transport (virtio-pci) and a device
//! model (virtio-net). The transport owns registers, feature negotiation
//! and the status machine; the device owns what the queues carry.

pub mod chain;
pub mod iov_queue;
pub mod pci;
pub mod queue;
pub mod sim;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::memory::GuestRam;

pub use pci::VirtioPciDevice;

/// Feature bits shared by every device type.
pub mod features {
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u8 = 1;
    pub const DRIVER: u8 = 2;
    pub const DRIVER_OK: u8 = 4;
    pub const FEATURES_OK: u8 = 8;
    pub const NEEDS_RESET: u8 = 64;
    pub const FAILED: u8 = 128;
}

/// "No MSI-X vector" in the vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// How a device tells the driver that it used buffers or changed config.
pub trait Interrupt: Send + Sync {
    /// Buffers were used on a queue whose vector is `vector`.
    fn queue(&self, vector: u16);
    /// The device configuration changed.
    fn config(&self);
    /// An eventfd whose every write interrupts the driver on `vector`
    /// without rvm in the way (an irqfd), for a data path in the host
    /// kernel. None when the vector cannot be delivered that way.
    fn queue_irqfd(&self, vector: u16) -> Option<EventFd>;
}

/// One queue the driver enabled, handed to the device at DRIVER_OK.
pub struct ActiveQueue {
    /// Its number on the transport: a device must not take a queue for
    /// another when the driver left one out.
    pub index: u16,
    pub queue: Queue,
    /// Written when the driver notifies this queue (an ioeventfd).
    pub kick: EventFd,
    pub vector: u16,
}

/// Everything a device needs to run once the driver is ready.
pub struct Activation {
    pub mem: GuestRam,
    /// The features the driver accepted.
    pub features: u64,
    pub queues: Vec<ActiveQueue>,
    pub interrupt: Arc<dyn Interrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver enabled queues {got:?}, the device needs queues 0 to {}", .want - 1)]
    QueueSet { got: Vec<u16>, want: u16 },
    #[error("cannot start the device: {0}")]
    Start(String),
}

/// A virtio device model, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (1 = network).
    fn device_type(&self) -> u16;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: start processing the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver reset the device: stop and drop every queue.
    fn reset(&mut self);
    /// Bus Master Enable changed: while it is off the device must not
    /// touch guest memory (it starts off). The transport kicks every
    /// queue when it comes back on, so that held work resumes.
    fn set_bus_master(&mut self, on: bool);
    /// The device model itself, for its owner's controls (a NIC's link).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}
