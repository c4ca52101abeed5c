//! The kernel backend: a host PCI function bound to `vfio-pci`.
//!
//! [`KernelDevice`] implements [`Vfio`](crate::Vfio) on a VFIO device fd.
//! Region access is `pread`/`pwrite` at the region's offset in that fd,
//! mmap maps the same fd, interrupts and resets are ioctls on it; the
//! region and interrupt layouts are read once when the device is opened.
//! How the device reaches the IOMMU (and so how DMA is mapped) depends on
//! the mode it was opened in:
//!
//! - **Legacy container/group, type1v2** (default). A [`KernelContainer`]
//!   (`/dev/vfio/vfio`) is one IOMMU address space. Opening a device by its
//!   sysfs path finds its IOMMU group (`iommu_group` link), opens
//!   `/dev/vfio/<group>`, checks it is viable, attaches it to the container
//!   (the first group selects the `VFIO_TYPE1v2_IOMMU` driver) and asks the
//!   group for the device fd. Several devices, of one group or of several,
//!   share a container through `Arc` and so share its DMA mappings
//!   (`VFIO_IOMMU_MAP_DMA`). Each [`KernelGroup`] is shared by the devices
//!   opened from it; its fd is what the KVM-VFIO device and a PCI hot reset
//!   need.
//! - **iommufd + vfio cdev** (cargo feature `iommufd`). An `IommufdIoas`
//!   opens `/dev/iommu` and allocates an I/O address space; a device is
//!   opened through its cdev `/dev/vfio/devices/vfioN` (named in
//!   `<sysfs>/vfio-dev/`), bound to the iommufd
//!   (`VFIO_DEVICE_BIND_IOMMUFD`) and attached to the IOAS
//!   (`VFIO_DEVICE_ATTACH_IOMMUFD_PT`). DMA maps at fixed IOVAs with
//!   `IOMMU_IOAS_MAP`. Groups do not exist here; a hot reset proves
//!   ownership through the iommufd.
//! - **No-IOMMU** (legacy API, explicit opt-in). On a host without an IOMMU,
//!   `vfio` loaded with `enable_unsafe_noiommu_mode=1` puts each device in a
//!   fake group `/dev/vfio/noiommu-N`. Such a device can DMA anywhere in host
//!   memory, so it is only opened in a container created with
//!   [`KernelContainer::new_noiommu`] (`VFIO_NOIOMMU_IOMMU`); the kernel also
//!   requires `CAP_SYS_RAWIO`. DMA mapping is unsupported there (the device
//!   sees host physical addresses) and reported as such.
//!
//! The ioctls are issued directly ([`ioctls`]) rather than through
//! `vfio-ioctls`, whose wrappers hide the group fds, log instead of
//! returning errors on region access and reset, always start
//! `VFIO_DEVICE_SET_IRQS` at vector 0 and have no no-IOMMU mode.
//!
//! **Mediated devices** (mdev, e.g. the kernel's `mtty` sample) open like
//! PCI functions, by `/sys/bus/mdev/devices/<uuid>` or the bare UUID, in
//! either API: their own IOMMU group (an emulated one, which type1 accepts
//! without an IOMMU) or their vfio cdev (bound to iommufd as an emulated
//! device).
//!
//! **Migration** (VFIO migration v2): [`KernelDevice`] implements the
//! [`Vfio`](crate::Vfio) migration methods on `VFIO_DEVICE_FEATURE`
//! (`MIGRATION`, `MIG_DEVICE_STATE`, `MIG_DATA_SIZE`, `DMA_LOGGING_*`); the
//! data fd of a session is a [`KernelMigrationStream`]. A
//! [`KernelContainer`] tracks dirty pages with type1's
//! `VFIO_IOMMU_DIRTY_PAGES` (exact only for pinned-scope devices such as
//! mdevs: with a vfio-pci function in the container, type1 reports every
//! mapped page dirty); an `IommufdIoas` made with
//! `IommufdIoas::new_dirty_tracking` attaches its devices to a hardware
//! page table allocated with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` and tracks
//! with `IOMMU_HWPT_SET_DIRTY_TRACKING` / `IOMMU_HWPT_GET_DIRTY_BITMAP`
//! (opening a device fails with [`Error::Unsupported`] when its IOMMU lacks
//! the capability); a plain IOAS answers [`Error::Unsupported`], and
//! `KernelDevice::iommu_hw_dirty_tracking` says whether the IOMMU could.
//!
//! On a host without VFIO every entry point fails with
//! [`Error::NotAvailable`] naming the missing
//! node (`/dev/vfio/vfio`, `/dev/vfio/<group>`, `/dev/iommu`) or sysfs path.

mod container;
mod device;
// Public for the fuzz targets only (they drive its parsers of what the
// kernel writes back): not part of the API. Its types that are part of the
// API are re-exported below.
#[doc(hidden)]
pub mod ioctls;
#[cfg(feature = "iommufd")]
mod iommufd;
mod migration;
mod open;
mod sysfs;

use std::fs::{File, OpenOptions};
use std::path::Path;

pub use container::{KernelContainer, KernelGroup};
pub use device::KernelDevice;
pub use ioctls::{DependentDevice, DependentOwner, DirtyTrackingCap, HotResetInfo, IommuInfo};
#[cfg(feature = "iommufd")]
#[cfg_attr(docsrs, doc(cfg(feature = "iommufd")))]
pub use iommufd::IommufdIoas;
pub use migration::KernelMigrationStream;

use crate::{Error, Result};

/// The default VFIO device directory.
pub(crate) const DEV_VFIO: &str = "/dev/vfio";

/// The IOMMU driver of a [`KernelContainer`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IommuMode {
    /// `VFIO_TYPE1v2_IOMMU`: DMA goes through the host IOMMU.
    Type1v2,
    /// `VFIO_NOIOMMU_IOMMU`: no IOMMU; devices are unisolated and DMA
    /// mapping is unsupported.
    NoIommu,
}

/// The sysfs directory of a device named by path or by a bare mediated
/// device UUID (`/sys/bus/mdev/devices/<uuid>`): what every `open` of this
/// module accepts. Anything that is not a UUID is returned as it is.
pub fn device_sysfs_path(name: impl AsRef<Path>) -> std::path::PathBuf {
    sysfs::device_path(name.as_ref())
}

/// Prefixes the context of an error with `prefix` (a device or group name).
pub(crate) fn prefix_error(e: Error, prefix: &str) -> Error {
    match e {
        Error::Io { context, source } => Error::Io {
            context: format!("{prefix}: {context}"),
            source,
        },
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{prefix}: {m}")),
        Error::Unsupported(m) => Error::Unsupported(format!("{prefix}: {m}")),
        other => other,
    }
}

/// Opens a VFIO or iommufd node read-write. A missing or inaccessible node
/// is [`Error::NotAvailable`]; any other failure (e.g. `EBUSY`: a group
/// already open elsewhere) is [`Error::Io`].
pub(crate) fn open_node(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            let unavailable = matches!(
                e.raw_os_error(),
                Some(libc::ENOENT | libc::ENODEV | libc::ENXIO | libc::EACCES | libc::EPERM)
            );
            if unavailable {
                Error::NotAvailable {
                    path: path.display().to_string(),
                    source: e,
                }
            } else {
                Error::io(format!("open {}", path.display()), e)
            }
        })
}

/// The host page size.
pub(crate) fn page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Checks DMA map/unmap arguments: a non-empty range that does not wrap,
/// with IOVA, size and host address page aligned (what type1 and iommufd
/// require of the smallest IOMMU page, never smaller than a host page).
pub(crate) fn check_dma_args(iova: u64, size: u64, host_addr: u64) -> Result<()> {
    let page = page_size();
    if size == 0 {
        return Err(Error::InvalidArgument(format!(
            "DMA range at IOVA {iova:#x} is empty"
        )));
    }
    if iova.checked_add(size - 1).is_none() || host_addr.checked_add(size - 1).is_none() {
        return Err(Error::InvalidArgument(format!(
            "DMA range of {size:#x} bytes at IOVA {iova:#x} (host {host_addr:#x}) wraps around"
        )));
    }
    if iova % page != 0 || size % page != 0 || host_addr % page != 0 {
        return Err(Error::InvalidArgument(format!(
            "DMA range of {size:#x} bytes at IOVA {iova:#x} (host {host_addr:#x}) is not aligned \
             to the {page:#x}-byte page"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_arguments_must_be_page_aligned_non_empty_and_not_wrap() {
        let page = page_size();
        check_dma_args(0x1_0000_0000, 4 * page, 16 * page).unwrap();
        for (iova, size, host) in [
            (0, 0, 0),
            (page / 2, page, 0),
            (0, page + 1, 0),
            (0, page, 8),
            (u64::MAX - page + 1, 2 * page, 0),
        ] {
            assert!(
                matches!(
                    check_dma_args(iova, size, host),
                    Err(Error::InvalidArgument(_))
                ),
                "{iova:#x} {size:#x} {host:#x}"
            );
        }
        // The last page of the 64-bit space is a valid range.
        check_dma_args(u64::MAX - page + 1, page, 0).unwrap();
    }

    #[test]
    fn missing_node_is_not_available_but_other_open_errors_keep_their_errno() {
        let root = tempfile::tempdir().unwrap();
        let e = open_node(&root.path().join("42")).unwrap_err();
        assert!(matches!(e, Error::NotAvailable { .. }), "{e}");
        // A directory cannot be opened for writing: EISDIR is neither missing
        // nor inaccessible, so it keeps its errno as an I/O error.
        let e = open_node(root.path()).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert_eq!(e.errno(), Some(libc::EISDIR));
    }
}
