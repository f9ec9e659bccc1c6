//! The seccomp filters rvm's threads run under: the guest-facing ones
//! (the vCPU threads, the NIC threads and the CLI's stdin thread), and the
//! control API's HTTP thread, which reads what its clients write. They handle what
//! the guest writes, so they get only the system calls that work needs.
//! The thread that owns the VM (the caller's, in a library) is left alone:
//! it runs ifdown scripts and undoes the host setup at exit.
//!
//! Anything else fails with EPERM rather than killing rvm: a refused call
//! looks like any failed call to the code that made it, which reports it,
//! and the guest keeps running; an attacker who took over a thread gets
//! nothing more from it. `SeccompMode::Log` allows everything but has the
//! kernel log what the filter would refuse (`dmesg`, audit type 1326), to
//! find a call a new code path needs.

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Whether and how rvm's threads are confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// Calls outside the list fail with EPERM.
    #[default]
    Enforce,
    /// Calls outside the list are allowed and logged by the kernel.
    Log,
    /// No filter.
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" | "enforce" => Ok(SeccompMode::Enforce),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            _ => Err(format!("'{s}' is not a seccomp mode (on, log or off)")),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SeccompMode::Enforce => "on",
            SeccompMode::Log => "log",
            SeccompMode::Off => "off",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// A compiled filter, shared by the threads of one VM.
#[derive(Clone)]
pub struct ThreadFilter(Arc<BpfProgram>);

/// What the threads do, and the calls it takes:
/// - KVM_RUN and device emulation: ioctl (KVM, TAP offloads, vhost-net
///   set-up at DRIVER_OK; see the rule in `new`), read/write on eventfds,
///   the console and TAPs;
/// - the NIC data path: readv/writev, epoll; send/recv and their msg
///   forms on a user-mode network's socket;
/// - starting a NIC worker at DRIVER_OK (from a vCPU thread): eventfds,
///   an epoll instance, a timerfd (a stage's hold), a thread (clone3,
///   mmap, mprotect, rseq, ...);
/// - the e1000's link poll: SIOCGIFFLAGS on an AF_UNIX datagram socket;
/// - what Rust's runtime does in any thread: futex, memory, signals
///   (the vCPU kick), time, thread names, exit.
const ALLOWED: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_eventfd2,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sigaltstack,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// ioctl type bytes (bits 8-15 of the request): KVM, vhost, and 'T',
/// which TUN shares with the terminal ioctls.
const KVMIO: u8 = 0xae;
const VHOST_VIRTIO: u8 = 0xaf;
const TUN_AND_TTY: u8 = b'T';

/// What the control API's HTTP thread adds to the common calls: taking
/// connections on its listening socket and ending them. It opens nothing
/// and runs nothing; what a request asks for is done by another thread.
const API_EXTRA: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

fn arg_is(index: u8, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

fn refusal(mode: SeccompMode) -> Option<SeccompAction> {
    match mode {
        SeccompMode::Off => None,
        SeccompMode::Enforce => Some(SeccompAction::Errno(libc::EPERM as u32)),
        SeccompMode::Log => Some(SeccompAction::Log),
    }
}

/// The calls of every confined thread, the thread-name prctl among them.
fn common_rules() -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    // Thread names (set by the new thread itself), and reading the mode.
    rules.insert(
        libc::SYS_prctl,
        vec![
            SeccompRule::new(vec![arg_is(0, libc::PR_SET_NAME as u64)?])?,
            SeccompRule::new(vec![arg_is(0, libc::PR_GET_SECCOMP as u64)?])?,
        ],
    );
    Ok(rules)
}

impl ThreadFilter {
    /// The control API's HTTP thread's filter for `mode` (None for
    /// [`SeccompMode::Off`]): the common calls and `API_EXTRA`; no
    /// ioctl, no new socket, no file, no program.
    pub fn api(mode: SeccompMode) -> Result<Option<ThreadFilter>, SeccompError> {
        let Some(refuse) = refusal(mode) else {
            return Ok(None);
        };
        let mut rules = common_rules()?;
        rules.extend(API_EXTRA.iter().map(|&nr| (nr, Vec::new())));
        let filter = SeccompFilter::new(rules, refuse, SeccompAction::Allow, TargetArch::x86_64)?;
        Ok(Some(ThreadFilter(Arc::new(filter.try_into()?))))
    }

    /// Compiles the filter for `mode`; None for [`SeccompMode::Off`].
    pub fn new(mode: SeccompMode) -> Result<Option<ThreadFilter>, SeccompError> {
        let Some(refuse) = refusal(mode) else {
            return Ok(None);
        };
        let mut rules = common_rules()?;
        // ioctls of KVM, vhost-net and TUN/terminals (by the type byte of
        // the request number), and the link poll's SIOCGIFFLAGS.
        let mut ioctls = Vec::new();
        for ty in [KVMIO, VHOST_VIRTIO, TUN_AND_TTY] {
            ioctls.push(SeccompRule::new(vec![SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(0xff00),
                u64::from(ty) << 8,
            )?])?);
        }
        ioctls.push(SeccompRule::new(vec![arg_is(1, libc::SIOCGIFFLAGS)?])?);
        rules.insert(libc::SYS_ioctl, ioctls);
        // Only the datagram socket of the e1000's link poll.
        rules.insert(
            libc::SYS_socket,
            vec![SeccompRule::new(vec![arg_is(0, libc::AF_UNIX as u64)?])?],
        );
        let filter = SeccompFilter::new(rules, refuse, SeccompAction::Allow, TargetArch::x86_64)?;
        Ok(Some(ThreadFilter(Arc::new(filter.try_into()?))))
    }

    /// Confines the calling thread. Call it on threads started by the
    /// VM's owner: a thread that a confined one starts (a NIC worker
    /// started by a vCPU at DRIVER_OK) inherits the filter already. A
    /// filter the owner's thread runs under (an embedder's own) stays in
    /// force as well: the kernel applies both.
    pub fn confine_current_thread(&self) -> Result<(), SeccompError> {
        seccompiler::apply_filter(&self.0)?;
        Ok(())
    }
}

/// Whether the calling thread runs under a seccomp filter.
pub fn confined() -> bool {
    // SAFETY: PR_GET_SECCOMP takes no pointer and only reads the mode.
    unsafe { libc::prctl(libc::PR_GET_SECCOMP) == 2 }
}

/// Confines the calling thread with `filter`, if any, logging a failure
/// (the thread then runs unconfined rather than not at all).
pub fn confine(filter: Option<&ThreadFilter>, thread: &str) {
    if let Some(f) = filter {
        if let Err(e) = f.confine_current_thread() {
            log::warn!("{thread}: {e}; running without the seccomp filter");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse(), Ok(SeccompMode::Enforce));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert_eq!("off".parse(), Ok(SeccompMode::Off));
        assert!("maybe".parse::<SeccompMode>().is_err());
        assert!(ThreadFilter::new(SeccompMode::Off).unwrap().is_none());
    }

    /// A confined thread is refused what rvm's threads never need
    /// (opening files, inet sockets, running programs) with EPERM, keeps
    /// what they do need, and a thread it starts inherits the filter.
    #[test]
    fn a_confined_thread_is_refused_forbidden_calls_and_keeps_working() {
        let filter = ThreadFilter::new(SeccompMode::Enforce).unwrap().unwrap();
        std::thread::spawn(move || {
            assert!(!confined());
            filter.confine_current_thread().unwrap();
            assert!(confined());
            let err = std::fs::File::open("/etc/hostname").unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "open: {err}");
            // SAFETY: socket(2) with constant arguments; a success is closed.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            assert_eq!((fd, errno), (-1, Some(libc::EPERM)), "AF_INET socket");
            let err = std::process::Command::new("/bin/true")
                .status()
                .unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "spawn: {err}");
            // The e1000's link poll socket and ioctl, eventfds and a child
            // thread work; other socket ioctls do not.
            // SAFETY: as above.
            let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM, 0) };
            assert!(fd >= 0);
            let mut ifr = [0u8; 40];
            ifr[..2].copy_from_slice(b"lo");
            // SAFETY: both ioctls read and write a 40-byte ifreq, `ifr`.
            let flags = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, ifr.as_mut_ptr()) };
            assert_eq!(
                flags,
                0,
                "SIOCGIFFLAGS: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: as above.
            let index = unsafe { libc::ioctl(fd, libc::SIOCGIFINDEX, ifr.as_mut_ptr()) };
            let errno = std::io::Error::last_os_error().raw_os_error();
            assert_eq!((index, errno), (-1, Some(libc::EPERM)), "SIOCGIFINDEX");
            // SAFETY: closing the fd just opened.
            unsafe { libc::close(fd) };
            let e = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
            e.write(1).unwrap();
            assert_eq!(e.read().unwrap(), 1);
            let child = std::thread::Builder::new()
                .name("child".into())
                .spawn(confined)
                .unwrap();
            assert!(
                child.join().unwrap(),
                "the child thread inherits the filter"
            );
        })
        .join()
        .unwrap();
        // Other threads are untouched.
        assert!(!confined());
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }
}
