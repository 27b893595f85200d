//! x86_64 guest layout and boot-time state: where things live in guest physical
//! memory, the memory map, and the registers a vCPU starts with.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod mptable;
pub mod msr;
pub mod regs;

use vm_memory::GuestAddress;

/// Guest physical layout. Low memory below 1 MiB holds the boot structures; the kernel
/// loads at or above [`HIMEM_START`]; the 32-bit MMIO hole holds the devices.
pub mod layout {
    /// GDT used to enter the kernel.
    pub const GDT_START: u64 = 0x500;
    /// An empty IDT (the kernel installs its own before enabling interrupts).
    pub const IDT_START: u64 = 0x520;
    /// PVH `hvm_start_info`.
    pub const PVH_INFO_START: u64 = 0x6000;
    /// PVH memory map (follows the start info) or the bzImage zero page.
    pub const ZERO_PAGE_START: u64 = 0x7000;
    /// Initial stack pointer for the 64-bit entry.
    pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
    /// Identity page tables for the 64-bit (bzImage) entry: PML4, PDPT, PD.
    pub const PML4_START: u64 = 0x9000;
    pub const PDPTE_START: u64 = 0xa000;
    pub const PDE_START: u64 = 0xb000;
    /// Kernel command line.
    pub const CMDLINE_START: u64 = 0x20000;
    /// Start of the EBDA; the MP table lives here and it is not RAM in the e820 map.
    pub const EBDA_START: u64 = 0x9fc00;
    /// First byte above the legacy hole.
    pub const HIMEM_START: u64 = 0x10_0000;
    /// The 32-bit MMIO hole: guest RAM beyond this continues at 4 GiB.
    pub const MMIO_GAP_START: u64 = 0xc000_0000;
    pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
    /// virtio-mmio device windows (one 4 KiB page each) at the start of the hole.
    pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
    pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
    /// KVM needs three pages for the TSS and one for the identity map, below 4 GiB and
    /// outside RAM.
    pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
    pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
    /// Local APIC and IO-APIC.
    pub const APIC_START: u64 = 0xfee0_0000;
    pub const IOAPIC_START: u64 = 0xfec0_0000;
    /// IRQs the in-kernel IO-APIC offers (legacy ISA 0-15 plus 16-23).
    pub const IRQ_MAX: u32 = 23;
    /// First IRQ free for virtio devices (0-4 are timer, keyboard, cascade, COM2, COM1).
    pub const IRQ_VIRTIO_BASE: u32 = 5;
}

/// The RAM regions of a guest with `size` bytes of memory: below the MMIO hole, and
/// above 4 GiB for what does not fit below it.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    let below = size.min(layout::MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), below)];
    if size > below {
        regions.push((GuestAddress(layout::MMIO_GAP_END), size - below));
    }
    regions
}

/// One e820 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The memory map the guest is told about: low RAM up to the EBDA, the EBDA and BIOS
/// area reserved, then RAM from 1 MiB on (split around the MMIO hole).
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: layout::EBDA_START, kind: E820_RAM },
        E820Entry {
            addr: layout::EBDA_START,
            size: layout::HIMEM_START - layout::EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in ram_regions(size) {
        let start = start.0.max(layout::HIMEM_START);
        let end = if start >= layout::MMIO_GAP_END { start + len } else { len };
        if end > start {
            map.push(E820Entry { addr: start, size: end - start, kind: E820_RAM });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn big_guest_skips_the_mmio_hole() {
        let size = 4u64 << 30;
        let r = ram_regions(size);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0], (GuestAddress(0), layout::MMIO_GAP_START));
        assert_eq!(r[1], (GuestAddress(layout::MMIO_GAP_END), size - layout::MMIO_GAP_START));
    }

    #[test]
    fn e820_small() {
        let m = e820_map(128 << 20);
        assert_eq!(
            m,
            vec![
                E820Entry { addr: 0, size: 0x9fc00, kind: E820_RAM },
                E820Entry { addr: 0x9fc00, size: 0x100000 - 0x9fc00, kind: E820_RESERVED },
                E820Entry { addr: 0x100000, size: (128 << 20) - 0x100000, kind: E820_RAM },
            ]
        );
    }

    #[test]
    fn e820_large_covers_all_ram_once() {
        let size = 5u64 << 30;
        let m = e820_map(size);
        let ram: u64 = m.iter().filter(|e| e.kind == E820_RAM).map(|e| e.size).sum();
        // All RAM but the EBDA..1 MiB window is reported.
        assert_eq!(ram, size - (layout::HIMEM_START - layout::EBDA_START));
        assert!(m.iter().all(|e| e.addr + e.size <= layout::MMIO_GAP_START || e.addr >= layout::MMIO_GAP_END));
    }
}
