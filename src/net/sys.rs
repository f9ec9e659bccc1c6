//! The few interface ioctls rvm needs (index, MTU, up, hardware address,
//! bridge ports), on a throwaway datagram socket of the calling thread's network namespace.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const SIOCBRDELIF: libc::c_ulong = 0x89a3;

/// struct ifreq: a name and a 24-byte union (flags, index, MTU...).
#[repr(C)]
pub struct Ifreq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl Ifreq {
    /// `name` must already be valid (see `tap::valid_ifname`); longer
    /// names are cut, never overflow.
    pub fn new(name: &str) -> Self {
        let mut r = Ifreq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }

    pub fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }

    pub fn set_flags(&mut self, f: libc::c_short) {
        self.data[..2].copy_from_slice(&f.to_ne_bytes());
    }

    pub fn flags(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn set_int(&mut self, v: libc::c_int) {
        self.data[..4].copy_from_slice(&v.to_ne_bytes());
    }

    fn int(&self) -> libc::c_int {
        libc::c_int::from_ne_bytes([self.data[0], self.data[1], self.data[2], self.data[3]])
    }
}

fn socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl(req: libc::c_ulong, ifr: &mut Ifreq) -> std::io::Result<()> {
    let s = socket()?;
    // SAFETY: every request used here reads and/or writes one ifreq.
    if unsafe { libc::ioctl(s.as_raw_fd(), req, ifr as *mut Ifreq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn ifindex(name: &str) -> std::io::Result<i32> {
    let mut r = Ifreq::new(name);
    ioctl(libc::SIOCGIFINDEX, &mut r)?;
    Ok(r.int())
}

pub fn mtu(name: &str) -> std::io::Result<u32> {
    let mut r = Ifreq::new(name);
    ioctl(libc::SIOCGIFMTU, &mut r)?;
    Ok(r.int() as u32)
}

pub fn set_mtu(name: &str, mtu: u32) -> std::io::Result<()> {
    let mut r = Ifreq::new(name);
    r.set_int(mtu as libc::c_int);
    ioctl(libc::SIOCSIFMTU, &mut r)
}

/// Whether the link is administratively up (IFF_UP).
pub fn is_up(name: &str) -> std::io::Result<bool> {
    let mut r = Ifreq::new(name);
    ioctl(libc::SIOCGIFFLAGS, &mut r)?;
    Ok(r.flags() & libc::IFF_UP as libc::c_short != 0)
}

fn set_up_flag(name: &str, up: bool) -> std::io::Result<()> {
    let mut r = Ifreq::new(name);
    ioctl(libc::SIOCGIFFLAGS, &mut r)?;
    let f = if up {
        r.flags() | libc::IFF_UP as libc::c_short
    } else {
        r.flags() & !(libc::IFF_UP as libc::c_short)
    };
    if f == r.flags() {
        // Already so: no SIOCSIFFLAGS, which needs CAP_NET_ADMIN even
        // when it changes nothing (a user's persistent TAP, already up).
        return Ok(());
    }
    r.set_flags(f);
    ioctl(libc::SIOCSIFFLAGS, &mut r)
}

pub fn set_up(name: &str) -> std::io::Result<()> {
    set_up_flag(name, true)
}

pub fn set_down(name: &str) -> std::io::Result<()> {
    set_up_flag(name, false)
}

/// The interface's hardware (Ethernet) address.
pub fn hwaddr(name: &str) -> std::io::Result<[u8; 6]> {
    let mut r = Ifreq::new(name);
    ioctl(libc::SIOCGIFHWADDR, &mut r)?;
    // ifr_hwaddr is a struct sockaddr: the family, then the address.
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&r.data[2..8]);
    Ok(mac)
}

/// Sets the interface's Ethernet address.
pub fn set_hwaddr(name: &str, mac: [u8; 6]) -> std::io::Result<()> {
    let mut r = Ifreq::new(name);
    r.data[..2].copy_from_slice(&libc::ARPHRD_ETHER.to_ne_bytes());
    r.data[2..8].copy_from_slice(&mac);
    ioctl(libc::SIOCSIFHWADDR, &mut r)
}

/// Adds (or removes) interface `port` to (from) bridge `bridge`.
pub fn bridge_port(bridge: &str, port: i32, add: bool) -> std::io::Result<()> {
    let mut r = Ifreq::new(bridge);
    r.set_int(port);
    ioctl(if add { SIOCBRADDIF } else { SIOCBRDELIF }, &mut r)
}

/// Whether `name` is a bridge in this network namespace: SIOCBRADDIF of
/// a non-bridge fails with EOPNOTSUPP, which `bridge_port` reports.
pub fn exists(name: &str) -> bool {
    ifindex(name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::test_util::{self as t, add_bridge, in_bridge, in_fresh_netns, index_of};

    #[test]
    fn ifreq_names_are_cut_never_overflowed() {
        assert_eq!(Ifreq::new("rvm0").name(), "rvm0");
        assert_eq!(Ifreq::new("").name(), "");
        // IFNAMSIZ - 1 bytes are kept, leaving room for the NUL.
        assert_eq!(Ifreq::new("0123456789abcdefghij").name(), "0123456789abcde");
        let mut r = Ifreq::new("x");
        r.set_flags(-2);
        assert_eq!(r.flags(), -2);
        assert_eq!(r.name(), "x");
    }

    #[test]
    fn interface_ioctls_act_in_the_thread_namespace() {
        in_fresh_netns(|| {
            assert!(exists("lo"));
            assert!(!exists("rvmnone"));
            assert_eq!(
                ifindex("rvmnone").unwrap_err().raw_os_error(),
                Some(libc::ENODEV)
            );
            assert_eq!(ifindex("lo").unwrap(), index_of("lo"));
            assert_eq!(mtu("lo").unwrap(), t::mtu_of("lo"));
            set_mtu("lo", 1400).unwrap();
            assert_eq!(t::mtu_of("lo"), 1400);
            assert!(!t::is_up("lo"));
            assert!(!is_up("lo").unwrap());
            set_up("lo").unwrap();
            assert!(t::is_up("lo"));
            assert!(is_up("lo").unwrap());
            set_down("lo").unwrap();
            assert!(!t::is_up("lo"));
            t::add_persistent_tap("rvmt4");
            set_hwaddr("rvmt4", [0xfe, 1, 2, 3, 4, 5]).unwrap();
            assert!(t::ip(&["link", "show", "rvmt4"]).contains("fe:01:02:03:04:05"));
            assert_eq!(hwaddr("rvmt4").unwrap(), [0xfe, 1, 2, 3, 4, 5]);
            assert_eq!(
                set_hwaddr("rvmnone", [2, 0, 0, 0, 0, 1])
                    .unwrap_err()
                    .raw_os_error(),
                Some(libc::ENODEV)
            );
        });
    }

    #[test]
    fn bridge_port_adds_removes_and_reports_errno() {
        in_fresh_netns(|| {
            add_bridge("rvmbr5");
            t::add_persistent_tap("rvmt5");
            let idx = index_of("rvmt5");
            bridge_port("rvmbr5", idx, true).unwrap();
            assert!(in_bridge("rvmt5", "rvmbr5"));
            bridge_port("rvmbr5", idx, false).unwrap();
            assert!(!in_bridge("rvmt5", "rvmbr5"));
            // What bridge.rs turns into its messages.
            let errno = |br: &str, add| bridge_port(br, idx, add).unwrap_err().raw_os_error();
            assert!(
                matches!(
                    errno("lo", true),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ),
                "{:?}",
                errno("lo", true)
            );
            assert_eq!(errno("rvmnobr", true), Some(libc::ENODEV));
            assert_eq!(errno("rvmnobr", false), Some(libc::ENODEV));
            // Not a port (any more): EINVAL, which BridgePort::drop ignores.
            assert_eq!(errno("rvmbr5", false), Some(libc::EINVAL));
        });
    }
}
