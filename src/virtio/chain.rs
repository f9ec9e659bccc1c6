//! Turning a descriptor chain into iovecs over guest memory, refusing
//! anything a well-behaved driver would not post. Everything here is
//! guest-controlled: addresses, lengths, flags, next pointers.

use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;

use crate::vmm::memory::GuestRam;

/// readv/writev take at most this many segments (UIO_MAXIOV).
pub const MAX_IOV: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("a descriptor has the wrong direction")]
    WrongDirection,
    #[error("a descriptor has length 0")]
    ZeroLength,
    #[error("a buffer lies outside guest memory")]
    OutOfMemory,
    #[error("the chain has more than {MAX_IOV} buffers")]
    TooManySegments,
    #[error("the chain is empty, loops or points outside its table")]
    Broken,
    #[error("the chain is shorter than the virtio-net header")]
    TooShort,
}

/// A guest buffer: where it is in the guest and in rvm.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    pub gpa: u64,
    pub iov: libc::iovec,
}

// SAFETY: an iovec is a pointer into guest memory that stays mapped while
// the worker holds its GuestRam; it is only handed to readv/writev.
unsafe impl Send for Segment {}

/// Appends the chain's buffers to `out`; all must be device-writable
/// (`writable`) or all device-readable. Returns the chain's total length.
/// On error `out` is left as it was.
pub fn collect(
    chain: DescriptorChain<&GuestRam>,
    mem: &GuestRam,
    writable: bool,
    out: &mut Vec<Segment>,
) -> Result<u32, ChainError> {
    let start = out.len();
    let r = collect_inner(chain, mem, writable, out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

fn collect_inner(
    chain: DescriptorChain<&GuestRam>,
    mem: &GuestRam,
    writable: bool,
    out: &mut Vec<Segment>,
) -> Result<u32, ChainError> {
    let mut total: u32 = 0;
    let mut count = 0usize;
    let mut more = false;
    for d in chain {
        count += 1;
        more = d.has_next();
        if d.is_write_only() != writable {
            return Err(ChainError::WrongDirection);
        }
        if d.len() == 0 {
            return Err(ChainError::ZeroLength);
        }
        if out.len() >= MAX_IOV {
            return Err(ChainError::TooManySegments);
        }
        let slice = mem
            .get_slice(d.addr(), d.len() as usize)
            .map_err(|_| ChainError::OutOfMemory)?;
        out.push(Segment {
            gpa: d.addr().0,
            iov: libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: d.len() as usize,
            },
        });
        // The chain iterator already refuses chains over 4 GiB in total.
        total = total.saturating_add(d.len());
    }
    // The iterator stops silently on a loop (its TTL runs out), a next
    // index outside the table or an unreadable descriptor: in each case the
    // last descriptor it gave still says there is more.
    if count == 0 || more {
        return Err(ChainError::Broken);
    }
    Ok(total)
}

/// Writes `bytes` at byte `offset` of the buffer the segments describe.
/// Returns false if the buffer is too short.
pub fn write_at(mem: &GuestRam, segs: &[Segment], offset: usize, bytes: &[u8]) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    let mut skip = offset;
    let mut rest = bytes;
    for s in segs {
        if rest.is_empty() {
            break;
        }
        if skip >= s.iov.iov_len {
            skip -= s.iov.iov_len;
            continue;
        }
        let n = (s.iov.iov_len - skip).min(rest.len());
        if mem
            .write_slice(&rest[..n], GuestAddress(s.gpa + skip as u64))
            .is_err()
        {
            return false;
        }
        rest = &rest[n..];
        skip = 0;
    }
    rest.is_empty()
}

/// Whether `base` is where `iov` ends: a buffer starting there joins it.
pub fn ends_at(iov: &libc::iovec, base: *mut u8) -> bool {
    iov.iov_base.cast::<u8>().wrapping_add(iov.iov_len) == base
}

/// Copies the iovecs of `segs` into `iov` with the first `skip` bytes left
/// out (for a backend without a vnet header). Returns false if the buffer
/// is not longer than `skip`.
///
/// A segment that starts where the one before it ends joins it: Linux
/// carves its merged RX buffers one after the other from the same pages,
/// and every iovec costs the kernel a copy-in per readv (and beyond 8 of
/// them an allocation), which was a quarter of a 1514-byte RX frame's
/// cost. The bytes and their order are the same either way, and a joined
/// iovec covers exactly the memory of the segments it joins.
pub fn iovecs_skipping(segs: &[Segment], skip: usize, iov: &mut Vec<libc::iovec>) -> bool {
    iov.clear();
    let mut skip = skip;
    for s in segs {
        if skip >= s.iov.iov_len {
            skip -= s.iov.iov_len;
            continue;
        }
        let base = s.iov.iov_base.cast::<u8>().wrapping_add(skip);
        let len = s.iov.iov_len - skip;
        skip = 0;
        if let Some(last) = iov.last_mut() {
            if ends_at(last, base) {
                last.iov_len += len;
                continue;
            }
        }
        iov.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        });
    }
    skip == 0 && !iov.is_empty()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The iovec of `buf[from..to]`.
    pub(crate) fn iovec_at(buf: &mut [u8], from: usize, to: usize) -> libc::iovec {
        libc::iovec {
            iov_base: buf[from..to].as_mut_ptr().cast(),
            iov_len: to - from,
        }
    }

    fn seg(buf: &mut [u8], from: usize, to: usize) -> Segment {
        Segment {
            gpa: from as u64,
            iov: iovec_at(buf, from, to),
        }
    }

    /// Each iovec as (offset in `buf`, length).
    pub(crate) fn spans(buf: &[u8], iov: &[libc::iovec]) -> Vec<(usize, usize)> {
        iov.iter()
            .map(|v| (v.iov_base as usize - buf.as_ptr() as usize, v.iov_len))
            .collect()
    }

    #[test]
    fn adjacent_segments_make_one_iovec_and_the_skip_still_holds() {
        let mut buf = vec![0u8; 1024];
        let segs = [
            seg(&mut buf, 0, 100),
            seg(&mut buf, 100, 300),
            seg(&mut buf, 300, 301),
            // A gap: a new iovec.
            seg(&mut buf, 400, 500),
            seg(&mut buf, 500, 600),
            // Backwards (a hostile or odd driver): never joined.
            seg(&mut buf, 0, 50),
        ];
        let mut iov = Vec::new();
        assert!(iovecs_skipping(&segs, 0, &mut iov));
        assert_eq!(spans(&buf, &iov), [(0, 301), (400, 200), (0, 50)]);
        assert!(iovecs_skipping(&segs, 12, &mut iov));
        assert_eq!(spans(&buf, &iov), [(12, 289), (400, 200), (0, 50)]);
        // A skip that eats whole segments starts in the next one.
        assert!(iovecs_skipping(&segs, 301, &mut iov));
        assert_eq!(spans(&buf, &iov), [(400, 200), (0, 50)]);
        assert!(iovecs_skipping(&segs, 350, &mut iov));
        assert_eq!(spans(&buf, &iov), [(449, 151), (0, 50)]);
        // Nothing after the skip: refused.
        assert!(!iovecs_skipping(&segs[..3], 301, &mut iov));
        assert!(!iovecs_skipping(&segs[..3], 400, &mut iov));
    }
}
