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
//! The stream format is described in [`stream`]'s source and in
//! `docs/ARCHITECTURE.md`; [`check_stream`] checks one without a device.

pub(crate) mod stream;

pub use crate::device::{MigrationCaps, MigrationSource};
pub use stream::{
    check_stream, crc32, BarIdentity, DeviceIdentity, StreamFault, StreamSummary, MAX_CHUNK_LEN,
    MAX_DEVICE_DATA, STREAM_MAGIC, STREAM_VERSION,
};
pub use vfio_backend::{MigState, MigrationFlags, PrecopyInfo};
