//! The versioned snapshot envelope.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Format version of this crate's snapshot payloads ([`MsiSnapshot`](crate::MsiSnapshot),
/// [`MsixSnapshot`](crate::MsixSnapshot), [`IntxSnapshot`](crate::IntxSnapshot)).
pub const SNAPSHOT_VERSION: u32 = 1;

/// A snapshot payload with the format version it was written in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned<T> {
    /// Format version of `payload`.
    pub version: u32,
    /// The snapshot itself.
    pub payload: T,
}

impl<T> Versioned<T> {
    /// Wraps `payload` with the current [`SNAPSHOT_VERSION`].
    pub fn new(payload: T) -> Self {
        Self {
            version: SNAPSHOT_VERSION,
            payload,
        }
    }

    /// The payload, if written in a version this crate reads.
    pub fn into_payload(self) -> Result<T> {
        if self.version == SNAPSHOT_VERSION {
            Ok(self.payload)
        } else {
            Err(Error::SnapshotVersion {
                found: self.version,
                supported: SNAPSHOT_VERSION,
            })
        }
    }
}
