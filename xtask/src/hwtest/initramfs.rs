//! The guest's initramfs: busybox, the kernel modules vfio-pci needs, the test binary, the
//! operator CLI (`/vfio-passthrough`, which the test binary's `cli-*` scenarios spawn) and an
//! `/init` script, written as a cpio "newc" archive by hand and compressed with `gzip`.

use super::host::tool;
use super::kernel::{module_plan, Kernel, ModulePlan};
use anyhow::{bail, Context, Result};
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The modules `/init` loads: nvme first (so vfio-pci takes the controller over from a real
/// driver), then the VFIO type1 IOMMU backend and vfio-pci. Their dependencies come along.
pub const GUEST_MODULES: &[&str] = &["nvme", "vfio_iommu_type1", "vfio_pci"];

/// The line `/init` prints with its final status; the host requires it besides QEMU's exit code.
pub const STATUS_PREFIX: &str = "HWTEST-STATUS: ";
/// The prefix of `/init`'s own progress lines.
pub const INIT_PREFIX: &str = "HWTEST-INIT: ";
/// Where the test binary sits in the image (`/init` runs it).
pub const HWTEST_MEMBER: &str = "vfio-hwtest";
/// Where the operator CLI sits: the default `--cli` of `vfio-hwtest` (crates/vfio-hwtest/src/cli.rs).
pub const CLI_MEMBER: &str = "vfio-passthrough";

// ---------------------------------------------------------------------------------------------
// cpio newc

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// A cpio "newc" (SVR4, no CRC) archive under construction, in memory.
///
/// Each member: the 6-byte magic `070701`, thirteen 8-digit hex fields (inode, mode, uid, gid,
/// nlink, mtime, file size, dev major/minor, rdev major/minor, name size including its NUL,
/// check = 0), the name and its NUL padded to a multiple of 4, then the data padded likewise.
/// The archive ends with a member named `TRAILER!!!`. Owners are root, mtimes 0.
pub struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
    dirs: Vec<String>,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            next_ino: 1,
            dirs: Vec::new(),
        }
    }

    fn pad4(&mut self) {
        while self.buf.len() & 3 != 0 {
            self.buf.push(0);
        }
    }

    fn member(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<()> {
        let size = u32::try_from(data.len()).context("cpio newc members are limited to 4 GiB")?;
        let namesize = u32::try_from(name.len() + 1).context("name too long")?;
        let ino = if name == "TRAILER!!!" {
            0
        } else {
            self.next_ino
        };
        self.next_ino += 1;
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
        Ok(())
    }

    /// Adds a directory and any missing parents (`a/b/c` adds `a`, `a/b`, `a/b/c`).
    pub fn dir(&mut self, path: &str) -> Result<()> {
        let mut sofar = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !sofar.is_empty() {
                sofar.push('/');
            }
            sofar.push_str(part);
            if !self.dirs.contains(&sofar) {
                self.dirs.push(sofar.clone());
                let name = sofar.clone();
                self.member(&name, S_IFDIR | 0o755, 2, (0, 0), &[])?;
            }
        }
        Ok(())
    }

    /// Adds a regular file (its parent directories first).
    pub fn file(&mut self, path: &str, perm: u32, data: &[u8]) -> Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.member(path, S_IFREG | perm, 1, (0, 0), data)
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, path: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent)?;
        }
        self.member(path, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Result<Vec<u8>> {
        self.member("TRAILER!!!", 0, 1, (0, 0), &[])?;
        Ok(self.buf)
    }
}

// ---------------------------------------------------------------------------------------------
// /init

/// What `/init` does: which modules to load, which functions to bind, what to run.
pub struct InitPlan<'a> {
    /// Modules to `modprobe`, in order (built-in ones left out).
    pub modprobe: Vec<&'a str>,
    /// `vendor:device` IDs (hex, no `0x`) of the functions to bind to vfio-pci.
    pub bind_ids: &'a [&'a str],
    /// Arguments for `/vfio-hwtest` after the `--device` ones (already checked to be plain words).
    pub hwtest_args: Vec<String>,
}

/// The text of `/init`, a busybox `sh` script.
pub fn init_script(plan: &InitPlan<'_>) -> String {
    let patterns: Vec<String> = plan
        .bind_ids
        .iter()
        .map(|id| {
            let (v, d) = id.split_once(':').unwrap_or((id, ""));
            format!("0x{v}:0x{d}")
        })
        .collect();
    let modules = plan.modprobe.join(" ");
    let case = if patterns.is_empty() {
        "none".to_string()
    } else {
        patterns.join("|")
    };
    let args = plan.hwtest_args.join(" ");
    let nvme_wait = if plan.modprobe.contains(&"nvme") {
        "# Let nvme claim its controller first (at most 3 s), so vfio-pci takes it over from a driver.
n=0
while [ $n -lt 30 ] && ! ls /sys/bus/pci/drivers/nvme 2>/dev/null | grep -q :; do
  sleep 0.1; n=$((n + 1))
done
"
    } else {
        ""
    };
    format!(
        r#"#!/bin/busybox sh
# /init of the `cargo xtask hwtest --qemu` guest. Generated by xtask/src/hwtest/initramfs.rs.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() {{ echo "{INIT_PREFIX}$*"; }}
uptime_s() {{ cut -d' ' -f1 /proc/uptime; }}
say "kernel $(uname -r), userspace after $(uptime_s) s"
STATUS=0
# `hwtest.mode=<legacy|iommufd|noiommu>` on the kernel command line picks the VFIO path;
# `hwtest.only=<substring>` narrows the scenarios (`vfio-hwtest --only`).
MODE=
ONLY=
for w in $(cat /proc/cmdline); do
  case "$w" in
    hwtest.mode=*) MODE=${{w#hwtest.mode=}} ;;
    hwtest.only=*) ONLY=${{w#hwtest.only=}} ;;
  esac
done
MODEARGS=
[ -n "$MODE" ] && MODEARGS="--mode $MODE"
[ -n "$ONLY" ] && MODEARGS="$MODEARGS --only $ONLY"

for m in {modules}; do
  modprobe "$m" || {{ say "modprobe $m failed"; STATUS=1; }}
done
{nvme_wait}
DEVICES=
for dev in /sys/bus/pci/devices/*; do
  id="$(cat "$dev/vendor"):$(cat "$dev/device")"
  case "$id" in {case}) ;; *) continue ;; esac
  bdf=${{dev##*/}}
  was=none; [ -e "$dev/driver" ] && was=$(basename "$(readlink "$dev/driver")")
  echo vfio-pci > "$dev/driver_override"
  [ -e "$dev/driver" ] && echo "$bdf" > "$dev/driver/unbind"
  echo "$bdf" > /sys/bus/pci/drivers_probe
  group=none; [ -e "$dev/iommu_group" ] && group=$(basename "$(readlink "$dev/iommu_group")")
  # devtmpfs creates /dev/vfio/<group> (no-IOMMU: noiommu-<group>) and the cdev
  # /dev/vfio/devices/vfioN shortly after the bind, not at once: wait up to 5 s.
  n=0
  while [ "$group" != none ] && [ ! -e "/dev/vfio/$group" ] && [ ! -e "/dev/vfio/noiommu-$group" ] \
      && [ $n -lt 50 ]; do
    sleep 0.1; n=$((n + 1))
  done
  # A no-IOMMU device is listed in vfio-dev/ too, but has no cdev (no `dev` attribute).
  cdev=none
  for c in "$dev"/vfio-dev/vfio*; do [ -e "$c/dev" ] && cdev=${{c##*/}}; done
  while [ "$cdev" != none ] && [ ! -e "/dev/vfio/devices/$cdev" ] && [ $n -lt 50 ]; do
    sleep 0.1; n=$((n + 1))
  done
  now=none; [ -e "$dev/driver" ] && now=$(basename "$(readlink "$dev/driver")")
  node=missing
  for p in "/dev/vfio/$group" "/dev/vfio/noiommu-$group"; do [ -e "$p" ] && node=$p; done
  say "$bdf [$id] driver $was -> $now, iommu group $group, node $node, cdev $cdev"
  DEVICES="$DEVICES --device $bdf"
done

say "running vfio-hwtest (mode ${{MODE:-default}}) at $(uptime_s) s"
/{HWTEST_MEMBER} $MODEARGS $DEVICES --cli /{CLI_MEMBER} {args}
rc=$?
say "vfio-hwtest exited $rc at $(uptime_s) s"
[ $rc = 0 ] || STATUS=1
echo "{STATUS_PREFIX}$STATUS"
# isa-debug-exit (port 0xf4): QEMU exits with (value << 1) | 1, so 1 = pass, 3 = fail.
if [ $STATUS = 0 ]; then printf '\000'; else printf '\001'; fi |
  dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
poweroff -f
"#
    )
}

// ---------------------------------------------------------------------------------------------
// The image

/// Inputs of one initramfs build.
pub struct Inputs<'a> {
    /// The unpacked kernel whose modules go in.
    pub kernel: &'a Kernel,
    /// The static busybox.
    pub busybox: &'a Path,
    /// The static test binary.
    pub hwtest: &'a Path,
    /// The static operator CLI (`vfio-passthrough`).
    pub cli: &'a Path,
    /// IDs to bind to vfio-pci.
    pub bind_ids: &'a [&'a str],
    /// Extra arguments for the test binary.
    pub hwtest_args: Vec<String>,
    /// The modules `/init` loads (with their dependencies): [`GUEST_MODULES`] for hwtest.
    pub modules: &'a [&'a str],
    /// Further files for the image, as (path in the image, contents), such as the interop
    /// run's `inspect --json` predictions.
    pub files: &'a [(String, Vec<u8>)],
    /// Further files copied from the host (the guest-os scenarios' L2 assets and bundled
    /// QEMU); fingerprinted by path, size and mtime, not read unless the image is rebuilt.
    pub members: &'a [Member],
}

/// A host file that goes into the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its path in the image (relative, no leading `/`).
    pub path: String,
    /// The host file (symlinks followed).
    pub source: PathBuf,
    /// Its permission bits.
    pub mode: u32,
}

/// A 64-bit FNV-1a hash: a stable fingerprint (std's hasher may change between toolchains).
pub(super) fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// A fingerprint line for a file: path, size and modification time.
fn file_stamp(path: &Path) -> Result<String> {
    let m = fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let mtime = m
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(format!("{} {} {mtime}\n", path.display(), m.len()))
}

/// Builds `<cache>/initramfs-<release>.cpio.gz` unless an image of the same inputs is there.
/// Returns its path and whether it was (re)built.
pub fn ensure_initramfs(cache: &Path, inp: &Inputs<'_>) -> Result<(PathBuf, bool)> {
    let k = inp.kernel;
    let image = cache.join(format!("initramfs-{}.cpio.gz", k.release));
    let stamp_path = cache.join(format!("initramfs-{}.inputs", k.release));

    // A kernel without a module tree (`--kernel custom`) has everything built in.
    let plan = if k.modules_dir().is_dir() {
        module_plan(k, inp.modules)?
    } else {
        ModulePlan {
            files: Vec::new(),
            builtin: inp.modules.iter().map(|m| m.to_string()).collect(),
        }
    };
    let init = init_script(&InitPlan {
        modprobe: inp
            .modules
            .iter()
            .copied()
            .filter(|m| !plan.builtin.iter().any(|b| b == m))
            .collect(),
        bind_ids: inp.bind_ids,
        hwtest_args: inp.hwtest_args.clone(),
    });
    let module_files: Vec<PathBuf> = plan.files.iter().map(|f| k.root.join(f)).collect();
    let stamp = inputs_stamp(&init, inp, &module_files)?;
    if image.is_file() && fs::read_to_string(&stamp_path).ok().as_deref() == Some(stamp.as_str()) {
        return Ok((image, false));
    }

    let mut cpio = base_archive(
        &init,
        &read(inp.busybox)?,
        &read(inp.hwtest)?,
        &read(inp.cli)?,
    )?;
    for (path, data) in inp.files {
        cpio.file(path, 0o644, data)?;
    }
    for m in inp.members {
        cpio.file(&m.path, m.mode, &read(&m.source)?)?;
    }
    add_modules(&mut cpio, k, &plan)?;
    write_image(cpio, &image, &stamp_path, &stamp)
}

/// Adds the modules of `plan` and a modules.dep that names only them (busybox modprobe reads
/// the text form; dependencies of an included module are included, so no line points outside).
pub fn add_modules(cpio: &mut Cpio, k: &Kernel, plan: &ModulePlan) -> Result<()> {
    let mod_root = format!("lib/modules/{}/", k.release);
    let mut rel_names = Vec::new();
    for f in &plan.files {
        cpio.file(f, 0o644, &read(&k.root.join(f))?)?;
        rel_names.push(f.strip_prefix(&mod_root).unwrap_or(f).to_string());
    }
    if plan.files.is_empty() {
        return Ok(());
    }
    let dep = read_text(&k.modules_dir().join("modules.dep"))?;
    let kept: String = dep
        .lines()
        .filter(|l| {
            l.split_once(':')
                .is_some_and(|(m, _)| rel_names.iter().any(|r| r == m))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.lines().count() != rel_names.len() {
        bail!("modules.dep of {} lacks some of {rel_names:?}", k.release);
    }
    cpio.file(&format!("{mod_root}modules.dep"), 0o644, kept.as_bytes())?;
    for extra in ["modules.builtin", "modules.order"] {
        let p = k.modules_dir().join(extra);
        if p.is_file() {
            cpio.file(&format!("{mod_root}{extra}"), 0o644, &read(&p)?)?;
        }
    }
    Ok(())
}

/// The fingerprint of an image's inputs: the `/init` text, then path, size and mtime of
/// busybox, the test binary, the CLI and each module file. An image whose recorded stamp
/// differs is rebuilt.
fn inputs_stamp(init: &str, inp: &Inputs<'_>, module_files: &[PathBuf]) -> Result<String> {
    let mut stamp = format!(
        "init {:016x}\n",
        fnv1a(0xcbf2_9ce4_8422_2325, init.as_bytes())
    );
    for f in [inp.busybox, inp.hwtest, inp.cli] {
        stamp.push_str(&file_stamp(f)?);
    }
    for f in module_files {
        stamp.push_str(&file_stamp(f)?);
    }
    for m in inp.members {
        stamp.push_str(&format!("member {} {:o} ", m.path, m.mode));
        stamp.push_str(&file_stamp(&m.source)?);
    }
    for (path, data) in inp.files {
        stamp.push_str(&format!(
            "file {path} {} {:016x}\n",
            data.len(),
            fnv1a(0xcbf2_9ce4_8422_2325, data)
        ));
    }
    Ok(stamp)
}

/// The fingerprint of an image made of `init` and host files: the `/init` text's hash, then
/// path, size and mtime of each file.
pub fn inputs_file_stamp(init: &str, files: &[PathBuf]) -> Result<String> {
    let mut stamp = format!(
        "init {:016x}\n",
        fnv1a(0xcbf2_9ce4_8422_2325, init.as_bytes())
    );
    for f in files {
        stamp.push_str(&file_stamp(f)?);
    }
    Ok(stamp)
}

/// The archive without modules: the directories, `/dev/console`, `/init`, busybox, the test
/// binary and the CLI.
fn base_archive(init: &str, busybox: &[u8], hwtest: &[u8], cli: &[u8]) -> Result<Cpio> {
    let mut cpio = Cpio::new();
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "root",
    ] {
        cpio.dir(d)?;
    }
    // The kernel opens /dev/console before /init runs (devtmpfs is not mounted yet).
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.file("init", 0o755, init.as_bytes())?;
    cpio.file("bin/busybox", 0o755, busybox)?;
    cpio.file(HWTEST_MEMBER, 0o755, hwtest)?;
    cpio.file(CLI_MEMBER, 0o755, cli)?;
    Ok(cpio)
}

/// Ends the archive, compresses it into `image` and records the inputs' stamp.
fn write_image(
    cpio: Cpio,
    image: &Path,
    stamp_path: &Path,
    stamp: &str,
) -> Result<(PathBuf, bool)> {
    let archive = cpio.finish()?;
    let tmp = image.with_extension("gz.partial");
    gzip(&archive, &tmp)?;
    fs::rename(&tmp, image)?;
    fs::write(stamp_path, stamp)?;
    Ok((image.to_path_buf(), true))
}

fn read(p: &Path) -> Result<Vec<u8>> {
    fs::read(p).with_context(|| format!("read {}", p.display()))
}

fn read_text(p: &Path) -> Result<String> {
    fs::read_to_string(p).with_context(|| format!("read {}", p.display()))
}

/// `gzip -1 -n` of `data` into the file `out`.
pub fn gzip(data: &[u8], out: &Path) -> Result<()> {
    let file = File::create(out).with_context(|| format!("create {}", out.display()))?;
    let mut child = Command::new(tool("gzip", "gzip")?)
        .args(["-1", "-n", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::from(file))
        .spawn()
        .context("could not start gzip")?;
    // gzip writes to a file, not back to us, so feeding it all here cannot deadlock.
    child
        .stdin
        .take()
        .context("gzip has no stdin")?
        .write_all(data)
        .context("feed gzip")?;
    let status = child.wait()?;
    if !status.success() {
        bail!("gzip failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits a newc archive into (name, mode, rdev major, rdev minor, data) members.
    fn parse(mut b: &[u8]) -> Vec<(String, u32, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let total = b.len();
        loop {
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_end = 110 + namesize as usize;
            let name = std::str::from_utf8(&b[110..name_end - 1])
                .unwrap()
                .to_string();
            assert_eq!(b[name_end - 1], 0, "name is NUL terminated");
            let data_start = name_end.next_multiple_of(4);
            let data_end = data_start + size as usize;
            let data = b[data_start..data_end].to_vec();
            let next = data_end.next_multiple_of(4);
            assert_eq!((total - b.len() + next) % 4, 0);
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty(), "nothing after the trailer");
                return out;
            }
            out.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn newc_archive_holds_parents_before_children_and_ends_with_trailer() {
        let mut c = Cpio::new();
        c.file("lib/modules/x/a.ko", 0o644, b"hello").unwrap();
        c.char_dev("dev/console", 0o600, 5, 1).unwrap();
        c.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        let members = parse(&c.finish().unwrap());
        let names: Vec<&str> = members.iter().map(|m| m.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "lib",
                "lib/modules",
                "lib/modules/x",
                "lib/modules/x/a.ko",
                "dev",
                "dev/console",
                "init"
            ]
        );
        assert_eq!(members[0].1, S_IFDIR | 0o755);
        assert_eq!(members[3].1, S_IFREG | 0o644);
        assert_eq!(members[3].4, b"hello");
        assert_eq!(
            (members[5].1, members[5].2, members[5].3),
            (S_IFCHR | 0o600, 5, 1)
        );
        assert_eq!(members[6].4, b"#!/bin/sh\n");
    }

    #[test]
    fn directories_are_added_once() {
        let mut c = Cpio::new();
        c.file("bin/a", 0o755, b"1").unwrap();
        c.file("bin/b", 0o755, b"22").unwrap();
        c.dir("bin").unwrap();
        let names: Vec<String> = parse(&c.finish().unwrap())
            .into_iter()
            .map(|m| m.0)
            .collect();
        assert_eq!(names, ["bin", "bin/a", "bin/b"]);
    }

    #[test]
    fn init_binds_the_requested_ids_and_reports_status_via_debug_exit() {
        let s = init_script(&InitPlan {
            modprobe: vec!["nvme", "vfio_pci"],
            bind_ids: &["1234:11e8", "1b36:0010"],
            hwtest_args: vec!["--require".into(), "1234:11e8".into()],
        });
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        assert!(s.contains("for m in nvme vfio_pci; do"));
        assert!(s.contains("case \"$id\" in 0x1234:0x11e8|0x1b36:0x0010)"));
        assert!(s.contains(
            "/vfio-hwtest $MODEARGS $DEVICES --cli /vfio-passthrough --require 1234:11e8"
        ));
        assert!(s.contains("hwtest.mode=*) MODE=${w#hwtest.mode=}"));
        assert!(s.contains("/dev/vfio/noiommu-$group"));
        assert!(s.contains("echo \"HWTEST-STATUS: $STATUS\""));
        assert!(s.contains("seek=244"), "0xf4 = 244");
    }

    #[test]
    fn image_holds_init_busybox_the_test_binary_and_the_cli_all_executable() {
        let members = parse(
            &base_archive("#!/bin/busybox sh\n", b"BB", b"HWTEST", b"CLI")
                .unwrap()
                .finish()
                .unwrap(),
        );
        let get = |name: &str| {
            members
                .iter()
                .find(|m| m.0 == name)
                .unwrap_or_else(|| panic!("no member {name}"))
        };
        for (name, data) in [
            ("init", &b"#!/bin/busybox sh\n"[..]),
            ("bin/busybox", b"BB"),
            ("vfio-hwtest", b"HWTEST"),
            ("vfio-passthrough", b"CLI"),
        ] {
            let m = get(name);
            assert_eq!(m.1, S_IFREG | 0o755, "{name}");
            assert_eq!(m.4, data, "{name}");
        }
        assert_eq!((get("dev/console").2, get("dev/console").3), (5, 1));
        // `/init` runs the test binary and points it at the CLI where the image has it.
        let init = init_script(&InitPlan {
            modprobe: vec![],
            bind_ids: &[],
            hwtest_args: vec![],
        });
        assert!(init.contains(&format!("/{HWTEST_MEMBER} ")));
        assert!(init.contains(&format!("--cli /{CLI_MEMBER}")));
    }

    #[test]
    fn a_changed_cli_binary_changes_the_inputs_stamp() {
        let tmp = std::env::temp_dir().join(format!("xtask-stamp-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        let (bb, hw, cli) = (tmp.join("busybox"), tmp.join("hwtest"), tmp.join("cli"));
        for f in [&bb, &hw, &cli] {
            fs::write(f, b"1").unwrap();
        }
        let kernel = Kernel {
            release: "test".into(),
            root: tmp.clone(),
        };
        let inp = Inputs {
            kernel: &kernel,
            busybox: &bb,
            hwtest: &hw,
            cli: &cli,
            bind_ids: &[],
            hwtest_args: Vec::new(),
            modules: GUEST_MODULES,
            files: &[],
            members: &[],
        };
        let before = inputs_stamp("init", &inp, &[]).unwrap();
        assert!(before.contains(&cli.display().to_string()));
        assert_eq!(before, inputs_stamp("init", &inp, &[]).unwrap());
        fs::write(&cli, b"a longer binary").unwrap();
        assert_ne!(before, inputs_stamp("init", &inp, &[]).unwrap());
        // A missing CLI is an error, not an image without it.
        fs::remove_file(&cli).unwrap();
        assert!(inputs_stamp("init", &inp, &[]).is_err());
        let _ = fs::remove_dir_all(&tmp);
    }

    #[test]
    fn init_waits_for_nvme_only_when_it_loads_nvme_and_passes_hwtest_only_on() {
        let with = init_script(&InitPlan {
            modprobe: vec!["nvme", "vfio_pci"],
            bind_ids: &[],
            hwtest_args: vec![],
        });
        let without = init_script(&InitPlan {
            modprobe: vec!["vfio_iommu_type1", "vfio_pci"],
            bind_ids: &["1234:0f4e"],
            hwtest_args: vec!["--interop".into(), "/interop".into()],
        });
        assert!(with.contains("/sys/bus/pci/drivers/nvme"));
        assert!(!without.contains("/sys/bus/pci/drivers/nvme"));
        for s in [&with, &without] {
            assert!(s.contains("hwtest.only=*) ONLY=${w#hwtest.only=}"));
            assert!(s.contains("MODEARGS=\"$MODEARGS --only $ONLY\""));
        }
        assert!(without.contains("--cli /vfio-passthrough --interop /interop"));
    }

    #[test]
    fn extra_files_are_in_the_image_and_in_the_inputs_stamp() {
        let tmp = std::env::temp_dir().join(format!("xtask-files-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        let bin = tmp.join("bin");
        fs::write(&bin, b"1").unwrap();
        let kernel = Kernel {
            release: "test".into(),
            root: tmp.clone(),
        };
        let a = [("interop/edu.json".to_string(), b"{\"a\":1}".to_vec())];
        let b = [("interop/edu.json".to_string(), b"{\"a\":2}".to_vec())];
        let inp = |files| Inputs {
            kernel: &kernel,
            busybox: &bin,
            hwtest: &bin,
            cli: &bin,
            bind_ids: &[],
            hwtest_args: Vec::new(),
            modules: &[],
            files,
            members: &[],
        };
        let sa = inputs_stamp("init", &inp(&a), &[]).unwrap();
        assert!(sa.contains("interop/edu.json"));
        assert_ne!(sa, inputs_stamp("init", &inp(&b), &[]).unwrap());
        // A kernel without a module tree: the image is written with the file in it.
        let (image, rebuilt) = ensure_initramfs(&tmp, &inp(&a)).unwrap();
        assert!(rebuilt);
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(&image)
            .output()
            .unwrap();
        let members = parse(&out.stdout);
        let f = members.iter().find(|m| m.0 == "interop/edu.json").unwrap();
        assert_eq!(f.4, b"{\"a\":1}");
        assert!(
            !ensure_initramfs(&tmp, &inp(&a)).unwrap().1,
            "same inputs: reused"
        );
        let _ = fs::remove_dir_all(&tmp);
    }

    #[test]
    fn host_file_members_go_in_with_their_mode_and_a_changed_one_rebuilds_the_image() {
        let tmp = std::env::temp_dir().join(format!("xtask-members-{}", std::process::id()));
        fs::create_dir_all(&tmp).unwrap();
        let bin = tmp.join("bin");
        fs::write(&bin, b"1").unwrap();
        let qemu = tmp.join("qemu");
        fs::write(&qemu, b"QEMU").unwrap();
        let kernel = Kernel {
            release: "test".into(),
            root: tmp.clone(),
        };
        let members = [Member {
            path: "usr/bin/qemu-system-x86_64".into(),
            source: qemu.clone(),
            mode: 0o755,
        }];
        let inp = Inputs {
            kernel: &kernel,
            busybox: &bin,
            hwtest: &bin,
            cli: &bin,
            bind_ids: &[],
            hwtest_args: Vec::new(),
            modules: &[],
            files: &[],
            members: &members,
        };
        let (image, rebuilt) = ensure_initramfs(&tmp, &inp).unwrap();
        assert!(rebuilt);
        let out = Command::new("gzip")
            .arg("-dc")
            .arg(&image)
            .output()
            .unwrap();
        let m = parse(&out.stdout)
            .into_iter()
            .find(|m| m.0 == "usr/bin/qemu-system-x86_64")
            .unwrap();
        assert_eq!((m.1, m.4.as_slice()), (S_IFREG | 0o755, &b"QEMU"[..]));
        assert!(
            !ensure_initramfs(&tmp, &inp).unwrap().1,
            "same inputs: reused"
        );
        fs::write(&qemu, b"QEMU 2").unwrap();
        assert!(
            ensure_initramfs(&tmp, &inp).unwrap().1,
            "a changed member: rebuilt"
        );
        let _ = fs::remove_dir_all(&tmp);
    }

    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        // Published FNV-1a 64 test vectors: "" and "a".
        assert_eq!(fnv1a(0xcbf2_9ce4_8422_2325, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(0xcbf2_9ce4_8422_2325, b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
