//! `POST /v1/messages` and `POST /v1/messages/count_tokens`.

use crate::common::*;
use serde_json::{json, Value};

fn usage_sum(u: &Value) -> u64 {
    u["input_tokens"].as_u64().expect("input")
        + u["cache_creation_input_tokens"].as_u64().expect("creation")
        + u["cache_read_input_tokens"].as_u64().expect("read")
}

async fn count(app: &axum::Router, body: &Value) -> u64 {
    let r = post(app, "/v1/messages/count_tokens", &[], body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["input_tokens"].as_u64().expect("input_tokens")
}

#[tokio::test]
async fn non_streaming_shape_and_disjoint_usage() {
    let (app, _stack) = fake_app();
    let body = messages_body("Hello there", 40);
    let r = post(&app, "/v1/messages", &[], body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["id"].as_str().is_some_and(|s| s.starts_with("msg_")));
    assert_eq!(v["type"], "message");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["model"], "fake-model");
    assert_eq!(v["content"][0]["type"], "text");
    assert!(v["content"][0]["text"].is_string());
    assert!(["end_turn", "max_tokens"].contains(&v["stop_reason"].as_str().unwrap_or("")));
    assert!(v["stop_sequence"].is_null());
    let u = &v["usage"];
    assert!(u["output_tokens"].as_u64().is_some());
    let prompt = count(&app, &body).await;
    assert_eq!(
        usage_sum(u),
        prompt,
        "the three input counts add up to the prompt: {u}"
    );
    assert_eq!(u["cache_read_input_tokens"], 0);
    // First turn: the whole 64-token chunks are written to the cache, the tail is not.
    assert_eq!(
        u["cache_creation_input_tokens"].as_u64(),
        Some(prompt - prompt % 64)
    );
    assert_eq!(u["input_tokens"].as_u64(), Some(prompt % 64));
    let (tier, nums) = cache_header(&r);
    assert_eq!(tier, "miss");
    assert_eq!(nums["created"] as u64, prompt - prompt % 64);
}

#[tokio::test]
async fn second_turn_reads_the_first_turns_prompt() {
    let (app, _stack) = fake_app();
    let mut body = messages_body("Refactor the parser.", 30);
    body["metadata"] = json!({"user_id": "planner"});
    let first = post(&app, "/v1/messages", &[], body.clone()).await.json();
    let second_reply = post(&app, "/v1/messages", &[], body.clone()).await;
    assert_eq!(
        second_reply.header("x-semantic-agent").as_deref(),
        Some("planner")
    );
    let second = second_reply.json();
    let prompt = count(&app, &body).await;
    for v in [&first, &second] {
        assert_eq!(usage_sum(&v["usage"]), prompt);
    }
    let read = second["usage"]["cache_read_input_tokens"]
        .as_u64()
        .expect("read");
    assert!(read > 0 && read + 64 >= prompt, "read {read} of {prompt}");
    assert_eq!(first["content"], second["content"], "warm equals cold");

    // A longer conversation of the same agent reuses the earlier prefix.
    let answer = first["content"][0]["text"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let mut next = body.clone();
    next["messages"] = json!([
        {"role": "user", "content": "Refactor the parser."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Now add tests."}
    ]);
    let third = post(&app, "/v1/messages", &[], next.clone()).await.json();
    let p3 = count(&app, &next).await;
    assert_eq!(usage_sum(&third["usage"]), p3);
    assert!(third["usage"]["cache_read_input_tokens"].as_u64() >= Some(128));
}

#[tokio::test]
async fn session_header_names_the_agent() {
    let (app, _stack) = fake_app();
    let mut body = messages_body("x", 5);
    body["metadata"] = json!({"user_id": "from-body"});
    let r = post(
        &app,
        "/v1/messages",
        &[("x-session-id", "from-header")],
        body,
    )
    .await;
    assert_eq!(r.header("x-semantic-agent").as_deref(), Some("from-header"));
}

#[tokio::test]
async fn streaming_event_sequence() {
    let (app, _stack) = fake_app();
    let body = messages_body("Stream please", 60);
    let plain = post(&app, "/v1/messages", &[], body.clone()).await.json();
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let r = post(&app, "/v1/messages", &[], sbody).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let events = r.events();
    for e in &events {
        let v = e.json();
        assert_eq!(
            Some(v["type"].as_str().unwrap_or("")),
            e.event.as_deref(),
            "event name = data.type"
        );
    }
    let names: Vec<&str> = events
        .iter()
        .map(|e| e.event.as_deref().unwrap_or(""))
        .collect();
    assert_eq!(names[0], "message_start");
    assert_eq!(names[1], "ping");
    assert_eq!(names[2], "content_block_start");
    assert_eq!(names[names.len() - 1], "message_stop");
    assert_eq!(names[names.len() - 2], "message_delta");
    assert_eq!(names[names.len() - 3], "content_block_stop");
    assert!(names[3..names.len() - 3]
        .iter()
        .all(|n| *n == "content_block_delta"));

    let start = events[0].json();
    let m = &start["message"];
    assert!(m["id"].as_str().is_some_and(|s| s.starts_with("msg_")));
    assert_eq!(m["content"], json!([]));
    assert!(m["stop_reason"].is_null());
    let prompt = count(&app, &body).await;
    assert_eq!(usage_sum(&m["usage"]), prompt);
    let block = events[2].json();
    assert_eq!(block["index"], 0);
    assert_eq!(block["content_block"], json!({"type": "text", "text": ""}));
    let mut text = String::new();
    for e in &events[3..events.len() - 3] {
        let d = e.json();
        assert_eq!(d["index"], 0);
        assert_eq!(d["delta"]["type"], "text_delta");
        text.push_str(d["delta"]["text"].as_str().expect("text"));
    }
    assert_eq!(Value::String(text), plain["content"][0]["text"]);
    let delta = events[events.len() - 2].json();
    assert_eq!(delta["delta"]["stop_reason"], plain["stop_reason"]);
    assert!(delta["delta"]["stop_sequence"].is_null());
    assert_eq!(
        delta["usage"]["output_tokens"],
        plain["usage"]["output_tokens"]
    );
}

#[tokio::test]
async fn stop_sequences_are_honoured() {
    let (app, _svc) = scripted_app("alpha beta STOP gamma");
    let mut body = messages_body("go", 50);
    body["stop_sequences"] = json!(["STOP"]);
    let v = post(&app, "/v1/messages", &[], body.clone()).await.json();
    assert_eq!(v["content"][0]["text"], "alpha beta ");
    assert_eq!(v["stop_reason"], "stop_sequence");
    assert_eq!(v["stop_sequence"], "STOP");
    body["stream"] = json!(true);
    let events = post(&app, "/v1/messages", &[], body).await.events();
    let delta = events
        .iter()
        .find(|e| e.event.as_deref() == Some("message_delta"))
        .expect("delta")
        .json();
    assert_eq!(delta["delta"]["stop_reason"], "stop_sequence");
    assert_eq!(delta["delta"]["stop_sequence"], "STOP");
}

#[tokio::test]
async fn max_tokens_stop_reason() {
    let (app, _svc) = scripted_app(&"word ".repeat(40));
    let v = post(&app, "/v1/messages", &[], messages_body("go", 4))
        .await
        .json();
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 4);
    assert_eq!(v["content"][0]["text"], "word");
}

fn tools() -> Value {
    json!([
        {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}, "cache_control": {"type": "ephemeral"}},
        {"type": "custom", "name": "search", "input_schema": {"type": "object"}}
    ])
}

#[tokio::test]
async fn tool_use_non_streaming() {
    let (app, _svc) = scripted_app(
        r#"I'll look it up. {"tool_use": {"name": "get_weather", "input": {"city": "Paris"}}}"#,
    );
    let mut body = messages_body("Weather in Paris?", 100);
    body["tools"] = tools();
    let v = post(&app, "/v1/messages", &[], body).await.json();
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(
        v["content"][0],
        json!({"type": "text", "text": "I'll look it up."})
    );
    let t = &v["content"][1];
    assert_eq!(t["type"], "tool_use");
    assert!(t["id"].as_str().is_some_and(|s| s.starts_with("toolu_")));
    assert_eq!(t["name"], "get_weather");
    assert_eq!(t["input"], json!({"city": "Paris"}));
}

#[tokio::test]
async fn tool_use_streaming_with_input_json_delta() {
    let (app, _svc) = scripted_app(
        "Checking. <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}</tool_call>",
    );
    let mut body = messages_body("Weather in Rome?", 100);
    body["tools"] = tools();
    body["stream"] = json!(true);
    let events = post(&app, "/v1/messages", &[], body).await.events();
    let mut names: Vec<&str> = events
        .iter()
        .map(|e| e.event.as_deref().unwrap_or(""))
        .collect();
    // The text arrives in several deltas; collapse them to check the order.
    let text: String = events[3..]
        .iter()
        .take_while(|e| e.event.as_deref() == Some("content_block_delta"))
        .map(|e| e.json()["delta"]["text"].as_str().unwrap_or("").to_string())
        .collect();
    // The space before the call is held back and dropped, as the non-streamed text is trimmed.
    assert_eq!(text, "Checking.");
    names.dedup();
    let events: Vec<SseEvent> = events
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            !(*i > 3
                && e.event.as_deref() == Some("content_block_delta")
                && events[i - 1].event == e.event)
        })
        .map(|(_, e)| e.clone())
        .collect();
    assert_eq!(
        names,
        [
            "message_start",
            "ping",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    assert_eq!(events[3].json()["delta"]["type"], "text_delta");
    let start = events[5].json();
    assert_eq!(start["index"], 1);
    assert_eq!(start["content_block"]["type"], "tool_use");
    assert_eq!(start["content_block"]["name"], "get_weather");
    assert_eq!(start["content_block"]["input"], json!({}));
    let delta = events[6].json();
    assert_eq!(delta["index"], 1);
    assert_eq!(delta["delta"]["type"], "input_json_delta");
    let input: Value =
        serde_json::from_str(delta["delta"]["partial_json"].as_str().expect("json")).expect("json");
    assert_eq!(input, json!({"city": "Rome"}));
    assert_eq!(events[7].json()["index"], 1);
    assert_eq!(events[8].json()["delta"]["stop_reason"], "tool_use");
}

#[tokio::test]
async fn tool_only_stream_starts_at_index_zero() {
    let (app, _svc) = scripted_app(r#"{"name": "search", "arguments": {"q": "x"}}"#);
    let mut body = messages_body("find x", 100);
    body["tools"] = tools();
    body["tool_choice"] = json!({"type": "any"});
    body["stream"] = json!(true);
    let events = post(&app, "/v1/messages", &[], body).await.events();
    let start = events
        .iter()
        .find(|e| e.event.as_deref() == Some("content_block_start"))
        .expect("start")
        .json();
    assert_eq!(start["index"], 0);
    assert_eq!(start["content_block"]["type"], "tool_use");
}

#[tokio::test]
async fn tool_result_round_trip_and_cache_control() {
    let (app, _svc) = scripted_app("It is 21 degrees.");
    let body = json!({
        "model": "claude-x",
        "max_tokens": 50,
        "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        "tools": tools(),
        "tool_choice": {"type": "auto"},
        "metadata": {"user_id": "user_abc_account_1_session_2"},
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 20,
        "thinking": {"type": "disabled"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "call the tool", "signature": "x"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "21C"}]},
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "oops", "is_error": true},
                {"type": "text", "text": "And tomorrow?"}
            ]}
        ]
    });
    let r = post(&app, "/v1/messages", &[], body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["content"][0]["text"], "It is 21 degrees.");
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(usage_sum(&v["usage"]), count(&app, &body).await);
}

#[tokio::test]
async fn count_tokens_matches_generation() {
    let (app, _stack) = fake_app();
    let body = messages_body("count me", 10);
    let n = count(&app, &body).await;
    let v = post(&app, "/v1/messages", &[], body.clone()).await.json();
    assert_eq!(usage_sum(&v["usage"]), n);
    let mut with_tools = body.clone();
    with_tools["tools"] = tools();
    assert!(count(&app, &with_tools).await > n);
    with_tools["tool_choice"] = json!({"type": "none"});
    assert_eq!(count(&app, &with_tools).await, n);
    // count_tokens does not need max_tokens.
    let mut no_max = body;
    no_max.as_object_mut().map(|o| o.remove("max_tokens"));
    assert_eq!(count(&app, &no_max).await, n);
}

async fn expect_400(body: Value, param: &str) {
    let (app, _stack) = fake_app();
    let r = post(&app, "/v1/messages", &[], body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.json();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(param)),
        "{e}"
    );
}

#[tokio::test]
async fn errors_are_in_anthropics_shape() {
    let mut b = messages_body("x", 10);
    b.as_object_mut().map(|o| o.remove("max_tokens"));
    expect_400(b, "max_tokens").await;
    expect_400(messages_body("x", 0), "max_tokens").await;
    let mut b = messages_body("x", 10);
    b["temperature"] = json!(1.5);
    expect_400(b, "temperature").await;
    let mut b = messages_body("x", 10);
    b["messages"] = json!([{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    ]}]);
    expect_400(b, "messages[0].content[0].type").await;
    let mut b = messages_body("x", 10);
    b["messages"] = json!([{"role": "developer", "content": "x"}]);
    expect_400(b, "messages[0].role").await;
    let mut b = messages_body("x", 10);
    b["messages"] = json!([{"role": "system", "content": [{"type": "image"}]}, {"role": "user", "content": "x"}]);
    expect_400(b, "messages[0].content[0].type").await;
    let mut b = messages_body("x", 10);
    b["messages"] = json!([]);
    expect_400(b, "messages").await;
    let mut b = messages_body("x", 10);
    b["tools"] = json!([{"type": "web_search_20250305", "name": "web_search"}]);
    expect_400(b, "tools[0].type").await;
    let mut b = messages_body("x", 10);
    b["tool_choice"] = json!({"type": "tool", "name": "missing"});
    b["tools"] = tools();
    expect_400(b, "tool_choice").await;
    let mut b = messages_body("x", 10);
    b["system"] = json!([{"type": "image"}]);
    expect_400(b, "system[0].type").await;

    let (app, _stack) = fake_app();
    let r = send(
        &app,
        axum::http::Request::post("/v1/messages")
            .body(axum::body::Body::from("not json"))
            .expect("request"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["type"], "error");
    let r = post(
        &app,
        "/v1/messages",
        &[],
        json!({"max_tokens": "ten", "messages": []}),
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("max_tokens")));
    let r = post(
        &app,
        "/v1/messages/count_tokens",
        &[],
        json!({"messages": 3}),
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["type"], "error");
    let r = post(
        &app,
        "/v1/messages",
        &[("x-agent-id", "no/slash")],
        messages_body("x", 5),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("x-agent-id")));
}

#[tokio::test]
async fn context_too_long_anthropic() {
    let engine = std::sync::Arc::new(testkit::FakeEngine::new(64).with_context_length(150));
    let stack = testkit::FakeStack::build(
        engine,
        std::sync::Arc::new(testkit::MemoryStore::new()),
        agent_session::ServiceConfig::for_block_tokens(64),
    );
    let app = http_api::router(http_api::AppState::new(stack.service.clone()));
    let body = messages_body(&"long ".repeat(60), 10);
    let n = count(&app, &body).await;
    let r = post(&app, "/v1/messages", &[], body).await;
    assert_eq!(r.status, 400);
    let m = r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(m.contains(&n.to_string()) && m.contains("150"), "{m}");
}
