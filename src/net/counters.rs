//! NIC counters, shared by both NIC models: one block per queue pair,
//! updated by that pair's data path alone; read by anyone (the library
//! API, the exit log line), per pair or summed over the NIC.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The counters of one queue pair (RX queue k and TX queue k).
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

/// A NIC's counters: a block per queue pair, so that each pair's thread
/// bumps its own; the NIC's figures are their sum.
#[derive(Debug)]
pub struct NicStats {
    pairs: Vec<Arc<NetStats>>,
}

impl NicStats {
    /// Counters for `pairs` queue pairs (at least one).
    pub fn new(pairs: usize) -> Self {
        NicStats {
            pairs: (0..pairs.max(1)).map(|_| Arc::default()).collect(),
        }
    }

    /// Pair `k`'s block (the last one for a `k` beyond them).
    pub fn pair(&self, k: usize) -> Arc<NetStats> {
        let last = self.pairs.len() - 1;
        self.pairs[k.min(last)].clone()
    }

    /// The NIC's counters: every pair's, summed.
    pub fn snapshot(&self) -> NetCounters {
        self.pairs
            .iter()
            .map(|p| p.snapshot())
            .fold(NetCounters::default(), |a, b| a.plus(&b))
    }

    /// Each pair's counters, in queue order.
    pub fn per_pair(&self) -> Vec<NetCounters> {
        self.pairs.iter().map(|p| p.snapshot()).collect()
    }
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

impl NetCounters {
    fn plus(self, o: &NetCounters) -> NetCounters {
        NetCounters {
            rx_frames: self.rx_frames + o.rx_frames,
            rx_bytes: self.rx_bytes + o.rx_bytes,
            rx_dropped: self.rx_dropped + o.rx_dropped,
            tx_frames: self.tx_frames + o.tx_frames,
            tx_bytes: self.tx_bytes + o.tx_bytes,
            tx_dropped: self.tx_dropped + o.tx_dropped,
            tx_waits: self.tx_waits + o.tx_waits,
            malformed: self.malformed + o.malformed,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nic_sums_its_pairs_and_keeps_each() {
        let nic = NicStats::new(3);
        bump(&nic.pair(0).rx_frames, 2);
        bump(&nic.pair(2).rx_frames, 5);
        bump(&nic.pair(2).tx_bytes, 100);
        // Beyond the pairs: the last one's block, never a panic.
        bump(&nic.pair(9).malformed, 1);
        let all = nic.snapshot();
        assert_eq!((all.rx_frames, all.tx_bytes, all.malformed), (7, 100, 1));
        let each: Vec<u64> = nic.per_pair().iter().map(|c| c.rx_frames).collect();
        assert_eq!(each, [2, 0, 5]);
        assert_eq!(NicStats::new(0).per_pair().len(), 1);
    }
}
