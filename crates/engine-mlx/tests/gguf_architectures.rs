//! The GGUF form of the newer architectures: each golden fixture (Hugging Face safetensors,
//! `tests/fixtures/golden`) is written as a GGUF the way llama.cpp's converter lays it out
//! (architecture keys `<arch>.*`, canonical tensor names, experts stacked in
//! `blk.N.ffn_{gate,up,down}_exps.weight` `[experts, rows, cols]`, Gemma's norms stored as
//! `1 + w`, Llama-family Q/K rows permuted for interleaved RoPE), loaded with the file's
//! blocks on the host, and must give the reference logits and greedy ids like the
//! safetensors directory does.

mod common;

use common::golden::{check_model, fixture};
use engine_mlx::gguf::{write_gguf, GgufValue};
use engine_mlx::weights::canonical_hf_name;
use engine_mlx::{AttentionKind, WeightFormat};
use mlx_rs::Array;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A tensor's logical shape and f32 values.
type Tensor = (Vec<u64>, Vec<f32>);

fn values(a: &Array) -> Vec<f32> {
    a.as_dtype(mlx_rs::Dtype::Float32)
        .expect("f32")
        .to_vec_exact::<f32>()
        .expect("values")
}

/// llama.cpp's Q/K row order for interleaved RoPE: gguf[h·d + 2i + j] = hf[h·d + j·d/2 + i].
fn permute(rows: &[f32], n_rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let d = n_rows / heads;
    let mut out = vec![0.0; rows.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let src = h * d + j * d / 2 + i;
                let dst = h * d + 2 * i + j;
                out[dst * cols..][..cols].copy_from_slice(&rows[src * cols..][..cols]);
            }
        }
    }
    out
}

/// The architecture keys llama.cpp writes for the fixture's config.
fn metadata(arch: &str, c: &Value) -> Vec<(String, GgufValue)> {
    let u = |k: &str| GgufValue::UInt(c[k].as_u64().unwrap_or_else(|| panic!("{k}")));
    let f = |k: &str| GgufValue::Float(c[k].as_f64().unwrap_or_else(|| panic!("{k}")));
    let key = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        (
            "general.architecture".to_owned(),
            GgufValue::String(arch.into()),
        ),
        (key("block_count"), u("num_hidden_layers")),
        (key("context_length"), u("max_position_embeddings")),
        (key("embedding_length"), u("hidden_size")),
        (key("feed_forward_length"), u("intermediate_size")),
        (key("attention.head_count"), u("num_attention_heads")),
        (key("attention.head_count_kv"), u("num_key_value_heads")),
        (key("attention.layer_norm_rms_epsilon"), f("rms_norm_eps")),
        (key("rope.freq_base"), f("rope_theta")),
    ];
    if c.get("head_dim").is_some_and(|v| !v.is_null()) {
        m.push((key("attention.key_length"), u("head_dim")));
        m.push((key("attention.value_length"), u("head_dim")));
    }
    match arch {
        "llama" => {
            m.push((key("expert_count"), u("num_local_experts")));
            m.push((key("expert_used_count"), u("num_experts_per_tok")));
        }
        "qwen3moe" => {
            m.push((key("expert_count"), u("num_experts")));
            m.push((key("expert_used_count"), u("num_experts_per_tok")));
            m.push((
                key("expert_feed_forward_length"),
                u("moe_intermediate_size"),
            ));
        }
        "deepseek2" => {
            let nope = c["qk_nope_head_dim"].as_u64().expect("nope");
            let rope = c["qk_rope_head_dim"].as_u64().expect("rope");
            m.push((key("attention.key_length"), GgufValue::UInt(nope + rope)));
            m.push((key("attention.value_length"), u("v_head_dim")));
            m.push((key("attention.kv_lora_rank"), u("kv_lora_rank")));
            m.push((key("rope.dimension_count"), u("qk_rope_head_dim")));
            m.push((key("expert_count"), u("n_routed_experts")));
            m.push((key("expert_used_count"), u("num_experts_per_tok")));
            m.push((key("expert_shared_count"), u("n_shared_experts")));
            m.push((
                key("expert_feed_forward_length"),
                u("moe_intermediate_size"),
            ));
            m.push((key("leading_dense_block_count"), u("first_k_dense_replace")));
            m.push((key("expert_weights_scale"), f("routed_scaling_factor")));
            let y = &c["rope_scaling"];
            m.push((key("rope.scaling.type"), GgufValue::String("yarn".into())));
            m.push((
                key("rope.scaling.factor"),
                GgufValue::Float(y["factor"].as_f64().expect("factor")),
            ));
            m.push((
                key("rope.scaling.original_context_length"),
                GgufValue::UInt(
                    y["original_max_position_embeddings"]
                        .as_u64()
                        .expect("orig"),
                ),
            ));
            m.push((
                key("rope.scaling.yarn_log_multiplier"),
                GgufValue::Float(0.1 * y["mscale_all_dim"].as_f64().expect("mscale_all_dim")),
            ));
        }
        "gemma3" => {
            m.push((key("attention.sliding_window"), u("sliding_window")));
            let scalar = c["query_pre_attn_scalar"].as_f64().expect("scalar");
            m.push((key("attention.scale"), GgufValue::Float(scalar.powf(-0.5))));
        }
        _ => {}
    }
    // A byte-level vocabulary of the fixture's 128 word tokens (the test feeds ids).
    let vocab = c["vocab_size"].as_u64().expect("vocab");
    m.extend([
        (
            "tokenizer.ggml.model".to_owned(),
            GgufValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_owned(),
            GgufValue::String("default".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_owned(),
            GgufValue::Array(
                (0..vocab)
                    .map(|i| GgufValue::String(format!("t{i}")))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.merges".to_owned(),
            GgufValue::Array(Vec::new()),
        ),
        ("tokenizer.ggml.eos_token_id".to_owned(), GgufValue::UInt(0)),
    ]);
    m
}

/// Writes the fixture `name` as a GGUF of architecture `arch` into `dir`.
fn write_fixture_gguf(name: &str, arch: &str, dir: &Path) -> PathBuf {
    let src = fixture(name);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config"))
            .expect("json");
    let heads = config["num_attention_heads"].as_u64().expect("heads") as usize;
    let kv_heads = config["num_key_value_heads"]
        .as_u64()
        .unwrap_or(heads as u64) as usize;
    let gemma = arch == "gemma3";
    let weights = Array::load_safetensors(src.join("model.safetensors")).expect("weights");
    let mut plain: BTreeMap<String, Tensor> = BTreeMap::new();
    // Per stacked expert tensor, its experts in order.
    let mut stacked: BTreeMap<String, BTreeMap<usize, Tensor>> = BTreeMap::new();
    for (hf, a) in &weights {
        let Some(name) = canonical_hf_name(hf, gemma) else {
            continue;
        };
        let shape: Vec<u64> = a.shape().iter().map(|&d| d as u64).collect();
        let mut v = values(a);
        if gemma && name.ends_with("norm.weight") {
            v.iter_mut().for_each(|x| *x += 1.0);
        }
        if arch == "llama" && (name.ends_with("attn_q.weight") || name.ends_with("attn_k.weight")) {
            let h = if name.ends_with("attn_q.weight") {
                heads
            } else {
                kv_heads
            };
            v = permute(&v, shape[0] as usize, shape[1] as usize, h);
        }
        let stem = name.strip_suffix(".weight").unwrap_or(&name);
        match stem.rsplit_once('.') {
            Some((base, e)) if base.ends_with("_exps") => {
                stacked
                    .entry(format!("{base}.weight"))
                    .or_default()
                    .insert(e.parse().expect("expert"), (shape, v));
            }
            _ => {
                plain.insert(name, (shape, v));
            }
        }
    }
    let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = plain
        .into_iter()
        .map(|(n, (s, v))| (n, s, 0, common::tiny::f32_bytes(&v)))
        .collect();
    for (n, experts) in stacked {
        let shape = experts.values().next().expect("one expert").0.clone();
        let mut all = Vec::new();
        for (_, v) in experts.values() {
            all.extend_from_slice(v);
        }
        let dims = vec![experts.len() as u64, shape[0], shape[1]];
        tensors.push((n, dims, 0, common::tiny::f32_bytes(&all)));
    }
    let meta = metadata(arch, &config);
    let meta: Vec<(&str, GgufValue)> = meta.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let refs: Vec<(&str, Vec<u64>, u32, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, t, b)| (n.as_str(), s.clone(), *t, b.clone()))
        .collect();
    let path = dir.join(format!("{name}.gguf"));
    write_gguf(&path, &meta, &refs).expect("write gguf");
    path
}

fn check(name: &str, arch: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_fixture_gguf(name, arch, dir.path());
    check_model(name, &path, WeightFormat::Host, AttentionKind::Host);
}

#[test]
fn mixtral_gguf_with_stacked_experts() {
    check("mixtral", "llama");
}

#[test]
fn qwen3_moe_gguf() {
    check("qwen3_moe", "qwen3moe");
}

#[test]
fn deepseek_v2_gguf_with_latent_attention() {
    check("deepseek_v2", "deepseek2");
}

/// The exact `sqrt(hidden)` embedding scale of a GGUF moves the logits by ~5e-4 from the
/// reference's bf16-rounded one, within the tolerance.
#[test]
fn gemma3_gguf() {
    check("gemma3", "gemma3");
}
