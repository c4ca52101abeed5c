//! Serving a device over vfio-user, and guest memory a vfio-user server can
//! map (memfd-backed).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use vfio_backend::user::{serve_connection, UserDevice, UserOptions};
use vfio_backend::Vfio;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::{Error, Result};

/// A client connected to a server thread over a socket pair. Dropping the
/// client ends the server's session; [`Served::join`] waits for it.
#[derive(Debug)]
pub struct Served {
    /// The client side.
    pub client: Arc<UserDevice>,
    server: Option<JoinHandle<vfio_backend::Result<()>>>,
}

impl Served {
    /// Drops the client and waits for the server thread; returns what the
    /// server's session returned.
    pub fn join(mut self) -> Result<()> {
        let server = self.server.take();
        drop(self);
        match server.map(JoinHandle::join) {
            Some(Ok(r)) => Ok(r?),
            Some(Err(_)) => Err(Error::Missing("the server thread panicked".into())),
            None => Ok(()),
        }
    }
}

/// Serves `device` on one end of a socket pair in a new thread and
/// connects a [`UserDevice`] to the other end.
pub fn serve_pair(device: Arc<dyn Vfio>, options: UserOptions) -> Result<Served> {
    let (a, b) = UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
    let server = std::thread::Builder::new()
        .name("bench-vfio-user-server".into())
        .spawn(move || serve_connection(b, device))
        .map_err(|e| Error::io("spawn the server thread", e))?;
    let client = UserDevice::from_stream(a, options)?;
    Ok(Served {
        client: Arc::new(client),
        server: Some(server),
    })
}

/// A sealed-size memfd of `size` bytes (`F_SEAL_SHRINK | F_SEAL_GROW`, as
/// QEMU's `memory-backend-memfd` seals guest RAM, so that a vfio-user
/// server maps it rather than reaching it by file I/O).
pub fn memfd(name: &std::ffi::CStr, size: u64) -> Result<File> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| Error::io("size the memfd", e))?;
    // Neither we nor whoever we share it with may change its size (a peer
    // maps a file only when it cannot shrink under the mapping).
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own; it changes no memory.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(Error::io(
            "seal the memfd's size",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(file)
}

/// Guest RAM of `regions` regions of `size` bytes each, one memfd per
/// region, placed every `2 * size` from guest address 0 (holes between
/// them, as around a PCI hole).
pub fn guest_memory(regions: usize, size: usize) -> Result<GuestMemoryMmap> {
    let mut ranges = Vec::with_capacity(regions);
    for i in 0..regions {
        let f = memfd(c"bench-guest-ram", size as u64)?;
        let gpa = (i as u64)
            .checked_mul(2 * size as u64)
            .ok_or_else(|| Error::Missing("guest memory layout overflows".into()))?;
        ranges.push((GuestAddress(gpa), size, Some(FileOffset::new(f, 0))));
    }
    GuestMemoryMmap::from_ranges_with_files(ranges)
        .map_err(|e| Error::Missing(format!("guest memory: {e}")))
}
