//! vhost-net: the host kernel moves frames between a NIC's RX/TX rings
//! and its TAP, so a frame never passes through rvm. rvm keeps everything
//! else: feature negotiation, the control queue, resets.
//!
//! One /dev/vhost-net handle lives as long as the NIC. Each time the
//! driver sets DRIVER_OK, [`VhostNet::start`] hands the kernel the memory
//! map, the rings, the kick eventfds (the queues' ioeventfds), the call
//! eventfds (the MSI-X vectors' irqfds) and the TAP. [`VhostNet::stop`]
//! takes it all back with VHOST_RESET_OWNER, so the same handle serves the
//! next driver after a reset or a reload.

use std::fs::File;
use std::sync::Arc;

use vhost::net::VhostNet as _;
use vhost::vhost_kern::net::Net;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::vmm::memory::GuestRam;

pub const DEVICE_PATH: &str = "/dev/vhost-net";

/// vhost adds and strips the virtio-net header itself: for a TAP without
/// IFF_VNET_HDR.
pub const F_VIRTIO_NET_HDR: u64 = 1 << 27;

#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    #[error("cannot open {DEVICE_PATH}: {0} (load the vhost_net module, or use vhost=off)")]
    Open(std::io::Error),
    #[error("{DEVICE_PATH} does not work here: {0} (use vhost=off)")]
    Unusable(vhost::Error),
    #[error(
        "{DEVICE_PATH} cannot carry a TAP without a vnet header (use vnet_hdr=on or vhost=off)"
    )]
    NoHeaderSupport,
    #[error("vhost-net: {what}: {source}")]
    Setup {
        what: &'static str,
        source: vhost::Error,
    },
}

/// One queue as the driver set it up, for the kernel to take over.
pub struct VringSetup<'a> {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// Where the kernel starts reading the available ring.
    pub next_avail: u16,
    /// The queue's ioeventfd: the guest's notifications.
    pub kick: &'a EventFd,
    /// Written by the kernel to interrupt the guest (an irqfd).
    pub call: &'a EventFd,
}

pub struct VhostNet {
    net: Net<Arc<GuestRam>>,
    /// The features the kernel's vhost-net implements.
    features: u64,
    /// Queues handed to the kernel by the last start.
    started: usize,
}

impl VhostNet {
    /// Opens /dev/vhost-net for a NIC whose guest memory is `mem`. With
    /// `vnet_hdr` false the TAP carries bare frames and vhost must add the
    /// header for the guest.
    pub fn open(mem: &GuestRam, vnet_hdr: bool) -> Result<Self, VhostError> {
        let net = Net::new(Arc::new(mem.clone())).map_err(|e| match e {
            vhost::Error::VhostOpen(io) => VhostError::Open(io),
            other => VhostError::Unusable(other),
        })?;
        let features = net.get_features().map_err(VhostError::Unusable)?;
        if !vnet_hdr && features & F_VIRTIO_NET_HDR == 0 {
            return Err(VhostError::NoHeaderSupport);
        }
        Ok(VhostNet {
            net,
            features,
            started: 0,
        })
    }

    /// The features the kernel implements (ring layout, merged buffers,
    /// VERSION_1): the device offers the guest no more than these of the
    /// bits vhost interprets.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Hands the rings and the TAP to the kernel. `acked` is what the
    /// driver accepted; only the bits vhost knows are passed on. On error
    /// nothing stays with the kernel.
    pub fn start(
        &mut self,
        acked: u64,
        vnet_hdr: bool,
        rings: &[VringSetup],
        tap: &File,
    ) -> Result<(), VhostError> {
        self.stop();
        let r = self.try_start(acked, vnet_hdr, rings, tap);
        if r.is_err() {
            self.stop();
        }
        r
    }

    fn try_start(
        &mut self,
        acked: u64,
        vnet_hdr: bool,
        rings: &[VringSetup],
        tap: &File,
    ) -> Result<(), VhostError> {
        let step = |what: &'static str| move |source| VhostError::Setup { what, source };
        self.net.set_owner().map_err(step("VHOST_SET_OWNER"))?;
        // The TAP leaves from now on, even if a later step fails.
        self.started = rings.len();
        let mut features = acked & self.features;
        if !vnet_hdr {
            features |= F_VIRTIO_NET_HDR;
        }
        self.net
            .set_features(features)
            .map_err(step("VHOST_SET_FEATURES"))?;
        let regions = memory_regions(self.net_mem());
        self.net
            .set_mem_table(&regions)
            .map_err(step("VHOST_SET_MEM_TABLE"))?;
        for (i, r) in rings.iter().enumerate() {
            let config = VringConfigData {
                queue_max_size: r.size,
                queue_size: r.size,
                flags: 0,
                desc_table_addr: r.desc,
                used_ring_addr: r.used,
                avail_ring_addr: r.avail,
                log_addr: None,
            };
            self.net
                .set_vring_num(i, r.size)
                .map_err(step("VHOST_SET_VRING_NUM"))?;
            self.net
                .set_vring_addr(i, &config)
                .map_err(step("VHOST_SET_VRING_ADDR"))?;
            self.net
                .set_vring_base(i, r.next_avail)
                .map_err(step("VHOST_SET_VRING_BASE"))?;
            self.net
                .set_vring_call(i, r.call)
                .map_err(step("VHOST_SET_VRING_CALL"))?;
            self.net
                .set_vring_kick(i, r.kick)
                .map_err(step("VHOST_SET_VRING_KICK"))?;
        }
        for i in 0..rings.len() {
            self.net
                .set_backend(i, Some(tap))
                .map_err(step("VHOST_NET_SET_BACKEND"))?;
        }
        Ok(())
    }

    /// Whether the kernel has the rings now.
    pub fn running(&self) -> bool {
        self.started > 0
    }

    /// Holds the kernel's data path (it stops touching the rings and guest
    /// memory; bus mastering went off) until [`VhostNet::resume`], which
    /// carries on from where it stopped.
    pub fn pause(&mut self) {
        for i in 0..self.started {
            let _ = self.net.set_backend(i, None);
        }
    }

    /// Gives the kernel its data path back after [`VhostNet::pause`].
    pub fn resume(&mut self, tap: &File) -> Result<(), VhostError> {
        for i in 0..self.started {
            self.net
                .set_backend(i, Some(tap))
                .map_err(|source| VhostError::Setup {
                    what: "VHOST_NET_SET_BACKEND",
                    source,
                })?;
        }
        Ok(())
    }

    /// Takes the rings and the TAP back from the kernel (its worker thread
    /// ends); the handle is ready for the next start.
    pub fn stop(&mut self) {
        if self.started == 0 {
            return;
        }
        for i in 0..self.started {
            let _ = self.net.set_backend(i, None);
        }
        if let Err(e) = self.net.reset_owner() {
            log::warn!("vhost-net: VHOST_RESET_OWNER: {e}");
        }
        self.started = 0;
    }

    fn net_mem(&self) -> &GuestRam {
        use vhost::vhost_kern::VhostKernBackend;
        self.net.mem()
    }
}

impl Drop for VhostNet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The guest's RAM as the kernel must see it: guest physical range and
/// where rvm has it mapped.
fn memory_regions(mem: &GuestRam) -> Vec<VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.host_ptr() as u64,
            mmap_offset: 0,
            mmap_handle: -1,
        })
        .collect()
}

/// Whether /dev/vhost-net can be opened and answers, without keeping it.
pub fn probe(vnet_hdr: bool) -> Result<(), VhostError> {
    let mem = crate::vmm::memory::from_ranges(&[(vm_memory::GuestAddress(0), 4096)])
        .map_err(|e| VhostError::Unusable(vhost::Error::IOError(std::io::Error::other(e))))?;
    VhostNet::open(&mem, vnet_hdr).map(|_| ())
}
