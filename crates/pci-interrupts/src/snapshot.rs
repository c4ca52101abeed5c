//! The versioned snapshot envelope: pci-config's [`Versioned`], with this crate's version.

pub use pci_config::Versioned;

use crate::{Error, Result};

/// Format version of this crate's snapshot payloads ([`MsiSnapshot`](crate::MsiSnapshot),
/// [`MsixSnapshot`](crate::MsixSnapshot), [`IntxSnapshot`](crate::IntxSnapshot)).
pub const SNAPSHOT_VERSION: u32 = 1;

/// Wraps `payload` with this crate's [`SNAPSHOT_VERSION`].
pub fn versioned<T>(payload: T) -> Versioned<T> {
    Versioned::new(SNAPSHOT_VERSION, payload)
}

/// The payload of `envelope`, if written in a version this crate reads
/// ([`Error::SnapshotVersion`] otherwise).
pub fn payload<T>(envelope: Versioned<T>) -> Result<T> {
    envelope
        .into_payload_of(SNAPSHOT_VERSION)
        .map_err(|found| Error::SnapshotVersion {
            found,
            supported: SNAPSHOT_VERSION,
        })
}
