use agent_session::{
    EngineError, InferenceEngine, KvBlock, KvEncoding, KvPayload, KvTensor, ModelDescriptor,
    SequenceId, StepRequest, TensorDtype, TokenId,
};
use async_trait::async_trait;
use model_cache_spec::{KvStorage, LayerKind, ModelCacheSpec};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Counters of the fake engine, for assertions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeEngineStats {
    /// Tokens run through `prefill`.
    pub prefilled_tokens: u64,
    /// The length of every `prefill` call, in order.
    pub prefill_calls: Vec<(usize, usize)>,
    /// Blocks imported.
    pub imported_blocks: u64,
    /// Blocks exported.
    pub exported_blocks: u64,
    /// Decode forwards (fed tokens).
    pub decoded_tokens: u64,
    /// Sequences open now.
    pub open_sequences: usize,
    /// The size of every `step` batch, in order.
    pub step_batches: Vec<usize>,
}

#[derive(Debug, Default)]
struct Seq {
    /// Per position, a chained state: the fake "KV", a function of every token up to there.
    states: Vec<u64>,
    tokens: Vec<TokenId>,
    /// With a sliding window ([`FakeEngine::with_window`]): the first position still held;
    /// states before it count as dropped (reading them is an error).
    base: usize,
}

#[derive(Debug, Default)]
struct Inner {
    seqs: HashMap<SequenceId, Seq>,
    stats: FakeEngineStats,
}

/// A deterministic fake model: position `p`'s state is a hash of the state before it and its
/// token, and the next token is a function of the last state. A restored prefix that did not
/// come from the same tokens therefore changes the output, as a wrong KV would.
///
/// Vocabulary: 260 ids (see [`crate::ToyFormatter`]); it emits the stop token 2 now and then.
#[derive(Debug)]
pub struct FakeEngine {
    model: ModelDescriptor,
    /// The first layer's sliding window, if any ([`FakeEngine::with_window`]).
    window: Option<usize>,
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    yielding: bool,
}

/// A future that is pending once (and wakes itself), like a call that crosses a channel:
/// lets the other futures of a `join` run. Made by [`yield_once`].
#[derive(Debug)]
pub struct YieldOnce(bool);

/// Yields to the executor once (see [`YieldOnce`]).
pub fn yield_once() -> YieldOnce {
    YieldOnce(false)
}

impl std::future::Future for YieldOnce {
    type Output = ();
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if self.0 {
            std::task::Poll::Ready(())
        } else {
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
}

const LAYERS: usize = 2;

fn mix(state: u64, token: TokenId) -> u64 {
    // splitmix64 of (state, token): cheap, deterministic, well spread.
    let mut z = state ^ (u64::from(token).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl FakeEngine {
    /// Block size the fake uses by default (small, so tests need few tokens).
    pub const DEFAULT_BLOCK_TOKENS: u32 = 64;

    /// A fake engine with this block size.
    pub fn new(block_tokens: u32) -> Self {
        // Two layers, one KV head of dim 2 (the u64 state as two u32 words), fp32 storage.
        #[allow(clippy::expect_used)] // constant arguments, proven valid by the tests
        let spec = ModelCacheSpec::uniform(LAYERS as u32, 1, 2, block_tokens)
            .and_then(|s| s.with_kv_storage(KvStorage::FP32))
            .expect("fake spec is valid");
        Self {
            model: ModelDescriptor {
                id: "fake-model".into(),
                fingerprint: "fake-fingerprint-v1".into(),
                architecture: "fake".into(),
                weight_format: "none".into(),
                spec,
                context_length: 8192,
                vocab_size: 260,
            },
            window: None,
            inner: Mutex::new(Inner::default()),
            next_id: AtomicU64::new(1),
            yielding: false,
        }
    }

    /// The same fake with its first layer sliding over `window` tokens, kept in RAM as a
    /// real engine keeps one: at each prefill and after each truncation or import, the
    /// blocks the next token's window no longer reaches are dropped; exporting a dropped
    /// block, or truncating back to where the window would need one, fails with
    /// [`EngineError::WindowPassed`]. The output does not change (the state chain is the
    /// model), so a service that lost blocks shows up as missing stores and cold prefills.
    #[allow(clippy::expect_used)] // the spec differs from the valid default in one window
    pub fn with_window(mut self, window: u32) -> Self {
        let bt = self.model.spec.block_tokens();
        self.model.spec = ModelCacheSpec::new(
            vec![LayerKind::SlidingWindow { window }, LayerKind::Global],
            1,
            2,
            2,
            bt,
            KvStorage::FP32,
        )
        .expect("a positive window is valid");
        self.window = Some(window as usize);
        self
    }

    /// First position a sequence of `len` tokens must hold (see
    /// [`FakeEngine::with_window`]).
    fn window_base(&self, len: usize) -> usize {
        let b = self.model.spec.block_tokens() as usize;
        self.window
            .map_or(0, |w| (len + 1).saturating_sub(w) / b * b)
    }

    fn retain(&self, s: &mut Seq) {
        s.base = s.base.max(self.window_base(s.states.len()));
    }

    /// The same fake, but every call yields to the executor once first, as a real engine
    /// behind a channel does: concurrent generations then interleave and batch.
    pub fn yielding(mut self) -> Self {
        self.yielding = true;
        self
    }

    async fn pause(&self) {
        if self.yielding {
            yield_once().await;
        }
    }

    /// The same fake with another context window (for context-length tests).
    pub fn with_context_length(mut self, n: usize) -> Self {
        self.model.context_length = n;
        self
    }

    /// The same fake under another fingerprint (a "different model").
    pub fn with_fingerprint(mut self, fp: &str) -> Self {
        self.model.fingerprint = fp.into();
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> FakeEngineStats {
        let g = self.lock();
        let mut s = g.stats.clone();
        s.open_sequences = g.seqs.len();
        s
    }

    /// Resets the counters (not the sequences).
    pub fn reset_stats(&self) {
        self.lock().stats = FakeEngineStats::default();
    }

    fn next_token(state: u64, req: &StepRequest) -> TokenId {
        let mut s = state;
        if !req.params.is_greedy() {
            s = mix(s ^ req.params.seed.unwrap_or(7), req.step);
        }
        // The fake penalises nothing, but a presence penalty perturbs the choice so tests can
        // see it arrived.
        if req.params.presence_penalty != 0.0 && !req.generated.is_empty() {
            s = mix(s, 99);
        }
        if s % 97 == 0 {
            2
        } else {
            // Mostly printable ASCII bytes (letters and spaces) so text is readable.
            let alphabet = b"abcdefghijklmnopqrstuvwxyz      ";
            TokenId::from(alphabet[(s % alphabet.len() as u64) as usize]) + 4
        }
    }
}

fn append(seq: &mut Seq, token: TokenId) {
    let prev = seq.states.last().copied().unwrap_or(0x5EED);
    seq.states.push(mix(prev, token));
    seq.tokens.push(token);
}

#[async_trait]
impl InferenceEngine for FakeEngine {
    fn model(&self) -> &ModelDescriptor {
        &self.model
    }

    async fn open_sequence(&self) -> Result<SequenceId, EngineError> {
        self.pause().await;
        let id = SequenceId(self.next_id.fetch_add(1, Ordering::Relaxed));
        self.lock().seqs.insert(id, Seq::default());
        Ok(id)
    }

    async fn import_blocks(
        &self,
        seq: SequenceId,
        blocks: Vec<Arc<KvBlock>>,
    ) -> Result<(), EngineError> {
        self.pause().await;
        let b = self.model.spec.block_tokens() as usize;
        let mut g = self.lock();
        let n = blocks.len() as u64;
        let s = g
            .seqs
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?;
        if s.states.len() % b != 0 {
            return Err(EngineError::Invalid(format!(
                "import at position {} is not block aligned",
                s.states.len()
            )));
        }
        for block in blocks {
            if block.payload.encoding
                != (KvEncoding::Float {
                    dtype: TensorDtype::F32,
                })
            {
                return Err(EngineError::BadPayload(
                    "fake engine stores f32 only".into(),
                ));
            }
            let t = block
                .payload
                .tensors
                .iter()
                .find(|t| t.name == "l0.k")
                .ok_or_else(|| EngineError::BadPayload("missing tensor l0.k".into()))?;
            if t.shape != [1, b, 2] || !t.is_consistent() {
                return Err(EngineError::BadPayload(format!(
                    "tensor l0.k has shape {:?}",
                    t.shape
                )));
            }
            for (i, w) in t.data.chunks_exact(8).enumerate() {
                let mut a = [0u8; 8];
                a.copy_from_slice(w);
                s.states.push(u64::from_le_bytes(a));
                s.tokens
                    .push(block.meta.token_ids.get(i).copied().unwrap_or(0));
            }
        }
        self.retain(s);
        g.stats.imported_blocks += n;
        Ok(())
    }

    async fn prefill(&self, seq: SequenceId, tokens: Vec<TokenId>) -> Result<(), EngineError> {
        self.pause().await;
        let mut g = self.lock();
        let s = g
            .seqs
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?;
        self.retain(s);
        let start = s.states.len();
        for &t in &tokens {
            append(s, t);
        }
        let end = s.states.len();
        g.stats.prefilled_tokens += tokens.len() as u64;
        g.stats.prefill_calls.push((start, end));
        Ok(())
    }

    async fn step(
        &self,
        batch: Vec<StepRequest>,
    ) -> Result<Vec<Result<TokenId, EngineError>>, EngineError> {
        self.pause().await;
        let mut g = self.lock();
        g.stats.step_batches.push(batch.len());
        let mut out = Vec::with_capacity(batch.len());
        for req in batch {
            let Some(s) = g.seqs.get_mut(&req.seq) else {
                out.push(Err(EngineError::UnknownSequence(req.seq)));
                continue;
            };
            let fed = req.feed.is_some();
            if let Some(t) = req.feed {
                append(s, t);
            }
            match s.states.last() {
                Some(&state) => out.push(Ok(Self::next_token(state, &req))),
                None => out.push(Err(EngineError::Invalid("empty sequence".into()))),
            }
            if fed {
                g.stats.decoded_tokens += 1;
            }
        }
        Ok(out)
    }

    async fn export_blocks(
        &self,
        seq: SequenceId,
        first_block: usize,
        count: usize,
    ) -> Result<Vec<KvPayload>, EngineError> {
        let b = self.model.spec.block_tokens() as usize;
        let mut g = self.lock();
        let s = g.seqs.get(&seq).ok_or(EngineError::UnknownSequence(seq))?;
        if (first_block + count) * b > s.states.len() {
            return Err(EngineError::Invalid("export beyond the sequence".into()));
        }
        if first_block * b < s.base {
            return Err(EngineError::WindowPassed(format!(
                "block {first_block} was dropped (the window holds from {} on)",
                s.base
            )));
        }
        let mut out = Vec::with_capacity(count);
        for i in first_block..first_block + count {
            let data: Vec<u8> = s.states[i * b..(i + 1) * b]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let tensors = (0..LAYERS)
                .flat_map(|l| {
                    ["k", "v"].map(|kv| KvTensor {
                        name: format!("l{l}.{kv}"),
                        dtype: TensorDtype::F32,
                        shape: vec![1, b, 2],
                        data: data.clone().into(),
                    })
                })
                .collect();
            out.push(KvPayload {
                encoding: KvEncoding::Float {
                    dtype: TensorDtype::F32,
                },
                tensors,
            });
        }
        g.stats.exported_blocks += count as u64;
        Ok(out)
    }

    async fn truncate(&self, seq: SequenceId, tokens: usize) -> Result<(), EngineError> {
        let mut g = self.lock();
        let s = g
            .seqs
            .get_mut(&seq)
            .ok_or(EngineError::UnknownSequence(seq))?;
        let len = tokens.min(s.states.len());
        if len > 0 && s.base > self.window_base(len) {
            return Err(EngineError::WindowPassed(format!(
                "{len} tokens need the window from {}; it holds from {} on",
                self.window_base(len),
                s.base
            )));
        }
        s.states.truncate(tokens);
        s.tokens.truncate(tokens);
        if len == 0 {
            s.base = 0;
        }
        self.retain(s);
        Ok(())
    }

    async fn sequence_len(&self, seq: SequenceId) -> Result<usize, EngineError> {
        let g = self.lock();
        let s = g.seqs.get(&seq).ok_or(EngineError::UnknownSequence(seq))?;
        Ok(s.states.len())
    }

    async fn release(&self, seq: SequenceId) -> Result<(), EngineError> {
        self.lock().seqs.remove(&seq);
        Ok(())
    }
}
