//! The guest's PCI bus 0: a host bridge at 00:00.0, passed-through functions at 00:01.0,
//! 00:02.0, ..., configuration mechanism #1 (ports 0xCF8 and 0xCFC..0xCFF), and the map of the
//! address ranges their BARs decode at, kept up to date from what each config write reports.
//!
//! Nothing here needs KVM: the vCPU loop (`vmm.rs`) hands port and MMIO exits to it.
//! Only the first 256 bytes of each function's config space are reachable: mechanism #1
//! addresses no more, and the enhanced mechanism (ECAM) would need an ACPI MCFG table.

use std::collections::BTreeMap;
use std::sync::Arc;

use vfio_passthrough::vfio_pci::{
    AddressSpace, BarIndex, BarRange, ConfigWriteOutcome, VfioPciDevice,
};

/// Most passed-through functions: each gets one of the IOAPIC pins 16..=23 for INTx (shared
/// round robin past 8) and a block of [`GSIS_PER_DEVICE`] GSIs for MSI/MSI-X, below KVM's
/// 4096 routes.
pub const MAX_DEVICES: usize = 15;
/// GSIs per device for MSI and MSI-X vectors (the largest table a device may have).
pub const GSIS_PER_DEVICE: u32 = 256;
/// First GSI of the MSI blocks: GSIs 0..24 are the IOAPIC pins.
pub const FIRST_MSI_GSI: u32 = 24;
/// The IOAPIC pin of device `slot` (1-based) INTx, whatever pin (A-D) the function uses.
pub fn intx_pin(slot: u8) -> u8 {
    16 + (slot.saturating_sub(1) % 8)
}
/// The MSI GSIs of device `slot` (1-based).
pub fn msi_gsis(slot: u8) -> std::ops::Range<u32> {
    let start = FIRST_MSI_GSI + u32::from(slot.saturating_sub(1)) * GSIS_PER_DEVICE;
    start..start + GSIS_PER_DEVICE
}

/// CONFIG_ADDRESS of mechanism #1 (a dword register).
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// CONFIG_DATA of mechanism #1: 0xCFC..=0xCFF, byte, word or dword.
pub const CONFIG_DATA: u16 = 0xcfc;
/// The host bridge's vendor (Red Hat, Inc., whose 0x0008 is a generic PCIe host bridge).
pub const HOST_BRIDGE_VENDOR: u16 = 0x1b36;
/// The host bridge's device id.
pub const HOST_BRIDGE_DEVICE: u16 = 0x0008;
/// Class code of a host bridge (base 0x06, sub 0x00, interface 0x00): Linux's mechanism #1
/// sanity check looks for one on bus 0.
pub const HOST_BRIDGE_CLASS: u32 = 0x06_0000;

const ENABLE: u32 = 1 << 31;

/// The 256 bytes the host bridge shows: ids, class, header type 0, nothing writable.
fn host_bridge_config() -> [u8; 256] {
    let mut c = [0u8; 256];
    c[0..2].copy_from_slice(&HOST_BRIDGE_VENDOR.to_le_bytes());
    c[2..4].copy_from_slice(&HOST_BRIDGE_DEVICE.to_le_bytes());
    // Revision 0, then the class code in bytes 9..12.
    c[8..12].copy_from_slice(&(HOST_BRIDGE_CLASS << 8).to_le_bytes());
    c
}

/// One range of the bus map: BAR `bar` of the device at `slot` decodes `base..base + size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// First address (or port).
    pub base: u64,
    /// Length.
    pub size: u64,
    /// Device number on bus 0.
    pub slot: u8,
    /// Which BAR.
    pub bar: BarIndex,
}

/// Which device BAR decodes each guest address (memory) and port (I/O), by address.
#[derive(Debug, Default)]
pub struct BarMap {
    memory: BTreeMap<u64, MapEntry>,
    io: BTreeMap<u64, MapEntry>,
}

impl BarMap {
    fn space(&self, space: AddressSpace) -> &BTreeMap<u64, MapEntry> {
        match space {
            AddressSpace::Memory => &self.memory,
            AddressSpace::Io => &self.io,
        }
    }

    fn space_mut(&mut self, space: AddressSpace) -> &mut BTreeMap<u64, MapEntry> {
        match space {
            AddressSpace::Memory => &mut self.memory,
            AddressSpace::Io => &mut self.io,
        }
    }

    /// The entry that decodes `addr`, if any.
    pub fn lookup(&self, space: AddressSpace, addr: u64) -> Option<MapEntry> {
        self.space(space)
            .range(..=addr)
            .next_back()
            .map(|(_, e)| *e)
            .filter(|e| addr - e.base < e.size)
    }

    /// Every entry of `space`, by address.
    pub fn entries(&self, space: AddressSpace) -> Vec<MapEntry> {
        self.space(space).values().copied().collect()
    }

    /// Adds a range; one that overlaps a range already mapped is refused (logged): two BARs
    /// placed on each other by the guest decode nowhere until one moves away.
    fn insert(&mut self, space: AddressSpace, range: BarRange, slot: u8, bar: BarIndex) -> bool {
        let end = range.base.saturating_add(range.size);
        let overlap = self
            .space(space)
            .range(..end)
            .next_back()
            .is_some_and(|(_, e)| e.base.saturating_add(e.size) > range.base);
        if overlap || range.size == 0 {
            log::warn!(
                "00:{slot:02x}.0 {bar} at {:#x}+{:#x} overlaps another BAR: not routed",
                range.base,
                range.size
            );
            return false;
        }
        self.space_mut(space).insert(
            range.base,
            MapEntry {
                base: range.base,
                size: range.size,
                slot,
                bar,
            },
        );
        true
    }

    /// Removes the range of `slot`'s `bar` at `base`, if that is what is mapped there.
    fn remove(&mut self, space: AddressSpace, base: u64, slot: u8, bar: BarIndex) {
        let map = self.space_mut(space);
        if map
            .get(&base)
            .is_some_and(|e| e.slot == slot && e.bar == bar)
        {
            map.remove(&base);
        }
    }

    fn remove_slot(&mut self, slot: u8) {
        self.memory.retain(|_, e| e.slot != slot);
        self.io.retain(|_, e| e.slot != slot);
    }
}

/// Where a BAR access goes: the device, its number on bus 0, the BAR and the offset in it.
#[derive(Clone)]
pub struct Routed {
    /// Device number on bus 0.
    pub slot: u8,
    /// The device.
    pub device: Arc<VfioPciDevice>,
    /// Which BAR.
    pub bar: BarIndex,
    /// Offset in the BAR.
    pub offset: u64,
}

impl std::fmt::Debug for Routed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "00:{:02x}.0 {} +{:#x}", self.slot, self.bar, self.offset)
    }
}

/// A decoded CONFIG_ADDRESS: which function and which byte of its config space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigTarget {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
    /// Byte offset in config space (0..256).
    pub offset: u64,
}

/// Decodes CONFIG_ADDRESS `address` for an access at data port `port` (0xCFC..=0xCFF):
/// `None` when the enable bit is clear, or when bits 27:24 (AMD's extended register number,
/// which would reach past 256 bytes) are set.
pub fn decode_config_address(address: u32, port: u16) -> Option<ConfigTarget> {
    if address & ENABLE == 0 || address & 0x0f00_0000 != 0 {
        return None;
    }
    let byte = u64::from(port.checked_sub(CONFIG_DATA)?);
    Some(ConfigTarget {
        bus: (address >> 16) as u8,
        device: ((address >> 11) & 0x1f) as u8,
        function: ((address >> 8) & 0x7) as u8,
        offset: u64::from(address & 0xfc) + byte,
    })
}

/// PCI bus 0 of the guest.
#[derive(Default)]
pub struct PciBus {
    address: u32,
    devices: Vec<Arc<VfioPciDevice>>,
    map: BarMap,
}

impl std::fmt::Debug for PciBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciBus")
            .field("address", &format_args!("{:#x}", self.address))
            .field("devices", &self.devices.len())
            .field("map", &self.map)
            .finish()
    }
}

impl PciBus {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        Self::default()
    }

    /// Plugs `device` in at the next device number (1, 2, ...) and routes the BARs that
    /// decode now. Returns the device number, or `None` when the bus is full.
    pub fn add(&mut self, device: Arc<VfioPciDevice>) -> Option<u8> {
        if self.devices.len() >= MAX_DEVICES {
            return None;
        }
        self.devices.push(device);
        let slot = u8::try_from(self.devices.len()).ok()?;
        self.resync(slot);
        Some(slot)
    }

    /// The device at device number `slot`.
    pub fn device(&self, slot: u8) -> Option<&Arc<VfioPciDevice>> {
        self.devices.get(usize::from(slot).checked_sub(1)?)
    }

    /// The devices, the first at device number 1.
    pub fn devices(&self) -> &[Arc<VfioPciDevice>] {
        &self.devices
    }

    /// The BAR ranges routed now.
    pub fn map(&self) -> &BarMap {
        &self.map
    }

    /// The device (with its device number), BAR and offset that decode `addr` of `space`.
    pub fn lookup(&self, space: AddressSpace, addr: u64) -> Option<Routed> {
        let e = self.map.lookup(space, addr)?;
        let device = self.device(e.slot)?.clone();
        Some(Routed {
            slot: e.slot,
            device,
            bar: e.bar,
            offset: addr - e.base,
        })
    }

    /// Whether `port` is one of mechanism #1's.
    pub fn is_config_port(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_DATA + 4).contains(&port)
    }

    /// A guest read of `data.len()` bytes at `port` (one of [`is_config_port`](Self::is_config_port)).
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        match decode_config_address(self.address, port) {
            Some(t) if port >= CONFIG_DATA => self.config_read(t, data),
            // Not a dword at 0xCF8 (those bytes are other chipset registers), or no
            // function addressed: nobody answers.
            _ => data.fill(0xff),
        }
    }

    /// A guest write of `data` at `port` (one of [`is_config_port`](Self::is_config_port)).
    /// An error is a device failure; the map is resynchronised from the device first.
    pub fn pio_write(
        &mut self,
        port: u16,
        data: &[u8],
    ) -> Result<(), (u8, vfio_passthrough::vfio_pci::Error)> {
        if port == CONFIG_ADDRESS {
            if let Ok(v) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(v);
            }
            // Byte and word writes at 0xCF8..0xCFB are not CONFIG_ADDRESS: ignored.
            return Ok(());
        }
        if port < CONFIG_DATA {
            return Ok(());
        }
        match decode_config_address(self.address, port) {
            Some(t) => self.config_write(t, data),
            None => Ok(()),
        }
    }

    /// Reads config space of the function `t` names; absent functions read all ones.
    pub fn config_read(&self, t: ConfigTarget, data: &mut [u8]) {
        data.fill(0xff);
        if t.bus != 0 || t.function != 0 {
            return;
        }
        if t.device == 0 {
            let bridge = host_bridge_config();
            let start = usize::try_from(t.offset).unwrap_or(usize::MAX);
            if let Some(src) = start
                .checked_add(data.len())
                .and_then(|end| bridge.get(start..end))
            {
                data.copy_from_slice(src);
            }
            return;
        }
        if let Some(dev) = self.device(t.device) {
            dev.read_config(t.offset, data);
        }
    }

    /// Writes config space of the function `t` names and applies what the write changed to
    /// the bus map. The host bridge and absent functions ignore writes.
    pub fn config_write(
        &mut self,
        t: ConfigTarget,
        data: &[u8],
    ) -> Result<(), (u8, vfio_passthrough::vfio_pci::Error)> {
        if t.bus != 0 || t.function != 0 || t.device == 0 {
            return Ok(());
        }
        let slot = t.device;
        let Some(dev) = self.device(slot).cloned() else {
            return Ok(());
        };
        match dev.write_config(t.offset, data) {
            Ok(outcome) => {
                self.apply(slot, &outcome);
                Ok(())
            }
            Err(e) => {
                // What changed is not reported: take it from the device.
                self.resync(slot);
                Err((slot, e))
            }
        }
    }

    /// Applies a config write's outcome: ranges that moved, stopped or started decoding.
    pub fn apply(&mut self, slot: u8, outcome: &ConfigWriteOutcome) {
        for change in outcome.bar_changes() {
            if let Some(old) = change.removed() {
                log::debug!(
                    "00:{slot:02x}.0 {} no longer at {:#x}",
                    change.bar,
                    old.base
                );
                self.map.remove(change.space, old.base, slot, change.bar);
            }
            if let Some(new) = change.added() {
                log::debug!(
                    "00:{slot:02x}.0 {} now at {:#x}+{:#x}",
                    change.bar,
                    new.base,
                    new.size
                );
                self.map.insert(change.space, new, slot, change.bar);
            }
        }
    }

    /// Rebuilds `slot`'s part of the map from what the device says decodes now.
    pub fn resync(&mut self, slot: u8) {
        self.map.remove_slot(slot);
        let Some(dev) = self.device(slot).cloned() else {
            return;
        };
        for bar in dev.bars() {
            if let (true, Some(base)) = (bar.decoding, bar.base) {
                let range = BarRange {
                    base,
                    size: bar.guest_size,
                };
                self.map.insert(bar.space(), range, slot, bar.index);
            }
        }
    }
}
