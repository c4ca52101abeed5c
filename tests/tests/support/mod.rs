//! What the end-to-end tests play: a VMM (interrupt manager, guest mapper,
//! BAR windows, guest RAM, a bus that dispatches guest MMIO), a guest OS
//! (firmware enumeration, drivers for `edu` and the `nvme-like` fake), and
//! the two backends every scenario runs against: the fake device
//! in-process and the same fake served over a real vfio-user socket.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use pci_interrupts::testing::{TestInterruptGroup, TestInterruptManager};
use pci_interrupts::InterruptSourceGroup;
use vfio_backend::user::{protocol, ServerOptions, UserDevice, UserOptions, UserServer};
use vfio_backend::Vfio;
use vfio_fake_device::{edu, nvme_like, FakeDevice};
use vfio_pci::IrqMode;
use vfio_pci::{
    AddressSpace, BarIndex, BarRange, ConfigWriteOutcome, DeviceOptions, DeviceResources, GuestDma,
    GuestMapper, MappingId, VfioPciDevice,
};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

/// The VMM's 32-bit MMIO window for BARs.
pub const MMIO32_BASE: u64 = 0xc000_0000;
/// Its size.
pub const MMIO32_SIZE: u64 = 0x2000_0000;
/// The VMM's 64-bit MMIO window.
pub const MMIO64_BASE: u64 = 0x100_0000_0000;
/// Its size.
pub const MMIO64_SIZE: u64 = 0x100_0000_0000;
/// Where our firmware starts assigning 32-bit BARs (the upper half of the
/// window, away from where the VMM placed them at attach).
pub const FW32_BASE: u64 = MMIO32_BASE + MMIO32_SIZE / 2;
/// Where our firmware starts assigning 64-bit BARs.
pub const FW64_BASE: u64 = MMIO64_BASE + MMIO64_SIZE / 2;

/// Guest RAM: two regions (below and above 4 GiB), both in one memfd.
pub const RAM_REGIONS: [(u64, usize); 2] = [(0, 2 << 20), (0x1_0000_0000, 2 << 20)];

/// An x86 MSI address (the LAPIC window), as a guest OS programs it.
pub const MSI_ADDR: u64 = 0xfee0_0000;

/// How long any bounded wait lasts before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

// Config space offsets and bits from the PCI Local Bus spec.
pub const COMMAND: u64 = 0x04;
pub const CMD_IO: u16 = 0x1;
pub const CMD_MEM: u16 = 0x2;
pub const CMD_BUS_MASTER: u16 = 0x4;
pub const STATUS: u64 = 0x06;
pub const STATUS_CAP_LIST: u16 = 0x10;
pub const BAR0: u64 = 0x10;
pub const ROM_BAR: u64 = 0x30;
pub const CAP_PTR: u64 = 0x34;
// Capability ids: pci-config's, the one PCI vocabulary of the workspace.
// Not every test binary that includes this module uses both.
#[allow(unused_imports)]
pub use pci_config::{cap_id, ext_cap_id};

// ---------------------------------------------------------------------------
// Backends.

/// Which backend a scenario runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// `Arc<FakeDevice>` as `Arc<dyn Vfio>`.
    InProcess,
    /// The same fake behind a `UserServer` on a Unix socket, reached with
    /// our `UserDevice` client.
    Socket,
}

/// Generates, for each scenario `fn name(kind: BackendKind) { .. }`, a
/// module `name` with one test per backend: `in_process` and
/// `vfio_user_socket`. One body, two backends.
#[macro_export]
macro_rules! both_backends {
    ($($(#[$meta:meta])* fn $name:ident($kind:ident: BackendKind) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                $(#[$meta])*
                fn scenario($kind: BackendKind) $body

                #[test]
                fn in_process() {
                    scenario(BackendKind::InProcess)
                }

                #[test]
                fn vfio_user_socket() {
                    scenario(BackendKind::Socket)
                }
            }
        )*
    };
}

/// A fake device reached through one backend. Fields drop in order: the
/// client first, then the relay, the server, the fake and the socket
/// directory.
pub struct Backend {
    /// What the VMM gives `VfioPciDevice::new`.
    pub vfio: Arc<dyn Vfio>,
    relay: Option<Relay>,
    server: Option<UserServer>,
    /// The fake (its counters and fault injection).
    pub fake: Arc<FakeDevice>,
    /// Which backend this is.
    pub kind: BackendKind,
    dir: Option<tempfile::TempDir>,
}

impl Backend {
    /// A fresh fake of `profile` behind `kind`.
    pub fn new(kind: BackendKind, profile: &str) -> Backend {
        Self::with_fake(kind, Arc::new(FakeDevice::profile(profile).unwrap()))
    }

    /// `fake` behind `kind`.
    pub fn with_fake(kind: BackendKind, fake: Arc<FakeDevice>) -> Backend {
        match kind {
            BackendKind::InProcess => Backend {
                vfio: fake.clone(),
                relay: None,
                server: None,
                fake,
                kind,
                dir: None,
            },
            BackendKind::Socket => Self::socket(fake, false, UserOptions::default()),
        }
    }

    /// `fake` served over a socket; with `relay`, the client reaches the
    /// server through a [`Relay`] that counts and can cut the messages.
    pub fn socket(fake: Arc<FakeDevice>, relay: bool, options: UserOptions) -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("fake.sock");
        let served: Arc<dyn Vfio> = fake.clone();
        let server = UserServer::bind(&sock, served, ServerOptions::default()).unwrap();
        let (relay, path) = if relay {
            let r = Relay::start(dir.path(), &sock);
            let p = r.path.clone();
            (Some(r), p)
        } else {
            (None, sock)
        };
        let client = UserDevice::connect_with_options(&path, options).unwrap();
        Backend {
            vfio: Arc::new(client),
            relay,
            server: Some(server),
            fake,
            kind: BackendKind::Socket,
            dir: Some(dir),
        }
    }

    /// Stops the vfio-user server (it disconnects its client).
    pub fn shutdown_server(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }

    /// The relay between client and server, if any.
    pub fn relay(&self) -> Option<&Relay> {
        self.relay.as_ref()
    }
}

/// A man in the middle between a vfio-user client and server: forwards
/// every message (file descriptors included), records the commands the
/// client sends, and can cut the connection.
pub struct Relay {
    /// The socket the client connects to.
    pub path: PathBuf,
    listener: UnixListener,
    commands: Arc<Mutex<Vec<u16>>>,
    streams: Arc<Mutex<Vec<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
}

fn pump(from: UnixStream, to: UnixStream, log: Option<Arc<Mutex<Vec<u16>>>>) {
    while let Ok(Some(m)) = protocol::read_message(from.as_fd(), 1 << 24, 64) {
        if let Some(log) = &log {
            if m.header.is_command() {
                log.lock().unwrap().push(m.header.command);
            }
        }
        let fds: Vec<_> = m.fds.iter().map(|f| f.as_fd()).collect();
        if protocol::write_message(to.as_fd(), &m.header, &[&m.payload], &fds).is_err() {
            break;
        }
    }
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}

impl Relay {
    /// Listens in `dir` and relays one client to the server at `server`.
    pub fn start(dir: &Path, server: &Path) -> Relay {
        let path = dir.join("relay.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let ours = listener.try_clone().unwrap();
        let commands = Arc::new(Mutex::new(Vec::new()));
        let streams: Arc<Mutex<Vec<UnixStream>>> = Arc::new(Mutex::new(Vec::new()));
        let (log, keep, server) = (commands.clone(), streams.clone(), server.to_path_buf());
        let thread = std::thread::spawn(move || {
            let Ok((client, _)) = listener.accept() else {
                return;
            };
            let Ok(upstream) = UnixStream::connect(&server) else {
                return;
            };
            {
                let mut k = keep.lock().unwrap();
                k.push(client.try_clone().unwrap());
                k.push(upstream.try_clone().unwrap());
            }
            let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let down = std::thread::spawn(move || pump(u2, c2, None));
            pump(client, upstream, Some(log));
            let _ = down.join();
        });
        Relay {
            path,
            listener: ours,
            commands,
            streams,
            thread: Some(thread),
        }
    }

    /// The commands the client sent so far, in order.
    pub fn commands(&self) -> Vec<u16> {
        self.commands.lock().unwrap().clone()
    }

    /// How many `command` messages the client sent so far.
    pub fn count(&self, command: u16) -> usize {
        self.commands().iter().filter(|&&c| c == command).count()
    }

    /// Kills the connection in both directions (the server stays up).
    pub fn cut(&self) {
        for s in self.streams.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        // SAFETY: shutdown on a listening socket we own wakes a blocked accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.streams.lock().unwrap().clear();
    }
}

// ---------------------------------------------------------------------------
// The VMM.

/// A guest mapper that keeps every live mapping, like a VMM's memory slots.
#[derive(Default)]
pub struct RecordingMapper {
    next: AtomicU64,
    /// id -> (gpa, size, host address, read only).
    pub live: Mutex<BTreeMap<u64, (u64, u64, usize, bool)>>,
}

impl RecordingMapper {
    /// Live mappings as (gpa, size).
    pub fn live(&self) -> Vec<(u64, u64)> {
        self.live
            .lock()
            .unwrap()
            .values()
            .map(|&(g, s, _, _)| (g, s))
            .collect()
    }

    /// Runs `f` on the host pointer behind `gpa .. gpa + len` if one live
    /// mapping covers it (the guest touching mapped device memory directly).
    fn with_host<R>(&self, gpa: u64, len: u64, f: impl FnOnce(*mut u8) -> R) -> Option<R> {
        let live = self.live.lock().unwrap();
        let &(g, _, h, _) = live
            .values()
            .find(|&&(g, s, _, _)| gpa >= g && gpa + len <= g + s)?;
        Some(f((h + (gpa - g) as usize) as *mut u8))
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
        Ok(MappingId(id))
    }

    fn unmap(&self, id: MappingId) -> std::io::Result<()> {
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
    pub fn new() -> Vm {
        let windows = BarWindows::new(AddressWindow {
            base: MMIO32_BASE,
            size: MMIO32_SIZE,
        })
        .with_mmio64(AddressWindow {
            base: MMIO64_BASE,
            size: MMIO64_SIZE,
        })
        .with_io(AddressWindow {
            base: 0x1000,
            size: 0x1000,
        });
        Vm {
            irqs: Arc::new(TestInterruptManager::new()),
            mapper: Arc::new(RecordingMapper::default()),
            alloc: Arc::new(Mutex::new(BarAllocator::new(windows).unwrap())),
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

    /// Hot-plugs the backend's device.
    pub fn attach(&self, backend: &Backend) -> VfioPciDevice {
        VfioPciDevice::new(
            backend.vfio.clone(),
            self.resources(),
            DeviceOptions::default(),
        )
        .unwrap()
    }

    /// The test group behind a group the device holds (matched by eventfd).
    pub fn group(&self, g: &Arc<dyn InterruptSourceGroup>) -> Arc<TestInterruptGroup> {
        let fd = g.notifier(0).expect("group without vector 0").as_raw_fd();
        self.irqs
            .groups()
            .into_iter()
            .find(|t| t.notifier(0).map(|n| n.as_raw_fd()) == Some(fd))
            .expect("group not created by this VM")
    }
}

impl Default for Vm {
    fn default() -> Self {
        Self::new()
    }
}

/// Guest RAM as a VMM builds it for vfio-user: memfd-backed regions, so a
/// server can map the same memory, sealed against shrinking as QEMU's
/// `memory-backend-memfd` seals it (so our server maps it and the fake's
/// DMA through it completes inside the doorbell write).
pub fn guest_ram() -> GuestMemoryMmap {
    guest_ram_in(guest_ram_file(true))
}

/// The memfd behind [`guest_ram`], of the size of [`RAM_REGIONS`],
/// sealed with `F_SEAL_SHRINK` or not.
pub fn guest_ram_file(sealed: bool) -> File {
    let total: usize = RAM_REGIONS.iter().map(|r| r.1).sum();
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns, taken over once.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(total as u64).unwrap();
    if sealed {
        // SAFETY: F_ADD_SEALS on a descriptor we own; no pointer involved.
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0, "F_ADD_SEALS: {}", std::io::Error::last_os_error());
    }
    file
}

/// Guest RAM of [`RAM_REGIONS`] in `file` (see [`guest_ram_file`]).
pub fn guest_ram_in(file: File) -> GuestMemoryMmap {
    let mut offset = 0u64;
    let ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = RAM_REGIONS
        .iter()
        .map(|&(gpa, len)| {
            let fo = FileOffset::new(file.try_clone().unwrap(), offset);
            offset += len as u64;
            (GuestAddress(gpa), len, Some(fo))
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges).unwrap()
}

pub fn ram_write(mem: &GuestMemoryMmap, gpa: u64, data: &[u8]) {
    mem.write_slice(data, GuestAddress(gpa)).unwrap();
}

pub fn ram_read(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
    v
}

/// A byte pattern that differs per `seed`.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 8) as u8))
        .collect()
}

// ---------------------------------------------------------------------------
// Interrupts as the guest receives them.

/// Waits (bounded, by polling the routed eventfd) until `vector` delivers,
/// then returns how many interrupts arrived. 0 means none within [`WAIT`].
pub fn wait_delivered(g: &TestInterruptGroup, vector: u32) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let n = g.take_delivered(vector);
        if n > 0 {
            return n;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return 0;
        }
        let Some(fd) = g.notifier(vector) else {
            return 0;
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, 100) as i32;
        // SAFETY: one pollfd that lives across the call.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
}

/// Whether `vector`'s eventfd holds a signal (without consuming it).
pub fn latched(g: &TestInterruptGroup, vector: u32) -> bool {
    let Some(fd) = g.notifier(vector) else {
        return false;
    };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd that lives across the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

// ---------------------------------------------------------------------------
// The guest.

/// A BAR as the guest's firmware found and placed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestBar {
    pub index: usize,
    pub size: u64,
    pub io: bool,
    pub is64: bool,
    pub prefetchable: bool,
    pub addr: u64,
}

/// What enumeration found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enumeration {
    pub vendor: u16,
    pub device: u16,
    pub bars: Vec<GuestBar>,
    /// ROM (size, address), if the device has one.
    pub rom: Option<(u64, u64)>,
    /// (id, offset) of the standard capabilities.
    pub caps: Vec<(u8, u64)>,
    /// (id, offset) of the extended capabilities.
    pub ext_caps: Vec<(u16, u64)>,
}

impl Enumeration {
    pub fn cap(&self, id: u8) -> Option<u64> {
        self.caps.iter().find(|c| c.0 == id).map(|c| c.1)
    }

    pub fn bar(&self, index: usize) -> GuestBar {
        *self.bars.iter().find(|b| b.index == index).unwrap()
    }
}

/// Where each BAR decodes, as [`VfioPciDevice::bars`] says.
pub fn decoded_bars(dev: &VfioPciDevice) -> BTreeMap<BarIndex, BarRange> {
    dev.bars()
        .into_iter()
        .filter(|b| b.decoding)
        .filter_map(|b| {
            let size = b.guest_size;
            b.base.map(|base| (b.index, BarRange { base, size }))
        })
        .collect()
}

/// A VMM's bus following a config write's outcome: each changed BAR's old range must be the
/// one registered; it is replaced by the new one (or dropped).
pub fn follow(bus: &mut BTreeMap<BarIndex, BarRange>, outcome: &ConfigWriteOutcome) {
    for c in outcome.bar_changes() {
        assert_eq!(
            bus.get(&c.bar).copied(),
            c.removed(),
            "{}: removed range",
            c.bar
        );
        match c.added() {
            Some(r) => bus.insert(c.bar, r),
            None => bus.remove(&c.bar),
        };
    }
}

/// Hands out BAR addresses the way simple firmware does: naturally
/// aligned, bumping upwards, 64-bit BARs above 4 GiB.
pub struct Firmware {
    next32: u64,
    next64: u64,
}

impl Firmware {
    pub fn new() -> Firmware {
        Firmware {
            next32: FW32_BASE,
            next64: FW64_BASE,
        }
    }

    pub fn take(&mut self, size: u64, is64: bool) -> u64 {
        let next = if is64 {
            &mut self.next64
        } else {
            &mut self.next32
        };
        let addr = next.div_ceil(size) * size;
        *next = addr + size;
        addr
    }
}

impl Default for Firmware {
    fn default() -> Self {
        Self::new()
    }
}

/// A guest OS driving one device through the VMM.
pub struct Guest<'a> {
    pub dev: &'a VfioPciDevice,
    pub vm: &'a Vm,
}

impl<'a> Guest<'a> {
    pub fn new(dev: &'a VfioPciDevice, vm: &'a Vm) -> Guest<'a> {
        Guest { dev, vm }
    }

    pub fn cfg_read(&self, off: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.read_config(off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    pub fn cfg8(&self, off: u64) -> u8 {
        self.cfg_read(off, 1) as u8
    }

    pub fn cfg16(&self, off: u64) -> u16 {
        self.cfg_read(off, 2) as u16
    }

    pub fn cfg32(&self, off: u64) -> u32 {
        self.cfg_read(off, 4)
    }

    pub fn cfg_write16(&self, off: u64, v: u16) {
        self.cfg_write(off, &v.to_le_bytes());
    }

    pub fn cfg_write32(&self, off: u64, v: u32) {
        self.cfg_write(off, &v.to_le_bytes());
    }

    /// A config write as a VMM whose bus registers BAR ranges makes it: the bus drops and
    /// adds what the write's outcome says, and must then route every BAR where the device
    /// says it decodes.
    pub fn cfg_write(&self, off: u64, data: &[u8]) -> ConfigWriteOutcome {
        let mut bus = decoded_bars(self.dev);
        let outcome = self.dev.write_config(off, data).unwrap();
        follow(&mut bus, &outcome);
        assert_eq!(
            bus,
            decoded_bars(self.dev),
            "config write of {data:x?} at {off:#x}: the bus built from its outcome {outcome:x?} \
             differs from bars()"
        );
        outcome
    }

    /// Every dword of config space, as the guest reads it.
    pub fn config_dump(&self) -> Vec<u32> {
        (0..1024).map(|r| self.cfg32(r * 4)).collect()
    }

    /// Sizes BAR register `i` (PCI Local Bus 3.0, 6.2.5.1): save, write
    /// all ones, read back, restore. A 64-bit BAR sizes both halves.
    /// Returns (size, the read-only low bits).
    pub fn size_bar(&self, i: usize) -> (u64, u32) {
        let reg = BAR0 + 4 * i as u64;
        let orig = self.cfg32(reg);
        self.cfg_write32(reg, 0xffff_ffff);
        let lo = self.cfg32(reg);
        self.cfg_write32(reg, orig);
        if lo == 0 {
            return (0, 0);
        }
        if lo & 1 == 1 {
            let mask = u64::from(lo & !0x3) | 0xffff_0000;
            return ((!mask).wrapping_add(1) & 0xffff, lo & 0x3);
        }
        let flags = lo & 0xf;
        if (lo >> 1) & 3 == 2 {
            let orig_hi = self.cfg32(reg + 4);
            self.cfg_write32(reg + 4, 0xffff_ffff);
            let hi = self.cfg32(reg + 4);
            self.cfg_write32(reg + 4, orig_hi);
            let mask = (u64::from(hi) << 32) | u64::from(lo & !0xf);
            ((!mask).wrapping_add(1), flags)
        } else {
            let mask = u64::from(lo & !0xf) | 0xffff_ffff_0000_0000;
            ((!mask).wrapping_add(1), flags)
        }
    }

    /// The address BAR `i` holds, as the guest reads it.
    pub fn bar_address(&self, i: usize) -> u64 {
        let reg = BAR0 + 4 * i as u64;
        let lo = self.cfg32(reg);
        if lo & 1 == 1 {
            return u64::from(lo & !0x3);
        }
        if (lo >> 1) & 3 == 2 {
            (u64::from(self.cfg32(reg + 4)) << 32) | u64::from(lo & !0xf)
        } else {
            u64::from(lo & !0xf)
        }
    }

    /// Programs BAR `i` with `addr` (both halves of a 64-bit BAR).
    pub fn set_bar_address(&self, bar: &GuestBar, addr: u64) {
        let reg = BAR0 + 4 * bar.index as u64;
        let low_bits = self.cfg32(reg) & if bar.io { 0x3 } else { 0xf };
        self.cfg_write32(reg, (addr as u32 & !0xf) | low_bits);
        if bar.is64 {
            self.cfg_write32(reg + 4, (addr >> 32) as u32);
        }
    }

    /// The standard capability chain, bounded as Linux bounds it (48).
    pub fn walk_caps(&self) -> Vec<(u8, u64)> {
        let mut out = Vec::new();
        if self.cfg16(STATUS) & STATUS_CAP_LIST == 0 {
            return out;
        }
        let mut ptr = u64::from(self.cfg8(CAP_PTR) & 0xfc);
        let mut ttl = 48;
        while ptr >= 0x40 && ttl > 0 {
            out.push((self.cfg8(ptr), ptr));
            ptr = u64::from(self.cfg8(ptr + 1) & 0xfc);
            ttl -= 1;
        }
        out
    }

    /// The extended capability chain from 0x100 (PCIe Base 7.6), bounded.
    pub fn walk_ext_caps(&self) -> Vec<(u16, u64)> {
        let mut out = Vec::new();
        let mut ptr = 0x100u64;
        let mut ttl = (4096 - 0x100) / 8;
        while ptr >= 0x100 && ttl > 0 {
            let hdr = self.cfg32(ptr);
            if hdr == 0 || hdr == 0xffff_ffff {
                break;
            }
            let id = (hdr & 0xffff) as u16;
            if id != 0 {
                out.push((id, ptr));
            }
            ptr = u64::from((hdr >> 20) & 0xffc);
            ttl -= 1;
        }
        out
    }

    /// Firmware enumeration: decoding off, size every BAR and the ROM,
    /// assign addresses from `fw`, walk the capabilities, then enable
    /// memory space and bus mastering.
    pub fn enumerate(&self, fw: &mut Firmware) -> Enumeration {
        let id = self.cfg32(0);
        let cmd = self.cfg16(COMMAND);
        self.cfg_write16(COMMAND, cmd & !(CMD_IO | CMD_MEM));
        let mut bars = Vec::new();
        let mut i = 0usize;
        while i < 6 {
            let (size, flags) = self.size_bar(i);
            if size == 0 {
                i += 1;
                continue;
            }
            let io = flags & 1 == 1;
            let is64 = !io && (flags >> 1) & 3 == 2;
            let mut bar = GuestBar {
                index: i,
                size,
                io,
                is64,
                prefetchable: !io && flags & 0x8 != 0,
                addr: 0,
            };
            if io {
                // The VMM's I/O placement is kept; I/O is not assigned here.
                bar.addr = self.bar_address(i);
            } else {
                bar.addr = fw.take(size, is64);
                self.set_bar_address(&bar, bar.addr);
            }
            bars.push(bar);
            i += if is64 { 2 } else { 1 };
        }
        // The ROM BAR: address bits 31:11, enable bit 0 (PCI 3.0, 6.2.5.2).
        let orig = self.cfg32(ROM_BAR);
        self.cfg_write32(ROM_BAR, 0xffff_f800);
        let sized = self.cfg32(ROM_BAR) & 0xffff_f800;
        let rom = if sized == 0 {
            self.cfg_write32(ROM_BAR, orig);
            None
        } else {
            let size = u64::from((!sized).wrapping_add(1));
            let addr = fw.take(size, false);
            self.cfg_write32(ROM_BAR, addr as u32);
            Some((size, addr))
        };
        let caps = self.walk_caps();
        let ext_caps = self.walk_ext_caps();
        let io = bars.iter().any(|b| b.io);
        let enable = CMD_MEM | CMD_BUS_MASTER | if io { CMD_IO } else { 0 };
        self.cfg_write16(COMMAND, self.cfg16(COMMAND) | enable);
        Enumeration {
            vendor: id as u16,
            device: (id >> 16) as u16,
            bars,
            rom,
            caps,
            ext_caps,
        }
    }

    /// Moves a BAR as Linux does: decoding off, write the register(s),
    /// decoding back on.
    pub fn move_bar(&self, bar: &GuestBar, addr: u64) {
        let cmd = self.cfg16(COMMAND);
        self.cfg_write16(COMMAND, cmd & !CMD_MEM);
        self.set_bar_address(bar, addr);
        self.cfg_write16(COMMAND, cmd);
    }

    /// A guest MMIO read at `gpa`: straight from device memory when the
    /// VMM mapped it into the guest, else a trapped access the VMM's bus
    /// hands to the device; nothing there reads all ones (master abort).
    pub fn mmio_read(&self, gpa: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        let direct = self.vm.mapper.with_host(gpa, len, |p| {
            for (i, b) in data.iter_mut().enumerate() {
                // SAFETY: the mapper holds a live mapping covering
                // `gpa .. gpa + len` (checked by with_host, under its lock).
                *b = unsafe { p.add(i).read_volatile() };
            }
        });
        if direct.is_some() {
            return;
        }
        match self.dev.bar_at(gpa, AddressSpace::Memory) {
            Some((bar, off)) => self.dev.read_bar(bar, off, data),
            None => data.fill(0xff),
        }
    }

    /// A guest MMIO write at `gpa` (see [`Guest::mmio_read`]). Returns the
    /// VMM's result for a trapped access.
    pub fn mmio_write(&self, gpa: u64, data: &[u8]) -> vfio_pci::Result<()> {
        let len = data.len() as u64;
        let direct = self.vm.mapper.with_host(gpa, len, |p| {
            for (i, b) in data.iter().enumerate() {
                // SAFETY: as in mmio_read.
                unsafe { p.add(i).write_volatile(*b) };
            }
        });
        if direct.is_some() {
            return Ok(());
        }
        match self.dev.bar_at(gpa, AddressSpace::Memory) {
            Some((bar, off)) => self.dev.write_bar(bar, off, data),
            None => Ok(()),
        }
    }

    pub fn mmio_read32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        self.mmio_read(gpa, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn mmio_read64(&self, gpa: u64) -> u64 {
        let mut b = [0u8; 8];
        self.mmio_read(gpa, &mut b);
        u64::from_le_bytes(b)
    }

    pub fn mmio_write32(&self, gpa: u64, v: u32) {
        self.mmio_write(gpa, &v.to_le_bytes()).unwrap();
    }

    pub fn mmio_write64(&self, gpa: u64, v: u64) {
        self.mmio_write(gpa, &v.to_le_bytes()).unwrap();
    }

    /// Enables MSI with one vector at `addr`/`data` (PCI 3.0, 6.8.1).
    pub fn enable_msi(&self, cap: u64, addr: u64, data: u16) {
        let ctl = self.cfg16(cap + 2);
        let is64 = ctl & 0x80 != 0;
        self.cfg_write32(cap + 4, addr as u32);
        if is64 {
            self.cfg_write32(cap + 8, (addr >> 32) as u32);
            self.cfg_write16(cap + 0xc, data);
        } else {
            self.cfg_write16(cap + 8, data);
        }
        // Enable, one vector (MME = 0).
        self.cfg_write16(cap + 2, (ctl & !0x70) | 0x1);
    }

    /// The MSI-X table's guest address and size, from the capability
    /// (PCI 3.0, 6.8.2) and the BAR it names.
    pub fn msix_table(&self, cap: u64) -> (u64, u32) {
        let ctl = self.cfg16(cap + 2);
        let table = self.cfg32(cap + 4);
        let bir = (table & 7) as usize;
        let base = self.bar_address(bir);
        (base + u64::from(table & !7), u32::from(ctl & 0x7ff) + 1)
    }

    /// The PBA's guest address.
    pub fn msix_pba(&self, cap: u64) -> u64 {
        let pba = self.cfg32(cap + 8);
        self.bar_address((pba & 7) as usize) + u64::from(pba & !7)
    }

    /// Writes MSI-X table entry `v`: address, data, vector control.
    pub fn msix_program(&self, table: u64, v: u32, addr: u64, data: u32, masked: bool) {
        let e = table + 16 * u64::from(v);
        self.mmio_write32(e, addr as u32);
        self.mmio_write32(e + 4, (addr >> 32) as u32);
        self.mmio_write32(e + 8, data);
        self.mmio_write32(e + 12, u32::from(masked));
    }

    /// Sets or clears the per-vector mask bit of entry `v`.
    pub fn msix_mask(&self, table: u64, v: u32, masked: bool) {
        self.mmio_write32(table + 16 * u64::from(v) + 12, u32::from(masked));
    }

    /// Sets MSI-X enable and function mask in message control.
    pub fn msix_control(&self, cap: u64, enable: bool, function_mask: bool) {
        let ctl = self.cfg16(cap + 2) & !0xc000;
        let ctl = ctl | if enable { 0x8000 } else { 0 } | if function_mask { 0x4000 } else { 0 };
        self.cfg_write16(cap + 2, ctl);
    }
}

// ---------------------------------------------------------------------------
// Drivers for the fake profiles.

/// Starts an edu DMA (`src` -> `dst`, `count` bytes, interrupt on
/// completion) and waits, bounded, for the start bit to clear.
pub fn edu_dma(g: &Guest<'_>, bar: u64, src: u64, dst: u64, count: u64, to_ram: bool) {
    g.mmio_write64(bar + edu::DMA_SRC, src);
    g.mmio_write64(bar + edu::DMA_DST, dst);
    g.mmio_write64(bar + edu::DMA_COUNT, count);
    let dir = if to_ram { edu::DMA_CMD_TO_RAM } else { 0 };
    g.mmio_write64(
        bar + edu::DMA_CMD,
        edu::DMA_CMD_START | edu::DMA_CMD_IRQ | dir,
    );
    let deadline = std::time::Instant::now() + WAIT;
    while g.mmio_read64(bar + edu::DMA_CMD) & edu::DMA_CMD_START != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "edu DMA never finished"
        );
        std::thread::yield_now();
    }
}

/// Reads `len` bytes of device memory at `gpa`, dword by dword.
pub fn mmio_bytes(g: &Guest<'_>, gpa: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .step_by(4)
        .flat_map(|o| g.mmio_read32(gpa + o).to_le_bytes())
        .collect()
}

/// RAM -> device -> RAM through edu's DMA engine, each leg acknowledged by
/// an MSI on `vector` of `grp`. Returns nothing; asserts the data.
pub fn edu_round_trip(
    g: &Guest<'_>,
    mem: &GuestMemoryMmap,
    grp: &TestInterruptGroup,
    bar: u64,
    seed: u8,
) {
    let data = pattern(seed, 1024);
    let src = RAM_REGIONS[1].0 + 0x1000;
    let dst = RAM_REGIONS[0].0 + 0x8000 + u64::from(seed) * 0x1000;
    ram_write(mem, src, &data);
    edu_dma(g, bar, src, edu::DMA_BUFFER, data.len() as u64, false);
    assert_eq!(g.mmio_read32(bar + edu::DMA_ERROR), 0, "RAM -> device");
    assert_eq!(wait_delivered(grp, 0), 1, "completion MSI of RAM -> device");
    assert_eq!(
        g.mmio_read32(bar + edu::IRQ_STATUS) & edu::DMA_IRQ,
        edu::DMA_IRQ
    );
    g.mmio_write32(bar + edu::IRQ_ACK, edu::DMA_IRQ);
    assert_eq!(g.mmio_read32(bar + edu::IRQ_STATUS) & edu::DMA_IRQ, 0);
    // The device buffer, read by the guest through the BAR.
    assert_eq!(mmio_bytes(g, bar + edu::DMA_BUFFER, data.len()), data);

    edu_dma(g, bar, edu::DMA_BUFFER, dst, data.len() as u64, true);
    assert_eq!(g.mmio_read32(bar + edu::DMA_ERROR), 0, "device -> RAM");
    assert_eq!(wait_delivered(grp, 0), 1, "completion MSI of device -> RAM");
    g.mmio_write32(bar + edu::IRQ_ACK, edu::DMA_IRQ);
    assert_eq!(ram_read(mem, dst, data.len()), data);
}

/// Attaches an edu, enumerates it, maps guest RAM and enables MSI.
/// Returns (enumeration, BAR0 address).
pub fn edu_up(g: &Guest<'_>, mem: &GuestMemoryMmap) -> (Enumeration, u64) {
    assert_eq!(
        g.dev.guest_dma().add_memory(mem).unwrap(),
        RAM_REGIONS.len()
    );
    let e = g.enumerate(&mut Firmware::new());
    let msi = e.cap(cap_id::MSI).expect("edu has MSI");
    g.enable_msi(msi, MSI_ADDR, 0x41);
    assert_eq!(g.dev.irq_mode(), IrqMode::Msi(1));
    let bar = g.bar_address(0);
    (e, bar)
}

/// Enumerates an nvme-like, programs every MSI-X entry (data 0x100 + v)
/// and enables MSI-X. Returns (enumeration, BAR0, MSI-X cap, table).
pub fn nvme_up(g: &Guest<'_>) -> (Enumeration, u64, u64, u64) {
    let e = g.enumerate(&mut Firmware::new());
    let cap = e.cap(cap_id::MSIX).expect("nvme-like has MSI-X");
    let (table, n) = g.msix_table(cap);
    assert_eq!(n, nvme_like::MSIX_VECTORS);
    for v in 0..n {
        g.msix_program(table, v, MSI_ADDR, 0x100 + v, false);
    }
    g.msix_control(cap, true, false);
    assert_eq!(g.dev.irq_mode(), IrqMode::Msix);
    (e, g.bar_address(0), cap, table)
}

/// Rings the SQ tail doorbell of queue `v`, which raises MSI-X vector `v`.
pub fn ring(g: &Guest<'_>, bar: u64, v: u32) {
    g.mmio_write32(
        bar + nvme_like::DOORBELLS + u64::from(v) * nvme_like::DOORBELL_STRIDE,
        1,
    );
}

// ---------------------------------------------------------------------------
// Leak accounting.

/// What a device's or a backend's life could leave behind in this process:
/// open file descriptors, file-backed memory mappings (device regions, BAR
/// and guest-RAM memfds, a server's DMA mappings) and threads.
///
/// Anonymous mappings are not counted. Our crates make none outside tests:
/// they belong to the C library, which keeps the stacks of finished threads
/// for reuse and makes a new malloc arena (two mappings) when a thread
/// starts while every arena is still held by another. Both depend on how
/// the scheduler orders threads starting and ending, so their count changes
/// with the machine's load, and neither is ever given back. A thread we
/// leaked would still show in the thread count.
#[derive(Clone, Debug)]
pub struct Footprint {
    /// Entries of /proc/self/fd.
    pub fds: usize,
    /// Lines of /proc/self/maps with an inode.
    pub file_maps: Vec<String>,
    /// Entries of /proc/self/task.
    pub threads: usize,
}

impl Footprint {
    /// The process as it is now.
    pub fn now() -> Self {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        Footprint {
            fds: std::fs::read_dir("/proc/self/fd").unwrap().count(),
            file_maps: maps
                .lines()
                // address perms offset dev inode pathname: a file has an inode.
                .filter(|l| l.split_whitespace().nth(4).is_some_and(|i| i != "0"))
                .map(str::to_string)
                .collect(),
            threads: std::fs::read_dir("/proc/self/task").unwrap().count(),
        }
    }

    fn counts(&self) -> (usize, usize, usize) {
        (self.fds, self.file_maps.len(), self.threads)
    }

    /// Asserts that the process comes back to this footprint within
    /// [`WAIT`]: a vfio-user server lets go of its side (DMA mappings,
    /// interrupt fds, its threads) on its own thread once it sees the
    /// client hang up. On failure, names the file mappings that came or
    /// went.
    pub fn assert_given_back(&self, after: &str) {
        let deadline = std::time::Instant::now() + WAIT;
        let mut now = Footprint::now();
        while now.counts() != self.counts() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            now = Footprint::now();
        }
        let came: Vec<&String> = now
            .file_maps
            .iter()
            .filter(|l| !self.file_maps.contains(l))
            .collect();
        let went: Vec<&String> = self
            .file_maps
            .iter()
            .filter(|l| !now.file_maps.contains(l))
            .collect();
        assert_eq!(now.fds, self.fds, "fds after {after}");
        assert_eq!(
            now.file_maps.len(),
            self.file_maps.len(),
            "file mappings after {after}: new {came:#?}, gone {went:#?}"
        );
        assert_eq!(now.threads, self.threads, "threads after {after}");
    }
}

/// Runs `f` on another thread and waits at most [`WAIT`] for it; `None`
/// when it did not finish in time (it is then left running).
pub fn bounded<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(WAIT).ok()
}
