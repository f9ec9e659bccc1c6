//! Bad input to `rvm run`: one line naming the problem and what to do, a
//! non-zero exit, and no VM started. None of these need a guest.

use std::process::{Command, Output};

// The guest harness's helpers; this harness-run target tests the pure ones.
#[path = "common/mod.rs"]
mod common;

fn rvm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rvm"))
        .args(args)
        .output()
        .expect("run rvm")
}

fn fake_bzimage(dir: &std::path::Path) -> std::path::PathBuf {
    // A header that passes rvm's checks, so the test reaches later ones.
    let mut img = vec![0u8; 8192];
    img[0x1f1] = 4; // setup_sects
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 1; // loadflags: LOADED_HIGH
    img[0x236..0x238].copy_from_slice(&1u16.to_le_bytes()); // xloadflags: 64-bit entry
    let p = dir.join("bzImage");
    std::fs::write(&p, img).unwrap();
    p
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rvm-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn assert_error(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got {:?}: {err}",
        out.status
    );
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(
        out.stdout.is_empty(),
        "nothing on the console: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn missing_kernel() {
    let out = rvm(&["run", "--kernel", "/nonexistent/bzImage"]);
    assert_error(&out, "cannot read kernel /nonexistent/bzImage");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().count(),
        1,
        "one line"
    );
}

#[test]
fn unreadable_kernel_is_a_directory() {
    let out = rvm(&["run", "--kernel", "/"]);
    assert_error(&out, "cannot read kernel /");
}

#[test]
fn not_a_bzimage() {
    let out = rvm(&["run", "--kernel", "/etc/hostname"]);
    assert_error(&out, "is not a bzImage");
    let d = tmpdir("elf");
    let p = d.join("elf");
    std::fs::write(&p, [&b"\x7fELF"[..], &[0u8; 4096]].concat()).unwrap();
    assert_error(
        &rvm(&["run", "--kernel", p.to_str().unwrap()]),
        "no HdrS signature",
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn cpus_out_of_range() {
    let d = tmpdir("cpus");
    let k = fake_bzimage(&d);
    let k = k.to_str().unwrap();
    assert_error(
        &rvm(&["run", "--kernel", k, "--cpus", "0"]),
        "--cpus must be at least 1",
    );
    assert_error(
        &rvm(&["run", "--kernel", k, "--cpus", "255"]),
        "more than rvm supports",
    );
    assert_error(
        &rvm(&["run", "--kernel", k, "--cpus", "100000"]),
        "more than rvm supports",
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn memory_out_of_range() {
    let d = tmpdir("mem");
    let k = fake_bzimage(&d);
    let k = k.to_str().unwrap();
    assert_error(&rvm(&["run", "--kernel", k, "--mem", "16"]), "too small");
    assert_error(
        &rvm(&["run", "--kernel", k, "--mem", "64T"]),
        "more than this host has",
    );
    let out = rvm(&["run", "--kernel", k, "--mem", "12X"]);
    assert_eq!(out.status.code(), Some(2), "usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a size"));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn missing_initrd() {
    let d = tmpdir("initrd");
    let k = fake_bzimage(&d);
    let out = rvm(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_error(&out, "cannot read initrd /nonexistent/initrd");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn kvm_missing() {
    // Hide /dev/kvm in a private mount namespace: rvm must say what to do.
    let d = tmpdir("nokvm");
    let k = fake_bzimage(&d);
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {}",
        env!("CARGO_BIN_EXE_rvm"),
        k.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) is needed for this test");
    assert_error(&out, "cannot open /dev/kvm");
    assert!(String::from_utf8_lossy(&out.stderr).contains("kvm_intel or kvm_amd"));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn vhost_on_without_vhost_net_fails_before_any_tap() {
    // /dev hidden in private mount and network namespaces: vhost=on must
    // be refused before rvm creates the TAP (the new netns would show it).
    let d = tmpdir("novhost");
    let k = fake_bzimage(&d);
    let script = format!(
        "mount -t tmpfs none /dev && {} run --kernel {} --tap rvmvh0 --vhost on; rc=$?; \
         ip -o link show rvmvh0 2>/dev/null && echo TAP-LEFT >&2; exit $rc",
        env!("CARGO_BIN_EXE_rvm"),
        k.display()
    );
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--net",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ])
        .output()
        .expect("unshare (util-linux) is needed for this test");
    assert_error(&out, "vhost=on, but cannot open /dev/vhost-net");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("vhost=off"), "says what to do: {err}");
    assert!(!err.contains("TAP-LEFT"), "a TAP was created: {err}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn help_lists_the_run_options() {
    let out = rvm(&["run", "--help"]);
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    for opt in ["--kernel", "--initrd", "--cmdline", "--cpus", "--mem"] {
        assert!(s.contains(opt), "{opt} missing from help");
    }
    assert!(s.contains("reboot=k"), "the default cmdline is documented");
}

/// NIC specs that are wrong on their face fail before anything is opened
/// or created (these never reach a TAP, so they touch no namespace).
#[test]
fn bad_nic_specs_name_the_problem() {
    let dir = tmpdir("nics");
    let k = fake_bzimage(&dir);
    let k = k.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--net", "tap=t0,colour=red"], "unknown key \"colour\""),
        (&["--net", "tap=t0,mac=zz:11"], "bad MAC"),
        (&["--net", "tap=t0,mac=01:00:00:00:00:01"], "multicast"),
        (
            &["--net", "bridge=br0"],
            "give tap=NAME, fd=N, user, stream=PATH or dgram=PATH",
        ),
        (&["--net", "tap=t0,fd=3"], "exclusive"),
        (&["--net", "tap=waytoolongforatap"], "not an interface name"),
        (&["--net", "tap=t0", "--net", "tap=t0"], "given to two NICs"),
        (&["--net", "tap=t0,tx_rate=fast"], "bad tx_rate=\"fast\""),
        (
            &["--net", "tap=t0,dump=/nonexistent/dir/x.pcap"],
            "the folder /nonexistent/dir does not exist",
        ),
        (&["--net", "tap=t0,rx_burst=64K"], "rx_burst needs rx_rate"),
        (
            &["--net", "tap=t0,vhost=on,rx_rate=1Gbit"],
            "vhost=on and a rate limit cannot both hold",
        ),
        (
            &["--tap", "t0", "--model", "e1000", "--vhost", "on"],
            "vhost=on needs model=virtio",
        ),
        (&["--bridge", "br0"], "--tap"),
        (&["--net", "user,bridge=br0"], "bridge is for a TAP"),
        (&["--net", "user,vhost=on"], "vhost=on needs a TAP"),
        (
            &["--net", "user,hostfwd=tcp::2222-10.0.2.15:22"],
            "a guest address (10.0.2.15) cannot be chosen",
        ),
        (
            &["--net", "stream=/nonexistent/passt.sock"],
            "cannot connect to the user-mode network at /nonexistent/passt.sock",
        ),
        (
            &[
                "--net",
                "tap=t0,egress=deny,allow=10.0.0.1:5001/tcp,deny=10.0.0.0/33",
            ],
            "bad deny=\"10.0.0.0/33\": prefix length 33 is more than an IPv4 address has (32)",
        ),
        (
            &["--net", "tap=t0,egress=sandbox,allow=10.0.0.1/8"],
            "has host bits set after /8: the network is 10.0.0.0/8",
        ),
        (&["--net", "tap=t0,egress=closed"], "bad egress=\"closed\""),
        (&["--net", "tap=t0,deny=10.0.0.0/8"], "needs egress="),
    ];
    for (args, want) in cases {
        let mut all = vec!["run", "--kernel", k];
        all.extend_from_slice(args);
        let out = rvm(&all);
        assert_error(&out, want);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--net user` without passt says how to get it, and leaves nothing.
#[test]
fn user_networking_without_passt_says_how_to_install_it() {
    let dir = tmpdir("nopasst");
    let k = fake_bzimage(&dir);
    let out = Command::new(env!("CARGO_BIN_EXE_rvm"))
        .args(["run", "--kernel", k.to_str().unwrap(), "--net", "user"])
        .env("RVM_PASST", dir.join("no-such-passt"))
        .output()
        .expect("run rvm");
    assert_error(&out, "passt is not installed");
    assert_error(&out, "apt install passt");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_pvm_host_is_named_at_start() {
    // On a host whose /dev/kvm is PVM (kvm_pvm loaded, no VT-x/AMD-V) a stock
    // kernel hangs without a word, so rvm must say why at start; on any
    // other host it must not.
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let hardware = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let d = tmpdir("pvm");
    let k = fake_bzimage(&d);
    // A kernel that asks for 1 GiB to decompress into: rvm fails to load it
    // into 64 MiB, after it opened KVM, which is when it looks at the host.
    let mut img = std::fs::read(&k).unwrap();
    img[0x260..0x264].copy_from_slice(&(1u32 << 30).to_le_bytes()); // init_size
    std::fs::write(&k, img).unwrap();
    let out = rvm(&["run", "--kernel", k.to_str().unwrap(), "--mem", "64M"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let warned = err.contains("/dev/kvm is PVM") && err.contains("scripts/nested-host");
    assert_eq!(
        warned,
        kvm && pvm && !hardware,
        "kvm {kvm}, kvm_pvm {pvm}, VT-x/AMD-V {hardware}: {err}"
    );
    if warned {
        assert_eq!(err.matches("is PVM").count(), 1, "one line: {err}");
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_broken_stderr_never_makes_rvm_panic() {
    // Messages (the logger's warnings, the final error) go to stderr; when
    // nobody reads it any more (a pipe whose reader has gone: EPIPE),
    // writing them must fail quietly, not panic (with panic=abort a guest
    // could otherwise end rvm by making it log).
    use std::os::fd::{FromRawFd, OwnedFd};
    let d = tmpdir("nostderr");
    let k = fake_bzimage(&d);
    let mut img = std::fs::read(&k).unwrap();
    img[0x260..0x264].copy_from_slice(&(1u32 << 30).to_le_bytes()); // init_size
    std::fs::write(&k, img).unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds into a valid array of two.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_rvm"))
        .env("RVM_LOG", "debug")
        .args(["run", "--kernel", k.to_str().unwrap(), "--mem", "64M"])
        .stderr(std::process::Stdio::from(writer))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "the load error's exit status, not a panic: {:?}",
        out.status
    );
    std::fs::remove_dir_all(d).unwrap();
}

fn lines(l: &[&str]) -> Vec<String> {
    l.iter().map(|s| s.to_string()).collect()
}

/// The guest harness fails a silent guest at once only when two looks at
/// its vCPUs (SIGUSR1 reports) show each halted with interrupts off or
/// never started, and none moved.
#[test]
fn the_harness_calls_a_guest_stuck_only_when_no_vcpu_runs_or_moves() {
    use common::vcpus_stuck;
    let hung = lines(&[
        "vCPU 0: halted, interrupts off: rip 0xffffffff8a00 rsp 0x1",
        "vCPU 1: waiting for INIT, interrupts off: rip 0xfff0 rsp 0x0",
    ]);
    assert!(vcpus_stuck(&hung, &hung));
    let moved = lines(&[
        "vCPU 0: halted, interrupts off: rip 0xffffffff8b00 rsp 0x1",
        "vCPU 1: waiting for INIT, interrupts off: rip 0xfff0 rsp 0x0",
    ]);
    assert!(!vcpus_stuck(&hung, &moved));
    // An idle CPU (HLT, interrupts on) is waiting for a timer, not stuck.
    let idle = lines(&[
        "vCPU 0: halted, interrupts on: rip 0xffffffff8a00 rsp 0x1",
        "vCPU 1: halted, interrupts on: rip 0xffffffff8a00 rsp 0x2",
    ]);
    assert!(!vcpus_stuck(&idle, &idle));
    let running = lines(&[
        "vCPU 0: runnable, interrupts off: rip 0xffffffff8a00 rsp 0x1",
        "vCPU 1: waiting for INIT, interrupts off: rip 0xfff0 rsp 0x0",
    ]);
    assert!(!vcpus_stuck(&running, &running));
    let busy = lines(&["vCPU 0: no answer within 1000 ms (its thread is busy outside KVM_RUN)"]);
    assert!(!vcpus_stuck(&busy, &busy));
    assert!(!vcpus_stuck(&[], &[]));
}

/// The harness retries a guest killed at its deadline only when a vCPU's
/// report shows a state the guest cannot be in: page tables beyond its
/// RAM (the nested host's own state in the vCPU). The lines are fresh-clone
/// run 9's (2026-11-30), a 256 MiB guest of the minimal kernel.
#[test]
fn the_harness_tells_a_vcpu_state_that_is_not_the_guests() {
    use common::{foreign_vcpu_state, guest_mem_bytes};
    let report = "rvm: vCPU states (signal 10):
rvm:   vCPU 0: runnable, interrupts on: rip 0xffffffffc048420c rsp 0xffffcf3140cf3c90 rflags 0x10246 cr0 0x80050033 cr2 0xffffffffc048420c cr3 0x10b0fc000 cr4 0x3106b0 efer 0xd01 cs 0x10
rvm:   vCPU 1: halted, interrupts on: rip 0xffffffff812bd95b rsp 0xffffc90000063f08 rflags 0x246 cr0 0x80050033 cr2 0x0 cr3 0x1a0a000 cr4 0x3106a0 efer 0xd01 cs 0x10";
    let mib = 1u64 << 20;
    let line = foreign_vcpu_state(report, 256 * mib).expect("vCPU 0 is foreign");
    assert!(
        line.contains("vCPU 0") && line.contains("cr3 0x10b0fc000"),
        "{line}"
    );
    // The same CR3 is RAM in a 6 GiB guest (RAM from 4 GiB on there).
    assert_eq!(foreign_vcpu_state(report, 6144 * mib), None);
    // A healthy guest's report, PCID bits and the no-flush bit included;
    // a vCPU that never ran (CR3 0).
    let fine = "rvm:   vCPU 0: runnable, interrupts on: rip 0xffffffff81000000 rsp 0x1 cr3 0x8000000001a0a001 cr4 0x3206f0
rvm:   vCPU 1: waiting for INIT, interrupts off: rip 0xfff0 rsp 0x0 cr3 0x0";
    assert_eq!(foreign_vcpu_state(fine, 256 * mib), None);
    assert_eq!(foreign_vcpu_state("", 256 * mib), None);
    let mem = |args: &[&str]| {
        let mut c = std::process::Command::new("rvm");
        c.args(args);
        guest_mem_bytes(&c)
    };
    assert_eq!(mem(&["run", "--mem", "256M"]), 256 * mib);
    assert_eq!(
        mem(&["run", "--cpus", "2", "--mem", "512M", "--net", "x"]),
        512 * mib
    );
    assert_eq!(mem(&["run", "--mem", "6144"]), 6144 * mib);
    assert_eq!(mem(&["run", "--mem", "2G"]), 2048 * mib);
    assert_eq!(mem(&["run"]), 256 * mib);
}

/// The guest suites' reruns after the nested host failed under them: a
/// fake scripts/nested-host plays a run that hangs after one verdict
/// (exit 123), then one that panics with none (124), then one that
/// finishes. Only the tests without a verdict run again, each time; and a
/// hang that strikes with no new verdict more often than the bound is a
/// failure, not a retry for ever.
#[test]
fn the_harness_reruns_only_the_tests_a_nested_host_fault_cut_off() {
    use common::{run_suite_through, MAX_STALLED_PANICS};
    let dir = std::env::temp_dir().join(format!("rvm-fake-nested-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("nested-host");
    let calls = dir.join("calls");
    // Records the tests each run was given (after --exact), then plays
    // the next outcome from the list in $dir/plan.
    std::fs::write(
        &script,
        format!(
            r#"#!/bin/bash
dir={dir}
while [ "$1" != --exact ]; do shift; done; shift
echo "$*" >> "$dir/calls"
n=$(wc -l < "$dir/calls")
case $(sed -n "${{n}}p" "$dir/plan") in
    hang-after-a) echo "test a ... ok"; exit 123 ;;
    panic) exit 124 ;;
    hang) exit 123 ;;
    finish) for t in "$@"; do echo "test $t ... ok"; done; exit 0 ;;
esac
"#,
            dir = dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let exe = std::path::Path::new("/bin/true");
    let tests = || vec!["a".to_string(), "b".to_string(), "c".to_string()];
    let run = |plan: &[&str]| {
        std::fs::write(dir.join("plan"), plan.join("\n") + "\n").unwrap();
        let _ = std::fs::remove_file(&calls);
        let code = run_suite_through(&script, exe, &["--mem", "64"], tests());
        let seen = std::fs::read_to_string(&calls).unwrap_or_default();
        (code, seen)
    };

    let (code, seen) = run(&["hang-after-a", "panic", "finish"]);
    assert_eq!(code, 0, "{seen}");
    assert_eq!(seen, "a b c\nb c\nb c\n");

    // Hangs with no verdict in between: retried up to the bound, then the
    // suite fails with the nested host's status.
    let mut plan = vec!["hang"; MAX_STALLED_PANICS as usize + 1];
    plan.push("finish");
    let (code, seen) = run(&plan);
    assert_eq!(code, 123, "{seen}");
    assert_eq!(
        seen.lines().count(),
        MAX_STALLED_PANICS as usize + 1,
        "{seen}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--print-config` prints the VM as JSON; `--config` reads it back, and
/// options given on the command line override it (`--net` replaces its
/// NICs); a config file with a mistake names it and starts nothing.
#[test]
fn a_config_file_round_trips_and_options_override_it() {
    let dir = tmpdir("config");
    let k = fake_bzimage(&dir);
    let k = k.to_str().unwrap();
    let out = rvm(&[
        "run",
        "--kernel",
        k,
        "--cpus",
        "2",
        "--net",
        "tap=t0,model=e1000,egress=deny,allow=10.0.0.1:53/udp",
        "--print-config",
    ]);
    assert!(out.status.success(), "{out:?}");
    let file = dir.join("vm.json");
    std::fs::write(&file, &out.stdout).unwrap();
    let f = file.to_str().unwrap();
    // Read back unchanged.
    let again = rvm(&["run", "--config", f, "--print-config"]);
    assert!(again.status.success(), "{again:?}");
    assert_eq!(again.stdout, out.stdout);
    // Overridden: what the command line gives, and only that.
    let over = rvm(&["run", "--config", f, "--mem", "512", "--print-config"]);
    let v: serde_json::Value = serde_json::from_slice(&over.stdout).expect("JSON");
    assert_eq!(
        (v["mem_mib"].as_u64(), v["vcpus"].as_u64()),
        (Some(512), Some(2))
    );
    assert_eq!(v["nics"][0]["model"], "e1000");
    assert_eq!(
        v["nics"][0]["egress"]["rules"][0],
        "allow=10.0.0.1/32:53/udp"
    );
    let other = rvm(&["run", "--config", f, "--net", "user", "--print-config"]);
    let v: serde_json::Value = serde_json::from_slice(&other.stdout).expect("JSON");
    assert_eq!(v["nics"].as_array().map(Vec::len), Some(1));
    assert_eq!(v["nics"][0]["tap"], serde_json::Value::Null);
    // Mistakes.
    let bad = dir.join("bad.json");
    std::fs::write(
        &bad,
        r#"{"kernel": "/k", "nics": [{"tap": "t0", "colour": "red"}]}"#,
    )
    .unwrap();
    assert_error(
        &rvm(&["run", "--config", bad.to_str().unwrap()]),
        "unknown field `colour`",
    );
    assert_error(
        &rvm(&["run", "--config", "/nonexistent/vm.json"]),
        "--config /nonexistent/vm.json: No such file",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--api-sock` on a path that is not a socket is refused before
/// anything starts, and the file is left as it was.
#[test]
fn an_api_socket_path_in_use_is_refused_first() {
    let dir = tmpdir("apisock");
    let k = fake_bzimage(&dir);
    let file = dir.join("not-a-socket");
    std::fs::write(&file, b"mine").unwrap();
    let out = rvm(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--api-sock",
        file.to_str().unwrap(),
    ]);
    assert_error(&out, "exists and is not a socket");
    assert_eq!(std::fs::read(&file).unwrap(), b"mine");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The guest kernel's death on its own entry stack (seen in a CI run's
/// vhost-net multiqueue case) is told apart from any other oops.
#[test]
fn the_harness_tells_a_fault_on_the_guests_entry_stack() {
    use common::entry_stack_fault;
    let seen = "[   12.575849] RIP: 0010:error_entry+0x10/0x130
[   12.575849] RSP: 0000:fffffe0000002000 EFLAGS: 00000083
[   12.575849] CS:  0010 DS: 0000 ES: 0000 CR0: 0000000080050033
[   12.575849] CR2: fffffe0000001ff8 CR3: 0000000013fb8000 CR4: 00000000003106f0
[   12.575849] Kernel panic - not syncing: Fatal exception in interrupt";
    let cr2 = entry_stack_fault(seen).expect("recognised");
    assert!(cr2.contains("CR2: fffffe0000001ff8"), "{cr2}");
    // An ordinary oops (a kernel stack, a NULL dereference) is not it.
    let other = "[    5.1] BUG: kernel NULL pointer dereference, address: 0000000000000008
[    5.1] RSP: 0018:ffffb4c2c0013e60 EFLAGS: 00010246
[    5.1] CR2: 0000000000000008 CR3: 000000000260a000 CR4: 00000000003106f0
[    5.1] Kernel panic - not syncing: Fatal exception in interrupt";
    assert_eq!(entry_stack_fault(other), None);
    // No panic, no verdict.
    assert_eq!(
        entry_stack_fault(&seen.replace("Kernel panic", "Kernel note")),
        None
    );
}
