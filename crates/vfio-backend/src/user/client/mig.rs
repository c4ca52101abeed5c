//! The client side of vfio-user migration: `DEVICE_FEATURE` for the
//! migration features and device DMA logging, and a [`MigrationStream`]
//! made of `MIG_DATA_READ` / `MIG_DATA_WRITE` messages.
//!
//! The server's replies are checked as every other reply is: their sizes
//! against the request (a `MIG_DATA_READ` reply against the size asked, a
//! dirty bitmap against the range and page size asked), the feature flags
//! they echo, and the state values they name (a state outside the uAPI's
//! is a protocol violation). A dirty bitmap report larger than the
//! server's `max_bitmap_size` (or our `max_data_xfer_size`) is split into
//! several requests.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Shared, UserDevice};
use crate::migration::bitmap_words;
use crate::user::locking::lock;
use crate::user::protocol::{
    command, feature, DmaLoggingControl, DmaLoggingRange, DmaLoggingReport, FeatureHeader,
    MigDataPayload, MigStatePayload, MAX_DMA_LOGGING_RANGES,
};
use crate::{DirtyRange, Error, MigState, MigrationFlags, MigrationStream, PrecopyInfo, Result};

/// What the client knows of the device's migration.
#[derive(Debug, Default)]
pub(super) struct MigClient {
    /// The state after our last successful get or set; `None` when unknown.
    last: Option<MigState>,
    /// Bumped whenever the data stream ends: a stream handle of an older
    /// generation is refused.
    generation: u64,
}

/// Whether a device in `state` still serves the data stream it has.
fn keeps_stream(state: MigState) -> bool {
    matches!(
        state,
        MigState::StopCopy | MigState::PreCopy | MigState::PreCopyP2p | MigState::Resuming
    )
}

/// Whether moving from `prev` to `target` opens a new data stream (the
/// kernel returns a new `data_fd` for it).
fn opens_stream(prev: MigState, target: MigState) -> bool {
    match target {
        MigState::Resuming => prev != MigState::Resuming,
        MigState::StopCopy => !matches!(
            prev,
            MigState::StopCopy | MigState::PreCopy | MigState::PreCopyP2p
        ),
        MigState::PreCopy | MigState::PreCopyP2p => {
            !matches!(prev, MigState::PreCopy | MigState::PreCopyP2p)
        }
        _ => false,
    }
}

/// An error reply that says "no such feature" becomes [`Error::Unsupported`].
fn unsupported(e: Error, what: &str) -> Error {
    match e {
        Error::Refused { errno, .. } if errno == libc::ENOTTY || errno == libc::ENOTSUP => {
            Error::Unsupported(format!("vfio-user server: {what}"))
        }
        e => e,
    }
}

fn einval(context: String) -> Error {
    Error::Refused {
        context,
        errno: libc::EINVAL,
    }
}

impl UserDevice {
    /// One `DEVICE_FEATURE` request; returns the reply's data, which must
    /// be exactly `reply_data` bytes after a head echoing our flags.
    fn feature(&self, flags: u32, data: &[u8], reply_data: usize, what: &str) -> Result<Vec<u8>> {
        let s = self.shared();
        let argsz = u32::try_from(FeatureHeader::SIZE + reply_data.max(data.len()))
            .map_err(|_| einval(format!("{what}: request too large")))?;
        let head = FeatureHeader { argsz, flags };
        let m = s
            .request(
                command::DEVICE_FEATURE,
                &[&head.encode(), data],
                &[],
                self.timeout(),
            )
            .map_err(|e| unsupported(e, what))?;
        s.expect_plain(&m, FeatureHeader::SIZE + reply_data)?;
        let rh = FeatureHeader::decode(&m.payload).map_err(|e| s.violation(e.to_string()))?;
        if rh.flags != flags {
            return Err(s.violation(format!(
                "DEVICE_FEATURE reply flags {:#x} to a request with {flags:#x}",
                rh.flags
            )));
        }
        Ok(m.payload.get(FeatureHeader::SIZE..).unwrap_or(&[]).to_vec())
    }

    pub(super) fn mig_flags(&self) -> Result<Option<MigrationFlags>> {
        let data = match self.feature(
            feature::GET | feature::MIGRATION,
            &[],
            8,
            "migration feature",
        ) {
            Ok(d) => d,
            Err(Error::Unsupported(_)) => return Ok(None),
            Err(Error::Refused { errno, .. }) if errno == libc::EINVAL => return Ok(None),
            Err(e) => return Err(e),
        };
        let flags = u64::from_le_bytes(
            data.get(..8)
                .and_then(|d| d.try_into().ok())
                .unwrap_or([0; 8]),
        );
        if flags & MigrationFlags::STOP_COPY == 0 {
            return Err(self
                .shared()
                .violation(format!("migration flags {flags:#x} without STOP_COPY")));
        }
        // Flags this crate does not know (a later uAPI) are left out.
        let known = MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY;
        Ok(Some(MigrationFlags(flags & known)))
    }

    fn decode_state(&self, data: &[u8]) -> Result<MigState> {
        let s = self.shared();
        let p = MigStatePayload::decode(data).map_err(|e| s.violation(e.to_string()))?;
        MigState::from_raw(p.device_state).ok_or_else(|| {
            s.violation(format!(
                "the server names migration state {}, which the uAPI does not have",
                p.device_state
            ))
        })
    }

    pub(super) fn mig_get_state(&self) -> Result<MigState> {
        let data = self.feature(
            feature::GET | feature::MIG_DEVICE_STATE,
            &[],
            MigStatePayload::SIZE,
            "migration state",
        )?;
        let state = self.decode_state(&data)?;
        lock(&self.mig).last = Some(state);
        Ok(state)
    }

    pub(super) fn mig_set_state(
        &self,
        state: MigState,
    ) -> Result<Option<Box<dyn MigrationStream>>> {
        if state == MigState::Error {
            return Err(einval("the ERROR migration state cannot be set".into()));
        }
        let known = lock(&self.mig).last;
        let prev = match known {
            Some(p) => p,
            None => self.mig_get_state()?,
        };
        let req = MigStatePayload {
            device_state: state.raw(),
            data_fd: u32::MAX,
        }
        .encode();
        let result = self.feature(
            feature::SET | feature::MIG_DEVICE_STATE,
            &req,
            MigStatePayload::SIZE,
            "migration state",
        );
        let data = match result {
            Ok(d) => d,
            Err(e) => {
                // Where the failure left the device (it may be anywhere on
                // the path, or in ERROR) decides whether the stream goes on.
                let now = self.mig_get_state().ok();
                let mut m = lock(&self.mig);
                m.last = now;
                if !now.is_some_and(keeps_stream) {
                    m.generation = m.generation.wrapping_add(1);
                }
                return Err(e);
            }
        };
        if data.as_slice() != req.as_slice() {
            return Err(self.shared().violation(format!(
                "MIG_DEVICE_STATE SET reply {data:02x?} to {req:02x?}"
            )));
        }
        let mut m = lock(&self.mig);
        m.last = Some(state);
        let opens = opens_stream(prev, state);
        if opens || !keeps_stream(state) {
            m.generation = m.generation.wrapping_add(1);
        }
        if !opens {
            return Ok(None);
        }
        let s = self.shared();
        let ours = s.options.max_data_xfer_size;
        let chunk = ours.min(self.server_caps.max_data_xfer_size).max(1);
        Ok(Some(Box::new(UserMigStream {
            shared: Arc::clone(&self.conn.shared),
            mig: Arc::clone(&self.mig),
            generation: m.generation,
            resuming: state == MigState::Resuming,
            chunk,
            timeout: self.timeout(),
        })))
    }

    /// A reset returns the device to RUNNING and ends its stream.
    pub(super) fn mig_reset(&self) {
        let mut m = lock(&self.mig);
        m.last = None;
        m.generation = m.generation.wrapping_add(1);
    }

    pub(super) fn mig_get_data_size(&self) -> Result<u64> {
        let data = self.feature(
            feature::GET | feature::MIG_DATA_SIZE,
            &[],
            8,
            "migration data size",
        )?;
        Ok(u64::from_le_bytes(
            data.get(..8)
                .and_then(|d| d.try_into().ok())
                .unwrap_or([0; 8]),
        ))
    }

    pub(super) fn logging_start(&self, page_size: u64, ranges: &[DirtyRange]) -> Result<()> {
        if ranges.len() > MAX_DMA_LOGGING_RANGES {
            return Err(Error::Refused {
                context: format!(
                    "DMA logging of {} ranges (at most {MAX_DMA_LOGGING_RANGES})",
                    ranges.len()
                ),
                errno: libc::E2BIG,
            });
        }
        let mut data =
            Vec::with_capacity(DmaLoggingControl::SIZE + ranges.len() * DmaLoggingRange::SIZE);
        data.extend_from_slice(
            &DmaLoggingControl {
                page_size,
                num_ranges: ranges.len() as u32,
                reserved: 0,
            }
            .encode(),
        );
        for r in ranges {
            data.extend_from_slice(
                &DmaLoggingRange {
                    iova: r.iova,
                    length: r.length,
                }
                .encode(),
            );
        }
        self.feature(
            feature::SET | feature::DMA_LOGGING_START,
            &data,
            data.len(),
            "device DMA logging",
        )?;
        Ok(())
    }

    pub(super) fn logging_stop(&self) -> Result<()> {
        self.feature(
            feature::SET | feature::DMA_LOGGING_STOP,
            &[],
            0,
            "device DMA logging",
        )?;
        Ok(())
    }

    /// The most bitmap bytes one report reply may carry.
    fn max_bitmap_bytes(&self) -> u64 {
        let ours = u64::from(self.shared().options.max_data_xfer_size);
        self.server_caps
            .migration_max_bitmap_size
            .unwrap_or(ours)
            .min(ours)
    }

    pub(super) fn logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<()> {
        let words = bitmap_words(length, page_size)
            .filter(|_| length > 0 && iova.checked_add(length).is_some())
            .ok_or_else(|| {
                einval(format!(
                    "DMA logging report of {length:#x} bytes at {iova:#x}, page size {page_size:#x}"
                ))
            })?;
        let have = bitmap.len();
        let out = bitmap
            .get_mut(..words)
            .ok_or_else(|| einval(format!("DMA logging report into {have} words for {words}")))?;
        // Whole words per request: a multiple of 64 pages, except the last.
        let words_per_req = (self.max_bitmap_bytes() / 8).max(1);
        let span = words_per_req
            .saturating_mul(64)
            .saturating_mul(page_size)
            .max(page_size);
        let s = self.shared();
        let mut done = 0u64;
        let mut word = 0usize;
        while done < length {
            let len = (length - done).min(span);
            let cur = iova + done;
            let n = bitmap_words(len, page_size).unwrap_or(0);
            let req = DmaLoggingReport {
                iova: cur,
                length: len,
                page_size,
            };
            let data = self.feature(
                feature::GET | feature::DMA_LOGGING_REPORT,
                &req.encode(),
                DmaLoggingReport::SIZE + n * 8,
                "device DMA logging",
            )?;
            let echo = DmaLoggingReport::decode(&data).map_err(|e| s.violation(e.to_string()))?;
            if echo != req {
                return Err(s.violation(format!(
                    "DMA_LOGGING_REPORT reply for {echo:?} to a request for {req:?}"
                )));
            }
            let bits = data.get(DmaLoggingReport::SIZE..).unwrap_or(&[]);
            for (i, raw) in bits.chunks_exact(8).enumerate() {
                let w = u64::from_le_bytes(raw.try_into().unwrap_or([0; 8]));
                if let Some(slot) = out.get_mut(word + i) {
                    *slot = w;
                }
            }
            word += n;
            done += len;
        }
        // Bits past the last page must be zero (the spec); a server that
        // sets them does not make us report pages outside the range.
        let pages = length.div_ceil(page_size);
        let tail = (pages % 64) as u32;
        if tail != 0 {
            if let Some(last) = out.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        Ok(())
    }
}

/// A data stream carried by `MIG_DATA_READ` / `MIG_DATA_WRITE` messages.
struct UserMigStream {
    shared: Arc<Shared>,
    mig: Arc<Mutex<MigClient>>,
    generation: u64,
    resuming: bool,
    /// The most bytes per message: the smaller of the two sides'
    /// `max_data_xfer_size`.
    chunk: u32,
    timeout: Duration,
}

impl UserMigStream {
    fn check(&self, resuming: bool) -> Result<()> {
        if lock(&self.mig).generation != self.generation {
            return Err(Error::Refused {
                context: "migration stream of a session that ended".into(),
                errno: libc::EBADF,
            });
        }
        if resuming != self.resuming {
            return Err(einval(if self.resuming {
                "read of a RESUMING migration stream".into()
            } else {
                "write to a saving migration stream".into()
            }));
        }
        Ok(())
    }
}

impl MigrationStream for UserMigStream {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        self.check(false)?;
        let size = u32::try_from(buf.len()).unwrap_or(u32::MAX).min(self.chunk);
        if size == 0 {
            return Ok(0);
        }
        let s = &self.shared;
        let req = MigDataPayload {
            argsz: (MigDataPayload::SIZE as u32).saturating_add(size),
            size,
        };
        let m = s.request(command::MIG_DATA_READ, &[&req.encode()], &[], self.timeout)?;
        s.expect_at_least(&m, MigDataPayload::SIZE)?;
        let rep = MigDataPayload::decode(&m.payload).map_err(|e| s.violation(e.to_string()))?;
        let n = rep.size as usize;
        if rep.size > size
            || m.payload.len() != MigDataPayload::SIZE + n
            || rep.argsz as usize != MigDataPayload::SIZE + n
        {
            return Err(s.violation(format!(
                "MIG_DATA_READ reply of {} bytes (argsz {}, size {}) to a read of {size}",
                m.payload.len(),
                rep.argsz,
                rep.size
            )));
        }
        let data = m.payload.get(MigDataPayload::SIZE..).unwrap_or(&[]);
        if let Some(dst) = buf.get_mut(..n) {
            dst.copy_from_slice(data);
        }
        Ok(n)
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.check(true)?;
        let s = &self.shared;
        for part in data.chunks(self.chunk as usize) {
            let req = MigDataPayload {
                argsz: MigDataPayload::SIZE as u32,
                size: part.len() as u32,
            };
            let m = s.request(
                command::MIG_DATA_WRITE,
                &[&req.encode(), part],
                &[],
                self.timeout,
            )?;
            // The spec's reply has no payload; a server that echoes the
            // head is tolerated, anything else is not.
            if m.payload.len() != MigDataPayload::SIZE {
                s.expect_plain(&m, 0)?;
            } else {
                s.expect_plain(&m, MigDataPayload::SIZE)?;
            }
        }
        Ok(())
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo> {
        self.check(false)?;
        Err(Error::Unsupported(
            "VFIO_MIG_GET_PRECOPY_INFO has no vfio-user message".into(),
        ))
    }
}
