//! The `check` preflight: each item is a function over the [`Host`] (read through its root
//! prefix) and the facts gathered once about the device. Nothing here writes anywhere.

use std::fmt::Write as _;
use std::io;

use anyhow::{bail, Context as _};
use serde::Serialize;

use pci_interrupts::MsixBarLocation;

use crate::sysfs::{self, cap_id, ConfigInfo, Host, Resource, ResourceKind, ROM_INDEX};

/// The outcome of one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Fine.
    Ok,
    /// Not checked (missing input, e.g. no `--guest-memory`); does not affect readiness.
    Skip,
    /// Works, with a caveat.
    Warning,
    /// Passthrough will fail or is unsafe until fixed.
    Problem,
}

impl Verdict {
    /// The tag printed at the start of a text line.
    pub fn tag(self) -> &'static str {
        match self {
            Verdict::Ok => "[ ok ]",
            Verdict::Skip => "[skip]",
            Verdict::Warning => "[warn]",
            Verdict::Problem => "[FAIL]",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Item {
    /// Short name of what was checked.
    pub name: String,
    /// The outcome.
    pub verdict: Verdict,
    /// What was found.
    pub detail: String,
    /// For warnings and problems: what to do, in one line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Item {
    fn new(name: impl Into<String>, verdict: Verdict, detail: impl Into<String>) -> Self {
        Item {
            name: name.into(),
            verdict,
            detail: detail.into(),
            fix: None,
        }
    }
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Ok, detail)
    }
    fn skip(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(name, Verdict::Skip, detail)
    }
    fn warn(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Verdict::Warning, detail).with_fix(fix)
    }
    fn problem(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(name, Verdict::Problem, detail).with_fix(fix)
    }
    fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

/// Whether one of the three ways of opening the device works on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModeState {
    /// All the pieces the mode needs are present.
    pub available: bool,
    /// Device nodes the VMM opens in this mode.
    pub nodes: Vec<String>,
    /// What is there, or what is missing.
    pub detail: String,
}

/// The access modes the host supports for this device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Modes {
    /// Legacy VFIO group + container (`/dev/vfio/vfio`, `/dev/vfio/<group>`).
    pub legacy: ModeState,
    /// iommufd + VFIO device cdev (`/dev/iommu`, `/dev/vfio/devices/vfioN`).
    pub cdev: ModeState,
    /// Unsafe no-IOMMU mode (`/dev/vfio/noiommu-<group>`): no DMA isolation.
    pub noiommu: ModeState,
}

/// Counts of each verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Items that are fine.
    pub ok: usize,
    /// Items not checked.
    pub skipped: usize,
    /// Items with a caveat.
    pub warnings: usize,
    /// Items that block passthrough.
    pub problems: usize,
}

/// The whole result of `check`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The device, as `DDDD:BB:DD.F`.
    pub device: String,
    /// `vendor:device` ids and class as sysfs gives them.
    pub identity: String,
    /// True when no item is a problem.
    pub ready: bool,
    /// Verdict counts.
    pub summary: Summary,
    /// Access modes the host offers for the device.
    pub modes: Modes,
    /// Whether and how the device can be live-migrated.
    pub migration: MigrationReport,
    /// The items, in check order.
    pub items: Vec<Item>,
}

/// What the device and its IOMMU domain say about migration, as a [`MigrationProbe`] found
/// it (through VFIO: `VFIO_DEVICE_FEATURE_MIGRATION`, the `DMA_LOGGING` probe, the domain's
/// dirty tracking).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationFacts {
    /// How the device was opened (`legacy`, `iommufd`, `noiommu`).
    pub opened_via: String,
    /// `VFIO_MIGRATION_*` flags; `None`: the device cannot migrate its state.
    pub flags: Option<u64>,
    /// The device logs the pages its DMA writes (`VFIO_DEVICE_FEATURE_DMA_LOGGING_START`).
    pub dma_logging: bool,
    /// Per access mode the device was opened in (`legacy`, `iommufd`, `noiommu`): the page
    /// sizes (bitmap: bit n is 2^n bytes) its IOMMU domain tracks dirty pages at, or why it
    /// cannot.
    pub domain_dirty: Vec<(String, Result<u64, String>)>,
}

/// Dirty tracking of the device's IOMMU domain in one access mode.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModeDirtyTracking {
    /// The access mode (`legacy`, `iommufd`, `noiommu`).
    pub mode: String,
    /// The domain tracks the pages the device writes.
    pub supported: bool,
    /// The page sizes, in bytes, it reports at.
    pub page_sizes: Vec<u64>,
    /// Why not, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The migration part of the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MigrationReport {
    /// The device was asked (false: skipped, see `detail`).
    pub checked: bool,
    /// The device can migrate its own state (VFIO migration v2, STOP_COPY).
    pub can_migrate: bool,
    /// The migration features it offers: `STOP_COPY`, `P2P`, `PRE_COPY`.
    pub features: Vec<String>,
    /// It logs its DMA writes itself (device dirty tracking).
    pub device_dma_logging: bool,
    /// Its IOMMU domain tracks the pages it writes, in at least one access mode.
    pub domain_dirty_tracking: bool,
    /// The page sizes, in bytes, that domain tracking reports at (of the first mode that
    /// tracks).
    pub dirty_page_sizes: Vec<u64>,
    /// Domain dirty tracking in each access mode the device was opened in.
    pub dirty_tracking_by_mode: Vec<ModeDirtyTracking>,
    /// How the device was opened to ask it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub opened_via: Option<String>,
    /// What was found, or why it was not checked.
    pub detail: String,
}

/// Asks a device about migration. The real one opens the device through VFIO (what a VMM
/// does; vfio-pci resets the function when it is opened); tests use a double.
pub trait MigrationProbe {
    /// The facts, or why they could not be had (the device is busy, not bound to vfio-pci,
    /// ...).
    fn probe(&self, dev: &Device, modes: &Modes) -> Result<MigrationFacts, String>;
}

/// The flag names of `VFIO_MIGRATION_*`, in uAPI order.
const MIGRATION_FLAG_NAMES: [(u64, &str); 3] = [(1, "STOP_COPY"), (2, "P2P"), (4, "PRE_COPY")];

/// The migration item and report from what the probe found. Migration is not needed for
/// passthrough: a device that cannot migrate is `ok` (said plainly), a probe that could not
/// ask is `skip`.
pub fn migration(facts: Result<MigrationFacts, String>) -> (Item, MigrationReport) {
    const NAME: &str = "migration";
    let f = match facts {
        Ok(f) => f,
        Err(why) => {
            let detail = format!("not checked: {why}");
            let report = MigrationReport {
                detail: detail.clone(),
                ..MigrationReport::default()
            };
            return (Item::skip(NAME, detail), report);
        }
    };
    let by_mode: Vec<ModeDirtyTracking> = f
        .domain_dirty
        .iter()
        .map(|(mode, r)| match r {
            Ok(bits) => {
                let page_sizes: Vec<u64> = (0..64)
                    .filter(|n| bits & (1u64 << n) != 0)
                    .map(|n| 1u64 << n)
                    .collect();
                ModeDirtyTracking {
                    mode: mode.clone(),
                    supported: !page_sizes.is_empty(),
                    reason: page_sizes
                        .is_empty()
                        .then(|| "the domain reports no page size".to_string()),
                    page_sizes,
                }
            }
            Err(why) => ModeDirtyTracking {
                mode: mode.clone(),
                supported: false,
                page_sizes: Vec::new(),
                reason: Some(why.clone()),
            },
        })
        .collect();
    let sizes: Vec<u64> = by_mode
        .iter()
        .find(|m| m.supported)
        .map(|m| m.page_sizes.clone())
        .unwrap_or_default();
    let dirty = if by_mode.is_empty() {
        "IOMMU domain dirty tracking not checked".to_string()
    } else {
        by_mode
            .iter()
            .map(|m| {
                if m.supported {
                    format!(
                        "{}: IOMMU domain dirty tracking at {}",
                        m.mode,
                        m.page_sizes
                            .iter()
                            .map(|&s| human_size(s))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    format!(
                        "{}: no IOMMU domain dirty tracking ({})",
                        m.mode,
                        m.reason.as_deref().unwrap_or("")
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    let logging = if f.dma_logging {
        "device DMA logging"
    } else {
        "no device DMA logging"
    };
    let mut report = MigrationReport {
        checked: true,
        device_dma_logging: f.dma_logging,
        domain_dirty_tracking: !sizes.is_empty(),
        dirty_page_sizes: sizes,
        dirty_tracking_by_mode: by_mode,
        opened_via: Some(f.opened_via.clone()),
        ..MigrationReport::default()
    };
    let detail = match f.flags {
        Some(flags) if flags & 1 != 0 => {
            report.can_migrate = true;
            report.features = MIGRATION_FLAG_NAMES
                .iter()
                .filter(|(bit, _)| flags & bit != 0)
                .map(|(_, n)| (*n).to_string())
                .collect();
            format!(
                "can migrate (VFIO migration v2: {}); {logging}; {dirty} (opened via {})",
                report.features.join(", "),
                f.opened_via
            )
        }
        Some(flags) => format!(
            "the device reports migration flags {flags:#x} without STOP_COPY, which every \
             migratable device has: treated as not migratable; {logging}; {dirty}"
        ),
        None => format!(
            "cannot migrate: the device offers no VFIO_DEVICE_FEATURE_MIGRATION (a VM with it \
             attached can only be saved or moved with the device detached); {logging}; {dirty} \
             (opened via {})",
            f.opened_via
        ),
    };
    report.detail = detail.clone();
    (Item::ok(NAME, detail), report)
}

/// Inputs of `check` beyond the device.
#[derive(Debug, Clone)]
pub struct Options {
    /// Guest memory size to compare with RLIMIT_MEMLOCK; `None` skips that item.
    pub guest_memory: Option<u64>,
    /// Size of the VMM's 32-bit MMIO window.
    pub mmio32_size: u64,
    /// Size of the VMM's 64-bit MMIO window.
    pub mmio64_size: u64,
}

/// Facts read once about the device.
#[derive(Debug)]
pub struct Device {
    /// `DDDD:BB:DD.F`.
    pub bdf: String,
    /// `/sys/bus/pci/devices/<bdf>` (host path, without the root prefix).
    pub dir: String,
    /// Bound driver, if any.
    pub driver: Option<String>,
    /// IOMMU group number, if any.
    pub group: Option<String>,
    /// Config space bytes, or why they could not be read.
    pub config: Result<Vec<u8>, String>,
    /// Parsed header and capabilities (empty when config could not be read).
    pub cfg: ConfigInfo,
    /// BAR and ROM resources, or why they could not be read.
    pub resources: Result<Vec<Resource>, String>,
}

/// Accepts `BB:DD.F` or `DDDD:BB:DD.F` (hex) and returns the canonical lower-case `DDDD:BB:DD.F`.
pub fn normalize_bdf(s: &str) -> anyhow::Result<String> {
    let usage = || {
        format!("{s:?} is not a PCI address: expected DDDD:BB:DD.F or BB:DD.F, e.g. 0000:01:00.0")
    };
    let s = s.trim().to_ascii_lowercase();
    let parts: Vec<&str> = s.split(':').collect();
    let (domain, bus, devfn) = match parts.as_slice() {
        [bus, devfn] => ("0000", *bus, *devfn),
        [domain, bus, devfn] => (*domain, *bus, *devfn),
        _ => bail!(usage()),
    };
    let Some((dev, func)) = devfn.split_once('.') else {
        bail!(usage());
    };
    let hex = |v: &str, min: usize, max: usize| {
        (min..=max).contains(&v.len()) && v.chars().all(|c| c.is_ascii_hexdigit())
    };
    if !hex(domain, 4, 8) || !hex(bus, 2, 2) || !hex(dev, 2, 2) || !hex(func, 1, 1) {
        bail!(usage());
    }
    let dev_n = u8::from_str_radix(dev, 16).map_err(|_| anyhow::anyhow!(usage()))?;
    let func_n = u8::from_str_radix(func, 16).map_err(|_| anyhow::anyhow!(usage()))?;
    if dev_n > 0x1f || func_n > 7 {
        bail!("{}: device must be 00..1f and function 0..7", usage());
    }
    Ok(format!("{domain}:{bus}:{dev}.{func}"))
}

/// Parses a size such as `4G`, `512MiB`, `1T`, `0x1000` or `65536` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a size: use e.g. 4G, 512M, 65536 or 0x10000");
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let num: u64 = num.parse().map_err(|_| bad())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(bad()),
    };
    num.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Renders a byte count for people: `64 KiB`, `1004 MiB`, `1.5 GiB`.
pub fn human_size(v: u64) -> String {
    const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
    for (name, shift) in UNITS {
        let unit = 1u64 << shift;
        if v >= unit {
            if v % unit == 0 {
                return format!("{} {name}", v / unit);
            }
            // Lossy on purpose: display only.
            #[allow(clippy::cast_precision_loss)]
            let f = v as f64 / unit as f64;
            return format!("{f:.1} {name}");
        }
    }
    format!("{v} bytes")
}

/// Reads the facts about `bdf` that the items share. Fails (exit status 2) only when the
/// device does not exist, naming the missing path.
pub fn gather(host: &Host, bdf: &str) -> anyhow::Result<Device> {
    let dir = format!("/sys/bus/pci/devices/{bdf}");
    if !host.is_dir(&dir) {
        bail!(
            "no PCI device {bdf}: {} does not exist (list devices with `lspci -D`)",
            host.path(&dir).display()
        );
    }
    let optional_link = |name: &str| -> anyhow::Result<Option<String>> {
        let abs = format!("{dir}/{name}");
        match host.link_name(&abs) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("reading the link {}", host.path(&abs).display()))
            }
        }
    };
    let driver = optional_link("driver")?;
    let group = optional_link("iommu_group")?;
    let config_path = format!("{dir}/config");
    let config = host
        .read_bytes(&config_path)
        .map_err(|e| format!("cannot read {}: {e}", host.path(&config_path).display()));
    let cfg = config
        .as_deref()
        .map(sysfs::parse_config)
        .unwrap_or_default();
    let res_path = format!("{dir}/resource");
    let resources = host
        .read_text(&res_path)
        .map_err(|e| format!("cannot read {}: {e}", host.path(&res_path).display()))
        .and_then(|t| {
            sysfs::parse_resource(&t)
                .map_err(|e| format!("{}: {e}", host.path(&res_path).display()))
        });
    Ok(Device {
        bdf: bdf.to_string(),
        dir,
        driver,
        group,
        config,
        cfg,
        resources,
    })
}

/// Runs every item. `step` is told the name of each step before it starts (for progress).
pub fn run(
    host: &Host,
    bdf: &str,
    opts: &Options,
    probe: &dyn MigrationProbe,
    step: &mut dyn FnMut(&str),
) -> anyhow::Result<Report> {
    step("reading the device");
    let dev = gather(host, bdf)?;
    let text = |n: &str| host.read_text(&format!("{}/{n}", dev.dir)).ok();
    let identity = format!(
        "[{}:{}] class {}",
        text("vendor")
            .as_deref()
            .unwrap_or("?")
            .trim_start_matches("0x"),
        text("device")
            .as_deref()
            .unwrap_or("?")
            .trim_start_matches("0x"),
        text("class").as_deref().unwrap_or("?"),
    );
    let mut items = Vec::new();
    step("IOMMU");
    items.push(iommu(host));
    step("IOMMU group");
    items.push(group_viability(host, &dev));
    step("driver");
    items.push(driver(host, &dev));
    step("access modes");
    let modes = modes(host, &dev);
    items.push(modes_item(&modes, &dev));
    step("device nodes");
    items.push(device_nodes(host, &modes));
    step("config space");
    items.push(config_space(&dev));
    step("reset methods");
    items.push(reset(host, &dev));
    step("BARs");
    items.extend(bars(&dev, opts));
    step("MSI-X");
    items.push(msix(host, &dev));
    step("ROM");
    items.push(rom(&dev));
    step("memlock");
    items.push(memlock(host, opts));
    step("migration");
    let (item, migration) = migration(probe.probe(&dev, &modes));
    items.push(item);

    let mut summary = Summary::default();
    for i in &items {
        match i.verdict {
            Verdict::Ok => summary.ok += 1,
            Verdict::Skip => summary.skipped += 1,
            Verdict::Warning => summary.warnings += 1,
            Verdict::Problem => summary.problems += 1,
        }
    }
    Ok(Report {
        device: dev.bdf,
        identity,
        ready: summary.problems == 0,
        summary,
        modes,
        migration,
        items,
    })
}

fn cmdline_has(cmdline: &str, word: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == word)
}

fn noiommu_enabled(host: &Host) -> bool {
    host.read_text("/sys/module/vfio/parameters/enable_unsafe_noiommu_mode")
        .map(|v| v == "Y" || v == "1")
        .unwrap_or(false)
}

/// IOMMU enabled: some IOMMU registered under /sys/class/iommu.
pub fn iommu(host: &Host) -> Item {
    const NAME: &str = "IOMMU";
    let units = host.list_dir("/sys/class/iommu").unwrap_or_default();
    let cmdline = host.read_text("/proc/cmdline").unwrap_or_default();
    if !units.is_empty() {
        let mut d = format!("enabled ({})", units.join(", "));
        if cmdline_has(&cmdline, "iommu=pt") {
            d.push_str("; host devices in pass-through mode (iommu=pt), fine for VFIO");
        }
        return Item::ok(NAME, d);
    }
    let off = ["intel_iommu=off", "amd_iommu=off", "iommu=off"]
        .into_iter()
        .find(|w| cmdline_has(&cmdline, w));
    let fix = if let Some(w) = off {
        format!("remove `{w}` from the kernel command line and reboot")
    } else if cmdline_has(&cmdline, "intel_iommu=on") || cmdline_has(&cmdline, "amd_iommu=on") {
        "the kernel asked for the IOMMU but none registered: enable VT-d / AMD-Vi (IOMMU) in the firmware setup".to_string()
    } else {
        "enable VT-d / AMD-Vi in the firmware setup and add intel_iommu=on (Intel) to the kernel command line, then reboot".to_string()
    };
    let detail = "no IOMMU registered (/sys/class/iommu is empty): no DMA isolation";
    if noiommu_enabled(host) {
        Item::warn(
            NAME,
            format!("{detail}; vfio's unsafe no-IOMMU mode is on"),
            fix,
        )
    } else {
        Item::problem(NAME, detail, fix)
    }
}

/// Drivers that keep an IOMMU group viable: the device is then not in use by the host.
fn driver_keeps_group_viable(driver: Option<&str>) -> bool {
    match driver {
        None => true,
        // pcieport is a driver_managed_dma driver; "*vfio*" covers vfio-pci and its variant drivers.
        Some(d) => d == "pci-stub" || d == "pcieport" || d.contains("vfio"),
    }
}

fn is_bridge(class: Option<&str>) -> bool {
    class
        .and_then(|c| u32::from_str_radix(c.trim_start_matches("0x"), 16).ok())
        .is_some_and(|c| matches!(c >> 8, 0x0604 | 0x0609))
}

/// The device's IOMMU group and whether it is viable.
pub fn group_viability(host: &Host, dev: &Device) -> Item {
    const NAME: &str = "IOMMU group";
    let Some(group) = &dev.group else {
        let fix = if noiommu_enabled(host) {
            "bind the device to vfio-pci: in no-IOMMU mode vfio creates the group then (see driver)"
        } else {
            "enable the IOMMU (see IOMMU); without it the device has no group"
        };
        return Item::problem(NAME, format!("{}/iommu_group does not exist", dev.dir), fix);
    };
    let gdir = format!("/sys/kernel/iommu_groups/{group}/devices");
    let members = match host.list_dir(&gdir) {
        Ok(m) => m,
        Err(e) => {
            return Item::problem(
                NAME,
                format!(
                    "group {group}: cannot list {}: {e}",
                    host.path(&gdir).display()
                ),
                "check that sysfs is mounted and readable",
            )
        }
    };
    let mut blockers = Vec::new();
    let mut others = Vec::new();
    let mut bridges = Vec::new();
    for m in members.iter().filter(|m| **m != dev.bdf) {
        let class = host.read_text(&format!("{gdir}/{m}/class")).ok();
        let drv = host.link_name(&format!("{gdir}/{m}/driver")).ok();
        if is_bridge(class.as_deref()) {
            bridges.push(m.clone());
        } else if driver_keeps_group_viable(drv.as_deref()) {
            others.push(format!("{m} ({})", drv.as_deref().unwrap_or("no driver")));
        } else {
            blockers.push((m.clone(), drv.unwrap_or_default()));
        }
    }
    let mut detail = format!("group {group}: {} device(s)", members.len());
    if !bridges.is_empty() {
        let _ = write!(detail, "; bridges ignored: {}", bridges.join(", "));
    }
    if let Some((m, drv)) = blockers.first() {
        let list: Vec<String> = blockers
            .iter()
            .map(|(m, d)| format!("{m} is bound to {d}"))
            .collect();
        let _ = write!(detail, "; not viable: {}", list.join(", "));
        return Item::problem(
            NAME,
            detail,
            format!(
                "unbind {m} from {drv} (echo {m} > /sys/bus/pci/devices/{m}/driver/unbind) or bind it to vfio-pci too; every endpoint of the group goes to the same guest"
            ),
        );
    }
    if !others.is_empty() {
        let _ = write!(
            detail,
            "; viable; also in the group (same guest or none): {}",
            others.join(", ")
        );
    } else {
        detail.push_str("; viable");
    }
    Item::ok(NAME, detail)
}

/// The current driver: vfio-pci (or a vfio variant driver) is what passthrough needs.
pub fn driver(host: &Host, dev: &Device) -> Item {
    const NAME: &str = "driver";
    let bdf = &dev.bdf;
    let modprobe = if host.is_dir("/sys/bus/pci/drivers/vfio-pci") {
        ""
    } else {
        "modprobe vfio-pci && "
    };
    match dev.driver.as_deref() {
        Some(d) if d.contains("vfio") => Item::ok(NAME, format!("bound to {d}")),
        None => Item::problem(
            NAME,
            "not bound to any driver",
            format!(
                "{modprobe}echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override && echo {bdf} > /sys/bus/pci/drivers_probe"
            ),
        ),
        Some(d) => Item::problem(
            NAME,
            format!("bound to {d}, so the host owns it"),
            format!(
                "{modprobe}echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override && echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind && echo {bdf} > /sys/bus/pci/drivers_probe"
            ),
        ),
    }
}

/// Which of legacy group/container, iommufd + cdev and no-IOMMU the host offers for the device.
pub fn modes(host: &Host, dev: &Device) -> Modes {
    let missing = |paths: &[String]| -> Vec<String> {
        paths.iter().filter(|p| !host.exists(p)).cloned().collect()
    };
    let state = |nodes: Vec<String>, extra_missing: Option<String>, ok_detail: String| {
        let mut gone = missing(&nodes);
        if let Some(m) = extra_missing {
            gone.insert(0, m);
        }
        if gone.is_empty() {
            ModeState {
                available: true,
                nodes,
                detail: ok_detail,
            }
        } else {
            ModeState {
                available: false,
                nodes,
                detail: format!("missing {}", gone.join(", ")),
            }
        }
    };
    let group = dev.group.as_deref();
    let noiommu_group = group.is_some_and(|g| sysfs::is_noiommu_group(&host.root, g));

    let legacy = match group {
        Some(_) if noiommu_group => ModeState {
            available: false,
            nodes: Vec::new(),
            detail: "the group is a no-IOMMU group".into(),
        },
        Some(g) => state(
            vec!["/dev/vfio/vfio".into(), format!("/dev/vfio/{g}")],
            None,
            format!("/dev/vfio/vfio + /dev/vfio/{g}"),
        ),
        None => ModeState {
            available: false,
            nodes: Vec::new(),
            detail: "no IOMMU group".into(),
        },
    };

    let vfio_dev = format!("{}/vfio-dev", dev.dir);
    let cdev_name = host
        .list_dir(&vfio_dev)
        .unwrap_or_default()
        .into_iter()
        .find(|n| n.starts_with("vfio"));
    let cdev = match cdev_name {
        // The kernel lists every vfio device in vfio-dev/, but only one with a cdev has a
        // device number (`dev`); a no-IOMMU device has none, and no /dev/vfio/devices node
        // will ever appear for it.
        Some(n) if !host.exists(&format!("{vfio_dev}/{n}/dev")) => ModeState {
            available: false,
            nodes: Vec::new(),
            detail: format!(
                "{vfio_dev}/{n} has no device number: the kernel gives this device no cdev{}",
                if noiommu_group {
                    " (a no-IOMMU device)"
                } else {
                    ""
                }
            ),
        },
        Some(n) => {
            let node = format!("/dev/vfio/devices/{n}");
            state(
                vec!["/dev/iommu".into(), node.clone()],
                None,
                format!("/dev/iommu + {node}"),
            )
        }
        None => ModeState {
            available: false,
            nodes: Vec::new(),
            detail: format!(
                "no vfioN in {}/vfio-dev: kernel without VFIO_DEVICE_CDEV, or not on vfio-pci",
                dev.dir
            ),
        },
    };

    let noiommu = match group {
        Some(g) if noiommu_group => state(
            vec!["/dev/vfio/vfio".into(), format!("/dev/vfio/noiommu-{g}")],
            (!noiommu_enabled(host)).then(|| "enable_unsafe_noiommu_mode=Y".to_string()),
            format!("/dev/vfio/vfio + /dev/vfio/noiommu-{g}; needs CAP_SYS_RAWIO"),
        ),
        _ => ModeState {
            available: false,
            nodes: Vec::new(),
            detail: if noiommu_enabled(host) {
                "enabled, but the device's group is not a no-IOMMU group".into()
            } else {
                "vfio enable_unsafe_noiommu_mode is not Y".into()
            },
        },
    };
    Modes {
        legacy,
        cdev,
        noiommu,
    }
}

fn modes_item(m: &Modes, dev: &Device) -> Item {
    const NAME: &str = "access modes";
    let yes_no = |s: &ModeState| {
        if s.available {
            format!("yes ({})", s.detail)
        } else {
            format!("no ({})", s.detail)
        }
    };
    let detail = format!(
        "legacy group/container: {}; iommufd + vfio cdev: {}; no-IOMMU: {}",
        yes_no(&m.legacy),
        yes_no(&m.cdev),
        yes_no(&m.noiommu)
    );
    if m.legacy.available || m.cdev.available {
        Item::ok(NAME, detail)
    } else if m.noiommu.available {
        Item::warn(
            NAME,
            format!("{detail}; no-IOMMU mode gives up DMA isolation: the device can read and write all host memory"),
            "use only with a trusted device and guest; enable the IOMMU for isolation (see IOMMU)",
        )
    } else {
        let fix = if !dev.driver.as_deref().is_some_and(|d| d.contains("vfio")) {
            "bind the device to vfio-pci first (see driver)"
        } else if dev.group.is_none() {
            "enable the IOMMU (see IOMMU)"
        } else {
            "modprobe vfio (and check that devtmpfs/udev create /dev/vfio nodes)"
        };
        Item::problem(NAME, detail, fix)
    }
}

/// /dev/vfio permissions: the VMM's user can open every node of at least one available mode.
pub fn device_nodes(host: &Host, m: &Modes) -> Item {
    const NAME: &str = "device nodes";
    let uid = host.user.uid;
    let mut usable = Vec::new();
    let mut blocked: Vec<(String, String)> = Vec::new();
    for (label, s) in [
        ("legacy", &m.legacy),
        ("cdev", &m.cdev),
        ("no-IOMMU", &m.noiommu),
    ] {
        if !s.available {
            continue;
        }
        let mut all = true;
        for node in &s.nodes {
            match host.metadata(node) {
                Ok(meta) if host.user.can_read_write(&meta) => {}
                Ok(meta) => {
                    use std::os::unix::fs::MetadataExt;
                    all = false;
                    blocked.push((
                        node.clone(),
                        format!(
                            "{node} (mode {:o}, owner {}:{})",
                            meta.mode() & 0o7777,
                            meta.uid(),
                            meta.gid()
                        ),
                    ));
                }
                Err(e) => {
                    all = false;
                    blocked.push((node.clone(), format!("{node} ({e})")));
                }
            }
        }
        if all {
            usable.push(format!("{label}: {}", s.nodes.join(", ")));
        }
    }
    if usable.is_empty() && blocked.is_empty() {
        return Item::skip(
            NAME,
            "no VFIO device node exists for this device (see access modes)",
        );
    }
    if !usable.is_empty() {
        let mut d = format!("uid {uid} can open {}", usable.join("; "));
        if !blocked.is_empty() {
            let list: Vec<&str> = blocked.iter().map(|b| b.1.as_str()).collect();
            let _ = write!(d, "; but not {}", list.join(", "));
        }
        return Item::ok(NAME, d);
    }
    let list: Vec<&str> = blocked.iter().map(|b| b.1.as_str()).collect();
    let chown: Vec<String> = blocked
        .iter()
        .map(|b| format!("chown {uid} {}", b.0))
        .collect();
    Item::problem(
        NAME,
        format!("uid {uid} cannot read and write {}", list.join(", ")),
        format!(
            "{} (make it last with a udev rule, e.g. SUBSYSTEM==\"vfio\", OWNER=\"<vmm user>\"), or run the VMM as a user that can",
            chown.join(" && ")
        ),
    )
}

fn cap_name(id: u8) -> String {
    match id {
        cap_id::POWER_MANAGEMENT => "PM".into(),
        cap_id::MSI => "MSI".into(),
        cap_id::PCI_EXPRESS => "PCIe".into(),
        cap_id::MSIX => "MSI-X".into(),
        cap_id::ADVANCED_FEATURES => "AF".into(),
        0x09 => "vendor".into(),
        other => format!("{other:#04x}"),
    }
}

/// Whether the capability list was fully read (all 256 bytes, no broken link).
fn caps_complete(dev: &Device) -> bool {
    dev.config.is_ok() && dev.cfg.len >= 0x100 && dev.cfg.cap_error.is_none()
}

/// Config space: readable, type-0 header, capability list intact.
pub fn config_space(dev: &Device) -> Item {
    const NAME: &str = "config space";
    let err = match &dev.config {
        Ok(_) => None,
        Err(e) => Some(e.clone()),
    };
    if let Some(e) = err {
        return Item::warn(
            NAME,
            e,
            "run check as root to read the device's config space",
        );
    }
    if dev.cfg.header_type != 0 {
        return Item::problem(
            NAME,
            format!(
                "header type {} (a bridge): vfio-pci only takes type-0 functions",
                dev.cfg.header_type
            ),
            "pass through the endpoints behind the bridge instead",
        );
    }
    let names: Vec<String> = dev.cfg.caps.iter().map(|c| cap_name(c.id)).collect();
    let found = if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    };
    if let Some(e) = &dev.cfg.cap_error {
        if dev.cfg.len < 0x100 {
            return Item::warn(
                NAME,
                format!(
                    "only {} bytes readable ({e}); capabilities seen: {found}",
                    dev.cfg.len
                ),
                "run check as root: unprivileged reads of config stop after the header",
            );
        }
        return Item::warn(
            NAME,
            format!("capability list is broken: {e}; capabilities before the break: {found}"),
            "the device reports a malformed capability list; the guest sees only what precedes the break (try a firmware update)",
        );
    }
    Item::ok(NAME, format!("type-0 header; capabilities: {found}"))
}

/// Reset methods: the kernel's `reset_method` list, else what the config space advertises.
pub fn reset(host: &Host, dev: &Device) -> Item {
    const NAME: &str = "reset";
    let no_reset_fix = "expect device state to survive between guests; put the device alone on its bus so a bus reset works, or use a device with FLR";
    let path = format!("{}/reset_method", dev.dir);
    if let Ok(methods) = host.read_text(&path) {
        let list: Vec<&str> = methods.split_whitespace().collect();
        if list.is_empty() {
            return Item::warn(
                NAME,
                "the kernel knows no reset method (reset_method is empty)",
                no_reset_fix,
            );
        }
        let mut d = format!("kernel reset methods: {}", list.join(", "));
        if list.iter().all(|m| *m == "bus") {
            d.push_str(" (a bus reset also resets the other functions on that bus)");
        }
        return Item::ok(NAME, d);
    }
    if !caps_complete(dev) {
        return Item::skip(
            NAME,
            format!(
                "{} is absent and the capability list could not be read in full",
                host.path(&path).display()
            ),
        );
    }
    let cfg = dev.config.as_deref().unwrap_or(&[]);
    let mut found = Vec::new();
    if dev
        .cfg
        .find(cap_id::PCI_EXPRESS)
        .and_then(|o| sysfs::pcie_flr(cfg, o))
        == Some(true)
    {
        found.push("flr (PCIe)");
    }
    if dev
        .cfg
        .find(cap_id::ADVANCED_FEATURES)
        .and_then(|o| sysfs::af_flr(cfg, o))
        == Some(true)
    {
        found.push("af_flr");
    }
    if dev
        .cfg
        .find(cap_id::POWER_MANAGEMENT)
        .and_then(|o| sysfs::pm_no_soft_reset(cfg, o))
        == Some(false)
    {
        found.push("pm (D3hot->D0)");
    }
    if found.is_empty() {
        Item::warn(
            NAME,
            "no FLR and no PM reset (No_Soft_Reset set or no PM capability); only a bus reset might work (older kernel: no reset_method file to ask)",
            no_reset_fix,
        )
    } else {
        Item::ok(
            NAME,
            format!(
                "from config space: {} (older kernel: no reset_method file)",
                found.join(", ")
            ),
        )
    }
}

/// BAR sizes against the VMM's 32- and 64-bit windows; unassigned BARs.
pub fn bars(dev: &Device, opts: &Options) -> Vec<Item> {
    let res = match &dev.resources {
        Ok(r) => r,
        Err(e) => {
            return vec![Item::warn(
                "BARs",
                e.clone(),
                "run check as root or check that sysfs is mounted",
            )]
        }
    };
    let mut items = Vec::new();
    let mut total32: u64 = 0;
    for r in res.iter().filter(|r| r.index < ROM_INDEX) {
        let name = format!("BAR{}", r.index);
        let size = human_size(r.size);
        let pf = if r.prefetchable() {
            " prefetchable"
        } else {
            ""
        };
        let item = if r.unassigned() {
            Item::problem(
                name,
                format!("{size}: the host left it without an address"),
                "boot with pci=realloc, and enable \"Above 4G decoding\" in the firmware for large BARs",
            )
        } else {
            match r.kind() {
                Some(ResourceKind::Io) => {
                    Item::ok(name, format!("I/O ports, {size} (trapped by the VMM)"))
                }
                Some(ResourceKind::Mem32) => {
                    total32 = total32.saturating_add(r.size);
                    if r.size > opts.mmio32_size {
                        Item::problem(
                            name,
                            format!("32-bit{pf} memory, {size}: larger than the VMM's 32-bit window ({})", human_size(opts.mmio32_size)),
                            "a 32-bit BAR must sit below 4 GiB: enlarge the VMM's 32-bit MMIO window (check with --mmio32-size) or use a device mode with 64-bit BARs",
                        )
                    } else {
                        Item::ok(name, format!("32-bit{pf} memory, {size}"))
                    }
                }
                Some(ResourceKind::Mem64) => {
                    if r.size > opts.mmio64_size {
                        Item::warn(
                            name,
                            format!("64-bit{pf} memory, {size}: larger than a {} 64-bit window", human_size(opts.mmio64_size)),
                            format!("give the VMM a 64-bit MMIO window of at least {size} (and the guest enough physical address bits)"),
                        )
                    } else {
                        Item::ok(name, format!("64-bit{pf} memory, {size}"))
                    }
                }
                None => Item::ok(
                    name,
                    format!("{size}, flags {:#x} (neither memory nor I/O)", r.flags),
                ),
            }
        };
        items.push(item);
    }
    let count32 = res
        .iter()
        .filter(|r| r.index < ROM_INDEX && r.kind() == Some(ResourceKind::Mem32))
        .count();
    if count32 > 1
        && total32 > opts.mmio32_size
        && items.iter().all(|i| i.verdict != Verdict::Problem)
    {
        items.push(Item::problem(
            "32-bit BARs",
            format!(
                "together {}: more than the VMM's 32-bit window ({})",
                human_size(total32),
                human_size(opts.mmio32_size)
            ),
            "enlarge the VMM's 32-bit MMIO window (check with --mmio32-size)",
        ));
    }
    if items.is_empty() {
        items.push(Item::ok("BARs", "the device has no BARs"));
    }
    items
}

/// 4 KiB, the granule the PCI spec keeps MSI-X structures apart from other registers in.
const SPEC_GRANULE: u64 = 4096;

fn align_down(v: u64, a: u64) -> u64 {
    v - v % a
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| align_down(x, a))
}

/// For one BAR holding MSI-X structures `structs` (offset, size): the 4 KiB-aligned ranges that
/// lie in host pages touched by the structures but outside the structures' own 4 KiB ranges
/// (the spec keeps other registers out of those only), merged and in address order.
fn page_sharing(structs: &[(u64, u64)], bar_size: u64, page: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    if page <= SPEC_GRANULE || page % SPEC_GRANULE != 0 {
        return out;
    }
    let own = |chunk: u64| {
        structs.iter().any(|&(o, s)| {
            let lo = align_down(o, SPEC_GRANULE);
            let hi = align_up(o.saturating_add(s), SPEC_GRANULE).unwrap_or(u64::MAX);
            chunk >= lo && chunk < hi
        })
    };
    let mut chunks = std::collections::BTreeSet::new();
    for &(o, s) in structs {
        let lo = align_down(o, page);
        let hi = align_up(o.saturating_add(s), page)
            .unwrap_or(u64::MAX)
            .min(bar_size);
        // Bounded: (structure size + two pages) / 4 KiB iterations at most.
        let mut chunk = lo;
        while chunk < hi {
            if !own(chunk) {
                chunks.insert(chunk);
            }
            chunk += SPEC_GRANULE;
        }
    }
    for c in chunks {
        match out.last_mut() {
            Some(last) if last.1 == c => last.1 = c + SPEC_GRANULE,
            _ => out.push((c, c + SPEC_GRANULE)),
        }
    }
    out
}

/// MSI-X table and PBA: inside their BARs, not overlapping, and alone in their host pages.
pub fn msix(host: &Host, dev: &Device) -> Item {
    const NAME: &str = "MSI-X";
    let Ok(cfg) = dev.config.as_deref() else {
        return Item::skip(NAME, "config space not readable (see config space)");
    };
    let Some(off) = dev.cfg.find(cap_id::MSIX) else {
        if caps_complete(dev) {
            return Item::ok(NAME, "no MSI-X capability (MSI or INTx only)");
        }
        return Item::skip(
            NAME,
            "capability list not fully readable (see config space)",
        );
    };
    // The capability ID is MSI-X (that is how it was found): what the decode can refuse once
    // all 12 bytes are there is a reserved BAR indicator (6 or 7).
    let m = match sysfs::msix_layout(cfg, off) {
        None => {
            return Item::warn(
                NAME,
                format!("MSI-X capability at {off:#04x} is cut short"),
                "run check as root to read the whole config space",
            );
        }
        Some(Ok(m)) => m,
        Some(Err(e)) => {
            return Item::problem(
                NAME,
                format!("MSI-X capability at {off:#04x} is unusable ({e}): a VMM cannot place its table and PBA, so the guest gets no MSI-X"),
                "the device's MSI-X capability names a reserved BAR: a device or firmware bug; use MSI or INTx in the guest",
            );
        }
    };
    let res: &[Resource] = dev.resources.as_deref().unwrap_or(&[]);
    let bar_of = |bir: u8| {
        res.iter()
            .find(|r| r.index == usize::from(bir) && r.index < ROM_INDEX)
            .filter(|r| r.kind().is_some_and(|k| k != ResourceKind::Io))
    };
    // (BAR, offset, size in bytes) of the table or PBA.
    let place = |l: MsixBarLocation| (l.bir, u64::from(l.offset), u64::from(l.size));
    let (table, pba) = (place(m.table), place(m.pba));
    let what = format!(
        "{} vectors; table BAR{} +{:#x}, PBA BAR{} +{:#x}",
        m.vectors, table.0, table.1, pba.0, pba.1
    );
    let vendor_bug = "the device's MSI-X capability does not match its BARs: a device or firmware bug; use MSI or INTx in the guest";
    for (label, (bir, o, s)) in [("table", table), ("PBA", pba)] {
        let Some(bar) = bar_of(bir) else {
            return Item::problem(
                NAME,
                format!("{what}: the {label} is in BAR{bir}, which is not a memory BAR"),
                vendor_bug,
            );
        };
        if o.checked_add(s).is_none_or(|end| end > bar.size) {
            return Item::problem(
                NAME,
                format!(
                    "{what}: the {label} ({s} bytes) runs past the end of BAR{bir} ({})",
                    human_size(bar.size)
                ),
                vendor_bug,
            );
        }
    }
    if table.0 == pba.0
        && table.1 < pba.1.saturating_add(pba.2)
        && pba.1 < table.1.saturating_add(table.2)
    {
        return Item::problem(NAME, format!("{what}: table and PBA overlap"), vendor_bug);
    }
    let page = host.page_size;
    let mut bars_with = vec![table.0];
    if pba.0 != table.0 {
        bars_with.push(pba.0);
    }
    for bir in bars_with {
        let structs: Vec<(u64, u64)> = [table, pba]
            .into_iter()
            .filter(|s| s.0 == bir)
            .map(|s| (s.1, s.2))
            .collect();
        let bar_size = bar_of(bir).map(|b| b.size).unwrap_or(0);
        let shared = page_sharing(&structs, bar_size, page);
        if !shared.is_empty() {
            let ranges: Vec<String> = shared
                .iter()
                .map(|(lo, hi)| format!("{lo:#x}..{hi:#x}"))
                .collect();
            return Item::warn(
                NAME,
                format!(
                    "{what}: with {} host pages, the MSI-X page(s) of BAR{bir} also cover {}, where other registers may live; the VMM traps that whole page, so those registers are slow to reach",
                    human_size(page),
                    ranges.join(", ")
                ),
                "nothing to change on the host; expect slower access to those registers (or run a 4 KiB-page host kernel)",
            );
        }
    }
    Item::ok(
        NAME,
        format!("{what}; alone in their {} pages", human_size(page)),
    )
}

/// Expansion ROM: present or not (it is not read: reading needs enabling it, a change).
pub fn rom(dev: &Device) -> Item {
    const NAME: &str = "ROM";
    let rom = dev
        .resources
        .as_deref()
        .ok()
        .and_then(|r| r.iter().find(|r| r.index == ROM_INDEX));
    match rom {
        Some(r) => Item::ok(
            NAME,
            format!(
                "expansion ROM of {} (not read: that would need enabling it)",
                human_size(r.size)
            ),
        ),
        None if dev.resources.is_ok() => Item::ok(NAME, "no expansion ROM"),
        None => Item::skip(NAME, "resource file not readable (see BARs)"),
    }
}

/// RLIMIT_MEMLOCK against the guest's memory: all of guest RAM is pinned for DMA.
pub fn memlock(host: &Host, opts: &Options) -> Item {
    const NAME: &str = "memlock";
    let limit = host
        .memlock
        .map_or_else(|| "unlimited".to_string(), human_size);
    let Some(guest) = opts.guest_memory else {
        return Item::skip(
            NAME,
            format!("RLIMIT_MEMLOCK is {limit}; give --guest-memory SIZE to compare it with the guest's RAM"),
        );
    };
    match host.memlock {
        None => Item::ok(
            NAME,
            format!(
                "RLIMIT_MEMLOCK unlimited, guest memory {}",
                human_size(guest)
            ),
        ),
        Some(l) if l >= guest => Item::ok(
            NAME,
            format!(
                "RLIMIT_MEMLOCK {limit} covers guest memory {}",
                human_size(guest)
            ),
        ),
        Some(_) => {
            let kib = guest.div_ceil(1024);
            let fix = format!(
                "ulimit -l {kib} (or unlimited) in the VMM's shell; LimitMEMLOCK={guest} in its systemd unit; or a memlock line in /etc/security/limits.conf"
            );
            let detail = format!(
                "RLIMIT_MEMLOCK {limit} is below guest memory {}: DMA mapping pins all guest RAM",
                human_size(guest)
            );
            if host.user.uid == 0 {
                Item::warn(
                    NAME,
                    format!("{detail}; root passes only while it keeps CAP_IPC_LOCK"),
                    fix,
                )
            } else {
                Item::problem(NAME, detail, fix)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(flags: Option<u64>, dma_logging: bool, dirty: Result<u64, String>) -> MigrationFacts {
        MigrationFacts {
            opened_via: "legacy".into(),
            flags,
            dma_logging,
            domain_dirty: vec![("legacy".into(), dirty)],
        }
    }

    #[test]
    fn dirty_tracking_is_reported_per_access_mode() {
        // type1 tracks at 4 KiB, the iommufd IOAS does not: both named, the sizes are type1's.
        let mut f = facts(None, false, Ok(0x1000));
        f.domain_dirty.push((
            "iommufd".into(),
            Err("no IOMMU_HW_CAP_DIRTY_TRACKING".into()),
        ));
        let (item, r) = migration(Ok(f));
        assert!(r.domain_dirty_tracking);
        assert_eq!(r.dirty_page_sizes, [4096]);
        assert_eq!(r.dirty_tracking_by_mode.len(), 2);
        assert!(r.dirty_tracking_by_mode[0].supported);
        assert!(!r.dirty_tracking_by_mode[1].supported);
        assert!(
            item.detail
                .contains("legacy: IOMMU domain dirty tracking at 4 KiB"),
            "{}",
            item.detail
        );
        assert!(
            item.detail.contains(
                "iommufd: no IOMMU domain dirty tracking (no IOMMU_HW_CAP_DIRTY_TRACKING)"
            ),
            "{}",
            item.detail
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["dirty_tracking_by_mode"][1]["mode"], "iommufd");
        assert_eq!(json["dirty_tracking_by_mode"][1]["supported"], false);
    }

    #[test]
    fn a_migratable_device_lists_its_features_logging_and_dirty_page_sizes() {
        // mtty: STOP_COPY | P2P | PRE_COPY, a DMA log, type1 tracking at 4 KiB.
        let (item, r) = migration(Ok(facts(Some(7), true, Ok(0x1000))));
        assert_eq!(item.verdict, Verdict::Ok);
        assert!(r.checked && r.can_migrate);
        assert_eq!(r.features, ["STOP_COPY", "P2P", "PRE_COPY"]);
        assert!(r.device_dma_logging && r.domain_dirty_tracking);
        assert_eq!(r.dirty_page_sizes, [4096]);
        assert!(
            item.detail.contains("STOP_COPY, P2P, PRE_COPY"),
            "{}",
            item.detail
        );
        assert!(
            item.detail.contains("device DMA logging"),
            "{}",
            item.detail
        );
        assert!(item.detail.contains("at 4 KiB"), "{}", item.detail);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(
            json["features"],
            serde_json::json!(["STOP_COPY", "P2P", "PRE_COPY"])
        );
        assert_eq!(json["dirty_page_sizes"], serde_json::json!([4096]));
        assert_eq!(json["opened_via"], "legacy");
    }

    #[test]
    fn stop_copy_alone_is_migratable_without_the_optional_states() {
        let (_, r) = migration(Ok(facts(Some(1), false, Ok(0x1000 | 0x20_0000))));
        assert!(r.can_migrate);
        assert_eq!(r.features, ["STOP_COPY"]);
        assert!(!r.device_dma_logging);
        assert_eq!(r.dirty_page_sizes, [0x1000, 0x20_0000]);
    }

    #[test]
    fn a_device_without_migration_is_ok_but_says_it_cannot_migrate_and_why_domain_cannot_track() {
        let (item, r) = migration(Ok(facts(
            None,
            false,
            Err("IOAS dirty tracking not implemented".into()),
        )));
        assert_eq!(item.verdict, Verdict::Ok);
        assert!(r.checked && !r.can_migrate && r.features.is_empty());
        assert!(!r.domain_dirty_tracking && r.dirty_page_sizes.is_empty());
        assert!(item.detail.contains("cannot migrate"), "{}", item.detail);
        assert!(
            item.detail.contains("IOAS dirty tracking not implemented"),
            "{}",
            item.detail
        );
        // Flags without STOP_COPY break the uAPI's rule: not migratable.
        let (_, r) = migration(Ok(facts(Some(2), false, Ok(0))));
        assert!(!r.can_migrate);
    }

    #[test]
    fn a_probe_that_could_not_ask_is_a_skip_with_its_reason() {
        let (item, r) = migration(Err("group busy (EBUSY): a VMM has it open".into()));
        assert_eq!(item.verdict, Verdict::Skip);
        assert!(!r.checked && !r.can_migrate);
        assert!(item.detail.contains("EBUSY"), "{}", item.detail);
        assert_eq!(r.detail, item.detail);
    }

    #[test]
    fn short_bdf_gets_domain_zero_and_case_is_folded() {
        assert_eq!(normalize_bdf("01:00.0").unwrap(), "0000:01:00.0");
        assert_eq!(normalize_bdf("0000:AF:1F.7").unwrap(), "0000:af:1f.7");
        assert_eq!(normalize_bdf("10000:00:02.0").unwrap(), "10000:00:02.0");
    }

    #[test]
    fn bdf_with_device_over_31_or_function_over_7_is_refused() {
        for bad in ["0000:00:20.0", "0000:00:00.8"] {
            let e = format!("{:#}", normalize_bdf(bad).unwrap_err());
            assert!(
                e.contains("is not a PCI address") && e.contains("device must be 00..1f"),
                "{bad}: {e}"
            );
        }
        for bad in ["eth0", "0000:00:00"] {
            let e = format!("{:#}", normalize_bdf(bad).unwrap_err());
            assert!(e.contains("is not a PCI address"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("65536"), Ok(65536));
        let e = parse_size("4Q").unwrap_err();
        assert!(e.contains("is not a size"), "{e}");
        let e = parse_size("99999999999T").unwrap_err();
        assert!(e.contains("is too large"), "{e}");
    }

    #[test]
    fn human_size_is_exact_when_it_can_be() {
        assert_eq!(human_size(0xFEC0_0000 - 0xC000_0000), "1004 MiB");
        assert_eq!(human_size(64 << 10), "64 KiB");
        assert_eq!(human_size(3 << 29), "1.5 GiB");
        assert_eq!(human_size(100), "100 bytes");
    }

    #[test]
    fn on_4k_pages_spec_conformant_msix_never_shares() {
        assert_eq!(page_sharing(&[(0x2000, 0x100)], 0x10000, 4096), vec![]);
    }

    #[test]
    fn on_64k_pages_the_rest_of_the_64k_page_is_reported() {
        assert_eq!(
            page_sharing(&[(0x2000, 0x100), (0x3000, 8)], 0x10000, 0x10000),
            vec![(0, 0x2000), (0x4000, 0x10000)]
        );
        // A table filling its whole 64 KiB page leaves no room for anything else.
        assert_eq!(page_sharing(&[(0x0, 0x10000)], 0x10000, 0x10000), vec![]);
    }

    #[test]
    fn page_sharing_stops_at_the_end_of_a_small_bar() {
        assert_eq!(
            page_sharing(&[(0, 0x800), (0x800, 8)], 0x1000, 0x10000),
            vec![]
        );
    }
}
