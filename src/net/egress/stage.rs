//! The egress policy as a stage of rvm's own data path, for a NIC whose
//! frames rvm cannot have the kernel judge: a user-mode network (no TAP
//! at all) or a TAP fd passed without CAP_NET_ADMIN. The same rules and
//! the same answers as the nftables tables: what the guest starts is
//! judged, the first rule that matches wins, flows already allowed and
//! flows the other side started pass (a flow table in place of
//! conntrack), ARP, neighbour discovery and DHCP pass, a refused TCP
//! connection gets a RST and the rest an ICMP "administratively
//! prohibited" (through the stages' injector), anything not IPv4, IPv6 or
//! ARP is dropped.
//!
//! Differences from conntrack, said here so that nobody has to find them:
//! an ICMP error the guest sends is judged by its destination like any
//! packet (conntrack lets one through as related to a known flow), and a
//! flow is forgotten after [`IDLE`] without a frame either way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::packet::{self, Flow, FragKey, Kind, HEAD};
use super::{labels, sandbox_networks, Action, Cidr, EgressDefault, EgressPolicy, Proto};
use super::{RuleCount, SANDBOX_TCP_PORT};
use crate::net::stage::{Direction, Frame, Injector, Stage, Verdict};

/// A flow without a frame for this long is forgotten (a TCP connection
/// idle longer than this, started by the other side, would then be judged
/// again; one the guest started passes again if the rules allow it).
pub const IDLE: Duration = Duration::from_secs(600);
/// Flows remembered at most; when full, idle ones go first, and a new one
/// that does not fit is not remembered (its frames are judged each time).
const MAX_FLOWS: usize = 16_384;
/// A first fragment lets the rest of its datagram through for this long.
const FRAGMENT_WINDOW: Duration = Duration::from_secs(5);
const MAX_FRAGMENTS: usize = 1024;
/// Bytes read of each frame first: Ethernet, IPv6 and a TCP header with
/// room to spare (IPv4 options, a few IPv6 extension headers).
const FIRST_READ: usize = 128;

/// The policy the stage applies now, with what it has matched.
pub struct Compiled {
    pub policy: EgressPolicy,
    /// The sandbox default's networks (host addresses as of when the
    /// policy was set), empty for other defaults.
    sandbox: Vec<Cidr>,
    /// Per label of [`labels`]: packets judged by it.
    counts: Vec<AtomicU64>,
}

impl Compiled {
    pub fn new(policy: EgressPolicy) -> Self {
        let sandbox = if policy.default == EgressDefault::Sandbox {
            sandbox_networks()
        } else {
            Vec::new()
        };
        let counts = labels(&policy).iter().map(|_| AtomicU64::new(0)).collect();
        Compiled {
            policy,
            sandbox,
            counts,
        }
    }

    /// Which label decides `flow`, and how.
    fn judge(&self, flow: &Flow) -> (usize, Action) {
        let p = &self.policy;
        if let Some((i, r)) = p.rules.iter().enumerate().find(|(_, r)| matches(r, flow)) {
            return (i, r.action);
        }
        let mut at = p.rules.len();
        if p.default == EgressDefault::Sandbox {
            if self.sandbox.iter().any(|n| n.contains(flow.dst)) {
                return (at, Action::Deny);
            }
            if flow.proto == packet::TCP && flow.dport == SANDBOX_TCP_PORT {
                return (at + 1, Action::Deny);
            }
            at += 2;
        }
        let action = match p.default {
            EgressDefault::Deny => Action::Deny,
            _ => Action::Allow,
        };
        (at, action)
    }

    pub fn counts(&self) -> Vec<RuleCount> {
        labels(&self.policy)
            .into_iter()
            .zip(&self.counts)
            .map(|((_, rule, action), n)| RuleCount {
                rule,
                action,
                packets: n.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Whether `r` matches `flow` (its destination, protocol and ports).
fn matches(r: &super::EgressRule, flow: &Flow) -> bool {
    if !r.net.contains(flow.dst) {
        return false;
    }
    let proto_ok = match r.proto {
        Some(Proto::Tcp) => flow.proto == packet::TCP,
        Some(Proto::Udp) => flow.proto == packet::UDP,
        Some(Proto::Icmp) => flow.proto == packet::ICMP || flow.proto == packet::ICMPV6,
        // Ports without a protocol: TCP and UDP.
        None if r.ports.is_some() => flow.proto == packet::TCP || flow.proto == packet::UDP,
        None => true,
    };
    proto_ok && r.ports.is_none_or(|p| (p.lo..=p.hi).contains(&flow.dport))
}

/// What the control and the stage share: the policy, replaced whole.
pub struct Shared {
    current: Mutex<Arc<Compiled>>,
    /// Bumped at each change, so the stage looks at `current` only then.
    generation: AtomicU64,
}

impl Shared {
    pub fn new(policy: EgressPolicy) -> Arc<Self> {
        Arc::new(Shared {
            current: Mutex::new(Arc::new(Compiled::new(policy))),
            generation: AtomicU64::new(0),
        })
    }

    pub fn set(&self, policy: EgressPolicy) {
        *crate::lock_or_recover(&self.current) = Arc::new(Compiled::new(policy));
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn current(&self) -> Arc<Compiled> {
        crate::lock_or_recover(&self.current).clone()
    }
}

/// The stage's name (in counters, and to take it out).
pub const NAME: &str = "egress-policy";

/// The stage on one NIC.
pub struct EgressStage {
    shared: Arc<Shared>,
    compiled: Arc<Compiled>,
    generation: u64,
    injector: Arc<Injector>,
    /// Flows as the guest sees them (the guest's end as the source), with
    /// when a frame last went either way.
    flows: HashMap<Flow, Instant>,
    fragments: HashMap<FragKey, Instant>,
    head: Box<[u8; HEAD]>,
}

impl EgressStage {
    pub fn new(shared: Arc<Shared>, injector: Arc<Injector>) -> Self {
        let compiled = shared.current();
        EgressStage {
            generation: shared.generation.load(Ordering::SeqCst),
            shared,
            compiled,
            injector,
            flows: HashMap::new(),
            fragments: HashMap::new(),
            head: Box::new([0; HEAD]),
        }
    }

    /// Remembers `flow` (guest side first), if there is room.
    fn remember(&mut self, flow: Flow, now: Instant) {
        if self.flows.len() >= MAX_FLOWS && !self.flows.contains_key(&flow) {
            // One sweep per time the table fills: bounded by its size.
            self.flows.retain(|_, t| now.duration_since(*t) < IDLE);
            if self.flows.len() >= MAX_FLOWS {
                return;
            }
        }
        self.flows.insert(flow, now);
    }

    /// Whether `flow` is one that was allowed or that the other side
    /// started, and not idle too long.
    fn known(&mut self, flow: &Flow, now: Instant) -> bool {
        match self.flows.get_mut(flow) {
            Some(t) if now.duration_since(*t) < IDLE => {
                *t = now;
                true
            }
            Some(_) => {
                self.flows.remove(flow);
                false
            }
            None => false,
        }
    }

    fn remember_fragment(&mut self, key: FragKey, now: Instant) {
        if self.fragments.len() >= MAX_FRAGMENTS {
            self.fragments
                .retain(|_, t| now.duration_since(*t) < FRAGMENT_WINDOW);
            if self.fragments.len() >= MAX_FRAGMENTS {
                return;
            }
        }
        self.fragments.insert(key, now);
    }

    /// Reads the frame's headers into `head` and says what it is: the
    /// first [`FIRST_READ`] bytes hold them for all but IPv6 with long
    /// extension headers, which get a second, longer read.
    fn classify(&mut self, frame: &Frame<'_>) -> (Kind, usize) {
        let mut n = frame.read(0, &mut self.head[..FIRST_READ]);
        let mut kind = packet::classify(&self.head[..n], frame.len());
        if kind == Kind::Unjudgeable && n == FIRST_READ {
            n += frame.read(n, &mut self.head[n..]);
            kind = packet::classify(&self.head[..n], frame.len());
        }
        (kind, n)
    }

    fn transmit(&mut self, frame: &Frame<'_>, now: Instant) -> Verdict {
        let (kind, mut n) = self.classify(frame);
        match kind {
            Kind::Housekeeping => Verdict::Pass,
            Kind::Unjudgeable => Verdict::Drop,
            Kind::LaterFragment(key) => match self.fragments.get(&key) {
                Some(t) if now.duration_since(*t) < FRAGMENT_WINDOW => Verdict::Pass,
                _ => Verdict::Drop,
            },
            Kind::Ip {
                flow,
                first_fragment,
            } => {
                let pass = if self.known(&flow, now) {
                    true
                } else {
                    let (label, action) = self.compiled.judge(&flow);
                    if let Some(c) = self.compiled.counts.get(label) {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    if action == Action::Allow {
                        self.remember(flow, now);
                    }
                    action == Action::Allow
                };
                if !pass {
                    // The answer may quote more than the headers.
                    if n < HEAD {
                        n += frame.read(n, &mut self.head[n..]);
                    }
                    if let Some(answer) = packet::refusal(&self.head[..n], frame.len()) {
                        self.injector.push(answer);
                    }
                    return Verdict::Drop;
                }
                if let Some(key) = first_fragment {
                    self.remember_fragment(key, now);
                }
                Verdict::Pass
            }
        }
    }
}

impl Stage for EgressStage {
    fn name(&self) -> &str {
        NAME
    }

    fn frame(&mut self, dir: Direction, frame: &Frame<'_>, now: Instant) -> Verdict {
        let generation = self.shared.generation.load(Ordering::Relaxed);
        if generation != self.generation {
            self.generation = generation;
            self.compiled = self.shared.current();
        }
        match dir {
            Direction::Tx => self.transmit(frame, now),
            Direction::Rx => {
                // What comes to the guest always passes; a flow the other
                // side starts is remembered, so the guest may answer.
                if let (Kind::Ip { flow, .. }, _) = self.classify(frame) {
                    let mine = flow.reverse();
                    if !self.known(&mine, now) {
                        self.remember(mine, now);
                    }
                }
                Verdict::Pass
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 0x52, 0x54, 0, 0, 0, 2, 0x08, 0x00];
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = packet::TCP;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        f.extend_from_slice(&ip);
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        f.extend_from_slice(&t);
        f
    }

    fn stage(policy: EgressPolicy) -> (EgressStage, Arc<Shared>, Arc<Injector>) {
        let shared = Shared::new(policy);
        let inj = Arc::new(Injector::default());
        (EgressStage::new(shared.clone(), inj.clone()), shared, inj)
    }

    fn tx(s: &mut EgressStage, f: &[u8]) -> Verdict {
        s.frame(Direction::Tx, &Frame::Bytes(f), Instant::now())
    }

    const GUEST: [u8; 4] = [10, 0, 0, 2];

    #[test]
    fn deny_with_one_allow_refuses_the_rest_with_a_rst_and_counts() {
        let p = EgressPolicy::new(EgressDefault::Deny)
            .rule(Action::Allow, "10.0.0.1:5001/tcp")
            .unwrap();
        let (mut s, shared, inj) = stage(p);
        assert_eq!(
            tx(&mut s, &frame_tcp(GUEST, [10, 0, 0, 1], 40000, 5001, 2)),
            Verdict::Pass
        );
        assert!(!inj.pending());
        assert_eq!(
            tx(&mut s, &frame_tcp(GUEST, [10, 0, 0, 1], 40001, 5002, 2)),
            Verdict::Drop
        );
        assert!(inj.pending(), "a RST for the guest");
        // The allowed flow's later segments pass without being judged.
        assert_eq!(
            tx(&mut s, &frame_tcp(GUEST, [10, 0, 0, 1], 40000, 5001, 0x10)),
            Verdict::Pass
        );
        let counts = shared.current().counts();
        let by = |r: &str| counts.iter().find(|c| c.rule == r).unwrap().packets;
        assert_eq!(by("allow=10.0.0.1/32:5001/tcp"), 1);
        assert_eq!(by("egress=deny"), 1);
    }

    #[test]
    fn flows_the_other_side_starts_pass_and_policy_changes_spare_allowed_flows() {
        let (mut s, shared, _) = stage(EgressPolicy::new(EgressDefault::Deny));
        let outside = [192, 0, 2, 2];
        // The outside connects to the guest's port 6000: its SYN comes in.
        let syn = frame_tcp(outside, GUEST, 50000, 6000, 2);
        assert_eq!(
            s.frame(Direction::Rx, &Frame::Bytes(&syn), Instant::now()),
            Verdict::Pass
        );
        assert_eq!(
            tx(&mut s, &frame_tcp(GUEST, outside, 6000, 50000, 0x12)),
            Verdict::Pass
        );
        // A flow allowed under the old policy goes on under a new one.
        shared.set(EgressPolicy::new(EgressDefault::Allow));
        assert_eq!(
            tx(&mut s, &frame_tcp(GUEST, outside, 41000, 80, 2)),
            Verdict::Pass
        );
        shared.set(EgressPolicy::new(EgressDefault::Deny));
        assert_eq!(
            tx(&mut s, &frame_tcp(GUEST, outside, 41000, 80, 0x10)),
            Verdict::Pass
        );
        assert_eq!(
            tx(&mut s, &frame_tcp(GUEST, outside, 41001, 80, 2)),
            Verdict::Drop
        );
    }

    #[test]
    fn the_sandbox_refuses_private_ranges_and_smtp_but_an_allow_wins() {
        let p = EgressPolicy::new(EgressDefault::Sandbox)
            .rule(Action::Allow, "10.0.0.1:53/udp")
            .unwrap();
        let c = Compiled::new(p);
        let flow = |dst: [u8; 4], proto, dport| Flow {
            src: GUEST.into(),
            dst: dst.into(),
            proto,
            sport: 40000,
            dport,
        };
        assert_eq!(
            c.judge(&flow([10, 0, 0, 1], packet::UDP, 53)).1,
            Action::Allow
        );
        assert_eq!(
            c.judge(&flow([10, 0, 0, 1], packet::TCP, 53)).1,
            Action::Deny
        );
        assert_eq!(
            c.judge(&flow([169, 254, 169, 254], packet::TCP, 80)).1,
            Action::Deny
        );
        assert_eq!(
            c.judge(&flow([192, 168, 1, 1], packet::TCP, 443)).1,
            Action::Deny
        );
        assert_eq!(
            c.judge(&flow([198, 51, 100, 7], packet::TCP, 443)).1,
            Action::Allow
        );
        assert_eq!(
            c.judge(&flow([198, 51, 100, 7], packet::TCP, 25)),
            (2, Action::Deny)
        );
        assert_eq!(
            c.judge(&flow([198, 51, 100, 7], packet::UDP, 25)).1,
            Action::Allow
        );
    }

    #[test]
    fn what_cannot_be_judged_is_dropped_and_housekeeping_passes() {
        let (mut s, _, inj) = stage(EgressPolicy::new(EgressDefault::Allow));
        let mut vlan = frame_tcp(GUEST, [10, 0, 0, 1], 1, 2, 2);
        vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
        assert_eq!(tx(&mut s, &vlan), Verdict::Drop);
        let mut arp = vlan.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(tx(&mut s, &arp), Verdict::Pass);
        assert!(!inj.pending());
    }

    #[test]
    fn the_flow_table_stays_bounded() {
        let (mut s, _, _) = stage(EgressPolicy::new(EgressDefault::Allow));
        for port in 0..(MAX_FLOWS as u32 + 100) {
            let f = frame_tcp(
                GUEST,
                [198, 51, 100, 7],
                (port % 60000) as u16 + 1,
                (port / 60000) as u16 + 1,
                2,
            );
            assert_eq!(tx(&mut s, &f), Verdict::Pass);
        }
        assert!(s.flows.len() <= MAX_FLOWS);
    }
}
