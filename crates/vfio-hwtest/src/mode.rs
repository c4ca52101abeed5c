//! The mode of a run (`--mode`: how the kernel backend reaches a function), the "not
//! applicable by design" error, and the open helpers that need only a mode. The harness and the
//! VMM model build on this module; it imports only `device`. The mode-only scenarios are in
//! `modes`.

use crate::device::Device;
use anyhow::{Context, Result};
use std::fmt;
use std::path::Path;
use std::sync::OnceLock;
use vfio_backend::kernel::{IommufdIoas, KernelContainer, KernelDevice};

/// How the kernel backend opens devices in this run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Legacy container and group, type1v2 IOMMU (the default).
    #[default]
    Legacy,
    /// iommufd and the vfio cdev.
    Iommufd,
    /// No-IOMMU mode, opted into explicitly.
    NoIommu,
}

impl Mode {
    /// Every mode, in the order `cargo xtask hwtest --kernel custom` boots them.
    pub const ALL: [Mode; 3] = [Mode::Legacy, Mode::Iommufd, Mode::NoIommu];

    /// The name used by `--mode` and in the report.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Legacy => "legacy",
            Mode::Iommufd => "iommufd",
            Mode::NoIommu => "noiommu",
        }
    }

    /// Parses a `--mode` value.
    pub fn parse(s: &str) -> Result<Mode> {
        Mode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .with_context(|| format!("--mode {s}: expected legacy, iommufd or noiommu"))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

static CURRENT: OnceLock<Mode> = OnceLock::new();

/// Sets the mode of this run (once, from `--mode`, before any scenario runs).
pub fn set_current(mode: Mode) {
    let _ = CURRENT.set(mode);
}

/// The mode of this run ([`Mode::Legacy`] unless `--mode` said otherwise). The same value as
/// [`Ctx::mode`], for code that has no context at hand (such as `Vm::attach`).
pub fn current() -> Mode {
    CURRENT.get().copied().unwrap_or_default()
}

/// Why a scenario does not apply in this mode, by design. Returned as an error (so `?` leaves
/// the scenario at once); the harness reports it as SKIP with this text.
#[derive(Debug)]
pub struct ByDesign(pub String);

impl fmt::Display for ByDesign {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ByDesign {}

/// Fails with [`ByDesign`] in no-IOMMU mode, where DMA cannot be mapped. Call it before the
/// first DMA map of a scenario that needs DMA.
pub fn require_dma(mode: Mode) -> Result<()> {
    if mode == Mode::NoIommu {
        return Err(ByDesign(
            "needs DMA mapping, which no-IOMMU mode refuses by design (no IOMMU to map into)"
                .to_string(),
        )
        .into());
    }
    Ok(())
}

/// Opens the function at `sysfs` through the kernel backend the way `mode` says: its group in
/// a type1v2 container, its cdev in a fresh IOAS, or its no-IOMMU group in a no-IOMMU
/// container. Each call uses its own container / IOAS.
pub fn open_kernel(mode: Mode, sysfs: &Path) -> Result<KernelDevice> {
    let d = sysfs.display();
    match mode {
        Mode::Legacy => KernelDevice::open(sysfs).with_context(|| format!("legacy open of {d}")),
        Mode::Iommufd => IommufdIoas::new()
            .context("iommufd: IOAS")?
            .open_device(sysfs)
            .with_context(|| format!("iommufd open of {d}")),
        Mode::NoIommu => KernelContainer::new_noiommu()
            .context("no-IOMMU container")?
            .open_device(sysfs)
            .with_context(|| format!("no-IOMMU open of {d}")),
    }
}

/// Every device under test opened into one shared IOMMU context (one container or one IOAS),
/// as a PCI hot reset needs: returns them in the order of `devices`.
pub fn open_all_shared(mode: Mode, devices: &[Device]) -> Result<Vec<KernelDevice>> {
    let mut out = Vec::new();
    match mode {
        Mode::Iommufd => {
            let ioas = IommufdIoas::new().context("iommufd: IOAS")?;
            for d in devices {
                out.push(
                    ioas.open_device(&d.sysfs)
                        .with_context(|| format!("iommufd open of {}", d.bdf))?,
                );
            }
        }
        Mode::Legacy | Mode::NoIommu => {
            let container = if mode == Mode::NoIommu {
                KernelContainer::new_noiommu()
            } else {
                KernelContainer::new()
            }
            .context("container")?;
            for d in devices {
                out.push(
                    container
                        .open_device(&d.sysfs)
                        .with_context(|| format!("open {}", d.bdf))?,
                );
            }
        }
    }
    Ok(out)
}
