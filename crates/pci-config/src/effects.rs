//! What a guest configuration write means for the VMM.

use core::fmt;
use core::mem::MaybeUninit;

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
/// then the command change). A fixed-capacity list: building it never allocates, and an empty
/// one costs one length field (the slots past the length are never initialised, read or
/// compared, so a guest write that has no effect does not pay for the capacity).
#[derive(Clone, Copy)]
pub struct WriteEffects {
    len: usize,
    items: [MaybeUninit<WriteEffect>; MAX_WRITE_EFFECTS],
}

impl Default for WriteEffects {
    fn default() -> Self {
        Self::new()
    }
}

impl PartialEq for WriteEffects {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for WriteEffects {}

impl fmt::Debug for WriteEffects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

impl WriteEffects {
    /// An empty list.
    #[inline]
    pub const fn new() -> Self {
        Self {
            len: 0,
            items: [MaybeUninit::uninit(); MAX_WRITE_EFFECTS],
        }
    }

    /// Empties the list.
    #[inline]
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub(crate) fn push(&mut self, effect: WriteEffect) {
        if let Some(slot) = self.items.get_mut(self.len) {
            slot.write(effect);
            self.len += 1;
        } else {
            log::warn!("pci-config: dropping write effect {effect:?}: list full");
        }
    }

    /// The effects, as a slice.
    #[inline]
    pub fn as_slice(&self) -> &[WriteEffect] {
        let init = self.items.get(..self.len).unwrap_or(&[]);
        // SAFETY: `push` is the only writer of `items` and `len`: it initialises slot `len`
        // before incrementing `len`, so the first `len` slots hold initialised values; and
        // `MaybeUninit<WriteEffect>` has the size, alignment and layout of `WriteEffect`, so a
        // slice of initialised ones is a valid `[WriteEffect]` of the same length and lifetime.
        unsafe { &*(init as *const [MaybeUninit<WriteEffect>] as *const [WriteEffect]) }
    }

    /// Number of effects.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the write needs no action from the VMM.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The effects, in order.
    #[inline]
    pub fn iter(&self) -> core::slice::Iter<'_, WriteEffect> {
        self.as_slice().iter()
    }
}

impl<'a> IntoIterator for &'a WriteEffects {
    type Item = &'a WriteEffect;
    type IntoIter = core::slice::Iter<'a, WriteEffect>;

    #[inline]
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// The by-value iterator of [`WriteEffects`].
#[derive(Clone, Debug)]
pub struct IntoIter {
    effects: WriteEffects,
    next: usize,
}

impl Iterator for IntoIter {
    type Item = WriteEffect;

    fn next(&mut self) -> Option<WriteEffect> {
        let e = self.effects.as_slice().get(self.next).copied()?;
        self.next += 1;
        Some(e)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.effects.len().saturating_sub(self.next);
        (n, Some(n))
    }
}

impl ExactSizeIterator for IntoIter {}

impl IntoIterator for WriteEffects {
    type Item = WriteEffect;
    type IntoIter = IntoIter;

    fn into_iter(self) -> Self::IntoIter {
        IntoIter {
            effects: self,
            next: 0,
        }
    }
}
