//! Call counters and failure injection.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// One operation of the [`vfio_backend::Vfio`] trait, for counters and
/// failure injection.
pub use vfio_backend::VfioOp as Op;

fn idx(op: Op) -> usize {
    op as usize
}

/// Cheap atomic counters of what the device was asked to do and did.
#[derive(Debug, Default)]
pub struct Counters {
    calls: [AtomicU64; Op::COUNT],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    interrupts_signalled: AtomicU64,
    interrupts_dropped: AtomicU64,
    dma_transfers: AtomicU64,
    dma_errors: AtomicU64,
}

fn get(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

pub(crate) fn bump(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// Calls of `op` so far (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.calls.get(idx(op)).map_or(0, get)
    }

    /// Bytes read through `region_read` (all regions).
    pub fn bytes_read(&self) -> u64 {
        get(&self.bytes_read)
    }

    /// Bytes written through `region_write` (all regions).
    pub fn bytes_written(&self) -> u64 {
        get(&self.bytes_written)
    }

    /// Interrupts delivered to an eventfd.
    pub fn interrupts_signalled(&self) -> u64 {
        get(&self.interrupts_signalled)
    }

    /// Interrupts the device raised that reached no eventfd (no index
    /// enabled, no eventfd for the vector, or INTx masked).
    pub fn interrupts_dropped(&self) -> u64 {
        get(&self.interrupts_dropped)
    }

    /// DMA transfers completed.
    pub fn dma_transfers(&self) -> u64 {
        get(&self.dma_transfers)
    }

    /// DMA transfers refused (unmapped IOVA, read-only mapping, out of the
    /// device's range).
    pub fn dma_errors(&self) -> u64 {
        get(&self.dma_errors)
    }

    /// Sets every counter to zero.
    pub fn reset(&self) {
        for c in &self.calls {
            c.store(0, Ordering::Relaxed);
        }
        for c in [
            &self.bytes_read,
            &self.bytes_written,
            &self.interrupts_signalled,
            &self.interrupts_dropped,
            &self.dma_transfers,
            &self.dma_errors,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn call(&self, op: Op) {
        if let Some(c) = self.calls.get(idx(op)) {
            bump(c, 1);
        }
    }

    pub(crate) fn read(&self, n: usize) {
        bump(&self.bytes_read, n as u64);
    }

    pub(crate) fn written(&self, n: usize) {
        bump(&self.bytes_written, n as u64);
    }

    pub(crate) fn signalled(&self) {
        bump(&self.interrupts_signalled, 1);
    }

    pub(crate) fn dropped(&self) {
        bump(&self.interrupts_dropped, 1);
    }

    pub(crate) fn dma_ok(&self) {
        bump(&self.dma_transfers, 1);
    }

    pub(crate) fn dma_err(&self) {
        bump(&self.dma_errors, 1);
    }
}

/// A migration method of the [`vfio_backend::Vfio`] trait (or of its
/// data stream), for failure injection with [`Faults::fail_migration`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigOp {
    /// `set_mig_state` fails before it takes any arc: the device stays in
    /// its state.
    SetState,
    /// `set_mig_state` fails and the device goes to ERROR (a transition it
    /// could neither finish nor undo).
    SetStateError,
    /// `mig_state` and `migration_flags`.
    GetState,
    /// `mig_data_size`.
    DataSize,
    /// `MigrationStream::read`.
    StreamRead,
    /// `MigrationStream::write`.
    StreamWrite,
    /// `MigrationStream::precopy_info`.
    PrecopyInfo,
    /// `dma_logging_start`, `dma_logging_stop` and `dma_logging_report`.
    DmaLogging,
}

impl MigOp {
    /// How many there are.
    pub const COUNT: usize = 8;

    /// The method's name.
    pub fn name(self) -> &'static str {
        match self {
            MigOp::SetState | MigOp::SetStateError => "set_mig_state",
            MigOp::GetState => "mig_state",
            MigOp::DataSize => "mig_data_size",
            MigOp::StreamRead => "migration stream read",
            MigOp::StreamWrite => "migration stream write",
            MigOp::PrecopyInfo => "precopy_info",
            MigOp::DmaLogging => "DMA logging",
        }
    }
}

/// The longest a call may be made to hang.
pub const MAX_HANG: Duration = Duration::from_secs(30);

const FOREVER: u32 = u32::MAX;

#[derive(Debug, Default)]
struct OpFault {
    errno: AtomicI32,
    remaining: AtomicU32,
}

/// Failure injection: make the device stop answering, answer slowly, or
/// fail chosen operations.
#[derive(Debug, Default)]
pub struct Faults {
    dead: AtomicBool,
    hang_ms: AtomicU64,
    ops: [OpFault; Op::COUNT],
    mig: [OpFault; MigOp::COUNT],
}

/// What an injected fault does to a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Injected {
    /// The device is dead: fail with `EIO`.
    Dead,
    /// This operation fails with this errno.
    Fail(i32),
}

impl Faults {
    /// While `dead`, every trait call fails with `EIO` (and
    /// `region_mmap_fd` returns `None`), as a device that fell off the bus.
    pub fn set_dead(&self, dead: bool) {
        self.dead.store(dead, Ordering::Relaxed);
    }

    /// Whether the device plays dead.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed)
    }

    /// Every trait call first sleeps this long (`None` or zero: no delay);
    /// capped at [`MAX_HANG`].
    pub fn set_hang(&self, hang: Option<Duration>) {
        let d = hang.unwrap_or_default().min(MAX_HANG);
        self.hang_ms
            .store(u64::try_from(d.as_millis()).unwrap_or(0), Ordering::Relaxed);
    }

    /// Makes `op` fail with `errno`: the next `times` calls, or every call
    /// until [`Faults::clear`] when `times` is `None`.
    pub fn fail(&self, op: Op, errno: i32, times: Option<u32>) {
        if let Some(f) = self.ops.get(idx(op)) {
            f.remaining.store(
                times.map_or(FOREVER, |t| t.min(FOREVER - 1)),
                Ordering::Relaxed,
            );
            f.errno.store(errno, Ordering::Relaxed);
        }
    }

    /// Makes the migration method `op` fail with `errno`, as
    /// [`Faults::fail`] does for the other methods.
    pub fn fail_migration(&self, op: MigOp, errno: i32, times: Option<u32>) {
        if let Some(f) = self.mig.get(op as usize) {
            f.remaining.store(
                times.map_or(FOREVER, |t| t.min(FOREVER - 1)),
                Ordering::Relaxed,
            );
            f.errno.store(errno, Ordering::Relaxed);
        }
    }

    /// Applies the faults to one call of the migration method `op`.
    pub(crate) fn check_migration(&self, op: MigOp) -> Option<Injected> {
        if self.is_dead() {
            return Some(Injected::Dead);
        }
        take(self.mig.get(op as usize)?)
    }

    /// Removes every injected fault (dead, hang and failing operations).
    pub fn clear(&self) {
        self.set_dead(false);
        self.set_hang(None);
        for f in self.ops.iter().chain(&self.mig) {
            f.errno.store(0, Ordering::Relaxed);
            f.remaining.store(0, Ordering::Relaxed);
        }
    }

    /// Applies the faults to one call of `op`.
    pub(crate) fn check(&self, op: Op) -> Option<Injected> {
        let ms = self.hang_ms.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
        if self.is_dead() {
            return Some(Injected::Dead);
        }
        take(self.ops.get(idx(op))?)
    }
}

/// One call's share of an injected failure.
fn take(f: &OpFault) -> Option<Injected> {
    let errno = f.errno.load(Ordering::Relaxed);
    if errno == 0 {
        return None;
    }
    let took = f
        .remaining
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| match r {
            0 => None,
            FOREVER => Some(FOREVER),
            n => Some(n - 1),
        })
        .is_ok();
    took.then_some(Injected::Fail(errno))
}
