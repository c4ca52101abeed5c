//! Interop scenarios: a function that QEMU's `vfio-user-pci` presents to this guest, served by
//! our unmodified `vfio-passthrough serve-fake` on the host (`cargo xtask interop`).
//!
//! `--interop DIR` selects this set. `DIR` holds one `<profile>.json` per fake profile, the
//! output of `vfio-passthrough inspect --fake <profile> --json` run on the host: what our
//! stack predicts a guest sees. The first scenarios compare what this guest's kernel found
//! (sysfs) with that prediction and touch the BARs through the kernel's sysfs resource files;
//! then the function, bound to this guest's vfio-pci, is driven through our kernel backend with
//! the common scenarios (edu's factorial with MSI, DMA, INTx, reset); the last two ask the host
//! (a `HWTEST-INTEROP: unplug|replug <bdf>` console line, which the host answers with QMP
//! `device_del` / `device_add`) to unplug the function and plug it back, and watch it go and
//! come back while the same server keeps serving.

use crate::device::{Device, PciId};
use crate::harness::{Ctx, Needs, Outcome, Scenario};
use crate::vmm::{self, Vm};
use crate::{edu, scenarios, stack};
use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use vfio_backend::{region, Vfio};
use vfio_fake_device::{edu as fake_edu, nvme_like};
use vfio_pci::IrqMode;

/// The prefix of the requests this binary makes to the host (`cargo xtask interop` reads them
/// from the console).
pub const REQUEST_PREFIX: &str = "HWTEST-INTEROP: ";

/// The fake `nvme-like` profile's id.
pub const NVME_LIKE: PciId = PciId {
    vendor: nvme_like::VENDOR_ID,
    device: nvme_like::DEVICE_ID,
};

/// How long the guest waits for the host to unplug or plug the function (the host reacts
/// within a second; the guest's pciehp waits 5 s after the attention button before powering
/// the slot off; TCG on a busy host stretches all of it).
const HOTPLUG_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound of the wait for each MSI-X vector.
const IRQ_TIMEOUT: Duration = Duration::from_secs(30);

/// Set once from `--interop` before any scenario runs.
static DIR: OnceLock<PathBuf> = OnceLock::new();

/// Records the directory of the predictions (`--interop DIR`).
pub fn set_dir(dir: PathBuf) {
    let _ = DIR.set(dir);
}

/// The interop scenarios, in the order they run. The sysfs ones come first, before anything
/// opens the function through VFIO.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "interop-identity",
        needs: Needs::EachDevice,
        run: identity,
    },
    Scenario {
        name: "interop-bars",
        needs: Needs::EachDevice,
        run: bars,
    },
    Scenario {
        name: "interop-capabilities",
        needs: Needs::EachDevice,
        run: capabilities,
    },
    Scenario {
        name: "interop-interrupt-capabilities",
        needs: Needs::EachDevice,
        run: interrupt_capabilities,
    },
    Scenario {
        name: "interop-sysfs-bar-trapped",
        needs: Needs::EachDevice,
        run: sysfs_bar_trapped,
    },
    Scenario {
        name: "interop-sysfs-bar-mapped",
        needs: Needs::EachDevice,
        run: sysfs_bar_mapped,
    },
    Scenario {
        name: "sysfs-bound-to-vfio-pci",
        needs: Needs::EachDevice,
        run: scenarios::sysfs_bound_to_vfio_pci,
    },
    Scenario {
        name: "bar-sizing-matches-regions",
        needs: Needs::EachDevice,
        run: stack::bar_sizing,
    },
    Scenario {
        name: "capability-walk",
        needs: Needs::EachDevice,
        run: stack::capability_walk,
    },
    Scenario {
        name: "edu-registers",
        needs: Needs::DeviceId(scenarios::EDU),
        run: edu::registers,
    },
    Scenario {
        name: "edu-factorial-msi",
        needs: Needs::DeviceId(scenarios::EDU),
        run: edu::factorial_msi,
    },
    Scenario {
        name: "edu-dma-roundtrip",
        needs: Needs::DeviceId(scenarios::EDU),
        run: edu::dma_roundtrip,
    },
    Scenario {
        name: "edu-intx-unmask",
        needs: Needs::DeviceId(scenarios::EDU),
        run: edu::intx_unmask,
    },
    Scenario {
        name: "nvme-like-msix-every-vector",
        needs: Needs::DeviceId(NVME_LIKE),
        run: msix_every_vector,
    },
    Scenario {
        name: "hot-reset",
        needs: Needs::EachDevice,
        run: stack::hot_reset,
    },
    Scenario {
        name: "interop-reset-restores-state",
        needs: Needs::EachDevice,
        run: reset_restores_state,
    },
    Scenario {
        name: "interop-hot-unplug",
        needs: Needs::EachDevice,
        run: hot_unplug,
    },
    Scenario {
        name: "interop-hot-replug",
        needs: Needs::EachDevice,
        run: hot_replug,
    },
];

/// The table for a run: [`SCENARIOS`] without the ones for a device id that is not under test
/// (each fake profile boots alone, so the other profile's scenarios do not apply).
pub fn table(devices: &[Device]) -> Vec<Scenario> {
    SCENARIOS
        .iter()
        .filter(|s| match s.needs {
            Needs::DeviceId(id) => devices.iter().any(|d| d.id == id),
            _ => true,
        })
        .copied()
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The prediction

/// `inspect --json`'s prediction for this device: the file in the `--interop` directory whose
/// identity names the device's vendor and device id.
fn prediction(dev: &Device) -> Result<Value> {
    let dir = DIR.get().context("--interop was not given")?;
    let mut names = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let path = e?.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let id = &v["identity"];
        if id["vendor_id"].as_u64() == Some(u64::from(dev.id.vendor))
            && id["device_id"].as_u64() == Some(u64::from(dev.id.device))
        {
            return Ok(v);
        }
        names.push(path.display().to_string());
    }
    bail!("no prediction for {} among {names:?}", dev.id)
}

fn num(v: &Value, what: &str) -> Result<u64> {
    v.as_u64()
        .with_context(|| format!("prediction: {what} is not a number ({v})"))
}

fn flag(v: &Value, what: &str) -> Result<bool> {
    v.as_bool()
        .with_context(|| format!("prediction: {what} is not a boolean ({v})"))
}

fn text<'v>(v: &'v Value, what: &str) -> Result<&'v str> {
    v.as_str()
        .with_context(|| format!("prediction: {what} is not a string ({v})"))
}

fn array<'v>(v: &'v Value, what: &str) -> Result<&'v Vec<Value>> {
    v.as_array()
        .with_context(|| format!("prediction: {what} is not an array ({v})"))
}

// ---------------------------------------------------------------------------------------------
// Config space and BARs as this guest's kernel sees them

/// The function's config space as sysfs gives it (256 bytes, or 4096 with extended space).
fn sysfs_config(dev: &Device) -> Result<Vec<u8>> {
    let p = dev.sysfs.join("config");
    fs::read(&p).with_context(|| format!("read {}", p.display()))
}

fn cfg8(c: &[u8], off: usize) -> u8 {
    c.get(off).copied().unwrap_or(0)
}

fn cfg16(c: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([cfg8(c, off), cfg8(c, off + 1)])
}

fn cfg32(c: &[u8], off: usize) -> u32 {
    u32::from(cfg16(c, off)) | u32::from(cfg16(c, off + 2)) << 16
}

/// The standard capability chain: `(id, offset)` in chain order, at most 48 entries.
fn standard_caps(c: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    if cfg16(c, 0x06) & 0x10 == 0 {
        return out;
    }
    let mut at = usize::from(cfg8(c, 0x34) & 0xfc);
    while at >= 0x40 && out.len() < 48 {
        out.push((cfg8(c, at), at));
        at = usize::from(cfg8(c, at + 1) & 0xfc);
    }
    out
}

/// The extended capability chain: `(id, offset)` in chain order, at most 512 entries.
fn extended_caps(c: &[u8]) -> Vec<(u16, usize)> {
    let mut out = Vec::new();
    if c.len() <= 0x100 {
        return out;
    }
    let mut at = 0x100usize;
    while at >= 0x100 && out.len() < 512 {
        let h = cfg32(c, at);
        if h == 0 || h == u32::MAX {
            break;
        }
        out.push(((h & 0xffff) as u16, at));
        at = ((h >> 20) & 0xffc) as usize;
    }
    out
}

/// Vendor, device, subsystem ids, revision, class code and header type as the guest's kernel
/// reads them match the prediction.
fn identity(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let want = prediction(dev)?;
    let id = &want["identity"];
    let c = sysfs_config(dev)?;
    let class = format!("{:06x}", cfg32(&c, 0x08) >> 8);
    let seen = [
        ("vendor_id", u64::from(cfg16(&c, 0x00))),
        ("device_id", u64::from(cfg16(&c, 0x02))),
        ("revision", u64::from(cfg8(&c, 0x08))),
        ("subsystem_vendor_id", u64::from(cfg16(&c, 0x2c))),
        ("subsystem_id", u64::from(cfg16(&c, 0x2e))),
        ("header_type", u64::from(cfg8(&c, 0x0e) & 0x7f)),
    ];
    for (name, got) in seen {
        let w = num(&id[name], name)?;
        ensure!(got == w, "{name} {got:#x}, inspect predicts {w:#x}");
    }
    let wclass = text(&id["class_code"], "class_code")?;
    ensure!(
        class == wclass,
        "class code {class}, inspect predicts {wclass}"
    );
    // sysfs's own attributes agree with config space.
    let sys_class = crate::device::read_hex_attr(&dev.sysfs.join("class"))?;
    ensure!(
        format!("{sys_class:06x}") == class,
        "sysfs class {sys_class:#08x}, config space says {class}"
    );
    Ok(Outcome::Pass(format!(
        "{} subsystem {:04x}:{:04x} rev {:#04x} class {class} ({}) as predicted",
        dev.id,
        cfg16(&c, 0x2c),
        cfg16(&c, 0x2e),
        cfg8(&c, 0x08),
        text(&id["class_name"], "class_name")?
    )))
}

/// `resource` flags (include/linux/ioport.h).
const IORESOURCE_IO: u64 = 0x100;
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_PREFETCH: u64 = 0x2000;
const IORESOURCE_MEM_64: u64 = 0x0010_0000;

/// One line of sysfs `resource`: start, end, flags.
fn resources(dev: &Device) -> Result<Vec<(u64, u64, u64)>> {
    let p = dev.sysfs.join("resource");
    let t = fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
    t.lines()
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .map(crate::device::parse_hex_attr)
                .collect::<Result<_>>()?;
            match f.as_slice() {
                [s, e, fl] => Ok((*s, *e, *fl)),
                _ => bail!("{}: line `{l}` is not `start end flags`", p.display()),
            }
        })
        .collect()
}

fn bar_size(r: (u64, u64, u64)) -> u64 {
    if r.1 > r.0 {
        r.1 - r.0 + 1
    } else {
        0
    }
}

/// Each BAR the guest's kernel assigned has the predicted size and type; BARs the prediction
/// does not list are absent.
fn bars(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let want = prediction(dev)?;
    let res = resources(dev)?;
    let wbars = array(&want["bars"], "bars")?;
    let mut seen = Vec::new();
    let mut listed = Vec::new();
    for b in wbars {
        let index = usize::try_from(num(&b["index"], "bars.index")?)?;
        let size = num(&b["guest_size"], "bars.guest_size")?;
        let kind = text(&b["kind"], "bars.kind")?;
        let prefetch = flag(&b["prefetchable"], "bars.prefetchable")?;
        let r = *res
            .get(index)
            .with_context(|| format!("sysfs resource has no line for BAR{index}"))?;
        ensure!(
            bar_size(r) == size,
            "BAR{index}: the kernel assigned {:#x} bytes, inspect predicts {size:#x}",
            bar_size(r)
        );
        let (is_io, is_mem, is_64, is_pf) = (
            r.2 & IORESOURCE_IO != 0,
            r.2 & IORESOURCE_MEM != 0,
            r.2 & IORESOURCE_MEM_64 != 0,
            r.2 & IORESOURCE_PREFETCH != 0,
        );
        let ok = match kind {
            "io" => is_io,
            "mem32" => is_mem && !is_64,
            "mem64" => is_mem && is_64,
            other => bail!("prediction: BAR{index} kind `{other}`"),
        };
        ensure!(
            ok && (kind == "io" || is_pf == prefetch),
            "BAR{index}: resource flags {:#x}, inspect predicts {kind}{}",
            r.2,
            if prefetch { " prefetchable" } else { "" }
        );
        seen.push(format!("BAR{index} {kind} {size:#x} at {:#x}", r.0));
        listed.push(index);
        if kind == "mem64" {
            listed.push(index + 1);
        }
    }
    for (i, r) in res.iter().enumerate().take(6) {
        ensure!(
            listed.contains(&i) || bar_size(*r) == 0,
            "BAR{i} has {:#x} bytes, inspect predicts no such BAR",
            bar_size(*r)
        );
    }
    Ok(Outcome::Pass(seen.join(", ")))
}

/// The capability chains the guest's kernel walks hold the predicted capabilities at the
/// predicted offsets, in the predicted order, and none of the hidden ones; config space has the
/// predicted size.
fn capabilities(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let want = prediction(dev)?;
    let c = sysfs_config(dev)?;
    let size = num(&want["config_size"], "config_size")?;
    ensure!(
        c.len() as u64 == size,
        "sysfs config is {} bytes, inspect predicts {size}",
        c.len()
    );
    let caps = &want["capabilities"];
    let mut wstd = Vec::new();
    let mut wext = Vec::new();
    for k in array(&caps["kept"], "capabilities.kept")? {
        let id = num(&k["id"], "kept.id")?;
        let off = usize::try_from(num(&k["offset"], "kept.offset")?)?;
        if flag(&k["extended"], "kept.extended")? {
            wext.push((u16::try_from(id)?, off));
        } else {
            wstd.push((u8::try_from(id)?, off));
        }
    }
    let std_caps = standard_caps(&c);
    let ext_caps = extended_caps(&c);
    ensure!(
        std_caps == wstd,
        "standard chain {std_caps:x?}, inspect predicts {wstd:x?}"
    );
    ensure!(
        ext_caps == wext,
        "extended chain {ext_caps:x?}, inspect predicts {wext:x?}"
    );
    let mut hidden = Vec::new();
    for h in array(&caps["hidden"], "capabilities.hidden")? {
        let id = num(&h["id"], "hidden.id")?;
        let ext = flag(&h["extended"], "hidden.extended")?;
        let there = if ext {
            ext_caps.iter().any(|(i, _)| u64::from(*i) == id)
        } else {
            std_caps.iter().any(|(i, _)| u64::from(*i) == id)
        };
        ensure!(
            !there,
            "capability {id:#x} (extended {ext}) is in the chain, inspect says it is hidden"
        );
        hidden.push(format!("{id:#x}"));
    }
    Ok(Outcome::Pass(format!(
        "{} bytes; standard {std_caps:x?}; extended {ext_caps:x?}; hidden absent: [{}]",
        c.len(),
        hidden.join(" ")
    )))
}

/// INTx pin, MSI (vectors, 64-bit, per-vector masking) and MSI-X (size, table and PBA
/// placement) as the capabilities the guest reads them match the prediction.
fn interrupt_capabilities(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let want = prediction(dev)?;
    let irq = &want["interrupts"];
    let c = sysfs_config(dev)?;
    let mut seen = Vec::new();
    let pin = cfg8(&c, 0x3d);
    let wpin = match irq["intx_pin"].as_str() {
        Some("A") => 1,
        Some("B") => 2,
        Some("C") => 3,
        Some("D") => 4,
        _ => 0,
    };
    ensure!(pin == wpin, "interrupt pin {pin}, inspect predicts {wpin}");
    seen.push(format!("INTx pin {pin}"));
    let caps = standard_caps(&c);
    let find = |id: u8| caps.iter().find(|(i, _)| *i == id).map(|(_, o)| *o);
    match (irq["msi"].is_null(), find(pci_config::cap_id::MSI)) {
        (true, None) => seen.push("no MSI".into()),
        (false, Some(at)) => {
            let m = &irq["msi"];
            let ctl = cfg16(&c, at + 2);
            let vectors = 1u64 << ((ctl >> 1) & 7);
            let addr64 = ctl & 0x80 != 0;
            let pvm = ctl & 0x100 != 0;
            ensure!(
                at as u64 == num(&m["offset"], "msi.offset")?
                    && vectors == num(&m["vectors"], "msi.vectors")?
                    && addr64 == flag(&m["addr64"], "msi.addr64")?
                    && pvm == flag(&m["per_vector_mask"], "msi.per_vector_mask")?,
                "MSI at {at:#x}: {vectors} vector(s), 64-bit {addr64}, per-vector mask {pvm}; \
                 inspect predicts {m}"
            );
            seen.push(format!("MSI {vectors} vector(s)"));
        }
        (w, g) => bail!(
            "MSI capability present {}, inspect predicts {}",
            g.is_some(),
            !w
        ),
    }
    match (irq["msix"].is_null(), find(pci_config::cap_id::MSIX)) {
        (true, None) => seen.push("no MSI-X".into()),
        (false, Some(at)) => {
            let m = &irq["msix"];
            let size = u64::from(cfg16(&c, at + 2) & 0x7ff) + 1;
            let table = cfg32(&c, at + 4);
            let pba = cfg32(&c, at + 8);
            let got = (
                size,
                u64::from(table & 7),
                u64::from(table & !7),
                u64::from(pba & 7),
                u64::from(pba & !7),
            );
            let w = (
                num(&m["vectors"], "msix.vectors")?,
                num(&m["table_bar"], "msix.table_bar")?,
                num(&m["table_offset"], "msix.table_offset")?,
                num(&m["pba_bar"], "msix.pba_bar")?,
                num(&m["pba_offset"], "msix.pba_offset")?,
            );
            ensure!(
                got == w,
                "MSI-X (vectors, table BIR, offset, PBA BIR, offset) {got:x?}, inspect predicts {w:x?}"
            );
            seen.push(format!(
                "MSI-X {size} vectors, table BAR{} +{:#x}, PBA BAR{} +{:#x}",
                got.1, got.2, got.3, got.4
            ));
        }
        (w, g) => bail!(
            "MSI-X capability present {}, inspect predicts {}",
            g.is_some(),
            !w
        ),
    }
    Ok(Outcome::Pass(seen.join("; ")))
}

// ---------------------------------------------------------------------------------------------
// BARs through sysfs resource files

/// A memory BAR mapped from its sysfs `resource<N>` file.
struct SysfsBar {
    ptr: *mut u8,
    len: usize,
}

impl SysfsBar {
    /// Maps all of `resource<index>` of `dev`, after making sure the function decodes memory
    /// and stays in D0 (vfio-pci lets an idle function suspend).
    fn map(dev: &Device, index: usize) -> Result<Self> {
        let _ = fs::write(dev.sysfs.join("power/control"), "on");
        let cfg = dev.sysfs.join("config");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cfg)
            .with_context(|| format!("open {}", cfg.display()))?;
        let mut cmd = [0u8; 2];
        f.read_exact_at(&mut cmd, 4)
            .with_context(|| format!("read the command register from {}", cfg.display()))?;
        let v = u16::from_le_bytes(cmd) | vmm::CMD_MEMORY;
        f.write_all_at(&v.to_le_bytes(), 4)
            .with_context(|| format!("set Memory Space Enable through {}", cfg.display()))?;
        let p = dev.sysfs.join(format!("resource{index}"));
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .with_context(|| format!("open {}", p.display()))?;
        let len = usize::try_from(file.metadata()?.len())?;
        ensure!(len > 0, "{} is empty", p.display());
        // SAFETY: a fresh shared mapping of `len` bytes of an open sysfs resource file (its
        // size), at an address the kernel picks; the file may be closed once mapped.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap {}: {}", p.display(), std::io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    fn check(&self, off: u64, width: usize) -> Result<usize> {
        let o = usize::try_from(off)?;
        ensure!(
            o % width == 0 && o.checked_add(width).is_some_and(|e| e <= self.len),
            "offset {off:#x} (width {width}) outside the {:#x}-byte BAR or unaligned",
            self.len
        );
        Ok(o)
    }

    fn read32(&self, off: u64) -> Result<u32> {
        let o = self.check(off, 4)?;
        // SAFETY: `o` is 4-aligned and `o + 4 <= len` (checked), inside the live mapping.
        Ok(unsafe { std::ptr::read_volatile(self.ptr.add(o).cast::<u32>()) })
    }

    fn write32(&self, off: u64, v: u32) -> Result<()> {
        let o = self.check(off, 4)?;
        // SAFETY: as in `read32`; the mapping is writable.
        unsafe { std::ptr::write_volatile(self.ptr.add(o).cast::<u32>(), v) };
        Ok(())
    }
}

impl Drop for SysfsBar {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, which nothing uses any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Registers in the trapped parts of BAR0, read and written through the sysfs resource file:
/// each access is a vfio-user region read or write QEMU sends to the server.
fn sysfs_bar_trapped(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let bar = SysfsBar::map(dev, 0)?;
    if dev.id == scenarios::EDU {
        let ident = bar.read32(fake_edu::ID)?;
        ensure!(
            ident == fake_edu::ID_VALUE,
            "edu identification reads {ident:#010x}, expected {:#010x}",
            fake_edu::ID_VALUE
        );
        for v in [0x1234_5678u32, 0xa5a5_0000] {
            bar.write32(fake_edu::LIVENESS, v)?;
            let r = bar.read32(fake_edu::LIVENESS)?;
            ensure!(
                r == !v,
                "edu liveness reads {r:#010x} after writing {v:#010x}, expected {:#010x}",
                !v
            );
        }
        return Ok(Outcome::Pass(format!(
            "ident {ident:#010x}; liveness returned the inverse of two writes"
        )));
    }
    if dev.id == NVME_LIKE {
        let cap = u64::from(bar.read32(nvme_like::CAP)?)
            | u64::from(bar.read32(nvme_like::CAP + 4)?) << 32;
        let vs = bar.read32(nvme_like::VS)?;
        ensure!(
            cap == nvme_like::CAP_VALUE && vs == nvme_like::VS_VALUE,
            "CAP {cap:#x} VS {vs:#x}, expected {:#x} {:#x}",
            nvme_like::CAP_VALUE,
            nvme_like::VS_VALUE
        );
        // 0x0c..0x1000 is plain register memory in the profile: it keeps what is written.
        let scratch = 0x0f00;
        for v in [0x5a5a_1234u32, 0x0bad_f00d] {
            bar.write32(scratch, v)?;
            let r = bar.read32(scratch)?;
            ensure!(
                r == v,
                "register at {scratch:#x} reads {r:#x} after writing {v:#x}"
            );
        }
        return Ok(Outcome::Pass(format!(
            "CAP {cap:#x} VS {vs:#x}; register {scratch:#x} kept two writes"
        )));
    }
    Ok(Outcome::Skip(format!(
        "no register layout known for {}",
        dev.id
    )))
}

/// The mmap-able parts of each BAR (as the prediction lists them) keep a pattern written
/// through the sysfs resource file: QEMU maps them from the server's file descriptor.
fn sysfs_bar_mapped(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let want = prediction(dev)?;
    let seed = u32::from(edu::pattern_seed());
    let mut seen = Vec::new();
    for b in array(&want["bars"], "bars")? {
        let index = usize::try_from(num(&b["index"], "bars.index")?)?;
        let mapped: Vec<(u64, u64)> = array(&b["parts"], "bars.parts")?
            .iter()
            .filter(|p| p["what"].as_str() == Some("mapped"))
            .map(|p| {
                Ok((
                    num(&p["offset"], "part.offset")?,
                    num(&p["len"], "part.len")?,
                ))
            })
            .collect::<Result<_>>()?;
        if mapped.is_empty() {
            continue;
        }
        let bar = SysfsBar::map(dev, index)?;
        for (off, len) in mapped {
            ensure!(
                len >= 64,
                "mapped part {off:#x}+{len:#x} is too small to test"
            );
            // The first and the last 32 bytes of the part.
            let spots = [off, off + len - 32];
            for (k, base) in spots.iter().enumerate() {
                for i in 0..8u64 {
                    let v = seed.wrapping_mul(0x0101_0101) ^ (i as u32) << 8 ^ k as u32;
                    bar.write32(base + 4 * i, v)?;
                }
            }
            for (k, base) in spots.iter().enumerate() {
                for i in 0..8u64 {
                    let v = seed.wrapping_mul(0x0101_0101) ^ (i as u32) << 8 ^ k as u32;
                    let r = bar.read32(base + 4 * i)?;
                    ensure!(
                        r == v,
                        "BAR{index} +{:#x} reads {r:#x} after writing {v:#x}",
                        base + 4 * i
                    );
                }
            }
            seen.push(format!("BAR{index} {off:#x}+{len:#x}"));
        }
    }
    if seen.is_empty() {
        return Ok(Outcome::Skip("inspect predicts no mmap-able part".into()));
    }
    Ok(Outcome::Pass(format!(
        "pattern kept at both ends of {}",
        seen.join(", ")
    )))
}

// ---------------------------------------------------------------------------------------------
// Reset

/// Sets Memory Space Enable through the config region (a reset clears it).
fn enable_memory(k: &dyn Vfio) -> Result<()> {
    let mut cmd = [0u8; 2];
    k.region_read(region::CONFIG, 4, &mut cmd)
        .context("read the command register")?;
    let v = u16::from_le_bytes(cmd) | vmm::CMD_MEMORY;
    k.region_write(region::CONFIG, 4, &v.to_le_bytes())
        .context("set Memory Space Enable")?;
    Ok(())
}

/// A device reset through the guest's vfio-pci (`VFIO_DEVICE_RESET`; QEMU turns the bus reset
/// into a vfio-user `DEVICE_RESET`) puts back what the device held at reset: a pattern written
/// into the first mmap-able BAR part is gone afterwards, the reset contents are there again.
fn reset_restores_state(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let want = prediction(dev)?;
    let mut spot = None;
    for b in array(&want["bars"], "bars")? {
        let index = u32::try_from(num(&b["index"], "bars.index")?)?;
        for p in array(&b["parts"], "bars.parts")? {
            if spot.is_none() && p["what"].as_str() == Some("mapped") {
                spot = Some((index, num(&p["offset"], "part.offset")?));
            }
        }
    }
    let Some((bar, off)) = spot else {
        return Ok(Outcome::Skip("inspect predicts no mmap-able part".into()));
    };
    let k = crate::mode::open_kernel(ctx.mode, &dev.sysfs)?;
    let k: &dyn Vfio = &k;
    k.reset()
        .context("VFIO_DEVICE_RESET (the guest's vfio-pci)")?;
    enable_memory(k)?;
    let mut base = [0u8; 64];
    k.region_read(bar, off, &mut base)
        .with_context(|| format!("read BAR{bar} +{off:#x}"))?;
    let seed = edu::pattern_seed();
    let pattern: Vec<u8> = base
        .iter()
        .enumerate()
        .map(|(i, b)| !b ^ (i as u8).wrapping_mul(seed))
        .collect();
    k.region_write(bar, off, &pattern)
        .with_context(|| format!("write BAR{bar} +{off:#x}"))?;
    let mut seen = [0u8; 64];
    k.region_read(bar, off, &mut seen)?;
    ensure!(
        seen[..] == pattern[..],
        "BAR{bar} +{off:#x} does not keep the pattern before the reset"
    );
    let t0 = Instant::now();
    k.reset()
        .context("VFIO_DEVICE_RESET (the guest's vfio-pci)")?;
    let took = t0.elapsed();
    enable_memory(k)?;
    k.region_read(bar, off, &mut seen)?;
    ensure!(
        seen == base,
        "BAR{bar} +{off:#x} after the reset: {:02x?}..., at reset it held {:02x?}...",
        &seen[..8],
        &base[..8]
    );
    Ok(Outcome::Pass(format!(
        "64 bytes at BAR{bar} +{off:#x} overwritten, then the reset ({} ms) put back what \
         they held at reset",
        took.as_millis()
    )))
}

// ---------------------------------------------------------------------------------------------
// Interrupts of the nvme-like profile

/// Every MSI-X vector of nvme-like, programmed by this guest through our stack, fires on its
/// own eventfd when the guest writes the doorbell that raises it.
fn msix_every_vector(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, false)?;
    vm.enable_memory_and_bus_master()?;
    let info = vm.msix_info()?.context("no MSI-X capability")?;
    vm.msix_enable(info.size)?;
    ensure!(
        vm.dev.irq_mode() == IrqMode::Msix,
        "irq mode {:?} after enabling MSI-X",
        vm.dev.irq_mode()
    );
    let group = vm.dev.msix_group().context("no MSI-X group")?;
    for v in 0..info.size {
        vmm::drain(group.as_ref(), v)?;
    }
    let t0 = Instant::now();
    for v in 0..info.size {
        let bell = nvme_like::DOORBELLS + nvme_like::DOORBELL_STRIDE * u64::from(v);
        vm.bar_write32(0, bell, 1)?;
        let n = vmm::wait_irq(group.as_ref(), v, IRQ_TIMEOUT)?;
        ensure!(
            n > 0,
            "vector {v}: no interrupt within {IRQ_TIMEOUT:?} of the doorbell write at {bell:#x}"
        );
        for other in (0..info.size).filter(|o| *o != v) {
            let stray = vmm::drain(group.as_ref(), other)?;
            ensure!(
                stray == 0,
                "the doorbell of vector {v} also signalled vector {other}"
            );
        }
    }
    vm.msix_disable()?;
    Ok(Outcome::Pass(format!(
        "each of the {} vectors fired on its own eventfd ({} ms in all)",
        info.size,
        t0.elapsed().as_millis()
    )))
}

// ---------------------------------------------------------------------------------------------
// Hot unplug and plug, driven by the host

/// The kernel command line word with which the host turns the hotplug scenarios off for a
/// boot (it says why in its own output).
const NO_HOTPLUG: &str = "hwtest.nohotplug=1";

/// Whether the host turned hotplug off for this boot (see [`NO_HOTPLUG`]).
fn hotplug_off() -> Option<Outcome> {
    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cmdline
        .split_whitespace()
        .any(|w| w == NO_HOTPLUG)
        .then(|| {
            Outcome::Skip(format!(
                "the host turned hotplug off for this boot ({NO_HOTPLUG} on the kernel command \
             line; `cargo xtask interop` prints why)"
            ))
        })
}

/// Asks the host for `what` (`unplug` or `replug`) on the console.
fn request(what: &str, bdf: &str) -> Result<()> {
    let mut out = std::io::stdout();
    writeln!(out, "{REQUEST_PREFIX}{what} {bdf}")?;
    out.flush()?;
    Ok(())
}

/// Asks the host to `device_del` the function and waits until the guest's kernel has removed
/// it (pciehp powers the slot off, QEMU then finalizes the unplug).
fn hot_unplug(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    if let Some(skip) = hotplug_off() {
        return Ok(skip);
    }
    let t0 = Instant::now();
    request("unplug", &dev.bdf)?;
    let gone = vmm::poll_until(HOTPLUG_TIMEOUT, || !dev.sysfs.exists());
    ensure!(
        gone,
        "{} still present {HOTPLUG_TIMEOUT:?} after asking the host to unplug it",
        dev.bdf
    );
    Ok(Outcome::Pass(format!(
        "{} removed by the guest's kernel {:.1} s after the request",
        dev.bdf,
        t0.elapsed().as_secs_f64()
    )))
}

/// Asks the host to `device_add` the function again (same server, same socket) and waits
/// until the guest's kernel enumerates it; its identity must match the prediction again and
/// its trapped registers must answer, so the server serves the new connection.
fn hot_replug(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    if let Some(skip) = hotplug_off() {
        return Ok(skip);
    }
    ensure!(
        !dev.sysfs.exists(),
        "{} is present: the unplug before this did not happen",
        dev.bdf
    );
    let t0 = Instant::now();
    request("replug", &dev.bdf)?;
    // The kernel makes the device's directory first and its `resource<N>` files a moment
    // later: wait for both.
    let back = vmm::poll_until(HOTPLUG_TIMEOUT, || {
        Device::open(&dev.bdf).is_ok_and(|d| d.id == dev.id) && dev.sysfs.join("resource0").exists()
    });
    ensure!(
        back,
        "{} ({}) not back {HOTPLUG_TIMEOUT:?} after asking the host to plug it",
        dev.bdf,
        dev.id
    );
    let took = t0.elapsed();
    let again = Device::open(&dev.bdf)?;
    let sub = Ctx {
        device: Some(&again),
        ..*ctx
    };
    let id = match identity(&sub)? {
        Outcome::Pass(d) => d,
        Outcome::Skip(d) => bail!("identity after replug not checked: {d}"),
    };
    let regs = match sysfs_bar_trapped(&sub)? {
        Outcome::Pass(d) | Outcome::Skip(d) => d,
    };
    Ok(Outcome::Pass(format!(
        "back after {:.1} s: {id}; {regs}",
        took.as_secs_f64()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_caps() -> Vec<u8> {
        let mut c = vec![0u8; 4096];
        c[6] = 0x10;
        c[0x34] = 0x40;
        c[0x40] = 0x01;
        c[0x41] = 0x48;
        c[0x48] = 0x05;
        c[0x49] = 0x00;
        // AER at 0x100 -> SR-IOV at 0x148.
        c[0x100..0x104].copy_from_slice(&(0x0001u32 | 1 << 16 | 0x148 << 20).to_le_bytes());
        c[0x148..0x14c].copy_from_slice(&(0x0010u32 | 1 << 16).to_le_bytes());
        c
    }

    #[test]
    fn capability_chains_are_walked_in_order_with_offsets() {
        let c = config_with_caps();
        assert_eq!(standard_caps(&c), vec![(0x01, 0x40), (0x05, 0x48)]);
        assert_eq!(extended_caps(&c), vec![(0x0001, 0x100), (0x0010, 0x148)]);
        assert!(extended_caps(&c[..256]).is_empty());
    }

    #[test]
    fn capability_walks_are_bounded_on_loops() {
        let mut c = config_with_caps();
        c[0x49] = 0x40;
        assert_eq!(standard_caps(&c).len(), 48);
        c[0x148..0x14c].copy_from_slice(&(0x0010u32 | 1 << 16 | 0x100 << 20).to_le_bytes());
        assert_eq!(extended_caps(&c).len(), 512);
    }

    /// A sysfs directory for a function whose config space the guest reads, and a prediction
    /// directory holding `inspect --json`-shaped text for it.
    fn fake_function(tmp: &std::path::Path, revision: u8, caps: &[(u8, u8)]) -> Device {
        let dev = tmp.join("0000:01:00.0");
        fs::create_dir_all(&dev).unwrap();
        let mut c = vec![0u8; 256];
        c[0..4].copy_from_slice(&[0x34, 0x12, 0xe8, 0x11]);
        c[8] = revision;
        c[9..12].copy_from_slice(&[0x00, 0xff, 0x00]);
        c[0x2c..0x30].copy_from_slice(&[0xf4, 0x1a, 0x00, 0x11]);
        if let Some((_, first)) = caps.first() {
            c[6] = 0x10;
            c[0x34] = *first;
        }
        for (i, (id, off)) in caps.iter().enumerate() {
            c[usize::from(*off)] = *id;
            c[usize::from(*off) + 1] = caps.get(i + 1).map_or(0, |n| n.1);
        }
        fs::write(dev.join("config"), &c).unwrap();
        fs::write(dev.join("class"), "0x00ff00\n").unwrap();
        Device {
            bdf: "0000:01:00.0".into(),
            sysfs: dev,
            id: scenarios::EDU,
        }
    }

    const PREDICTION: &str = r#"{"identity":{"vendor_id":4660,"device_id":4584,
        "subsystem_vendor_id":6900,"subsystem_id":4352,"revision":16,"class_code":"00ff00",
        "class_name":"Unclassified device","header_type":0},"config_size":256,
        "capabilities":{"kept":[{"id":5,"extended":false,"offset":64}],"hidden":[]}}"#;

    fn run(f: fn(&Ctx<'_>) -> Result<Outcome>, dev: &Device) -> Result<Outcome> {
        let ctx = Ctx {
            device: Some(dev),
            devices: std::slice::from_ref(dev),
            problems: &[],
            required: &[],
            mode: crate::mode::Mode::Legacy,
            cli: std::path::Path::new("/nonexistent"),
        };
        f(&ctx)
    }

    #[test]
    fn guest_view_is_checked_against_the_prediction_not_a_constant() {
        let tmp = tempfile::tempdir().unwrap();
        let pred = tmp.path().join("pred");
        fs::create_dir_all(&pred).unwrap();
        fs::write(pred.join("edu.json"), PREDICTION).unwrap();
        fs::write(pred.join("notes.txt"), "not a prediction").unwrap();
        set_dir(pred);
        let good = fake_function(&tmp.path().join("a"), 0x10, &[(0x05, 0x40)]);
        assert!(matches!(run(identity, &good), Ok(Outcome::Pass(_))));
        assert!(matches!(run(capabilities, &good), Ok(Outcome::Pass(_))));
        // Another revision than predicted: a FAIL that names both.
        let rev = fake_function(&tmp.path().join("b"), 0x11, &[(0x05, 0x40)]);
        let e = run(identity, &rev).unwrap_err().to_string();
        assert!(e.contains("revision 0x11") && e.contains("0x10"), "{e}");
        // MSI at another offset, or a capability the prediction does not have.
        let moved = fake_function(&tmp.path().join("c"), 0x10, &[(0x05, 0x50)]);
        assert!(run(capabilities, &moved).is_err());
        let extra = fake_function(&tmp.path().join("d"), 0x10, &[(0x05, 0x40), (0x11, 0x60)]);
        assert!(run(capabilities, &extra).is_err());
        // A device no prediction names.
        let mut other = good.clone();
        other.id = NVME_LIKE;
        assert!(run(identity, &other).is_err());
    }

    #[test]
    fn table_drops_scenarios_for_ids_not_under_test() {
        let edu = Device {
            bdf: "0000:01:00.0".into(),
            sysfs: PathBuf::from("/nonexistent"),
            id: scenarios::EDU,
        };
        let names: Vec<&str> = table(&[edu]).iter().map(|s| s.name).collect();
        assert!(names.contains(&"edu-factorial-msi"));
        assert!(!names.contains(&"nvme-like-msix-every-vector"));
        assert_eq!(names.last(), Some(&"interop-hot-replug"));
    }
}
