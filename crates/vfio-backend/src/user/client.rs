//! [`UserDevice`]: a vfio-user client implementing [`crate::Vfio`].
//!
//! Requests are answered by a leader/follower receive, with no thread in
//! between on the fast path: the calling thread sends its command, and when
//! no other thread is receiving it takes the reader role and reads its own
//! reply from the socket (a caller alone takes the role as it registers,
//! in the same lock). While it reads, any reply for another waiting
//! thread is put in that thread's slot (matched by message id) and the
//! thread woken; when it has its own reply it hands the reader role to a
//! waiting thread, if any. Commands from the server (`DMA_READ`,
//! `DMA_WRITE`) are answered by whoever reads them: a caller, or, while no
//! caller is active, an idle thread that watches the socket (it never reads
//! while a caller waits, so it does not take replies off the fast path).
//! Replies are read through one buffered [`MessageReader`] (usually one
//! `recvmsg` per reply) and their payloads land in recycled buffers (a
//! thread's own small spare first, without a lock, then a shared pool), so
//! a region access allocates nothing.
//!
//! Failure policy (the connection never hangs a caller):
//! - an error reply fails that request with [`Error::Refused`] (errno 0 is
//!   reported as `EIO`); the connection stays usable;
//! - no reply within the timeout (counted from the end of the send) fails
//!   that request with [`Error::Timeout`];
//!   a late reply to it is logged and dropped;
//! - end of stream or a reset connection fails every waiting and later
//!   request with [`Error::Disconnected`] at once;
//! - a protocol violation (a malformed or oversized message, too many file
//!   descriptors, a reply whose size or fields do not match the request, a
//!   reply to a message id that was never sent) poisons the connection:
//!   every waiting and later request fails with [`Error::Protocol`], and the
//!   socket is shut down.
//!
//! Every size, count and descriptor the server names is checked against
//! what was negotiated before anything is allocated, read or mapped: a
//! reply's size against our limit (and the request it answers), a region
//! info reply against the `argsz` we asked for, interrupt vector counts
//! against 2048 (MSI-X's most). The server's own commands are refused with
//! an error reply (and nothing allocated) until the `VERSION` reply was
//! accepted (`EINVAL`), when they carry descriptors (`EINVAL`), when
//! [`UserOptions::serve_dma_messages`] is off (`ENOTSUP`), when their count
//! exceeds our `max_data_xfer_size` or disagrees with the payload
//! (`EINVAL`), and when their range is not inside one mapping registered
//! with a host address (`EFAULT`; `ENOTSUP` for a file-only mapping,
//! `EPERM` to write a read-only one). Other commands get `ENOTSUP`.
//!
//! Migration (the [`Vfio`] migration methods) goes over `DEVICE_FEATURE`
//! and `MIG_DATA_READ` / `MIG_DATA_WRITE`, its replies checked as any other
//! (see `client/mig.rs`).
//!
//! Region files: a server may still resize a file it shared with us, and
//! truncating it under our mapping makes the next access to it raise
//! SIGBUS, in this process or, through a KVM memory slot, in the guest
//! (`KVM_RUN` fails with `EFAULT`). So a region fd is kept for
//! [`Vfio::mmap_region`] only if its file is sealed against shrinking
//! (`F_SEAL_SHRINK`, read with `fcntl(F_GET_SEALS)`: a memfd made with
//! `MFD_ALLOW_SEALING`; a seal cannot be removed), is not write-sealed when
//! the region is writable, and is large enough for every mmap-able area.
//! Otherwise the region is reported by [`Vfio::region_info`] without the
//! `MMAP` flag and its sparse areas, [`Vfio::region_mmap_fd`] offers no fd
//! and [`Vfio::mmap_region`] fails with [`Error::Unsupported`]: `vfio-pci`
//! then traps the whole region, whose accesses go through `REGION_READ` /
//! `REGION_WRITE` messages (slower, but the device works). The reason is
//! logged once per region, at warn level, when the client connects. The
//! other way round, a file [`Vfio::dma_map`] shares with the server (guest
//! memory) could be truncated by the server too: the client warns, once
//! per connection, when that file is not sealed against shrinking.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut, RangeInclusive};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::locking::lock;
use super::protocol::{
    self, command, command_name, dma_flags, irq_set, Capabilities, DeviceInfoPayload,
    DmaAccessPayload, DmaMapPayload, DmaUnmapPayload, Header, IrqInfoPayload, Message,
    MessageReader, Received, RegionAccessPayload, RegionInfoPayload, SetIrqsPayload, HEADER_SIZE,
};
use crate::{
    DeviceInfo, DmaSource, DomainId, Error, IommuDomain, IrqInfo, Mapping, RegionInfo, Result,
    SparseArea, Vfio,
};

mod mig;

/// The most regions and interrupt indices a server may announce.
pub const MAX_REGIONS: u32 = 256;
/// The largest region info reply we ask for (capabilities included).
const MAX_REGION_INFO_ARGSZ: u32 = 64 * 1024;
/// The most vectors an interrupt index may announce: MSI-X's 2048 (the
/// table size field of the capability has 11 bits), the largest a PCI
/// function has.
const MAX_IRQ_VECTORS: u32 = 2048;
/// The largest `max_data_xfer_size` we offer, whatever the options say
/// (16 MiB): every message the server sends may be this big, and is
/// buffered whole.
pub const MAX_DATA_XFER_SIZE: u32 = 16 << 20;
/// The most descriptors the kernel passes in one message (`SCM_MAX_FD`).
const SCM_MAX_FD: usize = 253;
/// How many timed-out message ids we remember, to drop their late replies.
const TIMED_OUT_MEMORY: usize = 1024;
/// How long after the last request the idle thread starts watching the
/// socket for commands from the server (callers read them until then).
const IDLE_AFTER: Duration = Duration::from_millis(2);
/// How many payload buffers we keep for reuse, and the largest we keep.
const POOL_BUFFERS: usize = 16;
const POOL_BUFFER_MAX: usize = 64 * 1024;
/// The largest payload buffer a thread keeps as its own spare.
const SPARE_BUFFER_MAX: usize = 4096;

thread_local! {
    /// One small payload buffer per thread, reused without the pool's lock:
    /// a caller that reads its own reply takes it and gives it back.
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Options of a vfio-user connection.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub struct UserOptions {
    /// How long a request waits for its reply once sent (and how long a
    /// send may block).
    pub timeout: Duration,
    /// How long `DEVICE_RESET` may take.
    pub reset_timeout: Duration,
    /// The most data bytes we accept in one message from the server (our
    /// `max_data_xfer_size` capability); transfers are also split at the
    /// server's own value. Taken as 1 when 0 and as
    /// [`MAX_DATA_XFER_SIZE`] when larger: a server may make us buffer a
    /// message of this size.
    pub max_data_xfer_size: u32,
    /// The most file descriptors we accept in one message (our
    /// `max_msg_fds` capability).
    pub max_msg_fds: u32,
    /// Answer the server's `DMA_READ` / `DMA_WRITE` from the host addresses
    /// given to [`IommuDomain::map`], up to `max_data_xfer_size` bytes each and
    /// only inside one registered mapping. When false they are refused with
    /// `ENOTSUP`.
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

impl UserOptions {
    /// Returns the options with [`timeout`](Self::timeout) set to the given value.
    #[must_use]
    pub const fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Returns the options with [`reset_timeout`](Self::reset_timeout) set to the given value.
    #[must_use]
    pub const fn with_reset_timeout(mut self, reset_timeout: Duration) -> Self {
        self.reset_timeout = reset_timeout;
        self
    }

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

    /// Returns the options with [`serve_dma_messages`](Self::serve_dma_messages) set to the given value.
    #[must_use]
    pub const fn with_serve_dma_messages(mut self, serve_dma_messages: bool) -> Self {
        self.serve_dma_messages = serve_dma_messages;
        self
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

/// Where one request waits for its reply. Slots are reused; their index is
/// stable for the life of the connection.
struct Slot {
    in_use: bool,
    id: u16,
    command: u16,
    /// The owner sleeps on `cv` waiting for its reply or the reader role.
    sleeping: bool,
    /// The reply, put here by whoever read it.
    reply: Option<Message>,
    cv: Arc<Condvar>,
}

struct State {
    next_id: u16,
    slots: Vec<Slot>,
    timed_out: VecDeque<u16>,
    dead: Option<Dead>,
    /// A thread is reading from the socket (the reader role).
    reader_active: bool,
    /// Requests in flight (from registration to return).
    callers: usize,
    /// Requests started so far (the idle thread watches it change).
    activity: u64,
}

impl State {
    /// When nobody holds the reader role, wakes one thread that waits for
    /// its reply so that it takes the role.
    fn hand_off(&self) {
        if self.reader_active {
            return;
        }
        if let Some(s) = self
            .slots
            .iter()
            .find(|s| s.in_use && s.sleeping && s.reply.is_none())
        {
            s.cv.notify_one();
        }
    }

    /// Frees a slot; remembers its id as timed out when asked to, so that
    /// a late reply to it is dropped.
    fn release(&mut self, idx: usize, timed_out: bool) {
        let mut id = None;
        if let Some(s) = self.slots.get_mut(idx) {
            s.in_use = false;
            s.sleeping = false;
            s.reply = None;
            id = Some(s.id);
        }
        if let (true, Some(id)) = (timed_out, id) {
            if self.timed_out.len() >= TIMED_OUT_MEMORY {
                self.timed_out.pop_front();
            }
            self.timed_out.push_back(id);
        }
        self.callers = self.callers.saturating_sub(1);
        self.hand_off();
    }
}

#[derive(Clone, Copy, Debug)]
struct DmaEntry {
    iova: u64,
    size: u64,
    host_addr: u64,
    read_only: bool,
}

/// What only the holder of the reader role touches.
struct ReaderState {
    messages: MessageReader,
    /// The receive timeout currently set on the socket.
    rcvtimeo: Option<Duration>,
}

/// One request in flight: its slot, id and command.
#[derive(Clone, Copy, Debug)]
struct Me {
    idx: usize,
    id: u16,
    command: u16,
}

/// How a spell as reader ended for a caller.
enum LeadEnd {
    Mine(Message),
    TimedOut,
    Failed(Error),
}

/// What the callers and the idle thread share.
struct Shared {
    stream: UnixStream,
    send_lock: Mutex<()>,
    state: Mutex<State>,
    /// Wakes the idle thread (on death).
    idle_cv: Condvar,
    reader: Mutex<ReaderState>,
    /// Payload buffers for reuse.
    pool: Mutex<Vec<Vec<u8>>>,
    dma: Mutex<Vec<DmaEntry>>,
    /// The VERSION reply was received and accepted: until then the
    /// server's commands are refused.
    negotiated: AtomicBool,
    options: UserOptions,
}

/// What we answer to a command from the server.
enum ServerReply {
    /// `DMA_READ`: the request echoed, then the data (a pooled buffer).
    Read(DmaAccessPayload, Vec<u8>),
    /// `DMA_WRITE`: the request echoed.
    Write(DmaAccessPayload),
}

/// A reply: derefs to the message; its payload buffer goes back to the
/// pool when dropped.
struct Reply<'a> {
    shared: &'a Shared,
    msg: Message,
}

impl Deref for Reply<'_> {
    type Target = Message;
    fn deref(&self) -> &Message {
        &self.msg
    }
}

impl DerefMut for Reply<'_> {
    fn deref_mut(&mut self) -> &mut Message {
        &mut self.msg
    }
}

impl Drop for Reply<'_> {
    fn drop(&mut self) {
        self.shared.recycle(std::mem::take(&mut self.msg.payload));
    }
}

impl Shared {
    /// Marks the connection unusable (the first reason wins), wakes every
    /// waiter and shuts the socket down, which ends any receive in progress.
    fn die(&self, reason: Dead) {
        {
            let mut st = lock(&self.state);
            if st.dead.is_none() {
                match &reason {
                    Dead::Closed => {}
                    Dead::Disconnected(s) => log::warn!("vfio-user connection lost: {s}"),
                    Dead::Protocol(s) => log::error!("vfio-user protocol violation: {s}"),
                }
                st.dead = Some(reason);
            }
            for s in st.slots.iter().filter(|s| s.in_use) {
                s.cv.notify_all();
            }
        }
        self.idle_cv.notify_all();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// [`Shared::die`], then the error every caller now gets.
    fn fail(&self, reason: Dead) -> Error {
        let fallback = reason.to_error();
        self.die(reason);
        lock(&self.state)
            .dead
            .as_ref()
            .map_or(fallback, Dead::to_error)
    }

    /// A payload buffer (recycled when one is free).
    /// The calling thread's spare buffer first (no lock), then the pool.
    fn take_buf(&self) -> Vec<u8> {
        let spare = SPARE.try_with(Cell::take).unwrap_or_default();
        if spare.capacity() > 0 {
            return spare;
        }
        lock(&self.pool).pop().unwrap_or_default()
    }

    /// Keeps `buf` as the calling thread's spare when it has none and `buf`
    /// is small, else in the pool.
    fn recycle(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 || buf.capacity() > POOL_BUFFER_MAX {
            return;
        }
        buf.clear();
        if buf.capacity() <= SPARE_BUFFER_MAX {
            let kept = SPARE.try_with(|c| {
                let old = c.take();
                if old.capacity() == 0 {
                    c.set(std::mem::take(&mut buf));
                    true
                } else {
                    c.set(old);
                    false
                }
            });
            if kept == Ok(true) {
                return;
            }
        }
        let mut pool = lock(&self.pool);
        if pool.len() < POOL_BUFFERS {
            pool.push(buf);
        }
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
    ) -> Result<Reply<'_>> {
        let payload_len: usize = parts.iter().map(|p| p.len()).sum();
        let (me, header, leading) = {
            let mut st = lock(&self.state);
            if let Some(d) = &st.dead {
                return Err(d.to_error());
            }
            // Alone (no request in flight, nobody reading): take the reader
            // role now, which saves a second round on the state lock.
            let leading = st.callers == 0 && !st.reader_active;
            let mut id = None;
            for _ in 0..=u16::MAX as u32 {
                let candidate = st.next_id;
                st.next_id = st.next_id.wrapping_add(1);
                // With no request in flight no slot is in use.
                let busy = (st.callers > 0
                    && st.slots.iter().any(|s| s.in_use && s.id == candidate))
                    || st.timed_out.contains(&candidate);
                if !busy {
                    id = Some(candidate);
                    break;
                }
            }
            let id = id
                .ok_or_else(|| Error::Unsupported("every vfio-user message id is in use".into()))?;
            let header = Header::command(id, cmd, payload_len)?;
            let idx = match st.slots.iter().position(|s| !s.in_use) {
                Some(i) => i,
                None => {
                    st.slots.push(Slot {
                        in_use: false,
                        id: 0,
                        command: 0,
                        sleeping: false,
                        reply: None,
                        cv: Arc::new(Condvar::new()),
                    });
                    st.slots.len() - 1
                }
            };
            if let Some(s) = st.slots.get_mut(idx) {
                s.in_use = true;
                s.id = id;
                s.command = cmd;
                s.sleeping = false;
                s.reply = None;
            }
            st.callers += 1;
            st.activity = st.activity.wrapping_add(1);
            if leading {
                st.reader_active = true;
            }
            (
                Me {
                    idx,
                    id,
                    command: cmd,
                },
                header,
                leading,
            )
        };
        if let Err(e) = self.send(&header, parts, fds) {
            let mut st = lock(&self.state);
            if leading {
                st.reader_active = false;
            }
            st.release(me.idx, false);
            drop(st);
            // A message may have been half sent: the stream is unusable.
            self.die(Dead::from_error(&e));
            return Err(e);
        }
        let reply = Reply {
            shared: self,
            msg: self.wait_reply(me, timeout, leading)?,
        };
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

    /// Waits at most `timeout` from now for the reply of `me` (just sent):
    /// as a follower until its reply is put in its slot, or as the reader
    /// when the role is free. `leading`: the caller holds the reader role.
    fn wait_reply(&self, me: Me, timeout: Duration, leading: bool) -> Result<Message> {
        let timed_out = || Error::Timeout {
            request: command_name(me.command),
            after: timeout,
        };
        let start = Instant::now();
        // The deadline, and the time left at `start`.
        let (deadline, left) = match start.checked_add(timeout) {
            Some(d) => (d, timeout),
            None => {
                let year = Duration::from_secs(365 * 24 * 3600);
                start
                    .checked_add(year)
                    .map_or((start, Duration::ZERO), |d| (d, year))
            }
        };
        if !leading {
            let mut st = lock(&self.state);
            loop {
                let Some(slot) = st.slots.get_mut(me.idx) else {
                    return Err(Error::Protocol("vfio-user request slot lost".into()));
                };
                slot.sleeping = false;
                if let Some(m) = slot.reply.take() {
                    st.release(me.idx, false);
                    return Ok(m);
                }
                if let Some(e) = st.dead.as_ref().map(Dead::to_error) {
                    st.release(me.idx, false);
                    return Err(e);
                }
                if !st.reader_active {
                    st.reader_active = true;
                    break;
                }
                let now = Instant::now();
                let Some(left) = deadline
                    .checked_duration_since(now)
                    .filter(|d| !d.is_zero())
                else {
                    st.release(me.idx, true);
                    return Err(timed_out());
                };
                let Some(slot) = st.slots.get_mut(me.idx) else {
                    return Err(Error::Protocol("vfio-user request slot lost".into()));
                };
                slot.sleeping = true;
                let cv = Arc::clone(&slot.cv);
                st = cv
                    .wait_timeout(st, left)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        // We hold the reader role. `start` is recent only when we held it
        // from the beginning (a follower may have slept since).
        let end = self.lead(me, deadline, leading.then_some(left));
        let mut st = lock(&self.state);
        st.reader_active = false;
        match end {
            LeadEnd::Mine(m) => {
                st.release(me.idx, false);
                Ok(m)
            }
            LeadEnd::TimedOut => {
                st.release(me.idx, true);
                Err(timed_out())
            }
            LeadEnd::Failed(e) => {
                st.release(me.idx, false);
                Err(e)
            }
        }
    }

    /// Reads as the holder of the reader role until our own reply arrives,
    /// the deadline passes or the connection dies. Before returning with
    /// the reply, handles every complete message already buffered (nobody
    /// else would notice them: they are no longer in the socket).
    /// `left`, when given, is the time left until `deadline` measured just
    /// now, used for the first receive instead of reading the clock again.
    fn lead(&self, me: Me, deadline: Instant, mut left: Option<Duration>) -> LeadEnd {
        let mut rd = lock(&self.reader);
        let end = loop {
            let buffered = if rd.messages.is_idle() {
                Ok(None)
            } else {
                self.dispatch_buffered(&mut rd.messages, Some(me))
            };
            match buffered {
                Ok(Some(m)) => break LeadEnd::Mine(m),
                Ok(None) => {}
                Err(e) => break LeadEnd::Failed(e),
            }
            let Some(left) = left
                .take()
                .or_else(|| deadline.checked_duration_since(Instant::now()))
                .filter(|d| !d.is_zero())
            else {
                break LeadEnd::TimedOut;
            };
            if let Err(e) = self.arm_receive_timeout(&mut rd, left) {
                break LeadEnd::Failed(self.fail(Dead::from_error(&e)));
            }
            match rd.messages.recv(self.stream.as_fd(), false) {
                Ok(Received::Data(_)) | Ok(Received::WouldBlock) => {}
                Ok(Received::Closed) => {
                    break LeadEnd::Failed(self.fail(Dead::Disconnected(
                        "the server closed the connection".into(),
                    )))
                }
                Err(e) => break LeadEnd::Failed(self.fail(Dead::from_error(&e))),
            }
        };
        if let LeadEnd::Mine(_) = end {
            // A failure here poisons the connection, but our reply stands.
            let dup = if rd.messages.is_idle() {
                Ok(None)
            } else {
                self.dispatch_buffered(&mut rd.messages, Some(me))
            };
            if let Ok(Some(dup)) = dup {
                self.die(Dead::Protocol(format!(
                    "reply {} ({}) repeats a reply",
                    dup.header.id,
                    command_name(dup.header.command)
                )));
            }
        }
        end
    }

    /// Sets the socket's receive timeout so that a blocking receive ends
    /// about `left` from now (within 1 ms + 1/32): only when the current
    /// one would overshoot by more, or end before half of it.
    fn arm_receive_timeout(&self, rd: &mut ReaderState, left: Duration) -> Result<()> {
        if rd.rcvtimeo == Some(left) {
            return Ok(());
        }
        let slack = left / 32 + Duration::from_millis(1);
        let fine = rd
            .rcvtimeo
            .is_some_and(|t| t <= left.saturating_add(slack) && t >= left / 2);
        if !fine {
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_micros(1))))
                .map_err(|e| Error::io("set the vfio-user receive timeout", e))?;
            rd.rcvtimeo = Some(left);
        }
        Ok(())
    }

    /// Handles every complete message in the buffer; returns our own reply
    /// (`me`) as soon as it comes. An error has poisoned the connection.
    fn dispatch_buffered(
        &self,
        messages: &mut MessageReader,
        mut me: Option<Me>,
    ) -> Result<Option<Message>> {
        loop {
            if messages.is_idle() {
                return Ok(None);
            }
            let m = match messages.next_message(|| self.take_buf()) {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(None),
                Err(e) => return Err(self.fail(Dead::from_error(&e))),
            };
            if let Some(m) = self.dispatch(m, &mut me)? {
                return Ok(Some(m));
            }
        }
    }

    /// Handles one message: answers a command, hands a reply to its waiter
    /// (or returns it when it is ours), drops a late reply.
    fn dispatch(&self, m: Message, me: &mut Option<Me>) -> Result<Option<Message>> {
        if m.fds_dropped {
            return Err(self.fail(Dead::Protocol(format!(
                "{} message carries more than {} file descriptors",
                command_name(m.header.command),
                self.options.max_msg_fds
            ))));
        }
        if m.header.is_command() {
            self.serve_server_command(m);
            return Ok(None);
        }
        if !m.header.is_reply() {
            return Err(self.fail(Dead::Protocol(format!(
                "message of unknown type {:#x}",
                m.header.flags & protocol::header_flags::TYPE_MASK
            ))));
        }
        let id = m.header.id;
        if let Some(mine) = me.filter(|mine| mine.id == id) {
            if mine.command != m.header.command {
                return Err(self.fail(Dead::Protocol(format!(
                    "reply {id} is for command {} but the request was another",
                    command_name(m.header.command)
                ))));
            }
            // Any later reply with this id is a duplicate.
            *me = None;
            return Ok(Some(m));
        }
        let mut st = lock(&self.state);
        let slot = st.slots.iter_mut().find(|s| s.in_use && s.id == id);
        match slot {
            Some(s) if s.command == m.header.command && s.reply.is_none() => {
                s.reply = Some(m);
                s.cv.notify_one();
                Ok(None)
            }
            Some(_) => {
                drop(st);
                Err(self.fail(Dead::Protocol(format!(
                    "reply {id} ({}) does not match its request or repeats a reply",
                    command_name(m.header.command)
                ))))
            }
            None => {
                if let Some(pos) = st.timed_out.iter().position(|&t| t == id) {
                    st.timed_out.remove(pos);
                    drop(st);
                    log::warn!(
                        "vfio-user: dropping late reply {id} ({}) to a timed-out request",
                        command_name(m.header.command)
                    );
                    self.recycle(m.payload);
                    return Ok(None);
                }
                drop(st);
                Err(self.fail(Dead::Protocol(format!(
                    "reply to message id {id} ({}) that was never sent",
                    command_name(m.header.command)
                ))))
            }
        }
    }

    /// The idle thread: while no request is in flight (for a little while),
    /// watches the socket and handles what the server sends on its own
    /// (commands, a close); it leaves the socket to callers otherwise.
    fn idle_loop(self: Arc<Self>) {
        let mut seen = u64::MAX;
        loop {
            {
                let mut st = lock(&self.state);
                loop {
                    if st.dead.is_some() {
                        return;
                    }
                    if st.callers == 0 && !st.reader_active && st.activity == seen {
                        break;
                    }
                    seen = st.activity;
                    st = self
                        .idle_cv
                        .wait_timeout(st, IDLE_AFTER)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|p| p.into_inner().0);
                }
            }
            let mut pfd = libc::pollfd {
                fd: self.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, 1000) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    self.die(Dead::Disconnected(format!(
                        "poll of the vfio-user socket: {e}"
                    )));
                    return;
                }
                continue;
            }
            if r == 0 {
                continue;
            }
            {
                let mut st = lock(&self.state);
                if st.dead.is_some() {
                    return;
                }
                if st.callers > 0 || st.reader_active {
                    // A caller reads; it will handle what arrived.
                    seen = st.activity;
                    continue;
                }
                st.reader_active = true;
            }
            {
                let mut rd = lock(&self.reader);
                let got = match rd.messages.recv(self.stream.as_fd(), true) {
                    Ok(Received::Data(_)) | Ok(Received::WouldBlock) => Ok(()),
                    Ok(Received::Closed) => Err(Dead::Disconnected(
                        "the server closed the connection".into(),
                    )),
                    Err(e) => Err(Dead::from_error(&e)),
                };
                match got {
                    Ok(()) => {
                        let _ = self.dispatch_buffered(&mut rd.messages, None);
                    }
                    Err(reason) => self.die(reason),
                }
            }
            let mut st = lock(&self.state);
            st.reader_active = false;
            st.hand_off();
        }
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

    /// A region's info and the fd we may mmap it through; when the server
    /// shared an fd we do not map (see [`vet_region_fd`]), the info is
    /// reported without `MMAP` and the reason is returned.
    fn region_info(&self, index: u32) -> Result<RegionInfo3> {
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
            if m.payload.len() > argsz as usize {
                return Err(self.violation(format!(
                    "region {index} info reply has {} bytes, more than the {argsz} asked for",
                    m.payload.len()
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
            let mut info = protocol::decode_region_info(&m.payload)
                .map_err(|e| self.violation(e.to_string()))?;
            return Ok(match vet_region_fd(&info, m.fds.pop()) {
                Ok(fd) => (info, fd, None),
                Err(reason) => {
                    // Not mappable by us: say so in what we report, so
                    // that whoever lays the region out traps all of it.
                    strip_mmap(&mut info);
                    (info, None, Some(reason))
                }
            });
        }
        Err(self.violation(format!(
            "region {index} info reply keeps asking for a larger buffer"
        )))
    }

    /// Answers a command the server sent us (whoever holds the reader role).
    fn serve_server_command(&self, m: Message) {
        let h = m.header;
        let reply = self.server_command_reply(&m);
        self.recycle(m.payload);
        let result = match reply {
            _ if h.no_reply() => Ok(()),
            Ok(ServerReply::Read(req, data)) => {
                let echo = req.encode();
                let sent = Header::reply(&h, echo.len().saturating_add(data.len()))
                    .and_then(|rh| self.send(&rh, &[&echo, &data], &[]));
                self.recycle(data);
                sent
            }
            Ok(ServerReply::Write(req)) => Header::reply(&h, DmaAccessPayload::SIZE)
                .and_then(|rh| self.send(&rh, &[&req.encode()], &[])),
            Err(errno) => self.send(&Header::error_reply(&h, errno), &[], &[]),
        };
        if let Err(e) = result {
            self.die(Dead::from_error(&e));
        }
    }

    /// Checks a command from the server against what was negotiated and
    /// serves it, or says with which errno to refuse it. Nothing the
    /// server names is allocated, read or written before it is checked:
    /// the version must be negotiated, DMA messages allowed, the count at
    /// most our `max_data_xfer_size`, the payload exactly what the count
    /// says, and the range inside a registered host-memory mapping.
    fn server_command_reply(&self, m: &Message) -> std::result::Result<ServerReply, i32> {
        let h = m.header;
        let refuse = |errno: i32, why: &str| {
            log::debug!(
                "vfio-user: refusing the server's {} (id {}) with errno {errno}: {why}",
                command_name(h.command),
                h.id
            );
            Err(errno)
        };
        if !self.negotiated.load(Ordering::Acquire) {
            return refuse(libc::EINVAL, "the version is not negotiated yet");
        }
        if h.command != command::DMA_READ && h.command != command::DMA_WRITE {
            log::warn!(
                "vfio-user server sent unsupported command {} ({})",
                h.command,
                command_name(h.command)
            );
            return Err(libc::ENOTSUP);
        }
        if !m.fds.is_empty() {
            return refuse(libc::EINVAL, "file descriptors attached");
        }
        if !self.options.serve_dma_messages {
            return refuse(libc::ENOTSUP, "DMA messages are not served");
        }
        let Ok(req) = DmaAccessPayload::decode(&m.payload) else {
            return refuse(libc::EINVAL, "payload shorter than 16 bytes");
        };
        if req.count > u64::from(self.options.max_data_xfer_size) {
            return refuse(libc::EINVAL, "count above our max_data_xfer_size");
        }
        // The count is at most a u32 now.
        let len = usize::try_from(req.count).unwrap_or(usize::MAX);
        let data_len = m.payload.len().saturating_sub(DmaAccessPayload::SIZE);
        let expected = if h.command == command::DMA_READ {
            0
        } else {
            len
        };
        if m.payload.len() < DmaAccessPayload::SIZE || data_len != expected {
            return refuse(libc::EINVAL, "payload size does not match the count");
        }
        let result = if h.command == command::DMA_READ {
            self.dma_read(req, len)
                .map(|data| ServerReply::Read(req, data))
        } else {
            let data = m.payload.get(DmaAccessPayload::SIZE..).unwrap_or(&[]);
            self.dma_write(req, data).map(|()| ServerReply::Write(req))
        };
        result.or_else(|errno| refuse(errno, "not inside a registered mapping that allows it"))
    }

    /// Copies `len` (= `req.count`, already checked against our
    /// `max_data_xfer_size`) bytes out of the registered host memory into
    /// a pooled buffer, allocated only once the range was found valid.
    fn dma_read(&self, req: DmaAccessPayload, len: usize) -> std::result::Result<Vec<u8>, i32> {
        // Hold the table lock during the copy so that the domain's unmap cannot
        // return (and the caller free the memory) in the middle of it.
        let dma = lock(&self.dma);
        let e = self.dma_lookup_locked(&dma, req.address, req.count)?;
        let src = e
            .host_addr
            .checked_add(req.address - e.iova)
            .ok_or(libc::EFAULT)?;
        let mut data = self.take_buf();
        data.clear();
        data.resize(len, 0);
        // SAFETY: [src, src + len) lies inside a range the caller of
        // IommuDomain::map declared valid host memory for the whole life of the
        // mapping (the IommuDomain::map contract; the lookup checked the whole
        // range and len == req.count), and the mapping cannot be removed
        // while we hold the table lock. `data` holds len bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(src as *const u8, data.as_mut_ptr(), len);
        }
        Ok(data)
    }

    /// Copies `data` (exactly `req.count` bytes, already checked) into the
    /// registered writable host memory.
    fn dma_write(&self, req: DmaAccessPayload, data: &[u8]) -> std::result::Result<(), i32> {
        if data.len() as u64 != req.count {
            return Err(libc::EINVAL);
        }
        let dma = lock(&self.dma);
        let e = self.dma_lookup_locked(&dma, req.address, req.count)?;
        if e.read_only {
            return Err(libc::EPERM);
        }
        let dst = e
            .host_addr
            .checked_add(req.address - e.iova)
            .ok_or(libc::EFAULT)?;
        // SAFETY: as in dma_read: [dst, dst + data.len()) lies inside
        // writable host memory the caller of IommuDomain::map registered and that
        // stays mapped while we hold the table lock.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), dst as *mut u8, data.len());
        }
        Ok(())
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
}

/// The connection: shared state plus the idle thread, ended on drop.
struct Connection {
    shared: Arc<Shared>,
    idle: Option<JoinHandle<()>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.shared.die(Dead::Closed);
        if let Some(h) = self.idle.take() {
            if h.join().is_err() {
                log::error!("vfio-user idle thread panicked");
            }
        }
    }
}

struct CachedRegion {
    /// As the server reported it, minus `MMAP` when we will not map it.
    info: RegionInfo,
    fd: Option<OwnedFd>,
    /// Why a region the server offered for mmap is not mapped.
    unmapped: Option<String>,
}

/// The DMA side of one vfio-user connection, its [`IommuDomain`]: the
/// server's device is the only one in it. Its mappings are the ranges
/// registered for the server's `DMA_READ` / `DMA_WRITE` plus what the
/// server was told with `DMA_MAP`. Once the [`UserDevice`] is dropped (the
/// connection closed), every call fails with [`Error::Disconnected`].
struct UserDomain {
    shared: Arc<Shared>,
    /// The server's `max_msg_fds`.
    max_msg_fds: u32,
    id: DomainId,
    /// We warned that a file shared by `map` is not sealed against
    /// shrinking (once per connection).
    warned_unsealed_dma: AtomicBool,
}

impl UserDomain {
    /// Warns (once per connection) when a file we share for DMA is not
    /// sealed against shrinking: the server could truncate it, and our own
    /// next access to that memory (or the guest's) would then fault.
    fn warn_if_shrinkable(&self, fd: BorrowedFd<'_>) {
        if self.warned_unsealed_dma.load(Ordering::Relaxed) {
            return;
        }
        // SAFETY: F_GET_SEALS only reads the seals of a descriptor the
        // caller lends us for the call.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals >= 0 && seals & libc::F_SEAL_SHRINK != 0 {
            return;
        }
        if !self.warned_unsealed_dma.swap(true, Ordering::Relaxed) {
            log::warn!(
                "vfio-user dma_map shares a file that is not sealed against shrinking \
                 (F_SEAL_SHRINK): the server could truncate it under this process's memory \
                 (seal guest memory memfds made with MFD_ALLOW_SEALING)"
            );
        }
    }
}

impl IommuDomain for UserDomain {
    fn id(&self) -> DomainId {
        self.id
    }

    /// Registers the range (so that the server's `DMA_READ` / `DMA_WRITE`
    /// to it are served from `host.host_addr`), then sends `DMA_MAP` with
    /// the file, if any.
    ///
    /// # Safety
    ///
    /// As [`IommuDomain::map`]: this process reads and writes the memory at
    /// `host.host_addr` when the server asks, until `unmap` returns.
    unsafe fn map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        if size == 0 || iova.checked_add(size).is_none() {
            return Err(Error::InvalidArgument(format!(
                "DMA range {iova:#x}+{size:#x}"
            )));
        }
        let s = &self.shared;
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
        if let Some(f) = host.file {
            self.warn_if_shrinkable(f.fd);
        }
        if !fds.is_empty() && self.max_msg_fds == 0 {
            lock(&s.dma).retain(|e| e.iova != iova);
            return Err(Error::Unsupported(
                "the server accepts no file descriptors (max_msg_fds is 0)".into(),
            ));
        }
        let result = s
            .request(command::DMA_MAP, &[&req.encode()], &fds, s.options.timeout)
            .and_then(|m| s.expect_plain(&m, 0));
        if result.is_err() {
            lock(&s.dma).retain(|e| e.iova != iova);
        }
        result
    }

    fn unmap(&self, iova: u64, size: u64) -> Result<()> {
        let s = &self.shared;
        // Forget the range first: from now on the server's DMA messages to it
        // are refused, so the caller may free the memory once we return.
        lock(&s.dma).retain(|e| !(e.iova == iova && e.size == size));
        let req = DmaUnmapPayload {
            argsz: DmaUnmapPayload::SIZE as u32,
            flags: 0,
            address: iova,
            size,
        };
        let m = s.request(command::DMA_UNMAP, &[&req.encode()], &[], s.options.timeout)?;
        // The spec has the server echo the entry; some servers send nothing.
        if m.payload.is_empty() {
            return s.expect_plain(&m, 0);
        }
        s.expect_plain(&m, DmaUnmapPayload::SIZE)?;
        let echo = DmaUnmapPayload::decode(&m.payload).map_err(|e| s.violation(e.to_string()))?;
        if echo.address != iova || echo.size != size {
            return Err(s.violation(format!(
                "DMA_UNMAP reply for {:#x}+{:#x} to a request for {iova:#x}+{size:#x}",
                echo.address, echo.size
            )));
        }
        Ok(())
    }

    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>> {
        // vfio-user has no IOMMU aperture: every address may be mapped.
        Ok(vec![0..=u64::MAX])
    }
}

/// A device served by a vfio-user server, reached over a Unix socket.
///
/// Implements [`Vfio`]; every method may be called from several threads at
/// once. Dropping it closes the socket and ends its idle thread.
pub struct UserDevice {
    conn: Connection,
    domain: Arc<UserDomain>,
    info: DeviceInfo,
    server_caps: Capabilities,
    version: (u16, u16),
    /// Region infos (and region fds) read at connect time; `None` where the
    /// server refused the query.
    regions: Vec<Option<CachedRegion>>,
    /// What we know of the device's migration state and data stream.
    mig: Arc<Mutex<mig::MigClient>>,
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

/// A region's info, the fd we may mmap it through, and why we do not map a
/// region the server offered for mmap.
type RegionInfo3 = (RegionInfo, Option<OwnedFd>, Option<String>);

/// Decides whether we may mmap the fd a server shared for a region: only a
/// file sealed against shrinking (`F_SEAL_SHRINK`) and large enough for
/// every mmap-able area. A server could otherwise truncate the file under
/// our mapping, and whoever touches it next dies of SIGBUS: this process,
/// or the guest through a KVM memory slot (`KVM_RUN` fails with `EFAULT`).
/// A seal cannot be removed, so the check holds for the life of the fd.
///
/// `Ok(None)`: the region is not mmap-able (any fd is dropped). `Err`: it
/// is, but we will not map it; the reason names why.
fn vet_region_fd(
    info: &RegionInfo,
    fd: Option<OwnedFd>,
) -> std::result::Result<Option<OwnedFd>, String> {
    if !info.mmappable() || info.size == 0 {
        return Ok(None);
    }
    let Some(fd) = fd else {
        return Err("the server offered it for mmap but shared no file descriptor".into());
    };
    // SAFETY: F_GET_SEALS only reads the seals of the open file behind a
    // descriptor we own for the duration of the call.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(format!(
            "its file cannot carry seals ({}), so the server could shrink it under our mapping",
            std::io::Error::last_os_error()
        ));
    }
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(
            "its file is not sealed against shrinking (F_SEAL_SHRINK), so the server could \
             truncate it under our mapping"
                .into(),
        );
    }
    if info.writable() && seals & (libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE) != 0 {
        return Err("its file is sealed against writes but the region is writable".into());
    }
    let len = fd
        .try_clone()
        .map(std::fs::File::from)
        .and_then(|f| f.metadata())
        .map(|m| m.len())
        .map_err(|e| format!("fstat of its file failed: {e}"))?;
    for a in info.mmap_areas() {
        let end = info
            .offset
            .checked_add(a.offset)
            .and_then(|o| o.checked_add(a.size));
        if end.is_none_or(|e| e > len) {
            return Err(format!(
                "its file has {len:#x} bytes, too few for the mmap-able area {:#x}+{:#x} \
                 at file offset {:#x}",
                a.offset, a.size, info.offset
            ));
        }
    }
    Ok(Some(fd))
}

/// Reports a region as not mmap-able: no `MMAP` flag, no sparse areas.
fn strip_mmap(info: &mut RegionInfo) {
    info.flags &= !crate::region_flags::MMAP;
    info.caps
        .retain(|c| !matches!(c, crate::RegionCap::SparseMmap(_)));
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
            max_data_xfer_size: options.max_data_xfer_size.clamp(1, MAX_DATA_XFER_SIZE),
            ..options
        };
        stream
            .set_write_timeout(Some(options.timeout.max(Duration::from_millis(1))))
            .map_err(|e| Error::io("set the vfio-user send timeout", e))?;
        let max_message = HEADER_SIZE
            .saturating_add(64 * 1024)
            .saturating_add(options.max_data_xfer_size as usize);
        let shared = Arc::new(Shared {
            stream,
            send_lock: Mutex::new(()),
            state: Mutex::new(State {
                next_id: 0,
                slots: Vec::new(),
                timed_out: VecDeque::new(),
                dead: None,
                reader_active: false,
                callers: 0,
                activity: 0,
            }),
            idle_cv: Condvar::new(),
            reader: Mutex::new(ReaderState {
                messages: MessageReader::new(max_message, options.max_msg_fds as usize),
                rcvtimeo: None,
            }),
            pool: Mutex::new(Vec::with_capacity(POOL_BUFFERS)),
            dma: Mutex::new(Vec::new()),
            negotiated: AtomicBool::new(false),
            options,
        });
        let idle_shared = Arc::clone(&shared);
        let idle = std::thread::Builder::new()
            .name("vfio-user-idle".into())
            .spawn(move || idle_shared.idle_loop())
            .map_err(|e| Error::io("spawn the vfio-user idle thread", e))?;
        let conn = Connection {
            shared,
            idle: Some(idle),
        };
        let s = &conn.shared;

        // VERSION.
        let ours = Capabilities {
            max_msg_fds: options.max_msg_fds,
            max_data_xfer_size: options.max_data_xfer_size,
            migration_pgsize: Some(protocol::MIGRATION_PGSIZE),
            migration_max_bitmap_size: Some(u64::from(options.max_data_xfer_size)),
            ..Capabilities::default()
        };
        let payload =
            protocol::encode_version(protocol::VERSION_MAJOR, protocol::VERSION_MINOR, &ours);
        let m = s.request(command::VERSION, &[&payload], &[], options.timeout)?;
        s.expect_at_least(&m, 4)?;
        let (major, minor, server_caps) =
            protocol::decode_version(&m.payload).map_err(|e| s.violation(e.to_string()))?;
        drop(m);
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
        // From now on the server may send commands (DMA_READ / DMA_WRITE).
        s.negotiated.store(true, Ordering::Release);

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
        drop(m);
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
                Ok((info, fd, unmapped)) => {
                    if let Some(why) = &unmapped {
                        log::warn!(
                            "vfio-user region {index}: not mmapped, accessed through \
                             REGION_READ/REGION_WRITE messages instead: {why}"
                        );
                    }
                    regions.push(Some(CachedRegion { info, fd, unmapped }))
                }
                Err(Error::Refused { errno, .. }) => {
                    log::debug!("vfio-user server refused info of region {index}: errno {errno}");
                    regions.push(None);
                }
                Err(e) => return Err(e),
            }
        }

        let domain = Arc::new(UserDomain {
            shared: Arc::clone(&conn.shared),
            max_msg_fds: server_caps.max_msg_fds,
            id: DomainId::new_unique(),
            warned_unsealed_dma: AtomicBool::new(false),
        });
        Ok(UserDevice {
            conn,
            domain,
            info,
            server_caps,
            version: (major, minor),
            regions,
            mig: Arc::default(),
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
        self.shared()
            .region_info(index)
            .map(|(info, _fd, unmapped)| {
                if let Some(why) = unmapped {
                    log::debug!("vfio-user region {index} is reported not mmap-able: {why}");
                }
                info
            })
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
            Error::Unsupported(match &r.unmapped {
                Some(why) => format!("region {index} is not mmapped: {why}"),
                None => format!("region {index} cannot be mmapped"),
            })
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
        // whoever touches it (the VMM or, through KVM, the guest). The fd
        // was kept only if sealed against shrinking and large enough (see
        // `vet_region_fd`); check again, cheaply, before mapping.
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
        if rep.count > MAX_IRQ_VECTORS {
            return Err(s.violation(format!(
                "irq index {index} announces {} vectors, more than the {MAX_IRQ_VECTORS} of any PCI index",
                rep.count
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
        // Batches of the server's max_msg_fds, and never more than the
        // kernel passes in one message.
        let max = (self.server_caps.max_msg_fds as usize).min(SCM_MAX_FD);
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
        // The reset returns the device to RUNNING, ending its data stream.
        self.mig_reset();
        let m = s.request(command::DEVICE_RESET, &[], &[], s.options.reset_timeout)?;
        s.expect_plain(&m, 0)
    }

    fn iommu_domain(&self) -> Arc<dyn IommuDomain> {
        self.domain.clone()
    }

    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        match self.regions.get(index as usize) {
            Some(Some(r)) => r.fd.as_ref().map(|fd| (fd.as_fd(), r.info.offset)),
            _ => None,
        }
    }

    fn migration_flags(&self) -> Result<Option<crate::MigrationFlags>> {
        self.mig_flags()
    }

    fn mig_state(&self) -> Result<crate::MigState> {
        self.mig_get_state()
    }

    fn set_mig_state(
        &self,
        state: crate::MigState,
    ) -> Result<Option<Box<dyn crate::MigrationStream>>> {
        self.mig_set_state(state)
    }

    fn mig_data_size(&self) -> Result<u64> {
        self.mig_get_data_size()
    }

    fn dma_logging_start(&self, page_size: u64, ranges: &[crate::DirtyRange]) -> Result<()> {
        self.logging_start(page_size, ranges)
    }

    fn dma_logging_stop(&self) -> Result<()> {
        self.logging_stop()
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<()> {
        self.logging_report(iova, length, page_size, bitmap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::user::protocol::read_message;
    use std::io::Write;

    fn wire(h: &Header, payload: &[u8]) -> Vec<u8> {
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn irq_info_reply(req: &Message, count: u32) -> Vec<u8> {
        let asked = IrqInfoPayload::decode(&req.payload).unwrap();
        let p = IrqInfoPayload {
            argsz: IrqInfoPayload::SIZE as u32,
            flags: 0,
            index: asked.index,
            count,
        }
        .encode();
        wire(&Header::reply(&req.header, p.len()).unwrap(), &p)
    }

    /// A scripted server on a socket pair: answers VERSION and
    /// DEVICE_GET_INFO (no regions, 4 interrupt indices), then runs `script`.
    fn connect(
        options: UserOptions,
        script: impl FnOnce(UnixStream) + Send + 'static,
    ) -> (UserDevice, JoinHandle<()>) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let server = std::thread::spawn(move || {
            let v = read_message(theirs.as_fd(), 1 << 20, 8).unwrap().unwrap();
            let p = protocol::encode_version(0, 1, &Capabilities::default());
            theirs
                .write_all(&wire(&Header::reply(&v.header, p.len()).unwrap(), &p))
                .unwrap();
            let d = read_message(theirs.as_fd(), 1 << 20, 8).unwrap().unwrap();
            let p = DeviceInfoPayload {
                argsz: DeviceInfoPayload::SIZE as u32,
                flags: 0,
                num_regions: 0,
                num_irqs: 4,
            }
            .encode();
            theirs
                .write_all(&wire(&Header::reply(&d.header, p.len()).unwrap(), &p))
                .unwrap();
            script(theirs);
        });
        (UserDevice::from_stream(ours, options).unwrap(), server)
    }

    #[test]
    fn replies_sent_together_in_reverse_order_reach_their_own_callers() {
        let (dev, server) = connect(UserOptions::default(), |mut s| {
            let a = read_message(s.as_fd(), 1 << 20, 8).unwrap().unwrap();
            let b = read_message(s.as_fd(), 1 << 20, 8).unwrap().unwrap();
            // Both replies in one write, the later request's first: the
            // thread reading them must hand one to the other thread.
            let index = |m: &Message| IrqInfoPayload::decode(&m.payload).unwrap().index;
            let mut both = irq_info_reply(&b, 10 * index(&b));
            both.extend(irq_info_reply(&a, 10 * index(&a)));
            s.write_all(&both).unwrap();
            let _ = read_message(s.as_fd(), 1 << 20, 8);
        });
        let dev = Arc::new(dev);
        let threads: Vec<_> = (1..=2u32)
            .map(|i| {
                let dev = Arc::clone(&dev);
                std::thread::spawn(move || (i, dev.irq_info(i)))
            })
            .collect();
        for t in threads {
            let (i, info) = t.join().unwrap();
            assert_eq!(info.unwrap().count, 10 * i);
        }
        drop(dev);
        server.join().unwrap();
    }

    #[test]
    fn a_reader_that_times_out_leaves_the_socket_to_the_next_waiter() {
        let options = UserOptions {
            timeout: Duration::from_secs(5),
            reset_timeout: Duration::from_millis(200),
            ..UserOptions::default()
        };
        let (dev, server) = connect(options, |mut s| {
            let mut reset = None;
            let mut irq = None;
            for _ in 0..2 {
                let m = read_message(s.as_fd(), 1 << 20, 8).unwrap().unwrap();
                if m.header.command == command::DEVICE_RESET {
                    reset = Some(m);
                } else {
                    irq = Some(m);
                }
            }
            // Answer the interrupt query well after the reset timed out,
            // then the reset (a late reply, to be dropped).
            std::thread::sleep(Duration::from_millis(600));
            s.write_all(&irq_info_reply(&irq.unwrap(), 3)).unwrap();
            let reset = reset.unwrap();
            s.write_all(&wire(&Header::reply(&reset.header, 0).unwrap(), &[]))
                .unwrap();
            // The connection still serves requests.
            let again = read_message(s.as_fd(), 1 << 20, 8).unwrap().unwrap();
            s.write_all(&irq_info_reply(&again, 5)).unwrap();
            let _ = read_message(s.as_fd(), 1 << 20, 8);
        });
        let dev = Arc::new(dev);
        let t0 = Instant::now();
        let resetter = {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || dev.reset())
        };
        // The resetter reads first; the querier waits behind it.
        std::thread::sleep(Duration::from_millis(50));
        let querier = {
            let dev = Arc::clone(&dev);
            std::thread::spawn(move || dev.irq_info(1))
        };
        let reset = resetter.join().unwrap();
        assert!(matches!(reset, Err(Error::Timeout { .. })), "{reset:?}");
        assert_eq!(querier.join().unwrap().unwrap().count, 3);
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert_eq!(dev.irq_info(2).unwrap().count, 5);
        drop(dev);
        server.join().unwrap();
    }

    #[test]
    fn server_close_while_idle_fails_the_next_request_at_once() {
        let (dev, server) = connect(UserOptions::default(), drop);
        server.join().unwrap();
        // No request was waiting: the idle thread noticed the close.
        let t0 = Instant::now();
        while lock(&dev.shared().state).dead.is_none() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let t1 = Instant::now();
        assert!(matches!(dev.irq_info(0), Err(Error::Disconnected(_))));
        assert!(t1.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn a_duplicate_reply_poisons_the_connection() {
        let (dev, server) = connect(UserOptions::default(), |mut s| {
            let m = read_message(s.as_fd(), 1 << 20, 8).unwrap().unwrap();
            let r = irq_info_reply(&m, 1);
            let mut twice = r.clone();
            twice.extend(r);
            s.write_all(&twice).unwrap();
            let _ = read_message(s.as_fd(), 1 << 20, 8);
        });
        // The first copy answers the request; the second is a violation.
        assert_eq!(dev.irq_info(0).unwrap().count, 1);
        assert!(matches!(dev.irq_info(0), Err(Error::Protocol(_))));
        drop(dev);
        server.join().unwrap();
    }
}
