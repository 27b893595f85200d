//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI learns
//! its CPUs, its IO-APIC and how ISA interrupts are routed. Written as plain bytes
//! (little endian, packed) at the start of the EBDA, where Linux scans for it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 in the CPU signature; FPU and APIC in the feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const FLOATING_POINTER_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table (APIC ids are 8 bits)")]
    TooManyCpus(u8),
    #[error("the MP table does not fit below 1 MiB")]
    TooBig,
    #[error("cannot write the MP table into guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// Builds the floating pointer and configuration table for `num_cpus` CPUs, for a
/// table placed at `base`. Returned as the exact bytes to write there.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    // APIC ids 0..num_cpus for the CPUs and num_cpus for the IO-APIC must stay < 255.
    if num_cpus == 0 || num_cpus >= 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    // Bus 0 is ISA.
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // Every ISA IRQ goes to the same-numbered IO-APIC pin.
    for irq in 0..=layout::IRQ_MAX as u8 {
        entries.extend_from_slice(&[3, INT_TYPE_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 takes the legacy PIC (ExtINT), LINT1 the NMI, on every local APIC (0xff).
    entries.extend_from_slice(&[4, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"MOAT    ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(layout::APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(FLOATING_POINTER_LEN);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4);
    fp.push(0); // checksum, below
    fp.extend_from_slice(&[0u8; 5]);
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    if base + out.len() as u64 > layout::HIMEM_START {
        return Err(MptableError::TooBig);
    }
    Ok(out)
}

/// Writes the MP table for `num_cpus` CPUs at the EBDA.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus, layout::EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(layout::EBDA_START)).map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_consistent() {
        for cpus in [1u8, 2, 16, 64, 253] {
            let b = build(cpus, layout::EBDA_START).expect("build");
            assert_eq!(&b[0..4], b"_MP_");
            assert_eq!(sum(&b[0..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) as u64;
            assert_eq!(ptr, layout::EBDA_START + 16);
            let t = &b[16..];
            assert_eq!(&t[0..4], b"PCMP");
            let len = u16::from_le_bytes([t[4], t[5]]) as usize;
            assert_eq!(len, t.len());
            assert_eq!(sum(t), 0, "table checksum");
            let count = u16::from_le_bytes([t[34], t[35]]);
            assert_eq!(count as u32, cpus as u32 + 1 + 1 + (layout::IRQ_MAX + 1) + 2);
            // First entry is the boot processor.
            assert_eq!(&t[44..48], &[0, 0, APIC_VERSION, CPU_ENABLED | CPU_BOOTPROCESSOR]);
        }
    }

    #[test]
    fn processor_entries_have_sequential_apic_ids() {
        let b = build(4, layout::EBDA_START).expect("build");
        let t = &b[16 + 44..];
        for cpu in 0..4usize {
            let e = &t[cpu * 20..cpu * 20 + 20];
            assert_eq!(e[0], 0);
            assert_eq!(e[1] as usize, cpu);
            assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, cpu == 0);
        }
    }

    #[test]
    fn bad_counts_are_refused() {
        assert!(matches!(build(0, 0), Err(MptableError::TooManyCpus(0))));
        assert!(matches!(build(254, 0), Err(MptableError::TooManyCpus(254))));
    }
}
