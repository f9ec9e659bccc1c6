//! Guest RAM: anonymous host mappings from vm-memory, registered with KVM
//! as memory slots.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::ram_ranges;
use crate::error::{Error, Result};

pub fn create(mem_mib: u64) -> Result<GuestMemoryMmap> {
    let ranges: Vec<_> = ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(a, len)| (a, len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| Error::GuestMemory {
        mib: mem_mib,
        why: e.to_string(),
    })
}

pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of exactly memory_size bytes
        // owned by `mem`, which the VM keeps alive for as long as the VmFd.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Host address ranges backing guest RAM (for memory accounting).
pub fn host_ranges(mem: &GuestMemoryMmap) -> Vec<(usize, usize)> {
    mem.iter()
        .map(|r| (r.as_ptr() as usize, r.len() as usize))
        .collect()
}
