//! `POST /v1/chat/completions`.

use crate::common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn non_streaming_shape_and_usage() {
    let (app, _stack) = fake_app();
    let r = post(
        &app,
        "/v1/chat/completions",
        &[],
        chat(chat_messages("Hello there")),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["id"].as_str().is_some_and(|s| s.starts_with("chatcmpl-")));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_u64().is_some_and(|c| c > 1_600_000_000));
    assert_eq!(v["model"], "fake-model");
    assert!(v["system_fingerprint"].is_string());
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].is_string());
    assert!(choice["message"].get("tool_calls").is_none());
    assert!(["stop", "length"].contains(&choice["finish_reason"].as_str().unwrap_or("")));
    let u = &v["usage"];
    let prompt = u["prompt_tokens"].as_u64().expect("prompt_tokens");
    let completion = u["completion_tokens"].as_u64().expect("completion_tokens");
    assert_eq!(u["total_tokens"].as_u64(), Some(prompt + completion));
    assert!(
        prompt > 128,
        "the system prompt spans several blocks: {prompt}"
    );
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    let (tier, nums) = cache_header(&r);
    assert_eq!(tier, "miss");
    assert_eq!(nums["prompt"] as u64, prompt);
    assert_eq!(nums["reused"], 0);
    assert_eq!(nums["prefilled"] as u64, prompt);
    assert!(r.header("x-semantic-agent").is_none(), "anonymous");
    assert!(r.header("x-request-id").is_some());
}

#[tokio::test]
async fn second_turn_of_an_agent_reads_the_cache() {
    let (app, _stack) = fake_app();
    let body = chat(chat_messages("Refactor the parser."));
    let h = [("x-agent-id", "coder")];
    let first = post(&app, "/v1/chat/completions", &h, body.clone()).await;
    assert_eq!(first.status, 200);
    let second = post(&app, "/v1/chat/completions", &h, body).await;
    assert_eq!(second.status, 200);
    let (p1, p2) = (
        first.json()["usage"].clone(),
        second.json()["usage"].clone(),
    );
    let prompt = p2["prompt_tokens"].as_u64().expect("prompt");
    let cached = p2["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached");
    assert_eq!(p1["prompt_tokens"], p2["prompt_tokens"]);
    assert!(cached <= prompt);
    // Reuse is in whole 64-token chunks and leaves at least one token to prefill.
    assert!(cached + 64 >= prompt, "cached {cached} of {prompt}");
    assert!(cached > 0);
    let (tier, nums) = cache_header(&second);
    assert_eq!(tier, "hot");
    assert_eq!(nums["reused"] as u64, cached);
    assert_eq!(nums["reused"] + nums["prefilled"], nums["prompt"]);
    assert_eq!(second.header("x-semantic-agent").as_deref(), Some("coder"));
    // Same answer warm as cold (greedy).
    assert_eq!(
        first.json()["choices"][0]["message"]["content"],
        second.json()["choices"][0]["message"]["content"]
    );
}

#[tokio::test]
async fn identity_from_prompt_cache_key_and_user() {
    let (app, stack) = fake_app();
    let mut body = chat(chat_messages("hi"));
    body["prompt_cache_key"] = json!("pck-1");
    body["user"] = json!("ignored-when-key-given");
    let r = post(&app, "/v1/chat/completions", &[], body).await;
    assert_eq!(r.header("x-semantic-agent").as_deref(), Some("pck-1"));

    let mut body = chat(chat_messages("hi"));
    body["user"] = json!("alice@example.com");
    let r = post(&app, "/v1/chat/completions", &[], body.clone()).await;
    let agent = r.header("x-semantic-agent").expect("agent");
    assert!(agent.starts_with("h-"), "{agent}");
    let again = post(&app, "/v1/chat/completions", &[], body).await;
    assert_eq!(again.header("x-semantic-agent"), Some(agent));

    // X-Session-ID beats the body.
    let mut body = chat(chat_messages("hi"));
    body["user"] = json!("u");
    let r = post(
        &app,
        "/v1/chat/completions",
        &[("x-session-id", "sess-9")],
        body,
    )
    .await;
    assert_eq!(r.header("x-semantic-agent").as_deref(), Some("sess-9"));

    let agents = stack.service.list_agents(None).await.expect("list");
    let ids: Vec<String> = agents.iter().map(|a| a.agent.to_string()).collect();
    assert!(
        ids.contains(&"pck-1".to_string()) && ids.contains(&"sess-9".to_string()),
        "{ids:?}"
    );
}

#[tokio::test]
async fn streaming_event_by_event() {
    let (app, _stack) = fake_app();
    let question = chat_messages("Stream this please");
    let plain = post(&app, "/v1/chat/completions", &[], chat(question.clone())).await;
    let expected = plain.json()["choices"][0]["message"]["content"].clone();

    let mut body = chat(question);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post(&app, "/v1/chat/completions", &[], body).await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    assert!(r.header("x-semantic-cache").is_some());
    let events = r.events();
    assert!(events.iter().all(|e| e.event.is_none()), "data-only events");
    let n = events.len();
    assert_eq!(events[n - 1].data, "[DONE]");
    let chunks: Vec<Value> = events[..n - 1].iter().map(SseEvent::json).collect();
    let id = chunks[0]["id"].clone();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], id);
        assert_eq!(c["model"], "fake-model");
        assert!(
            c.get("usage").is_some(),
            "usage key present (null) with include_usage"
        );
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    let usage_chunk = &chunks[chunks.len() - 1];
    assert_eq!(usage_chunk["choices"], json!([]));
    let finish = &chunks[chunks.len() - 2];
    assert!(
        ["stop", "length"].contains(&finish["choices"][0]["finish_reason"].as_str().unwrap_or(""))
    );
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    let mut text = String::new();
    for c in &chunks[1..chunks.len() - 2] {
        assert!(c["choices"][0]["finish_reason"].is_null());
        text.push_str(
            c["choices"][0]["delta"]["content"]
                .as_str()
                .expect("content delta"),
        );
    }
    assert_eq!(Value::String(text.clone()), expected);
    let u = &usage_chunk["usage"];
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(
            u["prompt_tokens"].as_u64().unwrap_or(0) + u["completion_tokens"].as_u64().unwrap_or(0)
        )
    );
    assert!(u["prompt_tokens_details"]["cached_tokens"].as_u64() <= u["prompt_tokens"].as_u64());
}

#[tokio::test]
async fn streaming_without_usage_has_no_usage_chunk() {
    let (app, _stack) = fake_app();
    let mut body = chat(chat_messages("x"));
    body["stream"] = json!(true);
    let events = post(&app, "/v1/chat/completions", &[], body).await.events();
    let n = events.len();
    assert_eq!(events[n - 1].data, "[DONE]");
    for e in &events[..n - 1] {
        let v = e.json();
        assert!(v.get("usage").is_none());
        assert_eq!(v["choices"].as_array().map(Vec::len), Some(1));
    }
}

#[tokio::test]
async fn max_tokens_and_max_completion_tokens() {
    let (app, _svc) = scripted_app(&"abc ".repeat(50));
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut body = chat(chat_messages("go"));
        body[field] = json!(7);
        let v = post(&app, "/v1/chat/completions", &[], body).await.json();
        assert_eq!(v["usage"]["completion_tokens"], 7, "{field}");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["choices"][0]["message"]["content"], "abc abc");
    }
    // max_completion_tokens wins over max_tokens.
    let mut body = chat(chat_messages("go"));
    body["max_tokens"] = json!(3);
    body["max_completion_tokens"] = json!(5);
    let v = post(&app, "/v1/chat/completions", &[], body).await.json();
    assert_eq!(v["usage"]["completion_tokens"], 5);
}

#[tokio::test]
async fn stop_strings_string_or_list() {
    let (app, _svc) = scripted_app("hello world END more text");
    for stop in [json!("END"), json!(["nothing", "END"])] {
        let mut body = chat(chat_messages("go"));
        body["stop"] = stop;
        let v = post(&app, "/v1/chat/completions", &[], body).await.json();
        assert_eq!(v["choices"][0]["message"]["content"], "hello world ");
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}

#[tokio::test]
async fn every_listed_field_is_accepted() {
    let (app, _stack) = fake_app();
    let body = json!({
        "model": "gpt-4o",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
            {"role": "user", "content": [{"type": "text", "text": "What is the weather?"}, {"type": "text", "text": "In Paris."}], "name": "bob"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "Thanks"}
        ],
        "stream": false,
        "stream_options": null,
        "max_tokens": 20,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 42,
        "stop": ["\n\n"],
        "presence_penalty": 0.5,
        "frequency_penalty": 0.1,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "user": "u-1",
        "prompt_cache_key": "k-1",
        "n": 1,
        "logprobs": false,
        "response_format": {"type": "text"},
        "parallel_tool_calls": true,
        "store": false,
        "metadata": {"a": "b"},
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "unknown_future_field": {"x": 1}
    });
    let r = post(&app, "/v1/chat/completions", &[], body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    for choice in ["none", "auto", "required"] {
        let mut body = chat(chat_messages("x"));
        body["tools"] = json!([{"type": "function", "function": {"name": "f"}}]);
        body["tool_choice"] = json!(choice);
        let r = post(&app, "/v1/chat/completions", &[], body).await;
        assert_eq!(r.status, 200, "{choice}: {}", r.text());
    }
}

#[tokio::test]
async fn tool_choice_none_keeps_tools_out_of_the_prompt() {
    let call = r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#;
    let (app, _svc) = scripted_app(call);
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {}}}]);
    let plain = post(&app, "/v1/chat/completions", &[], chat(chat_messages("w?")))
        .await
        .json();
    let mut body = chat(chat_messages("w?"));
    body["tools"] = tools.clone();
    body["tool_choice"] = json!("none");
    let none = post(&app, "/v1/chat/completions", &[], body).await.json();
    assert_eq!(
        none["usage"]["prompt_tokens"],
        plain["usage"]["prompt_tokens"]
    );
    // No tools offered: the JSON stays text.
    assert_eq!(none["choices"][0]["message"]["content"], call);
    assert_eq!(none["choices"][0]["finish_reason"], "stop");
    let mut body = chat(chat_messages("w?"));
    body["tools"] = tools;
    let auto = post(&app, "/v1/chat/completions", &[], body).await.json();
    assert!(auto["usage"]["prompt_tokens"].as_u64() > plain["usage"]["prompt_tokens"].as_u64());
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "search", "description": "Search", "parameters": {"type": "object"}}}
    ])
}

#[tokio::test]
async fn tool_call_non_streaming() {
    let (app, _svc) = scripted_app(r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#);
    let mut body = chat(chat_messages("Weather in Paris?"));
    body["tools"] = weather_tools();
    let v = post(&app, "/v1/chat/completions", &[], body).await.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().is_some_and(|s| s.starts_with("call_")));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("string"))
        .expect("json");
    assert_eq!(args, json!({"city": "Paris"}));
}

#[tokio::test]
async fn tool_calls_streaming_with_text_and_two_calls() {
    let text = "Let me check. <tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>\n<tool_call>{\"name\": \"search\", \"arguments\": {\"q\": \"oslo\"}}</tool_call>";
    let (app, _svc) = scripted_app(text);
    let mut body = chat(chat_messages("Weather?"));
    body["tools"] = weather_tools();
    body["stream"] = json!(true);
    let events = post(&app, "/v1/chat/completions", &[], body).await.events();
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(SseEvent::json)
        .collect();
    let mut content = String::new();
    let mut calls: Vec<(String, String, String)> = Vec::new(); // id, name, args by index
    let mut finish = None;
    for c in &chunks {
        let d = &c["choices"][0]["delta"];
        if let Some(t) = d["content"].as_str() {
            content.push_str(t);
        }
        if let Some(tcs) = d["tool_calls"].as_array() {
            for tc in tcs {
                let i = tc["index"].as_u64().expect("index") as usize;
                if calls.len() <= i {
                    assert_eq!(calls.len(), i, "indexes are consecutive");
                    assert_eq!(tc["type"], "function");
                    calls.push((
                        tc["id"].as_str().expect("id").to_string(),
                        tc["function"]["name"].as_str().expect("name").to_string(),
                        String::new(),
                    ));
                }
                if let Some(a) = tc["function"]["arguments"].as_str() {
                    calls[i].2.push_str(a);
                }
            }
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    // The space before the calls is held back and dropped, as in the non-streamed content.
    assert_eq!(content, "Let me check.");
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].1, "get_weather");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].2).expect("args"),
        json!({"city": "Oslo"})
    );
    assert_eq!(calls[1].1, "search");
    assert_ne!(calls[0].0, calls[1].0);
}

#[tokio::test]
async fn malformed_tool_call_is_returned_as_text() {
    let text = r#"{"name": "get_weather", "arguments": {"city": "Par"#;
    let (app, _svc) = scripted_app(text);
    let mut body = chat(chat_messages("Weather?"));
    body["tools"] = weather_tools();
    let v = post(&app, "/v1/chat/completions", &[], body.clone())
        .await
        .json();
    assert_eq!(v["choices"][0]["message"]["content"], text);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    body["stream"] = json!(true);
    let events = post(&app, "/v1/chat/completions", &[], body).await.events();
    let streamed: String = events[..events.len() - 1]
        .iter()
        .filter_map(|e| {
            e.json()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, text);
}

#[tokio::test]
async fn tool_round_trip_second_request() {
    let (app, _svc) = scripted_app("It is sunny in Paris.");
    let mut body = chat(json!([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "{\"temp\": 21}"}
    ]));
    body["tools"] = weather_tools();
    let v = post(&app, "/v1/chat/completions", &[], body).await.json();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "It is sunny in Paris."
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
}

async fn expect_400(body: Value, param: &str) {
    let (app, _stack) = fake_app();
    let r = post(&app, "/v1/chat/completions", &[], body).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let e = r.json();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["param"], param, "{e}");
    assert!(e["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains(param)));
}

#[tokio::test]
async fn unsupported_values_are_400_naming_the_field() {
    let with = |k: &str, v: Value| {
        let mut b = chat(chat_messages("x"));
        b[k] = v;
        b
    };
    expect_400(with("n", json!(2)), "n").await;
    expect_400(with("logprobs", json!(true)), "logprobs").await;
    expect_400(with("top_logprobs", json!(3)), "top_logprobs").await;
    expect_400(
        with("response_format", json!({"type": "json_object"})),
        "response_format",
    )
    .await;
    expect_400(with("logit_bias", json!({"50256": -100})), "logit_bias").await;
    expect_400(with("functions", json!([{"name": "f"}])), "functions").await;
    expect_400(with("temperature", json!(2.5)), "temperature").await;
    expect_400(with("top_p", json!(1.5)), "top_p").await;
    expect_400(with("presence_penalty", json!(-3)), "presence_penalty").await;
    expect_400(with("max_tokens", json!(0)), "max_tokens").await;
    expect_400(with("modalities", json!(["text", "audio"])), "modalities").await;
    expect_400(
        with("tools", json!([{"type": "custom", "custom": {}}])),
        "tools[0].type",
    )
    .await;
    expect_400(
        with(
            "tool_choice",
            json!({"type": "function", "function": {"name": "nope"}}),
        ),
        "tool_choice",
    )
    .await;
    expect_400(with("tool_choice", json!("sometimes")), "tool_choice").await;
    expect_400(chat(json!([])), "messages").await;
    expect_400(
        chat(json!([{"role": "wizard", "content": "x"}])),
        "messages[0].role",
    )
    .await;
    expect_400(
        chat(json!([{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        ]}])),
        "messages[0].content[1].type",
    )
    .await;
}

#[tokio::test]
async fn bad_agent_id_header_is_400() {
    let (app, _stack) = fake_app();
    for bad in ["../etc", "a b", ".."] {
        let r = post(
            &app,
            "/v1/chat/completions",
            &[("x-agent-id", bad)],
            chat(chat_messages("x")),
        )
        .await;
        assert_eq!(r.status, 400, "{bad}");
        assert_eq!(r.json()["error"]["param"], "x-agent-id");
    }
    let r = post(
        &app,
        "/v1/chat/completions",
        &[("x-session-id", "bad/id")],
        chat(chat_messages("x")),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["param"], "x-session-id");
}

#[tokio::test]
async fn malformed_json_is_400_and_schema_errors_422() {
    let (app, _stack) = fake_app();
    let r = send(
        &app,
        axum::http::Request::post("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(axum::body::Body::from("{\"messages\": [}"))
            .expect("request"),
    )
    .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(r.json()["error"]["code"], "invalid_json");

    let r = post(
        &app,
        "/v1/chat/completions",
        &[],
        json!({"messages": "hello"}),
    )
    .await;
    assert_eq!(r.status, 422);
    let e = r.json();
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert_eq!(e["error"]["param"], "messages");

    let r = post(&app, "/v1/chat/completions", &[], json!({"model": "x"})).await;
    assert_eq!(r.status, 422, "missing messages");
    let r = post(
        &app,
        "/v1/chat/completions",
        &[],
        json!({"messages": [{"role": "user", "content": 5}]}),
    )
    .await;
    assert_eq!(r.status, 422);
    assert_eq!(r.json()["error"]["param"], "messages[0].content");
}

#[tokio::test]
async fn context_too_long_is_400_with_both_numbers() {
    let engine = std::sync::Arc::new(testkit::FakeEngine::new(64).with_context_length(200));
    let stack = testkit::FakeStack::build(
        engine,
        std::sync::Arc::new(testkit::MemoryStore::new()),
        agent_session::ServiceConfig::for_block_tokens(64),
    );
    let app = http_api::router(http_api::AppState::new(stack.service.clone()));
    let long = "word ".repeat(100);
    for stream in [false, true] {
        let mut body = chat(chat_messages(&long));
        body["stream"] = json!(stream);
        let r = post(&app, "/v1/chat/completions", &[], body).await;
        assert_eq!(
            r.status, 400,
            "stream={stream}: errors before the first token are HTTP errors"
        );
        let e = r.json();
        assert_eq!(e["error"]["code"], "context_length_exceeded");
        let m = e["error"]["message"].as_str().expect("message");
        let prompt = stack.service.tokenize(&agent_session::Conversation {
            messages: vec![
                agent_session::Message::text(agent_session::Role::System, SYSTEM),
                agent_session::Message::text(agent_session::Role::User, long.clone()),
            ],
            tools: vec![],
        });
        let n = prompt.expect("tokenize").len();
        assert!(m.contains(&n.to_string()) && m.contains("200"), "{m}");
    }
}

/// Merges streamed deltas into one message the way the official SDKs' stream helpers do
/// (a key's first value stays unless later string values extend it).
fn accumulate(chunks: &[Value]) -> Value {
    let mut message = serde_json::Map::new();
    for c in chunks {
        let Some(delta) = c["choices"][0]["delta"].as_object() else {
            continue;
        };
        for (k, v) in delta {
            if k == "tool_calls" {
                continue;
            }
            match (message.get_mut(k), v) {
                (Some(Value::String(acc)), Value::String(s)) => acc.push_str(s),
                (Some(Value::Null), Value::String(s)) => {
                    message.insert(k.clone(), Value::String(s.clone()));
                }
                (Some(_), _) => {}
                (None, v) => {
                    message.insert(k.clone(), v.clone());
                }
            }
        }
    }
    Value::Object(message)
}

async fn streamed_chunks(app: &axum::Router, mut body: Value) -> Vec<Value> {
    body["stream"] = json!(true);
    let events = post(app, "/v1/chat/completions", &[], body).await.events();
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    events[..events.len() - 1]
        .iter()
        .map(SseEvent::json)
        .collect()
}

#[tokio::test]
async fn a_streamed_tool_call_answer_ends_with_the_non_streamed_content() {
    // Only a tool call: content is null both ways, and the first chunk carries the role,
    // `content: null` and the call's head, as the real API sends it.
    let (app, _svc) = scripted_app(r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#);
    let mut body = chat(chat_messages("Weather?"));
    body["tools"] = weather_tools();
    let plain = post(&app, "/v1/chat/completions", &[], body.clone())
        .await
        .json();
    assert_eq!(plain["choices"][0]["message"]["content"], Value::Null);
    let chunks = streamed_chunks(&app, body.clone()).await;
    let first = &chunks[0]["choices"][0]["delta"];
    assert_eq!(first["role"], "assistant");
    assert_eq!(first.get("content"), Some(&Value::Null), "{first}");
    assert_eq!(first["refusal"], Value::Null);
    assert_eq!(first["tool_calls"][0]["index"], 0);
    assert_eq!(first["tool_calls"][0]["type"], "function");
    assert_eq!(first["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(first["tool_calls"][0]["function"]["arguments"], "");
    assert!(first["tool_calls"][0]["id"]
        .as_str()
        .is_some_and(|id| id.starts_with("call_")));
    let merged = accumulate(&chunks);
    assert_eq!(merged["content"], plain["choices"][0]["message"]["content"]);
    assert_eq!(merged["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["choices"][0]["delta"]["content"] != ""),
        "no empty-string content anywhere: {chunks:?}"
    );

    // Text before the call: the text both ways, after a role chunk with content "".
    let (app, _svc) =
        scripted_app(r#"Checking. {"name": "get_weather", "arguments": {"city": "Oslo"}}"#);
    let plain = post(&app, "/v1/chat/completions", &[], body.clone())
        .await
        .json();
    let chunks = streamed_chunks(&app, body.clone()).await;
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    assert_eq!(
        accumulate(&chunks)["content"],
        plain["choices"][0]["message"]["content"]
    );
    assert_eq!(plain["choices"][0]["message"]["content"], "Checking.");

    // Tools offered, plain text answer: the usual shape.
    let (app, _svc) = scripted_app("No tool needed.");
    let chunks = streamed_chunks(&app, body).await;
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    assert_eq!(accumulate(&chunks)["content"], "No tool needed.");
}
