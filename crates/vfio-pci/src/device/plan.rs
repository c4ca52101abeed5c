//! Attach as a pipeline of pure planning stages.
//!
//! [`VfioPciDevice::new`](super::VfioPciDevice::new) reads what it needs from the backend
//! first (config space, region infos, the INTx count), then runs these stages, which do no
//! I/O and are tested on their own, then does the I/O the plan asks for (interrupt groups,
//! BAR placement and mappings). Each stage owns one PCI policy:
//!
//! 1. [`header_policy`]: which dwords are emulated, forwarded or tracked.
//! 2. [`Capabilities::plan`]: capabilities kept, hidden, emulated, and broken chains repaired.
//! 3. [`bar_kinds`]: BAR kinds from their registers, 64-bit pairs, sizes from the regions.
//! 4. [`msix_placement`]: where the MSI-X table and PBA live, or why MSI-X is left out.
//! 5. [`bar_layouts`] and [`rom`]: what the guest sees of each BAR and the ROM.
//! 6. [`msi_state`] and [`intx_pin`]: which interrupts the guest gets.
//!
//! [`AttachPlan::build`] runs them in order on what [`Probe`] read. A later quirk lands in
//! one stage.

use pci_config::regs::{
    BAR0, COMMAND, EXTENDED_CONFIG_START, EXT_CAP_ID_VERSION_MASK, HEADER_SIZE,
    LEGACY_CONFIG_SPACE_SIZE, ROM_MIN_SIZE,
};
use pci_config::{
    cap_id, ext_cap_id, extended_capability_len, standard_capability_len, BarKind, Capability,
    ConfigSpace, ExtendedCapability, NUM_BARS,
};
use pci_interrupts::{MsiState, MsixState, MSIX_CAP_LEN};
use vfio_backend::{irq, region, RegionInfo, SparseArea, Vfio};

use super::{Bar, Dword, HiddenCapability, KeptCapability, CONFIG_SPACE_SIZE, DWORDS};
use crate::layout::{BarLayout, MsixPiece, MsixRelocation};
use crate::outcome::BarIndex;
use crate::{DeviceOptions, Error, Result};

/// What attach reads from the device before deciding anything: the I/O edge at the start.
#[derive(Debug, Default)]
pub(super) struct Probe {
    /// The device's config space, as long as its config region (at most 4 KiB).
    pub raw: Vec<u8>,
    /// Region infos of BAR0..BAR5; `None` where the backend gave none.
    pub regions: [Option<RegionInfo>; NUM_BARS],
    /// The ROM region, if the backend has one.
    pub rom: Option<RegionInfo>,
    /// Number of INTx interrupts (0 or 1).
    pub intx_count: u32,
}

impl Probe {
    /// Checks that `vfio` is a PCI device with a config region.
    pub fn read(vfio: &dyn Vfio) -> Result<Self> {
        let info = vfio
            .device_info()
            .map_err(|e| Error::backend("VFIO_DEVICE_GET_INFO", e))?;
        if !info.is_pci() {
            return Err(Error::NotPci { flags: info.flags });
        }
        if info.num_regions < region::CONFIG + 1 {
            return Err(Error::TooFewRegions {
                found: info.num_regions,
                needed: region::CONFIG + 1,
            });
        }
        Ok(Probe::default())
    }

    /// Reads the config space, the BAR and ROM region infos and the INTx count.
    pub fn read_regions(mut self, vfio: &dyn Vfio) -> Result<Self> {
        let cfg_info = vfio
            .region_info(region::CONFIG)
            .map_err(|e| Error::backend("config region info", e))?;
        let config_size = usize::try_from(cfg_info.size)
            .unwrap_or(CONFIG_SPACE_SIZE)
            .min(CONFIG_SPACE_SIZE);
        if config_size < HEADER_SIZE {
            return Err(Error::ConfigTooSmall { size: config_size });
        }
        self.raw = vec![0u8; config_size];
        vfio.region_read(region::CONFIG, 0, &mut self.raw)
            .map_err(|e| Error::backend("reading config space", e))?;
        for (i, slot) in self.regions.iter_mut().enumerate() {
            let index = u32::try_from(i).unwrap_or(0);
            match vfio.region_info(region::BAR0 + index) {
                Ok(r) => *slot = Some(r),
                Err(e) => log::warn!("BAR{i}: region info failed ({e}); the BAR is left out"),
            }
        }
        self.rom = match vfio.region_info(region::ROM) {
            Ok(r) => Some(r),
            Err(e) => {
                log::info!("no ROM region ({e})");
                None
            }
        };
        self.intx_count = vfio.irq_info(irq::INTX).map(|i| i.count).unwrap_or(0);
        Ok(self)
    }

    /// Size of the device's config region.
    pub fn config_size(&self) -> usize {
        self.raw.len()
    }
}

/// The MSI-X the guest sees: its capability, and where its table and PBA are in the
/// guest's BARs (after any relocation).
pub(super) struct PlannedMsix {
    /// Offset of the capability.
    pub offset: usize,
    /// The emulated capability, naming the guest-side table and PBA.
    pub state: MsixState,
    /// (BAR, guest-side piece) of the table.
    pub table: (usize, MsixPiece),
    /// (BAR, guest-side piece) of the PBA.
    pub pba: (usize, MsixPiece),
}

/// Everything attach decided, before any interrupt group, placement or mapping exists.
pub(super) struct AttachPlan {
    /// The config space the guest starts from.
    pub config: ConfigSpace,
    /// How each dword is handled.
    pub policy: Box<Policy>,
    /// Capabilities kept and hidden.
    pub caps: Capabilities,
    /// The BARs the guest sees, not yet placed.
    pub bars: [Option<Bar>; NUM_BARS],
    /// The ROM, not yet placed.
    pub rom: Option<Bar>,
    /// The MSI capability (offset, emulated state), if usable.
    pub msi: Option<(usize, MsiState)>,
    /// MSI-X, if usable.
    pub msix: Option<PlannedMsix>,
    /// The INTx pin the guest sees, if the device has INTx.
    pub intx_pin: Option<u8>,
}

impl AttachPlan {
    /// Runs the stages on what `probe` read. No I/O.
    pub fn build(probe: &Probe, options: &DeviceOptions, page_size: u64) -> Result<Self> {
        let raw = probe.raw.as_slice();
        let mut config = initial_config(raw)?;
        let mut policy = header_policy(raw.len());
        let mut caps = Capabilities::plan(raw, &mut config, &mut policy, options)?;
        let defs = bar_kinds(raw, &probe.regions);
        let msix_device = match caps.msix.map(|off| (off, msix_placement(raw, off, &defs))) {
            Some((off, Ok((state, places)))) => Some((off, state, places)),
            Some((off, Err(why))) => {
                log::warn!("MSI-X unusable ({why}); MSI-X is left out");
                caps.hide_unusable(
                    &mut config,
                    &mut policy,
                    off,
                    cap_id::MSIX,
                    "MSI-X unusable: its table or PBA lies outside the BAR it names, or the capability runs past 0xff",
                );
                None
            }
            None => None,
        };
        let places = msix_device.as_ref().map(|(_, _, p)| *p);
        let bars = bar_layouts(
            defs,
            places.as_ref(),
            page_size,
            options.msix_relocation,
            &mut config,
        );
        let rom = rom(probe.rom.clone(), page_size, &mut config);
        let msi = match caps.msi {
            Some(off) => match msi_state(raw, off) {
                Some(state) => {
                    set_policy(&mut policy, off, off + state.cap_len(), Dword::Msi);
                    Some((off, state))
                }
                None => {
                    log::warn!("MSI capability at {off:#x} unusable; MSI is left out");
                    caps.hide_unusable(
                        &mut config,
                        &mut policy,
                        off,
                        cap_id::MSI,
                        "MSI capability unusable: truncated or running past 0xff",
                    );
                    None
                }
            },
            None => None,
        };
        let msix = match msix_device {
            Some((off, dev_state, places)) => {
                let planned = guest_msix(off, &dev_state, &places, &bars)?;
                if planned.is_some() {
                    set_policy(&mut policy, off, off + MSIX_CAP_LEN, Dword::Msix);
                }
                planned
            }
            None => None,
        };
        let pin = config.interrupt_pin();
        let intx_pin = intx_pin(pin, probe.intx_count);
        if intx_pin.is_none() {
            if pin != 0 {
                log::info!("device reports INTx pin {pin} but no INTx interrupt; pin cleared");
            }
            config.set_interrupt_pin(0);
        }
        Ok(AttachPlan {
            config,
            policy,
            caps,
            bars,
            rom,
            msi,
            msix,
            intx_pin,
        })
    }
}

/// Stage 5, MSI-X: the capability the guest sees names the table and PBA where the BAR
/// layouts put them (relocated or not). `None` when a BAR holding them was left out.
pub(super) fn guest_msix(
    offset: usize,
    device: &MsixState,
    places: &MsixPlacement,
    bars: &[Option<Bar>; NUM_BARS],
) -> Result<Option<PlannedMsix>> {
    let layout = |i: usize| bars.get(i).and_then(|b| b.as_ref()).map(|b| &b.layout);
    let table = layout(places.table.0).and_then(|l| l.msix_table);
    let pba = layout(places.pba.0).and_then(|l| l.msix_pba);
    let (Some(t), Some(p)) = (table, pba) else {
        return Ok(None);
    };
    let tl = device.table_location();
    let pl = device.pba_location();
    let (Ok(t_off), Ok(p_off)) = (u32::try_from(t.offset), u32::try_from(p.offset)) else {
        return Err(Error::MsixBeyond4G {
            table: t.offset,
            pba: p.offset,
        });
    };
    let state = MsixState::new(device.table_size(), tl.bir, t_off, pl.bir, p_off)
        .map_err(Error::interrupts("MSI-X capability"))?;
    Ok(Some(PlannedMsix {
        offset,
        state,
        table: (places.table.0, t),
        pba: (places.pba.0, p),
    }))
}

/// How each dword of config space is handled.
pub(super) type Policy = [Dword; DWORDS];

/// The largest MSI capability (PCI Local Bus 3.0 §6.8.1: 64-bit addresses and per-vector
/// masking): 24 bytes.
const MSI_MAX_LEN: usize = 24;

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

/// Sets the policy of every dword that overlaps `start..end`.
pub(super) fn set_policy(policy: &mut Policy, start: usize, end: usize, p: Dword) {
    let first = start / 4;
    let last = end.div_ceil(4);
    for d in policy.iter_mut().take(last.min(DWORDS)).skip(first) {
        *d = p;
    }
}

/// Stage 1: the header is emulated except command/status (forwarded and tracked); the rest of
/// the device's config region is forwarded; past it (a conventional device has 256 bytes),
/// emulated zeros.
pub(super) fn header_policy(config_size: usize) -> Box<Policy> {
    let mut policy: Box<Policy> = Box::new([Dword::Passthrough; DWORDS]);
    set_policy(&mut policy, 0, HEADER_SIZE, Dword::Emulated);
    set_policy(&mut policy, COMMAND, COMMAND + 4, Dword::Command);
    for p in policy.iter_mut().skip(config_size / 4) {
        *p = Dword::Emulated;
    }
    policy
}

/// The config space the guest starts from: the device's, as a single-function device.
pub(super) fn initial_config(raw: &[u8]) -> Result<ConfigSpace> {
    let mut config =
        ConfigSpace::from_bytes(raw).map_err(Error::config("parsing the device's config space"))?;
    // A passed-through function is a single-function device to the guest.
    config.set_multifunction(false);
    Ok(config)
}

/// Stage 2: the capabilities the guest sees.
#[derive(Debug, Default)]
pub(super) struct Capabilities {
    /// Capabilities the guest sees.
    pub kept: Vec<KeptCapability>,
    /// Capabilities hidden, and why.
    pub hidden: Vec<HiddenCapability>,
    /// Offset of the (first) MSI capability, emulated.
    pub msi: Option<usize>,
    /// Offset of the (first) MSI-X capability, emulated.
    pub msix: Option<usize>,
    std_offsets: Vec<usize>,
    ext_offsets: Vec<usize>,
    config_size: usize,
}

impl Capabilities {
    /// Parses the device's capability chains, repairs a broken one (the guest never follows a
    /// broken pointer, and never reaches a byte past the break that is not a kept capability's),
    /// hides what the default policy and `options` hide, and marks MSI and MSI-X emulated.
    pub fn plan(
        raw: &[u8],
        config: &mut ConfigSpace,
        policy: &mut Policy,
        options: &DeviceOptions,
    ) -> Result<Self> {
        let config_size = raw.len();
        let (caps, cap_err) = pci_config::parse_capabilities_lenient(raw);
        let (ext_caps, ext_err) = if config_size > EXTENDED_CONFIG_START {
            pci_config::parse_extended_capabilities_lenient(raw)
        } else {
            (Vec::new(), None)
        };
        let mut std_offsets: Vec<usize> = caps.iter().map(|c| usize::from(c.offset)).collect();
        std_offsets.sort_unstable();
        let mut ext_offsets: Vec<usize> = ext_caps.iter().map(|c| usize::from(c.offset)).collect();
        ext_offsets.sort_unstable();
        let mut plan = Capabilities {
            std_offsets,
            ext_offsets,
            config_size,
            ..Capabilities::default()
        };
        if let Some(e) = &cap_err {
            log::warn!(
                "device capability list is broken ({e}); keeping the {} capabilities before the break",
                caps.len()
            );
            plan.repair_standard_chain(raw, &caps, config, policy);
        }
        if let Some(e) = &ext_err {
            log::warn!(
                "device extended capability list is broken ({e}); keeping the {} before the break",
                ext_caps.len()
            );
            plan.repair_extended_chain(&ext_caps, config, policy);
        }
        plan.standard(&caps, config, policy, options)?;
        plan.extended(&ext_caps, config, policy, options)?;
        Ok(plan)
    }

    /// End of the standard capability at `off`: the next one by offset, or 0x100.
    pub fn std_extent(&self, off: usize) -> usize {
        self.std_offsets
            .iter()
            .copied()
            .find(|&o| o > off)
            .unwrap_or(LEGACY_CONFIG_SPACE_SIZE)
            .min(LEGACY_CONFIG_SPACE_SIZE)
    }

    /// End of the extended capability at `off`: the next one by offset, or the config size.
    pub fn ext_extent(&self, off: usize) -> usize {
        self.ext_offsets
            .iter()
            .copied()
            .find(|&o| o > off)
            .unwrap_or(self.config_size)
            .min(self.config_size)
    }

    /// Ends the chain at the last good capability, and keeps the guest away from every byte
    /// of 0x40..0x100 that is not a kept capability's. The last capability before the break
    /// has no known end: it gets the length the spec gives its id.
    fn repair_standard_chain(
        &self,
        raw: &[u8],
        caps: &[Capability],
        config: &mut ConfigSpace,
        policy: &mut Policy,
    ) {
        match caps.last() {
            Some(last) => {
                let _ = config.set_u8(usize::from(last.offset) + 1, 0);
            }
            None => config.set_capabilities_pointer(0),
        }
        let end = LEGACY_CONFIG_SPACE_SIZE.min(self.config_size);
        set_policy(policy, HEADER_SIZE, end, Dword::Emulated);
        for c in caps {
            let off = usize::from(c.offset);
            let end = self
                .std_extent(off)
                .min(off + standard_capability_len(c.id, raw, off));
            set_policy(policy, off, end, Dword::Passthrough);
        }
    }

    /// The same for the extended chain (0x100 up).
    fn repair_extended_chain(
        &self,
        ext_caps: &[ExtendedCapability],
        config: &mut ConfigSpace,
        policy: &mut Policy,
    ) {
        if let Some(last) = ext_caps.last() {
            let off = usize::from(last.offset);
            let mut hdr = [0u8; 4];
            let _ = config.get_bytes(off, &mut hdr);
            let v = u32::from_le_bytes(hdr) & EXT_CAP_ID_VERSION_MASK;
            let _ = config.set_u32(off, v);
        } else {
            let _ = config.set_u32(EXTENDED_CONFIG_START, 0);
        }
        set_policy(
            policy,
            EXTENDED_CONFIG_START,
            self.config_size,
            Dword::Emulated,
        );
        for c in ext_caps {
            let off = usize::from(c.offset);
            let end = self
                .ext_extent(off)
                .min(off + extended_capability_len(c.id));
            set_policy(policy, off, end, Dword::Passthrough);
        }
    }

    /// Standard capabilities: hidden at the VMM's request, else kept (MSI and MSI-X emulated).
    fn standard(
        &mut self,
        caps: &[Capability],
        config: &mut ConfigSpace,
        policy: &mut Policy,
        options: &DeviceOptions,
    ) -> Result<()> {
        for c in caps {
            let off = usize::from(c.offset);
            if options.hide_capabilities.contains(&c.id) {
                config
                    .hide_capability(c.offset)
                    .map_err(Error::config("hiding a capability"))?;
                set_policy(policy, off, self.std_extent(off), Dword::Emulated);
                self.hidden.push(HiddenCapability {
                    id: u16::from(c.id),
                    extended: false,
                    offset: c.offset,
                    reason: "hidden at the VMM's request".into(),
                });
                continue;
            }
            let emulated = match c.id {
                cap_id::MSI if self.msi.is_none() => {
                    self.msi = Some(off);
                    true
                }
                cap_id::MSIX if self.msix.is_none() => {
                    self.msix = Some(off);
                    true
                }
                _ => false,
            };
            // The header dword (id, next pointer) is ours: hiding rewrites it.
            set_policy(policy, off, off + 4, Dword::Emulated);
            self.kept.push(KeptCapability {
                id: u16::from(c.id),
                extended: false,
                offset: c.offset,
                emulated,
            });
        }
        Ok(())
    }

    /// Extended capabilities: hidden by default policy or at the VMM's request (their bodies
    /// read as zeros), else kept.
    fn extended(
        &mut self,
        ext_caps: &[ExtendedCapability],
        config: &mut ConfigSpace,
        policy: &mut Policy,
        options: &DeviceOptions,
    ) -> Result<()> {
        for c in ext_caps {
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
            // The header dword is ours either way.
            set_policy(policy, off, off + 4, Dword::Emulated);
            let Some(reason) = reason else {
                self.kept.push(KeptCapability {
                    id: c.id,
                    extended: true,
                    offset: c.offset,
                    emulated: false,
                });
                continue;
            };
            config
                .hide_extended_capability(c.offset)
                .map_err(Error::config("hiding an extended capability"))?;
            // Its body is no longer reachable: keep the guest away from the device's
            // registers there, and show zeros.
            let end = self.ext_extent(off);
            set_policy(policy, off + 4, end, Dword::Emulated);
            for o in (off + 4..end).step_by(4) {
                let _ = config.set_u32(o, 0);
            }
            self.hidden.push(HiddenCapability {
                id: c.id,
                extended: true,
                offset: c.offset,
                reason,
            });
        }
        Ok(())
    }

    /// Hides a standard capability the device model cannot use (an MSI or MSI-X capability
    /// found unusable by a later stage), and keeps the guest away from its registers: they
    /// read as they were at attach.
    pub fn hide_unusable(
        &mut self,
        config: &mut ConfigSpace,
        policy: &mut Policy,
        off: usize,
        id: u8,
        reason: &str,
    ) {
        let offset = u16::try_from(off).unwrap_or(0);
        if let Err(e) = config.hide_capability(offset) {
            log::warn!("could not hide the unusable capability {id:#x} at {off:#x}: {e}");
        }
        self.kept.retain(|k| k.extended || k.offset != offset);
        self.hidden.push(HiddenCapability {
            id: u16::from(id),
            extended: false,
            offset,
            reason: reason.into(),
        });
        set_policy(policy, off, self.std_extent(off), Dword::Emulated);
        match id {
            cap_id::MSI => self.msi = None,
            cap_id::MSIX => self.msix = None,
            _ => {}
        }
    }
}

/// A BAR the device has: its kind (from its register) and its region.
pub(super) type BarDef = (BarKind, RegionInfo);

/// Stage 3: BAR kinds from the device's BAR registers, sizes from its regions (`regions[i]`,
/// `None` where the backend gave no region info). The upper half of a 64-bit BAR is no BAR
/// of its own; a 64-bit BAR in BAR5, which has no sixth register, is left out.
pub(super) fn bar_kinds(
    raw: &[u8],
    regions: &[Option<RegionInfo>; NUM_BARS],
) -> [Option<BarDef>; NUM_BARS] {
    let mut defs: [Option<BarDef>; NUM_BARS] = Default::default();
    let mut skip_next = false;
    for (i, (slot, region)) in defs.iter_mut().zip(regions.iter()).enumerate() {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        let Some(rinfo) = region.as_ref().filter(|r| r.size > 0).cloned() else {
            continue;
        };
        let off = BAR0 + 4 * i;
        let reg = raw
            .get(off..off + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0);
        let kind = BarKind::from_register(reg);
        if kind.is_64bit() {
            if i + 1 == NUM_BARS {
                log::warn!("BAR{i} declares a 64-bit BAR, which needs a sixth register; the BAR is left out");
                continue;
            }
            skip_next = true;
        }
        *slot = Some((kind, rinfo));
    }
    defs
}

/// Where the device's MSI-X table and PBA live: (BAR, piece) of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MsixPlacement {
    pub table: (usize, MsixPiece),
    pub pba: (usize, MsixPiece),
}

/// Stage 4: the device's MSI-X capability at `off` and where its table and PBA live, or why
/// MSI-X is left out (the capability runs past 0xff or is malformed, or the table or PBA lies
/// outside the BAR it names).
pub(super) fn msix_placement(
    raw: &[u8],
    off: usize,
    defs: &[Option<BarDef>; NUM_BARS],
) -> std::result::Result<(MsixState, MsixPlacement), String> {
    let end = off + MSIX_CAP_LEN;
    if end > LEGACY_CONFIG_SPACE_SIZE {
        return Err(format!("the capability at {off:#x} runs past 0xff"));
    }
    let bytes = raw
        .get(off..end)
        .ok_or_else(|| format!("the capability at {off:#x} is truncated"))?;
    let state = MsixState::from_bytes(bytes).map_err(|e| e.to_string())?;
    let t = state.table_location();
    let p = state.pba_location();
    let fits = |bir: u8, offset: u32, size: u32| {
        defs.get(usize::from(bir))
            .and_then(|d| d.as_ref())
            .is_some_and(|(_, r)| u64::from(offset) + u64::from(size) <= r.size)
    };
    if !fits(t.bir, t.offset, t.size) || !fits(p.bir, p.offset, p.size) {
        return Err(format!(
            "the table (BAR{} +{:#x}, {:#x} bytes) or PBA (BAR{} +{:#x}) lies outside its BAR",
            t.bir, t.offset, t.size, p.bir, p.offset
        ));
    }
    let piece = |offset: u32, size: u32| MsixPiece {
        offset: u64::from(offset),
        len: u64::from(size),
    };
    Ok((
        state,
        MsixPlacement {
            table: (usize::from(t.bir), piece(t.offset, t.size)),
            pba: (usize::from(p.bir), piece(p.offset, p.size)),
        },
    ))
}

/// Stage 5: what the guest sees of each BAR (size, mapped and trapped parts, the MSI-X table
/// and PBA), declared in `config`. A BAR the config space refuses is left out.
pub(super) fn bar_layouts(
    defs: [Option<BarDef>; NUM_BARS],
    msix: Option<&MsixPlacement>,
    page_size: u64,
    relocation: MsixRelocation,
    config: &mut ConfigSpace,
) -> [Option<Bar>; NUM_BARS] {
    let mut bars: [Option<Bar>; NUM_BARS] = Default::default();
    for (i, (def, slot)) in defs.into_iter().zip(bars.iter_mut()).enumerate() {
        let Some((kind, rinfo)) = def else { continue };
        let areas: Vec<SparseArea> = if kind.is_memory() {
            rinfo.mmap_areas()
        } else {
            Vec::new()
        };
        let (table, pba) = match msix {
            Some(m) => (
                (m.table.0 == i).then_some(m.table.1),
                (m.pba.0 == i).then_some(m.pba.1),
            ),
            None => (None, None),
        };
        let mut layout = BarLayout::compute(rinfo.size, &areas, table, pba, page_size, relocation);
        layout.guest_size = layout.guest_size.max(kind.min_size());
        if let Err(e) = config.declare_bar(i, kind, layout.guest_size) {
            log::warn!(
                "BAR{i} of {:#x} bytes cannot be declared ({e}); it is left out",
                layout.guest_size
            );
            continue;
        }
        *slot = Some(Bar::new(BarIndex::Bar(i as u8), kind, rinfo, layout));
    }
    bars
}

/// Stage 5, the ROM: a power of two of at least 2 KiB covering the ROM region, trapped (never
/// mapped), declared in `config`.
pub(super) fn rom(
    region: Option<RegionInfo>,
    page_size: u64,
    config: &mut ConfigSpace,
) -> Option<Bar> {
    let r = region.filter(|r| r.size > 0)?;
    let size = r
        .size
        .checked_next_power_of_two()
        .unwrap_or(r.size)
        .max(ROM_MIN_SIZE);
    if let Err(e) = config.declare_rom(size) {
        log::warn!("ROM of {size:#x} bytes cannot be declared ({e}); no ROM");
        return None;
    }
    let layout = BarLayout {
        guest_size: size,
        ..BarLayout::compute(r.size, &[], None, None, page_size, MsixRelocation::Never)
    };
    let kind = BarKind::Memory32 {
        prefetchable: false,
    };
    Some(Bar::new(BarIndex::Rom, kind, r, layout))
}

/// Stage 6: the device's MSI capability at `off`, if usable: complete, and inside the first
/// 256 bytes.
pub(super) fn msi_state(raw: &[u8], off: usize) -> Option<MsiState> {
    let end = (off + MSI_MAX_LEN).min(raw.len());
    let state = MsiState::from_bytes(raw.get(off..end)?).ok()?;
    (off + state.cap_len() <= LEGACY_CONFIG_SPACE_SIZE).then_some(state)
}

/// Stage 6: the INTx pin the guest sees: the device's (1..=4, INTA#..INTD#) when the backend
/// has an INTx interrupt, else none.
pub(super) fn intx_pin(pin: u8, intx_count: u32) -> Option<u8> {
    (intx_count > 0 && (1..=4).contains(&pin)).then_some(pin)
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use super::*;
    use vfio_backend::RegionInfo;

    /// A type-0 header with a capability list at 0x40: `caps` as (id, body length).
    fn config_with(caps: &[(u8, usize)], size: usize) -> Vec<u8> {
        let mut raw = vec![0u8; size];
        raw[0..4].copy_from_slice(&0x1234_8086u32.to_le_bytes());
        raw[0x06] = 0x10; // status: capabilities list
        let mut off = 0x40;
        if !caps.is_empty() {
            raw[0x34] = 0x40;
        }
        for (i, &(id, len)) in caps.iter().enumerate() {
            raw[off] = id;
            let next = if i + 1 < caps.len() { off + len } else { 0 };
            raw[off + 1] = next as u8;
            off += len;
        }
        raw
    }

    fn region(size: u64) -> Option<RegionInfo> {
        Some(RegionInfo {
            index: 0,
            size,
            offset: 0,
            ..RegionInfo::default()
        })
    }

    #[test]
    fn the_header_is_emulated_except_command_and_status_and_past_the_region_reads_zeros() {
        let p = header_policy(256);
        assert!(p[..16].iter().enumerate().all(|(i, d)| {
            *d == if i == 1 {
                Dword::Command
            } else {
                Dword::Emulated
            }
        }));
        assert!(p[16..64].iter().all(|d| *d == Dword::Passthrough));
        assert!(p[64..].iter().all(|d| *d == Dword::Emulated));
        let p = header_policy(4096);
        assert!(p[16..].iter().all(|d| *d == Dword::Passthrough));
    }

    #[test]
    fn msi_and_msix_are_kept_emulated_and_others_passed_through() {
        let raw = config_with(
            &[
                (cap_id::POWER_MANAGEMENT, 8),
                (cap_id::MSI, 16),
                (cap_id::MSIX, 12),
            ],
            256,
        );
        let mut config = initial_config(&raw).unwrap();
        let mut policy = header_policy(256);
        let caps =
            Capabilities::plan(&raw, &mut config, &mut policy, &DeviceOptions::default()).unwrap();
        assert_eq!(caps.msi, Some(0x48));
        assert_eq!(caps.msix, Some(0x58));
        let emulated: Vec<_> = caps.kept.iter().map(|k| (k.offset, k.emulated)).collect();
        assert_eq!(emulated, [(0x40, false), (0x48, true), (0x58, true)]);
        // Headers are ours; the PM body is the device's.
        assert_eq!(policy[0x40 / 4], Dword::Emulated);
        assert_eq!(policy[0x44 / 4], Dword::Passthrough);
        assert!(caps.hidden.is_empty());
    }

    #[test]
    fn a_capability_the_vmm_hides_leaves_the_chain_and_its_body_is_emulated() {
        let raw = config_with(
            &[(cap_id::POWER_MANAGEMENT, 8), (cap_id::VENDOR_SPECIFIC, 16)],
            256,
        );
        let mut config = initial_config(&raw).unwrap();
        let mut policy = header_policy(256);
        let options = DeviceOptions {
            hide_capabilities: vec![cap_id::VENDOR_SPECIFIC],
            ..DeviceOptions::default()
        };
        let caps = Capabilities::plan(&raw, &mut config, &mut policy, &options).unwrap();
        assert_eq!(caps.kept.len(), 1);
        assert_eq!(caps.hidden.len(), 1);
        assert_eq!(caps.hidden[0].offset, 0x48);
        // Up to 0x100 (the last capability): the guest reads attach-time values.
        assert!(policy[0x48 / 4..0x100 / 4]
            .iter()
            .all(|d| *d == Dword::Emulated));
        assert_eq!(config.read_u8(0x41).unwrap(), 0, "PM now ends the chain");
    }

    #[test]
    fn a_broken_chain_ends_at_the_last_good_capability_and_nothing_past_it_is_forwarded() {
        let mut raw = config_with(
            &[(cap_id::PCI_EXPRESS, 0x3c), (cap_id::POWER_MANAGEMENT, 8)],
            256,
        );
        raw[0x7d] = 0x20; // PM's next pointer into the header: broken
        let mut config = initial_config(&raw).unwrap();
        let mut policy = header_policy(256);
        let caps =
            Capabilities::plan(&raw, &mut config, &mut policy, &DeviceOptions::default()).unwrap();
        assert_eq!(caps.kept.len(), 2);
        assert_eq!(config.read_u8(0x7d).unwrap(), 0, "the chain ends at PM");
        // PCIe body forwarded (0x3c bytes), PM body forwarded (8 bytes), the rest emulated.
        assert_eq!(policy[0x44 / 4], Dword::Passthrough);
        assert_eq!(policy[0x80 / 4], Dword::Passthrough);
        assert!(policy[0x84 / 4..0x100 / 4]
            .iter()
            .all(|d| *d == Dword::Emulated));
    }

    #[test]
    fn sriov_is_hidden_by_default_and_its_body_reads_zeros() {
        let mut raw = config_with(&[], 4096);
        // AER at 0x100 -> SR-IOV at 0x148 -> end.
        raw[0x100..0x104]
            .copy_from_slice(&(u32::from(ext_cap_id::AER) | 1 << 16 | 0x148 << 20).to_le_bytes());
        raw[0x148..0x14c].copy_from_slice(&(u32::from(ext_cap_id::SRIOV) | 1 << 16).to_le_bytes());
        raw[0x150] = 0xaa;
        let mut config = initial_config(&raw).unwrap();
        let mut policy = header_policy(4096);
        let caps =
            Capabilities::plan(&raw, &mut config, &mut policy, &DeviceOptions::default()).unwrap();
        assert_eq!(caps.hidden.len(), 1);
        assert!(caps.hidden[0].extended && caps.hidden[0].id == ext_cap_id::SRIOV);
        assert_eq!(config.read_u8(0x150).unwrap(), 0);
        assert_eq!(policy[0x150 / 4], Dword::Emulated);
        assert_eq!(
            policy[0x104 / 4],
            Dword::Passthrough,
            "AER's body is the device's"
        );
    }

    #[test]
    fn bar_kinds_pair_64bit_halves_and_leave_out_a_64bit_bar5() {
        let mut raw = vec![0u8; 256];
        raw[0x10] = 0x04; // BAR0: 64-bit memory (BAR1 is its upper half)
        raw[0x18] = 0x01; // BAR2: I/O
        raw[0x1c] = 0x08; // BAR3: 32-bit prefetchable
        raw[0x24] = 0x04; // BAR5: 64-bit, with no sixth register
        let regions = [
            region(0x4000),
            region(0x4000),
            region(0x20),
            region(0x1000),
            None,
            region(0x1000),
        ];
        let defs = bar_kinds(&raw, &regions);
        assert_eq!(
            defs[0].as_ref().map(|d| d.0),
            Some(BarKind::Memory64 {
                prefetchable: false
            })
        );
        assert!(defs[1].is_none(), "the upper half");
        assert_eq!(defs[2].as_ref().map(|d| d.0), Some(BarKind::Io));
        assert_eq!(
            defs[3].as_ref().map(|d| d.0),
            Some(BarKind::Memory32 { prefetchable: true })
        );
        assert!(defs[4].is_none(), "no region");
        assert!(defs[5].is_none(), "64-bit in BAR5");
    }

    #[test]
    fn msix_is_left_out_when_its_table_lies_outside_its_bar() {
        let mut raw = config_with(&[(cap_id::MSIX, 12)], 256);
        raw[0x42..0x44].copy_from_slice(&7u16.to_le_bytes()); // 8 vectors: 128-byte table
        raw[0x44..0x48].copy_from_slice(&0x0000_0f80u32.to_le_bytes()); // BAR0 +0xf80
        raw[0x48..0x4c].copy_from_slice(&0x0000_0800u32.to_le_bytes()); // PBA BAR0 +0x800
        let mut defs: [Option<BarDef>; NUM_BARS] = Default::default();
        defs[0] = Some((
            BarKind::Memory32 {
                prefetchable: false,
            },
            region(0x1000).unwrap(),
        ));
        let (_, m) = msix_placement(&raw, 0x40, &defs).unwrap();
        assert_eq!(
            m.table,
            (
                0,
                MsixPiece {
                    offset: 0xf80,
                    len: 128
                }
            )
        );
        assert_eq!(m.pba.0, 0);
        defs[0] = Some((
            BarKind::Memory32 {
                prefetchable: false,
            },
            region(0xf80).unwrap(),
        ));
        let e = msix_placement(&raw, 0x40, &defs).unwrap_err();
        assert!(e.contains("lies outside its BAR"), "{e}");
        let e = msix_placement(&raw, 0xf8, &defs).unwrap_err();
        assert!(e.contains("runs past 0xff"), "{e}");
    }

    #[test]
    fn the_rom_is_at_least_2k_and_a_power_of_two() {
        let mut config = ConfigSpace::new();
        let rom = rom(region(0x900), 4096, &mut config).unwrap();
        assert_eq!(rom.layout.guest_size, 0x1000);
        assert!(rom.index.is_rom());
        let mut config = ConfigSpace::new();
        assert_eq!(
            super::rom(region(0x10), 4096, &mut config)
                .unwrap()
                .layout
                .guest_size,
            0x800
        );
        assert!(super::rom(region(0), 4096, &mut config).is_none());
    }

    #[test]
    fn intx_needs_a_pin_and_an_interrupt() {
        assert_eq!(intx_pin(1, 1), Some(1));
        assert_eq!(intx_pin(4, 1), Some(4));
        assert_eq!(intx_pin(5, 1), None);
        assert_eq!(intx_pin(0, 1), None);
        assert_eq!(intx_pin(1, 0), None);
    }

    #[test]
    fn an_msi_capability_running_past_0xff_is_unusable() {
        let mut raw = config_with(&[(cap_id::MSI, 24)], 256);
        raw[0x42] = 0x80; // 64-bit: 14 bytes
        assert!(msi_state(&raw, 0x40).is_some());
        let mut raw = vec![0u8; 256];
        raw[0xf4] = cap_id::MSI;
        raw[0xf6] = 0x80;
        assert!(msi_state(&raw, 0xf4).is_none());
    }

    #[test]
    fn the_plan_hides_an_unusable_msix_and_clears_a_pin_without_intx() {
        let mut raw = config_with(&[(cap_id::MSIX, 12)], 256);
        raw[0x10] = 0x00; // BAR0: 32-bit memory
        raw[0x3d] = 1; // INTA#
        raw[0x42..0x44].copy_from_slice(&7u16.to_le_bytes());
        raw[0x44..0x48].copy_from_slice(&0x0000_2000u32.to_le_bytes()); // past BAR0's end
        raw[0x48..0x4c].copy_from_slice(&0x0000_0800u32.to_le_bytes());
        let probe = Probe {
            raw,
            regions: [region(0x1000), None, None, None, None, None],
            rom: None,
            intx_count: 0,
        };
        let plan = AttachPlan::build(&probe, &DeviceOptions::default(), 4096).unwrap();
        assert!(plan.msix.is_none());
        assert_eq!(plan.caps.hidden.len(), 1);
        assert_eq!(plan.caps.hidden[0].id, u16::from(cap_id::MSIX));
        assert!(plan.caps.kept.is_empty());
        assert_eq!(
            plan.config.read_u8(0x3d).unwrap(),
            0,
            "no INTx: the pin reads 0"
        );
        assert!(plan.intx_pin.is_none());
        assert!(plan.bars[0].is_some());
        // With a table inside BAR0 and an INTx interrupt, both are kept.
        let mut probe = probe;
        probe.raw[0x44..0x48].copy_from_slice(&0x0000_0000u32.to_le_bytes());
        probe.intx_count = 1;
        let plan = AttachPlan::build(&probe, &DeviceOptions::default(), 4096).unwrap();
        let m = plan.msix.as_ref().unwrap();
        assert_eq!(m.table.0, 0);
        assert_eq!(plan.intx_pin, Some(1));
        assert_eq!(plan.policy[0x40 / 4], Dword::Msix);
    }
}
