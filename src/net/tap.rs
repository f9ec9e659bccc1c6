//! A TAP device from /dev/net/tun, with what the `tun-tap` crate cannot
//! do: IFF_VNET_HDR, TUNSETVNETHDRSZ, TUNSETOFFLOAD and TUNSETSNDBUF.
//!
//! A TAP rvm creates is not persistent: the kernel deletes it when rvm's
//! fd closes, however rvm ends (even SIGKILL). A persistent TAP made by
//! someone else (`ip tuntap add`) is attached to and left as it was.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::backend::NetBackend;
use super::sys::{self, Ifreq};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_PERSIST: libc::c_short = 0x0800;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;

// _IOW('T', n, int) and _IOR('T', n, unsigned int) from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETSNDBUF: libc::c_ulong = 0x4004_54d4;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {0:?} is not a valid interface name (1 to 15 bytes, no '/' or spaces)")]
    BadName(String),
    #[error("cannot open /dev/net/tun ({0}): load the tun module with `modprobe tun`")]
    NoTunDevice(std::io::Error),
    #[error("no permission to create or attach TAP {0}: run rvm as root or with CAP_NET_ADMIN, or pre-create it with `ip tuntap add {0} mode tap user $USER`")]
    Permission(String),
    #[error("TAP {0} is in use by another process")]
    Busy(String),
    #[error("{0} exists and is not a TAP device (or its flags differ: try vnet_hdr=off)")]
    NotTap(String),
    #[error("{0} exists and is not a multi-queue TAP (or its flags differ: try vnet_hdr=off); queues=N needs one made with `ip tuntap add {0} mode tap multi_queue`, or a name that does not exist")]
    NotMultiQueue(String),
    #[error("fd {0} is not an open TAP device: {1}")]
    BadFd(RawFd, std::io::Error),
    #[error("TAP fd {0} was opened without IFF_VNET_HDR: pass vnet_hdr=off")]
    FdWithoutVnetHdr(RawFd),
    #[error("TAP {name}: {op} failed: {source}")]
    Ioctl {
        name: String,
        op: &'static str,
        source: std::io::Error,
    },
}

pub struct Tap {
    file: File,
    name: String,
    created: bool,
    vnet_hdr: bool,
    /// One queue of a multi-queue TAP (IFF_MULTI_QUEUE).
    multi_queue: bool,
}

/// Checks a Linux interface name (IFNAMSIZ is 16 with the NUL).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

impl Tap {
    /// Creates TAP `name`, or attaches to it if it exists (persistent).
    pub fn open(name: &str, vnet_hdr: bool) -> Result<Tap, TapError> {
        Self::open_with(name, vnet_hdr, false)
    }

    /// Creates the multi-queue TAP `name` (IFF_MULTI_QUEUE) with `queues`
    /// queues, or attaches them to it if it exists (persistent): one fd
    /// per queue, in queue order. One queue is an ordinary TAP, as
    /// [`Tap::open`] makes. The kernel spreads the frames for the guest
    /// over the queues attached, by flow.
    pub fn open_queues(name: &str, vnet_hdr: bool, queues: usize) -> Result<Vec<Tap>, TapError> {
        if queues <= 1 {
            return Self::open(name, vnet_hdr).map(|t| vec![t]);
        }
        let first = Self::open_with(name, vnet_hdr, true)?;
        let created = first.created;
        let mut taps = vec![first];
        for _ in 1..queues {
            let mut t = Self::open_with(name, vnet_hdr, true)?;
            // Attached to the one the first fd made or found.
            t.created = created;
            taps.push(t);
        }
        Ok(taps)
    }

    fn open_with(name: &str, vnet_hdr: bool, multi_queue: bool) -> Result<Tap, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::BadName(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES) | Some(libc::EPERM) => TapError::Permission(name.into()),
                _ => TapError::NoTunDevice(e),
            })?;
        let mut req = Ifreq::new(name);
        let mut flags = IFF_TAP | IFF_NO_PI;
        if vnet_hdr {
            flags |= IFF_VNET_HDR;
        }
        if multi_queue {
            flags |= IFF_MULTI_QUEUE;
        }
        req.set_flags(flags);
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name.into()),
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                Some(libc::EINVAL) if multi_queue => TapError::NotMultiQueue(name.into()),
                Some(libc::EINVAL) => TapError::NotTap(name.into()),
                _ => TapError::Ioctl {
                    name: name.into(),
                    op: "TUNSETIFF",
                    source: e,
                },
            });
        }
        let name = req.name();
        // The TAP itself says whether it is rvm's. One rvm just made is
        // never persistent, and one that existed without IFF_PERSIST has a
        // holder, so TUNSETIFF would have failed with EBUSY. Looking the
        // name up beforehand would race with whoever makes or deletes a
        // persistent TAP of that name in between.
        let flags = tun_flags(file.as_raw_fd()).map_err(|e| TapError::Ioctl {
            name: name.clone(),
            op: "TUNGETIFF",
            source: e,
        })?;
        Ok(Tap {
            file,
            name,
            created: flags & IFF_PERSIST == 0,
            vnet_hdr,
            multi_queue,
        })
    }

    /// Wraps a TAP fd the caller opened (sandbox platforms, unprivileged
    /// use). Its name and flags come from TUNGETIFF.
    pub fn from_fd(fd: OwnedFd, vnet_hdr: bool) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let req = tun_getiff(raw).map_err(|e| TapError::BadFd(raw, e))?;
        if req.flags() & IFF_TAP == 0 {
            return Err(TapError::BadFd(
                raw,
                std::io::Error::other("a TUN, not a TAP"),
            ));
        }
        if vnet_hdr && req.flags() & IFF_VNET_HDR == 0 {
            return Err(TapError::FdWithoutVnetHdr(raw));
        }
        let name = req.name();
        nonblocking_cloexec(raw).map_err(|e| TapError::Ioctl {
            name: name.clone(),
            op: "fcntl",
            source: e,
        })?;
        Ok(Tap {
            file: File::from(fd),
            name,
            created: false,
            // A vnet header the fd has must be used even if not asked for.
            vnet_hdr: req.flags() & IFF_VNET_HDR != 0,
            multi_queue: req.flags() & IFF_MULTI_QUEUE != 0,
        })
    }

    fn ioctl_int(
        &self,
        op: &'static str,
        req: libc::c_ulong,
        v: libc::c_int,
    ) -> Result<(), TapError> {
        // SAFETY: these TUN ioctls read one int through the pointer.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req, &v) };
        if r < 0 {
            return Err(self.err(op, std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn err(&self, op: &'static str, source: std::io::Error) -> TapError {
        TapError::Ioctl {
            name: self.name.clone(),
            op,
            source,
        }
    }

    /// Attaches this queue to its multi-queue TAP again (`on`), or
    /// detaches it: the kernel then sends it no frames and takes none
    /// from it, and the fd polls as an error until it is attached.
    pub fn set_queue_attached(&self, on: bool) -> Result<(), TapError> {
        let mut req = Ifreq::new("");
        req.set_flags(if on {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        });
        // SAFETY: TUNSETQUEUE reads one ifreq, which `req` is.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &mut req) } < 0 {
            return Err(self.err("TUNSETQUEUE", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    pub fn set_vnet_hdr_size(&self, size: i32) -> Result<(), TapError> {
        self.ioctl_int("TUNSETVNETHDRSZ", TUNSETVNETHDRSZ, size)
    }

    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // TUNSETOFFLOAD takes the flags as the argument itself.
        // SAFETY: an integer argument, no memory is passed.
        let r =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if r < 0 {
            return Err(self.err("TUNSETOFFLOAD", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    pub fn set_sndbuf(&self, bytes: i32) -> Result<(), TapError> {
        self.ioctl_int("TUNSETSNDBUF", TUNSETSNDBUF, bytes)
    }

    pub fn set_mtu(&self, mtu: u32) -> Result<(), TapError> {
        sys::set_mtu(&self.name, mtu).map_err(|e| self.err("SIOCSIFMTU", e))
    }

    pub fn mtu(&self) -> Result<u32, TapError> {
        sys::mtu(&self.name).map_err(|e| self.err("SIOCGIFMTU", e))
    }

    pub fn set_up(&self) -> Result<(), TapError> {
        sys::set_up(&self.name).map_err(|e| self.err("SIOCSIFFLAGS", e))
    }

    /// Takes the link down: undoes `set_up` on a TAP rvm did not create.
    pub fn set_down(&self) -> Result<(), TapError> {
        sys::set_down(&self.name).map_err(|e| self.err("SIOCSIFFLAGS", e))
    }

    pub fn is_up(&self) -> Result<bool, TapError> {
        sys::is_up(&self.name).map_err(|e| self.err("SIOCGIFFLAGS", e))
    }

    pub fn hwaddr(&self) -> Result<[u8; 6], TapError> {
        sys::hwaddr(&self.name).map_err(|e| self.err("SIOCGIFHWADDR", e))
    }

    pub fn set_hwaddr(&self, mac: [u8; 6]) -> Result<(), TapError> {
        sys::set_hwaddr(&self.name, mac).map_err(|e| self.err("SIOCSIFHWADDR", e))
    }

    pub fn ifindex(&self) -> Result<i32, TapError> {
        sys::ifindex(&self.name).map_err(|e| self.err("SIOCGIFINDEX", e))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether rvm created this TAP (and the kernel deletes it with rvm).
    pub fn created(&self) -> bool {
        self.created
    }

    /// Whether this is one queue of a multi-queue TAP.
    pub fn multi_queue(&self) -> bool {
        self.multi_queue
    }
}

/// An fd handed to rvm (fd=N) arrives blocking and inheritable, since it
/// had to survive the exec into rvm. The data path needs EAGAIN, and the
/// TAP must not leak into ifup/ifdown scripts or anything else rvm runs:
/// a holder that outlives rvm keeps a non-persistent TAP alive.
fn nonblocking_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL takes no argument.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: F_SETFL and F_SETFD take plain integer arguments.
    if fl < 0
        || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0
        || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// TUNGETIFF: the name and TUN flags of an attached /dev/net/tun fd.
fn tun_getiff(fd: RawFd) -> std::io::Result<Ifreq> {
    let mut req = Ifreq::new("");
    // SAFETY: TUNGETIFF writes one ifreq, which `req` is.
    if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(req)
}

fn tun_flags(fd: RawFd) -> std::io::Result<libc::c_short> {
    tun_getiff(fd).map(|r| r.flags())
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl NetBackend for Tap {
    unsafe fn readv(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller promises (NetBackend::readv) that the iovecs
        // describe writable memory that stays valid for the call; the
        // kernel checks the count against UIO_MAXIOV.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    unsafe fn writev(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller promises (NetBackend::writev) readable memory
        // for the call; the kernel only reads the buffers.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn vnet_hdr(&self) -> bool {
        self.vnet_hdr
    }

    fn configure_offloads(&self, hdr_len: usize, flags: u32) -> std::io::Result<()> {
        let io = |e: TapError| std::io::Error::other(e.to_string());
        self.set_vnet_hdr_size(hdr_len as i32).map_err(io)?;
        self.set_offload(flags).map_err(io)
    }

    fn set_queue_enabled(&self, on: bool) -> std::io::Result<()> {
        if !self.multi_queue {
            return Ok(());
        }
        match self.set_queue_attached(on) {
            // EINVAL: attached (or detached) already.
            Err(TapError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                Ok(())
            }
            Err(TapError::Ioctl { source, .. }) => Err(source),
            Err(e) => Err(std::io::Error::other(e.to_string())),
            Ok(()) => Ok(()),
        }
    }
}

/// Opens an fd number inherited from the caller (`fd=N`), taking it over.
pub fn take_fd(fd: RawFd) -> Result<OwnedFd, TapError> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(TapError::BadFd(fd, std::io::Error::last_os_error()));
    }
    // SAFETY: the fd is open (checked above) and the user handed it to rvm
    // with fd=N, so nothing else in rvm owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::backend::offload;
    use crate::net::test_util::*;
    use std::io::ErrorKind;

    #[test]
    fn bad_names_are_refused_and_nothing_is_made() {
        assert!(valid_ifname("exactly15-bytes"));
        assert!(valid_ifname("rvm%d"));
        in_fresh_netns(|| {
            for name in [
                "",
                "sixteen-bytes-xx",
                "a/b",
                "a b",
                "a:b",
                ".",
                "..",
                "a\tb",
            ] {
                assert!(!valid_ifname(name), "{name:?}");
                let err = expect_err(Tap::open(name, false));
                assert!(matches!(err, TapError::BadName(_)), "{name:?}: {err}");
                assert!(err.to_string().contains(&format!("{name:?}")), "{err}");
            }
            // Only lo: no interface was made under a cut or odd name.
            assert_eq!(ip(&["-o", "link"]).lines().count(), 1);
        });
    }

    #[test]
    fn created_tap_works_and_is_deleted_on_drop() {
        in_fresh_netns(|| {
            for vnet_hdr in [false, true] {
                let tap = Tap::open("rvmtap0", vnet_hdr).unwrap();
                assert_eq!(tap.name(), "rvmtap0");
                assert!(tap.created());
                assert_eq!(tap.vnet_hdr(), vnet_hdr);
                let kind = tun_details("rvmtap0");
                assert!(kind.starts_with("tun type tap pi off"), "{kind}");
                let want = if vnet_hdr {
                    "vnet_hdr on"
                } else {
                    "vnet_hdr off"
                };
                assert!(kind.contains(want), "{kind}");
                assert!(kind.contains("persist off"), "{kind}");
                assert_eq!(tap.ifindex().unwrap(), index_of("rvmtap0"));

                assert!(!is_up("rvmtap0"));
                assert!(!tap.is_up().unwrap());
                tap.set_up().unwrap();
                assert!(is_up("rvmtap0"));
                assert!(tap.is_up().unwrap());
                tap.set_down().unwrap();
                assert!(!is_up("rvmtap0"));
                tap.set_up().unwrap();
                tap.set_mtu(9000).unwrap();
                assert_eq!(tap.mtu().unwrap(), 9000);
                assert_eq!(mtu_of("rvmtap0"), 9000);
                tap.set_sndbuf(1 << 20).unwrap();
                if vnet_hdr {
                    tap.set_vnet_hdr_size(12).unwrap();
                    let all = offload::CSUM | offload::TSO4 | offload::TSO6 | offload::TSO_ECN;
                    tap.set_offload(all).unwrap();
                    tap.set_offload(0).unwrap();
                    tap.configure_offloads(12, offload::CSUM).unwrap();
                }
                drop(tap);
                assert!(gone_soon("rvmtap0"), "vnet_hdr={vnet_hdr}: TAP remains");
            }
        });
    }

    #[test]
    fn percent_d_names_are_numbered_by_the_kernel() {
        in_fresh_netns(|| {
            let a = Tap::open("rvm%d", false).unwrap();
            let b = Tap::open("rvm%d", false).unwrap();
            assert_eq!(a.name(), "rvm0");
            assert_eq!(b.name(), "rvm1");
            assert!(a.created() && b.created());
            assert!(exists("rvm0") && exists("rvm1"));
            assert_eq!(b.ifindex().unwrap(), index_of("rvm1"));
        });
    }

    #[test]
    fn kernel_rejections_name_the_tap_and_the_operation() {
        in_fresh_netns(|| {
            let tap = Tap::open("rvmtap1", true).unwrap();
            for (err, op) in [
                (tap.set_vnet_hdr_size(4).unwrap_err(), "TUNSETVNETHDRSZ"),
                (tap.set_sndbuf(0).unwrap_err(), "TUNSETSNDBUF"),
                (tap.set_mtu(70000).unwrap_err(), "SIOCSIFMTU"),
                (tap.set_mtu(u32::MAX).unwrap_err(), "SIOCSIFMTU"),
            ] {
                let msg = err.to_string();
                assert!(
                    msg.starts_with(&format!("TAP rvmtap1: {op} failed")),
                    "{msg}"
                );
            }
            assert_eq!(mtu_of("rvmtap1"), 1500);
            let err = tap.configure_offloads(4, 0).unwrap_err();
            assert!(err.to_string().contains("rvmtap1"), "{err}");
        });
    }

    #[test]
    fn persistent_tap_is_attached_and_survives_drop() {
        in_fresh_netns(|| {
            add_persistent_tap("rvmpers0");
            let tap = Tap::open("rvmpers0", true).unwrap();
            assert!(!tap.created());
            assert!(tap.vnet_hdr());
            assert!(tun_details("rvmpers0").contains("vnet_hdr on"));
            tap.set_vnet_hdr_size(12).unwrap();
            drop(tap);
            assert!(exists("rvmpers0"));
            assert!(tun_details("rvmpers0").contains("persist on"));
            // Released, it can be attached again.
            let tap = Tap::open("rvmpers0", false).unwrap();
            assert!(!tap.created());
        });
    }

    /// Whether a TAP is rvm's must come from the TAP itself: looking the
    /// name up first races with a program that makes or deletes a
    /// persistent TAP of that name in between.
    #[test]
    fn created_matches_the_kernel_while_the_name_comes_and_goes() {
        use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
        use std::time::{Duration, Instant};
        in_fresh_netns(|| {
            let stop = AtomicBool::new(false);
            let (mut ours, mut theirs, mut wrong) = (0, 0, Vec::new());
            std::thread::scope(|s| {
                // Threads share the namespace of the thread that made them.
                s.spawn(|| {
                    while !stop.load(Relaxed) {
                        toggle_persistent_tap("rvmrace0");
                    }
                });
                let start = Instant::now();
                while start.elapsed() < Duration::from_secs(2) && ours + theirs < 40 {
                    match Tap::open("rvmrace0", false) {
                        Ok(tap) => {
                            // Held by `tap`, the persistence cannot change.
                            let persistent = tun_flags_of(&tap) & libc::IFF_PERSIST != 0;
                            if persistent {
                                theirs += 1
                            } else {
                                ours += 1
                            }
                            if tap.created() == persistent {
                                wrong.push((tap.created(), persistent));
                            }
                        }
                        Err(TapError::Busy(_)) => {}
                        Err(e) => {
                            stop.store(true, Relaxed);
                            panic!("{e}");
                        }
                    }
                }
                stop.store(true, Relaxed);
            });
            assert!(
                wrong.is_empty(),
                "created() wrong {} times in {} opens; first (created, persistent): {:?}",
                wrong.len(),
                ours + theirs,
                wrong[0]
            );
            // Other tests cover each case without a race; this one
            // needs enough opens to meet the race at all.
            assert!(ours + theirs >= 20, "only {ours} + {theirs} opens");
        });
    }

    #[test]
    fn second_open_is_busy() {
        in_fresh_netns(|| {
            let first = Tap::open("rvmbusy0", false).unwrap();
            let err = expect_err(Tap::open("rvmbusy0", false));
            assert!(matches!(err, TapError::Busy(_)), "{err}");
            // tests/net.rs looks for "in use by another process".
            assert_eq!(err.to_string(), "TAP rvmbusy0 is in use by another process");
            // The holder is unharmed.
            assert!(exists("rvmbusy0"));
            assert_eq!(first.ifindex().unwrap(), index_of("rvmbusy0"));
        });
    }

    #[test]
    fn existing_non_tap_device_is_named() {
        in_fresh_netns(|| {
            let err = expect_err(Tap::open("lo", false));
            assert!(matches!(err, TapError::NotTap(_)), "{err}");
            // tests/net.rs looks for "not a TAP".
            assert!(
                err.to_string()
                    .starts_with("lo exists and is not a TAP device"),
                "{err}"
            );
            add_bridge("rvmbr0");
            let err = expect_err(Tap::open("rvmbr0", true));
            assert!(matches!(err, TapError::NotTap(_)), "{err}");
            assert!(exists("rvmbr0"));
            // A TUN is not a TAP either.
            let _tun = raw_tun("rvmtun0", libc::IFF_TUN | libc::IFF_NO_PI);
            let err = expect_err(Tap::open("rvmtun0", false));
            assert!(matches!(err, TapError::NotTap(_)), "{err}");
        });
    }

    #[test]
    fn no_cap_net_admin_gives_the_permission_hint() {
        in_fresh_netns(|| {
            drop_cap_net_admin();
            let err = expect_err(Tap::open("rvmperm0", false));
            assert!(matches!(err, TapError::Permission(_)), "{err}");
            let msg = err.to_string();
            assert!(msg.contains("CAP_NET_ADMIN"), "{msg}");
            assert!(
                msg.contains("`ip tuntap add rvmperm0 mode tap user $USER`"),
                "{msg}"
            );
            assert!(!exists("rvmperm0"));
        });
    }

    #[test]
    fn from_fd_learns_name_and_vnet_hdr() {
        in_fresh_netns(|| {
            let vnet = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
            let tap = Tap::from_fd(raw_tun("rvmfd0", vnet), true).unwrap();
            assert_eq!(tap.name(), "rvmfd0");
            assert!(tap.vnet_hdr());
            assert!(!tap.created());
            let (fd_fl, fl) = fd_flags(&tap);
            assert_ne!(fl & libc::O_NONBLOCK, 0, "the data path relies on EAGAIN");
            // raw_tun leaves the fd inheritable, as a caller passing fd=N must.
            assert_ne!(fd_fl & libc::FD_CLOEXEC, 0, "scripts would inherit the TAP");
            let mut buf = [0u8; 64];
            // SAFETY: `buf` is a local buffer borrowed for the call.
            let err = unsafe { tap.readv(&[iov_mut(&mut buf)]) }.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::WouldBlock);

            // A vnet header the fd has is used even when not asked for.
            let tap = Tap::from_fd(raw_tun("rvmfd1", vnet), false).unwrap();
            assert!(tap.vnet_hdr());

            let fd = raw_tun("rvmfd2", libc::IFF_TAP | libc::IFF_NO_PI);
            let raw = fd.as_raw_fd();
            let err = expect_err(Tap::from_fd(fd, true));
            assert!(
                matches!(err, TapError::FdWithoutVnetHdr(n) if n == raw),
                "{err}"
            );
            assert!(err.to_string().contains("vnet_hdr=off"), "{err}");

            let fd = raw_tun("rvmfd3", libc::IFF_TUN | libc::IFF_NO_PI);
            let err = expect_err(Tap::from_fd(fd, false));
            assert!(matches!(err, TapError::BadFd(..)), "{err}");
            assert!(err.to_string().contains("a TUN, not a TAP"), "{err}");

            // /dev/net/tun before TUNSETIFF, and something else entirely.
            for path in ["/dev/net/tun", "/dev/null"] {
                let fd: OwnedFd = File::open(path).unwrap().into();
                let err = expect_err(Tap::from_fd(fd, false));
                assert!(matches!(err, TapError::BadFd(..)), "{path}: {err}");
            }
        });
    }

    #[test]
    fn take_fd_refuses_descriptors_that_are_not_open() {
        for fd in [-1, 1 << 30] {
            let err = take_fd(fd).unwrap_err();
            assert!(matches!(err, TapError::BadFd(n, _) if n == fd), "{err}");
        }
        let f = File::open("/dev/null").unwrap();
        let raw = std::os::fd::IntoRawFd::into_raw_fd(f);
        assert_eq!(take_fd(raw).unwrap().as_raw_fd(), raw);
    }

    #[test]
    fn writev_sends_one_whole_frame_and_readv_would_block() {
        in_fresh_netns(|| {
            let tap = Tap::open("rvmdp0", false).unwrap();
            // No IPv6 on it: an interface coming up sends router
            // solicitations and MLD reports, which the readv below would
            // find (it did, in most runs on a loaded machine).
            std::fs::write("/proc/sys/net/ipv6/conf/rvmdp0/disable_ipv6", "1").unwrap();
            tap.set_up().unwrap();
            let before = rx_stats("rvmdp0");
            let frame = test_frame(0x5a);
            let (head, tail) = frame.split_at(6);
            // SAFETY: `frame` is a live buffer borrowed for the call.
            let sent = unsafe { tap.writev(&[iov(head), iov(tail)]) };
            assert_eq!(sent.unwrap(), frame.len());
            // The host received it as one frame of that length.
            let after = rx_stats("rvmdp0");
            assert_eq!(after.1, before.1 + 1);
            assert_eq!(after.0, before.0 + frame.len() as u64);
            // Nothing is queued for the guest: the namespace sends nothing
            // to a TAP without addresses so soon.
            let mut buf = [0u8; 128];
            // SAFETY: `buf` is a local buffer borrowed for the call.
            let err = unsafe { tap.readv(&[iov_mut(&mut buf)]) }.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::WouldBlock);
        });
    }

    /// A UDP/IPv4 frame from source port `sport`, broadcast (so a bridge
    /// floods it): one flow per port.
    fn udp_frame(sport: u16) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x10, 0x08, 0x00]);
        // IPv4, 20-byte header, 28 bytes in all, UDP, 10.0.0.1 -> 10.0.0.2.
        f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&[0x13, 0x88, 0, 8, 0, 0]);
        // A valid header checksum: a host with br_netfilter drops others.
        let sum = f[14..34]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum::<u32>();
        let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        // Padded to Ethernet's 60-byte minimum.
        f.resize(60, 0);
        f
    }

    /// How many frames each of `queues` can read now.
    fn frames_per_queue(queues: &[Tap]) -> Vec<usize> {
        std::thread::sleep(std::time::Duration::from_millis(100));
        queues
            .iter()
            .map(|q| {
                let mut n = 0;
                let mut buf = [0u8; 2048];
                // SAFETY: `buf` is a live local borrowed for the call.
                while let Ok(len) = unsafe { q.readv(&[iov_mut(&mut buf)]) } {
                    // Only the test's frames (UDP to port 5000), not the
                    // namespace's own chatter.
                    if len >= 38 && buf[12..14] == [0x08, 0x00] && buf[36..38] == [0x13, 0x88] {
                        n += 1;
                    }
                }
                n
            })
            .collect()
    }

    #[test]
    fn a_multi_queue_tap_spreads_flows_and_a_detached_queue_gets_none() {
        in_fresh_netns(|| {
            add_bridge("rvmbr9");
            let sender = Tap::open("rvmsend9", false).unwrap();
            let queues = Tap::open_queues("rvmmq9", false, 4).unwrap();
            assert_eq!(queues.len(), 4);
            assert!(queues.iter().all(|q| q.created() && q.name() == "rvmmq9"));
            assert!(
                tun_details("rvmmq9").contains("multi_queue"),
                "{}",
                tun_details("rvmmq9")
            );
            for (t, br) in [("rvmsend9", "rvmbr9"), ("rvmmq9", "rvmbr9")] {
                ip(&["link", "set", t, "master", br]);
                ip(&["link", "set", t, "up"]);
            }
            let send_flows = || {
                for sport in 0..64u16 {
                    let f = udp_frame(1000 + sport);
                    // SAFETY: `f` is a live local borrowed for the call.
                    unsafe { sender.writev(&[iov(&f)]) }.unwrap();
                }
            };
            send_flows();
            let spread = frames_per_queue(&queues);
            assert_eq!(spread.iter().sum::<usize>(), 64, "{spread:?}");
            // 64 flows hashed over 4 queues: each gets some (all but
            // certainly: one empty has a chance of 4 * (3/4)^64).
            assert!(spread.iter().all(|&n| n > 0), "{spread:?}");
            for q in &queues[1..] {
                q.set_queue_attached(false).unwrap();
            }
            send_flows();
            assert_eq!(frames_per_queue(&queues), vec![64, 0, 0, 0]);
            queues[3].set_queue_attached(true).unwrap();
            send_flows();
            let spread = frames_per_queue(&queues);
            assert_eq!(spread[0] + spread[3], 64, "{spread:?}");
            assert!(spread[3] > 0, "{spread:?}");
            // Deleted with the last fd, like a one-queue TAP rvm made.
            drop(queues);
            assert!(gone_soon("rvmmq9"));
        });
    }

    #[test]
    fn queues_on_a_single_queue_tap_say_how_to_make_a_multi_queue_one() {
        in_fresh_netns(|| {
            add_persistent_tap("rvmsq0");
            let err = Tap::open_queues("rvmsq0", false, 2).err().unwrap();
            assert!(matches!(err, TapError::NotMultiQueue(_)), "{err}");
            assert!(
                err.to_string()
                    .contains("ip tuntap add rvmsq0 mode tap multi_queue"),
                "{err}"
            );
            // A persistent multi-queue TAP is attached to, queue by queue.
            ip(&[
                "tuntap",
                "add",
                "dev",
                "rvmmq1",
                "mode",
                "tap",
                "multi_queue",
            ]);
            let q = Tap::open_queues("rvmmq1", false, 3).unwrap();
            assert!(q.iter().all(|t| !t.created()));
            drop(q);
            assert!(exists("rvmmq1"));
        });
    }
}
