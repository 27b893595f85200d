//! The CPUID a vCPU sees: what KVM supports on this host, with the topology made
//! consistent with the VM's vCPU count and the vCPU's own APIC id, and the
//! hypervisor bit set so the guest uses its paravirtual paths (kvmclock, PV EOI).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
/// CLFLUSH line size in 8-byte units (64 bytes), as real CPUs report.
const CLFLUSH_SIZE: u32 = 8;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites one CPUID entry for vCPU `cpu` of `count`: one socket, one thread per
/// core, `count` cores.
pub fn patch_entry(e: &mut kvm_cpuid_entry2, cpu: u8, count: u8) {
    let cpu = u32::from(cpu);
    let count = u32::from(count);
    match e.function {
        LEAF_FEATURES => {
            // Logical processors per package, rounded up to a power of two as real
            // CPUs report it (older topology code shifts by its log2).
            let per_package = 1u32 << bits_for(count);
            e.ebx = (cpu << 24) | ((per_package & 0xff) << 16) | (CLFLUSH_SIZE << 8) | (e.ebx & 0xff);
            e.ecx |= ECX_HYPERVISOR;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE_PARAMS => {
            // Cores per package - 1 in EAX[31:26]; threads sharing this cache - 1 in
            // EAX[25:14]: private caches below L3, L3 shared by every core.
            let level = (e.eax >> 5) & 0x7;
            let ids = (1u32 << bits_for(count)) - 1;
            let sharing = if level >= 3 { ids } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | ((ids & 0x3f) << 26);
        }
        LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
            let (shift, logical, level) = match e.index {
                0 => (0, 1, TOPOLOGY_LEVEL_SMT),
                1 => (bits_for(count), count, TOPOLOGY_LEVEL_CORE),
                _ => (0, 0, 0),
            };
            e.eax = shift;
            e.ebx = logical;
            e.ecx = (level << 8) | (e.index & 0xff);
            e.edx = cpu;
        }
        LEAF_AMD_SIZES => {
            // ECX[7:0]: number of cores - 1; ECX[15:12]: APIC id bits for them.
            e.ecx = (e.ecx & !0xf0ff) | (bits_for(count) << 12) | ((count - 1) & 0xff);
        }
        _ => {}
    }
}

/// The CPUID table for vCPU `cpu` of `count`, from the host's supported set.
pub fn for_vcpu(supported: &CpuId, cpu: u8, count: u8) -> CpuId {
    let mut c = supported.clone();
    for e in c.as_mut_slice() {
        patch_entry(e, cpu, count);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    #[test]
    fn leaf1_carries_apic_id_and_hypervisor_bit() {
        let mut e = entry(1, 0);
        e.edx = EDX_HTT;
        patch_entry(&mut e, 3, 4);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        patch_entry(&mut e, 2, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4, "3 CPUs round up to 4");
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        patch_entry(&mut e, 0, 1);
        assert_eq!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn topology_leaf() {
        let mut smt = entry(0xb, 0);
        let mut core = entry(0xb, 1);
        let mut end = entry(0xb, 2);
        for e in [&mut smt, &mut core, &mut end] {
            patch_entry(e, 5, 6);
        }
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 5));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 6, 0x201, 5));
        assert_eq!((end.ebx, end.ecx >> 8), (0, 0));
    }

    #[test]
    fn bits() {
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(3), 2);
        assert_eq!(bits_for(64), 6);
        assert_eq!(bits_for(65), 7);
    }

    #[test]
    fn amd_core_count() {
        let mut e = entry(0x8000_0008, 0);
        e.ecx = 0xffff_ffff;
        patch_entry(&mut e, 0, 2);
        assert_eq!(e.ecx & 0xff, 1);
        assert_eq!((e.ecx >> 12) & 0xf, 1);
        assert_eq!(e.ecx >> 16, 0xffff);
    }
}
