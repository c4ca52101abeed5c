//! The MSI capability (PCI Local Bus 3.0 §6.8.1; PCIe Base §7.7.1).
//!
//! Layout relative to the capability offset:
//!
//! | offset | 32-bit | 64-bit |
//! | --- | --- | --- |
//! | 0x00 | ID, next | ID, next |
//! | 0x02 | message control | message control |
//! | 0x04 | message address | message address |
//! | 0x08 | message data | message upper address |
//! | 0x0c | mask bits (PVM) | message data |
//! | 0x10 | pending bits (PVM) | mask bits (PVM) |
//! | 0x14 | | pending bits (PVM) |

use std::fmt;
use std::sync::Arc;

use pci_config::cap_id;
use serde::{Deserialize, Serialize};

use crate::regs::{self, keep_first, push_vector, Pushed};
use crate::{Delivery, Error, InterruptSourceGroup, MsiRoute, Result};

/// Most vectors an MSI function can request.
pub const MSI_MAX_VECTORS: u32 = 32;

const CONTROL: usize = 2;
const ADDRESS_LO: usize = 4;
const CTL_ENABLE: u16 = 1;
const CTL_MMC_SHIFT: u16 = 1;
const CTL_MME_SHIFT: u16 = 4;
const CTL_MM_FIELD: u16 = 0x7;
const CTL_64BIT: u16 = 1 << 7;
const CTL_PVM: u16 = 1 << 8;
/// Largest valid log2 of the vector count (32 vectors); encodings 6 and 7 are reserved.
const MAX_LOG2: u16 = 5;
/// Largest register window (64-bit with per-vector masking).
const MAX_WINDOW: usize = 0x18;

/// Guest-visible MSI state of one function, and the binding to the group that delivers it.
///
/// Feed it the guest's configuration accesses to the capability with [`read`](Self::read) and
/// [`write`](Self::write) (offsets relative to the capability). Message control's enable bit
/// enables and disables the bound group; routes and masks of the vectors the guest allocated
/// are pushed to it when they change, and only then.
#[derive(Clone)]
pub struct MsiState {
    /// Register image; bytes past `window` are unused.
    image: [u8; MAX_WINDOW],
    /// Writable bits of `image`.
    wmask: [u8; MAX_WINDOW],
    /// Register window: the capability length rounded up to a dword.
    window: usize,
    addr64: bool,
    pvm: bool,
    /// log2 of the vectors the function can request (Multiple Message Capable).
    log2_capable: u16,
    group: Option<Arc<dyn InterruptSourceGroup>>,
    group_enabled: bool,
    pushed: [Pushed; MSI_MAX_VECTORS as usize],
}

/// Snapshot of [`MsiState`]: the structure (to check against) and the guest-writable state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiSnapshot {
    /// Whether the capability has a 64-bit address.
    pub addr64: bool,
    /// Whether the capability has per-vector masking.
    pub per_vector_mask: bool,
    /// Vectors the function can request.
    pub max_vectors: u32,
    /// Message control register.
    pub control: u16,
    /// Message address (both halves).
    pub address: u64,
    /// Message data.
    pub data: u16,
    /// Mask bits.
    pub mask: u32,
    /// Pending bits.
    pub pending: u32,
}

impl MsiState {
    /// An MSI capability able to request `max_vectors` (a power of two, 1..=32), with a 64-bit
    /// address or not, with per-vector masking or not. The next-capability pointer reads 0.
    pub fn new(max_vectors: u32, addr64: bool, per_vector_mask: bool) -> Result<Self> {
        if !max_vectors.is_power_of_two() || max_vectors > MSI_MAX_VECTORS {
            return Err(Error::InvalidCapability {
                capability: "MSI",
                reason: "vector count must be a power of two from 1 to 32",
            });
        }
        // Lossless: max_vectors <= 32, so trailing_zeros <= 5.
        let log2 = max_vectors.trailing_zeros() as u16;
        Ok(Self::build(0, log2, addr64, per_vector_mask))
    }

    /// Takes the capability's structure from a device's capability bytes (starting at the
    /// capability ID): next pointer, Multiple Message Capable, 64-bit and per-vector-masking
    /// bits. Guest-writable state starts at its reset value (disabled, everything zero),
    /// whatever the device held. A reserved Multiple Message Capable encoding counts as 32.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let invalid = |reason| Error::InvalidCapability {
            capability: "MSI",
            reason,
        };
        if bytes.len() < 4 {
            return Err(invalid("fewer than 4 bytes"));
        }
        if bytes.first() != Some(&cap_id::MSI) {
            return Err(invalid("capability ID is not 0x05"));
        }
        let next = bytes.get(1).copied().unwrap_or(0);
        let control = regs::le16(bytes, CONTROL);
        let log2 = ((control >> CTL_MMC_SHIFT) & CTL_MM_FIELD).min(MAX_LOG2);
        Ok(Self::build(
            next,
            log2,
            control & CTL_64BIT != 0,
            control & CTL_PVM != 0,
        ))
    }

    fn build(next: u8, log2_capable: u16, addr64: bool, pvm: bool) -> Self {
        let mut s = Self {
            image: [0; MAX_WINDOW],
            wmask: [0; MAX_WINDOW],
            window: 0,
            addr64,
            pvm,
            log2_capable,
            group: None,
            group_enabled: false,
            pushed: [None; MSI_MAX_VECTORS as usize],
        };
        s.window = s.cap_len().next_multiple_of(4);
        s.image[0] = cap_id::MSI;
        s.image[1] = next;
        let mut control = log2_capable << CTL_MMC_SHIFT;
        if addr64 {
            control |= CTL_64BIT;
        }
        if pvm {
            control |= CTL_PVM;
        }
        regs::put_le(&mut s.image, CONTROL, &control.to_le_bytes());
        // Enable and Multiple Message Enable are the writable control bits.
        let control_wmask = CTL_ENABLE | (CTL_MM_FIELD << CTL_MME_SHIFT);
        regs::put_le(&mut s.wmask, CONTROL, &control_wmask.to_le_bytes());
        // Address bits 1:0 are hardwired to zero (dword-aligned messages).
        regs::put_le(&mut s.wmask, ADDRESS_LO, &0xffff_fffc_u32.to_le_bytes());
        if addr64 {
            regs::put_le(&mut s.wmask, ADDRESS_LO + 4, &u32::MAX.to_le_bytes());
        }
        let data = s.data_offset();
        regs::put_le(&mut s.wmask, data, &u16::MAX.to_le_bytes());
        if let Some(mask) = s.mask_offset() {
            // Mask bits of vectors the function does not implement are reserved (read 0).
            let implemented = s.implemented_bits();
            regs::put_le(&mut s.wmask, mask, &implemented.to_le_bytes());
        }
        s
    }

    /// Length of the capability in bytes: 10, 14, 20 or 24 (32/64-bit, without/with per-vector
    /// masking). Accesses up to the next dword boundary are accepted (reserved bytes read 0).
    pub fn cap_len(&self) -> usize {
        match (self.addr64, self.pvm) {
            (false, false) => 0x0a,
            (true, false) => 0x0e,
            (false, true) => 0x14,
            (true, true) => 0x18,
        }
    }

    /// Whether the message address has an upper half (64-bit capable).
    pub fn is_64bit(&self) -> bool {
        self.addr64
    }

    /// Whether the capability has mask and pending bits (per-vector masking).
    pub fn per_vector_mask(&self) -> bool {
        self.pvm
    }

    /// Vectors the function can request (Multiple Message Capable).
    pub fn max_vectors(&self) -> u32 {
        1 << self.log2_capable
    }

    /// Whether the guest has set MSI Enable.
    pub fn enabled(&self) -> bool {
        self.control() & CTL_ENABLE != 0
    }

    /// Vectors the guest allocated (Multiple Message Enable) when MSI is enabled; 0 when not.
    pub fn num_enabled_vectors(&self) -> u32 {
        if self.enabled() {
            self.allocated()
        } else {
            0
        }
    }

    /// Whether `vector`'s mask bit is set (false without per-vector masking or out of range).
    pub fn vector_masked(&self, vector: u32) -> bool {
        self.mask_offset()
            .is_some_and(|off| bit(regs::le32(&self.image, off), vector))
    }

    /// Offset of the Pending Bits register in the capability (PCI Local Bus 3.0 §6.8.1.8:
    /// 0x10, or 0x14 with 64-bit addresses), or `None` without per-vector masking.
    pub fn pending_offset(&self) -> Option<u64> {
        self.mask_offset().map(|off| off as u64 + 4)
    }

    /// Whether `vector`'s pending bit is set.
    pub fn pending(&self, vector: u32) -> bool {
        self.mask_offset()
            .is_some_and(|off| bit(regs::le32(&self.image, off + 4), vector))
    }

    /// The route `vector` uses: the programmed address, and the data with the vector number in
    /// its low bits (as many bits as Multiple Message Enable allocates).
    pub fn route(&self, vector: u32) -> MsiRoute {
        let low = regs::le32(&self.image, ADDRESS_LO);
        let high = if self.addr64 {
            regs::le32(&self.image, ADDRESS_LO + 4)
        } else {
            0
        };
        let data = u32::from(regs::le16(&self.image, self.data_offset()));
        let low_bits = self.allocated() - 1;
        MsiRoute {
            address: (u64::from(high) << 32) | u64::from(low),
            data: (data & !low_bits) | (vector & low_bits),
        }
    }

    /// Whether `vector` reaches the guest now: MSI enabled, vector allocated and not masked.
    pub fn vector_deliverable(&self, vector: u32) -> bool {
        self.enabled() && vector < self.allocated() && !self.vector_masked(vector)
    }

    /// The bound group, if any.
    pub fn group(&self) -> Option<&Arc<dyn InterruptSourceGroup>> {
        self.group.as_ref()
    }

    /// Binds `group` (fresh from an [`InterruptManager`](crate::InterruptManager): disabled,
    /// all vectors masked) and brings it up to date with the guest-visible state. The previous
    /// group, if any, is left as it is. `None` unbinds.
    pub fn set_group(&mut self, group: Option<Arc<dyn InterruptSourceGroup>>) -> Result<()> {
        self.group = group;
        self.group_enabled = false;
        self.pushed = [None; MSI_MAX_VECTORS as usize];
        self.reconcile()
    }

    /// Guest read of the capability at `offset` (relative to the capability).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let window = self.image.get(..self.window).unwrap_or_default();
        if !regs::read_image(window, offset, data) {
            log::debug!("MSI: ignored read of {} bytes at {offset:#x}", data.len());
        }
    }

    /// Guest write of the capability at `offset` (relative to the capability). Read-only bits
    /// keep their value; Multiple Message Enable is clamped to Multiple Message Capable. Changes
    /// are pushed to the bound group; an `Err` is the first group call that failed (the
    /// registers are updated regardless and the other calls still made).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        if !self.store(offset, data) {
            log::debug!("MSI: ignored write of {} bytes at {offset:#x}", data.len());
            return Ok(());
        }
        self.clamp_multiple_message_enable();
        self.reconcile()
    }

    /// The device raises `vector`. Delivered when deliverable; recorded as pending when masked
    /// by its mask bit; dropped when MSI is disabled or the vector is not allocated.
    pub fn fire(&mut self, vector: u32) -> Result<Delivery> {
        if vector >= self.max_vectors() {
            return Err(Error::VectorOutOfRange {
                vector,
                count: self.max_vectors(),
            });
        }
        if !self.enabled() || vector >= self.allocated() {
            return Ok(Delivery::Dropped);
        }
        if self.vector_masked(vector) {
            self.set_pending(vector, true);
            return Ok(Delivery::Pending);
        }
        regs::trigger_unmasked(
            self.group.as_ref(),
            self.group_enabled,
            &self.pushed,
            vector,
            "MSI",
        )
    }

    /// Returns the guest-writable state to its reset value (MSI disabled, everything zero),
    /// disabling the bound group if it was enabled.
    pub fn reset(&mut self) -> Result<()> {
        let control = self.control() & !(CTL_ENABLE | (CTL_MM_FIELD << CTL_MME_SHIFT));
        let window = self.window;
        if let Some(regs) = self.image.get_mut(CONTROL + 2..window) {
            regs.fill(0);
        }
        regs::put_le(&mut self.image, CONTROL, &control.to_le_bytes());
        self.reconcile()
    }

    /// Snapshot of the state.
    pub fn snapshot(&self) -> MsiSnapshot {
        let route = self.route(0);
        let (mask, pending) = match self.mask_offset() {
            Some(off) => (
                regs::le32(&self.image, off),
                regs::le32(&self.image, off + 4),
            ),
            None => (0, 0),
        };
        MsiSnapshot {
            addr64: self.addr64,
            per_vector_mask: self.pvm,
            max_vectors: self.max_vectors(),
            control: self.control(),
            address: route.address,
            data: regs::le16(&self.image, self.data_offset()),
            mask,
            pending,
        }
    }

    /// Restores a snapshot taken from a capability of the same structure, and brings the bound
    /// group up to date (pending vectors that are deliverable are delivered).
    pub fn restore(&mut self, snap: &MsiSnapshot) -> Result<()> {
        if snap.addr64 != self.addr64
            || snap.per_vector_mask != self.pvm
            || snap.max_vectors != self.max_vectors()
        {
            return Err(Error::SnapshotMismatch {
                capability: "MSI",
                reason: "capability structure differs",
            });
        }
        // Restore through the write masks so that read-only and reserved bits stay as built.
        self.store(CONTROL as u64, &snap.control.to_le_bytes());
        self.store(ADDRESS_LO as u64, &(snap.address as u32).to_le_bytes());
        if self.addr64 {
            self.store(
                ADDRESS_LO as u64 + 4,
                &((snap.address >> 32) as u32).to_le_bytes(),
            );
        }
        self.store(self.data_offset() as u64, &snap.data.to_le_bytes());
        if let Some(off) = self.mask_offset() {
            self.store(off as u64, &snap.mask.to_le_bytes());
            let pending = snap.pending & self.implemented_bits();
            regs::put_le(&mut self.image, off + 4, &pending.to_le_bytes());
        }
        self.clamp_multiple_message_enable();
        self.reconcile()
    }

    /// Merges `data` at `offset` through the write mask; false when outside the window.
    fn store(&mut self, offset: u64, data: &[u8]) -> bool {
        let window = self.window;
        match (self.image.get_mut(..window), self.wmask.get(..window)) {
            (Some(image), Some(wmask)) => regs::write_image(image, wmask, offset, data),
            _ => false,
        }
    }

    fn clamp_multiple_message_enable(&mut self) {
        let control = self.control();
        let mme = (control >> CTL_MME_SHIFT) & CTL_MM_FIELD;
        if mme > self.log2_capable {
            let control =
                (control & !(CTL_MM_FIELD << CTL_MME_SHIFT)) | (self.log2_capable << CTL_MME_SHIFT);
            regs::put_le(&mut self.image, CONTROL, &control.to_le_bytes());
        }
    }

    fn control(&self) -> u16 {
        regs::le16(&self.image, CONTROL)
    }

    /// Vectors allocated by Multiple Message Enable (already clamped to capable).
    fn allocated(&self) -> u32 {
        1 << ((self.control() >> CTL_MME_SHIFT) & CTL_MM_FIELD).min(self.log2_capable)
    }

    fn implemented_bits(&self) -> u32 {
        u32::MAX >> (32 - self.max_vectors())
    }

    fn data_offset(&self) -> usize {
        if self.addr64 {
            0x0c
        } else {
            0x08
        }
    }

    fn mask_offset(&self) -> Option<usize> {
        self.pvm.then_some(if self.addr64 { 0x10 } else { 0x0c })
    }

    fn set_pending(&mut self, vector: u32, set: bool) {
        if let Some(off) = self.mask_offset() {
            let mut pending = regs::le32(&self.image, off + 4);
            let b = 1u32.checked_shl(vector).unwrap_or(0);
            if set {
                pending |= b;
            } else {
                pending &= !b;
            }
            regs::put_le(&mut self.image, off + 4, &pending.to_le_bytes());
        }
    }

    /// Brings the bound group in line with the guest-visible state: enable/disable, then each
    /// vector's route and mask, then delivery of pending vectors that became deliverable.
    fn reconcile(&mut self) -> Result<()> {
        // Borrowed out of `self` for the loop and put back: no reference-count traffic on
        // the capability-write path.
        let Some(group) = self.group.take() else {
            return Ok(());
        };
        let result = self.reconcile_with(&*group);
        self.group = Some(group);
        result
    }

    fn reconcile_with(&mut self, group: &dyn InterruptSourceGroup) -> Result<()> {
        let mut first = None;
        if self.enabled() && !self.group_enabled {
            match group.enable() {
                Ok(()) => self.group_enabled = true,
                Err(e) => keep_first(&mut first, Err(e)),
            }
        } else if !self.enabled() && self.group_enabled {
            keep_first(&mut first, group.disable());
            self.group_enabled = false;
            self.pushed = [None; MSI_MAX_VECTORS as usize];
        }
        if self.group_enabled {
            let count = self.max_vectors().min(group.len());
            for vector in 0..count {
                let desired = self.vector_deliverable(vector).then(|| self.route(vector));
                let route = self.route(vector);
                let Some(pushed) = self.pushed.get_mut(vector as usize) else {
                    continue;
                };
                match push_vector(group, vector, pushed, desired, route) {
                    Ok(true) if self.pending(vector) => match group.trigger(vector) {
                        Ok(()) => self.set_pending(vector, false),
                        Err(e) => keep_first(&mut first, Err(e)),
                    },
                    Ok(_) => {}
                    Err(e) => keep_first(&mut first, Err(e)),
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn bit(value: u32, n: u32) -> bool {
    value.checked_shr(n).is_some_and(|v| v & 1 != 0)
}

impl fmt::Debug for MsiState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsiState")
            .field("snapshot", &self.snapshot())
            .field("group_bound", &self.group.is_some())
            .field("group_enabled", &self.group_enabled)
            .finish()
    }
}
