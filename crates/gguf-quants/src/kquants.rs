//! The 256-element K-quant super-blocks: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K.
//!
//! Layouts are ggml's `block_q*_K`; the float operations are gguf-py's: the per-sub-block
//! scale `d·sc` (and minimum `dmin·m`) first, then `(d·sc)·q` or `(d·sc)·q - dmin·m`.
//! gguf-py has no Q8_K dequantizer; Q8_K follows ggml's `dequantize_row_q8_K` (`d·q`).

use crate::{blocks_of, f16_at, QuantType, TypeTraits};

/// Q2_K: `scales: [u8; 16]` (low nibble scale, high nibble min), `qs: [u8; 64]`, `d, dmin: f16`.
pub(crate) const Q2K_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q2K,
    block_elems: 256,
    block_bytes: 84,
    dequantize: dequantize_q2k,
};

/// Q3_K: `hmask: [u8; 32]`, `qs: [u8; 64]`, `scales: [u8; 12]` (16 × 6 bits), `d: f16`.
pub(crate) const Q3K_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q3K,
    block_elems: 256,
    block_bytes: 110,
    dequantize: dequantize_q3k,
};

/// Q4_K: `d, dmin: f16`, `scales: [u8; 12]` (8 × 6-bit scales and mins), `qs: [u8; 128]`.
pub(crate) const Q4K_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q4K,
    block_elems: 256,
    block_bytes: 144,
    dequantize: dequantize_q4k,
};

/// Q5_K: Q4_K plus `qh: [u8; 32]` (fifth bits) before `qs`.
pub(crate) const Q5K_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q5K,
    block_elems: 256,
    block_bytes: 176,
    dequantize: dequantize_q5k,
};

/// Q6_K: `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`, `d: f16`.
pub(crate) const Q6K_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q6K,
    block_elems: 256,
    block_bytes: 210,
    dequantize: dequantize_q6k,
};

/// Q8_K: `d: f32`, `qs: [i8; 256]`, `bsums: [i16; 16]` (unused here).
pub(crate) const Q8K_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q8K,
    block_elems: 256,
    block_bytes: 292,
    dequantize: dequantize_q8k,
};

/// The 6-bit scales and minimums of Q4_K / Q5_K sub-blocks from the 12 packed bytes.
#[inline(always)]
pub(crate) fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        m[j] = s[j + 4] & 0x3F;
        sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 2) & 0x30);
        m[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 2) & 0x30);
    }
    (sc, m)
}

/// The 16 signed 6-bit scales of a Q3_K block (already minus 32).
#[inline(always)]
pub(crate) fn scales_q3k(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (k, o) in out.iter_mut().enumerate() {
        let lo = (s[k % 8] >> (4 * (k / 8))) & 0x0F;
        let hi = (s[8 + k % 4] >> (2 * (k / 4))) & 0x03;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

fn dequantize_q2k(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 256, 84);
    for (b, out) in src.chunks_exact(84).zip(dst.chunks_exact_mut(256)) {
        let (scales, qs) = (&b[..16], &b[16..80]);
        let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
        for (e, o) in out.iter_mut().enumerate() {
            let (chunk, s, l) = (e / 128, (e / 32) % 4, e % 32);
            let q = (qs[chunk * 32 + l] >> (2 * s)) & 3;
            let sc = scales[e / 16];
            let dl = d * f32::from(sc & 0x0F);
            let ml = dmin * f32::from(sc >> 4);
            *o = dl * f32::from(q) - ml;
        }
    }
}

fn dequantize_q3k(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 256, 110);
    for (b, out) in src.chunks_exact(110).zip(dst.chunks_exact_mut(256)) {
        let (hmask, qs) = (&b[..32], &b[32..96]);
        let scales = scales_q3k(&b[96..108]);
        let d = f16_at(b, 108);
        for (e, o) in out.iter_mut().enumerate() {
            let (chunk, s, l) = (e / 128, (e / 32) % 4, e % 32);
            let ql = ((qs[chunk * 32 + l] >> (2 * s)) & 3) as i8;
            let qh = ((hmask[l] >> (e / 32)) & 1) ^ 1;
            let q = ql - (qh << 2) as i8;
            let dl = d * f32::from(scales[e / 16]);
            *o = dl * f32::from(q);
        }
    }
}

fn dequantize_q4k(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 256, 144);
    for (b, out) in src.chunks_exact(144).zip(dst.chunks_exact_mut(256)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, m) = scale_min_k4(&b[4..16]);
        let qs = &b[16..144];
        for (e, o) in out.iter_mut().enumerate() {
            let (j, l) = (e / 32, e % 32);
            let q = (qs[(j / 2) * 32 + l] >> (4 * (j % 2))) & 0x0F;
            let dl = d * f32::from(sc[j]);
            let ml = dmin * f32::from(m[j]);
            *o = dl * f32::from(q) - ml;
        }
    }
}

fn dequantize_q5k(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 256, 176);
    for (b, out) in src.chunks_exact(176).zip(dst.chunks_exact_mut(256)) {
        let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
        let (sc, m) = scale_min_k4(&b[4..16]);
        let (qh, qs) = (&b[16..48], &b[48..176]);
        for (e, o) in out.iter_mut().enumerate() {
            let (j, l) = (e / 32, e % 32);
            let ql = (qs[(j / 2) * 32 + l] >> (4 * (j % 2))) & 0x0F;
            let q = ql | (((qh[l] >> j) & 1) << 4);
            let dl = d * f32::from(sc[j]);
            let ml = dmin * f32::from(m[j]);
            *o = dl * f32::from(q) - ml;
        }
    }
}

fn dequantize_q6k(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 256, 210);
    for (b, out) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
        let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
        let d = f16_at(b, 208);
        for (e, o) in out.iter_mut().enumerate() {
            let (chunk, k) = (e / 128, e % 128);
            let lo = (ql[chunk * 64 + k % 64] >> (4 * (k / 64))) & 0x0F;
            let hi = (qh[chunk * 32 + k % 32] >> (2 * (k / 32))) & 0x03;
            let q = (lo | (hi << 4)) as i8 - 32;
            let dl = d * f32::from(scales[e / 16] as i8);
            *o = dl * f32::from(q);
        }
    }
}

fn dequantize_q8k(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 256, 292);
    for (b, out) in src.chunks_exact(292).zip(dst.chunks_exact_mut(256)) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for (o, &q) in out.iter_mut().zip(&b[4..260]) {
            *o = d * f32::from(q as i8);
        }
    }
}
