//! Token-level prefix matching and the alignment rules that keep warm output equal to cold.
//!
//! The rule (see docs/architecture.md, "warm equals cold"): KV is reused and persisted only
//! in whole *chunks* of `prefill_step` tokens (a multiple of the block size) starting at
//! position 0, prefill chunks start at absolute multiples of `prefill_step`, and KV produced
//! by decoding is never reused (the answer is re-prefilled with the next turn). Under these
//! rules every reused position was computed by exactly the forward pass a cold run performs.

use crate::TokenId;
use std::ops::Range;

/// Length of the longest common prefix of two token sequences.
pub fn common_prefix_len(a: &[TokenId], b: &[TokenId]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// How many leading prompt tokens may be taken from cache, given that `available` leading
/// tokens match cached KV: rounded down to a multiple of `step`, and always leaving at least
/// one prompt token to prefill (its logits pick the first answer token).
pub fn reusable_len(available: usize, prompt_len: usize, step: usize) -> usize {
    if step == 0 || prompt_len == 0 {
        return 0;
    }
    let cap = available.min(prompt_len - 1);
    cap - cap % step
}

/// How many leading prompt tokens end up as durable, reusable KV after a prefill of
/// `prompt_len` tokens: the whole chunks.
pub fn persistable_len(prompt_len: usize, step: usize) -> usize {
    if step == 0 {
        return 0;
    }
    prompt_len - prompt_len % step
}

/// The prefill chunks for positions `start..end`: each ends at the next absolute multiple of
/// `step` (or at `end`), so a warm run computes exactly the chunks a cold run computes.
pub fn prefill_chunks(start: usize, end: usize, step: usize) -> Vec<Range<usize>> {
    let mut chunks = Vec::new();
    if step == 0 {
        if start < end {
            chunks.push(start..end);
        }
        return chunks;
    }
    let mut pos = start;
    while pos < end {
        let next = ((pos / step) + 1) * step;
        let stop = next.min(end);
        chunks.push(pos..stop);
        pos = stop;
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        assert_eq!(common_prefix_len(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(reusable_len(600, 1000, 256), 512);
        assert_eq!(reusable_len(1000, 1000, 256), 768);
        assert_eq!(reusable_len(1024, 1024, 256), 768);
        assert_eq!(reusable_len(1025, 1025, 256), 1024);
        assert_eq!(persistable_len(1000, 256), 768);
        assert_eq!(
            prefill_chunks(0, 600, 256),
            vec![0..256, 256..512, 512..600]
        );
        assert_eq!(prefill_chunks(512, 600, 256), vec![512..600]);
        assert_eq!(prefill_chunks(300, 600, 256), vec![300..512, 512..600]);
    }

    proptest! {
        /// A conversation's own prefix always matches its full length.
        #[test]
        fn prefix_of_itself_matches_fully(v in proptest::collection::vec(0u32..50, 0..200), cut in 0usize..200) {
            let cut = cut.min(v.len());
            prop_assert_eq!(common_prefix_len(&v[..cut], &v), cut);
        }

        /// Divergence at token k reuses exactly the whole chunks before k (and never the last token).
        #[test]
        fn divergence_reuses_whole_chunks(len in 1usize..3000, k in 0usize..3000, step_blocks in 1usize..4) {
            let step = 64 * step_blocks;
            let k = k.min(len);
            let r = reusable_len(k, len, step);
            prop_assert_eq!(r % step, 0);
            prop_assert!(r <= k);
            prop_assert!(r < len);
            prop_assert!(k.min(len - 1) - r < step);
        }

        /// Chunks tile the range, never cross an absolute step boundary, and a warm run's
        /// chunks are exactly the cold run's chunks from the restored position on.
        #[test]
        fn chunks_are_aligned(start_chunks in 0usize..10, end in 0usize..5000, step_blocks in 1usize..4) {
            let step = 64 * step_blocks;
            let start = (start_chunks * step).min(end);
            let chunks = prefill_chunks(start, end, step);
            let mut pos = start;
            for c in &chunks {
                prop_assert_eq!(c.start, pos);
                prop_assert!(c.end > c.start);
                prop_assert_eq!((c.end - 1) / step, c.start / step);
                pos = c.end;
            }
            prop_assert_eq!(pos, end.max(start));
            if start % step == 0 {
                let cold = prefill_chunks(0, end, step);
                let tail: Vec<_> = cold.into_iter().filter(|c| c.start >= start).collect();
                prop_assert_eq!(tail, chunks);
            }
        }
    }
}
