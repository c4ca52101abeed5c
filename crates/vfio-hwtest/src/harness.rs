//! The scenario harness: a table of scenarios, run once or once per device, each reported on
//! exactly one line.
//!
//! Output format (parsed by `cargo xtask hwtest`, keep it stable):
//!
//! ```text
//! HWTEST PASS <name> [<detail>]
//! HWTEST FAIL <name> [<detail>]
//! HWTEST SKIP <name> [<detail>]
//! <N> passed, <M> failed[, <K> skipped]
//! ```
//!
//! A per-device scenario is named `<scenario>@<bdf>`. A scenario that returns an error or
//! panics is a FAIL; its detail is the error chain or the panic message.

use crate::device::{Device, PciId};
use crate::mode::{ByDesign, Mode};
use anyhow::{anyhow, Result};
use std::cell::RefCell;
use std::fmt;
use std::io::Write;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::Mutex;

/// Where the guest's initramfs puts the `vfio-passthrough` binary.
pub const DEFAULT_CLI: &str = "/vfio-passthrough";

/// The prefix of every scenario line.
pub const LINE_PREFIX: &str = "HWTEST";

/// What a scenario needs, which decides how often it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Runs once per run; [`Ctx::device`] is `None`.
    Nothing,
    /// Runs once for every device under test.
    EachDevice,
    /// Runs once for every device under test with this ID; one SKIP line when there is none.
    DeviceId(PciId),
}

/// What a scenario finds when it succeeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The behaviour was observed; the text says what was seen.
    Pass(String),
    /// The scenario does not apply here; the text says why.
    Skip(String),
}

/// One entry of the scenario table.
#[derive(Clone, Copy)]
pub struct Scenario {
    /// Stable name, one token (letters, digits, `-`): it appears in the report.
    pub name: &'static str,
    /// How often it runs and on which devices.
    pub needs: Needs,
    /// The check. `Err` (or a panic) is a FAIL.
    pub run: fn(&Ctx<'_>) -> Result<Outcome>,
}

/// What a scenario sees.
pub struct Ctx<'a> {
    /// The device this instance runs on (`None` for [`Needs::Nothing`]).
    pub device: Option<&'a Device>,
    /// Every device under test.
    pub devices: &'a [Device],
    /// Devices asked for that could not be looked up, with the reason.
    pub problems: &'a [String],
    /// IDs that must be among the devices under test (`--require`).
    pub required: &'a [PciId],
    /// How the kernel backend opens devices in this run (`--mode`); open them with
    /// [`crate::modes::open_device`] / [`crate::mode::open_kernel`].
    pub mode: Mode,
    /// The `vfio-passthrough` binary the CLI scenarios spawn (`--cli`).
    pub cli: &'a Path,
}

impl Ctx<'_> {
    /// The device of a per-device scenario; an error for a [`Needs::Nothing`] one.
    pub fn device(&self) -> Result<&Device> {
        self.device
            .ok_or_else(|| anyhow!("scenario needs a device but runs without one"))
    }
}

/// The verdict of one scenario instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Behaved as expected.
    Pass,
    /// Did not, or errored, or panicked.
    Fail,
    /// Did not apply.
    Skip,
}

impl Verdict {
    /// The word used in the report line.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "SKIP",
        }
    }
}

/// Counts of a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Scenario instances that passed.
    pub passed: usize,
    /// Scenario instances that failed.
    pub failed: usize,
    /// Scenario instances that were skipped.
    pub skipped: usize,
}

impl Summary {
    fn count(&mut self, v: Verdict) {
        match v {
            Verdict::Pass => self.passed += 1,
            Verdict::Fail => self.failed += 1,
            Verdict::Skip => self.skipped += 1,
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)?;
        if self.skipped > 0 {
            write!(f, ", {} skipped", self.skipped)?;
        }
        Ok(())
    }
}

thread_local! {
    /// Where the last panic on this thread happened, recorded by [`install_quiet_panic_hook`].
    static PANIC_LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Replaces the default panic hook (which prints a multi-line message to stderr, in the middle
/// of the report) by one that only remembers where the panic happened, for the FAIL line.
pub fn install_quiet_panic_hook() {
    panic::set_hook(Box::new(|info| {
        let loc = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()));
        PANIC_LOCATION.with(|p| *p.borrow_mut() = loc);
    }));
}

/// Keeps the warnings and errors our crates log (through `log`) while a scenario runs, so the
/// report line can show them instead of them being lost (or interleaved with the report).
struct LogCapture {
    lines: Mutex<Vec<String>>,
}

/// At most this many log lines are kept per scenario.
const MAX_LOG_LINES: usize = 8;

static LOG_CAPTURE: LogCapture = LogCapture {
    lines: Mutex::new(Vec::new()),
};

impl log::Log for LogCapture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if let Ok(mut l) = self.lines.lock() {
            if l.len() < MAX_LOG_LINES {
                l.push(format!(
                    "{} {}: {}",
                    record.level(),
                    record.target(),
                    record.args()
                ));
            }
        }
    }

    fn flush(&self) {}
}

/// Routes `log` warnings and errors into the report (see [`LogCapture`]).
pub fn install_log_capture() {
    if log::set_logger(&LOG_CAPTURE).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}

/// The log lines captured since the last call.
fn take_log() -> Vec<String> {
    LOG_CAPTURE
        .lines
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default()
}

/// Runs one scenario instance, turning errors and panics into a FAIL; warnings logged by our
/// crates meanwhile are appended to the detail.
fn run_one(s: &Scenario, ctx: &Ctx<'_>) -> (Verdict, String) {
    take_log();
    let (v, mut d) = run_one_inner(s, ctx);
    let log = take_log();
    if !log.is_empty() {
        d = format!("{d} [log: {}]", log.join("; "));
    }
    (v, d)
}

fn run_one_inner(s: &Scenario, ctx: &Ctx<'_>) -> (Verdict, String) {
    PANIC_LOCATION.with(|p| *p.borrow_mut() = None);
    match panic::catch_unwind(AssertUnwindSafe(|| (s.run)(ctx))) {
        Ok(Ok(Outcome::Pass(d))) => (Verdict::Pass, d),
        Ok(Ok(Outcome::Skip(d))) => (Verdict::Skip, d),
        // A step this mode does not offer by design (DMA in no-IOMMU mode): not a failure.
        Ok(Err(e)) if e.downcast_ref::<ByDesign>().is_some() => (Verdict::Skip, format!("{e:#}")),
        Ok(Err(e)) => (Verdict::Fail, format!("{e:#}")),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            let at = PANIC_LOCATION
                .with(|p| p.borrow_mut().take())
                .map(|l| format!(" at {l}"))
                .unwrap_or_default();
            (Verdict::Fail, format!("panicked{at}: {msg}"))
        }
    }
}

/// Formats one report line; the detail is flattened to a single line.
pub fn report_line(verdict: Verdict, name: &str, detail: &str) -> String {
    let flat: String = detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let flat = flat.trim();
    if flat.is_empty() {
        format!("{LINE_PREFIX} {} {name}", verdict.word())
    } else {
        format!("{LINE_PREFIX} {} {name} {flat}", verdict.word())
    }
}

/// Options of a run besides the devices.
#[derive(Clone, Copy, Default)]
pub struct RunOptions<'a> {
    /// Only scenarios whose name contains this run (`--only`).
    pub only: Option<&'a str>,
    /// The mode scenarios see in [`Ctx::mode`].
    pub mode: Mode,
    /// The CLI binary scenarios see in [`Ctx::cli`] (`--cli`); `None`:
    /// [`DEFAULT_CLI`].
    pub cli: Option<&'a Path>,
}

/// Runs the table, writes one line per scenario instance and the closing summary line.
pub fn run_all(
    table: &[Scenario],
    devices: &[Device],
    problems: &[String],
    required: &[PciId],
    opts: RunOptions<'_>,
    out: &mut dyn Write,
) -> Result<Summary> {
    let mut summary = Summary::default();
    let base = Ctx {
        device: None,
        devices,
        problems,
        required,
        mode: opts.mode,
        cli: opts.cli.unwrap_or(Path::new(DEFAULT_CLI)),
    };
    for s in table {
        if opts.only.is_some_and(|o| !s.name.contains(o)) {
            continue;
        }
        let targets: Vec<&Device> = match s.needs {
            Needs::Nothing => {
                let (v, d) = run_one(s, &base);
                summary.count(v);
                writeln!(out, "{}", report_line(v, s.name, &d))?;
                continue;
            }
            Needs::EachDevice => devices.iter().collect(),
            Needs::DeviceId(id) => devices.iter().filter(|d| d.id == id).collect(),
        };
        if targets.is_empty() {
            let why = match s.needs {
                Needs::DeviceId(id) => format!("no {id} device under test"),
                _ => "no device under test".to_string(),
            };
            summary.count(Verdict::Skip);
            writeln!(out, "{}", report_line(Verdict::Skip, s.name, &why))?;
            continue;
        }
        for dev in targets {
            let ctx = Ctx {
                device: Some(dev),
                ..base
            };
            let (v, d) = run_one(s, &ctx);
            summary.count(v);
            let name = format!("{}@{}", s.name, dev.bdf);
            writeln!(out, "{}", report_line(v, &name, &d))?;
        }
        out.flush()?;
    }
    writeln!(out, "{summary}")?;
    out.flush()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;
    use std::path::PathBuf;

    fn dev(bdf: &str, vendor: u16, device: u16) -> Device {
        Device {
            bdf: bdf.to_string(),
            sysfs: PathBuf::from("/nonexistent"),
            id: PciId { vendor, device },
        }
    }

    fn pass(_: &Ctx<'_>) -> Result<Outcome> {
        Ok(Outcome::Pass("fine".into()))
    }
    fn fail(_: &Ctx<'_>) -> Result<Outcome> {
        bail!("broken\nacross lines")
    }
    fn boom(_: &Ctx<'_>) -> Result<Outcome> {
        panic!("kaboom")
    }
    fn bdf_of(ctx: &Ctx<'_>) -> Result<Outcome> {
        Ok(Outcome::Pass(ctx.device()?.bdf.clone()))
    }

    fn run(table: &[Scenario], devices: &[Device]) -> (Summary, String) {
        let mut out = Vec::new();
        let s = run_all(table, devices, &[], &[], RunOptions::default(), &mut out).unwrap();
        (s, String::from_utf8(out).unwrap())
    }

    #[test]
    fn each_scenario_instance_prints_exactly_one_line_then_the_summary() {
        let table = [
            Scenario {
                name: "a",
                needs: Needs::Nothing,
                run: pass,
            },
            Scenario {
                name: "b",
                needs: Needs::EachDevice,
                run: bdf_of,
            },
            Scenario {
                name: "c",
                needs: Needs::Nothing,
                run: fail,
            },
        ];
        let devs = [dev("0000:00:01.0", 1, 2), dev("0000:00:02.0", 3, 4)];
        let (s, out) = run(&table, &devs);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            [
                "HWTEST PASS a fine",
                "HWTEST PASS b@0000:00:01.0 0000:00:01.0",
                "HWTEST PASS b@0000:00:02.0 0000:00:02.0",
                "HWTEST FAIL c broken across lines",
                "3 passed, 1 failed",
            ]
        );
        assert_eq!(
            s,
            Summary {
                passed: 3,
                failed: 1,
                skipped: 0
            }
        );
    }

    #[test]
    fn a_panicking_scenario_is_a_failure_and_the_run_goes_on() {
        let table = [
            Scenario {
                name: "p",
                needs: Needs::Nothing,
                run: boom,
            },
            Scenario {
                name: "q",
                needs: Needs::Nothing,
                run: pass,
            },
        ];
        let (s, out) = run(&table, &[]);
        assert!(out.starts_with("HWTEST FAIL p panicked"), "{out}");
        assert!(out.contains("kaboom"), "{out}");
        assert!(out.contains("HWTEST PASS q"), "{out}");
        assert_eq!((s.passed, s.failed), (1, 1));
    }

    #[test]
    fn id_scenario_runs_only_on_matching_devices_and_skips_when_none_match() {
        let edu = PciId {
            vendor: 0x1234,
            device: 0x11e8,
        };
        let table = [Scenario {
            name: "edu",
            needs: Needs::DeviceId(edu),
            run: bdf_of,
        }];
        let (s, out) = run(
            &table,
            &[
                dev("0000:00:01.0", 0x1234, 0x11e8),
                dev("0000:00:02.0", 1, 1),
            ],
        );
        assert_eq!(
            out,
            "HWTEST PASS edu@0000:00:01.0 0000:00:01.0\n1 passed, 0 failed\n"
        );
        assert_eq!(s.passed, 1);
        let (s, out) = run(&table, &[dev("0000:00:02.0", 1, 1)]);
        assert_eq!(
            out,
            "HWTEST SKIP edu no 1234:11e8 device under test\n0 passed, 0 failed, 1 skipped\n"
        );
        assert_eq!(s.skipped, 1);
    }

    #[test]
    fn only_filter_leaves_other_scenarios_out_of_report_and_counts() {
        let table = [
            Scenario {
                name: "keep-me",
                needs: Needs::Nothing,
                run: pass,
            },
            Scenario {
                name: "drop-me",
                needs: Needs::Nothing,
                run: fail,
            },
        ];
        let mut out = Vec::new();
        let opts = RunOptions {
            only: Some("keep"),
            ..RunOptions::default()
        };
        let s = run_all(&table, &[], &[], &[], opts, &mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HWTEST PASS keep-me fine\n1 passed, 0 failed\n"
        );
        assert_eq!(s.failed, 0);
    }

    fn needs_dma(ctx: &Ctx<'_>) -> Result<Outcome> {
        crate::mode::require_dma(ctx.mode)?;
        Ok(Outcome::Pass("mapped".into()))
    }

    #[test]
    fn a_step_refused_by_design_is_a_skip_with_its_reason_not_a_pass_or_failure() {
        let table = [Scenario {
            name: "dma",
            needs: Needs::Nothing,
            run: needs_dma,
        }];
        let mut out = Vec::new();
        let opts = RunOptions {
            mode: Mode::NoIommu,
            ..RunOptions::default()
        };
        let s = run_all(&table, &[], &[], &[], opts, &mut out).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with("HWTEST SKIP dma needs DMA mapping"),
            "{out}"
        );
        assert_eq!((s.passed, s.failed, s.skipped), (0, 0, 1));
        let (s, out) = run(&table, &[]);
        assert_eq!((s.passed, s.skipped), (1, 0), "{out}");
    }

    #[test]
    fn device_accessor_errors_in_a_run_once_scenario() {
        let table = [Scenario {
            name: "d",
            needs: Needs::Nothing,
            run: bdf_of,
        }];
        let (s, out) = run(&table, &[]);
        assert_eq!(s.failed, 1);
        assert!(
            out.starts_with("HWTEST FAIL d scenario needs a device"),
            "{out}"
        );
    }
}
