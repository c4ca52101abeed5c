//! Checks and signalling of interrupt eventfds handed to us by a peer.
//!
//! A device that signals a file descriptor a peer gave it must not be made
//! to block by that peer: a pipe whose buffer is full, or an eventfd whose
//! counter was raised to its maximum (`0xffff_ffff_ffff_fffe`), blocks a
//! plain `write`. So an implementer of [`crate::Vfio`] refuses anything that
//! is not an eventfd ([`check_eventfd`]), switches the ones it keeps to
//! non-blocking mode ([`set_nonblocking`]) before it installs them, and
//! signals with [`signal`], which never waits.
//!
//! `O_NONBLOCK` is a flag of the open file description, which the peer
//! shares (descriptors passed over a socket, or `dup`ed, point to the same
//! description): after [`set_nonblocking`] the peer's own reads of that
//! eventfd no longer wait either. Every consumer of interrupt eventfds in
//! this workspace already creates them with `EFD_NONBLOCK` and polls before
//! reading, KVM's irqfd does not read through the description, and QEMU
//! creates its interrupt notifiers non-blocking too.

use std::os::fd::{AsRawFd, BorrowedFd};

use crate::{Error, Result};

/// What `/proc/self/fd/N` reads for an eventfd.
const EVENTFD_LINK: &str = "anon_inode:[eventfd]";

/// Succeeds if `fd` is an eventfd; anything else (a pipe, a socket, a
/// file, another anonymous inode such as a timerfd) is
/// [`Error::InvalidArgument`] (`EINVAL`, as the kernel's `vfio-pci` answers).
pub fn check_eventfd(fd: BorrowedFd<'_>) -> Result<()> {
    let raw = fd.as_raw_fd();
    let link = std::fs::read_link(format!("/proc/self/fd/{raw}"))
        .map_err(|e| Error::io(format!("identify file descriptor {raw}"), e))?;
    if link.as_os_str() == EVENTFD_LINK {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "file descriptor {raw} is not an eventfd ({})",
            link.display()
        )))
    }
}

/// Sets `O_NONBLOCK` on the open file description of `fd` (shared with
/// every duplicate of it, the peer's included: see the module docs).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor we borrow; no pointers.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::io(
            "F_GETFL of an eventfd",
            std::io::Error::last_os_error(),
        ));
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: F_SETFL on a descriptor we borrow; no pointers.
    if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(Error::io(
            "F_SETFL O_NONBLOCK of an eventfd",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// [`check_eventfd`] then [`set_nonblocking`]: what an eventfd must pass
/// before a device keeps it.
pub fn prepare_eventfd(fd: BorrowedFd<'_>) -> Result<()> {
    check_eventfd(fd)?;
    set_nonblocking(fd)
}

/// Adds 1 to an eventfd's counter without ever waiting. Returns whether
/// the write went through: `false` when the counter is at its maximum (the
/// consumer has an interrupt pending anyway) or the write failed. On a
/// descriptor without `O_NONBLOCK` a full counter would block: call
/// [`prepare_eventfd`] before keeping a descriptor.
pub fn signal(fd: BorrowedFd<'_>) -> bool {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local u64 to a descriptor we
    // borrow; the kernel does not keep the pointer.
    let n = unsafe {
        libc::write(
            fd.as_raw_fd(),
            std::ptr::from_ref(&one).cast::<libc::c_void>(),
            std::mem::size_of::<u64>(),
        )
    };
    n == 8
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    fn eventfd(flags: i32) -> OwnedFd {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, flags | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own, taken over once.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors we own, each taken over once.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    #[test]
    fn an_eventfd_passes_and_a_pipe_a_file_or_a_timerfd_are_einval() {
        check_eventfd(eventfd(0).as_fd()).unwrap();
        let (r, w) = pipe();
        for fd in [r.as_fd(), w.as_fd()] {
            let e = check_eventfd(fd).unwrap_err();
            assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
        }
        let f = tempfile::tempfile().unwrap();
        assert_eq!(
            check_eventfd(f.as_fd()).unwrap_err().errno(),
            Some(libc::EINVAL)
        );
        // SAFETY: timerfd_create takes no pointers; the result is checked.
        let t = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        assert!(t >= 0);
        // SAFETY: a fresh descriptor we own.
        let t = unsafe { OwnedFd::from_raw_fd(t) };
        assert_eq!(
            check_eventfd(t.as_fd()).unwrap_err().errno(),
            Some(libc::EINVAL)
        );
    }

    #[test]
    fn signalling_an_eventfd_whose_counter_is_full_returns_at_once() {
        let fd = eventfd(0);
        prepare_eventfd(fd.as_fd()).unwrap();
        // The largest value an eventfd counter holds.
        let max: u64 = 0xffff_ffff_ffff_fffe;
        // SAFETY: writes 8 bytes from a live u64.
        let n = unsafe { libc::write(fd.as_raw_fd(), std::ptr::from_ref(&max).cast(), 8) };
        assert_eq!(n, 8);
        // Without O_NONBLOCK this write would wait for a reader forever.
        assert!(!signal(fd.as_fd()));
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64.
        let n = unsafe { libc::read(fd.as_raw_fd(), std::ptr::from_mut(&mut v).cast(), 8) };
        assert_eq!((n, v), (8, max));
        assert!(signal(fd.as_fd()));
    }
}
