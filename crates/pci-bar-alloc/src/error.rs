//! The crate's single error type.

use crate::{BarKind, Window};

/// Everything that can go wrong while configuring windows or placing BARs.
///
/// Every refusal leaves the allocator unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A window was given with size zero.
    #[error("the {window} window is empty (size 0)")]
    EmptyWindow {
        /// The offending window.
        window: Window,
    },
    /// A window's `base + size` wraps past the end of the 64-bit address space.
    #[error("the {window} window {base:#x}+{size:#x} wraps past the end of the address space")]
    WindowOverflow {
        /// The offending window.
        window: Window,
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// The mmio32 window does not end below 4 GiB.
    #[error("the mmio32 window {base:#x}..={last:#x} must end below 4 GiB")]
    Mmio32Above4G {
        /// Window base.
        base: u64,
        /// Last address of the window (inclusive).
        last: u64,
    },
    /// The io window does not fit in the 64 KiB x86 I/O space.
    #[error("the io window {base:#x}..={last:#x} must lie within the 64 KiB I/O space")]
    IoWindowOutOfRange {
        /// Window base.
        base: u64,
        /// Last port of the window (inclusive).
        last: u64,
    },
    /// Two memory windows share addresses.
    #[error("the {a} and {b} windows overlap")]
    WindowsOverlap {
        /// First window.
        a: Window,
        /// Second window.
        b: Window,
    },
    /// The host page size is not a power of two.
    #[error("host page size {0:#x} is not a power of two")]
    InvalidPageSize(u64),
    /// A BAR size breaks the PCI rules for its kind.
    #[error("invalid {kind} BAR size {size:#x}: {reason}")]
    InvalidBarSize {
        /// Kind of BAR requested.
        kind: BarKind,
        /// Size requested.
        size: u64,
        /// Which rule was broken.
        reason: &'static str,
    },
    /// No window that may hold this kind of BAR was configured.
    #[error("no window that can hold a {kind} BAR is configured")]
    NoWindow {
        /// Kind of BAR requested.
        kind: BarKind,
    },
    /// Every window that may hold the BAR lacks a free, naturally aligned range.
    #[error(
        "{window} window full: no free naturally aligned range of {size:#x} bytes{}",
        fmt_also_tried(.also_tried)
    )]
    WindowFull {
        /// The preferred window for the BAR.
        window: Window,
        /// The (page-rounded) size that did not fit.
        size: u64,
        /// The fallback window that was also full, if one was tried.
        also_tried: Option<Window>,
    },
    /// The placement given is not a live allocation of this allocator.
    #[error("no BAR of {size:#x} bytes is allocated at {base:#x} in the {window} window")]
    NotAllocated {
        /// Window named by the placement.
        window: Window,
        /// Base named by the placement.
        base: u64,
        /// Size named by the placement.
        size: u64,
    },
    /// The base is not a multiple of the BAR size (PCI BARs decode naturally aligned ranges).
    #[error("BAR base {base:#x} is not naturally aligned to its size {size:#x}")]
    Misaligned {
        /// Requested base.
        base: u64,
        /// BAR size.
        size: u64,
    },
    /// The range is not inside any window that may hold this kind of BAR.
    #[error("range {base:#x}+{size:#x} is not inside a window that can hold a {kind} BAR")]
    OutsideWindow {
        /// Requested base.
        base: u64,
        /// BAR size.
        size: u64,
        /// Kind of the BAR.
        kind: BarKind,
    },
    /// The range overlaps a BAR that is already placed.
    #[error(
        "range {base:#x}+{size:#x} in the {window} window overlaps the BAR at \
         {other_base:#x}+{other_size:#x}"
    )]
    Overlap {
        /// Window of the requested range.
        window: Window,
        /// Requested base.
        base: u64,
        /// Requested size.
        size: u64,
        /// Base of the BAR already there.
        other_base: u64,
        /// Size of the BAR already there.
        other_size: u64,
    },
    /// The underlying `vm-allocator` refused an operation our own bookkeeping allowed.
    #[error("vm-allocator refused {base:#x}+{size:#x} in the {window} window: {source}")]
    Allocator {
        /// Window concerned.
        window: Window,
        /// Base of the range concerned.
        base: u64,
        /// Size of the range concerned.
        size: u64,
        /// The allocator's error.
        source: vm_allocator::Error,
    },
    /// A snapshot carries a format version this crate does not understand.
    #[error("unsupported pci-bar-alloc snapshot version {found} (expected {expected})")]
    UnsupportedSnapshotVersion {
        /// Version found in the envelope.
        found: u32,
        /// Version this crate writes and reads.
        expected: u32,
    },
}

fn fmt_also_tried(also: &Option<Window>) -> String {
    match also {
        Some(w) => format!(" (fallback {w} window full too)"),
        None => String::new(),
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
