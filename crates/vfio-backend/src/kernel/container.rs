//! The legacy VFIO container (`/dev/vfio/vfio`) and its groups
//! (`/dev/vfio/N`, `/dev/vfio/noiommu-N`).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use vfio_bindings::bindings::vfio as uapi;

use super::ioctls::{self, DirtyTrackingCap, IommuInfo};
use super::migration::check_bitmap_request;
use super::sysfs::SysfsDevice;
use super::{check_dma_args, open_node, prefix_error, IommuMode, DEV_VFIO};
use crate::{DmaSource, DomainId, Error, IommuDomain, Result};

/// What the container tracks about its groups.
#[derive(Debug, Default)]
struct ContainerState {
    /// Groups attached to the container, by number. An entry whose group is
    /// being dropped stays until its `Drop` has detached it.
    groups: HashMap<u32, Weak<KernelGroup>>,
    /// `VFIO_SET_IOMMU` has been done (it needs a first group, and the kernel
    /// forgets it when the last group leaves).
    iommu_set: bool,
}

/// A legacy VFIO container: one IOMMU address space shared by every group
/// attached to it, so one set of DMA mappings serves all their devices: it
/// is their [`IommuDomain`]. The kernel drops every mapping when the last
/// group leaves the container; until then a mapping stays, whichever
/// device goes.
///
/// Created with [`KernelContainer::new`] (type1v2 IOMMU) or
/// [`KernelContainer::new_noiommu`] (explicit opt-in to no-IOMMU mode), and
/// shared by `Arc`: each [`KernelGroup`] and hence each [`KernelDevice`](super::KernelDevice)
/// holds a reference.
#[derive(Debug)]
pub struct KernelContainer {
    file: File,
    mode: IommuMode,
    dev_dir: PathBuf,
    state: Mutex<ContainerState>,
    id: DomainId,
}

impl KernelContainer {
    /// Opens `/dev/vfio/vfio` as a type1v2 container (the IOMMU driver of
    /// every x86 and Arm host with an IOMMU).
    pub fn new() -> Result<Arc<KernelContainer>> {
        Self::open_at(DEV_VFIO, IommuMode::Type1v2)
    }

    /// Opens `/dev/vfio/vfio` as a no-IOMMU container: the explicit opt-in
    /// for devices in `noiommu-N` groups. Such devices can DMA anywhere in
    /// host memory; the kernel allows it only with the `vfio` module's
    /// `enable_unsafe_noiommu_mode=1` and to `CAP_SYS_RAWIO` holders, and
    /// [`IommuDomain::map`] is unsupported.
    pub fn new_noiommu() -> Result<Arc<KernelContainer>> {
        Self::open_at(DEV_VFIO, IommuMode::NoIommu)
    }

    /// Opens the container in `dev_vfio` (normally `/dev/vfio`) for `mode`.
    /// Groups are then looked up in the same directory.
    pub fn open_at(dev_vfio: impl AsRef<Path>, mode: IommuMode) -> Result<Arc<KernelContainer>> {
        let dev_dir = dev_vfio.as_ref().to_path_buf();
        let file = open_node(&dev_dir.join("vfio"))?;
        let version = ioctls::get_api_version(file.as_fd())?;
        if version != uapi::VFIO_API_VERSION as i32 {
            return Err(Error::Unsupported(format!(
                "VFIO API version {version} (this crate speaks version {})",
                uapi::VFIO_API_VERSION
            )));
        }
        let (extension, hint) = match mode {
            IommuMode::Type1v2 => (
                uapi::VFIO_TYPE1v2_IOMMU,
                "the type1v2 IOMMU driver is missing (is an IOMMU enabled, e.g. intel_iommu=on, \
                 and vfio_iommu_type1 loaded?)",
            ),
            IommuMode::NoIommu => (
                uapi::VFIO_NOIOMMU_IOMMU,
                "no-IOMMU mode is off (load vfio with enable_unsafe_noiommu_mode=1)",
            ),
        };
        if !ioctls::check_extension(file.as_fd(), extension)? {
            return Err(Error::Unsupported(format!(
                "{}: {hint}",
                dev_dir.join("vfio").display()
            )));
        }
        Ok(Arc::new(KernelContainer {
            file,
            mode,
            dev_dir,
            state: Mutex::new(ContainerState::default()),
            id: DomainId::new_unique(),
        }))
    }

    /// The container's IOMMU mode.
    pub fn mode(&self) -> IommuMode {
        self.mode
    }

    fn state(&self) -> MutexGuard<'_, ContainerState> {
        // The state stays consistent across a panic in another thread (each
        // update is one insert/remove), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Refuses a device whose group does not match `mode`.
    pub(crate) fn check_mode_for(dev: &SysfsDevice, mode: IommuMode) -> Result<()> {
        match (dev.noiommu, mode) {
            (true, IommuMode::Type1v2) => Err(Error::Unsupported(format!(
                "{} is in no-IOMMU group {} (/dev/vfio/noiommu-{}): its DMA is not isolated; \
                 opt in with KernelContainer::new_noiommu() to use it anyway",
                dev.name, dev.group_id, dev.group_id
            ))),
            (false, IommuMode::NoIommu) => Err(Error::InvalidArgument(format!(
                "{} is in IOMMU group {}, which a no-IOMMU container cannot hold; \
                 use KernelContainer::new()",
                dev.name, dev.group_id
            ))),
            _ => Ok(()),
        }
    }

    /// The group `group_id` attached to this container: the one already
    /// open, or `/dev/vfio/<group_id>` (`noiommu-<group_id>` in no-IOMMU
    /// mode) opened, checked viable and attached now.
    pub fn open_group(self: &Arc<Self>, group_id: u32) -> Result<Arc<KernelGroup>> {
        let mut state = self.state();
        if let Some(group) = state.groups.get(&group_id).and_then(Weak::upgrade) {
            return Ok(group);
        }
        let name = match self.mode {
            IommuMode::Type1v2 => group_id.to_string(),
            IommuMode::NoIommu => format!("noiommu-{group_id}"),
        };
        let path = self.dev_dir.join(&name);
        let file = open_node(&path)?;
        let at = |e: Error| prefix_error(e, &path.display().to_string());
        let status = ioctls::group_status(file.as_fd()).map_err(at)?;
        if status & uapi::VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::NotAvailable {
                path: path.display().to_string(),
                source: std::io::Error::other(format!(
                    "group {group_id} is not viable: every device in \
                     /sys/kernel/iommu_groups/{group_id}/devices must be bound to vfio-pci \
                     (or to no driver)"
                )),
            });
        }
        if status & uapi::VFIO_GROUP_FLAGS_CONTAINER_SET != 0 {
            return Err(Error::InvalidArgument(format!(
                "{} is already attached to another container",
                path.display()
            )));
        }
        ioctls::group_set_container(file.as_fd(), self.file.as_fd()).map_err(at)?;
        if !state.iommu_set {
            let iommu_type = match self.mode {
                IommuMode::Type1v2 => uapi::VFIO_TYPE1v2_IOMMU,
                IommuMode::NoIommu => uapi::VFIO_NOIOMMU_IOMMU,
            };
            if let Err(e) = ioctls::set_iommu(self.file.as_fd(), iommu_type) {
                if let Err(undo) = ioctls::group_unset_container(file.as_fd()) {
                    log::warn!("{}: {undo}", path.display());
                }
                return Err(at(e));
            }
            state.iommu_set = true;
        }
        let group = Arc::new(KernelGroup {
            file: ManuallyDrop::new(file),
            id: group_id,
            container: Arc::clone(self),
        });
        state.groups.insert(group_id, Arc::downgrade(&group));
        Ok(group)
    }

    /// The groups currently attached (and alive), in ascending order.
    pub fn groups(&self) -> Vec<Arc<KernelGroup>> {
        let mut groups: Vec<Arc<KernelGroup>> = self
            .state()
            .groups
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        groups.sort_by_key(|g| g.id);
        groups
    }

    fn require_iommu(&self, what: &str) -> Result<()> {
        if self.mode == IommuMode::NoIommu {
            return Err(Error::Unsupported(format!(
                "{what}: this is a no-IOMMU container: there is no IOMMU to translate or \
                 restrict the device's DMA, which uses host physical addresses directly"
            )));
        }
        if !self.state().iommu_set {
            return Err(Error::InvalidArgument(format!(
                "{what}: no group is attached to the container yet (open a device first)"
            )));
        }
        Ok(())
    }

    /// `VFIO_IOMMU_GET_INFO`: page sizes and IOVA ranges of the container's
    /// IOMMU (needs an attached group).
    pub fn iommu_info(&self) -> Result<IommuInfo> {
        self.require_iommu("VFIO_IOMMU_GET_INFO")?;
        ioctls::iommu_get_info(self.file.as_fd())
    }

    /// The container's dirty tracking capability
    /// (`VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION`).
    fn dirty_cap(&self, what: &str) -> Result<DirtyTrackingCap> {
        self.require_iommu(what)?;
        let cap = ioctls::iommu_get_info(self.file.as_fd())?
            .dirty_tracking
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "{what}: the container's type1 IOMMU does not report \
                     VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION (a kernel without type1 dirty page \
                     tracking)"
                ))
            })?;
        if cap.report_page_size().is_none() {
            return Err(Error::Unsupported(format!(
                "{what}: the container reports dirty tracking with no page size"
            )));
        }
        Ok(cap)
    }
}

impl IommuDomain for KernelContainer {
    fn id(&self) -> DomainId {
        self.id
    }

    /// Maps `size` bytes at `host.host_addr` in this process to `iova` for
    /// every device in the container (`VFIO_IOMMU_MAP_DMA`); the device may
    /// write there unless `host.read_only`. Addresses and size must be
    /// page aligned. Unsupported in no-IOMMU mode.
    ///
    /// # Safety
    ///
    /// As [`IommuDomain::map`]: the kernel pins the pages and the device
    /// reaches them until they are unmapped.
    unsafe fn map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        self.require_iommu("DMA map")?;
        check_dma_args(iova, size, host.host_addr)?;
        let flags = dma_map_flags(host.read_only);
        ioctls::iommu_map_dma(self.file.as_fd(), iova, size, host.host_addr, flags)
    }

    /// Unmaps `iova .. iova + size` (`VFIO_IOMMU_UNMAP_DMA`). The range must
    /// cover whole earlier mappings; unmapping less than `size` bytes (parts
    /// of the range were not mapped) is reported as an error.
    fn unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.require_iommu("DMA unmap")?;
        check_dma_args(iova, size, 0)?;
        let done = ioctls::iommu_unmap_dma(self.file.as_fd(), iova, size)?;
        if done != size {
            return Err(Error::InvalidArgument(format!(
                "VFIO_IOMMU_UNMAP_DMA of {size:#x} bytes at IOVA {iova:#x} unmapped {done:#x} \
                 bytes: parts of the range were not mapped"
            )));
        }
        Ok(())
    }

    /// The IOVA ranges [`IommuDomain::map`] accepts: those of the
    /// IOVA-range capability, or the whole 64-bit space when the kernel
    /// does not report it. Empty in no-IOMMU mode, where nothing can be
    /// mapped.
    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>> {
        if self.mode == IommuMode::NoIommu {
            return Ok(Vec::new());
        }
        Ok(self
            .iommu_info()?
            .iova_ranges
            .unwrap_or_else(|| vec![0..=u64::MAX]))
    }

    /// The one page size type1 reports dirty pages at: the smallest of the
    /// migration capability's `pgsize_bitmap` (the kernel refuses others).
    fn dirty_page_sizes(&self) -> Result<u64> {
        let cap = self.dirty_cap("dirty page tracking")?;
        Ok(cap.report_page_size().unwrap_or(0))
    }

    /// `VFIO_IOMMU_DIRTY_PAGES_FLAG_START`. While tracking, the kernel
    /// counts a page dirty when a pinned-scope device (an mdev whose vendor
    /// driver pins pages or uses `vfio_dma_rw`) wrote it; with any device
    /// that DMAs through the IOMMU without pinning (a vfio-pci function),
    /// type1 cannot see its writes and reports every mapped page dirty, on
    /// every report.
    fn dirty_tracking_start(&self) -> Result<()> {
        self.dirty_cap("VFIO_IOMMU_DIRTY_PAGES START")?;
        ioctls::iommu_dirty_pages(self.file.as_fd(), uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_START)
    }

    /// `VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP`.
    fn dirty_tracking_stop(&self) -> Result<()> {
        self.dirty_cap("VFIO_IOMMU_DIRTY_PAGES STOP")?;
        ioctls::iommu_dirty_pages(self.file.as_fd(), uapi::VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP)
    }

    /// `VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP`. The range must begin and
    /// end on mapping boundaries (the kernel refuses a range that cuts a
    /// mapping), `page_size` must be [`IommuDomain::dirty_page_sizes`], and
    /// the bitmap may not exceed the capability's `max_dirty_bitmap_size`
    /// (a range that needs more is refused: it cannot be split without
    /// knowing the mappings' boundaries).
    fn dirty_bitmap(&self, iova: u64, size: u64, page_size: u64, bitmap: &mut [u64]) -> Result<()> {
        const WHAT: &str = "VFIO_IOMMU_DIRTY_PAGES GET_BITMAP";
        let cap = self.dirty_cap(WHAT)?;
        let pgsize = cap.report_page_size().unwrap_or(0);
        if page_size != pgsize {
            return Err(Error::InvalidArgument(format!(
                "{WHAT}: page size {page_size:#x}: type1 reports dirty pages only at its \
                 smallest IOMMU page, {pgsize:#x} bytes"
            )));
        }
        let words = check_bitmap_request(WHAT, iova, size, page_size, bitmap.len())?;
        let bytes = (words as u64).saturating_mul(8);
        if bytes > cap.max_dirty_bitmap_size {
            return Err(Error::InvalidArgument(format!(
                "{WHAT}: {size:#x} bytes at IOVA {iova:#x} need a {bytes}-byte bitmap, more than \
                 the container's max_dirty_bitmap_size of {} bytes: ask for a smaller range",
                cap.max_dirty_bitmap_size
            )));
        }
        let bitmap = bitmap.get_mut(..words).unwrap_or_default();
        // The kernel writes only the words of the mappings in the range.
        bitmap.fill(0);
        ioctls::iommu_dirty_get_bitmap(self.file.as_fd(), iova, size, page_size, bitmap)
    }
}

/// `VFIO_DMA_MAP_FLAG_*` for a mapping: the flags say what the *device*
/// may do, so a read-only source is mapped with `READ` alone.
fn dma_map_flags(read_only: bool) -> u32 {
    if read_only {
        uapi::VFIO_DMA_MAP_FLAG_READ
    } else {
        uapi::VFIO_DMA_MAP_FLAG_READ | uapi::VFIO_DMA_MAP_FLAG_WRITE
    }
}

impl AsFd for KernelContainer {
    /// The container fd.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// An IOMMU group attached to a [`KernelContainer`], shared by `Arc` by the
/// devices opened from it. Its fd is what the KVM-VFIO device and
/// [`KernelDevice::hot_reset`](super::KernelDevice::hot_reset) need (`AsFd`). Dropping the last reference
/// detaches the group from the container and closes it.
#[derive(Debug)]
pub struct KernelGroup {
    file: ManuallyDrop<File>,
    id: u32,
    container: Arc<KernelContainer>,
}

impl KernelGroup {
    /// The IOMMU group number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The container the group is attached to.
    pub fn container(&self) -> &Arc<KernelContainer> {
        &self.container
    }
}

impl KernelGroup {
    /// The fd of device `name` of this group (`VFIO_GROUP_GET_DEVICE_FD`).
    pub(super) fn device_fd(&self, name: &str) -> Result<std::os::fd::OwnedFd> {
        let cname = CString::new(name).map_err(|_| {
            Error::InvalidArgument(format!("device name {name:?} contains a NUL byte"))
        })?;
        ioctls::group_get_device_fd(self.file.as_fd(), &cname)
            .map_err(|e| prefix_error(e, &format!("group {}", self.id)))
    }
}

impl AsFd for KernelGroup {
    /// The group fd.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for KernelGroup {
    fn drop(&mut self) {
        // Detach and close under the container lock, so that a concurrent
        // open of the same group sees either this group or none.
        let mut state = self.container.state();
        if let Err(e) = ioctls::group_unset_container(self.file.as_fd()) {
            log::warn!("group {}: {e}", self.id);
        }
        // SAFETY: `file` is not used after this point; this is the only place
        // it is taken.
        drop(unsafe { ManuallyDrop::take(&mut self.file) });
        if state
            .groups
            .get(&self.id)
            .is_some_and(|w| w.upgrade().is_none())
        {
            state.groups.remove(&self.id);
        }
        if state.groups.is_empty() {
            state.iommu_set = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_in_a_directory_without_vfio_is_not_available_and_names_the_node() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("no-dev-vfio");
        for mode in [IommuMode::Type1v2, IommuMode::NoIommu] {
            let e = KernelContainer::open_at(&dir, mode).unwrap_err();
            assert!(matches!(e, Error::NotAvailable { .. }), "{e}");
            assert_eq!(e.errno(), Some(libc::ENOENT));
            let msg = e.to_string();
            assert!(msg.contains("no-dev-vfio/vfio"), "{msg}");
            assert!(msg.contains("vfio-pci"), "{msg}");
        }
    }

    #[test]
    fn a_regular_file_is_not_a_vfio_container() {
        // Something that opens but does not speak VFIO fails with the ioctl's
        // name and errno, not a panic or a bogus success.
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("vfio"), b"").unwrap();
        let e = KernelContainer::open_at(root.path(), IommuMode::Type1v2).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTTY));
        assert!(e.to_string().contains("VFIO_GET_API_VERSION"), "{e}");
    }

    /// A container whose fd is a plain file, in `dev_dir`: enough to test
    /// everything up to the first container ioctl.
    fn fake_container(dev_dir: &Path, mode: IommuMode, iommu_set: bool) -> Arc<KernelContainer> {
        Arc::new(KernelContainer {
            file: tempfile::tempfile().unwrap(),
            mode,
            dev_dir: dev_dir.to_path_buf(),
            state: Mutex::new(ContainerState {
                groups: HashMap::new(),
                iommu_set,
            }),
            id: DomainId::new_unique(),
        })
    }

    fn source(addr: u64) -> DmaSource<'static> {
        DmaSource {
            host_addr: addr,
            file: None,
            read_only: false,
        }
    }

    /// Maps through a container that never reaches the IOMMU: its fd is
    /// a plain file, or its mode or state refuses first.
    fn try_map(c: &KernelContainer, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        // SAFETY: the container's fd is a plain file, so no ioctl maps
        // anything; no memory is handed to an IOMMU.
        unsafe { c.map(iova, size, host) }
    }

    #[test]
    fn dma_map_in_a_no_iommu_container_is_unsupported_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let c = fake_container(dir.path(), IommuMode::NoIommu, true);
        let page = super::super::page_size();
        let e = try_map(&c, 0, page, source(0)).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("no-IOMMU"), "{e}");
        assert!(matches!(c.unmap(0, page), Err(Error::Unsupported(_))));
        // Nothing can be mapped, so no IOVA range is usable.
        assert_eq!(c.iova_ranges().unwrap(), Vec::<RangeInclusive<u64>>::new());
    }

    #[test]
    fn dirty_tracking_in_a_no_iommu_container_is_unsupported_and_before_a_group_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = fake_container(dir.path(), IommuMode::NoIommu, false);
        let mut bitmap = [0u64; 1];
        for e in [
            c.dirty_page_sizes().unwrap_err(),
            c.dirty_tracking_start().unwrap_err(),
            c.dirty_bitmap(0, 4096, 4096, &mut bitmap).unwrap_err(),
        ] {
            assert!(matches!(e, Error::Unsupported(_)), "{e}");
            assert!(e.to_string().contains("no-IOMMU"), "{e}");
        }
        let c = fake_container(dir.path(), IommuMode::Type1v2, false);
        let e = c.dirty_tracking_start().unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }

    #[test]
    fn dma_map_before_any_group_is_attached_is_refused() {
        // The kernel only accepts VFIO_IOMMU_* once VFIO_SET_IOMMU was done,
        // which needs a group in the container.
        let dir = tempfile::tempdir().unwrap();
        let c = fake_container(dir.path(), IommuMode::Type1v2, false);
        let e = try_map(&c, 0, super::super::page_size(), source(0)).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("no group is attached")),
            "{e}"
        );
        assert_eq!(e.errno(), Some(libc::EINVAL));
        let e = c.iova_ranges().unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("no group is attached")),
            "{e}"
        );
    }

    #[test]
    fn dma_map_checks_arguments_then_issues_vfio_iommu_map_dma() {
        let dir = tempfile::tempdir().unwrap();
        let c = fake_container(dir.path(), IommuMode::Type1v2, true);
        let page = super::super::page_size();
        assert!(matches!(
            try_map(&c, 1, page, source(0)),
            Err(Error::InvalidArgument(_))
        ));
        let e = try_map(&c, page, page, source(2 * page)).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTTY));
        assert!(e.to_string().contains("VFIO_IOMMU_MAP_DMA"), "{e}");
        let e = c.unmap(page, page).unwrap_err();
        assert!(e.to_string().contains("VFIO_IOMMU_UNMAP_DMA"), "{e}");
    }

    #[test]
    fn read_only_dma_lets_the_device_read_but_not_write() {
        assert_eq!(dma_map_flags(true), uapi::VFIO_DMA_MAP_FLAG_READ);
        assert_eq!(
            dma_map_flags(false),
            uapi::VFIO_DMA_MAP_FLAG_READ | uapi::VFIO_DMA_MAP_FLAG_WRITE
        );
    }

    #[test]
    fn groups_are_opened_as_dev_vfio_n_or_noiommu_n_per_mode() {
        let dir = tempfile::tempdir().unwrap();
        let c = fake_container(dir.path(), IommuMode::Type1v2, false);
        let e = c.open_group(5).unwrap_err();
        assert!(matches!(e, Error::NotAvailable { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("{}/5:", dir.path().display())),
            "{e}"
        );
        let c = fake_container(dir.path(), IommuMode::NoIommu, false);
        let e = c.open_group(5).unwrap_err();
        assert!(e.to_string().contains("noiommu-5"), "{e}");
    }

    #[test]
    fn a_group_node_that_is_not_a_vfio_group_fails_at_get_status() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("9"), b"").unwrap();
        let c = fake_container(dir.path(), IommuMode::Type1v2, false);
        let e = c.open_group(9).unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENOTTY));
        assert!(e.to_string().contains("VFIO_GROUP_GET_STATUS"), "{e}");
        assert!(c.groups().is_empty());
    }

    fn probed(noiommu: bool) -> SysfsDevice {
        SysfsDevice {
            path: PathBuf::from("/sys/bus/pci/devices/0000:00:04.0"),
            name: "0000:00:04.0".into(),
            group_id: 5,
            noiommu,
        }
    }

    #[test]
    fn a_no_iommu_group_needs_the_explicit_no_iommu_container() {
        let e = KernelContainer::check_mode_for(&probed(true), IommuMode::Type1v2).unwrap_err();
        assert!(matches!(e, Error::Unsupported(_)), "{e}");
        assert!(e.to_string().contains("new_noiommu"), "{e}");
        KernelContainer::check_mode_for(&probed(true), IommuMode::NoIommu).unwrap();
    }

    #[test]
    fn an_iommu_group_is_refused_by_a_no_iommu_container() {
        let e = KernelContainer::check_mode_for(&probed(false), IommuMode::NoIommu).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        KernelContainer::check_mode_for(&probed(false), IommuMode::Type1v2).unwrap();
    }
}
