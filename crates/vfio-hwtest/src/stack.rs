//! Scenarios that hold for any function passed through our stack: BAR sizing, capability
//! chains, interrupt mode switches, unplug without leaks, the IOMMU's IOVA ranges and PCI hot
//! reset.

use crate::harness::{Ctx, Outcome};
use crate::vmm::{self, Vm, CMD_MEMORY, RAM_BASE, RAM_SIZE};
use anyhow::{bail, ensure, Context, Result};
use pci_config::cap_id;
use std::collections::BTreeSet;
use std::sync::Arc;
use vfio_backend::{region, DmaSource, Vfio};
use vfio_pci::{DmaMode, GuestDma, IrqMode};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const PAGE: u64 = 4096;

/// Sizes every BAR (and the ROM) through the emulated config space with the all-ones protocol:
/// the size matches what the VMM reserved, covers the kernel's region, the flag bits are the
/// device's own, and the register holds the VMM's placement before and after.
pub fn bar_sizing(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, false)?;
    let bars = vm.dev.bars();
    ensure!(!bars.is_empty(), "bars() is empty");
    let mut real = [0u8; 0x40];
    vm.kernel
        .region_read(region::CONFIG, 0, &mut real)
        .context("reading the device's header")?;
    let real_reg = |i: usize| -> u32 {
        let o = 0x10 + 4 * i;
        u32::from_le_bytes([real[o], real[o + 1], real[o + 2], real[o + 3]])
    };
    let cmd = vm.command();
    // A guest turns decoding off while it sizes.
    vm.cfg_write(0x04, 2, u32::from(cmd & !CMD_MEMORY & !1))?;
    let mut seen = Vec::new();
    for b in &bars {
        let (size, flags, addr) = if b.index.is_rom() {
            let orig = vm.cfg_read(0x30, 4);
            vm.cfg_write(0x30, 4, 0xffff_f800)?;
            let v = vm.cfg_read(0x30, 4);
            vm.cfg_write(0x30, 4, orig)?;
            let mask = u64::from(v & 0xffff_f800) | 0xffff_ffff_0000_0000;
            (
                (!mask).wrapping_add(1),
                0,
                u64::from(vm.cfg_read(0x30, 4) & 0xffff_f800),
            )
        } else {
            let off = 0x10 + 4 * b.index.slot() as u64;
            let lo = vm.cfg_read(off, 4);
            let io = lo & 1 != 0;
            let is64 = !io && (lo >> 1) & 3 == 2;
            let hi = if is64 { vm.cfg_read(off + 4, 4) } else { 0 };
            vm.cfg_write(off, 4, u32::MAX)?;
            if is64 {
                vm.cfg_write(off + 4, 4, u32::MAX)?;
            }
            let slo = vm.cfg_read(off, 4);
            let shi = if is64 {
                vm.cfg_read(off + 4, 4)
            } else {
                u32::MAX
            };
            vm.cfg_write(off, 4, lo)?;
            if is64 {
                vm.cfg_write(off + 4, 4, hi)?;
            }
            let flag_bits = if io { 0x3 } else { 0xf };
            ensure!(
                slo & flag_bits == lo & flag_bits,
                "{}: flag bits change while sizing ({lo:#x} -> {slo:#x})",
                b.index
            );
            let real_flags = real_reg(b.index.slot()) & flag_bits;
            ensure!(
                lo & flag_bits == real_flags,
                "{}: guest sees flags {:#x}, the device has {real_flags:#x}",
                b.index,
                lo & flag_bits
            );
            let mask = u64::from(shi) << 32 | u64::from(slo & !flag_bits);
            let after = u64::from(vm.cfg_read(off, 4) & !flag_bits)
                | if is64 {
                    u64::from(vm.cfg_read(off + 4, 4)) << 32
                } else {
                    0
                };
            ((!mask).wrapping_add(1), lo & flag_bits, after)
        };
        ensure!(
            size == b.guest_size,
            "{}: sizing reads {size:#x}, the VMM reserved {:#x}",
            b.index,
            b.guest_size
        );
        ensure!(
            size.is_power_of_two() && size >= b.region_size,
            "{}: size {size:#x} is not a power of two covering the {:#x}-byte region",
            b.index,
            b.region_size
        );
        if !b.msix_relocated && b.region_size >= PAGE {
            ensure!(
                size == b.region_size,
                "{}: size {size:#x} differs from the kernel's region of {:#x}",
                b.index,
                b.region_size
            );
        }
        ensure!(
            Some(addr) == b.base,
            "{}: register holds {addr:#x} after sizing, placement is {:#x?}",
            b.index,
            b.base
        );
        seen.push(format!(
            "{} {size:#x}@{addr:#x} flags {flags:#x}{}",
            b.index,
            if b.mapped.is_empty() { "" } else { " mapped" }
        ));
    }
    vm.cfg_write(0x04, 2, u32::from(cmd))?;
    // Mapped ranges are inside their BAR, as the VMM's mapper saw them.
    for (gpa, len) in vm.mapper.live() {
        ensure!(
            bars.iter().any(|b| b
                .base
                .is_some_and(|base| gpa >= base && gpa + len <= base + b.guest_size)),
            "guest mapping {gpa:#x}+{len:#x} lies outside every BAR"
        );
    }
    Ok(Outcome::Pass(seen.join(", ")))
}

/// Walks a capability chain in raw config bytes (bounded): (id, offset).
fn raw_caps(cfg: &[u8]) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    if cfg.get(6).is_none_or(|s| s & 0x10 == 0) {
        return out;
    }
    let mut ptr = cfg.get(0x34).copied().unwrap_or(0) & 0xfc;
    for _ in 0..48 {
        if ptr < 0x40 {
            break;
        }
        let Some(&id) = cfg.get(usize::from(ptr)) else {
            break;
        };
        out.push((id, ptr));
        ptr = cfg.get(usize::from(ptr) + 1).copied().unwrap_or(0) & 0xfc;
    }
    out
}

/// The capability chains the guest walks end, list what the VMM says it kept, and equal the
/// device's own chain minus what the VMM hid.
pub fn capability_walk(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, false)?;
    let caps = vm.capabilities()?;
    let ext = vm.ext_capabilities()?;
    let kept = vm.dev.kept_capabilities();
    let hidden = vm.dev.hidden_capabilities();
    let walked: BTreeSet<(u16, u16)> = caps
        .iter()
        .map(|&(id, off)| (u16::from(id), u16::from(off)))
        .collect();
    let kept_std: BTreeSet<(u16, u16)> = kept
        .iter()
        .filter(|k| !k.extended)
        .map(|k| (k.id, k.offset))
        .collect();
    ensure!(
        walked == kept_std,
        "guest walk {walked:x?} != kept {kept_std:x?}"
    );
    let walked_ext: BTreeSet<(u16, u16)> = ext.iter().copied().collect();
    let kept_ext: BTreeSet<(u16, u16)> = kept
        .iter()
        .filter(|k| k.extended)
        .map(|k| (k.id, k.offset))
        .collect();
    ensure!(
        walked_ext == kept_ext,
        "guest extended walk {walked_ext:x?} != kept {kept_ext:x?}"
    );
    // The device's own chain, read through VFIO, minus the hidden ones.
    let size = vm.dev.config_size().min(256);
    let mut raw = vec![0u8; size];
    vm.kernel
        .region_read(region::CONFIG, 0, &mut raw)
        .context("reading the device's config space")?;
    let device: BTreeSet<(u16, u16)> = raw_caps(&raw)
        .into_iter()
        .map(|(id, off)| (u16::from(id), u16::from(off)))
        .filter(|c| !hidden.iter().any(|h| !h.extended && h.offset == c.1))
        .collect();
    ensure!(
        walked == device,
        "guest walk {walked:x?} != device chain minus hidden {device:x?}"
    );
    for k in kept.iter().filter(|k| !k.extended) {
        let should = k.id == u16::from(cap_id::MSI) || k.id == u16::from(cap_id::MSIX);
        ensure!(
            k.emulated == should,
            "capability {:#x} at {:#x}: emulated = {}",
            k.id,
            k.offset,
            k.emulated
        );
    }
    let fmt = |v: &[(u16, u16)]| {
        v.iter()
            .map(|(id, off)| format!("{id:#x}@{off:#x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let std_list: Vec<(u16, u16)> = caps
        .iter()
        .map(|&(id, off)| (u16::from(id), u16::from(off)))
        .collect();
    Ok(Outcome::Pass(format!(
        "std [{}] ext [{}] hidden [{}]",
        fmt(&std_list),
        fmt(&ext),
        hidden
            .iter()
            .map(|h| format!("{:#x}@{:#x}", h.id, h.offset))
            .collect::<Vec<_>>()
            .join(" ")
    )))
}

/// Enabling MSI or MSI-X through the emulated capability switches VFIO's interrupt index (the
/// kernel requests exactly those vectors, named in `/proc/interrupts`) and disabling it goes
/// back to INTx.
pub fn irq_modes(ctx: &Ctx<'_>) -> Result<Outcome> {
    let vm = Vm::attach(ctx.device()?, false)?;
    vm.enable_memory_and_bus_master()?;
    let has_intx = vm.dev.intx_group().is_some();
    let base_mode = if has_intx {
        IrqMode::Intx
    } else {
        IrqMode::None
    };
    let check = |want_mode: IrqMode, want: vmm::KernelIrqs, what: &str| -> Result<()> {
        let mode = vm.dev.irq_mode();
        ensure!(
            mode == want_mode,
            "{what}: irq mode {mode:?}, expected {want_mode:?}"
        );
        let k = vmm::kernel_irqs(&vm.bdf)?;
        ensure!(
            k == want,
            "{what}: the kernel has {k} for {}, expected {want}",
            vm.bdf
        );
        Ok(())
    };
    let base = vmm::KernelIrqs {
        intx: usize::from(has_intx),
        ..Default::default()
    };
    check(base_mode, base, "at attach")?;
    let mut steps = vec![format!("attach {base_mode:?}")];
    if vm.find_cap(cap_id::MSI)?.is_some() {
        vm.msi_enable(0x41)?;
        check(
            IrqMode::Msi(1),
            vmm::KernelIrqs {
                msi: 1,
                ..Default::default()
            },
            "MSI enabled",
        )?;
        vm.msi_disable()?;
        check(base_mode, base, "MSI disabled")?;
        steps.push(format!("MSI on/off -> {base_mode:?}"));
    }
    if let Some(info) = vm.msix_info()? {
        // The table and PBA the guest is told about lie inside their BARs, apart.
        let bars = vm.dev.bars();
        let table_len = 16 * u64::from(info.size);
        let pba_len = u64::from(info.size).div_ceil(64) * 8;
        for (what, (bar, off), len) in
            [("table", info.table, table_len), ("PBA", info.pba, pba_len)]
        {
            let b = bars
                .iter()
                .find(|b| b.index.slot() == bar)
                .with_context(|| {
                    format!("MSI-X {what} in BAR{bar}, which the guest does not see")
                })?;
            ensure!(
                off + len <= b.guest_size,
                "MSI-X {what} at BAR{bar}+{off:#x} (+{len:#x}) ends past the BAR ({:#x})",
                b.guest_size
            );
        }
        ensure!(
            info.table.0 != info.pba.0
                || info.table.1 + table_len <= info.pba.1
                || info.pba.1 + pba_len <= info.table.1,
            "MSI-X table and PBA overlap: {info:x?}"
        );
        vm.msix_enable(info.size)?;
        let n = usize::try_from(info.size).context("table size")?;
        check(
            IrqMode::Msix,
            vmm::KernelIrqs {
                msix: n,
                ..Default::default()
            },
            "MSI-X enabled",
        )?;
        vm.msix_disable()?;
        check(base_mode, base, "MSI-X disabled")?;
        steps.push(format!("MSI-X ({n} vectors) on/off -> {base_mode:?}"));
    }
    if steps.len() == 1 {
        return Ok(Outcome::Skip("the device has neither MSI nor MSI-X".into()));
    }
    Ok(Outcome::Pass(steps.join(", ")))
}

/// Attach with guest RAM mapped for DMA and message interrupts enabled; return the VM.
fn busy_vm(ctx: &Ctx<'_>) -> Result<Vm> {
    let vm = Vm::attach(ctx.device()?, true)?;
    vm.enable_memory_and_bus_master()?;
    if let Some(info) = vm.msix_info()? {
        vm.msix_enable(info.size)?;
    } else if vm.find_cap(cap_id::MSI)?.is_some() {
        vm.msi_enable(0x41)?;
    }
    Ok(vm)
}

/// Dropping the device releases everything: the kernel's interrupt handlers, guest mappings,
/// BAR placements, DMA mappings (it was the only device of its container or IOAS, so the last
/// of its IOMMU domain: the same IOVA range maps again there), file descriptors and memory
/// mappings of the process, and the group (the device opens again). With another device in
/// the domain the mappings stay: see [`shared_domain_unplug`].
pub fn unplug_no_leaks(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    // A first cycle, so one-time allocations (allocator arenas, lazy statics) are not counted.
    drop(busy_vm(ctx)?);
    let before = vmm::process_resources()?;
    let vm = busy_vm(ctx)?;
    let during = vmm::process_resources()?;
    let live_maps = vm.mapper.live().len();
    let irqs_during = vmm::kernel_irqs(&vm.bdf)?;
    let Vm {
        dev: pci,
        ram,
        kernel,
        irqs,
        mapper,
        allocator,
        dma,
        bdf: _,
    } = vm;
    let domain = pci.dma_domain();
    drop(pci);
    ensure!(
        dma.domains().is_empty() && dma.mappings(domain).is_empty(),
        "the last device of {domain} went, yet the domain is live with {:x?}",
        dma.mappings(domain)
    );
    // The device let go of its interrupt groups: only the manager still holds them.
    let groups = irqs.groups();
    for g in &groups {
        ensure!(
            Arc::strong_count(g) == 2,
            "an interrupt group is still referenced {} time(s) after unplug ({g:?})",
            Arc::strong_count(g) - 2
        );
    }
    let enabled = groups.iter().filter(|g| g.is_enabled()).count();
    drop(groups);
    let k = vmm::kernel_irqs(&dev.bdf)?;
    ensure!(
        k == vmm::KernelIrqs::default(),
        "after unplug the kernel still has {k} (during: {irqs_during})"
    );
    ensure!(
        mapper.live().is_empty(),
        "guest mappings left after unplug: {:x?}",
        mapper.live()
    );
    let placements = allocator
        .lock()
        .map(|a| a.placements().count())
        .unwrap_or(usize::MAX);
    ensure!(placements == 0, "{placements} BAR placement(s) left");
    // The DMA mapping is gone: the same range maps again in the same container.
    let ram = ram.context("no guest RAM")?;
    let host = ram
        .get_host_address(GuestAddress(RAM_BASE))
        .context("guest RAM host address")?;
    let size = RAM_SIZE as u64;
    let kernel_domain = kernel.iommu_domain();
    // SAFETY: `ram` (still registered with `dma`, so kept mapped) is unmapped right below,
    // before it drops; nothing reads it meanwhile.
    unsafe {
        kernel_domain.map(
            RAM_BASE,
            size,
            DmaSource {
                host_addr: host as u64,
                file: None,
                read_only: false,
            },
        )
    }
    .context("re-mapping the guest RAM IOVA range after unplug (still mapped?)")?;
    kernel_domain.unmap(RAM_BASE, size)?;
    drop(kernel_domain);
    drop(ram);
    drop(dma);
    drop(kernel);
    drop(irqs);
    drop(mapper);
    drop(allocator);
    let after = vmm::process_resources()?;
    ensure!(
        after == before,
        "fds/maps {before:?} before attach, {during:?} attached, {after:?} after unplug"
    );
    drop(
        crate::mode::open_kernel(ctx.mode, &dev.sysfs)
            .context("re-opening the device after unplug")?,
    );
    Ok(Outcome::Pass(format!(
        "attached: {} fds (+{}), {} maps (+{}), {live_maps} guest mapping(s), kernel {irqs_during}; \
         after unplug all back to {before:?} ({enabled} released group(s) left enabled)",
        during.0,
        during.0.saturating_sub(before.0),
        during.1,
        during.1.saturating_sub(before.1)
    )))
}

/// The IOMMU reports IOVA ranges; a mapping inside one works, one past the last range, in a
/// hole between ranges or above 2^48 is refused by the kernel with an errno, and refused by
/// `GuestDma` (external mode) before it reaches the kernel.
pub fn iova_ranges(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    crate::mode::require_dma(ctx.mode)?;
    let kernel = Arc::new(crate::mode::open_kernel(ctx.mode, &dev.sysfs)?);
    let domain = kernel.iommu_domain();
    let ranges = domain.iova_ranges().context("iova_ranges")?;
    ensure!(!ranges.is_empty(), "no IOVA ranges reported");
    for w in ranges.windows(2) {
        ensure!(
            w[0].end() < w[1].start(),
            "IOVA ranges unsorted or overlapping: {ranges:x?}"
        );
    }
    // Page sizes come from the type1 container; iommufd reports no such thing per IOAS.
    let pgsizes = match kernel.container() {
        Some(c) => format!(
            "{:#x}",
            c.iommu_info().context("VFIO_IOMMU_GET_INFO")?.iova_pgsizes
        ),
        None => "n/a (iommufd)".to_string(),
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), PAGE as usize)])
        .context("one page of memory")?;
    let host = mem
        .get_host_address(GuestAddress(0))
        .context("host address")?;
    let src = DmaSource {
        host_addr: host as u64,
        file: None,
        read_only: false,
    };
    let align = |v: u64| v.checked_add(PAGE - 1).map(|x| x & !(PAGE - 1));

    // Inside the first range.
    let inside = align(*ranges[0].start()).context("first range start")?;
    // SAFETY: `mem` outlives the mapping: unmapped right below (and every later map is
    // refused or unmapped at once, before `mem` drops at the end).
    unsafe { domain.map(inside, PAGE, src) }
        .with_context(|| format!("DMA map at {inside:#x}, inside {:#x?}", ranges[0]))?;
    domain.unmap(inside, PAGE)?;

    let mut outside = Vec::new();
    if let Some(past) = ranges
        .last()
        .and_then(|r| r.end().checked_add(1))
        .and_then(align)
    {
        outside.push(("past the last range", past));
    }
    for w in ranges.windows(2) {
        if let Some(gap) = w[0].end().checked_add(1).and_then(align) {
            if gap < *w[1].start() {
                outside.push(("in a hole", gap));
            }
        }
    }
    let high = 1u64 << 48;
    if !ranges.iter().any(|r| r.contains(&high)) && !outside.iter().any(|o| o.1 == high) {
        outside.push(("at 2^48", high));
    }
    ensure!(
        !outside.is_empty(),
        "the ranges {ranges:x?} cover the whole 64-bit space: nothing to refuse"
    );
    // A VMM with a vIOMMU: the device in external DMA mode, the VMM mapping IOVAs itself.
    let vm = Vm::attach_kernel(
        kernel.clone(),
        &dev.bdf,
        GuestDma::new(),
        None,
        DmaMode::External,
    )?;
    let id = vm.dev.dma_domain();
    let mut refused = Vec::new();
    for (what, iova) in &outside {
        // SAFETY: as above: refused, or unmapped at once.
        match unsafe { domain.map(*iova, PAGE, src) } {
            Ok(()) => {
                let _ = domain.unmap(*iova, PAGE);
                bail!("the kernel accepted a DMA map at {iova:#x} ({what}); ranges {ranges:x?}");
            }
            Err(e) => {
                let errno = e.errno().with_context(|| {
                    format!("refusal at {iova:#x} ({what}) carries no errno: {e}")
                })?;
                refused.push(format!("{iova:#x} ({what}) errno {errno}"));
            }
        }
        // SAFETY: as above: refused, or (a failure of this check) unmapped with the domain's
        // last device when `vm` drops, before `mem`.
        match unsafe { vm.dma.map_external(id, *iova, PAGE, src) } {
            Ok(()) => bail!("GuestDma accepted {iova:#x} ({what}) outside {ranges:x?}"),
            Err(vfio_pci::Error::DmaOutsideIovaRanges { iova: at, .. }) => {
                ensure!(
                    at == *iova,
                    "GuestDma refused {at:#x} when asked to map {iova:#x}"
                );
            }
            Err(e) => bail!("GuestDma refused {iova:#x} ({what}) only in the kernel: {e}"),
        }
    }
    ensure!(
        vm.dma.mappings(id).is_empty(),
        "GuestDma kept a refused mapping"
    );
    drop(vm);
    Ok(Outcome::Pass(format!(
        "ranges {}; page sizes {pgsizes}; map at {inside:#x} ok; refused: {}",
        ranges
            .iter()
            .map(|r| format!("{:#x}..={:#x}", r.start(), r.end()))
            .collect::<Vec<_>>()
            .join(" "),
        refused.join(", ")
    )))
}

/// The DMA a device does with the guest RAM of the test: an edu moves a pattern RAM -> device
/// -> RAM, an NVMe controller runs Identify (command read from RAM, data and completion
/// written there).
fn device_dma(vm: &Vm, is_edu: bool) -> Result<String> {
    if is_edu {
        vm.enable_memory_and_bus_master()?;
        crate::edu::dma_check(vm)?;
        Ok(format!(
            "{} (edu) moved a pattern RAM -> device -> RAM",
            vm.bdf
        ))
    } else {
        let serial = crate::nvme::identify_check(vm)?;
        Ok(format!("{} (nvme) ran Identify, serial {serial:?}", vm.bdf))
    }
}

/// An edu and an NVMe controller in one IOMMU domain (one container in legacy mode, one IOAS
/// with iommufd), sharing one `GuestDma`: guest RAM is mapped there once, both devices reach
/// it, and unplugging either (both orders) leaves the mapping to the other, which still does
/// DMA; the last one's unplug unmaps it.
pub fn shared_domain_unplug(ctx: &Ctx<'_>) -> Result<Outcome> {
    crate::mode::require_dma(ctx.mode)?;
    let edu = ctx.devices.iter().find(|d| d.id == crate::scenarios::EDU);
    let nvme = ctx
        .devices
        .iter()
        .find(|d| d.id == crate::scenarios::QEMU_NVME);
    let (Some(edu), Some(nvme)) = (edu, nvme) else {
        return Ok(Outcome::Skip(
            "needs QEMU's edu and NVMe controller among the devices under test".into(),
        ));
    };
    let mut seen = Vec::new();
    for edu_first in [true, false] {
        let pair = [edu.clone(), nvme.clone()];
        let mut opened = crate::mode::open_all_shared(ctx.mode, &pair)?.into_iter();
        let (Some(k_edu), Some(k_nvme)) = (opened.next(), opened.next()) else {
            bail!("open_all_shared did not open both devices");
        };
        let dma = GuestDma::new();
        let mem = vmm::guest_ram()?;
        dma.add_memory(&mem).context("registering guest RAM")?;
        let vm_edu = Vm::attach_kernel(
            Arc::new(k_edu),
            &edu.bdf,
            dma.clone(),
            Some(mem.clone()),
            DmaMode::GuestPhysical,
        )?;
        let vm_nvme = Vm::attach_kernel(
            Arc::new(k_nvme),
            &nvme.bdf,
            dma.clone(),
            Some(mem),
            DmaMode::GuestPhysical,
        )?;
        let id = vm_edu.dev.dma_domain();
        ensure!(
            vm_nvme.dev.dma_domain() == id,
            "the devices of one {} report different domains ({id}, {})",
            ctx.mode.name(),
            vm_nvme.dev.dma_domain()
        );
        ensure!(
            dma.device_count(id) == 2 && dma.mappings(id).len() == 1,
            "{id}: {} device(s), mappings {:x?}; expected 2 devices and guest RAM mapped once",
            dma.device_count(id),
            dma.mappings(id)
        );
        device_dma(&vm_edu, true)?;
        device_dma(&vm_nvme, false)?;
        let (gone, stays, stays_edu) = if edu_first {
            (vm_edu, vm_nvme, false)
        } else {
            (vm_nvme, vm_edu, true)
        };
        let gone_bdf = gone.bdf.clone();
        drop(gone);
        ensure!(
            dma.device_count(id) == 1 && dma.mappings(id).len() == 1,
            "after unplugging {gone_bdf}: {} device(s), mappings {:x?}; the RAM mapping must stay",
            dma.device_count(id),
            dma.mappings(id)
        );
        let did = device_dma(&stays, stays_edu)
            .with_context(|| format!("DMA of {} after unplugging {gone_bdf}", stays.bdf))?;
        drop(stays);
        ensure!(
            dma.domains().is_empty(),
            "the last device went, yet {:?} is live",
            dma.domains()
        );
        seen.push(format!("unplugged {gone_bdf}: {did}"));
    }
    Ok(Outcome::Pass(format!(
        "{} with both devices, guest RAM mapped once; {}",
        ctx.mode.name(),
        seen.join("; ")
    )))
}

/// Reads the hot reset info; when every group it names is held by this test (all devices
/// under test opened in one container), performs the hot reset and checks the device answers.
pub fn hot_reset(ctx: &Ctx<'_>) -> Result<Outcome> {
    let dev = ctx.device()?;
    // Every device under test in one container (or one IOAS), in this run's mode.
    let mut me = None;
    let mut others = Vec::new();
    for (d, k) in ctx
        .devices
        .iter()
        .zip(crate::mode::open_all_shared(ctx.mode, ctx.devices)?)
    {
        if d.bdf == dev.bdf {
            me = Some(k);
        } else {
            others.push(k);
        }
    }
    let me = me.context("device under test not opened")?;
    let info = match me.hot_reset_info() {
        Ok(i) => i,
        // The kernel answers ENODEV when neither a slot nor a bus reset can
        // reach the function (a root-complex integrated endpoint, say): not
        // applicable by design. Any other error is a failure.
        Err(e) if e.errno() == Some(libc::ENODEV) => {
            return Ok(Outcome::Skip(format!(
                "no PCI hot reset can reach this function (VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: {e})"
            )))
        }
        Err(e) => return Err(e).context("VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"),
    };
    let affected: Vec<String> = info.devices.iter().map(|d| d.to_string()).collect();
    ensure!(
        affected.contains(&dev.bdf),
        "hot reset info {affected:?} does not list the device itself"
    );
    let held: Vec<u32> = me
        .container()
        .map(|c| c.groups().iter().map(|g| g.id()).collect())
        .unwrap_or_default();
    let missing: Vec<u32> = info
        .group_ids()
        .into_iter()
        .filter(|g| !held.contains(g))
        .collect();
    // cdev/iommufd: the kernel says whether this iommufd owns every affected device.
    if info.by_dev_id() && !info.all_owned() {
        return Ok(Outcome::Skip(format!(
            "a hot reset also resets {affected:?}, not all bound to this iommufd"
        )));
    }
    if !missing.is_empty() {
        return Ok(Outcome::Skip(format!(
            "a hot reset also resets {affected:?}, in groups {missing:?} this test does not hold"
        )));
    }
    let before = {
        let mut b = [0u8; 4];
        me.region_read(region::CONFIG, 0, &mut b)?;
        b
    };
    me.hot_reset_owned().context("hot_reset_owned")?;
    let mut after = [0u8; 4];
    me.region_read(region::CONFIG, 0, &mut after)?;
    ensure!(
        after == before && after != [0xff; 4],
        "ids {before:x?} before the hot reset, {after:x?} after"
    );
    drop(others);
    Ok(Outcome::Pass(format!(
        "reset {} device(s): {}",
        affected.len(),
        affected.join(" ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with(chain: &[(u8, u8, u8)]) -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[6] = 0x10; // Capabilities List
        c[0x34] = chain.first().map_or(0, |e| e.1);
        for &(id, off, next) in chain {
            c[usize::from(off)] = id;
            c[usize::from(off) + 1] = next;
        }
        c
    }

    #[test]
    fn raw_capability_walk_follows_next_pointers_in_chain_order() {
        let c = config_with(&[(0x11, 0x40, 0x80), (0x10, 0x80, 0x60), (0x01, 0x60, 0)]);
        assert_eq!(raw_caps(&c), vec![(0x11, 0x40), (0x10, 0x80), (0x01, 0x60)]);
    }

    #[test]
    fn raw_capability_walk_is_bounded_on_a_looping_chain_and_empty_without_the_status_bit() {
        let mut c = config_with(&[(0x05, 0x40, 0x50), (0x09, 0x50, 0x40)]);
        assert_eq!(raw_caps(&c).len(), 48);
        c[6] = 0;
        assert!(raw_caps(&c).is_empty());
    }
}
