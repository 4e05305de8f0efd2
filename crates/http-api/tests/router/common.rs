//! Shared helpers: stacks over the testkit fakes, a scripted engine, requests and SSE parsing.

use agent_session::{
    AgentService, EngineError, InferenceEngine, KvBlock, KvPayload, ModelDescriptor, SequenceId,
    ServiceConfig, StepRequest, TokenId,
};
use async_trait::async_trait;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use axum::Router;
use http_api::{AppState, AuthConfig, Limits};
use serde_json::Value;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use testkit::{FakeEngine, FakeStack, ManualClock, MemoryStore, ToyFormatter};
use tower::ServiceExt;

/// A long system prompt: several whole 64-token blocks, so reuse shows in the numbers.
pub const SYSTEM: &str = "You are a careful coding agent working in a large Rust repository. \
Follow the style guide, write tests for every change, explain each change briefly, keep \
functions small, and never invent APIs that do not exist. Prefer clear names over comments.";

/// The fake stack's router (open, default limits).
pub fn fake_app() -> (Router, FakeStack) {
    let stack = FakeStack::new();
    let app = http_api::router(AppState::new(stack.service.clone()));
    (app, stack)
}

/// A router over any service with the given auth and limits.
pub fn app_with(service: Arc<AgentService>, auth: AuthConfig, limits: Limits) -> Router {
    http_api::router(AppState::new(service).with_auth(auth).with_limits(limits))
}

/// Byte tokens of the toy formatter.
pub fn bytes_to_tokens(s: &str) -> Vec<TokenId> {
    s.bytes().map(|b| TokenId::from(b) + 4).collect()
}

/// An engine that answers every prompt with a fixed text (byte tokens of the toy formatter),
/// then `<|im_end|>`; optionally slow, gated (each step waits for a permit), endless (repeats
/// the script instead of stopping) or failing at a step. KV bookkeeping is the fake engine's.
pub struct ScriptedEngine {
    inner: FakeEngine,
    script: Vec<TokenId>,
    endless: bool,
    delay: Option<Duration>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    fail_at: Option<u32>,
    prefill_delay: Option<Duration>,
    /// Decode steps run (all sequences).
    pub steps: AtomicUsize,
    /// Prefill chunks run (all sequences).
    pub prefills: AtomicUsize,
}

impl ScriptedEngine {
    /// Answers with `text`.
    pub fn new(text: &str) -> Self {
        Self {
            inner: FakeEngine::new(FakeEngine::DEFAULT_BLOCK_TOKENS),
            script: bytes_to_tokens(text),
            endless: false,
            delay: None,
            gate: None,
            fail_at: None,
            prefill_delay: None,
            steps: AtomicUsize::new(0),
            prefills: AtomicUsize::new(0),
        }
    }

    /// Sleeps this long in every prefill chunk.
    pub fn slow_prefill(mut self, d: Duration) -> Self {
        self.prefill_delay = Some(d);
        self
    }

    /// Repeats the text forever (never emits the stop token).
    pub fn endless(mut self) -> Self {
        self.endless = true;
        self
    }

    /// Sleeps this long in every step.
    pub fn slow(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }

    /// Each step waits for a permit of `gate` (released with `add_permits`).
    pub fn gated(mut self, gate: Arc<tokio::sync::Semaphore>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Step `n` of a generation fails.
    pub fn failing_at(mut self, n: u32) -> Self {
        self.fail_at = Some(n);
        self
    }

    /// Open sequences in the underlying fake.
    pub fn open_sequences(&self) -> usize {
        self.inner.stats().open_sequences
    }
}

#[async_trait]
impl InferenceEngine for ScriptedEngine {
    fn model(&self) -> &ModelDescriptor {
        self.inner.model()
    }
    async fn open_sequence(&self) -> Result<SequenceId, EngineError> {
        self.inner.open_sequence().await
    }
    async fn import_blocks(
        &self,
        seq: SequenceId,
        blocks: Vec<Arc<KvBlock>>,
    ) -> Result<(), EngineError> {
        self.inner.import_blocks(seq, blocks).await
    }
    async fn prefill(&self, seq: SequenceId, tokens: Vec<TokenId>) -> Result<(), EngineError> {
        if let Some(d) = self.prefill_delay {
            tokio::time::sleep(d).await;
        }
        self.prefills.fetch_add(1, Ordering::Relaxed);
        self.inner.prefill(seq, tokens).await
    }
    async fn step(
        &self,
        batch: Vec<StepRequest>,
    ) -> Result<Vec<Result<TokenId, EngineError>>, EngineError> {
        if let Some(gate) = &self.gate {
            let _permit = gate
                .acquire()
                .await
                .map_err(|_| EngineError::Backend("gate closed".into()))?;
        }
        if let Some(d) = self.delay {
            tokio::time::sleep(d).await;
        }
        self.steps.fetch_add(1, Ordering::Relaxed);
        let steps: Vec<u32> = batch.iter().map(|r| r.step).collect();
        let inner = self.inner.step(batch).await?;
        Ok(inner
            .into_iter()
            .zip(steps)
            .map(|(r, step)| {
                r?;
                if self.fail_at == Some(step) {
                    return Err(EngineError::Backend("scripted failure".into()));
                }
                let i = step as usize;
                Ok(if self.endless && !self.script.is_empty() {
                    self.script[i % self.script.len()]
                } else {
                    self.script.get(i).copied().unwrap_or(testkit_im_end())
                })
            })
            .collect())
    }
    async fn export_blocks(
        &self,
        seq: SequenceId,
        first_block: usize,
        count: usize,
    ) -> Result<Vec<KvPayload>, EngineError> {
        self.inner.export_blocks(seq, first_block, count).await
    }
    async fn truncate(&self, seq: SequenceId, tokens: usize) -> Result<(), EngineError> {
        self.inner.truncate(seq, tokens).await
    }
    async fn sequence_len(&self, seq: SequenceId) -> Result<usize, EngineError> {
        self.inner.sequence_len(seq).await
    }
    async fn release(&self, seq: SequenceId) -> Result<(), EngineError> {
        self.inner.release(seq).await
    }
}

fn testkit_im_end() -> TokenId {
    2
}

/// A service over a scripted engine, a memory store and the toy formatter.
pub fn scripted_service(
    engine: Arc<ScriptedEngine>,
    config: Option<ServiceConfig>,
) -> Arc<AgentService> {
    let config = config.unwrap_or_else(|| {
        ServiceConfig::for_block_tokens(FakeEngine::DEFAULT_BLOCK_TOKENS as usize)
    });
    Arc::new(
        AgentService::new(
            engine,
            Arc::new(MemoryStore::new()),
            Arc::new(ToyFormatter::new()),
            Arc::new(ManualClock::new(1_700_000_000_000)),
            config,
        )
        .expect("valid configuration"),
    )
}

/// A router answering every prompt with `text`.
pub fn scripted_app(text: &str) -> (Router, Arc<AgentService>) {
    let engine = Arc::new(ScriptedEngine::new(text));
    let service = scripted_service(engine, None);
    (http_api::router(AppState::new(service.clone())), service)
}

/// A response, read whole.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }
    pub fn events(&self) -> Vec<SseEvent> {
        parse_sse(&self.text())
    }
}

/// Builds a request.
pub fn request(
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Request<Body> {
    let mut b = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let body = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    b.body(body).expect("valid request")
}

/// Sends a request and reads the whole response.
pub async fn send(app: &Router, req: Request<Body>) -> Reply {
    let response = app.clone().oneshot(req).await.expect("infallible");
    let status = response.status();
    let headers = response.headers().clone();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    Reply {
        status,
        headers,
        body,
    }
}

/// POSTs JSON.
pub async fn post(app: &Router, path: &str, headers: &[(&str, &str)], body: Value) -> Reply {
    send(app, request(Method::POST, path, headers, Some(&body))).await
}

/// GETs.
pub async fn get(app: &Router, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(app, request(Method::GET, path, headers, None)).await
}

/// One server-sent event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("bad event data ({e}): {}", self.data))
    }
}

/// Parses an SSE body (comments and keep-alives skipped).
pub fn parse_sse(text: &str) -> Vec<SseEvent> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut event = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if event.is_some() || !data.is_empty() {
            out.push(SseEvent {
                event,
                data: data.join("\n"),
            });
        }
    }
    out
}

/// An OpenAI chat body.
pub fn chat(messages: Value) -> Value {
    serde_json::json!({"model": "any", "messages": messages, "temperature": 0})
}

/// The usual OpenAI conversation with the long system prompt.
pub fn chat_messages(question: &str) -> Value {
    serde_json::json!([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
    ])
}

/// An Anthropic messages body with the long system prompt.
pub fn messages_body(question: &str, max_tokens: u64) -> Value {
    serde_json::json!({
        "model": "any",
        "max_tokens": max_tokens,
        "temperature": 0,
        "system": SYSTEM,
        "messages": [{"role": "user", "content": question}],
    })
}

/// Parses `x-semantic-cache` into (tier, [(key, value)]).
pub fn cache_header(reply: &Reply) -> (String, std::collections::HashMap<String, usize>) {
    let v = reply.header("x-semantic-cache").expect("cache header");
    let mut tier = String::new();
    let mut nums = std::collections::HashMap::new();
    for part in v.split(';') {
        let (k, val) = part.trim().split_once('=').expect("key=value");
        if k == "tier" {
            tier = val.to_string();
        } else {
            nums.insert(k.to_string(), val.parse().expect("number"));
        }
    }
    (tier, nums)
}
