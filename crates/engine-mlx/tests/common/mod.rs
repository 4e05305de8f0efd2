//! Shared helpers of the engine tests: locating the default model, loading it once.

#![allow(dead_code)]

use agent_session::{InferenceEngine, SamplingParams, SequenceId, StepRequest, TokenId};
use engine_mlx::{EngineConfig, MlxChatFormatter, MlxEngine};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

/// File name of the default model.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// Path of the default model, or `None` when the model tests are explicitly skipped
/// (`SEMANTIC_SKIP_MODEL_TESTS=1`). Panics with instructions when the file is missing.
pub fn model_path() -> Option<PathBuf> {
    if std::env::var("SEMANTIC_SKIP_MODEL_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("SEMANTIC_SKIP_MODEL_TESTS=1: skipping a test that needs the default model");
        return None;
    }
    let candidates: Vec<PathBuf> = [
        std::env::var_os("SEMANTIC_TEST_MODEL").map(PathBuf::from),
        std::env::var_os("SEMANTIC_HOME")
            .map(|h| PathBuf::from(h).join("models").join(DEFAULT_MODEL_FILE)),
        std::env::var_os("HOME").map(|h| {
            PathBuf::from(h)
                .join(".semantic")
                .join("models")
                .join(DEFAULT_MODEL_FILE)
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => Some(p.clone()),
        None => panic!(
            "the default model {DEFAULT_MODEL_FILE} was not found (looked at {candidates:?}); \
             run `cargo xtask setup`, set SEMANTIC_TEST_MODEL to its path, or set \
             SEMANTIC_SKIP_MODEL_TESTS=1 to skip the tests that need it"
        ),
    }
}

/// A real checkpoint other than the default model: from the environment variable `var`
/// (set by `cargo xtask test`) or the models folder; `None` (the tests are skipped, loudly)
/// when it is not installed.
pub fn real_model(var: &str, file: &str) -> Option<PathBuf> {
    let candidates: Vec<PathBuf> = [
        std::env::var_os(var).map(PathBuf::from),
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".semantic/models").join(file)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let found = candidates.into_iter().find(|p| p.is_file());
    if found.is_none() {
        eprintln!("{file} is not installed (run `cargo xtask test`): skipping");
    }
    found
}

/// Loads the default model with `config`.
pub fn load(config: EngineConfig) -> Option<(MlxEngine, Arc<MlxChatFormatter>)> {
    let path = model_path()?;
    let path = path.to_str().expect("model path is UTF-8").to_owned();
    Some(MlxEngine::load(&path, config).expect("the default model loads"))
}

/// The default model with the default configuration, loaded once per test binary.
pub fn shared() -> Option<&'static (MlxEngine, Arc<MlxChatFormatter>)> {
    static SHARED: OnceLock<Option<(MlxEngine, Arc<MlxChatFormatter>)>> = OnceLock::new();
    SHARED
        .get_or_init(|| load(EngineConfig::default()))
        .as_ref()
}

/// Runs a future to completion on the current thread.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    futures::executor::block_on(f)
}

pub mod batch;
pub mod tiny;
pub mod warm;

/// Largest absolute difference; infinite when a value is NaN or the lengths differ.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter().zip(b).fold(0f32, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f32::INFINITY
        } else {
            m.max(d)
        }
    })
}

/// Samples up to `n` tokens from `seq`'s pending logits with `params`, feeding each one back,
/// and stops after a token in `stop` (kept in the output).
pub async fn sample_continue(
    engine: &MlxEngine,
    seq: SequenceId,
    params: Arc<SamplingParams>,
    n: usize,
    stop: &[TokenId],
) -> Vec<TokenId> {
    let mut out: Vec<TokenId> = Vec::new();
    let mut feed = None;
    for step in 0..n as u32 {
        let r = engine
            .step(vec![StepRequest {
                seq,
                feed,
                params: params.clone(),
                step,
                generated: out.clone().into(),
            }])
            .await
            .expect("step");
        let t = r.into_iter().next().expect("one result").expect("token");
        out.push(t);
        if stop.contains(&t) {
            break;
        }
        feed = Some(t);
    }
    out
}

/// Greedy continuation of `n` tokens (no stop tokens).
pub async fn greedy_continue(engine: &MlxEngine, seq: SequenceId, n: usize) -> Vec<TokenId> {
    sample_continue(engine, seq, Arc::new(SamplingParams::greedy()), n, &[]).await
}
