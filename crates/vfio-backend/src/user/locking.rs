//! The lock helper of the vfio-user client and server (one poison policy for both).

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `m`, recovering the data if a thread panicked while holding it: the client's and the
/// server's critical sections leave their state consistent at every step (no panics inside,
/// by the crate's rules), and a panic on one thread must not become a panic on every other.
/// The one lock helper of the vfio-user backend.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
