//! Per-NIC counters, shared by both NIC models: updated by a NIC's data
//! path, read by anyone (the library API, the exit log line).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames the host had for the guest that were lost (read errors).
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames from the guest the backend did not take.
    pub tx_dropped: AtomicU64,
    /// Times the backend had no room (EAGAIN) and TX waited for it.
    pub tx_waits: AtomicU64,
    /// Descriptor chains refused because they broke the rules.
    pub malformed: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    /// Times the backend had no room (EAGAIN) and TX waited for it,
    /// holding the guest back instead of dropping.
    pub tx_waits: u64,
    pub malformed: u64,
}

pub(crate) fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl NetStats {
    pub fn snapshot(&self) -> NetCounters {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetCounters {
            rx_frames: r(&self.rx_frames),
            rx_bytes: r(&self.rx_bytes),
            rx_dropped: r(&self.rx_dropped),
            tx_frames: r(&self.tx_frames),
            tx_bytes: r(&self.tx_bytes),
            tx_dropped: r(&self.tx_dropped),
            tx_waits: r(&self.tx_waits),
            malformed: r(&self.malformed),
        }
    }
}
