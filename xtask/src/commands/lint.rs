//! `cargo xtask lint`: formatting, clippy with warnings denied, and cargo-deny.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Result};

use crate::setup::{self, SetupArgs};
use crate::util::{self, log, step};

/// cargo-deny version installed when none is on PATH.
pub const CARGO_DENY_VERSION: &str = "0.20.2";

/// Options of `cargo xtask lint`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Set-up options.
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Also run cargo-deny's advisories check (fetches the RustSec database from GitHub).
    #[arg(long)]
    pub advisories: bool,
}

/// Run the MLX set-up, then fmt, clippy and cargo-deny; report every failure at the end.
pub fn run(args: &Args) -> Result<()> {
    let prepared = setup::prepare(&args.setup, false)?;
    let mut failed = Vec::new();

    let fmt = step(
        "lint",
        "cargo fmt --all --check",
        "run `cargo fmt --all`",
        || util::run(util::cargo_command().args(["fmt", "--all", "--check"])),
    );
    let clippy = step(
        "lint",
        "cargo clippy --workspace --all-targets -- -D warnings",
        "fix the warnings above",
        || {
            let mut cmd = util::cargo_command();
            cmd.args(["clippy", "--workspace", "--all-targets"])
                .args(prepared.cargo_config_args())
                .args(["--", "-D", "warnings"]);
            prepared.apply_env(&mut cmd, false);
            util::run(&mut cmd)
        },
    );
    let deny = step(
        "lint",
        "cargo deny check",
        "fix the findings above, or change the policy in deny.toml with a reason",
        || deny(args.advisories),
    );
    for (name, result) in [("fmt", fmt), ("clippy", clippy), ("cargo deny", deny)] {
        if let Err(err) = result {
            util::report_error(&err);
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    log("lint", "all clean");
    Ok(())
}

/// `cargo deny check licenses bans sources [advisories]` with the root `deny.toml`.
fn deny(advisories: bool) -> Result<()> {
    let tools_bin = util::build_dir().join("tools").join("bin");
    let path = with_tools_on_path(&tools_bin)?;
    let found = Command::new(util::cargo())
        .args(["deny", "--version"])
        .env("PATH", &path)
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        log(
            "lint",
            format_args!(
                "cargo-deny not found; installing {CARGO_DENY_VERSION} into {}",
                tools_bin.display()
            ),
        );
        let root = util::build_dir().join("tools");
        util::run(
            util::cargo_command()
                .args(["install", "--locked", "--quiet"])
                .arg(format!("cargo-deny@{CARGO_DENY_VERSION}"))
                .arg("--root")
                .arg(&root),
        )
        .map_err(|err| {
            err.context(
                "cannot install cargo-deny (needs crates.io); install it yourself with \
                 `cargo install --locked cargo-deny` or put it on PATH",
            )
        })?;
    }
    // The policy is `deny.toml` at the workspace root (cargo-deny's default).
    let mut cmd = util::cargo_command();
    cmd.env("PATH", &path).args([
        "deny",
        "--workspace",
        "check",
        "licenses",
        "bans",
        "sources",
    ]);
    if advisories {
        cmd.arg("advisories");
    }
    util::run(&mut cmd)
}

/// PATH with `dir` in front, so `cargo deny` finds a cargo-deny installed there.
fn with_tools_on_path(dir: &std::path::Path) -> Result<OsString> {
    let mut dirs: Vec<PathBuf> = vec![dir.to_path_buf()];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    Ok(std::env::join_paths(dirs)?)
}
