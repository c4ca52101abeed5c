//! MSI-X capability, table and PBA behaviour from PCI Local Bus 3.0 §6.8.2.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use pci_interrupts::testing::{GroupCall, TestInterruptGroup};
use pci_interrupts::{Delivery, MsiRoute, MsixBarLocation, MsixSnapshot, MsixState, Versioned};

const CONTROL: u64 = 2;
const ENABLE: u16 = 1 << 15;
const FUNCTION_MASK: u16 = 1 << 14;

fn bound(n: u32) -> (MsixState, Arc<TestInterruptGroup>) {
    let mut msix = MsixState::new(n, 2, 0, 2, 0x1000).unwrap();
    let group = Arc::new(TestInterruptGroup::new(n).unwrap());
    msix.set_group(Some(group.clone())).unwrap();
    (msix, group)
}

fn control(msix: &mut MsixState, v: u16) {
    msix.write(CONTROL, &v.to_le_bytes()).unwrap();
}

fn entry_dw(msix: &mut MsixState, vector: u64, dword: u64, v: u32) {
    msix.table_write(vector * 16 + dword * 4, &v.to_le_bytes())
        .unwrap();
}

fn read_dw(msix: &MsixState, offset: u64) -> u32 {
    let mut b = [0u8; 4];
    msix.table_read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn pba_qw(msix: &MsixState, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    msix.pba_read(offset, &mut b);
    u64::from_le_bytes(b)
}

/// Programs `vector` with a route while masked, then unmasks it.
fn program(msix: &mut MsixState, vector: u64, addr: u64, data: u32) {
    let mut qw = [0u8; 8];
    qw.copy_from_slice(&addr.to_le_bytes());
    msix.table_write(vector * 16, &qw).unwrap();
    entry_dw(msix, vector, 2, data);
    entry_dw(msix, vector, 3, 0);
}

#[test]
fn capability_reports_table_size_and_locations_read_only() {
    let mut msix = MsixState::new(16, 4, 0x2000, 5, 0x3000).unwrap();
    let mut cap = [0u8; 12];
    msix.read(0, &mut cap);
    assert_eq!(cap[0], 0x11);
    assert_eq!(u16::from_le_bytes([cap[2], cap[3]]), 15);
    assert_eq!(u32::from_le_bytes(cap[4..8].try_into().unwrap()), 0x2004);
    assert_eq!(u32::from_le_bytes(cap[8..12].try_into().unwrap()), 0x3005);
    msix.write(0, &[0xff; 12]).unwrap();
    let mut after = [0u8; 12];
    msix.read(0, &mut after);
    // Only function mask (bit 14) and enable (bit 15) changed.
    assert_eq!(after[3], cap[3] | 0xc0);
    assert_eq!((&after[..3], &after[4..]), (&cap[..3], &cap[4..]));
    assert_eq!(
        msix.table_location(),
        MsixBarLocation {
            bir: 4,
            offset: 0x2000,
            size: 256
        }
    );
    assert_eq!(
        msix.pba_location(),
        MsixBarLocation {
            bir: 5,
            offset: 0x3000,
            size: 8
        }
    );
}

#[test]
fn table_entries_start_masked_with_reserved_control_bits_zero() {
    let mut msix = MsixState::new(8, 0, 0, 0, 0x800).unwrap();
    for v in 0..8 {
        assert_eq!(read_dw(&msix, v * 16 + 12), 1);
        assert!(msix.vector_masked(v as u32));
    }
    entry_dw(&mut msix, 3, 3, 0xffff_fffe);
    assert_eq!(read_dw(&msix, 3 * 16 + 12), 0);
    msix.reset().unwrap();
    assert_eq!(read_dw(&msix, 3 * 16 + 12), 1);
}

#[test]
fn qword_and_dword_table_accesses_read_back() {
    let mut msix = MsixState::new(4, 0, 0, 0, 0x800).unwrap();
    msix.table_write(16, &0x0000_0001_fee0_1000u64.to_le_bytes())
        .unwrap();
    entry_dw(&mut msix, 1, 2, 0x4055);
    assert_eq!(read_dw(&msix, 16), 0xfee0_1000);
    assert_eq!(read_dw(&msix, 20), 0x1);
    let mut qw = [0u8; 8];
    msix.table_read(24, &mut qw);
    assert_eq!(u64::from_le_bytes(qw), (1u64 << 32) | 0x4055);
    assert_eq!(
        msix.route(1),
        Some(MsiRoute {
            address: 0x1_fee0_1000,
            data: 0x4055
        })
    );
}

#[test]
fn misaligned_or_odd_sized_table_accesses_are_ignored() {
    let mut msix = MsixState::new(2, 0, 0, 0, 0x800).unwrap();
    entry_dw(&mut msix, 0, 0, 0xfee0_0000);
    for (offset, len) in [
        (1u64, 4usize),
        (2, 4),
        (4, 8),
        (12, 8),
        (0, 1),
        (0, 2),
        (0, 3),
        (0, 16),
        (0, 0),
        (32, 4),
        (u64::MAX - 3, 4),
    ] {
        let data = vec![0xaa; len];
        msix.table_write(offset, &data).unwrap();
        let mut out = vec![0u8; len];
        msix.table_read(offset, &mut out);
        assert!(out.iter().all(|&b| b == 0xff), "read {len} at {offset}");
    }
    assert_eq!(read_dw(&msix, 0), 0xfee0_0000);
    assert_eq!(read_dw(&msix, 12), 1);
    assert_eq!(read_dw(&msix, 16 + 12), 1);
}

#[test]
fn table_write_to_one_vector_updates_only_that_vector() {
    let (mut msix, group) = bound(8);
    for v in 0..8 {
        program(&mut msix, v, 0xfee0_0000, 0x40 + v as u32);
    }
    control(&mut msix, ENABLE);
    group.clear_calls();
    entry_dw(&mut msix, 5, 2, 0x99);
    assert_eq!(
        group.calls(),
        vec![GroupCall::Update {
            vector: 5,
            route: MsiRoute {
                address: 0xfee0_0000,
                data: 0x99
            },
            masked: false
        }]
    );
    // A write that changes nothing makes no call.
    entry_dw(&mut msix, 5, 2, 0x99);
    assert_eq!(group.calls().len(), 1);
}

#[test]
fn masked_entry_route_reaches_the_group_when_unmasked() {
    let (mut msix, group) = bound(4);
    control(&mut msix, ENABLE);
    group.clear_calls();
    msix.table_write(32, &0xfee0_3000u64.to_le_bytes()).unwrap();
    entry_dw(&mut msix, 2, 2, 0x21);
    assert_eq!(group.route(2), None);
    entry_dw(&mut msix, 2, 3, 0);
    assert_eq!(group.updates_of(2), 1);
    assert_eq!(
        group.route(2),
        Some(MsiRoute {
            address: 0xfee0_3000,
            data: 0x21
        })
    );
    entry_dw(&mut msix, 2, 3, 1);
    assert!(group.is_masked(2));
    assert_eq!(group.count_calls(|c| c.vector() != Some(2)), 0);
}

#[test]
fn enable_starts_the_group_and_disable_stops_delivery() {
    let (mut msix, group) = bound(2);
    program(&mut msix, 0, 0xfee0_0000, 0x30);
    assert!(!group.is_enabled());
    assert_eq!(msix.fire(0).unwrap(), Delivery::Dropped);
    control(&mut msix, ENABLE);
    assert!(group.is_enabled() && group.is_deliverable(0) && !group.is_deliverable(1));
    assert_eq!(msix.fire(0).unwrap(), Delivery::Delivered);
    control(&mut msix, 0);
    assert!(!group.is_enabled());
    assert_eq!(msix.fire(0).unwrap(), Delivery::Dropped);
    assert_eq!(group.triggers_of(0), 1);
    assert_eq!(group.violations(), 0);
}

#[test]
fn function_mask_blocks_delivery_and_unmask_delivers_pending() {
    let (mut msix, group) = bound(4);
    program(&mut msix, 1, 0xfee0_0000, 0x31);
    program(&mut msix, 3, 0xfee0_0000, 0x33);
    control(&mut msix, ENABLE | FUNCTION_MASK);
    assert!(msix.function_masked());
    assert!(group.is_masked(1) && group.is_masked(3));
    assert_eq!(msix.fire(1).unwrap(), Delivery::Pending);
    assert_eq!(msix.fire(3).unwrap(), Delivery::Pending);
    assert_eq!(pba_qw(&msix, 0), 0b1010);
    assert_eq!(
        group.count_calls(|c| matches!(c, GroupCall::Trigger { .. })),
        0
    );

    control(&mut msix, ENABLE);
    assert_eq!(group.triggers_of(1), 1);
    assert_eq!(group.triggers_of(3), 1);
    assert_eq!(pba_qw(&msix, 0), 0);
    assert_eq!(group.take_signals(1), 1);
    assert_eq!(group.violations(), 0);
}

#[test]
fn entry_unmask_delivers_pending_exactly_once() {
    let (mut msix, group) = bound(4);
    msix.table_write(0, &0xfee0_0000u64.to_le_bytes()).unwrap();
    control(&mut msix, ENABLE);
    assert_eq!(msix.fire(0).unwrap(), Delivery::Pending);
    assert_eq!(msix.fire(0).unwrap(), Delivery::Pending);
    assert!(msix.pending(0));
    entry_dw(&mut msix, 0, 3, 0);
    assert_eq!(group.triggers_of(0), 1);
    assert!(!msix.pending(0));
    entry_dw(&mut msix, 0, 3, 1);
    entry_dw(&mut msix, 0, 3, 0);
    assert_eq!(group.triggers_of(0), 1);
    assert_eq!(group.violations(), 0);
}

#[test]
fn pending_entry_stays_pending_while_function_masked() {
    let (mut msix, group) = bound(2);
    control(&mut msix, ENABLE | FUNCTION_MASK);
    assert_eq!(msix.fire(1).unwrap(), Delivery::Pending);
    entry_dw(&mut msix, 1, 3, 0);
    assert!(msix.pending(1));
    assert_eq!(group.triggers_of(1), 0);
    control(&mut msix, ENABLE);
    assert_eq!(group.triggers_of(1), 1);
    assert!(!msix.pending(1));
}

#[test]
fn pba_is_read_only_to_the_guest() {
    let (mut msix, _) = bound(70);
    control(&mut msix, ENABLE);
    assert_eq!(msix.fire(65).unwrap(), Delivery::Pending);
    msix.pba_write(0, &u64::MAX.to_le_bytes());
    msix.pba_write(8, &0u64.to_le_bytes());
    assert_eq!(pba_qw(&msix, 0), 0);
    assert_eq!(pba_qw(&msix, 8), 0b10);
    let mut dw = [0u8; 4];
    msix.pba_read(12, &mut dw);
    assert_eq!(dw, [0; 4]);
    msix.pba_read(16, &mut dw);
    assert_eq!(dw, [0xff; 4]);
    msix.pba_read(9, &mut dw);
    assert_eq!(dw, [0xff; 4]);
}

#[test]
fn largest_table_has_2048_entries_and_a_256_byte_pba() {
    let mut bytes = [0u8; 12];
    bytes[0] = 0x11;
    bytes[2..4].copy_from_slice(&0x07ffu16.to_le_bytes());
    bytes[4..8].copy_from_slice(&0x0000_2000u32.to_le_bytes());
    bytes[8..12].copy_from_slice(&0x0000_a000u32.to_le_bytes());
    let mut msix = MsixState::from_bytes(&bytes).unwrap();
    let group = Arc::new(TestInterruptGroup::new(2048).unwrap());
    msix.set_group(Some(group.clone())).unwrap();
    assert_eq!(msix.table_size(), 2048);
    assert_eq!(msix.table_location().size, 2048 * 16);
    assert_eq!(msix.pba_location().size, 256);
    control(&mut msix, ENABLE);
    assert_eq!(msix.fire(2047).unwrap(), Delivery::Pending);
    assert_eq!(pba_qw(&msix, 248), 1 << 63);
    msix.table_write(2047 * 16, &0xfee0_0000u64.to_le_bytes())
        .unwrap();
    entry_dw(&mut msix, 2047, 3, 0);
    assert_eq!(group.triggers_of(2047), 1);
    assert!(matches!(
        msix.fire(2048),
        Err(pci_interrupts::Error::VectorOutOfRange {
            vector: 2048,
            count: 2048
        })
    ));
    for size in [2049, 0] {
        assert!(
            matches!(
                MsixState::new(size, 0, 0, 0, 0),
                Err(pci_interrupts::Error::InvalidCapability {
                    capability: "MSI-X",
                    reason: "table size must be 1 to 2048"
                })
            ),
            "table size {size}"
        );
    }
}

#[test]
fn from_bytes_rejects_wrong_id_short_input_and_reserved_bir() {
    let mut bytes = [0u8; 12];
    bytes[0] = 0x11;
    assert!(MsixState::from_bytes(&bytes).is_ok());
    let invalid = |r: pci_interrupts::Result<MsixState>, why: &str| {
        assert!(
            matches!(
                r,
                Err(pci_interrupts::Error::InvalidCapability { capability: "MSI-X", reason })
                    if reason == why
            ),
            "{why}"
        );
    };
    invalid(MsixState::from_bytes(&bytes[..11]), "fewer than 12 bytes");
    bytes[4] = 6;
    invalid(MsixState::from_bytes(&bytes), "reserved BAR indicator");
    bytes[4] = 0;
    bytes[0] = 0x05;
    invalid(MsixState::from_bytes(&bytes), "capability ID is not 0x11");
}

#[test]
fn from_bytes_starts_disabled_whatever_the_device_held() {
    let mut bytes = [0u8; 12];
    bytes[0] = 0x11;
    bytes[2..4].copy_from_slice(&(ENABLE | FUNCTION_MASK | 3).to_le_bytes());
    let msix = MsixState::from_bytes(&bytes).unwrap();
    assert!(!msix.enabled() && !msix.function_masked());
    assert_eq!(msix.table_size(), 4);
}

#[test]
fn snapshot_round_trip_restores_table_pba_and_control() {
    let (mut msix, _) = bound(8);
    program(&mut msix, 2, 0xfee0_0000, 0x52);
    msix.table_write(5 * 16, &0xfee0_1000u64.to_le_bytes())
        .unwrap();
    entry_dw(&mut msix, 5, 2, 0x55);
    control(&mut msix, ENABLE);
    assert_eq!(msix.fire(5).unwrap(), Delivery::Pending);
    let snap = msix.snapshot();
    let json = serde_json::to_string(&pci_interrupts::versioned(snap.clone())).unwrap();
    let back: Versioned<MsixSnapshot> = serde_json::from_str(&json).unwrap();

    let (mut dest, group) = bound(8);
    dest.restore(&pci_interrupts::payload(back).unwrap())
        .unwrap();
    assert_eq!(dest.snapshot(), snap);
    assert!(group.is_enabled());
    assert_eq!(
        group.route(2),
        Some(MsiRoute {
            address: 0xfee0_0000,
            data: 0x52
        })
    );
    assert!(group.is_masked(5) && dest.pending(5));
    // Unmasking the restored pending vector delivers it.
    entry_dw(&mut dest, 5, 3, 0);
    assert_eq!(group.triggers_of(5), 1);

    let other = MsixState::new(4, 2, 0, 2, 0x1000).unwrap().snapshot();
    assert!(matches!(
        dest.restore(&other),
        Err(pci_interrupts::Error::SnapshotMismatch {
            capability: "MSI-X",
            ..
        })
    ));
    let stale = Versioned {
        version: 99,
        payload: snap,
    };
    assert!(matches!(
        pci_interrupts::payload(stale),
        Err(pci_interrupts::Error::SnapshotVersion {
            found: 99,
            supported: pci_interrupts::SNAPSHOT_VERSION
        })
    ));
}

#[test]
fn group_failure_is_reported_and_retried_on_the_next_change() {
    let (mut msix, group) = bound(2);
    program(&mut msix, 0, 0xfee0_0000, 0x30);
    group.fail_calls(true);
    // The group's error comes back as `Group`, with the operation and the errno the group
    // gave (the test group fails with EIO).
    match msix.write(CONTROL, &ENABLE.to_le_bytes()) {
        Err(pci_interrupts::Error::Group {
            op: "enable",
            source,
        }) => {
            assert_eq!(source.raw_os_error(), Some(libc::EIO));
        }
        other => panic!("expected a Group error from enable, got {other:?}"),
    }
    assert!(msix.enabled());
    group.fail_calls(false);
    control(&mut msix, ENABLE | FUNCTION_MASK);
    control(&mut msix, ENABLE);
    assert!(group.is_enabled() && group.is_deliverable(0));
}
