//! Log lines a guest can cause, bounded. Whatever a guest does (a ring full
//! of bad descriptors, a register written in a loop), each call site that
//! reports it prints at most [`LINES_PER_WINDOW`] lines per
//! [`WINDOW`]; the first line after a window in which some were held back
//! says how many. Use [`guest_log!`] for every message a guest's action
//! can trigger; host-side messages (setup, teardown) use `log` directly.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines one call site may print per window.
pub const LINES_PER_WINDOW: u32 = 10;
/// The window over which [`LINES_PER_WINDOW`] applies.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Milliseconds since rvm first logged a guest-triggered line: a
/// monotonic clock for the limiters.
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

struct Window {
    /// When the current window began (None: no line yet).
    start_ms: Option<u64>,
    printed: u32,
    suppressed: u64,
}

/// One call site's budget of lines.
pub struct RateLimit(Mutex<Window>);

impl RateLimit {
    pub const fn new() -> RateLimit {
        RateLimit(Mutex::new(Window {
            start_ms: None,
            printed: 0,
            suppressed: 0,
        }))
    }

    /// Whether a line may be printed at `now_ms`: Some(n) with the number
    /// of lines held back since the last one printed, or None (the line is
    /// counted as held back).
    pub fn admit(&self, now_ms: u64) -> Option<u64> {
        let mut w = crate::lock_or_recover(&self.0);
        match w.start_ms {
            Some(start) if now_ms.saturating_sub(start) < WINDOW.as_millis() as u64 => {}
            _ => {
                w.start_ms = Some(now_ms);
                w.printed = 0;
            }
        }
        if w.printed >= LINES_PER_WINDOW {
            w.suppressed += 1;
            return None;
        }
        w.printed += 1;
        Some(std::mem::take(&mut w.suppressed))
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit::new()
    }
}

/// `log::log!` for a message a guest's action triggers, bounded per call
/// site (see [`crate::logging`]): `guest_log!(log::Level::Warn, "...", args)`.
/// Costs nothing beyond `log_enabled!` when the level is off.
#[macro_export]
macro_rules! guest_log {
    ($level:expr, $($arg:tt)+) => {{
        static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::new();
        let level = $level;
        if log::log_enabled!(level) {
            match LIMIT.admit($crate::logging::now_ms()) {
                Some(0) => log::log!(level, $($arg)+),
                Some(held) => log::log!(
                    level,
                    "{} ({held} similar lines held back before this one)",
                    format_args!($($arg)+)
                ),
                None => {}
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_site_prints_a_bounded_number_of_lines_per_window_then_says_how_many_it_held() {
        let l = RateLimit::new();
        let t0 = 5_000;
        for i in 0..LINES_PER_WINDOW {
            assert_eq!(l.admit(t0 + u64::from(i)), Some(0), "line {i}");
        }
        for i in 0..1000 {
            assert_eq!(l.admit(t0 + 100 + i), None);
        }
        // Still inside the window: held back.
        assert_eq!(l.admit(t0 + WINDOW.as_millis() as u64 - 1), None);
        // The next window: the first line says how many were held back.
        let next = t0 + WINDOW.as_millis() as u64;
        assert_eq!(l.admit(next), Some(1001));
        assert_eq!(l.admit(next + 1), Some(0));
    }
}

/// The logger of the unit tests: keeps every record with the name of the
/// thread that logged it (so a test can count what one device's thread
/// printed while other tests run), and gives a thread the warnings it
/// logged itself ([`capture::warnings_of`]).
#[cfg(test)]
pub mod capture {
    use std::cell::RefCell;
    use std::sync::{Mutex, Once};

    static LINES: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

    thread_local! {
        static WARNINGS: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, r: &log::Record) {
            let message = r.args().to_string();
            if r.level() <= log::Level::Warn {
                WARNINGS.with(|w| {
                    if let Some(v) = w.borrow_mut().as_mut() {
                        v.push(message.clone());
                    }
                });
            }
            let thread = std::thread::current().name().unwrap_or("").to_string();
            let mut lines = crate::lock_or_recover(&LINES);
            if lines.len() < 1_000_000 {
                lines.push((thread, message));
            }
        }
        fn flush(&self) {}
    }

    /// Installs the capturing logger (once per test binary), every level on.
    pub fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            log::set_logger(&Capture).expect("another logger is installed in the unit tests");
            log::set_max_level(log::LevelFilter::Trace);
        });
    }

    /// The lines logged so far by threads whose name contains `thread`.
    pub fn lines_of(thread: &str) -> Vec<String> {
        crate::lock_or_recover(&LINES)
            .iter()
            .filter(|(t, _)| t.contains(thread))
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Runs `f` and returns the warnings (and errors) it logged on this
    /// thread.
    pub fn warnings_of(f: impl FnOnce()) -> Vec<String> {
        install();
        WARNINGS.with(|w| *w.borrow_mut() = Some(Vec::new()));
        f();
        WARNINGS.with(|w| w.borrow_mut().take().unwrap_or_default())
    }
}
