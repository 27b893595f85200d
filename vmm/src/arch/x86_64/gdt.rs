//! Segment descriptors for the boot GDT, and their KVM register form.

use kvm_bindings::kvm_segment;

/// Flat 64-bit code segment (L=1, present, DPL 0, execute/read, accessed).
pub const CODE64: u16 = 0xa09b;
/// Flat 32-bit code segment (D=1, G=1) for the PVH entry, which starts in 32-bit mode.
pub const CODE32: u16 = 0xc09b;
/// Flat data segment (D/B=1, G=1, read/write, accessed).
pub const DATA: u16 = 0xc093;
/// A busy 32-bit TSS: VMX/SVM require a usable TR.
pub const TSS: u16 = 0x808b;

/// Builds a descriptor from its flags (type, S, DPL, P in the low byte; AVL, L, D/B,
/// G in the high nibble), base and limit, as the CPU lays them out.
pub fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM form of descriptor `entry` loaded from GDT slot `index`.
pub fn kvm_segment_from(index: u16, entry: u64) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let g = ((entry >> 55) & 1) as u8;
    // With G set the limit counts 4 KiB pages; KVM wants it in bytes.
    let limit = if g == 1 { (raw_limit << 12) | 0xfff } else { raw_limit };
    kvm_segment {
        base,
        limit: limit as u32,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_round_trip() {
        let d = descriptor(CODE64, 0, 0xfffff);
        // The canonical flat 64-bit code descriptor.
        assert_eq!(d, 0x00af_9b00_0000_ffff);
        let s = kvm_segment_from(1, d);
        assert_eq!(s.selector, 8);
        assert_eq!(s.type_, 0xb);
        assert_eq!((s.present, s.dpl, s.s, s.l, s.db, s.g), (1, 0, 1, 1, 0, 1));
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn data_and_tss() {
        let d = kvm_segment_from(2, descriptor(DATA, 0, 0xfffff));
        assert_eq!((d.type_, d.db, d.l, d.s), (3, 1, 0, 1));
        let t = kvm_segment_from(3, descriptor(TSS, 0x1234_5678, 0x67));
        assert_eq!(t.base, 0x1234_5678);
        // G is set in TSS's flags, so the limit counts pages.
        assert_eq!(t.limit, (0x67 << 12) | 0xfff);
        assert_eq!((t.type_, t.s, t.g), (0xb, 0, 1));
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from(0, 0).unusable, 1);
    }
}
