//! Opens a host PCI function bound to the kernel's `vfio-pci` driver and
//! prints what VFIO reports of it.
//!
//! ```text
//! cargo run -p vfio-backend --example kernel_device -- /sys/bus/pci/devices/0000:01:00.0
//! ```
//!
//! The device gets a type1v2 container of its own (`KernelDevice::open`); to
//! share one container, and its DMA mappings, between devices, make a
//! `KernelContainer` and call `open_device` for each.

mod common;

use vfio_backend::kernel::KernelDevice;

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: kernel_device <sysfs path of a function bound to vfio-pci>");
        std::process::exit(2);
    };
    let result = KernelDevice::open(&path).and_then(|dev| common::describe(&dev));
    if let Err(e) = result {
        eprintln!("{path}: {e} (errno {:?})", e.errno());
        std::process::exit(1);
    }
}
