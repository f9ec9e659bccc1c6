//! Shared by the guest tests and the boot benchmark: where guests can run,
//! the guest images, and running one rvm (or QEMU) guest with a deadline.
#![allow(dead_code)]

pub mod netns;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where guest tests run, and why.
pub enum Placement {
    Direct(String),
    Nested(String),
}

/// Guests boot directly when the host has hardware virtualisation (or we
/// are already inside the nested host); otherwise inside the nested host.
/// RVM_TEST_PLACEMENT=direct|nested overrides the choice.
pub fn placement() -> Placement {
    if std::env::var_os("RVM_NESTED").is_some() {
        return Placement::Direct("inside the nested host".into());
    }
    match std::env::var("RVM_TEST_PLACEMENT").as_deref() {
        Ok("direct") => return Placement::Direct("RVM_TEST_PLACEMENT=direct".into()),
        Ok("nested") => return Placement::Nested("RVM_TEST_PLACEMENT=nested".into()),
        _ => {}
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw && Path::new("/dev/kvm").exists() {
        Placement::Direct("the host has VT-x/AMD-V and /dev/kvm".into())
    } else {
        Placement::Nested(
            "the host has no VT-x/AMD-V, so its /dev/kvm cannot boot stock Linux".into(),
        )
    }
}

/// Re-runs this very executable inside the nested host with the same
/// arguments and exits with its status. A run cut short by the nested
/// host's own kernel panicking, or by the nested host hanging on every try
/// scripts/nested-host made, starts over (at most MAX_FLAKE_RETRIES times,
/// each said so).
pub fn reexec_nested(nested_args: &[&str]) -> ! {
    let exe = std::env::current_exe().expect("current_exe");
    let mut retries = 0;
    loop {
        let mut cmd = Command::new(repo().join("scripts/nested-host"));
        cmd.args(nested_args)
            .arg("--")
            .arg(&exe)
            .args(std::env::args().skip(1));
        cmd.current_dir(repo());
        let status = cmd.status().unwrap_or_else(|e| {
            eprintln!("cannot run scripts/nested-host: {e}");
            std::process::exit(1)
        });
        let code = status.code().unwrap_or(1);
        if let Some(fault) = NestedFault::from_status(code) {
            if retries < MAX_FLAKE_RETRIES {
                retries += 1;
                println!(
                    "RETRY {retries}/{MAX_FLAKE_RETRIES}: {} (known TCG nested-host fault, not an rvm failure); starting over in a fresh nested host",
                    fault.what()
                );
                continue;
            }
        }
        std::process::exit(code)
    }
}

/// How scripts/nested-host says that the nested host itself failed while
/// CMD ran, so part of CMD's work may be done and only the caller knows
/// what to rerun.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NestedFault {
    /// Exit 124: its kernel panicked.
    Panic,
    /// Exit 123: it printed nothing for the idle timeout (its hang is
    /// described on stderr, SysRq dumps included).
    Hang,
}

impl NestedFault {
    fn from_status(code: i32) -> Option<Self> {
        match code {
            124 => Some(Self::Panic),
            123 => Some(Self::Hang),
            _ => None,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Panic => "the nested host's kernel panicked",
            Self::Hang => "the nested host hung",
        }
    }
}

/// Runs the named tests of this executable inside the nested host and
/// returns the exit status for the whole suite. When the nested host's own
/// kernel panics mid-run (its exit 124) or the nested host hangs (123:
/// scripts/nested-host is told not to retry, because it would start the
/// whole list again), the tests that had no verdict yet run again in a
/// fresh nested host, each time said so; a test that failed is never
/// rerun. The bound: at most MAX_STALLED_PANICS faults in a row with no new
/// verdict in between, MAX_NESTED_PANICS in all, and MAX_NESTED_HANGS hangs
/// (each costs the idle timeout). A hang that keeps striking one test is
/// thus a failure, as it may be rvm's. (The panic, L2 state leaking into
/// the L1 kernel's GS base on a #VMEXIT under TCG, hits QEMU as the L2 VMM
/// as well; a long suite can see several.)
pub fn run_nested_suite(nested_args: &[&str], pending: Vec<String>) -> i32 {
    let exe = std::env::current_exe().expect("current_exe");
    run_suite_through(
        &repo().join("scripts/nested-host"),
        &exe,
        nested_args,
        pending,
    )
}

/// run_nested_suite with the nested-host script and the test executable
/// named (a test gives a fake script).
pub fn run_suite_through(
    script: &Path,
    exe: &Path,
    nested_args: &[&str],
    mut pending: Vec<String>,
) -> i32 {
    let (mut passed, mut failed) = (Vec::new(), Vec::new());
    let (mut panics, mut hangs, mut stalled) = (0, 0, 0);
    while !pending.is_empty() {
        let mut cmd = Command::new(script);
        cmd.args(nested_args)
            .args(["--retries", "0", "--"])
            .arg(exe)
            .arg("--exact")
            .args(&pending)
            .current_dir(repo())
            .stdout(Stdio::piped());
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("cannot run scripts/nested-host: {e}");
                return 1;
            }
        };
        // Echo the inner run's output and note each verdict as it comes.
        let out = BufReader::new(child.stdout.take().expect("piped stdout"));
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        for line in out.lines().map_while(Result::ok) {
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test ") {
                if let Some((name, verdict)) = rest.split_once(" ... ") {
                    if verdict.starts_with("ok") {
                        ok.push(name.to_string());
                    } else if verdict.starts_with("FAILED") {
                        bad.push(name.to_string());
                    }
                }
            }
        }
        passed.append(&mut ok);
        failed.append(&mut bad);
        let code = child.wait().map_or(1, |s| s.code().unwrap_or(1));
        let before = pending.len();
        pending.retain(|n| !passed.contains(n) && !failed.contains(n));
        let fault = NestedFault::from_status(code);
        if let Some(f) = fault {
            match f {
                NestedFault::Panic => panics += 1,
                NestedFault::Hang => hangs += 1,
            }
            stalled = if pending.len() < before {
                1
            } else {
                stalled + 1
            };
        }
        let stall_bound = STALLED_PANICS.load(std::sync::atomic::Ordering::SeqCst);
        let within_bounds = stalled <= stall_bound
            && panics + hangs <= MAX_NESTED_PANICS
            && hangs <= MAX_NESTED_HANGS
            && !pending.is_empty();
        match (fault, code) {
            // Every test has its verdict: a fault after the last one is moot.
            (Some(_), _) | (None, 0 | 101) if pending.is_empty() => break,
            (Some(f), _) if within_bounds => {
                println!(
                    "RETRY (nested-host fault {}/{MAX_NESTED_PANICS} in this suite, {hangs}/{MAX_NESTED_HANGS} of them hangs, {stalled}/{stall_bound} since the last verdict): {} (known TCG nested-host fault, not an rvm failure); rerunning the {} test(s) without a verdict in a fresh nested host: {}",
                    panics + hangs,
                    f.what(),
                    pending.len(),
                    pending.join(", ")
                );
            }
            (_, c) => {
                println!(
                    "the nested host run ended with status {c} before these tests had a verdict: {}",
                    pending.join(", ")
                );
                return if c == 0 { 1 } else { c };
            }
        }
    }
    println!(
        "\nsuite result: {}. {} passed; {} failed (all runs in the nested host)",
        if failed.is_empty() { "ok" } else { "FAILED" },
        passed.len(),
        failed.len()
    );
    if failed.is_empty() {
        0
    } else {
        println!("failures: {}", failed.join(", "));
        101
    }
}

pub struct Images {
    pub minimal: PathBuf,
    pub stock: PathBuf,
    pub initramfs: PathBuf,
}

pub fn images() -> Result<Images, String> {
    let out = repo().join("guest-images/out");
    let i = Images {
        minimal: out.join("minimal/bzImage"),
        stock: out.join("stock/vmlinuz"),
        initramfs: out.join("initramfs.cpio.gz"),
    };
    for p in [&i.minimal, &i.stock, &i.initramfs] {
        if !p.exists() {
            return Err(format!(
                "guest image {} is missing: run guest-images/build.sh",
                p.display()
            ));
        }
    }
    Ok(i)
}

/// The passt rvm runs (RVM_PASST, as rvm reads it, or passt from PATH):
/// tests and benchmarks that start a passt of their own start the same.
pub fn passt_program() -> std::ffi::OsString {
    std::env::var_os("RVM_PASST").unwrap_or_else(|| "passt".into())
}

/// The rvm binary under test.
pub fn rvm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RVM_BIN") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_BIN_EXE_rvm"))
}

/// What a guest run produced.
pub struct GuestRun {
    /// None when the process was killed (see `killed`).
    pub status: Option<ExitStatus>,
    /// Why the harness killed the process: the deadline passed, or the
    /// guest printed nothing at all for SILENCE.
    pub killed: Option<String>,
    pub console: String,
    pub stderr: String,
    /// Time from spawn to the first console line containing the marker.
    pub marker_at: Option<Duration>,
    pub elapsed: Duration,
}

impl GuestRun {
    /// `rvm-result: key=value` lines from /init.
    pub fn result(&self, key: &str) -> Option<String> {
        let prefix = format!("rvm-result: {key}=");
        self.console.lines().find_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix(&prefix)
                .map(|v| v.trim().to_string())
        })
    }

    /// Ok when rvm exited with 0 after /init finished; else the reason,
    /// with the console's end and rvm's stderr.
    pub fn finished(&self) -> Result<(), String> {
        if self.status.is_none_or(|s| !s.success()) || !self.init_done() {
            return Err(format!(
                "the guest did not finish ({}):\n{}",
                match self.status {
                    Some(s) => s.to_string(),
                    None => self.why_killed().to_string(),
                },
                self.tail(40)
            ));
        }
        Ok(())
    }

    pub fn init_done(&self) -> bool {
        self.console
            .lines()
            .any(|l| l.trim_end_matches('\r') == "rvm-init: done")
    }

    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        let start = lines.len().saturating_sub(n);
        format!(
            "--- console (last {n} lines) ---\n{}\n--- stderr ---\n{}",
            lines[start..].join("\n"),
            self.stderr.trim_end()
        )
    }

    /// Why the run has no exit status (it was killed), for failure reports.
    pub fn why_killed(&self) -> &str {
        self.killed.as_deref().unwrap_or("it was killed")
    }
}

/// The kernel command line every test guest starts from: rvm's default,
/// `quiet`, and `earlyprintk` on the serial port. With `quiet` the
/// decompressor and the early kernel print only their errors, and without
/// `earlyprintk` not even those: a kernel that stops before its console
/// registers (the decompressor finding its payload corrupt: "XZ-compressed
/// data is corrupt -- System halted", issue 19) would halt in silence.
/// Appends `run` of the minimal kernel with 2 vCPUs, 256 MiB, one NIC
/// `net` and /init's `scenario` with `args` (RVM_LOG=info, so the exit
/// log's NIC counters reach failure reports) to `c`, whose program is rvm
/// or a wrapper that runs it.
pub fn minimal_guest<'c>(
    c: &'c mut Command,
    img: &Images,
    scenario: &str,
    args: &str,
    net: &str,
) -> &'c mut Command {
    c.env("RVM_LOG", "info")
        .arg("run")
        .arg("--kernel")
        .arg(&img.minimal)
        .arg("--initrd")
        .arg(&img.initramfs)
        .args(["--cpus", "2", "--mem", "256M", "--net", net])
        .arg("--cmdline")
        .arg(format!(
            "{} rvm.scenario={scenario} rvm.args={args}",
            base_cmdline()
        ))
}

pub fn base_cmdline() -> String {
    format!(
        "{} quiet earlyprintk=serial,ttyS0,115200",
        rvm::DEFAULT_CMDLINE
    )
}

/// A guest that has printed nothing at all for this long is looked at: if
/// its vCPUs are stuck (none runnable and none moved, in two looks two
/// seconds apart: a CPU halted with interrupts off, secondaries still
/// waiting for their start-up IPI) it fails at once with the report
/// instead of waiting out its deadline. A guest that is only slow (the
/// minimal kernel with `quiet` prints nothing before /init, which took
/// over 60 s on a loaded nested host while its driver probed the NIC) is
/// looked at again after as long. Suites whose guests boot many at a time
/// may raise it (tests/load.rs).
pub static SILENCE_SECS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(60);

/// Where an embedded VM's vCPUs are, for a failure report.
pub fn vcpu_report(vm: &rvm::VmController) -> String {
    let mut out = String::from("\n--- vCPU states ---\n");
    for r in vm.vcpu_states() {
        out.push_str(&format!("{r}\n"));
    }
    out
}

/// One look at a vCPU: (stopped for good, RIP), from a report line such
/// as "vCPU 0: halted, interrupts off: rip 0x... ...". Stopped for good is
/// a HLT with interrupts off or a secondary still waiting for INIT/SIPI; a
/// HLT with interrupts on is an idle CPU that a timer will wake (a booting
/// kernel sleeps now and then). None when the vCPU gave no registers (its
/// thread busy in rvm: not stuck in the guest).
fn vcpu_look(line: &str) -> Option<(bool, String)> {
    let (_, rest) = line.split_once(": ")?;
    let stopped = rest.starts_with("halted, interrupts off") || rest.starts_with("waiting for");
    let rip = rest.split_once(" rip ")?.1.split_whitespace().next()?;
    Some((stopped, rip.to_string()))
}

/// Whether two looks at the same vCPUs (their report lines) show a guest
/// stuck for good: every vCPU answered, each stopped for good (see
/// vcpu_look), none moved.
pub fn vcpus_stuck(first: &[String], second: &[String]) -> bool {
    let (a, b): (Vec<_>, Vec<_>) = (
        first.iter().map(|l| vcpu_look(l)).collect(),
        second.iter().map(|l| vcpu_look(l)).collect(),
    );
    !a.is_empty()
        && a.len() == b.len()
        && a.iter().zip(&b).all(|(x, y)| match (x, y) {
            (Some((true, r1)), Some((true, r2))) => r1 == r2,
            _ => false,
        })
}

/// Asks an rvm process where its vCPUs are (SIGUSR1: it prints every
/// vCPU's state on stderr, collected in `stderr`) and returns the report's
/// lines, or nothing if none came within 3 s.
pub fn ask_for_vcpu_states(pid: u32, stderr: &std::sync::Mutex<String>) -> Vec<String> {
    const HEAD: &str = "rvm: vCPU states (signal 10):";
    let before = stderr.lock().unwrap().matches(HEAD).count();
    // SAFETY: kill(2) with a pid we spawned and have not reaped.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) };
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let text = stderr.lock().unwrap().clone();
        if text.matches(HEAD).count() > before {
            // The report is written at once, in one piece.
            std::thread::sleep(Duration::from_millis(100));
            let text = stderr.lock().unwrap().clone();
            let last = text.rsplit(HEAD).next().unwrap_or("");
            return last
                .lines()
                .filter_map(|l| l.strip_prefix("rvm:   "))
                .map(str::to_string)
                .collect();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Vec::new()
}

/// Whether `pid` is an rvm process (a guest command may be wrapped, as in
/// `ip netns exec NS rvm ...`, which becomes rvm).
pub fn is_rvm(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "rvm")
}

const HEARTBEAT: Duration = Duration::from_secs(60);

/// Where each thread of a process that was killed is: name,
/// state and the top of its kernel stack (are the vCPUs inside KVM_RUN?).
pub fn thread_report(pid: u32) -> String {
    let mut out = format!("\n--- threads of pid {pid} when it was killed ---\n");
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("?");
        let stack: Vec<String> = read("stack")
            .lines()
            .take(4)
            .map(|l| l.split_whitespace().nth(1).unwrap_or(l).to_string())
            .collect();
        out.push_str(&format!(
            "{} {} state {state} stack {}\n",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            stack.join(" < ")
        ));
    }
    out
}

/// Spawns `cmd`, collects its console, timestamps the first line holding
/// `marker`, and kills it if `deadline` passes.
pub fn run_with_deadline(mut cmd: Command, deadline: Duration, marker: &str) -> GuestRun {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let _ = tx.send((Instant::now(), String::from_utf8_lossy(&buf).into_owned()));
                }
            }
        }
    });
    // stderr as it comes, so that vCPU reports can be read while it runs.
    let err_text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let err_sink = err_text.clone();
    let err_reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            err_sink
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let silence = Duration::from_secs(SILENCE_SECS.load(std::sync::atomic::Ordering::SeqCst));
    let mut next_look = silence;
    let mut console = String::new();
    let mut marker_at = None;
    let mut status = None;
    let mut killed = None;
    let mut next_beat = HEARTBEAT;
    let mut hung_threads = String::new();
    loop {
        while let Ok((t, line)) = rx.try_recv() {
            if marker_at.is_none() && line.contains(marker) {
                marker_at = Some(t - start);
            }
            console.push_str(&line);
        }
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
            break;
        }
        let mut why = None;
        if start.elapsed() > deadline {
            why = Some(format!("it did not end within {deadline:?}"));
        } else if console.is_empty() && start.elapsed() > next_look && is_rvm(child.id()) {
            // Silent so far: stuck, or only slow?
            let silent = next_look.as_secs();
            next_look += silence;
            let first = ask_for_vcpu_states(child.id(), &err_text);
            std::thread::sleep(Duration::from_secs(2));
            let second = ask_for_vcpu_states(child.id(), &err_text);
            if vcpus_stuck(&first, &second) {
                why = Some(format!(
                    "the guest printed nothing at all for {silent} s and its vCPUs are stuck (halted with interrupts off or never started, none moved)"
                ));
            } else {
                println!(
                    "    (the guest has printed nothing for {silent} s, but its vCPUs are working: waiting on)"
                );
            }
        }
        if let Some(why) = why {
            // Where the vCPUs are (rvm prints it on stderr), then where
            // each thread is in the host kernel.
            if is_rvm(child.id()) {
                ask_for_vcpu_states(child.id(), &err_text);
            }
            hung_threads = thread_report(child.id());
            let _ = child.kill();
            let _ = child.wait();
            println!("    killed the VMM: {why}");
            killed = Some(why);
            break;
        }
        // A heartbeat, so that a long guest is never mistaken for a silent
        // (hung) nested host, whose idle timeout is shorter than `deadline`.
        if start.elapsed() >= next_beat {
            println!(
                "    (a guest is still running after {} s)",
                next_beat.as_secs()
            );
            next_beat += HEARTBEAT;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = reader.join();
    while let Ok((t, line)) = rx.try_recv() {
        if marker_at.is_none() && line.contains(marker) {
            marker_at = Some(t - start);
        }
        console.push_str(&line);
    }
    let _ = err_reader.join();
    let mut stderr = std::mem::take(&mut *err_text.lock().unwrap());
    stderr.push_str(&hung_threads);
    GuestRun {
        status,
        killed,
        console,
        stderr,
        marker_at,
        elapsed: start.elapsed(),
    }
}

/// Prints a line every HEARTBEAT until dropped, for waits that print
/// nothing of their own (a VM embedded in the test process, several guests
/// at once): a silent test would look like a hung nested host.
pub struct Heartbeat {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Heartbeat {
    pub fn start(what: &str) -> Heartbeat {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (flag, what) = (stop.clone(), what.to_string());
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut next = HEARTBEAT;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if start.elapsed() >= next {
                    println!("    ({what} still running after {} s)", next.as_secs());
                    next += HEARTBEAT;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Heartbeat { stop }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The second flake signature of the nested host (ENVIRONMENT.md): the L2
/// guest resets suddenly, so the VMM exits 0 (a reset ends it) before /init
/// finished, the console cut off, with no word from the guest's kernel (a
/// guest crash rvm caused would print an oops or a panic first). Seen
/// mostly during boot, and now and then mid-transfer (e1000 cases, and a
/// vhost-net case where rvm is not on the data path). A VMM error exit, a
/// hang, a guest oops or a wrong result is never this.
pub fn is_nested_reset_flake(run: &GuestRun) -> bool {
    let exited_zero = run.status.is_some_and(|s| s.success());
    let cut = !run.console.ends_with('\n') || run.stderr.contains("triple-faulted");
    let kernel_spoke = ["Kernel panic", "Oops", "BUG:", "general protection", "RIP:"]
        .iter()
        .any(|w| run.console.contains(w));
    exited_zero
        && !run.init_done()
        && cut
        && !kernel_spoke
        && std::env::var_os("RVM_NESTED").is_some()
}

/// The reset flake for a VM embedded in the test process: it ended with a
/// triple fault, /init did not finish, and the guest's kernel said nothing.
/// Returns whether it is that; a reset after /init started is counted, so
/// run_suite reruns the whole case.
pub fn is_embedded_reset_flake(triple_fault: bool, console: &str) -> bool {
    let run = GuestRun {
        status: None,
        killed: None,
        console: console.to_string(),
        stderr: String::new(),
        marker_at: None,
        elapsed: Duration::ZERO,
    };
    let kernel_spoke = ["Kernel panic", "Oops", "BUG:", "general protection", "RIP:"]
        .iter()
        .any(|w| console.contains(w));
    let flake = triple_fault
        && !run.init_done()
        && !kernel_spoke
        && std::env::var_os("RVM_NESTED").is_some();
    if flake {
        println!("    the embedded guest reset suddenly (nested-host reset flake)");
        if init_started(&run) {
            MIDRUN_RESETS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    flake
}

/// Whether the guest's /init had started (boot was over).
fn init_started(run: &GuestRun) -> bool {
    run.console
        .lines()
        .any(|l| l.trim_end_matches('\r') == "rvm-init: start")
}

pub const MAX_FLAKE_RETRIES: u32 = 2;

/// Nested-host kernel panics one guest suite absorbs in all (see
/// run_nested_suite); each costs a nested-host boot, about a minute.
pub const MAX_NESTED_PANICS: u32 = 10;

/// Nested-host hangs one guest suite absorbs (within MAX_NESTED_PANICS);
/// each costs the suite's idle timeout and a nested-host boot.
pub const MAX_NESTED_HANGS: u32 = 4;

/// Nested-host kernel panics or hangs in a row with no test verdict in
/// between.
pub const MAX_STALLED_PANICS: u32 = 3;

/// The bounds a suite runs with: MAX_STALLED_PANICS and MAX_FLAKE_RETRIES
/// (whole-case reruns) unless the suite's main sets more. Only the load
/// suite does: eight guests at once multiply the nested host's exposure,
/// and its kernel panicked in most 8-guest attempts seen.
pub static STALLED_PANICS: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(MAX_STALLED_PANICS);
pub static CASE_RERUNS: std::sync::atomic::AtomicU32 =
    std::sync::atomic::AtomicU32::new(MAX_FLAKE_RETRIES);

/// Guests of this process that reset suddenly after /init started (the
/// reset flake mid-run); run_suite reruns the case they belonged to.
static MIDRUN_RESETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// What hit the running case, for run_suite's RETRY line; None: the reset
/// flake.
static CASE_FLAKE_WHY: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn lock_why() -> std::sync::MutexGuard<'static, Option<String>> {
    CASE_FLAKE_WHY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks the running case as hit by the nested host's reset flake, so that
/// run_suite reruns it whole (cases with several guests at once).
pub fn note_case_flake() {
    MIDRUN_RESETS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// The guest RAM `rvm run` gives the guest of `cmd` (its `--mem`, MiB or
/// with a K, M or G suffix; rvm's 256 MiB without one).
pub fn guest_mem_bytes(cmd: &Command) -> u64 {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let v = args
        .iter()
        .position(|a| a == "--mem")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.to_ascii_uppercase());
    let Some(v) = v else { return 256 << 20 };
    let (num, shift) = match v.trim_end_matches("IB").trim_end_matches('B') {
        s if s.ends_with('K') => (s.trim_end_matches('K').to_string(), 10),
        s if s.ends_with('M') => (s.trim_end_matches('M').to_string(), 20),
        s if s.ends_with('G') => (s.trim_end_matches('G').to_string(), 30),
        s => (s.to_string(), 20),
    };
    num.parse::<u64>().map_or(256 << 20, |n| n << shift)
}

/// The nested host's state-corruption fault: a vCPU report (rvm's SIGUSR1
/// lines, asked for at the deadline) whose CR3 puts the page tables beyond
/// the guest's RAM, a state the guest cannot be in. Seen in fresh-clone
/// runs on 2026-11-30 on the minimal kernel (built without modules and
/// without KASLR) in a 256 MiB guest: RIP == CR2 in the module area,
/// RSP in a randomized vmalloc area, CR3 at 4.2 GiB: the nested host's
/// own kernel state (it has modules, KASLR and 6 GiB) in the guest's
/// vCPU, which then faults on that fetch for good. rvm never writes a
/// vCPU's CR3 after boot. Returns the offending line.
pub fn foreign_vcpu_state(stderr: &str, mem: u64) -> Option<String> {
    const GIB: u64 = 1 << 30;
    // RAM is [0, 3 GiB) and, for more, from 4 GiB on (the MMIO hole).
    let low = mem.min(3 * GIB);
    let high = 4 * GIB..4 * GIB + mem.saturating_sub(3 * GIB);
    stderr
        .lines()
        .filter(|l| l.contains("vCPU"))
        .find(|l| {
            let cr3 = l
                .split_once(" cr3 0x")
                .and_then(|(_, r)| r.split_whitespace().next())
                .and_then(|h| u64::from_str_radix(h, 16).ok());
            cr3.is_some_and(|cr3| {
                let base = cr3 & 0x000f_ffff_ffff_f000;
                base != 0 && base >= low && !high.contains(&base)
            })
        })
        .map(|l| l.trim().to_string())
}

/// The guest's kernel died faulting on its own entry stack (the per-CPU
/// cpu_entry_area at 0xfffffe0000000000: the oops's RSP there and CR2 just
/// below it, "Fatal exception in interrupt"): an event delivered over and
/// over onto the trampoline stack, which only the CPU (here the emulated
/// SVM under L1 KVM) does. The same fault as the nested host's own
/// "stack guard page was hit" signature, one level down; seen once in a
/// vhost-net multiqueue case, where rvm is not on the data path at all.
/// Returns the oops's CR2 line.
pub fn nested_guest_entry_stack_fault(run: &GuestRun) -> Option<String> {
    std::env::var_os("RVM_NESTED")?;
    entry_stack_fault(&run.console)
}

/// [`nested_guest_entry_stack_fault`]'s reading of a console.
pub fn entry_stack_fault(console: &str) -> Option<String> {
    if !console.contains("Kernel panic - not syncing: Fatal exception") {
        return None;
    }
    let on_entry_stack = console.lines().any(|l| l.contains("RSP: 0000:fffffe0000"));
    let cr2 = console.lines().find(|l| l.contains("CR2: fffffe0000"))?;
    on_entry_stack.then(|| cr2.trim().to_string())
}

/// Runs a guest, retrying (at most MAX_FLAKE_RETRIES times, visibly) only
/// on the nested host's reset flake during boot.
pub fn run_guest_retrying(name: &str, make: impl Fn() -> Command, deadline: Duration) -> GuestRun {
    let mut attempt = 0;
    let mem = guest_mem_bytes(&make());
    loop {
        let run = run_with_deadline(make(), deadline, "rvm-init: start");
        let foreign = run
            .status
            .is_none()
            .then(|| foreign_vcpu_state(&run.stderr, mem))
            .flatten()
            .filter(|_| std::env::var_os("RVM_NESTED").is_some());
        // A known fault of the emulated SVM: the guest (or, after /init
        // started, the whole case) is run again.
        let fault = foreign
            .map(|line| format!(
                "a vCPU's state at the deadline is not the guest's (its CR3 lies beyond the guest's {} MiB: {line}): the nested host put its own state there (known TCG nested-SVM fault, not an rvm failure)",
                mem >> 20
            ))
            .or_else(|| {
                nested_guest_entry_stack_fault(&run).map(|cr2| format!(
                    "the guest's kernel faulted on its own entry stack ({cr2}, \"Fatal exception in interrupt\"): an event delivered over and over onto the trampoline stack, the emulated SVM's fault (known TCG nested-SVM fault, not an rvm failure)"
                ))
            });
        if let Some(why) = fault {
            if init_started(&run) || attempt == MAX_FLAKE_RETRIES {
                if init_started(&run) {
                    *lock_why() = Some(why);
                    MIDRUN_RESETS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                return run;
            }
            attempt += 1;
            println!("RETRY {attempt}/{MAX_FLAKE_RETRIES} {name}: {why}");
            continue;
        }
        if !is_nested_reset_flake(&run) {
            return run;
        }
        for line in run.stderr.lines().filter(|l| l.contains("triple")) {
            println!("    rvm: {line}");
        }
        if init_started(&run) {
            // The host side of the scenario (listeners, senders) is spent:
            // only the whole case can start over (run_suite does).
            MIDRUN_RESETS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return run;
        }
        if attempt == MAX_FLAKE_RETRIES {
            return run;
        }
        attempt += 1;
        let last = run.console.lines().last().unwrap_or("").to_string();
        println!(
            "RETRY {attempt}/{MAX_FLAKE_RETRIES} {name}: the guest reset suddenly during boot and the VMM exited 0 with the console cut at {last:?}, no oops or panic (known nested-host flake)"
        );
    }
}

/// A named guest test: Ok, or Err with what went wrong and the console.
pub type Case<I> = (String, Box<dyn Fn(&I) -> Result<(), String>>);

/// A case of the suite: its name and what it does.
pub fn case(name: &str, f: impl Fn(&Images) -> Result<(), String> + 'static) -> Case<Images> {
    (name.to_string(), Box::new(f))
}

/// The runner the guest test binaries share (harness = false): prints where
/// guests run, re-executes inside the nested host when needed, filters by
/// the free arguments, and prints a libtest-style summary.
pub fn run_suite<I>(
    what: &str,
    cases: Vec<Case<I>>,
    nested_args: &[&str],
    setup: impl Fn() -> Result<I, String>,
) {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if std::env::args().any(|a| a == "--list") {
        for (name, _) in &cases {
            println!("{name}: test");
        }
        return;
    }
    let exact = std::env::args().any(|a| a == "--exact");
    let selected: Vec<Case<I>> = cases
        .into_iter()
        .filter(|(n, _)| {
            args.is_empty()
                || args.iter().any(|a| {
                    if exact {
                        n == a
                    } else {
                        n.contains(a.as_str())
                    }
                })
        })
        .collect();
    match placement() {
        Placement::Direct(why) => println!("{what}: running directly ({why})"),
        Placement::Nested(why) => {
            println!("{what}: running inside the nested host ({why})");
            let names = selected.iter().map(|(n, _)| n.clone()).collect();
            std::process::exit(run_nested_suite(nested_args, names));
        }
    }
    println!("\nrunning {} tests", selected.len());
    let ctx = setup();
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, f) in &selected {
        let t = Instant::now();
        let mut reruns = 0;
        let result = loop {
            let resets = MIDRUN_RESETS.load(std::sync::atomic::Ordering::SeqCst);
            let r = match &ctx {
                Ok(c) => f(c),
                Err(e) => Err(e.clone()),
            };
            let reset = MIDRUN_RESETS.load(std::sync::atomic::Ordering::SeqCst) != resets;
            let bound = CASE_RERUNS.load(std::sync::atomic::Ordering::SeqCst);
            let why = lock_why().take().unwrap_or_else(|| {
                "a guest reset suddenly after /init started (rvm exited 0 after a triple fault, console cut, no oops or panic: the nested host's reset flake)".to_string()
            });
            if r.is_err() && reset && reruns < bound {
                reruns += 1;
                println!(
                    "RETRY {reruns}/{bound} {name}: {why}; rerunning the whole case, host side included"
                );
                continue;
            }
            break r;
        };
        match result {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1} s)", t.elapsed().as_secs_f64());
            }
            Err(e) => {
                println!(
                    "test {name} ... FAILED ({:.1} s)\n{e}",
                    t.elapsed().as_secs_f64()
                );
                failed.push(name.clone());
            }
        }
    }
    let verdict = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {} failed; 0 ignored; 0 measured; 0 filtered out",
        failed.len()
    );
    if !failed.is_empty() {
        println!("failures: {}", failed.join(", "));
        std::process::exit(101);
    }
}

/// A guest started by [`spawn_until`], running on while the test works
/// with it.
pub struct Spawned {
    pub child: std::process::Child,
    /// Collects the console after the marker, until rvm exits.
    console: std::thread::JoinHandle<String>,
}

impl Spawned {
    /// The console after the marker, until rvm ended: call it once the
    /// child has exited (it waits for the console to close).
    pub fn console_after_exit(self) -> String {
        self.console.join().unwrap_or_default()
    }

    /// Ends the guest with SIGTERM ([`sigterm_and_wait`]). If rvm ended
    /// by itself first, that is an error, and when it is the nested host's
    /// reset flake (rvm exited 0 after a triple fault, the guest's kernel
    /// silent) the case is marked for a rerun and the error says so: a
    /// test that talks to a running guest sees the flake only as traffic
    /// that stops.
    pub fn stop(mut self) -> Result<(), String> {
        let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? else {
            return sigterm_and_wait(self.child);
        };
        let mut stderr = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        let run = GuestRun {
            status: Some(status),
            killed: None,
            console: self.console.join().unwrap_or_default(),
            stderr,
            marker_at: None,
            elapsed: Duration::ZERO,
        };
        if is_nested_reset_flake(&run) {
            note_case_flake();
            return Err(format!(
                "the guest reset suddenly during the test (the nested host's reset flake)\n{}",
                run.tail(10)
            ));
        }
        Err(format!(
            "rvm ended by itself during the test ({status})\n{}",
            run.tail(30)
        ))
    }
}

/// Spawns `cmd` (an rvm run) and returns once its console prints a line
/// containing `marker`, with the running guest. Bounded by `deadline`,
/// with a heartbeat, like every guest run: a silent wait here would look
/// like the nested host hanging.
pub fn spawn_until(
    mut cmd: Command,
    marker: &'static str,
    deadline: Duration,
) -> Result<Spawned, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let rest = std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
        for l in lines.by_ref() {
            let seen = l.contains(marker);
            if tx.send(l).is_err() || seen {
                break;
            }
        }
        lines.collect::<Vec<_>>().join("\n")
    });
    let start = Instant::now();
    let mut seen = String::new();
    let mut beat = Duration::from_secs(60);
    while start.elapsed() < deadline {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(l) if l.contains(marker) => {
                return Ok(Spawned {
                    child,
                    console: rest,
                })
            }
            Ok(l) => {
                seen.push_str(&l);
                seen.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if start.elapsed() >= beat {
            println!(
                "    (a guest is still coming up after {} s)",
                beat.as_secs()
            );
            beat += Duration::from_secs(60);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    Err(format!(
        "the guest never printed {marker:?}:\n{seen}\n{err}"
    ))
}

/// Sends SIGTERM to an rvm spawned by [`spawn_until`] (through `ip netns
/// exec`, which exec'd it) and waits at most 30 s for it to exit with 0.
pub fn sigterm_and_wait(mut child: std::process::Child) -> Result<(), String> {
    // SAFETY: kill(2) on the pid of our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            return if s.success() {
                Ok(())
            } else {
                Err(format!("rvm exited with {s} after SIGTERM"))
            };
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            return Err("rvm still ran 30 s after SIGTERM".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sha256 of a file, as `sha256sum` prints it.
pub fn sha256(path: &Path) -> Result<String, String> {
    let o = Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

/// Err unless the guest reported `key=want`.
pub fn expect(run: &GuestRun, key: &str, want: &str) -> Result<(), String> {
    match run.result(key) {
        Some(v) if v == want => Ok(()),
        got => Err(format!(
            "guest reported {key}={got:?}, expected {want:?}\n{}",
            run.tail(30)
        )),
    }
}

/// A file of `mib` MiB of random bytes at `path`, for a transfer to check.
pub fn random_file(path: &Path, mib: u64) -> Result<(), String> {
    let out = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let s = Command::new("head")
        .args(["-c", &format!("{mib}M"), "/dev/urandom"])
        .stdout(out)
        .status()
        .map_err(|e| e.to_string())?;
    if s.success() {
        Ok(())
    } else {
        Err(format!("head -c {mib}M /dev/urandom failed: {s}"))
    }
}

/// A host listener in `ns` on `port` that writes what it gets to `to`
/// (socat), started before the guest sends.
pub fn host_listener(
    ns: &netns::Netns,
    port: u16,
    to: &Path,
) -> Result<std::process::Child, String> {
    ns.command("socat")
        .args(["-u", &format!("TCP-LISTEN:{port},reuseaddr")])
        .arg(format!("OPEN:{},creat,trunc", to.display()))
        .spawn()
        .map_err(|e| e.to_string())
}

/// A host sender in `ns` of `file` to the guest's `port`, connecting
/// (retrying) once the guest listens.
pub fn host_sender(
    ns: &netns::Netns,
    file: &Path,
    port: u16,
) -> Result<std::process::Child, String> {
    host_sender_to(ns, file, &format!("10.0.0.2:{port}"))
}

/// [`host_sender`] to `addr` (HOST:PORT).
pub fn host_sender_to(
    ns: &netns::Netns,
    file: &Path,
    addr: &str,
) -> Result<std::process::Child, String> {
    ns.command("socat")
        .arg("-u")
        .arg(format!("OPEN:{}", file.display()))
        .arg(format!("TCP:{addr},retry=600,interval=0.5"))
        .spawn()
        .map_err(|e| e.to_string())
}

/// Waits for a listener to end, at most 60 s from `since`, then stops it.
/// A listener ends when the guest's stream does; a guest that never sent
/// (it failed, hung or reset) would leave it, and the test, waiting
/// forever, silent: the nested host's hang detector would then take an
/// rvm failure for its own hang. So it is bounded.
pub fn end_listener(server: &mut std::process::Child, since: Instant) {
    while matches!(server.try_wait(), Ok(None)) && since.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
}
