//! PCI configuration space through the 0xCF8/0xCFC root with a host
//! bridge, a virtio-net-pci function and an e1000 plugged in: any
//! CONFIG_ADDRESS, config reads and writes of any width at any offset
//! (BAR sizing probes and moves, command bits, the capability list,
//! MSI-X control), and accesses through the buses to wherever the BARs
//! are mapped now.

#![no_main]

use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvm::bus::{Bus, BusDevice};
use rvm::devices::e1000::{E1000Params, E1000};
use rvm::devices::test_backend::fake_tap;
use rvm::devices::virtio_net::fuzzing::SyncNet;
use rvm::devices::virtio_net::{NetParams, VirtioNet};
use rvm::devices::LevelIrq;
use rvm::pci::config::BarKind;
use rvm::pci::msix::{MsixTable, MsixVectors, NoRoutes};
use rvm::pci::root::{SharedDevice, PORT_LEN};
use rvm::pci::{HostBridge, PciRoot};
use rvm::virtio::VirtioPciDevice;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

const DEVICES: u8 = 3;

#[derive(Arbitrary, Debug)]
enum Op {
    /// CONFIG_ADDRESS, any value (disabled, other buses and functions).
    Address(u32),
    /// CONFIG_ADDRESS for a register of a plugged-in device (or the
    /// empty slot after them).
    Select {
        dev: u8,
        reg: u8,
    },
    ReadData {
        port: u8,
        len: u8,
    },
    WriteData {
        port: u8,
        len: u8,
        value: u32,
    },
    /// Linux's BAR sizing: all-ones, read back, restore.
    Probe {
        dev: u8,
        bar: u8,
    },
    /// An access at `offset` into a device's BAR, wherever it is now.
    Bar {
        dev: u8,
        bar: u8,
        offset: u32,
        len: u8,
        write: bool,
        value: u64,
    },
    /// An access anywhere on the port or memory bus.
    Bus {
        mmio: bool,
        addr: u64,
        len: u8,
        write: bool,
        value: u64,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

struct NoLine;
impl LevelIrq for NoLine {
    fn set_level(&self, _asserted: bool) {}
}

fn pio_len(x: u8) -> usize {
    [1, 2, 4][usize::from(x % 3)]
}

fn address(dev: u8, reg: u8) -> u32 {
    0x8000_0000 | (u32::from(dev % (DEVICES + 1)) << 11) | u32::from(reg & 0xfc)
}

fuzz_target!(|input: Input| {
    let mem = rvm::vmm::memory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (pio, mmio) = (Arc::new(Bus::new()), Arc::new(Bus::new()));
    let mut root = PciRoot::new(&pio, &mmio);

    let (tap, _peer) = fake_tap(true);
    let net = VirtioNet::new(
        NetParams {
            mac: [0x52, 0x54, 0, 0, 0, 1],
            mtu: 1500,
            name: "fuzz-net".into(),
        },
        tap,
        None,
    );
    let (net, _passes) = SyncNet::new(net);
    let fds = (0..4)
        .map(|i| (EventFd::new(libc::EFD_NONBLOCK).unwrap(), 24 + i))
        .collect();
    let msix = MsixTable::new(Arc::new(MsixVectors::new(fds)), Arc::new(NoRoutes));
    let virtio = VirtioPciDevice::new(Box::new(net), mem.clone(), None, 0xc000_0000, msix).unwrap();

    let (tap, _peer2) = fake_tap(false);
    let e1000 = E1000::new_synchronous(
        E1000Params {
            mac: [0x52, 0x54, 0, 0xe1, 0, 1],
            tap_name: None,
            mmio_addr: 0xc002_0000,
            io_addr: 0xc000,
            irq_line: 11,
            name: "fuzz-e1000".into(),
            seccomp: None,
        },
        mem,
        tap,
        Box::new(NoLine),
    )
    .unwrap();

    let devs: Vec<SharedDevice> = vec![
        Arc::new(Mutex::new(HostBridge::new())),
        Arc::new(Mutex::new(virtio)),
        Arc::new(Mutex::new(e1000)),
    ];
    for d in &devs {
        root.add(d.clone()).unwrap();
    }

    for op in &input.ops {
        match *op {
            Op::Address(a) => root.write(0, &a.to_le_bytes()),
            Op::Select { dev, reg } => root.write(0, &address(dev, reg).to_le_bytes()),
            Op::ReadData { port, len } => {
                let len = pio_len(len);
                let off = (4 + u64::from(port) % 4).min(PORT_LEN - len as u64);
                let mut b = [0u8; 4];
                root.read(off, &mut b[..len]);
            }
            Op::WriteData { port, len, value } => {
                let len = pio_len(len);
                let off = (4 + u64::from(port) % 4).min(PORT_LEN - len as u64);
                root.write(off, &value.to_le_bytes()[..len]);
            }
            Op::Probe { dev, bar } => {
                let reg = 0x10 + 4 * (bar % 6);
                root.write(0, &address(dev, reg).to_le_bytes());
                let mut saved = [0u8; 4];
                root.read(4, &mut saved);
                root.write(4, &[0xff; 4]);
                let mut sized = [0u8; 4];
                root.read(4, &mut sized);
                root.write(4, &saved);
            }
            Op::Bar {
                dev,
                bar,
                offset,
                len,
                write,
                value,
            } => {
                let d = &devs[usize::from(dev % DEVICES)];
                let (kind, base, size) = {
                    let d = d.lock().unwrap();
                    let c = d.config();
                    let bar = usize::from(bar % 6);
                    match (c.bar_kind(bar), c.bar_addr(bar), c.bar_size(bar)) {
                        (Some(k), Some(a), Some(s)) => (k, a, s),
                        _ => continue,
                    }
                };
                let len = rvm_fuzz::access_len(len);
                let addr = base.wrapping_add(u64::from(offset) % size);
                let bus = if kind == BarKind::Io { &pio } else { &mmio };
                access(bus, addr, len, write, value);
            }
            Op::Bus {
                mmio: on_mmio,
                addr,
                len,
                write,
                value,
            } => {
                let bus = if on_mmio { &mmio } else { &pio };
                access(bus, addr, rvm_fuzz::access_len(len), write, value);
            }
        }
    }
});

fn access(bus: &Bus, addr: u64, len: usize, write: bool, value: u64) {
    if write {
        bus.write(addr, &value.to_le_bytes()[..len]);
    } else {
        let mut b = [0u8; 8];
        bus.read(addr, &mut b[..len]);
    }
}
