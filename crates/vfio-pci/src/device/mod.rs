//! `VfioPciDevice`: the PCI function the VMM puts on its bus.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use pci_bar_alloc::{BarAllocator, BarPlacement, BarRequest};
use pci_config::{BarKind, ConfigSpace, ROM_BAR};
use pci_interrupts::{InterruptManager, InterruptSourceGroup, IntxState, MsiState, MsixState};
use serde::{Deserialize, Serialize};
use vfio_backend::{DomainId, Mapping, RegionInfo, Vfio};

use crate::dma::{DmaMode, GuestDma};
use crate::layout::{BarLayout, MappedArea, MsixPiece, MsixRelocation};
use crate::mapper::{GuestMapper, MappingId};
use crate::outcome::{AddressSpace, BarIndex, BarRange, SLOTS};
use crate::{Error, Result};
use placement::DecodeScope;

mod access;
mod irqs;
mod migrate;
mod pending;
mod placement;
mod plan;
mod snapshot;

pub use migrate::{LoadedMigration, MigrationCaps, MigrationSource, PRECOPY_ROUND_MAX};
pub use snapshot::{DeviceSnapshot, DeviceState, DEVICE_SNAPSHOT_VERSION};

/// Size of PCI Express configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
const DWORDS: usize = CONFIG_SPACE_SIZE / 4;

/// What the VMM lends the device: interrupt delivery, guest mappings, the
/// BAR windows and guest RAM for DMA (the last two shared with the VMM's
/// other devices).
///
/// # Locks
///
/// A device has two locks of its own: the interrupt wiring lock, which serializes
/// changes of what VFIO signals (`SET_IRQS`), and the device lock over its guest-visible
/// state. The order is: wiring, then device, then the shared [`allocator`](Self::allocator);
/// the interrupt groups' own locks (taken by [`InterruptSourceGroup`] calls) come last and
/// are never held while taking any of these. No device lock is held across a backend call
/// that can block (a forwarded config or BAR access, `SET_IRQS`, a reset): a vfio-user
/// reply may take up to its timeout, and vCPUs touching the device's MSI-X table or
/// emulated registers meanwhile must not wait. The wiring lock may be held across
/// `SET_IRQS`; only interrupt rewiring, reset and restore take it. The `mapper` is called
/// under the device lock (KVM memory slot changes do not wait on a peer). The lock inside
/// [`GuestDma`] is outside that order: it is taken with none of them held (when a device
/// attaches or goes, and by the VMM's own calls) and takes none of them.
#[derive(Clone)]
pub struct DeviceResources {
    /// Creates the MSI, MSI-X and INTx groups (KVM: irqfds and GSI routes).
    pub interrupts: Arc<dyn InterruptManager>,
    /// Maps BAR memory into the guest (KVM: user memory slots).
    pub mapper: Arc<dyn GuestMapper>,
    /// The VMM's BAR windows; shared with its other devices so that no two
    /// BARs overlap.
    pub allocator: Arc<Mutex<BarAllocator>>,
    /// Guest RAM for DMA and the live IOMMU domains, shared by all the
    /// VMM's devices: a device attaches to its backend's domain when made
    /// (the first device of a domain maps guest RAM there) and detaches
    /// when dropped (the last one unmaps it).
    pub dma: Arc<GuestDma>,
}

/// Why a capability is hidden from the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HiddenCapability {
    /// Capability id (standard: 8 bits; extended: 16 bits).
    pub id: u16,
    /// An extended (PCIe, 0x100+) capability.
    pub extended: bool,
    /// Offset of its header in config space.
    pub offset: u16,
    /// Why it is hidden.
    pub reason: String,
}

/// A capability the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptCapability {
    /// Capability id.
    pub id: u16,
    /// An extended (PCIe, 0x100+) capability.
    pub extended: bool,
    /// Offset of its header in config space.
    pub offset: u16,
    /// Emulated by this crate (MSI, MSI-X) rather than passed through.
    pub emulated: bool,
}

/// Options for attaching a device: `DeviceOptions::default()` and the
/// `with_*` methods (the struct may gain fields).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeviceOptions {
    /// Standard capability ids to hide, beyond the default policy.
    pub hide_capabilities: Vec<u8>,
    /// Extended capability ids to hide, beyond the default policy (SR-IOV,
    /// ARI, MR-IOV, resizable BAR and VF resizable BAR are always hidden).
    pub hide_extended_capabilities: Vec<u16>,
    /// The host page size; `None` asks the OS.
    pub page_size: Option<u64>,
    /// When the MSI-X table is moved out of the way of mapped memory.
    pub msix_relocation: MsixRelocation,
    /// How guest memory reaches the device's DMA. Every device of one IOMMU
    /// domain must use the same mode.
    pub dma_mode: DmaMode,
}

impl Default for DeviceOptions {
    fn default() -> Self {
        DeviceOptions {
            hide_capabilities: Vec::new(),
            hide_extended_capabilities: Vec::new(),
            page_size: None,
            msix_relocation: MsixRelocation::Auto,
            dma_mode: DmaMode::GuestPhysical,
        }
    }
}

impl DeviceOptions {
    /// Also hides the standard capabilities with these ids.
    pub fn with_hidden_capabilities(mut self, ids: impl Into<Vec<u8>>) -> Self {
        self.hide_capabilities = ids.into();
        self
    }

    /// Also hides the extended capabilities with these ids.
    pub fn with_hidden_extended_capabilities(mut self, ids: impl Into<Vec<u16>>) -> Self {
        self.hide_extended_capabilities = ids.into();
        self
    }

    /// The host page size (a power of two), instead of asking the OS.
    pub fn with_page_size(mut self, page_size: u64) -> Self {
        self.page_size = Some(page_size);
        self
    }

    /// When the MSI-X table is moved out of the way of mapped memory.
    pub fn with_msix_relocation(mut self, relocation: MsixRelocation) -> Self {
        self.msix_relocation = relocation;
        self
    }

    /// How guest memory reaches the device's DMA.
    pub fn with_dma_mode(mut self, mode: DmaMode) -> Self {
        self.dma_mode = mode;
        self
    }
}

/// Which interrupt the device signals through VFIO right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IrqMode {
    /// No interrupt registered.
    None,
    /// Legacy INTx (trigger and resample eventfds registered).
    Intx,
    /// MSI with this many vectors.
    Msi(u32),
    /// MSI-X with every vector of the table registered.
    Msix,
}

/// How one dword of config space is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dword {
    /// Served from the emulated config space.
    Emulated,
    /// Forwarded to the device's config region.
    Passthrough,
    /// Command and status: forwarded, and tracked for decode changes.
    Command,
    /// Part of the emulated MSI capability.
    Msi,
    /// Part of the emulated MSI-X capability.
    Msix,
}

/// One BAR as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BarView {
    /// Which BAR (or the expansion ROM).
    pub index: BarIndex,
    /// Memory or I/O, 32 or 64 bits, prefetchable.
    pub kind: BarKind,
    /// Size of the device's region.
    pub region_size: u64,
    /// Size the guest sees.
    pub guest_size: u64,
    /// Guest address (or port) of the BAR, if placed.
    pub base: Option<u64>,
    /// Ranges mapped into the guest, as (guest address, length).
    pub mapped: Vec<(u64, u64)>,
    /// The emulated MSI-X table, as (guest address, length), if in this BAR.
    pub msix_table: Option<(u64, u64)>,
    /// The emulated PBA, as (guest address, length), if in this BAR.
    pub msix_pba: Option<(u64, u64)>,
    /// The MSI-X table and PBA were relocated into an enlarged BAR.
    pub msix_relocated: bool,
    /// The BAR decodes at `base`: its register holds that address. False while the register
    /// holds an address the VMM refused (a sizing pattern, outside the windows, on another
    /// BAR) or one not yet applied: the BAR then decodes nowhere (nothing mapped, its
    /// trapped range not served) and `base` is only the range the VMM keeps reserved for it.
    pub decoding: bool,
}

impl BarView {
    /// The address space the BAR decodes in.
    pub fn space(&self) -> AddressSpace {
        AddressSpace::of(self.kind)
    }

    /// Bytes of the BAR that trap to `read_bar` / `write_bar`.
    pub fn trapped_bytes(&self) -> u64 {
        let mapped: u64 = self.mapped.iter().map(|m| m.1).sum();
        self.guest_size.saturating_sub(mapped)
    }
}

/// A host mapping of part of a BAR and, when the VMM mapped it, its guest mapping.
struct HostMap {
    area: MappedArea,
    mapping: Mapping,
    guest: Option<MappingId>,
}

struct Bar {
    index: BarIndex,
    kind: BarKind,
    region: RegionInfo,
    layout: BarLayout,
    placement: Option<BarPlacement>,
    maps: Vec<HostMap>,
    /// Whether the BAR decodes at its placement: mapped into the guest, its trapped range
    /// served, found by [`VfioPciDevice::bar_at`]. True only while the BAR register holds
    /// the placement's address (see [`VfioPciDevice::sync_decode`]).
    decoding: bool,
}

struct MsiCtx {
    offset: usize,
    state: MsiState,
    group: Arc<dyn InterruptSourceGroup>,
}

struct MsixCtx {
    offset: usize,
    state: MsixState,
    group: Arc<dyn InterruptSourceGroup>,
    /// (BAR index, guest-side location) of the table.
    table: (usize, MsixPiece),
    /// (BAR index, guest-side location) of the PBA.
    pba: (usize, MsixPiece),
}

struct IntxCtx {
    state: IntxState,
    group: Arc<dyn InterruptSourceGroup>,
}

struct Inner {
    config: ConfigSpace,
    bars: [Option<Bar>; 6],
    rom: Option<Bar>,
    msi: Option<MsiCtx>,
    msix: Option<MsixCtx>,
    intx: Option<IntxCtx>,
    irq_mode: IrqMode,
}

impl Inner {
    /// The BAR at `index` (a [`BarIndex::slot`]: 0..=5, or the ROM at [`ROM_BAR`]).
    fn bar(&self, index: usize) -> Option<&Bar> {
        if index == ROM_BAR {
            self.rom.as_ref()
        } else {
            self.bars.get(index).and_then(|b| b.as_ref())
        }
    }

    /// The BAR at slot `index`, to change.
    fn bar_mut(&mut self, index: usize) -> Option<&mut Bar> {
        if index == ROM_BAR {
            self.rom.as_mut()
        } else {
            self.bars.get_mut(index).and_then(|b| b.as_mut())
        }
    }

    /// The slot of the BAR that BAR register `reg` (0..=5) belongs to: its own, or the
    /// one below for the upper half of a 64-bit BAR. `None` for a register no BAR owns.
    fn bar_owning_register(&self, reg: usize) -> Option<usize> {
        if self.bars.get(reg).is_some_and(|b| b.is_some()) {
            return Some(reg);
        }
        let below = reg.checked_sub(1)?;
        self.bars
            .get(below)
            .and_then(|b| b.as_ref())
            .filter(|b| b.kind.is_64bit())
            .map(|_| below)
    }

    /// Where each BAR decodes now, by slot: what a config write's outcome compares.
    fn decoded(&self) -> [Option<BarRange>; SLOTS] {
        let mut out = [None; SLOTS];
        self.decoded_into(DecodeScope::All, &mut out);
        out
    }

    /// As [`decoded`](Self::decoded), into `out`, for the slots `scope` covers (the
    /// others are left as they are).
    fn decoded_into(&self, scope: DecodeScope, out: &mut [Option<BarRange>; SLOTS]) {
        match scope {
            DecodeScope::One(slot) => {
                if let Some(o) = out.get_mut(slot) {
                    *o = self.bar(slot).and_then(Bar::decoded);
                }
            }
            DecodeScope::All => {
                for (slot, o) in out.iter_mut().enumerate() {
                    *o = self.bar(slot).and_then(Bar::decoded);
                }
            }
        }
    }
}

impl Bar {
    /// A BAR as planned: not yet placed, mapped or decoding.
    fn new(index: BarIndex, kind: BarKind, region: RegionInfo, layout: BarLayout) -> Self {
        Bar {
            index,
            kind,
            region,
            layout,
            placement: None,
            maps: Vec::new(),
            decoding: false,
        }
    }

    /// The range the BAR decodes at, or `None` (decodes nowhere).
    fn decoded(&self) -> Option<BarRange> {
        if !self.decoding {
            return None;
        }
        self.placement.map(|p| BarRange {
            base: p.base,
            size: self.layout.guest_size,
        })
    }
}

/// A host PCI function presented to the guest.
///
/// Built from any [`Vfio`] backend. The guest's config accesses go to
/// [`read_config`](Self::read_config) / [`write_config`](Self::write_config);
/// its accesses to trapped BAR ranges (see [`bars`](Self::bars)) go to
/// [`read_bar`](Self::read_bar) / [`write_bar`](Self::write_bar). The rest of
/// each memory BAR is device memory mapped into the guest.
///
/// Dropping the device releases everything: guest mappings, host mappings,
/// interrupts, DMA mappings and BAR placements.
pub struct VfioPciDevice {
    vfio: Arc<dyn Vfio>,
    resources: DeviceResources,
    dma_domain: DomainId,
    policy: Box<[Dword; DWORDS]>,
    config_size: usize,
    kept: Vec<KeptCapability>,
    hidden: Vec<HiddenCapability>,
    /// Serializes changes of VFIO's interrupt wiring (see `irqs.rs`); taken before the
    /// device lock, never under it, and held across the `SET_IRQS` calls, which the device
    /// lock never is.
    wiring: Mutex<()>,
    inner: Mutex<Inner>,
    /// A migration (a [`MigrationSource`] or a resume) is under way.
    migrating: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for VfioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPciDevice")
            .field("config_size", &self.config_size)
            .field("kept", &self.kept)
            .field("hidden", &self.hidden)
            .finish()
    }
}

fn request_for(kind: BarKind, size: u64, mmappable: bool) -> BarRequest {
    let (k, prefetchable) = match kind {
        BarKind::Io => (pci_bar_alloc::BarKind::Io, false),
        BarKind::Memory32 { prefetchable } => (pci_bar_alloc::BarKind::Mem32, prefetchable),
        BarKind::Memory64 { prefetchable } => (pci_bar_alloc::BarKind::Mem64, prefetchable),
    };
    BarRequest::new(k, size)
        .with_prefetchable(prefetchable)
        .with_mmappable(mmappable)
}

fn lock<'a, T>(m: &'a Mutex<T>, what: &'static str) -> Result<MutexGuard<'a, T>> {
    m.lock().map_err(|_| Error::Poisoned { what })
}

impl VfioPciDevice {
    /// Attaches `vfio` as a PCI function: reads its config space and
    /// regions, decides what the guest sees, places and maps its BARs, and
    /// creates its interrupt groups. The device starts with INTx wired (when
    /// it has one) and nothing else enabled.
    ///
    /// Attach is a pipeline: the reads first (device info, config space, region infos,
    /// the INTx count), then pure planning stages decide what the guest sees (`plan.rs`),
    /// then the interrupt groups are created and the BARs placed and mapped.
    pub fn new(
        vfio: Arc<dyn Vfio>,
        resources: DeviceResources,
        options: DeviceOptions,
    ) -> Result<Self> {
        let probe = plan::Probe::read(vfio.as_ref())?;
        let page_size = options
            .page_size
            .unwrap_or_else(pci_bar_alloc::host_page_size);
        if !page_size.is_power_of_two() {
            return Err(Error::PageSize { size: page_size });
        }
        let probe = probe.read_regions(vfio.as_ref())?;
        let mut plan = plan::AttachPlan::build(&probe, &options, page_size)?;
        let irqs = irqs::create_groups(resources.interrupts.as_ref(), &mut plan)?;
        // Joins the backend's IOMMU domain (the domain's first device maps
        // guest RAM there); dropping the device leaves it again.
        let dma_domain = resources.dma.attach(&vfio, options.dma_mode)?;
        let dev = VfioPciDevice {
            vfio,
            resources,
            dma_domain,
            policy: plan.policy,
            config_size: probe.config_size(),
            kept: plan.caps.kept,
            hidden: plan.caps.hidden,
            wiring: Mutex::new(()),
            migrating: std::sync::atomic::AtomicBool::new(false),
            inner: Mutex::new(Inner {
                config: plan.config,
                bars: plan.bars,
                rom: plan.rom,
                msi: irqs.msi,
                msix: irqs.msix,
                intx: irqs.intx,
                irq_mode: IrqMode::None,
            }),
        };
        dev.place_all(&mut *lock(&dev.inner, "device")?)?;
        dev.sync_irq_mode()?;
        Ok(dev)
    }

    /// The backend this device was built on.
    pub fn vfio(&self) -> &Arc<dyn Vfio> {
        &self.vfio
    }

    /// The VMM's guest RAM and IOMMU domains this device is attached to
    /// (its [`DeviceResources::dma`]).
    pub fn guest_dma(&self) -> &Arc<GuestDma> {
        &self.resources.dma
    }

    /// The IOMMU domain of the device's DMA (equal for the devices that
    /// share one container, IOAS or connection).
    pub fn dma_domain(&self) -> DomainId {
        self.dma_domain
    }

    /// Size of the device's own config region (256 or 4096).
    pub fn config_size(&self) -> usize {
        self.config_size
    }

    /// Capabilities the guest sees.
    pub fn kept_capabilities(&self) -> &[KeptCapability] {
        &self.kept
    }

    /// Capabilities hidden from the guest, and why.
    pub fn hidden_capabilities(&self) -> &[HiddenCapability] {
        &self.hidden
    }

    /// Which interrupt is wired through VFIO now.
    pub fn irq_mode(&self) -> IrqMode {
        self.inner
            .lock()
            .map(|i| i.irq_mode)
            .unwrap_or(IrqMode::None)
    }

    /// The MSI-X group, if the device has MSI-X.
    pub fn msix_group(&self) -> Option<Arc<dyn InterruptSourceGroup>> {
        self.inner
            .lock()
            .ok()
            .and_then(|i| i.msix.as_ref().map(|m| m.group.clone()))
    }

    /// The MSI group, if the device has MSI.
    pub fn msi_group(&self) -> Option<Arc<dyn InterruptSourceGroup>> {
        self.inner
            .lock()
            .ok()
            .and_then(|i| i.msi.as_ref().map(|m| m.group.clone()))
    }

    /// The INTx group, if the device has INTx.
    pub fn intx_group(&self) -> Option<Arc<dyn InterruptSourceGroup>> {
        self.inner
            .lock()
            .ok()
            .and_then(|i| i.intx.as_ref().map(|m| m.group.clone()))
    }

    /// Number of MSI-X vectors (0 without MSI-X).
    pub fn msix_vectors(&self) -> u32 {
        self.inner
            .lock()
            .ok()
            .and_then(|i| i.msix.as_ref().map(|m| m.state.table_size()))
            .unwrap_or(0)
    }

    /// Every BAR (then the ROM) as the guest sees it.
    pub fn bars(&self) -> Vec<BarView> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        inner
            .bars
            .iter()
            .flatten()
            .chain(inner.rom.iter())
            .map(|b| bar_view(b, &inner))
            .collect()
    }

    /// The BAR (index, offset) that decodes guest address (or port) `addr` of
    /// `space`, if any: what a VMM's bus dispatch needs.
    pub fn bar_at(&self, addr: u64, space: AddressSpace) -> Option<(BarIndex, u64)> {
        let inner = self.inner.lock().ok()?;
        inner
            .bars
            .iter()
            .flatten()
            .chain(inner.rom.iter())
            .find_map(|b| {
                if AddressSpace::of(b.kind) != space {
                    return None;
                }
                if !b.decoding {
                    return None;
                }
                let base = b.placement.as_ref()?.base;
                let off = addr.checked_sub(base)?;
                (off < b.layout.guest_size).then_some((b.index, off))
            })
    }
}

fn bar_view(b: &Bar, inner: &Inner) -> BarView {
    let base = b.placement.as_ref().map(|p| p.base);
    let at = |off: u64| base.map(|x| x.wrapping_add(off)).unwrap_or(off);
    let msix_table = inner.msix.as_ref().and_then(|m| {
        (m.table.0 == b.index.slot() && !b.index.is_rom())
            .then(|| (at(m.table.1.offset), m.table.1.len))
    });
    let msix_pba = inner.msix.as_ref().and_then(|m| {
        (m.pba.0 == b.index.slot() && !b.index.is_rom()).then(|| (at(m.pba.1.offset), m.pba.1.len))
    });
    BarView {
        index: b.index,
        kind: b.kind,
        region_size: b.region.size,
        guest_size: b.layout.guest_size,
        base,
        mapped: b
            .maps
            .iter()
            .filter(|m| m.guest.is_some())
            .map(|m| (at(m.area.offset), m.area.len))
            .collect(),
        msix_table,
        msix_pba,
        msix_relocated: b.layout.relocated,
        decoding: b.decoding,
    }
}

/// Borrowed notifiers of vectors `0..n` of a group.
fn notifiers(group: &dyn InterruptSourceGroup, n: u32) -> Vec<Option<BorrowedFd<'_>>> {
    (0..n).map(|v| group.notifier(v)).collect()
}

impl Drop for VfioPciDevice {
    /// Hot-unplug: interrupts off, guest mappings removed, host mappings
    /// unmapped, BAR placements returned, and the device detached from its
    /// IOMMU domain (the domain's last device unmaps its DMA mappings; the
    /// others keep them).
    fn drop(&mut self) {
        let inner = match self.inner.get_mut() {
            Ok(i) => i,
            Err(p) => p.into_inner(),
        };
        let mut taken = std::mem::replace(
            inner,
            Inner {
                config: ConfigSpace::new(),
                bars: Default::default(),
                rom: None,
                msi: None,
                msix: None,
                intx: None,
                irq_mode: IrqMode::None,
            },
        );
        self.disable_irq_mode(&mut taken);
        // The VMM may keep its groups: leave them delivering nothing.
        let groups = [
            taken.msi.as_ref().map(|m| m.group.clone()),
            taken.msix.as_ref().map(|m| m.group.clone()),
            taken.intx.as_ref().map(|m| m.group.clone()),
        ];
        for g in groups.into_iter().flatten() {
            if let Err(e) = g.disable() {
                log::warn!("disabling an interrupt group on unplug: {e}");
            }
        }
        self.release_all(&mut taken);
        // Before the backend (and with it, maybe, the domain) goes.
        self.resources.dma.detach(self.dma_domain, &self.vfio);
        // Host mappings unmap as `taken` drops here.
    }
}
