//! TCP throughput of a real guest over virtio-net-pci on a bridge: rvm
//! against QEMU (`-device virtio-net-pci -netdev tap,vhost=...`), same
//! kernel, same initramfs, same guest size, in the same run: both with the
//! data path in userspace (`offloads`, `vnet_hdr_off`) and both with
//! vhost-net (`vhost`); and both with an emulated e1000 (`e1000`). The guest runs
//! an iperf3 server; the host runs the client, so both figures come from
//! the host's clock (the guest's is unreliable in the nested host):
//! host->guest is the client's sent rate, guest->host (`-R`) its received
//! rate.
//!
//! `cargo bench --bench net_iperf` (inside the nested host when the host
//! has no VT-x/AMD-V). RVM_BENCH_RUNS: runs per VMM and setup (default 2,
//! interleaved); RVM_IPERF_SECS: seconds per direction (default 10);
//! RVM_IPERF_KERNELS: `stock`, `minimal` or `stock,minimal` (default stock).
//! Free arguments pick setups by their exact names (`offloads`, `vhost`,
//! `vnet_hdr_off`, `e1000`, `mq`, `vhost_mq`); running a few at a time
//! loses less to a nested-host panic, which starts the run over.
//!
//! The `user` setup is networking without a TAP: rvm `--net user` (which
//! starts passt itself) against QEMU `-netdev stream` connected to a passt
//! the benchmark starts, in a namespace whose only network is a dummy
//! interface; the guest takes its address by DHCP and the host reaches its
//! iperf3 servers through passt's port forwarding (127.0.0.1:5201).
//! `user_mtu1500` is the same with the NIC's MTU at 1500 (QEMU:
//! `host_mtu=1500`), where the guest segments every frame itself.
//!
//! The multiqueue setups (`mq`, `vhost_mq`) give the guest 2 vCPUs and the
//! NIC 2 queue pairs (QEMU: `-netdev tap,queues=2` on a multi_queue TAP,
//! `-device virtio-net-pci,mq=on,vectors=6`); the guest runs one iperf3
//! server per port 5201 and 5202 and the host one client per server at
//! once, so two flows, two guest CPUs and both queue pairs carry the
//! traffic. The figure is the two clients' sum.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::{images, placement, reexec_nested, rvm_bin, Images, Placement};

const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const MEM_MIB: u64 = 512;
const GUEST: &str = "10.0.0.2";

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Rvm,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Rvm => "rvm",
            Vmm::Qemu => "qemu",
        }
    }
}

/// One NIC setup both VMMs are measured with.
struct Setup {
    name: &'static str,
    vnet_hdr: bool,
    vhost: bool,
    /// `virtio` or `e1000`.
    model: &'static str,
    /// Queue pairs; also the guest's vCPUs and the parallel flows.
    queues: u32,
    /// User-mode networking through passt instead of a TAP.
    user: bool,
    /// The MTU the NIC offers (VIRTIO_NET_F_MTU), when not the default.
    mtu: Option<u16>,
}

const SETUPS: [Setup; 8] = [
    Setup {
        name: "offloads",
        vnet_hdr: true,
        vhost: false,
        model: "virtio",
        queues: 1,
        user: false,
        mtu: None,
    },
    Setup {
        name: "vhost",
        vnet_hdr: true,
        vhost: true,
        model: "virtio",
        queues: 1,
        user: false,
        mtu: None,
    },
    Setup {
        name: "vnet_hdr_off",
        vnet_hdr: false,
        vhost: false,
        model: "virtio",
        queues: 1,
        user: false,
        mtu: None,
    },
    Setup {
        name: "e1000",
        vnet_hdr: true,
        vhost: false,
        model: "e1000",
        queues: 1,
        user: false,
        mtu: None,
    },
    Setup {
        name: "mq",
        vnet_hdr: true,
        vhost: false,
        model: "virtio",
        queues: 2,
        user: false,
        mtu: None,
    },
    Setup {
        name: "vhost_mq",
        vnet_hdr: true,
        vhost: true,
        model: "virtio",
        queues: 2,
        user: false,
        mtu: None,
    },
    Setup {
        name: "user",
        vnet_hdr: false,
        vhost: false,
        model: "virtio",
        queues: 1,
        user: true,
        mtu: None,
    },
    // The same with a 1500-byte MTU: no offload crosses a socket, so the
    // guest then segments and checksums every 1500-byte frame itself
    // (against 64 KiB frames at passt's MTU).
    Setup {
        name: "user_mtu1500",
        vnet_hdr: false,
        vhost: false,
        model: "virtio",
        queues: 1,
        user: true,
        mtu: Some(1500),
    },
];

/// The namespace's network for the `user` setup, as in tests/usernet.rs.
const USER_NET: &str = "ip link add d0 type dummy && ip addr add 10.1.0.2/24 dev d0 && ip link set d0 up && ip route add default via 10.1.0.1";
/// passt's forwarding of the guest's iperf3 ports.
const USER_FWD: [(&str, &str); 2] = [
    ("tcp::5201-:5201", "5201:5201"),
    ("tcp::5202-:5202", "5202:5202"),
];

fn cmdline(reboot: &str, setup: &Setup) -> String {
    let dhcp = if setup.user { " rvm.args=dhcp" } else { "" };
    format!("console=ttyS0 reboot={reboot} panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd quiet rvm.scenario=net_iperf_server{dhcp}")
}

/// Where the host's iperf3 client finds the guest's servers.
fn guest_addr(setup: &Setup) -> &'static str {
    if setup.user {
        "127.0.0.1"
    } else {
        GUEST
    }
}

/// The passt QEMU's `-netdev stream` connects to (rvm starts its own):
/// listening on `sock` once this returns.
fn start_passt(ns: &Netns, sock: &Path) -> Result<Child, String> {
    let _ = std::fs::remove_file(sock);
    let mut c = ns.command(common::passt_program());
    c.args(["--foreground", "--quiet", "--one-off", "--socket"])
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (_, p) in USER_FWD {
        c.args(["-t", p]);
    }
    let mut child = c.spawn().map_err(|e| format!("cannot start passt: {e}"))?;
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(10) || matches!(child.try_wait(), Ok(Some(_))) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("passt did not listen on {}", sock.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(child)
}

fn vmm_command(
    vmm: Vmm,
    ns: &Netns,
    kernel: &Path,
    img: &Images,
    setup: &Setup,
    passt_sock: &Path,
) -> Command {
    let onoff = if setup.vnet_hdr { "on" } else { "off" };
    let vhost = if setup.vhost { "on" } else { "off" };
    let cpus = setup.queues.to_string();
    let mem = MEM_MIB.to_string();
    match vmm {
        Vmm::Rvm => {
            let mut c = ns.command(rvm_bin());
            c.env("RVM_LOG", "info")
                .args(["run", "--cpus", &cpus, "--mem", &mem])
                .arg("--kernel")
                .arg(kernel)
                .arg("--initrd")
                .arg(&img.initramfs)
                .arg("--cmdline")
                .arg(cmdline("k", setup))
                .arg("--net");
            if setup.user {
                let fwd: Vec<String> = USER_FWD
                    .iter()
                    .map(|(f, _)| format!(",hostfwd={f}"))
                    .collect();
                let mtu = setup.mtu.map(|m| format!(",mtu={m}")).unwrap_or_default();
                c.arg(format!("user,model={}{}{mtu}", setup.model, fwd.concat()));
            } else {
                c.arg(format!(
                    "tap=rvmtap0,bridge=br0,vnet_hdr={onoff},vhost={vhost},model={},queues={}",
                    setup.model, setup.queues
                ));
            }
            c
        }
        Vmm::Qemu => {
            let mut c = ns.command("qemu-system-x86_64");
            c.args(["-enable-kvm", "-cpu", "host", "-smp", &cpus, "-m", &mem])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-serial", "stdio", "-no-reboot"])
                .arg("-kernel")
                .arg(kernel)
                .arg("-initrd")
                .arg(&img.initramfs)
                .arg("-append")
                .arg(cmdline("k", setup))
                .arg("-netdev");
            if setup.user {
                c.arg(format!(
                    "stream,id=n0,server=off,addr.type=unix,addr.path={}",
                    passt_sock.display()
                ));
            } else {
                c.arg(format!(
                    "tap,id=n0,ifname=qtap0,script=no,downscript=no,vhost={vhost},vnet_hdr={onoff},queues={}",
                    setup.queues
                ));
            }
            c.args(["-device", &qemu_model(setup)]);
            c
        }
    }
}

fn qemu_model(setup: &Setup) -> String {
    if let Some(m) = setup.mtu {
        return format!("virtio-net-pci,netdev=n0,host_mtu={m}");
    }
    match (setup.model, setup.queues) {
        ("e1000", _) => "e1000,netdev=n0".into(),
        (_, 1) => "virtio-net-pci,netdev=n0".into(),
        // A vector per queue, one for the control queue, one for config.
        (_, n) => format!("virtio-net-pci,netdev=n0,mq=on,vectors={}", 2 * n + 2),
    }
}

/// passt for QEMU, killed and reaped when dropped.
struct PasstChild(Child);

impl Drop for PasstChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A VMM whose guest has its iperf3 server up.
struct Guest {
    child: Child,
    console: mpsc::Receiver<String>,
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our child's pid (`ip netns exec` exec'd the VMM).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

enum Boot {
    Up(Guest, Vec<String>),
    /// The VMM exited 0 before the guest was up: the nested host's reset flake.
    ResetFlake(String),
    Failed(String),
}

/// The VMM's stderr goes to `stderr_log`, shown when a measurement fails.
fn boot(mut cmd: Command, stderr_log: &Path) -> Boot {
    let err = match std::fs::File::create(stderr_log) {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::null(),
    };
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Boot::Failed(format!("cannot start {cmd:?}: {e}")),
    };
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let start = Instant::now();
    while start.elapsed() < BOOT_DEADLINE {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(l) => {
                let up = l.contains("rvm-init: idle");
                seen.push(l);
                if up {
                    return Boot::Up(Guest { child, console: rx }, seen);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().ok();
                let tail = seen[seen.len().saturating_sub(15)..].join("\n");
                return if status.is_some_and(|s| s.success())
                    && std::env::var_os("RVM_NESTED").is_some()
                {
                    Boot::ResetFlake(tail)
                } else {
                    Boot::Failed(format!("the VMM exited ({status:?}) first:\n{tail}"))
                };
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Boot::Failed(format!(
        "the guest's iperf3 server was not up within {BOOT_DEADLINE:?}:\n{}",
        seen[seen.len().saturating_sub(15)..].join("\n")
    ))
}

/// `"key": number` after the first `"section":` of iperf3's JSON.
fn json_number(json: &str, section: &str, key: &str) -> Option<f64> {
    let at = json.find(&format!("\"{section}\":"))?;
    let rest = &json[at..];
    let k = rest.find(&format!("\"{key}\":"))?;
    let v = rest[k + key.len() + 3..].trim_start();
    let end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == '+' || c == '-'))
        .unwrap_or(v.len());
    v[..end].parse().ok()
}

/// `flows` iperf3 clients at once from the host, one per guest server
/// (ports 5201, 5202, ...); their summed Mbit/s on the host's clock.
fn iperf(ns: &Netns, addr: &str, secs: u64, reverse: bool, flows: u32) -> Result<f64, String> {
    std::thread::scope(|s| {
        let clients: Vec<_> = (0..flows)
            .map(|i| s.spawn(move || iperf_one(ns, addr, secs, reverse, 5201 + i as u16)))
            .collect();
        clients
            .into_iter()
            .map(|c| {
                c.join()
                    .unwrap_or_else(|_| Err("an iperf3 client thread panicked".into()))
            })
            .sum()
    })
}

/// One iperf3 client run from the host; Mbit/s on the host's clock.
fn iperf_one(ns: &Netns, addr: &str, secs: u64, reverse: bool, port: u16) -> Result<f64, String> {
    // A stalled transfer ends as a failure instead of blocking for ever.
    let mut c = ns.command("timeout");
    c.args(["-k", "5", &(secs + 60).to_string(), "iperf3"])
        .args(["-c", addr, "-J", "-t", &secs.to_string()])
        .args(["-p", &port.to_string()])
        .args(["--connect-timeout", "10000"]);
    if reverse {
        c.arg("-R");
    }
    // The server may need a moment after eth0 came up.
    let mut last = String::new();
    for _ in 0..10 {
        let o = c.output().map_err(|e| format!("cannot run iperf3: {e}"))?;
        let json = String::from_utf8_lossy(&o.stdout).into_owned();
        // The host sends (normal) or receives (-R): its own side's figure.
        let (section, key) = if reverse {
            ("sum_received", "bits_per_second")
        } else {
            ("sum_sent", "bits_per_second")
        };
        if o.status.success() {
            if let Some(bps) = json_number(&json, section, key) {
                return Ok(bps / 1e6);
            }
        }
        last = json;
        std::thread::sleep(Duration::from_secs(1));
    }
    Err(format!("iperf3 to the guest (port {port}) failed:\n{last}"))
}

struct Figures {
    to_guest: Vec<f64>,
    from_guest: Vec<f64>,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn fmt(v: &[f64]) -> String {
    v.iter()
        .map(|x| format!("{x:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Boots `vmm` in a fresh namespace and measures both directions.
fn measure(
    vmm: Vmm,
    kernel: &Path,
    img: &Images,
    setup: &Setup,
    secs: u64,
) -> Result<(f64, f64, String), String> {
    let mut attempt = 0;
    loop {
        let ns = Netns::new("iperf")?;
        let passt_sock =
            std::env::temp_dir().join(format!("iperf-passt-{}.sock", std::process::id()));
        // QEMU's passt, stopped after the guest (dropped after it).
        let mut _passt = None;
        if setup.user {
            ns.sh(USER_NET)?;
            if vmm == Vmm::Qemu {
                _passt = Some(PasstChild(start_passt(&ns, &passt_sock)?));
            }
        } else {
            ns.bridge("10.0.0.1/24", 1500)?;
        }
        if vmm == Vmm::Qemu && !setup.user {
            let mq = if setup.queues > 1 { " multi_queue" } else { "" };
            ns.sh(&format!(
                "ip tuntap add qtap0 mode tap{mq} && ip link set qtap0 master br0 up"
            ))?;
        }
        let log = std::env::temp_dir().join(format!("iperf-{}-{}.stderr", vmm.name(), setup.name));
        let vmm_log = || {
            let s = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = s.lines().collect();
            format!(
                "\n{} stderr:\n{}",
                vmm.name(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            )
        };
        match boot(vmm_command(vmm, &ns, kernel, img, setup, &passt_sock), &log) {
            Boot::Up(guest, console) => {
                let tso = console
                    .iter()
                    .find_map(|l| l.strip_prefix("rvm-result: tso="))
                    .unwrap_or("?")
                    .to_string();
                let addr = guest_addr(setup);
                let measured = iperf(&ns, addr, secs, false, setup.queues).and_then(|to| {
                    iperf(&ns, addr, secs, true, setup.queues).map(|from| (to, from))
                });
                let (to_guest, from_guest) = match measured {
                    Ok(m) => m,
                    Err(e) => {
                        let mut guest = guest;
                        let nested = std::env::var_os("RVM_NESTED").is_some();
                        let exit = guest.child.try_wait();
                        let running = matches!(exit, Ok(None));
                        // The VMM ended by itself with status 0: the guest
                        // reset mid-run (the nested host's reset flake).
                        let reset = nested && matches!(exit, Ok(Some(s)) if s.success());
                        if vmm == Vmm::Rvm && running {
                            // Where the vCPUs are, into rvm's stderr log.
                            // SAFETY: kill(2) on our child's pid, not reaped.
                            unsafe { libc::kill(guest.child.id() as i32, libc::SIGUSR1) };
                            std::thread::sleep(Duration::from_millis(1500));
                        }
                        let console: Vec<String> = guest.console.try_iter().collect();
                        // Stopped first, so that its exit log is there.
                        drop(guest);
                        let stderr = std::fs::read_to_string(&log).unwrap_or_default();
                        let foreign =
                            common::foreign_vcpu_state(&stderr, MEM_MIB << 20).filter(|_| nested);
                        let known = match (&foreign, reset) {
                            (Some(line), _) => Some(format!("a vCPU's state is not the guest's (its CR3 lies beyond the guest's RAM: {line}): the nested host put its own state there (known TCG nested-SVM fault, not a VMM failure)")),
                            (None, true) => Some("the guest reset mid-run and the VMM exited 0 (known nested-host flake, not a VMM failure)".to_string()),
                            (None, false) => None,
                        };
                        match known {
                            Some(why) if attempt < common::MAX_FLAKE_RETRIES => {
                                attempt += 1;
                                println!(
                                    "  RETRY {attempt}/{}: {} {}: {why}",
                                    common::MAX_FLAKE_RETRIES,
                                    vmm.name(),
                                    setup.name,
                                );
                                continue;
                            }
                            _ => {
                                return Err(format!(
                                    "{e}\nthe guest's console after it was up:\n{}{}",
                                    console.join("\n"),
                                    vmm_log()
                                ))
                            }
                        }
                    }
                };
                // Nothing else may have been printed: a guest oops would be.
                let extra: Vec<String> = guest.console.try_iter().collect();
                drop(guest);
                if extra
                    .iter()
                    .any(|l| l.contains("BUG") || l.contains("Oops"))
                {
                    return Err(format!("the guest complained:\n{}", extra.join("\n")));
                }
                return Ok((to_guest, from_guest, tso));
            }
            Boot::ResetFlake(tail) if attempt < common::MAX_FLAKE_RETRIES => {
                attempt += 1;
                println!(
                    "  RETRY {attempt}/{}: {} {}: the guest reset during boot and the VMM exited 0 (known nested-host flake, not a VMM failure)\n{tail}",
                    common::MAX_FLAKE_RETRIES,
                    vmm.name(),
                    setup.name
                );
            }
            Boot::ResetFlake(tail) => return Err(format!("reset during boot, every try:\n{tail}")),
            Boot::Failed(e) => return Err(e + &vmm_log()),
        }
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("iperf benchmark: not run under cargo test; run `cargo bench --bench net_iperf`");
        return;
    }
    match placement() {
        Placement::Direct(why) => println!("iperf benchmark: running directly ({why})"),
        Placement::Nested(why) => {
            println!("iperf benchmark: running inside the nested host ({why})");
            reexec_nested(&["--mem", "4096", "--idle-timeout", "400"]);
        }
    }
    let img = images().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (runs, secs) = (env("RVM_BENCH_RUNS", 2), env("RVM_IPERF_SECS", 10));
    let kernels = std::env::var("RVM_IPERF_KERNELS").unwrap_or_else(|_| "stock".into());
    let picks: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    println!(
        "iperf3 TCP, {secs} s per direction, {runs} run(s) per VMM, guest: 1 vCPU per queue pair, {MEM_MIB} MiB; Mbit/s on the host's clock"
    );
    let mut failures = 0;
    let mut summary = Vec::new();
    for kname in kernels.split(',') {
        let kernel = match kname {
            "minimal" => img.minimal.clone(),
            _ => img.stock.clone(),
        };
        for setup in SETUPS
            .iter()
            .filter(|s| picks.is_empty() || picks.iter().any(|p| s.name == p.as_str()))
        {
            let mut figs = [
                Figures {
                    to_guest: vec![],
                    from_guest: vec![],
                },
                Figures {
                    to_guest: vec![],
                    from_guest: vec![],
                },
            ];
            for i in 0..runs {
                for (k, vmm) in [Vmm::Rvm, Vmm::Qemu].into_iter().enumerate() {
                    match measure(vmm, &kernel, &img, setup, secs) {
                        Ok((to, from, tso)) => {
                            println!(
                                "  {kname} {:12} {:4} run {i}: host->guest {to:8.1}  guest->host {from:8.1}  (guest TSO {tso})",
                                setup.name,
                                vmm.name()
                            );
                            figs[k].to_guest.push(to);
                            figs[k].from_guest.push(from);
                        }
                        Err(e) => {
                            failures += 1;
                            println!(
                                "  {kname} {} {} run {i}: FAILED: {e}",
                                setup.name,
                                vmm.name()
                            );
                        }
                    }
                }
            }
            let [r, q] = &figs;
            summary.push(format!(
                "{kname} {:12} host->guest: rvm {:8.1} [{}] qemu {:8.1} [{}] rvm/qemu {:.2}\n{kname} {:12} guest->host: rvm {:8.1} [{}] qemu {:8.1} [{}] rvm/qemu {:.2}",
                setup.name,
                mean(&r.to_guest),
                fmt(&r.to_guest),
                mean(&q.to_guest),
                fmt(&q.to_guest),
                mean(&r.to_guest) / mean(&q.to_guest),
                setup.name,
                mean(&r.from_guest),
                fmt(&r.from_guest),
                mean(&q.from_guest),
                fmt(&q.from_guest),
                mean(&r.from_guest) / mean(&q.from_guest),
            ));
        }
    }
    println!("\nmeans in Mbit/s (each run in brackets):");
    for s in summary {
        println!("{s}");
    }
    if failures > 0 {
        println!("{failures} measurements failed");
        std::process::exit(1);
    }
}
