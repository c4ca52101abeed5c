//! Where the device that `inspect` attaches (or `serve-fake` serves) comes
//! from: a host PCI function bound to vfio-pci, a vfio-user server, a
//! built-in fake profile, or a fake made from an `lspci` hex dump.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use pci_config::cap_id;
use pci_interrupts::{MsixLayout, MSIX_CAP_LEN};
use serde::Serialize;
use vfio_backend::Vfio;
use vfio_fake_device::{lspci, DeviceTemplate, FakeDevice};

/// The profile used when no device is named.
pub const DEFAULT_PROFILE: &str = "nvme-like";

/// What the user named.
#[derive(Clone, Debug)]
pub enum Spec {
    /// A host PCI function, `DDDD:BB:DD.F`.
    Device {
        /// The function.
        bdf: String,
        /// Open it even in a no-IOMMU group (`--noiommu`): an explicit opt-in, since such
        /// a device can DMA anywhere in host memory.
        noiommu: bool,
    },
    /// A vfio-user server's socket.
    VfioUser(PathBuf),
    /// A built-in fake profile.
    Profile(String),
    /// A fake built from an `lspci -xxx`/`-xxxx` dump, with BAR sizes given
    /// on the command line (index 6 is the ROM).
    Dump {
        /// The dump file.
        path: PathBuf,
        /// `--bar-size` options.
        bar_sizes: Vec<(usize, u64)>,
    },
}

/// Where one BAR's size came from, for a fake built from a dump.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SizeNote {
    /// BAR index, 6 for the ROM.
    pub bar: usize,
    /// The size used.
    pub size: u64,
    /// `dump` (a `[size=...]` tag), `option` (`--bar-size`) or `guessed`.
    pub source: &'static str,
    /// How a guessed size was chosen.
    pub how: Option<String>,
}

/// An opened device.
pub struct Opened {
    /// The device, as a VMM reaches it.
    pub vfio: Arc<dyn Vfio>,
    /// The in-process fake, when it is one (lets the self-check fire interrupts).
    pub fake: Option<Arc<FakeDevice>>,
    /// `kernel`, `vfio-user`, `fake` or `fake-config`.
    pub kind: &'static str,
    /// What it is, for people.
    pub description: String,
    /// For a dump: where each BAR size came from.
    pub size_notes: Vec<SizeNote>,
    /// What the user should know about the input (e.g. a partial dump).
    pub warnings: Vec<String>,
    /// Why the device cannot have DMA mappings, when that is by design (a no-IOMMU device
    /// sees host physical addresses): the self-check then skips its DMA steps.
    pub no_dma: Option<String>,
}

/// Opens what `spec` names.
pub fn open(spec: &Spec) -> anyhow::Result<Opened> {
    match spec {
        Spec::Device { bdf, noiommu } => open_kernel(bdf, *noiommu),
        Spec::VfioUser(path) => {
            // A bounded connect (a listener that accepts nobody must not hang us), then the
            // client's own bounded handshake.
            let dev = crate::input::connect_unix(path, crate::input::CONNECT_TIMEOUT)
                .map_err(|e| {
                    vfio_backend::Error::io(
                        format!("connect to vfio-user socket {}", path.display()),
                        e,
                    )
                })
                .and_then(|s| vfio_backend::user::UserDevice::from_stream(s, Default::default()))
                .map_err(|e| {
                    anyhow!(
                        "cannot reach the vfio-user server at {}: {e}\n  \
                     Is a server listening there? `vfio-passthrough serve-fake {}` starts one \
                     serving the fake device.",
                        path.display(),
                        path.display()
                    )
                })?;
            let (maj, min) = dev.protocol_version();
            Ok(Opened {
                vfio: Arc::new(dev),
                fake: None,
                kind: "vfio-user",
                description: format!(
                    "vfio-user server at {} (protocol {maj}.{min})",
                    path.display()
                ),
                size_notes: Vec::new(),
                warnings: Vec::new(),
                no_dma: None,
            })
        }
        Spec::Profile(name) => {
            let fake = Arc::new(profile(name)?);
            Ok(Opened {
                vfio: fake.clone(),
                fake: Some(fake),
                kind: "fake",
                description: format!("built-in fake device, profile {name:?} (in-process)"),
                size_notes: Vec::new(),
                warnings: Vec::new(),
                no_dma: None,
            })
        }
        Spec::Dump { path, bar_sizes } => {
            let (template, notes, first_line, text) = template_from_file(path, bar_sizes)?;
            let warnings = dump_warnings(&text);
            let fake = Arc::new(
                FakeDevice::new(template)
                    .map_err(|e| anyhow!("{}: cannot build a fake device: {e}", path.display()))?,
            );
            let what = first_line.map(|l| format!(" ({l})")).unwrap_or_default();
            Ok(Opened {
                vfio: fake.clone(),
                fake: Some(fake),
                kind: "fake-config",
                description: format!(
                    "fake device made from the dump {}{what} (in-process)",
                    path.display()
                ),
                size_notes: notes,
                warnings,
                no_dma: None,
            })
        }
    }
}

/// A fake from a built-in profile, with an error that lists the profiles.
pub fn profile(name: &str) -> anyhow::Result<FakeDevice> {
    FakeDevice::profile(name).map_err(|e| anyhow!("{e}"))
}

/// The node of the no-IOMMU group the function is in (`/dev/vfio/noiommu-N`), if it is in one.
fn noiommu_group(sysfs: &Path) -> Option<String> {
    let link = std::fs::read_link(sysfs.join("iommu_group")).ok()?;
    let id = link.file_name()?.to_str()?;
    crate::sysfs::is_noiommu_group(Path::new("/"), id).then(|| format!("/dev/vfio/noiommu-{id}"))
}

fn open_kernel(bdf: &str, allow_noiommu: bool) -> anyhow::Result<Opened> {
    let bdf = crate::check::normalize_bdf(bdf)?;
    let sysfs = PathBuf::from("/sys/bus/pci/devices").join(&bdf);
    if !sysfs.exists() {
        bail!(
            "no PCI device {bdf} on this host ({} does not exist); `lspci -D` lists the devices",
            sysfs.display()
        );
    }
    let noiommu = noiommu_group(&sysfs);
    let opened = match (&noiommu, allow_noiommu) {
        (Some(node), false) => bail!(
            "{bdf} is in a no-IOMMU group ({node}): nothing isolates its DMA, so a guest \
             driving it can read and write all of host memory.\n  \
             Pass --noiommu to inspect it anyway (a VMM must opt in the same way); the \
             self-check then maps no DMA."
        ),
        (Some(_), true) => {
            vfio_backend::kernel::KernelContainer::new_noiommu().and_then(|c| c.open_device(&sysfs))
        }
        (None, true) => bail!(
            "--noiommu: {bdf} is not in a no-IOMMU group (its IOMMU isolates it); \
             inspect it without --noiommu"
        ),
        (None, false) => vfio_backend::kernel::KernelDevice::open(&sysfs),
    };
    let dev = opened.map_err(|e| {
        anyhow!(
            "cannot open {bdf} through VFIO: {e}\n  \
             Run `vfio-passthrough check {bdf}` to see what is missing (vfio-pci binding, \
             IOMMU group, /dev/vfio permissions)."
        )
    })?;
    let (description, no_dma) = if noiommu.is_some() {
        (
            format!("host PCI function {bdf} through the kernel's vfio-pci, no-IOMMU mode"),
            Some(
                "no-IOMMU mode: the device sees host physical addresses, so DMA mapping is \
                 refused by design"
                    .to_string(),
            ),
        )
    } else {
        (
            format!("host PCI function {bdf} through the kernel's vfio-pci"),
            None,
        )
    };
    Ok(Opened {
        vfio: Arc::new(dev),
        fake: None,
        kind: "kernel",
        description,
        size_notes: Vec::new(),
        warnings: Vec::new(),
        no_dma,
    })
}

/// Parses a `--bar-size N=SIZE` option (`N` 0 to 5, or 6 / `rom` for the ROM).
pub fn parse_bar_size(s: &str) -> Result<(usize, u64), String> {
    let usage = || format!("{s:?}: expected N=SIZE with N a BAR index 0..5 or `rom`, e.g. 0=16K");
    let (n, size) = s.split_once('=').ok_or_else(usage)?;
    let n = match n.trim() {
        "rom" | "ROM" | "6" => 6,
        other => other
            .parse::<usize>()
            .ok()
            .filter(|n| *n < 6)
            .ok_or_else(usage)?,
    };
    let size = crate::check::parse_size(size)?;
    if !size.is_power_of_two() {
        return Err(format!("{s:?}: a BAR size is a power of two"));
    }
    // The fake device's own limits, checked here so that nothing is sized from the option
    // before they are (the template checks them again).
    let (limit, what) = if n == 6 {
        (vfio_fake_device::MAX_ROM_SIZE, "an expansion ROM")
    } else {
        (vfio_fake_device::MAX_BAR_SIZE, "a BAR")
    };
    if size > limit {
        return Err(format!(
            "{s:?}: the fake device backs {what} of at most {}",
            crate::check::human_size(limit)
        ));
    }
    Ok((n, size))
}

/// Reads a dump file (a regular file of at most [`crate::input::MAX_DUMP_BYTES`]: a FIFO, a
/// device or a directory is refused without blocking) and builds its template. Returns the
/// template, where each size came from, the dump's first line if it names a function, and
/// the dump's text.
pub fn template_from_file(
    path: &Path,
    given: &[(usize, u64)],
) -> anyhow::Result<(DeviceTemplate, Vec<SizeNote>, Option<String>, String)> {
    let text = crate::input::read_text_bounded(path, crate::input::MAX_DUMP_BYTES)
        .with_context(|| format!("cannot read the dump {}", path.display()))?;
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .filter(|l| looks_like_bdf_line(l))
        .map(str::to_string);
    let (t, notes) = template_from_text(&text, given).map_err(|e| {
        anyhow!(
            "{}: {e:#}\n  A dump is what `lspci -xxx -s <BDF>` or (better, it also gives the BAR \
             sizes) `sudo lspci -vvxxxx -s <BDF>` prints for one function.",
            path.display()
        )
    })?;
    Ok((t, notes, first, text))
}

/// Warnings about a dump that shows less than the whole config space.
pub fn dump_warnings(text: &str) -> Vec<String> {
    let last = text
        .lines()
        .filter_map(|l| {
            let (off, rest) = l.trim().split_once(':')?;
            let ok = (2..=3).contains(&off.len())
                && off.bytes().all(|b| b.is_ascii_hexdigit())
                && rest.split_whitespace().count() == 16;
            ok.then(|| usize::from_str_radix(off, 16).ok()).flatten()
        })
        .max()
        .unwrap_or(0);
    if last < 0x40 {
        vec!["the dump shows only the 64-byte header (`lspci -x`): the capabilities are unknown \
              and read as zeros; a dump made as root with `lspci -xxx` (or `lspci -vvxxxx`) has them"
            .into()]
    } else {
        Vec::new()
    }
}

fn looks_like_bdf_line(l: &str) -> bool {
    let head = l.split_whitespace().next().unwrap_or("");
    head.contains(':') && head.contains('.') && !head.ends_with(':')
}

/// BAR and ROM sizes from the `Region N:` and `Expansion ROM` lines of the
/// function itself: lines after the first `Capabilities:` line belong to a
/// capability (the VF BARs of SR-IOV) and are not the function's.
fn sizes_from_text(text: &str) -> ([Option<u64>; 7], bool) {
    let mut sizes = [None; 7];
    let mut any_text = false;
    for line in text.lines() {
        let l = line.trim();
        if l.starts_with("Capabilities:") {
            break;
        }
        let slot = if let Some(rest) = l.strip_prefix("Region ") {
            any_text = true;
            rest.split_once(':')
                .and_then(|(n, _)| n.trim().parse::<usize>().ok())
                .filter(|n| *n < 6)
        } else if l.starts_with("Expansion ROM at") {
            any_text = true;
            Some(6)
        } else {
            None
        };
        let size = l
            .find("[size=")
            .and_then(|i| l.get(i + 6..))
            .and_then(|r| r.split_once(']'))
            .and_then(|(s, _)| lspci::parse_size(s));
        if let (Some(i), Some(size)) = (slot, size) {
            if let Some(s) = sizes.get_mut(i) {
                *s = Some(size);
            }
        }
    }
    (sizes, any_text)
}

fn rd32(c: &[u8], off: usize) -> u32 {
    c.get(off..off + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

/// The end of the MSI-X table and PBA in each BAR: a lower bound on its size. A capability
/// that cannot be decoded (it names a reserved BAR, 6 or 7) is an error that says where it is.
fn msix_extent(config: &[u8]) -> anyhow::Result<[u64; 6]> {
    let mut ext = [0u64; 6];
    let (caps, _) = pci_config::parse_capabilities_lenient(config);
    let Some(c) = caps.iter().find(|c| c.id == cap_id::MSIX) else {
        return Ok(ext);
    };
    // A malformed dump can end inside the capability: the bytes past its end read 0.
    let mut cap = [0u8; MSIX_CAP_LEN];
    for (dst, src) in cap
        .iter_mut()
        .zip(config.iter().skip(usize::from(c.offset)))
    {
        *dst = *src;
    }
    let m = MsixLayout::parse(&cap).map_err(|e| {
        anyhow!(
            "the dump's MSI-X capability at {:#x} is unusable ({e}): no VMM can place its \
             table and PBA, so this device cannot be passed through as dumped",
            c.offset
        )
    })?;
    for l in [m.table, m.pba] {
        if let Some(e) = ext.get_mut(usize::from(l.bir)) {
            *e = (*e).max(u64::from(l.offset) + u64::from(l.size));
        }
    }
    Ok(ext)
}

/// Builds a template from dump text, taking BAR sizes from `given`, else
/// the dump's `[size=...]` tags, else a guess (noted).
pub fn template_from_text(
    text: &str,
    given: &[(usize, u64)],
) -> anyhow::Result<(DeviceTemplate, Vec<SizeNote>)> {
    let dump = lspci::parse(text).map_err(|e| anyhow!("{e}"))?;
    let config = dump.config;
    let (tagged, _) = sizes_from_text(text);
    let msix = msix_extent(&config)?;
    let mut sizes: [Option<u64>; 6] = [None; 6];
    let mut notes = Vec::new();
    let mut i = 0usize;
    while i < 6 {
        let reg = rd32(&config, 0x10 + 4 * i);
        let io = reg & 1 != 0;
        let is64 = !io && (reg >> 1) & 3 == 2;
        let opt = given.iter().rev().find(|(n, _)| *n == i).map(|g| g.1);
        if is64 && given.iter().any(|(n, _)| *n == i + 1) {
            bail!(
                "--bar-size {}=...: BAR register {} is the upper half of 64-bit BAR {i}; \
                 give the size as {i}=SIZE",
                i + 1,
                i + 1
            );
        }
        let tag = tagged.get(i).copied().flatten();
        let chosen = if let Some(s) = opt {
            Some((s, "option", None))
        } else if let Some(s) = tag {
            Some((s, "dump", None))
        } else if reg != 0 {
            let (s, how) = guess_size(&config, i, reg, is64, msix.get(i).copied().unwrap_or(0));
            Some((s, "guessed", Some(how)))
        } else {
            None
        };
        if let Some((size, source, how)) = chosen {
            if let Some(s) = sizes.get_mut(i) {
                *s = Some(size);
            }
            notes.push(SizeNote {
                bar: i,
                size,
                source,
                how,
            });
        }
        i += if is64 { 2 } else { 1 };
    }
    let mut template = DeviceTemplate::from_config(config.clone(), &sizes).map_err(|e| {
        anyhow!(
            "{e}\n  BAR sizes used: {}",
            if notes.is_empty() {
                "none".to_string()
            } else {
                notes
                    .iter()
                    .map(|n| format!("BAR{}={} ({})", n.bar, n.size, n.source))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )
    })?;
    // The ROM: its size from --bar-size rom=, else the Expansion ROM line.
    let rom_reg = rd32(&config, 0x30);
    let rom = given
        .iter()
        .rev()
        .find(|(n, _)| *n == 6)
        .map(|g| (g.1, "option"))
        .or_else(|| tagged.get(6).copied().flatten().map(|s| (s, "dump")));
    match rom {
        Some((size, source)) => {
            // with_rom_size checks the size against the fake's ROM limit before allocating.
            template = template.with_rom_size(size).map_err(|e| {
                anyhow!(
                    "expansion ROM of {size} bytes (from the {}): {e}",
                    if source == "option" {
                        "--bar-size rom= option"
                    } else {
                        "dump's Expansion ROM line"
                    }
                )
            })?;
            notes.push(SizeNote {
                bar: 6,
                size,
                source,
                how: None,
            });
        }
        None if rom_reg & 0xffff_f800 != 0 => notes.push(SizeNote {
            bar: 6,
            size: 0,
            source: "guessed",
            how: Some(
                "the ROM BAR holds an address but the dump gives no size: the ROM is left out \
                 (give it with --bar-size rom=SIZE)"
                    .into(),
            ),
        }),
        None => {}
    }
    Ok((template, notes))
}

/// Guesses the size of BAR `i` from what the dump shows: at least the end
/// of the MSI-X structures it holds, at most the alignment of its address.
fn guess_size(config: &[u8], i: usize, reg: u32, is64: bool, msix_end: u64) -> (u64, String) {
    let io = reg & 1 != 0;
    let mut addr = u64::from(reg & if io { !3 } else { !0xf });
    if is64 {
        addr |= u64::from(rd32(config, 0x14 + 4 * i)) << 32;
    }
    let align = (addr != 0).then(|| 1u64 << addr.trailing_zeros());
    let hint = format!("give the real size with --bar-size {i}=SIZE, or use a dump made with `lspci -vvxxxx`, which shows it");
    if io {
        let size = align.unwrap_or(256).clamp(4, 256);
        let why = match align {
            Some(a) if a <= 256 => format!("the alignment of its port address {addr:#x}"),
            _ => "the largest I/O BAR the PCI spec allows".to_string(),
        };
        return (size, format!("{size} ports: {why}; {hint}"));
    }
    let lower = msix_end
        .max(16)
        .checked_next_power_of_two()
        .unwrap_or(1 << 63);
    let size = match align {
        Some(a) => lower.max(4096.min(a)),
        None => lower.max(4096),
    };
    let mut why = if msix_end > 0 {
        format!(
            "the smallest power of two that holds its MSI-X structures (up to {msix_end:#x}), at least a 4 KiB page"
        )
    } else {
        "one 4 KiB page, the smallest a mappable BAR takes".to_string()
    };
    if let Some(a) = align {
        why.push_str(&format!(
            "; its address {addr:#x} allows up to {}",
            crate::check::human_size(a)
        ));
    }
    (
        size,
        format!("{}: {why}; {hint}", crate::check::human_size(size)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(config: &[u8], header: &str) -> String {
        let mut s = format!("{header}\n");
        for (row, chunk) in config.chunks(16).enumerate() {
            s.push_str(&format!("{:02x}:", row * 16));
            for b in chunk {
                s.push_str(&format!(" {b:02x}"));
            }
            s.push('\n');
        }
        s
    }

    /// A 256-byte function: BAR0 64-bit memory at 0xfe600000, MSI-X with 33
    /// vectors, table at BAR0+0x3000, PBA at BAR0+0x2000.
    fn nvme_like_config() -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0..4].copy_from_slice(&[0x34, 0x12, 0x10, 0x0a]);
        c[6] = 0x10;
        c[0x0b] = 0x01;
        c[0x10..0x14].copy_from_slice(&0xfe60_0004u32.to_le_bytes());
        c[0x34] = 0x40;
        c[0x40] = 0x11;
        c[0x42..0x44].copy_from_slice(&32u16.to_le_bytes());
        c[0x44..0x48].copy_from_slice(&0x3000u32.to_le_bytes());
        c[0x48..0x4c].copy_from_slice(&0x2000u32.to_le_bytes());
        c
    }

    #[test]
    fn guessed_size_holds_the_msix_table_and_respects_the_address_alignment() {
        let text = hex(
            &nvme_like_config(),
            "03:00.0 Non-Volatile memory controller",
        );
        let (t, notes) = template_from_text(&text, &[]).unwrap();
        // 33 vectors * 16 bytes end at 0x3210: the next power of two is 16 KiB.
        assert_eq!(t.bar(0).unwrap().size, 0x4000);
        assert_eq!(notes.len(), 1);
        assert_eq!(notes[0].source, "guessed");
        assert!(notes[0].how.as_deref().unwrap().contains("MSI-X"));
    }

    #[test]
    fn msix_extent_is_the_end_of_the_table_and_pba_in_their_bars() {
        let mut c = nvme_like_config();
        assert_eq!(msix_extent(&c).unwrap(), [0x3210, 0, 0, 0, 0, 0]);
        // Table in BAR2, PBA in BAR4 (BIR in bits 2:0, offset above).
        c[0x44..0x48].copy_from_slice(&(0x3000u32 | 2).to_le_bytes());
        c[0x48..0x4c].copy_from_slice(&(0x2000u32 | 4).to_le_bytes());
        assert_eq!(msix_extent(&c).unwrap(), [0, 0, 0x3210, 0, 0x2008, 0]);
    }

    #[test]
    fn msix_capability_with_a_reserved_bir_is_refused_naming_the_capability() {
        for (table, pba) in [(6u32, 0u32), (0, 7)] {
            let mut c = nvme_like_config();
            c[0x44..0x48].copy_from_slice(&(0x3000 | table).to_le_bytes());
            c[0x48..0x4c].copy_from_slice(&(0x2000 | pba).to_le_bytes());
            let e = msix_extent(&c).unwrap_err().to_string();
            assert!(e.contains("MSI-X capability at 0x40"), "{e}");
            assert!(e.contains("reserved BAR indicator"), "{e}");
            // --fake-config stops there, before guessing any BAR size.
            let e = template_from_text(&hex(&c, "03:00.0 x"), &[]).unwrap_err();
            let e = e.to_string();
            assert!(e.contains("MSI-X capability at 0x40 is unusable"), "{e}");
        }
    }

    #[test]
    fn msix_capability_cut_off_by_the_end_of_config_space_reads_zeros_past_it() {
        // MSI-X at 0xf8 of a 256-byte dump: message control and table dword are there, the
        // PBA dword would be at 0x100 and reads 0 (PBA at BAR0 +0).
        let mut c = nvme_like_config();
        c[0x34] = 0xf8;
        c[0xf8] = 0x11;
        c[0xfa..0xfc].copy_from_slice(&32u16.to_le_bytes());
        c[0xfc..0x100].copy_from_slice(&(0x3000u32 | 2).to_le_bytes());
        assert_eq!(msix_extent(&c).unwrap(), [8, 0, 0x3210, 0, 0, 0]);
    }

    #[test]
    fn bar_size_option_wins_over_the_guess() {
        let text = hex(&nvme_like_config(), "03:00.0 x");
        let (t, notes) = template_from_text(&text, &[(0, 0x10000)]).unwrap();
        assert_eq!(t.bar(0).unwrap().size, 0x10000);
        assert_eq!(notes[0].source, "option");
    }

    #[test]
    fn size_for_the_upper_half_of_a_64_bit_bar_is_refused_with_the_right_index() {
        let text = hex(&nvme_like_config(), "03:00.0 x");
        let e = template_from_text(&text, &[(1, 0x4000)]).unwrap_err();
        assert!(e.to_string().contains("give the size as 0=SIZE"), "{e}");
    }

    #[test]
    fn vf_region_lines_inside_sriov_do_not_size_the_function_bars() {
        let mut text = String::from(
            "03:00.0 x\n\tRegion 0: Memory at fe600000 (64-bit, non-prefetchable) [size=16K]\n",
        );
        text.push_str("\tCapabilities: [160 v1] Single Root I/O Virtualization (SR-IOV)\n");
        text.push_str(
            "\t\tRegion 0: Memory at 0000000000000000 (64-bit, prefetchable) [size=4K]\n",
        );
        let (sizes, _) = sizes_from_text(&text);
        assert_eq!(sizes[0], Some(16 << 10));
    }

    #[test]
    fn io_bar_guess_follows_its_port_alignment() {
        let mut c = nvme_like_config();
        c[0x18..0x1c].copy_from_slice(&0xe021u32.to_le_bytes());
        let text = hex(&c, "03:00.0 x");
        let (t, _) = template_from_text(&text, &[]).unwrap();
        assert_eq!(t.bar(2).unwrap().size, 32);
    }

    #[test]
    fn bar_size_option_parses_rom_and_rejects_bad_indices() {
        assert_eq!(parse_bar_size("0=16K"), Ok((0, 16384)));
        assert_eq!(parse_bar_size("rom=512K"), Ok((6, 512 << 10)));
        let e = parse_bar_size("7=4K").unwrap_err();
        assert!(e.contains("N a BAR index 0..5 or `rom`"), "{e}");
        let e = parse_bar_size("0=3000").unwrap_err();
        assert!(e.contains("a BAR size is a power of two"), "{e}");
    }
}
