//! Operator inputs that used to crash or wedge the CLI: sizes above what the fake device
//! backs, dump files that are FIFOs, devices or huge, a `--dump` FIFO nobody reads, and a
//! vfio-user socket whose listener accepts nobody. Each runs the real binary with a time limit,
//! so a regression fails (the process is killed) instead of hanging the test run; each asserts
//! a clear error (exit status 2) that names the input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Run {
    /// Exit status; `None` when a signal ended the process (an abort).
    code: Option<i32>,
    stderr: String,
}

/// Runs the binary under `sh -c` (so that `prefix`, e.g. a `ulimit`, applies to it) and kills
/// it after `limit`.
fn run_limited(prefix: &str, args: &[&str], limit: Duration) -> Run {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("{prefix} exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_vfio-passthrough"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("vfio-passthrough {args:?} still running after {limit:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run(args: &[&str]) -> Run {
    run_limited("", args, Duration::from_secs(20))
}

fn assert_refused(r: &Run, needles: &[&str]) {
    assert_eq!(
        r.code,
        Some(2),
        "expected a usage error (exit 2), got {:?}: {}",
        r.code,
        r.stderr
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "stderr lacks {n:?}: {}", r.stderr);
    }
}

/// A 64-byte header dump: one 32-bit memory BAR0, no ROM line.
const DUMP: &str = "00:03.0 Ethernet controller: x
00: 86 80 0e 10 07 00 10 00 02 00 00 02 00 00 00 00
10: 00 00 08 fe 00 00 00 00 00 00 00 00 00 00 00 00
20: 00 00 00 00 00 00 00 00 00 00 00 00 86 80 1e 00
30: 00 00 00 00 00 00 00 00 00 00 00 00 0b 01 ff 00
";

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn rom_size_option_above_the_fake_rom_limit_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("d.txt");
    std::fs::write(&dump, DUMP).unwrap();
    let d = dump.to_str().unwrap();
    // 1 TiB used to be allocated (and abort) before the template's 16 MiB limit was checked.
    for cmd in [
        vec!["inspect", "--no-self-check", "--fake-config", d],
        vec!["serve-fake", "/nonexistent/dir/s", "--config", d],
    ] {
        let mut args = cmd.clone();
        args.extend(["--bar-size", "0=128K", "--bar-size", "rom=1T"]);
        let r = run(&args);
        assert_refused(&r, &["rom=1T", "16 MiB"]);
    }
    // A BAR above the fake's 64 GiB is refused the same way, naming the option.
    let r = run(&[
        "inspect",
        "--fake-config",
        d,
        "--bar-size",
        "0=1T",
        "--no-self-check",
    ]);
    assert_refused(&r, &["0=1T", "64 GiB"]);
}

#[test]
fn dump_rom_line_of_2g_is_refused_before_allocating_it() {
    // Under a 1 GiB address-space limit, a 2 GiB ROM buffer cannot be allocated: the old code
    // aborted ("memory allocation failed"); the size must be refused before any allocation.
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("d.txt");
    std::fs::write(
        &dump,
        format!("{DUMP}\tExpansion ROM at fe000000 [disabled] [size=2G]\n"),
    )
    .unwrap();
    let d = dump.to_str().unwrap();
    let limit = "ulimit -v 1048576 &&";
    let r = run_limited(
        limit,
        &[
            "inspect",
            "--no-self-check",
            "--fake-config",
            d,
            "--bar-size",
            "0=128K",
        ],
        Duration::from_secs(20),
    );
    assert_refused(
        &r,
        &["d.txt", "Expansion ROM", "2147483648 bytes", "16777216"],
    );
    // The same dump without the ROM line runs fine under that limit.
    std::fs::write(&dump, DUMP).unwrap();
    let r = run_limited(
        limit,
        &[
            "inspect",
            "--no-self-check",
            "--fake-config",
            d,
            "--bar-size",
            "0=128K",
        ],
        Duration::from_secs(20),
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
}

#[test]
fn dump_that_is_a_fifo_without_writer_is_refused_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("dump.fifo");
    mkfifo(&fifo);
    let f = fifo.to_str().unwrap();
    let r = run(&["inspect", "--no-self-check", "--fake-config", f]);
    assert_refused(&r, &["dump.fifo", "a FIFO", "regular file"]);
    let sock = dir.path().join("s");
    let r = run(&["serve-fake", sock.to_str().unwrap(), "--config", f]);
    assert_refused(&r, &["dump.fifo", "a FIFO"]);
}

#[test]
fn dump_that_is_dev_zero_is_refused_instead_of_read_until_memory_runs_out() {
    let r = run(&["inspect", "--no-self-check", "--fake-config", "/dev/zero"]);
    assert_refused(&r, &["/dev/zero", "a character device"]);
}

#[test]
fn dump_file_above_one_mib_is_refused_naming_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.txt");
    // A sparse 2 GiB file: the old code read it all.
    std::fs::File::create(&big)
        .unwrap()
        .set_len(2 << 30)
        .unwrap();
    let r = run_limited(
        "ulimit -v 1048576 &&",
        &[
            "inspect",
            "--no-self-check",
            "--fake-config",
            big.to_str().unwrap(),
        ],
        Duration::from_secs(20),
    );
    assert_refused(&r, &["big.txt", "larger than 1048576 bytes"]);
}

#[test]
fn guest_dump_to_a_fifo_nobody_reads_is_an_error_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("out.fifo");
    mkfifo(&fifo);
    let r = run(&[
        "inspect",
        "--no-self-check",
        "--fake",
        "edu",
        "--dump",
        fifo.to_str().unwrap(),
    ]);
    assert_refused(&r, &["out.fifo", "no reader"]);
}

#[test]
fn vfio_user_listener_that_accepts_nobody_is_given_up_on_within_the_connect_bound() {
    // A listener with a backlog of 0 and one connection already pending: the next connect
    // blocks in the kernel until the listener accepts, which it never does.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stuck.sock");
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: plain socket calls on a fresh descriptor; `addr` is a valid sockaddr_un whose
    // size is passed; `c` outlives the copy.
    let listener = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(c.as_bytes()) {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        assert_eq!(libc::bind(fd, std::ptr::from_ref(&addr).cast(), len), 0);
        assert_eq!(libc::listen(fd, 0), 0);
        fd
    };
    // Fill the backlog (non-blocking connects until one would block).
    let mut pending = Vec::new();
    for _ in 0..8 {
        // SAFETY: as above.
        let fd = unsafe {
            let fd = libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            );
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (d, s) in addr.sun_path.iter_mut().zip(c.as_bytes()) {
                *d = *s as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, std::ptr::from_ref(&addr).cast(), len) != 0 {
                libc::close(fd);
                break;
            }
            fd
        };
        pending.push(fd);
    }
    assert!(!pending.is_empty());
    let p = path.to_str().unwrap();
    let r = run(&["inspect", "--no-self-check", "--vfio-user", p]);
    assert_refused(&r, &["stuck.sock", "timed out"]);
    // serve-fake on that path finds it in use and says so, without hanging either.
    let r = run(&["serve-fake", p]);
    assert_refused(&r, &["stuck.sock"]);
    for fd in pending.into_iter().chain([listener]) {
        // SAFETY: each fd was opened above and is closed once.
        unsafe { libc::close(fd) };
    }
}

#[test]
fn report_whose_reader_goes_away_ends_quietly_instead_of_panicking() {
    // `vfio-passthrough inspect | head -1`: the reader closes the pipe early.
    use std::os::unix::process::ExitStatusExt as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfio-passthrough"))
        .args(["inspect", "--fake", "edu", "--no-self-check"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("inspect still running with its stdout closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {stderr}",
        out.status
    );
}
