//! `cargo xtask hwtest`: the kernel backend against real vfio-pci.

use anyhow::{bail, Result};

/// Entry point of `cargo xtask hwtest`.
pub fn run(args: &[String]) -> Result<()> {
    bail!("hwtest is not written yet (args: {args:?})")
}
