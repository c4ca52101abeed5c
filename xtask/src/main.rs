//! The project's task runner. `cargo xtask help` lists the tasks.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

mod bench;
mod fuzz;
mod hwtest;
mod interop;

const HELP: &str = "\
cargo xtask <task>

Tasks:
  test      fmt check, clippy (-D warnings), cargo deny (bans licenses sources),
            cargo check for aarch64, then every test in the workspace.
            Installs cargo-deny and the aarch64 standard library if missing.
  hwtest    the kernel backend against real vfio-pci:
            --device <BDF> on a host, or --qemu [--kernel 6.1|6.12|custom] in a QEMU guest
            (custom: a kernel with iommufd, cdev and no-IOMMU, three modes)
  interop   our `vfio-passthrough serve-fake` under QEMU 11.1's vfio-user-pci and a Debian
            guest kernel, each fake profile (QEMU from a trixie chroot under target/interop/)
  bench     criterion benchmarks + summary table (also target/vfio-bench/summary.json);
            --quick: the same table in under two minutes
  fuzz      each cargo-fuzz target in fuzz/ for --seconds N (default 60);
            installs cargo-fuzz if missing
  help      this text
";

fn main() {
    if let Err(e) = run() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_else(|| "help".to_string());
    let rest: Vec<String> = args.collect();
    match task.as_str() {
        "test" => test(&rest),
        "hwtest" => hwtest::run(&rest),
        "interop" => interop::run(&rest),
        "bench" => bench::run(&rest),
        "fuzz" => fuzz::run(&rest),
        "help" | "--help" | "-h" => {
            print!("{HELP}");
            Ok(())
        }
        other => bail!("unknown task `{other}`\n\n{HELP}"),
    }
}

/// The workspace root (the parent of this crate's manifest directory).
pub(crate) fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).unwrap_or(manifest)
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()));
    c.current_dir(root());
    c
}

/// Runs a command, echoing it first; fails with the command line if it fails.
pub(crate) fn run_cmd(step: &str, mut cmd: Command) -> Result<()> {
    println!("== xtask: {step}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{cmd:?}`"))?;
    if !status.success() {
        bail!("step `{step}` failed ({status}): {cmd:?}");
    }
    Ok(())
}

/// True when `cargo <sub> --version` runs.
fn has_cargo_tool(sub: &str) -> bool {
    cargo()
        .args([sub, "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Installs a cargo tool with `cargo install --locked` when it is missing.
fn ensure_cargo_tool(sub: &str, krate: &str) -> Result<()> {
    if has_cargo_tool(sub) {
        return Ok(());
    }
    println!("== xtask: `cargo {sub}` is missing: installing {krate} with `cargo install --locked {krate}`");
    let mut c = cargo();
    c.args(["install", "--locked", krate]);
    run_cmd(&format!("install {krate}"), c)
}

/// The 64-bit Arm target that `cargo xtask test` checks the workspace for.
const AARCH64: &str = "aarch64-unknown-linux-gnu";

/// Adds a Rust target's standard library with rustup when it is missing.
fn ensure_rust_target(target: &str) -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .with_context(|| "could not run `rustup target list --installed`")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == target)
    {
        return Ok(());
    }
    println!("== xtask: the {target} standard library is missing: `rustup target add {target}`");
    let mut c = Command::new("rustup");
    c.args(["target", "add", target]);
    run_cmd(&format!("rustup target add {target}"), c)
}

fn test(rest: &[String]) -> Result<()> {
    let mut c = cargo();
    c.args(["fmt", "--all", "--check"]);
    run_cmd("cargo fmt --check", c)?;

    let mut c = cargo();
    c.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--all-features",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]);
    run_cmd(
        "cargo clippy --workspace --all-targets --all-features -- -D warnings",
        c,
    )?;

    ensure_cargo_tool("deny", "cargo-deny")?;
    let mut c = cargo();
    c.args(["deny", "--locked", "check", "bans", "licenses", "sources"]);
    run_cmd("cargo deny check bans licenses sources", c)?;

    // arm64 VMMs depend on these crates too: everything, kvm glue included,
    // must build for aarch64 (nothing may assume x86 or a 4 KiB page).
    ensure_rust_target(AARCH64)?;
    let mut c = cargo();
    c.args([
        "check",
        "--workspace",
        "--all-features",
        "--locked",
        "--target",
        AARCH64,
    ]);
    run_cmd(
        &format!("cargo check --workspace --all-features --target {AARCH64}"),
        c,
    )?;

    let mut c = cargo();
    // --all-features: the kvm glue (tested against /dev/kvm, skipped
    // without it) and the iommufd backend are part of what we ship.
    c.args(["test", "--workspace", "--all-features", "--locked"]);
    c.args(rest);
    run_cmd("cargo test --workspace", c)?;
    Ok(())
}
