//! The memory behind a BAR: a memfd mapped once into this process, shared
//! with whoever else maps it. Its size is sealed once set (`F_SEAL_SHRINK`,
//! `F_SEAL_GROW`, `F_SEAL_SEAL`): whoever we share it with cannot shrink it
//! under our mapping, and a vfio-user client may safely map it.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use vfio_backend::{Mapping, SparseArea};

use crate::error::{FakeError, FakeResult};
use crate::template::{BarKind, BarSpec, RegisterBlock, PAGE_SIZE};

#[derive(Debug)]
pub(crate) struct Bar {
    pub spec: BarSpec,
    file: File,
    map: Mapping,
    len: u64,
    /// Register blocks of this BAR, sorted by offset.
    pub blocks: Vec<RegisterBlock>,
    /// mmap-able areas (empty when the BAR cannot be mmapped).
    pub areas: Vec<SparseArea>,
    /// Whether the areas are a strict subset (report a sparse-mmap cap).
    pub sparse: bool,
}

fn memfd(name: &str, len: u64) -> FakeResult<File> {
    let cname = std::ffi::CString::new(name).map_err(|_| FakeError::Io {
        context: "memfd name".into(),
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    })?;
    // SAFETY: memfd_create reads a NUL-terminated string that lives across
    // the call and returns a new fd or -1.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(FakeError::Io {
            context: format!("memfd_create for {name}"),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len).map_err(|source| FakeError::Io {
        context: format!("sizing {name} to {len:#x} bytes"),
        source,
    })?;
    // Its size is final: a client we hand the fd to cannot truncate it
    // under our own mapping (our next access would die of SIGBUS), and our
    // vfio-user client maps only files sealed against shrinking.
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a descriptor we own; it changes no memory.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(FakeError::Io {
            context: format!("sealing the size of {name}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// The mmap-able areas of a BAR: memory BARs of at least a page, minus the
/// pages that hold register blocks.
fn layout(spec: &BarSpec, blocks: &[RegisterBlock]) -> (Vec<SparseArea>, bool) {
    if spec.kind == BarKind::Io || spec.size < PAGE_SIZE {
        return (Vec::new(), false);
    }
    let mut areas = Vec::new();
    let mut cur = 0u64;
    for b in blocks {
        let start = b.offset - b.offset % PAGE_SIZE;
        let end = b
            .offset
            .saturating_add(b.size)
            .next_multiple_of(PAGE_SIZE)
            .min(spec.size);
        if start > cur {
            areas.push(SparseArea {
                offset: cur,
                size: start - cur,
            });
        }
        cur = cur.max(end);
    }
    if cur < spec.size {
        areas.push(SparseArea {
            offset: cur,
            size: spec.size - cur,
        });
    }
    let sparse = !blocks.is_empty();
    (areas, sparse)
}

impl Bar {
    pub(crate) fn new(index: usize, spec: BarSpec, blocks: Vec<RegisterBlock>) -> FakeResult<Bar> {
        let len = spec.size.max(PAGE_SIZE);
        let file = memfd(&format!("vfio-fake-bar{index}"), len)?;
        let map = Mapping::map_fd(file.as_fd(), 0, len, libc::PROT_READ | libc::PROT_WRITE)?;
        let (areas, sparse) = layout(&spec, &blocks);
        Ok(Bar {
            spec,
            file,
            map,
            len,
            blocks,
            areas,
            sparse,
        })
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Bytes of memory behind the BAR (its size, at least a page).
    pub(crate) fn mem_len(&self) -> u64 {
        self.len
    }

    pub(crate) fn mmappable(&self) -> bool {
        !self.areas.is_empty()
    }

    /// Pointer to `off .. off + len` of the BAR memory, if inside it.
    fn span(&self, off: u64, len: usize) -> Option<*mut u8> {
        let end = off.checked_add(len as u64)?;
        if end > self.len {
            return None;
        }
        let off = usize::try_from(off).ok()?;
        // SAFETY: off + len <= the mapping's length (checked above), so the
        // result points inside (or one past the end of) our live mapping.
        Some(unsafe { self.map.as_ptr().add(off) })
    }

    /// Raw pointer for DMA into/out of the BAR (`None` if out of range).
    pub(crate) fn ptr(&self, off: u64, len: usize) -> Option<*mut u8> {
        self.span(off, len)
    }

    pub(crate) fn read(&self, off: u64, out: &mut [u8]) -> bool {
        let Some(p) = self.span(off, out.len()) else {
            return false;
        };
        // SAFETY: `p .. p + len` is inside the mapping (span); `out` is a
        // separate Rust buffer. The memory is shared with other mappers:
        // their concurrent writes may tear, as on a real device.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        true
    }

    pub(crate) fn write(&self, off: u64, data: &[u8]) -> bool {
        let Some(p) = self.span(off, data.len()) else {
            return false;
        };
        // SAFETY: as in `read`, the other way round.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        true
    }

    pub(crate) fn read_u32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn write_u32(&self, off: u64, v: u32) {
        self.write(off, &v.to_le_bytes());
    }

    pub(crate) fn read_u64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.read(off, &mut b);
        u64::from_le_bytes(b)
    }

    pub(crate) fn write_u64(&self, off: u64, v: u64) {
        self.write(off, &v.to_le_bytes());
    }

    /// Zeroes the whole BAR memory, freeing its pages where possible.
    pub(crate) fn zero(&self) {
        let len = libc::off_t::try_from(self.len).unwrap_or(0);
        // SAFETY: punching a hole in our own memfd; mappings stay valid and
        // read zeros afterwards.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                len,
            )
        };
        if rc != 0 {
            if let Some(p) = self.span(0, self.len as usize) {
                // SAFETY: the whole mapping, which is live.
                unsafe { std::ptr::write_bytes(p, 0, self.len as usize) };
            }
        }
    }
}
