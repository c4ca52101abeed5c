//! Shared by the examples: prints what any `Vfio` backend reports of a PCI
//! device, through the trait alone.

use vfio_backend::{region, Result, Vfio};

/// The interrupt indices of a PCI device, by name (VFIO_PCI_*_IRQ_INDEX).
const IRQ_NAMES: [&str; 5] = ["INTx", "MSI", "MSI-X", "ERR", "REQ"];

/// Prints device info, every region and every interrupt index of `dev`,
/// then reads the vendor and device ids from the config region.
pub fn describe(dev: &dyn Vfio) -> Result<()> {
    let info = dev.device_info()?;
    println!(
        "device: {} regions, {} irq indices, flags {:#x} (PCI: {}, reset: {})",
        info.num_regions,
        info.num_irqs,
        info.flags,
        info.is_pci(),
        info.supports_reset()
    );
    for index in 0..info.num_regions.min(region::NUM_PCI_REGIONS) {
        let r = dev.region_info(index)?;
        if r.size == 0 {
            continue;
        }
        let mmap: Vec<String> = r
            .mmap_areas()
            .iter()
            .map(|a| format!("{:#x}+{:#x}", a.offset, a.size))
            .collect();
        println!(
            "  region {index}: {:#x} bytes, read {} write {}, mmap areas [{}]",
            r.size,
            r.readable(),
            r.writable(),
            mmap.join(", ")
        );
    }
    for (index, name) in (0..info.num_irqs).zip(IRQ_NAMES) {
        let irq = dev.irq_info(index)?;
        println!(
            "  irq {name}: {} vector(s), flags {:#x}",
            irq.count, irq.flags
        );
    }
    let mut ids = [0u8; 4];
    dev.region_read(region::CONFIG, 0, &mut ids)?;
    println!(
        "  config: vendor {:04x} device {:04x}",
        u16::from_le_bytes([ids[0], ids[1]]),
        u16::from_le_bytes([ids[2], ids[3]])
    );
    Ok(())
}
