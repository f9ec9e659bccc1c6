//! Real guests on virtio-net-pci: each test makes its own network
//! namespace with a bridge (or a host-only TAP), runs rvm inside it and
//! checks what the guest and the host see. Nothing touches any other
//! namespace. Like tests/guests.rs, this runs directly on a host with
//! VT-x/AMD-V and inside the nested host otherwise; it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::Netns;
use common::{images, run_guest_retrying, run_suite, rvm_bin, Case, GuestRun, Images};

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
    let mut c = ns.command(rvm_bin());
    // NIC counters at exit land in the failure report (stderr).
    c.env("RVM_LOG", "info")
        .arg("run")
        .arg("--kernel")
        .arg(k.path(img))
        .arg("--initrd")
        .arg(&img.initramfs)
        .args(["--cpus", "2", "--mem", mem, "--net", net])
        .arg("--cmdline")
        .arg(format!(
            "{} quiet rvm.scenario={scenario} rvm.args={args}",
            rvm::DEFAULT_CMDLINE
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
            "rvm did not exit within {DEADLINE:?}\n{}",
            run.tail(30)
        )),
        Some(s) if !s.success() => Err(format!("rvm exited with {s}\n{}", run.tail(30))),
        _ if !run.init_done() => Err(format!("/init did not finish\n{}", run.tail(30))),
        _ => Ok(()),
    }
}

fn expect(run: &GuestRun, key: &str, want: &str) -> Result<(), String> {
    match run.result(key) {
        Some(v) if v == want => Ok(()),
        got => Err(format!(
            "guest reported {key}={got:?}, expected {want:?}\n{}",
            run.tail(30)
        )),
    }
}

fn no_taps_left(ns: &Netns) -> Result<(), String> {
    let taps = ns.taps();
    if taps.is_empty() {
        Ok(())
    } else {
        Err(format!("TAPs left behind after rvm ended: {taps:?}"))
    }
}

fn ping_bridge(k: Kernel) -> impl Fn(&Images) -> Result<(), String> {
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
            "tap=rvmtap0,bridge=br0",
        );
        finished(&r)?;
        expect(&r, "driver", "virtio_net")?;
        expect(&r, "ping_ok", "1")?;
        // The default MAC is stable for the TAP name.
        let mac = rvm::net::MacAddr::for_nic("rvmtap0", 0).to_string();
        expect(&r, "mac", &mac)?;
        no_taps_left(&ns)
    }
}

/// Spawns a guest that idles with its NIC up; returns once it says so.
fn spawn_idle(
    ns: &Netns,
    img: &Images,
    args: &str,
    net: &str,
) -> Result<(Child, std::thread::JoinHandle<String>), String> {
    use std::io::{BufRead, BufReader};
    let mut child = rvm(ns, img, Kernel::Minimal, "net_idle", args, net, "256M")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let start = Instant::now();
    let mut seen = String::new();
    for l in lines.by_ref().map_while(Result::ok) {
        seen.push_str(&l);
        seen.push('\n');
        if l.contains("rvm-init: idle") {
            let rest = std::thread::spawn(move || {
                lines.map_while(Result::ok).collect::<Vec<_>>().join("\n")
            });
            return Ok((child, rest));
        }
        if start.elapsed() > DEADLINE {
            break;
        }
    }
    let _ = child.kill();
    Err(format!("the idle guest never came up:\n{seen}"))
}

fn sigterm_and_wait(mut child: Child) -> Result<(), String> {
    // SAFETY: kill(2) on the pid of `ip netns exec`, which exec'd rvm.
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

/// Two guests on one bridge: B pings A. Then SIGTERM ends A, which must
/// leave no TAP behind.
fn guest_to_guest(img: &Images) -> Result<(), String> {
    let ns = Netns::new("g2g")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let (a, _out) = spawn_idle(&ns, img, "ip=10.0.0.2/24", "tap=rvmtapa,bridge=br0")?;
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
    let stopped = sigterm_and_wait(a);
    pinged?;
    stopped?;
    no_taps_left(&ns)
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

fn sha256(path: &Path) -> Result<String, String> {
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

/// 32 MiB each way over TCP, sha256 checked on both ends, with the
/// offloads the test expects (on with a vnet header, off without).
fn tcp(k: Kernel, vnet_hdr: bool) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("tcp")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let dir = tempdir()?;
        let (tx, rx) = (dir.join("host-tx"), dir.join("host-rx"));
        Command::new("head")
            .args(["-c", &format!("{TCP_MIB}M"), "/dev/urandom"])
            .stdout(std::fs::File::create(&tx).map_err(|e| e.to_string())?)
            .status()
            .map_err(|e| e.to_string())?;
        // The host listens before the guest sends, and connects (retrying)
        // to the guest's listener to send its own file.
        let mut server = ns
            .command("socat")
            .args(["-u", "TCP-LISTEN:5001,reuseaddr"])
            .arg(format!("OPEN:{},creat,trunc", rx.display()))
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut sender = ns
            .command("socat")
            .arg("-u")
            .arg(format!("OPEN:{}", tx.display()))
            .arg("TCP:10.0.0.2:5002,retry=600,interval=0.5")
            .spawn()
            .map_err(|e| e.to_string())?;
        let net = format!(
            "tap=rvmtcp,bridge=br0,vnet_hdr={}",
            if vnet_hdr { "on" } else { "off" }
        );
        // The host's view of the TAP's offloads, read while the guest runs
        // (they are programmed when the guest's driver is up).
        let done = Arc::new(AtomicBool::new(false));
        let ns_name = ns.name.clone();
        let probe = std::thread::spawn({
            let done = done.clone();
            move || {
                let mut seen = String::new();
                while !done.load(Ordering::Relaxed) {
                    let o = Command::new("ip")
                        .args(["netns", "exec", &ns_name, "ethtool", "-k", "rvmtcp"])
                        .output();
                    if let Some(o) = o.ok().filter(|o| o.status.success()) {
                        seen = String::from_utf8_lossy(&o.stdout).into_owned();
                        if seen.contains("tcp-segmentation-offload: on") {
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                seen
            }
        });
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
        let _ = server.wait();
        let host_view = probe.join().unwrap_or_default();
        finished(&r)?;
        expect(&r, "rx_bytes", &(TCP_MIB << 20).to_string())?;
        expect(&r, "rx_sha256", &sha256(&tx)?)?;
        let host_rx = sha256(&rx)?;
        expect(&r, "tx_sha256", &host_rx)?;
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
        no_taps_left(&ns)
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

/// MTU 9000 end to end: rvm sets it on the TAP and offers it in config
/// space, the guest's 9000-byte pings and the host's replies cross whole:
/// neither side fragments or reassembles anything.
fn mtu_9000(img: &Images) -> Result<(), String> {
    let ns = Netns::new("mtu")?;
    ns.bridge("10.0.0.1/24", 9000)?;
    let reasm0 = ip_stat(&ns, "ReasmReqds")?;
    let frag0 = ip_stat(&ns, "FragCreates")?;
    let r = run(
        "mtu",
        &ns,
        img,
        Kernel::Minimal,
        "net_ping",
        "size=8972",
        "tap=rvmmtu,bridge=br0,mtu=9000",
    );
    finished(&r)?;
    expect(&r, "mtu", "9000")?;
    expect(&r, "ping_ok", "1")?;
    expect(&r, "frags_sent", "0")?;
    expect(&r, "frags_received", "0")?;
    let (reasm, frag) = (
        ip_stat(&ns, "ReasmReqds")? - reasm0,
        ip_stat(&ns, "FragCreates")? - frag0,
    );
    if reasm != 0 || frag != 0 {
        return Err(format!(
            "the host reassembled {reasm} and fragmented {frag} packets: not end to end 9000"
        ));
    }
    Ok(())
}

/// The driver lets go of the device and takes it again (a device reset
/// and a fresh initialisation); traffic flows afterwards.
fn reload(k: Kernel) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("reload")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let r = run(
            "reload",
            &ns,
            img,
            k,
            "net_reload",
            "",
            "tap=rvmrl,bridge=br0",
        );
        finished(&r)?;
        expect(&r, "before_ok", "1")?;
        expect(&r, "reload_ping_ok", "1")
    }
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
        no_taps_left(&ns)
    };
    fail("tap=rvmbad,bridge=nobr", "ip link add nobr type bridge")?;
    // Devices that exist but are the wrong kind (no dummy module needed).
    ns.sh("ip tuntap add notabr mode tap")?;
    let r = fail_keep(&ns, img, "tap=rvmbad,bridge=notabr", "is not a bridge");
    ns.sh("ip tuntap del notabr mode tap")?;
    r?;
    no_taps_left(&ns)?;
    fail("tap=lo", "not a TAP")?;
    fail(
        "tap=rvmbad,script=/bin/false",
        "script /bin/false rvmbad failed",
    )?;
    // A TAP another process holds is busy.
    let (holder, _out) = {
        ns.bridge("10.0.0.1/24", 1500)?;
        spawn_idle(&ns, img, "", "tap=rvmbusy,bridge=br0")?
    };
    let busy = fail_keep(&ns, img, "tap=rvmbusy", "in use by another process");
    sigterm_and_wait(holder)?;
    busy?;
    no_taps_left(&ns)
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

fn case(name: &str, f: impl Fn(&Images) -> Result<(), String> + 'static) -> Case<Images> {
    (name.to_string(), Box::new(f))
}

fn cases() -> Vec<Case<Images>> {
    use Kernel::*;
    vec![
        case("minimal_pings_the_bridge", ping_bridge(Minimal)),
        case("stock_pings_the_bridge", ping_bridge(Stock)),
        case("guest_to_guest_and_sigterm_leaves_no_tap", guest_to_guest),
        case("host_only_tap_without_bridge", host_only),
        case(
            "minimal_tcp_32mib_both_ways_offloads_on",
            tcp(Minimal, true),
        ),
        case("stock_tcp_32mib_both_ways_offloads_on", tcp(Stock, true)),
        case(
            "minimal_tcp_32mib_both_ways_vnet_hdr_off",
            tcp(Minimal, false),
        ),
        case("stock_tcp_32mib_both_ways_vnet_hdr_off", tcp(Stock, false)),
        case("minimal_dhcp_from_dnsmasq", dhcp(Minimal)),
        case("stock_dhcp_from_dnsmasq", dhcp(Stock)),
        case("mtu_9000_unfragmented", mtu_9000),
        case("minimal_driver_rebind_keeps_traffic", reload(Minimal)),
        case("stock_driver_reload_keeps_traffic", reload(Stock)),
        case(
            "bad_host_options_fail_early_and_leave_nothing",
            bad_host_options,
        ),
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
