//! The iovecs of a queue of guest buffers, kept up to date as buffers
//! join at the back and bytes leave from the front, so that a read into
//! the whole queue does not rebuild its iovecs first.
//!
//! Why: virtio-net RX offers the backend every buffer it holds (a frame's
//! size is known only once it is read), which with 2 KiB merged buffers is
//! some 33 of them; rebuilding their iovecs for each 1514-byte frame was
//! the largest item of rvm's own RX cost. Buffers that follow each other
//! in memory share one iovec (Linux carves its merged buffers one after
//! the other from the same pages), as in `chain::iovecs_skipping`.

use std::collections::VecDeque;

use super::chain::ends_at;

#[derive(Default)]
pub struct IovQueue {
    iov: VecDeque<libc::iovec>,
    bytes: usize,
}

// SAFETY: the iovecs are addresses of guest RAM, which stays mapped while
// the worker that owns this queue holds its GuestRam; they are only handed
// to readv.
unsafe impl Send for IovQueue {}

impl IovQueue {
    /// Bytes of buffer in the queue.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds a buffer at the back.
    pub fn push(&mut self, buf: libc::iovec) {
        if buf.iov_len == 0 {
            return;
        }
        self.bytes += buf.iov_len;
        if let Some(last) = self.iov.back_mut() {
            if ends_at(last, buf.iov_base.cast()) {
                last.iov_len += buf.iov_len;
                return;
            }
        }
        self.iov.push_back(buf);
    }

    /// Drops the first `n` bytes (all of them if there are fewer).
    pub fn consume(&mut self, mut n: usize) {
        while n > 0 {
            let Some(first) = self.iov.front_mut() else {
                break;
            };
            if first.iov_len <= n {
                n -= first.iov_len;
                self.bytes -= first.iov_len;
                self.iov.pop_front();
            } else {
                first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
                first.iov_len -= n;
                self.bytes -= n;
                n = 0;
            }
        }
    }

    /// Calls `f` with the iovecs of bytes `skip..skip + limit` of the queue
    /// (fewer if the queue ends first). None, without calling `f`, when
    /// nothing lies past `skip` or `limit` is 0.
    pub fn with_window<R>(
        &mut self,
        skip: usize,
        limit: usize,
        f: impl FnOnce(&[libc::iovec]) -> R,
    ) -> Option<R> {
        if skip >= self.bytes || limit == 0 {
            return None;
        }
        let iov = self.iov.make_contiguous();
        // The first iovec with bytes past `skip`, and the offset in it.
        let (mut first, mut offset) = (0, skip);
        while offset >= iov[first].iov_len {
            offset -= iov[first].iov_len;
            first += 1;
        }
        // The iovec that holds the window's last byte, and how much of it.
        let (mut last, mut want) = (first, limit.saturating_add(offset));
        while last + 1 < iov.len() && want > iov[last].iov_len {
            want -= iov[last].iov_len;
            last += 1;
        }
        let (saved_first, saved_last) = (iov[first], iov[last]);
        iov[last].iov_len = iov[last].iov_len.min(want);
        iov[first].iov_base = iov[first].iov_base.cast::<u8>().wrapping_add(offset).cast();
        iov[first].iov_len -= offset;
        let r = f(&iov[first..=last]);
        iov[last] = saved_last;
        iov[first] = saved_first;
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::tests::{iovec_at as at, spans};

    fn window(q: &mut IovQueue, buf: &[u8], skip: usize, limit: usize) -> Vec<(usize, usize)> {
        q.with_window(skip, limit, |iov| spans(buf, iov)).unwrap()
    }

    #[test]
    fn buffers_that_follow_each_other_share_an_iovec() {
        let mut buf = vec![0u8; 4096];
        let mut q = IovQueue::default();
        q.push(at(&mut buf, 0, 100));
        q.push(at(&mut buf, 100, 300));
        q.push(at(&mut buf, 400, 500)); // a gap
        q.push(at(&mut buf, 0, 50)); // backwards: never joined
        q.push(at(&mut buf, 50, 50)); // empty: ignored
        assert_eq!(q.bytes(), 450);
        let all = window(&mut q, &buf, 0, usize::MAX);
        assert_eq!(all, [(0, 300), (400, 100), (0, 50)]);
    }

    #[test]
    fn a_window_skips_and_limits_and_leaves_the_queue_as_it_was() {
        let mut buf = vec![0u8; 4096];
        let mut q = IovQueue::default();
        for (a, b) in [(0, 300), (400, 500), (1000, 1200)] {
            q.push(at(&mut buf, a, b));
        }
        assert_eq!(
            window(&mut q, &buf, 12, usize::MAX),
            [(12, 288), (400, 100), (1000, 200)]
        );
        assert_eq!(window(&mut q, &buf, 0, 350), [(0, 300), (400, 50)]);
        assert_eq!(window(&mut q, &buf, 12, 300), [(12, 288), (400, 12)]);
        assert_eq!(window(&mut q, &buf, 350, 10), [(450, 10)]);
        assert_eq!(window(&mut q, &buf, 300, 100), [(400, 100)]);
        assert_eq!(window(&mut q, &buf, 399, 1), [(499, 1)]);
        assert_eq!(window(&mut q, &buf, 599, 5), [(1199, 1)]);
        // The windows changed nothing.
        assert_eq!(
            window(&mut q, &buf, 0, usize::MAX),
            [(0, 300), (400, 100), (1000, 200)]
        );
        // Nothing past the skip, or an empty window.
        assert!(q.with_window(600, 1, |_| ()).is_none());
        assert!(q.with_window(0, 0, |_| ()).is_none());
    }

    #[test]
    fn consuming_takes_bytes_from_the_front() {
        let mut buf = vec![0u8; 4096];
        let mut q = IovQueue::default();
        for (a, b) in [(0, 300), (400, 500), (1000, 1200)] {
            q.push(at(&mut buf, a, b));
        }
        q.consume(100);
        assert_eq!(
            window(&mut q, &buf, 0, usize::MAX),
            [(100, 200), (400, 100), (1000, 200)]
        );
        q.consume(250);
        assert_eq!(q.bytes(), 250);
        assert_eq!(
            window(&mut q, &buf, 0, usize::MAX),
            [(450, 50), (1000, 200)]
        );
        // A buffer pushed after consumption still joins the last one.
        q.push(at(&mut buf, 1200, 1300));
        assert_eq!(
            window(&mut q, &buf, 0, usize::MAX),
            [(450, 50), (1000, 300)]
        );
        q.consume(10_000);
        assert_eq!(q.bytes(), 0);
        assert!(q.with_window(0, 1, |_| ()).is_none());
    }
}
