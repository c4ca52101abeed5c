//! `vfio-passthrough`: the operator's tool for VFIO PCI passthrough.
//!
//! `check <BDF>` is a preflight of a host PCI function: it reads sysfs, /proc and /dev, and
//! opens the device through VFIO only to ask whether it can migrate (as a VMM would). Exit
//! status: 0 ready (no problems), 1 problems found, 2 usage or I/O error (e.g. the device does
//! not exist).
//! `inspect` attaches a device as a VMM would and shows what the guest sees (exit status 1 when
//! a self-check step fails); `serve-fake` serves the fake device over vfio-user.

mod check;
mod input;
mod inspect;
mod migration;
mod names;
mod probe;
mod serve;
mod source;
mod sysfs;

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::{Parser, Subcommand};

use check::{Options, Report};
use sysfs::{Host, UserIds};

/// VFIO PCI passthrough, from the operator's side.
#[derive(Debug, Parser)]
#[command(name = "vfio-passthrough", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Preflight a host PCI function for passthrough; changes nothing.
    ///
    /// Checks the IOMMU, the IOMMU group's viability, the bound driver, the access modes the
    /// host offers (legacy group/container, iommufd + vfio cdev, no-IOMMU), /dev/vfio
    /// permissions, reset methods, BAR sizes against the VMM's windows, MSI-X placement against
    /// the host page size, the ROM and RLIMIT_MEMLOCK; then whether the device can be
    /// live-migrated (VFIO migration v2: STOP_COPY, P2P, PRE_COPY; device DMA logging; dirty
    /// tracking of its IOMMU domain and its page sizes), which opens the device through VFIO as
    /// a VMM would (vfio-pci resets the function; a device a VMM holds is reported busy and
    /// skipped). Exit status: 0 ready, 1 problems found, 2 usage or I/O error.
    Check(CheckArgs),
    /// Attach a device exactly as a VMM would and show what the guest will see.
    ///
    /// Prints the guest-visible identity, each BAR (size, type, placement, which ranges are
    /// mapped into the guest and which trap), the capabilities kept and hidden (and why) and the
    /// interrupts, then a timed self-check: BAR sizing, capability chains, MSI-X and MSI routed
    /// and fired, DMA. Without a device named, the built-in fake device (profile nvme-like) is
    /// used. Exit status: 0 fine, 1 a self-check step failed, 2 usage or I/O error.
    Inspect(InspectArgs),
    /// Serve the fake PCI device over a vfio-user socket (mode 0600) until Ctrl-C.
    ServeFake(ServeArgs),
}

#[derive(Debug, clap::Args)]
#[command(group = clap::ArgGroup::new("source").multiple(false))]
struct InspectArgs {
    /// A host PCI function bound to vfio-pci (DDDD:BB:DD.F or BB:DD.F).
    #[arg(long, value_name = "BDF", group = "source")]
    device: Option<String>,
    /// A device served by a vfio-user server listening on this socket.
    #[arg(long, value_name = "SOCKET", group = "source")]
    vfio_user: Option<PathBuf>,
    /// A built-in fake device profile (edu, nvme-like); the default is nvme-like.
    #[arg(long, value_name = "PROFILE", group = "source")]
    fake: Option<String>,
    /// A fake device made from an `lspci -xxx`/`-xxxx` hex dump of any device (better
    /// `lspci -vvxxxx`, which also gives the BAR sizes).
    #[arg(long, value_name = "DUMP", group = "source")]
    fake_config: Option<PathBuf>,
    /// BAR size for --fake-config when the dump has none, as N=SIZE (N 0..5 or rom); repeatable.
    #[arg(long = "bar-size", value_name = "N=SIZE", value_parser = source::parse_bar_size, requires = "fake_config")]
    bar_size: Vec<(usize, u64)>,
    /// Write the guest-visible config space to FILE, in the format `lspci -F FILE -vvv` decodes.
    #[arg(long, value_name = "FILE")]
    dump: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Lay the BARs out for this host page size (e.g. 64K) instead of this host's.
    #[arg(long, value_name = "SIZE", value_parser = parse_page_size)]
    page_size: Option<u64>,
    /// Only show the guest's view; do not enable interrupts or DMA.
    #[arg(long)]
    no_self_check: bool,
    /// With --device: open a function in a no-IOMMU group (vfio's unsafe no-IOMMU mode).
    /// Nothing isolates such a device's DMA: a guest driving it owns host memory. The
    /// self-check maps no DMA.
    #[arg(long)]
    noiommu: bool,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Path of the Unix socket to create and listen on.
    socket: PathBuf,
    /// Built-in profile to serve (edu, nvme-like); the default is nvme-like.
    #[arg(long, value_name = "PROFILE", conflicts_with = "config")]
    profile: Option<String>,
    /// Serve a fake device made from an `lspci -xxx`/`-vvxxxx` dump instead.
    #[arg(long, value_name = "DUMP")]
    config: Option<PathBuf>,
    /// BAR size for --config when the dump has none, as N=SIZE (N 0..5 or rom); repeatable.
    #[arg(long = "bar-size", value_name = "N=SIZE", value_parser = source::parse_bar_size, requires = "config")]
    bar_size: Vec<(usize, u64)>,
}

#[derive(Debug, clap::Args)]
struct CheckArgs {
    /// PCI address of the function, DDDD:BB:DD.F or BB:DD.F (as `lspci -D` prints it).
    bdf: String,
    /// Guest memory size (e.g. 4G, 512M) to compare with RLIMIT_MEMLOCK; without it that item is skipped.
    #[arg(long, value_name = "SIZE", value_parser = check::parse_size)]
    guest_memory: Option<u64>,
    /// Size of the VMM's 32-bit MMIO window (the default is 0xC000_0000..0xFEC0_0000); a 32-bit BAR that cannot fit is a problem.
    #[arg(long, value_name = "SIZE", value_parser = check::parse_size, default_value = "1004M")]
    mmio32_size: u64,
    /// Size of the VMM's 64-bit MMIO window; larger 64-bit BARs are warned about.
    #[arg(long, value_name = "SIZE", value_parser = check::parse_size, default_value = "64G")]
    mmio64_size: u64,
    /// Print the items as JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Directory standing for / when reading /sys, /proc and /dev (a copied tree, or tests).
    #[arg(long, value_name = "DIR", default_value = "/", alias = "sysfs-root")]
    root: PathBuf,
    /// Host page size to judge MSI-X placement with, instead of this host's (e.g. 64K).
    #[arg(long, value_name = "SIZE", value_parser = parse_page_size)]
    page_size: Option<u64>,
    /// RLIMIT_MEMLOCK the VMM will have (SIZE or "unlimited"), instead of this shell's.
    #[arg(long, value_name = "SIZE", value_parser = parse_memlock)]
    memlock_limit: Option<Memlock>,
    /// Check /dev/vfio access for this uid (the VMM's user) instead of the current one.
    #[arg(long, value_name = "UID")]
    vmm_uid: Option<u32>,
    /// Group ids of the VMM's user (repeat or comma-separate); used with --vmm-uid.
    #[arg(long, value_name = "GID", value_delimiter = ',', requires = "vmm_uid")]
    vmm_gid: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
struct Memlock(Option<u64>);

fn parse_memlock(s: &str) -> Result<Memlock, String> {
    if matches!(s.trim(), "unlimited" | "infinity") {
        Ok(Memlock(None))
    } else {
        check::parse_size(s).map(|v| Memlock(Some(v)))
    }
}

fn parse_page_size(s: &str) -> Result<u64, String> {
    let v = check::parse_size(s)?;
    if v.is_power_of_two() && (4096..=1 << 30).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{s:?}: a page size is a power of two from 4K to 1G"
        ))
    }
}

/// A status line on stderr for steps that take longer than a moment (terminals only).
struct Progress {
    state: Arc<Mutex<(String, Instant, bool)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Whether progress lines go to stderr: a terminal, and not machine output.
fn progress_wanted(json: bool) -> bool {
    !json && std::io::stderr().is_terminal()
}

impl Progress {
    const DELAY: Duration = Duration::from_millis(300);

    fn start(enabled: bool, verb: &'static str) -> Self {
        let state = Arc::new(Mutex::new((String::new(), Instant::now(), false)));
        let thread = enabled.then(|| {
            let state = Arc::clone(&state);
            std::thread::spawn(move || {
                let mut shown = String::new();
                loop {
                    std::thread::sleep(Duration::from_millis(100));
                    let Ok(s) = state.lock() else { return };
                    let (step, since, done) = (&s.0, s.1, s.2);
                    let mut err = std::io::stderr();
                    if done {
                        if !shown.is_empty() {
                            let _ = write!(err, "\r\x1b[K");
                        }
                        return;
                    }
                    if *step != shown && since.elapsed() >= Self::DELAY {
                        let _ = write!(err, "\r\x1b[K... {verb}{step}");
                        let _ = err.flush();
                        shown.clone_from(step);
                    }
                }
            })
        });
        Progress { state, thread }
    }

    fn step(&self, name: &str) {
        if let Ok(mut s) = self.state.lock() {
            s.0 = name.to_string();
            s.1 = Instant::now();
        }
    }

    fn finish(mut self) {
        if let Ok(mut s) = self.state.lock() {
            s.2 = true;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_check(args: &CheckArgs) -> anyhow::Result<Report> {
    let bdf = check::normalize_bdf(&args.bdf)?;
    if !args.root.is_dir() {
        bail!("--root {}: not a directory", args.root.display());
    }
    let memlock = match args.memlock_limit {
        Some(Memlock(v)) => v,
        None => sysfs::current_memlock_limit()
            .map_err(|e| anyhow::anyhow!("getrlimit(RLIMIT_MEMLOCK) failed: {e}"))?,
    };
    let user = match args.vmm_uid {
        Some(uid) => UserIds {
            uid,
            gids: args.vmm_gid.clone(),
        },
        None => UserIds::current(),
    };
    let host = Host {
        root: args.root.clone(),
        page_size: args.page_size.unwrap_or_else(sysfs::current_page_size),
        memlock,
        user,
    };
    let opts = Options {
        guest_memory: args.guest_memory,
        mmio32_size: args.mmio32_size,
        mmio64_size: args.mmio64_size,
    };
    let progress = Progress::start(progress_wanted(args.json), "checking ");
    let probe = migration::KernelProbe {
        real_root: args.root == std::path::Path::new("/"),
    };
    let report = check::run(&host, &bdf, &opts, &probe, &mut |s| progress.step(s));
    progress.finish();
    report
}

fn run_inspect(args: &InspectArgs) -> anyhow::Result<u8> {
    if args.noiommu && args.device.is_none() {
        anyhow::bail!(
            "--noiommu opts in to a host function in a no-IOMMU group: it goes with --device <BDF>"
        );
    }
    let spec = if let Some(bdf) = &args.device {
        source::Spec::Device {
            bdf: bdf.clone(),
            noiommu: args.noiommu,
        }
    } else if let Some(path) = &args.vfio_user {
        source::Spec::VfioUser(path.clone())
    } else if let Some(path) = &args.fake_config {
        source::Spec::Dump {
            path: path.clone(),
            bar_sizes: args.bar_size.clone(),
        }
    } else {
        source::Spec::Profile(
            args.fake
                .clone()
                .unwrap_or_else(|| source::DEFAULT_PROFILE.to_string()),
        )
    };
    let progress = Progress::start(progress_wanted(args.json), "");
    let opened = source::open(&spec);
    let result = opened.and_then(|o| {
        let opts = inspect::Options {
            page_size: args.page_size,
            no_self_check: args.no_self_check,
        };
        inspect::run(&o, &opts, &|s| progress.step(s))
    });
    progress.finish();
    let r = result?;
    if let Some(path) = &args.dump {
        input::write_file(path, r.lspci_dump.as_bytes())
            .map_err(|e| anyhow::anyhow!("cannot write the dump to {}: {e}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        inspect::print_text(&r);
        if let Some(path) = &args.dump {
            println!();
            println!(
                "Guest config space written to {} (decode it with `lspci -F {} -vvv`)",
                path.display(),
                path.display()
            );
        }
    }
    Ok(if r.passed() { 0 } else { 1 })
}

fn run_serve(args: &ServeArgs) -> anyhow::Result<()> {
    let what = match (&args.config, &args.profile) {
        (Some(path), _) => serve::What::Config(path, &args.bar_size),
        (None, Some(p)) => serve::What::Profile(p),
        (None, None) => serve::What::Profile(source::DEFAULT_PROFILE),
    };
    serve::run(&args.socket, &what)
}

fn print_text(r: &Report) {
    println!("{} {}", r.device, r.identity);
    let width = r.items.iter().map(|i| i.name.len()).max().unwrap_or(0);
    for i in &r.items {
        println!("{} {:<width$}  {}", i.verdict.tag(), i.name, i.detail);
        if let Some(fix) = &i.fix {
            println!("       {:<width$}  fix: {fix}", "");
        }
    }
    let s = r.summary;
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    if r.ready {
        println!(
            "{}: ready for passthrough ({}, {} skipped)",
            r.device,
            plural(s.warnings, "warning"),
            s.skipped
        );
    } else {
        println!(
            "{}: NOT ready: {}, {}",
            r.device,
            plural(s.problems, "problem"),
            plural(s.warnings, "warning")
        );
    }
}

/// `check` and `inspect` print a report: when its reader goes away (`| head`), end as
/// Unix tools do, by SIGPIPE, instead of panicking in `println!` on EPIPE. `serve-fake`
/// keeps SIGPIPE ignored (its sockets are written with MSG_NOSIGNAL anyway).
fn default_sigpipe() {
    // SAFETY: restores the default disposition of one signal; no handler runs our code.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::ServeFake(_)) {
        default_sigpipe();
    }
    let result = match &cli.command {
        Command::Check(args) => run_check(args).and_then(|r| {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print_text(&r);
            }
            Ok(if r.ready { 0 } else { 1 })
        }),
        Command::Inspect(args) => run_inspect(args),
        Command::ServeFake(args) => run_serve(args).map(|()| 0),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("vfio-passthrough: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// What clap refused `args` for (`None` when it accepted them).
    fn refusal(args: &[&str]) -> Option<ErrorKind> {
        Cli::try_parse_from(args).err().map(|e| e.kind())
    }

    #[test]
    fn vmm_gid_needs_vmm_uid() {
        assert_eq!(
            refusal(&["x", "check", "00:01.0", "--vmm-gid", "5"]),
            Some(ErrorKind::MissingRequiredArgument)
        );
        assert!(Cli::try_parse_from([
            "x",
            "check",
            "00:01.0",
            "--vmm-uid",
            "5",
            "--vmm-gid",
            "5,6"
        ])
        .is_ok());
    }

    #[test]
    fn default_windows_match_the_documented_constants() {
        let cli = Cli::try_parse_from(["x", "check", "00:01.0"]).unwrap();
        let Command::Check(a) = cli.command else {
            panic!("not check")
        };
        // 0xC000_0000..0xFEC0_0000: below 4 GiB, under the IOAPIC/LAPIC range.
        assert_eq!(a.mmio32_size, 0xFEC0_0000 - 0xC000_0000);
        assert_eq!(a.mmio64_size, 64 << 30);
    }

    #[test]
    fn inspect_takes_at_most_one_device_source() {
        assert!(Cli::try_parse_from(["x", "inspect"]).is_ok());
        assert!(Cli::try_parse_from(["x", "inspect", "--fake", "edu"]).is_ok());
        assert_eq!(
            refusal(&["x", "inspect", "--fake", "edu", "--device", "00:01.0"]),
            Some(ErrorKind::ArgumentConflict)
        );
        // --bar-size only means something for a dump: it requires --fake-config.
        assert_eq!(
            refusal(&["x", "inspect", "--bar-size", "0=16K"]),
            Some(ErrorKind::MissingRequiredArgument)
        );
        assert!(Cli::try_parse_from([
            "x",
            "inspect",
            "--fake-config",
            "d.txt",
            "--bar-size",
            "0=16K",
            "--bar-size",
            "rom=64K"
        ])
        .is_ok());
    }

    #[test]
    fn serve_fake_takes_a_socket_and_one_device() {
        assert!(Cli::try_parse_from(["x", "serve-fake", "/tmp/s"]).is_ok());
        assert_eq!(
            refusal(&["x", "serve-fake"]),
            Some(ErrorKind::MissingRequiredArgument)
        );
        assert_eq!(
            refusal(&[
                "x",
                "serve-fake",
                "/tmp/s",
                "--profile",
                "edu",
                "--config",
                "d.txt"
            ]),
            Some(ErrorKind::ArgumentConflict)
        );
    }

    #[test]
    fn page_size_must_be_a_power_of_two() {
        assert_eq!(parse_page_size("64K"), Ok(65536));
        let e = parse_page_size("3000").unwrap_err();
        assert!(e.contains("a page size is a power of two"), "{e}");
    }
}
