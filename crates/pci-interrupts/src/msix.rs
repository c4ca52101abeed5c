//! The MSI-X capability, table and Pending Bit Array (PCI Local Bus 3.0 §6.8.2; PCIe Base
//! §7.7.2).
//!
//! Capability layout relative to its offset: 0x00 ID and next pointer, 0x02 message control
//! (table size N-1 in bits 10:0, read-only; function mask bit 14; MSI-X enable bit 15), 0x04
//! table offset/BIR, 0x08 PBA offset/BIR (both read-only). Each table entry is 16 bytes:
//! message address, upper address, data, vector control (mask bit 0). The PBA has one bit per
//! vector, in qwords.

use std::fmt;
use std::sync::Arc;

use pci_config::cap_id;
use serde::{Deserialize, Serialize};

use crate::regs::{self, keep_first, push_vector, Pushed};
use crate::{Delivery, Error, InterruptSourceGroup, MsiRoute, Result};

/// Length of the MSI-X capability in bytes.
pub const MSIX_CAP_LEN: usize = 12;
/// Size of one MSI-X table entry in bytes.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// Largest MSI-X table (11-bit table size field).
pub const MSIX_MAX_VECTORS: u32 = 2048;

const CONTROL: usize = 2;
const TABLE: usize = 4;
const PBA: usize = 8;
const CTL_TABLE_SIZE: u16 = 0x7ff;
const CTL_FUNCTION_MASK: u16 = 1 << 14;
const CTL_ENABLE: u16 = 1 << 15;
const BIR_MASK: u32 = 0x7;
/// Highest valid BAR indicator; 6 and 7 are reserved.
const MAX_BIR: u8 = 5;
/// Vector control bit 0; the other bits are reserved and read 0.
const VECTOR_CONTROL_MASK: u32 = 1;
/// Writable bits of the capability: function mask and enable.
const CAP_WMASK: [u8; MSIX_CAP_LEN] = [0, 0, 0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0];

/// One MSI-X table entry as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixTableEntry {
    /// Message address, low dword.
    pub addr_lo: u32,
    /// Message address, high dword.
    pub addr_hi: u32,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: mask).
    pub vector_control: u32,
}

impl Default for MsixTableEntry {
    /// The reset state: masked, everything else zero.
    fn default() -> Self {
        Self {
            addr_lo: 0,
            addr_hi: 0,
            data: 0,
            vector_control: VECTOR_CONTROL_MASK,
        }
    }
}

impl MsixTableEntry {
    /// Whether the entry's mask bit is set.
    pub fn masked(&self) -> bool {
        self.vector_control & VECTOR_CONTROL_MASK != 0
    }

    /// The route the entry programs.
    pub fn route(&self) -> MsiRoute {
        MsiRoute {
            address: (u64::from(self.addr_hi) << 32) | u64::from(self.addr_lo),
            data: self.data,
        }
    }

    fn dword(&self, index: usize) -> u32 {
        match index {
            0 => self.addr_lo,
            1 => self.addr_hi,
            2 => self.data,
            _ => self.vector_control,
        }
    }

    fn set_dword(&mut self, index: usize, value: u32) {
        match index {
            0 => self.addr_lo = value,
            1 => self.addr_hi = value,
            2 => self.data = value,
            _ => self.vector_control = value & VECTOR_CONTROL_MASK,
        }
    }
}

/// Where the table or the PBA lives: BAR index, offset in that BAR, size in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixBarLocation {
    /// BAR indicator register: which BAR (0..=5).
    pub bir: u8,
    /// Offset in the BAR (qword aligned).
    pub offset: u32,
    /// Size in bytes (table: 16 per vector; PBA: 8 per 64 vectors).
    pub size: u32,
}

impl MsixBarLocation {
    /// Whether `offset..offset + len` of BAR `bir` falls inside this structure.
    pub fn contains(&self, bir: u8, offset: u64, len: u64) -> bool {
        let start = u64::from(self.offset);
        let end = start + u64::from(self.size);
        bir == self.bir && offset >= start && offset.checked_add(len).is_some_and(|e| e <= end)
    }
}

/// The structure of an MSI-X capability, decoded from its bytes: how many vectors, and where
/// the table and the PBA live.
///
/// This is the read-only part of the capability (table size, table offset/BIR, PBA offset/BIR),
/// with no guest-visible state: [`MsixLayout::parse`] is a pure, allocation-free decode, for
/// anything that needs to know the layout of a device's MSI-X without emulating it.
/// [`MsixState`] keeps the same decode of its own capability.
///
/// ```
/// use pci_interrupts::{MsixBarLocation, MsixLayout};
///
/// // ID 0x11, next 0; 32 vectors; table at BAR2 +0x2000; PBA at BAR2 +0x3000.
/// let cap = [0x11, 0, 0x1f, 0, 0x02, 0x20, 0, 0, 0x02, 0x30, 0, 0];
/// let layout = MsixLayout::parse(&cap)?;
/// assert_eq!(layout.vectors, 32);
/// assert_eq!(layout.table, MsixBarLocation { bir: 2, offset: 0x2000, size: 512 });
/// assert_eq!(layout.pba, MsixBarLocation { bir: 2, offset: 0x3000, size: 8 });
/// # Ok::<(), pci_interrupts::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixLayout {
    /// Number of vectors (table entries), 1..=2048: the table size field plus one.
    pub vectors: u32,
    /// Where the table is; its size is 16 bytes per vector.
    pub table: MsixBarLocation,
    /// Where the PBA is; its size is one bit per vector, in whole qwords.
    pub pba: MsixBarLocation,
}

impl MsixLayout {
    /// Decodes the capability's structure from its bytes, starting at the capability ID (the
    /// first 12 bytes are read, the rest ignored). The function mask, enable and next-pointer
    /// bits play no part.
    ///
    /// Fails with [`Error::InvalidCapability`] on fewer than 12 bytes, a capability ID that is
    /// not [`cap_id::MSIX`](pci_config::cap_id::MSIX), or a table or PBA BAR indicator of 6 or 7 (reserved).
    pub fn parse(cap: &[u8]) -> Result<Self> {
        let cap = cap
            .get(..MSIX_CAP_LEN)
            .ok_or(invalid("fewer than 12 bytes"))?;
        if cap.first() != Some(&cap_id::MSIX) {
            return Err(invalid("capability ID is not 0x11"));
        }
        let vectors = u32::from(regs::le16(cap, CONTROL) & CTL_TABLE_SIZE) + 1;
        // At most 2048 * 16 and 32 * 8: no overflow.
        let table = bar_location(regs::le32(cap, TABLE), vectors * MSIX_ENTRY_SIZE as u32);
        let pba = bar_location(regs::le32(cap, PBA), vectors.div_ceil(64) * 8);
        if table.bir > MAX_BIR || pba.bir > MAX_BIR {
            return Err(invalid("reserved BAR indicator"));
        }
        Ok(Self {
            vectors,
            table,
            pba,
        })
    }
}

/// Splits a table or PBA offset/BIR register into BAR and offset.
fn bar_location(value: u32, size: u32) -> MsixBarLocation {
    MsixBarLocation {
        // Lossless: masked to 3 bits.
        bir: (value & BIR_MASK) as u8,
        offset: value & !BIR_MASK,
        size,
    }
}

fn invalid(reason: &'static str) -> Error {
    Error::InvalidCapability {
        capability: "MSI-X",
        reason,
    }
}

/// Guest-visible MSI-X state of one function (capability, table, PBA) and the binding to the
/// group that delivers it.
///
/// Capability accesses go to [`read`](Self::read)/[`write`](Self::write), table accesses to
/// [`table_read`](Self::table_read)/[`table_write`](Self::table_write) and PBA accesses to
/// [`pba_read`](Self::pba_read)/[`pba_write`](Self::pba_write), each with offsets relative to
/// the structure. The table and PBA take aligned dword and qword accesses only (§6.8.2); others
/// are logged and ignored. None of the access paths allocates.
#[derive(Clone)]
pub struct MsixState {
    cap: [u8; MSIX_CAP_LEN],
    /// The read-only structure of `cap`, decoded once.
    layout: MsixLayout,
    entries: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    group: Option<Arc<dyn InterruptSourceGroup>>,
    group_enabled: bool,
    /// The bound group's number of vectors, read once when it is bound (a group's size is
    /// fixed), so that a table write makes one call to the group, not two.
    group_len: u32,
    pushed: Vec<Pushed>,
}

/// Snapshot of [`MsixState`]: structure (to check against), control, table and PBA.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixSnapshot {
    /// Where the table is.
    pub table: MsixBarLocation,
    /// Where the PBA is.
    pub pba_location: MsixBarLocation,
    /// Message control register.
    pub control: u16,
    /// The table, one element per vector.
    pub entries: Vec<MsixTableEntry>,
    /// The PBA, one bit per vector.
    pub pba: Vec<u64>,
}

impl MsixState {
    /// An MSI-X capability with `table_size` vectors (1..=2048), its table at `table_offset`
    /// of BAR `table_bir` and its PBA at `pba_offset` of BAR `pba_bir` (offsets qword aligned,
    /// BIRs 0..=5). The next-capability pointer reads 0.
    pub fn new(
        table_size: u32,
        table_bir: u8,
        table_offset: u32,
        pba_bir: u8,
        pba_offset: u32,
    ) -> Result<Self> {
        if table_size == 0 || table_size > MSIX_MAX_VECTORS {
            return Err(invalid("table size must be 1 to 2048"));
        }
        if table_bir > MAX_BIR || pba_bir > MAX_BIR {
            return Err(invalid("BAR indicator must be 0 to 5"));
        }
        if table_offset % 8 != 0 || pba_offset % 8 != 0 {
            return Err(invalid("table and PBA offsets must be qword aligned"));
        }
        let mut cap = [0u8; MSIX_CAP_LEN];
        cap[0] = cap_id::MSIX;
        // Lossless: table_size - 1 < 2048.
        let control = (table_size - 1) as u16;
        regs::put_le(&mut cap, CONTROL, &control.to_le_bytes());
        regs::put_le(
            &mut cap,
            TABLE,
            &(table_offset | u32::from(table_bir)).to_le_bytes(),
        );
        regs::put_le(
            &mut cap,
            PBA,
            &(pba_offset | u32::from(pba_bir)).to_le_bytes(),
        );
        Ok(Self::build(cap, MsixLayout::parse(&cap)?))
    }

    /// Takes the capability's structure from a device's capability bytes (starting at the
    /// capability ID, at least 12 bytes): next pointer, table size, table and PBA location.
    /// Function mask and enable start clear, table entries masked, the PBA clear.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let mut cap: [u8; MSIX_CAP_LEN] = bytes
            .get(..MSIX_CAP_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(invalid("fewer than 12 bytes"))?;
        let layout = MsixLayout::parse(&cap)?;
        let control = regs::le16(&cap, CONTROL) & CTL_TABLE_SIZE;
        regs::put_le(&mut cap, CONTROL, &control.to_le_bytes());
        Ok(Self::build(cap, layout))
    }

    /// `layout` is `cap`'s, decoded.
    fn build(cap: [u8; MSIX_CAP_LEN], layout: MsixLayout) -> Self {
        // Lossless: at most 2048.
        let n = layout.vectors as usize;
        Self {
            cap,
            layout,
            entries: vec![MsixTableEntry::default(); n],
            pba: vec![0; n.div_ceil(64)],
            group: None,
            group_enabled: false,
            group_len: 0,
            pushed: vec![None; n],
        }
    }

    /// Length of the capability in bytes (12).
    pub fn cap_len(&self) -> usize {
        MSIX_CAP_LEN
    }

    /// Number of vectors (table entries).
    pub fn table_size(&self) -> u32 {
        self.layout.vectors
    }

    /// BAR, offset and size of the table.
    pub fn table_location(&self) -> MsixBarLocation {
        self.layout.table
    }

    /// BAR, offset and size of the PBA.
    pub fn pba_location(&self) -> MsixBarLocation {
        self.layout.pba
    }

    /// Whether the guest has set MSI-X Enable.
    pub fn enabled(&self) -> bool {
        self.control() & CTL_ENABLE != 0
    }

    /// Whether the guest has set Function Mask (all vectors masked).
    pub fn function_masked(&self) -> bool {
        self.control() & CTL_FUNCTION_MASK != 0
    }

    /// Whether `vector`'s table entry has its mask bit set (true out of range).
    pub fn vector_masked(&self, vector: u32) -> bool {
        self.entry(vector).is_none_or(MsixTableEntry::masked)
    }

    /// Whether `vector` reaches the guest now: MSI-X enabled, function and entry unmasked.
    pub fn vector_deliverable(&self, vector: u32) -> bool {
        self.enabled() && !self.function_masked() && !self.vector_masked(vector)
    }

    /// Whether `vector`'s pending bit is set.
    pub fn pending(&self, vector: u32) -> bool {
        let (word, b) = pba_bit(vector);
        self.pba.get(word).is_some_and(|w| w & b != 0)
    }

    /// `vector`'s table entry, if in range.
    pub fn entry(&self, vector: u32) -> Option<&MsixTableEntry> {
        self.entries.get(vector as usize)
    }

    /// The route `vector`'s table entry programs, if in range.
    pub fn route(&self, vector: u32) -> Option<MsiRoute> {
        self.entry(vector).map(MsixTableEntry::route)
    }

    /// The bound group, if any.
    pub fn group(&self) -> Option<&Arc<dyn InterruptSourceGroup>> {
        self.group.as_ref()
    }

    /// Binds `group` (fresh from an [`InterruptManager`](crate::InterruptManager): disabled,
    /// all vectors masked; normally [`table_size`](Self::table_size) vectors) and brings it up
    /// to date with the guest-visible state. The previous group, if any, is left as it is.
    /// `None` unbinds. The group's [`len`](InterruptSourceGroup::len) is read here, once: a
    /// group's size must not change while it is bound.
    pub fn set_group(&mut self, group: Option<Arc<dyn InterruptSourceGroup>>) -> Result<()> {
        self.group_len = group.as_ref().map_or(0, |g| g.len());
        self.group = group;
        self.group_enabled = false;
        self.pushed.fill(None);
        self.reconcile_all()
    }

    /// Guest read of the capability at `offset` (relative to the capability).
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if !regs::read_image(&self.cap, offset, data) {
            log::debug!("MSI-X: ignored read of {} bytes at {offset:#x}", data.len());
        }
    }

    /// Guest write of the capability at `offset`. Only function mask and enable are writable.
    /// Flipping enable enables/disables the bound group; unmasking delivers pending vectors.
    /// An `Err` is the first group call that failed (the registers are updated regardless).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let before = self.control();
        if !regs::write_image(&mut self.cap, &CAP_WMASK, offset, data) {
            log::debug!(
                "MSI-X: ignored write of {} bytes at {offset:#x}",
                data.len()
            );
            return Ok(());
        }
        if self.control() == before {
            return Ok(());
        }
        self.reconcile_all()
    }

    /// Guest read of the table at `offset` (relative to the table): an aligned dword or qword.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let Some((entry, first)) = self.table_slot(offset, data.len()) else {
            log::debug!(
                "MSI-X: ignored table read of {} bytes at {offset:#x}",
                data.len()
            );
            data.fill(0xff);
            return;
        };
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            chunk.copy_from_slice(&entry.dword(first + i).to_le_bytes());
        }
    }

    /// Guest write of the table at `offset` (relative to the table): an aligned dword or qword.
    /// Touches one vector, and updates that vector's route or mask in the group when it
    /// changed (and delivers it if it was pending and is now unmasked).
    pub fn table_write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let Some((_, first)) = self.table_slot(offset, data.len()) else {
            log::debug!(
                "MSI-X: ignored table write of {} bytes at {offset:#x}",
                data.len()
            );
            return Ok(());
        };
        // Lossless: table_slot checked the entry index against the table (at most 2048).
        let vector = (offset / MSIX_ENTRY_SIZE) as u32;
        let Some(entry) = self.entries.get_mut(vector as usize) else {
            return Ok(());
        };
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            entry.set_dword(first, u32::from_le_bytes(bytes));
        } else {
            for (i, chunk) in data.chunks_exact(4).enumerate() {
                if let Ok(bytes) = <[u8; 4]>::try_from(chunk) {
                    entry.set_dword(first + i, u32::from_le_bytes(bytes));
                }
            }
        }
        let mut first_err = None;
        self.reconcile_vector(vector, &mut first_err);
        first_err.map_or(Ok(()), Err)
    }

    /// Guest read of the PBA at `offset` (relative to the PBA): an aligned dword or qword.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let word = usize::try_from(offset / 8).ok();
        let qword = word.and_then(|w| self.pba.get(w));
        let (Some(&qword), true) = (qword, access_ok(offset, data.len())) else {
            log::debug!(
                "MSI-X: ignored PBA read of {} bytes at {offset:#x}",
                data.len()
            );
            data.fill(0xff);
            return;
        };
        let bytes = qword.to_le_bytes();
        let start = if offset % 8 == 0 { 0 } else { 4 };
        if let Some(src) = bytes.get(start..start + data.len()) {
            data.copy_from_slice(src);
        }
    }

    /// Guest write of the PBA: read-only to the guest, so logged and ignored.
    pub fn pba_write(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "MSI-X: ignored PBA write of {} bytes at {offset:#x}",
            data.len()
        );
    }

    /// The device raises `vector`. Delivered when deliverable; recorded in the PBA when masked
    /// (by its entry or the function mask) and delivered on unmask; dropped when MSI-X is
    /// disabled.
    pub fn fire(&mut self, vector: u32) -> Result<Delivery> {
        if vector >= self.table_size() {
            return Err(Error::VectorOutOfRange {
                vector,
                count: self.table_size(),
            });
        }
        if !self.enabled() {
            return Ok(Delivery::Dropped);
        }
        if self.function_masked() || self.vector_masked(vector) {
            self.set_pending(vector, true);
            return Ok(Delivery::Pending);
        }
        regs::trigger_unmasked(
            self.group.as_ref(),
            self.group_enabled,
            &self.pushed,
            vector,
            "MSI-X",
        )
    }

    /// Returns to the reset state (disabled, function unmasked, entries masked and zero, PBA
    /// clear), disabling the bound group if it was enabled.
    pub fn reset(&mut self) -> Result<()> {
        let control = self.control() & CTL_TABLE_SIZE;
        regs::put_le(&mut self.cap, CONTROL, &control.to_le_bytes());
        self.entries.fill(MsixTableEntry::default());
        self.pba.fill(0);
        self.reconcile_all()
    }

    /// Snapshot of the state.
    pub fn snapshot(&self) -> MsixSnapshot {
        MsixSnapshot {
            table: self.table_location(),
            pba_location: self.pba_location(),
            control: self.control(),
            entries: self.entries.clone(),
            pba: self.pba.clone(),
        }
    }

    /// Restores a snapshot taken from a capability of the same structure, and brings the bound
    /// group up to date (pending vectors that are deliverable are delivered).
    pub fn restore(&mut self, snap: &MsixSnapshot) -> Result<()> {
        let mismatch = |reason| Error::SnapshotMismatch {
            capability: "MSI-X",
            reason,
        };
        if snap.table != self.table_location() || snap.pba_location != self.pba_location() {
            return Err(mismatch("table or PBA location or size differs"));
        }
        if snap.entries.len() != self.entries.len() || snap.pba.len() != self.pba.len() {
            return Err(mismatch("table or PBA length differs"));
        }
        if snap.control & CTL_TABLE_SIZE != self.control() & CTL_TABLE_SIZE {
            return Err(mismatch("table size differs"));
        }
        let control = snap.control & (CTL_TABLE_SIZE | CTL_FUNCTION_MASK | CTL_ENABLE);
        regs::put_le(&mut self.cap, CONTROL, &control.to_le_bytes());
        for (dst, src) in self.entries.iter_mut().zip(&snap.entries) {
            *dst = *src;
            dst.vector_control &= VECTOR_CONTROL_MASK;
        }
        self.pba.copy_from_slice(&snap.pba);
        // Bits past the last vector are reserved and read 0.
        let tail = self.table_size() % 64;
        if let (Some(last), true) = (self.pba.last_mut(), tail != 0) {
            *last &= (1u64 << tail) - 1;
        }
        self.reconcile_all()
    }

    fn control(&self) -> u16 {
        regs::le16(&self.cap, CONTROL)
    }

    /// The entry and first dword an access addresses, if it is an aligned dword or qword inside
    /// the table.
    fn table_slot(&self, offset: u64, len: usize) -> Option<(&MsixTableEntry, usize)> {
        if !access_ok(offset, len) {
            return None;
        }
        let entry = self
            .entries
            .get(usize::try_from(offset / MSIX_ENTRY_SIZE).ok()?)?;
        // Lossless: below 4.
        Some((entry, (offset % MSIX_ENTRY_SIZE / 4) as usize))
    }

    fn set_pending(&mut self, vector: u32, set: bool) {
        let (word, b) = pba_bit(vector);
        if let Some(w) = self.pba.get_mut(word) {
            if set {
                *w |= b;
            } else {
                *w &= !b;
            }
        }
    }

    /// Brings the bound group in line with the capability and every entry.
    fn reconcile_all(&mut self) -> Result<()> {
        let Some(group) = self.group.clone() else {
            return Ok(());
        };
        let mut first = None;
        if self.enabled() && !self.group_enabled {
            match group.enable() {
                Ok(()) => self.group_enabled = true,
                Err(e) => keep_first(&mut first, Err(e)),
            }
        } else if !self.enabled() && self.group_enabled {
            keep_first(&mut first, group.disable());
            self.group_enabled = false;
            self.pushed.fill(None);
        }
        if self.group_enabled {
            for vector in 0..self.table_size() {
                self.reconcile_vector(vector, &mut first);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Pushes `vector`'s route and mask to the bound group if they changed, then delivers it
    /// if it is pending and now unmasked at the group. Borrows the group in place (no
    /// reference-count traffic on the table-write path).
    #[inline]
    fn reconcile_vector(&mut self, vector: u32, first: &mut Option<crate::Error>) {
        let Some(group) = self.group.as_deref() else {
            return;
        };
        if !self.group_enabled || vector >= self.group_len {
            return;
        }
        let live = self.control() & (CTL_ENABLE | CTL_FUNCTION_MASK) == CTL_ENABLE;
        let Some(entry) = self.entries.get(vector as usize) else {
            return;
        };
        let route = entry.route();
        let desired = (live && !entry.masked()).then_some(route);
        let (word, bit) = pba_bit(vector);
        let Some(pushed) = self.pushed.get_mut(vector as usize) else {
            return;
        };
        match push_vector(group, vector, pushed, desired, route) {
            Ok(true) => {
                let pending = self.pba.get_mut(word).filter(|w| **w & bit != 0);
                if let Some(w) = pending {
                    match group.trigger(vector) {
                        Ok(()) => *w &= !bit,
                        Err(e) => keep_first(first, Err(e)),
                    }
                }
            }
            Ok(false) => {}
            Err(e) => keep_first(first, Err(e)),
        }
    }
}

/// An aligned dword or qword access.
fn access_ok(offset: u64, len: usize) -> bool {
    // A mask, not a division: `len` is a power of two.
    matches!(len, 4 | 8) && offset & (len as u64 - 1) == 0
}

fn pba_bit(vector: u32) -> (usize, u64) {
    ((vector / 64) as usize, 1u64 << (vector % 64))
}

impl fmt::Debug for MsixState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsixState")
            .field("table_size", &self.table_size())
            .field("enabled", &self.enabled())
            .field("function_masked", &self.function_masked())
            .field("table", &self.table_location())
            .field("pba", &self.pba_location())
            .field("group_bound", &self.group.is_some())
            .field("group_enabled", &self.group_enabled)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Capability bytes: ID 0x11, next pointer 0x50, the given message control and table and
    /// PBA offset/BIR dwords.
    fn cap(control: u16, table: u32, pba: u32) -> [u8; MSIX_CAP_LEN] {
        let mut b = [0u8; MSIX_CAP_LEN];
        b[0] = cap_id::MSIX;
        b[1] = 0x50;
        b[2..4].copy_from_slice(&control.to_le_bytes());
        b[4..8].copy_from_slice(&table.to_le_bytes());
        b[8..12].copy_from_slice(&pba.to_le_bytes());
        b
    }

    fn reason(e: Error) -> &'static str {
        match e {
            Error::InvalidCapability {
                capability: "MSI-X",
                reason,
            } => reason,
            other => panic!("unexpected error {other:?}"),
        }
    }

    #[test]
    fn layout_table_size_field_zero_is_one_vector() {
        let l = MsixLayout::parse(&cap(0, 0, 0x800)).unwrap();
        assert_eq!(l.vectors, 1);
        assert_eq!(
            l.table,
            MsixBarLocation {
                bir: 0,
                offset: 0,
                size: 16
            }
        );
        assert_eq!(
            l.pba,
            MsixBarLocation {
                bir: 0,
                offset: 0x800,
                size: 8
            }
        );
    }

    #[test]
    fn layout_largest_table_has_2048_vectors_and_a_256_byte_pba() {
        let l = MsixLayout::parse(&cap(0x07ff, 0x2000, 0xa000)).unwrap();
        assert_eq!(l.vectors, 2048);
        assert_eq!((l.table.offset, l.table.size), (0x2000, 2048 * 16));
        assert_eq!((l.pba.offset, l.pba.size), (0xa000, 256));
    }

    #[test]
    fn layout_ignores_enable_function_mask_and_reserved_control_bits() {
        let l = MsixLayout::parse(&cap(0xf800 | 31, 0, 0x1000)).unwrap();
        assert_eq!(l.vectors, 32);
    }

    #[test]
    fn layout_splits_bir_from_offset() {
        let l = MsixLayout::parse(&cap(15, 0x0001_2340 | 4, 0xffff_fff8 | 5)).unwrap();
        assert_eq!((l.table.bir, l.table.offset), (4, 0x0001_2340));
        assert_eq!((l.pba.bir, l.pba.offset), (5, 0xffff_fff8));
    }

    #[test]
    fn layout_pba_is_whole_qwords() {
        for (vectors, pba) in [(1, 8), (63, 8), (64, 8), (65, 16), (128, 16), (129, 24)] {
            let l = MsixLayout::parse(&cap(vectors - 1, 0, 0x1000)).unwrap();
            assert_eq!(u32::from(vectors), l.vectors);
            assert_eq!(l.table.size, u32::from(vectors) * 16, "{vectors} vectors");
            assert_eq!(l.pba.size, pba, "{vectors} vectors");
        }
    }

    #[test]
    fn layout_reads_only_the_first_12_bytes() {
        let mut long = [0xffu8; 16];
        long[..MSIX_CAP_LEN].copy_from_slice(&cap(3, 0x2000 | 1, 0x3000 | 1));
        let l = MsixLayout::parse(&long).unwrap();
        assert_eq!(l, MsixLayout::parse(&long[..MSIX_CAP_LEN]).unwrap());
        assert_eq!((l.vectors, l.table.bir, l.pba.offset), (4, 1, 0x3000));
    }

    #[test]
    fn layout_refuses_fewer_than_12_bytes() {
        let b = cap(0, 0, 0x800);
        for len in 0..MSIX_CAP_LEN {
            let e = MsixLayout::parse(&b[..len]).unwrap_err();
            assert_eq!(reason(e), "fewer than 12 bytes", "{len} bytes");
        }
    }

    #[test]
    fn layout_refuses_a_wrong_capability_id() {
        let mut b = cap(0, 0, 0x800);
        b[0] = 0x05;
        assert_eq!(
            reason(MsixLayout::parse(&b).unwrap_err()),
            "capability ID is not 0x11"
        );
    }

    #[test]
    fn layout_refuses_a_reserved_table_or_pba_bir() {
        for bir in [6, 7] {
            for (table, pba) in [(bir, 0), (0, bir), (bir, bir)] {
                let e = MsixLayout::parse(&cap(0, table, 0x800 | pba)).unwrap_err();
                assert_eq!(reason(e), "reserved BAR indicator", "{table} {pba}");
            }
        }
    }

    #[test]
    fn state_reports_the_layout_it_was_made_from() {
        let b = cap(0xc000 | 40, 0x4000 | 3, 0x6000 | 2);
        let l = MsixLayout::parse(&b).unwrap();
        let from_bytes = MsixState::from_bytes(&b).unwrap();
        let new = MsixState::new(41, 3, 0x4000, 2, 0x6000).unwrap();
        for s in [&from_bytes, &new] {
            assert_eq!(s.table_size(), l.vectors);
            assert_eq!(s.table_location(), l.table);
            assert_eq!(s.pba_location(), l.pba);
        }
    }
}
