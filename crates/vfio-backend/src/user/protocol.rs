//! The vfio-user wire format: the message header, the command numbers, the
//! payloads of every command we use, the `VERSION` capabilities (JSON) and
//! the passing of file descriptors over a Unix socket (`SCM_RIGHTS`).
//!
//! Everything here is little-endian (the spec says host order; every host we
//! run on is little-endian) and every decoder is a pure function over a byte
//! slice that returns [`Error::Protocol`] on any inconsistency: none of them
//! panics or reads out of bounds, whatever the bytes.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::{Error, RegionCap, RegionInfo, Result, SparseArea};

/// Size of the message header that starts every message.
pub const HEADER_SIZE: usize = 16;

/// The protocol major version we speak.
pub const VERSION_MAJOR: u16 = 0;
/// The highest protocol minor version we speak.
pub const VERSION_MINOR: u16 = 1;

/// Command numbers (`VFIO_USER_*`).
pub mod command {
    /// `VFIO_USER_VERSION`: version and capability negotiation.
    pub const VERSION: u16 = 1;
    /// `VFIO_USER_DMA_MAP`: the client shares memory for DMA.
    pub const DMA_MAP: u16 = 2;
    /// `VFIO_USER_DMA_UNMAP`: the client withdraws shared memory.
    pub const DMA_UNMAP: u16 = 3;
    /// `VFIO_USER_DEVICE_GET_INFO`.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// `VFIO_USER_DEVICE_GET_REGION_INFO`.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS`.
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    /// `VFIO_USER_DEVICE_GET_IRQ_INFO`.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// `VFIO_USER_DEVICE_SET_IRQS`.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// `VFIO_USER_REGION_READ`.
    pub const REGION_READ: u16 = 9;
    /// `VFIO_USER_REGION_WRITE`.
    pub const REGION_WRITE: u16 = 10;
    /// `VFIO_USER_DMA_READ` (server to client).
    pub const DMA_READ: u16 = 11;
    /// `VFIO_USER_DMA_WRITE` (server to client).
    pub const DMA_WRITE: u16 = 12;
    /// `VFIO_USER_DEVICE_RESET`.
    pub const DEVICE_RESET: u16 = 13;
    /// `VFIO_USER_REGION_WRITE_MULTI`.
    pub const REGION_WRITE_MULTI: u16 = 15;
    /// `VFIO_USER_DEVICE_FEATURE`.
    pub const DEVICE_FEATURE: u16 = 16;
    /// `VFIO_USER_MIG_DATA_READ`.
    pub const MIG_DATA_READ: u16 = 17;
    /// `VFIO_USER_MIG_DATA_WRITE`.
    pub const MIG_DATA_WRITE: u16 = 18;
}

/// The name of a command number, for errors and logs.
pub fn command_name(cmd: u16) -> &'static str {
    match cmd {
        command::VERSION => "VERSION",
        command::DMA_MAP => "DMA_MAP",
        command::DMA_UNMAP => "DMA_UNMAP",
        command::DEVICE_GET_INFO => "DEVICE_GET_INFO",
        command::DEVICE_GET_REGION_INFO => "DEVICE_GET_REGION_INFO",
        command::DEVICE_GET_REGION_IO_FDS => "DEVICE_GET_REGION_IO_FDS",
        command::DEVICE_GET_IRQ_INFO => "DEVICE_GET_IRQ_INFO",
        command::DEVICE_SET_IRQS => "DEVICE_SET_IRQS",
        command::REGION_READ => "REGION_READ",
        command::REGION_WRITE => "REGION_WRITE",
        command::DMA_READ => "DMA_READ",
        command::DMA_WRITE => "DMA_WRITE",
        command::DEVICE_RESET => "DEVICE_RESET",
        command::REGION_WRITE_MULTI => "REGION_WRITE_MULTI",
        command::DEVICE_FEATURE => "DEVICE_FEATURE",
        command::MIG_DATA_READ => "MIG_DATA_READ",
        command::MIG_DATA_WRITE => "MIG_DATA_WRITE",
        _ => "unknown command",
    }
}

/// Bits of [`Header::flags`].
pub mod header_flags {
    /// Mask of the message type bits (0-3).
    pub const TYPE_MASK: u32 = 0xf;
    /// Type: a command.
    pub const TYPE_COMMAND: u32 = 0;
    /// Type: a reply.
    pub const TYPE_REPLY: u32 = 1;
    /// The sender of a command wants no reply.
    pub const NO_REPLY: u32 = 1 << 4;
    /// The reply reports an error; [`super::Header::error`] holds the errno.
    pub const ERROR: u32 = 1 << 5;
}

/// `VFIO_IRQ_SET_*` flags of a `DEVICE_SET_IRQS` request.
pub mod irq_set {
    /// No data: act on the range unconditionally.
    pub const DATA_NONE: u32 = 1 << 0;
    /// An array of booleans follows.
    pub const DATA_BOOL: u32 = 1 << 1;
    /// Eventfds come as ancillary data.
    pub const DATA_EVENTFD: u32 = 1 << 2;
    /// Mask action.
    pub const ACTION_MASK: u32 = 1 << 3;
    /// Unmask action.
    pub const ACTION_UNMASK: u32 = 1 << 4;
    /// Trigger action.
    pub const ACTION_TRIGGER: u32 = 1 << 5;
    /// All data-type bits.
    pub const DATA_MASK: u32 = DATA_NONE | DATA_BOOL | DATA_EVENTFD;
    /// All action bits.
    pub const ACTION_MASK_ALL: u32 = ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER;
}

/// Flags of a `DMA_MAP` request.
pub mod dma_flags {
    /// The server may read the range.
    pub const READ: u32 = 1 << 0;
    /// The server may write the range.
    pub const WRITE: u32 = 1 << 1;
}

/// Region capability ids (`VFIO_REGION_INFO_CAP_*`).
pub mod region_cap {
    /// Sparse mmap areas.
    pub const SPARSE_MMAP: u16 = 1;
    /// Device-specific region type.
    pub const TYPE: u16 = 2;
    /// The MSI-X table may be mmapped.
    pub const MSIX_MAPPABLE: u16 = 3;
}

/// The 16-byte header of every message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Message id, echoed by the reply.
    pub id: u16,
    /// Command number, see [`command`].
    pub command: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    /// See [`header_flags`].
    pub flags: u32,
    /// The errno of an error reply (may be 0 even then).
    pub error: u32,
}

impl Header {
    /// A command header for a message with `payload_len` bytes after the header.
    pub fn command(id: u16, command: u16, payload_len: usize) -> Result<Header> {
        Ok(Header {
            id,
            command,
            size: message_size(payload_len)?,
            flags: header_flags::TYPE_COMMAND,
            error: 0,
        })
    }

    /// A successful reply to `request` carrying `payload_len` bytes.
    pub fn reply(request: &Header, payload_len: usize) -> Result<Header> {
        Ok(Header {
            id: request.id,
            command: request.command,
            size: message_size(payload_len)?,
            flags: header_flags::TYPE_REPLY,
            error: 0,
        })
    }

    /// An error reply to `request` with `errno` (header only).
    pub fn error_reply(request: &Header, errno: i32) -> Header {
        Header {
            id: request.id,
            command: request.command,
            size: HEADER_SIZE as u32,
            flags: header_flags::TYPE_REPLY | header_flags::ERROR,
            error: u32::try_from(errno).unwrap_or(libc::EIO as u32),
        }
    }

    /// The message is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & header_flags::TYPE_MASK == header_flags::TYPE_REPLY
    }

    /// The message is a command.
    pub fn is_command(&self) -> bool {
        self.flags & header_flags::TYPE_MASK == header_flags::TYPE_COMMAND
    }

    /// The command asks for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & header_flags::NO_REPLY != 0
    }

    /// The reply reports an error.
    pub fn is_error(&self) -> bool {
        self.flags & header_flags::ERROR != 0
    }

    /// Number of payload bytes after the header.
    pub fn payload_len(&self) -> Result<usize> {
        (self.size as usize)
            .checked_sub(HEADER_SIZE)
            .ok_or_else(|| Error::Protocol(format!("message size {} is below 16", self.size)))
    }

    /// The 16 bytes on the wire.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        let mut w = Writer::new(&mut b);
        w.u16(self.id);
        w.u16(self.command);
        w.u32(self.size);
        w.u32(self.flags);
        w.u32(self.error);
        b
    }

    /// Decodes the first 16 bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Header> {
        let Some(b) = bytes.first_chunk::<HEADER_SIZE>() else {
            // Too short: the reader names what is missing.
            Reader::new(bytes, "message header").bytes(HEADER_SIZE)?;
            return Err(Error::Protocol("message header truncated".into()));
        };
        let [i0, i1, c0, c1, s0, s1, s2, s3, f0, f1, f2, f3, e0, e1, e2, e3] = *b;
        let h = Header {
            id: u16::from_le_bytes([i0, i1]),
            command: u16::from_le_bytes([c0, c1]),
            size: u32::from_le_bytes([s0, s1, s2, s3]),
            flags: u32::from_le_bytes([f0, f1, f2, f3]),
            error: u32::from_le_bytes([e0, e1, e2, e3]),
        };
        if (h.size as usize) < HEADER_SIZE {
            return Err(Error::Protocol(format!(
                "message size {} is below the header size",
                h.size
            )));
        }
        Ok(h)
    }
}

fn message_size(payload_len: usize) -> Result<u32> {
    payload_len
        .checked_add(HEADER_SIZE)
        .and_then(|s| u32::try_from(s).ok())
        .ok_or_else(|| Error::InvalidArgument(format!("message payload of {payload_len} bytes")))
}

/// A bounds-checked little-endian reader over a byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `buf` from its start; `what` names it in errors.
    pub fn new(buf: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader { buf, pos: 0, what }
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n);
        match end.and_then(|e| self.buf.get(self.pos..e)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(Error::Protocol(format!(
                "{} truncated: {} bytes, needed {} more at offset {}",
                self.what,
                self.buf.len(),
                n,
                self.pos
            ))),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }
}

/// A little-endian writer into a fixed buffer; writes past the end are
/// dropped (the buffers are sized by the callers in this module).
struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, pos: 0 }
    }
    fn put(&mut self, b: &[u8]) {
        let end = self.pos.saturating_add(b.len());
        if let Some(dst) = self.buf.get_mut(self.pos..end) {
            dst.copy_from_slice(b);
        }
        self.pos = end;
    }
    fn u16(&mut self, v: u16) {
        self.put(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
}

/// Defines a fixed-size little-endian payload struct with `SIZE`, `encode`
/// and a bounds-checked `decode` (fields in wire order).
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        $name:ident, $size:literal, $what:literal {
            $( $(#[$fmeta:meta])* $field:ident : $ty:ident, )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct $name {
            $( $(#[$fmeta])* pub $field: $ty, )*
        }

        // The declared size is the sum of the fields: checked at compile time.
        const _: () = assert!(0 $( + std::mem::size_of::<$ty>() )* == $size);

        impl $name {
            /// Encoded size.
            pub const SIZE: usize = $size;

            /// The bytes on the wire.
            pub fn encode(&self) -> [u8; Self::SIZE] {
                let mut b = [0u8; Self::SIZE];
                let mut w = Writer::new(&mut b);
                $( w.$ty(self.$field); )*
                b
            }

            /// Decodes the first `SIZE` bytes of `bytes`.
            pub fn decode(bytes: &[u8]) -> Result<Self> {
                let mut r = Reader::new(bytes, $what);
                Ok($name { $( $field: r.$ty()?, )* })
            }
        }
    };
}

wire_struct! {
    /// The payload of `DEVICE_GET_INFO` (request and reply), 16 bytes.
    DeviceInfoPayload, 16, "DEVICE_GET_INFO payload" {
        /// Request: maximum reply size; reply: size of the full reply.
        argsz: u32,
        /// `VFIO_DEVICE_FLAGS_*`.
        flags: u32,
        /// Number of regions.
        num_regions: u32,
        /// Number of interrupt indices.
        num_irqs: u32,
    }
}

wire_struct! {
    /// The fixed part of the `DEVICE_GET_REGION_INFO` payload (`struct
    /// vfio_region_info`), 32 bytes; capabilities follow in a reply.
    RegionInfoPayload, 32, "DEVICE_GET_REGION_INFO payload" {
        /// Request: maximum reply size; reply: size of the full reply.
        argsz: u32,
        /// `VFIO_REGION_INFO_FLAG_*`.
        flags: u32,
        /// Region index.
        index: u32,
        /// Offset of the first capability from the start of this structure, or 0.
        cap_offset: u32,
        /// Region size.
        size: u64,
        /// mmap offset of the region in the region fd.
        offset: u64,
    }
}

/// The most capabilities we walk in one region info reply.
pub const MAX_REGION_CAPS: usize = 32;

/// Decodes a whole `DEVICE_GET_REGION_INFO` reply payload (the fixed part
/// and the capability chain) into a [`RegionInfo`]. Capability offsets are
/// relative to the start of `payload`; each must lie after the previous one
/// (so the walk ends), and every capability must lie inside `payload`.
/// Sparse areas must lie inside the region.
pub fn decode_region_info(payload: &[u8]) -> Result<RegionInfo> {
    let fixed = RegionInfoPayload::decode(payload)?;
    let mut info = RegionInfo {
        index: fixed.index,
        flags: fixed.flags,
        size: fixed.size,
        offset: fixed.offset,
        caps: Vec::new(),
    };
    if fixed.flags & crate::region_flags::CAPS == 0 || fixed.cap_offset == 0 {
        return Ok(info);
    }
    let mut next = fixed.cap_offset as usize;
    let mut last_end = RegionInfoPayload::SIZE;
    while next != 0 {
        if info.caps.len() >= MAX_REGION_CAPS {
            return Err(Error::Protocol(format!(
                "region {} has more than {MAX_REGION_CAPS} capabilities",
                fixed.index
            )));
        }
        if next < last_end {
            return Err(Error::Protocol(format!(
                "region {} capability at offset {next} overlaps what precedes it",
                fixed.index
            )));
        }
        let body = payload.get(next..).ok_or_else(|| {
            Error::Protocol(format!(
                "region {} capability offset {next} is past the {} bytes of the reply",
                fixed.index,
                payload.len()
            ))
        })?;
        let mut r = Reader::new(body, "region capability");
        let id = r.u16()?;
        let version = r.u16()?;
        let following = r.u32()? as usize;
        let cap = match id {
            region_cap::SPARSE_MMAP => {
                let nr = r.u32()? as usize;
                let _reserved = r.u32()?;
                // Each area is 16 bytes: refuse counts the reply cannot hold
                // before allocating anything.
                if nr > r.rest().len() / 16 {
                    return Err(Error::Protocol(format!(
                        "region {} sparse mmap capability claims {nr} areas that do not fit",
                        fixed.index
                    )));
                }
                let mut areas = Vec::with_capacity(nr);
                for _ in 0..nr {
                    let area = SparseArea {
                        offset: r.u64()?,
                        size: r.u64()?,
                    };
                    let inside = area
                        .offset
                        .checked_add(area.size)
                        .is_some_and(|end| end <= fixed.size);
                    if !inside {
                        return Err(Error::Protocol(format!(
                            "region {} sparse area {:#x}+{:#x} is outside the region of {:#x} bytes",
                            fixed.index, area.offset, area.size, fixed.size
                        )));
                    }
                    areas.push(area);
                }
                RegionCap::SparseMmap(areas)
            }
            region_cap::TYPE => RegionCap::Type {
                type_: r.u32()?,
                subtype: r.u32()?,
            },
            region_cap::MSIX_MAPPABLE => RegionCap::MsixMappable,
            _ => RegionCap::Unknown { id, version },
        };
        info.caps.push(cap);
        last_end = next.saturating_add(8);
        if following != 0 && following <= next {
            return Err(Error::Protocol(format!(
                "region {} capability chain goes backwards ({next} -> {following})",
                fixed.index
            )));
        }
        next = following;
    }
    Ok(info)
}

/// Encodes a region info reply: the fixed part followed by the capability
/// chain for `info.caps` (capabilities of unknown layout are left out).
/// When `max_argsz` cannot hold the capabilities, only the fixed part is
/// returned, with `argsz` set to the size needed so that the client can ask
/// again. The `CAPS` flag is then clear and `cap_offset` 0: in vfio-user the
/// flag says "capabilities are in this reply" (QEMU's client refuses a reply
/// whose flag is set with `cap_offset` inside the fixed part), unlike the
/// kernel ioctl, which sets it whenever the region has capabilities.
pub fn encode_region_info(info: &RegionInfo, offset: u64, max_argsz: u32) -> Vec<u8> {
    let mut caps: Vec<Vec<u8>> = Vec::new();
    for cap in &info.caps {
        let mut body = Vec::new();
        let id = match cap {
            RegionCap::SparseMmap(areas) => {
                body.extend_from_slice(&u32::try_from(areas.len()).unwrap_or(0).to_le_bytes());
                body.extend_from_slice(&0u32.to_le_bytes());
                for a in areas.iter().take(u32::MAX as usize) {
                    body.extend_from_slice(&a.offset.to_le_bytes());
                    body.extend_from_slice(&a.size.to_le_bytes());
                }
                region_cap::SPARSE_MMAP
            }
            RegionCap::Type { type_, subtype } => {
                body.extend_from_slice(&type_.to_le_bytes());
                body.extend_from_slice(&subtype.to_le_bytes());
                region_cap::TYPE
            }
            RegionCap::MsixMappable => region_cap::MSIX_MAPPABLE,
            RegionCap::Unknown { .. } => continue,
        };
        let mut c = Vec::with_capacity(8 + body.len());
        c.extend_from_slice(&id.to_le_bytes());
        c.extend_from_slice(&1u16.to_le_bytes());
        c.extend_from_slice(&0u32.to_le_bytes()); // next, patched below
        c.extend_from_slice(&body);
        caps.push(c);
    }
    let caps_len: usize = caps.iter().map(Vec::len).sum();
    let full = RegionInfoPayload::SIZE.saturating_add(caps_len);
    let mut fixed = RegionInfoPayload {
        argsz: u32::try_from(full).unwrap_or(u32::MAX),
        flags: info.flags & !crate::region_flags::CAPS,
        index: info.index,
        cap_offset: 0,
        size: info.size,
        offset,
    };
    if caps.is_empty() || (max_argsz as usize) < full {
        return fixed.encode().to_vec();
    }
    fixed.flags |= crate::region_flags::CAPS;
    fixed.cap_offset = RegionInfoPayload::SIZE as u32;
    let mut out = Vec::with_capacity(full);
    out.extend_from_slice(&fixed.encode());
    let n = caps.len();
    for (i, mut c) in caps.into_iter().enumerate() {
        let next = if i + 1 < n {
            u32::try_from(out.len().saturating_add(c.len())).unwrap_or(0)
        } else {
            0
        };
        if let Some(slot) = c.get_mut(4..8) {
            slot.copy_from_slice(&next.to_le_bytes());
        }
        out.extend_from_slice(&c);
    }
    out
}

wire_struct! {
    /// The payload of `DEVICE_GET_IRQ_INFO` (request and reply), 16 bytes.
    IrqInfoPayload, 16, "DEVICE_GET_IRQ_INFO payload" {
        /// Request: maximum reply size; reply: size of the full reply.
        argsz: u32,
        /// `VFIO_IRQ_INFO_*`.
        flags: u32,
        /// Interrupt index.
        index: u32,
        /// Number of vectors.
        count: u32,
    }
}

wire_struct! {
    /// The fixed part of a `DEVICE_SET_IRQS` request (`struct vfio_irq_set`), 20
    /// bytes; booleans follow for `DATA_BOOL`.
    SetIrqsPayload, 20, "DEVICE_SET_IRQS payload" {
        /// Size of the request payload, data included.
        argsz: u32,
        /// See [`irq_set`].
        flags: u32,
        /// Interrupt index.
        index: u32,
        /// First vector.
        start: u32,
        /// Number of vectors.
        count: u32,
    }
}

wire_struct! {
    /// The fixed part of `REGION_READ` / `REGION_WRITE` (request and reply), 16
    /// bytes; data follows in a read reply and a write request.
    RegionAccessPayload, 16, "REGION_READ/WRITE payload" {
        /// Offset in the region.
        offset: u64,
        /// Region index.
        region: u32,
        /// Number of bytes.
        count: u32,
    }
}

wire_struct! {
    /// The fixed part of `DMA_READ` / `DMA_WRITE` (request and reply), 16 bytes.
    DmaAccessPayload, 16, "DMA_READ/WRITE payload" {
        /// DMA address.
        address: u64,
        /// Number of bytes.
        count: u64,
    }
}

wire_struct! {
    /// A `DMA_MAP` request, 32 bytes.
    DmaMapPayload, 32, "DMA_MAP payload" {
        /// Size of this structure (32).
        argsz: u32,
        /// See [`dma_flags`].
        flags: u32,
        /// Offset of the range in the file sent with the message.
        offset: u64,
        /// DMA address of the range.
        address: u64,
        /// Size of the range.
        size: u64,
    }
}

wire_struct! {
    /// A `DMA_UNMAP` request (and its reply), 24 bytes.
    DmaUnmapPayload, 24, "DMA_UNMAP payload" {
        /// Maximum reply size.
        argsz: u32,
        /// Unused in this protocol version (0).
        flags: u32,
        /// DMA address of the mapping.
        address: u64,
        /// Size of the mapping.
        size: u64,
    }
}

/// `VFIO_USER_DEVICE_FEATURE` flags and feature indices: the kernel's
/// `VFIO_DEVICE_FEATURE_*` values, which vfio-user reuses.
pub mod feature {
    /// The feature index bits of `flags`.
    pub const MASK: u32 = 0xffff;
    /// Get the feature's data.
    pub const GET: u32 = 1 << 16;
    /// Set the feature's data.
    pub const SET: u32 = 1 << 17;
    /// Probe whether GET and/or SET of the feature are supported.
    pub const PROBE: u32 = 1 << 18;
    /// Every flag bit a request may carry.
    pub const KNOWN: u32 = MASK | GET | SET | PROBE;
    /// `VFIO_DEVICE_FEATURE_MIGRATION`: the migration flags (GET).
    pub const MIGRATION: u32 = 1;
    /// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`: the migration state (GET, SET).
    pub const MIG_DEVICE_STATE: u32 = 2;
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` (SET).
    pub const DMA_LOGGING_START: u32 = 6;
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP` (SET).
    pub const DMA_LOGGING_STOP: u32 = 7;
    /// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` (GET).
    pub const DMA_LOGGING_REPORT: u32 = 8;
    /// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` (GET): the kernel's, not in the
    /// vfio-user spec; our client and server both speak it.
    pub const MIG_DATA_SIZE: u32 = 9;
}

wire_struct! {
    /// The head of a `DEVICE_FEATURE` payload (`struct vfio_device_feature`
    /// without its data), 8 bytes.
    FeatureHeader, 8, "DEVICE_FEATURE payload" {
        /// Request: maximum reply size; reply: size of the reply.
        argsz: u32,
        /// Feature index and GET / SET / PROBE.
        flags: u32,
    }
}

wire_struct! {
    /// The data of `MIG_DEVICE_STATE` (`struct
    /// vfio_device_feature_mig_state`), 8 bytes.
    MigStatePayload, 8, "MIG_DEVICE_STATE data" {
        /// `enum vfio_device_mig_state`.
        device_state: u32,
        /// Unused by vfio-user (`-1`, all ones).
        data_fd: u32,
    }
}

wire_struct! {
    /// The head of `DMA_LOGGING_START`'s data, 16 bytes; the ranges follow.
    DmaLoggingControl, 16, "DMA_LOGGING_START data" {
        /// Tracking granularity.
        page_size: u64,
        /// Number of ranges that follow.
        num_ranges: u32,
        /// Zero.
        reserved: u32,
    }
}

wire_struct! {
    /// One range of `DMA_LOGGING_START`, 16 bytes.
    DmaLoggingRange, 16, "DMA_LOGGING_START range" {
        /// First IOVA.
        iova: u64,
        /// Length in bytes.
        length: u64,
    }
}

wire_struct! {
    /// `DMA_LOGGING_REPORT`'s data, 24 bytes; the reply appends the bitmap.
    DmaLoggingReport, 24, "DMA_LOGGING_REPORT data" {
        /// First IOVA.
        iova: u64,
        /// Length in bytes.
        length: u64,
        /// Bitmap granularity (a power of two).
        page_size: u64,
    }
}

wire_struct! {
    /// The head of `MIG_DATA_READ` / `MIG_DATA_WRITE` payloads, 8 bytes;
    /// the data follows (read reply, write request).
    MigDataPayload, 8, "MIG_DATA payload" {
        /// Request: maximum reply size; read reply: size of the reply.
        argsz: u32,
        /// Bytes of migration data asked for or carried.
        size: u32,
    }
}

/// The most ranges one `DMA_LOGGING_START` carries (the kernel's
/// `LOG_MAX_RANGES`).
pub const MAX_DMA_LOGGING_RANGES: usize = 256;

/// The dirty-page granularity we announce in the `migration` capability.
pub const MIGRATION_PGSIZE: u64 = 4096;

/// The capabilities one side announces in `VERSION` (spec defaults where
/// the JSON leaves a field out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Most file descriptors the sender accepts in one message (default 1).
    pub max_msg_fds: u32,
    /// Most data bytes in one REGION/DMA READ/WRITE (default 1 MiB).
    pub max_data_xfer_size: u32,
    /// Most simultaneous DMA mappings (default 65535).
    pub max_dma_maps: u32,
    /// DMA page sizes supported, or'ed (default 4 KiB).
    pub pgsizes: u64,
    /// The `migration.pgsize` capability, when the sender announces migration.
    pub migration_pgsize: Option<u64>,
    /// The `migration.max_bitmap_size` capability: the largest dirty bitmap
    /// (bytes) the sender takes in one message.
    pub migration_max_bitmap_size: Option<u64>,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            max_msg_fds: 1,
            max_data_xfer_size: 1 << 20,
            max_dma_maps: 65535,
            pgsizes: 4096,
            migration_pgsize: None,
            migration_max_bitmap_size: None,
        }
    }
}

#[derive(Serialize, Deserialize, Default)]
struct VersionJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    capabilities: Option<CapsJson>,
}

#[derive(Serialize, Deserialize, Default)]
struct CapsJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_msg_fds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_data_xfer_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_dma_maps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pgsizes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    migration: Option<MigrationJson>,
}

#[derive(Serialize, Deserialize, Default)]
struct MigrationJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pgsize: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_bitmap_size: Option<u64>,
}

fn json_u32(v: Option<u64>, default: u32, name: &str) -> Result<u32> {
    match v {
        None => Ok(default),
        Some(v) => u32::try_from(v)
            .map_err(|_| Error::Protocol(format!("capability {name} = {v} is out of range"))),
    }
}

/// A `VERSION` payload: major, minor, then NUL-terminated JSON.
pub fn encode_version(major: u16, minor: u16, caps: &Capabilities) -> Vec<u8> {
    let json = VersionJson {
        capabilities: Some(CapsJson {
            max_msg_fds: Some(caps.max_msg_fds.into()),
            max_data_xfer_size: Some(caps.max_data_xfer_size.into()),
            max_dma_maps: Some(caps.max_dma_maps.into()),
            pgsizes: Some(caps.pgsizes),
            migration: (caps.migration_pgsize.is_some()
                || caps.migration_max_bitmap_size.is_some())
            .then_some(MigrationJson {
                pgsize: caps.migration_pgsize,
                max_bitmap_size: caps.migration_max_bitmap_size,
            }),
        }),
    };
    let text = serde_json::to_vec(&json).unwrap_or_else(|_| b"{}".to_vec());
    let mut out = Vec::with_capacity(4 + text.len() + 1);
    out.extend_from_slice(&major.to_le_bytes());
    out.extend_from_slice(&minor.to_le_bytes());
    out.extend_from_slice(&text);
    out.push(0);
    out
}

/// Decodes a `VERSION` payload into (major, minor, capabilities). The JSON
/// is optional; it ends at the first NUL (or at the end of the payload).
pub fn decode_version(payload: &[u8]) -> Result<(u16, u16, Capabilities)> {
    let mut r = Reader::new(payload, "VERSION payload");
    let major = r.u16()?;
    let minor = r.u16()?;
    let rest = r.rest();
    let text = match rest.iter().position(|&b| b == 0) {
        Some(n) => rest.get(..n).unwrap_or(&[]),
        None => rest,
    };
    let mut caps = Capabilities::default();
    if text.iter().all(u8::is_ascii_whitespace) {
        return Ok((major, minor, caps));
    }
    let json: VersionJson = serde_json::from_slice(text)
        .map_err(|e| Error::Protocol(format!("VERSION capabilities are not valid JSON: {e}")))?;
    if let Some(c) = json.capabilities {
        caps.max_msg_fds = json_u32(c.max_msg_fds, caps.max_msg_fds, "max_msg_fds")?;
        caps.max_data_xfer_size = json_u32(
            c.max_data_xfer_size,
            caps.max_data_xfer_size,
            "max_data_xfer_size",
        )?;
        caps.max_dma_maps = json_u32(c.max_dma_maps, caps.max_dma_maps, "max_dma_maps")?;
        caps.pgsizes = c.pgsizes.unwrap_or(caps.pgsizes);
        if let Some(m) = c.migration {
            caps.migration_pgsize = m.pgsize;
            caps.migration_max_bitmap_size = m.max_bitmap_size;
        }
    }
    Ok((major, minor, caps))
}

/// One received message: header, payload and the file descriptors that came
/// with it.
#[derive(Debug)]
pub struct Message {
    /// The header.
    pub header: Header,
    /// The bytes after the header.
    pub payload: Vec<u8>,
    /// The file descriptors received with the message (owned: closed on drop).
    pub fds: Vec<OwnedFd>,
    /// The peer sent more file descriptors than we accept; the extra ones
    /// were closed.
    pub fds_dropped: bool,
}

fn io_error(context: &str, e: std::io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN) => {
            Error::Disconnected(format!("{context}: {e}"))
        }
        _ => Error::io(context, e),
    }
}

/// Bytes of control buffer for `max_fds` descriptors.
fn cmsg_space(max_fds: usize) -> usize {
    let bytes = max_fds.saturating_mul(std::mem::size_of::<RawFd>());
    let bytes = u32::try_from(bytes).unwrap_or(u32::MAX / 2);
    // SAFETY: CMSG_SPACE is a pure size computation.
    unsafe { libc::CMSG_SPACE(bytes) as usize }
}

/// One `recvmsg` into `buf`: returns the bytes read, appends the received
/// descriptors (at most `max_fds` in total, counting those already in `fds`)
/// and reports whether any were dropped (closed).
fn recv_some(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<(usize, bool)> {
    recv_some_flags(fd, buf, max_fds, fds, 0)
}

/// Room for the control message of the most descriptors the kernel passes
/// in one message (`SCM_MAX_FD`, 253), in u64 words (aligned for cmsghdr).
const CONTROL_WORDS: usize = 130;

/// [`recv_some`] with extra `recvmsg` flags (e.g. `MSG_DONTWAIT`). Does not
/// allocate unless descriptors arrive.
fn recv_some_flags(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    fds: &mut Vec<OwnedFd>,
    flags: libc::c_int,
) -> std::io::Result<(usize, bool)> {
    // Room for a few more descriptors than we accept, so that a peer sending
    // slightly too many is detected (and its descriptors closed) rather than
    // silently truncated by the kernel.
    let room = max_fds.saturating_add(4).min(253);
    // u64 storage keeps the control buffer aligned for cmsghdr. Left
    // uninitialised: the kernel writes it and only the `msg_controllen` bytes
    // it reports written are read back (zeroing 1 KiB cost more than the rest
    // of this function on every message).
    let mut control = std::mem::MaybeUninit::<[u64; CONTROL_WORDS]>::uninit();
    let mut iov = [IoSliceMut::new(buf)];
    // SAFETY: msghdr is plain data; all-zero is a valid empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr().cast();
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = cmsg_space(room).min(CONTROL_WORDS * 8);
    let n = loop {
        // SAFETY: msg points at a live iovec over `buf` and at `control`,
        // both valid for the lengths given, and outlive the call.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut dropped = msg.msg_flags & libc::MSG_CTRUNC != 0;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled
    // in, within msg_controllen (which recvmsg set to the bytes it wrote, so
    // nothing uninitialised is read); each descriptor in an SCM_RIGHTS message is
    // a fresh descriptor now owned by this process, which we take over once.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg);
                let header_len = libc::CMSG_LEN(0) as usize;
                let len = ((*cmsg).cmsg_len as usize).saturating_sub(header_len);
                let count = len / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    let owned = OwnedFd::from_raw_fd(raw);
                    if fds.len() < max_fds {
                        fds.push(owned);
                    } else {
                        dropped = true;
                        drop(owned);
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok((n, dropped))
}

/// Reads exactly `buf.len()` bytes, collecting descriptors. Returns false
/// on end-of-stream before the first byte.
fn recv_exact(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    max_fds: usize,
    fds: &mut Vec<OwnedFd>,
    dropped: &mut bool,
    what: &str,
) -> Result<bool> {
    let mut got = 0usize;
    while got < buf.len() {
        let rest = buf.get_mut(got..).unwrap_or(&mut []);
        let (n, d) = recv_some(fd, rest, max_fds, fds).map_err(|e| io_error(what, e))?;
        *dropped |= d;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(Error::Disconnected(format!(
                "{what}: peer closed the connection mid-message ({got} of {} bytes)",
                buf.len()
            )));
        }
        got = got.saturating_add(n);
    }
    Ok(true)
}

/// Reads one whole message from a stream socket. Returns `Ok(None)` when
/// the peer closed the connection between messages. A message bigger than
/// `max_size` (header included) is a protocol error (the stream cannot be
/// resynchronised after it). At most `max_fds` descriptors are kept; more
/// are closed and reported in [`Message::fds_dropped`].
pub fn read_message(
    fd: BorrowedFd<'_>,
    max_size: usize,
    max_fds: usize,
) -> Result<Option<Message>> {
    let mut fds = Vec::new();
    let mut dropped = false;
    let mut hdr = [0u8; HEADER_SIZE];
    if !recv_exact(
        fd,
        &mut hdr,
        max_fds,
        &mut fds,
        &mut dropped,
        "vfio-user receive",
    )? {
        return Ok(None);
    }
    let header = Header::decode(&hdr)?;
    if header.size as usize > max_size {
        return Err(Error::Protocol(format!(
            "{} message of {} bytes exceeds the limit of {max_size}",
            command_name(header.command),
            header.size
        )));
    }
    let mut payload = vec![0u8; header.payload_len()?];
    if !payload.is_empty()
        && !recv_exact(
            fd,
            &mut payload,
            max_fds,
            &mut fds,
            &mut dropped,
            "vfio-user receive",
        )?
    {
        return Err(Error::Disconnected(
            "peer closed the connection after a message header".into(),
        ));
    }
    Ok(Some(Message {
        header,
        payload,
        fds,
        fds_dropped: dropped,
    }))
}

/// Bytes a [`MessageReader`] buffers. Messages up to this size are parsed
/// out of the buffer; bigger ones get a buffer of their own.
pub const READ_BUFFER_SIZE: usize = 16 * 1024;

/// What one [`MessageReader::recv`] got from the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// This many bytes arrived.
    Data(usize),
    /// Nothing arrived: the socket's receive timeout expired, or nothing was
    /// waiting for a non-blocking read.
    WouldBlock,
    /// The peer closed the connection.
    Closed,
}

/// Descriptors that came with one `recvmsg`, and the stream position just
/// after its last byte: they belong to the message holding that byte.
#[derive(Debug)]
struct FdBatch {
    end: u64,
    fds: Vec<OwnedFd>,
    truncated: bool,
}

/// A message too big for the shared buffer, being received into its own.
#[derive(Debug)]
struct BigMessage {
    header: Header,
    payload: Vec<u8>,
    filled: usize,
}

/// A buffered reader of messages from a stream socket: one `recvmsg` takes
/// whatever the socket holds (often a whole message, or several), and
/// [`MessageReader::next_message`] cuts complete messages out of it without
/// further system calls. It keeps partial messages between calls, so it can
/// be used with receive timeouts and non-blocking reads, by one thread at a
/// time.
///
/// File descriptors are given to the message that holds the last byte of
/// the `recvmsg` that brought them. Linux ends a `recvmsg` right after the
/// data that carried descriptors, and a sender attaches them to the first
/// byte of its message, so this is the message they were sent with.
#[derive(Debug)]
pub struct MessageReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    big: Option<BigMessage>,
    /// Stream position of `buf[start]` (or of the big message's start).
    consumed: u64,
    /// Stream position after the last byte received.
    received: u64,
    batches: std::collections::VecDeque<FdBatch>,
    max_size: usize,
    max_fds: usize,
}

impl MessageReader {
    /// A reader that refuses messages bigger than `max_size` bytes (header
    /// included) and keeps at most `max_fds` descriptors per message.
    pub fn new(max_size: usize, max_fds: usize) -> MessageReader {
        MessageReader {
            buf: vec![0u8; READ_BUFFER_SIZE],
            start: 0,
            end: 0,
            big: None,
            consumed: 0,
            received: 0,
            batches: std::collections::VecDeque::new(),
            max_size,
            max_fds,
        }
    }

    /// No part of a message is buffered: the stream is between messages.
    pub fn is_idle(&self) -> bool {
        self.big.is_none() && self.start == self.end
    }

    /// Cuts the next complete message out of what was received, if there
    /// is one; no system call. `payload_buf` gives the vector the payload of
    /// a small message is copied into (so callers can recycle them).
    /// A header that is malformed or announces more than the size limit is
    /// [`Error::Protocol`]; the stream cannot be resynchronised after it.
    pub fn next_message(
        &mut self,
        payload_buf: impl FnOnce() -> Vec<u8>,
    ) -> Result<Option<Message>> {
        if let Some(big) = &self.big {
            if big.filled < big.payload.len() {
                return Ok(None);
            }
            let Some(big) = self.big.take() else {
                return Ok(None);
            };
            return Ok(Some(self.finish(big.header, big.payload)));
        }
        let avail = self.end.saturating_sub(self.start);
        if avail < HEADER_SIZE {
            return Ok(None);
        }
        let header = Header::decode(self.buf.get(self.start..self.end).unwrap_or(&[]))?;
        let size = header.size as usize;
        if size > self.max_size {
            return Err(Error::Protocol(format!(
                "{} message of {} bytes exceeds the limit of {}",
                command_name(header.command),
                header.size,
                self.max_size
            )));
        }
        let body = self.start.saturating_add(HEADER_SIZE);
        if avail >= size {
            let end = self.start.saturating_add(size);
            let mut payload = payload_buf();
            payload.clear();
            payload.extend_from_slice(self.buf.get(body..end).unwrap_or(&[]));
            self.start = end;
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            return Ok(Some(self.finish(header, payload)));
        }
        if size > self.buf.len() {
            // Too big for the buffer: everything buffered belongs to it.
            let mut payload = vec![0u8; size - HEADER_SIZE];
            let have = self.buf.get(body..self.end).unwrap_or(&[]);
            let filled = have.len();
            if let Some(dst) = payload.get_mut(..filled) {
                dst.copy_from_slice(have);
            }
            self.start = 0;
            self.end = 0;
            self.big = Some(BigMessage {
                header,
                payload,
                filled,
            });
        }
        Ok(None)
    }

    /// Accounts for one complete message of `header.size` bytes starting at
    /// `consumed` and gives it its descriptors.
    fn finish(&mut self, header: Header, payload: Vec<u8>) -> Message {
        self.consumed = self.consumed.saturating_add(u64::from(header.size));
        let mut fds = Vec::new();
        let mut dropped = false;
        while self.batches.front().is_some_and(|b| b.end <= self.consumed) {
            let Some(batch) = self.batches.pop_front() else {
                break;
            };
            dropped |= batch.truncated;
            for fd in batch.fds {
                if fds.len() < self.max_fds {
                    fds.push(fd);
                } else {
                    dropped = true;
                }
            }
        }
        Message {
            header,
            payload,
            fds,
            fds_dropped: dropped,
        }
    }

    /// One `recvmsg` of whatever the socket holds, up to the free buffer
    /// space (or the rest of a big message). Blocks as the socket does,
    /// unless `nonblocking`. Interrupted calls are retried.
    pub fn recv(&mut self, fd: BorrowedFd<'_>, nonblocking: bool) -> Result<Received> {
        let flags = if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let mut fds = Vec::new();
        let target: &mut [u8] = match &mut self.big {
            Some(big) => big.payload.get_mut(big.filled..).unwrap_or(&mut []),
            None => {
                if self.start > 0 {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                }
                self.buf.get_mut(self.end..).unwrap_or(&mut [])
            }
        };
        if target.is_empty() {
            // Cannot happen: a message that does not fit gets its own buffer.
            return Err(Error::Protocol("vfio-user receive buffer full".into()));
        }
        let (n, truncated) = match recv_some_flags(fd, target, self.max_fds, &mut fds, flags) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Received::WouldBlock)
            }
            Err(e) => return Err(io_error("vfio-user receive", e)),
        };
        if n == 0 {
            return Ok(Received::Closed);
        }
        match &mut self.big {
            Some(big) => big.filled = big.filled.saturating_add(n),
            None => self.end = self.end.saturating_add(n),
        }
        self.received = self.received.saturating_add(n as u64);
        if !fds.is_empty() || truncated {
            self.batches.push_back(FdBatch {
                end: self.received,
                fds,
                truncated,
            });
        }
        Ok(Received::Data(n))
    }

    /// Reads the next whole message, blocking as the socket does. Returns
    /// `Ok(None)` when the peer closed the connection between messages; a
    /// receive timeout of the socket is [`Error::Timeout`].
    pub fn read_message(&mut self, fd: BorrowedFd<'_>) -> Result<Option<Message>> {
        self.read_message_reusing(fd, &mut Vec::new())
    }

    /// [`read_message`](Self::read_message), with the payload copied into
    /// `spare` (taken, so the caller hands it back from the message when it
    /// is done): a loop that recycles its buffers receives small messages
    /// without allocating.
    pub fn read_message_reusing(
        &mut self,
        fd: BorrowedFd<'_>,
        spare: &mut Vec<u8>,
    ) -> Result<Option<Message>> {
        loop {
            if let Some(m) = self.next_message(|| std::mem::take(spare))? {
                return Ok(Some(m));
            }
            match self.recv(fd, false)? {
                Received::Data(_) => {}
                Received::WouldBlock => {
                    return Err(Error::Timeout {
                        request: "receive",
                        after: std::time::Duration::ZERO,
                    })
                }
                Received::Closed if self.is_idle() => return Ok(None),
                Received::Closed => {
                    return Err(Error::Disconnected(
                        "peer closed the connection mid-message".into(),
                    ))
                }
            }
        }
    }
}

/// Most pieces (header included) a message is sent from without a heap
/// allocation.
const STACK_IOVECS: usize = 8;

/// Fills `out` with the not yet sent parts of `pieces` (skipping `sent`
/// bytes); returns how many entries were used.
fn remaining_iovecs<'a>(pieces: &[&'a [u8]], mut skip: usize, out: &mut [IoSlice<'a>]) -> usize {
    let mut used = 0usize;
    for p in pieces {
        if skip >= p.len() {
            skip -= p.len();
            continue;
        }
        let Some(slot) = out.get_mut(used) else {
            break;
        };
        *slot = IoSlice::new(p.get(skip..).unwrap_or(&[]));
        skip = 0;
        used += 1;
    }
    used
}

/// Messages up to this size without descriptors are copied into one buffer
/// and sent with `send`, which costs the kernel less than `sendmsg`.
const SMALL_MESSAGE: usize = 512;

/// Maps a failed send to our errors (a send timeout is [`Error::Timeout`]).
fn send_error(header: &Header, e: std::io::Error) -> Error {
    if matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ) {
        return Error::Timeout {
            request: command_name(header.command),
            after: std::time::Duration::ZERO,
        };
    }
    io_error("vfio-user send", e)
}

/// Sends a message of `total <= SMALL_MESSAGE` bytes without descriptors.
fn send_small(
    fd: BorrowedFd<'_>,
    header: &Header,
    hdr: &[u8; HEADER_SIZE],
    parts: &[&[u8]],
    total: usize,
) -> Result<()> {
    // Not zeroed first: only the bytes copied in below are sent.
    let mut buf = std::mem::MaybeUninit::<[u8; SMALL_MESSAGE]>::uninit();
    let base: *mut u8 = buf.as_mut_ptr().cast();
    let mut len = 0usize;
    for p in std::iter::once(&hdr[..]).chain(parts.iter().copied()) {
        let end = len.saturating_add(p.len());
        if end > SMALL_MESSAGE {
            break;
        }
        // SAFETY: `len..end` lies inside the SMALL_MESSAGE bytes of `buf`
        // (checked just above), and `p` is a distinct live slice of
        // `p.len()` bytes, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), base.add(len), p.len()) };
        len = end;
    }
    // SAFETY: the first `len` bytes of `buf` were written by the copies
    // above (each piece lands right after the previous one, from 0), and
    // `len <= SMALL_MESSAGE`.
    let written = unsafe { std::slice::from_raw_parts(base.cast_const(), len) };
    let msg = written.get(..total.min(len)).unwrap_or(&[]);
    let mut sent = 0usize;
    while sent < msg.len() {
        let rest = msg.get(sent..).unwrap_or(&[]);
        // SAFETY: `rest` is a live byte slice of the length given; the
        // kernel only reads it.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(send_error(header, e));
        }
        if n == 0 {
            return Err(Error::Disconnected("vfio-user send wrote nothing".into()));
        }
        sent = sent.saturating_add(n as usize);
    }
    Ok(())
}

/// Writes one whole message (the header then `parts`) to a stream socket,
/// with `fds` as `SCM_RIGHTS` on its first byte. Never raises `SIGPIPE`.
/// Does not allocate for messages of up to seven non-empty parts.
pub fn write_message(
    fd: BorrowedFd<'_>,
    header: &Header,
    parts: &[&[u8]],
    fds: &[BorrowedFd<'_>],
) -> Result<()> {
    let hdr = header.encode();
    let mut total = HEADER_SIZE;
    let mut count = 1usize;
    for p in parts.iter().filter(|p| !p.is_empty()) {
        total = total.saturating_add(p.len());
        count += 1;
    }
    if total != header.size as usize {
        return Err(Error::InvalidArgument(format!(
            "message of {total} bytes with header size {}",
            header.size
        )));
    }
    if fds.is_empty() && total <= SMALL_MESSAGE {
        return send_small(fd, header, &hdr, parts, total);
    }
    // The kernel passes at most SCM_MAX_FD (253) descriptors per message.
    let mut raw_fds = [0 as RawFd; 253];
    let raw_fds = raw_fds.get_mut(..fds.len()).ok_or_else(|| {
        Error::InvalidArgument(format!("{} file descriptors in one message", fds.len()))
    })?;
    for (r, f) in raw_fds.iter_mut().zip(fds) {
        *r = f.as_raw_fd();
    }
    let mut control = [0u64; CONTROL_WORDS];
    // The pieces to send, on the stack when they are few.
    let mut stack_pieces: [&[u8]; STACK_IOVECS] = [&[]; STACK_IOVECS];
    let heap_pieces: Vec<&[u8]>;
    let pieces: &[&[u8]] = if count <= STACK_IOVECS {
        let mut i = 0usize;
        for p in std::iter::once(&hdr[..]).chain(parts.iter().copied()) {
            if p.is_empty() {
                continue;
            }
            if let Some(slot) = stack_pieces.get_mut(i) {
                *slot = p;
            }
            i += 1;
        }
        stack_pieces.get(..count).unwrap_or(&[])
    } else {
        heap_pieces = std::iter::once(&hdr[..])
            .chain(parts.iter().copied().filter(|p| !p.is_empty()))
            .collect();
        &heap_pieces
    };
    let mut stack_iov = [IoSlice::new(&[]); STACK_IOVECS];
    let mut heap_iov: Vec<IoSlice<'_>> = if count > STACK_IOVECS {
        vec![IoSlice::new(&[]); count]
    } else {
        Vec::new()
    };
    let mut sent = 0usize;
    let mut first = true;
    while sent < total {
        let iov: &mut [IoSlice<'_>] = if count > STACK_IOVECS {
            &mut heap_iov
        } else {
            &mut stack_iov
        };
        let used = remaining_iovecs(pieces, sent, iov);
        // SAFETY: msghdr is plain data; all-zero is a valid empty value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_mut_ptr().cast();
        msg.msg_iovlen = used;
        if first && !raw_fds.is_empty() {
            let data_len = std::mem::size_of_val(raw_fds);
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space(raw_fds.len());
            // SAFETY: the control buffer holds CONTROL_WORDS * 8 bytes, at
            // least CMSG_SPACE(253 descriptors), aligned, and zeroed; the
            // first header fits in it and its data area holds data_len bytes.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                if !cmsg.is_null() {
                    (*cmsg).cmsg_level = libc::SOL_SOCKET;
                    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
                    std::ptr::copy_nonoverlapping(
                        raw_fds.as_ptr().cast::<u8>(),
                        libc::CMSG_DATA(cmsg),
                        data_len,
                    );
                }
            }
        }
        // SAFETY: msg points at `used` live iovecs (IoSlice is
        // ABI-compatible with iovec) and, on the first send, at the control
        // buffer; the kernel only reads them.
        let n = unsafe { libc::sendmsg(fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(send_error(header, e));
        }
        if n == 0 {
            return Err(Error::Disconnected("vfio-user send wrote nothing".into()));
        }
        first = false;
        sent = sent.saturating_add(n as usize);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn header_round_trips_and_places_fields_at_spec_offsets() {
        let h = Header {
            id: 0x1234,
            command: command::REGION_READ,
            size: 0x20,
            flags: header_flags::TYPE_REPLY | header_flags::ERROR,
            error: 22,
        };
        let b = h.encode();
        assert_eq!(&b[0..2], &0x1234u16.to_le_bytes());
        assert_eq!(&b[2..4], &9u16.to_le_bytes());
        assert_eq!(&b[4..8], &0x20u32.to_le_bytes());
        assert_eq!(&b[8..12], &0x21u32.to_le_bytes());
        assert_eq!(&b[12..16], &22u32.to_le_bytes());
        assert_eq!(Header::decode(&b).unwrap(), h);
        assert!(h.is_reply() && h.is_error() && !h.no_reply());
    }

    #[test]
    fn header_with_size_below_sixteen_is_a_protocol_error() {
        let mut b = Header::default().encode();
        b[4] = 15;
        assert!(matches!(Header::decode(&b), Err(Error::Protocol(_))));
        assert!(matches!(Header::decode(&b[..10]), Err(Error::Protocol(_))));
    }

    #[test]
    fn version_capabilities_use_spec_defaults_when_absent() {
        let (maj, min, caps) = decode_version(&[0, 0, 1, 0]).unwrap();
        assert_eq!((maj, min), (0, 1));
        assert_eq!(caps.max_msg_fds, 1);
        assert_eq!(caps.max_data_xfer_size, 1048576);
        assert_eq!(caps.max_dma_maps, 65535);
        assert_eq!(caps.pgsizes, 4096);
    }

    #[test]
    fn version_capabilities_round_trip_through_json() {
        let caps = Capabilities {
            max_msg_fds: 8,
            max_data_xfer_size: 4096,
            max_dma_maps: 12,
            pgsizes: 4096 | (2 << 20),
            migration_pgsize: Some(4096),
            migration_max_bitmap_size: Some(1 << 20),
        };
        let p = encode_version(0, 1, &caps);
        assert_eq!(*p.last().unwrap(), 0, "JSON must be NUL-terminated");
        let (_, _, back) = decode_version(&p).unwrap();
        assert_eq!(back, caps);
    }

    #[test]
    fn version_with_bad_json_or_huge_numbers_is_a_protocol_error() {
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(b"{\"capabilities\":");
        assert!(matches!(decode_version(&p), Err(Error::Protocol(_))));
        let mut p = vec![0, 0, 0, 0];
        p.extend_from_slice(b"{\"capabilities\":{\"max_msg_fds\":99999999999}}\0");
        assert!(matches!(decode_version(&p), Err(Error::Protocol(_))));
    }

    fn region(caps: Vec<RegionCap>) -> RegionInfo {
        RegionInfo {
            index: 2,
            flags: crate::region_flags::READ | crate::region_flags::MMAP,
            size: 0x4000,
            offset: 0,
            caps,
        }
    }

    #[test]
    fn region_info_capability_chain_round_trips() {
        let info = region(vec![
            RegionCap::SparseMmap(vec![
                SparseArea {
                    offset: 0,
                    size: 0x1000,
                },
                SparseArea {
                    offset: 0x2000,
                    size: 0x2000,
                },
            ]),
            RegionCap::Type {
                type_: 3,
                subtype: 1,
            },
            RegionCap::MsixMappable,
        ]);
        let bytes = encode_region_info(&info, 0x10000, 4096);
        let back = decode_region_info(&bytes).unwrap();
        assert_eq!(back.caps, info.caps);
        assert_eq!(back.offset, 0x10000);
        assert_ne!(back.flags & crate::region_flags::CAPS, 0);
        let fixed = RegionInfoPayload::decode(&bytes).unwrap();
        assert_eq!(fixed.argsz as usize, bytes.len());
    }

    #[test]
    fn region_info_too_small_argsz_reports_the_size_needed_without_caps() {
        let info = region(vec![RegionCap::MsixMappable]);
        let bytes = encode_region_info(&info, 0, 32);
        assert_eq!(bytes.len(), 32);
        let fixed = RegionInfoPayload::decode(&bytes).unwrap();
        assert_eq!(fixed.argsz, 40);
        assert_eq!(fixed.cap_offset, 0);
        assert_eq!(
            fixed.flags & crate::region_flags::CAPS,
            0,
            "vfio-user: CAPS means the capabilities are in this reply"
        );
        assert_eq!(fixed.flags, info.flags, "the other flags are kept");
        // Asked again with the size it was told, the client gets them.
        let bytes = encode_region_info(&info, 0, fixed.argsz);
        let fixed = RegionInfoPayload::decode(&bytes).unwrap();
        assert_ne!(fixed.flags & crate::region_flags::CAPS, 0);
        assert_eq!(fixed.cap_offset as usize, RegionInfoPayload::SIZE);
    }

    #[test]
    fn region_caps_that_loop_or_overflow_are_protocol_errors() {
        let info = region(vec![RegionCap::MsixMappable]);
        let mut bytes = encode_region_info(&info, 0, 4096);
        // next pointing at itself.
        bytes[36..40].copy_from_slice(&32u32.to_le_bytes());
        assert!(matches!(
            decode_region_info(&bytes),
            Err(Error::Protocol(_))
        ));
        // cap offset past the end.
        let mut bytes = encode_region_info(&info, 0, 4096);
        bytes[12..16].copy_from_slice(&4000u32.to_le_bytes());
        assert!(matches!(
            decode_region_info(&bytes),
            Err(Error::Protocol(_))
        ));
        // sparse area count that cannot fit.
        let info = region(vec![RegionCap::SparseMmap(vec![SparseArea {
            offset: 0,
            size: 0x1000,
        }])]);
        let mut bytes = encode_region_info(&info, 0, 4096);
        bytes[40..44].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_region_info(&bytes),
            Err(Error::Protocol(_))
        ));
        // sparse area outside the region.
        let info = region(vec![RegionCap::SparseMmap(vec![SparseArea {
            offset: 0x3000,
            size: 0x2000,
        }])]);
        let bytes = encode_region_info(&info, 0, 4096);
        assert!(matches!(
            decode_region_info(&bytes),
            Err(Error::Protocol(_))
        ));
    }

    /// A xorshift generator: deterministic pseudo-random bytes.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics() {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..4000 {
            let len = (xorshift(&mut s) % 160) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| xorshift(&mut s) as u8).collect();
            // Make the capability walk likely: set the CAPS flag and a small
            // cap_offset half of the time.
            if round % 2 == 0 && buf.len() >= 16 {
                buf[4] |= crate::region_flags::CAPS as u8;
                buf[12..16].copy_from_slice(&(32 + (xorshift(&mut s) % 64) as u32).to_le_bytes());
            }
            let _ = Header::decode(&buf);
            let _ = decode_region_info(&buf);
            let _ = decode_version(&buf);
            let _ = DeviceInfoPayload::decode(&buf);
            let _ = IrqInfoPayload::decode(&buf);
            let _ = SetIrqsPayload::decode(&buf);
            let _ = RegionAccessPayload::decode(&buf);
            let _ = DmaAccessPayload::decode(&buf);
            let _ = DmaMapPayload::decode(&buf);
            let _ = DmaUnmapPayload::decode(&buf);
        }
    }

    #[test]
    fn messages_carry_fds_and_extra_fds_are_closed_and_reported() {
        let (a, b) = UnixStream::pair().unwrap();
        let f1 = tempfile::tempfile().unwrap();
        let f2 = tempfile::tempfile().unwrap();
        let f3 = tempfile::tempfile().unwrap();
        let payload = [7u8; 5];
        let h = Header::command(3, command::DEVICE_SET_IRQS, payload.len()).unwrap();
        write_message(
            a.as_fd(),
            &h,
            &[&payload],
            &[f1.as_fd(), f2.as_fd(), f3.as_fd()],
        )
        .unwrap();
        let m = read_message(b.as_fd(), 4096, 2).unwrap().unwrap();
        assert_eq!(m.header, h);
        assert_eq!(m.payload, payload);
        assert_eq!(m.fds.len(), 2);
        assert!(m.fds_dropped);
        drop(a);
        assert!(read_message(b.as_fd(), 4096, 2).unwrap().is_none());
    }

    /// The wire bytes of a message: header then payload.
    fn wire(h: &Header, payload: &[u8]) -> Vec<u8> {
        let mut v = h.encode().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn buffered_reader_cuts_several_messages_out_of_one_receive() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        let h1 = Header::command(1, command::REGION_READ, 16).unwrap();
        let h2 = Header::reply(&h1, 20).unwrap();
        let h3 = Header::error_reply(&h1, libc::EINVAL);
        let mut bytes = wire(&h1, &[1; 16]);
        bytes.extend(wire(&h2, &[2; 20]));
        bytes.extend(wire(&h3, &[]));
        a.write_all(&bytes).unwrap();
        let mut r = MessageReader::new(4096, 4);
        assert!(r.next_message(Vec::new).unwrap().is_none());
        assert_eq!(
            r.recv(b.as_fd(), false).unwrap(),
            Received::Data(bytes.len())
        );
        let m1 = r.next_message(Vec::new).unwrap().unwrap();
        let m2 = r.next_message(Vec::new).unwrap().unwrap();
        let m3 = r.next_message(Vec::new).unwrap().unwrap();
        assert_eq!((m1.header, m1.payload), (h1, vec![1; 16]));
        assert_eq!((m2.header, m2.payload), (h2, vec![2; 20]));
        assert_eq!((m3.header, m3.payload.len()), (h3, 0));
        assert!(r.next_message(Vec::new).unwrap().is_none());
        assert!(r.is_idle());
        drop(a);
        assert_eq!(r.recv(b.as_fd(), false).unwrap(), Received::Closed);
    }

    #[test]
    fn buffered_reader_gives_fds_to_the_message_they_were_sent_with() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let plain = Header::command(1, command::REGION_READ, 4).unwrap();
        let with_fd = Header::command(2, command::DMA_MAP, 8).unwrap();
        let after = Header::command(3, command::REGION_READ, 4).unwrap();
        a.write_all(&wire(&plain, &[0; 4])).unwrap();
        write_message(a.as_fd(), &with_fd, &[&[5; 8]], &[f.as_fd()]).unwrap();
        a.write_all(&wire(&after, &[0; 4])).unwrap();
        let mut r = MessageReader::new(4096, 4);
        let mut got = Vec::new();
        while got.len() < 3 {
            if let Some(m) = r.next_message(Vec::new).unwrap() {
                got.push(m);
                continue;
            }
            assert!(matches!(
                r.recv(b.as_fd(), false).unwrap(),
                Received::Data(_)
            ));
        }
        let fds: Vec<(u16, usize)> = got.iter().map(|m| (m.header.id, m.fds.len())).collect();
        assert_eq!(fds, [(1, 0), (2, 1), (3, 0)]);
        assert!(got.iter().all(|m| !m.fds_dropped));
    }

    #[test]
    fn buffered_reader_keeps_a_partial_message_until_the_rest_arrives() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        let h = Header::command(9, command::REGION_WRITE, 100).unwrap();
        let bytes = wire(&h, &[3; 100]);
        let mut r = MessageReader::new(4096, 4);
        a.write_all(&bytes[..10]).unwrap();
        assert_eq!(r.recv(b.as_fd(), true).unwrap(), Received::Data(10));
        assert!(r.next_message(Vec::new).unwrap().is_none());
        a.write_all(&bytes[10..50]).unwrap();
        assert_eq!(r.recv(b.as_fd(), true).unwrap(), Received::Data(40));
        assert!(r.next_message(Vec::new).unwrap().is_none());
        assert!(!r.is_idle());
        assert_eq!(r.recv(b.as_fd(), true).unwrap(), Received::WouldBlock);
        a.write_all(&bytes[50..]).unwrap();
        let m = r.read_message(b.as_fd()).unwrap().unwrap();
        assert_eq!((m.header, m.payload), (h, vec![3; 100]));
        drop(a);
        assert!(r.read_message(b.as_fd()).unwrap().is_none());
    }

    #[test]
    fn buffered_reader_takes_a_message_bigger_than_its_buffer_whole() {
        let (a, b) = UnixStream::pair().unwrap();
        let size = READ_BUFFER_SIZE * 3 + 5;
        let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let h =
            Header::reply(&Header::command(4, command::REGION_READ, 16).unwrap(), size).unwrap();
        let next = Header::command(5, command::DMA_READ, 0).unwrap();
        let writer = std::thread::spawn(move || {
            write_message(a.as_fd(), &h, &[&payload], &[]).unwrap();
            write_message(a.as_fd(), &next, &[], &[]).unwrap();
            payload
        });
        let mut r = MessageReader::new(size + HEADER_SIZE, 4);
        let m = r.read_message(b.as_fd()).unwrap().unwrap();
        let payload = writer.join().unwrap();
        assert_eq!(m.header.id, 4);
        assert!(m.payload == payload);
        assert_eq!(r.read_message(b.as_fd()).unwrap().unwrap().header.id, 5);
    }

    #[test]
    fn buffered_reader_refuses_a_header_announcing_more_than_the_limit() {
        use std::io::Write;
        let (mut a, b) = UnixStream::pair().unwrap();
        let h = Header {
            size: 1 << 30,
            ..Default::default()
        };
        a.write_all(&h.encode()).unwrap();
        let mut r = MessageReader::new(1 << 20, 4);
        assert!(matches!(r.read_message(b.as_fd()), Err(Error::Protocol(_))));
    }

    #[test]
    fn small_and_large_messages_reach_the_peer_byte_for_byte() {
        let (a, b) = UnixStream::pair().unwrap();
        for len in [
            0usize,
            1,
            SMALL_MESSAGE - HEADER_SIZE,
            SMALL_MESSAGE,
            70_000,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let (x, y) = data.split_at(len / 3);
            let h = Header::command(len as u16, command::REGION_WRITE, len).unwrap();
            let sender = {
                let a = a.try_clone().unwrap();
                let (x, y) = (x.to_vec(), y.to_vec());
                std::thread::spawn(move || write_message(a.as_fd(), &h, &[&x, &[], &y], &[]))
            };
            let m = read_message(b.as_fd(), 1 << 20, 4).unwrap().unwrap();
            sender.join().unwrap().unwrap();
            assert_eq!(m.header, h);
            assert!(m.payload == data, "{len} bytes");
        }
    }

    #[test]
    fn oversized_message_is_refused_before_allocating() {
        let (a, b) = UnixStream::pair().unwrap();
        let h = Header {
            size: u32::MAX,
            ..Default::default()
        };
        use std::io::Write;
        (&a).write_all(&h.encode()).unwrap();
        assert!(matches!(
            read_message(b.as_fd(), 1 << 20, 4),
            Err(Error::Protocol(_))
        ));
    }
}
