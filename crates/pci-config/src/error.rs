//! The error type of this crate.

/// Everything that can go wrong in this crate.
///
/// Guest-originated problems (a bad access size, an access past the end of the space) and
/// device-originated ones (a broken capability chain) are reported as values, never as panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration access whose size is not 1, 2 or 4 bytes, or which does not lie entirely
    /// inside the 4096-byte configuration space.
    #[error("invalid config access: {size} bytes at offset {offset:#x} (size must be 1, 2 or 4, within 4096 bytes)")]
    InvalidAccess {
        /// Byte offset of the access.
        offset: usize,
        /// Size of the access in bytes.
        size: usize,
    },
    /// A device-side (raw) update that does not fit inside the configuration space.
    #[error("range of {len} bytes at offset {offset:#x} is outside the 4096-byte config space")]
    OutOfRange {
        /// Byte offset of the range.
        offset: usize,
        /// Length of the range in bytes.
        len: usize,
    },
    /// A buffer handed in for parsing or building is too short or too long.
    #[error("config buffer of {len} bytes is invalid: expected between {min} and {max} bytes")]
    BadBufferLength {
        /// Length that was given.
        len: usize,
        /// Smallest accepted length.
        min: usize,
        /// Largest accepted length.
        max: usize,
    },
    /// The header type is not 0 (endpoint); only type-0 headers are modelled.
    #[error("header type {0:#x} is not a type-0 (endpoint) header")]
    UnsupportedHeaderType(u8),
    /// A BAR index outside 0..=5.
    #[error("BAR index {0} is out of range (0..=5)")]
    InvalidBarIndex(usize),
    /// A 64-bit memory BAR needs two registers; BAR5 has no register after it.
    #[error("a 64-bit BAR cannot be declared in BAR5")]
    Bar64InLastSlot,
    /// The BAR register is already used (for example as the upper half of a 64-bit BAR).
    #[error("BAR register {0} is already in use")]
    BarSlotInUse(usize),
    /// A BAR size that is not a power of two, is below the minimum for its kind (16 bytes for
    /// memory, 4 bytes for I/O) or does not fit its address width.
    #[error("invalid size {size:#x} for a {kind} BAR")]
    InvalidBarSize {
        /// Kind of BAR, as text.
        kind: &'static str,
        /// The rejected size.
        size: u64,
    },
    /// No BAR is declared at this index.
    #[error("BAR {0} is not declared")]
    NoSuchBar(usize),
    /// An address that is not aligned to the BAR size or does not fit the BAR's address width.
    #[error("address {address:#x} is invalid for BAR {bar} of size {size:#x}")]
    InvalidBarAddress {
        /// BAR index ([`crate::ROM_BAR`] for the expansion ROM).
        bar: usize,
        /// The rejected address.
        address: u64,
        /// Size of the BAR.
        size: u64,
    },
    /// An expansion ROM size that is not a power of two between 2 KiB and 2 GiB.
    #[error("invalid expansion ROM size {0:#x}")]
    InvalidRomSize(u64),
    /// No expansion ROM is declared.
    #[error("no expansion ROM is declared")]
    NoRom,
    /// A capability chain visits the same offset twice.
    #[error("capability chain loops back to offset {offset:#x}")]
    CapabilityLoop {
        /// The offset that was reached a second time.
        offset: u16,
    },
    /// Two standard capabilities share registers: one starts inside the fixed-length register
    /// block of another (Power Management, MSI or MSI-X, whose lengths the specification
    /// fixes), or such a block covers the header of a capability met earlier in the chain.
    #[error("capability at {offset:#x} overlaps the registers of the capability at {other:#x}")]
    CapabilityOverlap {
        /// Offset of the capability met second in the chain.
        offset: u16,
        /// Offset of the capability met first, whose registers it shares.
        other: u16,
    },
    /// A capability pointer that points into the header (below 0x40 for standard capabilities,
    /// below 0x100 for extended ones) or past the end of the buffer.
    #[error("capability pointer {pointer:#x} (found at {at:#x}) is outside the capability area")]
    BadCapabilityPointer {
        /// Offset of the register holding the pointer.
        at: u16,
        /// The pointer value (after masking the reserved low bits).
        pointer: u16,
    },
    /// No capability starts at the given offset in the (reachable part of the) chain.
    #[error("no capability at offset {0:#x}")]
    CapabilityNotFound(u16),
    /// The free space given for a new capability is unusable: too small, misplaced, or
    /// overlapping a capability that is already linked.
    #[error("cannot place a {needed}-byte capability in {start:#x}..{end:#x}")]
    NoCapabilitySpace {
        /// Bytes needed (header included).
        needed: usize,
        /// Start of the free range given.
        start: u16,
        /// End (exclusive) of the free range given.
        end: u16,
    },
    /// A snapshot written by an unknown format version.
    #[error("unsupported snapshot version {found} (this build reads version {supported})")]
    UnsupportedSnapshotVersion {
        /// Version found in the envelope.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
    /// A snapshot whose payload is inconsistent.
    #[error("invalid snapshot: {0}")]
    InvalidSnapshot(&'static str),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
