//! The description of a fake PCI function: configuration space bytes, BARs,
//! ROM, register blocks and DMA window, plus the masks that say which config
//! bits a driver may change.

use std::ops::RangeInclusive;

use crate::error::{invalid, FakeResult};
use crate::lspci;

/// The page size the fake uses for mmap granularity and DMA alignment.
pub const PAGE_SIZE: u64 = 4096;

/// Size of a conventional PCI configuration space.
pub const PCI_CONFIG_SIZE: usize = pci_config::LEGACY_CONFIG_SPACE_SIZE;
/// Size of a PCI Express (extended) configuration space.
pub const PCIE_CONFIG_SIZE: usize = pci_config::CONFIG_SPACE_SIZE;

/// The largest BAR the fake backs with memory (64 GiB, sparse).
pub const MAX_BAR_SIZE: u64 = 64 << 30;
/// The largest expansion ROM the fake accepts (16 MiB).
pub const MAX_ROM_SIZE: u64 = 16 << 20;

/// Capability ids: pci-config's, the one PCI vocabulary of the workspace (the fake keeps its own
/// decoding logic, as the test oracle, but names things as pci-config does).
pub use pci_config::{cap_id, ext_cap_id};

/// What kind of address space a BAR decodes, and whether memory is prefetchable: pci-config's
/// [`BarKind`](pci_config::BarKind), the one of the workspace.
pub use pci_config::BarKind;

/// One base address register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BarSpec {
    /// Address space.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least 16 (memory) or 4 (I/O).
    pub size: u64,
}

impl BarSpec {
    /// A 32-bit, non-prefetchable memory BAR of `size` bytes.
    pub fn mem32(size: u64) -> Self {
        BarSpec {
            kind: BarKind::Memory32 {
                prefetchable: false,
            },
            size,
        }
    }

    /// A 64-bit, non-prefetchable memory BAR of `size` bytes.
    pub fn mem64(size: u64) -> Self {
        BarSpec {
            kind: BarKind::Memory64 {
                prefetchable: false,
            },
            size,
        }
    }

    /// An I/O BAR of `size` bytes.
    pub fn io(size: u64) -> Self {
        BarSpec {
            kind: BarKind::Io,
            size,
        }
    }

    /// The same BAR, prefetchable (an I/O BAR stays as it is: it has no such bit).
    pub fn prefetchable(mut self) -> Self {
        self.kind = match self.kind {
            BarKind::Memory32 { .. } => BarKind::Memory32 { prefetchable: true },
            BarKind::Memory64 { .. } => BarKind::Memory64 { prefetchable: true },
            BarKind::Io => BarKind::Io,
        };
        self
    }

    /// Prefetchable memory.
    pub fn is_prefetchable(&self) -> bool {
        matches!(
            self.kind,
            BarKind::Memory32 { prefetchable: true } | BarKind::Memory64 { prefetchable: true }
        )
    }

    /// A memory (not I/O) BAR.
    pub fn is_memory(&self) -> bool {
        self.kind != BarKind::Io
    }

    /// The read-only flag bits of the lower BAR register (bits 3:0).
    pub fn flag_bits(&self) -> u32 {
        match self.kind {
            BarKind::Io => 0x1,
            BarKind::Memory32 { prefetchable } => {
                if prefetchable {
                    0x8
                } else {
                    0
                }
            }
            BarKind::Memory64 { prefetchable } => {
                if prefetchable {
                    0xc
                } else {
                    0x4
                }
            }
        }
    }

    /// The address bits of the lower BAR register that a driver may set.
    pub fn low_address_mask(&self) -> u32 {
        let flags_mask: u32 = if self.kind == BarKind::Io { !0x3 } else { !0xf };
        // Sizes are validated powers of two >= 4, so size - 1 cannot wrap.
        let mask = !(self.size.wrapping_sub(1));
        (mask as u32) & flags_mask
    }

    /// The address bits of the upper register of a 64-bit BAR.
    pub fn high_address_mask(&self) -> u32 {
        (!(self.size.wrapping_sub(1)) >> 32) as u32
    }

    fn validate(&self, index: usize) -> FakeResult<()> {
        let s = self.size;
        if !s.is_power_of_two() {
            return Err(invalid(format!(
                "BAR {index}: size {s:#x} is not a power of two"
            )));
        }
        match self.kind {
            BarKind::Io => {
                if !(4..=256).contains(&s) {
                    return Err(invalid(format!(
                        "BAR {index}: I/O BAR size {s:#x} outside 4..=256 bytes"
                    )));
                }
            }
            BarKind::Memory32 { .. } => {
                if !(16..=(1 << 31)).contains(&s) {
                    return Err(invalid(format!(
                        "BAR {index}: 32-bit memory BAR size {s:#x} outside 16 bytes..=2 GiB"
                    )));
                }
            }
            BarKind::Memory64 { .. } => {
                if s < 16 {
                    return Err(invalid(format!(
                        "BAR {index}: memory BAR size {s:#x} below 16 bytes"
                    )));
                }
            }
        }
        if s > MAX_BAR_SIZE {
            return Err(invalid(format!(
                "BAR {index}: size {s:#x} above the fake's limit of {MAX_BAR_SIZE:#x}"
            )));
        }
        Ok(())
    }
}

/// What a range of a BAR does when it is read or written through
/// [`vfio_backend::Vfio::region_read`] / [`vfio_backend::Vfio::region_write`].
///
/// Ranges covered by a register block are trapped: they are left out of the
/// BAR's mmap-able areas (rounded out to whole pages), like the MSI-X table
/// of a real device behind `vfio-pci`. Everything else in a memory BAR is
/// plain shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RegisterKind {
    /// Plain memory, but trapped (never mmapped).
    Memory,
    /// Reads return the template contents; writes are ignored.
    ReadOnly,
    /// A write at `offset = k * stride` from the block start raises
    /// interrupt vector `first_vector + k`; the written value is stored
    /// (reads return it). Writes elsewhere in the block are only stored.
    Doorbell {
        /// The vector raised by a write at the block's start.
        first_vector: u32,
        /// Bytes between two doorbells (at least 1).
        stride: u32,
    },
    /// A memory-to-memory DMA engine, see [`crate::dma_engine`] for the
    /// register layout. It reads and writes through the device's DMA
    /// mappings.
    DmaEngine {
        /// The vector raised on completion when the command asks for it.
        irq_vector: u32,
    },
    /// The register file of QEMU's `edu` device (see [`crate::edu`]); the
    /// block must start at offset 0 of a BAR of at least
    /// [`crate::edu::BAR_SIZE_MIN`] bytes.
    Edu,
    /// The MSI-X table (trapped plain memory). Added automatically from the
    /// MSI-X capability.
    MsixTable,
    /// The MSI-X pending bit array (read-only, no vector ever pending).
    /// Added automatically from the MSI-X capability.
    MsixPba,
}

/// A trapped range of a BAR with register semantics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RegisterBlock {
    /// BAR index (0 to 5).
    pub bar: u8,
    /// Offset of the block in the BAR.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// What accesses do.
    pub kind: RegisterKind,
}

impl RegisterBlock {
    fn end(&self) -> u64 {
        self.offset.saturating_add(self.size)
    }
}

/// Initial bytes of a BAR (restored on reset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BarContents {
    /// BAR index.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// Where the MSI capability is and what it offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiInfo {
    /// Offset of the capability in config space.
    pub offset: usize,
    /// Vectors the function can request (Multiple Message Capable).
    pub vectors: u32,
    /// 64-bit message address.
    pub addr64: bool,
    /// Per-vector masking.
    pub per_vector_mask: bool,
}

/// Where the MSI-X capability, table and PBA are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixInfo {
    /// Offset of the capability in config space.
    pub offset: usize,
    /// Table size (number of vectors).
    pub vectors: u32,
    /// BAR holding the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u64,
    /// BAR holding the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u64,
}

impl MsixInfo {
    /// Size of the table in bytes (16 per vector).
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * 16
    }

    /// Size of the PBA in bytes (one bit per vector, whole QWORDs).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// A standard capability for [`TemplateBuilder::capability`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Capability {
    /// Power Management, version 3 (8 bytes).
    PowerManagement,
    /// MSI.
    Msi {
        /// Vectors: a power of two from 1 to 32.
        vectors: u32,
        /// 64-bit message address.
        addr64: bool,
        /// Per-vector mask and pending bits.
        per_vector_mask: bool,
    },
    /// MSI-X.
    Msix {
        /// Table size, 1 to 2048.
        vectors: u32,
        /// BAR of the table.
        table_bar: u8,
        /// Offset of the table in its BAR (8-byte aligned).
        table_offset: u32,
        /// BAR of the PBA.
        pba_bar: u8,
        /// Offset of the PBA in its BAR (8-byte aligned).
        pba_offset: u32,
    },
    /// PCI Express capability, version 2, for an endpoint of the given
    /// device/port type (0 = PCIe endpoint, 9 = root complex integrated
    /// endpoint). Makes the config space 4096 bytes. The function advertises
    /// function-level reset.
    PciExpress {
        /// Device/port type (bits 7:4 of the capabilities register).
        device_type: u8,
    },
    /// Vendor-specific capability with the given payload (after the
    /// id, next and length bytes).
    VendorSpecific(Vec<u8>),
}

impl Capability {
    fn len(&self) -> usize {
        match self {
            Capability::PowerManagement => 8,
            Capability::Msi {
                addr64,
                per_vector_mask,
                ..
            } => match (addr64, per_vector_mask) {
                (false, false) => 0x0c,
                (true, false) => 0x10,
                (false, true) => 0x14,
                (true, true) => 0x18,
            },
            Capability::Msix { .. } => 0x0c,
            Capability::PciExpress { .. } => 0x3c,
            Capability::VendorSpecific(p) => 3usize.saturating_add(p.len()),
        }
    }
}

/// An extended capability (config space 0x100 and up) for
/// [`TemplateBuilder::ext_capability`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtCapability {
    /// Advanced Error Reporting, version 2 (0x48 bytes).
    Aer,
    /// SR-IOV, version 1 (0x40 bytes).
    SrIov {
        /// TotalVFs and InitialVFs.
        total_vfs: u16,
        /// Device id of the virtual functions.
        vf_device_id: u16,
    },
    /// Resizable BAR, version 1: one entry per BAR.
    ResizableBar(Vec<ResizableBarEntry>),
    /// Any other capability: id, version and the body after the header.
    Raw {
        /// Capability id.
        id: u16,
        /// Capability version (4 bits).
        version: u8,
        /// Bytes after the 4-byte header.
        body: Vec<u8>,
    },
}

/// One BAR of a resizable BAR capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResizableBarEntry {
    /// BAR index.
    pub bar: u8,
    /// Supported sizes: bit n means 1 MiB << n.
    pub sizes: u32,
    /// Current size encoding (1 MiB << current).
    pub current: u8,
}

impl ExtCapability {
    fn len(&self) -> usize {
        match self {
            ExtCapability::Aer => 0x48,
            ExtCapability::SrIov { .. } => 0x40,
            ExtCapability::ResizableBar(e) => 4usize.saturating_add(e.len().saturating_mul(8)),
            ExtCapability::Raw { body, .. } => 4usize.saturating_add(body.len()),
        }
    }
}

/// The bits of config space a driver may change, derived from the bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Masks {
    /// Bits a write replaces.
    pub wmask: Vec<u8>,
    /// Bits a write of one clears.
    pub w1c: Vec<u8>,
}

/// A complete description of a fake PCI function. Build one with
/// [`DeviceTemplate::builder`], [`DeviceTemplate::from_config`],
/// [`DeviceTemplate::from_lspci`] or [`crate::profile_template`], then turn
/// it into a device with [`crate::FakeDevice::new`].
#[derive(Clone, Debug)]
pub struct DeviceTemplate {
    config: Vec<u8>,
    bars: [Option<BarSpec>; 6],
    rom: Option<Vec<u8>>,
    user_blocks: Vec<RegisterBlock>,
    contents: Vec<BarContents>,
    iova_ranges: Vec<RangeInclusive<u64>>,
    decode_check: bool,
    // Derived by `derive`.
    masks: Masks,
    msi: Option<MsiInfo>,
    msix: Option<MsixInfo>,
    blocks: Vec<RegisterBlock>,
}

/// The ROM BAR size for `len` bytes of ROM (a power of two of at least
/// 2 KiB), or an error when it is above [`MAX_ROM_SIZE`].
fn rom_bar_size(len: u64) -> FakeResult<usize> {
    let size = len
        .max(2048)
        .checked_next_power_of_two()
        .filter(|s| *s <= MAX_ROM_SIZE)
        .ok_or_else(|| {
            invalid(format!(
                "ROM of {len} bytes above the fake's limit of {MAX_ROM_SIZE} bytes (16 MiB)"
            ))
        })?;
    usize::try_from(size).map_err(|_| invalid("ROM size too large"))
}

fn rd16(c: &[u8], off: usize) -> u16 {
    let mut b = [0u8; 2];
    if let Some(s) = c.get(off..off.saturating_add(2)) {
        b.copy_from_slice(s);
    }
    u16::from_le_bytes(b)
}

fn rd32(c: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(s) = c.get(off..off.saturating_add(4)) {
        b.copy_from_slice(s);
    }
    u32::from_le_bytes(b)
}

fn wr(c: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(s) = c.get_mut(off..off.saturating_add(bytes.len())) {
        s.copy_from_slice(bytes);
    }
}

fn set_mask(m: &mut [u8], off: usize, bits: u32, width: usize) {
    let b = bits.to_le_bytes();
    if let (Some(dst), Some(src)) = (m.get_mut(off..off.saturating_add(width)), b.get(..width)) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d |= *s;
        }
    }
}

impl DeviceTemplate {
    /// A builder for a template made from scratch.
    pub fn builder() -> TemplateBuilder {
        TemplateBuilder::default()
    }

    /// A template from raw configuration space bytes (64, 256 or 4096 of
    /// them; 64 are padded to 256) and the BAR sizes (`bar_sizes[i]` for BAR
    /// register `i`; the upper half of a 64-bit BAR takes `None`).
    ///
    /// The kind of each BAR is read from its register's flag bits; a BAR
    /// register that is non-zero but has no size is refused. The ROM BAR is
    /// cleared (add a ROM with [`DeviceTemplate::with_rom`]).
    pub fn from_config(mut config: Vec<u8>, bar_sizes: &[Option<u64>]) -> FakeResult<Self> {
        match config.len() {
            64 => config.resize(PCI_CONFIG_SIZE, 0),
            PCI_CONFIG_SIZE | PCIE_CONFIG_SIZE => {}
            n => {
                return Err(invalid(format!(
                    "config space of {n} bytes (expected 64, 256 or 4096)"
                )))
            }
        }
        let header_type = config.get(0x0e).copied().unwrap_or(0) & 0x7f;
        if header_type != 0 {
            return Err(invalid(format!(
                "header type {header_type} (only type 0 functions are supported)"
            )));
        }
        if bar_sizes.len() > 6 {
            return Err(invalid(format!(
                "{} BAR sizes given (a type 0 function has 6 BAR registers)",
                bar_sizes.len()
            )));
        }
        let mut bars: [Option<BarSpec>; 6] = [None; 6];
        let mut i = 0usize;
        while i < 6 {
            let off = 0x10 + 4 * i;
            let reg = rd32(&config, off);
            let size = bar_sizes.get(i).copied().flatten();
            let Some(size) = size else {
                if reg != 0 {
                    return Err(invalid(format!(
                        "BAR {i} register is {reg:#010x} but its size is unknown"
                    )));
                }
                i += 1;
                continue;
            };
            let kind = if reg & 1 != 0 {
                BarKind::Io
            } else {
                let prefetchable = reg & 0x8 != 0;
                match (reg >> 1) & 3 {
                    0 | 1 => BarKind::Memory32 { prefetchable },
                    2 => BarKind::Memory64 { prefetchable },
                    _ => {
                        return Err(invalid(format!(
                            "BAR {i} register {reg:#010x} has the reserved memory type 3"
                        )))
                    }
                }
            };
            let spec = BarSpec { kind, size };
            spec.validate(i)?;
            let low = (reg & spec.low_address_mask()) | spec.flag_bits();
            wr(&mut config, off, &low.to_le_bytes());
            bars[i] = Some(spec);
            if kind.is_64bit() {
                if i == 5 {
                    return Err(invalid("BAR 5 cannot be a 64-bit BAR"));
                }
                if bar_sizes.get(i + 1).copied().flatten().is_some() {
                    return Err(invalid(format!(
                        "BAR {} is the upper half of 64-bit BAR {i} and cannot have a size",
                        i + 1
                    )));
                }
                let hoff = off + 4;
                let high = rd32(&config, hoff) & spec.high_address_mask();
                wr(&mut config, hoff, &high.to_le_bytes());
                i += 2;
            } else {
                i += 1;
            }
        }
        // No ROM until with_rom.
        wr(&mut config, 0x30, &[0; 4]);
        let size = config.len();
        let mut t = DeviceTemplate {
            config,
            bars,
            rom: None,
            user_blocks: Vec::new(),
            contents: Vec::new(),
            iova_ranges: vec![0..=u64::MAX],
            decode_check: true,
            masks: Masks {
                wmask: vec![0; size],
                w1c: vec![0; size],
            },
            msi: None,
            msix: None,
            blocks: Vec::new(),
        };
        t.derive()?;
        Ok(t)
    }

    /// A template from the text of `lspci -xxx` or `lspci -vvxxxx` for one
    /// function (see [`crate::lspci::parse`]). BAR sizes come from
    /// `bar_sizes` where it has `Some`, else from the dump's
    /// `Region N: ... [size=...]` lines. An `Expansion ROM ... [size=...]`
    /// line gives a zero-filled ROM of that size.
    pub fn from_lspci(text: &str, bar_sizes: Option<&[Option<u64>]>) -> FakeResult<Self> {
        let dump = lspci::parse(text)?;
        let mut sizes = dump.bar_sizes;
        if let Some(given) = bar_sizes {
            if given.len() > 6 {
                return Err(invalid(format!("{} BAR sizes given", given.len())));
            }
            for (s, g) in sizes.iter_mut().zip(given) {
                if g.is_some() {
                    *s = *g;
                }
            }
        }
        let rom_reg = rd32(&dump.config, 0x30);
        let mut t = DeviceTemplate::from_config(dump.config, &sizes)?;
        if let Some(rom) = dump.rom_size {
            t = t.with_rom_size(rom)?;
            // Keep the address the dump shows, masked to the ROM size.
            let rom_size = t.rom().map_or(0, |r| r.len() as u64);
            let mask = (!(rom_size.wrapping_sub(1)) as u32) & 0xffff_f800 | 1;
            wr(&mut t.config, 0x30, &(rom_reg & mask).to_le_bytes());
        }
        Ok(t)
    }

    /// Adds an expansion ROM with these bytes (padded with zeros to a power
    /// of two of at least 2 KiB) and sets the ROM BAR's address mask.
    pub fn with_rom(mut self, mut bytes: Vec<u8>) -> FakeResult<Self> {
        let size_usize = rom_bar_size(bytes.len() as u64)?;
        bytes.resize(size_usize, 0);
        self.rom = Some(bytes);
        wr(&mut self.config, 0x30, &[0; 4]);
        Ok(self)
    }

    /// Adds a zero-filled expansion ROM of `size` bytes (rounded up as
    /// [`DeviceTemplate::with_rom`] does). The size is checked against
    /// [`MAX_ROM_SIZE`] before anything is allocated, so a size taken from
    /// an operator or a dump (`[size=2G]`) is refused rather than allocated.
    pub fn with_rom_size(self, size: u64) -> FakeResult<Self> {
        let len = rom_bar_size(size)?;
        self.with_rom(vec![0; len])
    }

    /// Adds a trapped register block to a BAR.
    pub fn with_registers(mut self, block: RegisterBlock) -> FakeResult<Self> {
        self.user_blocks.push(block);
        self.derive()?;
        Ok(self)
    }

    /// Sets initial bytes of a BAR (also restored on reset).
    pub fn with_contents(mut self, bar: u8, offset: u64, bytes: Vec<u8>) -> FakeResult<Self> {
        let spec = self
            .bar(bar)
            .ok_or_else(|| invalid(format!("contents for BAR {bar}, which is not implemented")))?;
        let end = offset
            .checked_add(bytes.len() as u64)
            .ok_or_else(|| invalid("contents end overflows"))?;
        if end > spec.size {
            return Err(invalid(format!(
                "contents {offset:#x}..{end:#x} outside BAR {bar} of {:#x} bytes",
                spec.size
            )));
        }
        self.contents.push(BarContents { bar, offset, bytes });
        Ok(self)
    }

    /// Sets the IOVA ranges the fake IOMMU accepts for DMA mappings
    /// (default: the whole 64-bit space).
    pub fn with_iova_ranges(mut self, ranges: Vec<RangeInclusive<u64>>) -> FakeResult<Self> {
        if ranges.is_empty() {
            return Err(invalid("no IOVA range"));
        }
        if ranges.iter().any(|r| r.start() > r.end()) {
            return Err(invalid("an IOVA range ends before it starts"));
        }
        self.iova_ranges = ranges;
        Ok(self)
    }

    /// Whether BAR accesses through `region_read`/`region_write` fail with
    /// `EIO` while the command register's memory (or I/O) space bit is
    /// clear, as the kernel's `vfio-pci` does. On by default.
    pub fn with_decode_check(mut self, on: bool) -> Self {
        self.decode_check = on;
        self
    }

    /// The configuration space after reset.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Size of the configuration space (256 or 4096).
    pub fn config_size(&self) -> usize {
        self.config.len()
    }

    /// BAR `index`, when it is implemented (the upper half of a 64-bit BAR
    /// is not).
    pub fn bar(&self, index: u8) -> Option<BarSpec> {
        self.bars.get(usize::from(index)).copied().flatten()
    }

    /// The ROM bytes (padded to the ROM BAR size).
    pub fn rom(&self) -> Option<&[u8]> {
        self.rom.as_deref()
    }

    /// Every register block, including the MSI-X table and PBA.
    pub fn registers(&self) -> &[RegisterBlock] {
        &self.blocks
    }

    /// The initial BAR contents.
    pub fn contents(&self) -> &[BarContents] {
        &self.contents
    }

    /// The MSI capability, if any.
    pub fn msi(&self) -> Option<MsiInfo> {
        self.msi
    }

    /// The MSI-X capability, if any.
    pub fn msix(&self) -> Option<MsixInfo> {
        self.msix
    }

    /// The IOVA ranges accepted for DMA.
    pub fn iova_ranges(&self) -> &[RangeInclusive<u64>] {
        &self.iova_ranges
    }

    /// Whether BAR accesses require the command register's decode bits.
    pub fn decode_check(&self) -> bool {
        self.decode_check
    }

    /// The interrupt pin register (0 = no INTx, 1 = INTA# ...).
    pub fn interrupt_pin(&self) -> u8 {
        self.config.get(0x3d).copied().unwrap_or(0)
    }

    pub(crate) fn masks(&self) -> &Masks {
        &self.masks
    }

    /// Recomputes masks, MSI/MSI-X info and the register block list.
    fn derive(&mut self) -> FakeResult<()> {
        let size = self.config.len();
        let mut wm = vec![0u8; size];
        let mut w1c = vec![0u8; size];
        // Command: I/O, memory, bus master, parity error response, SERR#,
        // interrupt disable.
        set_mask(&mut wm, 0x04, 0x0547, 2);
        // Status: the error bits are RW1C.
        set_mask(&mut w1c, 0x06, 0xf900, 2);
        // Cache line size, latency timer, interrupt line.
        set_mask(&mut wm, 0x0c, 0xff, 1);
        set_mask(&mut wm, 0x0d, 0xff, 1);
        set_mask(&mut wm, 0x3c, 0xff, 1);
        let mut msi = None;
        let mut msix = None;

        let status = rd16(&self.config, 0x06);
        if status & 0x10 != 0 {
            let mut ptr = usize::from(self.config.get(0x34).copied().unwrap_or(0) & 0xfc);
            let mut seen = [false; 64];
            while (0x40..PCI_CONFIG_SIZE).contains(&ptr) {
                let slot = ptr / 4;
                match seen.get_mut(slot) {
                    Some(s) if !*s => *s = true,
                    _ => break, // a loop in the list
                }
                let id = self.config.get(ptr).copied().unwrap_or(0);
                let next = usize::from(self.config.get(ptr + 1).copied().unwrap_or(0) & 0xfc);
                match id {
                    cap_id::POWER_MANAGEMENT => {
                        set_mask(&mut wm, ptr + 4, 0x0103, 2);
                        set_mask(&mut w1c, ptr + 4, 0x8000, 2);
                    }
                    cap_id::MSI => {
                        let ctrl = rd16(&self.config, ptr + 2);
                        let addr64 = ctrl & 0x80 != 0;
                        let pvm = ctrl & 0x100 != 0;
                        let mmc = u32::from((ctrl >> 1) & 7).min(5);
                        let vectors = 1u32 << mmc;
                        set_mask(&mut wm, ptr + 2, 0x0071, 2);
                        set_mask(&mut wm, ptr + 4, 0xffff_fffc, 4);
                        let data = if addr64 {
                            set_mask(&mut wm, ptr + 8, 0xffff_ffff, 4);
                            ptr + 0x0c
                        } else {
                            ptr + 0x08
                        };
                        set_mask(&mut wm, data, 0xffff, 2);
                        if pvm {
                            let vmask = if vectors >= 32 {
                                u32::MAX
                            } else {
                                (1u32 << vectors) - 1
                            };
                            set_mask(&mut wm, data + 4, vmask, 4);
                        }
                        msi = Some(MsiInfo {
                            offset: ptr,
                            vectors,
                            addr64,
                            per_vector_mask: pvm,
                        });
                    }
                    cap_id::MSIX => {
                        let ctrl = rd16(&self.config, ptr + 2);
                        set_mask(&mut wm, ptr + 2, 0xc000, 2);
                        let table = rd32(&self.config, ptr + 4);
                        let pba = rd32(&self.config, ptr + 8);
                        msix = Some(MsixInfo {
                            offset: ptr,
                            vectors: u32::from(ctrl & 0x7ff) + 1,
                            table_bar: (table & 7) as u8,
                            table_offset: u64::from(table & !7),
                            pba_bar: (pba & 7) as u8,
                            pba_offset: u64::from(pba & !7),
                        });
                    }
                    cap_id::PCI_EXPRESS => {
                        // Device control, device status (RW1C), link
                        // control, device control 2.
                        set_mask(&mut wm, ptr + 0x08, 0x7fff, 2);
                        set_mask(&mut w1c, ptr + 0x0a, 0x000f, 2);
                        set_mask(&mut wm, ptr + 0x10, 0x0fff, 2);
                        set_mask(&mut wm, ptr + 0x28, 0xffff, 2);
                    }
                    _ => {}
                }
                ptr = next;
            }
        }

        if size == PCIE_CONFIG_SIZE {
            let mut ptr = 0x100usize;
            let mut guard = (PCIE_CONFIG_SIZE - PCI_CONFIG_SIZE) / 4;
            while (0x100..PCIE_CONFIG_SIZE).contains(&ptr) && guard > 0 {
                guard -= 1;
                let hdr = rd32(&self.config, ptr);
                if hdr == 0 || hdr == u32::MAX {
                    break;
                }
                let id = (hdr & 0xffff) as u16;
                match id {
                    ext_cap_id::AER => {
                        set_mask(&mut w1c, ptr + 0x04, 0xffff_ffff, 4);
                        set_mask(&mut wm, ptr + 0x08, 0xffff_ffff, 4);
                        set_mask(&mut wm, ptr + 0x0c, 0xffff_ffff, 4);
                        set_mask(&mut w1c, ptr + 0x10, 0xffff_ffff, 4);
                        set_mask(&mut wm, ptr + 0x14, 0xffff_ffff, 4);
                        set_mask(&mut wm, ptr + 0x18, 0x0000_0140, 4);
                    }
                    ext_cap_id::SRIOV => {
                        set_mask(&mut wm, ptr + 0x08, 0x001f, 2);
                        set_mask(&mut w1c, ptr + 0x0a, 0x0001, 2);
                        set_mask(&mut wm, ptr + 0x10, 0xffff, 2);
                        set_mask(&mut wm, ptr + 0x20, 0xffff_ffff, 4);
                    }
                    ext_cap_id::RESIZABLE_BAR => {
                        let n = ((rd32(&self.config, ptr + 8) >> 5) & 7).clamp(1, 6) as usize;
                        for k in 0..n {
                            set_mask(&mut wm, ptr + 8 + 8 * k, 0x3f00, 4);
                        }
                    }
                    _ => {}
                }
                ptr = (hdr >> 20) as usize & 0xffc;
            }
        }

        // Register blocks: the MSI-X structures first, then the user's.
        let mut blocks = Vec::new();
        if let Some(m) = msix {
            blocks.push(RegisterBlock {
                bar: m.table_bar,
                offset: m.table_offset,
                size: m.table_size(),
                kind: RegisterKind::MsixTable,
            });
            blocks.push(RegisterBlock {
                bar: m.pba_bar,
                offset: m.pba_offset,
                size: m.pba_size(),
                kind: RegisterKind::MsixPba,
            });
        }
        blocks.extend(self.user_blocks.iter().copied());
        for b in &blocks {
            let spec = self.bar(b.bar).ok_or_else(|| {
                invalid(format!(
                    "{:?} registers in BAR {}, which is not implemented",
                    b.kind, b.bar
                ))
            })?;
            let end = b
                .offset
                .checked_add(b.size)
                .ok_or_else(|| invalid("register block end overflows"))?;
            if b.size == 0 || end > spec.size {
                return Err(invalid(format!(
                    "{:?} registers {:#x}..{end:#x} outside BAR {} of {:#x} bytes",
                    b.kind, b.offset, b.bar, spec.size
                )));
            }
            match b.kind {
                RegisterKind::Doorbell { stride: 0, .. } => {
                    return Err(invalid("doorbell stride of 0"));
                }
                RegisterKind::DmaEngine { .. } if b.size < crate::dma_engine::BLOCK_SIZE => {
                    return Err(invalid(format!(
                        "DMA engine block of {:#x} bytes (needs {:#x})",
                        b.size,
                        crate::dma_engine::BLOCK_SIZE
                    )));
                }
                RegisterKind::Edu
                    if b.offset != 0
                        || b.size < crate::edu::REGISTERS_SIZE
                        || spec.size < crate::edu::BAR_SIZE_MIN =>
                {
                    return Err(invalid(
                        "edu registers must start at offset 0 of a BAR of at least 512 KiB",
                    ));
                }
                _ => {}
            }
        }
        blocks.sort_by_key(|b| (b.bar, b.offset));
        for w in blocks.windows(2) {
            if let [a, b] = w {
                if a.bar == b.bar && a.end() > b.offset {
                    return Err(invalid(format!(
                        "{:?} registers at {:#x} and {:?} registers at {:#x} of BAR {} overlap",
                        a.kind, a.offset, b.kind, b.offset, a.bar
                    )));
                }
            }
        }
        self.masks = Masks { wmask: wm, w1c };
        self.msi = msi;
        self.msix = msix;
        self.blocks = blocks;
        Ok(())
    }
}

/// Builds a [`DeviceTemplate`] from header fields, BARs and capabilities.
/// Capabilities are placed from 0x40 in the order given, extended
/// capabilities from 0x100.
#[derive(Clone, Debug, Default)]
pub struct TemplateBuilder {
    vendor: u16,
    device: u16,
    class: [u8; 3],
    revision: u8,
    subsystem: (u16, u16),
    pin: u8,
    multifunction: bool,
    bars: [Option<BarSpec>; 6],
    caps: Vec<Capability>,
    ext_caps: Vec<ExtCapability>,
    rom: Option<Vec<u8>>,
    registers: Vec<RegisterBlock>,
    contents: Vec<BarContents>,
    iova: Option<Vec<RangeInclusive<u64>>>,
    no_decode_check: bool,
    bad_bar: Option<u8>,
}

impl TemplateBuilder {
    /// Vendor and device id.
    pub fn ids(mut self, vendor: u16, device: u16) -> Self {
        self.vendor = vendor;
        self.device = device;
        self
    }

    /// Class code: base class, subclass, programming interface.
    pub fn class(mut self, base: u8, sub: u8, prog_if: u8) -> Self {
        self.class = [base, sub, prog_if];
        self
    }

    /// Revision id.
    pub fn revision(mut self, revision: u8) -> Self {
        self.revision = revision;
        self
    }

    /// Subsystem vendor and subsystem id.
    pub fn subsystem(mut self, vendor: u16, id: u16) -> Self {
        self.subsystem = (vendor, id);
        self
    }

    /// Interrupt pin (0 = none, 1 = INTA# ... 4 = INTD#).
    pub fn interrupt_pin(mut self, pin: u8) -> Self {
        self.pin = pin;
        self
    }

    /// Sets the multi-function bit of the header type register.
    pub fn multifunction(mut self, on: bool) -> Self {
        self.multifunction = on;
        self
    }

    /// BAR `index` (0 to 5). A 64-bit BAR also takes `index + 1`.
    pub fn bar(mut self, index: u8, spec: BarSpec) -> Self {
        if let Some(slot) = self.bars.get_mut(usize::from(index)) {
            *slot = Some(spec);
        } else {
            // Remembered so that build() reports it.
            self.bad_bar = Some(index);
        }
        self
    }

    /// Appends a standard capability.
    pub fn capability(mut self, cap: Capability) -> Self {
        self.caps.push(cap);
        self
    }

    /// Appends an extended capability (makes the config space 4096 bytes).
    pub fn ext_capability(mut self, cap: ExtCapability) -> Self {
        self.ext_caps.push(cap);
        self
    }

    /// An expansion ROM with these bytes.
    pub fn rom(mut self, bytes: Vec<u8>) -> Self {
        self.rom = Some(bytes);
        self
    }

    /// A trapped register block of `size` bytes at `offset` of BAR `bar`.
    pub fn registers(mut self, bar: u8, offset: u64, size: u64, kind: RegisterKind) -> Self {
        self.registers.push(RegisterBlock {
            bar,
            offset,
            size,
            kind,
        });
        self
    }

    /// Initial bytes at `offset` of BAR `bar`.
    pub fn contents(mut self, bar: u8, offset: u64, bytes: impl Into<Vec<u8>>) -> Self {
        self.contents.push(BarContents {
            bar,
            offset,
            bytes: bytes.into(),
        });
        self
    }

    /// The IOVA ranges accepted for DMA mappings.
    pub fn iova_ranges(mut self, ranges: Vec<RangeInclusive<u64>>) -> Self {
        self.iova = Some(ranges);
        self
    }

    /// Turns off the command-register decode check on BAR accesses (see
    /// [`DeviceTemplate::with_decode_check`]).
    pub fn without_decode_check(mut self) -> Self {
        self.no_decode_check = true;
        self
    }

    /// Lays out the configuration space and validates everything.
    pub fn build(self) -> FakeResult<DeviceTemplate> {
        if let Some(b) = self.bad_bar {
            return Err(invalid(format!("BAR index {b} (0 to 5)")));
        }
        let pcie = !self.ext_caps.is_empty()
            || self
                .caps
                .iter()
                .any(|c| matches!(c, Capability::PciExpress { .. }));
        let size = if pcie {
            PCIE_CONFIG_SIZE
        } else {
            PCI_CONFIG_SIZE
        };
        let mut c = vec![0u8; size];
        wr(&mut c, 0x00, &self.vendor.to_le_bytes());
        wr(&mut c, 0x02, &self.device.to_le_bytes());
        wr(
            &mut c,
            0x08,
            &[self.revision, self.class[2], self.class[1], self.class[0]],
        );
        wr(&mut c, 0x0e, &[if self.multifunction { 0x80 } else { 0 }]);
        wr(&mut c, 0x2c, &self.subsystem.0.to_le_bytes());
        wr(&mut c, 0x2e, &self.subsystem.1.to_le_bytes());
        if self.pin > 4 {
            return Err(invalid(format!("interrupt pin {} (0 to 4)", self.pin)));
        }
        wr(&mut c, 0x3d, &[self.pin]);
        let mut sizes: [Option<u64>; 6] = [None; 6];
        for (i, b) in self.bars.iter().enumerate() {
            if let Some(b) = b {
                wr(&mut c, 0x10 + 4 * i, &b.flag_bits().to_le_bytes());
                if let Some(s) = sizes.get_mut(i) {
                    *s = Some(b.size);
                }
                if b.kind.is_64bit() {
                    if let Some(Some(_)) = self.bars.get(i + 1) {
                        return Err(invalid(format!(
                            "BAR {} is the upper half of 64-bit BAR {i}",
                            i + 1
                        )));
                    }
                }
            }
        }

        // Standard capabilities.
        let mut off = 0x40usize;
        let mut prev_next: Option<usize> = None;
        for cap in &self.caps {
            let len = cap.len();
            let end = off.saturating_add(len);
            if end > PCI_CONFIG_SIZE {
                return Err(invalid(format!(
                    "capabilities do not fit in config space ({cap:?} would end at {end:#x})"
                )));
            }
            match prev_next {
                None => wr(&mut c, 0x34, &[off as u8]),
                Some(p) => wr(&mut c, p, &[off as u8]),
            }
            write_cap(&mut c, off, cap)?;
            prev_next = Some(off + 1);
            off = end.next_multiple_of(4);
        }
        if !self.caps.is_empty() {
            wr(&mut c, 0x06, &0x0010u16.to_le_bytes());
        }

        // Extended capabilities.
        let mut off = 0x100usize;
        let n = self.ext_caps.len();
        for (k, cap) in self.ext_caps.iter().enumerate() {
            let len = cap.len();
            let end = off.saturating_add(len);
            if end > PCIE_CONFIG_SIZE {
                return Err(invalid("extended capabilities do not fit in config space"));
            }
            let next = if k + 1 < n {
                end.next_multiple_of(4)
            } else {
                0
            };
            write_ext_cap(&mut c, off, next, cap)?;
            off = end.next_multiple_of(4);
        }

        let mut t = DeviceTemplate::from_config(c, &sizes)?;
        if let Some(rom) = self.rom {
            t = t.with_rom(rom)?;
        }
        t.user_blocks = self.registers;
        t.derive()?;
        for bc in self.contents {
            t = t.with_contents(bc.bar, bc.offset, bc.bytes)?;
        }
        if let Some(r) = self.iova {
            t = t.with_iova_ranges(r)?;
        }
        Ok(t.with_decode_check(!self.no_decode_check))
    }
}

fn write_cap(c: &mut [u8], off: usize, cap: &Capability) -> FakeResult<()> {
    match cap {
        Capability::PowerManagement => {
            wr(c, off, &[cap_id::POWER_MANAGEMENT, 0]);
            wr(c, off + 2, &0x0003u16.to_le_bytes()); // version 3
            wr(c, off + 4, &0x0008u16.to_le_bytes()); // No_Soft_Reset
        }
        Capability::Msi {
            vectors,
            addr64,
            per_vector_mask,
        } => {
            if !vectors.is_power_of_two() || *vectors > 32 {
                return Err(invalid(format!(
                    "MSI with {vectors} vectors (a power of two up to 32)"
                )));
            }
            let mmc = vectors.trailing_zeros() as u16;
            let mut ctrl = mmc << 1;
            if *addr64 {
                ctrl |= 0x80;
            }
            if *per_vector_mask {
                ctrl |= 0x100;
            }
            wr(c, off, &[cap_id::MSI, 0]);
            wr(c, off + 2, &ctrl.to_le_bytes());
        }
        Capability::Msix {
            vectors,
            table_bar,
            table_offset,
            pba_bar,
            pba_offset,
        } => {
            if !(1..=2048).contains(vectors) {
                return Err(invalid(format!("MSI-X with {vectors} vectors (1 to 2048)")));
            }
            if *table_bar > 5 || *pba_bar > 5 || table_offset % 8 != 0 || pba_offset % 8 != 0 {
                return Err(invalid(
                    "MSI-X table/PBA: BIR above 5 or offset not 8-byte aligned",
                ));
            }
            wr(c, off, &[cap_id::MSIX, 0]);
            wr(c, off + 2, &((vectors - 1) as u16).to_le_bytes());
            wr(
                c,
                off + 4,
                &(table_offset | u32::from(*table_bar)).to_le_bytes(),
            );
            wr(
                c,
                off + 8,
                &(pba_offset | u32::from(*pba_bar)).to_le_bytes(),
            );
        }
        Capability::PciExpress { device_type } => {
            wr(c, off, &[cap_id::PCI_EXPRESS, 0]);
            let caps = 0x0002u16 | (u16::from(*device_type & 0xf) << 4);
            wr(c, off + 2, &caps.to_le_bytes());
            // Device capabilities: role-based error reporting, FLR.
            wr(c, off + 4, &((1u32 << 15) | (1u32 << 28)).to_le_bytes());
            // Device control: relaxed ordering, no snoop, max read 512 B.
            wr(c, off + 8, &0x2810u16.to_le_bytes());
            // Link capabilities: 2.5 GT/s, x1; link status: the same.
            wr(c, off + 0x0c, &0x0000_0011u32.to_le_bytes());
            wr(c, off + 0x12, &0x0011u16.to_le_bytes());
        }
        Capability::VendorSpecific(payload) => {
            let len = 3usize.saturating_add(payload.len());
            let len8 = u8::try_from(len)
                .map_err(|_| invalid("vendor-specific capability longer than 255 bytes"))?;
            wr(c, off, &[cap_id::VENDOR_SPECIFIC, 0, len8]);
            wr(c, off + 3, payload);
        }
    }
    Ok(())
}

fn write_ext_cap(c: &mut [u8], off: usize, next: usize, cap: &ExtCapability) -> FakeResult<()> {
    let (id, ver): (u16, u8) = match cap {
        ExtCapability::Aer => (ext_cap_id::AER, 2),
        ExtCapability::SrIov { .. } => (ext_cap_id::SRIOV, 1),
        ExtCapability::ResizableBar(_) => (ext_cap_id::RESIZABLE_BAR, 1),
        ExtCapability::Raw { id, version, .. } => (*id, *version),
    };
    let hdr = u32::from(id) | (u32::from(ver & 0xf) << 16) | ((next as u32 & 0xffc) << 20);
    wr(c, off, &hdr.to_le_bytes());
    match cap {
        ExtCapability::Aer => {
            // Uncorrectable severity and correctable mask defaults
            // (PCIe Base spec 7.8.4).
            wr(c, off + 0x0c, &0x0046_2030u32.to_le_bytes());
            wr(c, off + 0x14, &0x0000_2000u32.to_le_bytes());
        }
        ExtCapability::SrIov {
            total_vfs,
            vf_device_id,
        } => {
            wr(c, off + 0x0c, &total_vfs.to_le_bytes()); // InitialVFs
            wr(c, off + 0x0e, &total_vfs.to_le_bytes()); // TotalVFs
            wr(c, off + 0x14, &1u16.to_le_bytes()); // First VF offset
            wr(c, off + 0x16, &1u16.to_le_bytes()); // VF stride
            wr(c, off + 0x1a, &vf_device_id.to_le_bytes());
            wr(c, off + 0x1c, &0x0000_0553u32.to_le_bytes()); // supported page sizes
            wr(c, off + 0x20, &1u32.to_le_bytes()); // system page size 4 KiB
        }
        ExtCapability::ResizableBar(entries) => {
            if entries.is_empty() || entries.len() > 6 {
                return Err(invalid(
                    "resizable BAR capability with 0 or more than 6 entries",
                ));
            }
            let n = entries.len() as u32;
            for (k, e) in entries.iter().enumerate() {
                if e.bar > 5 || e.current > 0x3f || e.sizes & (1 << e.current) == 0 {
                    return Err(invalid(format!("resizable BAR entry {e:?}")));
                }
                wr(c, off + 4 + 8 * k, &(e.sizes << 4).to_le_bytes());
                let mut ctrl = u32::from(e.bar) | (u32::from(e.current) << 8);
                if k == 0 {
                    ctrl |= n << 5;
                }
                wr(c, off + 8 + 8 * k, &ctrl.to_le_bytes());
            }
        }
        ExtCapability::Raw { body, .. } => wr(c, off + 4, body),
    }
    Ok(())
}
