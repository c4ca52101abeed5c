//! The crate's one error type.
//!
//! Every variant names what failed with typed fields; where another layer failed (the
//! VFIO backend, the config space model, the interrupt model, the BAR allocator, the
//! VMM's guest mapper) its error is kept as the [`source`](std::error::Error::source),
//! and [`Error::errno`] returns the errno behind it, if there is one.

use crate::outcome::BarIndex;

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// What can go wrong presenting a VFIO device to a guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The VFIO backend failed; the source keeps the errno and the request.
    #[error("{context}: {source}")]
    Backend {
        /// What this crate was doing.
        context: String,
        /// The backend's error.
        #[source]
        source: vfio_backend::Error,
    },
    /// The backend's device is not a PCI device.
    #[error("not a PCI device (device flags {flags:#x})")]
    NotPci {
        /// The device flags the backend reported.
        flags: u32,
    },
    /// The device reports fewer regions than a PCI device has.
    #[error("a PCI device has at least {needed} regions, this one reports {found}")]
    TooFewRegions {
        /// Regions reported.
        found: u32,
        /// Regions a PCI device has (up to and including the config region).
        needed: u32,
    },
    /// The device's config region is smaller than the 64-byte header.
    #[error("config region of {size} bytes is smaller than the 64-byte header")]
    ConfigTooSmall {
        /// Size of the config region.
        size: usize,
    },
    /// The config space model refused the device's config space or a change to it.
    #[error("device config space: {context}: {source}")]
    ConfigSpace {
        /// What this crate was doing.
        context: &'static str,
        /// The config space model's error.
        #[source]
        source: pci_config::Error,
    },
    /// The MSI-X table or PBA, as laid out in the guest's BAR, lies beyond 4 GiB of it.
    #[error("MSI-X table at {table:#x} or PBA at {pba:#x} beyond 4 GiB")]
    MsixBeyond4G {
        /// Offset of the table in its BAR.
        table: u64,
        /// Offset of the PBA in its BAR.
        pba: u64,
    },
    /// An interrupt could not be set up or routed: the interrupt model refused, or the
    /// VMM's interrupt group failed (its errno is in the source).
    #[error("interrupts: {context}: {source}")]
    Interrupts {
        /// What this crate was doing.
        context: &'static str,
        /// The interrupt model's or group's error.
        #[source]
        source: pci_interrupts::Error,
    },
    /// The VMM's BAR allocator refused to place or move a BAR.
    #[error("BAR placement: {bar}: {source}")]
    BarPlacement {
        /// The BAR.
        bar: BarIndex,
        /// The allocator's error.
        #[source]
        source: pci_bar_alloc::Error,
    },
    /// The BAR was never placed (an I/O BAR without an I/O window): moves are refused.
    #[error("BAR placement: {bar} has no placement in the VMM's windows; moves are refused")]
    BarNotPlaced {
        /// The BAR.
        bar: BarIndex,
    },
    /// The device has no such BAR.
    #[error("no BAR at slot {slot}")]
    NoSuchBar {
        /// The [`BarIndex::slot`] asked for.
        slot: usize,
    },
    /// The VMM's guest mapper refused a mapping (errno in the source).
    #[error("guest mapping: {bar} at {gpa:#x} (+{len:#x}): {source}")]
    GuestMapping {
        /// The BAR being mapped.
        bar: BarIndex,
        /// Guest address of the mapping.
        gpa: u64,
        /// Its length.
        len: u64,
        /// The mapper's error.
        #[source]
        source: std::io::Error,
    },
    /// A DMA range is empty or wraps around the address space.
    #[error("DMA range at {iova:#x} (+{size:#x}) is empty or wraps around")]
    DmaRange {
        /// First address asked for.
        iova: u64,
        /// Its size.
        size: u64,
    },
    /// A DMA range lies outside the IOVA ranges the domain's IOMMU accepts.
    #[error(
        "IOVA range {iova:#x}..={last:#x} is outside the accepted ranges {accepted:x?} of {domain}"
    )]
    DmaOutsideIovaRanges {
        /// First address.
        iova: u64,
        /// Last address.
        last: u64,
        /// What the domain accepts.
        accepted: Vec<std::ops::RangeInclusive<u64>>,
        /// The domain.
        domain: vfio_backend::DomainId,
    },
    /// A DMA mapping, or a guest RAM region, overlaps one already there.
    #[error("{what} {iova:#x}..={last:#x} overlaps the one at {other:#x} (+{other_size:#x})")]
    DmaOverlap {
        /// What was being added: "IOVA range" or "guest RAM".
        what: &'static str,
        /// First address.
        iova: u64,
        /// Last address.
        last: u64,
        /// Start of the one it overlaps.
        other: u64,
        /// Size of the one it overlaps.
        other_size: u64,
    },
    /// Nothing is mapped (or registered) exactly there.
    #[error("no {what} at {iova:#x} of {size:#x} bytes")]
    NoSuchDmaMapping {
        /// What was looked for: "guest RAM region" or "DMA mapping".
        what: &'static str,
        /// Its start.
        iova: u64,
        /// Its size.
        size: u64,
    },
    /// The devices of one IOMMU domain must agree on the DMA mode, and
    /// mapping IOVAs by hand needs a domain in external mode.
    #[error("{domain} is in {mode:?} DMA mode; {wanted:?} mode was asked for")]
    DmaModeMismatch {
        /// The domain.
        domain: vfio_backend::DomainId,
        /// Its mode.
        mode: crate::DmaMode,
        /// The mode asked for.
        wanted: crate::DmaMode,
    },
    /// The domain has no device attached.
    #[error("{domain} has no device attached")]
    NoSuchDomain {
        /// The domain.
        domain: vfio_backend::DomainId,
    },
    /// A joining device would narrow the domain's IOVA ranges so that a live
    /// mapping falls outside them.
    #[error("with the new device, {domain} accepts only {accepted:x?}, which no longer holds the mapping at {iova:#x} (+{size:#x})")]
    DomainNarrowed {
        /// The domain.
        domain: vfio_backend::DomainId,
        /// What it would accept.
        accepted: Vec<std::ops::RangeInclusive<u64>>,
        /// The mapping left outside.
        iova: u64,
        /// Its size.
        size: u64,
    },
    /// Guest RAM given for DMA has no host address in this process.
    #[error("guest region at {gpa:#x} has no host address: {source}")]
    GuestRamHostAddress {
        /// Its guest physical address.
        gpa: u64,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A snapshot envelope with a format version this crate does not read.
    #[error("snapshot format version {found} is not supported (this build reads {supported})")]
    SnapshotVersion {
        /// The version found.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },
    /// A snapshot taken from a differently shaped device.
    #[error("snapshot: {reason}")]
    SnapshotMismatch {
        /// What does not match.
        reason: String,
    },
    /// The snapshot's config space does not restore.
    #[error("snapshot: config space: {source}")]
    SnapshotConfig {
        /// The config space model's error.
        #[source]
        source: pci_config::Error,
    },
    /// The snapshot's state of an interrupt capability does not restore.
    #[error("snapshot: {capability}: {source}")]
    SnapshotInterrupts {
        /// `MSI`, `MSI-X` or `INTx`.
        capability: &'static str,
        /// The interrupt model's error.
        #[source]
        source: pci_interrupts::Error,
    },
    /// A BAR of the snapshot cannot be placed again where it was.
    #[error("snapshot: {bar} at {base:#x} cannot be placed again: {source}")]
    SnapshotPlacement {
        /// The BAR.
        bar: BarIndex,
        /// Where the snapshot placed it.
        base: u64,
        /// The allocator's error.
        #[source]
        source: pci_bar_alloc::Error,
    },
    /// The page size given is not a power of two.
    #[error("invalid argument: page size {size:#x} is not a power of two")]
    PageSize {
        /// The page size given.
        size: u64,
    },
    /// The device's backend cannot migrate the device's own state.
    #[error("migration: the backend cannot migrate this device's state")]
    MigrationUnsupported,
    /// A migration step needs a feature the device's migration lacks.
    #[error("migration: the device does not offer {feature}")]
    MigrationFeature {
        /// `PRE_COPY` or `P2P`.
        feature: &'static str,
    },
    /// A migration step out of order (the migration is over, or the step
    /// comes too late or too early).
    #[error("migration: {step} refused: the migration is {phase}")]
    MigrationPhase {
        /// The step asked for.
        step: &'static str,
        /// Where the migration is.
        phase: &'static str,
    },
    /// The device is not in the migration state a step starts from.
    #[error("migration: the device is in {state}, not {expected}")]
    MigrationDeviceState {
        /// Its state.
        state: vfio_backend::MigState,
        /// The state needed.
        expected: vfio_backend::MigState,
    },
    /// A migration stream is malformed, corrupted or truncated.
    #[error("migration stream: at byte {offset}: {fault}")]
    MigrationStream {
        /// Where in the stream.
        offset: u64,
        /// What is wrong.
        fault: crate::migration::StreamFault,
    },
    /// A migration stream was taken from a device this one does not match.
    #[error("migration stream from another kind of device: {reason}")]
    MigrationMismatch {
        /// The first difference.
        reason: String,
    },
    /// Reading or writing the migration stream (the VMM's reader or writer)
    /// failed.
    #[error("migration: {context}: {source}")]
    MigrationIo {
        /// What was being done.
        context: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Dirty tracking of guest RAM is not possible in some live domain.
    #[error("dirty tracking: {domain}: {reason}")]
    DirtyTrackingUnsupported {
        /// The domain.
        domain: vfio_backend::DomainId,
        /// Why.
        reason: String,
    },
    /// Dirty tracking is already running, or not running.
    #[error("dirty tracking is {}", if *running { "already running" } else { "not running" })]
    DirtyTrackingState {
        /// Whether it is running.
        running: bool,
    },
    /// A lock was poisoned by a panic in another thread.
    #[error("{what} lock poisoned by an earlier panic")]
    Poisoned {
        /// Which lock.
        what: &'static str,
    },
}

impl Error {
    /// Wraps a backend error with what this crate was doing.
    pub fn backend(context: impl Into<String>, source: vfio_backend::Error) -> Self {
        Error::Backend {
            context: context.into(),
            source,
        }
    }

    /// An interrupt error with what this crate was doing.
    pub(crate) fn interrupts(context: &'static str) -> impl FnOnce(pci_interrupts::Error) -> Self {
        move |source| Error::Interrupts { context, source }
    }

    /// A config space error with what this crate was doing.
    pub(crate) fn config(context: &'static str) -> impl FnOnce(pci_config::Error) -> Self {
        move |source| Error::ConfigSpace { context, source }
    }

    /// The errno behind this error, where there is one: the backend's, an interrupt
    /// group's or eventfd's, the guest mapper's.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Backend { source, .. } => source.errno(),
            Error::Interrupts { source, .. } | Error::SnapshotInterrupts { source, .. } => {
                interrupts_errno(source)
            }
            Error::GuestMapping { source, .. } | Error::MigrationIo { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

fn interrupts_errno(e: &pci_interrupts::Error) -> Option<i32> {
    match e {
        pci_interrupts::Error::EventFd { source, .. }
        | pci_interrupts::Error::Group { source, .. } => source.raw_os_error(),
        _ => None,
    }
}
