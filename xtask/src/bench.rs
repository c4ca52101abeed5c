//! `cargo xtask bench [--quick] [criterion args]`: the benchmarks of
//! `crates/vfio-bench` (criterion), then their summary table, printed and
//! written as JSON to `<target>/vfio-bench/summary.json`.

use anyhow::Result;
use std::path::PathBuf;

use crate::{cargo, root, run_cmd};

const USAGE: &str = "\
cargo xtask bench [--quick] [CRITERION ARGS]

  --quick   short criterion runs and smaller summary loops (under two minutes)
  Anything else goes to criterion (e.g. a benchmark name filter).
  The summary table is printed at the end and written to
  <target>/vfio-bench/summary.json.";

/// The target directory cargo uses.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

pub(crate) fn run(args: &[String]) -> Result<()> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return Ok(());
    }
    let json = target_dir().join("vfio-bench").join("summary.json");
    let mut c = cargo();
    c.args([
        "bench",
        "--locked",
        "-p",
        "vfio-bench",
        "--bench",
        "vfio",
        "--",
    ]);
    c.args(args);
    c.env("VFIO_BENCH_JSON", &json);
    let started = std::time::Instant::now();
    run_cmd("cargo bench -p vfio-bench", c)?;
    println!(
        "== xtask: bench done in {:.0} s; summary JSON: {}",
        started.elapsed().as_secs_f64(),
        json.display()
    );
    Ok(())
}
