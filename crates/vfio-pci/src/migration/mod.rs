//! Live migration of a passed-through device: the device's own state
//! (through the backend's VFIO migration v2 or vfio-user migration) and
//! the state this crate emulates, in one checked stream.
//!
//! - Source: [`VfioPciDevice::start_migration`](crate::VfioPciDevice::start_migration)
//!   returns a [`MigrationSource`]: pre-copy rounds while the guest runs,
//!   quiesce (multi-device VMMs), stop-and-copy, then complete or abort.
//! - Destination: [`VfioPciDevice::resume_migration`](crate::VfioPciDevice::resume_migration)
//!   checks the whole stream against the device before it loads anything.
//! - Guest RAM: [`GuestDma::dirty_tracking_start`](crate::GuestDma::dirty_tracking_start)
//!   and [`GuestDma::dirty_bitmaps`](crate::GuestDma::dirty_bitmaps) name
//!   the pages the devices' DMA wrote, for the VMM's own RAM transfer.
//!
//! # The stream (format version [`STREAM_VERSION`])
//!
//! ```text
//! prefix   "VFIOPCIM" (8 bytes), format version (u32 LE), reserved (u32, 0)
//! chunk    kind (u32 LE), sequence number (u32 LE), payload length (u32 LE),
//!          payload, CRC-32 (IEEE) of the 12 header bytes and the payload (u32 LE)
//! ```
//!
//! The chunks come in this order, numbered from 0: one `IDENTITY` (kind 1:
//! the [`DeviceIdentity`], JSON), any number of `DEVICE_DATA` (kind 2: the
//! device's opaque state, 1 byte to [`MAX_CHUNK_LEN`] each, written into the
//! destination device in order), one `EMULATED` (kind 3: the
//! [`DeviceSnapshot`](crate::DeviceSnapshot) and the MSI / MSI-X vectors
//! pending in the source VMM's notifiers, JSON), one `END` (kind 4: the
//! number of chunks before it (u32), 0 (u32), the bytes of device data
//! (u64)). A reader reads nothing past `END`, so a VMM may put several
//! devices' streams one after the other. [`check_stream`] checks a stream
//! without a device.

pub(crate) mod stream;

pub use crate::device::{LoadedMigration, MigrationCaps, MigrationSource, PRECOPY_ROUND_MAX};
pub use stream::{
    check_stream, crc32, BarIdentity, DeviceIdentity, StreamFault, StreamSummary, MAX_CHUNK_LEN,
    MAX_DEVICE_DATA, STREAM_MAGIC, STREAM_VERSION,
};
pub use vfio_backend::{MigState, MigrationFlags, PrecopyInfo};
