//! The device side of a split virtqueue, as every device model uses it:
//! pop a chain, return it (used), put it back (unpop), drain with the
//! event-idx protocol, and decide whether the driver wants an interrupt.
//! Each helper is quiet about a hostile ring (virtio-queue logs an error
//! per bad entry, which a guest could use to flood rvm's stderr) and
//! bounded (a bad available index stalls the queue, it never spins).

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// VRING_AVAIL_F_NO_INTERRUPT: the driver asks not to be interrupted.
const AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The next chain the driver made available, or None. A hostile available
/// index (more new entries than the ring holds) also gives None, quietly:
/// virtio-queue's pop_descriptor_chain would log an error on every call,
/// and a guest could use that to flood rvm's stderr.
pub fn pop<'m>(
    q: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    match q.iter(mem) {
        Ok(mut chains) => chains.next(),
        Err(e) => {
            crate::guest_log!(log::Level::Debug, "virtio: queue unusable: {e}");
            None
        }
    }
}

/// Returns chain `head` to the driver with `len` bytes written. A head the
/// driver put on the available ring beyond the queue size cannot be
/// returned: false, quietly (virtio-queue's add_used would log an error
/// for each one, and a guest could fill a ring with them).
pub fn put_used(q: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    head < q.size() && q.add_used(mem, head, len).is_ok()
}

/// What a drain step says about the queue.
pub enum Step {
    /// One chain done: take the next.
    Next,
    /// No chain left (or the queue is unusable).
    Done,
    /// The backend would block: the chain went back to the ring and the
    /// queue waits, notifications off, until the backend takes writes.
    Park,
}

/// Drains a queue's chains with notifications off, then re-enables them
/// and goes again if the driver added more meanwhile (the event-idx
/// protocol; also correct without event idx). Returns true when a step
/// parked the queue.
pub fn drain<F>(mem: &GuestMemoryMmap, q: &mut Queue, mut each: F) -> bool
where
    F: FnMut(&mut Queue, &GuestMemoryMmap) -> Step,
{
    loop {
        let _ = q.disable_notification(mem);
        loop {
            match each(q, mem) {
                Step::Next => {}
                Step::Done => break,
                Step::Park => return true,
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
pub fn rearm(q: &mut Queue, mem: &GuestMemoryMmap) -> bool {
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

/// Whether the driver wants an interrupt for what was just used.
pub fn should_interrupt(mem: &GuestMemoryMmap, q: &mut Queue) -> bool {
    if q.event_idx_enabled() {
        return q.needs_notification(mem).unwrap_or(true);
    }
    let flags: u16 = mem.read_obj(GuestAddress(q.avail_ring())).unwrap_or(0);
    flags & AVAIL_F_NO_INTERRUPT == 0
}
