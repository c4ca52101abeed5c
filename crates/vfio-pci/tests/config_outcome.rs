//! A config write says what it changed (`ConfigWriteOutcome`): what a VMM whose bus registers
//! BAR ranges must remove and add. PCI Local Bus 3.0 §6.2.5: a BAR decodes at the address its
//! register holds; the command register's Memory Space (bit 1) and I/O Space (bit 0) enables
//! and the ROM BAR's enable bit (§6.2.5.2) switch decoding; sizing writes all ones.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use vfio_fake_device::{BarSpec, DeviceTemplate, FakeDevice};
use vfio_pci::{AddressSpace, BarIndex, BarRange, ConfigWriteOutcome, VfioPciDevice};

const BAR0: BarIndex = BarIndex::Bar(0);

fn write32(dev: &VfioPciDevice, off: u64, v: u32) -> ConfigWriteOutcome {
    dev.write_config(off, &v.to_le_bytes()).unwrap()
}

fn command(dev: &VfioPciDevice, bits: u16, on: bool) -> ConfigWriteOutcome {
    let cmd = cfg_read16(dev, 0x04);
    let v = if on { cmd | bits } else { cmd & !bits };
    dev.write_config(0x04, &v.to_le_bytes()).unwrap()
}

fn range(base: u64, size: u64) -> Option<BarRange> {
    Some(BarRange { base, size })
}

/// The only BAR that changed, as (old, new).
fn only_change(o: &ConfigWriteOutcome, bar: BarIndex) -> (Option<BarRange>, Option<BarRange>) {
    let changes: Vec<_> = o.bar_changes().collect();
    assert_eq!(changes.len(), 1, "exactly one BAR changed: {o:?}");
    let c = o.bar(bar).unwrap_or_else(|| panic!("{bar} changed: {o:?}"));
    (c.removed(), c.added())
}

/// BAR0 32-bit memory 4 KiB, BAR1 I/O 32 ports, BAR2 64-bit memory 16 KiB, ROM 4 KiB.
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
fn a_guest_move_with_decode_on_reports_the_old_and_new_range() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    enable_device(&dev);
    let base = dev.bars()[0].base.unwrap();
    let new = MMIO32_BASE + 0x100_0000;
    let o = write32(&dev, 0x10, new as u32);
    let (old, added) = only_change(&o, BAR0);
    assert_eq!(old, range(base, 0x10_0000));
    assert_eq!(added, range(new, 0x10_0000));
    let c = o.bar(BAR0).unwrap();
    assert!(c.moved() && !c.decode_on() && !c.decode_off());
    assert_eq!(c.space, AddressSpace::Memory);
    assert_eq!(o.memory_decode, None);
    assert_eq!(dev.bar_at(new, AddressSpace::Memory), Some((BAR0, 0)));
}

#[test]
fn decode_off_then_move_then_decode_on_reports_nowhere_then_the_new_range() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    enable_device(&dev);
    let base = dev.bars()[0].base.unwrap();
    let new = MMIO32_BASE + 0x100_0000;
    // Decoding off: the enable flips; the register still holds the placement.
    let o = command(&dev, 0x2, false);
    assert_eq!(o.memory_decode, Some(false));
    assert_eq!(o.bar_changes().count(), 0);
    // A new address while decoding is off is not applied yet: the BAR decodes nowhere.
    let o = write32(&dev, 0x10, new as u32);
    assert_eq!(only_change(&o, BAR0), (range(base, 0x10_0000), None));
    assert!(o.bar(BAR0).unwrap().decode_off());
    // Decoding on: the move is applied, and the BAR decodes at its new range.
    let o = command(&dev, 0x2, true);
    assert_eq!(o.memory_decode, Some(true));
    assert_eq!(only_change(&o, BAR0), (None, range(new, 0x10_0000)));
    assert!(o.bar(BAR0).unwrap().decode_on());
}

#[test]
fn a_64bit_bar_decodes_nowhere_after_one_half_and_at_the_new_range_after_both() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("nvme-like"));
    enable_device(&dev);
    let base = dev.bars()[0].base.unwrap();
    let size = dev.bars()[0].guest_size;
    let new = base + 0x80_0000;
    assert_eq!(new >> 32, base >> 32);
    // The low half alone: the register holds an address the VMM has not accepted.
    let o = write32(&dev, 0x10, new as u32);
    assert_eq!(only_change(&o, BAR0), (range(base, size), None));
    // The high half completes the move: the BAR decodes at its new range.
    let o = write32(&dev, 0x14, (new >> 32) as u32);
    assert_eq!(only_change(&o, BAR0), (None, range(new, size)));
    // High half first, then low: the same, in the other order.
    let back = base + 0x100_0000;
    let o = write32(&dev, 0x14, (back >> 32) as u32);
    assert_eq!(
        o.bar_changes().count(),
        0,
        "the high half did not change: {o:?}"
    );
    let o = write32(&dev, 0x10, back as u32);
    assert_eq!(only_change(&o, BAR0), (range(new, size), None));
    let o = write32(&dev, 0x14, (back >> 32) as u32);
    assert_eq!(only_change(&o, BAR0), (None, range(back, size)));
}

#[test]
fn sizing_reports_decoding_nowhere_and_writing_the_address_back_reports_decoding_again() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    enable_device(&dev);
    let base = dev.bars()[0].base.unwrap();
    let o = write32(&dev, 0x10, u32::MAX);
    assert_eq!(only_change(&o, BAR0), (range(base, 0x10_0000), None));
    // Reading the size back changes nothing; writing the address back decodes again.
    assert_eq!(cfg_read32(&dev, 0x10), !(0x10_0000u32 - 1));
    let o = write32(&dev, 0x10, base as u32);
    assert_eq!(only_change(&o, BAR0), (None, range(base, 0x10_0000)));
    assert!(o.bar(BAR0).unwrap().decode_on());
}

#[test]
fn rom_enable_and_a_rom_move_are_reported() {
    let vm = Vm::new();
    let dev = attach(&vm, &every_kind());
    command(&dev, 0x2, true);
    let rom = dev.bars().into_iter().find(|b| b.index.is_rom()).unwrap();
    let at = rom.base.unwrap();
    // Enabled where it is: only the enable bit changes.
    let o = write32(&dev, 0x30, at as u32 | 1);
    assert_eq!(o.rom_enable, Some(true));
    assert_eq!(o.bar_changes().count(), 0);
    // Moved while enabled: its range moves.
    let new = MMIO32_BASE + 0x200_0000;
    let o = write32(&dev, 0x30, new as u32 | 1);
    assert_eq!(o.rom_enable, None);
    assert_eq!(
        only_change(&o, BarIndex::Rom),
        (range(at, 0x1000), range(new, 0x1000))
    );
    assert_eq!(o.bar(BarIndex::Rom).unwrap().space, AddressSpace::Memory);
    // Disabled: the enable bit again.
    let o = write32(&dev, 0x30, new as u32);
    assert_eq!(o.rom_enable, Some(false));
    assert_eq!(o.bar_changes().count(), 0);
}

#[test]
fn an_io_bar_move_is_reported_in_io_space() {
    let vm = Vm::new();
    let dev = attach(&vm, &every_kind());
    let o = command(&dev, 0x1, true);
    assert_eq!(o.io_decode, Some(true));
    assert_eq!(o.memory_decode, None);
    let io = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(1))
        .unwrap();
    let at = io.base.unwrap();
    let new = 0x1800;
    let o = write32(&dev, 0x14, new as u32 | 1);
    assert_eq!(
        only_change(&o, BarIndex::Bar(1)),
        (range(at, 32), range(new, 32))
    );
    assert_eq!(o.bar(BarIndex::Bar(1)).unwrap().space, AddressSpace::Io);
    assert_eq!(
        dev.bar_at(new, AddressSpace::Io),
        Some((BarIndex::Bar(1), 0))
    );
    assert_eq!(dev.bar_at(new, AddressSpace::Memory), None);
}

#[test]
fn writes_that_touch_no_bar_report_nothing() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("nvme-like"));
    enable_device(&dev);
    // Bus master only, the latency timer, a capability, a byte past the header.
    assert!(command(&dev, 0x4, false).is_empty());
    assert!(dev.write_config(0x0d, &[0x40]).unwrap().is_empty());
    let msix = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap().1;
    assert!(dev.write_config(msix + 2, &[0, 0]).unwrap().is_empty());
    assert!(dev.write_config(0x200, &[1, 2, 3, 4]).unwrap().is_empty());
}

#[test]
fn a_vmm_move_reports_the_range_it_moved() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    let base = dev.bars()[0].base.unwrap();
    let new = MMIO32_BASE + 0x100_0000;
    let o = dev.move_bar(BAR0, new).unwrap();
    assert_eq!(
        only_change(&o, BAR0),
        (range(base, 0x10_0000), range(new, 0x10_0000))
    );
    // A BAR that decodes nowhere (sizing pattern) decodes again when the VMM moves it.
    write32(&dev, 0x10, u32::MAX);
    let o = dev.move_bar(BAR0, base).unwrap();
    assert_eq!(only_change(&o, BAR0), (None, range(base, 0x10_0000)));
}
