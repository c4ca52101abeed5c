//! Device DMA over vfio-user, as the spec allows it both ways: through a
//! file the client passes with `DMA_MAP` (mapped by the server when it is
//! sealed against shrinking, reached by file I/O otherwise), and through
//! `DMA_READ` / `DMA_WRITE` messages to the client when `DMA_MAP` carries
//! no file descriptor. And what a hostile or stuck client can do to it:
//! nothing worse than a DMA fault the device reports.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;
use vfio_backend::user::protocol::{
    self, command, dma_flags, Capabilities, DmaAccessPayload, DmaMapPayload, Header, Message,
    RegionAccessPayload,
};
use vfio_backend::user::{ServerOptions, UserOptions, UserServer};
use vfio_backend::{region, DmaFile, DmaSource, Error};
use vfio_fake_device::{edu, DmaFault, FakeDevice};
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn edu_fake() -> Arc<FakeDevice> {
    Arc::new(FakeDevice::profile("edu").unwrap())
}

/// Guest RAM of [`RAM_REGIONS`] that is not shareable (anonymous memory):
/// the VMM maps it for the device with `DMA_MAP` messages without a file
/// descriptor, as QEMU does for guest RAM that is not memfd-backed.
fn private_ram() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = RAM_REGIONS
        .iter()
        .map(|&(gpa, len)| (GuestAddress(gpa), len))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

/// How many mappings of files named `memfd:<name>` this process holds.
fn mappings_of(name: &str) -> usize {
    let needle = format!("/memfd:{name} ");
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&needle))
        .count()
}

fn named_memfd(name: &std::ffi::CStr, len: u64, sealed: bool) -> File {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns, taken over once.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    if sealed {
        // SAFETY: F_ADD_SEALS on a descriptor we own; no pointer involved.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0);
    }
    file
}

/// Guest RAM of [`RAM_REGIONS`] in a memfd called `name`.
fn memfd_ram(name: &std::ffi::CStr, sealed: bool) -> (File, GuestMemoryMmap) {
    let total: usize = RAM_REGIONS.iter().map(|r| r.1).sum();
    let file = named_memfd(name, total as u64, sealed);
    let mem = guest_ram_in(file.try_clone().unwrap());
    (file, mem)
}

#[test]
fn edu_dma_both_ways_over_maps_without_a_file_goes_by_dma_read_and_dma_write() {
    // A small max_data_xfer_size makes each 1 KiB leg take several messages.
    let options = UserOptions::default().with_max_data_xfer_size(256);
    let b = Backend::socket(edu_fake(), false, options);
    let vm = Vm::new();
    let mem = private_ram();
    let dev = vm.attach(&b);
    let g = Guest::new(&dev, &vm);
    let (_, bar) = edu_up(&g, &mem);
    assert_eq!(b.fake.dma_mapping_count(), RAM_REGIONS.len());
    let grp = vm.group(&dev.msi_group().unwrap());
    edu_round_trip(&g, &mem, &grp, bar, 1);
    edu_round_trip(&g, &mem, &grp, bar, 2);
    assert_eq!(b.fake.counters().dma_errors(), 0);
}

#[test]
fn a_memfd_sealed_against_shrinking_is_mapped_by_the_server_and_an_unsealed_one_is_not() {
    for (name, sealed) in [(c"ram-sealed", true), (c"ram-unsealed", false)] {
        let b = Backend::socket(edu_fake(), false, UserOptions::default());
        let vm = Vm::new();
        let (_file, mem) = memfd_ram(name, sealed);
        let dev = vm.attach(&b);
        let g = Guest::new(&dev, &vm);
        let ours = mappings_of(name.to_str().unwrap());
        assert!(ours > 0, "the VMM's own mappings");
        let (_, bar) = edu_up(&g, &mem);
        // The server runs in this process: its mappings show here too.
        let all = mappings_of(name.to_str().unwrap());
        if sealed {
            assert!(all > ours, "the server maps a sealed memfd");
        } else {
            assert_eq!(all, ours, "the server does not map an unsealed memfd");
        }
        // DMA works both ways either way.
        let grp = vm.group(&dev.msi_group().unwrap());
        edu_round_trip(&g, &mem, &grp, bar, 3);
        drop(dev);
    }
}

fn file_source(f: &File, offset: u64) -> DmaSource<'_> {
    DmaSource {
        host_addr: 0,
        file: Some(DmaFile {
            fd: f.as_fd(),
            offset,
        }),
        read_only: false,
    }
}

#[test]
fn dma_map_of_a_memfd_shorter_than_offset_plus_size_is_refused_with_einval() {
    let b = Backend::socket(edu_fake(), false, UserOptions::default());
    for sealed in [false, true] {
        let f = named_memfd(c"short", 0x3000, sealed);
        for (offset, size) in [(0, 0x4000), (0x1000, 0x3000), (0x3000, 0x1000)] {
            // SAFETY: no host address; the memfd is the test's, for the
            // device to read and write.
            let r = unsafe {
                b.vfio
                    .iommu_domain()
                    .map(0x10_0000, size, file_source(&f, offset))
            };
            assert!(
                matches!(
                    r,
                    Err(Error::Refused {
                        errno: libc::EINVAL,
                        ..
                    })
                ),
                "{size:#x} bytes at {offset:#x} of a 0x3000-byte file: {r:?}"
            );
        }
        // What fits is accepted.
        // SAFETY: as above.
        unsafe {
            b.vfio
                .iommu_domain()
                .map(0x10_0000, 0x2000, file_source(&f, 0x1000))
        }
        .unwrap();
        b.vfio.iommu_domain().unmap(0x10_0000, 0x2000).unwrap();
    }
    assert_eq!(b.fake.dma_mapping_count(), 0);
}

#[test]
fn shrinking_the_file_after_dma_map_makes_the_device_report_a_dma_fault_not_sigbus() {
    let b = Backend::socket(edu_fake(), false, UserOptions::default());
    let vm = Vm::new();
    let (file, mem) = memfd_ram(c"ram-shrunk", false);
    let dev = vm.attach(&b);
    let g = Guest::new(&dev, &vm);
    let (_, bar) = edu_up(&g, &mem);
    // The client takes the memory away under the device. (From here on the
    // VMM side must not touch `mem` either: it would fault itself.)
    file.set_len(0).unwrap();
    let src = RAM_REGIONS[1].0 + 0x1000;
    edu_dma(&g, bar, src, edu::DMA_BUFFER, 1024, false);
    assert_eq!(
        g.mmio_read32(bar + edu::DMA_ERROR),
        DmaFault::Unreachable.code(),
        "RAM -> device from a shrunk file"
    );
    // The server is still serving: registers answer, the device works.
    assert_eq!(g.mmio_read32(bar + edu::ID), edu::ID_VALUE);
    g.mmio_write32(bar + edu::FACTORIAL, 5);
    assert_eq!(g.mmio_read32(bar + edu::FACTORIAL), 120);
    // The memory comes back: DMA works again.
    file.set_len(4 << 20).unwrap();
    edu_dma(&g, bar, src, edu::DMA_BUFFER, 1024, false);
    assert_eq!(g.mmio_read32(bar + edu::DMA_ERROR), 0);
    assert!(b.fake.counters().dma_errors() >= 1);
}

// ---------------------------------------------------------------------------
// A client written by hand, to answer (or not) the server's requests.

struct RawClient {
    sock: UnixStream,
    next_id: u16,
    /// Commands the server sent us that we have not handled yet.
    requests: Vec<Message>,
}

impl RawClient {
    fn connect(path: &std::path::Path, max_data_xfer_size: u32) -> RawClient {
        let sock = UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        let mut c = RawClient {
            sock,
            next_id: 1,
            requests: Vec::new(),
        };
        let caps = Capabilities {
            max_data_xfer_size,
            ..Capabilities::default()
        };
        let v = protocol::encode_version(protocol::VERSION_MAJOR, protocol::VERSION_MINOR, &caps);
        let r = c.call(command::VERSION, &[&v], &[]);
        assert!(!r.header.is_error());
        c
    }

    fn send(&mut self, cmd: u16, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> u16 {
        let id = self.next_id;
        self.next_id += 1;
        let len = parts.iter().map(|p| p.len()).sum();
        let h = Header::command(id, cmd, len).unwrap();
        protocol::write_message(self.sock.as_fd(), &h, parts, fds).unwrap();
        id
    }

    /// The next message; server commands are kept in `requests`.
    fn recv_reply(&mut self, id: u16) -> Message {
        loop {
            let m = protocol::read_message(self.sock.as_fd(), 1 << 22, 4)
                .unwrap()
                .expect("the server closed the connection");
            if m.header.is_command() {
                self.requests.push(m);
            } else {
                assert_eq!(m.header.id, id, "reply to another request");
                return m;
            }
        }
    }

    fn call(&mut self, cmd: u16, parts: &[&[u8]], fds: &[BorrowedFd<'_>]) -> Message {
        let id = self.send(cmd, parts, fds);
        self.recv_reply(id)
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) {
        let p = RegionAccessPayload {
            offset,
            region,
            count: data.len() as u32,
        };
        let r = self.call(command::REGION_WRITE, &[&p.encode(), data], &[]);
        assert!(!r.header.is_error(), "REGION_WRITE at {offset:#x}");
    }

    fn region_read64(&mut self, region: u32, offset: u64) -> u64 {
        let p = RegionAccessPayload {
            offset,
            region,
            count: 8,
        };
        let r = self.call(command::REGION_READ, &[&p.encode()], &[]);
        assert!(!r.header.is_error(), "REGION_READ at {offset:#x}");
        let mut b = [0u8; 8];
        b.copy_from_slice(&r.payload[RegionAccessPayload::SIZE..]);
        u64::from_le_bytes(b)
    }

    /// `DMA_MAP` of `iova .. iova + size`, readable and writable, no fd.
    fn dma_map_without_fd(&mut self, iova: u64, size: u64) {
        let p = DmaMapPayload {
            argsz: DmaMapPayload::SIZE as u32,
            flags: dma_flags::READ | dma_flags::WRITE,
            offset: 0,
            address: iova,
            size,
        };
        let r = self.call(command::DMA_MAP, &[&p.encode()], &[]);
        assert!(!r.header.is_error(), "DMA_MAP without fd: {:?}", r.header);
    }

    /// Starts an edu DMA from guest memory at `src` into the device
    /// buffer; returns once the REGION_WRITE that starts it was answered.
    fn start_edu_dma_from(&mut self, src: u64, count: u64) {
        self.region_write(0, edu::DMA_SRC, &src.to_le_bytes());
        self.region_write(0, edu::DMA_DST, &edu::DMA_BUFFER.to_le_bytes());
        self.region_write(0, edu::DMA_COUNT, &count.to_le_bytes());
        self.region_write(0, edu::DMA_CMD, &edu::DMA_CMD_START.to_le_bytes());
    }

    /// Polls DMA_CMD until START clears (bounded); answers the server's
    /// DMA_READs from `memory` (at IOVA `base`) when `answer`, and returns
    /// the byte counts they asked for.
    fn wait_edu_dma(&mut self, answer: Option<(u64, &[u8])>) -> Vec<u64> {
        let deadline = Instant::now() + WAIT;
        let mut counts = Vec::new();
        loop {
            if let Some((base, memory)) = answer {
                for m in std::mem::take(&mut self.requests) {
                    assert_eq!(m.header.command, command::DMA_READ);
                    let req = DmaAccessPayload::decode(&m.payload).unwrap();
                    counts.push(req.count);
                    let at = (req.address - base) as usize;
                    let data = &memory[at..at + req.count as usize];
                    let h = Header::reply(&m.header, DmaAccessPayload::SIZE + data.len()).unwrap();
                    protocol::write_message(self.sock.as_fd(), &h, &[&req.encode(), data], &[])
                        .unwrap();
                }
            }
            if self.region_read64(0, edu::DMA_CMD) & edu::DMA_CMD_START == 0 {
                return counts;
            }
            assert!(Instant::now() < deadline, "the edu DMA never finished");
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn raw_setup(dma_timeout: Duration) -> (tempfile::TempDir, Arc<FakeDevice>, UserServer) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("edu.sock");
    let fake = edu_fake();
    let options = ServerOptions::default().with_dma_timeout(dma_timeout);
    let server = UserServer::bind(&sock, fake.clone(), options).unwrap();
    (dir, fake, server)
}

#[test]
fn a_client_that_never_answers_dma_read_gets_its_reply_a_dma_fault_and_later_service() {
    let timeout = Duration::from_millis(300);
    let (dir, fake, _server) = raw_setup(timeout);
    let mut c = RawClient::connect(&dir.path().join("edu.sock"), 1 << 20);
    // Memory space on, so that BAR 0 decodes.
    c.region_write(region::CONFIG, 4, &6u16.to_le_bytes());
    let iova = 0x10_0000;
    c.dma_map_without_fd(iova, 0x1_0000);

    // The REGION_WRITE that starts the DMA is answered although we answer
    // none of the server's requests (QEMU's vCPU thread cannot while it
    // waits for that reply).
    let t = Instant::now();
    c.start_edu_dma_from(iova, 512);
    let answered = c.wait_edu_dma(None);
    assert!(answered.is_empty());
    assert!(
        !c.requests.is_empty(),
        "the device asked for the data with DMA_READ"
    );
    assert!(c
        .requests
        .iter()
        .all(|m| m.header.command == command::DMA_READ));
    assert!(
        t.elapsed() < timeout + Duration::from_secs(3),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        c.region_read64(0, edu::DMA_ERROR) as u32,
        DmaFault::Unreachable.code()
    );
    assert_eq!(fake.counters().dma_errors(), 1);

    // Later requests are served, and a DMA we do answer works.
    c.requests.clear();
    let memory: Vec<u8> = (0..0x1_0000u32).map(|i| (i * 7 + 1) as u8).collect();
    c.start_edu_dma_from(iova + 0x800, 512);
    let answered = c.wait_edu_dma(Some((iova, &memory)));
    assert_eq!(answered, [512]);
    assert_eq!(c.region_read64(0, edu::DMA_ERROR), 0);
    let mut buf = vec![0u8; 512];
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let v = c.region_read64(0, edu::DMA_BUFFER + i as u64 * 8);
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    assert_eq!(buf, memory[0x800..0xa00]);
}

#[test]
fn dma_read_requests_never_exceed_the_clients_max_data_xfer_size() {
    let (dir, _fake, _server) = raw_setup(Duration::from_secs(5));
    let mut c = RawClient::connect(&dir.path().join("edu.sock"), 1024);
    c.region_write(region::CONFIG, 4, &6u16.to_le_bytes());
    let iova = 0x20_0000;
    c.dma_map_without_fd(iova, 0x2000);
    let memory: Vec<u8> = (0..0x2000u32).map(|i| (i ^ 0x5a) as u8).collect();
    c.start_edu_dma_from(iova, edu::DMA_BUFFER_SIZE);
    let counts = c.wait_edu_dma(Some((iova, &memory)));
    assert_eq!(c.region_read64(0, edu::DMA_ERROR), 0);
    assert!(counts.iter().all(|&n| n <= 1024), "{counts:?}");
    assert_eq!(
        counts.iter().sum::<u64>(),
        edu::DMA_BUFFER_SIZE,
        "{counts:?}"
    );
}

#[test]
fn a_dma_read_reply_that_does_not_match_the_request_is_a_dma_fault_and_service_goes_on() {
    let (dir, fake, _server) = raw_setup(Duration::from_secs(5));
    let mut c = RawClient::connect(&dir.path().join("edu.sock"), 1 << 20);
    c.region_write(region::CONFIG, 4, &6u16.to_le_bytes());
    let iova = 0x30_0000;
    c.dma_map_without_fd(iova, 0x1000);
    // Short data, then data for another address, then a reply that claims
    // to answer a different command.
    for bad in 0..3 {
        c.requests.clear();
        c.start_edu_dma_from(iova, 64);
        let deadline = Instant::now() + WAIT;
        while c.requests.is_empty() {
            assert!(Instant::now() < deadline, "no DMA_READ came");
            c.region_read64(0, edu::DMA_SRC);
        }
        let m = c.requests.remove(0);
        let req = DmaAccessPayload::decode(&m.payload).unwrap();
        let (head, data, header) = match bad {
            0 => (req, vec![0u8; 10], m.header),
            1 => (
                DmaAccessPayload {
                    address: req.address + 8,
                    ..req
                },
                vec![0u8; 64],
                m.header,
            ),
            _ => (
                req,
                vec![0u8; 64],
                Header {
                    command: command::REGION_READ,
                    ..m.header
                },
            ),
        };
        let h = Header::reply(&header, DmaAccessPayload::SIZE + data.len()).unwrap();
        protocol::write_message(c.sock.as_fd(), &h, &[&head.encode(), &data], &[]).unwrap();
        c.wait_edu_dma(None);
        assert_eq!(
            c.region_read64(0, edu::DMA_ERROR) as u32,
            DmaFault::Unreachable.code(),
            "bad reply {bad}"
        );
    }
    assert_eq!(fake.counters().dma_errors(), 3);
    // Still serving: the DMA registers read back what we wrote.
    assert_eq!(c.region_read64(0, edu::DMA_SRC), iova);
}
