//! The NIC options a user writes, QEMU-style:
//! `tap=NAME,bridge=BR,mac=MAC,model=virtio|e1000,vhost=on|off|auto,
//! vnet_hdr=on|off,sndbuf=N,mtu=N,script=PATH|no,downscript=PATH|no,fd=N,
//! fds=A:B:...,queues=N|auto`, and rate limits:
//! `tx_rate=16Mbit,tx_burst=256K,tx_pps=N` (and the same for rx), and a
//! capture: `dump=PATH,dump_len=N`. Without a TAP: `user[,hostfwd=...]`
//! (passt), `stream=PATH` or `dgram=PATH` (a user-mode stack's socket).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::egress::{Action, EgressPolicy, EgressRule};
use super::passt::HostFwd;
use super::rate_limit::{self, Bucket, DirectionLimits, RateLimits};
use super::tap::valid_ifname;

pub const KEYS: &str =
    "tap, bridge, mac, model, vhost, vnet_hdr, sndbuf, mtu, script, downscript, \
     fd, fds, queues, tx_rate, rx_rate, tx_burst, rx_burst, tx_pps, rx_pps, dump, dump_len, \
     hostfwd (with user), stream, dgram, egress, allow, deny";

/// The most queue pairs a virtio-net NIC may have.
pub const MAX_QUEUE_PAIRS: u16 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NicModel {
    #[default]
    Virtio,
    E1000,
}

/// How many RX/TX queue pairs a NIC has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queues {
    /// 1 to [`MAX_QUEUE_PAIRS`].
    Pairs(u16),
    /// One pair per vCPU (at most [`MAX_QUEUE_PAIRS`]): [`validate_all`]
    /// turns it into `Pairs`.
    PerVcpu,
}

impl Default for Queues {
    fn default() -> Self {
        Queues::Pairs(1)
    }
}

impl fmt::Display for Queues {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Queues::Pairs(n) => write!(f, "{n}"),
            Queues::PerVcpu => f.write_str("auto"),
        }
    }
}

impl FromStr for Queues {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(Queues::PerVcpu);
        }
        s.parse::<u16>()
            .ok()
            .filter(|n| (1..=MAX_QUEUE_PAIRS).contains(n))
            .map(Queues::Pairs)
            .ok_or_else(|| format!("use 1 to {MAX_QUEUE_PAIRS} or auto"))
    }
}

impl Queues {
    /// The pairs, once [`validate_all`] has resolved `PerVcpu`.
    pub fn pairs(self) -> u16 {
        match self {
            Queues::Pairs(n) => n,
            Queues::PerVcpu => 1,
        }
    }
}

/// A NIC's wire when it is not a TAP: a user-mode network stack, reached
/// over a UNIX socket.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Peer {
    /// passt, started by rvm for this NIC (`user`), with host ports
    /// forwarded to the guest.
    Passt {
        #[serde(default, with = "crate::config_file::text::list")]
        hostfwd: Vec<HostFwd>,
    },
    /// A stack someone else runs, on a stream socket in QEMU's framing.
    Stream(PathBuf),
    /// The same on a datagram (or seqpacket) socket: a frame per message.
    Dgram(PathBuf),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VhostMode {
    On,
    Off,
    #[default]
    Auto,
}

/// One NIC, as the user described it. As JSON (`--config`), every field
/// is optional and spelled as on the command line (crate::config_file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    /// Not a TAP but a user-mode network (then tap, fd and fds are none).
    pub peer: Option<Peer>,
    /// The TAP's name; None only with `fd`, `fds` or a `peer`.
    pub tap: Option<String>,
    /// An already-open TAP fd (sandbox platforms, unprivileged use).
    pub fd: Option<i32>,
    /// Already-open fds of one multi-queue TAP, one per queue pair
    /// (QEMU's `fds=`); exclusive with `tap` and `fd`.
    pub fds: Vec<i32>,
    /// RX/TX queue pairs (virtio-net only).
    #[serde(with = "crate::config_file::text")]
    pub queues: Queues,
    pub bridge: Option<String>,
    /// None: a default from the TAP name, filled in by [`validate_all`].
    #[serde(with = "crate::config_file::text::option")]
    pub mac: Option<MacAddr>,
    #[serde(with = "crate::config_file::text")]
    pub model: NicModel,
    #[serde(with = "crate::config_file::text")]
    pub vhost: VhostMode,
    pub vnet_hdr: bool,
    pub sndbuf: Option<i32>,
    pub mtu: Option<u16>,
    pub script: Option<PathBuf>,
    pub downscript: Option<PathBuf>,
    /// Rate limits per direction (none by default). They hold frames back
    /// in rvm, so vhost-net cannot carry a limited NIC.
    pub limits: RateLimits,
    /// Capture every frame to this pcap file (`dump=`), cut at the snap
    /// length (`dump_len=`).
    #[serde(with = "crate::config_file::dump")]
    pub dump: Option<(PathBuf, u32)>,
    /// What the guest may reach (`egress=`, `allow=`, `deny=`), enforced
    /// in the host kernel; none: everything.
    pub egress: Option<EgressPolicy>,
}

impl Default for NetConfig {
    /// rvm's defaults and no wire yet (a TAP, fd or peer must be given).
    fn default() -> Self {
        NetConfig {
            tap: None,
            ..NetConfig::tap("")
        }
    }
}

impl NetConfig {
    /// A virtio NIC on TAP `name`, with rvm's defaults.
    pub fn tap(name: &str) -> Self {
        NetConfig {
            peer: None,
            tap: Some(name.into()),
            fd: None,
            fds: Vec::new(),
            queues: Queues::default(),
            bridge: None,
            mac: None,
            model: NicModel::Virtio,
            vhost: VhostMode::Auto,
            vnet_hdr: true,
            sndbuf: None,
            mtu: None,
            script: None,
            downscript: None,
            limits: RateLimits::default(),
            dump: None,
            egress: None,
        }
    }

    /// A virtio NIC on a TAP the caller has already opened (a sandbox
    /// that made it in another namespace, or without giving rvm
    /// CAP_NET_ADMIN). rvm owns the fd from here on and closes it when the
    /// VM ends; its IFF_VNET_HDR flag must match `vnet_hdr` (on by
    /// default). The TAP's bridge, MTU and up state are the caller's.
    pub fn tap_fd(fd: std::os::fd::OwnedFd) -> Self {
        NetConfig {
            tap: None,
            fd: Some(std::os::fd::IntoRawFd::into_raw_fd(fd)),
            ..NetConfig::tap("")
        }
    }

    /// A virtio NIC on a multi-queue TAP the caller has already opened,
    /// one fd per queue pair (the fds' TAP must have IFF_MULTI_QUEUE when
    /// there are several); rvm owns them from here on, as [`Self::tap_fd`].
    pub fn tap_fds(fds: Vec<std::os::fd::OwnedFd>) -> Self {
        let fds: Vec<i32> = fds
            .into_iter()
            .map(std::os::fd::IntoRawFd::into_raw_fd)
            .collect();
        NetConfig {
            tap: None,
            queues: Queues::Pairs(fds.len() as u16),
            fds,
            ..NetConfig::tap("")
        }
    }

    /// A virtio NIC on user-mode networking through passt, which rvm
    /// starts (`--net user`): no TAP, no privilege.
    pub fn user(hostfwd: Vec<HostFwd>) -> Self {
        NetConfig {
            peer: Some(Peer::Passt { hostfwd }),
            tap: None,
            ..NetConfig::tap("")
        }
    }

    /// A virtio NIC on a user-mode stack's socket at `path`.
    pub fn socket(peer: Peer) -> Self {
        NetConfig {
            peer: Some(peer),
            tap: None,
            ..NetConfig::tap("")
        }
    }

    /// What names this NIC in messages and seeds its default MAC.
    pub fn label(&self) -> String {
        match &self.peer {
            Some(Peer::Passt { .. }) => return "user".into(),
            Some(Peer::Stream(p)) => return format!("stream:{}", p.display()),
            Some(Peer::Dgram(p)) => return format!("dgram:{}", p.display()),
            None => {}
        }
        match (&self.tap, self.fd, self.fds.first()) {
            (Some(t), _, _) => t.clone(),
            (None, Some(fd), _) => format!("fd{fd}"),
            (None, None, Some(fd)) => format!("fd{fd}"),
            _ => "nic".into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetConfigError {
    #[error("--net {spec}: unknown key {key:?} (valid keys: {KEYS})")]
    UnknownKey { spec: String, key: String },
    #[error("--net {spec}: {key} is given twice")]
    Repeated { spec: String, key: String },
    #[error("--net {spec}: {part:?} is not key=value")]
    NotKeyValue { spec: String, part: String },
    #[error("--net {spec}: bad {key}={value:?}: {why}")]
    BadValue {
        spec: String,
        key: String,
        value: String,
        why: String,
    },
    #[error("--net {0}: give tap=NAME, fd=N, user, stream=PATH or dgram=PATH")]
    NoTap(String),
    #[error("--net {spec}: {key} is for a TAP, and this NIC has none ({peer})")]
    TapKeyWithPeer {
        spec: String,
        key: String,
        peer: &'static str,
    },
    #[error(
        "--net {0}: a NIC has one wire: give one of tap=, fd=, fds=, user, stream= and dgram="
    )]
    TwoWires(String),
    #[error("--net {0}: hostfwd= forwards through passt: it needs user")]
    HostFwdWithoutUser(String),
    #[error("NIC {0}: vhost=on needs a TAP (vhost-net moves a TAP's frames in the kernel); use vhost=auto or off with a user-mode network")]
    VhostWithoutTap(String),
    #[error("--net {0}: tap=, fd= and fds= are exclusive (an fd already names its TAP)")]
    TapAndFd(String),
    #[error("--net {spec}: queues={queues} needs one TAP fd per queue pair (fds=A:B:...), and {fds} given")]
    FdsAndQueues {
        spec: String,
        queues: u16,
        fds: usize,
    },
    #[error("NIC {0}: the e1000 has one queue; use model=virtio for queues=N")]
    E1000OneQueue(String),
    #[error("TAP {0} is given to two NICs")]
    DuplicateTap(String),
    #[error("fd {0} is given to two NICs")]
    DuplicateFd(i32),
    #[error("MAC {0} is given to two NICs")]
    DuplicateMac(MacAddr),
    #[error("--net {spec}: {key} needs {needs}")]
    BurstWithoutRate {
        spec: String,
        key: &'static str,
        needs: &'static str,
    },
    #[error("NIC {nic}: dump={path}: the folder {folder} does not exist (create it, or give a path in one that does)")]
    DumpFolder {
        nic: String,
        path: String,
        folder: String,
    },
    #[error("NIC {0}: vhost=on and a rate limit cannot both hold: vhost-net moves frames in the kernel, which cannot hold them back for rvm; use vhost=auto (or off) with limits")]
    VhostAndLimits(String),
    #[error("bad MAC {0:?}: {1}")]
    BadMac(String, &'static str),
}

impl FromStr for MacAddr {
    type Err = NetConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| NetConfigError::BadMac(s.into(), why);
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(bad("expected six hex bytes like 52:54:00:12:34:56"));
        }
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad("expected six hex bytes like 52:54:00:12:34:56"));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| bad("not hexadecimal"))?;
        }
        if m[0] & 1 != 0 {
            return Err(bad(
                "a multicast address cannot be a NIC's (first byte must be even)",
            ));
        }
        if m == [0; 6] {
            return Err(bad("all zeros is not a valid address"));
        }
        Ok(MacAddr(m))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl MacAddr {
    /// The default MAC: QEMU's locally administered 52:54:00 prefix and
    /// three bytes of an FNV-1a hash of `seed` (the TAP name), so a TAP
    /// keeps its MAC across runs; `bump` picks another when two collide.
    pub fn for_nic(seed: &str, bump: u32) -> MacAddr {
        let mut h: u32 = 0x811c_9dc5;
        for b in seed
            .bytes()
            .chain(bump.to_le_bytes().into_iter().filter(|_| bump > 0))
        {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        let x = h.to_be_bytes();
        MacAddr([0x52, 0x54, 0x00, x[1], x[2], x[3]])
    }
}

fn on_off(spec: &str, key: &str, v: &str) -> Result<bool, NetConfigError> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(bad(spec, key, v, "use on or off")),
    }
}

fn bad(spec: &str, key: &str, value: &str, why: &str) -> NetConfigError {
    NetConfigError::BadValue {
        spec: spec.into(),
        key: key.into(),
        value: value.into(),
        why: why.into(),
    }
}

fn ifname(spec: &str, key: &str, v: &str) -> Result<String, NetConfigError> {
    if valid_ifname(v) {
        Ok(v.into())
    } else {
        Err(bad(
            spec,
            key,
            v,
            "not an interface name (1 to 15 bytes, no '/', ':' or spaces)",
        ))
    }
}

/// `script=no` means none, as in QEMU.
fn script(v: &str) -> Option<PathBuf> {
    (v != "no").then(|| PathBuf::from(v))
}

impl FromStr for NicModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "virtio" | "virtio-net" | "virtio-net-pci" => Ok(NicModel::Virtio),
            "e1000" => Ok(NicModel::E1000),
            _ => Err("use virtio or e1000".into()),
        }
    }
}

impl fmt::Display for NicModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NicModel::Virtio => "virtio",
            NicModel::E1000 => "e1000",
        })
    }
}

impl fmt::Display for VhostMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VhostMode::On => "on",
            VhostMode::Off => "off",
            VhostMode::Auto => "auto",
        })
    }
}

impl FromStr for VhostMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(VhostMode::On),
            "off" => Ok(VhostMode::Off),
            "auto" => Ok(VhostMode::Auto),
            _ => Err("use on, off or auto".into()),
        }
    }
}

impl FromStr for NetConfig {
    type Err = NetConfigError;
    fn from_str(spec: &str) -> Result<Self, NetConfigError> {
        let mut c = NetConfig::tap("");
        c.tap = None;
        let mut seen: Vec<&str> = Vec::new();
        // Rate, burst and pps per direction (tx, rx): a bucket needs its
        // rate and its burst together, so they are built after the loop.
        let mut rates: [(Option<u64>, Option<u64>, Option<u64>); 2] = Default::default();
        let (mut dump, mut dump_len) = (None, None);
        // QEMU's backend word may lead: `user,...` (passt) or `tap,...`.
        let (user, rest) = match spec.split_once(',').unwrap_or((spec, "")) {
            ("user", rest) => (true, rest),
            ("tap", rest) => (false, rest),
            _ => (false, spec),
        };
        let mut hostfwd = Vec::new();
        // allow= and deny=, in the order given: the first match wins.
        let mut egress_rules = Vec::new();
        let mut wires = usize::from(user);
        for part in rest
            .split(',')
            .filter(|p| !(p.is_empty() && rest.is_empty()))
        {
            let Some((key, v)) = part.split_once('=') else {
                return Err(NetConfigError::NotKeyValue {
                    spec: spec.into(),
                    part: part.into(),
                });
            };
            if key == "hostfwd" {
                // Keys given as often as there are ports or rules.
                let f = v.parse().map_err(|e: String| bad(spec, key, v, &e))?;
                hostfwd.push(f);
                continue;
            }
            if key == "allow" || key == "deny" {
                let action = if key == "allow" {
                    Action::Allow
                } else {
                    Action::Deny
                };
                let r = EgressRule::parse(action, v).map_err(|e| bad(spec, key, v, &e.why))?;
                egress_rules.push(r);
                continue;
            }
            if seen.contains(&key) {
                return Err(NetConfigError::Repeated {
                    spec: spec.into(),
                    key: key.into(),
                });
            }
            seen.push(key);
            if v.is_empty() {
                return Err(bad(spec, key, v, "empty"));
            }
            let num = |max: i64| {
                v.parse::<i64>()
                    .ok()
                    .filter(|n| (0..=max).contains(n))
                    .ok_or_else(|| bad(spec, key, v, &format!("expected a number from 0 to {max}")))
            };
            match key {
                "tap" | "ifname" => c.tap = Some(ifname(spec, key, v)?),
                "stream" | "dgram" => {
                    wires += 1;
                    let path = PathBuf::from(v);
                    c.peer = Some(if key == "stream" {
                        Peer::Stream(path)
                    } else {
                        Peer::Dgram(path)
                    });
                }
                "bridge" | "br" => c.bridge = Some(ifname(spec, key, v)?),
                "mac" => c.mac = Some(v.parse()?),
                "model" => c.model = v.parse().map_err(|e: String| bad(spec, key, v, &e))?,
                "vhost" => c.vhost = v.parse().map_err(|e: String| bad(spec, key, v, &e))?,
                "vnet_hdr" => c.vnet_hdr = on_off(spec, key, v)?,
                "sndbuf" => {
                    let n = num(i64::from(i32::MAX))?;
                    if n == 0 {
                        return Err(bad(spec, key, v, "must be more than 0"));
                    }
                    c.sndbuf = Some(n as i32);
                }
                "mtu" => {
                    let n = num(65535)?;
                    if n < 68 {
                        return Err(bad(spec, key, v, "an MTU is at least 68"));
                    }
                    c.mtu = Some(n as u16);
                }
                "script" => c.script = script(v),
                "downscript" => c.downscript = script(v),
                "fd" => c.fd = Some(num(i64::from(i32::MAX))? as i32),
                "fds" => {
                    c.fds = v
                        .split(':')
                        .map(|fd| {
                            fd.parse::<i32>().ok().filter(|n| *n >= 0).ok_or_else(|| {
                                bad(spec, key, v, "expected fd numbers joined by ':', like 3:4")
                            })
                        })
                        .collect::<Result<_, _>>()?;
                    if c.fds.len() > usize::from(MAX_QUEUE_PAIRS) {
                        return Err(bad(spec, key, v, "at most 16 fds (one per queue pair)"));
                    }
                }
                "queues" => {
                    c.queues = if v == "auto" {
                        Queues::PerVcpu
                    } else {
                        let n = num(i64::from(MAX_QUEUE_PAIRS))?;
                        if n == 0 {
                            return Err(bad(spec, key, v, "use 1 to 16 or auto"));
                        }
                        Queues::Pairs(n as u16)
                    };
                }
                "dump" => dump = Some(PathBuf::from(v)),
                "egress" => {
                    let default = v.parse().map_err(|e: String| bad(spec, key, v, &e))?;
                    c.egress = Some(EgressPolicy::new(default));
                }
                "dump_len" => {
                    let n = num(i64::from(u32::MAX))?;
                    if n < 14 {
                        return Err(bad(spec, key, v, "at least 14 (an Ethernet header)"));
                    }
                    dump_len = Some(n as u32);
                }
                "tx_rate" | "rx_rate" | "tx_burst" | "rx_burst" | "tx_pps" | "rx_pps" => {
                    let r = &mut rates[usize::from(key.starts_with("rx"))];
                    let why = |e: rate_limit::LimitError| bad(spec, key, v, &e.to_string());
                    match &key[3..] {
                        "rate" => r.0 = Some(rate_limit::parse_rate(v).map_err(why)?),
                        "burst" => r.1 = Some(rate_limit::parse_size(v).map_err(why)?),
                        _ => r.2 = Some(rate_limit::parse_pps(v).map_err(why)?),
                    }
                }
                _ => {
                    return Err(NetConfigError::UnknownKey {
                        spec: spec.into(),
                        key: key.into(),
                    })
                }
            }
        }
        let [tx, rx] = rates;
        c.limits = RateLimits {
            tx: direction_limits(spec, "tx", tx)?,
            rx: direction_limits(spec, "rx", rx)?,
        };
        c.dump = match (dump, dump_len) {
            (Some(p), len) => Some((p, len.unwrap_or(super::capture::DEFAULT_SNAP_LEN))),
            (None, None) => None,
            (None, Some(_)) => {
                return Err(NetConfigError::BurstWithoutRate {
                    spec: spec.into(),
                    key: "dump_len",
                    needs: "dump",
                })
            }
        };
        match (&mut c.egress, egress_rules.is_empty()) {
            (Some(p), _) => p.rules = egress_rules,
            (None, true) => {}
            (None, false) => {
                return Err(NetConfigError::BurstWithoutRate {
                    spec: spec.into(),
                    key: "allow=/deny=",
                    needs: "egress=allow|deny|sandbox (what the rest meets)",
                })
            }
        }
        if user {
            c.peer = Some(Peer::Passt {
                hostfwd: std::mem::take(&mut hostfwd),
            });
        }
        if !hostfwd.is_empty() {
            return Err(NetConfigError::HostFwdWithoutUser(spec.into()));
        }
        let given = [c.tap.is_some(), c.fd.is_some(), !c.fds.is_empty()];
        let taps = given.iter().filter(|&&g| g).count();
        if wires > 1 || (wires == 1 && taps > 0) {
            return Err(NetConfigError::TwoWires(spec.into()));
        }
        if let Some(peer) = &c.peer {
            let what = match peer {
                Peer::Passt { .. } => "user",
                Peer::Stream(_) => "stream=",
                Peer::Dgram(_) => "dgram=",
            };
            // What only a TAP has.
            for key in [
                "bridge",
                "br",
                "script",
                "downscript",
                "vnet_hdr",
                "sndbuf",
                "queues",
            ] {
                if seen.contains(&key) {
                    return Err(NetConfigError::TapKeyWithPeer {
                        spec: spec.into(),
                        key: key.into(),
                        peer: what,
                    });
                }
            }
            c.vnet_hdr = false;
            return Ok(c);
        }
        match taps {
            0 => return Err(NetConfigError::NoTap(spec.into())),
            1 => {}
            _ => return Err(NetConfigError::TapAndFd(spec.into())),
        }
        if c.fd.is_some() && c.queues.pairs() > 1 {
            return Err(NetConfigError::FdsAndQueues {
                spec: spec.into(),
                queues: c.queues.pairs(),
                fds: 1,
            });
        }
        if !c.fds.is_empty() {
            match (seen.contains(&"queues"), c.queues) {
                (false, _) => c.queues = Queues::Pairs(c.fds.len() as u16),
                (true, Queues::Pairs(n)) if usize::from(n) == c.fds.len() => {}
                (true, q) => {
                    return Err(NetConfigError::FdsAndQueues {
                        spec: spec.into(),
                        queues: q.pairs(),
                        fds: c.fds.len(),
                    })
                }
            }
        }
        Ok(c)
    }
}

/// One direction's buckets from its rate (bit/s), burst (bytes) and pps.
fn direction_limits(
    spec: &str,
    dir: &'static str,
    (rate, burst, pps): (Option<u64>, Option<u64>, Option<u64>),
) -> Result<DirectionLimits, NetConfigError> {
    let (rate_key, burst_key, pps_key) = if dir == "tx" {
        ("tx_rate", "tx_burst", "tx_pps")
    } else {
        ("rx_rate", "rx_burst", "rx_pps")
    };
    let bad_bucket = |key: &str, e: rate_limit::LimitError| bad(spec, key, "", &e.to_string());
    let bandwidth = match (rate, burst) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(NetConfigError::BurstWithoutRate {
                spec: spec.into(),
                key: burst_key,
                needs: rate_key,
            })
        }
        (Some(r), b) => Some(Bucket::bandwidth(r, b).map_err(|e| bad_bucket(rate_key, e))?),
    };
    let ops = pps
        .map(|n| Bucket::operations(n).map_err(|e| bad_bucket(pps_key, e)))
        .transpose()?;
    Ok(DirectionLimits { bandwidth, ops })
}

/// Checks NICs against each other and gives each a MAC: duplicates of a
/// TAP, an fd or an explicit MAC are errors; default MACs never collide.
/// `queues=auto` becomes one pair per vCPU of `vcpus`.
pub fn validate_all(nics: &mut [NetConfig], vcpus: u8) -> Result<(), NetConfigError> {
    for n in nics.iter_mut() {
        if n.queues == Queues::PerVcpu {
            n.queues = Queues::Pairs(u16::from(vcpus).clamp(1, MAX_QUEUE_PAIRS));
        }
        if n.vhost == VhostMode::On && !n.limits.is_none() {
            return Err(NetConfigError::VhostAndLimits(n.label()));
        }
        if n.peer.is_some() {
            if n.vhost == VhostMode::On {
                return Err(NetConfigError::VhostWithoutTap(n.label()));
            }
            if n.queues.pairs() > 1 {
                return Err(NetConfigError::TapKeyWithPeer {
                    spec: n.label(),
                    key: "queues".into(),
                    peer: "a user-mode network",
                });
            }
        }
        if let Some((path, _)) = &n.dump {
            // Checked before anything is created; the file itself is
            // created when the NIC is (Vm::new), errors named then.
            let folder = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !folder.is_dir() {
                return Err(NetConfigError::DumpFolder {
                    nic: n.label(),
                    path: path.display().to_string(),
                    folder: folder.display().to_string(),
                });
            }
        }
        if n.model == NicModel::E1000 && n.queues.pairs() > 1 {
            return Err(NetConfigError::E1000OneQueue(n.label()));
        }
    }
    let all_fds: Vec<i32> = nics
        .iter()
        .flat_map(|n| n.fd.into_iter().chain(n.fds.iter().copied()))
        .collect();
    for (i, fd) in all_fds.iter().enumerate() {
        if all_fds[..i].contains(fd) {
            return Err(NetConfigError::DuplicateFd(*fd));
        }
    }
    for (i, a) in nics.iter().enumerate() {
        for b in &nics[..i] {
            if a.tap.is_some() && a.tap == b.tap {
                return Err(NetConfigError::DuplicateTap(a.label()));
            }
            if a.mac.is_some() && a.mac == b.mac {
                return Err(NetConfigError::DuplicateMac(
                    a.mac.unwrap_or(MacAddr([0; 6])),
                ));
            }
        }
    }
    let explicit: Vec<MacAddr> = nics.iter().filter_map(|n| n.mac).collect();
    let mut taken = explicit;
    for n in nics.iter_mut().filter(|n| n.mac.is_none()) {
        let mut bump = 0;
        let mut mac = MacAddr::for_nic(&n.label(), bump);
        while taken.contains(&mac) {
            bump += 1;
            mac = MacAddr::for_nic(&n.label(), bump);
        }
        taken.push(mac);
        n.mac = Some(mac);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(spec: &str) -> String {
        spec.parse::<NetConfig>().unwrap_err().to_string()
    }

    #[test]
    fn user_mode_networks_parse_in_qemus_words() {
        let c: NetConfig = "user,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53,model=e1000"
            .parse()
            .unwrap();
        let Some(Peer::Passt { hostfwd }) = &c.peer else {
            panic!("not passt: {c:?}")
        };
        assert_eq!(hostfwd.len(), 2);
        assert_eq!(hostfwd[1].to_string(), "udp:127.0.0.1:5353-:53");
        assert_eq!(c.model, NicModel::E1000);
        assert!(!c.vnet_hdr && c.tap.is_none());
        assert_eq!(c.label(), "user");
        let c: NetConfig = "user".parse().unwrap();
        assert_eq!(c.peer, Some(Peer::Passt { hostfwd: vec![] }));
        let c: NetConfig = "stream=/run/passt.sock,mac=52:54:00:00:00:09"
            .parse()
            .unwrap();
        assert_eq!(c.peer, Some(Peer::Stream("/run/passt.sock".into())));
        let c: NetConfig = "dgram=/tmp/vm.sock".parse().unwrap();
        assert_eq!(c.peer, Some(Peer::Dgram("/tmp/vm.sock".into())));
        // QEMU's leading `tap` word.
        let c: NetConfig = "tap,ifname=t0".parse().unwrap();
        assert_eq!(c.tap.as_deref(), Some("t0"));
    }

    #[test]
    fn egress_rules_keep_their_order_and_bad_ones_name_the_bad_part() {
        use crate::net::egress::{Action, EgressDefault};
        let c: NetConfig =
            "tap=t0,egress=deny,allow=10.0.0.1:5001/tcp,deny=10.0.0.0/8,allow=0.0.0.0/0:53/udp"
                .parse()
                .unwrap();
        let p = c.egress.unwrap();
        assert_eq!(p.default, EgressDefault::Deny);
        let rules: Vec<String> = p.rules.iter().map(EgressRule::spec).collect();
        assert_eq!(
            rules,
            [
                "allow=10.0.0.1/32:5001/tcp",
                "deny=10.0.0.0/8",
                "allow=0.0.0.0/0:53/udp"
            ]
        );
        assert_eq!(p.rules[1].action, Action::Deny);
        let c: NetConfig = "tap=t0,egress=sandbox".parse().unwrap();
        assert_eq!(c.egress.unwrap().default, EgressDefault::Sandbox);
        assert_eq!("tap=t0".parse::<NetConfig>().unwrap().egress, None);
        for (spec, want) in [
            (
                "tap=t0,egress=sandbox,deny=10.0.0.0/33",
                "bad deny=\"10.0.0.0/33\": prefix length 33 is more than an IPv4 address has (32)",
            ),
            (
                "tap=t0,egress=deny,allow=10.0.0.1:http/tcp",
                "bad allow=\"10.0.0.1:http/tcp\": port \"http\" is not a number",
            ),
            (
                "tap=t0,egress=open",
                "bad egress=\"open\": expected allow, deny or sandbox",
            ),
            (
                "tap=t0,allow=10.0.0.1",
                "allow=/deny= needs egress=allow|deny|sandbox",
            ),
            ("tap=t0,egress=deny,egress=allow", "egress is given twice"),
        ] {
            let e = err(spec);
            assert!(e.contains(want), "{spec}: {e}");
        }
        let mut nics = vec!["user,egress=sandbox".parse::<NetConfig>().unwrap()];
        validate_all(&mut nics, 1).unwrap();
    }

    #[test]
    fn user_mode_mistakes_name_the_problem() {
        for (spec, want) in [
            ("user,bridge=br0", "bridge is for a TAP"),
            ("stream=/x,queues=2", "queues is for a TAP"),
            ("user,tap=t0", "a NIC has one wire"),
            ("stream=/x,dgram=/y", "a NIC has one wire"),
            ("tap=t0,hostfwd=tcp::1-:2", "needs user"),
            ("user,hostfwd=tcp::2222", "expected tcp:"),
            ("user,hostfwd=tcp::2222-10.0.2.15:22", "cannot be chosen"),
            ("bogus", "is not key=value"),
        ] {
            let e = err(spec);
            assert!(e.contains(want), "{spec}: {e}");
        }
        let mut nics = vec!["user,vhost=on".parse::<NetConfig>().unwrap()];
        let e = validate_all(&mut nics, 1).unwrap_err().to_string();
        assert!(e.contains("vhost=on needs a TAP"), "{e}");
        // Two user-mode NICs get two MACs.
        let mut nics = vec![NetConfig::user(vec![]), NetConfig::user(vec![])];
        validate_all(&mut nics, 1).unwrap();
        assert_ne!(nics[0].mac, nics[1].mac);
    }

    #[test]
    fn full_spec_parses() {
        let c: NetConfig = "tap=t0,bridge=br0,mac=52:54:00:12:34:56,model=e1000,vhost=off,vnet_hdr=off,sndbuf=1048576,mtu=9000,script=/bin/up,downscript=no"
            .parse()
            .unwrap();
        assert_eq!(c.tap.as_deref(), Some("t0"));
        assert_eq!(c.bridge.as_deref(), Some("br0"));
        assert_eq!(c.mac, Some(MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56])));
        assert_eq!(
            (c.model, c.vhost, c.vnet_hdr),
            (NicModel::E1000, VhostMode::Off, false)
        );
        assert_eq!((c.sndbuf, c.mtu), (Some(1 << 20), Some(9000)));
        assert_eq!(c.script, Some(PathBuf::from("/bin/up")));
        assert_eq!(c.downscript, None);
        let d: NetConfig = "fd=5".parse().unwrap();
        assert_eq!(
            (d.fd, d.tap, d.vnet_hdr, d.vhost),
            (Some(5), None, true, VhostMode::Auto)
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        assert!(err("tap=t0,colour=red").contains("unknown key \"colour\" (valid keys: tap,"));
        assert!(err("tap=t0,tap=t1").contains("tap is given twice"));
        assert!(err("tap=t0,bridge").contains("not key=value"));
        assert!(err("tap=").contains("empty"));
        assert!(err("tap=t0,mac=52:54:00:12:34").contains("six hex bytes"));
        assert!(err("tap=t0,mac=01:54:00:12:34:56").contains("multicast"));
        assert!(err("tap=t0,mac=00:00:00:00:00:00").contains("all zeros"));
        assert!(err("tap=t0,mac=zz:54:00:12:34:56").contains("hexadecimal"));
        assert!(err("bridge=br0").contains("give tap=NAME, fd=N, user, stream=PATH or dgram=PATH"));
        assert!(err("tap=t0,fd=3").contains("exclusive"));
        assert!(err("tap=t0,vnet_hdr=maybe").contains("use on or off"));
        assert!(err("tap=t0,model=rtl8139").contains("use virtio or e1000"));
        assert!(err("tap=t0,vhost=sometimes").contains("on, off or auto"));
        assert!(err("tap=t0,mtu=20").contains("at least 68"));
        assert!(err("tap=t0,mtu=70000").contains("0 to 65535"));
        assert!(err("tap=t0,sndbuf=-1").contains("expected a number"));
        assert!(err("tap=t0,sndbuf=0").contains("more than 0"));
        assert!(err("tap=averyveryverylongname").contains("interface name"));
        assert!(err("tap=a/b").contains("interface name"));
        assert!(err("tap=t0,bridge=..").contains("interface name"));
    }

    #[test]
    fn default_macs_are_stable_local_unicast_and_distinct() {
        let a = MacAddr::for_nic("tap1", 0);
        assert_eq!(a, MacAddr::for_nic("tap1", 0));
        assert_ne!(a, MacAddr::for_nic("tap2", 0));
        assert_eq!(&a.0[..3], &[0x52, 0x54, 0x00]);
        assert_eq!(a.0[0] & 0b11, 0b10, "locally administered, unicast");
        let mut nics: Vec<NetConfig> = (0..200).map(|i| NetConfig::tap(&format!("t{i}"))).collect();
        // An explicit MAC equal to what t0 would get forces a bump.
        nics[1].mac = Some(MacAddr::for_nic("t0", 0));
        validate_all(&mut nics, 1).unwrap();
        let mut macs: Vec<_> = nics.iter().map(|n| n.mac.unwrap()).collect();
        macs.sort_by_key(|m| m.0);
        macs.dedup();
        assert_eq!(macs.len(), 200);
        assert_eq!(MacAddr::for_nic("t0", 0).to_string().len(), 17);
        assert_eq!(
            "52-54-00-AB-cd-01".parse::<MacAddr>().unwrap().to_string(),
            "52:54:00:ab:cd:01"
        );
    }

    #[test]
    fn duplicates_across_nics_are_refused() {
        let mut two = vec![NetConfig::tap("t0"), NetConfig::tap("t0")];
        assert_eq!(
            validate_all(&mut two, 1),
            Err(NetConfigError::DuplicateTap("t0".into()))
        );
        let mut fds: Vec<NetConfig> = vec!["fd=3".parse().unwrap(), "fd=3".parse().unwrap()];
        assert_eq!(
            validate_all(&mut fds, 1),
            Err(NetConfigError::DuplicateFd(3))
        );
        let mut macs = vec![
            "tap=a,mac=52:54:00:00:00:01".parse().unwrap(),
            "tap=b,mac=52:54:00:00:00:01".parse::<NetConfig>().unwrap(),
        ];
        assert!(matches!(
            validate_all(&mut macs, 1),
            Err(NetConfigError::DuplicateMac(_))
        ));
    }

    #[test]
    fn queues_and_fds_parse_and_resolve() {
        let c: NetConfig = "tap=t0,queues=4".parse().unwrap();
        assert_eq!(c.queues, Queues::Pairs(4));
        assert_eq!(
            "tap=t0".parse::<NetConfig>().unwrap().queues,
            Queues::Pairs(1)
        );
        let c: NetConfig = "fds=3:4:5".parse().unwrap();
        assert_eq!((c.fds.clone(), c.queues), (vec![3, 4, 5], Queues::Pairs(3)));
        assert_eq!(c.label(), "fd3");
        let c: NetConfig = "fds=7:8,queues=2".parse().unwrap();
        assert_eq!(c.queues, Queues::Pairs(2));
        // auto: one pair per vCPU, at most 16.
        let mut nics = [
            "tap=a,queues=auto".parse::<NetConfig>().unwrap(),
            "tap=b,queues=auto".parse().unwrap(),
        ];
        validate_all(&mut nics[..1], 3).unwrap();
        validate_all(&mut nics[1..], 40).unwrap();
        assert_eq!(
            (nics[0].queues, nics[1].queues),
            (Queues::Pairs(3), Queues::Pairs(16))
        );
    }

    #[test]
    fn bad_queues_and_fds_say_what_is_wrong() {
        assert!(err("tap=t0,queues=0").contains("use 1 to 16 or auto"));
        assert!(err("tap=t0,queues=17").contains("0 to 16"));
        assert!(err("tap=t0,queues=many").contains("expected a number"));
        assert!(err("fds=3:x").contains("fd numbers joined by ':'"));
        assert!(err("fds=3:4,queues=3")
            .contains("queues=3 needs one TAP fd per queue pair (fds=A:B:...), and 2 given"));
        assert!(err("fd=3,queues=2").contains("and 1 given"));
        assert!(err("tap=t0,fds=3:4").contains("exclusive"));
        assert!(err("fd=3,fds=4:5").contains("exclusive"));
        let seventeen: Vec<String> = (3..20).map(|n| n.to_string()).collect();
        assert!(err(&format!("fds={}", seventeen.join(":"))).contains("at most 16"));
        let mut e1000 = vec!["tap=t0,model=e1000,queues=2".parse::<NetConfig>().unwrap()];
        let e = validate_all(&mut e1000, 1).unwrap_err().to_string();
        assert!(
            e.contains("the e1000 has one queue; use model=virtio"),
            "{e}"
        );
        // queues=auto on a one-vCPU VM is one pair: fine for an e1000.
        let mut auto = vec!["tap=t0,model=e1000,queues=auto"
            .parse::<NetConfig>()
            .unwrap()];
        validate_all(&mut auto, 1).unwrap();
        // An fd in two NICs, whether given as fd= or in fds=.
        let mut dup = vec![
            "fd=3".parse::<NetConfig>().unwrap(),
            "fds=4:3".parse().unwrap(),
        ];
        assert_eq!(
            validate_all(&mut dup, 1),
            Err(NetConfigError::DuplicateFd(3))
        );
    }

    #[test]
    fn rate_limits_parse_per_direction_and_bad_ones_are_named() {
        let c: NetConfig = "tap=t0,tx_rate=16Mbit,tx_burst=256K,rx_rate=1G,rx_pps=2000"
            .parse()
            .unwrap();
        let tx = c.limits.tx.bandwidth.unwrap();
        assert_eq!(tx.size, 256 << 10);
        assert!((tx.rate() - 2e6).abs() < 1.0);
        assert!(c.limits.tx.ops.is_none());
        assert!((c.limits.rx.bandwidth.unwrap().rate() - 125e6).abs() < 1.0);
        assert!((c.limits.rx.ops.unwrap().rate() - 2000.0).abs() < 0.01);
        assert!("tap=t0".parse::<NetConfig>().unwrap().limits.is_none());
        let e = err("tap=t0,tx_rate=fast");
        assert!(
            e.contains("bad tx_rate=\"fast\"") && e.contains("like 16Mbit"),
            "{e}"
        );
        assert!(err("tap=t0,rx_burst=lots").contains("size in bytes"));
        assert!(err("tap=t0,tx_pps=0").contains("frames per second"));
        assert!(err("tap=t0,rx_burst=64K").contains("rx_burst needs rx_rate"));
        let mut on = vec!["tap=t0,vhost=on,rx_pps=10".parse::<NetConfig>().unwrap()];
        let e = validate_all(&mut on, 1).unwrap_err().to_string();
        assert!(e.contains("vhost=on and a rate limit"), "{e}");
        let mut auto = vec!["tap=t0,rx_pps=10".parse::<NetConfig>().unwrap()];
        validate_all(&mut auto, 1).unwrap();
    }

    #[test]
    fn dump_parses_with_its_snap_length() {
        let c: NetConfig = "tap=t0,dump=/tmp/x.pcap".parse().unwrap();
        assert_eq!(c.dump, Some((PathBuf::from("/tmp/x.pcap"), 65535)));
        let c: NetConfig = "tap=t0,dump=/tmp/x.pcap,dump_len=128".parse().unwrap();
        assert_eq!(c.dump, Some((PathBuf::from("/tmp/x.pcap"), 128)));
        assert!(err("tap=t0,dump_len=128").contains("dump_len needs dump"));
        assert!(err("tap=t0,dump=/x,dump_len=4").contains("at least 14"));
        let mut bad = vec!["tap=t0,dump=/nonexistent/dir/x.pcap"
            .parse::<NetConfig>()
            .unwrap()];
        let e = validate_all(&mut bad, 1).unwrap_err().to_string();
        assert!(
            e.contains("the folder /nonexistent/dir does not exist"),
            "{e}"
        );
        let mut here = vec!["tap=t0,dump=x.pcap".parse::<NetConfig>().unwrap()];
        validate_all(&mut here, 1).unwrap();
    }
}
