//! DMA of guest RAM, per IOMMU domain.
//!
//! The guest programs its devices with guest physical addresses, so each
//! RAM region is mapped for DMA at its guest physical address (the IOVA).
//! Mappings live in IOMMU domains ([`IommuDomain`]: a legacy container, an
//! iommufd IOAS, a vfio-user connection), which several devices may share.
//! [`GuestDma`] is the VMM's one record of both: the guest RAM regions it
//! registered, and the live domains with the devices attached to each.
//! Guest RAM is mapped into a domain once, when its first device attaches
//! (or when RAM is added), and unmapped when its last device goes, so
//! unplugging one device never takes DMA away from another device of its
//! domain. Only registered guest RAM is ever mapped, and only inside the
//! IOVA ranges the domain accepts (read again whenever a device joins,
//! since a new device may narrow them).
//!
//! A VMM with a virtual IOMMU uses the external mode instead
//! ([`DmaMode::External`]): it maps and unmaps IOVAs itself as the guest
//! programs the vIOMMU ([`GuestDma::map_external`]); those mappings, too,
//! go when the domain's last device goes.
//!
//! Dirty tracking of guest RAM for a VMM's live migration
//! ([`GuestDma::dirty_tracking_start`], [`GuestDma::dirty_bitmaps`],
//! [`GuestDma::dirty_tracking_stop`]): in every live domain, the domain's
//! own tracking ([`IommuDomain::dirty_tracking_start`]: type1
//! `VFIO_IOMMU_DIRTY_PAGES`, iommufd) where it has it at the page size
//! asked for, else the DMA logging of each of its devices
//! ([`Vfio::dma_logging_start`]) over the guest RAM ranges, else
//! [`Error::DirtyTrackingUnsupported`]. A report is one bitmap per guest
//! RAM region, the OR of every domain's and device's.
//!
//! Locking: one mutex inside [`GuestDma`], held across the domain calls
//! (which may block: an ioctl, or a vfio-user message within its timeout).
//! It is never taken while a device lock or the BAR allocator lock is
//! held, and it takes neither: it sits outside the device-then-allocator
//! order (see [`DeviceResources`](crate::DeviceResources)).

use std::any::Any;
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::RangeInclusive;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_backend::migration::bitmap_words;
use vfio_backend::{DirtyRange, DmaFile, DmaSource, DomainId, IommuDomain, Vfio};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::{Error, Result};

/// How guest memory reaches the DMA of the devices of a domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DmaMode {
    /// Every registered RAM region is mapped at its guest physical address
    /// (no vIOMMU).
    #[default]
    GuestPhysical,
    /// The VMM maps and unmaps IOVAs itself (a virtual IOMMU in front of
    /// the devices of the domain) with [`GuestDma::map_external`]; guest
    /// RAM is not mapped.
    External,
}

/// One live DMA mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMapping {
    /// First IOVA.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host address of the first byte in this process (0 for memory
    /// reached through its file only).
    pub host_addr: u64,
}

/// A registered guest RAM region.
struct Ram {
    size: u64,
    host_addr: u64,
    file: Option<(Arc<File>, u64)>,
    /// A removal failed in some domain: the region is on its way out and
    /// is not mapped into domains that attach from now on.
    removing: bool,
    /// Keeps the memory mapped in this process while any domain may map it.
    _keep: Arc<dyn Any + Send + Sync>,
}

impl Ram {
    fn source(&self) -> DmaSource<'_> {
        DmaSource {
            host_addr: self.host_addr,
            file: self.file.as_ref().map(|(f, offset)| DmaFile {
                fd: f.as_fd(),
                offset: *offset,
            }),
            read_only: false,
        }
    }
}

/// A mapping this object made in a domain.
#[derive(Clone, Copy, Debug)]
struct Mapped {
    m: DmaMapping,
    /// Registered guest RAM (else a VMM mapping in external mode).
    ram: bool,
}

/// A live domain and the devices attached to it.
struct Domain {
    domain: Arc<dyn IommuDomain>,
    mode: DmaMode,
    devices: Vec<Arc<dyn Vfio>>,
    iova_ranges: Vec<RangeInclusive<u64>>,
    mapped: BTreeMap<u64, Mapped>,
    /// How its devices' writes to guest RAM are tracked, while they are.
    tracking: Option<Tracker>,
}

/// Who tracks the writes of a domain's devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracker {
    /// The domain itself.
    Domain,
    /// Each device's own DMA logging.
    Devices,
}

/// Dirty tracking while it runs.
struct Tracking {
    page_size: u64,
    /// The guest RAM regions when it started (what device logging covers).
    ranges: Vec<DirtyRange>,
    /// A tracker went (a device or domain detached) since the last report:
    /// the next one names every page, since what it logged is lost.
    lost: bool,
}

/// The pages of one guest RAM region written since tracking started or
/// the last report ([`GuestDma::dirty_bitmaps`]): one bit per page, the
/// lowest bit of word 0 for the page at `gpa`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Its size in bytes.
    pub size: u64,
    /// The tracking page size.
    pub page_size: u64,
    /// The bits.
    pub bits: Vec<u64>,
}

impl DirtyBitmap {
    /// Pages in the region.
    pub fn pages(&self) -> u64 {
        self.size.div_ceil(self.page_size.max(1))
    }

    /// Whether page `page` (counted from `gpa`) is dirty.
    pub fn is_dirty(&self, page: u64) -> bool {
        usize::try_from(page / 64)
            .ok()
            .and_then(|w| self.bits.get(w))
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// The guest physical addresses of the dirty pages, lowest first.
    pub fn dirty_pages(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.pages())
            .filter(|p| self.is_dirty(*p))
            .map(|p| self.gpa + p * self.page_size)
    }

    /// How many pages are dirty.
    pub fn dirty_count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Every page dirty.
    fn fill(&mut self) {
        let pages = self.pages();
        for (i, w) in self.bits.iter_mut().enumerate() {
            let first = i as u64 * 64;
            let n = pages.saturating_sub(first).min(64);
            *w = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
        }
    }
}

impl Domain {
    /// Maps `size` bytes at `iova` from `host` after checking the range
    /// against the domain's IOVA ranges and its other mappings.
    ///
    /// # Safety
    /// As [`IommuDomain::map`].
    unsafe fn map(&mut self, iova: u64, size: u64, host: DmaSource<'_>, ram: bool) -> Result<()> {
        let last = check_range(iova, size)?;
        if !self
            .iova_ranges
            .iter()
            .any(|r| *r.start() <= iova && last <= *r.end())
        {
            return Err(Error::DmaOutsideIovaRanges {
                iova,
                last,
                accepted: self.iova_ranges.clone(),
                domain: self.domain.id(),
            });
        }
        if let Some((_, m)) = self.mapped.range(..=last).next_back() {
            if m.m.iova.saturating_add(m.m.size) > iova {
                return Err(Error::DmaOverlap {
                    what: "IOVA range",
                    iova,
                    last,
                    other: m.m.iova,
                    other_size: m.m.size,
                });
            }
        }
        // SAFETY: the caller's contract is the one of IommuDomain::map.
        unsafe { self.domain.map(iova, size, host) }.map_err(|e| {
            Error::backend(
                format!("DMA map of {iova:#x} (+{size:#x}) in {}", self.domain.id()),
                e,
            )
        })?;
        self.mapped.insert(
            iova,
            Mapped {
                m: DmaMapping {
                    iova,
                    size,
                    host_addr: host.host_addr,
                },
                ram,
            },
        );
        Ok(())
    }

    fn unmap(&mut self, iova: u64, size: u64) -> Result<()> {
        self.domain.unmap(iova, size).map_err(|e| {
            Error::backend(
                format!(
                    "DMA unmap of {iova:#x} (+{size:#x}) in {}",
                    self.domain.id()
                ),
                e,
            )
        })?;
        self.mapped.remove(&iova);
        Ok(())
    }

    /// Unmaps everything (the last device went); errors are logged.
    fn unmap_all(&mut self) {
        for (iova, m) in std::mem::take(&mut self.mapped) {
            if let Err(e) = self.domain.unmap(iova, m.m.size) {
                log::warn!(
                    "DMA unmap of {iova:#x} (+{:#x}) in {}: {e}",
                    m.m.size,
                    self.domain.id()
                );
            }
        }
    }
}

#[derive(Default)]
struct State {
    ram: BTreeMap<u64, Ram>,
    domains: BTreeMap<DomainId, Domain>,
    tracking: Option<Tracking>,
}

/// The VMM's DMA: the guest RAM regions it registered and the live IOMMU
/// domains of its devices. One per VMM (or per guest address space),
/// shared by every device through [`DeviceResources`](crate::DeviceResources).
///
/// - [`GuestDma::add_memory`] / [`GuestDma::add_region`] register guest
///   RAM (memory hotplug included): it is mapped into every live domain in
///   guest-physical mode at once, and into each domain that comes later
///   when its first device attaches.
/// - [`GuestDma::remove_region`] (hot-unplug) unmaps a region from every
///   domain, then lets go of it.
/// - [`VfioPciDevice::new`](crate::VfioPciDevice::new) attaches the device
///   to its backend's domain ([`Vfio::iommu_domain`]), counting the
///   devices of each domain; dropping the device detaches it, and the
///   last device of a domain unmaps everything mapped there.
///
/// Safe by construction: the RAM entry points take vm-memory regions and
/// keep them (hence their memory mapped in this process) until they are
/// unmapped from every domain. The raw entry point for a vIOMMU,
/// [`GuestDma::map_external`], is `unsafe`.
pub struct GuestDma {
    state: Mutex<State>,
}

impl std::fmt::Debug for GuestDma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never waits: Debug may be called while the lock is held.
        match self.state.try_lock() {
            Ok(st) => f
                .debug_struct("GuestDma")
                .field("ram_regions", &st.ram.len())
                .field("domains", &st.domains.keys().collect::<Vec<_>>())
                .finish(),
            Err(_) => f.write_str("GuestDma { <busy> }"),
        }
    }
}

impl Default for GuestDma {
    fn default() -> Self {
        GuestDma {
            state: Mutex::new(State::default()),
        }
    }
}

impl GuestDma {
    /// No RAM registered, no domain.
    pub fn new() -> Arc<GuestDma> {
        Arc::new(GuestDma::default())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update keeps the state consistent at each step (a mapping
        // is recorded only once made, forgotten only once unmapped), so a
        // panic elsewhere leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers every region of `memory` as guest RAM at its guest
    /// physical address and maps it into every live domain in
    /// guest-physical mode. Regions registered already (same address, size
    /// and host memory) are skipped, so each device's builder may pass the
    /// VMM's RAM; returns how many regions were new. A clone of `memory`
    /// (for vm-memory's collections: references to its regions) is kept
    /// until its last region is removed, so the memory stays mapped in
    /// this process while a device may reach it. An fd-backed region
    /// passes its fd, so a vfio-user server can map the same memory. On
    /// failure, the regions this call registered are removed again.
    pub fn add_memory<M>(&self, memory: &M) -> Result<usize>
    where
        M: GuestMemoryBackend + Clone + Send + Sync + 'static,
    {
        let keep = Arc::new(memory.clone());
        let keep_any: Arc<dyn Any + Send + Sync> = keep.clone();
        let mut st = self.lock();
        let mut added: Vec<(u64, u64)> = Vec::new();
        for region in keep.iter() {
            let gpa = region.start_addr().0;
            let size = region.len();
            let host_addr = host_address(region)?;
            if let Some(r) = st.ram.get(&gpa) {
                if r.size == size && r.host_addr == host_addr && !r.removing {
                    continue;
                }
            }
            let ram = Ram {
                size,
                host_addr,
                file: region
                    .file_offset()
                    .map(|fo| (Arc::clone(fo.arc()), fo.start())),
                removing: false,
                _keep: Arc::clone(&keep_any),
            };
            if let Err(e) = Self::register_locked(&mut st, gpa, ram) {
                for (gpa, size) in added.into_iter().rev() {
                    if let Err(u) = Self::remove_locked(&mut st, gpa, size) {
                        log::warn!("rollback of guest RAM at {gpa:#x} (+{size:#x}): {u}");
                    }
                }
                return Err(e);
            }
            added.push((gpa, size));
        }
        Ok(added.len())
    }

    /// Registers one guest RAM region (memory hotplug) and maps it into
    /// every live domain in guest-physical mode; on failure it is mapped
    /// nowhere. The region is kept until [`GuestDma::remove_region`].
    pub fn add_region<R>(&self, region: Arc<R>) -> Result<()>
    where
        R: GuestMemoryRegion + Send + Sync + 'static,
    {
        let gpa = region.start_addr().0;
        let ram = Ram {
            size: region.len(),
            host_addr: host_address(&*region)?,
            file: region
                .file_offset()
                .map(|fo| (Arc::clone(fo.arc()), fo.start())),
            removing: false,
            _keep: region,
        };
        Self::register_locked(&mut self.lock(), gpa, ram)
    }

    fn register_locked(st: &mut State, gpa: u64, ram: Ram) -> Result<()> {
        let last = check_range(gpa, ram.size)?;
        if let Some((&other, r)) = st.ram.range(..=last).next_back() {
            if other.saturating_add(r.size) > gpa {
                return Err(Error::DmaOverlap {
                    what: "guest RAM",
                    iova: gpa,
                    last,
                    other,
                    other_size: r.size,
                });
            }
        }
        let mut done: Vec<DomainId> = Vec::new();
        let mut failed = None;
        for (id, d) in st.domains.iter_mut() {
            if d.mode != DmaMode::GuestPhysical {
                continue;
            }
            // SAFETY: `ram` keeps its memory mapped in this process (its
            // `_keep`) until it is unmapped from every domain: the entry
            // leaves `st.ram` only after that (remove_locked), and a failed
            // map here drops it unmapped. Guest RAM is reached through
            // vm-memory's volatile accesses only.
            match unsafe { d.map(gpa, ram.size, ram.source(), true) } {
                Ok(()) => done.push(*id),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            for id in done {
                if let Some(d) = st.domains.get_mut(&id) {
                    if let Err(u) = d.unmap(gpa, ram.size) {
                        // Keep the memory: a device may still reach it.
                        log::warn!("rollback of guest RAM {gpa:#x} in {id}: {u}");
                        st.ram.insert(
                            gpa,
                            Ram {
                                removing: true,
                                ..ram
                            },
                        );
                        return Err(e);
                    }
                }
            }
            return Err(e);
        }
        st.ram.insert(gpa, ram);
        Ok(())
    }

    /// Unmaps the guest RAM region at `gpa` of `size` bytes from every
    /// domain (memory hot-unplug), then lets go of it. When a domain fails
    /// to unmap it, the error is returned and the region stays registered
    /// (and its memory kept) until a later call succeeds; it is no longer
    /// mapped into domains that come meanwhile.
    pub fn remove_region(&self, gpa: u64, size: u64) -> Result<()> {
        Self::remove_locked(&mut self.lock(), gpa, size)
    }

    /// Removes every region of `memory` that is registered; returns how
    /// many were.
    pub fn remove_memory<M: GuestMemoryBackend>(&self, memory: &M) -> Result<usize> {
        let mut st = self.lock();
        let mut n = 0;
        for region in memory.iter() {
            let (gpa, size) = (region.start_addr().0, region.len());
            if st.ram.get(&gpa).is_some_and(|r| r.size == size) {
                Self::remove_locked(&mut st, gpa, size)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn remove_locked(st: &mut State, gpa: u64, size: u64) -> Result<()> {
        match st.ram.get_mut(&gpa) {
            Some(r) if r.size == size => r.removing = true,
            _ => {
                return Err(Error::NoSuchDmaMapping {
                    what: "guest RAM region",
                    iova: gpa,
                    size,
                })
            }
        }
        let mut first_err = None;
        for d in st.domains.values_mut() {
            if d.mapped.get(&gpa).is_some_and(|m| m.ram) {
                if let Err(e) = d.unmap(gpa, size) {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => {
                st.ram.remove(&gpa);
                Ok(())
            }
        }
    }

    /// The registered guest RAM regions (guest physical address, size),
    /// lowest first.
    pub fn ram_regions(&self) -> Vec<(u64, u64)> {
        self.lock().ram.iter().map(|(g, r)| (*g, r.size)).collect()
    }

    /// The live domains.
    pub fn domains(&self) -> Vec<DomainId> {
        self.lock().domains.keys().copied().collect()
    }

    /// How many devices are attached to domain `id` (0 when it is not
    /// live).
    pub fn device_count(&self, id: DomainId) -> usize {
        self.lock().domains.get(&id).map_or(0, |d| d.devices.len())
    }

    /// The IOVA ranges domain `id` accepts, as read when its last device
    /// joined; `None` when it is not live.
    pub fn iova_ranges(&self, id: DomainId) -> Option<Vec<RangeInclusive<u64>>> {
        self.lock().domains.get(&id).map(|d| d.iova_ranges.clone())
    }

    /// The mappings made in domain `id`, lowest IOVA first.
    pub fn mappings(&self, id: DomainId) -> Vec<DmaMapping> {
        self.lock()
            .domains
            .get(&id)
            .map(|d| d.mapped.values().map(|m| m.m).collect())
            .unwrap_or_default()
    }

    /// Maps `size` bytes at `iova` from `host` in domain `id`, which is in
    /// external mode (a vIOMMU: the VMM decides what the devices see). The
    /// mapping goes with [`GuestDma::unmap_external`], or when the domain's
    /// last device goes.
    ///
    /// # Safety
    ///
    /// As [`IommuDomain::map`]: `host` (its address, and its file when
    /// given) stays mapped and may be read and written by the devices of
    /// the domain until the mapping is unmapped, by
    /// [`GuestDma::unmap_external`] or by the last device of the domain
    /// going.
    pub unsafe fn map_external(
        &self,
        id: DomainId,
        iova: u64,
        size: u64,
        host: DmaSource<'_>,
    ) -> Result<()> {
        let mut st = self.lock();
        let d = external_domain(&mut st, id)?;
        // SAFETY: the caller's contract.
        unsafe { d.map(iova, size, host, false) }
    }

    /// Unmaps the external-mode mapping at `iova` of `size` bytes of
    /// domain `id`.
    pub fn unmap_external(&self, id: DomainId, iova: u64, size: u64) -> Result<()> {
        let mut st = self.lock();
        let d = external_domain(&mut st, id)?;
        match d.mapped.get(&iova) {
            Some(m) if m.m.size == size && !m.ram => d.unmap(iova, size),
            _ => Err(Error::NoSuchDmaMapping {
                what: "DMA mapping",
                iova,
                size,
            }),
        }
    }

    /// Attaches a device of `vfio` in `mode`: the first device of a domain
    /// maps the registered RAM there (guest-physical mode); a later one
    /// reads the domain's IOVA ranges again, and is refused when they no
    /// longer hold a live mapping or when its mode differs.
    pub(crate) fn attach(&self, vfio: &Arc<dyn Vfio>, mode: DmaMode) -> Result<DomainId> {
        let domain = vfio.iommu_domain();
        let id = domain.id();
        let mut st = self.lock();
        let ranges = domain
            .iova_ranges()
            .map_err(|e| Error::backend(format!("reading the IOVA ranges of {id}"), e))?;
        let tracking = st
            .tracking
            .as_ref()
            .map(|t| (t.page_size, t.ranges.clone()));
        if let Some(d) = st.domains.get_mut(&id) {
            if d.mode != mode {
                return Err(Error::DmaModeMismatch {
                    domain: id,
                    mode: d.mode,
                    wanted: mode,
                });
            }
            if let Some(m) = d.mapped.values().find(|m| {
                !ranges.iter().any(|r| {
                    r.contains(&m.m.iova)
                        && r.contains(&m.m.iova.saturating_add(m.m.size.saturating_sub(1)))
                })
            }) {
                return Err(Error::DomainNarrowed {
                    domain: id,
                    accepted: ranges,
                    iova: m.m.iova,
                    size: m.m.size,
                });
            }
            // Dirty tracking runs: a device that joins a domain whose
            // devices log their own DMA logs too, or is refused.
            if let (Some(Tracker::Devices), Some((page_size, ram))) = (d.tracking, &tracking) {
                vfio.dma_logging_start(*page_size, ram)
                    .map_err(|e| untracked(id, "the joining device's DMA logging", e))?;
            }
            d.iova_ranges = ranges;
            d.devices.push(Arc::clone(vfio));
            return Ok(id);
        }
        let mut d = Domain {
            domain,
            mode,
            devices: vec![Arc::clone(vfio)],
            iova_ranges: ranges,
            mapped: BTreeMap::new(),
            tracking: None,
        };
        if mode == DmaMode::GuestPhysical {
            for (gpa, ram) in st.ram.iter().filter(|(_, r)| !r.removing) {
                // SAFETY: as in register_locked: `ram` keeps its memory
                // until it is unmapped from every domain, this one
                // included (the domain is recorded below, or unmapped
                // here on failure).
                if let Err(e) = unsafe { d.map(*gpa, ram.size, ram.source(), true) } {
                    d.unmap_all();
                    return Err(e);
                }
            }
        }
        if let Some((page_size, ram)) = &tracking {
            match start_tracking(&d, *page_size, ram) {
                Ok(t) => d.tracking = Some(t),
                Err(e) => {
                    d.unmap_all();
                    return Err(e);
                }
            }
        }
        st.domains.insert(id, d);
        Ok(id)
    }

    /// Detaches device `vfio` from domain `id`; the last one unmaps
    /// everything mapped there (errors are logged) and lets go of the
    /// domain. While dirty tracking runs, what the device (or the domain)
    /// logged goes with it: the next report names every page.
    pub(crate) fn detach(&self, id: DomainId, vfio: &Arc<dyn Vfio>) {
        let mut st = self.lock();
        let State {
            domains, tracking, ..
        } = &mut *st;
        let Some(d) = domains.get_mut(&id) else {
            return;
        };
        let Some(at) = d.devices.iter().position(|v| Arc::ptr_eq(v, vfio)) else {
            return;
        };
        let gone = d.devices.swap_remove(at);
        if d.tracking == Some(Tracker::Devices) {
            if let Err(e) = gone.dma_logging_stop() {
                log::warn!("stopping the DMA logging of a device leaving {id}: {e}");
            }
            if let Some(t) = tracking.as_mut() {
                t.lost = true;
            }
        }
        if d.devices.is_empty() {
            if d.tracking == Some(Tracker::Domain) {
                if let Err(e) = d.domain.dirty_tracking_stop() {
                    log::warn!("stopping dirty tracking of {id}: {e}");
                }
                if let Some(t) = tracking.as_mut() {
                    t.lost = true;
                }
            }
            d.unmap_all();
            domains.remove(&id);
        }
    }

    /// Starts tracking the guest RAM pages the devices' DMA writes, at
    /// `page_size` granularity (a power of two), in every live domain: by
    /// the domain itself where it tracks at that page size, else by each
    /// of its devices' DMA logging over the registered guest RAM. Refused
    /// with [`Error::DirtyTrackingUnsupported`] when a domain can do
    /// neither (or is in external mode: its IOVAs are not guest physical
    /// addresses); nothing is left started then.
    ///
    /// While it runs, a device that attaches is tracked too (or refused),
    /// a device or domain that goes makes the next report name every page
    /// (what it logged is lost), and guest RAM added since the start is
    /// reported dirty in full every time.
    pub fn dirty_tracking_start(&self, page_size: u64) -> Result<()> {
        if !page_size.is_power_of_two() {
            return Err(Error::PageSize { size: page_size });
        }
        let mut st = self.lock();
        if st.tracking.is_some() {
            return Err(Error::DirtyTrackingState { running: true });
        }
        let ranges: Vec<DirtyRange> = st
            .ram
            .iter()
            .filter(|(_, r)| !r.removing)
            .map(|(gpa, r)| DirtyRange {
                iova: *gpa,
                length: r.size,
            })
            .collect();
        let mut failed = None;
        for d in st.domains.values_mut() {
            match start_tracking(d, page_size, &ranges) {
                Ok(t) => d.tracking = Some(t),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            for d in st.domains.values_mut() {
                stop_tracking(d);
            }
            return Err(e);
        }
        st.tracking = Some(Tracking {
            page_size,
            ranges,
            lost: false,
        });
        Ok(())
    }

    /// The pages of each registered guest RAM region written by any
    /// device since tracking started or since the last report, which they
    /// are cleared from: one [`DirtyBitmap`] per region, lowest first, the
    /// OR over every domain and device.
    pub fn dirty_bitmaps(&self) -> Result<Vec<DirtyBitmap>> {
        let mut st = self.lock();
        let State {
            ram,
            domains,
            tracking,
        } = &mut *st;
        let t = tracking
            .as_mut()
            .ok_or(Error::DirtyTrackingState { running: false })?;
        let page = t.page_size;
        let mut out = Vec::with_capacity(ram.len());
        let mut scratch = Vec::new();
        for (&gpa, r) in ram.iter() {
            let words = bitmap_words(r.size, page).ok_or(Error::PageSize { size: page })?;
            let mut bm = DirtyBitmap {
                gpa,
                size: r.size,
                page_size: page,
                bits: vec![0; words],
            };
            let tracked = t.ranges.iter().any(|x| x.iova == gpa && x.length == r.size);
            if t.lost || !tracked {
                bm.fill();
            }
            scratch.resize(words, 0u64);
            for d in domains.values() {
                if !d
                    .mapped
                    .get(&gpa)
                    .is_some_and(|m| m.ram && m.m.size == r.size)
                {
                    continue;
                }
                match d.tracking {
                    Some(Tracker::Domain) => {
                        scratch.fill(0);
                        d.domain
                            .dirty_bitmap(gpa, r.size, page, &mut scratch)
                            .map_err(|e| {
                                Error::backend(
                                    format!(
                                        "dirty bitmap of {gpa:#x} (+{:#x}) in {}",
                                        r.size,
                                        d.domain.id()
                                    ),
                                    e,
                                )
                            })?;
                        or_into(&mut bm.bits, &scratch);
                    }
                    Some(Tracker::Devices) if tracked => {
                        for v in &d.devices {
                            scratch.fill(0);
                            v.dma_logging_report(gpa, r.size, page, &mut scratch)
                                .map_err(|e| {
                                    Error::backend(
                                        format!("DMA logging report of {gpa:#x} (+{:#x})", r.size),
                                        e,
                                    )
                                })?;
                            or_into(&mut bm.bits, &scratch);
                        }
                    }
                    _ => {}
                }
            }
            out.push(bm);
        }
        t.lost = false;
        Ok(out)
    }

    /// Stops dirty tracking everywhere (errors are logged: tracking is off
    /// in this object either way).
    pub fn dirty_tracking_stop(&self) -> Result<()> {
        let mut st = self.lock();
        if st.tracking.take().is_none() {
            return Err(Error::DirtyTrackingState { running: false });
        }
        for d in st.domains.values_mut() {
            stop_tracking(d);
        }
        Ok(())
    }

    /// Whether dirty tracking runs.
    pub fn dirty_tracking(&self) -> bool {
        self.lock().tracking.is_some()
    }
}

fn or_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

fn untracked(domain: DomainId, what: &str, e: vfio_backend::Error) -> Error {
    match e {
        vfio_backend::Error::Unsupported(why) => Error::DirtyTrackingUnsupported {
            domain,
            reason: format!("{what}: {why}"),
        },
        e => Error::backend(format!("starting {what} in {domain}"), e),
    }
}

/// Starts tracking in `d`: the domain's own where it tracks at
/// `page_size`, else every device's DMA logging over `ram`.
fn start_tracking(d: &Domain, page_size: u64, ram: &[DirtyRange]) -> Result<Tracker> {
    let id = d.domain.id();
    if d.mode != DmaMode::GuestPhysical {
        return Err(Error::DirtyTrackingUnsupported {
            domain: id,
            reason: "the domain is in external DMA mode: its IOVAs are not guest physical \
                     addresses"
                .into(),
        });
    }
    let domain_why = match d.domain.dirty_page_sizes() {
        Ok(sizes) if sizes & page_size != 0 => {
            d.domain
                .dirty_tracking_start()
                .map_err(|e| untracked(id, "the domain's dirty tracking", e))?;
            return Ok(Tracker::Domain);
        }
        Ok(sizes) => format!("the domain tracks page sizes {sizes:#x} only"),
        Err(vfio_backend::Error::Unsupported(why)) => why,
        Err(e) => return Err(Error::backend(format!("dirty page sizes of {id}"), e)),
    };
    for (i, v) in d.devices.iter().enumerate() {
        if let Err(e) = v.dma_logging_start(page_size, ram) {
            for started in d.devices.iter().take(i) {
                if let Err(s) = started.dma_logging_stop() {
                    log::warn!("stopping DMA logging in {id}: {s}");
                }
            }
            return Err(untracked(
                id,
                &format!("{domain_why}; and device {i}'s DMA logging"),
                e,
            ));
        }
    }
    Ok(Tracker::Devices)
}

/// Stops what [`start_tracking`] started in `d`; errors are logged.
fn stop_tracking(d: &mut Domain) {
    let id = d.domain.id();
    match d.tracking.take() {
        Some(Tracker::Domain) => {
            if let Err(e) = d.domain.dirty_tracking_stop() {
                log::warn!("stopping dirty tracking of {id}: {e}");
            }
        }
        Some(Tracker::Devices) => {
            for v in &d.devices {
                if let Err(e) = v.dma_logging_stop() {
                    log::warn!("stopping DMA logging in {id}: {e}");
                }
            }
        }
        None => {}
    }
}

fn external_domain(st: &mut State, id: DomainId) -> Result<&mut Domain> {
    match st.domains.get_mut(&id) {
        Some(d) if d.mode == DmaMode::External => Ok(d),
        Some(d) => Err(Error::DmaModeMismatch {
            domain: id,
            mode: d.mode,
            wanted: DmaMode::External,
        }),
        None => Err(Error::NoSuchDomain { domain: id }),
    }
}

fn host_address<R: GuestMemoryRegion>(region: &R) -> Result<u64> {
    let gpa = region.start_addr().0;
    region
        .get_host_address(MemoryRegionAddress(0))
        .map(|p| p as u64)
        .map_err(|source| Error::GuestRamHostAddress { gpa, source })
}

/// Checks a non-empty range that does not wrap; returns its last address.
fn check_range(iova: u64, size: u64) -> Result<u64> {
    if size == 0 {
        return Err(Error::DmaRange { iova, size });
    }
    iova.checked_add(size - 1)
        .ok_or(Error::DmaRange { iova, size })
}
