//! Built-in devices, enumerable by name: [`profiles`] and
//! [`profile_template`].

use crate::error::{FakeError, FakeResult};
use crate::regs::edu;
use crate::template::{BarSpec, Capability, DeviceTemplate, ExtCapability, RegisterKind};

/// Layout of the `nvme-like` profile: an NVMe-class function (class
/// 01:08:02) whose BAR 0 (64-bit, 16 KiB) holds controller registers, SQ
/// doorbells that raise MSI-X vectors, and an MSI-X table that is not page
/// aligned, sharing its page with the PBA.
///
/// | BAR 0 range | what | mmap |
/// | --- | --- | --- |
/// | 0x0000..0x000c | CAP and VS (read-only) | trapped |
/// | 0x000c..0x1000 | other controller registers (memory) | trapped |
/// | 0x1000..0x1100 | doorbells: a write at `0x1000 + 8 * y` raises MSI-X vector `y` (the CQ head doorbells at `+ 4` are only stored) | trapped |
/// | 0x2000..0x3000 | memory | mmap-able |
/// | 0x3100..0x3300 | MSI-X table, 32 vectors | trapped |
/// | 0x3400..0x3408 | MSI-X PBA | trapped |
///
/// Capabilities: power management, MSI (1 vector, 64-bit, per-vector
/// masking), MSI-X, PCI Express endpoint; extended: AER, SR-IOV. The ids are
/// invented for the fake.
pub mod nvme_like {
    /// Vendor id.
    pub const VENDOR_ID: u16 = 0x1234;
    /// Device id (invented).
    pub const DEVICE_ID: u16 = 0x0f4e;
    /// Size of BAR 0.
    pub const BAR0_SIZE: u64 = 16 << 10;
    /// Controller capabilities register (8 bytes, RO).
    pub const CAP: u64 = 0x00;
    /// Its value: MQES 2047, contiguous queues required, timeout 10 s,
    /// NVM command set, doorbell stride 4 bytes.
    pub const CAP_VALUE: u64 = 0x0000_0020_1401_07ff;
    /// Version register (4 bytes, RO).
    pub const VS: u64 = 0x08;
    /// Its value: NVMe 1.4.
    pub const VS_VALUE: u32 = 0x0001_0400;
    /// First doorbell.
    pub const DOORBELLS: u64 = 0x1000;
    /// Bytes between the SQ tail doorbells of two queues.
    pub const DOORBELL_STRIDE: u64 = 8;
    /// MSI-X vectors.
    pub const MSIX_VECTORS: u32 = 32;
    /// Offset of the MSI-X table in BAR 0 (not page aligned).
    pub const MSIX_TABLE_OFFSET: u64 = 0x3100;
    /// Offset of the MSI-X PBA in BAR 0 (same page as the table).
    pub const MSIX_PBA_OFFSET: u64 = 0x3400;
    /// SR-IOV TotalVFs.
    pub const TOTAL_VFS: u16 = 8;
}

const PROFILES: &[&str] = &["edu", "nvme-like"];

/// The names of the built-in profiles.
pub fn profiles() -> &'static [&'static str] {
    PROFILES
}

/// The template of a built-in profile: `edu` (QEMU's educational device,
/// see [`crate::edu`]) or `nvme-like` (see [`nvme_like`]).
pub fn profile_template(name: &str) -> FakeResult<DeviceTemplate> {
    match name {
        "edu" => edu_template(),
        "nvme-like" => nvme_like_template(),
        _ => Err(FakeError::UnknownProfile {
            name: name.to_owned(),
            known: PROFILES.join(", "),
        }),
    }
}

fn edu_template() -> FakeResult<DeviceTemplate> {
    DeviceTemplate::builder()
        .ids(edu::VENDOR_ID, edu::DEVICE_ID)
        .revision(0x10)
        // QEMU's PCI_CLASS_OTHERS: base class 0x00, subclass 0xff.
        .class(0x00, 0xff, 0x00)
        .subsystem(0x1af4, 0x1100)
        .interrupt_pin(1)
        .bar(0, BarSpec::mem32(edu::BAR_SIZE))
        .capability(Capability::Msi {
            vectors: 1,
            addr64: true,
            per_vector_mask: false,
        })
        .registers(0, 0, edu::REGISTERS_SIZE, RegisterKind::Edu)
        .contents(0, edu::ID, edu::ID_VALUE.to_le_bytes())
        .build()
}

fn nvme_like_template() -> FakeResult<DeviceTemplate> {
    use nvme_like::*;
    DeviceTemplate::builder()
        .ids(VENDOR_ID, DEVICE_ID)
        .revision(0x02)
        .class(0x01, 0x08, 0x02)
        .subsystem(VENDOR_ID, 0x0001)
        .interrupt_pin(1)
        .bar(0, BarSpec::mem64(BAR0_SIZE))
        .capability(Capability::PowerManagement)
        .capability(Capability::Msi {
            vectors: 1,
            addr64: true,
            per_vector_mask: true,
        })
        .capability(Capability::Msix {
            vectors: MSIX_VECTORS,
            table_bar: 0,
            table_offset: MSIX_TABLE_OFFSET as u32,
            pba_bar: 0,
            pba_offset: MSIX_PBA_OFFSET as u32,
        })
        .capability(Capability::PciExpress { device_type: 0 })
        .ext_capability(ExtCapability::Aer)
        .ext_capability(ExtCapability::SrIov {
            total_vfs: TOTAL_VFS,
            vf_device_id: DEVICE_ID + 1,
        })
        .registers(0, CAP, 0x0c, RegisterKind::ReadOnly)
        .registers(0, 0x0c, 0x1000 - 0x0c, RegisterKind::Memory)
        .registers(
            0,
            DOORBELLS,
            u64::from(MSIX_VECTORS) * DOORBELL_STRIDE,
            RegisterKind::Doorbell {
                first_vector: 0,
                stride: DOORBELL_STRIDE as u32,
            },
        )
        .contents(0, CAP, CAP_VALUE.to_le_bytes())
        .contents(0, VS, VS_VALUE.to_le_bytes())
        .build()
}
