//! `cargo xtask bench`: benchmarks (not implemented yet).

use anyhow::{bail, Result};

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Arguments for the benchmarks (after `--`).
    #[arg(last = true)]
    pub rest: Vec<String>,
}

/// Not implemented yet: fails.
pub fn run(_args: &Args) -> Result<()> {
    bail!("`cargo xtask bench` is not implemented yet")
}
