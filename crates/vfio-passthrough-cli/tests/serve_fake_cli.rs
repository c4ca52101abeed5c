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
