//! VFIO group nodes: finding `/dev/vfio/<group>`, opening VFIO character devices, and the
//! group's viability (`VFIO_GROUP_GET_STATUS`). Used by the scenarios and the CLI runner; it
//! imports no other module of this crate.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const VFIO_GROUP_GET_STATUS: u64 = 0x3b67;
/// `VFIO_GROUP_FLAGS_VIABLE` of `struct vfio_group_status`.
pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;

/// `struct vfio_group_status`.
#[repr(C)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

/// Opens a VFIO character device read-write, close-on-exec.
pub fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// The device node of an IOMMU group: `/dev/vfio/<g>`, or `/dev/vfio/noiommu-<g>`.
pub fn group_node(group: &str) -> Option<PathBuf> {
    [
        format!("/dev/vfio/{group}"),
        format!("/dev/vfio/noiommu-{group}"),
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

/// `VFIO_GROUP_GET_STATUS` of IOMMU group `group` (its `/dev/vfio` node is opened and closed
/// again before this returns): the `VFIO_GROUP_FLAGS_*` bits.
pub fn group_status_flags(group: &str) -> Result<u32> {
    let node = group_node(group).with_context(|| format!("group {group} has no /dev/vfio node"))?;
    let file = open_rw(&node)?;
    let mut status = GroupStatus {
        argsz: std::mem::size_of::<GroupStatus>() as u32,
        flags: 0,
    };
    // SAFETY: VFIO_GROUP_GET_STATUS writes at most `argsz` bytes into the `vfio_group_status`
    // it is given; `status` is that struct (repr(C)), alive and exclusively borrowed for the call.
    let r = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            VFIO_GROUP_GET_STATUS as _,
            &mut status as *mut GroupStatus,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("VFIO_GROUP_GET_STATUS");
    }
    Ok(status.flags)
}

/// Whether the kernel says IOMMU group `group` is viable (`VFIO_GROUP_GET_STATUS`), opening
/// and closing its `/dev/vfio` node meanwhile.
pub fn group_viable(group: &str) -> Result<bool> {
    Ok(group_status_flags(group)? & VFIO_GROUP_FLAGS_VIABLE != 0)
}
