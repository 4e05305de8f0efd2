//! `cargo xtask bench`: set-up, release build of `semantic`, then the benchmarks of
//! `xtask/src/bench/` over HTTP on 127.0.0.1 (see docs/benchmarks.md).

use anyhow::Result;

use crate::setup::{self, SetupArgs};
use crate::util::{self, log, step};

#[path = "../bench/mod.rs"]
pub(crate) mod bench_impl;

use bench_impl::{peers, report, Ctx, Scenario};

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Set-up options.
    #[command(flatten)]
    pub setup: SetupArgs,
    /// Which benchmark to run.
    #[arg(value_enum, default_value_t = Scenario::All)]
    pub scenario: Scenario,
    /// Also run `ttft` and `agents` against llama.cpp's llama-server and mlx-lm's server
    /// (and `engine` against llama-bench), installed into `.peers/` on first use (a
    /// llama.cpp build of about 6 minutes on 2 cores, once).
    #[arg(long)]
    pub peers: bool,
    /// Runs per figure (each figure is the median of the runs, with min and max) [default: 3].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=100))]
    pub runs: Option<u16>,
    /// Shorter: `ttft` at 512 and 1,024 tokens only, 3 runs (unless --runs says otherwise).
    #[arg(long)]
    pub quick: bool,
    /// `engine`: also run the engine crate's own example (cargo run --example bench).
    #[arg(long)]
    pub engine_example: bool,
    /// Do not touch docs/benchmarks.md and docs/img/ (results still go to bench-results/).
    #[arg(long)]
    pub no_docs: bool,
}

/// Set up, build the release binary, run the chosen scenarios.
pub fn run(args: &Args) -> Result<()> {
    let prepared = setup::run(&args.setup)?;
    let binary = super::serve::build_release_binary("bench", &prepared)?;
    let model = match &prepared.model {
        Some(m) => m.clone(),
        None => setup::model::default_model_path()?,
    };
    let peers = if args.peers {
        Some(step(
            "bench",
            "install the peers into .peers/",
            "see the error above; delete the peer's folder under .peers/ to start it over",
            || peers::ensure(&model),
        )?)
    } else {
        None
    };
    let runs = usize::from(args.runs.unwrap_or(3));
    if runs < 3 {
        log(
            "bench",
            "warning: fewer than 3 runs per figure; the medians are not robust",
        );
    }
    let (date, stamp) = report::now_stamps();
    let results = util::workspace_root().join("bench-results");
    let command = std::iter::once("cargo xtask".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let ctx = Ctx {
        runs,
        quick: args.quick,
        binary,
        model,
        work: results.join(format!("work-{stamp}")),
        results,
        date,
        stamp,
        command,
        machine: report::Machine::detect(),
        peers,
        cargo_config: prepared.cargo_config_args(),
        engine_example: args.engine_example,
        write_docs: !args.no_docs,
    };
    log("bench", format_args!("machine: {}", ctx.machine.describe()));
    bench_impl::run(&ctx, &args.scenario.expand())
}
