//! A TAP device from /dev/net/tun, with what the `tun-tap` crate cannot
//! do: IFF_VNET_HDR, TUNSETVNETHDRSZ, TUNSETOFFLOAD and TUNSETSNDBUF.
//!
//! A TAP rvm creates is not persistent: the kernel deletes it when rvm's
//! fd closes, however rvm ends (even SIGKILL). A persistent TAP made by
//! someone else (`ip tuntap add`) is attached to and left as it was.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::backend::NetBackend;
use super::sys::{self, Ifreq};

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

// _IOW('T', n, int) and _IOR('T', n, unsigned int) from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETSNDBUF: libc::c_ulong = 0x4004_54d4;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

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
        if !valid_ifname(name) {
            return Err(TapError::BadName(name.into()));
        }
        let existed = sys::ifindex(name).is_ok();
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
        req.set_flags(flags);
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name.into()),
                Some(libc::EBUSY) => TapError::Busy(name.into()),
                Some(libc::EINVAL) => TapError::NotTap(name.into()),
                _ => TapError::Ioctl {
                    name: name.into(),
                    op: "TUNSETIFF",
                    source: e,
                },
            });
        }
        Ok(Tap {
            file,
            name: req.name(),
            created: !existed,
            vnet_hdr,
        })
    }

    /// Wraps a TAP fd the caller opened (sandbox platforms, unprivileged
    /// use). Its name and flags come from TUNGETIFF.
    pub fn from_fd(fd: OwnedFd, vnet_hdr: bool) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = Ifreq::new("");
        // SAFETY: TUNGETIFF writes an ifreq into `req`.
        if unsafe { libc::ioctl(raw, TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::BadFd(raw, std::io::Error::last_os_error()));
        }
        if req.flags() & IFF_TAP == 0 {
            return Err(TapError::BadFd(
                raw,
                std::io::Error::other("a TUN, not a TAP"),
            ));
        }
        if vnet_hdr && req.flags() & IFF_VNET_HDR == 0 {
            return Err(TapError::FdWithoutVnetHdr(raw));
        }
        // SAFETY: fcntl on an fd we own, with plain integer flags.
        unsafe {
            let fl = libc::fcntl(raw, libc::F_GETFL);
            libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Tap {
            file: File::from(fd),
            name: req.name(),
            created: false,
            // A vnet header the fd has must be used even if not asked for.
            vnet_hdr: req.flags() & IFF_VNET_HDR != 0,
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
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn readv(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller's iovecs describe writable memory that stays
        // mapped for the call (guest RAM held by the NIC worker); the
        // kernel checks the count against UIO_MAXIOV.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), iov.len() as i32) };
        if n < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn writev(&self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: as for readv; the kernel only reads the buffers.
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
