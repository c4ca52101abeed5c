//! [`InterruptManager`] and [`InterruptSourceGroup`] over KVM irqfds and GSI routes.

use std::collections::BTreeSet;
use std::ops::Range;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};

use pci_interrupts::{InterruptManager, InterruptSourceGroup, MsiRoute};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::routing::{GsiRoute, GsiRouting, MAX_GSI_ROUTES};
use super::{kvm_error, lock};
use crate::{Error, Result};

/// The interrupt line a device's INTx pin is wired to: a GSI routed to a pin of an in-kernel
/// interrupt controller (on x86, normally the IOAPIC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IntxLine {
    /// The GSI the irqfd is registered on.
    pub gsi: u32,
    /// The irqchip of the routing entry (`KVM_IRQCHIP_IOAPIC` = 2 on x86).
    pub chip: u32,
    /// The pin on that irqchip.
    pub pin: u32,
}

impl IntxLine {
    /// `gsi` routed to IOAPIC pin `pin` (KVM's default table routes GSI n to pin n, n < 24).
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    pub fn ioapic(gsi: u32, pin: u32) -> Self {
        Self {
            gsi,
            chip: kvm_bindings::KVM_IRQCHIP_IOAPIC,
            pin,
        }
    }

    /// `gsi` routed to pin `pin` of irqchip `chip`: on arm64 chip 0 is the
    /// in-kernel GIC and `pin` an SPI number as KVM numbers them.
    pub fn new(gsi: u32, chip: u32, pin: u32) -> Self {
        Self { gsi, chip, pin }
    }
}

/// Hands out the GSIs of the range the VMM reserved for passthrough devices.
#[derive(Debug)]
struct GsiAllocator {
    range: Range<u32>,
    /// Lowest GSI never handed out.
    next: u32,
    /// GSIs handed out and given back.
    free: BTreeSet<u32>,
}

impl GsiAllocator {
    fn available(&self) -> u32 {
        let fresh = self.range.end.saturating_sub(self.next);
        let freed = u32::try_from(self.free.len()).unwrap_or(u32::MAX);
        fresh.saturating_add(freed)
    }

    fn allocate(&mut self, count: u32) -> Result<Vec<u32>> {
        if count > self.available() {
            return Err(Error::Exhausted {
                resource: "GSIs",
                requested: count,
                start: self.range.start,
                end: self.range.end,
            });
        }
        let mut gsis = Vec::with_capacity(count as usize);
        for _ in 0..count {
            let gsi = match self.free.pop_first() {
                Some(gsi) => gsi,
                None => {
                    let gsi = self.next;
                    self.next = self.next.saturating_add(1);
                    gsi
                }
            };
            gsis.push(gsi);
        }
        Ok(gsis)
    }

    fn release(&mut self, gsis: impl IntoIterator<Item = u32>) {
        for gsi in gsis {
            if self.range.contains(&gsi) && gsi < self.next {
                self.free.insert(gsi);
            }
        }
    }
}

/// Wraps an error of this crate for the [`pci_interrupts`] traits, keeping it as the source.
fn group_error(op: &'static str, err: Error) -> pci_interrupts::Error {
    pci_interrupts::Error::Group {
        op,
        source: err.into(),
    }
}

/// Creates [`KvmInterruptGroup`]s: MSI/MSI-X vectors on GSIs from a range the VMM reserves, and
/// INTx on a line the VMM chooses. All groups share the VM's [`GsiRouting`].
///
/// Devices with INTx have a line each, so a VMM typically makes one manager per device, all on
/// the same `GsiRouting` and each with a GSI range of its own. An INTx group that added its
/// line's route removes it when dropped: keep one INTx group per line at a time.
#[derive(Debug)]
pub struct KvmInterruptManager {
    routing: Arc<GsiRouting>,
    gsis: Arc<Mutex<GsiAllocator>>,
    intx: Option<IntxLine>,
    device_id: Option<u32>,
}

impl KvmInterruptManager {
    /// A manager that gives MSI/MSI-X vectors GSIs from `msi_gsis` (the VMM keeps every other
    /// GSI for itself). The range must be non-empty and below [`MAX_GSI_ROUTES`].
    pub fn new(routing: Arc<GsiRouting>, msi_gsis: Range<u32>) -> Result<Self> {
        if msi_gsis.is_empty() {
            return Err(Error::Invalid {
                what: "GSI range end",
                value: msi_gsis.end.into(),
                reason: "the GSI range is empty",
            });
        }
        if msi_gsis.end > MAX_GSI_ROUTES {
            return Err(Error::Invalid {
                what: "GSI range end",
                value: msi_gsis.end.into(),
                reason: "KVM accepts GSIs below KVM_MAX_IRQ_ROUTES (4096)",
            });
        }
        Ok(Self {
            routing,
            gsis: Arc::new(Mutex::new(GsiAllocator {
                next: msi_gsis.start,
                range: msi_gsis,
                free: BTreeSet::new(),
            })),
            intx: None,
            device_id: None,
        })
    }

    /// Sets the device id that the MSI routes of this manager's groups carry (see
    /// [`GsiRoute::Msi`]): arm64 with a GICv3 ITS needs it, as the device id the guest's
    /// firmware tables give the device's requester id. Every MSI routing entry the groups
    /// commit then has `KVM_MSI_VALID_DEVID` set. Without it (the default, and what x86
    /// wants) the entries carry no device id. Groups created before the call keep what the
    /// manager had when they were created.
    pub fn with_device_id(mut self, device_id: u32) -> Self {
        self.device_id = Some(device_id);
        self
    }

    /// The device id given with [`with_device_id`](Self::with_device_id), if any.
    pub fn device_id(&self) -> Option<u32> {
        self.device_id
    }

    /// Sets the line INTx groups use; without one, creating an INTx group fails.
    pub fn with_intx(mut self, line: IntxLine) -> Self {
        self.intx = Some(line);
        self
    }

    /// The routing table the groups edit.
    pub fn routing(&self) -> &Arc<GsiRouting> {
        &self.routing
    }

    /// Number of GSIs of the range not used by a group now.
    pub fn free_gsis(&self) -> u32 {
        lock(&self.gsis).available()
    }

    /// Number of ioctls issued so far through the routing table and the groups (see
    /// [`GsiRouting::ioctl_count`]).
    pub fn ioctl_count(&self) -> u64 {
        self.routing.ioctl_count()
    }

    /// Like [`InterruptManager::create_msi_group`], returning the concrete group. Takes `count`
    /// GSIs from the range; they return to it when the group is dropped.
    pub fn new_msi_group(&self, count: u32) -> Result<Arc<KvmInterruptGroup>> {
        let gsis = lock(&self.gsis).allocate(count)?;
        let vectors = match make_vectors(&gsis) {
            Ok(vectors) => vectors,
            Err(err) => {
                lock(&self.gsis).release(gsis);
                return Err(err);
            }
        };
        Ok(Arc::new(KvmInterruptGroup::new(
            self.routing.clone(),
            vectors,
            Kind::Msi {
                allocator: self.gsis.clone(),
                device_id: self.device_id,
            },
        )))
    }

    /// Like [`InterruptManager::create_intx_group`], returning the concrete group. Routes the
    /// INTx line's GSI to its irqchip pin (committing only if that changes the table).
    pub fn new_intx_group(&self) -> Result<Arc<KvmInterruptGroup>> {
        let line = self.intx.ok_or(Error::NotConfigured(
            "no INTx line was given to the manager",
        ))?;
        let vectors = make_vectors(&[line.gsi])?;
        let resample = new_eventfd()?;
        let route = GsiRoute::Irqchip {
            chip: line.chip,
            pin: line.pin,
        };
        let had_route = self
            .routing
            .routes(line.gsi)
            .iter()
            .any(|r| matches!(r, GsiRoute::Irqchip { chip, .. } if *chip == line.chip));
        self.routing.set_and_commit(line.gsi, route)?;
        Ok(Arc::new(KvmInterruptGroup::new(
            self.routing.clone(),
            vectors,
            Kind::Intx {
                resample,
                route,
                installed_route: !had_route,
            },
        )))
    }
}

impl InterruptManager for KvmInterruptManager {
    fn create_msi_group(
        &self,
        count: u32,
    ) -> pci_interrupts::Result<Arc<dyn InterruptSourceGroup>> {
        let group: Arc<dyn InterruptSourceGroup> = self
            .new_msi_group(count)
            .map_err(|e| group_error("create", e))?;
        Ok(group)
    }

    fn create_intx_group(&self) -> pci_interrupts::Result<Arc<dyn InterruptSourceGroup>> {
        let group: Arc<dyn InterruptSourceGroup> = self
            .new_intx_group()
            .map_err(|e| group_error("create", e))?;
        Ok(group)
    }
}

fn new_eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
        op: "create",
        source,
    })
}

fn make_vectors(gsis: &[u32]) -> Result<Vec<Vector>> {
    gsis.iter()
        .map(|&gsi| {
            Ok(Vector {
                gsi,
                notifier: new_eventfd()?,
            })
        })
        .collect()
}

struct Vector {
    gsi: u32,
    notifier: EventFd,
}

enum Kind {
    Msi {
        allocator: Arc<Mutex<GsiAllocator>>,
        /// The device id the MSI routes carry (arm64 GICv3 ITS), if the VMM gave one.
        device_id: Option<u32>,
    },
    Intx {
        resample: EventFd,
        route: GsiRoute,
        /// Whether the group added the route (and so removes it when dropped).
        installed_route: bool,
    },
}

#[derive(Clone, Copy, Default)]
struct VectorState {
    /// The last `update` said unmasked (and `disable` has not masked it since).
    unmasked: bool,
    /// The MSI route committed to the routing table for this vector's GSI.
    route: Option<MsiRoute>,
    /// The notifier is registered as an irqfd on the vector's GSI.
    registered: bool,
}

struct GroupState {
    enabled: bool,
    vectors: Vec<VectorState>,
}

/// An [`InterruptSourceGroup`] whose vectors are KVM irqfds.
///
/// Each vector has an eventfd (its notifier) and a GSI of its own. A vector is delivered (its
/// eventfd registered as an irqfd on its GSI) exactly while the group is enabled and the vector
/// unmasked; masking unregisters the irqfd but keeps the eventfd, so a signal that arrives while
/// masked stays in the eventfd and KVM injects it when the irqfd is registered again.
///
/// MSI/MSI-X vectors route their GSI with an MSI routing entry holding the guest's address and
/// data. The INTx group has one vector on the manager's [`IntxLine`] and registers its irqfd
/// with a resample eventfd: KVM deasserts the level and signals it when the guest ends the
/// interrupt.
///
/// Only what changes costs an ioctl: an `update` that changes nothing makes none, one that
/// changes a route rewrites the routing table once, and masking or unmasking touches one irqfd.
/// [`trigger`](InterruptSourceGroup::trigger) writes the notifier, exactly as a device does.
pub struct KvmInterruptGroup {
    routing: Arc<GsiRouting>,
    vectors: Vec<Vector>,
    kind: Kind,
    state: Mutex<GroupState>,
}

impl KvmInterruptGroup {
    fn new(routing: Arc<GsiRouting>, vectors: Vec<Vector>, kind: Kind) -> Self {
        let state = GroupState {
            enabled: false,
            vectors: vec![VectorState::default(); vectors.len()],
        };
        Self {
            routing,
            vectors,
            kind,
            state: Mutex::new(state),
        }
    }

    /// The GSI of `vector`, or `None` when out of range.
    pub fn gsi(&self, vector: u32) -> Option<u32> {
        self.vectors.get(vector as usize).map(|v| v.gsi)
    }

    /// Whether the group is enabled.
    pub fn is_enabled(&self) -> bool {
        lock(&self.state).enabled
    }

    /// Whether `vector`'s notifier is registered with KVM as an irqfd now (false when out of
    /// range).
    pub fn is_registered(&self, vector: u32) -> bool {
        lock(&self.state)
            .vectors
            .get(vector as usize)
            .is_some_and(|v| v.registered)
    }

    /// Whether this is the INTx group (one vector, resample eventfd).
    pub fn is_intx(&self) -> bool {
        matches!(self.kind, Kind::Intx { .. })
    }

    fn vector(&self, vector: u32) -> pci_interrupts::Result<&Vector> {
        self.vectors
            .get(vector as usize)
            .ok_or(pci_interrupts::Error::VectorOutOfRange {
                vector,
                count: self.len(),
            })
    }

    /// Registers or unregisters `vector`'s irqfd so that it is registered iff `want`.
    fn sync_irqfd(&self, vector: &Vector, state: &mut VectorState, want: bool) -> Result<()> {
        if state.registered == want {
            return Ok(());
        }
        let vm = self.routing.vm();
        self.routing.count_ioctl();
        if want {
            match &self.kind {
                Kind::Msi { .. } => vm.register_irqfd(&vector.notifier, vector.gsi),
                Kind::Intx { resample, .. } => {
                    vm.register_irqfd_with_resample(&vector.notifier, resample, vector.gsi)
                }
            }
            .map_err(|e| kvm_error("KVM_IRQFD (assign)", e))?;
        } else {
            vm.unregister_irqfd(&vector.notifier, vector.gsi)
                .map_err(|e| kvm_error("KVM_IRQFD (deassign)", e))?;
        }
        state.registered = want;
        Ok(())
    }
}

fn borrow(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: `fd` owns an open descriptor that stays open at least as long as `fd` is
    // borrowed, and the returned lifetime is tied to that borrow.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

impl InterruptSourceGroup for KvmInterruptGroup {
    fn len(&self) -> u32 {
        // Lossless: built from at most `u32` GSIs.
        u32::try_from(self.vectors.len()).unwrap_or(u32::MAX)
    }

    fn notifier(&self, vector: u32) -> Option<BorrowedFd<'_>> {
        self.vectors
            .get(vector as usize)
            .map(|v| borrow(&v.notifier))
    }

    fn resample_notifier(&self, vector: u32) -> Option<BorrowedFd<'_>> {
        match &self.kind {
            Kind::Intx { resample, .. } if vector == 0 => Some(borrow(resample)),
            _ => None,
        }
    }

    fn update(&self, vector: u32, route: MsiRoute, masked: bool) -> pci_interrupts::Result<()> {
        let v = self.vector(vector)?;
        let mut state = lock(&self.state);
        let enabled = state.enabled;
        let Some(vs) = state.vectors.get_mut(vector as usize) else {
            return Err(pci_interrupts::Error::VectorOutOfRange {
                vector,
                count: self.len(),
            });
        };
        let msi_device_id = match self.kind {
            Kind::Msi { device_id, .. } => Some(device_id),
            Kind::Intx { .. } => None,
        };
        // MSI groups route an unmasked vector whose message changed.
        if let (false, Some(devid), true) = (masked, msi_device_id, vs.route != Some(route)) {
            let gsi_route = GsiRoute::Msi {
                address: route.address,
                data: route.data,
                devid,
            };
            self.routing
                .set_and_commit(v.gsi, gsi_route)
                .map_err(|e| group_error("update", e))?;
            vs.route = Some(route);
        }
        vs.unmasked = !masked;
        self.sync_irqfd(v, vs, enabled && !masked)
            .map_err(|e| group_error("update", e))
    }

    fn enable(&self) -> pci_interrupts::Result<()> {
        let mut state = lock(&self.state);
        state.enabled = true;
        let mut first = Ok(());
        for (v, vs) in self.vectors.iter().zip(state.vectors.iter_mut()) {
            let want = vs.unmasked;
            if let Err(e) = self.sync_irqfd(v, vs, want) {
                log::warn!("enabling GSI {}: {e}", v.gsi);
                if first.is_ok() {
                    first = Err(group_error("enable", e));
                }
            }
        }
        first
    }

    fn disable(&self) -> pci_interrupts::Result<()> {
        let mut state = lock(&self.state);
        state.enabled = false;
        let mut first = Ok(());
        for (v, vs) in self.vectors.iter().zip(state.vectors.iter_mut()) {
            vs.unmasked = false;
            if let Err(e) = self.sync_irqfd(v, vs, false) {
                log::warn!("disabling GSI {}: {e}", v.gsi);
                if first.is_ok() {
                    first = Err(group_error("disable", e));
                }
            }
        }
        first
    }

    fn trigger(&self, vector: u32) -> pci_interrupts::Result<()> {
        self.vector(vector)?
            .notifier
            .write(1)
            .map_err(|source| pci_interrupts::Error::EventFd {
                op: "write",
                source,
            })
    }
}

impl Drop for KvmInterruptGroup {
    fn drop(&mut self) {
        let state = lock(&self.state);
        for (v, vs) in self.vectors.iter().zip(state.vectors.iter()) {
            if vs.registered {
                self.routing.count_ioctl();
                if let Err(e) = self.routing.vm().unregister_irqfd(&v.notifier, v.gsi) {
                    log::warn!("unregistering the irqfd of GSI {}: {e}", v.gsi);
                }
            }
        }
        let gsis = self.vectors.iter().map(|v| v.gsi);
        let result = match &self.kind {
            Kind::Msi { allocator, .. } => {
                let result = self.routing.remove_all_and_commit(gsis.clone());
                lock(allocator).release(gsis);
                result
            }
            Kind::Intx {
                route,
                installed_route: true,
                ..
            } => self
                .routing
                .remove_all_routes_and_commit(gsis.map(|gsi| (gsi, *route))),
            Kind::Intx { .. } => Ok(()),
        };
        drop(state);
        if let Err(e) = result {
            log::warn!("removing the routes of a dropped interrupt group: {e}");
        }
    }
}

impl std::fmt::Debug for KvmInterruptGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmInterruptGroup")
            .field("intx", &self.is_intx())
            .field(
                "gsis",
                &self.vectors.iter().map(|v| v.gsi).collect::<Vec<_>>(),
            )
            .field("enabled", &self.is_enabled())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocator(range: Range<u32>) -> GsiAllocator {
        GsiAllocator {
            next: range.start,
            range,
            free: BTreeSet::new(),
        }
    }

    #[test]
    fn gsis_come_from_the_vmm_range_only_and_are_reused_after_release() {
        let mut a = allocator(40..44);
        let first = a.allocate(3).unwrap();
        assert_eq!(first, vec![40, 41, 42]);
        assert!(matches!(
            a.allocate(2),
            Err(Error::Exhausted {
                requested: 2,
                start: 40,
                end: 44,
                ..
            })
        ));
        a.release([41]);
        assert_eq!(a.allocate(2).unwrap(), vec![41, 43]);
        assert_eq!(a.available(), 0);
    }

    #[test]
    fn releasing_a_gsi_not_handed_out_is_ignored() {
        let mut a = allocator(40..42);
        a.release([7, 41, 40]);
        assert_eq!(a.available(), 2);
        assert_eq!(a.allocate(2).unwrap(), vec![40, 41]);
    }
}
