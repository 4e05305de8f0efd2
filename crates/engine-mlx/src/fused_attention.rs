//! The whole causal attention of a prefill chunk on the host CPU, fused: scores, softmax and
//! the weighted sum of values one tile of keys at a time, with a running softmax, so no score
//! matrix is ever stored.
//!
//! Why: with [`crate::host_attention`] a 256-token chunk at a depth of 3,840 tokens spent
//! ~62 ms per layer in attention on the 2-core Linux VM: the score matrix (9 heads × 256 ×
//! 4,096 floats, 38 MB) was written by one MLX matmul, read and written by the softmax,
//! copied back into MLX and read again by the second matmul, and every pass paid for fresh
//! memory. Here a block of 4 query rows keeps its scores for 64 keys in vector registers.
//!
//! Reproducibility: keys are taken in tiles of `TILE` (64) counted from position 0, and every
//! row is computed by the same sequence of operations (fused multiply-adds in a fixed order,
//! reductions over fixed lanes) whatever the chunk it is in, its neighbours in the block,
//! the thread split or the instruction set. A row's result depends only on its query and the
//! keys and values it may see, so a prompt prefilled in other chunks (a warm turn) gives
//! bit-identical values.

use crate::host_attention::exp_approx;
use crate::host_linear::Isa;

/// Keys per tile: scores are computed, and the running softmax rescaled, a tile at a time.
const TILE: usize = 64;
/// Query rows computed together (their scores, `ROWS × TILE`, fit in vector registers).
const ROWS: usize = 4;
/// Lanes of the sums over a tile (a fixed number, so the order of every sum is fixed).
const LANES: usize = 16;

/// One sequence's attention over a chunk of new tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Query heads.
    pub heads: usize,
    /// KV heads (each shared by `heads / kv_heads` query heads).
    pub kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// New tokens (query positions) in the chunk.
    pub positions: usize,
    /// Tokens cached before the chunk: position `p` of the chunk sees keys `0..=offset + p`.
    pub offset: usize,
    /// Token capacity of the K/V buffers (`[kv_heads, capacity, head_dim]`).
    pub capacity: usize,
}

impl Chunk {
    /// Whether [`causal_attention`] has a kernel for this head size.
    pub fn supported(&self) -> bool {
        matches!(self.head_dim, 16 | 32 | 64 | 80 | 96 | 128)
    }

    /// Whether the shape is consistent and the slices (`q`/`out` `[heads, positions,
    /// head_dim]`, `keys`/`values` `[kv_heads, capacity, head_dim]`) have its lengths.
    pub fn fits(&self, q: usize, kv: usize, out: usize) -> bool {
        let rows = self.heads.checked_mul(self.positions * self.head_dim);
        self.kv_heads > 0
            && self.positions > 0
            && self.heads.is_multiple_of(self.kv_heads)
            && self.offset + self.positions <= self.capacity
            && rows == Some(q)
            && out == q
            && self.kv_heads.checked_mul(self.capacity * self.head_dim) == Some(kv)
    }
}

/// `out = softmax(scale · q·kᵀ) · v` per head and query position over the keys the position
/// may see (`q` after RoPE; the chunk's own keys and values already written into `keys` /
/// `values` at `offset..offset + positions`). Returns `false`, writing nothing, when the head
/// size has no kernel or the slices do not fit the shape (see [`Chunk`]).
pub fn causal_attention(
    shape: Chunk,
    scale: f32,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    out: &mut [f32],
) -> bool {
    let pool = crate::host_linear::helper_pool();
    let macs = shape.heads * shape.positions * (shape.offset + shape.positions) * shape.head_dim;
    let threads = match pool {
        Some(p) if macs >= 1 << 17 => p.current_num_threads() + 1,
        _ => 1,
    };
    attention_threads(shape, scale, q, keys, values, out, threads, Isa::detected())
}

/// [`causal_attention`] on `threads` threads (the caller's and helpers of the host pool)
/// with the kernels for `isa` (when this CPU has it; plain Rust otherwise).
#[allow(clippy::too_many_arguments)]
fn attention_threads(
    shape: Chunk,
    scale: f32,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    out: &mut [f32],
    threads: usize,
    isa: Isa,
) -> bool {
    if !shape.supported()
        || !shape.fits(q.len(), keys.len(), out.len())
        || values.len() != keys.len()
    {
        return false;
    }
    let kv = Kv { keys, values };
    match shape.head_dim {
        16 => run::<16>(shape, scale, q, kv, out, threads, isa),
        32 => run::<32>(shape, scale, q, kv, out, threads, isa),
        64 => run::<64>(shape, scale, q, kv, out, threads, isa),
        80 => run::<80>(shape, scale, q, kv, out, threads, isa),
        96 => run::<96>(shape, scale, q, kv, out, threads, isa),
        128 => run::<128>(shape, scale, q, kv, out, threads, isa),
        _ => return false,
    }
    true
}

#[derive(Clone, Copy)]
struct Kv<'a> {
    keys: &'a [f32],
    values: &'a [f32],
}

/// Up to [`ROWS`] consecutive query rows of one KV head (its group's heads stacked, each
/// with `positions` rows) and where their output goes.
struct Block<'a> {
    kv_head: usize,
    /// Index of the first row among the KV head's rows.
    first: usize,
    q: &'a [f32],
    out: &'a mut [f32],
}

fn run<const HD: usize>(
    shape: Chunk,
    scale: f32,
    q: &[f32],
    kv: Kv<'_>,
    out: &mut [f32],
    threads: usize,
    isa: Isa,
) {
    let per_kv_head = shape.heads / shape.kv_heads * shape.positions * HD;
    // Blocks dealt to the threads in turn: neighbouring blocks see about as many keys.
    let mut work: Vec<Vec<Block<'_>>> = (0..threads.max(1)).map(|_| Vec::new()).collect();
    let mut i = 0;
    for (kv_head, (qg, og)) in q
        .chunks_exact(per_kv_head)
        .zip(out.chunks_exact_mut(per_kv_head))
        .enumerate()
    {
        for (b, (qb, ob)) in qg
            .chunks(ROWS * HD)
            .zip(og.chunks_mut(ROWS * HD))
            .enumerate()
        {
            let n = work.len();
            work[i % n].push(Block {
                kv_head,
                first: b * ROWS,
                q: qb,
                out: ob,
            });
            i += 1;
        }
    }
    let isa = if isa.supported() { isa } else { Isa::Scalar };
    let mut work = work.into_iter();
    let mine = work.next().unwrap_or_default();
    match crate::host_linear::helper_pool() {
        Some(pool) if work.len() > 0 => pool.in_place_scope(|s| {
            for blocks in work {
                s.spawn(move |_| blocks_on::<HD>(isa, shape, scale, kv, blocks));
            }
            blocks_on::<HD>(isa, shape, scale, kv, mine);
        }),
        _ => {
            for blocks in std::iter::once(mine).chain(work) {
                blocks_on::<HD>(isa, shape, scale, kv, blocks);
            }
        }
    }
}

/// Runs `blocks` with the kernels compiled for `isa`.
fn blocks_on<const HD: usize>(
    isa: Isa,
    shape: Chunk,
    scale: f32,
    kv: Kv<'_>,
    blocks: Vec<Block<'_>>,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if std::arch::is_x86_feature_detected!("fma") => {
            #[allow(unsafe_code)]
            // SAFETY: `Isa::detected` returned Avx512 and FMA was detected just above: this
            // CPU has both features the function is compiled for.
            unsafe {
                blocks_avx512::<HD>(shape, scale, kv, blocks)
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            #[allow(unsafe_code)]
            // SAFETY: `Isa::detected` returned Avx2: this CPU has AVX2 and FMA.
            unsafe {
                blocks_avx2::<HD>(shape, scale, kv, blocks)
            }
        }
        _ => blocks_body::<HD, Portable>(shape, scale, kv, blocks),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn blocks_avx512<const HD: usize>(shape: Chunk, scale: f32, kv: Kv<'_>, blocks: Vec<Block<'_>>) {
    blocks_body::<HD, x86::Avx512>(shape, scale, kv, blocks);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn blocks_avx2<const HD: usize>(shape: Chunk, scale: f32, kv: Kv<'_>, blocks: Vec<Block<'_>>) {
    blocks_body::<HD, Portable>(shape, scale, kv, blocks);
}

/// The running softmax of [`ROWS`] rows: maximum, sum and unnormalized output.
struct State<const HD: usize> {
    max: [f32; ROWS],
    sum: [f32; ROWS],
    out: [[f32; HD]; ROWS],
    /// The rows' queries (zero rows past the end of the block).
    q: [[f32; HD]; ROWS],
    /// Keys each row may see (0 for a padding row).
    visible: [usize; ROWS],
}

/// One thread's blocks: per KV head, per tile of keys, every block that sees the tile.
#[inline(always)]
fn blocks_body<const HD: usize, K: Kernels>(
    shape: Chunk,
    scale: f32,
    kv: Kv<'_>,
    mut blocks: Vec<Block<'_>>,
) {
    let positions = shape.positions;
    let per_head = shape.capacity * HD;
    // The tile's keys transposed (`[HD][TILE]`), so a score row is a sum of key rows.
    let mut kt = vec![[0.0f32; TILE]; HD];
    let mut at = 0;
    while at < blocks.len() {
        let kv_head = blocks[at].kv_head;
        let end = at
            + blocks[at..]
                .iter()
                .take_while(|b| b.kv_head == kv_head)
                .count();
        let group = &mut blocks[at..end];
        at = end;
        let mut states: Vec<State<HD>> = group
            .iter()
            .map(|b| {
                let mut s = State {
                    max: [f32::NEG_INFINITY; ROWS],
                    sum: [0.0; ROWS],
                    out: [[0.0; HD]; ROWS],
                    q: [[0.0; HD]; ROWS],
                    visible: [0; ROWS],
                };
                for (r, row) in b.q.chunks_exact(HD).enumerate() {
                    s.q[r].copy_from_slice(row);
                    s.visible[r] = shape.offset + (b.first + r) % positions + 1;
                }
                s
            })
            .collect();
        let seen = states.iter().flat_map(|s| s.visible).max().unwrap_or(0);
        let keys = &kv.keys[kv_head * per_head..][..seen * HD];
        let values = &kv.values[kv_head * per_head..][..seen * HD];
        for (tile, (kt_src, v)) in keys
            .chunks(TILE * HD)
            .zip(values.chunks(TILE * HD))
            .enumerate()
        {
            let start = tile * TILE;
            K::transpose::<HD>(kt_src, &mut kt);
            for s in states.iter_mut() {
                if s.visible.iter().any(|&v| v > start) {
                    tile_update::<HD, K>(s, &kt, v, start, scale);
                }
            }
        }
        for (s, b) in states.iter().zip(group.iter_mut()) {
            for (r, dst) in b.out.chunks_exact_mut(HD).enumerate() {
                let inv = 1.0 / s.sum[r];
                for (d, &o) in dst.iter_mut().zip(&s.out[r]) {
                    *d = o * inv;
                }
            }
        }
    }
}

/// `row` folded into [`LANES`] lanes, then the lanes pairwise: a fixed order.
#[inline(always)]
fn lanes_fold(row: &[f32; TILE], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    for c in row.chunks_exact(LANES) {
        for (acc, &x) in lanes.iter_mut().zip(c) {
            *acc = f(*acc, x);
        }
    }
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            lanes[l] = f(lanes[l], lanes[l + width]);
        }
        width /= 2;
    }
    lanes[0]
}

/// The largest element (any order gives the same bits).
#[inline(always)]
fn lanes_max(row: &[f32; TILE]) -> f32 {
    lanes_fold(row, f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// The sum, in [`lanes_fold`]'s order.
#[inline(always)]
fn lanes_sum(row: &[f32; TILE]) -> f32 {
    lanes_fold(row, 0.0, |a, b| a + b)
}

/// The two products of a tile, per instruction set. Every implementation computes each
/// element with the same fused multiply-adds in the same order (over `d` for a score, over
/// the tile's keys for an output), so they agree to the bit.
trait Kernels {
    /// `kt[d][t] = keys[t][d]` for the `keys.len() / HD` keys (at most [`TILE`]), zeros for
    /// the rest of the tile.
    fn transpose<const HD: usize>(keys: &[f32], kt: &mut [[f32; TILE]]) {
        transpose_plain::<HD>(keys, kt);
    }
    /// `scores[r][t] = Σ_d q[r][d] · kt[d][t]`, `d` ascending.
    fn scores<const HD: usize>(
        q: &[[f32; HD]; ROWS],
        kt: &[[f32; TILE]],
        scores: &mut [[f32; TILE]; ROWS],
    );
    /// `out[r] = out[r] · correction[r] + Σ_t p[r][t] · v[t]`, `t` ascending over the rows of
    /// `v` (`[keys, HD]`, at most [`TILE`]).
    fn weighted_sum<const HD: usize>(
        p: &[[f32; TILE]; ROWS],
        v: &[f32],
        correction: &[f32; ROWS],
        out: &mut [[f32; HD]; ROWS],
    );
}

/// [`Kernels::transpose`] in plain Rust.
#[inline(always)]
fn transpose_plain<const HD: usize>(keys: &[f32], kt: &mut [[f32; TILE]]) {
    for (t, key) in keys.chunks_exact(HD).take(TILE).enumerate() {
        for (row, &x) in kt.iter_mut().zip(key) {
            row[t] = x;
        }
    }
    let n = (keys.len() / HD).min(TILE);
    for row in kt.iter_mut() {
        row[n..].fill(0.0);
    }
}

/// Plain Rust (any CPU; vectorized by the compiler where it can).
struct Portable;

impl Kernels for Portable {
    #[inline(always)]
    fn scores<const HD: usize>(
        q: &[[f32; HD]; ROWS],
        kt: &[[f32; TILE]],
        scores: &mut [[f32; TILE]; ROWS],
    ) {
        *scores = [[0.0; TILE]; ROWS];
        for (d, k) in kt.iter().enumerate().take(HD) {
            for (acc, q) in scores.iter_mut().zip(q) {
                let x = q[d];
                for (a, &kk) in acc.iter_mut().zip(k) {
                    *a = x.mul_add(kk, *a);
                }
            }
        }
    }

    #[inline(always)]
    fn weighted_sum<const HD: usize>(
        p: &[[f32; TILE]; ROWS],
        v: &[f32],
        correction: &[f32; ROWS],
        out: &mut [[f32; HD]; ROWS],
    ) {
        for (o, &c) in out.iter_mut().zip(correction) {
            for x in o.iter_mut() {
                *x *= c;
            }
        }
        for (t, vr) in v.chunks_exact(HD).take(TILE).enumerate() {
            for (o, p) in out.iter_mut().zip(p) {
                let pt = p[t];
                for (x, &vv) in o.iter_mut().zip(vr) {
                    *x = pt.mul_add(vv, *x);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    #![allow(unsafe_code)]

    use super::{Kernels, ROWS, TILE};
    use std::arch::x86_64::*;

    /// Vectors of 16 lanes per tile row.
    const V: usize = TILE / 16;
    /// Most vectors per head ([`super::Chunk::supported`]: up to 128 elements).
    const MAX_HD_VECTORS: usize = 8;

    /// AVX-512F with the accumulators in registers. Used only from functions compiled with
    /// `avx512f,fma` after detection (`blocks_avx512`).
    pub(super) struct Avx512;

    impl Kernels for Avx512 {
        #[inline(always)]
        fn transpose<const HD: usize>(keys: &[f32], kt: &mut [[f32; TILE]]) {
            if keys.len() == TILE * HD && kt.len() >= HD && HD.is_multiple_of(16) {
                // SAFETY: as for `scores`; the lengths were checked just above.
                unsafe { transpose_avx512::<HD>(keys, kt) }
            } else {
                super::transpose_plain::<HD>(keys, kt);
            }
        }

        #[inline(always)]
        fn scores<const HD: usize>(
            q: &[[f32; HD]; ROWS],
            kt: &[[f32; TILE]],
            scores: &mut [[f32; TILE]; ROWS],
        ) {
            // SAFETY: only reached from `blocks_avx512`, which runs after the CPU was found
            // to have AVX-512F and FMA.
            unsafe { scores_avx512::<HD>(q, kt, scores) }
        }

        #[inline(always)]
        fn weighted_sum<const HD: usize>(
            p: &[[f32; TILE]; ROWS],
            v: &[f32],
            correction: &[f32; ROWS],
            out: &mut [[f32; HD]; ROWS],
        ) {
            // SAFETY: as for `scores`.
            unsafe { weighted_sum_avx512::<HD>(p, v, correction, out) }
        }
    }

    /// A full tile (`keys`: [`TILE`] × `HD` floats, `kt`: at least `HD` rows), transposed
    /// 16 × 16 floats at a time in registers.
    #[target_feature(enable = "avx512f,fma")]
    fn transpose_avx512<const HD: usize>(keys: &[f32], kt: &mut [[f32; TILE]]) {
        for kb in 0..V {
            for db in 0..HD / 16 {
                let rows: [__m512; 16] = std::array::from_fn(|i| {
                    // SAFETY: key `kb·16 + i` < TILE has HD floats from `db·16 + 16 ≤ HD`.
                    unsafe { _mm512_loadu_ps(keys.as_ptr().add((kb * 16 + i) * HD + db * 16)) }
                });
                for (j, col) in transpose16(rows).into_iter().enumerate() {
                    // SAFETY: row `db·16 + j` < HD of `kt` has TILE floats from `kb·16 + 16`.
                    unsafe { _mm512_storeu_ps(kt[db * 16 + j].as_mut_ptr().add(kb * 16), col) };
                }
            }
        }
    }

    /// The transpose of a 16 × 16 block held as 16 rows.
    #[target_feature(enable = "avx512f")]
    fn transpose16(a: [__m512; 16]) -> [__m512; 16] {
        let zero = _mm512_setzero_ps();
        // Pairs of rows interleaved within each 128-bit lane.
        let mut t = [zero; 16];
        for k in 0..8 {
            t[2 * k] = _mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]);
            t[2 * k + 1] = _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]);
        }
        // u[4m + c], lane L: column 4L + c of rows 4m..4m + 4.
        let mut u = [zero; 16];
        for m in 0..4 {
            let (p, q, r, s) = (t[4 * m], t[4 * m + 1], t[4 * m + 2], t[4 * m + 3]);
            u[4 * m] = _mm512_shuffle_ps::<0x44>(p, r);
            u[4 * m + 1] = _mm512_shuffle_ps::<0xEE>(p, r);
            u[4 * m + 2] = _mm512_shuffle_ps::<0x44>(q, s);
            u[4 * m + 3] = _mm512_shuffle_ps::<0xEE>(q, s);
        }
        // Column 4L + c: lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
        let mut out = [zero; 16];
        for c in 0..4 {
            let wa = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
            let wb = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
            let xa = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
            let xb = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
            out[c] = _mm512_shuffle_f32x4::<0x88>(wa, xa);
            out[4 + c] = _mm512_shuffle_f32x4::<0x88>(wb, xb);
            out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(wa, xa);
            out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(wb, xb);
        }
        out
    }

    #[target_feature(enable = "avx512f,fma")]
    fn scores_avx512<const HD: usize>(
        q: &[[f32; HD]; ROWS],
        kt: &[[f32; TILE]],
        scores: &mut [[f32; TILE]; ROWS],
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; ROWS];
        for (d, k) in kt.iter().enumerate().take(HD) {
            // SAFETY: `k` holds TILE = 16 × V floats.
            let kv: [__m512; V] =
                std::array::from_fn(|i| unsafe { _mm512_loadu_ps(k.as_ptr().add(16 * i)) });
            for (a, q) in acc.iter_mut().zip(q) {
                let x = _mm512_set1_ps(q[d]);
                for (a, &k) in a.iter_mut().zip(&kv) {
                    *a = _mm512_fmadd_ps(x, k, *a);
                }
            }
        }
        for (row, a) in scores.iter_mut().zip(&acc) {
            for (i, &a) in a.iter().enumerate() {
                // SAFETY: a row holds TILE = 16 × V floats.
                unsafe { _mm512_storeu_ps(row.as_mut_ptr().add(16 * i), a) };
            }
        }
    }

    #[target_feature(enable = "avx512f,fma")]
    fn weighted_sum_avx512<const HD: usize>(
        p: &[[f32; TILE]; ROWS],
        v: &[f32],
        correction: &[f32; ROWS],
        out: &mut [[f32; HD]; ROWS],
    ) {
        let n = HD / 16;
        debug_assert!(HD.is_multiple_of(16) && n <= MAX_HD_VECTORS);
        let mut acc = [[_mm512_setzero_ps(); MAX_HD_VECTORS]; ROWS];
        for ((a, o), &c) in acc.iter_mut().zip(out.iter()).zip(correction) {
            let c = _mm512_set1_ps(c);
            for (i, a) in a.iter_mut().enumerate().take(n) {
                // SAFETY: a row of `out` holds HD = 16 × n floats.
                *a = _mm512_mul_ps(unsafe { _mm512_loadu_ps(o.as_ptr().add(16 * i)) }, c);
            }
        }
        for (t, vr) in v.chunks_exact(HD).take(TILE).enumerate() {
            let mut vv = [_mm512_setzero_ps(); MAX_HD_VECTORS];
            for (i, x) in vv.iter_mut().enumerate().take(n) {
                // SAFETY: `vr` holds HD = 16 × n floats.
                *x = unsafe { _mm512_loadu_ps(vr.as_ptr().add(16 * i)) };
            }
            for (a, p) in acc.iter_mut().zip(p) {
                let pt = _mm512_set1_ps(p[t]);
                for (a, &x) in a.iter_mut().zip(&vv).take(n) {
                    *a = _mm512_fmadd_ps(pt, x, *a);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (i, &a) in a.iter().enumerate().take(n) {
                // SAFETY: as above.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr().add(16 * i), a) };
            }
        }
    }
}

/// Folds one tile of keys (`kt` transposed, `v` its value rows, starting at key `start`) into
/// the running softmax of a block.
#[inline(always)]
fn tile_update<const HD: usize, K: Kernels>(
    s: &mut State<HD>,
    kt: &[[f32; TILE]],
    v: &[f32],
    start: usize,
    scale: f32,
) {
    let mut scores = [[0.0f32; TILE]; ROWS];
    K::scores::<HD>(&s.q, kt, &mut scores);
    // The rows go through each step together, so their dependency chains overlap.
    let visible: [usize; ROWS] =
        std::array::from_fn(|r| s.visible[r].saturating_sub(start).min(TILE));
    let mut tile_max = [f32::NEG_INFINITY; ROWS];
    for ((row, &n), m) in scores.iter_mut().zip(&visible).zip(&mut tile_max) {
        for (t, x) in row.iter_mut().enumerate() {
            let y = *x * scale;
            *x = if t < n { y } else { f32::NEG_INFINITY };
        }
        *m = lanes_max(row);
    }
    let max: [f32; ROWS] = std::array::from_fn(|r| {
        if tile_max[r] > s.max[r] {
            tile_max[r]
        } else {
            s.max[r]
        }
    });
    let correction: [f32; ROWS] = std::array::from_fn(|r| {
        if visible[r] == 0 {
            // A tile past this row's last key: nothing changes.
            1.0
        } else if s.max[r] == f32::NEG_INFINITY {
            // The row's first tile (its running sum and output are still 0).
            0.0
        } else {
            exp_approx(s.max[r] - max[r])
        }
    });
    for ((row, &n), &m) in scores.iter_mut().zip(&visible).zip(&max) {
        for (t, x) in row.iter_mut().enumerate() {
            let e = exp_approx(*x - m);
            *x = if t < n { e } else { 0.0 };
        }
    }
    for r in 0..ROWS {
        s.sum[r] = s.sum[r] * correction[r] + lanes_sum(&scores[r]);
        s.max[r] = max[r];
    }
    K::weighted_sum::<HD>(&scores, v, &correction, &mut s.out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_attention::seeded;
    use proptest::prelude::*;

    struct Case {
        shape: Chunk,
        q: Vec<f32>,
        keys: Vec<f32>,
        values: Vec<f32>,
    }

    fn case(
        heads: usize,
        kv_heads: usize,
        hd: usize,
        positions: usize,
        offset: usize,
        seed: u32,
    ) -> Case {
        let capacity = offset + positions + 3;
        let shape = Chunk {
            heads,
            kv_heads,
            head_dim: hd,
            positions,
            offset,
            capacity,
        };
        Case {
            shape,
            q: seeded(heads * positions * hd, seed, 1.0),
            keys: seeded(kv_heads * capacity * hd, seed ^ 0x5a5a, 1.0),
            values: seeded(kv_heads * capacity * hd, seed ^ 0xa5a5, 1.0),
        }
    }

    fn run_case(c: &Case, scale: f32, threads: usize) -> Vec<f32> {
        run_on(c, scale, threads, Isa::detected())
    }

    fn run_on(c: &Case, scale: f32, threads: usize, isa: Isa) -> Vec<f32> {
        let mut out = vec![f32::NAN; c.q.len()];
        let (q, k, v) = (&c.q, &c.keys, &c.values);
        assert!(attention_threads(
            c.shape, scale, q, k, v, &mut out, threads, isa
        ));
        out
    }

    #[test]
    fn tiles_are_transposed_whole_and_partial() {
        for n in [TILE, 17, 1] {
            let keys = seeded(n * 64, n as u32, 3.0);
            let mut plain = vec![[f32::NAN; TILE]; 64];
            transpose_plain::<64>(&keys, &mut plain);
            for (d, row) in plain.iter().enumerate() {
                for (t, &x) in row.iter().enumerate() {
                    let want = if t < n { keys[t * 64 + d] } else { 0.0 };
                    assert_eq!(x.to_bits(), want.to_bits(), "key {t}, element {d}");
                }
            }
            #[cfg(target_arch = "x86_64")]
            if Isa::Avx512.supported() && std::arch::is_x86_feature_detected!("fma") {
                let mut fast = vec![[f32::NAN; TILE]; 64];
                <x86::Avx512 as Kernels>::transpose::<64>(&keys, &mut fast);
                assert_eq!(fast, plain, "{n} keys");
            }
        }
    }

    /// Every instruction set this CPU has gives the bits of plain Rust.
    #[test]
    fn instruction_sets_agree_to_the_bit() {
        for (hd, positions, offset) in [(16, 37, 70), (64, 9, 130), (96, 64, 0), (128, 5, 64)] {
            let c = case(6, 2, hd, positions, offset, hd as u32);
            let plain = run_on(&c, 0.125, 1, Isa::Scalar);
            for isa in [Isa::Avx2, Isa::Avx512] {
                if isa.supported() {
                    assert_eq!(run_on(&c, 0.125, 2, isa), plain, "{isa:?}, head size {hd}");
                }
            }
        }
    }

    /// f64 reference: softmax over the visible keys, then the weighted sum of values.
    fn reference(c: &Case, scale: f32) -> Vec<f64> {
        let Chunk {
            heads,
            kv_heads,
            head_dim: hd,
            positions,
            offset,
            capacity,
        } = c.shape;
        let mut out = Vec::with_capacity(c.q.len());
        for h in 0..heads {
            let g = h / (heads / kv_heads);
            for p in 0..positions {
                let q = &c.q[(h * positions + p) * hd..][..hd];
                let visible = offset + p + 1;
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let k = &c.keys[(g * capacity + j) * hd..][..hd];
                        q.iter()
                            .zip(k)
                            .map(|(&a, &b)| f64::from(a) * f64::from(b))
                            .sum::<f64>()
                            * f64::from(scale)
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for d in 0..hd {
                    let o: f64 = scores
                        .iter()
                        .enumerate()
                        .map(|(j, s)| {
                            (s - m).exp() / z * f64::from(c.values[(g * capacity + j) * hd + d])
                        })
                        .sum();
                    out.push(o);
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Matches an f64 reference with the causal mask, and the thread split never
        /// changes a bit.
        #[test]
        fn matches_reference_and_ignores_threads(
            kv_heads in 1usize..4, group in 1usize..4, hd in prop::sample::select(vec![16usize, 64, 80]),
            positions in 1usize..40, offset in 0usize..200, seed in any::<u32>(), scale in 0.05f32..0.5,
        ) {
            let c = case(kv_heads * group, kv_heads, hd, positions, offset, seed);
            let one = run_case(&c, scale, 1);
            let three = run_case(&c, scale, 3);
            prop_assert_eq!(&one, &three);
            for (i, (&got, want)) in one.iter().zip(reference(&c, scale)).enumerate() {
                prop_assert!((f64::from(got) - want).abs() < 1e-5, "element {}: {} vs {}", i, got, want);
            }
        }

        /// A prompt cut into two chunks at any point gives the bits of one chunk (a warm
        /// turn equals a cold one).
        #[test]
        fn chunking_never_changes_a_bit(
            kv_heads in 1usize..3, group in 1usize..4, total in 2usize..150, cut in 1usize..149,
            seed in any::<u32>(),
        ) {
            let cut = cut.min(total - 1);
            let heads = kv_heads * group;
            let hd = 16;
            let whole = case(heads, kv_heads, hd, total, 0, seed);
            let all = run_case(&whole, 0.25, 2);
            for (offset, positions) in [(0, cut), (cut, total - cut)] {
                let part = Case {
                    shape: Chunk { positions, offset, ..whole.shape },
                    q: (0..heads)
                        .flat_map(|h| whole.q[(h * total + offset) * hd..][..positions * hd].to_vec())
                        .collect(),
                    keys: whole.keys.clone(),
                    values: whole.values.clone(),
                };
                let got = run_case(&part, 0.25, 2);
                for h in 0..heads {
                    prop_assert_eq!(
                        &got[h * positions * hd..][..positions * hd],
                        &all[(h * total + offset) * hd..][..positions * hd]
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_it_cannot_run_are_refused_without_writing() {
        let c = case(4, 2, 16, 5, 7, 1);
        let mut out = vec![7.0; c.q.len()];
        let odd = Chunk {
            head_dim: 24,
            ..c.shape
        };
        assert!(!causal_attention(
            odd, 0.1, &c.q, &c.keys, &c.values, &mut out
        ));
        let over = Chunk {
            capacity: 11,
            ..c.shape
        };
        assert!(!causal_attention(
            over, 0.1, &c.q, &c.keys, &c.values, &mut out
        ));
        assert!(!causal_attention(
            c.shape,
            0.1,
            &c.q[1..],
            &c.keys,
            &c.values,
            &mut out
        ));
        let uneven = Chunk {
            heads: 3,
            ..c.shape
        };
        assert!(!causal_attention(
            uneven, 0.1, &c.q, &c.keys, &c.values, &mut out
        ));
        assert!(out.iter().all(|&x| x == 7.0));
    }
}
