//! The machine: a KVM VM with guest memory, the in-kernel interrupt
//! controllers and PIT, legacy devices on the buses, and one thread per vCPU.

pub mod exit;
mod handle;
pub mod host_kvm;
pub mod inspect;
pub mod irq;
pub mod memory;
pub mod rss;
pub mod seccomp;
pub mod vcpu;

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

pub use exit::{ExitReason, ExitSignal};
pub use handle::{DataPath, NicInfo, RunningVm, VmController};
pub use inspect::{VcpuRegisters, VcpuReport};

use crate::arch::x86_64::mptable::PciIrqRoute;
use crate::arch::x86_64::{boot, cpuid, mptable, paging, regs};
use crate::bus::Bus;
use crate::config::VmConfig;
use crate::devices::e1000::{self, E1000Params, E1000};
use crate::devices::i8042::{self, I8042};
use crate::devices::serial::{self, Console, SerialDevice};
use crate::devices::virtio_net::{NetParams, VirtioNet};
use crate::devices::IrqLine;
use crate::error::{Error, Result};
use crate::net::assembly;
use crate::net::backend::NetBackend;
use crate::net::capture::CaptureControl;
use crate::net::egress::EgressControl;
use crate::net::rate_limit::LimitControl;
use crate::net::stage::Stages;
use crate::net::vhost::VhostNet;
use crate::net::NicStats;
use crate::net::{HostNic, NicModel};
use crate::pci::msix::{MsixTable, MsixVectors};
use crate::pci::{root, BarKind, HostBridge, PciAllocator, PciRoot};
use crate::virtio::pci::{self as virtio_pci, VirtioPciDevice};
use crate::virtio::VirtioDevice;
use crate::vmm::memory::GuestRam;
use irq::{GsiRouter, IntxLines};
use seccomp::ThreadFilter;
use vcpu::Vcpu;

/// Where KVM puts the TSS and identity-map pages it needs on Intel: in the
/// MMIO hole, clear of RAM and of the IOAPIC/LAPIC pages.
const KVM_TSS_ADDR: usize = 0xfffb_d000;
const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// A built, not yet running VM.
pub struct Vm {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestRam,
    vcpus: Vec<VcpuFd>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    vcpu_count: usize,
    pci: Arc<Mutex<PciRoot>>,
    pci_alloc: PciAllocator,
    gsi: Arc<GsiRouter>,
    nics: Vec<NicHandle>,
    /// TAPs and bridge ports; dropped after the NIC threads stopped.
    host_nics: Vec<HostNic>,
    intx: Arc<IntxLines>,
    intx_used: u8,
    seccomp: Option<ThreadFilter>,
}

/// A NIC plugged into the VM: what names it, its counters and the device
/// to stop at exit.
struct NicHandle {
    name: String,
    model: NicModel,
    mac: [u8; 6],
    stats: Arc<NicStats>,
    device: NicDevice,
    stages: Stages,
    /// Its rate limits, changed while it runs through the controller.
    limits: Arc<LimitControl>,
    /// Its packet capture, started and stopped through the controller.
    capture: Arc<CaptureControl>,
    /// Its egress policy (in the host kernel), changed the same way.
    egress: Arc<EgressControl>,
    /// `vhost=on`: the kernel must move this NIC's frames.
    vhost_required: bool,
}

#[derive(Clone)]
enum NicDevice {
    Virtio(Arc<Mutex<VirtioPciDevice>>),
    E1000(Arc<Mutex<E1000>>),
}

impl NicDevice {
    fn shutdown(&self) {
        match self {
            NicDevice::Virtio(d) => crate::lock_or_recover(d).shutdown(),
            NicDevice::E1000(d) => crate::lock_or_recover(d).shutdown(),
        }
    }

    /// Plugs the cable in or pulls it out (see `VirtioNet::set_link`,
    /// `E1000::set_link`).
    fn set_link(&self, up: bool) {
        match self {
            NicDevice::Virtio(d) => {
                let mut d = crate::lock_or_recover(d);
                if let Some(net) = d.device_mut().as_any_mut().downcast_mut::<VirtioNet>() {
                    net.set_link(up);
                }
            }
            NicDevice::E1000(d) => crate::lock_or_recover(d).set_link(up),
        }
    }

    /// The link the guest sees.
    fn link_up(&self) -> bool {
        match self {
            NicDevice::Virtio(d) => crate::lock_or_recover(d)
                .device_mut()
                .as_any_mut()
                .downcast_mut::<VirtioNet>()
                .is_some_and(|n| n.link_up()),
            NicDevice::E1000(d) => crate::lock_or_recover(d).link_up(),
        }
    }
}

impl Vm {
    /// Builds the VM described by `config`: checks it, loads the kernel,
    /// creates devices and vCPUs. Guest console output goes to `console`.
    /// Nothing runs until [`Vm::start`].
    pub fn new(config: &VmConfig, console: Console) -> Result<Vm> {
        config.validate()?;
        // Reject a wrong kernel or initrd before touching KVM.
        boot::read_setup_header(&config.kernel)?;
        if let Some(initrd) = &config.initrd {
            std::fs::File::open(initrd).map_err(|source| Error::InitrdRead {
                path: initrd.clone(),
                source,
            })?;
        }

        // The host side of each NIC first: a bad TAP, bridge or script
        // fails here, before KVM is touched, and nothing is left behind.
        let mut nic_configs = config.nics.clone();
        crate::net::config::validate_all(&mut nic_configs, config.vcpus)
            .map_err(|e| Error::InvalidConfig(e.to_string()))?;
        // vhost=on must work before anything is created.
        for cfg in &nic_configs {
            assembly::check_vhost_policy(cfg)?;
        }
        let host_nics = nic_configs
            .iter()
            .map(HostNic::setup)
            .collect::<std::result::Result<Vec<_>, _>>()?;

        let seccomp = ThreadFilter::new(config.seccomp).map_err(Error::Seccomp)?;
        let kvm =
            Kvm::new().map_err(|e| Error::KvmOpen(std::io::Error::from_raw_os_error(e.errno())))?;
        if let Some(why) = host_kvm::this_host_pvm_warning() {
            log::warn!("{why}");
        }
        for (cap, name) in [
            (Cap::Irqchip, "an in-kernel irqchip"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::Pit2, "an in-kernel PIT"),
            (Cap::UserMemory, "user memory regions"),
            (Cap::SetTssAddr, "KVM_SET_TSS_ADDR"),
            (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(Error::KvmMissingCap(name));
            }
        }
        let max = kvm.get_max_vcpus();
        if usize::from(config.vcpus) > max {
            return Err(Error::InvalidConfig(format!(
                "--cpus {} is more than this host's KVM allows ({max})",
                config.vcpus
            )));
        }

        let fd = Arc::new(kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?);
        fd.set_tss_address(KVM_TSS_ADDR)
            .map_err(Error::kvm("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(Error::kvm("KVM_SET_IDENTITY_MAP_ADDR"))?;
        fd.create_irq_chip()
            .map_err(Error::kvm("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_bindings::kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(Error::kvm("KVM_CREATE_PIT2"))?;

        let memory = memory::create(config.mem_mib)?;
        memory::register(&fd, &memory)?;
        let mem_bytes = config.mem_mib << 20;
        let entry = boot::load_linux(
            &memory,
            mem_bytes,
            &config.kernel,
            config.initrd.as_deref(),
            &config.cmdline,
        )?;
        mptable::write(&memory, config.vcpus, &[])?;
        paging::write_gdt_idt(&memory)?;
        let cr3 = paging::write_identity_page_tables(&memory)?;

        let exit = Arc::new(ExitSignal::new()?);
        let pio = Arc::new(Bus::new());
        let mmio = Arc::new(Bus::new());
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            irq_line(&fd, serial::COM1_IRQ)?,
            console,
        )));
        pio.insert(serial::COM1_PORT, serial::PORT_LEN, serial.clone())
            .map_err(|e| Error::Device(format!("serial: {e}")))?;
        let exit_for_reset = exit.clone();
        let i8042 = Arc::new(Mutex::new(I8042::new(
            irq_line(&fd, i8042::KBD_IRQ)?,
            Box::new(move || exit_for_reset.request(ExitReason::Reset)),
        )));
        pio.insert(i8042::BASE_PORT, i8042::PORT_LEN, i8042.clone())
            .map_err(|e| Error::Device(format!("i8042: {e}")))?;

        let mut pci = PciRoot::new(&pio, &mmio);
        pci.add(Arc::new(Mutex::new(HostBridge::new())));
        let pci = Arc::new(Mutex::new(pci));
        pio.insert(root::CONFIG_ADDRESS_PORT, root::PORT_LEN, pci.clone())
            .map_err(|e| Error::Device(format!("PCI config ports: {e}")))?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::with_capacity(config.vcpus.into());
        for id in 0..config.vcpus {
            let vcpu = fd
                .create_vcpu(u64::from(id))
                .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
            let entries = cpuid::for_vcpu(supported.as_slice(), id, config.vcpus);
            let cpuid = CpuId::from_entries(&entries)
                .map_err(|e| Error::BootSetup(format!("CPUID table: {e:?}")))?;
            vcpu.set_cpuid2(&cpuid)
                .map_err(Error::kvm("KVM_SET_CPUID2"))?;
            let boot = (id == 0).then_some((entry.entry_64, entry.zero_page));
            regs::configure_vcpu(&vcpu, boot, cr3)?;
            vcpus.push(vcpu);
        }

        Ok(Vm {
            _kvm: kvm,
            gsi: Arc::new(GsiRouter::new(fd.clone())),
            intx: Arc::new(IntxLines::new(fd.clone())),
            fd,
            memory,
            vcpu_count: vcpus.len(),
            vcpus,
            pio,
            mmio,
            exit,
            serial,
            i8042,
            pci,
            pci_alloc: PciAllocator::new(),
            nics: Vec::new(),
            host_nics: Vec::new(),
            intx_used: 0,
            seccomp,
        })
        .and_then(|mut vm| {
            let mut routes = Vec::new();
            for (cfg, host) in nic_configs.iter().zip(host_nics) {
                let nic = assembly::assemble(cfg, &host, &vm.memory)?;
                // vhost-net may move this NIC's frames: a capture must
                // also watch the TAP from the kernel's side.
                let kernel_path = !nic.vhost.is_empty();
                match nic.model {
                    NicModel::E1000 => {
                        let backend = nic.backends[0].clone();
                        let (_, route) = vm.add_e1000(backend, nic.mac, nic.tap_name)?;
                        routes.push(route);
                    }
                    NicModel::Virtio => {
                        vm.add_virtio_net_pairs(nic.backends, nic.mac, nic.mtu, nic.vhost)?;
                    }
                }
                vm.name_last_nic(&nic.name);
                if let Some(n) = vm.nics.last_mut() {
                    n.vhost_required = cfg.vhost == crate::net::VhostMode::On;
                    // Before the guest's first frame; the NIC is on rvm's
                    // data path (assemble declined vhost-net for limits).
                    n.limits.set(cfg.limits).map_err(|source| Error::Stage {
                        nic: n.name.clone(),
                        source,
                    })?;
                    n.egress = host.egress();
                    n.egress.attach(&n.stages).map_err(|source| Error::Stage {
                        nic: n.name.clone(),
                        source,
                    })?;
                    n.capture = Arc::new(CaptureControl::new(
                        n.stages.clone(),
                        host.ifindex(),
                        kernel_path,
                    ));
                    if let Some((path, snap_len)) = &cfg.dump {
                        n.capture
                            .start(path, *snap_len)
                            .map_err(|source| Error::Capture {
                                nic: n.name.clone(),
                                source,
                            })?;
                    }
                }
                vm.host_nics.push(host);
            }
            if !routes.is_empty() {
                // The guest finds each INTA# route in the MP table.
                mptable::write(&vm.memory, config.vcpus, &routes)?;
            }
            Ok(vm)
        })
    }

    /// Plugs a virtio-net-pci NIC whose frames go to and come from
    /// `backend`. Returns its counters. Call before [`Vm::start`].
    pub fn add_virtio_net(
        &mut self,
        backend: Arc<dyn NetBackend>,
        mac: [u8; 6],
        mtu: u16,
        vhost: Option<VhostNet>,
    ) -> Result<Arc<NicStats>> {
        self.add_virtio_net_pairs(vec![backend], mac, mtu, vhost.into_iter().collect())
    }

    /// Plugs a multiqueue virtio-net-pci NIC: one RX/TX queue pair per
    /// backend (the queues of one multi-queue TAP), with VIRTIO_NET_F_MQ
    /// when there are several, and vhost-net for every pair (one device
    /// each) or none. Returns its counters. Call before [`Vm::start`].
    pub fn add_virtio_net_pairs(
        &mut self,
        backends: Vec<Arc<dyn NetBackend>>,
        mac: [u8; 6],
        mtu: u16,
        vhost: Vec<VhostNet>,
    ) -> Result<Arc<NicStats>> {
        if backends.is_empty() || backends.len() > usize::from(crate::net::config::MAX_QUEUE_PAIRS)
        {
            return Err(Error::InvalidConfig(format!(
                "a virtio-net NIC has 1 to {} queue pairs, one backend each; {} given",
                crate::net::config::MAX_QUEUE_PAIRS,
                backends.len()
            )));
        }
        let index = self.nics.len();
        let net = VirtioNet::with_pairs(
            NetParams {
                mac,
                mtu,
                name: format!("net{index}"),
            },
            backends,
            vhost,
        );
        let stats = net.stats();
        let stages = net.stages();
        // One vector per queue and one for configuration changes.
        let vectors = (0..=net.queue_max_sizes().len())
            .map(|_| self.gsi.msi_irqfd())
            .collect::<Result<Vec<_>>>()?;
        let msix = MsixTable::new(Arc::new(MsixVectors::new(vectors)), self.gsi.clone());
        let bar = self
            .pci_alloc
            .allocate(BarKind::Memory32, virtio_pci::BAR_SIZE)
            .map_err(|e| Error::Device(format!("virtio-net: {e}")))?;
        let dev = VirtioPciDevice::new(
            Box::new(net),
            self.memory.clone(),
            Some(self.fd.clone()),
            bar,
            msix,
        )
        .map_err(|e| Error::Device(e.to_string()))?;
        let dev = Arc::new(Mutex::new(dev));
        self.plug_nic(
            dev.clone(),
            stats.clone(),
            stages,
            (NicModel::Virtio, mac),
            NicDevice::Virtio(dev),
        )?;
        Ok(stats)
    }

    /// Puts a NIC on the PCI bus and in the list stopped at exit; returns
    /// its device number.
    fn plug_nic(
        &mut self,
        dev: crate::pci::root::SharedDevice,
        stats: Arc<NicStats>,
        stages: Stages,
        (model, mac): (NicModel, [u8; 6]),
        device: NicDevice,
    ) -> Result<u8> {
        let slot = crate::lock_or_recover(&self.pci)
            .add(dev)
            .ok_or_else(|| Error::Device("the PCI bus is full (32 devices)".into()))?;
        let name = format!("net{}", self.nics.len());
        self.nics.push(NicHandle {
            name,
            model,
            mac,
            stats,
            device,
            limits: Arc::new(LimitControl::new(stages.clone())),
            // A NIC on a backend of the caller's: no TAP to watch from
            // the kernel's side (Vm::new gives its own NICs that view).
            capture: Arc::new(CaptureControl::new(stages.clone(), None, false)),
            // No TAP of rvm's: a policy set later runs as a stage (Vm::new
            // gives its own NICs theirs).
            egress: {
                let e = EgressControl::none();
                // No stage is pending, so nothing can be refused here.
                let _ = e.attach(&stages);
                Arc::new(e)
            },
            stages,
            vhost_required: false,
        });
        Ok(slot)
    }

    /// Names the NIC added last after its host TAP.
    fn name_last_nic(&mut self, name: &str) {
        if let Some(n) = self.nics.last_mut() {
            n.name = name.to_string();
        }
    }

    /// Plugs an e1000 (82540EM) whose frames go to and come from
    /// `backend`, with its INTA# on an IOAPIC input of its own where one
    /// is free. Returns its counters and the MP table route for its
    /// interrupt. Call before [`Vm::start`].
    pub fn add_e1000(
        &mut self,
        backend: Arc<dyn NetBackend>,
        mac: [u8; 6],
        tap_name: Option<String>,
    ) -> Result<(Arc<NicStats>, PciIrqRoute)> {
        let index = self.nics.len();
        let mmio = self
            .pci_alloc
            .allocate(BarKind::Memory32, e1000::MMIO_SIZE)
            .map_err(|e| Error::Device(format!("e1000: {e}")))?;
        let io = self
            .pci_alloc
            .allocate(BarKind::Io, e1000::IO_SIZE)
            .map_err(|e| Error::Device(format!("e1000: {e}")))?;
        // PCI INTx inputs are IOAPIC pins 16-23; more e1000s share them.
        let pin = 16 + (self.intx_used % 8);
        self.intx_used += 1;
        let line = self
            .intx
            .line(u32::from(pin))
            .ok_or_else(|| Error::Device("e1000: too many INTx devices (64)".into()))?;
        let dev = E1000::new(
            E1000Params {
                mac,
                tap_name,
                mmio_addr: mmio,
                io_addr: io,
                irq_line: pin,
                name: format!("net{index}"),
                seccomp: self.seccomp.clone(),
            },
            self.memory.clone(),
            backend,
            Box::new(line),
        )
        .map_err(|e| Error::Device(e.to_string()))?;
        let stats = dev.stats();
        let stages = dev.stages();
        let dev = Arc::new(Mutex::new(dev));
        let slot = self.plug_nic(
            dev.clone(),
            stats.clone(),
            stages,
            (NicModel::E1000, mac),
            NicDevice::E1000(dev),
        )?;
        let route = PciIrqRoute {
            device: slot,
            pin: 1,
            ioapic_pin: pin,
        };
        Ok((stats, route))
    }

    /// Starts one thread per vCPU and returns at once.
    /// NIC `index`'s stages (in configuration order): every frame of the
    /// NIC passes them. Add stages here before [`Vm::start`] so the guest
    /// never sends a frame past them; [`RunningVm::nic_stages`] changes
    /// them later.
    pub fn nic_stages(&self, index: usize) -> Option<Stages> {
        self.nics.get(index).map(|n| n.stages.clone())
    }

    pub fn start(self) -> Result<RunningVm> {
        // vhost=on and a stage that needs the frames in rvm cannot both
        // hold: refuse before the guest runs.
        for n in &self.nics {
            assembly::check_stages_against_vhost(&n.name, n.vhost_required, &n.stages)?;
        }
        vcpu::install_kick_handler().map_err(Error::VcpuThread)?;
        let mut threads = Vec::with_capacity(self.vcpu_count);
        let inspector = Arc::new(inspect::VcpuInspector::new(self.vcpu_count));
        for (id, fd) in self.vcpus.into_iter().enumerate() {
            let v = Vcpu {
                id,
                fd,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                exit: self.exit.clone(),
                inspector: inspector.clone(),
            };
            // NIC workers started by the guest's driver (at DRIVER_OK, on
            // a vCPU thread) inherit the vCPU's filter.
            let filter = self.seccomp.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    seccomp::confine(filter.as_ref(), &format!("vcpu{id}"));
                    v.run()
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    // Stop what already runs before reporting.
                    self.exit
                        .request(ExitReason::Error(format!("cannot start vCPU {id}: {e}")));
                    stop_vcpus(threads);
                    return Err(Error::VcpuThread(e));
                }
            }
        }
        Ok(RunningVm::new(
            threads,
            self.exit,
            inspector,
            self.serial,
            self.i8042,
            self.memory,
            self.nics,
            self.host_nics,
            [self.pio, self.mmio],
            self.fd,
        ))
    }
}

fn irq_line(vm: &VmFd, gsi: u32) -> Result<IrqLine> {
    let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
    vm.register_irqfd(&evt, gsi)
        .map_err(Error::kvm("KVM_IRQFD"))?;
    Ok(IrqLine(evt))
}

/// Kicks every vCPU thread out of KVM_RUN until it has ended. A kick can
/// land while a thread is outside KVM_RUN and be lost, so it is repeated.
pub(crate) fn stop_vcpus(threads: Vec<JoinHandle<()>>) {
    let sig = vcpu::kick_signal();
    let mut pending = threads;
    while !pending.is_empty() {
        for t in &pending {
            // SAFETY: the pthread_t belongs to a thread we spawned and have
            // not joined, so it is valid; the signal has a handler installed.
            unsafe { libc::pthread_kill(t.as_pthread_t(), sig) };
        }
        std::thread::sleep(Duration::from_millis(5));
        let (done, running): (Vec<_>, Vec<_>) = pending.into_iter().partition(|t| t.is_finished());
        for t in done {
            let _ = t.join();
        }
        pending = running;
    }
}
