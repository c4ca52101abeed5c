//! The Intel MultiProcessor Specification 1.4 tables, by hand (no rust-vmm crate writes
//! them): how a guest without ACPI finds its CPUs, its IOAPIC, its buses and the routing of
//! ISA IRQs and PCI INTx pins.
//!
//! Layout: the MP floating pointer structure (16 bytes) at the table's base, then the MP
//! configuration table: header, one processor entry per vCPU, the PCI bus (MP bus id 0, so
//! Linux numbers it PCI bus 0) and the ISA bus (id 1), the IOAPIC, one I/O interrupt entry per
//! ISA IRQ 0..16 (identity: ISA IRQ n is IOAPIC pin n, as KVM's default routes are), one per
//! PCI device and INTx pin, and the two local interrupt entries (LINT0 ExtINT, LINT1 NMI).

use crate::error::{Error, Result};

/// Local APIC base address.
pub const LAPIC_ADDRESS: u32 = 0xfee0_0000;
/// IOAPIC base address.
pub const IOAPIC_ADDRESS: u32 = 0xfec0_0000;
/// Pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;

const SPEC_REV: u8 = 4;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus": ISA edge/high, PCI level/low.
const FLAGS_CONFORM: u16 = 0;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// MP bus ids.
pub const BUS_PCI: u8 = 0;
/// MP bus id of the ISA bus.
pub const BUS_ISA: u8 = 1;
/// Size of the floating pointer structure.
pub const FLOATING_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;

/// A PCI device's INTx wiring: all four pins of device `device` on bus 0 go to IOAPIC pin
/// `ioapic_pin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIntx {
    /// Device number on bus 0.
    pub device: u8,
    /// IOAPIC input.
    pub ioapic_pin: u8,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// The IOAPIC's id in the table: the APIC id after the last CPU's.
pub fn ioapic_id(cpus: u8) -> u8 {
    cpus
}

/// Builds the floating pointer and the configuration table for a guest with `cpus` vCPUs
/// (APIC ids 0..cpus) and PCI devices wired as `pci`, to be written at guest address `base`.
pub fn build(base: u32, cpus: u8, pci: &[PciIntx]) -> Result<Vec<u8>> {
    if cpus == 0 || cpus == 0xff {
        return Err(Error::Layout(format!(
            "{cpus} CPUs: the MP table holds 1 to 254"
        )));
    }
    if let Some(p) = pci
        .iter()
        .find(|p| p.device >= 32 || p.ioapic_pin >= IOAPIC_PINS)
    {
        return Err(Error::Layout(format!("PCI INTx wiring {p:?} out of range")));
    }
    let table_addr = base
        .checked_add(FLOATING_SIZE as u32)
        .ok_or_else(|| Error::Layout("MP table base".into()))?;
    let ioapic = ioapic_id(cpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        // CPU signature (family 6) and feature flags (FPU, APIC), then 8 reserved bytes.
        entries.extend_from_slice(&0x600u32.to_le_bytes());
        entries.extend_from_slice(&0x201u32.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(BUS_PCI, b"PCI   "), (BUS_ISA, b"ISA   ")] {
        entries.extend_from_slice(&[ENTRY_BUS, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDRESS.to_le_bytes());
    count += 1;
    let io_int = |entries: &mut Vec<u8>, bus: u8, bus_irq: u8, pin: u8| {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[bus, bus_irq, ioapic, pin]);
    };
    for irq in 0..16u8 {
        io_int(&mut entries, BUS_ISA, irq, irq);
        count += 1;
    }
    for p in pci {
        for intx in 0..4u8 {
            // The source bus IRQ of a PCI interrupt: device number in bits 6:2, pin (A=0) in 1:0.
            io_int(&mut entries, BUS_PCI, (p.device << 2) | intx, p.ioapic_pin);
            count += 1;
        }
    }
    for (kind, dest, lint) in [(INT_TYPE_EXTINT, 0xffu8, 0u8), (INT_TYPE_NMI, 0xff, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[BUS_ISA, 0, dest, lint]);
        count += 1;
    }
    let length = u16::try_from(HEADER_SIZE + entries.len())
        .map_err(|_| Error::Layout("MP configuration table longer than 64 KiB".into()))?;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[SPEC_REV, 0]); // checksum at byte 7, filled below
    table.extend_from_slice(b"RUSTVMM "); // OEM id, 8 bytes
    table.extend_from_slice(b"VFIO-REF-VMM"); // product id, 12 bytes
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDRESS.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.extend_from_slice(&[0, 0]); // extended table checksum, reserved
    table.extend_from_slice(&entries);
    if let Some(c) = table.get_mut(7) {
        *c = 0;
    }
    let sum = checksum(&table);
    if let Some(c) = table.get_mut(7) {
        *c = sum;
    }
    let mut out = Vec::with_capacity(FLOATING_SIZE + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&table_addr.to_le_bytes());
    // Length in 16-byte units, spec revision, checksum (byte 10), feature bytes 1..5
    // (feature 1 = 0: a configuration table is present).
    out.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    let sum = checksum(&out);
    if let Some(c) = out.get_mut(10) {
        *c = sum;
    }
    out.extend_from_slice(&table);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Walks the configuration table's entries: (type, bytes) each.
    fn entries(table: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = HEADER_SIZE;
        while at < table.len() {
            let len = if table[at] == ENTRY_PROCESSOR { 20 } else { 8 };
            out.push((table[at], table[at..at + len].to_vec()));
            at += len;
        }
        out
    }

    #[test]
    fn floating_pointer_and_table_checksums_are_zero_and_the_pointer_points_at_the_table() {
        let out = build(
            0xf0000,
            2,
            &[PciIntx {
                device: 1,
                ioapic_pin: 16,
            }],
        )
        .unwrap();
        let (fp, table) = out.split_at(FLOATING_SIZE);
        assert_eq!(&fp[0..4], b"_MP_");
        assert_eq!(sum(fp), 0, "floating pointer checksum");
        assert_eq!(
            u32::from_le_bytes(fp[4..8].try_into().unwrap()),
            0xf0000 + 16
        );
        assert_eq!(fp[8], 1, "length in paragraphs");
        assert_eq!(&table[0..4], b"PCMP");
        assert_eq!(
            usize::from(u16::from_le_bytes([table[4], table[5]])),
            table.len()
        );
        assert_eq!(sum(table), 0, "configuration table checksum");
    }

    #[test]
    fn entry_count_and_kinds_match_cpus_buses_ioapic_isa_irqs_and_pci_pins() {
        let pci = [
            PciIntx {
                device: 1,
                ioapic_pin: 16,
            },
            PciIntx {
                device: 2,
                ioapic_pin: 17,
            },
        ];
        let out = build(0xf0000, 3, &pci).unwrap();
        let table = &out[FLOATING_SIZE..];
        let e = entries(table);
        assert_eq!(
            usize::from(u16::from_le_bytes([table[34], table[35]])),
            e.len()
        );
        let of = |t: u8| e.iter().filter(|(k, _)| *k == t).count();
        assert_eq!(of(ENTRY_PROCESSOR), 3);
        assert_eq!(of(ENTRY_BUS), 2);
        assert_eq!(of(ENTRY_IOAPIC), 1);
        assert_eq!(of(ENTRY_IO_INTERRUPT), 16 + 4 * 2);
        assert_eq!(of(ENTRY_LOCAL_INTERRUPT), 2);
        // Exactly one bootstrap processor, APIC ids 0..3, all enabled.
        let cpus: Vec<&Vec<u8>> = e.iter().filter(|(k, _)| *k == 0).map(|(_, b)| b).collect();
        assert_eq!(cpus.iter().filter(|b| b[3] & CPU_BOOTSTRAP != 0).count(), 1);
        assert_eq!(cpus.iter().map(|b| b[1]).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert!(cpus.iter().all(|b| b[3] & CPU_ENABLED != 0));
        // The IOAPIC's id is after the CPUs' and every I/O interrupt targets it.
        let ioapic = &e.iter().find(|(k, _)| *k == ENTRY_IOAPIC).unwrap().1;
        assert_eq!(ioapic[1], 3);
        assert_eq!(
            u32::from_le_bytes(ioapic[4..8].try_into().unwrap()),
            IOAPIC_ADDRESS
        );
        // Device 2's INTC (pin 2) is bus IRQ (2 << 2) | 2 on the PCI bus, to pin 17.
        assert!(e.iter().any(|(k, b)| *k == ENTRY_IO_INTERRUPT
            && b[4] == BUS_PCI
            && b[5] == (2 << 2 | 2)
            && b[6] == 3
            && b[7] == 17));
        // ISA IRQ 4 (the serial port) is IOAPIC pin 4.
        assert!(e
            .iter()
            .any(|(k, b)| *k == ENTRY_IO_INTERRUPT && b[4] == BUS_ISA && b[5] == 4 && b[7] == 4));
    }

    #[test]
    fn zero_cpus_and_out_of_range_pci_wiring_are_refused() {
        assert!(build(0xf0000, 0, &[]).is_err());
        assert!(build(
            0xf0000,
            1,
            &[PciIntx {
                device: 1,
                ioapic_pin: 24
            }]
        )
        .is_err());
        assert!(build(
            0xf0000,
            1,
            &[PciIntx {
                device: 32,
                ioapic_pin: 16
            }]
        )
        .is_err());
    }
}
