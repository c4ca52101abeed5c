//! The crate's one error type.

use std::time::Duration;

/// A `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong talking to a VFIO device.
///
/// Each variant keeps what was being done, and [`Error::errno`] gives the
/// errno where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A system call failed (open, ioctl, pread, mmap, sendmsg, ...).
    #[error("{context}: {source}")]
    Io {
        /// What was being done, e.g. "VFIO_DEVICE_GET_REGION_INFO for region 7".
        context: String,
        /// The OS error, with its errno.
        #[source]
        source: std::io::Error,
    },
    /// VFIO is not available on this host: `/dev/vfio` (or the device node)
    /// is missing or not accessible.
    #[error("VFIO is not available: {path}: {source} (is the vfio-pci module loaded and the device bound to it?)")]
    NotAvailable {
        /// The path that could not be opened.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The device or the server refused a request with an errno.
    #[error("{context}: the device refused the request: {}", std::io::Error::from_raw_os_error(*errno))]
    Refused {
        /// What was being done.
        context: String,
        /// The errno the device or server returned.
        errno: i32,
    },
    /// The caller asked for something impossible (an index out of range, an
    /// access past the end of a region, a misaligned mapping, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The device or backend does not support this operation.
    #[error("not supported: {0}")]
    Unsupported(String),
    /// A vfio-user peer sent a message that breaks the protocol (wrong sizes,
    /// counts, fds, ids). The connection should be considered unusable.
    #[error("vfio-user protocol violation: {0}")]
    Protocol(String),
    /// A vfio-user request got no reply in time.
    #[error("vfio-user request {request} got no reply within {after:?}")]
    Timeout {
        /// The request's command name.
        request: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The vfio-user peer closed the connection or died.
    #[error("vfio-user connection lost: {0}")]
    Disconnected(String),
}

impl Error {
    /// An [`Error::Io`] from the current `errno`.
    pub fn last_os_error(context: impl Into<String>) -> Self {
        Error::Io {
            context: context.into(),
            source: std::io::Error::last_os_error(),
        }
    }

    /// An [`Error::Io`] from an I/O error.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno behind this error, where there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Io { source, .. } | Error::NotAvailable { source, .. } => source
                .raw_os_error()
                .or_else(|| errno_of_kind(source.kind())),
            Error::Refused { errno, .. } => Some(*errno),
            Error::InvalidArgument(_) => Some(libc::EINVAL),
            Error::Unsupported(_) => Some(libc::ENOTSUP),
            Error::Protocol(_) => Some(libc::EPROTO),
            Error::Timeout { .. } => Some(libc::ETIMEDOUT),
            Error::Disconnected(_) => Some(libc::ENOTCONN),
        }
    }
}

/// The errno an I/O error of this kind stands for, for errors that were
/// rewrapped with more context and lost their raw OS error.
fn errno_of_kind(kind: std::io::ErrorKind) -> Option<i32> {
    use std::io::ErrorKind as K;
    Some(match kind {
        K::NotFound => libc::ENOENT,
        K::PermissionDenied => libc::EACCES,
        K::AlreadyExists => libc::EEXIST,
        K::WouldBlock => libc::EAGAIN,
        K::InvalidInput => libc::EINVAL,
        K::TimedOut => libc::ETIMEDOUT,
        K::Interrupted => libc::EINTR,
        K::Unsupported => libc::ENOTSUP,
        K::OutOfMemory => libc::ENOMEM,
        K::BrokenPipe => libc::EPIPE,
        K::ConnectionReset => libc::ECONNRESET,
        K::NotConnected => libc::ENOTCONN,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_kept_for_every_variant() {
        let e = Error::Refused {
            context: "REGION_READ".into(),
            errno: libc::EIO,
        };
        assert_eq!(e.errno(), Some(libc::EIO));
        assert!(e.to_string().contains("REGION_READ"));
        let e = Error::io("open", std::io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.errno(), Some(libc::ENOENT));
        // Rewrapped with context, the kind still gives the errno.
        let e = Error::NotAvailable {
            path: "/sys/bus/pci/devices/x/iommu_group".into(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no IOMMU group"),
        };
        assert_eq!(e.errno(), Some(libc::ENOENT));
        let e = Error::Timeout {
            request: "DEVICE_RESET",
            after: Duration::from_secs(1),
        };
        assert_eq!(e.errno(), Some(libc::ETIMEDOUT));
    }
}
