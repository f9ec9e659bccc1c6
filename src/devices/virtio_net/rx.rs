//! Host to guest: one readv from the backend straight into the guest's RX
//! buffers. We cannot know a frame's size before reading it, so RX chains
//! are popped ahead into a pool: one chain per frame, or, with merged
//! buffers, as many as the largest possible frame needs. Chains a frame
//! did not fill stay in the pool for the next one.
//!
//! A read into a pool smaller than the frame loses the frame (the TAP
//! drops what does not fit), so with merged buffers we wait for the driver
//! to post enough, unless the pool cannot grow: it holds as many chains
//! as we keep, or as many descriptors as the ring has.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;

use super::worker::{HeldRx, RxPool, Worker, SIGNAL_RX};
use super::HDR_LEN;
use crate::net::counters::bump;
use crate::net::stage::{Direction, Frame, Outcome};
use crate::virtio::chain::{self, MAX_IOV};
use crate::virtio::queue::{pop_each, rearm, Take};

/// Most chains kept popped at once.
const MAX_POOL_CHAINS: usize = 64;
/// Read errors in a row after which RX stops reading until the driver's
/// next kick or RETRY_AFTER: an error that consumes a frame (one too long
/// for the buffers) lets the next read go on, but one that does not (a
/// refused call, a backend in a bad state) would otherwise spin the thread.
const MAX_READ_ERRORS: u32 = 16;
const RETRY_AFTER: Duration = Duration::from_millis(100);

impl Worker {
    pub(super) fn process_rx(&mut self) {
        // A pair the driver does not use reads nothing (its TAP queue is
        // detached: the host steers no frames to it); nor does a pair
        // whose link is down (the TAP keeps the frames, a held one too).
        if !self.may_dma() || !self.attached || !self.link_up() {
            return;
        }
        let mut used = false;
        if self.rx_held.is_some() {
            match self.release_held() {
                Some(published) => used = published,
                // Still held: nothing more is read (the TAP keeps it).
                None => return,
            }
        }
        let mut errors = 0;
        while !self.rx_paused && self.rx_held.is_none() {
            used |= self.refill_pool();
            if !self.pool_ready() {
                // Not enough buffers: the backend keeps its frames until
                // the driver's kick (refill_pool's rearm asked for one).
                self.rx_paused = true;
                break;
            }
            match self.read_frame() {
                Ok(published) => {
                    used |= published;
                    errors = 0;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Typically a frame larger than the buffers (EFAULT or
                    // EMSGSIZE): the kernel dropped it. Go on with the next.
                    bump(&self.stats.rx_dropped, 1);
                    crate::guest_log!(log::Level::Debug, "virtio-net: RX read failed: {e}");
                    errors += 1;
                    if e.raw_os_error() == Some(libc::EBADFD)
                        || e.raw_os_error() == Some(libc::EIO)
                        || errors >= MAX_READ_ERRORS
                    {
                        // The TAP went away or down, or keeps failing:
                        // try again a little later.
                        self.rx_paused = true;
                        self.rx_retry_at = Some(Instant::now() + RETRY_AFTER);
                    }
                }
            }
        }
        if used {
            self.signal(SIGNAL_RX);
        }
    }

    /// How many bytes of buffers to hold before reading a frame.
    fn wanted(&self) -> usize {
        if self.mergeable {
            self.max_frame
        } else {
            1 // any one chain
        }
    }

    /// Whether the pool may take a frame now: it can hold the largest one,
    /// or it cannot grow any more.
    fn pool_ready(&self) -> bool {
        let p = &self.pool;
        !p.chains.is_empty()
            && (p.iov.bytes() >= self.wanted()
                || p.chains.len() >= MAX_POOL_CHAINS
                || p.iov_full
                || p.segs.len() >= usize::from(self.rx.queue.size()))
    }

    /// Pops RX chains until the pool is ready; refuses malformed ones.
    /// Returns true if anything went to the used ring.
    fn refill_pool(&mut self) -> bool {
        let mut used = false;
        let want = self.wanted();
        loop {
            let (pool, segs, mem) = (&mut self.pool, &mut self.segs, &self.mem);
            let full = |p: &RxPool| p.iov.bytes() >= want || p.chains.len() >= MAX_POOL_CHAINS;
            // A malformed chain stops the batch and goes back answered.
            let mut refused = None;
            if !full(pool) {
                pop_each(&mut self.rx.queue, mem, |c| {
                    let head = c.head_index();
                    segs.clear();
                    match chain::collect(c, mem, true, segs) {
                        Ok(len) if len as usize > HDR_LEN => {
                            if pool.segs.len() + segs.len() > MAX_IOV {
                                // Full: the pool takes frames as it is.
                                pool.iov_full = true;
                                return Take::PutBack;
                            }
                            pool.chains.push_back((head, len, segs.len()));
                            pool.segs.extend(segs.iter().copied());
                            for s in segs.iter() {
                                pool.iov.push(s.iov);
                            }
                        }
                        r => {
                            refused = Some((head, r));
                            return Take::Stop;
                        }
                    }
                    if full(pool) {
                        Take::Stop
                    } else {
                        Take::Next
                    }
                });
            }
            if let Some((head, r)) = refused {
                let why = r.map_or_else(|e| e.to_string(), |_| "too short".into());
                crate::guest_log!(
                    log::Level::Debug,
                    "virtio-net: RX chain {head} refused: {why}"
                );
                bump(&self.stats.malformed, 1);
                used |= self.give_back(head, 0);
                // Each refusal takes a chain off the ring: bounded.
                continue;
            }
            if self.pool.iov_full || self.pool_ready() {
                return used;
            }
            // Short: ask for a kick, unless buffers arrived meanwhile.
            let (q, mem) = (&mut self.rx.queue, &self.mem);
            if !rearm(q, mem) {
                return used;
            }
        }
    }

    /// The held frame, asked about again if its time has come: Some(true)
    /// when it went to the driver, Some(false) when a stage dropped it,
    /// None while it is still held.
    fn release_held(&mut self) -> Option<bool> {
        let held = self.rx_held.take()?;
        let now = Instant::now();
        let outcome = if now < held.until {
            Outcome::Hold {
                until: held.until,
                stage: held.stage,
            }
        } else {
            let segs = self.pool.segs.make_contiguous();
            let frame = Frame::Guest {
                mem: &self.mem,
                segs,
                skip: HDR_LEN,
                len: held.n.saturating_sub(HDR_LEN),
            };
            self.stages.run(Direction::Rx, &frame, held.stage, now)
        };
        match outcome {
            Outcome::Pass => {
                self.publish(held.n);
                Some(true)
            }
            Outcome::Drop => {
                bump(&self.stats.rx_dropped, 1);
                Some(false)
            }
            Outcome::Hold { until, stage } => {
                self.rx_held = Some(HeldRx {
                    n: held.n,
                    until,
                    stage,
                });
                None
            }
        }
    }

    /// Reads one frame into the pool's first chain(s), runs it through the
    /// stages and hands it to the driver. Ok(true) when it went to the
    /// driver; Ok(false) when a stage dropped it (its buffers stay in the
    /// pool) or held it.
    fn read_frame(&mut self) -> std::io::Result<bool> {
        let vnet = self.backend.vnet_hdr();
        // The backend writes the header itself, or we do and it writes after it.
        let skip = if vnet { 0 } else { HDR_LEN };
        // Merged buffers: the frame may fill the whole pool; otherwise only
        // the first chain.
        let limit = if self.mergeable {
            usize::MAX
        } else {
            let first = self.pool.chains.front().map_or(0, |c| c.1 as usize);
            first.saturating_sub(skip)
        };
        let backend = &self.backend;
        let injector = self.stages.injector();
        let read = self.pool.iov.with_window(skip, limit, |iov| {
            let room: usize = iov.iter().map(|v| v.iov_len).sum();
            // SAFETY: the iovecs cover chain::collect's bounds-checked
            // slices of guest RAM (mapped while self.mem lives), popped
            // from the ring for this read and referenced by nothing else
            // in rvm. (A frame a stage made for the guest comes first.)
            unsafe { injector.readv(&**backend, iov) }.map(|got| (got, room))
        });
        let Some(read) = read else {
            return Err(std::io::Error::from(ErrorKind::InvalidData));
        };
        let (got, room) = read?;
        // tun returns a frame's whole length even when it copied less: a
        // length beyond the buffers is a frame cut short. The guest must
        // not get it as whole; its buffers stay in the pool for the next.
        if got > room {
            return Err(std::io::Error::other(format!(
                "a {got}-byte frame did not fit the {room} bytes of buffers; dropped"
            )));
        }
        let segs = self.pool.segs.make_contiguous();
        let nsegs = if self.mergeable {
            segs.len()
        } else {
            self.pool.chains.front().map_or(0, |c| c.2)
        };
        let segs = &segs[..nsegs];
        let n = got + skip;
        let frame = Frame::Guest {
            mem: &self.mem,
            segs,
            skip: HDR_LEN,
            len: n.saturating_sub(HDR_LEN),
        };
        match self.stages.run_now(Direction::Rx, &frame, 0) {
            Outcome::Pass => {}
            Outcome::Drop => {
                bump(&self.stats.rx_dropped, 1);
                return Ok(false);
            }
            Outcome::Hold { until, stage } => {
                self.rx_held = Some(HeldRx { n, until, stage });
                return Ok(false);
            }
        }
        self.publish(n);
        Ok(true)
    }

    /// Returns an RX chain to the driver (published at the end of the
    /// pass, or now when the batch is full). False for a hostile head.
    fn give_back(&mut self, head: u16, len: u32) -> bool {
        let rx = &mut self.rx;
        if rx.used.is_full() {
            rx.used.publish(&mut rx.queue, &self.mem);
        }
        rx.used.put(head, len)
    }

    /// Hands the frame of `n` bytes (header included) at the pool's front
    /// to the driver: num_buffers, then the used entries of its chains.
    fn publish(&mut self, n: usize) {
        let vnet = self.backend.vnet_hdr();
        let segs = self.pool.segs.make_contiguous();
        // Which chains the frame filled, and how much of each.
        let mut rest = n as u64;
        let mut chains = 0u16;
        for &(_, len, _) in &self.pool.chains {
            if rest == 0 {
                break;
            }
            rest = rest.saturating_sub(u64::from(len));
            chains += 1;
            if !self.mergeable {
                break;
            }
        }
        let first_segs = self.pool.chains.front().map_or(0, |c| c.2);
        let mut hdr = [0u8; HDR_LEN];
        let written = if vnet {
            // num_buffers, after the 10 bytes the TAP wrote.
            chain::write_at(&self.mem, &segs[..first_segs], 10, &chains.to_le_bytes())
        } else {
            hdr[10..12].copy_from_slice(&chains.to_le_bytes());
            chain::write_at(&self.mem, &segs[..first_segs], 0, &hdr)
        };
        if !written {
            bump(&self.stats.rx_dropped, 1);
        }

        let mut rest = n as u64;
        for _ in 0..chains {
            let Some((head, len, nsegs)) = self.pool.chains.pop_front() else {
                break;
            };
            self.pool.segs.drain(..nsegs);
            self.pool.iov.consume(len as usize);
            self.pool.iov_full = false;
            let filled = rest.min(u64::from(len));
            rest -= filled;
            self.give_back(head, filled as u32);
        }
        bump(&self.stats.rx_frames, 1);
        bump(&self.stats.rx_bytes, (n - HDR_LEN.min(n)) as u64);
    }
}
