//! rvm as a library, the way a sandbox platform embeds it: VMs built from
//! a `VmConfig` in this very process, consoles read through our own
//! writer, NIC counters read while the guest runs, graceful and forced
//! stops, a TAP fd opened by the caller, several VMs at once. Like the
//! other guest suites it runs directly on a host with VT-x/AMD-V and inside
//! the nested host otherwise, each case in a network namespace it makes.

mod common;

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::{
    case, images, is_embedded_reset_flake, note_case_flake, run_suite, vcpu_report, Case,
    Heartbeat, Images, MAX_FLAKE_RETRIES,
};
use rvm::{ExitReason, NetConfig, RunningVm, Vm, VmConfig};

const BOOT: Duration = Duration::from_secs(300);

/// A console writer that keeps everything and wakes whoever waits for a line.
#[derive(Clone, Default)]
struct Console(Arc<(Mutex<String>, Condvar)>);

impl Write for Console {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let (text, cv) = &*self.0;
        text.lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(b).replace('\r', ""));
        cv.notify_all();
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Console {
    fn text(&self) -> String {
        self.0 .0.lock().unwrap().clone()
    }

    /// Waits for a line containing `marker`, or for the VM to end, or for
    /// its vCPUs to be stuck after SILENCE_SECS without a console byte
    /// (see common::SILENCE_SECS).
    fn wait_for(&self, marker: &str, vm: &rvm::VmController, within: Duration) -> bool {
        let (text, cv) = &*self.0;
        let start = Instant::now();
        let deadline = start + within;
        let silence = Duration::from_secs(common::SILENCE_SECS.load(Ordering::SeqCst));
        let mut next_look = start + silence;
        loop {
            let silent = {
                let t = text.lock().unwrap();
                if t.contains(marker) {
                    return true;
                }
                let now = Instant::now();
                if now >= deadline || vm.has_ended() {
                    return false;
                }
                let wait = (deadline - now).min(Duration::from_millis(200));
                let t = cv.wait_timeout(t, wait).unwrap().0;
                t.is_empty()
            };
            // (The console lock is not held here: a vCPU writing to the
            // console must be free to answer.)
            if silent && Instant::now() >= next_look {
                next_look += silence;
                let look =
                    || -> Vec<String> { vm.vcpu_states().iter().map(|r| r.to_string()).collect() };
                let first = look();
                std::thread::sleep(Duration::from_secs(2));
                if common::vcpus_stuck(&first, &look()) {
                    println!(
                        "    the guest printed nothing at all for {} s and its vCPUs are stuck",
                        (next_look - start - silence).as_secs()
                    );
                    return false;
                }
                println!("    (the guest has printed nothing yet, but its vCPUs are working: waiting on)");
            }
        }
    }

    fn tail(&self) -> String {
        let t = self.text();
        let lines: Vec<&str> = t.lines().collect();
        format!(
            "--- console (last 30 lines) ---\n{}",
            lines[lines.len().saturating_sub(30)..].join("\n")
        )
    }
}

fn config(kernel: &std::path::Path, img: &Images, scenario: &str, args: &str) -> VmConfig {
    let mut c = VmConfig::new(kernel);
    c.initrd = Some(img.initramfs.clone());
    c.mem_mib = 256;
    c.cmdline = format!(
        "{} rvm.scenario={scenario} rvm.args={args}",
        common::base_cmdline()
    );
    c
}

fn bridged(tap: &str) -> NetConfig {
    let mut n = NetConfig::tap(tap);
    n.bridge = Some("br0".into());
    n.vhost = rvm::VhostMode::Off;
    n
}

/// Builds and starts the VM and waits until its console says `marker`.
/// A nested-host reset during boot starts it again (bounded, said so).
fn boot_until(name: &str, config: &VmConfig, marker: &str) -> Result<(RunningVm, Console), String> {
    for attempt in 0..=MAX_FLAKE_RETRIES {
        let console = Console::default();
        let mut vm = Vm::new(config, Box::new(console.clone()))
            .and_then(Vm::start)
            .map_err(|e| format!("{name}: {e}"))?;
        if console.wait_for(marker, &vm.controller(), BOOT) {
            return Ok((vm, console));
        }
        let states = if vm.controller().has_ended() {
            String::new()
        } else {
            vcpu_report(&vm.controller())
        };
        let reason = vm.wait_timeout(Duration::ZERO);
        let flake =
            is_embedded_reset_flake(reason == Some(ExitReason::TripleFault), &console.text());
        if !flake || attempt == MAX_FLAKE_RETRIES {
            return Err(format!(
                "{name}: no {marker:?} on the console (VM ended: {reason:?})\n{}{states}",
                console.tail()
            ));
        }
        println!(
            "RETRY {}/{MAX_FLAKE_RETRIES} {name}: the guest reset during boot (known nested-host flake)",
            attempt + 1
        );
    }
    unreachable!()
}

/// The stock kernel on a bridge: the host pings it, the NIC's counters
/// show the frames both ways while it runs, and a graceful shutdown
/// (Ctrl-Alt-Del) makes the guest's own kernel restart, which ends the VM.
fn stock_counts_and_stops_on_ctrl_alt_del(img: &Images) -> Result<(), String> {
    let ns = Netns::new("apistock")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let mut c = config(&img.stock, img, "net_idle", "ip=10.0.0.2/24");
    c.mem_mib = 512;
    c.nics.push(bridged("rvmapi0"));
    ns.run_inside(|| {
        let _beat = Heartbeat::start("the embedded VMs are");
        let (mut vm, console) = boot_until("stock", &c, "rvm-init: idle")?;
        let before = vm.nic_counters();
        ns.sh("ping -c 5 -W 5 10.0.0.2")?;
        let after = vm.nic_counters();
        let (b, a) = (before[0].counters, after[0].counters);
        if after[0].name != "rvmapi0" || after[0].model != rvm::NicModel::Virtio {
            return Err(format!("NIC identity: {:?}", after[0]));
        }
        // Five echo requests in, five replies out (plus any ARP).
        if a.rx_frames < b.rx_frames + 5 || a.tx_frames < b.tx_frames + 5 {
            return Err(format!("counters did not follow 5 pings: {b:?} -> {a:?}"));
        }
        if a.rx_bytes < b.rx_bytes + 5 * 98 || a.tx_bytes < b.tx_bytes + 5 * 98 {
            return Err(format!("byte counters did not follow 5 pings: {b:?} -> {a:?}"));
        }
        let t = Instant::now();
        let reason = vm.shutdown(Duration::from_secs(120));
        if reason != ExitReason::Reset || !console.text().contains("reboot: Restarting system") {
            return Err(format!(
                "graceful shutdown ended with {reason:?} after {:?}, wanted the guest's own restart\n{}",
                t.elapsed(),
                console.tail()
            ));
        }
        drop(vm);
        ns.no_taps_left()
    })?
}

/// A guest without a keyboard (`i8042.nokbd`) cannot see Ctrl-Alt-Del:
/// shutdown waits the grace period, then forces the stop.
fn minimal_ignores_ctrl_alt_del_and_is_forced(img: &Images) -> Result<(), String> {
    let ns = Netns::new("apiforce")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let mut c = config(&img.minimal, img, "idle", "");
    c.cmdline.push_str(" i8042.nokbd");
    c.nics.push(bridged("rvmapi1"));
    ns.run_inside(|| {
        let _beat = Heartbeat::start("the embedded VMs are");
        let (mut vm, console) = boot_until("minimal", &c, "rvm-init: idle")?;
        let t = Instant::now();
        let reason = vm.shutdown(Duration::from_secs(3));
        let took = t.elapsed();
        if reason != ExitReason::Stopped || took < Duration::from_secs(3) {
            return Err(format!(
                "shutdown gave {reason:?} after {took:?}; wanted a forced stop after the 3 s grace\n{}",
                console.tail()
            ));
        }
        // wait() after the end returns the same reason at once.
        if vm.wait() != ExitReason::Stopped {
            return Err("wait() after shutdown changed its answer".into());
        }
        drop(vm);
        ns.no_taps_left()
    })?
}

/// Opens TAP `name` the way a sandbox platform would before handing it
/// over: /dev/net/tun, TUNSETIFF with a vnet header, not persistent.
fn open_tap(name: &str) -> Result<OwnedFd, String> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a 40-byte ifreq, which `req` is.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) } != 0 {
        return Err(format!(
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: into_raw_fd gives up the File's ownership of the open fd.
    Ok(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(f)) })
}

/// Two VMs in this one process on one bridge, the second on a TAP fd the
/// test opened: the second pings the first, each VM's counters show its
/// own traffic, and every TAP is gone once both are dropped.
fn two_vms_in_one_process_one_on_a_tap_fd(img: &Images) -> Result<(), String> {
    let ns = Netns::new("apitwo")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let mut a = config(&img.minimal, img, "net_idle", "ip=10.0.0.2/24");
    a.nics.push(bridged("rvmapia"));
    ns.run_inside(|| {
        let _beat = Heartbeat::start("the embedded VMs are");
        let fds_before = open_fds();
        let fd = open_tap("rvmapifd")?;
        ns.sh("ip link set rvmapifd master br0 && ip link set rvmapifd up")?;
        let mut b = config(
            &img.minimal,
            img,
            "net_ping",
            "ip=10.0.0.3/24,peer=10.0.0.2",
        );
        let mut nic = NetConfig::tap_fd(fd);
        nic.vhost = rvm::VhostMode::Off;
        b.nics.push(nic);
        let (mut va, _ca) = boot_until("vm a", &a, "rvm-init: idle")?;
        let (mut vb, cb) = boot_until("vm b", &b, "rvm-init: start")?;
        let rb = vb.wait_timeout(BOOT);
        let text = cb.text();
        if rb == Some(ExitReason::TripleFault) && is_embedded_reset_flake(true, &text) {
            note_case_flake();
            return Err("vm b reset (nested-host flake)".into());
        }
        if rb != Some(ExitReason::Reset) || !text.contains("rvm-result: ping_ok=1") {
            return Err(format!("vm b ended with {rb:?}\n{}", cb.tail()));
        }
        let (ca, cb) = (va.nic_counters()[0].clone(), vb.nic_counters()[0].clone());
        if cb.name != "rvmapifd" {
            return Err(format!("the fd NIC is called {:?}", cb.name));
        }
        if ca.counters.rx_frames < 3 || cb.counters.tx_frames < 3 {
            return Err(format!(
                "counters: a {:?}, b {:?}",
                ca.counters, cb.counters
            ));
        }
        va.stop();
        if va.wait() != ExitReason::Stopped {
            return Err("vm a did not report a forced stop".into());
        }
        drop((va, vb));
        ns.no_taps_left()?;
        // Nothing of either VM stays open in this process.
        let fds_after = open_fds();
        if fds_after != fds_before {
            return Err(format!(
                "open fds: {fds_before} before, {fds_after} after both VMs"
            ));
        }
        Ok(())
    })?
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// What a thread's /proc status says of its seccomp mode (2: filter).
fn seccomp_of_threads() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        out.push((comm.trim().to_string(), mode));
    }
    out
}

/// Code of ours that runs on a vCPU thread (the console writer) tries
/// what rvm's threads never do: open a file, make an inet socket. The
/// seccomp filter refuses both with EPERM, and the guest goes on to ping
/// and reboot. Every vCPU and NIC thread runs under the filter; this
/// thread does not.
fn seccomp_refuses_a_forbidden_call_and_the_vm_runs_on(img: &Images) -> Result<(), String> {
    let ns = Netns::new("apiseccomp")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let mut c = config(&img.minimal, img, "net_ping", "ip=10.0.0.2/24,count=5");
    c.vcpus = 2;
    c.nics.push(bridged("rvmsec0"));
    ns.run_inside(|| {
        let _beat = Heartbeat::start("the embedded VMs are");
        let probe = Probe::default();
        let for_vm = probe.clone();
        let mut vm = Vm::new(&c, Box::new(for_vm))
            .and_then(Vm::start)
            .map_err(|e| e.to_string())?;
        // While the guest pings, look at every thread's seccomp mode.
        let deadline = Instant::now() + BOOT;
        let mut threads = Vec::new();
        while Instant::now() < deadline && !vm.controller().has_ended() {
            if probe.console.text().contains("rvm-init: start") {
                threads = seccomp_of_threads();
                if threads.iter().any(|(n, _)| n == "net0") {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let reason = vm.wait_timeout(BOOT);
        let text = probe.console.text();
        if reason == Some(ExitReason::TripleFault) && is_embedded_reset_flake(true, &text) {
            note_case_flake();
            return Err("the guest reset (nested-host flake)".into());
        }
        let results = probe.results.lock().unwrap().clone();
        if results.as_deref() != Some("open=EPERM socket=EPERM") {
            return Err(format!(
                "forbidden calls from a vCPU thread gave {results:?}"
            ));
        }
        if reason != Some(ExitReason::Reset) || !text.contains("rvm-result: ping_ok=1") {
            return Err(format!(
                "the VM did not run on: {reason:?}\n{}",
                probe.console.tail()
            ));
        }
        let confined: Vec<_> = threads
            .iter()
            .filter(|(n, _)| n.starts_with("vcpu") || n == "net0")
            .collect();
        let names: Vec<&str> = confined.iter().map(|(n, _)| n.as_str()).collect();
        if names.len() != 3 || confined.iter().any(|(_, m)| m != "2") {
            return Err(format!("threads and their seccomp modes: {threads:?}"));
        }
        let me = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
        if !me
            .lines()
            .any(|l| l.starts_with("Seccomp:") && l.ends_with('0'))
        {
            return Err("the embedding thread was confined too".into());
        }
        drop(vm);
        ns.no_taps_left()
    })?
}

/// A console that, at /init's first line, tries two forbidden calls
/// from the vCPU thread that writes it, and records what they returned.
#[derive(Clone, Default)]
struct Probe {
    console: Console,
    results: Arc<Mutex<Option<String>>>,
}

impl Write for Probe {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.console.write(b)?;
        let mut results = self.results.lock().unwrap();
        if results.is_none() && self.console.text().contains("rvm-init: start") {
            let errno = |r: std::io::Error| match r.raw_os_error() {
                Some(libc::EPERM) => "EPERM".to_string(),
                _ => format!("{r}"),
            };
            let open = match std::fs::File::open("/etc/hostname") {
                Ok(_) => "allowed".to_string(),
                Err(e) => errno(e),
            };
            // SAFETY: socket(2) with constant arguments; a success is closed.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let socket = if fd >= 0 {
                // SAFETY: closing the fd just made.
                unsafe { libc::close(fd) };
                "allowed".to_string()
            } else {
                errno(std::io::Error::last_os_error())
            };
            *results = Some(format!("open={open} socket={socket}"));
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A TX limit changed while the guest streams to the host: 6 Mbit/s
/// from the start, then 12 Mbit/s through the controller (the guest's
/// `cat | nc` stream is CPU-bound in the nested host near 16 Mbit/s, so
/// the limits stay well under it); the rate the
/// TAP's counters show (the kernel's, on the host's clock) follows within
/// 10 % in the seconds after, from 1 s after the change. The NIC's info
/// then shows the new limits and the throttling.
fn rate_limit_changed_while_running(img: &Images) -> Result<(), String> {
    use common::netns::rate_between;
    use rvm::net::rate_limit::{Bucket, DirectionLimits, RateLimits};
    let ns = Netns::new("apilimit")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let tx = |bits| -> Result<RateLimits, String> {
        Ok(RateLimits {
            tx: DirectionLimits {
                bandwidth: Some(Bucket::bandwidth(bits, None).map_err(|e| e.to_string())?),
                ops: None,
            },
            ..RateLimits::default()
        })
    };
    let mut c = config(&img.minimal, img, "net_stream", "port=5001,secs=120");
    // The stream's cat and nc on CPUs of their own.
    c.vcpus = 2;
    // Rates a guest reaches even when the nested host is slow (one CI run
    // saw a nested host about to hang stream only ~10 Mbit/s), so that
    // the limit, not the guest, sets the pace.
    let (before, after) = (3_000_000, 6_000_000);
    let mut nic = bridged("rvmapil");
    nic.limits = tx(before)?;
    c.nics.push(nic);
    let mut listener = ns
        .command("socat")
        .args(["-u", "TCP-LISTEN:5001,reuseaddr", "OPEN:/dev/null"])
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut sampler = ns.sample_link("rvmapil")?;
    let r = ns.run_inside(|| {
        let _beat = Heartbeat::start("the embedded VM is");
        let (mut vm, console) = boot_until("limit", &c, "rvm-result: chunk_sha256")?;
        // Wait for the stream to flow (1 MiB through the TAP).
        let t = Instant::now();
        loop {
            let s = sampler.samples();
            if s.last().map_or(0, |l| l.rx_bytes) > s.first().map_or(0, |f| f.rx_bytes) + (1 << 20)
            {
                break;
            }
            if t.elapsed() > Duration::from_secs(120) || vm.controller().has_ended() {
                return Err(format!(
                    "the guest's stream never flowed\n{}",
                    console.tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(5));
        let changed = common::netns::now();
        vm.controller()
            .set_nic_rate_limits(0, tx(after)?)
            .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_secs(1));
        let throttled_then = vm.nic_counters().remove(0).throttled.tx;
        std::thread::sleep(Duration::from_secs(7));
        let info = vm.nic_counters().remove(0);
        vm.stop();
        vm.wait();
        Ok((changed, info, throttled_then))
    })?;
    let _ = listener.kill();
    let _ = listener.wait();
    let (changed, info, throttled_then) = r?;
    let samples = sampler.samples();
    let window = |t0: f64, t1: f64| {
        let inside: Vec<_> = samples.iter().filter(|s| s.t >= t0 && s.t <= t1).collect();
        let (a, b) = (inside.first()?, inside.last()?);
        (b.t > a.t).then(|| (b.rx_bytes - a.rx_bytes) as f64 * 8.0 / (b.t - a.t))
    };
    for (what, got, limit) in [
        (
            "before the change",
            window(changed - 4.0, changed - 0.2),
            before as f64,
        ),
        (
            "from 1 s after it",
            window(changed + 1.0, changed + 7.5),
            after as f64,
        ),
    ] {
        match got {
            Some(g) if (g - limit).abs() <= limit * 0.1 => {
                println!(
                    "    {what}: {:.1} Mbit/s, limit {:.0}",
                    g / 1e6,
                    limit / 1e6
                )
            }
            _ => {
                // Whether the limiter held frames in the late window
                // tells a limit that is off from a guest that was slower.
                return Err(format!(
                    "{what}: {got:?} bit/s, limit {limit}; throttled events from 1 s after \
                     the change to the end: {}; all: {:?}; overall {:?}",
                    info.throttled.tx.saturating_sub(throttled_then),
                    samples.iter().step_by(10).collect::<Vec<_>>(),
                    rate_between(&samples, |s| s.rx_bytes, 0, u64::MAX)
                ));
            }
        }
    }
    if info.limits != tx(after)? || info.throttled.tx == 0 {
        return Err(format!("the NIC's info after the change: {info:?}"));
    }
    ns.no_taps_left()
}

/// The owner changes a NIC's egress policy while the guest probes port
/// 5002 of the host every half second: refused (RST) under the first
/// policy, connected from the next try after the change on, with the rule
/// counts in `NicInfo::egress` showing each policy's verdicts; lifting
/// the policy takes its tables away.
fn egress_changed_while_running(img: &Images) -> Result<(), String> {
    use rvm::net::egress::{Action, EgressDefault, EgressPolicy};
    let ns = Netns::new("apiegress")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let policy = |ports: &[u16]| -> Result<EgressPolicy, String> {
        let mut p = EgressPolicy::new(EgressDefault::Deny);
        for port in ports {
            p = p
                .rule(Action::Allow, &format!("10.0.0.1:{port}/tcp"))
                .map_err(|e| e.to_string())?;
        }
        Ok(p)
    };
    let mut c = config(
        &img.minimal,
        img,
        "net_probe",
        "probe=10.0.0.1:5002,rounds=60,pause=0.5",
    );
    let mut nic = bridged("rvmapie");
    nic.egress = Some(policy(&[5001])?);
    c.nics.push(nic);
    let mut listener = ns
        .command("socat")
        .args(["TCP-LISTEN:5002,fork,reuseaddr", "SYSTEM:echo hi"])
        .spawn()
        .map_err(|e| e.to_string())?;
    let tables = || -> Result<usize, String> {
        Ok(ns.sh("nft list tables")?.matches("rvm_egress_").count())
    };
    let tries = |console: &Console| -> Vec<String> {
        console
            .text()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rvm-result: try_"))
            .map(|l| l.rsplit('=').next().unwrap_or("").to_string())
            .collect()
    };
    let r = ns.run_inside(|| {
        let _beat = Heartbeat::start("the embedded VM is");
        let (mut vm, console) = boot_until("egress", &c, "rvm-init: probing")?;
        let ctl = vm.controller();
        let out = (|| {
            if !wait_for_count(&console, "5002=refused", 2, Duration::from_secs(60)) {
                return Err(format!("no try was refused\n{}", console.tail()));
            }
            let before = ctl
                .nic_counters()
                .remove(0)
                .egress
                .ok_or("no egress info")?;
            let n_tables = tables()?;
            let at = tries(&console).len();
            let t = Instant::now();
            ctl.set_nic_egress(0, Some(policy(&[5001, 5002])?))
                .map_err(|e| e.to_string())?;
            let set_took = t.elapsed();
            if !wait_for_count(&console, "5002=ok", 2, Duration::from_secs(30)) {
                return Err(format!(
                    "no try connected after the change\n{}",
                    console.tail()
                ));
            }
            let first_ok = t.elapsed();
            let all = tries(&console);
            // The try in flight at the change may have met either policy;
            // every one started after it meets the new one.
            if let Some(bad) = all.iter().skip(at + 1).position(|v| v != "ok") {
                return Err(format!(
                    "try {} after the change was {:?}: {all:?}",
                    at + 2 + bad,
                    all[at + 1 + bad]
                ));
            }
            let after = ctl
                .nic_counters()
                .remove(0)
                .egress
                .ok_or("no egress info")?;
            ctl.set_nic_egress(0, None).map_err(|e| e.to_string())?;
            let lifted = tables()?;
            Ok((before, after, n_tables, lifted, set_took, first_ok, at))
        })();
        vm.stop();
        vm.wait();
        out
    })?;
    let _ = listener.kill();
    let _ = listener.wait();
    let (before, after, n_tables, lifted, set_took, first_ok, at) = r?;
    let count = |info: &rvm::net::egress::EgressInfo, rule: &str| {
        info.counts
            .iter()
            .find(|c| c.rule == rule)
            .map(|c| c.packets)
            .unwrap_or(0)
    };
    if n_tables != 2 || lifted != 0 {
        return Err(format!(
            "tables while set: {n_tables} (expected 2), after lifting: {lifted}"
        ));
    }
    if count(&before, "egress=deny") == 0 || before.policy.rules.len() != 1 {
        return Err(format!("counts under the first policy: {before:?}"));
    }
    if count(&after, "allow=10.0.0.1/32:5002/tcp") == 0 || after.policy.rules.len() != 2 {
        return Err(format!("counts under the second policy: {after:?}"));
    }
    println!(
        "    refused {at} tries, set took {set_took:?}, the first try connected {first_ok:?} after; counts before {:?}, after {:?}",
        before.counts, after.counts
    );
    ns.no_taps_left()
}

/// Waits until the console has said `line` `times` times, or `within`.
fn wait_for_count(console: &Console, line: &str, times: usize, within: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if console.text().matches(line).count() >= times {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The owner pulls the NIC's cable and plugs it in again through the
/// controller: the guest's eth0 sees carrier 0, then 1; while down the
/// host's pings go unanswered (and on rvm's path no frame reaches the
/// guest), after it they are answered again.
fn link_down_and_up(
    model: rvm::NicModel,
    vhost: rvm::VhostMode,
) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("apilink")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let mut c = config(&img.minimal, img, "net_carrier", "");
        let mut nic = bridged("rvmapik");
        nic.model = model;
        nic.vhost = vhost;
        c.nics.push(nic);
        ns.run_inside(|| {
            let _beat = Heartbeat::start("the embedded VM is");
            let (mut vm, console) = boot_until("link", &c, "rvm-result: carrier=1")?;
            let ctl = vm.controller();
            let r = (|| {
                ns.sh("ping -c 2 -W 5 10.0.0.2")?;
                ctl.set_nic_link(0, false).map_err(|e| e.to_string())?;
                if !wait_for_count(
                    &console,
                    "rvm-result: carrier=0",
                    1,
                    Duration::from_secs(20),
                ) {
                    return Err(format!("the guest never saw carrier 0\n{}", console.tail()));
                }
                let before = ctl.nic_counters().remove(0);
                if ns.sh("ping -c 3 -W 1 10.0.0.2").is_ok() {
                    return Err("the guest answered pings with its link down".into());
                }
                let after = ctl.nic_counters().remove(0);
                if before.link_up || after.link_up {
                    return Err(format!("NicInfo says the link is up: {after:?}"));
                }
                if vhost == rvm::VhostMode::Off
                    && after.counters.rx_frames != before.counters.rx_frames
                {
                    return Err(format!(
                        "frames reached the guest with its link down: {before:?} -> {after:?}"
                    ));
                }
                ctl.set_nic_link(0, true).map_err(|e| e.to_string())?;
                if !wait_for_count(
                    &console,
                    "rvm-result: carrier=1",
                    2,
                    Duration::from_secs(20),
                ) {
                    return Err(format!(
                        "the guest never saw carrier 1 again\n{}",
                        console.tail()
                    ));
                }
                ns.sh("ping -c 3 -W 5 10.0.0.2").map(drop)?;
                if !ctl.nic_counters()[0].link_up {
                    return Err("NicInfo says the link is down after it came up".into());
                }
                Ok(())
            })();
            vm.stop();
            vm.wait();
            r
        })??;
        ns.no_taps_left()
    }
}

fn cases() -> Vec<Case<Images>> {
    vec![
        case(
            "api_stock_counts_frames_and_stops_on_ctrl_alt_del",
            stock_counts_and_stops_on_ctrl_alt_del,
        ),
        case(
            "api_guest_without_keyboard_is_forced_after_the_grace",
            minimal_ignores_ctrl_alt_del_and_is_forced,
        ),
        case(
            "api_two_vms_in_one_process_one_on_a_tap_fd",
            two_vms_in_one_process_one_on_a_tap_fd,
        ),
        case(
            "seccomp_refuses_a_forbidden_call_and_the_vm_runs_on",
            seccomp_refuses_a_forbidden_call_and_the_vm_runs_on,
        ),
        case(
            "api_rate_limit_changed_while_the_guest_streams",
            rate_limit_changed_while_running,
        ),
        case(
            "api_egress_policy_changed_while_the_guest_probes",
            egress_changed_while_running,
        ),
        case(
            "api_link_down_and_up_virtio",
            link_down_and_up(rvm::NicModel::Virtio, rvm::VhostMode::Off),
        ),
        case(
            "api_link_down_and_up_virtio_vhost",
            link_down_and_up(rvm::NicModel::Virtio, rvm::VhostMode::On),
        ),
        case(
            "api_link_down_and_up_e1000",
            link_down_and_up(rvm::NicModel::E1000, rvm::VhostMode::Off),
        ),
    ]
}

fn main() {
    run_suite(
        "embedding tests",
        cases(),
        &["--mem", "4096", "--idle-timeout", "180"],
        images,
    );
}
