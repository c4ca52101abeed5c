//! Interrupt state, modelled on the kernel's `vfio-pci`: one index (INTx,
//! MSI or MSI-X) is enabled at a time, eventfds are per vector, and INTx is
//! level-triggered and masked by the host each time it fires.
//!
//! INTx follows PCI 2.3 (PCI Local Bus 3.0 §6.2.2, §6.2.3): the line's state is
//! what the status register's Interrupt Status bit reads; the command
//! register's Interrupt Disable bit keeps the line from being asserted (no
//! eventfd signal) without changing that state, and clearing it while the
//! state is still set asserts the line again. A pulse (a doorbell, a DMA
//! completion) holds the line until the host acknowledges it by unmasking
//! (its end of interrupt), so that a handler that checks Interrupt Status
//! finds it set.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use vfio_backend::{irq, Error, Result};

use crate::inject::Counters;

/// Signals an eventfd without ever waiting (the device calls this with its
/// state locked). Returns whether the write went through. Every fd stored
/// here passed [`vfio_backend::eventfd::prepare_eventfd`]: it is an eventfd
/// in non-blocking mode, so a peer that filled its counter cannot make the
/// device wait.
fn signal(fd: &OwnedFd) -> bool {
    vfio_backend::eventfd::signal(fd.as_fd())
}

fn einval(context: String) -> Error {
    Error::Refused {
        context,
        errno: libc::EINVAL,
    }
}

/// How the device raises an interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// An edge: one message (MSI/MSI-X), or one INTx assertion that is not
    /// held (doorbells, DMA completion).
    Pulse,
    /// The INTx line is held asserted until [`IrqState::deassert`]
    /// (MSI/MSI-X still send one message).
    Level,
}

#[derive(Debug)]
pub(crate) struct IrqState {
    active: Option<u32>,
    intx: Option<OwnedFd>,
    intx_masked: bool,
    /// The line held by the device until it lowers it ([`Trigger::Level`]).
    intx_level: bool,
    /// The line held by a [`Trigger::Pulse`] until the host's unmask after it was signalled.
    intx_edge: bool,
    /// Whether the pulse holding the line was signalled (the next unmask ends it).
    intx_edge_signalled: bool,
    /// Command register bit 10, Interrupt Disable.
    intx_disabled: bool,
    msi: Vec<Option<OwnedFd>>,
    msi_enabled: u32,
    msix: Vec<Option<OwnedFd>>,
    msix_enabled: u32,
    intx_count: u32,
    /// The device is quiesced (a P2P or stopped migration state): it raises
    /// no interrupt; what it would have raised is held here and in the
    /// INTx line state until it runs again.
    quiesced: bool,
    /// MSI vectors raised while quiesced or while their eventfd was absent.
    msi_held: Vec<u64>,
    /// MSI-X vectors raised while quiesced or while their eventfd was absent.
    msix_held: Vec<u64>,
}

/// What of the interrupt state migrates: the INTx line's state and the
/// held (pending) MSI / MSI-X vectors. The eventfds and the enabled index
/// are the VMM's wiring, set again on the destination.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct IrqSnapshot {
    pub intx_level: bool,
    pub intx_edge: bool,
    pub msi_held: Vec<u64>,
    pub msix_held: Vec<u64>,
}

fn words(n: u32) -> usize {
    (n as usize).div_ceil(64)
}

fn bit(words: &[u64], v: u32) -> bool {
    words
        .get((v / 64) as usize)
        .is_some_and(|w| w & (1u64 << (v % 64)) != 0)
}

fn set_bit(words: &mut [u64], v: u32, on: bool) {
    if let Some(w) = words.get_mut((v / 64) as usize) {
        if on {
            *w |= 1u64 << (v % 64);
        } else {
            *w &= !(1u64 << (v % 64));
        }
    }
}

impl IrqState {
    pub(crate) fn new(intx: bool, msi: u32, msix: u32) -> Self {
        IrqState {
            active: None,
            intx: None,
            intx_masked: false,
            intx_level: false,
            intx_edge: false,
            intx_edge_signalled: false,
            intx_disabled: false,
            msi: (0..msi).map(|_| None).collect(),
            msi_enabled: 0,
            msix: (0..msix).map(|_| None).collect(),
            msix_enabled: 0,
            intx_count: u32::from(intx),
            quiesced: false,
            msi_held: vec![0; words(msi)],
            msix_held: vec![0; words(msix)],
        }
    }

    /// The migratable part of the state.
    pub(crate) fn snapshot(&self) -> IrqSnapshot {
        IrqSnapshot {
            intx_level: self.intx_level,
            intx_edge: self.intx_edge,
            msi_held: self.msi_held.clone(),
            msix_held: self.msix_held.clone(),
        }
    }

    /// Whether `snap` fits this device's vector counts.
    pub(crate) fn fits(&self, snap: &IrqSnapshot) -> bool {
        snap.msi_held.len() == self.msi_held.len() && snap.msix_held.len() == self.msix_held.len()
    }

    /// Takes a migrated state (checked with [`IrqState::fits`]). The
    /// pulse is not known to the destination's VMM: it fires once INTx is
    /// enabled and unmasked.
    pub(crate) fn load(&mut self, snap: &IrqSnapshot) {
        self.intx_level = snap.intx_level;
        self.intx_edge = snap.intx_edge;
        self.intx_edge_signalled = false;
        self.msi_held.copy_from_slice(&snap.msi_held);
        self.msix_held.copy_from_slice(&snap.msix_held);
    }

    /// Whether MSI (`irq::MSI`) or MSI-X vector `v` is held pending.
    pub(crate) fn held(&self, index: u32, v: u32) -> bool {
        match index {
            irq::MSI => bit(&self.msi_held, v),
            irq::MSIX => bit(&self.msix_held, v),
            _ => false,
        }
    }

    /// Quiesces the interrupts (`true`: nothing is signalled, raised
    /// vectors are held) or lets them run again, delivering what was held.
    pub(crate) fn set_quiesced(&mut self, quiesced: bool, counters: &Counters) {
        let was = self.quiesced;
        self.quiesced = quiesced;
        if was && !quiesced {
            self.deliver_held(counters);
            if self.active == Some(irq::INTX) && self.intx_line() && !self.intx_masked {
                self.fire_intx(counters);
            }
        }
    }

    /// Signals the held vectors of the enabled index that have an eventfd.
    fn deliver_held(&mut self, counters: &Counters) {
        if self.quiesced {
            return;
        }
        let (fds, held, enabled) = match self.active {
            Some(irq::MSI) => (&self.msi, &mut self.msi_held, self.msi_enabled),
            Some(irq::MSIX) => (&self.msix, &mut self.msix_held, self.msix_enabled),
            _ => return,
        };
        for v in 0..enabled {
            if !bit(held, v) {
                continue;
            }
            if let Some(fd) = fds.get(v as usize).and_then(Option::as_ref) {
                set_bit(held, v, false);
                if signal(fd) {
                    counters.signalled();
                } else {
                    counters.dropped();
                }
            }
        }
    }

    /// Vectors of an index (0 for ERR, REQ and anything unknown).
    pub(crate) fn count(&self, index: u32) -> u32 {
        match index {
            irq::INTX => self.intx_count,
            irq::MSI => self.msi.len() as u32,
            irq::MSIX => self.msix.len() as u32,
            _ => 0,
        }
    }

    pub(crate) fn active(&self) -> Option<u32> {
        self.active
    }

    pub(crate) fn intx_masked(&self) -> bool {
        self.intx_masked
    }

    /// The INTx state the status register's Interrupt Status bit reads.
    pub(crate) fn intx_line(&self) -> bool {
        self.intx_level || self.intx_edge
    }

    /// The command register's Interrupt Disable bit was written. Clearing it while the
    /// line's state is set asserts the line again.
    pub(crate) fn set_intx_disabled(&mut self, disabled: bool, counters: &Counters) {
        let was = self.intx_disabled;
        self.intx_disabled = disabled;
        if was && !disabled && self.intx_line() && self.active == Some(irq::INTX) {
            self.fire_intx(counters);
        }
    }

    pub(crate) fn set_eventfds(
        &mut self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
        counters: &Counters,
    ) -> Result<()> {
        let count = self.count(index);
        let len = u32::try_from(fds.len()).unwrap_or(u32::MAX);
        let end = start.checked_add(len);
        if fds.is_empty() || count == 0 || end.is_none_or(|e| e > count) {
            return Err(einval(format!(
                "set eventfds {start}+{len} of interrupt index {index} with {count} vectors"
            )));
        }
        let end = end.unwrap_or(0);
        if let Some(a) = self.active {
            if a != index {
                return Err(einval(format!(
                    "interrupt index {index} while index {a} is enabled"
                )));
            }
        }
        if index == irq::INTX && start != 0 {
            return Err(einval(format!("INTx vector {start}")));
        }
        if index == irq::MSI && self.active == Some(irq::MSI) && end > self.msi_enabled {
            return Err(einval(format!(
                "MSI vectors up to {end} while {} are enabled (MSI cannot grow)",
                self.msi_enabled
            )));
        }
        // Every fd is checked before any is kept: an eventfd (a pipe or a
        // full counter would block the signal), switched to non-blocking.
        for fd in fds.iter().flatten() {
            vfio_backend::eventfd::prepare_eventfd(*fd)?;
        }
        let mut dups = Vec::with_capacity(fds.len());
        for fd in fds {
            let dup = match fd {
                Some(b) => Some(
                    b.try_clone_to_owned()
                        .map_err(|e| Error::io("dup of an interrupt eventfd", e))?,
                ),
                None => None,
            };
            dups.push(dup);
        }
        let was_active = self.active == Some(index);
        match index {
            irq::INTX => {
                self.intx = dups.pop().flatten();
                if !was_active {
                    self.intx_masked = false;
                }
                self.active = Some(index);
                if !was_active && self.intx_line() {
                    self.fire_intx(counters);
                }
            }
            irq::MSI => {
                if !was_active {
                    self.msi_enabled = end;
                }
                store(&mut self.msi, start, dups);
                self.active = Some(index);
            }
            _ => {
                // MSI-X may grow while enabled (dynamic allocation).
                self.msix_enabled = if was_active {
                    self.msix_enabled.max(end)
                } else {
                    end
                };
                store(&mut self.msix, start, dups);
                self.active = Some(index);
            }
        }
        self.deliver_held(counters);
        Ok(())
    }

    pub(crate) fn disable(&mut self, index: u32) -> Result<()> {
        if self.active != Some(index) {
            return Err(einval(format!(
                "disable interrupt index {index}, which is not enabled"
            )));
        }
        self.disable_all();
        Ok(())
    }

    pub(crate) fn disable_all(&mut self) {
        self.active = None;
        self.intx = None;
        self.intx_masked = false;
        // No end of interrupt will come for a pulse once INTx is off.
        self.intx_edge = false;
        self.intx_edge_signalled = false;
        for v in self.msi.iter_mut().chain(self.msix.iter_mut()) {
            *v = None;
        }
        self.msi_enabled = 0;
        self.msix_enabled = 0;
        self.msi_held.fill(0);
        self.msix_held.fill(0);
    }

    /// A function level reset started by the guest: the device lowers its INTx line; the
    /// VMM's eventfds stay registered.
    pub(crate) fn function_reset(&mut self) {
        self.intx_level = false;
    }

    /// Forgets the INTx line level and Interrupt Disable too (device reset).
    pub(crate) fn reset(&mut self) {
        self.disable_all();
        self.intx_level = false;
        self.intx_disabled = false;
    }

    fn check_intx(&self, index: u32, what: &str) -> Result<()> {
        match index {
            irq::INTX if self.active == Some(irq::INTX) => Ok(()),
            irq::INTX => Err(einval(format!("{what} INTx, which is not enabled"))),
            irq::MSI | irq::MSIX | irq::ERR | irq::REQ => Err(Error::Refused {
                context: format!("{what} interrupt index {index}: only INTx can be masked"),
                errno: libc::ENOTTY,
            }),
            _ => Err(Error::InvalidArgument(format!("interrupt index {index}"))),
        }
    }

    pub(crate) fn mask(&mut self, index: u32) -> Result<()> {
        self.check_intx(index, "mask")?;
        self.intx_masked = true;
        Ok(())
    }

    pub(crate) fn unmask(&mut self, index: u32, counters: &Counters) -> Result<()> {
        self.check_intx(index, "unmask")?;
        self.unmask_intx(counters);
        Ok(())
    }

    /// Unmasks INTx; a line still asserted fires again at once.
    pub(crate) fn unmask_intx(&mut self, counters: &Counters) {
        if self.active != Some(irq::INTX) {
            return;
        }
        self.intx_masked = false;
        // The host's end of interrupt ends a pulse it was signalled.
        if self.intx_edge && self.intx_edge_signalled {
            self.intx_edge = false;
            self.intx_edge_signalled = false;
        }
        if self.intx_line() {
            self.fire_intx(counters);
        }
    }

    pub(crate) fn check_unmask_fd(&self, index: u32) -> Result<()> {
        self.check_intx(index, "set the unmask eventfd of")
    }

    fn fire_intx(&mut self, counters: &Counters) {
        if self.quiesced {
            // No interrupt while quiesced: the line's state stays and
            // fires when the device runs again.
            return;
        }
        if self.intx_masked || self.intx_disabled {
            // Masked by the host, or not asserted (Interrupt Disable): the state stays
            // set and fires when both allow it.
            counters.dropped();
            return;
        }
        // The host masks the line each time it fires (automasked).
        self.intx_masked = true;
        self.intx_edge_signalled = self.intx_edge;
        match &self.intx {
            Some(fd) if signal(fd) => counters.signalled(),
            _ => counters.dropped(),
        }
    }

    /// The device raises `vector` through whichever index is enabled.
    pub(crate) fn raise(&mut self, vector: u32, trigger: Trigger, counters: &Counters) {
        let (fds, held, enabled) = match self.active {
            Some(irq::MSIX) => (&self.msix, &mut self.msix_held, self.msix_enabled),
            Some(irq::MSI) => (&self.msi, &mut self.msi_held, self.msi_enabled),
            active => {
                if trigger == Trigger::Level {
                    self.intx_level = true;
                }
                if active == Some(irq::INTX) {
                    if trigger == Trigger::Pulse && !self.intx_edge {
                        self.intx_edge = true;
                        self.intx_edge_signalled = false;
                    }
                    self.fire_intx(counters);
                } else {
                    counters.dropped();
                }
                return;
            }
        };
        if vector >= enabled {
            counters.dropped();
            return;
        }
        if self.quiesced {
            // Held (pending) until the device runs again.
            set_bit(held, vector, true);
            return;
        }
        match fds.get(vector as usize).and_then(Option::as_ref) {
            Some(fd) if signal(fd) => counters.signalled(),
            _ => counters.dropped(),
        }
    }

    /// Lowers the INTx line.
    pub(crate) fn deassert(&mut self) {
        self.intx_level = false;
    }
}

fn store(slots: &mut [Option<OwnedFd>], start: u32, fds: Vec<Option<OwnedFd>>) {
    for (slot, fd) in slots.iter_mut().skip(start as usize).zip(fds) {
        *slot = fd;
    }
}
