//! The VM's GSI routing table, shared by the VMM and the interrupt groups.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    KVM_MSI_VALID_DEVID,
};
use kvm_ioctls::VmFd;

use super::kvm_error;
use crate::{Error, Result};

/// Number of routing entries, and the bound on GSI numbers, that KVM accepts
/// (`KVM_MAX_IRQ_ROUTES`).
pub const MAX_GSI_ROUTES: u32 = 4096;

/// Where KVM sends a GSI: one entry of the routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GsiRoute {
    /// A message-signalled interrupt (`KVM_IRQ_ROUTING_MSI`).
    Msi {
        /// Message address (low and high halves).
        address: u64,
        /// Message data.
        data: u32,
        /// The device id of the requester, for interrupt controllers that translate MSIs
        /// per device: on arm64 the GICv3 ITS looks the message up in the device's table, so
        /// KVM needs it (the entry's `devid` with the `KVM_MSI_VALID_DEVID` flag; KVM refuses
        /// MSI routes without it on a VM whose vGIC has an ITS). On arm64 the value is what
        /// the guest's firmware tables map the PCI requester id to (with an identity
        /// `msi-map`/IORT mapping, the requester id `bus << 8 | devfn`). `None` leaves the
        /// entry as x86 wants it: flags 0, no device id.
        devid: Option<u32>,
    },
    /// A pin of an in-kernel interrupt controller (`KVM_IRQ_ROUTING_IRQCHIP`).
    Irqchip {
        /// `KVM_IRQCHIP_PIC_MASTER` (0), `KVM_IRQCHIP_PIC_SLAVE` (1) or `KVM_IRQCHIP_IOAPIC` (2).
        chip: u32,
        /// Pin on that controller.
        pin: u32,
    },
}

/// Key of an entry: a GSI has at most one entry per irqchip, or exactly one non-irqchip entry
/// (KVM refuses anything else with `EINVAL`).
type Key = (u32, u32);
const NON_IRQCHIP: u32 = u32::MAX;

fn key(gsi: u32, route: &GsiRoute) -> Key {
    match *route {
        GsiRoute::Msi { .. } => (gsi, NON_IRQCHIP),
        GsiRoute::Irqchip { chip, .. } => (gsi, chip),
    }
}

fn to_entry(gsi: u32, route: &GsiRoute) -> kvm_irq_routing_entry {
    let mut entry = kvm_irq_routing_entry {
        gsi,
        ..Default::default()
    };
    match *route {
        GsiRoute::Msi {
            address,
            data,
            devid,
        } => {
            entry.type_ = KVM_IRQ_ROUTING_MSI;
            // Truncations intended: the address is split in its two halves.
            entry.u.msi.address_lo = address as u32;
            entry.u.msi.address_hi = (address >> 32) as u32;
            entry.u.msi.data = data;
            if let Some(devid) = devid {
                entry.flags = KVM_MSI_VALID_DEVID;
                entry.u.msi.__bindgen_anon_1.devid = devid;
            }
        }
        GsiRoute::Irqchip { chip, pin } => {
            entry.type_ = KVM_IRQ_ROUTING_IRQCHIP;
            entry.u.irqchip.irqchip = chip;
            entry.u.irqchip.pin = pin;
        }
    }
    entry
}

struct Table {
    routes: BTreeMap<Key, GsiRoute>,
    /// Whether `routes` differs from what KVM was last given.
    dirty: bool,
    /// The buffer handed to `KVM_SET_GSI_ROUTING`, reused while the entry count stays the same.
    buffer: Option<KvmIrqRouting>,
}

impl Table {
    fn add(&mut self, gsi: u32, route: GsiRoute) -> Result<bool> {
        if gsi >= MAX_GSI_ROUTES {
            return Err(Error::Invalid {
                what: "GSI",
                value: gsi.into(),
                reason: "KVM accepts GSIs below KVM_MAX_IRQ_ROUTES (4096)",
            });
        }
        let new_key = key(gsi, &route);
        let conflicting: Vec<Key> = self
            .routes
            .range((gsi, 0)..=(gsi, NON_IRQCHIP))
            .map(|(k, _)| *k)
            .filter(|k| *k != new_key && (k.1 == NON_IRQCHIP || new_key.1 == NON_IRQCHIP))
            .collect();
        if conflicting.is_empty() && self.routes.get(&new_key) == Some(&route) {
            return Ok(false);
        }
        let after = self
            .routes
            .len()
            .saturating_sub(conflicting.len())
            .saturating_add(usize::from(!self.routes.contains_key(&new_key)));
        if after > MAX_GSI_ROUTES as usize {
            return Err(Error::Exhausted {
                resource: "routing entries",
                requested: 1,
                start: 0,
                end: MAX_GSI_ROUTES,
            });
        }
        for k in conflicting {
            self.routes.remove(&k);
        }
        self.routes.insert(new_key, route);
        self.dirty = true;
        Ok(true)
    }

    fn routes_of(&self, gsi: u32) -> Vec<GsiRoute> {
        self.routes
            .range((gsi, 0)..=(gsi, NON_IRQCHIP))
            .map(|(_, r)| *r)
            .collect()
    }

    fn remove(&mut self, gsi: u32) -> bool {
        let keys: Vec<Key> = self
            .routes
            .range((gsi, 0)..=(gsi, NON_IRQCHIP))
            .map(|(k, _)| *k)
            .collect();
        for k in &keys {
            self.routes.remove(k);
        }
        let changed = !keys.is_empty();
        self.dirty |= changed;
        changed
    }
}

/// The VM's GSI routing table.
///
/// `KVM_SET_GSI_ROUTING` replaces the whole table, so every user of GSIs in a VM (the VMM's own
/// devices and the [`KvmInterruptManager`](super::KvmInterruptManager)s) must edit this one
/// copy: [`add`](Self::add) / [`remove`](Self::remove) change it in memory, and
/// [`commit`](Self::commit) hands it to KVM. Note that the first commit also replaces the
/// default routes KVM sets up with its in-kernel irqchip: call
/// [`add_x86_legacy_routes`](Self::add_x86_legacy_routes) (or add your own) before.
///
/// The table follows KVM's rules: a GSI has at most one route per irqchip, or one MSI route
/// and nothing else, so adding a route replaces the ones it would conflict with.
pub struct GsiRouting {
    vm: Arc<VmFd>,
    table: Mutex<Table>,
    ioctls: AtomicU64,
}

impl GsiRouting {
    /// An empty table for `vm` (nothing is sent to KVM until [`commit`](Self::commit)).
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            table: Mutex::new(Table {
                routes: BTreeMap::new(),
                dirty: false,
                buffer: None,
            }),
            ioctls: AtomicU64::new(0),
        }
    }

    /// The VM this table belongs to.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        super::lock(&self.table)
    }

    /// Adds the routes KVM installs by default with `KVM_CREATE_IRQCHIP` on x86: GSIs 0-15 to
    /// the PIC pins and GSIs 0-23 to the IOAPIC pins of the same number. Does not commit.
    #[cfg(target_arch = "x86_64")]
    pub fn add_x86_legacy_routes(&self) -> Result<()> {
        use kvm_bindings::{KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
        for gsi in 0..24 {
            self.add(
                gsi,
                GsiRoute::Irqchip {
                    chip: KVM_IRQCHIP_IOAPIC,
                    pin: gsi,
                },
            )?;
            if gsi < 16 {
                let chip = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                self.add(gsi, GsiRoute::Irqchip { chip, pin: gsi % 8 })?;
            }
        }
        Ok(())
    }

    /// Sets a route for `gsi`, replacing the routes of `gsi` it would conflict with (see the
    /// type docs). Returns whether the table changed. Does not commit.
    pub fn add(&self, gsi: u32, route: GsiRoute) -> Result<bool> {
        self.lock().add(gsi, route)
    }

    /// Removes every route of `gsi`. Returns whether the table changed. Does not commit.
    pub fn remove(&self, gsi: u32) -> bool {
        self.lock().remove(gsi)
    }

    /// Removes the route of `gsi` that `route` would occupy (same GSI and same irqchip, or the
    /// MSI route), whatever its pin or message. Returns whether the table changed. Does not
    /// commit.
    pub fn remove_route(&self, gsi: u32, route: &GsiRoute) -> bool {
        let mut table = self.lock();
        let changed = table.routes.remove(&key(gsi, route)).is_some();
        table.dirty |= changed;
        changed
    }

    /// The routes of `gsi` in the table (committed or not).
    pub fn routes(&self, gsi: u32) -> Vec<GsiRoute> {
        self.lock().routes_of(gsi)
    }

    /// Number of entries in the table.
    pub fn len(&self) -> usize {
        self.lock().routes.len()
    }

    /// Whether the table has no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the table has changes that were not committed.
    pub fn is_dirty(&self) -> bool {
        self.lock().dirty
    }

    /// Hands the table to KVM (`KVM_SET_GSI_ROUTING`) if it changed since the last successful
    /// commit; makes no ioctl otherwise. On failure the changes stay pending.
    pub fn commit(&self) -> Result<()> {
        let mut table = self.lock();
        self.commit_locked(&mut table)
    }

    /// Sets `route` for `gsi` and commits; if the commit fails, the previous routes of `gsi`
    /// are put back, so the table again matches what KVM has. Returns whether anything changed.
    pub(crate) fn set_and_commit(&self, gsi: u32, route: GsiRoute) -> Result<bool> {
        let mut table = self.lock();
        let before = table.routes_of(gsi);
        let was_dirty = table.dirty;
        if !table.add(gsi, route)? {
            return Ok(false);
        }
        match self.commit_locked(&mut table) {
            Ok(()) => Ok(true),
            Err(err) => {
                table.routes.retain(|k, _| k.0 != gsi);
                for r in before {
                    table.routes.insert(key(gsi, &r), r);
                }
                table.dirty = was_dirty;
                Err(err)
            }
        }
    }

    /// Removes every route of the given GSIs and commits once (used when a group goes away).
    pub(crate) fn remove_all_and_commit(&self, gsis: impl IntoIterator<Item = u32>) -> Result<()> {
        let mut table = self.lock();
        for gsi in gsis {
            table.remove(gsi);
        }
        self.commit_locked(&mut table)
    }

    /// Removes the given routes (by GSI and irqchip) and commits once.
    pub(crate) fn remove_all_routes_and_commit(
        &self,
        routes: impl IntoIterator<Item = (u32, GsiRoute)>,
    ) -> Result<()> {
        let mut table = self.lock();
        for (gsi, route) in routes {
            let changed = table.routes.remove(&key(gsi, &route)).is_some();
            table.dirty |= changed;
        }
        self.commit_locked(&mut table)
    }

    fn commit_locked(&self, table: &mut Table) -> Result<()> {
        if !table.dirty {
            return Ok(());
        }
        let entries = table
            .routes
            .iter()
            .map(|((gsi, _), route)| to_entry(*gsi, route));
        let reuse = table
            .buffer
            .as_ref()
            .is_some_and(|b| b.as_slice().len() == table.routes.len());
        if !reuse {
            let all: Vec<kvm_irq_routing_entry> = entries.collect();
            let buffer = KvmIrqRouting::from_entries(&all).map_err(|_| Error::Invalid {
                what: "routing table size",
                value: all.len() as u64,
                reason: "more entries than KVM_MAX_IRQ_ROUTES",
            })?;
            table.buffer = Some(buffer);
        } else if let Some(buffer) = table.buffer.as_mut() {
            for (slot, entry) in buffer.as_mut_slice().iter_mut().zip(entries) {
                *slot = entry;
            }
        }
        let Some(buffer) = table.buffer.as_ref() else {
            return Ok(());
        };
        self.ioctls.fetch_add(1, Ordering::Relaxed);
        self.vm
            .set_gsi_routing(buffer)
            .map_err(|e| kvm_error("KVM_SET_GSI_ROUTING", e))?;
        table.dirty = false;
        Ok(())
    }

    /// Counts an ioctl made on behalf of this table's users (interrupt groups).
    pub(crate) fn count_ioctl(&self) {
        self.ioctls.fetch_add(1, Ordering::Relaxed);
    }

    /// Number of ioctls issued so far through this table and the interrupt groups that use
    /// it (`KVM_SET_GSI_ROUTING`, `KVM_IRQFD` register and unregister, `KVM_SIGNAL_MSI`),
    /// failed ones included. For tests and metrics.
    pub fn ioctl_count(&self) -> u64 {
        self.ioctls.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for GsiRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let table = self.lock();
        f.debug_struct("GsiRouting")
            .field("entries", &table.routes.len())
            .field("dirty", &table.dirty)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msi_route_is_split_into_address_halves() {
        let e = to_entry(
            40,
            &GsiRoute::Msi {
                address: 0x1234_5678_fee0_1000,
                data: 0x4041,
                devid: None,
            },
        );
        assert_eq!(e.gsi, 40);
        assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
        assert_eq!(
            e.flags, 0,
            "no device id: no KVM_MSI_VALID_DEVID (as x86 wants)"
        );
        // SAFETY: the entry was written as an MSI entry just above.
        let msi = unsafe { e.u.msi };
        assert_eq!(msi.address_lo, 0xfee0_1000);
        assert_eq!(msi.address_hi, 0x1234_5678);
        assert_eq!(msi.data, 0x4041);
        // SAFETY: both members of the union are a u32; `pad` is what x86 leaves at 0.
        assert_eq!(unsafe { msi.__bindgen_anon_1.pad }, 0);
    }

    #[test]
    fn msi_route_with_device_id_sets_kvm_msi_valid_devid() {
        // KVM's uAPI: an MSI routing entry carries the requester's device id (GICv3 ITS)
        // in `u.msi.devid` and says so with `flags = KVM_MSI_VALID_DEVID` (1).
        let e = to_entry(
            41,
            &GsiRoute::Msi {
                address: 0x0808_0040,
                data: 7,
                devid: Some(0x0010),
            },
        );
        assert_eq!(e.gsi, 41);
        assert_eq!(e.type_, KVM_IRQ_ROUTING_MSI);
        assert_eq!(e.flags, KVM_MSI_VALID_DEVID);
        assert_eq!(KVM_MSI_VALID_DEVID, 1);
        // SAFETY: the entry was written as an MSI entry just above.
        let msi = unsafe { e.u.msi };
        assert_eq!(msi.address_lo, 0x0808_0040);
        assert_eq!(msi.address_hi, 0);
        assert_eq!(msi.data, 7);
        // SAFETY: `devid` is a u32 member of a union of u32s.
        assert_eq!(unsafe { msi.__bindgen_anon_1.devid }, 0x0010);
    }

    #[test]
    fn msi_routes_differing_only_in_device_id_are_different_routes() {
        let a = GsiRoute::Msi {
            address: 0xfee0_0000,
            data: 1,
            devid: Some(1),
        };
        let b = GsiRoute::Msi {
            address: 0xfee0_0000,
            data: 1,
            devid: Some(2),
        };
        assert_ne!(a, b);
        assert_eq!(
            key(3, &a),
            key(3, &b),
            "one MSI route per GSI, whatever the device id"
        );
    }
}
