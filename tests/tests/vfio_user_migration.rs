//! Migration over vfio-user, at the `Vfio` level: a fake device served by
//! our server, driven through our client (`DEVICE_FEATURE`,
//! `MIG_DATA_READ` / `MIG_DATA_WRITE`), migrated into a second served fake
//! device. The state machine, pre-copy, the data stream and device DMA
//! logging are the kernel's uAPI (`linux/vfio.h`) carried by the vfio-user
//! spec's messages.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_backend::user::{ServerOptions, UserDevice, UserOptions, UserServer};
use vfio_backend::{
    irq, region, DirtyRange, DmaFile, DmaSource, Error, Mapping, MigState, MigrationStream,
    SparseArea, Vfio,
};
use vfio_fake_device::{dma_engine, BarSpec, Capability, DeviceTemplate, FakeDevice, RegisterKind};

const ENGINE: u64 = 0x100;
const DOORBELLS: u64 = 0x200;
const MEM_BAR: u32 = 2;
const MEM_SIZE: u64 = 0x10000;
const RAM_IOVA: u64 = 0x100_0000;
const RAM_SIZE: usize = 0x40_0000;

/// BAR 0: a DMA engine (vector 1) and four doorbells (vectors 0..3); BAR 2:
/// 64 KiB of plain memory.
fn template() -> DeviceTemplate {
    DeviceTemplate::builder()
        .ids(0x1234, 0x0003)
        .bar(0, BarSpec::mem32(0x4000))
        .bar(2, BarSpec::mem32(MEM_SIZE))
        .capability(Capability::Msi {
            vectors: 4,
            addr64: true,
            per_vector_mask: false,
        })
        .registers(
            0,
            ENGINE,
            dma_engine::BLOCK_SIZE,
            RegisterKind::DmaEngine { irq_vector: 1 },
        )
        .registers(
            0,
            DOORBELLS,
            16,
            RegisterKind::Doorbell {
                first_vector: 0,
                stride: 4,
            },
        )
        .build()
        .unwrap()
}

/// A fake device served by our server and the client connected to it.
struct Served {
    fake: Arc<FakeDevice>,
    client: UserDevice,
    _server: UserServer,
    _dir: tempfile::TempDir,
}

fn served(options: UserOptions) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let fake = Arc::new(FakeDevice::new(template()).unwrap());
    let server = UserServer::bind(&sock, fake.clone(), ServerOptions::default()).unwrap();
    let client = UserDevice::connect_with_options(&sock, options).unwrap();
    // Memory decoding and bus mastering on, as a driver would.
    client
        .region_write(region::CONFIG, 4, &6u16.to_le_bytes())
        .unwrap();
    Served {
        fake,
        client,
        _server: server,
        _dir: dir,
    }
}

fn options() -> UserOptions {
    UserOptions::default().with_timeout(Duration::from_secs(10))
}

/// Guest RAM in a sealed memfd, shared with the server by `DMA_MAP`.
struct Ram {
    file: File,
    map: Mapping,
}

impl Ram {
    fn new() -> Ram {
        let name = c"vfio-user-migration-ram";
        // SAFETY: memfd_create with a NUL-terminated name; checked.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(RAM_SIZE as u64).unwrap();
        // SAFETY: F_ADD_SEALS on our own descriptor.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0);
        let map = Mapping::map_fd(
            file.as_fd(),
            0,
            RAM_SIZE as u64,
            libc::PROT_READ | libc::PROT_WRITE,
        )
        .unwrap();
        Ram { file, map }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is live and RAM_SIZE bytes long; the tests
        // read it only while no DMA runs.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), RAM_SIZE) }
    }

    fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= RAM_SIZE);
        // SAFETY: inside the live mapping (checked above); no DMA runs.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.as_ptr().add(off), data.len())
        };
    }

    fn map_for(&self, dev: &dyn Vfio) {
        let src = DmaSource {
            host_addr: self.map.as_ptr() as u64,
            file: Some(DmaFile {
                fd: self.file.as_fd(),
                offset: 0,
            }),
            read_only: false,
        };
        // SAFETY: the mapping outlives the device's use of it (the test
        // drops the devices first).
        unsafe { dev.iommu_domain().map(RAM_IOVA, RAM_SIZE as u64, src) }.unwrap();
    }
}

fn bar_write(dev: &dyn Vfio, off: u64, data: &[u8]) {
    dev.region_write(0, off, data).unwrap();
}

fn bar_read32(dev: &dyn Vfio, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.region_read(0, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn start_copy(dev: &dyn Vfio, src: u64, dst: u64, len: u64) {
    bar_write(dev, ENGINE + dma_engine::SRC, &src.to_le_bytes());
    bar_write(dev, ENGINE + dma_engine::DST, &dst.to_le_bytes());
    bar_write(dev, ENGINE + dma_engine::LEN, &len.to_le_bytes());
    bar_write(
        dev,
        ENGINE + dma_engine::CMD,
        &(dma_engine::CMD_START | dma_engine::CMD_IRQ).to_le_bytes(),
    );
}

fn wait_idle(dev: &dyn Vfio) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while bar_read32(dev, ENGINE + dma_engine::CMD) & dma_engine::CMD_START != 0 {
        assert!(Instant::now() < deadline, "the DMA never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
}

struct Efd(OwnedFd);

impl Efd {
    fn new() -> Efd {
        // SAFETY: eventfd returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd owned by nobody else.
        Efd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    fn take(&self) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64.
        let n = unsafe { libc::read(self.0.as_raw_fd(), std::ptr::from_mut(&mut v).cast(), 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }
}

fn wire_msi(dev: &dyn Vfio) -> Vec<Efd> {
    let efds: Vec<Efd> = (0..4).map(|_| Efd::new()).collect();
    let fds: Vec<_> = efds.iter().map(|e| Some(e.fd())).collect();
    dev.set_irq_eventfds(irq::MSI, 0, &fds).unwrap();
    efds
}

fn drain(s: &mut dyn MigrationStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 10000];
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&buf[..n]);
    }
}

fn load(dev: &dyn Vfio, data: &[u8]) -> Result<(), Error> {
    let mut s = dev
        .set_mig_state(MigState::Resuming)
        .unwrap()
        .expect("RESUMING opens a stream");
    for piece in data.chunks(5000) {
        s.write(piece)?;
    }
    dev.set_mig_state(MigState::Stop).map(|_| ())
}

fn errno<T>(r: Result<T, Error>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.errno().unwrap(),
    }
}

#[test]
fn the_client_sees_the_served_devices_migration_flags_and_state() {
    let s = served(options());
    let flags = s.client.migration_flags().unwrap().unwrap();
    assert!(flags.stop_copy() && flags.p2p() && flags.pre_copy());
    assert_eq!(s.client.mig_state().unwrap(), MigState::Running);
    // The server announced the migration capability.
    let caps = s.client.server_capabilities();
    assert_eq!(caps.migration_pgsize, Some(4096));
    assert!(caps.migration_max_bitmap_size.is_some());
    assert!(s
        .client
        .set_mig_state(MigState::RunningP2p)
        .unwrap()
        .is_none());
    assert_eq!(s.fake.mig_state().unwrap(), MigState::RunningP2p);
}

#[test]
fn a_served_device_mid_dma_with_pending_vectors_migrates_into_a_second_one() {
    let a = served(options());
    let b = served(options());
    let ram_a = Ram::new();
    ram_a.map_for(&a.client);
    let fill: Vec<u8> = (0..0x2000).map(|i| (i * 7) as u8).collect();
    ram_a.write(0, &fill);
    let efds_a = wire_msi(&a.client);
    // The device's memory, written through messages and through the
    // client's mmap of the BAR.
    a.client
        .region_write(MEM_BAR, 0x40, b"over REGION_WRITE")
        .unwrap();
    let bar = a
        .client
        .mmap_region(
            MEM_BAR,
            SparseArea {
                offset: 0,
                size: MEM_SIZE,
            },
        )
        .unwrap();
    // SAFETY: the mapping is live and MEM_SIZE bytes long.
    unsafe { std::ptr::copy_nonoverlapping(b"over mmap".as_ptr(), bar.as_ptr().add(0x8000), 9) };
    // Pre-copy while it runs.
    let mut stream = a
        .client
        .set_mig_state(MigState::PreCopy)
        .unwrap()
        .expect("PRE_COPY opens a stream");
    let mut data = drain(&mut *stream);
    assert!(!data.is_empty());
    // Quiesced: a DMA is started and a doorbell rung, neither runs.
    assert!(a
        .client
        .set_mig_state(MigState::PreCopyP2p)
        .unwrap()
        .is_none());
    start_copy(&a.client, RAM_IOVA, RAM_IOVA + 0x10000, 0x2000);
    bar_write(&a.client, DOORBELLS + 12, &1u32.to_le_bytes());
    assert_eq!((efds_a[1].take(), efds_a[3].take()), (0, 0));
    assert!(a.fake.irq_pending(irq::MSI, 3));
    assert!(a
        .client
        .set_mig_state(MigState::StopCopy)
        .unwrap()
        .is_none());
    data.extend_from_slice(&drain(&mut *stream));
    // The destination: the VMM moved guest RAM and maps it at the same IOVA.
    let ram_b = Ram::new();
    ram_b.write(0, ram_a.bytes());
    ram_b.map_for(&b.client);
    load(&b.client, &data).unwrap();
    let efds_b = wire_msi(&b.client);
    assert!(b.client.set_mig_state(MigState::Running).unwrap().is_none());
    wait_idle(&b.client);
    assert_eq!(
        bar_read32(&b.client, ENGINE + dma_engine::STATUS),
        dma_engine::STATUS_DONE
    );
    assert_eq!(
        ram_b.bytes()[0x10000..0x12000],
        ram_a.bytes()[..0x2000],
        "the DMA ran on the destination"
    );
    assert!(ram_a.bytes()[0x10000..0x12000].iter().all(|b| *b == 0));
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut v1, mut v3) = (0, 0);
    while (v1 == 0 || v3 == 0) && Instant::now() < deadline {
        v1 += efds_b[1].take();
        v3 += efds_b[3].take();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(
        (v1, v3),
        (1, 1),
        "completion and the pending doorbell vector"
    );
    let mut got = [0u8; 17];
    b.client.region_read(MEM_BAR, 0x40, &mut got).unwrap();
    assert_eq!(&got, b"over REGION_WRITE");
    let mut got = [0u8; 9];
    b.client.region_read(MEM_BAR, 0x8000, &mut got).unwrap();
    assert_eq!(&got, b"over mmap");
    drop(bar);
}

#[test]
fn the_dirty_bitmap_over_vfio_user_names_exactly_the_pages_the_dma_wrote() {
    // A small max_data_xfer_size: a report of 1024 pages takes several
    // requests of at most 32 bytes of bitmap.
    let s = served(options().with_max_data_xfer_size(32));
    let ram = Ram::new();
    ram.map_for(&s.client);
    s.client
        .dma_logging_start(
            4096,
            &[DirtyRange {
                iova: RAM_IOVA,
                length: RAM_SIZE as u64,
            }],
        )
        .unwrap();
    // Copy 0x1800 bytes to 0x1ff800: pages 0x1ff and 0x200.
    start_copy(&s.client, RAM_IOVA, RAM_IOVA + 0x1f_f800, 0x1800);
    wait_idle(&s.client);
    let mut bm = vec![0u64; RAM_SIZE / 4096 / 64];
    s.client
        .dma_logging_report(RAM_IOVA, RAM_SIZE as u64, 4096, &mut bm)
        .unwrap();
    let set: Vec<usize> = (0..RAM_SIZE / 4096)
        .filter(|p| bm[p / 64] & (1 << (p % 64)) != 0)
        .collect();
    assert_eq!(set, [0x1ff, 0x200]);
    s.client
        .dma_logging_report(RAM_IOVA, RAM_SIZE as u64, 4096, &mut bm)
        .unwrap();
    assert!(bm.iter().all(|w| *w == 0), "reported pages are cleared");
    s.client.dma_logging_stop().unwrap();
    assert_eq!(
        errno(s.client.dma_logging_report(RAM_IOVA, 4096, 4096, &mut bm)),
        libc::EINVAL
    );
}

#[test]
fn truncated_and_corrupt_streams_are_refused_over_vfio_user() {
    let a = served(options());
    a.client
        .region_write(MEM_BAR, 0x1000, b"state to carry")
        .unwrap();
    let mut s = a.client.set_mig_state(MigState::StopCopy).unwrap().unwrap();
    let data = drain(&mut *s);
    let b = served(options());
    // Truncated: the destination refuses to leave RESUMING and goes to
    // ERROR; a reset brings it back.
    assert_eq!(
        errno(load(&b.client, &data[..data.len() - 3])),
        libc::EINVAL
    );
    assert_eq!(b.client.mig_state().unwrap(), MigState::Error);
    b.client.reset().unwrap();
    assert_eq!(b.client.mig_state().unwrap(), MigState::Running);
    // Corrupt: one flipped bit in the middle.
    let mut bad = data.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 1;
    let mut w = b.client.set_mig_state(MigState::Resuming).unwrap().unwrap();
    let wrote = bad.chunks(5000).try_for_each(|c| w.write(c));
    assert_eq!(errno(wrote), libc::EINVAL, "the checksum does not match");
    // A refused write leaves the device RESUMING; leaving it fails.
    assert_eq!(b.client.mig_state().unwrap(), MigState::Resuming);
    assert_eq!(errno(b.client.set_mig_state(MigState::Stop)), libc::EINVAL);
    assert_eq!(b.client.mig_state().unwrap(), MigState::Error);
    b.client.reset().unwrap();
    // The source lost nothing: a good load still works.
    load(&b.client, &data).unwrap();
    b.client.set_mig_state(MigState::Running).unwrap();
    let mut got = [0u8; 14];
    b.client.region_read(MEM_BAR, 0x1000, &mut got).unwrap();
    assert_eq!(&got, b"state to carry");
}

#[test]
fn arcs_the_uapi_refuses_are_refused_over_vfio_user_and_ended_streams_too() {
    let s = served(options());
    let mut stream = s.client.set_mig_state(MigState::StopCopy).unwrap().unwrap();
    assert_eq!(
        errno(s.client.set_mig_state(MigState::PreCopy)),
        libc::EINVAL
    );
    assert_eq!(s.client.mig_state().unwrap(), MigState::StopCopy);
    assert_eq!(errno(s.client.set_mig_state(MigState::Error)), libc::EINVAL);
    // The stream goes on while the device stays in STOP_COPY.
    assert!(!drain(&mut *stream).is_empty());
    assert!(s.client.set_mig_state(MigState::Stop).unwrap().is_none());
    let mut buf = [0u8; 8];
    assert_eq!(errno(stream.read(&mut buf)), libc::EBADF);
    // precopy_info has no vfio-user message.
    let mut pre = s
        .client
        .set_mig_state(MigState::PreCopyP2p)
        .unwrap()
        .unwrap();
    assert!(matches!(pre.precopy_info(), Err(Error::Unsupported(_))));
    assert!(s.client.mig_data_size().unwrap() > 0);
    // A reset returns the device to RUNNING and ends the stream on both
    // sides.
    s.client.reset().unwrap();
    assert_eq!(s.client.mig_state().unwrap(), MigState::Running);
    assert_eq!(errno(pre.read(&mut buf)), libc::EBADF);
}

/// A client speaking raw messages, to send what ours never would.
struct Raw {
    sock: std::os::unix::net::UnixStream,
    next_id: u16,
}

impl Raw {
    fn connect(path: &std::path::Path, caps_json: &str) -> Raw {
        let sock = std::os::unix::net::UnixStream::connect(path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut r = Raw { sock, next_id: 1 };
        let mut v = vec![0u8, 0, 1, 0];
        v.extend_from_slice(caps_json.as_bytes());
        v.push(0);
        let (h, _) = r.call(protocol::command::VERSION, &[&v]);
        assert!(!h.is_error());
        r
    }

    fn call(&mut self, cmd: u16, parts: &[&[u8]]) -> (protocol::Header, Vec<u8>) {
        let id = self.next_id;
        self.next_id += 1;
        let len = parts.iter().map(|p| p.len()).sum();
        let h = protocol::Header::command(id, cmd, len).unwrap();
        protocol::write_message(self.sock.as_fd(), &h, parts, &[]).unwrap();
        let m = protocol::read_message(self.sock.as_fd(), 1 << 22, 4)
            .unwrap()
            .expect("the server closed the connection");
        assert_eq!(m.header.id, id);
        (m.header, m.payload)
    }

    /// A DEVICE_FEATURE request; the errno of an error reply, or 0.
    fn feature(&mut self, argsz: u32, flags: u32, data: &[u8]) -> (u32, Vec<u8>) {
        let mut head = argsz.to_le_bytes().to_vec();
        head.extend_from_slice(&flags.to_le_bytes());
        let (h, p) = self.call(protocol::command::DEVICE_FEATURE, &[&head, data]);
        (if h.is_error() { h.error } else { 0 }, p)
    }
}

use vfio_backend::user::protocol;

const GET: u32 = 1 << 16;
const SET: u32 = 1 << 17;
const PROBE: u32 = 1 << 18;

#[test]
fn the_server_refuses_every_malformed_migration_request_and_stays_usable() {
    let s = served(options());
    let sock = s._dir.path().join("fake.sock");
    // Our client holds the server; a second connection is refused, so the
    // raw client takes the first one's place.
    drop(s.client);
    std::thread::sleep(Duration::from_millis(50));
    let mut raw = Raw::connect(
        &sock,
        r#"{"capabilities":{"max_data_xfer_size":4096,"migration":{"pgsize":4096,"max_bitmap_size":64}}}"#,
    );
    let einval = libc::EINVAL as u32;
    // Unknown flag bits, GET with SET, neither.
    assert_eq!(raw.feature(16, GET | (1 << 20) | 1, &[]).0, einval);
    assert_eq!(raw.feature(16, GET | SET | 2, &[]).0, einval);
    assert_eq!(raw.feature(16, 2, &[]).0, einval);
    // An unknown feature: ENOTTY, as the kernel answers.
    assert_eq!(raw.feature(16, GET | 42, &[]).0, libc::ENOTTY as u32);
    // SET of a feature that only GETs.
    assert_eq!(raw.feature(16, SET | 1, &[]).0, einval);
    // A state outside the uAPI, and a state payload of the wrong size.
    let mut st = 8u32.to_le_bytes().to_vec();
    st.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(raw.feature(16, SET | 2, &st).0, einval);
    assert_eq!(raw.feature(16, SET | 2, &st[..4]).0, einval);
    // ERROR cannot be set.
    let mut st = 0u32.to_le_bytes().to_vec();
    st.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(raw.feature(16, SET | 2, &st).0, einval);
    // MIG_DATA_READ without a stream, and above max_data_xfer_size.
    let mut rd = 8u32.to_le_bytes().to_vec();
    rd.extend_from_slice(&16u32.to_le_bytes());
    let (h, _) = raw.call(protocol::command::MIG_DATA_READ, &[&rd]);
    assert!(h.is_error() && h.error == einval);
    let mut big = 8u32.to_le_bytes().to_vec();
    big.extend_from_slice(&(2u32 << 20).to_le_bytes());
    let (h, _) = raw.call(protocol::command::MIG_DATA_READ, &[&big]);
    assert!(h.is_error() && h.error == einval);
    // MIG_DATA_WRITE whose size disagrees with its data.
    let mut wr = 8u32.to_le_bytes().to_vec();
    wr.extend_from_slice(&100u32.to_le_bytes());
    let (h, _) = raw.call(protocol::command::MIG_DATA_WRITE, &[&wr, &[0u8; 10]]);
    assert!(h.is_error() && h.error == einval);
    // DMA logging: 257 ranges are E2BIG; a count that disagrees with the
    // data is EINVAL.
    let mut ctl = 4096u64.to_le_bytes().to_vec();
    ctl.extend_from_slice(&257u32.to_le_bytes());
    ctl.extend_from_slice(&0u32.to_le_bytes());
    assert_eq!(raw.feature(16, SET | 6, &ctl).0, libc::E2BIG as u32);
    let mut ctl = 4096u64.to_le_bytes().to_vec();
    ctl.extend_from_slice(&2u32.to_le_bytes());
    ctl.extend_from_slice(&0u32.to_le_bytes());
    ctl.extend_from_slice(&[0u8; 16]);
    assert_eq!(raw.feature(16, SET | 6, &ctl).0, einval);
    // Logging one range, then reports: a bitmap above the client's
    // max_bitmap_size (64 bytes: 512 pages), a page size that is not a
    // power of two, and an argsz too small for the reply are refused.
    let mut ctl = 4096u64.to_le_bytes().to_vec();
    ctl.extend_from_slice(&1u32.to_le_bytes());
    ctl.extend_from_slice(&0u32.to_le_bytes());
    ctl.extend_from_slice(&0x100000u64.to_le_bytes());
    ctl.extend_from_slice(&(1u64 << 30).to_le_bytes());
    assert_eq!(raw.feature(16 + 32, SET | 6, &ctl).0, 0);
    let report = |len: u64, ps: u64| {
        let mut d = 0x100000u64.to_le_bytes().to_vec();
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&ps.to_le_bytes());
        d
    };
    assert_eq!(
        raw.feature(1 << 20, GET | 8, &report(513 * 4096, 4096)).0,
        einval
    );
    assert_eq!(raw.feature(1 << 20, GET | 8, &report(4096, 3000)).0, einval);
    assert_eq!(raw.feature(8 + 24, GET | 8, &report(4096, 4096)).0, einval);
    let (e, p) = raw.feature(8 + 24 + 64, GET | 8, &report(512 * 4096, 4096));
    assert_eq!(e, 0);
    assert_eq!(p.len(), 8 + 24 + 64);
    // A reset ends the server's stream: a read after it has none.
    let mut st = 3u32.to_le_bytes().to_vec();
    st.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(raw.feature(16, SET | 2, &st).0, 0);
    let (h, p) = raw.call(protocol::command::MIG_DATA_READ, &[&rd]);
    assert!(!h.is_error());
    assert_eq!(p.len(), 8 + 16, "STOP_COPY streams");
    let (h, _) = raw.call(protocol::command::DEVICE_RESET, &[]);
    assert!(!h.is_error());
    let (h, _) = raw.call(protocol::command::MIG_DATA_READ, &[&rd]);
    assert!(h.is_error() && h.error == einval);
    // Probes answer without data; the connection still serves.
    assert_eq!(raw.feature(8, PROBE | GET | 1, &[]).0, 0);
    assert_eq!(raw.feature(8, PROBE | SET | 6, &[]).0, 0);
    let (e, p) = raw.feature(16, GET | 2, &[]);
    assert_eq!(e, 0);
    assert_eq!(
        u32::from_le_bytes(p[8..12].try_into().unwrap()),
        2,
        "RUNNING"
    );
}

#[test]
fn a_device_that_cannot_migrate_is_served_without_the_capability_and_refused_as_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let fake = Arc::new(FakeDevice::new(template()).unwrap());
    fake.set_migration(None).unwrap();
    let _server = UserServer::bind(&sock, fake.clone(), ServerOptions::default()).unwrap();
    let client = UserDevice::connect_with_options(&sock, options()).unwrap();
    assert_eq!(client.server_capabilities().migration_pgsize, None);
    assert_eq!(client.migration_flags().unwrap(), None);
    assert!(matches!(
        client.set_mig_state(MigState::StopCopy),
        Err(Error::Unsupported(_))
    ));
    assert!(matches!(client.mig_state(), Err(Error::Unsupported(_))));
}
