//! What sysfs says about a VFIO device: a PCI function bound to `vfio-pci`
//! or a mediated device (mdev, `/sys/bus/mdev/devices/<uuid>`): its name,
//! its IOMMU group, whether that group is a no-IOMMU one, and its vfio cdev.
//!
//! An mdev has both, like a PCI function: its `iommu_group` link (a group
//! of its own, which type1 tracks as an emulated IOMMU group) and, with
//! `CONFIG_VFIO_DEVICE_CDEV`, `vfio-dev/vfioN`; `VFIO_GROUP_GET_DEVICE_FD`
//! names it by its UUID.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The name the kernel gives the fake IOMMU group of a no-IOMMU device
/// (`/sys/kernel/iommu_groups/N/name`).
const NOIOMMU_GROUP_NAME: &str = "vfio-noiommu";

/// Where the kernel lists mediated devices.
pub(crate) const MDEV_DEVICES: &str = "/sys/bus/mdev/devices";

/// Whether `s` is a UUID in the form the kernel names mdevs by
/// (`8-4-4-4-12` hex digits).
pub(crate) fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The sysfs path of a device given by path or by a bare mdev UUID
/// (`/sys/bus/mdev/devices/<uuid>`); anything else is taken as a path.
pub(crate) fn device_path(path: &Path) -> PathBuf {
    match path.to_str() {
        Some(s) if is_uuid(s) => Path::new(MDEV_DEVICES).join(s),
        _ => path.to_path_buf(),
    }
}

/// A device found in sysfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SysfsDevice {
    /// The sysfs path we were given.
    pub path: PathBuf,
    /// The device name (for PCI the address, `0000:00:01.0`): the last
    /// component of the path, and what `VFIO_GROUP_GET_DEVICE_FD` expects.
    pub name: String,
    /// The IOMMU group number.
    pub group_id: u32,
    /// The group is a no-IOMMU group (`/dev/vfio/noiommu-N`).
    pub noiommu: bool,
}

fn not_available(path: &Path, source: io::Error) -> Error {
    Error::NotAvailable {
        path: path.display().to_string(),
        source,
    }
}

/// Reads the device's name and IOMMU group from its sysfs directory
/// (`/sys/bus/pci/devices/<address>` or `/sys/bus/mdev/devices/<uuid>`).
pub(crate) fn probe(path: &Path) -> Result<SysfsDevice> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} does not name a device (expected /sys/bus/pci/devices/<address> or \
                 /sys/bus/mdev/devices/<uuid>)",
                path.display()
            ))
        })?
        .to_string();
    fs::metadata(path).map_err(|e| not_available(path, e))?;
    let link = path.join("iommu_group");
    let target = fs::read_link(&link).map_err(|e| {
        not_available(
            &link,
            io::Error::new(
                e.kind(),
                format!(
                    "{e}: the device has no IOMMU group (enable the IOMMU, e.g. intel_iommu=on, \
                     or for no-IOMMU mode load vfio with enable_unsafe_noiommu_mode=1 and bind \
                     the device to vfio-pci)"
                ),
            ),
        )
    })?;
    let group_id = target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{} points to {}, which is not an IOMMU group number",
                link.display(),
                target.display()
            ))
        })?;
    // The kernel names emulated groups (an mdev's) "vfio-noiommu" too; they
    // are not no-IOMMU groups (/dev/vfio/N, isolated by the vendor driver).
    // An mdev is known by its mdev_type link.
    let is_mdev = fs::symlink_metadata(path.join("mdev_type")).is_ok();
    let noiommu = !is_mdev
        && fs::read_to_string(link.join("name"))
            .map(|n| n.trim() == NOIOMMU_GROUP_NAME)
            .unwrap_or(false);
    Ok(SysfsDevice {
        path: path.to_path_buf(),
        name,
        group_id,
        noiommu,
    })
}

/// The name of the device's vfio cdev (`vfioN`, under `/dev/vfio/devices/`),
/// read from `<sysfs path>/vfio-dev/`.
#[cfg(feature = "iommufd")]
pub(crate) fn vfio_cdev_name(path: &Path) -> Result<String> {
    let dir = path.join("vfio-dev");
    let entries = fs::read_dir(&dir).map_err(|e| {
        not_available(
            &dir,
            io::Error::new(
                e.kind(),
                format!(
                    "{e}: no vfio cdev (the kernel needs CONFIG_VFIO_DEVICE_CDEV and the device \
                     must be bound to vfio-pci)"
                ),
            ),
        )
    })?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("read {}", dir.display()), e))?;
        if let Some(name) = entry.file_name().to_str() {
            let is_cdev = name
                .strip_prefix("vfio")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if is_cdev {
                found.push(name.to_string());
            }
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(not_available(
            &dir,
            io::Error::new(io::ErrorKind::NotFound, "no vfioN entry"),
        )),
        many => Err(Error::InvalidArgument(format!(
            "{} lists several vfio cdevs: {}",
            dir.display(),
            many.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: `devices/<name>` with `iommu_group` linking to
    /// `groups/<id>`, whose `name` file holds `group_name` when given.
    fn fake_device(root: &Path, name: &str, group: &str, group_name: Option<&str>) -> PathBuf {
        let group_dir = root.join("groups").join(group);
        fs::create_dir_all(&group_dir).unwrap();
        if let Some(n) = group_name {
            fs::write(group_dir.join("name"), format!("{n}\n")).unwrap();
        }
        let dev = root.join("devices").join(name);
        fs::create_dir_all(&dev).unwrap();
        std::os::unix::fs::symlink(&group_dir, dev.join("iommu_group")).unwrap();
        dev
    }

    #[test]
    fn probe_reads_the_group_number_from_the_iommu_group_link() {
        let root = tempfile::tempdir().unwrap();
        let dev = fake_device(root.path(), "0000:00:04.0", "42", None);
        let d = probe(&dev).unwrap();
        assert_eq!(d.name, "0000:00:04.0");
        assert_eq!(d.group_id, 42);
        assert!(!d.noiommu);
    }

    #[test]
    fn a_bare_mdev_uuid_names_its_sysfs_directory_and_other_names_stay_paths() {
        let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
        assert!(is_uuid(uuid));
        assert_eq!(
            device_path(Path::new(uuid)),
            Path::new("/sys/bus/mdev/devices/83b8f4f2-509f-382f-3c1e-e6bfe0fa1001")
        );
        for not in [
            "0000:00:04.0",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa100",
            "83b8f4f2-509f-382f-3c1e-e6bfe0fa100g",
            "83b8f4f2509f382f3c1ee6bfe0fa1001",
        ] {
            assert!(!is_uuid(not), "{not}");
            assert_eq!(device_path(Path::new(not)), Path::new(not));
        }
        let full = Path::new("/sys/bus/mdev/devices").join(uuid);
        assert_eq!(device_path(&full), full);
    }

    #[test]
    fn probe_of_an_mdev_reads_its_own_emulated_group_and_names_it_by_uuid() {
        // /sys/bus/mdev/devices/<uuid> links to the parent's directory; the
        // mdev has an iommu_group of its own.
        let root = tempfile::tempdir().unwrap();
        let uuid = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001";
        // The kernel gives an mdev's emulated group the no-IOMMU group name.
        let real = fake_device(root.path(), uuid, "7", Some("vfio-noiommu"));
        fs::create_dir_all(root.path().join("types/mtty-1")).unwrap();
        std::os::unix::fs::symlink(root.path().join("types/mtty-1"), real.join("mdev_type"))
            .unwrap();
        let bus = root.path().join("bus");
        fs::create_dir_all(&bus).unwrap();
        std::os::unix::fs::symlink(&real, bus.join(uuid)).unwrap();
        let d = probe(&bus.join(uuid)).unwrap();
        assert_eq!(d.name, uuid);
        assert_eq!(d.group_id, 7);
        assert!(!d.noiommu);
    }

    #[test]
    fn probe_recognises_a_no_iommu_group_by_its_name() {
        let root = tempfile::tempdir().unwrap();
        let dev = fake_device(root.path(), "0000:00:05.0", "3", Some("vfio-noiommu"));
        assert!(probe(&dev).unwrap().noiommu);
    }

    #[test]
    fn probe_of_a_missing_device_is_not_available_and_names_the_path() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("devices/0000:ff:1f.7");
        let e = probe(&path).unwrap_err();
        assert!(matches!(e, Error::NotAvailable { .. }), "{e}");
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert!(e.to_string().contains("0000:ff:1f.7"), "{e}");
    }

    #[test]
    fn probe_of_a_device_without_iommu_group_hints_at_the_iommu() {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("0000:00:06.0");
        fs::create_dir_all(&dev).unwrap();
        let e = probe(&dev).unwrap_err();
        assert!(matches!(e, Error::NotAvailable { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("iommu_group"), "{msg}");
        assert!(msg.contains("no IOMMU group"), "{msg}");
    }

    #[test]
    fn probe_refuses_a_group_link_that_is_not_a_number() {
        let root = tempfile::tempdir().unwrap();
        let dev = fake_device(root.path(), "0000:00:07.0", "bogus", None);
        assert!(matches!(probe(&dev), Err(Error::InvalidArgument(_))));
    }

    #[cfg(feature = "iommufd")]
    #[test]
    fn vfio_cdev_name_is_the_single_vfio_n_entry_of_vfio_dev() {
        let root = tempfile::tempdir().unwrap();
        let dev = root.path().join("0000:00:04.0");
        fs::create_dir_all(dev.join("vfio-dev/vfio3")).unwrap();
        assert_eq!(vfio_cdev_name(&dev).unwrap(), "vfio3");
        fs::create_dir_all(dev.join("vfio-dev/vfio4")).unwrap();
        assert!(matches!(
            vfio_cdev_name(&dev),
            Err(Error::InvalidArgument(_))
        ));
        let bare = root.path().join("0000:00:05.0");
        fs::create_dir_all(&bare).unwrap();
        assert!(matches!(
            vfio_cdev_name(&bare),
            Err(Error::NotAvailable { .. })
        ));
    }
}
