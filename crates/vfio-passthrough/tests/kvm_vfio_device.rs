//! `KvmVfioDevice` against this machine's /dev/kvm (Documentation/virt/kvm/devices/vfio.rst).
//! Without /dev/vfio only the refusals can be checked. Skips where /dev/kvm cannot be opened.
#![cfg(feature = "kvm")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::AsFd;

use kvm_ioctls::Kvm;
use vfio_passthrough::kvm::KvmVfioDevice;

#[test]
fn the_kvm_vfio_device_is_created_once_per_vm_and_refuses_files_that_are_not_vfio() {
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("skipped: cannot open /dev/kvm: {e}");
            return;
        }
    };
    let vm = kvm.create_vm().unwrap();
    let device = KvmVfioDevice::new(&vm).unwrap();

    // One KVM-VFIO device per VM: a second is refused with EBUSY.
    let second = KvmVfioDevice::new(&vm).unwrap_err();
    assert_eq!(second.errno(), Some(libc::EBUSY), "{second}");

    // KVM_DEV_VFIO_FILE_ADD takes only VFIO group or device files: EINVAL otherwise.
    let not_vfio = std::fs::File::open("/dev/null").unwrap();
    let err = device.add_file(not_vfio.as_fd()).unwrap_err();
    assert_eq!(err.errno(), Some(libc::EINVAL), "{err}");
    // KVM_DEV_VFIO_FILE_DEL of a file it does not know: ENOENT.
    let err = device.remove_file(not_vfio.as_fd()).unwrap_err();
    assert_eq!(err.errno(), Some(libc::ENOENT), "{err}");
}
