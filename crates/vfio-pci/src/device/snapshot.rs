//! Snapshot, restore and reset of the guest-visible state.
//!
//! A snapshot holds what this crate emulates: the emulated config space,
//! BAR placements and the MSI, MSI-X and INTx state. The device's own
//! internal state is not ours to save (that is VFIO migration's job).

use pci_bar_alloc::BarPlacement;
use pci_config::regs::{
    COMMAND, COMMAND_BUS_MASTER, COMMAND_INTX_DISABLE, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE,
};
use pci_config::{ConfigSpace, ConfigSpaceSnapshot, ROM_BAR};
use pci_interrupts::{IntxSnapshot, IntxState, MsiSnapshot, MsiState, MsixSnapshot, MsixState};
use serde::{Deserialize, Serialize};

use super::{lock, Inner, IrqMode, VfioPciDevice};
use crate::outcome::BarIndex;
use crate::{Error, Result};

/// Format version of [`DeviceState`] inside a [`DeviceSnapshot`].
pub const DEVICE_SNAPSHOT_VERSION: u32 = 1;

/// The guest-visible state of a [`VfioPciDevice`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The emulated config space.
    pub config: ConfigSpaceSnapshot,
    /// Placement of BARs 0..=5 (`None`: absent or not placed).
    pub bars: Vec<Option<BarPlacement>>,
    /// Placement of the ROM.
    pub rom: Option<BarPlacement>,
    /// MSI state.
    pub msi: Option<MsiSnapshot>,
    /// MSI-X state.
    pub msix: Option<MsixSnapshot>,
    /// INTx state.
    pub intx: Option<IntxSnapshot>,
    /// Which interrupt was wired through VFIO.
    pub irq_mode: IrqMode,
}

/// A versioned envelope around [`DeviceState`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// Format version of the payload.
    pub version: u32,
    /// The state.
    pub payload: DeviceState,
}

impl VfioPciDevice {
    /// Takes a snapshot of the guest-visible state.
    pub fn snapshot(&self) -> Result<DeviceSnapshot> {
        let inner = lock(&self.inner, "device")?;
        Ok(DeviceSnapshot {
            version: DEVICE_SNAPSHOT_VERSION,
            payload: DeviceState {
                config: inner.config.snapshot(),
                bars: inner
                    .bars
                    .iter()
                    .map(|b| b.as_ref().and_then(|b| b.placement))
                    .collect(),
                rom: inner.rom.as_ref().and_then(|r| r.placement),
                msi: inner.msi.as_ref().map(|m| m.state.snapshot()),
                msix: inner.msix.as_ref().map(|m| m.state.snapshot()),
                intx: inner.intx.as_ref().map(|m| m.state.snapshot()),
                irq_mode: inner.irq_mode,
            },
        })
    }

    /// Restores a snapshot taken from a device of the same shape: the guest
    /// then sees exactly the config space, BAR placement and interrupt
    /// routes it had. On error nothing changes.
    pub fn restore(&self, snapshot: &DeviceSnapshot) -> Result<()> {
        let (s, config) = checked_payload(snapshot)?;
        let wiring = lock(&self.wiring, "interrupt wiring")?;
        let mut inner = lock(&self.inner, "device")?;
        // Interrupt state first, on unbound copies: a refusal changes nothing.
        let (msi, msix, intx) = restored_interrupts(&inner, s)?;

        // Placements: give ours back, take the snapshot's; undo on refusal.
        let current: Vec<(usize, BarPlacement)> = placements(&inner);
        let wanted: Vec<(usize, BarPlacement)> = s
            .bars
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (i, p)))
            .chain(s.rom.map(|p| (ROM_BAR, p)))
            .collect();
        {
            let mut alloc = lock(&self.resources.allocator, "BAR allocator")?;
            for (_, p) in &current {
                if let Err(e) = alloc.release(p) {
                    log::warn!("restore: releasing {:#x}: {e}", p.base);
                }
            }
            let mut taken = Vec::new();
            for (i, p) in &wanted {
                if let Err(e) = alloc.reserve_exact(p) {
                    for t in &taken {
                        let _ = alloc.release(t);
                    }
                    for (_, p) in &current {
                        let _ = alloc.reserve_exact(p);
                    }
                    return Err(Error::SnapshotPlacement {
                        bar: BarIndex::from_slot(*i).unwrap_or(BarIndex::Rom),
                        base: p.base,
                        source: e,
                    });
                }
                taken.push(*p);
            }
        }

        // Commit: move the guest mappings, then install the state. VFIO is unwired (a
        // backend call) once the device lock is dropped.
        let unwired = Self::take_irq_mode(&mut inner);
        for (i, p) in &wanted {
            if let Some(bar) = inner.bar_mut(*i) {
                self.guest_unmap(bar);
                bar.placement = Some(*p);
                bar.decoding = match self.guest_map(bar) {
                    Ok(()) => true,
                    Err(e) => {
                        log::error!("restore: mapping BAR{i} at {:#x}: {e}", p.base);
                        false
                    }
                };
            }
        }
        inner.config = config;
        // The snapshot's registers may hold an address not placed (a sizing pattern, a
        // refused move): such a BAR decodes nowhere, as it did.
        self.sync_decode(&mut inner);
        // The command register lives in the device too: give it back the
        // decode enables and bus mastering the guest had programmed.
        let cmd = inner.config.command();
        let result = rebind(&mut inner, msi, msix, intx);
        drop(inner);
        // The backend calls, without the device lock.
        self.disable_index(unwired);
        if let Err(e) = self.vfio.region_write(
            vfio_backend::region::CONFIG,
            COMMAND as u64,
            &cmd.to_le_bytes(),
        ) {
            log::warn!("restore: writing the command register: {e}");
        }
        let m = self.sync_irq_mode_wired(&wiring);
        result.and(m)
    }

    /// Checks everything of `snapshot` that [`restore`](Self::restore) checks before it
    /// changes anything (version, config space, shape, interrupt state), without changing
    /// anything: what a migration destination does before it loads the device.
    pub(super) fn check_snapshot(&self, snapshot: &DeviceSnapshot) -> Result<()> {
        let (s, _) = checked_payload(snapshot)?;
        let inner = lock(&self.inner, "device")?;
        restored_interrupts(&inner, s).map(|_| ())
    }

    /// Resets the device (function-level reset through VFIO) and the
    /// emulated interrupt state. BAR placements stay, so the VMM's memory
    /// map does not change; decoding and bus mastering are off afterwards,
    /// as after a reset on bare metal.
    pub fn reset(&self) -> Result<()> {
        let wiring = lock(&self.wiring, "interrupt wiring")?;
        let unwired = Self::take_irq_mode(&mut *lock(&self.inner, "device")?);
        // The backend calls (unwiring, quiescing, the reset itself, which may take the
        // kernel a while) are made without the device lock.
        self.disable_index(unwired);
        // The kernel saves config space before a function reset and restores
        // it after, command register included: turn I/O and memory decoding,
        // bus mastering and INTx disable off first, so the device comes back
        // with the command register a reset leaves (PCIe Base 7.5.1.1.3).
        quiesce_command(self.vfio.as_ref());
        let r = self
            .vfio
            .reset()
            .map_err(|e| Error::backend("device reset", e));
        let mut inner = lock(&self.inner, "device")?;
        if let Some(m) = inner.msi.as_mut() {
            if let Err(e) = m.state.reset() {
                log::warn!("MSI reset: {e}");
            }
        }
        if let Some(m) = inner.msix.as_mut() {
            if let Err(e) = m.state.reset() {
                log::warn!("MSI-X reset: {e}");
            }
        }
        if let Some(m) = inner.intx.as_mut() {
            if let Err(e) = m.state.reset() {
                log::warn!("INTx reset: {e}");
            }
        }
        inner.config.set_command(0);
        // BAR registers read their placements again, and every placed BAR decodes there
        // (a register left holding a refused address no longer keeps the BAR off the bus).
        self.restore_bar_registers(&mut inner);
        drop(inner);
        let m = self.sync_irq_mode_wired(&wiring);
        r.and(m)
    }
}

/// Clears I/O, memory, bus master and INTx disable in the device's command
/// register (not the emulated one); failures are logged.
fn quiesce_command(vfio: &dyn vfio_backend::Vfio) {
    const QUIESCE: u16 =
        COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
    let mut cmd = [0u8; 2];
    let r = vfio
        .region_read(vfio_backend::region::CONFIG, COMMAND as u64, &mut cmd)
        .and_then(|()| {
            let v = u16::from_le_bytes(cmd) & !QUIESCE;
            vfio.region_write(
                vfio_backend::region::CONFIG,
                COMMAND as u64,
                &v.to_le_bytes(),
            )
        });
    if let Err(e) = r {
        log::warn!("clearing the command register before reset: {e}");
    }
}

/// Each group goes back to its fresh state (disabled, all masked), then the restored
/// state, bound to it, brings it up to date. Every group is rebound; the error is the
/// last that failed.
fn rebind(
    inner: &mut Inner,
    msi: Option<pci_interrupts::MsiState>,
    msix: Option<pci_interrupts::MsixState>,
    intx: Option<pci_interrupts::IntxState>,
) -> Result<()> {
    let mut result = Ok(());
    let mut fail = |context: &'static str, source| {
        result = Err(Error::Interrupts { context, source });
    };
    if let (Some(m), Some(mut st)) = (inner.msi.as_mut(), msi) {
        let _ = m.group.disable();
        if let Err(e) = st.set_group(Some(m.group.clone())) {
            fail("binding the MSI group after restore", e);
        }
        m.state = st;
    }
    if let (Some(m), Some(mut st)) = (inner.msix.as_mut(), msix) {
        let _ = m.group.disable();
        if let Err(e) = st.set_group(Some(m.group.clone())) {
            fail("binding the MSI-X group after restore", e);
        }
        m.state = st;
    }
    if let (Some(m), Some(mut st)) = (inner.intx.as_mut(), intx) {
        let _ = m.group.disable();
        if let Err(e) = st.set_group(Some(m.group.clone())) {
            fail("binding the INTx group after restore", e);
        }
        m.state = st;
    }
    result
}

/// A copy of `state` with `snap` restored into it (unbound from its group).
/// The payload of `snapshot` and the config space it holds, once its format version and
/// its config space are known good.
fn checked_payload(snapshot: &DeviceSnapshot) -> Result<(&DeviceState, ConfigSpace)> {
    if snapshot.version != DEVICE_SNAPSHOT_VERSION {
        return Err(Error::SnapshotVersion {
            found: snapshot.version,
            supported: DEVICE_SNAPSHOT_VERSION,
        });
    }
    let s = &snapshot.payload;
    let config =
        ConfigSpace::restore(&s.config).map_err(|source| Error::SnapshotConfig { source })?;
    Ok((s, config))
}

/// Unbound copies of `inner`'s MSI, MSI-X and INTx state with `s`'s restored into them,
/// after `s` is checked to have `inner`'s shape: what `restore` installs and
/// `check_snapshot` only checks. `inner` itself is not changed.
fn restored_interrupts(
    inner: &Inner,
    s: &DeviceState,
) -> Result<(Option<MsiState>, Option<MsixState>, Option<IntxState>)> {
    check_shape(inner, s)?;
    let msi = restored(
        inner.msi.as_ref().map(|m| &m.state),
        s.msi.as_ref(),
        "MSI",
        |st, sn| {
            st.set_group(None)?;
            st.restore(sn)
        },
    )?;
    let msix = restored(
        inner.msix.as_ref().map(|m| &m.state),
        s.msix.as_ref(),
        "MSI-X",
        |st, sn| {
            st.set_group(None)?;
            st.restore(sn)
        },
    )?;
    let intx = restored(
        inner.intx.as_ref().map(|m| &m.state),
        s.intx.as_ref(),
        "INTx",
        |st, sn| {
            st.set_group(None)?;
            st.restore(sn)
        },
    )?;
    Ok((msi, msix, intx))
}

fn restored<T: Clone, S>(
    state: Option<&T>,
    snap: Option<&S>,
    what: &'static str,
    f: impl FnOnce(&mut T, &S) -> pci_interrupts::Result<()>,
) -> Result<Option<T>> {
    match (state, snap) {
        (Some(st), Some(sn)) => {
            let mut c = st.clone();
            f(&mut c, sn).map_err(|source| Error::SnapshotInterrupts {
                capability: what,
                source,
            })?;
            Ok(Some(c))
        }
        _ => Ok(None),
    }
}

fn placements(inner: &Inner) -> Vec<(usize, BarPlacement)> {
    inner
        .bars
        .iter()
        .flatten()
        .chain(inner.rom.iter())
        .filter_map(|b| b.placement.map(|p| (b.index.slot(), p)))
        .collect()
}

fn check_shape(inner: &Inner, s: &DeviceState) -> Result<()> {
    if s.bars.len() != inner.bars.len() {
        return Err(Error::SnapshotMismatch {
            reason: format!(
                "snapshot has {} BARs, the device {}",
                s.bars.len(),
                inner.bars.len()
            ),
        });
    }
    for (i, (ours, theirs)) in inner.bars.iter().zip(s.bars.iter()).enumerate() {
        match (ours, theirs) {
            (Some(b), Some(p)) if p.size != b.layout.guest_size => {
                return Err(Error::SnapshotMismatch {
                    reason: format!(
                        "BAR{i} is {:#x} bytes here but {:#x} in the snapshot",
                        b.layout.guest_size, p.size
                    ),
                })
            }
            (None, Some(_)) => {
                return Err(Error::SnapshotMismatch {
                    reason: format!("the snapshot places BAR{i}, which this device does not have"),
                })
            }
            _ => {}
        }
    }
    if s.msi.is_some() != inner.msi.is_some()
        || s.msix.is_some() != inner.msix.is_some()
        || s.intx.is_some() != inner.intx.is_some()
    {
        return Err(Error::SnapshotMismatch {
            reason: "the snapshot's interrupt capabilities differ from this device's".into(),
        });
    }
    Ok(())
}
