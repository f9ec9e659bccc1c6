//! The egress policy's userspace stage: frames a hostile guest sends (TX)
//! and a hostile peer sends (RX), through the parser, the flow table and
//! the answers. Every answer must be a frame of the refused flow, reversed.

#![no_main]

use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvm::net::egress::packet::{classify, refusal, Kind, HEAD};
use rvm::net::egress::stage::{EgressStage, Shared};
use rvm::net::egress::{Action, EgressDefault, EgressPolicy};
use rvm::net::stage::{Direction, Frame, Injector, Stage};

#[derive(Arbitrary, Debug)]
struct Input {
    default: u8,
    /// (to the guest, milliseconds later, the frame)
    frames: Vec<(bool, u16, Vec<u8>)>,
}

fuzz_target!(|input: Input| {
    let default = match input.default % 3 {
        0 => EgressDefault::Allow,
        1 => EgressDefault::Deny,
        _ => EgressDefault::Sandbox,
    };
    let policy = EgressPolicy::new(default)
        .rule(Action::Allow, "10.0.0.1:5001/tcp")
        .and_then(|p| p.rule(Action::Deny, "2001:db8::/32"))
        .and_then(|p| p.rule(Action::Allow, "0.0.0.0/0:53"))
        .expect("valid rules");
    let injector = Arc::new(Injector::default());
    let mut stage = EgressStage::new(Shared::new(policy), injector);
    let mut now = Instant::now();
    for (rx, ms, f) in input.frames.iter().take(512) {
        now += Duration::from_millis(u64::from(*ms));
        let dir = if *rx { Direction::Rx } else { Direction::Tx };
        stage.frame(dir, &Frame::Bytes(f), now);
        if let Some(answer) = refusal(&f[..f.len().min(HEAD)], f.len()) {
            // An answer is a frame of the same flow the other way.
            let (Kind::Ip { flow, .. }, Kind::Ip { flow: back, .. }) = (
                classify(&f[..f.len().min(HEAD)], f.len()),
                classify(&answer, answer.len()),
            ) else {
                panic!("an answer that does not parse: {answer:?}");
            };
            assert_eq!((back.src, back.dst), (flow.dst, flow.src));
            if flow.proto == rvm::net::egress::packet::TCP {
                assert_eq!((back.sport, back.dport), (flow.dport, flow.sport));
            } else {
                assert!(matches!(back.proto, 1 | 58), "answered with {}", back.proto);
            }
        }
    }
});
