//! Where a BAR decodes and what its register holds never disagree (the architecture's rule:
//! while a BAR register holds an address the VMM refuses - a sizing pattern, outside the
//! windows, on another device's range - the BAR decodes nowhere, until the guest writes an
//! address the VMM accepts). "Decodes" is what the VMM can observe: the BAR's guest mappings,
//! `bar_at` finding it, and its trapped range answering (a read nobody claims is all ones,
//! PCI Local Bus 3.0 §6.2.5 master abort).
//!
//! PCI Local Bus 3.0 §6.2.5.1: sizing writes all ones and reads back the size mask; a BAR
//! decodes at the address its register holds while its decode enable (Command bit 1 memory,
//! bit 0 I/O; the ROM also needs its enable bit, §6.2.5.2) is set.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use vfio_fake_device::{BarSpec, DeviceTemplate, FakeDevice};
use vfio_pci::{AddressSpace, BarIndex, VfioPciDevice};

/// Where BAR `index` decodes as the VMM sees it: the base `bar_at` finds it at, if any; with
/// a check that every guest mapping of it lies at that base.
fn decodes_at(dev: &VfioPciDevice, vm: &Vm, index: usize) -> Option<u64> {
    let index = bar_index(index);
    let view = dev.bars().into_iter().find(|b| b.index == index)?;
    let base = view.base?;
    let found = dev.bar_at(base, view.space()) == Some((index, 0));
    let mapped_here = vm
        .mapper
        .live()
        .iter()
        .filter(|&&(g, _)| g >= base && g < base + view.guest_size)
        .count();
    if !found {
        assert_eq!(
            mapped_here, 0,
            "BAR{index} not found at {base:#x} but mapped there"
        );
        return None;
    }
    Some(base)
}

/// The ROM register's address field.
fn rom_address(dev: &VfioPciDevice) -> u64 {
    u64::from(cfg_read32(dev, 0x30) & 0xffff_f800)
}

fn set_command(dev: &VfioPciDevice, bits: u16, on: bool) {
    let cmd = cfg_read16(dev, 0x04);
    cfg_write16(dev, 0x04, if on { cmd | bits } else { cmd & !bits });
}

/// A function with one BAR of each kind and a ROM: BAR0 32-bit memory 4 KiB, BAR1 I/O 32
/// ports, BAR2 64-bit memory 16 KiB, ROM 4 KiB.
fn every_kind() -> Arc<FakeDevice> {
    let t = DeviceTemplate::builder()
        .ids(0x1234, 0x5678)
        .bar(0, BarSpec::mem32(0x1000))
        .bar(1, BarSpec::io(32))
        .bar(2, BarSpec::mem64(0x4000))
        .rom(vec![0x55; 0x1000])
        .build()
        .unwrap();
    Arc::new(FakeDevice::new(t).unwrap())
}

#[test]
fn bar64_sized_then_decode_toggled_decodes_nowhere_until_an_address_is_written_back() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("nvme-like"));
    enable_device(&dev);
    let base = decodes_at(&dev, &vm, 0).unwrap();
    assert_ne!(bar_read32(&dev, 0, 0), u32::MAX);
    // Both halves all ones, then decoding off and on, no address written back.
    cfg_write32(&dev, 0x10, u32::MAX);
    cfg_write32(&dev, 0x14, u32::MAX);
    set_command(&dev, 0x2, false);
    set_command(&dev, 0x2, true);
    let pattern = bar_address(&dev, 0);
    assert_eq!(
        pattern,
        !(0x4000u64 - 1),
        "the register reads the sizing pattern"
    );
    assert_eq!(decodes_at(&dev, &vm, 0), None, "so the BAR decodes nowhere");
    assert!(vm.mapper.live().is_empty(), "nothing of it is mapped");
    assert_eq!(
        bar_read32(&dev, 0, 0),
        u32::MAX,
        "its trapped range is not served"
    );
    // Its range stays reserved: the guest writes the old address back and it decodes again.
    assert_eq!(dev.bars()[0].base, Some(base));
    cfg_write32(&dev, 0x10, base as u32);
    cfg_write32(&dev, 0x14, (base >> 32) as u32);
    assert_eq!(decodes_at(&dev, &vm, 0), Some(base));
    assert_ne!(bar_read32(&dev, 0, 0), u32::MAX);
    assert!(!vm.mapper.live().is_empty());
}

#[test]
fn bar64_sized_with_decode_off_then_decode_on_without_restore_decodes_nowhere() {
    // The other order: decoding off first, sizing, decoding back on.
    let vm = Vm::new();
    let dev = attach(&vm, &fake("nvme-like"));
    enable_device(&dev);
    set_command(&dev, 0x2, false);
    cfg_write32(&dev, 0x14, u32::MAX);
    cfg_write32(&dev, 0x10, u32::MAX);
    set_command(&dev, 0x2, true);
    assert_eq!(bar_address(&dev, 0), !(0x4000u64 - 1));
    assert_eq!(decodes_at(&dev, &vm, 0), None);
    assert!(vm.mapper.live().is_empty());
}

#[test]
fn bar64_with_one_half_rewritten_decodes_where_its_register_says_or_nowhere() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("nvme-like"));
    enable_device(&dev);
    let base = decodes_at(&dev, &vm, 0).unwrap();
    // Only the high half changes: the register holds an address of which the VMM has seen
    // half, and the BAR must not stay at the old one.
    assert!(base < 1 << 32, "placed in the 32-bit window");
    cfg_write32(&dev, 0x14, (MMIO64_BASE >> 32) as u32);
    assert_eq!(decodes_at(&dev, &vm, 0), None);
    // A command write applies the complete register: accepted (inside the 64-bit window),
    // the BAR decodes there.
    set_command(&dev, 0x2, false);
    set_command(&dev, 0x2, true);
    let now = bar_address(&dev, 0);
    assert_eq!(now, MMIO64_BASE + base);
    assert_eq!(decodes_at(&dev, &vm, 0), Some(now));
    // The same with a high half that lands outside every window: nowhere, even after the
    // command write.
    cfg_write32(&dev, 0x14, 0x7fff_0000);
    set_command(&dev, 0x2, false);
    set_command(&dev, 0x2, true);
    assert_eq!(decodes_at(&dev, &vm, 0), None);
}

#[test]
fn bar32_sizing_pattern_left_in_place_decodes_nowhere() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    enable_device(&dev);
    let base = decodes_at(&dev, &vm, 0).unwrap();
    cfg_write32(&dev, 0x10, u32::MAX);
    set_command(&dev, 0x2, false);
    set_command(&dev, 0x2, true);
    assert_eq!(bar_address(&dev, 0), u64::from(!(0x10_0000u32 - 1)));
    assert_eq!(decodes_at(&dev, &vm, 0), None);
    assert_eq!(bar_read32(&dev, 0, 0), u32::MAX);
    cfg_write32(&dev, 0x10, base as u32);
    assert_eq!(decodes_at(&dev, &vm, 0), Some(base));
    assert_eq!(
        bar_read32(&dev, 0, 0),
        vfio_fake_device::edu::ID_VALUE,
        "edu's identification register"
    );
}

#[test]
fn bar_moved_outside_the_windows_decodes_nowhere_and_the_register_keeps_the_guests_value() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    enable_device(&dev);
    let base = decodes_at(&dev, &vm, 0).unwrap();
    // 0x100000 is guest RAM in any VMM's map, far below the 32-bit window.
    cfg_write32(&dev, 0x10, 0x10_0000);
    assert_eq!(bar_address(&dev, 0), 0x10_0000);
    assert_eq!(decodes_at(&dev, &vm, 0), None);
    assert!(dev.bar_at(0x10_0000, AddressSpace::Memory).is_none());
    assert_eq!(
        dev.bars()[0].base,
        Some(base),
        "the old range stays reserved"
    );
    // An address the VMM accepts brings it back, there.
    let new = MMIO32_BASE + 0x800_0000;
    cfg_write32(&dev, 0x10, new as u32);
    assert_eq!(decodes_at(&dev, &vm, 0), Some(new));
    assert_eq!(bar_read32(&dev, 0, 0), vfio_fake_device::edu::ID_VALUE);
}

#[test]
fn a_bar_moved_onto_another_device_decodes_nowhere_and_its_old_range_stays_reserved() {
    let vm = Vm::new();
    let a = attach(&vm, &fake("edu"));
    let b = attach(&vm, &fake("edu"));
    enable_device(&a);
    let a0 = a.bars()[0].base.unwrap();
    let b0 = b.bars()[0].base.unwrap();
    // The VMM's own move is refused and changes nothing.
    assert!(matches!(
        a.move_bar(BarIndex::Bar(0), b0),
        Err(vfio_pci::Error::BarPlacement { .. })
    ));
    assert_eq!(decodes_at(&a, &vm, 0), Some(a0));
    assert_eq!(bar_address(&a, 0), a0);
    // The guest's write is refused too: a decodes nowhere, b is untouched.
    cfg_write32(&a, 0x10, b0 as u32);
    set_command(&a, 0x2, false);
    set_command(&a, 0x2, true);
    assert_eq!(bar_address(&a, 0), b0, "the guest reads what it wrote");
    assert_eq!(decodes_at(&a, &vm, 0), None);
    assert_eq!(
        b.bar_at(b0, AddressSpace::Memory),
        Some((BarIndex::Bar(0), 0))
    );
    assert_eq!(a.bars()[0].base, Some(a0));
    // A reset puts the register back on the placement, decoding there.
    a.reset().unwrap();
    assert_eq!(bar_address(&a, 0), a0);
    assert_eq!(decodes_at(&a, &vm, 0), Some(a0));
}

#[test]
fn io_bar_and_rom_follow_the_same_rule() {
    let vm = Vm::new();
    let dev = attach(&vm, &every_kind());
    set_command(&dev, 0x3, true);
    let io = decodes_at(&dev, &vm, 1).unwrap();
    let rom = decodes_at(&dev, &vm, 6).unwrap();
    let bar0 = decodes_at(&dev, &vm, 0).unwrap();
    let bar2 = decodes_at(&dev, &vm, 2).unwrap();
    // I/O BAR: sizing pattern left (I/O decode toggled), then written back.
    cfg_write32(&dev, 0x14, u32::MAX);
    set_command(&dev, 0x1, false);
    set_command(&dev, 0x1, true);
    assert_eq!(bar_address(&dev, 1), u64::from(!31u32 & !3));
    assert_eq!(decodes_at(&dev, &vm, 1), None);
    cfg_write32(&dev, 0x14, io as u32);
    assert_eq!(decodes_at(&dev, &vm, 1), Some(io));
    // ROM: enabled at its place, it is served; sizing (enable bit clear, as Linux does)
    // leaves it nowhere until its address comes back.
    cfg_write32(&dev, 0x30, rom as u32 | 1);
    assert_eq!(decodes_at(&dev, &vm, 6), Some(rom));
    let mut b = [0u8; 4];
    dev.read_bar(BarIndex::Rom, 0, &mut b);
    assert_eq!(b, [0x55; 4]);
    cfg_write32(&dev, 0x30, 0xffff_f800);
    assert_eq!(rom_address(&dev), 0xffff_f000, "4 KiB ROM");
    set_command(&dev, 0x2, false);
    set_command(&dev, 0x2, true);
    assert_eq!(decodes_at(&dev, &vm, 6), None);
    dev.read_bar(BarIndex::Rom, 0, &mut b);
    assert_eq!(b, [0xff; 4]);
    // Enabled at the sizing address: refused, still nowhere.
    cfg_write32(&dev, 0x30, 0xffff_f001);
    assert_eq!(decodes_at(&dev, &vm, 6), None);
    cfg_write32(&dev, 0x30, rom as u32 | 1);
    assert_eq!(decodes_at(&dev, &vm, 6), Some(rom));
    // The other BARs never moved.
    assert_eq!(decodes_at(&dev, &vm, 0), Some(bar0));
    assert_eq!(decodes_at(&dev, &vm, 2), Some(bar2));
}

#[test]
fn bar_view_reports_decoding() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    enable_device(&dev);
    assert!(dev.bars()[0].decoding);
    cfg_write32(&dev, 0x10, u32::MAX);
    let v = &dev.bars()[0];
    assert!(!v.decoding);
    assert!(v.mapped.is_empty());
}

#[test]
fn bar64_sized_with_decode_on_then_given_a_new_address_decodes_there_at_once() {
    // Sizing with decoding on, then both halves of a new address: the move is complete
    // when the second half is written, without waiting for a command write.
    let vm = Vm::new();
    let dev = attach(&vm, &fake("nvme-like"));
    enable_device(&dev);
    cfg_write32(&dev, 0x10, u32::MAX);
    cfg_write32(&dev, 0x14, u32::MAX);
    assert_eq!(decodes_at(&dev, &vm, 0), None);
    let new = MMIO64_BASE + 0x20_0000;
    cfg_write32(&dev, 0x10, new as u32);
    assert_eq!(decodes_at(&dev, &vm, 0), None, "half an address");
    cfg_write32(&dev, 0x14, (new >> 32) as u32);
    assert_eq!(decodes_at(&dev, &vm, 0), Some(new));
    // High half first works the same.
    cfg_write32(&dev, 0x14, u32::MAX);
    cfg_write32(&dev, 0x10, u32::MAX);
    let back = MMIO64_BASE + 0x40_0000;
    cfg_write32(&dev, 0x14, (back >> 32) as u32);
    cfg_write32(&dev, 0x10, back as u32);
    assert_eq!(decodes_at(&dev, &vm, 0), Some(back));
}

#[test]
fn snapshot_of_a_bar_decoding_nowhere_restores_decoding_nowhere() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    enable_device(&dev);
    let base = decodes_at(&dev, &vm, 0).unwrap();
    cfg_write32(&dev, 0x10, u32::MAX);
    let snap = dev.snapshot().unwrap();
    drop(dev);
    let vm2 = Vm::new();
    let dev2 = attach(&vm2, &fake("edu"));
    dev2.restore(&snap).unwrap();
    assert_eq!(bar_address(&dev2, 0), u64::from(!(0x10_0000u32 - 1)));
    assert_eq!(decodes_at(&dev2, &vm2, 0), None);
    assert!(vm2.mapper.live().is_empty());
    cfg_write32(&dev2, 0x10, base as u32);
    assert_eq!(decodes_at(&dev2, &vm2, 0), Some(base));
}
