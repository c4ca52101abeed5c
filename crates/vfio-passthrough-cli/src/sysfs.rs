//! Reading the host: every path goes through a root prefix (so tests and support bundles can
//! point at a copied or fabricated tree), plus the parsers for what sysfs hands back: the
//! `resource` text file and the binary `config` file (capability walk, bounded).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use pci_interrupts::{MsixLayout, MSIX_CAP_LEN};

/// Who will open the VFIO device nodes: the user the permission check is made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserIds {
    /// Effective user id.
    pub uid: u32,
    /// Primary and supplementary group ids.
    pub gids: Vec<u32>,
}

impl UserIds {
    /// The user running this process (effective uid, effective gid and supplementary groups).
    pub fn current() -> Self {
        // SAFETY: geteuid and getegid cannot fail and touch no memory of ours.
        let (uid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let mut gids = vec![egid];
        let mut buf = vec![0 as libc::gid_t; 256];
        let len = libc::c_int::try_from(buf.len()).unwrap_or(0);
        // SAFETY: buf holds `len` gid_t slots and getgroups writes at most `len` entries.
        let n = unsafe { libc::getgroups(len, buf.as_mut_ptr()) };
        if let Ok(n) = usize::try_from(n) {
            gids.extend(buf.iter().take(n).copied());
        }
        gids.sort_unstable();
        gids.dedup();
        UserIds { uid, gids }
    }

    /// Whether this user may open `meta`'s file for reading and writing, judged from the mode
    /// bits and owner (root is assumed to have CAP_DAC_OVERRIDE).
    pub fn can_read_write(&self, meta: &fs::Metadata) -> bool {
        if self.uid == 0 {
            return true;
        }
        let mode = meta.mode();
        let bits = if meta.uid() == self.uid {
            (mode >> 6) & 0o7
        } else if self.gids.contains(&meta.gid()) {
            (mode >> 3) & 0o7
        } else {
            mode & 0o7
        };
        bits & 0o6 == 0o6
    }
}

/// RLIMIT_MEMLOCK soft limit in bytes; `None` means unlimited.
pub fn current_memlock_limit() -> io::Result<Option<u64>> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit the call fills in.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur == libc::RLIM_INFINITY {
        Ok(None)
    } else {
        Ok(Some(lim.rlim_cur))
    }
}

/// The host's page size in bytes (4096 if sysconf cannot say).
pub fn current_page_size() -> u64 {
    // SAFETY: sysconf only reads a configuration value.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).ok().filter(|v| *v > 0).unwrap_or(4096)
}

/// The host as seen through a root prefix, plus the process facts a check needs.
#[derive(Debug, Clone)]
pub struct Host {
    /// Directory that stands for `/` (the real root on a live host).
    pub root: PathBuf,
    /// Host page size in bytes.
    pub page_size: u64,
    /// RLIMIT_MEMLOCK the VMM will run with; `None` is unlimited.
    pub memlock: Option<u64>,
    /// The user the device-node permission check is made for.
    pub user: UserIds,
}

/// Whether IOMMU group `group` of the host whose `/` is `root` is a no-IOMMU group (vfio's
/// unsafe no-IOMMU mode): the kernel names it `vfio-noiommu`, and vfio gives it the node
/// `/dev/vfio/noiommu-<group>`.
pub fn is_noiommu_group(root: &Path, group: &str) -> bool {
    let name = root.join(format!("sys/kernel/iommu_groups/{group}/name"));
    crate::input::read_text_bounded(&name, crate::input::MAX_SYSFS_BYTES)
        .is_ok_and(|n| n.trim() == "vfio-noiommu")
        || fs::symlink_metadata(root.join(format!("dev/vfio/noiommu-{group}"))).is_ok()
}

impl Host {
    /// The real path of an absolute host path such as `/sys/class/iommu`.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// Reads a text file, trimmed. Like every file read under the root, it must be a regular
    /// file of at most [`crate::input::MAX_SYSFS_BYTES`] (a sysfs attribute is one page): a
    /// FIFO or device planted in a copied tree is refused, never waited on.
    pub fn read_text(&self, abs: &str) -> io::Result<String> {
        crate::input::read_text_bounded(&self.path(abs), crate::input::MAX_SYSFS_BYTES)
            .map(|s| s.trim().to_string())
    }

    /// Reads a binary file (bounded as [`Host::read_text`]).
    pub fn read_bytes(&self, abs: &str) -> io::Result<Vec<u8>> {
        crate::input::read_bounded(&self.path(abs), crate::input::MAX_SYSFS_BYTES)
    }

    /// The last component of a symlink's target (`driver -> ../drivers/vfio-pci` gives `vfio-pci`).
    pub fn link_name(&self, abs: &str) -> io::Result<String> {
        let target = fs::read_link(self.path(abs))?;
        target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "symlink has no file name"))
    }

    /// Sorted entry names of a directory.
    pub fn list_dir(&self, abs: &str) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(self.path(abs))? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    /// Whether a path exists (a dangling symlink counts as existing).
    pub fn exists(&self, abs: &str) -> bool {
        fs::symlink_metadata(self.path(abs)).is_ok()
    }

    /// Metadata of a path, following symlinks.
    pub fn metadata(&self, abs: &str) -> io::Result<fs::Metadata> {
        fs::metadata(self.path(abs))
    }

    /// Whether a path is a directory.
    pub fn is_dir(&self, abs: &str) -> bool {
        Path::is_dir(&self.path(abs))
    }
}

/// `IORESOURCE_IO`: an I/O port BAR.
pub const IORESOURCE_IO: u64 = 0x0000_0100;
/// `IORESOURCE_MEM`: a memory BAR.
pub const IORESOURCE_MEM: u64 = 0x0000_0200;
/// `IORESOURCE_PREFETCH`: prefetchable memory.
pub const IORESOURCE_PREFETCH: u64 = 0x0000_2000;
/// `IORESOURCE_MEM_64`: a 64-bit memory BAR.
pub const IORESOURCE_MEM_64: u64 = 0x0010_0000;
/// `IORESOURCE_UNSET`: no address has been assigned.
pub const IORESOURCE_UNSET: u64 = 0x2000_0000;

/// What kind of space a resource decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// I/O port space.
    Io,
    /// 32-bit memory space.
    Mem32,
    /// 64-bit memory space.
    Mem64,
}

/// One populated line of the sysfs `resource` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Resource {
    /// Line number: 0..=5 BARs, 6 the expansion ROM.
    pub index: usize,
    /// Host physical start address.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// Raw IORESOURCE_* flags.
    pub flags: u64,
}

impl Resource {
    /// The decoded space, if any.
    pub fn kind(&self) -> Option<ResourceKind> {
        if self.flags & IORESOURCE_IO != 0 {
            Some(ResourceKind::Io)
        } else if self.flags & IORESOURCE_MEM != 0 {
            if self.flags & IORESOURCE_MEM_64 != 0 {
                Some(ResourceKind::Mem64)
            } else {
                Some(ResourceKind::Mem32)
            }
        } else {
            None
        }
    }

    /// Whether the memory is prefetchable.
    pub fn prefetchable(&self) -> bool {
        self.flags & IORESOURCE_PREFETCH != 0
    }

    /// Whether the kernel left the resource without an address.
    pub fn unassigned(&self) -> bool {
        self.flags & IORESOURCE_UNSET != 0
    }
}

/// Index of the expansion ROM line in `resource`.
pub const ROM_INDEX: usize = 6;

/// Parses the sysfs `resource` file: one `start end flags` line (hex) per resource. Returns the
/// populated BAR lines (0..=5) and the ROM line (6); later lines (SR-IOV, bridge windows) are
/// ignored. A malformed line is an error naming the line.
pub fn parse_resource(text: &str) -> Result<Vec<Resource>, String> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate().take(ROM_INDEX + 1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [start, end, flags] = fields.as_slice() else {
            return Err(format!(
                "line {}: expected `start end flags`, found {line:?}",
                index + 1
            ));
        };
        let parse = |s: &str| {
            u64::from_str_radix(s.trim_start_matches("0x"), 16)
                .map_err(|_| format!("line {}: {s:?} is not a hex number", index + 1))
        };
        let (start, end, flags) = (parse(start)?, parse(end)?, parse(flags)?);
        if flags == 0 && start == 0 && end == 0 {
            continue;
        }
        if end < start {
            return Err(format!(
                "line {}: end {end:#x} is below start {start:#x}",
                index + 1
            ));
        }
        let size = (end - start)
            .checked_add(1)
            .ok_or_else(|| format!("line {}: resource spans the whole address space", index + 1))?;
        out.push(Resource {
            index,
            start,
            size,
            flags,
        });
    }
    Ok(out)
}

/// Capability ids: pci-config's, the one PCI vocabulary of the workspace.
pub use pci_config::cap_id;

/// One entry of the standard capability list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    /// Capability id.
    pub id: u8,
    /// Offset of the capability header in config space.
    pub offset: usize,
}

/// The parsed parts of a function's configuration space this tool looks at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigInfo {
    /// Bytes of config space that were readable (64 for unprivileged readers).
    pub len: usize,
    /// Header type (bits 6:0 of offset 0x0E).
    pub header_type: u8,
    /// The standard capabilities, in list order.
    pub caps: Vec<Capability>,
    /// Why the walk stopped early, if the list was broken.
    pub cap_error: Option<String>,
}

/// Little-endian reads with bounds checks.
fn byte(cfg: &[u8], off: usize) -> Option<u8> {
    cfg.get(off).copied()
}

/// 16-bit little-endian read.
pub fn read_u16(cfg: &[u8], off: usize) -> Option<u16> {
    let b = cfg.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([*b.first()?, *b.get(1)?]))
}

/// 32-bit little-endian read.
pub fn read_u32(cfg: &[u8], off: usize) -> Option<u32> {
    let b = cfg.get(off..off.checked_add(4)?)?;
    let arr: [u8; 4] = b.try_into().ok()?;
    Some(u32::from_le_bytes(arr))
}

/// Offset of the status register.
const STATUS: usize = 0x06;
/// Status bit 4: a capability list is present.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// Offset of the header type register.
const HEADER_TYPE: usize = 0x0E;
/// Size of conventional config space.
const CONFIG_END: usize = 0x100;

/// Parses the header type and walks the standard capability list with
/// `pci-config`'s guarded walk: a pointer into the header or past the end, a
/// loop or a short read stops it and is reported in `cap_error` (never a
/// hang or a panic); the capabilities found before that are kept.
pub fn parse_config(cfg: &[u8]) -> ConfigInfo {
    let mut info = ConfigInfo {
        len: cfg.len(),
        header_type: byte(cfg, HEADER_TYPE).unwrap_or(0) & 0x7f,
        ..ConfigInfo::default()
    };
    let status = read_u16(cfg, STATUS).unwrap_or(0);
    if status & STATUS_CAP_LIST == 0 {
        return info;
    }
    if cfg.len() < CONFIG_END {
        // An unprivileged read of sysfs `config` gives the header only.
        info.cap_error = Some(format!(
            "the capability list is beyond the {} readable bytes",
            cfg.len()
        ));
        return info;
    }
    let (caps, err) = pci_config::parse_capabilities_lenient(cfg);
    info.caps = caps
        .iter()
        .map(|c| Capability {
            id: c.id,
            offset: usize::from(c.offset),
        })
        .collect();
    info.cap_error = err.map(|e| e.to_string());
    info
}

impl ConfigInfo {
    /// The first capability with this id.
    pub fn find(&self, id: u8) -> Option<usize> {
        self.caps.iter().find(|c| c.id == id).map(|c| c.offset)
    }
}

/// The MSI-X capability at `off`, decoded (table and PBA placement, PCI Local Bus 3.0, 6.8.2):
/// `None` when config space ends before its 12 bytes, an error when they are not a usable MSI-X
/// capability (wrong ID, reserved BAR indicator).
pub fn msix_layout(cfg: &[u8], off: usize) -> Option<pci_interrupts::Result<MsixLayout>> {
    let bytes = cfg.get(off..off.checked_add(MSIX_CAP_LEN)?)?;
    Some(MsixLayout::parse(bytes))
}

/// PCIe Device Capabilities bit 28: Function Level Reset capability.
pub fn pcie_flr(cfg: &[u8], pcie_off: usize) -> Option<bool> {
    let devcap = read_u32(cfg, pcie_off.checked_add(4)?)?;
    Some(devcap & (1 << 28) != 0)
}

/// Advanced Features capability: both TP (bit 0) and FLR (bit 1) are needed for an AF FLR.
pub fn af_flr(cfg: &[u8], af_off: usize) -> Option<bool> {
    let caps = byte(cfg, af_off.checked_add(3)?)?;
    Some(caps & 0x3 == 0x3)
}

/// Power Management: PMCSR bit 3 (No_Soft_Reset). When clear, a D3hot->D0 transition resets
/// the function, which is what the kernel's `pm` reset method relies on.
pub fn pm_no_soft_reset(cfg: &[u8], pm_off: usize) -> Option<bool> {
    let pmcsr = read_u16(cfg, pm_off.checked_add(4)?)?;
    Some(pmcsr & (1 << 3) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_with_caps(chain: &[(usize, u8, u8)]) -> Vec<u8> {
        let mut cfg = vec![0u8; 256];
        cfg[0x06] = 0x10;
        cfg[0x34] = chain.first().map(|c| c.0 as u8).unwrap_or(0);
        for &(off, id, next) in chain {
            cfg[off] = id;
            cfg[off + 1] = next;
        }
        cfg
    }

    #[test]
    fn resource_lines_give_sizes_and_skip_empty_bars() {
        let text = "0x00000000fe000000 0x00000000fe00ffff 0x0000000000040200\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000000000001000 0x000000000000101f 0x0000000000040101\n\
                    0x0000004000000000 0x00000040ffffffff 0x000000000014220c\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
                    0x00000000fe100000 0x00000000fe17ffff 0x0000000000046200\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
        let r = parse_resource(text).unwrap();
        assert_eq!(r.len(), 4);
        assert_eq!(
            (r[0].index, r[0].size, r[0].kind()),
            (0, 0x10000, Some(ResourceKind::Mem32))
        );
        assert_eq!(
            (r[1].index, r[1].size, r[1].kind()),
            (2, 0x20, Some(ResourceKind::Io))
        );
        assert_eq!(
            (r[2].index, r[2].size, r[2].kind()),
            (3, 1 << 32, Some(ResourceKind::Mem64))
        );
        assert!(r[2].prefetchable());
        assert_eq!((r[3].index, r[3].size), (ROM_INDEX, 0x80000));
    }

    #[test]
    fn malformed_resource_line_is_an_error_naming_the_line() {
        let err = parse_resource("0x0 0x0 0x0\nbogus\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn capability_walk_follows_next_pointers_and_ignores_low_two_bits() {
        let mut cfg = cfg_with_caps(&[(0x40, 0x01, 0x50), (0x50, 0x11, 0x00)]);
        cfg[0x41] = 0x53; // low two bits are reserved and must be masked off
        let info = parse_config(&cfg);
        assert_eq!(info.cap_error, None);
        assert_eq!(info.find(cap_id::POWER_MANAGEMENT), Some(0x40));
        assert_eq!(info.find(cap_id::MSIX), Some(0x50));
    }

    #[test]
    fn capability_loop_is_reported_not_followed_forever() {
        let cfg = cfg_with_caps(&[(0x40, 0x01, 0x50), (0x50, 0x05, 0x40)]);
        let info = parse_config(&cfg);
        assert_eq!(info.caps.len(), 2);
        assert!(info.cap_error.unwrap().contains("loops"));
    }

    #[test]
    fn capability_pointer_into_header_is_reported() {
        let cfg = cfg_with_caps(&[(0x40, 0x01, 0x10)]);
        assert!(parse_config(&cfg)
            .cap_error
            .unwrap()
            .contains("outside the capability area"));
    }

    #[test]
    fn unprivileged_64_byte_config_stops_the_walk_with_an_error() {
        let cfg = cfg_with_caps(&[(0x40, 0x01, 0x00)]);
        let info = parse_config(&cfg[..64]);
        assert!(info.cap_error.unwrap().contains("64 readable bytes"));
    }

    #[test]
    fn no_capability_list_bit_means_no_walk() {
        let mut cfg = cfg_with_caps(&[(0x40, 0x01, 0x40)]);
        cfg[0x06] = 0;
        let info = parse_config(&cfg);
        assert!(info.caps.is_empty());
        assert_eq!(info.cap_error, None);
    }

    #[test]
    fn msix_fields_decode_bir_offset_and_table_size() {
        let mut cfg = vec![0u8; 256];
        cfg[0x50] = cap_id::MSIX;
        cfg[0x52..0x54].copy_from_slice(&0x001fu16.to_le_bytes()); // 32 vectors
        cfg[0x54..0x58].copy_from_slice(&(0x2000u32 | 3).to_le_bytes());
        cfg[0x58..0x5c].copy_from_slice(&(0x3000u32 | 3).to_le_bytes());
        let m = msix_layout(&cfg, 0x50).unwrap().unwrap();
        assert_eq!((m.vectors, m.table.bir, m.table.offset), (32, 3, 0x2000));
        assert_eq!((m.pba.bir, m.pba.offset), (3, 0x3000));
        assert_eq!((m.table.size, m.pba.size), (512, 8));
    }

    #[test]
    fn msix_capability_cut_short_or_naming_a_reserved_bar_is_not_decoded() {
        let mut cfg = vec![0u8; 256];
        cfg[0xf4] = cap_id::MSIX;
        assert!(msix_layout(&cfg, 0xf4).unwrap().is_ok());
        assert!(msix_layout(&cfg, 0xf8).is_none());
        assert!(msix_layout(&cfg[..0xff], 0xf4).is_none());
        assert!(msix_layout(&cfg, usize::MAX).is_none());
        let reserved_bir = |r: Option<pci_interrupts::Result<_>>| {
            matches!(
                r,
                Some(Err(pci_interrupts::Error::InvalidCapability {
                    capability: "MSI-X",
                    reason: "reserved BAR indicator"
                }))
            )
        };
        cfg[0xf8] = 6; // table BIR 6
        assert!(reserved_bir(msix_layout(&cfg, 0xf4)));
        cfg[0xf8] = 0;
        cfg[0xfc] = 7; // PBA BIR 7
        assert!(reserved_bir(msix_layout(&cfg, 0xf4)));
    }

    #[test]
    fn owner_group_other_bits_decide_access() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node");
        fs::write(&f, "").unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&f, fs::Permissions::from_mode(0o660)).unwrap();
        let meta = fs::metadata(&f).unwrap();
        let group_member = UserIds {
            uid: meta.uid().wrapping_add(1).max(1),
            gids: vec![meta.gid()],
        };
        assert!(group_member.can_read_write(&meta));
        let stranger = UserIds {
            uid: 4242,
            gids: vec![meta.gid().wrapping_add(4242)],
        };
        assert!(!stranger.can_read_write(&meta));
        fs::set_permissions(&f, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(stranger.can_read_write(&fs::metadata(&f).unwrap()));
    }
}
