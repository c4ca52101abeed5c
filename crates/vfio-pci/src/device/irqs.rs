//! Wiring the device's interrupts through VFIO.
//!
//! The kernel's vfio-pci drives one interrupt index at a time: INTx until
//! the guest enables MSI or MSI-X, then that one. Each switch costs one
//! `SET_IRQS` to disable the old index and one to enable the new one, with
//! every vector's eventfd in a single call. Masking a vector never touches
//! VFIO: only the route in the VMM changes, and a vector that fires while
//! masked stays latched in its eventfd until it is unmasked.

use std::sync::{Arc, MutexGuard};

use pci_interrupts::{InterruptManager, InterruptSourceGroup, IntxState};
use vfio_backend::irq;

use super::plan::AttachPlan;
use super::{lock, notifiers, Inner, IntxCtx, IrqMode, MsiCtx, MsixCtx, VfioPciDevice};
use crate::{Error, Result};

/// What VFIO is to be told: the mode, its group and (MSI-X) its vector count. Read under
/// the device lock, used without it.
struct Wiring {
    mode: IrqMode,
    group: Option<Arc<dyn InterruptSourceGroup>>,
    vectors: u32,
}

impl Wiring {
    fn of(inner: &Inner, mode: IrqMode) -> Self {
        let (group, vectors) = match mode {
            IrqMode::None => (None, 0),
            IrqMode::Intx => (inner.intx.as_ref().map(|m| m.group.clone()), 1),
            IrqMode::Msi(n) => (inner.msi.as_ref().map(|m| m.group.clone()), n),
            IrqMode::Msix => inner
                .msix
                .as_ref()
                .map_or((None, 0), |m| (Some(m.group.clone()), m.state.table_size())),
        };
        Wiring {
            mode,
            group,
            vectors,
        }
    }
}

/// The interrupt contexts of a planned device, with their groups.
pub(super) struct Groups {
    pub msi: Option<MsiCtx>,
    pub msix: Option<MsixCtx>,
    pub intx: Option<IntxCtx>,
}

/// The attach stage after planning: creates and binds the interrupt groups the plan asks
/// for (the VMM's interrupt manager does the I/O: irqfds, routes).
pub(super) fn create_groups(irqs: &dyn InterruptManager, plan: &mut AttachPlan) -> Result<Groups> {
    let msi = match plan.msi.take() {
        Some((offset, mut state)) => {
            let group = irqs
                .create_msi_group(state.max_vectors())
                .map_err(Error::interrupts("creating the MSI group"))?;
            state
                .set_group(Some(group.clone()))
                .map_err(Error::interrupts("binding the MSI group"))?;
            Some(MsiCtx {
                offset,
                state,
                group,
            })
        }
        None => None,
    };
    let msix = match plan.msix.take() {
        Some(mut m) => {
            let state = &mut m.state;
            let group = irqs
                .create_msi_group(state.table_size())
                .map_err(Error::interrupts("creating the MSI-X group"))?;
            state
                .set_group(Some(group.clone()))
                .map_err(Error::interrupts("binding the MSI-X group"))?;
            Some(MsixCtx {
                offset: m.offset,
                state: m.state,
                group,
                table: m.table,
                pba: m.pba,
            })
        }
        None => None,
    };
    let intx = match plan.intx_pin {
        Some(pin) => {
            let mut state =
                IntxState::from_pin_register(pin).map_err(Error::interrupts("INTx pin"))?;
            let group = irqs
                .create_intx_group()
                .map_err(Error::interrupts("creating the INTx group"))?;
            state
                .set_group(Some(group.clone()))
                .map_err(Error::interrupts("binding the INTx group"))?;
            Some(IntxCtx { state, group })
        }
        None => None,
    };
    Ok(Groups { msi, msix, intx })
}

impl VfioPciDevice {
    /// The interrupt the guest's programming asks for.
    fn wanted_irq_mode(inner: &Inner) -> IrqMode {
        if inner.msix.as_ref().is_some_and(|m| m.state.enabled()) {
            return IrqMode::Msix;
        }
        if let Some(m) = inner.msi.as_ref() {
            let n = m.state.num_enabled_vectors();
            if m.state.enabled() && n > 0 {
                return IrqMode::Msi(n);
            }
        }
        if inner.intx.is_some() {
            return IrqMode::Intx;
        }
        IrqMode::None
    }

    /// Whether VFIO's wiring lags behind the guest's programming: the caller, holding the
    /// device lock, then drops it and calls [`Self::sync_irq_mode`].
    pub(super) fn irq_mode_stale(inner: &Inner) -> bool {
        Self::wanted_irq_mode(inner) != inner.irq_mode
    }

    /// Brings VFIO's interrupt wiring in line with the guest's programming. Does nothing (no
    /// system call) when nothing changed. Takes the wiring lock, then the device lock only
    /// to read what to wire: the `SET_IRQS` calls (a vfio-user round trip, up to its
    /// timeout) are made without the device lock, so vCPUs touching the device's MSI-X
    /// table or emulated registers meanwhile do not wait. The caller holds no device lock.
    pub(super) fn sync_irq_mode(&self) -> Result<()> {
        let wiring = lock(&self.wiring, "interrupt wiring")?;
        self.sync_irq_mode_wired(&wiring)
    }

    /// [`Self::sync_irq_mode`] for a caller that holds the wiring lock.
    pub(super) fn sync_irq_mode_wired(&self, _wiring: &MutexGuard<'_, ()>) -> Result<()> {
        let (from, plan) = {
            let inner = lock(&self.inner, "device")?;
            let want = Self::wanted_irq_mode(&inner);
            if want == inner.irq_mode {
                return Ok(());
            }
            (inner.irq_mode, Wiring::of(&inner, want))
        };
        self.disable_index(from);
        let r = self.wire(&plan);
        let now = match &r {
            Ok(()) => plan.mode,
            Err(e) => {
                log::warn!("{e}");
                IrqMode::None
            }
        };
        // Record what VFIO has now. A guest write that changed the programming meanwhile
        // waits on the wiring lock and brings the wiring up to date after us.
        lock(&self.inner, "device")?.irq_mode = now;
        r
    }

    /// Tells VFIO to signal `plan`'s eventfds.
    fn wire(&self, plan: &Wiring) -> Result<()> {
        match (plan.mode, plan.group.as_ref()) {
            (IrqMode::None, _) | (_, None) => Ok(()),
            (IrqMode::Intx, Some(g)) => self.enable_intx(g.as_ref()),
            (IrqMode::Msi(n), Some(g)) => {
                let fds = notifiers(g.as_ref(), n);
                self.vfio
                    .set_irq_eventfds(irq::MSI, 0, &fds)
                    .map_err(|e| Error::backend(format!("enabling MSI with {n} vectors"), e))
            }
            (IrqMode::Msix, Some(g)) => {
                let n = plan.vectors;
                let fds = notifiers(g.as_ref(), n);
                self.vfio
                    .set_irq_eventfds(irq::MSIX, 0, &fds)
                    .map_err(|e| Error::backend(format!("enabling MSI-X with {n} vectors"), e))
            }
        }
    }

    fn enable_intx(&self, group: &dyn InterruptSourceGroup) -> Result<()> {
        let trigger = group.notifier(0);
        self.vfio
            .set_irq_eventfds(irq::INTX, 0, &[trigger])
            .map_err(|e| Error::backend("enabling INTx", e))?;
        if let Some(resample) = group.resample_notifier(0) {
            if let Err(e) = self.vfio.set_irq_unmask_eventfd(irq::INTX, Some(resample)) {
                // A device that does not take an unmask eventfd (`ACTION_UNMASK` with
                // `DATA_EVENTFD` is optional: the kernel's mtty sample answers ENOTTY) still
                // delivers INTx through its trigger eventfd; the VMM then unmasks with
                // `unmask_intx` after each EOI, as it would without a resample eventfd.
                // Anything else is a real failure.
                let unsupported = matches!(
                    e.errno(),
                    Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::EOPNOTSUPP)
                );
                if !unsupported {
                    let _ = self.vfio.disable_irqs(irq::INTX);
                    return Err(Error::backend(
                        "setting the INTx unmask (resample) eventfd",
                        e,
                    ));
                }
                log::warn!(
                    "the device takes no INTx unmask eventfd ({e}): INTx stays wired, and the \
                     VMM must call unmask_intx() after the guest handled each one"
                );
            }
        }
        Ok(())
    }

    /// Disables whatever is wired now; errors are logged (the device may be gone). For
    /// [`Drop`], which owns the state; everyone else unwires through
    /// [`Self::take_irq_mode`] and [`Self::disable_index`], outside the device lock.
    pub(super) fn disable_irq_mode(&self, inner: &mut Inner) {
        let from = Self::take_irq_mode(inner);
        self.disable_index(from);
    }

    /// Marks nothing wired and returns what was: the caller, holding the wiring lock, then
    /// disables it with [`Self::disable_index`] after dropping the device lock.
    pub(super) fn take_irq_mode(inner: &mut Inner) -> IrqMode {
        std::mem::replace(&mut inner.irq_mode, IrqMode::None)
    }

    /// Disables VFIO's interrupt index of `mode`; errors are logged.
    pub(super) fn disable_index(&self, mode: IrqMode) {
        let index = match mode {
            IrqMode::None => return,
            IrqMode::Intx => irq::INTX,
            IrqMode::Msi(_) => irq::MSI,
            IrqMode::Msix => irq::MSIX,
        };
        if let Err(e) = self.vfio.disable_irqs(index) {
            log::warn!("disabling interrupt index {index}: {e}");
        }
    }

    /// Unmasks INTx in the device after the VMM handled it without a
    /// resample eventfd (VMMs with a resample eventfd never need this).
    pub fn unmask_intx(&self) -> Result<()> {
        self.vfio
            .unmask_irq(irq::INTX)
            .map_err(|e| Error::backend("unmasking INTx", e))
    }
}
