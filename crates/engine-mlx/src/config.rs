//! Architecture and hyper-parameters, from GGUF metadata or a Hugging Face `config.json`.

use crate::error::{Error, Result};
use crate::gguf::GgufHeader;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Model families with an implementation in this crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 1/2/3.x, SmolLM, Mistral (dense): RMSNorm, RoPE, GQA, SwiGLU.
    Llama,
    /// Qwen2 / Qwen2.5: Llama plus biases on the q/k/v projections.
    Qwen2,
    /// Qwen3 (dense): Llama plus RMSNorm on each query and key head.
    Qwen3,
    /// Gemma 3 (text): sliding-window and global layers with their own RoPE bases, GeGLU,
    /// norms before and after each block, q/k norms, a scaled embedding (see
    /// [`crate::arch::gemma3`]).
    Gemma3,
    /// Mixtral: Llama attention, a sparse mixture of experts in every layer (top-k by router
    /// logit, softmax over the chosen).
    Mixtral,
    /// Qwen3-MoE: Qwen3 attention, experts on the layers `decoder_sparse_step` and
    /// `mlp_only_layers` say (softmax over all, top-k, optionally renormalised).
    Qwen3Moe,
    /// DeepSeek-V2 / V2-Lite / Coder-V2: multi-head latent attention with a latent KV cache,
    /// YaRN RoPE, routed + shared experts (see [`crate::arch::deepseek2`]).
    DeepSeek2,
    /// Phi-3 / Phi-3.5 / Phi-4-mini: Llama with fused q/k/v and gate/up projections (split at
    /// load), partial rotary and LongRoPE (see [`crate::arch::phi3`]).
    Phi3,
}

/// Architecture names accepted, as GGUF `general.architecture` or HF `model_type`.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3",
    "gemma3_text",
    "mixtral",
    "qwen3_moe",
    "qwen3moe",
    "deepseek2",
    "deepseek_v2",
    "phi3",
];

impl Family {
    /// The family of an architecture name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "llama" | "mistral" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            "qwen3" => Some(Family::Qwen3),
            "gemma3" | "gemma3_text" => Some(Family::Gemma3),
            "mixtral" => Some(Family::Mixtral),
            "qwen3_moe" | "qwen3moe" => Some(Family::Qwen3Moe),
            "deepseek2" | "deepseek_v2" => Some(Family::DeepSeek2),
            "phi3" => Some(Family::Phi3),
            _ => None,
        }
    }
}

/// Rotary-embedding frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// None.
    None,
    /// Positions divided by `factor` (`rope_scaling.type == "linear"`).
    Linear {
        /// The factor.
        factor: f32,
    },
    /// Llama 3.x frequency-dependent scaling (`rope_type == "llama3"`).
    Llama3 {
        /// Overall factor.
        factor: f32,
        /// Low-frequency factor.
        low_freq_factor: f32,
        /// High-frequency factor.
        high_freq_factor: f32,
        /// Context length the model was trained with.
        original_max_position_embeddings: f32,
    },
    /// Per-frequency divisors stored in the GGUF (`rope_freqs.weight`, llama.cpp's form of
    /// Llama 3 scaling); read with the weights.
    FreqFactors,
    /// YaRN (`rope_scaling.type == "yarn"`, DeepSeek-V2): frequencies interpolated by
    /// `factor` below a ramp between the `beta_fast` and `beta_slow` rotations, kept above it;
    /// `mscale` / `mscale_all_dim` scale the rotated inputs and the softmax
    /// ([`crate::arch::deepseek2`]).
    Yarn {
        /// Context extension factor.
        factor: f32,
        /// Context length the model was trained with.
        original_max_position_embeddings: f32,
        /// Rotations above which frequencies are kept.
        beta_fast: f32,
        /// Rotations below which frequencies are interpolated.
        beta_slow: f32,
        /// Attention-magnitude factor of the rotated inputs.
        mscale: f32,
        /// Attention-magnitude factor over all dimensions.
        mscale_all_dim: f32,
    },
    /// LongRoPE (Phi-3's `longrope` / `su`), as mlx-lm's `SuScaledRoPE` applies it: the period
    /// of pair `i` is `factors[i] · base^(2i / rope_dims)` (always the long factors, whatever
    /// the sequence length), and the rotated dims of q and k are multiplied by
    /// `attention_factor`.
    LongRope {
        /// `long_factor`, one per rotated pair; `None`: the GGUF tensor
        /// `rope_factors_long.weight`, read with the weights.
        factors: Option<Vec<f32>>,
        /// `sqrt(1 + ln(max_pos / original) / ln(original))` (1 when the context is not
        /// extended).
        attention_factor: f32,
    },
}

/// The activation of the gated MLP, `act(gate) · up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `silu(gate) · up` (SwiGLU: Llama, Qwen, Mistral).
    #[default]
    Silu,
    /// `gelu_tanh(gate) · up` (GeGLU with the tanh approximation: Gemma).
    GeluTanh,
}

/// A sparse mixture-of-experts MLP: per token a router picks `top_k` of `count` experts
/// (each a gated MLP of width `expert_intermediate`) and sums their outputs, weighted.
#[derive(Debug, Clone, PartialEq)]
pub struct Experts {
    /// Routed experts per MoE layer.
    pub count: usize,
    /// Experts each token uses.
    pub top_k: usize,
    /// Inner width of one expert.
    pub expert_intermediate: usize,
    /// Divide the chosen experts' softmax weights by their sum (Mixtral; Qwen3-MoE's
    /// `norm_topk_prob`).
    pub normalize_top_k: bool,
    /// Factor on the routed weights (DeepSeek's `routed_scaling_factor`; 1 elsewhere).
    pub routed_scale: f32,
    /// Inner width of the always-on shared expert, when there is one.
    pub shared_intermediate: Option<usize>,
    /// Per layer, whether it is an MoE layer (else a dense MLP of `intermediate_size`).
    pub layers: Vec<bool>,
    /// Group-limited routing (DeepSeek's `group_limited_greedy`): the experts split into
    /// `groups` equal groups, only the `keep` groups with the highest best probability are
    /// eligible. `None`: plain top-k.
    pub groups: Option<(usize, usize)>,
}

/// Multi-head latent attention (DeepSeek-V2): keys and values of every head come from one
/// compressed latent per token, so the cache holds the latent and the shared RoPE key only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentAttention {
    /// Width of the compressed KV latent (`kv_lora_rank`).
    pub kv_lora_rank: usize,
    /// Width of the query's low-rank bottleneck (`q_lora_rank`), if any.
    pub q_lora_rank: Option<usize>,
    /// Per-head query/key dims without RoPE (`qk_nope_head_dim`).
    pub nope_dim: usize,
    /// Per-head query/key dims with RoPE, shared by all heads on the key side
    /// (`qk_rope_head_dim`).
    pub rope_dim: usize,
    /// Per-head value dims (`v_head_dim`).
    pub v_head_dim: usize,
}

/// Everything the forward pass needs to know about the model's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture name as found (`llama`, `mistral`, `qwen2`, `qwen3`).
    pub architecture: String,
    /// Implementation family.
    pub family: Family,
    /// Residual width.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA).
    pub num_kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// Dimensions rotated per head (usually `head_dim`).
    pub rope_dims: usize,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Interleaved ("traditional") RoPE: true for llama.cpp's permuted Q/K of llama GGUFs.
    pub rope_traditional: bool,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on the q/k/v projections.
    pub attention_bias: bool,
    /// RMSNorm on each query/key head (Qwen3).
    pub qk_norm: bool,
    /// Longest supported context.
    pub context_length: usize,
    /// Gated-MLP activation.
    pub activation: Activation,
    /// Per layer, the keys its attention sees: `None` every earlier one, `Some(w)` only the
    /// last `w` (the token itself included: position `p` sees keys `p - w + 1 ..= p`).
    /// Empty: every layer is global.
    pub layer_windows: Vec<Option<usize>>,
    /// RoPE base of the sliding-window layers when it differs from `rope_theta` (which the
    /// global layers use, with `rope_scaling`); sliding layers are never scaled.
    pub rope_local_theta: Option<f32>,
    /// RMSNorm after the attention and after the MLP too, before each residual add
    /// (Gemma 2/3's "sandwich" norms: `post_attention_norm`, `post_ffw_norm`).
    pub post_norms: bool,
    /// Factor applied to the embedding rows (Gemma: `sqrt(hidden_size)`).
    pub embed_scale: Option<f32>,
    /// Attention softmax scale when it is not `1 / sqrt(head_dim)` (Gemma's
    /// `query_pre_attn_scalar`).
    pub attention_scale: Option<f32>,
    /// Added to every RMSNorm weight at load: 1 for Gemma checkpoints in the Hugging Face
    /// layout, which store `w - 1` (GGUF converters add the 1 themselves).
    pub norm_weight_offset: f32,
    /// Mixture of experts, for the layers it names; `None`: every MLP is dense.
    pub experts: Option<Experts>,
    /// Multi-head latent attention; `None`: standard (grouped-query) attention. With it the
    /// model attends as one KV head of `head_dim = kv_lora_rank + rope_dim` (see
    /// [`crate::arch::deepseek2`]).
    pub latent_attention: Option<LatentAttention>,
}

impl ModelConfig {
    /// The window of layer `i`, if it is a sliding-window layer.
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        self.layer_windows.get(i).copied().flatten()
    }

    /// The attention softmax scale.
    pub fn softmax_scale(&self) -> f32 {
        self.attention_scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }
}

pub(crate) fn missing(path: &Path, field: &str) -> Error {
    Error::MissingField {
        path: path.to_path_buf(),
        field: field.to_owned(),
    }
}

pub(crate) fn invalid(path: &Path, field: &str, reason: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        field: field.to_owned(),
        reason: reason.into(),
    }
}

fn unsupported(path: &Path, arch: &str) -> Error {
    Error::UnsupportedArchitecture {
        path: path.to_path_buf(),
        architecture: arch.to_owned(),
        supported: SUPPORTED_ARCHITECTURES
            .iter()
            .map(|s| s.to_string())
            .collect(),
    }
}

/// A positive count that fits the tensor API's i32 dimensions.
pub(crate) fn count(path: &Path, field: &str, v: Option<u64>) -> Result<usize> {
    match v {
        Some(n) if n > 0 && n <= i32::MAX as u64 => Ok(n as usize),
        Some(n) => Err(invalid(path, field, format!("{n} is out of range"))),
        None => Err(missing(path, field)),
    }
}

impl ModelConfig {
    /// Reads the configuration from GGUF metadata.
    pub fn from_gguf(h: &GgufHeader) -> Result<Self> {
        let path = h.path.as_path();
        let arch = h
            .get("general.architecture")
            .ok_or_else(|| missing(path, "general.architecture"))?
            .as_str()
            .ok_or_else(|| invalid(path, "general.architecture", "must be a string"))?
            .to_owned();
        let family = Family::from_name(&arch).ok_or_else(|| unsupported(path, &arch))?;
        let key = |s: &str| format!("{arch}.{s}");
        let uint = |s: &str| -> Result<Option<u64>> {
            let k = key(s);
            match h.get(&k) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) => Ok(Some(n)),
                    // Per-layer arrays (some converters) are accepted when uniform.
                    None => match v.as_array() {
                        Some(items) if !items.is_empty() => {
                            let first = items[0].as_u64();
                            if items.iter().all(|x| x.as_u64() == first) {
                                Ok(first)
                            } else {
                                Err(invalid(path, &k, "per-layer values differ"))
                            }
                        }
                        _ => Err(invalid(path, &k, "must be an unsigned integer")),
                    },
                },
            }
        };
        let float = |s: &str| -> Result<Option<f64>> {
            let k = key(s);
            match h.get(&k) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| invalid(path, &k, "must be a number")),
            }
        };
        let hidden_size = count(path, &key("embedding_length"), uint("embedding_length")?)?;
        let num_layers = count(path, &key("block_count"), uint("block_count")?)?;
        let num_heads = count(
            path,
            &key("attention.head_count"),
            uint("attention.head_count")?,
        )?;
        let num_kv_heads = count(
            path,
            &key("attention.head_count_kv"),
            uint("attention.head_count_kv")?.or(Some(num_heads as u64)),
        )?;
        let head_dim = match uint("attention.key_length")? {
            Some(d) => count(path, &key("attention.key_length"), Some(d))?,
            None => {
                if !hidden_size.is_multiple_of(num_heads) {
                    return Err(invalid(
                        path,
                        &key("embedding_length"),
                        "not divisible by the head count",
                    ));
                }
                hidden_size / num_heads
            }
        };
        let intermediate_size = count(
            path,
            &key("feed_forward_length"),
            uint("feed_forward_length")?,
        )?;
        let vocab_from_tokens = h
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.len() as u64);
        let vocab_size = count(
            path,
            &key("vocab_size"),
            uint("vocab_size")?.or(vocab_from_tokens),
        )?;
        let rms_norm_eps = float("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f32;
        let rope_theta = float("rope.freq_base")?.unwrap_or(10_000.0) as f32;
        let rope_dims = match uint("rope.dimension_count")? {
            Some(d) => count(path, &key("rope.dimension_count"), Some(d))?,
            None => head_dim,
        };
        let context_length = count(
            path,
            &key("context_length"),
            uint("context_length")?.or(Some(4096)),
        )?;
        let tensors = h.tensor_map();
        let rope_scaling = if tensors.contains_key("rope_freqs.weight") {
            RopeScaling::FreqFactors
        } else {
            match h.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
                Some("linear") => RopeScaling::Linear {
                    factor: float("rope.scaling.factor")?.unwrap_or(1.0) as f32,
                },
                _ => RopeScaling::None,
            }
        };
        let cfg = ModelConfig {
            family,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_dims,
            rope_scaling,
            // llama.cpp permutes Q/K rows of llama-family models for interleaved RoPE; qwen
            // models use NEOX-style (non-interleaved) RoPE and are stored unpermuted.
            rope_traditional: family == Family::Llama,
            tie_word_embeddings: !tensors.contains_key("output.weight"),
            attention_bias: tensors.contains_key("blk.0.attn_q.bias"),
            qk_norm: tensors.contains_key("blk.0.attn_q_norm.weight"),
            context_length,
            architecture: arch,
            ..ModelConfig::plain()
        };
        let cfg = match family {
            Family::Gemma3 => crate::arch::gemma3::from_gguf(cfg, h)?,
            Family::DeepSeek2 => crate::arch::deepseek2::from_gguf(cfg, h)?,
            Family::Phi3 => crate::arch::phi3::from_gguf(cfg, h)?,
            _ => cfg,
        };
        // Experts in any family (`llama` with experts is Mixtral).
        let cfg = crate::arch::moe::from_gguf(cfg, h)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Defaults of the options only some architectures set (SwiGLU, global layers, plain
    /// norms and scales) around placeholder shape fields that every reader overwrites.
    pub(crate) fn plain() -> Self {
        ModelConfig {
            architecture: String::new(),
            family: Family::Llama,
            hidden_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            intermediate_size: 0,
            vocab_size: 0,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_dims: 0,
            rope_scaling: RopeScaling::None,
            rope_traditional: false,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
            context_length: 4096,
            activation: Activation::Silu,
            layer_windows: Vec::new(),
            rope_local_theta: None,
            post_norms: false,
            embed_scale: None,
            attention_scale: None,
            norm_weight_offset: 0.0,
            experts: None,
            latent_attention: None,
        }
    }

    /// Reads the configuration from a Hugging Face `config.json` value.
    pub fn from_hf_config(path: &Path, v: &Value) -> Result<Self> {
        let arch = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| missing(path, "model_type"))?
            .to_owned();
        let family = Family::from_name(&arch).ok_or_else(|| unsupported(path, &arch))?;
        let uint = |k: &str| -> Result<Option<u64>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| invalid(path, k, "must be an unsigned integer")),
            }
        };
        let float = |k: &str| -> Result<Option<f64>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| invalid(path, k, "must be a number")),
            }
        };
        let boolean = |k: &str| -> Result<Option<bool>> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| invalid(path, k, "must be a boolean")),
            }
        };
        let hidden_size = count(path, "hidden_size", uint("hidden_size")?)?;
        let num_layers = count(path, "num_hidden_layers", uint("num_hidden_layers")?)?;
        let num_heads = count(path, "num_attention_heads", uint("num_attention_heads")?)?;
        let num_kv_heads = count(
            path,
            "num_key_value_heads",
            uint("num_key_value_heads")?.or(Some(num_heads as u64)),
        )?;
        let head_dim = match uint("head_dim")? {
            Some(d) => count(path, "head_dim", Some(d))?,
            None => {
                if !hidden_size.is_multiple_of(num_heads) {
                    return Err(invalid(
                        path,
                        "hidden_size",
                        "not divisible by num_attention_heads",
                    ));
                }
                hidden_size / num_heads
            }
        };
        let intermediate_size = count(path, "intermediate_size", uint("intermediate_size")?)?;
        let vocab_size = count(path, "vocab_size", uint("vocab_size")?)?;
        let rope_scaling = match v.get("rope_scaling") {
            None | Some(Value::Null) => RopeScaling::None,
            Some(rs) => {
                let ty = rs
                    .get("rope_type")
                    .or_else(|| rs.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let f = |k: &str, d: f64| rs.get(k).and_then(Value::as_f64).unwrap_or(d) as f32;
                match ty {
                    "llama3" => RopeScaling::Llama3 {
                        factor: f("factor", 8.0),
                        low_freq_factor: f("low_freq_factor", 1.0),
                        high_freq_factor: f("high_freq_factor", 4.0),
                        original_max_position_embeddings: f(
                            "original_max_position_embeddings",
                            8192.0,
                        ),
                    },
                    "linear" => RopeScaling::Linear {
                        factor: f("factor", 1.0),
                    },
                    "yarn" => RopeScaling::Yarn {
                        factor: f("factor", 1.0),
                        original_max_position_embeddings: f(
                            "original_max_position_embeddings",
                            4096.0,
                        ),
                        beta_fast: f("beta_fast", 32.0),
                        beta_slow: f("beta_slow", 1.0),
                        mscale: f("mscale", 1.0),
                        mscale_all_dim: f("mscale_all_dim", 0.0),
                    },
                    "longrope" | "su" => crate::arch::phi3::longrope_from_hf(path, v, rs)?,
                    "default" => RopeScaling::None,
                    other => {
                        return Err(invalid(
                            path,
                            "rope_scaling.rope_type",
                            format!(
                                "`{other}` is not supported (supported: llama3, linear, yarn, longrope)"
                            ),
                        ))
                    }
                }
            }
        };
        let cfg = ModelConfig {
            family,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size,
            vocab_size,
            rms_norm_eps: float("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta: float("rope_theta")?.unwrap_or(10_000.0) as f32,
            rope_dims: head_dim,
            rope_scaling,
            rope_traditional: false,
            tie_word_embeddings: boolean("tie_word_embeddings")?.unwrap_or(family != Family::Qwen2),
            attention_bias: boolean("attention_bias")?.unwrap_or(family == Family::Qwen2),
            qk_norm: matches!(family, Family::Qwen3 | Family::Qwen3Moe),
            context_length: count(
                path,
                "max_position_embeddings",
                uint("max_position_embeddings")?.or(Some(4096)),
            )?,
            architecture: arch,
            ..ModelConfig::plain()
        };
        let cfg = match family {
            Family::Gemma3 => crate::arch::gemma3::from_hf(cfg, path, v)?,
            Family::Mixtral | Family::Qwen3Moe => crate::arch::moe::from_hf(cfg, path, v)?,
            Family::DeepSeek2 => {
                let cfg = crate::arch::deepseek2::from_hf(cfg, path, v)?;
                crate::arch::moe::from_hf(cfg, path, v)?
            }
            Family::Phi3 => crate::arch::phi3::from_hf(cfg, path, v)?,
            _ => cfg,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(invalid(
                path,
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} KV heads",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !self.layer_windows.is_empty() && self.layer_windows.len() != self.num_layers {
            return Err(invalid(
                path,
                "sliding_window",
                format!(
                    "{} layer kinds for {} layers",
                    self.layer_windows.len(),
                    self.num_layers
                ),
            ));
        }
        if let Some(e) = &self.experts {
            if e.count == 0
                || e.top_k == 0
                || e.top_k > e.count
                || e.layers.len() != self.num_layers
            {
                return Err(invalid(
                    path,
                    "num_experts_per_tok",
                    format!(
                        "{} of {} experts per token over {} layer flags for {} layers",
                        e.top_k,
                        e.count,
                        e.layers.len(),
                        self.num_layers
                    ),
                ));
            }
        }
        if self.layer_windows.contains(&Some(0)) {
            return Err(invalid(path, "sliding_window", "a window of 0 tokens"));
        }
        if let RopeScaling::LongRope {
            factors: Some(f), ..
        } = &self.rope_scaling
        {
            if f.len() != self.rope_dims / 2 {
                return Err(invalid(
                    path,
                    "rope_scaling.long_factor",
                    format!(
                        "{} factors for {} rotated pairs",
                        f.len(),
                        self.rope_dims / 2
                    ),
                ));
            }
        }
        if self.rope_dims > self.head_dim || !self.rope_dims.is_multiple_of(2) {
            return Err(invalid(
                path,
                "rope.dimension_count",
                format!(
                    "{} must be even and at most the head dim {}",
                    self.rope_dims, self.head_dim
                ),
            ));
        }
        Ok(())
    }

    /// The path-free description used in logs.
    pub fn summary(&self) -> String {
        format!(
            "{} ({} layers, hidden {}, {}/{} heads of {}, inter {}, vocab {})",
            self.architecture,
            self.num_layers,
            self.hidden_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.intermediate_size,
            self.vocab_size
        )
    }
}

/// Where a model was loaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// One GGUF file.
    Gguf(PathBuf),
    /// A directory with `config.json`, safetensors weights and tokenizer files.
    SafetensorsDir(PathBuf),
}
