//! Engine throughput on a model (default: the default model).
//!
//! ```text
//! cargo run --release -p engine-mlx --example bench --config <mlx cargo config> -- \
//!     [MODEL] [--f32 | --quantized] [--no-fuse] [--mlx-attention|--host-attention] [--runs N]
//!     [--long] [--cpu] [--depth] [--batch] [--mlx-decode | --host-linears]
//! ```
//! Prints prefill tokens/s for a 512-token prompt (one forward pass), decode tokens/s for 64
//! greedy tokens after it (batch 1), and with `--long` the same for a 2048-token prompt, as
//! one pass and in 256-token block-aligned chunks. Medians of `--runs` (default 3). `--cpu`
//! also prints tokens per CPU-second of the process (useful on a busy machine). `--depth`
//! times each 256-token chunk of a 4,096-token prefill and a decode step at that depth;
//! `--batch` prints aggregate decode tokens/s of 1, 2, 4 and 8 sequences stepped together.
//! `--f32` / `--quantized` choose the weight format (default: the platform's, the file's
//! blocks on Linux). `--mlx-decode` runs the decode steps' linear layers on MLX instead of the host kernel;
//! `--host-linears` keeps the host kernel for the linears but MLX ops between them (the
//! decode path before the whole step moved to the host).

use agent_session::{InferenceEngine, SamplingParams, StepRequest};
use engine_mlx::{AttentionKind, DecodeKernel, EngineConfig, MlxEngine, WeightFormat};
use std::sync::Arc;
use std::time::Instant;

/// CPU seconds used by the whole process so far (all threads), from /proc (Linux); 0 elsewhere.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// `n` greedy decode steps of sequence `s` at batch 1 (the first samples the prefill's logits).
async fn greedy_steps(
    engine: &MlxEngine,
    s: agent_session::SequenceId,
    n: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let greedy = Arc::new(SamplingParams::greedy());
    let mut feed = None;
    for step in 0..n {
        let r = engine
            .step(vec![StepRequest {
                seq: s,
                feed,
                params: greedy.clone(),
                step,
                generated: Arc::from(Vec::new()),
            }])
            .await?;
        feed = r.into_iter().next().transpose()?;
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Same BLAS kernels as the server (see engine_mlx::blas).
    engine_mlx::blas::reexec_with_native_kernels()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let model = args
        .iter()
        .find(|a| !a.starts_with("--") && a.parse::<usize>().is_err())
        .cloned()
        .unwrap_or_else(|| {
            let home = std::env::var("SEMANTIC_HOME").unwrap_or_else(|_| {
                format!("{}/.semantic", std::env::var("HOME").unwrap_or_default())
            });
            format!("{home}/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let config = EngineConfig {
        weight_format: if flag("--quantized") {
            WeightFormat::Quantized
        } else if flag("--f32") {
            WeightFormat::F32
        } else {
            WeightFormat::default()
        },
        fuse_projections: !flag("--no-fuse"),
        attention: if flag("--mlx-attention") {
            AttentionKind::Mlx
        } else if flag("--host-attention") {
            AttentionKind::Host
        } else {
            AttentionKind::default()
        },
        decode_kernel: if flag("--mlx-decode") {
            DecodeKernel::Mlx
        } else if flag("--host-linears") {
            DecodeKernel::HostLinears
        } else {
            DecodeKernel::default()
        },
        ..EngineConfig::default()
    };
    let t = Instant::now();
    let (engine, _fmt) = MlxEngine::load(&model, config.clone())?;
    println!(
        "model {} ({}), weights {}, fused {}, attention {}, load {:.2}s",
        engine.model().id,
        engine.model().architecture,
        engine.model().weight_format,
        config.fuse_projections,
        config.attention.name(),
        t.elapsed().as_secs_f64()
    );
    let vocab = engine.model().vocab_size as u32;
    let prompt = |n: u32| -> Vec<u32> { (0..n).map(|i| (i * 7919 + 13) % vocab).collect() };
    let greedy = Arc::new(SamplingParams::greedy());

    futures::executor::block_on(async {
        // Warm-up.
        let s = engine.open_sequence().await?;
        engine.prefill(s, prompt(32)).await?;
        engine.release(s).await?;

        if flag("--depth") {
            // Time of each 256-token chunk of a 4096-token prefill, and of a decode step at
            // that depth: where deep-context time goes.
            let s = engine.open_sequence().await?;
            let p = prompt(4096);
            for (i, c) in p.chunks(256).enumerate() {
                let t = Instant::now();
                engine.prefill(s, c.to_vec()).await?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                println!(
                    "chunk {i:2} (from {:5}): {ms:7.1} ms = {:6.1} tok/s",
                    i * 256,
                    256e3 / ms
                );
            }
            let t = Instant::now();
            greedy_steps(&engine, s, 16).await?;
            println!(
                "decode @4096: {:.1} tok/s",
                15.0 / t.elapsed().as_secs_f64()
            );
            engine.release(s).await?;
            return Ok(());
        }
        if flag("--batch") {
            // Aggregate decode tokens/s of B sequences stepped together (after 128-token
            // prompts), and whether each sequence's tokens equal its solo run.
            let mut solo: Vec<Vec<u32>> = Vec::new();
            for bsz in [1usize, 2, 4, 8] {
                let mut seqs = Vec::new();
                for j in 0..bsz {
                    let s = engine.open_sequence().await?;
                    let p: Vec<u32> = prompt(128 + j as u32).into_iter().skip(j).collect();
                    engine.prefill(s, p).await?;
                    seqs.push(s);
                }
                let mut feeds: Vec<Option<u32>> = vec![None; bsz];
                let mut outs: Vec<Vec<u32>> = vec![Vec::new(); bsz];
                let steps = 33u32;
                let mut t = Instant::now();
                for step in 0..steps {
                    if step == 1 {
                        t = Instant::now();
                    }
                    let reqs = seqs
                        .iter()
                        .zip(&feeds)
                        .map(|(&seq, &feed)| StepRequest {
                            seq,
                            feed,
                            params: greedy.clone(),
                            step,
                            generated: Arc::from(Vec::new()),
                        })
                        .collect();
                    let r = engine.step(reqs).await?;
                    for (j, tok) in r.into_iter().enumerate() {
                        let tok = tok?;
                        feeds[j] = Some(tok);
                        outs[j].push(tok);
                    }
                }
                let secs = t.elapsed().as_secs_f64();
                // Sequence j's first run (the same prompt in every batch) is the reference.
                for (j, o) in outs.iter().enumerate() {
                    if j == solo.len() {
                        solo.push(o.clone());
                    }
                }
                let same = outs
                    .iter()
                    .enumerate()
                    .filter(|(j, o)| solo.get(*j) == Some(o))
                    .count();
                println!(
                    "batch {bsz}: {:.1} tok/s aggregate ({:.1} ms/step), {same}/{bsz} equal to their first run",
                    f64::from(steps - 1) * bsz as f64 / secs,
                    secs * 1e3 / f64::from(steps - 1)
                );
                for s in seqs {
                    engine.release(s).await?;
                }
            }
            return Ok(());
        }
        let mut cases = vec![(512u32, 512usize)];
        if flag("--long") {
            cases.push((2048, 2048));
            cases.push((2048, 256));
        }
        for (n, chunk) in cases {
            let (mut pre, mut dec) = (Vec::new(), Vec::new());
            let (mut pre_cpu, mut dec_cpu) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let s = engine.open_sequence().await?;
                let p = prompt(n);
                let t = Instant::now();
                let c0 = cpu_seconds();
                for c in p.chunks(chunk) {
                    engine.prefill(s, c.to_vec()).await?;
                }
                pre.push(f64::from(n) / t.elapsed().as_secs_f64());
                pre_cpu.push(f64::from(n) / (cpu_seconds() - c0));
                if chunk == n as usize {
                    let t = Instant::now();
                    let c0 = cpu_seconds();
                    greedy_steps(&engine, s, 64).await?;
                    // 63 forward passes (the first token comes from the prefill's logits).
                    dec.push(63.0 / t.elapsed().as_secs_f64());
                    dec_cpu.push(63.0 / (cpu_seconds() - c0));
                }
                engine.release(s).await?;
            }
            print!(
                "prompt {n} (chunks of {chunk}): prefill {:.1} tok/s",
                median(pre)
            );
            if !dec.is_empty() {
                print!(", decode @{n} {:.1} tok/s", median(dec));
            }
            println!(" (median of {runs})");
            if flag("--cpu") {
                print!("  per CPU-second: prefill {:.1} tok", median(pre_cpu));
                if !dec_cpu.is_empty() {
                    print!(", decode {:.1} tok", median(dec_cpu));
                }
                println!();
            }
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    Ok(())
}
