//! The application service: one turn of one agent, from conversation to streamed tokens, with
//! the cache coordinator deciding what is reused (hot from RAM, warm from the store) and what
//! is prefilled, and committing the turn's new blocks afterwards.

mod admission;
mod batcher;
mod hot;

use crate::agent::{AgentId, AgentKey, Namespace};
use crate::conversation::Conversation;
use crate::error::ServiceError;
use crate::kv::{AgentManifest, BlockMeta, KvBlock};
use crate::ports::{
    BlockingRunner, CacheStore, ChatFormatter, Clock, InferenceEngine, InlineRunner,
    ModelDescriptor, SequenceId, StepRequest, StoreStats,
};
use crate::prefix::{common_prefix_len, persistable_len, prefill_chunks, reusable_len};
use crate::sampling::SamplingParams;
use crate::text::{IncrementalDecoder, StopMatcher, StopScan};
use crate::EngineError;
use crate::TokenId;
use admission::Admission;
use batcher::StepBatcher;
use block_pool::BlockHash;
use futures::lock::Mutex as AsyncMutex;
use futures::{SinkExt as _, StreamExt as _};
use hot::{HotSession, HotTier};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Blocks a restore reads per group: each group is imported into the engine as soon as it is
/// read, while the next ones are read. On the 2-core development VM (cold page cache, 16
/// blocks of the default model) groups of 2 with one group of read-ahead restored fastest
/// (median 130 ms against 177 ms for groups of 4, 183 ms for 2 groups of read-ahead, and
/// ~210 ms for reading everything first).
pub const RESTORE_GROUP_BLOCKS: usize = 2;

/// Groups being read beyond the one handed to the importer.
pub const RESTORE_READ_AHEAD: usize = 1;
/// The default of [`ServiceConfig::max_tokens_cap`]: far more than an agent's turn needs
/// (a client asking 64,000 or 128,000 tokens gets at most this many).
pub const DEFAULT_MAX_TOKENS_CAP: u32 = 4096;

/// Settings of the service (validated by [`AgentService::new`]).
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Prefill chunk size in tokens; a positive multiple of the block size. Reuse and
    /// persistence happen in whole chunks (see [`crate::prefix`]).
    pub prefill_step: usize,
    /// Generations that run at once; more wait in the queue.
    pub max_batch_size: usize,
    /// Requests that may wait for a slot; more are refused with `Overloaded`.
    pub max_queue: usize,
    /// Answer length when a request names none.
    pub default_max_tokens: u32,
    /// Longest answer any request may ask for: a larger `max_tokens` is lowered to it (the
    /// answer then ends with [`FinishReason::Length`]). At least `default_max_tokens`.
    pub max_tokens_cap: u32,
    /// Blocks of KV the hot tier (RAM) may hold, active generations included.
    pub hot_capacity_blocks: usize,
    /// Persist new blocks to the store after each turn.
    pub persist: bool,
}

impl ServiceConfig {
    /// Defaults for a model with this block size.
    pub fn for_block_tokens(block_tokens: usize) -> Self {
        Self {
            prefill_step: block_tokens,
            max_batch_size: 4,
            max_queue: 64,
            default_max_tokens: 256,
            max_tokens_cap: DEFAULT_MAX_TOKENS_CAP,
            hot_capacity_blocks: 256,
            persist: true,
        }
    }
}

/// One generation request, API-neutral.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The agent, if the client identified one (otherwise anonymous: shared blocks only).
    pub agent: Option<AgentId>,
    /// The tenant (one per API key).
    pub namespace: Namespace,
    /// What to render.
    pub conversation: Conversation,
    /// How to sample.
    pub params: SamplingParams,
    /// Answer length limit (`None`: the configured default).
    pub max_tokens: Option<u32>,
    /// Stop strings.
    pub stop: Vec<String>,
}

/// Where the reused part of a prompt came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheTier {
    /// The agent's KV was still in RAM.
    Hot,
    /// Blocks were restored from the store (disk).
    Warm,
    /// Nothing was reused.
    Miss,
}

impl CacheTier {
    /// Lower-case name (`hot`, `warm`, `miss`).
    pub fn as_str(self) -> &'static str {
        match self {
            CacheTier::Hot => "hot",
            CacheTier::Warm => "warm",
            CacheTier::Miss => "miss",
        }
    }
}

/// What the cache did for a prompt. `reused + created + uncached == prompt_tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheReport {
    /// Where reused tokens came from.
    pub tier: CacheTier,
    /// Tokens in the rendered prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV was reused (not computed).
    pub reused_tokens: usize,
    /// Prompt tokens computed by this request.
    pub prefilled_tokens: usize,
    /// Prefilled tokens that become cached blocks (whole chunks) for later turns.
    pub created_tokens: usize,
    /// Of those reused, tokens restored from the store.
    pub restored_tokens: usize,
    /// Bytes restored from the store.
    pub restored_bytes: usize,
    /// Time spent loading and importing blocks from the store, in microseconds.
    pub restore_micros: u64,
    /// Time the request waited in the admission queue for a running slot, in milliseconds
    /// of the service's clock (0 when a slot was free at once).
    pub queue_ms: u64,
}

impl CacheReport {
    /// Prompt tokens neither read from nor written to the cache.
    pub fn uncached_tokens(&self) -> usize {
        self.prompt_tokens - self.reused_tokens - self.created_tokens
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum FinishReason {
    /// The model ended its turn (a stop token).
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// A stop string matched (it is not part of the text).
    StopSequence(String),
}

/// A finished generation.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// The answer text (stop string excluded).
    pub text: String,
    /// The generated token ids (stop token excluded).
    pub token_ids: Vec<TokenId>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// What the cache did.
    pub cache: CacheReport,
    /// Whether the turn's cache (new blocks, the agent's manifest) was handed to the store.
    pub persistence: Persistence,
}

/// Whether a turn's cache was persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "status", content = "error")]
pub enum Persistence {
    /// Blocks and manifest were accepted by the store (block files are written in the
    /// background; a later write failure is counted in the store's `write_errors`).
    Saved,
    /// Something was not persisted (the cause); the turn itself succeeded and its KV stays
    /// in RAM. Logged, counted in [`ServiceStats::persist_failures`] and shown by
    /// [`AgentService::agent`] until a later turn of the agent persists.
    Failed(String),
    /// Persistence is switched off ([`ServiceConfig::persist`]).
    Disabled,
}

impl Persistence {
    /// `saved`, `failed` or `disabled`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Persistence::Saved => "saved",
            Persistence::Failed(_) => "failed",
            Persistence::Disabled => "disabled",
        }
    }
}

/// Events of one generation, in order: `Admitted`, `Started`, any number of `Delta`, then
/// `Finished`.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// The request left the admission queue and holds a running slot; nothing is reserved
    /// or computed for it yet. Until this event the generation future may be dropped at no
    /// cost (it only gives up its place in the queue); answering `false` here cancels it
    /// before any work.
    Admitted,
    /// `done` of the `total` prompt tokens this turn must compute are prefilled (sent after
    /// each chunk but the last). Answering `false` stops the prefill there: the sequence is
    /// released and the turn commits nothing (blocks cached by earlier turns stay), so a
    /// client that hangs up during a long prompt stops costing compute within one chunk.
    Prefilling {
        /// Tokens prefilled so far in this turn.
        done: usize,
        /// Tokens this turn prefills in all.
        total: usize,
    },
    /// The prompt is processed; the first token follows.
    Started(CacheReport),
    /// New answer text (whole characters).
    Delta(String),
    /// The end.
    Finished(Completion),
}

/// What the service knows about one agent.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInfo {
    /// The agent.
    pub agent: AgentId,
    /// Its tenant.
    pub namespace: String,
    /// Hot (KV in RAM) or warm (KV on disk only).
    pub tier: CacheTier,
    /// Tokens of its last prompt.
    pub tokens: usize,
    /// Whole blocks cached for it.
    pub blocks: usize,
    /// Pinned agents are evicted last.
    pub pinned: bool,
    /// Last use, unix milliseconds.
    pub last_used_at_ms: u64,
    /// False when the agent's last turn could not be persisted (its manifest on disk, if
    /// any, is older than its KV in RAM, and a restart would lose the difference).
    pub persisted: bool,
    /// Why the last turn was not persisted, when it was not.
    pub persist_error: Option<String>,
}

/// Counters of the service, for `/metrics` and the stats route.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ServiceStats {
    /// Generations finished (or cancelled).
    pub requests: u64,
    /// Turns by tier.
    pub hits_hot: u64,
    /// Turns by tier.
    pub hits_warm: u64,
    /// Turns by tier.
    pub misses: u64,
    /// Prompt tokens reused from cache.
    pub reused_tokens: u64,
    /// Prompt tokens prefilled.
    pub prefilled_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Bytes restored from the store.
    pub restored_bytes: u64,
    /// Hot sessions evicted from RAM.
    pub evictions: u64,
    /// Generations running now.
    pub active: u64,
    /// Requests waiting for a slot.
    pub queued: u64,
    /// Running generations still processing their prompt (restore and prefill), before their
    /// first token.
    pub prefilling: u64,
    /// Running generations in their decode phase now (the current decode batch, up to
    /// `max_batch_size`).
    pub decoding: u64,
    /// Hot-tier blocks in use.
    pub hot_blocks_used: u64,
    /// Hot-tier capacity in blocks.
    pub hot_blocks_total: u64,
    /// Hot-tier blocks reserved by running requests (the rest of `hot_blocks_used` is idle
    /// agents' KV, which can be evicted).
    pub hot_blocks_active: u64,
    /// Largest decode batch so far.
    pub max_decode_batch: u64,
    /// Batched decode steps so far (one engine call each).
    pub decode_steps: u64,
    /// Sequences served by those steps, summed (`/ decode_steps` is the mean batch size).
    pub decode_step_sequences: u64,
    /// Agents with KV in RAM.
    pub hot_agents: u64,
    /// Turns whose cache could not be persisted (see [`Persistence::Failed`]).
    pub persist_failures: u64,
    /// The store's own counters.
    pub store: StoreStats,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    hits_hot: AtomicU64,
    hits_warm: AtomicU64,
    misses: AtomicU64,
    reused_tokens: AtomicU64,
    prefilled_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    restored_bytes: AtomicU64,
    /// A gauge: generations processing their prompt now.
    prefilling: AtomicU64,
    persist_failures: AtomicU64,
}

/// Counts one generation in the `prefilling` gauge while it lives.
struct GaugeGuard<'a>(&'a AtomicU64);

impl<'a> GaugeGuard<'a> {
    fn enter(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::Relaxed);
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Most bytes one token stands for, by decoding every token id: the longest decoded token,
/// doubled, and at least 16 (special tokens decode to nothing, so their written form, like
/// `<|im_start|>`, is not seen; the margin covers them).
fn measure_max_token_bytes(formatter: &dyn ChatFormatter, vocab_size: usize) -> usize {
    if let Some(n) = formatter.max_token_bytes() {
        return n.max(1);
    }
    let longest = (0..vocab_size)
        .filter_map(|id| TokenId::try_from(id).ok())
        .filter_map(|id| formatter.decode(&[id]).ok())
        .map(|t| t.len())
        .max()
        .unwrap_or(0);
    longest.saturating_mul(2).max(16)
}

/// The prompt text of a conversation, with the assistant's turn opened (the one place that
/// renders prompts: [`AgentService::tokenize`] and [`AgentService::prompt_tokens`] go
/// through [`checked_tokens`]).
fn render_prompt(
    formatter: &dyn ChatFormatter,
    conversation: &Conversation,
) -> Result<String, ServiceError> {
    match formatter.render(conversation, true) {
        Ok(text) => Ok(text),
        Err(e) => match conversation.with_inline_system_as_user() {
            Some(fallback) => Ok(formatter.render(&fallback, true).map_err(|_| e)?),
            None => Err(e.into()),
        },
    }
}

/// Renders and tokenizes a conversation; refuses one that cannot fit `context_length` by
/// its byte length before tokenizing it.
fn checked_tokens(
    formatter: &dyn ChatFormatter,
    conversation: &Conversation,
    context_length: usize,
    vocab_size: usize,
    max_token_bytes: &OnceLock<usize>,
) -> Result<Vec<TokenId>, ServiceError> {
    let text = render_prompt(formatter, conversation)?;
    // Every token stands for at least one byte, so a text no longer than the context in
    // bytes always fits; only longer ones need the bound.
    if text.len() > context_length {
        let per_token =
            *max_token_bytes.get_or_init(|| measure_max_token_bytes(formatter, vocab_size));
        let min_tokens = text.len() / per_token.max(1);
        if min_tokens >= context_length {
            return Err(ServiceError::PromptTooLarge {
                prompt_bytes: text.len(),
                min_tokens,
                context_length,
            });
        }
    }
    Ok(formatter.encode(&text)?)
}

/// The application core: serves generations for agents over the four ports.
pub struct AgentService {
    engine: Arc<dyn InferenceEngine>,
    store: Arc<dyn CacheStore>,
    formatter: Arc<dyn ChatFormatter>,
    clock: Arc<dyn Clock>,
    config: ServiceConfig,
    hot: Arc<Mutex<HotTier>>,
    agent_locks: Mutex<HashMap<AgentKey, Arc<AsyncMutex<()>>>>,
    admission: Admission,
    batcher: StepBatcher,
    /// Sequences of generations that were dropped mid-way; released by the next request.
    orphans: Arc<Mutex<Vec<SequenceId>>>,
    counters: Counters,
    /// Where template rendering and tokenization run.
    runner: Arc<dyn BlockingRunner>,
    /// The most bytes one token stands for (measured on first need).
    max_token_bytes: Arc<OnceLock<usize>>,
    /// Agents whose last turn was not persisted, with the cause.
    persist_errors: Mutex<HashMap<AgentKey, String>>,
}

/// Cleans up after a generation future that is dropped before it finishes (client gone,
/// timeout): frees its hot-tier reservation and queues its sequence for release.
struct TurnGuard {
    hot: Arc<Mutex<HotTier>>,
    orphans: Arc<Mutex<Vec<SequenceId>>>,
    owner: hot::Owner,
    seq: Mutex<Option<SequenceId>>,
    done: bool,
    committed: std::sync::atomic::AtomicBool,
}

impl TurnGuard {
    fn set_seq(&self, seq: SequenceId) {
        *lock(&self.seq) = Some(seq);
    }

    /// The session now belongs to the hot tier: nothing to clean up any more.
    fn mark_committed(&self) {
        self.committed.store(true, Ordering::Relaxed);
    }
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        if self.done || self.committed.load(Ordering::Relaxed) {
            return;
        }
        lock(&self.hot).release_owner(&self.owner);
        if let Some(seq) = lock(&self.seq).take() {
            lock(&self.orphans).push(seq);
        }
    }
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService")
            .field("model", &self.engine.model().id)
            .field("config", &self.config)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update of plain bookkeeping;
    // the data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AgentService {
    /// Wires the service to its ports. Fails when the configuration does not fit the model.
    pub fn new(
        engine: Arc<dyn InferenceEngine>,
        store: Arc<dyn CacheStore>,
        formatter: Arc<dyn ChatFormatter>,
        clock: Arc<dyn Clock>,
        config: ServiceConfig,
    ) -> Result<Self, ServiceError> {
        let block = engine.model().spec.block_tokens() as usize;
        if config.prefill_step == 0 || block == 0 || config.prefill_step % block != 0 {
            return Err(ServiceError::InvalidRequest(format!(
                "prefill step {} must be a positive multiple of the block size {block}",
                config.prefill_step
            )));
        }
        if config.max_batch_size == 0 {
            return Err(ServiceError::InvalidRequest(
                "max batch size must be at least 1".into(),
            ));
        }
        if config.max_tokens_cap == 0 || config.default_max_tokens > config.max_tokens_cap {
            return Err(ServiceError::InvalidRequest(format!(
                "the max_tokens cap {} must be at least 1 and at least the default max_tokens {}",
                config.max_tokens_cap, config.default_max_tokens
            )));
        }
        Ok(Self {
            hot: Arc::new(Mutex::new(HotTier::new(config.hot_capacity_blocks))),
            admission: Admission::new(config.max_batch_size, config.max_queue),
            batcher: StepBatcher::new(config.max_batch_size),
            orphans: Arc::new(Mutex::new(Vec::new())),
            engine,
            store,
            formatter,
            clock,
            config,
            agent_locks: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            runner: Arc::new(InlineRunner),
            max_token_bytes: Arc::new(OnceLock::new()),
            persist_errors: Mutex::new(HashMap::new()),
        })
    }

    /// The same service with template rendering and tokenization run by `runner` (off the
    /// caller's async executor; the default runs them inline).
    pub fn with_blocking_runner(mut self, runner: Arc<dyn BlockingRunner>) -> Self {
        self.runner = runner;
        self
    }

    /// The loaded model.
    pub fn model(&self) -> &ModelDescriptor {
        self.engine.model()
    }

    /// The service's configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    fn block_tokens(&self) -> usize {
        self.engine.model().spec.block_tokens() as usize
    }

    /// The prompt tokens a conversation renders to (what generation would see), on the
    /// calling thread. A prompt too long for the context window by its byte length alone is
    /// refused before it is tokenized ([`ServiceError::PromptTooLarge`]).
    ///
    /// A system message after the first message is rendered where it stands, with the
    /// template's system role. A template that refuses that (some allow a system message only
    /// first) gets the conversation of [`Conversation::with_inline_system_as_user`] instead:
    /// each such message becomes a user message whose text starts with `System: `.
    pub fn tokenize(&self, conversation: &Conversation) -> Result<Vec<TokenId>, ServiceError> {
        let model = self.engine.model();
        checked_tokens(
            self.formatter.as_ref(),
            conversation,
            model.context_length,
            model.vocab_size,
            &self.max_token_bytes,
        )
    }

    /// [`AgentService::tokenize`] on the service's [`BlockingRunner`], so that rendering
    /// and tokenizing a long prompt never occupies the caller's async executor.
    pub async fn prompt_tokens(
        &self,
        conversation: &Conversation,
    ) -> Result<Vec<TokenId>, ServiceError> {
        let (tx, rx) = futures::channel::oneshot::channel();
        let formatter = self.formatter.clone();
        let conversation = conversation.clone();
        let model = self.engine.model();
        let (context, vocab) = (model.context_length, model.vocab_size);
        let bound = self.max_token_bytes.clone();
        self.runner.spawn(Box::new(move || {
            let result = checked_tokens(formatter.as_ref(), &conversation, context, vocab, &bound);
            let _ = tx.send(result);
        }));
        rx.await.unwrap_or_else(|_| {
            Err(ServiceError::Format(crate::ports::FormatError::Tokenizer(
                "the tokenization job stopped before it answered".into(),
            )))
        })
    }

    /// Chained hashes of the whole blocks of `tokens[..len]`.
    fn block_hashes(&self, ns: &Namespace, tokens: &[TokenId], len: usize) -> Vec<BlockHash> {
        let b = self.block_tokens();
        let fp = &self.engine.model().fingerprint;
        let mut out: Vec<BlockHash> = Vec::with_capacity(len / b);
        for chunk in tokens[..len].chunks_exact(b) {
            let h = BlockHash::chain(out.last(), chunk, fp, ns.as_str());
            out.push(h);
        }
        out
    }

    fn agent_lock(&self, key: &AgentKey) -> Arc<AsyncMutex<()>> {
        lock(&self.agent_locks)
            .entry(key.clone())
            .or_insert_with(|| Arc::new(AsyncMutex::new(())))
            .clone()
    }

    /// Runs one generation. `on_event` receives the events in order; when it returns `false`
    /// (the client went away) generation stops and the result is [`ServiceError::Cancelled`]:
    /// at `Admitted` before any work; later, the prompt's KV is still committed.
    pub async fn generate<F>(
        &self,
        req: GenerateRequest,
        mut on_event: F,
    ) -> Result<Completion, ServiceError>
    where
        F: FnMut(GenerationEvent) -> bool + Send,
    {
        // One at a time, so that a generation dropped meanwhile loses none of them.
        loop {
            let Some(seq) = lock(&self.orphans).pop() else {
                break;
            };
            let _ = self.engine.release(seq).await;
        }
        let model = self.engine.model();
        let tokens = self.prompt_tokens(&req.conversation).await?;
        let len = tokens.len();
        if len == 0 {
            return Err(ServiceError::InvalidRequest(
                "the prompt renders to no tokens".into(),
            ));
        }
        if len >= model.context_length {
            return Err(ServiceError::ContextTooLong {
                prompt_tokens: len,
                context_length: model.context_length,
            });
        }
        let room = (model.context_length - len) as u64;
        let max_tokens = u64::from(
            req.max_tokens
                .unwrap_or(self.config.default_max_tokens)
                .min(self.config.max_tokens_cap),
        )
        .min(room) as usize;

        let queued_at = self.clock.now_ms();
        let _permit = self.admission.acquire().await?;
        let queue_ms = self.clock.now_ms().saturating_sub(queued_at);
        let key = req.agent.clone().map(|agent| AgentKey {
            namespace: req.namespace.clone(),
            agent,
        });
        let agent_lock = key.as_ref().map(|k| self.agent_lock(k));
        let _agent_guard = match &agent_lock {
            Some(l) => Some(l.lock().await),
            None => None,
        };
        // A client that went away while this request waited is not served.
        if !on_event(GenerationEvent::Admitted) {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            return Err(ServiceError::Cancelled);
        }

        let b = self.block_tokens();
        let step = self.config.prefill_step;
        // What the turn holds at most: sliding layers keep their window plus the chunk being
        // prefilled or the answer being decoded, global layers everything.
        let spec = &self.engine.model().spec;
        let needed_blocks = usize::try_from(
            spec.resident_blocks((len + max_tokens) as u64, (step + max_tokens) as u64),
        )
        .unwrap_or(usize::MAX);
        let owner = hot::Owner::new(key.clone());
        let evicted = lock(&self.hot).reserve(&owner, needed_blocks);
        let evicted = match evicted {
            Ok(e) => e,
            Err(reason) => {
                return Err(ServiceError::Overloaded {
                    reason,
                    retry_after_secs: 2,
                })
            }
        };
        for seq in evicted {
            let _ = self.engine.release(seq).await;
        }

        let mut guard = TurnGuard {
            hot: self.hot.clone(),
            orphans: self.orphans.clone(),
            owner: owner.clone(),
            seq: Mutex::new(None),
            done: false,
            committed: std::sync::atomic::AtomicBool::new(false),
        };
        let result = self
            .run_turn(
                &req,
                key.as_ref(),
                &guard,
                &tokens,
                max_tokens,
                b,
                step,
                queue_ms,
                &mut on_event,
            )
            .await;
        guard.done = true;
        if result.is_err() {
            lock(&self.hot).release_owner(&owner);
        }
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// Restores the blocks `want` from the store after the `reused` tokens of `seq`
    /// (opening a sequence if there is none) and returns the sequence with the restored
    /// tokens and bytes. The blocks are read in groups of [`RESTORE_GROUP_BLOCKS`] and each
    /// group is imported while the next one is read. The restore stops at the first block
    /// that is missing, corrupt, out of chain or refused by the engine, and keeps a whole
    /// number of prefill steps (a cold run's chunk boundaries). A store failure is a miss,
    /// never an error of the request.
    #[allow(clippy::too_many_arguments)]
    async fn restore(
        &self,
        guard: &TurnGuard,
        seq: Option<SequenceId>,
        reused: usize,
        want: &[BlockHash],
        prev: Option<&BlockHash>,
        b: usize,
        step: usize,
    ) -> Result<(Option<SequenceId>, (usize, usize)), ServiceError> {
        let stored = self.store.stored_prefix(want).await.unwrap_or(0);
        let usable = (stored.min(want.len()) * b / step) * step / b;
        let Some(want) = want.get(..usable).filter(|w| !w.is_empty()) else {
            return Ok((seq, (0, 0)));
        };
        let fp = &self.engine.model().fingerprint;
        // The engine opens the sequence and sizes its buffers while the first group is read.
        let setup = async {
            let s = match seq {
                Some(s) => s,
                None => self.engine.open_sequence().await?,
            };
            guard.set_seq(s);
            self.engine.plan_import(s, usable * b).await?;
            Ok::<_, EngineError>(s)
        };
        // The reader keeps RESTORE_READ_AHEAD groups beyond the one it hands over being read
        // (each load reads on threads of its own), and the importer takes the groups in
        // order; either stops the other by hanging up.
        let (mut tx, mut rx) = futures::channel::mpsc::channel(RESTORE_READ_AHEAD);
        let reader = async move {
            let mut groups = want.chunks(RESTORE_GROUP_BLOCKS);
            let mut reading = futures::stream::FuturesOrdered::new();
            let load = |group| async move { (group, self.store.load_blocks(fp, group).await) };
            for group in groups.by_ref().take(RESTORE_READ_AHEAD + 1) {
                reading.push_back(load(group));
            }
            while let Some((group, loaded)) = reading.next().await {
                let blocks = loaded.unwrap_or_default();
                let complete = blocks.len() == group.len();
                if tx.send((group, blocks)).await.is_err() || !complete {
                    break;
                }
                if let Some(next) = groups.next() {
                    reading.push_back(load(next));
                }
            }
        };
        // Owns the receiver: however it ends, the reader's next send fails and it stops.
        let importer = async move {
            let s = setup.await?;
            let mut prev = prev.copied();
            let mut kept_bytes: Vec<usize> = Vec::with_capacity(usable);
            while let Some((group, mut blocks)) = rx.next().await {
                // The verified prefix of the group that continues the chain.
                let mut keep = 0;
                for (block, hash) in blocks.iter().zip(group) {
                    if block.meta.hash != *hash || (prev.is_some() && block.meta.parent != prev) {
                        break;
                    }
                    prev = Some(*hash);
                    keep += 1;
                }
                blocks.truncate(keep);
                if blocks.is_empty() {
                    break;
                }
                let bytes: Vec<usize> = blocks.iter().map(|x| x.payload.byte_len()).collect();
                // A payload that does not fit is a miss from here on.
                let imported = self.engine.import_blocks(s, blocks).await;
                if imported.is_err() {
                    break;
                }
                kept_bytes.extend(bytes);
                if keep < group.len() {
                    break;
                }
            }
            Ok::<_, EngineError>((s, kept_bytes))
        };
        let ((), imported) = futures::future::join(reader, importer).await;
        let (s, kept_bytes) = imported?;
        // Keep whole prefill steps: what follows is prefilled in a cold run's chunks.
        let blocks = (kept_bytes.len() * b / step) * step / b;
        if blocks < kept_bytes.len() || kept_bytes.len() < usable {
            match self.engine.truncate(s, reused + blocks * b).await {
                Ok(()) => {}
                // A restore cut short before a sliding layer's window: start over cold.
                Err(EngineError::WindowPassed(_)) => {
                    let _ = self.engine.release(s).await;
                    return Ok((None, (0, 0)));
                }
                Err(e) => return Err(e.into()),
            }
        }
        let bytes = kept_bytes.iter().take(blocks).sum();
        Ok((Some(s), (blocks * b, bytes)))
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_turn<F>(
        &self,
        req: &GenerateRequest,
        key: Option<&AgentKey>,
        guard: &TurnGuard,
        tokens: &[TokenId],
        max_tokens: usize,
        b: usize,
        step: usize,
        queue_ms: u64,
        on_event: &mut F,
    ) -> Result<Completion, ServiceError>
    where
        F: FnMut(GenerationEvent) -> bool + Send,
    {
        let prefilling = GaugeGuard::enter(&self.counters.prefilling);
        let len = tokens.len();
        let persist_len = persistable_len(len, step);
        let hashes = self.block_hashes(&req.namespace, tokens, persist_len);
        let max_reuse = reusable_len(len, len, step);

        // 1. Hot: the agent's own KV still in RAM.
        let mut tier = CacheTier::Miss;
        let mut reused = 0usize;
        let mut seq: Option<SequenceId> = None;
        if let Some(key) = key {
            let taken = lock(&self.hot).take_session(key);
            if let Some(hot) = taken {
                let r = reusable_len(common_prefix_len(&hot.tokens, tokens), len, step);
                guard.set_seq(hot.seq);
                // Cutting back further than a sliding window reaches is a miss of the hot
                // tier (the store may still have the blocks).
                let cut = match r {
                    0 => false,
                    r => match self.engine.truncate(hot.seq, r).await {
                        Ok(()) => true,
                        Err(EngineError::WindowPassed(_)) => false,
                        Err(e) => return Err(e.into()),
                    },
                };
                if cut {
                    seq = Some(hot.seq);
                    reused = r;
                    tier = CacheTier::Hot;
                } else {
                    let _ = self.engine.release(hot.seq).await;
                }
            }
        }

        // 2. Warm: content-addressed blocks in the store (this agent's, or shared prefixes).
        let restore_start = std::time::Instant::now();
        let (restored_tokens, restored_bytes) = if reused < max_reuse {
            let want = &hashes[reused / b..max_reuse / b];
            let prev = (reused / b).checked_sub(1).and_then(|i| hashes.get(i));
            let (s, restored) = self
                .restore(guard, seq, reused, want, prev, b, step)
                .await?;
            if seq.is_some() && s.is_none() {
                // The restore gave the sequence up, hot prefix included.
                reused = 0;
                tier = CacheTier::Miss;
            }
            seq = s;
            restored
        } else {
            (0, 0)
        };
        if restored_tokens > 0 {
            reused += restored_tokens;
            if tier == CacheTier::Miss {
                tier = CacheTier::Warm;
            }
        }
        let restore_elapsed = restore_start.elapsed();
        let seq = match seq {
            Some(s) => s,
            None => self.engine.open_sequence().await?,
        };
        guard.set_seq(seq);

        // 3. Prefill the rest in aligned chunks. A model with sliding-window layers drops
        // blocks from RAM at the next chunk, so each chunk's new whole blocks are stored
        // right after it; otherwise all of them are stored at the commit.
        let store_per_chunk =
            self.config.persist && self.engine.model().spec.num_sliding_layers() > 0;
        let mut saved = reused / b;
        let mut save_failure: Option<String> = None;
        for chunk in prefill_chunks(reused, len, step) {
            let end = chunk.end;
            if let Err(e) = self.engine.prefill(seq, tokens[chunk].to_vec()).await {
                let _ = self.engine.release(seq).await;
                return Err(e.into());
            }
            let whole = end.min(persist_len) / b;
            if store_per_chunk && whole > saved {
                if let Some(f) = self
                    .save_new_blocks(seq, tokens, &hashes, saved, whole - saved)
                    .await
                {
                    save_failure.get_or_insert(f);
                }
                saved = whole;
            }
            let progress = GenerationEvent::Prefilling {
                done: end - reused,
                total: len - reused,
            };
            if end < len && !on_event(progress) {
                let _ = self.engine.release(seq).await;
                return Err(ServiceError::Cancelled);
            }
        }
        let report = CacheReport {
            tier,
            prompt_tokens: len,
            reused_tokens: reused,
            prefilled_tokens: len - reused,
            created_tokens: persist_len.saturating_sub(reused),
            restored_tokens,
            restored_bytes,
            restore_micros: if restored_tokens > 0 {
                u64::try_from(restore_elapsed.as_micros()).unwrap_or(u64::MAX)
            } else {
                0
            },
            queue_ms,
        };
        drop(prefilling);
        match tier {
            CacheTier::Hot => &self.counters.hits_hot,
            CacheTier::Warm => &self.counters.hits_warm,
            CacheTier::Miss => &self.counters.misses,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.counters
            .reused_tokens
            .fetch_add(reused as u64, Ordering::Relaxed);
        self.counters
            .prefilled_tokens
            .fetch_add((len - reused) as u64, Ordering::Relaxed);
        self.counters
            .restored_bytes
            .fetch_add(restored_bytes as u64, Ordering::Relaxed);
        let mut cancelled = !on_event(GenerationEvent::Started(report.clone()));

        // 4. Decode.
        let decoded = if cancelled {
            Ok((String::new(), Vec::new(), FinishReason::Stop))
        } else {
            self.decode_loop(req, seq, max_tokens, on_event, &mut cancelled)
                .await
        };
        let (text, generated, finish_reason) = match decoded {
            Ok(x) => x,
            Err(e) => {
                let _ = self.engine.release(seq).await;
                return Err(e);
            }
        };
        self.counters
            .generated_tokens
            .fetch_add(generated.len() as u64, Ordering::Relaxed);

        // 5. Commit: drop decode-made KV, persist new whole chunks, keep the session hot.
        let persistence = self
            .commit(
                key,
                guard,
                seq,
                tokens,
                &hashes,
                (saved, save_failure),
                persist_len,
            )
            .await?;

        if cancelled {
            return Err(ServiceError::Cancelled);
        }
        let completion = Completion {
            text,
            token_ids: generated,
            finish_reason,
            cache: report,
            persistence,
        };
        on_event(GenerationEvent::Finished(completion.clone()));
        Ok(completion)
    }

    async fn decode_loop<F>(
        &self,
        req: &GenerateRequest,
        seq: SequenceId,
        max_tokens: usize,
        on_event: &mut F,
        cancelled: &mut bool,
    ) -> Result<(String, Vec<TokenId>, FinishReason), ServiceError>
    where
        F: FnMut(GenerationEvent) -> bool + Send,
    {
        let stop_ids = self.formatter.stop_token_ids();
        let params = Arc::new(req.params.clone());
        let mut generated: Vec<TokenId> = Vec::new();
        let mut decoder = IncrementalDecoder::new();
        let mut stopper = StopMatcher::new(&req.stop);
        let mut text = String::new();
        let mut feed = None;
        let mut finish = FinishReason::Length;
        let _slot = self.batcher.register();
        for i in 0..max_tokens {
            let tok = self
                .batcher
                .step(
                    self.engine.as_ref(),
                    StepRequest {
                        seq,
                        feed,
                        params: params.clone(),
                        step: i as u32,
                        generated: generated.clone().into(),
                    },
                )
                .await?;
            if stop_ids.contains(&tok) {
                finish = FinishReason::Stop;
                break;
            }
            generated.push(tok);
            feed = Some(tok);
            if let Some(piece) = decoder.push(self.formatter.as_ref(), tok)? {
                match stopper.push(&piece) {
                    StopScan::Continue(t) => {
                        if !t.is_empty() {
                            text.push_str(&t);
                            if !on_event(GenerationEvent::Delta(t)) {
                                *cancelled = true;
                                return Ok((text, generated, finish));
                            }
                        }
                    }
                    StopScan::Stopped { text: t, stop } => {
                        if !t.is_empty() {
                            text.push_str(&t);
                            *cancelled = !on_event(GenerationEvent::Delta(t));
                        }
                        return Ok((text, generated, FinishReason::StopSequence(stop)));
                    }
                }
            }
        }
        let mut tail = decoder.finish(self.formatter.as_ref())?.unwrap_or_default();
        let stopped = match stopper.push(&tail) {
            StopScan::Continue(t) => {
                tail = t;
                None
            }
            StopScan::Stopped { text: t, stop } => {
                tail = t;
                Some(stop)
            }
        };
        if stopped.is_none() {
            tail.push_str(&stopper.finish());
        }
        if !tail.is_empty() {
            text.push_str(&tail);
            *cancelled = !on_event(GenerationEvent::Delta(tail));
        }
        if let Some(stop) = stopped {
            finish = FinishReason::StopSequence(stop);
        }
        Ok((text, generated, finish))
    }

    /// Exports blocks `first..first + count` of `seq` and hands them to the store; the
    /// failure, if any, for the turn's [`Persistence`]. Persistence failures degrade to
    /// RAM-only: the turn itself succeeds, but the failure is reported (log, counter, the
    /// turn, the agent).
    async fn save_new_blocks(
        &self,
        seq: SequenceId,
        tokens: &[TokenId],
        hashes: &[BlockHash],
        first: usize,
        count: usize,
    ) -> Option<String> {
        let b = self.block_tokens();
        let fp = self.engine.model().fingerprint.clone();
        let payloads = match self.engine.export_blocks(seq, first, count).await {
            Ok(p) => p,
            Err(e) => return Some(format!("exporting the new blocks failed: {e}")),
        };
        let blocks: Vec<Arc<KvBlock>> = payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| {
                let idx = first + i;
                Arc::new(KvBlock {
                    meta: BlockMeta {
                        hash: hashes[idx],
                        parent: idx.checked_sub(1).map(|p| hashes[p]),
                        token_ids: tokens[idx * b..(idx + 1) * b].to_vec(),
                        model_fingerprint: fp.clone(),
                    },
                    payload,
                })
            })
            .collect();
        match self.store.save_blocks(blocks).await {
            Ok(_) => None,
            Err(e) => Some(format!("saving the new blocks failed: {e}")),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn commit(
        &self,
        key: Option<&AgentKey>,
        guard: &TurnGuard,
        seq: SequenceId,
        tokens: &[TokenId],
        hashes: &[BlockHash],
        (first, mut failure): (usize, Option<String>),
        persist_len: usize,
    ) -> Result<Persistence, ServiceError> {
        let owner = &guard.owner;
        let b = self.block_tokens();
        self.engine.truncate(seq, persist_len).await?;
        let count = (persist_len / b).saturating_sub(first);
        if self.config.persist && count > 0 {
            if let Some(f) = self
                .save_new_blocks(seq, tokens, hashes, first, count)
                .await
            {
                failure.get_or_insert(f);
            }
        }
        let now = self.clock.now_ms();
        match key {
            Some(key) => {
                let previous = self.store.load_manifest(key).await.ok().flatten();
                let manifest = AgentManifest {
                    version: AgentManifest::VERSION,
                    agent: key.agent.clone(),
                    namespace: key.namespace.clone(),
                    model_fingerprint: self.engine.model().fingerprint.clone(),
                    block_tokens: b as u32,
                    token_ids: tokens.to_vec(),
                    block_hashes: hashes.iter().map(|h| h.to_string()).collect(),
                    created_at_ms: previous.as_ref().map_or(now, |m| m.created_at_ms),
                    last_used_at_ms: now,
                    pinned: previous.as_ref().is_some_and(|m| m.pinned),
                    ttl_secs: previous.as_ref().and_then(|m| m.ttl_secs),
                };
                if self.config.persist {
                    if let Err(e) = self.store.save_manifest(&manifest).await {
                        let e = format!("saving the agent's manifest failed: {e}");
                        failure = Some(match failure.take() {
                            Some(f) => format!("{f}; {e}"),
                            None => e,
                        });
                    }
                }
                let resident = self
                    .engine
                    .model()
                    .spec
                    .resident_blocks(persist_len as u64, 0);
                let evicted = lock(&self.hot).commit(
                    owner,
                    HotSession {
                        seq,
                        tokens: tokens[..persist_len].to_vec(),
                        pinned: manifest.pinned,
                    },
                    usize::try_from(resident).unwrap_or(usize::MAX),
                );
                guard.mark_committed();
                for s in evicted {
                    let _ = self.engine.release(s).await;
                }
            }
            None => {
                lock(&self.hot).release_owner(owner);
                guard.mark_committed();
                self.engine.release(seq).await?;
            }
        }
        Ok(self.record_persistence(key, failure))
    }

    /// Logs, counts and remembers a turn's persistence outcome.
    fn record_persistence(&self, key: Option<&AgentKey>, failure: Option<String>) -> Persistence {
        if !self.config.persist {
            return Persistence::Disabled;
        }
        match failure {
            None => {
                if let Some(key) = key {
                    lock(&self.persist_errors).remove(key);
                }
                Persistence::Saved
            }
            Some(cause) => {
                self.counters
                    .persist_failures
                    .fetch_add(1, Ordering::Relaxed);
                let agent = key.map_or_else(|| "(anonymous)".to_string(), |k| k.to_string());
                tracing::warn!(agent = %agent, cause = %cause, "a turn's cache was not persisted; its KV stays in RAM only");
                if let Some(key) = key {
                    lock(&self.persist_errors).insert(key.clone(), cause.clone());
                }
                Persistence::Failed(cause)
            }
        }
    }

    /// Agents of a namespace (or all), hot and warm.
    pub async fn list_agents(
        &self,
        namespace: Option<&Namespace>,
    ) -> Result<Vec<AgentInfo>, ServiceError> {
        let manifests = self.store.list_manifests(namespace).await?;
        let hot = lock(&self.hot).hot_keys();
        let errors = lock(&self.persist_errors).clone();
        let b = self.block_tokens();
        let mut out: Vec<AgentInfo> = manifests
            .into_iter()
            .map(|m| {
                let key = AgentKey {
                    namespace: m.namespace.clone(),
                    agent: m.agent.clone(),
                };
                AgentInfo {
                    tier: if hot.contains(&key) {
                        CacheTier::Hot
                    } else {
                        CacheTier::Warm
                    },
                    agent: m.agent,
                    namespace: m.namespace.0,
                    tokens: m.token_ids.len(),
                    blocks: m.block_hashes.len().min(m.token_ids.len() / b.max(1)),
                    pinned: m.pinned,
                    last_used_at_ms: m.last_used_at_ms,
                    persisted: !errors.contains_key(&key),
                    persist_error: errors.get(&key).cloned(),
                }
            })
            .collect();
        // Agents whose turns never reached the store are listed from RAM (not persisted).
        let now = self.clock.now_ms();
        let tier = lock(&self.hot);
        for (key, error) in &errors {
            let listed = out
                .iter()
                .any(|a| a.agent == key.agent && a.namespace == key.namespace.0);
            if listed || namespace.is_some_and(|ns| *ns != key.namespace) {
                continue;
            }
            if let Some((tokens, pinned)) = tier.session_summary(key) {
                out.push(AgentInfo {
                    agent: key.agent.clone(),
                    namespace: key.namespace.0.clone(),
                    tier: CacheTier::Hot,
                    tokens,
                    blocks: tokens / b.max(1),
                    pinned,
                    last_used_at_ms: now,
                    persisted: false,
                    persist_error: Some(error.clone()),
                });
            }
        }
        drop(tier);
        out.sort_by_key(|a| std::cmp::Reverse(a.last_used_at_ms));
        Ok(out)
    }

    /// One agent: from its manifest, or, when its last turn could not be persisted and no
    /// manifest exists, from its KV in RAM (`persisted: false` with the cause).
    pub async fn agent(&self, key: &AgentKey) -> Result<AgentInfo, ServiceError> {
        let error = lock(&self.persist_errors).get(key).cloned();
        let manifest = self.store.load_manifest(key).await?;
        let hot = lock(&self.hot).session_summary(key);
        let info = match (manifest, hot) {
            (Some(m), hot) => AgentInfo {
                agent: m.agent.clone(),
                namespace: m.namespace.0.clone(),
                tier: if hot.is_some() {
                    CacheTier::Hot
                } else {
                    CacheTier::Warm
                },
                tokens: m.token_ids.len(),
                blocks: m.block_hashes.len(),
                pinned: m.pinned,
                last_used_at_ms: m.last_used_at_ms,
                persisted: error.is_none(),
                persist_error: error,
            },
            (None, Some((tokens, pinned))) if error.is_some() => AgentInfo {
                agent: key.agent.clone(),
                namespace: key.namespace.0.clone(),
                tier: CacheTier::Hot,
                tokens,
                blocks: tokens / self.block_tokens().max(1),
                pinned,
                last_used_at_ms: self.clock.now_ms(),
                persisted: false,
                persist_error: error,
            },
            _ => return Err(ServiceError::AgentNotFound(key.to_string())),
        };
        Ok(info)
    }

    /// Drops an agent's KV from RAM; with `keep_on_disk == false` also deletes its manifest
    /// (blocks shared with other agents stay). Errors with `AgentNotFound` if it is unknown.
    pub async fn delete_agent(
        &self,
        key: &AgentKey,
        keep_on_disk: bool,
    ) -> Result<(), ServiceError> {
        let l = self.agent_lock(key);
        let _g = l.lock().await;
        let hot = lock(&self.hot).take_session(key);
        let was_hot = hot.is_some();
        if let Some(h) = hot {
            let _ = self.engine.release(h.seq).await;
        }
        let existed = if keep_on_disk {
            self.store.load_manifest(key).await?.is_some()
        } else {
            self.store.delete_manifest(key).await?
        };
        if !existed && !was_hot {
            return Err(ServiceError::AgentNotFound(key.to_string()));
        }
        Ok(())
    }

    /// Pins or unpins an agent (pinned agents' blocks are evicted last).
    pub async fn set_pinned(&self, key: &AgentKey, pinned: bool) -> Result<(), ServiceError> {
        let mut m = self
            .store
            .load_manifest(key)
            .await?
            .ok_or_else(|| ServiceError::AgentNotFound(key.to_string()))?;
        m.pinned = pinned;
        self.store.save_manifest(&m).await?;
        lock(&self.hot).set_pinned(key, pinned);
        Ok(())
    }

    /// Counters of the service and its store.
    pub async fn stats(&self) -> ServiceStats {
        let c = &self.counters;
        let (used, total, agents, evictions) = lock(&self.hot).usage();
        let active_blocks = lock(&self.hot).active_blocks();
        let (active, queued) = self.admission.usage();
        let batches = self.batcher.usage();
        ServiceStats {
            requests: c.requests.load(Ordering::Relaxed),
            hits_hot: c.hits_hot.load(Ordering::Relaxed),
            hits_warm: c.hits_warm.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            reused_tokens: c.reused_tokens.load(Ordering::Relaxed),
            prefilled_tokens: c.prefilled_tokens.load(Ordering::Relaxed),
            generated_tokens: c.generated_tokens.load(Ordering::Relaxed),
            restored_bytes: c.restored_bytes.load(Ordering::Relaxed),
            evictions,
            active: active as u64,
            queued: queued as u64,
            prefilling: c.prefilling.load(Ordering::Relaxed),
            decoding: batches.decoding as u64,
            hot_blocks_used: used as u64,
            hot_blocks_total: total as u64,
            hot_blocks_active: active_blocks as u64,
            max_decode_batch: batches.max_seen as u64,
            decode_steps: batches.steps,
            decode_step_sequences: batches.sequences,
            hot_agents: agents as u64,
            persist_failures: c.persist_failures.load(Ordering::Relaxed),
            store: self.store.stats().await.unwrap_or_default(),
        }
    }

    /// Waits until every accepted cache write is durable (call at shutdown).
    pub async fn flush(&self) -> Result<(), ServiceError> {
        Ok(self.store.flush().await?)
    }
}
