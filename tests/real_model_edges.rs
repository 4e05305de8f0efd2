//! Issue 22 on the real binary and the default model, over real HTTP on 127.0.0.1: a long
//! agent id survives a restart; 10 MB prompts are refused fast while `/health` answers;
//! hundreds of idle and slow-header connections under a low descriptor limit do not stop
//! `/health`; SIGTERM with long streams in flight exits within the grace period and the
//! earlier turns restore after a restart.
//!
//! Each test prints what it measured (`cargo test -- --nocapture` shows it).

use semantic_e2e::{require_model, Server};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A system prompt of several whole 256-token blocks.
fn system_prompt() -> String {
    let mut s = String::from("You are Atlas, a careful engineering agent. ");
    for i in 0..60 {
        s.push_str(&format!(
            "Rule {i}: read the code around a change, test it, and explain it briefly. "
        ));
    }
    s
}

fn turn(question: &str, max_tokens: u64) -> Value {
    json!({
        "model": "default", "max_tokens": max_tokens, "temperature": 0,
        "system": system_prompt(),
        "messages": [{"role": "user", "content": question}],
    })
}

fn tier(r: &semantic_e2e::Response) -> String {
    r.header("x-semantic-cache")
        .and_then(|h| h.split(';').next())
        .unwrap_or_default()
        .trim()
        .trim_start_matches("tier=")
        .to_string()
}

/// GET /health on a fresh connection; its latency (panics on failure).
fn health_latency(base: &str) -> Duration {
    let start = Instant::now();
    let r = ureq::get(&format!("{base}/health"))
        .timeout(Duration::from_secs(60))
        .call()
        .expect("/health answers");
    assert_eq!(r.status(), 200);
    start.elapsed()
}

#[test]
fn a_250_byte_agent_id_survives_a_restart() {
    let model = require_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    let id = format!("agent-{}", "z".repeat(244));
    let server = Server::start(&model, &cache, &[]);
    let r = server.post("/v1/messages", &[("x-agent-id", &id)], &turn("Hello.", 4));
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-semantic-persist"), Some("saved"));
    assert_eq!(server.get(&format!("/v1/agents/{id}")).status, 200);
    assert_eq!(server.stop(), Some(0));

    let server = Server::start(&model, &cache, &[]);
    let g = server.get(&format!("/v1/agents/{id}"));
    assert_eq!(g.status, 200, "{}", g.text);
    let r = server.post(
        "/v1/messages",
        &[("x-agent-id", &id)],
        &turn("Hello again.", 4),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(tier(&r), "warm", "{:?}", r.header("x-semantic-cache"));
    let too_long = "q".repeat(513);
    let r = server.post("/v1/messages", &[("x-agent-id", &too_long)], &turn("x", 4));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["type"], "error");
}

#[test]
fn three_10_mb_prompts_are_refused_fast_while_health_answers() {
    let model = require_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&model, &dir.path().join("cache"), &[]);
    let base = server.base.clone();
    let huge = "lorem ipsum ".repeat(10 * 1024 * 1024 / 12);
    let body = json!({"model": "default", "max_tokens": 4,
        "messages": [{"role": "user", "content": huge}]});
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (done, base) = (done.clone(), base.clone());
        std::thread::spawn(move || {
            let mut worst = Duration::ZERO;
            let mut n = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) && n < 600 {
                worst = worst.max(health_latency(&base));
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            (worst, n)
        })
    };
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (base, body) = (base.clone(), body.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let r = ureq::post(&format!("{base}/v1/chat/completions"))
                    .timeout(Duration::from_secs(120))
                    .send_json(body);
                let status = match r {
                    Ok(r) => r.status(),
                    Err(ureq::Error::Status(s, _)) => s,
                    Err(e) => panic!("{e}"),
                };
                (status, start.elapsed())
            })
        })
        .collect();
    let results: Vec<(u16, Duration)> = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .collect();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (worst_health, probes) = prober.join().expect("prober");
    println!("10 MB prompts: {results:?}; /health worst {worst_health:?} over {probes} probes");
    for (status, took) in &results {
        assert_eq!(*status, 400);
        assert!(*took <= Duration::from_secs(3), "refused in {took:?}");
    }
    assert!(worst_health <= Duration::from_secs(1), "{worst_health:?}");
}

#[test]
fn idle_and_slow_header_connections_under_a_512_file_limit() {
    let model = require_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Server::start_limited(
        &model,
        &dir.path().join("cache"),
        &[("SEMANTIC_SERVER_HEADER_READ_TIMEOUT_SECS", "5")],
        Some(512),
    );
    let addr = server.base.trim_start_matches("http://").to_string();
    let mut hogs = Vec::new();
    let opening = Instant::now();
    for i in 0..600 {
        let Ok(mut s) = TcpStream::connect(&addr) else {
            break;
        };
        if i % 2 == 1 {
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nHo");
        }
        hogs.push(s);
    }
    let opened = hogs.len();
    println!("opened {opened} connections in {:?}", opening.elapsed());
    let start = Instant::now();
    let latency = health_latency(&server.base);
    // Slow headers keep dribbling: the server still closes them.
    for s in hogs.iter_mut().skip(1).step_by(2) {
        let _ = s.write_all(b"s");
    }
    println!("{opened} hog connections under nofile=512: /health answered in {latency:?}");
    assert!(
        start.elapsed() <= Duration::from_secs(40),
        "{:?}",
        start.elapsed()
    );
    let log = server.log_text();
    for line in log.lines().filter(|l| l.contains("limit")) {
        println!("server: {line}");
    }
    assert!(
        log.contains("lowered to fit") || log.contains("connection limit reached"),
        "no descriptor / connection-limit warning in the log:\n{log}"
    );
    // The hogs are closed by the server (header timeout) within a bounded time.
    let mut buf = [0u8; 64];
    let mut closed = 0;
    for s in hogs.iter_mut().take(20) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        if matches!(s.read(&mut buf), Ok(0) | Err(_)) {
            closed += 1;
        }
    }
    assert_eq!(closed, 20);
}

#[test]
fn sigterm_with_four_long_streams_exits_within_the_grace() {
    let model = require_model();
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("cache");
    // 8 s keeps the suite short; `SEMANTIC_E2E_GRACE_SECS=30` measures the default.
    let grace: u64 = std::env::var("SEMANTIC_E2E_GRACE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let grace_env = grace.to_string();
    let env = [("SEMANTIC_SERVER_SHUTDOWN_GRACE_SECS", grace_env.as_str())];
    let server = Server::start(&model, &cache, &env);
    for a in 0..4 {
        let r = server.post(
            "/v1/messages",
            &[("x-agent-id", &format!("long-{a}"))],
            &turn("Say hi.", 2),
        );
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // Four answers of this many tokens fit the default hot pool (SEMANTIC_E2E_STREAM_TOKENS
    // longer ones, e.g. 3000 to outlast a 30 s grace).
    let tokens: u64 = std::env::var("SEMANTIC_E2E_STREAM_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let base = server.base.clone();
    let streams: Vec<_> = (0..4)
        .map(|a| {
            let base = base.clone();
            std::thread::spawn(move || {
                let mut body = turn(
                    "Write the word yes over and over again, forever, separated by spaces.",
                    tokens,
                );
                body["stream"] = json!(true);
                let r = ureq::post(&format!("{base}/v1/messages"))
                    .set("x-agent-id", &format!("long-{a}"))
                    .timeout(Duration::from_secs(120))
                    .send_json(body)
                    .expect("stream starts");
                let mut text = String::new();
                let _ = r.into_reader().read_to_string(&mut text);
                text
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let start = Instant::now();
    let code = server.stop();
    let took = start.elapsed();
    let ends: Vec<String> = streams
        .into_iter()
        .map(|s| s.join().expect("stream"))
        .collect();
    let cut = ends.iter().filter(|t| t.contains("event: error")).count();
    println!(
        "SIGTERM with 4 streams (grace {grace} s): exit {code:?} after {took:?}; {cut} streams cut off"
    );
    assert_eq!(code, Some(0));
    assert!(took <= Duration::from_secs(grace + 7), "{took:?}");
    for text in &ends {
        assert!(
            text.contains("event: message_stop") || text.contains("event: error"),
            "a stream without a terminal event: {}",
            &text[text.len().saturating_sub(300)..]
        );
    }
    let server = Server::start(&model, &cache, &[]);
    for a in 0..4 {
        let r = server.post(
            "/v1/messages",
            &[("x-agent-id", &format!("long-{a}"))],
            &turn("Say hi.", 2),
        );
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(tier(&r), "warm", "{:?}", r.header("x-semantic-cache"));
    }
}

/// `semantic models inspect` on the tiny golden fixtures: Gemma 3's sliding-window layers
/// (and what they keep in RAM), DeepSeek-V2's latent cache (one KV head of 16 latent + 8 RoPE
/// dims, stored once), the MoE and Phi-3 shapes, in the spec and the capacity table.
#[test]
fn models_inspect_shows_sliding_layers_and_the_latent_cache() {
    let golden = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/engine-mlx/tests/fixtures/golden");
    let inspect = |name: &str| -> String {
        let out = std::process::Command::new(semantic_e2e::semantic_bin())
            .args(["models", "inspect"])
            .arg(golden.join(name))
            .output()
            .expect("run semantic models inspect");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{name}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let gemma = inspect("gemma3");
    assert!(
        gemma.contains("architecture:        gemma3_text"),
        "{gemma}"
    );
    assert!(
        gemma.contains("layers:              7 (6 sliding-window)"),
        "{gemma}"
    );
    assert!(gemma.contains("fp16 "), "{gemma}");
    // 6 of 7 layers slide over 8 tokens and keep 2 blocks each in RAM: the longest sequence
    // the budget holds is ~6× the full blocks of the fp32 row (its last column).
    let full_tokens: u64 = gemma
        .lines()
        .find(|l| l.starts_with("fp32 (live)"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let longest: u64 = gemma
        .split("longest sequence in the budget (fp32 live): ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.trim_end_matches(';').parse().ok())
        .unwrap_or(0);
    assert!(
        full_tokens > 0 && longest > 5 * full_tokens,
        "{gemma}: {longest} vs {full_tokens}"
    );
    let deepseek = inspect("deepseek_v2");
    assert!(deepseek.contains("KV heads:            1\n"), "{deepseek}");
    assert!(
        deepseek.contains("K / V head dim:      24 / 24"),
        "{deepseek}"
    );
    assert!(
        deepseek.contains("values:              the keys"),
        "{deepseek}"
    );
    // 256 tokens × 24 values × 2 bytes = 12,288 bytes per block per layer in fp16 (the
    // latent vector is the key and the value, stored once).
    assert!(deepseek.contains(" 12288 "), "{deepseek}");
    // The MoE and Phi-3 fixtures: 2 global layers of one KV head of 16, K and V apart:
    // 256 × (16 + 16) × 2 = 16,384 bytes per block per layer in fp16.
    for (name, arch) in [
        ("mixtral", "mixtral"),
        ("qwen3_moe", "qwen3_moe"),
        ("phi3", "phi3"),
    ] {
        let text = inspect(name);
        for line in [
            format!("architecture:        {arch}\n"),
            "layers:              2 (0 sliding-window)\n".to_owned(),
            "KV heads:            1\n".to_owned(),
            "K / V head dim:      16 / 16\n".to_owned(),
        ] {
            assert!(text.contains(&line), "{name}: {line:?} in {text}");
        }
        let fp16 = text
            .lines()
            .find(|l| l.starts_with("fp16 "))
            .unwrap_or_default();
        assert!(fp16.contains(" 16384 "), "{name}: {fp16}");
        assert!(!text.contains("values:"), "{name}: {text}");
    }
}
