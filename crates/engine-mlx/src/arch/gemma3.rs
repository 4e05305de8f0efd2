//! Gemma 3 (text): the dense decoder of [`super::llama`] with Gemma's options, read here
//! from GGUF metadata or a Hugging Face `config.json`.
//!
//! What differs from Llama, and where it is set:
//! - Five sliding-window layers to one global layer (`sliding_window_pattern` 6: layer `i` is
//!   global when `(i + 1) % 6 == 0`); a sliding layer's position `p` sees keys
//!   `p - window + 1 ..= p` (as llama.cpp's standard SWA mask and Hugging Face's
//!   `kv_idx > q_idx - sliding_window`). [`ModelConfig::layer_windows`].
//! - RoPE base 10,000 on sliding layers and `rope_theta` (1e6) on global ones, with any
//!   `rope_scaling` only on the global ones. [`ModelConfig::rope_local_theta`].
//! - GeGLU (`gelu_pytorch_tanh`), RMSNorm after attention and after the MLP too, q/k
//!   RMSNorm per head, a tied LM head.
//! - The embedding is multiplied by `sqrt(hidden_size)`: exactly, as llama.cpp does, for a
//!   GGUF; rounded to bfloat16 first, as Hugging Face (bf16 weights) and mlx-lm do, for a
//!   checkpoint in the Hugging Face layout, so each matches its own reference.
//! - Attention scale `query_pre_attn_scalar^-0.5` (Hugging Face); for GGUF, the file's
//!   `attention.scale` when present, else `1 / sqrt(key_length)` (what llama.cpp uses for
//!   every size but 27B, whose GGUF should carry the scale).
//! - Norm weights: Hugging Face stores `w - 1` (the norm multiplies by `1 + w`); GGUF
//!   converters add the 1, so only the Hugging Face layout gets an offset.

use crate::config::{count, invalid, Activation, ModelConfig};
use crate::error::Result;
use crate::gguf::GgufHeader;
use serde_json::Value;
use std::path::Path;

/// Gemma 3's layer pattern when the file names none: every sixth layer is global.
pub const DEFAULT_PATTERN: usize = 6;

/// RoPE base of the sliding-window layers when the file names none.
pub const LOCAL_ROPE_BASE: f32 = 10_000.0;

/// `None` for global layers, `Some(window)` for sliding ones, from a pattern `n` (layer `i`
/// is global when `(i + 1) % n == 0`).
fn windows_from_pattern(layers: usize, pattern: usize, window: usize) -> Vec<Option<usize>> {
    (0..layers)
        .map(|i| {
            if pattern > 0 && (i + 1) % pattern == 0 {
                None
            } else {
                Some(window)
            }
        })
        .collect()
}

/// `x` rounded to the nearest bfloat16 (ties to even), back as f32.
fn round_to_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(rounded)
}

fn common(mut cfg: ModelConfig) -> ModelConfig {
    cfg.activation = Activation::GeluTanh;
    cfg.post_norms = true;
    cfg.rope_traditional = false;
    cfg
}

/// Gemma 3 options from GGUF metadata (`gemma3.*` keys).
pub fn from_gguf(cfg: ModelConfig, h: &GgufHeader) -> Result<ModelConfig> {
    let path = h.path.as_path();
    let arch = cfg.architecture.clone();
    let key = |s: &str| format!("{arch}.{s}");
    let mut cfg = common(cfg);
    let window_key = key("attention.sliding_window");
    let window = count(
        path,
        &window_key,
        h.get(&window_key).and_then(|v| v.as_u64()),
    )?;
    let pattern_key = key("attention.sliding_window_pattern");
    cfg.layer_windows = match h.get(&pattern_key) {
        None => windows_from_pattern(cfg.num_layers, DEFAULT_PATTERN, window),
        Some(v) => match (v.as_u64(), v.as_array()) {
            (Some(n), _) => windows_from_pattern(cfg.num_layers, n as usize, window),
            (None, Some(items)) => items
                .iter()
                .map(|x| match x.as_bool() {
                    Some(true) => Ok(Some(window)),
                    Some(false) => Ok(None),
                    None => Err(invalid(path, &pattern_key, "must hold booleans")),
                })
                .collect::<Result<_>>()?,
            _ => return Err(invalid(path, &pattern_key, "must be a count or booleans")),
        },
    };
    cfg.rope_local_theta = Some(
        h.get(&key("rope.freq_base_swa"))
            .and_then(|v| v.as_f64())
            .map_or(LOCAL_ROPE_BASE, |b| b as f32),
    );
    cfg.embed_scale = Some((cfg.hidden_size as f32).sqrt());
    cfg.attention_scale = h
        .get(&key("attention.scale"))
        .and_then(|v| v.as_f64())
        .map(|s| s as f32);
    cfg.norm_weight_offset = 0.0;
    Ok(cfg)
}

/// Gemma 3 options from a Hugging Face `config.json` (`model_type` `gemma3_text`).
pub fn from_hf(cfg: ModelConfig, path: &Path, v: &Value) -> Result<ModelConfig> {
    let mut cfg = common(cfg);
    for cap in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if v.get(cap).is_some_and(|x| !x.is_null()) {
            return Err(invalid(path, cap, "logit soft-capping is not supported"));
        }
    }
    if let Some(act) = v.get("hidden_activation").and_then(Value::as_str) {
        if act != "gelu_pytorch_tanh" {
            return Err(invalid(
                path,
                "hidden_activation",
                format!("`{act}` is not supported (supported: gelu_pytorch_tanh)"),
            ));
        }
    }
    let window = count(
        path,
        "sliding_window",
        v.get("sliding_window").and_then(Value::as_u64),
    )?;
    cfg.layer_windows = match v.get("layer_types").and_then(Value::as_array) {
        Some(kinds) => kinds
            .iter()
            .map(|k| match k.as_str() {
                Some("sliding_attention") => Ok(Some(window)),
                Some("full_attention") => Ok(None),
                _ => Err(invalid(
                    path,
                    "layer_types",
                    "entries must be sliding_attention or full_attention",
                )),
            })
            .collect::<Result<_>>()?,
        None => {
            let pattern = v
                .get("sliding_window_pattern")
                .and_then(Value::as_u64)
                .map_or(DEFAULT_PATTERN, |n| n as usize);
            windows_from_pattern(cfg.num_layers, pattern, window)
        }
    };
    cfg.rope_local_theta = Some(
        v.get("rope_local_base_freq")
            .and_then(Value::as_f64)
            .map_or(LOCAL_ROPE_BASE, |b| b as f32),
    );
    let scalar = v
        .get("query_pre_attn_scalar")
        .and_then(Value::as_f64)
        .map_or(cfg.head_dim as f32, |s| s as f32);
    cfg.attention_scale = Some(1.0 / scalar.sqrt());
    cfg.embed_scale = Some(round_to_bf16((cfg.hidden_size as f32).sqrt()));
    cfg.qk_norm = true;
    cfg.attention_bias = false;
    cfg.norm_weight_offset = 1.0;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sixth_layer_is_global() {
        let w = windows_from_pattern(18, 6, 512);
        let global: Vec<usize> = (0..18).filter(|&i| w[i].is_none()).collect();
        assert_eq!(global, vec![5, 11, 17]);
        assert_eq!(w[0], Some(512));
    }

    #[test]
    fn bf16_rounding_matches_the_reference_scalar() {
        // sqrt(640) = 25.298...; bfloat16 holds 25.25 (8 bits of mantissa).
        assert_eq!(round_to_bf16(640f32.sqrt()), 25.25);
        assert_eq!(round_to_bf16(1.0), 1.0);
        // Ties go to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
        assert_eq!(round_to_bf16(1.0 + 1.0 / 256.0), 1.0);
    }
}
