//! The memory behind the fake's BARs is a memfd it shares with whoever maps
//! the BAR (through `region_mmap_fd`, and so through a vfio-user server's
//! region info). Its size is sealed (memfd_create(2), fcntl(2) file seals):
//! a peer handed the fd cannot truncate it under the fake's own mapping,
//! which would kill the fake's next access with SIGBUS, and our vfio-user
//! client, which maps only files sealed against shrinking, maps it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::fs::File;
use std::os::fd::AsRawFd;

use common::*;
use vfio_backend::{Mapping, Vfio};
use vfio_fake_device::{nvme_like, FakeDevice};

/// The nvme-like's data page: mmap-able, outside its register blocks.
const DATA: u64 = 0x2000;

fn seals(f: &File) -> i32 {
    // SAFETY: F_GET_SEALS only reads the seals of a descriptor we own.
    let s = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) };
    assert!(s >= 0, "{}", std::io::Error::last_os_error());
    s
}

#[test]
fn a_bar_fd_handed_out_cannot_be_shrunk_grown_or_resealed_and_the_bar_keeps_working() {
    let d = FakeDevice::profile("nvme-like").unwrap();
    enable_decoding(&d);
    let (fd, off) = d.region_mmap_fd(0).expect("BAR0 is shared");
    // What a peer would do with it: its own file, from a duplicate.
    let peer = File::from(fd.try_clone_to_owned().unwrap());
    let len = peer.metadata().unwrap().len();
    assert!(len >= nvme_like::BAR0_SIZE);

    let s = seals(&peer);
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    assert_eq!(s & want, want, "seals {s:#x}");
    // Shrinking (or growing) a sealed memfd fails with EPERM.
    assert_eq!(
        peer.set_len(0).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    assert_eq!(
        peer.set_len(len + 0x1000).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    assert_eq!(peer.metadata().unwrap().len(), len);
    // F_SEAL_SEAL: no further seal (a write seal would stop our writable
    // mappings and the reset's hole punching).
    // SAFETY: F_ADD_SEALS on a descriptor we own; it changes no memory.
    let rc = unsafe {
        libc::fcntl(
            peer.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_FUTURE_WRITE,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EPERM)
    );

    // The fake's own accesses and a peer's mapping still work.
    bar_write32(&d, 0, DATA, 0x1234_5678);
    assert_eq!(bar_read32(&d, 0, DATA), 0x1234_5678);
    let m = Mapping::map_fd(fd, off + DATA, 0x1000, libc::PROT_READ).unwrap();
    // SAFETY: the mapping is 4 KiB, alive, and backed (the file cannot shrink).
    let v = unsafe { m.as_ptr().cast::<u32>().read_volatile() };
    assert_eq!(v, 0x1234_5678);
}
