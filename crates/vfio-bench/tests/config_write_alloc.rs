//! A config write that moves nothing allocates nothing: the outcome it returns
//! (`ConfigWriteOutcome`) is fixed-size, one slot per BAR and the ROM.
//!
//! Its own test binary: the allocation counter is process-wide, and the
//! thread-local count measures only this thread.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use vfio_bench::alloc::CountingAlloc;
use vfio_bench::devices::profile;
use vfio_bench::guest::*;
use vfio_bench::vmm::Vm;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

/// Allocations by this thread in `n` calls of `f`, after one warm-up call.
fn allocations(n: u32, mut f: impl FnMut()) -> u64 {
    f();
    let before = ALLOC.thread_allocations();
    for _ in 0..n {
        f();
    }
    ALLOC.thread_allocations() - before
}

#[test]
fn emulated_config_writes_that_move_nothing_allocate_nothing() {
    let vm = Vm::new().unwrap();
    let dev = vm.attach(profile("nvme-like").unwrap()).unwrap();
    enable_device(&dev).unwrap();
    let cmd = cfg_read16(&dev, 0x04);
    let base = cfg_read32(&dev, 0x10);
    let cap = find_cap(&dev, 0x11).unwrap();
    let ctl = cfg_read16(&dev, cap + 2);
    // The interrupt line (emulated header byte).
    let line = allocations(100, || {
        let o = dev.write_config(0x3c, &[0x0b]).unwrap();
        assert!(o.is_empty());
    });
    // The command register (forwarded, and checked for decode changes).
    let command = allocations(100, || {
        let o = dev.write_config(0x04, &cmd.to_le_bytes()).unwrap();
        assert!(o.is_empty());
    });
    // A BAR register rewritten with the address it holds.
    let bar = allocations(100, || {
        let o = dev.write_config(0x10, &base.to_le_bytes()).unwrap();
        assert!(o.is_empty());
    });
    // MSI-X message control, unchanged (emulated capability).
    let msix = allocations(100, || {
        let o = dev.write_config(cap + 2, &ctl.to_le_bytes()).unwrap();
        assert!(o.is_empty());
    });
    assert_eq!((line, command, bar, msix), (0, 0, 0, 0));
}

#[test]
fn trapped_bar_accesses_allocate_nothing() {
    use vfio_fake_device::nvme_like;
    use vfio_pci::BarIndex;
    let vm = Vm::new().unwrap();
    let dev = vm.attach(profile("nvme-like").unwrap()).unwrap();
    enable_device(&dev).unwrap();
    let bar0 = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    let base = bar0.base.unwrap();
    let table = bar0.msix_table.unwrap().0 - base;
    let pba = bar0.msix_pba.unwrap().0 - base;
    let cap = find_cap(&dev, 0x11).unwrap();
    let ctl = cfg_read16(&dev, cap + 2);
    dev.write_config(cap + 2, &(ctl | 0x8000).to_le_bytes())
        .unwrap();
    // Vector 2 masked, and raised by the device (its doorbell): the PBA read polls it.
    dev.write_bar(BarIndex::Bar(0), table + 16 * 2 + 12, &1u32.to_le_bytes())
        .unwrap();
    let doorbell = nvme_like::DOORBELLS + 2 * nvme_like::DOORBELL_STRIDE;
    dev.write_bar(BarIndex::Bar(0), doorbell, &1u32.to_le_bytes())
        .unwrap();
    let mut b = [0u8; 4];
    // A register forwarded to the device.
    let forwarded = allocations(100, || {
        dev.read_bar(BarIndex::Bar(0), nvme_like::VS, &mut b);
    });
    // The MSI-X table: a read and a write of vector 5's data.
    let table_access = allocations(100, || {
        dev.read_bar(BarIndex::Bar(0), table + 16 * 5 + 8, &mut b);
        dev.write_bar(BarIndex::Bar(0), table + 16 * 5 + 8, &b)
            .unwrap();
    });
    // The PBA, with a pending masked vector.
    let pending = allocations(100, || {
        dev.read_bar(BarIndex::Bar(0), pba, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1 << 2);
    });
    assert_eq!((forwarded, table_access, pending), (0, 0, 0));
}
