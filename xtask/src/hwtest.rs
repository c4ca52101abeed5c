//! `cargo xtask hwtest`: the kernel backend against real vfio-pci.
//!
//! Two ways to get a function bound to vfio-pci:
//!
//! * `--device <BDF>`: a host where that function is already bound. The test binary
//!   (`crates/vfio-hwtest`) runs against it directly.
//! * `--qemu`: a QEMU guest (TCG, q35, emulated Intel IOMMU) running a Debian kernel whose
//!   `/init` binds QEMU's `edu` and `nvme` functions to vfio-pci and runs the same binary.
//!   Results come back on the serial console and through `isa-debug-exit`.
//!
//! Everything the guest needs is fetched or built under `target/hwtest/` and reused: the host
//! tools (apt, when missing), the kernel and busybox packages (`apt-get download` + `dpkg -x`),
//! the static test binary and operator CLI (their own cargo target dir), the initramfs
//! (rebuilt only when an input changed) and the NVMe backing file. A second run only boots.
//!
//! With `--kernel 6.12` and `custom`, the image also carries what the `guest-os-*` scenarios
//! need (`hwtest/guest_os.rs`): KVM for L1, a stock L2 kernel and its workload initramfs, the reference
//! VMM and the host's QEMU with its libraries and firmware.
//!
//! Either way, one line per scenario and a closing `N passed, M failed` are printed; any
//! failure, a missing report, an unexpected QEMU exit or the timeout fails the command.

pub(crate) mod console;
mod custom;
mod guest_os;
pub(crate) mod host;
pub(crate) mod initramfs;
pub(crate) mod kernel;

use crate::{cargo, root, run_cmd};
use anyhow::{bail, Context, Result};
use console::{End, Report, Verdict};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const USAGE: &str = "\
cargo xtask hwtest (--qemu | --device <BDF>...) [options] [-- <vfio-hwtest args>]

  --qemu              boot a Debian kernel in QEMU (TCG, emulated Intel IOMMU) with QEMU's edu
                      and nvme functions bound to vfio-pci, and run the tests inside
  --device <BDF>      run the tests on this host against a function bound to vfio-pci
                      (repeatable)
  --kernel <series>   guest kernel for --qemu: 6.1 (default; bookworm), 6.12
                      (bookworm-backports), or custom: built from linux-source-6.12 with
                      iommufd, vfio cdev and no-IOMMU mode (cached under target/hwtest/custom/),
                      booted three times: legacy container, iommufd + cdev, no-IOMMU
  --mode <name>       with --kernel custom: boot only this mode (legacy, iommufd, noiommu;
                      repeatable)
  --no-guest-os       leave out the guest-os-* scenarios (by default --kernel 6.12 and custom run
                      them: L1 loads KVM and boots a stock Debian 6.12 L2 under the reference VMM
                      and under the host's own QEMU, bundled into the initramfs, with nvme, edu
                      and a vfio-user device passed through)
  --rounds <n>        rounds of each VMM in guest-os-vs-qemu (default 3)
  --timeout <secs>    kill the guest (or the test binary) after this long (default 300, 900
                      with the guest-os scenarios)
  --refresh           resolve the current kernel package again instead of the cached one
  -v, --verbose       show the whole console (with timestamps) and the kernel's info messages
  -- <args>           passed to vfio-hwtest, e.g. `-- --only iommu`

Host setup (installs only what is missing, as root): qemu-system-x86 (from backports when the
installed qemu-utils is a backports one that breaks the release's qemu), kmod, gzip. Kernel and
busybox-static are downloaded and unpacked under target/hwtest/, not installed. --kernel custom
also installs the kernel's build dependencies: build-essential flex bison bc libelf-dev
libssl-dev xz-utils.
";

/// IDs `/init` binds to vfio-pci: QEMU's edu and its NVMe controller.
const QEMU_BIND_IDS: &[&str] = &["1234:11e8", "1b36:0010"];
/// The serial number given to QEMU's nvme device (an NVMe scenario checks it).
const NVME_SERIAL: &str = "hwtest0";
/// Size of the NVMe namespace's backing file.
const NVME_IMAGE_BYTES: u64 = 64 << 20;
/// The target the guest binary is built for (statically, with glibc).
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Prints a progress line.
pub(crate) fn step(msg: &str) {
    println!("== hwtest: {msg}");
}

/// The parsed command line.
#[derive(Debug, PartialEq)]
struct Options {
    qemu: bool,
    devices: Vec<String>,
    kernel: String,
    timeout: Option<Duration>,
    refresh: bool,
    no_guest_os: bool,
    rounds: Option<usize>,
    verbose: bool,
    modes: Vec<String>,
    hwtest_args: Vec<String>,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options {
            qemu: false,
            devices: Vec::new(),
            kernel: "6.1".to_string(),
            timeout: None,
            refresh: false,
            no_guest_os: false,
            rounds: None,
            verbose: false,
            modes: Vec::new(),
            hwtest_args: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |flag: &str| {
                it.next()
                    .cloned()
                    .with_context(|| format!("{flag} needs a value"))
            };
            match a.as_str() {
                "--qemu" => o.qemu = true,
                "--device" => {
                    let bdf = value("--device")?;
                    o.devices.push(if bdf.len() == 7 {
                        format!("0000:{bdf}")
                    } else {
                        bdf
                    });
                }
                "--kernel" => o.kernel = value("--kernel")?,
                "--timeout" => {
                    let v = value("--timeout")?;
                    let secs: u64 = v
                        .parse()
                        .with_context(|| format!("--timeout {v}: not a number of seconds"))?;
                    o.timeout = Some(Duration::from_secs(secs));
                }
                "--refresh" => o.refresh = true,
                "--no-guest-os" => o.no_guest_os = true,
                "--rounds" => {
                    let v = value("--rounds")?;
                    let n: usize = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=20).contains(n))
                        .with_context(|| format!("--rounds {v}: expected 1 to 20"))?;
                    o.rounds = Some(n);
                }
                "--mode" => {
                    let m = value("--mode")?;
                    if !BOOT_MODES.iter().any(|b| b.name == m) {
                        bail!("--mode {m}: expected legacy, iommufd or noiommu");
                    }
                    o.modes.push(m);
                }
                "-v" | "--verbose" => o.verbose = true,
                "--" => {
                    o.hwtest_args = it.by_ref().cloned().collect();
                }
                "-h" | "--help" => bail!("{USAGE}"),
                other => bail!("unknown argument `{other}`\n\n{USAGE}"),
            }
        }
        if !o.modes.is_empty() && o.kernel != custom::SERIES {
            bail!("--mode needs --kernel custom (stock kernels have only the legacy mode)");
        }
        match (o.qemu, o.devices.is_empty()) {
            (true, false) => bail!("--qemu and --device exclude each other\n\n{USAGE}"),
            (false, true) => bail!("give --qemu or --device <BDF>\n\n{USAGE}"),
            _ => {}
        }
        // They end up in the guest's /init: plain words only.
        for a in o.hwtest_args.iter().chain(&o.devices) {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:@=/,".contains(c));
            if !plain {
                bail!("argument `{a}`: only letters, digits and - _ . : @ = / , are allowed");
            }
        }
        Ok(o)
    }

    /// Whether this run's boots carry and run the guest-os scenarios: kernels that can run
    /// kvm-amd inside the guest (6.12 and custom; 6.1 is not in the list).
    fn guest_os(&self) -> bool {
        self.qemu && !self.no_guest_os && (self.kernel == "6.12" || self.kernel == custom::SERIES)
    }

    /// The deadline of one boot (or of the test binary on the host).
    fn timeout(&self) -> Duration {
        self.timeout
            .unwrap_or(Duration::from_secs(if self.guest_os() { 900 } else { 300 }))
    }
}

/// Entry point of `cargo xtask hwtest`.
pub fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return Ok(());
    }
    let opts = Options::parse(args)?;
    let cache = root().join("target/hwtest");
    fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    if opts.qemu {
        run_qemu(&opts, &cache)
    } else {
        run_host(&opts, &cache)
    }
}

/// The statically linked binaries the guest runs (or `--device` runs on the host).
pub(crate) struct GuestBins {
    /// `vfio-hwtest`, the scenario runner.
    pub(crate) hwtest: PathBuf,
    /// `vfio-passthrough`, the operator CLI its `cli-*` scenarios spawn.
    pub(crate) cli: PathBuf,
    /// `vfio-reference-vmm`, which the guest-os scenarios run (when the crate is there).
    pub(crate) vmm: Option<PathBuf>,
}

/// The reference VMM's package (and binary) name.
const VMM_PACKAGE: &str = "vfio-reference-vmm";

/// Builds the test binary and the operator CLI, statically linked so they run in an initramfs
/// with no libc, in their own target dir so the normal build's cache is not invalidated by the
/// different RUSTFLAGS. One cargo invocation: the CLI gets the same flags, and cargo's feature
/// unification gives both the same `vfio-backend` (with `iommufd`, which vfio-hwtest turns on;
/// the CLI has no features of its own, and its `check` reads iommufd and cdev support from
/// sysfs and `/dev`).
pub(crate) fn build_guest_bins(cache: &Path) -> Result<GuestBins> {
    let target_dir = cache.join("build");
    let with_vmm = root()
        .join("crates")
        .join(VMM_PACKAGE)
        .join("Cargo.toml")
        .is_file();
    let mut c = cargo();
    c.args([
        "build",
        "--release",
        "-p",
        "vfio-hwtest",
        "-p",
        "vfio-passthrough-cli",
    ]);
    if with_vmm {
        c.args(["-p", VMM_PACKAGE]);
    }
    c.args(["--target", STATIC_TARGET])
        .env("CARGO_TARGET_DIR", &target_dir)
        // CARGO_ENCODED_RUSTFLAGS would win over RUSTFLAGS.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // Smaller initramfs: no debug info in the guest binaries.
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo");
    run_cmd(
        if with_vmm {
            "build vfio-hwtest, vfio-passthrough and vfio-reference-vmm (static)"
        } else {
            "build vfio-hwtest and vfio-passthrough (static)"
        },
        c,
    )?;
    let release = target_dir.join(STATIC_TARGET).join("release");
    let bins = GuestBins {
        hwtest: release.join("vfio-hwtest"),
        cli: release.join("vfio-passthrough"),
        vmm: with_vmm.then(|| release.join(VMM_PACKAGE)),
    };
    for bin in [&bins.hwtest, &bins.cli]
        .into_iter()
        .chain(bins.vmm.as_ref())
    {
        if elf_interpreter(bin)? {
            bail!(
                "{} is dynamically linked (has PT_INTERP): it cannot run in the initramfs",
                bin.display()
            );
        }
    }
    Ok(bins)
}

/// Whether an x86-64 ELF file asks for a dynamic loader (has a `PT_INTERP` program header).
fn elf_interpreter(path: &Path) -> Result<bool> {
    const PT_INTERP: u32 = 3;
    let b = fs::read(path).with_context(|| format!("read {}", path.display()))?;
    let u16_at = |o: usize| b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]));
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if b.get(..5) != Some(b"\x7fELF\x02") {
        bail!("{} is not a 64-bit ELF file", path.display());
    }
    // e_phoff at 0x20, e_phentsize at 0x36, e_phnum at 0x38 (ELF-64).
    let bad = || anyhow::anyhow!("{}: truncated ELF header", path.display());
    let phoff = usize::try_from(u64_at(0x20).ok_or_else(bad)?)?;
    let phentsize = usize::from(u16_at(0x36).ok_or_else(bad)?);
    let phnum = usize::from(u16_at(0x38).ok_or_else(bad)?);
    for i in 0..phnum {
        let p_type = u32_at(phoff + i * phentsize).ok_or_else(bad)?;
        if p_type == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Prints one scenario line as the run goes.
pub(crate) fn print_scenario(s: &console::ScenarioLine) {
    let word = match s.verdict {
        Verdict::Pass => "PASS",
        Verdict::Fail => "FAIL",
        Verdict::Skip => "SKIP",
    };
    if s.detail.is_empty() {
        println!("{word} {}", s.name);
    } else {
        println!("{word} {}  ({})", s.name, s.detail);
    }
}

/// The last `n` lines of a log file, for a failure message.
pub(crate) fn tail(log: &Path, n: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Prints the closing line and turns the report's problems (plus `extra`) into the result.
fn conclude(report: &Report, mut problems: Vec<String>, log: &Path, verbose: bool) -> Result<()> {
    println!("{}", report.counts());
    if problems.is_empty() {
        return Ok(());
    }
    if !verbose {
        println!("-- last lines of {}:\n{}", log.display(), tail(log, 40));
    }
    problems.push(format!("full log: {}", log.display()));
    bail!("hwtest failed:\n  {}", problems.join("\n  "))
}

/// One boot of the guest: how the IOMMU is set up and which VFIO path the tests take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BootMode {
    /// `legacy`, `iommufd` or `noiommu`: also what `/init` passes to `vfio-hwtest --mode`.
    name: &'static str,
    /// Whether the VM has QEMU's emulated Intel IOMMU.
    intel_iommu: bool,
    /// Kernel command line words besides the console ones.
    append: &'static str,
}

/// The modes of `--kernel custom`, in the order they boot. Stock kernels boot only the first.
const BOOT_MODES: &[BootMode] = &[
    BootMode {
        name: "legacy",
        intel_iommu: true,
        append: "intel_iommu=on hwtest.mode=legacy",
    },
    BootMode {
        name: "iommufd",
        intel_iommu: true,
        append: "intel_iommu=on hwtest.mode=iommufd",
    },
    BootMode {
        name: "noiommu",
        intel_iommu: false,
        append: "vfio.enable_unsafe_noiommu_mode=1 hwtest.mode=noiommu",
    },
];

/// The modes this run boots.
fn boot_modes(opts: &Options) -> Vec<BootMode> {
    if opts.kernel != custom::SERIES {
        return BOOT_MODES.iter().take(1).copied().collect();
    }
    BOOT_MODES
        .iter()
        .filter(|m| opts.modes.is_empty() || opts.modes.iter().any(|o| o == m.name))
        .copied()
        .collect()
}

/// What one boot left: its report, what went wrong, its console log and how long it took.
struct BootResult {
    mode: BootMode,
    report: Report,
    problems: Vec<String>,
    log: PathBuf,
    took: Duration,
    /// The guest-os side-by-side table's lines.
    table: Vec<String>,
}

/// The prefix of the side-by-side table's lines (crates/vfio-hwtest/src/guest_os.rs).
const TABLE_PREFIX: &str = "HWTEST-TABLE: ";

/// The files one boot needs.
struct Guest<'a> {
    qemu: &'a Path,
    kernel: &'a kernel::Kernel,
    initrd: &'a Path,
    nvme_img: &'a Path,
    /// Guest memory, MiB (more when the guest runs L2 guests of its own).
    memory_mib: u32,
}

fn run_qemu(opts: &Options, cache: &Path) -> Result<()> {
    let t0 = Instant::now();
    let mut apt = host::Apt::new()?;
    let qemu = apt.ensure_qemu()?;
    apt.ensure_tools(&[
        ("depmod", "kmod"),
        ("modprobe", "kmod"),
        ("gzip", "gzip"),
        ("dpkg", "dpkg"),
    ])?;
    let kernel = if opts.kernel == custom::SERIES {
        custom::ensure_kernel(&mut apt, cache, opts.refresh)?
    } else {
        kernel::ensure_kernel(&mut apt, cache, &opts.kernel, opts.refresh)?
    };
    let busybox = kernel::ensure_busybox(&mut apt, cache)?;
    let bins = build_guest_bins(cache)?;

    let mut args = Vec::new();
    for id in QEMU_BIND_IDS {
        args.extend(["--require".to_string(), id.to_string()]);
    }
    let mut modules = initramfs::GUEST_MODULES.to_vec();
    let mut members = Vec::new();
    if opts.guest_os() {
        let t = Instant::now();
        // L2 runs the Debian 6.12 kernel, also under the custom L1 kernel.
        let l2_kernel = kernel::ensure_kernel(&mut apt, cache, "6.12", false)?;
        let l2_initrd = guest_os::ensure_l2_initramfs(cache, &l2_kernel, &busybox)?;
        members = guest_os::members(&l2_kernel, &l2_initrd, &qemu, bins.vmm.as_deref())?;
        modules.push(guest_os::KVM_MODULE);
        args.extend(["--guest-os".to_string(), format!("/{}", guest_os::L2_DIR)]);
        if let Some(n) = opts.rounds {
            args.extend(["--rounds".to_string(), n.to_string()]);
        }
        step(&format!(
            "guest-os: L2 {} with {}, QEMU bundle of {} files, reference VMM {} ({:.1} s)",
            l2_kernel.release,
            l2_initrd.display(),
            members.len().saturating_sub(2),
            if bins.vmm.is_some() {
                "built"
            } else {
                "NOT in this tree (crates/vfio-reference-vmm missing): its scenarios will fail"
            },
            t.elapsed().as_secs_f64()
        ));
    }
    args.extend(opts.hwtest_args.iter().cloned());
    let t_image = Instant::now();
    let (initrd, rebuilt) = initramfs::ensure_initramfs(
        cache,
        &initramfs::Inputs {
            kernel: &kernel,
            busybox: &busybox,
            hwtest: &bins.hwtest,
            cli: &bins.cli,
            bind_ids: QEMU_BIND_IDS,
            hwtest_args: args,
            modules: &modules,
            files: &[],
            members: &members,
        },
    )?;
    let size = fs::metadata(&initrd).map(|m| m.len()).unwrap_or(0);
    step(&format!(
        "initramfs {} ({} KiB, {} in {:.1} s)",
        initrd.display(),
        size / 1024,
        if rebuilt { "rebuilt" } else { "unchanged" },
        t_image.elapsed().as_secs_f64()
    ));
    let nvme_img = cache.join("nvme.img");
    if fs::metadata(&nvme_img).map(|m| m.len()).ok() != Some(NVME_IMAGE_BYTES) {
        fs::File::create(&nvme_img)?.set_len(NVME_IMAGE_BYTES)?;
    }
    let prepared = t0.elapsed();

    let guest = Guest {
        qemu: &qemu,
        kernel: &kernel,
        initrd: &initrd,
        nvme_img: &nvme_img,
        memory_mib: if opts.guest_os() { 1536 } else { 512 },
    };
    let modes = boot_modes(opts);
    let mut results = Vec::new();
    for mode in &modes {
        let r = boot(opts, cache, &guest, *mode, modes.len() > 1)?;
        // The closing line of this mode, then its summary.
        println!("{}", r.report.counts());
        println!("{}", mode_summary(&r));
        results.push(r);
    }
    let booted: Duration = results.iter().map(|r| r.took).sum();
    step(&format!(
        "kernel {}: prepared in {:.1} s, {} boot(s) and tests {:.1} s, total {:.1} s",
        kernel.release,
        prepared.as_secs_f64(),
        results.len(),
        booted.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    ));
    if results.len() > 1 {
        for r in &results {
            println!("{}", mode_summary(r));
        }
    }
    for r in results.iter().filter(|r| !r.table.is_empty()) {
        println!(
            "guest-os side by side, mode {} (boot took {:.0} s):",
            r.mode.name,
            r.took.as_secs_f64()
        );
        for row in &r.table {
            println!("  {row}");
        }
    }
    let mut problems = Vec::new();
    for r in &results {
        if r.problems.is_empty() {
            continue;
        }
        if !opts.verbose {
            println!(
                "-- mode {}: last lines of {}:\n{}",
                r.mode.name,
                r.log.display(),
                tail(&r.log, 40)
            );
        }
        for p in &r.problems {
            problems.push(format!("mode {}: {p}", r.mode.name));
        }
        problems.push(format!(
            "mode {}: full log: {}",
            r.mode.name,
            r.log.display()
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    bail!("hwtest failed:\n  {}", problems.join("\n  "))
}

/// `mode <name>: N passed, M failed, K skipped`.
fn mode_summary(r: &BootResult) -> String {
    let c = r.report.counts();
    let note = if !r.problems.is_empty() && c.failed == 0 {
        " (run incomplete: see below)"
    } else {
        ""
    };
    format!(
        "mode {}: {} passed, {} failed, {} skipped{note}",
        r.mode.name, c.passed, c.failed, c.skipped
    )
}

/// Boots the guest once in `mode` and collects the report.
fn boot(
    opts: &Options,
    cache: &Path,
    g: &Guest<'_>,
    mode: BootMode,
    label: bool,
) -> Result<BootResult> {
    let mut append = format!("console=ttyS0 panic=-1 {}", mode.append);
    if !opts.verbose {
        // Kernel info messages would interleave with the report on the console.
        append.push_str(" loglevel=4");
    }
    let mut c = Command::new(g.qemu);
    c.args([
        "-machine",
        "q35,kernel-irqchip=split",
        "-accel",
        "tcg",
        "-cpu",
        "max",
    ])
    // One vCPU. With two, TCG on a loaded 2-core host has been seen to leave
    // the second vCPU idle with its timer never firing (RCU stalls naming
    // CPU 1): an MSI steered to it is never handled, and the next TLB
    // shootdown leaves the test process spinning on CPU 0 until the boot
    // deadline. The scenarios need no second CPU, and the reference recipe
    // measured boots at one vCPU no slower than at two.
    .args([
        "-smp",
        "1",
        "-m",
        &g.memory_mib.to_string(),
        "-nodefaults",
        "-nographic",
        "-serial",
        "stdio",
    ])
    .args([
        "-no-reboot",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]);
    if mode.intel_iommu {
        c.args(["-device", "intel-iommu,intremap=on,caching-mode=on"]);
    }
    // Each device behind a root port of its own, so that a secondary bus
    // reset (VFIO hot reset) affects only that device; x-speed=5 makes the
    // port report its link active, which the kernel waits for after a bus
    // reset. On the root bus the kernel answers hot-reset info with ENODEV.
    c.args([
        "-device",
        "pcie-root-port,id=rp1,chassis=1,slot=1,x-speed=5",
        "-device",
        "edu,bus=rp1",
        "-device",
        "pcie-root-port,id=rp2,chassis=2,slot=2,x-speed=5",
    ])
    .arg("-drive")
    .arg(format!(
        "file={},if=none,id=nvm0,format=raw",
        g.nvme_img.display()
    ))
    .args([
        "-device",
        &format!("nvme,serial={NVME_SERIAL},drive=nvm0,bus=rp2"),
    ])
    .arg("-kernel")
    .arg(g.kernel.vmlinuz())
    .arg("-initrd")
    .arg(g.initrd)
    .args(["-append", &append]);
    let log = if label {
        cache.join(format!("console-{}-{}.log", g.kernel.release, mode.name))
    } else {
        cache.join(format!("console-{}.log", g.kernel.release))
    };
    step(&format!(
        "booting {} in QEMU (TCG, {}, edu, nvme), mode {}; console log {}",
        g.kernel.release,
        if mode.intel_iommu {
            "intel-iommu"
        } else {
            "no IOMMU"
        },
        mode.name,
        log.display()
    ));
    let mut report = Report::default();
    let mut table = Vec::new();
    let boot_start = Instant::now();
    let end = console::run_streamed(c, opts.timeout(), &log, |t, line| {
        if opts.verbose {
            println!("[{t:7.3}] {line}");
        }
        if let Some(at) = line.find(TABLE_PREFIX) {
            let row = line[at + TABLE_PREFIX.len()..].to_string();
            if !opts.verbose {
                println!("  {row}");
            }
            table.push(row);
        }
        if let Some(s) = report.feed(line) {
            if !opts.verbose {
                print_scenario(s);
            }
        }
    })?;
    let took = boot_start.elapsed();

    let mut problems: Vec<String> = end
        .problem(
            opts.timeout(),
            "kernel panic, early poweroff or a QEMU error",
        )
        .into_iter()
        .collect();
    problems.extend(report.problems(true));
    Ok(BootResult {
        mode,
        report,
        problems,
        log,
        took,
        table,
    })
}

fn run_host(opts: &Options, cache: &Path) -> Result<()> {
    for bdf in &opts.devices {
        let dev = Path::new("/sys/bus/pci/devices").join(bdf);
        if !dev.exists() {
            bail!(
                "no PCI function {bdf} on this host ({} does not exist)",
                dev.display()
            );
        }
        let driver = fs::read_link(dev.join("driver"))
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
        if driver.as_deref() != Some("vfio-pci") {
            step(&format!(
                "{bdf} is bound to {}, not vfio-pci; to bind it (as root):\n    \
                 modprobe vfio-pci; echo vfio-pci > {dev}/driver_override; \
                 [ -e {dev}/driver ] && echo {bdf} > {dev}/driver/unbind; \
                 echo {bdf} > /sys/bus/pci/drivers_probe",
                driver.as_deref().unwrap_or("no driver"),
                dev = dev.display()
            ));
        }
    }
    let bins = build_guest_bins(cache)?;
    let hwtest = &bins.hwtest;
    let mut c = Command::new(hwtest);
    for bdf in &opts.devices {
        c.args(["--device", bdf]);
    }
    // The CLI scenarios spawn the static CLI built beside it (args after `--` may override).
    c.arg("--cli").arg(&bins.cli);
    c.args(&opts.hwtest_args);
    let log = cache.join("host-run.log");
    step(&format!(
        "running {} on {}",
        hwtest.display(),
        opts.devices.join(" ")
    ));
    let mut report = Report::default();
    let end = console::run_streamed(c, opts.timeout(), &log, |_, line| {
        if opts.verbose {
            println!("{line}");
        }
        if let Some(s) = report.feed(line) {
            if !opts.verbose {
                print_scenario(s);
            }
        }
    })?;
    let mut problems = Vec::new();
    match end {
        End::TimedOut => problems.push(format!(
            "vfio-hwtest killed after the {} s timeout",
            opts.timeout().as_secs()
        )),
        End::Exited(s) if !s.success() => problems.push(format!("vfio-hwtest exited with {s}")),
        End::Exited(_) => {}
    }
    problems.extend(report.problems(false));
    conclude(&report, problems, &log, opts.verbose)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &[&str]) -> Result<Options> {
        Options::parse(&s.iter().map(|a| a.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn qemu_defaults_to_the_6_1_kernel_and_passes_args_after_double_dash() {
        let o = parse(&["--qemu", "--", "--only", "iommu"]).unwrap();
        assert!(o.qemu);
        assert_eq!(o.kernel, "6.1");
        assert_eq!(o.hwtest_args, ["--only", "iommu"]);
        assert_eq!(
            parse(&["--qemu", "--kernel", "6.12"]).unwrap().kernel,
            "6.12"
        );
    }

    #[test]
    fn custom_kernel_boots_three_modes_and_mode_narrows_them() {
        let names = |o: &Options| boot_modes(o).iter().map(|m| m.name).collect::<Vec<_>>();
        let all = parse(&["--qemu", "--kernel", "custom"]).unwrap();
        assert_eq!(names(&all), ["legacy", "iommufd", "noiommu"]);
        let one = parse(&["--qemu", "--kernel", "custom", "--mode", "noiommu"]).unwrap();
        assert_eq!(names(&one), ["noiommu"]);
        assert_eq!(names(&parse(&["--qemu"]).unwrap()), ["legacy"]);
        assert!(parse(&["--qemu", "--mode", "iommufd"]).is_err());
        assert!(parse(&["--qemu", "--kernel", "custom", "--mode", "fast"]).is_err());
    }

    #[test]
    fn no_iommu_boot_has_no_emulated_iommu_and_enables_unsafe_mode() {
        let m = BOOT_MODES.iter().find(|m| m.name == "noiommu").unwrap();
        assert!(!m.intel_iommu);
        assert!(m.append.contains("vfio.enable_unsafe_noiommu_mode=1"));
        assert!(!m.append.contains("intel_iommu=on"));
        for m in BOOT_MODES {
            assert!(m.append.contains(&format!("hwtest.mode={}", m.name)));
        }
    }

    #[test]
    fn guest_os_scenarios_come_with_6_12_and_custom_only_and_stretch_the_default_timeout() {
        let o = parse(&["--qemu", "--kernel", "6.12"]).unwrap();
        assert!(o.guest_os());
        assert_eq!(o.timeout(), Duration::from_secs(900));
        assert!(parse(&["--qemu", "--kernel", "custom"]).unwrap().guest_os());
        let old = parse(&["--qemu", "--kernel", "6.1"]).unwrap();
        assert!(!old.guest_os());
        assert_eq!(old.timeout(), Duration::from_secs(300));
        let off = parse(&["--qemu", "--kernel", "6.12", "--no-guest-os"]).unwrap();
        assert!(!off.guest_os());
        let given = parse(&["--qemu", "--kernel", "6.12", "--timeout", "60"]).unwrap();
        assert_eq!(given.timeout(), Duration::from_secs(60));
        assert_eq!(parse(&["--qemu", "--rounds", "5"]).unwrap().rounds, Some(5));
        assert!(parse(&["--qemu", "--rounds", "0"]).is_err());
    }

    #[test]
    fn exactly_one_of_qemu_or_device_is_required() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--qemu", "--device", "0000:00:01.0"]).is_err());
        assert_eq!(
            parse(&["--device", "00:01.0"]).unwrap().devices,
            ["0000:00:01.0"]
        );
    }

    #[test]
    fn args_that_could_break_the_init_script_are_refused() {
        assert!(parse(&["--qemu", "--", "--only", "x; reboot"]).is_err());
        assert!(parse(&["--qemu", "--", "$(id)"]).is_err());
        assert!(parse(&["--qemu", "--timeout", "soon"]).is_err());
    }

    #[test]
    fn static_check_tells_a_dynamic_elf_from_a_static_one() {
        // The running test binary is dynamically linked (no crt-static in tests).
        let me = std::env::current_exe().unwrap();
        assert!(elf_interpreter(&me).unwrap());
        let tmp = std::env::temp_dir().join(format!("xtask-elf-{}", std::process::id()));
        // A minimal ELF-64 header with no program headers.
        let mut h = vec![0u8; 64];
        h[..5].copy_from_slice(b"\x7fELF\x02");
        fs::write(&tmp, &h).unwrap();
        assert!(!elf_interpreter(&tmp).unwrap());
        fs::write(&tmp, b"#!/bin/sh\n").unwrap();
        assert!(elf_interpreter(&tmp).is_err());
        let _ = fs::remove_file(&tmp);
    }
}
