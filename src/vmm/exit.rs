//! Why a VM stopped, and the one place every thread reports it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset, `reboot=k`, or a KVM reset event).
    Reset,
    /// The guest powered off (a KVM shutdown event).
    PowerOff,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN); like a reset on real hardware.
    TripleFault,
    /// The owner asked the VM to stop (for the CLI: SIGINT or SIGTERM).
    Stopped,
    /// rvm itself failed; the string says how.
    Error(String),
}

impl ExitReason {
    /// Whether rvm should exit with status 0.
    pub fn is_clean(&self) -> bool {
        !matches!(self, ExitReason::Error(_))
    }
}

/// Shared by vCPUs, devices and the owner: the first reason recorded wins,
/// and the eventfd wakes whoever waits for the VM to end.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    stopping: AtomicBool,
    event: EventFd,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            stopping: AtomicBool::new(false),
            event: EventFd::new(libc::EFD_CLOEXEC)?,
        })
    }

    /// Records `reason` unless one is recorded already, and wakes the waiter.
    pub fn request(&self, reason: ExitReason) {
        let mut r = crate::lock_or_recover(&self.reason);
        if r.is_none() {
            *r = Some(reason);
        }
        self.stopping.store(true, Ordering::SeqCst);
        // An eventfd write only fails on counter overflow, which 1s cannot reach.
        let _ = self.event.write(1);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Blocks until some thread calls [`ExitSignal::request`] (or the
    /// eventfd is written from outside, as a signal handler does).
    pub fn wait(&self) -> ExitReason {
        loop {
            if let Some(r) = self.wait_timeout(None) {
                return r;
            }
        }
    }

    /// Like [`ExitSignal::wait`], but gives up after `timeout` (None: never).
    pub fn wait_timeout(&self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(r) = self.recorded() {
                return Some(r);
            }
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    // Rounded up so a short wait never becomes a busy loop.
                    left.as_millis().clamp(1, i32::MAX as u128) as i32
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, and the eventfd outlives the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Some(ExitReason::Error(format!("waiting for the VM: {e}")));
            }
            if n == 0 {
                continue;
            }
            // The eventfd is blocking, but readable now: this returns at once.
            match self.event.read() {
                Ok(_) => {
                    let r = self.recorded();
                    // Written directly (by a signal handler): an owner's stop.
                    return Some(r.unwrap_or_else(|| {
                        self.request(ExitReason::Stopped);
                        ExitReason::Stopped
                    }));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Some(ExitReason::Error(format!("waiting for the VM: {e}"))),
            }
        }
    }

    /// The reason recorded so far, if any.
    pub fn recorded(&self) -> Option<ExitReason> {
        crate::lock_or_recover(&self.reason).clone()
    }

    /// The raw eventfd, for async-signal-safe wakeups.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.event.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn first_reason_wins_and_wakes_the_waiter() {
        let s = Arc::new(ExitSignal::new().unwrap());
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait());
        s.request(ExitReason::Reset);
        s.request(ExitReason::Error("late".into()));
        assert_eq!(t.join().unwrap(), ExitReason::Reset);
        assert!(s.is_stopping());
    }

    #[test]
    fn a_raw_write_means_stopped() {
        let s = ExitSignal::new().unwrap();
        s.event.write(1).unwrap();
        assert_eq!(s.wait(), ExitReason::Stopped);
        assert!(s.is_stopping());
        assert!(ExitReason::TripleFault.is_clean());
        assert!(!ExitReason::Error(String::new()).is_clean());
    }

    #[test]
    fn wait_timeout_gives_up_then_sees_a_later_reason() {
        let s = Arc::new(ExitSignal::new().unwrap());
        let t0 = Instant::now();
        assert_eq!(s.wait_timeout(Some(Duration::from_millis(50))), None);
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let s2 = s.clone();
        let t = std::thread::spawn(move || s2.wait_timeout(Some(Duration::from_secs(10))));
        std::thread::sleep(Duration::from_millis(20));
        s.request(ExitReason::PowerOff);
        assert_eq!(t.join().unwrap(), Some(ExitReason::PowerOff));
        // Recorded reasons are returned again, without waiting.
        assert_eq!(
            s.wait_timeout(Some(Duration::ZERO)),
            Some(ExitReason::PowerOff)
        );
        assert_eq!(s.wait(), ExitReason::PowerOff);
    }
}
