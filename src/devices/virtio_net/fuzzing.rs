//! virtio-net without its thread, for fuzzing and deterministic tests.
//!
//! [`SyncNet`] is the real [`VirtioNet`] behind the transport, except that
//! at DRIVER_OK its worker is handed to the caller ([`Passes`]) instead of
//! being run on a thread. The caller then runs one TX, RX or control pass
//! at a time, exactly as the worker's event loop would on a kick or a
//! readable TAP, so the same input always does the same thing.

use std::sync::{Arc, Mutex, MutexGuard};

use super::worker::{Worker, CTRL, RX, TX};
use super::VirtioNet;
use crate::net::nic_loop::{NicEngine, Token};
use crate::virtio::{ActivateError, Activation, VirtioDevice};

/// The workers of the pairs the driver set up (none before DRIVER_OK).
type Slot = Arc<Mutex<Vec<Worker>>>;

/// A [`VirtioNet`] whose worker the caller runs.
pub struct SyncNet {
    net: VirtioNet,
    worker: Slot,
}

/// The caller's side of a [`SyncNet`]: one pass at a time, once the
/// driver activated the device (before that, or after a reset, a pass does
/// nothing).
#[derive(Clone)]
pub struct Passes(Slot);

impl SyncNet {
    pub fn new(net: VirtioNet) -> (Self, Passes) {
        let worker = Slot::default();
        (
            SyncNet {
                net,
                worker: worker.clone(),
            },
            Passes(worker),
        )
    }
}

fn lock(slot: &Slot) -> MutexGuard<'_, Vec<Worker>> {
    crate::lock_or_recover(slot)
}

impl VirtioDevice for SyncNet {
    fn device_type(&self) -> u16 {
        self.net.device_type()
    }

    fn queue_max_sizes(&self) -> &[u16] {
        self.net.queue_max_sizes()
    }

    fn features(&self) -> u64 {
        self.net.features()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.net.read_config(offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.net.write_config(offset, data)
    }

    fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
        lock(&self.worker).clear();
        let workers = self.net.prepare_workers(a)?;
        *lock(&self.worker) = workers.into_iter().map(|(w, _stop)| w).collect();
        Ok(())
    }

    fn reset(&mut self) {
        lock(&self.worker).clear();
        self.net.reset();
    }

    fn set_bus_master(&mut self, on: bool) {
        self.net.set_bus_master(on)
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Passes {
    /// Whether the driver activated the device (a pass would run).
    pub fn active(&self) -> bool {
        !lock(&self.0).is_empty()
    }

    /// The worker's answer to a TX kick, or to the TAP having room again
    /// after TX parked on a full one (callers drain the host end first).
    pub fn tx(&self) {
        for w in lock(&self.0).iter_mut() {
            let t = if w.tx_parked {
                Token::BackendWritable
            } else {
                Token::QueueKick(TX)
            };
            w.handle(t);
        }
    }

    /// The worker's answer to an RX kick (which also lets a paused RX
    /// read again).
    pub fn rx(&self) {
        for w in lock(&self.0).iter_mut() {
            w.handle(Token::QueueKick(RX));
        }
    }

    /// The worker's answer to a control-queue kick.
    pub fn ctrl(&self) {
        for w in lock(&self.0).iter_mut() {
            w.handle(Token::QueueKick(CTRL));
        }
    }
}
