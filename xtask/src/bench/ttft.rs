//! `ttft`: time to first token, cold / warm from RAM / warm from disk, by context length.
//!
//! Per run and length L (one agent each): turn 1 is a prompt of exactly L tokens (cold);
//! turn 2 adds turn 1's answer and a short question (warm from RAM); then the server is
//! restarted (same cache directory) and turn 3 adds turn 2's answer and another question
//! (warm from disk). 32 answer tokens, temperature 0. The floor of a warm turn is the TTFT
//! of a cold request whose whole prompt is as long as what the warm turn had to prefill.
//! A server whose cache does not survive a restart (mlx-lm) skips the restart and turn 3.

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::json;

use super::client::{Chat, Message, Streamed};
use super::prompts;
use super::report::{fmt_ratio, fmt_summary, Table};
use super::server::Server;
use super::stats::{median, Summary};
use super::{chart, Ctx, Scenario, Target};
use crate::util::log;

const SYSTEM: &str = "You are a careful assistant. Read the user's text and answer briefly.";
const MAX_TOKENS: u32 = 32;

/// One conversation's prompts (the same for every server).
#[derive(Debug, Clone)]
struct Plan {
    run: usize,
    length: u64,
    turn1: Vec<Message>,
    tokens: u64,
    q2: String,
    q3: String,
}

/// One measured conversation.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    run: usize,
    length: u64,
    /// Turn 1's prompt length as fitted with count_tokens.
    fitted_tokens: u64,
    cold: Streamed,
    warm_ram: Streamed,
    /// `None` for a server whose cache does not survive a restart (not measured).
    warm_disk: Option<Streamed>,
    /// llama.cpp: seconds of the slot restore call before turn 3 (added to its TTFT).
    restore_call_s: Option<f64>,
    floor_ram: Option<Streamed>,
    floor_ram_tokens: Option<u64>,
    floor_disk: Option<Streamed>,
    floor_disk_tokens: Option<u64>,
}

impl Sample {
    fn disk_ttft(&self) -> Option<f64> {
        Some(self.warm_disk.as_ref()?.ttft_s + self.restore_call_s.unwrap_or(0.0))
    }
}

#[derive(Debug, Clone, Serialize)]
struct TargetResult {
    target: Target,
    samples: Vec<Sample>,
    restart_s: Vec<f64>,
}

impl TargetResult {
    fn at(&self, length: u64) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(move |s| s.length == length)
    }
    fn summary(&self, length: u64, f: impl Fn(&Sample) -> Option<f64>) -> Option<Summary> {
        let v: Vec<f64> = self.at(length).filter_map(f).collect();
        Summary::of(&v).map(|s| s.scaled(1000.0))
    }
    fn cold(&self, l: u64) -> Option<Summary> {
        self.summary(l, |s| Some(s.cold.ttft_s))
    }
    fn ram(&self, l: u64) -> Option<Summary> {
        self.summary(l, |s| Some(s.warm_ram.ttft_s))
    }
    fn disk(&self, l: u64) -> Option<Summary> {
        self.summary(l, Sample::disk_ttft)
    }
    fn tokens(&self, l: u64, f: impl Fn(&Sample) -> Option<u64>) -> Option<f64> {
        let v: Vec<f64> = self.at(l).filter_map(|s| f(s).map(|x| x as f64)).collect();
        median(&v)
    }
}

/// Run the scenario (ours, then the peers when installed).
pub fn run(ctx: &Ctx) -> Result<()> {
    let lengths: Vec<u64> = if ctx.quick {
        vec![512, 1024]
    } else {
        vec![512, 1024, 2048, 4096]
    };
    let cache = ctx.fresh_dir("ttft-cache")?;
    let mut ours = Server::start(ctx.ours(&cache, "ttft", &[])?)?;
    let client = ours.client();
    let mut plans = Vec::new();
    for run in 0..ctx.runs {
        for &length in &lengths {
            let seed = 1_000 + run as u64 * 10_000 + length;
            let tag = format!("Document {}-{run}-{length}:", ctx.stamp);
            let (turn1, tokens) =
                prompts::fit(&client, &[Message::system(SYSTEM)], length, seed, &tag)?;
            plans.push(Plan {
                run,
                length,
                turn1,
                tokens,
                q2: format!("Question {run}.{length}: which three words appear most often in the text above?"),
                q3: "Thanks. Now write one short sentence that uses those three words.".into(),
            });
        }
    }
    log(
        "bench",
        format_args!("ttft: {} prompts fitted", plans.len()),
    );
    let mut results = vec![measure(ctx, Target::Ours, &mut ours, &plans)?];
    drop(ours);
    if ctx.peers.is_some() {
        for target in [Target::LlamaCpp, Target::MlxLm] {
            let mut server = Server::start(ctx.peer(target, "ttft")?)?;
            results.push(measure(ctx, target, &mut server, &plans)?);
        }
    }
    let markdown = render(&results, &lengths);
    if ctx.write_docs {
        let path = chart::ttft_path();
        let series = chart_series(&results, &lengths);
        chart::ttft(&path, &series).context("cannot draw the TTFT chart")?;
        log("bench", format_args!("chart: {}", path.display()));
    }
    let json = json!({
        "scenario": "ttft", "date": ctx.date, "command": ctx.command, "machine": ctx.machine,
        "runs": ctx.runs, "lengths": lengths, "max_tokens": MAX_TOKENS, "results": results,
    });
    ctx.publish(Scenario::Ttft, &json, &markdown)
}

fn measure(ctx: &Ctx, target: Target, server: &mut Server, plans: &[Plan]) -> Result<TargetResult> {
    let mut samples = Vec::new();
    let mut restart_s = Vec::new();
    for run in 0..ctx.runs {
        let mine: Vec<(usize, &Plan)> = plans.iter().filter(|p| p.run == run).enumerate().collect();
        let mut convs = Vec::new();
        for &(slot, plan) in &mine {
            let agent = format!(
                "ttft-{}-{}-r{run}-l{}",
                target.label().replace('.', ""),
                ctx.stamp,
                plan.length
            );
            let extra = (target == Target::LlamaCpp)
                .then(|| json!({ "id_slot": slot, "cache_prompt": true }));
            let client = server.client();
            let request = |m| turn(m, &agent, extra.clone());
            let cold = client.chat(&request(&plan.turn1))?;
            let mut turn2 = plan.turn1.clone();
            turn2.push(Message::assistant(cold.content.clone()));
            turn2.push(Message::user(plan.q2.clone()));
            let warm_ram = if target.keeps_cache_across_restart() {
                client.chat(&request(&turn2))?
            } else {
                // No turn 3 follows: the answer is not needed, only the first token.
                server.first_token(&request(&turn2))?
            };
            if target == Target::LlamaCpp {
                client.post_json(
                    &format!("/slots/{slot}?action=save"),
                    &json!({ "filename": format!("ttft-r{run}-s{slot}.bin") }),
                )?;
            }
            log(
                "bench",
                format_args!(
                    "ttft {} run {run} L={}: cold {:.0} ms, warm RAM {:.0} ms",
                    target.label(),
                    plan.length,
                    cold.ttft_s * 1e3,
                    warm_ram.ttft_s * 1e3
                ),
            );
            convs.push((slot, plan, agent, cold, turn2, warm_ram));
        }
        if !target.keeps_cache_across_restart() {
            // Turn 3 would be a cold prefill of the whole conversation: not measured.
            for (_, plan, _, cold, _, warm_ram) in convs {
                samples.push(Sample {
                    run,
                    length: plan.length,
                    fitted_tokens: plan.tokens,
                    cold,
                    warm_ram,
                    warm_disk: None,
                    restore_call_s: None,
                    floor_ram: None,
                    floor_ram_tokens: None,
                    floor_disk: None,
                    floor_disk_tokens: None,
                });
            }
            continue;
        }
        restart_s.push(server.restart()?);
        for (slot, plan, agent, cold, turn2, warm_ram) in convs {
            let client = server.client();
            let restore_call_s = if target == Target::LlamaCpp {
                let t = std::time::Instant::now();
                client.post_json(
                    &format!("/slots/{slot}?action=restore"),
                    &json!({ "filename": format!("ttft-r{run}-s{slot}.bin") }),
                )?;
                Some(t.elapsed().as_secs_f64())
            } else {
                None
            };
            let mut turn3 = turn2;
            turn3.push(Message::assistant(warm_ram.content.clone()));
            turn3.push(Message::user(plan.q3.clone()));
            let extra = (target == Target::LlamaCpp)
                .then(|| json!({ "id_slot": slot, "cache_prompt": true }));
            let turn3_chat = turn(&turn3, &agent, extra);
            // The last turn: ours reports its cache use in a header, so only the first token
            // is awaited; llama.cpp's is in the usage at the end of the stream, so its answer
            // is read to the end.
            let warm_disk = if target == Target::Ours {
                server.first_token(&turn3_chat)?
            } else {
                client.chat(&turn3_chat)?
            };
            log(
                "bench",
                format_args!(
                    "ttft {} run {run} L={}: warm disk {:.0} ms",
                    target.label(),
                    plan.length,
                    (warm_disk.ttft_s + restore_call_s.unwrap_or(0.0)) * 1e3
                ),
            );
            let mut sample = Sample {
                run,
                length: plan.length,
                fitted_tokens: plan.tokens,
                cold,
                warm_ram,
                warm_disk: Some(warm_disk),
                restore_call_s,
                floor_ram: None,
                floor_ram_tokens: None,
                floor_disk: None,
                floor_disk_tokens: None,
            };
            if target == Target::Ours {
                let seed = 500_000 + run as u64 * 10_000 + plan.length;
                if let Some(f) = sample.warm_ram.cache.map(|c| c.prefilled) {
                    let (s, n) = floor(server, f, seed, "Note A:")?;
                    sample.floor_ram = Some(s);
                    sample.floor_ram_tokens = Some(n);
                }
                if let Some(f) = sample
                    .warm_disk
                    .as_ref()
                    .and_then(|w| w.cache)
                    .map(|c| c.prefilled)
                {
                    let (s, n) = floor(server, f, seed + 1, "Note B:")?;
                    sample.floor_disk = Some(s);
                    sample.floor_disk_tokens = Some(n);
                }
            }
            samples.push(sample);
        }
    }
    Ok(TargetResult {
        target,
        samples,
        restart_s,
    })
}

/// One turn of a measured conversation.
fn turn<'a>(messages: &'a [Message], agent: &'a str, extra: Option<serde_json::Value>) -> Chat<'a> {
    Chat {
        messages,
        max_tokens: MAX_TOKENS,
        agent: Some(agent),
        extra,
    }
}

/// A cold request whose prompt is `tokens` long (the prefill + first token a warm turn
/// cannot avoid), on a fresh agent.
fn floor(server: &Server, tokens: u64, seed: u64, tag: &str) -> Result<(Streamed, u64)> {
    let client = server.client();
    let (msgs, n) = prompts::fit(&client, &[Message::system("Be brief.")], tokens, seed, tag)?;
    let agent = format!("floor-{seed}");
    let s = client.chat(&Chat {
        messages: &msgs,
        max_tokens: 1,
        agent: Some(&agent),
        extra: None,
    })?;
    Ok((s, n))
}

fn render(results: &[TargetResult], lengths: &[u64]) -> String {
    let mut md = String::new();
    if let Some(ours) = results.iter().find(|r| r.target == Target::Ours) {
        let mut t = Table::new([
            "prompt tokens",
            "cold ms",
            "warm RAM ms",
            "RAM: prefilled tok",
            "RAM floor ms",
            "warm disk ms",
            "disk: restored / prefilled tok",
            "disk floor ms",
            "cold / warm RAM",
            "cold / warm disk",
        ]);
        for &l in lengths {
            let f = |s: &Sample| s.floor_ram.as_ref().map(|x| x.ttft_s);
            let g = |s: &Sample| s.floor_disk.as_ref().map(|x| x.ttft_s);
            let pre_ram = ours.tokens(l, |s| s.warm_ram.cache.map(|c| c.prefilled));
            let restored = ours.tokens(l, |s| s.warm_disk.as_ref()?.cache.map(|c| c.restored));
            let pre_disk = ours.tokens(l, |s| s.warm_disk.as_ref()?.cache.map(|c| c.prefilled));
            let opt = |x: Option<f64>| x.map_or("–".to_owned(), |v| format!("{v:.0}"));
            t.row([
                l.to_string(),
                fmt_summary(ours.cold(l), 0),
                fmt_summary(ours.ram(l), 0),
                opt(pre_ram),
                fmt_summary(ours.summary(l, f), 0),
                fmt_summary(ours.disk(l), 0),
                format!("{} / {}", opt(restored), opt(pre_disk)),
                fmt_summary(ours.summary(l, g), 0),
                fmt_ratio(
                    ours.cold(l).map(|s| s.median),
                    ours.ram(l).map(|s| s.median),
                ),
                fmt_ratio(
                    ours.cold(l).map(|s| s.median),
                    ours.disk(l).map(|s| s.median),
                ),
            ]);
        }
        md.push_str("**semantic** (TTFT in ms: request sent → first content byte, streaming):\n\n");
        md.push_str(&t.render());
        md.push_str(
            "\n*Floor*: TTFT of a cold request whose whole prompt is as long as what the warm turn \
             prefilled (the new tokens plus the partial last block, which is always recomputed), \
             i.e. the prefill + first token the warm turn cannot avoid (measured at position 0, \
             so it slightly under-states attention over the long context).\n",
        );
    }
    let peers: Vec<&TargetResult> = results
        .iter()
        .filter(|r| r.target != Target::Ours)
        .collect();
    if let (Some(ours), false) = (
        results.iter().find(|r| r.target == Target::Ours),
        peers.is_empty(),
    ) {
        let mut header = vec![
            "prompt tokens".to_owned(),
            "case".to_owned(),
            "semantic ms".to_owned(),
        ];
        for p in &peers {
            header.push(format!("{} ms", p.target.label()));
            header.push(format!("{} / semantic", p.target.label()));
        }
        let mut t = Table::new(header);
        type Getter = fn(&TargetResult, u64) -> Option<Summary>;
        let cases: [(&str, Getter); 3] = [
            ("cold", TargetResult::cold),
            ("warm RAM", TargetResult::ram),
            ("warm disk (after restart)", TargetResult::disk),
        ];
        for &l in lengths {
            for (name, get) in cases {
                let mine = get(ours, l);
                let mut row = vec![l.to_string(), name.to_owned(), fmt_summary(mine, 0)];
                for p in &peers {
                    let disk = name.starts_with("warm disk");
                    if disk && !p.target.keeps_cache_across_restart() {
                        // Not measured: at least its cold prefill of a shorter prompt.
                        let cold = p.cold(l);
                        row.push(format!("≥ {} †", fmt_summary(cold, 0)));
                        row.push(format!(
                            "≥ {}",
                            fmt_ratio(cold.map(|s| s.median), mine.map(|s| s.median))
                        ));
                        continue;
                    }
                    let theirs = get(p, l);
                    row.push(fmt_summary(theirs, 0));
                    row.push(fmt_ratio(theirs.map(|s| s.median), mine.map(|s| s.median)));
                }
                t.row(row);
            }
        }
        md.push_str("\n**Peers**, same prompts and token counts, same machine, same invocation (ratio > 1: semantic is faster):\n\n");
        md.push_str(&t.render());
        md.push_str(
            "\nllama.cpp's *warm disk* is its best manual equivalent: the client saves the slot \
             (`POST /slots/N?action=save`) before the restart and restores it after; the restore \
             call's time is added to its TTFT. † mlx-lm keeps its prompt cache in memory only, \
             so after a restart it prefills the whole conversation (about 120 tokens longer \
             than turn 1) from scratch; that is not measured again, and its cold TTFT of turn \
             1 is shown as a lower bound.\n",
        );
    }
    md
}

fn chart_series(results: &[TargetResult], lengths: &[u64]) -> Vec<chart::Series> {
    let mut series = Vec::new();
    for r in results {
        type Getter = fn(&TargetResult, u64) -> Option<Summary>;
        let cases: [(&str, Getter); 3] = [
            ("cold", TargetResult::cold),
            ("warm RAM", TargetResult::ram),
            ("warm disk", TargetResult::disk),
        ];
        for (i, (name, get)) in cases.into_iter().enumerate() {
            if i == 2 && !r.target.keeps_cache_across_restart() {
                continue;
            }
            let points: Vec<(f64, f64)> = lengths
                .iter()
                .filter_map(|&l| get(r, l).map(|s| (l as f64, s.median)))
                .collect();
            series.push(chart::Series {
                name: format!("{} {name}", r.target.label()),
                target: r.target,
                style: i,
                points,
            });
        }
    }
    series
}
