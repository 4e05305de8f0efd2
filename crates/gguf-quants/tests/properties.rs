//! Properties over random block bytes: no panics, accuracy, and the determinism contract
//! (bit-identical results whatever n, row position, range split and instruction set).

mod common;

use common::{finite_blocks, Rng};
use gguf_quants::{Isa, QuantMatrix, QuantType, SUPPORTED};
use proptest::prelude::*;

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn cols_for(ty: QuantType, rng: &mut Rng) -> usize {
    if ty.block_elems() == 1 {
        // Not a multiple of 16 on purpose: exercises the zero-padded tail.
        1 + (rng.next_u64() % 300) as usize
    } else {
        ty.block_elems() * (1 + (rng.next_u64() % 3) as usize)
    }
}

fn solo(m: &QuantMatrix, x: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; m.rows()];
    m.matmul_transposed(Isa::Scalar, x, 1, 0..m.rows(), &mut y)
        .expect("matmul");
    y
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

    #[test]
    fn dequantize_never_panics(ty in 0..SUPPORTED.len(), blocks in 0usize..4, seed: u64) {
        let ty = SUPPORTED[ty];
        let t = ty.traits().expect("supported");
        let raw = Rng(seed | 1).bytes(blocks * t.block_bytes);
        let mut out = vec![0.0f32; blocks * t.block_elems];
        (t.dequantize)(&raw, &mut out);
        if blocks > 0 {
            let cols = t.block_elems;
            let m = QuantMatrix::new(ty, blocks, cols, raw).expect("matrix");
            let x = vec![1.0f32; cols];
            let mut y = vec![0.0f32; blocks];
            for isa in Isa::all_supported() {
                m.matmul_transposed(isa, &x, 1, 0..blocks, &mut y).expect("matmul");
            }
        }
    }

    #[test]
    fn matmul_close_to_f64_dot(seed: u64, n in 1usize..6) {
      let mut rng = Rng(seed | 1);
      for &ty in SUPPORTED {
        let cols = cols_for(ty, &mut rng);
        let rows = 3;
        let m = QuantMatrix::new(ty, rows, cols, finite_blocks(ty, &mut rng, rows * cols / ty.block_elems()))
            .expect("matrix");
        let mut w = vec![0.0f32; rows * cols];
        m.dequantize_rows(0..rows, &mut w).expect("dequantize");
        let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
        for isa in Isa::all_supported() {
            let mut yt = vec![0.0f32; rows * n];
            m.matmul_transposed(isa, &x, n, 0..rows, &mut yt).expect("matmul");
            for o in 0..rows {
                for r in 0..n {
                    let (mut dot, mut mag) = (0.0f64, 0.0f64);
                    for i in 0..cols {
                        let p = f64::from(w[o * cols + i]) * f64::from(x[r * cols + i]);
                        dot += p;
                        mag += p.abs();
                    }
                    let got = f64::from(yt[o * n + r]);
                    prop_assert!((got - dot).abs() <= 2e-6 * mag + 1e-30,
                        "{} {} o={} r={}: {} vs {}", ty, isa, o, r, got, dot);
                }
            }
        }
      }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 5, ..ProptestConfig::default() })]

    /// The warm == cold guarantee: a row's result never depends on its batch, its position
    /// in the batch, the output range or the instruction set.
    #[test]
    fn matmul_is_deterministic(seed: u64) {
      let mut rng = Rng(seed | 1);
      for &ty in SUPPORTED {
        let cols = cols_for(ty, &mut rng);
        let rows = 4;
        // Raw random bytes: any scale, NaN and infinities included.
        let m = QuantMatrix::new(ty, rows, cols, rng.bytes(rows * cols / ty.block_elems() * ty.block_bytes()))
            .expect("matrix");
        let pool: Vec<Vec<f32>> = (0..9).map(|_| (0..cols).map(|_| rng.f32() * 4.0).collect()).collect();
        let expected: Vec<Vec<f32>> = pool.iter().map(|x| solo(&m, x)).collect();
        let splits: [&[usize]; 3] = [&[0, rows], &[0, 1, rows], &[0, 1, 2, 3, rows]];
        for isa in Isa::all_supported() {
            for n in 1..=9usize {
                for p in 0..n {
                    // Pool row `(p + k) % 9` at batch position k: every row at many positions.
                    let ids: Vec<usize> = (0..n).map(|k| (p + k) % 9).collect();
                    let x: Vec<f32> = ids.iter().flat_map(|&i| pool[i].iter().copied()).collect();
                    for split in splits {
                        for w in split.windows(2) {
                            let range = w[0]..w[1];
                            let mut yt = vec![0.0f32; range.len() * n];
                            m.matmul_transposed(isa, &x, n, range.clone(), &mut yt).expect("matmul");
                            for (oi, o) in range.enumerate() {
                                for (k, &id) in ids.iter().enumerate() {
                                    prop_assert!(same(yt[oi * n + k], expected[id][o]),
                                        "{} {} n={} pos={} row {} out {}: {} vs {}",
                                        ty, isa, n, k, id, o, yt[oi * n + k], expected[id][o]);
                                }
                            }
                        }
                    }
                }
            }
        }
      }
    }
}

/// The documented operation order, written out from the reference weights: element `i`
/// into lane `i % 64` by fused multiply-add (float tails zero-padded to 16 lanes), then
/// the tree `l + 32`, `l + 16`, `l + 8`, `l + 4`, `l + 2`, `l + 1`.
fn documented_dot(w: &[f32], x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 64];
    for (i, (&wi, &xi)) in w.iter().zip(x).enumerate() {
        lanes[i % 64] = wi.mul_add(xi, lanes[i % 64]);
    }
    // Padding lanes get `0·0 + acc`, which leaves every accumulator's bits unchanged
    // except `-0.0`, which becomes `+0.0` (as in the kernels).
    let padded = w.len().div_ceil(16) * 16;
    for i in w.len()..padded {
        lanes[i % 64] = 0.0f32.mul_add(0.0, lanes[i % 64]);
    }
    let mut width = 64;
    while width > 1 {
        width /= 2;
        for l in 0..width {
            lanes[l] += lanes[l + width];
        }
    }
    lanes[0]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, ..ProptestConfig::default() })]

    /// Every instruction set follows the operation order of the crate doc bit for bit
    /// (checked against a plain-Rust transcription of it over the reference weights).
    #[test]
    fn matmul_follows_documented_lane_order(seed: u64, n in 1usize..6) {
      let mut rng = Rng(seed | 1);
      for &ty in SUPPORTED {
        let cols = cols_for(ty, &mut rng);
        let rows = 2;
        let m = QuantMatrix::new(ty, rows, cols, finite_blocks(ty, &mut rng, rows * cols / ty.block_elems()))
            .expect("matrix");
        let mut w = vec![0.0f32; rows * cols];
        m.dequantize_rows(0..rows, &mut w).expect("dequantize");
        let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
        for isa in Isa::all_supported() {
            let mut yt = vec![0.0f32; rows * n];
            m.matmul_transposed(isa, &x, n, 0..rows, &mut yt).expect("matmul");
            for o in 0..rows {
                for r in 0..n {
                    let want = documented_dot(&w[o * cols..(o + 1) * cols], &x[r * cols..(r + 1) * cols]);
                    prop_assert!(same(yt[o * n + r], want), "{} {} o={} r={}: {} vs {}",
                        ty, isa, o, r, yt[o * n + r], want);
                }
            }
        }
      }
    }
}
