//! `cargo xtask build`: set-up (MLX only), then build the workspace with the config.

use anyhow::Result;

use crate::setup::{self, SetupArgs};
use crate::util::{self, step};

/// Options of `cargo xtask build`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Set-up options.
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Build with the release profile.
    #[arg(long)]
    pub release: bool,
    /// Extra arguments for `cargo build` (after `--`), e.g. `-p semantic`.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

/// Run the MLX set-up, then `cargo build --workspace [--release]`.
pub fn run(args: &Args) -> Result<()> {
    let prepared = setup::prepare(&args.setup, false)?;
    step(
        "build",
        "cargo build",
        "the compiler errors are above",
        || {
            let mut cmd = util::cargo_command();
            cmd.arg("build");
            // `--workspace` unless packages were chosen (cargo build's default targets).
            if super::test::default_selection(&args.cargo_args).contains(&"--workspace") {
                cmd.arg("--workspace");
            }
            if args.release {
                cmd.arg("--release");
            }
            cmd.args(prepared.cargo_config_args())
                .args(&args.cargo_args);
            prepared.apply_env(&mut cmd, false);
            util::run(&mut cmd)
        },
    )
}
