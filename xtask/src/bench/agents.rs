//! `agents`: four agents, six turns each in round-robin, a server restart after turn 3.
//!
//! Each agent's system prompt is a ~500-token tool description shared by all four followed
//! by ~1,000 tokens of its own; each turn adds ~100 user tokens and asks for 32 answer
//! tokens (the answer goes back into the history, as an agent framework does). Wall time
//! counts the 24 requests only (not the restart).

use std::time::Instant;

use anyhow::Result;
use serde::Serialize;
use serde_json::json;

use super::client::{Chat, Message};
use super::prompts::words;
use super::report::{fmt_ratio, fmt_summary, Table};
use super::server::Server;
use super::stats::{percentile, Summary};
use super::{Ctx, Scenario, Target};
use crate::util::log;

/// Agents.
pub const AGENTS: usize = 4;
/// Turns per agent.
pub const TURNS: usize = 6;
/// The restart comes after this turn.
pub const RESTART_AFTER: usize = 3;
const MAX_TOKENS: u32 = 32;

#[derive(Debug, Clone, Serialize)]
struct Turn {
    agent: usize,
    turn: usize,
    ttft_s: f64,
    total_s: f64,
    prompt: Option<u64>,
    reused: Option<u64>,
    prefilled: Option<u64>,
    tier: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
struct RunResult {
    run: usize,
    wall_s: f64,
    restart_s: f64,
    ttft_p50_s: f64,
    ttft_p95_s: f64,
    reused: Option<u64>,
    prefilled: Option<u64>,
    turns: Vec<Turn>,
}

#[derive(Debug, Clone, Serialize)]
struct TargetResult {
    target: Target,
    runs: Vec<RunResult>,
}

impl TargetResult {
    fn summary(&self, f: impl Fn(&RunResult) -> Option<f64>) -> Option<Summary> {
        let v: Vec<f64> = self.runs.iter().filter_map(f).collect();
        Summary::of(&v)
    }
    /// Median TTFT (ms) of the given turns over every run.
    fn turns_median_ms(&self, turns: &[usize]) -> Option<f64> {
        let v: Vec<f64> = self
            .runs
            .iter()
            .flat_map(|r| r.turns.iter())
            .filter(|t| turns.contains(&t.turn))
            .map(|t| t.ttft_s * 1e3)
            .collect();
        percentile(&v, 50.0)
    }
}

/// The shared tool description (~500 tokens).
fn tools_text() -> String {
    format!(
        "You can call these tools by answering with a JSON object. Tool read_file(path): returns the \
         file. Tool write_file(path, text): writes it. Tool search(query): finds code. Tool run(cmd): \
         runs a command. Tool notes: {}",
        words(42, "", 430)
    )
}

fn system_prompt(agent: usize) -> String {
    format!(
        "{}\n\nYou are agent {agent} of a team. Your own instructions follow. {}",
        tools_text(),
        words(100 + agent as u64, "", 900)
    )
}

fn user_text(run: usize, agent: usize, turn: usize) -> String {
    let _ = run; // the same texts every run: each run starts from an empty cache
    words(
        10_000 + agent as u64 * 100 + turn as u64,
        &format!("Turn {turn} for agent {agent}:"),
        85,
    )
}

/// Run the scenario (ours, then the peers when installed).
pub fn run(ctx: &Ctx) -> Result<()> {
    let mut results = vec![measure(ctx, Target::Ours)?];
    if ctx.peers.is_some() {
        for target in [Target::LlamaCpp, Target::MlxLm] {
            results.push(measure(ctx, target)?);
        }
    }
    let markdown = render(&results);
    let json = json!({
        "scenario": "agents", "date": ctx.date, "command": ctx.command, "machine": ctx.machine,
        "runs": ctx.runs, "agents": AGENTS, "turns": TURNS, "restart_after": RESTART_AFTER,
        "max_tokens": MAX_TOKENS, "results": results,
    });
    ctx.publish(Scenario::Agents, &json, &markdown)
}

fn measure(ctx: &Ctx, target: Target) -> Result<TargetResult> {
    let mut runs = Vec::new();
    for run in 0..ctx.runs {
        // A fresh server (and for ours a fresh cache directory) per run.
        let mut server = match target {
            Target::Ours => {
                let cache = ctx.fresh_dir(&format!("agents-cache-{run}"))?;
                Server::start(ctx.ours(&cache, "agents", &[])?)?
            }
            peer => Server::start(ctx.peer(peer, "agents")?)?,
        };
        let mut histories: Vec<Vec<Message>> = (0..AGENTS)
            .map(|a| vec![Message::system(system_prompt(a))])
            .collect();
        let mut turns = Vec::new();
        let mut wall = 0.0;
        let mut restart_s = 0.0;
        for turn in 1..=TURNS {
            let started = Instant::now();
            for (agent, history) in histories.iter_mut().enumerate() {
                history.push(Message::user(user_text(run, agent, turn)));
                let id = format!(
                    "agent-{}-{}-r{run}-a{agent}",
                    target.label().replace('.', ""),
                    ctx.stamp
                );
                let extra = (target == Target::LlamaCpp)
                    .then(|| json!({ "id_slot": agent, "cache_prompt": true }));
                let s = server.client().chat(&Chat {
                    messages: history,
                    max_tokens: MAX_TOKENS,
                    agent: Some(&id),
                    extra,
                })?;
                history.push(Message::assistant(s.content.clone()));
                turns.push(Turn {
                    agent,
                    turn,
                    ttft_s: s.ttft_s,
                    total_s: s.total_s,
                    prompt: s.tokens.prompt,
                    reused: s.tokens.reused,
                    prefilled: s.tokens.prefilled,
                    tier: s.cache.map(|c| c.tier),
                });
            }
            wall += started.elapsed().as_secs_f64();
            let ms: Vec<String> = turns
                .iter()
                .filter(|t| t.turn == turn)
                .map(|t| format!("{:.0}", t.ttft_s * 1e3))
                .collect();
            log(
                "bench",
                format_args!(
                    "agents {} run {run} turn {turn}: TTFT {} ms",
                    target.label(),
                    ms.join(" / ")
                ),
            );
            if turn == RESTART_AFTER {
                restart_s = server.restart()?;
            }
        }
        let ttfts: Vec<f64> = turns.iter().map(|t| t.ttft_s).collect();
        let sum = |f: fn(&Turn) -> Option<u64>| -> Option<u64> { turns.iter().map(f).sum() };
        let r = RunResult {
            run,
            wall_s: wall,
            restart_s,
            ttft_p50_s: percentile(&ttfts, 50.0).unwrap_or(f64::NAN),
            ttft_p95_s: percentile(&ttfts, 95.0).unwrap_or(f64::NAN),
            reused: sum(|t| t.reused),
            prefilled: sum(|t| t.prefilled),
            turns,
        };
        log(
            "bench",
            format_args!(
                "agents {} run {run}: wall {:.1} s, TTFT p50 {:.0} ms, p95 {:.0} ms",
                target.label(),
                r.wall_s,
                r.ttft_p50_s * 1e3,
                r.ttft_p95_s * 1e3
            ),
        );
        runs.push(r);
    }
    Ok(TargetResult { target, runs })
}

fn render(results: &[TargetResult]) -> String {
    let mut header = vec!["figure".to_owned()];
    for r in results {
        header.push(r.target.label().to_owned());
    }
    let peers: Vec<&TargetResult> = results
        .iter()
        .filter(|r| r.target != Target::Ours)
        .collect();
    for p in &peers {
        header.push(format!("{} / semantic", p.target.label()));
    }
    let mut t = Table::new(header);
    type Fig = (&'static str, usize, fn(&TargetResult) -> Option<Summary>);
    let figures: [Fig; 5] = [
        ("total wall time, s (24 turns)", 1, |r| {
            r.summary(|x| Some(x.wall_s))
        }),
        ("TTFT p50, ms", 0, |r| {
            r.summary(|x| Some(x.ttft_p50_s * 1e3))
        }),
        ("TTFT p95, ms", 0, |r| {
            r.summary(|x| Some(x.ttft_p95_s * 1e3))
        }),
        ("prompt tokens reused (sum of 24 turns)", 0, |r| {
            r.summary(|x| x.reused.map(|v| v as f64))
        }),
        ("prompt tokens prefilled (sum of 24 turns)", 0, |r| {
            r.summary(|x| x.prefilled.map(|v| v as f64))
        }),
    ];
    let ours = results.iter().find(|r| r.target == Target::Ours);
    for (name, decimals, get) in figures {
        let mut row = vec![name.to_owned()];
        for r in results {
            row.push(fmt_summary(get(r), decimals));
        }
        let mine = ours.and_then(get).map(|s| s.median);
        for p in &peers {
            let ratio = if name.starts_with("prompt tokens") {
                "".to_owned()
            } else {
                fmt_ratio(get(p).map(|s| s.median), mine)
            };
            row.push(ratio);
        }
        t.row(row);
    }
    let phases: [(&str, &[usize]); 4] = [
        ("turn 1 (cold, shared tool prefix)", &[1]),
        ("turns 2–3 (warm, RAM)", &[2, 3]),
        ("turn 4 (first after the restart)", &[4]),
        ("turns 5–6", &[5, 6]),
    ];
    for (name, turns) in phases {
        let mut row = vec![format!("TTFT median, {name}, ms")];
        for r in results {
            row.push(
                r.turns_median_ms(turns)
                    .map_or("–".to_owned(), |v| format!("{v:.0}")),
            );
        }
        let mine = ours.and_then(|o| o.turns_median_ms(turns));
        for p in &peers {
            row.push(fmt_ratio(p.turns_median_ms(turns), mine));
        }
        t.row(row);
    }
    let mut md = String::from(
        "4 agents × 6 turns, round-robin, restart after turn 3 (each agent: ~500 shared + ~1,000 \
         own system tokens, ~100 new user tokens and 32 answer tokens per turn):\n\n",
    );
    md.push_str(&t.render());
    md.push_str(
        "\nPer-phase rows pool every run's turns. Reused / prefilled: semantic from its \
         `x-semantic-cache` header, llama.cpp from `timings.cache_n` / `prompt_n`, mlx-lm from \
         `usage.prompt_tokens_details.cached_tokens`. llama.cpp runs one slot per agent \
         (`-np 4`, `id_slot`), without saving slots across the restart; mlx-lm uses its default \
         in-memory prompt cache. A ratio > 1 means semantic is faster.\n",
    );
    md
}
