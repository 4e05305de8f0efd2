//! Inference engine adapter on MLX through mlx-rs: the [`agent_session::InferenceEngine`]
//! and [`agent_session::ChatFormatter`] ports for real models.
//!
//! - Loading: GGUF files (F32, F16, BF16, Q8_0, Q4_0, Q4_1; header validated in Rust first),
//!   Hugging Face / MLX safetensors directories, Hugging Face ids through hf-hub.
//! - Architectures: the Llama family (llama, mistral, qwen2, qwen3), see [`arch`].
//! - Weights: dequantized to f32 at load on Linux (fastest with MLX's CPU backend), kept
//!   quantized on macOS ([`WeightFormat`]).
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
