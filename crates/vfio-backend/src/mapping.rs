//! An owned memory mapping of (part of) a device region.

use std::os::fd::BorrowedFd;
use std::ptr::NonNull;

use crate::{Error, Result};

/// An mmap of device memory in this process, unmapped when dropped.
#[derive(Debug)]
pub struct Mapping {
    addr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Mapping owns its range of the address space; the memory is
// device (or shared) memory that any thread may access, and the pointer is
// only handed out raw: callers synchronise their own accesses.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only gives out the address and length.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of `fd` at `offset`, shared, with the given
    /// protection (`libc::PROT_*`).
    pub fn map_fd(fd: BorrowedFd<'_>, offset: u64, len: u64, prot: i32) -> Result<Mapping> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Err(Error::InvalidArgument("mmap of zero bytes".into()));
        }
        let len_usize = usize::try_from(len)
            .map_err(|_| Error::InvalidArgument(format!("mmap length {len:#x} too large")))?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| Error::InvalidArgument(format!("mmap offset {offset:#x} too large")))?;
        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL); it
        // cannot alias any Rust object. The fd is borrowed for the call only.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len_usize,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Error::last_os_error(format!(
                "mmap of {len:#x} bytes at offset {offset:#x}"
            )));
        }
        let addr = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| Error::Protocol("mmap returned a null address".into()))?;
        Ok(Mapping {
            addr,
            len: len_usize,
        })
    }

    /// Takes ownership of an existing mapping.
    ///
    /// # Safety
    /// `addr .. addr + len` must be a mapping made with `mmap` that nothing
    /// else unmaps.
    pub unsafe fn from_raw(addr: NonNull<u8>, len: usize) -> Mapping {
        Mapping { addr, len }
    }

    /// The first byte of the mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    /// The length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping (see map_fd / from_raw) and unmap it once.
        let rc = unsafe { libc::munmap(self.addr.as_ptr().cast(), self.len) };
        if rc != 0 {
            log::warn!(
                "munmap of {:#x} bytes at {:p} failed: {}",
                self.len,
                self.addr,
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn mapping_of_a_memfd_shares_its_contents_and_unmaps_on_drop() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        let m = Mapping::map_fd(file.as_fd(), 0, 4096, libc::PROT_READ | libc::PROT_WRITE).unwrap();
        // SAFETY: the mapping is 4096 bytes long and alive.
        unsafe { m.as_ptr().write(0x5a) };
        let mut b = [0u8; 1];
        use std::os::unix::fs::FileExt;
        file.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 0x5a);
        assert_eq!(m.len(), 4096);
    }

    #[test]
    fn zero_length_mapping_is_refused() {
        let file = tempfile::tempfile().unwrap();
        assert!(matches!(
            Mapping::map_fd(file.as_fd(), 0, 0, libc::PROT_READ),
            Err(Error::InvalidArgument(_))
        ));
    }
}
