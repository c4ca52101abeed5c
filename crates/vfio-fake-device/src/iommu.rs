//! [`FakeIommu`]: the fake devices' IOMMU domain, shared by the devices
//! attached to it as a legacy container or an iommufd IOAS is.

use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockWriteGuard};

use vfio_backend::{DmaSource, DomainId, Error, IommuDomain, RemoteDma, Result};

use crate::dma::{Backing, DmaMappings};
use crate::inject::{Counters, Faults, Injected, Op};

/// The IOVA ranges an attached device leaves usable, by attachment.
#[derive(Debug, Default)]
struct Attached {
    next: u64,
    devices: Vec<(u64, Vec<RangeInclusive<u64>>)>,
}

/// A fake IOMMU domain: the DMA mappings the fake devices attached to it
/// check every access against. [`FakeDevice::new`](crate::FakeDevice::new)
/// gives each device its own (as a vfio-user connection has);
/// [`FakeDevice::with_iommu`](crate::FakeDevice::with_iommu) attaches
/// several devices to one, as several kernel devices share a container
/// or an IOAS: a mapping then serves all of them and outlives any one.
///
/// Like an iommufd IOAS, the domain accepts only the IOVAs every attached
/// device leaves usable (each template's
/// [`iova_ranges`](crate::DeviceTemplate::iova_ranges)): a device joining
/// may narrow [`IommuDomain::iova_ranges`], and is refused when a live
/// mapping lies outside its ranges.
///
/// Domain calls are counted in, and fail as injected by, the domain's own
/// [`FakeIommu::counters`] and [`FakeIommu::faults`] (ops
/// [`Op::DmaMap`], [`Op::DmaUnmap`], [`Op::IovaRanges`]).
#[derive(Debug)]
pub struct FakeIommu {
    id: DomainId,
    mappings: Mutex<DmaMappings>,
    /// Held (shared) by a device's DMA thread across each piece of file
    /// I/O and (exclusive) by `unmap`, so that once `unmap` returns no
    /// access to the unmapped file is still under way. Taken before the
    /// mapping lock, never while holding it.
    file_io: RwLock<()>,
    attached: Mutex<Attached>,
    counters: Counters,
    faults: Faults,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a plain store or one Vec operation: a panic
    // elsewhere leaves the data usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn injected(op: Op, what: Injected) -> Error {
    match what {
        Injected::Dead => Error::Refused {
            context: format!("fake IOMMU {}: the IOMMU does not answer", op.name()),
            errno: libc::EIO,
        },
        Injected::Fail(errno) => Error::Refused {
            context: format!("fake IOMMU {}: injected failure", op.name()),
            errno,
        },
    }
}

/// The IOVAs in both `a` and `b` (each a list of inclusive ranges).
fn intersect(a: &[RangeInclusive<u64>], b: &[RangeInclusive<u64>]) -> Vec<RangeInclusive<u64>> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            let start = (*x.start()).max(*y.start());
            let end = (*x.end()).min(*y.end());
            if start <= end {
                out.push(start..=end);
            }
        }
    }
    out.sort_by_key(|r| *r.start());
    out
}

impl FakeIommu {
    /// An empty domain with no device attached (it then accepts the whole
    /// 64-bit IOVA space).
    pub fn new() -> Arc<FakeIommu> {
        Arc::new(FakeIommu {
            id: DomainId::new_unique(),
            mappings: Mutex::new(DmaMappings::default()),
            file_io: RwLock::new(()),
            attached: Mutex::new(Attached::default()),
            counters: Counters::default(),
            faults: Faults::default(),
        })
    }

    /// Counters of the domain's calls (`DmaMap`, `DmaUnmap`, `IovaRanges`).
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Failure injection for the domain's calls.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// Number of live mappings.
    pub fn mapping_count(&self) -> usize {
        lock(&self.mappings).len()
    }

    /// The devices attached now.
    pub fn device_count(&self) -> usize {
        lock(&self.attached).devices.len()
    }

    /// The ranges every attached device accepts.
    fn effective(att: &Attached) -> Vec<RangeInclusive<u64>> {
        att.devices
            .iter()
            .fold(vec![0..=u64::MAX], |acc, (_, r)| intersect(&acc, r))
    }

    /// Attaches a device that leaves `ranges` usable; returns its token.
    /// Refused (`EADDRINUSE`, as iommufd refuses a device whose reserved
    /// regions hold a mapping) when a live mapping lies outside them.
    pub(crate) fn attach(&self, ranges: &[RangeInclusive<u64>]) -> Result<u64> {
        let mut att = lock(&self.attached);
        let mappings = lock(&self.mappings);
        if !mappings.all_inside(ranges) {
            return Err(Error::Refused {
                context: format!(
                    "fake IOMMU {}: a live DMA mapping lies outside the IOVA ranges {ranges:x?} \
                     of the device being attached",
                    self.id
                ),
                errno: libc::EADDRINUSE,
            });
        }
        let token = att.next;
        att.next = att.next.wrapping_add(1);
        att.devices.push((token, ranges.to_vec()));
        Ok(token)
    }

    /// Detaches the device of `token` (its reserved IOVAs become usable
    /// again).
    pub(crate) fn detach(&self, token: u64) {
        lock(&self.attached).devices.retain(|(t, _)| *t != token);
    }

    pub(crate) fn mappings(&self) -> MutexGuard<'_, DmaMappings> {
        lock(&self.mappings)
    }

    /// Shared hold that `unmap` waits for (see `file_io`).
    pub(crate) fn file_io(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.file_io.read().unwrap_or_else(|e| e.into_inner())
    }

    fn file_io_exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.file_io.write().unwrap_or_else(|e| e.into_inner())
    }

    fn enter(&self, op: Op) -> Result<()> {
        self.counters.call(op);
        match self.faults.check(op) {
            None => Ok(()),
            Some(what) => Err(injected(op, what)),
        }
    }

    fn map_backing(&self, iova: u64, size: u64, backing: Backing, read_only: bool) -> Result<()> {
        // Held across the map, so that a device attaching meanwhile sees
        // this mapping (and may refuse to join) or narrows the ranges first.
        let att = lock(&self.attached);
        let allowed = Self::effective(&att);
        self.mappings()
            .map(iova, size, backing, read_only, &allowed)
    }
}

impl IommuDomain for FakeIommu {
    fn id(&self) -> DomainId {
        self.id
    }

    /// A `host_addr` is reached by loads and stores at that address; with
    /// `host_addr` 0, the file is reached by `pread` / `pwrite` on a
    /// duplicate of its fd.
    ///
    /// # Safety
    ///
    /// As [`IommuDomain::map`]: the devices load and store at `host_addr`
    /// until `unmap` of the range returns.
    unsafe fn map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        self.enter(Op::DmaMap)?;
        let backing = match (host.host_addr, host.file) {
            (0, Some(f)) => {
                let dup =
                    f.fd.try_clone_to_owned()
                        .map_err(|e| Error::io("dup of a DMA file", e))?;
                Backing::File(Arc::new(std::fs::File::from(dup)), f.offset)
            }
            (0, None) => {
                return Err(Error::InvalidArgument(
                    "DMA map with neither a host address nor a file".into(),
                ))
            }
            (addr, _) => Backing::Host(addr),
        };
        self.map_backing(iova, size, backing, host.read_only)
    }

    fn map_remote(
        &self,
        iova: u64,
        size: u64,
        read_only: bool,
        remote: Arc<dyn RemoteDma>,
    ) -> Result<()> {
        self.enter(Op::DmaMap)?;
        self.map_backing(iova, size, Backing::Remote(remote), read_only)
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.enter(Op::DmaUnmap)?;
        // Waits for a piece of file I/O under way (see `file_io`); a load
        // or store to host memory happens under the mapping lock.
        let _io = self.file_io_exclusive();
        self.mappings().unmap(iova, size)
    }

    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>> {
        self.enter(Op::IovaRanges)?;
        Ok(Self::effective(&lock(&self.attached)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_accepts_only_iovas_every_attached_device_accepts() {
        let iommu = FakeIommu::new();
        assert_eq!(iommu.iova_ranges().unwrap(), vec![0..=u64::MAX]);
        let a = iommu.attach(&[0..=0xffff_ffff]).unwrap();
        let b = iommu
            .attach(&[0..=0xfedf_ffff, 0xfef0_0000..=u64::MAX])
            .unwrap();
        assert_eq!(
            iommu.iova_ranges().unwrap(),
            vec![0..=0xfedf_ffff, 0xfef0_0000..=0xffff_ffff]
        );
        iommu.detach(b);
        assert_eq!(iommu.iova_ranges().unwrap(), vec![0..=0xffff_ffff]);
        iommu.detach(a);
        assert_eq!(iommu.device_count(), 0);
    }
}
