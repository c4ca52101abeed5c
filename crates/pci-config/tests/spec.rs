//! Behaviour pinned down by the PCI Local Bus 3.0 and PCIe Base specifications.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pci_config::regs::*;
use pci_config::{
    cap_id, ext_cap_id, parse_capabilities, parse_capabilities_lenient,
    parse_extended_capabilities, parse_extended_capabilities_lenient, BarKind, ClassCode,
    ConfigSpace, Error, WriteEffect, ROM_BAR, SNAPSHOT_VERSION,
};

/// Size a 32-bit BAR register as a guest does (§6.2.5.1): save, write all ones, read, restore.
fn size_dword(cfg: &mut ConfigSpace, offset: usize) -> u32 {
    let saved = cfg.read_u32(offset).unwrap();
    cfg.write_u32(offset, 0xffff_ffff).unwrap();
    let sized = cfg.read_u32(offset).unwrap();
    cfg.write_u32(offset, saved).unwrap();
    sized
}

/// Decodes a 64-bit memory BAR size from the two sized dwords, as a guest does.
fn size_from_mask64(low: u32, high: u32) -> u64 {
    let mask = (u64::from(high) << 32) | u64::from(low & !0xf);
    (!mask).wrapping_add(1)
}

// ---------- BAR sizing ----------

#[test]
fn memory32_bar_sizing_reads_back_size_mask_and_flags() {
    let mut cfg = ConfigSpace::new();
    cfg.declare_bar(
        0,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    cfg.declare_bar(1, BarKind::Memory32 { prefetchable: true }, 0x10)
        .unwrap();
    assert_eq!(size_dword(&mut cfg, BAR0), 0xffff_f000);
    // Prefetchable is bit 3, type 00 (32-bit); a 16-byte BAR has all address bits writable.
    assert_eq!(size_dword(&mut cfg, BAR0 + 4), 0xffff_fff8);
}

#[test]
fn memory64_bar_sizing_covers_both_dwords() {
    let mut cfg = ConfigSpace::new();
    cfg.declare_bar(
        2,
        BarKind::Memory64 {
            prefetchable: false,
        },
        1 << 20,
    )
    .unwrap();
    let low = size_dword(&mut cfg, BAR0 + 8);
    let high = size_dword(&mut cfg, BAR0 + 12);
    // Type field 10b (64-bit) in bits 2:1, not prefetchable.
    assert_eq!(low, 0xfff0_0004);
    assert_eq!(high, 0xffff_ffff);
    assert_eq!(size_from_mask64(low, high), 1 << 20);
}

#[test]
fn upper_dword_of_64gib_prefetchable_bar_sizes_correctly() {
    let mut cfg = ConfigSpace::new();
    let size = 64u64 << 30;
    cfg.declare_bar(0, BarKind::Memory64 { prefetchable: true }, size)
        .unwrap();
    let low = size_dword(&mut cfg, BAR0);
    let high = size_dword(&mut cfg, BAR0 + 4);
    // No address bit of the low dword is writable: only the flags (64-bit, prefetchable).
    assert_eq!(low, 0x0000_000c);
    assert_eq!(high, 0xffff_fff0);
    assert_eq!(size_from_mask64(low, high), size);
}

#[test]
fn bar_of_exactly_4gib_sizes_through_upper_dword() {
    let mut cfg = ConfigSpace::new();
    cfg.declare_bar(
        0,
        BarKind::Memory64 {
            prefetchable: false,
        },
        1 << 32,
    )
    .unwrap();
    let low = size_dword(&mut cfg, BAR0);
    let high = size_dword(&mut cfg, BAR0 + 4);
    assert_eq!(low, 0x0000_0004);
    assert_eq!(high, 0xffff_ffff);
    assert_eq!(size_from_mask64(low, high), 1 << 32);
}

#[test]
fn io_bar_has_bit0_set_and_bit1_reserved_zero() {
    let mut cfg = ConfigSpace::new();
    cfg.declare_bar(4, BarKind::Io, 0x100).unwrap();
    assert_eq!(cfg.read_u32(BAR0 + 16).unwrap() & 0x3, 0x1);
    assert_eq!(size_dword(&mut cfg, BAR0 + 16), 0xffff_ff01);
    cfg.write_u32(BAR0 + 16, 0).unwrap();
    assert_eq!(
        cfg.read_u32(BAR0 + 16).unwrap(),
        0x1,
        "bit 0 is read-only 1"
    );
}

#[test]
fn bar_writes_are_masked_by_size() {
    let mut cfg = ConfigSpace::new();
    cfg.declare_bar(
        0,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    cfg.write_u32(BAR0, 0x1234_5678).unwrap();
    assert_eq!(cfg.read_u32(BAR0).unwrap(), 0x1234_5000);
    assert_eq!(cfg.bar_address(0), Some(0x1234_5000));
}

#[test]
fn undeclared_bar_reads_zero_and_ignores_writes() {
    let mut cfg = ConfigSpace::new();
    assert_eq!(size_dword(&mut cfg, BAR0 + 20), 0);
}

#[test]
fn bar_sizes_that_break_the_spec_are_rejected() {
    let mut cfg = ConfigSpace::new();
    let mem32 = BarKind::Memory32 {
        prefetchable: false,
    };
    assert!(matches!(
        cfg.declare_bar(0, mem32, 0x3000),
        Err(Error::InvalidBarSize { .. })
    ));
    assert!(matches!(
        cfg.declare_bar(0, mem32, 8),
        Err(Error::InvalidBarSize { .. })
    ));
    assert!(matches!(
        cfg.declare_bar(0, mem32, 1 << 32),
        Err(Error::InvalidBarSize { .. })
    ));
    assert!(matches!(
        cfg.declare_bar(0, BarKind::Io, 2),
        Err(Error::InvalidBarSize { .. })
    ));
    assert!(matches!(
        cfg.declare_bar(0, mem32, 0),
        Err(Error::InvalidBarSize { .. })
    ));
    assert_eq!(
        cfg.declare_bar(6, mem32, 0x1000),
        Err(Error::InvalidBarIndex(6))
    );
}

#[test]
fn memory64_bar_in_bar5_is_rejected() {
    let mut cfg = ConfigSpace::new();
    let r = cfg.declare_bar(
        5,
        BarKind::Memory64 {
            prefetchable: false,
        },
        0x1000,
    );
    assert_eq!(r, Err(Error::Bar64InLastSlot));
    assert!(cfg.bar(5).is_none());
}

#[test]
fn upper_register_of_64bit_bar_cannot_be_declared_again() {
    let mut cfg = ConfigSpace::new();
    cfg.declare_bar(
        0,
        BarKind::Memory64 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    assert_eq!(
        cfg.declare_bar(1, BarKind::Io, 0x10),
        Err(Error::BarSlotInUse(1))
    );
    cfg.declare_bar(3, BarKind::Io, 0x10).unwrap();
    assert_eq!(
        cfg.declare_bar(
            2,
            BarKind::Memory64 {
                prefetchable: false
            },
            0x1000
        ),
        Err(Error::BarSlotInUse(3))
    );
}

// ---------- expansion ROM ----------

#[test]
fn rom_bar_sizing_keeps_reserved_bits_zero_and_enable_writable() {
    let mut cfg = ConfigSpace::new();
    cfg.declare_rom(64 << 10).unwrap();
    // Linux sizes the ROM by writing the address mask with the enable bit clear.
    cfg.write_u32(ROM_ADDRESS, 0xffff_fffe).unwrap();
    assert_eq!(cfg.read_u32(ROM_ADDRESS).unwrap(), 0xffff_0000);
    cfg.write_u32(ROM_ADDRESS, 0xffff_ffff).unwrap();
    assert_eq!(cfg.read_u32(ROM_ADDRESS).unwrap(), 0xffff_0001);
    cfg.write_u32(ROM_ADDRESS, 0x000c_0001).unwrap();
    let rom = cfg.rom().unwrap();
    assert!(rom.enabled);
    assert_eq!(rom.address, 0xc_0000);
    cfg.write_u32(ROM_ADDRESS, 0xfeb0_0001).unwrap();
    assert_eq!(cfg.rom().unwrap().address, 0xfeb0_0000);
}

#[test]
fn rom_smaller_than_2kib_is_rejected() {
    let mut cfg = ConfigSpace::new();
    assert_eq!(cfg.declare_rom(0x400), Err(Error::InvalidRomSize(0x400)));
    assert_eq!(
        size_dword(&mut cfg, ROM_ADDRESS),
        0,
        "no ROM: reads as zero"
    );
}

// ---------- masks ----------

#[test]
fn rw1c_status_bit_clears_only_when_one_is_written() {
    let mut cfg = ConfigSpace::new();
    cfg.set_status(STATUS_RW1C | STATUS_CAPABILITIES_LIST | STATUS_INTERRUPT);
    cfg.write_u16(STATUS, 0).unwrap();
    assert_eq!(
        cfg.status(),
        STATUS_RW1C | STATUS_CAPABILITIES_LIST | STATUS_INTERRUPT
    );
    cfg.write_u16(STATUS, STATUS_MASTER_DATA_PARITY_ERROR)
        .unwrap();
    assert_eq!(
        cfg.status(),
        (STATUS_RW1C & !STATUS_MASTER_DATA_PARITY_ERROR)
            | STATUS_CAPABILITIES_LIST
            | STATUS_INTERRUPT
    );
    cfg.write_u16(STATUS, 0xffff).unwrap();
    assert_eq!(cfg.status(), STATUS_CAPABILITIES_LIST | STATUS_INTERRUPT);
}

#[test]
fn rw1c_bits_of_all_status_error_bits_match_spec() {
    // Bits 8 and 11..=15 are RW1C; bits 0..=7 and 9..=10 are not.
    let cfg = ConfigSpace::new();
    let mask = u16::from_le_bytes([cfg.rw1c_mask()[STATUS], cfg.rw1c_mask()[STATUS + 1]]);
    assert_eq!(mask, 0b1111_1001_0000_0000);
}

#[test]
fn dword_write_to_command_does_not_set_status_bits() {
    let mut cfg = ConfigSpace::new();
    cfg.set_status(STATUS_RECEIVED_MASTER_ABORT);
    // Writing the command register with a dword access writes zeros to status: no change.
    cfg.write_u32(COMMAND, u32::from(COMMAND_BUS_MASTER))
        .unwrap();
    assert_eq!(cfg.status(), STATUS_RECEIVED_MASTER_ABORT);
    assert_eq!(cfg.command(), COMMAND_BUS_MASTER);
}

#[test]
fn rw1c_mechanism_works_for_capability_registers() {
    let mut cfg = ConfigSpace::new();
    let off = cfg
        .add_capability(0x40..0x50, cap_id::PCI_EXPRESS, &[0; 10])
        .unwrap();
    let devsta = usize::from(off) + 0x0a; // PCIe Device Status: error bits RW1C
    cfg.set_rw1c(devsta, &[0x0f]).unwrap();
    cfg.set_u8(devsta, 0x0f).unwrap();
    cfg.write_u8(devsta, 0x05).unwrap();
    assert_eq!(cfg.read_u8(devsta).unwrap(), 0x0a);
}

#[test]
fn read_only_header_fields_ignore_guest_writes() {
    let mut cfg = ConfigSpace::new();
    cfg.set_vendor_id(0x8086);
    cfg.set_device_id(0x10d3);
    cfg.set_class_code(ClassCode {
        base: 2,
        sub: 0,
        prog_if: 0,
    });
    cfg.set_interrupt_pin(1);
    cfg.set_subsystem_vendor_id(0x1af4);
    for off in [
        VENDOR_ID,
        REVISION_ID,
        HEADER_TYPE,
        SUBSYSTEM_VENDOR_ID,
        CAPABILITIES_POINTER,
    ] {
        cfg.write_u32(off & !3, 0xffff_ffff).unwrap();
    }
    cfg.write_u8(INTERRUPT_PIN, 4).unwrap();
    assert_eq!(cfg.vendor_id(), 0x8086);
    assert_eq!(cfg.device_id(), 0x10d3);
    assert_eq!(
        cfg.class_code(),
        ClassCode {
            base: 2,
            sub: 0,
            prog_if: 0
        }
    );
    assert_eq!(cfg.subsystem_vendor_id(), 0x1af4);
    assert_eq!(cfg.interrupt_pin(), 1);
    assert_eq!(cfg.header_type(), 0);
    assert_eq!(cfg.capabilities_pointer(), 0);
}

#[test]
fn interrupt_line_and_cache_line_size_are_writable() {
    let mut cfg = ConfigSpace::new();
    cfg.write_u8(INTERRUPT_LINE, 11).unwrap();
    cfg.write_u8(CACHE_LINE_SIZE, 16).unwrap();
    assert_eq!(cfg.interrupt_line(), 11);
    assert_eq!(cfg.cache_line_size(), 16);
}

#[test]
fn command_register_accepts_only_implemented_bits() {
    let mut cfg = ConfigSpace::new();
    cfg.write_u16(COMMAND, 0xffff).unwrap();
    assert_eq!(
        cfg.command(),
        COMMAND_IO_SPACE
            | COMMAND_MEMORY_SPACE
            | COMMAND_BUS_MASTER
            | COMMAND_PARITY_ERROR_RESPONSE
            | COMMAND_SERR
            | COMMAND_INTX_DISABLE
    );
}

#[test]
fn multifunction_bit_can_be_set_and_cleared_without_touching_layout() {
    let mut cfg = ConfigSpace::new();
    cfg.set_multifunction(true);
    assert!(cfg.is_multifunction());
    assert_eq!(cfg.read_u8(HEADER_TYPE).unwrap(), 0x80);
    assert_eq!(cfg.header_type(), 0);
    cfg.set_multifunction(false);
    assert!(!cfg.is_multifunction());
    assert_eq!(cfg.read_u8(HEADER_TYPE).unwrap(), 0);
}

// ---------- access sizes and alignment ----------

#[test]
fn word_access_straddling_a_dword_boundary_merges_bytes() {
    let mut cfg = ConfigSpace::new();
    cfg.set_device_id(0xabcd);
    // Bytes 3 (device ID high, read-only) and 4 (command low byte).
    cfg.write(3, &[0xff, 0xff]).unwrap();
    assert_eq!(cfg.device_id(), 0xabcd);
    assert_eq!(cfg.command() & 0xff, 0x47); // I/O, memory, bus master, parity error response
    let mut buf = [0u8; 4];
    cfg.read(3, &mut buf).unwrap();
    assert_eq!(buf, [0xab, 0x47, 0x00, 0x00]);
}

#[test]
fn byte_writes_to_a_bar_merge_into_the_dword() {
    let mut cfg = ConfigSpace::new();
    cfg.declare_bar(
        0,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    cfg.write_u8(BAR0 + 3, 0xfe).unwrap();
    cfg.write_u8(BAR0 + 1, 0xff).unwrap();
    cfg.write_u8(BAR0, 0xff).unwrap();
    assert_eq!(cfg.read_u32(BAR0).unwrap(), 0xfe00_f000);
}

#[test]
fn access_crossing_4kib_is_rejected() {
    let mut cfg = ConfigSpace::new();
    let mut two = [0u8; 2];
    assert!(matches!(
        cfg.read(4095, &mut two),
        Err(Error::InvalidAccess { .. })
    ));
    assert!(matches!(
        cfg.write(4094, &[0; 4]),
        Err(Error::InvalidAccess { .. })
    ));
    assert!(cfg.read(4095, &mut [0u8; 1]).is_ok());
    assert!(cfg.read_dword(1023).is_ok());
    // Dword 1024 starts at byte 4096, the first byte past the 4 KiB space.
    let past_end = pci_config::Error::InvalidAccess {
        offset: 4096,
        size: 4,
    };
    assert_eq!(cfg.read_dword(1024), Err(past_end));
    let wrapping = pci_config::Error::InvalidAccess {
        offset: usize::MAX,
        size: 4,
    };
    assert_eq!(cfg.write_dword(usize::MAX, 0), Err(wrapping.clone()));
    assert_eq!(cfg.read_u32(usize::MAX), Err(wrapping));
}

#[test]
fn access_sizes_other_than_1_2_4_are_rejected() {
    let mut cfg = ConfigSpace::new();
    for size in [0usize, 3, 5, 8] {
        let mut buf = vec![0u8; size];
        assert_eq!(
            cfg.read(0, &mut buf),
            Err(Error::InvalidAccess { offset: 0, size })
        );
        assert_eq!(
            cfg.write(COMMAND, &vec![0xff; size]),
            Err(Error::InvalidAccess {
                offset: COMMAND,
                size
            })
        );
    }
    assert_eq!(cfg.command(), 0, "rejected writes change nothing");
}

// ---------- capabilities ----------

/// A 256-byte config with standard capabilities at the given (offset, id, next) triples.
fn std_caps(first: u8, caps: &[(usize, u8, u8)]) -> Vec<u8> {
    let mut bytes = vec![0u8; 256];
    bytes[STATUS] = STATUS_CAPABILITIES_LIST as u8;
    bytes[CAPABILITIES_POINTER] = first;
    for &(off, id, next) in caps {
        bytes[off] = id;
        bytes[off + 1] = next;
    }
    bytes
}

/// A 4096-byte config with extended capabilities at the given (offset, id, next) triples.
fn ext_caps(caps: &[(usize, u16, u16)]) -> Vec<u8> {
    let mut bytes = vec![0u8; 4096];
    for &(off, id, next) in caps {
        let header = u32::from(id) | (1 << 16) | (u32::from(next) << 20);
        bytes[off..off + 4].copy_from_slice(&header.to_le_bytes());
    }
    bytes
}

#[test]
fn standard_chain_is_walked_in_order() {
    let bytes = std_caps(
        0x40,
        &[(0x40, 0x01, 0x50), (0x50, 0x05, 0x70), (0x70, 0x10, 0)],
    );
    let caps = parse_capabilities(&bytes).unwrap();
    let ids: Vec<_> = caps.iter().map(|c| (c.id, c.offset)).collect();
    assert_eq!(ids, vec![(0x01, 0x40), (0x05, 0x50), (0x10, 0x70)]);
}

#[test]
fn capability_pointer_reserved_low_bits_are_masked() {
    let bytes = std_caps(0x43, &[(0x40, 0x05, 0x52), (0x50, 0x11, 0)]);
    let caps = parse_capabilities(&bytes).unwrap();
    assert_eq!(
        caps.iter().map(|c| c.offset).collect::<Vec<_>>(),
        vec![0x40, 0x50]
    );
}

#[test]
fn no_capabilities_when_status_bit4_is_clear() {
    let mut bytes = std_caps(0x40, &[(0x40, 0x05, 0)]);
    bytes[STATUS] = 0;
    assert!(parse_capabilities(&bytes).unwrap().is_empty());
}

#[test]
fn capability_pointing_at_itself_ends_with_loop_error() {
    let bytes = std_caps(0x40, &[(0x40, 0x05, 0x40)]);
    assert_eq!(
        parse_capabilities(&bytes),
        Err(Error::CapabilityLoop { offset: 0x40 })
    );
}

#[test]
fn capability_pointing_back_to_earlier_one_is_lenient_parsed_up_to_the_loop() {
    let bytes = std_caps(0x40, &[(0x40, 0x01, 0x50), (0x50, 0x05, 0x40)]);
    let (caps, err) = parse_capabilities_lenient(&bytes);
    assert_eq!(caps.len(), 2);
    assert_eq!(err, Some(Error::CapabilityLoop { offset: 0x40 }));
    assert_eq!(
        parse_capabilities(&bytes),
        Err(pci_config::Error::CapabilityLoop { offset: 0x40 })
    );
}

#[test]
fn capability_starting_inside_the_msix_registers_is_an_overlap() {
    // MSI-X is 12 bytes (PCI 3.0 §6.8.2): a next pointer to 0x64 lands on its Table
    // Offset/BIR register, which a VMM emulates.
    let bytes = std_caps(
        0x40,
        &[(0x40, 0x01, 0x60), (0x60, 0x11, 0x64), (0x64, 0x00, 0)],
    );
    let (caps, err) = parse_capabilities_lenient(&bytes);
    assert_eq!(
        caps.iter().map(|c| c.offset).collect::<Vec<_>>(),
        vec![0x40, 0x60]
    );
    assert_eq!(
        err,
        Some(Error::CapabilityOverlap {
            offset: 0x64,
            other: 0x60
        })
    );
    assert_eq!(
        parse_capabilities(&bytes),
        Err(pci_config::Error::CapabilityOverlap {
            offset: 0x64,
            other: 0x60
        })
    );
}

#[test]
fn msix_registers_covering_an_earlier_capability_header_are_an_overlap() {
    let bytes = std_caps(0x48, &[(0x48, 0x09, 0x40), (0x40, 0x11, 0)]);
    assert_eq!(
        parse_capabilities(&bytes),
        Err(Error::CapabilityOverlap {
            offset: 0x40,
            other: 0x48
        })
    );
}

#[test]
fn msi_length_follows_its_64bit_and_per_vector_masking_flags() {
    // 32-bit MSI without masking: 10 bytes, so the next dword (0x4c) is free.
    let bytes = std_caps(0x40, &[(0x40, 0x05, 0x4c), (0x4c, 0x01, 0)]);
    assert_eq!(parse_capabilities(&bytes).unwrap().len(), 2);
    // 64-bit with per-vector masking: 24 bytes (0x40..0x58).
    let mut bytes = std_caps(0x40, &[(0x40, 0x05, 0x54), (0x54, 0x01, 0)]);
    bytes[0x42..0x44].copy_from_slice(&0x0180u16.to_le_bytes());
    assert_eq!(
        parse_capabilities(&bytes),
        Err(Error::CapabilityOverlap {
            offset: 0x54,
            other: 0x40
        })
    );
    let mut bytes = std_caps(0x40, &[(0x40, 0x05, 0x58), (0x58, 0x01, 0)]);
    bytes[0x42..0x44].copy_from_slice(&0x0180u16.to_le_bytes());
    assert_eq!(parse_capabilities(&bytes).unwrap().len(), 2);
}

#[test]
fn power_management_registers_are_eight_bytes() {
    let bytes = std_caps(0x40, &[(0x40, 0x01, 0x44), (0x44, 0x05, 0)]);
    assert_eq!(
        parse_capabilities(&bytes),
        Err(Error::CapabilityOverlap {
            offset: 0x44,
            other: 0x40
        })
    );
    let bytes = std_caps(0x40, &[(0x40, 0x01, 0x48), (0x48, 0x05, 0)]);
    assert_eq!(parse_capabilities(&bytes).unwrap().len(), 2);
}

#[test]
fn capability_pointer_into_header_is_an_error() {
    let bytes = std_caps(0x40, &[(0x40, 0x01, 0x20)]);
    assert_eq!(
        parse_capabilities(&bytes),
        Err(Error::BadCapabilityPointer {
            at: 0x41,
            pointer: 0x20
        })
    );
    let bytes = std_caps(0x10, &[]);
    assert!(matches!(
        parse_capabilities(&bytes),
        Err(Error::BadCapabilityPointer { .. })
    ));
}

#[test]
fn short_buffer_is_an_error_not_a_panic() {
    assert!(matches!(
        parse_capabilities(&[0u8; 10]),
        Err(Error::BadBufferLength { .. })
    ));
    assert!(parse_extended_capabilities(&[0u8; 10]).unwrap().is_empty());
}

#[test]
fn extended_chain_with_zero_or_all_ones_header_is_empty() {
    let bytes = vec![0u8; 4096];
    assert!(parse_extended_capabilities(&bytes).unwrap().is_empty());
    let mut bytes = vec![0u8; 4096];
    bytes[0x100..0x104].copy_from_slice(&[0xff; 4]);
    assert!(parse_extended_capabilities(&bytes).unwrap().is_empty());
    // A conventional (256-byte) config space has no extended capabilities.
    assert!(parse_extended_capabilities(&[0u8; 256]).unwrap().is_empty());
}

#[test]
fn extended_chain_is_decoded_per_header_layout() {
    let bytes = ext_caps(&[
        (0x100, ext_cap_id::AER, 0x148),
        (0x148, ext_cap_id::SRIOV, 0),
    ]);
    let caps = parse_extended_capabilities(&bytes).unwrap();
    assert_eq!(caps.len(), 2);
    assert_eq!(
        (caps[0].id, caps[0].version, caps[0].next),
        (ext_cap_id::AER, 1, 0x148)
    );
    assert_eq!((caps[1].id, caps[1].offset), (ext_cap_id::SRIOV, 0x148));
}

#[test]
fn extended_chain_loop_and_bad_pointer_are_errors() {
    let bytes = ext_caps(&[(0x100, 1, 0x200), (0x200, 2, 0x100)]);
    let (caps, err) = parse_extended_capabilities_lenient(&bytes);
    assert_eq!(caps.len(), 2);
    assert_eq!(err, Some(Error::CapabilityLoop { offset: 0x100 }));
    let bytes = ext_caps(&[(0x100, 1, 0x0c0)]);
    assert_eq!(
        parse_extended_capabilities(&bytes),
        Err(Error::BadCapabilityPointer {
            at: 0x100,
            pointer: 0x0c0
        })
    );
    // A 512-byte buffer cannot hold a capability at 0x400.
    let bytes = ext_caps(&[(0x100, 1, 0x400)]);
    assert!(matches!(
        parse_extended_capabilities(&bytes[..512]),
        Err(Error::BadCapabilityPointer { pointer: 0x400, .. })
    ));
}

fn space_with_std_chain() -> ConfigSpace {
    let bytes = std_caps(
        0x40,
        &[(0x40, 0x01, 0x50), (0x50, 0x05, 0x70), (0x70, 0x10, 0)],
    );
    ConfigSpace::from_bytes(&bytes).unwrap()
}

#[test]
fn hiding_middle_standard_capability_keeps_the_rest_linked() {
    let mut cfg = space_with_std_chain();
    cfg.hide_capability(0x50).unwrap();
    let caps = cfg.capabilities().unwrap();
    assert_eq!(
        caps.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![0x01, 0x10]
    );
    assert_eq!(cfg.read_u8(0x41).unwrap(), 0x70);
    assert!(cfg.find_capability(cap_id::MSI).is_none());
}

#[test]
fn hiding_first_standard_capability_updates_capabilities_pointer() {
    let mut cfg = space_with_std_chain();
    cfg.hide_capability(0x40).unwrap();
    assert_eq!(cfg.read_u8(CAPABILITIES_POINTER).unwrap(), 0x50);
    assert_eq!(cfg.capabilities().unwrap().len(), 2);
}

#[test]
fn hiding_every_standard_capability_clears_status_capability_list() {
    let mut cfg = space_with_std_chain();
    for off in [0x50, 0x70, 0x40] {
        cfg.hide_capability(off).unwrap();
    }
    assert_eq!(cfg.status() & STATUS_CAPABILITIES_LIST, 0);
    assert!(cfg.capabilities().unwrap().is_empty());
    assert_eq!(
        cfg.hide_capability(0x40),
        Err(Error::CapabilityNotFound(0x40))
    );
}

fn space_with_ext_chain() -> ConfigSpace {
    let bytes = ext_caps(&[
        (0x100, ext_cap_id::AER, 0x148),
        (0x148, ext_cap_id::ARI, 0x160),
        (0x160, ext_cap_id::RESIZABLE_BAR, 0),
    ]);
    ConfigSpace::from_bytes(&bytes).unwrap()
}

#[test]
fn hiding_middle_extended_capability_keeps_the_rest_linked() {
    let mut cfg = space_with_ext_chain();
    cfg.hide_extended_capability(0x148).unwrap();
    let caps = cfg.extended_capabilities().unwrap();
    assert_eq!(
        caps.iter().map(|c| c.id).collect::<Vec<_>>(),
        vec![ext_cap_id::AER, ext_cap_id::RESIZABLE_BAR]
    );
    // The predecessor keeps its ID and version.
    assert_eq!(caps[0].version, 1);
}

#[test]
fn hiding_first_extended_capability_leaves_null_header_linking_the_rest() {
    let mut cfg = space_with_ext_chain();
    cfg.hide_extended_capability(0x100).unwrap();
    assert_eq!(cfg.read_u32(0x100).unwrap(), 0x148 << 20);
    assert!(cfg.find_extended_capability(ext_cap_id::AER).is_none());
    assert_eq!(
        cfg.find_extended_capability(ext_cap_id::ARI)
            .unwrap()
            .offset,
        0x148
    );
    assert_eq!(
        cfg.find_extended_capability(ext_cap_id::RESIZABLE_BAR)
            .unwrap()
            .offset,
        0x160
    );
}

#[test]
fn hiding_the_only_extended_capability_empties_the_chain() {
    let bytes = ext_caps(&[(0x100, ext_cap_id::AER, 0)]);
    let mut cfg = ConfigSpace::from_bytes(&bytes).unwrap();
    cfg.hide_extended_capability(0x100).unwrap();
    assert_eq!(cfg.read_u32(0x100).unwrap(), 0);
    assert!(cfg.extended_capabilities().unwrap().is_empty());
}

#[test]
fn added_capability_is_linked_at_the_end_of_the_chain() {
    let mut cfg = space_with_std_chain();
    let off = cfg
        .add_capability(0x81..0x90, cap_id::VENDOR_SPECIFIC, &[3, 0xaa])
        .unwrap();
    assert_eq!(off, 0x84);
    assert_eq!(cfg.read_u8(0x71).unwrap(), 0x84);
    let found = cfg.find_capability(cap_id::VENDOR_SPECIFIC).unwrap();
    assert_eq!((found.offset, found.next), (0x84, 0));
    assert_eq!(cfg.read_u8(0x86).unwrap(), 3);
    assert!(matches!(
        cfg.add_capability(0xf0..0x100, 0x09, &[0; 20]),
        Err(Error::NoCapabilitySpace { .. })
    ));
}

#[test]
fn first_added_capability_sets_pointer_and_status_bit() {
    let mut cfg = ConfigSpace::new();
    cfg.add_capability(0x40..0x50, cap_id::POWER_MANAGEMENT, &[0; 6])
        .unwrap();
    assert_eq!(cfg.capabilities_pointer(), 0x40);
    assert_ne!(cfg.status() & STATUS_CAPABILITIES_LIST, 0);
}

#[test]
fn added_extended_capability_is_linked_and_chain_starts_at_0x100() {
    let mut cfg = ConfigSpace::new();
    let off = cfg.add_extended_capability(0x200..0x210, ext_cap_id::VENDOR_SPECIFIC, 1, &[0; 8]);
    assert_eq!(off, Ok(0x200));
    let caps = cfg.extended_capabilities().unwrap();
    assert_eq!(caps.len(), 2);
    assert_eq!((caps[0].id, caps[0].offset), (ext_cap_id::NULL, 0x100));
    assert_eq!(
        (caps[1].id, caps[1].offset),
        (ext_cap_id::VENDOR_SPECIFIC, 0x200)
    );
    let mut cfg = space_with_ext_chain();
    let off =
        cfg.add_extended_capability(0x300..0x400, ext_cap_id::DEVICE_SERIAL_NUMBER, 1, &[0; 8]);
    assert_eq!(off, Ok(0x300));
    assert_eq!(
        cfg.extended_capabilities().unwrap().last().unwrap().offset,
        0x300
    );
}

// ---------- BAR move detection ----------

fn mem_space() -> ConfigSpace {
    let mut cfg = ConfigSpace::new();
    cfg.declare_bar(
        0,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    cfg.declare_bar(1, BarKind::Io, 0x20).unwrap();
    cfg.declare_bar(2, BarKind::Memory64 { prefetchable: true }, 1 << 20)
        .unwrap();
    cfg.set_bar_address(0, 0xc000_0000).unwrap();
    cfg.set_bar_address(1, 0xc000).unwrap();
    cfg.set_bar_address(2, 0x8_0000_0000).unwrap();
    cfg
}

#[test]
fn bar_move_is_not_reported_while_memory_decode_is_disabled() {
    let mut cfg = mem_space();
    let fx = cfg.write_u32(BAR0, 0xd000_0000).unwrap();
    assert!(fx.is_empty());
    // Enabling memory decode reports the move first, then the command change.
    let fx = cfg.write_u16(COMMAND, COMMAND_MEMORY_SPACE).unwrap();
    let all: Vec<_> = fx.iter().copied().collect();
    assert_eq!(
        all,
        vec![
            WriteEffect::BarReprogram {
                bar: 0,
                old_base: 0xc000_0000,
                new_base: 0xd000_0000,
                size: 0x1000
            },
            WriteEffect::CommandChange {
                old: 0,
                new: COMMAND_MEMORY_SPACE
            },
        ]
    );
    assert_eq!(all[1].memory_decode_toggled(), Some(true));
    assert_eq!(all[1].io_decode_toggled(), None);
}

#[test]
fn bar_move_is_reported_when_memory_decode_is_enabled() {
    let mut cfg = mem_space();
    cfg.write_u16(COMMAND, COMMAND_MEMORY_SPACE).unwrap();
    let fx = cfg.write_u32(BAR0, 0xd000_0000).unwrap();
    assert_eq!(
        fx.iter().next(),
        Some(&WriteEffect::BarReprogram {
            bar: 0,
            old_base: 0xc000_0000,
            new_base: 0xd000_0000,
            size: 0x1000
        })
    );
    // Rewriting the same address is not a move.
    assert!(cfg.write_u32(BAR0, 0xd000_0000).unwrap().is_empty());
}

#[test]
fn io_bar_move_needs_io_decode_not_memory_decode() {
    let mut cfg = mem_space();
    cfg.write_u16(COMMAND, COMMAND_MEMORY_SPACE).unwrap();
    assert!(cfg.write_u32(BAR0 + 4, 0xd000).unwrap().is_empty());
    let fx = cfg
        .write_u16(COMMAND, COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE)
        .unwrap();
    let all: Vec<_> = fx.iter().copied().collect();
    assert_eq!(
        all[0],
        WriteEffect::BarReprogram {
            bar: 1,
            old_base: 0xc000,
            new_base: 0xd000,
            size: 0x20
        }
    );
    assert_eq!(all[1].io_decode_toggled(), Some(true));
    assert_eq!(all[1].memory_decode_toggled(), None);
}

#[test]
fn sizing_with_decode_enabled_is_not_a_move() {
    let mut cfg = mem_space();
    cfg.write_u16(COMMAND, COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE)
        .unwrap();
    for off in [BAR0, BAR0 + 4, BAR0 + 8, BAR0 + 12] {
        let saved = cfg.read_u32(off).unwrap();
        assert!(cfg.write_u32(off, 0xffff_ffff).unwrap().is_empty());
        assert!(cfg.write_u32(off, saved).unwrap().is_empty());
    }
}

#[test]
fn sixty_four_bit_move_is_reported_once_both_halves_are_written() {
    let mut cfg = mem_space();
    cfg.write_u16(COMMAND, COMMAND_MEMORY_SPACE).unwrap();
    assert!(cfg.write_u32(BAR0 + 8, 0x0010_000c).unwrap().is_empty());
    let fx = cfg.write_u32(BAR0 + 12, 0x9).unwrap();
    assert_eq!(fx.len(), 1);
    assert_eq!(
        fx.iter().next(),
        Some(&WriteEffect::BarReprogram {
            bar: 2,
            old_base: 0x8_0000_0000,
            new_base: 0x9_0010_0000,
            size: 1 << 20
        })
    );
    // High then low also yields a single move at the complete address.
    assert!(cfg.write_u32(BAR0 + 12, 0xa).unwrap().is_empty());
    let fx = cfg.write_u32(BAR0 + 8, 0x0020_0000).unwrap();
    assert_eq!(
        fx.iter().next(),
        Some(&WriteEffect::BarReprogram {
            bar: 2,
            old_base: 0x9_0010_0000,
            new_base: 0xa_0020_0000,
            size: 1 << 20
        })
    );
}

#[test]
fn sixty_four_bit_move_right_after_sizing_is_reported_when_its_second_half_is_written() {
    // Sizing (both halves all ones), then a new address in both halves, decoding on: the
    // halves written while the other one still held the sizing pattern pair up as usual.
    let mut cfg = mem_space();
    cfg.write_u16(COMMAND, COMMAND_MEMORY_SPACE).unwrap();
    assert!(cfg.write_u32(BAR0 + 8, 0xffff_ffff).unwrap().is_empty());
    assert!(cfg.write_u32(BAR0 + 12, 0xffff_ffff).unwrap().is_empty());
    assert!(cfg.write_u32(BAR0 + 8, 0x0010_000c).unwrap().is_empty());
    let fx = cfg.write_u32(BAR0 + 12, 0x9).unwrap();
    assert_eq!(
        fx.iter().next(),
        Some(&WriteEffect::BarReprogram {
            bar: 2,
            old_base: 0x8_0000_0000,
            new_base: 0x9_0010_0000,
            size: 1 << 20
        })
    );
}

#[test]
fn disabling_decode_reports_command_change_but_no_move() {
    let mut cfg = mem_space();
    cfg.write_u16(COMMAND, COMMAND_MEMORY_SPACE).unwrap();
    let fx = cfg.write_u16(COMMAND, 0).unwrap();
    let all: Vec<_> = fx.iter().copied().collect();
    assert_eq!(
        all,
        vec![WriteEffect::CommandChange {
            old: COMMAND_MEMORY_SPACE,
            new: 0
        }]
    );
    assert_eq!(all[0].memory_decode_toggled(), Some(false));
}

#[test]
fn rom_move_needs_memory_decode_and_rom_enable() {
    let mut cfg = ConfigSpace::new();
    cfg.declare_rom(0x8000).unwrap();
    cfg.set_rom_address(0xfe00_0000).unwrap();
    cfg.write_u16(COMMAND, COMMAND_MEMORY_SPACE).unwrap();
    assert!(cfg.write_u32(ROM_ADDRESS, 0xfd00_0000).unwrap().is_empty());
    let fx = cfg.write_u32(ROM_ADDRESS, 0xfd00_0001).unwrap();
    assert_eq!(
        fx.iter().next(),
        Some(&WriteEffect::BarReprogram {
            bar: ROM_BAR,
            old_base: 0xfe00_0000,
            new_base: 0xfd00_0000,
            size: 0x8000
        })
    );
}

#[test]
fn set_bar_address_rejects_misaligned_or_too_high_addresses() {
    let mut cfg = mem_space();
    assert!(matches!(
        cfg.set_bar_address(0, 0xc000_0800),
        Err(Error::InvalidBarAddress { .. })
    ));
    assert!(matches!(
        cfg.set_bar_address(0, 1 << 32),
        Err(Error::InvalidBarAddress { .. })
    ));
    assert_eq!(cfg.set_bar_address(3, 0), Err(Error::NoSuchBar(3)));
    assert_eq!(cfg.bar(2).unwrap().address, 0x8_0000_0000);
}

// ---------- building from a device and snapshots ----------

#[test]
fn from_bytes_clears_host_bar_addresses_and_rejects_bridges() {
    let mut bytes = vec![0u8; 256];
    bytes[0..4].copy_from_slice(&0x1234_8086u32.to_le_bytes());
    bytes[BAR0..BAR0 + 4].copy_from_slice(&0xf780_0000u32.to_le_bytes());
    bytes[ROM_ADDRESS..ROM_ADDRESS + 4].copy_from_slice(&0xf700_0000u32.to_le_bytes());
    let cfg = ConfigSpace::from_bytes(&bytes).unwrap();
    assert_eq!(cfg.vendor_id(), 0x8086);
    assert_eq!(cfg.device_id(), 0x1234);
    assert_eq!(cfg.read_u32(BAR0).unwrap(), 0);
    assert_eq!(cfg.read_u32(ROM_ADDRESS).unwrap(), 0);
    bytes[HEADER_TYPE] = 0x81;
    assert_eq!(
        ConfigSpace::from_bytes(&bytes),
        Err(Error::UnsupportedHeaderType(1))
    );
    assert!(matches!(
        ConfigSpace::from_bytes(&[0; 5000]),
        Err(Error::BadBufferLength { .. })
    ));
}

#[test]
fn snapshot_round_trips_through_json() {
    let mut cfg = mem_space();
    cfg.declare_rom(0x800).unwrap();
    cfg.write_u16(COMMAND, COMMAND_MEMORY_SPACE).unwrap();
    cfg.write_u32(BAR0 + 8, 0x0010_0000).unwrap(); // a pending half must survive too
    let json = serde_json::to_string(&cfg.snapshot()).unwrap();
    let snap = serde_json::from_str(&json).unwrap();
    let mut restored = ConfigSpace::restore(&snap).unwrap();
    assert_eq!(restored, cfg);
    let fx = restored.write_u32(BAR0 + 12, 0x7).unwrap();
    assert_eq!(
        fx.iter().next(),
        Some(&WriteEffect::BarReprogram {
            bar: 2,
            old_base: 0x8_0000_0000,
            new_base: 0x7_0010_0000,
            size: 1 << 20
        })
    );
}

#[test]
fn snapshot_with_unknown_version_is_rejected() {
    let mut snap = ConfigSpace::new().snapshot();
    snap.version = SNAPSHOT_VERSION + 1;
    assert_eq!(
        ConfigSpace::restore(&snap),
        Err(Error::UnsupportedSnapshotVersion {
            found: SNAPSHOT_VERSION + 1,
            supported: SNAPSHOT_VERSION
        })
    );
}

#[test]
fn snapshot_with_bad_payload_is_rejected() {
    let mut snap = ConfigSpace::new().snapshot();
    snap.payload.bytes.truncate(100);
    assert!(matches!(
        ConfigSpace::restore(&snap),
        Err(Error::InvalidSnapshot(_))
    ));
    let mut snap = ConfigSpace::new().snapshot();
    snap.payload.bars[5] = Some(pci_config::BarDef {
        kind: BarKind::Memory64 {
            prefetchable: false,
        },
        size: 0x1000,
    });
    assert!(matches!(
        ConfigSpace::restore(&snap),
        Err(Error::InvalidSnapshot(_))
    ));
}

// ---- Spec knowledge used when attaching a device (BAR kinds, capability lengths) ----

#[test]
fn bar_kind_from_register_follows_the_low_bits() {
    use pci_config::BarKind;
    // §6.2.5.1: bit 0 I/O; bits 2:1 type (00 32-bit, 10 64-bit); bit 3 prefetchable.
    assert_eq!(BarKind::from_register(0x0000_c001), BarKind::Io);
    assert_eq!(
        BarKind::from_register(0x0000_0009),
        BarKind::Io,
        "bit 0 wins"
    );
    assert_eq!(
        BarKind::from_register(0xfe00_0000),
        BarKind::Memory32 {
            prefetchable: false
        }
    );
    assert_eq!(
        BarKind::from_register(0xfe00_0008),
        BarKind::Memory32 { prefetchable: true }
    );
    assert_eq!(
        BarKind::from_register(0x0000_0004),
        BarKind::Memory64 {
            prefetchable: false
        }
    );
    assert_eq!(
        BarKind::from_register(0x0000_000c),
        BarKind::Memory64 { prefetchable: true }
    );
    // Type 01 (below 1 MiB, obsolete) and 11 (reserved): treated as 32-bit.
    assert_eq!(
        BarKind::from_register(0x0000_0002),
        BarKind::Memory32 {
            prefetchable: false
        }
    );
    assert_eq!(
        BarKind::from_register(0x0000_0006),
        BarKind::Memory32 {
            prefetchable: false
        }
    );
    assert_eq!(BarKind::Io.min_size(), 4);
    assert_eq!(BarKind::Memory64 { prefetchable: true }.min_size(), 16);
}

#[test]
fn capability_lengths_are_the_specs() {
    use pci_config::{cap_id, ext_cap_id, extended_capability_len, standard_capability_len};
    let mut raw = [0u8; 0x100];
    // PCI Express capability: through Slot Status 2 (0x3c bytes).
    assert_eq!(
        standard_capability_len(cap_id::PCI_EXPRESS, &raw, 0x40),
        0x3c
    );
    // Vendor specific: its length byte, at least the header.
    raw[0x52] = 0x18;
    assert_eq!(
        standard_capability_len(cap_id::VENDOR_SPECIFIC, &raw, 0x50),
        0x18
    );
    raw[0x52] = 2;
    assert_eq!(
        standard_capability_len(cap_id::VENDOR_SPECIFIC, &raw, 0x50),
        4
    );
    // MSI with 64-bit addresses and per-vector masking: 24 bytes.
    raw[0x62] = 0x80;
    raw[0x63] = 0x01;
    assert_eq!(standard_capability_len(cap_id::MSI, &raw, 0x60), 24);
    assert_eq!(standard_capability_len(cap_id::MSIX, &raw, 0x70), 12);
    assert_eq!(extended_capability_len(ext_cap_id::AER), 0x48);
    assert_eq!(extended_capability_len(ext_cap_id::SRIOV), 0x40);
    assert_eq!(extended_capability_len(ext_cap_id::ACS), 0x08);
    assert_eq!(
        extended_capability_len(ext_cap_id::DEVICE_SERIAL_NUMBER),
        0x0c
    );
    assert_eq!(
        extended_capability_len(ext_cap_id::VENDOR_SPECIFIC),
        4,
        "variable: header only"
    );
}
