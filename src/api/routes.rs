//! The API's routes: a request (method, path, body) becomes a typed
//! [`Call`] here, checked whole before anything is done, and a call's
//! result becomes a status and a JSON body. No I/O: the server does the
//! HTTP, the executor does the call.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::target::ApiTarget;
use crate::net::egress::EgressPolicy;
use crate::net::rate_limit::{self, Bucket, DirectionLimits, RateLimits};
use crate::vmm::{DataPath, NicInfo};

/// Every route: method and path, `{id}` for a NIC id (`net0`, ...). The
/// OpenAPI description (api/openapi.json) must say exactly these.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/vm"),
    ("PUT", "/v1/vm/shutdown"),
    ("PUT", "/v1/vm/stop"),
    ("GET", "/v1/nics"),
    ("GET", "/v1/nics/{id}"),
    ("PATCH", "/v1/nics/{id}"),
];

/// The grace a shutdown gets when the request does not say.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(10);
/// The longest grace a request may ask for.
const MAX_GRACE_S: f64 = 3600.0;

/// A request the API understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// How many NICs there are (the server's, to check ids).
    CountNics,
    GetVm,
    Shutdown(Duration),
    Stop,
    ListNics,
    GetNic(usize),
    PatchNic(usize, NicPatch),
}

/// What a PATCH changes; None: left as it is.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NicPatch {
    pub link: Option<bool>,
    /// Per direction (tx, rx): the bandwidth bucket (`Some(None)`: lifted)
    /// and the frames bucket.
    pub bandwidth: [Option<Option<Bucket>>; 2],
    pub ops: [Option<Option<Bucket>>; 2],
    /// `Some(None)`: stop the capture.
    pub dump: Option<Option<(PathBuf, u32)>>,
    /// `Some(None)`: lift the policy.
    pub egress: Option<Option<EgressPolicy>>,
}

/// A refusal: the status and what to say.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn body(&self) -> Value {
        json!({ "error": self.message })
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(400, message)
}

/// The NIC index of `id` (`net0` is the first `--net`).
fn nic_index(id: &str) -> Result<usize, ApiError> {
    id.strip_prefix("net")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| id == format!("net{n}"))
        .ok_or_else(|| ApiError::new(404, format!("no NIC {id:?} (NICs are net0, net1, ...)")))
}

/// Parses a request. `nics` is how many NICs there are (an id beyond is
/// unknown).
pub fn parse(method: &str, path: &str, body: &[u8], nics: usize) -> Result<Call, ApiError> {
    let path = path.trim_end_matches('/');
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    let allowed = |methods: &[&str]| {
        ApiError::new(
            405,
            format!(
                "{method} is not allowed on {path} (allowed: {})",
                methods.join(", ")
            ),
        )
    };
    let nic = |id: &str| -> Result<usize, ApiError> {
        let i = nic_index(id)?;
        if i >= nics {
            return Err(ApiError::new(
                404,
                format!("no NIC {id} (this VM has {nics})"),
            ));
        }
        Ok(i)
    };
    match segs.as_slice() {
        ["v1", "vm"] => match method {
            "GET" => Ok(Call::GetVm),
            _ => Err(allowed(&["GET"])),
        },
        ["v1", "vm", "shutdown"] => match method {
            "PUT" => Ok(Call::Shutdown(grace(body)?)),
            _ => Err(allowed(&["PUT"])),
        },
        ["v1", "vm", "stop"] => match method {
            "PUT" => {
                object(body, &[])?;
                Ok(Call::Stop)
            }
            _ => Err(allowed(&["PUT"])),
        },
        ["v1", "nics"] => match method {
            "GET" => Ok(Call::ListNics),
            _ => Err(allowed(&["GET"])),
        },
        ["v1", "nics", id] => match method {
            "GET" => Ok(Call::GetNic(nic(id)?)),
            "PATCH" => {
                let i = nic(id)?;
                Ok(Call::PatchNic(i, patch(body)?))
            }
            _ => Err(allowed(&["GET", "PATCH"])),
        },
        _ => Err(ApiError::new(404, format!("no such resource: {path}"))),
    }
}

/// The body as a JSON object with only `keys` (an empty body is `{}`).
fn object(body: &[u8], keys: &[&str]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| bad(format!("malformed JSON: {e}")))?;
    let Value::Object(m) = v else {
        return Err(bad("the body must be a JSON object"));
    };
    if let Some(k) = m.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown field {k:?} (fields: {})",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        )));
    }
    Ok(m)
}

fn grace(body: &[u8]) -> Result<Duration, ApiError> {
    let m = object(body, &["grace_s"])?;
    match m.get("grace_s") {
        None | Some(Value::Null) => Ok(DEFAULT_GRACE),
        Some(v) => v
            .as_f64()
            .filter(|s| (0.0..=MAX_GRACE_S).contains(s))
            .map(Duration::from_secs_f64)
            .ok_or_else(|| bad(format!("grace_s: expected seconds from 0 to {MAX_GRACE_S}"))),
    }
}

const PATCH_KEYS: &[&str] = &[
    "link", "tx_rate", "tx_burst", "tx_pps", "rx_rate", "rx_burst", "rx_pps", "dump", "dump_len",
    "egress",
];

/// A string or a number, as the command line would spell it.
fn spelled(key: &str, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(bad(format!("{key}: expected a string or a number"))),
    }
}

fn patch(body: &[u8]) -> Result<NicPatch, ApiError> {
    let m = object(body, PATCH_KEYS)?;
    let mut p = NicPatch::default();
    if let Some(v) = m.get("link") {
        p.link = Some(match v.as_str() {
            Some("up") => true,
            Some("down") => false,
            _ => return Err(bad("link: expected \"up\" or \"down\"")),
        });
    }
    for (d, dir) in ["tx", "rx"].iter().enumerate() {
        let (rate, burst, pps) = (
            format!("{dir}_rate"),
            format!("{dir}_burst"),
            format!("{dir}_pps"),
        );
        let limit_err = |key: &str| {
            let key = key.to_string();
            move |e: rate_limit::LimitError| bad(format!("{key}: {e}"))
        };
        match (m.get(&rate), m.get(&burst)) {
            (None, Some(_)) => {
                return Err(bad(format!(
                    "{burst} needs {rate} (give both to change either)"
                )))
            }
            (Some(Value::Null), Some(b)) if !b.is_null() => {
                return Err(bad(format!("{burst} with {rate} null: nothing to burst")))
            }
            (Some(Value::Null), _) => p.bandwidth[d] = Some(None),
            (Some(r), b) => {
                let bits = rate_limit::parse_rate(&spelled(&rate, r)?).map_err(limit_err(&rate))?;
                let size = match b {
                    None | Some(Value::Null) => None,
                    Some(b) => Some(
                        rate_limit::parse_size(&spelled(&burst, b)?).map_err(limit_err(&burst))?,
                    ),
                };
                p.bandwidth[d] = Some(Some(
                    Bucket::bandwidth(bits, size).map_err(limit_err(&rate))?,
                ));
            }
            (None, None) => {}
        }
        match m.get(&pps) {
            None => {}
            Some(Value::Null) => p.ops[d] = Some(None),
            Some(v) => {
                let n = rate_limit::parse_pps(&spelled(&pps, v)?).map_err(limit_err(&pps))?;
                p.ops[d] = Some(Some(Bucket::operations(n).map_err(limit_err(&pps))?));
            }
        }
    }
    match (m.get("dump"), m.get("dump_len")) {
        (None, Some(_)) => return Err(bad("dump_len needs dump")),
        (Some(Value::Null), Some(l)) if !l.is_null() => {
            return Err(bad("dump_len with dump null: no capture to size"))
        }
        (Some(Value::Null), _) => p.dump = Some(None),
        (Some(Value::String(path)), len) => {
            let len = match len {
                None | Some(Value::Null) => crate::net::capture::DEFAULT_SNAP_LEN,
                Some(l) => l
                    .as_u64()
                    .filter(|n| (14..=u64::from(u32::MAX)).contains(n))
                    .ok_or_else(|| bad("dump_len: expected a number of bytes, at least 14"))?
                    as u32,
            };
            if path.is_empty() {
                return Err(bad("dump: expected a file path (null stops the capture)"));
            }
            p.dump = Some(Some((PathBuf::from(path), len)));
        }
        (Some(_), _) => return Err(bad("dump: expected a file path, or null to stop")),
        (None, None) => {}
    }
    match m.get("egress") {
        None => {}
        Some(Value::Null) => p.egress = Some(None),
        // The config file's form (crate::config_file), errors and all.
        Some(v) => {
            let policy = serde_json::from_value::<EgressPolicy>(v.clone())
                .map_err(|e| bad(format!("egress: {e}")))?;
            p.egress = Some(Some(policy));
        }
    }
    Ok(p)
}

/// A library error as the API says it: an unknown NIC is 404, a state
/// that refuses the change (vhost-net moving the frames, the VM ended) is
/// 409, a bad value the library caught is 400, the rest is the host's
/// failure (500).
fn refusal(e: crate::Error) -> ApiError {
    use crate::net::egress::NftError;
    let status = match &e {
        crate::Error::NoSuchNic(_) => 404,
        crate::Error::Stage { .. } => 409,
        crate::Error::Egress {
            source: NftError::Closed | NftError::Stage(_),
            ..
        } => 409,
        crate::Error::Capture { .. } => 400,
        _ => 500,
    };
    ApiError::new(status, e.to_string())
}

/// Does `call` on `target`: the status and the body.
pub fn execute(target: &dyn ApiTarget, call: Call) -> (u16, Value) {
    match run(target, call) {
        Ok(r) => r,
        Err(e) => (e.status, e.body()),
    }
}

fn run(target: &dyn ApiTarget, call: Call) -> Result<(u16, Value), ApiError> {
    match call {
        Call::CountNics => Ok((200, json!(target.nic_count()))),
        Call::GetVm => {
            let vm = target.vm();
            let nics: Vec<String> = (0..target.nic_count()).map(|i| format!("net{i}")).collect();
            Ok((
                200,
                json!({
                    "state": vm.state,
                    "vcpus": vm.vcpus,
                    "mem_mib": vm.mem_mib,
                    "kernel": vm.kernel,
                    "uptime_s": (vm.uptime_s * 1000.0).round() / 1000.0,
                    "nics": nics,
                }),
            ))
        }
        Call::Shutdown(grace) => {
            if !target.shutdown(grace) {
                return Err(ApiError::new(409, "the VM is already ending"));
            }
            Ok((
                202,
                json!({ "state": "shutting_down", "grace_s": grace.as_secs_f64() }),
            ))
        }
        Call::Stop => {
            if !target.stop() {
                return Err(ApiError::new(409, "the VM is already ending"));
            }
            Ok((202, json!({ "state": "stopped" })))
        }
        Call::ListNics => {
            let nics: Vec<Value> = target
                .nics()
                .iter()
                .enumerate()
                .map(|(i, n)| nic_json(target, i, n))
                .collect();
            Ok((200, Value::Array(nics)))
        }
        Call::GetNic(i) => nic(target, i).map(|v| (200, v)),
        Call::PatchNic(i, p) => {
            if let Some(up) = p.link {
                target.set_link(i, up).map_err(refusal)?;
            }
            if p.bandwidth.iter().chain(&p.ops).any(Option::is_some) {
                let info = target.nics();
                let cur = info
                    .get(i)
                    .ok_or_else(|| ApiError::new(404, format!("no NIC net{i}")))?
                    .limits;
                let dir = |d: usize, cur: DirectionLimits| DirectionLimits {
                    bandwidth: p.bandwidth[d].unwrap_or(cur.bandwidth),
                    ops: p.ops[d].unwrap_or(cur.ops),
                };
                let limits = RateLimits {
                    tx: dir(0, cur.tx),
                    rx: dir(1, cur.rx),
                };
                target.set_limits(i, limits).map_err(refusal)?;
            }
            match p.dump {
                Some(Some((path, len))) => target.start_capture(i, &path, len).map_err(refusal)?,
                Some(None) => target.stop_capture(i).map_err(refusal)?,
                None => {}
            }
            if let Some(policy) = p.egress {
                target.set_egress(i, policy).map_err(refusal)?;
            }
            nic(target, i).map(|v| (200, v))
        }
    }
}

fn nic(target: &dyn ApiTarget, i: usize) -> Result<Value, ApiError> {
    let nics = target.nics();
    let n = nics
        .get(i)
        .ok_or_else(|| ApiError::new(404, format!("no NIC net{i}")))?;
    Ok(nic_json(target, i, n))
}

fn bucket_json(b: &Option<Bucket>, unit: &str) -> Value {
    match b {
        None => Value::Null,
        Some(b) => {
            let per_s = b.size as f64 / b.refill.as_secs_f64().max(1e-9);
            let mut m = Map::new();
            m.insert("size".into(), json!(b.size));
            m.insert("refill_ms".into(), json!(b.refill.as_secs_f64() * 1000.0));
            m.insert("one_time_burst".into(), json!(b.one_time_burst));
            m.insert(unit.into(), json!(per_s.round()));
            Value::Object(m)
        }
    }
}

fn direction_json(d: &DirectionLimits) -> Value {
    json!({
        "bandwidth": bucket_json(&d.bandwidth, "bytes_per_s"),
        "ops": bucket_json(&d.ops, "frames_per_s"),
    })
}

fn nic_json(target: &dyn ApiTarget, i: usize, n: &NicInfo) -> Value {
    let c = target.kernel_counters(n).unwrap_or(n.counters);
    let egress = n.egress.as_ref().map(|e| {
        let policy = serde_json::to_value(&e.policy).unwrap_or_default();
        json!({
            "default": policy["default"],
            "rules": policy["rules"],
            "enforced_by": e.enforced_by,
            "counts": e.counts.iter().map(|c| json!({
                "rule": c.rule, "action": c.action.to_string(), "packets": c.packets,
            })).collect::<Vec<_>>(),
        })
    });
    json!({
        "id": format!("net{i}"),
        "tap": n.name,
        "model": match n.model {
            crate::net::NicModel::Virtio => "virtio",
            crate::net::NicModel::E1000 => "e1000",
        },
        "mac": n.mac.to_string(),
        "link": if n.link_up { "up" } else { "down" },
        "data_path": n.data_path.to_string(),
        "queues": n.queues.len(),
        "counters": {
            "rx_frames": c.rx_frames, "rx_bytes": c.rx_bytes, "rx_dropped": c.rx_dropped,
            "tx_frames": c.tx_frames, "tx_bytes": c.tx_bytes, "tx_dropped": c.tx_dropped,
            "tx_waits": c.tx_waits, "malformed": c.malformed,
            "source": if n.data_path == DataPath::VhostNet && target.kernel_counters(n).is_some() {
                "kernel"
            } else {
                "rvm"
            },
        },
        "limits": {
            "tx": direction_json(&n.limits.tx),
            "rx": direction_json(&n.limits.rx),
            "throttled": { "tx": n.throttled.tx, "rx": n.throttled.rx },
        },
        "capture": {
            "path": n.capture.path.as_ref().map(|p| p.display().to_string()),
            "captured": n.capture.captured,
            "lost": n.capture.lost,
            "error": n.capture.error,
        },
        "egress": egress,
    })
}
