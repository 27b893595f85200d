//! Initial register state of the boot vCPU (and the common parts of every vCPU).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot::EntryPoint;
use super::gdt::{self, kvm_segment_from};
use super::layout;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;
const PDE_PRESENT_RW: u64 = 0x3;
const PDE_PRESENT_RW_HUGE: u64 = 0x83;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the boot GDT, IDT or page tables into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// General-purpose registers for the boot vCPU.
pub fn boot_regs(entry: EntryPoint) -> kvm_regs {
    match entry {
        EntryPoint::Pvh(addr) => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: addr.0,
            rbx: layout::PVH_INFO_START,
            ..Default::default()
        },
        EntryPoint::Linux64(addr) => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: addr.0,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: layout::ZERO_PAGE_START,
            ..Default::default()
        },
        EntryPoint::Real16(addr) => kvm_regs { rflags: RFLAGS_RESERVED, rip: addr.0, ..Default::default() },
    }
}

/// An x87/SSE state with the power-on control words.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// The boot GDT for `entry`: null, code, data, TSS.
pub fn boot_gdt(entry: EntryPoint) -> [u64; 4] {
    let code = match entry {
        EntryPoint::Pvh(_) | EntryPoint::Real16(_) => gdt::CODE32,
        EntryPoint::Linux64(_) => gdt::CODE64,
    };
    [
        0,
        gdt::descriptor(code, 0, 0xfffff),
        gdt::descriptor(gdt::DATA, 0, 0xfffff),
        gdt::descriptor(gdt::TSS, 0, 0xfffff),
    ]
}

/// Writes the GDT, an empty IDT and (for the 64-bit entry) identity page tables for the
/// first GiB, and returns the special registers that go with them.
pub fn setup_sregs(mem: &GuestMemoryMmap, entry: EntryPoint, mut sregs: kvm_sregs) -> Result<kvm_sregs, RegsError> {
    if let EntryPoint::Real16(_) = entry {
        // Reset state, but with CS based at 0 instead of the reset vector's 0xffff0000.
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        return Ok(sregs);
    }
    let table = boot_gdt(entry);
    for (i, d) in table.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(layout::GDT_START + (i as u64) * 8)).map_err(RegsError::Write)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START)).map_err(RegsError::Write)?;

    let code = kvm_segment_from(1, table[1]);
    let data = kvm_segment_from(2, table[2]);
    let tss = kvm_segment_from(3, table[3]);
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&table) - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    match entry {
        EntryPoint::Real16(_) => {}
        EntryPoint::Pvh(_) => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryPoint::Linux64(_) => {
            setup_page_tables(mem)?;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    Ok(sregs)
}

/// Identity-maps the first GiB with 2 MiB pages.
fn setup_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(layout::PDPTE_START | PDE_PRESENT_RW, GuestAddress(layout::PML4_START))
        .map_err(RegsError::Write)?;
    mem.write_obj(layout::PDE_START | PDE_PRESENT_RW, GuestAddress(layout::PDPTE_START))
        .map_err(RegsError::Write)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | PDE_PRESENT_RW_HUGE, GuestAddress(layout::PDE_START + i * 8))
            .map_err(RegsError::Write)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("guest memory")
    }

    #[test]
    fn pvh_starts_in_flat_protected_mode() {
        let e = EntryPoint::Pvh(GuestAddress(0x100_0000));
        let s = setup_sregs(&mem(), e, kvm_sregs::default()).expect("sregs");
        assert_eq!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr0 & X86_CR0_PE, 1);
        assert_eq!((s.cs.l, s.cs.db), (0, 1));
        assert_eq!(s.cs.selector, 8);
        assert_eq!(s.ds.selector, 16);
        let r = boot_regs(e);
        assert_eq!((r.rip, r.rbx), (0x100_0000, layout::PVH_INFO_START));
    }

    #[test]
    fn linux64_starts_in_long_mode_with_identity_map() {
        let m = mem();
        let e = EntryPoint::Linux64(GuestAddress(0x100_0200));
        let s = setup_sregs(&m, e, kvm_sregs::default()).expect("sregs");
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!((s.cs.l, s.cs.db), (1, 0));
        let pml4: u64 = m.read_obj(GuestAddress(layout::PML4_START)).expect("pml4");
        assert_eq!(pml4, layout::PDPTE_START | 3);
        let last: u64 = m.read_obj(GuestAddress(layout::PDE_START + 511 * 8)).expect("pde");
        assert_eq!(last, (511 << 21) | 0x83);
        assert_eq!(boot_regs(e).rsi, layout::ZERO_PAGE_START);
    }

    #[test]
    fn gdt_is_written_where_sregs_point() {
        let m = mem();
        let e = EntryPoint::Linux64(GuestAddress(0));
        let s = setup_sregs(&m, e, kvm_sregs::default()).expect("sregs");
        let code: u64 = m.read_obj(GuestAddress(s.gdt.base + 8)).expect("gdt");
        assert_eq!(code, boot_gdt(e)[1]);
        assert_eq!(s.gdt.limit, 31);
    }
}
