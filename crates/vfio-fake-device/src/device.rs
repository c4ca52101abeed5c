//! [`FakeDevice`]: a [`DeviceTemplate`] brought to life behind the
//! [`Vfio`] trait.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vfio_backend::{
    device_flags, irq, irq_flags, region, region_flags, DeviceInfo, DirtyRange, Error, IommuDomain,
    IrqInfo, Mapping, MigState, MigrationFlags, MigrationStream, RegionCap, RegionInfo, Result,
    SparseArea, Vfio,
};

use crate::bar::Bar;
use crate::dma::{DmaFault, DmaMappings, Piece};
use crate::error::FakeResult;
use crate::inject::{Counters, Faults, Injected, MigOp, Op};
use crate::iommu::FakeIommu;
use crate::irq::{IrqState, Trigger};
use crate::mig::DmaLog;
use crate::regs::{self, Ctx, Job};
use crate::template::{cap_id, BarKind, DeviceTemplate, RegisterKind, PAGE_SIZE};

mod migrate;

/// What register accesses that cannot start a DMA see of the mappings.
static NO_MAPPINGS: DmaMappings = DmaMappings::EMPTY;

/// Number of interrupt indices reported (`VFIO_PCI_NUM_IRQS`).
const NUM_IRQS: u32 = 5;

/// Command register: Bus Master Enable (PCI Local Bus 3.0 §6.2.2, bit 2).
const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: Interrupt Disable (bit 10): while set, INTx# is not asserted.
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: Interrupt Status (bit 3), the state of the function's INTx.
const STATUS_INTERRUPT: u8 = 1 << 3;

/// Mutable device state, behind the one lock.
#[derive(Debug)]
struct State {
    config: Vec<u8>,
    irq: IrqState,
    /// Bumped by every reset: a transfer the DMA thread started before it
    /// neither writes device memory nor completes after it.
    dma_epoch: u64,
    /// Quiesced for migration: no DMA starts, no interrupt is raised.
    quiesced: bool,
    /// The transfers started and not finished (at most one per engine).
    jobs: Vec<InFlight>,
    /// DMA threads running now.
    dma_threads: usize,
}

/// A DMA transfer the device started and has not finished: running on a
/// DMA thread, or parked (with the bytes done so far) while the device is
/// quiesced.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    bar: u32,
    job: Job,
    done: u64,
    running: bool,
}

/// Which engine a job belongs to (an engine runs one job at a time).
fn job_key(bar: u32, job: &Job) -> (u32, u64) {
    match job {
        Job::Edu { .. } => (bar, u64::MAX),
        Job::Engine { base, .. } => (bar, *base),
    }
}

/// How a DMA thread's run ended.
enum JobEnd {
    /// Done (or abandoned after a reset): finish it.
    Finished(std::result::Result<(), DmaFault>),
    /// The device quiesced: these many bytes are done, the rest waits.
    Parked(u64),
}

/// A transfer for the DMA thread: the BAR of the engine, the job, and the
/// epoch it was started in.
type Deferred = (u32, Job, u64);

/// The most bytes the DMA thread moves per step (one buffer).
const DMA_STEP: usize = 64 * 1024;

#[derive(Debug)]
struct Watcher {
    stop: Arc<AtomicBool>,
    /// Signalled on stop, so the watcher's poll returns at once.
    wake: Arc<EventFd>,
    handle: JoinHandle<()>,
}

impl Watcher {
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Err(e) = self.wake.write(1) {
            log::warn!("waking the INTx unmask watcher: {e}");
        }
        if self.handle.join().is_err() {
            log::warn!("the INTx unmask eventfd watcher panicked");
        }
    }
}

#[derive(Debug)]
struct Inner {
    template: DeviceTemplate,
    bars: [Option<Bar>; 6],
    state: Mutex<State>,
    /// Mirror of the command register, for the decode check without the lock.
    command: AtomicU16,
    counters: Counters,
    faults: Faults,
    watcher: Mutex<Option<Watcher>>,
    /// The IOMMU domain the device is attached to. Lock order: the state
    /// lock, then the domain's mapping lock.
    iommu: Arc<FakeIommu>,
    /// The device's attachment to `iommu`.
    iommu_token: u64,
    /// Signalled when a DMA thread ends or parks.
    idle: Condvar,
    /// The migration state and its data stream. Lock order: this, then
    /// the state lock.
    mig: Mutex<migrate::MigCtl>,
    /// The guest pages the device's DMA wrote, while logging.
    log: DmaLog,
    /// The migration flags offered; 0: the device cannot migrate.
    mig_flags: AtomicU64,
}

/// A fake PCI function behind the [`Vfio`] trait, in-process.
///
/// Regions follow `vfio-pci`: BARs 0 to 5 (memory BARs are memfds that
/// [`Vfio::mmap_region`] and [`Vfio::region_mmap_fd`] share, minus the pages
/// of register blocks), the ROM (6, read-only), config space (7) and no VGA
/// (8). Interrupts follow `vfio-pci` too: one index enabled at a time,
/// eventfds per vector, INTx automasked.
///
/// DMA: every device access is checked against the mappings of its
/// [`FakeIommu`] domain ([`Vfio::iommu_domain`]; its own, or one shared
/// with other fake devices, see [`FakeDevice::with_iommu`]). A
/// [`vfio_backend::DmaSource`] with a `host_addr` is reached by loads and
/// stores at that address: as with the kernel backend, the caller keeps
/// that memory mapped, and at its size, until the domain's
/// [`IommuDomain::unmap`] of the range returns. One with `host_addr` 0 and a file is reached by
/// `pread` / `pwrite` on a duplicate of the file: a file that shrinks later
/// makes the DMA fail with [`DmaFault::Unreachable`], never `SIGBUS` (our
/// vfio-user server does this for a client's files not sealed with
/// `F_SEAL_SHRINK`). [`IommuDomain::map_remote`] ranges are reached
/// through their [`RemoteDma`](vfio_backend::RemoteDma) (a vfio-user client's `DMA_READ` /
/// `DMA_WRITE`). Once [`IommuDomain::unmap`] returns no device of the
/// domain touches the range:
/// it waits for a load, store or piece of file I/O under way; a request to
/// a [`RemoteDma`](vfio_backend::RemoteDma) is not waited for (its owner refuses requests to what it
/// unmapped).
///
/// A transfer that touches only host memory completes inside the register
/// write that starts it. Any other one (file I/O, requests that may wait
/// for a peer) runs on a short-lived DMA thread once that write returned,
/// without the device lock: the engine reads busy until it is done and then
/// reports and interrupts as usual (see [`crate::edu`] and
/// [`crate::dma_engine`]). So a vfio-user client gets the reply to the
/// doorbell write before the device sends it any DMA request.
///
/// Thread safety: all methods take `&self`; region accesses take at most
/// one lock (none for plain BAR memory) and do not allocate.
#[derive(Debug)]
pub struct FakeDevice {
    inner: Arc<Inner>,
}

fn injected(op: Op, what: Injected) -> Error {
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

fn out_of_range(index: u32, offset: u64, len: usize, size: u64) -> Error {
    Error::InvalidArgument(format!(
        "access of {len} bytes at {offset:#x} of region {index} ({size:#x} bytes)"
    ))
}

impl FakeDevice {
    /// Creates the device: one memfd per implemented BAR, the config space
    /// and registers at their template values, no interrupt enabled, and a
    /// fake IOMMU domain of its own with no DMA mapping.
    pub fn new(template: DeviceTemplate) -> FakeResult<FakeDevice> {
        FakeDevice::with_iommu(template, FakeIommu::new())
    }

    /// Creates the device as [`FakeDevice::new`] does, attached to `iommu`:
    /// several devices attached to one domain share its DMA mappings, as
    /// kernel devices in one container or IOAS do, and the domain accepts
    /// only the IOVAs all of them accept (the template's
    /// [`iova_ranges`](DeviceTemplate::iova_ranges)). Fails when a live
    /// mapping of the domain lies outside this device's IOVA ranges
    /// (`EADDRINUSE`, as iommufd refuses such an attach).
    pub fn with_iommu(template: DeviceTemplate, iommu: Arc<FakeIommu>) -> FakeResult<FakeDevice> {
        let mut bars: [Option<Bar>; 6] = Default::default();
        for (i, slot) in bars.iter_mut().enumerate() {
            if let Some(spec) = template.bar(i as u8) {
                let blocks = template
                    .registers()
                    .iter()
                    .filter(|b| usize::from(b.bar) == i)
                    .copied()
                    .collect();
                *slot = Some(Bar::new(i, spec, blocks)?);
            }
        }
        let irq = IrqState::new(
            template.interrupt_pin() != 0,
            template.msi().map_or(0, |m| m.vectors),
            template.msix().map_or(0, |m| m.vectors),
        );
        let iommu_token =
            iommu
                .attach(template.iova_ranges())
                .map_err(|e| crate::FakeError::Io {
                    context: format!("attaching the device to its fake IOMMU: {e}"),
                    source: std::io::Error::from_raw_os_error(e.errno().unwrap_or(libc::EINVAL)),
                })?;
        let engines = template
            .registers()
            .iter()
            .filter(|b| matches!(b.kind, RegisterKind::DmaEngine { .. } | RegisterKind::Edu))
            .count();
        let inner = Inner {
            idle: Condvar::new(),
            mig: Mutex::new(migrate::MigCtl::default()),
            log: DmaLog::default(),
            mig_flags: AtomicU64::new(crate::mig::FLAGS.0),
            state: Mutex::new(State {
                config: template.config().to_vec(),
                irq,
                dma_epoch: 0,
                quiesced: false,
                jobs: Vec::with_capacity(engines),
                dma_threads: 0,
            }),
            command: AtomicU16::new(0),
            bars,
            template,
            counters: Counters::default(),
            faults: Faults::default(),
            watcher: Mutex::new(None),
            iommu,
            iommu_token,
        };
        inner.restore_memory();
        inner.sync_command(inner.template.config());
        Ok(FakeDevice {
            inner: Arc::new(inner),
        })
    }

    /// A device from a named profile (see [`crate::profiles`]).
    pub fn profile(name: &str) -> FakeResult<FakeDevice> {
        FakeDevice::new(crate::profile_template(name)?)
    }

    /// The names of the built-in profiles.
    pub fn profiles() -> &'static [&'static str] {
        crate::profiles()
    }

    /// The template the device was made from (and resets to).
    pub fn template(&self) -> &DeviceTemplate {
        &self.inner.template
    }

    /// Call and event counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Failure injection.
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// The interrupt index currently enabled, if any ([`irq::INTX`],
    /// [`irq::MSI`] or [`irq::MSIX`]).
    pub fn active_irq(&self) -> Option<u32> {
        self.inner.lock().irq.active()
    }

    /// Whether INTx is masked (by the host after it fired, or by
    /// [`Vfio::mask_irq`]).
    pub fn intx_masked(&self) -> bool {
        self.inner.lock().irq.intx_masked()
    }

    /// Whether MSI ([`irq::MSI`]) or MSI-X ([`irq::MSIX`]) vector `vector`
    /// is pending: raised while the device was quiesced for migration (or
    /// carried in a migrated state) and not signalled yet.
    pub fn irq_pending(&self, index: u32, vector: u32) -> bool {
        self.inner.lock().irq.held(index, vector)
    }

    /// Whether the INTx line is asserted (what the status register's
    /// Interrupt Status bit reads).
    pub fn intx_asserted(&self) -> bool {
        self.inner.lock().irq.intx_line()
    }

    /// DMA transfers started and not finished: running, or parked while the
    /// device is quiesced for migration.
    pub fn dma_in_flight(&self) -> usize {
        self.inner.lock().jobs.len()
    }

    /// What migration the device offers: every flag by default
    /// (STOP_COPY, P2P and PRE_COPY); a subset (STOP_COPY must be in it,
    /// else `EINVAL`; unknown bits are refused too), or `None` for a device
    /// that cannot migrate ([`Vfio::migration_flags`] then says `None` and
    /// the other migration methods, DMA logging excepted, fail with
    /// [`Error::Unsupported`]). Only while the device is RUNNING with no
    /// data stream (`EBUSY` otherwise).
    pub fn set_migration(&self, flags: Option<MigrationFlags>) -> Result<()> {
        let raw = match flags {
            None => 0,
            Some(f) if f.stop_copy() && f.0 & !crate::mig::FLAGS.0 == 0 => f.0,
            Some(f) => {
                return Err(Error::Refused {
                    context: format!("migration flags {:#x}", f.0),
                    errno: libc::EINVAL,
                })
            }
        };
        self.set_migration_impl(raw)
    }

    /// Number of DMA mappings in the device's IOMMU domain.
    pub fn dma_mapping_count(&self) -> usize {
        self.inner.iommu.mapping_count()
    }

    /// The fake IOMMU domain the device is attached to (also what
    /// [`Vfio::iommu_domain`] returns).
    pub fn iommu(&self) -> &Arc<FakeIommu> {
        &self.inner.iommu
    }

    /// The device raises interrupt `vector` once (an edge: one MSI/MSI-X
    /// message, or one INTx assertion that is not held).
    pub fn raise_irq(&self, vector: u32) {
        let inner = &*self.inner;
        inner
            .lock()
            .irq
            .raise(vector, Trigger::Pulse, &inner.counters);
    }

    /// The device reads guest memory at `iova` through its DMA mappings.
    /// May block on file I/O or a [`RemoteDma`](vfio_backend::RemoteDma) request (without the
    /// device lock).
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> std::result::Result<(), DmaFault> {
        self.inner.dma_io_read(iova, buf)
    }

    /// The device writes guest memory at `iova` through its DMA mappings.
    /// May block as [`FakeDevice::dma_read`] does.
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> std::result::Result<(), DmaFault> {
        self.inner.dma_io_write(iova, data)
    }

    /// Runs a transfer a register write deferred, on its own thread.
    fn spawn_dma(&self, deferred: Option<Deferred>) {
        if let Some((bar, job, epoch)) = deferred {
            spawn_job(&self.inner, bar, job, epoch, 0);
        }
    }

    fn enter(&self, op: Op) -> Result<&Inner> {
        let inner = &*self.inner;
        inner.counters.call(op);
        match inner.faults.check(op) {
            None => Ok(inner),
            Some(what) => Err(injected(op, what)),
        }
    }
}

/// Runs (or goes on with, from `done` bytes) a transfer on its own DMA
/// thread. The caller counted the thread in `dma_threads`.
fn spawn_job(inner: &Arc<Inner>, bar: u32, job: Job, epoch: u64, done: u64) {
    let i = Arc::clone(inner);
    let spawned = std::thread::Builder::new()
        .name("fake-dma".into())
        .spawn(move || match i.run_job(bar, job, epoch, done) {
            JobEnd::Finished(result) => i.finish_job(bar, job, epoch, result),
            JobEnd::Parked(done) => i.park_job(bar, job, epoch, done),
        });
    if let Err(e) = spawned {
        log::warn!("fake device: cannot start the DMA thread: {e}");
        inner.finish_job(bar, job, epoch, Err(DmaFault::Unreachable));
    }
}

impl Drop for FakeDevice {
    /// Unplug: the watcher stops and the device leaves its IOMMU domain,
    /// whose mappings stay for the other devices attached to it.
    fn drop(&mut self) {
        if let Some(w) = self.inner.take_watcher() {
            w.stop();
        }
        self.inner.iommu.detach(self.inner.iommu_token);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state unusable:
        // every update is a plain store.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_watcher(&self) -> Option<Watcher> {
        self.watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn sync_command(&self, config: &[u8]) {
        let lo = config.get(4).copied().unwrap_or(0);
        let hi = config.get(5).copied().unwrap_or(0);
        self.command
            .store(u16::from_le_bytes([lo, hi]), Ordering::Relaxed);
    }

    /// BAR memory back to the template contents.
    fn restore_memory(&self) {
        for bar in self.bars.iter().flatten() {
            bar.zero();
        }
        for c in self.template.contents() {
            if let Some(Some(bar)) = self.bars.get(usize::from(c.bar)) {
                bar.write(c.offset, &c.bytes);
            }
        }
    }

    /// Reads (`read`) or writes (`write`) BAR `index`; returns the DMA
    /// transfer the write started and deferred, if any.
    fn bar_access(
        &self,
        index: u32,
        offset: u64,
        read: Option<&mut [u8]>,
        write: &[u8],
    ) -> Result<Option<Deferred>> {
        let len = read.as_ref().map_or(write.len(), |r| r.len());
        let Some(bar) = self.bars.get(index as usize).and_then(Option::as_ref) else {
            return Err(out_of_range(index, offset, len, 0));
        };
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= bar.spec.size)
            .ok_or_else(|| out_of_range(index, offset, len, bar.spec.size))?;
        if len == 0 {
            return Ok(None);
        }
        if self.template.decode_check() {
            let bit = if bar.spec.kind == BarKind::Io { 1 } else { 2 };
            if self.command.load(Ordering::Relaxed) & bit == 0 {
                return Err(Error::Refused {
                    context: format!(
                        "access to BAR {index} while its decoding is disabled in the command register"
                    ),
                    errno: libc::EIO,
                });
            }
        }
        let block = bar
            .blocks
            .iter()
            .find(|b| b.offset < end && offset < b.offset.saturating_add(b.size));
        let Some(block) = block else {
            // Plain memory: no lock.
            match read {
                Some(out) => bar.read(offset, out),
                None => bar.write(offset, write),
            };
            return Ok(None);
        };
        if offset < block.offset || end > block.offset.saturating_add(block.size) {
            return Err(Error::InvalidArgument(format!(
                "access {offset:#x}..{end:#x} of BAR {index} straddles the edge of {:?} registers at {:#x}",
                block.kind, block.offset
            )));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        // Only a write to a DMA engine reaches the mappings: other register
        // accesses take the device lock alone.
        let dma_capable = matches!(
            block.kind,
            RegisterKind::DmaEngine { .. } | RegisterKind::Edu
        );
        let maps;
        let dma: &DmaMappings = if read.is_none() && dma_capable {
            maps = self.iommu.mappings();
            &maps
        } else {
            &NO_MAPPINGS
        };
        let mut ctx = Ctx {
            bar,
            irq: &mut st.irq,
            dma,
            counters: &self.counters,
            deferred: None,
            bus_master: self.command.load(Ordering::Relaxed) & COMMAND_BUS_MASTER != 0,
            quiesced: st.quiesced,
            log: &self.log,
        };
        match read {
            Some(out) => regs::read(&mut ctx, block, offset, out),
            None => regs::write(&mut ctx, block, offset, write),
        }
        let Some(job) = ctx.deferred else {
            return Ok(None);
        };
        // Quiesced: the job waits, parked, for the device to run again.
        let running = !st.quiesced;
        st.jobs.push(InFlight {
            bar: index,
            job,
            done: 0,
            running,
        });
        if !running {
            return Ok(None);
        }
        st.dma_threads += 1;
        Ok(Some((index, job, st.dma_epoch)))
    }

    /// Reads guest memory at `iova`, piece by piece: the domain's mapping
    /// lock is held to look each piece up (and to copy host-mapped ones),
    /// never during file I/O or a remote request.
    fn dma_io_read(&self, iova: u64, buf: &mut [u8]) -> std::result::Result<(), DmaFault> {
        let len = buf.len() as u64;
        self.iommu.mappings().check(iova, len, false)?;
        let mut done = 0u64;
        while done < len {
            let cur = iova + done; // cannot wrap: check passed
            let io = self.iommu.file_io();
            let st = self.iommu.mappings();
            let (piece, n) = st.piece(cur, len - done, false)?;
            let dst = usize::try_from(done)
                .ok()
                .zip(usize::try_from(n).ok())
                .and_then(|(d, n)| buf.get_mut(d..d.checked_add(n)?))
                .ok_or(DmaFault::Unmapped)?;
            match piece {
                Piece::Host(host) => {
                    // SAFETY: `host .. host + n` lies in one host mapping,
                    // live while we hold the domain's mapping lock (the
                    // IommuDomain::map contract); `dst` is a distinct
                    // buffer of n bytes.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            host as usize as *const u8,
                            dst.as_mut_ptr(),
                            dst.len(),
                        )
                    };
                    drop(st);
                    drop(io);
                }
                Piece::File(file, off) => {
                    drop(st);
                    let _io = io;
                    use std::os::unix::fs::FileExt;
                    file.read_exact_at(dst, off).map_err(|e| {
                        log::debug!("fake device: DMA read of a file at {off:#x}: {e}");
                        DmaFault::Unreachable
                    })?;
                }
                Piece::Remote(remote) => {
                    // A request may wait for its owner: unmapping does not
                    // wait for it (the owner refuses requests to what it
                    // unmapped).
                    drop(st);
                    drop(io);
                    remote.read(cur, dst).map_err(|e| {
                        log::debug!("fake device: DMA read at {cur:#x} through its owner: {e}");
                        DmaFault::Unreachable
                    })?;
                }
            }
            done += n;
        }
        Ok(())
    }

    /// Writes guest memory at `iova`, as [`Inner::dma_io_read`] reads it.
    fn dma_io_write(&self, iova: u64, data: &[u8]) -> std::result::Result<(), DmaFault> {
        let len = data.len() as u64;
        self.iommu.mappings().check(iova, len, true)?;
        let mut done = 0u64;
        while done < len {
            let cur = iova + done; // cannot wrap: check passed
            let io = self.iommu.file_io();
            let st = self.iommu.mappings();
            let (piece, n) = st.piece(cur, len - done, true)?;
            let src = usize::try_from(done)
                .ok()
                .zip(usize::try_from(n).ok())
                .and_then(|(d, n)| data.get(d..d.checked_add(n)?))
                .ok_or(DmaFault::Unmapped)?;
            match piece {
                Piece::Host(host) => {
                    // SAFETY: as in dma_io_read, copying the other way.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            host as usize as *mut u8,
                            src.len(),
                        )
                    };
                    drop(st);
                    drop(io);
                }
                Piece::File(file, off) => {
                    drop(st);
                    let _io = io;
                    use std::os::unix::fs::FileExt;
                    file.write_all_at(src, off).map_err(|e| {
                        log::debug!("fake device: DMA write of a file at {off:#x}: {e}");
                        DmaFault::Unreachable
                    })?;
                }
                Piece::Remote(remote) => {
                    // A request may wait for its owner: unmapping does not
                    // wait for it (the owner refuses requests to what it
                    // unmapped).
                    drop(st);
                    drop(io);
                    remote.write(cur, src).map_err(|e| {
                        log::debug!("fake device: DMA write at {cur:#x} through its owner: {e}");
                        DmaFault::Unreachable
                    })?;
                }
            }
            self.log.mark(cur, n);
            done += n;
        }
        Ok(())
    }

    /// Whether a reset came since `epoch` (`Some(true)`), the device is
    /// quiesced (`None`), or the job may go on (`Some(false)`).
    fn stale(&self, epoch: u64) -> Option<bool> {
        let st = self.lock();
        if st.dma_epoch != epoch {
            Some(true)
        } else if st.quiesced {
            None
        } else {
            Some(false)
        }
    }

    /// Moves the data of a deferred transfer from byte `start` on (on the
    /// DMA thread, without the device lock but while looking pieces up),
    /// until it is done or the device quiesces.
    fn run_job(&self, bar: u32, job: Job, epoch: u64, start: u64) -> JobEnd {
        match self.stale(epoch) {
            Some(true) => return JobEnd::Finished(Ok(())),
            None => return JobEnd::Parked(start),
            Some(false) => {}
        }
        let Some(bar) = self.bars.get(bar as usize).and_then(Option::as_ref) else {
            return JobEnd::Finished(Err(DmaFault::OutOfDeviceRange));
        };
        match job {
            Job::Edu { .. } => JobEnd::Finished(self.run_edu(bar, job, epoch)),
            Job::Engine { src, dst, len, .. } => {
                let step = usize::try_from(len).map_or(DMA_STEP, |l| l.min(DMA_STEP));
                let mut buf = vec![0u8; step];
                let mut done = start;
                while done < len {
                    match self.stale(epoch) {
                        Some(true) => return JobEnd::Finished(Ok(())),
                        None => return JobEnd::Parked(done),
                        Some(false) => {}
                    }
                    let n = (len - done).min(step as u64);
                    let Some(piece) = buf.get_mut(..n as usize) else {
                        return JobEnd::Finished(Err(DmaFault::TooLong));
                    };
                    let moved = self
                        .dma_io_read(src.wrapping_add(done), piece)
                        .and_then(|()| self.dma_io_write(dst.wrapping_add(done), piece));
                    if let Err(f) = moved {
                        return JobEnd::Finished(Err(f));
                    }
                    done += n;
                }
                JobEnd::Finished(Ok(()))
            }
        }
    }

    /// An edu transfer: one step, at most the device buffer.
    fn run_edu(&self, bar: &Bar, job: Job, epoch: u64) -> std::result::Result<(), DmaFault> {
        match job {
            Job::Edu { cmd, src, dst, cnt } => {
                let len = usize::try_from(cnt).map_err(|_| DmaFault::TooLong)?;
                if len > DMA_STEP {
                    return Err(DmaFault::TooLong);
                }
                let mut buf = vec![0u8; len];
                if cmd & crate::edu::DMA_CMD_TO_RAM != 0 {
                    if !bar.read(src, &mut buf) {
                        return Err(DmaFault::OutOfDeviceRange);
                    }
                    self.dma_io_write(dst, &buf)
                } else {
                    self.dma_io_read(src, &mut buf)?;
                    let st = self.lock();
                    if st.dma_epoch == epoch && !bar.write(dst, &buf) {
                        return Err(DmaFault::OutOfDeviceRange);
                    }
                    Ok(())
                }
            }
            Job::Engine { .. } => Err(DmaFault::OutOfDeviceRange),
        }
    }

    /// A DMA thread ended or parked: wakes whoever waits for the DMA to
    /// quiesce.
    fn thread_gone(&self, st: &mut State) {
        st.dma_threads = st.dma_threads.saturating_sub(1);
        self.idle.notify_all();
    }

    /// Keeps a transfer the device quiesced during, with its progress.
    fn park_job(&self, bar: u32, job: Job, epoch: u64, done: u64) {
        let mut st = self.lock();
        self.thread_gone(&mut st);
        if st.dma_epoch != epoch {
            return;
        }
        let key = job_key(bar, &job);
        if let Some(j) = st.jobs.iter_mut().find(|j| job_key(j.bar, &j.job) == key) {
            j.done = done;
            j.running = false;
        }
    }

    /// Completes a deferred transfer as the engine would have inside the
    /// write: status, counters, interrupt. Nothing when a reset came since.
    fn finish_job(
        &self,
        bar: u32,
        job: Job,
        epoch: u64,
        result: std::result::Result<(), DmaFault>,
    ) {
        let mut guard = self.lock();
        let st = &mut *guard;
        self.thread_gone(st);
        if st.dma_epoch != epoch {
            return;
        }
        let key = job_key(bar, &job);
        st.jobs.retain(|j| job_key(j.bar, &j.job) != key);
        let Some(bar) = self.bars.get(bar as usize).and_then(Option::as_ref) else {
            return;
        };
        let maps = self.iommu.mappings();
        let mut ctx = Ctx {
            bar,
            irq: &mut st.irq,
            dma: &maps,
            counters: &self.counters,
            deferred: None,
            // Finishing only writes status and raises the interrupt: the
            // transfer itself was checked against Bus Master Enable at start.
            bus_master: self.command.load(Ordering::Relaxed) & COMMAND_BUS_MASTER != 0,
            quiesced: st.quiesced,
            log: &self.log,
        };
        match job {
            Job::Edu { cmd, .. } => regs::edu_finish(&mut ctx, cmd, result),
            Job::Engine {
                base, cmd, vector, ..
            } => regs::engine_finish(&mut ctx, base, cmd, vector, result),
        }
    }

    fn unmask_from_eventfd(&self) {
        let mut st = self.lock();
        st.irq.unmask_intx(&self.counters);
    }
}

fn watch_unmask(fd: OwnedFd, inner: Weak<Inner>, stop: Arc<AtomicBool>, wake: Arc<EventFd>) {
    while !stop.load(Ordering::Relaxed) {
        let mut pfds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds that live across the call; the count matches.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, WATCH_PERIOD_MS) };
        let [pfd, woken] = pfds;
        if woken.revents != 0 {
            return;
        }
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            continue;
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return;
        }
        let mut v = 0u64;
        // SAFETY: reads at most 8 bytes into a live local u64.
        let r = unsafe {
            libc::read(
                fd.as_raw_fd(),
                std::ptr::from_mut(&mut v).cast::<libc::c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
        if r <= 0 {
            continue;
        }
        match inner.upgrade() {
            Some(i) => i.unmask_from_eventfd(),
            None => return,
        }
    }
}

impl Vfio for FakeDevice {
    fn device_info(&self) -> Result<DeviceInfo> {
        self.enter(Op::DeviceInfo)?;
        Ok(DeviceInfo {
            flags: device_flags::RESET | device_flags::PCI,
            num_regions: region::NUM_PCI_REGIONS,
            num_irqs: NUM_IRQS,
        })
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let inner = self.enter(Op::RegionInfo)?;
        let mut info = RegionInfo {
            index,
            ..RegionInfo::default()
        };
        match index {
            0..=5 => {
                if let Some(bar) = inner.bars.get(index as usize).and_then(Option::as_ref) {
                    info.size = bar.spec.size;
                    info.flags = region_flags::READ | region_flags::WRITE;
                    if bar.mmappable() {
                        info.flags |= region_flags::MMAP;
                        if bar.sparse {
                            info.flags |= region_flags::CAPS;
                            info.caps.push(RegionCap::SparseMmap(bar.areas.clone()));
                        }
                    }
                }
            }
            region::ROM => {
                if let Some(rom) = inner.template.rom() {
                    info.size = rom.len() as u64;
                    info.flags = region_flags::READ;
                }
            }
            region::CONFIG => {
                info.size = inner.template.config_size() as u64;
                info.flags = region_flags::READ | region_flags::WRITE;
            }
            region::VGA => {}
            _ => {
                return Err(Error::InvalidArgument(format!("region index {index}")));
            }
        }
        Ok(info)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        let inner = self.enter(Op::RegionRead)?;
        let len = data.len();
        match index {
            0..=5 => {
                inner.bar_access(index, offset, Some(data), &[])?;
            }
            region::ROM => {
                let rom = inner.template.rom().unwrap_or(&[]);
                let src = usize::try_from(offset)
                    .ok()
                    .and_then(|o| rom.get(o..o.checked_add(len)?))
                    .ok_or_else(|| out_of_range(index, offset, len, rom.len() as u64))?;
                data.copy_from_slice(src);
            }
            region::CONFIG => {
                let st = inner.lock();
                let start = usize::try_from(offset).ok();
                let src = start
                    .and_then(|o| st.config.get(o..o.checked_add(len)?))
                    .ok_or_else(|| out_of_range(index, offset, len, st.config.len() as u64))?;
                data.copy_from_slice(src);
                // Status bit 3 (Interrupt Status) is the INTx line's state, whatever the
                // Interrupt Disable bit says (PCI Local Bus 3.0 §6.2.3).
                if let Some(b) = start
                    .and_then(|o| 6usize.checked_sub(o))
                    .and_then(|i| data.get_mut(i))
                {
                    if st.irq.intx_line() {
                        *b |= STATUS_INTERRUPT;
                    } else {
                        *b &= !STATUS_INTERRUPT;
                    }
                }
            }
            _ => return Err(out_of_range(index, offset, len, 0)),
        }
        inner.counters.read(len);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let inner = self.enter(Op::RegionWrite)?;
        let len = data.len();
        match index {
            0..=5 => {
                let deferred = inner.bar_access(index, offset, None, data)?;
                self.spawn_dma(deferred);
            }
            region::CONFIG => {
                let mut st = inner.lock();
                let size = st.config.len();
                let off = usize::try_from(offset)
                    .ok()
                    .filter(|o| o.checked_add(len).is_some_and(|e| e <= size))
                    .ok_or_else(|| out_of_range(index, offset, len, size as u64))?;
                let pm_before = power_state(&st.config);
                crate::config::write(&mut st.config, &inner.template, off, data);
                if off < 6 && off + len > 4 {
                    inner.sync_command(&st.config);
                    let disabled =
                        inner.command.load(Ordering::Relaxed) & COMMAND_INTX_DISABLE != 0;
                    st.irq.set_intx_disabled(disabled, &inner.counters);
                }
                if initiates_flr(&st.config, off, data)
                    || pm_resets(pm_before, power_state(&st.config))
                {
                    // PCIe r6.0 6.6.2 (FLR, also the Advanced Features one) and PCI PM 1.2
                    // 5.4.1 (D3hot to D0 without No_Soft_Reset): the function resets; its
                    // registers read as at reset (Initiate FLR itself reads 0). The VMM's
                    // interrupt wiring stays, as the kernel's vfio-pci keeps it across a
                    // reset the guest starts.
                    st.dma_epoch = st.dma_epoch.wrapping_add(1);
                    st.jobs.clear();
                    st.config.copy_from_slice(inner.template.config());
                    inner.sync_command(&st.config);
                    st.irq.function_reset();
                    let disabled =
                        inner.command.load(Ordering::Relaxed) & COMMAND_INTX_DISABLE != 0;
                    st.irq.set_intx_disabled(disabled, &inner.counters);
                    inner.restore_memory();
                }
            }
            region::ROM => {
                return Err(Error::InvalidArgument("the ROM region is read-only".into()))
            }
            _ => return Err(out_of_range(index, offset, len, 0)),
        }
        inner.counters.written(len);
        Ok(())
    }

    fn mmap_region(&self, index: u32, area: SparseArea) -> Result<Mapping> {
        let inner = self.enter(Op::MmapRegion)?;
        let bar = inner
            .bars
            .get(index as usize)
            .and_then(Option::as_ref)
            .filter(|b| b.mmappable())
            .ok_or_else(|| Error::InvalidArgument(format!("region {index} cannot be mmapped")))?;
        let end = area.offset.checked_add(area.size);
        let inside = bar.areas.iter().any(|a| {
            area.offset >= a.offset && end.is_some_and(|e| e <= a.offset.saturating_add(a.size))
        });
        if area.size == 0 || (area.offset | area.size) % PAGE_SIZE != 0 || !inside {
            return Err(Error::InvalidArgument(format!(
                "mmap of {:#x} bytes at {:#x} of region {index}: not a page-aligned part of its mmap-able areas",
                area.size, area.offset
            )));
        }
        Mapping::map_fd(
            bar.fd(),
            area.offset,
            area.size,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        let inner = self.enter(Op::IrqInfo)?;
        if index >= NUM_IRQS {
            return Err(Error::InvalidArgument(format!("interrupt index {index}")));
        }
        let count = inner.lock().irq.count(index);
        let flags = match index {
            irq::INTX => irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED,
            irq::MSI => irq_flags::EVENTFD | irq_flags::NORESIZE,
            irq::MSIX => irq_flags::EVENTFD,
            _ => 0,
        };
        Ok(IrqInfo {
            index,
            flags: if count == 0 { 0 } else { flags },
            count,
        })
    }

    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<()> {
        let inner = self.enter(Op::SetIrqEventfds)?;
        let mut st = inner.lock();
        st.irq.set_eventfds(index, start, fds, &inner.counters)
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        let inner = self.enter(Op::DisableIrqs)?;
        inner.lock().irq.disable(index)?;
        if index == irq::INTX {
            if let Some(w) = inner.take_watcher() {
                w.stop();
            }
        }
        Ok(())
    }

    fn unmask_irq(&self, index: u32) -> Result<()> {
        let inner = self.enter(Op::UnmaskIrq)?;
        inner.lock().irq.unmask(index, &inner.counters)
    }

    fn mask_irq(&self, index: u32) -> Result<()> {
        let inner = self.enter(Op::MaskIrq)?;
        inner.lock().irq.mask(index)
    }

    fn set_irq_unmask_eventfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let inner = self.enter(Op::SetIrqUnmaskEventfd)?;
        inner.lock().irq.check_unmask_fd(index)?;
        if let Some(f) = fd {
            // The watcher polls then reads it: a non-blocking eventfd, so a
            // peer that drains it first cannot make the read wait.
            vfio_backend::eventfd::prepare_eventfd(f)?;
        }
        let dup = fd
            .map(|f| f.try_clone_to_owned())
            .transpose()
            .map_err(|e| Error::io("dup of the INTx unmask eventfd", e))?;
        if let Some(old) = inner.take_watcher() {
            old.stop();
        }
        if let Some(fd) = dup {
            let stop = Arc::new(AtomicBool::new(false));
            let wake = Arc::new(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| Error::io("eventfd for the INTx unmask watcher", e))?,
            );
            let weak = Arc::downgrade(&self.inner);
            let (s, w) = (Arc::clone(&stop), Arc::clone(&wake));
            let handle = std::thread::Builder::new()
                .name("fake-intx-unmask".into())
                .spawn(move || watch_unmask(fd, weak, s, w))
                .map_err(|e| Error::io("spawning the INTx unmask watcher", e))?;
            *inner.watcher.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Watcher { stop, wake, handle });
        }
        Ok(())
    }

    fn reset(&self) -> Result<()> {
        let inner = self.enter(Op::Reset)?;
        if let Some(w) = inner.take_watcher() {
            w.stop();
        }
        // VFIO_DEVICE_RESET returns the migration state to RUNNING and
        // ends any data stream (the uAPI's way out of ERROR and RESUMING).
        let mut mig = inner.mig_lock();
        mig.reset();
        let mut st = inner.lock();
        st.dma_epoch = st.dma_epoch.wrapping_add(1);
        st.jobs.clear();
        st.quiesced = false;
        st.irq.reset();
        st.irq.set_quiesced(false, &inner.counters);
        st.config.copy_from_slice(inner.template.config());
        inner.sync_command(&st.config);
        let disabled = inner.command.load(Ordering::Relaxed) & COMMAND_INTX_DISABLE != 0;
        st.irq.set_intx_disabled(disabled, &inner.counters);
        inner.restore_memory();
        drop(st);
        drop(mig);
        Ok(())
    }

    fn iommu_domain(&self) -> Arc<dyn IommuDomain> {
        self.inner.iommu.clone()
    }

    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        if self.inner.faults.is_dead() {
            return None;
        }
        let bar = self.inner.bars.get(index as usize)?.as_ref()?;
        bar.mmappable().then(|| (bar.fd(), 0))
    }

    fn migration_flags(&self) -> Result<Option<MigrationFlags>> {
        self.mig_enter(MigOp::GetState)?;
        Ok(self.inner.migration())
    }

    fn mig_state(&self) -> Result<MigState> {
        self.mig_enter(MigOp::GetState)?;
        self.inner.need_migration()?;
        Ok(self.inner.mig_lock().state)
    }

    fn set_mig_state(&self, state: MigState) -> Result<Option<Box<dyn MigrationStream>>> {
        self.set_mig_state_impl(state)
    }

    fn mig_data_size(&self) -> Result<u64> {
        self.mig_enter(MigOp::DataSize)?;
        self.inner.need_migration()?;
        Ok(self.inner.stop_copy_size())
    }

    fn dma_logging_start(&self, page_size: u64, ranges: &[DirtyRange]) -> Result<()> {
        self.mig_enter(MigOp::DmaLogging)?;
        self.inner.log.start(page_size, ranges)
    }

    fn dma_logging_stop(&self) -> Result<()> {
        self.mig_enter(MigOp::DmaLogging)?;
        self.inner.log.stop();
        Ok(())
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<()> {
        self.mig_enter(MigOp::DmaLogging)?;
        self.inner.log.report(iova, length, page_size, bitmap)
    }
}

/// The longest the unmask watcher sleeps before it looks at its stop flag
/// (a stop also wakes it at once through its eventfd).
const WATCH_PERIOD_MS: i32 = 1000;

/// The offset of the first standard capability with id `id` (the walk is bounded: 48 entries
/// fill 256 bytes).
fn find_cap(config: &[u8], id: u8) -> Option<usize> {
    let byte = |o: usize| config.get(o).copied().unwrap_or(0);
    if byte(0x06) & 0x10 == 0 {
        return None;
    }
    let mut at = usize::from(byte(0x34) & 0xfc);
    for _ in 0..48 {
        if at < 0x40 {
            return None;
        }
        if byte(at) == id {
            return Some(at);
        }
        at = usize::from(byte(at + 1) & 0xfc);
    }
    None
}

/// Advanced Features capability id (PCI Advanced Capabilities ECN).
const CAP_AF: u8 = 0x13;

/// Whether a config write of `data` at `off` starts a Function Level Reset: Initiate FLR
/// (bit 15 of the PCI Express Device Control register) of a function whose Device
/// Capabilities say it is FLR capable (bit 28), or Initiate FLR (bit 0 of AF Control) of one
/// whose Advanced Features capabilities say it is (bit 1). `config` is the config space after
/// the write.
fn initiates_flr(config: &[u8], off: usize, data: &[u8]) -> bool {
    let byte = |o: usize| config.get(o).copied().unwrap_or(0);
    let written = |at: usize, bit: u8| {
        at.checked_sub(off)
            .and_then(|i| data.get(i))
            .is_some_and(|b| b & bit != 0)
    };
    // The high byte of Device Control holds Initiate FLR as its bit 7.
    let pcie = find_cap(config, cap_id::PCI_EXPRESS)
        .is_some_and(|cap| byte(cap + 7) & 0x10 != 0 && written(cap + 9, 0x80));
    let af = find_cap(config, CAP_AF)
        .is_some_and(|cap| byte(cap + 3) & 0x02 != 0 && written(cap + 4, 0x01));
    pcie || af
}

/// The Power Management capability's PMCSR power state (0 = D0, 3 = D3hot) and its
/// No_Soft_Reset bit, if the function has the capability.
fn power_state(config: &[u8]) -> Option<(u8, bool)> {
    let cap = find_cap(config, cap_id::POWER_MANAGEMENT)?;
    let pmcsr = config.get(cap + 4).copied()?;
    Some((pmcsr & 0x03, pmcsr & 0x08 != 0))
}

/// Whether a power state change resets the function: D3hot to D0 when No_Soft_Reset is 0.
fn pm_resets(before: Option<(u8, bool)>, after: Option<(u8, bool)>) -> bool {
    matches!((before, after), (Some((3, _)), Some((0, false))))
}
