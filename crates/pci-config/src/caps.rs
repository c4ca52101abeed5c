//! Standard (0x40..0x100) and extended (0x100..0x1000) capability chains: walking with loop
//! and bounds guards, adding, hiding and looking up.
//!
//! Standard capabilities (PCI Local Bus 3.0 §6.7): the chain starts at the capabilities
//! pointer (0x34) when status bit 4 is set; each entry is `id: u8, next: u8`. Pointers are
//! dword aligned: their low 2 bits are reserved and masked, as software is required to do.
//!
//! Extended capabilities (PCIe Base §7.6.3): the chain starts at 0x100 with a dword header
//! `id: 16 bits, version: 4 bits, next: 12 bits` (low 2 bits of `next` reserved and masked). A
//! header of 0 (or all ones, as read from a device without extended space) at 0x100 means
//! "no extended capabilities".
//!
//! Walking stops with an error at a pointer into the header (below 0x40, or below 0x100 for an
//! extended pointer), past the end of the buffer, or back to an offset already visited (a
//! loop). A standard chain also stops where two capabilities would share registers: a
//! capability that starts inside the fixed-length block of one met before it (Power
//! Management, MSI, MSI-X), or such a block that covers the header of one met before. A VMM
//! emulates MSI and MSI-X over those bytes, so a chain threaded through them would change
//! under the guest. The walkers never allocate; the `parse_*` helpers collect into a `Vec`.
//!
//! Hiding: a standard capability is unlinked by pointing its predecessor (or the capabilities
//! pointer) at its successor. An extended capability that is not first is unlinked the same
//! way. The first extended capability cannot be unlinked because the chain must start at
//! 0x100; it is overwritten with a "null" header, ID 0 and version 0, that keeps the next
//! pointer (what QEMU's vfio does; Linux never matches capability ID 0, and `lspci` shows it as
//! "Null"). Copying the next capability's header in instead would not work, because the
//! registers of that capability are addressed relative to its own offset. The hidden
//! capability's body bytes are left in place, unreachable from the chain.

use crate::error::{Error, Result};
use crate::regs::{
    CAPABILITIES_POINTER, CONFIG_SPACE_SIZE, EXTENDED_CONFIG_START, HEADER_SIZE,
    LEGACY_CONFIG_SPACE_SIZE, STATUS, STATUS_CAPABILITIES_LIST,
};
use crate::space::ConfigSpace;

/// Well-known standard capability IDs (PCI Code and ID Assignment Specification).
pub mod cap_id {
    /// Null capability.
    pub const NULL: u8 = 0x00;
    /// PCI Power Management.
    pub const POWER_MANAGEMENT: u8 = 0x01;
    /// AGP.
    pub const AGP: u8 = 0x02;
    /// Vital Product Data.
    pub const VPD: u8 = 0x03;
    /// Slot identification.
    pub const SLOT_ID: u8 = 0x04;
    /// Message Signaled Interrupts.
    pub const MSI: u8 = 0x05;
    /// CompactPCI hot swap.
    pub const COMPACT_PCI_HOT_SWAP: u8 = 0x06;
    /// PCI-X.
    pub const PCI_X: u8 = 0x07;
    /// HyperTransport.
    pub const HYPERTRANSPORT: u8 = 0x08;
    /// Vendor specific.
    pub const VENDOR_SPECIFIC: u8 = 0x09;
    /// Debug port.
    pub const DEBUG_PORT: u8 = 0x0a;
    /// PCI hot-plug.
    pub const HOT_PLUG: u8 = 0x0c;
    /// Bridge subsystem vendor ID.
    pub const SUBSYSTEM_VENDOR: u8 = 0x0d;
    /// Secure device.
    pub const SECURE: u8 = 0x0f;
    /// PCI Express.
    pub const PCI_EXPRESS: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
    /// Serial ATA data/index configuration.
    pub const SATA: u8 = 0x12;
    /// Advanced features (conventional PCI FLR).
    pub const ADVANCED_FEATURES: u8 = 0x13;
    /// Enhanced allocation.
    pub const ENHANCED_ALLOCATION: u8 = 0x14;
}

/// Well-known extended capability IDs (PCI Code and ID Assignment Specification).
pub mod ext_cap_id {
    /// Null extended capability (also used here to hide the first extended capability).
    pub const NULL: u16 = 0x0000;
    /// Advanced Error Reporting.
    pub const AER: u16 = 0x0001;
    /// Virtual channel (without MFVC).
    pub const VIRTUAL_CHANNEL: u16 = 0x0002;
    /// Device serial number.
    pub const DEVICE_SERIAL_NUMBER: u16 = 0x0003;
    /// Power budgeting.
    pub const POWER_BUDGETING: u16 = 0x0004;
    /// Root complex link declaration.
    pub const RC_LINK_DECLARATION: u16 = 0x0005;
    /// Multi-function virtual channel.
    pub const MFVC: u16 = 0x0008;
    /// Virtual channel (with MFVC).
    pub const VIRTUAL_CHANNEL_9: u16 = 0x0009;
    /// Root complex register block.
    pub const RCRB: u16 = 0x000a;
    /// Vendor-specific extended capability.
    pub const VENDOR_SPECIFIC: u16 = 0x000b;
    /// Access control services.
    pub const ACS: u16 = 0x000d;
    /// Alternative routing-ID interpretation.
    pub const ARI: u16 = 0x000e;
    /// Address translation services.
    pub const ATS: u16 = 0x000f;
    /// Single root I/O virtualization.
    pub const SRIOV: u16 = 0x0010;
    /// Multi-root I/O virtualization.
    pub const MRIOV: u16 = 0x0011;
    /// Multicast.
    pub const MULTICAST: u16 = 0x0012;
    /// Page request interface.
    pub const PRI: u16 = 0x0013;
    /// Resizable BAR.
    pub const RESIZABLE_BAR: u16 = 0x0015;
    /// Dynamic power allocation.
    pub const DPA: u16 = 0x0016;
    /// TLP processing hints.
    pub const TPH: u16 = 0x0017;
    /// Latency tolerance reporting.
    pub const LTR: u16 = 0x0018;
    /// Secondary PCI Express.
    pub const SECONDARY_PCIE: u16 = 0x0019;
    /// Process address space ID.
    pub const PASID: u16 = 0x001b;
    /// Downstream port containment.
    pub const DPC: u16 = 0x001d;
    /// L1 PM substates.
    pub const L1_PM_SUBSTATES: u16 = 0x001e;
    /// Precision time measurement.
    pub const PTM: u16 = 0x001f;
    /// Designated vendor-specific extended capability.
    pub const DVSEC: u16 = 0x0023;
    /// VF resizable BAR.
    pub const VF_RESIZABLE_BAR: u16 = 0x0024;
    /// Data link feature.
    pub const DATA_LINK_FEATURE: u16 = 0x0025;
    /// Physical layer 16.0 GT/s.
    pub const PHYSICAL_LAYER_16GT: u16 = 0x0026;
}

/// One standard capability found in a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Capability {
    /// Capability ID (see [`cap_id`]).
    pub id: u8,
    /// Offset of the capability header in configuration space.
    pub offset: u16,
    /// Next pointer (reserved bits masked; 0 ends the chain).
    pub next: u16,
}

/// One extended capability found in a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExtendedCapability {
    /// Capability ID (see [`ext_cap_id`]).
    pub id: u16,
    /// Capability version (4 bits).
    pub version: u8,
    /// Offset of the capability header in configuration space.
    pub offset: u16,
    /// Next pointer (reserved bits masked; 0 ends the chain).
    pub next: u16,
}

fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    let s = bytes.get(offset..offset.checked_add(4)?)?;
    Some(u32::from_le_bytes(<[u8; 4]>::try_from(s).ok()?))
}

/// Visited-offset set over dword positions: no allocation, 1024 dwords.
#[derive(Clone, Debug)]
struct Visited([u64; CONFIG_SPACE_SIZE / 4 / 64]);

impl Visited {
    /// Marks `offset`; returns false if it was already marked.
    fn insert(&mut self, offset: u16) -> bool {
        let dword = usize::from(offset / 4);
        let Some(word) = self.0.get_mut(dword / 64) else {
            return false;
        };
        let bit = 1u64 << (dword % 64);
        let fresh = *word & bit == 0;
        *word |= bit;
        fresh
    }
}

/// Number of bytes whose layout the specification fixes for the standard capability `id` at
/// `pos` in `bytes`: Power Management (PCI PM 1.2 §3.2: 8 bytes), MSI (PCI Local Bus 3.0
/// §6.8.1: 10 bytes, 4 more with a 64-bit address, 10 more with per-vector masking, read from
/// its Message Control) and MSI-X (§6.8.2: 12 bytes). Any other capability is known to hold
/// only its header dword (`id`, `next` and 2 bytes of its own): 4.
pub fn fixed_capability_len(id: u8, bytes: &[u8], pos: usize) -> usize {
    fixed_len(id, bytes, pos)
}

/// Length of the standard capability `id` at `pos` of `bytes`, for a capability whose end is
/// not given by the next one: PCI Express 0x3c (PCIe Base §7.5.3, through Slot Status 2), vendor
/// specific its own length byte (byte 2, at least the 4-byte header), else as
/// [`fixed_capability_len`].
pub fn standard_capability_len(id: u8, bytes: &[u8], pos: usize) -> usize {
    match id {
        cap_id::PCI_EXPRESS => 0x3c,
        cap_id::VENDOR_SPECIFIC => usize::from(bytes.get(pos + 2).copied().unwrap_or(4)).max(4),
        _ => fixed_len(id, bytes, pos),
    }
}

/// Length of the extended capability `id` (PCIe Base 6.0 chapter 7) where the spec fixes it;
/// 4 (the header only) for capabilities of variable or unknown length.
pub fn extended_capability_len(id: u16) -> usize {
    match id {
        ext_cap_id::AER => 0x48,
        ext_cap_id::SRIOV => 0x40,
        ext_cap_id::PRI | ext_cap_id::L1_PM_SUBSTATES => 0x10,
        ext_cap_id::DEVICE_SERIAL_NUMBER | ext_cap_id::PTM => 0x0c,
        ext_cap_id::ARI
        | ext_cap_id::ATS
        | ext_cap_id::LTR
        | ext_cap_id::PASID
        | ext_cap_id::ACS => 0x08,
        _ => 4,
    }
}

fn fixed_len(id: u8, bytes: &[u8], pos: usize) -> usize {
    match id {
        cap_id::POWER_MANAGEMENT => 8,
        cap_id::MSIX => 12,
        cap_id::MSI => {
            let lo = bytes.get(pos + 2).copied().unwrap_or(0);
            let hi = bytes.get(pos + 3).copied().unwrap_or(0);
            let control = u16::from_le_bytes([lo, hi]);
            let addr64 = if control & 0x0080 != 0 { 4 } else { 0 };
            let masking = if control & 0x0100 != 0 { 10 } else { 0 };
            10 + addr64 + masking
        }
        _ => 4,
    }
}

/// Which capability owns each dword of 0x40..0x100 (by its offset; 0 = none), so that a chain
/// whose capabilities share registers is caught without allocating.
#[derive(Clone, Debug)]
struct Owners([u8; LEGACY_CONFIG_SPACE_SIZE / 4]);

impl Owners {
    /// Claims the dwords of `pos..pos + len` (clamped to the standard area) for the capability
    /// at `pos`; returns the offset of a capability that already owns one of them.
    fn claim(&mut self, pos: usize, len: usize) -> Option<u16> {
        let first = pos / 4;
        let end = pos.saturating_add(len).div_ceil(4).min(self.0.len());
        let owner = u8::try_from(pos).ok()?;
        let dwords = self.0.get_mut(first..end)?;
        if let Some(taken) = dwords.iter().find(|o| **o != 0) {
            return Some(u16::from(*taken));
        }
        dwords.fill(owner);
        None
    }
}

/// Iterator over a standard capability chain. Yields `Err` once (then ends) on a broken chain.
#[derive(Clone, Debug)]
pub struct CapabilityIter<'a> {
    bytes: &'a [u8],
    /// Offset of the pointer register that holds `next`.
    at: u16,
    next: u16,
    visited: Visited,
    owners: Owners,
    done: bool,
}

impl<'a> CapabilityIter<'a> {
    /// Walks the standard capability chain of `config` (at least 256 bytes; more is fine).
    /// The chain is empty if status bit 4 ("capabilities list") is clear.
    pub fn new(config: &'a [u8]) -> Self {
        let status = config.get(STATUS).copied().unwrap_or(0);
        let has_list = u16::from(status) & STATUS_CAPABILITIES_LIST != 0;
        let ptr = config.get(CAPABILITIES_POINTER).copied().unwrap_or(0) & !0x3;
        Self {
            bytes: config,
            at: CAPABILITIES_POINTER as u16,
            next: if has_list { u16::from(ptr) } else { 0 },
            visited: Visited([0; CONFIG_SPACE_SIZE / 4 / 64]),
            owners: Owners([0; LEGACY_CONFIG_SPACE_SIZE / 4]),
            done: config.len() >= LEGACY_CONFIG_SPACE_SIZE && !has_list,
        }
    }
}

impl Iterator for CapabilityIter<'_> {
    type Item = Result<Capability>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if self.bytes.len() < LEGACY_CONFIG_SPACE_SIZE {
            self.done = true;
            return Some(Err(Error::BadBufferLength {
                len: self.bytes.len(),
                min: LEGACY_CONFIG_SPACE_SIZE,
                max: CONFIG_SPACE_SIZE,
            }));
        }
        let offset = self.next;
        if offset == 0 {
            self.done = true;
            return None;
        }
        let pos = usize::from(offset);
        let fail = |e| Some(Err(e));
        if pos < HEADER_SIZE || pos + 2 > LEGACY_CONFIG_SPACE_SIZE {
            self.done = true;
            return fail(Error::BadCapabilityPointer {
                at: self.at,
                pointer: offset,
            });
        }
        if !self.visited.insert(offset) {
            self.done = true;
            return fail(Error::CapabilityLoop { offset });
        }
        let id = self.bytes.get(pos).copied().unwrap_or(0);
        let len = fixed_capability_len(id, self.bytes, pos);
        if let Some(other) = self.owners.claim(pos, len) {
            self.done = true;
            return fail(Error::CapabilityOverlap { offset, other });
        }
        let next = u16::from(self.bytes.get(pos + 1).copied().unwrap_or(0) & !0x3);
        self.at = offset + 1;
        self.next = next;
        Some(Ok(Capability { id, offset, next }))
    }
}

/// Iterator over an extended capability chain. Yields `Err` once (then ends) on a broken chain.
#[derive(Clone, Debug)]
pub struct ExtendedCapabilityIter<'a> {
    bytes: &'a [u8],
    at: u16,
    next: u16,
    visited: Visited,
    done: bool,
}

impl<'a> ExtendedCapabilityIter<'a> {
    /// Walks the extended capability chain of `config`. A buffer of 256 bytes or less (a
    /// conventional PCI device) has none; a header of 0 or all ones at 0x100 means none.
    pub fn new(config: &'a [u8]) -> Self {
        let first = u32_at(config, EXTENDED_CONFIG_START);
        let empty = matches!(first, None | Some(0) | Some(u32::MAX));
        Self {
            bytes: config,
            at: EXTENDED_CONFIG_START as u16,
            next: EXTENDED_CONFIG_START as u16,
            visited: Visited([0; CONFIG_SPACE_SIZE / 4 / 64]),
            done: empty,
        }
    }
}

impl Iterator for ExtendedCapabilityIter<'_> {
    type Item = Result<ExtendedCapability>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let offset = self.next;
        if offset == 0 {
            self.done = true;
            return None;
        }
        let pos = usize::from(offset);
        let header = if pos < EXTENDED_CONFIG_START {
            None
        } else {
            u32_at(self.bytes, pos)
        };
        let Some(header) = header else {
            self.done = true;
            return Some(Err(Error::BadCapabilityPointer {
                at: self.at,
                pointer: offset,
            }));
        };
        if !self.visited.insert(offset) {
            self.done = true;
            return Some(Err(Error::CapabilityLoop { offset }));
        }
        let next = ((header >> 20) & 0xffc) as u16;
        self.at = offset;
        self.next = next;
        Some(Ok(ExtendedCapability {
            id: (header & 0xffff) as u16,
            version: ((header >> 16) & 0xf) as u8,
            offset,
            next,
        }))
    }
}

fn collect_lenient<T>(iter: impl Iterator<Item = Result<T>>) -> (Vec<T>, Option<Error>) {
    let mut found = Vec::new();
    for item in iter {
        match item {
            Ok(cap) => found.push(cap),
            Err(e) => return (found, Some(e)),
        }
    }
    (found, None)
}

/// Parses the standard capability chain of `config` (256 or more bytes); any break in the
/// chain is an error.
pub fn parse_capabilities(config: &[u8]) -> Result<Vec<Capability>> {
    CapabilityIter::new(config).collect()
}

/// Parses the standard capability chain of `config`, returning the capabilities found before
/// any break in the chain, and the error that stopped the walk (for a VMM that keeps going with
/// a broken device).
pub fn parse_capabilities_lenient(config: &[u8]) -> (Vec<Capability>, Option<Error>) {
    collect_lenient(CapabilityIter::new(config))
}

/// Parses the extended capability chain of `config` (normally 4096 bytes); any break in the
/// chain is an error.
pub fn parse_extended_capabilities(config: &[u8]) -> Result<Vec<ExtendedCapability>> {
    ExtendedCapabilityIter::new(config).collect()
}

/// Parses the extended capability chain of `config`, returning the capabilities found before
/// any break in the chain and the error that stopped the walk.
pub fn parse_extended_capabilities_lenient(
    config: &[u8],
) -> (Vec<ExtendedCapability>, Option<Error>) {
    collect_lenient(ExtendedCapabilityIter::new(config))
}

fn align_up4(v: u16) -> Option<u16> {
    v.checked_add(3).map(|v| v & !3)
}

/// Where a new capability of `needed` bytes goes: the first dword-aligned
/// offset of `free`, which must lie inside `area` and not hold the start of
/// a capability already in the chain (`chain`, its offsets in order).
/// Returns that offset and the chain's last capability, to link it after.
fn place_capability(
    free: &std::ops::Range<u16>,
    needed: usize,
    area: std::ops::Range<usize>,
    chain: impl Iterator<Item = Result<u16>>,
) -> Result<(u16, Option<u16>)> {
    let no_space = || Error::NoCapabilitySpace {
        needed,
        start: free.start,
        end: free.end,
    };
    let start = align_up4(free.start).ok_or_else(no_space)?;
    let end = usize::from(start).saturating_add(needed);
    if usize::from(start) < area.start || end > usize::from(free.end) || end > area.end {
        return Err(no_space());
    }
    let mut tail = None;
    for offset in chain {
        let offset = offset?;
        if (usize::from(start)..end).contains(&usize::from(offset)) {
            return Err(no_space());
        }
        tail = Some(offset);
    }
    Ok((start, tail))
}

impl ConfigSpace {
    /// Walks this space's standard capability chain without allocating.
    pub fn capability_iter(&self) -> CapabilityIter<'_> {
        CapabilityIter::new(&self.bytes[..])
    }

    /// Walks this space's extended capability chain without allocating.
    pub fn extended_capability_iter(&self) -> ExtendedCapabilityIter<'_> {
        ExtendedCapabilityIter::new(&self.bytes[..])
    }

    /// The standard capabilities (strict: a broken chain is an error).
    pub fn capabilities(&self) -> Result<Vec<Capability>> {
        self.capability_iter().collect()
    }

    /// The extended capabilities (strict: a broken chain is an error).
    pub fn extended_capabilities(&self) -> Result<Vec<ExtendedCapability>> {
        self.extended_capability_iter().collect()
    }

    /// The first standard capability with ID `id` reachable in the chain (a broken chain is
    /// searched up to the break). Does not allocate.
    pub fn find_capability(&self, id: u8) -> Option<Capability> {
        self.capability_iter()
            .map_while(|c| c.ok())
            .find(|c| c.id == id)
    }

    /// The first extended capability with ID `id` reachable in the chain (a broken chain is
    /// searched up to the break). Does not allocate.
    pub fn find_extended_capability(&self, id: u16) -> Option<ExtendedCapability> {
        self.extended_capability_iter()
            .map_while(|c| c.ok())
            .find(|c| c.id == id)
    }

    /// Appends a standard capability with ID `id` and `body` (the bytes after the ID and next
    /// pointer) in the free space `free` (a range of offsets the caller knows to be unused),
    /// at its first dword-aligned offset, and links it at the end of the chain. The new bytes
    /// are read-only for the guest; set masks afterwards as needed. Returns its offset.
    pub fn add_capability(
        &mut self,
        free: std::ops::Range<u16>,
        id: u8,
        body: &[u8],
    ) -> Result<u16> {
        let needed = body.len().saturating_add(2);
        let offsets = self.capability_iter().map(|c| c.map(|c| c.offset));
        let (start, tail) = place_capability(
            &free,
            needed,
            HEADER_SIZE..LEGACY_CONFIG_SPACE_SIZE,
            offsets,
        )?;
        self.set_u8(usize::from(start), id)?;
        self.set_u8(usize::from(start) + 1, 0)?;
        self.set_bytes(usize::from(start) + 2, body)?;
        self.set_read_only(usize::from(start), needed)?;
        match tail {
            Some(t) => self.set_u8(usize::from(t) + 1, start as u8)?,
            None => self.set_capabilities_pointer(start as u8),
        }
        Ok(start)
    }

    /// Appends an extended capability (`id`, `version`, `body` after the header dword) in the
    /// free space `free`, at its first dword-aligned offset, linked at the end of the chain.
    /// If the extended chain is empty and the capability does not land at 0x100, a null
    /// header (ID 0) pointing at it is written at 0x100. Returns its offset.
    pub fn add_extended_capability(
        &mut self,
        free: std::ops::Range<u16>,
        id: u16,
        version: u8,
        body: &[u8],
    ) -> Result<u16> {
        let needed = body.len().saturating_add(4);
        let offsets = self.extended_capability_iter().map(|c| c.map(|c| c.offset));
        let (start, mut tail) = place_capability(
            &free,
            needed,
            EXTENDED_CONFIG_START..CONFIG_SPACE_SIZE,
            offsets,
        )?;
        if tail.is_none() && usize::from(start) != EXTENDED_CONFIG_START {
            // The chain must start at 0x100: put a null header there pointing at the new cap.
            if usize::from(start) < EXTENDED_CONFIG_START + 4 {
                return Err(Error::NoCapabilitySpace {
                    needed,
                    start: free.start,
                    end: free.end,
                });
            }
            self.set_u32(EXTENDED_CONFIG_START, 0)?;
            tail = Some(EXTENDED_CONFIG_START as u16);
        }
        let header = u32::from(id) | (u32::from(version & 0xf) << 16);
        self.set_u32(usize::from(start), header)?;
        self.set_bytes(usize::from(start) + 4, body)?;
        self.set_read_only(usize::from(start), needed)?;
        if let Some(t) = tail {
            self.set_ext_next(t, start);
        }
        Ok(start)
    }

    fn set_ext_next(&mut self, at: u16, next: u16) {
        let header = self.raw_u32(usize::from(at));
        let header = (header & 0x000f_ffff) | (u32::from(next & 0xffc) << 20);
        let _ = self.set_u32(usize::from(at), header);
    }

    /// Hides the standard capability at `offset` from the guest by unlinking it: its
    /// predecessor's next pointer (or the capabilities pointer) takes its next pointer. If the
    /// chain becomes empty, status bit 4 is cleared. Fails if no capability at `offset` is
    /// reachable.
    pub fn hide_capability(&mut self, offset: u16) -> Result<()> {
        let mut prev = None;
        for cap in self.capability_iter() {
            let cap = cap?;
            if cap.offset == offset {
                match prev {
                    Some(p) => self.set_u8(usize::from(p) + 1, cap.next as u8)?,
                    None => self.set_capabilities_pointer(cap.next as u8),
                }
                return Ok(());
            }
            prev = Some(cap.offset);
        }
        Err(Error::CapabilityNotFound(offset))
    }

    /// Hides the extended capability at `offset`. A capability after the first is unlinked;
    /// the first (at 0x100, which cannot move) becomes a null capability (ID 0, version 0)
    /// that keeps its next pointer, or an all-zero header (empty chain) if it was the only one.
    pub fn hide_extended_capability(&mut self, offset: u16) -> Result<()> {
        let mut prev = None;
        for cap in self.extended_capability_iter() {
            let cap = cap?;
            if cap.offset == offset {
                match prev {
                    Some(p) => self.set_ext_next(p, cap.next),
                    None => self.set_u32(usize::from(offset), u32::from(cap.next) << 20)?,
                }
                return Ok(());
            }
            prev = Some(cap.offset);
        }
        Err(Error::CapabilityNotFound(offset))
    }
}
