//! A test double: a `Vfio` over the fake device that migrates like a
//! device of the kernel's VFIO migration v2 uAPI (its states, the arcs a
//! backend takes between them, data streams that are valid only while the
//! device is in the states that opened them), and logs the DMA the test
//! makes it do. Its own state is the memory registers of the nvme-like
//! profile's BAR 0 (`0x0c..0x1000`): a destination that loaded it reads the
//! same registers.
//!
//! Kept in the tests: the library's migration works against any backend
//! that implements the seam's methods.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vfio_backend::{
    DeviceInfo, DirtyRange, DomainId, Error, IommuDomain, IrqInfo, Mapping, MigState,
    MigrationFlags, MigrationStream, PrecopyInfo, RegionInfo, Result, SparseArea, Vfio,
};
use vfio_fake_device::FakeDevice;

/// The migrated registers: BAR 0 `STATE_AT .. STATE_AT + STATE_LEN`.
pub const STATE_AT: u64 = 0x100;
pub const STATE_LEN: usize = 0x1000 - 0x100;

fn errno(e: i32, what: &str) -> Error {
    Error::Refused {
        context: what.to_string(),
        errno: e,
    }
}

#[derive(Default)]
struct Logging {
    page_size: u64,
    ranges: Vec<DirtyRange>,
    dirty: BTreeSet<u64>,
}

struct St {
    state: MigState,
    /// Bumped whenever a stream stops being valid.
    generation: u64,
    /// What a reading stream still has to give.
    out: Vec<u8>,
    /// The part of `out` that is the initial pre-copy data.
    initial: usize,
    /// What a RESUMING stream took.
    taken: Vec<u8>,
    logging: Option<Logging>,
    /// Transitions to these states fail with EIO (once each).
    fail_to: Vec<MigState>,
    /// Fail them into ERROR rather than staying put.
    fail_into_error: bool,
    /// Stream reads fail.
    fail_reads: bool,
    /// No pre-copy estimate (as over vfio-user).
    no_estimate: bool,
}

pub struct MigDouble {
    pub fake: Arc<FakeDevice>,
    flags: Option<MigrationFlags>,
    st: Arc<Mutex<St>>,
    pub transitions: Mutex<Vec<(MigState, MigState)>>,
    pub resets: AtomicU64,
}

impl MigDouble {
    pub fn new(flags: Option<u64>) -> Arc<MigDouble> {
        Self::over(Arc::new(FakeDevice::profile("nvme-like").unwrap()), flags)
    }

    pub fn over(fake: Arc<FakeDevice>, flags: Option<u64>) -> Arc<MigDouble> {
        Arc::new(MigDouble {
            fake,
            flags: flags.map(MigrationFlags),
            st: Arc::new(Mutex::new(St {
                state: MigState::Running,
                generation: 0,
                out: Vec::new(),
                initial: 0,
                taken: Vec::new(),
                logging: None,
                fail_to: Vec::new(),
                fail_into_error: false,
                fail_reads: false,
                no_estimate: false,
            })),
            transitions: Mutex::new(Vec::new()),
            resets: AtomicU64::new(0),
        })
    }

    pub fn all() -> Arc<MigDouble> {
        Self::new(Some(
            MigrationFlags::STOP_COPY | MigrationFlags::P2P | MigrationFlags::PRE_COPY,
        ))
    }

    pub fn state(&self) -> MigState {
        self.st.lock().unwrap().state
    }

    pub fn fail_transition_to(&self, s: MigState, into_error: bool) {
        let mut st = self.st.lock().unwrap();
        st.fail_to.push(s);
        st.fail_into_error = into_error;
    }

    /// Whether the device's DMA logging runs.
    pub fn logging(&self) -> bool {
        self.st.lock().unwrap().logging.is_some()
    }

    /// Answers `precopy_info` with Unsupported, as a vfio-user device does.
    pub fn without_estimate(&self) {
        self.st.lock().unwrap().no_estimate = true;
    }

    pub fn fail_reads(&self, on: bool) {
        self.st.lock().unwrap().fail_reads = on;
    }

    /// The device's own registers (its migrated state).
    pub fn regs(&self) -> Vec<u8> {
        let mut b = vec![0u8; STATE_LEN];
        self.inside(|| self.fake.region_read(0, STATE_AT, &mut b))
            .unwrap();
        b
    }

    pub fn set_regs(&self, at: u64, data: &[u8]) {
        self.inside(|| self.fake.region_write(0, STATE_AT + at, data))
            .unwrap();
    }

    /// `f` from inside the device: its registers whatever the guest's
    /// memory decode (the fake refuses BAR accesses without it).
    fn inside<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut cmd = [0u8; 2];
        self.fake.region_read(7, 4, &mut cmd)?;
        let on = u16::from_le_bytes(cmd) | 0x2;
        self.fake.region_write(7, 4, &on.to_le_bytes())?;
        let r = f();
        self.fake.region_write(7, 4, &cmd)?;
        r
    }

    /// The device writes guest memory by DMA (logged when logging runs).
    pub fn dma_write(&self, iova: u64, data: &[u8]) {
        self.fake.dma_write(iova, data).unwrap();
        let mut st = self.st.lock().unwrap();
        if let Some(l) = st.logging.as_mut() {
            let first = iova / l.page_size;
            let last = (iova + data.len() as u64 - 1) / l.page_size;
            for p in first..=last {
                let a = p * l.page_size;
                if l.ranges
                    .iter()
                    .any(|r| a + l.page_size > r.iova && a < r.iova + r.length)
                {
                    l.dirty.insert(a);
                }
            }
        }
    }

    fn opens_stream(from: MigState, to: MigState) -> bool {
        use MigState::*;
        match to {
            PreCopy | PreCopyP2p => !matches!(from, PreCopy | PreCopyP2p),
            StopCopy => !matches!(from, PreCopy | PreCopyP2p),
            Resuming => true,
            _ => false,
        }
    }

    fn allowed(&self, from: MigState, to: MigState) -> bool {
        use MigState::*;
        let f = self.flags.unwrap_or_default();
        let needs = match to {
            PreCopy => f.pre_copy(),
            PreCopyP2p => f.pre_copy() && f.p2p(),
            RunningP2p => f.p2p(),
            Error => false,
            _ => true,
        };
        let from_ok = match from {
            Error => false,
            // The stream of a pre-copy state goes on into STOP_COPY only.
            PreCopy | PreCopyP2p => matches!(
                to,
                Running | RunningP2p | PreCopy | PreCopyP2p | StopCopy | Stop
            ),
            StopCopy => matches!(to, Stop | Running | RunningP2p | StopCopy),
            Resuming => matches!(to, Stop | Running | RunningP2p | Resuming),
            _ => true,
        };
        needs && from_ok
    }
}

/// The double's stream format: register images, one per pre-copy round
/// and one at stop-and-copy; the last one holds.
fn image_ok(data: &[u8]) -> bool {
    !data.is_empty() && data.len() % STATE_LEN == 0
}

struct DoubleStream {
    st: Arc<Mutex<St>>,
    generation: u64,
    reading: bool,
}

impl DoubleStream {
    fn valid(&self, st: &St) -> Result<()> {
        if st.generation != self.generation {
            return Err(errno(libc::EBADF, "stream of a state the device left"));
        }
        Ok(())
    }
}

impl MigrationStream for DoubleStream {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut st = self.st.lock().unwrap();
        self.valid(&st)?;
        if !self.reading {
            return Err(errno(libc::EINVAL, "read of a RESUMING stream"));
        }
        if st.fail_reads {
            return Err(errno(libc::EIO, "read"));
        }
        let n = buf.len().min(st.out.len());
        buf[..n].copy_from_slice(&st.out[..n]);
        st.out.drain(..n);
        st.initial = st.initial.saturating_sub(n);
        Ok(n)
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        let mut st = self.st.lock().unwrap();
        self.valid(&st)?;
        if self.reading || st.state != MigState::Resuming {
            return Err(errno(libc::EINVAL, "write outside RESUMING"));
        }
        st.taken.extend_from_slice(data);
        Ok(())
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo> {
        let st = self.st.lock().unwrap();
        self.valid(&st)?;
        if st.no_estimate {
            return Err(Error::Unsupported("no pre-copy estimate".into()));
        }
        if !matches!(st.state, MigState::PreCopy | MigState::PreCopyP2p) {
            return Err(errno(libc::EINVAL, "precopy info outside PRE_COPY"));
        }
        Ok(PrecopyInfo {
            initial_bytes: st.initial as u64,
            dirty_bytes: (st.out.len() - st.initial) as u64,
        })
    }
}

impl Vfio for MigDouble {
    fn device_info(&self) -> Result<DeviceInfo> {
        self.fake.device_info()
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.fake.region_info(index)
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        self.fake.region_read(index, offset, data)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.fake.region_write(index, offset, data)
    }
    fn mmap_region(&self, index: u32, area: SparseArea) -> Result<Mapping> {
        self.fake.mmap_region(index, area)
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.fake.irq_info(index)
    }
    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<()> {
        self.fake.set_irq_eventfds(index, start, fds)
    }
    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.fake.disable_irqs(index)
    }
    fn unmask_irq(&self, index: u32) -> Result<()> {
        self.fake.unmask_irq(index)
    }
    fn mask_irq(&self, index: u32) -> Result<()> {
        self.fake.mask_irq(index)
    }
    fn set_irq_unmask_eventfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.fake.set_irq_unmask_eventfd(index, fd)
    }
    fn reset(&self) -> Result<()> {
        self.resets.fetch_add(1, Ordering::Relaxed);
        let mut st = self.st.lock().unwrap();
        // VFIO_DEVICE_RESET puts a migratable device back in RUNNING.
        st.state = MigState::Running;
        st.generation += 1;
        drop(st);
        self.fake.reset()
    }
    fn iommu_domain(&self) -> Arc<dyn IommuDomain> {
        self.fake.iommu_domain()
    }
    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        self.fake.region_mmap_fd(index)
    }

    fn migration_flags(&self) -> Result<Option<MigrationFlags>> {
        Ok(self.flags)
    }

    fn mig_state(&self) -> Result<MigState> {
        if self.flags.is_none() {
            return Err(Error::Unsupported("migration".into()));
        }
        Ok(self.state())
    }

    fn set_mig_state(&self, to: MigState) -> Result<Option<Box<dyn MigrationStream>>> {
        if self.flags.is_none() {
            return Err(Error::Unsupported("migration".into()));
        }
        let mut st = self.st.lock().unwrap();
        let from = st.state;
        if let Some(i) = st.fail_to.iter().position(|s| *s == to) {
            st.fail_to.remove(i);
            if st.fail_into_error {
                st.state = MigState::Error;
                st.generation += 1;
            }
            return Err(errno(libc::EIO, "injected transition failure"));
        }
        if !self.allowed(from, to) {
            return Err(errno(libc::EINVAL, "transition not allowed"));
        }
        self.transitions.lock().unwrap().push((from, to));
        if from == to {
            return Ok(None);
        }
        // Leaving RESUMING loads what was written, or fails into ERROR.
        if from == MigState::Resuming {
            let taken = std::mem::take(&mut st.taken);
            if !image_ok(&taken) {
                st.state = MigState::Error;
                st.generation += 1;
                return Err(errno(libc::EINVAL, "bad device state"));
            }
            drop(st);
            let last = &taken[taken.len() - STATE_LEN..];
            self.inside(|| self.fake.region_write(0, STATE_AT, last))?;
            st = self.st.lock().unwrap();
        }
        let opens = Self::opens_stream(from, to);
        let keeps = matches!(from, MigState::PreCopy | MigState::PreCopyP2p)
            && matches!(
                to,
                MigState::PreCopy | MigState::PreCopyP2p | MigState::StopCopy
            );
        if !keeps {
            st.generation += 1;
        }
        match to {
            MigState::PreCopy | MigState::PreCopyP2p if opens => {
                let regs = self.regs();
                st.initial = regs.len();
                st.out = regs;
            }
            MigState::StopCopy => {
                // The complete state, whatever pre-copy sent.
                st.out = self.regs();
                st.initial = 0;
            }
            MigState::Resuming => st.taken.clear(),
            _ => {}
        }
        st.state = to;
        if opens {
            return Ok(Some(Box::new(DoubleStream {
                st: Arc::clone(&self.st),
                generation: st.generation,
                reading: to != MigState::Resuming,
            })));
        }
        Ok(None)
    }

    fn mig_data_size(&self) -> Result<u64> {
        Ok(STATE_LEN as u64)
    }

    fn dma_logging_start(&self, page_size: u64, ranges: &[DirtyRange]) -> Result<()> {
        let mut st = self.st.lock().unwrap();
        if st.logging.is_some() {
            return Err(errno(libc::EBUSY, "logging already"));
        }
        st.logging = Some(Logging {
            page_size,
            ranges: ranges.to_vec(),
            dirty: BTreeSet::new(),
        });
        Ok(())
    }

    fn dma_logging_stop(&self) -> Result<()> {
        self.st
            .lock()
            .unwrap()
            .logging
            .take()
            .map(|_| ())
            .ok_or_else(|| errno(libc::EINVAL, "not logging"))
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<()> {
        let mut st = self.st.lock().unwrap();
        let l = st
            .logging
            .as_mut()
            .ok_or_else(|| errno(libc::EINVAL, "not logging"))?;
        if page_size != l.page_size {
            return Err(errno(libc::EINVAL, "page size"));
        }
        let hit: Vec<u64> = l
            .dirty
            .iter()
            .copied()
            .filter(|a| *a >= iova && *a < iova + length)
            .collect();
        for a in hit {
            let p = ((a - iova) / page_size) as usize;
            bitmap[p / 64] |= 1 << (p % 64);
            l.dirty.remove(&a);
        }
        Ok(())
    }
}

/// An IOMMU domain over the fake's that tracks dirty pages itself (as type1
/// does), at 4 KiB, with the pages the test says a device wrote.
pub struct TrackingDomain {
    pub inner: Arc<dyn IommuDomain>,
    pub tracking: Mutex<Option<BTreeSet<u64>>>,
    pub sizes: u64,
}

impl TrackingDomain {
    pub fn wrote(&self, gpa: u64, len: u64) {
        if let Some(d) = self.tracking.lock().unwrap().as_mut() {
            let mut a = gpa & !0xfff;
            while a < gpa + len {
                d.insert(a);
                a += 0x1000;
            }
        }
    }
}

impl IommuDomain for TrackingDomain {
    fn id(&self) -> DomainId {
        self.inner.id()
    }
    unsafe fn map(&self, iova: u64, size: u64, host: vfio_backend::DmaSource<'_>) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.inner.map(iova, size, host) }
    }
    fn map_remote(
        &self,
        iova: u64,
        size: u64,
        read_only: bool,
        remote: Arc<dyn vfio_backend::RemoteDma>,
    ) -> Result<()> {
        self.inner.map_remote(iova, size, read_only, remote)
    }
    fn unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.inner.unmap(iova, size)
    }
    fn iova_ranges(&self) -> Result<Vec<std::ops::RangeInclusive<u64>>> {
        self.inner.iova_ranges()
    }
    fn dirty_page_sizes(&self) -> Result<u64> {
        if self.sizes == 0 {
            return Err(Error::Unsupported("dirty tracking in this domain".into()));
        }
        Ok(self.sizes)
    }
    fn dirty_tracking_start(&self) -> Result<()> {
        *self.tracking.lock().unwrap() = Some(BTreeSet::new());
        Ok(())
    }
    fn dirty_tracking_stop(&self) -> Result<()> {
        *self.tracking.lock().unwrap() = None;
        Ok(())
    }
    fn dirty_bitmap(&self, iova: u64, size: u64, page_size: u64, bitmap: &mut [u64]) -> Result<()> {
        let mut t = self.tracking.lock().unwrap();
        let d = t
            .as_mut()
            .ok_or_else(|| errno(libc::EINVAL, "not tracking"))?;
        let hit: Vec<u64> = d
            .iter()
            .copied()
            .filter(|a| *a >= iova && *a < iova + size)
            .collect();
        for a in hit {
            let p = ((a - iova) / page_size) as usize;
            bitmap[p / 64] |= 1 << (p % 64);
            d.remove(&a);
        }
        Ok(())
    }
}

/// A `Vfio` whose domain is a [`TrackingDomain`] (everything else: the
/// fake, but no migration and no DMA logging: the trait's defaults, on
/// purpose, to play a device without them).
pub struct TrackedFake {
    pub fake: Arc<FakeDevice>,
    pub domain: Arc<TrackingDomain>,
}

impl TrackedFake {
    pub fn new(profile: &str) -> Arc<TrackedFake> {
        Self::with_sizes(profile, 0x1000)
    }

    /// Tracking at the page sizes of bitmap `sizes`; 0: the domain cannot
    /// track (and the device does not log): nothing can.
    pub fn with_sizes(profile: &str, sizes: u64) -> Arc<TrackedFake> {
        let fake = Arc::new(FakeDevice::profile(profile).unwrap());
        let domain = Arc::new(TrackingDomain {
            inner: fake.iommu_domain(),
            tracking: Mutex::new(None),
            sizes,
        });
        Arc::new(TrackedFake { fake, domain })
    }
}

impl Vfio for TrackedFake {
    fn device_info(&self) -> Result<DeviceInfo> {
        self.fake.device_info()
    }
    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.fake.region_info(index)
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        self.fake.region_read(index, offset, data)
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.fake.region_write(index, offset, data)
    }
    fn mmap_region(&self, index: u32, area: SparseArea) -> Result<Mapping> {
        self.fake.mmap_region(index, area)
    }
    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.fake.irq_info(index)
    }
    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<()> {
        self.fake.set_irq_eventfds(index, start, fds)
    }
    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.fake.disable_irqs(index)
    }
    fn unmask_irq(&self, index: u32) -> Result<()> {
        self.fake.unmask_irq(index)
    }
    fn mask_irq(&self, index: u32) -> Result<()> {
        self.fake.mask_irq(index)
    }
    fn set_irq_unmask_eventfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.fake.set_irq_unmask_eventfd(index, fd)
    }
    fn reset(&self) -> Result<()> {
        self.fake.reset()
    }
    fn iommu_domain(&self) -> Arc<dyn IommuDomain> {
        self.domain.clone()
    }
    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        self.fake.region_mmap_fd(index)
    }
}
