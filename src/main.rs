//! The `rvm` command: parses the command line into a [`VmConfig`], runs the
//! VM, and turns the way it ended into an exit status.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use clap::{Parser, Subcommand};
use rvm::logging::RateLimit;
use rvm::net::NetConfig;
use rvm::vmm::seccomp::{self, SeccompMode, ThreadFilter};
use rvm::{parse_mem_size, ExitReason, Vm, VmConfig, DEFAULT_CMDLINE};

#[derive(Parser, Debug)]
#[command(
    name = "rvm",
    version,
    about = "A small, fast KVM virtual machine monitor"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a Linux guest; its serial console is this terminal.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Linux bzImage with a 64-bit entry point.
    #[arg(long, value_name = "PATH", required_unless_present = "config")]
    kernel: Option<PathBuf>,
    /// Initramfs to load with the kernel.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Guest memory: MiB, or a size with a K, M or G suffix.
    #[arg(long, value_name = "SIZE", default_value = "256", value_parser = parse_mem_size)]
    mem: u64,
    /// A NIC (repeatable): tap=NAME|fd=N|fds=A:B:...|user|stream=PATH|dgram=PATH
    /// [,hostfwd=tcp|udp:[ADDR]:PORT-:GPORT (with user)][,bridge=BR][,mac=MAC]
    /// [,model=virtio|e1000][,queues=N|auto][,vhost=on|off|auto][,vnet_hdr=on|off]
    /// [,sndbuf=BYTES][,mtu=N][,script=PATH|no][,downscript=PATH|no]
    /// [,tx_rate=BITS/S][,tx_burst=BYTES][,tx_pps=N][,rx_rate=..][,rx_burst=..][,rx_pps=..]
    /// [,dump=PCAP_PATH][,dump_len=BYTES]
    /// [,egress=allow|deny|sandbox][,allow=CIDR[:PORT|:LO-HI][/tcp|/udp|/icmp]][,deny=..]
    #[arg(long = "net", value_name = "SPEC", value_parser = parse_net)]
    nets: Vec<NetConfig>,
    /// One NIC on host TAP NAME (created if missing, removed at exit).
    #[arg(long, value_name = "NAME")]
    tap: Option<String>,
    /// Enslave --tap's TAP to this existing bridge.
    #[arg(long, value_name = "BR", requires = "tap")]
    bridge: Option<String>,
    /// --tap's MAC address (default: 52:54:00 plus a hash of the TAP name).
    #[arg(long, value_name = "MAC", requires = "tap")]
    mac: Option<String>,
    /// --tap's NIC model: virtio or e1000.
    #[arg(long, value_name = "MODEL", requires = "tap")]
    model: Option<String>,
    /// --tap's vhost-net use: on, off or auto.
    #[arg(long, value_name = "MODE", requires = "tap")]
    vhost: Option<String>,
    /// seccomp filter of rvm's vCPU and NIC threads: on (refuse other
    /// system calls with EPERM), log (allow, but the kernel logs them) or off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    seccomp: SeccompMode,
    /// Serve the control API (HTTP/1.1, JSON) on a UNIX socket at PATH
    /// (mode 0600, removed at exit): curl --unix-socket PATH http://rvm/v1/vm
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// The whole VM as JSON (the schema --print-config prints); options
    /// given here override it (--net and --tap replace its NICs).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the VM's configuration as JSON (after --config and the
    /// options) and exit, starting nothing.
    #[arg(long)]
    print_config: bool,
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    s.parse::<NetConfig>().map_err(|e| e.to_string())
}

impl RunArgs {
    /// The VM: --config's, with the options given on the command line
    /// over it (`given` says which were), or the options alone.
    fn into_config(self, given: impl Fn(&str) -> bool) -> Result<VmConfig, String> {
        let vcpus = u8::try_from(self.cpus).map_err(|_| {
            format!(
                "--cpus {} is more than rvm supports ({})",
                self.cpus,
                rvm::config::MAX_VCPUS
            )
        })?;
        let base = match &self.config {
            Some(path) => Some(VmConfig::from_file(path).map_err(|e| e.to_string())?),
            None => None,
        };
        let mut nics = Vec::new();
        if let Some(tap) = &self.tap {
            // The shorthands are one --net spec.
            let mut spec = format!("tap={tap}");
            for (key, v) in [
                ("bridge", &self.bridge),
                ("mac", &self.mac),
                ("model", &self.model),
                ("vhost", &self.vhost),
            ] {
                if let Some(v) = v {
                    spec.push_str(&format!(",{key}={v}"));
                }
            }
            nics.push(spec.parse::<NetConfig>().map_err(|e| e.to_string())?);
        }
        nics.extend(self.nets);
        let Some(mut c) = base else {
            return Ok(VmConfig {
                kernel: self.kernel.ok_or("give --kernel PATH (or --config FILE)")?,
                initrd: self.initrd,
                cmdline: self.cmdline,
                vcpus,
                mem_mib: self.mem,
                nics,
                seccomp: self.seccomp,
            });
        };
        if let Some(k) = self.kernel {
            c.kernel = k;
        }
        if self.initrd.is_some() {
            c.initrd = self.initrd;
        }
        if given("cmdline") {
            c.cmdline = self.cmdline;
        }
        if given("cpus") {
            c.vcpus = vcpus;
        }
        if given("mem") {
            c.mem_mib = self.mem;
        }
        if given("seccomp") {
            c.seccomp = self.seccomp;
        }
        if !nics.is_empty() {
            c.nics = nics;
        }
        Ok(c)
    }
}

/// The exit eventfd, for the SIGINT/SIGTERM handler (which may only make
/// async-signal-safe calls such as write(2)).
static EXIT_FD: AtomicI32 = AtomicI32::new(-1);
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_terminate(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(sig, Ordering::SeqCst);
    let fd = EXIT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64.
        unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

/// `eprintln!` that never panics: when stderr is gone (a pipe whose reader
/// left answers EPIPE) the line is lost, and rvm (with panic=abort) is not.
macro_rules! say {
    ($($arg:tt)+) => {{
        let _ = writeln!(std::io::stderr().lock(), $($arg)+);
    }};
}

/// The signal that makes rvm print where every vCPU is (registers, halted
/// or not, interrupts on or off) without stopping the guest.
const INSPECT_SIGNAL: libc::c_int = libc::SIGUSR1;

/// The signal set holding only INSPECT_SIGNAL.
fn inspect_sigset() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t and the signal number is valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, INSPECT_SIGNAL);
    }
    set
}

/// Blocks INSPECT_SIGNAL in the calling thread, and so in every thread it
/// starts afterwards (vCPUs, NIC workers): only the inspect thread takes it,
/// with sigwait, so no system call anywhere is interrupted by it.
fn block_inspect_signal() {
    let set = inspect_sigset();
    // SAFETY: a valid signal set; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Prints every vCPU's state on stderr each time rvm gets INSPECT_SIGNAL.
fn spawn_inspect_thread(vm: rvm::VmController) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("inspect".into())
        .spawn(move || loop {
            let set = inspect_sigset();
            let mut sig = 0;
            // SAFETY: a valid signal set, blocked in every thread, and a
            // live int to receive the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            let mut text = format!("rvm: vCPU states (signal {sig}):");
            for report in vm.vcpu_states() {
                text.push_str(&format!("\nrvm:   {report}"));
            }
            say!("{text}");
        })
        .map(|_| ())
}

/// Puts a terminal stdin into raw mode (keeping Ctrl-C as a signal) and
/// restores it when dropped.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enable() -> Option<RawTerminal> {
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is open and `t` is a valid termios to write into.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return None;
        }
        let saved = t;
        t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::IEXTEN);
        t.c_iflag &= !(libc::ICRNL | libc::IXON);
        // SAFETY: applying a termios derived from the current one to fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        Some(RawTerminal(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the termios read in enable() on the same fd.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.0) };
    }
}

fn run(args: RunArgs, given: impl Fn(&str) -> bool) -> Result<Option<ExitReason>, String> {
    let api_sock = args.api_sock.clone();
    let print = args.print_config;
    let config = args.into_config(given)?;
    if print {
        println!("{}", config.to_json());
        return Ok(None);
    }
    // The API's socket first: a path in use fails before the VM exists.
    let api_socket = match &api_sock {
        Some(p) => Some(rvm::api::ApiSocket::bind(p).map_err(|e| e.to_string())?),
        None => None,
    };
    let console: Box<dyn Write + Send> = Box::new(std::io::stdout());
    let vm = Vm::new(&config, console).map_err(|e| e.to_string())?;
    let mut running = vm.start().map_err(|e| e.to_string())?;
    let _api = match api_socket {
        Some(socket) => {
            let target =
                std::sync::Arc::new(rvm::api::VmTarget::new(running.controller(), &config));
            let filter = ThreadFilter::api(config.seccomp).map_err(|e| e.to_string())?;
            Some(
                rvm::api::ApiServer::start(socket, target, filter)
                    .map_err(|e| format!("cannot serve the control API: {e}"))?,
            )
        }
        None => None,
    };

    spawn_inspect_thread(running.controller())
        .map_err(|e| format!("cannot start the inspect thread: {e}"))?;
    EXIT_FD.store(running.exit_signal().raw_fd(), Ordering::SeqCst);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
            .map_err(|e| format!("cannot install a handler for signal {sig}: {e}"))?;
    }

    let _raw = if std::io::stdin().is_terminal() {
        let input = running.serial_input();
        let filter = ThreadFilter::new(config.seccomp).map_err(|e| e.to_string())?;
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                seccomp::confine(filter.as_ref(), "stdin");
                let mut buf = [0u8; 64];
                while let Ok(n) = std::io::stdin().read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut sent = 0;
                    while sent < n {
                        sent += input.send(&buf[sent..n]);
                        if sent < n {
                            std::thread::sleep(std::time::Duration::from_millis(2));
                        }
                    }
                }
            })
            .map_err(|e| format!("cannot start the stdin thread: {e}"))?;
        RawTerminal::enable()
    } else {
        None
    };

    let reason = running.wait();
    for nic in running.nic_counters() {
        let c = nic.counters;
        log::info!(
            "NIC on {}: rx {} frames {} bytes, {} dropped; tx {} frames {} bytes, {} dropped, {} waits for room; {} malformed chains",
            nic.name, c.rx_frames, c.rx_bytes, c.rx_dropped, c.tx_frames, c.tx_bytes, c.tx_dropped, c.tx_waits, c.malformed
        );
        if let Some(path) = &nic.capture.path {
            log::info!(
                "NIC on {}: captured {} frames to {}, {} lost{}",
                nic.name,
                nic.capture.captured,
                path.display(),
                nic.capture.lost,
                nic.capture
                    .error
                    .as_ref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
        }
        if !nic.limits.is_none() {
            log::info!(
                "NIC on {}: rate limits held tx back {} times, rx {} times",
                nic.name,
                nic.throttled.tx,
                nic.throttled.rx
            );
        }
    }
    if std::env::var_os("RVM_REPORT_RSS").is_some() {
        // For the boot benchmark: rvm's own overhead is peak RSS minus the
        // guest RAM the guest touched.
        let (peak, guest) = running.memory_usage_kib();
        say!(
            "rvm-rss: peak_kib={peak} guest_kib={guest} overhead_kib={}",
            peak.saturating_sub(guest)
        );
    }
    Ok(Some(reason))
}

/// Library log records on stderr: warnings always, more with RVM_LOG=info
/// or RVM_LOG=debug.
struct StderrLog(log::LevelFilter);

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= self.0
    }
    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // rvm bounds the lines a guest can cause where it logs them
        // (guest_log!); a dependency's (virtio-queue's errors on what a
        // driver programmed) are bounded here, all together.
        static DEPENDENCIES: RateLimit = RateLimit::new();
        let held = if r.target().starts_with("rvm") {
            0
        } else {
            match DEPENDENCIES.admit(rvm::logging::now_ms()) {
                Some(n) => n,
                None => return,
            }
        };
        let level = r.level().as_str().to_ascii_lowercase();
        if held > 0 {
            say!(
                "rvm: {level}: {} ({held} lines of other crates held back before this one)",
                r.args()
            );
        } else {
            say!("rvm: {level}: {}", r.args());
        }
    }
    fn flush(&self) {}
}

fn init_log() {
    let level = match std::env::var("RVM_LOG").as_deref() {
        Ok("debug") => log::LevelFilter::Debug,
        Ok("info") => log::LevelFilter::Info,
        _ => log::LevelFilter::Warn,
    };
    let logger: &'static StderrLog = Box::leak(Box::new(StderrLog(level)));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(level);
    }
}

fn main() -> ExitCode {
    block_inspect_signal();
    init_log();
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let Command::Run(args) = cli.command;
    let run_matches = matches.subcommand_matches("run").cloned();
    // Which options the command line gave (not their defaults): those
    // override --config.
    let given = move |id: &str| {
        run_matches
            .as_ref()
            .and_then(|m| m.value_source(id))
            .is_some_and(|s| s == clap::parser::ValueSource::CommandLine)
    };
    match run(args, given) {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some(reason)) => {
            let _ = std::io::stdout().flush();
            match &reason {
                ExitReason::TripleFault => {
                    say!("rvm: the guest triple-faulted; treating it as a reset")
                }
                ExitReason::Stopped => match LAST_SIGNAL.load(Ordering::SeqCst) {
                    0 => say!("rvm: stopped through the control API"),
                    sig => say!("rvm: terminating on signal {sig}"),
                },
                ExitReason::Error(e) => say!("rvm: error: {e}"),
                _ => {}
            }
            if reason.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            say!("rvm: error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmConfig, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        let Command::Run(a) = cli.command;
        a.into_config(|_| false)
    }

    #[test]
    fn defaults() {
        let c = parse(&["rvm", "run", "--kernel", "/k"]).unwrap();
        assert_eq!(c, VmConfig::new("/k"));
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
    }

    #[test]
    fn every_option() {
        let c = parse(&[
            "rvm",
            "run",
            "--kernel",
            "/k",
            "--initrd",
            "/i",
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "4",
            "--mem",
            "2G",
        ])
        .unwrap();
        assert_eq!(c.initrd.as_deref(), Some(std::path::Path::new("/i")));
        assert_eq!(
            (c.vcpus, c.mem_mib, c.cmdline.as_str()),
            (4, 2048, "console=ttyS0 quiet")
        );
    }

    #[test]
    fn bad_arguments() {
        assert!(parse(&["rvm", "run"]).unwrap_err().contains("--kernel"));
        assert!(parse(&["rvm", "run", "--kernel", "/k", "--mem", "lots"]).is_err());
        assert!(parse(&["rvm", "run", "--kernel", "/k", "--cpus", "-1"]).is_err());
        assert!(parse(&["rvm", "run", "--kernel", "/k", "--cpus", "256"])
            .unwrap_err()
            .contains("254"));
        assert!(parse(&["rvm", "run", "--kernel", "/k", "--bogus"]).is_err());
    }
}
