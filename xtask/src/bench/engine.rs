//! `engine`: prefill tokens/s (512- and 2,048-token prompts), decode tokens/s at batch 1 and
//! the server's resident memory, for the default model and for Qwen2.5-Coder-0.5B-Instruct
//! Q4_K_M (a K-quant file, fetched from PyPI like the test set-up does), measured over HTTP on
//! the release server (what a client gets: chat template, chunked prefill of
//! `SEMANTIC_MLX_PREFILL_STEP_SIZE` tokens, sampling, SSE); optionally also the engine crate's
//! own example (`--engine-example`), and llama.cpp's `llama-bench` on the same GGUF when the
//! peers are installed.

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
use crate::setup::real_models;
use crate::util::{self, log};
use std::path::Path;

#[derive(Debug, Clone, Default, Serialize)]
struct Figures {
    prefill_512: Vec<f64>,
    prefill_2048: Vec<f64>,
    decode: Vec<f64>,
}

/// Run the scenario: each model in turn, one section each.
pub fn run(ctx: &Ctx) -> Result<()> {
    let qwen = real_models::QWEN_CODER_05B;
    let mut models = vec![("Default model".to_owned(), ctx.model.clone())];
    match qwen.ensure(&util::build_dir()) {
        Ok(path) => models.push(("Qwen2.5-Coder-0.5B-Instruct Q4_K_M".to_owned(), path)),
        Err(e) => log(
            "bench",
            format_args!("engine: skipping {}: {e:#}", qwen.name),
        ),
    }
    let mut md = String::new();
    let mut all = Vec::new();
    for (i, (label, model)) in models.iter().enumerate() {
        let (section, json) = run_model(ctx, i, label, model)?;
        md.push_str(&section);
        md.push('\n');
        all.push(json);
    }
    let json = json!({
        "scenario": "engine", "date": ctx.date, "command": ctx.command, "machine": ctx.machine,
        "runs": ctx.runs, "models": all,
    });
    ctx.publish(Scenario::Engine, &json, &md)
}

/// One model's figures: its Markdown section and JSON.
fn run_model(ctx: &Ctx, index: usize, label: &str, model: &Path) -> Result<(String, Value)> {
    let cache = ctx.fresh_dir(&format!("engine-cache-{index}"))?;
    let mut spec = ctx.ours(&cache, &format!("engine-{index}"), &[])?;
    if let Some(arg) = spec.args.get_mut(2) {
        *arg = model.into();
    }
    let server = Server::start(spec)?;
    let client = server.client();
    let models: Value =
        serde_json::from_str(&client.get_text("/v1/models")?).context("/v1/models is not JSON")?;
    let weight_format = models
        .pointer("/data/0/weight_format")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();
    let mut http = Figures::default();
    let mut rss = Vec::new();
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
        rss.extend(server.rss_bytes());
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
        Some(engine_example(ctx, model)?)
    } else {
        None
    };
    let llama = match &ctx.peers {
        Some(p) => Some(llama_bench(ctx, &p.llama_bench, model)?),
        None => None,
    };
    let file_bytes = std::fs::metadata(model).map(|m| m.len()).unwrap_or(0);
    let max_rss = rss.iter().copied().max().unwrap_or(0);

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
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut md = format!(
        "{label} (`{}`, {:.0} MiB), weights as `{weight_format}` in the engine (from \
         `/v1/models`); server RSS after the runs {:.0} MiB ({:.2}x the file, KV pool and hot \
         KV included):\n\n",
        model
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        mib(file_bytes),
        mib(max_rss),
        max_rss as f64 / file_bytes.max(1) as f64,
    );
    md.push_str(&t.render());
    md.push_str(
        "\n*Over HTTP*: prefill = prompt tokens / TTFT of a cold streaming request with \
         `max_tokens: 1` (includes the chat template, tokenization, the chunked prefill and the \
         first token); decode = content pieces after the first / their time span, for 64 \
         greedy tokens after a short prompt. *llama-bench*: `-t <cores> -p 512,2048 -n 64` \
         (pp512, pp2048, tg64; its own repetitions), on the same GGUF file.\n",
    );
    if example.is_some() {
        md.push_str("*Engine example*: `cargo run --release -p engine-mlx --example bench -- --runs 1 --long`, once per run (prefill as one pass; decode after the 512-token prompt).\n");
    }
    let json = json!({
        "model": label, "file": model, "file_bytes": file_bytes, "rss_bytes": rss,
        "weight_format": weight_format, "http": http, "engine_example": example, "llama_bench": llama,
    });
    Ok((md, json))
}

/// Run crates/engine-mlx/examples/bench.rs once per run and parse its medians.
fn engine_example(ctx: &Ctx, model: &Path) -> Result<Figures> {
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
        .arg(model)
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
fn llama_bench(ctx: &Ctx, bench: &Path, model: &Path) -> Result<Figures> {
    let threads = std::thread::available_parallelism()
        .map_or(2, usize::from)
        .to_string();
    let mut cmd = Command::new(bench);
    cmd.arg("-m").arg(model).args([
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
