//! `cargo xtask fuzz [--seconds N] [--target NAME]... [--seed N] [--fresh]`:
//! runs each cargo-fuzz target of `fuzz/` for a bounded time (on stable, with
//! `-s none`), and prints executions and time per target.
//!
//! New inputs go to `fuzz/target/corpus/<target>/`, never to the committed
//! seeds in `fuzz/corpus/<target>/`, so that runs on one machine build on each
//! other. `--fresh` starts from the committed seeds alone, as a clean
//! checkout does, and `--seed N` fixes libFuzzer's random seed: CI runs both,
//! so a CI run tries much the same inputs as the same command anywhere (not
//! exactly: threads and hashing in the targets make coverage vary a little).
//! Drop them to explore. A crash leaves its input in
//! `fuzz/artifacts/<target>/`: copy it to `fuzz/regressions/<target>/`, fix
//! the bug, and `cargo test -p vfio-bench --test fuzz_regressions` replays it
//! from then on.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::{cargo, root, run_cmd};

const USAGE: &str = "\
cargo xtask fuzz [--seconds N] [--target NAME]... [--seed N] [--fresh] [--list]

  --seconds N     time per target (default 60)
  --target NAME   only this target (repeatable; default: every target)
  --seed N        libFuzzer's random seed (default: a new one each run)
  --fresh         start from the committed seeds only, not from the inputs
                  earlier runs kept in fuzz/target/corpus/ (as on a clean checkout)
  --list          list the targets and exit
Installs cargo-fuzz with `cargo install cargo-fuzz --locked` when missing.";

struct Outcome {
    target: String,
    runs: u64,
    seconds: f64,
    ok: bool,
    note: String,
}

fn fuzz_dir() -> PathBuf {
    root().join("fuzz")
}

/// The `[[bin]]` names of `fuzz/Cargo.toml`.
fn targets() -> Result<Vec<String>> {
    let path = fuzz_dir().join("Cargo.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut in_bin = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
            continue;
        }
        if in_bin {
            if let Some(v) = line.strip_prefix("name") {
                let name = v
                    .trim_start()
                    .trim_start_matches('=')
                    .trim()
                    .trim_matches('"');
                out.push(name.to_string());
            }
        }
    }
    if out.is_empty() {
        bail!("no [[bin]] targets in {}", path.display());
    }
    Ok(out)
}

fn ensure_cargo_fuzz() -> Result<()> {
    let ok = cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    println!(
        "== xtask: cargo-fuzz is missing: installing it with `cargo install cargo-fuzz --locked`"
    );
    let mut c = cargo();
    c.args(["install", "--locked", "cargo-fuzz"]);
    run_cmd("install cargo-fuzz", c)
}

/// A number after `key` in libFuzzer's output (`key` then digits).
fn stat(output: &str, key: &str) -> Option<u64> {
    output.lines().rev().find_map(|l| {
        let rest = l.split(key).nth(1)?;
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    })
}

fn newest_artifact(target: &str) -> Option<PathBuf> {
    let dir = fuzz_dir().join("artifacts").join(target);
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .max()
        .map(|(_, p)| p)
}

/// How each target is run.
struct Plan {
    seconds: u64,
    seed: Option<u64>,
    fresh: bool,
}

fn fuzz_one(target: &str, plan: &Plan) -> Result<Outcome> {
    let seconds = plan.seconds;
    let work = if plan.fresh {
        let w = fuzz_dir().join("target").join("fresh-corpus").join(target);
        if w.exists() {
            std::fs::remove_dir_all(&w).with_context(|| format!("emptying {}", w.display()))?;
        }
        w
    } else {
        fuzz_dir().join("target").join("corpus").join(target)
    };
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let seeds = fuzz_dir().join("corpus").join(target);
    let mut c = cargo();
    c.current_dir(fuzz_dir());
    c.args(["fuzz", "run", "-s", "none", "-a", target]);
    c.arg(&work);
    if seeds.is_dir() {
        c.arg(&seeds);
    }
    c.args([
        "--".to_string(),
        format!("-max_total_time={seconds}"),
        "-timeout=10".to_string(),
        "-rss_limit_mb=2048".to_string(),
        "-print_final_stats=1".to_string(),
    ]);
    if let Some(seed) = plan.seed {
        c.arg(format!("-seed={seed}"));
    }
    println!(
        "== xtask: fuzz {target} for {seconds} s{}{}",
        plan.seed.map(|s| format!(", seed {s}")).unwrap_or_default(),
        if plan.fresh {
            ", from the committed seeds only"
        } else {
            ""
        }
    );
    let started = Instant::now();
    let out = c
        .output()
        .with_context(|| format!("could not start `{c:?}`"))?;
    let seconds = started.elapsed().as_secs_f64();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let runs = stat(&text, "stat::number_of_executed_units:")
        .or_else(|| stat(&text, "Done"))
        .unwrap_or(0);
    if out.status.success() {
        return Ok(Outcome {
            target: target.to_string(),
            runs,
            seconds,
            ok: true,
            note: String::new(),
        });
    }
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    for l in tail.iter().rev() {
        eprintln!("  | {l}");
    }
    let note = match newest_artifact(target) {
        Some(p) => format!(
            "crash input {}: copy it to fuzz/regressions/{target}/ and fix the bug",
            p.display()
        ),
        None => format!("cargo fuzz failed ({})", out.status),
    };
    Ok(Outcome {
        target: target.to_string(),
        runs,
        seconds,
        ok: false,
        note,
    })
}

fn build(dir: &Path) -> Result<()> {
    let mut c = cargo();
    c.current_dir(dir);
    c.args(["fuzz", "build", "-s", "none", "-a"]);
    run_cmd("cargo fuzz build -s none -a", c)
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    let mut seconds = 60u64;
    let mut seed = None;
    let mut fresh = false;
    let mut only: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .context("--seconds needs a number")?
                    .parse()
                    .context("--seconds needs a number")?;
            }
            "--target" => only.push(it.next().context("--target needs a name")?.clone()),
            "--seed" => {
                seed = Some(
                    it.next()
                        .context("--seed needs a number")?
                        .parse()
                        .context("--seed needs a number")?,
                );
            }
            "--fresh" => fresh = true,
            "--list" => {
                for t in targets()? {
                    println!("{t}");
                }
                return Ok(());
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument `{other}`\n\n{USAGE}"),
        }
    }
    let all = targets()?;
    for t in &only {
        if !all.contains(t) {
            bail!("no fuzz target `{t}` (targets: {})", all.join(", "));
        }
    }
    let chosen: Vec<String> = if only.is_empty() { all } else { only };
    ensure_cargo_fuzz()?;
    build(&fuzz_dir())?;
    let plan = Plan {
        seconds,
        seed,
        fresh,
    };
    let mut outcomes = Vec::new();
    for t in &chosen {
        outcomes.push(fuzz_one(t, &plan)?);
    }
    println!("\n== xtask: fuzz summary ({seconds} s per target, -s none)");
    println!(
        "  {:<18} {:>12} {:>9} {:>10}  result",
        "target", "executions", "seconds", "exec/s"
    );
    for o in &outcomes {
        println!(
            "  {:<18} {:>12} {:>9.1} {:>10.0}  {}",
            o.target,
            o.runs,
            o.seconds,
            o.runs as f64 / o.seconds.max(0.001),
            if o.ok {
                "ok".to_string()
            } else {
                format!("CRASH: {}", o.note)
            }
        );
    }
    let crashed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!("fuzz targets crashed: {}", crashed.join(", "));
    }
    Ok(())
}
