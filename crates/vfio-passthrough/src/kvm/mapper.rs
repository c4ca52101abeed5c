//! [`GuestMapper`] over KVM user memory slots.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, VmFd};
use vfio_pci::{GuestMapper, MappingId};

use super::kvm_error;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug)]
struct Mapping {
    region: kvm_userspace_memory_region,
}

impl Mapping {
    fn gpa(&self) -> u64 {
        self.region.guest_phys_addr
    }

    fn end(&self) -> u64 {
        self.region
            .guest_phys_addr
            .saturating_add(self.region.memory_size)
    }
}

#[derive(Debug)]
struct Slots {
    /// Lowest slot of the VMM's range never used.
    next: u32,
    /// Slots used and given back.
    freed: BTreeSet<u32>,
    mappings: BTreeMap<MappingId, Mapping>,
    next_id: u64,
}

/// A [`GuestMapper`] that maps host memory (mmapped BARs) into the guest with KVM user memory
/// slots (`KVM_SET_USER_MEMORY_REGION`), taken from a range of slot numbers the VMM reserves.
///
/// Read-only mappings use `KVM_MEM_READONLY` (guest writes then exit as MMIO); where KVM lacks
/// `KVM_CAP_READONLY_MEM` they fail with [`std::io::ErrorKind::Unsupported`], which tells the
/// device to trap the range instead. A mapping that overlaps one made earlier is refused with
/// [`std::io::ErrorKind::AlreadyExists`] (KVM itself refuses overlaps with the VMM's own slots,
/// with `EEXIST`). Unmapping deletes the slot (size 0) and makes its number free again. Slots
/// still mapped when the mapper is dropped are deleted then, so the guest never keeps a window
/// on host memory the device has let go of.
pub struct KvmGuestMapper {
    vm: Arc<VmFd>,
    slot_range: Range<u32>,
    page_size: u64,
    readonly_supported: bool,
    slots: Mutex<Slots>,
}

impl KvmGuestMapper {
    /// A mapper that uses the memory slots `slots` of `vm` (the VMM keeps the others, e.g. for
    /// guest RAM). The range must be non-empty.
    pub fn new(vm: Arc<VmFd>, slots: Range<u32>) -> Result<Self> {
        if slots.is_empty() {
            return Err(Error::Invalid {
                what: "memory slot range end",
                value: slots.end.into(),
                reason: "the slot range is empty",
            });
        }
        let readonly_supported = vm.check_extension(Cap::ReadonlyMem);
        Ok(Self {
            vm,
            page_size: host_page_size(),
            readonly_supported,
            slots: Mutex::new(Slots {
                next: slots.start,
                freed: BTreeSet::new(),
                mappings: BTreeMap::new(),
                next_id: 0,
            }),
            slot_range: slots,
        })
    }

    /// The slot numbers this mapper uses.
    pub fn slot_range(&self) -> Range<u32> {
        self.slot_range.clone()
    }

    /// Whether KVM supports read-only slots (`KVM_CAP_READONLY_MEM`).
    pub fn readonly_supported(&self) -> bool {
        self.readonly_supported
    }

    /// The KVM slot number of a live mapping.
    pub fn slot_of(&self, id: MappingId) -> Option<u32> {
        self.lock().mappings.get(&id).map(|m| m.region.slot)
    }

    /// Number of live mappings.
    pub fn mapping_count(&self) -> usize {
        self.lock().mappings.len()
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        super::lock(&self.slots)
    }

    fn check(&self, gpa: u64, size: u64, host: u64) -> Result<()> {
        let mask = self.page_size.saturating_sub(1);
        let checks = [
            ("mapping size", size, size == 0, "the size is zero"),
            ("mapping size", size, size & mask != 0, "not page aligned"),
            (
                "guest physical address",
                gpa,
                gpa & mask != 0,
                "not page aligned",
            ),
            ("host address", host, host & mask != 0, "not page aligned"),
            (
                "guest physical address",
                gpa,
                gpa.checked_add(size).is_none(),
                "the range wraps around",
            ),
        ];
        match checks.into_iter().find(|c| c.2) {
            Some((what, value, _, reason)) => Err(Error::Invalid {
                what,
                value,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// # Safety
    /// The [`GuestMapper::map`] contract: `size` bytes at `host` stay
    /// mapped until the mapping is removed.
    unsafe fn map_inner(
        &self,
        gpa: u64,
        size: u64,
        host: *mut u8,
        read_only: bool,
    ) -> Result<MappingId> {
        let host = host as u64;
        self.check(gpa, size, host)?;
        if read_only && !self.readonly_supported {
            return Err(Error::NotConfigured(
                "read-only memory slots (KVM_CAP_READONLY_MEM)",
            ));
        }
        let mut slots = self.lock();
        let end = gpa.saturating_add(size);
        if let Some(other) = slots
            .mappings
            .values()
            .find(|m| m.gpa() < end && gpa < m.end())
        {
            return Err(Error::Overlap {
                gpa,
                size,
                other_gpa: other.gpa(),
                other_size: other.region.memory_size,
            });
        }
        let fresh = (slots.next < self.slot_range.end).then_some(slots.next);
        let Some(slot) = slots.freed.first().copied().or(fresh) else {
            return Err(Error::Exhausted {
                resource: "memory slots",
                requested: 1,
                start: self.slot_range.start,
                end: self.slot_range.end,
            });
        };
        let region = kvm_userspace_memory_region {
            slot,
            flags: if read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: by the `GuestMapper` contract the caller keeps `size` bytes at `host` mapped
        // until it unmaps this mapping (and `Drop` deletes any slot still mapped), so the slot
        // never points the guest at memory the device has released. KVM checks the region
        // itself and only accesses it through the page tables of this process.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| kvm_error("KVM_SET_USER_MEMORY_REGION", e))?;
        if !slots.freed.remove(&slot) {
            slots.next = slots.next.saturating_add(1);
        }
        let id = MappingId(slots.next_id);
        slots.next_id = slots.next_id.wrapping_add(1);
        slots.mappings.insert(id, Mapping { region });
        Ok(id)
    }

    fn delete_slot(&self, mapping: &Mapping) -> Result<()> {
        let region = kvm_userspace_memory_region {
            memory_size: 0,
            ..mapping.region
        };
        // SAFETY: a zero size deletes the slot; KVM then no longer refers to any host memory.
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| kvm_error("KVM_SET_USER_MEMORY_REGION (delete)", e))
    }

    fn unmap_inner(&self, id: MappingId) -> Result<()> {
        let mut slots = self.lock();
        let mapping = *slots.mappings.get(&id).ok_or(Error::UnknownMapping(id.0))?;
        self.delete_slot(&mapping)?;
        slots.mappings.remove(&id);
        slots.freed.insert(mapping.region.slot);
        Ok(())
    }
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

impl GuestMapper for KvmGuestMapper {
    /// Makes `size` bytes at `host` a KVM memory slot at `gpa`.
    ///
    /// # Safety
    /// As [`GuestMapper::map`]: the guest reaches that memory through the
    /// slot until [`GuestMapper::unmap`] (or this mapper's drop).
    unsafe fn map(
        &self,
        gpa: u64,
        size: u64,
        host: *mut u8,
        read_only: bool,
    ) -> std::io::Result<MappingId> {
        // SAFETY: the caller's contract is map_inner's.
        unsafe { self.map_inner(gpa, size, host, read_only) }.map_err(std::io::Error::from)
    }

    fn unmap(&self, id: MappingId) -> std::io::Result<()> {
        self.unmap_inner(id).map_err(std::io::Error::from)
    }
}

impl Drop for KvmGuestMapper {
    fn drop(&mut self) {
        let slots = self.lock();
        for mapping in slots.mappings.values() {
            if let Err(e) = self.delete_slot(mapping) {
                log::error!("deleting memory slot {}: {e}", mapping.region.slot);
            }
        }
    }
}

impl std::fmt::Debug for KvmGuestMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmGuestMapper")
            .field("slot_range", &self.slot_range)
            .field("mappings", &self.mapping_count())
            .field("readonly_supported", &self.readonly_supported)
            .finish()
    }
}
