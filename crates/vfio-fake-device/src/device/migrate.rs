//! The fake device's migration: its state machine, the save and load
//! sessions of its data stream, and quiescing its DMA and interrupts.
//!
//! Pre-copy: while the device runs (PRE_COPY, PRE_COPY_P2P) the stream
//! carries its BAR memory page by page, first every page (the initial
//! bytes), then, round after round, the pages whose contents changed since
//! they were sent (the dirty bytes). A page's change is found by comparing
//! a 64-bit hash of its contents with the hash of what was sent, so stores
//! through a client's mmap of the BAR, which the device cannot see, are
//! found as well as trapped writes and DMA into the BAR; a change that
//! leaves the hash equal (a 1 in 2^64 chance per change) would be missed.
//! STOP_COPY sends the pages still unsent or changed, then the device state
//! (config space, interrupt state, DMA in flight) and the end record.

use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant};

use vfio_backend::{Error, MigState, MigrationFlags, MigrationStream, PrecopyInfo, Result};

use super::{spawn_job, FakeDevice, InFlight, Inner, State, COMMAND_INTX_DISABLE};
use crate::inject::{Injected, MigOp};
use crate::mig::{
    self, mig_next_state, opens_stream, page_hash, page_record_len, quiesced, record, Fnv,
    Identity, JobRecord, PageRef, Reader, Snapshot, HEADER_LEN, KIND_END, KIND_PAGE, KIND_STATE,
    KIND_ZERO, MAX_STATE, PAGE_HDR, REC_HDR, ZERO_LEN,
};
use crate::regs::{dma_engine, edu, Job};
use crate::template::{RegisterKind, PAGE_SIZE};

/// The longest a transition waits for the DMA threads to park.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes a save session generates ahead of the reader, at most.
const CHUNK: usize = 64 * 1024;

/// The migration state and its session.
#[derive(Debug)]
pub(crate) struct MigCtl {
    pub state: MigState,
    /// The id of the current data stream; bumped whenever one ends, so a
    /// stream handle of an ended session is refused.
    session: u64,
    save: Option<Save>,
    load: Option<Load>,
}

impl Default for MigCtl {
    fn default() -> Self {
        MigCtl {
            state: MigState::Running,
            session: 0,
            save: None,
            load: None,
        }
    }
}

impl MigCtl {
    /// Device reset: RUNNING, no stream.
    pub(crate) fn reset(&mut self) {
        self.state = MigState::Running;
        self.end_session();
    }

    fn end_session(&mut self) {
        self.session = self.session.wrapping_add(1);
        self.save = None;
        self.load = None;
    }

    fn new_session(&mut self) -> u64 {
        self.end_session();
        self.session
    }
}

fn einval(context: impl Into<String>) -> Error {
    Error::Refused {
        context: context.into(),
        errno: libc::EINVAL,
    }
}

fn injected(op: MigOp, what: Injected) -> Error {
    match what {
        Injected::Dead => Error::Refused {
            context: format!("fake device {}: the device does not answer", op.name()),
            errno: libc::EIO,
        },
        Injected::Fail(errno) => Error::Refused {
            context: format!("fake device {}: injected failure", op.name()),
            errno,
        },
    }
}

/// The source side of a data stream.
#[derive(Debug)]
struct Save {
    pages: Vec<PageRef>,
    /// Hash of what was sent of each page (valid where `sent`).
    hashes: Vec<u64>,
    sent: Vec<bool>,
    unsent: usize,
    header_sent: bool,
    /// Generated and not read yet: `out[pos..]`.
    out: Vec<u8>,
    pos: usize,
    /// The next page the scan looks at.
    cursor: usize,
    /// STOP_COPY: one last pass, then the state and the end.
    stop_copy: bool,
    state_sent: bool,
    end_sent: bool,
    sum: Fnv,
    scratch: Vec<u8>,
}

impl Save {
    fn new(pages: Vec<PageRef>, stop_copy: bool) -> Save {
        let n = pages.len();
        Save {
            pages,
            hashes: vec![0; n],
            sent: vec![false; n],
            unsent: n,
            header_sent: false,
            out: Vec::with_capacity(CHUNK + PAGE_SIZE as usize * 2),
            pos: 0,
            cursor: 0,
            stop_copy,
            state_sent: false,
            end_sent: false,
            sum: Fnv::new(),
            scratch: vec![0; PAGE_SIZE as usize],
        }
    }

    fn enter_stop_copy(&mut self) {
        self.stop_copy = true;
        self.cursor = 0;
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.sum.update(bytes);
        self.out.extend_from_slice(bytes);
    }

    /// Reads page `i` into the scratch buffer; its length.
    fn load_page(&mut self, inner: &Inner, i: usize) -> usize {
        let Some(p) = self.pages.get(i).copied() else {
            return 0;
        };
        let n = p.len as usize;
        let Some(buf) = self.scratch.get_mut(..n) else {
            return 0;
        };
        if let Some(Some(bar)) = inner.bars.get(p.bar as usize) {
            bar.read(p.offset, buf);
        }
        n
    }

    /// Whether page `i` must be (re)sent; leaves it in the scratch buffer.
    fn wants(&mut self, inner: &Inner, i: usize) -> Option<(usize, u64)> {
        let n = self.load_page(inner, i);
        let h = page_hash(self.scratch.get(..n)?);
        let sent = self.sent.get(i).copied().unwrap_or(true);
        let same = self.hashes.get(i).is_some_and(|old| *old == h);
        (!sent || !same).then_some((n, h))
    }

    /// Sends page `i` (in the scratch buffer, `n` bytes, hash `h`).
    fn send_page(&mut self, i: usize, n: usize, h: u64) {
        let Some(p) = self.pages.get(i).copied() else {
            return;
        };
        let data = std::mem::take(&mut self.scratch);
        let page = data.get(..n).unwrap_or(&[]);
        let mut rec = Vec::with_capacity(REC_HDR + PAGE_HDR + n);
        if page.iter().all(|b| *b == 0) {
            record(&mut rec, KIND_ZERO, ZERO_LEN);
            rec.extend_from_slice(&p.bar.to_le_bytes());
            rec.extend_from_slice(&p.offset.to_le_bytes());
            rec.extend_from_slice(&p.len.to_le_bytes());
        } else {
            record(&mut rec, KIND_PAGE, PAGE_HDR + n);
            rec.extend_from_slice(&p.bar.to_le_bytes());
            rec.extend_from_slice(&p.offset.to_le_bytes());
            rec.extend_from_slice(page);
        }
        self.scratch = data;
        self.emit(&rec);
        if let Some(s) = self.sent.get_mut(i) {
            if !*s {
                self.unsent = self.unsent.saturating_sub(1);
            }
            *s = true;
        }
        if let Some(old) = self.hashes.get_mut(i) {
            *old = h;
        }
    }

    /// Generates the next bytes of the stream into `out`.
    fn fill(&mut self, inner: &Inner) {
        if !self.header_sent {
            let mut hdr = Vec::with_capacity(HEADER_LEN);
            inner.identity().encode(&mut hdr);
            self.emit(&hdr);
            self.header_sent = true;
        }
        let total = self.pages.len();
        if !self.stop_copy {
            // One round at most: each page looked at once.
            let mut looked = 0;
            while looked < total && self.out.len() < CHUNK {
                let i = self.cursor % total.max(1);
                self.cursor = i + 1;
                looked += 1;
                if let Some((n, h)) = self.wants(inner, i) {
                    self.send_page(i, n, h);
                }
            }
            return;
        }
        while self.cursor < total && self.out.len() < CHUNK {
            let i = self.cursor;
            self.cursor += 1;
            if let Some((n, h)) = self.wants(inner, i) {
                self.send_page(i, n, h);
            }
        }
        if self.cursor < total || self.out.len() >= CHUNK {
            return;
        }
        if !self.state_sent {
            let snap = inner.snapshot();
            let mut rec = Vec::with_capacity(REC_HDR + snap.encoded_len());
            record(&mut rec, KIND_STATE, snap.encoded_len());
            snap.encode(&mut rec);
            self.emit(&rec);
            self.state_sent = true;
        }
        if !self.end_sent {
            let sum = self.sum.value();
            let mut rec = Vec::with_capacity(REC_HDR + 8);
            record(&mut rec, KIND_END, 8);
            rec.extend_from_slice(&sum.to_le_bytes());
            self.out.extend_from_slice(&rec);
            self.end_sent = true;
        }
    }

    fn read(&mut self, inner: &Inner, buf: &mut [u8]) -> usize {
        if self.pos >= self.out.len() {
            self.out.clear();
            self.pos = 0;
            self.fill(inner);
        }
        let avail = self.out.get(self.pos..).unwrap_or(&[]);
        let n = avail.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), avail.get(..n)) {
            dst.copy_from_slice(src);
        }
        self.pos += n;
        n
    }

    /// What pre-copy has left: (initial, dirty) bytes.
    fn precopy_info(&mut self, inner: &Inner) -> PrecopyInfo {
        let mut initial = (self.out.len() - self.pos.min(self.out.len())) as u64;
        if !self.header_sent {
            initial += HEADER_LEN as u64;
        }
        let mut dirty = 0u64;
        for i in 0..self.pages.len() {
            let n = self.load_page(inner, i);
            let Some(data) = self.scratch.get(..n) else {
                continue;
            };
            let len = page_record_len(data);
            if !self.sent.get(i).copied().unwrap_or(true) {
                initial += len;
            } else if self.hashes.get(i).is_some_and(|h| *h != page_hash(data)) {
                dirty += len;
            }
        }
        PrecopyInfo {
            initial_bytes: initial,
            dirty_bytes: dirty,
        }
    }

    /// What STOP_COPY would stream from now on.
    fn remaining(&mut self, inner: &Inner) -> u64 {
        let info = self.precopy_info(inner);
        let mut n = info.initial_bytes + info.dirty_bytes;
        if !self.state_sent {
            n += (REC_HDR + inner.snapshot().encoded_len()) as u64;
        }
        if !self.end_sent {
            n += (REC_HDR + 8) as u64;
        }
        n
    }
}

/// Where the destination is in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Header,
    RecordHeader,
    Payload { kind: u32, len: usize },
    Nothing,
}

/// The destination side of a data stream.
#[derive(Debug)]
struct Load {
    id: Identity,
    want: Want,
    buf: Vec<u8>,
    sum: Fnv,
    state: Option<Snapshot>,
    ended: bool,
    poisoned: Option<String>,
}

const ZEROS: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];

impl Load {
    fn new(id: Identity) -> Load {
        Load {
            id,
            want: Want::Header,
            buf: Vec::with_capacity(REC_HDR + PAGE_HDR + PAGE_SIZE as usize),
            sum: Fnv::new(),
            state: None,
            ended: false,
            poisoned: None,
        }
    }

    fn need(&self) -> usize {
        match self.want {
            Want::Header => HEADER_LEN,
            Want::RecordHeader => REC_HDR,
            Want::Payload { len, .. } => len,
            Want::Nothing => 0,
        }
    }

    fn write(&mut self, inner: &Inner, mut data: &[u8]) -> Result<()> {
        if let Some(why) = &self.poisoned {
            return Err(einval(format!("migration stream already refused: {why}")));
        }
        while !data.is_empty() {
            if self.want == Want::Nothing {
                return self.poison("bytes after the end of the stream".into());
            }
            let need = self.need();
            let take = need.saturating_sub(self.buf.len()).min(data.len());
            let (now, rest) = data.split_at(take);
            self.buf.extend_from_slice(now);
            data = rest;
            if self.buf.len() < need {
                break;
            }
            let item = std::mem::take(&mut self.buf);
            let r = self.take(inner, &item);
            self.buf = item;
            self.buf.clear();
            if let Err(why) = r {
                return self.poison(why);
            }
        }
        Ok(())
    }

    fn poison(&mut self, why: String) -> Result<()> {
        let e = einval(format!("migration stream refused: {why}"));
        self.poisoned = Some(why);
        Err(e)
    }

    /// Takes one complete item (header, record header or payload).
    fn take(&mut self, inner: &Inner, item: &[u8]) -> std::result::Result<(), String> {
        match self.want {
            Want::Header => {
                self.id.check(item)?;
                self.sum.update(item);
                self.want = Want::RecordHeader;
            }
            Want::RecordHeader => {
                let mut r = Reader::new(item);
                let kind = r.u32().unwrap_or(0);
                let len = r.u32().unwrap_or(0) as usize;
                let ok = match kind {
                    KIND_PAGE => len > PAGE_HDR && len <= PAGE_HDR + PAGE_SIZE as usize,
                    KIND_ZERO => len == ZERO_LEN,
                    KIND_STATE => len <= MAX_STATE && self.state.is_none(),
                    KIND_END => len == 8,
                    _ => return Err(format!("unknown record kind {kind}")),
                };
                if !ok {
                    return Err(format!("record of kind {kind} with {len} bytes"));
                }
                if kind != KIND_END {
                    self.sum.update(item);
                }
                self.want = Want::Payload { kind, len };
                if len == 0 {
                    return self.take(inner, &[]);
                }
            }
            Want::Payload { kind, .. } => {
                let mut r = Reader::new(item);
                match kind {
                    KIND_PAGE | KIND_ZERO => {
                        let bar = r.u32().unwrap_or(u32::MAX);
                        let offset = r.u64().unwrap_or(u64::MAX);
                        let (len, bytes) = if kind == KIND_PAGE {
                            let b = item.get(PAGE_HDR..).unwrap_or(&[]);
                            (b.len() as u64, Some(b))
                        } else {
                            (u64::from(r.u32().unwrap_or(0)), None)
                        };
                        let target = inner
                            .bars
                            .get(bar as usize)
                            .and_then(Option::as_ref)
                            .filter(|b| {
                                offset % PAGE_SIZE == 0
                                    && offset < b.mem_len()
                                    && len == (b.mem_len() - offset).min(PAGE_SIZE)
                            })
                            .ok_or_else(|| {
                                format!("page of {len} bytes at {offset:#x} of BAR {bar}")
                            })?;
                        let src = bytes.unwrap_or(ZEROS.get(..len as usize).unwrap_or(&[]));
                        target.write(offset, src);
                        self.sum.update(item);
                    }
                    KIND_STATE => {
                        let snap = Snapshot::decode(&self.id, item)?;
                        inner.check_jobs(&snap.jobs)?;
                        self.sum.update(item);
                        self.state = Some(snap);
                    }
                    _ => {
                        let got = r.u64().unwrap_or(0);
                        if got != self.sum.value() {
                            return Err(format!(
                                "checksum {got:#018x}, the stream's bytes sum to {:#018x}",
                                self.sum.value()
                            ));
                        }
                        self.ended = true;
                        self.want = Want::Nothing;
                        return Ok(());
                    }
                }
                self.want = Want::RecordHeader;
            }
            Want::Nothing => return Err("bytes after the end of the stream".into()),
        }
        Ok(())
    }

    /// The state to load, once the stream is complete and valid.
    fn finish(&mut self) -> std::result::Result<Snapshot, String> {
        if let Some(why) = &self.poisoned {
            return Err(why.clone());
        }
        if !self.ended {
            return Err("the stream ended early (no end record)".into());
        }
        self.state
            .take()
            .ok_or_else(|| "the stream has no device state".into())
    }
}

/// The data stream handed out by [`FakeDevice`]'s `set_mig_state`.
struct FakeStream {
    inner: Arc<Inner>,
    session: u64,
}

impl FakeStream {
    fn ctl(&self, op: MigOp) -> Result<MutexGuard<'_, MigCtl>> {
        if let Some(what) = self.inner.faults.check_migration(op) {
            return Err(injected(op, what));
        }
        let m = self.inner.mig_lock();
        if m.session != self.session {
            return Err(Error::Refused {
                context: "migration stream of a session that ended".into(),
                errno: libc::EBADF,
            });
        }
        Ok(m)
    }
}

impl MigrationStream for FakeStream {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let inner = Arc::clone(&self.inner);
        let mut m = self.ctl(MigOp::StreamRead)?;
        let save = m
            .save
            .as_mut()
            .ok_or_else(|| einval("read of a RESUMING migration stream"))?;
        Ok(save.read(&inner, buf))
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let inner = Arc::clone(&self.inner);
        let mut m = self.ctl(MigOp::StreamWrite)?;
        let load = m
            .load
            .as_mut()
            .ok_or_else(|| einval("write to a saving migration stream"))?;
        load.write(&inner, data)
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo> {
        let inner = Arc::clone(&self.inner);
        let mut m = self.ctl(MigOp::PrecopyInfo)?;
        if !matches!(m.state, MigState::PreCopy | MigState::PreCopyP2p) {
            return Err(einval(format!("pre-copy info in state {}", m.state)));
        }
        let save = m
            .save
            .as_mut()
            .ok_or_else(|| einval("pre-copy info without a saving stream"))?;
        Ok(save.precopy_info(&inner))
    }
}

impl FakeDevice {
    pub(super) fn mig_enter(&self, op: MigOp) -> Result<()> {
        match self.inner.faults.check_migration(op) {
            None => Ok(()),
            Some(what) => Err(injected(op, what)),
        }
    }

    pub(super) fn set_migration_impl(&self, raw: u64) -> Result<()> {
        let m = self.inner.mig_lock();
        if m.state != MigState::Running || m.save.is_some() || m.load.is_some() {
            return Err(Error::Refused {
                context: format!("changing the migration flags in state {}", m.state),
                errno: libc::EBUSY,
            });
        }
        self.inner
            .mig_flags
            .store(raw, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn set_mig_state_impl(
        &self,
        target: MigState,
    ) -> Result<Option<Box<dyn MigrationStream>>> {
        if let Some(what) = self.inner.faults.check_migration(MigOp::SetState) {
            return Err(injected(MigOp::SetState, what));
        }
        let inner = &self.inner;
        let flags = inner.need_migration()?;
        let mut m = inner.mig_lock();
        if let Some(what) = inner.faults.check_migration(MigOp::SetStateError) {
            m.state = MigState::Error;
            m.end_session();
            return Err(injected(MigOp::SetStateError, what));
        }
        if target == MigState::Error || mig_next_state(target, target, flags).is_none() {
            return Err(einval(format!("migration state {target} cannot be set")));
        }
        let mut stream = None;
        while m.state != target {
            let next = mig_next_state(m.state, target, flags).ok_or_else(|| {
                einval(format!(
                    "no migration arc from {} towards {target}",
                    m.state
                ))
            })?;
            if let Some(s) = self.arc(&mut m, next)? {
                stream = Some(s);
            }
        }
        Ok(stream)
    }

    /// Takes one arc of the state machine. On failure the state is what
    /// the failure left (ERROR for a transition that could not be undone).
    fn arc(&self, m: &mut MigCtl, next: MigState) -> Result<Option<Box<dyn MigrationStream>>> {
        use MigState::*;
        let inner = &self.inner;
        let from = m.state;
        if quiesced(next) && !quiesced(from) {
            if let Err(e) = inner.quiesce() {
                m.state = Error;
                m.end_session();
                return Err(e);
            }
        }
        match (from, next) {
            (StopCopy, Stop) | (PreCopy, Running) | (PreCopyP2p, RunningP2p) => m.end_session(),
            (Resuming, Stop) => {
                let loaded = m
                    .load
                    .as_mut()
                    .ok_or_else(|| "no data stream".to_string())
                    .and_then(Load::finish);
                m.end_session();
                match loaded {
                    Ok(snap) => inner.apply(&snap),
                    Err(why) => {
                        m.state = Error;
                        return Err(einval(format!(
                            "leaving RESUMING: the migration data is refused: {why}"
                        )));
                    }
                }
            }
            (PreCopyP2p, StopCopy) => {
                if let Some(s) = m.save.as_mut() {
                    s.enter_stop_copy();
                }
            }
            _ => {}
        }
        let mut stream: Option<Box<dyn MigrationStream>> = None;
        if opens_stream(from, next) {
            let session = m.new_session();
            let id = inner.identity();
            if next == Resuming {
                m.load = Some(Load::new(id));
            } else {
                m.save = Some(Save::new(mig::pages(&id.bar_mem), next == StopCopy));
            }
            stream = Some(Box::new(FakeStream {
                inner: Arc::clone(inner),
                session,
            }));
        }
        m.state = next;
        if !quiesced(next) && quiesced(from) {
            unquiesce(inner);
        }
        Ok(stream)
    }
}

/// Lets a quiesced device run: interrupts held are delivered, parked
/// transfers go on from where they stopped.
fn unquiesce(inner: &Arc<Inner>) {
    let mut starts = Vec::new();
    {
        let mut st = inner.lock();
        st.quiesced = false;
        st.irq.set_quiesced(false, &inner.counters);
        let epoch = st.dma_epoch;
        let mut n = 0;
        for j in st.jobs.iter_mut().filter(|j| !j.running) {
            j.running = true;
            n += 1;
            starts.push((j.bar, j.job, epoch, j.done));
        }
        st.dma_threads += n;
    }
    for (bar, job, epoch, done) in starts {
        spawn_job(inner, bar, job, epoch, done);
    }
}

impl Inner {
    /// The migration flags offered, if the device can migrate.
    pub(super) fn migration(&self) -> Option<MigrationFlags> {
        match self.mig_flags.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            f => Some(MigrationFlags(f)),
        }
    }

    /// The flags, or `Unsupported` for a device that cannot migrate.
    pub(super) fn need_migration(&self) -> Result<MigrationFlags> {
        self.migration()
            .ok_or_else(|| Error::Unsupported("this fake device does not migrate".into()))
    }

    pub(super) fn mig_lock(&self) -> MutexGuard<'_, MigCtl> {
        // Every update is a plain store or a whole session replaced.
        self.mig.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// No DMA starts and no interrupt is raised from now on; waits
    /// (bounded, without holding the lock) for the transfers under way to
    /// park.
    fn quiesce(&self) -> Result<()> {
        let mut st = self.lock();
        st.quiesced = true;
        st.irq.set_quiesced(true, &self.counters);
        let deadline = Instant::now() + QUIESCE_TIMEOUT;
        while st.dma_threads > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Refused {
                    context: format!(
                        "{} DMA transfers did not stop within {QUIESCE_TIMEOUT:?}",
                        st.dma_threads
                    ),
                    errno: libc::ETIMEDOUT,
                });
            }
            st = match self.idle.wait_timeout(st, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        Ok(())
    }

    pub(super) fn identity(&self) -> Identity {
        let cfg = self.template.config();
        let mut ids = [0u8; 4];
        if let Some(src) = cfg.get(..4) {
            ids.copy_from_slice(src);
        }
        let mut bar_mem = [0u64; 6];
        for (m, b) in bar_mem.iter_mut().zip(&self.bars) {
            *m = b.as_ref().map_or(0, |b| b.mem_len());
        }
        let words = |n: u32| (n as usize).div_ceil(64) as u32;
        Identity {
            ids,
            config_len: cfg.len() as u32,
            bar_mem,
            msi_words: words(self.template.msi().map_or(0, |m| m.vectors)),
            msix_words: words(self.template.msix().map_or(0, |m| m.vectors)),
        }
    }

    fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        snapshot_of(&st)
    }

    /// What STOP_COPY would stream now.
    pub(super) fn stop_copy_size(&self) -> u64 {
        if let Some(save) = self.mig_lock().save.as_mut() {
            return save.remaining(self);
        }
        let id = self.identity();
        let mut n = HEADER_LEN as u64;
        let mut scratch = vec![0u8; PAGE_SIZE as usize];
        for p in mig::pages(&id.bar_mem) {
            let Some(buf) = scratch.get_mut(..p.len as usize) else {
                continue;
            };
            if let Some(Some(bar)) = self.bars.get(p.bar as usize) {
                bar.read(p.offset, buf);
            }
            n += page_record_len(buf);
        }
        n + (REC_HDR + self.snapshot().encoded_len() + REC_HDR + 8) as u64
    }

    /// Checks migrated DMA jobs against this device's engines.
    fn check_jobs(&self, jobs: &[JobRecord]) -> std::result::Result<(), String> {
        let mut keys = Vec::with_capacity(jobs.len());
        for j in jobs {
            let blocks = self.bars.get(j.bar as usize).and_then(Option::as_ref);
            let ok = blocks.is_some_and(|b| {
                b.blocks.iter().any(|blk| match (blk.kind, j.job) {
                    (RegisterKind::Edu, Job::Edu { cnt, .. }) => {
                        cnt <= edu::DMA_BUFFER_SIZE && j.done == 0
                    }
                    (
                        RegisterKind::DmaEngine { irq_vector },
                        Job::Engine {
                            base, vector, len, ..
                        },
                    ) => blk.offset == base && irq_vector == vector && len <= dma_engine::MAX_LEN,
                    _ => false,
                })
            });
            let key = super::job_key(j.bar, &j.job);
            if !ok || keys.contains(&key) {
                return Err(format!(
                    "DMA job {:?} of BAR {} fits no engine",
                    j.job, j.bar
                ));
            }
            keys.push(key);
        }
        Ok(())
    }

    /// Takes a migrated state (BAR memory came with the stream's pages).
    fn apply(&self, snap: &Snapshot) {
        let mut guard = self.lock();
        let st = &mut *guard;
        st.dma_epoch = st.dma_epoch.wrapping_add(1);
        if st.config.len() == snap.config.len() {
            st.config.copy_from_slice(&snap.config);
        }
        self.sync_command(&st.config);
        if st.irq.fits(&snap.irq) {
            st.irq.load(&snap.irq);
        }
        let disabled =
            self.command.load(std::sync::atomic::Ordering::Relaxed) & COMMAND_INTX_DISABLE != 0;
        st.irq.set_intx_disabled(disabled, &self.counters);
        st.jobs.clear();
        st.jobs.extend(snap.jobs.iter().map(|j| InFlight {
            bar: j.bar,
            job: j.job,
            done: j.done,
            running: false,
        }));
    }
}

fn snapshot_of(st: &State) -> Snapshot {
    Snapshot {
        config: st.config.clone(),
        irq: st.irq.snapshot(),
        jobs: st
            .jobs
            .iter()
            .map(|j| JobRecord {
                bar: j.bar,
                job: j.job,
                done: j.done,
            })
            .collect(),
    }
}
