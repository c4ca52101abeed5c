//! The device fd: what a group-opened device and a vfio cdev have in common
//! (region access, mmap, interrupts, reset), and [`KernelDevice`], the
//! [`Vfio`] implementation on top of it.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio as uapi;

use super::container::{KernelContainer, KernelGroup};
use super::ioctls::{self, HotResetInfo};
#[cfg(feature = "iommufd")]
use super::iommufd::IommufdIoas;
use super::{migration, page_size, prefix_error};
use crate::{
    irq_flags, DeviceInfo, DirtyRange, Error, IommuDomain, IrqInfo, Mapping, MigState,
    MigrationFlags, MigrationStream, RegionInfo, Result, SparseArea, Vfio,
};

/// Upper bound on the region and interrupt counts a device may report; a
/// vfio-pci device has 9 fixed regions plus a few device-specific ones.
const MAX_INDICES: u32 = 1024;
/// How often an access interrupted by a signal (`EINTR`) is retried.
const MAX_EINTR_RETRIES: usize = 16;

/// An open VFIO device fd with its region and interrupt layout, queried
/// once at open.
#[derive(Debug)]
pub(crate) struct DeviceCore {
    file: File,
    name: String,
    info: DeviceInfo,
    regions: Vec<RegionInfo>,
    irqs: Vec<IrqInfo>,
    page_size: u64,
}

/// An `EINVAL` from the kernel itself (not our own argument check).
fn is_kernel_einval(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EINVAL))
}

impl DeviceCore {
    /// Queries the device info, every region (with capabilities) and every
    /// interrupt index of an open device fd. `name` is used in errors.
    pub(crate) fn new(fd: OwnedFd, name: String) -> Result<Self> {
        let file = File::from(fd);
        let info = ioctls::device_get_info(file.as_fd()).map_err(|e| prefix_error(e, &name))?;
        if info.num_regions > MAX_INDICES || info.num_irqs > MAX_INDICES {
            return Err(Error::Io {
                context: format!("{name}: VFIO_DEVICE_GET_INFO"),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "implausible counts: {} regions, {} interrupts",
                        info.num_regions, info.num_irqs
                    ),
                ),
            });
        }
        let mut regions = Vec::with_capacity(info.num_regions as usize);
        for index in 0..info.num_regions {
            match ioctls::device_get_region_info(file.as_fd(), index) {
                Ok(r) => regions.push(r),
                // vfio-pci answers EINVAL for a region it does not implement
                // (the VGA region of a non-VGA device): report it as empty.
                Err(e) if is_kernel_einval(&e) => regions.push(RegionInfo {
                    index,
                    ..RegionInfo::default()
                }),
                Err(e) => return Err(prefix_error(e, &name)),
            }
        }
        let mut irqs = Vec::with_capacity(info.num_irqs as usize);
        for index in 0..info.num_irqs {
            match ioctls::device_get_irq_info(file.as_fd(), index) {
                Ok(i) => irqs.push(i),
                // EINVAL: an index this device lacks (ERR on conventional PCI).
                Err(e) if is_kernel_einval(&e) => irqs.push(IrqInfo {
                    index,
                    flags: 0,
                    count: 0,
                }),
                Err(e) => return Err(prefix_error(e, &name)),
            }
        }
        Ok(DeviceCore {
            file,
            name,
            info,
            regions,
            irqs,
            page_size: page_size(),
        })
    }

    /// A core over any file (tests: a plain file stands in for the device
    /// fd's pread/pwrite/mmap).
    #[cfg(test)]
    pub(crate) fn from_parts(
        file: File,
        name: &str,
        info: DeviceInfo,
        regions: Vec<RegionInfo>,
        irqs: Vec<IrqInfo>,
    ) -> Self {
        DeviceCore {
            file,
            name: name.to_string(),
            info,
            regions,
            irqs,
            page_size: page_size(),
        }
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    pub(crate) fn info(&self) -> DeviceInfo {
        self.info
    }

    pub(crate) fn region(&self, index: u32) -> Result<&RegionInfo> {
        self.regions.get(index as usize).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: region {index} does not exist (the device has {})",
                self.name,
                self.regions.len()
            ))
        })
    }

    pub(crate) fn irq(&self, index: u32) -> Result<&IrqInfo> {
        self.irqs.get(index as usize).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: interrupt index {index} does not exist (the device has {})",
                self.name,
                self.irqs.len()
            ))
        })
    }

    /// The offset in the device fd of `offset .. offset + len` of region
    /// `index`, after checking the range lies inside the region.
    fn fd_offset(&self, r: &RegionInfo, offset: u64, len: usize) -> Result<u64> {
        let end = u64::try_from(len).ok().and_then(|l| offset.checked_add(l));
        match end {
            Some(end) if end <= r.size => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{}: access of {len} bytes at {offset:#x} is outside region {} ({:#x} bytes)",
                    self.name, r.index, r.size
                )))
            }
        }
        r.offset.checked_add(offset).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: region {} offset {:#x} + {offset:#x} overflows",
                self.name, r.index, r.offset
            ))
        })
    }

    pub(crate) fn read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        let r = self.region(index)?;
        if !r.readable() {
            return Err(Error::InvalidArgument(format!(
                "{}: region {index} is not readable",
                self.name
            )));
        }
        let pos = self.fd_offset(r, offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len();
        let context = || {
            format!(
                "{}: read of {len} bytes at {offset:#x} of region {index}",
                self.name
            )
        };
        for _ in 0..MAX_EINTR_RETRIES {
            match self.file.read_at(data, pos) {
                Ok(n) if n == len => return Ok(()),
                Ok(n) => {
                    return Err(Error::io(
                        context(),
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("short read: {n} of {len} bytes"),
                        ),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(context(), e)),
            }
        }
        Err(Error::io(
            context(),
            std::io::Error::from_raw_os_error(libc::EINTR),
        ))
    }

    pub(crate) fn write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let r = self.region(index)?;
        if !r.writable() {
            return Err(Error::InvalidArgument(format!(
                "{}: region {index} is not writable",
                self.name
            )));
        }
        let pos = self.fd_offset(r, offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let context = || {
            format!(
                "{}: write of {} bytes at {offset:#x} of region {index}",
                self.name,
                data.len()
            )
        };
        for _ in 0..MAX_EINTR_RETRIES {
            match self.file.write_at(data, pos) {
                Ok(n) if n == data.len() => return Ok(()),
                Ok(n) => {
                    return Err(Error::io(
                        context(),
                        std::io::Error::new(
                            std::io::ErrorKind::WriteZero,
                            format!("short write: {n} of {} bytes", data.len()),
                        ),
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(context(), e)),
            }
        }
        Err(Error::io(
            context(),
            std::io::Error::from_raw_os_error(libc::EINTR),
        ))
    }

    /// Maps `area` of region `index`. The area must lie inside one of the
    /// region's mmap-able areas (the sparse areas, or the whole region), start
    /// on a page boundary, and either be a whole number of pages or end where
    /// the region ends (the kernel then maps the last page whole).
    pub(crate) fn mmap(&self, index: u32, area: SparseArea) -> Result<Mapping> {
        let r = self.region(index)?;
        let invalid = |why: String| {
            Error::InvalidArgument(format!(
                "{}: cannot mmap {:#x}+{:#x} of region {index}: {why}",
                self.name, area.offset, area.size
            ))
        };
        if !r.mmappable() {
            return Err(invalid("the region is not mmap-able".into()));
        }
        if area.size == 0 {
            return Err(invalid("empty area".into()));
        }
        let area_end = area
            .offset
            .checked_add(area.size)
            .filter(|&end| end <= r.size)
            .ok_or_else(|| invalid(format!("outside the region ({:#x} bytes)", r.size)))?;
        let allowed = r.mmap_areas();
        let inside = allowed.iter().any(|a| {
            a.offset
                .checked_add(a.size)
                .is_some_and(|end| area.offset >= a.offset && area_end <= end)
        });
        if !inside {
            return Err(invalid(format!(
                "not inside an mmap-able area of the region ({allowed:x?})"
            )));
        }
        let page = self.page_size;
        if area.offset % page != 0 {
            return Err(invalid(format!(
                "offset not aligned to the {page:#x}-byte page"
            )));
        }
        if area.size % page != 0 && area_end != r.size {
            return Err(invalid(format!(
                "size is not a multiple of the {page:#x}-byte page"
            )));
        }
        let fd_offset = r
            .offset
            .checked_add(area.offset)
            .filter(|o| o % page == 0)
            .ok_or_else(|| invalid(format!("region offset {:#x} is not page aligned", r.offset)))?;
        let mut prot = 0;
        if r.readable() {
            prot |= libc::PROT_READ;
        }
        if r.writable() {
            prot |= libc::PROT_WRITE;
        }
        if prot == 0 {
            return Err(invalid(
                "the region is neither readable nor writable".into(),
            ));
        }
        Mapping::map_fd(self.fd(), fd_offset, area.size, prot)
            .map_err(|e| prefix_error(e, &format!("{}: region {index}", self.name)))
    }

    /// Checks that `start .. start + len` are vectors of interrupt `index`.
    fn check_vectors(&self, index: u32, start: u32, len: usize) -> Result<&IrqInfo> {
        let irq = self.irq(index)?;
        let end = u32::try_from(len).ok().and_then(|l| start.checked_add(l));
        match end {
            Some(end) if end <= irq.count => Ok(irq),
            _ => Err(Error::InvalidArgument(format!(
                "{}: vectors {start}..{start}+{len} are outside interrupt index {index} ({} vectors)",
                self.name, irq.count
            ))),
        }
    }

    fn set_irqs(&self, flags: u32, index: u32, start: u32, count: u32, fds: &[i32]) -> Result<()> {
        ioctls::device_set_irqs(self.fd(), flags, index, start, count, fds)
            .map_err(|e| prefix_error(e, &self.name))
    }

    pub(crate) fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        if fds.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{}: no eventfds given for interrupt {index} (use disable_irqs to disable it)",
                self.name
            )));
        }
        let irq = self.check_vectors(index, start, fds.len())?;
        if irq.flags & irq_flags::EVENTFD == 0 {
            return Err(Error::Unsupported(format!(
                "{}: interrupt index {index} cannot signal an eventfd",
                self.name
            )));
        }
        let count = u32::try_from(fds.len())
            .map_err(|_| Error::InvalidArgument("too many eventfds".into()))?;
        // The raw fds: -1 detaches a vector (vfio.h, DATA_EVENTFD).
        const INLINE: usize = 32;
        let mut inline = [-1i32; INLINE];
        let heap: Vec<i32>;
        let raw: &[i32] = if fds.len() <= INLINE {
            for (dst, fd) in inline.iter_mut().zip(fds) {
                *dst = fd.map_or(-1, |f| f.as_raw_fd());
            }
            inline.get(..fds.len()).unwrap_or(&[])
        } else {
            heap = fds
                .iter()
                .map(|f| f.map_or(-1, |f| f.as_raw_fd()))
                .collect();
            &heap
        };
        self.set_irqs(
            uapi::VFIO_IRQ_SET_DATA_EVENTFD | uapi::VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            start,
            count,
            raw,
        )
    }

    pub(crate) fn disable_irqs(&self, index: u32) -> Result<()> {
        self.irq(index)?;
        self.set_irqs(
            uapi::VFIO_IRQ_SET_DATA_NONE | uapi::VFIO_IRQ_SET_ACTION_TRIGGER,
            index,
            0,
            0,
            &[],
        )
    }

    fn maskable(&self, index: u32) -> Result<()> {
        let irq = self.check_vectors(index, 0, 1)?;
        if irq.flags & irq_flags::MASKABLE == 0 {
            return Err(Error::Unsupported(format!(
                "{}: interrupt index {index} cannot be masked or unmasked by the host \
                 (no VFIO_IRQ_INFO_MASKABLE)",
                self.name
            )));
        }
        Ok(())
    }

    pub(crate) fn unmask_irq(&self, index: u32) -> Result<()> {
        self.maskable(index)?;
        self.set_irqs(
            uapi::VFIO_IRQ_SET_DATA_NONE | uapi::VFIO_IRQ_SET_ACTION_UNMASK,
            index,
            0,
            1,
            &[],
        )
    }

    pub(crate) fn mask_irq(&self, index: u32) -> Result<()> {
        self.maskable(index)?;
        self.set_irqs(
            uapi::VFIO_IRQ_SET_DATA_NONE | uapi::VFIO_IRQ_SET_ACTION_MASK,
            index,
            0,
            1,
            &[],
        )
    }

    pub(crate) fn set_irq_unmask_eventfd(
        &self,
        index: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<()> {
        use std::os::fd::AsRawFd;
        self.maskable(index)?;
        let raw = fd.map_or(-1, |f| f.as_raw_fd());
        self.set_irqs(
            uapi::VFIO_IRQ_SET_DATA_EVENTFD | uapi::VFIO_IRQ_SET_ACTION_UNMASK,
            index,
            0,
            1,
            &[raw],
        )
    }

    pub(crate) fn reset(&self) -> Result<()> {
        if !self.info.supports_reset() {
            return Err(Error::Unsupported(format!(
                "{}: the device has no reset (VFIO_DEVICE_FLAGS_RESET is clear); \
                 a bus hot reset may still be possible",
                self.name
            )));
        }
        ioctls::device_reset(self.fd()).map_err(|e| prefix_error(e, &self.name))
    }

    pub(crate) fn hot_reset_info(&self) -> Result<HotResetInfo> {
        ioctls::device_hot_reset_info(self.fd()).map_err(|e| prefix_error(e, &self.name))
    }

    pub(crate) fn hot_reset(&self, group_fds: &[BorrowedFd<'_>]) -> Result<()> {
        ioctls::device_hot_reset(self.fd(), group_fds).map_err(|e| prefix_error(e, &self.name))
    }

    pub(crate) fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        let r = self.regions.get(index as usize)?;
        (r.mmappable() && r.size > 0).then(|| (self.fd(), r.offset))
    }
}

/// How a device reaches its IOMMU.
#[derive(Debug)]
pub(crate) enum DeviceIommu {
    /// Legacy: the device's group, attached to a container.
    Group(Arc<KernelGroup>),
    /// iommufd: the IOAS the cdev is attached to, and its device id.
    #[cfg(feature = "iommufd")]
    Iommufd {
        /// The shared IOAS.
        ioas: Arc<IommufdIoas>,
        /// The iommufd device id from `VFIO_DEVICE_BIND_IOMMUFD`.
        dev_id: u32,
    },
}

/// A host device bound to `vfio-pci`, opened through a legacy container and
/// group ([`KernelContainer::open_device`]) or, with the `iommufd` feature,
/// through its vfio cdev and an iommufd IOAS (`IommufdIoas::open_device`).
///
/// Region and interrupt layouts are read once when the device is opened.
/// Dropping the device closes its fd first, then releases its group (or
/// IOAS) reference.
#[derive(Debug)]
pub struct KernelDevice {
    // Declared first so it is dropped first: the kernel refuses to detach a
    // group from its container while one of its device fds is open.
    core: DeviceCore,
    iommu: DeviceIommu,
    sysfs_path: Option<PathBuf>,
}

impl KernelDevice {
    pub(crate) fn new(core: DeviceCore, iommu: DeviceIommu, sysfs_path: Option<PathBuf>) -> Self {
        KernelDevice {
            core,
            iommu,
            sysfs_path,
        }
    }

    /// The device name: its PCI address for a group-opened device, the cdev
    /// path otherwise.
    pub fn name(&self) -> &str {
        self.core.name()
    }

    /// The sysfs path the device was opened from, if any.
    pub fn sysfs_path(&self) -> Option<&Path> {
        self.sysfs_path.as_deref()
    }

    /// The IOMMU group (legacy container/group API only).
    pub fn group(&self) -> Option<&Arc<KernelGroup>> {
        match &self.iommu {
            DeviceIommu::Group(g) => Some(g),
            #[cfg(feature = "iommufd")]
            DeviceIommu::Iommufd { .. } => None,
        }
    }

    /// The IOMMU group number (legacy container/group API only).
    pub fn group_id(&self) -> Option<u32> {
        self.group().map(|g| g.id())
    }

    /// The container the device's group is attached to (legacy API only).
    pub fn container(&self) -> Option<&Arc<KernelContainer>> {
        self.group().map(|g| g.container())
    }

    /// The IOAS the device is attached to (iommufd only).
    #[cfg(feature = "iommufd")]
    pub fn ioas(&self) -> Option<&Arc<IommufdIoas>> {
        match &self.iommu {
            DeviceIommu::Iommufd { ioas, .. } => Some(ioas),
            DeviceIommu::Group(_) => None,
        }
    }

    /// The iommufd device id from `VFIO_DEVICE_BIND_IOMMUFD` (iommufd only).
    #[cfg(feature = "iommufd")]
    pub fn iommufd_dev_id(&self) -> Option<u32> {
        match &self.iommu {
            DeviceIommu::Iommufd { dev_id, .. } => Some(*dev_id),
            DeviceIommu::Group(_) => None,
        }
    }

    /// Whether the device logs the pages its DMA writes
    /// (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START`, probed).
    pub fn dma_logging_supported(&self) -> Result<bool> {
        migration::dma_logging_supported(self.core.fd())
            .map_err(|e| prefix_error(e, self.core.name()))
    }

    /// Whether the IOMMU behind this device can track the pages it writes
    /// (`IOMMU_GET_HW_INFO`'s `IOMMU_HW_CAP_DIRTY_TRACKING`; iommufd only).
    /// `Ok(false)` for a device opened through a legacy container, whose
    /// dirty tracking is the container's
    /// ([`IommuDomain::dirty_page_sizes`]).
    #[cfg(feature = "iommufd")]
    pub fn iommu_hw_dirty_tracking(&self) -> Result<bool> {
        match &self.iommu {
            DeviceIommu::Iommufd { ioas, dev_id } => ioas
                .hw_dirty_tracking(*dev_id)
                .map_err(|e| prefix_error(e, self.core.name())),
            DeviceIommu::Group(_) => Ok(false),
        }
    }

    /// The device is in a no-IOMMU group: it can DMA anywhere in host memory
    /// and [`IommuDomain::map`](crate::IommuDomain::map) is unsupported.
    pub fn is_noiommu(&self) -> bool {
        self.container()
            .is_some_and(|c| c.mode() == super::IommuMode::NoIommu)
    }

    /// The devices a PCI hot reset of this device's bus or slot would reset
    /// too (`VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`).
    pub fn hot_reset_info(&self) -> Result<HotResetInfo> {
        self.core.hot_reset_info()
    }

    /// Performs a PCI hot reset (`VFIO_DEVICE_PCI_HOT_RESET`), proving
    /// ownership of every affected device with `group_fds`: with the legacy
    /// API, one fd per group listed by [`KernelDevice::hot_reset_info`]
    /// (see [`KernelGroup`], which is `AsFd`); with iommufd, none (the
    /// kernel checks ownership through the iommufd).
    pub fn hot_reset(&self, group_fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.core.hot_reset(group_fds)
    }

    /// Performs a PCI hot reset with the groups this process already holds:
    /// with the legacy API, every group the hot reset affects must be in
    /// this device's container (an error lists those that are not); with
    /// iommufd, ownership is checked by the kernel.
    pub fn hot_reset_owned(&self) -> Result<()> {
        match &self.iommu {
            DeviceIommu::Group(group) => {
                let needed = self.hot_reset_info()?.group_ids();
                let held = group.container().groups();
                let missing: Vec<u32> = needed
                    .iter()
                    .copied()
                    .filter(|id| !held.iter().any(|g| g.id() == *id))
                    .collect();
                if !missing.is_empty() {
                    return Err(Error::InvalidArgument(format!(
                        "{}: a hot reset also resets devices in groups {missing:?}, which this \
                         container does not hold",
                        self.name()
                    )));
                }
                let fds: Vec<BorrowedFd<'_>> = held
                    .iter()
                    .filter(|g| needed.contains(&g.id()))
                    .map(|g| g.as_fd())
                    .collect();
                self.core.hot_reset(&fds)
            }
            #[cfg(feature = "iommufd")]
            DeviceIommu::Iommufd { .. } => self.core.hot_reset(&[]),
        }
    }
}

impl AsFd for KernelDevice {
    /// The device fd (for the KVM-VFIO device with iommufd, or for polling).
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.core.fd()
    }
}

impl Vfio for KernelDevice {
    fn device_info(&self) -> Result<DeviceInfo> {
        Ok(self.core.info())
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        self.core.region(index).cloned()
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        self.core.read(index, offset, data)
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.core.write(index, offset, data)
    }

    fn mmap_region(&self, index: u32, area: SparseArea) -> Result<Mapping> {
        self.core.mmap(index, area)
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        self.core.irq(index).copied()
    }

    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<()> {
        self.core.set_irq_eventfds(index, start, fds)
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.core.disable_irqs(index)
    }

    fn unmask_irq(&self, index: u32) -> Result<()> {
        self.core.unmask_irq(index)
    }

    fn mask_irq(&self, index: u32) -> Result<()> {
        self.core.mask_irq(index)
    }

    fn set_irq_unmask_eventfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        self.core.set_irq_unmask_eventfd(index, fd)
    }

    fn reset(&self) -> Result<()> {
        self.core.reset()
    }

    fn iommu_domain(&self) -> Arc<dyn IommuDomain> {
        match &self.iommu {
            DeviceIommu::Group(g) => g.container().clone(),
            #[cfg(feature = "iommufd")]
            DeviceIommu::Iommufd { ioas, .. } => ioas.clone(),
        }
    }

    fn migration_flags(&self) -> Result<Option<MigrationFlags>> {
        migration::migration_flags(self.core.fd(), self.core.name())
    }

    fn mig_state(&self) -> Result<MigState> {
        migration::mig_state(self.core.fd(), self.core.name())
    }

    fn set_mig_state(&self, state: MigState) -> Result<Option<Box<dyn MigrationStream>>> {
        migration::set_mig_state(self.core.fd(), self.core.name(), state)
    }

    fn mig_data_size(&self) -> Result<u64> {
        migration::mig_data_size(self.core.fd(), self.core.name())
    }

    fn dma_logging_start(&self, page_size: u64, ranges: &[DirtyRange]) -> Result<()> {
        migration::dma_logging_start(self.core.fd(), self.core.name(), page_size, ranges)
            .map(|_chosen| ())
    }

    fn dma_logging_stop(&self) -> Result<()> {
        migration::dma_logging_stop(self.core.fd(), self.core.name())
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<()> {
        migration::dma_logging_report(
            self.core.fd(),
            self.core.name(),
            iova,
            length,
            page_size,
            bitmap,
        )
    }

    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        self.core.region_mmap_fd(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{device_flags, irq, region, region_flags};
    use std::io::Write;

    const RW: u32 = region_flags::READ | region_flags::WRITE;

    /// A core whose "device fd" is a plain file: pread/pwrite/mmap at region
    /// offsets behave as on a vfio device fd. Region 0 (BAR0, 2 pages,
    /// mmap-able except a sparse hole), region 7 (config, 256 bytes, no
    /// mmap), region 8 (absent). Interrupts: INTx maskable, MSI-X 4 vectors.
    fn core_over_file(page: u64) -> (DeviceCore, File) {
        let mut file = tempfile::tempfile().unwrap();
        let bar_off = 0x10 * page;
        let cfg_off = 0x20 * page;
        file.set_len(cfg_off + 0x100).unwrap();
        let regions = vec![
            RegionInfo {
                index: 0,
                flags: RW | region_flags::MMAP | region_flags::CAPS,
                size: 2 * page,
                offset: bar_off,
                caps: vec![crate::RegionCap::SparseMmap(vec![SparseArea {
                    offset: page,
                    size: page,
                }])],
            },
            RegionInfo {
                index: 1,
                ..Default::default()
            },
            RegionInfo {
                index: 2,
                ..Default::default()
            },
            RegionInfo {
                index: 3,
                ..Default::default()
            },
            RegionInfo {
                index: 4,
                ..Default::default()
            },
            RegionInfo {
                index: 5,
                ..Default::default()
            },
            RegionInfo {
                index: 6,
                flags: region_flags::READ,
                size: 0x800,
                offset: 6 * page,
                caps: vec![],
            },
            RegionInfo {
                index: 7,
                flags: RW,
                size: 0x100,
                offset: cfg_off,
                caps: vec![],
            },
            RegionInfo {
                index: 8,
                ..Default::default()
            },
        ];
        let irqs = vec![
            IrqInfo {
                index: 0,
                flags: irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED,
                count: 1,
            },
            IrqInfo {
                index: 1,
                flags: irq_flags::EVENTFD | irq_flags::NORESIZE,
                count: 1,
            },
            IrqInfo {
                index: 2,
                flags: irq_flags::EVENTFD | irq_flags::NORESIZE,
                count: 4,
            },
        ];
        let info = DeviceInfo {
            flags: device_flags::PCI,
            num_regions: 9,
            num_irqs: 3,
        };
        file.write_all_at(b"\x86\x80\x34\x12", cfg_off).unwrap();
        file.flush().unwrap();
        let clone = file.try_clone().unwrap();
        (
            DeviceCore::from_parts(file, "0000:00:04.0", info, regions, irqs),
            clone,
        )
    }

    #[test]
    fn region_read_uses_the_region_offset_in_the_device_fd() {
        let (core, _f) = core_over_file(page_size());
        let mut id = [0u8; 4];
        core.read(region::CONFIG, 0, &mut id).unwrap();
        assert_eq!(id, [0x86, 0x80, 0x34, 0x12]);
    }

    #[test]
    fn region_write_lands_at_region_offset_plus_offset() {
        let page = page_size();
        let (core, f) = core_over_file(page);
        core.write(region::CONFIG, 4, &[0x07, 0x01]).unwrap();
        let mut back = [0u8; 2];
        f.read_exact_at(&mut back, 0x20 * page + 4).unwrap();
        assert_eq!(back, [0x07, 0x01]);
    }

    #[test]
    fn access_past_the_end_of_a_region_is_refused() {
        let (core, _f) = core_over_file(page_size());
        let mut b = [0u8; 4];
        assert!(matches!(
            core.read(region::CONFIG, 0xfd, &mut b),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            core.write(region::CONFIG, u64::MAX - 1, &b),
            Err(Error::InvalidArgument(_))
        ));
        // The last four bytes are fine.
        core.read(region::CONFIG, 0xfc, &mut b).unwrap();
    }

    #[test]
    fn access_to_an_absent_region_or_index_is_refused() {
        let (core, _f) = core_over_file(page_size());
        let mut b = [0u8; 1];
        assert!(matches!(
            core.read(region::VGA, 0, &mut b),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            core.read(42, 0, &mut b),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn write_to_a_read_only_region_is_refused() {
        let (core, _f) = core_over_file(page_size());
        let e = core.write(region::ROM, 0, &[0]).unwrap_err();
        assert!(e.to_string().contains("not writable"), "{e}");
    }

    #[test]
    fn short_read_is_reported_not_zero_filled() {
        // The ROM region claims 0x800 bytes at page 6, but the file backing it
        // is longer; truncate it so the read comes back short.
        let page = page_size();
        let (core, f) = core_over_file(page);
        f.set_len(6 * page + 0x10).unwrap();
        let mut b = [0xaau8; 0x20];
        let e = core.read(region::ROM, 0, &mut b).unwrap_err();
        assert!(
            matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof),
            "{e}"
        );
        assert!(e.to_string().contains("short read: 16 of 32"), "{e}");
    }

    #[test]
    fn mmap_maps_a_sparse_area_at_region_plus_area_offset() {
        let page = page_size();
        let (core, f) = core_over_file(page);
        f.write_all_at(&[0x5a], 0x10 * page + page).unwrap();
        let m = core
            .mmap(
                region::BAR0,
                SparseArea {
                    offset: page,
                    size: page,
                },
            )
            .unwrap();
        assert_eq!(m.len() as u64, page);
        // SAFETY: the mapping is `page` bytes long and alive.
        assert_eq!(unsafe { m.as_ptr().read_volatile() }, 0x5a);
    }

    #[test]
    fn mmap_outside_the_sparse_areas_or_region_is_refused() {
        let page = page_size();
        let (core, _f) = core_over_file(page);
        // Page 0 of BAR0 is not in the sparse-mmap capability.
        let e = core
            .mmap(
                region::BAR0,
                SparseArea {
                    offset: 0,
                    size: page,
                },
            )
            .unwrap_err();
        assert!(
            e.to_string().contains("not inside an mmap-able area"),
            "{e}"
        );
        let e = core
            .mmap(
                region::BAR0,
                SparseArea {
                    offset: page,
                    size: 2 * page,
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("outside the region"), "{e}");
        let e = core
            .mmap(
                region::BAR0,
                SparseArea {
                    offset: u64::MAX,
                    size: 2,
                },
            )
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)));
        let e = core
            .mmap(
                region::CONFIG,
                SparseArea {
                    offset: 0,
                    size: 0x100,
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("not mmap-able"), "{e}");
    }

    #[test]
    fn mmap_of_a_misaligned_area_is_refused() {
        let page = page_size();
        let (core, _f) = core_over_file(page);
        let e = core
            .mmap(
                region::BAR0,
                SparseArea {
                    offset: page + 8,
                    size: 8,
                },
            )
            .unwrap_err();
        assert!(e.to_string().contains("not aligned"), "{e}");
        let e = core
            .mmap(
                region::BAR0,
                SparseArea {
                    offset: page,
                    size: page / 2,
                },
            )
            .unwrap_err();
        // Half a page that does not end the region.
        assert!(e.to_string().contains("multiple of"), "{e}");
    }

    #[test]
    fn irq_sub_range_past_the_vector_count_is_refused_before_the_ioctl() {
        let (core, _f) = core_over_file(page_size());
        let e = core
            .set_irq_eventfds(irq::MSIX, 3, &[None, None])
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = core
            .set_irq_eventfds(irq::MSIX, u32::MAX, &[None])
            .unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = core.set_irq_eventfds(irq::MSIX, 0, &[]).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        // In range: reaches the ioctl, which a plain file refuses with ENOTTY.
        let e = core.set_irq_eventfds(irq::MSIX, 3, &[None]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTTY));
        assert!(e.to_string().contains("0000:00:04.0"), "{e}");
    }

    #[test]
    fn unmask_of_a_non_maskable_interrupt_is_unsupported() {
        let (core, _f) = core_over_file(page_size());
        assert!(matches!(
            core.unmask_irq(irq::MSIX),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            core.mask_irq(irq::MSI),
            Err(Error::Unsupported(_))
        ));
        assert!(matches!(
            core.set_irq_unmask_eventfd(irq::MSI, None),
            Err(Error::Unsupported(_))
        ));
        // INTx is maskable: the request reaches the (fake) device.
        assert_eq!(
            core.unmask_irq(irq::INTX).unwrap_err().errno(),
            Some(libc::ENOTTY)
        );
    }

    #[test]
    fn reset_without_the_reset_flag_is_unsupported() {
        let (core, _f) = core_over_file(page_size());
        let e = core.reset().unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("VFIO_DEVICE_FLAGS_RESET"), "{e}");
    }

    #[test]
    fn region_mmap_fd_is_offered_only_for_mmappable_regions() {
        let page = page_size();
        let (core, _f) = core_over_file(page);
        let (_, off) = core.region_mmap_fd(region::BAR0).unwrap();
        assert_eq!(off, 0x10 * page);
        assert!(core.region_mmap_fd(region::CONFIG).is_none());
        assert!(core.region_mmap_fd(99).is_none());
    }

    #[test]
    fn opening_a_missing_device_is_not_available_and_names_it() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("0000:ff:1f.7");
        let e = KernelDevice::open(&path).unwrap_err();
        assert!(matches!(e, Error::NotAvailable { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("0000:ff:1f.7"), "{msg}");
        assert!(msg.contains("vfio-pci"), "{msg}");
    }
}
