//! One dependency for a VMM: the VFIO PCI passthrough stack re-exported, and
//! the KVM glue behind the `kvm` feature.
#![cfg_attr(docsrs, feature(doc_cfg))]

mod builder;
mod error;
mod host_iommu;
#[cfg(feature = "kvm")]
#[cfg_attr(docsrs, doc(cfg(feature = "kvm")))]
pub mod kvm;

pub use builder::{DeviceBackend, DeviceBuilder, KernelMode, PassthroughDevice};
pub use error::{Error, Result};
pub use host_iommu::{HostDomain, HostIommu};
pub use pci_bar_alloc;
pub use pci_config;
pub use pci_interrupts;
pub use vfio_backend;
pub use vfio_pci;
/// Live migration: the source handle, the stream, the dirty bitmap of guest RAM
/// (see [`vfio_pci::migration`]).
pub use vfio_pci::migration;
pub use vfio_pci::{DirtyBitmap, LoadedMigration, MigrationCaps, MigrationSource};
