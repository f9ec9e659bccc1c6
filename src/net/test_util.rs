//! Helpers shared by the host-networking unit tests.
//!
//! Every test that touches interfaces runs its body through
//! [`in_fresh_netns`], on a thread of its own that first moves into a new,
//! empty network namespace. Namespaces belong to threads, so nothing the
//! test creates (TAPs, bridges) can appear in the namespace the test
//! process started in, and everything left over dies with the thread.
//! Processes spawned from that thread (`ip`, scripts) inherit its namespace.
//!
//! What the tests check is read back with `ip`, not with the code under
//! test, so a bug in `sys` cannot hide itself.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::sys::{self, Ifreq};

fn netns_id() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").expect("read /proc/thread-self/ns/net")
}

/// Runs `f` on a new thread in a new network namespace (with only a down
/// `lo`), and returns what it returns; a panic in `f` fails the caller.
///
/// A thread of its own, rather than the test's thread, keeps the isolation
/// whatever the harness does: libtest may run a test on the main thread,
/// and a namespace (or a dropped capability) must not outlive the test.
pub fn in_fresh_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let original = netns_id();
    std::thread::scope(|s| {
        let body = s.spawn(|| {
            // SAFETY: unshare(2) takes no pointers and affects only the
            // calling thread's namespaces.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "unshare(CLONE_NEWNET) failed: {}; the net tests need root (CAP_SYS_ADMIN)",
                std::io::Error::last_os_error()
            );
            assert_ne!(netns_id(), original, "still in the original namespace");
            f()
        });
        match body.join() {
            Ok(v) => v,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs `ip ARGS` in the calling thread's namespace; panics unless it
/// succeeds, and returns its stdout.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e} (install iproute2)"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether interface `name` exists in this thread's namespace.
pub fn exists(name: &str) -> bool {
    sys::ifindex(name).is_ok()
}

/// Waits up to two seconds for `name` to vanish. Deletion on close is
/// normally immediate, but a process being spawned by a concurrent test
/// holds a copy of every descriptor until its exec closes the O_CLOEXEC
/// ones, which delays the last close.
pub fn gone_soon(name: &str) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if !exists(name) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// `ip -o link show NAME`, one line.
fn link(name: &str) -> String {
    ip(&["-o", "link", "show", "dev", name])
}

/// The flags between `<` and `>` in `ip link` output, e.g. `UP`.
pub fn has_flag(name: &str, flag: &str) -> bool {
    let l = link(name);
    let flags = l
        .split_once('<')
        .and_then(|(_, r)| r.split_once('>'))
        .map(|(f, _)| f.to_string())
        .unwrap_or_default();
    flags.split(',').any(|f| f == flag)
}

pub fn is_up(name: &str) -> bool {
    has_flag(name, "UP")
}

pub fn mtu_of(name: &str) -> u32 {
    let l = link(name);
    let mut words = l.split_whitespace();
    words
        .by_ref()
        .find(|w| *w == "mtu")
        .unwrap_or_else(|| panic!("no mtu in {l:?}"));
    words.next().unwrap().parse().unwrap()
}

/// The interface index as `ip` prints it at the start of the line.
pub fn index_of(name: &str) -> i32 {
    let l = link(name);
    l.split(':').next().unwrap().trim().parse().unwrap()
}

/// Received bytes and packets of `name` (frames user space wrote into a
/// TAP count as received by the host), from `ip -j -s link`.
pub fn rx_stats(name: &str) -> (u64, u64) {
    let j = ip(&["-j", "-s", "link", "show", "dev", name]);
    let num = |after: &str, key: &str| -> u64 {
        let rest = &after[after.find(key).unwrap_or_else(|| panic!("{key} in {j}")) + key.len()..];
        let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap();
        rest[..end].parse().unwrap()
    };
    let rx = &j[j
        .find("\"rx\":")
        .unwrap_or_else(|| panic!("no rx stats in {j}"))..];
    (num(rx, "\"bytes\":"), num(rx, "\"packets\":"))
}

/// The error of a result whose Ok type has no Debug (Tap, HostNic).
pub fn expect_err<T, E>(r: Result<T, E>) -> E {
    match r {
        Ok(_) => panic!("expected an error, got Ok"),
        Err(e) => e,
    }
}

/// `ip -d` details of a TAP: "tun type tap pi off vnet_hdr on persist off".
pub fn tun_details(name: &str) -> String {
    let l = ip(&["-d", "-o", "link", "show", "dev", name]);
    let at = l
        .find("tun type")
        .unwrap_or_else(|| panic!("{name} is not a tun device: {l}"));
    l[at..].to_string()
}

/// The names of the ports of `bridge`, one per line.
pub fn ports_of(bridge: &str) -> String {
    ip(&["-o", "link", "show", "master", bridge])
}

/// Whether `tap` is a port of `bridge`.
pub fn in_bridge(tap: &str, bridge: &str) -> bool {
    ports_of(bridge)
        .lines()
        .any(|l| l.split(':').nth(1).map(str::trim) == Some(tap))
}

/// A bridge, up, with STP off (ports forward at once).
pub fn add_bridge(name: &str) {
    ip(&["link", "add", name, "type", "bridge"]);
    ip(&["link", "set", name, "up"]);
}

/// A persistent TAP, as an administrator makes one beforehand.
pub fn add_persistent_tap(name: &str) {
    ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
}

/// Opens /dev/net/tun and attaches it to `name` with `flags` (IFF_*),
/// the way another program, or a sandbox handing rvm an fd, would.
/// The descriptor is left inheritable (no FD_CLOEXEC) and blocking.
pub fn raw_tun(name: &str, flags: libc::c_int) -> OwnedFd {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut req = Ifreq::new(name);
    req.set_flags(flags as libc::c_short);
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    assert!(
        r == 0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    clear_cloexec(&file);
    file.into()
}

/// The TUN flags of an attached /dev/net/tun descriptor (TUNGETIFF).
pub fn tun_flags_of(fd: &impl AsRawFd) -> libc::c_int {
    let mut req = Ifreq::new("");
    // SAFETY: TUNGETIFF writes one ifreq, which `req` is.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) };
    assert!(r == 0, "TUNGETIFF: {}", std::io::Error::last_os_error());
    // The flags are a C short whose sign bit is a TUN flag too.
    libc::c_int::from(req.flags() as u16)
}

/// What another program does to TAP `name` in one go: creates it and
/// makes it persistent if it is missing, or makes it non-persistent (and
/// so deletes it) if it exists. False if someone holds the TAP.
pub fn toggle_persistent_tap(name: &str) -> bool {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun");
    let mut req = Ifreq::new(name);
    req.set_flags((libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short);
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is.
    if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } != 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY), "TUNSETIFF {name}: {e}");
        return false;
    }
    let persist = tun_flags_of(&file) & libc::IFF_PERSIST != 0;
    // SAFETY: TUNSETPERSIST takes its argument by value.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETPERSIST,
            libc::c_ulong::from(!persist),
        )
    };
    assert!(
        r == 0,
        "TUNSETPERSIST {name}: {}",
        std::io::Error::last_os_error()
    );
    true
}

fn clear_cloexec(f: &File) {
    // SAFETY: F_SETFD takes an integer argument.
    assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFD, 0) }, 0);
}

/// The descriptor flags (FD_CLOEXEC) and file status flags (O_NONBLOCK).
pub fn fd_flags(fd: &impl AsRawFd) -> (libc::c_int, libc::c_int) {
    // SAFETY: F_GETFD and F_GETFL take no argument.
    unsafe {
        (
            libc::fcntl(fd.as_raw_fd(), libc::F_GETFD),
            libc::fcntl(fd.as_raw_fd(), libc::F_GETFL),
        )
    }
}

/// Clears CAP_NET_ADMIN from the calling thread's effective set.
/// Capabilities, like namespaces, are per thread: call it only inside
/// [`in_fresh_netns`], whose thread ends with the test.
pub fn drop_cap_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut hdr = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a version 3 header writes two Data entries, which
    // `data` holds.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    assert_eq!(r, 0, "capget: {}", std::io::Error::last_os_error());
    data[0].effective &= !(1 << CAP_NET_ADMIN);
    // SAFETY: as above; capset only reads them, for this thread.
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) };
    assert_eq!(r, 0, "capset: {}", std::io::Error::last_os_error());
}

pub fn iov(buf: &[u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }
}

pub fn iov_mut(buf: &mut [u8]) -> libc::iovec {
    libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    }
}

/// A broadcast frame with an experimental EtherType (0x88b5) and a
/// recognisable payload, easy to tell from IPv6 chatter.
pub fn test_frame(fill: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend(std::iter::repeat_n(fill, 46));
    f
}

pub use crate::logging::capture::warnings_of;

/// A scratch directory for test scripts, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rvm-net-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// Writes an executable shell script `name` with `body`.
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// The file's contents, or "" if the file is missing.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
