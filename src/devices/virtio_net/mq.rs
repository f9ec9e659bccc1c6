//! Multiqueue (VIRTIO_NET_F_MQ): the pairs the driver uses. The device has
//! N RX/TX pairs, one worker each; at first the driver uses pair 0 only,
//! then VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on the control queue (pair 0's
//! worker) says how many. Each worker then attaches or detaches its own
//! queue of the multi-queue TAP, so the host steers frames only to pairs
//! the driver reads.

use std::sync::atomic::{AtomicU16, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// The pairs' shared state.
pub struct MqControl {
    /// Pairs in use: 0 to active - 1.
    active: AtomicU16,
    /// Each pair's worker's wake-up, to follow `active`.
    wakes: Vec<EventFd>,
}

impl MqControl {
    /// `pairs` pairs, of which the driver uses the first (as the spec
    /// says until its first VQ_PAIRS_SET).
    pub fn new(pairs: u16) -> std::io::Result<Self> {
        let wakes = (0..pairs.max(1))
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<std::io::Result<_>>()?;
        Ok(MqControl {
            active: AtomicU16::new(1),
            wakes,
        })
    }

    pub fn pairs(&self) -> u16 {
        self.wakes.len() as u16
    }

    pub fn active(&self) -> u16 {
        self.active.load(Ordering::SeqCst)
    }

    /// VQ_PAIRS_SET: false (the driver gets VIRTIO_NET_ERR) unless `n` is
    /// 1 to the device's pairs.
    pub fn set_active(&self, n: u16) -> bool {
        if n == 0 || n > self.pairs() {
            return false;
        }
        if self.active.swap(n, Ordering::SeqCst) != n {
            for w in &self.wakes {
                let _ = w.write(1);
            }
        }
        true
    }

    /// Pair `k`'s wake-up, for its loop to watch.
    pub fn wake(&self, k: usize) -> Option<&EventFd> {
        self.wakes.get(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_in_use_start_at_one_and_take_only_what_exists() {
        let mq = MqControl::new(4).unwrap();
        assert_eq!((mq.pairs(), mq.active()), (4, 1));
        for bad in [0, 5, u16::MAX] {
            assert!(!mq.set_active(bad));
            assert_eq!(mq.active(), 1);
        }
        let w3 = mq.wake(3).unwrap();
        assert!(w3.read().is_err(), "woken for nothing");
        assert!(mq.set_active(4));
        assert_eq!((mq.active(), w3.read().unwrap()), (4, 1));
        // The same count again wakes nobody.
        assert!(mq.set_active(4));
        assert!(w3.read().is_err());
        assert!(mq.wake(4).is_none());
    }
}
