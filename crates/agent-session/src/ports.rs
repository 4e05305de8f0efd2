//! The ports: small traits that adapters implement (MLX engine, disk store, tokenizer and
//! chat template, clock) and that testkit fakes in memory.

use crate::agent::{AgentId, AgentKey, Namespace};
use crate::conversation::Conversation;
use crate::kv::{AgentManifest, KvBlock, KvPayload};
use crate::sampling::SamplingParams;
use crate::TokenId;
use async_trait::async_trait;
use block_pool::BlockHash;
use model_cache_spec::ModelCacheSpec;
use serde::Serialize;
use std::sync::Arc;

/// What the rest of the system knows about the loaded model.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDescriptor {
    /// Name shown in `/v1/models` (for example `SmolLM2-135M-Instruct.Q4_1`).
    pub id: String,
    /// Hash of model identity + cache spec + tokenizer: KV from another fingerprint is never used.
    pub fingerprint: String,
    /// Architecture name (for example `llama`).
    pub architecture: String,
    /// Weight format used for compute (for example `f32 (dequantized from Q4_1)`).
    pub weight_format: String,
    /// The KV-cache shape and capacity maths.
    pub spec: ModelCacheSpec,
    /// Longest sequence (prompt + answer) the model supports.
    pub context_length: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
}

/// A handle to one sequence's KV state inside the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SequenceId(pub u64);

/// Errors of an inference engine.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The sequence id is not open.
    #[error("unknown sequence {0:?}")]
    UnknownSequence(SequenceId),
    /// The request is inconsistent with the sequence's state (for example a misaligned import).
    #[error("invalid engine request: {0}")]
    Invalid(String),
    /// The request needs KV that a sliding-window layer no longer holds (truncating a
    /// sequence back past its window, exporting a block that left it). The caller restores
    /// or recomputes instead.
    #[error("KV left the sliding window: {0}")]
    WindowPassed(String),
    /// Imported KV does not fit the model (shape, dtype, encoding).
    #[error("KV payload does not fit the model: {0}")]
    BadPayload(String),
    /// Not enough memory for the request.
    #[error("out of engine memory: {0}")]
    OutOfMemory(String),
    /// The engine's worker stopped.
    #[error("the inference engine stopped")]
    Stopped,
    /// Anything else the backend reported.
    #[error("inference backend error: {0}")]
    Backend(String),
}

/// One sequence's part of a batched decode step.
#[derive(Debug, Clone)]
pub struct StepRequest {
    /// The sequence.
    pub seq: SequenceId,
    /// The token sampled by the previous step, to be fed before sampling; `None` right after
    /// a prefill (sample from the prefill's last logits without a forward pass).
    pub feed: Option<TokenId>,
    /// How to sample.
    pub params: Arc<SamplingParams>,
    /// Index of the token being sampled within this generation (seeds reproducible sampling).
    pub step: u32,
    /// Tokens generated so far in this generation (for presence / frequency penalties).
    pub generated: Arc<[TokenId]>,
}

/// The inference engine port. Implementations own the model and every sequence's KV.
///
/// Numerics contract (warm == cold): `prefill` runs the given tokens as one forward pass,
/// and callers align chunks to absolute multiples of the prefill step, so the KV of a
/// restored prefix plus the same chunks equals a cold run bit for bit.
#[async_trait]
pub trait InferenceEngine: Send + Sync + 'static {
    /// The loaded model.
    fn model(&self) -> &ModelDescriptor;
    /// Opens an empty sequence.
    async fn open_sequence(&self) -> Result<SequenceId, EngineError>;
    /// Appends whole blocks of KV (restored from the store) to a sequence whose length is a
    /// multiple of the block size.
    async fn import_blocks(
        &self,
        seq: SequenceId,
        blocks: Vec<Arc<KvBlock>>,
    ) -> Result<(), EngineError>;
    /// Announces that `tokens` more tokens (whole blocks) are about to be appended to `seq`
    /// by one or more [`InferenceEngine::import_blocks`] calls (a restore that imports each
    /// group of blocks as soon as it is read), so that the engine sizes its buffers once,
    /// exactly as for a single import of them all. A hint: the default does nothing.
    async fn plan_import(&self, seq: SequenceId, tokens: usize) -> Result<(), EngineError> {
        let _ = (seq, tokens);
        Ok(())
    }
    /// Appends `tokens` in one forward pass and keeps the last position's logits for sampling.
    async fn prefill(&self, seq: SequenceId, tokens: Vec<TokenId>) -> Result<(), EngineError>;
    /// One decode step for several sequences at once (weights read once per step). Each entry
    /// feeds its `feed` token (if any), then samples and returns the next token.
    async fn step(
        &self,
        batch: Vec<StepRequest>,
    ) -> Result<Vec<Result<TokenId, EngineError>>, EngineError>;
    /// Copies out whole blocks `first_block..first_block + count` of a sequence's KV.
    async fn export_blocks(
        &self,
        seq: SequenceId,
        first_block: usize,
        count: usize,
    ) -> Result<Vec<KvPayload>, EngineError>;
    /// Cuts a sequence back to its first `tokens` tokens.
    async fn truncate(&self, seq: SequenceId, tokens: usize) -> Result<(), EngineError>;
    /// Number of tokens whose KV the sequence holds.
    async fn sequence_len(&self, seq: SequenceId) -> Result<usize, EngineError>;
    /// Frees a sequence and its KV.
    async fn release(&self, seq: SequenceId) -> Result<(), EngineError>;
}

/// Errors of a cache store.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// An agent id or other input was rejected.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// Stored data was corrupt or foreign (the caller treats it as a miss).
    #[error("corrupt cache entry: {0}")]
    Corrupt(String),
    /// Reading or writing failed.
    #[error("cache store I/O error: {0}")]
    Io(String),
}

/// Size and content of a store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    /// Number of stored blocks.
    pub blocks: u64,
    /// Bytes of stored blocks.
    pub bytes: u64,
    /// Number of agent manifests.
    pub agents: u64,
    /// Blocks written since start.
    pub blocks_written: u64,
    /// Blocks read since start.
    pub blocks_read: u64,
    /// Bytes read since start.
    pub bytes_read: u64,
    /// Entries quarantined (corrupt or foreign) since start.
    pub quarantined: u64,
    /// Blocks deleted by the disk budget since start.
    pub evicted: u64,
    /// Block writes that failed in the background since start (each logged with the block
    /// and the cause; the block stayed RAM-only).
    pub write_errors: u64,
    /// The shared tier behind the local store (an object store), when one is configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteTierStats>,
}

/// State and counters of a shared remote tier (an object store behind the local disk).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RemoteTierStats {
    /// Whether the last request to the remote store succeeded (false: serving from RAM and
    /// local disk only, uploads waiting).
    pub up: bool,
    /// Times the remote store became unreachable since start.
    pub outages: u64,
    /// Remote requests that failed or timed out since start.
    pub errors: u64,
    /// Blocks and manifests waiting to be uploaded.
    pub upload_queue: u64,
    /// Blocks uploaded since start.
    pub blocks_uploaded: u64,
    /// Bytes of blocks uploaded since start.
    pub bytes_uploaded: u64,
    /// Blocks downloaded (and verified) since start.
    pub blocks_downloaded: u64,
    /// Bytes of blocks downloaded since start.
    pub bytes_downloaded: u64,
    /// Manifests uploaded since start.
    pub manifests_uploaded: u64,
    /// Manifest uploads refused because the remote one had a newer generation.
    pub stale_manifests: u64,
    /// Downloaded blocks that failed verification (quarantined, deleted remotely).
    pub quarantined: u64,
    /// The last failure (request and cause), if any since start.
    pub last_error: Option<String>,
}

/// The cache store port: content-addressed KV blocks and per-agent manifests.
#[async_trait]
pub trait CacheStore: Send + Sync + 'static {
    /// Stores blocks that are not stored yet (a block's hash names its content). Writes may
    /// complete in the background; reads see them at once. Returns how many were new.
    async fn save_blocks(&self, blocks: Vec<Arc<KvBlock>>) -> Result<usize, StoreError>;
    /// How many of `hashes`, from the first, are stored (the longest stored prefix).
    async fn stored_prefix(&self, hashes: &[BlockHash]) -> Result<usize, StoreError>;
    /// Loads blocks in order and stops at the first block that is missing, corrupt or of
    /// another model fingerprint: the result is the longest verified prefix.
    async fn load_blocks(
        &self,
        model_fingerprint: &str,
        hashes: &[BlockHash],
    ) -> Result<Vec<Arc<KvBlock>>, StoreError>;
    /// Creates or replaces an agent's manifest.
    async fn save_manifest(&self, manifest: &AgentManifest) -> Result<(), StoreError>;
    /// An agent's manifest, if any.
    async fn load_manifest(&self, key: &AgentKey) -> Result<Option<AgentManifest>, StoreError>;
    /// Deletes an agent's manifest (its blocks go when no manifest needs them). True if it existed.
    async fn delete_manifest(&self, key: &AgentKey) -> Result<bool, StoreError>;
    /// Every manifest of a namespace (`None`: all namespaces).
    async fn list_manifests(
        &self,
        namespace: Option<&Namespace>,
    ) -> Result<Vec<AgentManifest>, StoreError>;
    /// Counters and sizes.
    async fn stats(&self) -> Result<StoreStats, StoreError>;
    /// Waits until every accepted write is durable.
    async fn flush(&self) -> Result<(), StoreError>;
}

/// Errors of the tokenizer or chat template.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FormatError {
    /// The chat template failed to render this conversation.
    #[error("chat template error: {0}")]
    Template(String),
    /// Tokenizing or detokenizing failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
}

/// Tokenizer plus chat template of the loaded model.
pub trait ChatFormatter: Send + Sync + 'static {
    /// Renders a conversation to the prompt text, with the assistant's turn opened when
    /// `add_generation_prompt`. Tools are passed to templates that support them; otherwise a
    /// documented instruction is added to the system prompt.
    fn render(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> Result<String, FormatError>;
    /// Token ids of a rendered prompt (special tokens in the text are recognised; nothing added).
    fn encode(&self, text: &str) -> Result<Vec<TokenId>, FormatError>;
    /// Text of token ids (special tokens skipped).
    fn decode(&self, ids: &[TokenId]) -> Result<String, FormatError>;
    /// Token ids that end generation (end of turn, end of text).
    fn stop_token_ids(&self) -> Vec<TokenId>;
    /// Identity of the tokenizer and template, part of the model fingerprint.
    fn fingerprint(&self) -> String;
    /// The most bytes of text one token can stand for (special tokens' written form
    /// included), for the service's cheap "cannot fit the context" check before a long text
    /// is tokenized. `None` (the default): the service measures it once, from the decoded
    /// text of every token id, with a safety margin.
    fn max_token_bytes(&self) -> Option<usize> {
        None
    }
}

/// Runs CPU-heavy work of a request (template rendering, tokenization) where blocking is
/// fine, away from the caller's async executor. Adapters provide one for their runtime
/// (http-api: tokio's blocking pool, bounded); [`InlineRunner`] runs the job at once.
pub trait BlockingRunner: Send + Sync + 'static {
    /// Runs `job` soon, on a thread that may block; the job sends its own result.
    fn spawn(&self, job: Box<dyn FnOnce() + Send + 'static>);
}

/// A [`BlockingRunner`] that runs each job on the calling thread (tests, tools).
#[derive(Debug, Clone, Copy, Default)]
pub struct InlineRunner;

impl BlockingRunner for InlineRunner {
    fn spawn(&self, job: Box<dyn FnOnce() + Send + 'static>) {
        job();
    }
}

/// Wall-clock time, injectable so tests control it.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The real clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Convenience: the agent key of an id in the default namespace.
pub fn default_key(agent: AgentId) -> AgentKey {
    AgentKey {
        namespace: Namespace::default(),
        agent,
    }
}
