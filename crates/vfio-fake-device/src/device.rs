//! [`FakeDevice`]: a [`DeviceTemplate`] brought to life behind the
//! [`Vfio`] trait.

use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vfio_backend::{
    device_flags, irq, irq_flags, region, region_flags, DeviceInfo, Error, IrqInfo, Mapping,
    RegionCap, RegionInfo, Result, SparseArea, Vfio,
};

use crate::bar::Bar;
use crate::dma::{DmaFault, DmaMappings};
use crate::error::FakeResult;
use crate::inject::{Counters, Faults, Injected, Op};
use crate::irq::{IrqState, Trigger};
use crate::regs::{self, Ctx};
use crate::template::{cap_id, BarKind, DeviceTemplate, PAGE_SIZE};

/// Number of interrupt indices reported (`VFIO_PCI_NUM_IRQS`).
const NUM_IRQS: u32 = 5;

/// Mutable device state, behind the one lock.
#[derive(Debug)]
struct State {
    config: Vec<u8>,
    irq: IrqState,
    dma: DmaMappings,
}

#[derive(Debug)]
struct Watcher {
    stop: Arc<AtomicBool>,
    /// Signalled on stop, so the watcher's poll returns at once.
    wake: Arc<EventFd>,
    handle: JoinHandle<()>,
}

impl Watcher {
    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Err(e) = self.wake.write(1) {
            log::warn!("waking the INTx unmask watcher: {e}");
        }
        if self.handle.join().is_err() {
            log::warn!("the INTx unmask eventfd watcher panicked");
        }
    }
}

#[derive(Debug)]
struct Inner {
    template: DeviceTemplate,
    bars: [Option<Bar>; 6],
    state: Mutex<State>,
    /// Mirror of the command register, for the decode check without the lock.
    command: AtomicU16,
    counters: Counters,
    faults: Faults,
    watcher: Mutex<Option<Watcher>>,
}

/// A fake PCI function behind the [`Vfio`] trait, in-process.
///
/// Regions follow `vfio-pci`: BARs 0 to 5 (memory BARs are memfds that
/// [`Vfio::mmap_region`] and [`Vfio::region_mmap_fd`] share, minus the pages
/// of register blocks), the ROM (6, read-only), config space (7) and no VGA
/// (8). Interrupts follow `vfio-pci` too: one index enabled at a time,
/// eventfds per vector, INTx automasked.
///
/// DMA: the device dereferences the `host_addr` of each [`vfio_backend::DmaSource`]
/// it is given. As with the kernel backend, the caller must keep that
/// memory mapped until [`Vfio::dma_unmap`] of the range returns; every
/// device access is checked against the mapped ranges.
///
/// Thread safety: all methods take `&self`; region accesses take at most
/// one lock (none for plain BAR memory) and do not allocate.
#[derive(Debug)]
pub struct FakeDevice {
    inner: Arc<Inner>,
}

fn injected(op: Op, what: Injected) -> Error {
    match what {
        Injected::Dead => Error::Refused {
            context: format!("fake device {}: the device does not answer", op.name()),
            errno: libc::EIO,
        },
        Injected::Fail(errno) => Error::Refused {
            context: format!("fake device {}: injected failure", op.name()),
            errno,
        },
    }
}

fn out_of_range(index: u32, offset: u64, len: usize, size: u64) -> Error {
    Error::InvalidArgument(format!(
        "access of {len} bytes at {offset:#x} of region {index} ({size:#x} bytes)"
    ))
}

impl FakeDevice {
    /// Creates the device: one memfd per implemented BAR, the config space
    /// and registers at their template values, no interrupt enabled, no DMA
    /// mapping.
    pub fn new(template: DeviceTemplate) -> FakeResult<FakeDevice> {
        let mut bars: [Option<Bar>; 6] = Default::default();
        for (i, slot) in bars.iter_mut().enumerate() {
            if let Some(spec) = template.bar(i as u8) {
                let blocks = template
                    .registers()
                    .iter()
                    .filter(|b| usize::from(b.bar) == i)
                    .copied()
                    .collect();
                *slot = Some(Bar::new(i, spec, blocks)?);
            }
        }
        let irq = IrqState::new(
            template.interrupt_pin() != 0,
            template.msi().map_or(0, |m| m.vectors),
            template.msix().map_or(0, |m| m.vectors),
        );
        let inner = Inner {
            state: Mutex::new(State {
                config: template.config().to_vec(),
                irq,
                dma: DmaMappings::default(),
            }),
            command: AtomicU16::new(0),
            bars,
            template,
            counters: Counters::default(),
            faults: Faults::default(),
            watcher: Mutex::new(None),
        };
        inner.restore_memory();
        inner.sync_command(inner.template.config());
        Ok(FakeDevice {
            inner: Arc::new(inner),
        })
    }

    /// A device from a named profile (see [`crate::profiles`]).
    pub fn profile(name: &str) -> FakeResult<FakeDevice> {
        FakeDevice::new(crate::profile_template(name)?)
    }

    /// The names of the built-in profiles.
    pub fn profiles() -> &'static [&'static str] {
        crate::profiles()
    }

    /// The template the device was made from (and resets to).
    pub fn template(&self) -> &DeviceTemplate {
        &self.inner.template
    }

    /// Call and event counters.
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Failure injection.
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// The interrupt index currently enabled, if any ([`irq::INTX`],
    /// [`irq::MSI`] or [`irq::MSIX`]).
    pub fn active_irq(&self) -> Option<u32> {
        self.inner.lock().irq.active()
    }

    /// Whether INTx is masked (by the host after it fired, or by
    /// [`Vfio::mask_irq`]).
    pub fn intx_masked(&self) -> bool {
        self.inner.lock().irq.intx_masked()
    }

    /// Number of DMA mappings.
    pub fn dma_mapping_count(&self) -> usize {
        self.inner.lock().dma.len()
    }

    /// The device raises interrupt `vector` once (an edge: one MSI/MSI-X
    /// message, or one INTx assertion that is not held).
    pub fn raise_irq(&self, vector: u32) {
        let inner = &*self.inner;
        inner
            .lock()
            .irq
            .raise(vector, Trigger::Pulse, &inner.counters);
    }

    /// The device reads guest memory at `iova` through its DMA mappings.
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> std::result::Result<(), DmaFault> {
        let st = self.inner.lock();
        // SAFETY: `buf` is valid for its length; the mappings' memory is
        // live while we hold the lock (dma_map contract).
        unsafe { st.dma.read(iova, buf.as_mut_ptr(), buf.len() as u64) }
    }

    /// The device writes guest memory at `iova` through its DMA mappings.
    pub fn dma_write(&self, iova: u64, data: &[u8]) -> std::result::Result<(), DmaFault> {
        let st = self.inner.lock();
        // SAFETY: as in `dma_read`.
        unsafe { st.dma.write(iova, data.as_ptr(), data.len() as u64) }
    }

    fn enter(&self, op: Op) -> Result<&Inner> {
        let inner = &*self.inner;
        inner.counters.call(op);
        match inner.faults.check(op) {
            None => Ok(inner),
            Some(what) => Err(injected(op, what)),
        }
    }
}

impl Drop for FakeDevice {
    fn drop(&mut self) {
        if let Some(w) = self.inner.take_watcher() {
            w.stop();
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state unusable:
        // every update is a plain store.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take_watcher(&self) -> Option<Watcher> {
        self.watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    fn sync_command(&self, config: &[u8]) {
        let lo = config.get(4).copied().unwrap_or(0);
        let hi = config.get(5).copied().unwrap_or(0);
        self.command
            .store(u16::from_le_bytes([lo, hi]), Ordering::Relaxed);
    }

    /// BAR memory back to the template contents.
    fn restore_memory(&self) {
        for bar in self.bars.iter().flatten() {
            bar.zero();
        }
        for c in self.template.contents() {
            if let Some(Some(bar)) = self.bars.get(usize::from(c.bar)) {
                bar.write(c.offset, &c.bytes);
            }
        }
    }

    fn bar_access(
        &self,
        index: u32,
        offset: u64,
        read: Option<&mut [u8]>,
        write: &[u8],
    ) -> Result<()> {
        let len = read.as_ref().map_or(write.len(), |r| r.len());
        let Some(bar) = self.bars.get(index as usize).and_then(Option::as_ref) else {
            return Err(out_of_range(index, offset, len, 0));
        };
        let end = offset
            .checked_add(len as u64)
            .filter(|e| *e <= bar.spec.size)
            .ok_or_else(|| out_of_range(index, offset, len, bar.spec.size))?;
        if len == 0 {
            return Ok(());
        }
        if self.template.decode_check() {
            let bit = if bar.spec.kind == BarKind::Io { 1 } else { 2 };
            if self.command.load(Ordering::Relaxed) & bit == 0 {
                return Err(Error::Refused {
                    context: format!(
                        "access to BAR {index} while its decoding is disabled in the command register"
                    ),
                    errno: libc::EIO,
                });
            }
        }
        let block = bar
            .blocks
            .iter()
            .find(|b| b.offset < end && offset < b.offset.saturating_add(b.size));
        let Some(block) = block else {
            // Plain memory: no lock.
            match read {
                Some(out) => bar.read(offset, out),
                None => bar.write(offset, write),
            };
            return Ok(());
        };
        if offset < block.offset || end > block.offset.saturating_add(block.size) {
            return Err(Error::InvalidArgument(format!(
                "access {offset:#x}..{end:#x} of BAR {index} straddles the edge of {:?} registers at {:#x}",
                block.kind, block.offset
            )));
        }
        let mut guard = self.lock();
        let st = &mut *guard;
        let mut ctx = Ctx {
            bar,
            irq: &mut st.irq,
            dma: &st.dma,
            counters: &self.counters,
        };
        match read {
            Some(out) => regs::read(&mut ctx, block, offset, out),
            None => regs::write(&mut ctx, block, offset, write),
        }
        Ok(())
    }

    fn unmask_from_eventfd(&self) {
        let mut st = self.lock();
        st.irq.unmask_intx(&self.counters);
    }
}

fn watch_unmask(fd: OwnedFd, inner: Weak<Inner>, stop: Arc<AtomicBool>, wake: Arc<EventFd>) {
    while !stop.load(Ordering::Relaxed) {
        let mut pfds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two pollfds that live across the call; the count matches.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, WATCH_PERIOD_MS) };
        let [pfd, woken] = pfds;
        if woken.revents != 0 {
            return;
        }
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            continue;
        }
        if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return;
        }
        let mut v = 0u64;
        // SAFETY: reads at most 8 bytes into a live local u64.
        let r = unsafe {
            libc::read(
                fd.as_raw_fd(),
                std::ptr::from_mut(&mut v).cast::<libc::c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
        if r <= 0 {
            continue;
        }
        match inner.upgrade() {
            Some(i) => i.unmask_from_eventfd(),
            None => return,
        }
    }
}

impl Vfio for FakeDevice {
    fn device_info(&self) -> Result<DeviceInfo> {
        self.enter(Op::DeviceInfo)?;
        Ok(DeviceInfo {
            flags: device_flags::RESET | device_flags::PCI,
            num_regions: region::NUM_PCI_REGIONS,
            num_irqs: NUM_IRQS,
        })
    }

    fn region_info(&self, index: u32) -> Result<RegionInfo> {
        let inner = self.enter(Op::RegionInfo)?;
        let mut info = RegionInfo {
            index,
            ..RegionInfo::default()
        };
        match index {
            0..=5 => {
                if let Some(bar) = inner.bars.get(index as usize).and_then(Option::as_ref) {
                    info.size = bar.spec.size;
                    info.flags = region_flags::READ | region_flags::WRITE;
                    if bar.mmappable() {
                        info.flags |= region_flags::MMAP;
                        if bar.sparse {
                            info.flags |= region_flags::CAPS;
                            info.caps.push(RegionCap::SparseMmap(bar.areas.clone()));
                        }
                    }
                }
            }
            region::ROM => {
                if let Some(rom) = inner.template.rom() {
                    info.size = rom.len() as u64;
                    info.flags = region_flags::READ;
                }
            }
            region::CONFIG => {
                info.size = inner.template.config_size() as u64;
                info.flags = region_flags::READ | region_flags::WRITE;
            }
            region::VGA => {}
            _ => {
                return Err(Error::InvalidArgument(format!("region index {index}")));
            }
        }
        Ok(info)
    }

    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> Result<()> {
        let inner = self.enter(Op::RegionRead)?;
        let len = data.len();
        match index {
            0..=5 => inner.bar_access(index, offset, Some(data), &[])?,
            region::ROM => {
                let rom = inner.template.rom().unwrap_or(&[]);
                let src = usize::try_from(offset)
                    .ok()
                    .and_then(|o| rom.get(o..o.checked_add(len)?))
                    .ok_or_else(|| out_of_range(index, offset, len, rom.len() as u64))?;
                data.copy_from_slice(src);
            }
            region::CONFIG => {
                let st = inner.lock();
                let src = usize::try_from(offset)
                    .ok()
                    .and_then(|o| st.config.get(o..o.checked_add(len)?))
                    .ok_or_else(|| out_of_range(index, offset, len, st.config.len() as u64))?;
                data.copy_from_slice(src);
            }
            _ => return Err(out_of_range(index, offset, len, 0)),
        }
        inner.counters.read(len);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        let inner = self.enter(Op::RegionWrite)?;
        let len = data.len();
        match index {
            0..=5 => inner.bar_access(index, offset, None, data)?,
            region::CONFIG => {
                let mut st = inner.lock();
                let size = st.config.len();
                let off = usize::try_from(offset)
                    .ok()
                    .filter(|o| o.checked_add(len).is_some_and(|e| e <= size))
                    .ok_or_else(|| out_of_range(index, offset, len, size as u64))?;
                crate::config::write(&mut st.config, &inner.template, off, data);
                if off < 6 && off + len > 4 {
                    inner.sync_command(&st.config);
                }
                if initiates_flr(&st.config, off, data) {
                    // PCIe r6.0 6.6.2: the function resets; its registers read as at reset
                    // (Initiate FLR itself reads 0). The VMM's interrupt wiring stays, as the
                    // kernel's vfio-pci keeps it across an FLR the guest starts.
                    st.config.copy_from_slice(inner.template.config());
                    inner.sync_command(&st.config);
                    st.irq.function_reset();
                    inner.restore_memory();
                }
            }
            region::ROM => {
                return Err(Error::InvalidArgument("the ROM region is read-only".into()))
            }
            _ => return Err(out_of_range(index, offset, len, 0)),
        }
        inner.counters.written(len);
        Ok(())
    }

    fn mmap_region(&self, index: u32, area: SparseArea) -> Result<Mapping> {
        let inner = self.enter(Op::MmapRegion)?;
        let bar = inner
            .bars
            .get(index as usize)
            .and_then(Option::as_ref)
            .filter(|b| b.mmappable())
            .ok_or_else(|| Error::InvalidArgument(format!("region {index} cannot be mmapped")))?;
        let end = area.offset.checked_add(area.size);
        let inside = bar.areas.iter().any(|a| {
            area.offset >= a.offset && end.is_some_and(|e| e <= a.offset.saturating_add(a.size))
        });
        if area.size == 0 || (area.offset | area.size) % PAGE_SIZE != 0 || !inside {
            return Err(Error::InvalidArgument(format!(
                "mmap of {:#x} bytes at {:#x} of region {index}: not a page-aligned part of its mmap-able areas",
                area.size, area.offset
            )));
        }
        Mapping::map_fd(
            bar.fd(),
            area.offset,
            area.size,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    }

    fn irq_info(&self, index: u32) -> Result<IrqInfo> {
        let inner = self.enter(Op::IrqInfo)?;
        if index >= NUM_IRQS {
            return Err(Error::InvalidArgument(format!("interrupt index {index}")));
        }
        let count = inner.lock().irq.count(index);
        let flags = match index {
            irq::INTX => irq_flags::EVENTFD | irq_flags::MASKABLE | irq_flags::AUTOMASKED,
            irq::MSI => irq_flags::EVENTFD | irq_flags::NORESIZE,
            irq::MSIX => irq_flags::EVENTFD,
            _ => 0,
        };
        Ok(IrqInfo {
            index,
            flags: if count == 0 { 0 } else { flags },
            count,
        })
    }

    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> Result<()> {
        let inner = self.enter(Op::SetIrqEventfds)?;
        let mut st = inner.lock();
        st.irq.set_eventfds(index, start, fds, &inner.counters)
    }

    fn disable_irqs(&self, index: u32) -> Result<()> {
        let inner = self.enter(Op::DisableIrqs)?;
        inner.lock().irq.disable(index)?;
        if index == irq::INTX {
            if let Some(w) = inner.take_watcher() {
                w.stop();
            }
        }
        Ok(())
    }

    fn unmask_irq(&self, index: u32) -> Result<()> {
        let inner = self.enter(Op::UnmaskIrq)?;
        inner.lock().irq.unmask(index, &inner.counters)
    }

    fn mask_irq(&self, index: u32) -> Result<()> {
        let inner = self.enter(Op::MaskIrq)?;
        inner.lock().irq.mask(index)
    }

    fn set_irq_unmask_eventfd(&self, index: u32, fd: Option<BorrowedFd<'_>>) -> Result<()> {
        let inner = self.enter(Op::SetIrqUnmaskEventfd)?;
        inner.lock().irq.check_unmask_fd(index)?;
        let dup = fd
            .map(|f| f.try_clone_to_owned())
            .transpose()
            .map_err(|e| Error::io("dup of the INTx unmask eventfd", e))?;
        if let Some(old) = inner.take_watcher() {
            old.stop();
        }
        if let Some(fd) = dup {
            let stop = Arc::new(AtomicBool::new(false));
            let wake = Arc::new(
                EventFd::new(EFD_NONBLOCK)
                    .map_err(|e| Error::io("eventfd for the INTx unmask watcher", e))?,
            );
            let weak = Arc::downgrade(&self.inner);
            let (s, w) = (Arc::clone(&stop), Arc::clone(&wake));
            let handle = std::thread::Builder::new()
                .name("fake-intx-unmask".into())
                .spawn(move || watch_unmask(fd, weak, s, w))
                .map_err(|e| Error::io("spawning the INTx unmask watcher", e))?;
            *inner.watcher.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Watcher { stop, wake, handle });
        }
        Ok(())
    }

    fn reset(&self) -> Result<()> {
        let inner = self.enter(Op::Reset)?;
        if let Some(w) = inner.take_watcher() {
            w.stop();
        }
        let mut st = inner.lock();
        st.irq.reset();
        st.config.copy_from_slice(inner.template.config());
        inner.sync_command(&st.config);
        inner.restore_memory();
        Ok(())
    }

    fn dma_map(&self, iova: u64, size: u64, host: vfio_backend::DmaSource<'_>) -> Result<()> {
        let inner = self.enter(Op::DmaMap)?;
        let mut st = inner.lock();
        st.dma.map(
            iova,
            size,
            host.host_addr,
            host.read_only,
            inner.template.iova_ranges(),
        )
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        let inner = self.enter(Op::DmaUnmap)?;
        inner.lock().dma.unmap(iova, size)
    }

    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>> {
        let inner = self.enter(Op::IovaRanges)?;
        Ok(inner.template.iova_ranges().to_vec())
    }

    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        if self.inner.faults.is_dead() {
            return None;
        }
        let bar = self.inner.bars.get(index as usize)?.as_ref()?;
        bar.mmappable().then(|| (bar.fd(), 0))
    }
}

/// The longest the unmask watcher sleeps before it looks at its stop flag
/// (a stop also wakes it at once through its eventfd).
const WATCH_PERIOD_MS: i32 = 1000;

/// Whether a config write of `data` at `off` sets Initiate Function Level Reset (bit 15 of the
/// PCI Express Device Control register) of a function whose Device Capabilities say it is FLR
/// capable (bit 28). `config` is the config space after the write.
fn initiates_flr(config: &[u8], off: usize, data: &[u8]) -> bool {
    let byte = |o: usize| config.get(o).copied().unwrap_or(0);
    if byte(0x06) & 0x10 == 0 {
        return false;
    }
    // The capability list, bounded (48 entries fill 256 bytes).
    let mut at = usize::from(byte(0x34) & 0xfc);
    let mut pcie = None;
    for _ in 0..48 {
        if at < 0x40 {
            break;
        }
        if byte(at) == cap_id::PCIE {
            pcie = Some(at);
            break;
        }
        at = usize::from(byte(at + 1) & 0xfc);
    }
    let Some(cap) = pcie else {
        return false;
    };
    let flr_capable = byte(cap + 7) & 0x10 != 0;
    // The high byte of Device Control holds Initiate FLR as its bit 7.
    let written = (cap + 9)
        .checked_sub(off)
        .and_then(|i| data.get(i))
        .is_some_and(|b| b & 0x80 != 0);
    flr_capable && written
}
