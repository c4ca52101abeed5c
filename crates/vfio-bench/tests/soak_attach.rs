//! Attach and detach, again and again: no growth in open file descriptors,
//! file-backed memory mappings (regions, BAR and DMA memfds) or threads.
//! One test in this binary, so that nothing else opens files while it
//! counts. Anonymous mappings are not counted: our crates make none, and
//! the C library's (cached thread stacks, a new malloc arena when a thread
//! starts while the others hold theirs) vary with scheduling and stay.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_backend::user::UserOptions;
use vfio_bench::guest::*;
use vfio_bench::user::serve_pair;
use vfio_bench::vmm::Vm;
use vfio_fake_device::FakeDevice;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn file_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        // address perms offset dev inode pathname: a file has an inode.
        .filter(|l| l.split_whitespace().nth(4).is_some_and(|i| i != "0"))
        .count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Open fds, file-backed mappings and threads.
fn footprint() -> (usize, usize, usize) {
    (open_fds(), file_mappings(), threads())
}

/// One guest-visible attach: the device is built, the guest enumerates it
/// (ids, capabilities, BAR 0) and enables MSI-X; then it is detached.
fn cycle(vm: &Vm, vfio: Arc<dyn vfio_backend::Vfio>) {
    let dev = vm.attach(vfio).unwrap();
    assert_eq!(cfg_read16(&dev, 0), 0x1234);
    assert!(!walk_caps(&dev).is_empty());
    assert_eq!(size_bar(&dev, 0).unwrap(), 16 << 10);
    enable_device(&dev).unwrap();
    enable_msix_all(&dev).unwrap();
    drop(dev);
}

#[test]
fn a_thousand_attach_detach_cycles_leave_no_fd_mapping_or_thread_behind() {
    const CYCLES: usize = 1000;
    // Over vfio-user a cycle costs a connection and two threads: 200 by
    // default, VFIO_SOAK_USER_CYCLES=1000 for the full soak.
    let user_cycles: usize = std::env::var("VFIO_SOAK_USER_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let fake = Arc::new(FakeDevice::profile("nvme-like").unwrap());
    let vm = Vm::new().unwrap();

    // Warm up (lazy statics, allocator arenas), then count.
    for _ in 0..20 {
        cycle(&vm, fake.clone());
    }
    let (fds0, maps0, threads0) = footprint();
    let t = Instant::now();
    for _ in 0..CYCLES {
        cycle(&vm, fake.clone());
    }
    let in_process = t.elapsed();
    let (fds1, maps1, threads1) = footprint();
    eprintln!(
        "soak in-process: {CYCLES} cycles in {in_process:?} ({:?}/cycle); fds {fds0} -> {fds1}, file mappings {maps0} -> {maps1}, threads {threads0} -> {threads1}",
        in_process / CYCLES as u32
    );
    assert_eq!(fds1, fds0, "open fds grew over {CYCLES} cycles");
    assert_eq!(maps1, maps0, "file mappings grew over {CYCLES} cycles");
    assert_eq!(threads1, threads0, "threads grew over {CYCLES} cycles");
    assert!(vm.mapper.live().is_empty());
    assert!(vm.irqs.groups().is_empty());
    assert_eq!(fake.dma_mapping_count(), 0);
    assert_eq!(fake.active_irq(), None, "interrupts left enabled");

    // Over vfio-user: each cycle is a new connection, server thread and
    // client reader thread.
    let options = UserOptions::default().with_timeout(Duration::from_secs(10));
    let user_cycle = || {
        let served = serve_pair(fake.clone(), options).unwrap();
        cycle(&vm, served.client.clone());
        served.join().unwrap();
    };
    for _ in 0..10 {
        user_cycle();
    }
    let (fds0, maps0, threads0) = footprint();
    let t = Instant::now();
    for _ in 0..user_cycles {
        user_cycle();
    }
    let over_user = t.elapsed();
    let (fds1, maps1, threads1) = footprint();
    eprintln!(
        "soak vfio-user: {user_cycles} cycles in {over_user:?} ({:?}/cycle); fds {fds0} -> {fds1}, file mappings {maps0} -> {maps1}, threads {threads0} -> {threads1}",
        over_user / user_cycles.max(1) as u32
    );
    assert_eq!(
        fds1, fds0,
        "open fds grew over {user_cycles} vfio-user cycles"
    );
    assert_eq!(
        maps1, maps0,
        "file mappings grew over {user_cycles} vfio-user cycles"
    );
    assert_eq!(
        threads1, threads0,
        "threads grew over {user_cycles} vfio-user cycles"
    );
    assert_eq!(fake.active_irq(), None, "interrupts left enabled");
}
