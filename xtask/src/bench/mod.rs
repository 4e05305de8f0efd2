//! `cargo xtask bench`: benchmarks of the release binary over HTTP, optionally side by side
//! with peers (llama.cpp's llama-server, mlx-lm's server) installed into `.peers/`.
//!
//! Every scenario starts its own servers on 127.0.0.1 (free ports), with a fresh cache
//! directory under `bench-results/work-<stamp>/`, and stops them on every path (a
//! [`server::Server`] kills its process when dropped). Results go to
//! `bench-results/<scenario>-<stamp>.json` and to the scenario's marked section of
//! `docs/benchmarks.md`; see that document for what each scenario measures.

pub mod agents;
pub mod batch;
pub mod chart;
pub mod client;
pub mod engine;
pub mod peers;
pub mod prompts;
pub mod replicas;
pub mod report;
pub mod server;
pub mod sse;
pub mod stats;
pub mod store;
pub mod ttft;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::util::{self, log};
use server::{IdleProbe, Spec};

/// The benchmark scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Prefill and decode tokens/s of the engine (over HTTP), next to llama-bench.
    Engine,
    /// Restore throughput of a 4,096-token cache from disk vs a plain read.
    Store,
    /// TTFT cold / warm from RAM / warm from disk by context length, with floors.
    Ttft,
    /// Four agents, six turns each, a restart after turn 3.
    Agents,
    /// Aggregate decode tokens/s at 1, 2, 4, 8 concurrent requests; TTFT under a prefill.
    Batch,
    /// Four agents over two replicas behind nginx sharing an S3 bucket; one replica killed
    /// after turn 3: the moved agents' TTFT vs a cold prefill, restore MB/s vs plain GETs.
    Replicas,
    /// Every scenario above, in that order.
    All,
}

impl Scenario {
    /// The scenarios `self` stands for.
    pub fn expand(self) -> Vec<Scenario> {
        match self {
            Scenario::All => vec![
                Scenario::Engine,
                Scenario::Store,
                Scenario::Ttft,
                Scenario::Agents,
                Scenario::Batch,
                Scenario::Replicas,
            ],
            one => vec![one],
        }
    }

    /// The name used in files and markers.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Engine => "engine",
            Scenario::Store => "store",
            Scenario::Ttft => "ttft",
            Scenario::Agents => "agents",
            Scenario::Batch => "batch",
            Scenario::Replicas => "replicas",
            Scenario::All => "all",
        }
    }
}

/// Which server a measurement ran against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Target {
    /// This project's `semantic` binary.
    #[serde(rename = "semantic")]
    Ours,
    /// llama.cpp's llama-server.
    #[serde(rename = "llama.cpp")]
    LlamaCpp,
    /// mlx-lm's server.
    #[serde(rename = "mlx-lm")]
    MlxLm,
}

impl Target {
    /// Label in tables.
    pub fn label(self) -> &'static str {
        match self {
            Target::Ours => "semantic",
            Target::LlamaCpp => "llama.cpp",
            Target::MlxLm => "mlx-lm",
        }
    }

    /// Whether any of its cache survives a restart (semantic by itself, llama.cpp through
    /// its slot files). mlx-lm keeps its prompt cache in memory only: its first turn after a
    /// restart prefills the whole conversation, so `ttft` does not spend minutes measuring
    /// that cold prefill again.
    pub fn keeps_cache_across_restart(self) -> bool {
        !matches!(self, Target::MlxLm)
    }
}

/// Everything the scenarios share.
#[derive(Debug)]
pub struct Ctx {
    /// Runs per figure (≥ 3 unless asked otherwise).
    pub runs: usize,
    /// Shorter variant (ttft: 512 and 1,024 only).
    pub quick: bool,
    /// The release `semantic` binary.
    pub binary: PathBuf,
    /// The model file (GGUF).
    pub model: PathBuf,
    /// `bench-results/`.
    pub results: PathBuf,
    /// `bench-results/work-<stamp>/`: cache directories and server logs.
    pub work: PathBuf,
    /// UTC date and time of this invocation (ISO 8601).
    pub date: String,
    /// The same as a file-name stamp.
    pub stamp: String,
    /// The command line as typed.
    pub command: String,
    /// The machine.
    pub machine: report::Machine,
    /// Installed peers (with `--peers`).
    pub peers: Option<peers::Installed>,
    /// The generated cargo config (for the engine example), if any.
    pub cargo_config: Vec<OsString>,
    /// Also run the engine crate's own example (`bench engine`).
    pub engine_example: bool,
    /// Update docs/benchmarks.md and the chart.
    pub write_docs: bool,
}

impl Ctx {
    /// docs/benchmarks.md.
    pub fn doc_path(&self) -> PathBuf {
        util::workspace_root().join("docs").join("benchmarks.md")
    }

    /// A fresh, empty directory under the work directory.
    pub fn fresh_dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.work.join(name);
        util::remove_path(&dir)?;
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }

    /// How to run our server with `cache_dir` and extra settings.
    pub fn ours(&self, cache_dir: &Path, label: &str, env: &[(&str, &str)]) -> Result<Spec> {
        let port = server::free_port()?;
        let mut all_env: Vec<(String, OsString)> = vec![
            ("SEMANTIC_AGENT_CACHE_DIR".into(), cache_dir.into()),
            ("SEMANTIC_SERVER_LOG_LEVEL".into(), "info".into()),
        ];
        for (k, v) in env {
            all_env.push(((*k).to_owned(), (*v).into()));
        }
        Ok(Spec {
            label: "semantic".into(),
            program: self.binary.clone(),
            args: vec![
                "serve".into(),
                "--model".into(),
                self.model.clone().into(),
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                port.to_string().into(),
            ],
            env: all_env,
            port,
            ready_path: "/health/ready".into(),
            model_field: "default".into(),
            idle: IdleProbe::Metrics,
            log: self.work.join("logs").join(format!("semantic-{label}.log")),
        })
    }

    /// How to run a peer (installed with `--peers`).
    pub fn peer(&self, target: Target, label: &str) -> Result<Spec> {
        let installed = self
            .peers
            .as_ref()
            .context("the peers are not installed (pass --peers)")?;
        let port = server::free_port()?;
        let log = self
            .work
            .join("logs")
            .join(format!("{}-{label}.log", target.label()));
        installed.spec(target, &self.model, port, &self.work, log)
    }

    /// Record a scenario's results: JSON file, Markdown printed and written into the doc.
    pub fn publish(
        &self,
        scenario: Scenario,
        json: &serde_json::Value,
        markdown: &str,
    ) -> Result<()> {
        let load = report::load_average();
        let mut json = json.clone();
        if let Some(obj) = json.as_object_mut() {
            obj.insert("load_average_at_end".into(), serde_json::json!(load));
        }
        let path = report::write_json(&self.results, scenario.name(), &self.stamp, &json)?;
        log("bench", format_args!("results: {}", path.display()));
        let body = format!(
            "{markdown}\n_Measured {date} on {machine} (load average 1 / 5 / 15 min at the end: \
             {load}; the machine is shared), with `{command}`: median of {runs} runs unless \
             noted, min–max in parentheses. Raw results: `bench-results/{name}-{stamp}.json`._\n",
            date = self.date,
            machine = self.machine.describe(),
            load = load.as_deref().unwrap_or("unknown"),
            command = self.command,
            runs = self.runs,
            name = scenario.name(),
            stamp = self.stamp,
        );
        println!("\n## {}\n\n{body}", scenario.name());
        if self.write_docs {
            report::update_doc(&self.doc_path(), scenario.name(), &body)?;
            log(
                "bench",
                format_args!(
                    "updated the `{}` section of {}",
                    scenario.name(),
                    self.doc_path().display()
                ),
            );
        }
        Ok(())
    }
}

/// Run the chosen scenarios.
pub fn run(ctx: &Ctx, scenarios: &[Scenario]) -> Result<()> {
    fs::create_dir_all(&ctx.work)
        .with_context(|| format!("cannot create {}", ctx.work.display()))?;
    let mut failed = Vec::new();
    for &scenario in scenarios {
        let result = util::step(
            "bench",
            scenario.name(),
            "see the error above; server logs are under bench-results/work-*/logs",
            || match scenario {
                Scenario::Engine => engine::run(ctx),
                Scenario::Store => store::run(ctx),
                Scenario::Ttft => ttft::run(ctx),
                Scenario::Agents => agents::run(ctx),
                Scenario::Batch => batch::run(ctx),
                Scenario::Replicas => replicas::run(ctx),
                Scenario::All => Ok(()),
            },
        );
        if let Err(err) = result {
            util::report_error(&err);
            failed.push(scenario.name());
        }
    }
    // Cache directories are large; logs are kept.
    if let Ok(entries) = fs::read_dir(&ctx.work) {
        for entry in entries.flatten() {
            if entry.file_name() != "logs" {
                let _ = util::remove_path(&entry.path());
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("benchmarks failed: {}", failed.join(", "));
    }
    Ok(())
}
