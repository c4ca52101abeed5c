//! The socket backend when things go wrong: a vfio-user server that shuts
//! down, a connection that is cut, a server that stops answering. Device
//! calls must fail (or read all ones) in bounded time, and unplugging the
//! device must still complete and give back the VMM's resources. Plus the
//! wire cost of mapping guest RAM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use vfio_backend::user::{protocol::command, UserOptions};
use vfio_fake_device::{nvme_like, FakeDevice};
use vfio_pci::VfioPciDevice;

fn nvme() -> Arc<FakeDevice> {
    Arc::new(FakeDevice::profile("nvme-like").unwrap())
}

fn options(timeout: Duration) -> UserOptions {
    UserOptions::default()
        .with_timeout(timeout)
        .with_reset_timeout(timeout)
}

/// Brings an nvme-like up: enumerated, guest RAM mapped, MSI-X on, and a
/// doorbell that works. Returns (BAR0, MSI-X capability).
fn bring_up(g: &Guest<'_>, mem: &vm_memory::GuestMemoryMmap) -> (u64, u64) {
    g.dev.guest_dma().add_memory(mem).unwrap();
    let e = g.enumerate(&mut Firmware::new());
    let cap = e.cap(cap_id::MSIX).unwrap();
    let (table, _) = g.msix_table(cap);
    g.msix_program(table, 1, MSI_ADDR, 0x21, false);
    g.msix_control(cap, true, false);
    let bar = g.bar_address(0);
    let grp = g.vm.group(&g.dev.msix_group().unwrap());
    g.mmio_write32(bar + nvme_like::DOORBELLS + nvme_like::DOORBELL_STRIDE, 1);
    assert_eq!(wait_delivered(&grp, 1), 1);
    (bar, cap)
}

/// A backend error saying the vfio-user peer is gone: not connected, or the connection
/// broke under the request.
fn assert_gone(e: &vfio_pci::Error) {
    assert!(matches!(e, vfio_pci::Error::Backend { .. }), "{e:?}");
    assert!(
        matches!(
            e.errno(),
            Some(libc::ENOTCONN) | Some(libc::EPIPE) | Some(libc::ECONNRESET)
        ),
        "{e:?}: errno {:?}",
        e.errno()
    );
}

/// With the device gone: every guest access returns within `limit`,
/// trapped reads and passed-through config reads are all ones, trapped
/// writes and resets report an error; the emulated state stays readable.
fn check_device_gone(g: &Guest<'_>, bar: u64, cap: u64, limit: Duration) {
    let t = Instant::now();
    let doorbell = bar + nvme_like::DOORBELLS + nvme_like::DOORBELL_STRIDE;
    // A trapped write reaches the backend, which reports the peer gone (its errno kept).
    let e = g.mmio_write(doorbell, &1u32.to_le_bytes()).unwrap_err();
    assert_gone(&e);
    assert_eq!(g.mmio_read64(bar + nvme_like::CAP), u64::MAX);
    // The PCIe capability is passed through to the device.
    let pcie = g
        .walk_caps()
        .into_iter()
        .find(|c| c.0 == cap_id::PCI_EXPRESS)
        .map(|c| c.1);
    if let Some(off) = pcie {
        assert_eq!(g.cfg32(off + 4), 0xffff_ffff);
    }
    assert_gone(&g.dev.reset().unwrap_err());
    let _ = g.dev.write_config(cap + 2, &0u16.to_le_bytes());
    assert!(
        t.elapsed() < limit,
        "calls on a dead backend took {:?}",
        t.elapsed()
    );
    // Emulated registers do not need the backend.
    assert_eq!(g.cfg16(0), nvme_like::VENDOR_ID);
    assert!(g.dev.snapshot().is_ok());
}

/// Unplugs `dev` on another thread; fails the test if it does not finish.
fn unplug_bounded(vm: &Vm, dev: VfioPciDevice) {
    let t = Instant::now();
    bounded(move || drop(dev)).expect("unplug hung");
    assert!(t.elapsed() < WAIT);
    assert!(vm.mapper.live().is_empty());
    assert_eq!(vm.alloc.lock().unwrap().placements().count(), 0);
}

#[test]
fn a_server_shut_down_mid_run_fails_device_calls_and_unplug_completes() {
    let timeout = Duration::from_secs(2);
    let mut b = Backend::socket(nvme(), false, options(timeout));
    let vm = Vm::new();
    let mem = guest_ram();
    let dev = vm.attach(&b);
    let g = Guest::new(&dev, &vm);
    let (bar, cap) = bring_up(&g, &mem);

    b.shutdown_server();
    // A dead peer is noticed at once, not after the request timeout.
    check_device_gone(&g, bar, cap, timeout);
    unplug_bounded(&vm, dev);
    // The server cleaned up after its client: DMA mappings and interrupts.
    assert_eq!(b.fake.dma_mapping_count(), 0);
    assert_eq!(b.fake.active_irq(), None);
}

#[test]
fn a_cut_connection_fails_device_calls_and_unplug_completes() {
    let timeout = Duration::from_secs(2);
    let b = Backend::socket(nvme(), true, options(timeout));
    let vm = Vm::new();
    let mem = guest_ram();
    let dev = vm.attach(&b);
    let g = Guest::new(&dev, &vm);
    let (bar, cap) = bring_up(&g, &mem);

    b.relay().unwrap().cut();
    check_device_gone(&g, bar, cap, timeout);
    unplug_bounded(&vm, dev);
    // The server saw its client go and undid what the client had set up.
    let deadline = Instant::now() + WAIT;
    while b.fake.dma_mapping_count() != 0 || b.fake.active_irq().is_some() {
        assert!(
            Instant::now() < deadline,
            "server kept the dead client's state"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_server_that_stops_answering_times_out_and_unplug_completes() {
    let timeout = Duration::from_millis(300);
    let b = Backend::socket(nvme(), false, options(timeout));
    let vm = Vm::new();
    let mem = guest_ram();
    let dev = vm.attach(&b);
    let g = Guest::new(&dev, &vm);
    let (bar, _) = bring_up(&g, &mem);

    b.fake.faults().set_hang(Some(Duration::from_secs(2)));
    let t = Instant::now();
    let doorbell = bar + nvme_like::DOORBELLS + nvme_like::DOORBELL_STRIDE;
    let e = g.mmio_write(doorbell, &1u32.to_le_bytes()).unwrap_err();
    assert!(matches!(e, vfio_pci::Error::Backend { .. }), "{e:?}");
    assert_eq!(e.errno(), Some(libc::ETIMEDOUT), "{e:?}");
    assert_eq!(g.mmio_read64(bar + nvme_like::CAP), u64::MAX);
    // Each call waits about one timeout, not for the server.
    assert!(
        t.elapsed() < Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    unplug_bounded(&vm, dev);
    b.fake.faults().clear();
}

#[test]
fn dma_map_of_guest_memory_costs_one_message_per_region() {
    let b = Backend::socket(nvme(), true, UserOptions::default());
    let relay = b.relay().unwrap();
    let vm = Vm::new();
    let mem = guest_ram();
    let dev = vm.attach(&b);
    let before = relay.commands().len();
    assert_eq!(dev.guest_dma().add_memory(&mem).unwrap(), RAM_REGIONS.len());
    let sent = relay.commands();
    assert_eq!(
        &sent[before..],
        vec![command::DMA_MAP; RAM_REGIONS.len()].as_slice(),
        "one DMA_MAP per region and nothing else"
    );
    let before = relay.commands().len();
    dev.guest_dma().remove_memory(&mem).unwrap();
    assert_eq!(
        &relay.commands()[before..],
        vec![command::DMA_UNMAP; RAM_REGIONS.len()].as_slice()
    );
    drop(dev);
}
