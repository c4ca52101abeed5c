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
        // Each mode the host offers, one after the other (the device closed in between): the
        // device answers the same in each; its domain's dirty tracking differs.
        let mut first: Option<(String, Option<u64>, bool)> = None;
        let mut domain_dirty = Vec::new();
        let mut failures = Vec::new();
        for (available, via) in [
            (modes.legacy.available, "legacy"),
            (modes.cdev.available, "iommufd"),
            (modes.noiommu.available, "noiommu"),
        ] {
            if !available {
                continue;
            }
            let opened = match via {
                "legacy" => KernelDevice::open(&path),
                "iommufd" => IommufdIoas::new().and_then(|ioas| ioas.open_device(&path)),
                _ => KernelContainer::new_noiommu().and_then(|c| c.open_device(&path)),
            };
            let kd = match opened {
                Ok(kd) => kd,
                Err(e) => {
                    failures.push(format!("opening the device ({via}) failed: {e}"));
                    continue;
                }
            };
            if first.is_none() {
                let flags = kd
                    .migration_flags()
                    .map_err(|e| format!("VFIO_DEVICE_FEATURE_MIGRATION: {e}"))?
                    .map(|f| f.0);
                let dma_logging = kd
                    .dma_logging_supported()
                    .map_err(|e| format!("DMA logging probe: {e}"))?;
                first = Some((via.to_string(), flags, dma_logging));
            }
            let mut dirty = kd
                .iommu_domain()
                .dirty_page_sizes()
                .map_err(|e| e.to_string());
            if via == "iommufd" {
                // A plain IOAS does not track; a dirty-tracking HWPT
                // (IommufdIoas::new_dirty_tracking) does wherever the IOMMU has the capability.
                match kd.iommu_hw_dirty_tracking() {
                    Ok(true) => dirty = Ok(!(host_page_size() - 1)),
                    Ok(false) => {
                        dirty = Err("the IOMMU reports no IOMMU_HW_CAP_DIRTY_TRACKING, so no \
                                     dirty-tracking page table (IOMMU_HWPT_ALLOC_DIRTY_TRACKING) \
                                     can be made"
                            .into())
                    }
                    Err(e) => {
                        if let Err(why) = &mut dirty {
                            why.push_str(&format!("; IOMMU_GET_HW_INFO: {e}"));
                        }
                    }
                }
            }
            domain_dirty.push((via.to_string(), dirty));
        }
        let Some((via, flags, dma_logging)) = first else {
            return Err(if failures.is_empty() {
                "no access mode is available to open the device".into()
            } else {
                failures.join("; ")
            });
        };
        Ok(MigrationFacts {
            opened_via: via,
            flags,
            dma_logging,
            domain_dirty,
        })
    }
}

/// The host page size.
fn host_page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}
