//! The virtio-net TX path (and the control queue beside it): descriptor
//! tables, available rings and chains written by a hostile driver, each
//! pass run as the worker would run it on a kick.

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
    run_net(&mut rig, Focus::Tx, &input.ops);
    // Whatever the driver left posted goes through one last pass.
    rig.passes.tx();
});
