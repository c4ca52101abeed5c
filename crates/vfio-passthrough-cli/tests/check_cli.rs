//! `vfio-passthrough check` against fake sysfs/dev/proc trees built in a tempdir, one test per
//! verdict. The binary runs with `--root <tempdir>` and explicit page size, memlock limit and
//! VMM uid, so the results do not depend on the machine running the tests.

// Test helpers outside #[test] functions may fail loudly too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BDF: &str = "0000:01:00.0";

/// Config space of a type-0 function with PM at 0x40, PCIe at 0x50 and (optionally) MSI-X at 0x70.
struct Cfg {
    flr: bool,
    no_soft_reset: bool,
    /// (vectors, table BIR, table offset, PBA BIR, PBA offset)
    msix: Option<(u16, u32, u32, u32, u32)>,
}

impl Cfg {
    fn bytes(&self) -> Vec<u8> {
        let mut c = vec![0u8; 256];
        c[0..2].copy_from_slice(&0x8086u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x10d3u16.to_le_bytes());
        c[0x06] = 0x10; // status: capability list
        c[0x0b] = 0x02; // class: network
        c[0x34] = 0x40;
        // PM: id 1, next 0x50; PMCSR bit 3 No_Soft_Reset.
        c[0x40] = 0x01;
        c[0x41] = 0x50;
        c[0x42..0x44].copy_from_slice(&0x0003u16.to_le_bytes());
        if self.no_soft_reset {
            c[0x44] = 0x08;
        }
        // PCIe: id 0x10, next MSI-X or end; Device Capabilities bit 28 FLR.
        c[0x50] = 0x10;
        c[0x51] = if self.msix.is_some() { 0x70 } else { 0 };
        c[0x52..0x54].copy_from_slice(&0x0002u16.to_le_bytes());
        let devcap: u32 = if self.flr { 1 << 28 } else { 0 };
        c[0x54..0x58].copy_from_slice(&devcap.to_le_bytes());
        if let Some((n, tbir, toff, pbir, poff)) = self.msix {
            c[0x70] = 0x11;
            c[0x71] = 0;
            c[0x72..0x74].copy_from_slice(&(n - 1).to_le_bytes());
            c[0x74..0x78].copy_from_slice(&(toff | tbir).to_le_bytes());
            c[0x78..0x7c].copy_from_slice(&(poff | pbir).to_le_bytes());
        }
        c
    }
}

impl Default for Cfg {
    fn default() -> Self {
        Cfg {
            flr: true,
            no_soft_reset: true,
            msix: Some((4, 3, 0, 3, 0x800)),
        }
    }
}

const MEM32: u64 = 0x0004_0200;
const MEM64_PREF: u64 = 0x0014_220c;
const ROM: u64 = 0x0004_6200;

fn resource_text(entries: &[(usize, u64, u64, u64)]) -> String {
    let mut lines = vec![(0u64, 0u64, 0u64); 13];
    for &(i, start, size, flags) in entries {
        lines[i] = (start, start + size - 1, flags);
    }
    lines
        .iter()
        .map(|(s, e, f)| format!("0x{s:016x} 0x{e:016x} 0x{f:016x}\n"))
        .collect()
}

fn default_resources() -> Vec<(usize, u64, u64, u64)> {
    vec![
        (0, 0xfe00_0000, 0x2_0000, MEM32),
        (3, 0x40_0000_0000, 0x4000, MEM64_PREF),
        (6, 0xfe10_0000, 0x1_0000, ROM),
    ]
}

struct Dev {
    bdf: &'static str,
    class: &'static str,
    driver: Option<&'static str>,
    group: Option<u32>,
    config: Vec<u8>,
    resources: Vec<(usize, u64, u64, u64)>,
    reset_method: Option<&'static str>,
}

impl Default for Dev {
    fn default() -> Self {
        Dev {
            bdf: BDF,
            class: "0x020000",
            driver: Some("vfio-pci"),
            group: Some(7),
            config: Cfg::default().bytes(),
            resources: default_resources(),
            reset_method: Some("flr bus"),
        }
    }
}

/// A fake host root: IOMMU on, vfio loaded, /dev nodes 0666.
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    fn new() -> Self {
        let f = Fake {
            dir: tempfile::tempdir().unwrap(),
        };
        f.mkdir("sys/class/iommu/dmar0");
        f.mkdir("sys/bus/pci/drivers/vfio-pci");
        f.mkdir("sys/kernel/iommu_groups");
        f.write(
            "proc/cmdline",
            "BOOT_IMAGE=/vmlinuz root=/dev/sda1 intel_iommu=on iommu=pt\n",
        );
        f.write(
            "sys/module/vfio/parameters/enable_unsafe_noiommu_mode",
            "N\n",
        );
        f.node("dev/vfio/vfio", 0o666);
        f
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    fn mkdir(&self, rel: &str) {
        fs::create_dir_all(self.p(rel)).unwrap();
    }

    fn write(&self, rel: &str, data: impl AsRef<[u8]>) {
        let p = self.p(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    fn remove(&self, rel: &str) {
        let p = self.p(rel);
        if p.is_dir() {
            fs::remove_dir_all(p).unwrap();
        } else {
            fs::remove_file(p).unwrap();
        }
    }

    /// A stand-in for a character device node: a regular file with the given mode.
    fn node(&self, rel: &str, mode: u32) {
        self.write(rel, "");
        fs::set_permissions(self.p(rel), fs::Permissions::from_mode(mode)).unwrap();
    }

    fn link(&self, rel: &str, target: &str) {
        let p = self.p(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        symlink(target, p).unwrap();
    }

    fn add(&self, d: Dev) {
        let dir = format!("sys/bus/pci/devices/{}", d.bdf);
        self.mkdir(&dir);
        self.write(&format!("{dir}/vendor"), "0x8086\n");
        self.write(&format!("{dir}/device"), "0x10d3\n");
        self.write(&format!("{dir}/class"), format!("{}\n", d.class));
        self.write(&format!("{dir}/config"), &d.config);
        self.write(&format!("{dir}/resource"), resource_text(&d.resources));
        if let Some(m) = d.reset_method {
            self.write(&format!("{dir}/reset_method"), format!("{m}\n"));
        }
        if let Some(drv) = d.driver {
            self.mkdir(&format!("sys/bus/pci/drivers/{drv}"));
            self.link(&format!("{dir}/driver"), &format!("../../drivers/{drv}"));
        }
        if let Some(g) = d.group {
            self.link(
                &format!("{dir}/iommu_group"),
                &format!("../../../../kernel/iommu_groups/{g}"),
            );
            self.link(
                &format!("sys/kernel/iommu_groups/{g}/devices/{}", d.bdf),
                &format!("../../../../bus/pci/devices/{}", d.bdf),
            );
            if d.driver == Some("vfio-pci") && !self.p(&format!("dev/vfio/{g}")).exists() {
                self.node(&format!("dev/vfio/{g}"), 0o666);
            }
        }
    }

    /// Runs the binary with a deterministic host: 4 KiB pages, unlimited memlock, and a VMM
    /// uid/gid that owns none of the fake nodes (so only mode bits grant access). Options in
    /// `args` take the place of these defaults.
    fn run(&self, args: &[&str]) -> Run {
        let meta = fs::metadata(self.p("dev/vfio/vfio")).unwrap();
        let uid = (meta.uid() + 1).max(1000).to_string();
        let gid = (meta.gid() + 1).max(1000).to_string();
        let root = self.root().display().to_string();
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        for (flag, value) in [
            ("--root", root.as_str()),
            ("--page-size", "4K"),
            ("--memlock-limit", "unlimited"),
            ("--vmm-uid", uid.as_str()),
            ("--vmm-gid", gid.as_str()),
        ] {
            if !args.contains(&flag) {
                all.push(flag.into());
                all.push(value.into());
            }
        }
        run_bin(&all)
    }

    fn check(&self, extra: &[&str]) -> Run {
        let mut a = vec!["check", BDF];
        a.extend_from_slice(extra);
        self.run(&a)
    }
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The report line of item `name` (`[tag] name  detail`) and its fix line, if any.
    fn item(&self, name: &str) -> (String, Option<String>) {
        let lines: Vec<&str> = self.stdout.lines().collect();
        let pos = lines
            .iter()
            .position(|l| l.len() > 7 && l[7..].starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no item {name:?} in:\n{}", self.stdout));
        let fix = lines
            .get(pos + 1)
            .filter(|l| l.trim_start().starts_with("fix:"))
            .map(|l| l.trim().to_string());
        (lines[pos].to_string(), fix)
    }

    fn tag(&self, name: &str) -> String {
        self.item(name).0[..6].to_string()
    }
}

/// Runs the binary with a time limit: a hang (e.g. an endless capability walk) fails the test.
fn run_bin(args: &[String]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vfio-passthrough"));
    cmd.args(args);
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(20) {
            child.kill().unwrap();
            panic!("vfio-passthrough {args:?} did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn ready_host() -> Fake {
    let f = Fake::new();
    f.add(Dev::default());
    f
}

#[test]
fn ready_device_has_every_item_ok_and_exits_zero() {
    let f = ready_host();
    let r = f.check(&["--guest-memory", "4G"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    let items: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with('[')).collect();
    assert!(items.len() >= 10, "{}", r.stdout);
    // Every item is ok but migration, which asks the device through VFIO and so is skipped
    // on a copied tree.
    for l in items.iter().filter(|l| !l.contains("migration")) {
        assert!(l.starts_with("[ ok ]"), "not ok: {l}\n{}", r.stdout);
    }
    assert!(!r.stdout.contains("fix:"), "{}", r.stdout);
    assert!(r.stdout.contains("ready for passthrough"));
    assert!(r.item("BAR0").0.contains("128 KiB"));
    assert!(r.item("BAR3").0.contains("64-bit prefetchable"));
    assert!(r.item("ROM").0.contains("64 KiB"));
}

#[test]
fn migration_is_skipped_off_the_live_host_and_reported_in_json() {
    let f = ready_host();
    let r = f.check(&[]);
    let (line, fix) = r.item("migration");
    assert!(
        line.starts_with("[skip]") && line.contains("--root"),
        "{line}"
    );
    assert!(fix.is_none());
    let v: serde_json::Value = serde_json::from_str(&f.check(&["--json"]).stdout).unwrap();
    let m = &v["migration"];
    assert_eq!(m["checked"], false, "{m}");
    assert_eq!(m["can_migrate"], false, "{m}");
    assert!(m["detail"].as_str().unwrap().contains("--root"), "{m}");
    assert_eq!(v["ready"], true);
}

#[test]
fn iommu_off_is_a_problem_with_a_firmware_fix() {
    let f = ready_host();
    f.remove("sys/class/iommu/dmar0");
    let r = f.check(&[]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert_eq!(r.tag("IOMMU"), "[FAIL]");
    let fix = r.item("IOMMU").1.unwrap();
    assert!(fix.contains("firmware"), "{fix}");
    assert!(r.stdout.contains("NOT ready"));
}

#[test]
fn iommu_disabled_on_the_command_line_says_which_word_to_remove() {
    let f = ready_host();
    f.remove("sys/class/iommu/dmar0");
    f.write("proc/cmdline", "root=/dev/sda1 intel_iommu=off\n");
    let r = f.check(&[]);
    assert_eq!(r.tag("IOMMU"), "[FAIL]");
    assert!(r
        .item("IOMMU")
        .1
        .unwrap()
        .contains("remove `intel_iommu=off`"));
}

#[test]
fn group_member_on_a_host_driver_makes_the_group_not_viable() {
    let f = ready_host();
    f.add(Dev {
        bdf: "0000:01:00.1",
        driver: Some("e1000e"),
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let (line, fix) = r.item("IOMMU group");
    assert!(line.starts_with("[FAIL]"), "{line}");
    assert!(line.contains("0000:01:00.1 is bound to e1000e"), "{line}");
    let fix = fix.unwrap();
    assert!(fix.contains("unbind 0000:01:00.1"), "{fix}");
    assert!(fix.contains("vfio-pci"), "{fix}");
}

#[test]
fn group_member_on_vfio_pci_or_no_driver_keeps_the_group_viable() {
    let f = ready_host();
    f.add(Dev {
        bdf: "0000:01:00.1",
        driver: None,
        ..Dev::default()
    });
    f.add(Dev {
        bdf: "0000:01:00.2",
        driver: Some("pci-stub"),
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let line = r.item("IOMMU group").0;
    assert!(
        line.starts_with("[ ok ]") && line.contains("3 device(s)"),
        "{line}"
    );
}

#[test]
fn bridge_in_the_group_is_ignored_whatever_its_driver() {
    let f = ready_host();
    f.add(Dev {
        bdf: "0000:00:1c.0",
        class: "0x060400",
        driver: Some("shpchp"),
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let line = r.item("IOMMU group").0;
    assert!(line.starts_with("[ ok ]"), "{line}");
    assert!(line.contains("bridges ignored: 0000:00:1c.0"), "{line}");
}

#[test]
fn device_on_another_driver_gets_the_driver_override_fix() {
    let f = Fake::new();
    f.add(Dev {
        driver: Some("e1000e"),
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.code, 1);
    let (line, fix) = r.item("driver");
    assert!(
        line.starts_with("[FAIL]") && line.contains("e1000e"),
        "{line}"
    );
    let fix = fix.unwrap();
    assert!(
        fix.contains(&format!(
            "echo vfio-pci > /sys/bus/pci/devices/{BDF}/driver_override"
        )),
        "{fix}"
    );
    assert!(
        fix.contains(&format!("/sys/bus/pci/devices/{BDF}/driver/unbind")),
        "{fix}"
    );
    // Not bound to vfio-pci: no /dev/vfio/7, so no access mode either.
    assert_eq!(r.tag("access modes"), "[FAIL]");
}

#[test]
fn unbound_device_without_vfio_pci_loaded_is_told_to_modprobe() {
    let f = Fake::new();
    f.add(Dev {
        driver: None,
        ..Dev::default()
    });
    f.remove("sys/bus/pci/drivers/vfio-pci");
    let r = f.check(&[]);
    let fix = r.item("driver").1.unwrap();
    assert!(fix.starts_with("fix: modprobe vfio-pci && "), "{fix}");
}

#[test]
fn empty_reset_method_is_a_warning_not_a_failure() {
    let f = Fake::new();
    f.add(Dev {
        reset_method: Some(""),
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.tag("reset"), "[warn]");
    assert!(r.item("reset").1.is_some());
}

#[test]
fn without_reset_method_file_flr_and_pm_come_from_config_space() {
    let f = Fake::new();
    f.add(Dev {
        reset_method: None,
        config: Cfg {
            flr: true,
            no_soft_reset: false,
            ..Cfg::default()
        }
        .bytes(),
        ..Dev::default()
    });
    let r = f.check(&[]);
    let line = r.item("reset").0;
    assert!(
        line.starts_with("[ ok ]") && line.contains("flr") && line.contains("pm"),
        "{line}"
    );

    let f = Fake::new();
    f.add(Dev {
        reset_method: None,
        config: Cfg {
            flr: false,
            no_soft_reset: true,
            ..Cfg::default()
        }
        .bytes(),
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.tag("reset"), "[warn]", "{}", r.stdout);
    assert_eq!(r.code, 0);
}

fn msix_in_shared_bar() -> Fake {
    let f = Fake::new();
    f.add(Dev {
        config: Cfg {
            msix: Some((16, 0, 0x2000, 0, 0x3000)),
            ..Cfg::default()
        }
        .bytes(),
        resources: vec![(0, 0xfe00_0000, 0x1_0000, MEM32)],
        ..Dev::default()
    });
    f
}

#[test]
fn msix_table_sharing_a_64k_page_with_other_registers_is_a_warning() {
    let f = msix_in_shared_bar();
    let r = f.check(&["--page-size", "64K"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let (line, fix) = r.item("MSI-X");
    assert!(
        line.starts_with("[warn]") && line.contains("64 KiB"),
        "{line}"
    );
    assert!(line.contains("0x0..0x2000, 0x4000..0x10000"), "{line}");
    assert!(fix.is_some());
}

#[test]
fn same_msix_layout_on_4k_pages_is_fine() {
    let f = msix_in_shared_bar();
    let r = f.check(&[]);
    assert_eq!(r.tag("MSI-X"), "[ ok ]", "{}", r.stdout);
}

#[test]
fn msix_table_past_the_end_of_its_bar_is_a_problem() {
    let f = Fake::new();
    f.add(Dev {
        config: Cfg {
            msix: Some((64, 0, 0x1_ff00, 0, 0x1000)),
            ..Cfg::default()
        }
        .bytes(),
        ..Dev::default()
    });
    let r = f.check(&[]);
    let line = r.item("MSI-X").0;
    assert!(
        line.starts_with("[FAIL]") && line.contains("past the end of BAR0"),
        "{line}"
    );
}

#[test]
fn msix_naming_a_reserved_bar_is_a_problem_with_a_fix() {
    for (tbir, pbir) in [(6, 3), (3, 7)] {
        let f = Fake::new();
        f.add(Dev {
            config: Cfg {
                msix: Some((4, tbir, 0, pbir, 0x800)),
                ..Cfg::default()
            }
            .bytes(),
            ..Dev::default()
        });
        let r = f.check(&[]);
        assert_eq!(r.code, 1, "{}", r.stdout);
        let (line, fix) = r.item("MSI-X");
        assert!(
            line.starts_with("[FAIL]")
                && line.contains("at 0x70")
                && line.contains("reserved BAR indicator"),
            "{line}"
        );
        let fix = fix.unwrap();
        assert!(fix.contains("reserved BAR") && !fix.contains('\n'), "{fix}");
        let v: serde_json::Value = serde_json::from_str(&f.check(&["--json"]).stdout).unwrap();
        let items = v["items"].as_array().unwrap();
        let item = items.iter().find(|i| i["name"] == "MSI-X").unwrap();
        assert_eq!(item["verdict"], "problem");
        assert!(item["detail"]
            .as_str()
            .unwrap()
            .contains("reserved BAR indicator"));
        assert!(item["fix"].as_str().unwrap().contains("MSI or INTx"));
    }
}

#[test]
fn bar32_larger_than_the_32bit_window_is_a_problem() {
    let f = Fake::new();
    f.add(Dev {
        resources: vec![(0, 0x8000_0000, 0x8000_0000, MEM32)],
        config: Cfg {
            msix: None,
            ..Cfg::default()
        }
        .bytes(),
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let (line, fix) = r.item("BAR0");
    assert!(
        line.starts_with("[FAIL]") && line.contains("2 GiB") && line.contains("1004 MiB"),
        "{line}"
    );
    assert!(fix.unwrap().contains("32-bit"));
    // A VMM with a 3 GiB window below 4 GiB can take it.
    let r = f.check(&["--mmio32-size", "3G"]);
    assert_eq!(r.tag("BAR0"), "[ ok ]", "{}", r.stdout);
}

#[test]
fn bar64_beyond_the_64bit_window_is_a_warning() {
    let f = Fake::new();
    f.add(Dev {
        resources: vec![
            (0, 0xfe00_0000, 0x2_0000, MEM32),
            (2, 0x100_0000_0000, 128 << 30, MEM64_PREF),
        ],
        config: Cfg {
            msix: None,
            ..Cfg::default()
        }
        .bytes(),
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let (line, fix) = r.item("BAR2");
    assert!(
        line.starts_with("[warn]") && line.contains("128 GiB"),
        "{line}"
    );
    assert!(fix.unwrap().contains("at least 128 GiB"));
}

#[test]
fn unassigned_bar_is_a_problem_with_realloc_fix() {
    let f = Fake::new();
    f.add(Dev {
        resources: vec![(0, 0, 0x100_0000, MEM32 | 0x2000_0000)],
        config: Cfg {
            msix: None,
            ..Cfg::default()
        }
        .bytes(),
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.tag("BAR0"), "[FAIL]");
    assert!(r.item("BAR0").1.unwrap().contains("pci=realloc"));
}

#[test]
fn memlock_below_guest_memory_is_a_problem_with_the_ulimit_fix() {
    let f = ready_host();
    let r = f.check(&["--guest-memory", "4G", "--memlock-limit", "64M"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let (line, fix) = r.item("memlock");
    assert!(
        line.starts_with("[FAIL]") && line.contains("64 MiB") && line.contains("4 GiB"),
        "{line}"
    );
    assert!(fix.unwrap().contains("ulimit -l 4194304"));
}

#[test]
fn memlock_without_guest_memory_is_skipped() {
    let f = ready_host();
    let r = f.check(&["--memlock-limit", "64M"]);
    assert_eq!(r.code, 0);
    assert_eq!(r.tag("memlock"), "[skip]");
}

#[test]
fn group_node_the_vmm_user_cannot_open_is_a_problem() {
    let f = ready_host();
    fs::set_permissions(f.p("dev/vfio/7"), fs::Permissions::from_mode(0o600)).unwrap();
    let r = f.check(&[]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let (line, fix) = r.item("device nodes");
    assert!(
        line.starts_with("[FAIL]") && line.contains("/dev/vfio/7 (mode 600"),
        "{line}"
    );
    assert!(fix.unwrap().contains("/dev/vfio/7"));
}

#[test]
fn cdev_mode_is_reported_when_iommufd_and_the_vfio_cdev_exist() {
    let f = ready_host();
    f.write(
        &format!("sys/bus/pci/devices/{BDF}/vfio-dev/vfio0/dev"),
        "511:0\n",
    );
    f.node("dev/vfio/devices/vfio0", 0o666);
    f.node("dev/iommu", 0o666);
    let r = f.check(&[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let line = r.item("access modes").0;
    assert!(
        line.contains("iommufd + vfio cdev: yes (/dev/iommu + /dev/vfio/devices/vfio0)"),
        "{line}"
    );
    assert!(line.contains("legacy group/container: yes"), "{line}");
    // Only the cdev path usable: still ready.
    fs::set_permissions(f.p("dev/vfio/7"), fs::Permissions::from_mode(0o600)).unwrap();
    let r = f.check(&[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert!(r.item("device nodes").0.contains("cdev: /dev/iommu"));
}

#[test]
fn cdev_without_dev_iommu_is_reported_missing() {
    let f = ready_host();
    f.write(
        &format!("sys/bus/pci/devices/{BDF}/vfio-dev/vfio0/dev"),
        "511:0\n",
    );
    f.node("dev/vfio/devices/vfio0", 0o666);
    let r = f.check(&[]);
    assert!(r
        .item("access modes")
        .0
        .contains("iommufd + vfio cdev: no (missing /dev/iommu)"));
}

/// A host without an IOMMU, vfio's unsafe no-IOMMU mode on, the device in no-IOMMU group 0.
fn noiommu_host() -> Fake {
    let f = Fake::new();
    f.remove("sys/class/iommu/dmar0");
    f.write(
        "sys/module/vfio/parameters/enable_unsafe_noiommu_mode",
        "Y\n",
    );
    f.add(Dev {
        group: Some(0),
        ..Dev::default()
    });
    f.remove("dev/vfio/0");
    f.write("sys/kernel/iommu_groups/0/name", "vfio-noiommu\n");
    f.node("dev/vfio/noiommu-0", 0o666);
    f
}

#[test]
fn noiommu_mode_is_reported_with_the_isolation_warning() {
    let f = noiommu_host();
    let r = f.check(&[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    assert_eq!(r.tag("IOMMU"), "[warn]");
    let (line, fix) = r.item("access modes");
    assert!(line.starts_with("[warn]"), "{line}");
    assert!(
        line.contains("no-IOMMU: yes (/dev/vfio/vfio + /dev/vfio/noiommu-0"),
        "{line}"
    );
    assert!(line.contains("legacy group/container: no"), "{line}");
    assert!(line.contains("gives up DMA isolation"), "{line}");
    assert!(fix.unwrap().contains("trusted"));
}

/// Seen on a real 6.12 kernel (cargo xtask hwtest --kernel custom, no-IOMMU boot): a no-IOMMU
/// device is listed in `vfio-dev/vfioN` too, but without a `dev` attribute, and no
/// `/dev/vfio/devices/vfioN` ever appears. That is no cdev, not a missing node.
#[test]
fn vfio_dev_entry_without_a_device_number_is_no_cdev_not_a_missing_node() {
    let f = noiommu_host();
    f.mkdir(&format!("sys/bus/pci/devices/{BDF}/vfio-dev/vfio0"));
    f.node("dev/iommu", 0o666);
    let r = f.check(&["--json"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let cdev = &v["modes"]["cdev"];
    assert_eq!(cdev["available"], false);
    assert_eq!(cdev["nodes"], serde_json::json!([]));
    let detail = cdev["detail"].as_str().unwrap();
    assert!(
        detail.contains("vfio-dev/vfio0 has no device number")
            && detail.contains("no cdev (a no-IOMMU device)"),
        "{detail}"
    );
    assert!(!detail.contains("missing"), "{detail}");
    // Only no-IOMMU nodes are judged for permissions.
    let nodes = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "device nodes")
        .unwrap()["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!nodes.contains("/dev/iommu"), "{nodes}");
    // With a device number, the same entry is a cdev whose node is missing.
    f.write(
        &format!("sys/bus/pci/devices/{BDF}/vfio-dev/vfio0/dev"),
        "511:0\n",
    );
    let r = f.check(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        v["modes"]["cdev"]["detail"],
        "missing /dev/vfio/devices/vfio0"
    );
}

#[test]
fn nonexistent_bdf_exits_2_naming_the_missing_path() {
    let f = ready_host();
    let r = f.run(&["check", "0000:09:00.0"]);
    assert_eq!(r.code, 2);
    let missing = f.p("sys/bus/pci/devices/0000:09:00.0");
    assert!(
        r.stderr.contains(&missing.display().to_string()),
        "{}",
        r.stderr
    );
    assert!(
        r.stderr.contains("no PCI device 0000:09:00.0"),
        "{}",
        r.stderr
    );
}

#[test]
fn malformed_bdf_exits_2_with_the_expected_format() {
    let f = ready_host();
    let r = f.run(&["check", "eth0"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("DDDD:BB:DD.F"), "{}", r.stderr);
}

#[test]
fn capability_loop_is_a_warning_and_does_not_hang() {
    let mut cfg = Cfg::default().bytes();
    cfg[0x51] = 0x40; // PCIe's next points back at PM: a loop
    let f = Fake::new();
    f.add(Dev {
        config: cfg,
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    let line = r.item("config space").0;
    assert!(
        line.starts_with("[warn]") && line.contains("loops back to offset 0x40"),
        "{line}"
    );
    assert_eq!(r.tag("MSI-X"), "[skip]");
}

#[test]
fn unprivileged_64_byte_config_read_asks_for_root() {
    let cfg = Cfg::default().bytes();
    let f = Fake::new();
    f.add(Dev {
        config: cfg[..64].to_vec(),
        reset_method: None,
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.tag("config space"), "[warn]");
    assert!(r.item("config space").1.unwrap().contains("root"));
    assert_eq!(r.tag("reset"), "[skip]");
}

#[test]
fn bridge_function_itself_is_refused() {
    let mut cfg = Cfg::default().bytes();
    cfg[0x0e] = 0x01;
    let f = Fake::new();
    f.add(Dev {
        config: cfg,
        ..Dev::default()
    });
    let r = f.check(&[]);
    assert_eq!(r.tag("config space"), "[FAIL]");
}

#[test]
fn json_output_parses_and_matches_the_exit_status() {
    let f = ready_host();
    f.remove("sys/class/iommu/dmar0");
    let r = f.check(&["--json"]);
    assert_eq!(r.code, 1);
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["device"], BDF);
    assert_eq!(v["ready"], false);
    let items = v["items"].as_array().unwrap();
    let iommu = items.iter().find(|i| i["name"] == "IOMMU").unwrap();
    assert_eq!(iommu["verdict"], "problem");
    assert!(iommu["fix"].as_str().unwrap().contains("firmware"));
    assert_eq!(
        v["summary"]["problems"].as_u64().unwrap() as usize,
        items.iter().filter(|i| i["verdict"] == "problem").count()
    );
    assert_eq!(v["modes"]["legacy"]["available"], true);
    assert_eq!(v["modes"]["cdev"]["available"], false);
}

#[test]
fn short_bdf_is_accepted() {
    let f = ready_host();
    let r = f.run(&["check", "01:00.0"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with(BDF));
}

#[test]
fn sysfs_and_proc_files_that_are_fifos_are_refused_without_waiting_for_a_writer() {
    // A copied tree (--root) can hold anything: opening a FIFO with no writer for reading
    // blocks until one appears, so each file `check` reads is opened without blocking and
    // must be a regular file. run_bin fails the test if the check takes over 20 s.
    let f = ready_host();
    let dir = format!("sys/bus/pci/devices/{BDF}");
    for rel in [
        format!("{dir}/config"),
        format!("{dir}/resource"),
        format!("{dir}/reset_method"),
        format!("{dir}/class"),
        "proc/cmdline".to_string(),
        "sys/module/vfio/parameters/enable_unsafe_noiommu_mode".to_string(),
    ] {
        f.remove(&rel);
        let c = std::ffi::CString::new(f.p(&rel).display().to_string()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that lives across the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    }
    let r = f.check(&[]);
    // Unreadable config space and resource file are warnings (as for a non-root read).
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    for item in ["config space", "BARs"] {
        let (line, _) = r.item(item);
        assert!(
            line.starts_with("[warn]") && line.contains("a FIFO"),
            "{line}"
        );
    }
}
