//! The NIC options a user writes, QEMU-style:
//! `tap=NAME,bridge=BR,mac=MAC,model=virtio|e1000,vhost=on|off|auto,
//! vnet_hdr=on|off,sndbuf=N,mtu=N,script=PATH|no,downscript=PATH|no,fd=N`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::tap::valid_ifname;

pub const KEYS: &str =
    "tap, bridge, mac, model, vhost, vnet_hdr, sndbuf, mtu, script, downscript, fd";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NicModel {
    #[default]
    Virtio,
    E1000,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VhostMode {
    On,
    Off,
    #[default]
    Auto,
}

/// One NIC, as the user described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The TAP's name; None only with `fd`.
    pub tap: Option<String>,
    /// An already-open TAP fd (sandbox platforms, unprivileged use).
    pub fd: Option<i32>,
    pub bridge: Option<String>,
    /// None: a default from the TAP name, filled in by [`validate_all`].
    pub mac: Option<MacAddr>,
    pub model: NicModel,
    pub vhost: VhostMode,
    pub vnet_hdr: bool,
    pub sndbuf: Option<i32>,
    pub mtu: Option<u16>,
    pub script: Option<PathBuf>,
    pub downscript: Option<PathBuf>,
}

impl NetConfig {
    /// A virtio NIC on TAP `name`, with rvm's defaults.
    pub fn tap(name: &str) -> Self {
        NetConfig {
            tap: Some(name.into()),
            fd: None,
            bridge: None,
            mac: None,
            model: NicModel::Virtio,
            vhost: VhostMode::Auto,
            vnet_hdr: true,
            sndbuf: None,
            mtu: None,
            script: None,
            downscript: None,
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

    /// What names this NIC in messages and seeds its default MAC.
    pub fn label(&self) -> String {
        match (&self.tap, self.fd) {
            (Some(t), _) => t.clone(),
            (None, Some(fd)) => format!("fd{fd}"),
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
    #[error("--net {0}: give tap=NAME or fd=N")]
    NoTap(String),
    #[error("--net {0}: tap= and fd= are exclusive (the fd already names its TAP)")]
    TapAndFd(String),
    #[error("TAP {0} is given to two NICs")]
    DuplicateTap(String),
    #[error("fd {0} is given to two NICs")]
    DuplicateFd(i32),
    #[error("MAC {0} is given to two NICs")]
    DuplicateMac(MacAddr),
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
        for part in spec.split(',') {
            let Some((key, v)) = part.split_once('=') else {
                return Err(NetConfigError::NotKeyValue {
                    spec: spec.into(),
                    part: part.into(),
                });
            };
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
                _ => {
                    return Err(NetConfigError::UnknownKey {
                        spec: spec.into(),
                        key: key.into(),
                    })
                }
            }
        }
        match (&c.tap, c.fd) {
            (None, None) => Err(NetConfigError::NoTap(spec.into())),
            (Some(_), Some(_)) => Err(NetConfigError::TapAndFd(spec.into())),
            _ => Ok(c),
        }
    }
}

/// Checks NICs against each other and gives each a MAC: duplicates of a
/// TAP, an fd or an explicit MAC are errors; default MACs never collide.
pub fn validate_all(nics: &mut [NetConfig]) -> Result<(), NetConfigError> {
    for (i, a) in nics.iter().enumerate() {
        for b in &nics[..i] {
            if a.tap.is_some() && a.tap == b.tap {
                return Err(NetConfigError::DuplicateTap(a.label()));
            }
            if a.fd.is_some() && a.fd == b.fd {
                return Err(NetConfigError::DuplicateFd(a.fd.unwrap_or(-1)));
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
        assert!(err("bridge=br0").contains("give tap=NAME or fd=N"));
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
        validate_all(&mut nics).unwrap();
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
            validate_all(&mut two),
            Err(NetConfigError::DuplicateTap("t0".into()))
        );
        let mut fds: Vec<NetConfig> = vec!["fd=3".parse().unwrap(), "fd=3".parse().unwrap()];
        assert_eq!(validate_all(&mut fds), Err(NetConfigError::DuplicateFd(3)));
        let mut macs = vec![
            "tap=a,mac=52:54:00:00:00:01".parse().unwrap(),
            "tap=b,mac=52:54:00:00:00:01".parse::<NetConfig>().unwrap(),
        ];
        assert!(matches!(
            validate_all(&mut macs),
            Err(NetConfigError::DuplicateMac(_))
        ));
    }
}
