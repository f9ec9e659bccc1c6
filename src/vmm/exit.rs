//! Why a VM stopped, and the one place every thread reports it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

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
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
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
            if let Some(r) = self
                .reason
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                return r;
            }
            match self.event.read() {
                Ok(_) => {
                    let r = self
                        .reason
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    // Written directly (by a signal handler): an owner's stop.
                    return r.unwrap_or_else(|| {
                        self.request(ExitReason::Stopped);
                        ExitReason::Stopped
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return ExitReason::Error(format!("waiting for the VM: {e}")),
            }
        }
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
}
