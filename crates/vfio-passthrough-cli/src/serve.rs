//! `serve-fake`: the fake device on a vfio-user socket, for other VMMs and
//! tools, until SIGINT or SIGTERM.
//!
//! A signal stops it within a second whatever its client does: the server
//! never blocks on what a client controls (see `vfio_backend::user`), and
//! should its thread still not end within [`STOP_BOUND`], the socket is
//! removed and the process exits anyway. The server's log (refused and
//! dropped clients, and with `RUST_LOG=debug` every error reply) goes to
//! stderr; warnings and errors only by default.

use std::io::Write as _;
use std::os::unix::fs::FileTypeExt as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail};
use vfio_backend::user::{ServerOptions, UserServer};
use vfio_backend::Vfio;
use vfio_fake_device::FakeDevice;

use crate::source;

/// What to serve.
pub enum What<'a> {
    /// A built-in profile.
    Profile(&'a str),
    /// A dump file, with `--bar-size` options.
    Config(&'a Path, &'a [(usize, u64)]),
}

/// Removes `path` if it is a socket nobody listens on (left by a server
/// that was killed); refuses anything else that is in the way.
fn clear_stale_socket(path: &Path) -> anyhow::Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; choose another path or remove it",
            path.display()
        );
    }
    match crate::input::connect_unix(path, crate::input::CONNECT_TIMEOUT) {
        Ok(_) => bail!(
            "a server is already listening on {}; stop it or choose another path",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            std::fs::remove_file(path)
                .map_err(|e| anyhow!("removing the stale socket {}: {e}", path.display()))?;
            eprintln!(
                "vfio-passthrough: removed the stale socket {} (nobody was listening)",
                path.display()
            );
            Ok(())
        }
        Err(e) => bail!(
            "{} exists and cannot be checked ({e}); remove it if no server uses it",
            path.display()
        ),
    }
}

/// The longest `serve-fake` waits for its server thread after a signal.
pub const STOP_BOUND: Duration = Duration::from_millis(800);

/// Log records to stderr, prefixed with the command's name.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            eprintln!(
                "vfio-passthrough: {}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

static STDERR_LOG: StderrLog = StderrLog;

/// Installs [`StderrLog`] at the level `RUST_LOG` names (a bare level such
/// as `debug`; warnings by default).
fn init_log() {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.trim().parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&STDERR_LOG).is_ok() {
        log::set_max_level(level);
    }
}

/// Blocks SIGINT and SIGTERM in this thread (and the threads it starts), so
/// that `wait_for_signal` receives them.
fn block_stop_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initializes it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only write to it and to
    // this thread's signal mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(set)
}

fn wait_for_signal(set: &libc::sigset_t) -> i32 {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialized and its signals are blocked; sigwait
    // writes the signal number into `sig`.
    let rc = unsafe { libc::sigwait(set, &mut sig) };
    if rc == 0 {
        sig
    } else {
        libc::SIGTERM
    }
}

/// Serves until SIGINT or SIGTERM; removes the socket on the way out.
pub fn run(socket: &Path, what: &What<'_>) -> anyhow::Result<()> {
    let (fake, name) = match what {
        What::Profile(p) => (source::profile(p)?, format!("profile {p:?}")),
        What::Config(path, sizes) => {
            let (t, notes, _, _) = source::template_from_file(path, sizes)?;
            for n in notes.iter().filter(|n| n.source == "guessed") {
                if let Some(how) = &n.how {
                    eprintln!("vfio-passthrough: BAR{} size guessed: {how}", n.bar);
                }
            }
            let fake = FakeDevice::new(t)
                .map_err(|e| anyhow!("{}: cannot build a fake device: {e}", path.display()))?;
            (fake, format!("made from {}", path.display()))
        }
    };
    let cfg = fake.template().config();
    let ids = (
        cfg.get(0..2)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]])),
        cfg.get(2..4)
            .map_or(0, |b| u16::from_le_bytes([b[0], b[1]])),
    );
    clear_stale_socket(socket)?;
    init_log();
    let set = block_stop_signals()?;
    let device: Arc<dyn Vfio> = Arc::new(fake);
    let server = UserServer::bind(socket, device, ServerOptions::default()).map_err(|e| {
        anyhow!(
            "cannot serve on {}: {e}; check that its directory exists and is writable",
            socket.display()
        )
    })?;
    println!(
        "serving the fake device {:04x}:{:04x} ({name}) over vfio-user on {} (mode 0600, one client at a time); Ctrl-C stops",
        ids.0,
        ids.1,
        socket.display()
    );
    println!(
        "  try: vfio-passthrough inspect --vfio-user {}",
        socket.display()
    );
    let _ = std::io::stdout().flush();
    let sig = wait_for_signal(&set);
    // Bounded: a server thread that does not end in time is left behind
    // (the process exits right after), with the socket removed here.
    let (done, stopped) = std::sync::mpsc::channel();
    let stopper = std::thread::Builder::new()
        .name("serve-fake-stop".into())
        .spawn(move || {
            server.shutdown();
            let _ = done.send(());
        });
    if stopper.is_err() || stopped.recv_timeout(STOP_BOUND).is_err() {
        let _ = std::fs::remove_file(socket);
        eprintln!(
            "vfio-passthrough: the server did not stop within {STOP_BOUND:?}; exiting without it"
        );
    }
    eprintln!(
        "vfio-passthrough: {} received, socket {} removed",
        if sig == libc::SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        },
        socket.display()
    );
    Ok(())
}
