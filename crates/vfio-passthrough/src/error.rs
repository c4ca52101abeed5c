//! The error type of this crate.

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM ioctl failed (errno kept in `source`).
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The ioctl or operation, e.g. `KVM_SET_GSI_ROUTING`.
        op: &'static str,
        /// The OS error, with its errno.
        #[source]
        source: std::io::Error,
    },
    /// An eventfd could not be created or used.
    #[error("eventfd {op} failed: {source}")]
    EventFd {
        /// What was being done.
        op: &'static str,
        /// The OS error, with its errno.
        #[source]
        source: std::io::Error,
    },
    /// Every number of a range the VMM handed over (GSIs, memory slots) is in use.
    #[error("{requested} {resource} asked for, fewer are free in {start}..{end}")]
    Exhausted {
        /// `GSI` or `memory slot`.
        resource: &'static str,
        /// How many were asked for.
        requested: u32,
        /// Start of the range given by the VMM.
        start: u32,
        /// End (exclusive) of the range given by the VMM.
        end: u32,
    },
    /// A parameter outside what KVM accepts.
    #[error("invalid {what} {value:#x}: {reason}")]
    Invalid {
        /// The parameter.
        what: &'static str,
        /// Its value.
        value: u64,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A guest mapping that would overlap one made earlier.
    #[error(
        "guest range {gpa:#x}..{end:#x} overlaps the mapping at {other_gpa:#x}..{other_end:#x}",
        end = gpa.saturating_add(*size),
        other_end = other_gpa.saturating_add(*other_size)
    )]
    Overlap {
        /// Guest physical address asked for.
        gpa: u64,
        /// Size asked for.
        size: u64,
        /// Guest physical address of the existing mapping.
        other_gpa: u64,
        /// Size of the existing mapping.
        other_size: u64,
    },
    /// A mapping id this mapper did not hand out, or already unmapped.
    #[error("no guest mapping with id {0}")]
    UnknownMapping(u64),
    /// Something the VMM did not configure (e.g. an INTx group without an INTx line).
    #[error("not configured: {0}")]
    NotConfigured(&'static str),
    /// The device builder could not open or reach the VFIO device.
    #[error("cannot open {what}: {source}; {hint}")]
    OpenDevice {
        /// The device: sysfs path or socket path, and the backend.
        what: String,
        /// What the operator can check.
        hint: String,
        /// The backend's error (errno kept).
        #[source]
        source: vfio_backend::Error,
    },
    /// The device builder was not given a resource it needs.
    #[error("the device builder needs {what}: call DeviceBuilder::{call}() before build()")]
    MissingResource {
        /// The resource, e.g. `an interrupt manager`.
        what: &'static str,
        /// The builder method that provides it.
        call: &'static str,
    },
    /// The device could not be attached as a PCI function.
    #[error("attaching {what}: {source}")]
    AttachDevice {
        /// The device.
        what: String,
        /// Why (errno kept where the backend gave one).
        #[source]
        source: vfio_pci::Error,
    },
    /// Guest RAM could not be registered for DMA before the device was
    /// opened (it overlaps other registered RAM, or a live IOMMU domain
    /// refused to map it). A failure to map registered RAM into the new
    /// device's domain is an [`Error::AttachDevice`].
    #[error("registering guest RAM for DMA of {what}: {source}")]
    MapGuestMemory {
        /// The device.
        what: String,
        /// Why (errno kept where the backend gave one).
        #[source]
        source: vfio_pci::Error,
    },
    /// A device builder given a [`HostIommu`](crate::HostIommu) cannot use
    /// it as asked: not a host device by sysfs path, a container of its
    /// own, a mode other than the context's (one context holds one kind of
    /// IOMMU domain), or a `GuestDma` other than the context's. Refused
    /// before anything is opened.
    #[error("{what} cannot join its host IOMMU context: {reason}")]
    HostIommuConflict {
        /// The device.
        what: String,
        /// Why.
        reason: String,
    },
    /// Guest RAM was given for a device in external DMA mode: the VMM maps
    /// IOVAs itself (a vIOMMU), so that RAM would never be mapped for it.
    #[error(
        "guest RAM given for {what}, which is in external DMA mode: the VMM maps IOVAs itself \
         (a vIOMMU)"
    )]
    GuestMemoryInExternalMode {
        /// The device.
        what: String,
    },
}

impl Error {
    /// The [`std::io::ErrorKind`] that best describes this error, for trait methods that return
    /// [`std::io::Error`].
    pub fn io_kind(&self) -> std::io::ErrorKind {
        use std::io::ErrorKind;
        match self {
            Self::Kvm { source, .. } | Self::EventFd { source, .. } => source.kind(),
            Self::Exhausted { .. } => ErrorKind::OutOfMemory,
            Self::Invalid { .. } => ErrorKind::InvalidInput,
            Self::Overlap { .. } => ErrorKind::AlreadyExists,
            Self::UnknownMapping(_) => ErrorKind::NotFound,
            Self::NotConfigured(_) => ErrorKind::Unsupported,
            Self::MissingResource { .. } => ErrorKind::InvalidInput,
            Self::OpenDevice {
                source: vfio_backend::Error::NotAvailable { source, .. },
                ..
            } => source.kind(),
            Self::GuestMemoryInExternalMode { .. } | Self::HostIommuConflict { .. } => {
                ErrorKind::InvalidInput
            }
            Self::OpenDevice { .. } | Self::AttachDevice { .. } | Self::MapGuestMemory { .. } => {
                self.errno().map_or(ErrorKind::Other, |e| {
                    std::io::Error::from_raw_os_error(e).kind()
                })
            }
        }
    }

    /// The errno of the underlying OS error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kvm { source, .. } | Self::EventFd { source, .. } => source.raw_os_error(),
            Self::OpenDevice { source, .. } => source.errno(),
            Self::AttachDevice { source, .. } | Self::MapGuestMemory { source, .. } => {
                source.errno()
            }
            _ => None,
        }
    }
}

impl From<Error> for std::io::Error {
    fn from(err: Error) -> Self {
        std::io::Error::new(err.io_kind(), err)
    }
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
