//! The migration stream: one versioned format carrying a device's opaque
//! state and the state this crate emulates.
//!
//! ```text
//! prefix   "VFIOPCIM" (8 bytes), format version (u32 LE), reserved (u32, 0)
//! chunk    kind (u32 LE), sequence number (u32 LE), payload length (u32 LE),
//!          payload, CRC-32 (IEEE) of the 12 header bytes and the payload (u32 LE)
//! ```
//!
//! The chunks come in this order, numbered from 0: one `IDENTITY` (the
//! [`DeviceIdentity`], JSON), any number of `DEVICE_DATA` (the device's
//! opaque state, 1 byte to [`MAX_CHUNK_LEN`] each, written into the
//! destination device in order), one `EMULATED` (config space, BAR
//! placement, MSI / MSI-X / INTx state and the vectors pending in the
//! VMM's notifiers, JSON), one `END` (the number of chunks before it and
//! the total bytes of device data). A reader reads nothing past `END`, so
//! a VMM may put several devices' streams one after the other.
//!
//! Every length is checked against [`MAX_CHUNK_LEN`] (and the total device
//! data against the reader's limit) before anything is allocated; the
//! sequence numbers catch dropped or reordered chunks, the CRCs corrupted
//! ones, `END` a stream cut between chunks.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use crate::device::{DeviceSnapshot, KeptCapability};
use crate::outcome::BarIndex;
use crate::{Error, Result};

/// The first 8 bytes of every stream.
pub const STREAM_MAGIC: [u8; 8] = *b"VFIOPCIM";

/// The stream format version this build writes and reads.
pub const STREAM_VERSION: u32 = 1;

/// The longest chunk payload: device data is cut into chunks of at most
/// this size; a longer length is refused before anything is allocated.
pub const MAX_CHUNK_LEN: u32 = 1 << 20;

/// The most device data [`VfioPciDevice::resume_migration`](crate::VfioPciDevice::resume_migration)
/// accepts: the whole stream is checked before the device is touched, so
/// it is held in memory.
pub const MAX_DEVICE_DATA: u64 = 1 << 30;

pub(crate) const KIND_IDENTITY: u32 = 1;
pub(crate) const KIND_DEVICE_DATA: u32 = 2;
pub(crate) const KIND_EMULATED: u32 = 3;
pub(crate) const KIND_END: u32 = 4;

const PREFIX_LEN: usize = 16;
const CHUNK_HEADER_LEN: usize = 12;
const END_LEN: usize = 16;

fn kind_name(kind: u32) -> &'static str {
    match kind {
        KIND_IDENTITY => "IDENTITY",
        KIND_DEVICE_DATA => "DEVICE_DATA",
        KIND_EMULATED => "EMULATED",
        KIND_END => "END",
        _ => "unknown",
    }
}

/// What is wrong with a migration stream (inside
/// [`Error::MigrationStream`], with the byte offset where it was found).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamFault {
    /// The stream ends before its `END` chunk.
    Truncated,
    /// It does not start with [`STREAM_MAGIC`].
    BadMagic,
    /// A format version this build does not read.
    Version {
        /// The version found.
        found: u32,
    },
    /// A reserved field is not 0.
    Reserved,
    /// A chunk longer than its kind allows.
    ChunkTooLong {
        /// The chunk kind.
        kind: u32,
        /// Its length.
        len: u32,
        /// The most allowed.
        max: u64,
    },
    /// A chunk's CRC does not match its bytes.
    Checksum {
        /// The chunk's sequence number as read.
        seq: u32,
    },
    /// A chunk out of sequence (one dropped, repeated or moved).
    Sequence {
        /// The number expected.
        expected: u32,
        /// The number found.
        found: u32,
    },
    /// A chunk kind this format does not have, or one out of place.
    UnexpectedChunk {
        /// The kind found.
        kind: u32,
        /// What was expected there.
        expected: &'static str,
    },
    /// An empty `DEVICE_DATA` chunk.
    EmptyData,
    /// More device data than the reader accepts.
    TooMuchData {
        /// The limit.
        limit: u64,
    },
    /// A chunk's payload does not decode.
    Payload {
        /// The chunk kind.
        kind: &'static str,
        /// Why.
        reason: String,
    },
    /// `END` does not match the chunks before it.
    End {
        /// What differs.
        reason: String,
    },
}

impl std::fmt::Display for StreamFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamFault::Truncated => f.write_str("truncated before its END chunk"),
            StreamFault::BadMagic => f.write_str("not a migration stream (bad magic)"),
            StreamFault::Version { found } => write!(
                f,
                "format version {found} is not supported (this build reads {STREAM_VERSION})"
            ),
            StreamFault::Reserved => f.write_str("a reserved field is not 0"),
            StreamFault::ChunkTooLong { kind, len, max } => write!(
                f,
                "{} chunk of {len} bytes is longer than {max}",
                kind_name(*kind)
            ),
            StreamFault::Checksum { seq } => write!(f, "chunk {seq} fails its CRC"),
            StreamFault::Sequence { expected, found } => {
                write!(f, "chunk {found} where chunk {expected} was expected")
            }
            StreamFault::UnexpectedChunk { kind, expected } => write!(
                f,
                "chunk kind {kind} ({}) where {expected} was expected",
                kind_name(*kind)
            ),
            StreamFault::EmptyData => f.write_str("empty DEVICE_DATA chunk"),
            StreamFault::TooMuchData { limit } => {
                write!(f, "more than {limit} bytes of device data")
            }
            StreamFault::Payload { kind, reason } => write!(f, "{kind} payload: {reason}"),
            StreamFault::End { reason } => write!(f, "END chunk: {reason}"),
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320) table.
const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// A running CRC-32.
#[derive(Clone, Copy)]
struct Crc(u32);

impl Crc {
    fn new() -> Self {
        Crc(0xffff_ffff)
    }

    fn update(mut self, data: &[u8]) -> Self {
        for &b in data {
            let i = usize::from((self.0 as u8) ^ b);
            self.0 = CRC_TABLE.get(i).copied().unwrap_or(0) ^ (self.0 >> 8);
        }
        self
    }

    fn finish(self) -> u32 {
        !self.0
    }
}

/// CRC-32 (IEEE) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    Crc::new().update(data).finish()
}

/// What a destination checks before it loads anything: the device the
/// stream was taken from, as the guest saw it. Every field must be equal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceIdentity {
    /// Vendor and device id (config offset 0).
    pub vendor_device: u32,
    /// Revision and class code (config offset 8).
    pub class_revision: u32,
    /// Subsystem vendor and subsystem id (config offset 0x2c).
    pub subsystem: u32,
    /// Header type (config offset 0xe).
    pub header_type: u8,
    /// Size of the device's config region.
    pub config_size: u64,
    /// Every BAR (then the ROM) as the guest sees it.
    pub bars: Vec<BarIdentity>,
    /// The capabilities the guest sees, where it sees them.
    pub capabilities: Vec<KeptCapability>,
    /// MSI vectors (0 without MSI).
    pub msi_vectors: u32,
    /// MSI-X vectors (0 without MSI-X).
    pub msix_vectors: u32,
    /// MSI-X table and PBA as (BAR slot, offset, length) each.
    pub msix_layout: Option<[(u64, u64, u64); 2]>,
    /// Whether the device has INTx.
    pub intx: bool,
}

/// One BAR of a [`DeviceIdentity`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BarIdentity {
    /// Which BAR.
    pub index: BarIndex,
    /// Memory or I/O, width, prefetchable.
    pub kind: pci_config::BarKind,
    /// Size of the device's region.
    pub region_size: u64,
    /// Size the guest sees.
    pub guest_size: u64,
    /// The MSI-X table and PBA were moved into an enlarged BAR.
    pub msix_relocated: bool,
}

impl DeviceIdentity {
    /// Why `self` (the stream's) and `here` (the destination's) differ, if
    /// they do: the first field that does.
    pub fn mismatch(&self, here: &DeviceIdentity) -> Option<String> {
        fn diff<T: PartialEq + std::fmt::Debug>(what: &str, s: &T, h: &T) -> Option<String> {
            (s != h).then(|| format!("{what}: the stream has {s:x?}, this device {h:x?}"))
        }
        diff("vendor/device id", &self.vendor_device, &here.vendor_device)
            .or_else(|| diff("class/revision", &self.class_revision, &here.class_revision))
            .or_else(|| diff("subsystem id", &self.subsystem, &here.subsystem))
            .or_else(|| diff("header type", &self.header_type, &here.header_type))
            .or_else(|| diff("config size", &self.config_size, &here.config_size))
            .or_else(|| diff("BAR layout", &self.bars, &here.bars))
            .or_else(|| diff("capabilities", &self.capabilities, &here.capabilities))
            .or_else(|| diff("MSI vectors", &self.msi_vectors, &here.msi_vectors))
            .or_else(|| diff("MSI-X vectors", &self.msix_vectors, &here.msix_vectors))
            .or_else(|| diff("MSI-X layout", &self.msix_layout, &here.msix_layout))
            .or_else(|| diff("INTx", &self.intx, &here.intx))
    }
}

/// The `EMULATED` chunk: what this crate emulates, and the vectors whose
/// signal was latched in the VMM's notifiers (masked, hence pending).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmulatedState {
    pub snapshot: DeviceSnapshot,
    pub pending_msi: Vec<u32>,
    pub pending_msix: Vec<u32>,
}

fn io_err(context: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::MigrationIo { context, source }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        w.copy_from_slice(s);
    }
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        w.copy_from_slice(s);
    }
    u64::from_le_bytes(w)
}

/// Writes a stream, chunk by chunk, counting what it wrote.
#[derive(Debug, Default)]
pub(crate) struct StreamWriter {
    seq: u32,
    data_bytes: u64,
    written: u64,
}

impl StreamWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes of device data written so far.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Whether the prefix and identity are written.
    pub fn started(&self) -> bool {
        self.seq > 0
    }

    /// The prefix and the `IDENTITY` chunk.
    pub fn start(&mut self, out: &mut dyn Write, identity: &DeviceIdentity) -> Result<()> {
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[..8].copy_from_slice(&STREAM_MAGIC);
        prefix[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
        out.write_all(&prefix)
            .map_err(io_err("writing the migration stream"))?;
        self.written += PREFIX_LEN as u64;
        let json = serde_json::to_vec(identity).map_err(|e| Error::MigrationStream {
            offset: self.written,
            fault: StreamFault::Payload {
                kind: "IDENTITY",
                reason: e.to_string(),
            },
        })?;
        self.chunk(out, KIND_IDENTITY, &json)
    }

    /// `data` as `DEVICE_DATA` chunks of at most [`MAX_CHUNK_LEN`] bytes.
    pub fn data(&mut self, out: &mut dyn Write, data: &[u8]) -> Result<()> {
        for piece in data.chunks(MAX_CHUNK_LEN as usize) {
            self.chunk(out, KIND_DEVICE_DATA, piece)?;
            self.data_bytes += piece.len() as u64;
        }
        Ok(())
    }

    /// The `EMULATED` chunk, then `END`.
    pub fn finish(&mut self, out: &mut dyn Write, emulated: &EmulatedState) -> Result<()> {
        let json = serde_json::to_vec(emulated).map_err(|e| Error::MigrationStream {
            offset: self.written,
            fault: StreamFault::Payload {
                kind: "EMULATED",
                reason: e.to_string(),
            },
        })?;
        self.chunk(out, KIND_EMULATED, &json)?;
        let mut end = [0u8; END_LEN];
        end[..4].copy_from_slice(&self.seq.to_le_bytes());
        end[8..].copy_from_slice(&self.data_bytes.to_le_bytes());
        self.chunk(out, KIND_END, &end)?;
        out.flush().map_err(io_err("flushing the migration stream"))
    }

    fn chunk(&mut self, out: &mut dyn Write, kind: u32, payload: &[u8]) -> Result<()> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|l| *l <= MAX_CHUNK_LEN)
            .ok_or_else(|| Error::MigrationStream {
                offset: self.written,
                fault: StreamFault::ChunkTooLong {
                    kind,
                    len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                    max: u64::from(MAX_CHUNK_LEN),
                },
            })?;
        let mut header = [0u8; CHUNK_HEADER_LEN];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[4..8].copy_from_slice(&self.seq.to_le_bytes());
        header[8..].copy_from_slice(&len.to_le_bytes());
        let crc = Crc::new().update(&header).update(payload).finish();
        let w = io_err("writing the migration stream");
        out.write_all(&header).map_err(w)?;
        out.write_all(payload)
            .map_err(io_err("writing the migration stream"))?;
        out.write_all(&crc.to_le_bytes())
            .map_err(io_err("writing the migration stream"))?;
        self.seq += 1;
        self.written += (CHUNK_HEADER_LEN + payload.len() + 4) as u64;
        Ok(())
    }
}

/// Reads a stream, checking every chunk as it comes.
pub(crate) struct StreamReader<R> {
    input: R,
    offset: u64,
    seq: u32,
}

/// The checked rest of a stream after its identity.
pub(crate) struct StreamBody {
    /// The device data chunks, in order.
    pub data: Vec<Vec<u8>>,
    /// Their total length.
    pub data_bytes: u64,
    /// The emulated state.
    pub emulated: EmulatedState,
}

impl<R: Read> StreamReader<R> {
    /// Reads and checks the prefix and the `IDENTITY` chunk.
    pub fn open(input: R) -> Result<(Self, DeviceIdentity)> {
        let mut r = StreamReader {
            input,
            offset: 0,
            seq: 0,
        };
        let mut prefix = [0u8; PREFIX_LEN];
        r.fill(&mut prefix)?;
        if prefix[..8] != STREAM_MAGIC {
            return Err(r.fault_at(0, StreamFault::BadMagic));
        }
        let version = u32_at(&prefix, 8);
        if version != STREAM_VERSION {
            return Err(r.fault_at(8, StreamFault::Version { found: version }));
        }
        if u32_at(&prefix, 12) != 0 {
            return Err(r.fault_at(12, StreamFault::Reserved));
        }
        let at = r.offset;
        let (kind, payload) = r.chunk()?;
        if kind != KIND_IDENTITY {
            return Err(r.fault_at(
                at,
                StreamFault::UnexpectedChunk {
                    kind,
                    expected: "IDENTITY",
                },
            ));
        }
        let identity = serde_json::from_slice(&payload).map_err(|e| {
            r.fault_at(
                at,
                StreamFault::Payload {
                    kind: "IDENTITY",
                    reason: e.to_string(),
                },
            )
        })?;
        Ok((r, identity))
    }

    /// Reads and checks the rest, up to and including `END` (nothing past
    /// it), accepting at most `limit` bytes of device data.
    pub fn body(&mut self, limit: u64) -> Result<StreamBody> {
        let mut data = Vec::new();
        let mut data_bytes = 0u64;
        let emulated = loop {
            let at = self.offset;
            let (kind, payload) = self.chunk_limited(limit.saturating_sub(data_bytes))?;
            match kind {
                KIND_DEVICE_DATA => {
                    if payload.is_empty() {
                        return Err(self.fault_at(at, StreamFault::EmptyData));
                    }
                    data_bytes += payload.len() as u64;
                    data.push(payload);
                }
                KIND_EMULATED => {
                    let e: EmulatedState = serde_json::from_slice(&payload).map_err(|e| {
                        self.fault_at(
                            at,
                            StreamFault::Payload {
                                kind: "EMULATED",
                                reason: e.to_string(),
                            },
                        )
                    })?;
                    break e;
                }
                _ => {
                    return Err(self.fault_at(
                        at,
                        StreamFault::UnexpectedChunk {
                            kind,
                            expected: "DEVICE_DATA or EMULATED",
                        },
                    ))
                }
            }
        };
        let at = self.offset;
        let before_end = self.seq;
        let (kind, payload) = self.chunk()?;
        if kind != KIND_END {
            return Err(self.fault_at(
                at,
                StreamFault::UnexpectedChunk {
                    kind,
                    expected: "END",
                },
            ));
        }
        if payload.len() != END_LEN {
            return Err(self.fault_at(
                at,
                StreamFault::End {
                    reason: format!("{} bytes, not {END_LEN}", payload.len()),
                },
            ));
        }
        let (chunks, reserved, bytes) = (
            u32_at(&payload, 0),
            u32_at(&payload, 4),
            u64_at(&payload, 8),
        );
        if reserved != 0 {
            return Err(self.fault_at(at, StreamFault::Reserved));
        }
        if chunks != before_end || bytes != data_bytes {
            return Err(self.fault_at(
                at,
                StreamFault::End {
                    reason: format!(
                        "it counts {chunks} chunks and {bytes} bytes of device data; \
                         the stream has {before_end} and {data_bytes}"
                    ),
                },
            ));
        }
        Ok(StreamBody {
            data,
            data_bytes,
            emulated,
        })
    }

    fn fault_at(&self, offset: u64, fault: StreamFault) -> Error {
        Error::MigrationStream { offset, fault }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<()> {
        match self.input.read_exact(buf) {
            Ok(()) => {
                self.offset += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(self.fault_at(self.offset, StreamFault::Truncated))
            }
            Err(e) => Err(io_err("reading the migration stream")(e)),
        }
    }

    fn chunk(&mut self) -> Result<(u32, Vec<u8>)> {
        self.chunk_limited(u64::MAX)
    }

    /// The next chunk, its header checked before its payload is allocated:
    /// at most [`MAX_CHUNK_LEN`] bytes, and at most `data_room` for device
    /// data.
    fn chunk_limited(&mut self, data_room: u64) -> Result<(u32, Vec<u8>)> {
        let at = self.offset;
        let mut header = [0u8; CHUNK_HEADER_LEN];
        self.fill(&mut header)?;
        let (kind, seq, len) = (u32_at(&header, 0), u32_at(&header, 4), u32_at(&header, 8));
        if !(KIND_IDENTITY..=KIND_END).contains(&kind) {
            return Err(self.fault_at(
                at,
                StreamFault::UnexpectedChunk {
                    kind,
                    expected: "a chunk kind of this format",
                },
            ));
        }
        if seq != self.seq {
            return Err(self.fault_at(
                at + 4,
                StreamFault::Sequence {
                    expected: self.seq,
                    found: seq,
                },
            ));
        }
        if len > MAX_CHUNK_LEN {
            return Err(self.fault_at(
                at + 8,
                StreamFault::ChunkTooLong {
                    kind,
                    len,
                    max: u64::from(MAX_CHUNK_LEN),
                },
            ));
        }
        if kind == KIND_DEVICE_DATA && u64::from(len) > data_room {
            return Err(self.fault_at(at + 8, StreamFault::TooMuchData { limit: data_room }));
        }
        let mut payload = vec![0u8; len as usize];
        self.fill(&mut payload)?;
        let mut crc = [0u8; 4];
        self.fill(&mut crc)?;
        let want = Crc::new().update(&header).update(&payload).finish();
        if u32::from_le_bytes(crc) != want {
            return Err(self.fault_at(at, StreamFault::Checksum { seq }));
        }
        self.seq += 1;
        Ok((kind, payload))
    }
}

/// What a well-formed stream holds, as [`check_stream`] found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSummary {
    /// The device the stream was taken from.
    pub identity: DeviceIdentity,
    /// Bytes of the device's opaque state.
    pub device_data_bytes: u64,
    /// `DEVICE_DATA` chunks.
    pub device_data_chunks: usize,
    /// The stream's length in bytes, prefix to `END` included.
    pub stream_bytes: u64,
}

/// Reads and checks a whole stream (every chunk, every CRC, the emulated
/// state's encoding) without a device: what a destination does before it
/// touches its device, minus the comparison with it. Reads nothing past
/// `END`.
pub fn check_stream(input: impl Read, max_device_data: u64) -> Result<StreamSummary> {
    let (mut reader, identity) = StreamReader::open(input)?;
    let body = reader.body(max_device_data)?;
    Ok(StreamSummary {
        identity,
        device_data_bytes: body.data_bytes,
        device_data_chunks: body.data.len(),
        stream_bytes: reader.offset,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn crc32_is_the_ieee_one() {
        // The check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    fn identity() -> DeviceIdentity {
        DeviceIdentity {
            vendor_device: 0x11e8_1234,
            class_revision: 0x00ff_0010,
            subsystem: 0x1100_1af4,
            header_type: 0,
            config_size: 256,
            bars: Vec::new(),
            capabilities: Vec::new(),
            msi_vectors: 1,
            msix_vectors: 0,
            msix_layout: None,
            intx: true,
        }
    }

    /// A prefix, an identity, and device data chunks of these lengths.
    fn started(data: &[usize]) -> (Vec<u8>, StreamWriter) {
        let mut out = Vec::new();
        let mut w = StreamWriter::default();
        w.start(&mut out, &identity()).unwrap();
        for &n in data {
            w.data(&mut out, &vec![0x5a; n]).unwrap();
        }
        (out, w)
    }

    fn fault(r: Result<impl std::fmt::Debug>) -> StreamFault {
        match r {
            Err(Error::MigrationStream { fault, .. }) => fault,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn device_data_is_cut_into_chunks_of_at_most_the_maximum() {
        let (out, w) = started(&[MAX_CHUNK_LEN as usize + 1, 3]);
        assert_eq!(w.data_bytes(), u64::from(MAX_CHUNK_LEN) + 4);
        assert_eq!(w.written(), out.len() as u64);
        let (mut r, id) = StreamReader::open(&out[..]).unwrap();
        assert_eq!(id, identity());
        // Three data chunks, then the stream ends before EMULATED.
        assert_eq!(fault(r.body(u64::MAX).map(|_| ())), StreamFault::Truncated);
    }

    #[test]
    fn a_length_over_the_maximum_is_refused_before_its_payload_is_read() {
        let (mut out, _) = started(&[]);
        let seq = 1u32;
        out.extend_from_slice(&KIND_DEVICE_DATA.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&(MAX_CHUNK_LEN + 1).to_le_bytes());
        // No payload follows: the length alone is refused.
        let (mut r, _) = StreamReader::open(&out[..]).unwrap();
        assert!(matches!(
            fault(r.body(u64::MAX).map(|_| ())),
            StreamFault::ChunkTooLong { .. }
        ));
    }

    #[test]
    fn device_data_beyond_the_readers_limit_is_refused() {
        let (out, _) = started(&[100, 100]);
        let (mut r, _) = StreamReader::open(&out[..]).unwrap();
        assert_eq!(
            fault(r.body(150).map(|_| ())),
            StreamFault::TooMuchData { limit: 50 }
        );
    }

    #[test]
    fn the_prefix_is_checked_magic_version_reserved() {
        let (out, _) = started(&[]);
        let mut bad = out.clone();
        bad[0] ^= 1;
        assert_eq!(
            fault(StreamReader::open(&bad[..]).map(|_| ())),
            StreamFault::BadMagic
        );
        let mut bad = out.clone();
        bad[8] = 2;
        assert_eq!(
            fault(StreamReader::open(&bad[..]).map(|_| ())),
            StreamFault::Version { found: 2 }
        );
        let mut bad = out;
        bad[13] = 1;
        assert_eq!(
            fault(StreamReader::open(&bad[..]).map(|_| ())),
            StreamFault::Reserved
        );
    }

    #[test]
    fn an_identity_with_an_unknown_field_is_refused() {
        let mut out = Vec::new();
        let mut w = StreamWriter::default();
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[..8].copy_from_slice(&STREAM_MAGIC);
        prefix[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
        out.extend_from_slice(&prefix);
        let mut json = serde_json::to_value(identity()).unwrap();
        json["extra"] = serde_json::Value::Bool(true);
        w.chunk(&mut out, KIND_IDENTITY, &serde_json::to_vec(&json).unwrap())
            .unwrap();
        assert!(matches!(
            fault(StreamReader::open(&out[..]).map(|_| ())),
            StreamFault::Payload {
                kind: "IDENTITY",
                ..
            }
        ));
    }

    #[test]
    fn identities_that_differ_name_the_first_difference() {
        let a = identity();
        assert_eq!(a.mismatch(&a), None);
        let mut b = identity();
        b.msi_vectors = 4;
        b.intx = false;
        assert!(a.mismatch(&b).unwrap().starts_with("MSI vectors"));
    }
}
