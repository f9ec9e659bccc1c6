//! The API server against a fake VM, over its real socket, with the HTTP
//! thread under its seccomp filter (a system call missing from the filter
//! fails these tests). Raw HTTP from the test, as a hostile client would
//! write it.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::target::{ApiTarget, VmState};
use super::{ApiServer, ApiSocket, HEAD_TIMEOUT, MAX_BODY, MAX_CONNECTIONS};
use crate::net::egress::EgressPolicy;
use crate::net::rate_limit::RateLimits;
use crate::net::{MacAddr, NetCounters, NicModel};
use crate::vmm::seccomp::{SeccompMode, ThreadFilter};
use crate::vmm::{DataPath, NicInfo};

/// A VM of two NICs that records what it is asked.
#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<String>>,
    limits: Mutex<RateLimits>,
    ended: Mutex<bool>,
}

impl Fake {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn record(&self, c: String) {
        self.calls.lock().unwrap().push(c);
    }
}

impl ApiTarget for Fake {
    fn vm(&self) -> VmState {
        VmState {
            state: if *self.ended.lock().unwrap() {
                "shutting_down"
            } else {
                "running"
            },
            vcpus: 2,
            mem_mib: 256,
            kernel: "/boot/bzImage".into(),
            uptime_s: 1.5,
        }
    }
    fn nic_count(&self) -> usize {
        2
    }
    fn nics(&self) -> Vec<NicInfo> {
        (0..2)
            .map(|i| NicInfo {
                name: format!("tap{i}"),
                model: NicModel::Virtio,
                mac: MacAddr([0x52, 0x54, 0, 0, 0, i as u8 + 1]),
                data_path: DataPath::Userspace,
                counters: NetCounters {
                    rx_frames: 7,
                    ..NetCounters::default()
                },
                queues: vec![NetCounters::default()],
                link_up: true,
                limits: *self.limits.lock().unwrap(),
                throttled: Default::default(),
                capture: Default::default(),
                egress: None,
            })
            .collect()
    }
    fn kernel_counters(&self, _: &NicInfo) -> Option<NetCounters> {
        None
    }
    fn set_link(&self, i: usize, up: bool) -> crate::Result<()> {
        self.record(format!("link {i} {up}"));
        Ok(())
    }
    fn set_limits(&self, i: usize, l: RateLimits) -> crate::Result<()> {
        self.record(format!("limits {i}"));
        *self.limits.lock().unwrap() = l;
        Ok(())
    }
    fn start_capture(&self, i: usize, p: &Path, len: u32) -> crate::Result<()> {
        self.record(format!("capture {i} {} {len}", p.display()));
        Ok(())
    }
    fn stop_capture(&self, i: usize) -> crate::Result<()> {
        self.record(format!("capture {i} stop"));
        Ok(())
    }
    fn set_egress(&self, i: usize, p: Option<EgressPolicy>) -> crate::Result<()> {
        let what = p.map_or("none".into(), |p| {
            let rules: Vec<String> = p
                .rules
                .iter()
                .map(crate::net::egress::EgressRule::spec)
                .collect();
            format!("{} {}", p.default, rules.join(" "))
        });
        self.record(format!("egress {i} {what}"));
        Ok(())
    }
    fn shutdown(&self, grace: Duration) -> bool {
        let mut e = self.ended.lock().unwrap();
        if *e {
            return false;
        }
        *e = true;
        self.record(format!("shutdown {}", grace.as_secs()));
        true
    }
    fn stop(&self) -> bool {
        self.record("stop".into());
        true
    }
}

struct Rig {
    fake: Arc<Fake>,
    server: Option<ApiServer>,
    dir: PathBuf,
}

impl Rig {
    fn new(tag: &str) -> Rig {
        let dir = std::env::temp_dir().join(format!("rvm-api-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fake = Arc::new(Fake::default());
        let socket = ApiSocket::bind(&dir.join("api.sock")).unwrap();
        let filter = ThreadFilter::api(SeccompMode::Enforce).unwrap();
        let server = ApiServer::start(socket, fake.clone(), filter).unwrap();
        Rig {
            fake,
            server: Some(server),
            dir,
        }
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// Sends `raw` and reads the whole answer (the connection closes).
    fn raw(&self, raw: &[u8]) -> (u16, Value) {
        let mut s = UnixStream::connect(self.sock()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        parse_response(&out)
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, Value) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: rvm\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.raw(req.as_bytes())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.server.take();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn parse_response(out: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(out);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn the_vm_and_its_nics_are_described() {
    let r = Rig::new("get");
    let (status, vm) = r.request("GET", "/v1/vm", "");
    assert_eq!(status, 200, "{vm}");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["vcpus"], 2);
    assert_eq!(vm["mem_mib"], 256);
    assert_eq!(vm["nics"], serde_json::json!(["net0", "net1"]));
    let (status, nic) = r.request("GET", "/v1/nics/net1", "");
    assert_eq!(status, 200, "{nic}");
    assert_eq!(nic["tap"], "tap1");
    assert_eq!(nic["mac"], "52:54:00:00:00:02");
    assert_eq!(nic["link"], "up");
    assert_eq!(nic["data_path"], "userspace");
    assert_eq!(nic["counters"]["rx_frames"], 7);
    assert_eq!(nic["limits"]["tx"]["bandwidth"], Value::Null);
    let (status, list) = r.request("GET", "/v1/nics", "");
    assert_eq!((status, list.as_array().map(Vec::len)), (200, Some(2)));
    // It all went through the HTTP thread under its filter.
    // (Other tests' servers run in this process too, each must be; one
    // just started confines itself within moments.)
    let t = Instant::now();
    let mut modes = seccomp_of("rvm-api");
    while !(modes.iter().all(|m| m == "2") || t.elapsed() > Duration::from_secs(2)) {
        std::thread::sleep(Duration::from_millis(20));
        modes = seccomp_of("rvm-api");
    }
    assert!(
        !modes.is_empty() && modes.iter().all(|m| m == "2"),
        "the HTTP threads' seccomp modes: {modes:?}"
    );
}

/// The seccomp mode (/proc status) of this process's threads named `name`.
fn seccomp_of(name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(m) = status.lines().find_map(|l| l.strip_prefix("Seccomp:")) {
            out.push(m.trim().to_string());
        }
    }
    out
}

#[test]
fn a_patch_is_checked_whole_then_applied() {
    let r = Rig::new("patch");
    let body = r#"{"link": "down", "tx_rate": "16Mbit", "tx_burst": "64K", "rx_pps": 1000,
                   "dump": "/tmp/x.pcap", "dump_len": 128,
                   "egress": {"default": "deny", "rules": ["allow=10.0.0.1:5001/tcp"]}}"#;
    let (status, nic) = r.request("PATCH", "/v1/nics/net0", body);
    assert_eq!(status, 200, "{nic}");
    assert_eq!(
        r.fake.calls(),
        [
            "link 0 false",
            "limits 0",
            "capture 0 /tmp/x.pcap 128",
            "egress 0 deny allow=10.0.0.1/32:5001/tcp"
        ]
    );
    // The new limits are in the answer.
    assert_eq!(nic["limits"]["tx"]["bandwidth"]["size"], 65536);
    assert_eq!(nic["limits"]["tx"]["bandwidth"]["bytes_per_s"], 2_000_000.0);
    assert_eq!(nic["limits"]["rx"]["ops"]["frames_per_s"], 1000.0);
    // Lifting one limit keeps the other.
    let (status, nic) = r.request("PATCH", "/v1/nics/net0", r#"{"tx_rate": null}"#);
    assert_eq!(status, 200);
    assert_eq!(nic["limits"]["tx"]["bandwidth"], Value::Null);
    assert_eq!(nic["limits"]["rx"]["ops"]["frames_per_s"], 1000.0);
    let (status, _) = r.request(
        "PATCH",
        "/v1/nics/net0",
        r#"{"dump": null, "egress": null}"#,
    );
    assert_eq!(status, 200);
    let calls = r.fake.calls();
    assert_eq!(
        &calls[calls.len() - 2..],
        ["capture 0 stop", "egress 0 none"]
    );
}

#[test]
fn bad_requests_get_their_codes_and_change_nothing() {
    let r = Rig::new("bad");
    for (method, path, body, status, says) in [
        ("GET", "/v2/vm", "", 404, "no such resource"),
        ("GET", "/v1/nics/net2", "", 404, "no NIC net2"),
        ("GET", "/v1/nics/eth0", "", 404, "no NIC \"eth0\""),
        ("DELETE", "/v1/vm", "", 405, "not allowed"),
        (
            "PATCH",
            "/v1/nics/net0",
            "{\"link\": ",
            400,
            "malformed JSON",
        ),
        (
            "PATCH",
            "/v1/nics/net0",
            "[1]",
            400,
            "must be a JSON object",
        ),
        (
            "PATCH",
            "/v1/nics/net0",
            r#"{"link": true}"#,
            400,
            "link: expected",
        ),
        (
            "PATCH",
            "/v1/nics/net0",
            r#"{"colour": 1}"#,
            400,
            "unknown field \"colour\"",
        ),
        (
            "PATCH",
            "/v1/nics/net0",
            r#"{"tx_rate": "fast"}"#,
            400,
            "tx_rate: fast",
        ),
        (
            "PATCH",
            "/v1/nics/net0",
            r#"{"tx_burst": "1M"}"#,
            400,
            "tx_burst needs tx_rate",
        ),
        (
            "PATCH",
            "/v1/nics/net0",
            r#"{"dump": 5}"#,
            400,
            "dump: expected a file path",
        ),
        (
            "PATCH",
            "/v1/nics/net0",
            r#"{"egress": {"default": "deny", "rules": ["allow=10.0.0.0/33"]}}"#,
            400,
            "egress: rules[0]: allow=10.0.0.0/33: prefix length 33",
        ),
        (
            "PUT",
            "/v1/vm/shutdown",
            r#"{"grace_s": "soon"}"#,
            400,
            "grace_s",
        ),
    ] {
        let (got, body) = r.request(method, path, body);
        assert_eq!(got, status, "{method} {path}: {body}");
        let msg = body["error"].as_str().unwrap_or_default();
        assert!(msg.contains(says), "{method} {path}: {msg}");
    }
    assert!(r.fake.calls().is_empty(), "{:?}", r.fake.calls());
    // A body beyond the limit.
    let big = format!("{{\"link\": \"{}\"}}", "u".repeat(MAX_BODY + 10));
    let (got, _) = r.request("PATCH", "/v1/nics/net0", &big);
    assert_eq!(got, 413);
    // Not HTTP at all: no answer that matters, and the server goes on.
    let _ = r.raw(b"\x00\x01garbage\r\n\r\n");
    assert_eq!(r.request("GET", "/v1/vm", "").0, 200);
}

#[test]
fn shutdown_then_a_second_one_conflicts() {
    let r = Rig::new("shutdown");
    let (status, body) = r.request("PUT", "/v1/vm/shutdown", r#"{"grace_s": 3}"#);
    assert_eq!(
        (status, &body["state"]),
        (202, &Value::from("shutting_down"))
    );
    assert_eq!(r.request("PUT", "/v1/vm/shutdown", "").0, 409);
    assert_eq!(r.request("GET", "/v1/vm", "").1["state"], "shutting_down");
    assert_eq!(r.fake.calls(), ["shutdown 3"]);
}

/// A client that sends half a request and waits holds neither the others
/// nor the VM, and is cut off after HEAD_TIMEOUT; clients beyond
/// MAX_CONNECTIONS are closed at once; two clients at once both get their
/// answers.
#[test]
fn slow_and_surplus_clients_cannot_stall_the_others() {
    let r = Rig::new("slow");
    let mut half = UnixStream::connect(r.sock()).unwrap();
    half.write_all(b"GET /v1/vm HTTP/1.1\r\nHost: r").unwrap();
    let t = Instant::now();
    assert_eq!(r.request("GET", "/v1/vm", "").0, 200);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "served after {:?}",
        t.elapsed()
    );
    // Two at once.
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| r.request("GET", "/v1/nics/net0", "").0);
        let b = s.spawn(|| r.request("GET", "/v1/nics/net1", "").0);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!((a, b), (200, 200));
    // The half request is cut off.
    half.set_read_timeout(Some(HEAD_TIMEOUT * 3)).unwrap();
    let mut out = Vec::new();
    let _ = half.read_to_end(&mut out);
    let waited = t.elapsed();
    assert!(
        waited >= HEAD_TIMEOUT && waited < HEAD_TIMEOUT * 3,
        "cut off after {waited:?}"
    );
    // Fill every slot with silent clients: one more is closed at once.
    let silent: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(r.sock()).unwrap())
        .collect();
    // (Time for the server to take them all, on a loaded machine too.)
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = UnixStream::connect(r.sock()).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let _ = extra.write_all(b"GET /v1/vm HTTP/1.1\r\nHost: rvm\r\n\r\n");
    let mut out = Vec::new();
    let n = extra.read_to_end(&mut out);
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "a surplus client was served: {out:?}"
    );
    drop(silent);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(r.request("GET", "/v1/vm", "").0, 200);
}

#[test]
fn the_socket_is_private_replaces_a_stale_one_and_refuses_a_live_one() {
    let r = Rig::new("sock");
    let mode = std::fs::metadata(r.sock()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Live: refused, and the live one is untouched.
    let e = ApiSocket::bind(&r.sock()).err().unwrap().to_string();
    assert!(e.contains("something answers there already"), "{e}");
    assert_eq!(r.request("GET", "/v1/vm", "").0, 200);
    // Stale: a socket file nothing answers on is replaced.
    let stale = r.dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let s = ApiSocket::bind(&stale).unwrap();
    drop(s);
    assert!(!stale.exists(), "dropping the socket removes its file");
    // Not a socket: left alone.
    let file = r.dir.join("file");
    std::fs::write(&file, b"mine").unwrap();
    let e = ApiSocket::bind(&file).err().unwrap().to_string();
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");
    // The server's goes when it stops.
    let sock = r.sock();
    drop(r);
    assert!(!sock.exists());
}

/// The OpenAPI description has exactly the routes the server has.
#[test]
fn the_openapi_description_matches_the_routes() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/api/openapi.json"))
        .expect("api/openapi.json");
    let doc: Value = serde_json::from_str(&text).expect("valid JSON");
    let mut described: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            if method != "parameters" {
                described.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    let mut served: Vec<(String, String)> = super::routes::ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    described.sort();
    served.sort();
    assert_eq!(described, served);
    // And each served route answers something other than 404 and 405.
    let r = Rig::new("routes");
    for (method, path) in super::routes::ROUTES {
        if *method == "PUT" {
            continue; // (would end the fake VM; tested above)
        }
        let path = path.replace("{id}", "net0");
        let body = if *method == "PATCH" { "{}" } else { "" };
        let (status, b) = r.request(method, &path, body);
        assert_eq!(status, 200, "{method} {path}: {b}");
    }
}
