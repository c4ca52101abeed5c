//! A generic vfio-user server: exposes any [`Vfio`] device over a Unix
//! socket.
//!
//! Each command is answered by calling the device's [`Vfio`] methods; a
//! failure becomes an error reply carrying [`Error::errno`] (`EIO` when
//! there is none). The client is untrusted: message sizes, counts and file
//! descriptors are bounded and checked, and nothing it sends can make the
//! server panic.
//!
//! DMA, both ways the spec allows:
//! - `DMA_MAP` with a file descriptor: the file must be a regular file
//!   (a memfd, a tmpfs or hugetlbfs file) at least `offset + size` long,
//!   opened for reading (and writing when the map is writable), else
//!   `EINVAL` / `EACCES`. A file sealed against shrinking (`F_SEAL_SHRINK`,
//!   as QEMU's `memory-backend-memfd` seals by default) is mmapped and the
//!   device reaches it with loads and stores. Any other file is not mapped:
//!   the device gets it with `host_addr` 0 and reaches it by `pread` /
//!   `pwrite`, so a client that shrinks the file later makes the device's
//!   DMA fail (a DMA fault) instead of killing the server with `SIGBUS`.
//!   (hugetlbfs has no `write(2)`: a device writing to an unsealed
//!   hugetlbfs file faults; a hugetlb memfd can be sealed.)
//! - `DMA_MAP` without a file descriptor (QEMU sends that when guest RAM is
//!   not shareable): the device gets the range through
//!   [`IommuDomain::map_remote`](crate::IommuDomain::map_remote) of its
//!   domain and reaches it with `DMA_READ` / `DMA_WRITE`
//!   messages to the client, each at most the smaller of the two sides'
//!   `max_data_xfer_size`, each reply awaited at most
//!   [`ServerOptions::dma_timeout`]. Replies are routed to the waiting
//!   request by message id while this thread keeps serving the client's
//!   commands; a late reply is dropped. The device must make those
//!   requests outside the command handler that started them (the fake
//!   device replies to the doorbell write first and completes such DMA on
//!   its own thread, busy until then), since a client may answer our
//!   requests only after we replied to its own.
//!
//! Interrupt file descriptors (`DEVICE_SET_IRQS` with `DATA_EVENTFD`, for
//! `ACTION_TRIGGER` and `ACTION_UNMASK`) must be eventfds: every fd of the
//! message is checked before the device gets any, and anything else (a
//! pipe, a socket, a file) is refused with `EINVAL`, as the kernel's
//! `vfio-pci` does. The eventfds are switched to non-blocking mode (on the
//! file description the client shares, see [`crate::eventfd`]) so that a
//! client that fills a counter up cannot make the device block while it
//! signals.
//!
//! One client at a time, and stalls are bounded by
//! [`ServerOptions::stall_timeout`] (default [`DEFAULT_STALL_TIMEOUT`]):
//! - a new client must complete VERSION within the bound, or it is dropped;
//! - a started message (part of a header or payload received) must complete
//!   within the bound, and a reply must be taken by the client within it;
//! - a negotiated client that sends nothing is idle, not stalled (a VMM's
//!   guest may not touch the device for minutes): it is served as long as
//!   it stays connected;
//! - a client that connects while another is served ([`UserServer`],
//!   [`serve`]) is accepted at once, with a warning in our log, rather than
//!   left waiting in the listen backlog: its first request (VERSION) gets an
//!   error reply `EBUSY` if its header arrives within a second, and the
//!   connection is closed (at most four such clients wait at a time; more
//!   are closed straight away).
//!
//! Every error reply is logged at debug level with its command, message id,
//! errno and reason, so that a client's trouble can be diagnosed from this
//! side alone.
//!
//! Migration (`DEVICE_FEATURE` for `MIGRATION`, `MIG_DEVICE_STATE`,
//! `MIG_DATA_SIZE` and `DMA_LOGGING_START` / `STOP` / `REPORT`;
//! `MIG_DATA_READ` / `MIG_DATA_WRITE`) is served from the device's own
//! migration methods ([`Vfio::set_mig_state`] and the others): a kernel
//! device behind the server migrates as a fake one does. The VERSION reply
//! announces the `migration` capability (`pgsize`, `max_bitmap_size`) when
//! the device can migrate. Every size is checked before anything is
//! allocated: a `MIG_DATA_READ` / `MIG_DATA_WRITE` of more than our
//! `max_data_xfer_size`, a dirty bitmap of more than our
//! `max_data_xfer_size` (or the client's `max_bitmap_size`), more than
//! [`protocol::MAX_DMA_LOGGING_RANGES`] ranges, a state value outside the
//! uAPI's, or unknown feature flags are refused with `EINVAL` (`E2BIG` for
//! too many ranges); an unknown feature with `ENOTTY`, as the kernel does.
//! The data stream is the one the last state change opened; it ends when
//! the device leaves the states that use it, on reset and on disconnect.
//!
//! What this server does not do: `DATA_BOOL` interrupt sets,
//! client-triggered interrupts, `GET_REGION_IO_FDS` and twin-socket mode
//! are refused with `ENOTSUP`.

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::locking::lock;
use super::protocol::{
    self, command, command_name, dma_flags, feature, irq_set, Capabilities, DeviceInfoPayload,
    DmaAccessPayload, DmaLoggingControl, DmaLoggingRange, DmaLoggingReport, DmaMapPayload,
    DmaUnmapPayload, FeatureHeader, Header, IrqInfoPayload, Message, MigDataPayload,
    MigStatePayload, Received, RegionAccessPayload, RegionInfoPayload, SetIrqsPayload, HEADER_SIZE,
};
use crate::{
    migration, DirtyRange, DmaFile, DmaSource, Error, Mapping, MigState, MigrationStream,
    RemoteDma, Result, Vfio,
};

/// The most vectors one `DEVICE_SET_IRQS` may name (MSI-X has at most 2048).
const MAX_IRQ_COUNT: u32 = 2048;

/// The `max_msg_fds` we offer by default. The spec sets no bound, but
/// clients do: QEMU's `vfio-user-pci` refuses a VERSION reply offering more
/// than 16, and the `vfio_user` crate receives at most 16 descriptors per
/// message. 16 is the most that every client we know of takes.
pub const DEFAULT_MAX_MSG_FDS: u32 = 16;

/// Options of the server side of a connection.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct ServerOptions {
    /// The most data bytes in one REGION_READ/WRITE (our `max_data_xfer_size`).
    pub max_data_xfer_size: u32,
    /// The most file descriptors we accept in one message (our `max_msg_fds`,
    /// offered in the VERSION reply; see [`DEFAULT_MAX_MSG_FDS`] before
    /// raising it).
    pub max_msg_fds: u32,
    /// The most simultaneous DMA mappings (our `max_dma_maps`).
    pub max_dma_maps: u32,
    /// How long the device's DMA waits for the client's reply to one
    /// `DMA_READ` / `DMA_WRITE` (maps without a file descriptor) before
    /// that DMA fails.
    pub dma_timeout: Duration,
    /// How long a client may stall before it is dropped: the longest a new
    /// client may take to complete VERSION after it connected, a started
    /// message (part of a header or payload received) may take to complete,
    /// and a reply may wait for the client to read it. A negotiated client
    /// that sends nothing is idle, not stalled: it is never dropped for it.
    /// A zero bound is taken as one millisecond.
    pub stall_timeout: Duration,
}

/// The default [`ServerOptions::stall_timeout`].
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(5);

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_data_xfer_size: 1 << 20,
            max_msg_fds: DEFAULT_MAX_MSG_FDS,
            max_dma_maps: 65535,
            dma_timeout: Duration::from_secs(5),
            stall_timeout: DEFAULT_STALL_TIMEOUT,
        }
    }
}

impl ServerOptions {
    /// Returns the options with [`max_data_xfer_size`](Self::max_data_xfer_size) set to the given value.
    #[must_use]
    pub const fn with_max_data_xfer_size(mut self, max_data_xfer_size: u32) -> Self {
        self.max_data_xfer_size = max_data_xfer_size;
        self
    }

    /// Returns the options with [`max_msg_fds`](Self::max_msg_fds) set to the given value.
    #[must_use]
    pub const fn with_max_msg_fds(mut self, max_msg_fds: u32) -> Self {
        self.max_msg_fds = max_msg_fds;
        self
    }

    /// Returns the options with [`max_dma_maps`](Self::max_dma_maps) set to the given value.
    #[must_use]
    pub const fn with_max_dma_maps(mut self, max_dma_maps: u32) -> Self {
        self.max_dma_maps = max_dma_maps;
        self
    }

    /// Returns the options with [`dma_timeout`](Self::dma_timeout) set to the given value.
    #[must_use]
    pub const fn with_dma_timeout(mut self, dma_timeout: Duration) -> Self {
        self.dma_timeout = dma_timeout;
        self
    }

    /// Returns the options with [`stall_timeout`](Self::stall_timeout) set to the given value.
    #[must_use]
    pub const fn with_stall_timeout(mut self, stall_timeout: Duration) -> Self {
        self.stall_timeout = stall_timeout;
        self
    }
}

struct DmaRange {
    size: u64,
    /// Our mapping of the client's file, when the device reaches it by
    /// loads and stores (sealed files only); `None` for fd I/O and
    /// message DMA.
    _mapping: Option<Mapping>,
}

/// The most server requests (`DMA_READ` / `DMA_WRITE`) waiting for their
/// replies at once.
const MAX_OUTSTANDING: usize = 64;

/// Our requests to the client that wait for a reply.
struct Pending {
    next_id: u16,
    /// (message id, the reply once it came).
    waiting: Vec<(u16, Option<Message>)>,
    /// The connection is over: every wait fails at once.
    closed: bool,
}

/// The socket as both directions use it: the session thread sends its
/// replies, the device's DMA sends requests from whatever thread it runs
/// on, and the session thread routes the client's replies to them.
struct Link {
    stream: UnixStream,
    /// Held for each whole message sent, so messages never interleave.
    send_lock: Mutex<()>,
    pending: Mutex<Pending>,
    replied: Condvar,
    /// The thread that reads the socket: a request from it could never
    /// see its reply, so it fails at once.
    reader: std::thread::ThreadId,
}

impl Link {
    fn send(&self, header: &Header, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let _g = lock(&self.send_lock);
        protocol::write_message(self.stream.as_fd(), header, parts, fds)
    }

    /// Hands a reply from the client to the request waiting for it; a reply
    /// nobody waits for (late, after a timeout) is dropped.
    fn deliver(&self, m: Message) {
        let mut p = lock(&self.pending);
        let id = m.header.id;
        match p.waiting.iter_mut().find(|(i, r)| *i == id && r.is_none()) {
            Some((_, slot)) => {
                *slot = Some(m);
                self.replied.notify_all();
            }
            None => log::debug!(
                "vfio-user server: dropped a reply to {} (id {id}) nobody waits for",
                command_name(m.header.command)
            ),
        }
    }

    /// The session is over: waits fail at once, and the socket is shut
    /// down even if a device still holds this link (a mapping it failed
    /// to unmap), so the client sees the end.
    fn close(&self) {
        lock(&self.pending).closed = true;
        self.replied.notify_all();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Sends a command to the client and waits, at most `timeout`, for its
    /// reply. An error reply is [`Error::Refused`].
    fn request(&self, cmd: u16, parts: &[&[u8]], timeout: Duration) -> Result<Message> {
        if std::thread::current().id() == self.reader {
            return Err(Error::Unsupported(format!(
                "{} from inside a command handler: the reply could not be read",
                command_name(cmd)
            )));
        }
        let len = parts.iter().map(|p| p.len()).sum();
        let id = {
            let mut p = lock(&self.pending);
            if p.closed {
                return Err(Error::Disconnected("the client left".into()));
            }
            if p.waiting.len() >= MAX_OUTSTANDING {
                return Err(Error::Refused {
                    context: format!("{}: too many requests in flight", command_name(cmd)),
                    errno: libc::EBUSY,
                });
            }
            let mut id = p.next_id;
            while p.waiting.iter().any(|(i, _)| *i == id) {
                id = id.wrapping_add(1);
            }
            p.next_id = id.wrapping_add(1);
            p.waiting.push((id, None));
            id
        };
        let forget = |p: &mut Pending| p.waiting.retain(|(i, _)| *i != id);
        if let Err(e) = Header::command(id, cmd, len).and_then(|h| self.send(&h, parts, &[])) {
            forget(&mut lock(&self.pending));
            return Err(e);
        }
        let deadline = Instant::now() + timeout;
        let mut p = lock(&self.pending);
        loop {
            let pos = p.waiting.iter().position(|(i, r)| *i == id && r.is_some());
            if let Some(m) = pos.and_then(|pos| p.waiting.swap_remove(pos).1) {
                if m.header.command != cmd || !m.fds.is_empty() {
                    return Err(Error::Protocol(format!(
                        "reply to {} is a {} with {} file descriptors",
                        command_name(cmd),
                        command_name(m.header.command),
                        m.fds.len()
                    )));
                }
                if m.header.is_error() {
                    return Err(Error::Refused {
                        context: format!("{} to the client", command_name(cmd)),
                        errno: i32::try_from(m.header.error)
                            .ok()
                            .filter(|e| *e != 0)
                            .unwrap_or(libc::EIO),
                    });
                }
                return Ok(m);
            }
            if p.closed {
                forget(&mut p);
                return Err(Error::Disconnected("the client left".into()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                forget(&mut p);
                return Err(Error::Timeout {
                    request: command_name(cmd),
                    after: timeout,
                });
            }
            p = self
                .replied
                .wait_timeout(p, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// A client's memory mapped without a file descriptor, reached with
/// `DMA_READ` / `DMA_WRITE` messages of at most `chunk` data bytes.
struct ClientDma {
    link: Arc<Link>,
    chunk: u64,
    timeout: Duration,
}

impl ClientDma {
    fn pieces(&self, iova: u64, len: usize) -> Result<impl Iterator<Item = (u64, usize, usize)>> {
        iova.checked_add(len as u64)
            .ok_or_else(|| einval("DMA access wraps the address space"))?;
        let chunk = usize::try_from(self.chunk).unwrap_or(usize::MAX).max(1);
        Ok((0..len)
            .step_by(chunk)
            .map(move |done| (iova + done as u64, done, chunk.min(len - done))))
    }
}

impl RemoteDma for ClientDma {
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<()> {
        for (addr, done, n) in self.pieces(iova, buf.len())? {
            let req = DmaAccessPayload {
                address: addr,
                count: n as u64,
            };
            let m = self
                .link
                .request(command::DMA_READ, &[&req.encode()], self.timeout)?;
            let data = m
                .payload
                .get(DmaAccessPayload::SIZE..)
                .filter(|d| d.len() == n)
                .ok_or_else(|| {
                    Error::Protocol(format!(
                        "DMA_READ reply of {} bytes to a read of {n}",
                        m.payload.len()
                    ))
                })?;
            if DmaAccessPayload::decode(&m.payload)? != req {
                return Err(Error::Protocol(
                    "DMA_READ reply for another address or count".into(),
                ));
            }
            buf.get_mut(done..done + n)
                .ok_or_else(|| einval("DMA_READ piece outside the buffer"))?
                .copy_from_slice(data);
        }
        Ok(())
    }

    fn write(&self, iova: u64, data: &[u8]) -> Result<()> {
        for (addr, done, n) in self.pieces(iova, data.len())? {
            let req = DmaAccessPayload {
                address: addr,
                count: n as u64,
            };
            let piece = data
                .get(done..done + n)
                .ok_or_else(|| einval("DMA_WRITE piece outside the buffer"))?;
            let m = self
                .link
                .request(command::DMA_WRITE, &[&req.encode(), piece], self.timeout)?;
            // The spec has the client echo the fixed part; accept an empty
            // reply too.
            if !m.payload.is_empty() && DmaAccessPayload::decode(&m.payload)? != req {
                return Err(Error::Protocol(
                    "DMA_WRITE reply for another address or count".into(),
                ));
            }
        }
        Ok(())
    }
}

/// What a client's file for `DMA_MAP` must be: a regular file (a memfd, a
/// tmpfs or hugetlbfs file) that holds `offset .. offset + size`, readable,
/// and writable when the map is. Returns whether the file is sealed against
/// shrinking (so that a mapping of it can never fault).
fn check_dma_file(fd: BorrowedFd<'_>, offset: u64, size: u64, writable: bool) -> Result<bool> {
    // SAFETY: stat is plain data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one stat into `st`, which is that big, for a
    // descriptor we own.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(Error::last_os_error("fstat of the DMA_MAP file"));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(einval(format!(
            "DMA_MAP file is not a regular file (mode {:#o})",
            st.st_mode
        )));
    }
    let end = offset
        .checked_add(size)
        .ok_or_else(|| einval("DMA_MAP offset + size wraps"))?;
    let len = u64::try_from(st.st_size).unwrap_or(0);
    if len < end {
        return Err(einval(format!(
            "DMA_MAP of {size:#x} bytes at offset {offset:#x} of a file of {len:#x} bytes"
        )));
    }
    // SAFETY: F_GETFL on a descriptor we own; no pointer involved.
    let fl = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if fl < 0 {
        return Err(Error::last_os_error("F_GETFL of the DMA_MAP file"));
    }
    let mode = fl & libc::O_ACCMODE;
    if mode == libc::O_WRONLY || (writable && mode == libc::O_RDONLY) {
        return Err(Error::Refused {
            context: "DMA_MAP file is not open for the access the map asks".into(),
            errno: libc::EACCES,
        });
    }
    // SAFETY: F_GET_SEALS on a descriptor we own; files without seals
    // (not shmem) fail with EINVAL, which means "not sealed".
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    Ok(seals > 0 && seals & libc::F_SEAL_SHRINK != 0)
}

/// One client connection.
struct Session<'a> {
    stream: &'a UnixStream,
    link: Arc<Link>,
    device: &'a dyn Vfio,
    options: ServerOptions,
    negotiated: bool,
    client_caps: Capabilities,
    dma: BTreeMap<u64, DmaRange>,
    irq_indices: BTreeSet<u32>,
    /// The last reply's payload buffer, reused by the next region access
    /// so that a steady stream of them allocates nothing.
    reply_spare: Vec<u8>,
    /// The migration data stream the last state change opened.
    mig: Option<Box<dyn MigrationStream>>,
}

/// What a handler answers: payload parts and at most one fd.
type Reply = (Vec<u8>, Option<OwnedFd>);

fn errno_of(e: &Error) -> i32 {
    match e.errno() {
        Some(0) | None => libc::EIO,
        Some(n) => n,
    }
}

/// Buffers up to this capacity are kept for the next message; a rare big
/// one is freed rather than held for the life of the connection.
const SPARE_CAPACITY: usize = 64 * 1024;

fn recycle(buf: Vec<u8>) -> Vec<u8> {
    if buf.capacity() <= SPARE_CAPACITY {
        buf
    } else {
        Vec::new()
    }
}

fn einval(what: impl Into<String>) -> Error {
    Error::InvalidArgument(what.into())
}

impl Session<'_> {
    fn handle(&mut self, m: &mut Message) -> Result<Reply> {
        let h = m.header;
        if m.fds_dropped {
            return Err(einval(format!(
                "more than {} file descriptors in one message",
                self.options.max_msg_fds
            )));
        }
        if !self.negotiated && h.command != command::VERSION {
            return Err(einval("the first message must be VERSION"));
        }
        let takes_fds = matches!(h.command, command::DMA_MAP | command::DEVICE_SET_IRQS);
        if !takes_fds && !m.fds.is_empty() {
            return Err(einval(format!(
                "{} carries unexpected file descriptors",
                command_name(h.command)
            )));
        }
        match h.command {
            command::VERSION => self.version(&m.payload),
            command::DMA_MAP => self.dma_map(&m.payload, &mut m.fds),
            command::DMA_UNMAP => self.dma_unmap(&m.payload),
            command::DEVICE_GET_INFO => self.device_info(&m.payload),
            command::DEVICE_GET_REGION_INFO => self.region_info(&m.payload),
            command::DEVICE_GET_IRQ_INFO => self.irq_info(&m.payload),
            command::DEVICE_SET_IRQS => self.set_irqs(&m.payload, &m.fds),
            command::REGION_READ => self.region_read(&m.payload),
            command::REGION_WRITE => self.region_write(&m.payload),
            command::DEVICE_RESET => {
                // A reset returns the device to RUNNING: its stream ends.
                self.mig = None;
                self.device.reset().map(|()| (Vec::new(), None))
            }
            command::DEVICE_FEATURE => self.device_feature(&m.payload),
            command::MIG_DATA_READ => self.mig_data_read(&m.payload),
            command::MIG_DATA_WRITE => self.mig_data_write(&m.payload),
            other => Err(Error::Unsupported(format!(
                "command {other} ({})",
                command_name(other)
            ))),
        }
    }

    fn version(&mut self, payload: &[u8]) -> Result<Reply> {
        if self.negotiated {
            return Err(einval("VERSION was already negotiated"));
        }
        let (major, minor, caps) = protocol::decode_version(payload)
            .map_err(|e| einval(format!("VERSION payload: {e}")))?;
        if major != protocol::VERSION_MAJOR {
            return Err(Error::Unsupported(format!(
                "protocol major version {major}"
            )));
        }
        self.client_caps = caps;
        self.negotiated = true;
        let migratable = matches!(self.device.migration_flags(), Ok(Some(_)));
        Ok((version_reply(&self.options, minor, migratable), None))
    }

    fn dma_map(&mut self, payload: &[u8], fds: &mut Vec<OwnedFd>) -> Result<Reply> {
        if payload.len() != DmaMapPayload::SIZE {
            return Err(einval("DMA_MAP payload must be 32 bytes"));
        }
        let req = DmaMapPayload::decode(payload)?;
        if fds.len() > 1 {
            return Err(einval("DMA_MAP with more than one file descriptor"));
        }
        let end = req
            .address
            .checked_add(req.size)
            .filter(|_| req.size > 0)
            .ok_or_else(|| einval("DMA_MAP range is empty or wraps"))?;
        let overlaps = self
            .dma
            .range(..end)
            .next_back()
            .is_some_and(|(&iova, r)| iova.saturating_add(r.size) > req.address);
        if overlaps {
            return Err(Error::Refused {
                context: "DMA_MAP over an existing mapping".into(),
                errno: libc::EEXIST,
            });
        }
        if self.dma.len() >= self.options.max_dma_maps as usize {
            return Err(Error::Refused {
                context: "DMA_MAP: too many mappings".into(),
                errno: libc::ENOSPC,
            });
        }
        if req.flags & !(dma_flags::READ | dma_flags::WRITE) != 0 {
            return Err(einval(format!("DMA_MAP flags {:#x}", req.flags)));
        }
        if req.flags & dma_flags::READ == 0 {
            return Err(einval("DMA_MAP without the readable flag"));
        }
        let read_only = req.flags & dma_flags::WRITE == 0;
        let Some(fd) = fds.pop() else {
            // Memory the client cannot share: reached by DMA_READ/WRITE.
            let chunk = self
                .client_caps
                .max_data_xfer_size
                .min(self.options.max_data_xfer_size)
                .max(1);
            let remote = Arc::new(ClientDma {
                link: Arc::clone(&self.link),
                chunk: u64::from(chunk),
                timeout: self.options.dma_timeout,
            });
            self.device
                .iommu_domain()
                .map_remote(req.address, req.size, read_only, remote)?;
            self.dma.insert(
                req.address,
                DmaRange {
                    size: req.size,
                    _mapping: None,
                },
            );
            return Ok((Vec::new(), None));
        };
        let sealed = check_dma_file(fd.as_fd(), req.offset, req.size, !read_only)?;
        let mapping = if sealed {
            let mut prot = libc::PROT_READ;
            if !read_only {
                prot |= libc::PROT_WRITE;
            }
            Some(Mapping::map_fd(fd.as_fd(), req.offset, req.size, prot)?)
        } else {
            None
        };
        let source = DmaSource {
            host_addr: mapping.as_ref().map_or(0, |m| m.as_ptr() as u64),
            file: Some(DmaFile {
                fd: fd.as_fd(),
                offset: req.offset,
            }),
            read_only,
        };
        // SAFETY: `host_addr` is 0 (file I/O only) or our own mapping of
        // the client's file, sealed against shrinking so it stays backed at
        // its size; the mapping is kept in `self.dma` until the domain's
        // unmap of the range returned (here or in `cleanup`), and nothing
        // in this process holds a reference into it. The client gave the
        // file for the device to read and write.
        unsafe {
            self.device
                .iommu_domain()
                .map(req.address, req.size, source)?;
        }
        self.dma.insert(
            req.address,
            DmaRange {
                size: req.size,
                _mapping: mapping,
            },
        );
        Ok((Vec::new(), None))
    }

    fn dma_unmap(&mut self, payload: &[u8]) -> Result<Reply> {
        if payload.len() != DmaUnmapPayload::SIZE {
            return Err(einval("DMA_UNMAP payload must be 24 bytes"));
        }
        let req = DmaUnmapPayload::decode(payload)?;
        if req.flags != 0 {
            return Err(Error::Unsupported(format!(
                "DMA_UNMAP flags {:#x}",
                req.flags
            )));
        }
        match self.dma.get(&req.address) {
            Some(r) if r.size == req.size => {}
            _ => return Err(einval("DMA_UNMAP does not match a mapping")),
        }
        self.device.iommu_domain().unmap(req.address, req.size)?;
        // The device let go of the range: now unmap it here.
        self.dma.remove(&req.address);
        Ok((req.encode().to_vec(), None))
    }

    fn device_info(&self, payload: &[u8]) -> Result<Reply> {
        if payload.len() < DeviceInfoPayload::SIZE {
            return Err(einval("DEVICE_GET_INFO payload too short"));
        }
        let info = self.device.device_info()?;
        let reply = DeviceInfoPayload {
            argsz: DeviceInfoPayload::SIZE as u32,
            flags: info.flags,
            num_regions: info.num_regions,
            num_irqs: info.num_irqs,
        };
        Ok((reply.encode().to_vec(), None))
    }

    fn region_info(&self, payload: &[u8]) -> Result<Reply> {
        if payload.len() < RegionInfoPayload::SIZE {
            return Err(einval("DEVICE_GET_REGION_INFO payload too short"));
        }
        let req = RegionInfoPayload::decode(payload)?;
        let mut info = self.device.region_info(req.index)?;
        info.index = req.index;
        let shared = if info.mmappable() {
            self.device.region_mmap_fd(req.index)
        } else {
            None
        };
        let (fd, offset) = match shared {
            Some((fd, offset)) => (
                Some(
                    fd.try_clone_to_owned()
                        .map_err(|e| Error::io("dup a region fd", e))?,
                ),
                offset,
            ),
            None => {
                // The client cannot mmap what we cannot share.
                info.flags &= !crate::region_flags::MMAP;
                (None, 0)
            }
        };
        let bytes = protocol::encode_region_info(&info, offset, req.argsz);
        Ok((bytes, fd))
    }

    fn irq_info(&self, payload: &[u8]) -> Result<Reply> {
        if payload.len() < IrqInfoPayload::SIZE {
            return Err(einval("DEVICE_GET_IRQ_INFO payload too short"));
        }
        let req = IrqInfoPayload::decode(payload)?;
        let info = self.device.irq_info(req.index)?;
        let reply = IrqInfoPayload {
            argsz: IrqInfoPayload::SIZE as u32,
            flags: info.flags,
            index: req.index,
            count: info.count,
        };
        Ok((reply.encode().to_vec(), None))
    }

    fn set_irqs(&mut self, payload: &[u8], fds: &[OwnedFd]) -> Result<Reply> {
        let req = SetIrqsPayload::decode(payload)?;
        let data = req.flags & irq_set::DATA_MASK;
        let action = req.flags & irq_set::ACTION_MASK_ALL;
        if req.flags & !(irq_set::DATA_MASK | irq_set::ACTION_MASK_ALL) != 0
            || data.count_ones() != 1
            || action.count_ones() != 1
        {
            return Err(einval(format!("DEVICE_SET_IRQS flags {:#x}", req.flags)));
        }
        if data != irq_set::DATA_BOOL && payload.len() != SetIrqsPayload::SIZE {
            return Err(einval("DEVICE_SET_IRQS payload must be 20 bytes"));
        }
        if data != irq_set::DATA_EVENTFD && !fds.is_empty() {
            return Err(einval("DEVICE_SET_IRQS carries fds without DATA_EVENTFD"));
        }
        if req.count > MAX_IRQ_COUNT {
            return Err(einval(format!("DEVICE_SET_IRQS count {}", req.count)));
        }
        // Every fd of the message is an eventfd, checked before the device
        // gets any of them (a pipe, or any fd a write can block on, would
        // let the client wedge the device while it signals). They are made
        // non-blocking too, so that a counter the client filled up cannot
        // block a signal either (see `crate::eventfd`).
        for fd in fds {
            crate::eventfd::check_eventfd(fd.as_fd())?;
        }
        for fd in fds {
            crate::eventfd::set_nonblocking(fd.as_fd())?;
        }
        let d = self.device;
        match (data, action) {
            (irq_set::DATA_NONE, irq_set::ACTION_TRIGGER) if req.count == 0 => {
                d.disable_irqs(req.index)?;
                self.irq_indices.remove(&req.index);
            }
            (irq_set::DATA_EVENTFD, irq_set::ACTION_TRIGGER) => {
                let count = req.count as usize;
                let list: Vec<Option<BorrowedFd<'_>>> = if fds.is_empty() {
                    vec![None; count]
                } else if fds.len() == count {
                    fds.iter().map(|f| Some(f.as_fd())).collect()
                } else {
                    return Err(einval(format!(
                        "DEVICE_SET_IRQS count {} with {} file descriptors",
                        req.count,
                        fds.len()
                    )));
                };
                d.set_irq_eventfds(req.index, req.start, &list)?;
                // Enabled, with or without fds: disabled when the client goes.
                self.irq_indices.insert(req.index);
            }
            (irq_set::DATA_NONE, irq_set::ACTION_UNMASK) if req.count == 1 && req.start == 0 => {
                d.unmask_irq(req.index)?;
            }
            (irq_set::DATA_NONE, irq_set::ACTION_MASK) if req.count == 1 && req.start == 0 => {
                d.mask_irq(req.index)?;
            }
            (irq_set::DATA_EVENTFD, irq_set::ACTION_UNMASK)
                if req.count == 1 && req.start == 0 && fds.len() <= 1 =>
            {
                d.set_irq_unmask_eventfd(req.index, fds.first().map(|f| f.as_fd()))?;
                if !fds.is_empty() {
                    self.irq_indices.insert(req.index);
                }
            }
            _ => {
                return Err(Error::Unsupported(format!(
                    "DEVICE_SET_IRQS flags {:#x} start {} count {}",
                    req.flags, req.start, req.count
                )))
            }
        }
        Ok((Vec::new(), None))
    }

    /// An empty buffer for a reply payload: the last reply's, when it was kept.
    fn reply_buffer(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.reply_spare);
        out.clear();
        out
    }

    fn region_read(&mut self, payload: &[u8]) -> Result<Reply> {
        if payload.len() != RegionAccessPayload::SIZE {
            return Err(einval("REGION_READ payload must be 16 bytes"));
        }
        let req = RegionAccessPayload::decode(payload)?;
        if req.count > self.options.max_data_xfer_size {
            return Err(einval(format!(
                "REGION_READ of {} bytes exceeds max_data_xfer_size",
                req.count
            )));
        }
        let mut out = self.reply_buffer();
        out.resize(RegionAccessPayload::SIZE + req.count as usize, 0);
        let (head, data) = out.split_at_mut(RegionAccessPayload::SIZE);
        self.device.region_read(req.region, req.offset, data)?;
        head.copy_from_slice(&req.encode());
        Ok((out, None))
    }

    fn region_write(&mut self, payload: &[u8]) -> Result<Reply> {
        let req = RegionAccessPayload::decode(payload)?;
        let data = payload.get(RegionAccessPayload::SIZE..).unwrap_or(&[]);
        if data.len() != req.count as usize {
            return Err(einval(format!(
                "REGION_WRITE count {} with {} data bytes",
                req.count,
                data.len()
            )));
        }
        if req.count > self.options.max_data_xfer_size {
            return Err(einval("REGION_WRITE exceeds max_data_xfer_size"));
        }
        self.device.region_write(req.region, req.offset, data)?;
        let mut out = self.reply_buffer();
        out.extend_from_slice(&req.encode());
        Ok((out, None))
    }

    /// What the spec asks of a server when its client goes away: unmap the
    /// client's memory and close its interrupt fds; keep the device state.
    /// A migration data stream ends with the connection.
    fn cleanup(&mut self) {
        self.mig = None;
        let domain = self.device.iommu_domain();
        for (iova, r) in std::mem::take(&mut self.dma) {
            if let Err(e) = domain.unmap(iova, r.size) {
                // The device may still reach the range: keep our mapping of
                // the client's file (leak it) rather than unmap memory a
                // DMA may touch.
                log::warn!("vfio-user server: DMA unmap of {iova:#x} on disconnect: {e}");
                std::mem::forget(r);
            }
        }
        for index in std::mem::take(&mut self.irq_indices) {
            if let Err(e) = self.device.disable_irqs(index) {
                log::warn!("vfio-user server: disable_irqs({index}) on disconnect: {e}");
            }
            if let Err(e) = self.device.set_irq_unmask_eventfd(index, None) {
                log::debug!("vfio-user server: unmask eventfd of {index} on disconnect: {e}");
            }
        }
    }

    /// Answers one request; `Ok(false)` when the connection must close.
    fn serve_one(&mut self, mut m: Message, spare: &mut Vec<u8>) -> Result<bool> {
        let h = m.header;
        if h.is_reply() {
            // A reply to one of the device's DMA requests.
            self.link.deliver(m);
            return Ok(true);
        }
        if !h.is_command() {
            log::warn!(
                "vfio-user server: dropping unexpected message type {:#x} ({})",
                h.flags,
                command_name(h.command)
            );
            *spare = recycle(std::mem::take(&mut m.payload));
            return Ok(true);
        }
        let result = self.handle(&mut m);
        *spare = recycle(std::mem::take(&mut m.payload));
        drop(m);
        let sent = match result {
            Ok(_) if h.no_reply() => Ok(()),
            Ok((payload, fd)) => {
                let rh = Header::reply(&h, payload.len())?;
                let fds: Vec<BorrowedFd<'_>> = fd.iter().map(|f| f.as_fd()).collect();
                let sent = self.link.send(&rh, &[&payload], &fds);
                self.reply_spare = recycle(payload);
                sent
            }
            Err(e) => {
                let errno = errno_of(&e);
                log::debug!(
                    "vfio-user server: {} (id {}) failed with errno {errno} ({}){}: {e}",
                    command_name(h.command),
                    h.id,
                    std::io::Error::from_raw_os_error(errno),
                    if h.no_reply() {
                        " (no reply asked)"
                    } else {
                        ", error reply sent"
                    },
                );
                if h.no_reply() {
                    Ok(())
                } else {
                    let rh = Header::error_reply(&h, errno);
                    self.link.send(&rh, &[], &[])
                }
            }
        };
        match sent {
            Ok(()) => {}
            Err(Error::Disconnected(_)) => return Ok(false),
            Err(Error::Timeout { .. }) => {
                return Err(Error::Protocol(format!(
                    "the client read no reply for {:?}; dropped",
                    self.options.stall_timeout
                )))
            }
            Err(e) => return Err(e),
        }
        if h.command == command::VERSION && !self.negotiated {
            // The spec: close the connection on a version we cannot serve.
            return Err(Error::Protocol("version negotiation failed".into()));
        }
        Ok(true)
    }

    fn run(&mut self) -> Result<()> {
        let max_message = HEADER_SIZE
            .saturating_add(64 * 1024)
            .saturating_add(self.options.max_data_xfer_size as usize);
        let max_fds = self.options.max_msg_fds as usize;
        let stall = self.options.stall_timeout.max(Duration::from_millis(1));
        // A reply the client does not read is bounded like a stalled request.
        self.stream
            .set_write_timeout(Some(stall))
            .map_err(|e| Error::io("set the vfio-user send timeout", e))?;
        // One buffered reader for the connection: usually one recvmsg per
        // request instead of one for the header and one for the payload.
        let mut reader = protocol::MessageReader::new(max_message, max_fds);
        // The last request's payload buffer, handed back to the reader.
        let mut request_spare = Vec::new();
        let connected = Instant::now();
        // When the message being received began (None between messages).
        let mut started: Option<Instant> = None;
        // The socket's receive timeout as last set (None: block).
        let mut read_timeout: Option<Duration> = None;
        loop {
            while let Some(m) = reader.next_message(|| std::mem::take(&mut request_spare))? {
                started = None;
                if !self.serve_one(m, &mut request_spare)? {
                    return Ok(());
                }
            }
            let now = Instant::now();
            if reader.is_idle() {
                started = None;
            } else if started.is_none() {
                started = Some(now);
            }
            // What the client must complete, and by when.
            let version_due = (!self.negotiated).then(|| (connected + stall, "VERSION"));
            let message_due = started.map(|t| (t + stall, "the message it started"));
            let due = match (version_due, message_due) {
                (Some(a), Some(b)) => Some(if b.0 < a.0 { b } else { a }),
                (a, b) => a.or(b),
            };
            // Block in one recvmsg per request: no poll in front of it. A deadline is the
            // socket's receive timeout, set only when it changes (none while a negotiated
            // client is idle). A stop shuts the socket down, which ends the receive; other
            // clients are turned away by `refuse_while_serving` on its own thread.
            let timeout = match due {
                Some((deadline, what)) => {
                    if now >= deadline {
                        return Err(Error::Protocol(format!(
                            "the client did not complete {what} within {stall:?}; dropped"
                        )));
                    }
                    // Rounded up, so that the wait ends past the deadline.
                    Some(
                        deadline
                            .saturating_duration_since(now)
                            .saturating_add(Duration::from_millis(1)),
                    )
                }
                None => None,
            };
            if timeout != read_timeout {
                self.stream
                    .set_read_timeout(timeout)
                    .map_err(|e| Error::io("set the vfio-user receive timeout", e))?;
                read_timeout = timeout;
            }
            match reader.recv(self.stream.as_fd(), false) {
                // WouldBlock: the receive timeout expired; the deadlines are checked above.
                Ok(Received::Data(_) | Received::WouldBlock) => {}
                // Closed between messages, or mid-message, or shut down by a stop: either
                // way this connection is over.
                Ok(Received::Closed) | Err(Error::Disconnected(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

/// What woke the refusing loop.
enum Woken {
    /// The session it guards ended (or the server is stopping).
    Stop,
    /// Another client is knocking.
    Listener,
    /// Nothing: a refused client's time ran out, or one sent its header.
    Timeout,
}

/// How long the end of a session waits for the thread that turns other
/// clients away to stop (it wakes at once; the bound is for a wedged poll).
const STOP_REFUSING: Duration = Duration::from_secs(1);

/// The most clients waiting for their "busy" answer at once; more are
/// closed without one.
const MAX_REFUSED: usize = 4;

/// How long a refused client is given to send the header of its first
/// message (its VERSION), to be answered `EBUSY`, before it is closed.
const REFUSE_WAIT: Duration = Duration::from_secs(1);

/// A client turned away while another is served, waiting for the header
/// of its first message.
struct Refused {
    stream: UnixStream,
    until: Instant,
    header: [u8; HEADER_SIZE],
    have: usize,
}

impl Refused {
    /// Reads what arrived (non-blocking); answers the first message with
    /// an `EBUSY` error once its header is complete. Returns whether it is
    /// still waiting.
    fn advance(&mut self) -> bool {
        let Some(rest) = self.header.get_mut(self.have..) else {
            return false;
        };
        match std::io::Read::read(&mut &self.stream, rest) {
            Ok(0) => return false,
            Ok(n) => self.have = self.have.saturating_add(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
        if self.have < HEADER_SIZE {
            return true;
        }
        if let Ok(h) = Header::decode(&self.header) {
            if h.is_command() && !h.no_reply() {
                let rh = Header::error_reply(&h, libc::EBUSY);
                log::debug!(
                    "vfio-user server: {} (id {}) of a refused client: error reply with errno {} (busy: one client at a time)",
                    command_name(h.command),
                    h.id,
                    libc::EBUSY
                );
                let _ = protocol::write_message(self.stream.as_fd(), &rh, &[], &[]);
            }
        }
        // Take what else it sent (a little, without waiting), so that closing
        // does not reset the connection before the client read our answer.
        let mut sink = [0u8; 1024];
        for _ in 0..64 {
            if !matches!(std::io::Read::read(&mut &self.stream, &mut sink), Ok(n) if n > 0) {
                break;
            }
        }
        false
    }
}

/// What the refusing loop watches while a client is served: the listener,
/// so that other clients are turned away at once rather than left in the
/// backlog, and an eventfd that says the session is over.
struct Watch<'a> {
    listener: &'a UnixListener,
    /// Readable once the session is over.
    stop: BorrowedFd<'a>,
    /// Clients turned away, until their first header came or their time ran out.
    refused: Vec<Refused>,
}

impl<'a> Watch<'a> {
    fn new(listener: &'a UnixListener, stop: BorrowedFd<'a>) -> Watch<'a> {
        Watch {
            listener,
            stop,
            refused: Vec::with_capacity(MAX_REFUSED),
        }
    }

    /// Waits until the listener or the stop fd is readable, or `timeout_ms`
    /// (-1: no timeout) passes; tends refused clients meanwhile.
    fn wait(&mut self, timeout_ms: i32) -> Result<Woken> {
        let pollfd = |fd: i32| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // A negative fd is ignored by poll.
        let mut pfds = [pollfd(-1); 2 + MAX_REFUSED];
        let fixed = [self.stop.as_raw_fd(), self.listener.as_raw_fd()];
        let refused = self.refused.iter().map(|r| r.stream.as_raw_fd());
        for (p, fd) in pfds.iter_mut().zip(fixed.into_iter().chain(refused)) {
            p.fd = fd;
        }
        // Wake for the first refused client whose time runs out.
        let now = Instant::now();
        let timeout_ms = self
            .refused
            .iter()
            .map(|r| {
                let left = r.until.saturating_duration_since(now).as_millis();
                i32::try_from(left.saturating_add(1)).unwrap_or(i32::MAX)
            })
            .fold(timeout_ms, |t, r| if t < 0 { r } else { t.min(r) });
        loop {
            // SAFETY: pollfds that live across the call; the count is the
            // array's length.
            let n =
                unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
            if n >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io("poll the vfio-user socket", e));
            }
        }
        let now = Instant::now();
        let mut i = 0usize;
        self.refused.retain_mut(|r| {
            let ready = pfds.get(2 + i).is_some_and(|p| p.revents != 0);
            i += 1;
            (!ready || r.advance()) && now < r.until
        });
        let [stop, listener, ..] = pfds;
        Ok(if stop.revents != 0 {
            Woken::Stop
        } else if listener.revents != 0 {
            Woken::Listener
        } else {
            Woken::Timeout
        })
    }

    /// Accepts every client waiting on the listener and turns it away: one
    /// client at a time is served, and the others learn it now rather than
    /// hang in the backlog. A refused client's first request (its VERSION)
    /// is answered with `EBUSY` if its header comes within [`REFUSE_WAIT`];
    /// then, or past that, it is closed.
    fn refuse_others(&mut self, served_gone: &dyn Fn() -> bool) -> Option<UnixStream> {
        let listener = self.listener;
        // The listener is non-blocking (see `accept_loop`).
        while let Ok((other, _)) = listener.accept() {
            // The client being served hung up already (the session is ending): this one
            // is next, not refused.
            if served_gone() {
                return Some(other);
            }
            log::warn!(
                "vfio-user server: refused a second client: one client at a time is served and one is connected"
            );
            if self.refused.len() < MAX_REFUSED && other.set_nonblocking(true).is_ok() {
                self.refused.push(Refused {
                    stream: other,
                    until: Instant::now() + REFUSE_WAIT,
                    header: [0; HEADER_SIZE],
                    have: 0,
                });
            } else {
                let _ = other.shutdown(std::net::Shutdown::Both);
            }
        }
        None
    }
}

/// Whether the peer of the stream `fd` hung up (closed or shut down its side).
fn peer_hung_up(fd: BorrowedFd<'_>) -> bool {
    poll_now(fd, libc::POLLRDHUP) & (libc::POLLRDHUP | libc::POLLHUP) != 0
}

/// Turns away the clients that connect to `listener` until `done` is
/// readable (the session being served ended): on its own thread, so that
/// the serving thread blocks in its client's receive alone. A client that
/// connects once the served one (`served`) has hung up is not turned away
/// but returned, to be served next.
fn refuse_while_serving(
    listener: &UnixListener,
    done: BorrowedFd<'_>,
    served: BorrowedFd<'_>,
) -> Option<UnixStream> {
    let mut watch = Watch::new(listener, done);
    loop {
        match watch.wait(-1) {
            Ok(Woken::Stop) => return None,
            Ok(Woken::Listener) => {
                if let Some(next) = watch.refuse_others(&|| peer_hung_up(served)) {
                    return Some(next);
                }
            }
            Ok(Woken::Timeout) => {}
            Err(e) => {
                log::warn!("vfio-user server: watching for other clients: {e}");
                return None;
            }
        }
    }
}

/// The VERSION reply: the minor version both sides speak and what we offer.
fn version_reply(options: &ServerOptions, client_minor: u16, migratable: bool) -> Vec<u8> {
    let ours = Capabilities {
        max_msg_fds: options.max_msg_fds,
        max_data_xfer_size: options.max_data_xfer_size,
        max_dma_maps: options.max_dma_maps,
        migration_pgsize: migratable.then_some(protocol::MIGRATION_PGSIZE),
        migration_max_bitmap_size: migratable.then_some(u64::from(options.max_data_xfer_size)),
        ..Capabilities::default()
    };
    protocol::encode_version(
        protocol::VERSION_MAJOR,
        client_minor.min(protocol::VERSION_MINOR),
        &ours,
    )
}

/// Serves one client connection until it closes, with default options.
/// On return the client's DMA mappings are unmapped and the interrupts it
/// wired are disabled.
pub fn serve_connection(stream: UnixStream, device: Arc<dyn Vfio>) -> Result<()> {
    serve_connection_with_options(stream, device, ServerOptions::default())
}

/// Serves one client connection until it closes, or until it stalls for
/// longer than [`ServerOptions::stall_timeout`] (see the module docs).
pub fn serve_connection_with_options(
    stream: UnixStream,
    device: Arc<dyn Vfio>,
    options: ServerOptions,
) -> Result<()> {
    serve_stream(stream, device.as_ref(), options, &mut || {})
}

/// Serves `stream`; `on_end` runs as soon as the session is over, before the
/// client can see it end (its socket is still open then).
fn serve_stream(
    stream: UnixStream,
    device: &dyn Vfio,
    options: ServerOptions,
    on_end: &mut dyn FnMut(),
) -> Result<()> {
    let link = Arc::new(Link {
        stream: stream
            .try_clone()
            .map_err(|e| Error::io("clone the vfio-user client socket", e))?,
        send_lock: Mutex::new(()),
        pending: Mutex::new(Pending {
            next_id: 0,
            waiting: Vec::new(),
            closed: false,
        }),
        replied: Condvar::new(),
        reader: std::thread::current().id(),
    });
    let mut session = Session {
        stream: &stream,
        link: Arc::clone(&link),
        device,
        options,
        negotiated: false,
        client_caps: Capabilities::default(),
        dma: BTreeMap::new(),
        irq_indices: BTreeSet::new(),
        reply_spare: Vec::new(),
        mig: None,
    };
    let result = session.run();
    on_end();
    log::debug!(
        "vfio-user server: client (max_msg_fds {}) left",
        session.client_caps.max_msg_fds
    );
    // DMA requests still waiting fail now rather than at their timeout.
    link.close();
    session.cleanup();
    result
}

/// Whether the peer of `stream` runs as our effective user.
fn peer_is_owner(stream: &UnixStream) -> bool {
    // SAFETY: ucred is plain data; all-zero is valid.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is
    // that big, for a socket fd we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    rc == 0 && cred.uid == me
}

/// Serves clients of `listener` one after the other, forever (until
/// `accept` fails), with default options. Clients running as another user
/// are turned away; so is a client that connects while another is served
/// (see the module docs). Makes `listener` non-blocking.
pub fn serve(listener: &UnixListener, device: Arc<dyn Vfio>) -> Result<()> {
    accept_loop(
        listener,
        device.as_ref(),
        ServerOptions::default(),
        None,
        &Mutex::new(None),
    )
}

/// Whether `fd` is readable right now (a signalled eventfd), without waiting.
fn readable_now(fd: BorrowedFd<'_>) -> bool {
    poll_now(fd, libc::POLLIN) != 0
}

/// The events of `events` (and errors or hang-ups) `fd` has right now,
/// without waiting; 0 when none or when `poll` fails.
fn poll_now(fd: BorrowedFd<'_>, events: i16) -> i16 {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call; a zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n == 1 {
        p.revents
    } else {
        0
    }
}

/// An eventfd's descriptor, borrowed for as long as the eventfd lives.
fn borrow_eventfd(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: `e` owns an open descriptor that stays open while it is
    // borrowed, and the returned lifetime is tied to that borrow.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

/// Waits until `listener` or `stop` is readable (no timeout: a stop wakes it).
fn wait_for_client(listener: &UnixListener, stop: Option<BorrowedFd<'_>>) -> Result<bool> {
    let mut pfds = [
        libc::pollfd {
            fd: stop.map_or(-1, |f| f.as_raw_fd()),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: two pollfds that live across the call; the count matches.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            return Ok(pfds[0].revents == 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::io("poll the vfio-user listener", e));
        }
    }
}

/// Accepts and serves clients one at a time until `stop` is readable or
/// accepting fails. `current` holds a clone of the client being served, so
/// that a stop can shut it down.
fn accept_loop(
    listener: &UnixListener,
    device: &dyn Vfio,
    options: ServerOptions,
    stop: Option<BorrowedFd<'_>>,
    current: &Mutex<Option<UnixStream>>,
) -> Result<()> {
    // Non-blocking: a client that gave up between poll and accept does not
    // block the loop, and `refuse_others` empties the backlog.
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("make the vfio-user listener non-blocking", e))?;
    // A client that connected as the last session ended, handed over by its
    // refusing thread: served next.
    let mut next: Option<UnixStream> = None;
    loop {
        let stream = match next.take() {
            Some(s) => s,
            None => {
                if !wait_for_client(listener, stop)? {
                    return Ok(());
                }
                match listener.accept() {
                    Ok((s, _)) => s,
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                        ) =>
                    {
                        continue
                    }
                    Err(e) => return Err(Error::io("accept a vfio-user client", e)),
                }
            }
        };
        if !peer_is_owner(&stream) {
            log::warn!("vfio-user server: refused a client running as another user");
            continue;
        }
        let watched = stream
            .try_clone()
            .map_err(|e| Error::io("clone the vfio-user client socket", e))?;
        if let Ok(clone) = stream.try_clone() {
            *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(clone);
        }
        // A stop shuts `current` down, which ends the session's receive. One that came
        // before `current` was set is seen here.
        if stop.is_some_and(readable_now) {
            *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Ok(());
        }
        let done = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| Error::io("create the vfio-user session eventfd", e))?;
        let done = &done;
        let watched = &watched;
        let (stopped_tx, stopped) = std::sync::mpsc::channel::<Option<UnixStream>>();
        let handed = std::cell::RefCell::new(None);
        let r = std::thread::scope(|scope| {
            let refuser = std::thread::Builder::new()
                .name("vfio-user-refuse".into())
                .spawn_scoped(scope, move || {
                    let next =
                        refuse_while_serving(listener, borrow_eventfd(done), watched.as_fd());
                    let _ = stopped_tx.send(next);
                });
            if let Err(e) = &refuser {
                log::warn!("vfio-user server: no thread to turn other clients away: {e}");
            }
            // Once the session is over, and before its client can see that (and connect
            // again at once), the refusing thread stops: the next client is served.
            let mut end = || {
                if let Err(e) = done.write(1) {
                    log::error!("vfio-user server: ending the refusing thread: {e}");
                }
                if refuser.is_ok() {
                    match stopped.recv_timeout(STOP_REFUSING) {
                        Ok(next) => *handed.borrow_mut() = next,
                        Err(_) => {
                            log::warn!("vfio-user server: the refusing thread did not stop in time")
                        }
                    }
                }
            };
            serve_stream(stream, device, options, &mut end)
        });
        next = handed.into_inner();
        *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Err(e) = r {
            log::warn!("vfio-user server: connection ended with an error: {e}");
        }
    }
}

/// Binds a Unix socket at `path` that only its owner may use (mode 0600).
/// Fails if `path` exists.
pub fn bind_socket(path: impl AsRef<Path>) -> Result<UnixListener> {
    let path = path.as_ref();
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("bind vfio-user socket {}", path.display()), e))?;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        let _ = std::fs::remove_file(path);
        return Err(Error::io(
            format!("chmod 0600 vfio-user socket {}", path.display()),
            e,
        ));
    }
    Ok(listener)
}

/// A vfio-user server running in its own thread: serves one client at a
/// time until [`UserServer::shutdown`] or drop, which also removes the
/// socket file it created.
pub struct UserServer {
    /// Signalled (and left readable) to stop the thread.
    stop: EventFd,
    current: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for UserServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl UserServer {
    /// Binds `path` (mode 0600, see [`bind_socket`]) and serves `device` on it.
    pub fn bind(
        path: impl AsRef<Path>,
        device: Arc<dyn Vfio>,
        options: ServerOptions,
    ) -> Result<UserServer> {
        let listener = bind_socket(path.as_ref())?;
        let mut server = Self::spawn(listener, device, options)?;
        server.path = Some(path.as_ref().to_path_buf());
        Ok(server)
    }

    /// Serves `device` on an already bound listener (made non-blocking).
    pub fn spawn(
        listener: UnixListener,
        device: Arc<dyn Vfio>,
        options: ServerOptions,
    ) -> Result<UserServer> {
        let stop = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| Error::io("eventfd to stop the vfio-user server", e))?;
        let theirs = stop
            .try_clone()
            .map_err(|e| Error::io("clone the stop eventfd", e))?;
        let current: Arc<Mutex<Option<UnixStream>>> = Arc::new(Mutex::new(None));
        let t_current = Arc::clone(&current);
        let thread = std::thread::Builder::new()
            .name("vfio-user-server".into())
            .spawn(move || {
                let stop = theirs.as_raw_fd();
                // SAFETY: `theirs` owns the fd and lives until the end of
                // this closure, past every use of the borrow.
                let stop = unsafe { BorrowedFd::borrow_raw(stop) };
                if let Err(e) =
                    accept_loop(&listener, device.as_ref(), options, Some(stop), &t_current)
                {
                    log::warn!("vfio-user server: stopped: {e}");
                }
                drop(theirs);
            })
            .map_err(|e| Error::io("spawn the vfio-user server thread", e))?;
        Ok(UserServer {
            stop,
            current,
            thread: Some(thread),
            path: None,
        })
    }

    /// Stops serving: disconnects the current client and ends the thread.
    /// Returns once the thread ended; every wait of the thread ends on a
    /// stop (a reply being sent is cut short by shutting the socket down).
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Err(e) = self.stop.write(1) {
            log::error!("vfio-user server: signalling the stop eventfd: {e}");
        }
        if let Some(s) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("vfio-user server thread panicked");
            }
        }
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for UserServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Whether the data stream of `state` goes on in it.
fn keeps_stream(state: MigState) -> bool {
    matches!(
        state,
        MigState::StopCopy | MigState::PreCopy | MigState::PreCopyP2p | MigState::Resuming
    )
}

fn enotty(what: String) -> Error {
    Error::Refused {
        context: what,
        errno: libc::ENOTTY,
    }
}

impl Session<'_> {
    /// The most bytes of dirty bitmap one reply may carry: our
    /// `max_data_xfer_size`, and the client's `max_bitmap_size` when it
    /// announced one (else its `max_data_xfer_size`).
    fn max_bitmap_bytes(&self) -> u64 {
        let client = self
            .client_caps
            .migration_max_bitmap_size
            .unwrap_or(u64::from(self.client_caps.max_data_xfer_size));
        u64::from(self.options.max_data_xfer_size).min(client)
    }

    fn device_feature(&mut self, payload: &[u8]) -> Result<Reply> {
        let head = FeatureHeader::decode(payload)?;
        let data = payload.get(FeatureHeader::SIZE..).unwrap_or(&[]);
        let flags = head.flags;
        if flags & !feature::KNOWN != 0 {
            return Err(einval(format!("DEVICE_FEATURE flags {flags:#x}")));
        }
        let (get, set, probe) = (
            flags & feature::GET != 0,
            flags & feature::SET != 0,
            flags & feature::PROBE != 0,
        );
        if !probe && get == set {
            return Err(einval(format!(
                "DEVICE_FEATURE flags {flags:#x}: exactly one of GET and SET"
            )));
        }
        let index = flags & feature::MASK;
        // What each feature offers: (GET, SET).
        let (can_get, can_set) = match index {
            feature::MIGRATION => (true, false),
            feature::MIG_DEVICE_STATE => (true, true),
            feature::MIG_DATA_SIZE | feature::DMA_LOGGING_REPORT => (true, false),
            feature::DMA_LOGGING_START | feature::DMA_LOGGING_STOP => (false, true),
            other => return Err(enotty(format!("device feature {other}"))),
        };
        if (get && !can_get) || (set && !can_set) {
            return Err(einval(format!(
                "device feature {index} with flags {flags:#x}"
            )));
        }
        let logging = matches!(
            index,
            feature::DMA_LOGGING_START | feature::DMA_LOGGING_STOP | feature::DMA_LOGGING_REPORT
        );
        if probe {
            if !data.is_empty() {
                return Err(einval("DEVICE_FEATURE probe with data"));
            }
            let supported = if logging {
                // A report of nothing: refused as Unsupported by a device
                // that does not log, as invalid by one that does; it
                // changes no log either way.
                !matches!(
                    self.device.dma_logging_report(0, 0, 4096, &mut []),
                    Err(Error::Unsupported(_))
                )
            } else {
                self.device.migration_flags()?.is_some()
            };
            if !supported {
                return Err(enotty(format!("device feature {index}")));
            }
            return Ok((head.encode().to_vec(), None));
        }
        if !logging && index != feature::MIGRATION && self.device.migration_flags()?.is_none() {
            return Err(enotty(format!(
                "device feature {index}: the device cannot migrate"
            )));
        }
        let mut out = self.reply_buffer();
        match index {
            feature::MIGRATION => {
                if !data.is_empty() {
                    return Err(einval("MIGRATION GET with data"));
                }
                let flags = self
                    .device
                    .migration_flags()?
                    .ok_or_else(|| enotty("device feature 1: the device cannot migrate".into()))?;
                push_feature_head(&mut out, flags_of(head), 8);
                out.extend_from_slice(&flags.0.to_le_bytes());
            }
            feature::MIG_DEVICE_STATE if get => {
                if !data.is_empty() {
                    return Err(einval("MIG_DEVICE_STATE GET with data"));
                }
                let state = self.device.mig_state()?;
                push_feature_head(&mut out, flags_of(head), MigStatePayload::SIZE);
                out.extend_from_slice(
                    &MigStatePayload {
                        device_state: state.raw(),
                        data_fd: u32::MAX,
                    }
                    .encode(),
                );
            }
            feature::MIG_DEVICE_STATE => self.feature_set_mig_state(payload, data, &mut out)?,
            feature::MIG_DATA_SIZE => {
                if !data.is_empty() {
                    return Err(einval("MIG_DATA_SIZE GET with data"));
                }
                let size = self.device.mig_data_size()?;
                push_feature_head(&mut out, flags_of(head), 8);
                out.extend_from_slice(&size.to_le_bytes());
            }
            feature::DMA_LOGGING_START => {
                self.feature_dma_logging_start(payload, data, &mut out)?
            }
            feature::DMA_LOGGING_STOP => {
                if !data.is_empty() {
                    return Err(einval("DMA_LOGGING_STOP with data"));
                }
                self.device.dma_logging_stop()?;
                out.extend_from_slice(payload);
            }
            // DMA_LOGGING_REPORT (GET).
            _ => self.feature_dma_logging_report(head, data, &mut out)?,
        }
        Ok((out, None))
    }

    /// `MIG_DEVICE_STATE` SET: moves the device and keeps, opens or drops the migration
    /// stream as the new state says.
    fn feature_set_mig_state(
        &mut self,
        payload: &[u8],
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if data.len() != MigStatePayload::SIZE {
            return Err(einval(format!(
                "MIG_DEVICE_STATE SET with {} data bytes",
                data.len()
            )));
        }
        let req = MigStatePayload::decode(data)?;
        let state = MigState::from_raw(req.device_state)
            .ok_or_else(|| einval(format!("migration state {}", req.device_state)))?;
        let result = self.device.set_mig_state(state);
        match result {
            Ok(Some(stream)) => self.mig = Some(stream),
            Ok(None) if keeps_stream(state) => {}
            Ok(None) => self.mig = None,
            Err(e) => {
                // Where the failure left the device decides whether
                // its stream goes on.
                if !self.device.mig_state().is_ok_and(keeps_stream) {
                    self.mig = None;
                }
                return Err(e);
            }
        }
        out.extend_from_slice(payload);
        Ok(())
    }

    /// `DMA_LOGGING_START`: the ranges are counted and sized before any is decoded.
    fn feature_dma_logging_start(
        &mut self,
        payload: &[u8],
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        let ctl = DmaLoggingControl::decode(data)?;
        let n = ctl.num_ranges as usize;
        if n > protocol::MAX_DMA_LOGGING_RANGES {
            return Err(Error::Refused {
                context: format!(
                    "DMA_LOGGING_START with {n} ranges (at most {})",
                    protocol::MAX_DMA_LOGGING_RANGES
                ),
                errno: libc::E2BIG,
            });
        }
        let want = DmaLoggingControl::SIZE + n * DmaLoggingRange::SIZE;
        if data.len() != want {
            return Err(einval(format!(
                "DMA_LOGGING_START with {n} ranges in {} bytes",
                data.len()
            )));
        }
        let mut ranges = Vec::with_capacity(n);
        for raw in data
            .get(DmaLoggingControl::SIZE..)
            .unwrap_or(&[])
            .chunks_exact(DmaLoggingRange::SIZE)
        {
            let r = DmaLoggingRange::decode(raw)?;
            ranges.push(DirtyRange {
                iova: r.iova,
                length: r.length,
            });
        }
        self.device.dma_logging_start(ctl.page_size, &ranges)?;
        out.extend_from_slice(payload);
        Ok(())
    }

    /// `DMA_LOGGING_REPORT` (GET): the bitmap is bounded by the negotiated bitmap size and
    /// the client's `argsz` before it is allocated.
    fn feature_dma_logging_report(
        &mut self,
        head: FeatureHeader,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if data.len() != DmaLoggingReport::SIZE {
            return Err(einval(format!(
                "DMA_LOGGING_REPORT with {} data bytes",
                data.len()
            )));
        }
        let req = DmaLoggingReport::decode(data)?;
        let words = migration::bitmap_words(req.length, req.page_size)
            .filter(|_| req.length > 0)
            .ok_or_else(|| {
                einval(format!(
                    "DMA_LOGGING_REPORT of {:#x} bytes at page size {:#x}",
                    req.length, req.page_size
                ))
            })?;
        let bytes = (words as u64).saturating_mul(8);
        if bytes > self.max_bitmap_bytes() {
            return Err(einval(format!(
                "DMA_LOGGING_REPORT bitmap of {bytes} bytes (at most {})",
                self.max_bitmap_bytes()
            )));
        }
        let reply_len = (FeatureHeader::SIZE + DmaLoggingReport::SIZE) as u64 + bytes;
        if u64::from(head.argsz) < reply_len {
            return Err(einval(format!(
                "DMA_LOGGING_REPORT argsz {} for a reply of {reply_len} bytes",
                head.argsz
            )));
        }
        let mut bitmap = vec![0u64; words];
        self.device
            .dma_logging_report(req.iova, req.length, req.page_size, &mut bitmap)?;
        push_feature_head(out, flags_of(head), DmaLoggingReport::SIZE + words * 8);
        out.extend_from_slice(data);
        for w in bitmap {
            out.extend_from_slice(&w.to_le_bytes());
        }
        Ok(())
    }

    fn mig_data_read(&mut self, payload: &[u8]) -> Result<Reply> {
        if payload.len() != MigDataPayload::SIZE {
            return Err(einval("MIG_DATA_READ payload must be 8 bytes"));
        }
        let req = MigDataPayload::decode(payload)?;
        if req.size > self.options.max_data_xfer_size {
            return Err(einval(format!(
                "MIG_DATA_READ of {} bytes exceeds max_data_xfer_size",
                req.size
            )));
        }
        let mut out = self.reply_buffer();
        let stream = self
            .mig
            .as_mut()
            .ok_or_else(|| einval("MIG_DATA_READ without a saving migration stream"))?;
        out.resize(MigDataPayload::SIZE + req.size as usize, 0);
        let mut done = 0usize;
        while let Some(rest) = out.get_mut(MigDataPayload::SIZE + done..) {
            if rest.is_empty() {
                break;
            }
            match stream.read(rest) {
                Ok(0) => break,
                Ok(n) => done += n.min(rest.len()),
                // What was read is not lost: it goes out now, the error
                // comes again with the next read.
                Err(_) if done > 0 => break,
                Err(e) => return Err(e),
            }
        }
        out.truncate(MigDataPayload::SIZE + done);
        let head = MigDataPayload {
            argsz: (MigDataPayload::SIZE + done) as u32,
            size: done as u32,
        };
        if let Some(h) = out.get_mut(..MigDataPayload::SIZE) {
            h.copy_from_slice(&head.encode());
        }
        Ok((out, None))
    }

    fn mig_data_write(&mut self, payload: &[u8]) -> Result<Reply> {
        let req = MigDataPayload::decode(payload)?;
        let data = payload.get(MigDataPayload::SIZE..).unwrap_or(&[]);
        if data.len() != req.size as usize {
            return Err(einval(format!(
                "MIG_DATA_WRITE size {} with {} data bytes",
                req.size,
                data.len()
            )));
        }
        if req.size > self.options.max_data_xfer_size {
            return Err(einval("MIG_DATA_WRITE exceeds max_data_xfer_size"));
        }
        let stream = self
            .mig
            .as_mut()
            .ok_or_else(|| einval("MIG_DATA_WRITE without a resuming migration stream"))?;
        stream.write(data)?;
        Ok((Vec::new(), None))
    }
}

fn flags_of(head: FeatureHeader) -> u32 {
    head.flags
}

/// Appends a `DEVICE_FEATURE` reply head for `data_len` bytes of data.
fn push_feature_head(out: &mut Vec<u8>, flags: u32, data_len: usize) {
    let argsz = u32::try_from(FeatureHeader::SIZE + data_len).unwrap_or(u32::MAX);
    out.extend_from_slice(&FeatureHeader { argsz, flags }.encode());
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn version_reply_offers_what_every_known_client_accepts() {
        // QEMU 11.1 (hw/vfio-user) answers "malformed max_msg_fds" to more than 16.
        let reply = version_reply(&ServerOptions::default(), 0, false);
        let (major, minor, caps) = protocol::decode_version(&reply).unwrap();
        assert_eq!(
            (major, minor),
            (protocol::VERSION_MAJOR, 0),
            "QEMU proposes 0.0"
        );
        assert!(caps.max_msg_fds >= 1 && caps.max_msg_fds <= 16, "{caps:?}");
        assert_eq!(caps.max_msg_fds, DEFAULT_MAX_MSG_FDS);
        assert_eq!(caps.max_data_xfer_size, 1 << 20);
        assert_eq!(caps.max_dma_maps, 65535);
    }

    #[test]
    fn version_reply_never_offers_a_newer_minor_than_the_client_asked() {
        let reply = version_reply(&ServerOptions::default(), u16::MAX, false);
        let (_, minor, _) = protocol::decode_version(&reply).unwrap();
        assert_eq!(minor, protocol::VERSION_MINOR);
    }
}
