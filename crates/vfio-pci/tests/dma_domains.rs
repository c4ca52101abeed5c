//! DMA per IOMMU domain: guest RAM mapped once per domain (container, IOAS,
//! connection), kept while any device of the domain is attached, memory
//! hotplug across every live domain. The fake devices' DMA engines check
//! their fake IOMMU, so what a device can reach is observable.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use vfio_backend::IommuDomain;
use vfio_fake_device::{edu, profile_template, DmaFault, FakeDevice, FakeIommu, Op};
use vfio_pci::{DeviceOptions, DmaMode, Error, VfioPciDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

const RAM: u64 = 0x10_0000;
const RAM_SIZE: usize = 0x10_0000;
const HOTPLUG: u64 = 0x40_0000;
const HOTPLUG_SIZE: usize = 0x4_0000;

fn guest_ram() -> GuestMemoryMmap {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM), RAM_SIZE)]).unwrap()
}

fn edu_in(iommu: &Arc<FakeIommu>) -> Arc<FakeDevice> {
    Arc::new(FakeDevice::with_iommu(profile_template("edu").unwrap(), iommu.clone()).unwrap())
}

/// An edu DMA through the device's registers, as a guest driver starts it;
/// returns the engine's error register (0: done).
fn edu_dma(dev: &VfioPciDevice, src: u64, dst: u64, to_ram: bool) -> u32 {
    bar_write64(dev, 0, edu::DMA_SRC, src);
    bar_write64(dev, 0, edu::DMA_DST, dst);
    bar_write64(dev, 0, edu::DMA_COUNT, 256);
    let dir = if to_ram { edu::DMA_CMD_TO_RAM } else { 0 };
    bar_write64(dev, 0, edu::DMA_CMD, edu::DMA_CMD_START | dir);
    let t0 = std::time::Instant::now();
    while bar_read32(dev, 0, edu::DMA_CMD) & edu::DMA_CMD_START as u32 != 0 {
        assert!(t0.elapsed().as_secs() < 5, "edu DMA never finished");
        std::thread::yield_now();
    }
    bar_read32(dev, 0, edu::DMA_ERROR)
}

/// RAM -> edu buffer -> RAM at another address: whether the pattern came
/// back (both transfers went through the IOMMU).
fn edu_roundtrip(dev: &VfioPciDevice, mem: &GuestMemoryMmap, seed: u8) -> bool {
    enable_device(dev);
    let pattern: Vec<u8> = (0..=255u8).map(|i| i ^ seed).collect();
    mem.write_slice(&pattern, GuestAddress(RAM + 0x1000))
        .unwrap();
    mem.write_slice(&[0u8; 256], GuestAddress(RAM + 0x8000))
        .unwrap();
    let e1 = edu_dma(dev, RAM + 0x1000, edu::DMA_BUFFER, false);
    let e2 = edu_dma(dev, edu::DMA_BUFFER, RAM + 0x8000, true);
    let mut back = [0u8; 256];
    mem.read_slice(&mut back, GuestAddress(RAM + 0x8000))
        .unwrap();
    e1 == 0 && e2 == 0 && back[..] == pattern[..]
}

#[test]
fn guest_ram_is_mapped_once_per_domain_and_stays_until_the_last_device_of_it_goes() {
    for unplug_first in [0usize, 1] {
        let vm = Vm::new();
        let mem = guest_ram();
        assert_eq!(vm.dma.add_memory(&mem).unwrap(), 1);
        // Two devices in one domain, as two functions in one container.
        let iommu = FakeIommu::new();
        let fakes = [edu_in(&iommu), edu_in(&iommu)];
        let mut devs: Vec<Option<VfioPciDevice>> =
            fakes.iter().map(|f| Some(attach(&vm, f))).collect();
        let id = devs[0].as_ref().unwrap().dma_domain();
        assert_eq!(devs[1].as_ref().unwrap().dma_domain(), id);
        assert_eq!(id, iommu.id());
        assert_eq!(vm.dma.device_count(id), 2);
        // Mapped once, by the domain's first device.
        assert_eq!(iommu.counters().calls(Op::DmaMap), 1);
        assert_eq!(iommu.mapping_count(), 1);
        for (i, d) in devs.iter().enumerate() {
            assert!(
                edu_roundtrip(d.as_ref().unwrap(), &mem, i as u8),
                "device {i}"
            );
        }

        let stays = 1 - unplug_first;
        devs[unplug_first] = None;
        assert_eq!(vm.dma.device_count(id), 1);
        assert_eq!(iommu.mapping_count(), 1, "the other device still needs it");
        assert_eq!(iommu.counters().calls(Op::DmaUnmap), 0);
        assert!(
            edu_roundtrip(devs[stays].as_ref().unwrap(), &mem, 0x5a),
            "device {stays} lost its DMA when device {unplug_first} was unplugged"
        );

        devs[stays] = None;
        assert_eq!(iommu.mapping_count(), 0, "the last device unmaps");
        assert!(vm.dma.domains().is_empty());
        let mut b = [0u8; 4];
        assert_eq!(fakes[stays].dma_read(RAM, &mut b), Err(DmaFault::Unmapped));
    }
}

#[test]
fn memory_hotplug_adds_and_removes_a_region_in_every_live_domain() {
    let vm = Vm::new();
    let mem = guest_ram();
    vm.dma.add_memory(&mem).unwrap();
    // Two domains: each fake device has a fake IOMMU of its own.
    let fakes = [fake("edu"), fake("edu")];
    let devs: Vec<VfioPciDevice> = fakes.iter().map(|f| attach(&vm, f)).collect();
    assert_ne!(devs[0].dma_domain(), devs[1].dma_domain());
    assert_eq!(vm.dma.domains().len(), 2);

    let region = Arc::new(
        GuestRegionMmap::<()>::from_range(GuestAddress(HOTPLUG), HOTPLUG_SIZE, None).unwrap(),
    );
    vm.dma.add_region(region.clone()).unwrap();
    assert_eq!(
        vm.dma.ram_regions(),
        vec![(RAM, RAM_SIZE as u64), (HOTPLUG, HOTPLUG_SIZE as u64)]
    );
    for (i, f) in fakes.iter().enumerate() {
        assert_eq!(f.dma_mapping_count(), 2, "domain {i}");
        f.dma_write(HOTPLUG + 0x100 * i as u64, &[i as u8 + 1; 4])
            .unwrap();
    }
    let mut seen = [0u8; 4];
    region
        .read_slice(&mut seen, vm_memory::MemoryRegionAddress(0x100))
        .unwrap();
    assert_eq!(
        seen, [2; 4],
        "the second domain's device wrote the new region"
    );

    vm.dma.remove_region(HOTPLUG, HOTPLUG_SIZE as u64).unwrap();
    assert_eq!(vm.dma.ram_regions(), vec![(RAM, RAM_SIZE as u64)]);
    for f in &fakes {
        assert_eq!(f.dma_mapping_count(), 1);
        assert_eq!(f.dma_write(HOTPLUG, &[0; 4]), Err(DmaFault::Unmapped));
        f.dma_write(RAM, &[0; 4]).unwrap();
    }
    // Only the registry kept the region: unplugged, it is ours alone again.
    assert_eq!(Arc::strong_count(&region), 1);
    assert!(matches!(
        vm.dma.remove_region(HOTPLUG, HOTPLUG_SIZE as u64),
        Err(Error::NoSuchDmaMapping {
            what: "guest RAM region",
            ..
        })
    ));
}

#[test]
fn a_region_one_domain_refuses_is_mapped_in_no_domain() {
    let vm = Vm::new();
    let fakes = [fake("edu"), fake("edu")];
    let _devs: Vec<VfioPciDevice> = fakes.iter().map(|f| attach(&vm, f)).collect();
    fakes[1]
        .iommu()
        .faults()
        .fail(Op::DmaMap, libc::ENOMEM, Some(1));
    let region = Arc::new(
        GuestRegionMmap::<()>::from_range(GuestAddress(HOTPLUG), HOTPLUG_SIZE, None).unwrap(),
    );
    let e = vm.dma.add_region(region.clone()).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOMEM), "{e}");
    assert!(vm.dma.ram_regions().is_empty());
    for f in &fakes {
        assert_eq!(f.dma_mapping_count(), 0);
    }
    assert_eq!(Arc::strong_count(&region), 1);
}

#[test]
fn a_region_a_domain_fails_to_unmap_stays_registered_until_a_retry_succeeds() {
    let vm = Vm::new();
    let f = fake("edu");
    let _dev = attach(&vm, &f);
    let region = Arc::new(
        GuestRegionMmap::<()>::from_range(GuestAddress(HOTPLUG), HOTPLUG_SIZE, None).unwrap(),
    );
    vm.dma.add_region(region.clone()).unwrap();
    f.iommu().faults().fail(Op::DmaUnmap, libc::EBUSY, Some(1));
    let e = vm
        .dma
        .remove_region(HOTPLUG, HOTPLUG_SIZE as u64)
        .unwrap_err();
    assert_eq!(e.errno(), Some(libc::EBUSY), "{e}");
    // Still mapped, so its memory is still kept.
    assert_eq!(f.dma_mapping_count(), 1);
    assert_eq!(vm.dma.ram_regions(), vec![(HOTPLUG, HOTPLUG_SIZE as u64)]);
    assert!(Arc::strong_count(&region) > 1);
    vm.dma.remove_region(HOTPLUG, HOTPLUG_SIZE as u64).unwrap();
    assert_eq!(f.dma_mapping_count(), 0);
    assert_eq!(Arc::strong_count(&region), 1);
}

#[test]
fn iova_ranges_of_a_shared_domain_are_read_again_when_a_device_joins() {
    const MSI_WINDOW: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);
    let vm = Vm::new();
    let iommu = FakeIommu::new();
    let wide = edu_in(&iommu);
    let a = attach(&vm, &wide);
    let id = a.dma_domain();
    assert_eq!(vm.dma.iova_ranges(id).unwrap(), vec![0..=u64::MAX]);
    // A device that reserves the interrupt window (as an iommufd IOAS
    // excludes every attached device's reserved regions) narrows the domain.
    let narrow_template = profile_template("edu")
        .unwrap()
        .with_iova_ranges(vec![0..=MSI_WINDOW.0 - 1, MSI_WINDOW.1 + 1..=u64::MAX])
        .unwrap();
    let narrow = Arc::new(FakeDevice::with_iommu(narrow_template, iommu.clone()).unwrap());
    let b = attach(&vm, &narrow);
    assert_eq!(b.dma_domain(), id);
    assert_eq!(
        vm.dma.iova_ranges(id).unwrap(),
        vec![0..=MSI_WINDOW.0 - 1, MSI_WINDOW.1 + 1..=u64::MAX]
    );
    // RAM in the window is refused before it reaches the IOMMU.
    let maps = iommu.counters().calls(Op::DmaMap);
    let region = Arc::new(
        GuestRegionMmap::<()>::from_range(GuestAddress(MSI_WINDOW.0), 0x1000, None).unwrap(),
    );
    let e = vm.dma.add_region(region).unwrap_err();
    assert!(
        matches!(&e, Error::DmaOutsideIovaRanges { iova, .. } if *iova == 0xfee0_0000),
        "{e}"
    );
    assert_eq!(iommu.counters().calls(Op::DmaMap), maps);
    assert!(vm.dma.ram_regions().is_empty());
}

#[test]
fn a_device_whose_reserved_iovas_hold_guest_ram_cannot_join_the_domain() {
    let vm = Vm::new();
    let mem = guest_ram();
    vm.dma.add_memory(&mem).unwrap();
    let iommu = FakeIommu::new();
    let first = edu_in(&iommu);
    let _a = attach(&vm, &first);
    let template = profile_template("edu")
        .unwrap()
        .with_iova_ranges(vec![RAM + RAM_SIZE as u64..=u64::MAX])
        .unwrap();
    // The IOMMU refuses the attach itself (iommufd: EADDRINUSE).
    let e = FakeDevice::with_iommu(template, iommu.clone()).unwrap_err();
    assert!(e.to_string().contains("outside the IOVA ranges"), "{e}");
    assert_eq!(iommu.device_count(), 1);
    assert_eq!(iommu.mapping_count(), 1);
}

#[test]
fn devices_of_one_domain_must_agree_on_the_dma_mode() {
    let vm = Vm::new();
    let iommu = FakeIommu::new();
    let a = edu_in(&iommu);
    let b = edu_in(&iommu);
    let _da = attach(&vm, &a);
    let e = VfioPciDevice::new(
        b.clone(),
        vm.resources(),
        DeviceOptions::default().with_dma_mode(DmaMode::External),
    )
    .unwrap_err();
    assert!(
        matches!(
            &e,
            Error::DmaModeMismatch {
                mode: DmaMode::GuestPhysical,
                wanted: DmaMode::External,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(vm.dma.device_count(iommu.id()), 1);
}

#[test]
fn external_mode_maps_only_what_the_vmm_maps_and_the_domains_last_device_unmaps_it() {
    let vm = Vm::new();
    let mem = guest_ram();
    vm.dma.add_memory(&mem).unwrap();
    let iommu = FakeIommu::new();
    let fakes = [edu_in(&iommu), edu_in(&iommu)];
    let ext = DeviceOptions::default().with_dma_mode(DmaMode::External);
    let a = attach_with(&vm, &fakes[0], ext.clone());
    let b = attach_with(&vm, &fakes[1], ext);
    let id = a.dma_domain();
    // Guest RAM is registered, but a vIOMMU decides what the devices see.
    assert_eq!(iommu.mapping_count(), 0);
    let host = mem.get_host_address(GuestAddress(RAM)).unwrap() as u64;
    let src = vfio_backend::DmaSource {
        host_addr: host,
        file: None,
        read_only: false,
    };
    // SAFETY: `mem` is declared before the devices, whose domain's last
    // device unmaps the range before `mem` drops.
    unsafe { vm.dma.map_external(id, 0x1_0000_0000, 0x1000, src) }.unwrap();
    fakes[1].dma_write(0x1_0000_0000, &[7; 4]).unwrap();
    let mut seen = [0u8; 4];
    mem.read_slice(&mut seen, GuestAddress(RAM)).unwrap();
    assert_eq!(seen, [7; 4]);
    assert!(matches!(
        vm.dma.unmap_external(id, 0x1_0000_0000, 0x2000),
        Err(Error::NoSuchDmaMapping {
            what: "DMA mapping",
            ..
        })
    ));
    drop(a);
    assert_eq!(iommu.mapping_count(), 1);
    drop(b);
    assert_eq!(iommu.mapping_count(), 0);
}

#[test]
fn registering_the_same_guest_ram_again_adds_nothing_and_overlaps_are_refused() {
    let vm = Vm::new();
    let f = fake("edu");
    let _dev = attach(&vm, &f);
    let mem = guest_ram();
    assert_eq!(vm.dma.add_memory(&mem).unwrap(), 1);
    // What every device's builder does with the VMM's RAM.
    assert_eq!(vm.dma.add_memory(&mem.clone()).unwrap(), 0);
    assert_eq!(f.dma_mapping_count(), 1);
    // Other memory at an overlapping guest address is refused.
    let other =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM + 0x1000), 0x1000)]).unwrap();
    assert!(matches!(
        vm.dma.add_memory(&other),
        Err(Error::DmaOverlap {
            what: "guest RAM",
            ..
        })
    ));
    assert_eq!(f.dma_mapping_count(), 1);
    assert_eq!(vm.dma.remove_memory(&mem).unwrap(), 1);
    assert_eq!(f.dma_mapping_count(), 0);
}

#[test]
fn a_domain_reports_its_identity_to_every_device_in_it() {
    let iommu = FakeIommu::new();
    let a = edu_in(&iommu);
    let b = edu_in(&iommu);
    let c = fake("edu");
    use vfio_backend::Vfio;
    assert_eq!(a.iommu_domain().id(), b.iommu_domain().id());
    assert_ne!(a.iommu_domain().id(), c.iommu_domain().id());
}
