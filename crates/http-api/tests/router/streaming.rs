//! Cancellation on disconnect, overload (429 / 529), failures mid-stream, and `serve`.

use crate::common::*;
use agent_session::ServiceConfig;
use futures::StreamExt;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::ServiceExt;

async fn open_stream(
    app: &axum::Router,
    path: &str,
    headers: &[(&str, &str)],
    body: serde_json::Value,
) -> axum::body::BodyDataStream {
    let response = app
        .clone()
        .oneshot(request(
            axum::http::Method::POST,
            path,
            headers,
            Some(&body),
        ))
        .await
        .expect("infallible");
    assert_eq!(response.status(), 200);
    response.into_body().into_data_stream()
}

/// The service's stats once it has finished `requests` requests and runs none (or after
/// 5 s of polling, for the caller's assertions to report).
async fn settled(
    service: &agent_session::AgentService,
    requests: u64,
) -> agent_session::service::ServiceStats {
    let mut stats = service.stats().await;
    for _ in 0..500 {
        if stats.active == 0 && stats.requests == requests {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        stats = service.stats().await;
    }
    stats
}

/// Asserts that `counter` does not move over `wait` (the work it counts has stopped);
/// returns its value.
async fn unmoved(counter: &std::sync::atomic::AtomicUsize, wait: Duration, what: &str) -> usize {
    let before = counter.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(wait).await;
    assert_eq!(
        counter.load(std::sync::atomic::Ordering::Relaxed),
        before,
        "{what}"
    );
    before
}

#[tokio::test]
async fn client_disconnect_cancels_generation() {
    for (path, agent) in [("/v1/chat/completions", Some("c1")), ("/v1/messages", None)] {
        let engine = Arc::new(
            ScriptedEngine::new("la ")
                .endless()
                .slow(Duration::from_millis(2)),
        );
        let service = scripted_service(engine.clone(), None);
        let app = http_api::router(http_api::AppState::new(service.clone()));
        let mut body = if path == "/v1/messages" {
            messages_body("talk forever", 4000)
        } else {
            let mut b = chat(chat_messages("talk forever"));
            b["max_tokens"] = json!(4000);
            b
        };
        body["stream"] = json!(true);
        let headers: Vec<(&str, &str)> = agent.map(|a| ("x-agent-id", a)).into_iter().collect();
        let mut stream = open_stream(&app, path, &headers, body).await;
        // Read a few frames, then go away.
        for _ in 0..3 {
            let frame = stream.next().await.expect("frame").expect("data");
            assert!(!frame.is_empty());
        }
        drop(stream);
        let stats = settled(&service, 1).await;
        assert_eq!(stats.active, 0, "{path}: the generation stopped");
        assert!(
            stats.generated_tokens < 1000,
            "{path}: cancelled early ({} tokens)",
            stats.generated_tokens
        );
        unmoved(&engine.steps, Duration::from_millis(50), "no more decoding").await;
        // Its blocks are freed: only an identified agent's session stays hot.
        assert_eq!(
            engine.open_sequences(),
            usize::from(agent.is_some()),
            "{path}"
        );
        // The server still works.
        let r = post(&app, "/v1/chat/completions", &[], {
            let mut b = chat(chat_messages("short"));
            b["max_tokens"] = json!(3);
            b
        })
        .await;
        assert_eq!(r.status, 200);
    }
}

#[tokio::test]
async fn a_client_gone_during_a_long_prefill_stops_it_within_a_chunk() {
    let engine = Arc::new(ScriptedEngine::new("ok").slow_prefill(Duration::from_millis(20)));
    let service = scripted_service(engine.clone(), None);
    let app = http_api::router(http_api::AppState::new(service.clone()));
    // About 3,000 byte tokens: dozens of chunks, over a second of prefill.
    let mut body = chat(chat_messages(&"long prompt ".repeat(250)));
    body["stream"] = json!(true);
    let call = app.clone().oneshot(request(
        axum::http::Method::POST,
        "/v1/chat/completions",
        &[("x-agent-id", "gone")],
        Some(&body),
    ));
    // The client gives up while the prompt is still being prefilled (no byte sent yet).
    assert!(tokio::time::timeout(Duration::from_millis(150), call)
        .await
        .is_err());
    let stats = settled(&service, 1).await;
    assert_eq!(stats.active, 0, "the generation stopped");
    let chunks = unmoved(
        &engine.prefills,
        Duration::from_millis(100),
        "no more prefill",
    )
    .await;
    assert!(
        chunks < 20,
        "stopped within a chunk of the hang-up: {chunks} chunks"
    );
    assert_eq!(
        engine.steps.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "nothing decoded"
    );
    assert_eq!(engine.open_sequences(), 0, "its sequence is released");
    // The agent's next turn works.
    let mut b = chat(chat_messages("short"));
    b["max_tokens"] = json!(3);
    let r = post(&app, "/v1/chat/completions", &[("x-agent-id", "gone")], b).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn non_streaming_disconnect_cancels_too() {
    let engine = Arc::new(
        ScriptedEngine::new("la ")
            .endless()
            .slow(Duration::from_millis(2)),
    );
    let service = scripted_service(engine.clone(), None);
    let app = http_api::router(http_api::AppState::new(service.clone()));
    let mut body = chat(chat_messages("talk"));
    body["max_tokens"] = json!(4000);
    let call = app.oneshot(request(
        axum::http::Method::POST,
        "/v1/chat/completions",
        &[],
        Some(&body),
    ));
    // The client gives up after 100 ms.
    assert!(tokio::time::timeout(Duration::from_millis(100), call)
        .await
        .is_err());
    let mut done = false;
    for _ in 0..500 {
        let s = service.stats().await;
        if s.active == 0 && s.requests == 1 {
            done = true;
            assert!(s.generated_tokens < 1000);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(done, "the generation was cancelled");
    assert_eq!(engine.open_sequences(), 0);
}

#[tokio::test]
async fn overload_is_429_for_openai_and_529_for_anthropic() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let engine = Arc::new(ScriptedEngine::new("ok").gated(gate.clone()));
    let config = ServiceConfig {
        max_batch_size: 1,
        max_queue: 0,
        ..ServiceConfig::for_block_tokens(64)
    };
    let service = scripted_service(engine, Some(config));
    let app = http_api::router(http_api::AppState::new(service));

    // One request holds the only slot: its prompt is processed, its first step waits.
    let mut body = chat(chat_messages("hold"));
    body["stream"] = json!(true);
    let held = open_stream(&app, "/v1/chat/completions", &[], body).await;

    let r = post(
        &app,
        "/v1/chat/completions",
        &[],
        chat(chat_messages("second")),
    )
    .await;
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r
        .header("retry-after")
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|s| s >= 1));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    let r = post(&app, "/v1/messages", &[], messages_body("second", 5)).await;
    assert_eq!(r.status.as_u16(), 529);
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        r.json(),
        json!({"type": "error", "error": {"type": "overloaded_error", "message": r.json()["error"]["message"]}})
    );
    let ready = get(&app, "/health/ready", &[]).await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["reason"], "queue_full");

    // Release: the held stream completes and the server takes requests again.
    gate.add_permits(10_000);
    let text: Vec<u8> = held.map(|f| f.expect("data").to_vec()).concat().await;
    assert!(String::from_utf8_lossy(&text).ends_with("data: [DONE]\n\n"));
    let r = post(&app, "/v1/messages", &[], messages_body("third", 5)).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn failure_mid_stream_is_an_error_event() {
    let engine = Arc::new(ScriptedEngine::new("abcdefgh").failing_at(3));
    let service = scripted_service(engine, None);
    let app = http_api::router(http_api::AppState::new(service));

    let mut body = chat(chat_messages("x"));
    body["stream"] = json!(true);
    let events = post(&app, "/v1/chat/completions", &[], body).await.events();
    let last = events.last().expect("events").json();
    assert_eq!(last["error"]["type"], "server_error");
    assert!(events.iter().all(|e| e.data != "[DONE]"));

    let mut body = messages_body("x", 20);
    body["stream"] = json!(true);
    let events = post(&app, "/v1/messages", &[], body).await.events();
    let last = events.last().expect("events");
    assert_eq!(last.event.as_deref(), Some("error"));
    assert_eq!(last.json()["error"]["type"], "api_error");
    assert!(events
        .iter()
        .all(|e| e.event.as_deref() != Some("message_stop")));

    // Non-streaming: a 500 in the API's shape.
    let r = post(&app, "/v1/messages", &[], messages_body("x", 20)).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.json()["error"]["type"], "api_error");
}

#[tokio::test]
async fn serve_answers_and_shuts_down_gracefully() {
    let stack = testkit::FakeStack::new();
    let state = http_api::AppState::new(stack.service.clone());
    let ready = state.ready.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http_api::serve(listener, state, async {
        let _ = rx.await;
    }));

    let body = chat(chat_messages("over the wire")).to_string();
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-agent-id: wire\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    sock.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    sock.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out
        .to_ascii_lowercase()
        .contains("x-semantic-cache: tier=miss"));
    assert!(out.contains("\"chat.completion\""));

    tx.send(()).expect("signal");
    let result = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("stops")
        .expect("joins");
    assert!(result.is_ok(), "{result:?}");
    assert!(!ready.load(std::sync::atomic::Ordering::Acquire));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "listener closed"
    );
}

#[tokio::test]
async fn request_timeout_cancels_and_answers_504() {
    let engine = Arc::new(
        ScriptedEngine::new("la ")
            .endless()
            .slow(Duration::from_millis(2)),
    );
    let service = scripted_service(engine.clone(), None);
    let app = http_api::router(
        http_api::AppState::new(service.clone())
            .with_request_timeout(Some(Duration::from_millis(150))),
    );
    let mut body = chat(chat_messages("talk"));
    body["max_tokens"] = json!(4000);
    let r = post(&app, "/v1/chat/completions", &[], body.clone()).await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "timeout");
    let r = post(&app, "/v1/messages", &[], messages_body("talk", 4000)).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["type"], "timeout_error");

    body["stream"] = json!(true);
    let events = post(&app, "/v1/chat/completions", &[], body).await.events();
    assert_eq!(
        events.last().expect("events").json()["error"]["code"],
        "timeout"
    );
    let mut idle = false;
    for _ in 0..500 {
        let s = service.stats().await;
        if s.active == 0 && s.requests == 3 {
            idle = true;
            assert!(
                s.generated_tokens < 3000,
                "cancelled: {}",
                s.generated_tokens
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(idle, "every timed-out generation was cancelled");
    assert_eq!(engine.open_sequences(), 0);
}

#[tokio::test]
async fn a_request_that_times_out_while_queued_leaves_the_queue_at_once() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let engine = Arc::new(ScriptedEngine::new("ok").gated(gate.clone()));
    let config = ServiceConfig {
        max_batch_size: 1,
        max_queue: 1,
        ..ServiceConfig::for_block_tokens(64)
    };
    let service = scripted_service(engine, Some(config));
    let app = http_api::router(
        http_api::AppState::new(service.clone())
            .with_request_timeout(Some(Duration::from_millis(300))),
    );

    // The only slot is held: this request's prompt is processed, its first step waits.
    let mut body = chat(chat_messages("hold"));
    body["stream"] = json!(true);
    let held = open_stream(&app, "/v1/chat/completions", &[], body).await;

    // The next one waits in the queue until its time is up.
    let r = post(&app, "/v1/messages", &[], messages_body("queued", 5)).await;
    assert_eq!(r.status, 504, "{}", r.text());
    let mut stats = service.stats().await;
    for _ in 0..200 {
        stats = service.stats().await;
        if stats.queued == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(stats.queued, 0, "the timed-out request gave up its place");
    assert_eq!(stats.active, 1);

    // So the queue takes another request instead of refusing it.
    let waiting = tokio::spawn({
        let app = app.clone();
        async move { post(&app, "/v1/messages", &[], messages_body("next", 5)).await }
    });
    for _ in 0..200 {
        if service.stats().await.queued == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(service.stats().await.queued, 1, "queued, not refused");
    gate.add_permits(10_000);
    drop(held);
    let r = waiting.await.expect("joins");
    assert_ne!(r.status.as_u16(), 429, "{}", r.text());
}
