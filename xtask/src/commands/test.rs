//! `cargo xtask test`: set-up, then every test of the workspace.

use anyhow::Result;

use crate::setup::{self, SetupArgs};
use crate::util::{self, step};

/// Options of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Set-up options.
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Extra arguments for `cargo test` (after `--`); the doc-test run is then skipped.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

/// Run the set-up, then `cargo test --workspace --all-targets` and the doc tests.
pub fn run(args: &Args) -> Result<()> {
    let prepared = setup::run(&args.setup)?;
    step(
        "test",
        "cargo test --workspace --all-targets",
        "the failing tests are listed above",
        || {
            let mut cmd = util::cargo_command();
            cmd.args(["test", "--workspace", "--all-targets"])
                .args(prepared.cargo_config_args())
                .args(&args.cargo_args);
            prepared.apply_env(&mut cmd, true);
            util::run(&mut cmd)
        },
    )?;
    if !args.cargo_args.is_empty() {
        return Ok(());
    }
    // `--all-targets` does not include doc tests.
    step(
        "test",
        "cargo test --workspace --doc",
        "the failing doc tests are listed above",
        || {
            let mut cmd = util::cargo_command();
            cmd.args(["test", "--workspace", "--doc"])
                .args(prepared.cargo_config_args());
            prepared.apply_env(&mut cmd, true);
            util::run(&mut cmd)
        },
    )
}
