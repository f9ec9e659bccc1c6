//! User-mode networking through passt (https://passt.top): rvm starts one
//! passt per `--net user` NIC and hands it one end of a socketpair
//! (`passt --fd`), over which frames move in QEMU's stream framing
//! ([`super::socket`]). passt gives the guest DHCP, DNS and NAT to the
//! host's network, maps the gateway's address to the host's loopback, and
//! forwards host ports to the guest (`hostfwd=`); it needs no privilege.
//!
//! passt ends when its socket closes (`--fd` implies `--one-off`): when
//! rvm drops the NIC it closes its end and reaps passt, and when rvm is
//! killed outright the kernel closes it, so passt never outlives rvm.

use std::fmt;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// The program, looked up in PATH; RVM_PASST overrides it (a build of
/// one's own, a wrapper).
pub const PASST: &str = "passt";

/// The MTU passt offers by DHCP (and the one rvm's virtio-net NIC then
/// advertises): a 64 KiB frame, so that the guest sends and receives
/// large frames without TSO, which a socket cannot carry.
pub const PASST_MTU: u16 = 65_520;

#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error("passt is not installed (user-mode networking runs it): install it with `apt install passt` (Debian, Ubuntu) or `dnf install passt` (Fedora), or set RVM_PASST to its path")]
    Missing,
    #[error("cannot start passt: {0}")]
    Spawn(std::io::Error),
    #[error("passt ended as it started ({0}); its messages are above")]
    Exited(std::process::ExitStatus),
    #[error("socketpair for passt: {0}")]
    Socket(std::io::Error),
}

/// A host port forwarded to the guest, as QEMU writes it:
/// `tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFwd {
    pub udp: bool,
    pub host_addr: Option<std::net::IpAddr>,
    pub host_port: u16,
    pub guest_port: u16,
}

impl FromStr for HostFwd {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const FORM: &str =
            "expected tcp:[HOSTADDR]:HOSTPORT-:GUESTPORT (or udp:...), like tcp::2222-:22";
        let (proto, rest) = s.split_once(':').ok_or(FORM)?;
        let udp = match proto {
            "tcp" | "" => false,
            "udp" => true,
            _ => return Err(format!("{proto:?} is not tcp or udp")),
        };
        let (host, guest) = rest.split_once('-').ok_or(FORM)?;
        let (host_addr, host_port) = host.rsplit_once(':').ok_or(FORM)?;
        let (guest_addr, guest_port) = guest.rsplit_once(':').ok_or(FORM)?;
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{p:?} is not a port (1 to 65535)"))
        };
        let host_addr = match host_addr.trim_start_matches('[').trim_end_matches(']') {
            "" => None,
            a => Some(
                a.parse()
                    .map_err(|_| format!("{a:?} is not an IP address"))?,
            ),
        };
        if !guest_addr.is_empty() {
            return Err(format!(
                "a guest address ({guest_addr}) cannot be chosen: passt forwards to the guest's one address; leave it empty, like tcp::2222-:22"
            ));
        }
        Ok(HostFwd {
            udp,
            host_addr,
            host_port: port(host_port)?,
            guest_port: port(guest_port)?,
        })
    }
}

impl fmt::Display for HostFwd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = if self.udp { "udp" } else { "tcp" };
        let addr = self.host_addr.map(|a| a.to_string()).unwrap_or_default();
        write!(f, "{proto}:{addr}:{}-:{}", self.host_port, self.guest_port)
    }
}

impl HostFwd {
    /// passt's spelling: `-t [ADDR/]PORT:GUESTPORT` (or `-u`).
    fn passt_args(&self) -> [String; 2] {
        let flag = if self.udp { "-u" } else { "-t" };
        let addr = self.host_addr.map(|a| format!("{a}/")).unwrap_or_default();
        [
            flag.to_string(),
            format!("{addr}{}:{}", self.host_port, self.guest_port),
        ]
    }
}

/// A running passt and rvm's end of its socket.
pub struct Passt {
    child: Child,
}

impl Passt {
    /// Starts passt for one NIC; returns it and rvm's end of the socket.
    pub fn start(hostfwd: &[HostFwd]) -> Result<(Passt, OwnedFd), PasstError> {
        let (ours, theirs) = socketpair().map_err(PasstError::Socket)?;
        let program = std::env::var_os("RVM_PASST").unwrap_or_else(|| PASST.into());
        let mut cmd = Command::new(&program);
        let fd = theirs.as_raw_fd();
        // Foreground, errors only, on rvm's stderr; the socket is passt's
        // one client.
        cmd.args(["--foreground", "--quiet", "--stderr", "--fd"])
            .arg(fd.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for f in hostfwd {
            cmd.args(f.passt_args());
        }
        // SAFETY: between fork and exec only fcntl(2), which is
        // async-signal-safe, runs; it clears close-on-exec on passt's end
        // of the socketpair, an fd this process owns until `theirs` drops.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => PasstError::Missing,
            _ => PasstError::Spawn(e),
        })?;
        drop(theirs);
        let mut passt = Passt { child };
        if let Some(err) = passt.child.stderr.take() {
            let pid = passt.pid();
            let _ = std::thread::Builder::new()
                .name("passt-log".into())
                .spawn(move || relay_log(pid, err));
        }
        // A bad option or a port passt cannot bind ends it at once: wait a
        // moment for that, so the user hears of it before the guest boots.
        let t = Instant::now();
        while t.elapsed() < STARTUP_GRACE {
            if let Ok(Some(status)) = passt.child.try_wait() {
                return Err(PasstError::Exited(status));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log::info!("user-mode networking: passt (pid {}) started", passt.pid());
        Ok((passt, ours))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// passt's messages, as rvm's log lines, until passt ends. Without a
/// system logger passt says so on every line it writes; that is dropped.
fn relay_log(pid: u32, err: std::process::ChildStderr) {
    use std::io::BufRead;
    for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
        if line.is_empty() || line.contains("to syslog") {
            continue;
        }
        // Run as root, passt drops to nobody, and says so.
        let level = if line.contains("Changing to nobody") {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        log::log!(level, "passt (pid {pid}): {line}");
    }
}

/// How long passt is watched for a failed start.
const STARTUP_GRACE: Duration = Duration::from_millis(150);
/// How long passt gets to end by itself once its socket closed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

impl Drop for Passt {
    /// rvm's end of the socket is closed by then (the NIC's backend drops
    /// first): passt ends by itself; it is reaped, and killed if it lingers.
    fn drop(&mut self) {
        let t = Instant::now();
        while t.elapsed() < EXIT_GRACE {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        log::warn!(
            "passt (pid {}) did not end when its socket closed; killing it",
            self.pid()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn socketpair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0i32; 2];
    // SAFETY: socketpair(2) writes two fds into the array on success.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfwd_in_qemus_spelling_becomes_passts() {
        let f: HostFwd = "tcp::2222-:22".parse().unwrap();
        assert_eq!(f.passt_args(), ["-t".to_string(), "2222:22".into()]);
        let f: HostFwd = "udp:127.0.0.1:5353-:53".parse().unwrap();
        assert_eq!(
            f.passt_args(),
            ["-u".to_string(), "127.0.0.1/5353:53".into()]
        );
        assert_eq!(f.to_string(), "udp:127.0.0.1:5353-:53");
        let f: HostFwd = "tcp:[::1]:8080-:80".parse().unwrap();
        assert_eq!(f.passt_args(), ["-t".to_string(), "::1/8080:80".into()]);
    }

    #[test]
    fn bad_hostfwd_says_what_is_wrong() {
        for (bad, why) in [
            ("sctp::1-:2", "not tcp or udp"),
            ("tcp::0-:22", "not a port"),
            ("tcp::2222-:99999", "not a port"),
            ("tcp::2222", "expected tcp:"),
            ("tcp:nohost:2222-:22", "not an IP address"),
            ("tcp::2222-10.0.2.15:22", "cannot be chosen"),
        ] {
            let e = bad.parse::<HostFwd>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
