//! The scenario table.
//!
//! The first scenarios need nothing but the kernel (sysfs, `/dev/vfio`) and libc. The rest
//! drive devices through our stack (`vfio_backend::kernel` under `vfio_pci::VfioPciDevice`),
//! the test playing both VMM and guest: [`crate::stack`] for any function, [`crate::edu`] for
//! QEMU's edu ([`EDU`]) and [`crate::nvme`] for QEMU's NVMe controller ([`QEMU_NVME`]). Each is
//! a function `fn(&Ctx) -> Result<Outcome>` and a [`Needs`] that says whether it runs once, on
//! every device, or on devices of one ID. The last ones, [`crate::cli`], spawn the operator
//! command `vfio-passthrough` on each device.

use crate::device::{link_name, PciId};
use crate::group::{group_node, group_status_flags, open_rw, VFIO_GROUP_FLAGS_VIABLE};
use crate::harness::{Ctx, Needs, Outcome, Scenario};
use crate::{cli, edu, migration, nvme, stack};
use anyhow::{bail, ensure, Context, Result};
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

pub use crate::device::{EDU, QEMU_NVME};

/// Every scenario, in the order they run.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "devices-under-test",
        needs: Needs::Nothing,
        run: devices_under_test,
    },
    Scenario {
        name: "required-devices-present",
        needs: Needs::Nothing,
        run: required_devices_present,
    },
    Scenario {
        name: "vfio-container-api",
        needs: Needs::Nothing,
        run: vfio_container_api,
    },
    Scenario {
        name: "sysfs-bound-to-vfio-pci",
        needs: Needs::EachDevice,
        run: sysfs_bound_to_vfio_pci,
    },
    Scenario {
        name: "iommu-group-present",
        needs: Needs::EachDevice,
        run: iommu_group_present,
    },
    Scenario {
        name: "iommu-group-viable",
        needs: Needs::EachDevice,
        run: iommu_group_viable,
    },
    Scenario {
        name: "config-space-readable-via-sysfs",
        needs: Needs::EachDevice,
        run: config_space_readable_via_sysfs,
    },
    Scenario {
        name: "nvme-class-code",
        needs: Needs::DeviceId(QEMU_NVME),
        run: nvme_class_code,
    },
    // Through our stack, any function.
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
        name: "irq-mode-switch",
        needs: Needs::EachDevice,
        run: stack::irq_modes,
    },
    Scenario {
        name: "unplug-no-leaks",
        needs: Needs::EachDevice,
        run: stack::unplug_no_leaks,
    },
    Scenario {
        name: "shared-domain-unplug",
        needs: Needs::Nothing,
        run: stack::shared_domain_unplug,
    },
    Scenario {
        name: "iova-ranges",
        needs: Needs::EachDevice,
        run: stack::iova_ranges,
    },
    Scenario {
        name: "hot-reset",
        needs: Needs::EachDevice,
        run: stack::hot_reset,
    },
    // QEMU's edu.
    Scenario {
        name: "edu-registers",
        needs: Needs::DeviceId(EDU),
        run: edu::registers,
    },
    Scenario {
        name: "edu-factorial-msi",
        needs: Needs::DeviceId(EDU),
        run: edu::factorial_msi,
    },
    Scenario {
        name: "edu-dma-roundtrip",
        needs: Needs::DeviceId(EDU),
        run: edu::dma_roundtrip,
    },
    Scenario {
        name: "edu-intx-unmask",
        needs: Needs::DeviceId(EDU),
        run: edu::intx_unmask,
    },
    // QEMU's NVMe controller.
    Scenario {
        name: "nvme-identify",
        needs: Needs::DeviceId(QEMU_NVME),
        run: nvme::identify,
    },
    Scenario {
        name: "nvme-io-msix",
        needs: Needs::DeviceId(QEMU_NVME),
        run: nvme::io_roundtrip,
    },
    Scenario {
        name: "nvme-reset-reinit",
        needs: Needs::DeviceId(QEMU_NVME),
        run: nvme::reset_reinit,
    },
    // Migration: mtty (the kernel's migratable sample mdev) and type1 dirty tracking.
    Scenario {
        name: "mtty-open",
        needs: Needs::Nothing,
        run: migration::mtty_open,
    },
    Scenario {
        name: "mtty-migration-states",
        needs: Needs::Nothing,
        run: migration::mtty_migration_states,
    },
    Scenario {
        name: "mtty-migrate",
        needs: Needs::Nothing,
        run: migration::mtty_migrate,
    },
    Scenario {
        name: "mtty-migrate-vfio-pci",
        needs: Needs::Nothing,
        run: migration::mtty_migrate_vfio_pci,
    },
    Scenario {
        name: "mtty-migrate-two-vfio-pci",
        needs: Needs::Nothing,
        run: migration::mtty_migrate_two_vfio_pci,
    },
    Scenario {
        name: "type1-dirty-edu",
        needs: Needs::DeviceId(EDU),
        run: migration::type1_dirty_edu,
    },
    Scenario {
        name: "type1-dirty-mdev",
        needs: Needs::Nothing,
        run: migration::type1_dirty_mdev,
    },
    Scenario {
        name: "iommufd-dirty-hwpt",
        needs: Needs::DeviceId(EDU),
        run: migration::iommufd_dirty_hwpt,
    },
    Scenario {
        name: "cli-check-migration",
        needs: Needs::DeviceId(EDU),
        run: migration::cli_check_migration,
    },
    // The operator CLI (`vfio-passthrough`, spawned) against the real kernel.
    Scenario {
        name: "cli-check",
        needs: Needs::EachDevice,
        run: cli::check,
    },
    Scenario {
        name: "cli-inspect",
        needs: Needs::EachDevice,
        run: cli::inspect,
    },
];

// ioctls of linux/vfio.h: _IO(VFIO_TYPE = ';', VFIO_BASE + n) with VFIO_BASE = 100.
const VFIO_GET_API_VERSION: u64 = 0x3b64;
const VFIO_CHECK_EXTENSION: u64 = 0x3b65;
/// `VFIO_API_VERSION`: the only version the kernel has ever reported.
const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
const VFIO_NOIOMMU_IOMMU: libc::c_ulong = 8;

/// `ioctl(fd, request, arg)` with an integer argument; the kernel's return value or the errno.
fn ioctl_int(file: &File, request: u64, arg: libc::c_ulong) -> Result<i32> {
    // SAFETY: the VFIO ioctls used here (GET_API_VERSION, CHECK_EXTENSION) take an integer
    // argument by value and touch no user memory; the fd is open for the call's duration.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), request as _, arg) };
    if r < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("ioctl {request:#x}"));
    }
    Ok(r)
}

fn devices_under_test(ctx: &Ctx<'_>) -> Result<Outcome> {
    ensure!(ctx.problems.is_empty(), "{}", ctx.problems.join("; "));
    ensure!(
        !ctx.devices.is_empty(),
        "no device given (--device) and none bound to vfio-pci"
    );
    let list: Vec<String> = ctx
        .devices
        .iter()
        .map(|d| format!("{} [{}]", d.bdf, d.id))
        .collect();
    Ok(Outcome::Pass(list.join(", ")))
}

fn required_devices_present(ctx: &Ctx<'_>) -> Result<Outcome> {
    if ctx.required.is_empty() {
        return Ok(Outcome::Skip("nothing required (--require)".into()));
    }
    let missing: Vec<String> = ctx
        .required
        .iter()
        .filter(|id| !ctx.devices.iter().any(|d| d.id == **id))
        .map(|id| id.to_string())
        .collect();
    ensure!(
        missing.is_empty(),
        "no device under test with id {}",
        missing.join(", ")
    );
    let have: Vec<String> = ctx.required.iter().map(|id| id.to_string()).collect();
    Ok(Outcome::Pass(have.join(" ")))
}

/// `/dev/vfio/vfio` answers `VFIO_GET_API_VERSION` with `VFIO_API_VERSION` and offers an IOMMU
/// backend (type1v2, or no-IOMMU).
fn vfio_container_api(_ctx: &Ctx<'_>) -> Result<Outcome> {
    let container = open_rw(Path::new("/dev/vfio/vfio"))?;
    let api = ioctl_int(&container, VFIO_GET_API_VERSION, 0)?;
    ensure!(
        api == VFIO_API_VERSION,
        "VFIO_GET_API_VERSION = {api}, expected {VFIO_API_VERSION}"
    );
    let type1v2 = ioctl_int(&container, VFIO_CHECK_EXTENSION, VFIO_TYPE1V2_IOMMU)?;
    let noiommu = ioctl_int(&container, VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU)?;
    let detail = format!("api {api}, type1v2 {type1v2}, noiommu {noiommu}");
    ensure!(
        type1v2 > 0 || noiommu > 0,
        "no IOMMU backend offered: {detail}"
    );
    Ok(Outcome::Pass(detail))
}

/// The function is bound to vfio-pci, as sysfs says.
pub fn sysfs_bound_to_vfio_pci(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    match dev.driver()? {
        Some(d) if d == "vfio-pci" => Ok(Outcome::Pass(format!("[{}] driver vfio-pci", dev.id))),
        Some(d) => bail!("[{}] is bound to {d}, not vfio-pci", dev.id),
        None => bail!("[{}] is bound to no driver", dev.id),
    }
}

/// The function has an IOMMU group in sysfs, and the group's VFIO node is a character device.
fn iommu_group_present(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let group = dev
        .iommu_group()?
        .context("no iommu_group link in sysfs (IOMMU off, or no-IOMMU mode not enabled)")?;
    let node =
        group_node(&group).with_context(|| format!("group {group} has no /dev/vfio node"))?;
    let meta = fs::metadata(&node).with_context(|| format!("stat {}", node.display()))?;
    ensure!(
        meta.file_type().is_char_device(),
        "{} is not a character device",
        node.display()
    );
    Ok(Outcome::Pass(format!("group {group}, {}", node.display())))
}

/// `VFIO_GROUP_GET_STATUS` reports the group viable: every function in it is bound to a
/// driver that lets VFIO own the group (or to none). The sysfs drivers are listed as detail.
fn iommu_group_viable(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let group = dev.iommu_group()?.context("no IOMMU group")?;
    let members_dir = PathBuf::from(format!("/sys/kernel/iommu_groups/{group}/devices"));
    let mut members = Vec::new();
    for e in
        fs::read_dir(&members_dir).with_context(|| format!("list {}", members_dir.display()))?
    {
        let e = e?;
        let driver = link_name(&e.path().join("driver"))?.unwrap_or_else(|| "none".into());
        members.push(format!("{}={driver}", e.file_name().to_string_lossy()));
    }
    members.sort();
    let flags = group_status_flags(&group)?;
    let detail = format!("group {group} flags {flags:#x}: {}", members.join(" "));
    ensure!(
        flags & VFIO_GROUP_FLAGS_VIABLE != 0,
        "group not viable: {detail}"
    );
    Ok(Outcome::Pass(detail))
}

/// The first bytes of sysfs `config` hold the same vendor and device IDs as the `vendor` and
/// `device` attributes (PCI config space offsets 0x00 and 0x02, little endian).
fn config_space_readable_via_sysfs(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    let path = dev.sysfs.join("config");
    let mut header = [0u8; 16];
    File::open(&path)
        .and_then(|mut f| f.read_exact(&mut header))
        .with_context(|| format!("read {}", path.display()))?;
    let vendor = u16::from_le_bytes([header[0], header[1]]);
    let device = u16::from_le_bytes([header[2], header[3]]);
    ensure!(
        vendor != 0xffff,
        "config space reads all-ones (function not responding)"
    );
    let seen = PciId { vendor, device };
    ensure!(
        seen == dev.id,
        "config space says {seen}, sysfs attributes say {}",
        dev.id
    );
    // Header type is at offset 0x0e; bit 7 is the multi-function bit.
    Ok(Outcome::Pass(format!(
        "{seen}, header type {:#04x}",
        header[0x0e] & 0x7f
    )))
}

/// An NVMe controller reports class code 01h/08h/02h (mass storage, non-volatile memory,
/// NVM Express), both in the sysfs `class` attribute and at config offsets 0x09-0x0b.
fn nvme_class_code(ctx: &Ctx<'_>) -> Result<Outcome> {
    const NVME_CLASS: u64 = 0x01_08_02;
    let dev = ctx.device()?;
    let attr = crate::device::read_hex_attr(&dev.sysfs.join("class"))?;
    ensure!(
        attr == NVME_CLASS,
        "sysfs class {attr:#08x}, expected {NVME_CLASS:#08x}"
    );
    let path = dev.sysfs.join("config");
    let mut header = [0u8; 12];
    File::open(&path)
        .and_then(|mut f| f.read_exact(&mut header))
        .with_context(|| format!("read {}", path.display()))?;
    let cfg =
        u64::from(header[0x0b]) << 16 | u64::from(header[0x0a]) << 8 | u64::from(header[0x09]);
    ensure!(
        cfg == NVME_CLASS,
        "config space class {cfg:#08x}, expected {NVME_CLASS:#08x}"
    );
    Ok(Outcome::Pass(format!("class {cfg:#08x}")))
}
