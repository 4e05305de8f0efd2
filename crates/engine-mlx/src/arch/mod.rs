//! Model architectures. Each family is one module implementing [`CausalLm`]; adding Gemma 3
//! (sliding-window + global layers) or DeepSeek-V2 (MLA + MoE) means adding a module and a
//! line in [`build`], not changing the engine.

pub mod llama;

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

/// Options that shape how a model is built for compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOptions {
    /// Weight format.
    pub format: WeightFormat,
    /// One matmul for q/k/v and one for gate/up.
    pub fuse_projections: bool,
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

    /// Every weight array (evaluated once at load).
    fn arrays(&self) -> Vec<&Array>;
}

/// Builds the model of `config` from its weights.
pub fn build(
    config: &ModelConfig,
    weights: TensorMap,
    options: BuildOptions,
) -> Result<Box<dyn CausalLm>> {
    match config.family {
        Family::Llama | Family::Qwen2 | Family::Qwen3 => Ok(Box::new(llama::LlamaModel::new(
            config.clone(),
            weights,
            options,
        )?)),
    }
}
