//! KVM glue: what a KVM-based VMM plugs into the passthrough stack.
//!
//! * [`KvmInterruptManager`] implements [`pci_interrupts::InterruptManager`]: every MSI/MSI-X
//!   vector is an eventfd registered as a KVM irqfd on a GSI of its own, whose entry in the
//!   GSI routing table carries the guest-programmed address and data; INTx is an irqfd with a
//!   resample eventfd on an IOAPIC pin. Interrupts go device -> eventfd -> KVM -> guest, with no
//!   userspace hop. On arm64 with a GICv3 ITS, give each device's manager the device id the
//!   guest's firmware tables map its requester id to
//!   ([`with_device_id`](KvmInterruptManager::with_device_id)): its MSI routes then carry it
//!   (`KVM_MSI_VALID_DEVID`), as the ITS translates messages per device.
//! * [`GsiRouting`] is the VM's GSI routing table, shared by the VMM and the interrupt groups:
//!   `KVM_SET_GSI_ROUTING` replaces the whole table, so everybody edits one copy and commits it.
//! * [`KvmGuestMapper`] implements [`vfio_pci::GuestMapper`] with KVM user memory slots, so the
//!   guest reaches mmapped BARs with no VM exit.
//! * [`KvmVfioDevice`] is the KVM-VFIO pseudo device, which tells KVM about VFIO groups or
//!   device files (needed for coherent DMA handling, the PPC TCE table and some interrupt
//!   bypass paths).
//!
//! A VMM typically does, once per VM:
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use vfio_passthrough::kvm::{GsiRouting, IntxLine, KvmGuestMapper, KvmInterruptManager};
//!
//! let kvm = kvm_ioctls::Kvm::new()?;
//! let vm = Arc::new(kvm.create_vm()?);
//! vm.create_irq_chip()?;
//! let routing = Arc::new(GsiRouting::new(vm.clone()));
//! routing.add_x86_legacy_routes()?; // keep the PIC/IOAPIC pins routed
//! let interrupts = KvmInterruptManager::new(routing.clone(), 24..1024)?
//!     .with_intx(IntxLine::ioapic(10, 10));
//! let mapper = KvmGuestMapper::new(vm.clone(), 100..200)?;
//! # let _ = (interrupts, mapper);
//! # Ok(())
//! # }
//! ```

mod interrupts;
mod mapper;
mod routing;
mod vfio_device;

pub use interrupts::{IntxLine, KvmInterruptGroup, KvmInterruptManager};
pub use mapper::KvmGuestMapper;
pub use routing::{GsiRoute, GsiRouting, MAX_GSI_ROUTES};
pub use vfio_device::KvmVfioDevice;

/// Locks `m`, recovering the data if a thread panicked while holding it: every critical
/// section of the KVM glue leaves its state consistent (no panics inside, by the crate's
/// rules), and one thread's panic must not become a panic in every vCPU thread. The one lock
/// helper of the KVM glue.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Turns a KVM ioctl error into this crate's error, keeping the errno.
fn kvm_error(op: &'static str, err: kvm_ioctls::Error) -> crate::Error {
    crate::Error::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(err.errno()),
    }
}
