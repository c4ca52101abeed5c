//! Placing BARs in the VMM's windows, mapping them into the guest, and
//! moving them when the guest reprograms a BAR.

use pci_bar_alloc::BarPlacement;
use pci_config::{BarKind, ROM_BAR};
use vfio_backend::SparseArea;

use super::{lock, request_for, Bar, HostMap, Inner, VfioPciDevice};
use crate::outcome::{AddressSpace, BarIndex, BarRange, ConfigWriteOutcome, SLOTS};
use crate::{Error, Result};

/// Records in `outcome` every BAR whose decoded range differs from `before` (by slot).
pub(super) fn record_decode_changes(
    inner: &Inner,
    before: &[Option<BarRange>; SLOTS],
    outcome: &mut ConfigWriteOutcome,
) {
    record_decode_changes_in(inner, before, DecodeScope::All, outcome);
}

/// Which BARs a config write can change the decode of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum DecodeScope {
    /// Every BAR and the ROM (a command register write, or one that spans registers).
    All,
    /// The BAR (or ROM, at [`ROM_BAR`]) with this slot only: the write stays inside its
    /// register(s).
    One(usize),
}

impl DecodeScope {
    /// The scope of a write to `off .. end` of config space, given which BAR slot owns
    /// each BAR register (`owner(register index)`, the lower slot for a 64-bit BAR's upper
    /// half). A write that touches the command register, or more than one BAR, is `All`.
    pub(super) fn of_write(
        off: usize,
        end: usize,
        owner: impl Fn(usize) -> Option<usize>,
    ) -> DecodeScope {
        use pci_config::regs::{BAR0, ROM_ADDRESS};
        const BAR_REGS_END: usize = BAR0 + 6 * 4;
        if off >= ROM_ADDRESS && end <= ROM_ADDRESS + 4 {
            return DecodeScope::One(ROM_BAR);
        }
        if off >= BAR0 && end <= BAR_REGS_END {
            let first = owner((off - BAR0) / 4);
            let last = owner((end - 1 - BAR0) / 4);
            if let (Some(a), Some(b)) = (first, last) {
                if a == b {
                    return DecodeScope::One(a);
                }
            }
        }
        DecodeScope::All
    }
}

/// As [`record_decode_changes`], for the BARs `scope` covers only.
pub(super) fn record_decode_changes_in(
    inner: &Inner,
    before: &[Option<BarRange>; SLOTS],
    scope: DecodeScope,
    outcome: &mut ConfigWriteOutcome,
) {
    let (first, last) = match scope {
        DecodeScope::All => (0, SLOTS - 1),
        DecodeScope::One(s) => (s, s),
    };
    for slot in first..=last {
        let (Some(bar), Some(old)) = (inner.bar(slot), before.get(slot)) else {
            continue;
        };
        let new = bar.decoded();
        if new != *old {
            outcome.record(bar.index, AddressSpace::of(bar.kind), *old, new);
        }
    }
}

impl VfioPciDevice {
    /// Places every BAR and the ROM, makes the host mappings and maps them
    /// into the guest. Called once at attach.
    pub(super) fn place_all(&self, inner: &mut Inner) -> Result<()> {
        for i in 0..inner.bars.len() {
            let Some(bar) = inner.bars.get_mut(i).and_then(|b| b.as_mut()) else {
                continue;
            };
            self.host_map(bar);
            let mmappable = !bar.maps.is_empty();
            let req = request_for(bar.kind, bar.layout.guest_size, mmappable);
            let placed = lock(&self.resources.allocator, "BAR allocator")?.allocate(req);
            match placed {
                Ok(p) => {
                    inner
                        .config
                        .set_bar_address(i, p.base)
                        .map_err(Error::config("declaring a BAR's address"))?;
                    if let Some(bar) = inner.bars.get_mut(i).and_then(|b| b.as_mut()) {
                        bar.placement = Some(p);
                        self.guest_map(bar)?;
                        bar.decoding = true;
                    }
                }
                Err(e) if bar.kind == BarKind::Io => {
                    log::warn!(
                        "BAR{i} (I/O, {:#x} ports) not placed: {e}; the guest may place it",
                        bar.layout.guest_size
                    );
                }
                Err(e) => {
                    return Err(Error::BarPlacement {
                        bar: bar.index,
                        source: e,
                    })
                }
            }
        }
        if let Some(rom) = inner.rom.as_mut() {
            let req = request_for(rom.kind, rom.layout.guest_size, false);
            let placed = lock(&self.resources.allocator, "BAR allocator")?.allocate(req);
            match placed {
                Ok(p) => {
                    inner
                        .config
                        .set_rom_address(p.base)
                        .map_err(Error::config("declaring the ROM's address"))?;
                    rom.placement = Some(p);
                    rom.decoding = true;
                }
                Err(e) => log::warn!("ROM not placed: {e}; the guest will not see it mapped"),
            }
        }
        Ok(())
    }

    /// Makes the host mappings of a BAR's mappable areas. An area the
    /// backend refuses to map is trapped instead.
    pub(super) fn host_map(&self, bar: &mut Bar) {
        let Ok(index) = u32::try_from(bar.index.slot()) else {
            return;
        };
        for area in &bar.layout.mapped {
            match self.vfio.mmap_region(
                index,
                SparseArea {
                    offset: area.offset,
                    size: area.len,
                },
            ) {
                Ok(mapping) => bar.maps.push(HostMap {
                    area: *area,
                    mapping,
                    guest: None,
                }),
                Err(e) => log::warn!(
                    "{}: mmap of {:#x}+{:#x} failed ({e}); that range traps",
                    bar.index,
                    area.offset,
                    area.len
                ),
            }
        }
    }

    /// Maps a placed BAR's host mappings into the guest. A mapper that
    /// answers `Unsupported` leaves the range trapped; any other error
    /// undoes this BAR's guest mappings and fails.
    pub(super) fn guest_map(&self, bar: &mut Bar) -> Result<()> {
        let Some(base) = bar.placement.as_ref().map(|p| p.base) else {
            return Ok(());
        };
        let read_only = !bar.region.writable();
        let mut failed = None;
        for m in bar.maps.iter_mut().filter(|m| m.guest.is_none()) {
            let gpa = base.wrapping_add(m.area.offset);
            // SAFETY: `m.mapping` is this device's mmap of the BAR area,
            // `m.area.len` bytes; every path that drops a host mapping
            // (release_all, the device's drop) first removes its guest
            // mapping with guest_unmap, and nothing here holds a reference
            // into it.
            let mapped = unsafe {
                self.resources
                    .mapper
                    .map(gpa, m.area.len, m.mapping.as_ptr(), read_only)
            };
            match mapped {
                Ok(id) => m.guest = Some(id),
                Err(e) if e.kind() == std::io::ErrorKind::Unsupported => m.guest = None,
                Err(e) => {
                    failed = Some(Error::GuestMapping {
                        bar: bar.index,
                        gpa,
                        len: m.area.len,
                        source: e,
                    });
                    break;
                }
            }
        }
        if let Some(e) = failed {
            self.guest_unmap(bar);
            return Err(e);
        }
        Ok(())
    }

    /// Removes a BAR's guest mappings (the host mappings stay).
    pub(super) fn guest_unmap(&self, bar: &mut Bar) {
        for m in bar.maps.iter_mut() {
            if let Some(id) = m.guest.take() {
                if let Err(e) = self.resources.mapper.unmap(id) {
                    log::warn!("{}: guest unmap failed: {e}", bar.index);
                }
            }
        }
    }

    /// Moves BAR `bar` to `new_base`, as the VMM asks: the BAR register is set to
    /// `new_base` and the BAR decodes there. Refused unless the new range lies inside the
    /// VMM's windows and overlaps nothing; on any failure the old placement, register and
    /// mappings stay. Returns what changed for the bus, as
    /// [`write_config`](Self::write_config) does.
    pub fn move_bar(&self, bar: BarIndex, new_base: u64) -> Result<ConfigWriteOutcome> {
        let index = bar.slot();
        let mut inner = lock(&self.inner, "device")?;
        let before = inner.decoded();
        let r = self.move_bar_locked(&mut inner, index, new_base);
        if r.is_ok() {
            let set = if index == ROM_BAR {
                inner.config.set_rom_address(new_base)
            } else {
                inner.config.set_bar_address(index, new_base)
            };
            if let Err(e) = set {
                log::error!("BAR{index}: could not set the register to {new_base:#x}: {e}");
            }
        }
        self.sync_decode(&mut inner);
        let mut outcome = ConfigWriteOutcome::default();
        record_decode_changes(&inner, &before, &mut outcome);
        r.map(|()| outcome)
    }

    /// Moves BAR `index`'s placement to `new_base` and maps it there. On refusal (outside
    /// the windows, on another BAR, a mapping the VMM refuses) the placement stays where it
    /// was; the caller's [`VfioPciDevice::sync_decode`] then makes the BAR decode nowhere
    /// while its register holds the refused address.
    pub(super) fn move_bar_locked(
        &self,
        inner: &mut Inner,
        index: usize,
        new_base: u64,
    ) -> Result<()> {
        let Some(bar) = inner.bar_mut(index) else {
            return Err(Error::NoSuchBar { slot: index });
        };
        let Some(old) = bar.placement else {
            // Never placed (an I/O BAR without an I/O window): nothing the
            // guest may move it onto is known to be free.
            return Err(Error::BarNotPlaced { bar: bar.index });
        };
        let which = bar.index;
        if old.base == new_base {
            return Ok(());
        }
        let moved: BarPlacement =
            match lock(&self.resources.allocator, "BAR allocator")?.relocate(&old, new_base) {
                Ok(p) => p,
                Err(e) => {
                    return Err(Error::BarPlacement {
                        bar: which,
                        source: e,
                    });
                }
            };
        let Some(bar) = inner.bar_mut(index) else {
            return Err(Error::NoSuchBar { slot: index });
        };
        self.guest_unmap(bar);
        bar.decoding = false;
        bar.placement = Some(moved);
        if let Err(e) = self.guest_map(bar) {
            // Back to the old placement; it decodes nowhere until the register agrees.
            bar.placement = Some(old);
            if let Ok(mut a) = self.resources.allocator.lock() {
                if let Err(r) = a.relocate(&moved, old.base) {
                    log::error!("BAR{index}: could not return to {:#x}: {r}", old.base);
                }
            }
            return Err(e);
        }
        bar.decoding = true;
        log::debug!("BAR{index} moved from {:#x} to {new_base:#x}", old.base);
        Ok(())
    }

    /// Makes every BAR's decoding agree with its register: a BAR decodes (is mapped into
    /// the guest, its trapped range served, found by `bar_at`) only while its register
    /// holds its placement's address. Whatever else the register holds - a sizing pattern,
    /// an address the VMM refused, half of a 64-bit address, an address written while
    /// decoding is disabled and not applied yet - the BAR decodes nowhere; it decodes again
    /// once the guest writes an address the VMM accepts (the same one, or one a move took
    /// it to). Call after every guest write that can change a BAR register or the command
    /// register, after a restore and after a reset.
    pub(super) fn sync_decode(&self, inner: &mut Inner) {
        self.sync_decode_in(inner, DecodeScope::All);
    }

    /// As [`sync_decode`](Self::sync_decode), for the BARs `scope` covers only.
    pub(super) fn sync_decode_in(&self, inner: &mut Inner, scope: DecodeScope) {
        let (first, last) = match scope {
            DecodeScope::All => (0, ROM_BAR),
            DecodeScope::One(s) => (s, s),
        };
        for index in first..=last {
            if index >= inner.bars.len() && index != ROM_BAR {
                continue;
            }
            let reg = if index == ROM_BAR {
                inner.config.rom().map(|r| r.address)
            } else {
                inner.config.bar_address(index)
            };
            let Some(bar) = inner.bar_mut(index) else {
                continue;
            };
            let Some(base) = bar.placement.map(|p| p.base) else {
                bar.decoding = false;
                continue;
            };
            let agree = reg == Some(base);
            if bar.decoding && !agree {
                self.guest_unmap(bar);
                bar.decoding = false;
                log::debug!(
                    "BAR{index}: the register holds {:#x}, not the accepted {base:#x}: it \
                     decodes nowhere until the guest writes an address the VMM accepts",
                    reg.unwrap_or(0)
                );
            } else if !bar.decoding && agree {
                match self.guest_map(bar) {
                    Ok(()) => bar.decoding = true,
                    Err(e) => log::warn!("BAR{index}: mapping it again at {base:#x}: {e}"),
                }
            }
        }
    }

    /// Writes every placement back into its BAR register (after a reset: the guest finds
    /// its BARs where the VMM placed them) and makes decoding agree.
    pub(super) fn restore_bar_registers(&self, inner: &mut Inner) {
        let placed: Vec<(usize, u64)> = inner
            .bars
            .iter()
            .flatten()
            .chain(inner.rom.iter())
            .filter_map(|b| b.placement.map(|p| (b.index.slot(), p.base)))
            .collect();
        for (index, base) in placed {
            let r = if index == ROM_BAR {
                inner.config.set_rom_address(base)
            } else {
                inner.config.set_bar_address(index, base)
            };
            if let Err(e) = r {
                log::error!("BAR{index}: could not restore the register to {base:#x}: {e}");
            }
        }
        self.sync_decode(inner);
    }

    /// Gives every placement back to the allocator and removes every guest
    /// mapping (detach).
    pub(super) fn release_all(&self, inner: &mut Inner) {
        let mut released = Vec::new();
        for bar in inner.bars.iter_mut().flatten().chain(inner.rom.iter_mut()) {
            self.guest_unmap(bar);
            bar.decoding = false;
            if let Some(p) = bar.placement.take() {
                released.push(p);
            }
        }
        if let Ok(mut a) = self.resources.allocator.lock() {
            for p in released {
                if let Err(e) = a.release(&p) {
                    log::warn!("releasing BAR at {:#x}: {e}", p.base);
                }
            }
        }
    }
}

#[cfg(test)]
mod scope_tests {
    use super::DecodeScope;
    use pci_config::regs::{BAR0, COMMAND, ROM_ADDRESS};
    use pci_config::ROM_BAR;

    /// BAR0 is 64-bit (registers 0 and 1), BAR2 32-bit, BAR3..5 unused.
    fn owner(reg: usize) -> Option<usize> {
        match reg {
            0 | 1 => Some(0),
            2 => Some(2),
            _ => None,
        }
    }

    #[test]
    fn a_write_inside_one_bars_registers_can_change_that_bar_only() {
        let one = |off: usize, len: usize| DecodeScope::of_write(off, off + len, owner);
        assert_eq!(one(BAR0, 4), DecodeScope::One(0));
        assert_eq!(one(BAR0 + 4, 4), DecodeScope::One(0), "upper half of BAR0");
        assert_eq!(one(BAR0, 8), DecodeScope::One(0), "both halves at once");
        assert_eq!(one(BAR0 + 8, 4), DecodeScope::One(2));
        assert_eq!(one(BAR0 + 9, 1), DecodeScope::One(2));
        assert_eq!(one(ROM_ADDRESS, 4), DecodeScope::One(ROM_BAR));
    }

    #[test]
    fn a_command_write_or_one_spanning_bars_looks_at_every_bar() {
        let all = |off: usize, len: usize| DecodeScope::of_write(off, off + len, owner);
        assert_eq!(all(COMMAND, 2), DecodeScope::All);
        assert_eq!(
            all(BAR0 + 4, 8),
            DecodeScope::All,
            "BAR0's upper half and BAR2"
        );
        assert_eq!(
            all(BAR0 + 12, 4),
            DecodeScope::All,
            "a register no BAR owns"
        );
    }
}
