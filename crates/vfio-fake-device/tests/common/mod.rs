//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use std::ops::RangeInclusive;
use std::sync::Arc;

use vfio_backend::{region, DmaSource, RemoteDma, Result, Vfio};
use vfio_fake_device::FakeDevice;

/// A non-blocking eventfd.
pub struct Efd(pub OwnedFd);

impl Efd {
    pub fn new() -> Efd {
        // SAFETY: eventfd returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh fd owned by nobody else.
        Efd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Reads and resets the counter (0 when nothing was signalled).
    pub fn take(&self) -> u64 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64.
        let n = unsafe { libc::read(self.0.as_raw_fd(), std::ptr::from_mut(&mut v).cast(), 8) };
        if n == 8 {
            v
        } else {
            0
        }
    }

    pub fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64.
        let n = unsafe { libc::write(self.0.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
        assert_eq!(n, 8);
    }
}

/// Page-aligned anonymous memory standing in for guest RAM.
pub struct GuestMem {
    pub ptr: *mut u8,
    pub len: usize,
}

impl GuestMem {
    pub fn new(len: usize) -> GuestMem {
        // SAFETY: a fresh private anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        GuestMem { ptr: p.cast(), len }
    }

    /// A copy of the whole memory.
    pub fn read(&self) -> Vec<u8> {
        // SAFETY: the mapping is live and `len` bytes long.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }.to_vec()
    }

    /// Writes `data` at `off`.
    pub fn write(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        // SAFETY: bounds checked above; the mapping is live.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(off), data.len()) };
    }

    pub fn source(&self, read_only: bool) -> DmaSource<'static> {
        DmaSource {
            host_addr: self.ptr as u64,
            file: None,
            read_only,
        }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub fn cfg_read32(d: &FakeDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.region_read(region::CONFIG, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

pub fn cfg_read16(d: &FakeDevice, off: u64) -> u16 {
    let mut b = [0u8; 2];
    d.region_read(region::CONFIG, off, &mut b).unwrap();
    u16::from_le_bytes(b)
}

pub fn cfg_write32(d: &FakeDevice, off: u64, v: u32) {
    d.region_write(region::CONFIG, off, &v.to_le_bytes())
        .unwrap();
}

pub fn cfg_write16(d: &FakeDevice, off: u64, v: u16) {
    d.region_write(region::CONFIG, off, &v.to_le_bytes())
        .unwrap();
}

/// Sets the memory (and I/O) space enable bits, as a driver does first.
pub fn enable_decoding(d: &FakeDevice) {
    let cmd = cfg_read16(d, 4);
    cfg_write16(d, 4, cmd | 0x3);
}

/// Sets Bus Master Enable (command bit 2), as a driver does before it starts DMA.
pub fn enable_bus_master(d: &FakeDevice) {
    let cmd = cfg_read16(d, 4);
    cfg_write16(d, 4, cmd | 0x4);
}

pub fn bar_read32(d: &FakeDevice, bar: u32, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.region_read(bar, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

pub fn bar_write32(d: &FakeDevice, bar: u32, off: u64, v: u32) {
    d.region_write(bar, off, &v.to_le_bytes()).unwrap();
}

pub fn bar_write64(d: &FakeDevice, bar: u32, off: u64, v: u64) {
    d.region_write(bar, off, &v.to_le_bytes()).unwrap();
}

/// Walks the standard capability list of a config space: (offset, id).
pub fn walk_caps(cfg: &[u8]) -> Vec<(usize, u8)> {
    let mut out = Vec::new();
    let mut p = usize::from(cfg[0x34] & 0xfc);
    while p != 0 && out.len() < 48 {
        out.push((p, cfg[p]));
        p = usize::from(cfg[p + 1] & 0xfc);
    }
    out
}

/// Walks the extended capability list: (offset, id, version).
pub fn walk_ext_caps(cfg: &[u8]) -> Vec<(usize, u16, u8)> {
    let mut out = Vec::new();
    if cfg.len() < 4096 {
        return out;
    }
    let mut p = 0x100usize;
    while p != 0 && out.len() < 960 {
        let h = u32::from_le_bytes(cfg[p..p + 4].try_into().unwrap());
        if h == 0 {
            break;
        }
        out.push((p, (h & 0xffff) as u16, ((h >> 16) & 0xf) as u8));
        p = (h >> 20) as usize & 0xffc;
    }
    out
}

/// The device's IOMMU domain calls, as the tests use them.
pub trait TestDma {
    fn dma_map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()>;
    fn dma_map_remote(
        &self,
        iova: u64,
        size: u64,
        read_only: bool,
        remote: Arc<dyn RemoteDma>,
    ) -> Result<()>;
    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()>;
    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>>;
}

impl TestDma for FakeDevice {
    fn dma_map(&self, iova: u64, size: u64, host: DmaSource<'_>) -> Result<()> {
        // SAFETY: the tests map `GuestMem` (an anonymous mapping) or files they own; the fake
        // device reaches them only while the test drives it (a register write, or a DMA thread
        // the test waits for), and every test is done with the device before that memory is
        // unmapped at the end of the test.
        unsafe { self.iommu_domain().map(iova, size, host) }
    }

    fn dma_map_remote(
        &self,
        iova: u64,
        size: u64,
        read_only: bool,
        remote: Arc<dyn RemoteDma>,
    ) -> Result<()> {
        self.iommu_domain()
            .map_remote(iova, size, read_only, remote)
    }

    fn dma_unmap(&self, iova: u64, size: u64) -> Result<()> {
        self.iommu_domain().unmap(iova, size)
    }

    fn iova_ranges(&self) -> Result<Vec<RangeInclusive<u64>>> {
        self.iommu_domain().iova_ranges()
    }
}
