//! The device side of a split virtqueue, as every device model uses it:
//! pop chains (one read of the available index per batch), return them
//! (used, one used-index store per batch), put one back (unpop), drain
//! with the event-idx protocol, and decide whether the driver wants an
//! interrupt.
//! Each helper is quiet about a hostile ring (virtio-queue logs an error
//! per bad entry, which a guest could use to flood rvm's stderr) and
//! bounded (a bad available index stalls the queue, it never spins).

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::vmm::memory::GuestRam;

/// VRING_AVAIL_F_NO_INTERRUPT: the driver asks not to be interrupted.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// What [`pop_each`] does after handing a chain over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Hand over the next chain, if the driver made one available.
    Next,
    /// Stop: the chain was taken.
    Stop,
    /// Stop, and put the chain back on the ring, unconsumed.
    PutBack,
}

/// Pops the chains the driver made available, as of one read of the
/// available index, handing each to `each` until it says stop. One read
/// per batch, not per chain: the driver keeps writing that index, and
/// each read of it after a write is a cache line fetched from the
/// driver's CPU. Chains made available meanwhile wait for the next call.
/// A hostile available index (more new entries than the ring holds)
/// gives no chain (a debug line, rate-limited as every guest-caused
/// line). Returns how many chains were taken (one put back not counted).
pub fn pop_each<'m, F>(q: &mut Queue, mem: &'m GuestRam, mut each: F) -> usize
where
    F: FnMut(DescriptorChain<&'m GuestRam>) -> Take,
{
    let mut taken = 0;
    let mut put_back = false;
    match q.iter(mem) {
        Ok(chains) => {
            for c in chains {
                match each(c) {
                    Take::Next => taken += 1,
                    Take::Stop => {
                        taken += 1;
                        break;
                    }
                    Take::PutBack => {
                        put_back = true;
                        break;
                    }
                }
            }
        }
        Err(e) => crate::guest_log!(log::Level::Debug, "virtio: queue unusable: {e}"),
    }
    if put_back {
        unpop(q, 1);
    }
    taken
}

/// Chains returned per publication at most: the driver gets its buffers
/// back (and may post them again) while a long pass goes on, as
/// vhost-net's batches do.
pub const USED_BATCH: usize = 64;

/// The device's side of a used ring: chains returned during a pass are
/// gathered and published with one store of the used index, not one per
/// chain (the driver polls that index, and every store of it is a cache
/// line the driver's CPU must fetch again); and what the event-idx test
/// needs to know of what was published since the last interrupt.
pub struct UsedRing {
    /// (head, bytes written), capacity USED_BATCH: never grows.
    pending: Vec<(u16, u32)>,
    /// The queue's size: a head at or beyond it cannot be returned.
    size: u16,
    /// Entries published since the driver was last asked about.
    unsignalled: Wrapping<u16>,
}

impl UsedRing {
    pub fn new(q: &Queue) -> Self {
        UsedRing {
            pending: Vec::with_capacity(USED_BATCH),
            size: q.size(),
            unsignalled: Wrapping(0),
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written, at the
    /// next [`UsedRing::publish`]. False, quietly, for a head beyond the
    /// queue size (a guest could fill a ring with them, and a log line
    /// each would flood rvm's stderr), and when the batch is full: publish
    /// first ([`UsedRing::is_full`]).
    pub fn put(&mut self, head: u16, len: u32) -> bool {
        if head >= self.size || self.is_full() {
            return false;
        }
        self.pending.push((head, len));
        true
    }

    pub fn is_full(&self) -> bool {
        self.pending.len() >= USED_BATCH
    }

    /// Writes the gathered entries to the used ring and then, once, the
    /// used index the driver reads.
    pub fn publish(&mut self, q: &mut Queue, mem: &GuestRam) {
        if self.pending.is_empty() {
            return;
        }
        let ring = GuestAddress(q.used_ring());
        let size = q.size();
        let first = Wrapping(q.next_used());
        // The entries as the ring holds them (struct virtq_used_elem
        // { le32 id; le32 len; }), written with one copy, or two where
        // they wrap around the end of the ring: a guest-memory write per
        // entry was a tenth of a 64 KiB RX frame's cost (16 buffers each).
        let mut elems = [0u8; 8 * USED_BATCH];
        for (i, &(head, len)) in self.pending.iter().enumerate() {
            let elem = (u64::from(len) << 32) | u64::from(head);
            elems[8 * i..8 * i + 8].copy_from_slice(&elem.to_le_bytes());
        }
        let mut next = first;
        let mut rest = &elems[..8 * self.pending.len()];
        while !rest.is_empty() {
            let slot = usize::from(next.0 % size);
            let n = (usize::from(size) - slot).min(rest.len() / 8);
            let Some(at) = ring.checked_add(4 + 8 * slot as u64) else {
                break;
            };
            if mem.write_slice(&rest[..8 * n], at).is_err() {
                break;
            }
            rest = &rest[8 * n..];
            next += Wrapping(n as u16);
        }
        self.pending.clear();
        if next == first {
            return;
        }
        q.set_next_used(next.0);
        self.unsignalled += next - first;
        // Release: the entries before the index that tells of them.
        if let Some(at) = ring.checked_add(2) {
            let _ = mem.store(next.0.to_le(), at, Ordering::Release);
        }
    }

    /// Whether the driver wants an interrupt for what was published since
    /// it was last asked: the event-idx test (virtio 1.x, 2.7.10), or the
    /// driver's NO_INTERRUPT flag without event idx.
    pub fn should_interrupt(&mut self, q: &Queue, mem: &GuestRam) -> bool {
        let fresh = std::mem::replace(&mut self.unsignalled, Wrapping(0));
        if q.event_idx_enabled() {
            // The index stores before the read of the driver's used_event.
            std::sync::atomic::fence(Ordering::SeqCst);
            let at = q.avail_ring() + 4 + 2 * u64::from(q.size());
            let Ok(event) = mem.load::<u16>(GuestAddress(at), Ordering::Relaxed) else {
                return true;
            };
            let new = Wrapping(q.next_used());
            // vring_need_event: used_event lies in (new - fresh, new].
            return new - Wrapping(u16::from_le(event)) - Wrapping(1) < fresh;
        }
        let flags: u16 = mem.read_obj(GuestAddress(q.avail_ring())).unwrap_or(0);
        flags & AVAIL_F_NO_INTERRUPT == 0
    }
}

/// What a drain step says about the chain it was given.
pub enum Step {
    /// Done with it (returned through the UsedRing): take the next.
    Next,
    /// Done with it; stop taking chains for now (rearm and look again).
    Done,
    /// The backend would block: the chain goes back to the ring and the
    /// queue waits, notifications off, until the backend takes writes.
    Park,
}

/// Drains a queue's chains with notifications off, in batches of at most
/// [`USED_BATCH`] from one read of the available index, each published
/// with one used-index store; then re-enables notifications and goes
/// again if the driver added more meanwhile (the event-idx protocol; also
/// correct without event idx). Returns true when a step parked the queue.
pub fn drain<F>(mem: &GuestRam, q: &mut Queue, used: &mut UsedRing, mut each: F) -> bool
where
    F: FnMut(DescriptorChain<&GuestRam>, &mut UsedRing) -> Step,
{
    loop {
        let _ = q.disable_notification(mem);
        loop {
            let (mut parked, mut done) = (false, false);
            let taken = pop_each(q, mem, |c| match each(c, used) {
                Step::Next if used.is_full() => Take::Stop,
                Step::Next => Take::Next,
                Step::Done => {
                    done = true;
                    Take::Stop
                }
                Step::Park => {
                    parked = true;
                    Take::PutBack
                }
            });
            used.publish(q, mem);
            if parked {
                return true;
            }
            if done || taken == 0 {
                break;
            }
        }
        if !rearm(q, mem) {
            return false;
        }
    }
}

/// Re-enables the driver's notifications; true when chains arrived
/// meanwhile and the caller should go on. A hostile available index (more
/// new entries than the ring holds) gives false: the queue stays stalled
/// until the driver resets it, instead of the worker spinning on it.
pub fn rearm(q: &mut Queue, mem: &GuestRam) -> bool {
    if !matches!(q.enable_notification(mem), Ok(true)) {
        return false;
    }
    match q.avail_idx(mem, Ordering::Acquire) {
        Ok(avail) => avail.0.wrapping_sub(q.next_avail()) <= q.size(),
        Err(_) => false,
    }
}

/// Puts back `n` chains popped but not consumed: the driver cannot
/// tell, as nothing was written to the used ring.
pub fn unpop(q: &mut Queue, n: u16) {
    q.set_next_avail(q.next_avail().wrapping_sub(n));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::sim::{SimQueue, DATA_START};

    /// A driver's queue of `size` and the device's view of it.
    fn queue(size: u16) -> (GuestRam, SimQueue, Queue) {
        let mem = crate::vmm::memory::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        let sim = SimQueue::new(0, size);
        let mut q = Queue::new(size).unwrap();
        q.try_set_desc_table_address(GuestAddress(sim.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(sim.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(sim.used)).unwrap();
        q.set_ready(true);
        (mem, sim, q)
    }

    fn heads(q: &mut Queue, mem: &GuestRam, stop_at: usize, last: Take) -> Vec<u16> {
        let mut got = Vec::new();
        pop_each(q, mem, |c| {
            got.push(c.head_index());
            if got.len() == stop_at {
                last
            } else {
                Take::Next
            }
        });
        got
    }

    #[test]
    fn pop_each_stops_where_told_and_puts_back_what_it_is_told_to() {
        let (mem, mut sim, mut q) = queue(8);
        let posted: Vec<u16> = (0..5)
            .map(|i| sim.add_chain(&mem, &[(DATA_START + i * 0x1000, 64)], true))
            .collect();
        assert_eq!(heads(&mut q, &mem, 2, Take::Stop), posted[..2]);
        // The third goes back: handed over again next time.
        assert_eq!(heads(&mut q, &mem, 1, Take::PutBack), posted[2..3]);
        assert_eq!(heads(&mut q, &mem, 99, Take::Stop), posted[2..]);
        assert!(heads(&mut q, &mem, 99, Take::Stop).is_empty());
    }

    #[test]
    fn pop_each_hands_over_what_was_available_when_it_began() {
        let (mem, mut sim, mut q) = queue(8);
        let first = sim.add_chain(&mem, &[(DATA_START, 64)], true);
        let mut later = None;
        let mut got = Vec::new();
        let n = pop_each(&mut q, &mem, |c| {
            got.push(c.head_index());
            // The driver posts more while the batch runs: next batch.
            later.get_or_insert_with(|| sim.add_chain(&mem, &[(DATA_START + 0x1000, 64)], true));
            Take::Next
        });
        assert_eq!((n, got), (1, vec![first]));
        assert_eq!(heads(&mut q, &mem, 99, Take::Stop), [later.unwrap()]);
    }

    #[test]
    fn pop_each_hands_over_nothing_from_a_hostile_available_index() {
        let (mem, _sim, mut q) = queue(8);
        // More new entries than the ring holds.
        mem.write_obj(9u16, GuestAddress(q.avail_ring() + 2))
            .unwrap();
        assert!(heads(&mut q, &mem, 99, Take::Stop).is_empty());
        assert_eq!(q.next_avail(), 0);
    }

    fn used_idx(mem: &GuestRam, q: &Queue) -> u16 {
        mem.read_obj(GuestAddress(q.used_ring() + 2)).unwrap()
    }

    #[test]
    fn used_entries_reach_the_driver_at_publish_with_one_index() {
        let (mem, mut sim, mut q) = queue(8);
        let mut used = UsedRing::new(&q);
        assert!(used.put(3, 100) && used.put(5, 0));
        // Gathered, not yet visible.
        assert_eq!(used_idx(&mem, &q), 0);
        assert_eq!(sim.pop_used(&mem), None);
        used.publish(&mut q, &mem);
        assert_eq!(used_idx(&mem, &q), 2);
        assert_eq!(sim.pop_used(&mem), Some((3, 100)));
        assert_eq!(sim.pop_used(&mem), Some((5, 0)));
        // A head beyond the ring is refused, and nothing is published.
        assert!(!used.put(8, 0));
        used.publish(&mut q, &mem);
        assert_eq!(used_idx(&mem, &q), 2);
        // A full batch takes no more until published.
        for i in 0..USED_BATCH {
            assert!(used.put(i as u16 % 8, 0));
        }
        assert!(used.is_full() && !used.put(0, 0));
        used.publish(&mut q, &mem);
        assert_eq!(used_idx(&mem, &q), 2 + USED_BATCH as u16);
    }

    #[test]
    fn a_batch_that_wraps_around_the_ring_lands_in_order() {
        let (mem, mut sim, mut q) = queue(4);
        let mut used = UsedRing::new(&q);
        for round in 0..3u16 {
            // Three at a time through four slots: rounds 1 and 2 wrap.
            let batch: Vec<(u16, u32)> = (0..3)
                .map(|i| ((round * 3 + i) % 4, u32::from(round * 100 + i)))
                .collect();
            for &(head, len) in &batch {
                assert!(used.put(head, len));
            }
            used.publish(&mut q, &mem);
            assert_eq!(used_idx(&mem, &q), 3 * (round + 1));
            for &entry in &batch {
                let (head, len) = entry;
                assert_eq!(
                    sim.pop_used(&mem),
                    Some((u32::from(head), len)),
                    "round {round}"
                );
            }
            assert_eq!(sim.pop_used(&mem), None);
        }
    }

    #[test]
    fn the_driver_is_interrupted_when_the_used_index_passes_its_used_event() {
        let (mem, mut sim, mut q) = queue(8);
        q.set_event_idx(true);
        let mut used = UsedRing::new(&q);
        // "Interrupt me once entry 2 (the third) is used."
        sim.set_used_event(&mem, 2);
        for head in 0..2 {
            used.put(head, 0);
            used.publish(&mut q, &mem);
            assert!(!used.should_interrupt(&q, &mem), "entry {head}");
        }
        // Two publications between questions: the one that passed 2 counts.
        used.put(2, 0);
        used.publish(&mut q, &mem);
        used.put(3, 0);
        used.publish(&mut q, &mem);
        assert!(used.should_interrupt(&q, &mem));
        // Nothing new since: no interrupt, whatever used_event says.
        sim.set_used_event(&mem, 3);
        assert!(!used.should_interrupt(&q, &mem));
        // Without event idx the NO_INTERRUPT flag decides.
        q.set_event_idx(false);
        assert!(used.should_interrupt(&q, &mem));
        mem.write_obj(AVAIL_F_NO_INTERRUPT, GuestAddress(q.avail_ring()))
            .unwrap();
        assert!(!used.should_interrupt(&q, &mem));
    }

    #[test]
    fn drain_returns_every_chain_in_batches_and_a_parked_chain_goes_back() {
        let (mem, mut sim, mut q) = queue(256);
        let mut used = UsedRing::new(&q);
        for i in 0..200 {
            sim.add_chain(&mem, &[(DATA_START + i * 64, 64)], false);
        }
        let used_at = GuestAddress(q.used_ring() + 2);
        let mut seen = 0u16;
        let parked = drain(&mem, &mut q, &mut used, |c, ret| {
            if seen == 150 {
                return Step::Park;
            }
            // The driver got the chains back a batch at a time.
            let published: u16 = mem.read_obj(used_at).unwrap();
            assert_eq!(published, seen / 64 * 64, "chain {seen}");
            seen += 1;
            assert!(ret.put(c.head_index(), 0));
            Step::Next
        });
        assert!(parked);
        assert_eq!(used_idx(&mem, &q), 150);
        assert_eq!(q.next_avail(), 150, "the parked chain is back on the ring");
    }
}
