//! The causal softmax of attention, computed on the host CPU.
//!
//! Why: on MLX's CPU backend `fast::scaled_dot_product_attention` has no fused kernel; its
//! fallback materializes the scores and masks and exponentiates them with MLX's element-wise
//! kernels, single-threaded at about 19 ns per `exp` and 6 ns per `where` (measured on the
//! 2-core Linux VM, MLX 0.32.2 `mlx-cpu`): a 256-token chunk at a depth of 2,048 tokens spent
//! ~180 ms per layer in attention, of which the two matmuls were ~38 ms. With
//! [`crate::AttentionKind::Host`] the model keeps both matmuls in MLX (BLAS) and runs only
//! the masked softmax here, on up to two threads. Every row is computed by the same code
//! whatever the batch or the thread split, so results never depend on them.

/// Layout of one sequence's attention scores: `[groups, rows, keys]` row-major, where row
/// `i` of a group holds query position `i % positions` (queries of one KV group are stacked
/// head after head, each head with `positions` consecutive positions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scores {
    /// Score rows in all (groups × heads per group × positions).
    pub rows: usize,
    /// Keys per row: the cached tokens plus the new ones.
    pub keys: usize,
    /// New query positions (tokens of the chunk).
    pub positions: usize,
    /// Tokens cached before the first new one; position `r` sees keys `0..=offset + r`.
    pub offset: usize,
    /// Sliding window: position `r` sees only the last `w` of those keys (itself included);
    /// `None`: all of them.
    pub window: Option<usize>,
}

impl Scores {
    /// Whether the shape is consistent and `len` elements hold it.
    pub fn fits(&self, len: usize) -> bool {
        self.positions > 0
            && self.rows.is_multiple_of(self.positions)
            && self.offset + self.positions == self.keys
            && self.rows.checked_mul(self.keys) == Some(len)
    }
}

/// `out = softmax(scale · scores)` per row over the keys the row may see; the other keys
/// get probability 0. `scores` and `out` have `shape.rows × shape.keys` elements (see
/// [`Scores::fits`]; mismatched lengths process only the common whole rows).
pub fn causal_softmax(shape: Scores, scale: f32, scores: &[f32], out: &mut [f32]) {
    let threads = if shape.rows * shape.keys < 1 << 18 {
        1
    } else {
        // Asked once: on Linux the answer reads cgroup files, too slow for every layer.
        static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(2)))
    };
    softmax_threads(shape, scale, scores, out, threads);
}

fn softmax_threads(shape: Scores, scale: f32, scores: &[f32], out: &mut [f32], threads: usize) {
    let keys = shape.keys.max(1);
    if threads <= 1 || shape.rows < 2 {
        rows_softmax(shape, scale, 0, scores, out);
        return;
    }
    let half = shape.rows / 2;
    let (s1, s2) = scores.split_at(half * keys);
    let (o1, o2) = out.split_at_mut((half * keys).min(out.len()));
    std::thread::scope(|scope| {
        scope.spawn(|| rows_softmax(shape, scale, half, s2, o2));
        rows_softmax(shape, scale, 0, s1, o1);
    });
}

/// Lanes of the explicit reductions below: wide enough for AVX (8 × f32), and a fixed
/// number, so the order of every sum (and with it the result) is the same on every CPU.
const LANES: usize = 8;

/// `e^x` for `x <= 0` (larger inputs are clamped at 88): Cephes' single-precision
/// polynomial after a Cody-Waite reduction, within 2 ulp of the exact value, written with
/// plain arithmetic and bit operations so that loops over it vectorize (libm's `expf` is a
/// call per element: it was half the time of the softmax).
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding 1.5 · 2^23 rounds to an integer (ties to even) in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let k = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let y = p * (r * r) + r + 1.0;
    y * f32::from_bits(((k + 127) as u32) << 23)
}

/// Rows `first..` of the scores (`scores`/`out` start at row `first`).
fn rows_softmax(shape: Scores, scale: f32, first: usize, scores: &[f32], out: &mut [f32]) {
    let keys = shape.keys.max(1);
    let positions = shape.positions.max(1);
    for (i, (s, o)) in scores
        .chunks_exact(keys)
        .zip(out.chunks_exact_mut(keys))
        .enumerate()
    {
        let visible = (shape.offset + (first + i) % positions + 1).min(keys);
        let start = shape.window.map_or(0, |w| visible.saturating_sub(w.max(1)));
        let (o, hidden) = o.split_at_mut(visible);
        let (before, o) = o.split_at_mut(start);
        before.fill(0.0);
        let s = &s[start..visible];
        // Max and sum over LANES interleaved partial results, then across them: explicit,
        // so the compiler may use vector registers without reordering anything.
        let mut maxes = [f32::NEG_INFINITY; LANES];
        let (body, tail) = s.split_at(s.len() / LANES * LANES);
        for c in body.chunks_exact(LANES) {
            for (m, &x) in maxes.iter_mut().zip(c) {
                *m = m.max(x * scale);
            }
        }
        let max = tail.iter().fold(
            maxes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)),
            |m, &x| m.max(x * scale),
        );
        for (dst, &x) in o.iter_mut().zip(s) {
            *dst = exp_approx(x * scale - max);
        }
        let mut sums = [0.0f32; LANES];
        let (body, tail) = o.split_at(o.len() / LANES * LANES);
        for c in body.chunks_exact(LANES) {
            for (acc, &e) in sums.iter_mut().zip(c) {
                *acc += e;
            }
        }
        let sum = tail.iter().fold(sums.iter().sum::<f32>(), |a, &e| a + e);
        let inv = 1.0 / sum;
        for dst in o.iter_mut() {
            *dst *= inv;
        }
        hidden.fill(0.0);
    }
}

/// `n` reproducible test values in `[-half_range, half_range)` from `seed` (tests of the host
/// kernels).
#[cfg(test)]
pub(crate) fn seeded(n: usize, seed: u32, half_range: f32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed);
            ((x >> 8) as f32 / (1u32 << 24) as f32) * (2.0 * half_range) - half_range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        seeded(n, seed, 8.0)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Matches an f64 reference with the causal mask (and a sliding window, when one
        /// is set), and the thread split never changes a bit.
        #[test]
        fn matches_reference_and_ignores_threads(
            groups in 1usize..7, positions in 1usize..40, offset in 0usize..300,
            seed in any::<u32>(), scale in 0.05f32..1.0,
            window in prop::option::of(1usize..64),
        ) {
            let shape = Scores { rows: groups * positions, keys: offset + positions, positions, offset, window };
            let scores = data(shape.rows * shape.keys, seed);
            prop_assert!(shape.fits(scores.len()));
            let mut one = vec![f32::NAN; scores.len()];
            let mut two = vec![f32::NAN; scores.len()];
            softmax_threads(shape, scale, &scores, &mut one, 1);
            softmax_threads(shape, scale, &scores, &mut two, 2);
            prop_assert_eq!(&one, &two);
            for (i, row) in one.chunks_exact(shape.keys).enumerate() {
                let visible = offset + i % positions + 1;
                let start = window.map_or(0, |w| visible.saturating_sub(w));
                let all = &scores[i * shape.keys..][..visible];
                let s = &all[start..];
                let m = s.iter().map(|&x| f64::from(x * scale)).fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|&x| (f64::from(x * scale) - m).exp()).sum();
                for (j, &p) in row.iter().enumerate() {
                    let want = if (start..visible).contains(&j) {
                        (f64::from(all[j] * scale) - m).exp() / z
                    } else {
                        0.0
                    };
                    prop_assert!((f64::from(p) - want).abs() < 1e-6, "row {} key {}: {} vs {}", i, j, p, want);
                }
            }
        }
    }

    #[test]
    fn exp_approx_is_within_two_ulp() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = f64::from(x).exp();
            let got = f64::from(exp_approx(x));
            let ulp = f64::from(f32::EPSILON) * want;
            assert!(
                (got - want).abs() <= 2.0 * ulp,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.001_37;
        }
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn inconsistent_shapes_are_refused() {
        let ok = Scores {
            rows: 6,
            keys: 5,
            positions: 3,
            offset: 2,
            window: None,
        };
        assert!(ok.fits(30));
        assert!(!ok.fits(29));
        assert!(!Scores { offset: 1, ..ok }.fits(30));
        assert!(!Scores { rows: 7, ..ok }.fits(35));
        assert!(!Scores { positions: 0, ..ok }.fits(30));
    }
}
