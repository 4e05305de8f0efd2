//! Golden fixtures (`tests/fixtures/golden`, made by `scripts/golden.py`): where they are and
//! the check of a model against one.

use super::block_on;
use agent_session::InferenceEngine;
use engine_mlx::{AttentionKind, EngineConfig, MlxEngine, WeightFormat};
use mlx_rs::Array;
use std::path::{Path, PathBuf};

/// Largest |logit − reference| accepted: both sides compute in f32 on the same weights;
/// differences come only from operation order and stay around 1e-5.
pub const TOLERANCE: f32 = 1e-3;

/// The directory of fixture `name`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name)
}

/// The model at `model` (the fixture `name`'s directory, or a file made from it) against
/// the fixture's expected logits and greedy ids.
pub fn check_model(name: &str, model: &Path, format: WeightFormat, attention: AttentionKind) {
    let dir = fixture(name);
    let expected = Array::load_safetensors(dir.join("expected.safetensors")).expect("expected");
    let ids: Vec<u32> = expected["input_ids"]
        .to_vec_exact::<i32>()
        .expect("ids")
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let want_logits = expected["logits"].to_vec_exact::<f32>().expect("logits");
    let want_greedy: Vec<u32> = expected["greedy"]
        .to_vec_exact::<i32>()
        .expect("greedy")
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let config = EngineConfig {
        block_tokens: 64,
        weight_format: format,
        attention,
        ..EngineConfig::default()
    };
    let (engine, _) =
        MlxEngine::load(model.to_str().expect("utf-8"), config).expect("load fixture");
    block_on(async {
        let got = engine
            .debug_forward_all(ids.clone())
            .await
            .expect("forward");
        assert_eq!(got.len(), want_logits.len(), "{name}: logits shape");
        let err = super::max_abs_diff(&got, &want_logits);
        eprintln!(
            "{name} ({format:?}, {attention:?} attention): max |logit - reference| = {err:e}"
        );
        assert!(
            err <= TOLERANCE,
            "{name} ({format:?}): logits differ by {err}"
        );

        let seq = engine.open_sequence().await.expect("open");
        engine.prefill(seq, ids).await.expect("prefill");
        let out = super::greedy_continue(&engine, seq, want_greedy.len()).await;
        assert_eq!(out, want_greedy, "{name} ({format:?}): greedy ids");
    });
}
