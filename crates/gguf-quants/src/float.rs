//! Plain float tensors: F32, F16, BF16 (a "block" of one element).

use crate::{blocks_of, QuantType, TypeTraits};

/// F32: the little-endian bytes as they are.
pub(crate) const F32_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::F32,
    block_elems: 1,
    block_bytes: 4,
    dequantize: dequantize_f32,
};

/// F16: exact conversion to f32 (numpy's `astype(np.float32)`).
pub(crate) const F16_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::F16,
    block_elems: 1,
    block_bytes: 2,
    dequantize: dequantize_f16,
};

/// BF16: the 16 bits become the top half of an f32.
pub(crate) const BF16_TRAITS: TypeTraits = TypeTraits {
    ty: QuantType::Bf16,
    block_elems: 1,
    block_bytes: 2,
    dequantize: dequantize_bf16,
};

fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 1, 4);
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
    }
}

fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 1, 2);
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = half::f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
    }
}

fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    blocks_of(src, dst, 1, 2);
    for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f32::from_bits(u32::from(u16::from_le_bytes([s[0], s[1]])) << 16);
    }
}
