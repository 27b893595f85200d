//! Guest RAM: reserved lazily (the host only commits the pages the guest touches),
//! registered with KVM one slot per region. Private anonymous memory by default; a
//! shared memory file when a vhost-user backend (virtiofsd) must map it too.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::x86_64::ram_regions;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {0} MiB of guest memory: {1}")]
    Map(u64, String),
}

const HUGE_PAGE: u64 = 2 << 20;

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backing {
    /// Place regions 2 MiB-aligned and mark them MADV_HUGEPAGE.
    pub huge_pages: bool,
    /// Back RAM with one sealed memfd mapped MAP_SHARED, so that a vhost-user backend
    /// given the fd sees the same pages (regions then carry a `FileOffset`).
    pub shared: bool,
}

/// Maps `size` bytes of guest RAM, split around the MMIO hole.
///
/// With `huge_pages`, each region is placed at a 2 MiB-aligned host address and
/// marked MADV_HUGEPAGE. KVM can map guest memory 2 MiB at a time only where the
/// host address and the guest address agree modulo 2 MiB, so the alignment is what
/// makes transparent huge pages count: a booting guest then takes tens of page-fault
/// exits instead of thousands (measured in the test host: 7,238 4 KiB faults without;
/// QEMU aligns its RAM the same way). Host memory still grows only as the guest
/// touches it, in 2 MiB steps where huge pages are available.
///
/// With `shared`, the pages are shmem: MADV_HUGEPAGE then only takes effect where the
/// host's `/sys/kernel/mm/transparent_hugepage/shmem_enabled` is `advise`, `always`
/// or `within_size` (Debian's default is `never`, which leaves shared guest RAM on
/// 4 KiB pages whatever we ask).
///
/// Those aligned mappings are never unmapped: they live as long as the process, which
/// for `moat-vmm` (one VM per process, exiting when it stops) is the VM's lifetime.
/// Leaking is the sound choice here, since clones of the memory object may outlive
/// any owner we could give the mapping.
pub fn create_guest_memory(size: u64, backing: Backing) -> Result<GuestMemoryMmap, MemoryError> {
    let err = |e: String| MemoryError::Map(size >> 20, e);
    let ranges = ram_regions(size);
    if !backing.huge_pages && !backing.shared {
        let ranges: Vec<_> = ranges.into_iter().map(|(a, l)| (a, l as usize)).collect();
        return GuestMemoryMmap::from_ranges(&ranges).map_err(|e| err(e.to_string()));
    }
    let file = if backing.shared { Some(Arc::new(shared_file(size).map_err(|e| err(e.to_string()))?)) } else { None };
    let mut offset = 0;
    let mut regions = Vec::with_capacity(ranges.len());
    for (gpa, len) in ranges {
        let backing_file = file.as_ref().map(|f| FileOffset::from_arc(f.clone(), offset));
        regions.push(aligned_region(gpa, len, backing_file, backing.huge_pages).map_err(err)?);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| err(e.to_string()))
}

/// A memfd of `size` bytes, sealed so that its size can never change: a backend that
/// holds the fd cannot shrink it under the VMM (which would turn guest RAM accesses
/// into SIGBUS) nor grow it.
fn shared_file(size: u64) -> std::io::Result<File> {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: the name is a NUL-terminated literal; the result is checked below.
    let fd = unsafe { libc::memfd_create(c"moat-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd we own takes an int argument and touches no memory.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

fn aligned_region(
    gpa: GuestAddress,
    len: u64,
    file: Option<FileOffset>,
    huge_pages: bool,
) -> Result<GuestRegionMmap, String> {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let map_len = len.checked_add(HUGE_PAGE).ok_or("size overflows")? as usize;
    // SAFETY: a fresh private anonymous mapping with no address hint touches no
    // existing memory; the result is checked below.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), map_len, prot, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let start = p as u64;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = (aligned - start) as usize;
    let tail = map_len - head - len as usize;
    // SAFETY: both ranges are the unused ends of the mapping just created above, which
    // nothing else refers to; they are page-aligned (mmap and 2 MiB alignment).
    unsafe {
        if head > 0 {
            libc::munmap(p, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    let mut region_flags = flags;
    if let Some(f) = &file {
        region_flags = libc::MAP_SHARED;
        let offset = libc::off_t::try_from(f.start()).map_err(|_| "file offset overflows")?;
        // SAFETY: MAP_FIXED replaces `[aligned, aligned+len)`, which is the reservation
        // made above and owned by nobody else yet, with the same range of the memfd;
        // the file is `len` bytes long past `offset` (sized in `shared_file`).
        let q = unsafe {
            libc::mmap(aligned as *mut libc::c_void, len as usize, prot, libc::MAP_SHARED | libc::MAP_FIXED, f.file().as_raw_fd(), offset)
        };
        if q == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().to_string());
        }
    }
    // SAFETY: `[aligned, aligned+len)` is inside the live mapping created above;
    // MADV_HUGEPAGE changes only how the kernel backs it. Best effort: without THP the
    // guest simply keeps 4 KiB pages.
    if huge_pages && unsafe { libc::madvise(aligned as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) } != 0 {
        log::debug!("MADV_HUGEPAGE on guest memory failed: {}", std::io::Error::last_os_error());
    }
    let mut builder =
        MmapRegionBuilder::new(len as usize).with_mmap_prot(prot).with_mmap_flags(region_flags);
    if let Some(f) = file {
        builder = builder.with_file_offset(f);
    }
    // SAFETY: `[aligned, aligned+len)` is a live read/write mapping made above and
    // never unmapped (see `create_guest_memory`), so it stays valid for every user of
    // the region.
    let region = unsafe { builder.with_raw_mmap_pointer(aligned as *mut u8) }.build().map_err(|e| e.to_string())?;
    GuestRegionMmap::new(region, gpa).ok_or_else(|| "region wraps the address space".to_string())
}

/// Total bytes of guest RAM.
pub fn ram_size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_add_up() {
        for (huge_pages, shared) in [(false, false), (true, false), (false, true), (true, true)] {
            let m = create_guest_memory(64 << 20, Backing { huge_pages, shared }).expect("map");
            assert_eq!(ram_size(&m), 64 << 20);
            assert_eq!(m.num_regions(), 1);
        }
    }

    #[test]
    fn huge_page_memory_is_aligned_and_usable() {
        use vm_memory::Bytes;
        let m = create_guest_memory(5 << 30, Backing { huge_pages: true, shared: false }).expect("map");
        assert_eq!(m.num_regions(), 2);
        for r in m.iter() {
            assert_eq!(r.as_ptr() as u64 % HUGE_PAGE, 0);
        }
        let top = GuestAddress(crate::arch::x86_64::layout::MMIO_GAP_END + (1 << 30));
        m.write_obj(0xfeed_u64, top).expect("write high");
        assert_eq!(m.read_obj::<u64>(top).expect("read high"), 0xfeed);
    }

    #[test]
    fn shared_memory_is_one_sealed_file_seen_through_the_fd() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let m = create_guest_memory(5 << 30, Backing { huge_pages: true, shared: true }).expect("map");
        let regions: Vec<_> = m.iter().collect();
        assert_eq!(regions.len(), 2);
        let (lo, hi) = (regions[0], regions[1]);
        let fo = hi.file_offset().expect("shared regions carry their file");
        assert_eq!(fo.start(), lo.len(), "the high region follows the low one in the file");
        assert!(Arc::ptr_eq(fo.arc(), lo.file_offset().expect("file").arc()));
        // A write through guest memory is visible through the fd, where a backend reads it.
        let top = GuestAddress(crate::arch::x86_64::layout::MMIO_GAP_END + 4096);
        m.write_obj(0x1234_5678_u32, top).expect("write");
        let mut b = [0u8; 4];
        fo.file().read_exact_at(&mut b, fo.start() + 4096).expect("read through fd");
        assert_eq!(u32::from_le_bytes(b), 0x1234_5678);
        // Sealed: the size cannot change.
        assert!(fo.file().set_len(4096).is_err());
        assert!(fo.file().set_len(6 << 30).is_err());
    }
}
