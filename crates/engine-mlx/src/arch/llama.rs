//! The dense decoder: Llama 1/2/3.x (with `llama3` RoPE scaling), SmolLM, Mistral (dense),
//! Qwen2 (q/k/v bias), Qwen3 (q/k RMSNorm) and, with the options of [`super::gemma3`], Gemma 3
//! (sliding-window layers, GeGLU, post-block norms, scaled embedding), all config-driven.
//!
//! Per layer: `x += o(attn(rope(q), rope(k), v))` over the cached and new tokens with a causal
//! mask (limited to the last `window` keys on sliding layers), then
//! `x += down(act(gate(h)) · up(h))`, with RMSNorm before each block (and after it, with
//! `post_norms`). Activations
//! are 2-D `[rows, hidden]`: the tokens of one sequence (prefill), or one token of each
//! sequence of a batched decode step; attention works per sequence on `[1, heads, tokens, dim]`.

use super::moe::MoeMlp;
use super::{AttentionKind, BuildOptions, CausalLm, DecodeKernel, Logits};
use crate::config::{Activation, ModelConfig, RopeScaling};
use crate::error::{MlxContext, Result};
use crate::fused_attention;
use crate::host_attention;
use crate::host_decode::{self, AttentionShape, Rope};
use crate::kv::{KvLayout, SequenceKv};
use crate::weights::{
    norm_weight_offset, Embedding, HostLinear, Linear, RawTensor, TensorMap, WeightFormat,
};
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{nn, Array};

/// Projections of one attention block, fused or not, or latent ([`super::deepseek2`]).
#[derive(Debug)]
enum Qkv {
    Fused(Linear),
    Split {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// Multi-head latent attention with absorbed projections: the query as one linear or
    /// through a normed low-rank bottleneck, and the cached `[k_pe ; norm(c)]` vector, which
    /// is both key and value.
    Latent {
        q: LatentQuery,
        kv_a: Linear,
        kv_norm: Array,
    },
}

/// The query projection of latent attention.
#[derive(Debug)]
enum LatentQuery {
    Direct(Linear),
    LowRank { a: Linear, norm: Array, b: Linear },
}

/// The MLP of a layer: dense, or a mixture of experts.
#[derive(Debug)]
enum Ffn {
    Dense { gate_up: GateUp, down: Linear },
    Experts(Box<MoeMlp>),
}

/// Gate and up projections, fused or not.
#[derive(Debug)]
enum GateUp {
    Fused(Linear),
    Split { gate: Linear, up: Linear },
}

#[derive(Debug)]
struct Layer {
    attn_norm: Array,
    qkv: Qkv,
    q_norm: Option<Array>,
    k_norm: Option<Array>,
    o: Linear,
    ffn_norm: Array,
    ffn: Ffn,
    /// Norms of the attention's and the MLP's outputs (Gemma), before each residual add.
    post_attn_norm: Option<Array>,
    post_ffn_norm: Option<Array>,
    /// Sliding window of keys; `None`: a global layer.
    window: Option<usize>,
}

/// A Llama-family decoder.
#[derive(Debug)]
pub struct LlamaModel {
    config: ModelConfig,
    embed: Embedding,
    /// Separate LM head; `None` when tied to the embedding.
    head: Option<Linear>,
    /// The tied LM head (the embedding table) packed for the host decode kernel.
    tied_head_host: Option<HostLinear>,
    final_norm: Array,
    layers: Vec<Layer>,
    /// Custom RoPE periods (llama3 scaling), else `None` (plain base).
    rope_freqs: Option<Array>,
    rope_scale: f32,
    /// RoPE base of the sliding-window layers (unscaled), when it differs.
    local_rope_theta: Option<f32>,
    /// Factor of the embedding rows (Gemma), as an f32 scalar.
    embed_scale: Option<Array>,
    /// LongRoPE's attention factor on the rotated dims of q and k (Phi-3): `[head_dim]`, the
    /// factor on the first `rope_dims` entries and 1 after.
    rope_gain: Option<Array>,
    attention_kind: AttentionKind,
    /// What a decode step needs to run wholly on the host ([`DecodeKernel::Host`] when every
    /// linear layer and the LM head have host weights); `None`: decode steps use MLX ops
    /// between the linears.
    host_step: Option<HostStep>,
}

/// Host copies of the small weights of a decode step on the host.
#[derive(Debug)]
struct HostStep {
    rope: Rope,
    /// RoPE of the sliding-window layers, when their base differs.
    local_rope: Option<Rope>,
    final_norm: Vec<f32>,
    layers: Vec<HostNorms>,
}

/// One layer's norm weights on the host.
#[derive(Debug)]
struct HostNorms {
    attn: Vec<f32>,
    ffn: Vec<f32>,
    q: Option<Vec<f32>>,
    k: Option<Vec<f32>>,
    post_attn: Option<Vec<f32>>,
    post_ffn: Option<Vec<f32>>,
}

/// An evaluated f32 array's values, row-major.
pub(crate) fn host_vec(a: &Array) -> Result<Vec<f32>> {
    let a = a
        .as_dtype(mlx_rs::Dtype::Float32)
        .ctx("casting for the host")?
        .contiguous()
        .ctx("copying for the host")?;
    Ok(a.try_as_slice::<f32>().map_err(slice_error)?.to_vec())
}

/// Whether a linear layer has host weights.
fn on_host(l: &Linear) -> bool {
    l.host.is_some()
}

/// RoPE periods `base^(2i/d)` with Llama 3 frequency scaling applied (as mlx-lm does).
fn llama3_freqs(
    base: f32,
    dims: usize,
    factor: f32,
    low: f32,
    high: f32,
    original: f32,
) -> Vec<f32> {
    let low_wavelen = original / low;
    let high_wavelen = original / high;
    (0..dims / 2)
        .map(|i| {
            let f = base.powf((2 * i) as f32 / dims as f32);
            let wavelen = 2.0 * std::f32::consts::PI * f;
            if wavelen > low_wavelen {
                f * factor
            } else if wavelen > high_wavelen && wavelen < low_wavelen {
                let smooth = (original / wavelen - low) / (high - low);
                f / ((1.0 - smooth) / factor + smooth)
            } else {
                f
            }
        })
        .collect()
}

impl LlamaModel {
    /// Builds the model from canonical (GGUF-style) tensors.
    pub fn new(config: ModelConfig, mut w: TensorMap, options: BuildOptions) -> Result<Self> {
        let c = &config;
        let (hidden, hd) = (c.hidden_size as i64, c.head_dim as i64);
        let (nh, nkv) = (c.num_heads as i64, c.num_kv_heads as i64);
        let inter = c.intermediate_size as i64;
        let fmt = options.format;
        let host = options.decode != DecodeKernel::Mlx;

        let embed_raw = w.take("token_embd.weight")?;
        w.check_shape(
            "token_embd.weight",
            &embed_raw,
            &[c.vocab_size as i64, hidden],
        )?;
        let head = if c.tie_word_embeddings {
            None
        } else {
            let t = w.take("output.weight")?;
            w.check_shape("output.weight", &t, &[c.vocab_size as i64, hidden])?;
            Some(Linear::fused(vec![t], vec![None], fmt, host)?)
        };
        let tied_head_host = if (host || fmt == WeightFormat::Host) && c.tie_word_embeddings {
            HostLinear::from_raw(std::slice::from_ref(&embed_raw), None)?
        } else {
            None
        };
        let embed = Embedding::new(embed_raw, fmt)?;
        let offset = c.norm_weight_offset;
        let norm_weight =
            |w: &mut TensorMap, name: &str, dim: usize| norm_weight_offset(w, name, dim, offset);
        let final_norm = norm_weight(&mut w, "output_norm.weight", c.hidden_size)?;

        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let take = |w: &mut TensorMap, s: &str, shape: &[i64]| -> Result<RawTensor> {
                let name = p(s);
                let t = w.take(&name)?;
                w.check_shape(&name, &t, shape)?;
                Ok(t)
            };
            let o = take(&mut w, "attn_output.weight", &[hidden, nh * hd])?;
            // q/k/v biases are required when the config says so (Qwen2); any other bias
            // present in the file (Llama with `attention_bias`/`mlp_bias`) is used too.
            let bias =
                |w: &mut TensorMap, s: &str, n: i64, required: bool| -> Result<Option<RawTensor>> {
                    let name = p(s);
                    let t = if required {
                        Some(w.take(&name)?)
                    } else {
                        w.take_opt(&name)
                    };
                    if let Some(t) = &t {
                        w.check_shape(&name, t, &[n])?;
                    }
                    Ok(t)
                };
            let ob = bias(&mut w, "attn_output.bias", hidden, false)?;
            let (q_norm, k_norm) = if c.qk_norm {
                (
                    Some(norm_weight(&mut w, &p("attn_q_norm.weight"), c.head_dim)?),
                    Some(norm_weight(&mut w, &p("attn_k_norm.weight"), c.head_dim)?),
                )
            } else {
                (None, None)
            };
            let qkv = if let Some(la) = c.latent_attention {
                let q = match la.q_lora_rank {
                    None => LatentQuery::Direct(Linear::fused(
                        vec![take(&mut w, "attn_q.weight", &[nh * hd, hidden])?],
                        vec![None],
                        fmt,
                        host,
                    )?),
                    Some(rq) => LatentQuery::LowRank {
                        a: Linear::fused(
                            vec![take(&mut w, "attn_q_a.weight", &[rq as i64, hidden])?],
                            vec![None],
                            fmt,
                            host,
                        )?,
                        norm: norm_weight(&mut w, &p("attn_q_a_norm.weight"), rq)?,
                        b: Linear::fused(
                            vec![take(&mut w, "attn_q_b.weight", &[nh * hd, rq as i64])?],
                            vec![None],
                            fmt,
                            host,
                        )?,
                    },
                };
                Qkv::Latent {
                    q,
                    kv_a: Linear::fused(
                        vec![take(&mut w, "attn_kv_a_mqa.weight", &[hd, hidden])?],
                        vec![None],
                        fmt,
                        host,
                    )?,
                    kv_norm: norm_weight(&mut w, &p("attn_kv_a_norm.weight"), la.kv_lora_rank)?,
                }
            } else {
                let q = take(&mut w, "attn_q.weight", &[nh * hd, hidden])?;
                let k = take(&mut w, "attn_k.weight", &[nkv * hd, hidden])?;
                let v = take(&mut w, "attn_v.weight", &[nkv * hd, hidden])?;
                let req = c.attention_bias;
                let qb = bias(&mut w, "attn_q.bias", nh * hd, req)?;
                let kb = bias(&mut w, "attn_k.bias", nkv * hd, req)?;
                let vb = bias(&mut w, "attn_v.bias", nkv * hd, req)?;
                if options.fuse_projections {
                    Qkv::Fused(Linear::fused(vec![q, k, v], vec![qb, kb, vb], fmt, host)?)
                } else {
                    Qkv::Split {
                        q: Linear::fused(vec![q], vec![qb], fmt, host)?,
                        k: Linear::fused(vec![k], vec![kb], fmt, host)?,
                        v: Linear::fused(vec![v], vec![vb], fmt, host)?,
                    }
                }
            };
            let ffn = if c.experts.as_ref().is_some_and(|e| e.layers[i]) {
                Ffn::Experts(Box::new(MoeMlp::load(&mut w, i, c, fmt, host)?))
            } else {
                let gate = take(&mut w, "ffn_gate.weight", &[inter, hidden])?;
                let up = take(&mut w, "ffn_up.weight", &[inter, hidden])?;
                let down = take(&mut w, "ffn_down.weight", &[hidden, inter])?;
                let gb = bias(&mut w, "ffn_gate.bias", inter, false)?;
                let ub = bias(&mut w, "ffn_up.bias", inter, false)?;
                let db = bias(&mut w, "ffn_down.bias", hidden, false)?;
                let gate_up = if options.fuse_projections {
                    GateUp::Fused(Linear::fused(vec![gate, up], vec![gb, ub], fmt, host)?)
                } else {
                    GateUp::Split {
                        gate: Linear::fused(vec![gate], vec![gb], fmt, host)?,
                        up: Linear::fused(vec![up], vec![ub], fmt, host)?,
                    }
                };
                Ffn::Dense {
                    gate_up,
                    down: Linear::fused(vec![down], vec![db], fmt, host)?,
                }
            };
            let (post_attn_norm, post_ffn_norm) = if c.post_norms {
                (
                    Some(norm_weight(
                        &mut w,
                        &p("post_attention_norm.weight"),
                        c.hidden_size,
                    )?),
                    Some(norm_weight(
                        &mut w,
                        &p("post_ffw_norm.weight"),
                        c.hidden_size,
                    )?),
                )
            } else {
                (None, None)
            };
            let layer = Layer {
                attn_norm: norm_weight(&mut w, &p("attn_norm.weight"), c.hidden_size)?,
                ffn_norm: norm_weight(&mut w, &p("ffn_norm.weight"), c.hidden_size)?,
                post_attn_norm,
                post_ffn_norm,
                window: c.layer_window(i),
                qkv,
                q_norm,
                k_norm,
                o: Linear::fused(vec![o], vec![ob], fmt, host)?,
                ffn,
            };
            // Materialize layer by layer: the dequantized, unfused copies are freed at once,
            // which keeps the load's peak memory near the final size.
            mlx_rs::transforms::eval(layer_arrays(&layer)).ctx("materializing weights")?;
            layers.push(layer);
        }

        let half = c.rope_dims / 2;
        // The periods RoPE turns with, on the host too (decode steps).
        let mut host_periods = Rope::periods(c.rope_theta, c.rope_dims);
        let (rope_freqs, rope_scale) = match &c.rope_scaling {
            RopeScaling::None => (None, 1.0),
            RopeScaling::Linear { factor } => (None, 1.0 / factor.max(f32::MIN_POSITIVE)),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let f = llama3_freqs(
                    c.rope_theta,
                    c.rope_dims,
                    *factor,
                    *low_freq_factor,
                    *high_freq_factor,
                    *original_max_position_embeddings,
                );
                host_periods.clone_from(&f);
                (Some(Array::from_slice(&f, &[half as i32])), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                ..
            } => {
                let f = super::deepseek2::yarn_periods(
                    c.rope_theta,
                    c.rope_dims,
                    *factor,
                    *original_max_position_embeddings,
                    *beta_fast,
                    *beta_slow,
                );
                host_periods.clone_from(&f);
                (Some(Array::from_slice(&f, &[half as i32])), 1.0)
            }
            RopeScaling::FreqFactors => {
                let t = w.take("rope_freqs.weight")?;
                w.check_shape("rope_freqs.weight", &t, &[half as i64])?;
                let factors = t.to_f32()?;
                let periods: Vec<f32> = (0..half)
                    .map(|i| c.rope_theta.powf((2 * i) as f32 / c.rope_dims as f32))
                    .collect();
                let periods = Array::from_slice(&periods, &[half as i32]);
                let scaled = periods.multiply(&factors).ctx("scaling RoPE periods")?;
                host_periods = host_vec(&scaled)?;
                (Some(scaled), 1.0)
            }
            RopeScaling::LongRope { factors, .. } => {
                let factors = match factors {
                    Some(f) => f.clone(),
                    None => {
                        let t = w.take("rope_factors_long.weight")?;
                        w.check_shape("rope_factors_long.weight", &t, &[half as i64])?;
                        host_vec(&t.to_f32()?)?
                    }
                };
                let f = super::phi3::longrope_periods(c.rope_theta, c.rope_dims, &factors);
                host_periods.clone_from(&f);
                (Some(Array::from_slice(&f, &[half as i32])), 1.0)
            }
        };
        let rope_gain = match c.rope_scaling {
            RopeScaling::LongRope {
                attention_factor, ..
            } if attention_factor != 1.0 => Some(attention_factor),
            _ => None,
        };

        let host_step = if options.decode == DecodeKernel::Host
            && (head.as_ref().map_or(tied_head_host.is_some(), on_host))
            && layers.iter().all(|l| {
                let qkv = match &l.qkv {
                    Qkv::Fused(x) => on_host(x),
                    Qkv::Split { q, k, v } => on_host(q) && on_host(k) && on_host(v),
                    // Latent attention's steps run the MLX path between the host linears.
                    Qkv::Latent { .. } => false,
                };
                // An MoE layer routes per token: its steps run the MLX path between the
                // (host) linears.
                let ffn = match &l.ffn {
                    Ffn::Dense {
                        gate_up: GateUp::Fused(x),
                        down,
                    } => on_host(x) && on_host(down),
                    Ffn::Dense {
                        gate_up: GateUp::Split { gate, up },
                        down,
                    } => on_host(gate) && on_host(up) && on_host(down),
                    Ffn::Experts(_) => false,
                };
                qkv && ffn && on_host(&l.o)
            }) {
            let mut norms = Vec::with_capacity(layers.len());
            for l in &layers {
                norms.push(HostNorms {
                    attn: host_vec(&l.attn_norm)?,
                    ffn: host_vec(&l.ffn_norm)?,
                    q: l.q_norm.as_ref().map(host_vec).transpose()?,
                    k: l.k_norm.as_ref().map(host_vec).transpose()?,
                    post_attn: l.post_attn_norm.as_ref().map(host_vec).transpose()?,
                    post_ffn: l.post_ffn_norm.as_ref().map(host_vec).transpose()?,
                });
            }
            Some(HostStep {
                rope: Rope::new(c.rope_dims, c.rope_traditional, &host_periods, rope_scale)
                    .with_gain(rope_gain.unwrap_or(1.0)),
                local_rope: c.rope_local_theta.map(|base| {
                    let periods = Rope::periods(base, c.rope_dims);
                    Rope::new(c.rope_dims, c.rope_traditional, &periods, 1.0)
                }),
                final_norm: host_vec(&final_norm)?,
                layers: norms,
            })
        } else {
            None
        };

        let local_rope_theta = config.rope_local_theta;
        let embed_scale = config.embed_scale.map(Array::from_f32);
        let rope_gain = rope_gain.map(|g| {
            let v: Vec<f32> = (0..config.head_dim)
                .map(|d| if d < config.rope_dims { g } else { 1.0 })
                .collect();
            Array::from_slice(&v, &[config.head_dim as i32])
        });
        let model = LlamaModel {
            config,
            embed,
            head,
            tied_head_host,
            final_norm,
            layers,
            rope_freqs,
            rope_scale,
            local_rope_theta,
            embed_scale,
            rope_gain,
            attention_kind: options.attention,
            host_step,
        };
        mlx_rs::transforms::eval(model.arrays()).ctx("materializing weights")?;
        Ok(model)
    }

    /// Base, scale and custom periods of the RoPE of a layer: sliding-window layers with
    /// their own base turn unscaled at it.
    fn rope_params(&self, layer: &Layer) -> (Option<f32>, f32, Option<&Array>) {
        match (layer.window, self.local_rope_theta) {
            (Some(_), Some(base)) => (Some(base), 1.0, None),
            _ if self.rope_freqs.is_some() => (None, self.rope_scale, self.rope_freqs.as_ref()),
            _ => (Some(self.config.rope_theta), self.rope_scale, None),
        }
    }

    /// RoPE of `layer` with each batch row (axis 0) at its own start position.
    fn rope_at(&self, layer: &Layer, x: &Array, positions: &Array) -> Result<Array> {
        let c = &self.config;
        let (base, scale, freqs) = self.rope_params(layer);
        fast::rope_dynamic(
            x,
            c.rope_dims as i32,
            c.rope_traditional,
            base,
            scale,
            positions,
            freqs,
        )
        .ctx("rope")
    }

    fn rope(&self, layer: &Layer, x: &Array, offset: i32) -> Result<Array> {
        let c = &self.config;
        let (base, scale, freqs) = self.rope_params(layer);
        fast::rope(
            x,
            c.rope_dims as i32,
            c.rope_traditional,
            base,
            scale,
            offset,
            freqs,
        )
        .ctx("rope")
    }

    /// Embedding rows of `ids`, scaled where the model says so.
    fn embed_lookup(&self, ids: &Array) -> Result<Array> {
        let x = self.embed.lookup(ids)?;
        match &self.embed_scale {
            Some(s) => x.multiply(s).ctx("scaling the embedding"),
            None => Ok(x),
        }
    }

    /// `x + norm(y)` with the post-block norm `post` (Gemma), else `x + y`.
    fn residual(&self, x: &Array, y: &Array, post: Option<&Array>) -> Result<Array> {
        match post {
            Some(w) => x
                .add(fast::rms_norm(y, Some(w), self.config.rms_norm_eps).ctx("post norm")?)
                .ctx("residual"),
            None => x.add(y).ctx("residual"),
        }
    }
}

fn slice_error(e: mlx_rs::error::AsSliceError) -> crate::error::Error {
    crate::error::Error::Request(format!("reading an evaluated array: {e}"))
}

pub(crate) fn rows_of(n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| crate::error::Error::Request("too many tokens".into()))
}

impl LlamaModel {
    /// q, k and v of `h` (`[rows, hidden]`), each 2-D `[rows, heads × dim]`; `decode`: a
    /// decode step (host linears where built).
    fn project_qkv(&self, layer: &Layer, h: &Array, decode: bool) -> Result<(Array, Array, Array)> {
        let c = &self.config;
        let (q_w, kv_w) = (
            (c.num_heads * c.head_dim) as i32,
            (c.num_kv_heads * c.head_dim) as i32,
        );
        match &layer.qkv {
            Qkv::Fused(lin) => {
                let qkv = lin.apply(h, None, decode)?;
                Ok((
                    qkv.try_index((.., ..q_w)).ctx("split q")?,
                    qkv.try_index((.., q_w..q_w + kv_w)).ctx("split k")?,
                    qkv.try_index((.., q_w + kv_w..)).ctx("split v")?,
                ))
            }
            Qkv::Split { q, k, v } => Ok((
                q.apply(h, None, decode)?,
                k.apply(h, None, decode)?,
                v.apply(h, None, decode)?,
            )),
            Qkv::Latent { q, kv_a, kv_norm } => {
                let eps = super::deepseek2::LATENT_NORM_EPS;
                let q = match q {
                    LatentQuery::Direct(lin) => lin.apply(h, None, decode)?,
                    LatentQuery::LowRank { a, norm, b } => {
                        let t = a.apply(h, None, decode)?;
                        let t = fast::rms_norm(&t, Some(norm), eps).ctx("query norm")?;
                        b.apply(&t, None, decode)?
                    }
                };
                let kv = kv_a.apply(h, None, decode)?;
                let rope = c.rope_dims as i32;
                let pe = kv.try_index((.., ..rope)).ctx("rope key")?;
                let latent = kv.try_index((.., rope..)).ctx("latent")?;
                let latent = fast::rms_norm(&latent, Some(kv_norm), eps).ctx("latent norm")?;
                let k = mlx_rs::ops::concatenate(&[pe, latent], 1).ctx("latent key")?;
                Ok((q, k.clone(), k))
            }
        }
    }

    /// Attention of layer `index` for `kvs.len()` sequences with `rows` new tokens each,
    /// whose normed hidden states are `h` (`[sequences × rows, hidden]`, sequence-major):
    /// writes their K/V at each sequence's end (without advancing it) and returns
    /// `[sequences × rows, heads × dim]`. `decode`: a decode step (host linears where built).
    fn attention(
        &self,
        index: usize,
        layer: &Layer,
        h: &Array,
        rows: i32,
        kvs: &mut [&mut SequenceKv],
        decode: bool,
    ) -> Result<Array> {
        let c = &self.config;
        let n = rows_of(kvs.len())?;
        let (nh, nkv, hd) = (c.num_heads as i32, c.num_kv_heads as i32, c.head_dim as i32);
        let (q, k, v) = self.project_qkv(layer, h, decode)?;
        let split = |x: Array, heads: i32| -> Result<Array> {
            x.reshape(&[n, rows, heads, hd])
                .ctx("reshape")?
                .transpose_axes(&[0, 2, 1, 3])
                .ctx("transpose")
        };
        let (q, k, v) = (split(q, nh)?, split(k, nkv)?, split(v, nkv)?);
        let eps = c.rms_norm_eps;
        let (q, k) = match (&layer.q_norm, &layer.k_norm) {
            (Some(qn), Some(kn)) => (
                fast::rms_norm(&q, Some(qn), eps).ctx("q norm")?,
                fast::rms_norm(&k, Some(kn), eps).ctx("k norm")?,
            ),
            _ => (q, k),
        };
        // LongRoPE's attention factor, on the dims RoPE turns (as mlx-lm, before turning).
        let (q, k) = match &self.rope_gain {
            Some(g) => (
                q.multiply(g).ctx("rope attention factor")?,
                k.multiply(g).ctx("rope attention factor")?,
            ),
            None => (q, k),
        };
        let offsets: Vec<i32> = kvs
            .iter()
            .map(|kv| i32::try_from(kv.len()))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| crate::error::Error::Request("sequence too long".into()))?;
        let (q, k) = match offsets.as_slice() {
            [offset] => (
                self.rope(layer, &q, *offset)?,
                self.rope(layer, &k, *offset)?,
            ),
            many => {
                // One RoPE for the whole batch, each row at its own position (bit-identical
                // to a scalar offset).
                let positions = Array::from_slice(many, &[n]);
                (
                    self.rope_at(layer, &q, &positions)?,
                    self.rope_at(layer, &k, &positions)?,
                )
            }
        };
        let scale = c.softmax_scale();
        // Whether the window hides any key from any of the new positions.
        let windowed = layer
            .window
            .filter(|&w| offsets.iter().any(|&o| o as usize + rows as usize > w));
        let pick = |x: &Array, b: i32| -> Result<Array> {
            if n == 1 {
                Ok(x.clone())
            } else {
                x.try_index(b..b + 1).ctx("batch row")
            }
        };
        if self.attention_kind == AttentionKind::Host && rows > 1 && windowed.is_none() {
            let chunk = fused_attention::Chunk {
                heads: c.num_heads,
                kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
                positions: rows as usize,
                offset: 0,
                capacity: 0,
            };
            if chunk.supported() {
                return self.fused_attention(index, chunk, [&q, &k, &v], kvs, scale);
            }
        }
        // The first position each sequence's buffers of this layer hold (a sliding layer
        // drops what its window no longer reaches): masks and key slices are relative to it.
        let bases: Vec<i32> = kvs
            .iter()
            .map(|kv| i32::try_from(kv.layer_base(index)))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| crate::error::Error::Request("sequence too long".into()))?;
        let mut written = Vec::with_capacity(kvs.len());
        for (b, kv) in kvs.iter_mut().enumerate() {
            let b = b as i32;
            written.push(kv.write(index, &pick(&k, b)?, &pick(&v, b)?)?);
        }
        let mut outs = match self.attention_kind {
            AttentionKind::Mlx => {
                let mut outs = Vec::with_capacity(kvs.len());
                for (b, (keys, values)) in written.iter().enumerate() {
                    let qb = pick(&q, b as i32)?;
                    let (offset, total) = (offsets[b] - bases[b], offsets[b] + rows - bases[b]);
                    let o = if let Some(w) = windowed {
                        if rows > 1 {
                            let mask = window_mask(offset, rows, w)?;
                            fast::scaled_dot_product_attention(
                                &qb,
                                keys,
                                values,
                                scale,
                                ScaledDotProductAttentionMask::Array(&mask),
                                None,
                            )
                        } else {
                            // One token: only the last `w` keys.
                            let first = (total - w as i32).max(0);
                            let ks = keys.try_index((.., .., first.., ..)).ctx("window keys")?;
                            let vs = values
                                .try_index((.., .., first.., ..))
                                .ctx("window values")?;
                            fast::scaled_dot_product_attention(&qb, &ks, &vs, scale, None, None)
                        }
                    } else if rows > 1 {
                        fast::scaled_dot_product_attention(
                            &qb,
                            keys,
                            values,
                            scale,
                            ScaledDotProductAttentionMask::Causal,
                            None,
                        )
                    } else {
                        fast::scaled_dot_product_attention(&qb, keys, values, scale, None, None)
                    }
                    .ctx("attention")?;
                    outs.push(o);
                }
                outs
            }
            AttentionKind::Host => {
                let offsets: Vec<usize> = kvs
                    .iter()
                    .map(|kv| kv.len() - kv.layer_base(index))
                    .collect();
                self.host_attention(&q, rows, &written, &offsets, scale, layer.window)?
            }
        };
        let out = if outs.len() == 1 {
            outs.remove(0)
        } else {
            mlx_rs::ops::concatenate(&outs, 0).ctx("joining batch rows")?
        };
        out.transpose_axes(&[0, 2, 1, 3])
            .ctx("transpose")?
            .reshape(&[n * rows, nh * hd])
            .ctx("reshape")
    }

    /// Prefill attention on the host ([`fused_attention`]) for each sequence: writes the
    /// chunk's K/V (`[sequences, kv_heads, rows, dim]`, after RoPE) into its host KV buffers,
    /// then attends `q` (`[sequences, heads, rows, dim]`) to them. Returns `[sequences ×
    /// rows, heads × dim]`.
    fn fused_attention(
        &self,
        index: usize,
        chunk: fused_attention::Chunk,
        [q, k, v]: [&Array; 3],
        kvs: &mut [&mut SequenceKv],
        scale: f32,
    ) -> Result<Array> {
        let (rows, hd) = (chunk.positions, chunk.head_dim);
        let (q, k, v) = (
            q.contiguous().ctx("queries")?,
            k.contiguous().ctx("keys")?,
            v.contiguous().ctx("values")?,
        );
        mlx_rs::transforms::eval([&q, &k, &v]).ctx("attention inputs")?;
        let (qs, ks, vs) = (
            q.try_as_slice::<f32>().map_err(slice_error)?,
            k.try_as_slice::<f32>().map_err(slice_error)?,
            v.try_as_slice::<f32>().map_err(slice_error)?,
        );
        let per_q = chunk.heads * rows * hd;
        let per_kv = chunk.kv_heads * rows * hd;
        if qs.len() != per_q * kvs.len() || ks.len() != per_kv * kvs.len() || vs.len() != ks.len() {
            return Err(crate::error::Error::HostKernel(
                "attention inputs do not match the model's heads".into(),
            ));
        }
        let mut out = vec![0.0f32; qs.len()];
        for (b, kv) in kvs.iter_mut().enumerate() {
            kv.prepare_host()?;
            let shape = fused_attention::Chunk {
                offset: kv.len() - kv.layer_base(index),
                capacity: kv.layer_rows(index),
                ..chunk
            };
            let (keys, values) = kv.host_layer_mut(index)?;
            let new_k = &ks[b * per_kv..][..per_kv];
            let new_v = &vs[b * per_kv..][..per_kv];
            let at = shape.offset * hd;
            let per_head = shape.capacity * hd;
            if at + rows * hd > per_head {
                return Err(crate::error::Error::HostKernel(
                    "the KV buffers have no room for the chunk".into(),
                ));
            }
            for ((kd, vd), (kn, vn)) in keys
                .chunks_exact_mut(per_head)
                .zip(values.chunks_exact_mut(per_head))
                .zip(
                    new_k
                        .chunks_exact(rows * hd)
                        .zip(new_v.chunks_exact(rows * hd)),
                )
            {
                kd[at..][..rows * hd].copy_from_slice(kn);
                vd[at..][..rows * hd].copy_from_slice(vn);
            }
            let ob = &mut out[b * per_q..][..per_q];
            let qb = &qs[b * per_q..][..per_q];
            if !fused_attention::causal_attention(shape, scale, qb, keys, values, ob) {
                return Err(crate::error::Error::HostKernel(
                    "the fused attention does not fit the KV layout".into(),
                ));
            }
        }
        let n = rows_of(kvs.len())?;
        let (nh, r, d) = (rows_of(chunk.heads)?, rows_of(rows)?, rows_of(hd)?);
        Array::from_slice(&out, &[n, nh, r, d])
            .transpose_axes(&[0, 2, 1, 3])
            .ctx("transpose")?
            .reshape(&[n * r, nh * d])
            .ctx("reshape")
    }

    /// Attention with both matmuls in MLX and the masked softmax on the host
    /// ([`host_attention`]): per sequence `b`, `q[b]` (`[heads, rows, dim]` after RoPE)
    /// against its keys and values (`[1, kv_heads, offset + rows, dim]`). Returns one array,
    /// `[sequences, heads, rows, dim]`.
    fn host_attention(
        &self,
        q: &Array,
        rows: i32,
        written: &[(Array, Array)],
        offsets: &[usize],
        scale: f32,
        window: Option<usize>,
    ) -> Result<Vec<Array>> {
        let c = &self.config;
        let (nh, nkv, hd) = (c.num_heads as i32, c.num_kv_heads as i32, c.head_dim as i32);
        // Queries grouped by the KV head they share: [1, kv_heads, group × rows, dim].
        let grouped_rows = nh / nkv.max(1) * rows;
        let n = rows_of(written.len())?;
        let grouped = q
            .reshape(&[n, nkv, grouped_rows, hd])
            .ctx("grouping queries")?;
        let mut scores = Vec::with_capacity(written.len());
        for (b, (keys, _)) in written.iter().enumerate() {
            let qb = if n == 1 {
                grouped.clone()
            } else {
                let b = b as i32;
                grouped.try_index(b..b + 1).ctx("batch row")?
            };
            let kt = keys.transpose_axes(&[0, 1, 3, 2]).ctx("transposing keys")?;
            scores.push(qb.matmul(&kt).ctx("attention scores")?);
        }
        mlx_rs::transforms::eval(scores.iter()).ctx("attention scores")?;
        let mut outs = Vec::with_capacity(written.len());
        for ((s, (_, values)), &offset) in scores.iter().zip(written).zip(offsets) {
            let shape = host_attention::Scores {
                rows: (nkv * grouped_rows) as usize,
                keys: offset + rows as usize,
                positions: rows as usize,
                offset,
                window,
            };
            let data = s.try_as_slice::<f32>().map_err(slice_error)?;
            if !shape.fits(data.len()) {
                return Err(crate::error::Error::Request(
                    "attention scores do not match the KV layout".into(),
                ));
            }
            let mut p = vec![0.0f32; data.len()];
            host_attention::causal_softmax(shape, scale, data, &mut p);
            let p = Array::from_slice(&p, &[1, nkv, grouped_rows, rows_of(shape.keys)?]);
            let o = p.matmul(values).ctx("attention values")?;
            outs.push(o);
        }
        // One reshape for the whole batch: [sequences, heads, rows, dim].
        let all = if outs.len() == 1 {
            outs.remove(0)
        } else {
            mlx_rs::ops::concatenate(&outs, 0).ctx("joining batch rows")?
        };
        Ok(vec![all
            .reshape(&[n, nh, rows, hd])
            .ctx("ungrouping heads")?])
    }

    /// `x + down(act(gate(h)) · up(h))` with `h = norm(x)` (and the post-MLP norm before
    /// the add, where the model has one); `decode`: a decode step.
    fn mlp(&self, layer: &Layer, x: &Array, decode: bool) -> Result<Array> {
        let c = &self.config;
        let h = fast::rms_norm(x, Some(&layer.ffn_norm), c.rms_norm_eps).ctx("rms_norm")?;
        let (gate_up, down_proj) = match &layer.ffn {
            Ffn::Dense { gate_up, down } => (gate_up, down),
            Ffn::Experts(moe) => {
                let y = moe.forward(&h, c.activation, decode)?;
                return self.residual(x, &y, layer.post_ffn_norm.as_ref());
            }
        };
        let down = |a: &Array| -> Result<Array> {
            match &layer.post_ffn_norm {
                Some(post) => {
                    let y = down_proj.apply(a, None, decode)?;
                    self.residual(x, &y, Some(post))
                }
                None => down_proj.apply(a, Some(x), decode),
            }
        };
        let inter = c.intermediate_size as i32;
        let (g, u) = match gate_up {
            GateUp::Fused(lin) if self.attention_kind == AttentionKind::Host => {
                // On the CPU backend, `act(gate) · up` on the host: MLX's compiled kernel
                // calls libm's `fmaf` per element, through the PLT.
                let gu = lin.apply(&h, None, decode)?;
                let a = {
                    let data = gu.try_as_slice::<f32>().map_err(slice_error)?;
                    let rows = data.len() / (2 * c.intermediate_size).max(1);
                    if rows * 2 * c.intermediate_size != data.len() {
                        return Err(crate::error::Error::HostKernel(
                            "gate/up output does not match the MLP's width".into(),
                        ));
                    }
                    let mut a = vec![0.0f32; rows * c.intermediate_size];
                    host_decode::gated(data, c.intermediate_size, c.activation, &mut a);
                    Array::from_slice(&a, &[rows_of(rows)?, inter])
                };
                return down(&a);
            }
            GateUp::Fused(lin) => {
                let gu = lin.apply(&h, None, decode)?;
                (
                    gu.try_index((.., ..inter)).ctx("split gate")?,
                    gu.try_index((.., inter..)).ctx("split up")?,
                )
            }
            GateUp::Split { gate, up } => {
                (gate.apply(&h, None, decode)?, up.apply(&h, None, decode)?)
            }
        };
        let act = match c.activation {
            Activation::Silu => nn::silu(&g).ctx("silu")?,
            Activation::GeluTanh => nn::gelu_approximate(&g).ctx("gelu")?,
        };
        down(&act.multiply(&u).ctx("gated MLP")?)
    }

    /// Final norm and LM head over `[rows, hidden]`; `decode`: a decode step.
    fn head(&self, x: &Array, decode: bool) -> Result<Array> {
        let x = fast::rms_norm(x, Some(&self.final_norm), self.config.rms_norm_eps)
            .ctx("final norm")?;
        match (&self.head, &self.tied_head_host) {
            (Some(head), _) => head.apply(&x, None, decode),
            (None, Some(host)) if decode || matches!(self.embed, Embedding::Host { .. }) => {
                host.forward(&x, None)
            }
            (None, _) => self.embed.as_head(&x),
        }
    }
}

/// Runs a host linear layer (checked at load: [`HostStep`] exists only when all have one).
fn host_of(l: &Linear) -> Result<&HostLinear> {
    l.host.as_deref().ok_or_else(|| {
        crate::error::Error::HostKernel("a linear layer without host weights".into())
    })
}

/// `x += lin(input)` over `rows` rows, with the post-block norm `post` applied to
/// `lin(input)` first when there is one; `scratch` has `x`'s length.
fn post_residual(
    lin: &HostLinear,
    input: &[f32],
    rows: usize,
    x: &mut Vec<f32>,
    scratch: &mut Vec<f32>,
    post: Option<&[f32]>,
    eps: f32,
) -> Result<()> {
    match post {
        None => {
            lin.forward_host(input, rows, Some(x), scratch)?;
            std::mem::swap(x, scratch);
        }
        Some(w) => {
            lin.forward_host(input, rows, None, scratch)?;
            for row in scratch.chunks_exact_mut(w.len().max(1)) {
                host_decode::rms_norm_in_place(row, w, eps);
            }
            for (a, &y) in x.iter_mut().zip(scratch.iter()) {
                *a += y;
            }
        }
    }
    Ok(())
}

/// The additive mask of a sliding-window layer for `rows` new positions after `offset`
/// cached keys: position `r` sees keys `offset + r - window + 1 ..= offset + r`.
/// `[rows, offset + rows]`, 0 where visible, -inf elsewhere.
fn window_mask(offset: i32, rows: i32, window: usize) -> Result<Array> {
    let keys = (offset + rows) as usize;
    let mut m = vec![f32::NEG_INFINITY; rows as usize * keys];
    for (r, row) in m.chunks_exact_mut(keys).enumerate() {
        let last = offset as usize + r;
        let first = (last + 1).saturating_sub(window);
        row[first..=last].fill(0.0);
    }
    Ok(Array::from_slice(&m, &[rows, rows_of(keys)?]))
}

/// Runs `parts` (each `[rows, out_i]`) on `x` and lays their outputs side by side in `y`
/// (`[rows, Σ out_i]`), as one fused layer would.
fn host_split(parts: &[&Linear], x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
    let width = y.len() / rows.max(1);
    let mut at = 0;
    for p in parts {
        let h = host_of(p)?;
        let n = h.out_features();
        let mut part = vec![0.0f32; rows * n];
        h.forward_host(x, rows, None, &mut part)?;
        for (dst, src) in y.chunks_exact_mut(width).zip(part.chunks_exact(n)) {
            dst[at..at + n].copy_from_slice(src);
        }
        at += n;
    }
    Ok(())
}

impl LlamaModel {
    /// Embedding rows of `tokens` on the host, `[tokens, hidden]`.
    fn embed_host(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        let hs = self.config.hidden_size;
        let mut x = vec![0.0f32; tokens.len() * hs];
        if let Some(table) = &self.tied_head_host {
            for (&t, row) in tokens.iter().zip(x.chunks_exact_mut(hs)) {
                table.dequantize_row(t as usize, row)?;
            }
        } else {
            let ids = Array::from_slice(tokens, &[rows_of(tokens.len())?]);
            let e = self.embed.lookup(&ids)?;
            x.copy_from_slice(&host_vec(&e)?);
        }
        if let Some(s) = self.config.embed_scale {
            for v in &mut x {
                *v *= s;
            }
        }
        Ok(x)
    }

    /// A decode step wholly on the host: see [`crate::host_decode`]. Each sequence's new
    /// K/V are written in place into its buffers.
    fn decode_host(
        &self,
        step: &HostStep,
        tokens: &[u32],
        kvs: &mut [&mut SequenceKv],
    ) -> Result<Array> {
        let c = &self.config;
        let b = tokens.len();
        let (hs, hd, inter) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (nh, nkv) = (c.num_heads, c.num_kv_heads);
        let (qw, kvw) = (nh * hd, nkv * hd);
        let qkv_w = qw + 2 * kvw;
        let eps = c.rms_norm_eps;
        let scale = c.softmax_scale();
        for kv in kvs.iter_mut() {
            kv.reserve(kv.len() + 1)?;
            kv.prepare_host()?;
        }
        let tables: Vec<(Vec<f32>, Vec<f32>)> =
            kvs.iter().map(|kv| step.rope.table(kv.len())).collect();
        let local_tables: Option<Vec<(Vec<f32>, Vec<f32>)>> = step
            .local_rope
            .as_ref()
            .map(|r| kvs.iter().map(|kv| r.table(kv.len())).collect());
        let mut x = self.embed_host(tokens)?;
        let mut h = vec![0.0f32; b * hs];
        let mut x2 = vec![0.0f32; b * hs];
        let mut qkv = vec![0.0f32; b * qkv_w];
        let mut att = vec![0.0f32; b * qw];
        let mut gu = vec![0.0f32; b * 2 * inter];
        let mut act = vec![0.0f32; b * inter];
        let mut scratch = Vec::new();
        for (i, (layer, norms)) in self.layers.iter().zip(&step.layers).enumerate() {
            let (rope, tables) = match (&step.local_rope, &local_tables, layer.window) {
                (Some(r), Some(t), Some(_)) => (r, t),
                _ => (&step.rope, &tables),
            };
            host_decode::rms_norm(&x, &norms.attn, eps, &mut h);
            match &layer.qkv {
                Qkv::Fused(lin) => host_of(lin)?.forward_host(&h, b, None, &mut qkv)?,
                Qkv::Split { q, k, v } => host_split(&[q, k, v], &h, b, &mut qkv)?,
                Qkv::Latent { .. } => {
                    return Err(crate::error::Error::HostKernel(
                        "latent attention in a host decode step".into(),
                    ))
                }
            }
            for (r, ((row, out), kv)) in qkv
                .chunks_exact_mut(qkv_w)
                .zip(att.chunks_exact_mut(qw))
                .zip(kvs.iter_mut())
                .enumerate()
            {
                let (q, rest) = row.split_at_mut(qw);
                let (k, v) = rest.split_at_mut(kvw);
                if let (Some(qn), Some(kn)) = (&norms.q, &norms.k) {
                    host_decode::rms_norm_in_place(q, qn, eps);
                    host_decode::rms_norm_in_place(k, kn, eps);
                }
                let (cos, sin) = &tables[r];
                rope.apply(q, hd, cos, sin);
                rope.apply(k, hd, cos, sin);
                let shape = AttentionShape {
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: hd,
                    capacity: kv.layer_rows(i),
                    window: layer.window,
                };
                // Row of the new token in this layer's buffers.
                let pos = kv.len() - kv.layer_base(i);
                let (keys, values) = kv.host_layer_mut(i)?;
                host_decode::attend_one(
                    shape,
                    pos,
                    q,
                    k,
                    v,
                    keys,
                    values,
                    scale,
                    out,
                    &mut scratch,
                );
            }
            post_residual(
                host_of(&layer.o)?,
                &att,
                b,
                &mut x,
                &mut x2,
                norms.post_attn.as_deref(),
                eps,
            )?;
            host_decode::rms_norm(&x, &norms.ffn, eps, &mut h);
            let Ffn::Dense {
                gate_up,
                down: down_proj,
            } = &layer.ffn
            else {
                return Err(crate::error::Error::HostKernel(
                    "an MoE layer in a host decode step".into(),
                ));
            };
            match gate_up {
                GateUp::Fused(lin) => host_of(lin)?.forward_host(&h, b, None, &mut gu)?,
                GateUp::Split { gate, up } => host_split(&[gate, up], &h, b, &mut gu)?,
            }
            host_decode::gated(&gu, inter, c.activation, &mut act);
            post_residual(
                host_of(down_proj)?,
                &act,
                b,
                &mut x,
                &mut x2,
                norms.post_ffn.as_deref(),
                eps,
            )?;
        }
        for kv in kvs.iter_mut() {
            kv.advance(1);
        }
        host_decode::rms_norm(&x, &step.final_norm, eps, &mut h);
        let head = match (&self.head, &self.tied_head_host) {
            (Some(head), _) => host_of(head)?,
            (None, Some(tied)) => tied,
            (None, None) => return Err(crate::error::Error::HostKernel("no host LM head".into())),
        };
        let vocab = head.out_features();
        let mut logits = vec![0.0f32; b * vocab];
        head.forward_host(&h, b, None, &mut logits)?;
        Ok(Array::from_slice(&logits, &[rows_of(b)?, rows_of(vocab)?]))
    }
}

impl CausalLm for LlamaModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn kv_layout(&self, block_tokens: usize) -> KvLayout {
        let c = &self.config;
        KvLayout {
            windows: (0..c.num_layers).map(|i| c.layer_window(i)).collect(),
            // Latent attention caches one vector per token: its keys are its values.
            values_are_keys: c.latent_attention.is_some(),
            ..KvLayout::dense(c.num_layers, c.num_kv_heads, c.head_dim, block_tokens)
        }
    }

    fn forward(&self, tokens: &[u32], kv: &mut SequenceKv, logits: Logits) -> Result<Array> {
        let l = rows_of(tokens.len())?;
        if l == 0 {
            return Err(crate::error::Error::Request(
                "a forward pass needs at least one token".into(),
            ));
        }
        kv.reserve(kv.len() + tokens.len())?;
        let eps = self.config.rms_norm_eps;
        let ids = Array::from_slice(tokens, &[l]);
        let mut x = self.embed_lookup(&ids)?; // [L, hidden]
        for (i, layer) in self.layers.iter().enumerate() {
            let h = fast::rms_norm(&x, Some(&layer.attn_norm), eps).ctx("rms_norm")?;
            let o = self.attention(i, layer, &h, l, &mut [&mut *kv], false)?;
            x = match &layer.post_attn_norm {
                Some(post) => {
                    let y = layer.o.apply(&o, None, false)?;
                    self.residual(&x, &y, Some(post))?
                }
                None => layer.o.forward_residual(&o, &x)?,
            };
            x = self.mlp(layer, &x, false)?;
        }
        kv.advance(tokens.len());

        let x = match logits {
            Logits::Last => x.try_index((l - 1.., ..)).ctx("last position")?,
            Logits::All => x,
        };
        let out = self.head(&x, false)?;
        match logits {
            Logits::Last => out.reshape(&[-1]).ctx("reshape logits"),
            Logits::All => Ok(out),
        }
    }

    fn decode_batch(&self, tokens: &[u32], kvs: &mut [&mut SequenceKv]) -> Result<Array> {
        let b = rows_of(tokens.len())?;
        if tokens.is_empty() || tokens.len() != kvs.len() {
            return Err(crate::error::Error::Request(format!(
                "a batched decode needs one token per sequence ({} tokens, {} sequences)",
                tokens.len(),
                kvs.len()
            )));
        }
        if let Some(step) = &self.host_step {
            return self.decode_host(step, tokens, kvs);
        }
        for kv in kvs.iter_mut() {
            kv.reserve(kv.len() + 1)?;
        }
        let eps = self.config.rms_norm_eps;
        let ids = Array::from_slice(tokens, &[b]);
        let mut x = self.embed_lookup(&ids)?; // [B, hidden]
        for (i, layer) in self.layers.iter().enumerate() {
            let h = fast::rms_norm(&x, Some(&layer.attn_norm), eps).ctx("rms_norm")?;
            // The projections and the MLP see every sequence's row at once (the weights are
            // read once per step); attention is per sequence, over its own cache.
            let o = self.attention(i, layer, &h, 1, kvs, true)?;
            x = match &layer.post_attn_norm {
                Some(post) => {
                    let y = layer.o.apply(&o, None, true)?;
                    self.residual(&x, &y, Some(post))?
                }
                None => layer.o.apply(&o, Some(&x), true)?,
            };
            x = self.mlp(layer, &x, true)?;
        }
        for kv in kvs.iter_mut() {
            kv.advance(1);
        }
        self.head(&x, true)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v: Vec<&Array> = self.embed.arrays();
        v.push(&self.final_norm);
        if let Some(h) = &self.head {
            v.extend(h.arrays());
        }
        if let Some(f) = &self.rope_freqs {
            v.push(f);
        }
        v.extend(self.embed_scale.iter());
        v.extend(self.rope_gain.iter());
        for l in &self.layers {
            v.extend(layer_arrays(l));
        }
        v
    }
}

fn layer_arrays(l: &Layer) -> Vec<&Array> {
    let mut v: Vec<&Array> = vec![&l.attn_norm, &l.ffn_norm];
    v.extend(l.q_norm.iter());
    v.extend(l.k_norm.iter());
    v.extend(l.post_attn_norm.iter());
    v.extend(l.post_ffn_norm.iter());
    match &l.qkv {
        Qkv::Fused(x) => v.extend(x.arrays()),
        Qkv::Split { q, k, v: vv } => {
            v.extend(q.arrays());
            v.extend(k.arrays());
            v.extend(vv.arrays());
        }
        Qkv::Latent { q, kv_a, kv_norm } => {
            match q {
                LatentQuery::Direct(lin) => v.extend(lin.arrays()),
                LatentQuery::LowRank { a, norm, b } => {
                    v.extend(a.arrays());
                    v.push(norm);
                    v.extend(b.arrays());
                }
            }
            v.extend(kv_a.arrays());
            v.push(kv_norm);
        }
    }
    v.extend(l.o.arrays());
    match &l.ffn {
        Ffn::Dense { gate_up, down } => {
            match gate_up {
                GateUp::Fused(x) => v.extend(x.arrays()),
                GateUp::Split { gate, up } => {
                    v.extend(gate.arrays());
                    v.extend(up.arrays());
                }
            }
            v.extend(down.arrays());
        }
        Ffn::Experts(moe) => v.extend(moe.arrays()),
    }
    v
}
