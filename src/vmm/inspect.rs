//! Where each vCPU is, on request, while the VM runs: the evidence a stuck
//! guest leaves (SIGUSR1 in the CLI, `RunningVm::vcpu_states` in the
//! library, the test harness at a deadline).
//!
//! A vCPU's registers can only be read between two KVM_RUNs of its own
//! thread (KVM holds the vCPU while it runs, halted or not). So a request
//! bumps a generation number and kicks the vCPU threads out of KVM_RUN with
//! the same signal that stops them; each thread sees the new generation at
//! the top of its loop, reads its own registers and posts them. A kick that
//! lands outside KVM_RUN is lost, so the requester repeats it until every
//! thread answered or the time is up.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE,
    KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::VcpuFd;

/// One vCPU's state at the moment it answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuRegisters {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    pub cs: u16,
    pub idt_base: u64,
    pub idt_limit: u16,
    /// KVM's multiprocessing state (KVM_MP_STATE_*): runnable, halted,
    /// waiting for INIT or SIPI.
    pub mp_state: u32,
    /// An external interrupt KVM is injecting, with its vector.
    pub interrupt_injected: Option<u8>,
    /// The interrupt shadow (after STI or MOV SS): interrupts held back
    /// for one instruction.
    pub interrupt_shadow: bool,
    /// An exception KVM is injecting or holds pending, with its vector.
    pub exception: Option<u8>,
    pub nmi_pending: bool,
}

impl VcpuRegisters {
    /// Reads `fd`'s state. Call only from the vCPU's own thread, between
    /// two KVM_RUNs.
    pub(crate) fn read(fd: &VcpuFd) -> Result<VcpuRegisters, String> {
        let r = fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        let s = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        let mp = fd
            .get_mp_state()
            .map_err(|e| format!("KVM_GET_MP_STATE: {e}"))?;
        let ev = fd
            .get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))?;
        Ok(VcpuRegisters {
            rip: r.rip,
            rsp: r.rsp,
            rflags: r.rflags,
            cr0: s.cr0,
            cr2: s.cr2,
            cr3: s.cr3,
            cr4: s.cr4,
            efer: s.efer,
            cs: s.cs.selector,
            idt_base: s.idt.base,
            idt_limit: s.idt.limit,
            mp_state: mp.mp_state,
            interrupt_injected: (ev.interrupt.injected != 0).then_some(ev.interrupt.nr),
            interrupt_shadow: ev.interrupt.shadow != 0,
            exception: (ev.exception.injected != 0 || ev.exception.pending != 0)
                .then_some(ev.exception.nr),
            nmi_pending: ev.nmi.pending != 0 || ev.nmi.injected != 0,
        })
    }

    /// Whether the vCPU sits in HLT, waiting for an interrupt.
    pub fn halted(&self) -> bool {
        self.mp_state == KVM_MP_STATE_HALTED
    }

    /// Whether the guest accepts external interrupts (RFLAGS.IF).
    pub fn interrupts_enabled(&self) -> bool {
        self.rflags & (1 << 9) != 0
    }

    fn mp_state_name(&self) -> String {
        match self.mp_state {
            KVM_MP_STATE_RUNNABLE => "runnable".into(),
            KVM_MP_STATE_HALTED => "halted".into(),
            KVM_MP_STATE_UNINITIALIZED => "waiting for INIT".into(),
            KVM_MP_STATE_INIT_RECEIVED => "waiting for SIPI".into(),
            KVM_MP_STATE_SIPI_RECEIVED => "SIPI received".into(),
            n => format!("mp_state {n}"),
        }
    }
}

impl fmt::Display for VcpuRegisters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}, interrupts {}: rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} cs {:#x} idt {:#x}/{:#x}",
            self.mp_state_name(),
            if self.interrupts_enabled() { "on" } else { "off" },
            self.rip, self.rsp, self.rflags, self.cr0, self.cr2, self.cr3, self.cr4,
            self.efer, self.cs, self.idt_base, self.idt_limit
        )?;
        if let Some(v) = self.interrupt_injected {
            write!(f, " injecting-irq {v:#x}")?;
        }
        if self.interrupt_shadow {
            write!(f, " irq-shadow")?;
        }
        if let Some(v) = self.exception {
            write!(f, " exception {v}")?;
        }
        if self.nmi_pending {
            write!(f, " nmi-pending")?;
        }
        Ok(())
    }
}

/// What one vCPU answered to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuReport {
    pub id: usize,
    /// The registers, or why there are none (the thread did not answer in
    /// time, had ended, or KVM refused to read them).
    pub state: Result<VcpuRegisters, String>,
}

impl fmt::Display for VcpuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.state {
            Ok(r) => write!(f, "vCPU {}: {r}", self.id),
            Err(e) => write!(f, "vCPU {}: {e}", self.id),
        }
    }
}

/// How long a request waits for the vCPU threads.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// How often an unanswered request kicks again.
const KICK_EVERY: Duration = Duration::from_millis(10);

#[derive(Default)]
struct Slots {
    /// Per vCPU id: its thread while it runs its loop (to kick it).
    threads: Vec<Option<libc::pthread_t>>,
    /// Per vCPU id: the latest answer, with the generation it answers.
    answers: Vec<Option<(u64, Result<VcpuRegisters, String>)>>,
}

/// Shared by the vCPU threads and whoever asks where they are.
pub struct VcpuInspector {
    generation: AtomicU64,
    slots: Mutex<Slots>,
    answered: Condvar,
}

impl VcpuInspector {
    pub fn new(vcpus: usize) -> VcpuInspector {
        VcpuInspector {
            generation: AtomicU64::new(0),
            slots: Mutex::new(Slots {
                threads: vec![None; vcpus],
                answers: vec![None; vcpus],
            }),
            answered: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        crate::lock_or_recover(&self.slots)
    }

    /// Called by vCPU `id`'s thread as it starts its loop: from now on it
    /// may be kicked. The returned guard takes it off when the thread
    /// leaves (under the lock, so no kick ever reaches a finished thread).
    pub fn enter(&self, id: usize) -> InspectorSeat<'_> {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if let Some(t) = self.lock().threads.get_mut(id) {
            *t = Some(me);
        }
        InspectorSeat {
            inspector: self,
            id,
            seen: 0,
        }
    }

    /// Asks every vCPU for its registers and waits up to `timeout` for the
    /// answers.
    pub fn request(&self, timeout: Duration) -> Vec<VcpuReport> {
        let gen = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let deadline = Instant::now() + timeout;
        let mut slots = self.lock();
        loop {
            let mut waiting = false;
            for (id, t) in slots.threads.iter().enumerate() {
                let answered = matches!(&slots.answers[id], Some((g, _)) if *g >= gen);
                if let (false, Some(t)) = (answered, t) {
                    waiting = true;
                    // SAFETY: a thread in `threads` is running its vCPU
                    // loop (it takes itself out under this lock before it
                    // ends), so the pthread_t is valid; the kick signal has
                    // a no-op handler installed before any vCPU starts.
                    unsafe { libc::pthread_kill(*t, super::vcpu::kick_signal()) };
                }
            }
            let now = Instant::now();
            if !waiting || now >= deadline {
                break;
            }
            let wait = KICK_EVERY.min(deadline - now);
            slots = self
                .answered
                .wait_timeout(slots, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        (0..slots.answers.len())
            .map(|id| VcpuReport {
                id,
                state: match (&slots.answers[id], slots.threads[id]) {
                    (Some((g, state)), _) if *g >= gen => state.clone(),
                    (_, Some(_)) => Err(format!(
                        "no answer within {} ms (its thread is busy outside KVM_RUN)",
                        timeout.as_millis()
                    )),
                    (_, None) => Err("its thread is not running".into()),
                },
            })
            .collect()
    }
}

/// A vCPU thread's place in the inspector, for as long as it runs.
pub struct InspectorSeat<'a> {
    inspector: &'a VcpuInspector,
    id: usize,
    seen: u64,
}

impl InspectorSeat<'_> {
    /// Answers a request made since the last call, if any, with what
    /// `read` returns (the vCPU's registers): one atomic load when there is
    /// none. Call between two KVM_RUNs.
    pub fn answer_if_asked(&mut self, read: impl FnOnce() -> Result<VcpuRegisters, String>) {
        let gen = self.inspector.generation.load(Ordering::SeqCst);
        if gen == self.seen {
            return;
        }
        self.seen = gen;
        let state = read();
        let mut slots = self.inspector.lock();
        if let Some(a) = slots.answers.get_mut(self.id) {
            *a = Some((gen, state));
        }
        self.inspector.answered.notify_all();
    }
}

impl Drop for InspectorSeat<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.inspector.lock().threads.get_mut(self.id) {
            *t = None;
        }
        self.inspector.answered.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn regs(rip: u64, mp_state: u32) -> VcpuRegisters {
        VcpuRegisters {
            rip,
            rsp: 0,
            rflags: 0x2,
            cr0: 0,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            efer: 0,
            cs: 0x10,
            idt_base: 0,
            idt_limit: 0,
            mp_state,
            interrupt_injected: None,
            interrupt_shadow: false,
            exception: None,
            nmi_pending: false,
        }
    }

    /// A stand-in for a vCPU thread: it blocks in a system call that the
    /// kick interrupts (as KVM_RUN does) and answers between two of them.
    fn fake_vcpu(
        inspector: Arc<VcpuInspector>,
        id: usize,
        stop: Arc<AtomicBool>,
        entered: std::sync::mpsc::Sender<()>,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut seat = inspector.enter(id);
            entered.send(()).unwrap();
            let mut answers = 0;
            while !stop.load(Ordering::SeqCst) {
                seat.answer_if_asked(|| {
                    answers += 1;
                    Ok(regs(0x1000 * id as u64 + answers, KVM_MP_STATE_HALTED))
                });
                // SAFETY: pause has no preconditions; the kick ends it.
                unsafe { libc::pause() };
            }
        })
    }

    #[test]
    fn blocked_vcpus_are_kicked_and_answer_each_request_anew() {
        super::super::vcpu::install_kick_handler().unwrap();
        let inspector = Arc::new(VcpuInspector::new(3));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let threads: Vec<_> = (0..2)
            .map(|id| fake_vcpu(inspector.clone(), id, stop.clone(), tx.clone()))
            .collect();
        rx.recv().unwrap();
        rx.recv().unwrap();

        let first = inspector.request(Duration::from_secs(10));
        assert_eq!(first.len(), 3);
        assert_eq!(first[0].state, Ok(regs(1, KVM_MP_STATE_HALTED)));
        assert_eq!(first[1].state, Ok(regs(0x1001, KVM_MP_STATE_HALTED)));
        // vCPU 2 never started its loop: said so, not waited for.
        assert_eq!(first[2].state, Err("its thread is not running".into()));
        assert!(first[0]
            .to_string()
            .starts_with("vCPU 0: halted, interrupts off: rip 0x1 "));

        // A second request is answered afresh, not from the first answers.
        let second = inspector.request(Duration::from_secs(10));
        assert_eq!(second[0].state, Ok(regs(2, KVM_MP_STATE_HALTED)));
        assert_eq!(second[1].state, Ok(regs(0x1002, KVM_MP_STATE_HALTED)));

        stop.store(true, Ordering::SeqCst);
        // Kicks until both threads have left their loop.
        while !threads.iter().all(|t| t.is_finished()) {
            inspector.request(Duration::from_millis(20));
        }
        for t in threads {
            t.join().unwrap();
        }
        let after = inspector.request(Duration::from_secs(10));
        assert!(after.iter().all(|r| r.state.is_err()));
    }

    #[test]
    fn a_thread_that_never_comes_back_is_reported_after_the_timeout() {
        super::super::vcpu::install_kick_handler().unwrap();
        let inspector = Arc::new(VcpuInspector::new(1));
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let ins = inspector.clone();
        let t = std::thread::spawn(move || {
            let _seat = ins.enter(0);
            tx.send(()).unwrap();
            // Busy "in a device": never back at the top of the loop.
            let _ = done_rx.recv();
        });
        rx.recv().unwrap();
        let t0 = Instant::now();
        let r = inspector.request(Duration::from_millis(300));
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        let e = r[0].state.clone().unwrap_err();
        assert!(e.contains("no answer within 300 ms"), "{e}");
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    #[test]
    fn the_report_names_the_state_the_interrupts_and_pending_events() {
        let mut r = regs(0xffff_ffff_8100_0000, KVM_MP_STATE_RUNNABLE);
        r.rflags = 0x202;
        r.exception = Some(14);
        r.nmi_pending = true;
        let s = r.to_string();
        assert!(
            s.starts_with("runnable, interrupts on: rip 0xffffffff81000000 "),
            "{s}"
        );
        assert!(s.ends_with(" exception 14 nmi-pending"), "{s}");
        assert!(!r.halted() && r.interrupts_enabled());
        assert!(regs(0, KVM_MP_STATE_INIT_RECEIVED)
            .to_string()
            .starts_with("waiting for SIPI"));
    }
}
