//! Rate limits per NIC and direction: token buckets (bandwidth in bytes,
//! operations in frames), as Firecracker offers them, run as a stage. A
//! frame the buckets cannot pay for yet is held, not dropped: the NIC
//! leaves a TX chain in the guest's ring, or reads nothing more from the
//! backend, until the stage's time comes (the NIC loop's timer wakes it).
//!
//! A frame larger than a bucket passes once the bucket is full and leaves
//! it in debt, so a 64 KiB TSO frame passes a small bucket and the rate
//! over time still holds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::stage::{Direction, Frame, Stage, StageError, Stages, Verdict};

/// The name the stage goes by in logs, counters and vhost-net's refusal.
pub const STAGE_NAME: &str = "rate-limit";

/// The longest a hold lasts before the stage is asked again: a limit
/// changed while the VM runs takes effect within this, even when the old
/// one made a frame wait longer.
pub const MAX_HOLD: Duration = Duration::from_millis(50);

/// One token bucket: `size` tokens, refilled from empty to full in
/// `refill`, plus `one_time_burst` tokens spent first and never refilled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucket {
    pub size: u64,
    pub refill: Duration,
    pub one_time_burst: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("a bucket needs a size of at least 1 and a refill time of at least 1 ms")]
    EmptyBucket,
    #[error("{0}: expected a rate in bits per second, like 16Mbit, 100M, 1G or 500k")]
    BadRate(String),
    #[error("{0}: expected a size in bytes, like 64K, 1M or 1500")]
    BadSize(String),
    #[error("{0}: expected a number of frames per second (1 or more)")]
    BadPps(String),
}

impl Bucket {
    /// A bucket of `size` tokens refilled in `refill`.
    pub fn new(size: u64, refill: Duration, one_time_burst: u64) -> Result<Self, LimitError> {
        if size == 0 || refill < Duration::from_millis(1) {
            return Err(LimitError::EmptyBucket);
        }
        Ok(Bucket {
            size,
            refill,
            one_time_burst,
        })
    }

    /// Bytes at `bits_per_second`, in bursts of at most `burst` bytes
    /// (default: 10 ms at the rate, at least 16 KiB).
    pub fn bandwidth(bits_per_second: u64, burst: Option<u64>) -> Result<Self, LimitError> {
        let bytes_per_second = u128::from(bits_per_second / 8);
        if bytes_per_second == 0 {
            return Err(LimitError::BadRate(bits_per_second.to_string()));
        }
        let size = burst.unwrap_or((bytes_per_second / 100).max(16 << 10) as u64);
        Self::at_rate(size, bytes_per_second)
    }

    /// `per_second` frames, in bursts of 10 ms worth (at least one).
    pub fn operations(per_second: u64) -> Result<Self, LimitError> {
        if per_second == 0 {
            return Err(LimitError::BadPps(per_second.to_string()));
        }
        Self::at_rate((per_second / 100).max(1), u128::from(per_second))
    }

    fn at_rate(size: u64, per_second: u128) -> Result<Self, LimitError> {
        let ns = u128::from(size) * 1_000_000_000 / per_second;
        let refill = Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX));
        // A bucket that refills in under a millisecond is fine at this
        // rate: only the public constructor asks for a millisecond.
        if size == 0 || refill.is_zero() {
            return Err(LimitError::EmptyBucket);
        }
        Ok(Bucket {
            size,
            refill,
            one_time_burst: 0,
        })
    }

    /// Tokens per second.
    pub fn rate(&self) -> f64 {
        self.size as f64 / self.refill.as_secs_f64()
    }
}

/// The limits of one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectionLimits {
    /// Bytes of frames as the guest sees them (no vnet header).
    pub bandwidth: Option<Bucket>,
    /// Frames.
    pub ops: Option<Bucket>,
}

impl DirectionLimits {
    pub fn is_none(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// A NIC's limits: tx is what the guest sends, rx what it receives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimits {
    pub tx: DirectionLimits,
    pub rx: DirectionLimits,
}

impl RateLimits {
    pub fn is_none(&self) -> bool {
        self.tx.is_none() && self.rx.is_none()
    }
}

/// A bucket's state. Tokens are kept multiplied by the refill time in
/// nanoseconds, so refilling is exact integer arithmetic (no token is lost
/// to rounding however often it is asked) and may go negative (debt).
struct TokenBucket {
    size: i128,
    refill_ns: i128,
    /// Tokens × refill_ns; at most size × refill_ns.
    scaled: i128,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    fn new(b: &Bucket, now: Instant) -> Self {
        let size = i128::from(b.size);
        let refill_ns = b.refill.as_nanos().max(1) as i128;
        TokenBucket {
            size,
            refill_ns,
            scaled: size * refill_ns,
            burst: b.one_time_burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos() as i128;
        self.last = self.last.max(now);
        let full = self.size * self.refill_ns;
        self.scaled = self
            .scaled
            .saturating_add(elapsed.saturating_mul(self.size))
            .min(full);
    }

    /// How long until `n` tokens may be taken (zero: now). More than the
    /// bucket holds may be taken once it is full.
    fn wait_for(&self, n: u64) -> Duration {
        let Some(rest) = n.checked_sub(self.burst).filter(|&r| r > 0) else {
            return Duration::ZERO;
        };
        let need = i128::from(rest).min(self.size) * self.refill_ns;
        if self.scaled >= need {
            return Duration::ZERO;
        }
        let ns = (need - self.scaled + self.size - 1) / self.size;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.scaled -= i128::from(n - from_burst) * self.refill_ns;
    }
}

#[derive(Default)]
struct DirectionState {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    /// The last frame this way was held: the next hold is the same
    /// episode, not a new throttle.
    throttled: bool,
}

impl DirectionState {
    fn new(l: &DirectionLimits, now: Instant) -> Self {
        DirectionState {
            bandwidth: l.bandwidth.as_ref().map(|b| TokenBucket::new(b, now)),
            ops: l.ops.as_ref().map(|b| TokenBucket::new(b, now)),
            throttled: false,
        }
    }

    /// Pays for a frame of `bytes` now, or says how long to wait: both
    /// buckets are asked before either is charged, so a held frame is
    /// never paid for twice.
    fn pay(&mut self, bytes: u64, now: Instant) -> Duration {
        let mut wait = Duration::ZERO;
        for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(b) = bucket {
                b.refill(now);
                wait = wait.max(b.wait_for(n));
            }
        }
        if wait.is_zero() {
            for (bucket, n) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
                if let Some(b) = bucket {
                    b.take(n);
                }
            }
        }
        wait
    }
}

struct State {
    limits: RateLimits,
    tx: DirectionState,
    rx: DirectionState,
}

struct Shared {
    state: Mutex<State>,
    /// Times a direction began to be held back (an episode, however many
    /// frames wait in it).
    throttled_tx: AtomicU64,
    throttled_rx: AtomicU64,
}

/// A NIC's rate limiter: the stage ([`RateLimiter::stage`]) and a handle
/// to read and change its limits while the VM runs. Clones share it.
#[derive(Clone)]
pub struct RateLimiter {
    shared: Arc<Shared>,
}

/// How often each direction was held back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Throttled {
    pub tx: u64,
    pub rx: u64,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> Self {
        let now = Instant::now();
        RateLimiter {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    limits,
                    tx: DirectionState::new(&limits.tx, now),
                    rx: DirectionState::new(&limits.rx, now),
                }),
                throttled_tx: AtomicU64::new(0),
                throttled_rx: AtomicU64::new(0),
            }),
        }
    }

    /// The stage to put in the NIC's list.
    pub fn stage(&self) -> Box<dyn Stage> {
        Box::new(LimitStage(self.clone()))
    }

    pub fn limits(&self) -> RateLimits {
        crate::lock_or_recover(&self.shared.state).limits
    }

    /// New limits from now on, with full buckets (a frame held under the
    /// old ones is asked again within [`MAX_HOLD`]).
    pub fn set(&self, limits: RateLimits) {
        let now = Instant::now();
        let mut s = crate::lock_or_recover(&self.shared.state);
        s.limits = limits;
        s.tx = DirectionState::new(&limits.tx, now);
        s.rx = DirectionState::new(&limits.rx, now);
    }

    pub fn throttled(&self) -> Throttled {
        Throttled {
            tx: self.shared.throttled_tx.load(Ordering::Relaxed),
            rx: self.shared.throttled_rx.load(Ordering::Relaxed),
        }
    }

    fn frame(&self, dir: Direction, bytes: u64, now: Instant) -> Verdict {
        let mut s = crate::lock_or_recover(&self.shared.state);
        let (d, counter) = match dir {
            Direction::Tx => (&mut s.tx, &self.shared.throttled_tx),
            Direction::Rx => (&mut s.rx, &self.shared.throttled_rx),
        };
        let wait = d.pay(bytes, now);
        if wait.is_zero() {
            d.throttled = false;
            return Verdict::Pass;
        }
        if !d.throttled {
            d.throttled = true;
            counter.fetch_add(1, Ordering::Relaxed);
        }
        Verdict::Hold {
            until: now + wait.min(MAX_HOLD),
        }
    }
}

struct LimitStage(RateLimiter);

impl Stage for LimitStage {
    fn name(&self) -> &str {
        STAGE_NAME
    }

    fn frame(&mut self, dir: Direction, frame: &Frame<'_>, now: Instant) -> Verdict {
        self.0.frame(dir, frame.len() as u64, now)
    }
}

/// A NIC's limits as its owner changes them while the VM runs: the
/// limiter's stage joins the NIC's list at the first limit and leaves it
/// when no limit is left (a NIC without one takes no lock per frame).
pub struct LimitControl {
    stages: Stages,
    limiter: RateLimiter,
    /// The limiter's stage is in the list.
    active: Mutex<bool>,
}

impl LimitControl {
    pub fn new(stages: Stages) -> Self {
        LimitControl {
            stages,
            limiter: RateLimiter::new(RateLimits::default()),
            active: Mutex::new(false),
        }
    }

    /// Sets the NIC's limits. Refused (the limits unchanged) while vhost-net
    /// moves the NIC's frames: the kernel cannot hold them back for rvm.
    pub fn set(&self, limits: RateLimits) -> Result<(), StageError> {
        let mut active = crate::lock_or_recover(&self.active);
        if limits.is_none() {
            if *active {
                self.stages.remove(STAGE_NAME);
                *active = false;
            }
        } else if !*active {
            // Without limits yet, the stage passes every frame.
            self.stages.push(self.limiter.stage())?;
            *active = true;
        }
        self.limiter.set(limits);
        Ok(())
    }

    pub fn limits(&self) -> RateLimits {
        self.limiter.limits()
    }

    /// Throttle episodes since the NIC was made, whatever the changes.
    pub fn throttled(&self) -> Throttled {
        self.limiter.throttled()
    }
}

/// A rate as people write it: bits per second with an optional decimal
/// k, M or G and an optional `bit` (`16Mbit`, `100M`, `1G`, `500000`).
pub fn parse_rate(s: &str) -> Result<u64, LimitError> {
    let bad = || LimitError::BadRate(s.to_string());
    let t = s.strip_suffix("bit").unwrap_or(s);
    let (digits, mult) = split_suffix(
        t,
        &[
            ("k", 1_000),
            ("K", 1_000),
            ("M", 1_000_000),
            ("G", 1_000_000_000),
        ],
    );
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(mult).filter(|&r| r >= 8).ok_or_else(bad)
}

/// A size in bytes with an optional binary K, M or G (`64K`, `1M`).
pub fn parse_size(s: &str) -> Result<u64, LimitError> {
    let bad = || LimitError::BadSize(s.to_string());
    let (digits, mult) = split_suffix(
        s,
        &[
            ("K", 1 << 10),
            ("k", 1 << 10),
            ("M", 1 << 20),
            ("G", 1 << 30),
        ],
    );
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(mult).filter(|&b| b > 0).ok_or_else(bad)
}

/// Frames per second.
pub fn parse_pps(s: &str) -> Result<u64, LimitError> {
    s.parse::<u64>()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| LimitError::BadPps(s.to_string()))
}

fn split_suffix<'a>(s: &'a str, suffixes: &[(&str, u64)]) -> (&'a str, u64) {
    suffixes
        .iter()
        .find_map(|(suf, m)| s.strip_suffix(suf).map(|d| (d, *m)))
        .unwrap_or((s, 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Sends frames of `len` through `l` going `dir` on a clock that jumps
    /// to each hold's end, for `span` of that clock; returns the bytes
    /// passed and how many holds there were.
    fn drive(l: &RateLimiter, dir: Direction, len: u64, span: Duration) -> (u64, u64) {
        let start = Instant::now();
        let mut now = start;
        let (mut bytes, mut holds) = (0, 0);
        while now < start + span {
            match l.frame(dir, len, now) {
                Verdict::Pass => bytes += len,
                Verdict::Hold { until } => {
                    assert!(until > now, "a hold must end later than now");
                    assert!(until - now <= MAX_HOLD);
                    holds += 1;
                    now = until;
                }
                Verdict::Drop => panic!("a rate limit never drops"),
            }
        }
        (bytes, holds)
    }

    #[test]
    fn bandwidth_holds_the_rate_over_time_for_small_and_tso_frames() {
        for (rate, len) in [
            (16_000_000, 1514),
            (100_000_000, 1514),
            (1_000_000_000, 65_550),
            (16_000_000, 65_550),
        ] {
            let l = RateLimiter::new(RateLimits {
                tx: DirectionLimits {
                    bandwidth: Some(Bucket::bandwidth(rate, None).unwrap()),
                    ops: None,
                },
                ..RateLimits::default()
            });
            let (bytes, holds) = drive(&l, Direction::Tx, len, Duration::from_secs(10));
            let got = bytes as f64 * 8.0 / 10.0;
            // The first bucket is full: 10 s at the rate plus one burst,
            // plus at most one frame of debt.
            let burst = Bucket::bandwidth(rate, None).unwrap().size as f64 * 8.0 / 10.0;
            let want = rate as f64 + burst;
            assert!(
                (got - want).abs() <= want * 0.01 + len as f64 * 8.0 / 10.0,
                "{rate} bit/s with {len}-byte frames: got {got:.0}"
            );
            assert!(holds > 0);
            // RX is not limited: frame after frame passes at one instant.
            let now = Instant::now();
            assert!((0..1000).all(|_| l.frame(Direction::Rx, len, now) == Verdict::Pass));
        }
    }

    #[test]
    fn operations_limit_counts_frames_whatever_their_size() {
        let l = RateLimiter::new(RateLimits {
            rx: DirectionLimits {
                bandwidth: None,
                ops: Some(Bucket::operations(1000).unwrap()),
            },
            ..RateLimits::default()
        });
        let (bytes, _) = drive(&l, Direction::Rx, 60, Duration::from_secs(2));
        let frames = bytes / 60;
        // 2000 in 2 s plus the first full bucket (10).
        assert!((2000..=2011).contains(&frames), "{frames} frames");
    }

    #[test]
    fn both_buckets_must_pay_and_a_held_frame_is_not_charged() {
        // Bandwidth plenty, ops one per 10 ms: a frame held by ops must
        // not take bytes; so over a second the bytes are exactly frames ×
        // len, frames bounded by ops.
        let l = RateLimiter::new(RateLimits {
            tx: DirectionLimits {
                bandwidth: Some(Bucket::new(100_000, Duration::from_secs(1), 0).unwrap()),
                ops: Some(Bucket::new(1, ms(10), 0).unwrap()),
            },
            ..RateLimits::default()
        });
        let (bytes, holds) = drive(&l, Direction::Tx, 1000, Duration::from_secs(1));
        // One frame each 10 ms from the full bucket at 0: 100 in the second.
        assert_eq!(bytes, 100 * 1000);
        assert!(holds >= 100);
        // The bandwidth bucket paid for 100 frames, not for every ask:
        // 100,000 - 100,000 + 990 ms of refill leaves 99,000.
        let s = crate::lock_or_recover(&l.shared.state);
        let b = s.tx.bandwidth.as_ref().unwrap();
        assert!(
            b.scaled / b.refill_ns >= 98_000,
            "{}",
            b.scaled / b.refill_ns
        );
    }

    #[test]
    fn a_frame_larger_than_the_bucket_passes_when_full_and_leaves_debt() {
        let mut b = TokenBucket::new(
            &Bucket::new(1000, Duration::from_secs(1), 0).unwrap(),
            Instant::now(),
        );
        assert_eq!(b.wait_for(5000), Duration::ZERO);
        b.take(5000);
        // 4000 of debt plus a full bucket for the next big frame: 5 s.
        let w = b.wait_for(5000);
        assert!(
            w >= Duration::from_millis(4999) && w <= Duration::from_millis(5001),
            "{w:?}"
        );
    }

    #[test]
    fn the_one_time_burst_is_spent_first_and_never_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(&Bucket::new(100, Duration::from_secs(1), 1000).unwrap(), t0);
        assert_eq!(b.wait_for(1100), Duration::ZERO);
        b.take(1100);
        assert!(b.wait_for(1) > Duration::ZERO);
        b.refill(t0 + Duration::from_secs(10));
        // Refilled to its size, not to size + burst.
        assert_eq!(b.wait_for(100), Duration::ZERO);
        b.take(100);
        assert!(b.wait_for(1) > Duration::ZERO);
    }

    #[test]
    fn a_direction_held_counts_one_throttle_per_episode() {
        let l = RateLimiter::new(RateLimits {
            tx: DirectionLimits {
                bandwidth: None,
                ops: Some(Bucket::new(1, ms(100), 0).unwrap()),
            },
            ..RateLimits::default()
        });
        let t0 = Instant::now();
        assert_eq!(l.frame(Direction::Tx, 1, t0), Verdict::Pass);
        // Asked again and again while the hold lasts: one episode.
        for i in 0..5 {
            assert!(matches!(
                l.frame(Direction::Tx, 1, t0 + ms(i)),
                Verdict::Hold { .. }
            ));
        }
        assert_eq!(l.throttled(), Throttled { tx: 1, rx: 0 });
        assert_eq!(l.frame(Direction::Tx, 1, t0 + ms(100)), Verdict::Pass);
        assert!(matches!(
            l.frame(Direction::Tx, 1, t0 + ms(101)),
            Verdict::Hold { .. }
        ));
        assert_eq!(l.throttled().tx, 2);
    }

    #[test]
    fn a_long_wait_is_asked_again_within_max_hold_and_new_limits_apply_at_once() {
        let l = RateLimiter::new(RateLimits {
            tx: DirectionLimits {
                bandwidth: Some(Bucket::new(1000, Duration::from_secs(60), 0).unwrap()),
                ops: None,
            },
            ..RateLimits::default()
        });
        let t0 = Instant::now();
        assert_eq!(l.frame(Direction::Tx, 1000, t0), Verdict::Pass);
        let Verdict::Hold { until } = l.frame(Direction::Tx, 1000, t0) else {
            panic!("the empty bucket must hold");
        };
        assert_eq!(until, t0 + MAX_HOLD);
        l.set(RateLimits::default());
        assert_eq!(l.frame(Direction::Tx, 1000, until), Verdict::Pass);
        assert!(l.limits().is_none());
    }

    #[test]
    fn the_stage_is_in_the_list_exactly_while_there_is_a_limit() {
        let stages = Stages::new();
        let c = LimitControl::new(stages.clone());
        let one = RateLimits {
            rx: DirectionLimits {
                bandwidth: None,
                ops: Some(Bucket::operations(10).unwrap()),
            },
            ..RateLimits::default()
        };
        c.set(RateLimits::default()).unwrap();
        assert!(stages.is_empty());
        c.set(one).unwrap();
        c.set(one).unwrap();
        assert_eq!(stages.counters().len(), 1);
        assert_eq!(c.limits(), one);
        let frame = Frame::Bytes(&[0u8; 60]);
        let now = Instant::now();
        assert_eq!(
            stages.run(Direction::Rx, &frame, 0, now),
            super::super::stage::Outcome::Pass
        );
        assert!(matches!(
            stages.run(Direction::Rx, &frame, 0, now),
            super::super::stage::Outcome::Hold { .. }
        ));
        c.set(RateLimits::default()).unwrap();
        assert!(stages.is_empty());
        assert_eq!(c.throttled().rx, 1, "kept after the limit went");
        // vhost-net moves the frames: a limit is refused, nothing changes.
        stages.enter_kernel().unwrap();
        assert!(matches!(c.set(one), Err(StageError::KernelDataPath(_))));
        assert!(stages.is_empty() && c.limits().is_none());
    }

    #[test]
    fn rates_sizes_and_pps_parse_as_people_write_them() {
        assert_eq!(parse_rate("16Mbit"), Ok(16_000_000));
        assert_eq!(parse_rate("1Gbit"), Ok(1_000_000_000));
        assert_eq!(parse_rate("100M"), Ok(100_000_000));
        assert_eq!(parse_rate("500k"), Ok(500_000));
        assert_eq!(parse_rate("64000"), Ok(64_000));
        for bad in [
            "fast",
            "",
            "Mbit",
            "1.5M",
            "-3M",
            "4",
            "99999999999G",
            "16Mbits",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_size("256K"), Ok(256 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1500"), Ok(1500));
        for bad in ["0", "1.5K", "K", "big", "99999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(parse_pps("2000"), Ok(2000));
        assert!(parse_pps("0").is_err() && parse_pps("many").is_err());
    }

    #[test]
    fn bandwidth_bucket_from_a_shell_rate_refills_at_that_rate() {
        let b = Bucket::bandwidth(16_000_000, Some(256 << 10)).unwrap();
        assert_eq!(b.size, 256 << 10);
        assert!((b.rate() - 2_000_000.0).abs() < 1.0);
        let d = Bucket::bandwidth(1_000_000_000, None).unwrap();
        assert_eq!(d.size, 1_250_000);
        assert_eq!(Bucket::bandwidth(16_000, None).unwrap().size, 16 << 10);
        assert!(Bucket::bandwidth(7, None).is_err());
        assert!(Bucket::new(0, ms(10), 0).is_err());
        assert!(Bucket::new(10, Duration::from_micros(10), 0).is_err());
    }
}
