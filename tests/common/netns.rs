//! Network namespaces the tests make: every address a test uses lives in
//! one, and the namespace is deleted (with whatever is left in it) when
//! the guard drops, even when the test fails.

use std::process::{Command, Output};

pub struct Netns {
    pub name: String,
}

fn ip(args: &[&str]) -> Output {
    Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"))
}

impl Netns {
    /// A fresh namespace with lo up.
    pub fn new(tag: &str) -> Result<Netns, String> {
        let name = format!("rvmt-{}-{tag}", std::process::id());
        let o = ip(&["netns", "add", &name]);
        if !o.status.success() {
            return Err(format!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        let ns = Netns { name };
        ns.sh("ip link set lo up")?;
        Ok(ns)
    }

    /// Runs a shell command inside the namespace; Err with its output if it fails.
    pub fn sh(&self, cmd: &str) -> Result<String, String> {
        let o = self
            .command("sh")
            .args(["-c", cmd])
            .output()
            .map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        } else {
            Err(format!(
                "`{cmd}` in {} failed ({}): {}{}",
                self.name,
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ))
        }
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// A bridge `br0` with `addr` (e.g. 10.0.0.1/24), up. Its Ethernet
    /// address is fixed: else it takes the lowest of its ports' and moves
    /// as guests come and go, and a guest still running loses the host
    /// until its ARP entry expires (the load test's streams stalled).
    pub fn bridge(&self, addr: &str, mtu: u32) -> Result<(), String> {
        self.sh(&format!(
            "ip link add br0 address 02:00:00:00:00:01 mtu {mtu} type bridge && ip addr add {addr} dev br0 && ip link set br0 up"
        ))
        .map(drop)
    }

    /// Runs `f` on a thread of this process that has entered the
    /// namespace, for tests that embed rvm as a library: the TAPs, bridge
    /// ports and threads the VM makes belong to the namespace.
    pub fn run_inside<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).map_err(|e| format!("{path}: {e}"))?;
                // SAFETY: setns(2) on an open namespace fd; it changes only
                // this thread, which ends when `f` returns.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| "the test thread panicked".to_string())?
        })
    }

    /// Err naming the TAPs still in the namespace, if any.
    pub fn no_taps_left(&self) -> Result<(), String> {
        match self.taps() {
            t if t.is_empty() => Ok(()),
            t => Err(format!("TAPs left behind after rvm ended: {t:?}")),
        }
    }

    /// Names of the TAP devices in the namespace.
    pub fn taps(&self) -> Vec<String> {
        self.sh("ip -o link show type tun")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Processes still inside (a server, a stray rvm) keep it alive.
        let _ = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            });
        let _ = ip(&["netns", "del", &self.name]);
    }
}
