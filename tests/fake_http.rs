//! The whole flow over a real socket on 127.0.0.1 with the testkit fakes: cold turn, warm
//! turn, restart over the same store, shared prefixes, SSE streaming, errors in API shape.

use semantic_e2e::parse_sse;
use serde_json::{json, Value};
use std::io::BufReader;
use std::sync::Arc;
use std::time::Duration;
use testkit::{FakeStack, MemoryStore};

/// A server on a free port running over a fake stack; stopped on drop.
struct FakeServer {
    base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeServer {
    fn start(stack: &FakeStack) -> Self {
        let service = stack.service.clone();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send addr");
                let state = http_api::AppState::new(service);
                let _ = http_api::serve(listener, state, async {
                    let _ = stop_rx.await;
                })
                .await;
            });
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server address");
        Self {
            base: format!("http://{addr}"),
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: Value) -> (u16, String, String) {
        let mut req = ureq::post(&format!("{}{path}", self.base)).timeout(Duration::from_secs(60));
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let resp = match req.send_json(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("POST {path}: {e}"),
        };
        let status = resp.status();
        let cache = resp
            .header("x-semantic-cache")
            .unwrap_or_default()
            .to_string();
        let text = resp.into_string().unwrap_or_default();
        (status, cache, text)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn anthropic(turns: &[(&str, &str)], q: &str, stream: bool) -> Value {
    let mut messages = Vec::new();
    for (u, a) in turns {
        messages.push(json!({"role": "user", "content": u}));
        messages.push(json!({"role": "assistant", "content": a}));
    }
    messages.push(json!({"role": "user", "content": q}));
    json!({
        "model": "fake",
        "max_tokens": 16,
        "temperature": 0,
        "stream": stream,
        "system": "You are a meticulous planning agent. ".repeat(6),
        "messages": messages,
    })
}

fn text_and_usage(body: &str) -> (String, Value) {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let text = v["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (text, v["usage"].clone())
}

#[test]
fn cold_warm_restart_and_shared_prefix_over_http() {
    let store = Arc::new(MemoryStore::new());
    let stack = FakeStack::with_store(store.clone());
    let server = FakeServer::start(&stack);
    let a = [("x-agent-id", "planner")];

    let (s1, c1, b1) = server.post(
        "/v1/messages",
        &a,
        anthropic(&[], "Plan the release.", false),
    );
    assert_eq!(s1, 200, "{b1}");
    assert!(c1.starts_with("tier=miss"), "{c1}");
    let (t1, u1) = text_and_usage(&b1);
    assert_eq!(u1["cache_read_input_tokens"], 0);

    let (s2, c2, b2) = server.post(
        "/v1/messages",
        &a,
        anthropic(&[("Plan the release.", &t1)], "Add a rollback step.", false),
    );
    assert_eq!(s2, 200, "{b2}");
    assert!(c2.starts_with("tier=hot"), "{c2}");
    let (_, u2) = text_and_usage(&b2);
    assert!(u2["cache_read_input_tokens"].as_u64().unwrap_or(0) > 0);
    drop(server);

    // Restart: a new service over the same store.
    let restarted = FakeStack::with_store(store);
    let server = FakeServer::start(&restarted);
    let (s3, c3, b3) = server.post(
        "/v1/messages",
        &a,
        anthropic(&[("Plan the release.", &t1)], "Add a rollback step.", false),
    );
    assert_eq!(s3, 200);
    assert!(c3.starts_with("tier=warm"), "{c3}");
    assert_eq!(
        text_and_usage(&b3).0,
        text_and_usage(&b2).0,
        "warm equals hot"
    );

    // Another agent shares the system prompt's blocks.
    let (_, cb, _) = server.post(
        "/v1/messages",
        &[("x-agent-id", "reviewer")],
        anthropic(&[], "Review the plan.", false),
    );
    assert!(!cb.contains("reused=0;"), "{cb}");

    // Streaming: the real event sequence.
    let (ss, _, body) = server.post(
        "/v1/messages",
        &[("x-agent-id", "streamer")],
        anthropic(&[], "Stream please.", true),
    );
    assert_eq!(ss, 200);
    let events: Vec<String> = parse_sse(BufReader::new(body.as_bytes()))
        .into_iter()
        .map(|(e, _)| e)
        .filter(|e| e != "ping")
        .collect();
    assert_eq!(events.first().map(String::as_str), Some("message_start"));
    assert_eq!(events.last().map(String::as_str), Some("message_stop"));
    assert!(events.iter().any(|e| e == "content_block_delta"));

    // Errors in the API's own shape.
    let (se, _, be) = server.post("/v1/messages", &[], json!({"model": "x", "messages": []}));
    assert!(se == 400 || se == 422, "{se} {be}");
    let v: Value = serde_json::from_str(&be).expect("json error");
    assert_eq!(v["type"], "error");
    let (so, _, bo) = server.post(
        "/v1/chat/completions",
        &[],
        json!({"model": "x", "n": 2, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(so, 400);
    let v: Value = serde_json::from_str(&bo).expect("json error");
    assert_eq!(v["error"]["param"], "n");
}
