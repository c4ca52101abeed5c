//! Running a child with a deadline while streaming its output line by line, and reading the
//! test binary's report out of that output (the QEMU console, or the binary's own stdout).

use anyhow::{Context, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::initramfs::STATUS_PREFIX;

/// How a streamed child ended.
pub enum End {
    /// It exited by itself.
    Exited(ExitStatus),
    /// The deadline passed and it was killed.
    TimedOut,
}

impl End {
    /// What went wrong with a guest that reports through `isa-debug-exit`, if anything:
    /// QEMU exits with `(value << 1) | 1` and `/init` writes 0 on pass and 1 on failure, so
    /// 1 is a pass and 3 a reported failure. QEMU's own errors exit 1 as well: the report's
    /// status line settles that. `otherwise` names what else ends QEMU without that exit.
    pub fn problem(&self, timeout: std::time::Duration, otherwise: &str) -> Option<String> {
        match self {
            End::TimedOut => Some(format!(
                "QEMU killed after the {} s timeout",
                timeout.as_secs()
            )),
            End::Exited(s) => match s.code() {
                Some(1) => None,
                Some(3) => Some("the guest signalled failure through isa-debug-exit".into()),
                _ => Some(format!(
                    "QEMU exited with {s} without the guest's isa-debug-exit ({otherwise})"
                )),
            },
        }
    }
}

/// Runs `cmd` with stdin closed, passing each line of its stdout and stderr (with the seconds
/// since start) to `on_line` and to `log`, and kills it (only it, by its handle) when
/// `timeout` passes.
pub fn run_streamed(
    mut cmd: Command,
    timeout: Duration,
    log: &Path,
    mut on_line: impl FnMut(f64, &str),
) -> Result<End> {
    let mut log = File::create(log).with_context(|| format!("create {}", log.display()))?;
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{cmd:?}`"))?;
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let stdout = child
        .stdout
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    let stderr = child
        .stderr
        .take()
        .map(|s| Box::new(s) as Box<dyn Read + Send>);
    for pipe in [stdout, stderr].into_iter().flatten() {
        let tx = tx.clone();
        readers.push(std::thread::spawn(move || {
            let mut r = BufReader::new(pipe);
            let mut buf = Vec::new();
            while matches!(r.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                if tx.send(line).is_err() {
                    break;
                }
                buf.clear();
            }
        }));
    }
    drop(tx);

    let deadline = t0 + timeout;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let t = t0.elapsed().as_secs_f64();
                writeln!(log, "[{t:8.3}] {line}")?;
                on_line(t, &line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                // Ours alone, by its handle: ends the pipes, so the readers finish too.
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child.wait().context("wait for child")?;
    for r in readers {
        let _ = r.join();
    }
    writeln!(
        log,
        "[{:8.3}] (xtask: child ended: {status}{})",
        t0.elapsed().as_secs_f64(),
        if timed_out {
            ", killed at the deadline"
        } else {
            ""
        }
    )?;
    Ok(if timed_out {
        End::TimedOut
    } else {
        End::Exited(status)
    })
}

/// The verdict of one scenario line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `HWTEST PASS`.
    Pass,
    /// `HWTEST FAIL`.
    Fail,
    /// `HWTEST SKIP`.
    Skip,
}

/// One `HWTEST <verdict> <name> [<detail>]` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScenarioLine {
    /// Its verdict.
    pub verdict: Verdict,
    /// The scenario instance name.
    pub name: String,
    /// What it saw (may be empty).
    pub detail: String,
}

/// Counts, as in the closing line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Passed.
    pub passed: usize,
    /// Failed.
    pub failed: usize,
    /// Skipped.
    pub skipped: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)?;
        if self.skipped > 0 {
            write!(f, ", {} skipped", self.skipped)?;
        }
        Ok(())
    }
}

/// Finds a scenario line anywhere in `line` (a kernel message may have been printed on the
/// same console line before it).
pub fn parse_scenario(line: &str) -> Option<ScenarioLine> {
    let at = line.find("HWTEST ")?;
    let rest = &line[at + "HWTEST ".len()..];
    let (word, rest) = rest.split_once(' ')?;
    let verdict = match word {
        "PASS" => Verdict::Pass,
        "FAIL" => Verdict::Fail,
        "SKIP" => Verdict::Skip,
        _ => return None,
    };
    let (name, detail) = rest.split_once(' ').unwrap_or((rest, ""));
    if name.is_empty() {
        return None;
    }
    Some(ScenarioLine {
        verdict,
        name: name.to_string(),
        detail: detail.trim().to_string(),
    })
}

/// Parses the binary's closing line, `N passed, M failed[, K skipped]`.
pub fn parse_counts(line: &str) -> Option<Counts> {
    let mut parts = line.trim().split(", ");
    let num = |part: Option<&str>, word: &str| -> Option<usize> {
        part?.strip_suffix(word)?.trim_end().parse().ok()
    };
    let passed = num(parts.next(), "passed")?;
    let failed = num(parts.next(), "failed")?;
    let skipped = match parts.next() {
        Some(p) => num(Some(p), "skipped")?,
        None => 0,
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Counts {
        passed,
        failed,
        skipped,
    })
}

/// Everything the report holds, collected line by line.
#[derive(Default)]
pub struct Report {
    /// The scenario lines, in order.
    pub scenarios: Vec<ScenarioLine>,
    /// The binary's own closing line.
    pub guest_counts: Option<Counts>,
    /// `/init`'s status line (QEMU runs only).
    pub status: Option<i32>,
}

impl Report {
    /// Takes one output line; returns the scenario it reports, if it is a scenario line.
    pub fn feed(&mut self, line: &str) -> Option<&ScenarioLine> {
        if let Some(s) = parse_scenario(line) {
            self.scenarios.push(s);
            return self.scenarios.last();
        }
        if let Some(c) = parse_counts(line) {
            self.guest_counts = Some(c);
        } else if let Some(at) = line.find(STATUS_PREFIX) {
            self.status = line[at + STATUS_PREFIX.len()..].trim().parse().ok();
        }
        None
    }

    /// The counts of the scenario lines seen.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for s in &self.scenarios {
            match s.verdict {
                Verdict::Pass => c.passed += 1,
                Verdict::Fail => c.failed += 1,
                Verdict::Skip => c.skipped += 1,
            }
        }
        c
    }

    /// Why this report is not a pass (empty if it is). `need_status`: require `/init`'s status.
    pub fn problems(&self, need_status: bool) -> Vec<String> {
        let mut p = Vec::new();
        let c = self.counts();
        if self.scenarios.is_empty() {
            p.push("no scenario line in the output".to_string());
        }
        if c.failed > 0 {
            p.push(format!("{} scenario(s) failed", c.failed));
        }
        match self.guest_counts {
            None => p.push("the test binary printed no closing `N passed, M failed` line".into()),
            Some(g) if g != c => p.push(format!(
                "the test binary counted `{g}` but the output holds `{c}` (lines lost?)"
            )),
            Some(_) => {}
        }
        if need_status {
            match self.status {
                None => p.push(format!("no `{STATUS_PREFIX}` line from the guest's /init")),
                Some(0) => {}
                Some(s) => p.push(format!("the guest's /init reported status {s}")),
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_line_is_found_after_interleaved_kernel_output() {
        let s = parse_scenario("[    5.1] nvme nvme0: foo HWTEST FAIL a@0000:00:01.0 bad thing")
            .unwrap();
        assert_eq!(s.verdict, Verdict::Fail);
        assert_eq!(s.name, "a@0000:00:01.0");
        assert_eq!(s.detail, "bad thing");
        let s = parse_scenario("HWTEST SKIP edu").unwrap();
        assert_eq!(
            (s.verdict, s.name.as_str(), s.detail.as_str()),
            (Verdict::Skip, "edu", "")
        );
    }

    #[test]
    fn init_lines_and_unknown_verdicts_are_not_scenarios() {
        assert!(parse_scenario("HWTEST-INIT: running vfio-hwtest").is_none());
        assert!(parse_scenario("HWTEST MAYBE x").is_none());
        assert!(parse_scenario("HWTEST-STATUS: 0").is_none());
    }

    #[test]
    fn closing_line_parses_with_and_without_skips() {
        assert_eq!(
            parse_counts("3 passed, 1 failed"),
            Some(Counts {
                passed: 3,
                failed: 1,
                skipped: 0
            })
        );
        assert_eq!(
            parse_counts("3 passed, 0 failed, 2 skipped\r"),
            Some(Counts {
                passed: 3,
                failed: 0,
                skipped: 2
            })
        );
        assert_eq!(parse_counts("3 passed"), None);
        assert_eq!(parse_counts("x passed, 0 failed"), None);
    }

    #[test]
    fn report_passes_only_with_scenarios_matching_counts_and_zero_status() {
        let mut r = Report::default();
        for l in [
            "HWTEST PASS a",
            "HWTEST SKIP b why",
            "1 passed, 0 failed, 1 skipped",
            "HWTEST-STATUS: 0",
        ] {
            r.feed(l);
        }
        assert!(r.problems(true).is_empty(), "{:?}", r.problems(true));

        let mut lost = Report::default();
        for l in ["HWTEST PASS a", "2 passed, 0 failed", "HWTEST-STATUS: 0"] {
            lost.feed(l);
        }
        assert_eq!(lost.problems(true).len(), 1);

        let mut no_status = Report::default();
        for l in ["HWTEST PASS a", "1 passed, 0 failed"] {
            no_status.feed(l);
        }
        assert!(no_status.problems(false).is_empty());
        assert_eq!(no_status.problems(true).len(), 1);

        let mut failed = Report::default();
        for l in ["HWTEST FAIL a x", "0 passed, 1 failed", "HWTEST-STATUS: 1"] {
            failed.feed(l);
        }
        assert_eq!(failed.problems(true).len(), 2);
        assert!(Report::default().problems(false).len() >= 2);
    }
}
