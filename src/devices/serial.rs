//! The console: an 8250/16550 UART at 0x3f8, IRQ 4, from vm-superio.
//! Guest output goes to a writer the VMM's owner supplies (stdout for the
//! CLI); input is fed in through [`SerialInput`].

use std::io::Write;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::IrqLine;
use crate::bus::BusDevice;

pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const PORT_LEN: u64 = 8;

pub type Console = Box<dyn Write + Send>;

pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, Console>,
}

impl SerialDevice {
    pub fn new(irq: IrqLine, out: Console) -> Self {
        SerialDevice {
            uart: Serial::new(irq, out),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [b] => *b = self.uart.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [b] = data {
            // A failed console write must not stop the guest; the byte is lost.
            let _ = self.uart.write(offset as u8, *b);
        }
    }
}

/// Feeds host input to the guest's console.
#[derive(Clone)]
pub struct SerialInput(pub(crate) Arc<Mutex<SerialDevice>>);

impl SerialInput {
    /// Queues as much of `bytes` as the UART's FIFO takes and returns how
    /// many bytes that was; the caller retries the rest later.
    pub fn send(&self, bytes: &[u8]) -> usize {
        let mut dev = crate::lock_or_recover(&self.0);
        let room = dev.uart.fifo_capacity();
        let n = bytes.len().min(room);
        if n == 0 {
            return 0;
        }
        dev.uart.enqueue_raw_bytes(&bytes[..n]).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_reaches_the_writer_and_input_the_guest() {
        let sink = Sink::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(IrqLine(irq.try_clone().unwrap()), Box::new(sink.clone()));
        let dev = Arc::new(Mutex::new(dev));
        for b in b"hi\n" {
            dev.lock().unwrap().write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // Enable the received-data interrupt, then send input.
        dev.lock().unwrap().write(1, &[0x01]);
        let input = SerialInput(dev.clone());
        assert_eq!(input.send(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1, "an interrupt was raised");
        let mut lsr = [0u8];
        dev.lock().unwrap().read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.lock().unwrap().read(0, &mut rbr);
        assert_eq!(rbr[0], b'o');
        // Wide accesses are not a UART thing: they read as all-ones.
        let mut w = [0u8; 2];
        dev.lock().unwrap().read(0, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }
}
