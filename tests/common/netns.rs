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

    /// A veth pair from this namespace (`here`) to `other` (`there`),
    /// each end with its address (CIDR) and up.
    pub fn veth_to(
        &self,
        other: &Netns,
        (here, here_addr): (&str, &str),
        (there, there_addr): (&str, &str),
    ) -> Result<(), String> {
        let o = ip(&[
            "link",
            "add",
            here,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            there,
            "netns",
            &other.name,
        ]);
        if !o.status.success() {
            return Err(format!(
                "veth {here} - {there}: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        self.sh(&format!(
            "ip addr add {here_addr} dev {here} && ip link set {here} up"
        ))?;
        other.sh(&format!(
            "ip addr add {there_addr} dev {there} && ip link set {there} up"
        ))?;
        Ok(())
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

/// One reading of an interface's counters, on the host's clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkSample {
    /// When, in seconds on the realtime clock ([`now`]).
    pub t: f64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// Reads an interface's kernel counters every 200 ms from inside its
/// namespace (a shell loop: /sys/class/net there shows the namespace's
/// interfaces) until stopped. For a TAP, `tx` is what its reader (rvm)
/// took from the host and `rx` what it wrote to the host: the kernel's
/// count, not rvm's.
pub struct LinkSampler {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<(u128, [u64; 4])>,
}

impl Netns {
    pub fn sample_link(&self, dev: &str) -> Result<LinkSampler, String> {
        let d = format!("/sys/class/net/{dev}/statistics");
        let script = format!(
            "while :; do c=$(cat {d}/rx_bytes {d}/tx_bytes {d}/rx_packets {d}/tx_packets 2>/dev/null) && echo $(date +%s%N) $c; sleep 0.2; done"
        );
        let mut child = self
            .command("sh")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start the counter sampler: {e}"))?;
        let out = child.stdout.take().ok_or("no sampler output")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Ok(LinkSampler {
            child,
            lines,
            seen: Vec::new(),
        })
    }
}

impl LinkSampler {
    /// Every reading so far.
    pub fn samples(&mut self) -> Vec<LinkSample> {
        let v = &mut self.seen;
        while let Ok(l) = self.lines.try_recv() {
            let f: Vec<u128> = l
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            if let [ns, a, b, c, d] = f[..] {
                v.push((ns, [a as u64, b as u64, c as u64, d as u64]));
            }
        }
        v.iter()
            .map(
                |&(ns, [rx_bytes, tx_bytes, rx_packets, tx_packets])| LinkSample {
                    t: ns as f64 / 1e9,
                    rx_bytes,
                    tx_bytes,
                    rx_packets,
                    tx_packets,
                },
            )
            .collect()
    }
}

/// Now on the clock of [`LinkSample::t`] (the sampler's `date +%s%N`).
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Drop for LinkSampler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The rate of `counter` (per second) between the first reading where it
/// has grown by `from` and the last where it has grown by at most `to`,
/// both counted from the first reading: a transfer's steady middle, with
/// its start and end left out. None if there are not two such readings.
pub fn rate_between(
    samples: &[LinkSample],
    counter: fn(&LinkSample) -> u64,
    from: u64,
    to: u64,
) -> Option<f64> {
    let base = counter(samples.first()?);
    let grown = |s: &&LinkSample| counter(s) - base;
    let a = samples.iter().find(|s| grown(s) >= from)?;
    let b = samples.iter().rev().find(|s| grown(s) <= to)?;
    (b.t > a.t).then(|| (counter(b) - counter(a)) as f64 / (b.t - a.t))
}

/// A TCP listener in a namespace that answers "hi" to each connection and
/// logs every one it accepts (socat -d -d), so a test can tell a
/// connection refused before it reached the listener from one that did.
pub struct Listener {
    pub name: String,
    log: std::path::PathBuf,
    child: std::process::Child,
}

impl Listener {
    /// Listens on `port` (on IPv4 address `bind`, or every address of
    /// both families) in `ns`, logging
    /// to a file in `dir`; `name` says which in reports.
    pub fn start(
        ns: &Netns,
        name: &str,
        bind: Option<&str>,
        port: u16,
        dir: &std::path::Path,
    ) -> Result<Listener, String> {
        let log = dir.join(format!("{}.log", name.replace([':', '/'], "-")));
        // Without an address: IPv6 and IPv4 (mapped) both.
        let listen = match bind {
            Some(b) => format!("TCP-LISTEN:{port},fork,reuseaddr,bind={b}"),
            None => format!("TCP6-LISTEN:{port},fork,reuseaddr,ipv6only=0"),
        };
        let child = ns
            .command("socat")
            .args(["-d", "-d", "-lf"])
            .arg(&log)
            .arg(listen)
            .arg("SYSTEM:echo hi")
            .stdin(std::process::Stdio::null())
            // A client gone before the answer makes sh complain; the log
            // has what counts.
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("socat: {e}"))?;
        Ok(Listener {
            name: name.to_string(),
            log,
            child,
        })
    }

    /// The connections accepted so far.
    pub fn accepted(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("accepting connection from")
            .count()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `name=N` for each listener: the connections each accepted.
pub fn accepted(listeners: &[Listener]) -> Vec<String> {
    listeners
        .iter()
        .map(|l| format!("{}={}", l.name, l.accepted()))
        .collect()
}
