//! The error type of the reference VMM.

/// Everything that can stop the VMM, with its context and, where the OS gave one, its errno.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The command line is wrong.
    #[error("{0}")]
    Usage(String),
    /// A file named on the command line could not be read.
    #[error("{what} {path}: {source}")]
    File {
        /// What the file is (kernel, initrd).
        what: &'static str,
        /// Its path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{op}: {source}")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The OS error, with its errno.
        #[source]
        source: std::io::Error,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op}: {source}")]
    Kvm {
        /// The ioctl.
        op: &'static str,
        /// The OS error, with its errno.
        #[source]
        source: std::io::Error,
    },
    /// Guest memory could not be made or written.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel, initrd or command line do not fit or do not load.
    #[error("boot: {0}")]
    Boot(String),
    /// What the guest would be given does not fit the machine (too many CPUs or devices).
    #[error("machine layout: {0}")]
    Layout(String),
    /// A passed-through device could not be attached or wired.
    #[error("device {what}: {source}")]
    Device {
        /// The device as given on the command line.
        what: String,
        /// What the passthrough stack said.
        #[source]
        source: Box<vfio_passthrough::Error>,
    },
    /// A device reported a failure at run time.
    #[error("device at 00:{slot:02x}.0: {source}")]
    DeviceRun {
        /// Its PCI device number on the guest's bus 0.
        slot: u8,
        /// What the device said.
        #[source]
        source: Box<vfio_passthrough::vfio_pci::Error>,
    },
    /// The guest did something the VMM cannot go on from.
    #[error("vCPU {cpu}: {what}")]
    Guest {
        /// The vCPU.
        cpu: usize,
        /// What happened.
        what: String,
    },
}

impl Error {
    /// An [`Error::Os`] from `errno`.
    pub fn last_os(op: &'static str) -> Self {
        Error::Os {
            op,
            source: std::io::Error::last_os_error(),
        }
    }
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
