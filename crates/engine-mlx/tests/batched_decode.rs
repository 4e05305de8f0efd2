//! A batched decode step never changes an answer: sequences stepped together (one forward
//! pass, weights read once) get bit-identical logits, step by step, to each sequence stepped
//! alone, with either attention kernel; and the two kernels agree closely.

mod common;

use agent_session::{InferenceEngine, SamplingParams, StepRequest};
use common::batch::{prompts, run, Trace};
use common::block_on;
use engine_mlx::{AttentionKind, EngineConfig};
use std::sync::Arc;

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
