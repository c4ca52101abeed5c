//! `VfioPciDevice`: a host PCI function, reached through any
//! [`vfio_backend::Vfio`] backend, presented to a guest as a PCI device.
//!
//! The device reads the function's config space and regions, decides what
//! the guest sees (BARs sized by the device and placed by the VMM's
//! allocator, MSI and MSI-X emulated, SR-IOV, ARI and resizable BAR hidden,
//! everything else passed through), maps device memory straight into the
//! guest through the VMM's [`GuestMapper`], wires interrupts from VFIO
//! eventfds to the VMM's [`pci_interrupts::InterruptSourceGroup`]s, and
//! attaches it to its IOMMU domain in the VMM's [`GuestDma`], which maps
//! guest RAM once per domain for the DMA of all the devices in it.
//!
//! Attach ([`VfioPciDevice::new`]) reads the device, runs pure planning stages (one PCI
//! policy each), then creates interrupt groups and places and maps BARs. No device lock
//! is held across a blocking backend call; the lock order is documented on
//! [`DeviceResources`]. Errors keep their source and errno ([`Error::errno`]).
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
//! use pci_interrupts::testing::TestInterruptManager;
//! use vfio_backend::Vfio;
//! use vfio_fake_device::FakeDevice;
//! use vfio_pci::{AddressSpace, BarIndex, DeviceOptions, DeviceResources, GuestDma, TrapAllMapper, VfioPciDevice};
//! use vm_memory::{GuestAddress, GuestMemoryMmap};
//!
//! // Any backend: here the fake device; a VMM uses the kernel or vfio-user one.
//! let vfio: Arc<dyn Vfio> = Arc::new(FakeDevice::profile("edu")?);
//! // What the VMM lends: interrupt delivery, guest mappings, BAR windows.
//! let windows = BarWindows::new(AddressWindow::new(0xc000_0000, 0x1000_0000))
//!     .with_mmio64(AddressWindow::new(1 << 40, 1 << 40));
//! // Guest RAM for DMA, at its guest physical addresses: registered once
//! // for all devices, mapped once per IOMMU domain as devices attach.
//! let dma = GuestDma::new();
//! let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)])?;
//! dma.add_memory(&ram)?;
//! let resources = DeviceResources {
//!     interrupts: Arc::new(TestInterruptManager::new()),
//!     mapper: Arc::new(TrapAllMapper),
//!     allocator: Arc::new(Mutex::new(BarAllocator::new(windows)?)),
//!     dma,
//! };
//! let dev = VfioPciDevice::new(vfio, resources, DeviceOptions::default())?;
//!
//! // The guest's config and BAR accesses go through the device.
//! let mut id = [0u8; 4];
//! dev.read_config(0, &mut id);
//! assert_eq!(u32::from_le_bytes(id), 0x11e8_1234);
//! let bar0 = &dev.bars()[0];
//! println!("BAR0 at {:#x}, {} bytes trapped", bar0.base.unwrap_or(0), bar0.trapped_bytes());
//! let base = bar0.base.unwrap_or(0);
//! assert_eq!(dev.bar_at(base + 4, AddressSpace::Memory), Some((BarIndex::Bar(0), 4)));
//!
//! // The guest moves BAR0 as Linux does: decoding off, new address, decoding on. Each
//! // write says what the VMM's bus must change.
//! let mut cmd = [0u8; 2];
//! dev.read_config(4, &mut cmd);
//! let cmd = u16::from_le_bytes(cmd);
//! dev.write_config(4, &(cmd & !0x2).to_le_bytes())?;
//! let moved = base + 0x10_0000;
//! let outcome = dev.write_config(0x10, &(moved as u32).to_le_bytes())?;
//! // Not applied while decoding is off: BAR0 decodes nowhere.
//! assert!(outcome.bar(BarIndex::Bar(0)).is_some_and(|c| c.decode_off()));
//! let outcome = dev.write_config(4, &(cmd | 0x2).to_le_bytes())?;
//! assert_eq!(outcome.memory_decode, Some(true));
//! let change = outcome.bar(BarIndex::Bar(0)).copied();
//! assert_eq!(change.and_then(|c| c.added()).map(|r| r.base), Some(moved));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod device;
mod dma;
mod error;
pub mod layout;
mod mapper;
pub mod migration;
mod outcome;

pub use device::{
    BarView, DeviceOptions, DeviceResources, DeviceSnapshot, DeviceState, HiddenCapability,
    IrqMode, KeptCapability, LoadedMigration, MigrationCaps, MigrationSource, VfioPciDevice,
    CONFIG_SPACE_SIZE, DEVICE_SNAPSHOT_VERSION,
};
pub use dma::{DirtyBitmap, DmaMapping, DmaMode, GuestDma};
pub use error::{Error, Result};
pub use layout::MsixRelocation;
pub use mapper::{GuestMapper, MappingId, TrapAllMapper};
pub use outcome::{AddressSpace, BarChange, BarIndex, BarRange, ConfigWriteOutcome};
