//! Just enough of the i8042 keyboard controller for Linux to probe it
//! quickly and for `reboot=k`: the guest resets the machine by pulsing the
//! CPU reset line (command 0xFE, or bit 0 of the output port cleared), and
//! rvm treats that as the end of the VM. It also types Ctrl-Alt-Del, the
//! one key press a VMM needs: a polite request that the guest shut down.

use std::collections::VecDeque;

use super::IrqLine;
use crate::bus::BusDevice;

/// The device spans 0x60 (data) to 0x64 (status/command); 0x61 in between
/// is the PIT speaker port, which KVM's in-kernel PIT answers.
pub const BASE_PORT: u64 = 0x60;
pub const PORT_LEN: u64 = 5;
pub const KBD_IRQ: u32 = 1;
const DATA: u64 = 0;
const COMMAND: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
/// Set means the keyboard is *not* inhibited by a key lock.
const STATUS_UNLOCKED: u8 = 0x10;
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;
const SELF_TEST_OK: u8 = 0x55;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_RESET_OK: u8 = 0xaa;

pub struct I8042 {
    ctr: u8,
    output: VecDeque<u8>,
    awaiting_data_for: Option<u8>,
    irq: IrqLine,
    on_reset: Box<dyn FnMut() + Send>,
    /// How many times the guest asked for a reset (for tests and logs).
    pub resets: u32,
}

impl I8042 {
    pub fn new(irq: IrqLine, on_reset: Box<dyn FnMut() + Send>) -> Self {
        I8042 {
            ctr: CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_XLATE,
            output: VecDeque::new(),
            awaiting_data_for: None,
            irq,
            on_reset,
            resets: 0,
        }
    }

    fn reset(&mut self) {
        self.resets += 1;
        (self.on_reset)();
    }

    fn push(&mut self, byte: u8) {
        // The controller holds a byte or two; a guest that never reads
        // cannot grow this without bound (a whole Ctrl-Alt-Del fits).
        if self.output.len() < 16 {
            self.output.push_back(byte);
        }
        if self.ctr & CTR_KBD_INT != 0 {
            let _ = self.irq.trigger();
        }
    }

    /// Queues the key presses and releases of Ctrl-Alt-Del, in the scan
    /// code set the guest reads: set 1 while the controller translates
    /// (CTR bit 6, Linux's default), set 2 otherwise. A guest kernel with
    /// an AT keyboard driver and a VT turns it into a reboot request (or,
    /// when init asked for it, a signal to init).
    pub fn ctrl_alt_del(&mut self) {
        const SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
        const SET2: &[u8] = &[
            0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
        ];
        let codes = if self.ctr & CTR_XLATE != 0 {
            SET1
        } else {
            SET2
        };
        for &c in codes {
            self.push(c);
        }
    }

    fn status(&self) -> u8 {
        let full = if self.output.is_empty() {
            0
        } else {
            STATUS_OUTPUT_FULL
        };
        full | STATUS_SYSTEM_FLAG | STATUS_UNLOCKED
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT_PORT => self.awaiting_data_for = Some(cmd),
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_KBD_TEST => self.push(0x00),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_PULSE_RESET => self.reset(),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        match self.awaiting_data_for.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(CMD_WRITE_OUTPUT_PORT) if byte & 1 == 0 => self.reset(),
            Some(_) => {}
            // A byte for the keyboard itself: acknowledge it like a keyboard would.
            None => {
                self.push(KBD_ACK);
                if byte == KBD_RESET {
                    self.push(KBD_RESET_OK);
                }
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = match offset {
            DATA => {
                let v = self.output.pop_front().unwrap_or(0);
                // The next byte fills the output buffer and interrupts
                // again, as on a real controller: IRQ 1 is an edge, so
                // one pulse per queued byte would merge into one.
                if !self.output.is_empty() && self.ctr & CTR_KBD_INT != 0 {
                    let _ = self.irq.trigger();
                }
                v
            }
            COMMAND => self.status(),
            _ => 0,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = v;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        match offset {
            DATA => self.data(b),
            COMMAND => self.command(b),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    fn dev() -> (I8042, Arc<AtomicU32>) {
        let n = Arc::new(AtomicU32::new(0));
        let n2 = n.clone();
        let irq = IrqLine(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (
            I8042::new(
                irq,
                Box::new(move || {
                    n2.fetch_add(1, Ordering::SeqCst);
                }),
            ),
            n,
        )
    }

    fn rd(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_by_command_and_by_output_port() {
        let (mut d, n) = dev();
        d.write(COMMAND, &[CMD_PULSE_RESET]);
        assert_eq!(n.load(Ordering::SeqCst), 1);
        d.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(DATA, &[0xfe]);
        assert_eq!(n.load(Ordering::SeqCst), 2);
        d.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        d.write(DATA, &[0xff]);
        assert_eq!(n.load(Ordering::SeqCst), 2, "bit 0 set: no reset");
    }

    #[test]
    fn linux_probe_sequence() {
        let (mut d, _) = dev();
        assert_eq!(rd(&mut d, COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_ne!(
            rd(&mut d, COMMAND) & STATUS_UNLOCKED,
            0,
            "no keylock warning in the guest"
        );
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, COMMAND) & STATUS_OUTPUT_FULL, 1);
        let ctr = rd(&mut d, DATA);
        assert_eq!(ctr & CTR_XLATE, CTR_XLATE);
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[0x00]);
        d.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, DATA), 0);
        d.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(rd(&mut d, DATA), SELF_TEST_OK);
        d.write(DATA, &[KBD_RESET]);
        assert_eq!(
            (rd(&mut d, DATA), rd(&mut d, DATA)),
            (KBD_ACK, KBD_RESET_OK)
        );
        assert_eq!(rd(&mut d, DATA), 0, "empty reads as 0");
    }

    #[test]
    fn ctrl_alt_del_in_the_scan_code_set_the_guest_reads() {
        let (mut d, resets) = dev();
        let drain = |d: &mut I8042| {
            let mut got = Vec::new();
            while rd(d, COMMAND) & STATUS_OUTPUT_FULL != 0 {
                got.push(rd(d, DATA));
            }
            got
        };
        d.ctrl_alt_del();
        // Translated (the default): set 1, make codes then break codes.
        assert_eq!(
            drain(&mut d),
            [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]
        );
        d.write(COMMAND, &[CMD_WRITE_CTR]);
        d.write(DATA, &[CTR_KBD_INT | CTR_SYSTEM_FLAG]);
        d.ctrl_alt_del();
        let set2 = drain(&mut d);
        assert_eq!(set2[..4], [0x14, 0x11, 0xe0, 0x71]);
        assert_eq!(
            set2.iter().filter(|&&b| b == 0xf0).count(),
            3,
            "three releases"
        );
        assert_eq!(resets.load(Ordering::SeqCst), 0, "typing is not a reset");
    }

    #[test]
    fn each_queued_byte_interrupts_again_when_the_previous_is_read() {
        let (mut d, _) = dev();
        d.ctrl_alt_del();
        // Drain the pulses from queueing, then count those from reading.
        while d.irq.0.read().is_ok() {}
        let mut pulses = 0;
        for _ in 0..8 {
            rd(&mut d, DATA);
            if d.irq.0.read().is_ok() {
                pulses += 1;
            }
        }
        assert_eq!(pulses, 7, "one per byte still queued after a read");
    }

    #[test]
    fn output_queue_is_bounded() {
        let (mut d, _) = dev();
        for _ in 0..1000 {
            d.write(DATA, &[0x00]);
        }
        assert!(d.output.len() <= 16);
    }
}
