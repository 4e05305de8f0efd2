//! Choosing the next token from a logits vector (on the CPU, in Rust).
//!
//! Order: repetition penalty (over the sequence's context), presence and frequency penalties
//! (over the tokens generated so far), then greedy argmax, or temperature → top-k → top-p →
//! min-p → a draw from the renormalised distribution. With a seed the draw is reproducible:
//! the generator is seeded from `(seed, step)` only.

use agent_session::{SamplingParams, TokenId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

/// Mixes a seed and a step into one 64-bit seed (SplitMix64 finaliser).
fn mix(seed: u64, step: u32) -> u64 {
    let mut z = seed ^ (u64::from(step).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Index of the largest finite value (lowest index on ties); 0 for an empty or all-NaN slice.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in values.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best
}

/// Applies the penalties of `params` to `logits` in place.
pub fn apply_penalties(
    logits: &mut [f32],
    params: &SamplingParams,
    context: &[TokenId],
    generated: &[TokenId],
) {
    let rp = params.repetition_penalty;
    if rp > 0.0 && rp != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &t in context.iter().chain(generated) {
            let i = t as usize;
            if i < logits.len() && !seen[i] {
                seen[i] = true;
                let l = logits[i];
                logits[i] = if l > 0.0 { l / rp } else { l * rp };
            }
        }
    }
    if params.presence_penalty != 0.0 || params.frequency_penalty != 0.0 {
        let mut counts: HashMap<TokenId, u32> = HashMap::new();
        for &t in generated {
            *counts.entry(t).or_default() += 1;
        }
        for (t, n) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= params.presence_penalty + params.frequency_penalty * n as f32;
            }
        }
    }
}

/// Chooses the next token.
///
/// `context` is every token of the sequence (for the repetition penalty), `generated` the
/// tokens generated in this request (presence / frequency), `step` the index of the token
/// being sampled (seeds the draw).
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    context: &[TokenId],
    generated: &[TokenId],
    step: u32,
) -> TokenId {
    let mut l = logits.to_vec();
    apply_penalties(&mut l, params, context, generated);
    if params.is_greedy() {
        return argmax(&l) as TokenId;
    }
    let t = params.temperature;
    // Candidates sorted by logit, best first (only the top k when top-k is on).
    let mut idx: Vec<usize> = (0..l.len()).filter(|&i| l[i].is_finite()).collect();
    if idx.is_empty() {
        return argmax(&l) as TokenId;
    }
    let by_logit = |a: &usize, b: &usize| l[*b].total_cmp(&l[*a]).then(a.cmp(b));
    let k = params.top_k as usize;
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_logit);
    let max = l[idx[0]];
    let mut probs: Vec<f64> = idx
        .iter()
        .map(|&i| f64::from((l[i] - max) / t).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    for p in &mut probs {
        *p /= sum;
    }
    let mut keep = probs.len();
    if params.top_p > 0.0 && params.top_p < 1.0 {
        let mut acc = 0.0;
        for (j, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= f64::from(params.top_p) {
                keep = j + 1;
                break;
            }
        }
    }
    if params.min_p > 0.0 {
        let floor = probs[0] * f64::from(params.min_p);
        keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
    }
    probs.truncate(keep);
    let total: f64 = probs.iter().sum();
    let mut rng = match params.seed {
        Some(seed) => StdRng::seed_from_u64(mix(seed, step)),
        None => StdRng::seed_from_u64(rand::rng().random()),
    };
    let mut r = rng.random::<f64>() * total;
    for (j, p) in probs.iter().enumerate() {
        if r < *p {
            return idx[j] as TokenId;
        }
        r -= p;
    }
    idx[keep - 1] as TokenId
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams::greedy()
    }

    #[test]
    fn greedy_is_argmax() {
        assert_eq!(sample(&[0.1, 3.0, 2.0], &params(), &[], &[], 0), 1);
    }

    #[test]
    fn repetition_penalty_demotes_context_tokens() {
        let mut p = params();
        p.repetition_penalty = 2.0;
        // 3.0 / 2 = 1.5 < 2.0
        assert_eq!(sample(&[0.1, 3.0, 2.0], &p, &[1], &[], 0), 2);
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let mut p = params();
        p.frequency_penalty = 0.6;
        assert_eq!(sample(&[0.0, 3.0, 2.0], &p, &[], &[1, 1], 0), 2);
        let mut p = params();
        p.presence_penalty = 0.5;
        assert_eq!(sample(&[0.0, 3.0, 2.8], &p, &[], &[1, 1], 0), 2);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varies_by_step() {
        let mut p = params();
        p.temperature = 1.0;
        p.seed = Some(42);
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.1).collect();
        let a: Vec<u32> = (0..20).map(|s| sample(&logits, &p, &[], &[], s)).collect();
        let b: Vec<u32> = (0..20).map(|s| sample(&logits, &p, &[], &[], s)).collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != a[0]));
    }

    #[test]
    fn top_k_one_and_filters_restrict_choices() {
        let mut p = params();
        p.temperature = 5.0;
        p.seed = Some(1);
        p.top_k = 2;
        let logits = [0.0, 5.0, 4.9, -1.0];
        for s in 0..50 {
            let t = sample(&logits, &p, &[], &[], s);
            assert!(t == 1 || t == 2);
        }
        p.top_k = 0;
        p.min_p = 0.99;
        for s in 0..20 {
            assert_eq!(sample(&logits, &p, &[], &[], s), 1);
        }
        p.min_p = 0.0;
        p.top_p = 0.01;
        for s in 0..20 {
            assert_eq!(sample(&logits, &p, &[], &[], s), 1);
        }
    }
}
