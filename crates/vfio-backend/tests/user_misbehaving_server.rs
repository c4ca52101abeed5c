//! Our vfio-user client against hand-written servers that send crafted
//! bytes: error replies, silence, sudden death and lies. The client must
//! answer each with the right error, in bounded time, without panicking.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfio_backend::user::{protocol, UserDevice, UserOptions};
use vfio_backend::{DmaSource, Error, Vfio};

// Wire constants, written out from the spec rather than taken from the crate.
const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DEVICE_GET_INFO: u16 = 4;
const DEVICE_GET_IRQ_INFO: u16 = 7;
const DEVICE_SET_IRQS: u16 = 8;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
const DMA_READ: u16 = 11;
const DMA_WRITE: u16 = 12;
const DEVICE_RESET: u16 = 13;
const REPLY: u32 = 1;
const ERROR: u32 = 1 << 5;

fn header(id: u16, cmd: u16, size: u32, flags: u32, error: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&cmd.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&error.to_le_bytes());
    v
}

fn reply(req: &Req, payload: &[u8]) -> Vec<u8> {
    let mut v = header(req.id, req.cmd, 16 + payload.len() as u32, REPLY, 0);
    v.extend_from_slice(payload);
    v
}

struct Req {
    id: u16,
    cmd: u16,
    flags: u32,
    errno: u32,
    payload: Vec<u8>,
    fds: Vec<OwnedFd>,
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Reads one message; the header fields are decoded here by hand.
fn recv(s: &UnixStream) -> Option<Req> {
    let m = protocol::read_message(s.as_fd(), 1 << 22, 16).unwrap()?;
    let raw = m.header.encode();
    Some(Req {
        id: u16::from_le_bytes([raw[0], raw[1]]),
        cmd: u16::from_le_bytes([raw[2], raw[3]]),
        flags: u32_at(&raw, 8),
        errno: u32_at(&raw, 12),
        payload: m.payload,
        fds: m.fds,
    })
}

/// A fake server: answers VERSION (with `caps_json`) and DEVICE_GET_INFO
/// (no regions, 4 irq indices), then hands the stream to `script`.
fn fake_server(
    caps_json: &'static str,
    script: impl FnOnce(UnixStream) + Send + 'static,
) -> (tempfile::TempDir, PathBuf, JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let v = recv(&s).unwrap();
        assert_eq!(v.cmd, VERSION);
        assert_eq!(v.flags & 0xf, 0, "VERSION is sent as a command");
        let mut p = vec![0u8, 0, 1, 0];
        p.extend_from_slice(caps_json.as_bytes());
        p.push(0);
        s.write_all(&reply(&v, &p)).unwrap();
        let d = recv(&s).unwrap();
        assert_eq!(d.cmd, DEVICE_GET_INFO);
        let mut p = Vec::new();
        for x in [16u32, 0b11, 0, 4] {
            p.extend_from_slice(&x.to_le_bytes());
        }
        s.write_all(&reply(&d, &p)).unwrap();
        script(s);
    });
    (dir, path, t)
}

const CAPS: &str = r#"{"capabilities":{"max_msg_fds":2,"max_data_xfer_size":64}}"#;

fn options(timeout_ms: u64) -> UserOptions {
    UserOptions::default()
        .with_timeout(Duration::from_millis(timeout_ms))
        .with_reset_timeout(Duration::from_millis(timeout_ms))
        .with_max_msg_fds(2)
}

fn connect(path: &PathBuf, timeout_ms: u64) -> UserDevice {
    UserDevice::connect_with_options(path, options(timeout_ms)).unwrap()
}

#[test]
fn error_reply_is_refused_with_the_servers_errno_promptly() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, DEVICE_RESET);
        s.write_all(&header(r.id, r.cmd, 16, REPLY | ERROR, libc::EBUSY as u32))
            .unwrap();
        // Keep the connection open until the client is done.
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let t0 = Instant::now();
    let e = dev.reset().unwrap_err();
    assert!(
        matches!(e, Error::Refused { errno, .. } if errno == libc::EBUSY),
        "{e:?}"
    );
    assert!(t0.elapsed() < Duration::from_secs(2));
    drop(dev);
    t.join().unwrap();
}

#[test]
fn error_reply_with_errno_zero_is_refused_as_eio() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        s.write_all(&header(r.id, r.cmd, 16, REPLY | ERROR, 0))
            .unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let e = dev.irq_info(2).unwrap_err();
    assert!(
        matches!(e, Error::Refused { errno, .. } if errno == libc::EIO),
        "{e:?}"
    );
    drop(dev);
    t.join().unwrap();
}

#[test]
fn silent_server_times_out_in_about_the_timeout_and_late_reply_is_dropped() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r1 = recv(&s).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        // A late reply to the request that timed out.
        let mut p = Vec::new();
        for x in [16u32, 1, 2, 8] {
            p.extend_from_slice(&x.to_le_bytes());
        }
        s.write_all(&reply(&r1, &p)).unwrap();
        let r2 = recv(&s).unwrap();
        s.write_all(&reply(&r2, &p)).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 300);
    let t0 = Instant::now();
    let e = dev.irq_info(2).unwrap_err();
    let waited = t0.elapsed();
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_millis(1500), "{waited:?}");
    std::thread::sleep(Duration::from_millis(400));
    // The connection is still usable after the late reply was dropped.
    let info = dev.irq_info(2).unwrap();
    assert_eq!(info.count, 8);
    drop(dev);
    t.join().unwrap();
}

#[test]
fn server_closing_mid_request_fails_every_waiter_with_disconnected_quickly() {
    let (_d, path, t) = fake_server(CAPS, |s| {
        // Take three requests, then die without answering.
        for _ in 0..3 {
            recv(&s).unwrap();
        }
        drop(s);
    });
    let dev = std::sync::Arc::new(connect(&path, 5000));
    let t0 = Instant::now();
    let waiters: Vec<_> = (0..3)
        .map(|i| {
            let dev = dev.clone();
            std::thread::spawn(move || dev.irq_info(i).unwrap_err())
        })
        .collect();
    for w in waiters {
        let e = w.join().unwrap();
        assert!(matches!(e, Error::Disconnected(_)), "{e:?}");
    }
    assert!(t0.elapsed() < Duration::from_secs(2));
    // Later calls fail at once too.
    let t1 = Instant::now();
    assert!(matches!(dev.reset(), Err(Error::Disconnected(_))));
    assert!(t1.elapsed() < Duration::from_millis(500));
    t.join().unwrap();
}

#[test]
fn region_read_reply_with_wrong_count_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, REGION_READ);
        let count = u32_at(&r.payload, 12);
        assert_eq!(count, 4);
        // Claim 8 bytes and send 8 bytes for a 4-byte read.
        let mut p = r.payload[..12].to_vec();
        p.extend_from_slice(&8u32.to_le_bytes());
        p.extend_from_slice(&[0xaa; 8]);
        s.write_all(&reply(&r, &p)).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let mut buf = [0u8; 4];
    let e = dev.region_read(0, 0, &mut buf).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    // The connection is poisoned: later requests fail with Protocol too.
    assert!(matches!(dev.reset(), Err(Error::Protocol(_))));
    drop(dev);
    t.join().unwrap();
}

#[test]
fn reply_to_an_id_never_sent_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        s.write_all(&header(r.id.wrapping_add(1000), r.cmd, 16, REPLY, 0))
            .unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let t0 = Instant::now();
    let e = dev.reset().unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    drop(dev);
    t.join().unwrap();
}

#[test]
fn reply_with_a_size_below_the_header_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        s.write_all(&header(r.id, r.cmd, 8, REPLY, 0)).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    assert!(matches!(dev.reset(), Err(Error::Protocol(_))));
    drop(dev);
    t.join().unwrap();
}

#[test]
fn reply_with_a_huge_size_is_a_protocol_error_not_an_allocation() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        s.write_all(&header(r.id, r.cmd, u32::MAX, REPLY, 0))
            .unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    assert!(matches!(dev.reset(), Err(Error::Protocol(_))));
    drop(dev);
    t.join().unwrap();
}

#[test]
fn reply_with_more_fds_than_we_accept_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |s| {
        let r = recv(&s).unwrap();
        let files: Vec<_> = (0..4).map(|_| tempfile::tempfile().unwrap()).collect();
        let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
        let h = protocol::Header::decode(&header(r.id, r.cmd, 16, REPLY, 0)).unwrap();
        protocol::write_message(s.as_fd(), &h, &[], &fds).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    assert!(matches!(dev.reset(), Err(Error::Protocol(_))));
    drop(dev);
    t.join().unwrap();
}

#[test]
fn reply_with_an_fd_to_a_command_that_returns_none_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |s| {
        let r = recv(&s).unwrap();
        let f = tempfile::tempfile().unwrap();
        let h = protocol::Header::decode(&header(r.id, r.cmd, 16, REPLY, 0)).unwrap();
        protocol::write_message(s.as_fd(), &h, &[], &[f.as_fd()]).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    assert!(matches!(dev.reset(), Err(Error::Protocol(_))));
    drop(dev);
    t.join().unwrap();
}

#[test]
fn version_reply_with_another_major_fails_the_connect() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let v = recv(&s).unwrap();
        s.write_all(&reply(&v, &[7, 0, 0, 0, b'{', b'}', 0]))
            .unwrap();
        let _ = recv(&s);
    });
    let e = UserDevice::connect_with_options(&path, options(2000)).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    t.join().unwrap();
}

#[test]
fn version_request_carries_major_zero_and_nul_terminated_capabilities() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let v = recv(&s).unwrap();
        assert_eq!(&v.payload[0..2], &0u16.to_le_bytes());
        assert_eq!(*v.payload.last().unwrap(), 0);
        let json: serde_json::Value =
            serde_json::from_slice(&v.payload[4..v.payload.len() - 1]).unwrap();
        assert_eq!(json["capabilities"]["max_msg_fds"], 2);
        assert!(json["capabilities"]["max_data_xfer_size"].as_u64().unwrap() > 0);
    });
    // The fake closes without answering: connect fails, and quickly.
    let t0 = Instant::now();
    let e = UserDevice::connect_with_options(&path, options(5000)).unwrap_err();
    assert!(matches!(e, Error::Disconnected(_)), "{e:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    t.join().unwrap();
}

#[test]
fn region_write_is_split_at_the_servers_max_data_xfer_size() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let mut seen = Vec::new();
        for _ in 0..3 {
            let r = recv(&s).unwrap();
            assert_eq!(r.cmd, REGION_WRITE);
            let (offset, region, count) = (
                u64_at(&r.payload, 0),
                u32_at(&r.payload, 8),
                u32_at(&r.payload, 12),
            );
            assert_eq!(r.payload.len(), 16 + count as usize);
            seen.push((offset, region, count, r.payload[16..].to_vec()));
            s.write_all(&reply(&r, &r.payload[..16])).unwrap();
        }
        assert_eq!(
            seen.iter().map(|x| (x.0, x.1, x.2)).collect::<Vec<_>>(),
            vec![(0x100, 3, 64), (0x140, 3, 64), (0x180, 3, 22)]
        );
        let all: Vec<u8> = seen.into_iter().flat_map(|x| x.3).collect();
        assert_eq!(all, (0..150u8).collect::<Vec<_>>());
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let data: Vec<u8> = (0..150u8).collect();
    dev.region_write(3, 0x100, &data).unwrap();
    drop(dev);
    t.join().unwrap();
}

#[test]
fn eventfds_are_sent_in_batches_of_the_servers_max_msg_fds() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let mut got = Vec::new();
        for _ in 0..3 {
            let r = recv(&s).unwrap();
            assert_eq!(r.cmd, DEVICE_SET_IRQS);
            let (flags, index, start, count) = (
                u32_at(&r.payload, 4),
                u32_at(&r.payload, 8),
                u32_at(&r.payload, 12),
                u32_at(&r.payload, 16),
            );
            // DATA_EVENTFD | ACTION_TRIGGER.
            assert_eq!(flags, (1 << 2) | (1 << 5));
            assert_eq!(index, 2);
            assert_eq!(r.fds.len(), count as usize);
            got.push((start, count));
            // Signal the last vector of the last batch.
            if start == 4 {
                let one = 1u64.to_le_bytes();
                // SAFETY: writes 8 bytes from a live 8-byte buffer to an eventfd we hold.
                let n = unsafe { libc::write(r.fds[0].as_raw_fd(), one.as_ptr().cast(), 8) };
                assert_eq!(n, 8);
            }
            s.write_all(&reply(&r, &[])).unwrap();
        }
        assert_eq!(got, vec![(0, 2), (2, 2), (4, 1)]);
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let efds: Vec<_> = (0..5).map(|_| eventfd()).collect();
    let fds: Vec<_> = efds.iter().map(|e| Some(e.as_fd())).collect();
    dev.set_irq_eventfds(2, 0, &fds).unwrap();
    assert_eq!(read_eventfd(&efds[4]), Some(1));
    assert_eq!(read_eventfd(&efds[0]), None, "vector 0 was not signalled");
    drop(dev);
    t.join().unwrap();
}

#[test]
fn server_dma_read_and_write_are_served_from_registered_host_memory_with_bounds() {
    let mut memory = vec![0u8; 4096];
    let host_addr = memory.as_mut_ptr() as u64;
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, DMA_MAP);
        assert!(r.fds.is_empty(), "no file: DMA_MAP goes without an fd");
        assert_eq!(u64_at(&r.payload, 16), 0x10000);
        assert_eq!(u64_at(&r.payload, 24), 4096);
        s.write_all(&reply(&r, &[])).unwrap();
        // DMA_WRITE 4 bytes at iova 0x10008.
        let mut p = Vec::new();
        p.extend_from_slice(&0x10008u64.to_le_bytes());
        p.extend_from_slice(&4u64.to_le_bytes());
        p.extend_from_slice(&[1, 2, 3, 4]);
        let mut m = header(500, DMA_WRITE, 16 + p.len() as u32, 0, 0);
        m.extend_from_slice(&p);
        s.write_all(&m).unwrap();
        let w = recv(&s).unwrap();
        assert_eq!((w.id, w.cmd, w.flags & 0xf), (500, DMA_WRITE, 1));
        assert_eq!(w.flags & ERROR, 0);
        // DMA_READ them back.
        let mut p = Vec::new();
        p.extend_from_slice(&0x10008u64.to_le_bytes());
        p.extend_from_slice(&4u64.to_le_bytes());
        let mut m = header(501, DMA_READ, 32, 0, 0);
        m.extend_from_slice(&p);
        s.write_all(&m).unwrap();
        let rd = recv(&s).unwrap();
        assert_eq!((rd.id, rd.flags & ERROR), (501, 0));
        assert_eq!(&rd.payload[16..], &[1, 2, 3, 4]);
        // A read that runs past the end of the mapping is refused.
        let mut p = Vec::new();
        p.extend_from_slice(&0x10ffeu64.to_le_bytes());
        p.extend_from_slice(&4u64.to_le_bytes());
        let mut m = header(502, DMA_READ, 32, 0, 0);
        m.extend_from_slice(&p);
        s.write_all(&m).unwrap();
        let bad = recv(&s).unwrap();
        assert_eq!(bad.id, 502);
        assert_ne!(
            bad.flags & ERROR,
            0,
            "out-of-range DMA_READ must be refused"
        );
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    // SAFETY: `memory` (at host_addr) is declared before `dev`, so it
    // outlives the connection that reaches it, and the test reads it only
    // through raw pointer reads (memory_at).
    unsafe {
        dev.iommu_domain().map(
            0x10000,
            4096,
            DmaSource {
                host_addr,
                file: None,
                read_only: false,
            },
        )
    }
    .unwrap();
    // Wait for the server script to run its DMA messages, then close.
    let t0 = Instant::now();
    while memory_at(host_addr, 8) != [1, 2, 3, 4] && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(dev);
    t.join().unwrap();
    assert_eq!(&memory[8..12], &[1, 2, 3, 4]);
    assert!(memory[..8].iter().all(|&b| b == 0));
}

fn eventfd() -> OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fd is a fresh descriptor we own (checked above), taken over once.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// The eventfd's counter, or None when it was not signalled.
fn read_eventfd(fd: &OwnedFd) -> Option<u64> {
    let mut b = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live 8-byte buffer.
    let n = unsafe { libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 8) };
    (n == 8).then(|| u64::from_le_bytes(b))
}

fn memory_at(addr: u64, off: usize) -> [u8; 4] {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        // SAFETY: the caller's buffer is 4096 bytes and alive; volatile
        // because the client's reader thread writes it.
        *x = unsafe { std::ptr::read_volatile((addr as *const u8).add(off + i)) };
    }
    b
}

#[test]
fn garbage_from_the_server_never_panics_the_client() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    for round in 0..24 {
        let mut junk = Vec::new();
        for _ in 0..64 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            junk.push(seed as u8);
        }
        // Keep the header plausible half of the time.
        if round % 2 == 0 {
            junk[4..8].copy_from_slice(&(16u32 + (seed % 48) as u32).to_le_bytes());
            junk[8..12].copy_from_slice(&REPLY.to_le_bytes());
        }
        let (_d, path, t) = fake_server(CAPS, move |mut s| {
            if let Some(r) = recv(&s) {
                junk[0..2].copy_from_slice(&r.id.to_le_bytes());
                junk[2..4].copy_from_slice(&r.cmd.to_le_bytes());
                let _ = s.write_all(&junk);
            }
            std::thread::sleep(Duration::from_millis(50));
        });
        let dev = connect(&path, 300);
        let _ = dev.irq_info(1);
        drop(dev);
        t.join().unwrap();
    }
}

#[test]
fn irq_info_reply_for_another_index_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, DEVICE_GET_IRQ_INFO);
        let mut p = Vec::new();
        for x in [16u32, 1, 3, 1] {
            p.extend_from_slice(&x.to_le_bytes());
        }
        s.write_all(&reply(&r, &p)).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    assert!(matches!(dev.irq_info(2), Err(Error::Protocol(_))));
    drop(dev);
    t.join().unwrap();
}

#[test]
fn drop_ends_the_client_even_with_a_silent_server() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let mut b = [0u8; 64];
        // Read until the client hangs up.
        while s.read(&mut b).map(|n| n > 0).unwrap_or(false) {}
    });
    let dev = connect(&path, 5000);
    let t0 = Instant::now();
    drop(dev);
    assert!(t0.elapsed() < Duration::from_secs(1));
    t.join().unwrap();
}

// ---------------------------------------------------------------------------
// Sizes a server names: every one is checked against what was negotiated
// (our max_data_xfer_size, the registered mappings, what was asked for)
// before anything is allocated, read or copied.

const DMA_UNMAP: u16 = 3;
const DEVICE_GET_REGION_INFO: u16 = 5;
const NO_REPLY: u32 = 1 << 4;

/// A server command (`DMA_READ` / `DMA_WRITE`) with `address`, `count`
/// and `data` after them.
fn server_command(id: u16, cmd: u16, address: u64, count: u64, data: &[u8]) -> Vec<u8> {
    let mut m = header(id, cmd, 32 + data.len() as u32, 0, 0);
    m.extend_from_slice(&address.to_le_bytes());
    m.extend_from_slice(&count.to_le_bytes());
    m.extend_from_slice(data);
    m
}

/// Reads the client's reply to server command `id`, with a bound (a client
/// that died or hung fails the script instead of wedging it).
fn client_reply(s: &UnixStream, id: u16, cmd: u16) -> Req {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let r = recv(s).expect("the client closed instead of answering");
    s.set_read_timeout(None).unwrap();
    assert_eq!((r.id, r.cmd), (id, cmd), "reply to another message");
    assert_eq!(r.flags & 0xf, REPLY, "the client answers with a reply");
    r
}

/// The errno of an error reply; panics on a success reply.
fn refused_with(r: &Req) -> u32 {
    assert_ne!(r.flags & ERROR, 0, "expected an error reply, got success");
    let raw = r.payload.len();
    assert_eq!(raw, 0, "an error reply carries no payload");
    r.errno
}

/// # Safety
/// `memory` outlives `dev` (callers declare it first) and is not read
/// through a reference while the server may write it.
unsafe fn map_host_memory(dev: &UserDevice, iova: u64, memory: &mut [u8]) {
    // SAFETY: the function's contract.
    unsafe {
        dev.iommu_domain().map(
            iova,
            memory.len() as u64,
            DmaSource {
                host_addr: memory.as_mut_ptr() as u64,
                file: None,
                read_only: false,
            },
        )
    }
    .unwrap();
}

/// Answers the client's DMA_MAP.
fn accept_dma_map(s: &mut UnixStream) {
    let r = recv(s).unwrap();
    assert_eq!(r.cmd, DMA_MAP);
    s.write_all(&reply(&r, &[])).unwrap();
}

#[test]
fn dma_read_of_a_terabyte_or_of_u64_max_bytes_is_refused_with_einval_without_allocating() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        accept_dma_map(&mut s);
        // Inside the mapping, but far more than our max_data_xfer_size
        // (1 MiB): 2^40 once aborted the VMM ("memory allocation failed"),
        // 2^64-1 panicked ("capacity overflow").
        for (id, count) in [(700u16, 1u64 << 40), (701, u64::MAX), (702, (1 << 20) + 1)] {
            s.write_all(&server_command(id, DMA_READ, 0x10000, count, &[]))
                .unwrap();
            let r = client_reply(&s, id, DMA_READ);
            assert_eq!(refused_with(&r), libc::EINVAL as u32, "count {count:#x}");
        }
        // The connection still serves a read within the limits.
        s.write_all(&server_command(703, DMA_READ, 0x10004, 4, &[]))
            .unwrap();
        let r = client_reply(&s, 703, DMA_READ);
        assert_eq!(r.flags & ERROR, 0);
        assert_eq!(&r.payload[16..], &[4, 5, 6, 7]);
    });
    let mut memory: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
    let dev = connect(&path, 5000);
    // SAFETY: `memory` is declared before `dev`.
    unsafe { map_host_memory(&dev, 0x10000, &mut memory) };
    t.join().unwrap();
    drop(dev);
}

#[test]
fn dma_read_before_the_version_reply_is_refused_with_einval_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("early.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        // Before the client's VERSION is even read: a huge read, a read
        // that would be valid later, and a write.
        s.write_all(&server_command(800, DMA_READ, 0, 1 << 40, &[]))
            .unwrap();
        s.write_all(&server_command(801, DMA_READ, 0, u64::MAX, &[]))
            .unwrap();
        s.write_all(&server_command(802, DMA_WRITE, 0, 4, &[1, 2, 3, 4]))
            .unwrap();
        let v = recv(&s).unwrap();
        assert_eq!(v.cmd, VERSION);
        for (id, cmd) in [(800, DMA_READ), (801, DMA_READ), (802, DMA_WRITE)] {
            let r = client_reply(&s, id, cmd);
            assert_eq!(refused_with(&r), libc::EINVAL as u32, "message {id}");
        }
        // During the handshake (VERSION asked, not answered yet): the same.
        s.write_all(&server_command(803, DMA_READ, 0, 1 << 40, &[]))
            .unwrap();
        let r = client_reply(&s, 803, DMA_READ);
        assert_eq!(refused_with(&r), libc::EINVAL as u32);
        let mut p = vec![0u8, 0, 1, 0];
        p.extend_from_slice(CAPS.as_bytes());
        p.push(0);
        s.write_all(&reply(&v, &p)).unwrap();
        let d = recv(&s).unwrap();
        assert_eq!(d.cmd, DEVICE_GET_INFO);
        let mut p = Vec::new();
        for x in [16u32, 0b11, 0, 4] {
            p.extend_from_slice(&x.to_le_bytes());
        }
        s.write_all(&reply(&d, &p)).unwrap();
        let _ = recv(&s);
    });
    // The handshake still completes.
    let dev = connect(&path, 5000);
    assert_eq!(dev.protocol_version(), (0, 1));
    drop(dev);
    t.join().unwrap();
}

#[test]
fn dma_messages_when_serving_them_is_off_are_refused_with_enotsup_without_allocating() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        accept_dma_map(&mut s);
        for (id, cmd, count) in [
            (900u16, DMA_READ, 1u64 << 40),
            (901, DMA_READ, u64::MAX),
            (902, DMA_READ, 4),
        ] {
            s.write_all(&server_command(id, cmd, 0x10000, count, &[]))
                .unwrap();
            let r = client_reply(&s, id, cmd);
            assert_eq!(refused_with(&r), libc::ENOTSUP as u32, "count {count:#x}");
        }
        s.write_all(&server_command(903, DMA_WRITE, 0x10000, 4, &[9; 4]))
            .unwrap();
        let r = client_reply(&s, 903, DMA_WRITE);
        assert_eq!(refused_with(&r), libc::ENOTSUP as u32);
    });
    let mut memory = vec![0u8; 4096];
    let dev = UserDevice::connect_with_options(&path, options(5000).with_serve_dma_messages(false))
        .unwrap();
    // SAFETY: `memory` is declared before `dev`.
    unsafe { map_host_memory(&dev, 0x10000, &mut memory) };
    t.join().unwrap();
    drop(dev);
    assert!(memory.iter().all(|&b| b == 0), "the refused write wrote");
}

#[test]
fn dma_write_without_a_reply_wanted_is_served_and_not_answered() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        accept_dma_map(&mut s);
        let mut m = server_command(950, DMA_WRITE, 0x10010, 2, &[0xab, 0xcd]);
        m[8..12].copy_from_slice(&NO_REPLY.to_le_bytes());
        s.write_all(&m).unwrap();
        // The next message from the client is its reply to this read: the
        // write above got none.
        s.write_all(&server_command(951, DMA_READ, 0x10010, 2, &[]))
            .unwrap();
        let r = client_reply(&s, 951, DMA_READ);
        assert_eq!(&r.payload[16..], &[0xab, 0xcd]);
    });
    let mut memory = vec![0u8; 4096];
    let dev = connect(&path, 5000);
    // SAFETY: `memory` is declared before `dev`.
    unsafe { map_host_memory(&dev, 0x10000, &mut memory) };
    t.join().unwrap();
    drop(dev);
    assert_eq!(&memory[0x10..0x12], &[0xab, 0xcd]);
}

#[test]
fn region_info_reply_larger_than_the_argsz_asked_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, DEVICE_GET_REGION_INFO);
        let asked = u32_at(&r.payload, 0) as usize;
        // A reply that claims (in its own argsz) all it sends, more than
        // the client made room for.
        let len = asked + 4096;
        let mut p = Vec::new();
        for x in [len as u32, 0b1, 0, 0] {
            p.extend_from_slice(&x.to_le_bytes());
        }
        p.extend_from_slice(&0x1000u64.to_le_bytes());
        p.extend_from_slice(&0u64.to_le_bytes());
        p.resize(len, 0);
        s.write_all(&reply(&r, &p)).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let e = dev.region_info(0).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    drop(dev);
    t.join().unwrap();
}

#[test]
fn irq_info_reply_with_more_vectors_than_any_pci_index_has_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, DEVICE_GET_IRQ_INFO);
        let mut p = Vec::new();
        // MSI-X (index 2) has at most 2048 vectors (PCI: table size is 11 bits).
        for x in [16u32, 0, 2, u32::MAX] {
            p.extend_from_slice(&x.to_le_bytes());
        }
        s.write_all(&reply(&r, &p)).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let e = dev.irq_info(2).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    drop(dev);
    t.join().unwrap();
}

#[test]
fn dma_unmap_reply_echoing_another_range_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        accept_dma_map(&mut s);
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, DMA_UNMAP);
        let mut p = r.payload.clone();
        p[8..16].copy_from_slice(&0xdead_0000u64.to_le_bytes());
        s.write_all(&reply(&r, &p)).unwrap();
        let _ = recv(&s);
    });
    let mut memory = vec![0u8; 4096];
    let dev = connect(&path, 5000);
    // SAFETY: `memory` is declared before `dev`.
    unsafe { map_host_memory(&dev, 0x10000, &mut memory) };
    let e = dev.iommu_domain().unmap(0x10000, 4096).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    drop(dev);
    t.join().unwrap();
}

#[test]
fn eventfds_beyond_what_one_message_can_carry_are_split_at_scm_max_fd() {
    // The server accepts "1000" descriptors per message; the kernel passes
    // at most 253 (SCM_MAX_FD) in one, so 300 vectors take two messages.
    const MANY: &str = r#"{"capabilities":{"max_msg_fds":1000}}"#;
    let (_d, path, t) = fake_server(MANY, |mut s| {
        let mut got = Vec::new();
        for _ in 0..2 {
            let m = protocol::read_message(s.as_fd(), 1 << 16, 300)
                .unwrap()
                .unwrap();
            assert_eq!(m.header.command, DEVICE_SET_IRQS);
            let (start, count) = (u32_at(&m.payload, 12), u32_at(&m.payload, 16));
            assert_eq!(m.fds.len(), count as usize);
            got.push((start, count));
            let r = Req {
                id: m.header.id,
                cmd: m.header.command,
                flags: 0,
                errno: 0,
                payload: Vec::new(),
                fds: Vec::new(),
            };
            s.write_all(&reply(&r, &[])).unwrap();
        }
        assert_eq!(got, vec![(0, 253), (253, 47)]);
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let efds: Vec<_> = (0..300).map(|_| eventfd()).collect();
    let fds: Vec<_> = efds.iter().map(|e| Some(e.as_fd())).collect();
    dev.set_irq_eventfds(2, 0, &fds).unwrap();
    drop(dev);
    t.join().unwrap();
}

#[test]
fn an_oversized_max_data_xfer_size_option_is_offered_as_sixteen_mib_and_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let v = recv(&s).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&v.payload[4..v.payload.len() - 1]).unwrap();
        assert_eq!(
            json["capabilities"]["max_data_xfer_size"],
            16 << 20,
            "we offer no more than we are willing to buffer"
        );
        // A reply announcing 1 GiB: refused from its header, not buffered.
        s.write_all(&header(v.id, v.cmd, 1 << 30, REPLY, 0))
            .unwrap();
        let _ = recv(&s);
    });
    let e =
        UserDevice::connect_with_options(&path, options(5000).with_max_data_xfer_size(u32::MAX))
            .unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    t.join().unwrap();
}

// Region files: a server shares a file for a region it offers for mmap; it
// could truncate that file under our mapping afterwards, and whoever then
// touches the mapping (the VMM, or the guest through KVM) dies of SIGBUS.

const REGION_FLAG_READ: u32 = 1;
const REGION_FLAG_WRITE: u32 = 2;
const REGION_FLAG_MMAP: u32 = 4;

/// A memfd of `size` bytes, sealed with `seals` (0: unsealed).
fn region_memfd(size: u64, seals: i32) -> std::fs::File {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"region".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor we own (checked above), taken over once.
    let f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.set_len(size).unwrap();
    if seals != 0 {
        // SAFETY: F_ADD_SEALS on a descriptor we own; it changes no memory.
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }
    f
}

/// A server with one readable, writable, mmap-able region of `size` bytes
/// per entry of `files`, each shared through its file (at file offset 0).
/// After the handshake and the region infos, `script` gets the stream and
/// the files.
fn region_server(
    size: u64,
    files: Vec<std::fs::File>,
    script: impl FnOnce(UnixStream, Vec<std::fs::File>) + Send + 'static,
) -> (tempfile::TempDir, PathBuf, JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("regions.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let v = recv(&s).unwrap();
        assert_eq!(v.cmd, VERSION);
        let mut p = vec![0u8, 0, 1, 0];
        p.extend_from_slice(CAPS.as_bytes());
        p.push(0);
        s.write_all(&reply(&v, &p)).unwrap();
        let d = recv(&s).unwrap();
        assert_eq!(d.cmd, DEVICE_GET_INFO);
        let mut p = Vec::new();
        for x in [16u32, 0b11, files.len() as u32, 4] {
            p.extend_from_slice(&x.to_le_bytes());
        }
        s.write_all(&reply(&d, &p)).unwrap();
        for f in &files {
            let r = recv(&s).unwrap();
            assert_eq!(r.cmd, DEVICE_GET_REGION_INFO);
            let index = u32_at(&r.payload, 8);
            let mut p = Vec::new();
            let flags = REGION_FLAG_READ | REGION_FLAG_WRITE | REGION_FLAG_MMAP;
            for x in [32u32, flags, index, 0] {
                p.extend_from_slice(&x.to_le_bytes());
            }
            p.extend_from_slice(&size.to_le_bytes());
            p.extend_from_slice(&0u64.to_le_bytes());
            let h = protocol::Header::decode(&header(r.id, r.cmd, 16 + 32, REPLY, 0)).unwrap();
            protocol::write_message(s.as_fd(), &h, &[&p], &[f.as_fd()]).unwrap();
        }
        script(s, files);
    });
    (dir, path, t)
}

const WHOLE_PAGE: vfio_backend::SparseArea = vfio_backend::SparseArea {
    offset: 0,
    size: 0x1000,
};

#[test]
fn a_region_file_not_sealed_against_shrinking_is_not_mmapped_and_is_reached_by_messages() {
    let unsealed = region_memfd(0x1000, 0);
    let sealed = region_memfd(0x1000, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
    let (_d, path, t) = region_server(0x1000, vec![unsealed, sealed], |mut s, files| {
        // The hostile part: shrink the unsealed file to nothing. Had the
        // client mapped it, its next access would raise SIGBUS.
        files[0].set_len(0).unwrap();
        // The sealed one cannot shrink (memfd_create(2): EPERM).
        let e = files[1].set_len(0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        // Region 0 is served by messages.
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, REGION_WRITE);
        assert_eq!((u64_at(&r.payload, 0), u32_at(&r.payload, 8)), (0x10, 0));
        assert_eq!(&r.payload[16..], &0xfeed_f00du32.to_le_bytes());
        s.write_all(&reply(&r, &r.payload[..16])).unwrap();
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, REGION_READ);
        assert_eq!(
            (
                u64_at(&r.payload, 0),
                u32_at(&r.payload, 8),
                u32_at(&r.payload, 12)
            ),
            (0x10, 0, 4)
        );
        let mut p = r.payload[..16].to_vec();
        p.extend_from_slice(&0xfeed_f00du32.to_le_bytes());
        s.write_all(&reply(&r, &p)).unwrap();
        // Region 1 is written through the client's mapping.
        use std::os::unix::fs::FileExt;
        files[1].write_all_at(&[0xab, 0xcd], 0x20).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    // Region 0: reported not mmap-able, no fd offered on, mmap refused.
    let info = dev.region_info(0).unwrap();
    assert!(!info.mmappable(), "{info:?}");
    assert!(info.mmap_areas().is_empty());
    assert!(dev.region_mmap_fd(0).is_none());
    let e = dev.mmap_region(0, WHOLE_PAGE).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    // Region 1 (sealed) is mapped as the server offered.
    assert!(dev.region_info(1).unwrap().mmappable());
    assert!(dev.region_mmap_fd(1).is_some());
    let m = dev.mmap_region(1, WHOLE_PAGE).unwrap();
    // Region 0 still works, through REGION_WRITE / REGION_READ.
    dev.region_write(0, 0x10, &0xfeed_f00du32.to_le_bytes())
        .unwrap();
    let mut b = [0u8; 4];
    dev.region_read(0, 0x10, &mut b).unwrap();
    assert_eq!(u32::from_le_bytes(b), 0xfeed_f00d);
    drop(dev);
    t.join().unwrap();
    // SAFETY: the mapping is 0x1000 bytes long and alive; its file is
    // sealed against shrinking, so the page is still backed.
    let seen = unsafe { [*m.as_ptr().add(0x20), *m.as_ptr().add(0x21)] };
    assert_eq!(seen, [0xab, 0xcd]);
}

#[test]
fn a_sealed_region_file_too_small_for_its_mmap_area_is_reported_not_mmappable() {
    // A 0x2000-byte region shared through a 0x1000-byte file: mapping its
    // second page would raise SIGBUS on first touch.
    let short = region_memfd(0x1000, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
    let (_d, path, t) = region_server(0x2000, vec![short], |s, _files| {
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let info = dev.region_info(0).unwrap();
    assert!(!info.mmappable(), "{info:?}");
    assert!(dev.region_mmap_fd(0).is_none());
    match dev.mmap_region(0, WHOLE_PAGE) {
        Err(e @ Error::Unsupported(_)) => assert_eq!(e.errno(), Some(libc::ENOTSUP)),
        other => panic!("expected Unsupported, got {:?}", other.err()),
    }
    drop(dev);
    t.join().unwrap();
}

/// Warnings logged, with the thread that logged them (tests run in
/// parallel: each looks at its own thread's records only).
struct Capture(std::sync::Mutex<Vec<(std::thread::ThreadId, String)>>);

static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let me = std::thread::current().id();
            self.0.lock().unwrap().push((me, r.args().to_string()));
        }
    }
    fn flush(&self) {}
}

fn capture_warnings() {
    if log::set_logger(&CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// The warnings this thread logged that contain `what`.
fn my_warnings(what: &str) -> Vec<String> {
    let me = std::thread::current().id();
    CAPTURE
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, m)| *t == me && m.contains(what))
        .map(|(_, m)| m.clone())
        .collect()
}

#[test]
fn a_region_not_mmapped_for_want_of_a_seal_is_logged_once_naming_the_reason() {
    capture_warnings();
    let unsealed = region_memfd(0x1000, 0);
    let sealed = region_memfd(0x1000, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW);
    let (_d, path, t) = region_server(0x1000, vec![unsealed, sealed], |s, _files| {
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let _ = dev.region_info(0).unwrap();
    let _ = dev.mmap_region(0, WHOLE_PAGE).unwrap_err();
    let _ = dev.mmap_region(0, WHOLE_PAGE).unwrap_err();
    let logged = my_warnings("region 0");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(logged[0].contains("F_SEAL_SHRINK"), "{logged:?}");
    assert!(my_warnings("region 1").is_empty());
    drop(dev);
    t.join().unwrap();
}

#[test]
fn dma_map_of_a_file_not_sealed_against_shrinking_warns_once_per_connection() {
    capture_warnings();
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        for _ in 0..3 {
            accept_dma_map(&mut s);
        }
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let sealed = region_memfd(0x2000, libc::F_SEAL_SHRINK);
    let unsealed = region_memfd(0x2000, 0);
    let domain = dev.iommu_domain();
    let map = |iova: u64, f: &std::fs::File| {
        // SAFETY: host_addr 0 gives the client no memory to reach: the
        // server has only the file, which outlives the connection.
        unsafe {
            domain.map(
                iova,
                0x1000,
                DmaSource {
                    host_addr: 0,
                    file: Some(vfio_backend::DmaFile {
                        fd: f.as_fd(),
                        offset: 0,
                    }),
                    read_only: false,
                },
            )
        }
        .unwrap()
    };
    map(0x10000, &sealed);
    assert!(my_warnings("dma_map").is_empty());
    map(0x20000, &unsealed);
    map(0x30000, &unsealed);
    let logged = my_warnings("dma_map");
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert!(logged[0].contains("F_SEAL_SHRINK"), "{logged:?}");
    drop(dev);
    t.join().unwrap();
}

// Migration: `VFIO_USER_DEVICE_FEATURE` (16) and `MIG_DATA_READ` (17),
// with the kernel's feature flags and indices.
const DEVICE_FEATURE: u16 = 16;
const MIG_DATA_READ: u16 = 17;
const FEATURE_GET: u32 = 1 << 16;
const FEATURE_SET: u32 = 1 << 17;
const MIG_DEVICE_STATE: u32 = 2;
const DMA_LOGGING_REPORT: u32 = 8;

/// A `DEVICE_FEATURE` reply: the request's flags, `data` after them.
fn feature_reply(r: &Req, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&(8 + data.len() as u32).to_le_bytes());
    p.extend_from_slice(&r.payload[4..8]);
    p.extend_from_slice(data);
    reply(r, &p)
}

#[test]
fn a_migration_state_outside_the_uapi_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, DEVICE_FEATURE);
        assert_eq!(u32_at(&r.payload, 4), FEATURE_GET | MIG_DEVICE_STATE);
        // State 8 does not exist (PRE_COPY_P2P is the last, 7).
        let mut data = 8u32.to_le_bytes().to_vec();
        data.extend_from_slice(&u32::MAX.to_le_bytes());
        s.write_all(&feature_reply(&r, &data)).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let e = dev.mig_state().unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    drop(dev);
    t.join().unwrap();
}

#[test]
fn a_set_state_reply_that_differs_from_the_request_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        // The client first learns the state it leaves.
        let r = recv(&s).unwrap();
        let mut data = 2u32.to_le_bytes().to_vec();
        data.extend_from_slice(&u32::MAX.to_le_bytes());
        s.write_all(&feature_reply(&r, &data)).unwrap();
        let r = recv(&s).unwrap();
        assert_eq!(u32_at(&r.payload, 4), FEATURE_SET | MIG_DEVICE_STATE);
        assert_eq!(u32_at(&r.payload, 8), 3, "STOP_COPY asked");
        // Claims to have gone to RESUMING instead.
        let mut data = 4u32.to_le_bytes().to_vec();
        data.extend_from_slice(&u32::MAX.to_le_bytes());
        s.write_all(&feature_reply(&r, &data)).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let e = dev
        .set_mig_state(vfio_backend::MigState::StopCopy)
        .err()
        .unwrap();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    drop(dev);
    t.join().unwrap();
}

#[test]
fn a_mig_data_read_reply_longer_than_asked_is_a_protocol_error() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        for state in [2u32, 3] {
            // GET (RUNNING), then SET STOP_COPY, echoed.
            let r = recv(&s).unwrap();
            assert_eq!(r.cmd, DEVICE_FEATURE);
            let mut data = state.to_le_bytes().to_vec();
            data.extend_from_slice(&u32::MAX.to_le_bytes());
            s.write_all(&feature_reply(&r, &data)).unwrap();
        }
        let r = recv(&s).unwrap();
        assert_eq!(r.cmd, MIG_DATA_READ);
        let asked = u32_at(&r.payload, 4);
        assert!(
            asked <= 64,
            "a read is at most our max_data_xfer_size: {asked}"
        );
        // Twice what was asked.
        let n = asked * 2;
        let mut p = (8 + n).to_le_bytes().to_vec();
        p.extend_from_slice(&n.to_le_bytes());
        p.extend(std::iter::repeat_n(0x55u8, n as usize));
        s.write_all(&reply(&r, &p)).unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    let mut stream = dev
        .set_mig_state(vfio_backend::MigState::StopCopy)
        .unwrap()
        .expect("STOP_COPY from RUNNING opens a stream");
    let mut buf = [0u8; 4096];
    let e = stream.read(&mut buf).unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    drop(stream);
    drop(dev);
    t.join().unwrap();
}

#[test]
fn a_dirty_bitmap_of_the_wrong_size_is_a_protocol_error_and_big_reports_are_split() {
    let (_d, path, t) = fake_server(
        r#"{"capabilities":{"max_msg_fds":2,"max_data_xfer_size":64,"migration":{"pgsize":4096,"max_bitmap_size":16}}}"#,
        |mut s| {
            // 16 bytes of bitmap per reply: 128 pages. 256 pages take two
            // requests; the server answers each with every bit set.
            for i in 0..2u64 {
                let r = recv(&s).unwrap();
                assert_eq!(u32_at(&r.payload, 4), FEATURE_GET | DMA_LOGGING_REPORT);
                assert_eq!(u64_at(&r.payload, 8), 0x100000 + i * 128 * 4096);
                assert_eq!(u64_at(&r.payload, 16), 128 * 4096);
                let mut data = r.payload[8..32].to_vec();
                data.extend_from_slice(&[0xff; 16]);
                s.write_all(&feature_reply(&r, &data)).unwrap();
            }
            // Then a reply one word short.
            let r = recv(&s).unwrap();
            let mut data = r.payload[8..32].to_vec();
            data.extend_from_slice(&[0xff; 8]);
            s.write_all(&feature_reply(&r, &data)).unwrap();
            let _ = recv(&s);
        },
    );
    let dev = connect(&path, 5000);
    let mut bm = [0u64; 4];
    dev.dma_logging_report(0x100000, 256 * 4096, 4096, &mut bm)
        .unwrap();
    assert_eq!(bm, [u64::MAX; 4]);
    // 70 pages take two words: a reply with one is refused.
    let e = dev
        .dma_logging_report(0x100000, 70 * 4096, 4096, &mut bm)
        .unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    drop(dev);
    t.join().unwrap();
}

#[test]
fn migration_flags_without_stop_copy_are_a_protocol_error_and_enotty_means_none() {
    let (_d, path, t) = fake_server(CAPS, |mut s| {
        let r = recv(&s).unwrap();
        assert_eq!(u32_at(&r.payload, 4), FEATURE_GET | 1);
        s.write_all(&header(r.id, r.cmd, 16, REPLY | ERROR, libc::ENOTTY as u32))
            .unwrap();
        let r = recv(&s).unwrap();
        // P2P alone.
        s.write_all(&feature_reply(&r, &2u64.to_le_bytes()))
            .unwrap();
        let _ = recv(&s);
    });
    let dev = connect(&path, 5000);
    assert_eq!(dev.migration_flags().unwrap(), None);
    let e = dev.migration_flags().unwrap_err();
    assert!(matches!(e, Error::Protocol(_)), "{e:?}");
    drop(dev);
    t.join().unwrap();
}
