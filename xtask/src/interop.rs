//! `cargo xtask interop`: our unmodified `vfio-passthrough serve-fake` under a real VMM's
//! vfio-user client (QEMU's `vfio-user-pci`) and a real guest kernel.
//!
//! * QEMU: `-device vfio-user-pci` exists from QEMU 10.1; Debian has it in trixie-backports
//!   (11.1.x). Rather than touching the host's packages, a `debootstrap --variant=minbase
//!   trixie` chroot under `target/interop/chroot` gets trixie-backports' qemu-system-x86, and
//!   QEMU runs under `chroot`. Everything QEMU opens (kernel, initramfs, the vfio-user and QMP
//!   sockets) sits in the chroot's `/interop`. The chroot is built once and reused.
//! * The guest: hwtest's Debian kernel, busybox and initramfs machinery
//!   ([`crate::hwtest`]), with `vfio-hwtest --interop /interop` as the test binary and the
//!   `inspect --fake <profile> --json` outputs of the host in `/interop/<profile>.json`.
//! * Per boot, `serve-fake --profile <p>` serves on `/interop/<p>.sock`; QEMU (TCG, q35,
//!   intel-iommu) attaches it with `vfio-user-pci` behind a PCIe root port. The guest asks for
//!   `device_del` / `device_add` on the console; this task sends them over QMP.
//!
//! Boots: edu with memfd guest RAM (every scenario), edu with plain guest RAM (the DMA
//! scenario: QEMU sends DMA_MAP without file descriptors, so the server must serve DMA by
//! messages), nvme-like with memfd guest RAM (every scenario).

use crate::hwtest::console::{self, Report};
use crate::hwtest::{self, host, initramfs, kernel};
use crate::root;
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo xtask interop [options]

Boots a Debian kernel in QEMU 11.1 (TCG, q35, intel-iommu) whose PCI function is our
`vfio-passthrough serve-fake`, attached with QEMU's vfio-user-pci, once per fake profile, and
runs `vfio-hwtest --interop` in the guest.

  --profile <name>    boot only this profile (edu, nvme-like; repeatable)
  --timeout <secs>    kill a boot after this long (default 600)
  --kernel <series>   guest kernel: 6.1 (default) or 6.12, as for hwtest
  --only <substring>  run only the guest scenarios whose name contains it (every boot)
  -v, --verbose       show the whole console and QEMU's vfio-user trace
  -h, --help          this text

Host setup (as root; cached under target/interop/chroot and reused): debootstrap (installed
with apt when missing), then a minbase trixie chroot with qemu-system-x86 from
trixie-backports. The host's own packages are not changed otherwise.
";

/// The Debian release of the chroot and the suite its QEMU comes from.
const CHROOT_SUITE: &str = "trixie";
const QEMU_SUITE: &str = "trixie-backports";
/// Where QEMU sits in the chroot.
const QEMU_IN_CHROOT: &str = "/usr/bin/qemu-system-x86_64";
/// The directory, in the chroot, holding what QEMU opens.
const SHARE: &str = "interop";
/// Marks a finished chroot; holds QEMU's version line.
const READY: &str = ".vfio-interop-ready";
/// The kernel modules the guest loads: no nvme (it would claim nvme-like by class).
const MODULES: &[&str] = &["vfio_iommu_type1", "vfio_pci"];
/// The QEMU id of the vfio-user device and the root port it sits behind.
const DEVICE_ID: &str = "vfu0";
const PORT_ID: &str = "rp1";
/// How long a QMP answer or event may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long serve-fake may take to create its socket.
const SERVER_START: Duration = Duration::from_secs(30);

fn step(msg: &str) {
    println!("== interop: {msg}");
}

/// One boot: which profile, whether guest RAM is a shareable memfd, which scenarios.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Boot {
    profile: &'static str,
    memfd: bool,
    /// `hwtest.only=` for the guest (a substring of scenario names).
    only: Option<&'static str>,
    /// Why the hotplug scenarios are off for this boot (`hwtest.nohotplug=1`), if they are.
    no_hotplug: Option<&'static str>,
}

impl Boot {
    fn label(&self) -> String {
        format!(
            "{}/{}",
            self.profile,
            if self.memfd { "memfd-ram" } else { "plain-ram" }
        )
    }
}

/// Why nvme-like boots without hotplug: QEMU 11.1.3 aborts when it unplugs it.
const NO_HOTPLUG_MSIX: &str = "QEMU 11.1.3's vfio-user-pci aborts on the hot unplug of a \
function with MSI-X (assertion `subregion->container == mr` in memory_region_del_subregion, \
in the device's teardown; the same function without its MSI-X capability unplugs cleanly), \
so the boot would end there; edu (no MSI-X) covers device_del/device_add";

const BOOTS: &[Boot] = &[
    Boot {
        profile: "edu",
        memfd: true,
        only: None,
        no_hotplug: None,
    },
    Boot {
        profile: "edu",
        memfd: false,
        only: Some("dma"),
        no_hotplug: None,
    },
    Boot {
        profile: "nvme-like",
        memfd: true,
        only: None,
        no_hotplug: Some(NO_HOTPLUG_MSIX),
    },
];

#[derive(Debug, PartialEq)]
struct Options {
    profiles: Vec<String>,
    timeout: Duration,
    kernel: String,
    verbose: bool,
    only: Option<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options {
            profiles: Vec::new(),
            timeout: Duration::from_secs(600),
            kernel: "6.1".into(),
            verbose: false,
            only: None,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |flag: &str| {
                it.next()
                    .cloned()
                    .with_context(|| format!("{flag} needs a value"))
            };
            match a.as_str() {
                "--profile" => {
                    let p = value("--profile")?;
                    if !BOOTS.iter().any(|b| b.profile == p) {
                        bail!("--profile {p}: expected edu or nvme-like");
                    }
                    o.profiles.push(p);
                }
                "--timeout" => {
                    let v = value("--timeout")?;
                    o.timeout = Duration::from_secs(
                        v.parse()
                            .with_context(|| format!("--timeout {v}: not a number of seconds"))?,
                    );
                }
                "--kernel" => {
                    let k = value("--kernel")?;
                    if !kernel::SERIES.iter().any(|(s, _)| *s == k) {
                        bail!("--kernel {k}: expected 6.1 or 6.12");
                    }
                    o.kernel = k;
                }
                "-v" | "--verbose" => o.verbose = true,
                "--only" => {
                    let w = value("--only")?;
                    // It ends up on the guest's kernel command line: one plain word.
                    if w.is_empty() || !w.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                        bail!("--only {w}: letters, digits and - only");
                    }
                    o.only = Some(w);
                }
                other => bail!("unknown argument `{other}`\n\n{USAGE}"),
            }
        }
        Ok(o)
    }

    fn boots(&self) -> Vec<Boot> {
        BOOTS
            .iter()
            .filter(|b| self.profiles.is_empty() || self.profiles.iter().any(|p| p == b.profile))
            .copied()
            .collect()
    }
}

/// Entry point of `cargo xtask interop`.
pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return Ok(());
    }
    let opts = Options::parse(args)?;
    let t0 = Instant::now();
    let hw_cache = root().join("target/hwtest");
    let cache = root().join("target/interop");
    fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;

    let mut apt = host::Apt::new()?;
    apt.ensure_tools(&[
        ("debootstrap", "debootstrap"),
        ("chroot", "coreutils"),
        ("depmod", "kmod"),
        ("modprobe", "kmod"),
        ("gzip", "gzip"),
        ("dpkg", "dpkg"),
    ])?;
    let chroot = cache.join("chroot");
    let t_chroot = Instant::now();
    let (qemu_version, built) = ensure_chroot(&apt, &chroot)?;
    let chroot_took = t_chroot.elapsed();
    step(&format!(
        "QEMU chroot {}: {} in {:.1} s ({qemu_version})",
        chroot.display(),
        if built { "set up" } else { "reused" },
        chroot_took.as_secs_f64()
    ));

    let kernel = kernel::ensure_kernel(&mut apt, &hw_cache, &opts.kernel, false)?;
    let busybox = kernel::ensure_busybox(&mut apt, &hw_cache)?;
    let bins = hwtest::build_guest_bins(&hw_cache)?;

    // The predictions: `inspect --fake <p> --json`, run here with the same CLI binary.
    let boots = opts.boots();
    let mut profiles: Vec<&str> = boots.iter().map(|b| b.profile).collect();
    profiles.dedup();
    let mut files = Vec::new();
    let mut bind_ids = Vec::new();
    for p in &profiles {
        let mut c = Command::new(&bins.cli);
        c.args(["inspect", "--fake", p, "--json"]);
        let json = host::output(c).with_context(|| format!("inspect --fake {p} --json"))?;
        let v: inspect_json::Ids = inspect_json::ids(&json)
            .with_context(|| format!("inspect --fake {p} --json: no identity"))?;
        bind_ids.push(format!("{:04x}:{:04x}", v.vendor, v.device));
        files.push((format!("{SHARE}/{p}.json"), json.into_bytes()));
    }
    let ids: Vec<&str> = bind_ids.iter().map(String::as_str).collect();
    let (initrd, rebuilt) = initramfs::ensure_initramfs(
        &cache,
        &initramfs::Inputs {
            kernel: &kernel,
            busybox: &busybox,
            hwtest: &bins.hwtest,
            cli: &bins.cli,
            bind_ids: &ids,
            hwtest_args: vec!["--interop".into(), format!("/{SHARE}")],
            modules: MODULES,
            files: &files,
            members: &[],
        },
    )?;
    step(&format!(
        "initramfs {} ({})",
        initrd.display(),
        if rebuilt { "rebuilt" } else { "unchanged" }
    ));
    let share = chroot.join(SHARE);
    fs::create_dir_all(&share)?;
    fs::copy(kernel.vmlinuz(), share.join("vmlinuz")).context("copy the kernel into the chroot")?;
    fs::copy(&initrd, share.join("initrd.gz")).context("copy the initramfs into the chroot")?;
    let prepared = t0.elapsed();
    step(&format!(
        "setup done in {:.1} s (QEMU chroot {:.1} s)",
        prepared.as_secs_f64(),
        chroot_took.as_secs_f64()
    ));

    let mut total = console::Counts::default();
    let mut problems = Vec::new();
    let mut summaries = Vec::new();
    for b in &boots {
        let t = Instant::now();
        let (report, mut p, log) = boot(&opts, &cache, &chroot, &bins.cli, *b)?;
        let c = report.counts();
        println!("{c}");
        total.passed += c.passed;
        total.failed += c.failed;
        total.skipped += c.skipped;
        summaries.push(format!(
            "boot {}: {c} ({:.1} s)",
            b.label(),
            t.elapsed().as_secs_f64()
        ));
        if !p.is_empty() {
            if !opts.verbose {
                println!(
                    "-- boot {}: last lines of {}:\n{}",
                    b.label(),
                    log.display(),
                    hwtest::tail(&log, 30)
                );
            }
            p.push(format!("full log: {}", log.display()));
            problems.extend(p.into_iter().map(|x| format!("boot {}: {x}", b.label())));
        }
    }
    for s in &summaries {
        println!("{s}");
    }
    step(&format!(
        "setup {:.1} s, {} boot(s) {:.1} s, total {:.1} s",
        prepared.as_secs_f64(),
        boots.len(),
        (t0.elapsed() - prepared).as_secs_f64(),
        t0.elapsed().as_secs_f64()
    ));
    println!("{total}");
    if problems.is_empty() {
        return Ok(());
    }
    bail!("interop failed:\n  {}", problems.join("\n  "))
}

/// Reading the ids out of `inspect --json` without a JSON dependency in xtask: the two
/// numbers after `"vendor_id":` and `"device_id":` in the `identity` object.
mod inspect_json {
    use anyhow::{Context, Result};

    pub struct Ids {
        pub vendor: u16,
        pub device: u16,
    }

    fn field(text: &str, name: &str) -> Result<u16> {
        let key = format!("\"{name}\":");
        let at = text.find(&key).with_context(|| format!("no {key}"))?;
        let rest = text.get(at + key.len()..).unwrap_or_default().trim_start();
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        digits
            .parse()
            .with_context(|| format!("{key} is not a 16-bit number"))
    }

    pub fn ids(json: &str) -> Result<Ids> {
        let at = json.find("\"identity\"").context("no identity")?;
        let id = json.get(at..).unwrap_or_default();
        Ok(Ids {
            vendor: field(id, "vendor_id")?,
            device: field(id, "device_id")?,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The QEMU chroot

/// Mount points at or under `dir` (from /proc/self/mounts).
fn mounts_under(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|m| *m == prefix || m.starts_with(&format!("{prefix}/")))
        .map(String::from)
        .collect()
}

/// Makes `dir` a trixie chroot with trixie-backports' QEMU (once; later runs find the `READY`
/// mark and reuse it). Returns QEMU's version line and whether the chroot was built now.
fn ensure_chroot(apt: &host::Apt, dir: &Path) -> Result<(String, bool)> {
    let ready = dir.join(READY);
    if let Ok(v) = fs::read_to_string(&ready) {
        if dir.join(QEMU_IN_CHROOT.trim_start_matches('/')).is_file() {
            return Ok((v.trim().to_string(), false));
        }
    }
    if host::euid() != Some(0) {
        bail!("building the QEMU chroot (debootstrap, chroot) needs root");
    }
    let partial = dir.with_extension("partial");
    for d in [dir, partial.as_path()] {
        let m = mounts_under(d);
        if !m.is_empty() {
            bail!(
                "{} has mounts under it ({}): unmount them, then remove it",
                d.display(),
                m.join(" ")
            );
        }
        if d.exists() {
            step(&format!("removing the unfinished {}", d.display()));
            fs::remove_dir_all(d).with_context(|| format!("remove {}", d.display()))?;
        }
    }
    let mirror = host::debian_mirror(&apt.codename);
    let t = Instant::now();
    let mut c = Command::new(host::tool("debootstrap", "debootstrap")?);
    c.args(["--variant=minbase", CHROOT_SUITE])
        .arg(&partial)
        .arg(&mirror);
    crate::run_cmd(
        &format!("debootstrap --variant=minbase {CHROOT_SUITE} (mirror {mirror})"),
        c,
    )?;
    let t_boot = t.elapsed();
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let mut src = format!("Types: deb\nURIs: {mirror}\nSuites: {QEMU_SUITE}\nComponents: main\n");
    if partial.join(keyring.trim_start_matches('/')).is_file() {
        src.push_str(&format!("Signed-By: {keyring}\n"));
    }
    fs::write(
        partial.join("etc/apt/sources.list.d/backports.sources"),
        src,
    )
    .context("write the chroot's backports source")?;
    let chroot_bin = host::tool("chroot", "coreutils")?;
    let in_chroot = |args: &[&str]| {
        let mut c = Command::new(&chroot_bin);
        c.arg(&partial)
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c
    };
    crate::run_cmd(
        "apt-get update (in the chroot)",
        in_chroot(&["apt-get", "update", "-q"]),
    )?;
    crate::run_cmd(
        &format!("apt-get install -t {QEMU_SUITE} qemu-system-x86 (in the chroot)"),
        in_chroot(&[
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-t",
            QEMU_SUITE,
            "qemu-system-x86",
        ]),
    )?;
    let _ = crate::run_cmd(
        "apt-get clean (in the chroot)",
        in_chroot(&["apt-get", "clean"]),
    );
    let version = host::output(in_chroot(&[QEMU_IN_CHROOT, "--version"]))?;
    let version = version.lines().next().unwrap_or_default().to_string();
    let devices = host::output(in_chroot(&[QEMU_IN_CHROOT, "-device", "help"]))?;
    if !devices.contains("\"vfio-user-pci\"") {
        bail!("{version} in the chroot has no vfio-user-pci device");
    }
    fs::write(partial.join(READY), format!("{version}\n"))?;
    fs::rename(&partial, dir).with_context(|| format!("rename to {}", dir.display()))?;
    step(&format!(
        "chroot: debootstrap {:.1} s, QEMU install {:.1} s",
        t_boot.as_secs_f64(),
        (t.elapsed() - t_boot).as_secs_f64()
    ));
    Ok((version, true))
}

// ---------------------------------------------------------------------------------------------
// QMP

/// A QMP connection (one JSON object per line each way), every read bounded.
struct Qmp {
    w: UnixStream,
    r: BufReader<UnixStream>,
    /// Events read while waiting for answers.
    events: Vec<String>,
}

impl Qmp {
    fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
        s.set_read_timeout(Some(QMP_TIMEOUT))?;
        s.set_write_timeout(Some(QMP_TIMEOUT))?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone()?),
            w: s,
            events: Vec::new(),
        };
        let greeting = q.line()?;
        if !greeting.contains("\"QMP\"") {
            bail!("not a QMP greeting: {greeting}");
        }
        q.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn line(&mut self) -> Result<String> {
        let mut l = String::new();
        let n = self
            .r
            .read_line(&mut l)
            .context("read from QMP (timed out or closed)")?;
        if n == 0 {
            bail!("QMP closed");
        }
        Ok(l.trim().to_string())
    }

    /// Sends one command and returns its `return` line; an `error` answer is an error.
    fn execute(&mut self, cmd: &str) -> Result<String> {
        self.w.write_all(format!("{cmd}\n").as_bytes())?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        while Instant::now() < deadline {
            let l = self.line()?;
            if l.contains("\"event\"") {
                self.events.push(l);
            } else if l.contains("\"error\"") {
                bail!("QMP {cmd}: {l}");
            } else if l.contains("\"return\"") {
                return Ok(l);
            }
        }
        bail!("QMP {cmd}: no answer within {QMP_TIMEOUT:?}")
    }

    /// Waits (bounded) for an event whose line contains `needle`.
    fn wait_event(&mut self, needle: &str) -> Result<String> {
        if let Some(i) = self.events.iter().position(|e| e.contains(needle)) {
            return Ok(self.events.remove(i));
        }
        let deadline = Instant::now() + QMP_TIMEOUT;
        while Instant::now() < deadline {
            let l = self.line()?;
            if l.contains(needle) {
                return Ok(l);
            }
            self.events.push(l);
        }
        bail!("no QMP event {needle} within {QMP_TIMEOUT:?}")
    }
}

// ---------------------------------------------------------------------------------------------
// One boot

/// The `vfio-user-pci` device, as `-device` JSON and QMP `device_add` arguments.
fn device_json(socket_in_chroot: &str) -> String {
    format!(
        r#"{{"driver":"vfio-user-pci","id":"{DEVICE_ID}","bus":"{PORT_ID}","socket":{{"type":"unix","path":"{socket_in_chroot}"}}}}"#
    )
}

/// The QEMU command line (run under `chroot`; every path is inside the chroot).
fn qemu_args(b: Boot, socket: &str, qmp: &str, append: &str, verbose: bool) -> Vec<String> {
    let mut a: Vec<String> = [
        QEMU_IN_CHROOT,
        "-machine",
        "q35,kernel-irqchip=split",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        "512",
        "-nodefaults",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-device",
        "intel-iommu,intremap=on,caching-mode=on",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if b.memfd {
        a.extend(
            [
                "-object",
                "memory-backend-memfd,id=mem0,size=512M,share=on",
                "-machine",
                "memory-backend=mem0",
            ]
            .map(String::from),
        );
    }
    a.extend([
        "-device".into(),
        format!("pcie-root-port,id={PORT_ID},chassis=1,slot=1,x-speed=5"),
        "-device".into(),
        device_json(socket),
        "-qmp".into(),
        format!("unix:{qmp},server=on,wait=off"),
        "-kernel".into(),
        format!("/{SHARE}/vmlinuz"),
        "-initrd".into(),
        format!("/{SHARE}/initrd.gz"),
        "-append".into(),
        append.into(),
    ]);
    if verbose {
        a.extend([
            "-trace".into(),
            "vfio_user*".into(),
            "-trace".into(),
            "vfio_region*".into(),
            "-trace".into(),
            "vfio_msix*".into(),
            "-trace".into(),
            "vfio_intx*".into(),
        ]);
    }
    a
}

/// Starts `serve-fake --profile <p>` on `socket` (a host path inside the chroot) and waits
/// (bounded) for the socket.
fn start_server(cli: &Path, profile: &str, socket: &Path, log: &Path) -> Result<Child> {
    let out = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut child = Command::new(cli)
        .args(["serve-fake", "--profile", profile])
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("start {} serve-fake", cli.display()))?;
    let t = Instant::now();
    while t.elapsed() < SERVER_START {
        if let Some(s) = child.try_wait()? {
            bail!(
                "serve-fake exited at start ({s}):\n{}",
                hwtest::tail(log, 10)
            );
        }
        if socket.exists() {
            return Ok(child);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!(
        "serve-fake made no socket {} in {SERVER_START:?}",
        socket.display()
    )
}

/// Stops our server (SIGTERM by its pid, so that it removes its socket; SIGKILL by its handle
/// when there is no `kill` or it is still there after 5 s).
fn stop_server(mut child: Child) -> Result<()> {
    let termed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    let t = Instant::now();
    while termed && t.elapsed() < Duration::from_secs(5) {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait()?;
    Ok(())
}

/// Boots once; returns the report, what went wrong and the console log.
fn boot(
    opts: &Options,
    cache: &Path,
    chroot: &Path,
    cli: &Path,
    b: Boot,
) -> Result<(Report, Vec<String>, PathBuf)> {
    let label = b.label().replace('/', "-");
    let share = chroot.join(SHARE);
    let socket_rel = format!("/{SHARE}/{}.sock", b.profile);
    let qmp_rel = format!("/{SHARE}/qmp.sock");
    let socket = share.join(format!("{}.sock", b.profile));
    let qmp_path = share.join("qmp.sock");
    let _ = fs::remove_file(&qmp_path);
    let log = cache.join(format!("console-{label}.log"));
    let server_log = cache.join(format!("serve-fake-{label}.log"));
    let server = start_server(cli, b.profile, &socket, &server_log)?;

    let mut append = "console=ttyS0 panic=-1 intel_iommu=on".to_string();
    if let Some(o) = opts.only.as_deref().or(b.only) {
        append.push_str(&format!(" hwtest.only={o}"));
    }
    if !opts.verbose {
        append.push_str(" loglevel=4");
    }
    if let Some(why) = b.no_hotplug {
        append.push_str(" hwtest.nohotplug=1");
        step(&format!("boot {}: hotplug scenarios off: {why}", b.label()));
    }
    let mut c = Command::new(host::tool("chroot", "coreutils")?);
    c.arg(chroot)
        .args(qemu_args(b, &socket_rel, &qmp_rel, &append, opts.verbose))
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    step(&format!(
        "boot {}: serve-fake --profile {} on {}; QEMU vfio-user-pci, console log {}",
        b.label(),
        b.profile,
        socket.display(),
        log.display()
    ));
    let mut report = Report::default();
    let mut problems = Vec::new();
    let mut qmp: Option<Qmp> = None;
    let end = console::run_streamed(c, opts.timeout, &log, |t, line| {
        if opts.verbose {
            println!("[{t:7.3}] {line}");
        }
        if let Some(at) = line.find("HWTEST-INTEROP: ") {
            let req = line.get(at + "HWTEST-INTEROP: ".len()..).unwrap_or("");
            if let Err(e) = hotplug(&mut qmp, &qmp_path, req, &socket_rel) {
                println!("== interop: QMP for `{req}` failed: {e:#}");
                problems.push(format!("QMP for `{req}`: {e:#}"));
            }
        }
        if let Some(s) = report.feed(line) {
            if !opts.verbose {
                hwtest::print_scenario(s);
            }
        }
    })?;
    // The server must still be serving: the hot unplug closed one connection, the replug
    // opened another.
    let mut server = server;
    if let Some(s) = server.try_wait()? {
        problems.push(format!(
            "serve-fake exited during the boot ({s}); its log: {}",
            server_log.display()
        ));
    } else {
        stop_server(server)?;
    }
    problems.extend(end.problem(
        opts.timeout,
        "kernel panic, QEMU error, or a refused vfio-user connection: see the log",
    ));
    problems.extend(report.problems(true));
    Ok((report, problems, log))
}

/// Answers the guest's `unplug <bdf>` / `replug <bdf>` with QMP `device_del` / (after QEMU's
/// DEVICE_DELETED event) `device_add` of the same device on the same socket.
fn hotplug(qmp: &mut Option<Qmp>, path: &Path, req: &str, socket: &str) -> Result<()> {
    if qmp.is_none() {
        *qmp = Some(Qmp::connect(path)?);
    }
    let q = qmp.as_mut().context("QMP not connected")?;
    match req.split_whitespace().next() {
        Some("unplug") => {
            q.execute(&format!(
                r#"{{"execute":"device_del","arguments":{{"id":"{DEVICE_ID}"}}}}"#
            ))?;
            step(&format!("QMP device_del {DEVICE_ID}: accepted"));
        }
        Some("replug") => {
            let ev = q.wait_event("DEVICE_DELETED")?;
            step(&format!("QMP event: {ev}"));
            q.execute(&format!(
                r#"{{"execute":"device_add","arguments":{}}}"#,
                device_json(socket)
            ))?;
            step(&format!("QMP device_add {DEVICE_ID} ({socket}): accepted"));
        }
        _ => bail!("unknown request"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[&str]) -> Result<Options> {
        Options::parse(&s.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn every_profile_boots_and_plain_ram_runs_only_the_dma_scenarios() {
        let all = parse(&[]).unwrap().boots();
        assert_eq!(all.len(), 3);
        let plain: Vec<_> = all.iter().filter(|b| !b.memfd).collect();
        assert_eq!(plain.len(), 1);
        assert_eq!(plain[0].only, Some("dma"));
        let nvme = parse(&["--profile", "nvme-like"]).unwrap().boots();
        assert_eq!(nvme.len(), 1);
        assert!(parse(&["--profile", "gpu"]).is_err());
        assert!(parse(&["--kernel", "custom"]).is_err());
        assert!(parse(&["--only", "x y"]).is_err());
        assert_eq!(
            parse(&["--only", "interop-hot"]).unwrap().only.as_deref(),
            Some("interop-hot")
        );
    }

    #[test]
    fn memfd_boots_share_guest_ram_and_plain_boots_do_not() {
        let args = |memfd| {
            qemu_args(
                Boot {
                    profile: "edu",
                    memfd,
                    only: None,
                    no_hotplug: None,
                },
                "/interop/edu.sock",
                "/interop/qmp.sock",
                "console=ttyS0",
                false,
            )
            .join(" ")
        };
        assert!(args(true).contains("memory-backend-memfd,id=mem0,size=512M,share=on"));
        assert!(!args(false).contains("memory-backend"));
        for m in [true, false] {
            let a = args(m);
            assert!(a.contains("intel-iommu,intremap=on,caching-mode=on"));
            assert!(a.contains(r#""driver":"vfio-user-pci""#));
            assert!(a.contains(r#""path":"/interop/edu.sock""#));
            assert!(a.contains("unix:/interop/qmp.sock,server=on,wait=off"));
        }
    }

    #[test]
    fn ids_are_read_from_inspect_json() {
        let j = r#"{"source":{"kind":"fake"},"identity":{"vendor_id": 4660, "device_id": 3918}}"#;
        let ids = inspect_json::ids(j).unwrap();
        assert_eq!((ids.vendor, ids.device), (0x1234, 0x0f4e));
        assert!(inspect_json::ids(r#"{"identity":{"vendor_id":"x"}}"#).is_err());
    }

    #[test]
    fn mounts_under_matches_the_directory_and_below_only() {
        assert!(mounts_under(Path::new("/nonexistent-interop-dir")).is_empty());
        assert!(!mounts_under(Path::new("/proc")).is_empty());
    }
}
