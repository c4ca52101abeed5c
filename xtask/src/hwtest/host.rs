//! Host setup: the tools `hwtest --qemu` runs, installed with apt when they are missing.
//!
//! Everything here is detection first: nothing is installed, updated or configured unless it
//! is missing, and each action is announced. `apt-get update` runs at most once per xtask run,
//! and only when an apt action that needs fresh package lists is about to happen.

use super::step;
use crate::run_cmd;
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The apt source file this task writes when it has to add the backports suite.
const BACKPORTS_SOURCE: &str = "/etc/apt/sources.list.d/vfio-hwtest-backports.sources";
/// Debian's archive key, named by the source file above.
const DEBIAN_KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

/// Finds an executable in `$PATH`, or in the sbin directories a non-root `$PATH` may lack.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Like [`find_tool`], but an error saying which package provides the tool.
pub fn tool(name: &str, package: &str) -> Result<PathBuf> {
    find_tool(name).with_context(|| format!("`{name}` is not installed (Debian package {package})"))
}

/// The effective user id, from `/proc/self/status` (std has no geteuid).
pub fn euid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Runs a command and returns its stdout; fails with its stderr if it fails.
pub fn output(mut cmd: Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{cmd:?}`"))?;
    if !out.status.success() {
        bail!(
            "`{cmd:?}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// apt, driven from Rust. Holds whether the package lists were refreshed in this run.
pub struct Apt {
    updated: bool,
    /// The Debian release of this host (`bookworm`), from /etc/os-release.
    pub codename: String,
}

impl Apt {
    /// Checks that this is an apt-based host; reads its release codename.
    pub fn new() -> Result<Self> {
        let os = fs::read_to_string("/etc/os-release").unwrap_or_default();
        let codename = os
            .lines()
            .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default();
        Ok(Self {
            updated: false,
            codename,
        })
    }

    fn apt_get() -> Result<Command> {
        let mut c = Command::new(tool("apt-get", "apt")?);
        c.env("DEBIAN_FRONTEND", "noninteractive");
        Ok(c)
    }

    fn require_root(why: &str) -> Result<()> {
        if euid() != Some(0) {
            bail!("{why} needs root (apt); run as root or install it by hand");
        }
        Ok(())
    }

    /// `apt-get update`, once per run.
    pub fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        Self::require_root("refreshing the package lists")?;
        let mut c = Self::apt_get()?;
        c.args(["update", "-q"]);
        run_cmd("apt-get update", c)?;
        self.updated = true;
        Ok(())
    }

    /// The backports suite of this release (`bookworm-backports`).
    pub fn backports_suite(&self) -> Result<String> {
        if self.codename.is_empty() {
            bail!("no VERSION_CODENAME in /etc/os-release: cannot name the backports suite");
        }
        Ok(format!("{}-backports", self.codename))
    }

    /// Makes sure apt knows the backports suite: adds a deb822 source on the host's own Debian
    /// mirror if no configured source names it, and refreshes the lists.
    pub fn ensure_backports(&mut self) -> Result<String> {
        let suite = self.backports_suite()?;
        let mut policy = Command::new(tool("apt-cache", "apt")?);
        policy.arg("policy");
        if output(policy)?.contains(&suite) {
            return Ok(suite);
        }
        Self::require_root(&format!("adding the {suite} apt source"))?;
        let mirror = debian_mirror(&self.codename);
        step(&format!(
            "apt knows no {suite} source: adding {BACKPORTS_SOURCE} (mirror {mirror})"
        ));
        let mut text = format!("Types: deb\nURIs: {mirror}\nSuites: {suite}\nComponents: main\n");
        if Path::new(DEBIAN_KEYRING).exists() {
            text.push_str(&format!("Signed-By: {DEBIAN_KEYRING}\n"));
        }
        fs::write(BACKPORTS_SOURCE, text).with_context(|| format!("write {BACKPORTS_SOURCE}"))?;
        self.updated = false;
        self.update()?;
        Ok(suite)
    }

    /// `apt-get install --no-install-recommends [-t suite] pkgs`.
    pub fn install(&mut self, pkgs: &[&str], suite: Option<&str>) -> Result<()> {
        Self::require_root(&format!("installing {}", pkgs.join(" ")))?;
        self.update()?;
        let mut c = Self::apt_get()?;
        c.args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "--no-remove",
        ]);
        if let Some(s) = suite {
            c.args(["-t", s]);
        }
        c.args(pkgs);
        run_cmd(&format!("apt-get install {}", pkgs.join(" ")), c)
    }

    /// `apt-get install -s`: whether apt could install `pkg`, and its explanation if not.
    fn can_install(&mut self, pkg: &str) -> Result<(bool, String)> {
        self.update()?;
        let mut c = Self::apt_get()?;
        c.args(["install", "-s", "-q", "--no-install-recommends", pkg]);
        let out = c
            .output()
            .with_context(|| format!("could not start `{c:?}`"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // apt may "solve" a Breaks by removing the installed package (`Remv` in a dry run):
        // that is the conflict too, and nothing the host has is removed for this task.
        let removes: Vec<&str> = text.lines().filter(|l| l.starts_with("Remv ")).collect();
        Ok((out.status.success() && removes.is_empty(), text))
    }

    /// Installs qemu-system-x86 when `qemu-system-x86_64` is missing.
    ///
    /// Some machine images carry qemu-utils from backports, whose `Breaks: qemu-system-common
    /// (< 1:8.0)` makes the release's own qemu-system-x86 uninstallable beside it: apt either
    /// refuses ("held broken packages") or wants to remove qemu-utils. A dry run detects both;
    /// then qemu-system-x86 comes from backports, matching the installed qemu-utils.
    pub fn ensure_qemu(&mut self) -> Result<PathBuf> {
        if let Some(q) = find_tool("qemu-system-x86_64") {
            return Ok(q);
        }
        step("qemu-system-x86_64 is missing: installing qemu-system-x86");
        let (ok, why) = self.can_install("qemu-system-x86")?;
        if ok {
            self.install(&["qemu-system-x86"], None)?;
        } else {
            let utils = installed_version("qemu-utils").unwrap_or_else(|| "none".into());
            let reasons: Vec<&str> = why
                .lines()
                .filter(|l| {
                    l.starts_with("Remv ")
                        || l.contains("Breaks")
                        || l.contains("Depends")
                        || l.starts_with("E:")
                })
                .collect();
            step(&format!(
                "qemu-system-x86 from {} cannot be installed beside the installed qemu-utils {utils}:\n    {}",
                self.codename,
                reasons.join("\n    ")
            ));
            let suite = self.ensure_backports()?;
            step(&format!("installing qemu-system-x86 from {suite} instead"));
            self.install(&["qemu-system-x86"], Some(&suite))?;
        }
        tool("qemu-system-x86_64", "qemu-system-x86")
    }

    /// Installs the packages of tools that are missing (`(tool, package)` pairs).
    pub fn ensure_tools(&mut self, tools: &[(&str, &str)]) -> Result<()> {
        let mut pkgs: Vec<&str> = tools
            .iter()
            .filter(|(t, _)| find_tool(t).is_none())
            .map(|(_, p)| *p)
            .collect();
        pkgs.dedup();
        if pkgs.is_empty() {
            return Ok(());
        }
        step(&format!(
            "missing host tools: installing {}",
            pkgs.join(" ")
        ));
        self.install(&pkgs, None)
    }

    /// The package `linux-image-amd64` depends on in `suite` (or the default release):
    /// the current ABI package such as `linux-image-6.1.0-41-amd64`.
    pub fn kernel_abi_package(&self, suite: Option<&str>) -> Result<Option<String>> {
        let mut c = Command::new(tool("apt-cache", "apt")?);
        c.arg("depends");
        if let Some(s) = suite {
            c.args(["-t", s]);
        }
        c.arg("linux-image-amd64");
        let out = output(c)?;
        Ok(out.lines().find_map(|l| {
            let dep = l.trim().strip_prefix("Depends:")?.trim();
            dep.starts_with("linux-image-").then(|| dep.to_string())
        }))
    }

    /// `apt-get download pkg` into `dir` (as the newest matching `.deb` there).
    pub fn download(&mut self, pkg: &str, dir: &Path) -> Result<PathBuf> {
        self.update()?;
        fs::create_dir_all(dir)?;
        let mut c = Self::apt_get()?;
        // As root, apt would drop to its `_apt` user, which cannot write into target/.
        if euid() == Some(0) {
            c.args(["-o", "APT::Sandbox::User=root"]);
        }
        c.args(["download", "-q", pkg]).current_dir(dir);
        run_cmd(&format!("apt-get download {pkg}"), c)?;
        newest_deb(dir, pkg)
    }
}

/// The newest `<pkg>_*.deb` in `dir`.
fn newest_deb(dir: &Path, pkg: &str) -> Result<PathBuf> {
    let prefix = format!("{pkg}_");
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            let t = e.metadata()?.modified()?;
            if best.as_ref().is_none_or(|(bt, _)| t > *bt) {
                best = Some((t, e.path()));
            }
        }
    }
    best.map(|(_, p)| p).with_context(|| {
        format!(
            "apt-get download left no {prefix}*.deb in {}",
            dir.display()
        )
    })
}

/// The installed version of a package, if it is installed.
fn installed_version(pkg: &str) -> Option<String> {
    let mut c = Command::new("dpkg-query");
    c.args(["-W", "-f=${Version}", pkg]);
    output(c).ok().filter(|v| !v.is_empty())
}

/// The Debian mirror the host's own sources use for `codename`, or deb.debian.org.
pub fn debian_mirror(codename: &str) -> String {
    // deb822 sources: a stanza whose Suites list the release itself.
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list.d/debian.sources") {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
            };
            let suites = field("Suites:").unwrap_or_default();
            if suites.split_whitespace().any(|s| s == codename) {
                if let Some(uri) =
                    field("URIs:").and_then(|u| u.split_whitespace().next().map(String::from))
                {
                    return uri;
                }
            }
        }
    }
    // One-line sources: `deb [options] URI codename components`.
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        for l in text.lines() {
            // Drop an `[arch=... signed-by=...]` option block, which may hold spaces.
            let l = match (l.find('['), l.find(']')) {
                (Some(a), Some(b)) if a < b => format!("{}{}", &l[..a], &l[b + 1..]),
                _ => l.to_string(),
            };
            let words: Vec<&str> = l.split_whitespace().collect();
            if words.first() == Some(&"deb") && words.get(2) == Some(&codename) {
                if let Some(uri) = words.get(1) {
                    return (*uri).to_string();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_string()
}
