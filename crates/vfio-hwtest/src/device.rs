//! The PCI functions under test, and what sysfs says about them.

use anyhow::{bail, Context, Result};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// Where the kernel lists every PCI function, one directory (or link) per BDF.
pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// A PCI vendor:device ID pair, as in `lspci -n` (`1234:11e8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciId {
    /// The vendor ID (config space offset 0x00).
    pub vendor: u16,
    /// The device ID (config space offset 0x02).
    pub device: u16,
}

impl PciId {
    /// Parses `VVVV:DDDD` (hexadecimal, without `0x`).
    pub fn parse(s: &str) -> Result<Self> {
        let (v, d) = s
            .split_once(':')
            .with_context(|| format!("`{s}` is not a VENDOR:DEVICE id such as 1234:11e8"))?;
        let hex = |part: &str| {
            if part.is_empty() || part.len() > 4 {
                bail!("`{part}` in `{s}` is not a 16-bit hexadecimal id");
            }
            u16::from_str_radix(part, 16)
                .with_context(|| format!("`{part}` in `{s}` is not a 16-bit hexadecimal id"))
        };
        Ok(Self {
            vendor: hex(v)?,
            device: hex(d)?,
        })
    }
}

impl fmt::Display for PciId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.device)
    }
}

/// Checks a PCI address and returns it in sysfs form, `dddd:bb:dd.f`.
///
/// `bb:dd.f` gets domain `0000`. Only hexadecimal digits in the right places are accepted,
/// so the result is safe to join to a sysfs path.
pub fn canonical_bdf(s: &str) -> Result<String> {
    let full = if s.len() == 7 {
        format!("0000:{s}")
    } else {
        s.to_string()
    };
    let b = full.as_bytes();
    let shape_ok = b.len() == 12
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b':',
            10 => *c == b'.',
            11 => (b'0'..=b'7').contains(c),
            _ => c.is_ascii_hexdigit(),
        });
    if !shape_ok {
        bail!("`{s}` is not a PCI address such as 0000:00:01.0 or 00:01.0");
    }
    // Device numbers go up to 0x1f.
    let dev = u8::from_str_radix(&full[8..10], 16).context("device number")?;
    if dev > 0x1f {
        bail!("`{s}`: device number {dev:#x} is above 0x1f");
    }
    Ok(full.to_ascii_lowercase())
}

/// Reads a sysfs attribute holding one hexadecimal number such as `0x11e8\n`.
pub fn read_hex_attr(path: &Path) -> Result<u64> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_hex_attr(&text).with_context(|| format!("parse {}", path.display()))
}

/// Parses the text of a hexadecimal sysfs attribute (`0x` prefix optional, trailing newline).
pub fn parse_hex_attr(text: &str) -> Result<u64> {
    let t = text.trim();
    let digits = t.strip_prefix("0x").unwrap_or(t);
    u64::from_str_radix(digits, 16).with_context(|| format!("`{t}` is not a hexadecimal number"))
}

/// The last component of a symlink's target (`../../bus/pci/drivers/vfio-pci` -> `vfio-pci`),
/// or `None` when the link does not exist.
pub fn link_name(link: &Path) -> Result<Option<String>> {
    match fs::read_link(link) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("readlink {}", link.display())),
    }
}

/// One PCI function under test.
#[derive(Clone, Debug)]
pub struct Device {
    /// Its address, `dddd:bb:dd.f`.
    pub bdf: String,
    /// Its sysfs directory.
    pub sysfs: PathBuf,
    /// Vendor and device ID as sysfs reports them.
    pub id: PciId,
}

impl Device {
    /// Looks a function up in sysfs (`bdf` must come from [`canonical_bdf`]).
    pub fn open(bdf: &str) -> Result<Self> {
        Self::open_in(Path::new(SYSFS_PCI_DEVICES), bdf)
    }

    /// Like [`Device::open`], with another directory standing in for `/sys/bus/pci/devices`.
    pub fn open_in(devices: &Path, bdf: &str) -> Result<Self> {
        let sysfs = devices.join(bdf);
        if !sysfs.exists() {
            bail!("no PCI function {bdf} ({} does not exist)", sysfs.display());
        }
        let vendor = read_hex_attr(&sysfs.join("vendor"))?;
        let device = read_hex_attr(&sysfs.join("device"))?;
        let id = PciId {
            vendor: u16::try_from(vendor).context("vendor id above 0xffff")?,
            device: u16::try_from(device).context("device id above 0xffff")?,
        };
        Ok(Self {
            bdf: bdf.to_string(),
            sysfs,
            id,
        })
    }

    /// The name of the driver bound to the function, if any.
    pub fn driver(&self) -> Result<Option<String>> {
        link_name(&self.sysfs.join("driver"))
    }

    /// The IOMMU group the function belongs to, if it has one.
    pub fn iommu_group(&self) -> Result<Option<String>> {
        link_name(&self.sysfs.join("iommu_group"))
    }
}

/// Every PCI function currently bound to `vfio-pci`, in address order.
pub fn bound_to_vfio_pci() -> Result<Vec<String>> {
    let dir = Path::new(SYSFS_PCI_DEVICES);
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("list {}", dir.display()))? {
        let entry = entry?;
        if link_name(&entry.path().join("driver"))?.as_deref() == Some("vfio-pci") {
            found.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    found.sort();
    Ok(found)
}

/// QEMU's `edu` teaching device.
pub const EDU: PciId = PciId {
    vendor: 0x1234,
    device: 0x11e8,
};
/// QEMU's emulated NVMe controller.
pub const QEMU_NVME: PciId = PciId {
    vendor: 0x1b36,
    device: 0x0010,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of the error `r` holds ("" when `r` is Ok). anyhow errors have no variants:
    /// the message is what tells one refusal from another.
    fn err_text<T>(r: Result<T>) -> String {
        r.err().map(|e| format!("{e:#}")).unwrap_or_default()
    }

    #[test]
    fn bdf_without_domain_gets_domain_zero() {
        assert_eq!(canonical_bdf("00:01.0").unwrap(), "0000:00:01.0");
        assert_eq!(canonical_bdf("0000:3B:1F.7").unwrap(), "0000:3b:1f.7");
    }

    #[test]
    fn bdf_with_function_above_7_or_device_above_1f_is_refused() {
        // Function 8 does not fit the 3-bit function number: not an address at all.
        let e = err_text(canonical_bdf("0000:00:01.8"));
        assert!(e.contains("is not a PCI address"), "{e}");
        let e = err_text(canonical_bdf("0000:00:20.0"));
        assert!(e.contains("device number 0x20 is above 0x1f"), "{e}");
    }

    #[test]
    fn bdf_that_could_escape_sysfs_is_refused() {
        for bad in [
            "../../etc",
            "0000:00:01.0/..",
            "0000/00:01.0",
            "",
            "0000:00:01",
        ] {
            let e = err_text(canonical_bdf(bad));
            assert!(e.contains("is not a PCI address"), "{bad}: {e}");
        }
    }

    #[test]
    fn pci_id_parses_hex_pairs_and_refuses_wider_values() {
        let id = PciId::parse("1b36:0010").unwrap();
        assert_eq!((id.vendor, id.device), (0x1b36, 0x0010));
        assert_eq!(id.to_string(), "1b36:0010");
        let e = err_text(PciId::parse("12345:0001"));
        assert!(e.contains("`12345` in `12345:0001` is not a 16-bit"), "{e}");
        let e = err_text(PciId::parse("1234"));
        assert!(e.contains("is not a VENDOR:DEVICE id"), "{e}");
        let e = err_text(PciId::parse("zz:11"));
        assert!(e.contains("`zz` in `zz:11` is not a 16-bit"), "{e}");
    }

    #[test]
    fn sysfs_hex_attributes_parse_with_or_without_prefix() {
        assert_eq!(parse_hex_attr("0x11e8\n").unwrap(), 0x11e8);
        assert_eq!(parse_hex_attr("010802").unwrap(), 0x010802);
        let e = err_text(parse_hex_attr("vfio-pci"));
        assert!(e.contains("is not a hexadecimal number"), "{e}");
    }

    #[test]
    fn device_reads_ids_driver_and_group_from_a_sysfs_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let dev = tmp.path().join("0000:00:01.0");
        fs::create_dir(&dev).unwrap();
        fs::write(dev.join("vendor"), "0x1234\n").unwrap();
        fs::write(dev.join("device"), "0x11e8\n").unwrap();
        std::os::unix::fs::symlink("../../drivers/vfio-pci", dev.join("driver")).unwrap();
        std::os::unix::fs::symlink("../../kernel/iommu_groups/3", dev.join("iommu_group")).unwrap();
        let d = Device::open_in(tmp.path(), "0000:00:01.0").unwrap();
        assert_eq!(d.id.to_string(), "1234:11e8");
        assert_eq!(d.driver().unwrap().as_deref(), Some("vfio-pci"));
        assert_eq!(d.iommu_group().unwrap().as_deref(), Some("3"));
        let e = err_text(Device::open_in(tmp.path(), "0000:00:02.0"));
        assert!(e.contains("no PCI function 0000:00:02.0"), "{e}");
    }
}
