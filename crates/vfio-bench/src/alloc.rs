//! [`CountingAlloc`]: the system allocator, counting allocations.
//!
//! A benchmark binary installs it with
//! `#[global_allocator] static A: CountingAlloc = CountingAlloc::new();`
//! and reads [`CountingAlloc::allocations`] around the operations it
//! measures. That count is process-wide: measure on a quiet process.
//! [`CountingAlloc::thread_allocations`] counts the calling thread's
//! allocations only, so that a client can be measured apart from a server
//! running in the same process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

thread_local! {
    // Const-initialised, no destructor: touching it never allocates, so the
    // allocator can use it.
    static THREAD_ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one(total: &AtomicU64) {
    total.fetch_add(1, Ordering::Relaxed);
    // During thread teardown the slot may be gone: that allocation is then
    // only in the process-wide count.
    let _ = THREAD_ALLOCATIONS.try_with(|c| c.set(c.get().wrapping_add(1)));
}

/// The system allocator with a counter of allocations (`alloc`,
/// `alloc_zeroed` and `realloc` each count one).
#[derive(Debug)]
pub struct CountingAlloc {
    allocations: AtomicU64,
}

impl CountingAlloc {
    /// A counter at zero.
    pub const fn new() -> CountingAlloc {
        CountingAlloc {
            allocations: AtomicU64::new(0),
        }
    }

    /// Allocations so far, by every thread.
    pub fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Allocations so far by the calling thread (through any
    /// `CountingAlloc`: there is one global allocator per process).
    pub fn thread_allocations(&self) -> u64 {
        THREAD_ALLOCATIONS.try_with(Cell::get).unwrap_or(0)
    }
}

impl Default for CountingAlloc {
    fn default() -> Self {
        CountingAlloc::new()
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments,
// so `System`'s guarantees are this allocator's; counting has no effect on
// the memory handed out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one(&self.allocations);
        // SAFETY: forwarded with the caller's (valid) layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one(&self.allocations);
        // SAFETY: forwarded with the caller's (valid) layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout (the caller's
        // contract, since every allocation here is forwarded to `System`).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one(&self.allocations);
        // SAFETY: as for dealloc; `new_size` is the caller's valid size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
