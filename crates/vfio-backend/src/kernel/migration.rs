//! Migration v2 on a kernel device fd: the `VFIO_DEVICE_FEATURE` calls
//! behind [`KernelDevice`](super::KernelDevice)'s migration methods, the
//! data fd the kernel returns as a [`MigrationStream`], device DMA logging,
//! and the argument checks they all make before an ioctl.
//!
//! The state machine is the kernel's (`vfio_mig_get_next_state()`): a set
//! to a state that is not one arc away takes the shortest path of arcs, with
//! no saving state (PRE_COPY, PRE_COPY_P2P, STOP_COPY) in its interior, and
//! returns the data fd of its last arc when that arc opens a session (STOP
//! -> STOP_COPY, RUNNING -> PRE_COPY, RUNNING_P2P -> PRE_COPY_P2P, STOP ->
//! RESUMING). PRE_COPY_P2P -> STOP_COPY keeps the pre-copy session's fd. The
//! kernel refuses ERROR as a target, the optional states a device lacks,
//! and STOP_COPY -> PRE_COPY / PRE_COPY_P2P (`EINVAL`); a refused or failed
//! set leaves the device in its state or in one along the path, which
//! [`Vfio::mig_state`](crate::Vfio::mig_state) reports.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use vfio_bindings::bindings::vfio as uapi;

use super::ioctls::{self, MAX_DMA_LOGGING_RANGES, MIN_DMA_LOGGING_PAGE};
use crate::migration::bitmap_words;
use crate::{DirtyRange, Error, MigState, MigrationFlags, MigrationStream, PrecopyInfo, Result};

/// How often a read or write of the data fd interrupted by a signal is
/// retried before giving up.
const MAX_EINTR_RETRIES: usize = 16;
/// How many consecutive zero-byte writes into a RESUMING session are taken
/// before the write is reported as stuck.
const MAX_ZERO_WRITES: usize = 4;

/// The device's migration flags, `None` when it cannot migrate.
pub(crate) fn migration_flags(fd: BorrowedFd<'_>, name: &str) -> Result<Option<MigrationFlags>> {
    ioctls::device_migration_flags(fd)
        .map(|f| f.map(MigrationFlags))
        .map_err(|e| super::prefix_error(e, name))
}

/// The device's migration state.
pub(crate) fn mig_state(fd: BorrowedFd<'_>, name: &str) -> Result<MigState> {
    let raw = ioctls::device_mig_state(fd).map_err(|e| super::prefix_error(e, name))?;
    MigState::from_raw(raw).ok_or_else(|| Error::Io {
        context: format!("{name}: VFIO_DEVICE_FEATURE MIG_DEVICE_STATE get"),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the kernel reports migration state {raw}, which the uAPI does not define"),
        ),
    })
}

/// Moves the device to `state`; the session's data fd as a stream when the
/// last arc opened one.
pub(crate) fn set_mig_state(
    fd: BorrowedFd<'_>,
    name: &str,
    state: MigState,
) -> Result<Option<Box<dyn MigrationStream>>> {
    let data = ioctls::device_set_mig_state(fd, state.raw(), state.name())
        .map_err(|e| super::prefix_error(e, name))?;
    Ok(data.map(|fd| {
        Box::new(KernelMigrationStream::new(
            fd,
            format!("{name}: {state} data fd"),
        )) as Box<dyn MigrationStream>
    }))
}

/// The estimated STOP_COPY length.
pub(crate) fn mig_data_size(fd: BorrowedFd<'_>, name: &str) -> Result<u64> {
    ioctls::device_mig_data_size(fd).map_err(|e| super::prefix_error(e, name))
}

/// Whether the device logs its DMA writes (`DMA_LOGGING_START` probed).
pub(crate) fn dma_logging_supported(fd: BorrowedFd<'_>) -> Result<bool> {
    ioctls::device_feature_probe(
        fd,
        uapi::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        uapi::VFIO_DEVICE_FEATURE_SET,
    )
}

/// Checks a DMA logging page size: a power of two of at least 4 KiB.
fn check_logging_page(what: &str, page_size: u64) -> Result<()> {
    if page_size < MIN_DMA_LOGGING_PAGE || !page_size.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "{what}: page size {page_size:#x} is not a power of two of at least \
             {MIN_DMA_LOGGING_PAGE:#x}"
        )));
    }
    Ok(())
}

/// Checks and converts the ranges of a `DMA_LOGGING_START`: 1 to
/// [`MAX_DMA_LOGGING_RANGES`] non-empty ranges, aligned to `page_size`, not
/// wrapping and not overlapping (what the kernel would refuse, refused here
/// before anything is built).
pub(crate) fn logging_ranges(
    page_size: u64,
    ranges: &[DirtyRange],
) -> Result<Vec<uapi::vfio_device_feature_dma_logging_range>> {
    const WHAT: &str = "DMA logging start";
    check_logging_page(WHAT, page_size)?;
    crate::migration::check_logging_ranges(page_size, ranges, MAX_DMA_LOGGING_RANGES)
        .map_err(|e| Error::InvalidArgument(format!("{WHAT}: {e}")))?;
    Ok(ranges
        .iter()
        .map(|r| uapi::vfio_device_feature_dma_logging_range {
            iova: r.iova,
            length: r.length,
        })
        .collect())
}

/// Checks a dirty-bitmap request (`what` names it): a non-empty range that
/// does not wrap, aligned to a power-of-two `page_size`, and a bitmap of at
/// least one bit per page. Returns the words the report fills.
pub(crate) fn check_bitmap_request(
    what: &str,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap_len: usize,
) -> Result<usize> {
    let Some(words) = bitmap_words(length, page_size) else {
        return Err(Error::InvalidArgument(format!(
            "{what}: page size {page_size:#x} is not a power of two"
        )));
    };
    if length == 0 || iova.checked_add(length - 1).is_none() {
        return Err(Error::InvalidArgument(format!(
            "{what}: range of {length:#x} bytes at IOVA {iova:#x} is empty or wraps around"
        )));
    }
    if iova % page_size != 0 || length % page_size != 0 {
        return Err(Error::InvalidArgument(format!(
            "{what}: range of {length:#x} bytes at IOVA {iova:#x} is not aligned to the \
             {page_size:#x}-byte page"
        )));
    }
    if bitmap_len < words {
        return Err(Error::InvalidArgument(format!(
            "{what}: a bitmap of {bitmap_len} words is too small for {length:#x} bytes at \
             {page_size:#x}-byte pages ({words} words)"
        )));
    }
    Ok(words)
}

/// Starts device DMA logging; returns the page size the device chose.
pub(crate) fn dma_logging_start(
    fd: BorrowedFd<'_>,
    name: &str,
    page_size: u64,
    ranges: &[DirtyRange],
) -> Result<u64> {
    let ranges = logging_ranges(page_size, ranges).map_err(|e| super::prefix_error(e, name))?;
    ioctls::device_dma_logging_start(fd, page_size, &ranges)
        .map_err(|e| super::prefix_error(e, name))
}

/// Stops device DMA logging.
pub(crate) fn dma_logging_stop(fd: BorrowedFd<'_>, name: &str) -> Result<()> {
    ioctls::device_dma_logging_stop(fd).map_err(|e| super::prefix_error(e, name))
}

/// Reads and clears the device's DMA log of `iova .. iova + length` into
/// `bitmap` (cleared first: the kernel only sets bits).
pub(crate) fn dma_logging_report(
    fd: BorrowedFd<'_>,
    name: &str,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> Result<()> {
    const WHAT: &str = "DMA logging report";
    check_logging_page(WHAT, page_size).map_err(|e| super::prefix_error(e, name))?;
    let words = check_bitmap_request(WHAT, iova, length, page_size, bitmap.len())
        .map_err(|e| super::prefix_error(e, name))?;
    let bitmap = bitmap.get_mut(..words).unwrap_or_default();
    bitmap.fill(0);
    ioctls::device_dma_logging_report(fd, iova, length, page_size, bitmap)
        .map_err(|e| super::prefix_error(e, name))
}

/// A migration session's data fd (`data_fd` of
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`): read in the saving states,
/// written while RESUMING. Closing it (dropping the stream) ends the
/// session on the user's side.
#[derive(Debug)]
pub struct KernelMigrationStream {
    file: File,
    name: String,
}

impl KernelMigrationStream {
    /// Wraps a data fd; `name` goes into errors.
    pub(crate) fn new(fd: OwnedFd, name: String) -> Self {
        KernelMigrationStream {
            file: File::from(fd),
            name,
        }
    }
}

impl AsFd for KernelMigrationStream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Reads from a data fd: retries `EINTR` (bounded), and reads "no data now"
/// (`ENOMSG`, the temporary end of a PRE_COPY stream) as `Ok(0)`, like the
/// permanent end of STOP_COPY.
fn read_data(file: &mut impl Read, name: &str, buf: &mut [u8]) -> Result<usize> {
    for _ in 0..MAX_EINTR_RETRIES {
        match file.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOMSG) => return Ok(0),
            Err(e) => return Err(Error::io(format!("{name}: read"), e)),
        }
    }
    Err(Error::io(
        format!("{name}: read"),
        std::io::Error::from_raw_os_error(libc::EINTR),
    ))
}

/// Writes all of `data` into a data fd: short writes continue where they
/// stopped, `EINTR` is retried and a write that keeps taking nothing is an
/// error (all bounded).
fn write_all_data(file: &mut impl Write, name: &str, mut data: &[u8]) -> Result<()> {
    let mut interrupted = 0;
    let mut zero = 0;
    while !data.is_empty() {
        match file.write(data) {
            Ok(0) => {
                zero += 1;
                if zero >= MAX_ZERO_WRITES {
                    return Err(Error::io(
                        format!("{name}: write ({} bytes left)", data.len()),
                        std::io::Error::from(std::io::ErrorKind::WriteZero),
                    ));
                }
            }
            Ok(n) => {
                zero = 0;
                data = data.get(n..).unwrap_or_default();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                interrupted += 1;
                if interrupted >= MAX_EINTR_RETRIES {
                    return Err(Error::io(format!("{name}: write"), e));
                }
            }
            Err(e) => {
                return Err(Error::io(
                    format!("{name}: write ({} bytes left)", data.len()),
                    e,
                ))
            }
        }
    }
    Ok(())
}

impl MigrationStream for KernelMigrationStream {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        read_data(&mut self.file, &self.name, buf)
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        write_all_data(&mut self.file, &self.name, data)
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo> {
        let (initial_bytes, dirty_bytes) = ioctls::mig_precopy_info(self.file.as_fd())
            .map_err(|e| super::prefix_error(e, &self.name))?;
        Ok(PrecopyInfo {
            initial_bytes,
            dirty_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader/writer scripted with results, one per call.
    struct Script {
        reads: Vec<std::io::Result<usize>>,
        writes: Vec<std::io::Result<usize>>,
        written: Vec<u8>,
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let r = self.reads.remove(0);
            if let Ok(n) = r {
                buf[..n].fill(0xab);
            }
            r
        }
    }

    impl Write for Script {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let r = self.writes.remove(0);
            if let Ok(n) = r {
                self.written.extend_from_slice(&data[..n]);
            }
            r
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn script(reads: Vec<std::io::Result<usize>>, writes: Vec<std::io::Result<usize>>) -> Script {
        Script {
            reads,
            writes,
            written: Vec::new(),
        }
    }

    fn os(errno: i32) -> std::io::Result<usize> {
        Err(std::io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn precopy_read_with_no_data_now_is_zero_bytes_not_an_error() {
        // vfio.h: in PRE_COPY, read() at the temporary end of stream fails
        // with ENOMSG; the stream contract makes that Ok(0).
        let mut s = script(vec![os(libc::ENOMSG)], vec![]);
        assert_eq!(read_data(&mut s, "t", &mut [0; 8]).unwrap(), 0);
        let mut s = script(vec![Ok(0)], vec![]);
        assert_eq!(read_data(&mut s, "t", &mut [0; 8]).unwrap(), 0);
    }

    #[test]
    fn read_retries_eintr_and_keeps_other_errnos() {
        let mut s = script(vec![os(libc::EINTR), os(libc::EINTR), Ok(5)], vec![]);
        assert_eq!(read_data(&mut s, "t", &mut [0; 8]).unwrap(), 5);
        let mut s = script(vec![os(libc::ENODEV)], vec![]);
        let e = read_data(&mut s, "dev: STOP_COPY data fd", &mut [0; 8]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENODEV));
        assert!(e.to_string().contains("STOP_COPY data fd"), "{e}");
        let mut s = script(
            (0..MAX_EINTR_RETRIES).map(|_| os(libc::EINTR)).collect(),
            vec![],
        );
        assert_eq!(
            read_data(&mut s, "t", &mut [0; 8]).unwrap_err().errno(),
            Some(libc::EINTR)
        );
    }

    #[test]
    fn write_continues_after_short_writes_and_eintr_until_all_is_written() {
        let data: Vec<u8> = (0..10).collect();
        let mut s = script(vec![], vec![Ok(3), os(libc::EINTR), Ok(4), Ok(3)]);
        write_all_data(&mut s, "t", &data).unwrap();
        assert_eq!(s.written, data);
    }

    #[test]
    fn write_that_makes_no_progress_or_fails_is_an_error_with_what_is_left() {
        let mut s = script(vec![], (0..MAX_ZERO_WRITES).map(|_| Ok(0)).collect());
        let e = write_all_data(&mut s, "t", &[1, 2, 3]).unwrap_err();
        assert!(e.to_string().contains("3 bytes left"), "{e}");
        let mut s = script(vec![], vec![Ok(1), os(libc::EINVAL)]);
        let e = write_all_data(&mut s, "t", &[1, 2, 3]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::EINVAL));
        assert!(e.to_string().contains("2 bytes left"), "{e}");
    }

    fn range(iova: u64, length: u64) -> DirtyRange {
        DirtyRange { iova, length }
    }

    #[test]
    fn logging_ranges_are_converted_in_order() {
        let r = logging_ranges(4096, &[range(0x2000, 0x1000), range(0, 0x2000)]).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].iova, r[0].length), (0x2000, 0x1000));
        assert_eq!((r[1].iova, r[1].length), (0, 0x2000));
    }

    #[test]
    fn logging_start_refuses_what_the_kernel_would_before_the_ioctl() {
        let bad = |page, ranges: &[DirtyRange]| {
            matches!(logging_ranges(page, ranges), Err(Error::InvalidArgument(_)))
        };
        // No range, and more than one page of ranges.
        assert!(bad(4096, &[]));
        let many: Vec<_> = (0..=MAX_DMA_LOGGING_RANGES as u64)
            .map(|i| range(i * 4096, 4096))
            .collect();
        assert!(bad(4096, &many));
        assert!(!bad(4096, &many[..MAX_DMA_LOGGING_RANGES]));
        // Page size below 4 KiB or not a power of two.
        assert!(bad(2048, &[range(0, 4096)]));
        assert!(bad(0x3000, &[range(0, 0x3000)]));
        // Misaligned, empty, wrapping, overlapping.
        assert!(bad(4096, &[range(0x800, 4096)]));
        assert!(bad(4096, &[range(0, 0x1800)]));
        assert!(bad(4096, &[range(0, 0)]));
        assert!(bad(4096, &[range(u64::MAX - 4095, 8192)]));
        assert!(bad(4096, &[range(0, 0x3000), range(0x2000, 0x1000)]));
        // Adjacent ranges do not overlap.
        assert!(!bad(4096, &[range(0, 0x2000), range(0x2000, 0x1000)]));
    }

    #[test]
    fn bitmap_request_needs_one_bit_per_page_and_aligned_non_empty_range() {
        // 65 pages need two words.
        assert_eq!(check_bitmap_request("t", 0, 65 * 4096, 4096, 2).unwrap(), 2);
        let bad = |iova, len, page, words| {
            matches!(
                check_bitmap_request("t", iova, len, page, words),
                Err(Error::InvalidArgument(_))
            )
        };
        assert!(bad(0, 65 * 4096, 4096, 1));
        assert!(bad(0, 0, 4096, 1));
        assert!(bad(0x800, 4096, 4096, 1));
        assert!(bad(0, 4096, 3000, 1));
        assert!(bad(u64::MAX - 4095, 8192, 4096, 1));
    }
}
