//! Loading the kernel and initramfs, and writing the boot protocol structures.
//!
//! Two entry paths: an ELF vmlinux with a PVH note enters in 32-bit protected mode
//! with `hvm_start_info` (the fastest: nothing to decompress); anything else (a bzImage,
//! or an ELF without the note) enters the 64-bit Linux boot protocol with a zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use super::{e820_map, layout};

const PVH_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The 64-bit entry of a bzImage is 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const PAGE_SIZE: u64 = 0x1000;

/// Where and how a vCPU enters the loaded kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryPoint {
    /// 32-bit protected mode at `addr`, `ebx` pointing at the PVH start info.
    Pvh(GuestAddress),
    /// 64-bit long mode at `addr`, `rsi` pointing at the zero page.
    Linux64(GuestAddress),
    /// 16-bit real mode at `addr` (segment base 0). Only for the VMM's own tiny test
    /// guests, which run on any KVM, including the PVM kind that cannot boot Linux.
    Real16(GuestAddress),
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot read kernel {0}")]
    ReadKernel(String, #[source] std::io::Error),
    #[error("kernel {0} cannot be loaded: it is not an ELF vmlinux or a bzImage, or it does not fit in guest memory")]
    KernelFormat(String, #[source] loader::Error),
    #[error("cannot read initrd {0}")]
    ReadInitrd(String, #[source] std::io::Error),
    #[error("initrd ({size} bytes) does not fit in guest memory above the kernel; give the VM more memory")]
    InitrdTooBig { size: u64 },
    #[error("kernel command line is invalid")]
    Cmdline(#[source] loader::Error),
    #[error("kernel command line is invalid")]
    CmdlineText(#[source] linux_loader::cmdline::Error),
    #[error("cannot write boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
    #[error("cannot write initrd into guest memory")]
    WriteInitrd(#[source] vm_memory::GuestMemoryError),
}

/// Result of loading the kernel.
pub struct LoadedKernel {
    pub entry: EntryPoint,
    /// Lowest address the initramfs may start at: the end of the loaded image, or
    /// for a bzImage the end of the area it decompresses itself into.
    pub kernel_end: u64,
    /// The bzImage setup header, to be copied into the zero page.
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

/// Loads `path` into guest memory at its linked physical address.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|e| BootError::ReadKernel(name.clone(), e))?;
    let mut magic = [0u8; 4];
    file.read_exact(&mut magic).map_err(|e| BootError::ReadKernel(name.clone(), e))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| BootError::ReadKernel(name.clone(), e))?;
    let highmem = Some(GuestAddress(layout::HIMEM_START));
    if magic == *b"\x7fELF" {
        let r = Elf::load(mem, None, &mut file, highmem).map_err(|e| kernel_error(&name, e))?;
        let entry = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => EntryPoint::Pvh(addr),
            _ => EntryPoint::Linux64(r.kernel_load),
        };
        Ok(LoadedKernel { entry, kernel_end: r.kernel_end, setup_header: None })
    } else {
        let r = BzImage::load(mem, None, &mut file, highmem).map_err(|e| kernel_error(&name, e))?;
        // The compressed kernel moves itself to pref_address and unpacks into
        // init_size bytes there; an initramfs below that end would be overwritten.
        let unpacked_end = r.setup_header.map_or(0, |h| {
            let (pref, init) = (h.pref_address, h.init_size);
            pref.saturating_add(u64::from(init))
        });
        Ok(LoadedKernel {
            entry: EntryPoint::Linux64(GuestAddress(r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET)),
            kernel_end: r.kernel_end.max(unpacked_end),
            setup_header: r.setup_header,
        })
    }
}

fn kernel_error(name: &str, e: loader::Error) -> BootError {
    BootError::KernelFormat(name.to_string(), e)
}

/// Places the initramfs as high in low memory as it fits (the kernel requires it
/// below 4 GiB and, for the Linux protocol, below `initrd_addr_max`), page-aligned,
/// and above the kernel image.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    ram_below_gap: u64,
) -> Result<(GuestAddress, u64), BootError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|e| BootError::ReadInitrd(name.clone(), e))?;
    let size = file.metadata().map_err(|e| BootError::ReadInitrd(name.clone(), e))?.len();
    let addr = initrd_address(size, kernel_end, ram_below_gap).ok_or(BootError::InitrdTooBig { size })?;
    // Exactly the size that was placed: a file that grows meanwhile must not spill
    // past the space reserved for it.
    let mut data = vec![0u8; size as usize];
    file.read_exact(&mut data).map_err(|e| BootError::ReadInitrd(name, e))?;
    vm_memory::Bytes::write_slice(mem, &data, addr).map_err(BootError::WriteInitrd)?;
    Ok((addr, data.len() as u64))
}

/// The highest page-aligned address where `size` bytes fit below `ram_end` without
/// overlapping the kernel, or None.
pub fn initrd_address(size: u64, kernel_end: u64, ram_end: u64) -> Option<GuestAddress> {
    // The Linux protocol's initrd_addr_max for 64-bit kernels is 2 GiB - 1 unless the
    // kernel says otherwise; staying below it keeps both protocols happy.
    let limit = ram_end.min(0x7fff_ffff + 1);
    let start = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    (start >= kernel_end && size > 0).then_some(GuestAddress(start))
}

/// Writes the command line and the boot protocol structures for `kernel`.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<(GuestAddress, u64)>,
    mem_size: u64,
) -> Result<(), BootError> {
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), cmdline).map_err(BootError::Cmdline)?;
    let cmdline_len = cmdline.as_cstring().map_err(BootError::CmdlineText)?.as_bytes_with_nul().len();
    let map = e820_map(mem_size);
    match kernel.entry {
        EntryPoint::Pvh(_) => {
            let memmap: Vec<hvm_memmap_table_entry> = map
                .iter()
                .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 })
                .collect();
            let modlist_addr = GuestAddress(layout::PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64);
            let info = hvm_start_info {
                magic: PVH_START_MAGIC,
                version: 1,
                cmdline_paddr: layout::CMDLINE_START,
                memmap_paddr: layout::ZERO_PAGE_START,
                memmap_entries: memmap.len() as u32,
                nr_modules: u32::from(initrd.is_some()),
                modlist_paddr: if initrd.is_some() { modlist_addr.raw_value() } else { 0 },
                ..Default::default()
            };
            let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
            params.set_sections(&memmap, GuestAddress(layout::ZERO_PAGE_START));
            if let Some((addr, size)) = initrd {
                let module = hvm_modlist_entry { paddr: addr.raw_value(), size, ..Default::default() };
                params.set_modules(&[module], modlist_addr);
            }
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)
        }
        EntryPoint::Real16(_) => Ok(()),
        EntryPoint::Linux64(_) => {
            let mut zp = boot_params::default();
            if let Some(hdr) = kernel.setup_header {
                zp.hdr = hdr;
            } else {
                zp.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
                zp.hdr.header = KERNEL_HDR_MAGIC;
                zp.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
            }
            zp.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            zp.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
            zp.hdr.cmdline_size = cmdline_len as u32;
            if let Some((addr, size)) = initrd {
                zp.hdr.ramdisk_image = addr.raw_value() as u32;
                zp.hdr.ramdisk_size = size as u32;
            }
            for (slot, e) in zp.e820_table.iter_mut().zip(map.iter()) {
                *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
            }
            zp.e820_entries = map.len().min(zp.e820_table.len()) as u8;
            let params = BootParams::new(&zp, GuestAddress(layout::ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn mem(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).expect("guest memory")
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let a = initrd_address(0x1234, 0x200_0000, 128 << 20).expect("fits");
        assert_eq!(a.raw_value() % PAGE_SIZE, 0);
        assert!(a.raw_value() + 0x1234 <= 128 << 20);
        assert!(a.raw_value() >= (128 << 20) - 0x2000);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_refused() {
        assert_eq!(initrd_address(120 << 20, 16 << 20, 128 << 20), None);
        assert_eq!(initrd_address(u64::MAX, 0, 128 << 20), None);
        assert_eq!(initrd_address(0, 0, 128 << 20), None);
    }

    #[test]
    fn initrd_stays_below_2g_in_big_guests() {
        let a = initrd_address(1 << 20, 16 << 20, 3 << 30).expect("fits");
        assert!(a.raw_value() + (1 << 20) <= 1 << 31);
    }

    #[test]
    fn garbage_kernel_is_a_format_error() {
        let path = std::env::temp_dir().join(format!("moat-garbage-kernel-{}", std::process::id()));
        std::fs::write(&path, vec![0x5au8; 8192]).expect("write garbage");
        let m = mem(64 << 20);
        let err = load_kernel(&m, &path).err().expect("garbage must not load");
        let _ = std::fs::remove_file(&path);
        assert!(matches!(err, BootError::KernelFormat(..)), "{err:?}");
    }

    #[test]
    fn truncated_elf_is_refused() {
        let path = std::env::temp_dir().join(format!("moat-short-elf-{}", std::process::id()));
        std::fs::write(&path, b"\x7fELF\x02\x01\x01").expect("write short elf");
        let m = mem(64 << 20);
        let r = load_kernel(&m, &path);
        let _ = std::fs::remove_file(&path);
        assert!(r.is_err());
    }

    #[test]
    fn pvh_params_are_written() {
        let m = mem(64 << 20);
        let k = LoadedKernel { entry: EntryPoint::Pvh(GuestAddress(0x100_0000)), kernel_end: 0x200_0000, setup_header: None };
        let mut cl = Cmdline::new(256).expect("cmdline");
        cl.insert_str("console=ttyS0").expect("insert");
        write_boot_params(&m, &k, &cl, Some((GuestAddress(0x300_0000), 0x1000)), 64 << 20).expect("write");
        let info: hvm_start_info = m.read_obj(GuestAddress(layout::PVH_INFO_START)).expect("read info");
        assert_eq!(info.magic, PVH_START_MAGIC);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.memmap_entries, 3);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).expect("modlist");
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1000));
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START)).expect("cmdline");
        assert_eq!(&buf, b"console=ttyS0\0");
    }

    #[test]
    fn linux_params_are_written() {
        let m = mem(64 << 20);
        let k = LoadedKernel { entry: EntryPoint::Linux64(GuestAddress(0x100_0200)), kernel_end: 0x200_0000, setup_header: None };
        let cl = Cmdline::try_from("console=ttyS0 quiet", 256).expect("cmdline");
        write_boot_params(&m, &k, &cl, None, 64 << 20).expect("write");
        let zp: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_START)).expect("zero page");
        assert_eq!({ zp.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ zp.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!(zp.e820_entries, 3);
        assert_eq!({ zp.hdr.ramdisk_size }, 0);
    }
}
