//! The three ways the kernel backend reaches a function (`--mode`), the open helper every
//! scenario should use, and the scenarios that belong to one mode only.
//!
//! - `legacy`: a type1v2 container (`/dev/vfio/vfio`) and the IOMMU group (`/dev/vfio/N`).
//! - `iommufd`: `/dev/iommu`, one I/O address space (IOAS), the device's vfio cdev
//!   (`/dev/vfio/devices/vfioN`) bound to the iommufd and attached to the IOAS.
//! - `noiommu`: a host without an IOMMU, `vfio.enable_unsafe_noiommu_mode=1`; the device's fake
//!   group `/dev/vfio/noiommu-N` in a container opened with the explicit opt-in
//!   ([`KernelContainer::new_noiommu`]). Config space, BARs, interrupts and reset work; DMA
//!   mapping is refused (there is no IOMMU to map into), so scenarios that need DMA call
//!   [`require_dma`](crate::mode::require_dma) and are reported as SKIP by design
//!   ([`ByDesign`](crate::mode::ByDesign)), never as PASS.

use crate::device::EDU;
use crate::harness::{Ctx, Needs, Outcome, Scenario};
use anyhow::{bail, ensure, Context, Result};
use std::fs;
use std::ops::RangeInclusive;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vfio_backend::kernel::{IommufdIoas, KernelContainer, KernelDevice};
use vfio_backend::{region, DmaSource, IommuDomain, Vfio};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::mode::{open_kernel, Mode};

/// [`open_kernel`] in the mode of `ctx`, as the `Vfio` trait object `VfioPciDevice` takes.
pub fn open_device(ctx: &Ctx<'_>, sysfs: &Path) -> Result<Arc<dyn Vfio>> {
    Ok(Arc::new(open_kernel(ctx.mode, sysfs)?))
}

/// The scenarios of one mode (none for `legacy`: the common set covers it).
pub fn scenarios(mode: Mode) -> &'static [Scenario] {
    match mode {
        Mode::Legacy => &[],
        Mode::Iommufd => IOMMUFD_SCENARIOS,
        Mode::NoIommu => NOIOMMU_SCENARIOS,
    }
}

/// Scenarios of `--mode iommufd`.
pub const IOMMUFD_SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "iommufd-ioas-alloc",
        needs: Needs::Nothing,
        run: iommufd_ioas_alloc,
    },
    Scenario {
        name: "iommufd-cdev-node",
        needs: Needs::EachDevice,
        run: iommufd_cdev_node,
    },
    Scenario {
        name: "iommufd-shared-ioas-dma",
        needs: Needs::Nothing,
        run: iommufd_shared_ioas_dma,
    },
    Scenario {
        name: "iommufd-map-unmap",
        needs: Needs::EachDevice,
        run: iommufd_map_unmap,
    },
];

/// Scenarios of `--mode noiommu`.
pub const NOIOMMU_SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "noiommu-group-node",
        needs: Needs::EachDevice,
        run: noiommu_group_node,
    },
    Scenario {
        name: "noiommu-needs-opt-in",
        needs: Needs::EachDevice,
        run: noiommu_needs_opt_in,
    },
    Scenario {
        name: "noiommu-config-bar-reset",
        needs: Needs::EachDevice,
        run: noiommu_config_bar_reset,
    },
    Scenario {
        name: "noiommu-no-cdev",
        needs: Needs::EachDevice,
        run: noiommu_no_cdev,
    },
    Scenario {
        name: "noiommu-dma-refused",
        needs: Needs::EachDevice,
        run: noiommu_dma_refused,
    },
];

const PAGE: u64 = 4096;
/// The x86 interrupt address window (Intel VT-d 3.13: requests to 0xFEEx_xxxx are interrupt
/// requests, never DMA), which the IOMMU reports as reserved.
const MSI_WINDOW: RangeInclusive<u64> = 0xfee0_0000..=0xfeef_ffff;

fn ranges_text(r: &[RangeInclusive<u64>]) -> String {
    r.iter()
        .map(|r| format!("{:#x}..={:#x}", r.start(), r.end()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Guest-RAM-like memory for DMA, and its host address.
fn dma_memory(size: usize) -> Result<(GuestMemoryMmap, u64)> {
    let mem =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size)]).context("DMA memory")?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .context("host address")?;
    Ok((mem, host as u64))
}

fn source(host: u64) -> DmaSource<'static> {
    DmaSource {
        host_addr: host,
        file: None,
        read_only: false,
    }
}

// ---- iommufd ----

/// `/dev/iommu` is a character device; `IOMMU_IOAS_ALLOC` gives an IOAS, which, with no
/// device attached, allows the whole IOVA space (iommufd.h: a fresh IOAS has the full range).
fn iommufd_ioas_alloc(_ctx: &Ctx<'_>) -> Result<Outcome> {
    let meta = fs::metadata("/dev/iommu").context("stat /dev/iommu")?;
    ensure!(
        meta.file_type().is_char_device(),
        "/dev/iommu is not a character device"
    );
    let a = IommufdIoas::new().context("IOMMU_IOAS_ALLOC")?;
    let ranges = a.iova_ranges().context("IOMMU_IOAS_IOVA_RANGES")?;
    ensure!(
        ranges == [0..=u64::MAX],
        "an IOAS without devices allows {}, expected the whole 64-bit space",
        ranges_text(&ranges)
    );
    Ok(Outcome::Pass(format!(
        "/dev/iommu {}:{}, IOAS {} with ranges {}",
        libc::major(meta.rdev()),
        libc::minor(meta.rdev()),
        a.ioas_id(),
        ranges_text(&ranges)
    )))
}

/// The function bound to vfio-pci has a cdev: `<sysfs>/vfio-dev/vfioN` names it, and
/// `/dev/vfio/devices/vfioN` is a character device with the number in `vfioN/dev`.
fn iommufd_cdev_node(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let dir = dev.sysfs.join("vfio-dev");
    let mut names = Vec::new();
    for e in fs::read_dir(&dir).with_context(|| format!("list {}", dir.display()))? {
        names.push(e?.file_name().to_string_lossy().into_owned());
    }
    let [name] = names.as_slice() else {
        bail!("{} lists {names:?}, expected one vfioN", dir.display());
    };
    let want = fs::read_to_string(dir.join(name).join("dev"))
        .with_context(|| format!("read {}/{name}/dev", dir.display()))?;
    let node = Path::new("/dev/vfio/devices").join(name);
    let meta = fs::metadata(&node).with_context(|| format!("stat {}", node.display()))?;
    ensure!(
        meta.file_type().is_char_device(),
        "{} is not a character device",
        node.display()
    );
    let have = format!("{}:{}", libc::major(meta.rdev()), libc::minor(meta.rdev()));
    ensure!(
        have == want.trim(),
        "{} is {have}, sysfs says {}",
        node.display(),
        want.trim()
    );
    Ok(Outcome::Pass(format!("{} ({have})", node.display())))
}

/// Every device under test is bound to one iommufd and attached to one IOAS; the IOAS's
/// ranges then leave out the x86 interrupt window; one mapping in that IOAS serves an edu DMA
/// RAM -> device -> RAM while the other devices stay attached.
fn iommufd_shared_ioas_dma(ctx: &Ctx<'_>) -> Result<Outcome> {
    ensure!(
        ctx.devices.len() >= 2,
        "needs at least two devices under test, has {}",
        ctx.devices.len()
    );
    let ioas = IommufdIoas::new().context("IOAS")?;
    let mut opened = Vec::new();
    for d in ctx.devices {
        let k = ioas
            .open_device(&d.sysfs)
            .with_context(|| format!("bind + attach {}", d.bdf))?;
        opened.push((d, k));
    }
    let mut ids = Vec::new();
    for (d, k) in &opened {
        let id = k.iommufd_dev_id().context("no iommufd device id")?;
        let shared = k.ioas().is_some_and(|a| Arc::ptr_eq(a, &ioas));
        ensure!(shared, "{} is not attached to the shared IOAS", d.bdf);
        ensure!(!ids.contains(&id), "device id {id} given twice");
        ids.push(id);
    }
    let ranges = ioas.iova_ranges().context("IOMMU_IOAS_IOVA_RANGES")?;
    ensure!(!ranges.is_empty(), "no IOVA range left");
    for w in ranges.windows(2) {
        ensure!(
            w[0].end() < w[1].start(),
            "ranges unsorted or overlapping: {}",
            ranges_text(&ranges)
        );
    }
    ensure!(
        !ranges
            .iter()
            .any(|r| r.contains(MSI_WINDOW.start()) || r.contains(MSI_WINDOW.end())),
        "the interrupt window {MSI_WINDOW:#x?} is allowed: {}",
        ranges_text(&ranges)
    );
    let Some((_, edu)) = opened.iter().find(|(d, _)| d.id == EDU) else {
        return Ok(Outcome::Skip(format!(
            "ids {ids:?} attached, ranges {}; no edu device to DMA with",
            ranges_text(&ranges)
        )));
    };
    // One mapping in the shared IOAS: 64 KiB at IOVA 1 MiB (edu masks DMA to 28 bits).
    let (mem, host) = dma_memory(0x10000)?;
    let iova = 0x10_0000;
    // SAFETY: the kernel pins the pages of `mem` for the IOAS; the range is unmapped below,
    // or by the IOAS's destruction on an early return; the test reads `mem` through vm-memory.
    unsafe { ioas.map(iova, 0x10000, source(host)) }.context("IOMMU_IOAS_MAP")?;
    let pattern: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(7) ^ 0x5a) as u8)
        .collect();
    mem.write_slice(&pattern, GuestAddress(0x1000))?;
    edu_raw_enable(edu)?;
    let t0 = Instant::now();
    edu_raw_dma(edu, iova + 0x1000, 0x40000, 4096, false)?;
    edu_raw_dma(edu, 0x40000, iova + 0x8000, 4096, true)?;
    let took = t0.elapsed();
    let mut back = vec![0u8; 4096];
    mem.read_slice(&mut back, GuestAddress(0x8000))?;
    ioas.unmap(iova, 0x10000).context("IOMMU_IOAS_UNMAP")?;
    ensure!(
        back == pattern,
        "edu's DMA through the shared IOAS did not bring the pattern back"
    );
    drop(opened);
    Ok(Outcome::Pass(format!(
        "{} devices in IOAS {} (device ids {ids:?}); ranges {}; edu DMA 4 KiB RAM -> device \
         -> RAM through one IOAS mapping in {} ms",
        ctx.devices.len(),
        ioas.ioas_id(),
        ranges_text(&ranges),
        took.as_millis()
    )))
}

/// `IOMMU_IOAS_MAP` at a fixed IOVA and `IOMMU_IOAS_UNMAP` of exactly that range; mapping the
/// same IOVA twice, unmapping what is not mapped and mapping the interrupt window are refused.
fn iommufd_map_unmap(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let ioas = IommufdIoas::new().context("IOAS")?;
    let k = ioas.open_device(&dev.sysfs).context("bind + attach")?;
    let (_mem, host) = dma_memory(4 * PAGE as usize)?;
    let iova = 0x20_0000;
    let size = 4 * PAGE;
    let d = k.iommu_domain();
    // SAFETY: the kernel pins `_mem`'s pages, each mapping (this one and those below) is
    // unmapped right after or by the IOAS's destruction, and nothing reads `_mem`.
    unsafe { d.map(iova, size, source(host)) }.context("first map")?;
    // SAFETY: as above.
    let again = unsafe { d.map(iova, size, source(host)) };
    let unmapped = d.unmap(iova, size);
    let twice = d.unmap(iova, size);
    // SAFETY: as above.
    let msi = unsafe { d.map(*MSI_WINDOW.start(), PAGE, source(host)) };
    if msi.is_ok() {
        let _ = d.unmap(*MSI_WINDOW.start(), PAGE);
    }
    let e_again = match again {
        Ok(()) => bail!("mapping IOVA {iova:#x} twice was accepted"),
        Err(e) => e.errno(),
    };
    unmapped.context("unmap of the mapped range")?;
    let e_twice = match twice {
        Ok(()) => bail!("unmapping an already unmapped range succeeded"),
        Err(e) => e.errno(),
    };
    let e_msi = match msi {
        Ok(()) => bail!(
            "a mapping in the interrupt window {:#x} was accepted",
            MSI_WINDOW.start()
        ),
        Err(e) => e.errno(),
    };
    Ok(Outcome::Pass(format!(
        "{size:#x} bytes at {iova:#x} mapped and unmapped; refused: map twice (errno {e_again:?}), \
         unmap again (errno {e_twice:?}), map at {:#x} (errno {e_msi:?})",
        MSI_WINDOW.start()
    )))
}

// ---- edu, by raw register access (no VfioPciDevice) ----

const EDU_DMA_SRC: u64 = 0x80;
const EDU_DMA_DST: u64 = 0x88;
const EDU_DMA_COUNT: u64 = 0x90;
const EDU_DMA_CMD: u64 = 0x98;

/// Turns on memory decoding and bus mastering in the command register.
fn edu_raw_enable(k: &KernelDevice) -> Result<()> {
    let mut cmd = [0u8; 2];
    k.region_read(region::CONFIG, 4, &mut cmd)?;
    let v = u16::from_le_bytes(cmd) | 0x6;
    k.region_write(region::CONFIG, 4, &v.to_le_bytes())?;
    Ok(())
}

/// One edu DMA transfer of `len` bytes, waited for by polling the command register.
fn edu_raw_dma(k: &KernelDevice, src: u64, dst: u64, len: u64, to_ram: bool) -> Result<()> {
    k.region_write(region::BAR0, EDU_DMA_SRC, &src.to_le_bytes())?;
    k.region_write(region::BAR0, EDU_DMA_DST, &dst.to_le_bytes())?;
    k.region_write(region::BAR0, EDU_DMA_COUNT, &len.to_le_bytes())?;
    let cmd: u64 = 1 | if to_ram { 2 } else { 0 };
    k.region_write(region::BAR0, EDU_DMA_CMD, &cmd.to_le_bytes())?;
    let t0 = Instant::now();
    loop {
        let mut b = [0u8; 8];
        k.region_read(region::BAR0, EDU_DMA_CMD, &mut b)?;
        if u64::from_le_bytes(b) & 1 == 0 {
            return Ok(());
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "edu DMA {src:#x} -> {dst:#x} still running after 30 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- no-IOMMU ----

/// The kernel puts the function in a fake group named `vfio-noiommu` whose node is
/// `/dev/vfio/noiommu-N` (there is no `/dev/vfio/N`).
fn noiommu_group_node(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let group = dev.iommu_group()?.context("no iommu_group link")?;
    let name_path = dev.sysfs.join("iommu_group/name");
    let name =
        fs::read_to_string(&name_path).with_context(|| format!("read {}", name_path.display()))?;
    ensure!(
        name.trim() == "vfio-noiommu",
        "group {group} is named `{}`, not vfio-noiommu",
        name.trim()
    );
    let node = format!("/dev/vfio/noiommu-{group}");
    let meta = fs::metadata(&node).with_context(|| format!("stat {node}"))?;
    ensure!(
        meta.file_type().is_char_device(),
        "{node} is not a character device"
    );
    ensure!(
        !Path::new(&format!("/dev/vfio/{group}")).exists(),
        "/dev/vfio/{group} exists besides {node}"
    );
    Ok(Outcome::Pass(format!("group {group} vfio-noiommu, {node}")))
}

// ioctls of linux/vfio.h: _IO(';', 100 + n).
const VFIO_CHECK_EXTENSION: libc::c_ulong = 0x3b65;
const VFIO_SET_IOMMU: libc::c_ulong = 0x3b66;
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = 0x3b68;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
const VFIO_NOIOMMU_IOMMU: libc::c_ulong = 8;

fn raw_ioctl(fd: &fs::File, req: libc::c_ulong, arg: libc::c_ulong) -> std::io::Result<i32> {
    // SAFETY: CHECK_EXTENSION and SET_IOMMU take an integer by value and touch no memory.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn open_rw(path: &str) -> Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {path}"))
}

/// Without the opt-in the device is refused: our backend's default open refuses the
/// no-IOMMU group and says how to opt in, and the kernel refuses the type1v2 IOMMU driver for
/// a container holding it, accepting only `VFIO_NOIOMMU_IOMMU`.
fn noiommu_needs_opt_in(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let msg = match KernelDevice::open(&dev.sysfs) {
        Ok(_) => bail!("KernelDevice::open (type1v2) accepted a no-IOMMU device"),
        Err(e) => e.to_string(),
    };
    ensure!(
        msg.contains("new_noiommu") && msg.contains("not isolated"),
        "the refusal does not say why or how to opt in: {msg}"
    );
    let group = dev.iommu_group()?.context("no iommu_group link")?;
    let container = open_rw("/dev/vfio/vfio")?;
    let group_fd = open_rw(&format!("/dev/vfio/noiommu-{group}"))?;
    let cfd = container.as_raw_fd();
    // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd) from the pointer,
    // which points to `cfd`, alive for the call.
    let r = unsafe {
        libc::ioctl(
            group_fd.as_raw_fd(),
            VFIO_GROUP_SET_CONTAINER as _,
            &cfd as *const i32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context("VFIO_GROUP_SET_CONTAINER");
    }
    let type1 = raw_ioctl(&container, VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU).unwrap_or(-1);
    let refused = match raw_ioctl(&container, VFIO_SET_IOMMU, VFIO_TYPE1V2_IOMMU) {
        Ok(_) => bail!("the kernel set the type1v2 IOMMU on a container with a no-IOMMU group"),
        Err(e) => e,
    };
    raw_ioctl(&container, VFIO_SET_IOMMU, VFIO_NOIOMMU_IOMMU)
        .context("VFIO_SET_IOMMU(VFIO_NOIOMMU_IOMMU) after the opt-in")?;
    drop(group_fd);
    Ok(Outcome::Pass(format!(
        "backend: `{msg}`; kernel: CHECK_EXTENSION(type1v2) = {type1}, SET_IOMMU(type1v2) \
         refused ({refused}), SET_IOMMU(noiommu) accepted"
    )))
}

/// The kernel registers a no-IOMMU device in `vfio-dev/` but gives it no cdev (no `dev`
/// attribute, no `/dev/vfio/devices/vfioN`): iommufd cannot reach it, and the backend's
/// iommufd open says so instead of failing on a missing node.
fn noiommu_no_cdev(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let dir = dev.sysfs.join("vfio-dev");
    let mut listed = Vec::new();
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries {
            let e = e?;
            let name = e.file_name().to_string_lossy().into_owned();
            ensure!(
                !e.path().join("dev").exists(),
                "{}/{name} has a device number",
                dir.display()
            );
            ensure!(
                !Path::new("/dev/vfio/devices").join(&name).exists(),
                "/dev/vfio/devices/{name} exists"
            );
            listed.push(name);
        }
    }
    let msg = match IommufdIoas::new().context("IOAS")?.open_device(&dev.sysfs) {
        Ok(_) => bail!("a no-IOMMU device was opened through iommufd"),
        Err(e) => e.to_string(),
    };
    ensure!(
        msg.contains("no-IOMMU") && msg.contains("new_noiommu"),
        "the iommufd refusal does not say why: {msg}"
    );
    Ok(Outcome::Pass(format!(
        "vfio-dev lists {listed:?} without a cdev; iommufd open: {msg}"
    )))
}

/// With the opt-in, config space, BAR0 (read and mmap) and the device reset work.
fn noiommu_config_bar_reset(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let k = KernelContainer::new_noiommu()
        .context("KernelContainer::new_noiommu")?
        .open_device(&dev.sysfs)
        .context("open with the opt-in")?;
    ensure!(k.is_noiommu(), "the device does not report no-IOMMU mode");
    let mut id = [0u8; 4];
    k.region_read(region::CONFIG, 0, &mut id)?;
    let vendor = u16::from_le_bytes([id[0], id[1]]);
    let device = u16::from_le_bytes([id[2], id[3]]);
    ensure!(
        (vendor, device) == (dev.id.vendor, dev.id.device),
        "config space says {vendor:04x}:{device:04x}, sysfs {}",
        dev.id
    );
    let bar = k.region_info(region::BAR0)?;
    ensure!(bar.size > 0, "BAR0 is empty");
    let mut word = [0u8; 4];
    k.region_read(region::BAR0, 0, &mut word)?;
    let by_read = u32::from_le_bytes(word);
    if dev.id == EDU {
        ensure!(
            by_read == 0x0100_00ed,
            "edu identification {by_read:#x}, expected 0x010000ed"
        );
    }
    let mut mmap_note = String::from("not mmap-able");
    if bar.mmappable() {
        if let Some(area) = bar.mmap_areas().first().copied().filter(|a| a.offset == 0) {
            let m = k.mmap_region(region::BAR0, area)?;
            ensure!(m.len() >= 4, "mapping of {} bytes", m.len());
            // SAFETY: the mapping is at least 4 bytes, page aligned and lives until `m` drops.
            let v = unsafe { std::ptr::read_volatile(m.as_ptr() as *const u32) };
            ensure!(
                v == by_read,
                "BAR0[0] reads {by_read:#x} by pread, {v:#x} through mmap"
            );
            mmap_note = format!("mmap reads the same {v:#x}");
        }
    }
    let reset = if k.device_info()?.supports_reset() {
        k.reset().context("VFIO_DEVICE_RESET")?;
        let mut after = [0u8; 4];
        k.region_read(region::CONFIG, 0, &mut after)?;
        ensure!(after == id, "ids {id:x?} before reset, {after:x?} after");
        "reset ok"
    } else {
        "no device reset offered"
    };
    Ok(Outcome::Pass(format!(
        "{vendor:04x}:{device:04x}; BAR0 {:#x} bytes, [0] = {by_read:#x}, {mmap_note}; {reset}",
        bar.size
    )))
}

/// DMA mapping is refused in a no-IOMMU container with an error that says why, and no IOVA
/// range is offered.
fn noiommu_dma_refused(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    // Through the Vfio trait, as a VMM sees it.
    let k = open_device(ctx, &dev.sysfs)?;
    let (_mem, host) = dma_memory(PAGE as usize)?;
    let d = k.iommu_domain();
    // SAFETY: refused in no-IOMMU mode (what this checks); were it accepted, `_mem` outlives
    // `d` and `k`, whose drop leaves the container.
    let msg = match unsafe { d.map(0x10_0000, PAGE, source(host)) } {
        Ok(()) => bail!("dma_map succeeded in no-IOMMU mode"),
        Err(vfio_backend::Error::Unsupported(m)) => m,
        Err(e) => bail!("dma_map failed, but not as unsupported: {e}"),
    };
    ensure!(
        msg.contains("no-IOMMU") && msg.contains("no IOMMU"),
        "the refusal does not say why: {msg}"
    );
    let ranges = d.iova_ranges()?;
    ensure!(ranges.is_empty(), "IOVA ranges offered: {ranges:x?}");
    Ok(Outcome::Pass(format!("dma_map refused: {msg}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mode::{require_dma, ByDesign};

    #[test]
    fn mode_names_round_trip_and_unknown_names_are_refused() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.name()).unwrap(), m);
        }
        let e = Mode::parse("type1")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("--mode type1: expected legacy, iommufd or noiommu"),
            "{e}"
        );
        assert_eq!(Mode::default(), Mode::Legacy);
    }

    #[test]
    fn dma_is_skipped_by_design_only_in_no_iommu_mode() {
        require_dma(Mode::Legacy).unwrap();
        require_dma(Mode::Iommufd).unwrap();
        let e = require_dma(Mode::NoIommu).unwrap_err();
        let by = e.downcast_ref::<ByDesign>().expect("a ByDesign error");
        assert!(by.0.contains("no-IOMMU"), "{by}");
        // Context added on the way up keeps it recognisable.
        let e = require_dma(Mode::NoIommu).context("attach").unwrap_err();
        assert!(e.downcast_ref::<ByDesign>().is_some());
    }

    #[test]
    fn mode_scenarios_have_unique_prefixed_single_token_names() {
        let mut all: Vec<&str> = crate::scenarios::SCENARIOS.iter().map(|s| s.name).collect();
        for m in Mode::ALL {
            for s in scenarios(m) {
                assert!(s.name.starts_with(&format!("{}-", m.name())), "{}", s.name);
                assert!(
                    s.name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-'),
                    "{}",
                    s.name
                );
                all.push(s.name);
            }
        }
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
    }
}
