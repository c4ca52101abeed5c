//! The KVM-VFIO pseudo device.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_VFIO, KVM_DEV_VFIO_FILE,
    KVM_DEV_VFIO_FILE_ADD, KVM_DEV_VFIO_FILE_DEL,
};
use kvm_ioctls::{DeviceFd, VmFd};
use vfio_backend::kernel::KernelDevice;

use super::{kvm_error, lock};
use crate::Result;

/// The KVM-VFIO device (`KVM_DEV_TYPE_VFIO`), through which KVM learns which VFIO files a VM
/// uses: a VFIO group fd (container/group backend) or a VFIO device cdev fd (iommufd backend).
///
/// KVM uses it to keep DMA coherency consistent with non-coherent devices and for
/// platform-specific interrupt and IOMMU hooks. A VM has at most one such device; KVM refuses a
/// second with `EBUSY`. Files stay known to KVM until removed or until the VM goes away (KVM
/// holds a reference to each: a legacy group stays open, and cannot be opened again, until it
/// is removed).
///
/// KVM knows each file once and refuses a file it holds already with `EEXIST`, while several
/// devices of one IOMMU group share one group file (legacy): tell it about devices with
/// [`add_device`](Self::add_device) / [`remove_device`](Self::remove_device), which count the
/// devices of each file and add it for the first, remove it with the last.
/// [`add_file`](Self::add_file) / [`remove_file`](Self::remove_file) are the raw calls.
pub struct KvmVfioDevice {
    device: DeviceFd,
    /// The files added through `add_device`, with their device counts.
    files: Mutex<FileCounts>,
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
        Ok(Self {
            device,
            files: Mutex::new(FileCounts::default()),
        })
    }

    /// Tells KVM the VM uses the host device `device`: its VFIO group file (legacy
    /// container) or its own device cdev file (iommufd). A group file is added for the first
    /// device of its group only; the later ones are counted. Returns whether KVM was told now.
    pub fn add_device(&self, device: &KernelDevice) -> Result<bool> {
        let fd = vfio_file(device);
        let key = file_key(fd)?;
        let mut files = lock(&self.files);
        files.add(key, || self.add_file(fd))
    }

    /// Tells KVM the VM no longer uses `device` (given to [`add_device`](Self::add_device)
    /// before): its group file is removed with the last device of the group, its cdev at once.
    /// Returns whether KVM was told now; a device never added is refused with `ENOENT`, as
    /// KVM refuses a file it does not know.
    pub fn remove_device(&self, device: &KernelDevice) -> Result<bool> {
        let fd = vfio_file(device);
        let key = file_key(fd)?;
        let mut files = lock(&self.files);
        files.remove(key, || self.remove_file(fd))
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
            .field(
                "files",
                &self.files.try_lock().map(|c| c.0.len()).unwrap_or_default(),
            )
            .finish()
    }
}

/// The file KVM needs for `device`: its group (legacy), else its own fd (a vfio cdev).
fn vfio_file(device: &KernelDevice) -> BorrowedFd<'_> {
    match device.group() {
        Some(g) => g.as_fd(),
        None => device.as_fd(),
    }
}

/// Which open file `fd` is: its device and inode numbers. KVM tells files apart by the open
/// file; one VFIO group (or device cdev bound to an iommufd) can be open only once at a time,
/// so its node identifies the open file.
fn file_key(fd: BorrowedFd<'_>) -> Result<(u64, u64)> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat writes one `struct stat` to the pointer, which is valid for that size;
    // `fd` is a live descriptor borrowed for the call.
    let ret = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if ret != 0 {
        return Err(crate::Error::Kvm {
            op: "fstat of a VFIO file for the KVM-VFIO device",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fstat succeeded, so it initialized the whole structure.
    let st = unsafe { st.assume_init() };
    // st_dev and st_ino are u64 on 64-bit Linux, narrower on some 32-bit targets.
    #[allow(clippy::useless_conversion)]
    Ok((u64::from(st.st_dev), u64::from(st.st_ino)))
}

/// The devices behind each file given to KVM, by [`file_key`].
#[derive(Debug, Default)]
struct FileCounts(Vec<((u64, u64), usize)>);

impl FileCounts {
    /// Counts a device of file `key`; the first one calls `tell` (which tells KVM), and is
    /// counted only if it succeeds. Returns whether `tell` was called.
    fn add(&mut self, key: (u64, u64), tell: impl FnOnce() -> Result<()>) -> Result<bool> {
        if let Some((_, n)) = self.0.iter_mut().find(|(k, _)| *k == key) {
            *n = n.saturating_add(1);
            return Ok(false);
        }
        tell()?;
        self.0.push((key, 1));
        Ok(true)
    }

    /// Uncounts a device of file `key`; the last one calls `tell` (which tells KVM) and the
    /// file is forgotten (also when `tell` fails: KVM does not know it then, or the VM is
    /// going). A key never counted is `ENOENT`.
    fn remove(&mut self, key: (u64, u64), tell: impl FnOnce() -> Result<()>) -> Result<bool> {
        let Some(i) = self.0.iter().position(|(k, _)| *k == key) else {
            return Err(crate::Error::Kvm {
                op: "KVM_SET_DEVICE_ATTR (KVM_DEV_VFIO_FILE_DEL)",
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        };
        let n = self.0.get_mut(i).map(|(_, n)| n);
        match n {
            Some(n) if *n > 1 => {
                *n -= 1;
                Ok(false)
            }
            _ => {
                self.0.swap_remove(i);
                tell().map(|()| true)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm_said(errno: i32) -> Result<()> {
        Err(crate::Error::Kvm {
            op: "test",
            source: std::io::Error::from_raw_os_error(errno),
        })
    }

    /// A stand-in for the ioctl that counts its calls.
    fn counting(told: &std::cell::Cell<u32>) -> impl FnOnce() -> Result<()> + '_ {
        move || {
            told.set(told.get() + 1);
            Ok(())
        }
    }

    #[test]
    fn a_group_file_shared_by_devices_is_added_once_and_removed_with_its_last_device() {
        let mut c = FileCounts::default();
        let group = (5, 40);
        let told = std::cell::Cell::new(0);
        // Two devices of one group: KVM is told once (a second FILE_ADD would be EEXIST).
        assert!(c.add(group, counting(&told)).unwrap());
        assert!(!c.add(group, || kvm_said(libc::EEXIST)).unwrap());
        assert_eq!(told.get(), 1);
        // Removing the first device keeps the file; the last one removes it.
        assert!(!c.remove(group, || kvm_said(libc::ENOENT)).unwrap());
        assert!(c.remove(group, counting(&told)).unwrap());
        assert_eq!(told.get(), 2);
        // Gone: one more removal is ENOENT, as KVM answers for a file it does not know.
        let e = c.remove(group, || Ok(())).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOENT));
    }

    #[test]
    fn a_file_kvm_refuses_is_not_counted() {
        let mut c = FileCounts::default();
        let not_vfio = (1, 2);
        let e = c.add(not_vfio, || kvm_said(libc::EINVAL)).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL));
        // Not counted: the next device of that file tells KVM again.
        let told = std::cell::Cell::new(0);
        assert!(c.add(not_vfio, counting(&told)).unwrap());
        assert_eq!(told.get(), 1);
    }

    #[test]
    fn files_are_counted_apart() {
        let mut c = FileCounts::default();
        let (a, b) = ((5, 40), (5, 41));
        assert!(c.add(a, || Ok(())).unwrap());
        assert!(c.add(b, || Ok(())).unwrap());
        assert!(c.remove(a, || Ok(())).unwrap());
        assert!(!c.add(b, || Ok(())).unwrap());
        assert!(!c.remove(b, || Ok(())).unwrap());
        assert!(c.remove(b, || Ok(())).unwrap());
    }
}
