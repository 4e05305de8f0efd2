//! Application core of `semantic`: agent identity, sessions, token-level prefix matching,
//! the cache coordinator that decides what is reused and what is prefilled, and the
//! **ports** (small traits) that adapters implement: inference engine, cache store,
//! chat formatter (tokenizer + template) and clock.
//!
//! This crate never depends on MLX, tokio's runtime, files, sockets or HTTP.

pub mod agent;
pub mod conversation;
pub mod error;
pub mod kv;
pub mod ports;
pub mod prefix;
pub mod sampling;
pub mod service;
pub mod text;

pub use agent::{AgentId, AgentIdError, AgentKey, Namespace, MAX_AGENT_ID_LEN};
pub use conversation::{
    Conversation, Message, Role, ToolCall, ToolDefinition, INLINE_SYSTEM_PREFIX,
};
pub use error::ServiceError;
pub use kv::{AgentManifest, BlockMeta, KvBlock, KvEncoding, KvPayload, KvTensor, TensorDtype};
pub use ports::{
    BlockingRunner, CacheStore, ChatFormatter, Clock, EngineError, FormatError, InferenceEngine,
    InlineRunner, ModelDescriptor, RemoteTierStats, SequenceId, StepRequest, StoreError,
    StoreStats, SystemClock,
};
pub use sampling::SamplingParams;
pub use service::{
    AgentService, CacheReport, CacheTier, Completion, FinishReason, GenerateRequest,
    GenerationEvent, Persistence, ServiceConfig, DEFAULT_MAX_TOKENS_CAP, RESTORE_GROUP_BLOCKS,
};

/// A token id of the model's vocabulary.
pub type TokenId = u32;
