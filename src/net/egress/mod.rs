//! Egress policy: what a guest may reach, per NIC (`egress=`, `allow=`,
//! `deny=`). The rules are data here; `nft` enforces them in the host
//! kernel, below the guest and below rvm (so they hold with vhost-net, and
//! would hold if a guest took over rvm's process).
//!
//! The model: explicit rules in the order given, first match wins, then
//! the default (`allow`, `deny`, or `sandbox`: refuse what a sandbox must
//! never reach, allow the rest). Only what the guest starts is judged:
//! replies to allowed flows and flows the other side started pass. ARP,
//! IPv6 neighbour discovery and DHCP always pass. A refused TCP connection
//! is answered with a RST, anything else with ICMP "administratively
//! prohibited", so a guest fails at once instead of timing out.

mod host_addrs;
mod nft;
mod rule;

use std::sync::Mutex;

pub use nft::{KernelEgress, RuleCount};
pub use rule::{Action, Cidr, EgressRule, PortRange, Proto, RuleError};

/// What happens to what no explicit rule matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EgressDefault {
    /// Everything else passes (explicit `deny=` rules still refuse).
    #[default]
    Allow,
    /// Everything else is refused (explicit `allow=` rules let through).
    Deny,
    /// [`SANDBOX_V4`], [`SANDBOX_V6`], every address of the host rvm runs
    /// on and TCP port 25 are refused; the rest passes.
    Sandbox,
}

impl std::str::FromStr for EgressDefault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(EgressDefault::Allow),
            "deny" => Ok(EgressDefault::Deny),
            "sandbox" => Ok(EgressDefault::Sandbox),
            _ => Err("expected allow, deny or sandbox".into()),
        }
    }
}

impl std::fmt::Display for EgressDefault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EgressDefault::Allow => "allow",
            EgressDefault::Deny => "deny",
            EgressDefault::Sandbox => "sandbox",
        })
    }
}

/// One NIC's policy: the rules in order, then the default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EgressPolicy {
    pub default: EgressDefault,
    pub rules: Vec<EgressRule>,
}

impl EgressPolicy {
    /// A policy with `default` and no rules.
    pub fn new(default: EgressDefault) -> Self {
        EgressPolicy {
            default,
            rules: Vec::new(),
        }
    }

    /// Adds a rule after the others (`allow=RULE` or `deny=RULE`).
    pub fn rule(mut self, action: Action, rule: &str) -> Result<Self, RuleError> {
        self.rules.push(EgressRule::parse(action, rule)?);
        Ok(self)
    }
}

/// IPv4 networks the sandbox default refuses: "this" network, the private
/// and shared (carrier-grade NAT) ranges, loopback, link-local (with the
/// clouds' metadata service, 169.254.169.254), multicast and reserved
/// (with broadcast).
pub const SANDBOX_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// IPv6 networks the sandbox default refuses: loopback, unique local (with
/// AWS's metadata address fd00:ec2::254), link-local and multicast.
pub const SANDBOX_V6: &[&str] = &["::1/128", "fc00::/7", "fe80::/10", "ff00::/8"];

/// TCP port the sandbox default refuses everywhere (mail submission by
/// a sandbox is spam).
pub const SANDBOX_TCP_PORT: u16 = 25;

/// The networks the sandbox default refuses on this host: the fixed ones
/// and each address of the host's (rvm's network namespace) not inside
/// them, as /32 or /128.
pub fn sandbox_networks() -> Vec<Cidr> {
    let mut nets: Vec<Cidr> = SANDBOX_V4
        .iter()
        .chain(SANDBOX_V6)
        .map(|s| s.parse().expect("the preset's networks are valid"))
        .collect();
    for addr in host_addrs::all() {
        if !nets.iter().any(|n| n.contains(addr)) {
            nets.push(Cidr::host(addr));
        }
    }
    nets
}

/// A NIC's policy in the kernel, as the controller changes it while the
/// VM runs.
pub struct EgressControl {
    /// The TAP's name; None for a NIC without one (a user-mode network).
    tap: Option<String>,
    kernel: Mutex<Slot>,
}

struct Slot {
    kernel: Option<KernelEgress>,
    /// The NIC is gone: its policy was taken away and none may come back.
    closed: bool,
}

/// A NIC's policy and what it has matched so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressInfo {
    pub policy: EgressPolicy,
    /// Where it is enforced: "nftables" (the host kernel).
    pub enforced_by: &'static str,
    /// Per explicit rule (in order), then the sandbox preset's when it is
    /// the default, then the default's: the packets each refused or let
    /// through since the policy was last set.
    pub counts: Vec<RuleCount>,
}

impl EgressControl {
    /// The control of TAP `tap`'s policy, `kernel` if it starts with one.
    pub fn new(tap: Option<String>, kernel: Option<KernelEgress>) -> Self {
        EgressControl {
            tap,
            kernel: Mutex::new(Slot {
                kernel,
                closed: false,
            }),
        }
    }

    /// Sets, replaces or (None) removes the policy while the guest runs:
    /// new connections meet it at once, flows already allowed go on.
    pub fn set(&self, policy: Option<EgressPolicy>) -> Result<(), NftError> {
        let mut slot = crate::lock_or_recover(&self.kernel);
        if slot.closed {
            return Err(NftError::Closed);
        }
        match (policy, slot.kernel.as_mut()) {
            (Some(p), Some(kernel)) => kernel.replace(p),
            (Some(p), None) => {
                let tap = self.tap.as_deref().ok_or(NftError::NoTap)?;
                slot.kernel = Some(KernelEgress::install(tap, p)?);
                Ok(())
            }
            (None, _) => {
                // Dropping it takes its tables away.
                slot.kernel = None;
                Ok(())
            }
        }
    }

    /// Takes the policy away for good (the NIC is going), whoever else
    /// holds this control.
    pub fn close(&self) {
        let mut slot = crate::lock_or_recover(&self.kernel);
        slot.closed = true;
        slot.kernel = None;
    }

    /// The policy and its counts; None without one. Counts the kernel
    /// cannot give are logged and left out.
    pub fn info(&self) -> Option<EgressInfo> {
        let slot = crate::lock_or_recover(&self.kernel);
        let k = slot.kernel.as_ref()?;
        Some(EgressInfo {
            policy: k.policy().clone(),
            enforced_by: "nftables",
            counts: k.counts().unwrap_or_else(|e| {
                log::warn!("{e}");
                Vec::new()
            }),
        })
    }
}

pub use nft::NftError;
