//! Every supported GGUF tensor type, end to end through the engine: a tiny written model whose
//! linear weights and tied embedding are random blocks of the type loads in each weight
//! format, and the host formats (the file's blocks: BLAS over dequantized panels for prefill,
//! the block kernels for decode) give the logits and greedy tokens of the f32 format.

mod common;

use agent_session::InferenceEngine;
use common::block_on;
use common::tiny::{self, Quant, Variant};
use engine_mlx::{EngineConfig, MlxEngine, WeightFormat};
use gguf_quants::QuantType;
use std::path::Path;

fn load(path: &Path, format: WeightFormat) -> MlxEngine {
    let config = EngineConfig {
        block_tokens: 64,
        weight_format: format,
        ..EngineConfig::default()
    };
    MlxEngine::load(path.to_str().expect("utf-8 path"), config)
        .unwrap_or_else(|e| panic!("{} loads as {}: {e}", path.display(), format.name()))
        .0
}

/// The last position's logits after prefilling `tokens`, then the greedy continuation
/// (`steps` decode steps) with the logits of each step.
fn run(engine: &MlxEngine, tokens: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>, Vec<Vec<f32>>) {
    block_on(async {
        let seq = engine.open_sequence().await.expect("open");
        engine.prefill(seq, tokens.to_vec()).await.expect("prefill");
        let first = engine.debug_logits(seq).await.expect("logits");
        let mut ids = Vec::new();
        let mut step_logits = Vec::new();
        let mut logits = first.clone();
        for _ in 0..steps {
            let next = argmax(&logits);
            ids.push(next);
            let out = common::sample_continue(
                engine,
                seq,
                std::sync::Arc::new(agent_session::SamplingParams::greedy()),
                1,
                &[],
            )
            .await;
            assert_eq!(out, vec![next], "the engine's greedy pick is the argmax");
            // Feed the token: one decode step on the host kernels.
            engine
                .step(vec![agent_session::StepRequest {
                    seq,
                    feed: Some(next),
                    params: std::sync::Arc::new(agent_session::SamplingParams::greedy()),
                    step: 0,
                    generated: Vec::new().into(),
                }])
                .await
                .expect("step");
            logits = engine.debug_logits(seq).await.expect("logits");
            step_logits.push(logits.clone());
        }
        engine.release(seq).await.expect("release");
        (first, ids, step_logits)
    })
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

/// Largest difference relative to the largest logit magnitude.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(1e-6f32, |m, x| m.max(x.abs()));
    common::max_abs_diff(a, b) / scale
}

#[test]
fn every_supported_type_runs_on_the_host_as_in_f32() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 40 tokens prefill through BLAS (panels), 10 through the block kernels.
    let long: Vec<u32> = (0..40).map(|i| (i * 37 % 256) as u32).collect();
    let short: Vec<u32> = (0..10).map(|i| (i * 11 % 256) as u32).collect();
    let mut checked = Vec::new();
    for &ty in gguf_quants::SUPPORTED {
        let path = dir.path().join(format!("tiny-{}.gguf", ty.name()));
        tiny::write(
            &path,
            Variant {
                linear: Some(Quant::Any(ty)),
                wide: true,
                quantized_embedding: true,
                ..Variant::default()
            },
        );
        let host = load(&path, WeightFormat::Host);
        let f32 = load(&path, WeightFormat::F32);
        assert!(
            host.model().weight_format.starts_with("host blocks")
                && host.model().weight_format.contains(ty.name()),
            "{}",
            host.model().weight_format
        );
        assert_ne!(host.model().fingerprint, f32.model().fingerprint);
        for tokens in [&long, &short] {
            let (a, ids_a, steps_a) = run(&f32, tokens, 4);
            let (b, ids_b, steps_b) = run(&host, tokens, 4);
            let d = rel_diff(&a, &b);
            assert!(
                d < 1e-4,
                "{}: prefill of {}: logits differ by {d}",
                ty.name(),
                tokens.len()
            );
            assert_eq!(ids_a, ids_b, "{}: greedy tokens", ty.name());
            for (s, (x, y)) in steps_a.iter().zip(&steps_b).enumerate() {
                let d = rel_diff(x, y);
                assert!(
                    d < 1e-4,
                    "{}: decode step {s}: logits differ by {d}",
                    ty.name()
                );
            }
        }
        // MLX affine (the Metal format) runs the same model: exact grids for Q4_0 / Q4_1 /
        // Q8_0, 8-bit requantization for the others.
        let quantized = load(&path, WeightFormat::Quantized);
        let (a, _, _) = run(&f32, &long, 0);
        let (q, _, _) = run(&quantized, &long, 0);
        let exact = matches!(
            ty,
            QuantType::Q4_0
                | QuantType::Q4_1
                | QuantType::Q8_0
                | QuantType::F32
                | QuantType::F16
                | QuantType::Bf16
        );
        // Requantized types: each weight within one 8-bit step of its group's range,
        // which moves this random model's logits by a few percent.
        let tolerance = if exact { 1e-4 } else { 0.15 };
        let d = rel_diff(&a, &q);
        assert!(
            d < tolerance,
            "{}: MLX affine logits differ by {d}",
            ty.name()
        );
        let header = engine_mlx::gguf::GgufHeader::read(&path).expect("header");
        let mut map = engine_mlx::weights::load_gguf(&header).expect("tensors");
        let raw = map.take("blk.0.ffn_up.weight").expect("ffn_up");
        let dense = raw
            .to_f32()
            .expect("f32")
            .to_vec_exact::<f32>()
            .expect("values");
        let affine = raw.to_mlx_affine().expect("affine");
        let back = affine
            .to_f32()
            .expect("f32")
            .to_vec_exact::<f32>()
            .expect("values");
        for (g, (x, y)) in dense.chunks(32).zip(back.chunks(32)).enumerate() {
            let (lo, hi) = x
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
            let step = if exact { 0.0 } else { (hi - lo) / 255.0 };
            let err = common::max_abs_diff(x, y);
            assert!(
                err <= step * 1.01 + 1e-6,
                "{}: group {g}: {err} > {step}",
                ty.name()
            );
        }
        checked.push(ty.name());
    }
    assert!(checked.len() >= 16, "checked {checked:?}");
}
