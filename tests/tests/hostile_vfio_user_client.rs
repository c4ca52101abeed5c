//! Our vfio-user server (serving the fake device) facing a hostile client
//! that speaks the wire protocol by hand: interrupt fds that are not
//! eventfds, eventfds whose counter it filled up, clients that send nothing
//! or half a message, a second client while one is served. The server must
//! refuse what the vfio-user spec and the kernel's `vfio-pci` refuse, never
//! block on what a client controls, drop a stalled client within its bound,
//! and keep serving.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use vfio_backend::user::protocol::{
    self, command, irq_set, Capabilities, Header, RegionAccessPayload, SetIrqsPayload,
};
use vfio_backend::user::{ServerOptions, UserDevice, UserOptions, UserServer};
use vfio_backend::{irq, region, Vfio};
use vfio_fake_device::{nvme_like, FakeDevice};

/// How long this test's client waits for any one reply: far longer than the
/// server needs, far shorter than "forever".
const REPLY_WAIT: Duration = Duration::from_secs(5);

struct Served {
    _dir: tempfile::TempDir,
    path: PathBuf,
    fake: Arc<FakeDevice>,
    server: Option<UserServer>,
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

fn serve(stall_timeout: Duration) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.sock");
    let fake = Arc::new(FakeDevice::profile("nvme-like").unwrap());
    let options = ServerOptions::default().with_stall_timeout(stall_timeout);
    let server = UserServer::bind(&path, fake.clone(), options).unwrap();
    Served {
        _dir: dir,
        path,
        fake,
        server: Some(server),
    }
}

/// A hand-driven client.
struct Raw {
    s: UnixStream,
    id: u16,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(REPLY_WAIT)).unwrap();
        s.set_write_timeout(Some(REPLY_WAIT)).unwrap();
        Raw { s, id: 0 }
    }

    /// Sends a request and returns (error errno or 0, reply payload).
    fn request(&mut self, cmd: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> (u32, Vec<u8>) {
        self.id = self.id.wrapping_add(1);
        let h = Header::command(self.id, cmd, payload.len()).unwrap();
        protocol::write_message(self.s.as_fd(), &h, &[payload], fds).unwrap();
        let t = Instant::now();
        let reply = protocol::read_message(self.s.as_fd(), 1 << 21, 4)
            .unwrap_or_else(|e| {
                panic!(
                    "no reply to command {cmd} after {:?}: the server is wedged ({e})",
                    t.elapsed()
                )
            })
            .expect("the server closed the connection");
        assert_eq!(reply.header.id, self.id);
        let err = if reply.header.is_error() {
            reply.header.error.max(1)
        } else {
            0
        };
        (err, reply.payload)
    }

    fn version(&mut self) {
        let v = protocol::encode_version(0, 1, &Capabilities::default());
        assert_eq!(self.request(command::VERSION, &v, &[]).0, 0);
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> u32 {
        let mut p = RegionAccessPayload {
            offset,
            region: index,
            count: data.len() as u32,
        }
        .encode()
        .to_vec();
        p.extend_from_slice(data);
        self.request(command::REGION_WRITE, &p, &[]).0
    }

    fn region_read32(&mut self, index: u32, offset: u64) -> u32 {
        let p = RegionAccessPayload {
            offset,
            region: index,
            count: 4,
        }
        .encode();
        let (err, reply) = self.request(command::REGION_READ, &p, &[]);
        assert_eq!(err, 0, "REGION_READ failed");
        u32::from_le_bytes(reply[16..20].try_into().unwrap())
    }

    fn set_irqs(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        fds: &[BorrowedFd<'_>],
    ) -> u32 {
        let p = SetIrqsPayload {
            argsz: SetIrqsPayload::SIZE as u32,
            flags,
            index,
            start,
            count,
        }
        .encode();
        self.request(command::DEVICE_SET_IRQS, &p, fds).0
    }

    /// Whether the server closed the connection within `limit` (EOF or reset).
    fn closed_within(&mut self, limit: Duration) -> bool {
        self.s.set_read_timeout(Some(limit)).unwrap();
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

fn eventfd(flags: i32) -> OwnedFd {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, flags | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor we own, taken over once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// (read end, write end), both non-blocking (so that the test can fill it).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    assert_eq!(rc, 0);
    // SAFETY: fresh descriptors we own, each taken over once.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn fill_pipe(w: &OwnedFd) {
    let chunk = [0u8; 4096];
    loop {
        // SAFETY: writes from a live buffer of the length given.
        let n = unsafe { libc::write(w.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) };
        if n < 0 {
            break;
        }
    }
}

fn flags_of(fd: &OwnedFd) -> i32 {
    // SAFETY: F_GETFL on a descriptor we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) }
}

/// Memory decoding on, then a doorbell write that makes the nvme-like raise
/// MSI-X vector `vector`.
fn ring(c: &mut Raw, vector: u32) -> u32 {
    c.region_write(region::CONFIG, 4, &0x0006u16.to_le_bytes());
    c.region_write(
        0,
        nvme_like::DOORBELLS + u64::from(vector) * nvme_like::DOORBELL_STRIDE,
        &1u32.to_le_bytes(),
    )
}

/// Config space dword 0 of the nvme-like: what a live server answers.
const IDS: u32 = nvme_like::VENDOR_ID as u32 | (nvme_like::DEVICE_ID as u32) << 16;

const TRIGGER: u32 = irq_set::DATA_EVENTFD | irq_set::ACTION_TRIGGER;

#[test]
fn set_irqs_with_a_pipe_among_its_fds_is_einval_and_installs_none_of_them() {
    let sv = serve(Duration::from_secs(5));
    let mut c = Raw::connect(&sv.path);
    c.version();
    let good = eventfd(libc::EFD_NONBLOCK);
    let (r, w) = pipe();
    fill_pipe(&w);
    let err = c.set_irqs(TRIGGER, irq::MSIX, 0, 2, &[good.as_fd(), w.as_fd()]);
    assert_eq!(
        err,
        libc::EINVAL as u32,
        "a pipe was taken as an interrupt eventfd"
    );
    assert_eq!(
        sv.fake.active_irq(),
        None,
        "the good eventfd was installed anyway"
    );
    // A pipe alone, and a pipe's read end: refused the same.
    assert_eq!(
        c.set_irqs(TRIGGER, irq::MSIX, 1, 1, &[w.as_fd()]),
        libc::EINVAL as u32
    );
    assert_eq!(
        c.set_irqs(TRIGGER, irq::MSIX, 1, 1, &[r.as_fd()]),
        libc::EINVAL as u32
    );
    // Interrupts fire and the server keeps answering.
    ring(&mut c, 1);
    assert_eq!(
        c.region_read32(region::CONFIG, 0),
        IDS,
        "the server stopped answering"
    );
}

#[test]
fn the_intx_unmask_fd_must_be_an_eventfd_too() {
    let sv = serve(Duration::from_secs(5));
    let mut c = Raw::connect(&sv.path);
    c.version();
    let e = eventfd(libc::EFD_NONBLOCK);
    // nvme-like has INTx; enable it, then give a pipe as its unmask fd.
    assert_eq!(c.set_irqs(TRIGGER, irq::INTX, 0, 1, &[e.as_fd()]), 0);
    let (_r, w) = pipe();
    let unmask = irq_set::DATA_EVENTFD | irq_set::ACTION_UNMASK;
    assert_eq!(
        c.set_irqs(unmask, irq::INTX, 0, 1, &[w.as_fd()]),
        libc::EINVAL as u32
    );
    let u = eventfd(0);
    assert_eq!(c.set_irqs(unmask, irq::INTX, 0, 1, &[u.as_fd()]), 0);
    assert_ne!(
        flags_of(&u) & libc::O_NONBLOCK,
        0,
        "the unmask eventfd was kept blocking"
    );
    assert_eq!(c.region_read32(region::CONFIG, 0), IDS);
}

#[test]
fn an_eventfd_whose_counter_the_client_filled_up_does_not_wedge_the_device() {
    let sv = serve(Duration::from_secs(5));
    let mut c = Raw::connect(&sv.path);
    c.version();
    // A blocking eventfd (as a hostile client would give), counter at its maximum.
    let e = eventfd(0);
    assert_eq!(c.set_irqs(TRIGGER, irq::MSIX, 0, 1, &[e.as_fd()]), 0);
    assert_ne!(
        flags_of(&e) & libc::O_NONBLOCK,
        0,
        "the server keeps a blocking interrupt eventfd"
    );
    // The doorbell signals it...
    let signalled = sv.fake.counters().interrupts_signalled();
    assert_eq!(ring(&mut c, 0), 0);
    assert_eq!(sv.fake.counters().interrupts_signalled(), signalled + 1);
    let mut v = 0u64;
    // SAFETY: reads 8 bytes into a live u64.
    let n = unsafe { libc::read(e.as_raw_fd(), std::ptr::from_mut(&mut v).cast(), 8) };
    assert_eq!((n, v), (8, 1));
    // ...and with the counter full, signalling it must not wait.
    let max: u64 = 0xffff_ffff_ffff_fffe;
    // SAFETY: writes 8 bytes from a live u64 (non-blocking now: the counter is 0).
    let n = unsafe { libc::write(e.as_raw_fd(), std::ptr::from_ref(&max).cast(), 8) };
    assert_eq!(n, 8);
    let dropped = sv.fake.counters().interrupts_dropped();
    assert_eq!(ring(&mut c, 0), 0);
    assert_eq!(c.region_read32(region::CONFIG, 0), IDS);
    assert_eq!(sv.fake.counters().interrupts_dropped(), dropped + 1);
}

#[test]
fn a_silent_client_is_dropped_within_the_stall_bound_and_the_next_is_served() {
    let stall = Duration::from_millis(500);
    let sv = serve(stall);
    let t = Instant::now();
    let mut silent = Raw::connect(&sv.path);
    assert!(
        silent.closed_within(REPLY_WAIT),
        "a silent client was never dropped"
    );
    let took = t.elapsed();
    assert!(took >= stall, "dropped after {took:?}, before its bound");
    let dev = UserDevice::connect(&sv.path).unwrap();
    assert!(dev.device_info().unwrap().is_pci());
}

#[test]
fn half_a_header_or_half_a_payload_is_dropped_within_the_stall_bound() {
    let stall = Duration::from_millis(500);
    let sv = serve(stall);
    // Half a header before VERSION.
    let mut c = Raw::connect(&sv.path);
    c.s.write_all(&[0u8; 7]).unwrap();
    assert!(c.closed_within(REPLY_WAIT), "half a header held the server");
    // Half a payload after VERSION, once negotiated.
    let mut c = Raw::connect(&sv.path);
    c.version();
    let h = Header::command(9, command::REGION_WRITE, 16 + 4).unwrap();
    c.s.write_all(&h.encode()).unwrap();
    c.s.write_all(&[0u8; 10]).unwrap();
    assert!(
        c.closed_within(REPLY_WAIT),
        "half a payload held the server"
    );
    let dev = UserDevice::connect(&sv.path).unwrap();
    assert!(dev.device_info().unwrap().is_pci());
}

#[test]
fn a_negotiated_client_may_stay_idle_longer_than_the_stall_bound() {
    let stall = Duration::from_millis(200);
    let sv = serve(stall);
    let mut c = Raw::connect(&sv.path);
    c.version();
    std::thread::sleep(stall * 4);
    assert_eq!(c.region_read32(region::CONFIG, 0), IDS);
}

#[test]
fn a_second_client_is_turned_away_at_once_while_one_is_served() {
    // A long bound: the second client must not wait for it.
    let sv = serve(Duration::from_secs(30));
    let mut first = Raw::connect(&sv.path);
    first.version();
    let t = Instant::now();
    let second = UserDevice::connect_with_options(
        &sv.path,
        UserOptions::default().with_timeout(Duration::from_secs(20)),
    );
    let err = second.expect_err("two clients served at once");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the second client waited {:?}",
        t.elapsed()
    );
    // Its VERSION was answered: busy.
    assert_eq!(err.errno(), Some(libc::EBUSY), "{err}");
    // By hand: VERSION gets an EBUSY error reply, then the connection closes.
    let mut third = Raw::connect(&sv.path);
    let v = protocol::encode_version(0, 1, &Capabilities::default());
    assert_eq!(
        third.request(command::VERSION, &v, &[]).0,
        libc::EBUSY as u32
    );
    assert!(third.closed_within(REPLY_WAIT));
    // Silent, it is closed too rather than left in the backlog.
    let mut fourth = Raw::connect(&sv.path);
    assert!(fourth.closed_within(REPLY_WAIT));
    // The first is still served.
    assert_eq!(first.region_read32(region::CONFIG, 0), IDS);
}

/// Records every log line.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        self.0
            .lock()
            .unwrap()
            .push(format!("{} {}", r.level(), r.args()));
    }
    fn flush(&self) {}
}

static CAPTURE: Capture = Capture(Mutex::new(Vec::new()));

#[test]
fn every_error_reply_is_logged_at_debug_with_its_command_errno_and_reason() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&CAPTURE).unwrap();
        log::set_max_level(log::LevelFilter::Debug);
    });
    let sv = serve(Duration::from_secs(5));
    let mut c = Raw::connect(&sv.path);
    c.version();
    let (_r, w) = pipe();
    assert_eq!(
        c.set_irqs(TRIGGER, irq::MSIX, 0, 1, &[w.as_fd()]),
        libc::EINVAL as u32
    );
    let p = RegionAccessPayload {
        offset: 0,
        region: 0,
        count: u32::MAX,
    }
    .encode();
    assert_eq!(
        c.request(command::REGION_READ, &p, &[]).0,
        libc::EINVAL as u32
    );
    drop(c);
    drop(sv);
    let lines = CAPTURE.0.lock().unwrap().clone();
    let find = |cmd: &str, why: &str| {
        lines.iter().any(|l| {
            l.starts_with("DEBUG")
                && l.contains(cmd)
                && l.contains(&format!("errno {}", libc::EINVAL))
                && l.contains(why)
        })
    };
    assert!(
        find("DEVICE_SET_IRQS", "not an eventfd"),
        "no debug line for the SET_IRQS error reply: {lines:#?}"
    );
    assert!(
        find("REGION_READ", "max_data_xfer_size"),
        "no debug line for the REGION_READ error reply: {lines:#?}"
    );
}

#[test]
fn a_client_that_connects_as_the_served_one_leaves_is_served_not_turned_away() {
    // One client at a time: the next one may connect the moment the last one hung up
    // (before the server noticed), and must then be served, not answered EBUSY.
    let sv = serve(Duration::from_secs(5));
    for round in 0..50 {
        let mut a = Raw::connect(&sv.path);
        a.version();
        drop(a);
        let b = UserDevice::connect(&sv.path)
            .unwrap_or_else(|e| panic!("round {round}: the next client was refused: {e}"));
        assert!(b.device_info().unwrap().is_pci());
    }
}
