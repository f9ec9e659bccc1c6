//! Guest RAM: anonymous host mappings, placed on 2 MiB boundaries and offered
//! to transparent huge pages, registered with KVM as memory slots.
//!
//! Why rvm maps RAM itself instead of letting vm-memory do it: KVM can back a
//! 2 MiB stretch of guest memory with one large page-table entry only when
//! the host address is congruent with the guest address modulo 2 MiB, and
//! vm-memory's `mmap(NULL, ...)` lands on any 4 KiB boundary. Unaligned, a
//! guest takes one nested page fault per 4 KiB it touches: measured in the
//! nested host, a stock-kernel boot to "Freeing unused kernel image" took
//! 31,407 such faults under rvm against 610 under QEMU, which aligns its RAM
//! and asks for huge pages (MADV_HUGEPAGE) the same way.

use std::io;
use std::ptr;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::BS;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestMemoryRegionBytes,
    GuestMemoryResult, GuestRegionCollection, GuestRegionMmap, GuestUsize, MemoryRegionAddress,
    VolatileSlice,
};

use crate::arch::x86_64::layout::ram_ranges;
use crate::error::{Error, Result};

/// The guest's physical memory, as the loader, KVM and every device see it.
pub type GuestRam = GuestRegionCollection<RamRegion>;

/// The large-page size of x86-64 that KVM and transparent huge pages use.
const HUGE_PAGE: usize = 2 << 20;
const PAGE: usize = 4096;

/// The guest RAM of a VM with `mem_mib` MiB, split around the MMIO hole.
pub fn create(mem_mib: u64) -> Result<GuestRam> {
    let ranges: Vec<_> = ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(a, len)| (a, len as usize))
        .collect();
    from_ranges(&ranges).map_err(|e| Error::GuestMemory {
        mib: mem_mib,
        why: e.to_string(),
    })
}

/// Guest RAM made of `(start, length)` ranges, sorted and not overlapping
/// (the device tests and fuzz targets build small memories with this).
pub fn from_ranges(ranges: &[(GuestAddress, usize)]) -> io::Result<GuestRam> {
    let regions = ranges
        .iter()
        .map(|&(start, len)| RamRegion::new(start, len))
        .collect::<io::Result<Vec<_>>>()?;
    GuestRam::from_regions(regions)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

pub fn register(vm: &VmFd, mem: &GuestRam) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.host_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of exactly memory_size bytes
        // owned by `mem`, which the VM keeps alive for as long as the VmFd.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Host address ranges backing guest RAM (for memory accounting).
pub fn host_ranges(mem: &GuestRam) -> Vec<(usize, usize)> {
    mem.iter()
        .map(|r| (r.host_ptr() as usize, r.len() as usize))
        .collect()
}

/// One contiguous stretch of guest RAM: vm-memory's view of it, over a
/// mapping this region owns.
#[derive(Debug)]
pub struct RamRegion {
    // Fields drop in declaration order: the view (which does not own the
    // memory) goes before the mapping it points into.
    view: GuestRegionMmap,
    mapping: AlignedMapping,
}

impl RamRegion {
    fn new(start: GuestAddress, len: usize) -> io::Result<Self> {
        let mapping = AlignedMapping::new(len)?;
        // SAFETY: `mapping` is a live mapping of at least `len` bytes, and it
        // lives in this region next to the view, which is dropped first.
        let region = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(mapping.addr) }
            .build()
            .map_err(io::Error::other)?;
        let view = GuestRegionMmap::new(region, start).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "guest RAM at {:#x} + {len:#x} wraps around",
                    start.raw_value()
                ),
            )
        })?;
        Ok(Self { view, mapping })
    }

    /// Where the region starts in rvm's address space.
    pub fn host_ptr(&self) -> *mut u8 {
        self.mapping.addr
    }
}

impl GuestMemoryRegion for RamRegion {
    type B = ();

    fn len(&self) -> GuestUsize {
        self.view.len()
    }

    fn start_addr(&self) -> GuestAddress {
        self.view.start_addr()
    }

    fn bitmap(&self) -> BS<'_, ()> {
        self.view.bitmap()
    }

    fn get_host_address(&self, addr: MemoryRegionAddress) -> GuestMemoryResult<*mut u8> {
        self.view.get_host_address(addr)
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> GuestMemoryResult<VolatileSlice<'_, BS<'_, ()>>> {
        self.view.get_slice(offset, count)
    }
}

impl GuestMemoryRegionBytes for RamRegion {}

/// A private anonymous read-write mapping that starts on a 2 MiB boundary,
/// advised for transparent huge pages, unmapped on drop.
#[derive(Debug)]
struct AlignedMapping {
    addr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory that this value alone unmaps; the
// pointer is an address that is valid from any thread.
unsafe impl Send for AlignedMapping {}
// SAFETY: as above; `&AlignedMapping` gives no access to the memory itself.
unsafe impl Sync for AlignedMapping {}

impl AlignedMapping {
    fn new(len: usize) -> io::Result<Self> {
        let len = len.next_multiple_of(PAGE);
        let oversized = len
            .checked_add(HUGE_PAGE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a new anonymous mapping at an address the kernel picks:
        // it replaces nothing.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                oversized,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base as usize;
        let start = base.next_multiple_of(HUGE_PAGE);
        let (head, tail) = (start - base, base + oversized - (start + len));
        // SAFETY: both stretches lie inside the mapping just made, outside
        // [start, start + len), and nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(base as *mut libc::c_void, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        // Best effort: a host kernel without transparent huge pages answers
        // EINVAL, and the guest runs on 4 KiB pages.
        // SAFETY: advice about our own mapping; it changes no contents.
        unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        Ok(Self {
            addr: start as *mut u8,
            len,
        })
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours, and the only view into it (the
        // RamRegion's) has been dropped already.
        unsafe { libc::munmap(self.addr.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// The flags of the mapping that contains `addr`, from /proc/self/smaps.
    fn vm_flags_at(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return Some(flags.trim().to_string());
                }
            }
        }
        None
    }

    #[test]
    fn guest_ram_sits_on_huge_page_boundaries_and_asks_for_huge_pages() {
        let ram = from_ranges(&[
            (GuestAddress(0), 6 << 20),
            (GuestAddress(4 << 30), (2 << 20) + 4096),
        ])
        .unwrap();
        for r in ram.iter() {
            let host = r.host_ptr() as usize;
            assert_eq!(host % HUGE_PAGE, 0, "region at {:#x}", r.start_addr().0);
            assert_eq!(
                r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize,
                host
            );
            let flags = vm_flags_at(host).expect("the region is mapped");
            assert!(flags.contains("rd") && flags.contains("wr"), "{flags}");
            if std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
                assert!(
                    flags.split(' ').any(|f| f == "hg"),
                    "no MADV_HUGEPAGE: {flags}"
                );
            }
        }
        // The whole of each range is usable, up to its last byte, and not beyond.
        ram.write_obj(0xa5u8, GuestAddress((6 << 20) - 1)).unwrap();
        ram.write_obj(0x5au8, GuestAddress((4 << 30) + (2 << 20) + 4095))
            .unwrap();
        assert!(ram.write_obj(0u8, GuestAddress(6 << 20)).is_err());
        assert_eq!(
            ram.read_obj::<u8>(GuestAddress((6 << 20) - 1)).unwrap(),
            0xa5
        );
    }

    fn vm_size_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn guest_ram_lives_while_a_clone_does_and_leaves_no_mapping_behind() {
        let ram = from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        ram.write_obj(0x1234_5678u32, GuestAddress(0x1000)).unwrap();
        let copy = ram.clone();
        drop(ram);
        assert_eq!(
            copy.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0x1234_5678
        );
        drop(copy);

        // 2000 VMs' worth of 1 GiB: a leaked mapping would add 2000 GiB of
        // address space, leaked alignment padding up to 4 GiB; the other
        // tests running alongside hold far less than the 1 GiB allowed.
        let before = vm_size_kib();
        for _ in 0..2000 {
            drop(from_ranges(&[(GuestAddress(0), 1 << 30)]).unwrap());
        }
        let grown = vm_size_kib().saturating_sub(before);
        assert!(grown < 1 << 20, "address space grew by {grown} KiB");
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let err = from_ranges(&[(GuestAddress(0), 2 << 20), (GuestAddress(1 << 20), 2 << 20)])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
