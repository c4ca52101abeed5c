//! [`CountingVfio`]: a [`Vfio`] wrapper that counts calls.
//!
//! On the kernel backend every trait call is one system call (an ioctl, a
//! pread or pwrite of the device fd, or an mmap); on the vfio-user backend
//! every call is one message (or a few, for transfers split at the
//! server's maximum). Counting calls at the trait therefore counts the
//! system calls or messages a guest operation costs, whatever the backend.
//! The device's IOMMU domain is wrapped too, so its calls (DMA map, unmap,
//! IOVA ranges) count with the device's.

use std::ops::RangeInclusive;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vfio_backend::{
    DeviceInfo, DmaSource, DomainId, IommuDomain, IrqInfo, Mapping, RegionInfo, RemoteDma, Result,
    SparseArea, Vfio,
};

/// The trait methods, for [`CountingVfio::calls`].
pub use vfio_backend::VfioOp as Call;

const CALLS: usize = Call::COUNT;

/// Counts every call it forwards to the wrapped backend.
pub struct CountingVfio {
    inner: Arc<dyn Vfio>,
    counts: Arc<Counts>,
}

type Counts = [AtomicU64; CALLS];

fn bump(counts: &Counts, c: Call) {
    if let Some(a) = counts.get(c as usize) {
        a.fetch_add(1, Ordering::Relaxed);
    }
}

/// The wrapped device's domain, counting into the device's counters. Its
/// id is the wrapped domain's: wrapping does not split a domain.
struct CountingDomain {
    inner: Arc<dyn IommuDomain>,
    counts: Arc<Counts>,
}

impl IommuDomain for CountingDomain {
    fn id(&self) -> DomainId {
        self.inner.id()
    }

    /// # Safety
    /// As [`IommuDomain::map`] (forwarded as is).
    unsafe fn map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        bump(&self.counts, Call::DmaMap);
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.inner.map(iova, size, host) }
    }

    fn map_remote(
        &self,
        iova: u64,
        size: u64,
        read_only: bool,
        remote: Arc<dyn RemoteDma>,
    ) -> Result<()> {
        bump(&self.counts, Call::DmaMap);
        self.inner.map_remote(iova, size, read_only, remote)
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<()> {
        bump(&self.counts, Call::DmaUnmap);
        self.inner.unmap(iova, size)
    }

    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>> {
        bump(&self.counts, Call::IovaRanges);
        self.inner.iova_ranges()
    }

    fn dirty_page_sizes(&self) -> Result<u64> {
        self.inner.dirty_page_sizes()
    }

    fn dirty_tracking_start(&self) -> Result<()> {
        self.inner.dirty_tracking_start()
    }

    fn dirty_tracking_stop(&self) -> Result<()> {
        self.inner.dirty_tracking_stop()
    }

    fn dirty_bitmap(&self, iova: u64, size: u64, page_size: u64, bitmap: &mut [u64]) -> Result<()> {
        self.inner.dirty_bitmap(iova, size, page_size, bitmap)
    }
}

impl std::fmt::Debug for CountingVfio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingVfio")
            .field("total", &self.total())
            .finish_non_exhaustive()
    }
}

impl CountingVfio {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Vfio>) -> CountingVfio {
        CountingVfio {
            inner,
            counts: Default::default(),
        }
    }

    fn bump(&self, c: Call) {
        bump(&self.counts, c);
    }

    /// Calls of one method so far.
    pub fn calls(&self, c: Call) -> u64 {
        self.counts
            .get(c as usize)
            .map_or(0, |a| a.load(Ordering::Relaxed))
    }

    /// Calls of every method so far: the system calls (kernel backend) or
    /// request messages (vfio-user) the device has cost.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|a| a.load(Ordering::Relaxed)).sum()
    }
}

impl Vfio for CountingVfio {
    fn device_info(&self) -> Result<DeviceInfo> {
        self.bump(Call::DeviceInfo);
        self.inner.device_info()
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.bump(Call::RegionInfo);
        self.inner.region_info(index)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        self.bump(Call::RegionRead);
        self.inner.region_read(index, offset, data)
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.bump(Call::RegionWrite);
        self.inner.region_write(index, offset, data)
    }

    fn mmap_region(&self, index: u32, area: SparseArea) -> Result<Mapping> {
        self.bump(Call::MmapRegion);
        self.inner.mmap_region(index, area)
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.bump(Call::IrqInfo);
        self.inner.irq_info(index)
    }

    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<()> {
        self.bump(Call::SetIrqEventfds);
        self.inner.set_irq_eventfds(index, start, fds)
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.bump(Call::DisableIrqs);
        self.inner.disable_irqs(index)
    }

    fn unmask_irq(&self, index: u32) -> Result<()> {
        self.bump(Call::UnmaskIrq);
        self.inner.unmask_irq(index)
    }

    fn mask_irq(&self, index: u32) -> Result<()> {
        self.bump(Call::MaskIrq);
        self.inner.mask_irq(index)
    }

    fn set_irq_unmask_eventfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.bump(Call::SetIrqUnmaskEventfd);
        self.inner.set_irq_unmask_eventfd(index, fd)
    }

    fn reset(&self) -> Result<()> {
        self.bump(Call::Reset);
        self.inner.reset()
    }

    fn iommu_domain(&self) -> Arc<dyn IommuDomain> {
        Arc::new(CountingDomain {
            inner: self.inner.iommu_domain(),
            counts: Arc::clone(&self.counts),
        })
    }

    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        self.inner.region_mmap_fd(index)
    }

    fn migration_flags(&self) -> Result<Option<vfio_backend::MigrationFlags>> {
        self.inner.migration_flags()
    }

    fn mig_state(&self) -> Result<vfio_backend::MigState> {
        self.inner.mig_state()
    }

    fn set_mig_state(
        &self,
        state: vfio_backend::MigState,
    ) -> Result<Option<Box<dyn vfio_backend::MigrationStream>>> {
        self.inner.set_mig_state(state)
    }

    fn mig_data_size(&self) -> Result<u64> {
        self.inner.mig_data_size()
    }

    fn dma_logging_start(&self, page_size: u64, ranges: &[vfio_backend::DirtyRange]) -> Result<()> {
        self.inner.dma_logging_start(page_size, ranges)
    }

    fn dma_logging_stop(&self) -> Result<()> {
        self.inner.dma_logging_stop()
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<()> {
        self.inner
            .dma_logging_report(iova, length, page_size, bitmap)
    }
}
