//! A batched decode step never changes an answer: sequences stepped together (one forward
//! pass, weights read once) get bit-identical logits, step by step, to each sequence stepped
//! alone, with either attention kernel; and the two kernels agree closely.

mod common;

use agent_session::{InferenceEngine, SamplingParams, SequenceId, StepRequest, TokenId};
use common::block_on;
use engine_mlx::{AttentionKind, EngineConfig, MlxEngine};
use std::sync::Arc;

/// Per sequence, per step: the sampled token and the logits it was sampled from.
type Trace = Vec<Vec<(TokenId, Vec<f32>)>>;

/// Prompts of different lengths, so the sequences sit at different positions in a batch.
fn prompts(vocab: u32) -> Vec<Vec<TokenId>> {
    [37u32, 90, 5, 160]
        .iter()
        .enumerate()
        .map(|(j, &n)| {
            (0..n)
                .map(|i| (i * 7919 + 13 + j as u32 * 104_729) % vocab)
                .collect()
        })
        .collect()
}

/// Greedy tokens and the logits each step sampled from, for `seqs` stepped together.
async fn run(engine: &MlxEngine, seqs: &[SequenceId], steps: u32) -> Trace {
    let greedy = Arc::new(SamplingParams::greedy());
    let mut feeds: Vec<Option<TokenId>> = vec![None; seqs.len()];
    let mut out: Trace = vec![Vec::new(); seqs.len()];
    for step in 0..steps {
        // Sequence j joins at step j (and the first one leaves early): the batch changes.
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&j| step >= j as u32 && !(j == 0 && step >= steps - 2))
            .collect();
        let reqs = active
            .iter()
            .map(|&j| StepRequest {
                seq: seqs[j],
                feed: feeds[j],
                params: greedy.clone(),
                step,
                generated: Arc::from(Vec::new()),
            })
            .collect();
        let tokens = engine.step(reqs).await.expect("step");
        for (&j, t) in active.iter().zip(tokens) {
            let t = t.expect("token");
            let logits = engine.debug_logits(seqs[j]).await.expect("logits");
            out[j].push((t, logits));
            feeds[j] = Some(t);
        }
    }
    out
}

fn check(attention: AttentionKind) -> Option<Trace> {
    let (engine, _) = common::load(EngineConfig {
        attention,
        ..EngineConfig::default()
    })?;
    let vocab = engine.model().vocab_size as u32;
    Some(block_on(async {
        let steps = 10;
        let mut solo = Vec::new();
        for p in prompts(vocab) {
            let s = engine.open_sequence().await.expect("open");
            engine.prefill(s, p).await.expect("prefill");
            let mut r = run(&engine, &[s], steps).await;
            solo.push(r.remove(0));
            engine.release(s).await.expect("release");
        }
        let mut seqs = Vec::new();
        for p in prompts(vocab) {
            let s = engine.open_sequence().await.expect("open");
            engine.prefill(s, p).await.expect("prefill");
            seqs.push(s);
        }
        let together = run(&engine, &seqs, steps).await;
        for (j, (alone, batched)) in solo.iter().zip(&together).enumerate() {
            assert!(!batched.is_empty());
            for (k, ((ta, la), (tb, lb))) in alone.iter().zip(batched).enumerate() {
                assert_eq!(ta, tb, "{attention:?}: sequence {j}, token {k}");
                assert!(
                    la.iter().zip(lb).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{attention:?}: sequence {j}, step {k}: batched logits differ from solo \
                     (max diff {})",
                    common::max_abs_diff(la, lb)
                );
            }
        }
        solo
    }))
}

#[test]
fn batched_decode_equals_solo_bit_for_bit_with_both_kernels() {
    let Some(host) = check(AttentionKind::Host) else {
        return;
    };
    let Some(mlx) = check(AttentionKind::Mlx) else {
        return;
    };
    // The kernels round differently but agree to well within the golden tolerance.
    let mut worst = 0.0f32;
    for (h, m) in host.iter().zip(&mlx) {
        // The first step samples from the prefill's logits, where both are closest.
        for ((_, lh), (_, lm)) in h.iter().zip(m).take(1) {
            worst = worst.max(common::max_abs_diff(lh, lm));
        }
    }
    eprintln!("host vs MLX attention: max |logit diff| after the prefill = {worst:e}");
    assert!(worst < 1e-2, "host and MLX attention disagree by {worst}");
}

#[test]
fn a_sequence_named_twice_in_one_step_is_refused_for_its_second_entry() {
    let Some((engine, _)) = common::shared() else {
        return;
    };
    block_on(async {
        let vocab = engine.model().vocab_size as u32;
        let s = engine.open_sequence().await.expect("open");
        engine
            .prefill(s, prompts(vocab).remove(0))
            .await
            .expect("prefill");
        let greedy = Arc::new(SamplingParams::greedy());
        let req = |feed| StepRequest {
            seq: s,
            feed,
            params: greedy.clone(),
            step: 0,
            generated: Arc::from(Vec::new()),
        };
        let out = engine
            .step(vec![req(None), req(Some(5))])
            .await
            .expect("step");
        assert!(out[0].is_ok(), "{:?}", out[0]);
        assert!(out[1].is_err(), "{:?}", out[1]);
        // The refused entry fed nothing.
        assert_eq!(engine.sequence_len(s).await.expect("len"), 37);
        engine.release(s).await.expect("release");
    });
}
