//! The real [`MigrationProbe`] of `check`: opens the device through the kernel backend in the
//! first access mode the host offers (legacy group, iommufd + cdev, no-IOMMU) and asks it and
//! its IOMMU domain. Opening is what a VMM does: vfio-pci resets the function on open, and a
//! device a VMM holds is busy (the item is then skipped, saying so).

use vfio_backend::kernel::{IommufdIoas, KernelContainer, KernelDevice};
use vfio_backend::Vfio;

use crate::check::{Device, MigrationFacts, MigrationProbe, Modes};

/// Asks the device through `/dev/vfio` or `/dev/iommu` on this host.
pub struct KernelProbe {
    /// `check --root` is `/`: the sysfs read is this host's, so the device can be opened.
    pub real_root: bool,
}

impl MigrationProbe for KernelProbe {
    fn probe(&self, dev: &Device, modes: &Modes) -> Result<MigrationFacts, String> {
        if !self.real_root {
            return Err(
                "--root is not /: migration is asked of the device itself, through VFIO, on \
                 the live host"
                    .into(),
            );
        }
        if dev.driver.as_deref() != Some("vfio-pci") {
            return Err("the device is not bound to vfio-pci".into());
        }
        let path = format!("/sys/bus/pci/devices/{}", dev.bdf);
        let (kd, via) = if modes.legacy.available {
            (KernelDevice::open(&path), "legacy")
        } else if modes.cdev.available {
            (
                IommufdIoas::new().and_then(|ioas| ioas.open_device(&path)),
                "iommufd",
            )
        } else if modes.noiommu.available {
            (
                KernelContainer::new_noiommu().and_then(|c| c.open_device(&path)),
                "noiommu",
            )
        } else {
            return Err("no access mode is available to open the device".into());
        };
        let kd = kd.map_err(|e| format!("opening the device ({via}) failed: {e}"))?;
        let flags = kd
            .migration_flags()
            .map_err(|e| format!("VFIO_DEVICE_FEATURE_MIGRATION: {e}"))?
            .map(|f| f.0);
        let dma_logging = kd
            .dma_logging_supported()
            .map_err(|e| format!("DMA logging probe: {e}"))?;
        let mut domain_dirty = kd
            .iommu_domain()
            .dirty_page_sizes()
            .map_err(|e| e.to_string());
        if let Err(why) = &mut domain_dirty {
            if let Ok(hw) = kd.iommu_hw_dirty_tracking() {
                if via == "iommufd" {
                    why.push_str(if hw {
                        "; the IOMMU reports IOMMU_HW_CAP_DIRTY_TRACKING"
                    } else {
                        "; the IOMMU reports no IOMMU_HW_CAP_DIRTY_TRACKING"
                    });
                }
            }
        }
        Ok(MigrationFacts {
            opened_via: via.to_string(),
            flags,
            dma_logging,
            domain_dirty,
        })
    }
}
