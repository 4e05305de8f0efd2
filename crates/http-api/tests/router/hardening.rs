//! Issue 22, the server's edges: long agent ids persist across a restart, persistence
//! failures are reported, huge prompts are refused before tokenizing (and off the executor),
//! connection timeouts and limits, the bounded drain, JSON errors everywhere, tool schemas,
//! and the body limit stated by the docs.

use crate::common::*;
use agent_session::{
    AgentKey, AgentManifest, AgentService, CacheStore, ChatFormatter, Conversation, FormatError,
    KvBlock, Namespace, ServiceConfig, StoreError, StoreStats, TokenId,
};
use async_trait::async_trait;
use axum::http::Method;
use block_pool::BlockHash;
use http_api::{AppState, Limits};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use testkit::{FakeEngine, ManualClock, MemoryStore, ToyFormatter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The toy formatter, counting `encode` calls.
#[derive(Default)]
struct CountingFormatter {
    inner: ToyFormatter,
    encodes: AtomicUsize,
}

impl ChatFormatter for CountingFormatter {
    fn render(&self, c: &Conversation, add: bool) -> Result<String, FormatError> {
        self.inner.render(c, add)
    }
    fn encode(&self, text: &str) -> Result<Vec<TokenId>, FormatError> {
        self.encodes.fetch_add(1, Ordering::Relaxed);
        self.inner.encode(text)
    }
    fn decode(&self, ids: &[TokenId]) -> Result<String, FormatError> {
        self.inner.decode(ids)
    }
    fn stop_token_ids(&self) -> Vec<TokenId> {
        self.inner.stop_token_ids()
    }
    fn fingerprint(&self) -> String {
        self.inner.fingerprint()
    }
}

/// A memory store whose manifest writes fail while `fail` is set.
#[derive(Default)]
struct FlakyStore {
    inner: MemoryStore,
    fail: AtomicBool,
}

#[async_trait]
impl CacheStore for FlakyStore {
    async fn save_blocks(&self, blocks: Vec<Arc<KvBlock>>) -> Result<usize, StoreError> {
        self.inner.save_blocks(blocks).await
    }
    async fn stored_prefix(&self, hashes: &[BlockHash]) -> Result<usize, StoreError> {
        self.inner.stored_prefix(hashes).await
    }
    async fn load_blocks(
        &self,
        fp: &str,
        hashes: &[BlockHash],
    ) -> Result<Vec<Arc<KvBlock>>, StoreError> {
        self.inner.load_blocks(fp, hashes).await
    }
    async fn save_manifest(&self, m: &AgentManifest) -> Result<(), StoreError> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(StoreError::Io(
                "No space left on device (os error 28)".into(),
            ));
        }
        self.inner.save_manifest(m).await
    }
    async fn load_manifest(&self, key: &AgentKey) -> Result<Option<AgentManifest>, StoreError> {
        self.inner.load_manifest(key).await
    }
    async fn delete_manifest(&self, key: &AgentKey) -> Result<bool, StoreError> {
        self.inner.delete_manifest(key).await
    }
    async fn list_manifests(
        &self,
        ns: Option<&Namespace>,
    ) -> Result<Vec<AgentManifest>, StoreError> {
        self.inner.list_manifests(ns).await
    }
    async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.inner.stats().await
    }
    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
}

fn service_over(
    store: Arc<dyn CacheStore>,
    formatter: Arc<dyn ChatFormatter>,
) -> Arc<AgentService> {
    let config = ServiceConfig::for_block_tokens(FakeEngine::DEFAULT_BLOCK_TOKENS as usize);
    Arc::new(
        AgentService::new(
            Arc::new(FakeEngine::new(FakeEngine::DEFAULT_BLOCK_TOKENS)),
            store,
            formatter,
            Arc::new(ManualClock::new(1_700_000_000_000)),
            config,
        )
        .expect("valid configuration"),
    )
}

fn long_turn(question: &str) -> Value {
    json!({"model": "m", "max_tokens": 4, "system": SYSTEM,
        "messages": [{"role": "user", "content": question}]})
}

#[tokio::test]
async fn a_250_byte_agent_id_survives_a_restart_and_513_bytes_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || {
        Arc::new(
            cache_store_disk::DiskCacheStore::open(cache_store_disk::DiskStoreConfig::new(
                dir.path(),
            ))
            .expect("open store"),
        )
    };
    let id = format!("agent-{}", "x".repeat(244));
    assert_eq!(id.len(), 250);
    {
        let service = service_over(open(), Arc::new(ToyFormatter::new()));
        let app = http_api::router(AppState::new(service.clone()));
        let r = post(
            &app,
            "/v1/messages",
            &[("x-agent-id", &id)],
            long_turn("hi"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-semantic-persist").as_deref(), Some("saved"));
        let g = get(&app, &format!("/v1/agents/{id}"), &[]).await;
        assert_eq!(g.status, 200, "{}", g.text());
        assert_eq!(g.json()["persisted"], true);
        service.flush().await.expect("flush");
    }
    // A new process on the same directory: the agent is there and its next turn is warm.
    let service = service_over(open(), Arc::new(ToyFormatter::new()));
    let app = http_api::router(AppState::new(service));
    let g = get(&app, &format!("/v1/agents/{id}"), &[]).await;
    assert_eq!(g.status, 200, "{}", g.text());
    assert_eq!(g.json()["tier"], "warm");
    let r = post(
        &app,
        "/v1/messages",
        &[("x-agent-id", &id)],
        long_turn("again"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, cache) = cache_header(&r);
    assert!(cache["restored"] > 0, "{:?}", r.header("x-semantic-cache"));

    let too_long = "y".repeat(513);
    let r = post(
        &app,
        "/v1/messages",
        &[("x-agent-id", &too_long)],
        long_turn("x"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["type"], "error");
    let g = get(&app, &format!("/v1/agents/{too_long}"), &[]).await;
    assert_eq!(g.status, 400);
    assert_eq!(g.json()["error"]["param"], "agent_id");
}

#[tokio::test]
async fn a_persistence_failure_is_reported_on_the_turn_the_agent_and_metrics() {
    let store = Arc::new(FlakyStore::default());
    store.fail.store(true, Ordering::Relaxed);
    let service = service_over(store.clone(), Arc::new(ToyFormatter::new()));
    let app = http_api::router(AppState::new(service));
    let r = post(
        &app,
        "/v1/messages",
        &[("x-agent-id", "disk-full")],
        long_turn("hi"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let persist = r.header("x-semantic-persist").unwrap_or_default();
    assert!(
        persist.starts_with("failed; error=") && persist.contains("No space left"),
        "{persist}"
    );
    let g = get(&app, "/v1/agents/disk-full", &[]).await;
    assert_eq!(
        g.status,
        200,
        "the agent is not silently gone: {}",
        g.text()
    );
    assert_eq!(g.json()["persisted"], false);
    assert!(g.json()["persist_error"]
        .as_str()
        .is_some_and(|e| e.contains("No space left")));
    let list = get(&app, "/v1/agents", &[]).await.json();
    assert_eq!(list["data"][0]["id"], "disk-full", "{list}");
    assert_eq!(list["data"][0]["persisted"], false);
    let m = get(&app, "/metrics", &[]).await.text();
    assert!(m.contains("semantic_persist_failures_total 1"), "{m}");

    // The next turn persists: the agent says so.
    store.fail.store(false, Ordering::Relaxed);
    let r = post(
        &app,
        "/v1/messages",
        &[("x-agent-id", "disk-full")],
        long_turn("ok"),
    )
    .await;
    assert_eq!(r.header("x-semantic-persist").as_deref(), Some("saved"));
    let g = get(&app, "/v1/agents/disk-full", &[]).await;
    assert_eq!(g.json()["persisted"], true);
    assert_eq!(g.json()["persist_error"], Value::Null);
}

#[tokio::test]
async fn a_huge_prompt_is_refused_before_it_is_tokenized() {
    let formatter = Arc::new(CountingFormatter::default());
    let service = service_over(Arc::new(MemoryStore::new()), formatter.clone());
    let app = http_api::router(AppState::new(service));
    let huge = "a".repeat(10 * 1024 * 1024);
    let start = Instant::now();
    let r = post(
        &app,
        "/v1/chat/completions",
        &[],
        chat(chat_messages(&huge)),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "context_length_exceeded");
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("at least")));
    assert_eq!(
        formatter.encodes.load(Ordering::Relaxed),
        0,
        "never tokenized"
    );
    let r = post(
        &app,
        "/v1/messages/count_tokens",
        &[],
        messages_body(&huge, 1),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(formatter.encodes.load(Ordering::Relaxed), 0);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // A prompt that fits is still tokenized and answered.
    let r = post(&app, "/v1/chat/completions", &[], chat(chat_messages("hi"))).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn odd_requests_get_json_errors_in_the_routes_shape() {
    let (app, _stack) = fake_app();
    // A path segment that is not UTF-8.
    let r = get(&app, "/v1/agents/%FF%FE", &[]).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = send(
        &app,
        request(Method::POST, "/v1/agents/%FF%FE/pin", &[], None),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"]["message"].is_string());
    // A query that does not parse.
    let r = send(
        &app,
        request(Method::DELETE, "/v1/agents/a?keep_on_disk=maybe", &[], None),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.json()["error"].is_object());
    // Unknown route and wrong method, both flavors.
    let r = get(&app, "/v1/messages/nope", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["type"], "error");
    let r = get(&app, "/v1/chat/completions", &[]).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");

    // Tool schemas must be objects.
    let mut body = chat(chat_messages("hi"));
    body["tools"] =
        json!([{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}]);
    let r = post(&app, "/v1/chat/completions", &[], body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "tools[0].function.parameters");
    let mut body = messages_body("hi", 4);
    body["tools"] = json!([{"name": "f", "input_schema": [1, 2]}]);
    let r = post(&app, "/v1/messages", &[], body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["type"], "error");
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("tools[0].input_schema")));
}

#[test]
fn the_docs_state_the_body_limit_the_code_enforces() {
    let mib = http_api::DEFAULT_MAX_BODY_BYTES / (1024 * 1024);
    assert_eq!(
        Limits::default().max_body_bytes,
        http_api::DEFAULT_MAX_BODY_BYTES
    );
    let api = include_str!("../../../../docs/api.md");
    let config = include_str!("../../../../docs/configuration.md");
    assert!(
        api.contains(&format!("(default {mib} MiB")),
        "docs/api.md does not say the body limit is {mib} MiB"
    );
    assert!(
        config.contains(&format!("| `server_max_body_mb` | `{mib}` |")),
        "docs/configuration.md does not say the body limit is {mib} MiB"
    );
    for doc in [api, config] {
        for other in [8, 16, 64] {
            assert!(
                other == mib || !doc.contains(&format!("{other} MiB body")),
                "a doc names another body limit"
            );
        }
    }
}

// ---- over a socket ----

struct Running {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), http_api::ApiError>>,
}

async fn start(state: AppState) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http_api::serve(listener, state, async {
        let _ = rx.await;
    }));
    Running {
        addr,
        stop: Some(tx),
        server,
    }
}

/// Sends a raw request with `connection: close` and reads the whole answer.
async fn raw(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<&Value>) -> String {
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), sock.read_to_string(&mut out)).await;
    out
}

/// Waits until the server closes `sock` (EOF or reset); the time it took.
async fn closed_after(sock: &mut tokio::net::TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit, sock.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            Ok(Ok(_)) => {}
            Err(_) => panic!("connection still open after {limit:?}"),
        }
    }
}

fn fast_limits() -> Limits {
    Limits {
        header_read_timeout: Duration::from_secs(1),
        keep_alive_timeout: Duration::from_secs(2),
        max_connections: 4,
        shutdown_drain: Duration::from_secs(1),
        ..Limits::default()
    }
}

#[tokio::test]
async fn idle_and_slow_header_connections_are_closed_and_the_cap_holds() {
    let stack = testkit::FakeStack::new();
    let srv = start(AppState::new(stack.service.clone()).with_limits(fast_limits())).await;
    // Idle: nothing sent at all.
    let mut idle = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    // Slow headers: one byte now and then.
    let mut slow = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    slow.write_all(b"GET /health HTTP/1.1\r\nho")
        .await
        .expect("write");
    let t_idle = closed_after(&mut idle, Duration::from_secs(5)).await;
    let t_slow = closed_after(&mut slow, Duration::from_secs(5)).await;
    assert!(t_idle < Duration::from_secs(4), "{t_idle:?}");
    assert!(t_slow < Duration::from_secs(4), "{t_slow:?}");

    // A keep-alive connection that stays idle after its answer is closed too.
    let mut ka = tokio::net::TcpStream::connect(srv.addr)
        .await
        .expect("connect");
    ka.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 512];
    let n = ka.read(&mut buf).await.expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    closed_after(&mut ka, Duration::from_secs(5)).await;

    // More idle connections than the cap: /health still answers once they time out.
    let mut hogs = Vec::new();
    for _ in 0..12 {
        hogs.push(
            tokio::net::TcpStream::connect(srv.addr)
                .await
                .expect("connect"),
        );
    }
    let start = Instant::now();
    let out = raw(srv.addr, "GET", "/health", None).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    drop(hogs);
    let Running {
        mut stop, server, ..
    } = srv;
    let _ = stop.take().map(|s| s.send(()));
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}

#[tokio::test]
async fn shutdown_refuses_new_work_and_ends_long_streams_within_the_grace() {
    let engine = Arc::new(
        ScriptedEngine::new("la ")
            .endless()
            .slow(Duration::from_millis(5)),
    );
    let service = scripted_service(engine, None);
    let state = AppState::new(service.clone()).with_limits(fast_limits());
    let mut srv = start(state).await;

    // Two endless streams, one per API.
    let mut streams = Vec::new();
    for (path, body) in [
        ("/v1/messages", {
            let mut b = messages_body("go", 100_000);
            b["stream"] = json!(true);
            b
        }),
        ("/v1/chat/completions", {
            let mut b = chat(chat_messages("go"));
            b["stream"] = json!(true);
            b["max_tokens"] = json!(100_000);
            b
        }),
    ] {
        let addr = srv.addr;
        streams.push(tokio::spawn(async move {
            raw(addr, "POST", path, Some(&body)).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = Instant::now();
    let _ = srv.stop.take().map(|s| s.send(()));
    tokio::time::sleep(Duration::from_millis(400)).await;

    // During the grace: readiness 503, new requests 503 in the API's shape with Retry-After.
    let ready = raw(srv.addr, "GET", "/health/ready", None).await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    let refused = raw(
        srv.addr,
        "POST",
        "/v1/messages",
        Some(&messages_body("x", 4)),
    )
    .await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.to_ascii_lowercase().contains("retry-after:"),
        "{refused}"
    );
    assert!(refused.contains("\"type\":\"error\""), "{refused}");

    let anthropic = streams.remove(0).await.expect("join");
    let openai = streams.remove(0).await.expect("join");
    assert!(anthropic.contains("event: message_start"), "{anthropic}");
    assert!(
        anthropic.contains("event: error"),
        "ends with an error event"
    );
    assert!(openai.contains("\"error\""), "ends with an error chunk");
    let result = tokio::time::timeout(Duration::from_secs(10), srv.server)
        .await
        .expect("serve returns")
        .expect("joins");
    assert!(result.is_ok(), "{result:?}");
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(1) + http_api::SHUTDOWN_SETTLE + Duration::from_secs(1),
        "{took:?}"
    );
    assert_eq!(service.stats().await.active, 0);
}
