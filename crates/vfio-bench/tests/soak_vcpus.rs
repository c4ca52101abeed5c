//! Several vCPU threads hammer config space and BARs while the device
//! fires interrupts: no deadlock, and every interrupt fired is received.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use vfio_bench::guest::*;
use vfio_bench::vmm::{EventGroup, Vm};
use vfio_fake_device::{nvme_like, FakeDevice};
use vfio_pci::VfioPciDevice;

const VCPUS: u64 = 4;
const ITERATIONS: u64 = 20_000;
const DEVICE_IRQS: u64 = 100_000;
/// How long the whole run may take before it is called a deadlock.
const DEADLINE: Duration = Duration::from_secs(120);

/// Takes every signal of the unmasked vectors (a masked vector keeps its
/// signals latched in its eventfd until the guest unmasks it).
fn receive(g: &EventGroup) -> u64 {
    (0..nvme_like::MSIX_VECTORS)
        .filter(|&v| g.route(v).is_some_and(|(_, masked)| !masked))
        .map(|v| g.take(v))
        .sum()
}

fn vcpu(dev: &VfioPciDevice, id: u64, table: u64, pcie: u64, doorbells: &AtomicU64) {
    let mut sink = 0u64;
    for i in 0..ITERATIONS {
        // Emulated and passed-through config reads.
        sink ^= u64::from(cfg_read32(dev, 0));
        sink ^= u64::from(cfg_read32(dev, pcie + 8));
        // An emulated config write (interrupt line).
        cfg_write16(dev, 0x3c, (id as u16) << 8 | 0x0100).ok();
        // Trapped BAR registers: CAP (read-only) and CC (memory).
        let mut b = [0u8; 4];
        dev.read_bar(vfio_pci::BarIndex::Bar(0), 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), nvme_like::CAP_VALUE as u32);
        dev.write_bar(vfio_pci::BarIndex::Bar(0), 0x14, &(i as u32).to_le_bytes())
            .unwrap();
        // Mask and unmask one of this vCPU's vectors.
        let v = id * 8 + i % 8;
        mask_msix_vector(dev, 0, table, v, true).unwrap();
        let mut pba = [0u8; 8];
        dev.read_bar(
            vfio_pci::BarIndex::Bar(0),
            nvme_like::MSIX_PBA_OFFSET,
            &mut pba,
        );
        mask_msix_vector(dev, 0, table, v, false).unwrap();
        // Every 16th iteration rings a doorbell: the device raises vector v.
        if i % 16 == 0 {
            let db = nvme_like::DOORBELLS + v * nvme_like::DOORBELL_STRIDE;
            dev.write_bar(vfio_pci::BarIndex::Bar(0), db, &1u32.to_le_bytes())
                .unwrap();
            doorbells.fetch_add(1, Ordering::Relaxed);
        }
    }
    std::hint::black_box(sink);
}

#[test]
fn vcpus_hammering_config_and_bars_while_interrupts_fire_lose_no_interrupt() {
    let fake = Arc::new(FakeDevice::profile("nvme-like").unwrap());
    let vm = Vm::new().unwrap();
    let dev = Arc::new(vm.attach(fake.clone()).unwrap());
    enable_device(&dev).unwrap();
    let (_, bar, table) = enable_msix_all(&dev).unwrap();
    assert_eq!(bar, 0);
    let pcie = find_cap(&dev, cap_id::PCI_EXPRESS).unwrap();
    let group = vm.irqs.group_with(nvme_like::MSIX_VECTORS).unwrap();

    let doorbells = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = mpsc::channel();

    let mut workers = Vec::new();
    for id in 0..VCPUS {
        let (dev, doorbells, tx) = (dev.clone(), doorbells.clone(), done_tx.clone());
        workers.push(std::thread::spawn(move || {
            vcpu(&dev, id, table, pcie, &doorbells);
            tx.send("vcpu").unwrap();
        }));
    }
    {
        let (fake, tx) = (fake.clone(), done_tx.clone());
        workers.push(std::thread::spawn(move || {
            for k in 0..DEVICE_IRQS {
                fake.raise_irq((k % u64::from(nvme_like::MSIX_VECTORS)) as u32);
                if k % 64 == 0 {
                    std::thread::yield_now();
                }
            }
            tx.send("device").unwrap();
        }));
    }
    let receiver = {
        let (group, received, stop) = (group.clone(), received.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                received.fetch_add(receive(&group), Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };

    for _ in 0..VCPUS + 1 {
        match done_rx.recv_timeout(DEADLINE) {
            Ok(_) => {}
            Err(_) => panic!("no progress in {DEADLINE:?}: deadlock"),
        }
    }
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Release);
    receiver.join().unwrap();

    // Every vector is unmasked again (each vCPU's last act on a vector is
    // unmasking it): drain what is latched.
    let mut got = received.load(Ordering::Relaxed);
    for v in 0..nvme_like::MSIX_VECTORS {
        assert_eq!(
            group.route(v).map(|r| r.1),
            Some(false),
            "vector {v} masked"
        );
    }
    got += receive(&group);

    let fired = DEVICE_IRQS + doorbells.load(Ordering::Relaxed);
    eprintln!(
        "soak vcpus: {VCPUS} vCPUs x {ITERATIONS} iterations; interrupts fired {fired}, received {got}, dropped by the device {}",
        fake.counters().interrupts_dropped()
    );
    assert_eq!(fake.counters().interrupts_dropped(), 0);
    assert_eq!(fake.counters().interrupts_signalled(), fired);
    assert_eq!(got, fired, "interrupts lost");
}
