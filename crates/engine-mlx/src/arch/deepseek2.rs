//! DeepSeek-V2 (V2-Lite, Coder-V2): multi-head latent attention (MLA), YaRN RoPE and
//! routed + shared experts ([`super::moe`]), on the dense decoder of [`super::llama`].
//!
//! MLA as this engine runs it: per token and layer the cache holds one vector of
//! `rope_dim + kv_lora_rank` values, the RoPE key shared by all heads followed by the
//! normed latent `c` (for V2-Lite 64 + 512 = 576 values, against 16 heads × (192 + 128) =
//! 5,120 for expanded keys and values). The per-head key and value up-projections of
//! `kv_b_proj` are absorbed into the query and output projections at load:
//!
//! - score of head `h`: `q_nope_h · (W_uk_h c) + q_pe_h · k_pe = (W_uk_hᵀ q_nope_h) · c +
//!   q_pe_h · k_pe`, so the query becomes `[q_pe_h ; W_uk_hᵀ W_q_nope_h x]`, against the
//!   cached `[k_pe ; c]`: one KV head of `rope_dim + kv_lora_rank` dims;
//! - output: `W_o concat_h(W_uv_h Σ p c) = Σ_h (W_o,h W_uv_h) (Σ p c)`, so the values are
//!   the cached vectors themselves and `W_o` becomes `[0 ; W_o,h W_uv_h]` per head (the RoPE
//!   part of the attended vector is dropped by zero columns).
//!
//! The YaRN input factor `mscale(factor, mscale) / mscale(factor, mscale_all_dim)` on the
//! RoPE parts is folded into those weight rows (RoPE is linear), the softmax scale is
//! `(nope + rope)^-0.5 · mscale(factor, mscale_all_dim)²`, RoPE is interleaved over the
//! first `rope_dim` dims of each head. The folded weights are dense f32 (the file's blocks
//! are dequantized once for them).

use crate::config::{count, invalid, LatentAttention, ModelConfig, RopeScaling};
use crate::error::{MlxContext, Result};
use crate::weights::{RawTensor, TensorMap};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::Array;
use serde_json::Value;
use std::path::Path;

/// Epsilon of the latent and query low-rank RMSNorms (fixed in the reference).
pub const LATENT_NORM_EPS: f32 = 1e-6;

/// YaRN's attention-magnitude factor `0.1 · m · ln(factor) + 1` (1 when not extending).
pub fn yarn_mscale(factor: f32, m: f32) -> f32 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}

/// RoPE periods (`1 / inverse frequency`) of YaRN over `dims` rotated dims: each pair's
/// frequency is interpolated by `factor` below the ramp between the `beta_fast` and
/// `beta_slow` correction dims and kept above it.
pub fn yarn_periods(
    base: f32,
    dims: usize,
    factor: f32,
    original: f32,
    beta_fast: f32,
    beta_slow: f32,
) -> Vec<f32> {
    let d = dims as f32;
    let correction = |rotations: f32| {
        d * (original / (rotations * 2.0 * std::f32::consts::PI)).ln() / (2.0 * base.ln())
    };
    let low = correction(beta_fast).floor().max(0.0);
    let mut high = correction(beta_slow).ceil().min(d - 1.0);
    if high == low {
        high += 0.001;
    }
    (0..dims / 2)
        .map(|i| {
            let extrapolated = base.powf(-((2 * i) as f32) / d);
            let interpolated = extrapolated / factor;
            let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
            let keep = 1.0 - ramp;
            1.0 / (extrapolated * keep + interpolated * (1.0 - keep))
        })
        .collect()
}

/// The factor on the RoPE parts of queries and keys, and the softmax scale's factor.
fn yarn_factors(c: &ModelConfig) -> (f32, f32) {
    match c.rope_scaling {
        RopeScaling::Yarn {
            factor,
            mscale,
            mscale_all_dim,
            ..
        } => {
            let all = yarn_mscale(factor, mscale_all_dim);
            let rope = yarn_mscale(factor, mscale) / all;
            let softmax = if mscale_all_dim != 0.0 {
                all * all
            } else {
                1.0
            };
            (rope, softmax)
        }
        _ => (1.0, 1.0),
    }
}

/// DeepSeek-V2 attention options from a Hugging Face `config.json` (`model_type`
/// `deepseek_v2`); the experts are read by [`super::moe::from_hf`].
pub fn from_hf(cfg: ModelConfig, path: &Path, v: &Value) -> Result<ModelConfig> {
    let uint = |k: &str| v.get(k).and_then(Value::as_u64);
    let la = LatentAttention {
        kv_lora_rank: count(path, "kv_lora_rank", uint("kv_lora_rank"))?,
        q_lora_rank: match v.get("q_lora_rank") {
            None | Some(Value::Null) => None,
            Some(_) => Some(count(path, "q_lora_rank", uint("q_lora_rank"))?),
        },
        nope_dim: count(path, "qk_nope_head_dim", uint("qk_nope_head_dim"))?,
        rope_dim: count(path, "qk_rope_head_dim", uint("qk_rope_head_dim"))?,
        v_head_dim: count(path, "v_head_dim", uint("v_head_dim"))?,
    };
    if !la.rope_dim.is_multiple_of(2) {
        return Err(invalid(path, "qk_rope_head_dim", "must be even"));
    }
    Ok(latent(cfg, la))
}

/// DeepSeek-V2 attention options from GGUF metadata (`deepseek2.*`, llama.cpp's
/// conversion with `attn_kv_b`): `attention.kv_lora_rank`, `attention.q_lora_rank`,
/// `rope.dimension_count`, the per-head `key_length` / `value_length` (or their `_mla` forms
/// in newer conversions) and YaRN from `rope.scaling.*`: `factor`, `original_context_length`,
/// `yarn_log_multiplier` (= 0.1 · `mscale_all_dim`; `mscale` is taken equal to it, as in
/// every DeepSeek-V2 release, and the correction betas are llama.cpp's 32 and 1).
pub fn from_gguf(mut cfg: ModelConfig, h: &crate::gguf::GgufHeader) -> Result<ModelConfig> {
    let path = h.path.as_path();
    let arch = cfg.architecture.clone();
    let key = |s: &str| format!("{arch}.{s}");
    let uint = |s: &str| h.get(&key(s)).and_then(|v| v.as_u64());
    let float = |s: &str| h.get(&key(s)).and_then(|v| v.as_f64()).map(|x| x as f32);
    let rope_dim = count(
        path,
        &key("rope.dimension_count"),
        uint("rope.dimension_count"),
    )?;
    let (k_len, v_len) = match uint("attention.key_length_mla") {
        Some(_) => ("attention.key_length_mla", "attention.value_length_mla"),
        None => ("attention.key_length", "attention.value_length"),
    };
    let k = count(path, &key(k_len), uint(k_len))?;
    if k <= rope_dim {
        return Err(invalid(path, &key(k_len), "not larger than the RoPE dims"));
    }
    let la = LatentAttention {
        kv_lora_rank: count(
            path,
            &key("attention.kv_lora_rank"),
            uint("attention.kv_lora_rank"),
        )?,
        q_lora_rank: match uint("attention.q_lora_rank") {
            Some(0) | None => None,
            Some(r) => Some(r as usize),
        },
        nope_dim: k - rope_dim,
        rope_dim,
        v_head_dim: count(path, &key(v_len), uint(v_len))?,
    };
    if h.tensor_map().contains_key("blk.0.attn_k_b.weight") {
        return Err(invalid(
            path,
            "blk.0.attn_k_b.weight",
            "GGUFs with split attn_k_b / attn_v_b are not supported yet (convert with attn_kv_b)",
        ));
    }
    if h.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) == Some("yarn") {
        let mscale = float("rope.scaling.yarn_log_multiplier").unwrap_or(0.0) / 0.1;
        cfg.rope_scaling = RopeScaling::Yarn {
            factor: float("rope.scaling.factor").unwrap_or(1.0),
            original_max_position_embeddings: float("rope.scaling.original_context_length")
                .unwrap_or(4096.0),
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale,
            mscale_all_dim: mscale,
        };
    }
    Ok(latent(cfg, la))
}

/// The shape the decoder attends with: one KV head of `rope_dim + kv_lora_rank`,
/// interleaved RoPE over the first `rope_dim` dims, the YaRN-scaled softmax scale.
fn latent(mut cfg: ModelConfig, la: LatentAttention) -> ModelConfig {
    cfg.num_kv_heads = 1;
    cfg.head_dim = la.rope_dim + la.kv_lora_rank;
    cfg.rope_dims = la.rope_dim;
    cfg.rope_traditional = true;
    cfg.attention_bias = false;
    cfg.qk_norm = false;
    cfg.latent_attention = Some(la);
    let (_, softmax) = yarn_factors(&cfg);
    cfg.attention_scale = Some(((la.nope_dim + la.rope_dim) as f32).powf(-0.5) * softmax);
    cfg
}

fn dense(w: &mut TensorMap, name: &str, shape: &[i64]) -> Result<Array> {
    let t = w.take(name)?;
    w.check_shape(name, &t, shape)?;
    t.to_f32()
}

/// Replaces each layer's `attn_q` (or `attn_q_b`), `attn_kv_a_mqa` and `attn_output` by
/// their absorbed forms and drops `attn_kv_b` (see the module docs): afterwards the layer
/// attends like one KV head of `head_dim = rope_dim + kv_lora_rank`.
pub fn absorb_latent_projections(w: &mut TensorMap, c: &ModelConfig) -> Result<()> {
    let Some(la) = c.latent_attention else {
        return Ok(());
    };
    let (rope_factor, _) = yarn_factors(c);
    let factor = Array::from_f32(rope_factor);
    let (h, hid) = (c.num_heads as i32, c.hidden_size as i32);
    let (nope, rope, r, vd) = (
        la.nope_dim as i32,
        la.rope_dim as i32,
        la.kv_lora_rank as i32,
        la.v_head_dim as i32,
    );
    for i in 0..c.num_layers {
        let name = |s: &str| format!("blk.{i}.{s}.weight");
        let (q_name, q_in) = match la.q_lora_rank {
            Some(rq) => (name("attn_q_b"), rq as i32),
            None => (name("attn_q"), hid),
        };
        let wq = dense(w, &q_name, &[(h * (nope + rope)) as i64, q_in as i64])?
            .reshape(&[h, nope + rope, q_in])
            .ctx("query heads")?;
        let kv_b = dense(w, &name("attn_kv_b"), &[(h * (nope + vd)) as i64, r as i64])?
            .reshape(&[h, nope + vd, r])
            .ctx("kv_b heads")?;
        let w_uk = kv_b.try_index((.., ..nope, ..)).ctx("key up-projection")?;
        let w_uv = kv_b
            .try_index((.., nope.., ..))
            .ctx("value up-projection")?;
        let q_pe = wq
            .try_index((.., nope.., ..))
            .ctx("query rope rows")?
            .multiply(&factor)
            .ctx("yarn factor")?;
        let q_latent = w_uk
            .transpose_axes(&[0, 2, 1])
            .ctx("transpose")?
            .matmul(&wq.try_index((.., ..nope, ..)).ctx("query nope rows")?)
            .ctx("absorbing the key up-projection")?;
        let q = mlx_rs::ops::concatenate(&[q_pe, q_latent], 1)
            .ctx("absorbed query")?
            .reshape(&[h * (rope + r), q_in])
            .ctx("absorbed query")?;

        let kv_a = dense(w, &name("attn_kv_a_mqa"), &[(r + rope) as i64, hid as i64])?;
        let k_pe = kv_a
            .try_index((r.., ..))
            .ctx("rope key rows")?
            .multiply(&factor)
            .ctx("yarn factor")?;
        let latent = kv_a.try_index((..r, ..)).ctx("latent rows")?;
        let kv_a = mlx_rs::ops::concatenate(&[k_pe, latent], 0).ctx("latent projection")?;

        let wo = dense(w, &name("attn_output"), &[hid as i64, (h * vd) as i64])?
            .reshape(&[hid, h, vd])
            .ctx("output heads")?
            .transpose_axes(&[1, 0, 2])
            .ctx("transpose")?;
        let o_latent = wo.matmul(&w_uv).ctx("absorbing the value up-projection")?;
        let zeros = mlx_rs::ops::zeros::<f32>(&[h, hid, rope]).ctx("zeros")?;
        let o = mlx_rs::ops::concatenate(&[zeros, o_latent], 2)
            .ctx("absorbed output")?
            .transpose_axes(&[1, 0, 2])
            .ctx("transpose")?
            .reshape(&[hid, h * (rope + r)])
            .ctx("absorbed output")?;
        mlx_rs::transforms::eval([&q, &kv_a, &o]).ctx("absorbing latent projections")?;
        w.tensors.insert(q_name, RawTensor::Dense(q));
        w.tensors
            .insert(name("attn_kv_a_mqa"), RawTensor::Dense(kv_a));
        w.tensors.insert(name("attn_output"), RawTensor::Dense(o));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_frequencies_match_the_reference() {
        // mlx-lm 0.32.2's DeepSeek-V2 YaRN for base 1e4, 8 dims, factor 40, original 64,
        // beta 32 / 1 (the golden fixture): inverse frequencies 1, 0.05125, 2.5e-4, 2.5e-5.
        let periods = yarn_periods(10_000.0, 8, 40.0, 64.0, 32.0, 1.0);
        let inv: Vec<f32> = periods.iter().map(|p| 1.0 / p).collect();
        for (got, want) in inv.iter().zip([1.0, 0.05125, 2.5e-4, 2.5e-5]) {
            assert!((got / want - 1.0).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn mscale_is_one_without_extension() {
        assert_eq!(yarn_mscale(1.0, 0.707), 1.0);
        assert!((yarn_mscale(40.0, 0.707) - (0.1 * 0.707 * 40f32.ln() + 1.0)).abs() < 1e-7);
    }
}
