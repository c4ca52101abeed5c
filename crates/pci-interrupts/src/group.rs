//! The seam between the interrupt state machines and the VMM that delivers interrupts.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Result;

/// Where a message-signalled interrupt goes: the address and data the guest programmed.
///
/// For MSI the data already carries the vector number in its low bits (multiple message
/// enable); for MSI-X it is the entry's 32-bit data. For INTx the route is unused (all zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MsiRoute {
    /// Message address (upper half zero for a 32-bit MSI capability).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// A set of interrupt vectors the VMM delivers to the guest (KVM: irqfds wired to GSI routes).
///
/// # State and contract
/// A group as created by an [`InterruptManager`] is disabled and every vector is masked.
/// A vector reaches the guest if and only if the group is enabled and the vector's last
/// [`update`](Self::update) said `masked == false`; it then goes to the route given there.
///
/// * Each vector has a notifier eventfd that stays the same for the life of the group. A device
///   (a VFIO device, through `VFIO_DEVICE_SET_IRQS`) signals it; masking never replaces or
///   unregisters it. While a vector is masked, or the group disabled, the VMM must not inject
///   it, and a signal that arrives meanwhile stays latched in the eventfd: the VMM injects it
///   when the vector is delivered again (KVM does this when an irqfd is re-assigned to an
///   eventfd that is already signalled).
/// * [`disable`](Self::disable) masks every vector as well; after [`enable`](Self::enable)
///   vectors stay masked until an `update` unmasks them.
/// * The state machines of this crate call [`trigger`](Self::trigger) only for a vector that
///   is deliverable (group enabled, vector unmasked).
///
/// Calls carry `&self`: an implementation keeps its own (short) lock.
pub trait InterruptSourceGroup: Send + Sync {
    /// Number of vectors in the group.
    fn len(&self) -> u32;

    /// Whether the group has no vectors.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The eventfd a device signals to raise `vector` (KVM: an irqfd), or `None` when out of
    /// range.
    fn notifier(&self, vector: u32) -> Option<BorrowedFd<'_>>;

    /// For level-triggered INTx: the eventfd the VMM signals when the guest ends the interrupt
    /// (KVM: the irqfd resample fd), which a VFIO device uses as its unmask eventfd. `None` for
    /// message-signalled groups, which is the default.
    fn resample_notifier(&self, vector: u32) -> Option<BorrowedFd<'_>> {
        let _ = vector;
        None
    }

    /// Sets the route of `vector` and whether it is masked. A masked vector keeps its notifier;
    /// only delivery stops (see the trait docs). `route` is meaningful when `masked` is false.
    fn update(&self, vector: u32, route: MsiRoute, masked: bool) -> Result<()>;

    /// Starts delivery of the group's unmasked vectors.
    fn enable(&self) -> Result<()>;

    /// Stops delivery of every vector and masks them all.
    fn disable(&self) -> Result<()>;

    /// Injects `vector` now, as if its notifier had been signalled.
    fn trigger(&self, vector: u32) -> Result<()>;
}

/// Creates interrupt groups; implemented by the VMM.
pub trait InterruptManager: Send + Sync {
    /// Creates a group of `count` message-signalled vectors (MSI: up to 32, MSI-X: up to 2048).
    fn create_msi_group(&self, count: u32) -> Result<Arc<dyn InterruptSourceGroup>>;

    /// Creates a one-vector INTx group. Its vector 0 has a trigger notifier and, for
    /// level-triggered delivery, a [`resample_notifier`](InterruptSourceGroup::resample_notifier)
    /// (with VFIO: the `VFIO_IRQ_SET_ACTION_TRIGGER` and `..._UNMASK` eventfds). Routes are
    /// ignored; `masked` follows the command register's interrupt-disable bit.
    fn create_intx_group(&self) -> Result<Arc<dyn InterruptSourceGroup>>;
}

/// What happened to an interrupt the device model raised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Handed to the group for injection.
    Delivered,
    /// Masked: recorded as pending, delivered when unmasked.
    Pending,
    /// Not deliverable and not recorded (interrupt mechanism disabled, vector not allocated,
    /// or no group bound).
    Dropped,
}
