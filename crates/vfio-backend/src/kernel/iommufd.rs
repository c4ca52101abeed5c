//! iommufd (`/dev/iommu`) and vfio cdevs (`/dev/vfio/devices/vfioN`), on the
//! raw ioctls of `include/uapi/linux/iommufd.h`.
//!
//! One [`IommufdIoas`] is an I/O address space; every device opened through
//! it is bound to the iommufd and attached to that IOAS, so its DMA mappings
//! serve them all, like a legacy container.

use std::fs::File;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE};

use super::migration::check_bitmap_request;
use super::{check_dma_args, ioctls, open_node, page_size, prefix_error};
use crate::{DmaSource, DomainId, Error, IommuDomain, Result};

/// The default iommufd node.
pub(crate) const DEV_IOMMU: &str = "/dev/iommu";
/// Where the vfio cdevs live.
pub(crate) const DEV_VFIO_DEVICES: &str = "/dev/vfio/devices";

/// `IOMMUFD_TYPE` (`';'`, the same type byte as VFIO).
const IOMMUFD_TYPE: u32 = b';' as u32;

/// `_IO(IOMMUFD_TYPE, nr)`: iommufd ioctls carry their size in `size`.
const fn iommufd_io(nr: u32) -> libc::c_ulong {
    ioctl_expr(_IOC_NONE, IOMMUFD_TYPE, nr, 0)
}

const IOMMU_DESTROY: libc::c_ulong = iommufd_io(0x80);
const IOMMU_IOAS_ALLOC: libc::c_ulong = iommufd_io(0x81);
const IOMMU_IOAS_IOVA_RANGES: libc::c_ulong = iommufd_io(0x84);
const IOMMU_IOAS_MAP: libc::c_ulong = iommufd_io(0x85);
const IOMMU_IOAS_UNMAP: libc::c_ulong = iommufd_io(0x86);
const IOMMU_HWPT_ALLOC: libc::c_ulong = iommufd_io(0x89);
const IOMMU_GET_HW_INFO: libc::c_ulong = iommufd_io(0x8a);
const IOMMU_HWPT_SET_DIRTY_TRACKING: libc::c_ulong = iommufd_io(0x8b);
const IOMMU_HWPT_GET_DIRTY_BITMAP: libc::c_ulong = iommufd_io(0x8c);

/// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` in `iommu_hwpt_alloc.flags`.
const IOMMU_HWPT_ALLOC_DIRTY_TRACKING: u32 = 1 << 1;
/// `IOMMU_HWPT_DIRTY_TRACKING_ENABLE` in `iommu_hwpt_set_dirty_tracking.flags`.
const IOMMU_HWPT_DIRTY_TRACKING_ENABLE: u32 = 1;

/// `IOMMU_HW_CAP_DIRTY_TRACKING` in `iommu_hw_info.out_capabilities`.
const IOMMU_HW_CAP_DIRTY_TRACKING: u64 = 1 << 0;

const IOMMU_IOAS_MAP_FIXED_IOVA: u32 = 1 << 0;
const IOMMU_IOAS_MAP_WRITEABLE: u32 = 1 << 1;
const IOMMU_IOAS_MAP_READABLE: u32 = 1 << 2;

/// `struct iommu_destroy`.
#[repr(C)]
#[derive(Debug, Default)]
struct IommuDestroy {
    size: u32,
    id: u32,
}

/// `struct iommu_ioas_alloc`.
#[repr(C)]
#[derive(Debug, Default)]
struct IommuIoasAlloc {
    size: u32,
    flags: u32,
    out_ioas_id: u32,
}

/// `struct iommu_iova_range` (inclusive `last`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct IommuIovaRange {
    start: u64,
    last: u64,
}

/// `struct iommu_ioas_iova_ranges`.
#[repr(C)]
#[derive(Debug, Default)]
struct IommuIoasIovaRanges {
    size: u32,
    ioas_id: u32,
    num_iovas: u32,
    reserved: u32,
    allowed_iovas: u64,
    out_iova_alignment: u64,
}

/// `struct iommu_ioas_map`.
#[repr(C)]
#[derive(Debug, Default)]
struct IommuIoasMap {
    size: u32,
    flags: u32,
    ioas_id: u32,
    reserved: u32,
    user_va: u64,
    length: u64,
    iova: u64,
}

/// `struct iommu_ioas_unmap`.
#[repr(C)]
#[derive(Debug, Default)]
struct IommuIoasUnmap {
    size: u32,
    ioas_id: u32,
    iova: u64,
    length: u64,
}

/// `struct iommu_hw_info` (no driver data requested).
#[repr(C)]
#[derive(Debug, Default)]
struct IommuHwInfo {
    size: u32,
    flags: u32,
    dev_id: u32,
    data_len: u32,
    data_uptr: u64,
    out_data_type: u32,
    out_max_pasid_log2: u8,
    reserved: [u8; 3],
    out_capabilities: u64,
}

/// `struct iommu_hwpt_alloc` (6.12 layout; no driver data, no fault queue).
#[repr(C)]
#[derive(Debug, Default)]
struct IommuHwptAlloc {
    size: u32,
    flags: u32,
    dev_id: u32,
    pt_id: u32,
    out_hwpt_id: u32,
    reserved: u32,
    data_type: u32,
    data_len: u32,
    data_uptr: u64,
    fault_id: u32,
    reserved2: u32,
}

/// `struct iommu_hwpt_set_dirty_tracking`.
#[repr(C)]
#[derive(Debug, Default)]
struct IommuHwptSetDirtyTracking {
    size: u32,
    flags: u32,
    hwpt_id: u32,
    reserved: u32,
}

/// `struct iommu_hwpt_get_dirty_bitmap`.
#[repr(C)]
#[derive(Debug, Default)]
struct IommuHwptGetDirtyBitmap {
    size: u32,
    hwpt_id: u32,
    flags: u32,
    reserved: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    data: u64,
}

// Pin the layouts to iommufd.h.
const _: () = {
    assert!(std::mem::size_of::<IommuHwptAlloc>() == 48);
    assert!(std::mem::offset_of!(IommuHwptAlloc, data_uptr) == 32);
    assert!(std::mem::size_of::<IommuHwptSetDirtyTracking>() == 16);
    assert!(std::mem::size_of::<IommuHwptGetDirtyBitmap>() == 48);
    assert!(std::mem::offset_of!(IommuHwptGetDirtyBitmap, data) == 40);
    assert!(std::mem::size_of::<IommuHwInfo>() == 40);
    assert!(std::mem::offset_of!(IommuHwInfo, out_data_type) == 24);
    assert!(std::mem::offset_of!(IommuHwInfo, out_capabilities) == 32);
    assert!(std::mem::size_of::<IommuDestroy>() == 8);
    assert!(std::mem::size_of::<IommuIoasAlloc>() == 12);
    assert!(std::mem::size_of::<IommuIovaRange>() == 16);
    assert!(std::mem::size_of::<IommuIoasIovaRanges>() == 32);
    assert!(std::mem::size_of::<IommuIoasMap>() == 40);
    assert!(std::mem::size_of::<IommuIoasUnmap>() == 24);
};

fn size_of_u32<T>() -> u32 {
    // The structures above are at most 40 bytes.
    std::mem::size_of::<T>() as u32
}

/// The most IOVA ranges we accept from `IOMMU_IOAS_IOVA_RANGES`.
const MAX_IOVA_RANGES: u32 = 1 << 16;

/// An iommufd I/O address space (IOAS): the iommufd counterpart of a
/// [`KernelContainer`](super::KernelContainer), and like it the
/// [`IommuDomain`] of its devices. Shared by `Arc` by the devices attached
/// to it; destroyed when the last reference is dropped.
#[derive(Debug)]
pub struct IommufdIoas {
    iommufd: File,
    ioas_id: u32,
    path: PathBuf,
    id: DomainId,
    /// Devices attach to a hardware page table allocated with
    /// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING` over the IOAS
    /// ([`IommufdIoas::new_dirty_tracking`]), not to the IOAS itself.
    dirty_hwpt: bool,
    /// That page table, once the first device allocated it.
    hwpt: Mutex<Option<u32>>,
}

impl IommufdIoas {
    /// Opens `/dev/iommu` and allocates an IOAS (`IOMMU_IOAS_ALLOC`).
    pub fn new() -> Result<Arc<IommufdIoas>> {
        Self::open_at(DEV_IOMMU)
    }

    /// Opens `/dev/iommu`, allocates an IOAS, and attaches every device to
    /// one hardware page table over it that tracks dirty pages
    /// (`IOMMU_HWPT_ALLOC` with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`, allocated
    /// for the first device): the [`IommuDomain`] dirty-tracking methods
    /// then work. Opening a device fails with [`Error::Unsupported`] when
    /// its IOMMU cannot track dirty pages (the kernel's `EOPNOTSUPP`; QEMU's
    /// emulated Intel IOMMU cannot) or cannot share the page table, and for
    /// an emulated device (mdev), which has no IOMMU page table.
    pub fn new_dirty_tracking() -> Result<Arc<IommufdIoas>> {
        Self::open_inner(Path::new(DEV_IOMMU), true)
    }

    /// Opens the iommufd node at `path` and allocates an IOAS.
    pub fn open_at(path: impl AsRef<Path>) -> Result<Arc<IommufdIoas>> {
        Self::open_inner(path.as_ref(), false)
    }

    fn open_inner(path: &Path, dirty_hwpt: bool) -> Result<Arc<IommufdIoas>> {
        let path = path.to_path_buf();
        let iommufd = open_node(&path)?;
        let mut alloc = IommuIoasAlloc {
            size: size_of_u32::<IommuIoasAlloc>(),
            ..Default::default()
        };
        // SAFETY: `alloc` is a complete iommu_ioas_alloc with `size` set to
        // its size; the kernel writes back only out_ioas_id.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&iommufd, IOMMU_IOAS_ALLOC, &mut alloc)
        };
        if ret < 0 {
            return Err(Error::last_os_error(format!(
                "{}: IOMMU_IOAS_ALLOC",
                path.display()
            )));
        }
        Ok(Arc::new(IommufdIoas {
            iommufd,
            ioas_id: alloc.out_ioas_id,
            path,
            id: DomainId::new_unique(),
            dirty_hwpt,
            hwpt: Mutex::new(None),
        }))
    }

    fn hwpt_lock(&self) -> std::sync::MutexGuard<'_, Option<u32>> {
        self.hwpt
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The dirty-tracking page table, allocated for `dev_id` if there is
    /// none yet.
    fn dirty_hwpt_for(&self, dev_id: u32) -> Result<u32> {
        let mut hwpt = self.hwpt_lock();
        if let Some(id) = *hwpt {
            return Ok(id);
        }
        let mut alloc = IommuHwptAlloc {
            size: size_of_u32::<IommuHwptAlloc>(),
            flags: IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
            dev_id,
            pt_id: self.ioas_id,
            ..Default::default()
        };
        // SAFETY: `alloc` is a complete iommu_hwpt_alloc with `size` set to its
        // size, no driver data (data_type NONE, data_len 0) and no fault queue;
        // the kernel writes back only out_hwpt_id.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.iommufd, IOMMU_HWPT_ALLOC, &mut alloc)
        };
        if ret < 0 {
            let e = std::io::Error::last_os_error();
            let why = format!(
                "IOMMU_HWPT_ALLOC with IOMMU_HWPT_ALLOC_DIRTY_TRACKING over IOAS {} for iommufd \
                 device {dev_id}: {e}",
                self.ioas_id
            );
            return Err(if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                Error::Unsupported(format!(
                    "{why} (the device's IOMMU cannot track dirty pages: IOMMU_GET_HW_INFO has \
                     no IOMMU_HW_CAP_DIRTY_TRACKING)"
                ))
            } else {
                Error::io(why, e)
            });
        }
        *hwpt = Some(alloc.out_hwpt_id);
        Ok(alloc.out_hwpt_id)
    }

    /// The dirty-tracking page table, or why there is none.
    fn tracked_hwpt(&self, what: &str) -> Result<u32> {
        if !self.dirty_hwpt {
            return Err(dirty_unsupported(what));
        }
        self.hwpt_lock().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what}: no device is attached yet (the dirty-tracking page table is allocated \
                 for the first one)"
            ))
        })
    }

    /// The IOAS id.
    pub fn ioas_id(&self) -> u32 {
        self.ioas_id
    }

    /// Whether the IOMMU behind the bound device `dev_id` can track the
    /// pages it writes (`IOMMU_GET_HW_INFO`, `IOMMU_HW_CAP_DIRTY_TRACKING`).
    pub(crate) fn hw_dirty_tracking(&self, dev_id: u32) -> Result<bool> {
        let mut info = IommuHwInfo {
            size: size_of_u32::<IommuHwInfo>(),
            dev_id,
            ..Default::default()
        };
        // SAFETY: `info` is a complete iommu_hw_info with `size` set to its
        // size and data_len 0 (no driver data buffer): the kernel writes only
        // the out_* fields of this structure.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.iommufd, IOMMU_GET_HW_INFO, &mut info)
        };
        if ret < 0 {
            return Err(Error::last_os_error(format!(
                "IOMMU_GET_HW_INFO of iommufd device {dev_id}"
            )));
        }
        Ok(info.out_capabilities & IOMMU_HW_CAP_DIRTY_TRACKING != 0)
    }

    /// Binds the vfio cdev `fd` to this iommufd and attaches it to this
    /// IOAS; returns the iommufd device id.
    pub(super) fn bind_and_attach(&self, fd: BorrowedFd<'_>, name: &str) -> Result<u32> {
        let dev_id = ioctls::device_bind_iommufd(fd, self.iommufd.as_fd())
            .map_err(|e| prefix_error(e, name))?;
        let pt_id = if self.dirty_hwpt {
            self.dirty_hwpt_for(dev_id)
                .map_err(|e| prefix_error(e, name))?
        } else {
            self.ioas_id
        };
        ioctls::device_attach_iommufd_pt(fd, pt_id).map_err(|e| prefix_error(e, name))?;
        Ok(dev_id)
    }
}

impl IommuDomain for IommufdIoas {
    fn id(&self) -> DomainId {
        self.id
    }

    /// Maps `size` bytes at `host.host_addr` to exactly `iova`
    /// (`IOMMU_IOAS_MAP` with `IOMMU_IOAS_MAP_FIXED_IOVA`); the device may
    /// write there unless `host.read_only`.
    ///
    /// # Safety
    ///
    /// As [`IommuDomain::map`]: the kernel pins the pages and the devices
    /// reach them until they are unmapped.
    unsafe fn map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        check_dma_args(iova, size, host.host_addr)?;
        let flags = ioas_map_flags(host.read_only);
        let mut map = IommuIoasMap {
            size: size_of_u32::<IommuIoasMap>(),
            flags,
            ioas_id: self.ioas_id,
            reserved: 0,
            user_va: host.host_addr,
            length: size,
            iova,
        };
        // SAFETY: `map` is a complete iommu_ioas_map with `size` set; the
        // kernel pins the user pages itself (failing if they are not mapped)
        // and writes back only `iova`.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.iommufd, IOMMU_IOAS_MAP, &mut map)
        };
        if ret < 0 {
            return Err(Error::last_os_error(format!(
                "IOMMU_IOAS_MAP of {size:#x} bytes at IOVA {iova:#x} from {:#x} in IOAS {}",
                host.host_addr, self.ioas_id
            )));
        }
        Ok(())
    }

    /// Unmaps `iova .. iova + size` (`IOMMU_IOAS_UNMAP`); unmapping less
    /// than `size` bytes is reported as an error.
    fn unmap(&self, iova: u64, size: u64) -> Result<()> {
        check_dma_args(iova, size, 0)?;
        let mut unmap = IommuIoasUnmap {
            size: size_of_u32::<IommuIoasUnmap>(),
            ioas_id: self.ioas_id,
            iova,
            length: size,
        };
        // SAFETY: `unmap` is a complete iommu_ioas_unmap with `size` set; the
        // kernel writes back only `length`.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.iommufd, IOMMU_IOAS_UNMAP, &mut unmap)
        };
        if ret < 0 {
            return Err(Error::last_os_error(format!(
                "IOMMU_IOAS_UNMAP of {size:#x} bytes at IOVA {iova:#x} in IOAS {}",
                self.ioas_id
            )));
        }
        if unmap.length != size {
            return Err(Error::InvalidArgument(format!(
                "IOMMU_IOAS_UNMAP of {size:#x} bytes at IOVA {iova:#x} unmapped {:#x} bytes: \
                 parts of the range were not mapped",
                unmap.length
            )));
        }
        Ok(())
    }

    /// The IOVA ranges the IOAS accepts (`IOMMU_IOAS_IOVA_RANGES`): they
    /// shrink as devices with reserved regions are attached.
    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>> {
        let mut capacity: u32 = 16;
        for _ in 0..4 {
            let mut ranges = vec![IommuIovaRange::default(); capacity as usize];
            let mut cmd = IommuIoasIovaRanges {
                size: size_of_u32::<IommuIoasIovaRanges>(),
                ioas_id: self.ioas_id,
                num_iovas: capacity,
                reserved: 0,
                allowed_iovas: ranges.as_mut_ptr() as u64,
                out_iova_alignment: 0,
            };
            // SAFETY: `cmd` is a complete iommu_ioas_iova_ranges; allowed_iovas
            // points to `capacity` iommu_iova_range entries that live until
            // after the call, and the kernel writes at most num_iovas of them.
            let ret = unsafe {
                vmm_sys_util::ioctl::ioctl_with_mut_ref(
                    &self.iommufd,
                    IOMMU_IOAS_IOVA_RANGES,
                    &mut cmd,
                )
            };
            if ret < 0 {
                let err = std::io::Error::last_os_error();
                // EMSGSIZE: num_iovas now says how many there are.
                if err.raw_os_error() == Some(libc::EMSGSIZE)
                    && cmd.num_iovas > capacity
                    && cmd.num_iovas <= MAX_IOVA_RANGES
                {
                    capacity = cmd.num_iovas;
                    continue;
                }
                return Err(Error::io(
                    format!("IOMMU_IOAS_IOVA_RANGES of IOAS {}", self.ioas_id),
                    err,
                ));
            }
            let n = (cmd.num_iovas as usize).min(ranges.len());
            let mut out = Vec::with_capacity(n);
            for r in ranges.iter().take(n) {
                if r.start > r.last {
                    return Err(Error::Io {
                        context: format!("IOMMU_IOAS_IOVA_RANGES of IOAS {}", self.ioas_id),
                        source: std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("empty range {:#x}..={:#x}", r.start, r.last),
                        ),
                    });
                }
                out.push(r.start..=r.last);
            }
            return Ok(out);
        }
        Err(Error::Io {
            context: format!("IOMMU_IOAS_IOVA_RANGES of IOAS {}", self.ioas_id),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the range count kept growing",
            ),
        })
    }

    /// With [`IommufdIoas::new_dirty_tracking`]: every power of two from
    /// the host page up (the kernel reports at any page size the IOVA range
    /// is aligned to). Otherwise [`Error::Unsupported`], saying why.
    fn dirty_page_sizes(&self) -> Result<u64> {
        self.tracked_hwpt("iommufd dirty tracking")?;
        Ok(!(page_size() - 1))
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` (enable) on the page table.
    fn dirty_tracking_start(&self) -> Result<()> {
        self.set_dirty_tracking(true)
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` (disable).
    fn dirty_tracking_stop(&self) -> Result<()> {
        self.set_dirty_tracking(false)
    }

    /// `IOMMU_HWPT_GET_DIRTY_BITMAP` (read and clear) into `bitmap`, cleared
    /// first (the kernel only sets bits).
    fn dirty_bitmap(&self, iova: u64, size: u64, page_size: u64, bitmap: &mut [u64]) -> Result<()> {
        const WHAT: &str = "IOMMU_HWPT_GET_DIRTY_BITMAP";
        let hwpt_id = self.tracked_hwpt(WHAT)?;
        let words = check_bitmap_request(WHAT, iova, size, page_size, bitmap.len())?;
        let bitmap = bitmap.get_mut(..words).unwrap_or_default();
        bitmap.fill(0);
        let mut get = IommuHwptGetDirtyBitmap {
            size: size_of_u32::<IommuHwptGetDirtyBitmap>(),
            hwpt_id,
            iova,
            length: size,
            page_size,
            data: bitmap.as_mut_ptr() as u64,
            ..Default::default()
        };
        // SAFETY: `get` is a complete iommu_hwpt_get_dirty_bitmap with `size`
        // set; the kernel sets bits for at most size / page_size pages at
        // `data`, which is `bitmap`, checked to hold that many and borrowed
        // mutably for the call.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ref(
                &self.iommufd,
                IOMMU_HWPT_GET_DIRTY_BITMAP,
                &mut get,
            )
        };
        if ret < 0 {
            return Err(Error::last_os_error(format!(
                "{WHAT} of {size:#x} bytes at IOVA {iova:#x} ({page_size:#x}-byte pages) in HWPT \
                 {hwpt_id}"
            )));
        }
        Ok(())
    }
}

/// Why an IOAS cannot track dirty pages, for every dirty-tracking method.
fn dirty_unsupported(what: &str) -> Error {
    Error::Unsupported(format!(
        "{what}: this IOAS does not track dirty pages: its devices attach to the IOAS's \
         automatic domain; open them through IommufdIoas::new_dirty_tracking() (a hardware page \
         table allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING, which needs an IOMMU whose \
         IOMMU_GET_HW_INFO reports IOMMU_HW_CAP_DIRTY_TRACKING; QEMU's emulated Intel IOMMU does \
         not; KernelDevice::iommu_hw_dirty_tracking says whether it does)"
    ))
}

/// `IOMMU_IOAS_MAP` flags: always at the caller's IOVA; the device may
/// read, and write unless the source is read-only.
fn ioas_map_flags(read_only: bool) -> u32 {
    let flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE;
    if read_only {
        flags
    } else {
        flags | IOMMU_IOAS_MAP_WRITEABLE
    }
}

impl IommufdIoas {
    fn set_dirty_tracking(&self, enable: bool) -> Result<()> {
        const WHAT: &str = "IOMMU_HWPT_SET_DIRTY_TRACKING";
        let hwpt_id = self.tracked_hwpt(WHAT)?;
        let set = IommuHwptSetDirtyTracking {
            size: size_of_u32::<IommuHwptSetDirtyTracking>(),
            flags: if enable {
                IOMMU_HWPT_DIRTY_TRACKING_ENABLE
            } else {
                0
            },
            hwpt_id,
            reserved: 0,
        };
        // SAFETY: `set` is a complete iommu_hwpt_set_dirty_tracking; the
        // kernel only reads it.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_ref(&self.iommufd, IOMMU_HWPT_SET_DIRTY_TRACKING, &set)
        };
        if ret < 0 {
            return Err(Error::last_os_error(format!(
                "{WHAT} ({}) of HWPT {hwpt_id}",
                if enable { "enable" } else { "disable" }
            )));
        }
        Ok(())
    }
}

impl AsFd for IommufdIoas {
    /// The iommufd.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.iommufd.as_fd()
    }
}

impl Drop for IommufdIoas {
    fn drop(&mut self) {
        if let Some(hwpt) = *self.hwpt_lock() {
            let destroy = IommuDestroy {
                size: size_of_u32::<IommuDestroy>(),
                id: hwpt,
            };
            // SAFETY: `destroy` is a complete iommu_destroy; the kernel only
            // reads it. Every device holds the IOAS, so none is attached now.
            let ret = unsafe {
                vmm_sys_util::ioctl::ioctl_with_ref(&self.iommufd, IOMMU_DESTROY, &destroy)
            };
            if ret < 0 {
                log::warn!(
                    "{}: IOMMU_DESTROY of HWPT {hwpt}: {}",
                    self.path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        let destroy = IommuDestroy {
            size: size_of_u32::<IommuDestroy>(),
            id: self.ioas_id,
        };
        // SAFETY: `destroy` is a complete iommu_destroy; the kernel only reads it.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.iommufd, IOMMU_DESTROY, &destroy) };
        if ret < 0 {
            // Closing the iommufd right after frees the IOAS anyway.
            log::warn!(
                "{}: IOMMU_DESTROY of IOAS {}: {}",
                self.path.display(),
                self.ioas_id,
                std::io::Error::last_os_error()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iommufd_ioctl_numbers_match_the_uapi_header() {
        // _IO(';', 0x80 + n) with _IOC_NONE = 0 on x86/arm.
        #[cfg(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64"
        ))]
        {
            assert_eq!(IOMMU_DESTROY, 0x3b80);
            assert_eq!(IOMMU_IOAS_ALLOC, 0x3b81);
            assert_eq!(IOMMU_IOAS_IOVA_RANGES, 0x3b84);
            assert_eq!(IOMMU_IOAS_MAP, 0x3b85);
            assert_eq!(IOMMU_IOAS_UNMAP, 0x3b86);
            assert_eq!(IOMMU_HWPT_ALLOC, 0x3b89);
            assert_eq!(IOMMU_GET_HW_INFO, 0x3b8a);
            assert_eq!(IOMMU_HWPT_SET_DIRTY_TRACKING, 0x3b8b);
            assert_eq!(IOMMU_HWPT_GET_DIRTY_BITMAP, 0x3b8c);
            assert_eq!(ioctls::VFIO_DEVICE_BIND_IOMMUFD, 0x3b76);
            assert_eq!(ioctls::VFIO_DEVICE_ATTACH_IOMMUFD_PT, 0x3b77);
        }
    }

    #[test]
    fn ioas_map_is_at_a_fixed_iova_and_read_only_drops_writeable() {
        // iommufd.h: FIXED_IOVA = 1 << 0, WRITEABLE = 1 << 1, READABLE = 1 << 2.
        assert_eq!(ioas_map_flags(true), 0b101);
        assert_eq!(ioas_map_flags(false), 0b111);
    }

    #[test]
    fn iommufd_at_a_missing_node_is_not_available_and_names_it() {
        let root = tempfile::tempdir().unwrap();
        let e = IommufdIoas::open_at(root.path().join("iommu")).unwrap_err();
        assert!(matches!(e, Error::NotAvailable { .. }), "{e}");
        assert!(e.to_string().contains("iommu"), "{e}");
    }

    #[test]
    fn a_regular_file_is_not_an_iommufd() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("iommu");
        std::fs::write(&path, b"").unwrap();
        let e = IommufdIoas::open_at(&path).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTTY));
        assert!(e.to_string().contains("IOMMU_IOAS_ALLOC"), "{e}");
    }
}
