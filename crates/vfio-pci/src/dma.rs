//! DMA mappings of guest RAM for the device.
//!
//! The guest programs its device with guest physical addresses, so each RAM
//! region is mapped for DMA at its guest physical address (the IOVA). Only
//! guest RAM is ever mapped, and only inside the IOVA ranges the IOMMU
//! accepts. A VMM with a virtual IOMMU uses the external mode instead: it
//! maps and unmaps IOVAs itself as the guest programs the vIOMMU.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use vfio_backend::{DmaFile, DmaSource, Vfio};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::{Error, Result};

/// How guest memory reaches the device's DMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DmaMode {
    /// Every RAM region is mapped at its guest physical address (no vIOMMU).
    #[default]
    GuestPhysical,
    /// The VMM maps and unmaps IOVAs itself (a virtual IOMMU in front of the
    /// device); [`DmaMapper::map_guest_memory`] is refused in this mode.
    External,
}

/// One live DMA mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMapping {
    /// First IOVA.
    pub iova: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host address of the first byte in this process.
    pub host_addr: u64,
}

/// Keeps the device's DMA mappings and undoes them on drop.
pub struct DmaMapper {
    vfio: Arc<dyn Vfio>,
    mode: DmaMode,
    iova_ranges: Vec<RangeInclusive<u64>>,
    mapped: Mutex<BTreeMap<u64, DmaMapping>>,
}

impl std::fmt::Debug for DmaMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaMapper")
            .field("mode", &self.mode)
            .field("iova_ranges", &self.iova_ranges)
            .field("mapped", &self.mappings().len())
            .finish()
    }
}

impl DmaMapper {
    /// A mapper for `vfio`, reading the IOVA ranges its IOMMU accepts.
    pub fn new(vfio: Arc<dyn Vfio>, mode: DmaMode) -> Result<Self> {
        let iova_ranges = vfio
            .iova_ranges()
            .map_err(|e| Error::backend("reading the IOMMU's IOVA ranges", e))?;
        Ok(DmaMapper {
            vfio,
            mode,
            iova_ranges,
            mapped: Mutex::new(BTreeMap::new()),
        })
    }

    /// The mode this mapper was made with.
    pub fn mode(&self) -> DmaMode {
        self.mode
    }

    /// The IOVA ranges the IOMMU accepts.
    pub fn iova_ranges(&self) -> &[RangeInclusive<u64>] {
        &self.iova_ranges
    }

    /// The live mappings, lowest IOVA first.
    pub fn mappings(&self) -> Vec<DmaMapping> {
        self.mapped
            .lock()
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    }

    /// Maps every region of `memory` at its guest physical address. On
    /// failure the regions this call mapped are unmapped again.
    pub fn map_guest_memory<M: GuestMemoryBackend>(&self, memory: &M) -> Result<usize> {
        if self.mode == DmaMode::External {
            return Err(Error::Dma(
                "the device is in external DMA mode: the VMM maps IOVAs itself".into(),
            ));
        }
        let mut done: Vec<(u64, u64)> = Vec::new();
        for region in memory.iter() {
            match self.map_region(region) {
                Ok(()) => done.push((region.start_addr().0, region.len())),
                Err(e) => {
                    for (iova, size) in done.into_iter().rev() {
                        if let Err(u) = self.unmap(iova, size) {
                            log::warn!("rollback of DMA mapping {iova:#x}+{size:#x}: {u}");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(done.len())
    }

    /// Maps one guest RAM region at its guest physical address (memory
    /// hotplug). An fd-backed region passes its fd, so that a vfio-user
    /// server can map the same memory.
    pub fn map_region<R: GuestMemoryRegion>(&self, region: &R) -> Result<()> {
        let gpa = region.start_addr().0;
        let size = region.len();
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| {
                Error::Dma(format!("guest region at {gpa:#x} has no host address: {e}"))
            })?;
        let file = region.file_offset().map(|fo| DmaFile {
            fd: fo.file().as_fd(),
            offset: fo.start(),
        });
        self.map_checked(
            gpa,
            size,
            DmaSource {
                host_addr: host as u64,
                file,
                read_only: false,
            },
        )
    }

    /// Maps `size` bytes at `iova` from `host`, for a VMM in external mode
    /// (a virtual IOMMU) or one that manages guest RAM itself.
    pub fn map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        self.map_checked(iova, size, host)
    }

    fn map_checked(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        let last = check_range(iova, size)?;
        if !self
            .iova_ranges
            .iter()
            .any(|r| *r.start() <= iova && last <= *r.end())
        {
            return Err(Error::Dma(format!(
                "IOVA range {iova:#x}..={last:#x} is outside the IOMMU's accepted ranges {:x?}",
                self.iova_ranges
            )));
        }
        let mut mapped = self
            .mapped
            .lock()
            .map_err(|_| Error::Dma("DMA mapping table poisoned".into()))?;
        if let Some((_, m)) = mapped.range(..=last).next_back() {
            if m.iova.saturating_add(m.size) > iova {
                return Err(Error::Dma(format!(
                    "IOVA range {iova:#x}..={last:#x} overlaps the mapping at {:#x} (+{:#x})",
                    m.iova, m.size
                )));
            }
        }
        self.vfio
            .dma_map(iova, size, host)
            .map_err(|e| Error::backend(format!("DMA map of {iova:#x} (+{size:#x})"), e))?;
        mapped.insert(
            iova,
            DmaMapping {
                iova,
                size,
                host_addr: host.host_addr,
            },
        );
        Ok(())
    }

    /// Unmaps the mapping that starts at `iova` with `size` bytes (memory
    /// hot-unplug, or the vIOMMU unmapping).
    pub fn unmap(&self, iova: u64, size: u64) -> Result<()> {
        let mut mapped = self
            .mapped
            .lock()
            .map_err(|_| Error::Dma("DMA mapping table poisoned".into()))?;
        match mapped.get(&iova) {
            Some(m) if m.size == size => {}
            _ => {
                return Err(Error::Dma(format!(
                    "no DMA mapping at {iova:#x} of {size:#x} bytes"
                )))
            }
        }
        self.vfio
            .dma_unmap(iova, size)
            .map_err(|e| Error::backend(format!("DMA unmap of {iova:#x} (+{size:#x})"), e))?;
        mapped.remove(&iova);
        Ok(())
    }

    /// Unmaps everything; errors are logged, and the table is emptied.
    pub fn unmap_all(&self) {
        let drained: Vec<DmaMapping> = match self.mapped.lock() {
            Ok(mut m) => std::mem::take(&mut *m).into_values().collect(),
            Err(_) => return,
        };
        for m in drained {
            if let Err(e) = self.vfio.dma_unmap(m.iova, m.size) {
                log::warn!("DMA unmap of {:#x} (+{:#x}): {e}", m.iova, m.size);
            }
        }
    }
}

impl Drop for DmaMapper {
    fn drop(&mut self) {
        self.unmap_all();
    }
}

/// Checks a non-empty range that does not wrap; returns its last address.
fn check_range(iova: u64, size: u64) -> Result<u64> {
    if size == 0 {
        return Err(Error::Dma(format!("empty DMA range at {iova:#x}")));
    }
    iova.checked_add(size - 1)
        .ok_or_else(|| Error::Dma(format!("DMA range {iova:#x} (+{size:#x}) wraps around")))
}
