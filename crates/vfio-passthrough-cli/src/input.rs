//! Files the operator names, read with bounds: a path is opened without blocking (a FIFO with
//! no writer must not hang us), must be a regular file, and is read up to a limit that depends
//! on what it is (a dump, a sysfs attribute). Nothing is allocated from a size the file claims.

use std::fs::File;
use std::io::{self, Read as _};
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::Path;

/// The largest `--fake-config` / `--config` dump read (1 MiB). What `lspci -vvxxxx` prints for
/// one function with a full 4096-byte extended config space is 256 hex lines of 54 bytes
/// (about 14 KiB) plus the decoded text (a few KiB, tens of KiB for a device with many
/// capabilities): a real dump is far below this, and a file above it is not a dump.
pub const MAX_DUMP_BYTES: u64 = 1 << 20;

/// The largest sysfs attribute read by `check` (64 KiB). The kernel's sysfs `show` methods
/// fill one page (4 KiB here, 64 KiB on some arm64 hosts); the binary `config` attribute is
/// at most 4096 bytes.
pub const MAX_SYSFS_BYTES: u64 = 64 << 10;

/// What kind of file `path` is, for an error message.
fn kind_of(ft: std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_block_device() {
        "a block device"
    } else {
        "a special file"
    }
}

/// Reads the regular file at `path`, at most `max` bytes, without ever blocking on a FIFO or
/// a device. Errors (kind `InvalidInput` for a file of the wrong kind or size) say which
/// bound was hit; the caller names the input and its path.
pub fn read_bounded(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    // O_NONBLOCK: opening a FIFO for reading blocks until a writer appears; with it, open
    // returns at once and the fstat below refuses the FIFO. It changes nothing for regular
    // files. Symlinks are followed, as an operator expects.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {}, not a regular file", kind_of(meta.file_type())),
        ));
    }
    if meta.len() > max {
        return Err(too_large(max));
    }
    // The size fstat gave is only a hint (sysfs says 4096 for every attribute, a file can grow
    // while we read): read at most one byte past the bound to tell "too large" from "exact".
    let cap = usize::try_from(meta.len().min(max)).unwrap_or(0);
    let mut buf = Vec::with_capacity(cap);
    file.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(too_large(max));
    }
    Ok(buf)
}

/// [`read_bounded`], as UTF-8 text.
pub fn read_text_bounded(path: &Path, max: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, max)?)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "it is not UTF-8 text"))
}

fn too_large(max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("it is larger than {max} bytes, the most this input can hold"),
    )
}

/// Creates (or truncates) `path` and writes `data` to it, without blocking on a FIFO that
/// nobody reads (it is refused with `ENXIO` by the kernel, reported as such).
pub fn write_file(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;
    let mut file = File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ENXIO) {
                io::Error::new(e.kind(), "it is a FIFO or device with no reader (ENXIO)")
            } else {
                e
            }
        })?;
    // Back to blocking writes: a reader that is there gets the whole dump.
    let fd = file.as_raw_fd();
    // SAFETY: `fd` is an open descriptor owned by `file`; F_GETFL/F_SETFL only change its
    // status flags.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(io::Error::last_os_error());
    }
    file.write_all(data)
}

/// How long connecting to a Unix socket the operator names may take: a listener whose backlog
/// is full (a server that stopped accepting) would otherwise block `connect` for good.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connects to the Unix stream socket at `path`, giving up after `timeout` (the kernel
/// bounds a blocking `connect` on a full backlog by the socket's send timeout).
pub fn connect_unix(
    path: &Path,
    timeout: std::time::Duration,
) -> io::Result<std::os::unix::net::UnixStream> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    use std::os::unix::ffi::OsStrExt as _;
    // SAFETY: sockaddr_un is plain data; all zeros is a valid (empty) value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    // One byte is kept for the terminating NUL.
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a Unix socket path is 1 to {} bytes without NUL",
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: `tv` is a valid timeval that lives across the call; its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            std::ptr::from_ref(&tv).cast::<libc::c_void>(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `addr` is a valid sockaddr_un with a NUL-terminated path; its size is passed.
    let rc = unsafe {
        libc::connect(
            fd,
            std::ptr::from_ref(&addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINPROGRESS) => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "connect timed out after {} s (a listener that accepts nobody)",
                    timeout.as_secs()
                ),
            ),
            _ => e,
        });
    }
    // The timeout stays on the stream for sends, which the vfio-user client sets anyway.
    Ok(std::os::unix::net::UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn regular_file_within_the_bound_is_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"0123456789").unwrap();
        assert_eq!(read_bounded(&p, 10).unwrap(), b"0123456789");
        let e = read_bounded(&p, 9).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("larger than 9 bytes"), "{e}");
    }

    #[test]
    fn directories_and_character_devices_are_refused_by_kind() {
        let e = read_bounded(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(e.to_string().contains("a character device"), "{e}");
        let e = read_bounded(Path::new("/"), 10).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
    }
}
