//! HTTP adapter of `semantic`: the OpenAI Chat Completions and Anthropic Messages APIs,
//! agents admin, health and Prometheus metrics, over an [`AgentService`] (axum).
//!
//! Build an [`AppState`] around the service, then either mount [`router`] yourself or call
//! [`serve`] with a listener and a shutdown future. Every route, field and extension is
//! described in `docs/api.md`.
//!
//! ```no_run
//! # async fn run(service: std::sync::Arc<agent_session::AgentService>) -> Result<(), http_api::ApiError> {
//! let state = http_api::AppState::new(service);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! http_api::serve(listener, state, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

mod admin;
mod anthropic;
mod auth;
mod blocking;
mod error;
mod generation;
mod identity;
mod json;
mod metrics;
mod openai;
mod request;
mod root;
mod server;
mod sse;
mod stream_text;
pub mod tools;
mod util;

pub use auth::{namespace_for_key, AuthConfig};
pub use blocking::TokioBlocking;
pub use error::{ApiError, Flavor, STATUS_OVERLOADED_ANTHROPIC};
pub use generation::{CACHE_HEADER, PERSIST_HEADER};
pub use identity::{AGENT_ID_HEADER, SESSION_ID_HEADER};
pub use metrics::Metrics;

use agent_session::AgentService;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default largest request body: 32 MiB. The one source of truth: `semantic`'s settings take
/// their default (`SEMANTIC_SERVER_MAX_BODY_MB`) from it, and a test checks that
/// docs/api.md and docs/configuration.md state it.
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

pub use server::SHUTDOWN_SETTLE;

/// Size limits, connection rules and health thresholds of the HTTP layer.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted, in bytes; larger ones get a 413.
    pub max_body_bytes: usize,
    /// `/health/ready` answers 503 when hot-pool blocks used / capacity exceed this.
    pub ready_max_pool_utilization: f64,
    /// Interval of SSE keep-alives (Anthropic `ping` events, OpenAI comment lines).
    pub sse_keep_alive: Duration,
    /// Grace period of a shutdown: how long [`serve`] lets requests in flight (streams
    /// included) finish after the shutdown signal, before it ends them (streams with their
    /// API's error event) and flushes the cache store.
    pub shutdown_drain: Duration,
    /// A request's headers must be complete within this, counted from the connection's
    /// start or the end of the previous response; otherwise the connection is closed.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub keep_alive_timeout: Duration,
    /// Most open client connections; more wait in the listener's backlog.
    pub max_connections: usize,
    /// Longest time a generation request may take, queueing included (`None`: no limit).
    /// Past it the generation is cancelled: a 504 before the answer starts, an error event
    /// ending a stream.
    pub request_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            ready_max_pool_utilization: 0.95,
            sse_keep_alive: Duration::from_secs(15),
            shutdown_drain: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            keep_alive_timeout: Duration::from_secs(30),
            max_connections: 1024,
            request_timeout: None,
        }
    }
}

/// Values used when a request leaves a sampling field out.
#[derive(Debug, Clone)]
pub struct Defaults {
    /// Temperature when the request names none (both APIs default to 1.0; 0 is greedy).
    pub temperature: f32,
}

impl Default for Defaults {
    fn default() -> Self {
        Self { temperature: 1.0 }
    }
}

/// Everything the routes need: the application service and the HTTP layer's settings.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The application core.
    pub service: Arc<AgentService>,
    /// API keys and the admin key (empty: open server).
    pub auth: AuthConfig,
    /// Body size and health limits.
    pub limits: Limits,
    /// Sampling defaults.
    pub defaults: Defaults,
    /// Readiness: `false` while loading or shutting down (`/health/ready` and the generation
    /// routes answer 503). [`serve`] clears it when shutdown begins.
    pub ready: Arc<AtomicBool>,
    /// The Prometheus recorder behind `/metrics` (one per state, not global).
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// An open (no auth), ready state with default limits and a fresh metrics recorder.
    pub fn new(service: Arc<AgentService>) -> Self {
        Self {
            service,
            auth: AuthConfig::default(),
            limits: Limits::default(),
            defaults: Defaults::default(),
            ready: Arc::new(AtomicBool::new(true)),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// The same state with these keys.
    pub fn with_auth(mut self, auth: AuthConfig) -> Self {
        self.auth = auth;
        self
    }

    /// The same state with these limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The same state with these API keys (empty: no API auth).
    pub fn with_api_keys(mut self, keys: Vec<String>) -> Self {
        self.auth.api_keys = keys;
        self
    }

    /// The same state with this admin key (`None`: admin routes follow the API-key rule).
    pub fn with_admin_key(mut self, key: Option<String>) -> Self {
        self.auth.admin_key = key;
        self
    }

    /// The same state with this request body limit in bytes.
    pub fn with_max_body_bytes(mut self, bytes: usize) -> Self {
        self.limits.max_body_bytes = bytes;
        self
    }

    /// The same state with this default temperature.
    pub fn with_default_temperature(mut self, temperature: f32) -> Self {
        self.defaults.temperature = temperature;
        self
    }

    /// The same state with this per-request time limit (`None`: no limit).
    pub fn with_request_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.limits.request_timeout = timeout;
        self
    }
}

/// What the handlers share (built once from an [`AppState`]).
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) service: Arc<AgentService>,
    pub(crate) keys: auth::Keys,
    pub(crate) limits: Limits,
    pub(crate) defaults: Defaults,
    pub(crate) ready: Arc<AtomicBool>,
    pub(crate) metrics: Arc<Metrics>,
    /// Unix seconds when the router was built (the model's `created`).
    pub(crate) created: u64,
    /// Connection counts and the drain state (see `server.rs`).
    pub(crate) shutdown: Arc<server::Shutdown>,
}

pub(crate) type Shared = Arc<Ctx>;

impl Ctx {
    /// 503 while not ready (loading or shutting down).
    pub(crate) fn check_ready(&self) -> Result<(), ApiError> {
        if self.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(ApiError::Unavailable {
                reason: "the server is loading or shutting down".into(),
                retry_after_secs: 5,
            })
        }
    }
}

/// The full HTTP API over `state`: OpenAI, Anthropic, models, agents, stats, health, metrics.
pub fn router(state: AppState) -> Router {
    router_with_ctx(state).0
}

fn router_with_ctx(state: AppState) -> (Router, Shared) {
    let ctx: Shared = Arc::new(Ctx {
        keys: auth::Keys::new(&state.auth),
        service: state.service,
        limits: state.limits,
        defaults: state.defaults,
        ready: state.ready,
        metrics: state.metrics,
        created: util::unix_now(),
        shutdown: Arc::new(server::Shutdown::default()),
    });
    let body_limit = ctx.limits.max_body_bytes;
    let router = Router::new()
        .route("/", get(root::root))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(admin::list_models))
        .route("/v1/models/{id}", get(admin::get_model))
        .route("/v1/agents", get(admin::list_agents))
        .route(
            "/v1/agents/{id}",
            get(admin::get_agent).delete(admin::delete_agent),
        )
        .route("/v1/agents/{id}/pin", post(admin::pin_agent))
        .route("/v1/agents/{id}/unpin", post(admin::unpin_agent))
        .route("/v1/stats", get(admin::stats))
        .route("/health", get(admin::health))
        .route("/health/live", get(admin::live))
        .route("/health/ready", get(admin::ready))
        .route("/metrics", get(admin::metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            refuse_when_draining,
        ))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn_with_state(ctx.clone(), observe))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(on_panic))
        .with_state(ctx.clone());
    (router, ctx)
}

/// During a shutdown every route but the health probes answers 503 in its API's shape, with
/// `Retry-After` (and `Connection: close`, added by the server loop).
async fn refuse_when_draining(State(ctx): State<Shared>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if ctx.shutdown.draining() && !(path == "/health" || path.starts_with("/health/")) {
        return ApiError::Unavailable {
            reason: "the server is shutting down".into(),
            retry_after_secs: 5,
        }
        .into_response_for(Flavor::for_path(path));
    }
    next.run(req).await
}

/// The safety net of the error shapes: a 4xx/5xx answer that is not JSON (a framework
/// rejection: a path, query or header extractor, an unsupported method…) is re-shaped into
/// the route's API error body, keeping its status and message.
async fn json_errors(req: Request, next: Next) -> Response {
    let flavor = Flavor::for_path(req.uri().path());
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_string()
    } else {
        text
    };
    let mut shaped = ApiError::Status {
        status: status.as_u16(),
        message,
    }
    .into_response_for(flavor);
    for (name, value) in &parts.headers {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            shaped.headers_mut().insert(name.clone(), value.clone());
        }
    }
    shaped
}

/// A router for the time before the model is loaded: `/health` and `/health/live` answer
/// 200, `/health/ready` and every other route 503 (with `Retry-After`) in the API's shape.
pub fn loading_router() -> Router {
    async fn loading(req: Request) -> Response {
        ApiError::Unavailable {
            reason: "the model is loading".into(),
            retry_after_secs: 5,
        }
        .into_response_for(Flavor::for_path(req.uri().path()))
    }
    async fn not_ready() -> Response {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "not_ready", "reason": "loading"})),
        )
            .into_response()
    }
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(serde_json::json!({"status": "loading"})) }),
        )
        .route(
            "/health/live",
            get(|| async { axum::Json(serde_json::json!({"status": "alive"})) }),
        )
        .route("/health/ready", get(not_ready))
        .fallback(loading)
}

/// Completes on SIGTERM or Ctrl-C: the usual `shutdown` future for [`serve`].
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}

/// Serves `state`'s router on `listener` until `shutdown` completes, then drains: readiness
/// turns false at once, new requests get 503 (with `Retry-After`), idle connections close,
/// requests in flight get up to [`Limits::shutdown_drain`] to finish and are then ended
/// (streams with their API's error event), and the cache store is flushed. Returns within
/// the grace period plus [`SHUTDOWN_SETTLE`] and the flush. Connections follow
/// [`Limits::header_read_timeout`], [`Limits::keep_alive_timeout`] and
/// [`Limits::max_connections`].
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: F,
) -> Result<(), ApiError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let service = state.service.clone();
    let (app, ctx) = router_with_ctx(state);
    tracing::info!(addr = ?listener.local_addr().ok(), "serving the HTTP API");
    server::run(listener, app, ctx, shutdown).await?;
    service.flush().await.map_err(ApiError::from)?;
    tracing::info!("HTTP API stopped; cache store flushed");
    Ok(())
}

async fn not_found(req: Request) -> Response {
    let path = req.uri().path().to_string();
    ApiError::NotFound(format!("no route for {} {path}", req.method()))
        .into_response_for(Flavor::for_path(&path))
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError::MethodNotAllowed.into_response_for(Flavor::for_path(req.uri().path()))
}

fn on_panic(_payload: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::Internal("the server failed while handling the request".into())
        .into_response_for(Flavor::OpenAi)
}

/// Request ids (`x-request-id`, echoed or made up; also `request-id` as Anthropic sends it)
/// and per-route request metrics.
async fn observe(State(ctx): State<Shared>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |m| m.as_str().to_string());
    let method = req.method().clone();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_string)
        .unwrap_or_else(|| format!("req_{}", util::random_id(24)));
    let mut response = next.run(req).await;
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v.clone());
        response.headers_mut().insert("request-id", v);
    }
    if route != "/metrics" {
        let status = response.status().as_u16().to_string();
        let m = method_label(&method);
        ctx.metrics
            .counter(
                "semantic_http_requests_total",
                &[("route", &route), ("method", m), ("status", &status)],
            )
            .increment(1);
        ctx.metrics
            .histogram(
                "semantic_http_request_duration_seconds",
                &[("route", &route)],
            )
            .record(start.elapsed().as_secs_f64());
    }
    response
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}
