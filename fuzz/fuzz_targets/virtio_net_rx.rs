//! The virtio-net RX path: hostile RX chains (merged buffers or not, with
//! or without the TAP's vnet header) against arbitrary frames from the
//! host, each pass run as the worker would run it when the TAP is readable.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvm_fuzz::{run_net, Focus, NetOp, NetRig, Setup};

#[derive(Arbitrary, Debug)]
struct Input {
    setup: Setup,
    ops: Vec<NetOp>,
}

fuzz_target!(|input: Input| {
    let mut rig = NetRig::ready(&input.setup);
    run_net(&mut rig, Focus::Rx, &input.ops);
    rig.passes.rx();
});
