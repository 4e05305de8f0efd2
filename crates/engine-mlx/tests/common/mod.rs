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

/// A real checkpoint (see [`real_model`]) loaded with its weights kept as the file's blocks
/// and blocks of `block` tokens; `None` when it is not installed.
pub fn load_real(
    var: &str,
    file: &str,
    block: usize,
) -> Option<(MlxEngine, Arc<MlxChatFormatter>)> {
    let path = real_model(var, file)?;
    let config = EngineConfig {
        block_tokens: block as u32,
        weight_format: engine_mlx::WeightFormat::Host,
        ..EngineConfig::default()
    };
    let loaded = MlxEngine::load(path.to_str().expect("utf-8"), config)
        .unwrap_or_else(|e| panic!("{file} loads: {e}"));
    Some(loaded)
}

/// Greedy ids after prefilling `ids` in a sequence of its own (released afterwards).
pub fn greedy(engine: &MlxEngine, ids: &[TokenId], n: usize) -> Vec<TokenId> {
    block_on(async {
        let seq = engine.open_sequence().await.expect("open");
        engine.prefill(seq, ids.to_vec()).await.expect("prefill");
        let out = greedy_continue(engine, seq, n).await;
        engine.release(seq).await.expect("release");
        out
    })
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
pub mod golden;
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
