//! `vfio-passthrough serve-fake`, answered by our own vfio-user client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfio_backend::user::UserDevice;
use vfio_backend::{region, Vfio};
use vfio_fake_device::nvme_like;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vfio-passthrough"))
}

/// Kills the server by its pid if a test fails before stopping it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(socket: &Path, args: &[&str]) -> Server {
    let child = bin()
        .arg("serve-fake")
        .arg(socket)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Listening once a connection is accepted (a stale socket file refuses it).
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            Instant::now() < deadline,
            "no server on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Server(child)
}

fn stop(mut s: Server) -> std::process::ExitStatus {
    let pid = i32::try_from(s.0.id()).unwrap();
    // SAFETY: kill(2) on the pid of the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    s.0.wait().unwrap()
}

#[test]
fn our_vfio_user_client_reads_the_served_profile_and_sigterm_removes_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake.sock");
    let server = start(&socket, &["--profile", "nvme-like"]);
    // The socket is its owner's only (vfio-user servers we create are 0600).
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    {
        let dev = UserDevice::connect(&socket).unwrap();
        assert!(dev.device_info().unwrap().is_pci());
        let mut ids = [0u8; 4];
        dev.region_read(region::CONFIG, 0, &mut ids).unwrap();
        assert_eq!(u16::from_le_bytes([ids[0], ids[1]]), nvme_like::VENDOR_ID);
        assert_eq!(u16::from_le_bytes([ids[2], ids[3]]), nvme_like::DEVICE_ID);
        assert_eq!(
            dev.region_info(region::BAR0).unwrap().size,
            nvme_like::BAR0_SIZE
        );
        assert_eq!(
            dev.irq_info(vfio_backend::irq::MSIX).unwrap().count,
            nvme_like::MSIX_VECTORS
        );
    }

    // A whole VMM-side attach over the socket: MSI-X fired by doorbells through vfio-user.
    let out = bin()
        .args(["inspect", "--json", "--vfio-user"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["source"]["kind"], "vfio-user");
    // The served BAR memory is mapped into the guest, not trapped: the fake
    // shares sealed memfds, which our client accepts to mmap.
    let bar0 = &json["bars"][0];
    assert_eq!(bar0["index"], 0);
    assert_eq!(bar0["mapped_bytes"], 0x1000, "{bar0}");
    let firing = json["self_check"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "MSI-X firing")
        .unwrap();
    assert_eq!(firing["status"], "ok", "{firing}");

    let status = stop(server);
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket outlived the server");
}

#[test]
fn edu_served_over_vfio_user_does_a_dma_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("edu.sock");
    let server = start(&socket, &["--profile", "edu"]);
    let out = bin()
        .args(["inspect", "--json", "--vfio-user"])
        .arg(&socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let dma = json["self_check"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "DMA round trip")
        .unwrap();
    assert_eq!(dma["status"], "ok", "{dma}");
    assert!(stop(server).success());
}

#[test]
fn serve_fake_serves_a_dump_and_refuses_a_socket_already_served() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nic.sock");
    let nic = Path::new(env!("CARGO_MANIFEST_DIR")).join("dumps/nic-sriov-synthetic.txt");
    let server = start(&socket, &["--config", nic.to_str().unwrap()]);

    let second = bin().arg("serve-fake").arg(&socket).output().unwrap();
    assert_eq!(second.status.code(), Some(2));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already listening"), "{err}");

    let dev = UserDevice::connect(&socket).unwrap();
    let mut ids = [0u8; 4];
    dev.region_read(region::CONFIG, 0, &mut ids).unwrap();
    assert_eq!(ids, [0x34, 0x12, 0x02, 0x0a]);
    // BAR0's size came from the dump's Region line.
    assert_eq!(dev.region_info(region::BAR0).unwrap().size, 512 << 10);
    drop(dev);
    assert!(stop(server).success());
}

#[test]
fn a_stale_socket_left_by_a_killed_server_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stale.sock");
    // A bound socket nobody listens on any more.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let server = start(&socket, &["--profile", "edu"]);
    let dev = UserDevice::connect(&socket).unwrap();
    drop(dev);
    assert!(stop(server).success());
}

/// A hand-driven vfio-user client, for what no well-behaved client does.
mod raw {
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::Duration;

    use vfio_backend::user::protocol::{
        self, command, irq_set, Capabilities, Header, RegionAccessPayload, SetIrqsPayload,
    };

    pub struct Raw {
        pub s: UnixStream,
        id: u16,
    }

    impl Raw {
        pub fn connect(path: &Path) -> Raw {
            let s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
            Raw { s, id: 0 }
        }

        pub fn send(&mut self, cmd: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) {
            self.id = self.id.wrapping_add(1);
            let h = Header::command(self.id, cmd, payload.len()).unwrap();
            protocol::write_message(self.s.as_fd(), &h, &[payload], fds).unwrap();
        }

        /// Sends and waits for the reply; returns its errno (0: success),
        /// or None when no reply came.
        pub fn request(&mut self, cmd: u16, payload: &[u8], fds: &[BorrowedFd<'_>]) -> Option<u32> {
            self.send(cmd, payload, fds);
            let m = protocol::read_message(self.s.as_fd(), 1 << 21, 4).ok()??;
            Some(if m.header.is_error() {
                m.header.error.max(1)
            } else {
                0
            })
        }

        pub fn version(&mut self) {
            let v = protocol::encode_version(0, 1, &Capabilities::default());
            assert_eq!(self.request(command::VERSION, &v, &[]), Some(0));
        }

        pub fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Option<u32> {
            let mut p = RegionAccessPayload {
                offset,
                region: index,
                count: data.len() as u32,
            }
            .encode()
            .to_vec();
            p.extend_from_slice(data);
            self.request(command::REGION_WRITE, &p, &[])
        }

        pub fn set_irq_eventfds(
            &mut self,
            index: u32,
            start: u32,
            fds: &[BorrowedFd<'_>],
        ) -> Option<u32> {
            let p = SetIrqsPayload {
                argsz: SetIrqsPayload::SIZE as u32,
                flags: irq_set::DATA_EVENTFD | irq_set::ACTION_TRIGGER,
                index,
                start,
                count: fds.len() as u32,
            }
            .encode();
            self.request(command::DEVICE_SET_IRQS, &p, fds)
        }
    }

    /// A blocking eventfd.
    pub fn eventfd() -> OwnedFd {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own, taken over once.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// (read end, write end) of a pipe whose buffer is full.
    pub fn full_pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(rc, 0);
        // SAFETY: fresh descriptors we own, each taken over once.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let chunk = [0u8; 4096];
        // SAFETY: writes from a live buffer of the length given.
        while unsafe { libc::write(w.as_raw_fd(), chunk.as_ptr().cast(), chunk.len()) } > 0 {}
        // Blocking again, as a hostile client would hand it over.
        // SAFETY: F_SETFL on a descriptor we own.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETFL, 0) };
        (r, w)
    }

    /// Raises the counter of an eventfd to its maximum.
    pub fn fill(e: &OwnedFd) {
        let max: u64 = 0xffff_ffff_ffff_fffe;
        // SAFETY: writes 8 bytes from a live u64; the counter is 0.
        let n = unsafe { libc::write(e.as_raw_fd(), std::ptr::from_ref(&max).cast(), 8) };
        assert_eq!(n, 8);
    }
}

/// Sends `sig` and waits for the exit at most `limit`; kills it past that.
fn stop_within(
    mut s: Server,
    sig: i32,
    limit: Duration,
) -> (Duration, Option<std::process::ExitStatus>) {
    let pid = i32::try_from(s.0.id()).unwrap();
    let t = Instant::now();
    // SAFETY: kill(2) on the pid of the child this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    while t.elapsed() < limit {
        if let Some(status) = s.0.try_wait().unwrap() {
            return (t.elapsed(), Some(status));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (t.elapsed(), None)
}

#[test]
fn serve_fake_exits_promptly_on_sigterm_or_sigint_whatever_its_client_does() {
    use raw::Raw;
    use std::io::Write as _;
    use std::os::fd::AsFd as _;
    use vfio_backend::user::protocol::{command, Header};

    // Each scenario leaves a client in some state, then the server gets a
    // signal. The design bound is 1 s; 5 s here absorbs a loaded machine.
    type Scenario = fn(&Path) -> Vec<Box<dyn std::any::Any>>;
    let scenarios: [(&str, Scenario); 6] = [
        ("a silent client", |p| vec![Box::new(Raw::connect(p))]),
        ("half a header", |p| {
            let mut c = Raw::connect(p);
            c.s.write_all(&[0u8; 9]).unwrap();
            vec![Box::new(c)]
        }),
        ("half a payload after VERSION", |p| {
            let mut c = Raw::connect(p);
            c.version();
            let h = Header::command(7, command::REGION_WRITE, 20).unwrap();
            c.s.write_all(&h.encode()).unwrap();
            c.s.write_all(&[0u8; 5]).unwrap();
            vec![Box::new(c)]
        }),
        (
            "a full pipe and a full eventfd as interrupt fds, then a doorbell",
            |p| {
                let mut c = Raw::connect(p);
                c.version();
                let (r, w) = raw::full_pipe();
                let e = raw::eventfd();
                // The pipe is refused; were it taken, the doorbell would block the server.
                c.set_irq_eventfds(vfio_backend::irq::MSIX, 0, &[w.as_fd()]);
                c.set_irq_eventfds(vfio_backend::irq::MSIX, 1, &[e.as_fd()]);
                raw::fill(&e);
                c.region_write(region::CONFIG, 4, &6u16.to_le_bytes());
                for v in 0..2u64 {
                    let doorbell = nvme_like::DOORBELLS + v * nvme_like::DOORBELL_STRIDE;
                    let mut p = vfio_backend::user::protocol::RegionAccessPayload {
                        offset: doorbell,
                        region: 0,
                        count: 4,
                    }
                    .encode()
                    .to_vec();
                    p.extend_from_slice(&1u32.to_le_bytes());
                    c.send(command::REGION_WRITE, &p, &[]);
                }
                vec![Box::new(c), Box::new(r), Box::new(w), Box::new(e)]
            },
        ),
        ("a client that reads no replies", |p| {
            let mut c = Raw::connect(p);
            c.version();
            c.s.set_nonblocking(true).unwrap();
            // Config reads, never reading a reply, until the socket is full both ways.
            let req = vfio_backend::user::protocol::RegionAccessPayload {
                offset: 0,
                region: region::CONFIG,
                count: 256,
            }
            .encode();
            for id in 0..20_000u16 {
                let h = Header::command(id, command::REGION_READ, req.len()).unwrap();
                let mut m = h.encode().to_vec();
                m.extend_from_slice(&req);
                if c.s.write_all(&m).is_err() {
                    break;
                }
            }
            vec![Box::new(c)]
        }),
        ("a client with DMA mapped", |p| {
            let mut c = Raw::connect(p);
            c.version();
            let f = tempfile::tempfile().unwrap();
            f.set_len(0x10_0000).unwrap();
            let map = vfio_backend::user::protocol::DmaMapPayload {
                argsz: 32,
                flags: 3,
                offset: 0,
                address: 0x10_0000,
                size: 0x10_0000,
            }
            .encode();
            let _ = c.request(command::DMA_MAP, &map, &[f.as_fd()]);
            vec![Box::new(c), Box::new(f)]
        }),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (i, (what, scenario)) in scenarios.iter().enumerate() {
        for (sig, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
            let socket = dir.path().join(format!("s{i}-{name}.sock"));
            let server = start(&socket, &["--profile", "nvme-like"]);
            // `start` probed the socket with a connection of its own: let
            // the server see it closed.
            std::thread::sleep(Duration::from_millis(50));
            let held = scenario(&socket);
            std::thread::sleep(Duration::from_millis(100));
            let (took, status) = stop_within(server, sig, Duration::from_secs(5));
            drop(held);
            eprintln!("{what}, {name}: exited after {took:?}");
            let status =
                status.unwrap_or_else(|| panic!("{what}: still running {took:?} after {name}"));
            assert!(status.success(), "{what}, {name}: {status:?}");
            assert!(
                !socket.exists(),
                "{what}, {name}: the socket outlived the server"
            );
        }
    }
}
