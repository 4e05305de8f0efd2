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
