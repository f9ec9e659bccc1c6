//! The e1000: its register file through both windows (the MMIO BAR and
//! the IOADDR/IODATA I/O window) with any offset, width and value, and
//! TX and RX descriptor rings programmed (TDBA/TDLEN/TDH/TDT, RDBA/...)
//! and filled with whatever the fuzzer likes; the NIC thread's TX and RX
//! work runs when the input says.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rvm::devices::e1000::regs::*;
use rvm::devices::e1000::{E1000Params, E1000, IO_SIZE, MMIO_SIZE};
use rvm::devices::test_backend::{fake_tap, peer_try_send};
use rvm::devices::LevelIrq;
use rvm::pci::PciDevice;
use rvm_fuzz::{access_len, frame, poke, Addr, ScriptedStage};
use vm_memory::GuestAddress;

const MEM: u64 = 2 << 20;
const RINGS: u64 = 0x1000;
const DATA: u64 = 0x4_0000;

/// Registers a driver uses, so that the fuzzer need not find them.
const KNOWN: &[u32] = &[
    CTRL,
    STATUS,
    EECD,
    EERD,
    CTRL_EXT,
    MDIC,
    VET,
    ICR,
    ICS,
    IMS,
    IMC,
    RCTL,
    TCTL,
    RDBAL,
    RDBAH,
    RDLEN,
    RDH,
    RDT,
    TDBAL,
    TDBAH,
    TDLEN,
    TDH,
    TDT,
    RXCSUM,
    MTA,
    RA,
    RA + 4,
    VFTA,
    STAT_GPRC,
    STAT_GORCH,
    STAT_TOTH,
];

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Reg {
    Known(u8),
    Any(u32),
}

impl Reg {
    fn offset(self) -> u64 {
        match self {
            Reg::Known(i) => u64::from(KNOWN[usize::from(i) % KNOWN.len()]),
            Reg::Any(x) => u64::from(x) % MMIO_SIZE,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Mmio {
        write: bool,
        reg: Reg,
        len: u8,
        value: u32,
    },
    Io {
        write: bool,
        off: u8,
        len: u8,
        value: u32,
    },
    /// TDBAL/TDBAH, TDLEN (in descriptors), TDH, TDT, then TCTL.
    TxRing {
        base: Addr,
        count: u16,
        head: u16,
        tail: u16,
        tctl: u32,
    },
    RxRing {
        base: Addr,
        count: u16,
        head: u16,
        tail: u16,
        rctl: u32,
    },
    /// Descriptor `slot` of the ring as programmed now.
    TxDesc {
        slot: u16,
        addr: Addr,
        rest: [u8; 8],
    },
    RxDesc {
        slot: u16,
        addr: Addr,
        rest: [u8; 8],
    },
    Poke {
        at: Addr,
        bytes: Vec<u8>,
    },
    HostFrame {
        head: Vec<u8>,
        len: u16,
        extra: u8,
    },
    Transmit,
    Receive,
}

#[derive(Arbitrary, Debug)]
struct Input {
    vnet: bool,
    /// A stage's verdicts (rvm_fuzz::ScriptedStage), none when empty.
    stage: Vec<u8>,
    ops: Vec<Op>,
}

struct NoLine;
impl LevelIrq for NoLine {
    fn set_level(&self, _asserted: bool) {}
}

fn w(dev: &mut E1000, reg: u32, v: u32) {
    dev.bar_write(0, u64::from(reg), &v.to_le_bytes());
}

fn r(dev: &mut E1000, reg: u32) -> u32 {
    let mut b = [0u8; 4];
    dev.bar_read(0, u64::from(reg), &mut b);
    u32::from_le_bytes(b)
}

/// Where descriptor `slot` of the ring at (`bal`, `bah`, `len`) is.
fn desc_addr(dev: &mut E1000, bal: u32, bah: u32, len: u32, slot: u16) -> u64 {
    let base = u64::from(r(dev, bal)) | (u64::from(r(dev, bah)) << 32);
    let count = u64::from(r(dev, len) / 16).max(1);
    base.wrapping_add(16 * (u64::from(slot) % count))
}

fn desc(addr: u64, rest: &[u8; 8]) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..].copy_from_slice(rest);
    d
}

fn drain(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 1 << 17];
    for _ in 0..1024 {
        // SAFETY: buf is a live, writable buffer of the given length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            break;
        }
    }
}

fuzz_target!(|input: Input| {
    let mem = rvm::vmm::memory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    let (tap, peer) = fake_tap(input.vnet);
    let mut dev = E1000::new_synchronous(
        E1000Params {
            mac: [0x52, 0x54, 0, 0xe1, 0, 1],
            tap_name: None,
            mmio_addr: 0xe000_0000,
            io_addr: 0xc000,
            irq_line: 11,
            name: "fuzz-e1000".into(),
            seccomp: None,
        },
        mem.clone(),
        tap,
        Box::new(NoLine),
    )
    .unwrap();
    if let Some(s) = ScriptedStage::boxed(&input.stage) {
        dev.stages()
            .push(s)
            .expect("the e1000 has no kernel data path");
    }
    // Memory space and bus mastering on, as Linux's probe leaves them.
    {
        use rvm::pci::config::{COMMAND, COMMAND_BUS_MASTER, COMMAND_IO, COMMAND_MEMORY};
        let cmd = (COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER).to_le_bytes();
        dev.config_mut().write(COMMAND, &cmd);
        dev.config_written(COMMAND, &cmd);
    }
    let at = |a: Addr| a.resolve(MEM, DATA, RINGS);
    for op in &input.ops {
        match *op {
            Op::Mmio {
                write,
                reg,
                len,
                value,
            } => {
                let len = access_len(len);
                let off = reg.offset().min(MMIO_SIZE - len as u64);
                let v = u64::from(value).to_le_bytes();
                if write {
                    dev.bar_write(0, off, &v[..len]);
                } else {
                    let mut b = [0u8; 8];
                    dev.bar_read(0, off, &mut b[..len]);
                }
            }
            Op::Io {
                write,
                off,
                len,
                value,
            } => {
                let len = access_len(len);
                let off = (u64::from(off) % IO_SIZE).min(IO_SIZE - len as u64);
                let v = u64::from(value).to_le_bytes();
                if write {
                    dev.bar_write(1, off, &v[..len]);
                } else {
                    let mut b = [0u8; 8];
                    dev.bar_read(1, off, &mut b[..len]);
                }
            }
            Op::TxRing {
                base,
                count,
                head,
                tail,
                tctl,
            } => {
                let base = at(base);
                w(&mut dev, TDBAL, base as u32);
                w(&mut dev, TDBAH, (base >> 32) as u32);
                w(&mut dev, TDLEN, u32::from(count) * 16);
                w(&mut dev, TDH, u32::from(head));
                w(&mut dev, TDT, u32::from(tail));
                w(&mut dev, TCTL, tctl);
            }
            Op::RxRing {
                base,
                count,
                head,
                tail,
                rctl,
            } => {
                let base = at(base);
                w(&mut dev, RDBAL, base as u32);
                w(&mut dev, RDBAH, (base >> 32) as u32);
                w(&mut dev, RDLEN, u32::from(count) * 16);
                w(&mut dev, RDH, u32::from(head));
                w(&mut dev, RDT, u32::from(tail));
                w(&mut dev, RCTL, rctl);
            }
            Op::TxDesc { slot, addr, rest } => {
                let d = desc_addr(&mut dev, TDBAL, TDBAH, TDLEN, slot);
                poke(&mem, d, &desc(at(addr), &rest));
            }
            Op::RxDesc { slot, addr, rest } => {
                let d = desc_addr(&mut dev, RDBAL, RDBAH, RDLEN, slot);
                poke(&mem, d, &desc(at(addr), &rest));
            }
            Op::Poke { at: a, ref bytes } => poke(&mem, at(a), bytes),
            Op::HostFrame {
                ref head,
                len,
                extra,
            } => {
                let _ = peer_try_send(&peer, &frame(head, len, extra));
            }
            Op::Transmit => {
                dev.transmit_now();
                drain(&peer);
            }
            Op::Receive => {
                dev.receive_now();
            }
        }
    }
    dev.transmit_now();
    dev.receive_now();
});
