//! Egress policy on real guests: what a guest may reach, enforced in the
//! host kernel (nftables) below the guest, on rvm's data path and with
//! vhost-net alike. Each case makes two namespaces: the host side (where
//! rvm runs, with the TAP bridged on br0 at 10.0.0.1 or routed with
//! 10.0.0.1 on the TAP itself) and the outside (192.0.2.2), routed
//! through the host side. Listeners on both log every connection they
//! accept, so each verdict is checked at both ends: the guest's attempt
//! (connected, refused at once by a RST, or nothing) and whether the
//! listener saw it. Like the other guest suites it runs directly on a host
//! with VT-x/AMD-V and inside the nested host otherwise; it never skips.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::netns::{Listener, Netns};
use common::{
    case, expect, images, run_guest_retrying, run_suite, rvm_bin, Case, GuestRun, Images,
};

const DEADLINE: Duration = Duration::from_secs(300);
const OUTSIDE: &str = "192.0.2.2";
/// The host side's address towards the outside: an address of the host
/// rvm runs on, which the sandbox default refuses.
const HOST_OUTER: &str = "192.0.2.1";

/// How the TAP reaches the host side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wiring {
    /// On bridge br0 (10.0.0.1/24): the bridge family's table judges.
    Bridged,
    /// 10.0.0.1/24 on the TAP itself, routed: the inet family's table.
    Routed,
}

/// The host side and the outside, and their listeners.
struct World {
    host: Netns,
    out: Netns,
    dir: PathBuf,
    listeners: Vec<Listener>,
}

impl World {
    fn new(tag: &str, wiring: Wiring) -> Result<World, String> {
        let host = Netns::new(tag)?;
        let out = Netns::new(&format!("{tag}o"))?;
        let dir = std::env::temp_dir().join(format!("rvm-egress-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        if wiring == Wiring::Bridged {
            host.bridge("10.0.0.1/24", 1500)?;
            host.sh("ip -6 addr add fd00::1/64 dev br0 nodad")?;
        } else {
            // rvm runs it with the TAP's name once the TAP exists.
            let up = dir.join("ifup");
            std::fs::write(
                &up,
                "#!/bin/sh\nip addr add 10.0.0.1/24 dev \"$1\" && ip link set \"$1\" up\n",
            )
            .map_err(|e| e.to_string())?;
            host.sh(&format!("chmod 0755 {}", up.display()))?;
        }
        host.veth_to(
            &out,
            ("vo", &format!("{HOST_OUTER}/24")),
            ("eo", &format!("{OUTSIDE}/24")),
        )?;
        host.sh("sysctl -qw net.ipv4.ip_forward=1")?;
        out.sh(&format!("ip route add 10.0.0.0/24 via {HOST_OUTER}"))?;
        let mut w = World {
            host,
            out,
            dir,
            listeners: Vec::new(),
        };
        for port in [5001, 5002] {
            w.listen(true, port)?;
        }
        for port in [5001, 5002, 25] {
            w.listen(false, port)?;
        }
        Ok(w)
    }

    fn listen(&mut self, host: bool, port: u16) -> Result<(), String> {
        let (ns, name) = if host {
            (&self.host, format!("host:{port}"))
        } else {
            (&self.out, format!("outside:{port}"))
        };
        let l = Listener::start(ns, &name, None, port, &self.dir)?;
        self.listeners.push(l);
        Ok(())
    }

    /// The connections each listener accepted, as `where:port=N`.
    fn accepted(&self) -> Vec<String> {
        common::netns::accepted(&self.listeners)
    }

    /// The nftables tables rvm has in the host side's kernel.
    fn rvm_tables(&self) -> Result<Vec<String>, String> {
        Ok(self
            .host
            .sh("nft list tables")?
            .lines()
            .filter(|l| l.contains("rvm_egress_"))
            .map(str::to_string)
            .collect())
    }

    /// `rvm run` as the host side's, probing `probe` (see the guest's
    /// net_probe) over NIC `net`.
    fn rvm(&self, img: &Images, args: &str, net: &str) -> Command {
        let mut c = self.host.command(rvm_bin());
        common::minimal_guest(&mut c, img, "net_probe", args, net);
        c
    }

    fn ifup(&self) -> String {
        format!("script={}", self.dir.join("ifup").display())
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.listeners.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Tries, from the outside, to open a connection to the guest's port 6000
/// (its net_probe serve=6000 answers "guest") until `done`; whether one
/// got the answer.
fn inbound_from_outside(out: &Netns, done: Arc<AtomicBool>) -> std::thread::JoinHandle<bool> {
    let mut c = out.command("socat");
    c.args(["-T", "3", "-", "TCP:10.0.0.2:6000,connect-timeout=3"])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    std::thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            if c.output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("guest"))
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        false
    })
}

/// Every `(target, verdict)` of round `round`, checked against the
/// guest's console.
fn expect_tries(r: &GuestRun, round: u32, want: &[(&str, &str)]) -> Result<(), String> {
    for (target, verdict) in want {
        let key = format!("try_{round}_{}", target.replace(['.', ':'], "_"));
        expect(r, &key, verdict).map_err(|e| format!("{target}: {e}"))?;
    }
    Ok(())
}

/// `egress=deny` with one allow per IP version, vhost-net on a bridged
/// TAP: only the allowed port connects (IPv4 and IPv6); the other port, the outside, port 25 and ICMP
/// are refused at once (RST, ICMP error), and no listener but the allowed
/// one saw a connection; the outside still reaches the guest's own
/// service (flows the other side starts pass). No table is left after.
fn deny_with_one_allow_vhost(img: &Images) -> Result<(), String> {
    let w = World::new("egdeny", Wiring::Bridged)?;
    let probe = format!(
        "10.0.0.1:5001+10.0.0.1:5002+{OUTSIDE}:5001+{OUTSIDE}:25+ping:10.0.0.1+ping:{OUTSIDE}+fd00::1:5001+fd00::1:5002"
    );
    let done = Arc::new(AtomicBool::new(false));
    let inbound = inbound_from_outside(&w.out, done.clone());
    let r = run_guest_retrying(
        "egress",
        || {
            w.rvm(
                img,
                &format!("probe={probe},serve=6000,linger=6,ip6=fd00::2/64"),
                "tap=rvmeg0,bridge=br0,vhost=on,egress=deny,allow=10.0.0.1/32:5001/tcp,allow=[fd00::1]:5001/tcp",
            )
        },
        DEADLINE,
    );
    done.store(true, Ordering::SeqCst);
    let inbound = inbound.join().map_err(|_| "the inbound thread panicked")?;
    r.finished()?;
    if !r.stderr.contains("data path: vhost-net") {
        return Err(format!("vhost-net did not carry the NIC:\n{}", r.stderr));
    }
    expect_tries(
        &r,
        1,
        &[
            ("10.0.0.1:5001", "ok"),
            ("10.0.0.1:5002", "refused"),
            (&format!("{OUTSIDE}:5001"), "refused"),
            (&format!("{OUTSIDE}:25"), "refused"),
            ("ping:10.0.0.1", "fail"),
            (&format!("ping:{OUTSIDE}"), "fail"),
            ("fd00::1:5001", "ok"),
            ("fd00::1:5002", "refused"),
        ],
    )?;
    let accepted = w.accepted();
    let want = [
        "host:5001=2",
        "host:5002=0",
        "outside:5001=0",
        "outside:5002=0",
        "outside:25=0",
    ];
    if accepted != want {
        return Err(format!(
            "listeners accepted {accepted:?}, expected {want:?}"
        ));
    }
    if !inbound {
        return Err("the outside could not reach the guest's service on port 6000".into());
    }
    let left = w.rvm_tables()?;
    if !left.is_empty() {
        return Err(format!("nftables tables left after rvm: {left:?}"));
    }
    println!("    deny + allow 10.0.0.1:5001/tcp and [fd00::1]:5001/tcp with vhost-net: 2 allowed (IPv4, IPv6), 4 refused by RST, 2 pings refused; listeners {accepted:?}; inbound from the outside passed");
    w.host.no_taps_left()
}

/// The sandbox preset on a routed TAP, on rvm's data path: the host's
/// addresses and private ranges refused, an explicit allow wins over them,
/// the outside reachable except TCP port 25.
fn sandbox_routed(img: &Images) -> Result<(), String> {
    let w = World::new("egsbx", Wiring::Routed)?;
    let probe = format!(
        "10.0.0.1:5001+10.0.0.1:5002+{HOST_OUTER}:5002+{OUTSIDE}:5001+{OUTSIDE}:25+ping:{OUTSIDE}+ping:10.0.0.1"
    );
    let r = run_guest_retrying(
        "egress",
        || {
            w.rvm(
                img,
                &format!("probe={probe}"),
                &format!(
                    "tap=rvmeg1,vhost=off,{},egress=sandbox,allow=10.0.0.1/32:5001/tcp",
                    w.ifup()
                ),
            )
        },
        DEADLINE,
    );
    r.finished()?;
    expect_tries(
        &r,
        1,
        &[
            ("10.0.0.1:5001", "ok"),
            ("10.0.0.1:5002", "refused"),
            (&format!("{HOST_OUTER}:5002"), "refused"),
            (&format!("{OUTSIDE}:5001"), "ok"),
            (&format!("{OUTSIDE}:25"), "refused"),
            (&format!("ping:{OUTSIDE}"), "ok"),
            ("ping:10.0.0.1", "fail"),
        ],
    )?;
    let accepted = w.accepted();
    let want = [
        "host:5001=1",
        "host:5002=0",
        "outside:5001=1",
        "outside:5002=0",
        "outside:25=0",
    ];
    if accepted != want {
        return Err(format!(
            "listeners accepted {accepted:?}, expected {want:?}"
        ));
    }
    let left = w.rvm_tables()?;
    if !left.is_empty() {
        return Err(format!("nftables tables left after rvm: {left:?}"));
    }
    println!("    sandbox on a routed TAP: explicit allow won, host and private refused, outside reached but for port 25; listeners {accepted:?}");
    w.host.no_taps_left()
}

/// SIGTERM leaves no table; SIGKILL leaves one (nothing could take it
/// away), which the next rvm on the same TAP reclaims: its policy holds
/// and its exit leaves nothing.
fn nothing_left_after_sigterm_and_sigkill(img: &Images) -> Result<(), String> {
    let w = World::new("egkill", Wiring::Bridged)?;
    let net = "tap=rvmeg2,bridge=br0,egress=deny,allow=10.0.0.1/32:5001/tcp";
    for signal in [libc::SIGTERM, libc::SIGKILL] {
        let c = w.rvm(img, "probe=10.0.0.1:5001,linger=600", net);
        let guest = common::spawn_until(c, "rvm-init: probing", DEADLINE)?;
        let tables = w.rvm_tables()?;
        if tables.len() != 2 {
            return Err(format!(
                "while the guest runs: tables {tables:?}, expected two"
            ));
        }
        let mut child = guest.child;
        // SAFETY: kill(2) on our own child (ip netns exec exec'd rvm).
        unsafe { libc::kill(child.id() as i32, signal) };
        let t = Instant::now();
        while child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if t.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                return Err(format!("rvm did not end within 30 s of signal {signal}"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let left = w.rvm_tables()?;
        match signal {
            libc::SIGTERM if !left.is_empty() => {
                return Err(format!("tables left after SIGTERM: {left:?}"))
            }
            libc::SIGKILL if left.len() != 2 => {
                return Err(format!(
                    "after SIGKILL: tables {left:?}, expected the two stale ones"
                ))
            }
            _ => {}
        }
    }
    // The next rvm on that TAP: the stale tables are replaced.
    let r = run_guest_retrying(
        "egress",
        || w.rvm(img, "probe=10.0.0.1:5001+10.0.0.1:5002", net),
        DEADLINE,
    );
    r.finished()?;
    expect_tries(
        &r,
        1,
        &[("10.0.0.1:5001", "ok"), ("10.0.0.1:5002", "refused")],
    )?;
    let left = w.rvm_tables()?;
    if !left.is_empty() {
        return Err(format!("tables left after the next run: {left:?}"));
    }
    println!("    SIGTERM: no table left; SIGKILL: two stale tables, reclaimed by the next rvm, whose policy held");
    w.host.no_taps_left()
}

fn cases() -> Vec<Case<Images>> {
    vec![
        case(
            "deny_with_one_allow_vhost_net_bridged",
            deny_with_one_allow_vhost,
        ),
        case("sandbox_preset_routed_tap_rvms_data_path", sandbox_routed),
        case(
            "nothing_left_after_sigterm_and_sigkill_then_reclaimed",
            nothing_left_after_sigterm_and_sigkill,
        ),
    ]
}

fn main() {
    run_suite(
        "egress policy tests",
        cases(),
        &["--mem", "4096", "--idle-timeout", "180"],
        images,
    );
}
