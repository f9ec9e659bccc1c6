//! Linux 64-bit boot protocol: kernel, initrd and command line into guest
//! memory, and the zero page (boot_params) with the e820 map that describes
//! it. See Documentation/arch/x86/boot.rst in the kernel tree.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::{
    low_ram_end, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_HOLE_END,
    MMIO_HOLE_START, ZERO_PAGE_START,
};
use crate::error::{Error, Result};
use crate::vmm::memory::GuestRam;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Protocol 2.12 introduced xloadflags, which says whether a 64-bit entry exists.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
const LOADED_HIGH: u8 = 0x01;
const XLF_KERNEL_64: u16 = 0x01;
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// The 64-bit entry point is 0x200 bytes into the protected-mode kernel.
const ENTRY_64_OFFSET: u64 = 0x200;
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Where the vCPUs start and what rsi points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub entry_64: u64,
    pub zero_page: u64,
}

/// Reads and checks a bzImage's setup header, so that a wrong file is
/// reported before any VM exists.
pub fn read_setup_header(path: &Path) -> Result<setup_header> {
    let mut f = File::open(path).map_err(|source| Error::KernelRead {
        path: path.to_path_buf(),
        source,
    })?;
    let mut hdr = setup_header::default();
    // SAFETY: setup_header is a packed plain-old-data struct of integers;
    // every byte pattern is a valid value, and the slice covers exactly it.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            &mut hdr as *mut setup_header as *mut u8,
            std::mem::size_of::<setup_header>(),
        )
    };
    let read = f
        .seek(SeekFrom::Start(0x1f1))
        .and_then(|_| f.read_exact(bytes));
    if let Err(e) = read {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::NotBzImage {
                path: path.to_path_buf(),
                why: "file too short",
            }
        } else {
            Error::KernelRead {
                path: path.to_path_buf(),
                source: e,
            }
        });
    }
    check_setup_header(&hdr).map_err(|why| Error::NotBzImage {
        path: path.to_path_buf(),
        why,
    })?;
    Ok(hdr)
}

/// The checks behind [`read_setup_header`], on an already-read header.
pub fn check_setup_header(hdr: &setup_header) -> std::result::Result<(), &'static str> {
    let (magic, version, loadflags, xloadflags) =
        (hdr.header, hdr.version, hdr.loadflags, hdr.xloadflags);
    if magic != HDRS_MAGIC {
        return Err("no HdrS signature at offset 0x202");
    }
    if version < MIN_BOOT_PROTOCOL {
        return Err("boot protocol older than 2.12");
    }
    if loadflags & LOADED_HIGH == 0 {
        return Err("kernel is not loaded high");
    }
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err("kernel has no 64-bit entry point");
    }
    Ok(())
}

/// The e820 map for a guest with `mem_bytes` of RAM: base memory up to the
/// EBDA (where the MP table lives), RAM from 1 MiB to the MMIO hole, and
/// RAM above 4 GiB when there is more.
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let entry = |addr, size, r#type| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        entry(HIMEM_START, low_ram_end(mem_bytes) - HIMEM_START, E820_RAM),
    ];
    if mem_bytes > MMIO_HOLE_START {
        map.push(entry(MMIO_HOLE_END, mem_bytes - MMIO_HOLE_START, E820_RAM));
    }
    map
}

/// Fills the zero page from the kernel's own setup header plus what the
/// loader decides: command line, initrd and memory map.
pub fn build_boot_params(
    hdr: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    mem_bytes: u64,
) -> boot_params {
    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_bytes);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    params
}

/// Where the kernel decompresses itself and runs, loaded at 1 MiB: the
/// load address rounded up to its alignment, but never below its
/// preferred address (LOAD_PHYSICAL_ADDR, 16 MiB for distribution
/// kernels): a relocatable kernel's startup code moves itself there
/// before it decompresses (arch/x86/boot/compressed/head_64.S), and one
/// that is not relocatable runs there anyway. Its init_size bytes are
/// counted from here, not from the load address.
pub fn runtime_start(hdr: &setup_header) -> u64 {
    let align = u64::from(hdr.kernel_alignment);
    let load = if align.is_power_of_two() {
        HIMEM_START.next_multiple_of(align)
    } else {
        HIMEM_START
    };
    load.max(hdr.pref_address)
}

/// Picks the initrd address: page-aligned, as high as the kernel allows,
/// and above the memory the kernel will decompress into.
pub fn place_initrd(size: u64, hdr: &setup_header, mem_bytes: u64, kernel_end: u64) -> Result<u64> {
    let addr_max = match hdr.initrd_addr_max {
        0 => DEFAULT_INITRD_ADDR_MAX,
        m => u64::from(m),
    };
    let top = (addr_max + 1).min(low_ram_end(mem_bytes));
    let too_large = Error::InitrdTooLarge { size, limit: top };
    let addr = top.checked_sub(size).ok_or(too_large)? & !0xfff;
    if addr < kernel_end {
        return Err(Error::InitrdTooLarge { size, limit: top });
    }
    Ok(addr)
}

/// Loads everything a Linux guest needs to boot and returns its entry.
pub fn load_linux(
    mem: &GuestRam,
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
) -> Result<BootEntry> {
    let hdr = read_setup_header(kernel)?;
    // The kernel decompresses and runs in init_size bytes from where it
    // moves itself: check they fit before loading anything, and keep the
    // initrd above them.
    let start = runtime_start(&hdr);
    let init_size = u64::from(hdr.init_size);
    let kernel_end = start.saturating_add(init_size);
    if kernel_end > low_ram_end(mem_bytes) {
        return Err(Error::KernelLoad(format!(
            "it needs {} MiB from {} MiB",
            init_size.div_ceil(1 << 20),
            start >> 20
        )));
    }

    let mut f = File::open(kernel).map_err(|source| Error::KernelRead {
        path: kernel.to_path_buf(),
        source,
    })?;
    let loaded = BzImage::load(mem, Some(GuestAddress(HIMEM_START)), &mut f, None)
        .map_err(|e| Error::KernelLoad(e.to_string()))?;
    let hdr = loaded.setup_header.unwrap_or(hdr);

    let cmdline_capacity = match hdr.cmdline_size {
        0 => 256,
        n => (n as usize + 1).min(CMDLINE_MAX_SIZE),
    };
    let mut cl = Cmdline::new(cmdline_capacity).map_err(|e| Error::Cmdline(e.to_string()))?;
    if !cmdline.trim().is_empty() {
        cl.insert_str(cmdline.trim())
            .map_err(|e| Error::Cmdline(format!("{e} (at most {} bytes)", cmdline_capacity - 1)))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    let cmdline_len = cl
        .as_cstring()
        .map_err(|e| Error::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    let initrd_placed = match initrd {
        Some(path) => Some(load_initrd(mem, mem_bytes, path, &hdr, kernel_end)?),
        None => None,
    };

    let params = build_boot_params(hdr, cmdline_len, initrd_placed, mem_bytes);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|e| Error::BootSetup(format!("boot_params: {e}")))?;

    Ok(BootEntry {
        entry_64: loaded.kernel_load.raw_value() + ENTRY_64_OFFSET,
        zero_page: ZERO_PAGE_START,
    })
}

fn load_initrd(
    mem: &GuestRam,
    mem_bytes: u64,
    path: &Path,
    hdr: &setup_header,
    kernel_end: u64,
) -> Result<(u64, u64)> {
    let read_err = |source| Error::InitrdRead {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    let addr = place_initrd(size, hdr, mem_bytes, kernel_end)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| Error::InitrdRead {
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_hdr() -> setup_header {
        setup_header {
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            xloadflags: XLF_KERNEL_64,
            initrd_addr_max: 0x7fff_ffff,
            init_size: 0x100_0000,
            cmdline_size: 2047,
            setup_sects: 4,
            ..Default::default()
        }
    }

    #[test]
    fn e820_small_guest() {
        let map = e820_map(256 << 20);
        let v: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            v,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, (256 << 20) - 0x100000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_large_guest_skips_the_hole() {
        let map = e820_map(6 << 30);
        let total_ram: u64 = map
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| e.size)
            .sum();
        // All RAM but the 384 KiB between the EBDA and 1 MiB.
        assert_eq!(total_ram, (6 << 30) - (0x100000 - 0x9fc00));
        let last = map.last().unwrap();
        assert_eq!((last.addr, last.size), (4 << 30, 3 << 30));
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
    }

    #[test]
    fn boot_params_contents() {
        let p = build_boot_params(valid_hdr(), 42, Some((0x800_0000, 0x1234)), 512 << 20);
        let h = p.hdr;
        assert_eq!({ h.boot_flag }, 0xaa55);
        assert_eq!({ h.header }, HDRS_MAGIC);
        assert_eq!({ h.type_of_loader }, 0xff);
        assert_eq!({ h.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ h.cmdline_size }, 42);
        assert_eq!(
            ({ h.ramdisk_image }, { h.ramdisk_size }),
            (0x800_0000, 0x1234)
        );
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!(({ e.addr }, { e.size }), (0x100000, (512 << 20) - 0x100000));
        // The kernel's own header fields are kept.
        assert_eq!({ h.version }, 0x020f);
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
    }

    #[test]
    fn header_checks() {
        assert!(check_setup_header(&valid_hdr()).is_ok());
        let mut h = valid_hdr();
        h.header = 0;
        assert_eq!(
            check_setup_header(&h),
            Err("no HdrS signature at offset 0x202")
        );
        let mut h = valid_hdr();
        h.version = 0x0206;
        assert!(check_setup_header(&h).is_err());
        let mut h = valid_hdr();
        h.xloadflags = 0;
        assert_eq!(
            check_setup_header(&h),
            Err("kernel has no 64-bit entry point")
        );
        let mut h = valid_hdr();
        h.loadflags = 0;
        assert!(check_setup_header(&h).is_err());
    }

    #[test]
    fn the_kernel_is_counted_from_where_it_moves_itself_to() {
        // A distribution kernel: 2 MiB aligned, preferring 16 MiB. Loaded
        // at 1 MiB, it decompresses in [16 MiB, 16 MiB + init_size).
        let hdr = setup_header {
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            ..valid_hdr()
        };
        assert_eq!(runtime_start(&hdr), 0x100_0000);
        // An initrd at 1 MiB + init_size would be overwritten when the
        // kernel moves itself up: it goes above 16 MiB + init_size.
        let end = runtime_start(&hdr) + u64::from(hdr.init_size);
        assert!(place_initrd(8 << 20, &hdr, 36 << 20, end).is_err());
        assert!(place_initrd(8 << 20, &hdr, 40 << 20, end).unwrap() >= end);
        // No preferred address: the load address rounded up to the
        // alignment; an alignment that is not a power of two is ignored.
        let hdr = setup_header {
            kernel_alignment: 0x20_0000,
            pref_address: 0,
            ..valid_hdr()
        };
        assert_eq!(runtime_start(&hdr), 0x20_0000);
        let hdr = setup_header {
            kernel_alignment: 3,
            ..hdr
        };
        assert_eq!(runtime_start(&hdr), HIMEM_START);
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let hdr = valid_hdr();
        let addr = place_initrd(0x12345, &hdr, 256 << 20, 0x200_0000).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 0x12345 <= 256 << 20);
        assert!(addr > (256 << 20) - 0x14000);
        // Capped by initrd_addr_max for a large guest.
        let addr = place_initrd(0x1000, &hdr, 3 << 30, 0x200_0000).unwrap();
        assert_eq!(addr, 0x8000_0000 - 0x1000);
        // Too large: would overlap the kernel.
        let err = place_initrd(250 << 20, &hdr, 256 << 20, 0x200_0000).unwrap_err();
        assert!(err.to_string().contains("--mem"));
        assert!(place_initrd(u64::MAX, &hdr, 256 << 20, 0).is_err());
    }

    #[test]
    fn not_a_bzimage() {
        let dir = std::env::temp_dir().join(format!("rvm-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short");
        std::fs::write(&short, b"hello").unwrap();
        let e = read_setup_header(&short).unwrap_err().to_string();
        assert!(
            e.contains("not a bzImage") && e.contains("too short"),
            "{e}"
        );
        let zeros = dir.join("zeros");
        std::fs::write(&zeros, vec![0u8; 8192]).unwrap();
        let e = read_setup_header(&zeros).unwrap_err().to_string();
        assert!(e.contains("HdrS"), "{e}");
        let e = read_setup_header(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read kernel"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loads_a_fake_kernel() {
        // A synthetic bzImage: a setup area with a valid header, then a payload.
        let mut image = vec![0u8; 5 * 512 + 4096];
        let hdr = valid_hdr();
        // SAFETY: setup_header is plain old data; reading its bytes is sound.
        let hb = unsafe {
            std::slice::from_raw_parts(
                &hdr as *const setup_header as *const u8,
                std::mem::size_of::<setup_header>(),
            )
        };
        image[0x1f1..0x1f1 + hb.len()].copy_from_slice(hb);
        image[5 * 512..].fill(0xab);
        let dir = std::env::temp_dir().join(format!("rvm-load-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (k, i) = (dir.join("bzImage"), dir.join("initrd"));
        std::fs::write(&k, &image).unwrap();
        std::fs::write(&i, vec![0xcd; 10_000]).unwrap();
        let mem_bytes = 64 << 20;
        let mem =
            crate::vmm::memory::from_ranges(&[(GuestAddress(0), mem_bytes as usize)]).unwrap();
        let entry = load_linux(&mem, mem_bytes, &k, Some(&i), "console=ttyS0 quiet").unwrap();
        assert_eq!(entry.entry_64, HIMEM_START + 0x200);
        let b: u8 = mem.read_obj(GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(b, 0xab);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let (ri, rs) = (params.hdr.ramdisk_image as u64, params.hdr.ramdisk_size);
        assert_eq!(rs, 10_000);
        let ib: u8 = mem.read_obj(GuestAddress(ri + 9_999)).unwrap();
        assert_eq!(ib, 0xcd);
        let mut cl = [0u8; 20];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&cl, b"console=ttyS0 quiet\0");
        assert_eq!({ params.hdr.cmdline_size }, 19);
        // Too little memory for init_size.
        let small = crate::vmm::memory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let e = load_linux(&small, 16 << 20, &k, None, "").unwrap_err();
        assert!(e.to_string().contains("--mem"), "{e}");
        // A kernel preferring 16 MiB moves itself there before it
        // decompresses into init_size (16 MiB) bytes: 24 MiB is too little
        // (from 1 MiB it would fit, and the initrd at the top of the 24
        // MiB would be overwritten), 40 MiB is enough, the initrd above.
        let hdr = setup_header {
            kernel_alignment: 0x20_0000,
            pref_address: 0x100_0000,
            ..valid_hdr()
        };
        // SAFETY: as above.
        let hb = unsafe {
            std::slice::from_raw_parts(
                &hdr as *const setup_header as *const u8,
                std::mem::size_of::<setup_header>(),
            )
        };
        image[0x1f1..0x1f1 + hb.len()].copy_from_slice(hb);
        std::fs::write(&k, &image).unwrap();
        let mem24 = crate::vmm::memory::from_ranges(&[(GuestAddress(0), 24 << 20)]).unwrap();
        let e = load_linux(&mem24, 24 << 20, &k, Some(&i), "").unwrap_err();
        assert!(e.to_string().contains("16 MiB from 16 MiB"), "{e}");
        let mem40 = crate::vmm::memory::from_ranges(&[(GuestAddress(0), 40 << 20)]).unwrap();
        load_linux(&mem40, 40 << 20, &k, Some(&i), "").unwrap();
        let params: boot_params = mem40.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert!(u64::from(params.hdr.ramdisk_image) >= 32 << 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
