//! The guest's accesses: config space and trapped BAR ranges.
//!
//! Hot paths: an emulated config read, an MSI-X table access and a trapped
//! BAR access take the device lock once and allocate nothing. A passed-
//! through config read takes no lock at all. An access forwarded to the
//! device (a config write, a trapped BAR range that is not the MSI-X table
//! or PBA) is made with no device lock held: it may wait for the backend.
//! A read of the MSI-X PBA or the MSI Pending Bits register of a device
//! wired through VFIO reports the masked vectors whose eventfd fired
//! (see `pending.rs`).

use pci_config::regs::{BAR0, COMMAND, ROM_ADDRESS};
use pci_config::{WriteEffect, WriteEffects};
use vfio_backend::region;

use super::placement::{record_decode_changes_in, DecodeScope};
use super::{lock, pending, Dword, Inner, IrqMode, VfioPciDevice, CONFIG_SPACE_SIZE};
use crate::outcome::{BarIndex, ConfigWriteOutcome, SLOTS};
use crate::{Error, Result};

/// Checks a guest access: 1, 2 or 4 bytes (8 for BARs) inside `limit`.
fn access_ok(offset: u64, len: usize, limit: u64, max: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8)
        && len <= max
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= limit)
}

impl VfioPciDevice {
    /// The guest reads `data.len()` (1, 2 or 4) bytes of config space at
    /// `offset`. Bad accesses read as all ones and are logged; nothing
    /// here fails.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        if !access_ok(offset, data.len(), CONFIG_SPACE_SIZE as u64, 4) {
            log::debug!("config read of {} bytes at {offset:#x} ignored", data.len());
            data.fill(0xff);
            return;
        }
        // Split at dword boundaries: each dword has its own policy.
        let offset = offset as usize;
        if offset % 4 + data.len() <= 4 {
            // One dword (every naturally aligned access).
            self.read_chunk(offset, data);
            return;
        }
        let mut done = 0usize;
        while done < data.len() {
            let off = offset + done;
            let chunk = (4 - off % 4).min(data.len() - done);
            if let Some(buf) = data.get_mut(done..done + chunk) {
                self.read_chunk(off, buf);
            }
            done += chunk;
        }
    }

    /// The dword at config register `reg` (offset `4 * reg`).
    pub fn read_config_register(&self, reg: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read_config((reg as u64).saturating_mul(4), &mut b);
        u32::from_le_bytes(b)
    }

    fn read_chunk(&self, off: usize, buf: &mut [u8]) {
        let policy = self.policy.get(off / 4).copied().unwrap_or(Dword::Emulated);
        match policy {
            Dword::Passthrough | Dword::Command => {
                if let Err(e) = self.vfio.region_read(region::CONFIG, off as u64, buf) {
                    log::warn!("config read at {off:#x} failed: {e}");
                    buf.fill(0xff);
                }
            }
            Dword::Emulated | Dword::Msi | Dword::Msix => {
                let Ok(inner) = self.inner.lock() else {
                    buf.fill(0xff);
                    return;
                };
                if inner.config.read(off, buf).is_err() {
                    buf.fill(0xff);
                    return;
                }
                let cap = match policy {
                    Dword::Msi => inner.msi.as_ref().map(|m| (m.offset, Some(&m.state), None)),
                    Dword::Msix => inner
                        .msix
                        .as_ref()
                        .map(|m| (m.offset, None, Some(&m.state))),
                    _ => None,
                };
                if let Some((cap_off, msi, msix)) = cap {
                    // The capability's own registers, except its id and
                    // next pointer (bytes 0 and 1), which the emulated
                    // config space owns because hiding may rewrite them.
                    let Some(rel) = off.checked_sub(cap_off) else {
                        return;
                    };
                    let mut tmp = [0u8; 4];
                    let Some(t) = tmp.get_mut(..buf.len()) else {
                        return;
                    };
                    if let Some(s) = msi {
                        s.read(rel as u64, t);
                        // Wired through VFIO: a masked vector whose eventfd fired is pending.
                        if let (IrqMode::Msi(_), Some(m)) = (inner.irq_mode, inner.msi.as_ref()) {
                            pending::msi_pending(s, m.group.as_ref(), rel as u64, t);
                        }
                    } else if let Some(s) = msix {
                        s.read(rel as u64, t);
                    }
                    for (i, (b, v)) in buf.iter_mut().zip(t.iter()).enumerate() {
                        if rel + i >= 2 {
                            *b = *v;
                        }
                    }
                }
            }
        }
    }

    /// The guest writes `data` (1, 2 or 4 bytes) to config space at
    /// `offset`, and learns what changed for its bus: BARs that moved, that
    /// decode again or decode nowhere now, decode enables that flipped (see
    /// [`ConfigWriteOutcome`]). Garbage is handled (ignored, masked or refused
    /// and logged). An `Err` reports a backend or VMM failure, after which
    /// the device keeps a consistent state but what changed is not reported:
    /// re-read [`bars`](Self::bars). Allocates nothing.
    pub fn write_config(&self, offset: u64, data: &[u8]) -> Result<ConfigWriteOutcome> {
        let mut outcome = ConfigWriteOutcome::default();
        if !access_ok(offset, data.len(), CONFIG_SPACE_SIZE as u64, 4) {
            log::debug!(
                "config write of {} bytes at {offset:#x} ignored",
                data.len()
            );
            return Ok(outcome);
        }
        let offset = offset as usize;
        if offset % 4 + data.len() <= 4 {
            // One dword (every naturally aligned access): the outcome is filled in place.
            return self
                .write_chunk(offset, data, &mut outcome)
                .map(|()| outcome);
        }
        let mut result = Ok(());
        let mut done = 0usize;
        while done < data.len() {
            let off = offset + done;
            let chunk = (4 - off % 4).min(data.len() - done);
            if let Some(buf) = data.get(done..done + chunk) {
                let mut o = ConfigWriteOutcome::default();
                match self.write_chunk(off, buf, &mut o) {
                    Ok(()) => outcome.merge(&o),
                    Err(e) => result = Err(e),
                }
            }
            done += chunk;
        }
        result.map(|()| outcome)
    }

    /// Writes `data` at byte `offset` of config register `reg` (the Cloud
    /// Hypervisor-style entry point); see [`write_config`](Self::write_config).
    pub fn write_config_register(
        &self,
        reg: usize,
        offset: u64,
        data: &[u8],
    ) -> Result<ConfigWriteOutcome> {
        self.write_config((reg as u64).saturating_mul(4).saturating_add(offset), data)
    }

    /// Writes one dword's worth of `buf` at `off`; what changed goes to `outcome`, which
    /// the caller passes fresh (filled in place: the outcome is a few hundred bytes).
    fn write_chunk(&self, off: usize, buf: &[u8], outcome: &mut ConfigWriteOutcome) -> Result<()> {
        let policy = self.policy.get(off / 4).copied().unwrap_or(Dword::Emulated);
        match policy {
            Dword::Passthrough => self
                .vfio
                .region_write(region::CONFIG, off as u64, buf)
                .map_err(|e| Error::backend(format!("config write at {off:#x}"), e)),
            Dword::Command => {
                // The device sees command and status writes (bus master,
                // decode enables, RW1C status bits) ...
                let fwd = self
                    .vfio
                    .region_write(region::CONFIG, off as u64, buf)
                    .map_err(|e| Error::backend(format!("command/status write at {off:#x}"), e));
                // ... and we track decode changes and INTx disable.
                let mut inner = lock(&self.inner, "device")?;
                let r = self.emulated_write(&mut inner, off, buf, outcome);
                fwd.and(r)
            }
            Dword::Emulated => {
                let mut inner = lock(&self.inner, "device")?;
                self.emulated_write(&mut inner, off, buf, outcome)
            }
            Dword::Msi | Dword::Msix => {
                let mut inner = lock(&self.inner, "device")?;
                let cap_off = match policy {
                    Dword::Msi => inner.msi.as_ref().map(|m| m.offset),
                    _ => inner.msix.as_ref().map(|m| m.offset),
                };
                let Some(rel) = cap_off.and_then(|c| off.checked_sub(c)) else {
                    return Ok(());
                };
                // Bytes 0 and 1 (id, next pointer) are read-only: skip them.
                let skip = 2usize.saturating_sub(rel).min(buf.len());
                let Some(rest) = buf.get(skip..) else {
                    return Ok(());
                };
                if rest.is_empty() {
                    return Ok(());
                }
                let at = (rel + skip) as u64;
                let r = match policy {
                    Dword::Msi => match inner.msi.as_mut() {
                        Some(m) => m.state.write(at, rest),
                        None => Ok(()),
                    },
                    _ => match inner.msix.as_mut() {
                        Some(m) => m.state.write(at, rest),
                        None => Ok(()),
                    },
                };
                let r = r.map_err(Error::interrupts(
                    "a guest write to the MSI or MSI-X capability",
                ));
                // Rewiring VFIO (an enable, a vector count change) is a backend call: made
                // after the device lock is dropped.
                let stale = Self::irq_mode_stale(&inner);
                drop(inner);
                let m = if stale { self.sync_irq_mode() } else { Ok(()) };
                r.and(m)
            }
        }
    }

    /// A write to the emulated config space, and what it means.
    fn emulated_write(
        &self,
        inner: &mut Inner,
        off: usize,
        buf: &[u8],
        outcome: &mut ConfigWriteOutcome,
    ) -> Result<()> {
        // The command register, a BAR or the ROM BAR: what the registers hold and where
        // each BAR decodes must agree, whether or not a move was reported.
        let end = off.saturating_add(buf.len());
        let overlaps = |start: usize, len: usize| off < start + len && end > start;
        let touches_decode = overlaps(COMMAND, 2) || overlaps(BAR0, ROM_ADDRESS + 4 - BAR0);
        let touches_rom = overlaps(ROM_ADDRESS, 4);
        // A write inside one BAR's register(s) can change that BAR's decode only:
        // the common case (sizing, moving a BAR) looks at that one.
        let scope = touches_decode
            .then(|| DecodeScope::of_write(off, end, |reg| inner.bar_owning_register(reg)));
        let mut before = [None; SLOTS];
        if let Some(sc) = scope {
            inner.decoded_into(sc, &mut before);
        }
        let rom_before = inner
            .config
            .rom()
            .filter(|_| touches_rom)
            .map(|r| r.enabled);
        // Filled in place: no copy of the effect list's capacity.
        let mut effects = WriteEffects::new();
        if let Err(e) = inner.config.write_into(off, buf, &mut effects) {
            log::debug!("config write at {off:#x} ignored: {e}");
            return Ok(());
        }
        let mut result = Ok(());
        for effect in effects.iter() {
            if let Some(on) = effect.memory_decode_toggled() {
                outcome.memory_decode = Some(on);
            }
            if let Some(on) = effect.io_decode_toggled() {
                outcome.io_decode = Some(on);
            }
            match *effect {
                WriteEffect::BarReprogram { bar, new_base, .. } => {
                    if let Err(e) = self.move_bar_locked(inner, bar, new_base) {
                        log::warn!("guest BAR move refused ({e}); the BAR decodes nowhere");
                    }
                }
                WriteEffect::CommandChange { new, .. } => {
                    if let Some(intx) = inner.intx.as_mut() {
                        if let Err(e) = intx.state.set_command(new) {
                            result = Err(Error::Interrupts {
                                context: "a guest write to the command register (INTx disable)",
                                source: e,
                            });
                        }
                    }
                }
            }
        }
        if let Some(scope) = scope {
            self.sync_decode_in(inner, scope);
            record_decode_changes_in(inner, &before, scope, outcome);
        }
        if let Some(was) = rom_before {
            let now = inner.config.rom().is_some_and(|r| r.enabled);
            if now != was {
                outcome.rom_enable = Some(now);
            }
        }
        result
    }

    /// The guest reads `data.len()` (1, 2, 4 or 8) bytes at `offset` of a
    /// trapped range of BAR `which`. Bad accesses, and any access to a BAR
    /// that decodes nowhere (see [`super::BarView::decoding`]), read as all
    /// ones and are logged.
    ///
    /// An access forwarded to the device's region is made after the device lock is
    /// dropped: it may wait for the backend (a vfio-user reply) without holding up other
    /// vCPUs' accesses to this device.
    pub fn read_bar(&self, which: BarIndex, offset: u64, data: &mut [u8]) {
        if let Some(region) = self.read_bar_locked(which, offset, data) {
            if let Err(e) = self.vfio.region_read(region, offset, data) {
                log::warn!("{which} read at {offset:#x} failed: {e}");
                data.fill(0xff);
            }
        }
    }

    /// The part of [`Self::read_bar`] under the device lock: serves the access, or returns
    /// the region to forward it to.
    fn read_bar_locked(&self, which: BarIndex, offset: u64, data: &mut [u8]) -> Option<u32> {
        let index = which.slot();
        let Ok(inner) = self.inner.lock() else {
            data.fill(0xff);
            return None;
        };
        let Some(bar) = inner.bar(index) else {
            data.fill(0xff);
            return None;
        };
        if !bar.decoding {
            // Its register holds an address the VMM refused: it decodes nowhere, and a read
            // nobody claims reads all ones.
            data.fill(0xff);
            return None;
        }
        if !access_ok(offset, data.len(), bar.layout.guest_size, 8) {
            log::debug!(
                "{which} read of {} bytes at {offset:#x} ignored",
                data.len()
            );
            data.fill(0xff);
            return None;
        }
        let len = data.len() as u64;
        if let Some(m) = inner.msix.as_ref() {
            if m.table.0 == index && within(offset, len, m.table.1.offset, m.table.1.len) {
                m.state.table_read(offset - m.table.1.offset, data);
                return None;
            }
            if m.pba.0 == index && within(offset, len, m.pba.1.offset, m.pba.1.len) {
                let rel = offset - m.pba.1.offset;
                m.state.pba_read(rel, data);
                // Wired through VFIO: a masked vector whose eventfd fired is pending.
                if inner.irq_mode == IrqMode::Msix {
                    pending::msix_pba(&m.state, m.group.as_ref(), rel, data);
                }
                return None;
            }
        }
        if let Some(hm) = bar
            .maps
            .iter()
            .find(|h| within(offset, len, h.area.offset, h.area.len))
        {
            // SAFETY: the range lies inside the live mapping (checked by
            // `within`), which this device owns until drop.
            unsafe { volatile_read(hm.mapping.as_ptr(), offset - hm.area.offset, data) };
            return None;
        }
        if offset.saturating_add(len) <= bar.region.size {
            return Some(u32::try_from(index).unwrap_or(u32::MAX));
        }
        // Padding beyond the device's region (rounded-up or relocated BAR).
        data.fill(0);
        None
    }

    /// The guest writes `data` (1, 2, 4 or 8 bytes) at `offset` of a trapped
    /// range of BAR `which`. Bad accesses, and writes to the (read-only) ROM,
    /// are ignored and logged; an `Err` reports a backend failure.
    ///
    /// As for reads, a write forwarded to the device's region is made after the device
    /// lock is dropped.
    pub fn write_bar(&self, which: BarIndex, offset: u64, data: &[u8]) -> Result<()> {
        match self.write_bar_locked(which, offset, data)? {
            Some(region) => self
                .vfio
                .region_write(region, offset, data)
                .map_err(|e| Error::backend(format!("{which} write at {offset:#x}"), e)),
            None => Ok(()),
        }
    }

    /// The part of [`Self::write_bar`] under the device lock: serves the access, or returns
    /// the region to forward it to.
    fn write_bar_locked(&self, which: BarIndex, offset: u64, data: &[u8]) -> Result<Option<u32>> {
        let index = which.slot();
        let mut inner = lock(&self.inner, "device")?;
        let inner = &mut *inner;
        let bar = if which.is_rom() {
            // The ROM is read-only.
            return Ok(None);
        } else {
            inner.bars.get(index).and_then(|b| b.as_ref())
        };
        let Some(bar) = bar else {
            return Ok(None);
        };
        if !bar.decoding {
            log::debug!("{which} write ignored: the BAR decodes nowhere");
            return Ok(None);
        }
        if !access_ok(offset, data.len(), bar.layout.guest_size, 8) {
            log::debug!(
                "{which} write of {} bytes at {offset:#x} ignored",
                data.len()
            );
            return Ok(None);
        }
        let len = data.len() as u64;
        if let Some(m) = inner.msix.as_mut() {
            if m.table.0 == index && within(offset, len, m.table.1.offset, m.table.1.len) {
                return m
                    .state
                    .table_write(offset - m.table.1.offset, data)
                    .map(|()| None)
                    .map_err(Error::interrupts("a guest write to the MSI-X table"));
            }
            if m.pba.0 == index && within(offset, len, m.pba.1.offset, m.pba.1.len) {
                m.state.pba_write(offset - m.pba.1.offset, data);
                return Ok(None);
            }
        }
        if let Some(hm) = bar
            .maps
            .iter()
            .find(|h| within(offset, len, h.area.offset, h.area.len))
        {
            if !bar.region.writable() {
                return Ok(None);
            }
            // SAFETY: the range lies inside the live mapping (checked by
            // `within`), which this device owns until drop.
            unsafe { volatile_write(hm.mapping.as_ptr(), offset - hm.area.offset, data) };
            return Ok(None);
        }
        Ok((offset.saturating_add(len) <= bar.region.size)
            .then(|| u32::try_from(index).unwrap_or(u32::MAX)))
    }
}

fn within(offset: u64, len: u64, start: u64, size: u64) -> bool {
    offset >= start
        && offset
            .checked_add(len)
            .is_some_and(|end| end <= start.saturating_add(size))
}

/// Reads device memory with one access of the guest's width where aligned.
///
/// # Safety
/// `base + off .. base + off + data.len()` must lie inside a live mapping.
unsafe fn volatile_read(base: *mut u8, off: u64, data: &mut [u8]) {
    // SAFETY: the caller guarantees the range is mapped.
    let p = unsafe { base.add(off as usize) };
    // A mask, not a division: the length is 1, 2, 4 or 8.
    let aligned = (p as usize) & (data.len().max(1) - 1) == 0;
    match data.len() {
        2 if aligned => {
            // SAFETY: two mapped bytes (caller), aligned (checked).
            let v = unsafe { p.cast::<u16>().read_volatile() };
            data.copy_from_slice(&v.to_ne_bytes());
        }
        4 if aligned => {
            // SAFETY: four mapped bytes (caller), aligned (checked).
            let v = unsafe { p.cast::<u32>().read_volatile() };
            data.copy_from_slice(&v.to_ne_bytes());
        }
        8 if aligned => {
            // SAFETY: eight mapped bytes (caller), aligned (checked).
            let v = unsafe { p.cast::<u64>().read_volatile() };
            data.copy_from_slice(&v.to_ne_bytes());
        }
        _ => {
            for (i, b) in data.iter_mut().enumerate() {
                // SAFETY: byte i of the mapped range (caller).
                *b = unsafe { p.add(i).read_volatile() };
            }
        }
    }
}

/// Writes device memory with one access of the guest's width where aligned.
///
/// # Safety
/// `base + off .. base + off + data.len()` must lie inside a live, writable mapping.
unsafe fn volatile_write(base: *mut u8, off: u64, data: &[u8]) {
    // SAFETY: the caller guarantees the range is mapped.
    let p = unsafe { base.add(off as usize) };
    // A mask, not a division: the length is 1, 2, 4 or 8.
    let aligned = (p as usize) & (data.len().max(1) - 1) == 0;
    match *data {
        [a, b] if aligned => {
            // SAFETY: two mapped, writable bytes (caller), aligned (checked).
            unsafe { p.cast::<u16>().write_volatile(u16::from_ne_bytes([a, b])) }
        }
        [a, b, c, d] if aligned => {
            // SAFETY: four mapped, writable bytes (caller), aligned (checked).
            unsafe {
                p.cast::<u32>()
                    .write_volatile(u32::from_ne_bytes([a, b, c, d]))
            }
        }
        [a, b, c, d, e, f, g, h] if aligned => {
            let v = u64::from_ne_bytes([a, b, c, d, e, f, g, h]);
            // SAFETY: eight mapped, writable bytes (caller), aligned (checked).
            unsafe { p.cast::<u64>().write_volatile(v) }
        }
        _ => {
            for (i, b) in data.iter().enumerate() {
                // SAFETY: byte i of the mapped, writable range (caller).
                unsafe { p.add(i).write_volatile(*b) };
            }
        }
    }
}
