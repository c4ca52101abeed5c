//! `inspect`: attaches a device through `VfioPciDevice` exactly as a VMM
//! would, and reports what the guest will see, then checks that interrupts
//! and DMA work.

use std::fmt::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::probe::{ProbeGroup, ProbeInterrupts};
use anyhow::{anyhow, Context as _};
use pci_bar_alloc::{AddressWindow, BarAllocator, BarWindows};
use pci_config::cap_id;
use pci_interrupts::{InterruptSourceGroup, MsiRoute, MsixLayout};
use serde::Serialize;
use vfio_backend::irq;
use vfio_fake_device::{edu, nvme_like};
use vfio_pci::{
    BarIndex, BarView, DeviceOptions, DeviceResources, GuestDma, GuestMapper, IrqMode, MappingId,
    VfioPciDevice,
};
use vm_memory::{Bytes as _, FileOffset, GuestAddress, GuestMemoryMmap};

use crate::names;
use crate::source::{Opened, SizeNote};

/// The VMM's 32-bit MMIO window: 0xC000_0000 up to the IOAPIC at 0xFEC0_0000.
pub const MMIO32: (u64, u64) = (0xc000_0000, 0xfec0_0000 - 0xc000_0000);
/// The VMM's 64-bit MMIO window: 1 TiB at 1 TiB.
pub const MMIO64: (u64, u64) = (1 << 40, 1 << 40);
/// The VMM's I/O port window: 0xC000..0x10000, as QEMU's PCI hosts use.
pub const IO: (u64, u64) = (0xc000, 0x4000);
/// Guest RAM mapped for DMA during the self-check.
const GUEST_RAM: u64 = 2 << 20;
/// MSI address the self-check programs (the x86 LAPIC window).
const MSI_ADDRESS: u64 = 0xfee0_0000;
/// First MSI data value the self-check programs.
const MSI_DATA: u32 = 0x4020;

/// What `inspect` needs besides the device.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Host page size to lay BARs out with (`None`: this host's).
    pub page_size: Option<u64>,
    /// Skip the self-check.
    pub no_self_check: bool,
}

/// Everything `inspect` found.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// Where the device came from.
    pub source: SourceReport,
    /// Identity as the guest reads it.
    pub identity: Identity,
    /// Size of the config space the guest sees (256 or 4096).
    pub config_size: usize,
    /// BARs and ROM as the guest sees them.
    pub bars: Vec<BarReport>,
    /// Capabilities the guest sees and those hidden from it.
    pub capabilities: Capabilities,
    /// Interrupts the guest can use.
    pub interrupts: Interrupts,
    /// The VMM's windows the BARs were placed in.
    pub windows: Windows,
    /// Host page size used for the layout.
    pub page_size: u64,
    /// Self-check steps, in order.
    pub self_check: Vec<Step>,
    /// The guest-visible config space in `lspci -xxxx` format.
    pub lspci_dump: String,
}

/// Where the device came from.
#[derive(Debug, Serialize)]
pub struct SourceReport {
    /// `kernel`, `vfio-user`, `fake` or `fake-config`.
    pub kind: &'static str,
    /// For people.
    pub description: String,
    /// For a dump: where each BAR size came from.
    pub bar_sizes: Vec<SizeNote>,
    /// What to know about the input.
    pub warnings: Vec<String>,
}

/// Identity registers.
#[derive(Debug, Serialize)]
pub struct Identity {
    /// Vendor id.
    pub vendor_id: u16,
    /// Device id.
    pub device_id: u16,
    /// Subsystem vendor id.
    pub subsystem_vendor_id: u16,
    /// Subsystem id.
    pub subsystem_id: u16,
    /// Revision.
    pub revision: u8,
    /// Class code as six hex digits (base, sub, interface).
    pub class_code: String,
    /// What the class code means.
    pub class_name: String,
    /// Header type register as the guest reads it.
    pub header_type: u8,
}

/// One range inside a BAR.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Part {
    /// Offset from the BAR's start.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// `mapped`, `msix-table`, `msix-pba`, `trapped` or `padding`.
    pub what: &'static str,
}

/// One BAR as the guest sees it.
#[derive(Debug, Serialize)]
pub struct BarReport {
    /// 0..5, or 6 for the ROM.
    pub index: usize,
    /// `mem32`, `mem64`, `io` or `rom`.
    pub kind: &'static str,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// The device's region size.
    pub region_size: u64,
    /// The size the guest sizes.
    pub guest_size: u64,
    /// Guest address, if placed.
    pub base: Option<u64>,
    /// Bytes mapped straight into the guest.
    pub mapped_bytes: u64,
    /// Bytes that trap to the VMM.
    pub trapped_bytes: u64,
    /// The MSI-X table and PBA were moved into an enlarged BAR.
    pub msix_relocated: bool,
    /// The BAR, range by range.
    pub parts: Vec<Part>,
}

/// One capability.
#[derive(Debug, Serialize)]
pub struct CapReport {
    /// Capability id.
    pub id: u16,
    /// An extended (PCIe) capability.
    pub extended: bool,
    /// Offset in config space.
    pub offset: u16,
    /// Its name.
    pub name: &'static str,
    /// Kept: `emulated` or `passed through`; hidden: why.
    pub handling: String,
}

/// Capabilities, kept and hidden.
#[derive(Debug, Serialize)]
pub struct Capabilities {
    /// What the guest sees.
    pub kept: Vec<CapReport>,
    /// What is hidden from it.
    pub hidden: Vec<CapReport>,
}

/// MSI as the guest sees it.
#[derive(Debug, Serialize)]
pub struct MsiReport {
    /// Offset of the capability.
    pub offset: u16,
    /// Vectors the device can use.
    pub vectors: u32,
    /// 64-bit addresses.
    pub addr64: bool,
    /// Per-vector masking.
    pub per_vector_mask: bool,
}

/// MSI-X as the guest sees it.
#[derive(Debug, Serialize)]
pub struct MsixReport {
    /// Offset of the capability.
    pub offset: u16,
    /// Table size.
    pub vectors: u32,
    /// BAR that holds the table.
    pub table_bar: u8,
    /// Offset of the table in that BAR.
    pub table_offset: u32,
    /// BAR that holds the PBA.
    pub pba_bar: u8,
    /// Offset of the PBA in that BAR.
    pub pba_offset: u32,
}

/// Interrupts.
#[derive(Debug, Serialize)]
pub struct Interrupts {
    /// INTx pin (`A`..`D`), if the guest sees one.
    pub intx_pin: Option<char>,
    /// MSI, if kept.
    pub msi: Option<MsiReport>,
    /// MSI-X, if kept.
    pub msix: Option<MsixReport>,
    /// Vector counts VFIO reports for INTx, MSI, MSI-X.
    pub vfio_counts: [u32; 3],
    /// What is wired through VFIO right after attach.
    pub wired_at_attach: String,
}

/// The VMM windows.
#[derive(Debug, Serialize)]
pub struct Windows {
    /// (base, size) of the 32-bit MMIO window.
    pub mmio32: (u64, u64),
    /// (base, size) of the 64-bit MMIO window.
    pub mmio64: (u64, u64),
    /// (base, size) of the I/O window.
    pub io: (u64, u64),
}

/// Outcome of one self-check step.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Worked.
    Ok,
    /// Did not work.
    Fail,
    /// Not done, and why is in the detail.
    Skip,
}

impl Status {
    /// The tag printed in front of the step.
    pub fn tag(self) -> &'static str {
        match self {
            Status::Ok => "[ ok ]",
            Status::Fail => "[FAIL]",
            Status::Skip => "[skip]",
        }
    }
}

/// One self-check step.
#[derive(Debug, Serialize)]
pub struct Step {
    /// What was checked.
    pub name: String,
    /// How it went.
    pub status: Status,
    /// What happened.
    pub detail: String,
    /// How long it took, in microseconds.
    pub micros: u64,
}

impl Inspection {
    /// Whether no self-check step failed.
    pub fn passed(&self) -> bool {
        self.self_check.iter().all(|s| s.status != Status::Fail)
    }
}

/// A guest mapper that accepts every mapping, like a VMM with memory slots.
/// It only hands out ids: nothing runs in a guest here.
#[derive(Default)]
struct AcceptingMapper {
    next: AtomicU64,
}

impl GuestMapper for AcceptingMapper {
    /// Hands out an id; `host` is never touched.
    ///
    /// # Safety
    /// As [`GuestMapper::map`]; this mapper never dereferences `host`.
    unsafe fn map(&self, _: u64, _: u64, _: *mut u8, _: bool) -> std::io::Result<MappingId> {
        Ok(MappingId(self.next.fetch_add(1, Ordering::Relaxed)))
    }

    fn unmap(&self, _: MappingId) -> std::io::Result<()> {
        Ok(())
    }
}

/// Timed step recorder.
struct Steps<'a> {
    steps: Vec<Step>,
    progress: &'a dyn Fn(&str),
}

impl Steps<'_> {
    fn run(&mut self, name: &str, f: impl FnOnce() -> (Status, String)) {
        (self.progress)(name);
        let t = Instant::now();
        let (status, detail) = f();
        self.push(name, status, detail, t.elapsed());
    }

    fn push(&mut self, name: &str, status: Status, detail: String, took: Duration) {
        self.steps.push(Step {
            name: name.to_string(),
            status,
            detail,
            micros: u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
        });
    }
}

/// Attaches `opened` and inspects it. `progress` is told the name of each
/// step as it starts.
pub fn run(opened: &Opened, opts: &Options, progress: &dyn Fn(&str)) -> anyhow::Result<Inspection> {
    let page_size = opts
        .page_size
        .unwrap_or_else(crate::sysfs::current_page_size);
    let irqs = Arc::new(ProbeInterrupts::default());
    let windows = BarWindows::new(AddressWindow::new(MMIO32.0, MMIO32.1))
        .with_mmio64(AddressWindow::new(MMIO64.0, MMIO64.1))
        .with_io(AddressWindow::new(IO.0, IO.1));
    let allocator = BarAllocator::with_page_size(windows, page_size)
        .map_err(|e| anyhow!("the VMM's BAR windows: {e}"))?;
    let resources = DeviceResources {
        interrupts: irqs.clone(),
        mapper: Arc::new(AcceptingMapper::default()),
        allocator: Arc::new(Mutex::new(allocator)),
        dma: GuestDma::new(),
    };
    let options = DeviceOptions::default().with_page_size(page_size);
    let mut steps = Steps {
        steps: Vec::new(),
        progress,
    };

    progress("attaching the device");
    let t = Instant::now();
    let dev = VfioPciDevice::new(opened.vfio.clone(), resources, options)
        .with_context(|| format!("attaching {} as a PCI device failed", opened.description))?;
    let attach_time = t.elapsed();
    steps.push(
        "attach",
        Status::Ok,
        "VfioPciDevice::new: config space read, capabilities decided, BARs placed and mapped, interrupt groups made".into(),
        attach_time,
    );

    progress("reading the guest's config space");
    let t = Instant::now();
    let config = read_guest_config(&dev);
    steps.push(
        "config read",
        Status::Ok,
        format!("{} bytes as the guest reads them", config.len()),
        t.elapsed(),
    );

    let identity = identity(&config);
    let bars: Vec<BarView> = dev.bars();
    let bar_reports: Vec<BarReport> = bars.iter().map(bar_report).collect();
    let capabilities = capabilities(&dev);
    let interrupts = interrupts(&dev, &config);
    let lspci_dump = lspci_text(&identity, &config, &bar_reports);

    if !opts.no_self_check {
        self_check(
            &mut steps,
            &dev,
            opened,
            &irqs,
            &bars,
            &capabilities,
            &interrupts,
            &identity,
        );
    }
    let self_check = steps.steps;
    drop(dev);

    Ok(Inspection {
        source: SourceReport {
            kind: opened.kind,
            description: opened.description.clone(),
            bar_sizes: opened.size_notes.clone(),
            warnings: opened.warnings.clone(),
        },
        identity,
        config_size: config.len(),
        bars: bar_reports,
        capabilities,
        interrupts,
        windows: Windows {
            mmio32: MMIO32,
            mmio64: MMIO64,
            io: IO,
        },
        page_size,
        self_check,
        lspci_dump,
    })
}

fn read_guest_config(dev: &VfioPciDevice) -> Vec<u8> {
    let size = dev.config_size().clamp(256, 4096);
    let mut out = vec![0u8; size];
    for (i, chunk) in out.chunks_mut(4).enumerate() {
        dev.read_config(4 * i as u64, chunk);
    }
    out
}

fn u16_at(c: &[u8], off: usize) -> u16 {
    c.get(off..off + 2)
        .and_then(|b| <[u8; 2]>::try_from(b).ok())
        .map(u16::from_le_bytes)
        .unwrap_or(0)
}

fn u8_at(c: &[u8], off: usize) -> u8 {
    c.get(off).copied().unwrap_or(0)
}

fn identity(c: &[u8]) -> Identity {
    let (base, sub, pi) = (u8_at(c, 0x0b), u8_at(c, 0x0a), u8_at(c, 0x09));
    Identity {
        vendor_id: u16_at(c, 0),
        device_id: u16_at(c, 2),
        subsystem_vendor_id: u16_at(c, 0x2c),
        subsystem_id: u16_at(c, 0x2e),
        revision: u8_at(c, 0x08),
        class_code: format!("{base:02x}{sub:02x}{pi:02x}"),
        class_name: names::class(base, sub, pi),
        header_type: u8_at(c, 0x0e),
    }
}

fn bar_report(b: &BarView) -> BarReport {
    use pci_config::BarKind;
    let (kind, prefetchable) = if b.index.is_rom() {
        ("rom", false)
    } else {
        match b.kind {
            BarKind::Io => ("io", false),
            BarKind::Memory32 { prefetchable } => ("mem32", prefetchable),
            BarKind::Memory64 { prefetchable } => ("mem64", prefetchable),
        }
    };
    let base = b.base.unwrap_or(0);
    let rel = |(a, l): (u64, u64)| (a.wrapping_sub(base), l);
    let mapped: Vec<(u64, u64)> = b.mapped.iter().copied().map(rel).collect();
    let table = b.msix_table.map(rel);
    let pba = b.msix_pba.map(rel);
    BarReport {
        index: b.index.slot(),
        kind,
        prefetchable,
        region_size: b.region_size,
        guest_size: b.guest_size,
        base: b.base,
        mapped_bytes: mapped.iter().map(|m| m.1).sum(),
        trapped_bytes: b.trapped_bytes(),
        msix_relocated: b.msix_relocated,
        parts: parts(b.guest_size, b.region_size, &mapped, table, pba),
    }
}

/// Splits `[0, size)` into ranges by what a guest access there does.
fn parts(
    size: u64,
    region: u64,
    mapped: &[(u64, u64)],
    table: Option<(u64, u64)>,
    pba: Option<(u64, u64)>,
) -> Vec<Part> {
    let mut cuts = vec![0, size];
    if region < size {
        cuts.push(region);
    }
    for (s, l) in mapped.iter().copied().chain(table).chain(pba) {
        cuts.push(s.min(size));
        cuts.push(s.saturating_add(l).min(size));
    }
    cuts.sort_unstable();
    cuts.dedup();
    let inside = |r: Option<(u64, u64)>, a: u64| r.is_some_and(|(s, l)| a >= s && a - s < l);
    let mut out: Vec<Part> = Vec::new();
    for w in cuts.windows(2) {
        let (a, b) = match w {
            [a, b] if b > a => (*a, *b),
            _ => continue,
        };
        let what = if mapped.iter().any(|m| inside(Some(*m), a)) {
            "mapped"
        } else if inside(table, a) {
            "msix-table"
        } else if inside(pba, a) {
            "msix-pba"
        } else if a >= region {
            "padding"
        } else {
            "trapped"
        };
        match out.last_mut() {
            Some(p) if p.what == what && p.offset + p.len == a => p.len += b - a,
            _ => out.push(Part {
                offset: a,
                len: b - a,
                what,
            }),
        }
    }
    out
}

fn capabilities(dev: &VfioPciDevice) -> Capabilities {
    let name = |id: u16, ext: bool| {
        if ext {
            names::ext_capability(id)
        } else {
            names::capability(id)
        }
    };
    Capabilities {
        kept: dev
            .kept_capabilities()
            .iter()
            .map(|k| CapReport {
                id: k.id,
                extended: k.extended,
                offset: k.offset,
                name: name(k.id, k.extended),
                handling: if k.emulated {
                    "emulated".into()
                } else {
                    "passed through".into()
                },
            })
            .collect(),
        hidden: dev
            .hidden_capabilities()
            .iter()
            .map(|h| CapReport {
                id: h.id,
                extended: h.extended,
                offset: h.offset,
                name: name(h.id, h.extended),
                handling: h.reason.clone(),
            })
            .collect(),
    }
}

fn interrupts(dev: &VfioPciDevice, c: &[u8]) -> Interrupts {
    let kept = dev.kept_capabilities();
    let find = |id: u16| kept.iter().find(|k| !k.extended && k.id == id);
    let msi = find(0x05).map(|k| {
        let ctrl = u16_at(c, usize::from(k.offset) + 2);
        MsiReport {
            offset: k.offset,
            vectors: 1 << ((ctrl >> 1) & 7).min(5),
            addr64: ctrl & 0x80 != 0,
            per_vector_mask: ctrl & 0x100 != 0,
        }
    });
    // A kept MSI-X capability is the emulated one, which always decodes.
    let msix = find(u16::from(cap_id::MSIX)).and_then(|k| {
        let m = MsixLayout::parse(c.get(usize::from(k.offset)..)?).ok()?;
        Some(MsixReport {
            offset: k.offset,
            vectors: m.vectors,
            table_bar: m.table.bir,
            table_offset: m.table.offset,
            pba_bar: m.pba.bir,
            pba_offset: m.pba.offset,
        })
    });
    let pin = u8_at(c, 0x3d);
    let count = |i| dev.vfio().irq_info(i).map(|r| r.count).unwrap_or(0);
    Interrupts {
        intx_pin: (1..=4).contains(&pin).then(|| char::from(b'A' + pin - 1)),
        msi,
        msix,
        vfio_counts: [count(irq::INTX), count(irq::MSI), count(irq::MSIX)],
        wired_at_attach: irq_mode_text(dev.irq_mode()),
    }
}

fn irq_mode_text(m: IrqMode) -> String {
    match m {
        IrqMode::None => "nothing".into(),
        IrqMode::Intx => "INTx".into(),
        IrqMode::Msi(n) => format!("MSI ({n} vectors)"),
        IrqMode::Msix => "MSI-X".into(),
    }
}

/// `lspci -vv`-style size: the largest binary unit that divides it.
pub fn lspci_size(mut x: u64) -> String {
    let mut unit = 0;
    let suffix = ["", "K", "M", "G", "T"];
    while unit < 4 && x != 0 && x % 1024 == 0 {
        x /= 1024;
        unit += 1;
    }
    format!("{x}{}", suffix.get(unit).unwrap_or(&""))
}

/// The guest-visible config space as `lspci -vvxxxx` would print it: a
/// header line, the BAR lines with their sizes (which `lspci -F` ignores and
/// `--fake-config` reads back), then the hex rows.
fn lspci_text(id: &Identity, config: &[u8], bars: &[BarReport]) -> String {
    let mut s = String::new();
    let class = u16::from_str_radix(id.class_code.get(..4).unwrap_or("0000"), 16).unwrap_or(0);
    let _ = writeln!(
        s,
        "00:00.0 {} [{class:04x}]: Device {:04x}:{:04x} (rev {:02x})",
        id.class_name, id.vendor_id, id.device_id, id.revision
    );
    for b in bars {
        let size = lspci_size(b.guest_size);
        let at = b.base.unwrap_or(0);
        let line = match b.kind {
            "rom" => format!("Expansion ROM at {at:08x} [disabled] [size={size}]"),
            "io" => format!("Region {}: I/O ports at {at:04x} [size={size}]", b.index),
            k => format!(
                "Region {}: Memory at {at:x} ({}-bit, {}prefetchable) [size={size}]",
                b.index,
                if k == "mem64" { 64 } else { 32 },
                if b.prefetchable { "" } else { "non-" }
            ),
        };
        let _ = writeln!(s, "\t{line}");
    }
    for (row, chunk) in config.chunks(16).enumerate() {
        let _ = write!(s, "{:02x}:", row * 16);
        for b in chunk {
            let _ = write!(s, " {b:02x}");
        }
        s.push('\n');
    }
    s.push('\n');
    s
}

fn cfg_read(dev: &VfioPciDevice, off: u64, len: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(d) = b.get_mut(..len) {
        dev.read_config(off, d);
    }
    u32::from_le_bytes(b)
}

fn cfg_write(dev: &VfioPciDevice, off: u64, v: u32, len: usize) -> anyhow::Result<()> {
    let b = v.to_le_bytes();
    // The outcome (BAR ranges that moved) matters to a VMM's bus; inspect has none.
    dev.write_config(off, b.get(..len).unwrap_or(&b))
        .map(drop)
        .map_err(|e| anyhow!("config write at {off:#x}: {e}"))
}

fn bar_write(dev: &VfioPciDevice, bar: BarIndex, off: u64, data: &[u8]) -> anyhow::Result<()> {
    dev.write_bar(bar, off, data)
        .map_err(|e| anyhow!("{bar} write at {off:#x}: {e}"))
}

fn bar_read64(dev: &VfioPciDevice, bar: BarIndex, off: u64) -> u64 {
    let mut b = [0u8; 8];
    dev.read_bar(bar, off, &mut b);
    u64::from_le_bytes(b)
}

/// The probe group behind a device's group.
fn probe_group(
    irqs: &ProbeInterrupts,
    g: Option<Arc<dyn InterruptSourceGroup>>,
) -> Option<Arc<ProbeGroup>> {
    irqs.find(&g?)
}

fn outcome(r: anyhow::Result<(Status, String)>) -> (Status, String) {
    r.unwrap_or_else(|e| (Status::Fail, format!("{e:#}")))
}

/// A device whose registers the self-check knows (the fake profiles, or the
/// real QEMU `edu` they imitate), on any backend. A fake made from a dump
/// only has the ids, not the registers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Model {
    Edu,
    NvmeLike,
}

fn known_model(opened: &Opened, id: &Identity) -> Option<Model> {
    if opened.kind == "fake-config" {
        return None;
    }
    match (id.vendor_id, id.device_id) {
        (edu::VENDOR_ID, edu::DEVICE_ID) => Some(Model::Edu),
        (nvme_like::VENDOR_ID, nvme_like::DEVICE_ID) => Some(Model::NvmeLike),
        _ => None,
    }
}

/// How the self-check can make the device raise a vector, if it knows one.
#[derive(Clone, Copy)]
enum Fire<'a> {
    /// An in-process fake: `FakeDevice::raise_irq`.
    Fake(&'a vfio_fake_device::FakeDevice),
    /// The `nvme-like` profile's doorbells (any backend).
    NvmeLikeDoorbell,
    /// The `edu` register that raises its interrupt (any backend).
    EduRaise,
}

impl Fire<'_> {
    fn how(&self) -> &'static str {
        match self {
            Fire::Fake(_) => "the fake device raised it",
            Fire::NvmeLikeDoorbell => "a doorbell write raised it",
            Fire::EduRaise => "a write to edu's interrupt-raise register raised it",
        }
    }

    fn fire(&self, dev: &VfioPciDevice, vector: u32) -> anyhow::Result<()> {
        match self {
            Fire::Fake(f) => {
                f.raise_irq(vector);
                Ok(())
            }
            Fire::NvmeLikeDoorbell => bar_write(
                dev,
                BarIndex::Bar(0),
                nvme_like::DOORBELLS + u64::from(vector) * nvme_like::DOORBELL_STRIDE,
                &1u32.to_le_bytes(),
            ),
            Fire::EduRaise => {
                bar_write(
                    dev,
                    BarIndex::Bar(0),
                    edu::IRQ_RAISE,
                    &edu::FACT_IRQ.to_le_bytes(),
                )?;
                // Lower the line again so the next test starts clean.
                bar_write(
                    dev,
                    BarIndex::Bar(0),
                    edu::IRQ_ACK,
                    &edu::FACT_IRQ.to_le_bytes(),
                )
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn self_check(
    steps: &mut Steps<'_>,
    dev: &VfioPciDevice,
    opened: &Opened,
    irqs: &ProbeInterrupts,
    bars: &[BarView],
    caps: &Capabilities,
    ints: &Interrupts,
    id: &Identity,
) {
    steps.run("BAR sizing", || bar_sizing(dev, bars));
    steps.run("capability walk", || cap_walk(dev, caps));

    // Memory decoding and bus mastering on, as a driver does first.
    let cmd = cfg_read(dev, 0x04, 2);
    if let Err(e) = cfg_write(dev, 0x04, cmd | 0x6, 2) {
        steps.push(
            "enable decoding",
            Status::Fail,
            format!("{e:#}"),
            Duration::ZERO,
        );
    }

    let model = known_model(opened, id);
    let fire = match (model, &opened.fake) {
        (Some(Model::Edu), _) => Some(Fire::EduRaise),
        (Some(Model::NvmeLike), _) => Some(Fire::NvmeLikeDoorbell),
        (None, Some(f)) => Some(Fire::Fake(f)),
        (None, None) => None,
    };

    match &ints.msix {
        Some(m) => {
            let group = probe_group(irqs, dev.msix_group());
            let mut routed = false;
            steps.run("MSI-X routing", || {
                let r = msix_route(dev, bars, m, group.as_deref());
                routed = matches!(r, Ok((Status::Ok, _)));
                outcome(r)
            });
            steps.run("MSI-X firing", || match (fire, group.as_deref(), routed) {
                (Some(f), Some(g), true) => outcome(fire_vectors(dev, g, f, m.vectors)),
                (_, _, false) => (Status::Skip, "routing failed".into()),
                (None, _, _) => (Status::Skip, no_fire_note()),
                (_, None, _) => (Status::Fail, "the device made no MSI-X group".into()),
            });
            steps.run("MSI-X disable", || outcome(msix_disable(dev, m)));
        }
        None => steps.push(
            "MSI-X",
            Status::Skip,
            "the guest sees no MSI-X capability".into(),
            Duration::ZERO,
        ),
    }
    match &ints.msi {
        Some(m) => {
            let group = probe_group(irqs, dev.msi_group());
            steps.run("MSI", || outcome(msi_check(dev, m, group.as_deref(), fire)));
        }
        None => steps.push(
            "MSI",
            Status::Skip,
            "the guest sees no MSI capability".into(),
            Duration::ZERO,
        ),
    }

    // DMA.
    match &opened.no_dma {
        Some(why) => {
            for name in ["DMA map of guest RAM", "DMA round trip"] {
                steps.push(name, Status::Skip, why.clone(), Duration::ZERO);
            }
        }
        None => dma_steps(steps, dev, model, id),
    }
    let _ = cfg_write(dev, 0x04, cmd, 2);
}

/// Maps guest RAM for the device and, where its DMA engine is known, does a round trip.
fn dma_steps(steps: &mut Steps<'_>, dev: &VfioPciDevice, model: Option<Model>, id: &Identity) {
    let mut memory = None;
    steps.run("DMA map of guest RAM", || match guest_ram() {
        // The device is attached: registering RAM maps it into its domain.
        Ok(mem) => match dev.guest_dma().add_memory(&mem) {
            Ok(n) => {
                memory = Some(mem);
                (
                    Status::Ok,
                    format!(
                        "{n} region of {} at guest address 0 mapped for the device (memfd-backed, so a vfio-user server can map it too)",
                        crate::check::human_size(GUEST_RAM)
                    ),
                )
            }
            Err(e) => (Status::Fail, format!("{e}")),
        },
        Err(e) => (Status::Fail, format!("{e:#}")),
    });
    match (&memory, model) {
        (Some(mem), Some(Model::Edu)) => {
            steps.run("DMA round trip", || outcome(edu_dma(dev, mem)));
        }
        (None, _) => steps.push(
            "DMA round trip",
            Status::Skip,
            "guest RAM could not be mapped".into(),
            Duration::ZERO,
        ),
        _ => steps.push(
            "DMA round trip",
            Status::Skip,
            format!(
                "no DMA engine is known for {:04x}:{:04x} (the edu profile has one)",
                id.vendor_id, id.device_id
            ),
            Duration::ZERO,
        ),
    }
    // Hot-unplug of the RAM: unmapped from the device's domain.
    if let Some(mem) = memory {
        if let Err(e) = dev.guest_dma().remove_memory(&mem) {
            log::warn!("removing guest RAM after the DMA steps: {e}");
        }
    }
}

fn no_fire_note() -> String {
    "not fired: making this device raise an interrupt needs knowledge of its registers \
     (known for the fake profiles and any in-process fake); the routes and eventfds above are what a guest would use"
        .into()
}

fn bar_sizing(dev: &VfioPciDevice, bars: &[BarView]) -> (Status, String) {
    let mut bad = Vec::new();
    let mut good = Vec::new();
    for b in bars {
        let sized = if b.index.is_rom() {
            size_rom(dev)
        } else {
            size_bar(dev, b.index.slot() as u64)
        };
        let name = b.index.to_string();
        if sized == b.guest_size {
            good.push(format!("{name} {}", crate::check::human_size(sized)));
        } else {
            bad.push(format!(
                "{name}: the guest sizes {sized:#x}, the placement is {:#x}",
                b.guest_size
            ));
        }
    }
    if bad.is_empty() {
        (
            Status::Ok,
            format!(
                "all-ones writes size {} (values restored)",
                if good.is_empty() {
                    "no BAR".to_string()
                } else {
                    good.join(", ")
                }
            ),
        )
    } else {
        (Status::Fail, bad.join("; "))
    }
}

fn bar_name(index: usize) -> String {
    if index == pci_config::ROM_BAR {
        "ROM".into()
    } else {
        format!("BAR{index}")
    }
}

/// Sizes BAR `i` as a guest does (PCI Local Bus 3.0, 6.2.5.1): save, write
/// all ones, read back, restore.
fn size_bar(dev: &VfioPciDevice, i: u64) -> u64 {
    let reg = 0x10 + 4 * i;
    let orig = cfg_read(dev, reg, 4);
    let _ = cfg_write(dev, reg, u32::MAX, 4);
    let lo = cfg_read(dev, reg, 4);
    let _ = cfg_write(dev, reg, orig, 4);
    if lo == 0 {
        return 0;
    }
    if lo & 1 == 1 {
        let mask = u64::from(lo & !3) | 0xffff_ffff_0000_0000;
        return (!mask).wrapping_add(1) & 0xffff_ffff;
    }
    if (lo >> 1) & 3 == 2 {
        let orig_hi = cfg_read(dev, reg + 4, 4);
        let _ = cfg_write(dev, reg + 4, u32::MAX, 4);
        let hi = cfg_read(dev, reg + 4, 4);
        let _ = cfg_write(dev, reg + 4, orig_hi, 4);
        let mask = (u64::from(hi) << 32) | u64::from(lo & !0xf);
        (!mask).wrapping_add(1)
    } else {
        let mask = u64::from(lo & !0xf) | 0xffff_ffff_0000_0000;
        (!mask).wrapping_add(1)
    }
}

fn size_rom(dev: &VfioPciDevice) -> u64 {
    let orig = cfg_read(dev, 0x30, 4);
    let _ = cfg_write(dev, 0x30, 0xffff_f800, 4);
    let v = cfg_read(dev, 0x30, 4);
    let _ = cfg_write(dev, 0x30, orig, 4);
    let mask = u64::from(v & 0xffff_f800) | 0xffff_ffff_0000_0000;
    if v & 0xffff_f800 == 0 {
        0
    } else {
        (!mask).wrapping_add(1)
    }
}

/// Walks the guest's capability chains (bounded like Linux) and checks that
/// every kept capability is there and no hidden one is.
fn cap_walk(dev: &VfioPciDevice, caps: &Capabilities) -> (Status, String) {
    let config = read_guest_config(dev);
    let (std, std_err) = pci_config::parse_capabilities_lenient(&config);
    let (ext, ext_err) = if config.len() > 256 {
        pci_config::parse_extended_capabilities_lenient(&config)
    } else {
        (Vec::new(), None)
    };
    let seen = |extended: bool, id: u16, off: u16| {
        if extended {
            ext.iter().any(|c| c.id == id && c.offset == off)
        } else {
            std.iter().any(|c| u16::from(c.id) == id && c.offset == off)
        }
    };
    let mut problems = Vec::new();
    if let Some(e) = std_err {
        problems.push(format!("standard chain broken: {e}"));
    }
    if let Some(e) = ext_err {
        problems.push(format!("extended chain broken: {e}"));
    }
    for k in &caps.kept {
        if !seen(k.extended, k.id, k.offset) {
            problems.push(format!(
                "kept {} at {:#x} is not in the chain",
                k.name, k.offset
            ));
        }
    }
    for h in &caps.hidden {
        let found = if h.extended {
            ext.iter().any(|c| c.id == h.id)
        } else {
            std.iter().any(|c| u16::from(c.id) == h.id)
        };
        if found {
            problems.push(format!("hidden {} is still in the chain", h.name));
        }
    }
    if problems.is_empty() {
        let ext_n = ext.iter().filter(|c| c.id != 0).count();
        (
            Status::Ok,
            format!(
                "{} standard and {ext_n} extended capabilities in the chains, none of the {} hidden",
                std.len(),
                caps.hidden.len()
            ),
        )
    } else {
        (Status::Fail, problems.join("; "))
    }
}

/// Programs every MSI-X vector through the guest's table and enables MSI-X.
fn msix_route(
    dev: &VfioPciDevice,
    bars: &[BarView],
    m: &MsixReport,
    group: Option<&ProbeGroup>,
) -> anyhow::Result<(Status, String)> {
    let bar = bars
        .iter()
        .find(|b| b.msix_table.is_some())
        .ok_or_else(|| anyhow!("no BAR holds the MSI-X table"))?;
    let (table_gpa, _) = bar.msix_table.unwrap_or((0, 0));
    let base = bar
        .base
        .ok_or_else(|| anyhow!("{} is not placed", bar.index))?;
    let table = table_gpa.wrapping_sub(base);
    for v in 0..m.vectors {
        let e = table + 16 * u64::from(v);
        bar_write(dev, bar.index, e, &(MSI_ADDRESS as u32).to_le_bytes())?;
        bar_write(
            dev,
            bar.index,
            e + 4,
            &((MSI_ADDRESS >> 32) as u32).to_le_bytes(),
        )?;
        bar_write(dev, bar.index, e + 8, &(MSI_DATA + v).to_le_bytes())?;
        bar_write(dev, bar.index, e + 12, &0u32.to_le_bytes())?;
    }
    let cap = u64::from(m.offset);
    let ctl = cfg_read(dev, cap + 2, 2);
    cfg_write(dev, cap + 2, (ctl | 0x8000) & !0x4000, 2)?;
    if dev.irq_mode() != IrqMode::Msix {
        return Ok((
            Status::Fail,
            format!(
                "MSI-X enabled by the guest but VFIO has {} wired",
                irq_mode_text(dev.irq_mode())
            ),
        ));
    }
    let Some(g) = group else {
        return Ok((Status::Fail, "the device made no MSI-X group".into()));
    };
    let wrong: Vec<u32> = (0..m.vectors)
        .filter(|&v| {
            g.route(v)
                != Some(MsiRoute {
                    address: MSI_ADDRESS,
                    data: MSI_DATA + v,
                })
        })
        .collect();
    if !wrong.is_empty() {
        return Ok((
            Status::Fail,
            format!("vectors without the programmed route: {wrong:?}"),
        ));
    }
    Ok((
        Status::Ok,
        format!(
            "{} vectors programmed through the table at {} +{table:#x}, MSI-X enabled: one eventfd per vector registered with VFIO, every route as programmed",
            m.vectors,
            bar.index
        ),
    ))
}

/// Makes the device raise each vector and checks its eventfd.
fn fire_vectors(
    dev: &VfioPciDevice,
    g: &ProbeGroup,
    fire: Fire<'_>,
    n: u32,
) -> anyhow::Result<(Status, String)> {
    for v in 0..n {
        let _ = g.take_signals(v);
    }
    let mut missing = Vec::new();
    for v in 0..n {
        fire.fire(dev, v)?;
        if !wait_signal(g, v) {
            missing.push(v);
        }
    }
    if missing.is_empty() {
        Ok((
            Status::Ok,
            format!(
                "each of the {n} vectors fired once ({}) and its eventfd was signalled",
                fire.how()
            ),
        ))
    } else {
        Ok((
            Status::Fail,
            format!("no signal on the eventfds of vectors {missing:?}"),
        ))
    }
}

/// Waits briefly for `vector`'s eventfd (a vfio-user or kernel device
/// signals it from another thread or the hardware).
fn wait_signal(g: &ProbeGroup, vector: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        if g.take_signals(vector) > 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn msix_disable(dev: &VfioPciDevice, m: &MsixReport) -> anyhow::Result<(Status, String)> {
    let cap = u64::from(m.offset);
    let ctl = cfg_read(dev, cap + 2, 2);
    cfg_write(dev, cap + 2, ctl & !0x8000, 2)?;
    Ok(match dev.irq_mode() {
        IrqMode::Msix => (
            Status::Fail,
            "MSI-X still wired after the guest disabled it".into(),
        ),
        other => (
            Status::Ok,
            format!(
                "guest cleared MSI-X enable; VFIO now has {} wired",
                irq_mode_text(other)
            ),
        ),
    })
}

fn msi_check(
    dev: &VfioPciDevice,
    m: &MsiReport,
    group: Option<&ProbeGroup>,
    fire: Option<Fire<'_>>,
) -> anyhow::Result<(Status, String)> {
    let cap = u64::from(m.offset);
    let data_off = if m.addr64 { cap + 0x0c } else { cap + 0x08 };
    cfg_write(dev, cap + 4, MSI_ADDRESS as u32, 4)?;
    if m.addr64 {
        cfg_write(dev, cap + 8, (MSI_ADDRESS >> 32) as u32, 4)?;
    }
    cfg_write(dev, data_off, MSI_DATA, 2)?;
    if m.per_vector_mask {
        cfg_write(dev, data_off + 4, 0, 4)?;
    }
    let ctl = cfg_read(dev, cap + 2, 2);
    // Enable with one vector (multiple message enable 0).
    cfg_write(dev, cap + 2, (ctl & !0x70) | 1, 2)?;
    let mode = dev.irq_mode();
    let mut result = if mode != IrqMode::Msi(1) {
        (
            Status::Fail,
            format!(
                "MSI enabled by the guest but VFIO has {} wired",
                irq_mode_text(mode)
            ),
        )
    } else {
        match group {
            None => (Status::Fail, "the device made no MSI group".into()),
            Some(g)
                if g.route(0)
                    != Some(MsiRoute {
                        address: MSI_ADDRESS,
                        data: MSI_DATA,
                    }) =>
            {
                (
                    Status::Fail,
                    format!("vector 0 route is {:?}, not the programmed one", g.route(0)),
                )
            }
            Some(g) => {
                let routed = "1 vector programmed through the capability and enabled; eventfd registered, route as programmed";
                match fire {
                    Some(f) => {
                        let _ = g.take_signals(0);
                        f.fire(dev, 0)?;
                        if wait_signal(g, 0) {
                            (
                                Status::Ok,
                                format!("{routed}; fired once ({}), eventfd signalled", f.how()),
                            )
                        } else {
                            (
                                Status::Fail,
                                format!("{routed}; fired, but the eventfd was not signalled"),
                            )
                        }
                    }
                    None => (
                        Status::Ok,
                        format!("{routed}; not fired (no known way to make this device raise it)"),
                    ),
                }
            }
        }
    };
    cfg_write(dev, cap + 2, ctl & !1, 2)?;
    if matches!(dev.irq_mode(), IrqMode::Msi(_)) {
        result = (
            Status::Fail,
            format!("{}; MSI still wired after disable", result.1),
        );
    }
    Ok(result)
}

/// Guest RAM backed by a memfd sealed against resizing, so that a
/// vfio-user server can map it (it reaches an unsealed file only by file
/// I/O, since a client could shrink it under a mapping).
fn guest_ram() -> anyhow::Result<GuestMemoryMmap> {
    // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
    let fd = unsafe {
        libc::memfd_create(
            c"vfio-passthrough-inspect".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(anyhow!(
            "memfd_create for guest RAM: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(GUEST_RAM)
        .context("sizing the guest RAM memfd")?;
    // SAFETY: F_ADD_SEALS on a descriptor we own; no pointer involved.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    if rc != 0 {
        return Err(anyhow!(
            "sealing the guest RAM memfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(0),
        usize::try_from(GUEST_RAM).unwrap_or(2 << 20),
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| anyhow!("mapping guest RAM: {e}"))
}

/// edu DMA: guest RAM -> device buffer -> other guest RAM, compared.
fn edu_dma(dev: &VfioPciDevice, mem: &GuestMemoryMmap) -> anyhow::Result<(Status, String)> {
    const SRC: u64 = 0x1000;
    const DST: u64 = 0x3000;
    let len = edu::DMA_BUFFER_SIZE;
    let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(SRC))
        .map_err(|e| anyhow!("writing guest RAM: {e}"))?;
    mem.write_slice(&vec![0u8; pattern.len()], GuestAddress(DST))
        .map_err(|e| anyhow!("clearing guest RAM: {e}"))?;
    let run = |src: u64, dst: u64, to_ram: bool| -> anyhow::Result<()> {
        bar_write(dev, BarIndex::Bar(0), edu::DMA_SRC, &src.to_le_bytes())?;
        bar_write(dev, BarIndex::Bar(0), edu::DMA_DST, &dst.to_le_bytes())?;
        bar_write(dev, BarIndex::Bar(0), edu::DMA_COUNT, &len.to_le_bytes())?;
        let cmd = edu::DMA_CMD_START | if to_ram { edu::DMA_CMD_TO_RAM } else { 0 };
        bar_write(dev, BarIndex::Bar(0), edu::DMA_CMD, &cmd.to_le_bytes())?;
        // QEMU's edu finishes later (a timer); wait for START to clear.
        let deadline = Instant::now() + Duration::from_secs(2);
        while bar_read64(dev, BarIndex::Bar(0), edu::DMA_CMD) & edu::DMA_CMD_START != 0 {
            if Instant::now() >= deadline {
                return Err(anyhow!("the DMA did not finish within 2 s"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    };
    run(SRC, edu::DMA_BUFFER, false)?;
    run(edu::DMA_BUFFER, DST, true)?;
    let mut back = vec![0u8; pattern.len()];
    mem.read_slice(&mut back, GuestAddress(DST))
        .map_err(|e| anyhow!("reading guest RAM: {e}"))?;
    if back == pattern {
        Ok((
            Status::Ok,
            format!(
                "{} copied by the device from guest RAM {SRC:#x} into its buffer and back to {DST:#x}; every byte matches",
                crate::check::human_size(len)
            ),
        ))
    } else {
        let first = back
            .iter()
            .zip(&pattern)
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        Ok((
            Status::Fail,
            format!("the bytes came back different (first difference at offset {first:#x})"),
        ))
    }
}

/// Prints the inspection for people.
pub fn print_text(r: &Inspection) {
    use crate::check::human_size;
    let id = &r.identity;
    println!("Device: {}", r.source.description);
    println!(
        "  {:04x}:{:04x} {} (class {}, rev {:02x}), subsystem {:04x}:{:04x}",
        id.vendor_id,
        id.device_id,
        id.class_name,
        id.class_code,
        id.revision,
        id.subsystem_vendor_id,
        id.subsystem_id
    );
    println!(
        "  config space: {} bytes{}; header type {:#04x} (single function to the guest)",
        r.config_size,
        if r.config_size > 256 {
            " (PCI Express extended)"
        } else {
            ""
        },
        id.header_type
    );
    for w in &r.source.warnings {
        println!("  WARNING: {w}");
    }
    for n in &r.source.bar_sizes {
        let name = bar_name(n.bar);
        match (n.source, &n.how) {
            ("guessed", Some(how)) => println!("  {name} size GUESSED: {how}"),
            (src, _) => println!("  {name} size {} from the {src}", human_size(n.size)),
        }
    }

    println!();
    println!(
        "BARs (VMM windows: mmio32 {:#x}+{}, mmio64 {:#x}+{}, io {:#x}+{:#x}; page size {}):",
        r.windows.mmio32.0,
        human_size(r.windows.mmio32.1),
        r.windows.mmio64.0,
        human_size(r.windows.mmio64.1),
        r.windows.io.0,
        r.windows.io.1,
        human_size(r.page_size)
    );
    if r.bars.is_empty() {
        println!("  none");
    }
    for b in &r.bars {
        let kind = match b.kind {
            "mem32" => "32-bit memory",
            "mem64" => "64-bit memory",
            "io" => "I/O ports",
            _ => "expansion ROM",
        };
        let pf = if b.prefetchable { ", prefetchable" } else { "" };
        let at = b
            .base
            .map_or_else(|| "not placed".to_string(), |a| format!("at {a:#x}"));
        let grown = if b.guest_size != b.region_size {
            format!(" (device region {})", human_size(b.region_size))
        } else {
            String::new()
        };
        println!(
            "  {:<4} {kind}{pf}, {}{grown}, {at}",
            bar_name(b.index),
            human_size(b.guest_size)
        );
        if b.kind == "rom" {
            println!("         read-only, trapped: reads go to the device's ROM region");
            continue;
        }
        if b.msix_relocated {
            println!(
                "         MSI-X table and PBA relocated to the upper half (the BAR was enlarged)"
            );
        }
        for p in &b.parts {
            let what = match p.what {
                "mapped" => "mapped: device memory in the guest, no exit",
                "msix-table" => "trapped: MSI-X table, emulated",
                "msix-pba" => "trapped: MSI-X PBA, emulated",
                "padding" => "trapped: padding past the device's region, reads 0",
                _ => "trapped: forwarded to the device",
            };
            println!(
                "         +{:#08x}..{:#08x} {what}",
                p.offset,
                p.offset + p.len
            );
        }
    }

    println!();
    println!("Capabilities:");
    for k in &r.capabilities.kept {
        println!(
            "  kept    [{:>3x}] {}{} ({})",
            k.offset,
            k.name,
            if k.extended { " (ext)" } else { "" },
            k.handling
        );
    }
    for h in &r.capabilities.hidden {
        println!(
            "  hidden  [{:>3x}] {}{}: {}",
            h.offset,
            h.name,
            if h.extended { " (ext)" } else { "" },
            h.handling
        );
    }
    if r.capabilities.kept.is_empty() && r.capabilities.hidden.is_empty() {
        println!("  none");
    }

    println!();
    println!("Interrupts:");
    let i = &r.interrupts;
    match i.intx_pin {
        Some(p) => println!("  INTx    pin {p}"),
        None => println!("  INTx    none"),
    }
    match &i.msi {
        Some(m) => println!(
            "  MSI     {} vector{}, {}-bit{}",
            m.vectors,
            if m.vectors == 1 { "" } else { "s" },
            if m.addr64 { 64 } else { 32 },
            if m.per_vector_mask {
                ", per-vector masking"
            } else {
                ""
            }
        ),
        None => println!("  MSI     none"),
    }
    match &i.msix {
        Some(m) => println!(
            "  MSI-X   {} vectors, table BAR{} +{:#x}, PBA BAR{} +{:#x}",
            m.vectors, m.table_bar, m.table_offset, m.pba_bar, m.pba_offset
        ),
        None => println!("  MSI-X   none"),
    }
    println!(
        "  VFIO reports INTx {}, MSI {}, MSI-X {}; wired at attach: {}",
        i.vfio_counts[0], i.vfio_counts[1], i.vfio_counts[2], i.wired_at_attach
    );

    if !r.self_check.is_empty() {
        println!();
        println!("Self-check:");
        let width = r.self_check.iter().map(|s| s.name.len()).max().unwrap_or(0);
        for s in &r.self_check {
            println!(
                "  {} {:<width$} {:>9}  {}",
                s.status.tag(),
                s.name,
                micros_text(s.micros),
                s.detail
            );
        }
    }
}

fn micros_text(us: u64) -> String {
    if us >= 10_000 {
        format!("{} ms", us / 1000)
    } else if us >= 1000 {
        format!("{}.{} ms", us / 1000, (us % 1000) / 100)
    } else {
        format!("{us} µs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bar_parts_split_mapped_msix_trapped_and_padding() {
        // A 16 KiB BAR whose device region is 8 KiB: page 0 mapped, table in
        // page 1 (trapped with the rest of that page), padding above 8 KiB.
        let p = parts(0x4000, 0x2000, &[(0, 0x1000)], Some((0x1100, 0x100)), None);
        assert_eq!(
            p,
            vec![
                Part {
                    offset: 0,
                    len: 0x1000,
                    what: "mapped"
                },
                Part {
                    offset: 0x1000,
                    len: 0x100,
                    what: "trapped"
                },
                Part {
                    offset: 0x1100,
                    len: 0x100,
                    what: "msix-table"
                },
                Part {
                    offset: 0x1200,
                    len: 0xe00,
                    what: "trapped"
                },
                Part {
                    offset: 0x2000,
                    len: 0x2000,
                    what: "padding"
                },
            ]
        );
    }

    #[test]
    fn lspci_sizes_use_the_largest_unit_that_divides() {
        assert_eq!(lspci_size(16 << 10), "16K");
        assert_eq!(lspci_size(1 << 20), "1M");
        assert_eq!(lspci_size(1536), "1536");
        assert_eq!(lspci_size(32), "32");
    }
}
