//! The pending bits a guest reads of a passthrough device are real: a masked vector whose
//! eventfd the device signalled reads pending (MSI-X PBA, PCI Local Bus 3.0 §6.8.2.10; MSI
//! Pending Bits, §6.8.1.8), and reading it does not consume the signal.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use vfio_fake_device::nvme_like;
use vfio_pci::{BarIndex, IrqMode};

#[test]
fn a_masked_msix_vector_whose_eventfd_fired_reads_pending_in_the_pba_until_delivered() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = attach(&vm, &f);
    enable_device(&dev);
    let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap();
    let bar0 = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    let base = bar0.base.unwrap();
    let table = bar0.msix_table.unwrap().0 - base;
    let pba = bar0.msix_pba.unwrap().0 - base;
    program_msix_entry(&dev, 0, table, 2, 0xfee0_0000, 0x42);
    msix_enable(&dev, cap, true);
    assert_eq!(dev.irq_mode(), IrqMode::Msix);
    let g = group_with(&vm, nvme_like::MSIX_VECTORS);

    // Masked, and nothing fired: not pending.
    bar_write32(&dev, 0, table + 16 * 2 + 12, 1);
    assert_eq!(bar_read32(&dev, 0, pba), 0);
    // The device raises vector 2 (its doorbell): pending, and stays so across reads.
    bar_write32(
        &dev,
        0,
        nvme_like::DOORBELLS + 2 * nvme_like::DOORBELL_STRIDE,
        1,
    );
    assert_eq!(bar_read32(&dev, 0, pba), 1 << 2);
    assert_eq!(
        bar_read32(&dev, 0, pba),
        1 << 2,
        "reading does not consume it"
    );
    let mut q = [0u8; 8];
    dev.read_bar(BarIndex::Bar(0), pba, &mut q);
    assert_eq!(u64::from_le_bytes(q), 1 << 2, "8-byte read");
    // Unmasked: delivered once, no longer pending.
    bar_write32(&dev, 0, table + 16 * 2 + 12, 0);
    assert_eq!(g.take_delivered(2), 1);
    assert_eq!(bar_read32(&dev, 0, pba), 0);
}

#[test]
fn a_function_masked_msix_vector_whose_eventfd_fired_reads_pending() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = attach(&vm, &f);
    enable_device(&dev);
    let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x11).unwrap();
    let bar0 = dev
        .bars()
        .into_iter()
        .find(|b| b.index == BarIndex::Bar(0))
        .unwrap();
    let base = bar0.base.unwrap();
    let table = bar0.msix_table.unwrap().0 - base;
    let pba = bar0.msix_pba.unwrap().0 - base;
    program_msix_entry(&dev, 0, table, 3, 0xfee0_0000, 0x43);
    msix_enable(&dev, cap, true);
    // Function Mask (bit 14 of Message Control).
    let ctl = cfg_read16(&dev, cap + 2);
    cfg_write16(&dev, cap + 2, ctl | 0x4000);
    f.raise_irq(3);
    assert_eq!(bar_read32(&dev, 0, pba), 1 << 3);
}

#[test]
fn a_masked_msi_vector_whose_eventfd_fired_reads_pending_in_the_pending_bits() {
    let vm = Vm::new();
    let f = fake("nvme-like");
    let dev = attach(&vm, &f);
    enable_device(&dev);
    // nvme-like's MSI: 1 vector, 64-bit, per-vector masking: Mask Bits at 0x10, Pending
    // Bits at 0x14.
    let (_, cap) = walk_caps(&dev).into_iter().find(|c| c.0 == 0x05).unwrap();
    cfg_write32(&dev, cap + 4, 0xfee0_0000);
    cfg_write16(&dev, cap + 0xc, 0x41);
    cfg_write32(&dev, cap + 0x10, 1); // mask vector 0
    let ctl = cfg_read16(&dev, cap + 2);
    cfg_write16(&dev, cap + 2, ctl | 1); // MSI enable
    assert_eq!(dev.irq_mode(), IrqMode::Msi(1));
    assert_eq!(cfg_read32(&dev, cap + 0x14), 0, "nothing fired");
    f.raise_irq(0);
    assert_eq!(cfg_read32(&dev, cap + 0x14), 1);
    assert_eq!(cfg_read8(&dev, cap + 0x14), 1, "a byte read too");
    assert_eq!(
        cfg_read32(&dev, cap + 0x14),
        1,
        "reading does not consume it"
    );
    // Unmasked: delivered, no longer pending.
    cfg_write32(&dev, cap + 0x10, 0);
    let g = vm.irqs.groups().into_iter().next().unwrap();
    assert_eq!(g.take_delivered(0), 1);
    assert_eq!(cfg_read32(&dev, cap + 0x14), 0);
}
