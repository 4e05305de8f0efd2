//! The whole-step host decode path ([`DecodeKernel::Host`]) against the MLX decode path
//! ([`DecodeKernel::Mlx`], equal to a one-token forward pass) and the previous host path
//! ([`DecodeKernel::HostLinears`]): the same tokens fed give logits and decoded KV (exported
//! after the steps crossed block boundaries and grew the buffers) within a small tolerance.
//! Run on the golden 4-bit Llama fixture and, when present, the default model.

mod common;

use agent_session::{InferenceEngine, KvPayload, SamplingParams, StepRequest, TokenId};
use common::block_on;
use engine_mlx::{DecodeKernel, EngineConfig, MlxEngine};
use std::path::PathBuf;
use std::sync::Arc;

const BLOCK: usize = 64;

struct Trace {
    tokens: Vec<TokenId>,
    logits: Vec<Vec<f32>>,
    kv: Vec<KvPayload>,
}

/// Prefills `prompt`, then steps `steps` times feeding `feeds` (or the greedy token), and
/// exports the complete blocks.
fn run(engine: &MlxEngine, prompt: &[TokenId], steps: usize, feeds: Option<&[TokenId]>) -> Trace {
    block_on(async {
        let seq = engine.open_sequence().await.expect("open");
        engine.prefill(seq, prompt.to_vec()).await.expect("prefill");
        let greedy = Arc::new(SamplingParams::greedy());
        let (mut tokens, mut logits) = (Vec::new(), Vec::new());
        let mut feed = None;
        for step in 0..steps {
            let out = engine
                .step(vec![StepRequest {
                    seq,
                    feed,
                    params: greedy.clone(),
                    step: step as u32,
                    generated: Arc::from(Vec::new()),
                }])
                .await
                .expect("step");
            let t = out.into_iter().next().expect("one").expect("token");
            tokens.push(t);
            logits.push(engine.debug_logits(seq).await.expect("logits"));
            feed = Some(feeds.map_or(t, |f| f[step]));
        }
        let len = engine.sequence_len(seq).await.expect("len");
        let kv = engine
            .export_blocks(seq, 0, len / BLOCK)
            .await
            .expect("export after decode");
        engine.release(seq).await.expect("release");
        Trace { tokens, logits, kv }
    })
}

fn floats(p: &KvPayload) -> Vec<f32> {
    p.tensors
        .iter()
        .flat_map(|t| {
            t.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        })
        .collect()
}

/// Loads `path` with each kernel and compares the host step to the others.
fn compare(path: &str, prompt: &[TokenId], steps: usize, logit_tol: f32, kv_tol: f32) {
    let load = |decode_kernel| {
        MlxEngine::load(
            path,
            EngineConfig {
                block_tokens: BLOCK as u32,
                decode_kernel,
                ..EngineConfig::default()
            },
        )
        .expect("load")
        .0
    };
    let reference = run(&load(DecodeKernel::Mlx), prompt, steps, None);
    for other in [DecodeKernel::Host, DecodeKernel::HostLinears] {
        let got = run(&load(other), prompt, steps, Some(&reference.tokens));
        let mut worst = 0f32;
        for (s, (a, b)) in got.logits.iter().zip(&reference.logits).enumerate() {
            let d = common::max_abs_diff(a, b);
            worst = worst.max(d);
            assert!(
                d <= logit_tol,
                "{path} {other:?}: step {s}: logits differ by {d}"
            );
        }
        let same = got
            .tokens
            .iter()
            .zip(&reference.tokens)
            .filter(|(a, b)| a == b)
            .count();
        assert!(
            same + 1 >= steps,
            "{path} {other:?}: {same} of {steps} greedy tokens agree"
        );
        assert_eq!(got.kv.len(), reference.kv.len(), "{path}: exported blocks");
        let mut kv_worst = 0f32;
        for (a, b) in got.kv.iter().zip(&reference.kv) {
            kv_worst = kv_worst.max(common::max_abs_diff(&floats(a), &floats(b)));
        }
        eprintln!(
            "{path} {other:?} vs Mlx: logits within {worst:e}, decoded KV within {kv_worst:e}, \
             {same}/{steps} tokens"
        );
        assert!(
            kv_worst <= kv_tol,
            "{path} {other:?}: KV differs by {kv_worst}"
        );
    }
}

#[test]
fn tiny_quantized_llama_matches_mlx_decode() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/llama_q4");
    let prompt: Vec<TokenId> = (0..13).map(|i| (i * 37 + 5) % 128).collect();
    // 13 + 120 tokens: a block filled by decode steps alone, the buffers grown twice by them.
    compare(dir.to_str().expect("utf-8"), &prompt, 120, 2e-4, 2e-4);
}

#[test]
fn default_model_matches_mlx_decode() {
    let Some(path) = common::model_path() else {
        return;
    };
    let prompt: Vec<TokenId> = (0..45).map(|i| (i * 7919 + 13) % 49_152).collect();
    compare(path.to_str().expect("utf-8"), &prompt, 90, 2e-3, 1e-3);
}
