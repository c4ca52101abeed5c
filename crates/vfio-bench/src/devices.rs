//! Fake devices beyond the built-in profiles.

use std::sync::Arc;

use vfio_fake_device::{BarSpec, Capability, DeviceTemplate, FakeDevice, RegisterKind};

use crate::Result;

/// Offset of the MSI-X table in BAR 0 of [`msix_device`].
pub const MSIX_TABLE: u64 = 0x1_0000;
/// Size of BAR 0 of [`msix_device`]: room for 2048 vectors and the PBA.
pub const MSIX_BAR_SIZE: u64 = 0x2_0000;
/// A trapped register block of [`msix_device`] (plain memory, 4 KiB at 0).
pub const REGS: u64 = 0x0;

/// A PCIe endpoint with INTA#, MSI-X with `vectors` vectors (1 to 2048)
/// whose table is at [`MSIX_TABLE`] of a 64-bit BAR 0 and PBA right
/// after it, and a trapped register page at [`REGS`].
pub fn msix_device(vectors: u32) -> Result<Arc<FakeDevice>> {
    let pba = MSIX_TABLE + u64::from(vectors) * 16;
    let pba = pba.div_ceil(8) * 8;
    let t = DeviceTemplate::builder()
        .ids(0x1234, 0xbe00)
        .class(0x02, 0x00, 0x00)
        .interrupt_pin(1)
        .bar(0, BarSpec::mem64(MSIX_BAR_SIZE))
        .capability(Capability::Msix {
            vectors,
            table_bar: 0,
            table_offset: MSIX_TABLE as u32,
            pba_bar: 0,
            pba_offset: pba as u32,
        })
        .capability(Capability::PciExpress { device_type: 0 })
        .registers(0, REGS, 0x1000, RegisterKind::Memory)
        .build()?;
    Ok(Arc::new(FakeDevice::new(t)?))
}

/// The fake device of a built-in profile (`edu`, `nvme-like`).
pub fn profile(name: &str) -> Result<Arc<FakeDevice>> {
    Ok(Arc::new(FakeDevice::profile(name)?))
}
