//! `batch`: aggregate decode tokens/s at 1, 2, 4 and 8 concurrent requests, and the TTFT
//! of a short request while a 4,096-token cold prefill runs, against an idle server. Once
//! the short request is answered, the long request's client hangs up, and the scenario
//! times how soon the server stops (it checks for a client gone after every prefill chunk).
//!
//! The server runs with `SEMANTIC_MLX_MAX_BATCH_SIZE=8`. Each concurrency level sends N
//! streaming requests at once (short prompts that make the model count, 64 answer tokens);
//! the aggregate rate is the number of content pieces received by all streams in the
//! window where all N are decoding (from the last stream's first token to the first
//! stream's last token), over that window.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde::Serialize;
use serde_json::json;

use super::client::{Chat, Client, Message, Streamed};
use super::prompts;
use super::report::{fmt_ratio, fmt_summary, Table};
use super::server::Server;
use super::stats::Summary;
use super::{Ctx, Scenario};
use crate::util::log;

const LEVELS: [usize; 4] = [1, 2, 4, 8];
const DECODE_TOKENS: u32 = 64;

#[derive(Debug, Clone, Serialize)]
struct Level {
    concurrency: usize,
    run: usize,
    /// Pieces per second in the window where every stream decodes.
    steady_tok_s: f64,
    /// All pieces after each stream's first, over first-first to last-last.
    overall_tok_s: f64,
    window_s: f64,
    completion_tokens: Vec<Option<u64>>,
}

#[derive(Debug, Clone, Serialize)]
struct Interference {
    run: usize,
    idle_ttft_s: f64,
    busy_ttft_s: f64,
    /// The long request's first byte, when it came before its client hung up.
    long_ttft_s: Option<f64>,
    /// The short request got its first token before the long prefill ended.
    short_first: bool,
    /// From the long request's hang-up until the server ran no generation.
    stopped_after_s: f64,
}

fn count_prompt(i: usize) -> Vec<Message> {
    // Greedy decoding answers this with a long list: every stream gets its 64 tokens.
    vec![
        Message::system("You are a helpful assistant."),
        Message::user(format!(
            "Request {i}. Write the numbers from 1 to 100, separated by commas."
        )),
    ]
}

fn concurrent(client: &Client, n: usize, offset: usize) -> Result<Vec<Streamed>> {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let client = client.clone();
            let barrier = Arc::clone(&barrier);
            thread::spawn(move || {
                let msgs = count_prompt(offset + i);
                let agent = format!("batch-{}", offset + i);
                barrier.wait();
                client.chat(&Chat {
                    messages: &msgs,
                    max_tokens: DECODE_TOKENS,
                    agent: Some(&agent),
                    extra: None,
                })
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().map_err(|_| anyhow!("a request thread panicked"))?)
        .collect()
}

/// (steady tokens/s, overall tokens/s, window seconds) of concurrent streams.
fn rates(streams: &[Streamed]) -> Option<(f64, f64, f64)> {
    let origin = streams.iter().filter_map(|s| s.sent_at).min()?;
    let abs: Vec<Vec<f64>> = streams
        .iter()
        .map(|s| {
            let off = s
                .sent_at
                .map_or(0.0, |t| t.duration_since(origin).as_secs_f64());
            s.pieces_s.iter().map(|p| p + off).collect()
        })
        .collect();
    let firsts: Vec<f64> = abs.iter().filter_map(|v| v.first().copied()).collect();
    let lasts: Vec<f64> = abs.iter().filter_map(|v| v.last().copied()).collect();
    if firsts.len() != streams.len() {
        return None;
    }
    let start = firsts.iter().copied().fold(f64::MIN, f64::max);
    let end = lasts.iter().copied().fold(f64::MAX, f64::min);
    let first_any = firsts.iter().copied().fold(f64::MAX, f64::min);
    let last_any = lasts.iter().copied().fold(f64::MIN, f64::max);
    let after_first: usize = abs.iter().map(|v| v.len().saturating_sub(1)).sum();
    let overall = after_first as f64 / (last_any - first_any);
    let window = end - start;
    let steady = if window > 0.2 {
        abs.iter()
            .flatten()
            .filter(|&&t| t > start && t <= end)
            .count() as f64
            / window
    } else {
        overall
    };
    Some((steady, overall, window))
}

/// Run the scenario.
pub fn run(ctx: &Ctx) -> Result<()> {
    let cache = ctx.fresh_dir("batch-cache")?;
    let server =
        Server::start(ctx.ours(&cache, "batch", &[("SEMANTIC_MLX_MAX_BATCH_SIZE", "8")])?)?;
    let client = server.client();
    let mut levels = Vec::new();
    let mut offset = 0;
    for &n in &LEVELS {
        for run in 0..ctx.runs {
            let streams = concurrent(&client, n, offset)?;
            offset += n;
            let (steady, overall, window) = rates(&streams)
                .ok_or_else(|| anyhow!("a stream of the batch of {n} produced no content"))?;
            log("bench", format_args!("batch {n} run {run}: {steady:.1} tok/s (window {window:.2} s), overall {overall:.1}"));
            levels.push(Level {
                concurrency: n,
                run,
                steady_tok_s: steady,
                overall_tok_s: overall,
                window_s: window,
                completion_tokens: streams.iter().map(|s| s.tokens.completion).collect(),
            });
        }
    }

    // TTFT of a short request: idle, and while a 4K-token cold prompt is prefilled.
    let short = |i: usize| {
        vec![
            Message::system("You are a helpful assistant."),
            Message::user(format!(
                "Request {i}: what is {i} plus {i}? Answer with the number."
            )),
        ]
    };
    let mut inter = Vec::new();
    for run in 0..ctx.runs {
        let idle = client.chat(&Chat {
            messages: &short(1000 + run),
            max_tokens: 8,
            agent: Some(&format!("idle-{run}")),
            extra: None,
        })?;
        let (long_msgs, _) = prompts::fit(
            &client,
            &[Message::system("You are a careful assistant.")],
            4096,
            9_000 + run as u64,
            &format!("Long {}-{run}:", ctx.stamp),
        )?;
        let long_client = client.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_long = stop.clone();
        let long = thread::spawn(move || {
            long_client.chat_until(
                &Chat {
                    messages: &long_msgs,
                    max_tokens: 1,
                    agent: Some(&format!("long-{run}")),
                    extra: None,
                },
                &stop_long,
            )
        });
        // Let the long prefill start (a few chunks in).
        thread::sleep(Duration::from_millis(1500));
        let busy_sent = Instant::now();
        let busy = client.chat(&Chat {
            messages: &short(2000 + run),
            max_tokens: 8,
            agent: Some(&format!("busy-{run}")),
            extra: None,
        })?;
        let busy_first = busy_sent + Duration::from_secs_f64(busy.ttft_s);
        // The short request is answered: the long one's client hangs up, and the server
        // stops its prefill (within a chunk) instead of finishing it.
        stop.store(true, Ordering::Release);
        let hung_up = Instant::now();
        let (long_sent, long_ttft) = long
            .join()
            .map_err(|_| anyhow!("the long request's thread panicked"))??;
        let stopped_after_s = server.wait_idle()?.duration_since(hung_up).as_secs_f64();
        let long_first = long_ttft.map(|t| long_sent + Duration::from_secs_f64(t));
        let i = Interference {
            run,
            idle_ttft_s: idle.ttft_s,
            busy_ttft_s: busy.ttft_s,
            long_ttft_s: long_ttft,
            short_first: long_first.is_none_or(|l| busy_first < l),
            stopped_after_s,
        };
        log("bench", format_args!("batch: short TTFT idle {:.0} ms, during a 4K prefill {:.0} ms; the 4K request hung up, server idle {:.0} ms later", i.idle_ttft_s * 1e3, i.busy_ttft_s * 1e3, i.stopped_after_s * 1e3));
        inter.push(i);
    }
    drop(server);

    let by = |n: usize, f: fn(&Level) -> f64| -> Option<Summary> {
        Summary::of(
            &levels
                .iter()
                .filter(|l| l.concurrency == n)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    let base = by(1, |l| l.steady_tok_s).map(|s| s.median);
    let mut t = Table::new([
        "concurrent requests",
        "aggregate decode tok/s",
        "vs 1 request",
        "per request tok/s",
        "overall tok/s (incl. ramp)",
    ]);
    for &n in &LEVELS {
        let s = by(n, |l| l.steady_tok_s);
        t.row([
            n.to_string(),
            fmt_summary(s, 1),
            fmt_ratio(s.map(|s| s.median), base),
            s.map_or("–".into(), |s| format!("{:.1}", s.median / n as f64)),
            fmt_summary(by(n, |l| l.overall_tok_s), 1),
        ]);
    }
    let mut md = String::from("Aggregate decode throughput (`SEMANTIC_MLX_MAX_BATCH_SIZE=8`, 64 answer tokens per request; goal: 4 requests ≥ 2.5× one):\n\n");
    md.push_str(&t.render());
    let idle = Summary::of(
        &inter
            .iter()
            .map(|i| i.idle_ttft_s * 1e3)
            .collect::<Vec<_>>(),
    );
    let busy = Summary::of(
        &inter
            .iter()
            .map(|i| i.busy_ttft_s * 1e3)
            .collect::<Vec<_>>(),
    );
    let stopped = Summary::of(
        &inter
            .iter()
            .map(|i| i.stopped_after_s * 1e3)
            .collect::<Vec<_>>(),
    );
    let first = inter.iter().filter(|i| i.short_first).count();
    let mut t2 = Table::new([
        "short request TTFT, idle server ms",
        "while a 4,096-token cold prefill runs ms",
        "busy / idle",
        "short request first",
        "4K request hung up: server idle after ms",
    ]);
    t2.row([
        fmt_summary(idle, 0),
        fmt_summary(busy, 0),
        fmt_ratio(busy.map(|s| s.median), idle.map(|s| s.median)),
        format!("{first} of {}", inter.len()),
        fmt_summary(stopped, 0),
    ]);
    md.push_str("\nInterleaved prefill: a short request (~30 tokens) sent 1.5 s after a 4,096-token cold prompt; once it is answered, the long request's client hangs up:\n\n");
    md.push_str(&t2.render());
    md.push_str(
        "\nAggregate tokens/s counts the content pieces all streams received while every one \
         of them was decoding (one piece per token here), over that window; *overall* also \
         counts the ramp-up and tail. The short request's TTFT under load is bounded by \
         the prefill chunk it has to wait for (`SEMANTIC_MLX_PREFILL_STEP_SIZE`, 256 tokens). \
         *Server idle after*: from the hang-up until `semantic_requests_active` reads 0 (the \
         service checks for a client gone after every prefill chunk).\n",
    );
    let json = json!({
        "scenario": "batch", "date": ctx.date, "command": ctx.command, "machine": ctx.machine,
        "runs": ctx.runs, "decode_tokens": DECODE_TOKENS, "levels": levels, "interference": inter,
    });
    ctx.publish(Scenario::Batch, &json, &md)
}

#[cfg(test)]
mod tests {
    use super::super::client::Tokens;
    use super::*;

    fn stream(at: Instant, pieces: &[f64]) -> Streamed {
        Streamed {
            ttft_s: pieces.first().copied().unwrap_or(0.0),
            total_s: pieces.last().copied().unwrap_or(0.0),
            pieces_s: pieces.to_vec(),
            content: String::new(),
            had_content: true,
            tokens: Tokens::default(),
            cache: None,
            sent_at: Some(at),
        }
    }

    #[test]
    fn steady_rate_counts_the_overlap_window() -> Result<()> {
        let t0 = Instant::now();
        // Two streams at 10 tok/s each, overlapping from 1.0 s to 2.0 s.
        let a: Vec<f64> = (0..=20).map(|i| 0.5 + f64::from(i) * 0.1).collect(); // 0.5..2.5
        let b: Vec<f64> = (0..=10).map(|i| 1.0 + f64::from(i) * 0.1).collect(); // 1.0..2.0
        let (steady, overall, window) =
            rates(&[stream(t0, &a), stream(t0, &b)]).ok_or_else(|| anyhow!("none"))?;
        assert!((window - 1.0).abs() < 1e-9);
        assert!((steady - 20.0).abs() < 1.5, "{steady}");
        assert!((overall - 30.0 / 2.0).abs() < 1e-9, "{overall}");
        Ok(())
    }
}
