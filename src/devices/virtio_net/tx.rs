//! Guest to host: each TX chain is a virtio-net header and a frame; both go
//! to the backend with one writev straight from guest memory.

use super::worker::{Worker, SIGNAL_TX};
use super::HDR_LEN;
use crate::net::counters::bump;
use crate::net::stage::{self, Direction, Frame, HoldAt, Outcome};
use crate::virtio::chain::{self, ChainError};
use crate::virtio::queue::{drain, Step};

impl Worker {
    pub(super) fn process_tx(&mut self) {
        // Parked: the TAP's room (EPOLLOUT) resumes TX, not a kick.
        if !self.may_dma() || self.tx_parked {
            return;
        }
        // Held by a stage: the timer resumes TX, at the stage that held.
        let Some(mut from) = stage::resume(&mut self.tx_hold) else {
            return;
        };
        let mut hold = None;
        let mut used = false;
        let strip = !self.backend.vnet_hdr();
        // Link down: what the guest sends goes nowhere (counted), as on a
        // NIC with its cable out.
        let link = self.link_up();
        let (backend, stats, stages, segs, iov) = (
            &self.backend,
            &self.stats,
            &self.stages,
            &mut self.segs,
            &mut self.iov,
        );
        let mem = &self.mem;
        let parked = drain(mem, &mut self.tx.queue, &mut self.tx.used, |c, ret| {
            let head = c.head_index();
            if !link {
                bump(&stats.tx_dropped, 1);
                if !ret.put(head, 0) {
                    return Step::Done;
                }
                used = true;
                return Step::Next;
            }
            segs.clear();
            let frame = chain::collect(c, mem, false, segs).and_then(|len| {
                if (len as usize) < HDR_LEN {
                    return Err(ChainError::TooShort);
                }
                Ok(len)
            });
            let verdict = frame.map(|len| {
                let frame = Frame::Guest {
                    mem,
                    segs: &segs[..],
                    skip: HDR_LEN,
                    len: len as usize - HDR_LEN,
                };
                (
                    len,
                    stages.run_now(Direction::Tx, &frame, std::mem::take(&mut from)),
                )
            });
            match verdict {
                Ok((_, Outcome::Hold { until, stage })) => {
                    // The chain goes back, unanswered, until the stage's time.
                    hold = Some(HoldAt { until, stage });
                    return Step::Park;
                }
                Ok((_, Outcome::Drop)) => bump(&stats.tx_dropped, 1),
                Ok((len, Outcome::Pass)) => {
                    // Without a vnet header on the TAP the header stays behind.
                    let skip = if strip { HDR_LEN } else { 0 };
                    let wrote = if chain::iovecs_skipping(segs, skip, iov) {
                        // SAFETY: bounds-checked slices of guest RAM
                        // (chain::collect), mapped while `mem` lives.
                        unsafe { backend.writev(iov) }
                    } else {
                        Ok(0) // a header and nothing after it: nothing to send
                    };
                    match wrote {
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            // The TAP's queue is full (a small sndbuf=):
                            // the chain goes back, unanswered, and the
                            // guest waits, as on a busy wire with flow
                            // control, instead of losing the frame.
                            return Step::Park;
                        }
                        Ok(_) => {
                            bump(&stats.tx_frames, 1);
                            bump(&stats.tx_bytes, u64::from(len) - HDR_LEN as u64);
                        }
                        Err(e) => {
                            // A header the host refused, a TAP gone: the
                            // frame is lost, as on a wire.
                            bump(&stats.tx_dropped, 1);
                            crate::guest_log!(
                                log::Level::Debug,
                                "virtio-net: TX frame dropped: {e}"
                            );
                        }
                    }
                }
                Err(e) => {
                    bump(&stats.malformed, 1);
                    crate::guest_log!(
                        log::Level::Debug,
                        "virtio-net: TX chain {head} refused: {e}"
                    );
                }
            }
            // TX buffers are only read: the used length is 0.
            if !ret.put(head, 0) {
                return Step::Done;
            }
            used = true;
            Step::Next
        });
        if hold.is_some() {
            self.tx_hold = hold;
        } else {
            self.tx_parked = parked;
            if parked {
                bump(&self.stats.tx_waits, 1);
            }
        }
        if used {
            self.signal(SIGNAL_TX);
        }
    }
}
