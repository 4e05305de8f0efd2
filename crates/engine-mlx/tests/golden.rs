//! Golden fixtures from the Python reference implementation (mlx-lm 0.32.2 on MLX 0.32.2's
//! CPU backend): tiny random-weight llama (llama3 RoPE scaling), mistral, qwen2 (q/k/v bias,
//! separate LM head), qwen3 (q/k norm), an MLX 4-bit llama and gemma3 (sliding windows). Made by
//! `crates/engine-mlx/scripts/golden.py` (never edited by hand).
//!
//! Tolerance: logits of every position within 1e-3 absolute of the reference (both sides
//! compute in f32 on the same weights; differences come only from operation order, e.g. our
//! fused q/k/v and gate/up matmuls, and stay around 1e-5), and the 16 greedy ids equal.

mod common;

use agent_session::InferenceEngine;
use common::block_on;
use engine_mlx::{AttentionKind, EngineConfig, MlxEngine, WeightFormat};
use mlx_rs::Array;
use std::path::PathBuf;

const TOLERANCE: f32 = 1e-3;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

fn check(name: &str, format: WeightFormat) {
    for attention in [AttentionKind::Host, AttentionKind::Mlx] {
        check_with(name, format, attention);
    }
}

fn check_with(name: &str, format: WeightFormat, attention: AttentionKind) {
    let dir = fixture(name);
    let expected = Array::load_safetensors(dir.join("expected.safetensors")).expect("expected");
    let ids: Vec<u32> = expected["input_ids"]
        .to_vec_exact::<i32>()
        .expect("ids")
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let want_logits = expected["logits"].to_vec_exact::<f32>().expect("logits");
    let want_greedy: Vec<u32> = expected["greedy"]
        .to_vec_exact::<i32>()
        .expect("greedy")
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let config = EngineConfig {
        block_tokens: 64,
        weight_format: format,
        attention,
        ..EngineConfig::default()
    };
    let (engine, _) = MlxEngine::load(dir.to_str().expect("utf-8"), config).expect("load fixture");
    block_on(async {
        let got = engine
            .debug_forward_all(ids.clone())
            .await
            .expect("forward");
        assert_eq!(got.len(), want_logits.len(), "{name}: logits shape");
        let err = common::max_abs_diff(&got, &want_logits);
        eprintln!(
            "{name} ({format:?}, {attention:?} attention): max |logit - reference| = {err:e}"
        );
        assert!(
            err <= TOLERANCE,
            "{name} ({format:?}): logits differ by {err}"
        );

        let seq = engine.open_sequence().await.expect("open");
        engine.prefill(seq, ids).await.expect("prefill");
        let out = common::greedy_continue(&engine, seq, want_greedy.len()).await;
        assert_eq!(out, want_greedy, "{name} ({format:?}): greedy ids");
    });
}

#[test]
fn golden_llama_with_llama3_rope_scaling() {
    check("llama", WeightFormat::F32);
}

#[test]
fn golden_mistral() {
    check("mistral", WeightFormat::F32);
}

#[test]
fn golden_qwen2() {
    check("qwen2", WeightFormat::F32);
}

#[test]
fn golden_qwen3() {
    check("qwen3", WeightFormat::F32);
}

#[test]
fn golden_llama_mlx_4bit() {
    check("llama_q4", WeightFormat::Quantized);
    check("llama_q4", WeightFormat::F32);
}

/// Gemma 3: five sliding-window layers (window 8, so the 24 prompt ids and 16 greedy steps
/// go well past it) to one global, local and global RoPE bases, GeGLU, post-block norms,
/// q/k norms, the bf16-rounded embedding scale and the Hugging Face `1 + w` norms.
#[test]
fn golden_gemma3() {
    check("gemma3", WeightFormat::F32);
    check("gemma3", WeightFormat::Host);
}

/// Mixtral: 4 experts, top 2 by router logit, softmax over the two.
#[test]
fn golden_mixtral() {
    check("mixtral", WeightFormat::F32);
    check("mixtral", WeightFormat::Host);
}

/// Qwen3-MoE: Qwen3 attention (q/k norms), softmax over 4 experts, top 2, renormalised.
#[test]
fn golden_qwen3_moe() {
    check("qwen3_moe", WeightFormat::F32);
    check("qwen3_moe", WeightFormat::Host);
}

/// DeepSeek-V2 (V2-Lite shape): latent attention, YaRN, a dense first layer, routed and
/// shared experts, greedy top 2 of the softmax.
#[test]
fn golden_deepseek_v2() {
    check("deepseek_v2", WeightFormat::F32);
    check("deepseek_v2", WeightFormat::Host);
}

/// DeepSeek-V2 (full shape): query low rank, group-limited routing, 2 shared experts,
/// routed scale 16, YaRN's input factor on the RoPE parts.
#[test]
fn golden_deepseek_v2_q_lora() {
    check("deepseek_v2_q_lora", WeightFormat::F32);
    check("deepseek_v2_q_lora", WeightFormat::Host);
}
