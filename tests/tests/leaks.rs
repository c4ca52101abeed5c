//! Hot-unplug leaves nothing behind: no file descriptor and no memory
//! mapping of the process survives a device's life (attach, full use by a
//! guest, drop), nor a vfio-user server's once it is shut down.
//!
//! The counts are process-wide, so the tests of this binary run one at a
//! time, and each first runs a warm-up cycle: the C library keeps the
//! stacks of finished threads for reuse, and lazily created process state
//! (allocator arenas, statics) appears once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Mutex;

use support::*;
use vfio_fake_device::{edu, nvme_like};

static SERIAL: Mutex<()> = Mutex::new(());

/// A guest uses the device as a driver would: enumerate, interrupts,
/// doorbells or DMA, mapped and trapped BAR accesses.
fn use_device(g: &Guest<'_>, mem: &vm_memory::GuestMemoryMmap, profile: &str) {
    g.dev.dma().map_guest_memory(mem).unwrap();
    let e = g.enumerate(&mut Firmware::new());
    let bar = g.bar_address(0);
    if profile == "edu" {
        g.enable_msi(e.cap(CAP_ID_MSI).unwrap(), MSI_ADDR, 0x41);
        let grp = g.vm.group(&g.dev.msi_group().unwrap());
        g.mmio_write64(bar + edu::DMA_SRC, RAM_REGIONS[0].0);
        g.mmio_write64(bar + edu::DMA_DST, edu::DMA_BUFFER);
        g.mmio_write64(bar + edu::DMA_COUNT, 256);
        g.mmio_write64(bar + edu::DMA_CMD, edu::DMA_CMD_START | edu::DMA_CMD_IRQ);
        assert_eq!(wait_delivered(&grp, 0), 1);
        assert_eq!(g.mmio_read32(bar + edu::DMA_BUFFER), 0);
    } else {
        let cap = e.cap(CAP_ID_MSIX).unwrap();
        let (table, _) = g.msix_table(cap);
        g.msix_program(table, 4, MSI_ADDR, 0x44, false);
        g.msix_control(cap, true, false);
        let grp = g.vm.group(&g.dev.msix_group().unwrap());
        g.mmio_write32(
            bar + nvme_like::DOORBELLS + 4 * nvme_like::DOORBELL_STRIDE,
            1,
        );
        assert_eq!(wait_delivered(&grp, 4), 1);
        // The mmap-able page, straight from the guest mapping.
        g.mmio_write32(bar + 0x2000, 0xabcd);
        assert_eq!(g.mmio_read32(bar + 0x2000), 0xabcd);
    }
}

/// One device life on an existing backend; with `check`, asserts that
/// dropping the device gave back every fd and mapping the VMM and the
/// device took for it.
fn device_life(b: &Backend, profile: &str, check: bool) {
    // The backend's threads run on, and one may still be starting (mapping
    // its signal stack): count file mappings and threads here, everything
    // once the backend is gone (backend_life).
    let (fds, maps, threads) = (fd_count(), file_maps_count(), thread_count());
    let vm = Vm::new();
    let mem = guest_ram();
    let dev = vm.attach(b);
    use_device(&Guest::new(&dev, &vm), &mem, profile);
    drop(dev);
    // The device let go of its interrupt groups: only the VMM's manager,
    // which records every group it made, still holds them.
    for g in vm.irqs.groups() {
        assert_eq!(
            std::sync::Arc::strong_count(&g),
            2,
            "a group outlives the device"
        );
    }
    drop(mem);
    drop(vm);
    if check {
        // A vfio-user server lets go of its side (DMA mappings, interrupt
        // fds, the INTx watcher thread) when it sees the client hang up,
        // on its own thread: give it a moment.
        let now = || (fd_count(), file_maps_count(), thread_count());
        let deadline = std::time::Instant::now() + WAIT;
        while now() != (fds, maps, threads) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let (fds_after, maps_after, threads_after) = now();
        assert_eq!(fds_after, fds, "fds after unplugging a {profile}");
        assert_eq!(
            maps_after, maps,
            "file mappings after unplugging a {profile}"
        );
        assert_eq!(
            threads_after, threads,
            "threads after unplugging a {profile}"
        );
    }
}

/// A whole backend life: fake, server and connection, two device lives.
fn backend_life(kind: BackendKind, profile: &str, check: bool) {
    let b = Backend::new(kind, profile);
    device_life(&b, profile, check);
    device_life(&b, profile, check);
}

both_backends! {
    fn unplug_gives_back_every_fd_and_mapping(kind: BackendKind) {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        for profile in ["edu", "nvme-like"] {
            backend_life(kind, profile, false);
            let (fds, maps) = (fd_count(), maps_count());
            backend_life(kind, profile, true);
            assert_eq!(fd_count(), fds, "fds after a {profile} backend's life");
            assert_eq!(maps_count(), maps, "mappings after a {profile} backend's life");
        }
    }
}
