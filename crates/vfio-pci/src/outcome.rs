//! What a guest config write changed, as a VMM's bus must learn it.
//!
//! Every real VMM routes guest accesses by address: a bus maps ranges to devices. When the
//! guest moves a BAR, sizes it (its register then holds a pattern the VMM refuses, so it
//! decodes nowhere) or puts it back, the bus must drop the old range and add the new one.
//! [`VfioPciDevice::write_config`](crate::VfioPciDevice::write_config) returns a
//! [`ConfigWriteOutcome`] that says so, without allocating: one fixed slot per BAR and one for
//! the expansion ROM.

use serde::{Deserialize, Serialize};

use pci_config::BarKind;

/// Which base address register: BAR 0 to 5 of a type-0 header, or the expansion ROM.
///
/// `Bar(n)` with `n > 5` names no BAR: accesses through it read all ones and writes are
/// ignored, as for an absent BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BarIndex {
    /// BAR `n` (0..=5), at config offset `0x10 + 4 * n`.
    Bar(u8),
    /// The expansion ROM BAR (config offset 0x30).
    Rom,
}

impl BarIndex {
    /// Every BAR of a type-0 header, then the ROM.
    pub const ALL: [BarIndex; SLOTS] = [
        BarIndex::Bar(0),
        BarIndex::Bar(1),
        BarIndex::Bar(2),
        BarIndex::Bar(3),
        BarIndex::Bar(4),
        BarIndex::Bar(5),
        BarIndex::Rom,
    ];

    /// BAR `n` (0..=5); `None` for any other number.
    pub fn bar(n: usize) -> Option<Self> {
        (n < pci_config::NUM_BARS).then_some(BarIndex::Bar(n as u8))
    }

    /// The slot of this BAR in a 7-entry table (BARs 0-5, then the ROM at 6); the VFIO
    /// region index is the same number (`VFIO_PCI_BAR0_REGION_INDEX` + n,
    /// `VFIO_PCI_ROM_REGION_INDEX` = 6). `Bar(n)` with `n > 5` gives `n + 1` or more, past
    /// every table.
    pub fn slot(self) -> usize {
        match self {
            BarIndex::Bar(n) if usize::from(n) < pci_config::NUM_BARS => usize::from(n),
            BarIndex::Bar(n) => usize::from(n).saturating_add(1),
            BarIndex::Rom => pci_config::ROM_BAR,
        }
    }

    /// The BAR at `slot` (see [`BarIndex::slot`]).
    pub fn from_slot(slot: usize) -> Option<Self> {
        Self::ALL.get(slot).copied()
    }

    /// True for the expansion ROM.
    pub fn is_rom(self) -> bool {
        self == BarIndex::Rom
    }
}

impl std::fmt::Display for BarIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BarIndex::Bar(n) => write!(f, "BAR{n}"),
            BarIndex::Rom => f.write_str("ROM"),
        }
    }
}

/// Number of BAR slots: six BARs and the ROM.
pub const SLOTS: usize = 7;

/// The address space a BAR decodes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AddressSpace {
    /// Memory space (memory BARs and the expansion ROM).
    Memory,
    /// I/O port space (I/O BARs).
    Io,
}

impl AddressSpace {
    /// The space a BAR of this kind decodes in.
    pub fn of(kind: BarKind) -> Self {
        if kind.is_memory() {
            AddressSpace::Memory
        } else {
            AddressSpace::Io
        }
    }
}

/// A guest-physical (or port) range a BAR decodes at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BarRange {
    /// First address (or port).
    pub base: u64,
    /// Length in bytes: the BAR's guest size.
    pub size: u64,
}

/// How one BAR's decoding changed: where it decoded before the write and where it decodes
/// after (`None`: nowhere). The range is the whole BAR as the guest sees it: the part that
/// traps to [`read_bar`](crate::VfioPciDevice::read_bar) /
/// [`write_bar`](crate::VfioPciDevice::write_bar) and the parts mapped into the guest
/// (which the device's [`GuestMapper`](crate::GuestMapper) already moved).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct BarChange {
    /// Which BAR.
    pub bar: BarIndex,
    /// Its address space.
    pub space: AddressSpace,
    /// Where it decoded before the write; `None`: nowhere.
    pub old: Option<BarRange>,
    /// Where it decodes now; `None`: nowhere.
    pub new: Option<BarRange>,
}

impl BarChange {
    /// The range the bus must stop routing to this device, if any.
    pub fn removed(&self) -> Option<BarRange> {
        self.old
    }

    /// The range the bus must start routing to this device, if any.
    pub fn added(&self) -> Option<BarRange> {
        self.new
    }

    /// The BAR decoded before and decodes now, somewhere else.
    pub fn moved(&self) -> bool {
        matches!((self.old, self.new), (Some(a), Some(b)) if a != b)
    }

    /// The BAR decoded nowhere and decodes now.
    pub fn decode_on(&self) -> bool {
        self.old.is_none() && self.new.is_some()
    }

    /// The BAR decoded and decodes nowhere now.
    pub fn decode_off(&self) -> bool {
        self.old.is_some() && self.new.is_none()
    }
}

/// What one guest config write changed, for the VMM's bus: fixed size, no allocation.
///
/// * [`bar_changes`](Self::bar_changes): every BAR (and the ROM) whose decoded range changed:
///   moved, decoding again (its register holds an address the VMM accepts again, after a
///   sizing pattern or a refused address), or decoding nowhere now. At most one entry per BAR.
/// * [`memory_decode`](Self::memory_decode) / [`io_decode`](Self::io_decode): the command
///   register's Memory Space / I/O Space enable flipped (`Some(new state)`). The ranges above
///   do not depend on them (the device forwards them to the function, which stops answering);
///   a VMM whose bus honours them removes or adds every range of that space itself.
/// * [`rom_enable`](Self::rom_enable): the ROM BAR's enable bit flipped.
///
/// An empty outcome (the common case: an MSI, capability or command write that moves nothing)
/// is [`ConfigWriteOutcome::default`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ConfigWriteOutcome {
    bars: [Option<BarChange>; SLOTS],
    /// Memory Space enable of the command register flipped to this state.
    pub memory_decode: Option<bool>,
    /// I/O Space enable of the command register flipped to this state.
    pub io_decode: Option<bool>,
    /// The expansion ROM's enable bit flipped to this state.
    pub rom_enable: Option<bool>,
}

impl ConfigWriteOutcome {
    /// True when the write changed nothing the bus must learn.
    pub fn is_empty(&self) -> bool {
        self.bars.iter().all(Option::is_none)
            && self.memory_decode.is_none()
            && self.io_decode.is_none()
            && self.rom_enable.is_none()
    }

    /// Every BAR whose decoded range changed, BARs in order then the ROM.
    pub fn bar_changes(&self) -> impl Iterator<Item = &BarChange> + '_ {
        self.bars.iter().flatten()
    }

    /// How BAR `bar` changed, if it did.
    pub fn bar(&self, bar: BarIndex) -> Option<&BarChange> {
        self.bars.get(bar.slot()).and_then(Option::as_ref)
    }

    /// Records that `bar` went from `old` to `new` (nothing if they are equal). Folds into an
    /// earlier change of the same BAR (a write split into several registers): the oldest
    /// `old` and the newest `new` stay, and a round trip cancels out.
    pub(crate) fn record(
        &mut self,
        bar: BarIndex,
        space: AddressSpace,
        old: Option<BarRange>,
        new: Option<BarRange>,
    ) {
        let Some(slot) = self.bars.get_mut(bar.slot()) else {
            return;
        };
        let old = slot.map_or(old, |c| c.old);
        *slot = (old != new).then_some(BarChange {
            bar,
            space,
            old,
            new,
        });
    }

    /// Folds a later outcome into this one (a write split at dword boundaries).
    pub(crate) fn merge(&mut self, later: &ConfigWriteOutcome) {
        for c in later.bar_changes() {
            self.record(c.bar, c.space, c.old, c.new);
        }
        // A flag flipped twice (on, then off) is back where it was.
        for (a, b) in [
            (&mut self.memory_decode, later.memory_decode),
            (&mut self.io_decode, later.io_decode),
            (&mut self.rom_enable, later.rom_enable),
        ] {
            if let Some(v) = b {
                *a = if a.is_some() { None } else { Some(v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(base: u64) -> Option<BarRange> {
        Some(BarRange { base, size: 0x1000 })
    }

    #[test]
    fn a_bar_index_names_its_slot_and_the_rom_is_slot_six() {
        assert_eq!(BarIndex::Bar(0).slot(), 0);
        assert_eq!(BarIndex::Bar(5).slot(), 5);
        assert_eq!(BarIndex::Rom.slot(), 6);
        assert_eq!(
            BarIndex::Bar(6).slot(),
            7,
            "BAR6 does not exist and is not the ROM"
        );
        assert_eq!(BarIndex::from_slot(6), Some(BarIndex::Rom));
        assert_eq!(BarIndex::bar(6), None);
        assert_eq!(BarIndex::Bar(3).to_string(), "BAR3");
        assert_eq!(BarIndex::Rom.to_string(), "ROM");
    }

    #[test]
    fn a_move_reports_the_old_and_new_range() {
        let mut o = ConfigWriteOutcome::default();
        o.record(BarIndex::Bar(2), AddressSpace::Memory, r(0x1000), r(0x2000));
        let c = o.bar(BarIndex::Bar(2)).copied();
        assert!(c.is_some_and(|c| c.moved() && c.removed() == r(0x1000) && c.added() == r(0x2000)));
        assert_eq!(o.bar_changes().count(), 1);
    }

    #[test]
    fn split_writes_fold_into_one_change_and_a_round_trip_cancels() {
        let mut o = ConfigWriteOutcome::default();
        o.record(BarIndex::Bar(0), AddressSpace::Memory, r(0x1000), None);
        o.record(BarIndex::Bar(0), AddressSpace::Memory, None, r(0x2000));
        assert_eq!(
            o.bar(BarIndex::Bar(0)).map(|c| (c.old, c.new)),
            Some((r(0x1000), r(0x2000)))
        );
        o.record(BarIndex::Bar(0), AddressSpace::Memory, r(0x2000), r(0x1000));
        assert!(o.is_empty());
    }
}
