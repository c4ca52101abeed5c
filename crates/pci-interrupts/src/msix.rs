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

use serde::{Deserialize, Serialize};

use crate::regs::{self, keep_first, push_vector, Pushed};
use crate::{Delivery, Error, InterruptSourceGroup, MsiRoute, Result};

/// Capability ID of MSI-X.
pub const MSIX_CAP_ID: u8 = 0x11;
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
    entries: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    group: Option<Arc<dyn InterruptSourceGroup>>,
    group_enabled: bool,
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
        let invalid = |reason| Error::InvalidCapability {
            capability: "MSI-X",
            reason,
        };
        if table_size == 0 || table_size > MSIX_MAX_VECTORS {
            return Err(invalid("table size must be 1 to 2048"));
        }
        if table_bir > 5 || pba_bir > 5 {
            return Err(invalid("BAR indicator must be 0 to 5"));
        }
        if table_offset % 8 != 0 || pba_offset % 8 != 0 {
            return Err(invalid("table and PBA offsets must be qword aligned"));
        }
        let mut cap = [0u8; MSIX_CAP_LEN];
        cap[0] = MSIX_CAP_ID;
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
        Ok(Self::build(cap))
    }

    /// Takes the capability's structure from a device's capability bytes (starting at the
    /// capability ID, at least 12 bytes): next pointer, table size, table and PBA location.
    /// Function mask and enable start clear, table entries masked, the PBA clear.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let invalid = |reason| Error::InvalidCapability {
            capability: "MSI-X",
            reason,
        };
        let mut cap = [0u8; MSIX_CAP_LEN];
        cap.copy_from_slice(
            bytes
                .get(..MSIX_CAP_LEN)
                .ok_or(invalid("fewer than 12 bytes"))?,
        );
        if cap[0] != MSIX_CAP_ID {
            return Err(invalid("capability ID is not 0x11"));
        }
        let control = regs::le16(&cap, CONTROL) & CTL_TABLE_SIZE;
        regs::put_le(&mut cap, CONTROL, &control.to_le_bytes());
        if regs::le32(&cap, TABLE) & BIR_MASK > 5 || regs::le32(&cap, PBA) & BIR_MASK > 5 {
            return Err(invalid("reserved BAR indicator"));
        }
        Ok(Self::build(cap))
    }

    fn build(cap: [u8; MSIX_CAP_LEN]) -> Self {
        let n = usize::from(regs::le16(&cap, CONTROL) & CTL_TABLE_SIZE) + 1;
        Self {
            cap,
            entries: vec![MsixTableEntry::default(); n],
            pba: vec![0; n.div_ceil(64)],
            group: None,
            group_enabled: false,
            pushed: vec![None; n],
        }
    }

    /// Length of the capability in bytes (12).
    pub fn cap_len(&self) -> usize {
        MSIX_CAP_LEN
    }

    /// Number of vectors (table entries).
    pub fn table_size(&self) -> u32 {
        u32::from(self.control() & CTL_TABLE_SIZE) + 1
    }

    /// BAR, offset and size of the table.
    pub fn table_location(&self) -> MsixBarLocation {
        self.location(TABLE, self.table_size() * MSIX_ENTRY_SIZE as u32)
    }

    /// BAR, offset and size of the PBA.
    pub fn pba_location(&self) -> MsixBarLocation {
        self.location(PBA, self.table_size().div_ceil(64) * 8)
    }

    fn location(&self, reg: usize, size: u32) -> MsixBarLocation {
        let value = regs::le32(&self.cap, reg);
        MsixBarLocation {
            // Lossless: masked to 3 bits.
            bir: (value & BIR_MASK) as u8,
            offset: value & !BIR_MASK,
            size,
        }
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
    /// `None` unbinds.
    pub fn set_group(&mut self, group: Option<Arc<dyn InterruptSourceGroup>>) -> Result<()> {
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
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            if let Ok(bytes) = <[u8; 4]>::try_from(chunk) {
                entry.set_dword(first + i, u32::from_le_bytes(bytes));
            }
        }
        let Some(group) = self.group.clone() else {
            return Ok(());
        };
        let mut first_err = None;
        self.reconcile_vector(&*group, vector, &mut first_err);
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
                self.reconcile_vector(&*group, vector, &mut first);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Pushes `vector`'s route and mask to `group` if they changed, then delivers it if it is
    /// pending and now unmasked at the group.
    fn reconcile_vector(
        &mut self,
        group: &dyn InterruptSourceGroup,
        vector: u32,
        first: &mut Option<crate::Error>,
    ) {
        if !self.group_enabled || vector >= group.len() {
            return;
        }
        let Some(route) = self.route(vector) else {
            return;
        };
        let desired = self.vector_deliverable(vector).then_some(route);
        let pending = self.pending(vector);
        let Some(pushed) = self.pushed.get_mut(vector as usize) else {
            return;
        };
        match push_vector(group, vector, pushed, desired, route) {
            Ok(true) if pending => match group.trigger(vector) {
                Ok(()) => self.set_pending(vector, false),
                Err(e) => keep_first(first, Err(e)),
            },
            Ok(_) => {}
            Err(e) => keep_first(first, Err(e)),
        }
    }
}

/// An aligned dword or qword access.
fn access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 4 | 8) && offset % len as u64 == 0
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
