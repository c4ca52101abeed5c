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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn moved(bar: usize) -> WriteEffect {
        WriteEffect::BarReprogram {
            bar,
            old_base: 0x1000 * bar as u64,
            new_base: 0x2000 * bar as u64,
            size: 0x1000,
        }
    }

    #[test]
    fn effects_keep_push_order_in_every_view() {
        let mut fx = WriteEffects::new();
        let all = [
            moved(0),
            moved(3),
            WriteEffect::CommandChange { old: 0, new: 2 },
        ];
        for e in all {
            fx.push(e);
        }
        assert_eq!(fx.len(), 3);
        assert_eq!(fx.as_slice(), &all);
        assert_eq!(fx.iter().copied().collect::<Vec<_>>(), all);
        assert_eq!((&fx).into_iter().count(), 3);
        let by_value = fx.into_iter();
        assert_eq!(by_value.len(), 3);
        assert_eq!(by_value.collect::<Vec<_>>(), all);
        assert_eq!(format!("{fx:?}"), format!("{:?}", all));
    }

    #[test]
    fn a_full_list_drops_the_ninth_effect_and_clear_empties_it() {
        let mut fx = WriteEffects::new();
        for bar in 0..=MAX_WRITE_EFFECTS {
            fx.push(moved(bar));
        }
        assert_eq!(fx.len(), MAX_WRITE_EFFECTS);
        assert_eq!(fx.iter().last(), Some(&moved(MAX_WRITE_EFFECTS - 1)));
        fx.clear();
        assert!(fx.is_empty());
        assert_eq!(fx.iter().next(), None);
    }

    #[test]
    fn equality_looks_only_at_the_effects_held() {
        // Two lists with the same effects are equal whatever their spare slots held before.
        let mut a = WriteEffects::new();
        a.push(moved(1));
        a.push(moved(2));
        a.clear();
        a.push(moved(5));
        let mut b = WriteEffects::default();
        b.push(moved(5));
        assert_eq!(a, b);
        b.push(moved(4));
        assert_ne!(a, b);
        assert_eq!(WriteEffects::new(), WriteEffects::default());
    }
}
