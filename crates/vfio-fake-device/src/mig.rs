//! Live migration of a [`crate::FakeDevice`]: the migration v2 state
//! machine of the kernel's uAPI (`linux/vfio.h`), the device's own
//! migration stream, and the log of the guest pages its DMA writes.
//!
//! # The stream (version 1)
//!
//! All integers little endian. A 76-byte header, then records:
//!
//! ```text
//! header: "VFIOFAKE" | version u32 | vendor u16 | device u16 | config length u32
//!         | memory bytes of BARs 0..5 (6 x u64) | MSI words u32 | MSI-X words u32
//! record: kind u32 | payload length u32 | payload
//!   PAGE  (1): BAR u32 | offset u64 | bytes         (one page, or the BAR's tail)
//!   ZERO  (2): BAR u32 | offset u64 | length u32    (the same, all zero)
//!   STATE (3): config space | INTx level u8 | INTx pulse u8
//!              | held MSI words (u64 each) | held MSI-X words | job count u32
//!              | jobs (60 bytes each: BAR u32, kind u32, base u64, cmd u64,
//!                src u64, dst u64, length u64, vector u32, bytes done u64)
//!   END   (4): FNV-1a 64 of every byte before this record
//! ```
//!
//! The destination checks the header against its own template (ids,
//! config size, BAR sizes, vector counts), every record's kind and length
//! before it reads the payload, every page against its BAR, the state
//! against its register blocks, and the checksum at END. Pages are written
//! into the BAR memory as they arrive (RESUMING may change the device); the
//! config space, interrupt state and DMA jobs are taken only when the
//! device leaves RESUMING with a complete, valid stream.

use std::sync::Mutex;

use vfio_backend::migration::{self, LoggingRangesError};
use vfio_backend::{DirtyRange, Error, MigState, MigrationFlags, Result};

use crate::irq::IrqSnapshot;
use crate::regs::Job;
use crate::template::PAGE_SIZE;

/// The kernel's `vfio_mig_get_next_state()` table, our reading of it: the
/// next arc from `cur` towards `target`, ignoring which states the device
/// supports. [`MigState::Error`] when there is no path.
fn step(cur: MigState, target: MigState) -> MigState {
    use MigState::*;
    match (cur, target) {
        (Error, _) | (_, Error) => Error,
        (a, b) if a == b => a,
        (Stop, StopCopy) => StopCopy,
        (Stop, Resuming) => Resuming,
        (Stop, _) => RunningP2p,
        (Running, PreCopy) => PreCopy,
        (Running, _) => RunningP2p,
        (PreCopy, PreCopyP2p | StopCopy) => PreCopyP2p,
        (PreCopy, _) => Running,
        (PreCopyP2p, StopCopy) => StopCopy,
        (PreCopyP2p, PreCopy) => PreCopy,
        (PreCopyP2p, _) => RunningP2p,
        // Leaving STOP_COPY for a pre-copy state is not an arc of the uAPI.
        (StopCopy, PreCopy | PreCopyP2p) => Error,
        (StopCopy, _) => Stop,
        (Resuming, _) => Stop,
        (RunningP2p, Running | PreCopy) => Running,
        (RunningP2p, PreCopyP2p) => PreCopyP2p,
        (RunningP2p, _) => Stop,
    }
}

/// The migration flags a state needs (the kernel's `state_flags_table`).
fn needs(state: MigState) -> u64 {
    use MigState::*;
    let sc = MigrationFlags::STOP_COPY;
    match state {
        Stop | Running | StopCopy | Resuming => sc,
        RunningP2p => sc | MigrationFlags::P2P,
        PreCopy => sc | MigrationFlags::PRE_COPY,
        PreCopyP2p => sc | MigrationFlags::P2P | MigrationFlags::PRE_COPY,
        Error => u64::MAX,
    }
}

fn supported(state: MigState, flags: MigrationFlags) -> bool {
    needs(state) & flags.0 == needs(state)
}

/// The next state a device with `flags` takes from `cur` on its way to
/// `target`, as the kernel's `vfio_mig_get_next_state()` chooses it: the
/// shortest path, never through a state of the saving group (PRE_COPY,
/// PRE_COPY_P2P, STOP_COPY) in its interior, skipping states the device
/// does not support. `None` when `target` cannot be asked for (ERROR, or a
/// state the flags do not offer) or cannot be reached from `cur` (STOP_COPY
/// to a pre-copy state, anything from ERROR).
pub fn mig_next_state(cur: MigState, target: MigState, flags: MigrationFlags) -> Option<MigState> {
    if !supported(cur, flags) && cur != MigState::Error {
        return None;
    }
    if !supported(target, flags) {
        return None;
    }
    let mut next = step(cur, target);
    // At most every state once: the table has no cycle towards a target.
    for _ in 0..MigState::ALL.len() {
        if next == MigState::Error || supported(next, flags) {
            break;
        }
        next = step(next, target);
    }
    (next != MigState::Error && supported(next, flags)).then_some(next)
}

/// Whether the arc `from -> to` opens a new data stream (the uAPI returns a
/// `data_fd` for it).
pub(crate) fn opens_stream(from: MigState, to: MigState) -> bool {
    use MigState::*;
    matches!(
        (from, to),
        (Stop, StopCopy) | (Stop, Resuming) | (Running, PreCopy) | (RunningP2p, PreCopyP2p)
    )
}

/// Whether a state is quiesced: no DMA starts and no interrupt is raised
/// (the P2P states, and every stopped one).
pub(crate) fn quiesced(state: MigState) -> bool {
    !matches!(state, MigState::Running | MigState::PreCopy)
}

/// The flags the fake device offers.
pub(crate) const FLAGS: MigrationFlags =
    MigrationFlags(MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY);

// ---------------------------------------------------------------- stream

pub(crate) const MAGIC: [u8; 8] = *b"VFIOFAKE";
pub(crate) const VERSION: u32 = 1;
pub(crate) const HEADER_LEN: usize = 76;
pub(crate) const REC_HDR: usize = 8;
pub(crate) const KIND_PAGE: u32 = 1;
pub(crate) const KIND_ZERO: u32 = 2;
pub(crate) const KIND_STATE: u32 = 3;
pub(crate) const KIND_END: u32 = 4;
/// The payload of a page record before its bytes.
pub(crate) const PAGE_HDR: usize = 12;
pub(crate) const ZERO_LEN: usize = 16;
pub(crate) const JOB_LEN: usize = 60;
/// The longest STATE payload the destination takes.
pub(crate) const MAX_STATE: usize = 1 << 20;

/// FNV-1a, 64 bits: the stream's checksum.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fnv(u64);

impl Fnv {
    pub(crate) fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        for b in data {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub(crate) fn value(self) -> u64 {
        self.0
    }
}

/// What a device's stream header says of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    pub ids: [u8; 4],
    pub config_len: u32,
    pub bar_mem: [u64; 6],
    pub msi_words: u32,
    pub msix_words: u32,
}

impl Identity {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.ids);
        out.extend_from_slice(&self.config_len.to_le_bytes());
        for b in self.bar_mem {
            out.extend_from_slice(&b.to_le_bytes());
        }
        out.extend_from_slice(&self.msi_words.to_le_bytes());
        out.extend_from_slice(&self.msix_words.to_le_bytes());
    }

    /// Checks a received header against this (the destination's) identity.
    pub(crate) fn check(&self, hdr: &[u8]) -> std::result::Result<(), String> {
        let mut r = Reader::new(hdr);
        if r.bytes(8) != Some(&MAGIC[..]) {
            return Err("not a fake device migration stream (bad magic)".into());
        }
        let version = r.u32().unwrap_or(0);
        if version != VERSION {
            return Err(format!(
                "stream version {version}, this device takes version {VERSION}"
            ));
        }
        let mut mine = Vec::with_capacity(HEADER_LEN);
        self.encode(&mut mine);
        if mine.get(12..) != hdr.get(12..HEADER_LEN) {
            return Err(
                "the stream comes from a different device (ids, config size, BAR sizes or vector counts differ)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// A bounds-checked little-endian reader.
pub(crate) struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Reader<'a> {
        Reader { data, at: 0 }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.data.get(self.at..end)?;
        self.at = end;
        Some(out)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.bytes(1)?.first().copied()
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        let b: [u8; 4] = self.bytes(4)?.try_into().ok()?;
        Some(u32::from_le_bytes(b))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        let b: [u8; 8] = self.bytes(8)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }

    pub(crate) fn done(&self) -> bool {
        self.at == self.data.len()
    }
}

/// One DMA transfer in flight, as it migrates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct JobRecord {
    pub bar: u32,
    pub job: Job,
    pub done: u64,
}

/// The device state of a STATE record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub config: Vec<u8>,
    pub irq: IrqSnapshot,
    pub jobs: Vec<JobRecord>,
}

impl Snapshot {
    pub(crate) fn encoded_len(&self) -> usize {
        self.config.len()
            + 2
            + 8 * (self.irq.msi_held.len() + self.irq.msix_held.len())
            + 4
            + JOB_LEN * self.jobs.len()
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.config);
        out.push(u8::from(self.irq.intx_level));
        out.push(u8::from(self.irq.intx_edge));
        for w in self.irq.msi_held.iter().chain(&self.irq.msix_held) {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&(self.jobs.len() as u32).to_le_bytes());
        for j in &self.jobs {
            let (kind, base, cmd, src, dst, len, vector) = match j.job {
                Job::Edu { cmd, src, dst, cnt } => (1u32, 0u64, cmd, src, dst, cnt, 0u32),
                Job::Engine {
                    base,
                    cmd,
                    src,
                    dst,
                    len,
                    vector,
                } => (2, base, u64::from(cmd), src, dst, len, vector),
            };
            out.extend_from_slice(&j.bar.to_le_bytes());
            out.extend_from_slice(&kind.to_le_bytes());
            for v in [base, cmd, src, dst, len] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&vector.to_le_bytes());
            out.extend_from_slice(&j.done.to_le_bytes());
        }
    }

    /// Parses a STATE payload for a device of identity `id`; the jobs are
    /// checked against the device by the caller.
    pub(crate) fn decode(id: &Identity, data: &[u8]) -> std::result::Result<Snapshot, String> {
        let short = || "truncated device state".to_string();
        let mut r = Reader::new(data);
        let config = r.bytes(id.config_len as usize).ok_or_else(short)?.to_vec();
        let flag = |v: u8| match v {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(format!("INTx state byte {v}")),
        };
        let intx_level = flag(r.u8().ok_or_else(short)?)?;
        let intx_edge = flag(r.u8().ok_or_else(short)?)?;
        let mut words = |n: u32| -> std::result::Result<Vec<u64>, String> {
            (0..n).map(|_| r.u64().ok_or_else(short)).collect()
        };
        let msi_held = words(id.msi_words)?;
        let msix_held = words(id.msix_words)?;
        let count = r.u32().ok_or_else(short)? as usize;
        if count > data.len() / JOB_LEN {
            return Err(format!(
                "{count} DMA jobs in a state of {} bytes",
                data.len()
            ));
        }
        let mut jobs = Vec::with_capacity(count);
        for _ in 0..count {
            let bar = r.u32().ok_or_else(short)?;
            let kind = r.u32().ok_or_else(short)?;
            let mut v = [0u64; 5];
            for x in &mut v {
                *x = r.u64().ok_or_else(short)?;
            }
            let [base, cmd, src, dst, len] = v;
            let vector = r.u32().ok_or_else(short)?;
            let done = r.u64().ok_or_else(short)?;
            let job = match kind {
                1 => Job::Edu {
                    cmd,
                    src,
                    dst,
                    cnt: len,
                },
                2 => Job::Engine {
                    base,
                    cmd: u32::try_from(cmd).map_err(|_| format!("engine command {cmd:#x}"))?,
                    src,
                    dst,
                    len,
                    vector,
                },
                k => return Err(format!("DMA job kind {k}")),
            };
            if done > len {
                return Err(format!("DMA job with {done} of {len} bytes done"));
            }
            jobs.push(JobRecord { bar, job, done });
        }
        if !r.done() {
            return Err("trailing bytes after the device state".into());
        }
        Ok(Snapshot {
            config,
            irq: IrqSnapshot {
                intx_level,
                intx_edge,
                msi_held,
                msix_held,
            },
            jobs,
        })
    }
}

/// Appends a record header.
pub(crate) fn record(out: &mut Vec<u8>, kind: u32, len: usize) {
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&(len as u32).to_le_bytes());
}

/// A 64-bit hash of a page's contents: how pre-copy finds the pages that
/// changed since they were sent (stores through an mmap are invisible to
/// the device, so every page is compared, not only trapped writes).
pub(crate) fn page_hash(data: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.update(data);
    h.value()
}

/// The bytes a page record takes in the stream.
pub(crate) fn page_record_len(data: &[u8]) -> u64 {
    if data.iter().all(|b| *b == 0) {
        (REC_HDR + ZERO_LEN) as u64
    } else {
        (REC_HDR + PAGE_HDR + data.len()) as u64
    }
}

/// One page of BAR memory the stream carries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PageRef {
    pub bar: u32,
    pub offset: u64,
    pub len: u32,
}

/// The pages of BAR memory, in stream order.
pub(crate) fn pages(bar_mem: &[u64; 6]) -> Vec<PageRef> {
    let mut out = Vec::new();
    for (i, len) in bar_mem.iter().enumerate() {
        let mut off = 0u64;
        while off < *len {
            let n = (*len - off).min(PAGE_SIZE);
            out.push(PageRef {
                bar: i as u32,
                offset: off,
                len: n as u32,
            });
            off += n;
        }
    }
    out
}

// ---------------------------------------------------------------- DMA log

/// The most ranges a DMA logging start takes (the kernel's
/// `LOG_MAX_RANGES`).
pub const MAX_LOG_RANGES: usize = 256;
/// The most pages a DMA log tracks in all (one bit each: 32 MiB of bitmap,
/// 1 TiB of guest memory at 4 KiB pages).
pub const MAX_LOG_PAGES: u64 = 1 << 28;

#[derive(Debug)]
struct LogRange {
    iova: u64,
    len: u64,
    bits: Vec<u64>,
}

#[derive(Debug)]
struct LogState {
    shift: u32,
    ranges: Vec<LogRange>,
}

/// The pages of guest memory the device's DMA wrote, while logging is on
/// (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`).
#[derive(Debug, Default)]
pub(crate) struct DmaLog {
    state: Mutex<Option<LogState>>,
}

fn einval(context: String) -> Error {
    Error::Refused {
        context,
        errno: libc::EINVAL,
    }
}

impl DmaLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<LogState>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn start(&self, page_size: u64, ranges: &[DirtyRange]) -> Result<()> {
        if page_size < PAGE_SIZE || !page_size.is_power_of_two() {
            return Err(einval(format!("DMA logging page size {page_size:#x}")));
        }
        let total = migration::check_logging_ranges(page_size, ranges, MAX_LOG_RANGES).map_err(
            |e| match e {
                LoggingRangesError::TooMany { .. } => Error::Refused {
                    context: format!("DMA logging of {e}"),
                    errno: libc::E2BIG,
                },
                _ => einval(format!("DMA logging at page size {page_size:#x}: {e}")),
            },
        )?;
        if total > MAX_LOG_PAGES {
            return Err(Error::Refused {
                context: format!("DMA logging of {total} pages (at most {MAX_LOG_PAGES})"),
                errno: libc::E2BIG,
            });
        }
        let mut st = self.lock();
        if st.is_some() {
            return Err(Error::Refused {
                context: "DMA logging is already started".into(),
                errno: libc::EBUSY,
            });
        }
        // Sorted by IOVA (disjoint, as checked above).
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|r| r.iova);
        let ranges = sorted
            .iter()
            .map(|r| LogRange {
                iova: r.iova,
                len: r.length,
                bits: vec![0; (r.length / page_size).div_ceil(64) as usize],
            })
            .collect();
        *st = Some(LogState {
            shift: page_size.trailing_zeros(),
            ranges,
        });
        Ok(())
    }

    pub(crate) fn stop(&self) {
        *self.lock() = None;
    }

    /// Logs a DMA write of `len` bytes at `iova` (no allocation).
    pub(crate) fn mark(&self, iova: u64, len: u64) {
        if len == 0 {
            return;
        }
        let mut st = self.lock();
        let Some(log) = st.as_mut() else {
            return;
        };
        let last = iova.saturating_add(len - 1);
        let shift = log.shift;
        for r in &mut log.ranges {
            let r_last = r.iova + (r.len - 1);
            if r.iova > last || r_last < iova {
                continue;
            }
            let first = (iova.max(r.iova) - r.iova) >> shift;
            let end = (last.min(r_last) - r.iova) >> shift;
            for p in first..=end {
                if let Some(w) = r.bits.get_mut((p / 64) as usize) {
                    *w |= 1u64 << (p % 64);
                }
            }
        }
    }

    pub(crate) fn report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<()> {
        if page_size < PAGE_SIZE || !page_size.is_power_of_two() {
            return Err(einval(format!(
                "DMA logging report page size {page_size:#x}"
            )));
        }
        let end = iova.checked_add(length);
        if length == 0 || end.is_none() || iova % page_size != 0 {
            return Err(einval(format!(
                "DMA logging report of {length:#x} bytes at {iova:#x}"
            )));
        }
        let words = migration::bitmap_words(length, page_size).unwrap_or(usize::MAX);
        let have = bitmap.len();
        let out = bitmap.get_mut(..words).ok_or_else(|| {
            einval(format!(
                "DMA logging report bitmap of {have} words for {words}"
            ))
        })?;
        let mut st = self.lock();
        let log = st
            .as_mut()
            .ok_or_else(|| einval("DMA logging report while logging is off".into()))?;
        out.fill(0);
        let last = iova + (length - 1);
        let shift = log.shift;
        let lps = 1u64 << shift;
        for r in &mut log.ranges {
            let r_last = r.iova + (r.len - 1);
            if r.iova > last || r_last < iova {
                continue;
            }
            let first = (iova.max(r.iova) - r.iova) >> shift;
            let end_p = (last.min(r_last) - r.iova) >> shift;
            for p in first..=end_p {
                let Some(w) = r.bits.get_mut((p / 64) as usize) else {
                    continue;
                };
                let m = 1u64 << (p % 64);
                if *w & m == 0 {
                    continue;
                }
                *w &= !m;
                let a = r.iova + (p << shift);
                let lo = a.max(iova) - iova;
                let hi = (a + (lps - 1)).min(last) - iova;
                for q in (lo / page_size)..=(hi / page_size) {
                    if let Some(o) = out.get_mut((q / 64) as usize) {
                        *o |= 1u64 << (q % 64);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use MigState::*;

    #[test]
    fn combination_transitions_follow_the_kernels_paths() {
        let all = FLAGS;
        let path = |from: MigState, to: MigState, flags: MigrationFlags| {
            let mut out = vec![from];
            let mut cur = from;
            while cur != to {
                cur = mig_next_state(cur, to, flags).unwrap();
                out.push(cur);
                assert!(out.len() < 8);
            }
            out
        };
        assert_eq!(
            path(Running, StopCopy, all),
            [Running, RunningP2p, Stop, StopCopy]
        );
        assert_eq!(
            path(PreCopy, StopCopy, all),
            [PreCopy, PreCopyP2p, StopCopy]
        );
        assert_eq!(
            path(Stop, PreCopy, all),
            [Stop, RunningP2p, Running, PreCopy]
        );
        assert_eq!(
            path(Resuming, Running, all),
            [Resuming, Stop, RunningP2p, Running]
        );
        assert_eq!(
            path(PreCopy, Stop, all),
            [PreCopy, Running, RunningP2p, Stop]
        );
        let sc = MigrationFlags(MigrationFlags::STOP_COPY);
        assert_eq!(path(Running, StopCopy, sc), [Running, Stop, StopCopy]);
        let pre = MigrationFlags(MigrationFlags::STOP_COPY | MigrationFlags::PRE_COPY);
        assert_eq!(path(PreCopy, StopCopy, pre), [PreCopy, StopCopy]);
        assert_eq!(mig_next_state(StopCopy, PreCopy, all), None);
        assert_eq!(mig_next_state(StopCopy, PreCopyP2p, all), None);
        assert_eq!(mig_next_state(Running, Error, all), None);
        assert_eq!(mig_next_state(Error, Running, all), None);
        assert_eq!(mig_next_state(Running, RunningP2p, sc), None);
        assert_eq!(mig_next_state(Running, PreCopy, sc), None);
    }

    #[test]
    fn dma_log_reports_written_pages_once() {
        let log = DmaLog::default();
        log.start(
            4096,
            &[DirtyRange {
                iova: 0x10000,
                length: 0x10000,
            }],
        )
        .unwrap();
        log.mark(0x11ffc, 8);
        log.mark(0x30000, 8);
        let mut bm = [0u64; 1];
        log.report(0x10000, 0x10000, 4096, &mut bm).unwrap();
        assert_eq!(bm[0], 0b110);
        log.report(0x10000, 0x10000, 4096, &mut bm).unwrap();
        assert_eq!(bm[0], 0);
        assert!(log
            .report(0x10000, 0x10000 * 64 * 2, 4096, &mut bm)
            .is_err());
    }
}
