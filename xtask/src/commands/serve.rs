//! `cargo xtask serve`: set-up, release build of `semantic`, then `semantic serve ARGS`.

use std::process::Command;

use anyhow::Result;

use crate::setup::{self, SetupArgs};
use crate::util::{self, log, step};

/// Options of `cargo xtask serve`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Set-up options.
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Arguments for `semantic serve` (after `--`).
    #[arg(last = true)]
    pub serve_args: Vec<String>,
}

/// Run the set-up, build `semantic` in release mode and replace this process with it.
pub fn run(args: &Args) -> Result<()> {
    let prepared = setup::run(&args.setup)?;
    let binary = build_release_binary("serve", &prepared)?;
    let mut cmd = Command::new(&binary);
    cmd.arg("serve").args(&args.serve_args);
    prepared.apply_env(&mut cmd, false);
    log("serve", format_args!("$ {}", util::display_command(&cmd)));
    exec(cmd)
}

#[cfg(unix)]
fn exec(mut cmd: Command) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    // Only returns on failure; on success the server replaces xtask (signals go to it).
    let err = cmd.exec();
    Err(anyhow::Error::new(err).context(format!(
        "cannot start {}",
        cmd.get_program().to_string_lossy()
    )))
}

#[cfg(not(unix))]
fn exec(mut cmd: Command) -> Result<()> {
    util::run(&mut cmd)
}

/// Builds the release `semantic` binary with the set-up's cargo configuration and returns its
/// path (shared by `serve` and `bench`).
pub fn build_release_binary(tag: &str, prepared: &setup::Prepared) -> Result<std::path::PathBuf> {
    step(
        tag,
        "cargo build --release -p semantic",
        "the compiler errors are above",
        || {
            let mut cmd = util::cargo_command();
            cmd.args(["build", "--release", "-p", "semantic"])
                .args(prepared.cargo_config_args());
            prepared.apply_env(&mut cmd, false);
            util::run(&mut cmd)
        },
    )?;
    let target = util::target_dir(&util::cargo_metadata(true, None)?)?;
    Ok(target
        .join("release")
        .join(format!("semantic{}", std::env::consts::EXE_SUFFIX)))
}
