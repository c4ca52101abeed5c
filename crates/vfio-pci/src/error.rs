//! The crate's one error type.

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
    /// The device's configuration space or capabilities are unusable.
    #[error("device config space: {0}")]
    Config(String),
    /// An interrupt could not be set up or routed.
    #[error("interrupts: {0}")]
    Interrupts(String),
    /// A BAR could not be placed or moved.
    #[error("BAR placement: {0}")]
    BarPlacement(String),
    /// The VMM's guest mapper refused a mapping.
    #[error("guest mapping: {0}")]
    GuestMapping(String),
    /// A DMA request falls outside guest RAM or the IOMMU's IOVA ranges, or
    /// overlaps an existing mapping.
    #[error("DMA mapping: {0}")]
    Dma(String),
    /// A snapshot could not be taken or restored.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The caller asked for something impossible.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    /// Wraps a backend error with what this crate was doing.
    pub fn backend(context: impl Into<String>, source: vfio_backend::Error) -> Self {
        Error::Backend {
            context: context.into(),
            source,
        }
    }

    /// The errno behind this error, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Backend { source, .. } => source.errno(),
            _ => None,
        }
    }
}
