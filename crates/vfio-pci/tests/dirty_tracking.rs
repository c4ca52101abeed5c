//! Dirty tracking of guest RAM on `GuestDma`, for a VMM's own RAM transfer
//! during live migration: the domain's own tracking where it has it (type1
//! `VFIO_IOMMU_DIRTY_PAGES`, iommufd), else each device's DMA logging
//! (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`), else a clear refusal; one bitmap
//! per guest RAM region, one bit per page, the OR over domains and devices,
//! cleared by each report.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;
#[path = "common/migdouble.rs"]
mod migdouble;

use std::sync::Arc;

use common::*;
use migdouble::{MigDouble, TrackedFake};
use vfio_backend::Vfio;
use vfio_pci::{DeviceOptions, DirtyBitmap, DmaMode, Error, VfioPciDevice};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

const LOW: u64 = 0;
const LOW_SIZE: usize = 1 << 20;
const HIGH: u64 = 4 << 20;
const HIGH_SIZE: usize = 2 << 20;
const PAGE: u64 = 4096;

fn vm_with_ram() -> Vm {
    let vm = Vm::new();
    let ram = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(LOW), LOW_SIZE),
        (GuestAddress(HIGH), HIGH_SIZE),
    ])
    .unwrap();
    vm.dma.add_memory(&ram).unwrap();
    vm
}

fn on(vm: &Vm, v: Arc<dyn Vfio>) -> VfioPciDevice {
    VfioPciDevice::new(v, vm.resources(), DeviceOptions::default()).unwrap()
}

/// Every dirty page of a report, by guest physical address.
fn dirty(report: &[DirtyBitmap]) -> Vec<u64> {
    report
        .iter()
        .flat_map(|b| b.dirty_pages().collect::<Vec<_>>())
        .collect()
}

#[test]
fn device_dma_logging_names_exactly_the_pages_the_device_wrote_and_a_report_clears_them() {
    let vm = vm_with_ram();
    let d = MigDouble::all();
    let dev = on(&vm, d.clone());
    enable_device(&dev);
    vm.dma.dirty_tracking_start(PAGE).unwrap();
    assert!(d.logging(), "the domain cannot track: the device logs");
    // Writes across a page boundary, and one byte in the other region.
    d.dma_write(0x1ff8, &[0xaa; 16]);
    d.dma_write(HIGH + 0x5000, &[1]);
    let report = vm.dma.dirty_bitmaps().unwrap();
    assert_eq!(report.len(), 2);
    assert_eq!((report[0].gpa, report[0].size), (LOW, LOW_SIZE as u64));
    assert_eq!(report[0].bits.len(), LOW_SIZE / PAGE as usize / 64);
    assert_eq!(dirty(&report), vec![0x1000, 0x2000, HIGH + 0x5000]);
    assert_eq!(report.iter().map(DirtyBitmap::dirty_count).sum::<u64>(), 3);
    // Reported once: clean again until written again.
    assert!(dirty(&vm.dma.dirty_bitmaps().unwrap()).is_empty());
    d.dma_write(0x1000, &[2]);
    assert_eq!(dirty(&vm.dma.dirty_bitmaps().unwrap()), vec![0x1000]);
    vm.dma.dirty_tracking_stop().unwrap();
    assert!(!d.logging());
    assert!(matches!(
        vm.dma.dirty_bitmaps(),
        Err(Error::DirtyTrackingState { running: false })
    ));
    assert!(matches!(
        vm.dma.dirty_tracking_stop(),
        Err(Error::DirtyTrackingState { running: false })
    ));
}

#[test]
fn the_domains_own_tracking_is_used_where_it_has_it_and_reports_are_ored_across_domains() {
    let vm = vm_with_ram();
    let logged = MigDouble::all();
    let tracked = TrackedFake::new("edu");
    let _a = on(&vm, logged.clone());
    let _b = on(&vm, tracked.clone());
    assert_eq!(vm.dma.domains().len(), 2);
    vm.dma.dirty_tracking_start(PAGE).unwrap();
    assert!(vm.dma.dirty_tracking());
    assert!(
        tracked.domain.tracking.lock().unwrap().is_some(),
        "the domain tracks"
    );
    assert!(logged.logging(), "the other domain's device logs");
    logged.dma_write(0x3000, &[1]);
    tracked.domain.wrote(0x3000, 1);
    tracked.domain.wrote(HIGH + 0x1_0000, 0x2000);
    assert_eq!(
        dirty(&vm.dma.dirty_bitmaps().unwrap()),
        vec![0x3000, HIGH + 0x1_0000, HIGH + 0x1_1000]
    );
    vm.dma.dirty_tracking_stop().unwrap();
    assert!(tracked.domain.tracking.lock().unwrap().is_none());
    assert!(!logged.logging());
}

#[test]
fn a_domain_that_can_track_neither_way_refuses_the_start_and_nothing_stays_started() {
    let vm = vm_with_ram();
    let logged = MigDouble::all();
    let _a = on(&vm, logged.clone());
    let _b = on(&vm, TrackedFake::with_sizes("edu", 0));
    let e = vm.dma.dirty_tracking_start(PAGE).unwrap_err();
    assert!(matches!(e, Error::DirtyTrackingUnsupported { .. }), "{e}");
    assert!(!logged.logging(), "the device that had started was stopped");
    assert!(!vm.dma.dirty_tracking());
    // A page size the domain does not track at, and no device logging.
    let vm = vm_with_ram();
    let tracked = TrackedFake::new("edu");
    let _c = on(&vm, tracked.clone());
    assert!(matches!(
        vm.dma.dirty_tracking_start(2 * PAGE),
        Err(Error::DirtyTrackingUnsupported { .. })
    ));
    assert!(matches!(
        vm.dma.dirty_tracking_start(3000),
        Err(Error::PageSize { .. })
    ));
    vm.dma.dirty_tracking_start(PAGE).unwrap();
    assert!(matches!(
        vm.dma.dirty_tracking_start(PAGE),
        Err(Error::DirtyTrackingState { running: true })
    ));
}

#[test]
fn a_domain_in_external_mode_is_refused_its_iovas_are_not_guest_addresses() {
    let vm = vm_with_ram();
    let d = MigDouble::all();
    let _dev = VfioPciDevice::new(
        d.clone() as Arc<dyn Vfio>,
        vm.resources(),
        DeviceOptions::default().with_dma_mode(DmaMode::External),
    )
    .unwrap();
    assert!(matches!(
        vm.dma.dirty_tracking_start(PAGE),
        Err(Error::DirtyTrackingUnsupported { .. })
    ));
    assert!(!d.logging());
}

#[test]
fn devices_that_come_while_tracking_are_tracked_and_those_that_go_make_every_page_dirty() {
    let vm = vm_with_ram();
    let first = MigDouble::all();
    let a = on(&vm, first.clone());
    vm.dma.dirty_tracking_start(PAGE).unwrap();
    // A device of a new domain joins: it logs from then on.
    let second = MigDouble::all();
    let b = on(&vm, second.clone());
    assert!(second.logging());
    second.dma_write(HIGH, &[1]);
    assert_eq!(dirty(&vm.dma.dirty_bitmaps().unwrap()), vec![HIGH]);
    // A device that cannot be tracked is refused while tracking runs.
    let vfio: Arc<dyn Vfio> = TrackedFake::with_sizes("edu", 0);
    assert!(matches!(
        VfioPciDevice::new(vfio, vm.resources(), DeviceOptions::default()),
        Err(Error::DirtyTrackingUnsupported { .. })
    ));
    // One goes, with what it logged and not reported: every page is dirty
    // in the next report, then tracking goes on as before.
    second.dma_write(HIGH + PAGE, &[1]);
    drop(b);
    let all = vm.dma.dirty_bitmaps().unwrap();
    let pages = (LOW_SIZE + HIGH_SIZE) as u64 / PAGE;
    assert_eq!(all.iter().map(DirtyBitmap::dirty_count).sum::<u64>(), pages);
    assert!(dirty(&vm.dma.dirty_bitmaps().unwrap()).is_empty());
    first.dma_write(0, &[1]);
    assert_eq!(dirty(&vm.dma.dirty_bitmaps().unwrap()), vec![0]);
    drop(a);
}

#[test]
fn guest_ram_added_while_tracking_is_reported_dirty_in_full_every_time() {
    let vm = vm_with_ram();
    let d = MigDouble::all();
    let _dev = on(&vm, d.clone());
    vm.dma.dirty_tracking_start(PAGE).unwrap();
    const HOT: u64 = 16 << 20;
    let region =
        Arc::new(GuestRegionMmap::<()>::from_range(GuestAddress(HOT), 0x5000, None).unwrap());
    vm.dma.add_region(region).unwrap();
    for _ in 0..2 {
        let r = vm.dma.dirty_bitmaps().unwrap();
        let hot = r.iter().find(|b| b.gpa == HOT).unwrap();
        assert_eq!(hot.dirty_count(), 5);
        assert_eq!(hot.bits, vec![0x1f], "no bit past the region's last page");
        assert_eq!(r.iter().map(DirtyBitmap::dirty_count).sum::<u64>(), 5);
    }
}
