//! `VfioPciDevice`: the PCI function the VMM puts on its bus.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, MutexGuard};

use pci_bar_alloc::{BarAllocator, BarPlacement, BarRequest};
use pci_config::{cap_id, ext_cap_id, BarKind, ConfigSpace, ROM_BAR};
use pci_interrupts::{InterruptManager, InterruptSourceGroup, IntxState, MsiState, MsixState};
use serde::{Deserialize, Serialize};
use vfio_backend::{irq, region, Mapping, RegionInfo, SparseArea, Vfio};

use crate::dma::{DmaMapper, DmaMode};
use crate::layout::{BarLayout, MappedArea, MsixPiece, MsixRelocation};
use crate::mapper::{GuestMapper, MappingId};
use crate::outcome::{AddressSpace, BarIndex, BarRange, SLOTS};
use crate::{Error, Result};

mod access;
mod irqs;
mod placement;
mod snapshot;

pub use snapshot::{DeviceSnapshot, DeviceState, DEVICE_SNAPSHOT_VERSION};

/// Size of PCI Express configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
const DWORDS: usize = CONFIG_SPACE_SIZE / 4;

/// Smallest ROM BAR size the PCI spec allows (2 KiB).
const MIN_ROM_SIZE: u64 = 2048;

/// What the VMM lends the device: interrupt delivery, guest mappings and
/// the BAR windows (shared with the VMM's other devices).
#[derive(Clone)]
pub struct DeviceResources {
    /// Creates the MSI, MSI-X and INTx groups (KVM: irqfds and GSI routes).
    pub interrupts: Arc<dyn InterruptManager>,
    /// Maps BAR memory into the guest (KVM: user memory slots).
    pub mapper: Arc<dyn GuestMapper>,
    /// The VMM's BAR windows; shared with its other devices so that no two
    /// BARs overlap.
    pub allocator: Arc<Mutex<BarAllocator>>,
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

/// Options for attaching a device.
#[derive(Clone, Debug)]
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
    /// How guest memory reaches the device's DMA.
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

/// Extended capabilities the guest must not drive, and why.
const DEFAULT_HIDDEN_EXTENDED: &[(u16, &str)] = &[
    (
        ext_cap_id::SRIOV,
        "SR-IOV: a guest must not create virtual functions of a passed-through function",
    ),
    (
        ext_cap_id::MRIOV,
        "MR-IOV: multi-root sharing is the host's business",
    ),
    (
        ext_cap_id::ARI,
        "ARI: function numbering depends on the host's topology, not the guest's",
    ),
    (
        ext_cap_id::RESIZABLE_BAR,
        "resizable BAR: resizing would change a BAR under the VMM's placement (not virtualized yet)",
    ),
    (
        ext_cap_id::VF_RESIZABLE_BAR,
        "VF resizable BAR: belongs to SR-IOV, which is hidden",
    ),
];

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

    /// Where each BAR decodes now, by slot: what a config write's outcome compares.
    fn decoded(&self) -> [Option<BarRange>; SLOTS] {
        let mut out = [None; SLOTS];
        for (slot, o) in out.iter_mut().enumerate() {
            *o = self.bar(slot).and_then(Bar::decoded);
        }
        out
    }
}

impl Bar {
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
    dma: DmaMapper,
    policy: Box<[Dword; DWORDS]>,
    config_size: usize,
    kept: Vec<KeptCapability>,
    hidden: Vec<HiddenCapability>,
    inner: Mutex<Inner>,
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

fn bar_kind_from_register(reg: u32) -> BarKind {
    if reg & 1 != 0 {
        BarKind::Io
    } else {
        let prefetchable = reg & 0x8 != 0;
        if (reg >> 1) & 0x3 == 0x2 {
            BarKind::Memory64 { prefetchable }
        } else {
            BarKind::Memory32 { prefetchable }
        }
    }
}

fn request_for(kind: BarKind, size: u64, mmappable: bool) -> BarRequest {
    let (k, prefetchable) = match kind {
        BarKind::Io => (pci_bar_alloc::BarKind::Io, false),
        BarKind::Memory32 { prefetchable } => (pci_bar_alloc::BarKind::Mem32, prefetchable),
        BarKind::Memory64 { prefetchable } => (pci_bar_alloc::BarKind::Mem64, prefetchable),
    };
    BarRequest {
        kind: k,
        prefetchable,
        size,
        mmappable,
    }
}

fn lock<'a, T>(m: &'a Mutex<T>, what: &str) -> Result<MutexGuard<'a, T>> {
    m.lock()
        .map_err(|_| Error::InvalidArgument(format!("{what} lock poisoned by an earlier panic")))
}

impl VfioPciDevice {
    /// Attaches `vfio` as a PCI function: reads its config space and
    /// regions, decides what the guest sees, places and maps its BARs, and
    /// creates its interrupt groups. The device starts with INTx wired (when
    /// it has one) and nothing else enabled.
    pub fn new(
        vfio: Arc<dyn Vfio>,
        resources: DeviceResources,
        options: DeviceOptions,
    ) -> Result<Self> {
        let info = vfio
            .device_info()
            .map_err(|e| Error::backend("VFIO_DEVICE_GET_INFO", e))?;
        if !info.is_pci() {
            return Err(Error::Config(format!(
                "not a PCI device (device flags {:#x})",
                info.flags
            )));
        }
        if info.num_regions < region::CONFIG + 1 {
            return Err(Error::Config(format!(
                "a PCI device has at least {} regions, this one reports {}",
                region::CONFIG + 1,
                info.num_regions
            )));
        }
        let page_size = options
            .page_size
            .unwrap_or_else(pci_bar_alloc::host_page_size);
        if !page_size.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "page size {page_size:#x} is not a power of two"
            )));
        }

        // Config space as the device has it.
        let cfg_info = vfio
            .region_info(region::CONFIG)
            .map_err(|e| Error::backend("config region info", e))?;
        let config_size = usize::try_from(cfg_info.size)
            .unwrap_or(CONFIG_SPACE_SIZE)
            .min(CONFIG_SPACE_SIZE);
        if config_size < 64 {
            return Err(Error::Config(format!(
                "config region of {config_size} bytes is smaller than the 64-byte header"
            )));
        }
        let mut raw = vec![0u8; config_size];
        vfio.region_read(region::CONFIG, 0, &mut raw)
            .map_err(|e| Error::backend("reading config space", e))?;
        let mut config = ConfigSpace::from_bytes(&raw)
            .map_err(|e| Error::Config(format!("device config space: {e}")))?;
        // A passed-through function is a single-function device to the guest.
        config.set_multifunction(false);

        let mut policy: Box<[Dword; DWORDS]> = Box::new([Dword::Passthrough; DWORDS]);
        // The header is emulated except command/status.
        for p in policy.iter_mut().take(16) {
            *p = Dword::Emulated;
        }
        if let Some(p) = policy.get_mut(1) {
            *p = Dword::Command;
        }
        // Past the device's config region (a conventional PCI device has
        // 256 bytes): emulated zeros.
        for p in policy.iter_mut().skip(config_size / 4) {
            *p = Dword::Emulated;
        }

        // Capabilities: keep, hide, emulate.
        let mut kept = Vec::new();
        let mut hidden = Vec::new();
        let (caps, cap_err) = pci_config::parse_capabilities_lenient(&raw);
        if let Some(e) = &cap_err {
            log::warn!("device capability list is broken ({e}); keeping the {} capabilities before the break", caps.len());
            // End the chain at the last good capability so the guest never
            // follows the broken pointer.
            match caps.last() {
                Some(last) => {
                    let _ = config.set_u8(usize::from(last.offset) + 1, 0);
                }
                None => config.set_capabilities_pointer(0),
            }
        }
        let (ext_caps, ext_err) = if config_size > 0x100 {
            pci_config::parse_extended_capabilities_lenient(&raw)
        } else {
            (Vec::new(), None)
        };
        if let Some(e) = &ext_err {
            log::warn!(
                "device extended capability list is broken ({e}); keeping the {} before the break",
                ext_caps.len()
            );
            if let Some(last) = ext_caps.last() {
                let off = usize::from(last.offset);
                let mut hdr = [0u8; 4];
                let _ = config.get_bytes(off, &mut hdr);
                let v = u32::from_le_bytes(hdr) & 0x000f_ffff;
                let _ = config.set_u32(off, v);
            } else {
                let _ = config.set_u32(0x100, 0);
            }
        }

        // Extents of standard capabilities: up to the next one by offset.
        let mut std_offsets: Vec<usize> = caps.iter().map(|c| usize::from(c.offset)).collect();
        std_offsets.sort_unstable();
        let std_extent = |off: usize| -> usize {
            std_offsets
                .iter()
                .copied()
                .find(|&o| o > off)
                .unwrap_or(0x100)
                .min(0x100)
        };
        let mut ext_offsets: Vec<usize> = ext_caps.iter().map(|c| usize::from(c.offset)).collect();
        ext_offsets.sort_unstable();
        let ext_extent = |off: usize| -> usize {
            ext_offsets
                .iter()
                .copied()
                .find(|&o| o > off)
                .unwrap_or(config_size)
                .min(config_size)
        };

        // Past a broken chain, capabilities (an SR-IOV we would have hidden,
        // say) can no longer be found: keep the guest away from every byte
        // that is not a kept capability's.
        // The last capability before the break has no known end: it gets
        // the length the spec gives its id.
        if cap_err.is_some() {
            set_policy(&mut policy, 0x40, 0x100.min(config_size), Dword::Emulated);
            for c in &caps {
                let off = usize::from(c.offset);
                let end = std_extent(off).min(off + std_cap_len(c.id, &raw, off));
                set_policy(&mut policy, off, end, Dword::Passthrough);
            }
        }
        if ext_err.is_some() {
            set_policy(&mut policy, 0x100, config_size, Dword::Emulated);
            for c in &ext_caps {
                let off = usize::from(c.offset);
                let end = ext_extent(off).min(off + ext_cap_len(c.id));
                set_policy(&mut policy, off, end, Dword::Passthrough);
            }
        }

        let mut msi_cap = None;
        let mut msix_cap = None;
        for c in &caps {
            let off = usize::from(c.offset);
            if options.hide_capabilities.contains(&c.id) {
                config
                    .hide_capability(c.offset)
                    .map_err(|e| Error::Config(format!("hiding capability {:#x}: {e}", c.id)))?;
                set_policy(&mut policy, off, std_extent(off), Dword::Emulated);
                hidden.push(HiddenCapability {
                    id: u16::from(c.id),
                    extended: false,
                    offset: c.offset,
                    reason: "hidden at the VMM's request".into(),
                });
                continue;
            }
            let emulated = match c.id {
                cap_id::MSI if msi_cap.is_none() => {
                    msi_cap = Some(off);
                    true
                }
                cap_id::MSIX if msix_cap.is_none() => {
                    msix_cap = Some(off);
                    true
                }
                _ => false,
            };
            // The header dword (id, next pointer) is ours: hiding rewrites it.
            set_policy(&mut policy, off, off + 4, Dword::Emulated);
            kept.push(KeptCapability {
                id: u16::from(c.id),
                extended: false,
                offset: c.offset,
                emulated,
            });
        }
        for c in &ext_caps {
            let off = usize::from(c.offset);
            let default_reason = DEFAULT_HIDDEN_EXTENDED
                .iter()
                .find(|(id, _)| *id == c.id)
                .map(|(_, r)| (*r).to_string());
            let reason = default_reason.or_else(|| {
                options
                    .hide_extended_capabilities
                    .contains(&c.id)
                    .then(|| "hidden at the VMM's request".to_string())
            });
            if let Some(reason) = reason {
                config.hide_extended_capability(c.offset).map_err(|e| {
                    Error::Config(format!("hiding extended capability {:#x}: {e}", c.id))
                })?;
                // Its body is no longer reachable; keep the guest away from
                // the device's registers there.
                set_policy(&mut policy, off + 4, ext_extent(off), Dword::Emulated);
                set_policy(&mut policy, off, off + 4, Dword::Emulated);
                hidden.push(HiddenCapability {
                    id: c.id,
                    extended: true,
                    offset: c.offset,
                    reason,
                });
                continue;
            }
            set_policy(&mut policy, off, off + 4, Dword::Emulated);
            kept.push(KeptCapability {
                id: c.id,
                extended: true,
                offset: c.offset,
                emulated: false,
            });
        }
        // Zero the bodies of hidden extended caps in the emulated view.
        for h in hidden.iter().filter(|h| h.extended) {
            let off = usize::from(h.offset);
            let end = ext_extent(off);
            for o in (off + 4..end).step_by(4) {
                let _ = config.set_u32(o, 0);
            }
        }

        // BARs: sizes from the device, kinds from its BAR registers.
        let mut bar_defs: [Option<(BarKind, RegionInfo)>; 6] = Default::default();
        let mut skip_next = false;
        for (i, slot) in bar_defs.iter_mut().enumerate() {
            if skip_next {
                skip_next = false;
                continue;
            }
            let index = u32::try_from(i).unwrap_or(0);
            let rinfo = match vfio.region_info(region::BAR0 + index) {
                Ok(r) => r,
                Err(e) => {
                    log::warn!("BAR{i}: region info failed ({e}); the BAR is left out");
                    continue;
                }
            };
            if rinfo.size == 0 {
                continue;
            }
            let reg = raw
                .get(0x10 + 4 * i..0x14 + 4 * i)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .map(u32::from_le_bytes)
                .unwrap_or(0);
            let kind = bar_kind_from_register(reg);
            if kind.is_64bit() {
                if i == 5 {
                    log::warn!("BAR5 declares a 64-bit BAR, which needs a sixth register; the BAR is left out");
                    continue;
                }
                skip_next = true;
            }
            *slot = Some((kind, rinfo));
        }

        // MSI-X: where the table and PBA live.
        let msix_bytes = msix_cap
            .filter(|off| off + 12 <= 0x100)
            .and_then(|off| raw.get(off..off + 12).map(|b| (off, b.to_vec())));
        let msix_device = match &msix_bytes {
            Some((off, b)) => match MsixState::from_bytes(b) {
                Ok(s) => Some((*off, s)),
                Err(e) => {
                    log::warn!("MSI-X capability unusable ({e}); MSI-X is left out");
                    None
                }
            },
            None => None,
        };
        let mut msix_places: Option<(usize, MsixPiece, usize, MsixPiece)> = None;
        if let Some((_, s)) = &msix_device {
            let t = s.table_location();
            let p = s.pba_location();
            let tb = usize::from(t.bir);
            let pb = usize::from(p.bir);
            let table_ok = bar_defs
                .get(tb)
                .and_then(|d| d.as_ref())
                .is_some_and(|(_, r)| u64::from(t.offset) + u64::from(t.size) <= r.size);
            let pba_ok = bar_defs
                .get(pb)
                .and_then(|d| d.as_ref())
                .is_some_and(|(_, r)| u64::from(p.offset) + u64::from(p.size) <= r.size);
            if table_ok && pba_ok {
                msix_places = Some((
                    tb,
                    MsixPiece {
                        offset: u64::from(t.offset),
                        len: u64::from(t.size),
                    },
                    pb,
                    MsixPiece {
                        offset: u64::from(p.offset),
                        len: u64::from(p.size),
                    },
                ));
            } else {
                log::warn!(
                    "MSI-X table (BAR{} +{:#x}, {:#x} bytes) or PBA (BAR{} +{:#x}) lies outside its BAR; MSI-X is left out",
                    t.bir, t.offset, t.size, p.bir, p.offset
                );
            }
        }
        if msix_places.is_none() {
            if let Some(off) = msix_cap {
                hide_unusable(
                    &mut config,
                    &mut policy,
                    &mut kept,
                    &mut hidden,
                    (off, std_extent(off), cap_id::MSIX),
                    "MSI-X unusable: its table or PBA lies outside the BAR it names, or the capability runs past 0xff",
                );
            }
        }

        // Layouts.
        let mut bars: [Option<Bar>; 6] = Default::default();
        for (i, def) in bar_defs.into_iter().enumerate() {
            let Some((kind, rinfo)) = def else { continue };
            let areas: Vec<SparseArea> = if kind.is_memory() {
                rinfo.mmap_areas()
            } else {
                Vec::new()
            };
            let (table, pba) = match msix_places {
                Some((tb, t, pb, p)) => ((tb == i).then_some(t), (pb == i).then_some(p)),
                None => (None, None),
            };
            let mut layout = BarLayout::compute(
                rinfo.size,
                &areas,
                table,
                pba,
                page_size,
                options.msix_relocation,
            );
            // The PCI minimums: 16 bytes for memory, 4 for I/O.
            let min = if kind.is_memory() { 16 } else { 4 };
            layout.guest_size = layout.guest_size.max(min);
            if let Err(e) = config.declare_bar(i, kind, layout.guest_size) {
                log::warn!(
                    "BAR{i} of {:#x} bytes cannot be declared ({e}); it is left out",
                    layout.guest_size
                );
                continue;
            }
            bars[i] = Some(Bar {
                index: BarIndex::Bar(i as u8),
                kind,
                region: rinfo,
                layout,
                placement: None,
                maps: Vec::new(),
                decoding: false,
            });
        }

        // ROM.
        let rom = match vfio.region_info(region::ROM) {
            Ok(r) if r.size > 0 => {
                let size = r
                    .size
                    .checked_next_power_of_two()
                    .unwrap_or(r.size)
                    .max(MIN_ROM_SIZE);
                match config.declare_rom(size) {
                    Ok(()) => Some(Bar {
                        index: BarIndex::Rom,
                        kind: BarKind::Memory32 {
                            prefetchable: false,
                        },
                        layout: BarLayout {
                            guest_size: size,
                            ..BarLayout::compute(
                                r.size,
                                &[],
                                None,
                                None,
                                page_size,
                                MsixRelocation::Never,
                            )
                        },
                        region: r,
                        placement: None,
                        maps: Vec::new(),
                        decoding: false,
                    }),
                    Err(e) => {
                        log::warn!("ROM of {size:#x} bytes cannot be declared ({e}); no ROM");
                        None
                    }
                }
            }
            Ok(_) => None,
            Err(e) => {
                log::info!("no ROM region ({e})");
                None
            }
        };

        // Interrupts.
        let irqs = &resources.interrupts;
        let msi = match msi_cap {
            Some(off) => {
                let end = (off + 24).min(config_size);
                match raw.get(off..end).map(MsiState::from_bytes) {
                    Some(Ok(mut state)) if off + state.cap_len() <= 0x100 => {
                        let group = irqs.create_msi_group(state.max_vectors()).map_err(|e| {
                            Error::Interrupts(format!("creating the MSI group: {e}"))
                        })?;
                        state.set_group(Some(group.clone())).map_err(|e| {
                            Error::Interrupts(format!("binding the MSI group: {e}"))
                        })?;
                        set_policy(&mut policy, off, off + state.cap_len(), Dword::Msi);
                        Some(MsiCtx {
                            offset: off,
                            state,
                            group,
                        })
                    }
                    _ => {
                        log::warn!("MSI capability at {off:#x} unusable; MSI is left out");
                        hide_unusable(
                            &mut config,
                            &mut policy,
                            &mut kept,
                            &mut hidden,
                            (off, std_extent(off), cap_id::MSI),
                            "MSI capability unusable: truncated or running past 0xff",
                        );
                        None
                    }
                }
            }
            None => None,
        };
        let msix = match (msix_device, msix_places) {
            (Some((off, dev_state)), Some((tb, _, pb, _))) => {
                let table = bars
                    .get(tb)
                    .and_then(|b| b.as_ref())
                    .and_then(|b| b.layout.msix_table);
                let pba = bars
                    .get(pb)
                    .and_then(|b| b.as_ref())
                    .and_then(|b| b.layout.msix_pba);
                match (table, pba) {
                    (Some(t), Some(p)) => {
                        let tl = dev_state.table_location();
                        let pl = dev_state.pba_location();
                        let (Ok(t_off), Ok(p_off)) =
                            (u32::try_from(t.offset), u32::try_from(p.offset))
                        else {
                            return Err(Error::Config(format!(
                                "MSI-X table at {:#x} or PBA at {:#x} beyond 4 GiB",
                                t.offset, p.offset
                            )));
                        };
                        let mut state =
                            MsixState::new(dev_state.table_size(), tl.bir, t_off, pl.bir, p_off)
                                .map_err(|e| Error::Interrupts(format!("MSI-X capability: {e}")))?;
                        let group = irqs.create_msi_group(state.table_size()).map_err(|e| {
                            Error::Interrupts(format!("creating the MSI-X group: {e}"))
                        })?;
                        state.set_group(Some(group.clone())).map_err(|e| {
                            Error::Interrupts(format!("binding the MSI-X group: {e}"))
                        })?;
                        set_policy(&mut policy, off, off + 12, Dword::Msix);
                        Some(MsixCtx {
                            offset: off,
                            state,
                            group,
                            table: (tb, t),
                            pba: (pb, p),
                        })
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let intx_count = vfio.irq_info(irq::INTX).map(|i| i.count).unwrap_or(0);
        let pin = config.interrupt_pin();
        let intx = if intx_count > 0 && (1..=4).contains(&pin) {
            let state = IntxState::from_pin_register(pin)
                .map_err(|e| Error::Interrupts(format!("INTx pin: {e}")))?;
            let group = irqs
                .create_intx_group()
                .map_err(|e| Error::Interrupts(format!("creating the INTx group: {e}")))?;
            let mut state = state;
            state
                .set_group(Some(group.clone()))
                .map_err(|e| Error::Interrupts(format!("binding the INTx group: {e}")))?;
            Some(IntxCtx { state, group })
        } else {
            if pin != 0 {
                log::info!("device reports INTx pin {pin} but no INTx interrupt; pin cleared");
            }
            config.set_interrupt_pin(0);
            None
        };

        let dma = DmaMapper::new(vfio.clone(), options.dma_mode)?;
        let dev = VfioPciDevice {
            vfio,
            resources,
            dma,
            policy,
            config_size,
            kept,
            hidden,
            inner: Mutex::new(Inner {
                config,
                bars,
                rom,
                msi,
                msix,
                intx,
                irq_mode: IrqMode::None,
            }),
        };
        {
            let mut inner = lock(&dev.inner, "device")?;
            dev.place_all(&mut inner)?;
            dev.apply_irq_mode(&mut inner)?;
        }
        Ok(dev)
    }

    /// The backend this device was built on.
    pub fn vfio(&self) -> &Arc<dyn Vfio> {
        &self.vfio
    }

    /// The device's DMA mappings: map guest RAM with
    /// [`DmaMapper::map_guest_memory`] after attaching.
    pub fn dma(&self) -> &DmaMapper {
        &self.dma
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

/// Length of a standard capability by id (PCI Local Bus 3.0, PCIe Base),
/// for capabilities whose end is not given by the next one.
fn std_cap_len(id: u8, raw: &[u8], off: usize) -> usize {
    match id {
        cap_id::PCI_EXPRESS => 0x3c,
        // Vendor specific: its length is in byte 2.
        cap_id::VENDOR_SPECIFIC => usize::from(raw.get(off + 2).copied().unwrap_or(4)).max(4),
        // Power Management, MSI (by its flags), MSI-X; else the header.
        _ => pci_config::fixed_capability_len(id, raw, off),
    }
}

/// Length of an extended capability by id (PCIe Base 6.0 chapter 7), for
/// capabilities whose end is not given by the next one.
fn ext_cap_len(id: u16) -> usize {
    match id {
        ext_cap_id::AER => 0x48,
        ext_cap_id::SRIOV => 0x40,
        ext_cap_id::PRI | ext_cap_id::L1_PM_SUBSTATES => 0x10,
        ext_cap_id::DEVICE_SERIAL_NUMBER | ext_cap_id::PTM => 0x0c,
        ext_cap_id::ARI
        | ext_cap_id::ATS
        | ext_cap_id::LTR
        | ext_cap_id::PASID
        | ext_cap_id::ACS => 0x08,
        // Unknown length: the header only.
        _ => 4,
    }
}

/// Hides a standard capability the device model cannot use, and keeps the
/// guest away from its registers.
fn hide_unusable(
    config: &mut ConfigSpace,
    policy: &mut [Dword; DWORDS],
    kept: &mut Vec<KeptCapability>,
    hidden: &mut Vec<HiddenCapability>,
    (off, end, id): (usize, usize, u8),
    reason: &str,
) {
    let offset = u16::try_from(off).unwrap_or(0);
    if let Err(e) = config.hide_capability(offset) {
        log::warn!("could not hide the unusable capability {id:#x} at {off:#x}: {e}");
    }
    kept.retain(|k| k.extended || k.offset != offset);
    hidden.push(HiddenCapability {
        id: u16::from(id),
        extended: false,
        offset,
        reason: reason.into(),
    });
    // Its registers, up to the next capability, are no longer forwarded:
    // the guest reads them as they were at attach.
    set_policy(policy, off, end, Dword::Emulated);
}

fn set_policy(policy: &mut [Dword; DWORDS], start: usize, end: usize, p: Dword) {
    let first = start / 4;
    let last = end.div_ceil(4);
    for d in policy.iter_mut().take(last.min(DWORDS)).skip(first) {
        *d = p;
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
    /// unmapped, BAR placements returned; the DMA mappings go with the
    /// [`DmaMapper`].
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
        // Host mappings unmap as `taken` drops here.
    }
}
