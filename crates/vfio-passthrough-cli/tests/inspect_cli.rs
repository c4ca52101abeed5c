//! `vfio-passthrough inspect` on every fake profile and every shipped dump, with the guest's
//! config space decoded by pciutils' `lspci -F` (tests that need lspci say so and skip when it
//! is absent; CI installs pciutils).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use vfio_fake_device::FakeDevice;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vfio-passthrough"))
}

fn dumps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dumps")
}

fn shipped_dumps() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dumps_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    v.sort();
    v
}

/// Runs `inspect` with `args` plus `--json --dump <tmp>`; returns (exit code, JSON, dump text).
fn inspect(args: &[&str], dir: &Path) -> (i32, Value, String) {
    let dump = dir.join("guest.txt");
    let out = bin()
        .arg("inspect")
        .args(args)
        .arg("--json")
        .arg("--dump")
        .arg(&dump)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let json: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("inspect {args:?}: not JSON ({e}); stderr: {stderr}"));
    let text = std::fs::read_to_string(&dump).unwrap();
    (out.status.code().unwrap(), json, text)
}

fn lspci_available() -> bool {
    let ok = Command::new("lspci")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "SKIPPED: lspci (pciutils) is not installed; `apt-get install -y pciutils` to run the \
             lspci -F checks (CI installs it)"
        );
    }
    ok
}

/// `lspci -F file -vvv -nn` output.
fn lspci(file: &Path) -> String {
    let out = Command::new("lspci")
        .arg("-F")
        .arg(file)
        .args(["-vvv", "-nn"])
        .output()
        .unwrap();
    assert!(out.status.success(), "lspci -F {}", file.display());
    String::from_utf8(out.stdout).unwrap()
}

/// lspci's name of an extended capability the stack hides.
fn lspci_name_of_hidden(id: u64) -> &'static str {
    match id {
        0x0010 => "Single Root I/O Virtualization",
        0x0011 => "Multi-Root I/O Virtualization",
        0x000e => "Alternative Routing-ID Interpretation",
        0x0015 => "Resizable BAR",
        0x0024 => "VF Resizable BAR",
        other => panic!("no lspci name for hidden extended capability {other:#x}"),
    }
}

fn failed_steps(json: &Value) -> Vec<String> {
    json["self_check"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "fail")
        .map(|s| format!("{}: {}", s["name"], s["detail"]))
        .collect()
}

fn step<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["self_check"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no self-check step {name}"))
}

/// The `[size=...]` of `Region N:` in a dump we wrote, in bytes.
fn region_size_in_dump(text: &str, index: usize) -> Option<u64> {
    let prefix = format!("Region {index}:");
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with(&prefix))
        .and_then(|l| l.split("[size=").nth(1))
        .and_then(|s| s.split(']').next())
        .and_then(vfio_fake_device::lspci::parse_size)
}

fn hex_id(json: &Value) -> String {
    format!(
        "[{:04x}:{:04x}]",
        json["identity"]["vendor_id"].as_u64().unwrap(),
        json["identity"]["device_id"].as_u64().unwrap()
    )
}

#[test]
fn every_fake_profile_passes_the_self_check_and_lspci_decodes_what_the_device_is() {
    let have_lspci = lspci_available();
    for profile in vfio_fake_device::profiles() {
        let dir = tempfile::tempdir().unwrap();
        let (code, json, dump) = inspect(&["--fake", profile], dir.path());
        assert_eq!(code, 0, "{profile}: {:?}", failed_steps(&json));
        assert!(failed_steps(&json).is_empty());

        // Ground truth: the device's own template.
        let fake = FakeDevice::profile(profile).unwrap();
        let t = fake.template();
        let cfg = t.config();
        let vendor = u16::from_le_bytes([cfg[0], cfg[1]]);
        let device = u16::from_le_bytes([cfg[2], cfg[3]]);
        assert_eq!(json["identity"]["vendor_id"], u64::from(vendor));
        assert_eq!(json["identity"]["device_id"], u64::from(device));

        // Every BAR the guest sizes is the device's size (the fake's BARs are >= a page).
        for i in 0..6u8 {
            let Some(spec) = t.bar(i) else { continue };
            let bar = json["bars"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["index"] == u64::from(i))
                .unwrap_or_else(|| panic!("{profile}: BAR{i} missing"));
            assert_eq!(bar["guest_size"], spec.size, "{profile} BAR{i}");
            assert_eq!(region_size_in_dump(&dump, usize::from(i)), Some(spec.size));
        }

        // Interrupts: MSI-X fired on every vector where the device has MSI-X.
        if let Some(m) = t.msix() {
            assert_eq!(json["interrupts"]["msix"]["vectors"], m.vectors);
            assert_eq!(step(&json, "MSI-X firing")["status"], "ok");
        }
        if profile == &"edu" {
            assert_eq!(step(&json, "DMA round trip")["status"], "ok");
        }

        if !have_lspci {
            continue;
        }
        let file = dir.path().join("guest.txt");
        let out = lspci(&file);
        let header = out.lines().next().unwrap();
        assert!(
            header.contains(&format!("[{vendor:04x}:{device:04x}]")),
            "{profile}: {header}"
        );
        for b in json["bars"].as_array().unwrap() {
            let i = b["index"].as_u64().unwrap();
            let base = b["base"].as_u64().unwrap();
            let want = match b["kind"].as_str().unwrap() {
                "rom" => format!("Expansion ROM at {base:08x}"),
                "io" => format!("Region {i}: I/O ports at {base:04x}"),
                "mem64" => format!("Region {i}: Memory at {base:x} (64-bit"),
                _ => format!("Region {i}: Memory at {base:x} (32-bit"),
            };
            assert!(
                out.contains(&want),
                "{profile}: lspci lacks {want:?}:\n{out}"
            );
        }
        if let Some(m) = t.msix() {
            assert!(
                out.contains(&format!("MSI-X: Enable- Count={} ", m.vectors)),
                "{out}"
            );
            assert!(out.contains(&format!(
                "Vector table: BAR={} offset={:08x}",
                m.table_bar, m.table_offset
            )));
            assert!(out.contains(&format!(
                "PBA: BAR={} offset={:08x}",
                m.pba_bar, m.pba_offset
            )));
        }
        for h in json["capabilities"]["hidden"].as_array().unwrap() {
            let name = lspci_name_of_hidden(h["id"].as_u64().unwrap());
            assert!(
                !out.contains(name),
                "{profile}: hidden {name} decoded by lspci"
            );
        }
        for k in json["capabilities"]["kept"].as_array().unwrap() {
            let off = k["offset"].as_u64().unwrap();
            let tag = if k["extended"].as_bool().unwrap() {
                format!("Capabilities: [{off:x} v")
            } else {
                format!("Capabilities: [{off:x}]")
            };
            assert!(out.contains(&tag), "{profile}: lspci lacks kept {tag}");
        }
    }
}

#[test]
fn nvme_like_sriov_is_on_the_device_but_not_in_the_guest_view() {
    if !lspci_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The device itself has SR-IOV: its config space, decoded, shows it.
    let fake = FakeDevice::profile("nvme-like").unwrap();
    let mut raw = String::from("00:00.0 device\n");
    for (row, chunk) in fake.template().config().chunks(16).enumerate() {
        raw.push_str(&format!("{:02x}:", row * 16));
        for b in chunk {
            raw.push_str(&format!(" {b:02x}"));
        }
        raw.push('\n');
    }
    let raw_file = dir.path().join("device.txt");
    std::fs::write(&raw_file, raw).unwrap();
    assert!(lspci(&raw_file).contains("Single Root I/O Virtualization"));

    let (code, json, _) = inspect(&["--fake", "nvme-like"], dir.path());
    assert_eq!(code, 0);
    let guest = lspci(&dir.path().join("guest.txt"));
    assert!(!guest.contains("Single Root I/O Virtualization"), "{guest}");
    assert!(guest.contains("Advanced Error Reporting"));
    assert_eq!(json["capabilities"]["hidden"][0]["id"], 0x10);
}

/// The ids, capability names (by offset) and MSI-X lines lspci decodes from a dump.
fn lspci_caps(out: &str) -> Vec<String> {
    out.lines()
        .map(str::trim)
        .filter(|l| l.starts_with("Capabilities: ["))
        .map(str::to_string)
        .collect()
}

#[test]
fn fake_config_shows_every_shipped_dump_as_a_guest_sees_it() {
    let have_lspci = lspci_available();
    let dumps = shipped_dumps();
    assert!(dumps.len() >= 5, "dumps/ holds {dumps:?}");
    for input in dumps {
        let name = input.file_name().unwrap().to_string_lossy().to_string();
        let dir = tempfile::tempdir().unwrap();
        let (code, json, dump) = inspect(&["--fake-config", input.to_str().unwrap()], dir.path());
        assert_eq!(code, 0, "{name}: {:?}", failed_steps(&json));

        // BAR sizes: the input's [size=...] where it has them, else a guess that says so.
        let text = std::fs::read_to_string(&input).unwrap();
        for note in json["source"]["bar_sizes"].as_array().unwrap() {
            let bar = note["bar"].as_u64().unwrap() as usize;
            if bar == 6 {
                continue;
            }
            match note["source"].as_str().unwrap() {
                "dump" => assert_eq!(
                    Some(note["size"].as_u64().unwrap()),
                    region_size_in_dump(&text, bar),
                    "{name} BAR{bar}"
                ),
                "guessed" => assert!(note["how"].as_str().unwrap().contains("--bar-size")),
                other => panic!("{name}: size source {other}"),
            }
            assert_eq!(region_size_in_dump(&dump, bar), note["size"].as_u64());
        }

        if !have_lspci {
            continue;
        }
        let before = lspci(&input);
        let after = lspci(&dir.path().join("guest.txt"));
        let id = hex_id(&json);
        assert!(before.lines().next().unwrap().contains(&id), "{name}");
        assert!(after.lines().next().unwrap().contains(&id), "{name}");
        let hidden: Vec<&'static str> = json["capabilities"]["hidden"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| lspci_name_of_hidden(h["id"].as_u64().unwrap()))
            .collect();
        for h in &hidden {
            assert!(before.contains(h), "{name}: the input has no {h}");
            assert!(!after.contains(h), "{name}: {h} reaches the guest");
        }
        // Everything else lspci decodes from the device is there for the guest too.
        let after_caps = lspci_caps(&after);
        for c in lspci_caps(&before) {
            if hidden.iter().any(|h| c.contains(h)) {
                continue;
            }
            let head = c.split(']').next().unwrap();
            assert!(
                after_caps.iter().any(|a| a.starts_with(head)),
                "{name}: {c} is missing in the guest view"
            );
        }
        // MSI-X: same table size and location (4 KiB pages: no relocation).
        let msix = |s: &str| -> Vec<String> {
            s.lines()
                .map(str::trim)
                .filter(|l| l.starts_with("Vector table:") || l.starts_with("PBA:"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(msix(&before), msix(&after), "{name}");
        let count = |s: &str| {
            s.lines().find(|l| l.contains("MSI-X:")).map(|l| {
                l.split("Count=")
                    .nth(1)
                    .unwrap()
                    .split(' ')
                    .next()
                    .unwrap()
                    .to_string()
            })
        };
        assert_eq!(count(&before), count(&after), "{name}");
    }
}

#[test]
fn sriov_nic_dump_hides_sriov_and_ari_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let nic = dumps_dir().join("nic-sriov-synthetic.txt");
    let (code, json, _) = inspect(&["--fake-config", nic.to_str().unwrap()], dir.path());
    assert_eq!(code, 0);
    let hidden = json["capabilities"]["hidden"].as_array().unwrap();
    let ids: Vec<u64> = hidden.iter().map(|h| h["id"].as_u64().unwrap()).collect();
    assert!(ids.contains(&0x10) && ids.contains(&0x0e), "{ids:?}");
    assert!(hidden
        .iter()
        .all(|h| !h["handling"].as_str().unwrap().is_empty()));
    // The VF BAR lines inside SR-IOV (16K) do not size the PF's BAR0 (512K).
    let bar0 = &json["bars"][0];
    assert_eq!(bar0["guest_size"], 512 << 10);
    // The I/O BAR lands in the I/O window.
    let io = json["bars"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["kind"] == "io")
        .unwrap();
    assert_eq!(io["guest_size"], 32);
    assert!(io["base"].as_u64().unwrap() >= 0xc000);
}

#[test]
fn bar_size_option_replaces_a_guess_and_is_reported_as_given() {
    let dir = tempfile::tempdir().unwrap();
    let nvme = dumps_dir().join("nvme-synthetic.txt");
    let (_, guessed, _) = inspect(&["--fake-config", nvme.to_str().unwrap()], dir.path());
    assert_eq!(guessed["source"]["bar_sizes"][0]["source"], "guessed");
    // 33 vectors at 0x3000 end at 0x3210: 16 KiB is the smallest BAR that holds them.
    assert_eq!(guessed["bars"][0]["guest_size"], 16 << 10);
    let (code, given, _) = inspect(
        &[
            "--fake-config",
            nvme.to_str().unwrap(),
            "--bar-size",
            "0=64K",
        ],
        dir.path(),
    );
    assert_eq!(code, 0);
    assert_eq!(given["source"]["bar_sizes"][0]["source"], "option");
    assert_eq!(given["bars"][0]["guest_size"], 64 << 10);
}

#[test]
fn a_guest_dump_reads_back_as_the_same_device() {
    let dir = tempfile::tempdir().unwrap();
    let (_, first, _) = inspect(&["--fake", "nvme-like"], dir.path());
    let again_dir = tempfile::tempdir().unwrap();
    let guest = dir.path().join("guest.txt");
    let (code, second, _) = inspect(
        &["--fake-config", guest.to_str().unwrap()],
        again_dir.path(),
    );
    assert_eq!(code, 0);
    assert_eq!(
        first["identity"]["vendor_id"],
        second["identity"]["vendor_id"]
    );
    assert_eq!(
        first["identity"]["device_id"],
        second["identity"]["device_id"]
    );
    assert_eq!(
        first["bars"][0]["guest_size"],
        second["bars"][0]["guest_size"]
    );
    assert_eq!(second["source"]["bar_sizes"][0]["source"], "dump");
    assert_eq!(first["interrupts"]["msix"], second["interrupts"]["msix"]);
    // SR-IOV was already hidden in the guest view: nothing left to hide.
    assert_eq!(
        second["capabilities"]["hidden"].as_array().unwrap().len(),
        0
    );
}

#[test]
fn errors_name_the_file_or_device_and_what_to_do() {
    let out = bin()
        .args(["inspect", "--fake-config", "/nonexistent/dump.txt"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/dump.txt"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "not a dump\n").unwrap();
    let out = bin()
        .args(["inspect", "--fake-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.txt") && err.contains("lspci -vvxxxx"),
        "{err}"
    );

    let out = bin()
        .args(["inspect", "--device", "ffff:ff:1f.7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ffff:ff:1f.7") && err.contains("lspci -D"),
        "{err}"
    );

    let out = bin().args(["inspect", "--fake", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("edu") && err.contains("nvme-like"), "{err}");
}

#[test]
fn text_output_shows_mapped_and_trapped_ranges_and_hidden_reasons() {
    let out = bin().arg("inspect").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("profile \"nvme-like\""),
        "default device:\n{text}"
    );
    assert!(text.contains("trapped: MSI-X table, emulated"));
    assert!(text.contains("mapped: device memory in the guest"));
    assert!(text.contains("hidden  [148] Single Root I/O Virtualization"));
    assert!(text.contains("[ ok ] MSI-X firing"));
}

#[test]
fn noiommu_opt_in_is_only_for_a_host_device() {
    // The no-IOMMU opt-in names a host function; with a fake or a socket it means nothing.
    let out = bin()
        .args(["inspect", "--fake", "edu", "--noiommu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device"), "{err}");
}
