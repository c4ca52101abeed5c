//! Runs 4-byte vfio-user REGION_READs of config space in a loop against our
//! server in a thread (for `strace -f -c` or callgrind): the second argument
//! is the number of round trips. With a third argument `raw`, alternates
//! batches of them with a raw socket ping-pong of the same sizes (write and
//! read of 32 and 36 bytes against an echo thread) and prints the ratio;
//! with `rawmsg`, the raw ping-pong receives with `recvmsg` and room for
//! descriptors on both ends, as the vfio-user peers do (what the kernel
//! path alone costs).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vfio_backend::user::UserOptions;
use vfio_backend::{region, Vfio};
use vfio_bench::devices::profile;
use vfio_bench::user::serve_pair;

const REQ: usize = 16 + 16;
const REPLY: usize = 16 + 16 + 4;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    let mode = std::env::args().nth(2).unwrap_or_default();
    let raw = mode == "raw" || mode == "rawmsg";
    let with_msg = mode == "rawmsg";
    let served = serve_pair(profile("nvme-like").unwrap(), UserOptions::default()).unwrap();
    let mut b = [0u8; 4];
    let mut user = |n: u64| {
        let t = Instant::now();
        for _ in 0..n {
            served
                .client
                .region_read(region::CONFIG, 0, &mut b)
                .unwrap();
        }
        t.elapsed()
    };
    if !raw {
        let t = user(n);
        println!(
            "{:.2} us per round trip",
            t.as_nanos() as f64 / n as f64 / 1000.0
        );
        return;
    }
    let (mut sock, mut peer) = UnixStream::pair().unwrap();
    let echo = std::thread::spawn(move || {
        let mut req = [0u8; REQ];
        let reply = [0u8; REPLY];
        while read_all(&mut peer, &mut req, with_msg) {
            if peer.write_all(&reply).is_err() {
                break;
            }
        }
    });
    let mut ping = |n: u64| {
        let req = [0u8; REQ];
        let mut reply = [0u8; REPLY];
        let t = Instant::now();
        for _ in 0..n {
            sock.write_all(&req).unwrap();
            assert!(read_all(&mut sock, &mut reply, with_msg));
        }
        t.elapsed()
    };
    let batch = (n / 20).max(1);
    let (mut tu, mut tr) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..20 {
        tu += user(batch);
        tr += ping(batch);
    }
    let per = |t: Duration| t.as_nanos() as f64 / (20 * batch) as f64 / 1000.0;
    println!(
        "round trip {:.2} us, raw ping-pong {:.2} us, ratio {:.3}",
        per(tu),
        per(tr),
        per(tu) / per(tr)
    );
    drop(sock);
    echo.join().unwrap();
}

/// Fills `buf` from `sock`: with `read`, or with `recvmsg` offering room
/// for 8 descriptors. False at end of stream or on an error.
fn read_all(sock: &mut UnixStream, buf: &mut [u8], with_msg: bool) -> bool {
    use std::os::fd::AsRawFd;
    let mut got = 0;
    while got < buf.len() {
        let rest = &mut buf[got..];
        let n = if with_msg {
            let mut control = [0u64; 8];
            let mut iov = libc::iovec {
                iov_base: rest.as_mut_ptr().cast(),
                iov_len: rest.len(),
            };
            // SAFETY: zeroed msghdr is valid; the pointers set below stay
            // live for the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: `msg` points at live buffers of the sizes given.
            unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) }
        } else {
            match sock.read(rest) {
                Ok(n) => n as isize,
                Err(_) => -1,
            }
        };
        if n <= 0 {
            return false;
        }
        got += n as usize;
    }
    true
}
