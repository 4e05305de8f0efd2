//! Golden fixtures from the Python reference implementation (mlx-lm 0.32.2 on MLX 0.32.2's
//! CPU backend): tiny random-weight llama (llama3 RoPE scaling), mistral, qwen2 (q/k/v bias,
//! separate LM head), qwen3 (q/k norm), an MLX 4-bit llama, gemma3 (sliding windows) and phi3
//! (fused projections; LongRoPE with partial rotary). Made by
//! `crates/engine-mlx/scripts/golden.py` (never edited by hand).
//!
//! Tolerance: logits of every position within 1e-3 absolute of the reference (both sides
//! compute in f32 on the same weights; differences come only from operation order, e.g. our
//! fused q/k/v and gate/up matmuls, and stay around 1e-5), and the 16 greedy ids equal.

mod common;

use common::golden::{check_model, fixture};
use engine_mlx::{AttentionKind, WeightFormat};
use mlx_rs::Array;
use std::path::{Path, PathBuf};

fn check(name: &str, format: WeightFormat) {
    for attention in [AttentionKind::Host, AttentionKind::Mlx] {
        check_with(name, format, attention);
    }
}

fn check_with(name: &str, format: WeightFormat, attention: AttentionKind) {
    check_model(name, &fixture(name), format, attention);
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

/// Phi-3: fused `qkv_proj` (q, k, v rows) and `gate_up_proj` (gate, up rows), split at load;
/// plain RoPE; separate LM head.
#[test]
fn golden_phi3() {
    check("phi3", WeightFormat::F32);
    check("phi3", WeightFormat::Host);
}

/// Phi-3 with LongRoPE (Phi-4-mini's shape): `long_factor` periods, partial rotary (12 of 16
/// dims), the attention factor √(1 + ln 4 / ln 16) on the rotated q/k dims, tied embeddings.
#[test]
fn golden_phi3_longrope() {
    check("phi3_longrope", WeightFormat::F32);
    check("phi3_longrope", WeightFormat::Host);
}

/// The phi3_longrope fixture as llama.cpp's converter (`Phi3MiniModel`) writes a Phi-3 GGUF:
/// fused `blk.N.attn_qkv` and `blk.N.ffn_up` (gate rows, then up) in F16 (the fixture's own
/// values, so nothing is rounded), `rope_factors_long` / `rope_factors_short`,
/// `phi3.rope.dimension_count` 12 and `phi3.rope.scaling.attn_factor`; tied, so no
/// `output.weight`. Returns the file.
fn write_phi3_gguf(out: &Path) -> PathBuf {
    use engine_mlx::gguf::{write_gguf, GgufValue};
    let dir = fixture("phi3_longrope");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).expect("config"))
            .expect("json");
    let weights = Array::load_safetensors(dir.join("model.safetensors")).expect("weights");
    let canonical = |hf: &str| -> String {
        let name = hf.strip_prefix("model.").unwrap_or(hf);
        match name {
            "embed_tokens.weight" => "token_embd.weight".into(),
            "norm.weight" => "output_norm.weight".into(),
            _ => {
                let rest = name.strip_prefix("layers.").expect("a layer tensor");
                let (layer, part) = rest.split_once('.').expect("layer.part");
                let part = match part {
                    "input_layernorm.weight" => "attn_norm.weight",
                    "post_attention_layernorm.weight" => "ffn_norm.weight",
                    "self_attn.qkv_proj.weight" => "attn_qkv.weight",
                    "self_attn.o_proj.weight" => "attn_output.weight",
                    "mlp.gate_up_proj.weight" => "ffn_up.weight",
                    "mlp.down_proj.weight" => "ffn_down.weight",
                    other => panic!("unexpected tensor {other}"),
                };
                format!("blk.{layer}.{part}")
            }
        }
    };
    let f32_bytes = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    for name in names {
        let a = &weights[name];
        let shape: Vec<u64> = a.shape().iter().map(|&d| d as u64).collect();
        let values = a
            .as_dtype(mlx_rs::Dtype::Float32)
            .expect("f32")
            .to_vec_exact::<f32>()
            .expect("values");
        let (ty, bytes) = if shape.len() == 2 {
            let f16: Vec<u8> = values
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect();
            (1u32, f16)
        } else {
            (0u32, f32_bytes(&values))
        };
        tensors.push((canonical(name), shape, ty, bytes));
    }
    let rope = &config["rope_scaling"];
    for (name, key) in [
        ("rope_factors_long.weight", "long_factor"),
        ("rope_factors_short.weight", "short_factor"),
    ] {
        let f: Vec<f32> = rope[key]
            .as_array()
            .expect("factors")
            .iter()
            .map(|x| x.as_f64().expect("a number") as f32)
            .collect();
        tensors.push((name.into(), vec![f.len() as u64], 0, f32_bytes(&f)));
    }
    let uint = |k: &str| GgufValue::UInt(config[k].as_u64().expect(k));
    let (max, orig) = (64f64, 16f64);
    let meta: Vec<(&str, GgufValue)> = vec![
        ("general.architecture", GgufValue::String("phi3".into())),
        ("phi3.block_count", uint("num_hidden_layers")),
        ("phi3.context_length", uint("max_position_embeddings")),
        ("phi3.embedding_length", uint("hidden_size")),
        ("phi3.feed_forward_length", uint("intermediate_size")),
        ("phi3.attention.head_count", uint("num_attention_heads")),
        ("phi3.attention.head_count_kv", uint("num_key_value_heads")),
        (
            "phi3.attention.layer_norm_rms_epsilon",
            GgufValue::Float(1e-5),
        ),
        ("phi3.rope.dimension_count", GgufValue::UInt(12)),
        ("phi3.rope.freq_base", GgufValue::Float(10_000.0)),
        (
            "phi3.rope.scaling.original_context_length",
            uint("original_max_position_embeddings"),
        ),
        (
            "phi3.rope.scaling.attn_factor",
            GgufValue::Float((1.0 + (max / orig).ln() / orig.ln()).sqrt()),
        ),
        ("phi3.attention.sliding_window", GgufValue::UInt(0)),
        ("tokenizer.ggml.model", GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre", GgufValue::String("default".into())),
        (
            "tokenizer.ggml.tokens",
            GgufValue::Array(
                (0..128)
                    .map(|i| GgufValue::String(format!("t{i}")))
                    .collect(),
            ),
        ),
        ("tokenizer.ggml.merges", GgufValue::Array(Vec::new())),
    ];
    let refs: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, t, b)| (n.as_str(), s.clone(), *t, b.clone()))
        .collect();
    let path = out.join("phi3-longrope-f16.gguf");
    write_gguf(&path, &meta, &refs).expect("write gguf");
    path
}

/// Phi-3 from GGUF: the LongRoPE fixture in llama.cpp's layout (fused `attn_qkv` and
/// `ffn_up` split into whole rows of the file's F16 blocks, RoPE factors and the attention
/// factor from the file) gives mlx-lm's logits and greedy ids, with the blocks kept (host)
/// and dequantized (f32).
#[test]
fn golden_phi3_longrope_from_gguf() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = write_phi3_gguf(tmp.path());
    for format in [WeightFormat::F32, WeightFormat::Host] {
        for attention in [AttentionKind::Host, AttentionKind::Mlx] {
            check_model("phi3_longrope", &path, format, attention);
        }
    }
}
