//! Hot-unplug leaves nothing behind: no file descriptor, file-backed
//! memory mapping or thread of the process survives a device's life
//! (attach, full use by a guest, drop), nor a vfio-user server's once it is
//! shut down. Anonymous mappings belong to the C library and are not
//! counted: see [`support::Footprint`].
//!
//! The counts are process-wide, so the tests of this binary run one at a
//! time, and each first runs a warm-up cycle, so that lazily created
//! process state (statics, the server's first buffers) appears once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Mutex;

use support::*;
use vfio_fake_device::{edu, nvme_like};

static SERIAL: Mutex<()> = Mutex::new(());

/// A guest uses the device as a driver would: enumerate, interrupts,
/// doorbells or DMA, mapped and trapped BAR accesses.
fn use_device(g: &Guest<'_>, mem: &vm_memory::GuestMemoryMmap, profile: &str) {
    g.dev.guest_dma().add_memory(mem).unwrap();
    let e = g.enumerate(&mut Firmware::new());
    let bar = g.bar_address(0);
    if profile == "edu" {
        g.enable_msi(e.cap(cap_id::MSI).unwrap(), MSI_ADDR, 0x41);
        let grp = g.vm.group(&g.dev.msi_group().unwrap());
        g.mmio_write64(bar + edu::DMA_SRC, RAM_REGIONS[0].0);
        g.mmio_write64(bar + edu::DMA_DST, edu::DMA_BUFFER);
        g.mmio_write64(bar + edu::DMA_COUNT, 256);
        g.mmio_write64(bar + edu::DMA_CMD, edu::DMA_CMD_START | edu::DMA_CMD_IRQ);
        assert_eq!(wait_delivered(&grp, 0), 1);
        assert_eq!(g.mmio_read32(bar + edu::DMA_BUFFER), 0);
    } else {
        let cap = e.cap(cap_id::MSIX).unwrap();
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
/// dropping the device gave back every fd, file mapping and thread the VMM
/// and the device took for it.
fn device_life(b: &Backend, profile: &str, check: bool) {
    let before = Footprint::now();
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
        before.assert_given_back(&format!("unplugging a {profile}"));
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
            let before = Footprint::now();
            backend_life(kind, profile, true);
            before.assert_given_back(&format!("a {profile} backend's life"));
        }
    }
}
