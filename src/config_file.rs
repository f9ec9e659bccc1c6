//! The VM's configuration as JSON (`rvm run --config FILE`, and what an
//! embedder may store): [`VmConfig`] and every [`NetConfig`](crate::net::NetConfig) field, in
//! the command line's spellings where it has one (`"model": "e1000"`,
//! `"mac": "52:54:00:12:34:56"`, `"queues": "auto"`, a hostfwd or an
//! egress rule as on the command line). Unknown fields are refused, by
//! name; a field left out takes rvm's default.

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::net::egress::{EgressDefault, EgressPolicy, EgressRule};
use crate::net::rate_limit::Bucket;
use crate::VmConfig;

/// A value written as its command-line text (Display / FromStr).
pub(crate) mod text {
    use super::*;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        let s = TextOrNumber::deserialize(d)?.0;
        s.parse()
            .map_err(|e| D::Error::custom(format!("{s:?}: {e}")))
    }

    /// The same, optional (null or absent: None).
    pub mod option {
        use super::*;

        pub fn serialize<T: Display, S: Serializer>(
            v: &Option<T>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
        where
            T: FromStr,
            T::Err: Display,
            D: Deserializer<'de>,
        {
            match Option::<TextOrNumber>::deserialize(d)? {
                None => Ok(None),
                Some(TextOrNumber(s)) => s
                    .parse()
                    .map(Some)
                    .map_err(|e| D::Error::custom(format!("{s:?}: {e}"))),
            }
        }
    }

    /// A list of them.
    pub mod list {
        use super::*;

        pub fn serialize<T: Display, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|x| x.to_string()))
        }

        pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
        where
            T: FromStr,
            T::Err: Display,
            D: Deserializer<'de>,
        {
            Vec::<String>::deserialize(d)?
                .into_iter()
                .map(|s| {
                    s.parse()
                        .map_err(|e| D::Error::custom(format!("{s:?}: {e}")))
                })
                .collect()
        }
    }
}

/// A string, or a number taken as its text (`"queues": 2`).
struct TextOrNumber(String);

impl<'de> Deserialize<'de> for TextOrNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            S(String),
            U(u64),
        }
        Ok(TextOrNumber(
            match Raw::deserialize(d)
                .map_err(|_| D::Error::custom("expected a string or a whole number"))?
            {
                Raw::S(s) => s,
                Raw::U(n) => n.to_string(),
            },
        ))
    }
}

/// A bucket: `{"size": bytes or frames, "refill_ms": ms, "one_time_burst": n}`.
impl Serialize for Bucket {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out {
            size: u64,
            refill_ms: f64,
            one_time_burst: u64,
        }
        Out {
            size: self.size,
            refill_ms: self.refill.as_secs_f64() * 1000.0,
            one_time_burst: self.one_time_burst,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Bucket {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct In {
            size: u64,
            refill_ms: f64,
            #[serde(default)]
            one_time_burst: u64,
        }
        let b = In::deserialize(d)?;
        if !(b.refill_ms.is_finite() && b.refill_ms >= 1.0) || b.size == 0 {
            return Err(D::Error::custom(
                "a bucket needs a size of at least 1 and refill_ms of at least 1",
            ));
        }
        Ok(Bucket {
            size: b.size,
            refill: Duration::from_secs_f64(b.refill_ms / 1000.0),
            one_time_burst: b.one_time_burst,
        })
    }
}

/// A policy: `{"default": "deny", "rules": ["allow=10.0.0.1:53/udp", ...]}`.
impl Serialize for EgressPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out {
            default: String,
            rules: Vec<String>,
        }
        Out {
            default: self.default.to_string(),
            rules: self.rules.iter().map(EgressRule::spec).collect(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for EgressPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct In {
            #[serde(default, with = "text::option")]
            default: Option<EgressDefault>,
            #[serde(default)]
            rules: Vec<String>,
        }
        let p = In::deserialize(d)?;
        let mut policy = EgressPolicy::new(p.default.unwrap_or_default());
        for (i, r) in p.rules.iter().enumerate() {
            let rule = EgressRule::parse_spec(r)
                .map_err(|e| D::Error::custom(format!("rules[{i}]: {e}")))?;
            policy.rules.push(rule);
        }
        Ok(policy)
    }
}

/// A capture: `{"path": "...", "snap_len": 65535}`.
pub(crate) mod dump {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Dump {
        path: PathBuf,
        #[serde(default = "default_len")]
        snap_len: u32,
    }

    fn default_len() -> u32 {
        crate::net::capture::DEFAULT_SNAP_LEN
    }

    pub fn serialize<S: Serializer>(v: &Option<(PathBuf, u32)>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref()
            .map(|(path, snap_len)| Dump {
                path: path.clone(),
                snap_len: *snap_len,
            })
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<(PathBuf, u32)>, D::Error> {
        let v = Option::<Dump>::deserialize(d)?;
        match v {
            Some(Dump { snap_len, .. }) if snap_len < 14 => Err(D::Error::custom(
                "snap_len: at least 14 (an Ethernet header)",
            )),
            v => Ok(v.map(|d| (d.path, d.snap_len))),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("--config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--config {path}: {source} (the schema is `rvm run ... --print-config`'s output)")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl VmConfig {
    /// The configuration in `path` (JSON).
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.into(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigFileError::Parse {
            path: path.into(),
            source,
        })
    }

    /// The configuration as pretty JSON, as `from_file` reads it.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::NetConfig;

    fn full() -> VmConfig {
        let mut c = VmConfig::new("/boot/bzImage");
        c.initrd = Some("/boot/initrd".into());
        c.vcpus = 2;
        c.mem_mib = 512;
        c.seccomp = crate::vmm::seccomp::SeccompMode::Log;
        for spec in [
            "tap=t0,bridge=br0,mac=52:54:00:12:34:56,model=e1000,vhost=off,mtu=1400,\
             tx_rate=16Mbit,tx_burst=64K,rx_pps=1000,dump=/tmp/x.pcap,dump_len=128,\
             egress=sandbox,allow=10.0.0.1:53/udp,deny=192.0.2.0/24:80-90/tcp",
            "user,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-:53",
            "stream=/run/passt.sock",
            "tap=t1,queues=auto,vnet_hdr=off,sndbuf=100000,script=/etc/ifup",
        ] {
            c.nics.push(spec.parse::<NetConfig>().unwrap());
        }
        c
    }

    #[test]
    fn a_config_goes_to_json_and_back_unchanged() {
        let c = full();
        let json = c.to_json();
        let back: VmConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, c, "{json}");
        // The command line's spellings.
        for text in [
            "\"model\": \"e1000\"",
            "\"mac\": \"52:54:00:12:34:56\"",
            "\"queues\": \"auto\"",
            "\"tcp::2222-:22\"",
            "\"allow=10.0.0.1/32:53/udp\"",
            "\"seccomp\": \"log\"",
        ] {
            assert!(json.contains(text), "{text} not in {json}");
        }
    }

    #[test]
    fn only_the_kernel_is_needed_and_the_rest_defaults() {
        let c: VmConfig =
            serde_json::from_str(r#"{"kernel": "/k", "nics": [{"tap": "t0", "queues": 2}]}"#)
                .unwrap();
        let mut want = VmConfig::new("/k");
        let mut nic = NetConfig::tap("t0");
        nic.queues = crate::net::config::Queues::Pairs(2);
        want.nics.push(nic);
        assert_eq!(c, want);
    }

    #[test]
    fn mistakes_are_named() {
        for (json, says) in [
            (r#"{"kernel": "/k", "cpus": 2}"#, "unknown field `cpus`"),
            (r#"{"vcpus": 2}"#, "missing field `kernel`"),
            (
                r#"{"kernel": "/k", "nics": [{"tap": "t0", "colour": 1}]}"#,
                "unknown field `colour`",
            ),
            (
                r#"{"kernel": "/k", "nics": [{"mac": "zz"}]}"#,
                "\"zz\": expected six hex bytes",
            ),
            (
                r#"{"kernel": "/k", "nics": [{"model": "rtl8139"}]}"#,
                "use virtio or e1000",
            ),
            (
                r#"{"kernel": "/k", "nics": [{"queues": 99}]}"#,
                "use 1 to 16 or auto",
            ),
            (
                r#"{"kernel": "/k", "nics": [{"egress": {"default": "deny", "rules": ["allow=10.0.0.0/33"]}}]}"#,
                "prefix length 33",
            ),
            (
                r#"{"kernel": "/k", "nics": [{"limits": {"tx": {"bandwidth": {"size": 0, "refill_ms": 10}}}}]}"#,
                "a bucket needs a size of at least 1",
            ),
            (
                r#"{"kernel": "/k", "nics": [{"dump": {"path": "/x", "snap_len": 4}}]}"#,
                "snap_len",
            ),
        ] {
            let e = serde_json::from_str::<VmConfig>(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{json}: {e}");
        }
    }
}
