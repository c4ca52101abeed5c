//! Live migration of a device's own state and dirty tracking of the guest
//! RAM its DMA writes: the vocabulary of the kernel's VFIO migration v2
//! uAPI (`linux/vfio.h`, `VFIO_DEVICE_FEATURE_MIGRATION`,
//! `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`, `VFIO_MIG_GET_PRECOPY_INFO`,
//! `VFIO_DEVICE_FEATURE_DMA_LOGGING_*`), which vfio-user reuses
//! (`VFIO_USER_DEVICE_FEATURE`, `VFIO_USER_MIG_DATA_READ` / `_WRITE`).
//!
//! A backend that cannot migrate keeps the [`Vfio`](crate::Vfio) trait's
//! defaults: [`Vfio::migration_flags`](crate::Vfio::migration_flags) says
//! `None` and the other methods fail with
//! [`Error::Unsupported`](crate::Error::Unsupported).

use crate::Result;

/// A device's migration state (`enum vfio_device_mig_state`). The values
/// are the uAPI's, on the kernel's ioctls and on the vfio-user wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MigState {
    /// The device failed a transition and must be reset
    /// (`VFIO_DEVICE_STATE_ERROR`).
    Error = 0,
    /// Not running, not changing its state, no data stream
    /// (`VFIO_DEVICE_STATE_STOP`).
    Stop = 1,
    /// Running normally (`VFIO_DEVICE_STATE_RUNNING`).
    Running = 2,
    /// Stopped, its complete state readable from the data stream
    /// (`VFIO_DEVICE_STATE_STOP_COPY`).
    StopCopy = 3,
    /// Stopped, taking a state written into the data stream
    /// (`VFIO_DEVICE_STATE_RESUMING`).
    Resuming = 4,
    /// Running, but it neither starts DMA nor raises interrupts; it still
    /// answers peer-to-peer accesses (`VFIO_DEVICE_STATE_RUNNING_P2P`).
    RunningP2p = 5,
    /// Running, with part of its state readable ahead of stop-and-copy
    /// (`VFIO_DEVICE_STATE_PRE_COPY`).
    PreCopy = 6,
    /// [`MigState::PreCopy`] while quiesced as in [`MigState::RunningP2p`]
    /// (`VFIO_DEVICE_STATE_PRE_COPY_P2P`).
    PreCopyP2p = 7,
}

impl MigState {
    /// Every state, in uAPI order (`state as usize` is its index here).
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    /// The state with uAPI value `raw`, if there is one.
    pub fn from_raw(raw: u32) -> Option<MigState> {
        MigState::ALL.get(usize::try_from(raw).ok()?).copied()
    }

    /// The uAPI value.
    pub fn raw(self) -> u32 {
        self as u32
    }

    /// The uAPI's name without its prefix (`"STOP_COPY"`).
    pub fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }
}

impl std::fmt::Display for MigState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a device's migration supports (`struct
/// vfio_device_feature_migration`'s `flags`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct MigrationFlags(pub u64);

impl MigrationFlags {
    /// `VFIO_MIGRATION_STOP_COPY`: STOP, RUNNING, STOP_COPY and RESUMING.
    /// Every migratable device has it.
    pub const STOP_COPY: u64 = 1 << 0;
    /// `VFIO_MIGRATION_P2P`: the RUNNING_P2P state (and PRE_COPY_P2P with
    /// [`MigrationFlags::PRE_COPY`]).
    pub const P2P: u64 = 1 << 1;
    /// `VFIO_MIGRATION_PRE_COPY`: the PRE_COPY state.
    pub const PRE_COPY: u64 = 1 << 2;

    /// Whether STOP_COPY is supported.
    pub fn stop_copy(self) -> bool {
        self.0 & Self::STOP_COPY != 0
    }

    /// Whether the P2P states are supported.
    pub fn p2p(self) -> bool {
        self.0 & Self::P2P != 0
    }

    /// Whether PRE_COPY is supported.
    pub fn pre_copy(self) -> bool {
        self.0 & Self::PRE_COPY != 0
    }
}

/// How much pre-copy data remains (`struct vfio_precopy_info`): both are
/// estimates that change while the device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PrecopyInfo {
    /// Bytes of the initial part of the state not read yet; 0 once it has
    /// all been read.
    pub initial_bytes: u64,
    /// Bytes of state changed since it was read, readable now.
    pub dirty_bytes: u64,
}

/// The data stream of a migration state: what the kernel returns as a
/// `data_fd`, what vfio-user carries in `MIG_DATA_READ` / `MIG_DATA_WRITE`.
///
/// A stream is valid until the device leaves the states it serves: opened
/// on entering STOP_COPY, PRE_COPY or PRE_COPY_P2P (reading) or RESUMING
/// (writing). A PRE_COPY stream goes on serving STOP_COPY when the device
/// moves there from PRE_COPY or PRE_COPY_P2P.
pub trait MigrationStream: Send {
    /// Reads up to `buf.len()` bytes of the device's state. `Ok(0)` means
    /// none is available now: in STOP_COPY the state is complete; in
    /// PRE_COPY the device has nothing more until it changes again.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize>;

    /// Writes `data` (all of it) into the device while RESUMING.
    fn write(&mut self, data: &[u8]) -> Result<()>;

    /// What remains to read in PRE_COPY (`VFIO_MIG_GET_PRECOPY_INFO`).
    fn precopy_info(&mut self) -> Result<PrecopyInfo>;
}

/// One IOVA range whose DMA writes a device logs
/// (`struct vfio_device_feature_dma_logging_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirtyRange {
    /// First IOVA.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
}

/// Why the ranges of a DMA logging start are refused (see [`check_logging_ranges`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LoggingRangesError {
    /// No range at all.
    Empty,
    /// More ranges than the device takes.
    TooMany {
        /// How many were given.
        count: usize,
        /// How many are taken.
        max: usize,
    },
    /// A range that is empty or wraps around the end of the IOVA space.
    EmptyOrWrapping {
        /// Its first IOVA.
        iova: u64,
        /// Its length.
        length: u64,
    },
    /// A range whose start or length is not a multiple of the page size.
    Unaligned {
        /// Its first IOVA.
        iova: u64,
        /// Its length.
        length: u64,
    },
    /// Two ranges that overlap.
    Overlap {
        /// The first IOVA of the lower one.
        first: u64,
        /// The first IOVA of the higher one.
        second: u64,
    },
}

impl std::fmt::Display for LoggingRangesError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            LoggingRangesError::Empty => write!(f, "no range"),
            LoggingRangesError::TooMany { count, max } => {
                write!(f, "{count} ranges (at most {max})")
            }
            LoggingRangesError::EmptyOrWrapping { iova, length } => write!(
                f,
                "range of {length:#x} bytes at IOVA {iova:#x} is empty or wraps around"
            ),
            LoggingRangesError::Unaligned { iova, length } => write!(
                f,
                "range of {length:#x} bytes at IOVA {iova:#x} is not aligned to the page"
            ),
            LoggingRangesError::Overlap { first, second } => {
                write!(f, "ranges at IOVA {first:#x} and {second:#x} overlap")
            }
        }
    }
}

/// Checks the ranges of a DMA logging start as the kernel's uAPI asks:
/// 1 to `max` non-empty ranges, each aligned to `page_size` (a power of two,
/// checked by the caller) and not wrapping, no two overlapping. Returns the
/// number of pages they cover in all.
pub fn check_logging_ranges(
    page_size: u64,
    ranges: &[DirtyRange],
    max: usize,
) -> std::result::Result<u64, LoggingRangesError> {
    if ranges.is_empty() {
        return Err(LoggingRangesError::Empty);
    }
    if ranges.len() > max {
        return Err(LoggingRangesError::TooMany {
            count: ranges.len(),
            max,
        });
    }
    let mut spans = Vec::with_capacity(ranges.len());
    let mut pages = 0u64;
    for r in ranges {
        let (iova, length) = (r.iova, r.length);
        let Some(end) = iova.checked_add(length).filter(|_| length > 0) else {
            return Err(LoggingRangesError::EmptyOrWrapping { iova, length });
        };
        if page_size == 0 || iova % page_size != 0 || length % page_size != 0 {
            return Err(LoggingRangesError::Unaligned { iova, length });
        }
        pages = pages.saturating_add(length / page_size);
        spans.push((iova, end));
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        if let [a, b] = pair {
            if b.0 < a.1 {
                return Err(LoggingRangesError::Overlap {
                    first: a.0,
                    second: b.0,
                });
            }
        }
    }
    Ok(pages)
}

/// Bitmap words needed for `length` bytes at `page_size` granularity: one
/// bit per page, the lowest bit of word 0 for the first page. `None` when
/// `page_size` is 0 or not a power of two.
pub fn bitmap_words(length: u64, page_size: u64) -> Option<usize> {
    if page_size == 0 || !page_size.is_power_of_two() {
        return None;
    }
    let pages = length.div_ceil(page_size);
    usize::try_from(pages.div_ceil(64)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mig_state_values_are_the_uapi_ones() {
        assert_eq!(MigState::Error.raw(), 0);
        assert_eq!(MigState::Stop.raw(), 1);
        assert_eq!(MigState::Running.raw(), 2);
        assert_eq!(MigState::StopCopy.raw(), 3);
        assert_eq!(MigState::Resuming.raw(), 4);
        assert_eq!(MigState::RunningP2p.raw(), 5);
        assert_eq!(MigState::PreCopy.raw(), 6);
        assert_eq!(MigState::PreCopyP2p.raw(), 7);
        for s in MigState::ALL {
            assert_eq!(MigState::from_raw(s.raw()), Some(s));
        }
        assert_eq!(MigState::from_raw(8), None);
        assert_eq!(MigState::from_raw(u32::MAX), None);
    }

    #[test]
    fn logging_ranges_are_non_empty_aligned_disjoint_and_bounded_in_number() {
        let r = |iova, length| DirtyRange { iova, length };
        let page = 0x1000;
        assert_eq!(
            check_logging_ranges(page, &[r(0x3000, 0x2000), r(0, 0x1000)], 2),
            Ok(3)
        );
        assert_eq!(
            check_logging_ranges(page, &[], 2),
            Err(LoggingRangesError::Empty)
        );
        assert_eq!(
            check_logging_ranges(page, &[r(0, 0x1000); 3], 2),
            Err(LoggingRangesError::TooMany { count: 3, max: 2 })
        );
        assert_eq!(
            check_logging_ranges(page, &[r(0x1000, 0)], 2),
            Err(LoggingRangesError::EmptyOrWrapping {
                iova: 0x1000,
                length: 0
            })
        );
        assert!(matches!(
            check_logging_ranges(page, &[r(u64::MAX - 0xfff, 0x2000)], 2),
            Err(LoggingRangesError::EmptyOrWrapping { .. })
        ));
        assert!(matches!(
            check_logging_ranges(page, &[r(0x800, 0x1000)], 2),
            Err(LoggingRangesError::Unaligned { .. })
        ));
        assert!(matches!(
            check_logging_ranges(page, &[r(0, 0x1800)], 2),
            Err(LoggingRangesError::Unaligned { .. })
        ));
        assert_eq!(
            check_logging_ranges(page, &[r(0x2000, 0x2000), r(0, 0x3000)], 2),
            Err(LoggingRangesError::Overlap {
                first: 0,
                second: 0x2000
            })
        );
    }

    #[test]
    fn bitmap_words_round_up_to_whole_pages_and_words() {
        assert_eq!(bitmap_words(0, 4096), Some(0));
        assert_eq!(bitmap_words(1, 4096), Some(1));
        assert_eq!(bitmap_words(64 * 4096, 4096), Some(1));
        assert_eq!(bitmap_words(64 * 4096 + 1, 4096), Some(2));
        assert_eq!(bitmap_words(4096, 3000), None);
        assert_eq!(bitmap_words(4096, 0), None);
    }
}
