//! The engine's invariants on every architecture of the golden fixtures (tiny random-weight
//! models of `scripts/golden.py`), with the Linux default weight format (host kernels):
//! a batched decode step gives each sequence the bits it gets alone, and restoring KV
//! blocks then prefilling the rest gives a cold prefill's logits bit for bit.

mod common;

use agent_session::InferenceEngine;
use common::batch::{prompts, run};
use common::block_on;
use common::warm::{assert_restores_equal_cold, same_bits};
use engine_mlx::{EngineConfig, MlxEngine, WeightFormat};
use std::path::PathBuf;

const BLOCK: usize = 64;

/// Every fixture, one per architecture variant.
const FIXTURES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3",
    "phi3",
    "phi3_longrope",
    "mixtral",
    "qwen3_moe",
    "deepseek_v2",
    "deepseek_v2_q_lora",
];

fn load(name: &str) -> MlxEngine {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/golden")
        .join(name);
    let config = EngineConfig {
        block_tokens: BLOCK as u32,
        weight_format: WeightFormat::Host,
        ..EngineConfig::default()
    };
    MlxEngine::load(dir.to_str().expect("utf-8"), config)
        .unwrap_or_else(|e| panic!("{name} loads: {e}"))
        .0
}

#[test]
fn batched_decode_equals_solo_on_every_architecture() {
    for name in FIXTURES {
        let engine = load(name);
        let vocab = engine.model().vocab_size as u32;
        let prompts: Vec<_> = prompts(vocab)
            .into_iter()
            .map(|p| p[..p.len().min(30)].to_vec())
            .collect();
        block_on(async {
            let mut solo = Vec::new();
            for p in &prompts {
                let s = engine.open_sequence().await.expect("open");
                engine.prefill(s, p.clone()).await.expect("prefill");
                solo.push(run(&engine, &[s], 6).await.remove(0));
                engine.release(s).await.expect("release");
            }
            let mut seqs = Vec::new();
            for p in &prompts {
                let s = engine.open_sequence().await.expect("open");
                engine.prefill(s, p.clone()).await.expect("prefill");
                seqs.push(s);
            }
            let together = run(&engine, &seqs, 6).await;
            for (j, (alone, batched)) in solo.iter().zip(&together).enumerate() {
                assert!(!batched.is_empty());
                for (k, ((ta, la), (tb, lb))) in alone.iter().zip(batched).enumerate() {
                    assert_eq!(ta, tb, "{name}: sequence {j}, token {k}");
                    assert!(
                        same_bits(la, lb),
                        "{name}: sequence {j}, step {k}: batched logits differ from solo"
                    );
                }
            }
            for s in seqs {
                engine.release(s).await.expect("release");
            }
        });
    }
}

#[test]
fn restore_then_prefill_equals_cold_on_every_architecture() {
    for name in FIXTURES {
        let engine = load(name);
        let vocab = engine.model().vocab_size as u32;
        if engine.model().context_length < 4 * BLOCK + 5 {
            // phi3_longrope's context of 64 (small, so that LongRoPE matters) holds no
            // whole block before its end.
            eprintln!("{name}: context too short for restored blocks: skipped");
            continue;
        }
        // 4 blocks and a partial one, far past gemma3's window of 8.
        let tokens: Vec<u32> = (0..4 * BLOCK as u32 + 5)
            .map(|i| (i * 37 + 11) % vocab)
            .collect();
        block_on(assert_restores_equal_cold(
            &engine,
            &tokens,
            &[1, 2, 3, 4],
            BLOCK,
            4,
            name,
        ));
    }
}

/// Gemma 3's sliding layers (window 8 in the fixture) keep their window plus one block in
/// RAM however long the sequence, cold or restored: the bytes held stay within what
/// `ModelCacheSpec::resident_bytes` charges, far below every layer holding every block.
#[test]
fn sliding_layers_keep_only_their_window_in_ram() {
    let engine = load("gemma3");
    let vocab = engine.model().vocab_size as u32;
    let live = engine
        .model()
        .spec
        .clone()
        .with_kv_storage(model_cache_spec::KvStorage::FP32)
        .expect("f32 spec");
    assert!(live.num_sliding_layers() > 0);
    let tokens: Vec<u32> = (0..6 * BLOCK as u32 + 5)
        .map(|i| (i * 29 + 3) % vocab)
        .collect();
    let len = tokens.len() as u64;
    let every_block = live.blocks_for_tokens(len + 1) * live.bytes_per_block();
    block_on(async {
        let cold = engine.open_sequence().await.expect("open");
        let mut exported = Vec::new();
        let mut pos = 0;
        while pos < tokens.len() {
            let end = (((pos / BLOCK) + 1) * BLOCK).min(tokens.len());
            engine
                .prefill(cold, tokens[pos..end].to_vec())
                .await
                .expect("prefill");
            let whole = end / BLOCK;
            if whole > exported.len() {
                let more = engine
                    .export_blocks(cold, exported.len(), whole - exported.len())
                    .await
                    .expect("a chunk's blocks export right after it");
                exported.extend(more);
            }
            pos = end;
        }
        let held = engine.kv_bytes(cold).await.expect("bytes") as u64;
        // The chunk just prefilled comes on top of the window (extra = one chunk).
        let charged = live.resident_bytes(len, BLOCK as u64);
        assert!(held <= charged, "{held} B held, {charged} B charged");
        assert!(
            held * 2 < every_block,
            "{held} B held vs {every_block} B for all blocks"
        );
        // The first block left every sliding window: it cannot be exported any more.
        assert!(engine.export_blocks(cold, 0, 1).await.is_err());
        engine.release(cold).await.expect("release");

        // Restored: the same bound.
        let warm = engine.open_sequence().await.expect("open");
        let blocks = common::warm::blocks_of(&engine, &tokens, exported, BLOCK);
        engine
            .plan_import(warm, blocks.len() * BLOCK)
            .await
            .expect("plan");
        engine.import_blocks(warm, blocks).await.expect("import");
        let held = engine.kv_bytes(warm).await.expect("bytes") as u64;
        let charged = live.resident_bytes(6 * BLOCK as u64, BLOCK as u64);
        assert!(
            held <= charged,
            "restored: {held} B held, {charged} B charged"
        );
        engine.release(warm).await.expect("release");
    });
}
