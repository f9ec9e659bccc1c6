//! Real guests on virtio-net-pci: each test makes its own network
//! namespace with a bridge (or a host-only TAP), runs rvm inside it and
//! checks what the guest and the host see. Nothing touches any other
//! namespace. Like tests/guests.rs, this runs directly on a host with
//! VT-x/AMD-V and inside the nested host otherwise; it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::{
    case, end_listener, expect, host_listener, host_sender, images, random_file,
    run_guest_retrying, run_suite, rvm_bin, sha256, spawn_until, Case, GuestRun, Images, Spawned,
};

const DEADLINE: Duration = Duration::from_secs(300);
const TCP_MIB: u64 = 32;

#[derive(Clone, Copy, Debug)]
enum Kernel {
    Minimal,
    Stock,
}

impl Kernel {
    fn path(self, img: &Images) -> &Path {
        match self {
            Kernel::Minimal => &img.minimal,
            Kernel::Stock => &img.stock,
        }
    }
    fn mem(self) -> &'static str {
        match self {
            Kernel::Minimal => "256M",
            Kernel::Stock => "512M",
        }
    }
}

/// Which data path a case runs on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum DataPath {
    Userspace,
    Vhost,
}

impl DataPath {
    fn spec(self) -> &'static str {
        match self {
            DataPath::Userspace => "vhost=off",
            DataPath::Vhost => "vhost=on",
        }
    }

    /// rvm's log shows the data path each driver session used: `times`
    /// sessions in the kernel for vhost, none for userspace.
    fn check(self, run: &GuestRun, times: usize) -> Result<(), String> {
        let kernel = run.stderr.matches("data path: vhost-net").count();
        let want = match self {
            DataPath::Vhost => times,
            DataPath::Userspace => 0,
        };
        if kernel == want {
            Ok(())
        } else {
            Err(format!(
                "{self:?}: rvm logged {kernel} vhost-net driver sessions, wanted {want}\n{}",
                run.stderr
            ))
        }
    }
}

/// `rvm run` of `kernel` inside `ns` with scenario and args and NIC spec.
fn rvm(
    ns: &Netns,
    img: &Images,
    k: Kernel,
    scenario: &str,
    args: &str,
    net: &str,
    mem: &str,
) -> Command {
    // Every case names its data path; the userspace one unless it asks.
    let net = if net.contains("vhost=") {
        net.to_string()
    } else {
        format!("{net},vhost=off")
    };
    let mut c = ns.command(rvm_bin());
    // NIC counters at exit land in the failure report (stderr).
    c.env("RVM_LOG", "info")
        .arg("run")
        .arg("--kernel")
        .arg(k.path(img))
        .arg("--initrd")
        .arg(&img.initramfs)
        .args(["--cpus", "2", "--mem", mem, "--net", &net])
        .arg("--cmdline")
        .arg(format!(
            "{} rvm.scenario={scenario} rvm.args={args}",
            common::base_cmdline()
        ));
    c
}

fn run(
    name: &str,
    ns: &Netns,
    img: &Images,
    k: Kernel,
    scenario: &str,
    args: &str,
    net: &str,
) -> GuestRun {
    run_guest_retrying(
        name,
        || rvm(ns, img, k, scenario, args, net, k.mem()),
        DEADLINE,
    )
}

/// rvm ended with 0 after /init finished.
fn finished(run: &GuestRun) -> Result<(), String> {
    match run.status {
        None => Err(format!(
            "rvm was killed: {}\n{}",
            run.why_killed(),
            run.tail(30)
        )),
        Some(s) if !s.success() => Err(format!("rvm exited with {s}\n{}", run.tail(30))),
        _ if !run.init_done() => Err(format!("/init did not finish\n{}", run.tail(30))),
        _ => Ok(()),
    }
}

fn ping_bridge(k: Kernel, path: DataPath) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("ping")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let r = run(
            "ping",
            &ns,
            img,
            k,
            "net_ping",
            "",
            &format!("tap=rvmtap0,bridge=br0,{}", path.spec()),
        );
        finished(&r)?;
        path.check(&r, 1)?;
        expect(&r, "driver", "virtio_net")?;
        expect(&r, "ping_ok", "1")?;
        // The default MAC is stable for the TAP name.
        let mac = rvm::net::MacAddr::for_nic("rvmtap0", 0).to_string();
        expect(&r, "mac", &mac)?;
        ns.no_taps_left()
    }
}

/// Spawns a guest that idles with its NIC up; returns once it says so.
fn spawn_idle(ns: &Netns, img: &Images, args: &str, net: &str) -> Result<Spawned, String> {
    let cmd = rvm(ns, img, Kernel::Minimal, "net_idle", args, net, "256M");
    spawn_until(cmd, "rvm-init: idle", DEADLINE)
}

/// Two guests on one bridge: B pings A. Then SIGTERM ends A, which must
/// leave no TAP behind.
fn guest_to_guest(img: &Images) -> Result<(), String> {
    let ns = Netns::new("g2g")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let a = spawn_idle(&ns, img, "ip=10.0.0.2/24", "tap=rvmtapa,bridge=br0")?;
    let r = run(
        "g2g",
        &ns,
        img,
        Kernel::Minimal,
        "net_ping",
        "ip=10.0.0.3/24,peer=10.0.0.2",
        "tap=rvmtapb,bridge=br0",
    );
    let pinged = finished(&r).and_then(|_| expect(&r, "ping_ok", "1"));
    let stopped = a.stop();
    pinged?;
    stopped?;
    ns.no_taps_left()
}

/// Host-only: a persistent TAP with the host's address, no bridge. rvm
/// attaches to it and leaves it as it was.
fn host_only(img: &Images) -> Result<(), String> {
    let ns = Netns::new("hostonly")?;
    ns.sh(
        "ip tuntap add rvmho mode tap && ip addr add 10.0.0.1/24 dev rvmho && ip link set rvmho up",
    )?;
    let r = run(
        "host_only",
        &ns,
        img,
        Kernel::Minimal,
        "net_ping",
        "",
        "tap=rvmho",
    );
    finished(&r)?;
    expect(&r, "ping_ok", "1")?;
    if ns.taps() != vec!["rvmho".to_string()] {
        return Err(format!(
            "the persistent TAP did not survive: {:?}",
            ns.taps()
        ));
    }
    Ok(())
}

/// Runs `cmd` in `ns` every 500 ms while a guest runs, until its output
/// satisfies `enough` or `done` is set; the thread returns the last output.
fn probe_host(
    ns: &Netns,
    cmd: &'static [&'static str],
    enough: fn(&str) -> bool,
    done: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<String> {
    let ns_name = ns.name.clone();
    let done = done.clone();
    std::thread::spawn(move || {
        let mut seen = String::new();
        while !done.load(Ordering::Relaxed) && !enough(&seen) {
            let o = Command::new("ip")
                .args(["netns", "exec", &ns_name])
                .args(cmd)
                .output();
            if let Some(o) = o.ok().filter(|o| o.status.success()) {
                seen = String::from_utf8_lossy(&o.stdout).into_owned();
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        seen
    })
}

/// 32 MiB each way over TCP, sha256 checked on both ends, with the
/// offloads the test expects (on with a vnet header, off without).
fn tcp(k: Kernel, vnet_hdr: bool, path: DataPath) -> impl Fn(&Images) -> Result<(), String> {
    tcp_on(k, vnet_hdr, path, "virtio")
}

/// The same with NIC model `model` (virtio or e1000).
fn tcp_on(
    k: Kernel,
    vnet_hdr: bool,
    path: DataPath,
    model: &'static str,
) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("tcp")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let dir = tempdir()?;
        let (tx, rx) = (dir.join("host-tx"), dir.join("host-rx"));
        random_file(&tx, TCP_MIB)?;
        // The host listens before the guest sends, and connects (retrying)
        // to the guest's listener to send its own file.
        let mut server = host_listener(&ns, 5001, &rx)?;
        let mut sender = host_sender(&ns, &tx, 5002)?;
        let net = format!(
            "tap=rvmtcp,bridge=br0,vnet_hdr={},{},model={model}",
            if vnet_hdr { "on" } else { "off" },
            path.spec()
        );
        // The host's view of the TAP's offloads, read while the guest runs
        // (they are programmed when the guest's driver is up).
        let done = Arc::new(AtomicBool::new(false));
        let probe = probe_host(
            &ns,
            &["ethtool", "-k", "rvmtcp"],
            |seen| seen.contains("tcp-segmentation-offload: on"),
            &done,
        );
        let r = run(
            "tcp",
            &ns,
            img,
            k,
            "net_tcp",
            &format!("size={TCP_MIB}"),
            &net,
        );
        done.store(true, Ordering::Relaxed);
        let _ = sender.kill();
        end_listener(&mut server, Instant::now());
        let host_view = probe.join().unwrap_or_default();
        finished(&r)?;
        path.check(&r, 1)?;
        expect(&r, "rx_bytes", &(TCP_MIB << 20).to_string())?;
        expect(&r, "rx_sha256", &sha256(&tx)?)?;
        let host_rx = sha256(&rx)?;
        expect(&r, "tx_sha256", &host_rx)?;
        if model == "e1000" {
            // The e1000 driver always does TSO; rvm finishes it (a GSO
            // frame to a TAP with a vnet header, segments without).
            expect(&r, "driver", "e1000")?;
            expect(&r, "tso", "on")?;
            let _ = std::fs::remove_dir_all(&dir);
            return ns.no_taps_left();
        }
        let want = if vnet_hdr { "on" } else { "off" };
        expect(&r, "tso", want)?;
        if vnet_hdr {
            for f in ["tx-checksumming: on", "tcp-segmentation-offload: on"] {
                if !host_view.contains(f) {
                    return Err(format!(
                        "ethtool -k on the TAP does not show {f:?}:\n{host_view}"
                    ));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        ns.no_taps_left()
    }
}

fn tempdir() -> Result<PathBuf, String> {
    let d = std::env::temp_dir().join(format!("rvm-net-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    Ok(d)
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// dnsmasq on the bridge gives the guest an address from its range.
fn dhcp(k: Kernel) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("dhcp")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let dir = tempdir()?;
        let mut dnsmasq = ns
            .command("dnsmasq")
            .args([
                "--no-daemon",
                "--interface=br0",
                "--bind-interfaces",
                "--port=0",
                "--no-resolv",
            ])
            .args(["--dhcp-range=10.0.0.100,10.0.0.150,255.255.255.0,1h"])
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let r = run(
            "dhcp",
            &ns,
            img,
            k,
            "net_dhcp",
            "",
            "tap=rvmdhcp,bridge=br0",
        );
        let _ = dnsmasq.kill();
        let _ = dnsmasq.wait();
        let _ = std::fs::remove_dir_all(&dir);
        finished(&r)?;
        let ip = r.result("dhcp_ip").unwrap_or_default();
        let last: u32 = ip
            .strip_prefix("10.0.0.")
            .and_then(|x| x.parse().ok())
            .unwrap_or(0);
        if !(100..=150).contains(&last) {
            return Err(format!(
                "the guest got {ip:?}, not an address in 10.0.0.100-150\n{}",
                r.tail(30)
            ));
        }
        expect(&r, "ping_ok", "1")
    }
}

/// An IPv4 counter of the namespace's /proc/net/snmp.
fn ip_stat(ns: &Netns, name: &str) -> Result<u64, String> {
    let snmp = ns.sh("cat /proc/net/snmp")?;
    let mut ip = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (keys, values) = (ip.next().unwrap_or(""), ip.next().unwrap_or(""));
    keys.split_whitespace()
        .zip(values.split_whitespace())
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| format!("no Ip {name} in /proc/net/snmp"))
}

/// An MTU end to end: rvm sets it on the TAP (virtio-net also offers it in
/// config space; the e1000's driver is told it by the guest), and the
/// guest's MTU-sized pings and the host's replies cross whole: neither
/// side fragments or reassembles anything, and nothing arrives cut.
fn mtu_end_to_end(mtu: u32, nic: &'static str) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("mtu")?;
        ns.bridge("10.0.0.1/24", mtu)?;
        let reasm0 = ip_stat(&ns, "ReasmReqds")?;
        let frag0 = ip_stat(&ns, "FragCreates")?;
        // The e1000 has no MTU field: the guest sets its own.
        let guest_mtu = if nic.contains("model=e1000") {
            format!(",mtu={mtu}")
        } else {
            String::new()
        };
        let r = run(
            "mtu",
            &ns,
            img,
            Kernel::Minimal,
            "net_ping",
            &format!("size={}{guest_mtu}", mtu - 28),
            &format!("tap=rvmmtu,bridge=br0,mtu={mtu}{nic}"),
        );
        finished(&r)?;
        expect(&r, "mtu", &mtu.to_string())?;
        expect(&r, "ping_ok", "1")?;
        expect(&r, "frags_sent", "0")?;
        expect(&r, "frags_received", "0")?;
        let (reasm, frag) = (
            ip_stat(&ns, "ReasmReqds")? - reasm0,
            ip_stat(&ns, "FragCreates")? - frag0,
        );
        if reasm != 0 || frag != 0 {
            return Err(format!(
                "the host reassembled {reasm} and fragmented {frag} packets: not end to end {mtu}"
            ));
        }
        // virtio-net dropped nothing it read (a frame cut by a read into
        // too few buffers is dropped and counted): rvm's counters at exit.
        let rx_clean = r
            .stderr
            .lines()
            .filter(|l| l.contains("NIC on rvmmtu: rx "))
            .all(|l| l.contains(" bytes, 0 dropped; tx"));
        if guest_mtu.is_empty() && !rx_clean {
            return Err(format!("virtio-net dropped received frames:\n{}", r.stderr));
        }
        Ok(())
    }
}

/// The driver lets go of the device and takes it again (a device reset
/// and a fresh initialisation); traffic flows afterwards, and again after
/// the guest moves the queue interrupts to another vCPU.
fn reload(k: Kernel, path: DataPath) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("reload")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let watch = VhostWatch::start("tap=rvmrl");
        let r = run(
            "reload",
            &ns,
            img,
            k,
            "net_reload",
            "",
            &format!("tap=rvmrl,bridge=br0,{}", path.spec()),
        );
        let samples = watch.stop();
        finished(&r)?;
        // One session before the reload, one after: the kernel's state is
        // torn down and rebuilt.
        path.check(&r, 2)?;
        if path == DataPath::Vhost {
            no_vhost_leak(&samples)?;
        }
        expect(&r, "before_ok", "1")?;
        expect(&r, "reload_ping_ok", "1")?;
        // The guest moved the queue interrupts to CPU 1 (new MSI-X
        // messages): traffic still flows and the interrupts land there.
        expect(&r, "moved_ping_ok", "1")?;
        expect(&r, "irq_on_cpu1", "1")
    }
}

/// Multiqueue: 2 vCPUs and queues=2. The guest sees 2 channels and 4
/// queues; 8 host flows to the guest and 2 guest flows (one per CPU) to
/// the host, all sha256-verified, reach both RX and both TX queues (the
/// guest's per-queue packets and interrupts); one pair and back, and a
/// driver reload, keep traffic; the host's TAP is multi-queue.
fn mq(path: DataPath) -> impl Fn(&Images) -> Result<(), String> {
    const FLOWS: usize = 8;
    const MIB: u64 = 4;
    move |img| {
        let ns = Netns::new("mq")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let dir = tempdir()?;
        let tx = dir.join("host-tx");
        random_file(&tx, MIB)?;
        let mut servers = Vec::new();
        for c in 0..2u16 {
            let rx = dir.join(format!("host-rx{c}"));
            servers.push((host_listener(&ns, 5001 + c, &rx)?, rx));
        }
        let senders = (0..FLOWS as u16)
            .map(|i| host_sender(&ns, &tx, 5100 + i))
            .collect::<Result<Vec<_>, _>>()?;
        // The TAP as the host sees it, while the guest runs.
        let done = Arc::new(AtomicBool::new(false));
        let probe = probe_host(
            &ns,
            &["ip", "-d", "link", "show", "rvmmq"],
            |seen| seen.contains("multi_queue"),
            &done,
        );
        let r = run(
            "mq",
            &ns,
            img,
            Kernel::Stock,
            "net_mq",
            &format!("flows={FLOWS},size={MIB}"),
            &format!("tap=rvmmq,bridge=br0,queues=2,{}", path.spec()),
        );
        done.store(true, Ordering::Relaxed);
        for mut s in senders {
            let _ = s.kill();
            let _ = s.wait();
        }
        let t = Instant::now();
        for (s, _) in &mut servers {
            end_listener(s, t);
        }
        let host_view = probe.join().unwrap_or_default();
        finished(&r)?;
        // One driver session before the reload, one after.
        path.check(&r, 2)?;
        if !host_view.contains("multi_queue") {
            return Err(format!("the TAP is not multi-queue:\n{host_view}"));
        }
        expect(&r, "channels", "2")?;
        expect(&r, "queues", "rx-0_rx-1_tx-0_tx-1_")?;
        expect(&r, "rx_files", &FLOWS.to_string())?;
        expect(&r, "rx_bytes", &(FLOWS as u64 * (MIB << 20)).to_string())?;
        expect(&r, "rx_sha256s", &format!("{}_", sha256(&tx)?))?;
        for (_, rx) in &servers {
            expect(&r, "tx_sha256", &sha256(rx)?)?;
        }
        for key in [
            "rx0_packets",
            "rx1_packets",
            "tx0_packets",
            "tx1_packets",
            "irq_rx0",
            "irq_rx1",
            "irq_tx0",
            "irq_tx1",
        ] {
            let n: u64 = r.result(key).and_then(|v| v.parse().ok()).unwrap_or(0);
            if n == 0 {
                return Err(format!(
                    "the guest's {key} did not grow: not every queue carried traffic\n{}",
                    r.tail(40)
                ));
            }
        }
        let get = |k: &str| r.result(k).unwrap_or_default();
        println!(
            "    mq ({path:?}): packets rx0 {} rx1 {} tx0 {} tx1 {}; interrupts rx0 {} rx1 {} tx0 {} tx1 {}",
            get("rx0_packets"),
            get("rx1_packets"),
            get("tx0_packets"),
            get("tx1_packets"),
            get("irq_rx0"),
            get("irq_rx1"),
            get("irq_tx0"),
            get("irq_tx1")
        );
        expect(&r, "channels_one", "1")?;
        expect(&r, "ping_one", "1")?;
        expect(&r, "channels_two", "2")?;
        expect(&r, "ping_two", "1")?;
        expect(&r, "channels_reload", "2")?;
        expect(&r, "ping_reload", "1")?;
        let _ = std::fs::remove_dir_all(&dir);
        ns.no_taps_left()
    }
}

/// Samples, while a guest runs, how many vhost worker threads the host
/// has and how many fds rvm holds.
struct VhostWatch {
    done: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(usize, usize)>>,
}

impl VhostWatch {
    /// Watches the rvm whose command line contains `tag`.
    fn start(tag: &str) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let tag = tag.to_string();
        let stop = done.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if let Some(pid) = pid_with_arg(&tag) {
                    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count());
                    if let Ok(fds) = fds {
                        samples.push((vhost_threads(), fds));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        VhostWatch { done, thread }
    }

    fn stop(self) -> Vec<(usize, usize)> {
        self.done.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// The pid of the rvm process with an argument containing `tag`.
fn pid_with_arg(tag: &str) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let is_rvm = cmd.split(|&b| b == 0).any(|a| a.ends_with(b"/rvm"));
        let tagged = cmd
            .split(|&b| b == 0)
            .any(|a| a.windows(tag.len()).any(|w| w == tag.as_bytes()));
        (is_rvm && tagged).then_some(pid)
    })
}

/// Threads named vhost-* on the host: kernel threads (before Linux 6.4)
/// or threads of the owning process (since).
fn vhost_threads() -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .flatten()
        .filter(|p| {
            p.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|p| std::fs::read_dir(p.path().join("task")).ok())
        .flat_map(|tasks| tasks.flatten())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("vhost-"))
        })
        .count()
}

/// Across a driver reload with vhost-net: never more than one vhost worker
/// (the old one ends before the new one starts), and, when the gap between
/// the two sessions was seen, rvm holds as many fds after it as before.
fn no_vhost_leak(samples: &[(usize, usize)]) -> Result<(), String> {
    let most = samples.iter().map(|s| s.0).max().unwrap_or(0);
    if most != 1 {
        return Err(format!(
            "wanted exactly one vhost worker thread while the guest ran, saw up to {most} ({} samples)",
            samples.len()
        ));
    }
    let first_on = samples.iter().position(|s| s.0 == 1).unwrap_or(0);
    let gap = samples[first_on..].iter().position(|s| s.0 == 0);
    if let Some(g) = gap.map(|g| g + first_on) {
        let before = samples[first_on..g].iter().map(|s| s.1).max();
        let after = samples[g..].iter().filter(|s| s.0 == 1).map(|s| s.1).max();
        if let (Some(b), Some(a)) = (before, after) {
            if a > b {
                return Err(format!(
                    "rvm held {b} fds in the first vhost session and {a} after the reload"
                ));
            }
        }
    }
    Ok(())
}

/// Bad host-side options fail before the guest starts, name the problem,
/// and leave nothing behind.
fn bad_host_options(img: &Images) -> Result<(), String> {
    let ns = Netns::new("bad")?;
    let fail = |net: &str, want: &str| -> Result<(), String> {
        let o = rvm(&ns, img, Kernel::Minimal, "boot", "", net, "128M")
            .output()
            .map_err(|e| e.to_string())?;
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.code() != Some(1) || !err.contains(want) {
            return Err(format!(
                "--net {net}: exit {:?}, stderr {err:?}, wanted {want:?}",
                o.status.code()
            ));
        }
        if !String::from_utf8_lossy(&o.stdout).is_empty() {
            return Err(format!("--net {net}: the guest started"));
        }
        ns.no_taps_left()
    };
    fail("tap=rvmbad,bridge=nobr", "ip link add nobr type bridge")?;
    // Devices that exist but are the wrong kind (no dummy module needed).
    ns.sh("ip tuntap add notabr mode tap")?;
    let r = fail_keep(&ns, img, "tap=rvmbad,bridge=notabr", "is not a bridge");
    ns.sh("ip tuntap del notabr mode tap")?;
    r?;
    ns.no_taps_left()?;
    fail("tap=lo", "not a TAP")?;
    fail(
        "tap=rvmbad,script=/bin/false",
        "script /bin/false rvmbad failed",
    )?;
    // A TAP another process holds is busy.
    let holder = {
        ns.bridge("10.0.0.1/24", 1500)?;
        spawn_idle(&ns, img, "", "tap=rvmbusy,bridge=br0")?
    };
    let busy = fail_keep(&ns, img, "tap=rvmbusy", "in use by another process");
    holder.stop()?;
    busy?;
    ns.no_taps_left()
}

fn fail_keep(ns: &Netns, img: &Images, net: &str, want: &str) -> Result<(), String> {
    let o = rvm(ns, img, Kernel::Minimal, "boot", "", net, "128M")
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.code() != Some(1) || !err.contains(want) {
        return Err(format!(
            "--net {net}: exit {:?}, stderr {err:?}, wanted {want:?}",
            o.status.code()
        ));
    }
    Ok(())
}

/// The e1000: the driver binds, resets the device through the I/O window
/// (rvm logs the reset per window), the guest reads STATUS and the receive
/// address through IOADDR/IODATA and through BAR0 and gets the same, and
/// pings the bridge.
fn e1000_ping(k: Kernel) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("e1000")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let scenario = match k {
            // /dev/mem of a claimed BAR is refused by Debian's kernel
            // (IO_STRICT_DEVMEM); the minimal one allows it.
            Kernel::Minimal => "e1000_regs",
            Kernel::Stock => "net_ping",
        };
        let r = run(
            "e1000",
            &ns,
            img,
            k,
            scenario,
            "",
            "tap=rvme1k,bridge=br0,model=e1000",
        );
        finished(&r)?;
        expect(&r, "driver", "e1000")?;
        expect(&r, "ping_ok", "1")?;
        if !r
            .stderr
            .contains("device reset (CTRL.RST) through the Io window")
        {
            return Err(format!(
                "the driver's reset did not arrive through the I/O window:\n{}",
                r.stderr
            ));
        }
        if let Kernel::Minimal = k {
            for (io, mmio) in [("status_io", "status_mmio"), ("ral_io", "ral_mmio")] {
                let (a, b) = (r.result(io), r.result(mmio));
                if a.is_none() || a != b {
                    return Err(format!("{io}={a:?} but {mmio}={b:?}\n{}", r.tail(30)));
                }
            }
            let status = u32::from_str_radix(&r.result("status_io").unwrap_or_default(), 16)
                .map_err(|e| e.to_string())?;
            if status & 2 == 0 {
                return Err(format!("STATUS {status:#x} does not say link up"));
            }
            let mac = rvm::net::MacAddr::for_nic("rvme1k", 0).0;
            let ral = u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]);
            expect(&r, "ral_io", &format!("{ral:08x}"))?;
        }
        ns.no_taps_left()
    }
}

/// One virtio-net and one e1000 NIC on two bridges: the guest uses both.
fn virtio_and_e1000(img: &Images) -> Result<(), String> {
    let ns = Netns::new("dual")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    ns.sh("ip link add br1 type bridge && ip addr add 10.0.1.1/24 dev br1 && ip link set br1 up")?;
    let r = run_guest_retrying(
        "dual",
        || {
            let mut c = rvm(
                &ns,
                img,
                Kernel::Minimal,
                "net_dual",
                "",
                "tap=rvmdv0,bridge=br0",
                "256M",
            );
            c.args(["--net", "tap=rvmdv1,bridge=br1,model=e1000"]);
            c
        },
        DEADLINE,
    );
    finished(&r)?;
    expect(&r, "ping_virtio_net_ok", "1")?;
    expect(&r, "ping_e1000_ok", "1")?;
    ns.no_taps_left()
}

/// /dev/vhost-net replaced by an empty file in a private mount namespace:
/// vhost=on fails before the guest starts and leaves no TAP; vhost=auto
/// says it falls back, and the guest's traffic flows on the userspace path.
fn vhost_unusable(img: &Images) -> Result<(), String> {
    let ns = Netns::new("novhost")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let dir = tempdir()?;
    let empty = dir.join("not-vhost");
    std::fs::write(&empty, b"").map_err(|e| e.to_string())?;
    // rvm's own command line, run behind the bind mount.
    let hidden = |net: &str, scenario: &str| {
        let base = rvm(&ns, img, Kernel::Minimal, scenario, "", net, "256M");
        let mut c = ns.command("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /dev/vhost-net && exec "$@""#)
            .arg(&empty)
            .args(base.get_args().skip(3))
            .envs(base.get_envs().filter_map(|(k, v)| Some((k, v?))));
        c
    };
    let o = hidden("tap=rvmnov,bridge=br0,vhost=on", "boot")
        .output()
        .map_err(|e| e.to_string())?;
    let err = String::from_utf8_lossy(&o.stderr);
    if o.status.code() != Some(1) || !err.contains("vhost=on, but /dev/vhost-net") {
        return Err(format!(
            "vhost=on without a usable /dev/vhost-net: exit {:?}, stderr {err:?}",
            o.status.code()
        ));
    }
    if !o.stdout.is_empty() {
        return Err("vhost=on without vhost-net: the guest started".into());
    }
    ns.no_taps_left()?;
    let r = run_guest_retrying(
        "novhost",
        || hidden("tap=rvmnov,bridge=br0,vhost=auto", "net_ping"),
        DEADLINE,
    );
    let _ = std::fs::remove_dir_all(&dir);
    finished(&r)?;
    expect(&r, "ping_ok", "1")?;
    if !r
        .stderr
        .contains("vhost=auto: /dev/vhost-net does not work here")
    {
        return Err(format!(
            "vhost=auto did not say it falls back:\n{}",
            r.stderr
        ));
    }
    DataPath::Userspace.check(&r, 0)?;
    ns.no_taps_left()
}

fn cases() -> Vec<Case<Images>> {
    use DataPath::*;
    use Kernel::*;
    vec![
        case("minimal_pings_the_bridge", ping_bridge(Minimal, Userspace)),
        case("stock_pings_the_bridge", ping_bridge(Stock, Userspace)),
        case("guest_to_guest_and_sigterm_leaves_no_tap", guest_to_guest),
        case("host_only_tap_without_bridge", host_only),
        case(
            "minimal_tcp_32mib_both_ways_offloads_on",
            tcp(Minimal, true, Userspace),
        ),
        case(
            "stock_tcp_32mib_both_ways_offloads_on",
            tcp(Stock, true, Userspace),
        ),
        case(
            "minimal_tcp_32mib_both_ways_vnet_hdr_off",
            tcp(Minimal, false, Userspace),
        ),
        case(
            "stock_tcp_32mib_both_ways_vnet_hdr_off",
            tcp(Stock, false, Userspace),
        ),
        case("minimal_dhcp_from_dnsmasq", dhcp(Minimal)),
        case("stock_dhcp_from_dnsmasq", dhcp(Stock)),
        case("mtu_9000_unfragmented", mtu_end_to_end(9000, "")),
        case(
            "mtu_16000_vnet_hdr_off_unfragmented",
            mtu_end_to_end(16000, ",vnet_hdr=off"),
        ),
        case(
            "e1000_mtu_9000_unfragmented",
            mtu_end_to_end(9000, ",model=e1000"),
        ),
        case(
            "minimal_driver_rebind_keeps_traffic",
            reload(Minimal, Userspace),
        ),
        case(
            "stock_driver_reload_keeps_traffic",
            reload(Stock, Userspace),
        ),
        case(
            "bad_host_options_fail_early_and_leave_nothing",
            bad_host_options,
        ),
        // vhost-net (the nested host and any normal KVM host have it).
        case(
            "vhost_minimal_pings_the_bridge",
            ping_bridge(Minimal, Vhost),
        ),
        case(
            "vhost_stock_tcp_32mib_both_ways_offloads_on",
            tcp(Stock, true, Vhost),
        ),
        case(
            "vhost_minimal_tcp_32mib_both_ways_vnet_hdr_off",
            tcp(Minimal, false, Vhost),
        ),
        case(
            "vhost_stock_driver_reload_keeps_traffic",
            reload(Stock, Vhost),
        ),
        case(
            "vhost_minimal_driver_rebind_keeps_traffic",
            reload(Minimal, Vhost),
        ),
        case(
            "vhost_unusable_on_fails_cleanly_auto_falls_back",
            vhost_unusable,
        ),
        // e1000 (82540EM).
        case("e1000_minimal_io_window_and_ping", e1000_ping(Minimal)),
        case("e1000_stock_pings_the_bridge", e1000_ping(Stock)),
        case(
            "e1000_stock_tcp_32mib_both_ways",
            tcp_on(Stock, true, Userspace, "e1000"),
        ),
        case(
            "e1000_minimal_tcp_32mib_both_ways_vnet_hdr_off",
            tcp_on(Minimal, false, Userspace, "e1000"),
        ),
        case("e1000_and_virtio_on_two_bridges", virtio_and_e1000),
        // Multiqueue: two pairs on two vCPUs.
        case("mq_stock_two_pairs_both_ways", mq(Userspace)),
        case("vhost_mq_stock_two_pairs_both_ways", mq(Vhost)),
    ]
}

fn main() {
    run_suite(
        "network tests",
        cases(),
        &["--mem", "6144", "--idle-timeout", "180"],
        images,
    );
}
