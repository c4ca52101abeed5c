//! The fake IOMMU: DMA mappings received through `dma_map`, and the device's
//! bounds-checked accesses through them.

use std::ops::RangeInclusive;

use vfio_backend::{Error, Result};

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
            DmaFault::BusMasterDisabled => 5,
        }
    }
}

/// Most mappings the fake IOMMU holds (the kernel's type1 default).
pub const MAX_DMA_MAPPINGS: usize = 65535;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    iova: u64,
    /// Inclusive last IOVA.
    last: u64,
    host: u64,
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
    pub(crate) fn map(
        &mut self,
        iova: u64,
        size: u64,
        host: u64,
        read_only: bool,
        allowed: &[RangeInclusive<u64>],
    ) -> Result<()> {
        if size == 0 {
            return Err(Error::InvalidArgument("DMA map of zero bytes".into()));
        }
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
                host,
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
        self.walk(iova, len, write, |_, _, _| {})
    }

    /// Calls `f(host_addr, done, chunk)` for each piece of the range after
    /// checking all of it.
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
                let avail = r.last - cur + 1; // cannot overflow: the range is < 2^64 long
                let chunk = avail.min(len - done);
                if pass == 1 {
                    f(r.host + (cur - r.iova), done, chunk);
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
    /// the mappings must still be mapped: the contract of `dma_map` is that
    /// the caller keeps it mapped until `dma_unmap` returns, and callers
    /// hold the device lock that `dma_unmap` takes.
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
            // live for the whole call (the caller holds the device lock).
            unsafe {
                self.read(src + done, buf.as_mut_ptr(), n)?;
                self.write(dst + done, buf.as_ptr(), n)?;
            }
            done += n;
        }
        Ok(())
    }
}
