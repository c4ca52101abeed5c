//! A guest writing garbage everywhere: no panic, read-only header fields
//! keep their values, and the device works after a reset.

mod common;

use common::*;
use proptest::prelude::*;
use vfio_pci::{BarIndex, VfioPciDevice};

/// The VMM invariant "register and decode agree": a BAR that decodes anywhere (found by
/// `bar_at`, served, mapped) decodes at the address its register holds, and every guest
/// mapping belongs to such a BAR of one of `devs`, inside it.
fn register_and_decode_agree(devs: &[&VfioPciDevice], vm: &Vm) -> Result<(), TestCaseError> {
    let mut decoding = Vec::new();
    for dev in devs {
        for b in dev.bars() {
            let Some(base) = b.base else { continue };
            let found = dev.bar_at(base, b.space()) == Some((b.index, 0));
            prop_assert_eq!(found, b.decoding, "{} bar_at vs decoding", b.index);
            if !found {
                continue;
            }
            decoding.push((base, b.guest_size));
            let reg = if b.index == BarIndex::Rom {
                u64::from(cfg_read32(dev, 0x30) & 0xffff_f800)
            } else {
                bar_address(dev, b.index.slot() as u64)
            };
            prop_assert_eq!(
                reg,
                base,
                "{} decodes at {:#x}, register {:#x}",
                b.index,
                base,
                reg
            );
        }
    }
    for (gpa, len) in vm.mapper.live() {
        let owner = decoding
            .iter()
            .any(|&(base, size)| gpa >= base && gpa + len <= base + size);
        prop_assert!(
            owner,
            "guest mapping {:#x}+{:#x} of no decoding BAR",
            gpa,
            len
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn guest_garbage_in_config_and_bars_never_panics_and_reset_recovers(
        ops in proptest::collection::vec(
            (any::<bool>(), 0u64..4200, 0usize..9, any::<u64>(), 0usize..8),
            1..200,
        )
    ) {
        let vm = Vm::new();
        let f = fake("nvme-like");
        let dev = attach(&vm, &f);
        let ids = cfg_read32(&dev, 0);
        let class = cfg_read32(&dev, 8);
        for (is_cfg, off, len, val, bar) in ops {
            let bytes = val.to_le_bytes();
            let data = &bytes[..len.min(8)];
            if is_cfg {
                let _ = dev.write_config(off, data);
                let mut b = vec![0u8; len.min(8)];
                dev.read_config(off, &mut b);
            } else {
                let _ = dev.write_bar(bar_index(bar), off % 0x8000, data);
                let mut b = vec![0u8; len.min(8)];
                dev.read_bar(bar_index(bar), off % 0x8000, &mut b);
            }
            register_and_decode_agree(&[&dev], &vm)?;
        }
        prop_assert_eq!(cfg_read32(&dev, 0), ids);
        prop_assert_eq!(cfg_read32(&dev, 8) >> 8, class >> 8);
        dev.reset().unwrap();
        register_and_decode_agree(&[&dev], &vm)?;
        enable_device(&dev);
        // CAP.MQES of the nvme-like controller reads back after the storm.
        prop_assert_eq!(bar_read32(&dev, 0, 0), vfio_fake_device::nvme_like::CAP_VALUE as u32);
        // Every placement still lies inside the windows and no mapping leaked.
        for b in dev.bars() {
            let base = b.base.unwrap();
            prop_assert_eq!(base % b.guest_size, 0);
        }
        let live = vm.mapper.live().len();
        drop(dev);
        prop_assert!(live > 0);
        prop_assert!(vm.mapper.live().is_empty());
    }
}

/// A guest value for a BAR, ROM or command register: the sizing pattern, zero, an address in
/// or out of the VMM's windows (on the other device's BARs, too), or anything.
fn register_value() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(u32::MAX),
        Just(0xffff_f800),
        Just(0u32),
        (0u32..0x200).prop_map(|p| (MMIO32_BASE as u32).wrapping_add(p << 12)),
        Just((MMIO64_BASE >> 32) as u32),
        (0u32..0x100).prop_map(|p| 0x1000 + 0x20 * p),
        any::<u32>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Sizing, moves, half-written 64-bit BARs, ROM enables and decode toggles in any order,
    /// on two devices sharing the windows: after every write, register and decode agree,
    /// and neither device's BARs overlap the other's.
    #[test]
    fn bar_and_command_writes_in_any_order_keep_register_and_decode_in_agreement(
        ops in proptest::collection::vec(
            (any::<bool>(), 0usize..9, register_value(), prop_oneof![Just(4usize), Just(2), Just(1)]),
            1..120,
        )
    ) {
        let vm = Vm::new();
        let nvme = attach(&vm, &fake("nvme-like"));
        let edu = attach(&vm, &fake("edu"));
        for (first, reg, val, len) in ops {
            let dev = if first { &nvme } else { &edu };
            let off: u64 = match reg {
                0 => 0x04,
                7 => 0x30,
                8 => 0x04,
                r => 0x10 + 4 * (r as u64 - 1),
            };
            // Narrow writes land on any aligned part of the register.
            let off = off + (u64::from(val >> 24) % 4) / len as u64 * len as u64 % 4;
            let bytes = val.to_le_bytes();
            let _ = dev.write_config(off, &bytes[..len.min(4)]);
            register_and_decode_agree(&[&nvme, &edu], &vm)?;
        }
        // Whatever the storm left, the two devices' decoding BARs never overlap.
        let ranges: Vec<(u64, u64)> = nvme
            .bars()
            .into_iter()
            .chain(edu.bars())
            .filter(|b| b.decoding && b.kind != pci_config::BarKind::Io)
            .map(|b| (b.base.unwrap(), b.guest_size))
            .collect();
        for (i, a) in ranges.iter().enumerate() {
            for b in ranges.iter().skip(i + 1) {
                prop_assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "{:x?} overlaps {:x?}", a, b);
            }
        }
    }
}
