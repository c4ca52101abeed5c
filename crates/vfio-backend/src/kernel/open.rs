//! Opening a device: the constructors of [`KernelDevice`] that live on the
//! container, the group and the IOAS. They sit here, above those three
//! modules and the device module, so that none of them imports another in a
//! circle: `device` knows the container, group and IOAS types it holds; the
//! container, group and IOAS know nothing of devices.

#[cfg(feature = "iommufd")]
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
#[cfg(feature = "iommufd")]
use std::path::PathBuf;
use std::sync::Arc;

use super::container::{KernelContainer, KernelGroup};
use super::device::{DeviceCore, DeviceIommu, KernelDevice};
#[cfg(feature = "iommufd")]
use super::iommufd::{IommufdIoas, DEV_VFIO_DEVICES};
#[cfg(feature = "iommufd")]
use super::open_node;
use super::sysfs::{self, SysfsDevice};
use super::IommuMode;
#[cfg(feature = "iommufd")]
use crate::Error;
use crate::Result;

impl KernelDevice {
    /// Opens the device at `sysfs_path` (e.g.
    /// `/sys/bus/pci/devices/0000:00:01.0`, or a mediated device:
    /// `/sys/bus/mdev/devices/<uuid>` or the bare UUID) in a new type1v2
    /// container of its own. To share one container (and its DMA mappings) between devices,
    /// create a [`KernelContainer`] and call [`KernelContainer::open_device`]
    /// for each.
    ///
    /// Fails with [`Error::NotAvailable`](crate::Error::NotAvailable) when the device, its IOMMU group or
    /// `/dev/vfio` is missing, and refuses a no-IOMMU group (see
    /// [`KernelContainer::new_noiommu`]).
    pub fn open(sysfs_path: impl AsRef<Path>) -> Result<KernelDevice> {
        let dev = sysfs::probe(&sysfs::device_path(sysfs_path.as_ref()))?;
        KernelContainer::check_mode_for(&dev, IommuMode::Type1v2)?;
        KernelContainer::new()?.open_probed(dev)
    }
}

impl KernelContainer {
    /// Opens the device at `sysfs_path` (e.g.
    /// `/sys/bus/pci/devices/0000:00:01.0`, or an mdev by path or bare
    /// UUID): opens its group (or reuses it when another device of the
    /// group is already open), attaches the group to this container, and
    /// gets the device fd.
    pub fn open_device(self: &Arc<Self>, sysfs_path: impl AsRef<Path>) -> Result<KernelDevice> {
        let dev = sysfs::probe(&sysfs::device_path(sysfs_path.as_ref()))?;
        Self::check_mode_for(&dev, self.mode())?;
        self.open_probed(dev)
    }

    pub(crate) fn open_probed(self: &Arc<Self>, dev: SysfsDevice) -> Result<KernelDevice> {
        let group = self.open_group(dev.group_id)?;
        let core = group.device_core(&dev.name)?;
        Ok(KernelDevice::new(
            core,
            DeviceIommu::Group(group),
            Some(dev.path),
        ))
    }
}

impl KernelGroup {
    /// Opens the device `name` (its PCI address, `0000:00:01.0`, or an
    /// mdev's UUID) of this group.
    pub fn open_device(self: &Arc<Self>, name: &str) -> Result<KernelDevice> {
        let core = self.device_core(name)?;
        Ok(KernelDevice::new(
            core,
            DeviceIommu::Group(Arc::clone(self)),
            None,
        ))
    }

    fn device_core(&self, name: &str) -> Result<DeviceCore> {
        DeviceCore::new(self.device_fd(name)?, name.to_string())
    }
}

#[cfg(feature = "iommufd")]
impl IommufdIoas {
    /// Opens the device at `sysfs_path` (a PCI function, or an mdev by path
    /// or bare UUID) through its vfio cdev (found in
    /// `<sysfs_path>/vfio-dev/vfioN`, opened as `/dev/vfio/devices/vfioN`),
    /// binds it to the iommufd and attaches it to this IOAS. An mdev binds
    /// as an emulated device: its vendor driver reaches the IOAS's mappings
    /// through an iommufd access.
    pub fn open_device(self: &Arc<Self>, sysfs_path: impl AsRef<Path>) -> Result<KernelDevice> {
        let resolved = sysfs::device_path(sysfs_path.as_ref());
        let sysfs_path = resolved.as_path();
        let cdev = sysfs::vfio_cdev_name(sysfs_path)?;
        let name = sysfs_path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(cdev.as_str())
            .to_string();
        // The kernel lists a no-IOMMU device in vfio-dev/ too, but gives it no cdev.
        if sysfs::probe(sysfs_path).is_ok_and(|d| d.noiommu) {
            return Err(Error::Unsupported(format!(
                "{name} is in a no-IOMMU group: the kernel offers no vfio cdev (iommufd) for \
                 it; open it through the legacy API with KernelContainer::new_noiommu()"
            )));
        }
        let file = open_node(&Path::new(DEV_VFIO_DEVICES).join(&cdev))?;
        self.attach(OwnedFd::from(file), name, Some(sysfs_path.to_path_buf()))
    }

    /// Opens the vfio cdev at `cdev_path` (`/dev/vfio/devices/vfioN`), binds
    /// it to the iommufd and attaches it to this IOAS.
    pub fn open_cdev(self: &Arc<Self>, cdev_path: impl AsRef<Path>) -> Result<KernelDevice> {
        let cdev_path = cdev_path.as_ref();
        let file = open_node(cdev_path)?;
        self.attach(OwnedFd::from(file), cdev_path.display().to_string(), None)
    }

    fn attach(
        self: &Arc<Self>,
        fd: OwnedFd,
        name: String,
        sysfs_path: Option<PathBuf>,
    ) -> Result<KernelDevice> {
        let dev_id = self.bind_and_attach(fd.as_fd(), &name)?;
        let core = DeviceCore::new(fd, name)?;
        Ok(KernelDevice::new(
            core,
            DeviceIommu::Iommufd {
                ioas: Arc::clone(self),
                dev_id,
            },
            sysfs_path,
        ))
    }
}
