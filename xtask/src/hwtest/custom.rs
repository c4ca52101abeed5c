//! `--kernel custom`: a kernel with iommufd, vfio cdev and no-IOMMU mode, built from Debian's
//! own `linux-source-6.12` (bookworm-backports), with everything the guest needs built in.
//!
//! No Debian kernel package enables `CONFIG_IOMMUFD`, `CONFIG_VFIO_DEVICE_CDEV` or
//! `CONFIG_VFIO_NOIOMMU`, so those backends could not be tested with the stock kernels.
//! The recipe (checked by hand first, see `shared/reference/qemu-vfio-host/custom-kernel.md`):
//! `make tinyconfig`, enable [`OPTIONS`] with `scripts/config`, `make olddefconfig`,
//! `make -j$(nproc) bzImage`. There are no modules: `/init` loads nothing for this kernel.
//!
//! Cache layout (under `target/hwtest/custom/`):
//!
//! ```text
//! source.version                  the linux-source-6.12 version last resolved with apt
//! src-<version>/linux-source-6.12 the unpacked source tree (kept: a config change rebuilds
//!                                 only what it touches)
//! <version>-<config hash>/        boot/vmlinuz-<release> (the bzImage), config, build.log,
//!                                 `.complete` when whole
//! ```
//!
//! The config hash covers the option list and the recipe, so changing either builds again;
//! a second run with the same source version and options only boots.

use super::host::{output, tool, Apt};
use super::initramfs::fnv1a;
use super::kernel::Kernel;
use super::step;
use crate::run_cmd;
use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The `--kernel` value that selects this kernel.
pub const SERIES: &str = "custom";
/// The Debian source package (bookworm-backports).
const SOURCE_PACKAGE: &str = "linux-source-6.12";
/// The tarball inside it.
const SOURCE_TARBALL: &str = "usr/src/linux-source-6.12.tar.xz";
/// The directory the tarball unpacks to.
const SOURCE_DIR: &str = "linux-source-6.12";
/// What building a kernel needs on the host (Debian package names).
pub const BUILD_DEPS: &[&str] = &[
    "build-essential",
    "flex",
    "bison",
    "bc",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
];

/// The options enabled on top of `tinyconfig`, all built in (`scripts/config -e`).
pub const OPTIONS: &[&str] = &[
    // Boot, console, initramfs, the userspace busybox and the test binary need.
    "64BIT",
    "PCI",
    "PCI_MSI",
    "PCIEPORTBUS",
    "PCI_IOV",
    "TTY",
    "SERIAL_8250",
    "SERIAL_8250_CONSOLE",
    "PRINTK",
    "BLK_DEV_INITRD",
    "RD_GZIP",
    "DEVTMPFS",
    "DEVTMPFS_MOUNT",
    "PROC_FS",
    "SYSFS",
    "TMPFS",
    "BINFMT_ELF",
    "BINFMT_SCRIPT",
    "EVENTFD",
    "EPOLL",
    "SIGNALFD",
    "TIMERFD",
    "SHMEM",
    "MEMFD_CREATE",
    "FUTEX",
    "MULTIUSER",
    "POSIX_TIMERS",
    "UNIX98_PTYS",
    "FILE_LOCKING",
    "INOTIFY_USER",
    // /init reports its status through isa-debug-exit by writing to /dev/port.
    "DEVPORT",
    "SMP",
    "HIGH_RES_TIMERS",
    "RTC_CLASS",
    "ACPI",
    "X86_LOCAL_APIC",
    "X86_IO_APIC",
    "HYPERVISOR_GUEST",
    "PARAVIRT",
    // The emulated Intel IOMMU.
    "IOMMU_SUPPORT",
    "INTEL_IOMMU",
    "INTEL_IOMMU_DEFAULT_ON",
    "IRQ_REMAP",
    "X86_X2APIC",
    // VFIO: legacy container + type1, iommufd + cdev, and no-IOMMU mode.
    "VFIO",
    "VFIO_PCI",
    "VFIO_PCI_CORE",
    "VFIO_CONTAINER",
    "VFIO_IOMMU_TYPE1",
    "IOMMUFD",
    "IOMMUFD_DRIVER",
    "VFIO_DEVICE_CDEV",
    "VFIO_NOIOMMU",
    // Mediated devices and the kernel's migratable sample mdev, mtty (two virtual 16550
    // UARTs behind an emulated PCI function; migration v2 with PRE_COPY and the P2P states).
    "SAMPLES",
    "VFIO_MDEV",
    "SAMPLE_VFIO_MDEV_MTTY",
    // QEMU's NVMe controller has a real driver to take it over from.
    "BLOCK",
    "BLK_DEV_NVME",
    "NVME_CORE",
    // The guest-os scenarios: KVM (kvm-amd: `-cpu max` offers svm and npt under TCG) for the
    // reference VMM and the bundled QEMU; AF_UNIX for `serve-fake`'s vfio-user socket; the
    // system calls QEMU uses when it finds them.
    "VIRTUALIZATION",
    "KVM",
    "KVM_AMD",
    "NET",
    "UNIX",
    "AIO",
    "MEMBARRIER",
    "ADVISE_SYSCALLS",
];

/// Options that must come out of `olddefconfig` as `=y`: without them a mode cannot run.
const REQUIRED: &[&str] = &[
    "DEVPORT",
    "PCI_MSI",
    "SERIAL_8250_CONSOLE",
    "BLK_DEV_INITRD",
    "RD_GZIP",
    "DEVTMPFS",
    "EVENTFD",
    "INTEL_IOMMU",
    "IRQ_REMAP",
    "VFIO",
    "VFIO_PCI",
    "VFIO_CONTAINER",
    "VFIO_IOMMU_TYPE1",
    "IOMMUFD",
    "VFIO_DEVICE_CDEV",
    "VFIO_NOIOMMU",
    "VFIO_MDEV",
    "SAMPLE_VFIO_MDEV_MTTY",
    "BLK_DEV_NVME",
    "KVM",
    "KVM_AMD",
    "UNIX",
];

/// The fingerprint of the configuration recipe: the base config, the option list, the step
/// that completes it. Part of the cache key.
pub fn config_hash() -> u64 {
    let mut recipe = String::from("tinyconfig\n");
    for o in OPTIONS {
        recipe.push_str("-e ");
        recipe.push_str(o);
        recipe.push('\n');
    }
    recipe.push_str("olddefconfig\nbzImage\n");
    fnv1a(0xcbf2_9ce4_8422_2325, recipe.as_bytes())
}

/// The cache directory name of a build: `<source version>-<config hash>`.
pub fn build_key(version: &str) -> String {
    format!("{version}-{:016x}", config_hash())
}

/// The release name the rest of hwtest uses (file names of the initramfs and console logs).
fn release_of(version: &str) -> String {
    format!("custom-{version}-{:08x}", config_hash() >> 32)
}

/// Returns the custom kernel, building it first unless a build of the same source version and
/// configuration is cached. `refresh` asks apt for the current source version again.
pub fn ensure_kernel(apt: &mut Apt, cache: &Path, refresh: bool) -> Result<Kernel> {
    let dir = cache.join("custom");
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let version_stamp = dir.join("source.version");
    if !refresh {
        if let Ok(v) = fs::read_to_string(&version_stamp) {
            let version = v.trim().to_string();
            let root = dir.join(build_key(&version));
            if root.join(".complete").exists() {
                let kernel = Kernel {
                    release: release_of(&version),
                    root,
                };
                step(&format!(
                    "kernel custom: cached build of {SOURCE_PACKAGE} {version} ({})",
                    kernel.vmlinuz().display()
                ));
                return Ok(kernel);
            }
        }
    }

    let suite = apt.ensure_backports()?;
    let version = candidate_version(SOURCE_PACKAGE)?.with_context(|| {
        format!("apt has no candidate for {SOURCE_PACKAGE} (is {suite} in the sources?)")
    })?;
    fs::write(&version_stamp, format!("{version}\n"))?;
    let root = dir.join(build_key(&version));
    let kernel = Kernel {
        release: release_of(&version),
        root: root.clone(),
    };
    if root.join(".complete").exists() {
        return Ok(kernel);
    }
    step(&format!(
        "kernel custom: building {SOURCE_PACKAGE} {version} (tinyconfig + {} options, no modules) \
         into {}",
        OPTIONS.len(),
        root.display()
    ));
    ensure_build_deps(apt)?;
    let t0 = Instant::now();
    let src = ensure_source(apt, &dir, &version)?;
    let unpacked = t0.elapsed();

    let tmp = dir.join(format!("{}.partial", build_key(&version)));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(tmp.join("boot"))?;
    let log = tmp.join("build.log");
    configure(&src, &log)?;
    let config = fs::read_to_string(src.join(".config")).context("read the built .config")?;
    check_config(&config)?;
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    step(&format!(
        "kernel custom: make -j{jobs} bzImage (a few minutes on 2 cores; log {})",
        log.display()
    ));
    let t_make = Instant::now();
    let mut make = make_in(&src);
    make.arg(format!("-j{jobs}")).arg("bzImage");
    logged(make, &log, "make bzImage")?;
    let bz = src.join("arch/x86/boot/bzImage");
    fs::copy(&bz, tmp.join(format!("boot/vmlinuz-{}", kernel.release)))
        .with_context(|| format!("copy {}", bz.display()))?;
    fs::write(tmp.join("config"), &config)?;
    let mut kr = make_in(&src);
    kr.arg("-s").arg("kernelrelease");
    let kernelrelease = output(kr).unwrap_or_default().trim().to_string();
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::rename(&tmp, &root)?;
    fs::write(
        root.join(".complete"),
        format!("{SOURCE_PACKAGE} {version}\nuname -r {kernelrelease}\n"),
    )?;
    let size = fs::metadata(kernel.vmlinuz()).map(|m| m.len()).unwrap_or(0);
    step(&format!(
        "kernel custom: {kernelrelease} built: bzImage {} KiB; source unpacked in {:.0} s, \
         make bzImage {:.0} s",
        size / 1024,
        unpacked.as_secs_f64(),
        t_make.elapsed().as_secs_f64()
    ));
    Ok(kernel)
}

/// `apt-cache policy <pkg>`'s `Candidate:` version, if there is one.
fn candidate_version(pkg: &str) -> Result<Option<String>> {
    let mut c = Command::new(tool("apt-cache", "apt")?);
    c.args(["policy", pkg]);
    let out = output(c)?;
    Ok(parse_candidate(&out))
}

/// The `Candidate:` line of `apt-cache policy` output (`None` for `(none)` or no line).
fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(String::from)
}

/// Installs the missing build dependencies ([`BUILD_DEPS`]).
fn ensure_build_deps(apt: &mut Apt) -> Result<()> {
    let missing: Vec<&str> = BUILD_DEPS
        .iter()
        .copied()
        .filter(|p| !is_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "kernel custom: build dependencies missing: installing {}",
        missing.join(" ")
    ));
    apt.install(&missing, None)
}

/// Whether dpkg has `pkg` installed.
fn is_installed(pkg: &str) -> bool {
    let mut c = Command::new("dpkg-query");
    c.args(["-W", "-f=${Status}", pkg]);
    output(c).is_ok_and(|s| s.trim() == "install ok installed")
}

/// The unpacked source tree of `version`: `apt-get download`, `dpkg -x`, untar.
fn ensure_source(apt: &mut Apt, dir: &Path, version: &str) -> Result<PathBuf> {
    let base = dir.join(format!("src-{version}"));
    let src = base.join(SOURCE_DIR);
    if base.join(".complete").exists() && src.join("Makefile").is_file() {
        return Ok(src);
    }
    if base.exists() {
        fs::remove_dir_all(&base)?;
    }
    let debs = dir.join("debs");
    let deb = apt.download(SOURCE_PACKAGE, &debs)?;
    let pkg = base.join("pkg");
    fs::create_dir_all(&pkg)?;
    let mut x = Command::new(tool("dpkg", "dpkg")?);
    x.arg("-x").arg(&deb).arg(&pkg);
    run_cmd(&format!("dpkg -x {SOURCE_PACKAGE}"), x)?;
    let tarball = pkg.join(SOURCE_TARBALL);
    if !tarball.is_file() {
        bail!("{} holds no {SOURCE_TARBALL}", deb.display());
    }
    let mut tar = Command::new(tool("tar", "tar")?);
    tar.arg("-xf").arg(&tarball).arg("-C").arg(&base);
    run_cmd(&format!("untar {SOURCE_TARBALL}"), tar)?;
    if !src.join("Makefile").is_file() {
        bail!("{} did not unpack to {}", tarball.display(), src.display());
    }
    // The tree is the cache; the tarball and the .deb would only take space.
    fs::remove_dir_all(&pkg)?;
    let _ = fs::remove_file(&deb);
    fs::write(base.join(".complete"), format!("{version}\n"))?;
    Ok(src)
}

/// `make -C <src>` with the environment pinned (no stray ARCH/CROSS_COMPILE from the caller).
fn make_in(src: &Path) -> Command {
    let mut c = Command::new("make");
    c.arg("-C")
        .arg(src)
        .env_remove("ARCH")
        .env_remove("CROSS_COMPILE")
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("CARGO_MAKEFLAGS");
    c
}

/// Runs `cmd` with its output appended to `log`; on failure, the error carries the log's end.
fn logged(mut cmd: Command, log: &Path, what: &str) -> Result<()> {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    let err = out.try_clone()?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .status()
        .with_context(|| format!("could not start `{cmd:?}`"))?;
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        bail!(
            "{what} failed ({status}); last lines of {}:\n{}",
            log.display(),
            lines[lines.len().saturating_sub(30)..].join("\n")
        );
    }
    Ok(())
}

/// `make tinyconfig`, `scripts/config -e` each option, `make olddefconfig`.
fn configure(src: &Path, log: &Path) -> Result<()> {
    let mut tiny = make_in(src);
    tiny.arg("tinyconfig");
    logged(tiny, log, "make tinyconfig")?;
    let mut cfg = Command::new(src.join("scripts/config"));
    cfg.current_dir(src).arg("--file").arg(".config");
    for o in OPTIONS {
        cfg.args(["-e", o]);
    }
    logged(cfg, log, "scripts/config")?;
    let mut old = make_in(src);
    old.arg("olddefconfig");
    logged(old, log, "make olddefconfig")
}

/// Checks the resolved `.config`: every [`REQUIRED`] option built in, and no modules.
fn check_config(config: &str) -> Result<()> {
    let on = |o: &str| config.lines().any(|l| l == format!("CONFIG_{o}=y"));
    let missing: Vec<&str> = REQUIRED.iter().copied().filter(|o| !on(o)).collect();
    if !missing.is_empty() {
        bail!(
            "after olddefconfig these options are not built in: {} (a dependency changed in \
             this source version?)",
            missing.join(" ")
        );
    }
    if on("MODULES") {
        bail!("the config enables CONFIG_MODULES, but the guest loads no modules");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidate_is_read_from_apt_cache_policy_and_none_is_no_candidate() {
        let policy = "linux-source-6.12:\n  Installed: (none)\n  Candidate: 6.12.95-1~bpo12+1\n  \
                      Version table:\n";
        assert_eq!(
            parse_candidate(policy).as_deref(),
            Some("6.12.95-1~bpo12+1")
        );
        assert_eq!(
            parse_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(parse_candidate(""), None);
    }

    #[test]
    fn cache_key_names_the_version_and_the_config_hash() {
        let k = build_key("6.12.95-1~bpo12+1");
        assert!(k.starts_with("6.12.95-1~bpo12+1-"), "{k}");
        assert_eq!(k.len(), "6.12.95-1~bpo12+1-".len() + 16);
        assert_ne!(build_key("6.12.96-1"), k);
    }

    #[test]
    fn every_required_option_is_also_enabled() {
        for r in REQUIRED {
            assert!(OPTIONS.contains(r), "{r}");
        }
    }

    #[test]
    fn config_check_wants_every_required_option_built_in_and_no_modules() {
        let full: String = REQUIRED.iter().map(|o| format!("CONFIG_{o}=y\n")).collect();
        check_config(&full).unwrap();
        let as_module = full.replace("CONFIG_VFIO_NOIOMMU=y", "CONFIG_VFIO_NOIOMMU=m");
        let e = check_config(&as_module).unwrap_err().to_string();
        assert!(e.contains("VFIO_NOIOMMU"), "{e}");
        assert!(check_config(&format!("{full}CONFIG_MODULES=y\n")).is_err());
    }
}
