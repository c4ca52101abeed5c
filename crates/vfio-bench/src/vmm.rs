//! A minimal VMM for benchmarks, soak tests and fuzzing.
//!
//! Unlike the recording test doubles of `pci-interrupts`, nothing here
//! grows while the guest runs: a route update is three atomic stores, a
//! delivered interrupt is an eventfd read. The interrupt manager holds its
//! groups weakly, so a detached device leaves no eventfd behind.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use pci_interrupts::{InterruptManager, InterruptSourceGroup, MsiRoute};
use vfio_backend::Vfio;
use vfio_pci::{DeviceOptions, DeviceResources, GuestDma, GuestMapper, MappingId, VfioPciDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Result;

/// Base of the 32-bit MMIO window.
pub const MMIO32_BASE: u64 = 0xc000_0000;
/// Size of the 32-bit MMIO window.
pub const MMIO32_SIZE: u64 = 0x2000_0000;
/// Base of the 64-bit MMIO window.
pub const MMIO64_BASE: u64 = 0x100_0000_0000;
/// Size of the 64-bit MMIO window.
pub const MMIO64_SIZE: u64 = 0x100_0000_0000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Vector {
    address: AtomicU64,
    data: AtomicU32,
    masked: AtomicBool,
}

/// An interrupt group whose vectors are eventfds: what KVM's irqfds are to
/// a real VMM. A route update is three atomic stores (no read-modify-write).
#[derive(Debug)]
pub struct EventGroup {
    notifiers: Vec<EventFd>,
    resample: Option<EventFd>,
    vectors: Vec<Vector>,
    enabled: AtomicBool,
}

impl EventGroup {
    /// A group of `count` vectors; with `resample`, vector 0 also has a
    /// resample eventfd (INTx).
    pub fn new(count: u32, resample: bool) -> Result<EventGroup> {
        let eventfd =
            || EventFd::new(EFD_NONBLOCK).map_err(|e| crate::Error::io("eventfd for a vector", e));
        let notifiers = (0..count).map(|_| eventfd()).collect::<Result<Vec<_>>>()?;
        let resample = if resample { Some(eventfd()?) } else { None };
        let vectors = (0..count)
            .map(|_| Vector {
                masked: AtomicBool::new(true),
                ..Vector::default()
            })
            .collect();
        Ok(EventGroup {
            notifiers,
            resample,
            vectors,
            enabled: AtomicBool::new(false),
        })
    }

    /// Takes the count of signals pending on `vector`'s eventfd (0 when none).
    pub fn take(&self, vector: u32) -> u64 {
        self.notifiers
            .get(vector as usize)
            .and_then(|fd| fd.read().ok())
            .unwrap_or(0)
    }

    /// Takes the signals pending on every vector.
    pub fn take_all(&self) -> u64 {
        (0..self.len()).map(|v| self.take(v)).sum()
    }

    /// The route of `vector` and whether it is masked.
    pub fn route(&self, vector: u32) -> Option<(MsiRoute, bool)> {
        let v = self.vectors.get(vector as usize)?;
        Some((
            MsiRoute {
                address: v.address.load(Ordering::Acquire),
                data: v.data.load(Ordering::Acquire),
            },
            v.masked.load(Ordering::Acquire),
        ))
    }

    /// Whether the group is enabled.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }
}

fn borrow(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the eventfd is owned by the group and outlives the borrow,
    // which is tied to `&self` of the group.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

impl InterruptSourceGroup for EventGroup {
    fn len(&self) -> u32 {
        u32::try_from(self.notifiers.len()).unwrap_or(u32::MAX)
    }

    fn notifier(&self, vector: u32) -> Option<BorrowedFd<'_>> {
        self.notifiers.get(vector as usize).map(borrow)
    }

    fn resample_notifier(&self, vector: u32) -> Option<BorrowedFd<'_>> {
        if vector != 0 {
            return None;
        }
        self.resample.as_ref().map(borrow)
    }

    fn update(&self, vector: u32, route: MsiRoute, masked: bool) -> pci_interrupts::Result<()> {
        let v = self.vectors.get(vector as usize).ok_or_else(|| {
            pci_interrupts::Error::VectorOutOfRange {
                vector,
                count: self.len(),
            }
        })?;
        v.address.store(route.address, Ordering::Release);
        v.data.store(route.data, Ordering::Release);
        v.masked.store(masked, Ordering::Release);
        Ok(())
    }

    fn enable(&self) -> pci_interrupts::Result<()> {
        self.enabled.store(true, Ordering::Release);
        Ok(())
    }

    fn disable(&self) -> pci_interrupts::Result<()> {
        self.enabled.store(false, Ordering::Release);
        Ok(())
    }

    fn trigger(&self, vector: u32) -> pci_interrupts::Result<()> {
        let fd =
            self.notifiers
                .get(vector as usize)
                .ok_or(pci_interrupts::Error::VectorOutOfRange {
                    vector,
                    count: self.len(),
                })?;
        fd.write(1)
            .map_err(|source| pci_interrupts::Error::EventFd {
                op: "write",
                source,
            })
    }
}

/// Creates [`EventGroup`]s and remembers them weakly.
#[derive(Debug, Default)]
pub struct EventInterrupts {
    groups: Mutex<Vec<Weak<EventGroup>>>,
    intx_resample: bool,
}

impl EventInterrupts {
    /// A manager; with `intx_resample`, INTx groups get a resample eventfd
    /// (the fake device then runs a watcher thread for it).
    pub fn new(intx_resample: bool) -> EventInterrupts {
        EventInterrupts {
            groups: Mutex::new(Vec::new()),
            intx_resample,
        }
    }

    /// The live groups, oldest first.
    pub fn groups(&self) -> Vec<Arc<EventGroup>> {
        lock(&self.groups)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The newest live group with `count` vectors.
    pub fn group_with(&self, count: u32) -> Option<Arc<EventGroup>> {
        self.groups().into_iter().rev().find(|g| g.len() == count)
    }

    fn keep(&self, g: EventGroup) -> Arc<EventGroup> {
        let g = Arc::new(g);
        let mut groups = lock(&self.groups);
        groups.retain(|w| w.strong_count() > 0);
        groups.push(Arc::downgrade(&g));
        g
    }
}

impl InterruptManager for EventInterrupts {
    fn create_msi_group(
        &self,
        count: u32,
    ) -> pci_interrupts::Result<Arc<dyn InterruptSourceGroup>> {
        let g = EventGroup::new(count, false).map_err(|e| pci_interrupts::Error::EventFd {
            op: "create",
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(self.keep(g))
    }

    fn create_intx_group(&self) -> pci_interrupts::Result<Arc<dyn InterruptSourceGroup>> {
        let g =
            EventGroup::new(1, self.intx_resample).map_err(|e| pci_interrupts::Error::EventFd {
                op: "create",
                source: std::io::Error::other(e.to_string()),
            })?;
        Ok(self.keep(g))
    }
}

/// A guest mapper that keeps every live mapping, like a VMM's memory slots.
#[derive(Debug, Default)]
pub struct SlotMapper {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, (u64, u64)>>,
    maps: AtomicU64,
    unmaps: AtomicU64,
}

impl SlotMapper {
    /// The live mappings as (guest address, size).
    pub fn live(&self) -> Vec<(u64, u64)> {
        lock(&self.live).values().copied().collect()
    }

    /// Maps and unmaps so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.maps.load(Ordering::Relaxed),
            self.unmaps.load(Ordering::Relaxed),
        )
    }
}

impl GuestMapper for SlotMapper {
    /// Records the mapping (the memory is never touched).
    ///
    /// # Safety
    /// As [`GuestMapper::map`]; this mapper never dereferences `host`.
    unsafe fn map(
        &self,
        gpa: u64,
        size: u64,
        _host: *mut u8,
        _ro: bool,
    ) -> std::io::Result<MappingId> {
        let mut live = lock(&self.live);
        let end = gpa.saturating_add(size);
        if live
            .values()
            .any(|&(g, s)| gpa < g.saturating_add(s) && g < end)
        {
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        live.insert(id, (gpa, size));
        self.maps.fetch_add(1, Ordering::Relaxed);
        Ok(MappingId(id))
    }

    fn unmap(&self, id: MappingId) -> std::io::Result<()> {
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        lock(&self.live)
            .remove(&id.0)
            .map(|_| ())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))
    }
}

/// The VMM side: interrupts, guest mappings and BAR windows.
#[derive(Debug)]
pub struct Vm {
    /// Interrupt delivery.
    pub irqs: Arc<EventInterrupts>,
    /// Guest mappings of BAR memory.
    pub mapper: Arc<SlotMapper>,
    /// The BAR windows.
    pub alloc: Arc<Mutex<BarAllocator>>,
    /// Guest RAM for DMA and the live IOMMU domains.
    pub dma: Arc<GuestDma>,
}

impl Vm {
    /// A VMM with 4 KiB pages and no INTx resample eventfd.
    pub fn new() -> Result<Vm> {
        Vm::with_options(4096, false)
    }

    /// A VMM with the given page size and INTx resample choice.
    pub fn with_options(page_size: u64, intx_resample: bool) -> Result<Vm> {
        let windows = BarWindows::new(AddressWindow {
            base: MMIO32_BASE,
            size: MMIO32_SIZE,
        })
        .with_mmio64(AddressWindow {
            base: MMIO64_BASE,
            size: MMIO64_SIZE,
        })
        .with_io(AddressWindow {
            base: 0x1000,
            size: 0x1000,
        });
        Ok(Vm {
            irqs: Arc::new(EventInterrupts::new(intx_resample)),
            mapper: Arc::new(SlotMapper::default()),
            alloc: Arc::new(Mutex::new(BarAllocator::with_page_size(
                windows, page_size,
            )?)),
            dma: GuestDma::new(),
        })
    }

    /// What the device borrows from this VMM.
    pub fn resources(&self) -> DeviceResources {
        DeviceResources {
            interrupts: self.irqs.clone(),
            mapper: self.mapper.clone(),
            allocator: self.alloc.clone(),
            dma: self.dma.clone(),
        }
    }

    /// Attaches `vfio` with default options (4 KiB pages).
    pub fn attach(&self, vfio: Arc<dyn Vfio>) -> Result<VfioPciDevice> {
        let options = DeviceOptions::default().with_page_size(4096);
        Ok(VfioPciDevice::new(vfio, self.resources(), options)?)
    }
}
