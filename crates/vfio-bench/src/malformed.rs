//! A corpus of broken devices, served by the fake device.
//!
//! The fake refuses to build most broken templates, so each broken device
//! is a sound fake seen through a [`PatchedDevice`]: a [`Vfio`] wrapper that
//! overlays bytes on the config space the device reports and overrides the
//! sizes of its regions. What the guest and `vfio-pci` see is exactly what a
//! broken (or hostile) device would show them.
//!
//! Each [`Case`] documents what the stack must do with it; the tests in
//! `tests/malformed_devices.rs` pin that down.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use vfio_backend::{
    region, DeviceInfo, IrqInfo, Mapping, RegionInfo, Result as VfioResult, SparseArea, Vfio,
};
use vfio_fake_device::{BarSpec, Capability, DeviceTemplate, FakeDevice};

use crate::{Error, Result};

/// A fake device with config bytes and region sizes overridden.
pub struct PatchedDevice {
    fake: Arc<FakeDevice>,
    config: Vec<(usize, u8)>,
    sizes: Vec<(u32, u64)>,
}

impl std::fmt::Debug for PatchedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatchedDevice")
            .field("config", &self.config)
            .field("sizes", &self.sizes)
            .finish_non_exhaustive()
    }
}

impl PatchedDevice {
    /// `fake`, unpatched.
    pub fn new(fake: Arc<FakeDevice>) -> PatchedDevice {
        PatchedDevice {
            fake,
            config: Vec::new(),
            sizes: Vec::new(),
        }
    }

    /// Config space reads show `bytes` at `offset` (later patches win).
    pub fn with_config(mut self, offset: usize, bytes: &[u8]) -> PatchedDevice {
        for (i, b) in bytes.iter().enumerate() {
            self.config.push((offset.saturating_add(i), *b));
        }
        self
    }

    /// Region `index` reports `size` bytes.
    pub fn with_region_size(mut self, index: u32, size: u64) -> PatchedDevice {
        self.sizes.push((index, size));
        self
    }

    /// The fake device underneath (its counters and faults).
    pub fn fake(&self) -> &Arc<FakeDevice> {
        &self.fake
    }
}

impl Vfio for PatchedDevice {
    fn device_info(&self) -> VfioResult<DeviceInfo> {
        self.fake.device_info()
    }

    fn region_info(&self, index: u32) -> VfioResult<RegionInfo> {
        let mut info = self.fake.region_info(index)?;
        if let Some(&(_, size)) = self.sizes.iter().rev().find(|(i, _)| *i == index) {
            info.size = size;
        }
        Ok(info)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> VfioResult<()> {
        self.fake.region_read(index, offset, data)?;
        if index == region::CONFIG {
            for &(at, b) in &self.config {
                let rel = (at as u64).checked_sub(offset);
                if let Some(slot) = rel
                    .and_then(|r| usize::try_from(r).ok())
                    .and_then(|r| data.get_mut(r))
                {
                    *slot = b;
                }
            }
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> VfioResult<()> {
        self.fake.region_write(index, offset, data)
    }

    fn mmap_region(&self, index: u32, area: SparseArea) -> VfioResult<Mapping> {
        self.fake.mmap_region(index, area)
    }

    fn irq_info(&self, index: u32) -> VfioResult<IrqInfo> {
        self.fake.irq_info(index)
    }

    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> VfioResult<()> {
        self.fake.set_irq_eventfds(index, start, fds)
    }

    fn disable_irqs(&self, index: u32) -> VfioResult<()> {
        self.fake.disable_irqs(index)
    }

    fn unmask_irq(&self, index: u32) -> VfioResult<()> {
        self.fake.unmask_irq(index)
    }

    fn mask_irq(&self, index: u32) -> VfioResult<()> {
        self.fake.mask_irq(index)
    }

    fn set_irq_unmask_eventfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> VfioResult<()> {
        self.fake.set_irq_unmask_eventfd(index, fd)
    }

    fn reset(&self) -> VfioResult<()> {
        self.fake.reset()
    }

    fn iommu_domain(&self) -> std::sync::Arc<dyn vfio_backend::IommuDomain> {
        self.fake.iommu_domain()
    }

    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        self.fake.region_mmap_fd(index)
    }

    fn migration_flags(&self) -> VfioResult<Option<vfio_backend::MigrationFlags>> {
        self.fake.migration_flags()
    }

    fn mig_state(&self) -> VfioResult<vfio_backend::MigState> {
        self.fake.mig_state()
    }

    fn set_mig_state(
        &self,
        state: vfio_backend::MigState,
    ) -> VfioResult<Option<Box<dyn vfio_backend::MigrationStream>>> {
        self.fake.set_mig_state(state)
    }

    fn mig_data_size(&self) -> VfioResult<u64> {
        self.fake.mig_data_size()
    }

    fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[vfio_backend::DirtyRange],
    ) -> VfioResult<()> {
        self.fake.dma_logging_start(page_size, ranges)
    }

    fn dma_logging_stop(&self) -> VfioResult<()> {
        self.fake.dma_logging_stop()
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> VfioResult<()> {
        self.fake
            .dma_logging_report(iova, length, page_size, bitmap)
    }
}

/// One broken device of the corpus.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Case {
    /// The standard capability list loops: the second capability points
    /// back at the first.
    StdCapLoop,
    /// The extended capability list loops back to 0x100.
    ExtCapLoop,
    /// A standard capability's next pointer points into the header (0x20).
    StdCapIntoHeader,
    /// The MSI-X capability's next pointer names its own Table Offset/BIR
    /// register (MSI-X + 4): a capability inside the 12 bytes of another.
    StdCapInsideMsix,
    /// An extended capability's next pointer points below 0x100 (into the
    /// standard area).
    ExtCapIntoStandard,
    /// The only MSI-X capability sits at 0xfc: its 12 bytes run past the
    /// end of the 256-byte standard area, over the first extended
    /// capability's header.
    StdCapPastEnd,
    /// The last extended capability is an AER capability at 0xffc whose
    /// 0x48 bytes run past the end of config space.
    ExtCapPastEnd,
    /// The MSI-X table's BIR names BAR 3, which the device does not have.
    MsixBirMissingBar,
    /// The MSI-X table's BIR is 7, a reserved value.
    MsixBirReserved,
    /// The MSI-X table (2048 vectors, 32 KiB) is larger than its 16 KiB BAR.
    MsixTableLargerThanBar,
    /// BAR 5 declares a 64-bit memory BAR, which would need a seventh register.
    Bar5Is64Bit,
    /// BAR 2's register declares a memory BAR but the region has 0 bytes.
    ZeroSizeBar,
    /// The ROM region exists but has 0 bytes.
    ZeroSizeRom,
    /// The config region is 32 bytes, smaller than the 64-byte header.
    TinyConfigRegion,
    /// The config region is 128 bytes but the capability chain goes on
    /// past it.
    ChainPastConfigRegion,
    /// The device answers nothing (every call fails with EIO) from the start.
    DeadFromTheStart,
}

impl Case {
    /// Every case.
    pub const ALL: [Case; 16] = [
        Case::StdCapLoop,
        Case::ExtCapLoop,
        Case::StdCapIntoHeader,
        Case::StdCapInsideMsix,
        Case::ExtCapIntoStandard,
        Case::StdCapPastEnd,
        Case::ExtCapPastEnd,
        Case::MsixBirMissingBar,
        Case::MsixBirReserved,
        Case::MsixTableLargerThanBar,
        Case::Bar5Is64Bit,
        Case::ZeroSizeBar,
        Case::ZeroSizeRom,
        Case::TinyConfigRegion,
        Case::ChainPastConfigRegion,
        Case::DeadFromTheStart,
    ];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Case::StdCapLoop => "std-cap-loop",
            Case::ExtCapLoop => "ext-cap-loop",
            Case::StdCapIntoHeader => "std-cap-into-header",
            Case::StdCapInsideMsix => "std-cap-inside-msix",
            Case::ExtCapIntoStandard => "ext-cap-into-standard",
            Case::StdCapPastEnd => "std-cap-past-end",
            Case::ExtCapPastEnd => "ext-cap-past-end",
            Case::MsixBirMissingBar => "msix-bir-missing-bar",
            Case::MsixBirReserved => "msix-bir-reserved",
            Case::MsixTableLargerThanBar => "msix-table-larger-than-bar",
            Case::Bar5Is64Bit => "bar5-64-bit",
            Case::ZeroSizeBar => "zero-size-bar",
            Case::ZeroSizeRom => "zero-size-rom",
            Case::TinyConfigRegion => "tiny-config-region",
            Case::ChainPastConfigRegion => "chain-past-config-region",
            Case::DeadFromTheStart => "dead-from-the-start",
        }
    }

    /// The broken device, and the sound fake underneath it.
    pub fn build(self) -> Result<(Arc<PatchedDevice>, Arc<FakeDevice>)> {
        let (fake, patch): (Arc<FakeDevice>, Patch) = match self {
            Case::StdCapLoop => (nvme()?, |p, c| {
                let second = c.std.get(1).copied().unwrap_or(0x40);
                let first = c.std.first().copied().unwrap_or(0x40);
                p.with_config(second + 1, &[first as u8])
            }),
            Case::ExtCapLoop => (nvme()?, |p, c| {
                let last = c.ext.last().copied().unwrap_or(0x100);
                ext_next(p, last, 0x100)
            }),
            Case::StdCapIntoHeader => (nvme()?, |p, c| {
                let first = c.std.first().copied().unwrap_or(0x40);
                p.with_config(first + 1, &[0x20])
            }),
            Case::StdCapInsideMsix => (nvme()?, |p, c| {
                p.with_config(c.msix + 1, &[(c.msix + 4) as u8])
            }),
            Case::ExtCapIntoStandard => (nvme()?, |p, _| ext_next(p, 0x100, 0x40)),
            Case::StdCapPastEnd => (nvme()?, |p, c| {
                // Unlink the MSI-X capability from where it is and
                // link a copy of its first dword at 0xfc at the end.
                let before = c
                    .std
                    .iter()
                    .position(|&o| o == c.msix)
                    .and_then(|i| i.checked_sub(1))
                    .and_then(|i| c.std.get(i))
                    .copied()
                    .unwrap_or(0x40);
                let after = c
                    .std
                    .iter()
                    .position(|&o| o == c.msix)
                    .and_then(|i| c.std.get(i + 1))
                    .copied()
                    .unwrap_or(0);
                let last = c.std.last().copied().unwrap_or(0x40);
                p.with_config(before + 1, &[after as u8])
                    .with_config(last + 1, &[0xfc])
                    .with_config(0xfc, &[0x11, 0x00])
                    .with_config(0xfe, &c.msix_control.to_le_bytes())
            }),
            Case::ExtCapPastEnd => (nvme()?, |p, c| {
                let last = c.ext.last().copied().unwrap_or(0x100);
                // AER, version 2, last in the list.
                ext_next(p, last, 0xffc).with_config(0xffc, &0x0002_0001u32.to_le_bytes())
            }),
            Case::MsixBirMissingBar => (nvme()?, |p, c| {
                let t = c.msix_table_reg | 3;
                p.with_config(c.msix + 4, &t.to_le_bytes())
            }),
            Case::MsixBirReserved => (nvme()?, |p, c| {
                let t = c.msix_table_reg | 7;
                p.with_config(c.msix + 4, &t.to_le_bytes())
            }),
            Case::MsixTableLargerThanBar => (nvme()?, |p, c| {
                // Table size field is N - 1: 2047 means 2048 vectors.
                p.with_config(c.msix + 2, &0x07ffu16.to_le_bytes())
            }),
            Case::Bar5Is64Bit => (two_bars(5)?, |p, _| {
                p.with_config(0x24, &0x0000_0004u32.to_le_bytes())
            }),
            Case::ZeroSizeBar => (two_bars(2)?, |p, _| p.with_region_size(2, 0)),
            Case::ZeroSizeRom => (with_rom()?, |p, _| p.with_region_size(region::ROM, 0)),
            Case::TinyConfigRegion => (nvme()?, |p, _| p.with_region_size(region::CONFIG, 32)),
            Case::ChainPastConfigRegion => {
                (nvme()?, |p, _| p.with_region_size(region::CONFIG, 128))
            }
            Case::DeadFromTheStart => (nvme()?, |p, _| {
                p.fake().faults().set_dead(true);
                p
            }),
        };
        let chains = Chains::of(fake.template().config());
        let dev = patch(PatchedDevice::new(fake.clone()), &chains);
        Ok((Arc::new(dev), fake))
    }
}

/// How a case breaks a sound device.
type Patch = fn(PatchedDevice, &Chains) -> PatchedDevice;

fn ext_next(p: PatchedDevice, at: usize, next: usize) -> PatchedDevice {
    let hdr = p.fake.template().config();
    let mut b = [0u8; 4];
    if let Some(s) = hdr.get(at..at + 4) {
        b.copy_from_slice(s);
    }
    let v = (u32::from_le_bytes(b) & 0x000f_ffff) | ((next as u32 & 0xffc) << 20);
    p.with_config(at, &v.to_le_bytes())
}

/// Capability offsets of a sound config space.
struct Chains {
    std: Vec<usize>,
    ext: Vec<usize>,
    msix: usize,
    msix_control: u16,
    msix_table_reg: u32,
}

impl Chains {
    fn of(config: &[u8]) -> Chains {
        let std: Vec<(usize, u8)> = pci_config::parse_capabilities(config)
            .unwrap_or_default()
            .iter()
            .map(|c| (usize::from(c.offset), c.id))
            .collect();
        let ext = pci_config::parse_extended_capabilities(config)
            .unwrap_or_default()
            .iter()
            .map(|c| usize::from(c.offset))
            .collect();
        let msix = std.iter().find(|c| c.1 == 0x11).map_or(0x40, |c| c.0);
        let mut b = [0u8; 4];
        if let Some(s) = config.get(msix + 4..msix + 8) {
            b.copy_from_slice(s);
        }
        let mut ctl = [0u8; 2];
        if let Some(s) = config.get(msix + 2..msix + 4) {
            ctl.copy_from_slice(s);
        }
        Chains {
            std: std.iter().map(|c| c.0).collect(),
            ext,
            msix,
            msix_control: u16::from_le_bytes(ctl),
            msix_table_reg: u32::from_le_bytes(b) & !7,
        }
    }
}

fn nvme() -> Result<Arc<FakeDevice>> {
    crate::devices::profile("nvme-like")
}

/// A device with 4 KiB memory BARs 0 and `other`.
fn two_bars(other: u8) -> Result<Arc<FakeDevice>> {
    let t = DeviceTemplate::builder()
        .ids(0x1234, 0xbad0)
        .class(0xff, 0x00, 0x00)
        .bar(0, BarSpec::mem32(0x1000))
        .bar(other, BarSpec::mem32(0x1000))
        .capability(Capability::PowerManagement)
        .build()?;
    Ok(Arc::new(FakeDevice::new(t)?))
}

fn with_rom() -> Result<Arc<FakeDevice>> {
    let t = DeviceTemplate::builder()
        .ids(0x1234, 0xbad1)
        .class(0xff, 0x00, 0x00)
        .bar(0, BarSpec::mem32(0x1000))
        .rom(vec![0x55, 0xaa, 0x01])
        .build()?;
    Ok(Arc::new(FakeDevice::new(t)?))
}

/// The case named `name`.
pub fn case(name: &str) -> Result<Case> {
    Case::ALL
        .into_iter()
        .find(|c| c.name() == name)
        .ok_or_else(|| Error::Missing(format!("no malformed case named {name}")))
}
