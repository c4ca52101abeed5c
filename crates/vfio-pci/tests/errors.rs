//! vfio-pci's errors are typed and keep the errno of the layer that failed: each test
//! checks the variant and, where a system call or a VMM callback failed, its errno.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use pci_interrupts::{InterruptManager, InterruptSourceGroup};
use vfio_backend::Vfio;
use vfio_fake_device::Op;
use vfio_pci::{BarIndex, DeviceOptions, Error, GuestMapper, MappingId, VfioPciDevice};

fn try_attach(
    vm: &Vm,
    fake: &Arc<vfio_fake_device::FakeDevice>,
) -> vfio_pci::Result<VfioPciDevice> {
    let vfio: Arc<dyn Vfio> = fake.clone();
    VfioPciDevice::new(vfio, vm.resources(), DeviceOptions::default())
}

#[test]
fn a_failed_device_info_ioctl_is_a_backend_error_with_its_errno() {
    let vm = Vm::new();
    let f = fake("edu");
    f.faults().fail(Op::DeviceInfo, libc::EACCES, Some(1));
    let e = try_attach(&vm, &f).unwrap_err();
    assert!(matches!(e, Error::Backend { .. }), "{e:?}");
    assert_eq!(e.errno(), Some(libc::EACCES));
}

#[test]
fn a_failed_config_space_read_is_a_backend_error_with_its_errno() {
    let vm = Vm::new();
    let f = fake("edu");
    f.faults().fail(Op::RegionRead, libc::ENODEV, Some(1));
    let e = try_attach(&vm, &f).unwrap_err();
    assert!(matches!(e, Error::Backend { .. }), "{e:?}");
    assert_eq!(e.errno(), Some(libc::ENODEV));
}

#[test]
fn a_page_size_that_is_not_a_power_of_two_is_refused_with_the_size() {
    let vm = Vm::new();
    let vfio: Arc<dyn Vfio> = fake("edu");
    let opts = DeviceOptions::default().with_page_size(0x3000);
    let e = VfioPciDevice::new(vfio, vm.resources(), opts).unwrap_err();
    assert!(matches!(e, Error::PageSize { size: 0x3000 }), "{e:?}");
    assert_eq!(e.errno(), None);
}

/// A VMM whose interrupt manager is out of file descriptors.
struct NoIrqfds;

impl InterruptManager for NoIrqfds {
    fn create_msi_group(&self, _: u32) -> pci_interrupts::Result<Arc<dyn InterruptSourceGroup>> {
        Err(pci_interrupts::Error::Group {
            op: "create",
            source: std::io::Error::from_raw_os_error(libc::EMFILE),
        })
    }

    fn create_intx_group(&self) -> pci_interrupts::Result<Arc<dyn InterruptSourceGroup>> {
        self.create_msi_group(1)
    }
}

#[test]
fn an_interrupt_group_the_vmm_cannot_create_keeps_the_vmms_errno() {
    let vm = Vm::new();
    let mut res = vm.resources();
    res.interrupts = Arc::new(NoIrqfds);
    let vfio: Arc<dyn Vfio> = fake("edu");
    let e = VfioPciDevice::new(vfio, res, DeviceOptions::default()).unwrap_err();
    assert!(
        matches!(
            &e,
            Error::Interrupts {
                source: pci_interrupts::Error::Group { op: "create", .. },
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.errno(), Some(libc::EMFILE));
}

/// A VMM whose memory slots are exhausted.
struct NoSlots;

impl GuestMapper for NoSlots {
    unsafe fn map(&self, _: u64, _: u64, _: *mut u8, _: bool) -> std::io::Result<MappingId> {
        Err(std::io::Error::from_raw_os_error(libc::ENOSPC))
    }

    fn unmap(&self, _: MappingId) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_guest_mapping_the_vmm_refuses_names_the_bar_and_keeps_the_errno() {
    let vm = Vm::new();
    let mut res = vm.resources();
    res.mapper = Arc::new(NoSlots);
    let vfio: Arc<dyn Vfio> = fake("edu");
    let e = VfioPciDevice::new(vfio, res, DeviceOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            Error::GuestMapping {
                bar: BarIndex::Bar(0),
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(e.errno(), Some(libc::ENOSPC));
}

#[test]
fn a_bar_move_onto_another_device_is_a_placement_error_naming_the_bar() {
    let vm = Vm::new();
    let a = attach(&vm, &fake("edu"));
    let b = attach(&vm, &fake("edu"));
    let b0 = b.bars()[0].base.unwrap();
    let e = a.move_bar(BarIndex::Bar(0), b0).unwrap_err();
    assert!(
        matches!(
            e,
            Error::BarPlacement {
                bar: BarIndex::Bar(0),
                ..
            }
        ),
        "{e:?}"
    );
    let e = a.move_bar(BarIndex::Bar(3), b0).unwrap_err();
    assert!(matches!(e, Error::NoSuchBar { slot: 3 }), "{e:?}");
}

#[test]
fn a_snapshot_of_another_version_is_refused_with_both_versions() {
    let vm = Vm::new();
    let dev = attach(&vm, &fake("edu"));
    let mut snap = dev.snapshot().unwrap();
    snap.version = 99;
    let e = dev.restore(&snap).unwrap_err();
    assert!(
        matches!(
            e,
            Error::SnapshotVersion {
                found: 99,
                supported: vfio_pci::DEVICE_SNAPSHOT_VERSION
            }
        ),
        "{e:?}"
    );
}

#[test]
fn a_device_without_an_intx_unmask_eventfd_still_attaches_with_intx_wired() {
    // ACTION_UNMASK with DATA_EVENTFD is optional in the VFIO uAPI (the kernel's mtty
    // sample answers ENOTTY): the device keeps delivering INTx through its trigger eventfd.
    for errno in [libc::ENOTTY, libc::EINVAL, libc::EOPNOTSUPP] {
        let vm = Vm::new();
        let f = fake("edu");
        f.faults().fail(Op::SetIrqUnmaskEventfd, errno, None);
        let dev = try_attach(&vm, &f).unwrap_or_else(|e| panic!("errno {errno}: {e:?}"));
        assert_eq!(dev.irq_mode(), vfio_pci::IrqMode::Intx, "errno {errno}");
        assert!(f.counters().calls(Op::SetIrqUnmaskEventfd) >= 1);
    }
}

#[test]
fn an_intx_unmask_eventfd_that_fails_otherwise_is_a_backend_error_with_its_errno() {
    let vm = Vm::new();
    let f = fake("edu");
    f.faults().fail(Op::SetIrqUnmaskEventfd, libc::EIO, None);
    let e = try_attach(&vm, &f).unwrap_err();
    assert!(matches!(e, Error::Backend { .. }), "{e:?}");
    assert_eq!(e.errno(), Some(libc::EIO));
}
