//! Stepping sequences in tests: greedy decode steps of several sequences at once (joining
//! and leaving the batch), with the logits each token was sampled from.

use agent_session::{InferenceEngine, SamplingParams, SequenceId, StepRequest, TokenId};
use engine_mlx::MlxEngine;
use std::sync::Arc;

/// Per sequence, per step: the sampled token and the logits it was sampled from.
pub type Trace = Vec<Vec<(TokenId, Vec<f32>)>>;

/// Prompts of different lengths, so the sequences sit at different positions in a batch.
pub fn prompts(vocab: u32) -> Vec<Vec<TokenId>> {
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
pub async fn run(engine: &MlxEngine, seqs: &[SequenceId], steps: u32) -> Trace {
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
