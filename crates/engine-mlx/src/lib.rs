//! Inference engine adapter on MLX through mlx-rs: the [`agent_session::InferenceEngine`]
//! and [`agent_session::ChatFormatter`] ports for real models.
//!
//! - Loading: GGUF files (every type of `gguf_quants::SUPPORTED`, read straight from the file
//!   after the header, size, architecture, tokenizer, types and memory are checked),
//!   Hugging Face / MLX safetensors directories, Hugging Face ids through hf-hub.
//! - Architectures: the Llama family (llama, mistral, qwen2, qwen3), see [`arch`].
//! - Weights: the GGUF's own blocks on Linux (prefill through BLAS over dequantized panels,
//!   decode on host block kernels), MLX affine on macOS, or f32 ([`WeightFormat`]).
//! - KV: per-sequence buffers grown a block at a time; whole blocks exported as bytes and
//!   imported bit-exactly ([`kv`]).
//! - Threads: one worker thread owns every MLX object; [`MlxEngine`] is a Send + Sync handle.
//!
//! ```no_run
//! use engine_mlx::{EngineConfig, MlxEngine};
//! let (engine, formatter) = MlxEngine::load("model.gguf", EngineConfig::default())?;
//! # Ok::<(), engine_mlx::Error>(())
//! ```

pub mod arch;
pub mod blas;
pub mod config;
pub mod engine;
pub mod error;
pub mod formatter;
pub mod fused_attention;
pub mod gguf;
pub mod host_attention;
pub mod host_decode;
pub mod host_gemm;
pub mod host_linear;
pub mod hub;
pub mod kv;
pub mod memory;
pub mod sampling;
pub mod weights;

pub use arch::{AttentionKind, DecodeKernel};
pub use config::{Family, ModelConfig, RopeScaling, SUPPORTED_ARCHITECTURES};
pub use engine::{
    inspect, inspect_report, EngineConfig, MemoryEstimate, MlxEngine, WeightsReport,
    DEFAULT_KV_POOL_TOKENS,
};
pub use error::{Error, Result};
pub use formatter::MlxChatFormatter;
pub use weights::WeightFormat;
