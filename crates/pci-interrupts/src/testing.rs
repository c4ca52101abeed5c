//! An instrumented [`InterruptManager`] and [`InterruptSourceGroup`] for tests.
//!
//! Not for production: every call is recorded in a log that grows without bound. Each vector
//! has a real non-blocking eventfd, so it can be handed to a VFIO device or a vfio-user server,
//! and a test can check whether it was signalled. The group also models what a VMM would
//! deliver (enabled flag, per-vector route and mask) and counts contract violations: a
//! [`trigger`](InterruptSourceGroup::trigger) of a vector that is masked or of a disabled group.
//!
//! ```
//! use pci_interrupts::testing::{GroupCall, TestInterruptGroup};
//! use pci_interrupts::MsixState;
//! use std::sync::Arc;
//!
//! let group = Arc::new(TestInterruptGroup::new(4).unwrap());
//! let mut msix = MsixState::new(4, 0, 0, 0, 0x800).unwrap();
//! msix.set_group(Some(group.clone())).unwrap();
//! msix.write(2, &0x8000u16.to_le_bytes()).unwrap(); // MSI-X enable
//! assert_eq!(group.calls(), vec![GroupCall::Enable]);
//! ```

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{Error, InterruptManager, InterruptSourceGroup, MsiRoute, Result};

/// One call made to a [`TestInterruptGroup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupCall {
    /// [`InterruptSourceGroup::enable`].
    Enable,
    /// [`InterruptSourceGroup::disable`].
    Disable,
    /// [`InterruptSourceGroup::update`].
    Update {
        /// The vector.
        vector: u32,
        /// The route given.
        route: MsiRoute,
        /// The mask given.
        masked: bool,
    },
    /// [`InterruptSourceGroup::trigger`].
    Trigger {
        /// The vector.
        vector: u32,
    },
}

impl GroupCall {
    /// The vector the call is about, if it is about one.
    pub fn vector(&self) -> Option<u32> {
        match *self {
            Self::Update { vector, .. } | Self::Trigger { vector } => Some(vector),
            Self::Enable | Self::Disable => None,
        }
    }
}

#[derive(Default)]
struct Model {
    calls: Vec<GroupCall>,
    enabled: bool,
    /// Per vector: the last route and whether it is unmasked.
    vectors: Vec<(MsiRoute, bool)>,
    violations: usize,
    fail: bool,
}

/// A recording [`InterruptSourceGroup`] with one eventfd per vector (see the module docs).
pub struct TestInterruptGroup {
    notifiers: Vec<EventFd>,
    resample: Option<EventFd>,
    model: Mutex<Model>,
}

impl TestInterruptGroup {
    /// A message-signalled group of `count` vectors, disabled, all masked.
    pub fn new(count: u32) -> Result<Self> {
        Self::build(count, false)
    }

    /// A one-vector INTx group with a trigger and a resample eventfd.
    pub fn new_intx() -> Result<Self> {
        Self::build(1, true)
    }

    fn build(count: u32, resample: bool) -> Result<Self> {
        let eventfd = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
                op: "create",
                source,
            })
        };
        let notifiers = (0..count).map(|_| eventfd()).collect::<Result<Vec<_>>>()?;
        let resample = resample.then(eventfd).transpose()?;
        let model = Model {
            vectors: vec![(MsiRoute::default(), false); notifiers.len()],
            ..Model::default()
        };
        Ok(Self {
            notifiers,
            resample,
            model: Mutex::new(model),
        })
    }

    fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<GroupCall> {
        self.model().calls.clone()
    }

    /// Every call so far, clearing the log.
    pub fn take_calls(&self) -> Vec<GroupCall> {
        std::mem::take(&mut self.model().calls)
    }

    /// Clears the log.
    pub fn clear_calls(&self) {
        self.model().calls.clear();
    }

    /// Number of logged calls for which `pred` holds.
    pub fn count_calls(&self, pred: impl Fn(&GroupCall) -> bool) -> usize {
        self.model().calls.iter().filter(|c| pred(c)).count()
    }

    /// Number of logged `update` calls for `vector`.
    pub fn updates_of(&self, vector: u32) -> usize {
        self.count_calls(|c| matches!(c, GroupCall::Update { vector: v, .. } if *v == vector))
    }

    /// Number of logged `trigger` calls for `vector`.
    pub fn triggers_of(&self, vector: u32) -> usize {
        self.count_calls(|c| *c == GroupCall::Trigger { vector })
    }

    /// Whether the group is enabled.
    pub fn is_enabled(&self) -> bool {
        self.model().enabled
    }

    /// Whether `vector` is masked (true before any update, after `disable`, and out of range).
    pub fn is_masked(&self, vector: u32) -> bool {
        self.model()
            .vectors
            .get(vector as usize)
            .is_none_or(|(_, unmasked)| !unmasked)
    }

    /// Whether a trigger of `vector` would reach the guest: group enabled, vector unmasked.
    pub fn is_deliverable(&self, vector: u32) -> bool {
        let model = self.model();
        model.enabled && model.vectors.get(vector as usize).is_some_and(|v| v.1)
    }

    /// The route of the last `update` of `vector`, if it is unmasked.
    pub fn route(&self, vector: u32) -> Option<MsiRoute> {
        let model = self.model();
        let (route, unmasked) = model.vectors.get(vector as usize)?;
        unmasked.then_some(*route)
    }

    /// Number of `trigger` calls made while the vector was masked or the group disabled.
    pub fn violations(&self) -> usize {
        self.model().violations
    }

    /// Makes every later call (until set back to false) fail with [`Error::Group`].
    pub fn fail_calls(&self, fail: bool) {
        self.model().fail = fail;
    }

    /// Signals `vector`'s eventfd, as a device would.
    pub fn signal(&self, vector: u32) -> Result<()> {
        let fd = self.eventfd(vector)?;
        fd.write(1).map_err(|source| Error::EventFd {
            op: "write",
            source,
        })
    }

    /// How many times `vector`'s eventfd was signalled since the last read (by a device or by
    /// `trigger`); reads it without blocking, so the count restarts at 0. Out of range: 0.
    pub fn take_signals(&self, vector: u32) -> u64 {
        self.eventfd(vector).map_or(0, read_nonblocking)
    }

    /// What a guest would receive now on `vector`, as a VMM with irqfds
    /// delivers it: while the vector is deliverable (group enabled, vector
    /// unmasked) the signals latched in its eventfd are consumed and counted;
    /// while it is not, they stay latched (0 is returned) and arrive once it
    /// becomes deliverable again.
    pub fn take_delivered(&self, vector: u32) -> u64 {
        if self.is_deliverable(vector) {
            self.take_signals(vector)
        } else {
            0
        }
    }

    /// Whether `vector`'s eventfd was signalled since the last read (consumes the signals).
    pub fn was_signalled(&self, vector: u32) -> bool {
        self.take_signals(vector) > 0
    }

    /// How many times the resample eventfd was signalled since the last read (0 without one).
    pub fn take_resamples(&self) -> u64 {
        self.resample.as_ref().map_or(0, read_nonblocking)
    }

    /// Signals the resample eventfd, as a VMM does when the guest ends a level interrupt.
    pub fn resample(&self) -> Result<()> {
        let fd = self.resample.as_ref().ok_or(Error::VectorOutOfRange {
            vector: 0,
            count: 0,
        })?;
        fd.write(1).map_err(|source| Error::EventFd {
            op: "write",
            source,
        })
    }

    fn eventfd(&self, vector: u32) -> Result<&EventFd> {
        self.notifiers
            .get(vector as usize)
            .ok_or(Error::VectorOutOfRange {
                vector,
                count: self.len(),
            })
    }

    /// Logs `call`, failing when asked to; out-of-range vectors are an error.
    fn record(&self, call: GroupCall, op: &'static str) -> Result<MutexGuard<'_, Model>> {
        let mut model = self.model();
        model.calls.push(call);
        if model.fail {
            return Err(Error::Group {
                op,
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        if let Some(vector) = call.vector() {
            if vector as usize >= model.vectors.len() {
                return Err(Error::VectorOutOfRange {
                    vector,
                    count: self.len(),
                });
            }
        }
        Ok(model)
    }
}

fn read_nonblocking(fd: &EventFd) -> u64 {
    fd.read().unwrap_or(0)
}

fn borrow(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: `fd` owns an open descriptor that stays open for as long as `fd` is borrowed,
    // which the returned lifetime ties to.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

impl InterruptSourceGroup for TestInterruptGroup {
    fn len(&self) -> u32 {
        // Lossless: built from a u32 count.
        self.notifiers.len() as u32
    }

    fn notifier(&self, vector: u32) -> Option<BorrowedFd<'_>> {
        self.notifiers.get(vector as usize).map(borrow)
    }

    fn resample_notifier(&self, vector: u32) -> Option<BorrowedFd<'_>> {
        (vector == 0).then_some(self.resample.as_ref()?).map(borrow)
    }

    fn update(&self, vector: u32, route: MsiRoute, masked: bool) -> Result<()> {
        let call = GroupCall::Update {
            vector,
            route,
            masked,
        };
        let mut model = self.record(call, "update")?;
        if let Some(v) = model.vectors.get_mut(vector as usize) {
            *v = (route, !masked);
        }
        Ok(())
    }

    fn enable(&self) -> Result<()> {
        self.record(GroupCall::Enable, "enable")?.enabled = true;
        Ok(())
    }

    fn disable(&self) -> Result<()> {
        let mut model = self.record(GroupCall::Disable, "disable")?;
        model.enabled = false;
        for v in &mut model.vectors {
            v.1 = false;
        }
        Ok(())
    }

    fn trigger(&self, vector: u32) -> Result<()> {
        let mut model = self.record(GroupCall::Trigger { vector }, "trigger")?;
        let deliverable = model.enabled && model.vectors.get(vector as usize).is_some_and(|v| v.1);
        if !deliverable {
            model.violations += 1;
        }
        drop(model);
        self.signal(vector)
    }
}

/// An [`InterruptManager`] that makes [`TestInterruptGroup`]s and keeps them for inspection.
#[derive(Default)]
pub struct TestInterruptManager {
    groups: Mutex<Vec<Arc<TestInterruptGroup>>>,
}

impl TestInterruptManager {
    /// A manager that has made no groups yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every group made so far, oldest first.
    pub fn groups(&self) -> Vec<Arc<TestInterruptGroup>> {
        self.lock().clone()
    }

    /// The group made last.
    pub fn last_group(&self) -> Option<Arc<TestInterruptGroup>> {
        self.lock().last().cloned()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<TestInterruptGroup>>> {
        self.groups.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn keep(&self, group: TestInterruptGroup) -> Arc<dyn InterruptSourceGroup> {
        let group = Arc::new(group);
        self.lock().push(group.clone());
        group
    }
}

impl InterruptManager for TestInterruptManager {
    fn create_msi_group(&self, count: u32) -> Result<Arc<dyn InterruptSourceGroup>> {
        Ok(self.keep(TestInterruptGroup::new(count)?))
    }

    fn create_intx_group(&self) -> Result<Arc<dyn InterruptSourceGroup>> {
        Ok(self.keep(TestInterruptGroup::new_intx()?))
    }
}

impl std::fmt::Debug for TestInterruptGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let model = self.model();
        f.debug_struct("TestInterruptGroup")
            .field("len", &self.notifiers.len())
            .field("enabled", &model.enabled)
            .field("calls", &model.calls.len())
            .field("violations", &model.violations)
            .finish()
    }
}

impl std::fmt::Debug for TestInterruptManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestInterruptManager")
            .field("groups", &self.lock().len())
            .finish()
    }
}
