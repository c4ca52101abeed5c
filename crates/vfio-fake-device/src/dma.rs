//! The fake IOMMU's DMA mappings (received through
//! [`IommuDomain::map`](vfio_backend::IommuDomain::map) and `map_remote` of
//! a [`crate::FakeIommu`]), and the devices' bounds-checked accesses
//! through them.
//!
//! A mapping is reached one of three ways, chosen at map time:
//! - host memory (`host_addr` not 0): loads and stores, under the
//!   domain's mapping lock. The caller keeps the memory mapped until the
//!   domain's `unmap` returns
//!   and does not let it shrink (the in-process VMM owns its RAM; our
//!   vfio-user server passes an address only for files sealed with
//!   `F_SEAL_SHRINK`);
//! - a file (`host_addr` 0): `pread` / `pwrite` on a duplicate of the fd,
//!   so that a file its owner shrinks makes the access come up short (a
//!   [`DmaFault::Unreachable`]) instead of raising `SIGBUS`;
//! - a [`RemoteDma`] (`map_remote`): requests to the memory's owner.
//!
//! Transfers that touch only host memory complete inside the register
//! write that starts them; any other transfer runs on the device's DMA
//! thread after that write returned (see `device.rs`).

use std::fs::File;
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vfio_backend::{Error, RemoteDma, Result};

use crate::template::PAGE_SIZE;

/// Why a device DMA was refused. The code is what the DMA engines report in
/// their error registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaFault {
    /// The transfer leaves the device's own buffer.
    OutOfDeviceRange,
    /// Some IOVA of the transfer is not mapped.
    Unmapped,
    /// The device tried to write a read-only mapping.
    ReadOnly,
    /// The transfer is longer than the engine allows.
    TooLong,
    /// The memory behind a mapping failed the access: its file is shorter
    /// than the mapping (shrunk after the map) or failed the I/O, or its
    /// owner refused, or did not answer in time, a DMA request. Part of
    /// the destination may have been written.
    Unreachable,
    /// Bus Master Enable (command register bit 2) is clear: a function may not
    /// initiate memory transactions (PCI Local Bus 3.0 §6.2.2), so nothing is transferred.
    BusMasterDisabled,
}

impl DmaFault {
    /// The code in the engines' error registers (never 0).
    pub fn code(self) -> u32 {
        match self {
            DmaFault::OutOfDeviceRange => 1,
            DmaFault::Unmapped => 2,
            DmaFault::ReadOnly => 3,
            DmaFault::TooLong => 4,
            DmaFault::Unreachable => 5,
            DmaFault::BusMasterDisabled => 6,
        }
    }
}

/// Most mappings the fake IOMMU holds (the kernel's type1 default).
pub const MAX_DMA_MAPPINGS: usize = 65535;

/// What is behind a mapping.
#[derive(Clone)]
pub(crate) enum Backing {
    /// Host memory at this address in this process.
    Host(u64),
    /// A file (our duplicate of the caller's fd) at this offset.
    File(Arc<File>, u64),
    /// Requests to the memory's owner.
    Remote(Arc<dyn RemoteDma>),
}

impl std::fmt::Debug for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::Host(a) => write!(f, "Host({a:#x})"),
            Backing::File(fd, off) => write!(f, "File(fd {}, offset {off:#x})", fd.as_raw_fd()),
            Backing::Remote(_) => f.write_str("Remote"),
        }
    }
}

/// Where one piece of a transfer goes (see [`DmaMappings::piece`]).
pub(crate) enum Piece {
    /// Host memory at this address.
    Host(u64),
    /// This file at this offset.
    File(Arc<File>, u64),
    /// The owner, at the piece's own IOVA.
    Remote(Arc<dyn RemoteDma>),
}

#[derive(Clone, Debug)]
struct Range {
    iova: u64,
    /// Inclusive last IOVA.
    last: u64,
    backing: Backing,
    read_only: bool,
}

/// The DMA mappings, sorted by IOVA, never overlapping.
#[derive(Debug, Default)]
pub(crate) struct DmaMappings {
    ranges: Vec<Range>,
}

fn refused(context: String, errno: i32) -> Error {
    Error::Refused { context, errno }
}

impl DmaMappings {
    /// No mapping.
    pub(crate) const EMPTY: DmaMappings = DmaMappings { ranges: Vec::new() };

    pub(crate) fn map(
        &mut self,
        iova: u64,
        size: u64,
        backing: Backing,
        read_only: bool,
        allowed: &[RangeInclusive<u64>],
    ) -> Result<()> {
        if size == 0 {
            return Err(Error::InvalidArgument("DMA map of zero bytes".into()));
        }
        let host = match &backing {
            Backing::Host(h) => *h,
            Backing::File(..) | Backing::Remote(_) => 0,
        };
        if (iova | size | host) % PAGE_SIZE != 0 {
            return Err(Error::InvalidArgument(format!(
                "DMA map iova {iova:#x} size {size:#x} host {host:#x}: not {PAGE_SIZE:#x}-aligned"
            )));
        }
        let last = iova
            .checked_add(size - 1)
            .ok_or_else(|| Error::InvalidArgument("DMA map wraps the IOVA space".into()))?;
        host.checked_add(size - 1)
            .ok_or_else(|| Error::InvalidArgument("DMA map wraps the address space".into()))?;
        if let Backing::File(_, off) = &backing {
            off.checked_add(size - 1)
                .ok_or_else(|| Error::InvalidArgument("DMA map wraps the file".into()))?;
        }
        if !allowed
            .iter()
            .any(|r| r.contains(&iova) && r.contains(&last))
        {
            return Err(Error::InvalidArgument(format!(
                "DMA map {iova:#x}..={last:#x} outside the IOMMU's IOVA ranges"
            )));
        }
        let pos = self.ranges.partition_point(|r| r.iova < iova);
        let clash_prev = pos
            .checked_sub(1)
            .and_then(|p| self.ranges.get(p))
            .is_some_and(|r| r.last >= iova);
        let clash_next = self.ranges.get(pos).is_some_and(|r| r.iova <= last);
        if clash_prev || clash_next {
            return Err(refused(
                format!("DMA map {iova:#x}..={last:#x} overlaps an existing mapping"),
                libc::EEXIST,
            ));
        }
        if self.ranges.len() >= MAX_DMA_MAPPINGS {
            return Err(refused("DMA map: too many mappings".into(), libc::ENOSPC));
        }
        self.ranges.insert(
            pos,
            Range {
                iova,
                last,
                backing,
                read_only,
            },
        );
        Ok(())
    }

    /// Removes every mapping inside `iova .. iova + size`. A mapping that
    /// straddles an edge is refused (`EINVAL`, as type1v2 does); no mapping
    /// at all is `ENOENT`.
    pub(crate) fn unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        if size == 0 {
            return Err(Error::InvalidArgument("DMA unmap of zero bytes".into()));
        }
        let last = iova
            .checked_add(size - 1)
            .ok_or_else(|| Error::InvalidArgument("DMA unmap wraps the IOVA space".into()))?;
        let straddles = self
            .ranges
            .iter()
            .any(|r| r.iova <= last && r.last >= iova && (r.iova < iova || r.last > last));
        if straddles {
            return Err(refused(
                format!("DMA unmap {iova:#x}..={last:#x} would split a mapping"),
                libc::EINVAL,
            ));
        }
        let before = self.ranges.len();
        self.ranges.retain(|r| r.last < iova || r.iova > last);
        if self.ranges.len() == before {
            return Err(refused(
                format!("DMA unmap {iova:#x}..={last:#x}: nothing mapped there"),
                libc::ENOENT,
            ));
        }
        Ok(())
    }

    /// Whether every mapping lies inside one of `ranges`.
    pub(crate) fn all_inside(&self, ranges: &[RangeInclusive<u64>]) -> bool {
        self.ranges.iter().all(|m| {
            ranges
                .iter()
                .any(|r| r.contains(&m.iova) && r.contains(&m.last))
        })
    }

    /// Number of mappings.
    pub(crate) fn len(&self) -> usize {
        self.ranges.len()
    }

    fn find(&self, iova: u64) -> Option<&Range> {
        let pos = self.ranges.partition_point(|r| r.iova <= iova);
        let r = self.ranges.get(pos.checked_sub(1)?)?;
        (r.last >= iova).then_some(r)
    }

    /// Checks that `iova .. iova + len` is mapped (and writable when
    /// `write`), possibly across several adjacent mappings.
    pub(crate) fn check(
        &self,
        iova: u64,
        len: u64,
        write: bool,
    ) -> std::result::Result<(), DmaFault> {
        if len == 0 {
            return Ok(());
        }
        iova.checked_add(len - 1).ok_or(DmaFault::Unmapped)?;
        let mut done = 0u64;
        while done < len {
            let (_, n) = self.piece(iova + done, len - done, write)?;
            done += n;
        }
        Ok(())
    }

    /// Whether all of `iova .. iova + len` is host memory the device may
    /// reach with loads and stores (after [`DmaMappings::check`] passed).
    pub(crate) fn all_host(&self, iova: u64, len: u64) -> bool {
        let mut done = 0u64;
        while done < len {
            let Some(cur) = iova.checked_add(done) else {
                return false;
            };
            let Some(r) = self.find(cur) else {
                return false;
            };
            if !matches!(r.backing, Backing::Host(_)) {
                return false;
            }
            done = done.saturating_add(r.last - cur + 1);
        }
        true
    }

    /// The first piece of `iova .. iova + len`: where it is and how many
    /// bytes (at most `len`, at least 1 when `len` > 0) lie in that one
    /// mapping.
    pub(crate) fn piece(
        &self,
        iova: u64,
        len: u64,
        write: bool,
    ) -> std::result::Result<(Piece, u64), DmaFault> {
        let r = self.find(iova).ok_or(DmaFault::Unmapped)?;
        if write && r.read_only {
            return Err(DmaFault::ReadOnly);
        }
        let into = iova - r.iova;
        let n = (r.last - iova).saturating_add(1).min(len);
        let piece = match &r.backing {
            Backing::Host(h) => Piece::Host(h + into),
            Backing::File(fd, off) => Piece::File(Arc::clone(fd), off + into),
            Backing::Remote(rem) => Piece::Remote(Arc::clone(rem)),
        };
        Ok((piece, n))
    }

    /// Calls `f(host_addr, done, chunk)` for each piece of the range after
    /// checking all of it. Only for host memory: a piece behind a file or a
    /// [`RemoteDma`] fails with [`DmaFault::Unreachable`] before anything
    /// is copied (such transfers go through [`DmaMappings::piece`]).
    fn walk(
        &self,
        iova: u64,
        len: u64,
        write: bool,
        mut f: impl FnMut(u64, u64, u64),
    ) -> std::result::Result<(), DmaFault> {
        if len == 0 {
            return Ok(());
        }
        iova.checked_add(len - 1).ok_or(DmaFault::Unmapped)?;
        for pass in 0..2 {
            let mut done = 0u64;
            while done < len {
                let cur = iova + done;
                let r = self.find(cur).ok_or(DmaFault::Unmapped)?;
                if write && r.read_only {
                    return Err(DmaFault::ReadOnly);
                }
                let Backing::Host(host) = r.backing else {
                    return Err(DmaFault::Unreachable);
                };
                let avail = r.last - cur + 1; // cannot overflow: the range is < 2^64 long
                let chunk = avail.min(len - done);
                if pass == 1 {
                    f(host + (cur - r.iova), done, chunk);
                }
                done += chunk;
            }
        }
        Ok(())
    }

    /// Copies `len` bytes at `iova` to `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for `len` bytes of writes. The host memory behind
    /// the mappings must still be mapped: the contract of `IommuDomain::map` is that
    /// the caller keeps it mapped until the domain's `unmap` returns, and
    /// callers hold the domain's mapping lock that `unmap` takes.
    pub(crate) unsafe fn read(
        &self,
        iova: u64,
        dst: *mut u8,
        len: u64,
    ) -> std::result::Result<(), DmaFault> {
        self.walk(iova, len, false, |host, done, chunk| {
            // SAFETY: `host .. host + chunk` lies in a live DMA mapping (see
            // the function's contract); `dst + done .. + chunk` is inside the
            // caller's buffer since done + chunk <= len. Guest memory and the
            // device buffer never overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    host as usize as *const u8,
                    dst.add(done as usize),
                    chunk as usize,
                )
            }
        })
    }

    /// Copies `len` bytes from `src` to `iova`.
    ///
    /// # Safety
    /// `src` must be valid for `len` bytes of reads; the mappings' memory
    /// must be live, as for [`DmaMappings::read`].
    pub(crate) unsafe fn write(
        &self,
        iova: u64,
        src: *const u8,
        len: u64,
    ) -> std::result::Result<(), DmaFault> {
        self.walk(iova, len, true, |host, done, chunk| {
            // SAFETY: as in `read`, with the roles of the two buffers swapped.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.add(done as usize),
                    host as usize as *mut u8,
                    chunk as usize,
                )
            }
        })
    }

    /// Copies `len` bytes from IOVA `src` to IOVA `dst` through a small
    /// stack buffer (no allocation).
    pub(crate) fn copy(&self, src: u64, dst: u64, len: u64) -> std::result::Result<(), DmaFault> {
        self.check(src, len, false)?;
        self.check(dst, len, true)?;
        let mut buf = [0u8; 512];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64);
            // SAFETY: `buf` holds at least `n` bytes; the mapped memory is
            // live for the whole call (the caller holds the mapping lock).
            unsafe {
                self.read(src + done, buf.as_mut_ptr(), n)?;
                self.write(dst + done, buf.as_ptr(), n)?;
            }
            done += n;
        }
        Ok(())
    }
}
