//! Property: arbitrary guest config writes never panic, never change a read-only bit, and can
//! only clear (never set) write-1-to-clear bits.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use pci_config::regs::*;
use pci_config::{cap_id, BarKind, ConfigSpace, CONFIG_SPACE_SIZE};
use proptest::prelude::*;

/// A populated space: BARs of every kind, a ROM, capabilities, RW1C status bits set.
fn populated() -> ConfigSpace {
    let mut cfg = ConfigSpace::new();
    cfg.set_vendor_id(0x1b36);
    cfg.set_device_id(0x0010);
    cfg.set_interrupt_pin(1);
    // Some RW1C bits set, some clear: a write of 1 must clear the former and leave the latter.
    cfg.set_status(STATUS_MASTER_DATA_PARITY_ERROR | STATUS_RECEIVED_MASTER_ABORT);
    cfg.declare_bar(0, BarKind::Memory64 { prefetchable: true }, 64 << 30)
        .unwrap();
    cfg.declare_bar(
        2,
        BarKind::Memory32 {
            prefetchable: false,
        },
        0x4000,
    )
    .unwrap();
    cfg.declare_bar(3, BarKind::Io, 0x40).unwrap();
    cfg.declare_bar(
        4,
        BarKind::Memory64 {
            prefetchable: false,
        },
        0x1000,
    )
    .unwrap();
    cfg.declare_rom(0x10000).unwrap();
    let pcie = cfg
        .add_capability(0x40..0x80, cap_id::PCI_EXPRESS, &[0; 0x3a])
        .unwrap();
    cfg.set_rw1c(usize::from(pcie) + 0x0a, &[0x0f]).unwrap();
    cfg.set_u8(usize::from(pcie) + 0x0a, 0x05).unwrap();
    cfg.set_writable(usize::from(pcie) + 0x08, &[0xff, 0x7f])
        .unwrap();
    cfg
}

#[derive(Debug, Clone)]
struct GuestWrite {
    offset: usize,
    data: Vec<u8>,
}

fn guest_write() -> impl Strategy<Value = GuestWrite> {
    // Half the writes land in the header (command, status, BARs, ROM), half anywhere.
    let offset = prop_oneof![0usize..0x40, 0usize..4200];
    (offset, proptest::collection::vec(any::<u8>(), 0..8))
        .prop_map(|(offset, data)| GuestWrite { offset, data })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn guest_writes_never_change_read_only_bits_and_only_clear_rw1c_bits(
        writes in proptest::collection::vec(guest_write(), 1..64),
        command in any::<u16>(),
    ) {
        let mut cfg = populated();
        cfg.write_u16(COMMAND, command).unwrap();
        let writable = *cfg.writable_mask();
        let rw1c = *cfg.rw1c_mask();
        for w in &writes {
            let before = *cfg.as_bytes();
            let result = cfg.write(w.offset, &w.data);
            let valid = matches!(w.data.len(), 1 | 2 | 4) && w.offset + w.data.len() <= CONFIG_SPACE_SIZE;
            prop_assert_eq!(result.is_ok(), valid);
            let after = cfg.as_bytes();
            for i in 0..CONFIG_SPACE_SIZE {
                let ro = !(writable[i] | rw1c[i]);
                prop_assert_eq!(before[i] & ro, after[i] & ro, "read-only bit changed at {:#x}", i);
                prop_assert_eq!(after[i] & rw1c[i] & !before[i], 0, "RW1C bit set at {:#x}", i);
            }
            // Masks are never changed by the guest.
            prop_assert_eq!(cfg.writable_mask(), &writable);
            prop_assert_eq!(cfg.rw1c_mask(), &rw1c);
            let mut buf = [0u8; 4];
            let _ = cfg.read(w.offset, buf.get_mut(..w.data.len().min(4)).unwrap());
        }
        // Whatever the guest did, the capability walk still terminates.
        let _ = cfg.capabilities();
        let _ = cfg.extended_capabilities();
    }

    #[test]
    fn capability_walks_terminate_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let (std_caps, _) = pci_config::parse_capabilities_lenient(&bytes);
        prop_assert!(std_caps.len() <= 48);
        let (ext_caps, _) = pci_config::parse_extended_capabilities_lenient(&bytes);
        prop_assert!(ext_caps.len() <= 960);
    }
}
