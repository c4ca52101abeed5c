//! DeviceBuilder: a device from a vfio-user socket (a served fake), from
//! any `Vfio`, and from a sysfs path on a host without VFIO (a clear error).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::{Arc, Mutex};

use vfio_fake_device::FakeDevice;
use vfio_passthrough::pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use vfio_passthrough::pci_interrupts::testing::TestInterruptManager;
use vfio_passthrough::vfio_backend::user::{ServerOptions, UserServer};
use vfio_passthrough::vfio_backend::Vfio;
use vfio_passthrough::vfio_pci::{DmaMode, IrqMode, KeptCapability};
use vfio_passthrough::{DeviceBackend, DeviceBuilder, Error};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

const PM: u8 = 0x01;
const MSIX: u8 = 0x11;
const AER: u16 = 0x0001;

fn allocator() -> Arc<Mutex<BarAllocator>> {
    Arc::new(Mutex::new(
        BarAllocator::new(
            BarWindows::new(AddressWindow {
                base: 0xc000_0000,
                size: 0x2000_0000,
            })
            .with_mmio64(AddressWindow {
                base: 0x100_0000_0000,
                size: 0x100_0000_0000,
            }),
        )
        .unwrap(),
    ))
}

/// Two memfd-backed RAM regions, as a VMM sharing memory with a vfio-user
/// server builds them.
fn guest_ram() -> GuestMemoryMmap {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(2 << 20).unwrap();
    GuestMemoryMmap::from_ranges_with_files([
        (
            GuestAddress(0),
            1 << 20,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        ),
        (
            GuestAddress(0x1_0000_0000),
            1 << 20,
            Some(FileOffset::new(file, 1 << 20)),
        ),
    ])
    .unwrap()
}

fn nvme() -> Arc<FakeDevice> {
    Arc::new(FakeDevice::profile("nvme-like").unwrap())
}

fn kept(caps: &[KeptCapability], id: u16, extended: bool) -> bool {
    caps.iter().any(|c| c.id == id && c.extended == extended)
}

#[test]
fn vfio_user_socket_builds_a_device_with_guest_ram_mapped_and_caps_hidden() {
    let fake = nvme();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nvme.sock");
    let served: Arc<dyn Vfio> = fake.clone();
    let server = UserServer::bind(&sock, served, ServerOptions::default()).unwrap();
    let irqs = Arc::new(TestInterruptManager::new());
    let alloc = allocator();
    let mem = guest_ram();

    let dev = DeviceBuilder::vfio_user(&sock)
        .interrupts(irqs.clone())
        .allocator(alloc.clone())
        .hide_capability(PM)
        .guest_memory(&mem)
        .build()
        .unwrap();
    assert!(matches!(dev.backend(), DeviceBackend::User(_)));
    assert!(dev.user_device().is_some() && dev.kernel_device().is_none());
    assert!(dev.description().contains("nvme.sock"));
    // Both RAM regions are mapped in the server's device.
    assert_eq!(fake.dma_mapping_count(), 2);
    assert_eq!(dev.guest_dma().mappings(dev.dma_domain()).len(), 2);
    // PM hidden on request, MSI-X kept (and emulated).
    assert!(!kept(dev.kept_capabilities(), u16::from(PM), false));
    assert!(dev
        .hidden_capabilities()
        .iter()
        .any(|h| h.id == u16::from(PM) && !h.extended));
    assert!(kept(dev.kept_capabilities(), u16::from(MSIX), false));
    // The default mapper traps everything: nothing mapped into the guest.
    assert!(dev.bars().iter().all(|b| b.mapped.is_empty()));
    assert_eq!(alloc.lock().unwrap().placements().count(), 1);
    // The vendor id through the device (Deref to VfioPciDevice).
    assert_eq!(
        dev.read_config_register(0) & 0xffff,
        u32::from(fake.template().config()[0]) | u32::from(fake.template().config()[1]) << 8
    );

    drop(dev);
    assert_eq!(fake.dma_mapping_count(), 0);
    assert_eq!(alloc.lock().unwrap().placements().count(), 0);
    server.shutdown();
}

#[test]
fn any_vfio_backend_builds_with_the_given_options() {
    let fake = nvme();
    let irqs = Arc::new(TestInterruptManager::new());
    let alloc = allocator();
    let dev = DeviceBuilder::vfio(fake.clone())
        .interrupts(irqs)
        .allocator(alloc.clone())
        .hide_extended_capability(AER)
        .build()
        .unwrap();
    assert!(matches!(dev.backend(), DeviceBackend::Other));
    assert!(!kept(dev.kept_capabilities(), AER, true));
    assert_eq!(fake.dma_mapping_count(), 0, "no guest memory given");
    assert_ne!(dev.irq_mode(), IrqMode::Msix);
    let inner = dev.into_device();
    assert_eq!(alloc.lock().unwrap().placements().count(), 1);
    drop(inner);
    assert_eq!(alloc.lock().unwrap().placements().count(), 0);
}

#[test]
fn a_missing_resource_is_named_before_the_device_is_touched() {
    let fake = nvme();
    let err = DeviceBuilder::vfio(fake.clone())
        .allocator(allocator())
        .build()
        .unwrap_err();
    assert!(matches!(
        err,
        Error::MissingResource {
            call: "interrupts",
            ..
        }
    ));
    assert!(
        err.to_string().contains("DeviceBuilder::interrupts()"),
        "{err}"
    );
    let err = DeviceBuilder::vfio(fake.clone())
        .interrupts(Arc::new(TestInterruptManager::new()))
        .build()
        .unwrap_err();
    assert!(
        err.to_string().contains("DeviceBuilder::allocator()"),
        "{err}"
    );
    assert_eq!(
        fake.counters().calls(vfio_fake_device::Op::DeviceInfo),
        0,
        "the device was not touched"
    );
}

#[test]
fn guest_memory_in_external_dma_mode_fails_and_leaves_nothing_placed() {
    let alloc = allocator();
    let mem = guest_ram();
    let err = DeviceBuilder::vfio(nvme())
        .interrupts(Arc::new(TestInterruptManager::new()))
        .allocator(alloc.clone())
        .dma_mode(DmaMode::External)
        .guest_memory(&mem)
        .build()
        .unwrap_err();
    assert!(
        matches!(err, Error::GuestMemoryInExternalMode { .. }),
        "{err}"
    );
    assert_eq!(alloc.lock().unwrap().placements().count(), 0);
}

#[test]
fn a_vfio_user_path_with_no_server_names_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody-listens.sock");
    let err = DeviceBuilder::vfio_user(&sock)
        .interrupts(Arc::new(TestInterruptManager::new()))
        .allocator(allocator())
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::OpenDevice { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&sock.display().to_string()), "{msg}");
    assert!(msg.contains("vfio-user server"), "{msg}");
    assert_eq!(err.errno(), Some(libc::ENOENT));
    assert_eq!(err.io_kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn a_sysfs_path_without_dev_vfio_fails_with_a_clear_error() {
    if std::path::Path::new("/dev/vfio/vfio").exists() {
        eprintln!("skipped: this host has /dev/vfio");
        return;
    }
    // A real PCI function if the host has one (it is not bound to vfio-pci
    // here), else a path that does not exist: either way no VFIO.
    let path = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.path())
        .unwrap_or_else(|| "/sys/bus/pci/devices/0000:ff:1f.7".into());
    let err = DeviceBuilder::sysfs(&path)
        .interrupts(Arc::new(TestInterruptManager::new()))
        .allocator(allocator())
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::OpenDevice { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains("vfio-pci"), "{msg}");
    assert!(msg.contains("/dev/vfio"), "{msg}");
    assert_eq!(err.io_kind(), std::io::ErrorKind::NotFound, "{err:?}");
}

#[test]
fn no_iommu_is_used_only_when_asked_for_and_fails_clearly_without_vfio() {
    use vfio_passthrough::KernelMode;
    // Without /dev/vfio every mode fails with an error that names the device;
    // with it, this path does not exist. Either way: an error, never a panic.
    let path = "/sys/bus/pci/devices/0000:ff:1f.7";
    for mode in [
        KernelMode::Auto,
        KernelMode::Legacy,
        KernelMode::Iommufd,
        KernelMode::NoIommu,
    ] {
        let built = vfio_passthrough::DeviceBuilder::sysfs_with_mode(path, mode)
            .interrupts(std::sync::Arc::new(
                vfio_passthrough::pci_interrupts::testing::TestInterruptManager::new(),
            ))
            .allocator(allocator())
            .build();
        let Err(err) = built else {
            panic!("{mode:?}: a device that does not exist was attached");
        };
        assert!(err.to_string().contains("0000:ff:1f.7"), "{mode:?}: {err}");
    }
    assert_eq!(KernelMode::default(), KernelMode::Auto);
}

#[test]
fn an_mdev_named_by_bare_uuid_is_looked_up_under_sys_bus_mdev_devices() {
    // No such mdev exists here: the error names the sysfs path the UUID
    // stands for, in every mode.
    let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
    for built in [
        DeviceBuilder::mdev(uuid),
        DeviceBuilder::sysfs(uuid),
        DeviceBuilder::sysfs_with_mode(uuid, vfio_passthrough::KernelMode::Iommufd),
    ] {
        let err = built
            .interrupts(Arc::new(TestInterruptManager::new()))
            .allocator(allocator())
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::OpenDevice { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&format!("/sys/bus/mdev/devices/{uuid}")),
            "{msg}"
        );
    }
}

#[test]
fn devices_built_into_one_domain_share_guest_ram_and_unplugging_either_keeps_it_for_the_other() {
    use vfio_passthrough::vfio_pci::GuestDma;
    for unplug_first in [0usize, 1] {
        // Two functions of one container: one fake IOMMU domain.
        let iommu = vfio_fake_device::FakeIommu::new();
        let fakes: Vec<Arc<FakeDevice>> = (0..2)
            .map(|_| {
                let t = vfio_fake_device::profile_template("nvme-like").unwrap();
                Arc::new(FakeDevice::with_iommu(t, iommu.clone()).unwrap())
            })
            .collect();
        let dma = GuestDma::new();
        let alloc = allocator();
        let mem = guest_ram();
        let mut devs: Vec<Option<_>> = fakes
            .iter()
            .map(|f| {
                // Every device is given the VMM's RAM and the VMM's GuestDma.
                Some(
                    DeviceBuilder::vfio(f.clone())
                        .interrupts(Arc::new(TestInterruptManager::new()))
                        .allocator(alloc.clone())
                        .guest_dma(dma.clone())
                        .guest_memory(&mem)
                        .build()
                        .unwrap(),
                )
            })
            .collect();
        assert_eq!(dma.ram_regions().len(), 2, "registered once");
        assert_eq!(iommu.mapping_count(), 2, "mapped once for the domain");
        devs[unplug_first] = None;
        assert_eq!(iommu.mapping_count(), 2);
        let other = &fakes[1 - unplug_first];
        other.dma_write(0x1_0000_0000, &[1, 2, 3, 4]).unwrap();
        devs[1 - unplug_first] = None;
        assert_eq!(iommu.mapping_count(), 0);
        assert!(other.dma_write(0x1_0000_0000, &[0; 4]).is_err());
    }
}
