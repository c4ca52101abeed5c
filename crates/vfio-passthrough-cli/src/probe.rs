//! The interrupt side of the VMM that `inspect` plays: one eventfd per
//! vector, handed to the device as its notifier, and the route and mask the
//! guest last programmed, so that the self-check can see which vectors the
//! device signalled and where the guest sent them. Nothing is delivered
//! anywhere: there is no guest.
//!
//! State is bounded by the number of vectors; nothing is logged per call.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use pci_interrupts::{Error, InterruptManager, InterruptSourceGroup, MsiRoute, Result};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn borrow(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: `fd` owns an open descriptor that stays open while `fd` is
    // borrowed, and the returned lifetime is tied to that borrow.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

fn eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|source| Error::EventFd {
        op: "create",
        source,
    })
}

/// The route of each vector as the guest last programmed it.
#[derive(Default)]
struct Routes {
    enabled: bool,
    /// Per vector: the route and whether it is masked.
    vectors: Vec<(MsiRoute, bool)>,
}

/// A group of vectors whose eventfds the self-check reads.
pub struct ProbeGroup {
    notifiers: Vec<EventFd>,
    resample: Option<EventFd>,
    routes: Mutex<Routes>,
}

impl ProbeGroup {
    fn new(count: u32, intx: bool) -> Result<Self> {
        let notifiers = (0..count).map(|_| eventfd()).collect::<Result<Vec<_>>>()?;
        let resample = intx.then(eventfd).transpose()?;
        let routes = Routes {
            enabled: false,
            vectors: vec![(MsiRoute::default(), true); notifiers.len()],
        };
        Ok(ProbeGroup {
            notifiers,
            resample,
            routes: Mutex::new(routes),
        })
    }

    /// The route the guest last gave `vector`, or `None` out of range.
    pub fn route(&self, vector: u32) -> Option<MsiRoute> {
        let routes = lock(&self.routes);
        routes
            .vectors
            .get(usize::try_from(vector).ok()?)
            .map(|&(route, _)| route)
    }

    /// How many times `vector`'s eventfd was signalled since the last call
    /// (0 when it was not, or out of range). Never blocks.
    pub fn take_signals(&self, vector: u32) -> u64 {
        usize::try_from(vector)
            .ok()
            .and_then(|v| self.notifiers.get(v))
            .map_or(0, |fd| fd.read().unwrap_or(0))
    }
}

impl InterruptSourceGroup for ProbeGroup {
    fn len(&self) -> u32 {
        u32::try_from(self.notifiers.len()).unwrap_or(u32::MAX)
    }

    fn notifier(&self, vector: u32) -> Option<BorrowedFd<'_>> {
        self.notifiers
            .get(usize::try_from(vector).ok()?)
            .map(borrow)
    }

    fn resample_notifier(&self, vector: u32) -> Option<BorrowedFd<'_>> {
        (vector == 0).then_some(())?;
        self.resample.as_ref().map(borrow)
    }

    fn update(&self, vector: u32, route: MsiRoute, masked: bool) -> Result<()> {
        let mut routes = lock(&self.routes);
        let slot = usize::try_from(vector)
            .ok()
            .and_then(|v| routes.vectors.get_mut(v))
            .ok_or(Error::VectorOutOfRange {
                vector,
                count: self.len(),
            })?;
        *slot = (route, masked);
        Ok(())
    }

    fn enable(&self) -> Result<()> {
        lock(&self.routes).enabled = true;
        Ok(())
    }

    fn disable(&self) -> Result<()> {
        let mut routes = lock(&self.routes);
        routes.enabled = false;
        for v in &mut routes.vectors {
            v.1 = true;
        }
        Ok(())
    }

    fn trigger(&self, vector: u32) -> Result<()> {
        let fd = usize::try_from(vector)
            .ok()
            .and_then(|v| self.notifiers.get(v))
            .ok_or(Error::VectorOutOfRange {
                vector,
                count: self.len(),
            })?;
        fd.write(1).map_err(|source| Error::EventFd {
            op: "write",
            source,
        })
    }
}

/// Makes [`ProbeGroup`]s and keeps them, so the self-check can find the one
/// behind a device's group.
#[derive(Default)]
pub struct ProbeInterrupts {
    groups: Mutex<Vec<Arc<ProbeGroup>>>,
}

impl ProbeInterrupts {
    /// The probe group that is `group`, if this manager made it.
    pub fn find(&self, group: &Arc<dyn InterruptSourceGroup>) -> Option<Arc<ProbeGroup>> {
        let want = Arc::as_ptr(group).cast::<u8>();
        lock(&self.groups)
            .iter()
            .find(|g| Arc::as_ptr(g).cast::<u8>() == want)
            .cloned()
    }

    fn keep(&self, group: ProbeGroup) -> Arc<dyn InterruptSourceGroup> {
        let group = Arc::new(group);
        let mut groups = lock(&self.groups);
        // A device makes at most one group per interrupt type; drop the
        // ones it has let go of so the list stays bounded.
        groups.retain(|g| Arc::strong_count(g) > 1);
        groups.push(Arc::clone(&group));
        group
    }
}

impl InterruptManager for ProbeInterrupts {
    fn create_msi_group(&self, count: u32) -> Result<Arc<dyn InterruptSourceGroup>> {
        Ok(self.keep(ProbeGroup::new(count, false)?))
    }

    fn create_intx_group(&self) -> Result<Arc<dyn InterruptSourceGroup>> {
        Ok(self.keep(ProbeGroup::new(1, true)?))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_signalled_vector_is_counted_once_and_others_not() {
        let irqs = ProbeInterrupts::default();
        let g = irqs.create_msi_group(4).unwrap();
        let probe = irqs.find(&g).unwrap();
        g.trigger(2).unwrap();
        g.trigger(2).unwrap();
        assert_eq!(probe.take_signals(2), 2);
        assert_eq!(probe.take_signals(2), 0);
        assert_eq!(probe.take_signals(1), 0);
        assert_eq!(probe.take_signals(99), 0);
    }

    #[test]
    fn routes_are_what_the_guest_last_programmed() {
        let irqs = ProbeInterrupts::default();
        let g = irqs.create_msi_group(2).unwrap();
        let probe = irqs.find(&g).unwrap();
        let route = MsiRoute {
            address: 0xfee0_0000,
            data: 0x41,
        };
        g.update(1, route, false).unwrap();
        assert_eq!(probe.route(1), Some(route));
        assert_eq!(probe.route(0), Some(MsiRoute::default()));
        assert_eq!(probe.route(2), None);
        assert!(matches!(
            g.update(2, route, false),
            Err(pci_interrupts::Error::VectorOutOfRange {
                vector: 2,
                count: 2
            })
        ));
    }

    #[test]
    fn groups_a_device_dropped_are_forgotten() {
        let irqs = ProbeInterrupts::default();
        for _ in 0..10 {
            drop(irqs.create_msi_group(1).unwrap());
        }
        let kept = irqs.create_intx_group().unwrap();
        assert_eq!(lock(&irqs.groups).len(), 1);
        assert!(kept.resample_notifier(0).is_some());
        assert!(kept.resample_notifier(1).is_none());
    }
}
