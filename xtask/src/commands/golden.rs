//! `cargo xtask golden`: golden-output fixtures (not implemented yet).

use anyhow::{bail, Result};

/// Options of `cargo xtask golden`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Arguments for the fixture generator (after `--`).
    #[arg(last = true)]
    pub rest: Vec<String>,
}

/// Not implemented yet: fails.
pub fn run(_args: &Args) -> Result<()> {
    bail!("`cargo xtask golden` is not implemented yet")
}
