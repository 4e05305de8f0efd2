//! `cargo xtask golden`: regenerates the engine's golden fixtures with the Python reference
//! (mlx-lm on MLX's CPU backend, versions pinned in the script), then runs the Rust test that
//! compares the engine against them.

use crate::util;
use anyhow::Result;
use std::process::Command;

/// Options of `cargo xtask golden`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Arguments for the fixture generator `crates/engine-mlx/scripts/golden.py` (after `--`).
    #[arg(last = true)]
    pub rest: Vec<String>,
}

/// Runs the generator (it makes its own virtual environment under `.semantic-build/`), then
/// the golden test.
pub fn run(args: &Args) -> Result<()> {
    let root = util::workspace_root();
    let script = root.join("crates/engine-mlx/scripts/golden.py");
    util::step(
        "golden",
        "generating fixtures with mlx-lm",
        "needs python3 with venv and PyPI access; rerun `cargo xtask golden`",
        || {
            let mut cmd = Command::new("python3");
            cmd.arg(&script).args(&args.rest).current_dir(&root);
            util::run(&mut cmd)
        },
    )?;
    util::log(
        "golden",
        "fixtures written to crates/engine-mlx/tests/fixtures/golden; run `cargo xtask test -- -p engine-mlx --test golden` to compare",
    );
    Ok(())
}
