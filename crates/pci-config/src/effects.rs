//! What a guest configuration write means for the VMM.

use crate::regs::{COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE};

/// Most effects a single guest write can produce: a command-register write that enables
/// decoding can report a move for each of the six BARs and the ROM, plus the command change.
pub const MAX_WRITE_EFFECTS: usize = 8;

/// One consequence of a guest configuration write that the VMM must act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteEffect {
    /// The guest placed a BAR (or the expansion ROM, `bar ==` [`crate::ROM_BAR`]) at a new
    /// address while its decoding is enabled. `old_base` is the placement previously reported
    /// (or set with [`crate::ConfigSpace::set_bar_address`]), `new_base` the one now programmed.
    BarReprogram {
        /// BAR index 0..=5, or [`crate::ROM_BAR`].
        bar: usize,
        /// Previous base address.
        old_base: u64,
        /// New base address.
        new_base: u64,
        /// Size of the BAR in bytes.
        size: u64,
    },
    /// The guest changed the command register (for example enabled memory decoding). Use
    /// [`WriteEffect::memory_decode_toggled`] / [`WriteEffect::io_decode_toggled`] to see
    /// whether mappings must be added or removed.
    CommandChange {
        /// Command register before the write.
        old: u16,
        /// Command register after the write.
        new: u16,
    },
}

impl WriteEffect {
    fn toggled(&self, bit: u16) -> Option<bool> {
        match *self {
            WriteEffect::CommandChange { old, new } if (old ^ new) & bit != 0 => {
                Some(new & bit != 0)
            }
            _ => None,
        }
    }

    /// For a [`WriteEffect::CommandChange`] that flips memory space decoding, the new state
    /// (`true` = enabled); `None` otherwise.
    pub fn memory_decode_toggled(&self) -> Option<bool> {
        self.toggled(COMMAND_MEMORY_SPACE)
    }

    /// For a [`WriteEffect::CommandChange`] that flips I/O space decoding, the new state
    /// (`true` = enabled); `None` otherwise.
    pub fn io_decode_toggled(&self) -> Option<bool> {
        self.toggled(COMMAND_IO_SPACE)
    }
}

/// The effects of one guest write, in the order the VMM should apply them (BAR moves first,
/// then the command change). A fixed-capacity list: building it never allocates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteEffects {
    items: [Option<WriteEffect>; MAX_WRITE_EFFECTS],
    len: usize,
}

impl WriteEffects {
    /// An empty list.
    pub const fn new() -> Self {
        Self {
            items: [None; MAX_WRITE_EFFECTS],
            len: 0,
        }
    }

    pub(crate) fn push(&mut self, effect: WriteEffect) {
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = Some(effect);
            self.len += 1;
        } else {
            log::warn!("pci-config: dropping write effect {effect:?}: list full");
        }
    }

    /// Number of effects.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the write needs no action from the VMM.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The effects, in order.
    pub fn iter(&self) -> impl Iterator<Item = &WriteEffect> + '_ {
        self.items.iter().flatten()
    }
}

impl<'a> IntoIterator for &'a WriteEffects {
    type Item = &'a WriteEffect;
    type IntoIter = core::iter::Flatten<core::slice::Iter<'a, Option<WriteEffect>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.iter().flatten()
    }
}

impl IntoIterator for WriteEffects {
    type Item = WriteEffect;
    type IntoIter =
        core::iter::Flatten<core::array::IntoIter<Option<WriteEffect>, MAX_WRITE_EFFECTS>>;

    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter().flatten()
    }
}
