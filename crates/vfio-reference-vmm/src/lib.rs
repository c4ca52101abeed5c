//! A reference VMM: the smallest honest x86_64 KVM VMM that boots a stock Linux with PCI
//! devices passed through by `vfio-passthrough`: host functions bound to vfio-pci and
//! vfio-user servers. It shows a VMM author how the crates are wired (see `vmm.rs`), and is
//! the vehicle of the end-to-end tests in which a real guest kernel drives a device through
//! `VfioPciDevice`. It is not a production VMM: see the README for what it lacks.
//!
//! The parts that need no KVM are modules of their own and tested on any host: the command
//! line ([`args`]), the PCI bus with its host bridge, configuration mechanism #1 and the BAR
//! map ([`pci`]), the CMOS clock ([`rtc`]), the MP table ([`mptable`]) and the address map and e820 ([`layout`]).

pub mod args;
pub mod error;
pub mod layout;
pub mod mptable;
pub mod pci;
pub mod rtc;

#[cfg(target_arch = "x86_64")]
pub mod boot;
#[cfg(target_arch = "x86_64")]
pub mod vmm;

pub use error::{Error, Result};
