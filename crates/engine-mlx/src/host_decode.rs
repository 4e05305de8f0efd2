//! The pieces of a decode step that run between the linear layers, on the host CPU:
//! RMSNorm, RoPE, one new token's attention over its sequence's cached K/V, SwiGLU.
//!
//! Why: with [`crate::host_linear`] doing the products, what was left on MLX (a dozen small
//! ops per layer and an evaluation before every host product, ~150 a token) took more time
//! than the products themselves. These functions work on plain slices, so a whole decode
//! step stays on the host from the embedding to the logits; only the KV buffers are MLX
//! arrays, written in place ([`crate::kv::SequenceKv::host_layer_mut`]).
//!
//! Determinism: every value is computed by the same sequence of operations whatever the
//! batch, the row's position in it or the thread that runs it (reductions over fixed lanes
//! in a fixed order), so a batched step gives each sequence the bits it gets alone.

use crate::config::Activation;
use crate::host_attention::{self, exp_approx, Scores};

/// Lanes of the explicit reductions (as in [`crate::host_attention`]).
const LANES: usize = 8;

/// `Σ a_i b_i` over fixed lanes, then across them in order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let n = a.len().min(b.len()) / LANES * LANES;
    for (ca, cb) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    let tail = a[n..]
        .iter()
        .zip(&b[n..])
        .fold(0.0f32, |s, (&x, &y)| s + x * y);
    acc.iter().sum::<f32>() + tail
}

/// `out = x / sqrt(mean(x²) + eps) · w` for each row of `x` (`w.len()` values a row).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len().max(1);
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ss = dot(xr, xr);
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    }
}

/// In-place [`rms_norm`] of each row (q/k norms of Qwen3, per head).
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len().max(1);
    for xr in x.chunks_exact_mut(d) {
        let ss = dot(xr, xr);
        let inv = 1.0 / (ss / d as f32 + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v * inv * g;
        }
    }
}

/// Rotary position embedding of one model, as MLX's `fast::rope` applies it.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Dimensions rotated per head (the first `dims` of each head).
    dims: usize,
    /// Rotated pairs: `(2i, 2i + 1)` when true (GGUF Llama), `(i, i + dims / 2)` otherwise.
    traditional: bool,
    /// Angle per position of each pair, `scale / period_i`.
    inv_freqs: Vec<f64>,
    /// Factor on the rotated dims (LongRoPE's attention factor; 1 for plain RoPE), folded
    /// into the cosines and sines of [`Rope::table`].
    gain: f64,
}

impl Rope {
    /// RoPE over `dims` dimensions with pair `i` turning by `scale / periods[i]` radians a
    /// position (`periods[i] = base^(2i / dims)` unless scaled).
    pub fn new(dims: usize, traditional: bool, periods: &[f32], scale: f32) -> Self {
        let inv_freqs = periods
            .iter()
            .take(dims / 2)
            .map(|&p| f64::from(scale) / f64::from(p))
            .collect();
        Rope {
            dims,
            traditional,
            inv_freqs,
            gain: 1.0,
        }
    }

    /// The same rotation with the rotated dims also multiplied by `gain`.
    pub fn with_gain(mut self, gain: f32) -> Self {
        self.gain = f64::from(gain);
        self
    }

    /// The periods `base^(2i / dims)` of plain RoPE.
    pub fn periods(base: f32, dims: usize) -> Vec<f32> {
        (0..dims / 2)
            .map(|i| base.powf((2 * i) as f32 / dims as f32))
            .collect()
    }

    /// Cosines and sines of position `pos`, `dims / 2` each (computed once a step per
    /// sequence, used by every layer).
    pub fn table(&self, pos: usize) -> (Vec<f32>, Vec<f32>) {
        self.inv_freqs
            .iter()
            .map(|&f| {
                let t = pos as f64 * f;
                ((t.cos() * self.gain) as f32, (t.sin() * self.gain) as f32)
            })
            .unzip()
    }

    /// Rotates every head (`head_dim` values each) of `x` by the angles of `cos`/`sin`.
    pub fn apply(&self, x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
        let half = self.dims / 2;
        for head in x.chunks_exact_mut(head_dim.max(1)) {
            if self.traditional {
                for (pair, (&c, &s)) in head[..2 * half]
                    .chunks_exact_mut(2)
                    .zip(cos.iter().zip(sin))
                {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c - b * s;
                    pair[1] = a * s + b * c;
                }
            } else {
                let (lo, hi) = head[..2 * half].split_at_mut(half);
                for ((a, b), (&c, &s)) in lo.iter_mut().zip(hi).zip(cos.iter().zip(sin)) {
                    let (x1, x2) = (*a, *b);
                    *a = x1 * c - x2 * s;
                    *b = x1 * s + x2 * c;
                }
            }
        }
    }
}

/// Shape of one sequence's attention in a decode step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// KV heads (each shared by `heads / kv_heads` query heads).
    pub kv_heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
    /// Token capacity of the K/V buffers (`[kv_heads, capacity, head_dim]`).
    pub capacity: usize,
    /// Sliding window: the token attends only to the last `w` positions (itself
    /// included); `None`: to all of them.
    pub window: Option<usize>,
}

/// Below this many multiply-adds (`heads × keys × head_dim`) one token's attention runs on
/// the calling thread alone.
const PARALLEL_MIN_MACS: usize = 1 << 16;

/// One new token of one sequence: writes its `k`/`v` (`[kv_heads, head_dim]`) at position
/// `pos` of `keys`/`values` (`[kv_heads, capacity, head_dim]`), then attends its queries `q`
/// (`[heads, head_dim]`, after RoPE) to positions `0..=pos` with `softmax(scale · q·k)`, and
/// writes `[heads, head_dim]` into `out`. `scores` is scratch space, reused between calls.
/// Deep enough, the KV heads are split over the host kernel's thread pool; each is computed
/// by the same code whatever the split.
#[allow(clippy::too_many_arguments)]
pub fn attend_one(
    shape: AttentionShape,
    pos: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    keys: &mut [f32],
    values: &mut [f32],
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim: hd,
        capacity,
        window,
    } = shape;
    // The first key the token sees.
    let start = window.map_or(0, |w| (pos + 1).saturating_sub(w.max(1)));
    let kv_heads = kv_heads.max(1);
    let chunk = crate::fused_attention::Chunk {
        heads,
        kv_heads,
        head_dim: hd,
        positions: 1,
        offset: pos,
        capacity,
    };
    if start == 0
        && chunk.supported()
        && chunk.fits(q.len(), keys.len(), out.len())
        && pos < capacity
    {
        // The prefill's fused kernel: each KV head's keys and values are read once for the
        // whole group of query heads.
        let per_kv = capacity * hd;
        for ((kd, vd), (kn, vn)) in keys
            .chunks_exact_mut(per_kv)
            .zip(values.chunks_exact_mut(per_kv))
            .zip(k.chunks_exact(hd).zip(v.chunks_exact(hd)))
        {
            kd[pos * hd..][..hd].copy_from_slice(kn);
            vd[pos * hd..][..hd].copy_from_slice(vn);
        }
        if crate::fused_attention::causal_attention(chunk, scale, q, keys, values, out) {
            return;
        }
    }
    let group = heads / kv_heads;
    let per_kv = (capacity * hd).max(1);
    let (qg, og) = ((group * hd).max(1), (group * hd).max(1));
    let heads_iter = keys
        .chunks_exact_mut(per_kv)
        .zip(values.chunks_exact_mut(per_kv))
        .zip(k.chunks_exact(hd.max(1)).zip(v.chunks_exact(hd.max(1))))
        .zip(q.chunks_exact(qg).zip(out.chunks_exact_mut(og)))
        .take(kv_heads)
        .map(|(((keys, values), (k, v)), (qs, os))| (HeadKv { keys, values, k, v }, qs, os));
    let pool = crate::host_linear::helper_pool();
    match pool {
        Some(pool) if kv_heads > 1 && heads * (pos + 1) * hd >= PARALLEL_MIN_MACS => {
            pool.in_place_scope(|s| {
                let mut all: Vec<_> = heads_iter.collect();
                // The caller takes the first half of the heads, a helper the rest.
                let rest = all.split_off(kv_heads.div_ceil(2));
                s.spawn(move |_| {
                    let mut scratch = Vec::new();
                    for (head, qs, os) in rest {
                        attend_head(hd, group, pos, start, qs, head, scale, os, &mut scratch);
                    }
                });
                for (head, qs, os) in all {
                    attend_head(hd, group, pos, start, qs, head, scale, os, scores);
                }
            });
        }
        _ => {
            for (head, qs, os) in heads_iter {
                attend_head(hd, group, pos, start, qs, head, scale, os, scores);
            }
        }
    }
}

/// One KV head's buffers (`[capacity, hd]` rows) and the new token's key and value.
struct HeadKv<'a> {
    keys: &'a mut [f32],
    values: &'a mut [f32],
    k: &'a [f32],
    v: &'a [f32],
}

/// [`attend_one`] for one KV head and the `group` query heads that share it, over keys
/// `start..=pos`: `q`/`out` are the group's `[group, hd]`.
#[allow(clippy::too_many_arguments)]
fn attend_head(
    hd: usize,
    group: usize,
    pos: usize,
    start: usize,
    q: &[f32],
    head: HeadKv<'_>,
    scale: f32,
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let HeadKv { keys, values, k, v } = head;
    let start = start.min(pos);
    let n = pos + 1 - start;
    keys[pos * hd..][..hd].copy_from_slice(&k[..hd]);
    values[pos * hd..][..hd].copy_from_slice(&v[..hd]);
    let ks = &keys[start * hd..(pos + 1) * hd];
    let vs = &values[start * hd..(pos + 1) * hd];
    // Scores of the group's heads, [group, n], then their probabilities.
    scores.clear();
    scores.resize(2 * group * n, 0.0);
    let (sc, p) = scores.split_at_mut(group * n);
    for (g, row) in sc.chunks_exact_mut(n).enumerate() {
        let qh = &q[g * hd..][..hd];
        for (s, kr) in row.iter_mut().zip(ks.chunks_exact(hd)) {
            *s = dot(qh, kr);
        }
    }
    host_attention::causal_softmax(
        Scores {
            rows: group,
            keys: n,
            positions: 1,
            offset: n - 1,
            window: None,
        },
        scale,
        sc,
        p,
    );
    for (oh, pr) in out.chunks_exact_mut(hd).zip(p.chunks_exact(n)) {
        oh.fill(0.0);
        for (&pj, vr) in pr.iter().zip(vs.chunks_exact(hd)) {
            for (acc, &x) in oh.iter_mut().zip(vr) {
                *acc += pj * x;
            }
        }
    }
}

/// `out = act(gate) · up` per row of `gu` (`[rows, 2 × inter]`, gate then up), `out`
/// `[rows, inter]`.
pub fn gated(gu: &[f32], inter: usize, activation: Activation, out: &mut [f32]) {
    match activation {
        Activation::Silu => swiglu(gu, inter, out),
        Activation::GeluTanh => geglu(gu, inter, out),
    }
}

/// `out = gelu_tanh(gate) · up` (see [`gated`]), with
/// `gelu_tanh(x) = x / 2 · (1 + tanh(sqrt(2/π) · (x + 0.044715 x³)))` and
/// `tanh(y) = 1 - 2 / (e^{2y} + 1)`.
pub fn geglu(gu: &[f32], inter: usize, out: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2 / π)
    let inter = inter.max(1);
    for (row, o) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        let (g, u) = row.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            let y = C * (g + 0.044_715 * g * g * g);
            // tanh through e^{-2|y|} (≤ 1, where the exponential is accurate), sign restored.
            let e = exp_approx(-2.0 * y.abs());
            let t = ((1.0 - e) / (1.0 + e)).copysign(y);
            *o = 0.5 * g * (1.0 + t) * u;
        }
    }
}

/// `out = silu(gate) · up` per row of `gu` (`[rows, 2 × inter]`, gate then up), `out`
/// `[rows, inter]`.
pub fn swiglu(gu: &[f32], inter: usize, out: &mut [f32]) {
    let inter = inter.max(1);
    for (row, o) in gu.chunks_exact(2 * inter).zip(out.chunks_exact_mut(inter)) {
        let (g, u) = row.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp_approx(-g)) * u;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        crate::host_attention::seeded(n, seed, 2.0)
    }

    #[test]
    fn rms_norm_matches_f64() {
        let x = data(3 * 40, 7);
        let w = data(40, 9);
        let mut out = vec![0.0; x.len()];
        rms_norm(&x, &w, 1e-5, &mut out);
        let mut again = x.clone();
        rms_norm_in_place(&mut again, &w, 1e-5);
        assert_eq!(out, again);
        for (xr, or) in x.chunks_exact(40).zip(out.chunks_exact(40)) {
            let ms: f64 = xr.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / 40.0;
            let inv = 1.0 / (ms + 1e-5).sqrt();
            for ((&v, &g), &o) in xr.iter().zip(&w).zip(or) {
                let want = f64::from(v) * inv * f64::from(g);
                assert!((f64::from(o) - want).abs() < 1e-5, "{o} vs {want}");
            }
        }
    }

    #[test]
    fn geglu_matches_f64() {
        let gu = data(2 * 2 * 100, 5)
            .iter()
            .map(|v| v * 6.0)
            .collect::<Vec<_>>();
        let mut out = vec![0.0; 200];
        gated(&gu, 100, Activation::GeluTanh, &mut out);
        for (row, o) in gu.chunks_exact(200).zip(out.chunks_exact(100)) {
            for i in 0..100 {
                let (g, u) = (f64::from(row[i]), f64::from(row[100 + i]));
                let c = (2.0 / std::f64::consts::PI).sqrt();
                let want = 0.5 * g * (1.0 + (c * (g + 0.044715 * g.powi(3))).tanh()) * u;
                assert!(
                    (f64::from(o[i]) - want).abs() <= 2e-6 * want.abs().max(1.0),
                    "{} vs {want}",
                    o[i]
                );
            }
        }
    }

    #[test]
    fn swiglu_matches_f64() {
        let gu = data(2 * 2 * 100, 3)
            .iter()
            .map(|v| v * 20.0)
            .collect::<Vec<_>>();
        let mut out = vec![0.0; 200];
        swiglu(&gu, 100, &mut out);
        for (row, o) in gu.chunks_exact(200).zip(out.chunks_exact(100)) {
            for i in 0..100 {
                let (g, u) = (f64::from(row[i]), f64::from(row[100 + i]));
                let want = g / (1.0 + (-g).exp()) * u;
                assert!(
                    (f64::from(o[i]) - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{} vs {want}",
                    o[i]
                );
            }
        }
    }

    /// f64 RoPE reference (MLX's definition) with the given f32 periods.
    fn rope_ref(
        x: &[f32],
        hd: usize,
        dims: usize,
        trad: bool,
        periods: &[f32],
        scale: f64,
        pos: usize,
    ) -> Vec<f64> {
        let mut out: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
        let half = dims / 2;
        for head in out.chunks_exact_mut(hd) {
            for (i, &p) in periods.iter().enumerate().take(half) {
                let t = pos as f64 * scale / f64::from(p);
                let (a, b) = if trad {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (x1, x2) = (head[a], head[b]);
                head[a] = x1 * t.cos() - x2 * t.sin();
                head[b] = x1 * t.sin() + x2 * t.cos();
            }
        }
        out
    }

    /// A head size without a fused kernel (24), deep enough to split the KV heads over the
    /// pool: the same bits as each head alone.
    /// LongRoPE's gain multiplies the rotated dims (12 of 16 here) and leaves the rest.
    #[test]
    fn rope_gain_scales_only_rotated_dims() {
        let (hd, dims, gain) = (16, 12, 1.224_744_9f32);
        let periods = Rope::periods(10_000.0, dims);
        let x = data(hd * 2, 7);
        for pos in [0, 1, 23, 4000] {
            let plain = Rope::new(dims, false, &periods, 1.0);
            let gained = Rope::new(dims, false, &periods, 1.0).with_gain(gain);
            let (mut a, mut b) = (x.clone(), x.clone());
            let (c, s) = plain.table(pos);
            plain.apply(&mut a, hd, &c, &s);
            let (c, s) = gained.table(pos);
            gained.apply(&mut b, hd, &c, &s);
            for (i, (&p, &g)) in a.iter().zip(&b).enumerate() {
                let want = if i % hd < dims { p * gain } else { p };
                assert!(
                    (g - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{pos} {i}: {g} vs {want}"
                );
            }
        }
    }

    #[test]
    fn split_attention_equals_serial_heads() {
        let (kv_heads, group, hd, capacity, pos) = (3, 3, 24, 1088, 1000);
        let heads = kv_heads * group;
        assert!(heads * (pos + 1) * hd >= PARALLEL_MIN_MACS);
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim: hd,
            capacity,
            window: None,
        };
        let keys0 = data(kv_heads * capacity * hd, 11);
        let values0 = data(kv_heads * capacity * hd, 12);
        let (q, k, v) = (
            data(heads * hd, 13),
            data(kv_heads * hd, 14),
            data(kv_heads * hd, 15),
        );
        let (mut keys, mut values) = (keys0.clone(), values0.clone());
        let mut out = vec![f32::NAN; heads * hd];
        attend_one(
            shape,
            pos,
            &q,
            &k,
            &v,
            &mut keys,
            &mut values,
            0.125,
            &mut out,
            &mut Vec::new(),
        );
        let (mut keys2, mut values2) = (keys0, values0);
        let mut serial = vec![f32::NAN; heads * hd];
        let per = capacity * hd;
        for h in 0..kv_heads {
            let head = HeadKv {
                keys: &mut keys2[h * per..][..per],
                values: &mut values2[h * per..][..per],
                k: &k[h * hd..][..hd],
                v: &v[h * hd..][..hd],
            };
            attend_head(
                hd,
                group,
                pos,
                0,
                &q[h * group * hd..][..group * hd],
                head,
                0.125,
                &mut serial[h * group * hd..][..group * hd],
                &mut Vec::new(),
            );
        }
        assert_eq!(out, serial);
        assert_eq!(keys, keys2);
        assert_eq!(values, values2);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn rope_matches_reference(trad in any::<bool>(), partial in any::<bool>(), pos in 0usize..5000, seed in any::<u32>()) {
            let (hd, heads) = (16, 3);
            let dims = if partial { 8 } else { hd };
            let x = data(hd * heads, seed);
            let periods = Rope::periods(10_000.0, dims);
            for (i, &p) in periods.iter().enumerate() {
                let exact = 10_000f64.powf((2 * i) as f64 / dims as f64);
                prop_assert!((f64::from(p) / exact - 1.0).abs() < 1e-6, "period {}", i);
            }
            let rope = Rope::new(dims, trad, &periods, 0.5);
            let (c, s) = rope.table(pos);
            let mut y = x.clone();
            rope.apply(&mut y, hd, &c, &s);
            let want = rope_ref(&x, hd, dims, trad, &periods, 0.5, pos);
            for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
                prop_assert!((f64::from(a) - b).abs() < 1e-5, "{} {} vs {}", i, a, b);
            }
        }

        /// Attention of one token matches an f64 reference over the same K/V, and the new
        /// K/V land at `pos`.
        #[test]
        fn attention_matches_reference(pos in 0usize..70, kv_heads in 1usize..4, group in 1usize..4, seed in any::<u32>(), fused in any::<bool>(), window in prop::option::of(1usize..40)) {
            // 16: the fused kernel; 24: the per-head path for head sizes it has no kernel for.
            let (hd, capacity) = (if fused { 16 } else { 24 }, 72);
            let heads = kv_heads * group;
            let shape = AttentionShape { heads, kv_heads, head_dim: hd, capacity, window };
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let mut keys = data(kv_heads * capacity * hd, seed);
            let mut values = data(kv_heads * capacity * hd, seed ^ 0x55);
            let q = data(heads * hd, seed ^ 1);
            let k = data(kv_heads * hd, seed ^ 2);
            let v = data(kv_heads * hd, seed ^ 3);
            let scale = 1.0 / (hd as f32).sqrt();
            let mut out = vec![f32::NAN; heads * hd];
            let mut scratch = Vec::new();
            attend_one(shape, pos, &q, &k, &v, &mut keys, &mut values, scale, &mut out, &mut scratch);
            for kh in 0..kv_heads {
                let at = (kh * capacity + pos) * hd;
                prop_assert_eq!(&keys[at..at + hd], &k[kh * hd..][..hd]);
                prop_assert_eq!(&values[at..at + hd], &v[kh * hd..][..hd]);
            }
            for h in 0..heads {
                let kh = h / group;
                let qh = &q[h * hd..][..hd];
                let s: Vec<f64> = (first..=pos).map(|j| {
                    let kr = &keys[(kh * capacity + j) * hd..][..hd];
                    qh.iter().zip(kr).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum::<f64>() * f64::from(scale)
                }).collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for d in 0..hd {
                    let want: f64 = (first..=pos).map(|j| (s[j - first] - m).exp() / z * f64::from(values[(kh * capacity + j) * hd + d])).sum();
                    let got = f64::from(out[h * hd + d]);
                    prop_assert!((got - want).abs() < 1e-5, "head {} dim {}: {} vs {}", h, d, got, want);
                }
            }
        }
    }
}
