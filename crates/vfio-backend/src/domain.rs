//! [`IommuDomain`]: where DMA mappings live.
//!
//! The kernel keeps DMA mappings per IOMMU address space, not per device:
//! a legacy container (`/dev/vfio/vfio`) or an iommufd IOAS serves every
//! device attached to it, and a vfio-user connection serves its one
//! device. [`Vfio::iommu_domain`](crate::Vfio::iommu_domain) returns that
//! address space, shared: two devices of one container return the same
//! domain (equal [`IommuDomain::id`]), so a VMM maps guest RAM once per
//! domain and keeps it mapped while any device of the domain is attached.

use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{DmaSource, Error, RemoteDma, Result};

/// The identity of an [`IommuDomain`], unique in this process for the life
/// of the process (never reused). Two devices whose domains have equal ids
/// share their DMA mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(u64);

impl DomainId {
    /// A new id, different from every other id made in this process (an
    /// implementation of [`IommuDomain`] takes one when it is created).
    pub fn new_unique() -> DomainId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        DomainId(NEXT.fetch_add(1, Ordering::Relaxed))
    }

    /// The id as a number (for logs).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for DomainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "domain {}", self.0)
    }
}

/// One IOMMU address space: a legacy VFIO container
/// ([`KernelContainer`](crate::kernel::KernelContainer)), an iommufd IOAS
/// (`IommufdIoas`, feature `iommufd`), one vfio-user connection, or the
/// fake device's fake IOMMU. Its mappings serve every device attached to
/// it, and they outlive any one of those devices: unmapping is the
/// caller's business, not a device's.
///
/// All methods take `&self` and may be called from several threads.
pub trait IommuDomain: Send + Sync {
    /// The domain's identity: equal for every device of the domain.
    fn id(&self) -> DomainId;

    /// Maps `size` bytes at `iova` for the DMA of every device of the
    /// domain, from `host`: an address in this process, or (vfio-user, or
    /// an address of 0) a file and offset. The device may write there
    /// unless `host.read_only`.
    ///
    /// # Safety
    ///
    /// From this call until [`IommuDomain::unmap`] of the range has
    /// returned (or the domain is gone), the devices of the domain (and,
    /// for vfio-user, the backend on their behalf) read and, unless
    /// `host.read_only`, write that memory at any time, concurrently with
    /// this process. The caller promises that:
    /// - when `host.host_addr` is not 0, `host_addr .. host_addr + size`
    ///   is memory of this process, mapped readable (and writable unless
    ///   read-only), that stays mapped, at its size, until then, and that
    ///   nothing in this process relies on its contents not changing (no
    ///   Rust reference to it is alive, accesses are volatile, as with
    ///   vm-memory's guest memory);
    /// - when `host.file` is given, the file's range `offset .. offset +
    ///   size` may be read and written by the device the same way (a
    ///   vfio-user server maps it).
    unsafe fn map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()>;

    /// Maps `size` bytes at `iova` when that memory is not in this
    /// process: the device reaches it through `remote`, one blocking
    /// request per access (a vfio-user server's `DMA_MAP` without a file
    /// descriptor). A device that accepts such maps must make the requests
    /// outside any request handler the memory's owner waits on: the owner
    /// answers only after that handler returns (the fake device finishes
    /// such DMA on its own thread, busy until then, as hardware whose DMA
    /// completes after the doorbell write).
    ///
    /// The default refuses with [`Error::Unsupported`]: IOMMUs of real
    /// hardware need host memory to map.
    fn map_remote(
        &self,
        iova: u64,
        size: u64,
        read_only: bool,
        remote: Arc<dyn RemoteDma>,
    ) -> Result<()> {
        let _ = (iova, size, read_only, remote);
        Err(Error::Unsupported(
            "DMA mapping of memory reachable only by messages".into(),
        ))
    }

    /// Unmaps `iova .. iova + size` (whichever of [`IommuDomain::map`] and
    /// [`IommuDomain::map_remote`] made it). Once it returns, no device of
    /// the domain touches that memory any more.
    fn unmap(&self, iova: u64, size: u64) -> Result<()>;

    /// The IOVA ranges the domain accepts for [`IommuDomain::map`] now.
    /// They may shrink when a device joins the domain (an iommufd IOAS
    /// excludes the reserved regions of every attached device), so read
    /// them again after attaching one.
    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>>;

    /// The page sizes dirty tracking of this domain can report at, as a
    /// bitmap of sizes (bit `n` set: `1 << n` bytes); the type1
    /// `VFIO_IOMMU_DIRTY_PAGES` page sizes, or the iommufd domain's. The
    /// default fails with [`Error::Unsupported`]: the domain cannot track
    /// the pages its devices write.
    fn dirty_page_sizes(&self) -> Result<u64> {
        Err(Error::Unsupported(
            "dirty tracking in this IOMMU domain".into(),
        ))
    }

    /// Starts tracking the pages the domain's devices write through its
    /// mappings.
    fn dirty_tracking_start(&self) -> Result<()> {
        Err(Error::Unsupported(
            "dirty tracking in this IOMMU domain".into(),
        ))
    }

    /// Stops tracking.
    fn dirty_tracking_stop(&self) -> Result<()> {
        Err(Error::Unsupported(
            "dirty tracking in this IOMMU domain".into(),
        ))
    }

    /// Fills `bitmap` with the pages of `iova .. iova + size` written since
    /// tracking started or since the last report of them, and clears them.
    /// One bit per `page_size` page (one of [`IommuDomain::dirty_page_sizes`]),
    /// the lowest bit of word 0 for the page at `iova`; `bitmap` holds at
    /// least [`crate::migration::bitmap_words`]`(size, page_size)` words.
    fn dirty_bitmap(&self, iova: u64, size: u64, page_size: u64, bitmap: &mut [u64]) -> Result<()> {
        let _ = (iova, size, page_size, bitmap);
        Err(Error::Unsupported(
            "dirty tracking in this IOMMU domain".into(),
        ))
    }
}

impl std::fmt::Debug for dyn IommuDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IommuDomain")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_ids_are_unique_across_threads() {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| (0..100).map(|_| DomainId::new_unique()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<DomainId> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n);
        assert_eq!(n, 400);
    }

    #[test]
    fn trait_is_object_safe() {
        fn takes(_: &dyn IommuDomain) {}
        let _ = takes;
    }
}
