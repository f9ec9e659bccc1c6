//! Networking without root on real guests: rvm run as an ordinary user (a
//! uid with no account, no capability, /dev/kvm its only privilege) with
//! `--net user`, which starts passt. Each case makes a network namespace
//! holding only a dummy interface with an address and a default route (so
//! passt has a "host network" to copy), and checks: DHCP gives the guest
//! an address; the guest reaches a TCP server on the namespace's loopback
//! through passt's gateway mapping and the host reaches a guest service
//! through `hostfwd=`, 32 MiB each way sha256-verified, on both NIC
//! models; no passt outlives rvm (normal exit, SIGTERM, SIGKILL); no
//! interface is created; two guests on `--net dgram=PATH` reach each other
//! through the test's datagram relay. Like the other guest suites it runs
//! directly on a host with VT-x/AMD-V and inside the nested host
//! otherwise; it never skips.

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{Listener, Netns};
use common::{
    case, expect, images, random_file, run_guest_retrying, run_suite, rvm_bin, sha256, spawn_until,
    Case, Images,
};

const DEADLINE: Duration = Duration::from_secs(300);
/// The test user: no account, no group but its own.
const UID: u32 = 4242;
/// The transfer each way, MiB.
const MIB: u64 = 32;
/// The namespace's "host network": the address passt gives the guest
/// (its own) and the gateway, which passt maps to the host's loopback.
const HOST_ADDR: &str = "10.1.0.2";
const GATEWAY: &str = "10.1.0.1";

/// A namespace with one dummy interface as its network.
fn rootless_ns(tag: &str) -> Result<Netns, String> {
    let ns = Netns::new(tag)?;
    ns.sh(&format!(
        "ip link add d0 type dummy && ip addr add {HOST_ADDR}/24 dev d0 && ip link set d0 up && ip route add default via {GATEWAY}"
    ))?;
    Ok(ns)
}

/// The namespace's interfaces, to show that rvm made none.
fn links(ns: &Netns) -> Result<Vec<String>, String> {
    Ok(ns
        .sh("ip -o link show")?
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().to_string())
        .collect())
}

/// `rvm run` as UID in `ns`, no capabilities kept.
fn rvm_as_user(ns: &Netns, img: &Images, scenario: &str, args: &str, net: &str) -> Command {
    let id = UID.to_string();
    let mut c = ns.command("setpriv");
    c.args(["--reuid", &id, "--regid", &id, "--clear-groups"])
        .args(["--inh-caps=-all", "--bounding-set=-all", "--"])
        .arg(rvm_bin());
    common::minimal_guest(&mut c, img, scenario, args, net);
    c
}

/// The user must be able to open `dev`, as udev lets every user on most
/// distributions (the nested host does the same): /dev/kvm to run VMs,
/// /dev/net/tun to attach to a TAP of its own.
fn open_to_users(dev: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dev)
        .map_err(|e| format!("{dev}: {e}"))?
        .permissions()
        .mode();
    if mode & 0o006 != 0o006 {
        return Err(format!(
            "{dev} has mode {:o}: an ordinary user cannot open it, so rootless networking cannot be tested here (give it 0666, as systemd's udev rules do)",
            mode & 0o777
        ));
    }
    Ok(())
}

fn kvm_open_to_users() -> Result<(), String> {
    open_to_users("/dev/kvm")
}

/// passt processes of the test user that have not ended (a zombie has).
fn live_passts() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(|v| v.split_whitespace().next().unwrap_or("").to_string())
            };
            // Debian's passt runs on as passt.avx2 where the CPU has AVX2.
            field("Name:").is_some_and(|n| n == "passt" || n.starts_with("passt."))
                && field("Uid:") == Some(UID.to_string())
                && field("State:").as_deref() != Some("Z")
        })
        .collect()
}

/// Err if a passt of the test user is still there `within` from now.
fn no_passt_left(within: Duration) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let left = live_passts();
        if left.is_empty() {
            return Ok(());
        }
        if t.elapsed() > within {
            return Err(format!("passt still runs after rvm ended: pids {left:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 32 MiB from the guest to a server on the namespace's loopback, which
/// the guest reaches at the gateway's address, then 32 MiB from the host
/// to the guest's port 5002 through `hostfwd=tcp::5002-:5002`.
fn tcp_both_ways(model: &'static str, wire: Wire) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        kvm_open_to_users()?;
        let ns = rootless_ns("user")?;
        let before = links(&ns)?;
        // The stack someone else runs: passt as the test user, listening on
        // a socket rvm connects to (`--net stream=PATH`).
        let sock = std::env::temp_dir().join(format!("rvm-usernet-{}.sock", std::process::id()));
        let _theirs = match wire {
            Wire::Passt => None,
            Wire::Stream => Some(OwnPasst::start(&ns, &sock)?),
        };
        let dir = std::env::temp_dir().join(format!("rvm-usernet-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let (tx, rx) = (dir.join("host-tx"), dir.join("host-rx"));
        random_file(&tx, MIB)?;
        // Only on loopback: nothing but passt's gateway mapping leads here.
        let mut server = ns
            .command("socat")
            .args(["-u", "TCP-LISTEN:5001,bind=127.0.0.1,reuseaddr"])
            .arg(format!("OPEN:{},creat,trunc", rx.display()))
            .spawn()
            .map_err(|e| e.to_string())?;
        // The guest sends first, then listens: the host's sender starts
        // once the server has the guest's stream, and tries again until
        // the guest listens (passt accepts at once, and drops the
        // connection while the guest refuses it).
        let done = Arc::new(AtomicBool::new(false));
        let sender = {
            let (done, tx) = (done.clone(), tx.clone());
            let mut to_guest = ns.command("socat");
            to_guest
                .arg("-u")
                .arg(format!("OPEN:{}", tx.display()))
                .arg("TCP:127.0.0.1:5002");
            std::thread::spawn(move || {
                while matches!(server.try_wait(), Ok(None)) && !done.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = server.kill();
                let _ = server.wait();
                let mut tries = 0;
                while !done.load(Ordering::SeqCst) {
                    tries += 1;
                    let ok = to_guest
                        .stderr(std::process::Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success());
                    if ok {
                        return tries;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
                tries
            })
        };
        let net = match wire {
            Wire::Passt => format!("user,model={model},hostfwd=tcp::5002-:5002"),
            // rvm cannot know the peer's MTU: say it (passt's).
            Wire::Stream => format!("stream={},model={model},mtu=65520", sock.display()),
        };
        let r = run_guest_retrying(
            "usernet",
            || {
                rvm_as_user(
                    &ns,
                    img,
                    "net_tcp",
                    &format!("dhcp,peer={GATEWAY},size={MIB},serial"),
                    &net,
                )
            },
            DEADLINE,
        );
        done.store(true, Ordering::SeqCst);
        let tries = sender.join().map_err(|_| "the sender thread panicked")?;
        if r.status.is_none_or(|s| !s.success()) || !r.init_done() {
            return Err(format!(
                "the guest did not finish:\n{}\n{}",
                r.tail(30),
                r.stderr
            ));
        }
        expect(&r, "dhcp_ip", HOST_ADDR)?;
        expect(&r, "gateway", GATEWAY)?;
        // passt's MTU reached the guest through the NIC's MTU field and
        // DHCP; an e1000 keeps the Ethernet one.
        expect(&r, "mtu", if model == "virtio" { "65520" } else { "1500" })?;
        expect(&r, "tx_sha256", &sha256(&rx)?)?;
        expect(&r, "rx_sha256", &sha256(&tx)?)?;
        println!("    {wire:?} on {model}: DHCP, gateway mapping and forwarding, {MIB} MiB each way (host sender connected on try {tries})");
        let _ = std::fs::remove_dir_all(&dir);
        if wire == Wire::Passt {
            no_passt_left(Duration::from_secs(3))?;
        }
        let after = links(&ns)?;
        if after != before {
            return Err(format!("interfaces before rvm {before:?}, after {after:?}"));
        }
        Ok(())
    }
}

/// Two guests, each run by the test user with `--net dgram=PATH`, one
/// virtio and one e1000, joined by the test's datagram relay (as a
/// two-port switch behind socket_vmnet or gvproxy would): the virtio guest
/// pings the e1000 one with 3000-byte pings (fragments: each frame is a
/// datagram of its own), none lost, and the relay saw frames both ways.
fn dgram_guests_ping_through_a_relay(img: &Images) -> Result<(), String> {
    kvm_open_to_users()?;
    let ns = Netns::new("dgram")?;
    let before = links(&ns)?;
    let dir = std::env::temp_dir().join(format!("rvm-dgram-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let paths = [dir.join("a.sock"), dir.join("b.sock")];
    // rvm's own address is abstract, which is per network namespace: the
    // relay's sockets must live in the guests' namespace to answer it.
    let relay = ns.run_inside(|| DgramRelay::start(&paths))??;
    let net =
        |path: &std::path::Path, model: &str| format!("dgram={},model={model}", path.display());
    // The e1000 guest pings the other each second, so that the relay
    // learns its address before the virtio guest's first frame.
    let peer = spawn_until(
        rvm_as_user(
            &ns,
            img,
            "net_idle",
            "ip=10.0.0.3/24,chatter=10.0.0.2",
            &net(&paths[1], "e1000"),
        ),
        "rvm-init: idle",
        DEADLINE,
    )?;
    let r = run_guest_retrying(
        "dgram",
        || {
            rvm_as_user(
                &ns,
                img,
                "net_ping",
                "ip=10.0.0.2/24,peer=10.0.0.3,count=10,size=3000",
                &net(&paths[0], "virtio"),
            )
        },
        DEADLINE,
    );
    let stopped = peer.stop();
    let frames = relay.stop();
    let _ = std::fs::remove_dir_all(&dir);
    stopped?;
    if r.status.is_none_or(|s| !s.success()) || !r.init_done() {
        return Err(format!(
            "the guest did not finish:\n{}\n{}",
            r.tail(30),
            r.stderr
        ));
    }
    expect(&r, "ping_ok", "1")?;
    expect(&r, "ping_loss", "0")?;
    if r.result("frags_sent")
        .is_none_or(|n| n.parse::<u32>().unwrap_or(0) < 10)
    {
        return Err(format!("the pings were not fragmented:\n{}", r.tail(20)));
    }
    // 10 pings of 3 fragments each way, at least.
    if frames.iter().any(|&n| n < 30) {
        return Err(format!("the relay carried {frames:?} frames (a->b, b->a)"));
    }
    println!("    virtio <-> e1000 over dgram sockets: 10 pings of 3000 bytes, none lost; relay frames {frames:?}");
    let after = links(&ns)?;
    if after != before {
        return Err(format!("interfaces before rvm {before:?}, after {after:?}"));
    }
    Ok(())
}

/// The sandbox preset with an explicit allow on `--net user`, where no
/// kernel interface exists to filter: rvm's own policy stage judges what
/// the guest starts. The namespace gets an "outside" at 198.51.100.2
/// (a non-private address, through a veth) besides its loopback, which
/// the guest reaches at the gateway. The explicit allow to the gateway's
/// port 5003 wins over the private range; the gateway's other port, the
/// host's own address and port 25 outside are refused at once (RST), the
/// outside's port 5001 is reached; each listener's log agrees.
fn sandbox_on_the_rootless_backend(model: &'static str) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        kvm_open_to_users()?;
        let ns = rootless_ns("usbx")?;
        let out = Netns::new("usbxo")?;
        ns.veth_to(&out, ("vo", "198.51.100.1/24"), ("eo", "198.51.100.2/24"))?;
        let dir = std::env::temp_dir().join(format!("rvm-usbx-{}-{model}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let listeners = [
            Listener::start(&ns, "loopback:5003", Some("127.0.0.1"), 5003, &dir)?,
            Listener::start(&ns, "loopback:5004", Some("127.0.0.1"), 5004, &dir)?,
            Listener::start(&ns, "host:5005", None, 5005, &dir)?,
            Listener::start(&out, "outside:5001", None, 5001, &dir)?,
            Listener::start(&out, "outside:25", None, 25, &dir)?,
        ];
        let probe = format!(
            "{GATEWAY}:5003+{GATEWAY}:5004+198.51.100.1:5005+198.51.100.2:5001+198.51.100.2:25+ping:{GATEWAY}"
        );
        let r = run_guest_retrying(
            "usernet",
            || {
                rvm_as_user(
                    &ns,
                    img,
                    "net_probe",
                    &format!("dhcp,peer={GATEWAY},probe={probe}"),
                    &format!("user,model={model},egress=sandbox,allow={GATEWAY}:5003/tcp"),
                )
            },
            DEADLINE,
        );
        let accepted = common::netns::accepted(&listeners);
        drop(listeners);
        let _ = std::fs::remove_dir_all(&dir);
        r.finished()?;
        let gw = GATEWAY.replace('.', "_");
        for (key, want) in [
            (format!("try_1_{gw}_5003"), "ok"),
            (format!("try_1_{gw}_5004"), "refused"),
            ("try_1_198_51_100_1_5005".to_string(), "refused"),
            ("try_1_198_51_100_2_5001".to_string(), "ok"),
            ("try_1_198_51_100_2_25".to_string(), "refused"),
            (format!("try_1_ping_{gw}"), "fail"),
        ] {
            expect(&r, &key, want)?;
        }
        let want = [
            "loopback:5003=1",
            "loopback:5004=0",
            "host:5005=0",
            "outside:5001=1",
            "outside:25=0",
        ];
        if accepted != want {
            return Err(format!(
                "listeners accepted {accepted:?}, expected {want:?}"
            ));
        }
        no_passt_left(Duration::from_secs(3))?;
        println!("    {model} on passt, sandbox + allow {GATEWAY}:5003/tcp in rvm's stage: the allow won, the rest refused by RST; listeners {accepted:?}");
        Ok(())
    }
}

/// A persistent TAP of the test user's (made by root, already up and on a
/// bridge, as `ip tuntap add ... user U` makes one), which rvm opens by
/// name with no capability: nft is refused, so `egress=` runs in rvm's
/// stage (it says so), with the TAP's vnet header on the answers it
/// writes: the allowed port connects, the other is refused at once.
fn a_users_own_tap_under_a_policy_in_rvms_stage(img: &Images) -> Result<(), String> {
    kvm_open_to_users()?;
    open_to_users("/dev/net/tun")?;
    let ns = Netns::new("utap")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    ns.sh(&format!(
        "ip tuntap add dev rvmut0 mode tap user {UID} vnet_hdr && ip link set rvmut0 master br0 && ip link set rvmut0 up"
    ))?;
    let dir = std::env::temp_dir().join(format!("rvm-utap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let listeners = [
        Listener::start(&ns, "host:5001", None, 5001, &dir)?,
        Listener::start(&ns, "host:5002", None, 5002, &dir)?,
    ];
    let r = run_guest_retrying(
        "usernet",
        || {
            rvm_as_user(
                &ns,
                img,
                "net_probe",
                "probe=10.0.0.1:5001+10.0.0.1:5002+ping:10.0.0.1",
                "tap=rvmut0,egress=deny,allow=10.0.0.1:5001/tcp",
            )
        },
        DEADLINE,
    );
    let accepted = common::netns::accepted(&listeners);
    drop(listeners);
    let _ = std::fs::remove_dir_all(&dir);
    r.finished()?;
    if !r
        .stderr
        .contains("the policy runs in rvm's data path instead")
    {
        return Err(format!(
            "rvm did not say where the policy runs:\n{}",
            r.stderr
        ));
    }
    for (key, want) in [
        ("try_1_10_0_0_1_5001", "ok"),
        ("try_1_10_0_0_1_5002", "refused"),
        ("try_1_ping_10_0_0_1", "fail"),
    ] {
        expect(&r, key, want)?;
    }
    let want = ["host:5001=1", "host:5002=0"];
    if accepted != want {
        return Err(format!(
            "listeners accepted {accepted:?}, expected {want:?}"
        ));
    }
    let tables = ns.sh("nft list tables")?;
    if tables.contains("rvm_egress_") {
        return Err(format!("an unprivileged rvm left tables: {tables}"));
    }
    println!("    the user's own TAP, no capability: the policy ran in rvm's stage; listeners {accepted:?}");
    Ok(())
}

/// Two UNIX datagram sockets back to back: what arrives at one is sent,
/// from the other, to whoever last sent to that other. Counts the frames
/// each way.
struct DgramRelay {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
}

impl DgramRelay {
    fn start(paths: &[std::path::PathBuf; 2]) -> Result<DgramRelay, String> {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        use std::sync::Mutex;
        let mut socks = Vec::new();
        for p in paths {
            let _ = std::fs::remove_file(p);
            let s = UnixDatagram::bind(p).map_err(|e| format!("{}: {e}", p.display()))?;
            // rvm runs as the test user and must be able to send here.
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o666))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .map_err(|e| e.to_string())?;
            socks.push(Arc::new(s));
        }
        let peers: Arc<[Mutex<Option<SocketAddr>>; 2]> =
            Arc::new([Mutex::new(None), Mutex::new(None)]);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..2)
            .map(|i| {
                let (from, to) = (socks[i].clone(), socks[1 - i].clone());
                let (peers, stop) = (peers.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    let mut frames = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let Ok((n, addr)) = from.recv_from(&mut buf) else {
                            continue;
                        };
                        *peers[i].lock().unwrap() = Some(addr);
                        let other = peers[1 - i].lock().unwrap().clone();
                        if let Some(other) = other {
                            if to.send_to_addr(&buf[..n], &other).is_ok() {
                                frames += 1;
                            }
                        }
                    }
                    frames
                })
            })
            .collect();
        Ok(DgramRelay { stop, threads })
    }

    /// Ends the relay: the frames it carried a->b and b->a.
    fn stop(self) -> [u64; 2] {
        self.stop.store(true, Ordering::SeqCst);
        let mut n = self.threads.into_iter().map(|t| t.join().unwrap_or(0));
        [n.next().unwrap_or(0), n.next().unwrap_or(0)]
    }
}

/// Which wire a case's NIC has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wire {
    /// `--net user`: rvm starts passt.
    Passt,
    /// `--net stream=PATH`: passt is the test's, on a UNIX socket.
    Stream,
}

/// A passt the test runs as the test user, listening on a socket for one
/// client and forwarding port 5002 to the guest; killed when dropped.
struct OwnPasst(std::process::Child);

impl OwnPasst {
    fn start(ns: &Netns, sock: &std::path::Path) -> Result<OwnPasst, String> {
        let _ = std::fs::remove_file(sock);
        let id = UID.to_string();
        let child = ns
            .command("setpriv")
            .args(["--reuid", &id, "--regid", &id, "--clear-groups", "--"])
            .arg(common::passt_program())
            .args(["--foreground", "--quiet", "--one-off", "-t", "5002:5002"])
            .arg("--socket")
            .arg(sock)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start passt: {e}"))?;
        let mut passt = OwnPasst(child);
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > Duration::from_secs(10) || matches!(passt.0.try_wait(), Ok(Some(_))) {
                return Err(format!("passt did not listen on {}", sock.display()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(passt)
    }
}

impl Drop for OwnPasst {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// rvm ended by a signal leaves no passt: on SIGTERM rvm reaps it; on
/// SIGKILL passt ends by itself once its socket closes.
fn passt_never_outlives_rvm(img: &Images) -> Result<(), String> {
    kvm_open_to_users()?;
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        let ns = rootless_ns("sig")?;
        let before = links(&ns)?;
        let mut guest = spawn_until(
            rvm_as_user(&ns, img, "net_idle", "dhcp", "user,hostfwd=tcp::5003-:5003"),
            "rvm-init: idle",
            DEADLINE,
        )?;
        let passts = live_passts();
        if passts.len() != 1 {
            let _ = guest.child.kill();
            return Err(format!(
                "expected one passt while the guest runs, found {passts:?}"
            ));
        }
        // SAFETY: kill(2) on the pid of our own child process.
        unsafe { libc::kill(guest.child.id() as i32, signal) };
        let status = guest.child.wait().map_err(|e| e.to_string())?;
        if signal == libc::SIGTERM && !status.success() {
            return Err(format!("rvm exited with {status} after SIGTERM"));
        }
        no_passt_left(Duration::from_secs(5)).map_err(|e| format!("{name}: {e}"))?;
        let after = links(&ns)?;
        if after != before {
            return Err(format!(
                "{name}: interfaces before rvm {before:?}, after {after:?}"
            ));
        }
        println!("    {name}: rvm gone, its passt (pid {}) gone", passts[0]);
    }
    Ok(())
}

/// The passt Debian 12 ships: it segfaults (in libc, at address 0x2c828)
/// on the first TCP connection an e1000 guest opens, under QEMU's e1000
/// (`-netdev stream`) as under rvm's, with or without `--mtu 1500`
/// (reproduced in the nested host on 2026-12-01); a virtio guest is fine.
/// Debian 13's (scripts/build-passt, which `scripts/test` names in
/// RVM_PASST) runs the e1000 case.
const PASST_E1000_SEGFAULTS: &str = "0.0~git20230309.7c7625d-1";

/// Which passt the suite runs, and its Debian version when it is the
/// packaged one (this passt prints `--version` only to a terminal).
fn passt_in_use() -> (String, Option<String>) {
    if let Some(p) = std::env::var_os("RVM_PASST") {
        return (format!("{} (RVM_PASST)", p.to_string_lossy()), None);
    }
    let version = Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", "passt"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    (
        format!("passt from PATH, Debian's {version}"),
        Some(version),
    )
}

fn cases() -> Vec<Case<Images>> {
    let mut cases = vec![
        case(
            "virtio_user_dhcp_gateway_and_hostfwd_32mib_each_way",
            tcp_both_ways("virtio", Wire::Passt),
        ),
        case(
            "virtio_stream_to_a_passt_of_ones_own_32mib_each_way",
            tcp_both_ways("virtio", Wire::Stream),
        ),
    ];
    let e1000 = "e1000_user_dhcp_gateway_and_hostfwd_32mib_each_way";
    let (passt, version) = passt_in_use();
    println!("rootless networking tests run {passt}");
    if version.as_deref() == Some(PASST_E1000_SEGFAULTS) {
        // Said on every run, not skipped in silence.
        println!(
            "NOT RUN {e1000}: this host's passt ({PASST_E1000_SEGFAULTS}) segfaults on an e1000 guest's first TCP connection, under QEMU as under rvm; scripts/build-passt builds one that runs it (RVM_PASST)"
        );
    } else {
        cases.push(case(e1000, tcp_both_ways("e1000", Wire::Passt)));
        cases.push(case(
            "e1000_user_sandbox_policy_in_rvms_stage",
            sandbox_on_the_rootless_backend("e1000"),
        ));
    }
    cases.push(case("passt_never_outlives_rvm", passt_never_outlives_rvm));
    cases.push(case(
        "a_users_own_tap_with_a_policy_in_rvms_stage",
        a_users_own_tap_under_a_policy_in_rvms_stage,
    ));
    cases.push(case(
        "virtio_user_sandbox_policy_in_rvms_stage",
        sandbox_on_the_rootless_backend("virtio"),
    ));
    cases.push(case(
        "dgram_virtio_and_e1000_guests_ping_through_a_relay",
        dgram_guests_ping_through_a_relay,
    ));
    cases
}

fn main() {
    run_suite(
        "rootless networking tests",
        cases(),
        &["--mem", "4096", "--idle-timeout", "180"],
        images,
    );
}
