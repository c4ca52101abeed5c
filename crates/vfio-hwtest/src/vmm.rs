//! The test as a VMM and as a guest at once.
//!
//! VMM side: [`Vm::attach`] opens a function through the kernel backend
//! (`vfio_backend::kernel::KernelDevice`), builds a `vfio_pci::VfioPciDevice` on it with a
//! recording guest mapper, a BAR allocator and the instrumented interrupt manager of
//! `pci_interrupts::testing`, and (optionally) registers a small guest RAM for DMA with a
//! `vfio_pci::GuestDma`, which maps it into the device's IOMMU domain as the device attaches.
//! [`Vm::attach_kernel`] attaches an already opened device with a given `GuestDma`: devices
//! of one container or IOAS share it, as a VMM's do.
//!
//! Guest side: the helpers below only use what a guest driver has: config space through
//! `read_config` / `write_config` (walking capabilities, programming MSI and MSI-X as a guest
//! would), BAR registers through `read_bar` / `write_bar`, guest RAM at guest physical
//! addresses, and interrupts as signals on the eventfds the VMM routed.

use anyhow::{bail, ensure, Context, Result};
use pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use pci_config::cap_id;
use pci_interrupts::testing::{TestInterruptGroup, TestInterruptManager};
use pci_interrupts::InterruptSourceGroup;
use std::collections::BTreeMap;
use std::fs;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vfio_backend::kernel::KernelDevice;
use vfio_backend::Vfio;
use vfio_pci::{
    BarIndex, BarRange, ConfigWriteOutcome, DeviceOptions, DeviceResources, DmaMode, GuestDma,
    GuestMapper, MappingId, VfioPciDevice,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::device::Device;

/// Guest physical address of the test's guest RAM (and so its IOVA: no vIOMMU in our VMM).
/// Below 256 MiB because QEMU's edu masks DMA addresses to 28 bits.
pub const RAM_BASE: u64 = 0x10_0000;
/// Size of the test's guest RAM.
pub const RAM_SIZE: usize = 2 << 20;
/// The VMM's 32-bit MMIO window for BARs.
const MMIO32: AddressWindow = AddressWindow::new(0xC000_0000, 0x2000_0000);
/// The VMM's 64-bit MMIO window for BARs.
const MMIO64: AddressWindow = AddressWindow::new(0x10_0000_0000, 0x10_0000_0000);
/// The VMM's I/O port window.
const IO: AddressWindow = AddressWindow::new(0xC000, 0x4000);

/// [`RAM_SIZE`] bytes of guest RAM at [`RAM_BASE`].
pub fn guest_ram() -> Result<GuestMemoryMmap> {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_BASE), RAM_SIZE)]).context("guest RAM")
}

/// An x86 MSI address (local APIC 0), as a guest would program it.
pub const MSI_ADDRESS: u64 = 0xFEE0_0000;

/// PCI command register bits (PCI Local Bus 3.0, 6.2.2).
pub const CMD_MEMORY: u16 = 1 << 1;
/// Bus master enable.
pub const CMD_BUS_MASTER: u16 = 1 << 2;
/// Interrupt disable (INTx).
pub const CMD_INTX_DISABLE: u16 = 1 << 10;

/// A [`GuestMapper`] that accepts every mapping and remembers the live ones, so a test can see
/// that BARs were mapped at their placement and that everything was unmapped on unplug.
#[derive(Debug, Default)]
pub struct RecordingMapper {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, (u64, u64)>>,
}

impl RecordingMapper {
    /// The live mappings as (guest address, size).
    pub fn live(&self) -> Vec<(u64, u64)> {
        self.live
            .lock()
            .map(|m| m.values().copied().collect())
            .unwrap_or_default()
    }
}

impl GuestMapper for RecordingMapper {
    /// Records the mapping; `host` is never dereferenced.
    ///
    /// # Safety
    /// As [`GuestMapper::map`]; this mapper never touches `host`.
    unsafe fn map(
        &self,
        gpa: u64,
        size: u64,
        host: *mut u8,
        _ro: bool,
    ) -> std::io::Result<MappingId> {
        if host.is_null() {
            return Err(std::io::Error::other("null host address"));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.live
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .insert(id, (gpa, size));
        Ok(MappingId(id))
    }

    fn unmap(&self, id: MappingId) -> std::io::Result<()> {
        match self
            .live
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .remove(&id.0)
        {
            Some(_) => Ok(()),
            None => Err(std::io::Error::other(format!("unknown mapping {}", id.0))),
        }
    }
}

/// Where the guest found the MSI-X table and PBA (from the capability, as a guest reads it).
#[derive(Clone, Copy, Debug)]
pub struct MsixInfo {
    /// Config offset of the capability.
    pub cap: u64,
    /// Table size (number of vectors).
    pub size: u32,
    /// BAR and offset of the table.
    pub table: (usize, u64),
    /// BAR and offset of the PBA.
    pub pba: (usize, u64),
}

/// One attached function: the VMM's objects and the guest's view.
///
/// Fields drop in order: the device first (interrupts off, BARs unmapped and released, detached
/// from its IOMMU domain: the domain's last device unmaps guest RAM), then guest RAM, then the
/// kernel device.
pub struct Vm {
    /// The device as our stack presents it.
    pub dev: VfioPciDevice,
    /// Guest RAM, registered for DMA at [`RAM_BASE`] (when asked for).
    pub ram: Option<GuestMemoryMmap>,
    /// Guest RAM for DMA and the live IOMMU domains (shared by the devices of one domain).
    pub dma: Arc<GuestDma>,
    /// The kernel backend under the device.
    pub kernel: Arc<KernelDevice>,
    /// The interrupt manager the device made its groups with.
    pub irqs: Arc<TestInterruptManager>,
    /// The guest mapper.
    pub mapper: Arc<RecordingMapper>,
    /// The BAR allocator.
    pub allocator: Arc<Mutex<BarAllocator>>,
    /// The function's address.
    pub bdf: String,
}

/// Where each BAR decodes, as [`VfioPciDevice::bars`] says.
fn decoded_bars(dev: &VfioPciDevice) -> BTreeMap<BarIndex, BarRange> {
    dev.bars()
        .into_iter()
        .filter(|b| b.decoding)
        .filter_map(|b| {
            b.base.map(|base| {
                let size = b.guest_size;
                (b.index, BarRange { base, size })
            })
        })
        .collect()
}

/// Applies a config-write outcome to `bus` (where each BAR decoded before the write), and
/// checks the result against where `dev` says each BAR decodes now.
fn follow(
    bus: &mut BTreeMap<BarIndex, BarRange>,
    outcome: &ConfigWriteOutcome,
    dev: &VfioPciDevice,
) -> Result<()> {
    for c in outcome.bar_changes() {
        ensure!(
            bus.get(&c.bar).copied() == c.removed(),
            "{}: the outcome removes {:x?}, the bus had {:x?}",
            c.bar,
            c.removed(),
            bus.get(&c.bar)
        );
        match c.added() {
            Some(r) => bus.insert(c.bar, r),
            None => bus.remove(&c.bar),
        };
    }
    let truth = decoded_bars(dev);
    ensure!(
        *bus == truth,
        "the bus built from the write's outcome {bus:x?} differs from bars() {truth:x?}"
    );
    Ok(())
}

/// The BAR at slot `n` (0..=5, 6 the ROM), as VFIO numbers the regions.
pub fn bar_index(n: usize) -> BarIndex {
    BarIndex::from_slot(n).unwrap_or(BarIndex::Bar(n as u8))
}

impl Vm {
    /// Attaches `device` through the kernel backend and `VfioPciDevice`; with `ram`, also
    /// registers [`RAM_SIZE`] bytes of guest RAM at [`RAM_BASE`] for DMA (mapped into the
    /// device's IOMMU domain as it attaches).
    pub fn attach(device: &Device, ram: bool) -> Result<Vm> {
        let mode = crate::mode::current();
        if ram {
            // No-IOMMU mode cannot map guest RAM: a scenario that needs it is skipped.
            crate::mode::require_dma(mode)?;
        }
        let kernel = Arc::new(crate::mode::open_kernel(mode, &device.sysfs)?);
        let dma = GuestDma::new();
        let ram = if ram {
            let mem = guest_ram()?;
            let n = dma.add_memory(&mem).context("registering guest RAM")?;
            ensure!(n == 1, "add_memory registered {n} regions, expected 1");
            Some(mem)
        } else {
            None
        };
        Self::attach_kernel(kernel, &device.bdf, dma, ram, DmaMode::GuestPhysical)
    }

    /// Attaches an opened kernel device with `dma` (RAM registered there is mapped into the
    /// device's domain when it is the domain's first device) in DMA `mode`; `ram` is the
    /// guest RAM the guest side of the test reads and writes.
    pub fn attach_kernel(
        kernel: Arc<KernelDevice>,
        bdf: &str,
        dma: Arc<GuestDma>,
        ram: Option<GuestMemoryMmap>,
        mode: DmaMode,
    ) -> Result<Vm> {
        let irqs = Arc::new(TestInterruptManager::new());
        let mapper = Arc::new(RecordingMapper::default());
        let allocator = Arc::new(Mutex::new(
            BarAllocator::new(BarWindows::new(MMIO32).with_mmio64(MMIO64).with_io(IO))
                .context("BAR allocator")?,
        ));
        let vfio: Arc<dyn Vfio> = kernel.clone();
        let dev = VfioPciDevice::new(
            vfio,
            DeviceResources {
                interrupts: irqs.clone(),
                mapper: mapper.clone(),
                allocator: allocator.clone(),
                dma: dma.clone(),
            },
            DeviceOptions::default().with_dma_mode(mode),
        )
        .context("VfioPciDevice::new")?;
        Ok(Vm {
            dev,
            ram,
            dma,
            kernel,
            irqs,
            mapper,
            allocator,
            bdf: bdf.to_string(),
        })
    }

    // ---- config space, as the guest sees it ----

    /// Reads 1, 2 or 4 bytes of config space.
    pub fn cfg_read(&self, offset: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        let len = len.min(4);
        self.dev.read_config(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    /// Writes the low `len` (1, 2 or 4) bytes of `value` to config space.
    /// A VMM's bus follows the write's outcome (as a VMM that registers BAR ranges does):
    /// the ranges where BARs decoded before the write, changed as the outcome says, must be
    /// where the device says they decode after it.
    pub fn cfg_write(&self, offset: u64, len: usize, value: u32) -> Result<()> {
        let b = value.to_le_bytes();
        let mut bus = decoded_bars(&self.dev);
        let outcome = self
            .dev
            .write_config(offset, &b[..len.min(4)])
            .with_context(|| format!("config write of {value:#x} at {offset:#x}"))?;
        follow(&mut bus, &outcome, &self.dev)
            .with_context(|| format!("after the config write of {value:#x} at {offset:#x}"))
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.cfg_read(0x04, 2) as u16
    }

    /// Sets bits in the command register (read-modify-write, as a guest does).
    pub fn command_set(&self, bits: u16) -> Result<()> {
        let c = self.command();
        self.cfg_write(0x04, 2, u32::from(c | bits))
    }

    /// Clears bits in the command register.
    pub fn command_clear(&self, bits: u16) -> Result<()> {
        let c = self.command();
        self.cfg_write(0x04, 2, u32::from(c & !bits))
    }

    /// Turns on memory decoding and bus mastering, which DMA and MSI need.
    pub fn enable_memory_and_bus_master(&self) -> Result<()> {
        self.command_set(CMD_MEMORY | CMD_BUS_MASTER)?;
        let c = self.command();
        ensure!(
            c & (CMD_MEMORY | CMD_BUS_MASTER) == CMD_MEMORY | CMD_BUS_MASTER,
            "command register reads {c:#06x} after enabling memory and bus master"
        );
        Ok(())
    }

    /// Walks the standard capability list from 0x34 as a guest does: (id, offset) in chain
    /// order. An error if the chain points into the header or does not end.
    pub fn capabilities(&self) -> Result<Vec<(u8, u8)>> {
        let status = self.cfg_read(0x06, 2);
        if status & 0x10 == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut ptr = (self.cfg_read(0x34, 1) & 0xfc) as u8;
        // 48 capabilities of 4 bytes fill the 192 bytes after the header.
        for _ in 0..48 {
            if ptr == 0 {
                return Ok(out);
            }
            ensure!(
                ptr >= 0x40,
                "capability pointer {ptr:#x} points into the header"
            );
            let id = self.cfg_read(u64::from(ptr), 1) as u8;
            out.push((id, ptr));
            ptr = (self.cfg_read(u64::from(ptr) + 1, 1) & 0xfc) as u8;
        }
        bail!("capability chain does not end after 48 entries: {out:x?}")
    }

    /// Walks the extended capability list from 0x100: (id, offset) in chain order, leaving out
    /// null (id 0) headers that only link onwards.
    pub fn ext_capabilities(&self) -> Result<Vec<(u16, u16)>> {
        if self.dev.config_size() <= 0x100 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut off: u16 = 0x100;
        // (4096 - 256) / 4 headers at most.
        for _ in 0..960 {
            let hdr = self.cfg_read(u64::from(off), 4);
            if hdr == 0 || hdr == u32::MAX {
                return Ok(out);
            }
            let id = (hdr & 0xffff) as u16;
            if id != 0 {
                out.push((id, off));
            }
            let next = ((hdr >> 20) & 0xffc) as u16;
            if next == 0 {
                return Ok(out);
            }
            ensure!(
                next >= 0x100,
                "extended capability at {off:#x} points to {next:#x}, inside standard space"
            );
            off = next;
        }
        bail!("extended capability chain does not end: {out:x?}")
    }

    /// The offset of the first standard capability with this id.
    pub fn find_cap(&self, id: u8) -> Result<Option<u64>> {
        Ok(self
            .capabilities()?
            .into_iter()
            .find(|c| c.0 == id)
            .map(|c| u64::from(c.1)))
    }

    // ---- BARs ----

    /// Reads a 32-bit register at `offset` of BAR `bar`.
    pub fn bar_read32(&self, bar: usize, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read_bar(bar_index(bar), offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn bar_write32(&self, bar: usize, offset: u64, value: u32) -> Result<()> {
        self.dev
            .write_bar(bar_index(bar), offset, &value.to_le_bytes())
            .with_context(|| format!("BAR{bar} write of {value:#x} at {offset:#x}"))
    }

    /// Reads a 64-bit register with one 8-byte access.
    pub fn bar_read64(&self, bar: usize, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dev.read_bar(bar_index(bar), offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// Writes a 64-bit register with one 8-byte access.
    pub fn bar_write64(&self, bar: usize, offset: u64, value: u64) -> Result<()> {
        self.dev
            .write_bar(bar_index(bar), offset, &value.to_le_bytes())
            .with_context(|| format!("BAR{bar} write of {value:#x} at {offset:#x}"))
    }

    // ---- guest RAM ----

    fn ram(&self) -> Result<&GuestMemoryMmap> {
        self.ram.as_ref().context("attached without guest RAM")
    }

    /// Writes guest RAM at guest physical address `gpa`.
    pub fn ram_write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.ram()?
            .write_slice(data, GuestAddress(gpa))
            .with_context(|| format!("guest RAM write at {gpa:#x}"))
    }

    /// Reads guest RAM at guest physical address `gpa`.
    pub fn ram_read(&self, gpa: u64, data: &mut [u8]) -> Result<()> {
        self.ram()?
            .read_slice(data, GuestAddress(gpa))
            .with_context(|| format!("guest RAM read at {gpa:#x}"))
    }

    // ---- MSI and MSI-X, programmed as a guest does ----

    /// Programs the MSI capability with one vector (`address` = [`MSI_ADDRESS`], `data`) and
    /// enables it. Returns the capability offset.
    pub fn msi_enable(&self, data: u16) -> Result<u64> {
        let cap = self.find_cap(cap_id::MSI)?.context("no MSI capability")?;
        let ctl = self.cfg_read(cap + 2, 2);
        let is64 = ctl & 0x80 != 0;
        self.cfg_write(cap + 4, 4, MSI_ADDRESS as u32)?;
        let data_off = if is64 {
            self.cfg_write(cap + 8, 4, 0)?;
            cap + 12
        } else {
            cap + 8
        };
        self.cfg_write(data_off, 2, u32::from(data))?;
        // Multiple Message Enable = 0 (one vector), MSI Enable.
        self.cfg_write(cap + 2, 2, (ctl & !0x70) | 1)?;
        Ok(cap)
    }

    /// Clears MSI Enable.
    pub fn msi_disable(&self) -> Result<()> {
        let cap = self.find_cap(cap_id::MSI)?.context("no MSI capability")?;
        let ctl = self.cfg_read(cap + 2, 2);
        self.cfg_write(cap + 2, 2, ctl & !1)
    }

    /// Where the MSI-X table and PBA are, read from the capability as a guest does.
    pub fn msix_info(&self) -> Result<Option<MsixInfo>> {
        let Some(cap) = self.find_cap(cap_id::MSIX)? else {
            return Ok(None);
        };
        let ctl = self.cfg_read(cap + 2, 2);
        let table = self.cfg_read(cap + 4, 4);
        let pba = self.cfg_read(cap + 8, 4);
        Ok(Some(MsixInfo {
            cap,
            size: (ctl & 0x7ff) + 1,
            table: ((table & 7) as usize, u64::from(table & !7)),
            pba: ((pba & 7) as usize, u64::from(pba & !7)),
        }))
    }

    /// Programs MSI-X table entries `0..vectors` (address [`MSI_ADDRESS`], data `0x40 + v`,
    /// unmasked) through the BAR, then sets MSI-X Enable with the function unmasked.
    pub fn msix_enable(&self, vectors: u32) -> Result<MsixInfo> {
        let info = self.msix_info()?.context("no MSI-X capability")?;
        ensure!(
            vectors <= info.size,
            "asked for {vectors} MSI-X vectors, the table has {}",
            info.size
        );
        let (bar, base) = info.table;
        for v in 0..vectors {
            let e = base + 16 * u64::from(v);
            self.bar_write32(bar, e, MSI_ADDRESS as u32)?;
            self.bar_write32(bar, e + 4, 0)?;
            self.bar_write32(bar, e + 8, 0x40 + v)?;
            self.bar_write32(bar, e + 12, 0)?;
            let ctl = self.bar_read32(bar, e + 12);
            ensure!(
                ctl & 1 == 0,
                "MSI-X entry {v} vector control reads {ctl:#x} after unmasking"
            );
        }
        let ctl = self.cfg_read(info.cap + 2, 2);
        self.cfg_write(info.cap + 2, 2, (ctl | 0x8000) & !0x4000)?;
        Ok(info)
    }

    /// Clears MSI-X Enable.
    pub fn msix_disable(&self) -> Result<()> {
        let info = self.msix_info()?.context("no MSI-X capability")?;
        let ctl = self.cfg_read(info.cap + 2, 2);
        self.cfg_write(info.cap + 2, 2, ctl & !0x8000)
    }

    // ---- interrupts, as the VMM receives them ----

    /// The instrumented group behind one of the device's groups.
    pub fn test_group(&self, g: &Arc<dyn InterruptSourceGroup>) -> Option<Arc<TestInterruptGroup>> {
        let want = Arc::as_ptr(g) as *const ();
        self.irqs
            .groups()
            .into_iter()
            .find(|t| Arc::as_ptr(t) as *const () == want)
    }
}

/// Waits up to `timeout` for `fd` to become readable.
fn poll_in(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    loop {
        // SAFETY: `pfd` is one valid pollfd, alive for the call; the fd is borrowed (open).
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll on an interrupt eventfd");
        }
        return Ok(r > 0 && pfd.revents & libc::POLLIN != 0);
    }
}

/// Reads an eventfd's counter without blocking (0 when it was not signalled).
pub fn read_eventfd(fd: BorrowedFd<'_>) -> Result<u64> {
    let mut v = [0u8; 8];
    // SAFETY: reads at most 8 bytes into `v`, which is 8 bytes long and alive for the call.
    let r = unsafe { libc::read(fd.as_raw_fd(), v.as_mut_ptr().cast(), v.len()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(0);
        }
        return Err(e).context("read of an interrupt eventfd");
    }
    ensure!(r == 8, "short eventfd read of {r} bytes");
    Ok(u64::from_ne_bytes(v))
}

/// Adds 1 to an eventfd's counter (as the VMM does with a resample eventfd).
pub fn signal_eventfd(fd: BorrowedFd<'_>) -> Result<()> {
    let v = 1u64.to_ne_bytes();
    // SAFETY: writes the 8 bytes of `v`, alive for the call.
    let r = unsafe { libc::write(fd.as_raw_fd(), v.as_ptr().cast(), v.len()) };
    if r != 8 {
        return Err(std::io::Error::last_os_error()).context("write of an eventfd");
    }
    Ok(())
}

/// Consumes signals already latched on `vector` of `group`.
pub fn drain(group: &dyn InterruptSourceGroup, vector: u32) -> Result<u64> {
    let fd = group
        .notifier(vector)
        .with_context(|| format!("no notifier for vector {vector}"))?;
    read_eventfd(fd)
}

/// Waits up to `timeout` for `vector` of `group` to be signalled; returns how many signals
/// were latched (0 on timeout).
pub fn wait_irq(group: &dyn InterruptSourceGroup, vector: u32, timeout: Duration) -> Result<u64> {
    let fd = group
        .notifier(vector)
        .with_context(|| format!("no notifier for vector {vector}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !poll_in(fd, left)? {
            return Ok(0);
        }
        let n = read_eventfd(fd)?;
        if n > 0 || left.is_zero() {
            return Ok(n);
        }
    }
}

/// Polls `cond` every millisecond or so until it holds or `timeout` passes.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// How many interrupts of each kind the kernel's vfio-pci has requested for `bdf`, from
/// `/proc/interrupts` (vfio-pci names them `vfio-intx(BDF)`, `vfio-msi[N](BDF)` and
/// `vfio-msix[N](BDF)`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelIrqs {
    /// INTx handlers.
    pub intx: usize,
    /// MSI vectors.
    pub msi: usize,
    /// MSI-X vectors.
    pub msix: usize,
}

impl std::fmt::Display for KernelIrqs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "intx {} msi {} msix {}", self.intx, self.msi, self.msix)
    }
}

/// Counts the vfio-pci interrupt handlers of `bdf` in `/proc/interrupts`.
pub fn kernel_irqs(bdf: &str) -> Result<KernelIrqs> {
    let text = fs::read_to_string("/proc/interrupts").context("read /proc/interrupts")?;
    Ok(count_kernel_irqs(&text, bdf))
}

fn count_kernel_irqs(text: &str, bdf: &str) -> KernelIrqs {
    let mut k = KernelIrqs::default();
    let intx = format!("vfio-intx({bdf})");
    let tail = format!("]({bdf})");
    for line in text.lines() {
        // Handlers sharing a line are listed as `a, b`.
        for word in line.split_whitespace().map(|w| w.trim_end_matches(',')) {
            if word == intx {
                k.intx += 1;
            } else if word.ends_with(&tail) {
                if word.starts_with("vfio-msix[") {
                    k.msix += 1;
                } else if word.starts_with("vfio-msi[") {
                    k.msi += 1;
                }
            }
        }
    }
    k
}

/// Open file descriptors and memory mappings of this process.
pub fn process_resources() -> Result<(usize, usize)> {
    let fds = fs::read_dir("/proc/self/fd")
        .context("list /proc/self/fd")?
        .count();
    let maps = fs::read_to_string("/proc/self/maps")
        .context("read /proc/self/maps")?
        .lines()
        .count();
    Ok((fds, maps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_irq_names_are_counted_per_function_and_kind() {
        let text = "\
           CPU0       CPU1
 24:          3          0  IR-IO-APIC   11-fasteoi   vfio-intx(0000:00:01.0)
 25:          0          1  IR-PCI-MSI-0000:00:02.0    0-edge      vfio-msix[0](0000:00:02.0)
 26:          0          0  IR-PCI-MSI-0000:00:02.0    1-edge      vfio-msix[1](0000:00:02.0)
 27:          0          0  IR-PCI-MSI-0000:00:01.0    0-edge      vfio-msi[0](0000:00:01.0)
 28:          0          0  IR-PCI-MSI-0000:00:03.0    0-edge      vfio-msi[0](0000:00:03.0)
 29:          0          0  IR-IO-APIC   10-fasteoi   vfio-intx(0000:00:02.0), ahci[0000:00:1f.2]
";
        let a = count_kernel_irqs(text, "0000:00:01.0");
        assert_eq!(
            a,
            KernelIrqs {
                intx: 1,
                msi: 1,
                msix: 0
            }
        );
        let b = count_kernel_irqs(text, "0000:00:02.0");
        assert_eq!(
            b,
            KernelIrqs {
                intx: 1,
                msi: 0,
                msix: 2
            }
        );
    }

    #[test]
    fn recording_mapper_forgets_unmapped_ranges_and_refuses_unknown_ids() {
        let m = RecordingMapper::default();
        let mut x = 0u8;
        // SAFETY: the recording mapper never dereferences the address.
        let id = unsafe { m.map(0x1000, 0x2000, &mut x, false) }.unwrap();
        assert_eq!(m.live(), vec![(0x1000, 0x2000)]);
        m.unmap(id).unwrap();
        assert!(m.live().is_empty());
        let e = m.unmap(id).unwrap_err();
        assert!(e.to_string().contains("unknown mapping"), "{e}");
    }
}
