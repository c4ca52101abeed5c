//! No device lock is held across a blocking backend call: while a forwarded BAR access or
//! an interrupt rewiring waits for a slow backend (a vfio-user reply can take up to its
//! timeout), other vCPUs' accesses to the same device's MSI-X table go on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use vfio_fake_device::{nvme_like, Op};
use vfio_pci::{BarIndex, IrqMode, VfioPciDevice};

const HANG: Duration = Duration::from_millis(1500);
/// Far below HANG: an MSI-X table access that waited for the slow call would take longer.
const QUICK: Duration = Duration::from_millis(600);

fn msix_table(dev: &VfioPciDevice) -> u64 {
    let bar0 = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    bar0.msix_table.unwrap().0 - bar0.base.unwrap()
}

/// Waits (bounded) until the fake has entered `op` `n` times in all.
fn wait_for_calls(f: &vfio_fake_device::FakeDevice, op: Op, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.counters().calls(op) < n {
        assert!(Instant::now() < deadline, "{op:?} never called");
        thread::sleep(Duration::from_millis(5));
    }
    // It is now sleeping in the injected hang.
    thread::sleep(Duration::from_millis(50));
}

/// Masks and unmasks vector 1 and reads its control word back: how long it took.
fn touch_msix_table(dev: &VfioPciDevice, table: u64) -> Duration {
    let t = Instant::now();
    bar_write32(dev, 0, table + 16 + 12, 1);
    assert_eq!(bar_read32(dev, 0, table + 16 + 12) & 1, 1);
    bar_write32(dev, 0, table + 16 + 12, 0);
    t.elapsed()
}

#[test]
fn a_slow_forwarded_bar_read_does_not_hold_up_msix_table_accesses() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = Arc::new(attach(&vm, &f));
    enable_device(&dev);
    let table = msix_table(&dev);
    // VS is trapped (the registers page is not mmap-able) and forwarded to the device.
    assert_eq!(bar_read32(&dev, 0, nvme_like::VS), nvme_like::VS_VALUE);
    let reads = f.counters().calls(Op::RegionRead);
    f.faults().set_hang(Some(HANG));
    let d = dev.clone();
    let slow = thread::spawn(move || bar_read32(&d, 0, nvme_like::VS));
    wait_for_calls(&f, Op::RegionRead, reads + 1);
    let took = touch_msix_table(&dev, table);
    f.faults().set_hang(None);
    assert_eq!(slow.join().unwrap(), nvme_like::VS_VALUE);
    assert!(took < QUICK, "MSI-X table accesses waited {took:?}");
}

#[test]
fn a_slow_forwarded_bar_write_does_not_hold_up_msix_table_accesses() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = Arc::new(attach(&vm, &f));
    enable_device(&dev);
    let table = msix_table(&dev);
    let writes = f.counters().calls(Op::RegionWrite);
    f.faults().set_hang(Some(HANG));
    let d = dev.clone();
    // A doorbell write: trapped and forwarded.
    let slow = thread::spawn(move || {
        d.write_bar(
            BarIndex::Bar(0),
            nvme_like::DOORBELLS + 64,
            &0u32.to_le_bytes(),
        )
    });
    wait_for_calls(&f, Op::RegionWrite, writes + 1);
    let took = touch_msix_table(&dev, table);
    f.faults().set_hang(None);
    slow.join().unwrap().unwrap();
    assert!(took < QUICK, "MSI-X table accesses waited {took:?}");
}

#[test]
fn a_slow_msix_enable_does_not_hold_up_msix_table_accesses_and_ends_wired() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = Arc::new(attach(&vm, &f));
    enable_device(&dev);
    let table = msix_table(&dev);
    let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap();
    let disables = f.counters().calls(Op::DisableIrqs);
    f.faults().set_hang(Some(HANG));
    let d = dev.clone();
    // Enabling MSI-X unwires INTx and wires MSI-X: two slow SET_IRQS calls.
    let slow = thread::spawn(move || msix_enable(&d, cap, true));
    wait_for_calls(&f, Op::DisableIrqs, disables + 1);
    let took = touch_msix_table(&dev, table);
    f.faults().set_hang(None);
    slow.join().unwrap();
    assert!(took < QUICK, "MSI-X table accesses waited {took:?}");
    assert_eq!(dev.irq_mode(), IrqMode::Msix);
}
