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
pub mod packet;
mod rule;
pub mod stage;

use std::sync::{Arc, Mutex};

use crate::net::stage::{StageError, Stages};

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

/// The entries a policy counts, in order: each rule, the sandbox
/// preset's networks and port 25 when it is the default, then the
/// default; as (the nft rule's comment, what [`RuleCount::rule`] calls
/// it, its action).
fn labels(p: &EgressPolicy) -> Vec<(String, String, Action)> {
    let mut out: Vec<_> = p
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("rvm:{i}"), r.spec(), r.action))
        .collect();
    if p.default == EgressDefault::Sandbox {
        out.push(("rvm:sandbox".into(), "sandbox".into(), Action::Deny));
        out.push((
            "rvm:smtp".into(),
            format!("sandbox tcp/{SANDBOX_TCP_PORT}"),
            Action::Deny,
        ));
    }
    let action = match p.default {
        EgressDefault::Deny => Action::Deny,
        _ => Action::Allow,
    };
    out.push((
        "rvm:default".into(),
        format!("egress={}", p.default),
        action,
    ));
    out
}

/// Where a NIC's policy is enforced, as the controller changes it while
/// the VM runs: in the kernel (nftables on its TAP) or in a stage of
/// rvm's data path (a NIC rvm cannot have the kernel judge).
pub struct EgressControl {
    /// The TAP's name; None for a NIC without one (a user-mode network).
    tap: Option<String>,
    /// Whether a policy set later goes to the stage (the kernel refused,
    /// or there is no TAP).
    userspace: bool,
    /// rvm did not create the TAP: nft refused for want of permission
    /// means the stage, not an error.
    given: bool,
    slot: Mutex<Slot>,
}

struct Slot {
    enforcer: Enforcer,
    /// The NIC's stages, once it is plugged (a stage goes there).
    stages: Option<Stages>,
    /// The NIC is gone: its policy was taken away and none may come back.
    closed: bool,
}

enum Enforcer {
    None,
    Kernel(KernelEgress),
    /// In the NIC's stages (`Some` once plugged; the policy waits till then).
    Stage(Arc<stage::Shared>, bool),
}

/// A NIC's policy and what it has matched so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressInfo {
    pub policy: EgressPolicy,
    /// Where it is enforced: "nftables" (the host kernel) or "rvm" (a
    /// stage of rvm's data path).
    pub enforced_by: &'static str,
    /// Per explicit rule (in order), then the sandbox preset's when it is
    /// the default, then the default's: the packets each refused or let
    /// through since the policy was last set.
    pub counts: Vec<RuleCount>,
}

impl EgressControl {
    /// The policy of a NIC on TAP `tap` (None: no TAP), put in place now:
    /// in the kernel when it can be, else (no TAP, or no permission to
    /// program nftables for a TAP rvm was given) as a stage, which goes
    /// in when the NIC is plugged ([`EgressControl::attach`]).
    /// `given`: rvm did not create the TAP (an fd, or a persistent TAP
    /// of the user's): the one case where the kernel refusing is a reason
    /// to fall back rather than an error.
    pub fn start(
        tap: Option<&str>,
        policy: Option<EgressPolicy>,
        given: bool,
    ) -> Result<Self, NftError> {
        let mut userspace = tap.is_none();
        let enforcer = match (tap, policy) {
            (_, None) => Enforcer::None,
            (None, Some(p)) => Enforcer::Stage(stage::Shared::new(p), false),
            (Some(t), Some(p)) => match KernelEgress::install(t, p.clone()) {
                Ok(k) => Enforcer::Kernel(k),
                Err(e) if given && e.is_permission() => {
                    log::warn!(
                        "{e}: the policy runs in rvm's data path instead (it holds while rvm does; vhost-net is then off for this NIC)"
                    );
                    userspace = true;
                    Enforcer::Stage(stage::Shared::new(p), false)
                }
                Err(e) => return Err(e),
            },
        };
        Ok(EgressControl {
            tap: tap.map(str::to_string),
            userspace,
            given,
            slot: Mutex::new(Slot {
                enforcer,
                stages: None,
                closed: false,
            }),
        })
    }

    /// No policy, for a NIC without a TAP of rvm's (one set later runs as
    /// a stage).
    pub fn none() -> Self {
        EgressControl {
            tap: None,
            userspace: true,
            given: false,
            slot: Mutex::new(Slot {
                enforcer: Enforcer::None,
                stages: None,
                closed: false,
            }),
        }
    }

    /// The NIC is plugged with `stages`: a policy that runs as a stage
    /// goes in now, before the guest's first frame.
    pub fn attach(&self, stages: &Stages) -> Result<(), StageError> {
        let mut slot = crate::lock_or_recover(&self.slot);
        slot.stages = Some(stages.clone());
        if let Enforcer::Stage(shared, plugged @ false) = &mut slot.enforcer {
            let s = stage::EgressStage::new(shared.clone(), stages.injector().clone());
            stages.push(Box::new(s))?;
            *plugged = true;
        }
        Ok(())
    }

    /// Sets, replaces or (None) removes the policy while the guest runs:
    /// new connections meet it at once, flows already allowed go on.
    pub fn set(&self, policy: Option<EgressPolicy>) -> Result<(), NftError> {
        let mut slot = crate::lock_or_recover(&self.slot);
        if slot.closed {
            return Err(NftError::Closed);
        }
        let Some(policy) = policy else {
            if matches!(slot.enforcer, Enforcer::Stage(..)) {
                if let Some(st) = &slot.stages {
                    st.remove(stage::NAME);
                }
            }
            // Dropping a kernel policy takes its tables away.
            slot.enforcer = Enforcer::None;
            return Ok(());
        };
        match &mut slot.enforcer {
            Enforcer::Kernel(k) => return k.replace(policy),
            Enforcer::Stage(shared, _) => {
                shared.set(policy);
                return Ok(());
            }
            Enforcer::None => {}
        }
        if !self.userspace {
            let tap = self.tap.as_deref().ok_or(NftError::NoTap)?;
            match KernelEgress::install(tap, policy.clone()) {
                Ok(k) => {
                    slot.enforcer = Enforcer::Kernel(k);
                    return Ok(());
                }
                Err(e) if self.given && e.is_permission() => {
                    log::warn!("{e}: the policy runs in rvm's data path instead");
                }
                Err(e) => return Err(e),
            }
        }
        let shared = stage::Shared::new(policy);
        let mut plugged = false;
        if let Some(st) = &slot.stages {
            let s = stage::EgressStage::new(shared.clone(), st.injector().clone());
            st.push(Box::new(s)).map_err(NftError::Stage)?;
            plugged = true;
        }
        slot.enforcer = Enforcer::Stage(shared, plugged);
        Ok(())
    }

    /// Takes the policy away for good (the NIC is going), whoever else
    /// holds this control.
    pub fn close(&self) {
        let mut slot = crate::lock_or_recover(&self.slot);
        slot.closed = true;
        slot.enforcer = Enforcer::None;
    }

    /// The policy and its counts; None without one. Counts the kernel
    /// cannot give are logged and left out.
    pub fn info(&self) -> Option<EgressInfo> {
        let slot = crate::lock_or_recover(&self.slot);
        match &slot.enforcer {
            Enforcer::None => None,
            Enforcer::Kernel(k) => Some(EgressInfo {
                policy: k.policy().clone(),
                enforced_by: "nftables",
                counts: k.counts().unwrap_or_else(|e| {
                    log::warn!("{e}");
                    Vec::new()
                }),
            }),
            Enforcer::Stage(shared, _) => {
                let c = shared.current();
                Some(EgressInfo {
                    policy: c.policy.clone(),
                    enforced_by: "rvm",
                    counts: c.counts(),
                })
            }
        }
    }
}

pub use nft::NftError;
