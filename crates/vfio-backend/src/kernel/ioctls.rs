//! The raw VFIO ioctls of the kernel backend, and pure parsers for what
//! they return.
//!
//! `vfio-ioctls` 0.10 hides the group fds (needed for a hot reset), logs
//! instead of returning errors on region access and reset, always starts
//! `VFIO_DEVICE_SET_IRQS` at vector 0, has no no-IOMMU mode and does not
//! expose `VFIO_IOMMU_GET_INFO`. This module talks to the kernel directly,
//! following `include/uapi/linux/vfio.h`; the structure layouts come from
//! `vfio-bindings`.
//!
//! Everything the kernel writes back into a variable-length buffer (the
//! capability chains of `VFIO_DEVICE_GET_REGION_INFO` and
//! `VFIO_IOMMU_GET_INFO`, the device list of
//! `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`) is decoded by the `parse_*`
//! functions below. They are pure functions over a byte buffer laid out as
//! the uAPI says (native endian), so they can be unit-tested and fuzzed
//! without a device, and they treat the buffer as hostile: every offset and
//! count is bounds-checked against the buffer and the `argsz` it reports,
//! and capability chains that loop or point outside the buffer are refused.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::fmt;
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use vfio_bindings::bindings::vfio as uapi;
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE};

use crate::{DeviceInfo, Error, IrqInfo, RegionCap, RegionInfo, Result, SparseArea};

/// `_IO(VFIO_TYPE, VFIO_BASE + nr)`: every VFIO ioctl carries its size in
/// `argsz`, not in the request number.
const fn vfio_io(nr: u32) -> libc::c_ulong {
    ioctl_expr(_IOC_NONE, uapi::VFIO_TYPE as u32, uapi::VFIO_BASE + nr, 0)
}

pub(crate) const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
pub(crate) const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
pub(crate) const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
pub(crate) const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
pub(crate) const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
pub(crate) const VFIO_GROUP_UNSET_CONTAINER: libc::c_ulong = vfio_io(5);
pub(crate) const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
pub(crate) const VFIO_DEVICE_GET_INFO: libc::c_ulong = vfio_io(7);
pub(crate) const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
pub(crate) const VFIO_DEVICE_GET_IRQ_INFO: libc::c_ulong = vfio_io(9);
pub(crate) const VFIO_DEVICE_SET_IRQS: libc::c_ulong = vfio_io(10);
pub(crate) const VFIO_DEVICE_RESET: libc::c_ulong = vfio_io(11);
pub(crate) const VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: libc::c_ulong = vfio_io(12);
pub(crate) const VFIO_DEVICE_PCI_HOT_RESET: libc::c_ulong = vfio_io(13);
/// Container ioctls share numbers with device ioctls (different fd type).
pub(crate) const VFIO_IOMMU_GET_INFO: libc::c_ulong = vfio_io(12);
pub(crate) const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
pub(crate) const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);
#[cfg(feature = "iommufd")]
pub(crate) const VFIO_DEVICE_BIND_IOMMUFD: libc::c_ulong = vfio_io(18);
#[cfg(feature = "iommufd")]
pub(crate) const VFIO_DEVICE_ATTACH_IOMMUFD_PT: libc::c_ulong = vfio_io(19);

/// Size of `struct vfio_region_info` (the fixed part before capabilities).
pub const REGION_INFO_LEN: usize = std::mem::size_of::<uapi::vfio_region_info>();
/// Size of `struct vfio_iommu_type1_info` (the fixed part before capabilities).
pub const IOMMU_TYPE1_INFO_LEN: usize = std::mem::size_of::<uapi::vfio_iommu_type1_info>();
/// Size of `struct vfio_pci_hot_reset_info` (before the device array).
pub const HOT_RESET_INFO_LEN: usize = std::mem::size_of::<uapi::vfio_pci_hot_reset_info>();
/// Size of one `struct vfio_pci_dependent_device`.
pub const DEPENDENT_DEVICE_LEN: usize = std::mem::size_of::<uapi::vfio_pci_dependent_device>();
/// Size of `struct vfio_info_cap_header`.
pub const CAP_HEADER_LEN: usize = std::mem::size_of::<uapi::vfio_info_cap_header>();
/// Size of `struct vfio_pci_hot_reset` (before the group fd array).
const HOT_RESET_LEN: usize = std::mem::size_of::<uapi::vfio_pci_hot_reset>();
/// Size of `struct vfio_irq_set` (before the data array).
const IRQ_SET_LEN: usize = std::mem::size_of::<uapi::vfio_irq_set>();

/// The largest `argsz` we accept from the kernel when it asks for a bigger
/// buffer (1 MiB): a sparse-mmap capability with 65536 areas still fits.
const MAX_INFO_ARGSZ: u32 = 1 << 20;
/// The largest number of dependent devices a hot reset may report.
const MAX_HOT_RESET_DEVICES: u32 = 1 << 16;
/// How often a grow-and-retry query is repeated before giving up.
const MAX_QUERY_ATTEMPTS: usize = 4;

// The parsers below read the uAPI structures by offset; pin those offsets.
const _: () = {
    assert!(REGION_INFO_LEN == 32);
    assert!(IOMMU_TYPE1_INFO_LEN == 24);
    assert!(HOT_RESET_INFO_LEN == 12);
    assert!(DEPENDENT_DEVICE_LEN == 8);
    assert!(CAP_HEADER_LEN == 8);
    assert!(IRQ_SET_LEN == 20);
    assert!(std::mem::size_of::<uapi::vfio_region_sparse_mmap_area>() == 16);
    assert!(std::mem::size_of::<uapi::vfio_iova_range>() == 16);
    assert!(HOT_RESET_LEN == 12);
};

// ---------------------------------------------------------------------------
// Decoded replies.

/// One capability header found while walking a capability chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapHeader {
    /// Capability id (`VFIO_*_CAP_*`; ids are per chain type).
    pub id: u16,
    /// Capability version.
    pub version: u16,
    /// Offset of the header from the start of the info structure.
    pub offset: usize,
}

/// What `VFIO_IOMMU_GET_INFO` reports about a type1 container.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IommuInfo {
    /// `VFIO_IOMMU_INFO_*` flags.
    pub flags: u32,
    /// Bitmap of supported IOMMU page sizes (valid with `VFIO_IOMMU_INFO_PGSIZES`).
    pub iova_pgsizes: u64,
    /// The usable IOVA ranges (`VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`), or
    /// `None` when the kernel did not report that capability.
    pub iova_ranges: Option<Vec<RangeInclusive<u64>>>,
    /// How many more DMA mappings the container accepts
    /// (`VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL`), when reported.
    pub dma_avail: Option<u32>,
    /// Dirty page tracking (`VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`), when
    /// the kernel offers it.
    pub dirty_tracking: Option<DirtyTrackingCap>,
}

/// Who owns a device that a PCI hot reset would also reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DependentOwner {
    /// The device is in this IOMMU group (legacy container/group API): the
    /// caller must pass that group's fd to the hot reset.
    Group(u32),
    /// The device is opened through the same iommufd with this device id
    /// (cdev API, `VFIO_PCI_HOT_RESET_FLAG_DEV_ID`).
    DevId(u32),
    /// The device is owned through the same iommufd but not opened
    /// (`VFIO_PCI_DEVID_OWNED`).
    OwnedNotOpened,
    /// The device is not owned by the caller (`VFIO_PCI_DEVID_NOT_OWNED`):
    /// the hot reset will be refused.
    NotOwned,
}

/// One device affected by a PCI hot reset (`struct vfio_pci_dependent_device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DependentDevice {
    /// PCI segment (domain).
    pub segment: u16,
    /// Bus number.
    pub bus: u8,
    /// Device (bits 7:3) and function (bits 2:0).
    pub devfn: u8,
    /// The group or iommufd device id it belongs to.
    pub owner: DependentOwner,
}

impl fmt::Display for DependentDevice {
    /// The sysfs name of the function, `ssss:bb:dd.f`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.segment,
            self.bus,
            self.devfn >> 3,
            self.devfn & 7
        )
    }
}

/// What `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HotResetInfo {
    /// `VFIO_PCI_HOT_RESET_FLAG_*`.
    pub flags: u32,
    /// Every device the reset affects, this one included.
    pub devices: Vec<DependentDevice>,
}

impl HotResetInfo {
    /// The devices are identified by iommufd device id, not group
    /// (`VFIO_PCI_HOT_RESET_FLAG_DEV_ID`).
    pub fn by_dev_id(&self) -> bool {
        self.flags & uapi::VFIO_PCI_HOT_RESET_FLAG_DEV_ID != 0
    }

    /// The caller owns every affected device (cdev API only,
    /// `VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED`).
    pub fn all_owned(&self) -> bool {
        self.flags & uapi::VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED != 0
    }

    /// The distinct IOMMU groups of the affected devices (legacy API), in
    /// ascending order: the groups whose fds a hot reset needs.
    pub fn group_ids(&self) -> Vec<u32> {
        let set: BTreeSet<u32> = self
            .devices
            .iter()
            .filter_map(|d| match d.owner {
                DependentOwner::Group(g) => Some(g),
                _ => None,
            })
            .collect();
        set.into_iter().collect()
    }
}

// ---------------------------------------------------------------------------
// Byte-buffer helpers (native endian, bounds-checked).

fn malformed(what: &str, msg: String) -> Error {
    Error::Io {
        context: format!("{what}: malformed reply from the kernel"),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
    }
}

fn get_bytes<const N: usize>(buf: &[u8], off: usize) -> Option<[u8; N]> {
    let end = off.checked_add(N)?;
    buf.get(off..end)?.try_into().ok()
}

fn get_u16(buf: &[u8], off: usize) -> Option<u16> {
    get_bytes::<2>(buf, off).map(u16::from_ne_bytes)
}

fn get_u32(buf: &[u8], off: usize) -> Option<u32> {
    get_bytes::<4>(buf, off).map(u32::from_ne_bytes)
}

fn get_u64(buf: &[u8], off: usize) -> Option<u64> {
    get_bytes::<8>(buf, off).map(u64::from_ne_bytes)
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    if let Some(dst) = off.checked_add(4).and_then(|end| buf.get_mut(off..end)) {
        dst.copy_from_slice(&v.to_ne_bytes());
    }
}

/// The part of `buf` the kernel says is valid: `argsz` (the first `u32`)
/// bytes, never more than the buffer and never less than the fixed header.
fn valid_part<'a>(what: &str, buf: &'a [u8], header_len: usize) -> Result<&'a [u8]> {
    if buf.len() < header_len {
        return Err(malformed(
            what,
            format!(
                "{} bytes is shorter than the {header_len}-byte structure",
                buf.len()
            ),
        ));
    }
    let argsz = get_u32(buf, 0).unwrap_or(0) as usize;
    if argsz < header_len {
        return Err(malformed(
            what,
            format!("argsz {argsz} is smaller than the {header_len}-byte structure"),
        ));
    }
    Ok(buf.get(..argsz.min(buf.len())).unwrap_or(buf))
}

/// A zeroed, 8-byte aligned byte buffer for ioctls whose structures contain
/// `__u64` fields followed by a variable-length tail.
struct AlignedBuf {
    words: Vec<u64>,
    len: usize,
}

impl AlignedBuf {
    fn zeroed(len: usize) -> Self {
        AlignedBuf {
            words: vec![0; len.div_ceil(8)],
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the Vec owns at least `len` initialised bytes (len.div_ceil(8)
        // u64 words); u8 has no alignment or validity requirement, and the
        // returned slice borrows `self`, so the storage outlives it.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast::<u8>(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`; the mutable borrow of `self` makes this the
        // only view of the storage while it lives, and any byte pattern is a
        // valid u64.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast::<u8>(), self.len) }
    }

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast::<u8>()
    }
}

fn ioctl_error(context: impl Into<String>) -> Error {
    Error::last_os_error(context)
}

// ---------------------------------------------------------------------------
// Capability chains.

/// Walks a VFIO capability chain (`struct vfio_info_cap_header` linked by
/// `next`, offsets from the start of the info structure, 0 ends the chain).
///
/// `buf` is the valid part of the info structure and `header_len` the size
/// of its fixed part: a capability may not start inside the fixed part, its
/// header must lie inside `buf`, and an offset visited twice is a loop. The
/// walk visits at most `buf.len() / 8` capabilities.
pub fn parse_cap_chain(buf: &[u8], first: u32, header_len: usize) -> Result<Vec<CapHeader>> {
    const WHAT: &str = "VFIO capability chain";
    let mut caps = Vec::new();
    let mut seen = BTreeSet::new();
    let mut off = first as usize;
    let max_caps = buf.len() / CAP_HEADER_LEN;
    while off != 0 {
        if off < header_len {
            return Err(malformed(
                WHAT,
                format!("capability at {off:#x} overlaps the {header_len}-byte fixed structure"),
            ));
        }
        let (Some(id), Some(version), Some(next)) = (
            get_u16(buf, off),
            get_u16(buf, off.saturating_add(2)),
            get_u32(buf, off.saturating_add(4)),
        ) else {
            return Err(malformed(
                WHAT,
                format!(
                    "capability header at {off:#x} runs past the end of the {}-byte buffer",
                    buf.len()
                ),
            ));
        };
        if !seen.insert(off) || caps.len() >= max_caps {
            return Err(malformed(
                WHAT,
                format!("capability chain loops (offset {off:#x} visited twice)"),
            ));
        }
        caps.push(CapHeader {
            id,
            version,
            offset: off,
        });
        off = next as usize;
    }
    Ok(caps)
}

/// Decodes the capabilities of a region info reply.
fn decode_region_caps(what: &str, buf: &[u8], first: u32) -> Result<Vec<RegionCap>> {
    let mut caps = Vec::new();
    for cap in parse_cap_chain(buf, first, REGION_INFO_LEN)? {
        let off = cap.offset;
        let decoded = match u32::from(cap.id) {
            uapi::VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                // header, __u32 nr_areas, __u32 reserved, areas[] of {offset, size}.
                let nr = get_u32(buf, off + 8).ok_or_else(|| {
                    malformed(
                        what,
                        format!("sparse-mmap capability at {off:#x} is truncated"),
                    )
                })?;
                let areas_start = off + 16;
                let areas_end = (nr as usize)
                    .checked_mul(16)
                    .and_then(|n| n.checked_add(areas_start))
                    .filter(|&end| end <= buf.len())
                    .ok_or_else(|| {
                        malformed(
                            what,
                            format!(
                                "sparse-mmap capability at {off:#x} claims {nr} areas, more than the {}-byte buffer holds",
                                buf.len()
                            ),
                        )
                    })?;
                let mut areas = Vec::with_capacity(nr as usize);
                let mut a = areas_start;
                while a < areas_end {
                    let (Some(offset), Some(size)) = (get_u64(buf, a), get_u64(buf, a + 8)) else {
                        return Err(malformed(
                            what,
                            format!("sparse area at {a:#x} is truncated"),
                        ));
                    };
                    areas.push(SparseArea { offset, size });
                    a += 16;
                }
                RegionCap::SparseMmap(areas)
            }
            uapi::VFIO_REGION_INFO_CAP_TYPE => {
                let (Some(type_), Some(subtype)) = (get_u32(buf, off + 8), get_u32(buf, off + 12))
                else {
                    return Err(malformed(
                        what,
                        format!("type capability at {off:#x} is truncated"),
                    ));
                };
                RegionCap::Type { type_, subtype }
            }
            uapi::VFIO_REGION_INFO_CAP_MSIX_MAPPABLE => RegionCap::MsixMappable,
            _ => RegionCap::Unknown {
                id: cap.id,
                version: cap.version,
            },
        };
        caps.push(decoded);
    }
    Ok(caps)
}

/// Decodes a `VFIO_DEVICE_GET_REGION_INFO` reply: `struct vfio_region_info`
/// followed by its capability chain when `VFIO_REGION_INFO_FLAG_CAPS` is set
/// and `cap_offset` is not 0 (0 means the capabilities did not fit in the
/// buffer; none are returned then).
pub fn parse_region_info(buf: &[u8]) -> Result<RegionInfo> {
    const WHAT: &str = "VFIO_DEVICE_GET_REGION_INFO";
    let buf = valid_part(WHAT, buf, REGION_INFO_LEN)?;
    let field = |off| get_u32(buf, off).unwrap_or(0);
    let flags = field(4);
    let index = field(8);
    let cap_offset = field(12);
    let size = get_u64(buf, 16).unwrap_or(0);
    let offset = get_u64(buf, 24).unwrap_or(0);
    let caps = if flags & uapi::VFIO_REGION_INFO_FLAG_CAPS != 0 && cap_offset != 0 {
        decode_region_caps(WHAT, buf, cap_offset)?
    } else {
        Vec::new()
    };
    Ok(RegionInfo {
        index,
        flags,
        size,
        offset,
        caps,
    })
}

/// Decodes a `VFIO_IOMMU_GET_INFO` reply for a type1 container:
/// `struct vfio_iommu_type1_info` and, with `VFIO_IOMMU_INFO_CAPS`, its
/// capability chain (IOVA ranges, DMA mappings available, dirty tracking;
/// others ignored).
/// An IOVA range whose start is above its end is refused.
pub fn parse_iommu_type1_info(buf: &[u8]) -> Result<IommuInfo> {
    const WHAT: &str = "VFIO_IOMMU_GET_INFO";
    let buf = valid_part(WHAT, buf, IOMMU_TYPE1_INFO_LEN)?;
    let flags = get_u32(buf, 4).unwrap_or(0);
    let iova_pgsizes = get_u64(buf, 8).unwrap_or(0);
    let cap_offset = get_u32(buf, 16).unwrap_or(0);
    let mut info = IommuInfo {
        flags,
        iova_pgsizes,
        iova_ranges: None,
        dma_avail: None,
        dirty_tracking: None,
    };
    if flags & uapi::VFIO_IOMMU_INFO_CAPS == 0 || cap_offset == 0 {
        return Ok(info);
    }
    for cap in parse_cap_chain(buf, cap_offset, IOMMU_TYPE1_INFO_LEN)? {
        let off = cap.offset;
        match u32::from(cap.id) {
            uapi::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE => {
                // header, __u32 nr_iovas, __u32 reserved, ranges[] of {start, end}.
                let nr = get_u32(buf, off + 8).ok_or_else(|| {
                    malformed(
                        WHAT,
                        format!("IOVA-range capability at {off:#x} is truncated"),
                    )
                })?;
                let start = off + 16;
                let end = (nr as usize)
                    .checked_mul(16)
                    .and_then(|n| n.checked_add(start))
                    .filter(|&end| end <= buf.len())
                    .ok_or_else(|| {
                        malformed(
                            WHAT,
                            format!(
                                "IOVA-range capability at {off:#x} claims {nr} ranges, more than the {}-byte buffer holds",
                                buf.len()
                            ),
                        )
                    })?;
                let mut ranges = Vec::with_capacity(nr as usize);
                let mut r = start;
                while r < end {
                    let (Some(lo), Some(hi)) = (get_u64(buf, r), get_u64(buf, r + 8)) else {
                        return Err(malformed(
                            WHAT,
                            format!("IOVA range at {r:#x} is truncated"),
                        ));
                    };
                    if lo > hi {
                        return Err(malformed(
                            WHAT,
                            format!("IOVA range {lo:#x}..={hi:#x} is empty"),
                        ));
                    }
                    ranges.push(lo..=hi);
                    r += 16;
                }
                info.iova_ranges = Some(ranges);
            }
            uapi::VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL => {
                info.dma_avail = Some(get_u32(buf, off + 8).ok_or_else(|| {
                    malformed(
                        WHAT,
                        format!("DMA-avail capability at {off:#x} is truncated"),
                    )
                })?);
            }
            uapi::VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION => {
                // header, __u32 flags, (pad), __u64 pgsize_bitmap,
                // __u64 max_dirty_bitmap_size.
                let (Some(flags), Some(pgsize_bitmap), Some(max_dirty_bitmap_size)) = (
                    get_u32(buf, off + 8),
                    get_u64(buf, off + 16),
                    get_u64(buf, off + 24),
                ) else {
                    return Err(malformed(
                        WHAT,
                        format!("migration capability at {off:#x} is truncated"),
                    ));
                };
                info.dirty_tracking = Some(DirtyTrackingCap {
                    flags,
                    pgsize_bitmap,
                    max_dirty_bitmap_size,
                });
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Decodes a `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO` reply:
/// `struct vfio_pci_hot_reset_info` followed by `count` dependent devices.
pub fn parse_hot_reset_info(buf: &[u8]) -> Result<HotResetInfo> {
    const WHAT: &str = "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO";
    let buf = valid_part(WHAT, buf, HOT_RESET_INFO_LEN)?;
    let flags = get_u32(buf, 4).unwrap_or(0);
    let count = get_u32(buf, 8).unwrap_or(0);
    let end = (count as usize)
        .checked_mul(DEPENDENT_DEVICE_LEN)
        .and_then(|n| n.checked_add(HOT_RESET_INFO_LEN))
        .filter(|&end| end <= buf.len())
        .ok_or_else(|| {
            malformed(
                WHAT,
                format!(
                    "{count} devices do not fit in the {}-byte buffer",
                    buf.len()
                ),
            )
        })?;
    let by_dev_id = flags & uapi::VFIO_PCI_HOT_RESET_FLAG_DEV_ID != 0;
    let mut devices = Vec::with_capacity(count as usize);
    let mut d = HOT_RESET_INFO_LEN;
    while d < end {
        let (Some(id), Some(segment), Some(bus), Some(devfn)) = (
            get_u32(buf, d),
            get_u16(buf, d + 4),
            buf.get(d + 6).copied(),
            buf.get(d + 7).copied(),
        ) else {
            return Err(malformed(WHAT, format!("device at {d:#x} is truncated")));
        };
        let owner = if !by_dev_id {
            DependentOwner::Group(id)
        } else if id == uapi::VFIO_PCI_DEVID_OWNED {
            DependentOwner::OwnedNotOpened
        } else if id == uapi::VFIO_PCI_DEVID_NOT_OWNED as u32 {
            DependentOwner::NotOwned
        } else {
            DependentOwner::DevId(id)
        };
        devices.push(DependentDevice {
            segment,
            bus,
            devfn,
            owner,
        });
        d += DEPENDENT_DEVICE_LEN;
    }
    Ok(HotResetInfo { flags, devices })
}

// ---------------------------------------------------------------------------
// Container and group ioctls.

/// `VFIO_GET_API_VERSION`.
pub(crate) fn get_api_version(container: BorrowedFd<'_>) -> Result<i32> {
    // SAFETY: VFIO_GET_API_VERSION takes no argument and only returns a value.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl(&container, VFIO_GET_API_VERSION) };
    if ret < 0 {
        return Err(ioctl_error("VFIO_GET_API_VERSION"));
    }
    Ok(ret)
}

/// `VFIO_CHECK_EXTENSION`: whether the container supports `extension`.
pub(crate) fn check_extension(container: BorrowedFd<'_>, extension: u32) -> Result<bool> {
    // SAFETY: VFIO_CHECK_EXTENSION takes its argument by value and only
    // returns a value.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_val(
            &container,
            VFIO_CHECK_EXTENSION,
            libc::c_ulong::from(extension),
        )
    };
    if ret < 0 {
        return Err(ioctl_error(format!("VFIO_CHECK_EXTENSION({extension})")));
    }
    Ok(ret > 0)
}

/// `VFIO_SET_IOMMU`: picks the container's IOMMU driver (after the first
/// group was added).
pub(crate) fn set_iommu(container: BorrowedFd<'_>, iommu_type: u32) -> Result<()> {
    // SAFETY: VFIO_SET_IOMMU takes its argument by value.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_val(
            &container,
            VFIO_SET_IOMMU,
            libc::c_ulong::from(iommu_type),
        )
    };
    if ret < 0 {
        return Err(ioctl_error(format!("VFIO_SET_IOMMU({iommu_type})")));
    }
    Ok(())
}

/// `VFIO_GROUP_GET_STATUS`: the `VFIO_GROUP_FLAGS_*` of a group.
pub(crate) fn group_status(group: BorrowedFd<'_>) -> Result<u32> {
    let mut status = uapi::vfio_group_status {
        argsz: std::mem::size_of::<uapi::vfio_group_status>() as u32,
        flags: 0,
    };
    // SAFETY: `status` is a vfio_group_status with argsz set to its size;
    // the kernel writes at most that many bytes into it.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&group, VFIO_GROUP_GET_STATUS, &mut status)
    };
    if ret < 0 {
        return Err(ioctl_error("VFIO_GROUP_GET_STATUS"));
    }
    Ok(status.flags)
}

/// `VFIO_GROUP_SET_CONTAINER`: adds the group to the container.
pub(crate) fn group_set_container(group: BorrowedFd<'_>, container: BorrowedFd<'_>) -> Result<()> {
    let fd: i32 = container.as_raw_fd();
    // SAFETY: the ioctl reads one __s32 (the container fd) through the pointer.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&group, VFIO_GROUP_SET_CONTAINER, &fd) };
    if ret < 0 {
        return Err(ioctl_error("VFIO_GROUP_SET_CONTAINER"));
    }
    Ok(())
}

/// `VFIO_GROUP_UNSET_CONTAINER`: removes the group from its container.
pub(crate) fn group_unset_container(group: BorrowedFd<'_>) -> Result<()> {
    // SAFETY: VFIO_GROUP_UNSET_CONTAINER takes no argument.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl(&group, VFIO_GROUP_UNSET_CONTAINER) };
    if ret < 0 {
        return Err(ioctl_error("VFIO_GROUP_UNSET_CONTAINER"));
    }
    Ok(())
}

/// `VFIO_GROUP_GET_DEVICE_FD`: opens the device called `name` (its sysfs
/// name, e.g. `0000:00:01.0`) in the group.
pub(crate) fn group_get_device_fd(group: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
    // SAFETY: the ioctl reads a NUL-terminated string through the pointer;
    // `name` is one and outlives the call.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_ptr(&group, VFIO_GROUP_GET_DEVICE_FD, name.as_ptr())
    };
    if ret < 0 {
        return Err(ioctl_error(format!(
            "VFIO_GROUP_GET_DEVICE_FD({})",
            name.to_string_lossy()
        )));
    }
    // SAFETY: on success the ioctl returns a new file descriptor that nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// `VFIO_IOMMU_GET_INFO` with the capability chain (grow-and-retry on `argsz`).
pub(crate) fn iommu_get_info(container: BorrowedFd<'_>) -> Result<IommuInfo> {
    let bytes = query_growing(
        "VFIO_IOMMU_GET_INFO",
        container,
        VFIO_IOMMU_GET_INFO,
        IOMMU_TYPE1_INFO_LEN,
        |_| {},
    )?;
    parse_iommu_type1_info(&bytes)
}

/// Issues an info ioctl whose `argsz` the kernel raises when the capability
/// chain does not fit, growing the buffer until it does. `init` fills the
/// input fields (after `argsz`). Returns the buffer the kernel filled.
fn query_growing(
    what: &str,
    fd: BorrowedFd<'_>,
    request: libc::c_ulong,
    header_len: usize,
    init: impl Fn(&mut [u8]),
) -> Result<Vec<u8>> {
    let mut len = header_len;
    for _ in 0..MAX_QUERY_ATTEMPTS {
        let mut buf = AlignedBuf::zeroed(len);
        put_u32(buf.bytes_mut(), 0, len as u32);
        init(buf.bytes_mut());
        // SAFETY: the buffer is `len` bytes, 8-byte aligned, and its argsz
        // says `len`: the kernel writes at most argsz bytes into it.
        let ret =
            unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ptr(&fd, request, buf.as_mut_ptr()) };
        if ret < 0 {
            return Err(ioctl_error(what));
        }
        let argsz = get_u32(buf.bytes(), 0).unwrap_or(0);
        if argsz as usize <= len {
            return Ok(buf.bytes().to_vec());
        }
        if argsz > MAX_INFO_ARGSZ {
            return Err(malformed(
                what,
                format!("the kernel asks for a {argsz}-byte buffer (limit {MAX_INFO_ARGSZ})"),
            ));
        }
        len = argsz as usize;
    }
    Err(malformed(
        what,
        format!("argsz kept growing after {MAX_QUERY_ATTEMPTS} attempts"),
    ))
}

/// `VFIO_IOMMU_MAP_DMA`: maps `size` bytes at `vaddr` in this process to
/// `iova`; `flags` are `VFIO_DMA_MAP_FLAG_READ` / `_WRITE`.
pub(crate) fn iommu_map_dma(
    container: BorrowedFd<'_>,
    iova: u64,
    size: u64,
    vaddr: u64,
    flags: u32,
) -> Result<()> {
    let map = uapi::vfio_iommu_type1_dma_map {
        argsz: std::mem::size_of::<uapi::vfio_iommu_type1_dma_map>() as u32,
        flags,
        vaddr,
        iova,
        size,
    };
    // SAFETY: `map` is a complete vfio_iommu_type1_dma_map with its argsz;
    // the kernel only reads it. It pins the user pages itself and fails if
    // `vaddr .. vaddr + size` is not mapped in this process.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&container, VFIO_IOMMU_MAP_DMA, &map) };
    if ret < 0 {
        return Err(ioctl_error(format!(
            "VFIO_IOMMU_MAP_DMA of {size:#x} bytes at IOVA {iova:#x} from {vaddr:#x}"
        )));
    }
    Ok(())
}

/// `VFIO_IOMMU_UNMAP_DMA`: returns how many bytes the kernel unmapped.
pub(crate) fn iommu_unmap_dma(container: BorrowedFd<'_>, iova: u64, size: u64) -> Result<u64> {
    let mut unmap = uapi::vfio_iommu_type1_dma_unmap {
        argsz: std::mem::size_of::<uapi::vfio_iommu_type1_dma_unmap>() as u32,
        flags: 0,
        iova,
        size,
        data: Default::default(),
    };
    // SAFETY: `unmap` is a vfio_iommu_type1_dma_unmap with argsz = its fixed
    // size (no bitmap requested); the kernel writes back only `size`.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&container, VFIO_IOMMU_UNMAP_DMA, &mut unmap)
    };
    if ret < 0 {
        return Err(ioctl_error(format!(
            "VFIO_IOMMU_UNMAP_DMA of {size:#x} bytes at IOVA {iova:#x}"
        )));
    }
    Ok(unmap.size)
}

// ---------------------------------------------------------------------------
// Device ioctls (the same on a group-opened device fd and a vfio cdev).

/// `VFIO_DEVICE_GET_INFO`.
pub(crate) fn device_get_info(device: BorrowedFd<'_>) -> Result<DeviceInfo> {
    let mut info = uapi::vfio_device_info {
        argsz: std::mem::size_of::<uapi::vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: `info` is a vfio_device_info with argsz = its size; the kernel
    // writes at most argsz bytes (capabilities only if they fit, and they
    // do not fit in this size).
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&device, VFIO_DEVICE_GET_INFO, &mut info)
    };
    if ret < 0 {
        return Err(ioctl_error("VFIO_DEVICE_GET_INFO"));
    }
    Ok(DeviceInfo {
        flags: info.flags,
        num_regions: info.num_regions,
        num_irqs: info.num_irqs,
    })
}

/// `VFIO_DEVICE_GET_REGION_INFO` with the capability chain.
pub(crate) fn device_get_region_info(device: BorrowedFd<'_>, index: u32) -> Result<RegionInfo> {
    let bytes = query_growing(
        "VFIO_DEVICE_GET_REGION_INFO",
        device,
        VFIO_DEVICE_GET_REGION_INFO,
        REGION_INFO_LEN,
        |b| put_u32(b, 8, index),
    )
    .map_err(|e| super::prefix_error(e, &format!("region {index}")))?;
    let info = parse_region_info(&bytes)?;
    if info.index != index {
        return Err(malformed(
            "VFIO_DEVICE_GET_REGION_INFO",
            format!("asked for region {index}, got region {}", info.index),
        ));
    }
    Ok(info)
}

/// `VFIO_DEVICE_GET_IRQ_INFO`.
pub(crate) fn device_get_irq_info(device: BorrowedFd<'_>, index: u32) -> Result<IrqInfo> {
    let mut info = uapi::vfio_irq_info {
        argsz: std::mem::size_of::<uapi::vfio_irq_info>() as u32,
        flags: 0,
        index,
        count: 0,
    };
    // SAFETY: `info` is a vfio_irq_info with argsz = its size; the kernel
    // writes at most that many bytes.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&device, VFIO_DEVICE_GET_IRQ_INFO, &mut info)
    };
    if ret < 0 {
        return Err(ioctl_error(format!(
            "VFIO_DEVICE_GET_IRQ_INFO for interrupt {index}"
        )));
    }
    Ok(IrqInfo {
        index,
        flags: info.flags,
        count: info.count,
    })
}

/// How many eventfds a `VFIO_DEVICE_SET_IRQS` call builds on the stack
/// before it allocates.
const IRQ_SET_INLINE_FDS: usize = 32;

/// Fills `words` (a `u32` view of `struct vfio_irq_set` and its data) for a
/// `VFIO_DEVICE_SET_IRQS` call: `argsz`, `flags`, `index`, `start`,
/// `count`, then one `__s32` per entry of `fds` (for `DATA_EVENTFD`; -1
/// detaches). `words` must be exactly `5 + fds.len()` long.
pub(crate) fn fill_irq_set(
    words: &mut [u32],
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fds: &[i32],
) {
    let header = [(words.len() * 4) as u32, flags, index, start, count];
    for (dst, src) in words.iter_mut().zip(header) {
        *dst = src;
    }
    for (dst, fd) in words.iter_mut().skip(IRQ_SET_LEN / 4).zip(fds) {
        *dst = *fd as u32;
    }
}

/// `VFIO_DEVICE_SET_IRQS` on vectors `start .. start + count` of interrupt
/// `index`. With `VFIO_IRQ_SET_DATA_EVENTFD`, `fds` holds `count` eventfds
/// (-1 detaches one); with `VFIO_IRQ_SET_DATA_NONE` it is empty.
pub(crate) fn device_set_irqs(
    device: BorrowedFd<'_>,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fds: &[i32],
) -> Result<()> {
    let words_len = IRQ_SET_LEN / 4 + fds.len();
    let mut inline = [0u32; IRQ_SET_LEN / 4 + IRQ_SET_INLINE_FDS];
    let mut heap;
    let words: &mut [u32] = match inline.get_mut(..words_len) {
        Some(w) => w,
        None => {
            heap = vec![0u32; words_len];
            &mut heap
        }
    };
    if u32::try_from(words.len() * 4).is_err() {
        return Err(Error::InvalidArgument(format!(
            "{} eventfds do not fit in one VFIO_DEVICE_SET_IRQS",
            fds.len()
        )));
    }
    fill_irq_set(words, flags, index, start, count, fds);
    // SAFETY: `words` is a 4-byte aligned vfio_irq_set header followed by
    // `fds.len()` __s32 entries, and its argsz is exactly its length: the
    // kernel reads at most that many bytes and writes none.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_ptr(&device, VFIO_DEVICE_SET_IRQS, words.as_ptr())
    };
    if ret < 0 {
        return Err(ioctl_error(format!(
            "VFIO_DEVICE_SET_IRQS (flags {flags:#x}) on interrupt {index}, vectors {start}..{}",
            u64::from(start) + u64::from(count)
        )));
    }
    Ok(())
}

/// `VFIO_DEVICE_RESET`.
pub(crate) fn device_reset(device: BorrowedFd<'_>) -> Result<()> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl(&device, VFIO_DEVICE_RESET) };
    if ret < 0 {
        return Err(ioctl_error("VFIO_DEVICE_RESET"));
    }
    Ok(())
}

/// `VFIO_DEVICE_GET_PCI_HOT_RESET_INFO`, retried with a larger buffer when
/// the kernel answers `ENOSPC` with the count it needs.
pub(crate) fn device_hot_reset_info(device: BorrowedFd<'_>) -> Result<HotResetInfo> {
    const WHAT: &str = "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO";
    let mut capacity: u32 = 16;
    for _ in 0..MAX_QUERY_ATTEMPTS {
        let len = HOT_RESET_INFO_LEN + capacity as usize * DEPENDENT_DEVICE_LEN;
        let mut buf = AlignedBuf::zeroed(len);
        put_u32(buf.bytes_mut(), 0, len as u32);
        // SAFETY: the buffer is `len` bytes, aligned for the structure, with
        // argsz = len: the kernel writes at most argsz bytes.
        let ret = unsafe {
            vmm_sys_util::ioctl::ioctl_with_mut_ptr(
                &device,
                VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,
                buf.as_mut_ptr(),
            )
        };
        if ret >= 0 {
            return parse_hot_reset_info(buf.bytes());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOSPC) {
            return Err(Error::io(WHAT, err));
        }
        let needed = get_u32(buf.bytes(), 8).unwrap_or(0);
        if needed <= capacity || needed > MAX_HOT_RESET_DEVICES {
            return Err(malformed(
                WHAT,
                format!("ENOSPC with a device count of {needed} (buffer held {capacity})"),
            ));
        }
        capacity = needed;
    }
    Err(malformed(
        WHAT,
        format!("the device count kept growing after {MAX_QUERY_ATTEMPTS} attempts"),
    ))
}

/// Lays out `struct vfio_pci_hot_reset` (`argsz`, `flags` 0, `count`) and
/// its `__s32 group_fds[count]` as `u32` words.
pub(crate) fn encode_hot_reset(group_fds: &[i32]) -> Result<Vec<u32>> {
    let too_many = || Error::InvalidArgument("too many group fds for a hot reset".into());
    let count = u32::try_from(group_fds.len()).map_err(|_| too_many())?;
    let words_len = HOT_RESET_LEN / 4 + group_fds.len();
    let argsz = u32::try_from(words_len * 4).map_err(|_| too_many())?;
    let mut words = Vec::with_capacity(words_len);
    words.extend_from_slice(&[argsz, 0, count]);
    words.extend(group_fds.iter().map(|&fd| fd as u32));
    Ok(words)
}

/// `VFIO_DEVICE_PCI_HOT_RESET` proving ownership with `group_fds` (legacy
/// API: one fd per affected group) or with none (cdev API: ownership is
/// checked through the iommufd the device is bound to).
pub(crate) fn device_hot_reset(device: BorrowedFd<'_>, group_fds: &[BorrowedFd<'_>]) -> Result<()> {
    let raw: Vec<i32> = group_fds.iter().map(|fd| fd.as_raw_fd()).collect();
    let words = encode_hot_reset(&raw)?;
    let count = raw.len();
    // SAFETY: `words` is a vfio_pci_hot_reset header followed by `count`
    // __s32 group fds, 4-byte aligned, with argsz = its length; the kernel
    // only reads it. The fds are borrowed for the duration of the call.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_ptr(&device, VFIO_DEVICE_PCI_HOT_RESET, words.as_ptr())
    };
    if ret < 0 {
        return Err(ioctl_error(format!(
            "VFIO_DEVICE_PCI_HOT_RESET with {count} group fds"
        )));
    }
    Ok(())
}

/// `VFIO_DEVICE_BIND_IOMMUFD`: binds a vfio cdev to an iommufd; returns the
/// iommufd device id.
#[cfg(feature = "iommufd")]
pub(crate) fn device_bind_iommufd(device: BorrowedFd<'_>, iommufd: BorrowedFd<'_>) -> Result<u32> {
    let mut bind = uapi::vfio_device_bind_iommufd {
        argsz: std::mem::size_of::<uapi::vfio_device_bind_iommufd>() as u32,
        flags: 0,
        iommufd: iommufd.as_raw_fd(),
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    // SAFETY: `bind` is a vfio_device_bind_iommufd with argsz = its size and
    // no token (flags 0); the kernel writes back only out_devid.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&device, VFIO_DEVICE_BIND_IOMMUFD, &mut bind)
    };
    if ret < 0 {
        return Err(ioctl_error("VFIO_DEVICE_BIND_IOMMUFD"));
    }
    Ok(bind.out_devid)
}

/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT`: attaches a bound cdev to an IOAS (or
/// hardware page table) `pt_id`.
#[cfg(feature = "iommufd")]
pub(crate) fn device_attach_iommufd_pt(device: BorrowedFd<'_>, pt_id: u32) -> Result<()> {
    let mut attach = uapi::vfio_device_attach_iommufd_pt {
        argsz: std::mem::size_of::<uapi::vfio_device_attach_iommufd_pt>() as u32,
        flags: 0,
        pt_id,
        pasid: 0,
    };
    // SAFETY: `attach` is a vfio_device_attach_iommufd_pt with argsz = its
    // size and no PASID flag; the kernel may write back pt_id only.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&device, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &mut attach)
    };
    if ret < 0 {
        return Err(ioctl_error(format!(
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT to IOAS {pt_id}"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Migration v2 (`VFIO_DEVICE_FEATURE`), device DMA logging and type1 dirty
// page tracking (`VFIO_IOMMU_DIRTY_PAGES`).

/// `VFIO_DEVICE_FEATURE` (device fd).
pub(crate) const VFIO_DEVICE_FEATURE: libc::c_ulong = vfio_io(17);
/// `VFIO_IOMMU_DIRTY_PAGES` (container fd; same number as the device's
/// `VFIO_DEVICE_FEATURE`).
pub(crate) const VFIO_IOMMU_DIRTY_PAGES: libc::c_ulong = vfio_io(17);
/// `VFIO_MIG_GET_PRECOPY_INFO` (on a migration data fd).
pub(crate) const VFIO_MIG_GET_PRECOPY_INFO: libc::c_ulong = vfio_io(21);

/// The most ranges one `DMA_LOGGING_START` carries: the kernel guarantees
/// as many as fit in one 4 KiB page (`LOG_MAX_RANGES`) and refuses more with
/// `E2BIG` where a driver cannot take them.
pub const MAX_DMA_LOGGING_RANGES: usize = 4096 / DMA_LOGGING_RANGE_LEN;
/// The smallest page size a device DMA log reports at (the kernel refuses
/// smaller with `EINVAL`).
pub const MIN_DMA_LOGGING_PAGE: u64 = 4096;

/// Size of `struct vfio_device_feature` (before its data).
pub const DEVICE_FEATURE_LEN: usize = std::mem::size_of::<uapi::vfio_device_feature>();
/// Size of `struct vfio_device_feature_dma_logging_range`.
pub const DMA_LOGGING_RANGE_LEN: usize =
    std::mem::size_of::<uapi::vfio_device_feature_dma_logging_range>();
/// Size of `struct vfio_iommu_type1_dirty_bitmap` (before its data).
pub const DIRTY_BITMAP_LEN: usize = std::mem::size_of::<uapi::vfio_iommu_type1_dirty_bitmap>();

/// `struct vfio_device_feature` followed by its data `T`: what one
/// `VFIO_DEVICE_FEATURE` call passes (the data is 8-byte aligned right
/// after the 8-byte header, as the kernel reads it).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FeatureBuf<T> {
    argsz: u32,
    flags: u32,
    data: T,
}

/// `struct vfio_iommu_type1_dirty_bitmap` followed by a
/// `struct vfio_iommu_type1_dirty_bitmap_get`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirtyBitmapGet {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
    pgsize: u64,
    bitmap_bytes: u64,
    data: u64,
}

// The layouts the kernel reads; pin them against the uAPI sizes.
const _: () = {
    assert!(DEVICE_FEATURE_LEN == 8);
    assert!(DMA_LOGGING_RANGE_LEN == 16);
    assert!(DIRTY_BITMAP_LEN == 8);
    assert!(std::mem::size_of::<uapi::vfio_device_feature_migration>() == 8);
    assert!(std::mem::size_of::<uapi::vfio_device_feature_mig_state>() == 8);
    assert!(std::mem::size_of::<uapi::vfio_device_feature_mig_data_size>() == 8);
    assert!(std::mem::size_of::<uapi::vfio_device_feature_dma_logging_control>() == 24);
    assert!(std::mem::size_of::<uapi::vfio_device_feature_dma_logging_report>() == 32);
    assert!(std::mem::size_of::<uapi::vfio_precopy_info>() == 24);
    assert!(std::mem::size_of::<uapi::vfio_iommu_type1_info_cap_migration>() == 32);
    assert!(std::mem::size_of::<uapi::vfio_bitmap>() == 24);
    assert!(std::mem::size_of::<uapi::vfio_iommu_type1_dirty_bitmap_get>() == 40);
    assert!(std::mem::size_of::<DirtyBitmapGet>() == DIRTY_BITMAP_LEN + 40);
    assert!(std::mem::offset_of!(FeatureBuf<uapi::vfio_device_feature_mig_state>, data) == 8);
    assert!(
        std::mem::offset_of!(
            FeatureBuf<uapi::vfio_device_feature_dma_logging_report>,
            data
        ) == 8
    );
    assert!(std::mem::offset_of!(DirtyBitmapGet, iova) == DIRTY_BITMAP_LEN);
    assert!(std::mem::offset_of!(DirtyBitmapGet, pgsize) == DIRTY_BITMAP_LEN + 16);
    assert!(std::mem::offset_of!(DirtyBitmapGet, data) == DIRTY_BITMAP_LEN + 32);
};

impl<T> FeatureBuf<T> {
    /// The call for `feature` with `op` (`VFIO_DEVICE_FEATURE_GET` / `_SET`
    /// / `_PROBE`, combinable with PROBE) and its data.
    pub(crate) fn new(feature: u32, op: u32, data: T) -> Self {
        FeatureBuf {
            argsz: std::mem::size_of::<Self>() as u32,
            flags: (feature & uapi::VFIO_DEVICE_FEATURE_MASK) | op,
            data,
        }
    }
}

/// What `VFIO_IOMMU_GET_INFO`'s `VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION` says
/// about dirty page tracking in a type1 container.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirtyTrackingCap {
    /// `flags` of the capability (none are defined).
    pub flags: u32,
    /// The page sizes dirty tracking works at (bit `n`: `1 << n` bytes); the
    /// kernel reports only at the smallest.
    pub pgsize_bitmap: u64,
    /// The largest bitmap, in bytes, one `GET_BITMAP` fills.
    pub max_dirty_bitmap_size: u64,
}

impl DirtyTrackingCap {
    /// The one page size `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP` accepts:
    /// the smallest of [`DirtyTrackingCap::pgsize_bitmap`].
    pub fn report_page_size(&self) -> Option<u64> {
        (self.pgsize_bitmap != 0).then(|| 1u64 << self.pgsize_bitmap.trailing_zeros())
    }
}

fn feature_name(feature: u32) -> &'static str {
    match feature {
        uapi::VFIO_DEVICE_FEATURE_MIGRATION => "MIGRATION",
        uapi::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE => "MIG_DEVICE_STATE",
        uapi::VFIO_DEVICE_FEATURE_DMA_LOGGING_START => "DMA_LOGGING_START",
        uapi::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP => "DMA_LOGGING_STOP",
        uapi::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT => "DMA_LOGGING_REPORT",
        uapi::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE => "MIG_DATA_SIZE",
        _ => "feature",
    }
}

fn op_name(op: u32) -> &'static str {
    if op & uapi::VFIO_DEVICE_FEATURE_PROBE != 0 {
        "probe"
    } else if op & uapi::VFIO_DEVICE_FEATURE_SET != 0 {
        "set"
    } else {
        "get"
    }
}

/// Issues one `VFIO_DEVICE_FEATURE` call; the kernel may write the data
/// back (GET, and the SETs that return something).
fn device_feature<T>(device: BorrowedFd<'_>, buf: &mut FeatureBuf<T>, detail: &str) -> Result<()> {
    // SAFETY: `buf` is a complete vfio_device_feature header followed by the
    // feature's data, with argsz = its size: the kernel reads and writes at
    // most argsz bytes of it. Pointers inside the data (DMA logging ranges and
    // bitmaps) are set up by the callers, which say why they hold.
    let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&device, VFIO_DEVICE_FEATURE, buf) };
    if ret < 0 {
        return Err(ioctl_error(format!(
            "VFIO_DEVICE_FEATURE {} {}{detail}",
            feature_name(buf.flags & uapi::VFIO_DEVICE_FEATURE_MASK),
            op_name(buf.flags)
        )));
    }
    Ok(())
}

/// Whether the device offers `feature` for `op` (`VFIO_DEVICE_FEATURE_PROBE`):
/// `ENOTTY` (the device or kernel lacks it) is `false`.
pub(crate) fn device_feature_probe(device: BorrowedFd<'_>, feature: u32, op: u32) -> Result<bool> {
    let mut buf = FeatureBuf::new(feature, uapi::VFIO_DEVICE_FEATURE_PROBE | op, ());
    match device_feature(device, &mut buf, "") {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOTTY) => Ok(false),
        Err(e) => Err(e),
    }
}

/// `VFIO_DEVICE_FEATURE_MIGRATION` get: the device's `VFIO_MIGRATION_*`
/// flags, or `None` when it cannot migrate (`ENOTTY`).
pub(crate) fn device_migration_flags(device: BorrowedFd<'_>) -> Result<Option<u64>> {
    let mut buf = FeatureBuf::new(
        uapi::VFIO_DEVICE_FEATURE_MIGRATION,
        uapi::VFIO_DEVICE_FEATURE_GET,
        uapi::vfio_device_feature_migration::default(),
    );
    match device_feature(device, &mut buf, "") {
        Ok(()) => Ok(Some(buf.data.flags)),
        Err(e) if e.errno() == Some(libc::ENOTTY) => Ok(None),
        Err(e) => Err(e),
    }
}

/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` get: the raw state.
pub(crate) fn device_mig_state(device: BorrowedFd<'_>) -> Result<u32> {
    let mut buf = FeatureBuf::new(
        uapi::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        uapi::VFIO_DEVICE_FEATURE_GET,
        uapi::vfio_device_feature_mig_state {
            device_state: 0,
            data_fd: -1,
        },
    );
    device_feature(device, &mut buf, "")?;
    Ok(buf.data.device_state)
}

/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` set: moves the device to `state`
/// (raw) and returns the data fd the last arc opened, if any.
pub(crate) fn device_set_mig_state(
    device: BorrowedFd<'_>,
    state: u32,
    state_name: &str,
) -> Result<Option<OwnedFd>> {
    let mut buf = FeatureBuf::new(
        uapi::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        uapi::VFIO_DEVICE_FEATURE_SET,
        uapi::vfio_device_feature_mig_state {
            device_state: state,
            data_fd: -1,
        },
    );
    device_feature(device, &mut buf, &format!(" to {state_name}"))?;
    if buf.data.data_fd < 0 {
        return Ok(None);
    }
    // SAFETY: on success with data_fd >= 0 the kernel installed a new file
    // descriptor for this process (the session's data fd) that nothing else
    // owns; it is ours to close.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(buf.data.data_fd) }))
}

/// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` get: the estimated STOP_COPY length.
pub(crate) fn device_mig_data_size(device: BorrowedFd<'_>) -> Result<u64> {
    let mut buf = FeatureBuf::new(
        uapi::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
        uapi::VFIO_DEVICE_FEATURE_GET,
        uapi::vfio_device_feature_mig_data_size::default(),
    );
    device_feature(device, &mut buf, "")?;
    Ok(buf.data.stop_copy_length)
}

/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` with `ranges` (already checked:
/// 1 ..= [`MAX_DMA_LOGGING_RANGES`] page-aligned, non-overlapping ranges).
/// Returns the page size the device chose.
pub(crate) fn device_dma_logging_start(
    device: BorrowedFd<'_>,
    page_size: u64,
    ranges: &[uapi::vfio_device_feature_dma_logging_range],
) -> Result<u64> {
    let mut buf = FeatureBuf::new(
        uapi::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        uapi::VFIO_DEVICE_FEATURE_SET,
        uapi::vfio_device_feature_dma_logging_control {
            page_size,
            num_ranges: u32::try_from(ranges.len()).unwrap_or(u32::MAX),
            __reserved: 0,
            ranges: ranges.as_ptr() as u64,
        },
    );
    // The kernel reads num_ranges entries at `ranges`: exactly the slice,
    // which outlives the call.
    device_feature(
        device,
        &mut buf,
        &format!(" of {} ranges at {page_size:#x}-byte pages", ranges.len()),
    )?;
    Ok(buf.data.page_size)
}

/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`.
pub(crate) fn device_dma_logging_stop(device: BorrowedFd<'_>) -> Result<()> {
    let mut buf = FeatureBuf::new(
        uapi::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
        uapi::VFIO_DEVICE_FEATURE_SET,
        (),
    );
    device_feature(device, &mut buf, "")
}

/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` into `bitmap`, which the caller
/// sized for `length / page_size` bits (checked before).
pub(crate) fn device_dma_logging_report(
    device: BorrowedFd<'_>,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> Result<()> {
    let mut buf = FeatureBuf::new(
        uapi::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        uapi::VFIO_DEVICE_FEATURE_GET,
        uapi::vfio_device_feature_dma_logging_report {
            iova,
            length,
            page_size,
            bitmap: bitmap.as_mut_ptr() as u64,
        },
    );
    // The kernel sets bits for at most length / page_size pages: the caller
    // checked that `bitmap` holds that many, and it outlives the call.
    device_feature(
        device,
        &mut buf,
        &format!(" of {length:#x} bytes at IOVA {iova:#x}"),
    )
}

/// `VFIO_MIG_GET_PRECOPY_INFO` on a data fd.
pub(crate) fn mig_precopy_info(data_fd: BorrowedFd<'_>) -> Result<(u64, u64)> {
    let mut info = uapi::vfio_precopy_info {
        argsz: std::mem::size_of::<uapi::vfio_precopy_info>() as u32,
        ..Default::default()
    };
    // SAFETY: `info` is a complete vfio_precopy_info with argsz = its size;
    // the kernel writes back the two byte counts only.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&data_fd, VFIO_MIG_GET_PRECOPY_INFO, &mut info)
    };
    if ret < 0 {
        return Err(ioctl_error("VFIO_MIG_GET_PRECOPY_INFO"));
    }
    Ok((info.initial_bytes, info.dirty_bytes))
}

/// `VFIO_IOMMU_DIRTY_PAGES` with `VFIO_IOMMU_DIRTY_PAGES_FLAG_START` or
/// `_STOP`.
pub(crate) fn iommu_dirty_pages(container: BorrowedFd<'_>, flag: u32) -> Result<()> {
    let mut buf = FeatureBuf::new(0, flag, ());
    // SAFETY: `buf` is a vfio_iommu_type1_dirty_bitmap header with argsz = its
    // size and no data; START and STOP read nothing more and write nothing.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&container, VFIO_IOMMU_DIRTY_PAGES, &mut buf)
    };
    if ret < 0 {
        let what = if flag == uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_START {
            "START"
        } else {
            "STOP"
        };
        return Err(ioctl_error(format!("VFIO_IOMMU_DIRTY_PAGES {what}")));
    }
    Ok(())
}

/// The `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP` call for `size` bytes at
/// `iova`, one bit per `pgsize`, into `bitmap_bytes` bytes at `data`.
pub(crate) fn dirty_bitmap_get(
    iova: u64,
    size: u64,
    pgsize: u64,
    bitmap_bytes: u64,
    data: u64,
) -> DirtyBitmapGet {
    DirtyBitmapGet {
        argsz: std::mem::size_of::<DirtyBitmapGet>() as u32,
        flags: uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
        iova,
        size,
        pgsize,
        bitmap_bytes,
        data,
    }
}

/// `VFIO_IOMMU_DIRTY_PAGES` `GET_BITMAP` into `bitmap` (sized by the
/// caller for `size / pgsize` bits, checked before).
pub(crate) fn iommu_dirty_get_bitmap(
    container: BorrowedFd<'_>,
    iova: u64,
    size: u64,
    pgsize: u64,
    bitmap: &mut [u64],
) -> Result<()> {
    let bytes = (bitmap.len() as u64).saturating_mul(8);
    let mut get = dirty_bitmap_get(iova, size, pgsize, bytes, bitmap.as_mut_ptr() as u64);
    // SAFETY: `get` is the header plus vfio_iommu_type1_dirty_bitmap_get with
    // argsz = their size; the kernel writes at most `bytes` bytes at `data`,
    // which is `bitmap`, borrowed mutably for the call.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(&container, VFIO_IOMMU_DIRTY_PAGES, &mut get)
    };
    if ret < 0 {
        return Err(ioctl_error(format!(
            "VFIO_IOMMU_DIRTY_PAGES GET_BITMAP of {size:#x} bytes at IOVA {iova:#x} \
             ({pgsize:#x}-byte pages)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a native-endian buffer field by field, as the kernel lays it out.
    struct Buf(Vec<u8>);

    impl Buf {
        fn new(len: usize) -> Self {
            Buf(vec![0; len])
        }
        fn u16(&mut self, off: usize, v: u16) -> &mut Self {
            self.0[off..off + 2].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn u32(&mut self, off: usize, v: u32) -> &mut Self {
            self.0[off..off + 4].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn u64(&mut self, off: usize, v: u64) -> &mut Self {
            self.0[off..off + 8].copy_from_slice(&v.to_ne_bytes());
            self
        }
        fn cap(&mut self, off: usize, id: u16, version: u16, next: u32) -> &mut Self {
            self.u16(off, id).u16(off + 2, version).u32(off + 4, next)
        }
        /// `struct vfio_region_info` at offset 0.
        fn region(
            &mut self,
            flags: u32,
            index: u32,
            cap_offset: u32,
            size: u64,
            offset: u64,
        ) -> &mut Self {
            let argsz = self.0.len() as u32;
            self.u32(0, argsz)
                .u32(4, flags)
                .u32(8, index)
                .u32(12, cap_offset)
                .u64(16, size)
                .u64(24, offset)
        }
    }

    const CAPS: u32 = uapi::VFIO_REGION_INFO_FLAG_CAPS;
    const RW_MMAP: u32 = uapi::VFIO_REGION_INFO_FLAG_READ
        | uapi::VFIO_REGION_INFO_FLAG_WRITE
        | uapi::VFIO_REGION_INFO_FLAG_MMAP;

    fn invalid_data(e: &Error) -> bool {
        matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::InvalidData)
    }

    #[test]
    fn region_info_without_caps_flag_ignores_cap_offset() {
        // Without VFIO_REGION_INFO_FLAG_CAPS the kernel reports no chain, so a
        // stale cap_offset must not be followed.
        let mut b = Buf::new(REGION_INFO_LEN);
        b.region(RW_MMAP, 2, 0x20, 0x1000, 2 << 40);
        let info = parse_region_info(&b.0).unwrap();
        assert_eq!(info.index, 2);
        assert_eq!(info.flags, RW_MMAP);
        assert_eq!(info.size, 0x1000);
        assert_eq!(info.offset, 2 << 40);
        assert!(info.caps.is_empty());
    }

    #[test]
    fn region_info_decodes_sparse_mmap_type_msix_and_keeps_unknown_caps() {
        // Layout per vfio.h: region info (32) | sparse mmap cap (16 + 2*16)
        // | msix-mappable (8) | type (16) | unknown id 0x77 (8).
        let sparse = 32;
        let msix = sparse + 16 + 32;
        let ty = msix + 8;
        let unknown = ty + 16;
        let len = unknown + 8;
        let mut b = Buf::new(len);
        b.region(RW_MMAP | CAPS, 0, sparse as u32, 0x10000, 0);
        b.cap(sparse, 1, 1, msix as u32)
            .u32(sparse + 8, 2)
            .u64(sparse + 16, 0)
            .u64(sparse + 24, 0x3000)
            .u64(sparse + 32, 0x4000)
            .u64(sparse + 40, 0xc000);
        b.cap(msix, 3, 1, ty as u32);
        b.cap(ty, 2, 1, unknown as u32)
            .u32(ty + 8, uapi::VFIO_REGION_TYPE_PCI_VENDOR_TYPE | 0x8086)
            .u32(ty + 12, 1);
        b.cap(unknown, 0x77, 3, 0);
        let info = parse_region_info(&b.0).unwrap();
        assert_eq!(
            info.caps,
            vec![
                RegionCap::SparseMmap(vec![
                    SparseArea {
                        offset: 0,
                        size: 0x3000
                    },
                    SparseArea {
                        offset: 0x4000,
                        size: 0xc000
                    },
                ]),
                RegionCap::MsixMappable,
                RegionCap::Type {
                    type_: uapi::VFIO_REGION_TYPE_PCI_VENDOR_TYPE | 0x8086,
                    subtype: 1
                },
                RegionCap::Unknown {
                    id: 0x77,
                    version: 3
                },
            ]
        );
        assert!(info.msix_mappable());
        assert_eq!(info.mmap_areas().len(), 2);
    }

    #[test]
    fn region_info_with_caps_that_did_not_fit_reports_no_caps() {
        // The kernel sets FLAG_CAPS, raises argsz and leaves cap_offset 0 when
        // the chain does not fit in the caller's buffer.
        let mut b = Buf::new(REGION_INFO_LEN);
        b.region(RW_MMAP | CAPS, 0, 0, 0x1000, 0);
        let info = parse_region_info(&b.0).unwrap();
        assert!(info.caps.is_empty());
    }

    #[test]
    fn capability_chain_that_loops_is_refused() {
        let mut b = Buf::new(48);
        b.region(CAPS, 0, 32, 0, 0);
        b.cap(32, 3, 1, 40);
        b.cap(40, 3, 1, 32);
        let e = parse_region_info(&b.0).unwrap_err();
        assert!(invalid_data(&e), "{e}");
        assert!(e.to_string().contains("loops"), "{e}");
    }

    #[test]
    fn capability_pointing_to_itself_is_refused() {
        let mut b = Buf::new(40);
        b.region(CAPS, 0, 32, 0, 0);
        b.cap(32, 3, 1, 32);
        assert!(invalid_data(&parse_region_info(&b.0).unwrap_err()));
    }

    #[test]
    fn capability_past_the_end_of_the_buffer_is_refused() {
        let mut b = Buf::new(40);
        b.region(CAPS, 0, 32, 0, 0);
        b.cap(32, 3, 1, 36); // next header would span 36..44 > 40
        let e = parse_region_info(&b.0).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
        let mut b = Buf::new(40);
        b.region(CAPS, 0, 0xffff_fff0, 0, 0);
        assert!(invalid_data(&parse_region_info(&b.0).unwrap_err()));
    }

    #[test]
    fn capability_inside_the_fixed_structure_is_refused() {
        let mut b = Buf::new(48);
        b.region(CAPS, 0, 8, 0, 0);
        let e = parse_region_info(&b.0).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
    }

    #[test]
    fn capability_chain_is_bounded_by_argsz_not_buffer_length() {
        // The kernel only vouches for argsz bytes; a cap beyond them is refused
        // even though the (larger) buffer would hold it.
        let mut b = Buf::new(64);
        b.region(CAPS, 0, 40, 0, 0);
        b.u32(0, 40); // argsz
        b.cap(40, 3, 1, 0);
        assert!(invalid_data(&parse_region_info(&b.0).unwrap_err()));
    }

    #[test]
    fn sparse_mmap_with_more_areas_than_the_buffer_holds_is_refused() {
        let mut b = Buf::new(32 + 16 + 16);
        b.region(CAPS | RW_MMAP, 0, 32, 0x1000, 0);
        b.cap(32, 1, 1, 0).u32(40, 2); // two areas claimed, one present
        let e = parse_region_info(&b.0).unwrap_err();
        assert!(e.to_string().contains("2 areas"), "{e}");
        let mut b = Buf::new(32 + 16);
        b.region(CAPS | RW_MMAP, 0, 32, 0x1000, 0);
        b.cap(32, 1, 1, 0).u32(40, u32::MAX);
        assert!(invalid_data(&parse_region_info(&b.0).unwrap_err()));
    }

    #[test]
    fn truncated_type_capability_is_refused() {
        let mut b = Buf::new(32 + 12);
        b.region(CAPS, 0, 32, 0, 0);
        b.cap(32, 2, 1, 0);
        assert!(invalid_data(&parse_region_info(&b.0).unwrap_err()));
    }

    #[test]
    fn region_info_shorter_than_the_structure_or_argsz_is_refused() {
        assert!(invalid_data(&parse_region_info(&[0u8; 16]).unwrap_err()));
        let mut b = Buf::new(32);
        b.region(0, 0, 0, 0, 0);
        b.u32(0, 8);
        assert!(invalid_data(&parse_region_info(&b.0).unwrap_err()));
    }

    #[test]
    fn iommu_info_reports_iova_ranges_and_dma_avail() {
        // vfio_iommu_type1_info (24) | IOVA range cap (16 + 2*16) | DMA avail (12).
        let iova = 24;
        let avail = iova + 48;
        let mut b = Buf::new(avail + 12);
        let argsz = b.0.len() as u32;
        b.u32(0, argsz)
            .u32(
                4,
                uapi::VFIO_IOMMU_INFO_PGSIZES | uapi::VFIO_IOMMU_INFO_CAPS,
            )
            .u64(8, 0x4000_1000)
            .u32(16, iova as u32);
        b.cap(iova, 1, 1, avail as u32)
            .u32(iova + 8, 2)
            .u64(iova + 16, 0)
            .u64(iova + 24, 0xfedf_ffff)
            .u64(iova + 32, 0xfef0_0000)
            .u64(iova + 40, (1 << 48) - 1);
        b.cap(avail, 3, 1, 0).u32(avail + 8, 65535);
        let info = parse_iommu_type1_info(&b.0).unwrap();
        assert_eq!(info.iova_pgsizes, 0x4000_1000);
        assert_eq!(
            info.iova_ranges,
            Some(vec![0..=0xfedf_ffff, 0xfef0_0000..=(1 << 48) - 1])
        );
        assert_eq!(info.dma_avail, Some(65535));
    }

    #[test]
    fn iommu_info_without_caps_has_no_iova_ranges() {
        let mut b = Buf::new(24);
        b.u32(0, 24)
            .u32(4, uapi::VFIO_IOMMU_INFO_PGSIZES)
            .u64(8, 0x1000)
            .u32(16, 0);
        let info = parse_iommu_type1_info(&b.0).unwrap();
        assert_eq!(info.iova_ranges, None);
        assert_eq!(info.dma_avail, None);
    }

    #[test]
    fn iommu_info_with_an_inverted_iova_range_is_refused() {
        let mut b = Buf::new(24 + 32);
        b.u32(0, 56).u32(4, uapi::VFIO_IOMMU_INFO_CAPS).u32(16, 24);
        b.cap(24, 1, 1, 0)
            .u32(32, 1)
            .u64(40, 0x2000)
            .u64(48, 0x1000);
        assert!(invalid_data(&parse_iommu_type1_info(&b.0).unwrap_err()));
    }

    #[test]
    fn hot_reset_info_lists_groups_by_default() {
        let mut b = Buf::new(12 + 2 * 8);
        b.u32(0, 28).u32(4, 0).u32(8, 2);
        b.u32(12, 7).u16(16, 0).0[18] = 0x03;
        b.0[19] = (2 << 3) | 1;
        b.u32(20, 9).u16(24, 1).0[26] = 0x80;
        b.0[27] = 0;
        let info = parse_hot_reset_info(&b.0).unwrap();
        assert!(!info.by_dev_id());
        assert_eq!(info.devices.len(), 2);
        assert_eq!(info.devices[0].owner, DependentOwner::Group(7));
        assert_eq!(info.devices[0].to_string(), "0000:03:02.1");
        assert_eq!(info.devices[1].to_string(), "0001:80:00.0");
        assert_eq!(info.group_ids(), vec![7, 9]);
    }

    #[test]
    fn hot_reset_info_with_dev_id_flag_decodes_owned_and_not_owned() {
        let flags = uapi::VFIO_PCI_HOT_RESET_FLAG_DEV_ID;
        let mut b = Buf::new(12 + 3 * 8);
        b.u32(0, 36).u32(4, flags).u32(8, 3);
        b.u32(12, 5);
        b.u32(20, uapi::VFIO_PCI_DEVID_OWNED);
        b.u32(28, uapi::VFIO_PCI_DEVID_NOT_OWNED as u32);
        let info = parse_hot_reset_info(&b.0).unwrap();
        assert!(info.by_dev_id());
        assert!(!info.all_owned());
        let owners: Vec<_> = info.devices.iter().map(|d| d.owner).collect();
        assert_eq!(
            owners,
            vec![
                DependentOwner::DevId(5),
                DependentOwner::OwnedNotOpened,
                DependentOwner::NotOwned
            ]
        );
        assert!(info.group_ids().is_empty());
    }

    #[test]
    fn hot_reset_info_with_a_count_past_the_buffer_is_refused() {
        let mut b = Buf::new(12 + 8);
        b.u32(0, 20).u32(8, 2);
        assert!(invalid_data(&parse_hot_reset_info(&b.0).unwrap_err()));
        let mut b = Buf::new(12);
        b.u32(0, 12).u32(8, u32::MAX);
        assert!(invalid_data(&parse_hot_reset_info(&b.0).unwrap_err()));
    }

    #[test]
    fn irq_set_layout_matches_vfio_irq_set_with_eventfd_data() {
        // struct vfio_irq_set { argsz, flags, index, start, count, data[] }:
        // a sub-range starting at vector 3 with an eventfd and a detach (-1).
        let mut words = [0u32; 7];
        let flags = uapi::VFIO_IRQ_SET_DATA_EVENTFD | uapi::VFIO_IRQ_SET_ACTION_TRIGGER;
        fill_irq_set(&mut words, flags, 2, 3, 2, &[17, -1]);
        assert_eq!(words, [28, flags, 2, 3, 2, 17, u32::MAX]);
    }

    #[test]
    fn irq_set_disable_is_data_none_trigger_with_count_zero() {
        let mut words = [0u32; 5];
        let flags = uapi::VFIO_IRQ_SET_DATA_NONE | uapi::VFIO_IRQ_SET_ACTION_TRIGGER;
        fill_irq_set(&mut words, flags, 1, 0, 0, &[]);
        assert_eq!(words, [20, flags, 1, 0, 0]);
    }

    #[test]
    fn hot_reset_layout_is_header_then_group_fds() {
        // struct vfio_pci_hot_reset { argsz, flags, count, __s32 group_fds[] }.
        assert_eq!(encode_hot_reset(&[5, 9]).unwrap(), vec![20, 0, 2, 5, 9]);
        // The cdev/iommufd form: no group fds at all.
        assert_eq!(encode_hot_reset(&[]).unwrap(), vec![12, 0, 0]);
    }

    #[test]
    fn device_feature_calls_are_header_then_data_with_argsz_of_both() {
        // struct vfio_device_feature { argsz, flags, data[] }: flags carry the
        // feature number in the low 16 bits and GET/SET/PROBE above.
        let b = FeatureBuf::new(
            uapi::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            uapi::VFIO_DEVICE_FEATURE_SET,
            uapi::vfio_device_feature_mig_state {
                device_state: 3,
                data_fd: -1,
            },
        );
        assert_eq!(b.argsz, 16);
        assert_eq!(b.flags, 2 | (1 << 17));
        let p = FeatureBuf::new(
            uapi::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            uapi::VFIO_DEVICE_FEATURE_PROBE | uapi::VFIO_DEVICE_FEATURE_SET,
            (),
        );
        assert_eq!(p.argsz, 8);
        assert_eq!(p.flags, 6 | (1 << 17) | (1 << 18));
        let r = FeatureBuf::new(
            uapi::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            uapi::VFIO_DEVICE_FEATURE_GET,
            uapi::vfio_device_feature_dma_logging_report::default(),
        );
        assert_eq!(r.argsz, 8 + 32);
        assert_eq!(r.flags, 8 | (1 << 16));
    }

    #[test]
    fn dirty_bitmap_get_is_the_header_then_range_then_vfio_bitmap() {
        // vfio_iommu_type1_dirty_bitmap { argsz, flags } then
        // vfio_iommu_type1_dirty_bitmap_get { iova, size, { pgsize, size, data } }.
        let g = dirty_bitmap_get(0x10000, 0x8000, 0x1000, 8, 0xdead_0000);
        assert_eq!(g.argsz, 48);
        assert_eq!(g.flags, uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP);
        assert_eq!(
            (g.iova, g.size, g.pgsize, g.bitmap_bytes, g.data),
            (0x10000, 0x8000, 0x1000, 8, 0xdead_0000)
        );
    }

    #[test]
    fn iommu_info_reports_the_migration_capability() {
        // vfio_iommu_type1_info (24) | migration cap (32): header, flags, pad,
        // pgsize_bitmap, max_dirty_bitmap_size.
        let mut b = Buf::new(24 + 32);
        b.u32(0, 56).u32(4, uapi::VFIO_IOMMU_INFO_CAPS).u32(16, 24);
        b.cap(24, uapi::VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION as u16, 1, 0)
            .u32(32, 0)
            .u64(40, 0x4020_3000)
            .u64(48, 1 << 28);
        let cap = parse_iommu_type1_info(&b.0)
            .unwrap()
            .dirty_tracking
            .unwrap();
        assert_eq!(cap.pgsize_bitmap, 0x4020_3000);
        assert_eq!(cap.max_dirty_bitmap_size, 1 << 28);
        // GET_BITMAP accepts only the smallest page size.
        assert_eq!(cap.report_page_size(), Some(0x1000));
        let mut t = Buf::new(24 + 24);
        t.u32(0, 48).u32(4, uapi::VFIO_IOMMU_INFO_CAPS).u32(16, 24);
        t.cap(24, uapi::VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION as u16, 1, 0);
        assert!(invalid_data(&parse_iommu_type1_info(&t.0).unwrap_err()));
    }

    #[test]
    fn migration_feature_on_a_device_without_it_is_none_and_state_calls_fail_with_enotty() {
        // The kernel answers ENOTTY for a feature the device lacks (no mig_ops,
        // no log_ops): the flags are "cannot migrate", a probe is "no".
        use std::os::fd::AsFd;
        let f = tempfile::tempfile().unwrap();
        assert_eq!(device_migration_flags(f.as_fd()).unwrap(), None);
        assert!(!device_feature_probe(
            f.as_fd(),
            uapi::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            uapi::VFIO_DEVICE_FEATURE_SET
        )
        .unwrap());
        let e = device_set_mig_state(f.as_fd(), 3, "STOP_COPY").unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTTY));
        assert!(
            e.to_string()
                .contains("VFIO_DEVICE_FEATURE MIG_DEVICE_STATE set to STOP_COPY"),
            "{e}"
        );
        let e = mig_precopy_info(f.as_fd()).unwrap_err();
        assert!(e.to_string().contains("VFIO_MIG_GET_PRECOPY_INFO"), "{e}");
    }

    #[test]
    fn ioctl_numbers_match_the_uapi_header() {
        // _IO(';', 100 + n) with _IOC_NONE = 0 on x86/arm: (0x3b << 8) | nr.
        #[cfg(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64"
        ))]
        {
            assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
            assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
            assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
            assert_eq!(VFIO_IOMMU_GET_INFO, 0x3b70);
            assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
            assert_eq!(VFIO_DEVICE_PCI_HOT_RESET, 0x3b71);
            assert_eq!(VFIO_DEVICE_FEATURE, 0x3b75);
            assert_eq!(VFIO_IOMMU_DIRTY_PAGES, 0x3b75);
            assert_eq!(VFIO_MIG_GET_PRECOPY_INFO, 0x3b79);
        }
    }

    #[test]
    fn ioctls_on_a_non_vfio_fd_fail_with_the_ioctl_name_and_errno() {
        use std::os::fd::AsFd;
        let f = tempfile::tempfile().unwrap();
        let e = device_get_info(f.as_fd()).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTTY));
        assert!(e.to_string().contains("VFIO_DEVICE_GET_INFO"), "{e}");
        let e = device_get_region_info(f.as_fd(), 7).unwrap_err();
        assert!(e.to_string().contains("region 7"), "{e}");
        let e = device_set_irqs(f.as_fd(), 0, 2, 5, 1, &[-1]).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTTY));
        assert!(e.to_string().contains("vectors 5..6"), "{e}");
    }
}
