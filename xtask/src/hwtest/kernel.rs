//! The guest's kernel and busybox: Debian packages fetched with `apt-get download` and unpacked
//! with `dpkg -x` under `target/hwtest/`, never installed on the host.
//!
//! Cache layout (all under `target/hwtest/`):
//!
//! ```text
//! debs/                       downloads in progress (each .deb is deleted once unpacked)
//! kernel-<series>.release     the kernel release chosen for `--kernel <series>` (e.g. 6.1.0-41-amd64)
//! linux-<release>/            that kernel unpacked, with the modules.dep depmod made; `.complete` when whole
//! busybox/bin/busybox         busybox-static unpacked
//! ```

use super::host::{output, tool, Apt};
use super::step;
use crate::run_cmd;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The kernel series `--kernel` accepts, and where each comes from.
pub const SERIES: &[(&str, &str)] = &[
    (
        "6.1",
        "the release's own kernel (bookworm / bookworm-security)",
    ),
    ("6.12", "the backports kernel (bookworm-backports)"),
];

/// A kernel unpacked and ready to boot.
pub struct Kernel {
    /// Its release string (`uname -r`), e.g. `6.1.0-41-amd64`.
    pub release: String,
    /// The unpacked package: `boot/`, `lib/modules/<release>/`.
    pub root: PathBuf,
}

impl Kernel {
    /// The bzImage QEMU boots.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }

    /// The module directory, `lib/modules/<release>`.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// Returns the cached kernel of `series`, fetching and unpacking it first if needed
/// (or if `refresh` asks to resolve the current package again).
pub fn ensure_kernel(apt: &mut Apt, cache: &Path, series: &str, refresh: bool) -> Result<Kernel> {
    if !SERIES.iter().any(|(s, _)| *s == series) {
        let known: Vec<&str> = SERIES.iter().map(|(s, _)| *s).collect();
        bail!("--kernel {series}: expected one of {}", known.join(", "));
    }
    let stamp = cache.join(format!("kernel-{series}.release"));
    if !refresh {
        if let Ok(release) = fs::read_to_string(&stamp) {
            let release = release.trim().to_string();
            let root = cache.join(format!("linux-{release}"));
            if root.join(".complete").exists() {
                return Ok(Kernel { release, root });
            }
        }
    }

    // Resolve the ABI package linux-image-amd64 currently points at. The release's own kernel
    // comes first; the backports one only when the release's is of another series.
    apt.update()?;
    let wanted = |pkg: &str| {
        pkg.strip_prefix("linux-image-")
            .is_some_and(|r| r.starts_with(&format!("{series}.")))
    };
    let mut seen = Vec::new();
    let mut package = None;
    if let Some(p) = apt.kernel_abi_package(None)? {
        if wanted(&p) {
            package = Some(p);
        } else {
            seen.push(p);
        }
    }
    if package.is_none() {
        let suite = apt.ensure_backports()?;
        if let Some(p) = apt.kernel_abi_package(Some(&suite))? {
            if wanted(&p) {
                package = Some(p);
            } else {
                seen.push(format!("{p} ({suite})"));
            }
        }
    }
    let Some(package) = package else {
        bail!(
            "no {series} kernel in apt: linux-image-amd64 depends on {}",
            if seen.is_empty() {
                "nothing".to_string()
            } else {
                seen.join(", ")
            }
        );
    };
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    step(&format!("kernel {series}: {package}"));

    let root = cache.join(format!("linux-{release}"));
    if !root.join(".complete").exists() {
        let deb = apt.download(&package, &cache.join("debs"))?;
        let tmp = cache.join(format!("linux-{release}.partial"));
        unpack(&deb, &tmp)?;
        let kernel = Kernel {
            release: release.clone(),
            root: tmp.clone(),
        };
        if !kernel.vmlinuz().is_file() || !kernel.modules_dir().is_dir() {
            bail!(
                "{} holds no boot/vmlinuz-{release} or lib/modules/{release}",
                deb.display()
            );
        }
        // The .deb ships no modules.dep: its postinst makes it. modprobe needs it.
        let mut c = Command::new(tool("depmod", "kmod")?);
        c.arg("-b").arg(&tmp).arg(&release);
        run_cmd(&format!("depmod {release}"), c)?;
        if root.exists() {
            fs::remove_dir_all(&root)?;
        }
        fs::rename(&tmp, &root)?;
        fs::write(root.join(".complete"), &package)?;
        // The unpacked tree is the cache; the .deb would only double the space.
        let _ = fs::remove_file(&deb);
    }
    fs::write(&stamp, format!("{release}\n"))?;
    Ok(Kernel { release, root })
}

/// Returns the path of a cached static busybox, fetching busybox-static first if needed.
pub fn ensure_busybox(apt: &mut Apt, cache: &Path) -> Result<PathBuf> {
    let dir = cache.join("busybox");
    let bin = dir.join("bin/busybox");
    if bin.is_file() {
        return Ok(bin);
    }
    let deb = apt.download("busybox-static", &cache.join("debs"))?;
    let tmp = cache.join("busybox.partial");
    unpack(&deb, &tmp)?;
    if !tmp.join("bin/busybox").is_file() {
        bail!("{} holds no bin/busybox", deb.display());
    }
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::rename(&tmp, &dir)?;
    let _ = fs::remove_file(&deb);
    Ok(bin)
}

/// `dpkg -x deb dir`, into a fresh `dir`.
fn unpack(deb: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir)?;
    let mut c = Command::new(tool("dpkg", "dpkg")?);
    c.arg("-x").arg(deb).arg(dir);
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    run_cmd(&format!("dpkg -x {name}"), c)
}

/// What the guest must load for one module name.
pub struct ModulePlan {
    /// The module files, relative to the kernel root (`lib/modules/<release>/kernel/...`),
    /// in the order modprobe would insert them.
    pub files: Vec<String>,
    /// Requested modules that are built into the kernel (nothing to load).
    pub builtin: Vec<String>,
}

/// The modules (with their dependencies) that `names` need, from
/// `modprobe -d <root> -S <release> --show-depends`.
pub fn module_plan(kernel: &Kernel, names: &[&str]) -> Result<ModulePlan> {
    let modprobe = tool("modprobe", "kmod")?;
    let prefix = format!("{}/", kernel.root.display());
    let mut plan = ModulePlan {
        files: Vec::new(),
        builtin: Vec::new(),
    };
    for name in names {
        let mut c = Command::new(&modprobe);
        c.arg("-d")
            .arg(&kernel.root)
            .args(["-S", &kernel.release, "--show-depends", name]);
        let out = output(c).with_context(|| format!("module {name} of {}", kernel.release))?;
        for line in out.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("insmod"), Some(path)) => {
                    let rel = path.strip_prefix(&prefix).with_context(|| {
                        format!("modprobe named {path}, outside {}", kernel.root.display())
                    })?;
                    if !plan.files.iter().any(|f| f == rel) {
                        plan.files.push(rel.to_string());
                    }
                }
                (Some("builtin"), Some(m)) if m == *name => plan.builtin.push(m.to_string()),
                _ => {}
            }
        }
    }
    Ok(plan)
}
