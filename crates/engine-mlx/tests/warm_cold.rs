//! Warm equals cold: exporting and importing KV blocks is bit-exact, and restoring the first
//! k blocks then prefilling the rest in the same block-aligned chunks gives bit-identical
//! logits and the same greedy continuation as a cold prefill.

mod common;

use agent_session::{
    ChatFormatter, InferenceEngine, KvBlock, KvEncoding, KvPayload, SequenceId, TensorDtype,
    TokenId,
};
use common::block_on;
use common::warm::same_bits;
use engine_mlx::{EngineConfig, MlxEngine};
use std::sync::Arc;

const BLOCK: usize = 64;

fn text_tokens(fmt: &dyn ChatFormatter, n: usize) -> Vec<TokenId> {
    let text = "The river wound through the valley, past orchards and old stone mills. \
                Every spring the water rose, and the villagers moved their boats higher up \
                the bank, telling stories of floods their grandparents had seen. ";
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(fmt.encode(text).expect("encode"));
    }
    ids.truncate(n);
    ids
}

/// Prefills `tokens[from..]` in chunks aligned to absolute block boundaries.
async fn prefill_aligned(engine: &MlxEngine, seq: SequenceId, tokens: &[TokenId], from: usize) {
    common::warm::prefill_aligned(engine, seq, tokens, from, BLOCK).await;
}

async fn greedy_continue(engine: &MlxEngine, seq: SequenceId, n: u32) -> Vec<TokenId> {
    common::greedy_continue(engine, seq, n as usize).await
}

fn blocks_of(
    engine: &MlxEngine,
    tokens: &[TokenId],
    payloads: Vec<KvPayload>,
) -> Vec<Arc<KvBlock>> {
    common::warm::blocks_of(engine, tokens, payloads, BLOCK)
}

/// `seq` holds every block of `exported` (imported somehow): its blocks export to the same
/// bytes, and prefilling the rest of `tokens` gives the cold run's logits bit for bit. Then
/// releases it.
async fn equals_cold(
    engine: &MlxEngine,
    seq: SequenceId,
    tokens: &[TokenId],
    exported: &[KvPayload],
    cold_logits: &[f32],
    what: &str,
) {
    let n = exported.len();
    let again = engine.export_blocks(seq, 0, n).await.expect("export");
    assert!(again == exported, "blocks after {what} differ");
    prefill_aligned(engine, seq, tokens, n * BLOCK).await;
    let logits = engine.debug_logits(seq).await.expect("logits");
    assert!(
        same_bits(&logits, cold_logits),
        "logits after {what} differ from the cold run"
    );
    engine.release(seq).await.expect("release");
}

fn config(kv_bits: Option<u8>) -> EngineConfig {
    EngineConfig {
        block_tokens: BLOCK as u32,
        kv_bits,
        ..EngineConfig::default()
    }
}

#[test]
fn restore_then_prefill_equals_cold_prefill() {
    let Some((engine, fmt)) = common::load(config(None)) else {
        return;
    };
    let n = 4 * BLOCK + 37;
    let tokens = text_tokens(fmt.as_ref(), n);
    block_on(async {
        // Cold.
        let cold = engine.open_sequence().await.expect("open");
        prefill_aligned(&engine, cold, &tokens, 0).await;
        let cold_logits = engine.debug_logits(cold).await.expect("logits");
        let exported = engine.export_blocks(cold, 0, 4).await.expect("export");
        for p in &exported {
            assert_eq!(
                p.encoding,
                KvEncoding::Float {
                    dtype: TensorDtype::F32
                }
            );
            assert_eq!(p.tensors.len(), 2 * 30);
            let k0 = &p.tensors[0];
            assert_eq!(k0.name, "l0.k");
            assert_eq!(k0.shape, vec![3, BLOCK, 64]);
            assert!(k0.is_consistent());
        }
        let cold_next = greedy_continue(&engine, cold, 8).await;
        let blocks = blocks_of(&engine, &tokens, exported.clone());

        for k in [1usize, 2, 4] {
            let warm = engine.open_sequence().await.expect("open");
            engine
                .import_blocks(warm, blocks[..k].to_vec())
                .await
                .expect("import");
            assert_eq!(engine.sequence_len(warm).await.expect("len"), k * BLOCK);
            // (a) Export of imported blocks gives the same bytes.
            let again = engine.export_blocks(warm, 0, k).await.expect("re-export");
            assert!(again == exported[..k], "k={k}: re-exported blocks differ");
            // (b) Same chunks after the restored prefix → bit-identical logits.
            prefill_aligned(&engine, warm, &tokens, k * BLOCK).await;
            let warm_logits = engine.debug_logits(warm).await.expect("logits");
            assert!(
                same_bits(&warm_logits, &cold_logits),
                "k={k}: logits differ from the cold run"
            );
            let warm_next = greedy_continue(&engine, warm, 8).await;
            assert_eq!(warm_next, cold_next, "k={k}: greedy continuation differs");
            // Blocks exported after the warm prefill equal the cold ones too.
            let all = engine.export_blocks(warm, 0, 4).await.expect("export");
            assert!(all == exported, "k={k}: KV after the warm prefill differs");
            engine.release(warm).await.expect("release");
        }

        // Importing in several calls, or after prefilled blocks, appends the same bytes (the
        // path that writes after the current end rather than building fresh buffers).
        let split = engine.open_sequence().await.expect("open");
        engine
            .import_blocks(split, blocks[..1].to_vec())
            .await
            .expect("import the first block");
        engine
            .import_blocks(split, blocks[1..].to_vec())
            .await
            .expect("import the rest");
        equals_cold(
            &engine,
            split,
            &tokens,
            &exported,
            &cold_logits,
            "a two-call import",
        )
        .await;
        // A restore announced in advance (plan_import: buffers sized once, here taken from
        // the pool of released sequences' buffers) and imported in parts, each decoded
        // straight into them: same bytes, same logits.
        let planned = engine.open_sequence().await.expect("open");
        engine
            .plan_import(planned, 4 * BLOCK)
            .await
            .expect("plan the import");
        for part in blocks.chunks(2) {
            engine
                .import_blocks(planned, part.to_vec())
                .await
                .expect("import a part");
        }
        let what = "a planned import in parts";
        equals_cold(&engine, planned, &tokens, &exported, &cold_logits, what).await;
        let mixed = engine.open_sequence().await.expect("open");
        prefill_aligned(&engine, mixed, &tokens[..BLOCK], 0).await;
        engine
            .import_blocks(mixed, blocks[1..3].to_vec())
            .await
            .expect("import after a prefill");
        let again = engine.export_blocks(mixed, 0, 3).await.expect("export");
        assert!(
            again == exported[..3],
            "blocks imported after a prefill differ"
        );
        engine.release(mixed).await.expect("release");

        // Truncate back to a block boundary and prefill again: same logits.
        engine.truncate(cold, 2 * BLOCK).await.expect("truncate");
        assert_eq!(engine.sequence_len(cold).await.expect("len"), 2 * BLOCK);
        prefill_aligned(&engine, cold, &tokens, 2 * BLOCK).await;
        let again = engine.debug_logits(cold).await.expect("logits");
        assert!(
            same_bits(&again, &cold_logits),
            "logits after a truncation differ"
        );

        // Misuse is reported, not a panic.
        assert!(
            engine.export_blocks(cold, 4, 1).await.is_err(),
            "partial block"
        );
        let odd = engine.open_sequence().await.expect("open");
        engine
            .prefill(odd, tokens[..5].to_vec())
            .await
            .expect("prefill");
        assert!(
            engine
                .import_blocks(odd, blocks[..1].to_vec())
                .await
                .is_err(),
            "unaligned"
        );
        let mut broken = (*blocks[0]).clone();
        broken.payload.tensors[3].shape = vec![3, BLOCK, 32];
        let fresh = engine.open_sequence().await.expect("open");
        assert!(engine
            .import_blocks(fresh, vec![Arc::new(broken)])
            .await
            .is_err());
        assert_eq!(engine.sequence_len(fresh).await.expect("len"), 0);
        assert!(
            engine.prefill(fresh, vec![999_999]).await.is_err(),
            "token outside vocab"
        );
        assert!(engine.sequence_len(SequenceId(9_999)).await.is_err());
    });
}

/// How a quantized restore changes the next-token distributions, against the same sequence
/// computed cold (float KV), over `steps` tokens fed one at a time after `blocks` restored
/// blocks: mean KL(cold ‖ warm) in nats, the largest absolute logit change, and how many
/// argmaxes agree.
async fn quantized_restore_quality(
    engine: &MlxEngine,
    tokens: &[TokenId],
    blocks: usize,
    steps: usize,
) -> (f64, f32, usize) {
    let prefix = blocks * BLOCK;
    let cold = engine.open_sequence().await.expect("open");
    prefill_aligned(engine, cold, &tokens[..prefix], 0).await;
    let exported = engine.export_blocks(cold, 0, blocks).await.expect("export");
    let warm = engine.open_sequence().await.expect("open");
    engine
        .import_blocks(warm, blocks_of(engine, tokens, exported))
        .await
        .expect("import");
    let log_softmax = |l: &[f32]| -> Vec<f64> {
        let max = f64::from(l.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let lse = max
            + l.iter()
                .map(|&x| (f64::from(x) - max).exp())
                .sum::<f64>()
                .ln();
        l.iter().map(|&x| f64::from(x) - lse).collect()
    };
    let am = |v: &[f32]| engine_mlx::sampling::argmax(v);
    let (mut kl, mut worst, mut agree) = (0.0f64, 0.0f32, 0usize);
    for &t in &tokens[prefix..prefix + steps] {
        engine.prefill(cold, vec![t]).await.expect("prefill");
        engine.prefill(warm, vec![t]).await.expect("prefill");
        let c = engine.debug_logits(cold).await.expect("logits");
        let w = engine.debug_logits(warm).await.expect("logits");
        let (lc, lw) = (log_softmax(&c), log_softmax(&w));
        kl += lc
            .iter()
            .zip(&lw)
            .map(|(&p, &q)| p.exp() * (p - q))
            .sum::<f64>();
        worst = worst.max(common::max_abs_diff(&c, &w));
        agree += usize::from(am(&c) == am(&w));
    }
    engine.release(cold).await.expect("release");
    engine.release(warm).await.expect("release");
    (kl / steps as f64, worst, agree)
}

/// Steps scored by the quantized-KV tests (after 3 restored blocks of 64 tokens).
const QUALITY_STEPS: usize = 32;

#[test]
fn quantized_kv_8_bit_stays_within_the_documented_error() {
    let Some((engine, fmt)) = common::load(config(Some(8))) else {
        return;
    };
    let tokens = text_tokens(fmt.as_ref(), 3 * BLOCK + QUALITY_STEPS);
    block_on(async {
        // The payload's shape: packed u32 values, f16 scales and biases, 3.8x smaller.
        let cold = engine.open_sequence().await.expect("open");
        prefill_aligned(&engine, cold, &tokens[..BLOCK], 0).await;
        let exported = engine.export_blocks(cold, 0, 1).await.expect("export");
        engine.release(cold).await.expect("release");
        let p = &exported[0];
        assert_eq!(
            p.encoding,
            KvEncoding::Quantized {
                bits: 8,
                group_size: 64
            }
        );
        let names: Vec<&str> = p.tensors.iter().take(3).map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["l0.k", "l0.k.scales", "l0.k.biases"]);
        assert_eq!(p.tensors[0].dtype, TensorDtype::U32);
        assert_eq!(p.tensors[0].shape, vec![3, BLOCK, 16]);
        assert_eq!(p.tensors[1].dtype, TensorDtype::F16);
        let float_bytes = 2 * 30 * 3 * BLOCK * 64 * 4;
        assert!(p.byte_len() * 3 < float_bytes, "8-bit blocks are smaller");

        // The bounds documented in docs/models.md ("KV quantization quality").
        let (kl, worst, agree) =
            quantized_restore_quality(&engine, &tokens, 3, QUALITY_STEPS).await;
        eprintln!(
            "8-bit KV: mean KL {kl:.3e}, max |Δlogit| {worst:.3}, top-1 {agree}/{QUALITY_STEPS}"
        );
        assert!(kl < 1e-4, "8-bit KV: mean KL {kl:e} nats");
        assert!(worst < 0.5, "8-bit KV changed a logit by {worst}");
        assert!(
            agree >= QUALITY_STEPS - 1,
            "8-bit KV: top-1 agreed {agree}/{QUALITY_STEPS}"
        );
    });
}

#[test]
fn quantized_kv_4_bit_stays_within_the_documented_error() {
    let Some((engine, fmt)) = common::load(config(Some(4))) else {
        return;
    };
    let tokens = text_tokens(fmt.as_ref(), 3 * BLOCK + QUALITY_STEPS);
    block_on(async {
        let (kl, worst, agree) =
            quantized_restore_quality(&engine, &tokens, 3, QUALITY_STEPS).await;
        eprintln!(
            "4-bit KV: mean KL {kl:.3e}, max |Δlogit| {worst:.3}, top-1 {agree}/{QUALITY_STEPS}"
        );
        assert!(kl < 2e-2, "4-bit KV: mean KL {kl:e} nats");
        assert!(worst < 5.0, "4-bit KV changed a logit by {worst}");
        assert!(
            agree >= QUALITY_STEPS * 7 / 8,
            "4-bit KV: top-1 agreed {agree}/{QUALITY_STEPS}"
        );
    });
}
