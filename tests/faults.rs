//! Faults from the host side while a guest runs: signals, SIGKILL and the
//! next rvm on the same TAP name, the TAP or the bridge deleted under a
//! running guest. rvm must keep running or end with a clear error, never
//! hang or spin, and leave nothing behind. (A failing ifup script and the
//! other bad host options are in tests/net.rs.) Runs directly on a host with
//! VT-x/AMD-V and inside the nested host otherwise, each case in a network
//! namespace it makes.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::{
    ask_for_vcpu_states, case, images, run_guest_retrying, run_suite, rvm_bin, thread_report,
    vcpus_stuck, Case, Heartbeat, Images, SILENCE_SECS,
};

const BOOT: Duration = Duration::from_secs(300);

fn rvm(ns: &Netns, img: &Images, scenario: &str, args: &str, net: &str) -> Command {
    let mut c = ns.command(rvm_bin());
    c.env("RVM_LOG", "info")
        .arg("run")
        .arg("--kernel")
        .arg(&img.minimal)
        .arg("--initrd")
        .arg(&img.initramfs)
        .args(["--mem", "256M", "--net", net])
        .arg("--cmdline")
        .arg(format!(
            "{} rvm.scenario={scenario} rvm.args={args}",
            common::base_cmdline()
        ));
    c
}

/// An rvm whose console and stderr are collected as they come.
struct Running {
    child: Child,
    console: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn spawn(mut cmd: Command) -> Result<Running, String> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let collect = |r: Box<dyn std::io::Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    let mut b = b.lock().unwrap();
                    b.push_str(&l);
                    b.push('\n');
                }
            });
            buf
        };
        let console = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Ok(Running {
            child,
            console,
            stderr,
        })
    }

    fn pid(&self) -> i32 {
        // `ip netns exec` execs rvm: same pid.
        self.child.id() as i32
    }

    fn wait_for(&mut self, marker: &str) -> Result<(), String> {
        let _beat = Heartbeat::start("a guest is");
        let t = Instant::now();
        let silence = Duration::from_secs(SILENCE_SECS.load(Ordering::SeqCst));
        let mut next_look = silence;
        while t.elapsed() < BOOT {
            let console = self.console.lock().unwrap().clone();
            if console.contains(marker) {
                return Ok(());
            }
            // Silent so far: stuck for good (fail now, with where the
            // vCPUs are), or only slow (look again later)?
            if console.is_empty() && t.elapsed() > next_look {
                next_look += silence;
                let pid = self.pid() as u32;
                let first = ask_for_vcpu_states(pid, &self.stderr);
                std::thread::sleep(Duration::from_secs(2));
                if vcpus_stuck(&first, &ask_for_vcpu_states(pid, &self.stderr)) {
                    return Err(format!(
                        "the guest printed nothing for {} s and its vCPUs are stuck\n{}{}",
                        (next_look - silence).as_secs(),
                        self.report(),
                        thread_report(pid)
                    ));
                }
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                return Err(format!(
                    "rvm ended ({s}) before {marker:?}\n{}",
                    self.report()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Where the vCPUs are (rvm prints it on stderr) and the threads.
        let pid = self.pid() as u32;
        ask_for_vcpu_states(pid, &self.stderr);
        Err(format!(
            "no {marker:?} within {BOOT:?}\n{}{}",
            self.report(),
            thread_report(pid)
        ))
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `sig` and waits (30 s at most) for rvm to exit; its status.
    fn signal_and_wait(&mut self, sig: i32) -> Result<std::process::ExitStatus, String> {
        // SAFETY: kill(2) on our child's pid, which we have not reaped.
        unsafe { libc::kill(self.pid(), sig) };
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(s);
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = self.child.kill();
                return Err(format!(
                    "rvm still ran 30 s after signal {sig}\n{}",
                    self.report()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// CPU seconds the thread named `name` used so far.
    fn thread_cpu(&self, name: &str) -> Option<f64> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid())).ok()?;
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim() == name {
                let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                let f: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
                // Fields 14 and 15 (utime, stime) are 12 and 13 after ')'.
                let ticks: f64 =
                    f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
                // SAFETY: sysconf has no memory effects.
                let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
                return Some(ticks / hz);
            }
        }
        None
    }

    fn report(&self) -> String {
        let c = self.console.lock().unwrap();
        let lines: Vec<&str> = c.lines().collect();
        format!(
            "--- console (last 20 lines) ---\n{}\n--- stderr ---\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n"),
            self.stderr.lock().unwrap().trim_end()
        )
    }
}

/// SIGINT (Ctrl-C at a terminal) stops the guest: exit 0, rvm says why,
/// and its TAP is gone.
fn sigint_stops_and_cleans_up(img: &Images) -> Result<(), String> {
    let ns = Netns::new("sigint")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let mut r = Running::spawn(rvm(
        &ns,
        img,
        "net_idle",
        "",
        "tap=rvmint0,bridge=br0,vhost=off",
    ))?;
    r.wait_for("rvm-init: idle")?;
    let s = r.signal_and_wait(libc::SIGINT)?;
    if !s.success() || !r.stderr.lock().unwrap().contains("terminating on signal 2") {
        return Err(format!("after SIGINT: {s}\n{}", r.report()));
    }
    ns.no_taps_left()
}

/// SIGKILL gives rvm no chance to clean up; the TAP it created is not
/// persistent, so the kernel takes it away with rvm's fds, and the next
/// rvm started at once on the same name (and bridge) gets it and works.
/// With vhost-net, whose worker also held the TAP.
fn sigkill_then_the_next_rvm_reclaims_the_tap(img: &Images) -> Result<(), String> {
    let ns = Netns::new("sigkill")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let net = "tap=rvmkill0,bridge=br0,vhost=on";
    let mut r = Running::spawn(rvm(&ns, img, "net_idle", "chatter=10.0.0.1", net))?;
    r.wait_for("rvm-init: idle")?;
    let s = r.signal_and_wait(libc::SIGKILL)?;
    if s.code().is_some() {
        return Err(format!("rvm was not killed: {s}"));
    }
    let next = run_guest_retrying("after SIGKILL", || rvm(&ns, img, "net_ping", "", net), BOOT);
    let ok =
        next.status.is_some_and(|s| s.success()) && next.result("ping_ok").as_deref() == Some("1");
    if !ok {
        return Err(format!(
            "the next rvm on the TAP name failed\n{}",
            next.tail(20)
        ));
    }
    ns.no_taps_left()
}

/// The TAP deleted (`ip link del`) while the guest keeps sending: rvm keeps
/// running without spinning (its NIC thread stays nearly idle: every
/// send fails and is counted), and ends normally on SIGTERM with nothing
/// left and no error.
fn tap_deleted_under_a_running_guest(
    model: &'static str,
) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("tapdel")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let net = format!("tap=rvmdel0,bridge=br0,vhost=off,model={model}");
        let mut r = chattering_guest(&ns, img, &net)?;
        ns.sh("ip link del rvmdel0")?;
        let before = r.thread_cpu("net0");
        std::thread::sleep(Duration::from_secs(8));
        let after = r.thread_cpu("net0");
        if !r.alive() {
            return Err(format!(
                "rvm ended when its TAP was deleted\n{}",
                r.report()
            ));
        }
        match (before, after) {
            (Some(b), Some(a)) if a - b < 1.0 => {}
            other => {
                return Err(format!(
                    "NIC thread CPU seconds over 8 s after the TAP went: {other:?} (spinning?)\n{}",
                    r.report()
                ))
            }
        }
        sigterm_ends_cleanly(&mut r, &ns)
    }
}

/// The bridge deleted under a running guest: the TAP just loses its
/// master; rvm keeps running and ends normally, its TAP gone.
fn bridge_deleted_under_a_running_guest(img: &Images) -> Result<(), String> {
    let ns = Netns::new("brdel")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let mut r = chattering_guest(&ns, img, "tap=rvmbr0,bridge=br0,vhost=off")?;
    ns.sh("ip link del br0")?;
    std::thread::sleep(Duration::from_secs(5));
    if !r.alive() {
        return Err(format!(
            "rvm ended when its bridge was deleted\n{}",
            r.report()
        ));
    }
    sigterm_ends_cleanly(&mut r, &ns)
}

/// A guest on `net` that keeps pinging the bridge (10.0.0.1) and that the
/// host has pinged once it is up.
fn chattering_guest(ns: &Netns, img: &Images, net: &str) -> Result<Running, String> {
    let mut r = Running::spawn(rvm(ns, img, "net_idle", "chatter=10.0.0.1", net))?;
    r.wait_for("rvm-init: idle")?;
    ns.sh("ping -c 2 -W 5 10.0.0.2")?;
    Ok(r)
}

/// SIGTERM ends rvm with 0, without a panic or an error on stderr, and
/// its TAP is gone.
fn sigterm_ends_cleanly(r: &mut Running, ns: &Netns) -> Result<(), String> {
    let s = r.signal_and_wait(libc::SIGTERM)?;
    let err = r.stderr.lock().unwrap().clone();
    if !s.success() || err.contains("panicked") || err.contains("error") {
        return Err(format!("exit after SIGTERM: {s}\n{}", r.report()));
    }
    ns.no_taps_left()
}

fn cases() -> Vec<Case<Images>> {
    vec![
        case(
            "sigint_stops_the_guest_and_cleans_up",
            sigint_stops_and_cleans_up,
        ),
        case(
            "sigkill_then_the_next_rvm_reclaims_the_tap_vhost",
            sigkill_then_the_next_rvm_reclaims_the_tap,
        ),
        case(
            "tap_deleted_under_a_running_virtio_guest",
            tap_deleted_under_a_running_guest("virtio"),
        ),
        case(
            "tap_deleted_under_a_running_e1000_guest",
            tap_deleted_under_a_running_guest("e1000"),
        ),
        case(
            "bridge_deleted_under_a_running_guest",
            bridge_deleted_under_a_running_guest,
        ),
    ]
}

fn main() {
    run_suite(
        "fault tests",
        cases(),
        &["--mem", "4096", "--idle-timeout", "180"],
        images,
    );
}
