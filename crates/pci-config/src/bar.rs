//! Base address registers as data: their kinds, definitions and layout rules. The BAR
//! behaviour of a configuration space (sizing, the ROM, move detection) is in `space_bars`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::regs::*;

/// Number of BAR registers in a type-0 header.
pub const NUM_BARS: usize = 6;
/// The index used for the expansion ROM in
/// [`WriteEffect::BarReprogram`](crate::WriteEffect::BarReprogram).
pub const ROM_BAR: usize = 6;

/// The kind of a base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BarKind {
    /// Memory BAR decoded anywhere in the 32-bit address space.
    Memory32 {
        /// Prefetchable (bit 3).
        prefetchable: bool,
    },
    /// Memory BAR decoded anywhere in the 64-bit address space; uses two BAR registers.
    Memory64 {
        /// Prefetchable (bit 3).
        prefetchable: bool,
    },
    /// I/O space BAR.
    Io,
}

impl BarKind {
    /// The kind a BAR register declares in its read-only low bits (PCI Local Bus 3.0
    /// §6.2.5.1): bit 0 set is I/O; else bits 2:1 = `10b` is 64-bit memory, anything else
    /// 32-bit memory (`01b`, below 1 MiB, is obsolete and treated as 32-bit); bit 3 is
    /// prefetchable.
    pub fn from_register(reg: u32) -> BarKind {
        if reg & BAR_IO_SPACE != 0 {
            return BarKind::Io;
        }
        let prefetchable = reg & BAR_MEM_PREFETCHABLE != 0;
        if reg & BAR_MEM_TYPE_MASK == BAR_MEM_TYPE_64 {
            BarKind::Memory64 { prefetchable }
        } else {
            BarKind::Memory32 { prefetchable }
        }
    }

    /// The smallest BAR of this kind (§6.2.5.1): 16 bytes of memory, 4 I/O ports.
    pub fn min_size(self) -> u64 {
        match self {
            BarKind::Io => 4,
            _ => 16,
        }
    }

    /// True for [`BarKind::Memory64`].
    pub fn is_64bit(self) -> bool {
        matches!(self, BarKind::Memory64 { .. })
    }

    /// True for memory BARs (32- or 64-bit).
    pub fn is_memory(self) -> bool {
        !matches!(self, BarKind::Io)
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            BarKind::Memory32 { .. } => "32-bit memory",
            BarKind::Memory64 { .. } => "64-bit memory",
            BarKind::Io => "I/O",
        }
    }

    /// The read-only flag bits of the (low) BAR register.
    pub(crate) fn flags(self) -> u32 {
        match self {
            BarKind::Io => BAR_IO_SPACE,
            BarKind::Memory32 { prefetchable } => {
                if prefetchable {
                    BAR_MEM_PREFETCHABLE
                } else {
                    0
                }
            }
            BarKind::Memory64 { prefetchable } => {
                BAR_MEM_TYPE_64
                    | if prefetchable {
                        BAR_MEM_PREFETCHABLE
                    } else {
                        0
                    }
            }
        }
    }

    /// Address bits of the (low) register.
    pub(crate) fn low_address_field(self) -> u32 {
        match self {
            BarKind::Io => BAR_IO_ADDRESS_MASK,
            _ => BAR_MEM_ADDRESS_MASK,
        }
    }
}

/// A declared BAR: its kind and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BarDef {
    /// Kind of BAR.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least 16 for memory and 4 for I/O, at most 2 GiB for
    /// 32-bit memory and I/O BARs and 2^63 for 64-bit ones.
    pub size: u64,
}

impl BarDef {
    /// Checks the size rules and returns the definition.
    pub fn new(kind: BarKind, size: u64) -> Result<Self> {
        let min = kind.min_size();
        let max = match kind {
            BarKind::Io | BarKind::Memory32 { .. } => 1 << 31,
            BarKind::Memory64 { .. } => 1 << 63,
        };
        if size.is_power_of_two() && size >= min && size <= max {
            Ok(Self { kind, size })
        } else {
            Err(Error::InvalidBarSize {
                kind: kind.name(),
                size,
            })
        }
    }

    /// Writable address bits of the whole (up to 64-bit) BAR value.
    pub(crate) fn writable_mask(&self) -> u64 {
        let addr = !(self.size.wrapping_sub(1));
        match self.kind {
            BarKind::Memory64 { .. } => addr & !0xf,
            kind => addr & u64::from(kind.low_address_field()),
        }
    }
}

/// What the VMM needs to know about one declared BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index (0..=5; for a 64-bit BAR, the index of its low register).
    pub index: usize,
    /// Kind of BAR.
    pub kind: BarKind,
    /// Size in bytes.
    pub size: u64,
    /// Address currently programmed in the register(s) (during sizing this holds the size
    /// mask, not a placement).
    pub address: u64,
}

/// What the VMM needs to know about the expansion ROM BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RomInfo {
    /// Size in bytes.
    pub size: u64,
    /// Address currently programmed.
    pub address: u64,
    /// ROM address decode enable bit (bit 0) as programmed by the guest.
    pub enabled: bool,
}

/// Which register of a 64-bit BAR a write touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BarHalf {
    /// The low dword (flags and address bits 31:4).
    Low,
    /// The high dword (address bits 63:32).
    High,
}

impl BarHalf {
    pub(crate) fn other(self) -> Self {
        match self {
            BarHalf::Low => BarHalf::High,
            BarHalf::High => BarHalf::Low,
        }
    }
}

/// BAR definitions and move-tracking state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct BarTracking {
    pub(crate) defs: [Option<BarDef>; NUM_BARS],
    pub(crate) rom_size: Option<u64>,
    /// Base last reported to or set by the VMM, per BAR and ROM.
    pub(crate) active: [u64; NUM_BARS + 1],
    /// Per register (6 BAR registers, then the ROM): last guest write was a sizing write.
    pub(crate) sizing: [bool; NUM_BARS + 1],
    /// Per 64-bit BAR: the half written while waiting for the other one.
    pub(crate) pending: [Option<BarHalf>; NUM_BARS],
}

/// Checks that a set of BAR definitions fits the six registers.
pub(crate) fn validate_layout(defs: &[Option<BarDef>; NUM_BARS]) -> Result<()> {
    for (index, def) in defs.iter().enumerate() {
        let Some(def) = def else { continue };
        BarDef::new(def.kind, def.size)?;
        if def.kind.is_64bit() {
            match defs.get(index + 1) {
                None => return Err(Error::Bar64InLastSlot),
                Some(Some(_)) => return Err(Error::BarSlotInUse(index + 1)),
                Some(None) => {}
            }
        }
    }
    Ok(())
}

pub(crate) fn validate_rom_size(size: u64) -> Result<()> {
    if size.is_power_of_two() && (0x800..=1 << 31).contains(&size) {
        Ok(())
    } else {
        Err(Error::InvalidRomSize(size))
    }
}
