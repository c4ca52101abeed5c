//! `vfio-hwtest`: hardware scenarios against PCI functions bound to the kernel's `vfio-pci`.
//!
//! ```text
//! vfio-hwtest [--device BDF]... [--require VENDOR:DEVICE]... [--only SUBSTRING] [--cli PATH]
//!             [--guest-os DIR [--vmm PATH] [--l2-qemu PATH] [--rounds N]] [--list]
//! ```
//!
//! Without `--device`, every function bound to `vfio-pci` is tested. Each scenario prints one
//! `HWTEST <PASS|FAIL|SKIP> <name> [<detail>]` line (see [`harness`]); the exit code is 0 only
//! if none failed, 1 if one did, 2 for a usage error.
//!
//! `cargo xtask hwtest` builds this statically and runs it in a QEMU guest (`--qemu`) or on
//! the host (`--device`). `cargo xtask interop` runs it with `--interop DIR` in a QEMU guest
//! whose device is our `serve-fake` attached by QEMU's `vfio-user-pci` ([`interop`]).

mod cli;
mod device;
mod edu;
mod group;
mod guest_os;
mod harness;
mod interop;
mod migration;
mod mode;
mod modes;
mod nvme;
mod scenarios;
mod stack;
mod vmm;

use anyhow::{bail, Context, Result};
use device::{canonical_bdf, Device, PciId};
use harness::RunOptions;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "\
usage: vfio-hwtest [--mode MODE] [--device BDF]... [--require VENDOR:DEVICE]... [--only SUBSTRING]
                   [--cli PATH] [--interop DIR] [--list]

  --mode MODE                how devices are opened: legacy (container + group, default),
                             iommufd (/dev/iommu + vfio cdev) or noiommu (explicit opt-in;
                             scenarios needing DMA are skipped by design); adds that mode's
                             own scenarios

  --device BDF               a function bound to vfio-pci (repeatable); default: every one
  --require VENDOR:DEVICE    fail unless a device under test has this id (repeatable)
  --only SUBSTRING           run only scenarios whose name contains SUBSTRING
  --cli PATH                 the vfio-passthrough binary the cli-* scenarios run (default
                             /vfio-passthrough; they are skipped when it does not exist)
  --interop DIR              run the vfio-user interop set instead of the common one: DIR holds
                             `vfio-passthrough inspect --fake <profile> --json` outputs
                             (<profile>.json), the prediction the guest's view is checked against
  --guest-os DIR             run the guest-os-* scenarios last: DIR holds vmlinuz and initrd.gz of
                             a second-level guest (L2) whose /init is the workload; needs /dev/kvm
  --vmm PATH                 the reference VMM they run (default /vfio-reference-vmm)
  --l2-qemu PATH             the QEMU of the side-by-side run (default /usr/bin/qemu-system-x86_64,
                             firmware from /usr/share/qemu)
  --rounds N                 rounds of each VMM in the side-by-side run (default 3)
  --list                     print the scenario names and exit
";

/// The parsed command line.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    devices: Vec<String>,
    required: Vec<PciId>,
    only: Option<String>,
    list: bool,
    mode: mode::Mode,
    cli: Option<PathBuf>,
    interop: Option<PathBuf>,
    guest_os: Option<PathBuf>,
    vmm: Option<PathBuf>,
    l2_qemu: Option<PathBuf>,
    rounds: Option<usize>,
}

fn parse_args(args: &[String]) -> Result<Args> {
    let mut out = Args::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{flag} needs a value"))
        };
        match a.as_str() {
            "--device" => out.devices.push(canonical_bdf(&value("--device")?)?),
            "--require" => out.required.push(PciId::parse(&value("--require")?)?),
            "--only" => out.only = Some(value("--only")?),
            "--list" => out.list = true,
            "--mode" => out.mode = mode::Mode::parse(&value("--mode")?)?,
            "--cli" => out.cli = Some(PathBuf::from(value("--cli")?)),
            "--interop" => out.interop = Some(PathBuf::from(value("--interop")?)),
            "--guest-os" => out.guest_os = Some(PathBuf::from(value("--guest-os")?)),
            "--vmm" => out.vmm = Some(PathBuf::from(value("--vmm")?)),
            "--l2-qemu" => out.l2_qemu = Some(PathBuf::from(value("--l2-qemu")?)),
            "--rounds" => {
                let v = value("--rounds")?;
                let n: usize = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=20).contains(n))
                    .with_context(|| format!("--rounds {v}: expected 1 to 20"))?;
                out.rounds = Some(n);
            }
            other => bail!("unknown argument `{other}`"),
        }
    }
    Ok(out)
}

fn run(args: &Args) -> Result<bool> {
    if args.list {
        let mode_only = mode::Mode::ALL.into_iter().flat_map(modes::scenarios);
        if args.interop.is_some() {
            for s in interop::SCENARIOS {
                println!("{}", s.name);
            }
            return Ok(true);
        }
        for s in scenarios::SCENARIOS
            .iter()
            .chain(mode_only)
            .chain(guest_os::SCENARIOS)
        {
            println!("{}", s.name);
        }
        return Ok(true);
    }
    let bdfs = if args.devices.is_empty() {
        device::bound_to_vfio_pci()?
    } else {
        args.devices.clone()
    };
    let mut devices = Vec::new();
    let mut problems = Vec::new();
    for bdf in &bdfs {
        match Device::open(bdf) {
            Ok(d) => devices.push(d),
            Err(e) => problems.push(format!("{bdf}: {e:#}")),
        }
    }
    harness::install_quiet_panic_hook();
    harness::install_log_capture();
    mode::set_current(args.mode);
    if let Some(dir) = &args.guest_os {
        guest_os::configure(guest_os::Config {
            dir: dir.clone(),
            vmm: args
                .vmm
                .clone()
                .unwrap_or_else(|| PathBuf::from(guest_os::DEFAULT_VMM)),
            qemu: args
                .l2_qemu
                .clone()
                .unwrap_or_else(|| PathBuf::from(guest_os::DEFAULT_QEMU)),
            firmware: PathBuf::from(guest_os::DEFAULT_FIRMWARE),
            rounds: args.rounds.unwrap_or(guest_os::DEFAULT_ROUNDS),
        });
    }
    let opts = RunOptions {
        only: args.only.as_deref(),
        mode: args.mode,
        cli: args.cli.as_deref(),
    };
    // The common set, then the scenarios of this mode; or the interop set.
    let table: Vec<harness::Scenario> = match &args.interop {
        Some(dir) => {
            interop::set_dir(dir.clone());
            interop::table(&devices)
        }
        // The guest-os scenarios go last: they rebind nvme in L1 for its native read.
        None => scenarios::SCENARIOS
            .iter()
            .chain(modes::scenarios(args.mode))
            .chain(guest_os::SCENARIOS)
            .copied()
            .collect(),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let summary = harness::run_all(&table, &devices, &problems, &args.required, opts, &mut out)?;
    Ok(summary.failed == 0)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.iter().any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let args = match parse_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vfio-hwtest: {e:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("vfio-hwtest: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message of the error `r` holds ("" when `r` is Ok). anyhow errors have no variants:
    /// the message is what tells one refusal from another.
    fn err_text<T>(r: Result<T>) -> String {
        r.err().map(|e| format!("{e:#}")).unwrap_or_default()
    }

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn repeated_devices_and_requirements_are_all_kept_in_canonical_form() {
        let a = parse_args(&argv(&[
            "--device",
            "00:01.0",
            "--device",
            "0000:00:02.0",
            "--require",
            "1234:11e8",
        ]))
        .unwrap();
        assert_eq!(a.devices, ["0000:00:01.0", "0000:00:02.0"]);
        assert_eq!(a.required, [scenarios::EDU]);
        assert_eq!(a.cli, None);
        let a = parse_args(&argv(&["--cli", "/opt/vfio-passthrough"])).unwrap();
        assert_eq!(
            a.cli.as_deref(),
            Some(std::path::Path::new("/opt/vfio-passthrough"))
        );
        let e = err_text(parse_args(&argv(&["--cli"])));
        assert!(e.contains("--cli needs a value"), "{e}");
    }

    #[test]
    fn missing_value_bad_address_and_unknown_flag_are_usage_errors() {
        let e = err_text(parse_args(&argv(&["--device"])));
        assert!(e.contains("--device needs a value"), "{e}");
        let e = err_text(parse_args(&argv(&["--device", "../x"])));
        assert!(e.contains("`../x` is not a PCI address"), "{e}");
        let e = err_text(parse_args(&argv(&["--frobnicate"])));
        assert!(e.contains("unknown argument `--frobnicate`"), "{e}");
    }

    #[test]
    fn scenario_names_are_unique_single_tokens() {
        let names: Vec<&str> = scenarios::SCENARIOS.iter().map(|s| s.name).collect();
        for n in &names {
            assert!(
                !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                "{n}"
            );
        }
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
    }
}
