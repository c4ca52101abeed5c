//! HostIommu: one host IOMMU context shared by a VMM's kernel devices. What can be checked on a
//! host without VFIO: what a builder given a context refuses before it opens anything (another
//! source, another mode, another GuestDma), that the context's GuestDma is the one used, and
//! that a context whose domain could not be made stays usable. Two devices really sharing one
//! container or IOAS need VFIO: the reference VMM does that under hwtest.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::{Arc, Mutex};

use vfio_passthrough::pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use vfio_passthrough::pci_interrupts::testing::TestInterruptManager;
use vfio_passthrough::vfio_pci::GuestDma;
use vfio_passthrough::{DeviceBuilder, Error, HostIommu, KernelMode};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// A PCI address no host has.
const NO_SUCH_DEVICE: &str = "/sys/bus/pci/devices/0000:ff:1f.7";

fn allocator() -> Arc<Mutex<BarAllocator>> {
    Arc::new(Mutex::new(
        BarAllocator::new(BarWindows::new(AddressWindow {
            base: 0xc000_0000,
            size: 0x2000_0000,
        }))
        .unwrap(),
    ))
}

fn with_resources(b: DeviceBuilder) -> DeviceBuilder {
    b.interrupts(Arc::new(TestInterruptManager::new()))
        .allocator(allocator())
}

fn conflict_reason(err: &Error) -> &str {
    match err {
        Error::HostIommuConflict { reason, .. } => reason,
        other => panic!("expected HostIommuConflict, got {other:?}"),
    }
}

/// No VFIO on this host: making a container or IOAS fails, so a context stays without a
/// domain. Where VFIO exists (inside hwtest's guest) the checks that need that are left out.
fn no_vfio_here() -> bool {
    !Path::new("/dev/vfio/vfio").exists() && !Path::new("/dev/iommu").exists()
}

#[test]
fn a_context_holds_only_host_devices_named_by_sysfs_path() {
    let host = HostIommu::new(KernelMode::Auto);
    // Any Vfio backend: its IOMMU domain is its own, not the context's.
    let fake = Arc::new(vfio_fake_device::FakeDevice::profile("nvme-like").unwrap());
    let err = with_resources(DeviceBuilder::vfio(fake).host_iommu(&host))
        .build()
        .unwrap_err();
    assert!(conflict_reason(&err).contains("sysfs path"), "{err}");
    assert_eq!(err.io_kind(), std::io::ErrorKind::InvalidInput);
    // A vfio-user socket: refused before any connection is tried (a missing socket would be
    // OpenDevice with ENOENT).
    #[cfg(feature = "vfio-user")]
    {
        let err =
            with_resources(DeviceBuilder::vfio_user("/nonexistent/dev.sock").host_iommu(&host))
                .build()
                .unwrap_err();
        assert!(conflict_reason(&err).contains("sysfs path"), "{err}");
    }
    assert_eq!(host.mode(), None, "nothing was opened");
}

#[test]
fn a_device_asking_for_another_mode_than_its_context_is_refused_before_anything_is_opened() {
    for (context, device) in [
        (KernelMode::Legacy, KernelMode::Iommufd),
        (KernelMode::Iommufd, KernelMode::Legacy),
        (KernelMode::Legacy, KernelMode::NoIommu),
        (KernelMode::NoIommu, KernelMode::Iommufd),
    ] {
        let host = HostIommu::new(context);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let err = with_resources(
            DeviceBuilder::sysfs_with_mode(NO_SUCH_DEVICE, device)
                .host_iommu(&host)
                .guest_memory(&mem),
        )
        .build()
        .unwrap_err();
        assert!(
            host.guest_dma().ram_regions().is_empty(),
            "{context:?}/{device:?}: refused before guest RAM is registered"
        );
        let reason = conflict_reason(&err);
        assert!(
            reason.contains(&device.to_string()) && reason.contains(&context.to_string()),
            "{context:?}/{device:?}: {err}"
        );
        assert!(err.to_string().contains("0000:ff:1f.7"), "{err}");
        assert_eq!(host.mode(), None, "{context:?}/{device:?}: nothing opened");
    }
    // The same mode, or Auto on either side, is accepted: the build goes on to open the
    // device (which does not exist), so the error is an open error, not a conflict.
    for (context, device) in [
        (KernelMode::Legacy, KernelMode::Legacy),
        (KernelMode::Legacy, KernelMode::Auto),
        (KernelMode::Auto, KernelMode::Iommufd),
        (KernelMode::Auto, KernelMode::Auto),
    ] {
        let host = HostIommu::new(context);
        let err = with_resources(
            DeviceBuilder::sysfs_with_mode(NO_SUCH_DEVICE, device).host_iommu(&host),
        )
        .build()
        .unwrap_err();
        assert!(
            matches!(err, Error::OpenDevice { .. }),
            "{context:?}/{device:?}: {err}"
        );
        assert!(err.to_string().contains("0000:ff:1f.7"), "{err}");
    }
}

#[test]
fn a_guest_dma_other_than_the_contexts_is_refused_and_the_contexts_is_used() {
    let host = HostIommu::new(KernelMode::Auto);
    // Another GuestDma would map guest RAM into the shared domain a second time and unmap it
    // when its one device goes.
    let other = GuestDma::new();
    let err = with_resources(DeviceBuilder::host(&host, NO_SUCH_DEVICE).guest_dma(other.clone()))
        .build()
        .unwrap_err();
    assert!(conflict_reason(&err).contains("GuestDma"), "{err}");
    // Refused before guest RAM is registered anywhere.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let err = with_resources(
        DeviceBuilder::host(&host, NO_SUCH_DEVICE)
            .guest_dma(other.clone())
            .guest_memory(&mem),
    )
    .build()
    .unwrap_err();
    assert!(matches!(err, Error::HostIommuConflict { .. }), "{err}");
    assert!(other.ram_regions().is_empty());
    assert!(host.guest_dma().ram_regions().is_empty());

    // The context's own GuestDma, given again, is accepted; without one the builder takes
    // the context's: guest RAM is registered there (and stays, as for any shared GuestDma,
    // when the device cannot be opened).
    let err = with_resources(
        DeviceBuilder::host(&host, NO_SUCH_DEVICE).guest_dma(host.guest_dma().clone()),
    )
    .build()
    .unwrap_err();
    assert!(matches!(err, Error::OpenDevice { .. }), "{err}");
    let err = with_resources(DeviceBuilder::host(&host, NO_SUCH_DEVICE).guest_memory(&mem))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::OpenDevice { .. }), "{err}");
    assert_eq!(host.guest_dma().ram_regions(), vec![(0, 1 << 20)]);
    assert!(other.ram_regions().is_empty());

    // A context made over the VMM's GuestDma uses that one.
    let vmm_dma = GuestDma::new();
    let host = HostIommu::with_guest_dma(KernelMode::Auto, vmm_dma.clone());
    assert!(Arc::ptr_eq(host.guest_dma(), &vmm_dma));
    let err = with_resources(DeviceBuilder::host(&host, NO_SUCH_DEVICE).guest_memory(&mem))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::OpenDevice { .. }), "{err}");
    assert_eq!(vmm_dma.ram_regions(), vec![(0, 1 << 20)]);
}

#[test]
fn a_context_is_reused_by_every_device_and_a_failed_domain_fixes_no_mode() {
    let host = HostIommu::new(KernelMode::Auto);
    assert_eq!(host.requested_mode(), KernelMode::Auto);
    assert_eq!(host.device_count(), 0);
    for _ in 0..3 {
        let err = with_resources(DeviceBuilder::host(&host, NO_SUCH_DEVICE))
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::OpenDevice { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("0000:ff:1f.7"), "{msg}");
    }
    if no_vfio_here() {
        // Neither /dev/vfio/vfio nor /dev/iommu: no domain could be made, so none is kept
        // and the mode is still open: a device asking for another explicit mode is not a
        // conflict. (With VFIO, the first build made the domain and fixed the mode.)
        assert_eq!(host.mode(), None);
        assert_eq!(host.domain_id(), None);
        let err = with_resources(
            DeviceBuilder::sysfs_with_mode(NO_SUCH_DEVICE, KernelMode::NoIommu).host_iommu(&host),
        )
        .build()
        .unwrap_err();
        assert!(matches!(err, Error::OpenDevice { .. }), "{err}");
        assert!(err.to_string().contains("host IOMMU context"), "{err}");
        assert_eq!(err.errno(), Some(libc::ENOENT), "{err:?}");
    }
    assert_eq!(host.device_count(), 0);
}

#[test]
fn an_mdev_named_by_bare_uuid_is_looked_up_under_sys_bus_mdev_devices_in_a_context_too() {
    // No such mdev exists here: the error names the sysfs path the UUID stands for.
    let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    let host = HostIommu::new(KernelMode::Auto);
    for built in [
        DeviceBuilder::host(&host, uuid),
        DeviceBuilder::mdev(uuid).host_iommu(&host),
    ] {
        let err = with_resources(built).build().unwrap_err();
        assert!(matches!(err, Error::OpenDevice { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("/sys/bus/mdev/devices/{uuid}")),
            "{msg}"
        );
    }
}
