//! Live migration of a device: the source handle, the destination's load,
//! and the identity a destination checks first.
//!
//! The device's own state travels through the backend's migration
//! (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` and its data stream, or
//! vfio-user's `MIG_DATA_READ` / `_WRITE`); the state this crate emulates
//! is the [`snapshot`](VfioPciDevice::snapshot), plus the vectors whose
//! signal waits, latched, in the VMM's notifiers. Both go into one stream
//! (see [`crate::migration`]).

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::Ordering;

use pci_interrupts::InterruptSourceGroup;
use vfio_backend::{MigState, MigrationFlags, MigrationStream, PrecopyInfo};

use super::{lock, VfioPciDevice};
use crate::migration::stream::{
    BarIdentity, DeviceIdentity, EmulatedState, StreamReader, StreamWriter, MAX_CHUNK_LEN,
    MAX_DEVICE_DATA,
};
use crate::{Error, Result};

/// What a device's backend offers for migration
/// ([`VfioPciDevice::migration_caps`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationCaps {
    /// The backend's flags (`VFIO_MIGRATION_STOP_COPY`, `_P2P`, `_PRE_COPY`).
    pub flags: MigrationFlags,
}

impl MigrationCaps {
    /// [`MigrationSource::precopy`] works: the device streams part of its
    /// state while it runs.
    pub fn pre_copy(&self) -> bool {
        self.flags.pre_copy()
    }

    /// [`MigrationSource::quiesce`] works: the device can stop starting DMA
    /// and raising interrupts while still answering its peers.
    pub fn p2p(&self) -> bool {
        self.flags.p2p()
    }
}

/// Where a [`MigrationSource`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// RUNNING, or PRE_COPY when the device has it.
    Live,
    /// RUNNING_P2P or PRE_COPY_P2P.
    Quiesced,
    /// STOP, the whole stream written.
    Stopped,
    /// Completed or aborted: nothing more to do.
    Done,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Live => "running",
            Phase::Quiesced => "quiesced",
            Phase::Stopped => "stopped and copied",
            Phase::Done => "over",
        }
    }
}

/// The source side of one device's migration, from
/// [`VfioPciDevice::start_migration`].
///
/// The order of calls: [`precopy`](Self::precopy) any number of times
/// (only where [`MigrationCaps::pre_copy`]), [`quiesce`](Self::quiesce)
/// (only where [`MigrationCaps::p2p`]; a VMM with several devices quiesces
/// them all before it stops any), [`stop_and_copy`](Self::stop_and_copy)
/// once the vCPUs are paused, then [`complete`](Self::complete) once the
/// destination runs. Everything written to the `out`s, in order, is one
/// stream for [`VfioPciDevice::resume_migration`].
///
/// Any failing step aborts: the device is RUNNING again, its guest-visible
/// state as it was, and the handle refuses every later step. So does
/// [`abort`](Self::abort) (the VMM gives up, e.g. the destination failed,
/// even after [`stop_and_copy`](Self::stop_and_copy)), and so does dropping
/// the handle without [`complete`](Self::complete).
///
/// One migration at a time per device: while a handle lives,
/// [`VfioPciDevice::start_migration`] and [`VfioPciDevice::resume_migration`]
/// are refused with [`Error::MigrationPhase`].
pub struct MigrationSource<'a> {
    dev: &'a VfioPciDevice,
    caps: MigrationCaps,
    identity: DeviceIdentity,
    stream: Option<Box<dyn MigrationStream>>,
    writer: StreamWriter,
    phase: Phase,
    buf: Vec<u8>,
    /// The device's migration flag, cleared when the handle goes.
    _flag: Migrating<'a>,
}

impl std::fmt::Debug for MigrationSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrationSource")
            .field("caps", &self.caps)
            .field("phase", &self.phase)
            .field("written", &self.writer.written())
            .finish()
    }
}

fn backend(context: &'static str) -> impl FnOnce(vfio_backend::Error) -> Error {
    move |e| Error::backend(context, e)
}

impl MigrationSource<'_> {
    /// What the device's backend offers.
    pub fn caps(&self) -> MigrationCaps {
        self.caps
    }

    /// Bytes written to the stream so far.
    pub fn written(&self) -> u64 {
        self.writer.written()
    }

    /// The device's estimate of the bytes of its state
    /// [`stop_and_copy`](Self::stop_and_copy) will stream
    /// (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`): with the pre-copy estimate,
    /// what a VMM weighs against its downtime budget.
    pub fn stop_copy_size(&self) -> Result<u64> {
        self.dev
            .vfio
            .mig_data_size()
            .map_err(backend("reading the stop-copy size"))
    }

    /// One pre-copy round while the device runs: writes what the device
    /// has now (at most what it estimated at the start of the round) and
    /// returns its estimate of what remains. Where the backend gives no
    /// estimate (vfio-user has no `VFIO_MIG_GET_PRECOPY_INFO`), the round
    /// reads until the device has nothing more, at most
    /// [`PRECOPY_ROUND_MAX`], and returns 0 remaining if it got there, else
    /// `dirty_bytes` = [`PRECOPY_ROUND_MAX`] (more remains). The VMM repeats rounds until
    /// the estimate is small enough, then stops the device. Refused
    /// ([`Error::MigrationFeature`]) without PRE_COPY.
    pub fn precopy(&mut self, out: &mut impl Write) -> Result<PrecopyInfo> {
        self.expect(&[Phase::Live, Phase::Quiesced], "pre-copy")?;
        if !self.caps.pre_copy() {
            return Err(Error::MigrationFeature {
                feature: "PRE_COPY",
            });
        }
        let r = self.precopy_round(out);
        self.or_abort(r)
    }

    fn precopy_round(&mut self, out: &mut dyn Write) -> Result<PrecopyInfo> {
        self.ensure_started(out)?;
        let stream = self.stream.as_mut().ok_or(Error::MigrationPhase {
            step: "pre-copy",
            phase: "without a data stream",
        })?;
        // The round reads what the device estimates it has now; without an
        // estimate (vfio-user has no VFIO_MIG_GET_PRECOPY_INFO), until the
        // device has nothing more, at most PRECOPY_ROUND_MAX.
        let estimate = precopy_estimate(stream.as_mut())?;
        let budget = estimate.map_or(PRECOPY_ROUND_MAX, |i| {
            i.initial_bytes.saturating_add(i.dirty_bytes)
        });
        let mut done = 0u64;
        let mut drained = false;
        while done < budget {
            let want = usize::try_from(budget - done)
                .unwrap_or(usize::MAX)
                .min(self.buf.len());
            let Some(room) = self.buf.get_mut(..want) else {
                break;
            };
            let n = stream
                .read(room)
                .map_err(backend("reading pre-copy data"))?;
            if n == 0 {
                drained = true;
                break;
            }
            let piece = room.get(..n).ok_or(Error::MigrationPhase {
                step: "pre-copy",
                phase: "the backend read more than asked",
            })?;
            check_room(self.writer.data_bytes(), n)?;
            self.writer.data(out, piece)?;
            done += n as u64;
        }
        match precopy_estimate(stream.as_mut())? {
            Some(info) => Ok(info),
            // No estimate: nothing remains if the device had nothing more;
            // else at least what a round reads.
            None if drained => Ok(PrecopyInfo::default()),
            None => Ok(PrecopyInfo {
                initial_bytes: 0,
                dirty_bytes: PRECOPY_ROUND_MAX,
            }),
        }
    }

    /// Quiesces the device (RUNNING_P2P, or PRE_COPY_P2P while pre-copying):
    /// it starts no DMA and raises no interrupt, but still answers its
    /// peers. A VMM with several devices quiesces every one before it stops
    /// any. Refused ([`Error::MigrationFeature`]) without P2P.
    pub fn quiesce(&mut self) -> Result<()> {
        self.expect(&[Phase::Live], "quiesce")?;
        if !self.caps.p2p() {
            return Err(Error::MigrationFeature { feature: "P2P" });
        }
        let to = if self.caps.pre_copy() {
            MigState::PreCopyP2p
        } else {
            MigState::RunningP2p
        };
        let r = self
            .dev
            .vfio
            .set_mig_state(to)
            .map_err(backend("quiescing the device"))
            .map(|s| {
                if let Some(s) = s {
                    self.stream = Some(s);
                }
            });
        self.or_abort(r)?;
        self.phase = Phase::Quiesced;
        Ok(())
    }

    /// Stops the device (STOP_COPY) and writes the rest of the stream: the
    /// device's remaining state, then the state this crate emulates (config
    /// space, BAR placement, MSI / MSI-X / INTx, pending vectors), then the
    /// end. The device is left in STOP; [`complete`](Self::complete) or
    /// [`abort`](Self::abort) follows. The VMM has paused the vCPUs (the
    /// guest must not change the emulated state from here on).
    pub fn stop_and_copy(&mut self, out: &mut impl Write) -> Result<()> {
        self.expect(&[Phase::Live, Phase::Quiesced], "stop-and-copy")?;
        let r = self.stop_copy(out);
        self.or_abort(r)?;
        self.phase = Phase::Stopped;
        Ok(())
    }

    fn stop_copy(&mut self, out: &mut dyn Write) -> Result<()> {
        self.ensure_started(out)?;
        if let Some(s) = self
            .dev
            .vfio
            .set_mig_state(MigState::StopCopy)
            .map_err(backend("stopping the device (STOP_COPY)"))?
        {
            self.stream = Some(s);
        }
        let stream = self.stream.as_mut().ok_or(Error::MigrationPhase {
            step: "stop-and-copy",
            phase: "STOP_COPY without a data stream",
        })?;
        loop {
            let n = stream
                .read(&mut self.buf)
                .map_err(backend("reading the device state"))?;
            if n == 0 {
                break;
            }
            let piece = self.buf.get(..n).ok_or(Error::MigrationPhase {
                step: "stop-and-copy",
                phase: "the backend read more than asked",
            })?;
            check_room(self.writer.data_bytes(), n)?;
            self.writer.data(out, piece)?;
        }
        // The device is stopped: nothing changes its interrupts any more.
        let emulated = self.dev.emulated_state()?;
        self.writer.finish(out, &emulated)?;
        self.stream = None;
        self.dev
            .vfio
            .set_mig_state(MigState::Stop)
            .map_err(backend("stopping the device (STOP)"))?;
        Ok(())
    }

    /// The destination runs: the migration is over and the device stays
    /// stopped (the VMM drops it). Only after
    /// [`stop_and_copy`](Self::stop_and_copy).
    pub fn complete(mut self) -> Result<()> {
        self.expect(&[Phase::Stopped], "complete")?;
        self.phase = Phase::Done;
        Ok(())
    }

    /// Gives the migration up: the device is RUNNING again with the
    /// guest-visible state it had (the emulated state is never changed on
    /// the source). Works at every step, after
    /// [`stop_and_copy`](Self::stop_and_copy) too. If the device cannot go
    /// back (it went to the ERROR state), it is reset, and the error is
    /// returned.
    pub fn abort(mut self) -> Result<()> {
        self.abort_now()
    }

    fn abort_now(&mut self) -> Result<()> {
        if self.phase == Phase::Done {
            return Ok(());
        }
        self.phase = Phase::Done;
        // The data stream ends before the state changes.
        self.stream = None;
        let vfio = &self.dev.vfio;
        match vfio.set_mig_state(MigState::Running) {
            Ok(_) => Ok(()),
            Err(e) => {
                log::error!("migration abort: the device refused RUNNING: {e}; resetting it");
                if let Err(r) = vfio.reset() {
                    log::error!("migration abort: reset: {r}");
                }
                if !matches!(vfio.mig_state(), Ok(MigState::Running)) {
                    if let Err(r) = vfio.set_mig_state(MigState::Running) {
                        log::error!("migration abort: RUNNING after the reset: {r}");
                    }
                }
                Err(Error::backend("returning the device to RUNNING", e))
            }
        }
    }

    fn expect(&self, phases: &[Phase], step: &'static str) -> Result<()> {
        if phases.contains(&self.phase) {
            Ok(())
        } else {
            Err(Error::MigrationPhase {
                step,
                phase: self.phase.name(),
            })
        }
    }

    /// `r`, after aborting when it is an error.
    fn or_abort<T>(&mut self, r: Result<T>) -> Result<T> {
        if r.is_err() {
            if let Err(a) = self.abort_now() {
                log::error!("migration abort after a failed step: {a}");
            }
        }
        r
    }

    fn ensure_started(&mut self, out: &mut dyn Write) -> Result<()> {
        if !self.writer.started() {
            self.writer.start(out, &self.identity)?;
        }
        Ok(())
    }
}

/// The most a pre-copy round reads from a device that gives no estimate of
/// what it has (vfio-user): the round ends earlier when the device has
/// nothing more.
pub const PRECOPY_ROUND_MAX: u64 = 64 << 20;

/// The device's pre-copy estimate; `None` when its backend has none.
fn precopy_estimate(stream: &mut dyn MigrationStream) -> Result<Option<PrecopyInfo>> {
    match stream.precopy_info() {
        Ok(i) => Ok(Some(i)),
        Err(vfio_backend::Error::Unsupported(_)) => Ok(None),
        Err(e) => Err(Error::backend("reading the pre-copy estimate", e)),
    }
}

/// The device's migration flag, cleared when this drops.
struct Migrating<'a>(&'a VfioPciDevice);

impl<'a> Migrating<'a> {
    /// Sets the flag, or says a migration is under way already.
    fn take(dev: &'a VfioPciDevice, step: &'static str) -> Result<Self> {
        dev.migrating
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| Migrating(dev))
            .map_err(|_| Error::MigrationPhase {
                step,
                phase: "under way already on this device",
            })
    }
}

impl Drop for Migrating<'_> {
    fn drop(&mut self) {
        self.0.migrating.store(false, Ordering::Release);
    }
}

/// Refuses device data beyond what a destination accepts.
fn check_room(so_far: u64, more: usize) -> Result<()> {
    if so_far.saturating_add(more as u64) > MAX_DEVICE_DATA {
        return Err(Error::MigrationStream {
            offset: so_far,
            fault: crate::migration::StreamFault::TooMuchData {
                limit: MAX_DEVICE_DATA,
            },
        });
    }
    Ok(())
}

impl Drop for MigrationSource<'_> {
    /// Aborts a migration neither completed nor aborted: the device runs.
    fn drop(&mut self) {
        if let Err(e) = self.abort_now() {
            log::error!("migration abandoned: {e}");
        }
    }
}

/// A destination device loaded from a migration stream, quiesced, from
/// [`VfioPciDevice::load_migration`]: [`run`](Self::run) it once every
/// device of the VMM is loaded. Dropped without running, the device is
/// reset (as [`VfioPciDevice::reset`]) and left RUNNING, as after a failed
/// load.
#[must_use = "the device runs only once run() is called; dropped, it is reset"]
pub struct LoadedMigration<'a> {
    dev: &'a VfioPciDevice,
    done: bool,
    _flag: Migrating<'a>,
}

impl std::fmt::Debug for LoadedMigration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedMigration")
            .field("done", &self.done)
            .finish()
    }
}

impl LoadedMigration<'_> {
    /// Runs the device (RUNNING). On failure it is reset and left RUNNING,
    /// and the error is returned.
    pub fn run(mut self) -> Result<()> {
        let r = self
            .dev
            .vfio
            .set_mig_state(MigState::Running)
            .map_err(backend("running the device"));
        self.or_reset(r)?;
        self.done = true;
        Ok(())
    }

    fn or_reset<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            log::error!("migration resume failed, resetting the device: {e}");
            self.done = true;
            self.dev.reset_after_failed_load();
        }
        r
    }
}

impl Drop for LoadedMigration<'_> {
    fn drop(&mut self) {
        if !self.done {
            log::warn!("a loaded migration was dropped without running: resetting the device");
            self.dev.reset_after_failed_load();
        }
    }
}

impl VfioPciDevice {
    /// What the device's backend offers for migration;
    /// [`Error::MigrationUnsupported`] when it cannot migrate the device's
    /// own state.
    pub fn migration_caps(&self) -> Result<MigrationCaps> {
        match self
            .vfio
            .migration_flags()
            .map_err(backend("probing migration"))?
        {
            Some(flags) if flags.stop_copy() => Ok(MigrationCaps { flags }),
            _ => Err(Error::MigrationUnsupported),
        }
    }

    /// The device as the guest sees it, which a migration destination
    /// must match: ids, BAR layout, capabilities, interrupt layout.
    pub fn identity(&self) -> Result<DeviceIdentity> {
        let vendor_device = self.read_config_register(0);
        let class_revision = self.read_config_register(2);
        let header_type = (self.read_config_register(3) >> 16) as u8;
        let subsystem = self.read_config_register(11);
        let inner = lock(&self.inner, "device")?;
        let bars = inner
            .bars
            .iter()
            .flatten()
            .chain(inner.rom.iter())
            .map(|b| BarIdentity {
                index: b.index,
                kind: b.kind,
                region_size: b.region.size,
                guest_size: b.layout.guest_size,
                msix_relocated: b.layout.relocated,
            })
            .collect();
        Ok(DeviceIdentity {
            vendor_device,
            class_revision,
            subsystem,
            header_type,
            config_size: self.config_size as u64,
            bars,
            capabilities: self.kept.clone(),
            msi_vectors: inner.msi.as_ref().map_or(0, |m| m.state.max_vectors()),
            msix_vectors: inner.msix.as_ref().map_or(0, |m| m.state.table_size()),
            msix_layout: inner.msix.as_ref().map(|m| {
                [
                    (m.table.0 as u64, m.table.1.offset, m.table.1.len),
                    (m.pba.0 as u64, m.pba.1.offset, m.pba.1.len),
                ]
            }),
            intx: inner.intx.is_some(),
        })
    }

    /// Starts migrating the device out: checks it can
    /// ([`migration_caps`](Self::migration_caps)) and, where it has
    /// PRE_COPY, moves it there (it keeps running). See
    /// [`MigrationSource`] for the steps that follow.
    pub fn start_migration(&self) -> Result<MigrationSource<'_>> {
        let caps = self.migration_caps()?;
        let flag = Migrating::take(self, "start_migration")?;
        let identity = self.identity()?;
        let state = self
            .vfio
            .mig_state()
            .map_err(backend("reading the migration state"))?;
        if state != MigState::Running {
            return Err(Error::MigrationDeviceState {
                state,
                expected: MigState::Running,
            });
        }
        let mut src = MigrationSource {
            dev: self,
            caps,
            identity,
            stream: None,
            writer: StreamWriter::default(),
            phase: Phase::Live,
            buf: vec![0u8; MAX_CHUNK_LEN as usize],
            _flag: flag,
        };
        if caps.pre_copy() {
            let r = self
                .vfio
                .set_mig_state(MigState::PreCopy)
                .map_err(backend("entering PRE_COPY"));
            src.stream = src.or_abort(r)?;
        }
        Ok(src)
    }

    /// Loads a migration stream into this (destination) device and runs it.
    ///
    /// Before the device is touched, the whole stream is read and checked:
    /// its prefix (magic, format version), the identity of the device it
    /// was taken from against this one's ([`identity`](Self::identity);
    /// [`Error::MigrationMismatch`]), every chunk's sequence number, length
    /// and CRC, the end marker, and the emulated state as
    /// [`restore`](Self::restore) would check it. A stream refused there
    /// ([`Error::MigrationStream`], [`Error::MigrationMismatch`],
    /// [`Error::MigrationIo`], the snapshot errors) leaves the device as it
    /// was: RUNNING, its state untouched. Nothing past the stream's end is
    /// read.
    ///
    /// Then the device goes to RESUMING, takes its state, goes to STOP,
    /// this crate's state is restored (config space, BAR placement,
    /// interrupt wiring; vectors pending on the source are latched in this
    /// VMM's notifiers, for delivery when the guest unmasks them), and the
    /// device goes RUNNING (through RUNNING_P2P where it has P2P). A VMM
    /// with several devices uses [`load_migration`](Self::load_migration)
    /// instead, to run them only once all are loaded. If any of that fails (the device refuses its
    /// state, a BAR cannot be placed where the source had it), the device
    /// is reset as by [`reset`](Self::reset) (BAR placements kept,
    /// decoding, bus mastering and interrupts off) and left RUNNING, and
    /// the error is returned.
    pub fn resume_migration(&self, input: impl Read) -> Result<()> {
        self.load_migration(input)?.run()
    }

    /// [`resume_migration`](Self::resume_migration) for a VMM with several
    /// devices, up to but not including RUNNING: every check, the device's
    /// state and ours loaded, the device left quiesced (RUNNING_P2P where
    /// it has P2P, else STOP). The VMM loads every device, then
    /// [`run`](LoadedMigration::run)s each: no device starts DMA to a peer
    /// that is not ready yet. Refusals and failures are as for
    /// [`resume_migration`](Self::resume_migration).
    pub fn load_migration(&self, input: impl Read) -> Result<LoadedMigration<'_>> {
        let caps = self.migration_caps()?;
        let flag = Migrating::take(self, "resume_migration")?;
        let (mut reader, identity) = StreamReader::open(input)?;
        let here = self.identity()?;
        if let Some(reason) = identity.mismatch(&here) {
            return Err(Error::MigrationMismatch { reason });
        }
        let body = reader.body(MAX_DEVICE_DATA)?;
        self.check_snapshot(&body.emulated.snapshot)?;
        self.check_pending(&body.emulated)?;
        // From here on the device changes: a failure resets it.
        let mut loaded = LoadedMigration {
            dev: self,
            done: false,
            _flag: flag,
        };
        let r = self.load(&body.data, &body.emulated, caps);
        loaded.or_reset(r)?;
        Ok(loaded)
    }

    fn load(&self, data: &[Vec<u8>], emulated: &EmulatedState, caps: MigrationCaps) -> Result<()> {
        let mut stream = self
            .vfio
            .set_mig_state(MigState::Resuming)
            .map_err(backend("entering RESUMING"))?
            .ok_or(Error::MigrationPhase {
                step: "resume",
                phase: "RESUMING without a data stream",
            })?;
        for d in data {
            stream
                .write(d)
                .map_err(backend("writing the device state"))?;
        }
        drop(stream);
        self.vfio
            .set_mig_state(MigState::Stop)
            .map_err(backend("loading the device state (RESUMING to STOP)"))?;
        self.restore(&emulated.snapshot)?;
        self.latch_pending(emulated)?;
        if caps.p2p() {
            self.vfio
                .set_mig_state(MigState::RunningP2p)
                .map_err(backend("quiescing the device (RUNNING_P2P)"))?;
        }
        Ok(())
    }

    /// After a failed load: reset (as [`reset`](Self::reset)) and RUNNING;
    /// errors are logged.
    fn reset_after_failed_load(&self) {
        if let Err(r) = self.reset() {
            log::error!("migration resume: reset: {r}");
        }
        if !matches!(self.vfio.mig_state(), Ok(MigState::Running)) {
            if let Err(r) = self.vfio.set_mig_state(MigState::Running) {
                log::error!("migration resume: RUNNING after the reset: {r}");
            }
        }
    }

    /// The state this crate emulates, with the vectors pending now.
    fn emulated_state(&self) -> Result<EmulatedState> {
        let snapshot = self.snapshot()?;
        let inner = lock(&self.inner, "device")?;
        let pending_msi = inner.msi.as_ref().map_or_else(Vec::new, |m| {
            let n = m.state.num_enabled_vectors();
            latched(m.group.as_ref(), n, |v| m.state.vector_masked(v))
        });
        let pending_msix = inner.msix.as_ref().map_or_else(Vec::new, |m| {
            latched(m.group.as_ref(), m.state.table_size(), |v| {
                m.state.function_masked() || m.state.vector_masked(v)
            })
        });
        Ok(EmulatedState {
            snapshot,
            pending_msi,
            pending_msix,
        })
    }

    fn check_pending(&self, e: &EmulatedState) -> Result<()> {
        let inner = lock(&self.inner, "device")?;
        let msi = inner.msi.as_ref().map_or(0, |m| m.state.max_vectors());
        let msix = inner.msix.as_ref().map_or(0, |m| m.state.table_size());
        for (list, count, what) in [
            (&e.pending_msi, msi, "MSI"),
            (&e.pending_msix, msix, "MSI-X"),
        ] {
            if let Some(v) = list.iter().find(|v| **v >= count) {
                return Err(Error::SnapshotMismatch {
                    reason: format!("pending {what} vector {v}: the device has {count}"),
                });
            }
            // Each at most once, in order (as a source writes them): a
            // vector is latched once, whatever the stream says.
            if list.windows(2).any(|w| w.first() >= w.get(1)) {
                return Err(Error::SnapshotMismatch {
                    reason: format!("pending {what} vectors not strictly ascending"),
                });
            }
        }
        Ok(())
    }

    /// Latches the source's pending vectors in this VMM's notifiers: each
    /// is delivered when the guest unmasks it, as it would have been there.
    fn latch_pending(&self, e: &EmulatedState) -> Result<()> {
        let inner = lock(&self.inner, "device")?;
        let groups = [
            (inner.msi.as_ref().map(|m| &m.group), &e.pending_msi),
            (inner.msix.as_ref().map(|m| &m.group), &e.pending_msix),
        ];
        for (group, list) in groups {
            let Some(group) = group else { continue };
            for &v in list {
                if let Some(fd) = group.notifier(v) {
                    signal(fd)?;
                }
            }
        }
        Ok(())
    }
}

/// The vectors below `count` that `masked` names whose notifier has a
/// signal latched (polled, not read: the signal stays).
fn latched(group: &dyn InterruptSourceGroup, count: u32, masked: impl Fn(u32) -> bool) -> Vec<u32> {
    (0..count)
        .filter(|&v| masked(v))
        .filter(|&v| group.notifier(v).is_some_and(readable))
        .collect()
}

fn readable(fd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one initialized pollfd naming a descriptor borrowed for the
    // call; a zero timeout never blocks; poll only writes `revents`.
    let r = unsafe { libc::poll(&mut p, 1, 0) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// Adds 1 to the eventfd `fd`, as a device signalling it does.
fn signal(fd: BorrowedFd<'_>) -> Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer to a descriptor
    // borrowed for the call; an eventfd takes exactly an 8-byte counter.
    let n = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if n == one.len() as isize {
        Ok(())
    } else {
        Err(Error::MigrationIo {
            context: "latching a pending vector in its notifier",
            source: std::io::Error::last_os_error(),
        })
    }
}
