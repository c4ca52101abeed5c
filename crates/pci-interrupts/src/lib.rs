//! MSI, MSI-X and INTx state machines for an emulated PCI function, and the traits a VMM
//! implements to deliver them.
//!
//! The guest programs interrupts through registers: the MSI capability (PCI Local Bus 3.0
//! §6.8.1), the MSI-X capability with its table and Pending Bit Array (§6.8.2), and INTx through
//! the command/status registers. [`MsiState`], [`MsixState`] and [`IntxState`] hold that register
//! state, take the guest's reads and writes, and tell the VMM what to do through an
//! [`InterruptSourceGroup`]: which route a vector uses, whether it is masked, when the group is
//! enabled, and when a pending vector must be delivered. The VMM creates groups through an
//! [`InterruptManager`] (with KVM: one irqfd and one GSI route per vector). [`MsixLayout`] is
//! the static decode of an MSI-X capability's structure (vector count, table and PBA
//! locations) for code that needs it without emulating the capability.
//!
//! The state machines take `&mut self`; the caller keeps them behind its own lock. Guest input
//! never panics: an access outside a register block, or of a size the specification does not
//! allow, is logged and ignored (reads of it return all ones).
//!
//! `testing` (feature `test-utils`, for tests only) holds an instrumented
//! implementation of the traits.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod group;
mod intx;
mod msi;
mod msix;
mod regs;
mod snapshot;
#[cfg(feature = "test-utils")]
#[cfg_attr(docsrs, doc(cfg(feature = "test-utils")))]
pub mod testing;

pub use group::{Delivery, InterruptManager, InterruptSourceGroup, MsiRoute};
pub use intx::{IntxPin, IntxSnapshot, IntxState, COMMAND_INTX_DISABLE, STATUS_INTERRUPT};
pub use msi::{MsiSnapshot, MsiState, MSI_MAX_VECTORS};
pub use msix::{
    MsixBarLocation, MsixLayout, MsixSnapshot, MsixState, MsixTableEntry, MSIX_CAP_LEN,
    MSIX_ENTRY_SIZE, MSIX_MAX_VECTORS,
};
pub use snapshot::{payload, versioned, Versioned, SNAPSHOT_VERSION};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A vector number outside what a group or capability has.
    #[error("interrupt vector {vector} out of range (there are {count})")]
    VectorOutOfRange {
        /// The vector asked for.
        vector: u32,
        /// How many vectors there are.
        count: u32,
    },
    /// Creating or using an eventfd failed.
    #[error("eventfd {op} failed: {source}")]
    EventFd {
        /// What was being done.
        op: &'static str,
        /// The OS error, with its errno.
        #[source]
        source: std::io::Error,
    },
    /// The VMM's interrupt group could not do what was asked (errno kept in `source`).
    #[error("interrupt group {op} failed: {source}")]
    Group {
        /// The group operation (`update`, `enable`, `disable`, `trigger`, `create`).
        op: &'static str,
        /// The underlying error, with its errno.
        #[source]
        source: std::io::Error,
    },
    /// Capability bytes or parameters that do not describe a valid capability.
    #[error("invalid {capability} capability: {reason}")]
    InvalidCapability {
        /// `MSI`, `MSI-X` or `INTx`.
        capability: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A snapshot envelope with a format version this crate does not read.
    #[error("snapshot version {found} is not supported (this crate writes version {supported})")]
    SnapshotVersion {
        /// The version found in the envelope.
        found: u32,
        /// The version this crate writes.
        supported: u32,
    },
    /// A snapshot taken from a differently shaped capability, or internally inconsistent.
    #[error("snapshot does not fit this {capability} state: {reason}")]
    SnapshotMismatch {
        /// `MSI`, `MSI-X` or `INTx`.
        capability: &'static str,
        /// What does not match.
        reason: &'static str,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
