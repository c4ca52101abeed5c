//! VfioPciDevice against the fake device: what the guest sees and what the
//! VMM gets, pinned to the PCI specs and the VFIO uAPI.

mod common;

use common::*;
use vfio_fake_device::{nvme_like, Op};
use vfio_pci::{AddressSpace, BarIndex, DeviceOptions, IrqMode, MsixRelocation};

#[test]
fn guest_sizes_every_bar_to_the_device_region_size() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = attach(&vm, &f);
    let (size, flags) = size_bar(&dev, 0);
    assert_eq!(size, nvme_like::BAR0_SIZE);
    // 64-bit memory BAR: type bits 2:1 = 10b.
    assert_eq!((flags >> 1) & 3, 2);
    // BAR1 is the upper half: it is not a BAR of its own.
    let views = dev.bars();
    assert!(views.iter().all(|b| b.index != BarIndex::Bar(1)));
}

#[test]
fn bars_are_placed_naturally_aligned_inside_the_vmm_windows() {
    let vm = Vm::new();
    let f = fake("edu");
    let dev = attach(&vm, &f);
    for b in dev.bars() {
        let base = b.base.expect("placed");
        assert_eq!(base % b.guest_size, 0, "{} at {base:#x}", b.index);
        assert_eq!(bar_address(&dev, b.index.slot() as u64), base);
        let in32 = base >= MMIO32_BASE && base + b.guest_size <= MMIO32_BASE + MMIO32_SIZE;
        let in64 = base >= MMIO64_BASE && base + b.guest_size <= MMIO64_BASE + MMIO64_SIZE;
        assert!(in32 || in64);
    }
}

#[test]
fn multifunction_bit_of_a_multifunction_device_is_masked_from_the_guest() {
    // Header Type bit 7 (PCI Local Bus 3.0, 6.2.1): the guest sees one
    // function, so it must not probe functions 1..7 of this slot.
    use vfio_backend::Vfio;
    use vfio_fake_device::{BarSpec, Capability, DeviceTemplate, FakeDevice};
    let template = DeviceTemplate::builder()
        .ids(0x1234, 0x5678)
        .class(0x02, 0x00, 0x00)
        .multifunction(true)
        .bar(0, BarSpec::mem32(0x1000))
        .capability(Capability::PowerManagement)
        .build()
        .unwrap();
    let f = std::sync::Arc::new(FakeDevice::new(template).unwrap());
    let mut raw = [0u8; 1];
    f.region_read(vfio_backend::region::CONFIG, 0x0e, &mut raw)
        .unwrap();
    assert_eq!(raw[0] & 0x80, 0x80, "the host function is multi-function");
    let vm = Vm::new();
    let dev = attach(&vm, &f);
    assert_eq!(cfg_read8(&dev, 0x0e) & 0x80, 0);
    assert_eq!(cfg_read8(&dev, 0x0e) & 0x7f, raw[0] & 0x7f, "layout kept");
}

#[test]
fn sriov_is_hidden_and_the_extended_chain_stays_walkable() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("nvme-like"));
    let ext = walk_ext_caps(&dev);
    assert!(
        ext.iter().all(|&(id, _)| id != 0x10),
        "SR-IOV visible: {ext:?}"
    );
    assert!(ext.iter().any(|&(id, _)| id == 0x01), "AER lost: {ext:?}");
    assert!(dev
        .hidden_capabilities()
        .iter()
        .any(|h| h.extended && h.id == 0x10 && h.reason.contains("SR-IOV")));
}

#[test]
fn msix_table_page_is_trapped_and_the_rest_of_the_bar_mapped() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("nvme-like"));
    let bar0 = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    let base = bar0.base.unwrap();
    let (tgpa, tlen) = bar0.msix_table.unwrap();
    assert_eq!(tgpa, base + nvme_like::MSIX_TABLE_OFFSET);
    assert_eq!(tlen, 16 * u64::from(nvme_like::MSIX_VECTORS));
    // Nothing mapped overlaps the table or the PBA.
    let (pgpa, plen) = bar0.msix_pba.unwrap();
    for &(g, l) in &bar0.mapped {
        assert!(g + l <= tgpa || g >= tgpa + tlen);
        assert!(g + l <= pgpa || g >= pgpa + plen);
    }
    // The device's mmap-able page (0x2000..0x3000) is mapped.
    assert!(bar0.mapped.contains(&(base + 0x2000, 0x1000)));
    assert_eq!(vm.mapper.live(), bar0.mapped);
}

#[test]
fn msix_table_is_relocated_on_64k_pages_and_the_capability_points_there() {
    let vm = Vm::with_page_size(65536);
    let f = fake("nvme-like");
    let dev = attach_with(
        &vm,
        &f,
        DeviceOptions::default()
            .with_page_size(65536)
            .with_msix_relocation(MsixRelocation::Always),
    );
    let bar0 = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    assert!(bar0.msix_relocated);
    assert!(bar0.guest_size > nvme_like::BAR0_SIZE);
    assert_eq!(size_bar(&dev, 0).0, bar0.guest_size);
    let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap();
    let table = cfg_read32(&dev, cap + 4);
    assert_eq!(table & 7, 0, "BIR 0");
    assert_eq!(
        bar0.base.unwrap() + u64::from(table & !7),
        bar0.msix_table.unwrap().0
    );
}

#[test]
fn enabling_msix_with_every_vector_costs_one_set_irqs_call() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = attach(&vm, &f);
    let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap();
    let bar0 = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    let table = bar0.msix_table.unwrap().0 - bar0.base.unwrap();
    for v in 0..u64::from(nvme_like::MSIX_VECTORS) {
        program_msix_entry(&dev, 0, table, v, 0xfee0_0000, 0x40 + v as u32);
    }
    let before = f.counters().calls(Op::SetIrqEventfds);
    msix_enable(&dev, cap, true);
    assert_eq!(dev.irq_mode(), IrqMode::Msix);
    assert_eq!(f.counters().calls(Op::SetIrqEventfds) - before, 1);

    // Masking and unmasking a vector costs no SET_IRQS, only a route update.
    let g = group_with(&vm, nvme_like::MSIX_VECTORS);
    let updates = g.updates_of(3);
    bar_write32(&dev, 0, table + 16 * 3 + 12, 1);
    bar_write32(&dev, 0, table + 16 * 3 + 12, 0);
    assert_eq!(f.counters().calls(Op::SetIrqEventfds) - before, 1);
    assert!(g.updates_of(3) > updates);
    assert_eq!(
        g.updates_of(4),
        1,
        "vector 4 untouched since it was unmasked"
    );
}

#[test]
fn a_vector_that_fires_while_masked_is_delivered_once_on_unmask() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = attach(&vm, &f);
    enable_device(&dev);
    let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap();
    let bar0 = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    let table = bar0.msix_table.unwrap().0 - bar0.base.unwrap();
    program_msix_entry(&dev, 0, table, 2, 0xfee0_0000, 0x42);
    msix_enable(&dev, cap, true);
    let g = group_with(&vm, nvme_like::MSIX_VECTORS);

    // Mask vector 2, ring the doorbell that raises it.
    bar_write32(&dev, 0, table + 16 * 2 + 12, 1);
    bar_write32(
        &dev,
        0,
        nvme_like::DOORBELLS + 2 * nvme_like::DOORBELL_STRIDE,
        1,
    );
    assert_eq!(g.take_delivered(2), 0, "masked: nothing delivered");
    bar_write32(&dev, 0, table + 16 * 2 + 12, 0);
    assert_eq!(g.take_delivered(2), 1, "delivered on unmask");
    assert_eq!(g.take_delivered(2), 0, "exactly once");
}

#[test]
fn disabling_msix_falls_back_to_intx() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = attach(&vm, &f);
    let initial = dev.irq_mode();
    let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap();
    msix_enable(&dev, cap, true);
    assert_eq!(dev.irq_mode(), IrqMode::Msix);
    msix_enable(&dev, cap, false);
    assert_eq!(dev.irq_mode(), initial);
}

#[test]
fn guest_moving_a_bar_moves_its_mappings() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("nvme-like"));
    enable_device(&dev);
    let bar0 = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    let old = bar0.base.unwrap();
    let new = if old >= MMIO64_BASE {
        old + 0x10_0000
    } else {
        MMIO32_BASE + 0x100_0000
    };
    // Decoding on: a 64-bit BAR move is taken once both halves are written.
    cfg_write32(&dev, 0x10, new as u32 | (cfg_read32(&dev, 0x10) & 0xf));
    cfg_write32(&dev, 0x14, (new >> 32) as u32);
    // Linux toggles decoding around BAR writes; the move lands either way.
    let cmd = cfg_read16(&dev, 0x04);
    cfg_write16(&dev, 0x04, cmd & !0x2);
    cfg_write16(&dev, 0x04, cmd);
    let moved = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    assert_eq!(moved.base, Some(new));
    assert_eq!(bar_address(&dev, 0), new);
    assert!(vm
        .mapper
        .live()
        .iter()
        .all(|&(g, _)| g >= new && g < new + moved.guest_size));
    assert!(!vm.mapper.live().is_empty());
}

#[test]
fn a_bar_move_onto_another_device_is_refused_and_the_old_placement_kept() {
    let vm = Vm::new();
    let a = attach(&vm, &fake("edu"));
    let b = attach(&vm, &fake("edu"));
    enable_device(&a);
    let a0 = a.bars()[0].base.unwrap();
    let b0 = b.bars()[0].base.unwrap();
    assert!(matches!(
        a.move_bar(BarIndex::Bar(0), b0),
        Err(vfio_pci::Error::BarPlacement { .. })
    ));
    assert_eq!(a.bars()[0].base, Some(a0));
    // Through the guest's config write too.
    cfg_write32(&a, 0x10, b0 as u32 | (cfg_read32(&a, 0x10) & 0xf));
    let cmd = cfg_read16(&a, 0x04);
    cfg_write16(&a, 0x04, cmd & !0x2);
    cfg_write16(&a, 0x04, cmd);
    assert_eq!(a.bars()[0].base, Some(a0));
    // The guest reads what it wrote, and the BAR decodes nowhere meanwhile (see
    // tests/bar_decode.rs): register and decode never disagree.
    assert_eq!(bar_address(&a, 0), b0);
    assert!(!a.bars()[0].decoding);
    assert_eq!(a.bar_at(a0, AddressSpace::Memory), None);
}

#[test]
fn dropping_the_device_releases_mappings_placements_and_irqs() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    {
        let dev = attach(&vm, &f);
        let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap();
        msix_enable(&dev, cap, true);
        assert!(f.active_irq().is_some());
        assert!(!vm.mapper.live().is_empty());
    }
    assert!(vm.mapper.live().is_empty());
    assert_eq!(vm.alloc.lock().unwrap().placements().count(), 0);
    assert_eq!(f.active_irq(), None);
    assert!(
        vm.irqs.groups().iter().all(|g| !g.is_enabled()),
        "groups the VMM keeps deliver nothing after unplug"
    );
}

#[test]
fn snapshot_restored_into_a_new_device_shows_the_same_guest_state() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = attach(&vm, &f);
    enable_device(&dev);
    let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap();
    let bar0 = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    let table = bar0.msix_table.unwrap().0 - bar0.base.unwrap();
    program_msix_entry(&dev, 0, table, 5, 0xfee0_1000, 0x55);
    msix_enable(&dev, cap, true);
    let snap = dev.snapshot().unwrap();
    let config: Vec<u32> = (0..64).map(|r| cfg_read32(&dev, r * 4)).collect();
    let json = serde_json::to_string(&snap).unwrap();
    drop(dev);

    let vm2 = Vm::new();
    let dev2 = attach(&vm2, &fake("nvme-like"));
    dev2.restore(&serde_json::from_str(&json).unwrap()).unwrap();
    let config2: Vec<u32> = (0..64).map(|r| cfg_read32(&dev2, r * 4)).collect();
    assert_eq!(config, config2);
    assert_eq!(dev2.bars()[0].base, bar0.base);
    assert_eq!(dev2.irq_mode(), IrqMode::Msix);
    let g = group_with(&vm2, nvme_like::MSIX_VECTORS);
    assert_eq!(
        g.route(5),
        Some(pci_interrupts::MsiRoute {
            address: 0xfee0_1000,
            data: 0x55
        })
    );
}

#[test]
fn snapshot_of_an_unknown_version_is_refused_and_changes_nothing() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    let mut snap = dev.snapshot().unwrap();
    snap.version = 99;
    let before = dev.bars();
    assert!(matches!(
        dev.restore(&snap),
        Err(vfio_pci::Error::SnapshotVersion { found: 99, .. })
    ));
    assert_eq!(dev.bars(), before);
}

#[test]
fn edu_through_the_stack_identifies_and_inverts() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    enable_device(&dev);
    assert_eq!(cfg_read32(&dev, 0) & 0xffff, 0x1234);
    assert_eq!(bar_read32(&dev, 0, 0x00), 0x0100_00ed);
    bar_write32(&dev, 0, 0x04, 0x1234_5678);
    assert_eq!(bar_read32(&dev, 0, 0x04), !0x1234_5678u32);
}

#[test]
fn reset_turns_msix_off_and_keeps_bar_placement() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = attach(&vm, &f);
    let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap();
    msix_enable(&dev, cap, true);
    let bars = dev.bars();
    dev.reset().unwrap();
    assert_ne!(dev.irq_mode(), IrqMode::Msix);
    assert_eq!(cfg_read16(&dev, cap + 2) & 0x8000, 0);
    assert_eq!(dev.bars(), bars);
    assert_eq!(f.counters().calls(Op::Reset), 1);
}

#[test]
fn bad_config_accesses_read_all_ones_and_write_nothing() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    let mut b = [0u8; 3];
    dev.read_config(0, &mut b);
    assert_eq!(b, [0xff; 3]);
    let mut b = [0u8; 4];
    dev.read_config(4094, &mut b);
    assert_eq!(b, [0xff; 4]);
    dev.write_config(4095, &[1, 2]).unwrap();
    dev.write_config(0, &[1, 2, 3]).unwrap();
    assert_eq!(cfg_read32(&dev, 0) & 0xffff, 0x1234);
}

#[test]
fn registers_past_a_broken_extended_chain_are_not_forwarded_to_the_device() {
    use vfio_backend::{region, Vfio};
    // AER at 0x100 points back at itself: the SR-IOV capability behind it
    // can no longer be found, so it cannot be hidden by the chain walk.
    let f = patched_nvme(|c| {
        let hdr = u32::from_le_bytes(c[0x100..0x104].try_into().unwrap());
        let looped = (hdr & 0x000f_ffff) | (0x100 << 20);
        c[0x100..0x104].copy_from_slice(&looped.to_le_bytes());
    });
    let vm = Vm::new();
    let dev = attach(&vm, &f);
    assert_eq!(walk_ext_caps(&dev), vec![(0x0001, 0x100)]);
    // SR-IOV control (capability + 8): VF Enable is bit 0.
    let sriov_ctl = 0x148 + 8;
    let mut raw = [0u8; 4];
    f.region_read(region::CONFIG, 0x148, &mut raw).unwrap();
    assert_eq!(u32::from_le_bytes(raw) & 0xffff, 0x0010, "SR-IOV is there");
    let writes = f.counters().calls(Op::RegionWrite);
    cfg_write16(&dev, sriov_ctl, 0x0001);
    assert_eq!(
        f.counters().calls(Op::RegionWrite),
        writes,
        "the guest's write must not reach the device"
    );
    // A register of the kept AER capability is still the device's.
    cfg_write32(&dev, 0x100 + 0x08, 0);
    assert_eq!(f.counters().calls(Op::RegionWrite), writes + 1);
}

#[test]
fn a_capability_pointer_into_the_msix_registers_ends_the_guest_chain_at_msix() {
    // MSI-X's next pointer names its own Table Offset/BIR register (MSI-X
    // is 12 bytes, PCI 3.0 §6.8.2). That register is emulated, so a chain
    // through it would change with what the VMM puts there (a loop, found
    // by fuzzing); the guest's chain must end at MSI-X instead.
    let mut msix_at = 0;
    let f = patched_nvme(|c| {
        let mut at = usize::from(c[0x34]);
        while at != 0 && c[at] != 0x11 {
            at = usize::from(c[at + 1]);
        }
        assert_ne!(at, 0, "nvme-like has MSI-X");
        c[at + 1] = u8::try_from(at + 4).unwrap();
        msix_at = at as u64;
    });
    let vm = Vm::new();
    let dev = attach(&vm, &f);
    let caps = walk_caps(&dev);
    assert_eq!(caps.last(), Some(&(0x11, msix_at)), "chain {caps:x?}");
    assert_eq!(cfg_read8(&dev, msix_at + 1), 0);
    let msix = dev
        .kept_capabilities()
        .iter()
        .find(|k| !k.extended && k.id == 0x11)
        .expect("MSI-X kept");
    assert!(msix.emulated);
    msix_enable(&dev, msix_at, true);
    assert_eq!(dev.irq_mode(), IrqMode::Msix);
}

#[test]
fn an_msi_capability_running_past_0xff_is_hidden_not_emulated() {
    // Move the MSI capability's header (64-bit with per-vector masking:
    // 24 bytes) to 0xf0 by pointing the chain at it.
    let f = patched_nvme(|c| {
        let mut at = c[0x34] as usize;
        let mut msi = None;
        while at != 0 {
            if c[at] == 0x05 {
                msi = Some(at);
            }
            at = c[at + 1] as usize;
        }
        let msi = msi.unwrap();
        let body: Vec<u8> = c[msi..msi + 24].to_vec();
        // Unlink the original, append the copy at 0xf0 as the last one.
        let mut prev = 0x34;
        while c[prev] as usize != msi {
            prev = c[prev] as usize + 1;
        }
        c[prev] = c[msi + 1];
        let mut last = c[0x34] as usize;
        while c[last + 1] != 0 {
            last = c[last + 1] as usize;
        }
        c[last + 1] = 0xf0;
        c[0xf0..0x100].copy_from_slice(&body[..16]);
        c[0xf1] = 0;
    });
    let vm = Vm::new();
    let dev = attach(&vm, &f);
    assert!(walk_caps(&dev).iter().all(|&(id, _)| id != 0x05));
    assert!(dev
        .hidden_capabilities()
        .iter()
        .any(|h| !h.extended && h.id == 0x05 && h.offset == 0xf0));
    assert!(dev.msi_group().is_none());
}
