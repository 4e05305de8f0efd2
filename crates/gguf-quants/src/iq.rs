//! The non-linear 4-bit formats: IQ4_NL (32 elements) and IQ4_XS (256-element super-block
//! of IQ4_NL codes with 6-bit sub-block scales). Codes index [`KVALUES`].

use crate::{blocks_of, f16_at, QuantType, TypeTraits};

/// ggml's `kvalues_iq4nl`: the 16 values a 4-bit IQ4 code stands for.
pub(crate) const KVALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// IQ4_NL: `d: f16, qs: [u8; 16]`, `w = d·KVALUES[q]`.
pub(crate) const IQ4_NL_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Iq4Nl,
    block_elems: 32,
    block_bytes: 18,
    dequantize: dequantize_iq4_nl,
};

/// IQ4_XS: `d: f16, scales_h: u16, scales_l: [u8; 4], qs: [u8; 128]`,
/// `w = (d·(sc - 32))·KVALUES[q]`.
pub(crate) const IQ4_XS_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Iq4Xs,
    block_elems: 256,
    block_bytes: 136,
    dequantize: dequantize_iq4_xs,
};

/// The 8 signed 6-bit sub-block scales of an IQ4_XS block (already minus 32).
#[inline(always)]
pub(crate) fn scales_iq4xs(b: &[u8]) -> [i8; 8] {
    let h = u16::from_le_bytes([b[2], b[3]]);
    let mut out = [0i8; 8];
    for (j, o) in out.iter_mut().enumerate() {
        let lo = (b[4 + j / 2] >> (4 * (j % 2))) & 0x0F;
        let hi = ((h >> (2 * j)) as u8) & 0x03;
        *o = (lo | (hi << 4)) as i8 - 32;
    }
    out
}

fn dequantize_iq4_nl(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 32, 18);
    for (b, out) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        for (j, o) in out.iter_mut().enumerate() {
            let q = (b[2 + j % 16] >> (4 * (j / 16))) & 0x0F;
            *o = d * f32::from(KVALUES[usize::from(q)]);
        }
    }
}

fn dequantize_iq4_xs(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 256, 136);
    for (b, out) in src.chunks_exact(136).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(b, 0);
        let scales = scales_iq4xs(b);
        for (e, o) in out.iter_mut().enumerate() {
            let (j, l) = (e / 32, e % 32);
            let q = (b[8 + j * 16 + l % 16] >> (4 * (l / 16))) & 0x0F;
            let dl = d * f32::from(scales[j]);
            *o = dl * f32::from(KVALUES[usize::from(q)]);
        }
    }
}
