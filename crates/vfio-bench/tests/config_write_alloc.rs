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
