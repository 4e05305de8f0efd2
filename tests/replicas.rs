//! Two replicas behind nginx (the agent-affinity configuration of docs/deployment.md) sharing
//! the warm tier through a real S3-compatible server (`s3s-fs`), on the real default model:
//! an agent's turns stay on its replica; when that replica is killed, the next turn goes to
//! the other one, which restores the agent's blocks from the object store and answers
//! exactly as a cold server; a second agent with the same system prompt reuses the blocks
//! the first replica uploaded; when the store goes down, the replica keeps answering and
//! `/health` and `/metrics` say so.
//!
//! Needs the default model, the `semantic` binary, s3s-fs and nginx (`cargo xtask test`
//! installs them; outside CI the test is skipped when s3s-fs or nginx is missing).

use cache_store_object::test_server::{require_server, S3TestServer};
use semantic_e2e::{
    documented_nginx_config, free_tcp_port, post_json, require_model, require_nginx, wait_until,
    Nginx, Response, Server,
};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

/// A system prompt of over a thousand tokens (several whole 256-token blocks shared by agents).
fn system_prompt() -> String {
    let rules = [
        "Always read the surrounding code before changing a function.",
        "Prefer small, reviewable commits with clear messages.",
        "Write a unit test for every bug you fix, and run the whole suite.",
        "Never log secrets, tokens or personal data.",
        "Explain trade-offs briefly when you choose between two designs.",
        "Keep public interfaces stable unless the task says otherwise.",
        "Document every public item in one or two sentences.",
        "Use the project's error types; do not panic on user input.",
    ];
    let mut s = String::from("You are Atlas, a senior software engineer agent. ");
    for i in 0..9 {
        for (j, r) in rules.iter().enumerate() {
            s.push_str(&format!("Rule {}.{}: {} ", i + 1, j + 1, r));
        }
    }
    s
}

/// A question long enough that each turn adds whole blocks of the agent's own.
fn question(topic: &str) -> String {
    let mut q = format!("Here is the module about {topic}. ");
    for i in 0..14 {
        q.push_str(&format!(
            "Step {i}: the {topic} handler validates its input, logs the request id, calls the \
             store and maps every error to the API's shape. "
        ));
    }
    q.push_str("In one sentence, what does this module do?");
    q
}

fn body(turns: &[(String, String)], q: &str) -> Value {
    let mut messages = Vec::new();
    for (u, a) in turns {
        messages.push(json!({"role": "user", "content": u}));
        messages.push(json!({"role": "assistant", "content": a}));
    }
    messages.push(json!({"role": "user", "content": q}));
    json!({
        "model": "default",
        "max_tokens": 16,
        "temperature": 0,
        "system": system_prompt(),
        "messages": messages,
    })
}

struct Turn {
    text: String,
    /// `usage.cache_read_input_tokens`.
    read: u64,
    /// The `restored=` field of `x-semantic-cache`.
    restored: u64,
    cache: String,
}

fn turn(resp: Response, who: &str) -> Turn {
    assert_eq!(resp.status, 200, "{who}: {}", resp.text);
    let v = resp.json();
    let cache = resp
        .header("x-semantic-cache")
        .unwrap_or_default()
        .to_string();
    let restored = cache
        .split("; ")
        .find_map(|kv| kv.strip_prefix("restored="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Turn {
        text: semantic_e2e::anthropic_text(&v),
        read: v["usage"]["cache_read_input_tokens"].as_u64().unwrap_or(0),
        restored,
        cache,
    }
}

fn requests(s: &Server) -> u64 {
    s.get("/v1/stats").json()["requests"].as_u64().unwrap_or(0)
}

fn metric(s: &Server, series: &str) -> f64 {
    s.metric(&[], series).unwrap_or(0.0)
}

/// The answer of a server that has nothing cached (its own fresh directory, no shared tier).
fn cold_answer(model: &Path, dir: &Path, b: &Value) -> String {
    let cold = Server::start(model, dir, &[]);
    let t = turn(
        cold.post("/v1/messages", &[("x-agent-id", "cold")], b),
        "cold",
    );
    assert_eq!(t.read, 0, "the cold server reused nothing");
    let _ = cold.stop();
    t.text
}

#[test]
fn a_moved_agent_restores_from_the_object_store_and_answers_as_cold() {
    let test = "a_moved_agent_restores_from_the_object_store_and_answers_as_cold";
    let Some(s3_bin) = require_server(test) else {
        return;
    };
    let Some(nginx_bin) = require_nginx(test) else {
        return;
    };
    let model = require_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s3 =
        S3TestServer::start(&s3_bin, &dir.path().join("s3"), "semantic-kv").expect("s3s-fs");
    let env_owned = s3.env("e2e");
    let env: Vec<(&str, &str)> = env_owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let r1 = Server::start(&model, &dir.path().join("r1"), &env);
    let r2 = Server::start(&model, &dir.path().join("r2"), &env);
    let port = free_tcp_port();
    let replicas = [
        r1.base.trim_start_matches("http://"),
        r2.base.trim_start_matches("http://"),
    ];
    let nginx = Nginx::start(
        &nginx_bin,
        &dir.path().join("nginx"),
        &documented_nginx_config(replicas, port),
        port,
    );
    let agent_a = [("x-agent-id", "agent-a")];

    // Agent A's first two turns, through nginx: both on the same replica (affinity).
    let q1 = question("billing");
    let b1 = body(&[], &q1);
    let t1 = turn(
        post_json(&nginx.base, "/v1/messages", &agent_a, &b1),
        "A turn 1",
    );
    let (home, other) = if requests(&r1) == 1 {
        (r1, r2)
    } else {
        (r2, r1)
    };
    assert_eq!((requests(&home), requests(&other)), (1, 0));
    let q2 = question("invoices");
    let b2 = body(&[(q1.clone(), t1.text.clone())], &q2);
    let t2 = turn(
        post_json(&nginx.base, "/v1/messages", &agent_a, &b2),
        "A turn 2",
    );
    assert_eq!(
        (requests(&home), requests(&other)),
        (2, 0),
        "affinity: A stays on its replica"
    );
    assert!(t2.read > 0, "turn 2 is warm: {}", t2.cache);
    // Its blocks and manifest reach the bucket in the background.
    wait_until("A's uploads", Duration::from_secs(60), || {
        let h = home.get("/health").json();
        h["object_store"]["status"] == "up" && h["object_store"]["upload_queue"] == 0
    });
    assert!(metric(&home, "semantic_object_store_uploaded_blocks_total") >= 4.0);

    // Agent B, same system prompt, on the other replica: the shared blocks come from the bucket.
    let bb = body(&[], &question("payroll"));
    let tb = turn(
        other.post("/v1/messages", &[("x-agent-id", "agent-b")], &bb),
        "B",
    );
    assert!(
        tb.read >= 512 && tb.restored >= 512,
        "B reuses the shared system prompt: {}",
        tb.cache
    );
    let downloaded_b = metric(&other, "semantic_object_store_downloaded_blocks_total");
    assert!(downloaded_b >= 2.0, "downloaded {downloaded_b}");

    // A's replica dies; A's next turn goes to the other one and restores from the bucket.
    home.kill();
    let b3 = body(
        &[(q1, t1.text.clone()), (q2, t2.text.clone())],
        &question("refunds"),
    );
    let t3 = turn(
        post_json(&nginx.base, "/v1/messages", &agent_a, &b3),
        "A turn 3",
    );
    assert_eq!(requests(&other), 2, "failover: the other replica served A");
    assert!(t3.cache.contains("tier=warm"), "{}", t3.cache);
    assert!(
        t3.restored > tb.restored,
        "A's own blocks were restored too: {}",
        t3.cache
    );
    assert!(
        t3.read >= t3.restored,
        "usage reports the reads: {}",
        t3.cache
    );
    let downloaded_a =
        metric(&other, "semantic_object_store_downloaded_blocks_total") - downloaded_b;
    assert!(downloaded_a >= 1.0, "A's blocks came from the object store");
    eprintln!(
        "B: {} | A after the move: {} ({downloaded_a} blocks downloaded)",
        tb.cache, t3.cache
    );
    drop(nginx);

    // The object store goes down: the replica keeps answering from RAM and its disk, and
    // says so in /health and /metrics.
    s3.stop();
    let bb2 = body(
        &[(question("payroll"), tb.text.clone())],
        "And in one word?",
    );
    turn(
        other.post("/v1/messages", &[("x-agent-id", "agent-b")], &bb2),
        "B while the store is down",
    );
    wait_until("the outage in /health", Duration::from_secs(30), || {
        other.get("/health").json()["object_store"]["status"] == "down"
    });
    assert_eq!(other.metric(&[], "semantic_object_store_up"), Some(0.0));

    // Exactly as a cold server.
    assert_eq!(
        t3.text,
        cold_answer(&model, &dir.path().join("cold-a"), &b3),
        "A after the move"
    );
    assert_eq!(
        tb.text,
        cold_answer(&model, &dir.path().join("cold-b"), &bb),
        "B"
    );
    let _ = other.stop();
}
