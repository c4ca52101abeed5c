//! The [`Vfio`] trait: what any VFIO device offers, whether it is a host PCI
//! function bound to the kernel's `vfio-pci` driver or a device served by a
//! vfio-user server over a Unix socket.
//!
//! This crate knows nothing of PCI semantics: it moves bytes to and from
//! regions, wires eventfds to interrupts and maps DMA. The PCI meaning of
//! those regions (BARs, config space, MSI-X) lives in the `vfio-pci` crate.
//!
//! Region and interrupt indices follow the kernel's uAPI (`linux/vfio.h`):
//! see [`region`] and [`irq`].
#![cfg_attr(docsrs, feature(doc_cfg))]

use std::os::fd::BorrowedFd;
use std::sync::Arc;

mod domain;
mod error;
pub mod eventfd;
pub mod kernel;
mod mapping;
pub mod migration;
#[cfg(feature = "vfio-user")]
#[cfg_attr(docsrs, doc(cfg(feature = "vfio-user")))]
pub mod user;

pub use domain::{DomainId, IommuDomain};
pub use error::{Error, Result};
pub use mapping::Mapping;
pub use migration::{DirtyRange, MigState, MigrationFlags, MigrationStream, PrecopyInfo};

/// Region indices of a VFIO PCI device (`VFIO_PCI_*_REGION_INDEX`).
pub mod region {
    /// BAR 0; BARs 1 to 5 follow at indices 1 to 5.
    pub const BAR0: u32 = 0;
    /// BAR 5.
    pub const BAR5: u32 = 5;
    /// The expansion ROM.
    pub const ROM: u32 = 6;
    /// PCI configuration space.
    pub const CONFIG: u32 = 7;
    /// Legacy VGA ranges.
    pub const VGA: u32 = 8;
    /// The number of fixed PCI region indices.
    pub const NUM_PCI_REGIONS: u32 = 9;
}

/// Interrupt indices of a VFIO PCI device (`VFIO_PCI_*_IRQ_INDEX`).
pub mod irq {
    /// Legacy INTx.
    pub const INTX: u32 = 0;
    /// MSI.
    pub const MSI: u32 = 1;
    /// MSI-X.
    pub const MSIX: u32 = 2;
    /// PCIe AER error notification.
    pub const ERR: u32 = 3;
    /// Device request (the kernel asks the user to release the device).
    pub const REQ: u32 = 4;
}

/// `VFIO_DEVICE_FLAGS_*` bits of [`DeviceInfo::flags`].
pub mod device_flags {
    /// The device supports `VFIO_DEVICE_RESET`.
    pub const RESET: u32 = 1 << 0;
    /// A PCI device.
    pub const PCI: u32 = 1 << 1;
    /// The device info carries capabilities.
    pub const CAPS: u32 = 1 << 7;
}

/// `VFIO_REGION_INFO_FLAG_*` bits of [`RegionInfo::flags`].
pub mod region_flags {
    /// The region may be read.
    pub const READ: u32 = 1 << 0;
    /// The region may be written.
    pub const WRITE: u32 = 1 << 1;
    /// The region (or the areas of its sparse-mmap capability) may be mmapped.
    pub const MMAP: u32 = 1 << 2;
    /// The region info carries capabilities.
    pub const CAPS: u32 = 1 << 3;
}

/// `VFIO_IRQ_INFO_*` bits of [`IrqInfo::flags`].
pub mod irq_flags {
    /// The interrupt can be signalled through an eventfd.
    pub const EVENTFD: u32 = 1 << 0;
    /// The interrupt can be masked.
    pub const MASKABLE: u32 = 1 << 1;
    /// The interrupt is masked by the host when it fires and must be unmasked.
    pub const AUTOMASKED: u32 = 1 << 2;
    /// No resize of the vector count is possible while enabled.
    pub const NORESIZE: u32 = 1 << 3;
}

/// What `VFIO_DEVICE_GET_INFO` (or the vfio-user `DEVICE_GET_INFO`) reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `VFIO_DEVICE_FLAGS_*`, see [`device_flags`].
    pub flags: u32,
    /// Number of regions (for PCI at least [`region::NUM_PCI_REGIONS`]).
    pub num_regions: u32,
    /// Number of interrupt indices.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// The device supports a function-level reset through [`Vfio::reset`].
    pub fn supports_reset(&self) -> bool {
        self.flags & device_flags::RESET != 0
    }

    /// The device is a PCI function.
    pub fn is_pci(&self) -> bool {
        self.flags & device_flags::PCI != 0
    }
}

/// One mmap-able window inside a region, relative to the region's start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SparseArea {
    /// Offset from the start of the region.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A capability of a region (`VFIO_REGION_INFO_CAP_*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionCap {
    /// Only these areas of the region may be mmapped (`VFIO_REGION_INFO_CAP_SPARSE_MMAP`).
    SparseMmap(Vec<SparseArea>),
    /// A device-specific region type (`VFIO_REGION_INFO_CAP_TYPE`).
    Type {
        /// `VFIO_REGION_TYPE_*`.
        type_: u32,
        /// Subtype, meaning depends on the type.
        subtype: u32,
    },
    /// The MSI-X table and PBA inside this BAR may be mmapped too
    /// (`VFIO_REGION_INFO_CAP_MSIX_MAPPABLE`).
    MsixMappable,
    /// A capability this crate does not decode, kept so nothing is lost.
    Unknown {
        /// Capability id.
        id: u16,
        /// Capability version.
        version: u16,
    },
}

/// What `VFIO_DEVICE_GET_REGION_INFO` reports for one region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    /// The region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`, see [`region_flags`].
    pub flags: u32,
    /// Size in bytes; 0 for a region the device does not implement.
    pub size: u64,
    /// Offset of the region in the device fd (kernel) or region fd (vfio-user).
    pub offset: u64,
    /// Decoded capabilities.
    pub caps: Vec<RegionCap>,
}

impl RegionInfo {
    /// The region may be read.
    pub fn readable(&self) -> bool {
        self.flags & region_flags::READ != 0
    }

    /// The region may be written.
    pub fn writable(&self) -> bool {
        self.flags & region_flags::WRITE != 0
    }

    /// The region, or the areas of its sparse capability, may be mmapped.
    pub fn mmappable(&self) -> bool {
        self.flags & region_flags::MMAP != 0
    }

    /// The sparse-mmap areas, if the region has that capability.
    pub fn sparse_areas(&self) -> Option<&[SparseArea]> {
        self.caps.iter().find_map(|c| match c {
            RegionCap::SparseMmap(areas) => Some(areas.as_slice()),
            _ => None,
        })
    }

    /// The MSI-X table and PBA in this region may be mmapped.
    pub fn msix_mappable(&self) -> bool {
        self.caps
            .iter()
            .any(|c| matches!(c, RegionCap::MsixMappable))
    }

    /// The areas of this region that may be mmapped: the sparse areas if the
    /// region has that capability, else the whole region when it is mmap-able,
    /// else none.
    pub fn mmap_areas(&self) -> Vec<SparseArea> {
        if !self.mmappable() || self.size == 0 {
            return Vec::new();
        }
        match self.sparse_areas() {
            Some(areas) => areas.to_vec(),
            None => vec![SparseArea {
                offset: 0,
                size: self.size,
            }],
        }
    }
}

/// What `VFIO_DEVICE_GET_IRQ_INFO` reports for one interrupt index.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    /// The interrupt index.
    pub index: u32,
    /// `VFIO_IRQ_INFO_*`, see [`irq_flags`].
    pub flags: u32,
    /// Number of vectors; 0 when the device has no such interrupt.
    pub count: u32,
}

/// A file that backs a DMA-mapped range, for backends that pass memory by fd
/// (vfio-user).
#[derive(Clone, Copy, Debug)]
pub struct DmaFile<'a> {
    /// The file (a memfd, a hugetlbfs file, ...).
    pub fd: BorrowedFd<'a>,
    /// Offset in the file of the range's first byte.
    pub offset: u64,
}

/// The host memory behind a DMA mapping.
#[derive(Clone, Copy, Debug)]
pub struct DmaSource<'a> {
    /// Address of the range in this process (the kernel backend pins it).
    ///
    /// 0 means the range is not mapped in this process and must be reached
    /// through [`DmaSource::file`] by file I/O (`pread` / `pwrite`). Our
    /// vfio-user server passes 0 for a client's file that is not sealed
    /// against shrinking (`F_SEAL_SHRINK`): loads and stores through a
    /// mapping of such a file die with `SIGBUS` once the client shrinks it,
    /// while file I/O only comes up short. A backend that needs host memory
    /// (the kernel's, which pins `host_addr`) fails to map such a source.
    pub host_addr: u64,
    /// The file behind the range, when there is one. The vfio-user backend
    /// needs it to share the memory with the server; the kernel backend
    /// ignores it.
    pub file: Option<DmaFile<'a>>,
    /// The device may only read this range.
    pub read_only: bool,
}

/// Memory a device reaches by asking its owner, not by loads and stores:
/// what a vfio-user server gets from a client's `DMA_MAP` without a file
/// descriptor (guest RAM the client cannot share), reached with `DMA_READ`
/// / `DMA_WRITE` messages to the client.
///
/// Each call blocks until the owner answers, within a bound the
/// implementation sets (it fails with [`Error::Timeout`] or
/// [`Error::Disconnected`] rather than wait longer). A device must
/// therefore not call it while it holds a lock that serving a request to
/// it takes, nor from inside a request whose reply the owner may be
/// waiting for (see [`IommuDomain::map_remote`]).
pub trait RemoteDma: Send + Sync {
    /// Reads `buf.len()` bytes at `iova` of the mapped range.
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `data` at `iova` of the mapped range.
    fn write(&self, iova: u64, data: &[u8]) -> Result<()>;
}

/// One method of the [`Vfio`] trait or of the device's [`IommuDomain`]:
/// what wrappers that count calls or inject failures key their tables by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VfioOp {
    /// `device_info`.
    DeviceInfo,
    /// `region_info`.
    RegionInfo,
    /// `region_read`.
    RegionRead,
    /// `region_write`.
    RegionWrite,
    /// `mmap_region`.
    MmapRegion,
    /// `irq_info`.
    IrqInfo,
    /// `set_irq_eventfds`.
    SetIrqEventfds,
    /// `disable_irqs`.
    DisableIrqs,
    /// `unmask_irq`.
    UnmaskIrq,
    /// `mask_irq`.
    MaskIrq,
    /// `set_irq_unmask_eventfd`.
    SetIrqUnmaskEventfd,
    /// `reset`.
    Reset,
    /// `map` or `map_remote` of the device's [`IommuDomain`].
    DmaMap,
    /// `unmap` of the device's [`IommuDomain`].
    DmaUnmap,
    /// `iova_ranges` of the device's [`IommuDomain`].
    IovaRanges,
}

impl VfioOp {
    /// How many methods there are.
    pub const COUNT: usize = 15;

    /// Every method, in declaration order (`op as usize` is its index here).
    pub const ALL: [VfioOp; VfioOp::COUNT] = [
        VfioOp::DeviceInfo,
        VfioOp::RegionInfo,
        VfioOp::RegionRead,
        VfioOp::RegionWrite,
        VfioOp::MmapRegion,
        VfioOp::IrqInfo,
        VfioOp::SetIrqEventfds,
        VfioOp::DisableIrqs,
        VfioOp::UnmaskIrq,
        VfioOp::MaskIrq,
        VfioOp::SetIrqUnmaskEventfd,
        VfioOp::Reset,
        VfioOp::DmaMap,
        VfioOp::DmaUnmap,
        VfioOp::IovaRanges,
    ];

    /// The method's name (the [`IommuDomain`] method for the DMA ones).
    pub fn name(self) -> &'static str {
        match self {
            VfioOp::DeviceInfo => "device_info",
            VfioOp::RegionInfo => "region_info",
            VfioOp::RegionRead => "region_read",
            VfioOp::RegionWrite => "region_write",
            VfioOp::MmapRegion => "mmap_region",
            VfioOp::IrqInfo => "irq_info",
            VfioOp::SetIrqEventfds => "set_irq_eventfds",
            VfioOp::DisableIrqs => "disable_irqs",
            VfioOp::UnmaskIrq => "unmask_irq",
            VfioOp::MaskIrq => "mask_irq",
            VfioOp::SetIrqUnmaskEventfd => "set_irq_unmask_eventfd",
            VfioOp::Reset => "reset",
            VfioOp::DmaMap => "map",
            VfioOp::DmaUnmap => "unmap",
            VfioOp::IovaRanges => "iova_ranges",
        }
    }
}

/// What any VFIO device offers, kernel or vfio-user.
///
/// All methods take `&self`: implementations are safe to call from several
/// vCPU threads at once. Every failure is an [`Error`] that keeps the errno
/// (where there is one) and what was being done.
pub trait Vfio: Send + Sync {
    /// Device flags and the number of regions and interrupt indices.
    fn device_info(&self) -> Result<DeviceInfo>;

    /// Flags, size, offset and capabilities of one region.
    fn region_info(&self, index: u32) -> Result<RegionInfo>;

    /// Reads `data.len()` bytes at `offset` of region `index`.
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()>;

    /// Writes `data` at `offset` of region `index`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()>;

    /// Maps one mmap-able area of region `index` into this process. The
    /// returned [`Mapping`] unmaps it when dropped.
    fn mmap_region(&self, index: u32, area: SparseArea) -> Result<Mapping>;

    /// Flags and vector count of one interrupt index.
    fn irq_info(&self, index: u32) -> Result<IrqInfo>;

    /// Signals vectors `start .. start + fds.len()` of interrupt `index`
    /// through the given eventfds (`VFIO_IRQ_SET_DATA_EVENTFD |
    /// VFIO_IRQ_SET_ACTION_TRIGGER`). `None` detaches the eventfd of that
    /// vector. Other vectors are left as they are.
    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<()>;

    /// Disables every vector of interrupt `index` (`DATA_NONE | ACTION_TRIGGER`
    /// with a count of 0).
    fn disable_irqs(&self, index: u32) -> Result<()>;

    /// Unmasks interrupt `index` (vector 0), as after an INTx was serviced.
    fn unmask_irq(&self, index: u32) -> Result<()>;

    /// Masks interrupt `index` (vector 0).
    fn mask_irq(&self, index: u32) -> Result<()>;

    /// Registers an eventfd that, when signalled, unmasks interrupt `index`
    /// (`DATA_EVENTFD | ACTION_UNMASK`: the INTx resample path); `None`
    /// removes it.
    fn set_irq_unmask_eventfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()>;

    /// Resets the device (function-level reset where the device has one).
    fn reset(&self) -> Result<()>;

    /// The IOMMU domain the device is attached to, where its DMA mappings
    /// live: shared by every device of the domain (a legacy container, an
    /// iommufd IOAS; a vfio-user connection has its own). Two devices of
    /// one domain return domains with equal [`IommuDomain::id`]s, and the
    /// domain's mappings stay when one of them goes.
    fn iommu_domain(&self) -> Arc<dyn IommuDomain>;

    /// The file behind region `index` and the offset of the region in it,
    /// for a server that shares the region with a vfio-user client so that
    /// the client can mmap it. `None` (the default) when the region cannot
    /// be shared that way; accesses then go through [`Vfio::region_read`]
    /// and [`Vfio::region_write`].
    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        let _ = index;
        None
    }

    /// Whether the device can migrate its own state, and how
    /// (`VFIO_DEVICE_FEATURE_MIGRATION`, probed). `None` (the default): it
    /// cannot, and the other migration methods fail with
    /// [`Error::Unsupported`].
    fn migration_flags(&self) -> Result<Option<MigrationFlags>> {
        Ok(None)
    }

    /// The device's migration state (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`,
    /// get).
    fn mig_state(&self) -> Result<MigState> {
        Err(Error::Unsupported("migration".into()))
    }

    /// Moves the device to `state` (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`,
    /// set). The backend takes the arcs a transition between two states
    /// that are not adjacent needs, as the kernel does. When the new state
    /// opens a data stream (STOP_COPY from STOP, PRE_COPY, PRE_COPY_P2P,
    /// RESUMING) it is returned; `None` otherwise, including PRE_COPY ->
    /// STOP_COPY, where the pre-copy stream goes on. On failure the device
    /// is in the state [`Vfio::mig_state`] reports (possibly
    /// [`MigState::Error`]).
    fn set_mig_state(&self, state: MigState) -> Result<Option<Box<dyn MigrationStream>>> {
        let _ = state;
        Err(Error::Unsupported("migration".into()))
    }

    /// The device's estimate of the bytes STOP_COPY will stream
    /// (`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`).
    fn mig_data_size(&self) -> Result<u64> {
        Err(Error::Unsupported("migration".into()))
    }

    /// Starts the device's own logging of the pages its DMA writes in
    /// `ranges`, at `page_size` granularity
    /// (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START`).
    fn dma_logging_start(&self, page_size: u64, ranges: &[DirtyRange]) -> Result<()> {
        let _ = (page_size, ranges);
        Err(Error::Unsupported("device DMA logging".into()))
    }

    /// Stops the device's DMA logging (`VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`).
    fn dma_logging_stop(&self) -> Result<()> {
        Err(Error::Unsupported("device DMA logging".into()))
    }

    /// Fills `bitmap` with the pages of `iova .. iova + length` the device
    /// wrote since logging started or the last report of them, and clears
    /// them (`VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`). One bit per
    /// `page_size` page; `bitmap` holds at least
    /// [`migration::bitmap_words`]`(length, page_size)` words.
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<()> {
        let _ = (iova, length, page_size, bitmap);
        Err(Error::Unsupported("device DMA logging".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmap_areas_prefer_sparse_capability_over_whole_region() {
        let mut info = RegionInfo {
            index: 0,
            flags: region_flags::READ | region_flags::WRITE | region_flags::MMAP,
            size: 0x4000,
            offset: 0,
            caps: vec![],
        };
        assert_eq!(
            info.mmap_areas(),
            vec![SparseArea {
                offset: 0,
                size: 0x4000
            }]
        );
        info.caps.push(RegionCap::SparseMmap(vec![SparseArea {
            offset: 0x2000,
            size: 0x2000,
        }]));
        assert_eq!(
            info.mmap_areas(),
            vec![SparseArea {
                offset: 0x2000,
                size: 0x2000
            }]
        );
        info.flags &= !region_flags::MMAP;
        assert!(info.mmap_areas().is_empty());
    }

    #[test]
    fn trait_is_object_safe() {
        fn takes(_: &dyn Vfio) {}
        let _ = takes;
    }
}
