//! The application core's error type; adapters map it to their own shapes (HTTP status etc.).

use crate::ports::{EngineError, FormatError, StoreError};

/// Why a request to the [`crate::AgentService`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    /// The request itself is invalid (names the problem).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The prompt (plus the requested answer room) exceeds the model's context window.
    #[error("prompt has {prompt_tokens} tokens; the model's context window is {context_length}")]
    ContextTooLong {
        /// Tokens in the rendered prompt.
        prompt_tokens: usize,
        /// The model's context window.
        context_length: usize,
    },
    /// The rendered prompt is so long that it cannot fit the context window whatever its
    /// tokens: refused from its byte length, before it is tokenized.
    #[error("prompt has {prompt_bytes} bytes, at least {min_tokens} tokens; the model's context window is {context_length}")]
    PromptTooLarge {
        /// Bytes of the rendered prompt.
        prompt_bytes: usize,
        /// A lower bound of its tokens (bytes / the most bytes one token stands for).
        min_tokens: usize,
        /// The model's context window.
        context_length: usize,
    },
    /// No capacity now (queue full or KV pool exhausted); retry after the given seconds.
    #[error("server overloaded: {reason}")]
    Overloaded {
        /// What is exhausted.
        reason: String,
        /// Suggested wait before retrying, in seconds.
        retry_after_secs: u64,
    },
    /// The agent does not exist.
    #[error("agent not found: {0}")]
    AgentNotFound(String),
    /// The chat template or tokenizer failed.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The inference engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The cache store failed (only for admin operations; generation treats store failures as misses).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The client went away; the generation was cancelled.
    #[error("cancelled")]
    Cancelled,
}
