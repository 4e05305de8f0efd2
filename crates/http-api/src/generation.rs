//! Running one generation for a request: the service runs in its own task (so a client that
//! goes away never interrupts the service mid-step; it is cancelled through the event
//! callback instead), and the handler waits for the prompt to be processed before it answers,
//! so errors before the first token are plain HTTP errors and the cache header is known.
//! A client that goes away (or times out) while its request still waits for a slot leaves
//! the queue at once: the task drops the generation, which has done nothing yet.

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::Ctx;
use agent_session::{
    AgentId, CacheReport, Completion, GenerateRequest, GenerationEvent, Persistence, ServiceError,
};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Response header describing what the cache did for the prompt:
/// `tier=<hot|warm|miss>; prompt=<P>; reused=<R>; prefilled=<F>; created=<C>; restored=<S>`.
pub const CACHE_HEADER: &str = "x-semantic-cache";
/// Response header of a non-streaming generation saying whether the turn's cache was
/// persisted: `saved`, `disabled`, or `failed; error="<cause>"` (a stream's headers leave
/// before the turn commits: `GET /v1/agents/{id}` shows the outcome there).
pub const PERSIST_HEADER: &str = "x-semantic-persist";
/// Response header naming the agent the request was served as (absent when anonymous).
pub(crate) const AGENT_HEADER: &str = "x-semantic-agent";

/// What the generation task reports.
enum Msg {
    Started(CacheReport),
    Delta(String),
    Finished(Completion),
    Failed(ServiceError),
}

/// The next step of a running generation.
pub(crate) enum Next {
    /// New answer text.
    Delta(String),
    /// The end.
    Finished(Completion),
    /// Failure after the prompt was processed.
    Failed(ApiError),
}

/// A generation whose prompt is processed (its first token is on the way).
pub(crate) struct Running {
    /// What the cache did.
    pub(crate) report: CacheReport,
    rx: mpsc::UnboundedReceiver<Msg>,
    observer: Observer,
    deadline: Option<Deadline>,
    /// Turns true when a shutdown's grace period is over: the generation is then ended.
    grace_over: tokio::sync::watch::Receiver<bool>,
}

/// The request's time limit.
#[derive(Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    limit_secs: u64,
}

/// The next message; `Err` when the deadline passed first (504) or a shutdown's grace
/// period ended (503).
async fn recv(
    rx: &mut mpsc::UnboundedReceiver<Msg>,
    deadline: Option<Deadline>,
    grace_over: &tokio::sync::watch::Receiver<bool>,
) -> Result<Option<Msg>, ApiError> {
    let next = async {
        match deadline {
            None => Ok(rx.recv().await),
            Some(d) => {
                tokio::time::timeout_at(d.at, rx.recv())
                    .await
                    .map_err(|_| ApiError::Timeout {
                        limit_secs: d.limit_secs,
                    })
            }
        }
    };
    tokio::select! {
        r = next => r,
        () = crate::server::grace_over(grace_over.clone()) => Err(ApiError::Unavailable {
            reason: "the server is shutting down; the generation was ended".into(),
            retry_after_secs: 5,
        }),
    }
}

fn failure_kind(e: &ApiError) -> &'static str {
    match e {
        ApiError::Unavailable { .. } => "shutdown",
        _ => "timeout",
    }
}

/// Records TTFT, decode speed and errors of one generation.
struct Observer {
    metrics: Arc<Metrics>,
    api: &'static str,
    tier: &'static str,
    start: Instant,
    first_token: Option<Instant>,
}

impl Observer {
    fn first_token(&mut self) {
        if self.first_token.is_none() {
            let now = Instant::now();
            self.first_token = Some(now);
            self.metrics
                .histogram(
                    "semantic_ttft_seconds",
                    &[("api", self.api), ("tier", self.tier)],
                )
                .record((now - self.start).as_secs_f64());
        }
    }

    fn finished(&mut self, c: &Completion) {
        self.first_token();
        if let Some(first) = self.first_token {
            let secs = first.elapsed().as_secs_f64();
            let n = c.token_ids.len();
            if n > 1 && secs > 0.0 {
                self.metrics
                    .histogram("semantic_decode_tokens_per_second", &[("api", self.api)])
                    .record((n - 1) as f64 / secs);
            }
        }
    }

    fn failed(&self, kind: &str) {
        self.metrics
            .counter(
                "semantic_generation_errors_total",
                &[("api", self.api), ("kind", kind)],
            )
            .increment(1);
    }
}

fn error_kind(e: &ServiceError) -> &'static str {
    match e {
        ServiceError::InvalidRequest(_) => "invalid_request",
        ServiceError::ContextTooLong { .. } | ServiceError::PromptTooLarge { .. } => {
            "context_too_long"
        }
        ServiceError::Overloaded { .. } => "overloaded",
        ServiceError::AgentNotFound(_) => "agent_not_found",
        ServiceError::Format(_) => "format",
        ServiceError::Engine(_) => "engine",
        ServiceError::Store(_) => "store",
        ServiceError::Cancelled => "cancelled",
    }
}

/// Starts a generation and waits until its prompt is processed (or it fails).
pub(crate) async fn start(
    ctx: &Ctx,
    req: GenerateRequest,
    api: &'static str,
    start: Instant,
) -> Result<Running, ApiError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let service = ctx.service.clone();
    let failed_tx = tx.clone();
    let watch_tx = tx.clone();
    let admitted = Arc::new(AtomicBool::new(false));
    let admitted_flag = admitted.clone();
    tokio::spawn(async move {
        // Returning false once the receiver is gone (client disconnected) cancels generation.
        let generation = service.generate(req, move |event| {
            let msg = match event {
                GenerationEvent::Admitted => {
                    admitted_flag.store(true, Ordering::Release);
                    return !tx.is_closed();
                }
                // Nothing to send: the client learns of the prompt with its first token.
                GenerationEvent::Prefilling { .. } => return !tx.is_closed(),
                GenerationEvent::Started(r) => Msg::Started(r),
                GenerationEvent::Delta(t) => Msg::Delta(t),
                GenerationEvent::Finished(c) => Msg::Finished(c),
            };
            tx.send(msg).is_ok()
        });
        // Until it is admitted the generation only holds a place in the queue: dropping it
        // gives that up. From then on it stops through the callback, at a safe point.
        let left_while_queued = async {
            watch_tx.closed().await;
            if admitted.load(Ordering::Acquire) {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            result = generation => {
                if let Err(e) = result {
                    let _ = failed_tx.send(Msg::Failed(e));
                }
            }
            () = left_while_queued => {}
        }
    });
    let deadline = ctx.limits.request_timeout.map(|t| Deadline {
        at: tokio::time::Instant::from_std(start) + t,
        limit_secs: t.as_secs().max(1),
    });
    let mut observer = Observer {
        metrics: ctx.metrics.clone(),
        api,
        tier: "miss",
        start,
        first_token: None,
    };
    let grace_over = ctx.shutdown.grace_over();
    // On any early return `rx` is dropped, which cancels the generation.
    let first = recv(&mut rx, deadline, &grace_over)
        .await
        .inspect_err(|e| observer.failed(failure_kind(e)))?;
    match first {
        Some(Msg::Started(report)) => {
            observer.tier = report.tier.as_str();
            ctx.metrics
                .counter(
                    "semantic_generations_total",
                    &[("api", api), ("tier", observer.tier)],
                )
                .increment(1);
            ctx.metrics
                .histogram("semantic_prompt_seconds", &[("tier", observer.tier)])
                .record(start.elapsed().as_secs_f64());
            ctx.metrics
                .histogram("semantic_queue_wait_seconds", &[])
                .record(report.queue_ms as f64 / 1e3);
            if report.restore_micros > 0 {
                ctx.metrics
                    .histogram("semantic_restore_seconds", &[])
                    .record(report.restore_micros as f64 / 1e6);
            }
            Ok(Running {
                report,
                rx,
                observer,
                deadline,
                grace_over,
            })
        }
        Some(Msg::Failed(e)) => {
            observer.failed(error_kind(&e));
            Err(e.into())
        }
        Some(_) => Err(ApiError::Internal(
            "the generation produced output before processing the prompt".into(),
        )),
        None => Err(ApiError::Internal(
            "the generation task ended unexpectedly".into(),
        )),
    }
}

impl Running {
    /// The next delta, the end, or a failure.
    pub(crate) async fn next(&mut self) -> Next {
        let msg = match recv(&mut self.rx, self.deadline, &self.grace_over).await {
            Ok(m) => m,
            Err(e) => {
                self.observer.failed(failure_kind(&e));
                // Stop listening: the generation is cancelled at its next event.
                self.rx.close();
                return Next::Failed(e);
            }
        };
        match msg {
            Some(Msg::Delta(t)) => {
                self.observer.first_token();
                Next::Delta(t)
            }
            Some(Msg::Finished(c)) => {
                self.observer.finished(&c);
                Next::Finished(c)
            }
            Some(Msg::Failed(e)) => {
                self.observer.failed(error_kind(&e));
                Next::Failed(e.into())
            }
            Some(Msg::Started(_)) => {
                self.observer.failed("protocol");
                Next::Failed(ApiError::Internal("the generation started twice".into()))
            }
            None => {
                self.observer.failed("task_ended");
                Next::Failed(ApiError::Internal(
                    "the generation task ended unexpectedly".into(),
                ))
            }
        }
    }

    /// Waits for the whole answer.
    pub(crate) async fn collect(mut self) -> Result<Completion, ApiError> {
        loop {
            match self.next().await {
                Next::Delta(_) => {}
                Next::Finished(c) => return Ok(c),
                Next::Failed(e) => return Err(e),
            }
        }
    }
}

/// The `x-semantic-cache` value of a report.
pub(crate) fn cache_header_value(r: &CacheReport) -> String {
    format!(
        "tier={}; prompt={}; reused={}; prefilled={}; created={}; restored={}",
        r.tier.as_str(),
        r.prompt_tokens,
        r.reused_tokens,
        r.prefilled_tokens,
        r.created_tokens,
        r.restored_tokens
    )
}

/// Headers every generation response carries.
pub(crate) fn response_headers(report: &CacheReport, agent: Option<&AgentId>) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&cache_header_value(report)) {
        h.insert(HeaderName::from_static(CACHE_HEADER), v);
    }
    if let Some(Ok(v)) = agent.map(|a| HeaderValue::from_str(a.as_str())) {
        h.insert(HeaderName::from_static(AGENT_HEADER), v);
    }
    h
}

/// `headers` plus the [`PERSIST_HEADER`] of a finished turn.
pub(crate) fn with_persistence(mut headers: HeaderMap, persistence: &Persistence) -> HeaderMap {
    let value = match persistence {
        Persistence::Failed(cause) => {
            let cause: String = cause
                .chars()
                .map(|c| match c {
                    '"' | '\\' => '\'',
                    c if c.is_ascii_graphic() || c == ' ' => c,
                    _ => '?',
                })
                .take(300)
                .collect();
            format!("failed; error=\"{cause}\"")
        }
        other => other.as_str().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(HeaderName::from_static(PERSIST_HEADER), v);
    }
    headers
}
