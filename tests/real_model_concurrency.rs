//! Many agents at once on the real default model over real HTTP (issue #8): concurrent
//! greedy answers equal solo ones, a short request is served while a long cold prompt is
//! prefilled, overload is refused cleanly while the server stays healthy, and the request
//! time limit frees the slot. Every test asserts behaviour or order, never speed.
//!
//! Needs the default model (`cargo xtask setup`) and the `semantic` binary of this build.

use semantic_e2e::{metric_value, require_model, wait_until, Response, Server, Stream};
use serde_json::{json, Value};
use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// A user message of about `notes * 21` tokens: numbered notes, then a question. Each
/// `lead` makes a distinct text, so nothing is shared between prompts.
fn notes(lead: &str, notes: usize, question: &str) -> String {
    let words = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
    ];
    let mut s = String::new();
    for i in 0..notes {
        s.push_str(&format!(
            "{lead} {i}: the {} team moved crate number {} to shelf {}. ",
            words[i % 10],
            i * 7 % 1000,
            words[i * 3 % 10]
        ));
    }
    s.push_str(question);
    s
}

/// Which API a request goes through.
#[derive(Clone, Copy, Debug)]
enum Api {
    OpenAi,
    Anthropic,
}

fn body(content: &str, max_tokens: u32, stream: bool) -> Value {
    let mut b = json!({
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    });
    if stream {
        b["stream"] = json!(true);
    }
    b
}

fn path(api: Api) -> &'static str {
    match api {
        Api::OpenAi => "/v1/chat/completions",
        Api::Anthropic => "/v1/messages",
    }
}

/// A finished non-streaming answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    text: String,
    tokens: u64,
    finish: String,
}

fn answer(api: Api, r: &Response) -> Answer {
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    match api {
        Api::OpenAi => Answer {
            text: v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
            finish: v["choices"][0]["finish_reason"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        },
        Api::Anthropic => Answer {
            text: semantic_e2e::anthropic_text(&v),
            tokens: v["usage"]["output_tokens"].as_u64().unwrap_or(0),
            finish: v["stop_reason"].as_str().unwrap_or_default().to_string(),
        },
    }
}

/// The answer text carried by one SSE event, if any.
fn content_of(api: Api, event: &str, data: &str) -> Option<String> {
    let v: Value = serde_json::from_str(data).ok()?;
    let text = match api {
        Api::OpenAi => v["choices"][0]["delta"]["content"].as_str()?,
        Api::Anthropic if event == "content_block_delta" => v["delta"]["text"].as_str()?,
        Api::Anthropic => return None,
    };
    (!text.is_empty()).then(|| text.to_string())
}

/// What a stream delivered: when its first answer text arrived, the text, and how it ended.
#[derive(Debug)]
struct Streamed {
    first_content_at: Option<Instant>,
    text: String,
    finish: Option<String>,
    completed: bool,
    /// When the stream ended.
    ended_at: Option<Instant>,
}

/// Reads a stream to its end; `on_first` runs when the first answer text arrives.
fn read_stream(api: Api, mut s: Stream, mut on_first: impl FnMut()) -> Streamed {
    assert_eq!(s.status, 200, "{:?}", s.events.next());
    let mut out = Streamed {
        first_content_at: None,
        text: String::new(),
        finish: None,
        completed: false,
        ended_at: None,
    };
    for (event, data) in s.events.by_ref() {
        if let Some(t) = content_of(api, &event, &data) {
            if out.first_content_at.is_none() {
                out.first_content_at = Some(Instant::now());
                on_first();
            }
            out.text.push_str(&t);
        }
        match api {
            Api::OpenAi if data == "[DONE]" => out.completed = true,
            Api::OpenAi => {
                if let Some(f) = serde_json::from_str::<Value>(&data)
                    .ok()
                    .and_then(|v| v["choices"][0]["finish_reason"].as_str().map(String::from))
                {
                    out.finish = Some(f);
                }
            }
            Api::Anthropic if event == "message_delta" => {
                out.finish = serde_json::from_str::<Value>(&data)
                    .ok()
                    .and_then(|v| v["delta"]["stop_reason"].as_str().map(String::from));
            }
            Api::Anthropic if event == "message_stop" => out.completed = true,
            Api::Anthropic => {}
        }
    }
    out.ended_at = Some(Instant::now());
    out
}

/// The service's counters (`/v1/stats`).
fn stats(server: &Server, headers: &[(&str, &str)]) -> Value {
    let r = server.get_with("/v1/stats", headers);
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

/// The `x-semantic-cache` header's `key=value` field.
fn cache_field(header: &str, key: &str) -> Option<u64> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == key).then(|| v.parse().ok())?
    })
}

#[test]
fn four_concurrent_agents_get_exactly_their_solo_greedy_answers() {
    let model = require_model();
    let dir = tempfile::tempdir().expect("tempdir");
    // One namespace (API key) per agent and phase: the concurrent run reuses nothing from
    // the solo run, so both compute every token.
    let keys: Vec<String> = ["solo", "conc"]
        .iter()
        .flat_map(|phase| (0..4).map(move |i| format!("{phase}-{i}")))
        .collect();
    let server = Server::start(
        &model,
        &dir.path().join("cache"),
        &[
            ("SEMANTIC_API_KEYS", &keys.join(",")),
            ("SEMANTIC_ADMIN_KEY", "admin-key"),
            ("SEMANTIC_MLX_MAX_BATCH_SIZE", "4"),
            ("SEMANTIC_MLX_PREFILL_STEP_SIZE", "256"),
        ],
    );
    let auth = [("x-api-key", "solo-0")];
    // Prompts of about 40, 110, 200 and 320 tokens (the last is prefilled in two chunks),
    // answer limits of 24 to 32: the agents join and leave the decode batch at different
    // steps (an answer may also end earlier, at the model's own stop).
    let agents: Vec<(Api, String, u32)> = vec![
        (
            Api::OpenAi,
            "Name three primary colours, then explain why they are called primary.".into(),
            24,
        ),
        (
            Api::Anthropic,
            notes(
                "Entry",
                4,
                "Which shelf holds crate 14? Answer in a sentence.",
            ),
            32,
        ),
        (
            Api::OpenAi,
            notes("Record", 8, "List the teams that moved crates, in order."),
            28,
        ),
        (
            Api::Anthropic,
            notes("Item", 14, "Summarise these notes in two sentences."),
            30,
        ),
    ];
    let send = |i: usize, phase: &str| -> (Answer, String) {
        let (api, content, max_tokens) = &agents[i];
        let key = format!("{phase}-{i}");
        let agent = format!("agent-{i}");
        let r = server.post(
            path(*api),
            &[("x-api-key", &key), ("x-agent-id", &agent)],
            &body(content, *max_tokens, false),
        );
        let cache = r.header("x-semantic-cache").unwrap_or_default().to_string();
        (answer(*api, &r), cache)
    };

    let solo: Vec<(Answer, String)> = (0..4).map(|i| send(i, "solo")).collect();
    let prompts: Vec<u64> = solo
        .iter()
        .map(|(_, c)| cache_field(c, "prompt").unwrap_or(0))
        .collect();
    assert!(
        prompts.windows(2).all(|w| w[0] < w[1]) && prompts[3] > 256,
        "prompt lengths differ and the last spans two chunks: {prompts:?}"
    );
    for (a, _) in &solo {
        assert!(!a.text.is_empty() && a.tokens > 0, "{a:?}");
    }
    let max_batch = |server: &Server| {
        server
            .metric(&auth, "semantic_decode_batch_max")
            .unwrap_or(0.0)
    };
    assert_eq!(max_batch(&server), 1.0, "solo requests decode alone");

    let barrier = Barrier::new(4);
    let concurrent: Vec<(Answer, String)> = thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let barrier = &barrier;
                let send = &send;
                scope.spawn(move || {
                    barrier.wait();
                    send(i, "conc")
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("request thread"))
            .collect()
    });

    for (i, ((s, _), (c, cache))) in solo.iter().zip(&concurrent).enumerate() {
        assert_eq!(
            cache_field(cache, "reused"),
            Some(0),
            "agent {i} computed its whole prompt again: {cache}"
        );
        assert_eq!(c, s, "agent {i}: concurrent answer equals its solo answer");
    }
    let batch = max_batch(&server);
    assert!(
        (2.0..=4.0).contains(&batch),
        "the concurrent requests shared decode steps (largest batch {batch})"
    );
    let st = stats(&server, &[("x-api-key", "admin-key")]);
    assert_eq!(st["active"], 0);
    assert_eq!(st["decoding"], 0);
}

#[test]
fn a_short_request_gets_its_first_token_while_a_long_cold_prompt_is_prefilled() {
    let model = require_model();
    let dir = tempfile::tempdir().expect("tempdir");
    // 256-token prefill chunks: the long prompt takes about sixteen engine calls, and the
    // short request's work runs between them.
    let server = Server::start(
        &model,
        &dir.path().join("cache"),
        &[
            ("SEMANTIC_MLX_MAX_BATCH_SIZE", "4"),
            ("SEMANTIC_MLX_PREFILL_STEP_SIZE", "256"),
        ],
    );
    let long_prompt = notes("Memo", 185, "Which shelf holds crate 14?");
    let short_started = Arc::new(std::sync::Mutex::new(None::<Instant>));

    let (long_first_tx, long_first_rx) = mpsc::channel::<()>();
    let (long, short) = thread::scope(|scope| {
        let long = scope.spawn(|| {
            let s = server.post_stream(
                path(Api::OpenAi),
                &[("x-agent-id", "long-reader")],
                &body(&long_prompt, 4, true),
            );
            let cache = s.header("x-semantic-cache").unwrap_or_default().to_string();
            let headers_at = Instant::now();
            let out = read_stream(Api::OpenAi, s, || {
                let _ = long_first_tx.send(());
            });
            (cache, headers_at, out)
        });
        // The long request is being prefilled (the gauge counts prompts in progress).
        wait_until(
            "the long prompt's prefill",
            Duration::from_secs(120),
            || stats(&server, &[])["prefilling"] == 1,
        );
        assert!(
            long_first_rx.try_recv().is_err(),
            "the long prompt cannot have an answer yet"
        );
        let short = scope.spawn(|| {
            *short_started.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            let s = server.post_stream(
                path(Api::Anthropic),
                &[("x-agent-id", "short-reader")],
                &body("What is the capital of France?", 12, true),
            );
            read_stream(Api::Anthropic, s, || {})
        });
        // A longer answer: 32 tokens. Decode steps go before each remaining prefill chunk
        // (up to 4 per chunk), so it ends while the ~16-chunk prefill is still running; with
        // one token per chunk it could not.
        let counter = scope.spawn(|| {
            let s = server.post_stream(
                path(Api::OpenAi),
                &[("x-agent-id", "counter")],
                &body(ENDLESS, 32, true),
            );
            read_stream(Api::OpenAi, s, || {})
        });
        (
            long.join().expect("long thread"),
            (
                short.join().expect("short thread"),
                counter.join().expect("counter thread"),
            ),
        )
    });
    let (long_cache, long_headers_at, long) = long;
    let (short, counter) = short;

    // The long prompt was cold and long: about 4,000 tokens, every one prefilled.
    let prompt = cache_field(&long_cache, "prompt").unwrap_or(0);
    assert!(
        (3_500..8_000).contains(&prompt),
        "the long prompt has {prompt} tokens"
    );
    assert_eq!(
        cache_field(&long_cache, "prefilled"),
        Some(prompt),
        "{long_cache}"
    );
    assert!(long.completed && !long.text.is_empty(), "{long:?}");
    assert!(short.completed && short.text.contains("Paris"), "{short:?}");

    let short_first = short.first_content_at.expect("the short answer has text");
    let long_first = long.first_content_at.expect("the long answer has text");
    assert!(
        short_first < long_headers_at && short_first < long_first,
        "the short request's first token arrived before the long prompt's prefill ended"
    );
    assert_eq!(counter.finish.as_deref(), Some("length"), "{counter:?}");
    assert!(
        counter.ended_at.is_some_and(|t| t < long_first),
        "32 tokens of another request were generated while the long prompt was prefilled"
    );
    assert!(short_started
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some_and(|t| t < short_first));
}

/// A prompt the default model answers with digits for as long as it may (greedy), so a
/// request with it keeps its slot for all of `max_tokens`.
const ENDLESS: &str = "Count from 1 to 300, separated by commas.";

#[test]
fn overload_is_refused_with_retry_after_while_the_server_stays_healthy() {
    let model = require_model();
    let dir = tempfile::tempdir().expect("tempdir");
    // One running generation and one waiting: the third request at once is refused.
    let server = Server::start(
        &model,
        &dir.path().join("cache"),
        &[
            ("SEMANTIC_MLX_MAX_BATCH_SIZE", "1"),
            ("SEMANTIC_MLX_MAX_QUEUE", "1"),
        ],
    );
    let capital = "What is the capital of France?";
    let (running_tx, running_rx) = mpsc::channel::<()>();
    thread::scope(|scope| {
        let holder = scope.spawn(|| {
            let s = server.post_stream(
                path(Api::OpenAi),
                &[("x-agent-id", "holder")],
                &body(ENDLESS, 160, true),
            );
            read_stream(Api::OpenAi, s, || {
                let _ = running_tx.send(());
            })
        });
        running_rx
            .recv_timeout(Duration::from_secs(300))
            .expect("the holder is decoding");
        let queued = scope.spawn(|| {
            let r = server.post(
                path(Api::Anthropic),
                &[("x-agent-id", "patient")],
                &body(capital, 16, false),
            );
            answer(Api::Anthropic, &r)
        });
        wait_until(
            "the second request to queue",
            Duration::from_secs(60),
            || stats(&server, &[])["queued"] == 1,
        );

        // Refused at once, in each API's shape, with Retry-After.
        let retry_after = |r: &Response| {
            r.header("retry-after")
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        for stream in [false, true] {
            let r = server.post(path(Api::OpenAi), &[], &body(capital, 8, stream));
            assert_eq!(r.status, 429, "stream={stream}: {}", r.text);
            assert!(retry_after(&r) >= 1, "{:?}", r.headers);
            assert_eq!(r.json()["error"]["type"], "rate_limit_error", "{}", r.text);
        }
        let r = server.post(path(Api::Anthropic), &[], &body(capital, 8, false));
        assert_eq!(r.status, 529, "{}", r.text);
        assert!(retry_after(&r) >= 1, "{:?}", r.headers);
        assert_eq!(r.json()["type"], "error");
        assert_eq!(r.json()["error"]["type"], "overloaded_error");

        // Healthy meanwhile: liveness and models answer; readiness says why it is not ready.
        assert_eq!(server.get("/health").status, 200);
        let models = server.get("/v1/models");
        assert_eq!(models.status, 200, "{}", models.text);
        assert!(!models.json()["data"].as_array().is_none_or(Vec::is_empty));
        let ready = server.get("/health/ready");
        assert_eq!(ready.status, 503);
        assert_eq!(ready.json()["reason"], "queue_full");
        let m = server.get("/metrics").text;
        assert_eq!(metric_value(&m, "semantic_requests_active"), Some(1.0));
        assert_eq!(metric_value(&m, "semantic_requests_queued"), Some(1.0));
        assert_eq!(
            metric_value(
                &m,
                "semantic_generation_errors_total{api=\"openai\",kind=\"overloaded\"}"
            ),
            Some(2.0),
            "{m}"
        );

        // The accepted requests finish with whole answers.
        let held = holder.join().expect("holder thread");
        assert!(held.completed, "{held:?}");
        assert_eq!(held.finish.as_deref(), Some("length"), "{held:?}");
        assert!(
            held.text.chars().filter(char::is_ascii_digit).count() >= 100,
            "{held:?}"
        );
        let patient = queued.join().expect("queued thread");
        assert!(patient.text.contains("Paris"), "{patient:?}");
        assert_eq!(patient.finish, "end_turn", "{patient:?}");
    });

    // Ready again, with the queue's story in the metrics.
    assert_eq!(server.get("/health/ready").status, 200);
    let m = server.get("/metrics").text;
    assert_eq!(metric_value(&m, "semantic_requests_active"), Some(0.0));
    assert_eq!(metric_value(&m, "semantic_requests_queued"), Some(0.0));
    assert_eq!(
        metric_value(&m, "semantic_queue_wait_seconds_count"),
        Some(2.0),
        "the two admitted requests: {m}"
    );
    assert!(
        metric_value(&m, "semantic_queue_wait_seconds_sum").is_some_and(|s| s > 0.0),
        "the queued one waited: {m}"
    );
    let r = server.post(path(Api::OpenAi), &[], &body(capital, 8, false));
    assert!(answer(Api::OpenAi, &r).text.contains("Paris"), "{}", r.text);
}

#[test]
fn a_generation_over_the_time_limit_gets_504_and_frees_its_slot() {
    let model = require_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &model,
        &dir.path().join("cache"),
        &[
            ("SEMANTIC_SERVER_REQUEST_TIMEOUT_SECS", "1"),
            ("SEMANTIC_MLX_MAX_BATCH_SIZE", "1"),
        ],
    );
    // A cancelled generation leaves its slot at its next token; on a loaded machine that can
    // take longer than the next request's whole time limit, which would then expire in the
    // queue instead of during its generation. Each request starts on a free slot.
    let slot_free = |n: u64| {
        wait_until("the slot to be free", Duration::from_secs(60), || {
            let st = stats(&server, &[]);
            st["active"] == 0 && st["requests"] == n
        })
    };
    // Each would decode 256 tokens, far beyond one second.
    let r = server.post(path(Api::OpenAi), &[], &body(ENDLESS, 256, false));
    assert_eq!(r.status, 504, "{}", r.text);
    assert_eq!(r.json()["error"]["code"], "timeout");
    slot_free(1);
    let r = server.post(path(Api::Anthropic), &[], &body(ENDLESS, 256, false));
    assert_eq!(r.status, 504, "{}", r.text);
    assert_eq!(r.json()["error"]["type"], "timeout_error");
    slot_free(2);
    // A stream whose limit passes before its first event (a slow machine: its prompt alone
    // can take a second) is answered 504 like the others; once started, it ends with an
    // error event.
    let r = server.post(path(Api::OpenAi), &[], &body(ENDLESS, 256, true));
    let error: Value = match r.status {
        200 => {
            let events = semantic_e2e::parse_sse(r.text.as_bytes());
            let last = events.last().expect("events");
            serde_json::from_str(&last.1).expect("an error event")
        }
        504 => r.json(),
        other => panic!("status {other}: {}", r.text),
    };
    assert_eq!(error["error"]["code"], "timeout", "{error}");

    // Each generation is cancelled at its next token: the slot is free again.
    wait_until(
        "the cancelled generations to stop",
        Duration::from_secs(60),
        || {
            let st = stats(&server, &[]);
            st["active"] == 0 && st["requests"] == 3
        },
    );
    let st = stats(&server, &[]);
    assert!(
        st["generated_tokens"].as_u64().unwrap_or(u64::MAX) < 3 * 256,
        "cancelled before their limits: {st}"
    );
    assert_eq!(server.get("/health/ready").status, 200);
    let m = server.get("/metrics").text;
    assert_eq!(
        metric_value(
            &m,
            "semantic_generation_errors_total{api=\"openai\",kind=\"timeout\"}"
        ),
        Some(2.0),
        "{m}"
    );
}
