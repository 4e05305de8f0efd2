//! The 32-element legacy formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.
//!
//! Element `j < 16` of a 4-bit block is the low nibble of code byte `j`, element `j + 16`
//! its high nibble; 5-bit formats take bit `j` of the 32-bit `qh` as the fifth bit of
//! element `j`. Float operations follow gguf-py exactly: `d·q` or `(d·q) + m`.

use crate::{blocks_of, f16_at, QuantType, TypeTraits};

/// Q4_0: `d: f16, qs: [u8; 16]`, `w = d·(q - 8)`.
pub(crate) const Q4_0_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q4_0,
    block_elems: 32,
    block_bytes: 18,
    dequantize: dequantize_q4_0,
};

/// Q4_1: `d: f16, m: f16, qs: [u8; 16]`, `w = d·q + m`.
pub(crate) const Q4_1_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q4_1,
    block_elems: 32,
    block_bytes: 20,
    dequantize: dequantize_q4_1,
};

/// Q5_0: `d: f16, qh: u32, qs: [u8; 16]`, `w = d·(q - 16)`.
pub(crate) const Q5_0_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q5_0,
    block_elems: 32,
    block_bytes: 22,
    dequantize: dequantize_q5_0,
};

/// Q5_1: `d: f16, m: f16, qh: u32, qs: [u8; 16]`, `w = d·q + m`.
pub(crate) const Q5_1_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q5_1,
    block_elems: 32,
    block_bytes: 24,
    dequantize: dequantize_q5_1,
};

/// Q8_0: `d: f16, qs: [i8; 32]`, `w = q·d`.
pub(crate) const Q8_0_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Q8_0,
    block_elems: 32,
    block_bytes: 34,
    dequantize: dequantize_q8_0,
};

/// The 4-bit code of element `j` (0..32) from 16 code bytes.
#[inline(always)]
fn nibble(qs: &[u8], j: usize) -> u8 {
    (qs[j % 16] >> (4 * (j / 16))) & 0x0F
}

fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 32, 18);
    for (b, out) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (j, o) in out.iter_mut().enumerate() {
            *o = d * f32::from(nibble(&b[2..], j) as i8 - 8);
        }
    }
}

fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 32, 20);
    for (b, out) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        for (j, o) in out.iter_mut().enumerate() {
            *o = d * f32::from(nibble(&b[4..], j)) + m;
        }
    }
}

fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 32, 22);
    for (b, out) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for (j, o) in out.iter_mut().enumerate() {
            let q = nibble(&b[6..], j) | ((((qh >> j) & 1) as u8) << 4);
            *o = d * f32::from(q as i8 - 16);
        }
    }
}

fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 32, 24);
    for (b, out) in src.chunks_exact(24).zip(dst.chunks_exact_mut(32)) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        for (j, o) in out.iter_mut().enumerate() {
            let q = nibble(&b[8..], j) | ((((qh >> j) & 1) as u8) << 4);
            *o = d * f32::from(q) + m;
        }
    }
}

fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 32, 34);
    for (b, out) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (o, &q) in out.iter_mut().zip(&b[2..]) {
            *o = f32::from(q as i8) * d;
        }
    }
}
