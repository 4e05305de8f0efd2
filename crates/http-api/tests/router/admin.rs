//! Models, agents, stats, health, metrics, auth, body limit, unknown routes.

use crate::common::*;
use axum::http::Method;
use http_api::{AuthConfig, Limits};
use serde_json::json;
use std::sync::atomic::Ordering;

#[tokio::test]
async fn models_with_cache_spec() {
    let (app, _stack) = fake_app();
    let r = get(&app, "/v1/models", &[]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["object"], "list");
    let m = &v["data"][0];
    assert_eq!(m["id"], "fake-model");
    assert_eq!(m["object"], "model");
    assert_eq!(m["type"], "model");
    assert!(m["created"].as_u64().is_some());
    assert!(m["created_at"].as_str().is_some_and(|s| s.ends_with('Z')));
    assert_eq!(m["block_tokens"], 64);
    assert_eq!(m["context_length"], 8192);
    assert!(m["spec"].is_object(), "{m}");
    assert!(m["bytes_per_block"].as_u64().is_some_and(|b| b > 0));
    assert_eq!(
        get(&app, "/v1/models/fake-model", &[]).await.json()["id"],
        "fake-model"
    );
    let r = get(&app, "/v1/models/gpt-5", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn agents_list_show_pin_evict_delete() {
    let (app, stack) = fake_app();
    let h = [("x-agent-id", "worker-1")];
    assert_eq!(
        post(&app, "/v1/chat/completions", &h, chat(chat_messages("hi")))
            .await
            .status,
        200
    );

    let list = get(&app, "/v1/agents", &[]).await.json();
    assert_eq!(list["object"], "list");
    let a = &list["data"][0];
    assert_eq!(a["id"], "worker-1");
    assert_eq!(a["object"], "agent");
    assert_eq!(a["tier"], "hot");
    assert_eq!(a["pinned"], false);
    assert!(a["tokens"].as_u64().is_some_and(|t| t > 0));
    assert!(a["blocks"].as_u64().is_some_and(|b| b > 0));

    let show = get(&app, "/v1/agents/worker-1", &[]).await;
    assert_eq!(show.status, 200);
    assert_eq!(show.json()["id"], "worker-1");

    let pin = post(&app, "/v1/agents/worker-1/pin", &[], json!({})).await;
    assert_eq!(pin.status, 200);
    assert_eq!(pin.json()["pinned"], true);
    let unpin = send(
        &app,
        request(Method::POST, "/v1/agents/worker-1/unpin", &[], None),
    )
    .await;
    assert_eq!(unpin.status, 200);
    assert_eq!(unpin.json()["pinned"], false);

    let evict = send(
        &app,
        request(
            Method::DELETE,
            "/v1/agents/worker-1?keep_on_disk=true",
            &[],
            None,
        ),
    )
    .await;
    assert_eq!(evict.status, 200, "{}", evict.text());
    assert_eq!(evict.json()["kept_on_disk"], true);
    assert_eq!(evict.json()["deleted"], false);
    assert_eq!(
        get(&app, "/v1/agents/worker-1", &[]).await.json()["tier"],
        "warm"
    );
    assert_eq!(stack.engine.stats().open_sequences, 0, "evicted from RAM");

    // The next turn restores it from the store.
    let r = post(&app, "/v1/chat/completions", &h, chat(chat_messages("hi"))).await;
    assert_eq!(cache_header(&r).0, "warm");

    let del = send(
        &app,
        request(Method::DELETE, "/v1/agents/worker-1", &[], None),
    )
    .await;
    assert_eq!(del.status, 200);
    assert_eq!(del.json()["deleted"], true);
    let gone = get(&app, "/v1/agents/worker-1", &[]).await;
    assert_eq!(gone.status, 404);
    assert_eq!(gone.json()["error"]["type"], "not_found_error");
    let again = send(
        &app,
        request(Method::DELETE, "/v1/agents/worker-1", &[], None),
    )
    .await;
    assert_eq!(again.status, 404);
    assert_eq!(
        post(&app, "/v1/agents/nobody/pin", &[], json!({}))
            .await
            .status,
        404
    );
    let bad = get(&app, "/v1/agents/..", &[]).await;
    assert!(bad.status == 400 || bad.status == 404, "{}", bad.status);
    let bad = get(&app, "/v1/agents/a%2Fb", &[]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"]["param"], "agent_id");
    let bad = get(&app, "/v1/agents?keep_on_disk=maybe", &[]).await;
    assert_eq!(bad.status, 400);
}

#[tokio::test]
async fn stats_route() {
    let (app, _stack) = fake_app();
    post(
        &app,
        "/v1/chat/completions",
        &[("x-agent-id", "s1")],
        chat(chat_messages("hi")),
    )
    .await;
    let v = get(&app, "/v1/stats", &[]).await.json();
    assert_eq!(v["object"], "stats");
    assert_eq!(v["requests"], 1);
    assert_eq!(v["misses"], 1);
    assert_eq!(v["hot_agents"], 1);
    // The idle agent's blocks are evictable: they do not count as utilization.
    assert!(v["hot_blocks_used"].as_u64().is_some_and(|u| u > 0));
    assert_eq!(v["pool_utilization"].as_f64(), Some(0.0));
    assert!(v["store"]["blocks"].as_u64().is_some_and(|b| b > 0));
    assert_eq!(v["ready"], true);
}

#[tokio::test]
async fn health_routes_and_readiness() {
    let (app, stack) = fake_app();
    assert_eq!(
        get(&app, "/health", &[]).await.json(),
        json!({"status": "ok"})
    );
    assert_eq!(
        get(&app, "/health/live", &[]).await.json(),
        json!({"status": "alive"})
    );
    let r = get(&app, "/health/ready", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");

    // Not ready: health says so and generation routes answer 503 with Retry-After.
    let state = http_api::AppState::new(stack.service.clone());
    let ready = state.ready.clone();
    let app = http_api::router(state);
    ready.store(false, Ordering::Release);
    let r = get(&app, "/health/ready", &[]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["status"], "not_ready");
    let r = post(&app, "/v1/chat/completions", &[], chat(chat_messages("x"))).await;
    assert_eq!(r.status, 503);
    assert!(r.header("retry-after").is_some());
    let r = post(&app, "/v1/messages", &[], messages_body("x", 5)).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(get(&app, "/health/live", &[]).await.status, 200);

    // Pool near exhaustion.
    let app = app_with(
        stack.service.clone(),
        AuthConfig::default(),
        Limits {
            ready_max_pool_utilization: 0.0,
            ..Limits::default()
        },
    );
    post(
        &app,
        "/v1/chat/completions",
        &[("x-agent-id", "p")],
        chat(chat_messages("x")),
    )
    .await;
    // An idle agent's blocks can always be evicted: still ready at a 0.0 threshold.
    let r = get(&app, "/health/ready", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test]
async fn loading_router_answers_503() {
    let app = http_api::loading_router();
    assert_eq!(get(&app, "/health/live", &[]).await.status, 200);
    assert_eq!(get(&app, "/health/ready", &[]).await.status, 503);
    let r = post(&app, "/v1/messages", &[], messages_body("x", 5)).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["type"], "error");
    let r = post(&app, "/v1/chat/completions", &[], chat(chat_messages("x"))).await;
    assert_eq!(r.status, 503);
    assert!(r.json()["error"]["message"].is_string());
}

#[tokio::test]
async fn prometheus_metrics() {
    let (app, _stack) = fake_app();
    post(
        &app,
        "/v1/chat/completions",
        &[("x-agent-id", "m1")],
        chat(chat_messages("hi")),
    )
    .await;
    post(
        &app,
        "/v1/chat/completions",
        &[("x-agent-id", "m1")],
        chat(chat_messages("hi")),
    )
    .await;
    let r = get(&app, "/metrics", &[]).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    let text = r.text();
    for needle in [
        "semantic_http_requests_total{",
        "route=\"/v1/chat/completions\"",
        "semantic_ttft_seconds_bucket{",
        "semantic_prompt_seconds_bucket{",
        "semantic_generations_total{api=\"openai\",tier=\"hot\"} 1",
        "semantic_cache_turns_total{tier=\"miss\"} 1",
        "semantic_cache_turns_total{tier=\"hot\"} 1",
        "semantic_cache_reused_tokens_total ",
        "semantic_cache_restored_bytes_total ",
        "semantic_hot_evictions_total ",
        "semantic_hot_pool_blocks_used ",
        "semantic_hot_pool_utilization_ratio ",
        "semantic_generated_tokens_total ",
        "# HELP semantic_ttft_seconds",
        // Issue #8: queue length, time in queue, prompts in progress, decode batch.
        "semantic_requests_queued 0",
        "semantic_requests_prefilling 0",
        "semantic_queue_wait_seconds_count 2",
        "semantic_decode_batch_size 0",
        "semantic_decode_step_sequences_total ",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    // Recorders are per router: a fresh one starts from zero.
    let (other, _s) = fake_app();
    let t2 = get(&other, "/metrics", &[]).await.text();
    assert!(!t2.contains("semantic_generations_total{"), "{t2}");
}

#[tokio::test]
async fn unknown_routes_and_methods() {
    let (app, _stack) = fake_app();
    let r = get(&app, "/v1/nothing", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    let r = post(&app, "/v1/messages/nothing", &[], json!({})).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    let r = get(&app, "/v1/chat/completions", &[]).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn body_limit_is_413_in_each_shape() {
    let stack = testkit::FakeStack::new();
    let app = app_with(
        stack.service.clone(),
        AuthConfig::default(),
        Limits {
            max_body_bytes: 1024,
            ..Limits::default()
        },
    );
    let big = chat(chat_messages(&"x".repeat(4096)));
    let r = post(&app, "/v1/chat/completions", &[], big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");
    let r = post(
        &app,
        "/v1/messages",
        &[],
        messages_body(&"x".repeat(4096), 5),
    )
    .await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["type"], "request_too_large");
    // Chunked body without a length.
    let body = axum::body::Body::from_stream(futures::stream::iter(
        (0..8).map(|_| Ok::<_, std::io::Error>(vec![b' '; 512])),
    ));
    let req = axum::http::Request::post("/v1/chat/completions")
        .body(body)
        .expect("request");
    assert_eq!(send(&app, req).await.status, 413);
}

fn auth() -> AuthConfig {
    AuthConfig {
        api_keys: vec!["key-one".into(), "key-two".into()],
        admin_key: Some("admin-secret".into()),
    }
}

#[tokio::test]
async fn api_keys_admin_key_and_namespaces() {
    let stack = testkit::FakeStack::new();
    let app = app_with(stack.service.clone(), auth(), Limits::default());
    let body = chat(chat_messages("hello"));

    // 401 in each API's shape.
    let r = post(&app, "/v1/chat/completions", &[], body.clone()).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = post(
        &app,
        "/v1/messages",
        &[("x-api-key", "wrong")],
        messages_body("x", 5),
    )
    .await;
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert_eq!(get(&app, "/v1/models", &[]).await.status, 401);
    assert_eq!(get(&app, "/metrics", &[]).await.status, 401);
    // Health is public.
    assert_eq!(get(&app, "/health/ready", &[]).await.status, 200);

    // Both headers work; each key is its own namespace.
    let h1 = [("authorization", "Bearer key-one"), ("x-agent-id", "same")];
    let h2 = [("x-api-key", "key-two"), ("x-agent-id", "same")];
    assert_eq!(
        post(&app, "/v1/chat/completions", &h1, body.clone())
            .await
            .status,
        200
    );
    let r2 = post(&app, "/v1/chat/completions", &h2, body.clone()).await;
    assert_eq!(r2.status, 200);
    assert_eq!(cache_header(&r2).0, "miss", "tenants never share blocks");
    let list1 = get(&app, "/v1/agents", &[("authorization", "Bearer key-one")])
        .await
        .json();
    assert_eq!(list1["data"].as_array().map(Vec::len), Some(1));
    let ns1 = list1["data"][0]["namespace"]
        .as_str()
        .expect("ns")
        .to_string();
    assert_eq!(ns1, http_api::namespace_for_key("key-one").0);
    assert!(!ns1.contains("key-one"));
    let all = get(&app, "/v1/agents", &[("x-api-key", "admin-secret")])
        .await
        .json();
    assert_eq!(all["data"].as_array().map(Vec::len), Some(2));
    // A tenant may not look into another namespace.
    let r = get(
        &app,
        &format!(
            "/v1/agents?namespace={}",
            http_api::namespace_for_key("key-two").0
        ),
        &[("x-api-key", "key-one")],
    )
    .await;
    assert_eq!(r.status, 403);

    // Admin routes: 403 with an API key, 401 without, 200 with the admin key.
    let del = |h: Vec<(&'static str, &'static str)>, path: String| {
        let app = app.clone();
        async move { send(&app, request(Method::DELETE, &path, &h, None)).await }
    };
    let path = format!("/v1/agents/same?namespace={ns1}");
    assert_eq!(
        del(vec![("x-api-key", "key-one")], "/v1/agents/same".into())
            .await
            .status,
        403
    );
    assert_eq!(del(vec![], "/v1/agents/same".into()).await.status, 401);
    let r = post(
        &app,
        "/v1/agents/same/pin",
        &[("x-api-key", "key-one")],
        json!({}),
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["type"], "permission_error");
    assert_eq!(
        get(&app, "/v1/stats", &[("x-api-key", "key-one")])
            .await
            .status,
        403
    );
    assert_eq!(
        get(
            &app,
            "/v1/stats",
            &[("authorization", "Bearer admin-secret")]
        )
        .await
        .status,
        200
    );
    let r = post(
        &app,
        &format!("/v1/agents/same/pin?namespace={ns1}"),
        &[("x-api-key", "admin-secret")],
        json!({}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        del(vec![("x-api-key", "admin-secret")], path).await.status,
        200
    );
    let list1 = get(&app, "/v1/agents", &[("authorization", "Bearer key-one")])
        .await
        .json();
    assert_eq!(list1["data"].as_array().map(Vec::len), Some(0));
    // The admin key is not an API key.
    let r = post(
        &app,
        "/v1/chat/completions",
        &[("x-api-key", "admin-secret")],
        body,
    )
    .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        get(&app, "/metrics", &[("x-api-key", "key-two")])
            .await
            .status,
        200
    );
}
