//! The control API on real guests, driven only through its socket with
//! curl, as a program in another language would: the VM's state, counters
//! after pings (rvm's data path and vhost-net, whose counters are the
//! TAP's), link down and up as the guest sees it, a rate limit set and
//! measured, a capture started and stopped, bad requests and a client that
//! stalls against a running VM, two clients at once, and a shutdown that
//! ends rvm with 0 and takes the socket away. Like the other guest suites
//! it runs directly on a host with VT-x/AMD-V and inside the nested host
//! otherwise, each case in a network namespace it makes; it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{rate_between, Netns};
use common::{
    case, images, is_nested_reset_flake, nested_guest_entry_stack_fault, note_case_flake,
    run_suite, rvm_bin, spawn_until, Case, GuestRun, Images, Spawned,
};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(300);

/// One curl call: the status and the JSON body.
fn curl(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value), String> {
    let mut c = Command::new("curl");
    c.args(["-sS", "-m", "20", "--unix-socket"])
        .arg(sock)
        .args(["-X", method, "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = c
        .arg(format!("http://rvm{path}"))
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status: u16 = code.trim().parse().unwrap_or(0);
    if status == 0 {
        // 000: no answer at all (connection refused, closed, timed out).
        return Err(format!(
            "curl {method} {path}: no answer ({}): {text}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// `curl` that must answer `want`.
fn expect_status(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    want: u16,
) -> Result<Value, String> {
    let (status, v) = curl(sock, method, path, body)?;
    if status != want {
        return Err(format!("{method} {path}: {status}, expected {want}: {v}"));
    }
    Ok(v)
}

/// A running guest; dropped, it is killed (a failed case leaves nothing).
struct Guest {
    spawned: Option<Spawned>,
    sock: PathBuf,
    dir: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Some(mut s) = self.spawned.take() {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A guest in `ns` with `net` on br0, running `scenario`, serving the API;
/// returns once its console says `marker`.
fn start(
    ns: &Netns,
    img: &Images,
    (tag, marker): (&str, &'static str),
    scenario: &str,
    args: &str,
    net: &str,
) -> Result<Guest, String> {
    let dir = std::env::temp_dir().join(format!("rvm-api-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let sock = dir.join("api.sock");
    let mut c = ns.command(rvm_bin());
    common::minimal_guest(&mut c, img, scenario, args, net);
    c.arg("--api-sock").arg(&sock).stdin(Stdio::null());
    let spawned = spawn_until(c, marker, DEADLINE)?;
    Ok(Guest {
        spawned: Some(spawned),
        sock,
        dir,
    })
}

impl Guest {
    /// A call that must answer `want`; if not, rvm is ended and what it
    /// printed joins the error (a guest that reset is marked for a rerun).
    fn api(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
        want: u16,
    ) -> Result<Value, String> {
        let sock = self.sock.clone();
        expect_status(&sock, method, path, body, want).map_err(|e| format!("{e}\n{}", self.kill()))
    }

    /// Ends rvm for a failure report: what it printed (console and
    /// stderr). When rvm had already ended by itself on a known
    /// nested-host fault (the guest reset, or its kernel died on its entry
    /// stack), the case is marked for a rerun and the report says so.
    fn kill(&mut self) -> String {
        let Some(mut spawned) = self.spawned.take() else {
            return String::new();
        };
        let ended = spawned.child.try_wait().ok().flatten();
        let _ = spawned.child.kill();
        let _ = spawned.child.wait();
        let mut stderr = String::new();
        if let Some(mut e) = spawned.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        let console = spawned.console_after_exit();
        let mut flake = String::new();
        if let Some(status) = ended {
            let run = GuestRun {
                status: Some(status),
                killed: None,
                console: console.clone(),
                stderr: stderr.clone(),
                marker_at: None,
                elapsed: Duration::ZERO,
            };
            if is_nested_reset_flake(&run) || nested_guest_entry_stack_fault(&run).is_some() {
                note_case_flake();
                flake =
                    "rvm had ended by itself on a known nested-host fault (marked for a rerun)\n"
                        .into();
            } else {
                flake = format!("rvm had ended by itself ({status})\n");
            }
        }
        let tail: Vec<&str> = console.lines().rev().take(20).collect();
        format!(
            "{flake}--- console (end) ---\n{}\n--- rvm's stderr ---\n{stderr}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Shuts the VM down through the API (the minimal guest ignores
    /// Ctrl-Alt-Del, so the grace runs out and it is stopped): rvm must
    /// end with 0 within the grace and a margin, the socket gone; the
    /// console until then.
    fn shutdown(mut self) -> Result<String, String> {
        let sock = self.sock.clone();
        let v = self.api("PUT", "/v1/vm/shutdown", Some(r#"{"grace_s": 2}"#), 202)?;
        let Some(mut spawned) = self.spawned.take() else {
            return Err("no guest".into());
        };
        if v["state"] != "shutting_down" {
            return Err(format!("shutdown said {v}"));
        }
        let t = Instant::now();
        let status = loop {
            if let Some(s) = spawned.child.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            if t.elapsed() > Duration::from_secs(30) {
                let _ = spawned.child.kill();
                return Err("rvm did not end within 30 s of the shutdown".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let console = spawned.console_after_exit();
        if !status.success() {
            return Err(format!(
                "rvm ended with {status} after the shutdown\n{console}"
            ));
        }
        if sock.exists() {
            return Err("the API socket is still there after rvm ended".into());
        }
        Ok(console)
    }
}

/// Pings the guest `n` times from the host side; how many were answered.
fn pings(ns: &Netns, n: u32) -> u32 {
    let out = ns
        .command("ping")
        .args(["-c", &n.to_string(), "-i", "0.2", "-W", "2", "10.0.0.2"])
        .output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains("bytes from"))
            .count() as u32
    })
    .unwrap_or(0)
}

/// State, counters after pings, a capture around them, and a shutdown.
fn counters_capture_and_shutdown(vhost: bool) -> impl Fn(&Images) -> Result<(), String> {
    move |img| {
        let ns = Netns::new("apic")?;
        ns.bridge("10.0.0.1/24", 1500)?;
        let net = format!(
            "tap=rvmapic0,bridge=br0,vhost={}",
            if vhost { "on" } else { "off" }
        );
        let mut g = start(&ns, img, ("c", "rvm-init: idle"), "net_idle", "", &net)?;
        let vm = g.api("GET", "/v1/vm", None, 200)?;
        if vm["state"] != "running" || vm["nics"] != serde_json::json!(["net0"]) || vm["vcpus"] != 2
        {
            return Err(format!("GET /v1/vm: {vm}"));
        }
        let pcap = g.dir.join("pings.pcap");
        g.api(
            "PATCH",
            "/v1/nics/net0",
            Some(&format!(r#"{{"dump": "{}"}}"#, pcap.display())),
            200,
        )?;
        let answered = pings(&ns, 10);
        let nic = g.api("PATCH", "/v1/nics/net0", Some(r#"{"dump": null}"#), 200)?;
        let c = &nic["counters"];
        let (want_path, want_source) = if vhost {
            ("vhost-net", "kernel")
        } else {
            ("userspace", "rvm")
        };
        if nic["data_path"] != want_path || c["source"] != want_source {
            return Err(format!("data path and counters' source: {nic}"));
        }
        let rx = c["rx_frames"].as_u64().unwrap_or(0);
        let tx = c["tx_frames"].as_u64().unwrap_or(0);
        if answered < 9 || rx < u64::from(answered) || tx < u64::from(answered) {
            return Err(format!("{answered} pings answered, counters {c}"));
        }
        // The capture has the pings both ways.
        let out = Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&pcap)
            .arg("icmp")
            .output()
            .map_err(|e| format!("tcpdump: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let (req, rep) = (
            text.matches("echo request").count(),
            text.matches("echo reply").count(),
        );
        if req < answered as usize || rep < answered as usize {
            return Err(format!(
                "the capture has {req} requests and {rep} replies for {answered} pings"
            ));
        }
        if nic["capture"]["captured"].as_u64().unwrap_or(0) < 2 * u64::from(answered) {
            return Err(format!("capture counters: {}", nic["capture"]));
        }
        g.shutdown()?;
        println!("    {want_path}: {answered} pings, counters rx {rx} tx {tx} ({want_source}), capture {req} requests {rep} replies; shutdown: exit 0, socket gone");
        ns.no_taps_left()
    }
}

/// Link down and up through PATCH: the guest's carrier follows, pings
/// fail while down and are answered after.
fn link_down_and_up(img: &Images) -> Result<(), String> {
    let ns = Netns::new("apil")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let mut g = start(
        &ns,
        img,
        ("l", "rvm-init: idle"),
        "net_carrier",
        "",
        "tap=rvmapil0,bridge=br0",
    )?;
    if pings(&ns, 2) == 0 {
        return Err("no ping answered before the link went down".into());
    }
    let nic = g.api("PATCH", "/v1/nics/net0", Some(r#"{"link": "down"}"#), 200)?;
    if nic["link"] != "down" {
        return Err(format!("after link down: {nic}"));
    }
    std::thread::sleep(Duration::from_secs(1));
    let while_down = pings(&ns, 3);
    g.api("PATCH", "/v1/nics/net0", Some(r#"{"link": "up"}"#), 200)?;
    let t = Instant::now();
    let mut after = 0;
    while after == 0 && t.elapsed() < Duration::from_secs(20) {
        after = pings(&ns, 1);
    }
    let console = g.shutdown()?;
    let carriers: Vec<&str> = console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("rvm-result: carrier="))
        .collect();
    if while_down != 0 || after == 0 || !carriers.ends_with(&["0", "1"]) {
        return Err(format!(
            "pings while down {while_down}, after {after}; the guest's carrier: {carriers:?}"
        ));
    }
    println!("    link down: carrier 0, no ping answered; up: carrier 1, pings again");
    ns.no_taps_left()
}

/// A TX rate limit set through PATCH while the guest streams holds within
/// 10 % from 1 s after (the TAP's counters on the host's clock).
fn rate_limit_set_and_measured(img: &Images) -> Result<(), String> {
    let ns = Netns::new("apir")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let mut listener = ns
        .command("socat")
        .args(["-u", "TCP-LISTEN:5001,reuseaddr", "OPEN:/dev/null"])
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut sampler = ns.sample_link("rvmapir0")?;
    let g = start(
        &ns,
        img,
        ("r", "rvm-result: chunk_sha256"),
        "net_stream",
        "port=5001,secs=120",
        "tap=rvmapir0,bridge=br0,vhost=off",
    );
    let mut g = match g {
        Ok(g) => g,
        Err(e) => {
            let _ = listener.kill();
            return Err(e);
        }
    };
    let t = Instant::now();
    while sampler.samples().last().map_or(0, |s| s.rx_bytes) < 1 << 20 {
        if t.elapsed() > Duration::from_secs(120) {
            let _ = listener.kill();
            return Err("the guest's stream never flowed".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let limit = 4_000_000.0;
    let set = common::netns::now();
    let nic = g.api(
        "PATCH",
        "/v1/nics/net0",
        Some(r#"{"tx_rate": "4Mbit"}"#),
        200,
    );
    // The limit is in force once the PATCH has answered: measure from
    // then (the call's own time is reported).
    let answered = common::netns::now();
    let took = answered - set;
    let set = answered;
    let nic = match nic {
        Ok(n) => n,
        Err(e) => {
            let _ = listener.kill();
            return Err(e);
        }
    };
    std::thread::sleep(Duration::from_secs(8));
    let after = g.api("GET", "/v1/nics/net0", None, 200)?;
    g.shutdown()?;
    let _ = listener.kill();
    let _ = listener.wait();
    let samples = sampler.samples();
    let inside: Vec<_> = samples
        .iter()
        .filter(|s| s.t >= set + 1.0 && s.t <= set + 7.5)
        .collect();
    let got = match (inside.first(), inside.last()) {
        (Some(a), Some(b)) if b.t > a.t => (b.rx_bytes - a.rx_bytes) as f64 * 8.0 / (b.t - a.t),
        _ => return Err("no samples after the change".into()),
    };
    if (got - limit).abs() > limit * 0.1 {
        return Err(format!(
            "{:.2} Mbit/s against a 4 Mbit/s limit (the PATCH took {took:.2} s); overall {:?}; the NIC after the PATCH: {}; 8 s later: {}; samples: {:?}",
            got / 1e6,
            rate_between(&samples, |s| s.rx_bytes, 0, u64::MAX),
            nic["limits"],
            after,
            samples.iter().step_by(5).map(|s| (s.t - set, s.rx_bytes)).collect::<Vec<_>>()
        ));
    }
    if nic["limits"]["tx"]["bandwidth"]["bytes_per_s"] != 500_000.0
        || after["limits"]["throttled"]["tx"].as_u64().unwrap_or(0) == 0
    {
        return Err(format!(
            "the NIC's limits: {} then {}",
            nic["limits"], after["limits"]
        ));
    }
    println!(
        "    tx_rate=4Mbit through the API (the PATCH took {took:.2} s): {:.2} Mbit/s from 1 s after",
        got / 1e6
    );
    ns.no_taps_left()
}

/// Bad requests against a running VM get their codes and harm nothing; a
/// client that sends half a request and waits does not hold others; two
/// clients at once both answered.
fn bad_requests_leave_the_vm_unharmed(img: &Images) -> Result<(), String> {
    let ns = Netns::new("apib")?;
    ns.bridge("10.0.0.1/24", 1500)?;
    let mut g = start(
        &ns,
        img,
        ("b", "rvm-init: idle"),
        "net_idle",
        "",
        "tap=rvmapib0,bridge=br0",
    )?;
    let mut half = std::os::unix::net::UnixStream::connect(&g.sock).map_err(|e| e.to_string())?;
    std::io::Write::write_all(
        &mut half,
        b"PATCH /v1/nics/net0 HTTP/1.1\r\nHost: rvm\r\nContent-Le",
    )
    .map_err(|e| e.to_string())?;
    let big = format!(r#"{{"link": "{}"}}"#, "u".repeat(100 << 10));
    for (method, path, body, want) in [
        ("GET", "/v1/nothing", None, 404),
        ("GET", "/v1/nics/net7", None, 404),
        ("PATCH", "/v1/nics/net0", Some("{\"link\": "), 400),
        ("PATCH", "/v1/nics/net0", Some(r#"{"link": 1}"#), 400),
        (
            "PATCH",
            "/v1/nics/net0",
            Some(r#"{"tx_rate": "fast"}"#),
            400,
        ),
        ("PATCH", "/v1/nics/net0", Some(big.as_str()), 413),
        ("DELETE", "/v1/vm", None, 405),
    ] {
        let (status, v) = curl(&g.sock, method, path, body)?;
        if status != want || v["error"].as_str().is_none() {
            return Err(format!(
                "{method} {path}: {status} {v}, expected {want} with an error"
            ));
        }
    }
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| curl(&g.sock, "GET", "/v1/vm", None));
        let b = s.spawn(|| curl(&g.sock, "GET", "/v1/nics/net0", None));
        (a.join(), b.join())
    });
    match (a, b) {
        (Ok(Ok((200, _))), Ok(Ok((200, _)))) => {}
        other => return Err(format!("two clients at once: {other:?}")),
    }
    let answered = pings(&ns, 3);
    let nic = g.api("GET", "/v1/nics/net0", None, 200)?;
    drop(half);
    g.shutdown()?;
    if answered < 2 || nic["link"] != "up" || nic["limits"]["tx"]["bandwidth"] != Value::Null {
        return Err(format!("after the bad requests: {answered} pings, {nic}"));
    }
    println!("    404, 400 (malformed, wrong type, bad value), 413, 405 answered; a half request held nobody; two clients at once; the guest pinged on");
    ns.no_taps_left()
}

fn cases() -> Vec<Case<Images>> {
    vec![
        case(
            "counters_capture_and_shutdown_userspace",
            counters_capture_and_shutdown(false),
        ),
        case(
            "counters_capture_and_shutdown_vhost_net",
            counters_capture_and_shutdown(true),
        ),
        case("link_down_and_up", link_down_and_up),
        case("rate_limit_set_and_measured", rate_limit_set_and_measured),
        case(
            "bad_requests_leave_the_vm_unharmed",
            bad_requests_leave_the_vm_unharmed,
        ),
    ]
}

fn main() {
    run_suite(
        "control API tests",
        cases(),
        &["--mem", "4096", "--idle-timeout", "180"],
        images,
    );
}
