//! The configuration space itself: bytes, per-bit masks, guest accesses and header fields.

use crate::bar::BarTracking;
use crate::effects::WriteEffects;
use crate::error::{Error, Result};
use crate::regs::*;

/// A type-0 PCI/PCIe configuration space of 4096 bytes, as the guest sees it.
///
/// Every bit is, for the guest, one of: read-only (the default), writable, or write-1-to-clear
/// (RW1C: writing 1 clears it, writing 0 leaves it). The device model (the VMM) changes any byte
/// regardless of the masks through the `set_*` methods, and chooses the masks with
/// [`ConfigSpace::set_writable`], [`ConfigSpace::set_rw1c`] and [`ConfigSpace::set_read_only`].
///
/// Guest accesses ([`ConfigSpace::read`], [`ConfigSpace::write`] and the sized helpers) must be
/// 1, 2 or 4 bytes long and lie inside the 4096 bytes; they may start at any offset (a 2- or
/// 4-byte access that straddles a dword boundary is merged byte by byte). Reads and writes never
/// allocate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigSpace {
    pub(crate) bytes: Box<[u8; CONFIG_SPACE_SIZE]>,
    pub(crate) writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    pub(crate) rw1c: Box<[u8; CONFIG_SPACE_SIZE]>,
    pub(crate) bars: BarTracking,
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self::new()
    }
}

/// True if `[start, end)` and `[reg, reg + len)` overlap.
pub(crate) fn overlaps(start: usize, end: usize, reg: usize, len: usize) -> bool {
    start < reg.saturating_add(len) && reg < end
}

/// A 4-byte slice as a little-endian dword.
fn dword(b: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(b).ok().map(u32::from_le_bytes)
}

#[inline]
fn check_guest_access(offset: usize, size: usize) -> Result<()> {
    let in_bounds = offset
        .checked_add(size)
        .is_some_and(|end| end <= CONFIG_SPACE_SIZE);
    if matches!(size, 1 | 2 | 4) && in_bounds {
        Ok(())
    } else {
        Err(Error::InvalidAccess { offset, size })
    }
}

fn check_range(offset: usize, len: usize) -> Result<std::ops::Range<usize>> {
    match offset.checked_add(len) {
        Some(end) if end <= CONFIG_SPACE_SIZE => Ok(offset..end),
        _ => Err(Error::OutOfRange { offset, len }),
    }
}

impl ConfigSpace {
    /// An all-zero type-0 configuration space with the default masks: the command bits of
    /// [`COMMAND_DEFAULT_WRITABLE`] writable, the status error bits ([`STATUS_RW1C`])
    /// write-1-to-clear, cache line size, latency timer and interrupt line writable, everything
    /// else read-only. No BAR and no ROM are declared.
    pub fn new() -> Self {
        let mut space = Self {
            bytes: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            rw1c: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: BarTracking::default(),
        };
        space.apply_default_masks();
        space
    }

    /// Builds a configuration space from a device's real configuration bytes (for example read
    /// through VFIO): 64 to 4096 bytes, missing bytes read as zero. The header must be type 0.
    ///
    /// The default masks of [`ConfigSpace::new`] apply. The BAR and expansion ROM registers are
    /// cleared (they hold host addresses): declare the BARs with
    /// [`ConfigSpace::declare_bar`] / [`ConfigSpace::declare_rom`] afterwards.
    pub fn from_bytes(config: &[u8]) -> Result<Self> {
        if config.len() < HEADER_SIZE || config.len() > CONFIG_SPACE_SIZE {
            return Err(Error::BadBufferLength {
                len: config.len(),
                min: HEADER_SIZE,
                max: CONFIG_SPACE_SIZE,
            });
        }
        let header_type =
            config.get(HEADER_TYPE).copied().unwrap_or(0) & !HEADER_TYPE_MULTIFUNCTION;
        if header_type != 0 {
            return Err(Error::UnsupportedHeaderType(header_type));
        }
        let mut space = Self::new();
        if let Some(dst) = space.bytes.get_mut(..config.len()) {
            dst.copy_from_slice(config);
        }
        for reg in (BAR0..BAR0 + 24).chain(ROM_ADDRESS..ROM_ADDRESS + 4) {
            if let Some(b) = space.bytes.get_mut(reg) {
                *b = 0;
            }
        }
        Ok(space)
    }

    fn apply_default_masks(&mut self) {
        // The masks cover the header only; both ranges are constant and in bounds.
        let _ = self.set_writable(COMMAND, &COMMAND_DEFAULT_WRITABLE.to_le_bytes());
        let _ = self.set_rw1c(STATUS, &STATUS_RW1C.to_le_bytes());
        let _ = self.set_writable(CACHE_LINE_SIZE, &[0xff, 0xff]);
        let _ = self.set_writable(INTERRUPT_LINE, &[0xff]);
    }

    // ----- guest accesses -----

    /// Guest read of `data.len()` bytes (1, 2 or 4) at `offset`. Never allocates.
    #[inline]
    pub fn read(&self, offset: usize, data: &mut [u8]) -> Result<()> {
        check_guest_access(offset, data.len())?;
        let src = self
            .bytes
            .get(offset..offset + data.len())
            .ok_or(Error::InvalidAccess {
                offset,
                size: data.len(),
            })?;
        data.copy_from_slice(src);
        Ok(())
    }

    /// Guest read of one byte.
    #[inline]
    pub fn read_u8(&self, offset: usize) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read(offset, &mut b)?;
        Ok(b[0])
    }

    /// Guest read of a little-endian word.
    #[inline]
    pub fn read_u16(&self, offset: usize) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Guest read of a little-endian dword.
    #[inline]
    pub fn read_u32(&self, offset: usize) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Guest read of dword register `reg_index` (byte offset `4 * reg_index`, 0..1024).
    #[inline]
    pub fn read_dword(&self, reg_index: usize) -> Result<u32> {
        self.read_u32(reg_index.saturating_mul(4))
    }

    /// Guest write of `data.len()` bytes (1, 2 or 4) at `offset`, honouring the masks:
    /// read-only bits keep their value, writable bits take the written value, RW1C bits clear
    /// where a 1 is written. Returns what the VMM must act on (BAR moves, command changes).
    /// Never allocates.
    #[inline]
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<WriteEffects> {
        let mut effects = WriteEffects::new();
        self.write_into(offset, data, &mut effects)?;
        Ok(effects)
    }

    /// [`ConfigSpace::write`] that appends the effects to `effects` (cleared first) instead of
    /// returning them: the hot-path form, for a caller that keeps the list where it uses it
    /// (a [`WriteEffects`] has room for [`crate::MAX_WRITE_EFFECTS`] effects, which returning
    /// it by value copies). Never allocates.
    #[inline]
    pub fn write_into(
        &mut self,
        offset: usize,
        data: &[u8],
        effects: &mut WriteEffects,
    ) -> Result<()> {
        check_guest_access(offset, data.len())?;
        effects.clear();
        let old_command = self.command();
        self.merge(offset, data);
        // Only header registers (BARs, ROM, command) have effects.
        if offset < HEADER_SIZE {
            self.after_guest_write(offset, data, old_command, effects);
        }
        Ok(())
    }

    /// Merges a guest write into the registers through the masks: an aligned dword in one
    /// step, anything else byte by byte.
    #[inline]
    fn merge(&mut self, offset: usize, data: &[u8]) {
        if let (Ok(value), 0) = (<[u8; 4]>::try_from(data), offset % 4) {
            let range = offset..offset + 4;
            let w = self.writable.get(range.clone()).and_then(dword);
            let c = self.rw1c.get(range.clone()).and_then(dword);
            if let (Some(w), Some(c), Some(b)) = (w, c, self.bytes.get_mut(range)) {
                let v = u32::from_le_bytes(value);
                let old = dword(b).unwrap_or(0);
                let new = ((old & !w) | (v & w)) & !(v & c);
                b.copy_from_slice(&new.to_le_bytes());
            }
            return;
        }
        for (i, &value) in data.iter().enumerate() {
            self.merge_byte(offset + i, value);
        }
    }

    /// Guest write of one byte.
    #[inline]
    pub fn write_u8(&mut self, offset: usize, value: u8) -> Result<WriteEffects> {
        self.write(offset, &[value])
    }

    /// Guest write of a little-endian word.
    #[inline]
    pub fn write_u16(&mut self, offset: usize, value: u16) -> Result<WriteEffects> {
        self.write(offset, &value.to_le_bytes())
    }

    /// Guest write of a little-endian dword.
    #[inline]
    pub fn write_u32(&mut self, offset: usize, value: u32) -> Result<WriteEffects> {
        self.write(offset, &value.to_le_bytes())
    }

    /// Guest write of dword register `reg_index` (byte offset `4 * reg_index`, 0..1024).
    #[inline]
    pub fn write_dword(&mut self, reg_index: usize, value: u32) -> Result<WriteEffects> {
        self.write_u32(reg_index.saturating_mul(4), value)
    }

    fn merge_byte(&mut self, offset: usize, value: u8) {
        let w = self.writable.get(offset).copied().unwrap_or(0);
        let c = self.rw1c.get(offset).copied().unwrap_or(0);
        if let Some(b) = self.bytes.get_mut(offset) {
            *b = ((*b & !w) | (value & w)) & !(value & c);
        }
    }

    // ----- device-side (raw) access -----

    /// The whole configuration space as the guest would read it.
    pub fn as_bytes(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.bytes
    }

    /// The writable mask, one bit per configuration bit.
    pub fn writable_mask(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.writable
    }

    /// The write-1-to-clear mask, one bit per configuration bit.
    pub fn rw1c_mask(&self) -> &[u8; CONFIG_SPACE_SIZE] {
        &self.rw1c
    }

    /// Device-side write of `data` at `offset`, ignoring the masks (any length that fits).
    /// Produces no effects and does not update BAR move tracking; use
    /// [`ConfigSpace::set_bar_address`] to place a BAR.
    pub fn set_bytes(&mut self, offset: usize, data: &[u8]) -> Result<()> {
        let range = check_range(offset, data.len())?;
        let dst = self.bytes.get_mut(range).ok_or(Error::OutOfRange {
            offset,
            len: data.len(),
        })?;
        dst.copy_from_slice(data);
        Ok(())
    }

    /// Device-side read of `data.len()` bytes at `offset` (any length that fits).
    pub fn get_bytes(&self, offset: usize, data: &mut [u8]) -> Result<()> {
        let range = check_range(offset, data.len())?;
        let src = self.bytes.get(range).ok_or(Error::OutOfRange {
            offset,
            len: data.len(),
        })?;
        data.copy_from_slice(src);
        Ok(())
    }

    /// Device-side write of one byte, ignoring the masks.
    pub fn set_u8(&mut self, offset: usize, value: u8) -> Result<()> {
        self.set_bytes(offset, &[value])
    }

    /// Device-side write of a little-endian word, ignoring the masks.
    pub fn set_u16(&mut self, offset: usize, value: u16) -> Result<()> {
        self.set_bytes(offset, &value.to_le_bytes())
    }

    /// Device-side write of a little-endian dword, ignoring the masks.
    pub fn set_u32(&mut self, offset: usize, value: u32) -> Result<()> {
        self.set_bytes(offset, &value.to_le_bytes())
    }

    /// Makes the bits set in `mask` (one byte per configuration byte from `offset`) writable by
    /// the guest; those bits stop being RW1C. Bits clear in `mask` are left as they were.
    pub fn set_writable(&mut self, offset: usize, mask: &[u8]) -> Result<()> {
        let range = check_range(offset, mask.len())?;
        for (i, &m) in range.zip(mask) {
            if let (Some(w), Some(c)) = (self.writable.get_mut(i), self.rw1c.get_mut(i)) {
                *w |= m;
                *c &= !m;
            }
        }
        Ok(())
    }

    /// Makes the bits set in `mask` write-1-to-clear for the guest (for status registers,
    /// including those of capabilities); those bits stop being writable.
    pub fn set_rw1c(&mut self, offset: usize, mask: &[u8]) -> Result<()> {
        let range = check_range(offset, mask.len())?;
        for (i, &m) in range.zip(mask) {
            if let (Some(w), Some(c)) = (self.writable.get_mut(i), self.rw1c.get_mut(i)) {
                *c |= m;
                *w &= !m;
            }
        }
        Ok(())
    }

    /// Makes `len` bytes from `offset` entirely read-only for the guest.
    pub fn set_read_only(&mut self, offset: usize, len: usize) -> Result<()> {
        let range = check_range(offset, len)?;
        for i in range {
            if let (Some(w), Some(c)) = (self.writable.get_mut(i), self.rw1c.get_mut(i)) {
                *w = 0;
                *c = 0;
            }
        }
        Ok(())
    }

    pub(crate) fn raw_u8(&self, offset: usize) -> u8 {
        self.bytes.get(offset).copied().unwrap_or(0)
    }

    pub(crate) fn raw_u16(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.raw_u8(offset), self.raw_u8(offset + 1)])
    }

    pub(crate) fn raw_u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes([
            self.raw_u8(offset),
            self.raw_u8(offset + 1),
            self.raw_u8(offset + 2),
            self.raw_u8(offset + 3),
        ])
    }

    /// Writes a header field whose offset is a constant inside the space.
    fn put(&mut self, offset: usize, data: &[u8]) {
        if let Some(dst) = self.bytes.get_mut(offset..offset + data.len()) {
            dst.copy_from_slice(data);
        }
    }

    // ----- header fields -----

    /// Vendor ID.
    pub fn vendor_id(&self) -> u16 {
        self.raw_u16(VENDOR_ID)
    }

    /// Sets the vendor ID.
    pub fn set_vendor_id(&mut self, id: u16) {
        self.put(VENDOR_ID, &id.to_le_bytes());
    }

    /// Device ID.
    pub fn device_id(&self) -> u16 {
        self.raw_u16(DEVICE_ID)
    }

    /// Sets the device ID.
    pub fn set_device_id(&mut self, id: u16) {
        self.put(DEVICE_ID, &id.to_le_bytes());
    }

    /// Revision ID.
    pub fn revision_id(&self) -> u8 {
        self.raw_u8(REVISION_ID)
    }

    /// Sets the revision ID.
    pub fn set_revision_id(&mut self, rev: u8) {
        self.put(REVISION_ID, &[rev]);
    }

    /// Class code.
    pub fn class_code(&self) -> ClassCode {
        ClassCode {
            base: self.raw_u8(BASE_CLASS),
            sub: self.raw_u8(SUBCLASS),
            prog_if: self.raw_u8(PROG_IF),
        }
    }

    /// Sets the class code.
    pub fn set_class_code(&mut self, class: ClassCode) {
        self.put(PROG_IF, &[class.prog_if, class.sub, class.base]);
    }

    /// Header layout (bits 6:0 of the header type register; 0 for an endpoint).
    pub fn header_type(&self) -> u8 {
        self.raw_u8(HEADER_TYPE) & !HEADER_TYPE_MULTIFUNCTION
    }

    /// True if the multi-function bit (bit 7 of the header type) is set.
    pub fn is_multifunction(&self) -> bool {
        self.raw_u8(HEADER_TYPE) & HEADER_TYPE_MULTIFUNCTION != 0
    }

    /// Sets (`true`) or clears (`false`) the multi-function bit. A passed-through function is
    /// usually shown as single-function, so the VMM clears it.
    pub fn set_multifunction(&mut self, multifunction: bool) {
        let v = self.raw_u8(HEADER_TYPE);
        let v = if multifunction {
            v | HEADER_TYPE_MULTIFUNCTION
        } else {
            v & !HEADER_TYPE_MULTIFUNCTION
        };
        self.put(HEADER_TYPE, &[v]);
    }

    /// Subsystem vendor ID.
    pub fn subsystem_vendor_id(&self) -> u16 {
        self.raw_u16(SUBSYSTEM_VENDOR_ID)
    }

    /// Sets the subsystem vendor ID.
    pub fn set_subsystem_vendor_id(&mut self, id: u16) {
        self.put(SUBSYSTEM_VENDOR_ID, &id.to_le_bytes());
    }

    /// Subsystem ID.
    pub fn subsystem_id(&self) -> u16 {
        self.raw_u16(SUBSYSTEM_ID)
    }

    /// Sets the subsystem ID.
    pub fn set_subsystem_id(&mut self, id: u16) {
        self.put(SUBSYSTEM_ID, &id.to_le_bytes());
    }

    /// Command register.
    pub fn command(&self) -> u16 {
        self.raw_u16(COMMAND)
    }

    /// Sets the command register (device side; produces no effects).
    pub fn set_command(&mut self, command: u16) {
        self.put(COMMAND, &command.to_le_bytes());
    }

    /// Status register.
    pub fn status(&self) -> u16 {
        self.raw_u16(STATUS)
    }

    /// Sets the status register (device side, for example to raise an error bit).
    pub fn set_status(&mut self, status: u16) {
        self.put(STATUS, &status.to_le_bytes());
    }

    /// Cache line size register.
    pub fn cache_line_size(&self) -> u8 {
        self.raw_u8(CACHE_LINE_SIZE)
    }

    /// Sets the cache line size register.
    pub fn set_cache_line_size(&mut self, value: u8) {
        self.put(CACHE_LINE_SIZE, &[value]);
    }

    /// Latency timer register.
    pub fn latency_timer(&self) -> u8 {
        self.raw_u8(LATENCY_TIMER)
    }

    /// Sets the latency timer register.
    pub fn set_latency_timer(&mut self, value: u8) {
        self.put(LATENCY_TIMER, &[value]);
    }

    /// Interrupt line (written by the guest's firmware or OS; the device ignores it).
    pub fn interrupt_line(&self) -> u8 {
        self.raw_u8(INTERRUPT_LINE)
    }

    /// Sets the interrupt line.
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.put(INTERRUPT_LINE, &[line]);
    }

    /// Interrupt pin (0 = none, 1..=4 = INTA#..INTD#).
    pub fn interrupt_pin(&self) -> u8 {
        self.raw_u8(INTERRUPT_PIN)
    }

    /// Sets the interrupt pin (read-only for the guest).
    pub fn set_interrupt_pin(&mut self, pin: u8) {
        self.put(INTERRUPT_PIN, &[pin]);
    }

    /// Capabilities pointer with its reserved low 2 bits masked; 0 if the status register
    /// does not advertise a capabilities list.
    pub fn capabilities_pointer(&self) -> u8 {
        if self.status() & STATUS_CAPABILITIES_LIST == 0 {
            0
        } else {
            self.raw_u8(CAPABILITIES_POINTER) & !0x3
        }
    }

    /// Sets the capabilities pointer, and the status "capabilities list" bit (set if `ptr` is
    /// non-zero, cleared otherwise).
    pub fn set_capabilities_pointer(&mut self, ptr: u8) {
        self.put(CAPABILITIES_POINTER, &[ptr]);
        let status = self.status();
        let status = if ptr != 0 {
            status | STATUS_CAPABILITIES_LIST
        } else {
            status & !STATUS_CAPABILITIES_LIST
        };
        self.set_status(status);
    }

    fn after_guest_write(
        &mut self,
        offset: usize,
        data: &[u8],
        old_command: u16,
        effects: &mut WriteEffects,
    ) {
        let end = offset + data.len();
        if overlaps(offset, end, BAR0, 24) || overlaps(offset, end, ROM_ADDRESS, 4) {
            self.after_bar_write(offset, data, effects);
        }
        if overlaps(offset, end, COMMAND, 2) {
            let new_command = self.command();
            self.after_command_write(effects);
            if new_command != old_command {
                effects.push(crate::WriteEffect::CommandChange {
                    old: old_command,
                    new: new_command,
                });
            }
        }
    }
}

/// The three bytes of the class code register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClassCode {
    /// Base class (offset 0x0b), e.g. 0x01 mass storage, 0x02 network.
    pub base: u8,
    /// Sub-class (offset 0x0a).
    pub sub: u8,
    /// Programming interface (offset 0x09).
    pub prog_if: u8,
}
