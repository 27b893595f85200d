//! Guest RAM: anonymous private mappings, reserved lazily (the host only commits the
//! pages the guest touches), registered with KVM one slot per region.

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::ram_regions;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {0} MiB of guest memory")]
    Map(u64, #[source] vm_memory::mmap::FromRangesError),
}

/// Maps `size` bytes of guest RAM, split around the MMIO hole.
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<_> = ram_regions(size).into_iter().map(|(a, l)| (a, l as usize)).collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| MemoryError::Map(size >> 20, e))
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
        let m = create_guest_memory(64 << 20).expect("map");
        assert_eq!(ram_size(&m), 64 << 20);
        assert_eq!(m.num_regions(), 1);
    }
}
