//! MLX smoke tests: the operations the engine relies on, checked against manual maths.

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::{self, indexing::TryIndexOp};
use mlx_rs::{random, Array};
use std::collections::HashMap;

fn max_abs_diff(a: &Array, b: &Array) -> f32 {
    ops::abs(a.subtract(b).expect("sub"))
        .expect("abs")
        .max(None)
        .expect("max")
        .try_item_exact::<f32>()
        .expect("item")
}

#[test]
fn matmul_and_rms_norm() {
    let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
    let mm = a.matmul(&a).expect("matmul");
    assert_eq!(
        mm.to_vec_exact::<f32>().expect("vec"),
        vec![7.0, 10.0, 15.0, 22.0]
    );

    let x = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[1, 4]);
    let w = Array::from_slice(&[1.0f32, 0.5, 2.0, 1.0], &[4]);
    let r = fast::rms_norm(&x, Some(&w), 1e-5).expect("rms_norm");
    let rms = ((1.0f32 + 4.0 + 9.0 + 16.0) / 4.0 + 1e-5).sqrt();
    let expect: Vec<f32> = [1.0f32, 1.0, 6.0, 4.0].iter().map(|v| v / rms).collect();
    let got = r.to_vec_exact::<f32>().expect("vec");
    assert!(
        got.iter().zip(&expect).all(|(a, b)| (a - b).abs() < 1e-5),
        "{got:?}"
    );
}

/// Manual RoPE of `x` `[1, 1, L, D]` at positions `offset..`: pairs (i, i + D/2) when not
/// traditional, (2i, 2i + 1) when traditional.
fn manual_rope(
    x: &[f32],
    l: usize,
    d: usize,
    base: f32,
    offset: usize,
    traditional: bool,
) -> Vec<f32> {
    let mut out = x.to_vec();
    for p in 0..l {
        let pos = (p + offset) as f32;
        for i in 0..d / 2 {
            let theta = pos * base.powf(-(2.0 * i as f32) / d as f32);
            let (a, b) = if traditional {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + d / 2)
            };
            let (xa, xb) = (x[p * d + a], x[p * d + b]);
            out[p * d + a] = xa * theta.cos() - xb * theta.sin();
            out[p * d + b] = xa * theta.sin() + xb * theta.cos();
        }
    }
    out
}

#[test]
fn rope_matches_manual_both_layouts() {
    let (l, d) = (5usize, 8usize);
    let data: Vec<f32> = (0..l * d)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
        .collect();
    let x = Array::from_slice(&data, &[1, 1, l as i32, d as i32]);
    for traditional in [false, true] {
        let r = fast::rope(&x, d as i32, traditional, 10_000.0, 1.0, 3, None).expect("rope");
        let got = r.to_vec_exact::<f32>().expect("vec");
        let want = manual_rope(&data, l, d, 10_000.0, 3, traditional);
        assert!(got.iter().all(|x| x.is_finite()));
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "traditional={traditional}: err {err}");
    }
}

#[test]
fn sdpa_gqa_causal_matches_manual_with_cached_prefix() {
    // 4 query heads over 2 KV heads; 3 new queries over 7 keys (4 cached): the causal mask
    // must align the queries with the last keys.
    let (hq, hk, ql, kl, dh) = (4, 2, 3, 7, 16);
    let q = random::normal::<f32>(&[1, hq, ql, dh], None, None, None).expect("q");
    let k = random::normal::<f32>(&[1, hk, kl, dh], None, None, None).expect("k");
    let v = random::normal::<f32>(&[1, hk, kl, dh], None, None, None).expect("v");
    let scale = 1.0 / (dh as f32).sqrt();
    let o = fast::scaled_dot_product_attention(
        &q,
        &k,
        &v,
        scale,
        ScaledDotProductAttentionMask::Causal,
        None,
    )
    .expect("sdpa");
    let krep = ops::repeat_axis::<f32>(k, 2, 1).expect("repeat");
    let vrep = ops::repeat_axis::<f32>(v, 2, 1).expect("repeat");
    let scores = q
        .matmul(krep.swap_axes(-1, -2).expect("swap"))
        .expect("qk")
        .multiply(Array::from_f32(scale))
        .expect("scale");
    // Query i (absolute position kl - ql + i) sees keys 0..=kl - ql + i.
    let mut mask = vec![false; (ql * kl) as usize];
    for i in 0..ql {
        for j in 0..kl {
            mask[(i * kl + j) as usize] = j <= kl - ql + i;
        }
    }
    let mask = Array::from_slice(&mask, &[ql, kl]);
    let scores = ops::select(&mask, &scores, Array::from_f32(f32::NEG_INFINITY)).expect("where");
    let manual = ops::softmax_axis(&scores, -1, None)
        .expect("softmax")
        .matmul(&vrep)
        .expect("pv");
    let err = max_abs_diff(&o, &manual);
    assert!(err < 1e-4, "sdpa err {err}");
}

#[test]
fn quantized_matmul_matches_dequantized() {
    let w = random::normal::<f32>(&[64, 128], None, None, None).expect("w");
    let x = random::normal::<f32>(&[3, 128], None, None, None).expect("x");
    for bits in [4, 8] {
        let (qw, s, b) = ops::quantize(&w, 32, bits).expect("quantize");
        let deq = ops::dequantize(&qw, &s, &b, 32, bits).expect("dequantize");
        let qmm = ops::quantized_matmul(&x, &qw, &s, &b, true, 32, bits).expect("qmm");
        let reference = x.matmul(deq.t()).expect("matmul");
        let err = max_abs_diff(&qmm, &reference);
        assert!(err < 1e-3, "bits {bits}: err {err}");
        let q_err = ops::abs(deq.subtract(&w).expect("sub"))
            .expect("abs")
            .mean(None)
            .expect("mean")
            .try_item_exact::<f32>()
            .expect("item");
        assert!(
            q_err < if bits == 4 { 0.2 } else { 0.02 },
            "bits {bits}: quantization error {q_err}"
        );
    }
}

#[test]
fn safetensors_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.safetensors");
    let a = Array::from_slice(&[1.0f32, -2.5, 3.25, 0.0], &[2, 2]);
    let b = Array::from_slice(&[7u32, 8, 9], &[3]);
    let mut md = HashMap::new();
    md.insert("format".to_string(), "mlx".to_string());
    Array::save_safetensors([("a", &a), ("b", &b)], &md, &path).expect("save");
    let (loaded, meta) = Array::load_safetensors_with_metadata(&path).expect("load");
    assert_eq!(meta.get("format").map(String::as_str), Some("mlx"));
    assert_eq!(
        loaded["a"].to_vec_exact::<f32>().expect("a"),
        vec![1.0, -2.5, 3.25, 0.0]
    );
    assert_eq!(loaded["b"].to_vec_exact::<u32>().expect("b"), vec![7, 8, 9]);
    let row = loaded["a"].try_index((1..2, ..)).expect("slice");
    assert_eq!(
        row.contiguous()
            .expect("c")
            .to_vec_exact::<f32>()
            .expect("row"),
        vec![3.25, 0.0]
    );
}
