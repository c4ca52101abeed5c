//! What the tests play: a VMM (interrupt manager, guest mapper, BAR windows)
//! and a guest driver (config space walks, BAR sizing).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use pci_interrupts::testing::{TestInterruptGroup, TestInterruptManager};
use vfio_backend::Vfio;
use vfio_fake_device::FakeDevice;
use vfio_pci::{
    BarIndex, DeviceOptions, DeviceResources, GuestDma, GuestMapper, MappingId, VfioPciDevice,
};

pub const MMIO32_BASE: u64 = 0xc000_0000;
pub const MMIO32_SIZE: u64 = 0x2000_0000;
pub const MMIO64_BASE: u64 = 0x100_0000_0000;
pub const MMIO64_SIZE: u64 = 0x100_0000_0000;

/// A guest mapper that keeps every live mapping, like a VMM's memory slots.
#[derive(Default)]
pub struct RecordingMapper {
    next: AtomicU64,
    pub live: Mutex<BTreeMap<u64, (u64, u64, usize, bool)>>,
    pub maps: AtomicU64,
    pub unmaps: AtomicU64,
}

impl RecordingMapper {
    pub fn live(&self) -> Vec<(u64, u64)> {
        self.live
            .lock()
            .unwrap()
            .values()
            .map(|&(gpa, size, _, _)| (gpa, size))
            .collect()
    }

    /// The host pointer behind a guest address, if mapped.
    pub fn host_at(&self, gpa: u64) -> Option<*mut u8> {
        self.live
            .lock()
            .unwrap()
            .values()
            .find(|&&(g, s, _, _)| gpa >= g && gpa < g + s)
            .map(|&(g, _, h, _)| (h + (gpa - g) as usize) as *mut u8)
    }
}

impl GuestMapper for RecordingMapper {
    unsafe fn map(
        &self,
        gpa: u64,
        size: u64,
        host: *mut u8,
        ro: bool,
    ) -> std::io::Result<MappingId> {
        let mut live = self.live.lock().unwrap();
        if live
            .values()
            .any(|&(g, s, _, _)| gpa < g + s && g < gpa + size)
        {
            return Err(std::io::Error::from_raw_os_error(libc::EEXIST));
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        live.insert(id, (gpa, size, host as usize, ro));
        self.maps.fetch_add(1, Ordering::Relaxed);
        Ok(MappingId(id))
    }

    fn unmap(&self, id: MappingId) -> std::io::Result<()> {
        self.unmaps.fetch_add(1, Ordering::Relaxed);
        self.live
            .lock()
            .unwrap()
            .remove(&id.0)
            .map(|_| ())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOENT))
    }
}

/// The VMM side of a test.
pub struct Vm {
    pub irqs: Arc<TestInterruptManager>,
    pub mapper: Arc<RecordingMapper>,
    pub alloc: Arc<Mutex<BarAllocator>>,
    pub dma: Arc<GuestDma>,
}

impl Vm {
    pub fn new() -> Self {
        Self::with_page_size(4096)
    }

    pub fn with_page_size(page: u64) -> Self {
        let windows = BarWindows::new(AddressWindow::new(MMIO32_BASE, MMIO32_SIZE))
            .with_mmio64(AddressWindow::new(MMIO64_BASE, MMIO64_SIZE))
            .with_io(AddressWindow::new(0x1000, 0x1000));
        Vm {
            irqs: Arc::new(TestInterruptManager::new()),
            mapper: Arc::new(RecordingMapper::default()),
            alloc: Arc::new(Mutex::new(
                BarAllocator::with_page_size(windows, page).unwrap(),
            )),
            dma: GuestDma::new(),
        }
    }

    pub fn resources(&self) -> DeviceResources {
        DeviceResources {
            interrupts: self.irqs.clone(),
            mapper: self.mapper.clone(),
            allocator: self.alloc.clone(),
            dma: self.dma.clone(),
        }
    }
}

impl Default for Vm {
    fn default() -> Self {
        Self::new()
    }
}

/// The fake device behind a profile name, as a shared `Vfio`.
pub fn fake(profile: &str) -> Arc<FakeDevice> {
    Arc::new(FakeDevice::profile(profile).unwrap())
}

pub fn attach(vm: &Vm, fake: &Arc<FakeDevice>) -> VfioPciDevice {
    attach_with(vm, fake, DeviceOptions::default())
}

pub fn attach_with(vm: &Vm, fake: &Arc<FakeDevice>, opts: DeviceOptions) -> VfioPciDevice {
    let vfio: Arc<dyn Vfio> = fake.clone();
    VfioPciDevice::new(vfio, vm.resources(), opts).unwrap()
}

/// The interrupt group with `count` vectors the device created.
pub fn group_with(vm: &Vm, count: u32) -> Arc<TestInterruptGroup> {
    use pci_interrupts::InterruptSourceGroup;
    vm.irqs
        .groups()
        .into_iter()
        .rev()
        .find(|g| g.len() == count)
        .expect("no group of that size")
}

pub fn cfg_read32(dev: &VfioPciDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_config(off, &mut b);
    u32::from_le_bytes(b)
}

pub fn cfg_read16(dev: &VfioPciDevice, off: u64) -> u16 {
    let mut b = [0u8; 2];
    dev.read_config(off, &mut b);
    u16::from_le_bytes(b)
}

pub fn cfg_read8(dev: &VfioPciDevice, off: u64) -> u8 {
    let mut b = [0u8; 1];
    dev.read_config(off, &mut b);
    b[0]
}

pub fn cfg_write32(dev: &VfioPciDevice, off: u64, v: u32) {
    dev.write_config(off, &v.to_le_bytes()).unwrap();
}

pub fn cfg_write16(dev: &VfioPciDevice, off: u64, v: u16) {
    dev.write_config(off, &v.to_le_bytes()).unwrap();
}

/// Sizes BAR `i` as a guest does: save, write all ones, read, restore.
/// Returns (size, low flag bits); for a 64-bit BAR both halves are sized.
pub fn size_bar(dev: &VfioPciDevice, i: u64) -> (u64, u32) {
    let reg = 0x10 + 4 * i;
    let orig = cfg_read32(dev, reg);
    cfg_write32(dev, reg, 0xffff_ffff);
    let lo = cfg_read32(dev, reg);
    cfg_write32(dev, reg, orig);
    if lo == 0 {
        return (0, 0);
    }
    if lo & 1 == 1 {
        let mask = lo & !0x3;
        return ((!mask).wrapping_add(1) as u64 & 0xffff_ffff, lo & 0x3);
    }
    let flags = lo & 0xf;
    if (lo >> 1) & 3 == 2 {
        let orig_hi = cfg_read32(dev, reg + 4);
        cfg_write32(dev, reg + 4, 0xffff_ffff);
        let hi = cfg_read32(dev, reg + 4);
        cfg_write32(dev, reg + 4, orig_hi);
        let mask = ((hi as u64) << 32) | (lo & !0xf) as u64;
        ((!mask).wrapping_add(1), flags)
    } else {
        let mask = lo & !0xf;
        (((!mask).wrapping_add(1)) as u64, flags)
    }
}

/// The BAR's programmed address as the guest reads it.
pub fn bar_address(dev: &VfioPciDevice, i: u64) -> u64 {
    let reg = 0x10 + 4 * i;
    let lo = cfg_read32(dev, reg);
    if lo & 1 == 1 {
        return (lo & !0x3) as u64;
    }
    if (lo >> 1) & 3 == 2 {
        ((cfg_read32(dev, reg + 4) as u64) << 32) | (lo & !0xf) as u64
    } else {
        (lo & !0xf) as u64
    }
}

/// The standard capability chain as the guest walks it (bounded like Linux: 48).
pub fn walk_caps(dev: &VfioPciDevice) -> Vec<(u8, u64)> {
    let mut out = Vec::new();
    if cfg_read16(dev, 0x06) & 0x10 == 0 {
        return out;
    }
    let mut ptr = (cfg_read8(dev, 0x34) & 0xfc) as u64;
    let mut ttl = 48;
    while ptr >= 0x40 && ttl > 0 {
        let id = cfg_read8(dev, ptr);
        out.push((id, ptr));
        ptr = (cfg_read8(dev, ptr + 1) & 0xfc) as u64;
        ttl -= 1;
    }
    out
}

/// The extended capability chain as the guest walks it (id 0 skipped, as Linux does).
pub fn walk_ext_caps(dev: &VfioPciDevice) -> Vec<(u16, u64)> {
    let mut out = Vec::new();
    let mut ptr = 0x100u64;
    let mut ttl = (4096 - 0x100) / 8;
    while ptr >= 0x100 && ttl > 0 {
        let hdr = cfg_read32(dev, ptr);
        if hdr == 0 || hdr == 0xffff_ffff {
            break;
        }
        let id = (hdr & 0xffff) as u16;
        if id != 0 {
            out.push((id, ptr));
        }
        ptr = ((hdr >> 20) & 0xffc) as u64;
        ttl -= 1;
    }
    out
}

/// Enables memory decoding and bus mastering, as a driver does.
pub fn enable_device(dev: &VfioPciDevice) {
    let cmd = cfg_read16(dev, 0x04);
    cfg_write16(dev, 0x04, cmd | 0x6);
}

/// The BAR at slot `n` (0..=5 BARs, 6 the ROM); past that, a BAR number that names no BAR.
pub fn bar_index(n: usize) -> BarIndex {
    BarIndex::from_slot(n).unwrap_or(BarIndex::Bar(n as u8))
}

pub fn bar_read32(dev: &VfioPciDevice, bar: usize, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read_bar(bar_index(bar), off, &mut b);
    u32::from_le_bytes(b)
}

pub fn bar_write32(dev: &VfioPciDevice, bar: usize, off: u64, v: u32) {
    dev.write_bar(bar_index(bar), off, &v.to_le_bytes())
        .unwrap();
}

pub fn bar_write64(dev: &VfioPciDevice, bar: usize, off: u64, v: u64) {
    dev.write_bar(bar_index(bar), off, &v.to_le_bytes())
        .unwrap();
}

/// Programs MSI-X entry `v` (address, data, unmasked) through the table in `bar` at `table`.
pub fn program_msix_entry(
    dev: &VfioPciDevice,
    bar: usize,
    table: u64,
    v: u64,
    addr: u64,
    data: u32,
) {
    let e = table + 16 * v;
    bar_write32(dev, bar, e, addr as u32);
    bar_write32(dev, bar, e + 4, (addr >> 32) as u32);
    bar_write32(dev, bar, e + 8, data);
    bar_write32(dev, bar, e + 12, 0);
}

/// Sets MSI-X enable (and clears function mask) in message control.
pub fn msix_enable(dev: &VfioPciDevice, cap: u64, on: bool) {
    let ctl = cfg_read16(dev, cap + 2);
    let ctl = if on {
        (ctl | 0x8000) & !0x4000
    } else {
        ctl & !0x8000
    };
    cfg_write16(dev, cap + 2, ctl);
}

/// The nvme-like fake with its config bytes patched by `patch`.
pub fn patched_nvme(
    patch: impl FnOnce(&mut Vec<u8>),
) -> std::sync::Arc<vfio_fake_device::FakeDevice> {
    use vfio_fake_device::{DeviceTemplate, FakeDevice};
    let base = FakeDevice::profile("nvme-like").unwrap();
    let t = base.template();
    let mut config = t.config().to_vec();
    patch(&mut config);
    let sizes: Vec<Option<u64>> = (0..6).map(|i| t.bar(i).map(|b| b.size)).collect();
    std::sync::Arc::new(
        FakeDevice::new(DeviceTemplate::from_config(config, &sizes).unwrap()).unwrap(),
    )
}
