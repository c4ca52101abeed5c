//! Property tests: arbitrary guest access sequences never panic, and the group never delivers
//! a vector the guest sees as masked (PCI Local Bus 3.0 §6.8.1.x/§6.8.2.x masking rules).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use pci_interrupts::testing::TestInterruptGroup;
use pci_interrupts::{MsiRoute, MsiState, MsixState};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum MsixOp {
    CapWrite(u64, Vec<u8>),
    CapRead(u64, usize),
    TableWrite(u64, Vec<u8>),
    TableRead(u64, usize),
    PbaWrite(u64, Vec<u8>),
    PbaRead(u64, usize),
    Fire(u32),
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..=max)
}

fn msix_op() -> impl Strategy<Value = MsixOp> {
    prop_oneof![
        // Control writes: enable / function mask combinations, mostly.
        3 => (prop_oneof![Just(0u16), Just(0x8000), Just(0xc000), Just(0x4000), any::<u16>()])
            .prop_map(|c| MsixOp::CapWrite(2, c.to_le_bytes().to_vec())),
        1 => (0u64..16, bytes(5)).prop_map(|(o, d)| MsixOp::CapWrite(o, d)),
        1 => (0u64..16, 0usize..6).prop_map(|(o, l)| MsixOp::CapRead(o, l)),
        // Vector control writes: mask / unmask.
        4 => (0u64..90, any::<bool>()).prop_map(|(v, m)| {
            MsixOp::TableWrite(v * 16 + 12, u32::from(m).to_le_bytes().to_vec())
        }),
        2 => (0u64..90, 0u64..4, prop_oneof![Just(4usize), Just(8)], any::<u64>()).prop_map(
            |(v, dw, len, val)| {
                MsixOp::TableWrite(v * 16 + dw * 4, val.to_le_bytes()[..len].to_vec())
            }
        ),
        1 => (0u64..1500, bytes(9)).prop_map(|(o, d)| MsixOp::TableWrite(o, d)),
        1 => (0u64..1500, 0usize..10).prop_map(|(o, l)| MsixOp::TableRead(o, l)),
        1 => (0u64..24, bytes(9)).prop_map(|(o, d)| MsixOp::PbaWrite(o, d)),
        1 => (0u64..24, 0usize..10).prop_map(|(o, l)| MsixOp::PbaRead(o, l)),
        3 => (0u32..92).prop_map(MsixOp::Fire),
    ]
}

fn dword(read: impl Fn(u64, &mut [u8]), offset: u64) -> u32 {
    let mut b = [0u8; 4];
    read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// Checks the group against what the guest can read back.
fn check_msix(msix: &MsixState, group: &TestInterruptGroup, n: u32) -> Result<(), TestCaseError> {
    prop_assert_eq!(group.violations(), 0, "trigger of a masked vector");
    let control = dword(|o, b| msix.read(o, b), 0) >> 16;
    let enabled = control & 0x8000 != 0;
    let function_masked = control & 0x4000 != 0;
    for v in 0..n {
        let base = u64::from(v) * 16;
        let table = |o| dword(|o, b| msix.table_read(o, b), base + o);
        let entry_masked = table(12) & 1 != 0;
        let deliverable = enabled && !function_masked && !entry_masked;
        prop_assert_eq!(group.is_deliverable(v), deliverable, "vector {}", v);
        if deliverable {
            let route = MsiRoute {
                address: u64::from(table(0)) | (u64::from(table(4)) << 32),
                data: table(8),
            };
            prop_assert_eq!(group.route(v), Some(route), "vector {}", v);
        }
        let pba = dword(|o, b| msix.pba_read(o, b), u64::from(v / 32) * 4);
        if pba & (1 << (v % 32)) != 0 {
            prop_assert!(!deliverable, "vector {} pending while deliverable", v);
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum MsiOp {
    Write(u64, Vec<u8>),
    Read(u64, usize),
    Fire(u32),
}

fn msi_op() -> impl Strategy<Value = MsiOp> {
    prop_oneof![
        2 => (any::<u16>()).prop_map(|c| MsiOp::Write(2, c.to_le_bytes().to_vec())),
        3 => (0u64..0x1c, bytes(5)).prop_map(|(o, d)| MsiOp::Write(o, d)),
        1 => (0u64..0x1c, 0usize..6).prop_map(|(o, l)| MsiOp::Read(o, l)),
        2 => (0u32..34).prop_map(MsiOp::Fire),
    ]
}

fn check_msi(msi: &MsiState, group: &TestInterruptGroup) -> Result<(), TestCaseError> {
    prop_assert_eq!(group.violations(), 0, "trigger of a masked vector");
    let control = dword(|o, b| msi.read(o, b), 0) >> 16;
    let enabled = control & 1 != 0;
    let allocated = 1u32 << ((control >> 4) & 7);
    prop_assert!(allocated <= msi.max_vectors(), "MME above MMC");
    let (mask, pending) = if msi.per_vector_mask() {
        let off = if msi.is_64bit() { 0x10 } else { 0x0c };
        (
            dword(|o, b| msi.read(o, b), off),
            dword(|o, b| msi.read(o, b), off + 4),
        )
    } else {
        (0, 0)
    };
    for v in 0..msi.max_vectors() {
        let deliverable = enabled && v < allocated && mask & (1 << v) == 0;
        prop_assert_eq!(group.is_deliverable(v), deliverable, "vector {}", v);
        if pending & (1 << v) != 0 {
            prop_assert!(!deliverable, "vector {} pending while deliverable", v);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn msix_accesses_never_panic_nor_deliver_masked_vectors(
        n in 1u32..=80,
        ops in prop::collection::vec(msix_op(), 1..64),
    ) {
        let mut msix = MsixState::new(n, 1, 0, 1, 0x800).unwrap();
        let group = Arc::new(TestInterruptGroup::new(n).unwrap());
        msix.set_group(Some(group.clone())).unwrap();
        for op in ops {
            match op {
                MsixOp::CapWrite(o, d) => msix.write(o, &d).unwrap(),
                MsixOp::CapRead(o, l) => msix.read(o, &mut vec![0; l]),
                MsixOp::TableWrite(o, d) => msix.table_write(o, &d).unwrap(),
                MsixOp::TableRead(o, l) => msix.table_read(o, &mut vec![0; l]),
                MsixOp::PbaWrite(o, d) => msix.pba_write(o, &d),
                MsixOp::PbaRead(o, l) => msix.pba_read(o, &mut vec![0; l]),
                MsixOp::Fire(v) => prop_assert_eq!(
                    matches!(
                        msix.fire(v),
                        Err(pci_interrupts::Error::VectorOutOfRange { vector, count })
                            if vector == v && count == n
                    ),
                    v >= n
                ),
            }
            check_msix(&msix, &group, n)?;
        }
    }

    #[test]
    fn msi_accesses_never_panic_nor_deliver_masked_vectors(
        log2 in 0u32..=5,
        addr64: bool,
        pvm: bool,
        ops in prop::collection::vec(msi_op(), 1..64),
    ) {
        let mut msi = MsiState::new(1 << log2, addr64, pvm).unwrap();
        let group = Arc::new(TestInterruptGroup::new(1 << log2).unwrap());
        msi.set_group(Some(group.clone())).unwrap();
        for op in ops {
            match op {
                MsiOp::Write(o, d) => msi.write(o, &d).unwrap(),
                MsiOp::Read(o, l) => msi.read(o, &mut vec![0; l]),
                MsiOp::Fire(v) => prop_assert_eq!(
                    matches!(
                        msi.fire(v),
                        Err(pci_interrupts::Error::VectorOutOfRange { vector, .. }) if vector == v
                    ),
                    v >= 1 << log2
                ),
            }
            check_msi(&msi, &group)?;
        }
    }
}
