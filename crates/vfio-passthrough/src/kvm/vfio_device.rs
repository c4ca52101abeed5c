//! The KVM-VFIO pseudo device.

use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO, KVM_DEV_VFIO_FILE,
    KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL,
};
use kvm_ioctls::{DeviceFd, VmFd};

use super::kvm_error;
use crate::Result;

/// The KVM-VFIO device (`KVM_DEV_TYPE_VFIO`), through which KVM learns which VFIO files a VM
/// uses: a VFIO group fd (container/group backend) or a VFIO device cdev fd (iommufd backend).
///
/// KVM uses it to keep DMA coherency consistent with non-coherent devices and for
/// platform-specific interrupt and IOMMU hooks. A VM has at most one such device; KVM refuses a
/// second with `EBUSY`. Files stay known to KVM until removed or until the VM goes away.
pub struct KvmVfioDevice {
    device: DeviceFd,
}

impl KvmVfioDevice {
    /// Creates the KVM-VFIO device of `vm` (`KVM_CREATE_DEVICE`).
    pub fn new(vm: &VmFd) -> Result<Self> {
        let mut create = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let device = vm
            .create_device(&mut create)
            .map_err(|e| kvm_error("KVM_CREATE_DEVICE (KVM_DEV_TYPE_VFIO)", e))?;
        Ok(Self { device })
    }

    /// The device's file descriptor.
    pub fn device_fd(&self) -> &DeviceFd {
        &self.device
    }

    /// Tells KVM the VM uses `file`, a VFIO group or device file (`KVM_DEV_VFIO_FILE_ADD`).
    /// KVM refuses any other kind of file with `EINVAL`.
    pub fn add_file(&self, file: BorrowedFd<'_>) -> Result<()> {
        self.file_attr(KVM_DEV_VFIO_FILE_ADD, file)
            .map_err(|e| kvm_error("KVM_SET_DEVICE_ATTR (KVM_DEV_VFIO_FILE_ADD)", e))
    }

    /// Tells KVM the VM no longer uses `file` (`KVM_DEV_VFIO_FILE_DEL`); KVM answers `ENOENT`
    /// for a file it was not given.
    pub fn remove_file(&self, file: BorrowedFd<'_>) -> Result<()> {
        self.file_attr(KVM_DEV_VFIO_FILE_DEL, file)
            .map_err(|e| kvm_error("KVM_SET_DEVICE_ATTR (KVM_DEV_VFIO_FILE_DEL)", e))
    }

    fn file_attr(
        &self,
        attr: u32,
        file: BorrowedFd<'_>,
    ) -> std::result::Result<(), kvm_ioctls::Error> {
        let fd: i32 = file.as_raw_fd();
        let attr = kvm_device_attr {
            flags: 0,
            group: KVM_DEV_VFIO_FILE,
            attr: attr.into(),
            // The kernel reads an `i32` fd from this address during the call.
            addr: std::ptr::from_ref(&fd) as u64,
        };
        self.device.set_device_attr(&attr)
    }
}

impl std::fmt::Debug for KvmVfioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmVfioDevice")
            .field("fd", &self.device.as_raw_fd())
            .finish()
    }
}
