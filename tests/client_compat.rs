//! Real agent clients, unmodified, against the real server and the default model:
//!
//! - the official Node SDKs (`openai`, `@anthropic-ai/sdk`, pinned, from npm into
//!   `.semantic-build/node-clients`): plain, streamed (the SDKs' stream helpers), tool round
//!   trips, and Claude Code's message shape (`tests/clients/node_check.mjs`);
//! - LangChain's `ChatAnthropic` (pinned, from PyPI into `.semantic-build/langchain-venv`):
//!   `.stream()` reports the same input tokens as `.invoke()` (`tests/clients/langchain_check.py`);
//! - Claude Code's recorded first request (`tests/fixtures/claude_code_first_request.json`)
//!   replayed over HTTP, with `HEAD /` first, as Claude Code sends them;
//! - opt-in, `SEMANTIC_TEST_CLAUDE_CODE=<model>` (a model with a 32K context, such as
//!   Qwen2.5-Coder-0.5B-Instruct Q4_K_M; Claude Code's default prompt does not fit the default
//!   model's 8,192 tokens): `claude -p` itself (npm `@anthropic-ai/claude-code`, pinned) twice
//!   in one project, JSON output checked, the second run reading the cached prefix.

use semantic_e2e::{require_model, Server};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Node SDK versions the check is pinned to.
const NODE_SDKS: [&str; 2] = ["openai@7.59.0", "@anthropic-ai/sdk@1.16.0"];
/// The LangChain version (and the packages under it) the check is pinned to.
const LANGCHAIN: [&str; 3] = [
    "langchain-anthropic==1.7.10",
    "langchain-core==1.8.3",
    "anthropic==2.16.0",
];
/// The Claude Code version the opt-in run is pinned to.
const CLAUDE_CODE: &str = "@anthropic-ai/claude-code@2.1.332";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn build_dir() -> PathBuf {
    workspace_root().join(".semantic-build")
}

/// `npm install`s `packages` into `dir` once (a stamp file remembers the set).
fn npm_install(dir: &Path, packages: &[&str]) {
    let stamp = dir.join(".installed");
    let want = packages.join(" ");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(want.as_str()) {
        return;
    }
    std::fs::create_dir_all(dir).expect("create the npm directory");
    // A package.json of its own, so npm installs here and not in a parent project.
    std::fs::write(
        dir.join("package.json"),
        r#"{"private": true, "type": "module"}"#,
    )
    .expect("write package.json");
    let ok = Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--save-exact",
            "--prefix",
        ])
        .arg(dir)
        .args(packages)
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "npm install {want} failed (is Node.js >= 20 with npm installed?)"
    );
    std::fs::write(&stamp, &want).expect("write npm stamp");
}

/// A virtual environment with `packages` from PyPI (once; a stamp remembers the set).
fn venv_python(name: &str, packages: &[&str]) -> PathBuf {
    let venv = build_dir().join(name);
    let python = venv.join("bin").join("python3");
    let stamp = venv.join(".installed");
    let want = packages.join(" ");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(want.as_str()) {
        let ok = Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "python3 -m venv failed (Debian: apt-get install python3-venv)"
        );
        let ok = Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(packages)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "pip install {want} failed");
        std::fs::write(&stamp, &want).expect("write venv stamp");
    }
    python
}

fn run_checked(cmd: &mut Command, what: &str, server: &Server) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what} failed:\n{stdout}\n{stderr}\nserver log:\n{}",
        server.log_text()
    );
    stdout
}

#[test]
fn node_sdks_plain_streaming_and_tool_round_trips() {
    let model = require_model();
    let dir = build_dir().join("node-clients");
    npm_install(&dir, &NODE_SDKS);
    // ES modules resolve packages next to the script: run a copy inside the install.
    let script = dir.join("node_check.mjs");
    std::fs::copy(
        workspace_root().join("tests/clients/node_check.mjs"),
        &script,
    )
    .expect("copy node_check.mjs");
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&model, &tmp.path().join("cache"), &[]);
    let stdout = run_checked(
        Command::new("node").arg(&script).arg(&server.base),
        "node_check.mjs",
        &server,
    );
    assert!(stdout.contains("all Node SDK checks passed"), "{stdout}");
}

#[test]
fn langchain_chat_anthropic_stream_reports_the_invoke_input_tokens() {
    let model = require_model();
    let python = venv_python("langchain-venv", &LANGCHAIN);
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&model, &tmp.path().join("cache"), &[]);
    let stdout = run_checked(
        Command::new(&python)
            .arg(workspace_root().join("tests/clients/langchain_check.py"))
            .arg(&server.base),
        "langchain_check.py",
        &server,
    );
    assert!(stdout.contains("ok "), "{stdout}");
}

/// Claude Code's recorded first request, shortened to fit the default model (see the
/// fixture's `_comment`), replayed as Claude Code sends it: `HEAD /`, then the stream.
#[test]
fn claude_codes_recorded_first_request_is_served_by_the_default_model() {
    let model = require_model();
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(
            workspace_root().join("tests/fixtures/claude_code_first_request.json"),
        )
        .expect("read the fixture"),
    )
    .expect("fixture JSON");
    let tmp = tempfile::tempdir().expect("tempdir");
    // A small cap keeps the run short; Claude Code asks 128,000 tokens.
    let server = Server::start(
        &model,
        &tmp.path().join("cache"),
        &[
            ("SEMANTIC_MLX_MAX_TOKENS_CAP", "256"),
            ("SEMANTIC_MLX_DEFAULT_MAX_TOKENS", "64"),
        ],
    );
    let head = ureq::head(&format!("{}/", server.base))
        .call()
        .expect("HEAD /");
    assert_eq!(head.status(), 200);
    let root = server.get("/");
    assert_eq!(root.json()["name"], "semantic");

    let headers: Vec<(String, String)> = fixture["headers"]
        .as_object()
        .expect("headers")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect();
    let headers: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let path = fixture["path"].as_str().expect("path");
    let body = &fixture["body"];
    assert_eq!(body["max_tokens"], 128_000);
    let r = server.post(path, &headers, body);
    assert_eq!(r.status, 200, "{}\n{}", r.text, server.log_text());
    let events = r.sse_events();
    let data = |name: &str| -> Value {
        let (_, d) = events
            .iter()
            .find(|(e, _)| e == name)
            .unwrap_or_else(|| panic!("no {name} event in {events:?}"));
        serde_json::from_str(d).expect("event JSON")
    };
    let start = data("message_start");
    let delta = data("message_delta");
    assert!(events.iter().any(|(e, _)| e == "message_stop"));
    let u = &delta["usage"];
    let input: u64 = [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    .iter()
    .map(|k| {
        u[*k]
            .as_u64()
            .unwrap_or_else(|| panic!("{k} in message_delta: {u}"))
    })
    .sum();
    let s = &start["message"]["usage"];
    assert_eq!(
        input,
        s["input_tokens"].as_u64().unwrap_or(0)
            + s["cache_creation_input_tokens"].as_u64().unwrap_or(0)
            + s["cache_read_input_tokens"].as_u64().unwrap_or(0)
    );
    let output = u["output_tokens"].as_u64().expect("output_tokens");
    assert!(output <= 256, "the cap holds: {output}");
    if output == 256 {
        assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    }
    eprintln!(
        "Claude Code's recorded request (shortened): {input} prompt tokens, {output} written"
    );
}

/// `claude -p` itself, opt-in: `SEMANTIC_TEST_CLAUDE_CODE=<model with a 32K context>`.
///
/// Its first run prefills Claude Code's whole default prompt (about 11,800 tokens on Qwen2.5's
/// tokenizer), which takes minutes on a small CPU; so the server gets no request time limit
/// and Claude Code a long one (`API_TIMEOUT_MS`: its default of 600 s covers the whole
/// streamed answer, and a cut stream is retried without streaming). Sampling is greedy
/// (`SEMANTIC_MLX_DEFAULT_TEMPERATURE=0`; Claude Code sends no temperature) so that the
/// answers do not depend on chance: one that reached the server's `max_tokens` cap would fail
/// the run (Claude Code asks the model to resume, then reports `is_error`). The answer's
/// text is not checked: a 0.5B model's is rarely useful.
#[test]
fn claude_code_print_mode_twice_reads_the_cached_prefix() {
    let Some(model) = std::env::var_os("SEMANTIC_TEST_CLAUDE_CODE").map(PathBuf::from) else {
        eprintln!(
            "skipped: set SEMANTIC_TEST_CLAUDE_CODE=<model path> (a 32K-context model such as \
             Qwen2.5-Coder-0.5B-Instruct Q4_K_M) to run Claude Code against the server"
        );
        return;
    };
    let dir = build_dir().join("claude-code");
    npm_install(&dir, &[CLAUDE_CODE]);
    let claude = dir.join("node_modules/.bin/claude");
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(
        &model,
        &tmp.path().join("cache"),
        &[
            ("SEMANTIC_SERVER_REQUEST_TIMEOUT_SECS", "0"),
            ("SEMANTIC_MLX_DEFAULT_TEMPERATURE", "0"),
        ],
    );
    let project = tmp.path().join("project");
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&project).expect("project dir");
    std::fs::create_dir_all(&home).expect("home dir");
    let mut results = Vec::new();
    for prompt in ["Say hello in one word.", "Say goodbye in one word."] {
        let start = std::time::Instant::now();
        let stdout = run_checked(
            Command::new(&claude)
                .args(["-p", prompt, "--output-format", "json"])
                .current_dir(&project)
                .env("HOME", &home)
                .env("ANTHROPIC_BASE_URL", &server.base)
                .env("ANTHROPIC_API_KEY", "sk-local")
                .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
                .env("API_TIMEOUT_MS", "3600000"),
            "claude -p",
            &server,
        );
        let wall = start.elapsed();
        let v: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("claude's output is not JSON ({e}): {stdout}"));
        assert_eq!(v["type"], "result", "{v}");
        assert_eq!(v["is_error"], false, "{v}\n{}", server.log_text());
        assert!(v["result"].is_string(), "{v}");
        eprintln!(
            "claude -p {prompt:?}: {:.0} s, {} turn(s), usage {}, server peak RSS {} MiB",
            wall.as_secs_f64(),
            v["num_turns"],
            v["usage"],
            server.peak_rss_kib().unwrap_or(0) / 1024
        );
        results.push(v);
    }
    let read = results[1]["usage"]["cache_read_input_tokens"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        read > 0,
        "the second run reads the cached system prompt and tools: {}",
        results[1]["usage"]
    );
}
