//! What real agent clients send: Claude Code's first request (recorded), system messages
//! inside `messages`, the fields Claude Code adds, `HEAD /`, and the `max_tokens` cap.

use crate::common::*;
use agent_session::ServiceConfig;
use axum::http::Method;
use serde_json::{json, Value};
use std::sync::Arc;
use testkit::{FakeEngine, FakeStack, MemoryStore};

/// Claude Code's first request (see the fixture's `_comment`).
fn claude_code_request() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/claude_code_first_request.json"
    );
    let text = std::fs::read_to_string(path).expect("read the Claude Code fixture");
    serde_json::from_str(&text).expect("the fixture is JSON")
}

/// A fake stack with room for a long agent prompt (64K context, 4,096 hot blocks).
fn roomy_app() -> (axum::Router, FakeStack) {
    let engine =
        Arc::new(FakeEngine::new(FakeEngine::DEFAULT_BLOCK_TOKENS).with_context_length(65_536));
    let config = ServiceConfig {
        hot_capacity_blocks: 4096,
        ..ServiceConfig::for_block_tokens(FakeEngine::DEFAULT_BLOCK_TOKENS as usize)
    };
    let stack = FakeStack::build(engine, Arc::new(MemoryStore::new()), config);
    let app = http_api::router(http_api::AppState::new(stack.service.clone()));
    (app, stack)
}

fn input_total(u: &Value) -> u64 {
    [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .iter()
    .map(|k| u[*k].as_u64().unwrap_or_else(|| panic!("{k} in {u}")))
    .sum()
}

#[tokio::test]
async fn claude_codes_recorded_first_request_is_served() {
    let fixture = claude_code_request();
    let body = fixture["body"].clone();
    // The shape this test is about: a system message inside messages, betas, adaptive
    // thinking, context management, output config, metadata.user_id, cache_control.
    assert!(body["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .any(|m| m["role"] == "system"));
    for field in [
        "thinking",
        "context_management",
        "output_config",
        "metadata",
    ] {
        assert!(
            body.get(field).is_some(),
            "the recorded request has {field}"
        );
    }
    assert_eq!(body["thinking"]["type"], "adaptive");
    let headers: Vec<(String, String)> = fixture["headers"]
        .as_object()
        .expect("headers")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("header value").to_string()))
        .collect();
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert!(headers.iter().any(|(k, _)| *k == "anthropic-beta"));
    let path = fixture["path"].as_str().expect("path");
    assert_eq!(path, "/v1/messages?beta=true");

    let (app, _stack) = roomy_app();
    // Claude Code may probe the base URL first.
    let head = send(&app, request(Method::HEAD, "/", &[], None)).await;
    assert_eq!(head.status, 200);

    let r = post(&app, path, &headers, body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let events = r.events();
    let start = events
        .iter()
        .find(|e| e.event.as_deref() == Some("message_start"))
        .expect("message_start")
        .json();
    let delta = events
        .iter()
        .find(|e| e.event.as_deref() == Some("message_delta"))
        .expect("message_delta")
        .json();
    assert_eq!(
        events.last().and_then(|e| e.event.as_deref()),
        Some("message_stop")
    );
    let prompt = input_total(&start["message"]["usage"]);
    assert!(
        prompt > 2000,
        "the whole recorded prompt was read: {prompt} tokens"
    );
    assert_eq!(input_total(&delta["usage"]), prompt);
    // The identity Claude Code sends (a JSON string in metadata.user_id) names an agent.
    assert!(r
        .header("x-semantic-agent")
        .is_some_and(|a| a.starts_with("h-")));

    // Its token count of the same body agrees.
    let mut count = body.clone();
    count.as_object_mut().expect("object").remove("max_tokens");
    count.as_object_mut().expect("object").remove("stream");
    let c = post(&app, "/v1/messages/count_tokens?beta=true", &headers, count).await;
    assert_eq!(c.status, 200, "{}", c.text());
    assert_eq!(c.json()["input_tokens"].as_u64(), Some(prompt));
}

/// Claude Code's first `system` block is a billing line whose `cc_version` suffix changes
/// with the prompt (`…332.1c9` for "Say hello", `…332.573` for "Say hello in one word."). It
/// is not part of the prompt, so a second `claude -p` with another prompt (another session,
/// so another agent) reads the first one's system prompt and tools from the cache.
#[tokio::test]
async fn claude_codes_billing_line_stays_out_of_the_prompt() {
    let fixture = claude_code_request();
    let mut first = fixture["body"].clone();
    first["max_tokens"] = json!(4);
    first["stream"] = json!(false);
    let billing = first["system"][0]["text"]
        .as_str()
        .expect("system[0].text")
        .to_string();
    assert!(
        billing.starts_with("x-anthropic-billing-header: cc_version="),
        "{billing}"
    );
    assert_eq!(first["messages"][0]["content"][1]["text"], "Say hello");
    let (app, _stack) = roomy_app();
    let count = |body: &Value| {
        let mut body = body.clone();
        let o = body.as_object_mut().expect("object");
        o.remove("max_tokens");
        o.remove("stream");
        post(&app, "/v1/messages/count_tokens", &[], body)
    };

    // The line adds nothing to the prompt.
    let mut without = first.clone();
    without["system"]
        .as_array_mut()
        .expect("system blocks")
        .remove(0);
    let with_line = count(&first).await.json()["input_tokens"].as_u64();
    let without_line = count(&without).await.json()["input_tokens"].as_u64();
    assert!(with_line > Some(2000), "{with_line:?}");
    assert_eq!(with_line, without_line);

    let r = post(&app, "/v1/messages?beta=true", &[], first.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());

    // The next run: another prompt, so another billing suffix, and another session.
    let mut second = first;
    second["system"][0]["text"] = json!(billing.replace(".1c9;", ".573;"));
    assert_ne!(second["system"][0]["text"], json!(billing));
    second["messages"][0]["content"][1]["text"] = json!("Say hello in one word.");
    second["metadata"]["user_id"] = json!(r#"{"device_id":"d","session_id":"another"}"#);
    let r = post(&app, "/v1/messages?beta=true", &[], second).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let u = &r.json()["usage"];
    let prompt = input_total(u);
    let read = u["cache_read_input_tokens"].as_u64().expect("read");
    // Everything before the user's words (system prompt, tools, the reminder) is read.
    assert!(read > prompt / 2, "{u}");
}

#[tokio::test]
async fn a_system_message_inside_messages_renders_where_it_stands() {
    let (app, _stack) = fake_app();
    let question = "Summarise the parser module and list its public functions, please.";
    let env = "Environment: linux, bash, the working directory is /repo, not a git repository.";
    let follow = "Now the lexer.";
    // OpenAI's mid-conversation system message is rendered in place; it fills the cache.
    let mut openai = chat(json!([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "system", "content": env},
        {"role": "user", "content": follow},
    ]));
    openai["max_tokens"] = json!(4);
    let first = post(&app, "/v1/chat/completions", &[], openai).await;
    assert_eq!(first.status, 200, "{}", first.text());
    // The same conversation in Anthropic's shape (system blocks with cache_control) renders
    // to the same tokens: everything but the trailing partial block is read from the cache.
    let body = json!({
        "model": "claude-x", "max_tokens": 4,
        "system": [{"type": "text", "text": SYSTEM}],
        "messages": [
            {"role": "user", "content": question},
            {"role": "system", "content": [{"type": "text", "text": env, "cache_control": {"type": "ephemeral"}}]},
            {"role": "user", "content": [{"type": "text", "text": follow}]},
        ],
    });
    let r = post(&app, "/v1/messages", &[], body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let u = &r.json()["usage"];
    let prompt = input_total(u);
    let read = u["cache_read_input_tokens"].as_u64().expect("read");
    assert_eq!(
        read,
        prompt - prompt % 64 - if prompt.is_multiple_of(64) { 64 } else { 0 },
        "{u}"
    );
    assert!(read > 0);

    // Moved anywhere else it would not be: the same text as a leading system message
    // shares only the blocks before the question.
    let moved = json!({
        "model": "claude-x", "max_tokens": 4,
        "system": [{"type": "text", "text": SYSTEM}, {"type": "text", "text": env}],
        "messages": [{"role": "user", "content": question}, {"role": "user", "content": follow}],
    });
    let m = post(&app, "/v1/messages", &[], moved).await.json();
    assert!(m["usage"]["cache_read_input_tokens"].as_u64() < Some(read));

    // A role that is none of the three is still a 400 naming the field.
    let mut bad = body;
    bad["messages"][1]["role"] = json!("developer");
    let r = post(&app, "/v1/messages", &[], bad).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("messages[1].role"), "{}", r.text());
}

#[tokio::test]
async fn the_fields_claude_code_adds_are_accepted() {
    let (app, _stack) = fake_app();
    let mut body = messages_body("Hello", 8);
    body["thinking"] = json!({"type": "adaptive", "display": "omitted"});
    body["context_management"] =
        json!({"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]});
    body["output_config"] = json!({"effort": "medium"});
    body["metadata"] = json!({"user_id": "{\"device_id\":\"abc\",\"session_id\":\"s-1\"}"});
    body["tools"] = json!([
        {"name": "Read", "description": "Read a file", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral"}},
        {"name": "Later", "description": "Deferred", "input_schema": {"type": "object", "properties": {}}, "defer_loading": true}
    ]);
    body["messages"] = json!([
        {"role": "user", "content": [{"type": "text", "text": "Find it", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "tool_reference", "tool_name": "Later"}]}]}
    ]);
    let beta = [(
        "anthropic-beta",
        "claude-code-20250219,context-management-2025-06-27,effort-2025-11-24",
    )];
    let r = post(&app, "/v1/messages?beta=true", &beta, body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("x-semantic-agent")
        .is_some_and(|a| a.starts_with("h-")));
}

#[tokio::test]
async fn message_delta_usage_repeats_the_input_counts() {
    let (app, _stack) = fake_app();
    let mut body = messages_body("Stream with usage", 20);
    body["metadata"] = json!({"user_id": "streamer"});
    body["stream"] = json!(true);
    for turn in 0..2 {
        let events = post(&app, "/v1/messages", &[], body.clone()).await.events();
        let start = events
            .iter()
            .find(|e| e.event.as_deref() == Some("message_start"))
            .expect("message_start")
            .json();
        let delta = events
            .iter()
            .find(|e| e.event.as_deref() == Some("message_delta"))
            .expect("message_delta")
            .json();
        let (s, d) = (&start["message"]["usage"], &delta["usage"]);
        for k in [
            "input_tokens",
            "cache_creation_input_tokens",
            "cache_read_input_tokens",
        ] {
            assert!(d[k].is_u64(), "turn {turn}: {k} in message_delta: {d}");
            assert_eq!(d[k], s[k], "turn {turn}: {k}");
        }
        assert!(d["output_tokens"].as_u64() > Some(0));
        if turn == 1 {
            assert!(d["cache_read_input_tokens"].as_u64() > Some(0), "{d}");
        }
    }
}

#[tokio::test]
async fn head_and_get_of_the_root_name_the_server() {
    let (app, _stack) = fake_app();
    let r = get(&app, "/", &[]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["name"], "semantic");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let head = send(&app, request(Method::HEAD, "/", &[], None)).await;
    assert_eq!(head.status, 200);
    assert!(head
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/json")));
    assert!(head.body.is_empty());
    // Other methods on / are still refused.
    let post_root = post(&app, "/", &[], json!({})).await;
    assert_eq!(post_root.status, 405);
}

#[tokio::test]
async fn max_tokens_far_above_the_cap_ends_at_the_cap() {
    let engine = Arc::new(ScriptedEngine::new("word ").endless());
    let config = ServiceConfig {
        max_tokens_cap: 12,
        default_max_tokens: 8,
        ..ServiceConfig::for_block_tokens(FakeEngine::DEFAULT_BLOCK_TOKENS as usize)
    };
    let service = scripted_service(engine, Some(config));
    let app = http_api::router(http_api::AppState::new(service));

    let a = post(
        &app,
        "/v1/messages",
        &[],
        messages_body("Write forever", 64_000),
    )
    .await
    .json();
    assert_eq!(a["stop_reason"], "max_tokens");
    assert_eq!(a["usage"]["output_tokens"], 12);

    let mut sbody = messages_body("Write forever", 128_000);
    sbody["stream"] = json!(true);
    let events = post(&app, "/v1/messages", &[], sbody).await.events();
    let delta = events
        .iter()
        .find(|e| e.event.as_deref() == Some("message_delta"))
        .expect("message_delta")
        .json();
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 12);

    let mut o = chat(chat_messages("Write forever"));
    o["max_tokens"] = json!(100_000);
    let v = post(&app, "/v1/chat/completions", &[], o).await.json();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
}
