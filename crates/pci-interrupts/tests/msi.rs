//! MSI capability behaviour from PCI Local Bus 3.0 §6.8.1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use pci_interrupts::testing::{GroupCall, TestInterruptGroup};
use pci_interrupts::{Delivery, MsiRoute, MsiState};

const CONTROL: u64 = 2;
const ENABLE: u16 = 1;

fn read16(msi: &MsiState, offset: u64) -> u16 {
    let mut b = [0u8; 2];
    msi.read(offset, &mut b);
    u16::from_le_bytes(b)
}

fn read32(msi: &MsiState, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    msi.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn write16(msi: &mut MsiState, offset: u64, v: u16) {
    msi.write(offset, &v.to_le_bytes()).unwrap();
}

fn write32(msi: &mut MsiState, offset: u64, v: u32) {
    msi.write(offset, &v.to_le_bytes()).unwrap();
}

fn bound(vectors: u32, addr64: bool, pvm: bool) -> (MsiState, Arc<TestInterruptGroup>) {
    let mut msi = MsiState::new(vectors, addr64, pvm).unwrap();
    let group = Arc::new(TestInterruptGroup::new(vectors).unwrap());
    msi.set_group(Some(group.clone())).unwrap();
    (msi, group)
}

#[test]
fn capability_length_follows_address_size_and_per_vector_masking() {
    let len = |a, p| MsiState::new(1, a, p).unwrap().cap_len();
    assert_eq!(len(false, false), 0x0a);
    assert_eq!(len(true, false), 0x0e);
    assert_eq!(len(false, true), 0x14);
    assert_eq!(len(true, true), 0x18);
}

#[test]
fn message_control_reports_capable_count_64bit_and_pvm_read_only() {
    let mut msi = MsiState::new(8, true, true).unwrap();
    // MMC = log2(8) = 3 in bits 3:1, 64-bit bit 7, PVM bit 8.
    assert_eq!(read16(&msi, CONTROL), (3 << 1) | (1 << 7) | (1 << 8));
    // Try to clear them all and set reserved bits 15:9.
    write16(&mut msi, CONTROL, 0xfe00);
    assert_eq!(read16(&msi, CONTROL), (3 << 1) | (1 << 7) | (1 << 8));
}

#[test]
fn layout_32bit_puts_data_at_8_and_mask_pending_at_c_10() {
    let mut msi = MsiState::new(4, false, true).unwrap();
    write32(&mut msi, 4, 0xfee0_1000);
    write16(&mut msi, 8, 0x4041);
    write32(&mut msi, 0x0c, 0b1010);
    assert_eq!(read32(&msi, 4), 0xfee0_1000);
    assert_eq!(read16(&msi, 8), 0x4041);
    assert_eq!(read32(&msi, 0x0c), 0b1010);
    assert!(msi.vector_masked(1) && msi.vector_masked(3) && !msi.vector_masked(0));
    assert_eq!(msi.route(0).address, 0xfee0_1000);
}

#[test]
fn layout_64bit_puts_upper_address_at_8_and_data_at_c() {
    let mut msi = MsiState::new(1, true, false).unwrap();
    write32(&mut msi, 4, 0xfee0_0000);
    write32(&mut msi, 8, 0x1234_5678);
    write16(&mut msi, 0x0c, 0x0031);
    assert_eq!(read32(&msi, 8), 0x1234_5678);
    assert_eq!(read16(&msi, 0x0c), 0x0031);
    assert_eq!(
        msi.route(0),
        MsiRoute {
            address: 0x1234_5678_fee0_0000,
            data: 0x31
        }
    );
}

#[test]
fn message_address_low_two_bits_read_as_zero() {
    let mut msi = MsiState::new(1, false, false).unwrap();
    write32(&mut msi, 4, 0xffff_ffff);
    assert_eq!(read32(&msi, 4), 0xffff_fffc);
}

#[test]
fn byte_word_and_dword_writes_merge_into_the_same_registers() {
    let mut msi = MsiState::new(1, true, false).unwrap();
    msi.write(4, &[0x00]).unwrap();
    msi.write(5, &[0x10]).unwrap();
    msi.write(6, &0xfee0u16.to_le_bytes()).unwrap();
    msi.write(9, &[0xab]).unwrap();
    assert_eq!(read32(&msi, 4), 0xfee0_1000);
    assert_eq!(read32(&msi, 8), 0x0000_ab00);
    let mut b = [0u8; 1];
    msi.read(7, &mut b);
    assert_eq!(b[0], 0xfe);
}

#[test]
fn multiple_message_enable_is_clamped_to_multiple_message_capable() {
    let mut msi = MsiState::new(4, false, false).unwrap();
    // Ask for 32 vectors (MME = 5) on a 4-vector function (MMC = 2).
    write16(&mut msi, CONTROL, (5 << 4) | ENABLE);
    assert_eq!((read16(&msi, CONTROL) >> 4) & 7, 2);
    assert_eq!(msi.num_enabled_vectors(), 4);
    // Reserved encodings 6 and 7 too.
    write16(&mut msi, CONTROL, (7 << 4) | ENABLE);
    assert_eq!(msi.num_enabled_vectors(), 4);
    write16(&mut msi, CONTROL, (1 << 4) | ENABLE);
    assert_eq!(msi.num_enabled_vectors(), 2);
}

#[test]
fn num_enabled_vectors_is_zero_until_msi_enable_is_set() {
    let mut msi = MsiState::new(8, false, false).unwrap();
    write16(&mut msi, CONTROL, 3 << 4);
    assert!(!msi.enabled());
    assert_eq!(msi.num_enabled_vectors(), 0);
    write16(&mut msi, CONTROL, (3 << 4) | ENABLE);
    assert!(msi.enabled());
    assert_eq!(msi.num_enabled_vectors(), 8);
}

#[test]
fn vector_number_replaces_low_data_bits_for_multiple_messages() {
    let (mut msi, group) = bound(4, false, false);
    write32(&mut msi, 4, 0xfee0_0000);
    write16(&mut msi, 8, 0x4023); // low 2 bits are the function's to modify
    write16(&mut msi, CONTROL, (2 << 4) | ENABLE);
    for v in 0..4 {
        assert_eq!(
            group.route(v),
            Some(MsiRoute {
                address: 0xfee0_0000,
                data: 0x4020 | v
            })
        );
    }
}

#[test]
fn enable_bit_enables_group_and_unmasks_only_allocated_vectors() {
    let (mut msi, group) = bound(8, false, false);
    write32(&mut msi, 4, 0xfee0_0000);
    write16(&mut msi, CONTROL, (1 << 4) | ENABLE); // 2 of 8 vectors
    assert!(group.is_enabled());
    assert!(group.is_deliverable(0) && group.is_deliverable(1));
    assert!((2..8).all(|v| !group.is_deliverable(v)));
    assert_eq!(group.updates_of(2), 0);
    write16(&mut msi, CONTROL, 1 << 4);
    assert!(!group.is_enabled());
    assert_eq!(group.calls().last(), Some(&GroupCall::Disable));
}

#[test]
fn rewriting_the_same_values_makes_no_group_calls() {
    let (mut msi, group) = bound(1, false, false);
    write32(&mut msi, 4, 0xfee0_0000);
    write16(&mut msi, CONTROL, ENABLE);
    group.clear_calls();
    write32(&mut msi, 4, 0xfee0_0000);
    write16(&mut msi, CONTROL, ENABLE);
    assert!(group.calls().is_empty());
    write16(&mut msi, 8, 0x41);
    assert_eq!(group.calls().len(), 1);
}

#[test]
fn mask_bits_of_unimplemented_vectors_read_as_zero() {
    let mut msi = MsiState::new(2, true, true).unwrap();
    write32(&mut msi, 0x10, u32::MAX);
    assert_eq!(read32(&msi, 0x10), 0b11);
}

#[test]
fn pending_bits_are_read_only_to_the_guest() {
    let mut msi = MsiState::new(4, false, true).unwrap();
    write32(&mut msi, 0x10, 0xf);
    assert_eq!(read32(&msi, 0x10), 0);
}

#[test]
fn masked_vector_becomes_pending_and_is_delivered_once_on_unmask() {
    let (mut msi, group) = bound(4, true, true);
    write32(&mut msi, 4, 0xfee0_0000);
    write32(&mut msi, 0x10, 0b0100); // mask vector 2
    write16(&mut msi, CONTROL, (2 << 4) | ENABLE);
    assert_eq!(msi.fire(2).unwrap(), Delivery::Pending);
    assert_eq!(read32(&msi, 0x14), 0b0100);
    assert_eq!(group.triggers_of(2), 0);
    assert!(!group.was_signalled(2));

    write32(&mut msi, 0x10, 0);
    assert_eq!(group.triggers_of(2), 1);
    assert!(group.was_signalled(2));
    assert_eq!(read32(&msi, 0x14), 0);
    // Unmasked again: nothing more to deliver.
    write32(&mut msi, 0x10, 0b0100);
    write32(&mut msi, 0x10, 0);
    assert_eq!(group.triggers_of(2), 1);
    assert_eq!(group.violations(), 0);
}

#[test]
fn unmasked_vector_fires_straight_to_the_group() {
    let (mut msi, group) = bound(1, false, true);
    write16(&mut msi, CONTROL, ENABLE);
    assert_eq!(msi.fire(0).unwrap(), Delivery::Delivered);
    assert_eq!(group.take_signals(0), 1);
    assert_eq!(group.violations(), 0);
}

#[test]
fn fire_while_disabled_or_unallocated_is_dropped() {
    let (mut msi, group) = bound(4, false, true);
    assert_eq!(msi.fire(0).unwrap(), Delivery::Dropped);
    write16(&mut msi, CONTROL, ENABLE); // one vector allocated
    assert_eq!(msi.fire(3).unwrap(), Delivery::Dropped);
    assert!(matches!(
        msi.fire(4),
        Err(pci_interrupts::Error::VectorOutOfRange {
            vector: 4,
            count: 4
        })
    ));
    assert_eq!(
        group.count_calls(|c| matches!(c, GroupCall::Trigger { .. })),
        0
    );
}

#[test]
fn out_of_range_accesses_are_ignored() {
    let mut msi = MsiState::new(1, false, false).unwrap();
    let mut b = [0u8; 4];
    msi.read(0x0c, &mut b); // past the 32-bit capability's dword-padded window
    assert_eq!(b, [0xff; 4]);
    msi.read(u64::MAX, &mut b);
    msi.write(u64::MAX - 1, &[1, 2, 3, 4]).unwrap();
    msi.write(0x0a, &[1, 2, 3, 4]).unwrap(); // straddles the end
    assert_eq!(read16(&msi, 0x0a), 0); // reserved bytes read 0
    msi.write(4, &[]).unwrap();
}

#[test]
fn from_bytes_takes_structure_but_resets_guest_state() {
    let mut bytes = [0u8; 0x18];
    bytes[0] = 0x05;
    bytes[1] = 0x70;
    // MMC = 4 (16 vectors), MME = 4, enabled, 64-bit, PVM.
    bytes[2..4]
        .copy_from_slice(&((4 << 1) | (4 << 4) | 1 | (1 << 7) | (1 << 8) as u16).to_le_bytes());
    bytes[4..8].copy_from_slice(&0xfee0_0000u32.to_le_bytes());
    let msi = MsiState::from_bytes(&bytes).unwrap();
    assert_eq!(msi.max_vectors(), 16);
    assert!(msi.is_64bit() && msi.per_vector_mask() && !msi.enabled());
    assert_eq!(read16(&msi, 0), 0x7005);
    assert_eq!(read32(&msi, 4), 0);
    bytes[0] = 0x11;
    let invalid = |r: pci_interrupts::Result<MsiState>, why: &str| {
        assert!(
            matches!(
                r,
                Err(pci_interrupts::Error::InvalidCapability { capability: "MSI", reason })
                    if reason == why
            ),
            "{why}"
        );
    };
    invalid(MsiState::from_bytes(&bytes), "capability ID is not 0x05");
    invalid(MsiState::from_bytes(&[0x05, 0]), "fewer than 4 bytes");
    let bad_count = "vector count must be a power of two from 1 to 32";
    invalid(MsiState::new(3, false, false), bad_count);
    invalid(MsiState::new(64, false, false), bad_count);
}

#[test]
fn snapshot_restores_registers_and_pushes_them_to_a_fresh_group() {
    let (mut msi, _) = bound(4, true, true);
    write32(&mut msi, 4, 0xfee0_2000);
    write32(&mut msi, 8, 0x1);
    write16(&mut msi, 0x0c, 0x4440);
    write32(&mut msi, 0x10, 0b0010);
    write16(&mut msi, CONTROL, (2 << 4) | ENABLE);
    assert_eq!(msi.fire(1).unwrap(), Delivery::Pending);
    let snap = msi.snapshot();
    let json = serde_json::to_string(&pci_interrupts::versioned(snap.clone())).unwrap();
    let back: pci_interrupts::Versioned<pci_interrupts::MsiSnapshot> =
        serde_json::from_str(&json).unwrap();

    let (mut dest, group) = bound(4, true, true);
    dest.restore(&pci_interrupts::payload(back).unwrap())
        .unwrap();
    assert_eq!(dest.snapshot(), snap);
    assert!(group.is_enabled());
    assert_eq!(
        group.route(3),
        Some(MsiRoute {
            address: 0x1_fee0_2000,
            data: 0x4443
        })
    );
    assert!(group.is_masked(1) && dest.pending(1));
    assert!(matches!(
        MsiState::new(4, false, true).unwrap().restore(&snap),
        Err(pci_interrupts::Error::SnapshotMismatch {
            capability: "MSI",
            ..
        })
    ));
}
