//! Dequantization is bit-exact against gguf-py 0.19.0 (fixtures from scripts/reference.py).

mod common;

use common::{finite_blocks, Rng};
use gguf_quants::{dequantize_with, Isa, QuantMatrix, SUPPORTED};

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (run scripts/reference.py)"))
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

#[test]
fn dequantize_matches_gguf_py() {
    for &ty in SUPPORTED {
        let raw = fixture(&format!("{}.bin", ty.name()));
        let expected: Vec<f32> = fixture(&format!("{}.f32", ty.name()))
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let traits = ty.traits().expect("supported");
        let blocks = raw.len() / traits.block_bytes;
        assert_eq!(blocks * traits.block_bytes, raw.len(), "{ty}");
        assert_eq!(blocks * traits.block_elems, expected.len(), "{ty}");
        assert!(blocks >= 32, "{ty}: fixture too small");
        let mut got = vec![0.0f32; expected.len()];
        (traits.dequantize)(&raw, &mut got);
        let bad: Vec<usize> = (0..got.len())
            .filter(|&i| !same(got[i], expected[i]))
            .collect();
        assert!(
            bad.is_empty(),
            "{ty}: {} of {} values differ, first at {}: {:?} vs gguf-py {:?}",
            bad.len(),
            got.len(),
            bad[0],
            got[bad[0]],
            expected[bad[0]]
        );
        // Every instruction set's kernel path gives the same bits.
        for isa in Isa::all_supported() {
            let mut simd = vec![0.0f32; expected.len()];
            dequantize_with(isa, ty, &raw, &mut simd).expect("dequantize_with");
            let bad = (0..simd.len()).find(|&i| !same(simd[i], expected[i]));
            assert!(bad.is_none(), "{ty} {isa}: value {bad:?} differs");
        }
        // The matrix view dequantizes the same bits, row by row.
        let cols = traits.block_elems * if traits.block_elems == 1 { 4 } else { 1 };
        let rows = expected.len() / cols;
        let m = QuantMatrix::new(
            ty,
            rows,
            cols,
            raw[..rows * cols / traits.block_elems * traits.block_bytes].to_vec(),
        )
        .expect("matrix");
        let mut row = vec![0.0f32; cols];
        for r in 0..rows {
            m.dequantize_row(r, &mut row).expect("row");
            assert!(
                row.iter()
                    .zip(&expected[r * cols..])
                    .all(|(a, b)| same(*a, *b)),
                "{ty} row {r}"
            );
        }
    }
}

/// The weights the kernels use are the reference bits: `x = I` makes the matmul return the
/// weights themselves (each product `w·1` is exact, the other lanes add zeros).
#[test]
fn kernel_weights_match_reference_dequant() {
    let mut rng = Rng(77);
    for &ty in SUPPORTED {
        let cols = if ty.block_elems() == 1 {
            40
        } else {
            ty.block_elems() * 2
        };
        let rows = 3;
        let data = finite_blocks(ty, &mut rng, rows * cols / ty.block_elems());
        let m = QuantMatrix::new(ty, rows, cols, data).expect("matrix");
        let mut w = vec![0.0f32; rows * cols];
        m.dequantize_rows(0..rows, &mut w).expect("dequantize");
        let mut eye = vec![0.0f32; cols * cols];
        for i in 0..cols {
            eye[i * cols + i] = 1.0;
        }
        for isa in Isa::all_supported() {
            let mut yt = vec![0.0f32; rows * cols];
            m.matmul_transposed(isa, &eye, cols, 0..rows, &mut yt)
                .expect("matmul");
            for o in 0..rows {
                for i in 0..cols {
                    // == treats -0 and +0 alike (w + 0.0 turns -0 into +0).
                    assert!(
                        yt[o * cols + i] == w[o * cols + i],
                        "{ty} {isa} w[{o},{i}]: {} vs {}",
                        yt[o * cols + i],
                        w[o * cols + i]
                    );
                }
            }
        }
    }
}
