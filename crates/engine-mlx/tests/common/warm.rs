//! Restoring KV blocks in tests: chunk-aligned prefill, block export into `KvBlock`s, and a
//! bit-exact comparison of logits.

use agent_session::{BlockMeta, InferenceEngine, KvBlock, KvPayload, SequenceId, TokenId};
use block_pool::BlockHash;
use engine_mlx::MlxEngine;
use std::sync::Arc;

/// Prefills `tokens[from..]` in chunks that end at absolute multiples of `block`.
pub async fn prefill_aligned(
    engine: &MlxEngine,
    seq: SequenceId,
    tokens: &[TokenId],
    from: usize,
    block: usize,
) {
    let mut pos = from;
    while pos < tokens.len() {
        let end = (((pos / block) + 1) * block).min(tokens.len());
        engine
            .prefill(seq, tokens[pos..end].to_vec())
            .await
            .expect("prefill");
        pos = end;
    }
}

/// The exported payloads as chained blocks of `block` tokens each.
pub fn blocks_of(
    engine: &MlxEngine,
    tokens: &[TokenId],
    payloads: Vec<KvPayload>,
    block: usize,
) -> Vec<Arc<KvBlock>> {
    let fp = engine.model().fingerprint.clone();
    let mut parent: Option<BlockHash> = None;
    payloads
        .into_iter()
        .enumerate()
        .map(|(i, payload)| {
            let ids = tokens[i * block..(i + 1) * block].to_vec();
            let hash = BlockHash::chain(parent.as_ref(), &ids, &fp, "test");
            let meta = BlockMeta {
                hash,
                parent,
                token_ids: ids,
                model_fingerprint: fp.clone(),
            };
            parent = Some(hash);
            Arc::new(KvBlock { meta, payload })
        })
        .collect()
}

/// Whether two logit vectors are equal bit for bit (and equally long).
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Prefills `tokens` cold in block-aligned chunks, then for each `k` of `restored`: a fresh
/// sequence imports the cold run's first `k` blocks, prefills the rest the same way and must
/// give the cold run's last logits bit for bit and its next `next` greedy ids.
pub async fn assert_restores_equal_cold(
    engine: &MlxEngine,
    tokens: &[TokenId],
    restored: &[usize],
    block: usize,
    next: usize,
    label: &str,
) {
    let cold = engine.open_sequence().await.expect("open");
    let most = restored.iter().copied().max().unwrap_or(0);
    // Each chunk's blocks are exported right after it, as the service stores them: a
    // sliding-window layer drops the blocks its window passed at the next chunk.
    let mut exported = Vec::new();
    let mut pos = 0;
    while pos < tokens.len() {
        let end = (((pos / block) + 1) * block).min(tokens.len());
        engine
            .prefill(cold, tokens[pos..end].to_vec())
            .await
            .expect("prefill");
        let whole = (end / block).min(most);
        if whole > exported.len() {
            let first = exported.len();
            let more = engine
                .export_blocks(cold, first, whole - first)
                .await
                .expect("export");
            exported.extend(more);
        }
        pos = end;
    }
    let cold_logits = engine.debug_logits(cold).await.expect("logits");
    let cold_next = super::greedy_continue(engine, cold, next).await;
    engine.release(cold).await.expect("release");
    for &k in restored {
        let warm = engine.open_sequence().await.expect("open");
        let blocks = blocks_of(engine, tokens, exported[..k].to_vec(), block);
        engine.import_blocks(warm, blocks).await.expect("import");
        prefill_aligned(engine, warm, tokens, k * block, block).await;
        let logits = engine.debug_logits(warm).await.expect("logits");
        assert!(
            same_bits(&logits, &cold_logits),
            "{label}, {k} restored blocks: logits differ from the cold run"
        );
        let got = super::greedy_continue(engine, warm, next).await;
        assert_eq!(got, cold_next, "{label}, {k} restored blocks: continuation");
        engine.release(warm).await.expect("release");
    }
}
