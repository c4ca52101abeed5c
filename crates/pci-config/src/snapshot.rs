//! Snapshot and restore of a [`ConfigSpace`].

use serde::{Deserialize, Serialize};

use crate::bar::{validate_layout, BarDef, BarHalf, BarTracking, NUM_BARS};
use crate::error::{Error, Result};
use crate::regs::CONFIG_SPACE_SIZE;
use crate::space::ConfigSpace;

/// Format version of [`ConfigSpaceState`] written by this build.
pub const SNAPSHOT_VERSION: u32 = 1;

/// A versioned snapshot envelope: the format version, then the payload.
///
/// The one envelope of the workspace: pci-interrupts and pci-bar-alloc re-export it for their
/// snapshots. It lives here, in the lowest crate, because every crate that snapshots state
/// depends on pci-config; each crate keeps its own format version for its own payloads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Versioned<T> {
    /// Format version of `payload`.
    pub version: u32,
    /// The state.
    pub payload: T,
}

impl<T> Versioned<T> {
    /// Wraps `payload`, written in format `version`.
    pub const fn new(version: u32, payload: T) -> Self {
        Self { version, payload }
    }

    /// The payload if it was written in format `supported`; otherwise the version found, for
    /// the caller to report in its own error.
    pub fn into_payload_of(self, supported: u32) -> std::result::Result<T, u32> {
        if self.version == supported {
            Ok(self.payload)
        } else {
            Err(self.version)
        }
    }
}

/// A [`ConfigSpace`] snapshot: [`ConfigSpaceState`] in a [`Versioned`] envelope.
pub type ConfigSpaceSnapshot = Versioned<ConfigSpaceState>;

/// Everything a [`ConfigSpace`] holds, as plain data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigSpaceState {
    /// The 4096 configuration bytes.
    pub bytes: Vec<u8>,
    /// The writable mask (4096 bytes).
    pub writable: Vec<u8>,
    /// The write-1-to-clear mask (4096 bytes).
    pub rw1c: Vec<u8>,
    /// BAR definitions by register index (the upper register of a 64-bit BAR is `None`).
    pub bars: [Option<BarDef>; NUM_BARS],
    /// Expansion ROM size, if one is declared.
    pub rom_size: Option<u64>,
    /// Base last reported to the VMM, per BAR then the ROM.
    pub active_bases: [u64; NUM_BARS + 1],
    /// Per BAR register then the ROM: the last guest write was a sizing write.
    pub sizing: [bool; NUM_BARS + 1],
    /// Per 64-bit BAR: the half written while the other is awaited.
    pub pending_half: [Option<BarHalf>; NUM_BARS],
}

fn boxed(v: &[u8], what: &'static str) -> Result<Box<[u8; CONFIG_SPACE_SIZE]>> {
    let arr: [u8; CONFIG_SPACE_SIZE] = v.try_into().map_err(|_| Error::InvalidSnapshot(what))?;
    Ok(Box::new(arr))
}

impl ConfigSpace {
    /// Captures the whole state in a versioned envelope.
    pub fn snapshot(&self) -> ConfigSpaceSnapshot {
        Versioned::new(
            SNAPSHOT_VERSION,
            ConfigSpaceState {
                bytes: self.bytes.to_vec(),
                writable: self.writable.to_vec(),
                rw1c: self.rw1c.to_vec(),
                bars: self.bars.defs,
                rom_size: self.bars.rom_size,
                active_bases: self.bars.active,
                sizing: self.bars.sizing,
                pending_half: self.bars.pending,
            },
        )
    }

    /// Rebuilds a configuration space from a snapshot. Fails on an unknown version or an
    /// inconsistent payload (wrong buffer sizes, invalid BAR layout or ROM size).
    pub fn restore(snapshot: &ConfigSpaceSnapshot) -> Result<Self> {
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(Error::UnsupportedSnapshotVersion {
                found: snapshot.version,
                supported: SNAPSHOT_VERSION,
            });
        }
        let state = &snapshot.payload;
        validate_layout(&state.bars).map_err(|_| Error::InvalidSnapshot("invalid BAR layout"))?;
        if let Some(size) = state.rom_size {
            if !size.is_power_of_two() || !(0x800..=1 << 31).contains(&size) {
                return Err(Error::InvalidSnapshot("invalid ROM size"));
            }
        }
        Ok(Self {
            bytes: boxed(&state.bytes, "config bytes are not 4096 bytes")?,
            writable: boxed(&state.writable, "writable mask is not 4096 bytes")?,
            rw1c: boxed(&state.rw1c, "rw1c mask is not 4096 bytes")?,
            bars: BarTracking {
                defs: state.bars,
                rom_size: state.rom_size,
                active: state.active_bases,
                sizing: state.sizing,
                pending: state.pending_half,
            },
        })
    }
}
