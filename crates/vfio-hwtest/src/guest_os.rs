//! `guest-os-*`: a stock Linux guest (L2) drives the passed-through functions through a VMM
//! that runs here, in this (L1) guest, under KVM.
//!
//! `--guest-os DIR` names the L2 assets (`DIR/vmlinuz`, `DIR/initrd.gz`, whose `/init` is the
//! workload described in [`l2`]); `cargo xtask hwtest` puts them at `/l2` for the kernels that
//! can run KVM here (6.12 and custom). One run of the reference VMM (`--vmm`,
//! `vfio-reference-vmm`) boots L2 with QEMU's nvme and edu (kernel vfio-pci, this run's mode)
//! and a vfio-user device (`vfio-passthrough serve-fake --profile edu`); the scenarios
//! `guest-os-boot`, `-nvme`, `-edu`, `-bar-move` and `-user-device` each check their part of
//! what L2 reported. `guest-os-vs-qemu` then boots the same L2 under the reference VMM and
//! under QEMU (`--l2-qemu`, the host's own binary bundled into the image) several rounds each,
//! interleaved, checks every round functionally and prints the timings side by side
//! (`HWTEST-TABLE:` lines): those are reported, never asserted (TCG-nested, noisy).
//!
//! No-IOMMU mode: skipped by design (L2's drivers DMA into guest memory, and no-IOMMU
//! mode maps no DMA).

pub mod l2;

use crate::cli::run_cli;
use crate::device::{Device, EDU, QEMU_NVME};
use crate::harness::{Ctx, Needs, Outcome, Scenario};
use crate::mode::{ByDesign, Mode};
use anyhow::{bail, ensure, Context, Result};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What the guest-os scenarios need, from the command line.
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds `vmlinuz` and `initrd.gz` of L2.
    pub dir: PathBuf,
    /// The reference VMM binary.
    pub vmm: PathBuf,
    /// The QEMU binary of the side-by-side run.
    pub qemu: PathBuf,
    /// QEMU's firmware directory (`-L`).
    pub firmware: PathBuf,
    /// Rounds of each VMM in the side-by-side run.
    pub rounds: usize,
}

/// Default `--vmm`: where the initramfs puts the reference VMM.
pub const DEFAULT_VMM: &str = "/vfio-reference-vmm";
/// Default `--l2-qemu`.
pub const DEFAULT_QEMU: &str = "/usr/bin/qemu-system-x86_64";
/// Default firmware directory of the bundled QEMU.
pub const DEFAULT_FIRMWARE: &str = "/usr/share/qemu";
/// Default rounds of the side-by-side run.
pub const DEFAULT_ROUNDS: usize = 3;

/// The prefix of the side-by-side table's lines (`cargo xtask hwtest` prints them).
pub const TABLE_PREFIX: &str = "HWTEST-TABLE: ";

/// L2's command line, the same for both VMMs.
const L2_CMDLINE: &str = "console=ttyS0 panic=-1 loglevel=4";
/// L2's memory, MiB.
const L2_MEMORY_MIB: u32 = 256;
/// Bound of one L2 run, VMM start to exit.
const L2_TIMEOUT: Duration = Duration::from_secs(240);
/// Bound of serve-fake's start (its socket appearing).
const SERVER_START: Duration = Duration::from_secs(20);
/// Bound of a driver (re)bind in L1.
const BIND_TIMEOUT: Duration = Duration::from_secs(30);
/// edu's identification register: version 1.0 (QEMU's edu, and our fake's `edu` profile).
const EDU_ID: u32 = 0x0100_00ed;
/// The fake profile served over vfio-user.
const FAKE_PROFILE: &str = "edu";
/// Where serve-fake listens.
const FAKE_SOCKET: &str = "/tmp/guest-os-edu.sock";

static CONFIG: OnceLock<Config> = OnceLock::new();

/// Records the configuration (once, before any scenario runs).
pub fn configure(c: Config) {
    let _ = CONFIG.set(c);
}

/// The guest-os scenarios, in the order they run (last in a boot: they leave the functions
/// bound to vfio-pci, as they found them).
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "guest-os-boot",
        needs: Needs::Nothing,
        run: boot,
    },
    Scenario {
        name: "guest-os-nvme",
        needs: Needs::Nothing,
        run: nvme,
    },
    Scenario {
        name: "guest-os-edu",
        needs: Needs::Nothing,
        run: edu,
    },
    Scenario {
        name: "guest-os-bar-move",
        needs: Needs::Nothing,
        run: bar_move,
    },
    Scenario {
        name: "guest-os-user-device",
        needs: Needs::Nothing,
        run: user_device,
    },
    Scenario {
        name: "guest-os-vs-qemu",
        needs: Needs::Nothing,
        run: vs_qemu,
    },
];

/// Which VMM runs L2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    /// `vfio-reference-vmm`.
    Ours,
    /// The bundled QEMU.
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ours => "ours",
            Vmm::Qemu => "qemu",
        }
    }
}

/// What one L2 run left.
struct L2Run {
    label: String,
    vmm: Vmm,
    lines: Vec<String>,
    /// `None`: killed at the deadline.
    status: Option<ExitStatus>,
    took: f64,
    report: l2::Report,
}

impl L2Run {
    /// The last lines of the output, flattened, for a failure message.
    fn tail(&self, n: usize) -> String {
        let from = self.lines.len().saturating_sub(n);
        self.lines.get(from..).unwrap_or_default().join(" | ")
    }

    /// Why the VMM's end is not the one the workload asks for, if it is not.
    fn exit_problem(&self) -> Option<String> {
        let Some(s) = self.status else {
            return Some(format!(
                "{}: killed after the {} s timeout",
                self.label,
                L2_TIMEOUT.as_secs()
            ));
        };
        // The workload writes 0 to port 0xf4: ours exits 0, QEMU's isa-debug-exit (0 << 1) | 1.
        let want = match self.vmm {
            Vmm::Ours => 0,
            Vmm::Qemu => 1,
        };
        (s.code() != Some(want))
            .then(|| format!("{}: VMM exited with {s}, expected {want}", self.label))
    }

    fn fail(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!("{}: {what}; last output: {}", self.label, self.tail(8))
    }
}

/// The preconditions of every guest-os scenario: the mode, the assets, the devices.
struct Setup {
    cfg: Config,
    nvme: Device,
    edu: Device,
    mode: Mode,
    /// Whether the VMMs go through iommufd + cdev (else the legacy container): the boot's
    /// mode, given to the reference VMM (`--host-iommu`) and to QEMU (an iommufd object),
    /// so that both take the same kernel path.
    iommufd: bool,
}

fn setup(ctx: &Ctx<'_>) -> Result<std::result::Result<Setup, Outcome>> {
    if ctx.mode == Mode::NoIommu {
        return Err(ByDesign(
            "L2's drivers DMA into guest memory, which no-IOMMU mode cannot map (by design)"
                .to_string(),
        )
        .into());
    }
    let Some(cfg) = CONFIG.get() else {
        return Ok(Err(Outcome::Skip(
            "no L2 assets (--guest-os DIR): only the images of --kernel 6.12 and custom carry them"
                .to_string(),
        )));
    };
    let find = |id| ctx.devices.iter().find(|d| d.id == id).cloned();
    let (Some(nvme), Some(edu)) = (find(QEMU_NVME), find(EDU)) else {
        return Ok(Err(Outcome::Skip(format!(
            "needs both {QEMU_NVME} (QEMU's nvme) and {EDU} (edu) under test"
        ))));
    };
    for f in ["vmlinuz", "initrd.gz"] {
        let p = cfg.dir.join(f);
        ensure!(p.is_file(), "L2 asset {} is missing", p.display());
    }
    // Each boot mode is the kernel path both VMMs take: the legacy boot gives them the legacy
    // container even where the host also offers iommufd (the custom kernel does).
    let iommufd = ctx.mode == Mode::Iommufd;
    shmem_huge_pages_on_advice();
    Ok(Ok(Setup {
        cfg: cfg.clone(),
        nvme,
        edu,
        mode: ctx.mode,
        iommufd,
    }))
}

/// Runs `cmd` with a deadline, echoing each output line as `guest-os[<label>]| <line>`.
fn run_streamed(mut cmd: Command, label: &str, vmm: Vmm) -> Result<L2Run> {
    let t0 = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {label}: {cmd:?}"))?;
    let (tx, rx) = mpsc::channel::<(f64, String)>();
    let mut readers = Vec::new();
    let pipes: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    ];
    for pipe in pipes.into_iter().flatten() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .replace('\r', "");
                if tx.send((t0.elapsed().as_secs_f64(), line)).is_err() {
                    break;
                }
                buf.clear();
            }
        }));
    }
    drop(tx);
    let deadline = t0 + L2_TIMEOUT;
    let mut report = l2::Report::default();
    let mut lines = Vec::new();
    let mut timed_out = false;
    let stdout = std::io::stdout();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((t, line)) => {
                let _ = writeln!(stdout.lock(), "guest-os[{label}]| [{t:7.3}] {line}");
                report.feed(t, &line);
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                // Ours alone, by its handle: closes the pipes, so the readers end too.
                let _ = child.kill();
                break;
            }
        }
    }
    // The pipes are closed: the child has exited or is about to (bounded by the kill above
    // when it is past the deadline).
    let status = match child.try_wait()? {
        Some(s) => Some(s),
        None if timed_out => {
            let _ = child.wait();
            None
        }
        None => wait_bounded(&mut child, Duration::from_secs(10))?,
    };
    for r in readers {
        let _ = r.join();
    }
    Ok(L2Run {
        label: label.to_string(),
        vmm,
        lines,
        status: if timed_out { None } else { status },
        took: t0.elapsed().as_secs_f64(),
        report,
    })
}

/// Waits for `child` up to `limit`, killing it then (`None`).
fn wait_bounded(child: &mut Child, limit: Duration) -> Result<Option<ExitStatus>> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(Some(s));
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The command line of one L2 run.
fn vmm_command(s: &Setup, vmm: Vmm, user_socket: Option<&Path>) -> Command {
    let kernel = s.cfg.dir.join("vmlinuz");
    let initrd = s.cfg.dir.join("initrd.gz");
    match vmm {
        Vmm::Ours => {
            let mut c = Command::new(&s.cfg.vmm);
            c.arg("--kernel")
                .arg(&kernel)
                .arg("--initrd")
                .arg(&initrd)
                .args(["--cmdline", L2_CMDLINE])
                .args(["--memory", &L2_MEMORY_MIB.to_string(), "--cpus", "1"])
                .args(["--host-iommu", if s.iommufd { "iommufd" } else { "legacy" }]);
            for d in [&s.nvme, &s.edu] {
                c.arg("--device").arg(&d.sysfs);
            }
            if let Some(sock) = user_socket {
                c.arg("--user-device").arg(sock);
            }
            c
        }
        Vmm::Qemu => {
            let mut c = Command::new(&s.cfg.qemu);
            c.args(["-accel", "kvm", "-cpu", "host", "-machine", "q35"])
                .args(["-m", &L2_MEMORY_MIB.to_string(), "-smp", "1"])
                .args([
                    "-nodefaults",
                    "-nographic",
                    "-serial",
                    "stdio",
                    "-no-reboot",
                ])
                .arg("-L")
                .arg(&s.cfg.firmware)
                .arg("-kernel")
                .arg(&kernel)
                .arg("-initrd")
                .arg(&initrd)
                .args(["-append", L2_CMDLINE])
                .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"]);
            // QEMU takes the kernel path the reference VMM takes.
            let suffix = if s.iommufd {
                c.args(["-object", "iommufd,id=iommufd0"]);
                ",iommufd=iommufd0"
            } else {
                ""
            };
            for d in [&s.nvme, &s.edu] {
                c.args(["-device", &format!("vfio-pci,host={}{suffix}", d.bdf)]);
            }
            c
        }
    }
}

fn run_l2(s: &Setup, vmm: Vmm, user_socket: Option<&Path>, label: &str) -> Result<L2Run> {
    let bin = match vmm {
        Vmm::Ours => &s.cfg.vmm,
        Vmm::Qemu => &s.cfg.qemu,
    };
    ensure!(
        bin.is_file(),
        "{} is not in this image ({} VMM)",
        bin.display(),
        vmm.name()
    );
    run_streamed(vmm_command(s, vmm, user_socket), label, vmm)
}

// ---- serve-fake ----

/// A running `serve-fake`, stopped (SIGTERM, then SIGKILL by its handle) on drop.
struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet (we
            // hold its handle), so the pid cannot name another process; no memory is touched.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        if !matches!(
            wait_bounded(&mut self.child, Duration::from_secs(5)),
            Ok(Some(_))
        ) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(FAKE_SOCKET);
    }
}

fn start_server(cli: &Path) -> Result<Server> {
    let _ = std::fs::remove_file(FAKE_SOCKET);
    let child = Command::new(cli)
        .args(["serve-fake", "--profile", FAKE_PROFILE, FAKE_SOCKET])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {} serve-fake", cli.display()))?;
    let mut server = Server { child };
    let t0 = Instant::now();
    while !Path::new(FAKE_SOCKET).exists() {
        if let Some(s) = server.child.try_wait()? {
            bail!("serve-fake exited at start ({s})");
        }
        ensure!(
            t0.elapsed() < SERVER_START,
            "serve-fake made no socket {FAKE_SOCKET} in {SERVER_START:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(server)
}

/// What `inspect --fake edu --json` predicts a guest sees of the served device.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Prediction {
    vendor: u16,
    device: u16,
    class: u32,
    subsys_vendor: u16,
    subsys_device: u16,
    revision: u8,
}

fn predict(cli: &Path) -> Result<Prediction> {
    let run = run_cli(cli, &["inspect", "--fake", FAKE_PROFILE, "--json"])?;
    let v = run.json()?;
    let id = v
        .get("identity")
        .context("inspect --json has no `identity`")?;
    let num = |k: &str| -> Result<u64> {
        id.get(k)
            .and_then(serde_json::Value::as_u64)
            .with_context(|| format!("identity.{k} is not a number"))
    };
    let class = id
        .get("class_code")
        .and_then(serde_json::Value::as_str)
        .and_then(l2::hex)
        .context("identity.class_code is not a hex string")?;
    Ok(Prediction {
        vendor: u16::try_from(num("vendor_id")?)?,
        device: u16::try_from(num("device_id")?)?,
        class: u32::try_from(class)?,
        subsys_vendor: u16::try_from(num("subsystem_vendor_id")?)?,
        subsys_device: u16::try_from(num("subsystem_id")?)?,
        revision: u8::try_from(num("revision")?)?,
    })
}

// ---- the functional run, shared by the scenarios ----

/// The one run of the reference VMM with every device, and what it was given.
struct Functional {
    run: L2Run,
    /// The prediction, or why there is none.
    prediction: std::result::Result<Prediction, String>,
    /// Whether serve-fake ran (else why not).
    served: std::result::Result<(), String>,
}

static FUNCTIONAL: Mutex<Option<std::result::Result<Arc<Functional>, String>>> = Mutex::new(None);

/// The functional run: made by the first scenario that needs it, then shared.
fn functional(s: &Setup, cli: &Path) -> Result<Arc<Functional>> {
    let mut slot = FUNCTIONAL
        .lock()
        .map_err(|_| anyhow::anyhow!("functional run lock poisoned"))?;
    if let Some(r) = slot.as_ref() {
        return r
            .clone()
            .map_err(|e| anyhow::anyhow!("the functional L2 run failed earlier: {e}"));
    }
    let r = (|| -> Result<Arc<Functional>> {
        let prediction = predict(cli).map_err(|e| format!("{e:#}"));
        let server = start_server(cli);
        let served = server.as_ref().map(|_| ()).map_err(|e| format!("{e:#}"));
        let socket = server.as_ref().ok().map(|_| Path::new(FAKE_SOCKET));
        let run = run_l2(s, Vmm::Ours, socket, "ours-functional")?;
        drop(server);
        Ok(Arc::new(Functional {
            run,
            prediction,
            served,
        }))
    })();
    *slot = Some(r.as_ref().map(Arc::clone).map_err(|e| format!("{e:#}")));
    r
}

macro_rules! prepare {
    ($ctx:expr) => {
        match setup($ctx)? {
            Ok(s) => s,
            Err(skip) => return Ok(skip),
        }
    };
}

// ---- the checks, on any run ----

fn check_boot(r: &L2Run) -> Result<String> {
    let init = r
        .report
        .init_at
        .ok_or_else(|| r.fail("L2 never reached init"))?;
    let done = r
        .report
        .done_at
        .ok_or_else(|| r.fail("L2's workload never finished (no `done` line)"))?;
    if let Some(p) = r.exit_problem() {
        return Err(r.fail(&p));
    }
    Ok(format!(
        "L2 at init {init:.2} s after the VMM started (L2 uptime {:.2} s), workload done at {done:.2} s, VMM exit {:.2} s",
        r.report.init_up.unwrap_or(f64::NAN),
        r.took
    ))
}

fn check_nvme(r: &L2Run) -> Result<String> {
    let rep = &r.report;
    ensure!(
        rep.pci
            .iter()
            .any(|p| p.vendor == QEMU_NVME.vendor && p.device == QEMU_NVME.device),
        r.fail(&format!("L2 enumerated no {QEMU_NVME}"))
    );
    let bound = rep
        .nvme_at
        .ok_or_else(|| r.fail("L2's nvme driver never made /dev/nvme0n1"))?;
    let read = rep
        .read32
        .ok_or_else(|| r.fail("no 32 MiB O_DIRECT read time (dd failed?)"))?;
    match rep.pattern {
        Some(true) => {}
        Some(false) => return Err(r.fail("the 4 MiB pattern read back different")),
        None => return Err(r.fail("no pattern verdict")),
    }
    let (before, after) = (
        l2::irq_total(&rep.irq_before),
        l2::irq_total(&rep.irq_after),
    );
    ensure!(
        !rep.irq_after.is_empty(),
        r.fail("no nvme line in L2's /proc/interrupts")
    );
    ensure!(
        after > before,
        r.fail(&format!(
            "nvme's interrupt count did not grow over the I/O ({before} -> {after}): polling?"
        ))
    );
    let chips: Vec<&str> = rep.irq_after.iter().map(|l| l.chip.as_str()).collect();
    ensure!(
        chips
            .iter()
            .all(|c| c.contains("MSIX") || c.contains("MSI-X")),
        r.fail(&format!(
            "nvme's vectors are not all MSI-X: {}",
            chips.join(" ")
        ))
    );
    Ok(format!(
        "bound at {bound:.2} s, 32 MiB O_DIRECT read {read:.3} s, 4 MiB pattern equal, {} MSI-X vectors, interrupts {before} -> {after}",
        rep.irq_after.len()
    ))
}

/// The guest address the VMM gave to `source`, if it said.
fn guest_bdf_of<'a>(r: &'a L2Run, source: &str) -> Option<&'a str> {
    r.report
        .vmm_devices
        .iter()
        .find(|d| d.source == source || d.source.ends_with(source) || source.ends_with(&d.source))
        .map(|d| d.guest_bdf.as_str())
}

fn check_edu_read(r: &L2Run, guest_bdf: &str) -> Result<String> {
    let e = r
        .report
        .edu
        .iter()
        .find(|e| l2::same_bdf(&e.bdf, guest_bdf))
        .ok_or_else(|| r.fail(&format!("no edu identification read for {guest_bdf}")))?;
    ensure!(
        e.id == Some(EDU_ID),
        r.fail(&format!(
            "edu {guest_bdf}: identification register {:x?} at BAR 0 {:#x}, expected {EDU_ID:#010x}",
            e.id, e.bar0
        ))
    );
    Ok(format!("{guest_bdf} id {EDU_ID:#010x} at {:#x}", e.bar0))
}

fn check_bar_move(r: &L2Run, guest_bdf: &str) -> Result<String> {
    let m = r
        .report
        .bar_moves
        .iter()
        .find(|m| l2::same_bdf(&m.bdf, guest_bdf))
        .ok_or_else(|| r.fail(&format!("no BAR move reported for {guest_bdf}")))?;
    ensure!(
        m.readback == Some(m.to),
        r.fail(&format!(
            "{guest_bdf}: BAR 0 written {:#x}, reads back {:x?}",
            m.to, m.readback
        ))
    );
    ensure!(
        m.id_new == Some(EDU_ID),
        r.fail(&format!(
            "{guest_bdf}: after the move to {:#x} the id register reads {:x?}",
            m.to, m.id_new
        ))
    );
    ensure!(
        m.id_back == Some(EDU_ID),
        r.fail(&format!(
            "{guest_bdf}: after the move back to {:#x} the id register reads {:x?}",
            m.from, m.id_back
        ))
    );
    Ok(format!(
        "{guest_bdf} {:#x} -> {:#x} -> back, id read at both",
        m.from, m.to
    ))
}

/// The L2 address of the kernel edu: from the VMM's device lines, else the only edu L2 saw.
fn kernel_edu_bdf(r: &L2Run, edu: &Device) -> Result<String> {
    if let Some(b) = guest_bdf_of(r, &edu.bdf) {
        return Ok(b.to_string());
    }
    let sysfs = edu.sysfs.display().to_string();
    if let Some(b) = guest_bdf_of(r, &sysfs) {
        return Ok(b.to_string());
    }
    let edus: Vec<&l2::PciFn> = r
        .report
        .pci
        .iter()
        .filter(|p| p.vendor == EDU.vendor && p.device == EDU.device)
        .collect();
    match edus.as_slice() {
        [one] => Ok(one.bdf.clone()),
        _ => Err(r.fail(&format!(
            "cannot tell which L2 function is {} (no `vmm: <bdf> <- {}` line, {} edu functions)",
            edu.bdf,
            edu.bdf,
            edus.len()
        ))),
    }
}

fn check_errors(r: &L2Run) -> Result<()> {
    ensure!(
        r.report.errors.is_empty(),
        r.fail(&format!("L2 reported: {}", r.report.errors.join("; ")))
    );
    Ok(())
}

// ---- scenarios ----

/// The host setting the reference VMM's README asks for: transparent huge pages for shared
/// memory where a mapping asks for them (`MADV_HUGEPAGE`). Its guest RAM is a memfd (so a
/// vfio-user server can map it), and the kernel's default for shared memory is `never`, so
/// without this the first device's DMA mapping faults and pins 4 KiB pages one by one, where
/// QEMU's anonymous RAM gets huge pages (`enabled`, Debian's default `always`, or `madvise`,
/// which QEMU asks for). Only mappings that ask are affected: nothing else in this guest
/// changes. A kernel without THP (the custom one) has no such file: nothing to do.
fn shmem_huge_pages_on_advice() {
    let knob = Path::new("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
    let Ok(now) = std::fs::read_to_string(knob) else {
        return;
    };
    if now.contains("[never]") {
        if let Err(e) = std::fs::write(knob, "advise") {
            println!("guest-os: could not set {} to advise: {e}", knob.display());
        }
    }
}

/// The kernel path both VMMs take here, in words.
fn path_name(s: &Setup) -> &'static str {
    if s.iommufd {
        "iommufd + cdev"
    } else {
        "legacy container"
    }
}

fn boot(ctx: &Ctx<'_>) -> Result<Outcome> {
    let s = prepare!(ctx);
    let f = functional(&s, ctx.cli)?;
    let d = check_boot(&f.run)?;
    Ok(Outcome::Pass(format!(
        "reference VMM ({}), boot mode {}: {d}",
        path_name(&s),
        s.mode
    )))
}

fn nvme(ctx: &Ctx<'_>) -> Result<Outcome> {
    let s = prepare!(ctx);
    let f = functional(&s, ctx.cli)?;
    Ok(Outcome::Pass(format!(
        "{}: {}",
        s.nvme.bdf,
        check_nvme(&f.run)?
    )))
}

fn edu(ctx: &Ctx<'_>) -> Result<Outcome> {
    let s = prepare!(ctx);
    let f = functional(&s, ctx.cli)?;
    let bdf = kernel_edu_bdf(&f.run, &s.edu)?;
    Ok(Outcome::Pass(format!(
        "{} as {}",
        s.edu.bdf,
        check_edu_read(&f.run, &bdf)?
    )))
}

fn bar_move(ctx: &Ctx<'_>) -> Result<Outcome> {
    let s = prepare!(ctx);
    let f = functional(&s, ctx.cli)?;
    let bdf = kernel_edu_bdf(&f.run, &s.edu)?;
    let mut done = vec![check_bar_move(&f.run, &bdf)?];
    // The vfio-user device (the fake edu) was moved too: its trapped BAR follows the guest.
    if let Some(u) = guest_bdf_of(&f.run, FAKE_SOCKET) {
        done.push(format!("vfio-user {}", check_bar_move(&f.run, u)?));
    }
    check_errors(&f.run)?;
    Ok(Outcome::Pass(done.join("; ")))
}

fn user_device(ctx: &Ctx<'_>) -> Result<Outcome> {
    let s = prepare!(ctx);
    let f = functional(&s, ctx.cli)?;
    if let Err(e) = &f.served {
        bail!("serve-fake did not run: {e}");
    }
    let want = f
        .prediction
        .as_ref()
        .map_err(|e| anyhow::anyhow!("no prediction: {e}"))?;
    let r = &f.run;
    let bdf = guest_bdf_of(r, FAKE_SOCKET).ok_or_else(|| {
        r.fail(&format!(
            "the VMM printed no `vmm: <bdf> <- {FAKE_SOCKET}` line"
        ))
    })?;
    let p = r
        .report
        .pci_at(bdf)
        .ok_or_else(|| r.fail(&format!("L2 enumerated nothing at {bdf}")))?;
    let seen = Prediction {
        vendor: p.vendor,
        device: p.device,
        class: p.class,
        subsys_vendor: p.subsys_vendor,
        subsys_device: p.subsys_device,
        revision: p.revision,
    };
    ensure!(
        &seen == want,
        r.fail(&format!(
            "L2 sees {seen:x?} at {bdf}, inspect predicts {want:x?}"
        ))
    );
    let id = check_edu_read(r, bdf)?;
    Ok(Outcome::Pass(format!(
        "{FAKE_SOCKET} as {bdf}: {:04x}:{:04x} class {:06x} subsystem {:04x}:{:04x} rev {:#04x} as predicted; {id}",
        p.vendor, p.device, p.class, p.subsys_vendor, p.subsys_device, p.revision
    )))
}

// ---- side by side ----

/// Median, min and max of `v` (none if empty).
fn stats(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    let median = if s.len() % 2 == 1 {
        *s.get(mid)?
    } else {
        (s.get(mid.checked_sub(1)?)? + s.get(mid)?) / 2.0
    };
    Some((median, *s.first()?, *s.last()?))
}

fn cell(v: &[f64]) -> String {
    match stats(v) {
        Some((m, lo, hi)) => format!("{m:8.3} ({lo:.3}-{hi:.3})"),
        None => format!("{:>21}", "-"),
    }
}

fn ratio(a: &[f64], b: &[f64]) -> String {
    match (stats(a), stats(b)) {
        (Some((x, ..)), Some((y, ..))) if y > 0.0 => format!("{:.2}", x / y),
        _ => "-".to_string(),
    }
}

/// The table: one row per measure, the medians (min-max) of each VMM, and ours/QEMU.
fn table(rows: &[(&str, Vec<f64>, Vec<f64>)], native: &[f64]) -> Vec<String> {
    let mut out = vec![format!(
        "{:<28} {:>21} {:>21} {:>9}",
        "seconds, median (min-max)", "reference VMM", "QEMU", "ours/QEMU"
    )];
    for (name, ours, qemu) in rows {
        out.push(format!(
            "{name:<28} {:>21} {:>21} {:>9}",
            cell(ours),
            cell(qemu),
            ratio(ours, qemu)
        ));
    }
    out.push(format!(
        "{:<28} {:>21}   (L1 itself, nvme driver)",
        "L1-native 32 MiB read",
        cell(native)
    ));
    out
}

/// Binds `dev` to `driver` (`None`: its own driver, `driver_override` cleared), bounded.
fn rebind(dev: &Device, driver: Option<&str>) -> Result<()> {
    let w = |p: PathBuf, v: &str| {
        std::fs::write(&p, v).with_context(|| format!("write {v:?} to {}", p.display()))
    };
    w(dev.sysfs.join("driver_override"), driver.unwrap_or("\n"))?;
    if dev.driver()?.is_some() {
        w(dev.sysfs.join("driver/unbind"), &dev.bdf)?;
    }
    // drivers_probe fails (EINVAL/ENODEV) when no driver takes it; the check below says so.
    let _ = std::fs::write("/sys/bus/pci/drivers_probe", &dev.bdf);
    let t0 = Instant::now();
    loop {
        let now = dev.driver()?;
        let ok = match driver {
            Some(d) => now.as_deref() == Some(d),
            None => now.is_some(),
        };
        if ok {
            return Ok(());
        }
        ensure!(
            t0.elapsed() < BIND_TIMEOUT,
            "{} bound to {now:?} {BIND_TIMEOUT:?} after asking for {}",
            dev.bdf,
            driver.unwrap_or("its own driver")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The first NVMe namespace block device of L1 (`/dev/nvme0n1`), waited for.
fn nvme_block() -> Result<PathBuf> {
    let t0 = Instant::now();
    loop {
        if let Ok(rd) = std::fs::read_dir("/sys/block") {
            let mut names: Vec<String> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("nvme") && !n.contains('c'))
                .collect();
            names.sort();
            if let Some(n) = names.first() {
                let p = Path::new("/dev").join(n);
                if p.exists() {
                    return Ok(p);
                }
            }
        }
        ensure!(
            t0.elapsed() < BIND_TIMEOUT,
            "no NVMe namespace block device in L1 {BIND_TIMEOUT:?} after binding nvme"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads the first 32 MiB of `dev` with O_DIRECT, 1 MiB at a time; the seconds it took.
fn direct_read_32m(dev: &Path) -> Result<f64> {
    const CHUNK: usize = 1 << 20;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dev)
        .with_context(|| format!("open {} O_DIRECT", dev.display()))?;
    // O_DIRECT wants an aligned buffer: a 4 KiB-aligned window of a larger one.
    let mut raw = vec![0u8; CHUNK + 4096];
    let off = raw.as_ptr().align_offset(4096);
    let buf = raw
        .get_mut(off..off + CHUNK)
        .context("aligned window out of the buffer")?;
    let t0 = Instant::now();
    for _ in 0..32 {
        f.read_exact(buf)
            .with_context(|| format!("read {}", dev.display()))?;
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// The L1-native reads: nvme back on L1's nvme driver, `rounds` 32 MiB reads, back on
/// vfio-pci (even when a read failed).
fn native_reads(s: &Setup, rounds: usize) -> Result<Vec<f64>> {
    rebind(&s.nvme, None).context("bind nvme to L1's nvme driver")?;
    let reads = (|| -> Result<Vec<f64>> {
        let dev = nvme_block()?;
        (0..rounds).map(|_| direct_read_32m(&dev)).collect()
    })();
    let back = rebind(&s.nvme, Some("vfio-pci")).context("bind nvme back to vfio-pci");
    let reads = reads?;
    back?;
    wait_vfio_node(&s.nvme, s.iommufd || s.mode == Mode::Iommufd)?;
    Ok(reads)
}

/// Waits (bounded) for the VFIO nodes of `dev`: its group node, and its cdev when `cdev`
/// (the VMMs then go through iommufd, and the cdev is made anew by the bind).
fn wait_vfio_node(dev: &Device, cdev: bool) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let group = dev
            .iommu_group()?
            .is_some_and(|g| crate::group::group_node(&g).is_some());
        let cdev_ok = !cdev
            || std::fs::read_dir(dev.sysfs.join("vfio-dev"))
                .ok()
                .into_iter()
                .flatten()
                .filter_map(|e| e.ok())
                .any(|e| Path::new("/dev/vfio/devices").join(e.file_name()).exists());
        if group && cdev_ok {
            return Ok(());
        }
        ensure!(
            t0.elapsed() < BIND_TIMEOUT,
            "{}: no VFIO node (group {group}, cdev {cdev_ok}) {BIND_TIMEOUT:?} after binding vfio-pci",
            dev.bdf
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One measure of an L2 run, if the run has it.
type Measure = fn(&L2Run) -> Option<f64>;

fn vs_qemu(ctx: &Ctx<'_>) -> Result<Outcome> {
    let s = prepare!(ctx);
    let rounds = s.cfg.rounds.max(1);
    let t0 = Instant::now();
    let native = native_reads(&s, rounds)?;
    let native_took = t0.elapsed().as_secs_f64();
    let mut runs: Vec<L2Run> = Vec::new();
    let mut problems = Vec::new();
    for round in 1..=rounds {
        for vmm in [Vmm::Ours, Vmm::Qemu] {
            let label = format!("{}-{round}", vmm.name());
            match run_l2(&s, vmm, None, &label) {
                Ok(r) => {
                    let checked = check_boot(&r).and_then(|_| check_nvme(&r)).and_then(|_| {
                        let bdf = kernel_edu_bdf(&r, &s.edu)?;
                        check_edu_read(&r, &bdf)
                    });
                    if let Err(e) = checked {
                        problems.push(format!("{e:#}"));
                    }
                    runs.push(r);
                }
                Err(e) => problems.push(format!("{label}: {e:#}")),
            }
        }
    }
    let pick = |vmm: Vmm, f: Measure| -> Vec<f64> {
        runs.iter().filter(|r| r.vmm == vmm).filter_map(f).collect()
    };
    let measures: [(&str, Measure); 4] = [
        ("VMM start to L2 init", |r| r.report.init_at),
        ("VMM start to nvme bound", |r| r.report.nvme_at),
        ("L2 32 MiB O_DIRECT read", |r| r.report.read32),
        ("VMM start to VMM exit", |r| r.status.map(|_| r.took)),
    ];
    let rows: Vec<(&str, Vec<f64>, Vec<f64>)> = measures
        .iter()
        .map(|(name, f)| (*name, pick(Vmm::Ours, *f), pick(Vmm::Qemu, *f)))
        .collect();
    let stdout = std::io::stdout();
    {
        let mut out = stdout.lock();
        let _ = writeln!(
            out,
            "{TABLE_PREFIX}mode {}, both VMMs through the {}: {rounds} rounds each, interleaved (ours, QEMU, ...); TCG-nested, noisy: reported, not asserted",
            s.mode,
            path_name(&s)
        );
        for l in table(&rows, &native) {
            let _ = writeln!(out, "{TABLE_PREFIX}{l}");
        }
        let _ = writeln!(
            out,
            "{TABLE_PREFIX}took: native reads {native_took:.1} s, {} L2 runs {:.1} s",
            runs.len(),
            runs.iter().map(|r| r.took).sum::<f64>()
        );
    }
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    let summary: Vec<String> = rows
        .iter()
        .take(3)
        .map(|(n, o, q)| format!("{n} {}", ratio(o, q)))
        .collect();
    Ok(Outcome::Pass(format!(
        "ours/QEMU medians over {rounds} rounds: {}; L1-native read {:.3} s; {:.0} s in all",
        summary.join(", "),
        stats(&native).map_or(f64::NAN, |x| x.0),
        t0.elapsed().as_secs_f64()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_give_median_and_spread_and_ratios_compare_medians() {
        assert_eq!(stats(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(stats(&[]), None);
        assert_eq!(ratio(&[2.0, 2.0, 9.0], &[1.0, 1.0, 1.0]), "2.00");
        assert_eq!(ratio(&[], &[1.0]), "-");
        let t = table(&[("x", vec![1.0], vec![2.0])], &[0.5]);
        assert_eq!(t.len(), 3);
        assert!(t[1].ends_with("0.50"), "{}", t[1]);
    }

    fn run_of(vmm: Vmm, code: i32, lines: &[&str]) -> L2Run {
        use std::os::unix::process::ExitStatusExt;
        let mut report = l2::Report::default();
        for (i, l) in lines.iter().enumerate() {
            report.feed(i as f64, l);
        }
        L2Run {
            label: "t".into(),
            vmm,
            lines: lines.iter().map(|s| s.to_string()).collect(),
            status: Some(ExitStatus::from_raw(code << 8)),
            took: 9.0,
            report,
        }
    }

    const GOOD: &[&str] = &[
        "vmm: 00:01.0 <- 0000:01:00.0 [1b36:0010]",
        "vmm: 00:02.0 <- 0000:02:00.0 [1234:11e8]",
        "L2: init up=1.0",
        "L2: pci 0000:00:01.0 vendor=0x1b36 device=0x0010 class=0x010802 subsys=0x1af4:0x1100 rev=0x02",
        "L2: pci 0000:00:02.0 vendor=0x1234 device=0x11e8 class=0x00ff00 subsys=0x1af4:0x1100 rev=0x10",
        "L2: nvme-bound up=2.0",
        "L2: irq-before 24: 3 PCI-MSIX-0000:00:01.0 0-edge nvme0q0",
        "L2: read32 secs=0.25",
        "L2: pattern equal",
        "L2: irq-after 24: 30 PCI-MSIX-0000:00:01.0 0-edge nvme0q0",
        "L2: edu 0000:00:02.0 bar0=0xfe000000 id=0x010000ed",
        "L2: bar-move 0000:00:02.0 from=0xfe000000 to=0xfdf00000 id-new=0x010000ed readback=0xfdf00000 id-back=0x010000ed",
        "L2: done up=3.0",
    ];

    #[test]
    fn a_complete_run_passes_every_check() {
        let r = run_of(Vmm::Ours, 0, GOOD);
        check_boot(&r).unwrap();
        check_nvme(&r).unwrap();
        check_edu_read(&r, "00:02.0").unwrap();
        check_bar_move(&r, "00:02.0").unwrap();
        // QEMU ends through isa-debug-exit: (0 << 1) | 1.
        assert!(check_boot(&run_of(Vmm::Qemu, 1, GOOD)).is_ok());
        assert!(check_boot(&run_of(Vmm::Ours, 1, GOOD)).is_err());
    }

    #[test]
    fn interrupts_that_do_not_grow_or_are_not_msix_fail_the_nvme_check() {
        let swap = |from: &str, to: &str| -> Vec<String> {
            GOOD.iter().map(|l| l.replace(from, to)).collect()
        };
        let polled = swap("24: 30 ", "24: 3 ");
        let v: Vec<&str> = polled.iter().map(String::as_str).collect();
        let e = check_nvme(&run_of(Vmm::Ours, 0, &v))
            .unwrap_err()
            .to_string();
        assert!(e.contains("did not grow"), "{e}");
        let intx = swap("PCI-MSIX-0000:00:01.0", "IO-APIC");
        let v: Vec<&str> = intx.iter().map(String::as_str).collect();
        let e = check_nvme(&run_of(Vmm::Ours, 0, &v))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not all MSI-X"), "{e}");
        let differs = swap("pattern equal", "pattern differs");
        let v: Vec<&str> = differs.iter().map(String::as_str).collect();
        assert!(check_nvme(&run_of(Vmm::Ours, 0, &v)).is_err());
    }

    #[test]
    fn a_bar_move_that_loses_the_device_fails() {
        let lost = GOOD
            .iter()
            .map(|l| l.replace("id-new=0x010000ed", "id-new=0xffffffff"))
            .collect::<Vec<_>>();
        let v: Vec<&str> = lost.iter().map(String::as_str).collect();
        let e = check_bar_move(&run_of(Vmm::Ours, 0, &v), "00:02.0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("after the move to"), "{e}");
    }

    #[test]
    fn kernel_edu_is_found_by_the_vmm_line_or_as_the_only_edu() {
        let edu = Device {
            bdf: "0000:02:00.0".into(),
            sysfs: PathBuf::from("/sys/bus/pci/devices/0000:02:00.0"),
            id: EDU,
        };
        assert_eq!(
            kernel_edu_bdf(&run_of(Vmm::Ours, 0, GOOD), &edu).unwrap(),
            "00:02.0"
        );
        let no_vmm_lines: Vec<&str> = GOOD.iter().copied().skip(2).collect();
        assert_eq!(
            kernel_edu_bdf(&run_of(Vmm::Qemu, 1, &no_vmm_lines), &edu).unwrap(),
            "0000:00:02.0"
        );
    }
}
