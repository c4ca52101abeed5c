//! [`UserDevice`]: a vfio-user client implementing [`crate::Vfio`].
//!
//! One reader thread receives every message from the server. Replies are
//! matched to the waiting caller by message id; each caller waits at most
//! its timeout. Commands from the server (`DMA_READ`, `DMA_WRITE`) are
//! answered by the reader thread itself from the DMA ranges the client
//! registered with a host address.
//!
//! Failure policy (the connection never hangs a caller):
//! - an error reply fails that request with [`Error::Refused`] (errno 0 is
//!   reported as `EIO`); the connection stays usable;
//! - no reply within the timeout fails that request with [`Error::Timeout`];
//!   a late reply to it is logged and dropped;
//! - end of stream or a reset connection fails every waiting and later
//!   request with [`Error::Disconnected`] at once;
//! - a protocol violation (a malformed or oversized message, too many file
//!   descriptors, a reply whose size or fields do not match the request, a
//!   reply to a message id that was never sent) poisons the connection:
//!   every waiting and later request fails with [`Error::Protocol`], and the
//!   socket is shut down.

use std::collections::{HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::protocol::{
    self, command, command_name, dma_flags, irq_set, Capabilities, DeviceInfoPayload,
    DmaAccessPayload, DmaMapPayload, DmaUnmapPayload, Header, IrqInfoPayload, Message,
    RegionAccessPayload, RegionInfoPayload, SetIrqsPayload, HEADER_SIZE,
};
use crate::{DeviceInfo, DmaSource, Error, IrqInfo, Mapping, RegionInfo, Result, SparseArea, Vfio};

/// The most regions and interrupt indices a server may announce.
pub const MAX_REGIONS: u32 = 256;
/// The largest region info reply we ask for (capabilities included).
const MAX_REGION_INFO_ARGSZ: u32 = 64 * 1024;
/// How many timed-out message ids we remember, to drop their late replies.
const TIMED_OUT_MEMORY: usize = 1024;

/// Options of a vfio-user connection.
#[derive(Clone, Copy, Debug)]
pub struct UserOptions {
    /// How long a request waits for its reply (and a send may block).
    pub timeout: Duration,
    /// How long `DEVICE_RESET` may take.
    pub reset_timeout: Duration,
    /// The most data bytes we accept in one message from the server (our
    /// `max_data_xfer_size` capability); transfers are also split at the
    /// server's own value.
    pub max_data_xfer_size: u32,
    /// The most file descriptors we accept in one message (our
    /// `max_msg_fds` capability).
    pub max_msg_fds: u32,
    /// Answer the server's `DMA_READ` / `DMA_WRITE` from the host addresses
    /// given to [`Vfio::dma_map`]. When false they are refused with `ENOTSUP`.
    pub serve_dma_messages: bool,
}

impl Default for UserOptions {
    fn default() -> Self {
        UserOptions {
            timeout: Duration::from_secs(5),
            reset_timeout: Duration::from_secs(30),
            max_data_xfer_size: 1 << 20,
            max_msg_fds: 8,
            serve_dma_messages: true,
        }
    }
}

/// Why the connection is unusable.
#[derive(Clone, Debug)]
enum Dead {
    Disconnected(String),
    Protocol(String),
    Closed,
}

impl Dead {
    fn to_error(&self) -> Error {
        match self {
            Dead::Disconnected(s) => Error::Disconnected(s.clone()),
            Dead::Protocol(s) => Error::Protocol(s.clone()),
            Dead::Closed => Error::Disconnected("the client was closed".into()),
        }
    }

    fn from_error(e: &Error) -> Dead {
        match e {
            Error::Protocol(s) => Dead::Protocol(s.clone()),
            other => Dead::Disconnected(other.to_string()),
        }
    }
}

struct Waiter {
    command: u16,
    tx: SyncSender<Result<Message>>,
}

struct State {
    next_id: u16,
    pending: HashMap<u16, Waiter>,
    timed_out: VecDeque<u16>,
    dead: Option<Dead>,
}

#[derive(Clone, Copy, Debug)]
struct DmaEntry {
    iova: u64,
    size: u64,
    host_addr: u64,
    read_only: bool,
}

/// What the reader thread and the callers share.
struct Shared {
    stream: UnixStream,
    send_lock: Mutex<()>,
    state: Mutex<State>,
    dma: Mutex<Vec<DmaEntry>>,
    options: UserOptions,
    /// The largest message we accept.
    max_message: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Marks the connection unusable (the first reason wins), fails every
    /// waiter and shuts the socket down so the reader thread ends.
    fn die(&self, reason: Dead) {
        let waiters: Vec<Waiter> = {
            let mut st = lock(&self.state);
            if st.dead.is_none() {
                match &reason {
                    Dead::Closed => {}
                    Dead::Disconnected(s) => log::warn!("vfio-user connection lost: {s}"),
                    Dead::Protocol(s) => log::error!("vfio-user protocol violation: {s}"),
                }
                st.dead = Some(reason);
            }
            st.pending.drain().map(|(_, w)| w).collect()
        };
        let dead = lock(&self.state).dead.clone().unwrap_or(Dead::Closed);
        for w in waiters {
            let _ = w.tx.try_send(Err(dead.to_error()));
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn send(&self, header: &Header, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Result<()> {
        let _guard = lock(&self.send_lock);
        protocol::write_message(self.stream.as_fd(), header, parts, fds).map_err(|e| match e {
            Error::Timeout { request, .. } => Error::Timeout {
                request,
                after: self.options.timeout,
            },
            other => other,
        })
    }

    /// Sends one command and waits for its reply. An error reply becomes
    /// [`Error::Refused`].
    fn request(
        &self,
        cmd: u16,
        parts: &[&[u8]],
        fds: &[BorrowedFd<'_>],
        timeout: Duration,
    ) -> Result<Message> {
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        let (tx, rx) = mpsc::sync_channel(1);
        let id = {
            let mut st = lock(&self.state);
            if let Some(d) = &st.dead {
                return Err(d.to_error());
            }
            let mut id = None;
            for _ in 0..=u16::MAX as u32 {
                let candidate = st.next_id;
                st.next_id = st.next_id.wrapping_add(1);
                if !st.pending.contains_key(&candidate) && !st.timed_out.contains(&candidate) {
                    id = Some(candidate);
                    break;
                }
            }
            let id = id
                .ok_or_else(|| Error::Unsupported("every vfio-user message id is in use".into()))?;
            st.pending.insert(id, Waiter { command: cmd, tx });
            id
        };
        let header = Header::command(id, cmd, payload_len)?;
        if let Err(e) = self.send(&header, parts, fds) {
            lock(&self.state).pending.remove(&id);
            // A message may have been half sent: the stream is unusable.
            self.die(Dead::from_error(&e));
            return Err(e);
        }
        let reply = match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(RecvTimeoutError::Timeout) => {
                let mut st = lock(&self.state);
                if st.pending.remove(&id).is_some() {
                    if st.timed_out.len() >= TIMED_OUT_MEMORY {
                        st.timed_out.pop_front();
                    }
                    st.timed_out.push_back(id);
                    return Err(Error::Timeout {
                        request: command_name(cmd),
                        after: timeout,
                    });
                }
                drop(st);
                // The reply raced with the timeout: it is in the channel.
                rx.try_recv()
                    .unwrap_or_else(|_| Err(Error::Disconnected("the reader thread ended".into())))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(Error::Disconnected("the reader thread ended".into()))
            }
        }?;
        if reply.header.is_error() {
            let errno = match reply.header.error {
                0 => libc::EIO,
                e => i32::try_from(e).unwrap_or(libc::EIO),
            };
            return Err(Error::Refused {
                context: format!("vfio-user {}", command_name(cmd)),
                errno,
            });
        }
        Ok(reply)
    }

    /// A protocol violation found by a caller in its reply: poison the
    /// connection and return the error.
    fn violation(&self, what: String) -> Error {
        self.die(Dead::Protocol(what.clone()));
        Error::Protocol(what)
    }

    /// Checks that a reply carries exactly `len` payload bytes and no fds.
    fn expect_plain(&self, m: &Message, len: usize) -> Result<()> {
        if !m.fds.is_empty() {
            return Err(self.violation(format!(
                "{} reply carries {} unexpected file descriptors",
                command_name(m.header.command),
                m.fds.len()
            )));
        }
        if m.payload.len() != len {
            return Err(self.violation(format!(
                "{} reply has {} payload bytes, expected {len}",
                command_name(m.header.command),
                m.payload.len()
            )));
        }
        Ok(())
    }

    /// Checks that a reply carries at least `len` payload bytes and no fds.
    fn expect_at_least(&self, m: &Message, len: usize) -> Result<()> {
        if m.payload.len() < len {
            return Err(self.violation(format!(
                "{} reply has {} payload bytes, expected at least {len}",
                command_name(m.header.command),
                m.payload.len()
            )));
        }
        if !m.fds.is_empty() {
            return Err(self.violation(format!(
                "{} reply carries {} unexpected file descriptors",
                command_name(m.header.command),
                m.fds.len()
            )));
        }
        Ok(())
    }

    fn region_info(&self, index: u32) -> Result<(RegionInfo, Option<OwnedFd>)> {
        let mut argsz = RegionInfoPayload::SIZE as u32 + 1024;
        for _attempt in 0..2 {
            let req = RegionInfoPayload {
                argsz,
                index,
                ..Default::default()
            };
            let mut m = self.request(
                command::DEVICE_GET_REGION_INFO,
                &[&req.encode()],
                &[],
                self.options.timeout,
            )?;
            if m.fds.len() > 1 {
                return Err(self.violation(format!(
                    "region {index} info reply carries {} file descriptors",
                    m.fds.len()
                )));
            }
            let fixed =
                RegionInfoPayload::decode(&m.payload).map_err(|e| self.violation(e.to_string()))?;
            if fixed.index != index {
                return Err(self.violation(format!(
                    "region info reply for region {} to a request for region {index}",
                    fixed.index
                )));
            }
            if fixed.argsz as usize > m.payload.len() {
                if fixed.argsz > argsz && fixed.argsz <= MAX_REGION_INFO_ARGSZ {
                    argsz = fixed.argsz;
                    continue;
                }
                return Err(self.violation(format!(
                    "region {index} info reply needs {} bytes but sent {}",
                    fixed.argsz,
                    m.payload.len()
                )));
            }
            let info = protocol::decode_region_info(&m.payload)
                .map_err(|e| self.violation(e.to_string()))?;
            let fd = m.fds.pop().filter(|_| info.mmappable());
            return Ok((info, fd));
        }
        Err(self.violation(format!(
            "region {index} info reply keeps asking for a larger buffer"
        )))
    }

    /// Answers a command the server sent us (reader thread).
    fn serve_server_command(&self, m: Message) {
        let h = m.header;
        let reply = match h.command {
            command::DMA_READ | command::DMA_WRITE if !m.fds.is_empty() => Err(libc::EINVAL),
            command::DMA_READ => self.dma_read(&m.payload),
            command::DMA_WRITE => self.dma_write(&m.payload),
            other => {
                log::warn!(
                    "vfio-user server sent unsupported command {other} ({})",
                    command_name(other)
                );
                Err(libc::ENOTSUP)
            }
        };
        if h.no_reply() {
            return;
        }
        let result = match reply {
            Ok(parts) => {
                let len = parts.iter().map(Vec::len).sum();
                let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
                Header::reply(&h, len).and_then(|rh| self.send(&rh, &slices, &[]))
            }
            Err(errno) => self.send(&Header::error_reply(&h, errno), &[], &[]),
        };
        if let Err(e) = result {
            self.die(Dead::from_error(&e));
        }
    }

    fn dma_read(&self, payload: &[u8]) -> std::result::Result<Vec<Vec<u8>>, i32> {
        if payload.len() != DmaAccessPayload::SIZE {
            return Err(libc::EINVAL);
        }
        let req = DmaAccessPayload::decode(payload).map_err(|_| libc::EINVAL)?;
        let len = usize::try_from(req.count).map_err(|_| libc::EINVAL)?;
        let mut data = vec![0u8; len];
        {
            // Hold the table lock during the copy so that dma_unmap cannot
            // return (and the caller free the memory) in the middle of it.
            let _dma = lock(&self.dma);
            let e = self.dma_lookup_locked(&_dma, req.address, req.count)?;
            let src = e
                .host_addr
                .checked_add(req.address - e.iova)
                .ok_or(libc::EFAULT)?;
            // SAFETY: [src, src + len) lies inside a range the caller of
            // dma_map declared valid host memory for the whole life of the
            // mapping (the Vfio::dma_map contract), and the mapping cannot be
            // removed while we hold the table lock. `data` is a fresh buffer
            // of len bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(src as *const u8, data.as_mut_ptr(), len);
            }
        }
        Ok(vec![req.encode().to_vec(), data])
    }

    fn dma_write(&self, payload: &[u8]) -> std::result::Result<Vec<Vec<u8>>, i32> {
        let req = DmaAccessPayload::decode(payload).map_err(|_| libc::EINVAL)?;
        let data = payload.get(DmaAccessPayload::SIZE..).unwrap_or(&[]);
        if data.len() as u64 != req.count {
            return Err(libc::EINVAL);
        }
        {
            let _dma = lock(&self.dma);
            let e = self.dma_lookup_locked(&_dma, req.address, req.count)?;
            if e.read_only {
                return Err(libc::EPERM);
            }
            let dst = e
                .host_addr
                .checked_add(req.address - e.iova)
                .ok_or(libc::EFAULT)?;
            // SAFETY: as in dma_read: [dst, dst + len) lies inside writable
            // host memory the caller of dma_map registered and that stays
            // mapped while we hold the table lock.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, data.len());
            }
        }
        Ok(vec![req.encode().to_vec()])
    }

    /// Finds the registered range holding `address .. address + count`.
    fn dma_lookup_locked(
        &self,
        table: &[DmaEntry],
        address: u64,
        count: u64,
    ) -> std::result::Result<DmaEntry, i32> {
        if !self.options.serve_dma_messages {
            return Err(libc::ENOTSUP);
        }
        if count > u64::from(self.options.max_data_xfer_size) {
            return Err(libc::EINVAL);
        }
        let end = address.checked_add(count).ok_or(libc::EINVAL)?;
        let e = table
            .iter()
            .find(|e| address >= e.iova && end <= e.iova.saturating_add(e.size))
            .copied()
            .ok_or(libc::EFAULT)?;
        if e.host_addr == 0 {
            return Err(libc::ENOTSUP);
        }
        Ok(e)
    }

    /// The reader thread.
    fn reader_loop(self: Arc<Self>, stream: UnixStream) {
        let max_fds = self.options.max_msg_fds as usize;
        loop {
            let m = match protocol::read_message(stream.as_fd(), self.max_message, max_fds) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    self.die(Dead::Disconnected(
                        "the server closed the connection".into(),
                    ));
                    return;
                }
                Err(e) => {
                    self.die(Dead::from_error(&e));
                    return;
                }
            };
            if m.fds_dropped {
                self.die(Dead::Protocol(format!(
                    "{} message carries more than {max_fds} file descriptors",
                    command_name(m.header.command)
                )));
                return;
            }
            if m.header.is_command() {
                self.serve_server_command(m);
                continue;
            }
            if !m.header.is_reply() {
                self.die(Dead::Protocol(format!(
                    "message of unknown type {:#x}",
                    m.header.flags & protocol::header_flags::TYPE_MASK
                )));
                return;
            }
            let id = m.header.id;
            let mut st = lock(&self.state);
            match st.pending.remove(&id) {
                Some(w) if w.command == m.header.command => {
                    drop(st);
                    let _ = w.tx.try_send(Ok(m));
                }
                Some(w) => {
                    st.pending.insert(id, w);
                    drop(st);
                    self.die(Dead::Protocol(format!(
                        "reply {id} is for command {} but the request was another",
                        command_name(m.header.command)
                    )));
                    return;
                }
                None => {
                    if let Some(pos) = st.timed_out.iter().position(|&t| t == id) {
                        st.timed_out.remove(pos);
                        log::warn!(
                            "vfio-user: dropping late reply {id} ({}) to a timed-out request",
                            command_name(m.header.command)
                        );
                        continue;
                    }
                    drop(st);
                    self.die(Dead::Protocol(format!(
                        "reply to message id {id} ({}) that was never sent",
                        command_name(m.header.command)
                    )));
                    return;
                }
            }
        }
    }
}

/// The connection: shared state plus the reader thread, ended on drop.
struct Connection {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.die(Dead::Closed);
        if let Some(h) = self.reader.take() {
            if h.join().is_err() {
                log::error!("vfio-user reader thread panicked");
            }
        }
    }
}

struct CachedRegion {
    info: RegionInfo,
    fd: Option<OwnedFd>,
}

/// A device served by a vfio-user server, reached over a Unix socket.
///
/// Implements [`Vfio`]; every method may be called from several threads at
/// once. Dropping it closes the socket and ends its reader thread.
pub struct UserDevice {
    conn: Connection,
    info: DeviceInfo,
    server_caps: Capabilities,
    version: (u16, u16),
    /// Region infos (and region fds) read at connect time; `None` where the
    /// server refused the query.
    regions: Vec<Option<CachedRegion>>,
}

impl std::fmt::Debug for UserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserDevice")
            .field("info", &self.info)
            .field("server_caps", &self.server_caps)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl UserDevice {
    /// Connects to the server listening at `path` with default options.
    pub fn connect(path: impl AsRef<Path>) -> Result<UserDevice> {
        Self::connect_with_options(path, UserOptions::default())
    }

    /// Connects to the server listening at `path`.
    pub fn connect_with_options(
        path: impl AsRef<Path>,
        options: UserOptions,
    ) -> Result<UserDevice> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("connect to vfio-user socket {}", path.display()), e))?;
        Self::from_stream(stream, options)
    }

    /// Runs the protocol over an already connected stream: negotiates the
    /// version and capabilities, reads the device info and every region's
    /// info (keeping region fds for [`Vfio::mmap_region`]).
    pub fn from_stream(stream: UnixStream, options: UserOptions) -> Result<UserDevice> {
        let options = UserOptions {
            max_data_xfer_size: options.max_data_xfer_size.max(1),
            ..options
        };
        stream
            .set_write_timeout(Some(options.timeout.max(Duration::from_millis(1))))
            .map_err(|e| Error::io("set the vfio-user send timeout", e))?;
        let reader_stream = stream
            .try_clone()
            .map_err(|e| Error::io("clone the vfio-user socket", e))?;
        let max_message = HEADER_SIZE
            .saturating_add(64 * 1024)
            .saturating_add(options.max_data_xfer_size as usize);
        let shared = Arc::new(Shared {
            stream,
            send_lock: Mutex::new(()),
            state: Mutex::new(State {
                next_id: 0,
                pending: HashMap::new(),
                timed_out: VecDeque::new(),
                dead: None,
            }),
            dma: Mutex::new(Vec::new()),
            options,
            max_message,
        });
        let reader_shared = Arc::clone(&shared);
        let reader = std::thread::Builder::new()
            .name("vfio-user-reader".into())
            .spawn(move || reader_shared.reader_loop(reader_stream))
            .map_err(|e| Error::io("spawn the vfio-user reader thread", e))?;
        let conn = Connection {
            shared,
            reader: Some(reader),
        };
        let s = &conn.shared;

        // VERSION.
        let ours = Capabilities {
            max_msg_fds: options.max_msg_fds,
            max_data_xfer_size: options.max_data_xfer_size,
            ..Capabilities::default()
        };
        let payload =
            protocol::encode_version(protocol::VERSION_MAJOR, protocol::VERSION_MINOR, &ours);
        let m = s.request(command::VERSION, &[&payload], &[], options.timeout)?;
        s.expect_at_least(&m, 4)?;
        let (major, minor, server_caps) =
            protocol::decode_version(&m.payload).map_err(|e| s.violation(e.to_string()))?;
        if major != protocol::VERSION_MAJOR || minor > protocol::VERSION_MINOR {
            return Err(s.violation(format!(
                "server answered version {major}.{minor} to our {}.{}",
                protocol::VERSION_MAJOR,
                protocol::VERSION_MINOR
            )));
        }
        if server_caps.max_data_xfer_size == 0 {
            return Err(s.violation("server announced a max_data_xfer_size of 0".into()));
        }

        // DEVICE_GET_INFO.
        let req = DeviceInfoPayload {
            argsz: DeviceInfoPayload::SIZE as u32,
            ..Default::default()
        };
        let m = s.request(
            command::DEVICE_GET_INFO,
            &[&req.encode()],
            &[],
            options.timeout,
        )?;
        s.expect_at_least(&m, DeviceInfoPayload::SIZE)?;
        let d = DeviceInfoPayload::decode(&m.payload).map_err(|e| s.violation(e.to_string()))?;
        if d.num_regions > MAX_REGIONS || d.num_irqs > MAX_REGIONS {
            return Err(s.violation(format!(
                "server announced {} regions and {} interrupt indices",
                d.num_regions, d.num_irqs
            )));
        }
        let info = DeviceInfo {
            flags: d.flags,
            num_regions: d.num_regions,
            num_irqs: d.num_irqs,
        };

        // Every region's info.
        let mut regions = Vec::with_capacity(d.num_regions as usize);
        for index in 0..d.num_regions {
            match s.region_info(index) {
                Ok((info, fd)) => regions.push(Some(CachedRegion { info, fd })),
                Err(Error::Refused { errno, .. }) => {
                    log::debug!("vfio-user server refused info of region {index}: errno {errno}");
                    regions.push(None);
                }
                Err(e) => return Err(e),
            }
        }

        Ok(UserDevice {
            conn,
            info,
            server_caps,
            version: (major, minor),
            regions,
        })
    }

    /// The capabilities the server announced.
    pub fn server_capabilities(&self) -> Capabilities {
        self.server_caps
    }

    /// The protocol version agreed with the server (major, minor).
    pub fn protocol_version(&self) -> (u16, u16) {
        self.version
    }

    fn shared(&self) -> &Shared {
        &self.conn.shared
    }

    /// Bytes per REGION_READ/WRITE message.
    fn xfer_chunk(&self) -> usize {
        let ours = self.shared().options.max_data_xfer_size;
        ours.min(self.server_caps.max_data_xfer_size).max(1) as usize
    }

    fn timeout(&self) -> Duration {
        self.shared().options.timeout
    }

    fn set_irqs(
        &self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        fds: &[BorrowedFd<'_>],
    ) -> Result<()> {
        let req = SetIrqsPayload {
            argsz: SetIrqsPayload::SIZE as u32,
            flags,
            index,
            start,
            count,
        };
        let s = self.shared();
        let m = s.request(
            command::DEVICE_SET_IRQS,
            &[&req.encode()],
            fds,
            self.timeout(),
        )?;
        s.expect_plain(&m, 0)
    }

    fn check_region_range(&self, index: u32, offset: u64, len: usize) -> Result<()> {
        if let Some(Some(r)) = self.regions.get(index as usize) {
            let end = offset.checked_add(len as u64);
            if end.is_none_or(|e| e > r.info.size) {
                return Err(Error::InvalidArgument(format!(
                    "access of {len:#x} bytes at {offset:#x} is outside region {index} of {:#x} bytes",
                    r.info.size
                )));
            }
        }
        Ok(())
    }
}

impl Vfio for UserDevice {
    fn device_info(&self) -> Result<DeviceInfo> {
        Ok(self.info)
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        if let Some(Some(r)) = self.regions.get(index as usize) {
            return Ok(r.info.clone());
        }
        // Not cached (refused at connect time or beyond num_regions): ask.
        self.shared().region_info(index).map(|(info, _fd)| info)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        self.check_region_range(index, offset, data.len())?;
        let s = self.shared();
        let chunk = self.xfer_chunk();
        let mut pos = offset;
        for part in data.chunks_mut(chunk) {
            let count = u32::try_from(part.len())
                .map_err(|_| Error::InvalidArgument("transfer chunk too large".into()))?;
            let req = RegionAccessPayload {
                offset: pos,
                region: index,
                count,
            };
            let m = s.request(command::REGION_READ, &[&req.encode()], &[], self.timeout())?;
            s.expect_plain(&m, RegionAccessPayload::SIZE + part.len())?;
            let rep =
                RegionAccessPayload::decode(&m.payload).map_err(|e| s.violation(e.to_string()))?;
            if rep != req {
                return Err(s.violation(format!(
                    "REGION_READ reply {rep:?} does not match the request {req:?}"
                )));
            }
            let bytes = m
                .payload
                .get(RegionAccessPayload::SIZE..)
                .ok_or_else(|| s.violation("REGION_READ reply lost its data".into()))?;
            part.copy_from_slice(bytes);
            pos = pos
                .checked_add(u64::from(count))
                .ok_or_else(|| Error::InvalidArgument("region offset overflows".into()))?;
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.check_region_range(index, offset, data.len())?;
        let s = self.shared();
        let chunk = self.xfer_chunk();
        let mut pos = offset;
        for part in data.chunks(chunk) {
            let count = u32::try_from(part.len())
                .map_err(|_| Error::InvalidArgument("transfer chunk too large".into()))?;
            let req = RegionAccessPayload {
                offset: pos,
                region: index,
                count,
            };
            let m = s.request(
                command::REGION_WRITE,
                &[&req.encode(), part],
                &[],
                self.timeout(),
            )?;
            s.expect_plain(&m, RegionAccessPayload::SIZE)?;
            let rep =
                RegionAccessPayload::decode(&m.payload).map_err(|e| s.violation(e.to_string()))?;
            if rep != req {
                return Err(s.violation(format!(
                    "REGION_WRITE reply {rep:?} does not match the request {req:?}"
                )));
            }
            pos = pos
                .checked_add(u64::from(count))
                .ok_or_else(|| Error::InvalidArgument("region offset overflows".into()))?;
        }
        Ok(())
    }

    fn mmap_region(&self, index: u32, area: SparseArea) -> Result<Mapping> {
        let r = match self.regions.get(index as usize) {
            Some(Some(r)) => r,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "region {index} is not known"
                )))
            }
        };
        let fd = r.fd.as_ref().ok_or_else(|| {
            Error::Unsupported(format!("the server shared no fd for region {index}"))
        })?;
        let end = area.offset.checked_add(area.size);
        let inside = r.info.mmap_areas().iter().any(|a| {
            area.offset >= a.offset
                && end.is_some_and(|e| a.offset.checked_add(a.size).is_some_and(|ae| e <= ae))
        });
        if area.size == 0 || !inside {
            return Err(Error::InvalidArgument(format!(
                "area {:#x}+{:#x} is not an mmap-able part of region {index}",
                area.offset, area.size
            )));
        }
        let mut prot = 0;
        if r.info.readable() {
            prot |= libc::PROT_READ;
        }
        if r.info.writable() {
            prot |= libc::PROT_WRITE;
        }
        let file_offset = r.info.offset.checked_add(area.offset).ok_or_else(|| {
            Error::InvalidArgument(format!("region {index} mmap offset overflows"))
        })?;
        // A server may share a file smaller than the region it describes;
        // touching a mapping past the end of its file raises SIGBUS in
        // whoever touches it (the VMM or, through KVM, the guest). Refuse
        // such a mapping: the caller then traps the range instead.
        let meta = fd
            .try_clone()
            .map(std::fs::File::from)
            .and_then(|f| f.metadata())
            .map_err(|e| Error::io(format!("fstat of the fd of region {index}"), e))?;
        let end = file_offset.checked_add(area.size);
        if meta.file_type().is_file() && end.is_none_or(|e| e > meta.len()) {
            return Err(Error::Protocol(format!(
                "region {index}: the server's file has {:#x} bytes, the mapping needs {:#x}+{:#x}",
                meta.len(),
                file_offset,
                area.size
            )));
        }
        Mapping::map_fd(fd.as_fd(), file_offset, area.size, prot)
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        let req = IrqInfoPayload {
            argsz: IrqInfoPayload::SIZE as u32,
            index,
            ..Default::default()
        };
        let s = self.shared();
        let m = s.request(
            command::DEVICE_GET_IRQ_INFO,
            &[&req.encode()],
            &[],
            self.timeout(),
        )?;
        s.expect_at_least(&m, IrqInfoPayload::SIZE)?;
        let rep = IrqInfoPayload::decode(&m.payload).map_err(|e| s.violation(e.to_string()))?;
        if rep.index != index {
            return Err(s.violation(format!(
                "irq info reply for index {} to a request for index {index}",
                rep.index
            )));
        }
        Ok(IrqInfo {
            index,
            flags: rep.flags,
            count: rep.count,
        })
    }

    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<()> {
        let max = self.server_caps.max_msg_fds as usize;
        let flags = irq_set::DATA_EVENTFD | irq_set::ACTION_TRIGGER;
        let mut pos = 0usize;
        let mut batch: Vec<BorrowedFd<'_>> = Vec::new();
        while pos < fds.len() {
            // A run of `None` detaches its vectors in one message without
            // fds; a run of `Some` goes in batches of the server's max_msg_fds.
            let first = start
                .checked_add(
                    u32::try_from(pos)
                        .map_err(|_| Error::InvalidArgument("too many interrupt vectors".into()))?,
                )
                .ok_or_else(|| Error::InvalidArgument("vector number overflows".into()))?;
            let rest = fds.get(pos..).unwrap_or(&[]);
            batch.clear();
            let n = if rest.first().is_some_and(Option::is_none) {
                rest.iter().take_while(|f| f.is_none()).count()
            } else {
                if max == 0 {
                    return Err(Error::Unsupported(
                        "the server accepts no file descriptors (max_msg_fds is 0)".into(),
                    ));
                }
                batch.extend(rest.iter().take(max).map_while(|f| *f));
                batch.len()
            };
            let count = u32::try_from(n)
                .map_err(|_| Error::InvalidArgument("too many interrupt vectors".into()))?;
            self.set_irqs(flags, index, first, count, &batch)?;
            pos = pos.saturating_add(n.max(1));
        }
        Ok(())
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        self.set_irqs(
            irq_set::DATA_NONE | irq_set::ACTION_TRIGGER,
            index,
            0,
            0,
            &[],
        )
    }

    fn unmask_irq(&self, index: u32) -> Result<()> {
        self.set_irqs(
            irq_set::DATA_NONE | irq_set::ACTION_UNMASK,
            index,
            0,
            1,
            &[],
        )
    }

    fn mask_irq(&self, index: u32) -> Result<()> {
        self.set_irqs(irq_set::DATA_NONE | irq_set::ACTION_MASK, index, 0, 1, &[])
    }

    fn set_irq_unmask_eventfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        self.set_irqs(
            irq_set::DATA_EVENTFD | irq_set::ACTION_UNMASK,
            index,
            0,
            1,
            &fds,
        )
    }

    fn reset(&self) -> Result<()> {
        let s = self.shared();
        let m = s.request(command::DEVICE_RESET, &[], &[], s.options.reset_timeout)?;
        s.expect_plain(&m, 0)
    }

    fn dma_map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        if size == 0 || iova.checked_add(size).is_none() {
            return Err(Error::InvalidArgument(format!(
                "DMA range {iova:#x}+{size:#x}"
            )));
        }
        let s = self.shared();
        {
            let mut dma = lock(&s.dma);
            let overlaps = dma
                .iter()
                .any(|e| iova < e.iova.saturating_add(e.size) && e.iova < iova + size);
            if overlaps {
                return Err(Error::InvalidArgument(format!(
                    "DMA range {iova:#x}+{size:#x} overlaps an existing mapping"
                )));
            }
            dma.push(DmaEntry {
                iova,
                size,
                host_addr: host.host_addr,
                read_only: host.read_only,
            });
        }
        let mut flags = dma_flags::READ;
        if !host.read_only {
            flags |= dma_flags::WRITE;
        }
        let req = DmaMapPayload {
            argsz: DmaMapPayload::SIZE as u32,
            flags,
            offset: host.file.map_or(0, |f| f.offset),
            address: iova,
            size,
        };
        let fds: Vec<BorrowedFd<'_>> = host.file.map(|f| f.fd).into_iter().collect();
        if !fds.is_empty() && self.server_caps.max_msg_fds == 0 {
            lock(&s.dma).retain(|e| e.iova != iova);
            return Err(Error::Unsupported(
                "the server accepts no file descriptors (max_msg_fds is 0)".into(),
            ));
        }
        let result = s
            .request(command::DMA_MAP, &[&req.encode()], &fds, self.timeout())
            .and_then(|m| s.expect_plain(&m, 0));
        if result.is_err() {
            lock(&s.dma).retain(|e| e.iova != iova);
        }
        result
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        let s = self.shared();
        // Forget the range first: from now on the server's DMA messages to it
        // are refused, so the caller may free the memory once we return.
        lock(&s.dma).retain(|e| !(e.iova == iova && e.size == size));
        let req = DmaUnmapPayload {
            argsz: DmaUnmapPayload::SIZE as u32,
            flags: 0,
            address: iova,
            size,
        };
        let m = s.request(command::DMA_UNMAP, &[&req.encode()], &[], self.timeout())?;
        // The spec has the server echo the entry; some servers send nothing.
        if m.payload.is_empty() {
            return s.expect_plain(&m, 0);
        }
        s.expect_plain(&m, DmaUnmapPayload::SIZE)
    }

    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>> {
        // vfio-user has no IOMMU aperture: every address may be mapped.
        Ok(vec![0..=u64::MAX])
    }

    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        match self.regions.get(index as usize) {
            Some(Some(r)) => r.fd.as_ref().map(|fd| (fd.as_fd(), r.info.offset)),
            _ => None,
        }
    }
}
