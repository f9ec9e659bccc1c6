//! A NIC's egress policy in the host kernel, written with the `nft` tool:
//! two tables named after the TAP, one per place its frames can go.
//!
//! - `bridge` family, prerouting: a TAP on a bridge. Frames are judged as
//!   they enter the bridge from the TAP, whether the bridge forwards them
//!   or hands them to the host; conntrack (nf_conntrack_bridge) runs first,
//!   and `reject` is allowed at this hook (not at the bridge's forward).
//! - `inet` family, input and forward: a routed TAP.
//!
//! Both are always there, so a TAP that joins or leaves a bridge later is
//! still covered; each sees only its own kind of traffic (a bridged frame
//! reaches the host's inet hooks through the bridge, not the TAP). Every
//! change is one `nft -f` transaction: it first deletes what an earlier
//! rvm on the same TAP left (one that was SIGKILLed), so the rules are
//! replaced atomically and stale tables are reclaimed.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use super::{labels, sandbox_networks, Action, EgressDefault, EgressPolicy, EgressRule, Proto};
use super::{Cidr, SANDBOX_TCP_PORT};

/// The program, looked up in PATH; RVM_NFT overrides it (tests).
const NFT: &str = "nft";

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("egress policy on TAP {tap}: the nft tool is not installed (apt install nftables, or set RVM_NFT to its path)")]
    Missing { tap: String },
    #[error("egress policy on TAP {tap}: {what} failed: {why}{hint}")]
    Failed {
        tap: String,
        what: &'static str,
        why: String,
        hint: &'static str,
    },
    #[error("egress policy: this NIC has no TAP (a user-mode network), and rvm's own policy stage for one is not built yet")]
    NoTap,
    #[error("egress policy: the VM has ended")]
    Closed,
    #[error("egress policy: {0}")]
    Stage(crate::net::stage::StageError),
    #[error(
        "egress policy on TAP {tap}: a TAP name with {bad:?} cannot be written in an nft rule"
    )]
    BadName { tap: String, bad: char },
}

/// Packets one rule (or the default) has matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCount {
    /// `allow=RULE` / `deny=RULE` as given, `sandbox` (its networks),
    /// `sandbox tcp/25`, or `egress=DEFAULT`.
    pub rule: String,
    pub action: Action,
    pub packets: u64,
}

/// The policy of one TAP, in the kernel while this lives.
pub struct KernelEgress {
    /// The nft program (RVM_NFT, or nft from PATH).
    nft: std::ffi::OsString,
    tap: String,
    table: String,
    policy: EgressPolicy,
    /// Whether the tables went in (a failed install leaves nothing to
    /// take away).
    installed: bool,
}

impl NftError {
    /// Whether nft failed for want of permission (no CAP_NET_ADMIN).
    pub fn is_permission(&self) -> bool {
        matches!(self, NftError::Failed { why, .. } if why.contains("Operation not permitted"))
    }
}

impl KernelEgress {
    /// Puts `policy` in place for TAP `tap` (replacing whatever an earlier
    /// rvm left for that name).
    pub fn install(tap: &str, policy: EgressPolicy) -> Result<Self, NftError> {
        let nft = std::env::var_os("RVM_NFT").unwrap_or_else(|| NFT.into());
        Self::install_with(nft, tap, policy)
    }

    fn install_with(
        nft: std::ffi::OsString,
        tap: &str,
        policy: EgressPolicy,
    ) -> Result<Self, NftError> {
        if let Some(bad) = tap.chars().find(|c| matches!(c, '"' | '\\' | '\n')) {
            return Err(NftError::BadName {
                tap: tap.into(),
                bad,
            });
        }
        let mut k = KernelEgress {
            nft,
            tap: tap.to_string(),
            table: table_name(tap),
            policy,
            installed: false,
        };
        k.apply(&k.render(&k.policy))?;
        k.installed = true;
        Ok(k)
    }

    pub fn policy(&self) -> &EgressPolicy {
        &self.policy
    }

    /// Replaces the policy in one transaction: new flows meet the new
    /// rules at once; flows already allowed go on (conntrack keeps them).
    /// The counts start again from zero.
    pub fn replace(&mut self, policy: EgressPolicy) -> Result<(), NftError> {
        self.apply(&self.render(&policy))?;
        self.policy = policy;
        Ok(())
    }

    /// What each rule has matched since the policy was set, in rule order,
    /// then the sandbox preset's, then the default's.
    pub fn counts(&self) -> Result<Vec<RuleCount>, NftError> {
        let mut packets = std::collections::HashMap::<String, u64>::new();
        for family in FAMILIES {
            let out = self.run(&["-j", "list", "table", family, &self.table], None)?;
            let json: serde_json::Value =
                serde_json::from_str(&out).map_err(|e| self.failed("reading counters", e))?;
            let items = json["nftables"].as_array().cloned().unwrap_or_default();
            for rule in items.iter().filter_map(|i| i.get("rule")) {
                let Some(tag) = rule["comment"].as_str() else {
                    continue;
                };
                let n: u64 = rule["expr"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e.get("counter")?.get("packets")?.as_u64())
                    .sum();
                *packets.entry(tag.to_string()).or_default() += n;
            }
        }
        Ok(labels(&self.policy)
            .into_iter()
            .map(|(tag, rule, action)| RuleCount {
                rule,
                action,
                packets: packets.remove(&tag).unwrap_or(0),
            })
            .collect())
    }

    /// Both tables for `policy`, replacing the old ones, as one script.
    fn render(&self, policy: &EgressPolicy) -> String {
        let mut s = reclaim(&self.table);
        let guest = guest_rules(policy);
        let t = &self.table;
        let tap = &self.tap;
        // `reject` answers TCP with a RST, the rest with ICMP(v6)
        // "administratively prohibited".
        let refuse = "chain refuse {\n\
                      \t\tmeta l4proto tcp reject with tcp reset\n\
                      \t\treject with icmpx admin-prohibited\n\
                      \t}";
        let _ = write!(
            s,
            "table bridge {t} {{\n\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority 0; policy accept;\n\
             \t\tiifname \"{tap}\" jump guest\n\
             \t}}\n\
             \t{refuse}\n\
             \tchain guest {{\n\
             \t\tether type arp accept\n\
             \t\t# VLAN tags, PPPoE and the rest: nothing the rules below could judge.\n\
             \t\tether type != {{ ip, ip6 }} drop\n\
             {guest}\
             \t}}\n\
             }}\n\
             table inet {t} {{\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority 0; policy accept;\n\
             \t\tiifname \"{tap}\" jump guest\n\
             \t}}\n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority 0; policy accept;\n\
             \t\tiifname \"{tap}\" jump guest\n\
             \t}}\n\
             \t{refuse}\n\
             \tchain guest {{\n\
             {guest}\
             \t}}\n\
             }}\n"
        );
        s
    }

    fn apply(&self, script: &str) -> Result<(), NftError> {
        self.run(&["-f", "-"], Some(script)).map(drop)
    }

    /// Runs nft with `args`, `stdin` on its standard input; its output.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
        let mut child = Command::new(&self.nft)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => NftError::Missing {
                    tap: self.tap.clone(),
                },
                _ => self.failed("starting nft", e),
            })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .map_err(|e| self.failed("writing to nft", e))?;
        }
        let out = child
            .wait_with_output()
            .map_err(|e| self.failed("waiting for nft", e))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            // nft prints the whole offending line and a caret line; the
            // first line says what went wrong.
            let why = stderr.lines().next().unwrap_or("").trim().to_string();
            let hint = if stderr.contains("Operation not permitted") {
                " (programming nftables needs CAP_NET_ADMIN in the TAP's network namespace)"
            } else if stderr.contains("No such file or directory")
                || stderr.contains("Operation not supported")
            {
                " (the kernel lacks nftables support: nf_tables, nf_conntrack_bridge, nft_reject_bridge, nft_reject_inet)"
            } else {
                ""
            };
            return Err(NftError::Failed {
                tap: self.tap.clone(),
                what: "nft",
                why: format!("{why} ({})", out.status),
                hint,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn failed(&self, what: &'static str, e: impl std::fmt::Display) -> NftError {
        NftError::Failed {
            tap: self.tap.clone(),
            what,
            why: e.to_string(),
            hint: "",
        }
    }
}

impl Drop for KernelEgress {
    /// Takes both tables away; one left by a crash is reclaimed by the
    /// next rvm on the TAP.
    fn drop(&mut self) {
        if !self.installed {
            return;
        }
        if let Err(e) = self.apply(&reclaim(&self.table)) {
            log::warn!("{e}; the table {} is left (the next rvm on this TAP replaces it, or: nft delete table bridge {0}; nft delete table inet {0})", self.table);
        }
    }
}

const FAMILIES: [&str; 2] = ["bridge", "inet"];

/// The tables' name: `rvm_egress_` and the TAP's name with every byte but
/// letters and digits as `_XX` (hex), so that no two TAPs share one.
pub fn table_name(tap: &str) -> String {
    let mut t = String::from("rvm_egress_");
    for b in tap.bytes() {
        if b.is_ascii_alphanumeric() {
            t.push(char::from(b));
        } else {
            let _ = write!(t, "_{b:02x}");
        }
    }
    t
}

/// Deletes both tables whether or not they exist (adding a table that
/// exists is no error, deleting one that does not is).
fn reclaim(table: &str) -> String {
    FAMILIES
        .iter()
        .map(|f| format!("add table {f} {table}\ndelete table {f} {table}\n"))
        .collect()
}

/// The guest chain's rules, shared by both families.
fn guest_rules(p: &EgressPolicy) -> String {
    let mut s = String::from(
        "\t\t# Replies, and flows the other side started.\n\
         \t\tct state established,related accept\n\
         \t\t# Neighbour discovery (and MLD, which it needs on a snooping bridge), DHCP.\n\
         \t\ticmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, \
         nd-neighbor-advert, nd-redirect, mld-listener-query, mld-listener-report, \
         mld-listener-done, mld2-listener-report } accept\n\
         \t\tudp sport 68 udp dport 67 accept\n\
         \t\tudp sport 546 udp dport 547 accept\n",
    );
    for (i, r) in p.rules.iter().enumerate() {
        let _ = writeln!(
            s,
            "\t\t{} counter {} comment \"rvm:{i}\"",
            matches(r),
            verdict(r.action)
        );
    }
    if p.default == EgressDefault::Sandbox {
        let nets = sandbox_networks();
        for (family, v4) in [("ip", true), ("ip6", false)] {
            let list: Vec<String> = nets
                .iter()
                .filter(|n| n.addr.is_ipv4() == v4)
                .map(Cidr::to_string)
                .collect();
            if !list.is_empty() {
                let _ = writeln!(
                    s,
                    "\t\t{family} daddr {{ {} }} counter jump refuse comment \"rvm:sandbox\"",
                    list.join(", ")
                );
            }
        }
        let _ = writeln!(
            s,
            "\t\ttcp dport {SANDBOX_TCP_PORT} counter jump refuse comment \"rvm:smtp\""
        );
    }
    let default = match p.default {
        EgressDefault::Deny => Action::Deny,
        _ => Action::Allow,
    };
    let _ = writeln!(
        s,
        "\t\tcounter {} comment \"rvm:default\"",
        verdict(default)
    );
    s
}

fn verdict(a: Action) -> &'static str {
    match a {
        Action::Allow => "accept",
        Action::Deny => "jump refuse",
    }
}

/// The nft match for a rule's destination, protocol and ports.
fn matches(r: &EgressRule) -> String {
    let v4 = r.net.addr.is_ipv4();
    let mut m = format!("{} daddr {}", if v4 { "ip" } else { "ip6" }, r.net);
    let ports = r.ports.map(|p| p.to_string());
    match (r.proto, ports) {
        (Some(Proto::Tcp), Some(p)) => m += &format!(" tcp dport {p}"),
        (Some(Proto::Udp), Some(p)) => m += &format!(" udp dport {p}"),
        (Some(Proto::Tcp), None) => m += " meta l4proto tcp",
        (Some(Proto::Udp), None) => m += " meta l4proto udp",
        (Some(Proto::Icmp), _) => {
            m += if v4 {
                " meta l4proto icmp"
            } else {
                " meta l4proto ipv6-icmp"
            }
        }
        (None, Some(p)) => m += &format!(" meta l4proto {{ tcp, udp }} th dport {p}"),
        (None, None) => {}
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(default: EgressDefault, rules: &[(Action, &str)]) -> EgressPolicy {
        let mut p = EgressPolicy::new(default);
        for (a, r) in rules {
            p = p.rule(*a, r).unwrap();
        }
        p
    }

    #[test]
    fn table_names_keep_taps_apart() {
        assert_eq!(table_name("tap0"), "rvm_egress_tap0");
        assert_eq!(table_name("tap-0"), "rvm_egress_tap_2d0");
        assert_eq!(table_name("tap_0"), "rvm_egress_tap_5f0");
        assert_ne!(table_name("a.b"), table_name("a_b"));
    }

    #[test]
    fn rules_become_nft_matches_in_order_before_the_default() {
        let p = policy(
            EgressDefault::Deny,
            &[
                (Action::Allow, "10.0.0.1:5001/tcp"),
                (Action::Deny, "192.0.2.0/24:53"),
                (Action::Allow, "2001:db8::/32/icmp"),
                (Action::Allow, "198.51.100.0/24/udp"),
            ],
        );
        let g = guest_rules(&p);
        let lines: Vec<&str> = g.lines().map(str::trim).collect();
        let at = |needle: &str| {
            lines
                .iter()
                .position(|l| l.contains(needle))
                .unwrap_or_else(|| panic!("{needle} not in\n{g}"))
        };
        let rules = [
            "ip daddr 10.0.0.1/32 tcp dport 5001 counter accept comment \"rvm:0\"",
            "ip daddr 192.0.2.0/24 meta l4proto { tcp, udp } th dport 53 counter jump refuse comment \"rvm:1\"",
            "ip6 daddr 2001:db8::/32 meta l4proto ipv6-icmp counter accept comment \"rvm:2\"",
            "ip daddr 198.51.100.0/24 meta l4proto udp counter accept comment \"rvm:3\"",
            "counter jump refuse comment \"rvm:default\"",
        ];
        let pos: Vec<usize> = rules.iter().map(|r| at(r)).collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]), "{g}");
        // Housekeeping comes first.
        assert!(at("ct state established,related accept") < pos[0]);
        assert!(at("udp sport 68 udp dport 67 accept") < pos[0]);
        assert!(at("nd-neighbor-solicit") < pos[0]);
        assert!(!g.contains("rvm:sandbox"));
    }

    #[test]
    fn the_sandbox_default_refuses_its_ranges_the_hosts_addresses_and_smtp() {
        let g = guest_rules(&policy(
            EgressDefault::Sandbox,
            &[(Action::Allow, "10.1.2.3/32")],
        ));
        let v4 = g
            .lines()
            .find(|l| l.contains("ip daddr {") && l.contains("rvm:sandbox"))
            .unwrap();
        for net in super::super::SANDBOX_V4 {
            assert!(v4.contains(net), "{net} not in {v4}");
        }
        // 127.0.0.1 is inside 127/8: no overlapping element (nft refuses
        // those in an anonymous set).
        assert!(!v4.contains("127.0.0.1/32"), "{v4}");
        for a in super::super::host_addrs::all() {
            let listed = super::super::sandbox_networks()
                .iter()
                .any(|n| n.contains(a));
            assert!(listed, "host address {a} not refused");
        }
        let v6 = g
            .lines()
            .find(|l| l.contains("ip6 daddr {") && l.contains("rvm:sandbox"))
            .unwrap();
        assert!(v6.contains("fc00::/7") && v6.contains("fe80::/10"), "{v6}");
        let allow = g.find("rvm:0").unwrap();
        assert!(
            allow < g.find("rvm:sandbox").unwrap(),
            "the explicit allow comes first"
        );
        assert!(g.contains("tcp dport 25 counter jump refuse comment \"rvm:smtp\""));
        assert!(g.contains("counter accept comment \"rvm:default\""));
    }

    #[test]
    fn a_missing_nft_says_how_to_install_it() {
        let e =
            KernelEgress::install_with("/nonexistent/nft".into(), "tap0", EgressPolicy::default())
                .err()
                .expect("no nft: an error")
                .to_string();
        assert!(e.contains("apt install nftables"), "{e}");
        let e = KernelEgress::install("ta\"p", EgressPolicy::default())
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot be written"), "{e}");
    }
}
