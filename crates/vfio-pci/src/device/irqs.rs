//! Wiring the device's interrupts through VFIO.
//!
//! The kernel's vfio-pci drives one interrupt index at a time: INTx until
//! the guest enables MSI or MSI-X, then that one. Each switch costs one
//! `SET_IRQS` to disable the old index and one to enable the new one, with
//! every vector's eventfd in a single call. Masking a vector never touches
//! VFIO: only the route in the VMM changes, and a vector that fires while
//! masked stays latched in its eventfd until it is unmasked.

use pci_interrupts::{InterruptManager, IntxState};
use vfio_backend::irq;

use super::plan::AttachPlan;
use super::{notifiers, Inner, IntxCtx, IrqMode, MsiCtx, MsixCtx, VfioPciDevice};
use crate::{Error, Result};

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

    /// Brings VFIO's interrupt wiring in line with the guest's programming.
    /// Does nothing (no system call) when nothing changed.
    pub(super) fn apply_irq_mode(&self, inner: &mut Inner) -> Result<()> {
        let want = Self::wanted_irq_mode(inner);
        if want == inner.irq_mode {
            return Ok(());
        }
        self.disable_irq_mode(inner);
        let r = match want {
            IrqMode::None => Ok(()),
            IrqMode::Intx => self.enable_intx(inner),
            IrqMode::Msi(n) => match inner.msi.as_ref() {
                Some(m) => {
                    let fds = notifiers(m.group.as_ref(), n);
                    self.vfio
                        .set_irq_eventfds(irq::MSI, 0, &fds)
                        .map_err(|e| Error::backend(format!("enabling MSI with {n} vectors"), e))
                }
                None => Ok(()),
            },
            IrqMode::Msix => match inner.msix.as_ref() {
                Some(m) => {
                    let n = m.state.table_size();
                    let fds = notifiers(m.group.as_ref(), n);
                    self.vfio
                        .set_irq_eventfds(irq::MSIX, 0, &fds)
                        .map_err(|e| Error::backend(format!("enabling MSI-X with {n} vectors"), e))
                }
                None => Ok(()),
            },
        };
        match r {
            Ok(()) => {
                inner.irq_mode = want;
                Ok(())
            }
            Err(e) => {
                log::warn!("{e}");
                inner.irq_mode = IrqMode::None;
                Err(e)
            }
        }
    }

    fn enable_intx(&self, inner: &Inner) -> Result<()> {
        let Some(intx) = inner.intx.as_ref() else {
            return Ok(());
        };
        let trigger = intx.group.notifier(0);
        self.vfio
            .set_irq_eventfds(irq::INTX, 0, &[trigger])
            .map_err(|e| Error::backend("enabling INTx", e))?;
        if let Some(resample) = intx.group.resample_notifier(0) {
            if let Err(e) = self.vfio.set_irq_unmask_eventfd(irq::INTX, Some(resample)) {
                let _ = self.vfio.disable_irqs(irq::INTX);
                return Err(Error::backend(
                    "setting the INTx unmask (resample) eventfd",
                    e,
                ));
            }
        }
        Ok(())
    }

    /// Disables whatever is wired now; errors are logged (the device may be gone).
    pub(super) fn disable_irq_mode(&self, inner: &mut Inner) {
        let index = match inner.irq_mode {
            IrqMode::None => return,
            IrqMode::Intx => irq::INTX,
            IrqMode::Msi(_) => irq::MSI,
            IrqMode::Msix => irq::MSIX,
        };
        if let Err(e) = self.vfio.disable_irqs(index) {
            log::warn!("disabling interrupt index {index}: {e}");
        }
        inner.irq_mode = IrqMode::None;
    }

    /// Unmasks INTx in the device after the VMM handled it without a
    /// resample eventfd (VMMs with a resample eventfd never need this).
    pub fn unmask_intx(&self) -> Result<()> {
        self.vfio
            .unmask_irq(irq::INTX)
            .map_err(|e| Error::backend("unmasking INTx", e))
    }
}
