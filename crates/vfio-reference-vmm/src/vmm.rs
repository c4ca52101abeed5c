//! The machine: KVM VM, guest RAM, the devices on the bus, the vCPU threads and their exit
//! loop. x86_64 only.
//!
//! Wiring, in the order [`Vmm::new`] does it:
//! 1. KVM VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT; guest RAM from a sealed
//!    memfd (vm-memory), one KVM memory slot per region.
//! 2. The GSI routing table of the passthrough glue, with KVM's default routes kept, and the
//!    serial port's irqfd on GSI 4.
//! 3. The devices: one [`KvmInterruptManager`] per device (its MSI GSI block and its INTx
//!    IOAPIC pin), one [`KvmGuestMapper`], one BAR allocator and one [`GuestDma`] for all,
//!    built with [`DeviceBuilder`]; host devices in one [`HostIommu`] (one container or one
//!    IOAS for the VM, guest RAM mapped there once), their VFIO files given to the KVM-VFIO
//!    device once each.
//! 4. The kernel, initrd, command line, boot_params, page tables, GDT and MP table.
//! 5. One thread per vCPU; exits go to [`Bus`]. The first vCPU that stops the machine
//!    (debug-exit port, reset, error) tells the main thread, which ends the process.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vfio_passthrough::kvm::{
    GsiRouting, IntxLine, KvmGuestMapper, KvmInterruptManager, KvmVfioDevice,
};
use vfio_passthrough::pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use vfio_passthrough::vfio_pci::{AddressSpace, GuestDma, GuestMapper, VfioPciDevice};
use vfio_passthrough::{DeviceBuilder, HostIommu, PassthroughDevice};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::args::{Config, DeviceArg};
use crate::error::{Error, Result};
use crate::layout::*;
use crate::pci::{intx_pin, msi_gsis, PciBus, Routed};
use crate::rtc::{self, Cmos};
use crate::{boot, mptable};

/// The 16550 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// Its IRQ (ISA IRQ 4, IOAPIC pin 4).
pub const SERIAL_IRQ: u32 = 4;
/// The debug-exit port: a byte N written here ends the VMM with exit status N.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// The i8042 command/status port: command 0xFE pulses the CPU reset line.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The reset control register (Intel chipsets): bit 2 set resets.
pub const RESET_CONTROL_PORT: u16 = 0xcf9;
/// KVM memory slots of guest RAM: 0..RAM_SLOTS; the mapper uses the ones above.
const RAM_SLOTS: u32 = 8;
const MAPPER_SLOTS: std::ops::Range<u32> = RAM_SLOTS..512;

/// Why the machine stopped.
#[derive(Debug)]
pub enum Stop {
    /// The guest wrote this byte to the debug-exit port.
    Exit(u8),
    /// The guest reset (or shut down) the machine, for this reason.
    Reset(String),
    /// Something failed.
    Failed(Error),
}

/// The serial port's interrupt: an eventfd registered as an irqfd on GSI 4.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Exit counters (relaxed atomics: no lock, no allocation on the exit path).
#[derive(Debug, Default)]
pub struct ExitStats {
    /// Serial port accesses.
    pub serial: AtomicU64,
    /// Configuration mechanism #1 accesses.
    pub config: AtomicU64,
    /// Accesses to trapped BAR ranges (memory and I/O).
    pub bar: AtomicU64,
    /// Every other port or MMIO access.
    pub other: AtomicU64,
}

impl std::fmt::Display for ExitStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        write!(
            f,
            "serial {}, PCI config {}, BAR {}, other {}",
            n(&self.serial),
            n(&self.config),
            n(&self.bar),
            n(&self.other)
        )
    }
}

fn count(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What vCPU exits are dispatched to: the serial port, PCI (config mechanism #1 and the
/// BARs' trapped ranges), and the ports that end the machine.
pub struct Bus {
    /// Exits by kind, for `-v`: what the guest's time went to.
    pub stats: ExitStats,
    pci: RwLock<PciBus>,
    cmos: Mutex<Cmos>,
    serial: Mutex<Serial<IrqTrigger, vm_superio::serial::NoEvents, Console>>,
}

/// Where the guest's serial output goes (the VMM's stdout).
pub type Console = Box<dyn Write + Send>;

/// The VMM's stdout as the serial port's output: written a line at a time. The 16550 model
/// flushes after every byte, which would be a `write(2)` per byte; this leaves flushing to
/// stdout's line buffering (and to the VMM's exit, which flushes what is left).
#[derive(Debug)]
pub struct LineConsole(pub std::io::Stdout);

impl Write for LineConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Bus {
    /// A bus with `pci`, the serial port writing to `console` and raising its interrupt by
    /// writing `serial_irq` (an eventfd the VMM registers as an irqfd on GSI 4).
    pub fn new(pci: PciBus, serial_irq: EventFd, console: Console) -> Self {
        Bus {
            stats: ExitStats::default(),
            pci: RwLock::new(pci),
            cmos: Mutex::new(Cmos::default()),
            serial: Mutex::new(Serial::new(IrqTrigger(serial_irq), console)),
        }
    }

    fn pci_read(&self) -> std::sync::RwLockReadGuard<'_, PciBus> {
        self.pci
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn pci_write(&self) -> std::sync::RwLockWriteGuard<'_, PciBus> {
        self.pci
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A write to a trapped BAR range.
    fn bar_write(&self, r: Routed, data: &[u8]) -> Option<Stop> {
        count(&self.stats.bar);
        r.device
            .write_bar(r.bar, r.offset, data)
            .err()
            .map(|source| {
                Stop::Failed(Error::DeviceRun {
                    slot: r.slot,
                    source: Box::new(source),
                })
            })
    }

    /// A port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (SERIAL_PORT..SERIAL_PORT + 8).contains(&port) {
            count(&self.stats.serial);
            let v = lock(&self.serial).read((port - SERIAL_PORT) as u8);
            data.fill(v);
            return;
        }
        if PciBus::is_config_port(port) {
            count(&self.stats.config);
            self.pci_read().pio_read(port, data);
            return;
        }
        if port == rtc::INDEX_PORT || port == rtc::DATA_PORT {
            count(&self.stats.other);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            data.fill(lock(&self.cmos).read(port, now));
            return;
        }
        if port == I8042_COMMAND_PORT {
            count(&self.stats.other);
            // A controller with its output buffer always full and its input buffer empty:
            // Linux's i8042 probe flushes 16 bytes and gives up ("No controller found") at
            // once, and its reboot path finds the input buffer empty and sends 0xFE at once.
            data.fill(0x01);
            return;
        }
        let found = self.pci_read().lookup(AddressSpace::Io, u64::from(port));
        match found {
            Some(r) => {
                count(&self.stats.bar);
                r.device.read_bar(r.bar, r.offset, data)
            }
            None => {
                count(&self.stats.other);
                log::trace!("read of unclaimed port {port:#x}");
                data.fill(0xff);
            }
        }
    }

    /// A port write; `Some` when it stops the machine.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<Stop> {
        let first = data.first().copied().unwrap_or(0);
        if (SERIAL_PORT..SERIAL_PORT + 8).contains(&port) {
            count(&self.stats.serial);
            if let Err(e) = lock(&self.serial).write((port - SERIAL_PORT) as u8, first) {
                log::warn!("serial write: {e:?}");
            }
            return None;
        }
        match port {
            DEBUG_EXIT_PORT
            | I8042_COMMAND_PORT
            | RESET_CONTROL_PORT
            | rtc::INDEX_PORT
            | rtc::DATA_PORT => count(&self.stats.other),
            _ => {}
        }
        match port {
            DEBUG_EXIT_PORT => return Some(Stop::Exit(first)),
            I8042_COMMAND_PORT if first == 0xfe => {
                return Some(Stop::Reset(
                    "i8042 reset (0xFE written to port 0x64)".into(),
                ))
            }
            I8042_COMMAND_PORT => return None,
            rtc::INDEX_PORT | rtc::DATA_PORT => {
                lock(&self.cmos).write(port, first);
                return None;
            }
            RESET_CONTROL_PORT if data.len() == 1 && first & 0x4 != 0 => {
                return Some(Stop::Reset(format!(
                    "reset control register 0xCF9 written {first:#x}"
                )))
            }
            _ => {}
        }
        if PciBus::is_config_port(port) {
            count(&self.stats.config);
            return self
                .pci_write()
                .pio_write(port, data)
                .err()
                .map(|(slot, source)| {
                    Stop::Failed(Error::DeviceRun {
                        slot,
                        source: Box::new(source),
                    })
                });
        }
        let found = self.pci_read().lookup(AddressSpace::Io, u64::from(port));
        match found {
            Some(r) => self.bar_write(r, data),
            None => {
                count(&self.stats.other);
                log::trace!("write of unclaimed port {port:#x}");
                None
            }
        }
    }

    /// An MMIO read (an address no memory slot covers).
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        let found = self.pci_read().lookup(AddressSpace::Memory, addr);
        match found {
            Some(r) => {
                count(&self.stats.bar);
                r.device.read_bar(r.bar, r.offset, data)
            }
            None => {
                count(&self.stats.other);
                log::debug!("read of unclaimed address {addr:#x}");
                data.fill(0xff);
            }
        }
    }

    /// An MMIO write; `Some` when it stops the machine.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> Option<Stop> {
        let found = self.pci_read().lookup(AddressSpace::Memory, addr);
        match found {
            Some(r) => self.bar_write(r, data),
            None => {
                count(&self.stats.other);
                log::debug!("write of unclaimed address {addr:#x}");
                None
            }
        }
    }
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// Guest RAM of `size` bytes from one memfd sealed against growing and shrinking, laid out
/// as [`ram_regions`] says, so that vfio-user servers can map it.
fn guest_memory(size: u64) -> Result<GuestMemoryMmap> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(Error::last_os("memfd_create (guest RAM)"));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size).map_err(|source| Error::Os {
        op: "sizing the guest RAM memfd",
        source,
    })?;
    // SAFETY: F_ADD_SEALS on a descriptor we own; no pointer involved.
    if unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    } != 0
    {
        return Err(Error::last_os("sealing the guest RAM memfd"));
    }
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    for (base, len) in ram_regions(size) {
        let f = file.try_clone().map_err(|source| Error::Os {
            op: "duplicating the guest RAM memfd",
            source,
        })?;
        let len_usize = usize::try_from(len).map_err(|_| Error::Memory(format!("{len} bytes")))?;
        ranges.push((
            GuestAddress(base),
            len_usize,
            Some(FileOffset::new(f, offset)),
        ));
        offset += len;
    }
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| Error::Memory(e.to_string()))
}

/// The machine, ready to run.
pub struct Vmm {
    vm: Arc<VmFd>,
    vcpus: Vec<VcpuFd>,
    bus: Arc<Bus>,
    // Kept for the machine's lifetime: KVM and the devices refer to them.
    _mem: GuestMemoryMmap,
    _routing: Arc<GsiRouting>,
    _serial_irq: EventFd,
    _kvm_vfio: Option<KvmVfioDevice>,
    _host_iommu: Arc<HostIommu>,
    _mapper: Arc<KvmGuestMapper>,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Builds the machine `config` describes.
    pub fn new(config: &Config, started: Instant) -> Result<Self> {
        let mem_size = config.memory_mib << 20;
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;

        // Guest RAM: a KVM memory slot per region.
        let mem = guest_memory(mem_size)?;
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| Error::Memory(e.to_string()))?;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // Transparent huge pages where the host allows them for shared memory
            // (/sys/kernel/mm/transparent_hugepage/shmem_enabled = advise): fewer faults
            // when the RAM is pinned for DMA and 2 MiB nested page table entries. Advice only.
            // SAFETY: madvise on a live mapping of `region.len()` bytes that `mem` owns; the
            // advice changes no contents.
            let advised =
                unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
            if advised != 0 {
                log::debug!(
                    "madvise(MADV_HUGEPAGE) on guest RAM: {}",
                    std::io::Error::last_os_error()
                );
            }
            // SAFETY: the region is a live mapping owned by `mem`, which the Vmm keeps for
            // as long as the VM exists.
            unsafe { vm.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        // The guest's software and tables (before the devices: a wrong path fails fast).
        let loaded = boot::load_kernel(&mem, &config.kernel)?;
        let cmdline_len = boot::load_command_line(&mem, &config.cmdline, &loaded)?;
        let initrd = match &config.initrd {
            Some(path) => Some(boot::load_initrd(&mem, mem_size, path, &loaded)?),
            None => None,
        };
        let params = boot::boot_params(loaded.header, cmdline_len, initrd, mem_size)?;
        boot::write_boot_params(&mem, &params)?;
        boot::write_tables(&mem)?;
        // Interrupts: one routing table for the VM; KVM's default routes kept.
        let routing = Arc::new(GsiRouting::new(vm.clone()));
        routing
            .add_x86_legacy_routes()
            .map_err(|source| Error::Device {
                what: "GSI routing".into(),
                source: Box::new(source),
            })?;
        routing.commit().map_err(|source| Error::Device {
            what: "GSI routing".into(),
            source: Box::new(source),
        })?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Os {
            op: "eventfd (serial IRQ)",
            source,
        })?;
        vm.register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial_trigger = serial_irq.try_clone().map_err(|source| Error::Os {
            op: "eventfd clone (serial IRQ)",
            source,
        })?;

        // What every device shares: the mapper, the BAR windows, guest RAM for DMA.
        let mapper = Arc::new(
            KvmGuestMapper::new(vm.clone(), MAPPER_SLOTS).map_err(|source| Error::Device {
                what: "memory slots".into(),
                source: Box::new(source),
            })?,
        );
        let windows = BarWindows::new(AddressWindow::new(MMIO32_BASE, MMIO32_SIZE))
            .with_mmio64(AddressWindow::new(mmio64_base(mem_size), MMIO64_SIZE))
            .with_io(AddressWindow::new(IO_BASE, IO_SIZE));
        let allocator = Arc::new(Mutex::new(
            BarAllocator::new(windows).map_err(|e| Error::Layout(format!("BAR windows: {e}")))?,
        ));
        let dma = GuestDma::new();
        dma.add_memory(&mem)
            .map_err(|e| Error::Memory(format!("registering guest RAM for DMA: {e}")))?;
        // One host IOMMU context for the VM: every host device goes into one legacy container
        // or one iommufd IOAS (`--host-iommu`, or with `auto` the first device picks), where
        // guest RAM is pinned and mapped once. Nothing is opened until a host device is.
        let host_iommu = HostIommu::with_guest_dma(config.host_iommu, dma.clone());

        let mut pci = PciBus::new();
        let mut kvm_vfio: Option<KvmVfioDevice> = None;
        let mut wiring = Vec::new();
        for (i, arg) in config.devices.iter().enumerate() {
            let slot = u8::try_from(i + 1).map_err(|_| Error::Layout("too many devices".into()))?;
            let what = arg.name();
            let dev_err = |source| Error::Device {
                source: Box::new(source),
                what: what.clone(),
            };
            let pin = intx_pin(slot);
            let interrupts = KvmInterruptManager::new(routing.clone(), msi_gsis(slot))
                .map_err(dev_err)?
                .with_intx(IntxLine::ioapic(u32::from(pin), u32::from(pin)));
            let attach_start = Instant::now();
            let builder = match arg {
                DeviceArg::Host(path) => DeviceBuilder::host(&host_iommu, path),
                DeviceArg::User(path) => DeviceBuilder::vfio_user(path),
            };
            let device: PassthroughDevice = builder
                .interrupts(Arc::new(interrupts))
                .mapper(mapper.clone() as Arc<dyn GuestMapper>)
                .allocator(allocator.clone())
                .guest_dma(dma.clone())
                .build()
                .map_err(dev_err)?;
            if let Some(k) = device.kernel_device() {
                if kvm_vfio.is_none() {
                    kvm_vfio = Some(KvmVfioDevice::new(&vm).map_err(dev_err)?);
                }
                if let Some(kv) = &kvm_vfio {
                    // The group file (legacy; once for all the devices of a group), else the
                    // device's cdev (iommufd).
                    if let Err(e) = kv.add_device(k) {
                        log::warn!("{what}: not known to the KVM-VFIO device: {e}");
                    }
                }
            }
            let device: Arc<VfioPciDevice> = Arc::new(device.into_device());
            let ids = device.read_config_register(0);
            let bdf = pci
                .add(device.clone())
                .ok_or_else(|| Error::Layout("PCI bus full".into()))?;
            eprintln!(
                "vmm: 00:{bdf:02x}.0 <- {what} [{:04x}:{:04x}]",
                ids & 0xffff,
                ids >> 16
            );
            log::debug!(
                "00:{bdf:02x}.0 attached in {} ms",
                attach_start.elapsed().as_millis()
            );
            for b in device.bars() {
                log::debug!(
                    "00:{bdf:02x}.0 {}: {:#x}+{:#x}, {} bytes trapped, mapped {:x?}",
                    b.index,
                    b.base.unwrap_or(0),
                    b.guest_size,
                    b.trapped_bytes(),
                    b.mapped
                );
            }
            wiring.push(mptable::PciIntx {
                device: bdf,
                ioapic_pin: pin,
            });
        }

        if let Some(mode) = host_iommu.mode() {
            eprintln!(
                "vmm: host IOMMU: {mode}, {} host devices in one domain",
                host_iommu.device_count()
            );
        }
        log::debug!(
            "devices attached {} ms after start",
            started.elapsed().as_millis()
        );
        // The MP table, now that the devices' INTx wiring is known.
        let mp = mptable::build(MPTABLE_ADDR as u32, config.cpus, &wiring)?;
        if mp.len() as u64 > MPTABLE_END - MPTABLE_ADDR {
            return Err(Error::Layout(format!("MP table of {} bytes", mp.len())));
        }
        vm_memory::Bytes::write_slice(&mem, &mp, GuestAddress(MPTABLE_ADDR))
            .map_err(|e| Error::Memory(format!("writing the MP table: {e}")))?;

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..config.cpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let mut cpuid = supported.clone();
            fix_cpuid(&mut cpuid, id, config.cpus);
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
            set_lint(&vcpu)?;
            if id == 0 {
                let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                vcpu.set_sregs(&boot::long_mode_sregs(sregs))
                    .map_err(kvm_err("KVM_SET_SREGS"))?;
                vcpu.set_regs(&boot::boot_regs(loaded.entry))
                    .map_err(kvm_err("KVM_SET_REGS"))?;
                let fpu = kvm_fpu {
                    fcw: 0x37f,
                    mxcsr: 0x1f80,
                    ..Default::default()
                };
                vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
            }
            vcpus.push(vcpu);
        }
        Ok(Vmm {
            vm,
            vcpus,
            bus: Arc::new(Bus::new(
                pci,
                serial_trigger,
                Box::new(LineConsole(std::io::stdout())),
            )),
            _mem: mem,
            _routing: routing,
            _serial_irq: serial_irq,
            _kvm_vfio: kvm_vfio,
            _host_iommu: host_iommu,
            _mapper: mapper,
        })
    }

    /// The bus the vCPUs' exits go to.
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// The VM.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Runs the vCPUs until one stops the machine; returns why.
    pub fn run(mut self, started: Instant) -> Stop {
        let (tx, rx) = channel();
        for (id, vcpu) in self.vcpus.drain(..).enumerate() {
            let bus = self.bus.clone();
            let tx: Sender<Stop> = tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let stop = run_vcpu(id, vcpu, &bus);
                    let _ = tx.send(stop);
                });
            if let Err(source) = spawned {
                return Stop::Failed(Error::Os {
                    op: "spawning a vCPU thread",
                    source,
                });
            }
        }
        log::debug!(
            "vCPUs running {} ms after start",
            started.elapsed().as_millis()
        );
        drop(tx);
        let stop = rx.recv().unwrap_or_else(|_| {
            Stop::Failed(Error::Guest {
                cpu: 0,
                what: "every vCPU thread ended without a reason".into(),
            })
        });
        let _ = std::io::stdout().flush();
        // The other vCPUs are left in KVM_RUN: the process ends next, and with it the VM;
        // the kernel releases the devices' VFIO files (and resets them) then.
        stop
    }
}

/// The vCPU exit loop.
fn run_vcpu(id: usize, mut vcpu: VcpuFd, bus: &Bus) -> Stop {
    loop {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Stop::Failed(kvm_err("KVM_RUN")(e)),
        };
        let stop = match exit {
            VcpuExit::IoIn(port, data) => {
                bus.pio_read(port, data);
                None
            }
            VcpuExit::IoOut(port, data) => bus.pio_write(port, data),
            VcpuExit::MmioRead(addr, data) => {
                bus.mmio_read(addr, data);
                None
            }
            VcpuExit::MmioWrite(addr, data) => bus.mmio_write(addr, data),
            VcpuExit::Shutdown => Some(Stop::Reset(format!(
                "vCPU {id} shut down (KVM_EXIT_SHUTDOWN: a triple fault, e.g. reboot=t)"
            ))),
            VcpuExit::SystemEvent(kind, _) => {
                Some(Stop::Reset(format!("vCPU {id}: system event {kind}")))
            }
            VcpuExit::Hlt => Some(Stop::Failed(Error::Guest {
                cpu: id,
                what: "HLT exit: the in-kernel irqchip should have kept it".into(),
            })),
            VcpuExit::FailEntry(reason, cpu) => Some(Stop::Failed(Error::Guest {
                cpu: id,
                what: format!("KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on CPU {cpu}"),
            })),
            VcpuExit::InternalError => Some(Stop::Failed(Error::Guest {
                cpu: id,
                what: "KVM_EXIT_INTERNAL_ERROR".into(),
            })),
            other => Some(Stop::Failed(Error::Guest {
                cpu: id,
                what: format!("unhandled exit {other:?}"),
            })),
        };
        if let Some(stop) = stop {
            if matches!(stop, Stop::Failed(_)) {
                if let Ok(regs) = vcpu.get_regs() {
                    log::error!("vCPU {id}: rip {:#x} rsp {:#x}", regs.rip, regs.rsp);
                }
            }
            return stop;
        }
    }
}

/// The per-vCPU CPUID fix-ups: the hypervisor bit, the APIC id in leaves 1, 0xB, 0x1F and 0x8000001E, and the
/// logical processor count in leaf 1.
fn fix_cpuid(cpuid: &mut CpuId, id: u8, cpus: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                // A hypervisor is present: Linux then looks for KVM's leaves (kvmclock,
                // paravirtual EOI, ...) instead of calibrating against absent timers.
                e.ecx |= 1 << 31;
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count above is meaningful
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            0x8000_001e => e.eax = u32::from(id),
            _ => {}
        }
    }
}

/// LINT0 as ExtINT (the PIC's output) and LINT1 as NMI, as firmware leaves them.
fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const EXTINT: u32 = 0x7 << 8;
    const NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(LVT_LINT0, EXTINT), (LVT_LINT1, NMI)] {
        let Some(bytes) = lapic.regs.get_mut(reg..reg + 4) else {
            continue;
        };
        let mut v = [0u8; 4];
        for (d, s) in v.iter_mut().zip(bytes.iter()) {
            *d = *s as u8;
        }
        let v = (u32::from_le_bytes(v) & !0x700) | mode;
        for (d, s) in bytes.iter_mut().zip(v.to_le_bytes()) {
            *d = s as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))
}
