//! `VfioPciDevice`: a host PCI function, reached through any
//! [`vfio_backend::Vfio`] backend, presented to a guest as a PCI device.

mod dma;
mod error;
pub mod layout;
mod mapper;

pub use dma::{DmaMapper, DmaMapping, DmaMode};
pub use error::{Error, Result};
pub use mapper::{GuestMapper, MappingId, TrapAllMapper};
