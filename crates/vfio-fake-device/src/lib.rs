//! A programmable fake PCI function for tests, benchmarks and demos, served
//! in-process through the [`vfio_backend::Vfio`] trait.
//!
//! Describe a function with a [`DeviceTemplate`] (a [`TemplateBuilder`],
//! raw config bytes, an `lspci -xxx` dump, or a built-in profile such as
//! QEMU's `edu`), then create a [`FakeDevice`]. The device behaves like a
//! function behind the kernel's `vfio-pci`:
//!
//! - config space (region 7) with writable / write-1-to-clear masks and BAR
//!   registers that answer the all-ones sizing protocol, ROM in region 6;
//! - BARs backed by memfds (mmap-able and shareable), with trapped register
//!   blocks: read-only ids, doorbells that raise interrupts, DMA engines
//!   that go through the DMA mappings, the `edu` register file, the MSI-X
//!   table and PBA (their pages are left out of the sparse mmap areas);
//! - INTx (level, automasked; PCI 2.3: Status bit 3 reads the line, Command
//!   bit 10 keeps it deasserted), MSI and MSI-X through eventfds, one index
//!   enabled at a time;
//! - no DMA while Bus Master Enable (Command bit 2) is clear: the engines
//!   report [`DmaFault::BusMasterDisabled`] and touch no memory;
//! - a fake IOMMU, [`FakeIommu`] (the device's `IommuDomain`: `map` /
//!   `map_remote` / `unmap` with overlap checks; one per device, or shared
//!   by several devices as a container is): host memory by loads and stores, files by `pread` / `pwrite`
//!   (a shrunk file is a [`DmaFault::Unreachable`], not a `SIGBUS`), and
//!   [`vfio_backend::RemoteDma`] ranges by requests; transfers that need
//!   file or remote I/O run on a DMA thread after the doorbell write, the
//!   engine busy until then (see [`FakeDevice`]);
//! - live migration through the [`vfio_backend::Vfio`] migration methods:
//!   the kernel's migration v2 state machine with STOP_COPY, P2P and
//!   PRE_COPY ([`mig_next_state`]), a versioned, checksummed stream of its
//!   config space, BAR memory, interrupt state and DMA in flight, pre-copy
//!   rounds of the pages changed since sent, and logging of the guest pages
//!   its DMA writes (see the crate README);
//! - [`Counters`] of every call, and [`Faults`] to make it fail (migration
//!   methods included: [`MigOp`]).

mod bar;
mod config;
mod device;
mod dma;
mod error;
mod inject;
mod iommu;
mod irq;
pub mod lspci;
mod mig;
mod profiles;
mod regs;
mod template;

pub use device::FakeDevice;
pub use dma::{DmaFault, MAX_DMA_MAPPINGS};
pub use error::{FakeError, FakeResult};
pub use inject::{Counters, Faults, MigOp, Op, MAX_HANG};
pub use iommu::FakeIommu;
pub use mig::{mig_next_state, MAX_LOG_PAGES, MAX_LOG_RANGES};
pub use profiles::{nvme_like, profile_template, profiles};
pub use regs::{dma_engine, edu};
pub use template::{
    cap_id, ext_cap_id, BarContents, BarKind, BarSpec, Capability, DeviceTemplate, ExtCapability,
    MsiInfo, MsixInfo, RegisterBlock, RegisterKind, ResizableBarEntry, TemplateBuilder,
    MAX_BAR_SIZE, MAX_ROM_SIZE, PAGE_SIZE, PCIE_CONFIG_SIZE, PCI_CONFIG_SIZE,
};
