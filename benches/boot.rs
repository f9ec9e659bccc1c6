//! Boot benchmark: time from process start to the guest's first line from
//! /init, for rvm and for QEMU's microvm machine, with the same kernel and
//! initramfs in the same run; and rvm's own memory overhead (peak RSS minus
//! the guest RAM the guest touched).
//!
//! `cargo bench --bench boot` (runs inside the nested host when the host
//! has no VT-x/AMD-V, like the guest tests). RVM_BENCH_RUNS sets the number
//! of boots per VMM and kernel (default 5).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{images, placement, reexec_nested, run_with_deadline, rvm_bin, GuestRun, Placement};

const DEADLINE: Duration = Duration::from_secs(300);
const MEM_MIB: u64 = 256;

fn cmdline(reboot: &str) -> String {
    format!("console=ttyS0 reboot={reboot} panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd quiet rvm.scenario=boot")
}

fn rvm_cmd(kernel: &Path, initrd: &Path) -> Command {
    let mut c = Command::new(rvm_bin());
    c.env("RVM_REPORT_RSS", "1")
        .args([
            "run",
            "--mem",
            &MEM_MIB.to_string(),
            "--cmdline",
            &cmdline("k"),
        ])
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd);
    c
}

fn qemu_cmd(kernel: &Path, initrd: &Path) -> Command {
    // microvm cannot reset through the keyboard controller: reboot=t.
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        "1",
        "-m",
        &MEM_MIB.to_string(),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-append",
        &cmdline("t"),
    ])
    .arg("-kernel")
    .arg(kernel)
    .arg("-initrd")
    .arg(initrd);
    c
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

fn rss_overhead_kib(run: &GuestRun) -> Option<u64> {
    run.stderr
        .lines()
        .find_map(|l| l.strip_prefix("rvm-rss: "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("overhead_kib="))
        })
        .and_then(|v| v.parse().ok())
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs us without --bench: say so, time nothing.
        println!("boot benchmark: not run under cargo test; run `cargo bench --bench boot`");
        return;
    }
    match placement() {
        Placement::Direct(why) => println!("boot benchmark: running directly ({why})"),
        Placement::Nested(why) => {
            println!("boot benchmark: running inside the nested host ({why})");
            reexec_nested(&["--mem", "4096"]);
        }
    }
    let img = images().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let runs: usize = std::env::var("RVM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    println!("{runs} boots per VMM and kernel, {MEM_MIB} MiB, 1 vCPU; time = process start to 'rvm-init: start'");
    let mut failures = 0;
    for (label, kernel) in [("minimal", &img.minimal), ("stock", &img.stock)] {
        let (mut rvm_t, mut qemu_t, mut overhead) = (vec![], vec![], vec![]);
        // Interleave the two VMMs so drift in the nested host hits both alike.
        for i in 0..runs {
            for (vmm, cmd) in [
                ("rvm", rvm_cmd(kernel, &img.initramfs)),
                ("qemu", qemu_cmd(kernel, &img.initramfs)),
            ] {
                let mut run = run_with_deadline(cmd, DEADLINE, "rvm-init: start");
                let mut retries = 0;
                // The nested host's reset flake: the VMM exits 0 before /init.
                while retries < common::MAX_FLAKE_RETRIES
                    && std::env::var_os("RVM_NESTED").is_some()
                    && run.status.is_some_and(|s| s.success())
                    && run.marker_at.is_none()
                {
                    retries += 1;
                    println!("  RETRY {retries}/{} {label} {vmm} run {i}: the guest reset before /init and the VMM exited 0 (known nested-host flake)", common::MAX_FLAKE_RETRIES);
                    let cmd = if vmm == "rvm" {
                        rvm_cmd(kernel, &img.initramfs)
                    } else {
                        qemu_cmd(kernel, &img.initramfs)
                    };
                    run = run_with_deadline(cmd, DEADLINE, "rvm-init: start");
                }
                match run.marker_at {
                    Some(t) => {
                        let ms = t.as_secs_f64() * 1000.0;
                        println!(
                            "  {label:8} {vmm:5} run {i}: {ms:8.0} ms to /init, exit {:?}",
                            run.status.and_then(|s| s.code())
                        );
                        if vmm == "rvm" {
                            rvm_t.push(ms);
                            if let Some(o) = rss_overhead_kib(&run) {
                                overhead.push(o as f64);
                            }
                        } else {
                            qemu_t.push(ms);
                        }
                    }
                    None => {
                        failures += 1;
                        println!(
                            "  {label:8} {vmm:5} run {i}: no /init line\n{}",
                            run.tail(15)
                        );
                    }
                }
            }
        }
        let (r, q) = (median(&mut rvm_t), median(&mut qemu_t));
        println!(
            "boot {label}: rvm median {r:.0} ms, qemu microvm median {q:.0} ms, rvm/qemu = {:.2}",
            r / q
        );
        println!(
            "rss {label}: rvm overhead (peak RSS - touched guest RAM) median {:.0} KiB ({:.2} MiB)",
            median(&mut overhead),
            median(&mut overhead) / 1024.0
        );
    }
    if failures > 0 {
        println!("{failures} boots did not reach /init");
        std::process::exit(1);
    }
}
