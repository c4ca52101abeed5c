//! The command line: `vfio-reference-vmm --kernel <bzImage> [--initrd <file>]
//! [--cmdline <string>] [--memory <MiB>] [--cpus <n>] [--device <sysfs path|BDF>]...
//! [--user-device <socket path>]... [--host-iommu auto|legacy|iommufd] [-v]`.

use std::path::PathBuf;

use vfio_passthrough::KernelMode;

use crate::error::{Error, Result};

/// Usage text, printed on `--help` and after a command line error.
pub const USAGE: &str =
    "usage: vfio-reference-vmm --kernel <bzImage> [--initrd <file>] [--cmdline <string>] \
[--memory <MiB, default 256>] [--cpus <n, default 1>] [--device <sysfs path|BDF>]... \
[--user-device <socket path>]... [--host-iommu auto|legacy|iommufd] [-v]";

/// Default guest RAM, in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Most vCPUs: the MP table's IOAPIC takes the APIC id after the last CPU, and xAPIC ids
/// are 8 bits.
pub const MAX_CPUS: u8 = 64;
/// Least guest RAM, in MiB: the kernel, its initrd and the boot structures must fit below.
pub const MIN_MEMORY_MIB: u64 = 64;
/// Most guest RAM, in MiB (1 TiB): the 64-bit BAR window sits above it.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// A device to pass through, as given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    /// A host PCI function bound to vfio-pci: its sysfs directory.
    Host(PathBuf),
    /// A vfio-user server's socket.
    User(PathBuf),
}

impl DeviceArg {
    /// How the device is named in the VMM's messages: the host BDF (the sysfs directory's
    /// name) or the socket path.
    pub fn name(&self) -> String {
        match self {
            DeviceArg::Host(p) => p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
            DeviceArg::User(p) => p.display().to_string(),
        }
    }
}

/// What the command line asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The bzImage.
    pub kernel: PathBuf,
    /// The initrd (initramfs), if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// Devices, in the order given: the first is 00:01.0.
    pub devices: Vec<DeviceArg>,
    /// How the host devices reach the kernel: one legacy container or one iommufd IOAS
    /// for all of them; `Auto` lets the first device pick (iommufd where the host offers it).
    pub host_iommu: KernelMode,
    /// Debug messages on stderr.
    pub verbose: bool,
}

/// `--host-iommu`'s value. No-IOMMU is not offered: a guest's DMA addresses are
/// guest-physical, which a device without an IOMMU cannot be made to use.
fn host_iommu_mode(value: &str) -> Result<KernelMode> {
    match value {
        "auto" => Ok(KernelMode::Auto),
        "legacy" => Ok(KernelMode::Legacy),
        "iommufd" => Ok(KernelMode::Iommufd),
        other => Err(Error::Usage(format!(
            "--host-iommu {other:?}: one of auto, legacy, iommufd (no-IOMMU devices cannot DMA into a guest)"
        ))),
    }
}

/// `0000:01:00.0` or `01:00.0` (domain 0 implied) names the sysfs directory of that function;
/// anything else is taken as a path.
pub fn host_device_path(arg: &str) -> PathBuf {
    if is_bdf(arg) {
        let full = if arg.len() == 7 {
            format!("0000:{arg}")
        } else {
            arg.to_owned()
        };
        PathBuf::from("/sys/bus/pci/devices").join(full)
    } else {
        PathBuf::from(arg)
    }
}

fn is_bdf(s: &str) -> bool {
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    let parts: Vec<&str> = s.split(':').collect();
    let (dom_ok, bus, devfn) = match parts.as_slice() {
        [d, b, df] => (hex(d, 4), *b, *df),
        [b, df] => (true, *b, *df),
        _ => return false,
    };
    let Some((dev, func)) = devfn.split_once('.') else {
        return false;
    };
    dom_ok
        && hex(bus, 2)
        && hex(dev, 2)
        && func.len() == 1
        && matches!(func.as_bytes(), [b'0'..=b'7'])
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| Error::Usage(format!("{flag}: not a number: {value:?}")))
}

/// Parses the arguments after the program name. `Ok(None)` means `--help` was asked for.
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Option<Config>> {
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    let mut memory_mib = DEFAULT_MEMORY_MIB;
    let mut cpus: u8 = 1;
    let mut devices = Vec::new();
    let mut host_iommu = KernelMode::Auto;
    let mut verbose = false;
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "-v" | "--verbose" => {
                verbose = true;
                continue;
            }
            _ => {}
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| Error::Usage(format!("{flag} needs a value")))
        };
        match flag.as_str() {
            "--kernel" => kernel = Some(PathBuf::from(value()?)),
            "--initrd" => initrd = Some(PathBuf::from(value()?)),
            "--cmdline" => cmdline = Some(value()?),
            "--memory" => memory_mib = number(&flag, &value()?)?,
            "--cpus" => cpus = number(&flag, &value()?)?,
            "--device" => devices.push(DeviceArg::Host(host_device_path(&value()?))),
            "--user-device" => devices.push(DeviceArg::User(PathBuf::from(value()?))),
            "--host-iommu" => host_iommu = host_iommu_mode(&value()?)?,
            other => return Err(Error::Usage(format!("unknown argument {other:?}"))),
        }
    }
    let kernel = kernel.ok_or_else(|| Error::Usage("--kernel is required".into()))?;
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
        return Err(Error::Usage(format!(
            "--memory {memory_mib}: between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB} MiB"
        )));
    }
    if !(1..=MAX_CPUS).contains(&cpus) {
        return Err(Error::Usage(format!(
            "--cpus {cpus}: between 1 and {MAX_CPUS}"
        )));
    }
    if devices.len() > crate::pci::MAX_DEVICES {
        return Err(Error::Usage(format!(
            "{} devices given: at most {} fit (one GSI block and one IOAPIC pin each)",
            devices.len(),
            crate::pci::MAX_DEVICES
        )));
    }
    Ok(Some(Config {
        kernel,
        initrd,
        cmdline: cmdline.unwrap_or_else(|| "console=ttyS0".to_owned()),
        memory_mib,
        cpus,
        devices,
        host_iommu,
        verbose,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| (*a).to_owned()).collect()
    }

    #[test]
    fn the_documented_command_line_parses_with_devices_in_order() {
        let c = parse(args(&[
            "--kernel",
            "/l2/vmlinuz",
            "--initrd",
            "/l2/initrd.gz",
            "--cmdline",
            "console=ttyS0 reboot=k",
            "--memory",
            "512",
            "--cpus",
            "2",
            "--device",
            "0000:01:00.0",
            "--user-device",
            "/tmp/fake.sock",
            "--device",
            "02:00.0",
            "-v",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from("/l2/vmlinuz"));
        assert_eq!(c.initrd, Some(PathBuf::from("/l2/initrd.gz")));
        assert_eq!(c.cmdline, "console=ttyS0 reboot=k");
        assert_eq!((c.memory_mib, c.cpus, c.verbose), (512, 2, true));
        assert_eq!(
            c.devices,
            vec![
                DeviceArg::Host("/sys/bus/pci/devices/0000:01:00.0".into()),
                DeviceArg::User("/tmp/fake.sock".into()),
                DeviceArg::Host("/sys/bus/pci/devices/0000:02:00.0".into()),
            ]
        );
        assert_eq!(c.devices[0].name(), "0000:01:00.0");
    }

    #[test]
    fn defaults_are_256_mib_and_one_cpu_and_a_sysfs_path_is_kept() {
        let c = parse(args(&[
            "--kernel=k",
            "--device",
            "/sys/bus/pci/devices/0000:00:03.0",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((c.memory_mib, c.cpus), (256, 1));
        assert_eq!(c.host_iommu, KernelMode::Auto);
        assert_eq!(
            c.devices,
            vec![DeviceArg::Host("/sys/bus/pci/devices/0000:00:03.0".into())]
        );
    }

    #[test]
    fn missing_kernel_unknown_flags_and_out_of_range_values_are_usage_errors() {
        for bad in [
            &["--initrd", "x"][..],
            &["--kernel", "k", "--bogus"],
            &["--kernel", "k", "--cpus", "0"],
            &["--kernel", "k", "--cpus", "65"],
            &["--kernel", "k", "--memory", "1"],
            &["--kernel", "k", "--memory"],
            &["--kernel", "k", "--host-iommu", "noiommu"],
            &["--kernel", "k", "--host-iommu"],
        ] {
            assert!(matches!(parse(args(bad)), Err(Error::Usage(_))), "{bad:?}");
        }
        assert_eq!(parse(args(&["--help"])).unwrap(), None);
    }

    #[test]
    fn host_iommu_names_the_kernel_path_of_every_host_device() {
        for (v, mode) in [
            ("auto", KernelMode::Auto),
            ("legacy", KernelMode::Legacy),
            ("iommufd", KernelMode::Iommufd),
        ] {
            let c = parse(args(&["--kernel", "k", "--host-iommu", v]))
                .unwrap()
                .unwrap();
            assert_eq!(c.host_iommu, mode, "{v}");
        }
    }
}
