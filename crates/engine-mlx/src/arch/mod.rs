//! Model architectures. Each family is one module implementing [`CausalLm`]; adding Gemma 3
//! (sliding-window + global layers) or DeepSeek-V2 (MLA + MoE) means adding a module and a
//! line in [`build`], not changing the engine.

pub mod deepseek2;
pub mod gemma3;
pub mod llama;
pub mod moe;
pub mod phi3;

use crate::config::{Family, ModelConfig};
use crate::error::Result;
use crate::kv::{KvLayout, SequenceKv};
use crate::weights::{TensorMap, WeightFormat};
use mlx_rs::Array;

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: `[vocab]`.
    Last,
    /// Every position: `[tokens, vocab]` (tests, scoring).
    All,
}

/// Which attention kernel runs the models' attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKind {
    /// `mlx_rs::fast::scaled_dot_product_attention`: fused on Metal (the macOS default).
    #[cfg_attr(target_os = "macos", default)]
    Mlx,
    /// On the CPU, over the evaluated KV buffers: [`crate::fused_attention`] for prefill
    /// chunks and decode steps (head sizes it has a kernel for), else MLX matmuls with
    /// [`crate::host_attention`]'s softmax; also `silu(gate) · up` on the host. Several times
    /// faster than MLX's CPU fallback at depth (the default elsewhere).
    #[cfg_attr(not(target_os = "macos"), default)]
    Host,
}

impl AttentionKind {
    /// Short name for logs and settings.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKind::Mlx => "mlx",
            AttentionKind::Host => "host",
        }
    }

    /// What the kind adds to the model fingerprint: its name and the revision of its
    /// kernels, raised whenever they change the KV's bits, so that KV cached by an older
    /// build is never taken for this one's.
    pub fn fingerprint(self) -> &'static str {
        match self {
            AttentionKind::Mlx => "mlx",
            AttentionKind::Host => "host/fused-attention-1/host-swiglu",
        }
    }
}

/// Which kernel runs the linear layers of decode steps ([`CausalLm::decode_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DecodeKernel {
    /// MLX, as in prefill (f32 BLAS or `quantized_matmul`, per [`WeightFormat`]): the macOS
    /// default (Metal).
    #[cfg_attr(target_os = "macos", default)]
    Mlx,
    /// [`crate::host_linear`] on the CPU over the file's 4- or 8-bit blocks (Q4_0, Q4_1, Q8_0,
    /// MLX 4/8-bit), for the linears whose weights are stored so; others stay on MLX. A
    /// one-row product streams 5x fewer bytes than f32 BLAS: the default elsewhere. When every
    /// linear and the LM head have host weights, the whole step runs on the host
    /// ([`crate::host_decode`]: norms, RoPE, attention over the KV buffers written in place,
    /// SwiGLU), with no MLX op; otherwise as [`DecodeKernel::HostLinears`]. Prefill always
    /// uses MLX.
    #[cfg_attr(not(target_os = "macos"), default)]
    Host,
    /// The previous host path (A/B and diagnosis): the linears on the host kernel as with
    /// [`DecodeKernel::Host`], everything between them (norms, RoPE, KV writes, attention,
    /// SwiGLU) as MLX ops, with an evaluation before each host product.
    HostLinears,
}

impl DecodeKernel {
    /// Short name for logs and the model fingerprint.
    pub fn name(self) -> &'static str {
        match self {
            DecodeKernel::Mlx => "mlx",
            DecodeKernel::Host => "host",
            DecodeKernel::HostLinears => "host-linears",
        }
    }
}

/// Options that shape how a model is built for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOptions {
    /// Weight format.
    pub format: WeightFormat,
    /// One matmul for q/k/v and one for gate/up.
    pub fuse_projections: bool,
    /// Attention kernel.
    pub attention: AttentionKind,
    /// Kernel of the decode steps' linear layers.
    pub decode: DecodeKernel,
}

/// A decoder-only language model on MLX.
pub trait CausalLm {
    /// Its configuration.
    fn config(&self) -> &ModelConfig;

    /// Shape of its KV cache with blocks of `block_tokens`.
    fn kv_layout(&self, block_tokens: usize) -> KvLayout;

    /// Runs `tokens` (after the `kv.len()` tokens already cached) in one forward pass,
    /// appends their K/V to `kv` and returns lazy f32 logits.
    fn forward(&self, tokens: &[u32], kv: &mut SequenceKv, logits: Logits) -> Result<Array>;

    /// One decode step for several sequences at once: `tokens[i]` is appended to `kvs[i]`.
    /// Returns lazy f32 logits `[sequences, vocab]`. Row `i` must not depend on the other
    /// sequences of the batch (a batch never changes an answer); with
    /// [`DecodeKernel::Mlx`] it equals what [`CausalLm::forward`] of that token alone gives.
    fn decode_batch(&self, tokens: &[u32], kvs: &mut [&mut SequenceKv]) -> Result<Array>;

    /// Every weight array (evaluated once at load).
    fn arrays(&self) -> Vec<&Array>;
}

/// Builds the model of `config` from its weights.
pub fn build(
    config: &ModelConfig,
    mut weights: TensorMap,
    options: BuildOptions,
) -> Result<Box<dyn CausalLm>> {
    if config.latent_attention.is_some() {
        deepseek2::absorb_latent_projections(&mut weights, config)?;
    }
    match config.family {
        // Fused q/k/v and gate/up cut into the canonical tensors, then the dense decoder.
        Family::Phi3 => Ok(Box::new(llama::LlamaModel::new(
            config.clone(),
            phi3::split_fused(config, weights)?,
            options,
        )?)),
        Family::Llama
        | Family::Qwen2
        | Family::Qwen3
        | Family::Gemma3
        | Family::Mixtral
        | Family::Qwen3Moe
        | Family::DeepSeek2 => Ok(Box::new(llama::LlamaModel::new(
            config.clone(),
            weights,
            options,
        )?)),
    }
}
