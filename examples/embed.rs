//! Embedding rvm: boot a guest with a NIC on a bridge, read its console
//! through a writer of our own, print its NIC counters while it runs, and
//! stop it gracefully (Ctrl-Alt-Del) with a forced stop as the fallback.
//!
//! ```sh
//! cargo run --example embed -- KERNEL INITRD TAP BRIDGE [SECONDS]
//! ```
//! The guest runs for SECONDS (default 20) unless it ends by itself first.
//! Needs root (or CAP_NET_ADMIN) for the TAP and an existing bridge.

use std::io::Write;
use std::time::Duration;

use rvm::{ExitReason, NetConfig, Vm, VmConfig};

/// The guest's console, line by line, prefixed so it stands apart from
/// this program's own output. rvm calls it from a vCPU thread.
struct PrefixedConsole {
    line: Vec<u8>,
}

impl Write for PrefixedConsole {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        for &b in bytes {
            if b == b'\n' {
                let mut out = std::io::stdout().lock();
                out.write_all(b"guest | ")?;
                out.write_all(&self.line)?;
                out.write_all(b"\n")?;
                self.line.clear();
            } else if b != b'\r' {
                self.line.push(b);
            }
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().flush()
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kernel, initrd, tap, bridge, rest @ ..] = args.as_slice() else {
        return Err("usage: embed KERNEL INITRD TAP BRIDGE [SECONDS]".into());
    };
    let seconds: u64 = match rest.first() {
        Some(s) => s.parse().map_err(|_| format!("bad SECONDS {s:?}"))?,
        None => 20,
    };

    let mut config = VmConfig::new(kernel);
    config.initrd = Some(initrd.into());
    config.mem_mib = 256;
    let mut nic = NetConfig::tap(tap);
    nic.bridge = Some(bridge.clone());
    config.nics.push(nic);

    let console = Box::new(PrefixedConsole { line: Vec::new() });
    let mut vm = Vm::new(&config, console)?.start()?;

    let mut reason = None;
    for _ in 0..seconds.div_ceil(5) {
        if let Some(r) = vm.wait_timeout(Duration::from_secs(5)) {
            reason = Some(r);
            break;
        }
        for nic in vm.nic_counters() {
            let c = nic.counters;
            println!(
                "{}: rx {} frames/{} bytes ({} dropped), tx {} frames/{} bytes ({} dropped)",
                nic.name,
                c.rx_frames,
                c.rx_bytes,
                c.rx_dropped,
                c.tx_frames,
                c.tx_bytes,
                c.tx_dropped
            );
        }
    }
    let reason = reason.unwrap_or_else(|| vm.shutdown(Duration::from_secs(10)));
    match reason {
        ExitReason::Stopped => println!("the guest ignored Ctrl-Alt-Del: stopped by force"),
        ExitReason::Error(e) => return Err(e.into()),
        other => println!("the guest ended: {other:?}"),
    }
    // Dropping the VM deletes the TAP it created.
    drop(vm);
    Ok(())
}
