//! BAR methods of [`ConfigSpace`]: declaration, the sizing protocol, the expansion ROM BAR, and
//! detection of the guest moving a BAR.
//!
//! Sizing (PCI Local Bus 3.0 §6.2.5.1) falls out of the masks: a BAR of size `S` has its
//! address bits below `S` read-only zero and its flag bits read-only, so after the guest writes
//! all ones it reads back `!(S - 1)` ORed with the flags. For a 64-bit BAR the same holds for
//! the 64-bit value split over two registers, so a BAR of 4 GiB or more has a read-only-zero
//! low address field and sizes through its upper register.
//!
//! Move detection: the crate remembers, per BAR, the base last reported to (or set by) the VMM.
//! After a guest write it reports [`WriteEffect::BarReprogram`] when the programmed address
//! differs from it, and only if
//! * the BAR's decoding is enabled in the command register (memory space for memory BARs and
//!   the ROM, which also needs its own enable bit; I/O space for I/O BARs);
//! * the BAR is not being sized: a dword write whose address field is all ones is a sizing
//!   write, not a move, until the register is written again;
//! * for a 64-bit BAR, the address is complete: a write to one half waits for a write to the
//!   other half (guests write low then high, or the reverse). A guest that rewrites only one
//!   half has the move reported at its next command register write.
//!
//! Moves made while decoding is disabled are reported when the guest writes the command
//! register with decoding enabled (so "disable decode, program BARs, enable decode" works).

use crate::bar::{
    validate_rom_size, BarDef, BarHalf, BarInfo, BarKind, RomInfo, NUM_BARS, ROM_BAR,
};
use crate::effects::{WriteEffect, WriteEffects};
use crate::error::{Error, Result};
use crate::regs::*;
use crate::space::{overlaps, ConfigSpace};

/// Whether the whole-register fast path of `after_bar_write` is turned off (tests only).
#[cfg(not(test))]
fn general_only() -> bool {
    false
}

#[cfg(test)]
fn general_only() -> bool {
    tests::GENERAL_ONLY.with(std::cell::Cell::get)
}

/// A sizing write: the whole address field of the register written as ones.
fn is_sizing(value: u32, field: u32) -> bool {
    value & field == field
}

fn bar_reg(index: usize) -> usize {
    BAR0 + 4 * index
}

impl ConfigSpace {
    /// Declares BAR `index` (0..=5) with its kind and size, replacing any BAR declared at the
    /// same index. The register(s) are set to the flag bits with address 0 and the address
    /// bits at or above `size` become writable. A 64-bit BAR also takes register `index + 1`,
    /// so it cannot be declared in BAR5 and its upper register must be free.
    pub fn declare_bar(&mut self, index: usize, kind: BarKind, size: u64) -> Result<()> {
        if index >= NUM_BARS {
            return Err(Error::InvalidBarIndex(index));
        }
        let def = BarDef::new(kind, size)?;
        if index > 0 && self.bar_def(index - 1).is_some_and(|d| d.kind.is_64bit()) {
            return Err(Error::BarSlotInUse(index));
        }
        if kind.is_64bit() {
            if index + 1 >= NUM_BARS {
                return Err(Error::Bar64InLastSlot);
            }
            if self.bar_def(index + 1).is_some() {
                return Err(Error::BarSlotInUse(index + 1));
            }
        }
        self.clear_bar(index);
        if let Some(slot) = self.bars.defs.get_mut(index) {
            *slot = Some(def);
        }
        let mask = def.writable_mask();
        self.set_u32(bar_reg(index), kind.flags())?;
        self.set_writable(bar_reg(index), &(mask as u32).to_le_bytes())?;
        if kind.is_64bit() {
            self.set_writable(bar_reg(index + 1), &((mask >> 32) as u32).to_le_bytes())?;
        }
        Ok(())
    }

    /// Removes the BAR declared at `index`: its register(s) read as zero and are read-only.
    pub fn remove_bar(&mut self, index: usize) -> Result<()> {
        if self.bar_def(index).is_none() {
            return Err(Error::NoSuchBar(index));
        }
        self.clear_bar(index);
        Ok(())
    }

    fn clear_bar(&mut self, index: usize) {
        let regs = match self.bar_def(index) {
            Some(d) if d.kind.is_64bit() => 2,
            _ => 1,
        };
        for reg in index..index + regs {
            let _ = self.set_u32(bar_reg(reg), 0);
            let _ = self.set_read_only(bar_reg(reg), 4);
            if let Some(s) = self.bars.sizing.get_mut(reg) {
                *s = false;
            }
        }
        if let Some(d) = self.bars.defs.get_mut(index) {
            *d = None;
        }
        if let Some(a) = self.bars.active.get_mut(index) {
            *a = 0;
        }
        if let Some(p) = self.bars.pending.get_mut(index) {
            *p = None;
        }
    }

    fn bar_def(&self, index: usize) -> Option<BarDef> {
        self.bars.defs.get(index).copied().flatten()
    }

    /// The BAR declared at `index` (the index of its low register), if any.
    pub fn bar(&self, index: usize) -> Option<BarInfo> {
        let def = self.bar_def(index)?;
        Some(BarInfo {
            index,
            kind: def.kind,
            size: def.size,
            address: self.bar_address(index)?,
        })
    }

    /// All declared BARs, by index.
    pub fn bars(&self) -> impl Iterator<Item = BarInfo> + '_ {
        (0..NUM_BARS).filter_map(|i| self.bar(i))
    }

    /// The address programmed in BAR `index`, if it is declared.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let def = self.bar_def(index)?;
        let low = u64::from(self.raw_u32(bar_reg(index)) & def.kind.low_address_field());
        Some(if def.kind.is_64bit() {
            (u64::from(self.raw_u32(bar_reg(index + 1))) << 32) | low
        } else {
            low
        })
    }

    /// Device-side placement of BAR `index` at `address` (aligned to its size; below 4 GiB for
    /// 32-bit and I/O BARs). This is also the base that later moves are reported from.
    pub fn set_bar_address(&mut self, index: usize, address: u64) -> Result<()> {
        let def = self.bar_def(index).ok_or(Error::NoSuchBar(index))?;
        let aligned = address & def.size.wrapping_sub(1) == 0;
        let fits = def.kind.is_64bit() || address <= u64::from(u32::MAX);
        if !aligned || !fits {
            return Err(Error::InvalidBarAddress {
                bar: index,
                address,
                size: def.size,
            });
        }
        let low = (address as u32 & def.kind.low_address_field()) | def.kind.flags();
        self.set_u32(bar_reg(index), low)?;
        if def.kind.is_64bit() {
            self.set_u32(bar_reg(index + 1), (address >> 32) as u32)?;
            if let Some(s) = self.bars.sizing.get_mut(index + 1) {
                *s = false;
            }
        }
        if let Some(s) = self.bars.sizing.get_mut(index) {
            *s = false;
        }
        if let Some(a) = self.bars.active.get_mut(index) {
            *a = address;
        }
        if let Some(p) = self.bars.pending.get_mut(index) {
            *p = None;
        }
        Ok(())
    }

    /// Declares the expansion ROM BAR (offset 0x30) with `size` bytes (a power of two, 2 KiB to
    /// 2 GiB): the address bits at or above `size` and the enable bit (bit 0) become writable,
    /// bits 1..=10 are reserved and read as zero.
    pub fn declare_rom(&mut self, size: u64) -> Result<()> {
        validate_rom_size(size)?;
        self.bars.rom_size = Some(size);
        let mask = (!(size.wrapping_sub(1)) as u32 & ROM_ADDRESS_MASK) | ROM_ENABLE;
        self.set_u32(ROM_ADDRESS, 0)?;
        self.set_read_only(ROM_ADDRESS, 4)?;
        self.set_writable(ROM_ADDRESS, &mask.to_le_bytes())?;
        self.reset_rom_tracking(0);
        Ok(())
    }

    /// Removes the expansion ROM: the register reads as zero and is read-only.
    pub fn remove_rom(&mut self) -> Result<()> {
        if self.bars.rom_size.take().is_none() {
            return Err(Error::NoRom);
        }
        self.set_u32(ROM_ADDRESS, 0)?;
        self.set_read_only(ROM_ADDRESS, 4)?;
        self.reset_rom_tracking(0);
        Ok(())
    }

    fn reset_rom_tracking(&mut self, base: u64) {
        if let Some(a) = self.bars.active.get_mut(ROM_BAR) {
            *a = base;
        }
        if let Some(s) = self.bars.sizing.get_mut(ROM_BAR) {
            *s = false;
        }
    }

    /// The expansion ROM, if declared.
    pub fn rom(&self) -> Option<RomInfo> {
        let size = self.bars.rom_size?;
        let reg = self.raw_u32(ROM_ADDRESS);
        Some(RomInfo {
            size,
            address: u64::from(reg & ROM_ADDRESS_MASK),
            enabled: reg & ROM_ENABLE != 0,
        })
    }

    /// Device-side placement of the expansion ROM at `address` (aligned to its size, below
    /// 4 GiB); the enable bit is kept.
    pub fn set_rom_address(&mut self, address: u64) -> Result<()> {
        let size = self.bars.rom_size.ok_or(Error::NoRom)?;
        if address & size.wrapping_sub(1) != 0 || address > u64::from(u32::MAX) {
            return Err(Error::InvalidBarAddress {
                bar: ROM_BAR,
                address,
                size,
            });
        }
        let enable = self.raw_u32(ROM_ADDRESS) & ROM_ENABLE;
        self.set_u32(ROM_ADDRESS, address as u32 | enable)?;
        self.reset_rom_tracking(address);
        Ok(())
    }

    /// Address field of register `reg` (0..=5 BARs, 6 ROM), or `None` if it is unused.
    fn address_field(&self, reg: usize) -> Option<u32> {
        if reg == ROM_BAR {
            return self.bars.rom_size.map(|_| ROM_ADDRESS_MASK);
        }
        if let Some(def) = self.bar_def(reg) {
            return Some(def.kind.low_address_field());
        }
        let upper_of_64 = reg
            .checked_sub(1)
            .and_then(|low| self.bar_def(low))
            .is_some_and(|d| d.kind.is_64bit());
        upper_of_64.then_some(u32::MAX)
    }

    /// The BAR that owns register `reg` (0..=5) and which of its registers `reg` is: its low
    /// register, or the upper register of the 64-bit BAR below it.
    fn register_owner(&self, reg: usize) -> Option<(usize, BarDef, BarHalf)> {
        if let Some(def) = self.bar_def(reg) {
            return Some((reg, def, BarHalf::Low));
        }
        let low = reg.checked_sub(1)?;
        self.bar_def(low)
            .filter(|d| d.kind.is_64bit())
            .map(|def| (low, def, BarHalf::High))
    }

    /// Called after a guest write that touched BAR or ROM registers. Only the (at most two)
    /// registers the write covers are examined.
    pub(crate) fn after_bar_write(&mut self, offset: usize, data: &[u8], fx: &mut WriteEffects) {
        // The common case, one whole register (sizing, placing a BAR): one register, one BAR.
        // The general path below gives the same result (see the tests).
        if let (Ok(bytes), 0, false) = (<[u8; 4]>::try_from(data), offset % 4, general_only()) {
            let value = u32::from_le_bytes(bytes);
            if offset == ROM_ADDRESS {
                if let Some(field) = self.address_field(ROM_BAR) {
                    if let Some(s) = self.bars.sizing.get_mut(ROM_BAR) {
                        *s = is_sizing(value, field);
                    }
                }
                self.evaluate_rom(fx);
                return;
            }
            let Some((bar, def, half)) = offset
                .checked_sub(BAR0)
                .and_then(|o| self.register_owner(o / 4))
            else {
                return;
            };
            let field = match half {
                BarHalf::Low => def.kind.low_address_field(),
                BarHalf::High => u32::MAX,
            };
            if let Some(s) = self.bars.sizing.get_mut((offset - BAR0) / 4) {
                *s = is_sizing(value, field);
            }
            self.evaluate_bar(bar, def, Some(half), fx);
            return;
        }
        let end = offset + data.len();
        // Register numbers 0..=5 (BARs) and ROM_BAR of the first and last byte written.
        let reg_of = |byte: usize| match byte {
            b if (BAR0..BAR0 + 4 * NUM_BARS).contains(&b) => Some((b - BAR0) / 4),
            b if (ROM_ADDRESS..ROM_ADDRESS + 4).contains(&b) => Some(ROM_BAR),
            _ => None,
        };
        let (first, last) = (reg_of(offset), reg_of(end.saturating_sub(1)));
        let touched = [first, last.filter(|&l| Some(l) != first)];
        for reg in touched.into_iter().flatten() {
            let reg_off = if reg == ROM_BAR {
                ROM_ADDRESS
            } else {
                bar_reg(reg)
            };
            let Some(field) = self.address_field(reg) else {
                continue;
            };
            // A sizing write is a full-dword write whose address field is all ones.
            let sizing = reg_off
                .checked_sub(offset)
                .and_then(|start| data.get(start..start + 4))
                .and_then(|s| <[u8; 4]>::try_from(s).ok())
                .is_some_and(|b| is_sizing(u32::from_le_bytes(b), field));
            if let Some(s) = self.bars.sizing.get_mut(reg) {
                *s = sizing;
            }
        }
        // The BARs owning the touched registers, in index order.
        let owner = |reg: Option<usize>| {
            reg.filter(|&r| r < NUM_BARS)
                .and_then(|r| self.register_owner(r))
                .map(|(bar, _, _)| bar)
        };
        let (a, b) = (owner(first), owner(last));
        for bar in [a, b.filter(|&b| Some(b) != a)].into_iter().flatten() {
            let Some(def) = self.bar_def(bar) else {
                continue;
            };
            let low = overlaps(offset, end, bar_reg(bar), 4);
            let high = def.kind.is_64bit() && overlaps(offset, end, bar_reg(bar + 1), 4);
            let touched = match (low, high) {
                (true, true) => None,
                (true, false) => Some(BarHalf::Low),
                (false, true) => Some(BarHalf::High),
                (false, false) => continue,
            };
            self.evaluate_bar(bar, def, touched, fx);
        }
        if overlaps(offset, end, ROM_ADDRESS, 4) {
            self.evaluate_rom(fx);
        }
    }

    /// Called after a guest write that touched the command register: reports every BAR whose
    /// programmed address differs from its last reported base, if its decoding is enabled.
    pub(crate) fn after_command_write(&mut self, fx: &mut WriteEffects) {
        for bar in 0..NUM_BARS {
            if let Some(def) = self.bar_def(bar) {
                self.evaluate_bar(bar, def, None, fx);
            }
        }
        self.evaluate_rom(fx);
    }

    /// `touched`: the half of a 64-bit BAR written alone, `None` for a complete write.
    fn evaluate_bar(
        &mut self,
        bar: usize,
        def: BarDef,
        touched: Option<BarHalf>,
        fx: &mut WriteEffects,
    ) {
        let command = self.command();
        let decode_bit = if def.kind.is_memory() {
            COMMAND_MEMORY_SPACE
        } else {
            COMMAND_IO_SPACE
        };
        let is_64 = def.kind.is_64bit();
        let sizing = |reg: usize| self.bars.sizing.get(reg).copied().unwrap_or(false);
        let being_sized = sizing(bar) || (is_64 && sizing(bar + 1));
        let current = self.bar_address(bar).unwrap_or(0);
        let old = self.bars.active.get(bar).copied().unwrap_or(0);
        let Some(pending) = self.bars.pending.get_mut(bar) else {
            return;
        };
        if command & decode_bit == 0 {
            *pending = None;
            return;
        }
        if being_sized {
            // Sizing moves nothing, but a half written now still pairs with the next write
            // of the other half (sizing, then both halves of a new address).
            if let (true, Some(half)) = (is_64, touched) {
                *pending = if *pending == Some(half.other()) {
                    None
                } else {
                    Some(half)
                };
            }
            return;
        }
        if current == old {
            *pending = None;
            return;
        }
        if let (true, Some(half)) = (is_64, touched) {
            if *pending != Some(half.other()) {
                *pending = Some(half);
                return;
            }
        }
        *pending = None;
        if let Some(a) = self.bars.active.get_mut(bar) {
            *a = current;
        }
        fx.push(WriteEffect::BarReprogram {
            bar,
            old_base: old,
            new_base: current,
            size: def.size,
        });
    }

    fn evaluate_rom(&mut self, fx: &mut WriteEffects) {
        let Some(size) = self.bars.rom_size else {
            return;
        };
        let reg = self.raw_u32(ROM_ADDRESS);
        let decoding = self.command() & COMMAND_MEMORY_SPACE != 0 && reg & ROM_ENABLE != 0;
        let being_sized = self.bars.sizing.get(ROM_BAR).copied().unwrap_or(false);
        if !decoding || being_sized {
            return;
        }
        let current = u64::from(reg & ROM_ADDRESS_MASK);
        let Some(active) = self.bars.active.get_mut(ROM_BAR) else {
            return;
        };
        if current != *active {
            let old = *active;
            *active = current;
            fx.push(WriteEffect::BarReprogram {
                bar: ROM_BAR,
                old_base: old,
                new_base: current,
                size,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use proptest::prelude::*;

    use super::*;

    thread_local! {
        /// Turns the whole-register fast path off on this thread.
        pub(super) static GENERAL_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Every kind of BAR, a hole, the upper half of 64-bit BARs, and a ROM.
    fn space() -> ConfigSpace {
        let mut cfg = ConfigSpace::new();
        let mem32 = BarKind::Memory32 {
            prefetchable: false,
        };
        cfg.declare_bar(0, BarKind::Memory64 { prefetchable: true }, 1 << 20)
            .unwrap();
        cfg.declare_bar(2, mem32, 0x1000).unwrap();
        cfg.declare_bar(3, BarKind::Io, 0x20).unwrap();
        cfg.declare_bar(
            4,
            BarKind::Memory64 {
                prefetchable: false,
            },
            8 << 30,
        )
        .unwrap();
        cfg.declare_rom(0x8000).unwrap();
        cfg.set_bar_address(0, 0x1_0000_0000).unwrap();
        cfg.set_bar_address(2, 0xe000_0000).unwrap();
        cfg
    }

    fn write(cfg: &mut ConfigSpace, general: bool, offset: usize, value: u32) -> Vec<WriteEffect> {
        GENERAL_ONLY.with(|g| g.set(general));
        let fx = cfg.write_u32(offset, value);
        GENERAL_ONLY.with(|g| g.set(false));
        fx.unwrap().iter().copied().collect()
    }

    fn value() -> impl Strategy<Value = u32> {
        prop_oneof![
            Just(u32::MAX),
            Just(0),
            Just(0x2),
            Just(0x3),
            Just(0x0020_0000),
            Just(0xe010_0000),
            Just(0xfd00_0001),
            any::<u32>(),
        ]
    }

    fn offset() -> impl Strategy<Value = usize> {
        prop_oneof![
            Just(COMMAND),
            (0..NUM_BARS).prop_map(bar_reg),
            Just(ROM_ADDRESS),
        ]
    }

    proptest! {
        /// The whole-register fast path of a BAR write reports the same effects and leaves the
        /// same registers and move tracking as the general path (which examines every
        /// register the write touches), over any sequence of dword writes to the command
        /// register, the BARs and the ROM.
        #[test]
        fn whole_register_bar_writes_match_the_general_path(
            writes in proptest::collection::vec((offset(), value()), 1..40)
        ) {
            let (mut fast, mut general) = (space(), space());
            for (offset, value) in writes {
                let a = write(&mut fast, false, offset, value);
                let b = write(&mut general, true, offset, value);
                prop_assert_eq!(a, b, "effects of {:#x} at {:#x}", value, offset);
                prop_assert_eq!(&fast, &general, "state after {:#x} at {:#x}", value, offset);
            }
        }
    }
}
