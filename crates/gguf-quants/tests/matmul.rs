//! matmul_transposed against a plain f64 dot product of the dequantized weights.

mod common;

use common::{finite_blocks, Rng};
use gguf_quants::{Isa, QuantMatrix, SUPPORTED};

#[test]
fn matmul_matches_f64_dot_of_dequantized() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for &ty in SUPPORTED {
        let cols = if ty.block_elems() == 1 { 300 } else { 2 * 256 };
        let rows = 5;
        let blocks = rows * cols / ty.block_elems();
        let m = QuantMatrix::new(ty, rows, cols, finite_blocks(ty, &mut rng, blocks))
            .expect("valid matrix");
        let mut w = vec![0.0f32; rows * cols];
        m.dequantize_rows(0..rows, &mut w).expect("dequantize");
        for n in [1, 3, 9] {
            let x: Vec<f32> = (0..n * cols).map(|_| rng.f32()).collect();
            for isa in Isa::all_supported() {
                let mut yt = vec![0.0f32; rows * n];
                m.matmul_transposed(isa, &x, n, 0..rows, &mut yt)
                    .expect("matmul");
                for o in 0..rows {
                    for r in 0..n {
                        let (mut dot, mut mag) = (0.0f64, 0.0f64);
                        for i in 0..cols {
                            let p = f64::from(w[o * cols + i]) * f64::from(x[r * cols + i]);
                            dot += p;
                            mag += p.abs();
                        }
                        let got = f64::from(yt[o * n + r]);
                        assert!(
                            (got - dot).abs() <= 1e-5 * mag + 1e-30,
                            "{ty} {isa} n={n} o={o} r={r}: {got} vs {dot}"
                        );
                    }
                }
            }
        }
    }
}
