//! The virtio-pci BAR of a virtio-net NIC: common configuration, ISR,
//! device configuration, notifications, MSI-X table and PBA, driven by
//! MMIO reads and writes of any offset, width and value: status
//! transitions in any order, queues programmed with random addresses and
//! sizes, and the data path run on whatever that activates.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvm::pci::PciDevice;
use rvm::virtio::sim::DATA_START;
use rvm_fuzz::{access_len, frame, Addr, NetRig, Setup};

const BAR_SIZE: u64 = 0x8000;

/// Where in the BAR: by region, so that each gets its share.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum At {
    Common(u8),
    Isr(u8),
    Device(u16),
    Notify(u16),
    MsixTable(u16),
    Pba(u16),
    Any(u16),
}

impl At {
    fn offset(self) -> u64 {
        match self {
            At::Common(x) => u64::from(x) % 0x48,
            At::Isr(x) => 0x1000 + u64::from(x) % 8,
            At::Device(x) => 0x2000 + u64::from(x) % 0x1000,
            At::Notify(x) => 0x3000 + u64::from(x) % 0x1000,
            At::MsixTable(x) => 0x4000 + u64::from(x) % 0x2000,
            At::Pba(x) => 0x6000 + u64::from(x) % 0x2000,
            At::Any(x) => u64::from(x) % BAR_SIZE,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        at: At,
        len: u8,
    },
    Write {
        at: At,
        len: u8,
        value: u64,
    },
    /// device_status, any value.
    Status(u8),
    QueueSelect(u16),
    QueueSize(u16),
    QueueEnable(u16),
    QueueVector(u16),
    ConfigVector(u16),
    /// The selected queue's three addresses, each as two dword halves.
    QueueAddrs {
        desc: Addr,
        avail: Addr,
        used: Addr,
    },
    DriverFeatures {
        select: u32,
        value: u32,
    },
    /// MSI-X message control in config space (enable, function mask).
    MsixControl(u16),
    /// A well-behaved driver's whole initialisation.
    Init(Setup),
    /// The worker's passes, on whatever the driver activated.
    Passes,
    HostFrame {
        len: u16,
    },
    Poke {
        at: Addr,
        bytes: Vec<u8>,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    vnet: bool,
    /// Queue pairs beyond the first (modulo 3): the common configuration
    /// then has 2N+1 queues and MQ among the features.
    more_pairs: u8,
    ops: Vec<Op>,
}

fn msix_control(rig: &mut NetRig, value: u16) {
    let cfg = rig.drv.pci.config();
    let mut cap = usize::from(cfg.bytes()[rvm::pci::config::CAPABILITIES_POINTER]);
    // The list is the device's own: bounded by the config space anyway.
    for _ in 0..48 {
        if cap == 0 || cap + 4 > 256 {
            return;
        }
        if cfg.bytes()[cap] == rvm::pci::msix::CAP_ID {
            let v = value.to_le_bytes();
            rig.drv.pci.config_mut().write(cap + 2, &v);
            rig.drv.pci.config_written(cap + 2, &v);
            return;
        }
        cap = usize::from(cfg.bytes()[cap + 1]);
    }
}

fuzz_target!(|input: Input| {
    let mut rig = NetRig::new(input.vnet, 1 + usize::from(input.more_pairs % 3));
    let size = rig.mem_size;
    for op in &input.ops {
        match *op {
            Op::Read { at, len } => {
                let len = access_len(len);
                let off = at.offset().min(BAR_SIZE - len as u64);
                let mut b = [0u8; 8];
                rig.drv.read(off, &mut b[..len]);
            }
            Op::Write { at, len, value } => {
                let len = access_len(len);
                let off = at.offset().min(BAR_SIZE - len as u64);
                rig.drv.write(off, &value.to_le_bytes()[..len]);
            }
            Op::Status(s) => rig.drv.write(0x14, &[s]),
            Op::QueueSelect(q) => rig.drv.write(0x16, &q.to_le_bytes()),
            Op::QueueSize(s) => rig.drv.write(0x18, &s.to_le_bytes()),
            Op::QueueVector(v) => rig.drv.write(0x1a, &v.to_le_bytes()),
            Op::QueueEnable(e) => rig.drv.write(0x1c, &e.to_le_bytes()),
            Op::ConfigVector(v) => rig.drv.write(0x10, &v.to_le_bytes()),
            Op::QueueAddrs { desc, avail, used } => {
                for (off, a) in [(0x20, desc), (0x28, avail), (0x30, used)] {
                    let a = a.resolve(size, DATA_START, 0x10_0000);
                    rig.drv.write(off, &(a as u32).to_le_bytes());
                    rig.drv.write(off + 4, &((a >> 32) as u32).to_le_bytes());
                }
            }
            Op::DriverFeatures { select, value } => {
                rig.drv.write(0x08, &select.to_le_bytes());
                rig.drv.write(0x0c, &value.to_le_bytes());
            }
            Op::MsixControl(v) => msix_control(&mut rig, v),
            Op::Init(ref setup) => rig.init(setup),
            Op::Passes => {
                rig.passes.tx();
                rig.passes.rx();
                rig.passes.ctrl();
                rig.host_drain();
            }
            Op::HostFrame { len } => rig.host_send(&frame(&[0xff; 6], len, 0)),
            Op::Poke { at, ref bytes } => rig.poke(at.resolve(size, DATA_START, 0x10_0000), bytes),
        }
    }
});
