//! One egress rule as the user writes it,
//! `CIDR[:PORT|:LO-HI][/tcp|/udp|/icmp]`, and its canonical text.
//!
//! An IPv6 address has colons of its own, so a port after one needs a
//! prefix length or brackets: `2001:db8::/32:443/tcp`, `[2001:db8::1]:443`.
//! A bare IPv6 address (`::1`) has no port.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// Whether a rule lets the guest through or refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
        })
    }
}

/// A network: an address and how many leading bits of it count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// The one address `addr`.
    pub fn host(addr: IpAddr) -> Self {
        Cidr {
            addr,
            prefix: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    fn bits(addr: IpAddr) -> (u128, u8) {
        match addr {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    }

    /// Whether `addr` is inside (an IPv4 address is never inside an IPv6
    /// network, nor the other way round).
    pub fn contains(&self, addr: IpAddr) -> bool {
        if addr.is_ipv4() != self.addr.is_ipv4() {
            return false;
        }
        let (net, width) = Self::bits(self.addr);
        let (a, _) = Self::bits(addr);
        let host_bits = u32::from(width - self.prefix);
        net.checked_shr(host_bits) == a.checked_shr(host_bits)
    }
}

impl FromStr for Cidr {
    type Err = String;
    /// `ADDR` or `ADDR/LEN`, with no host bits set after LEN.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, len) = match s.split_once('/') {
            Some((a, len)) => (a, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 or IPv6 address"))?;
        let width = Cidr::bits(addr).1;
        let prefix = match len {
            None => width,
            Some(l) => {
                let n: u8 = l.parse().map_err(|_| {
                    format!("prefix length {l:?} is not a number (a protocol is written /tcp, /udp or /icmp, after the port)")
                })?;
                if n > width {
                    return Err(format!(
                        "prefix length {n} is more than an {} address has ({width})",
                        if addr.is_ipv4() { "IPv4" } else { "IPv6" }
                    ));
                }
                n
            }
        };
        let c = Cidr { addr, prefix };
        let (bits, _) = Cidr::bits(addr);
        let host_bits = u32::from(width - prefix);
        let host = bits & 1u128.checked_shl(host_bits).map_or(u128::MAX, |b| b - 1);
        if host != 0 {
            let net = bits
                .checked_shr(host_bits)
                .and_then(|n| n.checked_shl(host_bits))
                .unwrap_or(0);
            let net = match addr {
                IpAddr::V4(_) => IpAddr::from((net as u32).to_be_bytes()),
                IpAddr::V6(_) => IpAddr::from(net.to_be_bytes()),
            };
            return Err(format!(
                "{s} has host bits set after /{prefix}: the network is {net}/{prefix}"
            ));
        }
        Ok(c)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Destination ports, both ends included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))
        };
        let (lo, hi) = match s.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => (port(s)?, port(s)?),
        };
        if lo > hi {
            return Err(format!("port range {s}: {lo} is above {hi}"));
        }
        Ok(PortRange { lo, hi })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// One `allow=` or `deny=` rule: where to (a network), to which ports
/// (none: all) over which protocol (none: all; ports with no protocol
/// mean TCP and UDP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressRule {
    pub action: Action,
    pub net: Cidr,
    pub ports: Option<PortRange>,
    pub proto: Option<Proto>,
}

/// A rule that does not parse, and why, naming the bad part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{action}={rule}: {why}")]
pub struct RuleError {
    pub action: Action,
    pub rule: String,
    pub why: String,
}

impl EgressRule {
    /// Parses `CIDR[:PORT|:LO-HI][/tcp|/udp|/icmp]`.
    pub fn parse(action: Action, text: &str) -> Result<Self, RuleError> {
        let err = |why: String| RuleError {
            action,
            rule: text.to_string(),
            why,
        };
        let (rest, proto) = match text.rsplit_once('/') {
            Some((r, "tcp")) => (r, Some(Proto::Tcp)),
            Some((r, "udp")) => (r, Some(Proto::Udp)),
            Some((r, "icmp")) => (r, Some(Proto::Icmp)),
            Some((_, p)) if p.starts_with(|c: char| c.is_ascii_alphabetic()) => {
                return Err(err(format!("protocol {p:?} is not tcp, udp or icmp")))
            }
            _ => (text, None),
        };
        let (cidr, ports) = split_port(rest).map_err(err)?;
        let net: Cidr = cidr.parse().map_err(err)?;
        let ports = ports
            .map(|p| p.parse::<PortRange>())
            .transpose()
            .map_err(err)?;
        if ports.is_some() && proto == Some(Proto::Icmp) {
            return Err(err(
                "ICMP has no ports: give /tcp or /udp, or no protocol (both)".into(),
            ));
        }
        Ok(EgressRule {
            action,
            net,
            ports,
            proto,
        })
    }
}

/// Splits `CIDR[:PORTS]` where an IPv6 address's own colons are not the
/// port's: after a `/LEN` or a `]` only.
fn split_port(s: &str) -> Result<(String, Option<&str>), String> {
    if s.is_empty() {
        return Err("empty: expected CIDR[:PORT|:LO-HI][/tcp|/udp|/icmp]".into());
    }
    if let Some(inner) = s.strip_prefix('[') {
        let (addr, after) = inner
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: a '[' without its ']'"))?;
        let (len, port) = match after.split_once(':') {
            Some((len, port)) => (len, Some(port)),
            None => (after, None),
        };
        if !(len.is_empty() || len.starts_with('/')) {
            return Err(format!("{s:?}: after ']' comes /LEN or :PORT"));
        }
        return Ok((format!("{addr}{len}"), port));
    }
    if let Some((addr, after)) = s.split_once('/') {
        return Ok(match after.split_once(':') {
            Some((len, port)) => (format!("{addr}/{len}"), Some(port)),
            None => (s.to_string(), None),
        });
    }
    // No length: one colon is IPv4's port, more are an IPv6 address.
    Ok(match s.split_once(':') {
        Some((addr, port)) if !port.contains(':') => (addr.to_string(), Some(port)),
        _ => (s.to_string(), None),
    })
}

impl EgressRule {
    /// `allow=RULE` or `deny=RULE`, as the command line and the JSON
    /// forms write a rule with its action.
    pub fn parse_spec(text: &str) -> Result<Self, String> {
        match text.split_once('=') {
            Some(("allow", rule)) => Self::parse(Action::Allow, rule).map_err(|e| e.to_string()),
            Some(("deny", rule)) => Self::parse(Action::Deny, rule).map_err(|e| e.to_string()),
            _ => Err(format!("{text:?} is not allow=RULE or deny=RULE")),
        }
    }

    /// The rule with its action, as [`EgressRule::parse_spec`] reads it.
    pub fn spec(&self) -> String {
        format!("{}={self}", self.action)
    }
}

impl fmt::Display for EgressRule {
    /// The rule as it would be written, with the prefix length always
    /// given (`10.0.0.1/32:80/tcp`), so it parses back the same.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.net)?;
        if let Some(p) = self.ports {
            write!(f, ":{p}")?;
        }
        if let Some(p) = self.proto {
            write!(f, "/{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(s: &str) -> Result<EgressRule, String> {
        EgressRule::parse(Action::Allow, s).map_err(|e| e.to_string())
    }

    #[test]
    fn rules_parse_in_every_spelling_and_print_back() {
        for (text, canonical) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.0.2.7", "192.0.2.7/32"),
            ("192.0.2.7:443", "192.0.2.7/32:443"),
            ("192.0.2.0/24:8000-8100/tcp", "192.0.2.0/24:8000-8100/tcp"),
            ("0.0.0.0/0:53/udp", "0.0.0.0/0:53/udp"),
            ("198.51.100.1/icmp", "198.51.100.1/32/icmp"),
            ("::1", "::1/128"),
            ("2001:db8::/32:443/tcp", "2001:db8::/32:443/tcp"),
            ("[2001:db8::1]:443", "2001:db8::1/128:443"),
            ("[2001:db8::]/32:80-81/udp", "2001:db8::/32:80-81/udp"),
            ("::/0/icmp", "::/0/icmp"),
        ] {
            let r = allow(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(r.to_string(), canonical, "{text}");
            assert_eq!(allow(canonical).unwrap(), r, "{canonical} parses back");
        }
        let r = allow("192.0.2.0/24:8000-8100/tcp").unwrap();
        assert_eq!(r.ports, Some(PortRange { lo: 8000, hi: 8100 }));
        assert_eq!(r.proto, Some(Proto::Tcp));
        assert_eq!(r.net.prefix, 24);
    }

    #[test]
    fn a_bad_rule_names_its_bad_part() {
        for (text, why) in [
            ("", "empty"),
            (
                "10.0.0.0/33",
                "prefix length 33 is more than an IPv4 address has (32)",
            ),
            (
                "::/129",
                "prefix length 129 is more than an IPv6 address has (128)",
            ),
            (
                "10.0.0.1/8",
                "host bits set after /8: the network is 10.0.0.0/8",
            ),
            ("10.0.0.0/8:0", "port \"0\" is not a number from 1 to 65535"),
            ("10.0.0.0/8:99999/tcp", "port \"99999\" is not a number"),
            ("10.0.0.0/8:90-80", "90 is above 80"),
            ("10.0.0.0/8:80/icmp", "ICMP has no ports"),
            (
                "10.0.0.0/8:80/sctp",
                "protocol \"sctp\" is not tcp, udp or icmp",
            ),
            ("::1/0", "host bits set after /0: the network is ::/0"),
            (
                "10.0.0.300",
                "\"10.0.0.300\" is not an IPv4 or IPv6 address",
            ),
            (
                "example.com:80",
                "\"example.com\" is not an IPv4 or IPv6 address",
            ),
            ("[2001:db8::1:443", "a '[' without its ']'"),
            ("10.0.0.1/tcpx", "protocol \"tcpx\" is not tcp"),
            ("10.0.0.0/x8", "protocol \"x8\""),
            ("10.0.0.0/8x", "prefix length \"8x\" is not a number"),
        ] {
            let e = allow(text).expect_err(text);
            assert!(e.starts_with(&format!("allow={text}: ")), "{e}");
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn a_network_contains_its_own_family_only() {
        let n: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains("10.255.0.1".parse().unwrap()));
        assert!(!n.contains("11.0.0.1".parse().unwrap()));
        assert!(!n.contains("::ffff:10.0.0.1".parse().unwrap()));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("203.0.113.9".parse().unwrap()));
        let v6: Cidr = "fc00::/7".parse().unwrap();
        assert!(v6.contains("fd00:ec2::254".parse().unwrap()));
        assert!(!v6.contains("2001:db8::1".parse().unwrap()));
        let one = Cidr::host("192.0.2.1".parse().unwrap());
        assert!(one.contains("192.0.2.1".parse().unwrap()));
        assert!(!one.contains("192.0.2.2".parse().unwrap()));
    }
}
