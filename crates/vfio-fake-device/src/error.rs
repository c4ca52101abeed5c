//! The crate's error type for building fake devices.
//!
//! Trait methods of [`vfio_backend::Vfio`] return [`vfio_backend::Error`];
//! this enum only covers what can go wrong while describing or creating a
//! fake device.

/// Everything that can go wrong building a [`crate::DeviceTemplate`] or a
/// [`crate::FakeDevice`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FakeError {
    /// The template describes something a PCI function cannot be (a BAR
    /// size that is not a power of two, a capability that does not fit, a
    /// register block outside its BAR, ...).
    #[error("invalid device template: {0}")]
    InvalidTemplate(String),
    /// An `lspci -xxx` / `-xxxx` dump could not be parsed.
    #[error("lspci dump, line {line}: {reason}")]
    HexDump {
        /// 1-based line number in the dump (0 when the whole dump is at fault).
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// No profile has that name.
    #[error("unknown fake device profile {name:?} (known: {known})")]
    UnknownProfile {
        /// The name asked for.
        name: String,
        /// The known profile names, comma separated.
        known: String,
    },
    /// A system call failed while creating the device (memfd, ftruncate).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memory behind a BAR failed.
    #[error("mapping BAR memory: {0}")]
    Backend(#[from] vfio_backend::Error),
}

/// A `Result` with [`FakeError`].
pub type FakeResult<T> = std::result::Result<T, FakeError>;

pub(crate) fn invalid(msg: impl Into<String>) -> FakeError {
    FakeError::InvalidTemplate(msg.into())
}
