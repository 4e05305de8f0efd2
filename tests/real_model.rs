//! The product's promise on the real default model over real HTTP (greedy):
//! warm turns reuse the cache, after a restart too, with output identical to a cold server's;
//! agents with the same system prompt share blocks; bad configuration refuses to start.
//!
//! Needs the default model (`cargo xtask setup`) and the `semantic` binary of this build.

use semantic_e2e::{require_model, semantic_bin, Response, Server};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// A system prompt of roughly 600 tokens.
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
    let mut s = String::from(
        "You are Atlas, a senior software engineer agent working in a large Rust repository. ",
    );
    for i in 0..9 {
        for (j, r) in rules.iter().enumerate() {
            s.push_str(&format!("Rule {}.{}: {} ", i + 1, j + 1, r));
        }
    }
    s
}

fn anthropic(system: &str, turns: &[(String, String)], question: &str) -> Value {
    let mut messages = Vec::new();
    for (q, a) in turns {
        messages.push(json!({"role": "user", "content": q}));
        messages.push(json!({"role": "assistant", "content": a}));
    }
    messages.push(json!({"role": "user", "content": question}));
    json!({
        "model": "default",
        "max_tokens": 24,
        "temperature": 0,
        "system": system,
        "messages": messages,
    })
}

struct Turn {
    text: String,
    read: u64,
    created: u64,
    input: u64,
    tier: String,
    resp: Response,
}

fn send(server: &Server, headers: &[(&str, &str)], body: &Value) -> Turn {
    let resp = server.post("/v1/messages", headers, body);
    assert_eq!(resp.status, 200, "{}\n{}", resp.text, server.log_text());
    let v = resp.json();
    let text = semantic_e2e::anthropic_text(&v);
    let u = &v["usage"];
    let tier = resp
        .header("x-semantic-cache")
        .unwrap_or_default()
        .to_string();
    Turn {
        text,
        read: u["cache_read_input_tokens"].as_u64().unwrap_or(0),
        created: u["cache_creation_input_tokens"].as_u64().unwrap_or(0),
        input: u["input_tokens"].as_u64().unwrap_or(0),
        tier,
        resp,
    }
}

fn prompt_len(t: &Turn) -> u64 {
    t.read + t.created + t.input
}

fn block_files(cache: &Path) -> usize {
    std::fs::read_dir(cache.join("blocks"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .count()
        })
        .unwrap_or(0)
}

/// A cold server: each request uses its own API key, so its own namespace (nothing shared).
struct Cold {
    server: Server,
    next: std::cell::Cell<usize>,
}

impl Cold {
    fn start(model: &Path, dir: &Path) -> Self {
        let keys: Vec<String> = (0..8).map(|i| format!("cold-key-{i}")).collect();
        let server = Server::start(model, dir, &[("SEMANTIC_API_KEYS", &keys.join(","))]);
        Self {
            server,
            next: std::cell::Cell::new(0),
        }
    }

    fn answer(&self, body: &Value) -> Turn {
        let i = self.next.get();
        self.next.set(i + 1);
        let key = format!("cold-key-{i}");
        let t = send(&self.server, &[("x-api-key", &key)], body);
        assert_eq!(t.read, 0, "the cold server must not reuse anything");
        t
    }
}

#[test]
fn warm_turns_reuse_the_cache_and_equal_cold_even_after_a_restart() {
    warm_turns_scenario(&require_model());
}

/// The same on Gemma 3 270M (SentencePiece vocabulary, sliding-window layers, the plain
/// fallback template): the prompts pass the 512-token window, so the restored blocks hold
/// keys the sliding layers no longer see. Skipped when the file is not installed
/// (`cargo xtask test` installs it).
#[test]
fn gemma3_warm_turns_reuse_the_cache_and_equal_cold_even_after_a_restart() {
    if let Some(model) = semantic_e2e::real_model("SEMANTIC_TEST_GEMMA3", GEMMA3_FILE) {
        warm_turns_scenario(&model);
    }
}

#[test]
fn gemma3_capital_of_france_over_openai() {
    if let Some(model) = semantic_e2e::real_model("SEMANTIC_TEST_GEMMA3", GEMMA3_FILE) {
        capital_of_france(&model);
    }
}

/// The Gemma 3 270M file `cargo xtask test` installs.
const GEMMA3_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

fn warm_turns_scenario(model: &Path) {
    let model = model.to_path_buf();
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let cold = Cold::start(&model, &dir.path().join("cold"));
    let system = system_prompt();
    let agent_a = [("x-agent-id", "agent-a")];

    let server = Server::start(&model, &cache, &[]);

    // Turn 1: a miss that writes the cache.
    let q1 = "Which rule tells you what to do after fixing a bug?".to_string();
    let b1 = anthropic(&system, &[], &q1);
    let t1 = send(&server, &agent_a, &b1);
    let p1 = prompt_len(&t1);
    assert!(p1 > 500, "system prompt should be ~600 tokens, got {p1}");
    assert_eq!(t1.read, 0);
    assert!(t1.created > 0);
    assert!(t1.tier.contains("miss"), "{}", t1.tier);

    // Turn 2: history + new question reuses turn 1's whole blocks, prefills only the rest,
    // and answers exactly as a cold server does.
    let q2 = "And what should you never log?".to_string();
    let b2 = anthropic(&system, &[(q1.clone(), t1.text.clone())], &q2);
    let t2 = send(&server, &agent_a, &b2);
    assert!(t2.read >= p1 / 256 * 256, "read {} of {p1}", t2.read);
    assert!(t2.tier.contains("hot"), "{}", t2.tier);
    let prefilled = prompt_len(&t2) - t2.read;
    assert!(
        t2.tier.contains(&format!("prefilled={prefilled}")),
        "header {:?} should report {prefilled} prefilled tokens",
        t2.tier
    );
    assert_eq!(
        t2.text,
        cold.answer(&b2).text,
        "warm answer equals cold answer"
    );

    // Agent B with A's system prompt reuses its blocks; the disk holds them once.
    let bb = anthropic(&system, &[], "Summarise the rules in one sentence.");
    let tb = send(&server, &[("x-agent-id", "agent-b")], &bb);
    assert!(tb.read > 0, "B reuses A's system prompt blocks");
    assert_eq!(tb.text, cold.answer(&bb).text);

    // Restart on the same cache dir: turn 3 of A is served from disk, identical to cold.
    assert_eq!(server.stop(), Some(0), "SIGTERM exits 0");
    // A's chain covers turn 2's whole blocks; B added only blocks past the shared prefix.
    assert_eq!(
        block_files(&cache),
        (prompt_len(&t2) / 256 + tb.created / 256) as usize,
        "shared blocks are stored once"
    );
    let server = Server::start(&model, &cache, &[]);
    let q3 = "Give one more rule.".to_string();
    let b3 = anthropic(
        &system,
        &[(q1, t1.text.clone()), (q2, t2.text.clone())],
        &q3,
    );
    let t3 = send(&server, &agent_a, &b3);
    assert!(t3.tier.contains("warm"), "{}", t3.tier);
    assert!(t3.read >= prompt_len(&t2) / 256 * 256 - 256);
    assert_eq!(t3.text, cold.answer(&b3).text);
    let _ = t3.resp;
}

#[test]
fn capital_of_france_over_openai() {
    capital_of_france(&require_model());
}

fn capital_of_france(model: &Path) {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(model, &dir.path().join("cache"), &[]);
    let r = server.post(
        "/v1/chat/completions",
        &[],
        &json!({
            "model": "default",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 24,
            "temperature": 0
        }),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let v = r.json();
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("Paris"), "{text}");
    let u = &v["usage"];
    assert!(u["prompt_tokens_details"]["cached_tokens"].as_u64() <= u["prompt_tokens"].as_u64());
}

fn refuses(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(semantic_bin());
    cmd.args(args)
        .env("SEMANTIC_AGENT_CACHE_DIR", dir.path())
        .env("SEMANTIC_SERVER_PORT", "0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run semantic");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should refuse to start");
    assert!(
        stderr.contains(needle),
        "stderr should mention {needle}: {stderr}"
    );
}

#[test]
fn bad_configuration_refuses_to_start() {
    let model = require_model();
    let m = model.to_string_lossy();
    refuses(
        &["serve", "--model", &m],
        &[("SEMANTIC_MLX_KV_BITS", "3")],
        "SEMANTIC_MLX_KV_BITS",
    );
    refuses(
        &["serve", "--model", "/nonexistent/model.gguf"],
        &[],
        "/nonexistent/model.gguf",
    );
}
