//! AVX-512 dequantization of whole blocks, bit-identical to the scalar reference
//! dequantizers (checked by the `kernel_weights_match_reference_dequant` and
//! determinism tests).
//!
//! The trick for most formats: within a (sub-)block every weight is one of at most 32
//! values `f(q)` of its code `q`, so the table `f(0..32)` is computed with the reference's
//! own float operations (a vector of the same scalar expressions, lane by lane) and each
//! weight is a table lookup (`vpermps` / `vpermi2ps`), no per-weight arithmetic.
//! Q6_K, Q8_0 and Q8_K convert their codes and multiply, as the reference does.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::iq::{scales_iq4xs, KVALUES};
use crate::isa::Sink;
use crate::kquants::{scale_min_k4, scales_q3k};
use crate::{QuantType, TypeTraits};

/// Dequantizes `block` (one block, or for float types `elems` elements, a multiple of 16)
/// and hands the weights to `f` as 16-lane vectors, `f.put(c, w)` for elements `16c..16c+16`
/// in increasing `c` (the kernel's accumulation order); returns false, doing nothing, for
/// a type or length it has no path for.
///
/// # Safety
/// The CPU must support avx512f, avx512bw, avx512vl, fma and f16c; call only from code compiled
/// with those features (the kernel entry point), where this inlines.
#[inline(always)]
pub(crate) unsafe fn for_each<F: Sink<__m512>>(
    traits: &TypeTraits,
    block: &[u8],
    elems: usize,
    f: &mut F,
) -> bool {
    // Every path reads exactly `block_bytes` (float types: `elems` elements) and yields
    // exactly `block_elems` (`elems`) weights; these checks bound the raw reads.
    let (ty, be, bb) = (traits.ty, traits.block_elems, traits.block_bytes);
    if be == 1 {
        if block.len() != elems * bb || !elems.is_multiple_of(16) {
            return false;
        }
    } else if block.len() != bb || elems != be {
        return false;
    }
    let b = block.as_ptr();
    // SAFETY (all arms): the checks above bound every read of `b` to `block`; the CPU features are the caller's guarantee.
    unsafe {
        match ty {
            QuantType::F32 => {
                for c in 0..elems / 16 {
                    f.put(c, _mm512_loadu_ps(b.add(c * 64).cast()));
                }
            }
            QuantType::F16 => {
                for c in 0..elems / 16 {
                    let h = _mm256_loadu_si256(b.add(c * 32).cast());
                    f.put(c, _mm512_cvtph_ps(h));
                }
            }
            QuantType::Bf16 => {
                for c in 0..elems / 16 {
                    let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(b.add(c * 32).cast()));
                    f.put(c, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
                }
            }
            QuantType::Q4_0 => {
                let t = _mm512_mul_ps(_mm512_set1_ps(f16_at(b, 0)), iota_minus(8.0));
                nibbles16(t, b.add(2), 0, f);
            }
            QuantType::Q4_1 => {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let t = _mm512_add_ps(
                    _mm512_mul_ps(_mm512_set1_ps(d), iota_minus(0.0)),
                    _mm512_set1_ps(m),
                );
                nibbles16(t, b.add(4), 0, f);
            }
            QuantType::Iq4Nl => {
                let t = _mm512_mul_ps(_mm512_set1_ps(f16_at(b, 0)), kvalues());
                nibbles16(t, b.add(2), 0, f);
            }
            QuantType::Q5_0 | QuantType::Q5_1 => {
                let d = _mm512_set1_ps(f16_at(b, 0));
                let (t0, t1, qh_at, qs_at) = if ty == QuantType::Q5_0 {
                    (
                        _mm512_mul_ps(d, iota_minus(16.0)),
                        _mm512_mul_ps(d, iota_minus(0.0)),
                        2,
                        6,
                    )
                } else {
                    let m = _mm512_set1_ps(f16_at(b, 2));
                    (
                        _mm512_add_ps(_mm512_mul_ps(d, iota_minus(0.0)), m),
                        _mm512_add_ps(_mm512_mul_ps(d, iota_minus(-16.0)), m),
                        4,
                        8,
                    )
                };
                let qh = u32::from_le_bytes([
                    block[qh_at],
                    block[qh_at + 1],
                    block[qh_at + 2],
                    block[qh_at + 3],
                ]);
                let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(qs_at).cast()));
                let sixteen = _mm512_set1_epi32(16);
                let lo = _mm512_and_si512(q, _mm512_set1_epi32(0x0F));
                let lo = _mm512_mask_or_epi32(lo, qh as u16, lo, sixteen);
                let hi = _mm512_srli_epi32(q, 4);
                let hi = _mm512_mask_or_epi32(hi, (qh >> 16) as u16, hi, sixteen);
                f.put(0, _mm512_permutex2var_ps(t0, lo, t1));
                f.put(1, _mm512_permutex2var_ps(t0, hi, t1));
            }
            QuantType::Q8_0 => {
                let d = _mm512_set1_ps(f16_at(b, 0));
                for c in 0..2 {
                    let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2 + c * 16).cast()));
                    f.put(c, _mm512_mul_ps(_mm512_cvtepi32_ps(q), d));
                }
            }
            QuantType::Q8K => {
                let d =
                    _mm512_set1_ps(f32::from_le_bytes([block[0], block[1], block[2], block[3]]));
                for c in 0..16 {
                    let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(4 + c * 16).cast()));
                    f.put(c, _mm512_mul_ps(d, _mm512_cvtepi32_ps(q)));
                }
            }
            QuantType::Q4K | QuantType::Q5K => {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let (sc, m) = scale_min_k4(&block[4..16]);
                let five = ty == QuantType::Q5K;
                let qs = b.add(if five { 48 } else { 16 });
                let qh = b.add(16);
                for j in 0..8 {
                    let dl = _mm512_set1_ps(d * f32::from(sc[j]));
                    let ml = _mm512_set1_ps(dmin * f32::from(m[j]));
                    let t0 = _mm512_sub_ps(_mm512_mul_ps(dl, iota_minus(0.0)), ml);
                    let shift = _mm_cvtsi32_si128(4 * (j as i32 % 2));
                    for h in 0..2 {
                        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(
                            qs.add((j / 2) * 32 + h * 16).cast(),
                        ));
                        let q = _mm512_srl_epi32(q, shift);
                        let w = if five {
                            let t1 = _mm512_sub_ps(_mm512_mul_ps(dl, iota_minus(-16.0)), ml);
                            let hb = _mm_loadu_si128(qh.add(h * 16).cast());
                            let k = _mm_test_epi8_mask(hb, _mm_set1_epi8((1u8 << j) as i8));
                            let q = _mm512_and_si512(q, _mm512_set1_epi32(0x0F));
                            let q = _mm512_mask_or_epi32(q, k, q, _mm512_set1_epi32(16));
                            _mm512_permutex2var_ps(t0, q, t1)
                        } else {
                            _mm512_permutexvar_ps(q, t0)
                        };
                        f.put(j * 2 + h, w);
                    }
                }
            }
            QuantType::Q6K => {
                let d = f16_at(b, 208);
                let (ql, qh) = (b, b.add(128));
                let mask4 = _mm512_set1_epi32(0x0F);
                let mask2 = _mm512_set1_epi32(0x03);
                let off = _mm512_set1_epi32(32);
                for c in 0..16 {
                    let e = c * 16;
                    let (chunk, k) = (e / 128, e % 128);
                    let lo =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(ql.add(chunk * 64 + k % 64).cast()));
                    let lo = _mm512_and_si512(
                        _mm512_srl_epi32(lo, _mm_cvtsi32_si128(4 * (k / 64) as i32)),
                        mask4,
                    );
                    let hi =
                        _mm512_cvtepu8_epi32(_mm_loadu_si128(qh.add(chunk * 32 + k % 32).cast()));
                    let hi = _mm512_and_si512(
                        _mm512_srl_epi32(hi, _mm_cvtsi32_si128(2 * (k / 32) as i32)),
                        mask2,
                    );
                    let q = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), off);
                    let dl = _mm512_set1_ps(d * f32::from(block[192 + c] as i8));
                    f.put(c, _mm512_mul_ps(dl, _mm512_cvtepi32_ps(q)));
                }
            }
            QuantType::Q2K => {
                let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
                let qs = b.add(16);
                let mask = _mm512_set1_epi32(3);
                for (c, &sc) in block[..16].iter().enumerate() {
                    let e = c * 16;
                    let (chunk, s, l) = (e / 128, (e / 32) % 4, e % 32);
                    let dl = _mm512_set1_ps(d * f32::from(sc & 0x0F));
                    let ml = _mm512_set1_ps(dmin * f32::from(sc >> 4));
                    let t = _mm512_sub_ps(_mm512_mul_ps(dl, iota_minus(0.0)), ml);
                    let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(chunk * 32 + l).cast()));
                    let q = _mm512_and_si512(
                        _mm512_srl_epi32(q, _mm_cvtsi32_si128(2 * s as i32)),
                        mask,
                    );
                    f.put(c, _mm512_permutexvar_ps(q, t));
                }
            }
            QuantType::Q3K => {
                let scales = scales_q3k(&block[96..108]);
                let d = f16_at(b, 108);
                let (hmask, qs) = (b, b.add(32));
                let mask = _mm512_set1_epi32(3);
                let one = _mm512_set1_epi32(1);
                for (c, &sc) in scales.iter().enumerate() {
                    let e = c * 16;
                    let (chunk, s, l) = (e / 128, (e / 32) % 4, e % 32);
                    let dl = _mm512_set1_ps(d * f32::from(sc));
                    // Code `ql | qh << 2` (0..8) stands for `ql - 4·(1 - qh)` = code - 4.
                    let t = _mm512_mul_ps(dl, iota_minus(4.0));
                    let ql = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(chunk * 32 + l).cast()));
                    let ql = _mm512_and_si512(
                        _mm512_srl_epi32(ql, _mm_cvtsi32_si128(2 * s as i32)),
                        mask,
                    );
                    let qh = _mm512_cvtepu8_epi32(_mm_loadu_si128(hmask.add(l).cast()));
                    let qh = _mm512_and_si512(
                        _mm512_srl_epi32(qh, _mm_cvtsi32_si128((e / 32) as i32)),
                        one,
                    );
                    let q = _mm512_or_si512(ql, _mm512_slli_epi32(qh, 2));
                    f.put(c, _mm512_permutexvar_ps(q, t));
                }
            }
            QuantType::Iq4Xs => {
                let d = f16_at(b, 0);
                let scales = scales_iq4xs(block);
                let kv = kvalues();
                for (j, &sc) in scales.iter().enumerate() {
                    let t = _mm512_mul_ps(_mm512_set1_ps(d * f32::from(sc)), kv);
                    nibbles16(t, b.add(8 + j * 16), 2 * j, f);
                }
            }
            _ => return false,
        }
    }
    true
}

/// Lanes `l - k` (`0 - k, 1 - k, ..., 15 - k`; exact small integers).
#[inline(always)]
unsafe fn iota_minus(k: f32) -> __m512 {
    // SAFETY: callers run with AVX-512F.
    unsafe {
        _mm512_sub_ps(
            _mm512_setr_ps(
                0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0,
                15.0,
            ),
            _mm512_set1_ps(k),
        )
    }
}

/// The IQ4_NL values as f32 lanes.
#[inline(always)]
unsafe fn kvalues() -> __m512 {
    let k: [f32; 16] = std::array::from_fn(|i| f32::from(KVALUES[i]));
    // SAFETY: callers run with AVX-512F; `k` has 16 floats.
    unsafe { _mm512_loadu_ps(k.as_ptr()) }
}

/// The 32 weights of the 16 code bytes at `qs` (element `j` the low nibble of byte `j`,
/// element `j + 16` its high nibble) looked up in the 16-entry table `t`, handed to `f` as
/// vectors `c0` and `c0 + 1`.
#[inline(always)]
unsafe fn nibbles16<F: Sink<__m512>>(t: __m512, qs: *const u8, c0: usize, f: &mut F) {
    // SAFETY: callers guarantee 16 readable bytes at `qs` and AVX-512F; `vpermps` reads
    // only the low 4 bits of each index.
    unsafe {
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.cast()));
        f.put(c0, _mm512_permutexvar_ps(q, t));
        f.put(c0 + 1, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t));
    }
}

/// The little-endian f16 at `b + i` as f32 (exact; F16C `vcvtph2ps`).
#[inline(always)]
unsafe fn f16_at(b: *const u8, i: usize) -> f32 {
    // SAFETY: callers guarantee 2 readable bytes at `b + i` and F16C (every AVX-512 CPU).
    unsafe {
        let h = std::ptr::read_unaligned(b.add(i).cast::<u16>());
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le(h)))))
    }
}
