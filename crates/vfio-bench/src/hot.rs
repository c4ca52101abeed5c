//! The hot paths of the benchmark's summary table, shared by the benchmark
//! (`benches/vfio.rs`) and the instruction-count driver
//! (`examples/hot_loop.rs`, for `valgrind --tool=callgrind` or
//! `perf stat -e instructions`, which stay repeatable on a loaded machine).
//!
//! Each operation carries its goal: the time Cloud Hypervisor's `pci` crate
//! took for the same operation, measured side by side in one process on
//! this machine (issue 15: nvme-like config space, no-op interrupt groups).
//! Two fixtures run them: [`Hot`], an nvme-like fake device attached
//! in-process with MSI-X enabled (the device entry points `read_config`,
//! `write_config`, `read_bar`, `write_bar`), and [`Bare`], the config-space
//! and MSI-X models alone (`pci-config`, `pci-interrupts`).

use std::cell::{Cell, RefCell};
use std::hint::black_box;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use pci_config::{regs, BarKind, ConfigSpace, WriteEffects};
use pci_interrupts::{InterruptSourceGroup, MsiRoute, MsixState};
use vfio_backend::{region, Vfio};
use vfio_fake_device::{nvme_like, FakeDevice};
use vfio_pci::VfioPciDevice;

use crate::devices::profile;
use crate::guest::{cap_id, enable_device, enable_msix_all, find_cap, MSIX_ENTRY};
use crate::vmm::Vm;
use crate::{Error, Result};

/// One guest operation of the hot-path table.
pub type GuestOp<'a> = Box<dyn Fn() + 'a>;

/// A named hot-path operation and its goal in ns (Cloud Hypervisor's time
/// for the same operation), if it has one.
pub struct HotOp<'a> {
    /// Name in the summary table.
    pub name: &'static str,
    /// Goal in ns per operation.
    pub goal_ns: Option<f64>,
    /// Device-lock round trips the operation takes (one per device entry
    /// point call that takes the lock; a passed-through read takes none).
    pub locks: u32,
    /// One operation.
    pub op: GuestOp<'a>,
}

fn hot_op<'a>(
    name: &'static str,
    goal_ns: Option<f64>,
    locks: u32,
    op: impl Fn() + 'a,
) -> HotOp<'a> {
    HotOp {
        name,
        goal_ns,
        locks,
        op: Box::new(op),
    }
}

/// The MSI-X vector the table writes target (unmasked, MSI-X enabled).
const VECTOR: u64 = 3;
/// Two message data values the writes alternate between, so that every
/// write changes the vector's route and reaches the interrupt group.
const DATA: [u32; 2] = [0x43, 0x44];

/// An nvme-like device attached in-process (config reads mirrored, see
/// [`MirrorVfio`]), memory decoding and MSI-X enabled, every vector
/// unmasked.
pub struct Hot {
    _vm: Vm,
    _fake: Arc<FakeDevice>,
    dev: VfioPciDevice,
    pcie: u64,
    table: u64,
    flip: Cell<usize>,
}

impl Hot {
    /// Attaches the device and enables it.
    pub fn new() -> Result<Hot> {
        let fake = profile("nvme-like")?;
        let vm = Vm::new()?;
        let dev = vm.attach(Arc::new(MirrorVfio::new(fake.clone())?))?;
        enable_device(&dev)?;
        let (_, bar, table) =
            enable_msix_all(&dev).ok_or_else(|| Error::Missing("MSI-X".into()))?;
        if bar != 0 {
            return Err(Error::Missing("MSI-X table in BAR 0".into()));
        }
        let pcie =
            find_cap(&dev, cap_id::PCI_EXPRESS).ok_or_else(|| Error::Missing("PCIe cap".into()))?;
        Ok(Hot {
            _vm: vm,
            _fake: fake,
            dev,
            pcie,
            table,
            flip: Cell::new(0),
        })
    }

    /// The next message data value (alternating).
    fn data(&self) -> [u8; 4] {
        let i = self.flip.get() ^ 1;
        self.flip.set(i);
        DATA.get(i).copied().unwrap_or(0).to_le_bytes()
    }

    /// The device-level operations, by name.
    pub fn ops(&self) -> Vec<HotOp<'_>> {
        let d = &self.dev;
        let (pcie, table) = (self.pcie, self.table);
        let entry = table + VECTOR * MSIX_ENTRY;
        let bar0 = regs::BAR0 as u64;
        vec![
            hot_op("emulated config read", Some(25.0), 1, move || {
                let mut b = [0u8; 4];
                d.read_config(black_box(0), &mut b);
                black_box(b);
            }),
            hot_op("passed-through config read", Some(25.1), 0, move || {
                let mut b = [0u8; 4];
                d.read_config(black_box(pcie + 8), &mut b);
                black_box(b);
            }),
            hot_op(
                "BAR sizing: write ones, read back",
                Some(30.9),
                2,
                move || {
                    let _ = d.write_config(black_box(bar0), &u32::MAX.to_le_bytes());
                    let mut b = [0u8; 4];
                    d.read_config(black_box(bar0), &mut b);
                    black_box(b);
                },
            ),
            hot_op(
                "MSI-X table write (message data)",
                Some(20.7),
                1,
                move || {
                    // Message data of unmasked vector 3: the route changes.
                    let _ = d.write_bar(
                        vfio_pci::BarIndex::Bar(0),
                        black_box(entry + 8),
                        &self.data(),
                    );
                },
            ),
            hot_op("MSI-X mask + data + unmask", Some(54.3), 3, move || {
                let _ = d.write_bar(
                    vfio_pci::BarIndex::Bar(0),
                    black_box(entry + 12),
                    &1u32.to_le_bytes(),
                );
                let _ = d.write_bar(
                    vfio_pci::BarIndex::Bar(0),
                    black_box(entry + 8),
                    &self.data(),
                );
                let _ = d.write_bar(
                    vfio_pci::BarIndex::Bar(0),
                    black_box(entry + 12),
                    &0u32.to_le_bytes(),
                );
            }),
            hot_op(
                "(reference) the fake's own config read",
                None,
                0,
                move || {
                    // What a passed-through read would add with the fake device
                    // itself as backend: its lock and counters.
                    let mut b = [0u8; 4];
                    let _ = self
                        ._fake
                        .region_read(region::CONFIG, black_box(pcie + 8), &mut b);
                    black_box(b);
                },
            ),
            hot_op("trapped BAR read", None, 1, move || {
                let mut b = [0u8; 4];
                d.read_bar(vfio_pci::BarIndex::Bar(0), black_box(nvme_like::VS), &mut b);
                black_box(b);
            }),
            hot_op("trapped BAR write", None, 1, move || {
                let _ = d.write_bar(
                    vfio_pci::BarIndex::Bar(0),
                    black_box(0x14),
                    &1u32.to_le_bytes(),
                );
            }),
        ]
    }
}

/// An interrupt group that does nothing: what the bare-model comparison
/// with Cloud Hypervisor used on both sides.
#[derive(Debug)]
pub struct NoopGroup(pub u32);

impl InterruptSourceGroup for NoopGroup {
    fn len(&self) -> u32 {
        self.0
    }
    fn notifier(&self, _vector: u32) -> Option<BorrowedFd<'_>> {
        None
    }
    fn update(&self, _vector: u32, _route: MsiRoute, _masked: bool) -> pci_interrupts::Result<()> {
        Ok(())
    }
    fn enable(&self) -> pci_interrupts::Result<()> {
        Ok(())
    }
    fn disable(&self) -> pci_interrupts::Result<()> {
        Ok(())
    }
    fn trigger(&self, _vector: u32) -> pci_interrupts::Result<()> {
        Ok(())
    }
}

/// Vectors of the bare MSI-X model.
const BARE_VECTORS: u32 = 32;

/// The bare models: a config space with an nvme-like 64-bit BAR 0 (16 KiB,
/// placed, memory decoding on) and an MSI-X capability of 32 vectors,
/// enabled, every vector unmasked, bound to a [`NoopGroup`].
pub struct Bare {
    config: RefCell<ConfigSpace>,
    msix: RefCell<MsixState>,
    flip: Cell<usize>,
    lock: Mutex<u32>,
}

impl Bare {
    /// Builds both models.
    pub fn new() -> Result<Bare> {
        let mut config = ConfigSpace::new();
        config.set_vendor_id(nvme_like::VENDOR_ID);
        config
            .declare_bar(
                0,
                BarKind::Memory64 {
                    prefetchable: false,
                },
                0x4000,
            )
            .map_err(|e| Error::Missing(format!("BAR 0: {e}")))?;
        config
            .set_bar_address(0, 0x1_0000_0000)
            .map_err(|e| Error::Missing(format!("BAR 0 address: {e}")))?;
        config
            .write_u16(regs::COMMAND, regs::COMMAND_MEMORY_SPACE)
            .map_err(|e| Error::Missing(format!("command: {e}")))?;
        let mut msix = MsixState::new(BARE_VECTORS, 0, 0x2000, 0, 0x3000)?;
        msix.set_group(Some(Arc::new(NoopGroup(BARE_VECTORS))))?;
        for v in 0..u64::from(BARE_VECTORS) {
            let e = v * MSIX_ENTRY;
            msix.table_write(e, &0xfee0_0000u32.to_le_bytes())?;
            msix.table_write(e + 8, &(0x20 + v as u32).to_le_bytes())?;
            msix.table_write(e + 12, &0u32.to_le_bytes())?;
        }
        // Message control: MSI-X enable.
        msix.write(2, &0x8000u16.to_le_bytes())?;
        Ok(Bare {
            config: RefCell::new(config),
            msix: RefCell::new(msix),
            flip: Cell::new(0),
            lock: Mutex::new(0),
        })
    }

    /// The bare-model operations, by name.
    pub fn ops(&self) -> Vec<HotOp<'_>> {
        vec![
            hot_op("bare config space: BAR sizing", Some(9.6), 0, move || {
                let mut c = self.config.borrow_mut();
                // What a VMM does with the effects: look at each one.
                let mut fx = WriteEffects::new();
                let ones = u32::MAX.to_le_bytes();
                if c.write_into(black_box(regs::BAR0), &ones, &mut fx).is_ok() {
                    for e in &fx {
                        black_box(e);
                    }
                }
                black_box(c.read_u32(black_box(regs::BAR0)).ok());
            }),
            hot_op("(reference) std Mutex lock + unlock", None, 1, move || {
                // What one device-lock round trip costs on this machine: every
                // device entry point takes the device lock once.
                black_box(*self.lock.lock().unwrap_or_else(|e| e.into_inner()));
            }),
            hot_op("bare MSI-X: table data write", Some(9.0), 0, move || {
                let i = self.flip.get() ^ 1;
                self.flip.set(i);
                let data = DATA.get(i).copied().unwrap_or(0);
                let _ = self
                    .msix
                    .borrow_mut()
                    .table_write(black_box(VECTOR * MSIX_ENTRY + 8), &data.to_le_bytes());
            }),
        ]
    }
}

/// The fake device with its config space mirrored in memory: config reads
/// are served from a snapshot taken at creation, without the fake's lock
/// and counters; everything else goes to the fake. The in-memory backend the
/// Cloud Hypervisor comparison of issue 15 gave both sides, so that the
/// passed-through read measures the device model, not the mock.
pub struct MirrorVfio {
    fake: Arc<FakeDevice>,
    config: Box<[u8; pci_config::CONFIG_SPACE_SIZE]>,
}

impl MirrorVfio {
    /// Snapshots the fake's config space.
    pub fn new(fake: Arc<FakeDevice>) -> Result<MirrorVfio> {
        let mut config = Box::new([0u8; pci_config::CONFIG_SPACE_SIZE]);
        fake.region_read(region::CONFIG, 0, &mut config[..])?;
        Ok(MirrorVfio { fake, config })
    }
}

impl Vfio for MirrorVfio {
    fn device_info(&self) -> vfio_backend::Result<vfio_backend::DeviceInfo> {
        self.fake.device_info()
    }
    fn region_info(&self, index: u32) -> vfio_backend::Result<vfio_backend::RegionInfo> {
        self.fake.region_info(index)
    }
    fn region_read(&self, index: u32, offset: u64, data: &mut [u8]) -> vfio_backend::Result<()> {
        if index != region::CONFIG {
            return self.fake.region_read(index, offset, data);
        }
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.config.get(o..o.checked_add(data.len())?));
        match src {
            Some(src) => {
                data.copy_from_slice(src);
                Ok(())
            }
            None => self.fake.region_read(index, offset, data),
        }
    }
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> vfio_backend::Result<()> {
        self.fake.region_write(index, offset, data)
    }
    fn mmap_region(
        &self,
        index: u32,
        area: vfio_backend::SparseArea,
    ) -> vfio_backend::Result<vfio_backend::Mapping> {
        self.fake.mmap_region(index, area)
    }
    fn irq_info(&self, index: u32) -> vfio_backend::Result<vfio_backend::IrqInfo> {
        self.fake.irq_info(index)
    }
    fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        fds: &[Option<BorrowedFd<'_>>],
    ) -> vfio_backend::Result<()> {
        self.fake.set_irq_eventfds(index, start, fds)
    }
    fn disable_irqs(&self, index: u32) -> vfio_backend::Result<()> {
        self.fake.disable_irqs(index)
    }
    fn unmask_irq(&self, index: u32) -> vfio_backend::Result<()> {
        self.fake.unmask_irq(index)
    }
    fn mask_irq(&self, index: u32) -> vfio_backend::Result<()> {
        self.fake.mask_irq(index)
    }
    fn set_irq_unmask_eventfd(
        &self,
        index: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> vfio_backend::Result<()> {
        self.fake.set_irq_unmask_eventfd(index, fd)
    }
    fn reset(&self) -> vfio_backend::Result<()> {
        self.fake.reset()
    }
    fn iommu_domain(&self) -> Arc<dyn vfio_backend::IommuDomain> {
        self.fake.iommu_domain()
    }
    fn region_mmap_fd(&self, index: u32) -> Option<(BorrowedFd<'_>, u64)> {
        self.fake.region_mmap_fd(index)
    }

    fn migration_flags(&self) -> vfio_backend::Result<Option<vfio_backend::MigrationFlags>> {
        self.fake.migration_flags()
    }

    fn mig_state(&self) -> vfio_backend::Result<vfio_backend::MigState> {
        self.fake.mig_state()
    }

    fn set_mig_state(
        &self,
        state: vfio_backend::MigState,
    ) -> vfio_backend::Result<Option<Box<dyn vfio_backend::MigrationStream>>> {
        self.fake.set_mig_state(state)
    }

    fn mig_data_size(&self) -> vfio_backend::Result<u64> {
        self.fake.mig_data_size()
    }

    fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[vfio_backend::DirtyRange],
    ) -> vfio_backend::Result<()> {
        self.fake.dma_logging_start(page_size, ranges)
    }

    fn dma_logging_stop(&self) -> vfio_backend::Result<()> {
        self.fake.dma_logging_stop()
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> vfio_backend::Result<()> {
        self.fake
            .dma_logging_report(iova, length, page_size, bitmap)
    }
}
