//! `cargo xtask setup`: make this machine able to build, test and serve.
//!
//! * **MLX.** On macOS there is nothing to do: mlx-sys's own build script builds MLX with
//!   Metal. On Linux mlx-sys 0.7 cannot build as published (its build.rs is macOS-only),
//!   so [`mlx_linux`] builds what it needs from the `mlx-cpu` wheel and writes a Cargo
//!   *build-script override* for `links = "mlx"` into
//!   `.semantic-build/mlx-linux/cargo-config.toml`. The other commands pass that file with
//!   `cargo --config` (and export its path as `SEMANTIC_MLX_CARGO_CONFIG`).
//! * **The default model**, see [`model`].
//!
//! Why a generated config rather than a committed one: the override holds absolute paths
//! of this machine (the checkout, the wheel, the generated bindings), which differ per
//! machine and per clone, and it must only apply on Linux; a committed
//! `.cargo/config.toml` entry would break macOS builds and every other checkout location.
//! Generating it per machine, next to the artefacts it points at, keeps one ignored
//! folder as the single place to delete for a clean slate.

// Compiled on every OS (and chosen at run time) so that every platform's build checks
// all of the code, with no dead-code warnings on any of them.
mod mlx_linux;
pub mod model;
mod packages;
pub mod real_models;
pub mod replicas;

use std::ffi::OsString;
use std::fs::{self, File, TryLockError};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, Result};

use crate::util::{self, log};

/// Options of the set-up, shared by every command that runs it.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    /// BLAS/LAPACK for MLX on Linux: Debian's OpenBLAS (about 10x faster f32 matmul) or
    /// the reference BLAS bundled in the mlx-cpu wheel.
    #[arg(long, value_enum, env = "SEMANTIC_MLX_BLAS", default_value_t = Blas::Openblas)]
    pub blas: Blas,
    /// Redo every set-up step even when the stamps say it is up to date.
    #[arg(long)]
    pub force: bool,
}

/// Which BLAS/LAPACK the wheel's libmlx.so loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Blas {
    /// Debian's libopenblas0-pthread.
    Openblas,
    /// The Netlib reference BLAS/LAPACK shipped in the wheel.
    Reference,
}

impl Blas {
    /// The name recorded in the stamp and shown in messages.
    pub fn name(self) -> &'static str {
        match self {
            Blas::Openblas => "openblas",
            Blas::Reference => "reference",
        }
    }
}

/// What the set-up produced, for the commands that run cargo or tests afterwards.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// The generated cargo config to pass with `--config` (Linux only).
    pub cargo_config: Option<PathBuf>,
    /// The directory of the wheel's libmlx.so (Linux only), for LD_LIBRARY_PATH when an
    /// environment RUSTFLAGS hides the config's rpath.
    pub mlx_lib_dir: Option<PathBuf>,
    /// The installed default model, when it was asked for.
    pub model: Option<PathBuf>,
    /// Real models installed for the tests: (variable the tests read, path).
    pub real_models: Vec<(&'static str, PathBuf)>,
}

impl Prepared {
    /// `["--config", <path>]`, or nothing where no config is needed (macOS).
    pub fn cargo_config_args(&self) -> Vec<OsString> {
        match &self.cargo_config {
            Some(path) => vec!["--config".into(), path.into()],
            None => Vec::new(),
        }
    }

    /// Export the set-up's results to a child process: `SEMANTIC_MLX_CARGO_CONFIG` and,
    /// with `for_tests`, `SEMANTIC_TEST_MODEL`. `SEMANTIC_HOME` is inherited as is.
    ///
    /// An environment RUSTFLAGS replaces the config's rustflags (and so its rpath); then
    /// libmlx.so's directory is added to LD_LIBRARY_PATH instead.
    pub fn apply_env(&self, cmd: &mut Command, for_tests: bool) {
        if let Some(config) = &self.cargo_config {
            cmd.env("SEMANTIC_MLX_CARGO_CONFIG", config);
        }
        let env_rustflags = ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "RUSTDOCFLAGS"]
            .iter()
            .any(|var| std::env::var_os(var).is_some());
        if let (true, Some(dir)) = (env_rustflags, &self.mlx_lib_dir) {
            let mut dirs = vec![dir.clone()];
            if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
                dirs.extend(std::env::split_paths(&old));
            }
            if let Ok(joined) = std::env::join_paths(dirs) {
                cmd.env("LD_LIBRARY_PATH", joined);
            }
        }
        if let (true, Some(model)) = (for_tests, &self.model) {
            cmd.env("SEMANTIC_TEST_MODEL", model);
        }
        if for_tests {
            for (var, path) in &self.real_models {
                cmd.env(var, path);
            }
        }
    }
}

/// Run the whole set-up (MLX and the default model).
pub fn run(args: &SetupArgs) -> Result<Prepared> {
    prepare(args, true)
}

/// Run the set-up; `with_model` also fetches the default model.
pub fn prepare(args: &SetupArgs, with_model: bool) -> Result<Prepared> {
    let started = Instant::now();
    let build_dir = util::build_dir();
    fs::create_dir_all(&build_dir)
        .with_context(|| format!("cannot create {}", build_dir.display()))?;
    let _lock = lock(&build_dir.join("setup.lock"))?;

    let (cargo_config, mlx_lib_dir) = mlx(args, &build_dir)?.unzip();
    let model = if with_model {
        Some(model::ensure(&build_dir)?)
    } else {
        None
    };

    if let Some(config) = &cargo_config {
        log("setup", format_args!("cargo config: {}", config.display()));
    }
    if let Some(model) = &model {
        log("setup", format_args!("default model: {}", model.display()));
    }
    log(
        "setup",
        format_args!("ready in {:.1}s", started.elapsed().as_secs_f64()),
    );
    Ok(Prepared {
        cargo_config,
        mlx_lib_dir,
        model,
        real_models: Vec::new(),
    })
}

/// Hold an exclusive lock on `path` so two set-ups never build into the same folder.
fn lock(path: &std::path::Path) -> Result<File> {
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open the set-up lock {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            log(
                "setup",
                "waiting for another `cargo xtask` set-up to finish...",
            );
            file.lock()
                .with_context(|| format!("cannot lock {}", path.display()))?;
        }
        Err(TryLockError::Error(err)) => {
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
    }
    Ok(file)
}

/// The MLX part of the set-up for this OS: the cargo config and libmlx.so's directory.
fn mlx(args: &SetupArgs, build_dir: &std::path::Path) -> Result<Option<(PathBuf, PathBuf)>> {
    match std::env::consts::OS {
        "linux" => {
            if ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"]
                .iter()
                .any(|var| std::env::var_os(var).is_some())
            {
                log(
                    "setup",
                    "warning: RUSTFLAGS is set, which replaces the generated config's rpath; \
                     child processes get LD_LIBRARY_PATH instead",
                );
            }
            mlx_linux::ensure(args, build_dir).map(Some)
        }
        "macos" => {
            log(
                "setup",
                "macOS: nothing to build for MLX (mlx-sys builds MLX with Metal itself); \
                 no cargo config override is written",
            );
            Ok(None)
        }
        other => anyhow::bail!("MLX is supported on macOS and Linux only; this is {other}"),
    }
}
