//! Benchmarks, a corpus of broken devices, soak tests and fuzz harnesses
//! for the VFIO stack, all played against the fake device
//! (`vfio-fake-device`), in-process or over a vfio-user socket.
//!
//! The library holds what the benchmark (`benches/vfio.rs`), the tests
//! (`tests/`) and the fuzz targets (`fuzz/` at the workspace root) share:
//!
//! - [`vmm`]: a minimal VMM: eventfd interrupt groups that never allocate on
//!   the hot path, a guest mapper that keeps its live mappings, BAR windows;
//! - [`guest`]: what a guest driver does: config-space walks, BAR sizing,
//!   MSI-X programming;
//! - [`hot`]: the hot-path operations of the summary table and their goals,
//!   shared with `examples/hot_loop.rs` (instruction counts);
//! - [`counting`]: a [`vfio_backend::Vfio`] wrapper that counts the calls a
//!   kernel backend would turn into system calls;
//! - [`alloc`]: a counting global allocator for heap-allocations-per-operation;
//! - [`devices`]: fake devices beyond the built-in profiles (MSI-X with any
//!   table size);
//! - [`malformed`]: the corpus of broken devices;
//! - [`user`]: serving a device over vfio-user and fd-backed guest memory;
//! - [`fuzz`]: the fuzz targets' bodies, shared with the regression tests.

pub mod alloc;
pub mod counting;
pub mod devices;
pub mod fuzz;
pub mod guest;
pub mod hot;
pub mod malformed;
pub mod user;
pub mod vmm;

/// What can go wrong while setting up a benchmark, a test or a fuzz case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The fake device refused its template.
    #[error("fake device: {0}")]
    Fake(#[from] vfio_fake_device::FakeError),
    /// A backend call failed.
    #[error("backend: {0}")]
    Backend(#[from] vfio_backend::Error),
    /// Attaching or driving the device failed.
    #[error("device: {0}")]
    Device(#[from] vfio_pci::Error),
    /// The BAR windows were refused.
    #[error("BAR allocator: {0}")]
    Alloc(#[from] pci_bar_alloc::Error),
    /// Interrupt plumbing failed.
    #[error("interrupts: {0}")]
    Interrupts(#[from] pci_interrupts::Error),
    /// An OS call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Something the harness expected was not there.
    #[error("{0}")]
    Missing(String),
}

impl Error {
    /// An OS error with its context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result of the harness.
pub type Result<T> = std::result::Result<T, Error>;
