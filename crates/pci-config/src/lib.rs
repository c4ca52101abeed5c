//! PCI type-0 configuration space for a VMM: header registers with read-only, writable and
//! write-1-to-clear bits, BARs and their sizing protocol, the expansion ROM BAR, standard and
//! extended capability chains, and detection of the guest moving a BAR.
//!
//! A [`ConfigSpace`] holds the 4096 bytes the guest sees plus a mask per bit. The device model
//! builds it (from scratch with [`ConfigSpace::new`] or from a real device's bytes with
//! [`ConfigSpace::from_bytes`]), declares BARs with [`ConfigSpace::declare_bar`], hides or adds
//! capabilities, then forwards guest accesses to [`ConfigSpace::read`] and
//! [`ConfigSpace::write`]. A write returns [`WriteEffects`]: BAR moves and command register
//! changes the VMM must act on (map, unmap or move guest mappings).
//!
//! Guest input never panics: accesses of a size other than 1, 2 or 4 bytes or outside the
//! space are errors; capability walks stop on loops, bad pointers and capabilities that share
//! registers. Reads and writes do not allocate.
//!
//! ```
//! use pci_config::{regs, BarKind, ConfigSpace, WriteEffect};
//!
//! let mut cfg = ConfigSpace::new();
//! cfg.set_vendor_id(0x1af4);
//! cfg.declare_bar(0, BarKind::Memory64 { prefetchable: true }, 1 << 20)?;
//! cfg.set_bar_address(0, 0x1_0000_0000)?;
//!
//! // The guest sizes BAR0: writes all ones, reads back the size mask and the flag bits.
//! cfg.write_u32(regs::BAR0, 0xffff_ffff)?;
//! assert_eq!(cfg.read_u32(regs::BAR0)?, 0xfff0_000c);
//! cfg.write_u32(regs::BAR0, 0)?; // restore the low dword
//!
//! // The guest enables memory decoding, then moves the BAR (low dword, then high dword).
//! let fx = cfg.write_u16(regs::COMMAND, regs::COMMAND_MEMORY_SPACE)?;
//! assert_eq!(fx.iter().next().and_then(|e| e.memory_decode_toggled()), Some(true));
//! assert!(cfg.write_u32(regs::BAR0, 0x0020_0000)?.is_empty()); // half written: not yet
//! let fx = cfg.write_u32(regs::BAR0 + 4, 0x2)?;
//! assert_eq!(
//!     fx.iter().next(),
//!     Some(&WriteEffect::BarReprogram {
//!         bar: 0,
//!         old_base: 0x1_0000_0000,
//!         new_base: 0x2_0020_0000,
//!         size: 1 << 20,
//!     })
//! );
//! # Ok::<(), pci_config::Error>(())
//! ```

mod bar;
mod caps;
mod effects;
mod error;
pub mod regs;
mod snapshot;
mod space;
mod space_bars;

pub use bar::{BarDef, BarHalf, BarInfo, BarKind, RomInfo, NUM_BARS, ROM_BAR};
pub use caps::{
    cap_id, ext_cap_id, extended_capability_len, fixed_capability_len, parse_capabilities,
    parse_capabilities_lenient, parse_extended_capabilities, parse_extended_capabilities_lenient,
    standard_capability_len, Capability, CapabilityIter, ExtendedCapability,
    ExtendedCapabilityIter,
};
pub use effects::{WriteEffect, WriteEffects, MAX_WRITE_EFFECTS};
pub use error::{Error, Result};
pub use regs::{CONFIG_SPACE_SIZE, LEGACY_CONFIG_SPACE_SIZE};
pub use snapshot::{ConfigSpaceSnapshot, ConfigSpaceState, Versioned, SNAPSHOT_VERSION};
pub use space::{ClassCode, ConfigSpace};
