//! Phi-3 (Phi-3 / Phi-3.5 mini and medium, Phi-4-mini: `model_type` and GGUF architecture
//! `phi3`): the dense decoder of [`super::llama`] with Phi-3's options, read here from a
//! Hugging Face `config.json` or GGUF metadata, as mlx-lm 0.32.2's `phi3` model runs them.
//!
//! What differs from Llama, and where it is handled:
//! - Fused projections: `self_attn.qkv_proj` holds the q rows, then k, then v;
//!   `mlp.gate_up_proj` the gate rows, then up (llama.cpp's GGUF: `attn_qkv` and a fused
//!   `ffn_up` of twice `feed_forward_length` rows). [`split_fused`] cuts them at load into the
//!   canonical `attn_q/k/v` and `ffn_gate/up` tensors (whole rows, so GGUF blocks are kept
//!   as they are); the decoder fuses them again as it does for every model.
//! - `head_dim = hidden_size / num_attention_heads` (mlx-lm reads no `head_dim` key) and
//!   partial rotary: RoPE turns the first `head_dim · partial_rotary_factor` dims of each
//!   head, non-interleaved.
//! - LongRoPE (`rope_scaling.type` `longrope` or `su`): [`RopeScaling::LongRope`]. mlx-lm
//!   always uses `long_factor` (Hugging Face switches to `short_factor` while the sequence
//!   is no longer than `original_max_position_embeddings`, llama.cpp while the context it
//!   was given is); the periods are [`longrope_periods`], and the rotated dims of q and k
//!   are multiplied by [`attention_factor`] (mlx-lm before rotating, llama.cpp's
//!   `attn_factor` on the rotation: the same, RoPE being linear). A GGUF holds the factors
//!   as `rope_factors_long.weight` (and `rope_factors_short.weight`, unused here) and the
//!   factor as `phi3.rope.scaling.attn_factor`.
//! - `sliding_window` (2047 in Phi-3-mini's config) is ignored, as mlx-lm and llama.cpp
//!   ignore it: every layer is global.
//! - The LM head is separate unless `tie_word_embeddings` (Phi-4-mini).

use crate::config::{count, invalid, ModelConfig, RopeScaling};
use crate::error::Result;
use crate::gguf::GgufHeader;
use crate::weights::TensorMap;
use serde_json::Value;
use std::path::Path;

/// mlx-lm's defaults for Phi-3 configs that name no context lengths.
const DEFAULT_MAX_POSITIONS: f64 = 131_072.0;
const DEFAULT_ORIGINAL_POSITIONS: f64 = 4096.0;

/// The LongRoPE magnitude on the rotated dims of q and k: `sqrt(1 + ln(s) / ln(original))`
/// with `s = max_positions / original`, and 1 when `s <= 1` (mlx-lm's `SuScaledRoPE`,
/// llama.cpp's converter).
pub fn attention_factor(max_positions: f64, original: f64) -> f32 {
    let s = max_positions / original;
    if s <= 1.0 || original <= 1.0 {
        1.0
    } else {
        (1.0 + s.ln() / original.ln()).sqrt() as f32
    }
}

/// LongRoPE periods: pair `i` turns with period `factors[i] · base^(2i / dims)`, i.e. inverse
/// frequency `1 / (factors[i] · base^(2i / dims))` (f32, as mlx-lm computes them).
pub fn longrope_periods(base: f32, dims: usize, factors: &[f32]) -> Vec<f32> {
    factors
        .iter()
        .take(dims / 2)
        .enumerate()
        .map(|(i, &f)| f * base.powf((2 * i) as f32 / dims as f32))
        .collect()
}

/// [`RopeScaling::LongRope`] from a Hugging Face config `v` with `rope_scaling` `rs`:
/// `long_factor` from `rs`; the context lengths from `rs` or the top level.
pub fn longrope_from_hf(path: &Path, v: &Value, rs: &Value) -> Result<RopeScaling> {
    let factors = rs
        .get("long_factor")
        .and_then(Value::as_array)
        .ok_or_else(|| {
            invalid(
                path,
                "rope_scaling.long_factor",
                "must be a list of numbers",
            )
        })?
        .iter()
        .map(|x| {
            x.as_f64().map(|f| f as f32).ok_or_else(|| {
                invalid(
                    path,
                    "rope_scaling.long_factor",
                    "must be a list of numbers",
                )
            })
        })
        .collect::<Result<Vec<f32>>>()?;
    let length = |k: &str, default: f64| {
        rs.get(k)
            .or_else(|| v.get(k))
            .and_then(Value::as_f64)
            .unwrap_or(default)
    };
    let original = length(
        "original_max_position_embeddings",
        DEFAULT_ORIGINAL_POSITIONS,
    );
    let max = v
        .get("max_position_embeddings")
        .and_then(Value::as_f64)
        .unwrap_or(DEFAULT_MAX_POSITIONS);
    Ok(RopeScaling::LongRope {
        factors: Some(factors),
        attention_factor: attention_factor(max, original),
    })
}

/// Phi-3 options from a Hugging Face `config.json` (`model_type` `phi3`).
pub fn from_hf(mut cfg: ModelConfig, path: &Path, v: &Value) -> Result<ModelConfig> {
    if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(invalid(
                path,
                "hidden_act",
                format!("`{act}` is not supported (supported: silu)"),
            ));
        }
    }
    if !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
        return Err(invalid(
            path,
            "hidden_size",
            "not divisible by num_attention_heads",
        ));
    }
    cfg.head_dim = cfg.hidden_size / cfg.num_heads;
    let partial = v
        .get("partial_rotary_factor")
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    if !(partial > 0.0 && partial <= 1.0) {
        return Err(invalid(path, "partial_rotary_factor", "must be in (0, 1]"));
    }
    // Python's int(): truncation.
    cfg.rope_dims = count(
        path,
        "partial_rotary_factor",
        Some((cfg.head_dim as f64 * partial) as u64),
    )?;
    cfg.rope_traditional = false;
    cfg.tie_word_embeddings = v
        .get("tie_word_embeddings")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    cfg.attention_bias = false;
    cfg.layer_windows = Vec::new();
    Ok(cfg)
}

/// Phi-3 options from GGUF metadata (`phi3.*` keys; the generic reader has taken the shape,
/// `rope.dimension_count` and the context length).
pub fn from_gguf(mut cfg: ModelConfig, h: &GgufHeader) -> Result<ModelConfig> {
    let arch = cfg.architecture.clone();
    let key = |s: &str| format!("{arch}.{s}");
    cfg.rope_traditional = false;
    cfg.layer_windows = Vec::new();
    if h.tensor_map().contains_key("rope_factors_long.weight") {
        let attention = match h
            .get(&key("rope.scaling.attn_factor"))
            .and_then(|v| v.as_f64())
        {
            Some(f) => f as f32,
            None => match h
                .get(&key("rope.scaling.original_context_length"))
                .and_then(|v| v.as_u64())
            {
                Some(orig) => attention_factor(cfg.context_length as f64, orig as f64),
                None => 1.0,
            },
        };
        cfg.rope_scaling = RopeScaling::LongRope {
            factors: None,
            attention_factor: attention,
        };
    }
    Ok(cfg)
}

/// Cuts Phi-3's fused tensors into the canonical ones, layer by layer: `blk.N.attn_qkv`
/// into `attn_q` / `attn_k` / `attn_v` (q rows, then k, then v), and a fused `blk.N.ffn_up`
/// (twice `intermediate_size` rows, no `ffn_gate`) into `ffn_gate` (the first half) and
/// `ffn_up`; biases too, where present. Checkpoints that already store them apart pass
/// unchanged.
pub fn split_fused(config: &ModelConfig, mut w: TensorMap) -> Result<TensorMap> {
    let (q, kv) = (
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
    );
    let inter = config.intermediate_size;
    for i in 0..config.num_layers {
        let p = |s: &str| format!("blk.{i}.{s}");
        for suffix in ["weight", "bias"] {
            let fused = p(&format!("attn_qkv.{suffix}"));
            if w.contains(&fused) {
                w.split_rows(
                    &fused,
                    &[
                        (&p(&format!("attn_q.{suffix}")), q),
                        (&p(&format!("attn_k.{suffix}")), kv),
                        (&p(&format!("attn_v.{suffix}")), kv),
                    ],
                )?;
            }
            let up = p(&format!("ffn_up.{suffix}"));
            if w.contains(&up) && !w.contains(&p(&format!("ffn_gate.{suffix}"))) {
                w.split_rows(
                    &up,
                    &[(&p(&format!("ffn_gate.{suffix}")), inter), (&up, inter)],
                )?;
            }
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::MlxContext;
    use crate::weights::RawTensor;
    use mlx_rs::Array;
    use std::collections::HashMap;

    #[test]
    fn attention_factor_of_phi4_mini_and_the_fixture() {
        // Phi-4-mini / Phi-3-mini-128k: 131072 over 4096.
        let f = attention_factor(131_072.0, 4096.0);
        assert!((f64::from(f) - (1.0 + 32f64.ln() / 4096f64.ln()).sqrt()).abs() < 1e-7);
        // ln 32 / ln 4096 = 5 / 12.
        assert!((f - (17f32 / 12.0).sqrt()).abs() < 1e-6, "{f}");
        // The golden phi3_longrope fixture: 64 over 16, ln 4 / ln 16 = 1 / 2.
        assert!((attention_factor(64.0, 16.0) - 1.5f32.sqrt()).abs() < 1e-6);
        // Not extended: no factor.
        assert_eq!(attention_factor(4096.0, 4096.0), 1.0);
        assert_eq!(attention_factor(2048.0, 4096.0), 1.0);
    }

    #[test]
    fn longrope_periods_scale_each_pair() {
        let factors = [1.0, 1.25, 1.8, 2.6, 3.5, 4.0];
        let p = longrope_periods(10_000.0, 12, &factors);
        assert_eq!(p.len(), 6);
        for (i, (&got, &f)) in p.iter().zip(&factors).enumerate() {
            let want = f64::from(f) * 10_000f64.powf((2 * i) as f64 / 12.0);
            assert!((f64::from(got) / want - 1.0).abs() < 1e-6, "pair {i}");
        }
        // Inverse frequency of pair i: 1 / (long_factor[i] · base^(2i/d)).
        assert_eq!(p[0], 1.0);
    }

    #[test]
    fn hf_longrope_config() {
        let v: Value = serde_json::json!({
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 16,
            "rope_scaling": {"type": "longrope", "long_factor": [1, 2.5], "short_factor": [1, 1]},
        });
        let rs = &v["rope_scaling"];
        match longrope_from_hf(Path::new("config.json"), &v, rs).expect("longrope") {
            RopeScaling::LongRope {
                factors: Some(f),
                attention_factor: a,
            } => {
                assert_eq!(f, vec![1.0, 2.5]);
                assert!((a - 1.5f32.sqrt()).abs() < 1e-6);
            }
            other => panic!("{other:?}"),
        }
        let bad = serde_json::json!({"type": "longrope"});
        assert!(longrope_from_hf(Path::new("config.json"), &v, &bad).is_err());
    }

    fn dense(rows: usize, cols: usize) -> RawTensor {
        let data: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        RawTensor::Dense(Array::from_slice(&data, &[rows as i32, cols as i32]))
    }

    fn values(t: &RawTensor) -> Vec<f32> {
        t.to_f32()
            .and_then(|a| a.contiguous().ctx("contiguous"))
            .expect("f32")
            .to_vec_exact::<f32>()
            .expect("values")
    }

    #[test]
    fn fused_tensors_split_into_the_canonical_ones() {
        let config = ModelConfig {
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
            hidden_size: 4,
            intermediate_size: 3,
            ..ModelConfig::plain()
        };
        let mut tensors = HashMap::new();
        tensors.insert("blk.0.attn_qkv.weight".to_owned(), dense(8, 4));
        tensors.insert("blk.0.ffn_up.weight".to_owned(), dense(6, 4));
        let w = TensorMap {
            path: "x.gguf".into(),
            tensors,
        };
        let w = split_fused(&config, w).expect("split");
        let row = |r: usize| (r * 4..r * 4 + 4).map(|x| x as f32).collect::<Vec<_>>();
        let rows = |a: usize, b: usize| (a..b).flat_map(row).collect::<Vec<_>>();
        assert!(!w.contains("blk.0.attn_qkv.weight"));
        assert_eq!(values(&w.tensors["blk.0.attn_q.weight"]), rows(0, 4));
        assert_eq!(values(&w.tensors["blk.0.attn_k.weight"]), rows(4, 6));
        assert_eq!(values(&w.tensors["blk.0.attn_v.weight"]), rows(6, 8));
        assert_eq!(values(&w.tensors["blk.0.ffn_gate.weight"]), rows(0, 3));
        assert_eq!(values(&w.tensors["blk.0.ffn_up.weight"]), rows(3, 6));

        // Already split: unchanged.
        let w = split_fused(&config, w).expect("again");
        assert_eq!(values(&w.tensors["blk.0.ffn_up.weight"]), rows(3, 6));

        // A fused tensor of the wrong height is a shape error naming it.
        let mut tensors = HashMap::new();
        tensors.insert("blk.0.attn_qkv.weight".to_owned(), dense(7, 4));
        let w = TensorMap {
            path: "x.gguf".into(),
            tensors,
        };
        let err = split_fused(&config, w).expect_err("bad shape").to_string();
        assert!(err.contains("blk.0.attn_qkv.weight"), "{err}");
    }
}
