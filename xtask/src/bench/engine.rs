//! `engine`: prefill tokens/s (512- and 2,048-token prompts) and decode tokens/s at batch 1
//! of the default model, measured over HTTP on the release server (what a client gets: chat
//! template, chunked prefill of `SEMANTIC_MLX_PREFILL_STEP_SIZE` tokens, sampling, SSE);
//! optionally also the engine crate's own example (`--engine-example`), and llama.cpp's
//! `llama-bench` on the same GGUF when the peers are installed.

use std::process::Command;

use anyhow::{Context as _, Result};
use serde::Serialize;
use serde_json::{json, Value};

use super::client::{Chat, Message};
use super::prompts;
use super::report::{fmt_ratio, fmt_summary, Table};
use super::server::Server;
use super::stats::Summary;
use super::{Ctx, Scenario};
use crate::util::{self, log};

#[derive(Debug, Clone, Default, Serialize)]
struct Figures {
    prefill_512: Vec<f64>,
    prefill_2048: Vec<f64>,
    decode: Vec<f64>,
}

/// Run the scenario.
pub fn run(ctx: &Ctx) -> Result<()> {
    let cache = ctx.fresh_dir("engine-cache")?;
    let server = Server::start(ctx.ours(&cache, "engine", &[])?)?;
    let client = server.client();
    let models: Value =
        serde_json::from_str(&client.get_text("/v1/models")?).context("/v1/models is not JSON")?;
    let weight_format = models
        .pointer("/data/0/weight_format")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let mut http = Figures::default();
    for run in 0..ctx.runs {
        for (len, out) in [
            (512u64, &mut http.prefill_512),
            (2048, &mut http.prefill_2048),
        ] {
            let (msgs, n) = prompts::fit(
                &client,
                &[Message::system("You are a careful assistant.")],
                len,
                70_000 + run as u64 * 10 + len,
                &format!("Engine {}-{run}-{len}:", ctx.stamp),
            )?;
            let s = client.chat(&Chat {
                messages: &msgs,
                max_tokens: 1,
                agent: Some(&format!("engine-{run}-{len}")),
                extra: None,
            })?;
            out.push(n as f64 / s.ttft_s);
        }
        let msgs = [
            Message::system("You are a helpful assistant."),
            Message::user(format!(
                "Request {run}. Write the numbers from 1 to 100, separated by commas."
            )),
        ];
        let s = client.chat(&Chat {
            messages: &msgs,
            max_tokens: 64,
            agent: Some(&format!("engine-decode-{run}")),
            extra: None,
        })?;
        if let Some(r) = s.decode_rate() {
            http.decode.push(r);
        }
        log(
            "bench",
            format_args!(
                "engine run {run}: prefill {:.0} / {:.0} tok/s, decode {:.1} tok/s",
                http.prefill_512.last().copied().unwrap_or(f64::NAN),
                http.prefill_2048.last().copied().unwrap_or(f64::NAN),
                http.decode.last().copied().unwrap_or(f64::NAN)
            ),
        );
    }
    drop(server);

    let example = if ctx.engine_example {
        Some(engine_example(ctx)?)
    } else {
        None
    };
    let llama = match &ctx.peers {
        Some(p) => Some(llama_bench(ctx, &p.llama_bench)?),
        None => None,
    };

    let s = |v: &[f64]| Summary::of(v);
    let mut header = vec!["figure (tokens/s)", "semantic over HTTP"];
    if example.is_some() {
        header.push("engine example (direct)");
    }
    if llama.is_some() {
        header.extend(["llama.cpp llama-bench", "semantic / llama.cpp"]);
    }
    let mut t = Table::new(header);
    type Pick = fn(&Figures) -> &Vec<f64>;
    let rows: [(&str, &Vec<f64>, Pick); 3] = [
        ("prefill, 512-token prompt", &http.prefill_512, |f| {
            &f.prefill_512
        }),
        ("prefill, 2,048-token prompt", &http.prefill_2048, |f| {
            &f.prefill_2048
        }),
        ("decode, batch 1", &http.decode, |f| &f.decode),
    ];
    for (name, mine, get) in rows {
        let mut row = vec![name.to_owned(), fmt_summary(s(mine), 1)];
        if let Some(e) = &example {
            row.push(fmt_summary(s(get(e)), 1));
        }
        if let Some(l) = &llama {
            row.push(fmt_summary(s(get(l)), 1));
            row.push(fmt_ratio(
                s(mine).map(|x| x.median),
                s(get(l)).map(|x| x.median),
            ));
        }
        t.row(row);
    }
    let mut md = format!(
        "Default model, weights as `{weight_format}` in the engine (from `/v1/models`):\n\n"
    );
    md.push_str(&t.render());
    md.push_str(
        "\n*Over HTTP*: prefill = prompt tokens / TTFT of a cold streaming request with \
         `max_tokens: 1` (includes the chat template, tokenization, the chunked prefill and the \
         first token); decode = content pieces after the first / their time span, for 64 \
         greedy tokens after a short prompt. *llama-bench*: `-t <cores> -p 512,2048 -n 64` \
         (pp512, pp2048, tg64; its own repetitions), on the GGUF's Q4_1 weights.\n",
    );
    if example.is_some() {
        md.push_str("*Engine example*: `cargo run --release -p engine-mlx --example bench -- --runs 1 --long`, once per run (prefill as one pass; decode after the 512-token prompt).\n");
    }
    let json = json!({
        "scenario": "engine", "date": ctx.date, "command": ctx.command, "machine": ctx.machine,
        "runs": ctx.runs, "weight_format": weight_format, "http": http, "engine_example": example, "llama_bench": llama,
    });
    ctx.publish(Scenario::Engine, &json, &md)
}

/// Run crates/engine-mlx/examples/bench.rs once per run and parse its medians.
fn engine_example(ctx: &Ctx) -> Result<Figures> {
    let mut f = Figures::default();
    for run in 0..ctx.runs {
        let mut cmd = util::cargo_command();
        cmd.args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "engine-mlx",
            "--example",
            "bench",
        ])
        .args(&ctx.cargo_config)
        .arg("--")
        .arg(&ctx.model)
        .args(["--runs", "1", "--long"]);
        log(
            "bench",
            format_args!("engine example run {run}: {}", util::display_command(&cmd)),
        );
        let out = util::output(&mut cmd)?;
        for line in out.lines() {
            let num = |after: &str| -> Option<f64> {
                let rest = line.split(after).nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            };
            if line.starts_with("prompt 512 (chunks of 512)") {
                f.prefill_512.extend(num("prefill "));
                f.decode.extend(num("decode @512 "));
            } else if line.starts_with("prompt 2048 (chunks of 2048)") {
                f.prefill_2048.extend(num("prefill "));
            }
        }
    }
    Ok(f)
}

/// llama-bench pp512, pp2048, tg64 on the same GGUF (per-repetition samples).
fn llama_bench(ctx: &Ctx, bench: &std::path::Path) -> Result<Figures> {
    let threads = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .to_string();
    let mut cmd = Command::new(bench);
    cmd.arg("-m").arg(&ctx.model).args([
        "-t",
        &threads,
        "-p",
        "512,2048",
        "-n",
        "64",
        "-r",
        &ctx.runs.to_string(),
        "-o",
        "json",
    ]);
    log("bench", format_args!("{}", util::display_command(&cmd)));
    let out = util::output(&mut cmd)?;
    let rows: Value = serde_json::from_str(out.trim()).context("llama-bench printed no JSON")?;
    let mut f = Figures::default();
    for row in rows.as_array().into_iter().flatten() {
        let n_prompt = row.get("n_prompt").and_then(Value::as_u64).unwrap_or(0);
        let n_gen = row.get("n_gen").and_then(Value::as_u64).unwrap_or(0);
        let samples: Vec<f64> = row
            .get("samples_ts")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .or_else(|| row.get("avg_ts").and_then(Value::as_f64).map(|v| vec![v]))
            .unwrap_or_default();
        match (n_prompt, n_gen) {
            (512, 0) => f.prefill_512 = samples,
            (2048, 0) => f.prefill_2048 = samples,
            (0, 64) => f.decode = samples,
            _ => {}
        }
    }
    Ok(f)
}
