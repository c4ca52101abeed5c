//! `KvmGuestMapper` against this machine's /dev/kvm: KVM user memory slots
//! (Documentation/virt/kvm/api.rst, KVM_SET_USER_MEMORY_REGION). Every test skips, with a
//! message, where /dev/kvm cannot be opened.
#![cfg(feature = "kvm")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::ErrorKind;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use vfio_passthrough::kvm::KvmGuestMapper;
use vfio_pci::{GuestMapper, MappingId};

const PAGE: u64 = 4096;
/// A slot number outside every mapper's range here: the VMM's own.
const VMM_SLOT: u32 = 0;

fn vm() -> Option<Arc<VmFd>> {
    match Kvm::new() {
        Ok(kvm) => Some(Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"))),
        Err(e) => {
            eprintln!("skipped: cannot open /dev/kvm: {e}");
            None
        }
    }
}

/// `pages` pages of a memfd, mapped shared in this process.
struct HostPages {
    ptr: *mut u8,
    len: usize,
}

impl HostPages {
    fn new(pages: usize) -> Self {
        let len = pages * PAGE as usize;
        // SAFETY: plain syscalls on a name we own; results are checked.
        unsafe {
            let fd = libc::memfd_create(c"kvm-mapper-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, len as i64), 0);
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            assert_ne!(ptr, libc::MAP_FAILED);
            libc::close(fd);
            Self {
                ptr: ptr.cast(),
                len,
            }
        }
    }

    fn page(&self, n: usize) -> *mut u8 {
        assert!(n * (PAGE as usize) < self.len);
        self.ptr.wrapping_add(n * PAGE as usize)
    }
}

impl Drop for HostPages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Whether KVM lets the VMM put its own slot at `gpa`: it refuses (EEXIST) a slot that overlaps
/// an existing one. The probe slot is deleted again.
fn gpa_is_free_in_kvm(vm: &VmFd, gpa: u64, host: &HostPages) -> bool {
    let region = kvm_userspace_memory_region {
        slot: VMM_SLOT,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: PAGE,
        userspace_addr: host.page(0) as u64,
    };
    // SAFETY: `host` outlives the probe slot, which is deleted before returning.
    match unsafe { vm.set_user_memory_region(region) } {
        Ok(()) => {
            let delete = kvm_userspace_memory_region {
                memory_size: 0,
                ..region
            };
            // SAFETY: deleting the slot made just above.
            unsafe { vm.set_user_memory_region(delete) }.unwrap();
            true
        }
        Err(e) if e.errno() == libc::EEXIST => false,
        Err(e) => panic!("unexpected KVM_SET_USER_MEMORY_REGION error: {e}"),
    }
}

/// Maps through the trait.
fn map(
    mapper: &KvmGuestMapper,
    gpa: u64,
    size: u64,
    host: *mut u8,
    read_only: bool,
) -> std::io::Result<MappingId> {
    // SAFETY: every test declares its `HostPages` before the mapper, so the
    // pages stay mapped for as long as any slot of the mapper (which
    // deletes its slots when dropped) may point at them.
    unsafe { mapper.map(gpa, size, host, read_only) }
}

#[test]
fn a_mapping_is_a_kvm_memory_slot_from_the_vmm_range() {
    let Some(vm) = vm() else { return };
    let host = HostPages::new(2);
    let probe = HostPages::new(1);
    let mapper = KvmGuestMapper::new(vm.clone(), 10..12).unwrap();
    assert!(gpa_is_free_in_kvm(&vm, 0x10_0000, &probe));
    let id = map(&mapper, 0x10_0000, 2 * PAGE, host.page(0), false).unwrap();
    assert!((10..12).contains(&mapper.slot_of(id).unwrap()));
    assert!(
        !gpa_is_free_in_kvm(&vm, 0x10_0000, &probe),
        "KVM has the slot"
    );
    assert!(!gpa_is_free_in_kvm(&vm, 0x10_1000, &probe), "both pages");
    assert!(gpa_is_free_in_kvm(&vm, 0x10_2000, &probe), "and no more");
}

#[test]
fn an_overlapping_mapping_is_refused_and_changes_nothing() {
    let Some(vm) = vm() else { return };
    let host = HostPages::new(2);
    let mapper = KvmGuestMapper::new(vm, 10..20).unwrap();
    map(&mapper, 0x10_0000, 2 * PAGE, host.page(0), false).unwrap();
    let err = map(&mapper, 0x10_1000, PAGE, host.page(1), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    let err = map(&mapper, 0x0f_f000, 2 * PAGE, host.page(0), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
    assert_eq!(mapper.mapping_count(), 1);
    // Adjacent is not overlapping.
    map(&mapper, 0x10_2000, PAGE, host.page(1), false).unwrap();
}

#[test]
fn kvm_refuses_a_mapping_over_a_vmm_slot_and_the_slot_number_is_not_lost() {
    let Some(vm) = vm() else { return };
    let host = HostPages::new(1);
    let vmm_page = HostPages::new(1);
    let region = kvm_userspace_memory_region {
        slot: VMM_SLOT,
        flags: 0,
        guest_phys_addr: 0x20_0000,
        memory_size: PAGE,
        userspace_addr: vmm_page.page(0) as u64,
    };
    // SAFETY: `vmm_page` outlives the VM's use of it (the VM is dropped first, below).
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let mapper = KvmGuestMapper::new(vm.clone(), 10..11).unwrap();
    let err = map(&mapper, 0x20_0000, PAGE, host.page(0), false).unwrap_err();
    let source = err.into_inner().unwrap();
    let ours = source.downcast_ref::<vfio_passthrough::Error>().unwrap();
    assert_eq!(ours.errno(), Some(libc::EEXIST));
    // The only slot of the range is still free.
    let id = map(&mapper, 0x30_0000, PAGE, host.page(0), false).unwrap();
    assert_eq!(mapper.slot_of(id), Some(10));
    drop(mapper);
    drop(vm);
}

#[test]
fn unmap_deletes_the_slot_and_frees_its_number_for_reuse() {
    let Some(vm) = vm() else { return };
    let host = HostPages::new(2);
    let probe = HostPages::new(1);
    let mapper = KvmGuestMapper::new(vm.clone(), 7..8).unwrap();
    let a = map(&mapper, 0x10_0000, PAGE, host.page(0), false).unwrap();
    let err = map(&mapper, 0x40_0000, PAGE, host.page(1), false).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::OutOfMemory, "one slot only: {err}");

    mapper.unmap(a).unwrap();
    assert!(
        gpa_is_free_in_kvm(&vm, 0x10_0000, &probe),
        "KVM deleted the slot"
    );
    let b = map(&mapper, 0x40_0000, PAGE, host.page(1), false).unwrap();
    assert_eq!(mapper.slot_of(b), Some(7));
    assert_eq!(mapper.slot_of(a), None);
    assert_eq!(mapper.unmap(a).unwrap_err().kind(), ErrorKind::NotFound);
}

#[test]
fn dropping_the_mapper_deletes_the_slots_it_still_holds() {
    let Some(vm) = vm() else { return };
    let host = HostPages::new(1);
    let probe = HostPages::new(1);
    let mapper = KvmGuestMapper::new(vm.clone(), 3..5).unwrap();
    map(&mapper, 0x10_0000, PAGE, host.page(0), false).unwrap();
    drop(mapper);
    assert!(gpa_is_free_in_kvm(&vm, 0x10_0000, &probe));
}

#[test]
fn unaligned_empty_or_wrapping_ranges_are_refused_before_kvm() {
    let Some(vm) = vm() else { return };
    let host = HostPages::new(2);
    let mapper = KvmGuestMapper::new(vm, 3..5).unwrap();
    let cases = [
        (0x10_0000, 0, host.page(0)),
        (0x10_0800, PAGE, host.page(0)),
        (0x10_0000, 0x800, host.page(0)),
        (0x10_0000, PAGE, host.page(0).wrapping_add(16)),
        (u64::MAX - PAGE + 1, 2 * PAGE, host.page(0)),
    ];
    for (gpa, size, ptr) in cases {
        let err = map(&mapper, gpa, size, ptr, false).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{gpa:#x}+{size:#x}");
    }
    assert_eq!(mapper.mapping_count(), 0);
    let empty = KvmGuestMapper::new(Arc::new(Kvm::new().unwrap().create_vm().unwrap()), 4..4);
    assert!(matches!(
        empty,
        Err(vfio_passthrough::Error::Invalid {
            reason: "the slot range is empty",
            ..
        })
    ));
}

#[test]
fn a_read_only_mapping_uses_kvm_mem_readonly_or_asks_to_trap() {
    let Some(vm) = vm() else { return };
    let host = HostPages::new(1);
    let mapper = KvmGuestMapper::new(vm, 3..5).unwrap();
    match map(&mapper, 0x10_0000, PAGE, host.page(0), true) {
        Ok(id) => {
            assert!(mapper.readonly_supported());
            mapper.unmap(id).unwrap();
        }
        Err(e) => {
            assert!(!mapper.readonly_supported());
            assert_eq!(e.kind(), ErrorKind::Unsupported);
        }
    }
}

#[test]
fn mapping_ids_are_not_reused() {
    let Some(vm) = vm() else { return };
    let host = HostPages::new(1);
    let mapper = KvmGuestMapper::new(vm, 3..4).unwrap();
    let a = map(&mapper, 0x10_0000, PAGE, host.page(0), false).unwrap();
    mapper.unmap(a).unwrap();
    let b: MappingId = map(&mapper, 0x10_0000, PAGE, host.page(0), false).unwrap();
    assert_ne!(a, b, "a stale id must not unmap a newer mapping");
    let err = mapper.unmap(a).unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::NotFound,
        "a stale id is unknown: {err}"
    );
    assert_eq!(mapper.mapping_count(), 1);
}
