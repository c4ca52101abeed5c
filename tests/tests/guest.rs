//! A guest OS driving the fake devices through the whole stack, once per
//! backend (in-process, and served over a vfio-user socket): enumeration,
//! interrupts, DMA into guest RAM, BAR moves, snapshot/restore and unplug.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use pci_interrupts::MsiRoute;
use support::*;
use vfio_backend::region;
use vfio_fake_device::{edu, nvme_like, Op};
use vfio_pci::{AddressSpace, IrqMode};

both_backends! {
    fn guest_enumeration_sizes_bars_walks_capabilities_and_assigns_addresses(kind: BackendKind) {
        for profile in ["edu", "nvme-like"] {
            let b = Backend::new(kind, profile);
            let vm = Vm::new();
            let dev = vm.attach(&b);
            let g = Guest::new(&dev, &vm);
            let e = g.enumerate(&mut Firmware::new());

            // Identity, from the device's own config space.
            let (vendor, device) = match profile {
                "edu" => (edu::VENDOR_ID, edu::DEVICE_ID),
                _ => (nvme_like::VENDOR_ID, nvme_like::DEVICE_ID),
            };
            assert_eq!((e.vendor, e.device), (vendor, device));

            // BARs: one each; the all-ones write sizes them to the region
            // VFIO reports; a 64-bit BAR takes two registers.
            assert_eq!(e.bars.len(), 1, "{profile}: {:?}", e.bars);
            let bar = e.bar(0);
            let region = b.vfio.region_info(region::BAR0).unwrap().size;
            assert_eq!(bar.size, region);
            match profile {
                "edu" => {
                    assert_eq!(bar.size, edu::BAR_SIZE);
                    assert!(!bar.is64 && !bar.io);
                }
                _ => {
                    assert_eq!(bar.size, nvme_like::BAR0_SIZE);
                    assert!(bar.is64);
                }
            }
            assert_eq!(e.rom, None, "the fakes have no expansion ROM");

            // Firmware's addresses took effect: the guest reads them back,
            // the VMM placed the BAR there and maps only inside it.
            assert_eq!(g.bar_address(0), bar.addr);
            let view = dev.bars().into_iter().find(|v| v.index == vfio_pci::BarIndex::Bar(0)).unwrap();
            assert_eq!(view.base, Some(bar.addr));
            assert!(!vm.mapper.live().is_empty());
            for (gpa, len) in vm.mapper.live() {
                assert!(gpa >= bar.addr && gpa + len <= bar.addr + bar.size);
            }
            if bar.is64 {
                assert!(bar.addr >= MMIO64_BASE && bar.addr + bar.size <= MMIO64_BASE + MMIO64_SIZE);
            } else {
                assert!(bar.addr >= MMIO32_BASE && bar.addr + bar.size <= MMIO32_BASE + MMIO32_SIZE);
            }

            // Capabilities: dword aligned, in the device-specific area, no loop.
            for &(_, off) in &e.caps {
                assert!(off >= 0x40 && off % 4 == 0);
            }
            let mut offs: Vec<u64> = e.caps.iter().map(|c| c.1).collect();
            offs.dedup();
            assert_eq!(offs.len(), e.caps.len());
            let ids: Vec<u8> = e.caps.iter().map(|c| c.0).collect();
            let ext: Vec<u16> = e.ext_caps.iter().map(|c| c.0).collect();
            match profile {
                "edu" => {
                    assert_eq!(ids, vec![cap_id::MSI]);
                    assert!(ext.is_empty(), "conventional PCI: {ext:?}");
                }
                _ => {
                    for id in [cap_id::POWER_MANAGEMENT, cap_id::MSI, cap_id::MSIX, cap_id::PCI_EXPRESS] {
                        assert!(ids.contains(&id), "cap {id:#x} missing from {ids:x?}");
                    }
                    assert!(ext.contains(&ext_cap_id::AER), "{ext:x?}");
                    assert!(!ext.contains(&ext_cap_id::SRIOV), "SR-IOV visible: {ext:x?}");
                }
            }

            // Memory space and bus mastering reach the device.
            assert_eq!(g.cfg16(COMMAND) & (CMD_MEM | CMD_BUS_MASTER), CMD_MEM | CMD_BUS_MASTER);
            let mut cmd = [0u8; 2];
            b.vfio.region_read(region::CONFIG, COMMAND, &mut cmd).unwrap();
            assert_eq!(u16::from_le_bytes(cmd) & (CMD_MEM | CMD_BUS_MASTER), CMD_MEM | CMD_BUS_MASTER);

            // And the device answers at the address firmware gave it.
            match profile {
                "edu" => assert_eq!(g.mmio_read32(bar.addr + edu::ID), edu::ID_VALUE),
                _ => {
                    assert_eq!(g.mmio_read64(bar.addr + nvme_like::CAP), nvme_like::CAP_VALUE);
                    assert_eq!(g.mmio_read32(bar.addr + nvme_like::VS), nvme_like::VS_VALUE);
                }
            }
        }
    }

    fn edu_dma_moves_data_both_ways_through_guest_ram_and_signals_msi(kind: BackendKind) {
        let b = Backend::new(kind, "edu");
        let vm = Vm::new();
        let mem = guest_ram();
        let dev = vm.attach(&b);
        let g = Guest::new(&dev, &vm);
        let (_, bar) = edu_up(&g, &mem);
        let grp = vm.group(&dev.msi_group().unwrap());
        assert_eq!(grp.route(0), Some(MsiRoute { address: MSI_ADDR, data: 0x41 }));

        edu_round_trip(&g, &mem, &grp, bar, 1);
        edu_round_trip(&g, &mem, &grp, bar, 2);

        // A DMA aimed outside guest RAM is not mapped for the device: it
        // fails and raises nothing.
        edu_dma(&g, bar, edu::DMA_BUFFER, 0x8000_0000, 64, true);
        assert_ne!(g.mmio_read32(bar + edu::DMA_ERROR), 0);
        assert_eq!(grp.take_delivered(0), 0);
    }

    fn dma_map_of_guest_memory_costs_one_request_per_region(kind: BackendKind) {
        let b = Backend::new(kind, "edu");
        let vm = Vm::new();
        let mem = guest_ram();
        let dev = vm.attach(&b);
        let maps = b.fake.iommu().counters().calls(Op::DmaMap);
        assert_eq!(dev.guest_dma().add_memory(&mem).unwrap(), RAM_REGIONS.len());
        assert_eq!(b.fake.iommu().counters().calls(Op::DmaMap) - maps, RAM_REGIONS.len() as u64);
        assert_eq!(b.fake.dma_mapping_count(), RAM_REGIONS.len());
        let unmaps = b.fake.iommu().counters().calls(Op::DmaUnmap);
        drop(dev);
        assert_eq!(b.fake.iommu().counters().calls(Op::DmaUnmap) - unmaps, RAM_REGIONS.len() as u64);
        assert_eq!(b.fake.dma_mapping_count(), 0);
    }

    fn each_nvme_doorbell_raises_its_own_msix_vector_on_its_route(kind: BackendKind) {
        let b = Backend::new(kind, "nvme-like");
        let vm = Vm::new();
        let dev = vm.attach(&b);
        let g = Guest::new(&dev, &vm);
        let (_, bar, _, table) = nvme_up(&g);
        let grp = vm.group(&dev.msix_group().unwrap());
        // The table reads back what the guest wrote.
        assert_eq!(g.mmio_read32(table + 16 * 5 + 8), 0x105);
        for v in [0u32, 5, 31] {
            assert_eq!(grp.route(v), Some(MsiRoute { address: MSI_ADDR, data: 0x100 + v }));
            ring(&g, bar, v);
            assert_eq!(wait_delivered(&grp, v), 1, "vector {v}");
            for other in 0..nvme_like::MSIX_VECTORS {
                assert_eq!(grp.take_delivered(other), 0, "vector {other} after doorbell {v}");
            }
        }
    }

    fn a_vector_fired_while_masked_arrives_once_when_unmasked(kind: BackendKind) {
        let b = Backend::new(kind, "nvme-like");
        let vm = Vm::new();
        let dev = vm.attach(&b);
        let g = Guest::new(&dev, &vm);
        let (_, bar, cap, table) = nvme_up(&g);
        let grp = vm.group(&dev.msix_group().unwrap());
        let set_irqs = b.fake.counters().calls(Op::SetIrqEventfds);

        // Per-vector mask (MSI-X vector control bit 0).
        g.msix_mask(table, 2, true);
        ring(&g, bar, 2);
        assert_eq!(grp.take_delivered(2), 0, "masked: held back");
        assert!(latched(&grp, 2), "the message is pending, not lost");
        // Other vectors are not affected.
        ring(&g, bar, 3);
        assert_eq!(wait_delivered(&grp, 3), 1);
        g.msix_mask(table, 2, false);
        assert_eq!(wait_delivered(&grp, 2), 1, "delivered on unmask");
        assert_eq!(grp.take_delivered(2), 0, "exactly once");

        // Function mask (message control bit 14) holds back every vector.
        g.msix_control(cap, true, true);
        ring(&g, bar, 7);
        assert_eq!(grp.take_delivered(7), 0);
        g.msix_control(cap, true, false);
        assert_eq!(wait_delivered(&grp, 7), 1);
        assert_eq!(grp.take_delivered(7), 0);

        // Masking is the VMM's business: VFIO's eventfds were not re-wired.
        assert_eq!(b.fake.counters().calls(Op::SetIrqEventfds), set_irqs);
    }

    fn a_guest_moved_bar_keeps_the_device_working_at_its_new_address(kind: BackendKind) {
        // edu: 32-bit BAR, MSI and DMA.
        let b = Backend::new(kind, "edu");
        let vm = Vm::new();
        let mem = guest_ram();
        let dev = vm.attach(&b);
        let g = Guest::new(&dev, &vm);
        let (e, old) = edu_up(&g, &mem);
        let grp = vm.group(&dev.msi_group().unwrap());
        let bar = e.bar(0);
        let new = old + 4 * bar.size;
        g.move_bar(&bar, new);
        assert_eq!(g.bar_address(0), new);
        assert_eq!(dev.bars()[0].base, Some(new));
        assert_eq!(g.mmio_read32(old + edu::ID), 0xffff_ffff, "nothing decodes the old address");
        assert_eq!(g.mmio_read32(new + edu::ID), edu::ID_VALUE);
        g.mmio_write32(new + edu::LIVENESS, 0x1234_5678);
        assert_eq!(g.mmio_read32(new + edu::LIVENESS), !0x1234_5678);
        for (gpa, len) in vm.mapper.live() {
            assert!(gpa >= new && gpa + len <= new + bar.size);
        }
        edu_round_trip(&g, &mem, &grp, new, 3);

        // A move onto guest RAM is refused: the register holds what the guest wrote and the
        // BAR decodes nowhere (neither there nor at its old address) until the guest writes
        // an address the VMM accepts.
        g.move_bar(&bar, 0x10_0000);
        assert_eq!(g.bar_address(0), 0x10_0000);
        assert!(dev.bar_at(0x10_0000, AddressSpace::Memory).is_none());
        assert_eq!(g.mmio_read32(new + edu::ID), 0xffff_ffff);
        assert!(vm.mapper.live().is_empty());
        g.move_bar(&bar, new);
        assert_eq!(g.mmio_read32(new + edu::ID), edu::ID_VALUE);
        drop(dev);

        // nvme-like: 64-bit BAR holding the MSI-X table, moved above and
        // then below 4 GiB.
        let b = Backend::new(kind, "nvme-like");
        let vm = Vm::new();
        let dev = vm.attach(&b);
        let g = Guest::new(&dev, &vm);
        let (e, old, cap, _) = nvme_up(&g);
        let grp = vm.group(&dev.msix_group().unwrap());
        let bar = e.bar(0);
        for new in [old + 0x10_0000, FW32_BASE + 0x100_0000] {
            g.move_bar(&bar, new);
            assert_eq!(g.bar_address(0), new);
            let (table, _) = g.msix_table(cap);
            assert_eq!(table, new + nvme_like::MSIX_TABLE_OFFSET);
            g.msix_program(table, 9, MSI_ADDR, 0x999, false);
            assert_eq!(grp.route(9), Some(MsiRoute { address: MSI_ADDR, data: 0x999 }));
            assert_eq!(g.mmio_read64(new + nvme_like::CAP), nvme_like::CAP_VALUE);
            ring(&g, new, 9);
            assert_eq!(wait_delivered(&grp, 9), 1);
            assert_eq!(g.mmio_read64(old + nvme_like::CAP), u64::MAX);
            assert!(dev.bar_at(old, AddressSpace::Memory).is_none());
        }
    }

    fn an_edu_snapshot_restored_into_a_new_device_continues_dma_and_msi(kind: BackendKind) {
        let mem = guest_ram();
        let (json, config, bar, route) = {
            let b = Backend::new(kind, "edu");
            let vm = Vm::new();
            let dev = vm.attach(&b);
            let g = Guest::new(&dev, &vm);
            let (_, bar) = edu_up(&g, &mem);
            let grp = vm.group(&dev.msi_group().unwrap());
            edu_round_trip(&g, &mem, &grp, bar, 4);
            let snap = dev.snapshot().unwrap();
            (serde_json::to_string(&snap).unwrap(), g.config_dump(), bar, grp.route(0))
        };

        // The destination: a new VMM, a new fake (new server, new
        // connection for the socket backend), the same guest RAM.
        let b = Backend::new(kind, "edu");
        let vm = Vm::new();
        let dev = vm.attach(&b);
        dev.guest_dma().add_memory(&mem).unwrap();
        dev.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        let g = Guest::new(&dev, &vm);
        assert_eq!(g.config_dump(), config);
        assert_eq!(g.bar_address(0), bar);
        assert_eq!(dev.irq_mode(), IrqMode::Msi(1));
        let grp = vm.group(&dev.msi_group().unwrap());
        assert_eq!(grp.route(0), route);
        // The guest's driver carries on without re-initialising anything.
        edu_round_trip(&g, &mem, &grp, bar, 5);
    }

    fn an_nvme_snapshot_keeps_routes_masks_and_the_moved_bar(kind: BackendKind) {
        let (json, config, bar) = {
            let b = Backend::new(kind, "nvme-like");
            let vm = Vm::new();
            let dev = vm.attach(&b);
            let g = Guest::new(&dev, &vm);
            let (e, old, _, table) = nvme_up(&g);
            let moved = old + 0x20_0000;
            g.move_bar(&e.bar(0), moved);
            g.msix_mask(table - old + moved, 7, true);
            let grp = vm.group(&dev.msix_group().unwrap());
            ring(&g, moved, 1);
            assert_eq!(wait_delivered(&grp, 1), 1);
            let snap = dev.snapshot().unwrap();
            (serde_json::to_string(&snap).unwrap(), g.config_dump(), moved)
        };

        let b = Backend::new(kind, "nvme-like");
        let vm = Vm::new();
        let dev = vm.attach(&b);
        dev.restore(&serde_json::from_str(&json).unwrap()).unwrap();
        let g = Guest::new(&dev, &vm);
        assert_eq!(g.config_dump(), config);
        assert_eq!(g.bar_address(0), bar);
        assert_eq!(dev.irq_mode(), IrqMode::Msix);
        let grp = vm.group(&dev.msix_group().unwrap());
        let table = bar + nvme_like::MSIX_TABLE_OFFSET;
        for v in 0..nvme_like::MSIX_VECTORS {
            assert_eq!(g.mmio_read32(table + 16 * u64::from(v) + 8), 0x100 + v);
            assert_eq!(g.mmio_read32(table + 16 * u64::from(v) + 12) & 1, u32::from(v == 7));
            if v != 7 {
                assert_eq!(grp.route(v), Some(MsiRoute { address: MSI_ADDR, data: 0x100 + v }));
            }
        }
        assert!(grp.is_masked(7));
        ring(&g, bar, 1);
        assert_eq!(wait_delivered(&grp, 1), 1);
        ring(&g, bar, 7);
        assert_eq!(grp.take_delivered(7), 0, "vector 7 is still masked");
        g.msix_mask(table, 7, false);
        assert_eq!(wait_delivered(&grp, 7), 1);
        assert_eq!(grp.take_delivered(7), 0);
    }

    fn unplug_returns_every_vmm_resource_and_device_mapping(kind: BackendKind) {
        for profile in ["edu", "nvme-like"] {
            let b = Backend::new(kind, profile);
            let vm = Vm::new();
            let mem = guest_ram();
            let dev = vm.attach(&b);
            dev.guest_dma().add_memory(&mem).unwrap();
            let g = Guest::new(&dev, &vm);
            g.enumerate(&mut Firmware::new());
            assert!(b.fake.active_irq().is_some());
            drop(dev);
            assert!(vm.mapper.live().is_empty());
            assert_eq!(vm.alloc.lock().unwrap().placements().count(), 0);
            assert_eq!(b.fake.active_irq(), None);
            assert_eq!(b.fake.dma_mapping_count(), 0);
        }
    }
}
