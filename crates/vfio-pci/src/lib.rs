//! `VfioPciDevice`: a host PCI function, reached through any
//! [`vfio_backend::Vfio`] backend, presented to a guest as a PCI device.
//!
//! The device reads the function's config space and regions, decides what
//! the guest sees (BARs sized by the device and placed by the VMM's
//! allocator, MSI and MSI-X emulated, SR-IOV, ARI and resizable BAR hidden,
//! everything else passed through), maps device memory straight into the
//! guest through the VMM's [`GuestMapper`], wires interrupts from VFIO
//! eventfds to the VMM's [`pci_interrupts::InterruptSourceGroup`]s, and maps
//! guest RAM for the device's DMA with [`DmaMapper`].

mod device;
mod dma;
mod error;
pub mod layout;
mod mapper;

pub use device::{
    BarView, DeviceOptions, DeviceResources, DeviceSnapshot, DeviceState, HiddenCapability,
    IrqMode, KeptCapability, VfioPciDevice, CONFIG_SPACE_SIZE, DEVICE_SNAPSHOT_VERSION,
};
pub use dma::{DmaMapper, DmaMapping, DmaMode};
pub use error::{Error, Result};
pub use layout::MsixRelocation;
pub use mapper::{GuestMapper, MappingId, TrapAllMapper};
