//! The operator command `vfio-passthrough` (crates/vfio-passthrough-cli) against the real
//! kernel: `check <BDF> --json` and `inspect --device <BDF> --json` are spawned on each device
//! under test and what they report is compared with what sysfs, `/dev` and VFIO say.
//!
//! The binary is `--cli PATH` ([`DEFAULT_CLI`](crate::harness::DEFAULT_CLI), where the initramfs puts it, by default); when
//! it is not there the scenarios are skipped with that reason. A VFIO group can be opened only
//! once, so before spawning, this process makes sure it holds no VFIO or iommufd file itself.

use crate::device::{link_name, Device};
use crate::harness::{Ctx, Outcome};
use crate::mode::{self, Mode};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use vfio_backend::{irq, region, Vfio};

/// How long one run of the CLI may take (TCG is slow; an `inspect` self-check maps RAM).
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// `check` exit statuses (crates/vfio-passthrough-cli/src/main.rs).
const EXIT_READY: i32 = 0;
const EXIT_NOT_READY: i32 = 1;
/// Usage or I/O error, and (for `inspect`) a device that cannot be opened.
const EXIT_ERROR: i32 = 2;

/// What one run of the CLI left.
pub(crate) struct CliRun {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
}

impl CliRun {
    fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub(crate) fn json(&self) -> Result<Value> {
        serde_json::from_slice(&self.stdout).with_context(|| {
            format!(
                "stdout is not JSON (exit {}; stderr: {})",
                self.status,
                self.stderr.trim()
            )
        })
    }
}

/// The CLI binary to run, or why the scenario does not apply here.
fn binary(ctx: &Ctx<'_>) -> std::result::Result<PathBuf, Outcome> {
    let p = ctx.cli.to_path_buf();
    if p.is_file() {
        Ok(p)
    } else {
        Err(Outcome::Skip(format!(
            "{} does not exist: the vfio-passthrough binary is not installed here (give --cli PATH)",
            p.display()
        )))
    }
}

/// The VFIO and iommufd files this process has open (`/proc/self/fd` links into `/dev/vfio`
/// or to `/dev/iommu`).
fn vfio_fds_held() -> Result<Vec<String>> {
    let mut held = Vec::new();
    for e in fs::read_dir("/proc/self/fd").context("list /proc/self/fd")? {
        let e = e?;
        // The directory's own fd may be gone by the time it is read: ignore what vanished.
        let Ok(target) = fs::read_link(e.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if t.starts_with("/dev/vfio/") || t == "/dev/iommu" {
            held.push(format!("fd {} -> {t}", e.file_name().to_string_lossy()));
        }
    }
    Ok(held)
}

/// Reads a child's pipe to its end on a thread of its own (so neither pipe can fill up and
/// stall the child while the other is read).
fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Waits for `child` until [`CLI_TIMEOUT`], killing it then.
fn wait_bounded(child: &mut Child, what: &str) -> Result<ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().context("wait for the CLI")? {
            return Ok(s);
        }
        if t0.elapsed() > CLI_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{what}` still running after {} s: killed",
                CLI_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns the CLI with `args` after making sure this process holds no VFIO file (the CLI
/// opens the group itself, and a group opens only once).
pub(crate) fn run_cli(cli: &Path, args: &[&str]) -> Result<CliRun> {
    let held = vfio_fds_held()?;
    ensure!(
        held.is_empty(),
        "vfio-hwtest itself still holds {} before spawning the CLI (a scenario leaked them)",
        held.join(", ")
    );
    let what = format!("{} {}", cli.display(), args.join(" "));
    let mut child = Command::new(cli)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn `{what}`"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let status = wait_bounded(&mut child, &what)?;
    let stdout = out.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    Ok(CliRun {
        status,
        stdout,
        stderr,
    })
}

// ---- small JSON helpers ----

fn field<'v>(v: &'v Value, path: &str) -> Result<&'v Value> {
    path.split('.')
        .try_fold(v, |v, k| v.get(k))
        .with_context(|| format!("the JSON has no `{path}`"))
}

fn as_bool(v: &Value, path: &str) -> Result<bool> {
    field(v, path)?
        .as_bool()
        .with_context(|| format!("`{path}` is not a boolean"))
}

fn as_u64(v: &Value, path: &str) -> Result<u64> {
    field(v, path)?
        .as_u64()
        .with_context(|| format!("`{path}` is not an unsigned number"))
}

fn as_str<'v>(v: &'v Value, path: &str) -> Result<&'v str> {
    field(v, path)?
        .as_str()
        .with_context(|| format!("`{path}` is not a string"))
}

fn as_array<'v>(v: &'v Value, path: &str) -> Result<&'v Vec<Value>> {
    field(v, path)?
        .as_array()
        .with_context(|| format!("`{path}` is not an array"))
}

/// One `check` item: (verdict, detail, fix).
struct Item<'v> {
    verdict: &'v str,
    detail: &'v str,
    fix: Option<&'v str>,
}

fn items(report: &Value) -> Result<Vec<(&str, Item<'_>)>> {
    let mut out = Vec::new();
    for i in as_array(report, "items")? {
        out.push((
            as_str(i, "name")?,
            Item {
                verdict: as_str(i, "verdict")?,
                detail: as_str(i, "detail")?,
                fix: i.get("fix").and_then(Value::as_str),
            },
        ));
    }
    Ok(out)
}

fn item<'a, 'v>(items: &'a [(&str, Item<'v>)], name: &str) -> Result<&'a Item<'v>> {
    items
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, i)| i)
        .with_context(|| format!("check reports no `{name}` item"))
}

// ---- what the kernel says ----

/// The populated BAR (0..=5) and ROM (6) lines of sysfs `resource`: (index, size).
fn sysfs_resources(dev: &Device) -> Result<Vec<(usize, u64)>> {
    let path = dev.sysfs.join("resource");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().take(7) {
        let f: Vec<u64> = line
            .split_whitespace()
            .map(|w| u64::from_str_radix(w.trim_start_matches("0x"), 16))
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("{} line {}: {line:?}", path.display(), i + 1))?;
        let [start, end, flags] = f.as_slice() else {
            bail!("{} line {}: {line:?}", path.display(), i + 1);
        };
        if (*start, *end, *flags) != (0, 0, 0) {
            out.push((i, end - start + 1));
        }
    }
    Ok(out)
}

/// Table size of the function's MSI-X capability in sysfs `config`, if it has one.
fn sysfs_msix_vectors(dev: &Device) -> Result<Option<u32>> {
    const MSIX: u8 = 0x11;
    let path = dev.sysfs.join("config");
    let cfg = fs::read(&path).with_context(|| format!("read {}", path.display()))?;
    ensure!(
        cfg.len() >= 0x40,
        "{} has {} bytes",
        path.display(),
        cfg.len()
    );
    // Status bit 4: a capability list is present.
    if cfg[0x06] & 0x10 == 0 {
        return Ok(None);
    }
    let mut at = usize::from(cfg[0x34] & 0xfc);
    // At most 48 capabilities fit in 192 bytes: bounded even for a looping list.
    for _ in 0..48 {
        if at < 0x40 || at + 4 > cfg.len() {
            return Ok(None);
        }
        if cfg[at] == MSIX {
            let ctl = u16::from_le_bytes([cfg[at + 2], cfg[at + 3]]);
            return Ok(Some(u32::from(ctl & 0x7ff) + 1));
        }
        at = usize::from(cfg[at + 1] & 0xfc);
    }
    Ok(None)
}

/// The name of the function's vfio cdev (`vfioN` in `<sysfs>/vfio-dev`), if it has one.
fn cdev_name(dev: &Device) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir(dev.sysfs.join("vfio-dev"))
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vfio"))
        .collect();
    names.sort();
    names.into_iter().next()
}

/// Parses the size `check` prints (`16 KiB`, `1 MiB`, `256 bytes`).
fn parse_human(s: &str) -> Option<u64> {
    let (n, unit) = s.trim().split_once(' ')?;
    let n: u64 = n.parse().ok()?;
    let shift = match unit {
        "bytes" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return None,
    };
    n.checked_mul(1 << shift)
}

/// The size in a `BARn` item's detail: `64-bit memory, 16 KiB`, `I/O ports, 256 bytes (...)`,
/// `32-bit prefetchable memory, 1 MiB: larger than ...`.
fn bar_item_size(detail: &str) -> Option<u64> {
    let rest = detail
        .split_once("memory, ")
        .or_else(|| detail.split_once("ports, "))
        .map_or(detail, |(_, r)| r);
    let end = rest.find([':', '(', ',']).unwrap_or(rest.len());
    parse_human(&rest[..end])
}

// ---- check ----

/// `vfio-passthrough check <BDF> --json` against what sysfs and `/dev` say: readiness by
/// mode, the IOMMU group and its viability, the driver, the access modes and the BAR sizes.
pub fn check(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let cli = match binary(ctx) {
        Ok(p) => p,
        Err(skip) => return Ok(skip),
    };
    // What the kernel says, gathered (and every file closed) before the CLI runs.
    let group = dev.iommu_group()?;
    let viable = match &group {
        Some(g) => Some(crate::group::group_viable(g)?),
        None => None,
    };
    let resources = sysfs_resources(dev)?;
    let driver = dev.driver()?;

    let run = run_cli(&cli, &["check", &dev.bdf, "--json"])?;
    let code = run.code();
    ensure!(
        code == Some(EXIT_READY) || code == Some(EXIT_NOT_READY),
        "check exited {} (stderr: {})",
        run.status,
        run.stderr.trim()
    );
    let r = run.json()?;
    let ready = as_bool(&r, "ready")?;
    ensure!(
        (code == Some(EXIT_READY)) == ready,
        "exit {} but ready = {ready}",
        run.status
    );
    ensure!(
        as_str(&r, "device")? == dev.bdf,
        "reports device {}",
        as_str(&r, "device")?
    );
    let its = items(&r)?;
    let not_ok: Vec<String> = its
        .iter()
        .filter(|(_, i)| i.verdict != "ok" && i.verdict != "skip")
        .map(|(n, i)| format!("{n}: {} {}", i.verdict, i.detail))
        .collect();

    // Readiness, by mode.
    match ctx.mode {
        Mode::Legacy | Mode::Iommufd => ensure!(
            ready,
            "not ready in {} mode: {}",
            ctx.mode,
            not_ok.join("; ")
        ),
        Mode::NoIommu => {
            // check.rs: without an IOMMU but with vfio's unsafe mode on, the IOMMU item and
            // the access modes are warnings (no isolation), not problems: ready, with the
            // reason spelled out.
            ensure!(ready, "not ready in no-IOMMU mode: {}", not_ok.join("; "));
            let iommu = item(&its, "IOMMU")?;
            ensure!(
                iommu.verdict == "warning" && iommu.detail.contains("no-IOMMU mode is on"),
                "IOMMU item is {} `{}`, expected a warning that vfio's unsafe no-IOMMU mode is on",
                iommu.verdict,
                iommu.detail
            );
            let am = item(&its, "access modes")?;
            ensure!(
                am.verdict == "warning"
                    && am.detail.contains("no-IOMMU mode gives up DMA isolation")
                    && am.fix.is_some(),
                "access modes item is {} `{}`, expected a warning that no-IOMMU mode gives up \
                 DMA isolation, with a fix",
                am.verdict,
                am.detail
            );
        }
    }

    // The IOMMU group and its viability.
    let g = group.as_deref().context("sysfs: no iommu_group link")?;
    let gi = item(&its, "IOMMU group")?;
    ensure!(
        gi.detail.starts_with(&format!("group {g}:")),
        "IOMMU group item `{}`, sysfs says group {g}",
        gi.detail
    );
    let cli_viable =
        gi.verdict == "ok" && gi.detail.contains("viable") && !gi.detail.contains("not viable");
    ensure!(
        Some(cli_viable) == viable,
        "IOMMU group item {} `{}`, the kernel says viable = {viable:?}",
        gi.verdict,
        gi.detail
    );

    // The driver.
    ensure!(
        driver.as_deref() == Some("vfio-pci"),
        "sysfs driver {driver:?}"
    );
    let di = item(&its, "driver")?;
    ensure!(
        di.verdict == "ok" && di.detail == "bound to vfio-pci",
        "driver item {} `{}`",
        di.verdict,
        di.detail
    );

    // The access modes against the nodes the kernel made.
    let legacy = as_bool(&r, "modes.legacy.available")?;
    let cdev = as_bool(&r, "modes.cdev.available")?;
    let noiommu = as_bool(&r, "modes.noiommu.available")?;
    let exists = |p: &str| Path::new(p).exists();
    let want_legacy = exists("/dev/vfio/vfio") && exists(&format!("/dev/vfio/{g}"));
    let want_cdev = exists("/dev/iommu")
        && cdev_name(dev).is_some_and(|n| exists(&format!("/dev/vfio/devices/{n}")));
    let want_noiommu = exists(&format!("/dev/vfio/noiommu-{g}"));
    let modes_text = format!("legacy {legacy}, cdev {cdev}, no-IOMMU {noiommu}");
    ensure!(
        (legacy, cdev, noiommu) == (want_legacy, want_cdev, want_noiommu),
        "check says {modes_text}; the nodes say legacy {want_legacy}, cdev {want_cdev}, \
         no-IOMMU {want_noiommu}"
    );
    // A vfio-dev entry without a device number (a no-IOMMU device's) is no cdev at all: the
    // CLI must not name a node the kernel will never make.
    if let Some(n) = cdev_name(dev) {
        if !dev.sysfs.join("vfio-dev").join(&n).join("dev").exists() {
            let detail = as_str(&r, "modes.cdev.detail")?;
            ensure!(
                detail.contains("has no device number")
                    && as_array(&r, "modes.cdev.nodes")?.is_empty(),
                "vfio-dev/{n} has no `dev`, but check says cdev `{detail}`"
            );
        }
    }
    let by_mode = match ctx.mode {
        Mode::Legacy => legacy && !noiommu,
        Mode::Iommufd => legacy && cdev && !noiommu,
        Mode::NoIommu => noiommu && !legacy && !cdev,
    };
    ensure!(by_mode, "check says {modes_text} in a {} boot", ctx.mode);

    // BAR sizes against sysfs `resource`.
    let mut bars = Vec::new();
    for (i, size) in resources.iter().filter(|(i, _)| *i < 6) {
        let bi = item(&its, &format!("BAR{i}"))?;
        let seen = bar_item_size(bi.detail)
            .with_context(|| format!("BAR{i} item `{}` shows no size", bi.detail))?;
        ensure!(
            seen == *size,
            "BAR{i}: check says {seen:#x} bytes (`{}`), sysfs resource {size:#x}",
            bi.detail
        );
        bars.push(format!("BAR{i} {size:#x}"));
    }
    let extra: Vec<&str> = its
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| {
            n.strip_prefix("BAR")
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| !resources.iter().any(|(r, _)| *r == i))
        })
        .collect();
    ensure!(extra.is_empty(), "BAR items sysfs does not have: {extra:?}");
    let rom = item(&its, "ROM")?;
    let has_rom = resources.iter().any(|(i, _)| *i == 6);
    ensure!(
        rom.detail.starts_with("expansion ROM") == has_rom,
        "ROM item `{}`, sysfs has a ROM: {has_rom}",
        rom.detail
    );

    let warnings = if not_ok.is_empty() {
        String::new()
    } else {
        format!("; {}", not_ok.join("; "))
    };
    Ok(Outcome::Pass(format!(
        "exit {}, ready; group {g} viable; modes: {modes_text}; {}{warnings}",
        code.unwrap_or(-1),
        bars.join(", ")
    )))
}

// ---- inspect ----

/// What VFIO says about the device, read through our backend in this run's mode and closed
/// again: the sizes of regions 0..=6 and the MSI-X vector count.
fn vfio_facts(mode: Mode, dev: &Device) -> Result<([u64; 7], u32)> {
    let k = mode::open_kernel(mode, &dev.sysfs)?;
    let mut sizes = [0u64; 7];
    for (i, s) in (region::BAR0..=region::ROM).zip(sizes.iter_mut()) {
        *s = k
            .region_info(i)
            .with_context(|| format!("region {i} info"))?
            .size;
    }
    let msix = k.irq_info(irq::MSIX).context("MSI-X irq info")?.count;
    Ok((sizes, msix))
}

/// `vfio-passthrough inspect --device <BDF> --json`: the ids are sysfs's, each BAR's size is
/// the VFIO region's, no self-check step failed, and the MSI-X table size is the capability's.
/// In no-IOMMU mode the CLI refuses the device unless given `--noiommu`, and with it the DMA
/// steps are skipped by design.
pub fn inspect(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let cli = match binary(ctx) {
        Ok(p) => p,
        Err(skip) => return Ok(skip),
    };
    // In no-IOMMU mode the CLI refuses the device unless told --noiommu, and says so.
    let mut refusal = String::new();
    if ctx.mode == Mode::NoIommu {
        let run = run_cli(&cli, &["inspect", "--device", &dev.bdf, "--json"])?;
        ensure!(
            run.code() == Some(EXIT_ERROR),
            "inspect of a no-IOMMU device without --noiommu exited {} (stderr: {})",
            run.status,
            run.stderr.trim()
        );
        ensure!(
            run.stderr.contains("no-IOMMU group") && run.stderr.contains("--noiommu"),
            "the refusal does not name the no-IOMMU group and the --noiommu opt-in: {}",
            run.stderr.trim()
        );
        refusal = "refused without --noiommu; with it: ".to_string();
    }
    // What the kernel says, gathered (and every VFIO file closed) before the CLI runs.
    let (regions, vfio_msix) = vfio_facts(ctx.mode, dev)?;
    let cap_msix = sysfs_msix_vectors(dev)?;

    let mut args = vec!["inspect", "--device", &dev.bdf, "--json"];
    if ctx.mode == Mode::NoIommu {
        args.push("--noiommu");
    }
    let run = run_cli(&cli, &args)?;
    let r = run.json()?;
    let steps = as_array(&r, "self_check")?;
    let mut failed = Vec::new();
    let (mut ok, mut skipped) = (0, 0);
    for s in steps {
        let name = as_str(s, "name")?;
        match as_str(s, "status")? {
            "ok" => ok += 1,
            "skip" => skipped += 1,
            other => failed.push(format!("{name}: {other} {}", as_str(s, "detail")?)),
        }
    }
    ensure!(failed.is_empty(), "self-check: {}", failed.join("; "));
    if ctx.mode == Mode::NoIommu {
        // DMA is refused by design there: both DMA steps are skips that say why.
        for want in ["DMA map of guest RAM", "DMA round trip"] {
            let s = steps
                .iter()
                .find(|s| as_str(s, "name").ok() == Some(want))
                .with_context(|| format!("no `{want}` step"))?;
            ensure!(
                as_str(s, "status")? == "skip" && as_str(s, "detail")?.contains("no-IOMMU"),
                "`{want}` in no-IOMMU mode: {} `{}`, expected a skip naming no-IOMMU",
                as_str(s, "status")?,
                as_str(s, "detail")?
            );
        }
    }
    ensure!(
        run.code() == Some(0),
        "inspect exited {} (stderr: {})",
        run.status,
        run.stderr.trim()
    );
    ensure!(ok > 0, "no self-check step ran ({skipped} skipped)");
    ensure!(
        as_str(&r, "source.kind")? == "kernel",
        "source kind {}",
        as_str(&r, "source.kind")?
    );

    let vendor = as_u64(&r, "identity.vendor_id")?;
    let device = as_u64(&r, "identity.device_id")?;
    ensure!(
        (vendor, device) == (u64::from(dev.id.vendor), u64::from(dev.id.device)),
        "inspect says {vendor:04x}:{device:04x}, sysfs {}",
        dev.id
    );

    let mut bars = Vec::new();
    let mut seen = Vec::new();
    for b in as_array(&r, "bars")? {
        let i = usize::try_from(as_u64(b, "index")?)?;
        let size = as_u64(b, "region_size")?;
        let want = *regions
            .get(i)
            .with_context(|| format!("BAR index {i} out of range"))?;
        ensure!(
            size == want,
            "BAR{i}: inspect says region size {size:#x}, VFIO {want:#x}"
        );
        let guest = as_u64(b, "guest_size")?;
        let relocated = as_bool(b, "msix_relocated")?;
        ensure!(
            guest == size || (relocated && guest > size),
            "BAR{i}: guest size {guest:#x} differs from region size {size:#x} without MSI-X \
             relocation"
        );
        seen.push(i);
        bars.push(format!("BAR{i} {size:#x}"));
    }
    let unreported: Vec<usize> = (0..7)
        .filter(|i| regions[*i] > 0 && !seen.contains(i))
        .collect();
    ensure!(
        unreported.is_empty(),
        "VFIO regions {unreported:?} have a size but inspect shows no such BAR"
    );

    let msix = field(&r, "interrupts.msix")?;
    let vfio_counts = as_array(&r, "interrupts.vfio_counts")?;
    let counted_msix = vfio_counts.get(2).and_then(Value::as_u64);
    let msix_text = match cap_msix {
        Some(n) => {
            let v =
                as_u64(msix, "vectors").context("the device has MSI-X but inspect shows none")?;
            ensure!(
                v == u64::from(n),
                "inspect shows {v} MSI-X vectors, the capability's table size is {n}"
            );
            ensure!(
                counted_msix == Some(u64::from(n)) && vfio_msix == n,
                "VFIO MSI-X count: inspect {counted_msix:?}, ours {vfio_msix}, capability {n}"
            );
            format!("MSI-X {n} vectors")
        }
        None => {
            ensure!(
                msix.is_null(),
                "no MSI-X capability, but inspect shows {msix}"
            );
            "no MSI-X".to_string()
        }
    };
    Ok(Outcome::Pass(format!(
        "{refusal}{} {}; {}; {msix_text}; self-check {ok} ok, {skipped} skipped",
        dev.id,
        link_name(&dev.sysfs.join("driver"))?.unwrap_or_default(),
        bars.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_sizes_are_read_back_from_check_details() {
        assert_eq!(bar_item_size("64-bit memory, 16 KiB"), Some(16 << 10));
        assert_eq!(bar_item_size("32-bit memory, 1 MiB"), Some(1 << 20));
        assert_eq!(
            bar_item_size("I/O ports, 256 bytes (trapped by the VMM)"),
            Some(256)
        );
        assert_eq!(
            bar_item_size(
                "64-bit prefetchable memory, 128 GiB: larger than a 64 GiB 64-bit window"
            ),
            Some(128 << 30)
        );
        assert_eq!(
            bar_item_size("1.5 GiB, flags 0x0 (neither memory nor I/O)"),
            None
        );
    }

    #[test]
    fn json_paths_name_what_is_missing() {
        let v: Value = serde_json::from_str(r#"{"a":{"b":true,"n":3}}"#).unwrap();
        assert!(as_bool(&v, "a.b").unwrap());
        assert_eq!(as_u64(&v, "a.n").unwrap(), 3);
        let e = as_bool(&v, "a.c").unwrap_err().to_string();
        assert!(e.contains("`a.c`"), "{e}");
        let e = as_str(&v, "a.n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("`a.n` is not a string"), "{e}");
    }

    #[test]
    fn a_missing_binary_is_a_skip_that_says_so() {
        let ctx = Ctx {
            device: None,
            devices: &[],
            problems: &[],
            required: &[],
            mode: Mode::Legacy,
            cli: Path::new("/nonexistent/vfio-passthrough"),
        };
        match binary(&ctx) {
            Err(Outcome::Skip(why)) => {
                assert!(
                    why.contains("/nonexistent/vfio-passthrough does not exist"),
                    "{why}"
                )
            }
            _ => panic!("expected a skip"),
        }
    }

    #[test]
    fn this_test_process_holds_no_vfio_file() {
        assert!(vfio_fds_held().unwrap().is_empty());
    }
}
