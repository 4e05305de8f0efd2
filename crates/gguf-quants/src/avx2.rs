//! AVX2 block decoders, bit-identical to the scalar reference dequantizers (checked by
//! the same tests as the AVX-512 ones). A 16-lane vector is two `__m256`.
//!
//! AVX2 has no 16-entry float table lookup, so codes are unpacked to integers (bytes
//! first where that is cheaper, `vpshufb` for the IQ4 values), converted exactly to f32
//! and scaled with the reference's own operations (`d·q`, `d·q + m`, `dl·q - ml`).
//! Formats without a decoder here (Q2_K, Q3_K) use the reference through
//! [`crate::kernel::refdec`].
//!
//! Every decoder reads its block through a raw pointer after checking the block's length;
//! the CPU features (AVX2, FMA, F16C) are guaranteed by the [`Avx2`] token, which exists
//! only inside `run_avx2`, where these `#[inline(always)]` functions inline.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::iq::{scales_iq4xs, KVALUES};
use crate::isa::x86::Avx2;
use crate::kernel::{unroll, Dec256, Dec32};

pub(crate) use crate::kernel::refdec::{Q2K, Q3K};

/// 16 lanes.
type V = (__m256, __m256);

/// Panics unless `block` holds at least `n` bytes: the bound of every raw read below.
#[inline(always)]
fn check(block: &[u8], n: usize) -> *const u8 {
    assert!(block.len() >= n, "block of {} bytes, need {n}", block.len());
    block.as_ptr()
}

/// Declares a unit decoder type.
macro_rules! decoder {
    ($($name:ident),*) => {$(
        /// The AVX2 decoder of the format of the same name.
        #[derive(Clone, Copy)]
        #[allow(non_camel_case_types)]
        pub(crate) struct $name;
    )*};
}
decoder!(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q4K, Q5K, Q6K, Q8K, IQ4_XS);

/// 16 signed bytes as exact f32 lanes.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn i8x16(v: __m128i) -> V {
    // SAFETY: the caller's guarantee.
    unsafe {
        (
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v))),
        )
    }
}

/// The 16 signed bytes at `p` as exact f32 lanes.
///
/// # Safety
/// AVX2 and 16 readable bytes at `p`.
#[inline(always)]
unsafe fn i8x16_at(p: *const u8) -> V {
    // SAFETY: the caller's guarantees.
    unsafe {
        (
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.cast()))),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8).cast()))),
        )
    }
}

/// `a·b` per lane.
#[inline(always)]
unsafe fn mul(a: V, b: __m256) -> V {
    // SAFETY: AVX (the caller's).
    unsafe { (_mm256_mul_ps(a.0, b), _mm256_mul_ps(a.1, b)) }
}

/// `a + b` per lane.
#[inline(always)]
unsafe fn add(a: V, b: __m256) -> V {
    // SAFETY: AVX (the caller's).
    unsafe { (_mm256_add_ps(a.0, b), _mm256_add_ps(a.1, b)) }
}

/// The low and high nibbles of the 16 bytes at `p`, as bytes.
///
/// # Safety
/// AVX2 and 16 readable bytes at `p`.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> (__m128i, __m128i) {
    // SAFETY: the caller's guarantees.
    unsafe {
        let v = _mm_loadu_si128(p.cast());
        let m = _mm_set1_epi8(0x0F);
        (_mm_and_si128(v, m), _mm_and_si128(_mm_srli_epi16(v, 4), m))
    }
}

/// The little-endian f16 at `b + i` as f32 (exact; F16C `vcvtph2ps`).
#[inline(always)]
unsafe fn f16_at(b: *const u8, i: usize) -> f32 {
    // SAFETY: callers guarantee 2 readable bytes at `b + i` and F16C.
    unsafe {
        let h = std::ptr::read_unaligned(b.add(i).cast::<u16>());
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(u16::from_le(h)))))
    }
}

/// The IQ4_NL values as a `vpshufb` table.
#[inline(always)]
unsafe fn kv_table() -> __m128i {
    // SAFETY: SSE2 (the caller's); `KVALUES` has 16 bytes.
    unsafe { _mm_loadu_si128(KVALUES.as_ptr().cast()) }
}

/// The fifth bits of a Q5 block (bit `j` of `qh` for element `j`) as bytes `0` / `16`.
///
/// # Safety
/// AVX2.
#[inline(always)]
unsafe fn fifth_bits(qh: u32) -> __m256i {
    // SAFETY: the caller's guarantee.
    unsafe {
        let v = _mm256_set1_epi32(qh as i32);
        // Byte j takes byte j / 8 of qh (each 128-bit lane holds all four).
        let pick = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let v = _mm256_and_si256(_mm256_shuffle_epi8(v, pick), bits);
        _mm256_and_si256(_mm256_cmpeq_epi8(v, bits), _mm256_set1_epi8(16))
    }
}

impl Dec32<Avx2> for F32 {
    #[inline(always)]
    fn bytes(self) -> usize {
        128
    }
    #[inline(always)]
    fn block(self, _: Avx2, block: &[u8]) -> [V; 2] {
        let b = check(block, 128);
        // SAFETY: 128 bytes at `b` (checked); AVX (the token).
        unsafe {
            unroll!(c in 2 => {
                let p = b.add(64 * c).cast::<f32>();
                (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)))
            })
        }
    }
}

impl Dec32<Avx2> for F16 {
    #[inline(always)]
    fn bytes(self) -> usize {
        64
    }
    #[inline(always)]
    fn block(self, _: Avx2, block: &[u8]) -> [V; 2] {
        let b = check(block, 64);
        // SAFETY: 64 bytes at `b` (checked); F16C (the token).
        unsafe {
            unroll!(c in 2 => {
                let p = b.add(32 * c);
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(p.add(16).cast())),
                )
            })
        }
    }
}

impl Dec32<Avx2> for BF16 {
    #[inline(always)]
    fn bytes(self) -> usize {
        64
    }
    #[inline(always)]
    fn block(self, _: Avx2, block: &[u8]) -> [V; 2] {
        let b = check(block, 64);
        // SAFETY: 64 bytes at `b` (checked); AVX2 (the token).
        unsafe {
            macro_rules! one {
                ($p:expr) => {
                    _mm256_castsi256_ps(_mm256_slli_epi32(
                        _mm256_cvtepu16_epi32(_mm_loadu_si128($p.cast())),
                        16,
                    ))
                };
            }
            unroll!(c in 2 => (one!(b.add(32 * c)), one!(b.add(32 * c + 16))))
        }
    }
}

impl Dec32<Avx2> for Q4_0 {
    #[inline(always)]
    fn bytes(self) -> usize {
        18
    }
    #[inline(always)]
    fn block(self, _: Avx2, block: &[u8]) -> [V; 2] {
        let b = check(block, 18);
        // SAFETY: 18 bytes at `b` (checked); AVX2, F16C (the token).
        unsafe {
            let d = _mm256_set1_ps(f16_at(b, 0));
            let (lo, hi) = nibbles(b.add(2));
            let eight = _mm_set1_epi8(8);
            [
                mul(i8x16(_mm_sub_epi8(lo, eight)), d),
                mul(i8x16(_mm_sub_epi8(hi, eight)), d),
            ]
        }
    }
}

impl Dec32<Avx2> for Q4_1 {
    #[inline(always)]
    fn bytes(self) -> usize {
        20
    }
    #[inline(always)]
    fn block(self, _: Avx2, block: &[u8]) -> [V; 2] {
        let b = check(block, 20);
        // SAFETY: 20 bytes at `b` (checked); AVX2, F16C (the token).
        unsafe {
            let d = _mm256_set1_ps(f16_at(b, 0));
            let m = _mm256_set1_ps(f16_at(b, 2));
            let (lo, hi) = nibbles(b.add(4));
            // Nibbles are 0..16: as signed bytes they convert the same.
            [add(mul(i8x16(lo), d), m), add(mul(i8x16(hi), d), m)]
        }
    }
}

impl Dec32<Avx2> for IQ4_NL {
    #[inline(always)]
    fn bytes(self) -> usize {
        18
    }
    #[inline(always)]
    fn block(self, _: Avx2, block: &[u8]) -> [V; 2] {
        let b = check(block, 18);
        // SAFETY: 18 bytes at `b` (checked); AVX2, F16C (the token).
        unsafe {
            let d = _mm256_set1_ps(f16_at(b, 0));
            let (lo, hi) = nibbles(b.add(2));
            let kv = kv_table();
            [
                mul(i8x16(_mm_shuffle_epi8(kv, lo)), d),
                mul(i8x16(_mm_shuffle_epi8(kv, hi)), d),
            ]
        }
    }
}

/// The 32 codes `0..32` of a Q5 block (nibbles at `qs`, fifth bits `qh`), minus `off`.
///
/// # Safety
/// AVX2 and 16 readable bytes at `qs`.
#[inline(always)]
unsafe fn q5_codes(qh: u32, qs: *const u8, off: i8) -> (__m128i, __m128i) {
    // SAFETY: the caller's guarantees.
    unsafe {
        let (lo, hi) = nibbles(qs);
        let q = _mm256_or_si256(_mm256_set_m128i(hi, lo), fifth_bits(qh));
        let q = _mm256_sub_epi8(q, _mm256_set1_epi8(off));
        (_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1))
    }
}

impl Dec32<Avx2> for Q5_0 {
    #[inline(always)]
    fn bytes(self) -> usize {
        22
    }
    #[inline(always)]
    fn block(self, _: Avx2, block: &[u8]) -> [V; 2] {
        let b = check(block, 22);
        // SAFETY: 22 bytes at `b` (checked); AVX2, F16C (the token).
        unsafe {
            let d = _mm256_set1_ps(f16_at(b, 0));
            let qh = std::ptr::read_unaligned(b.add(2).cast::<u32>()).to_le();
            let (lo, hi) = q5_codes(qh, b.add(6), 16);
            [mul(i8x16(lo), d), mul(i8x16(hi), d)]
        }
    }
}

impl Dec32<Avx2> for Q5_1 {
    #[inline(always)]
    fn bytes(self) -> usize {
        24
    }
    #[inline(always)]
    fn block(self, _: Avx2, block: &[u8]) -> [V; 2] {
        let b = check(block, 24);
        // SAFETY: 24 bytes at `b` (checked); AVX2, F16C (the token).
        unsafe {
            let d = _mm256_set1_ps(f16_at(b, 0));
            let m = _mm256_set1_ps(f16_at(b, 2));
            let qh = std::ptr::read_unaligned(b.add(4).cast::<u32>()).to_le();
            let (lo, hi) = q5_codes(qh, b.add(8), 0);
            [add(mul(i8x16(lo), d), m), add(mul(i8x16(hi), d), m)]
        }
    }
}

impl Dec32<Avx2> for Q8_0 {
    #[inline(always)]
    fn bytes(self) -> usize {
        34
    }
    #[inline(always)]
    fn block(self, _: Avx2, block: &[u8]) -> [V; 2] {
        let b = check(block, 34);
        // SAFETY: 34 bytes at `b` (checked); AVX2, F16C (the token).
        unsafe {
            let d = _mm256_set1_ps(f16_at(b, 0));
            [mul(i8x16_at(b.add(2)), d), mul(i8x16_at(b.add(18)), d)]
        }
    }
}

impl Dec256<Avx2> for Q8K {
    type State = f32;
    #[inline(always)]
    fn bytes(self) -> usize {
        292
    }
    #[inline(always)]
    fn begin(self, _: Avx2, block: &[u8]) -> f32 {
        check(block, 292);
        f32::from_le_bytes([block[0], block[1], block[2], block[3]])
    }
    #[inline(always)]
    fn quarter(self, _: Avx2, d: &f32, block: &[u8], q: usize) -> [V; 4] {
        let b = check(block, 292);
        let q = q % 4;
        // SAFETY: bytes `4 + 64q .. 68 + 64q` ≤ 260; AVX2 (the token).
        unsafe {
            let d = _mm256_set1_ps(*d);
            unroll!(c in 4 => {
                let v = i8x16_at(b.add(4 + 64 * q + 16 * c));
                (_mm256_mul_ps(d, v.0), _mm256_mul_ps(d, v.1))
            })
        }
    }
}

/// `d·sc[j]` and `dmin·m[j]` of the 8 sub-blocks of a Q4_K / Q5_K block (the
/// reference's products, 8 lanes at a time; the 6-bit unpacking of `scale_min_k4` on
/// 32-bit words).
///
/// # Safety
/// AVX2 and F16C (also every AVX-512 CPU of [`crate::Isa::Avx512`]); `block` has at least
/// 16 bytes (checked).
#[inline(always)]
pub(crate) unsafe fn scales_k4(block: &[u8]) -> ([f32; 8], [f32; 8]) {
    let b = check(block, 16);
    // SAFETY: 16 bytes at `b` (checked); the caller's CPU features.
    unsafe {
        macro_rules! word {
            ($i:expr) => {
                u32::from_le(std::ptr::read_unaligned(b.add($i).cast::<u32>()))
            };
        }
        let (a, m, c) = (word!(4), word!(8), word!(12));
        let sc_lo = a & 0x3F3F_3F3F;
        let m_lo = m & 0x3F3F_3F3F;
        let sc_hi = (c & 0x0F0F_0F0F) | ((a >> 2) & 0x3030_3030);
        let m_hi = ((c >> 4) & 0x0F0F_0F0F) | ((m >> 2) & 0x3030_3030);
        let sc = u64::from(sc_lo) | (u64::from(sc_hi) << 32);
        let mn = u64::from(m_lo) | (u64::from(m_hi) << 32);
        let dd = _mm_cvtph_ps(_mm_cvtsi32_si128(word!(0) as i32));
        let d = _mm256_broadcastss_ps(dd);
        let dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(dd));
        macro_rules! to_f32 {
            ($v:expr) => {
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128($v as i64)))
            };
        }
        let (mut dl, mut ml) = ([0.0f32; 8], [0.0f32; 8]);
        _mm256_storeu_ps(dl.as_mut_ptr(), _mm256_mul_ps(d, to_f32!(sc)));
        _mm256_storeu_ps(ml.as_mut_ptr(), _mm256_mul_ps(dmin, to_f32!(mn)));
        (dl, ml)
    }
}

/// `d·scales[c]` of the 16 sub-blocks of a Q6_K block.
///
/// # Safety
/// AVX2 and F16C (also every AVX-512 CPU of [`crate::Isa::Avx512`]); `block` has at least
/// 210 bytes (checked).
#[inline(always)]
pub(crate) unsafe fn scales_q6k(block: &[u8]) -> [f32; 16] {
    let b = check(block, 210);
    // SAFETY: bytes 192..210 (checked); the caller's CPU features.
    unsafe {
        let d = _mm256_set1_ps(f16_at(b, 208));
        let mut dl = [0.0f32; 16];
        for h in 0..2 {
            let v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(192 + 8 * h).cast()));
            _mm256_storeu_ps(
                dl.as_mut_ptr().add(8 * h),
                _mm256_mul_ps(d, _mm256_cvtepi32_ps(v)),
            );
        }
        dl
    }
}

/// `dl·q - ml` for 8 codes in dword lanes.
#[inline(always)]
unsafe fn k_weights(q: __m256i, dl: __m256, ml: __m256) -> __m256 {
    // SAFETY: AVX (the caller's).
    unsafe { _mm256_sub_ps(_mm256_mul_ps(dl, _mm256_cvtepi32_ps(q)), ml) }
}

impl Dec256<Avx2> for Q4K {
    type State = ([f32; 8], [f32; 8]);
    #[inline(always)]
    fn bytes(self) -> usize {
        144
    }
    #[inline(always)]
    fn begin(self, _: Avx2, block: &[u8]) -> Self::State {
        // SAFETY: AVX2 and F16C (the token).
        unsafe { scales_k4(block) }
    }
    #[inline(always)]
    fn quarter(self, _: Avx2, st: &Self::State, block: &[u8], q: usize) -> [V; 4] {
        let b = check(block, 144);
        let q = q % 4;
        let (dl, ml) = st;
        // SAFETY: bytes `16 + 32q .. 48 + 32q` ≤ 144; AVX2 (the token).
        unsafe {
            let qs = b.add(16 + 32 * q);
            let m4 = _mm256_set1_epi32(0x0F);
            let c: [__m256i; 4] =
                unroll!(k in 4 => _mm256_cvtepu8_epi32(_mm_loadl_epi64(qs.add(8 * k).cast())));
            let (d0, m0) = (_mm256_set1_ps(dl[2 * q]), _mm256_set1_ps(ml[2 * q]));
            let (d1, m1) = (_mm256_set1_ps(dl[2 * q + 1]), _mm256_set1_ps(ml[2 * q + 1]));
            let lo: [__m256; 4] = unroll!(k in 4 => k_weights(_mm256_and_si256(c[k], m4), d0, m0));
            let hi: [__m256; 4] = unroll!(k in 4 => k_weights(_mm256_srli_epi32(c[k], 4), d1, m1));
            [
                (lo[0], lo[1]),
                (lo[2], lo[3]),
                (hi[0], hi[1]),
                (hi[2], hi[3]),
            ]
        }
    }
}

impl Dec256<Avx2> for Q5K {
    type State = ([f32; 8], [f32; 8]);
    #[inline(always)]
    fn bytes(self) -> usize {
        176
    }
    #[inline(always)]
    fn begin(self, _: Avx2, block: &[u8]) -> Self::State {
        // SAFETY: AVX2 and F16C (the token).
        unsafe { scales_k4(block) }
    }
    #[inline(always)]
    fn quarter(self, _: Avx2, st: &Self::State, block: &[u8], q: usize) -> [V; 4] {
        let b = check(block, 176);
        let q = q % 4;
        let (dl, ml) = st;
        // SAFETY: qh is bytes 16..48, qs `48 + 32q .. 80 + 32q` ≤ 176; AVX2 (the token);
        // `codes` has 64 bytes.
        unsafe {
            let v = _mm256_loadu_si256(b.add(48 + 32 * q).cast());
            let qh = _mm256_loadu_si256(b.add(16).cast());
            let m4 = _mm256_set1_epi8(0x0F);
            let one = _mm256_set1_epi8(1);
            macro_rules! fifth {
                ($j:expr) => {
                    _mm256_slli_epi16(
                        _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128($j)), one),
                        4,
                    )
                };
            }
            let j = 2 * q as i32;
            let lo = _mm256_or_si256(_mm256_and_si256(v, m4), fifth!(j));
            let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4), fifth!(j + 1));
            let mut codes = [0u8; 64];
            _mm256_storeu_si256(codes.as_mut_ptr().cast(), lo);
            _mm256_storeu_si256(codes.as_mut_ptr().add(32).cast(), hi);
            let p = codes.as_ptr();
            macro_rules! w {
                ($k:expr, $d:expr, $m:expr) => {
                    k_weights(
                        _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8 * $k).cast())),
                        $d,
                        $m,
                    )
                };
            }
            let (d0, m0) = (_mm256_set1_ps(dl[2 * q]), _mm256_set1_ps(ml[2 * q]));
            let (d1, m1) = (_mm256_set1_ps(dl[2 * q + 1]), _mm256_set1_ps(ml[2 * q + 1]));
            [
                (w!(0, d0, m0), w!(1, d0, m0)),
                (w!(2, d0, m0), w!(3, d0, m0)),
                (w!(4, d1, m1), w!(5, d1, m1)),
                (w!(6, d1, m1), w!(7, d1, m1)),
            ]
        }
    }
}

impl Dec256<Avx2> for Q6K {
    type State = [f32; 16];
    #[inline(always)]
    fn bytes(self) -> usize {
        210
    }
    #[inline(always)]
    fn begin(self, _: Avx2, block: &[u8]) -> [f32; 16] {
        // SAFETY: AVX2 and F16C (the token).
        unsafe { scales_q6k(block) }
    }
    #[inline(always)]
    fn quarter(self, _: Avx2, dl: &[f32; 16], block: &[u8], q: usize) -> [V; 4] {
        let b = check(block, 210);
        let q = q % 4;
        let (chunk, h) = (q / 2, q % 2);
        // SAFETY: ql bytes `64·chunk .. +64` ≤ 128, qh `128 + 32·chunk .. +32` ≤ 192;
        // AVX2 (the token); `codes` has 64 bytes.
        unsafe {
            let m4 = _mm256_set1_epi8(0x0F);
            let three = _mm256_set1_epi8(3);
            let ql = b.add(64 * chunk);
            let qh = _mm256_loadu_si256(b.add(128 + 32 * chunk).cast());
            let mut codes = [0i8; 64];
            for half in 0..2 {
                let v = _mm256_loadu_si256(ql.add(32 * half).cast());
                let lo = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(4 * h as i32)), m4);
                let sh = _mm_cvtsi32_si128((4 * h + 2 * half) as i32);
                let hi = _mm256_and_si256(_mm256_srl_epi16(qh, sh), three);
                let code = _mm256_sub_epi8(
                    _mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)),
                    _mm256_set1_epi8(32),
                );
                _mm256_storeu_si256(codes.as_mut_ptr().add(32 * half).cast(), code);
            }
            let p = codes.as_ptr().cast::<u8>();
            unroll!(c in 4 => mul(i8x16_at(p.add(16 * c)), _mm256_set1_ps(dl[4 * q + c])))
        }
    }
}

impl Dec256<Avx2> for IQ4_XS {
    type State = [f32; 8];
    #[inline(always)]
    fn bytes(self) -> usize {
        136
    }
    #[inline(always)]
    fn begin(self, _: Avx2, block: &[u8]) -> [f32; 8] {
        check(block, 136);
        let d = crate::f16_at(block, 0);
        let scales = scales_iq4xs(block);
        unroll!(j in 8 => d * f32::from(scales[j]))
    }
    #[inline(always)]
    fn quarter(self, _: Avx2, dl: &[f32; 8], block: &[u8], q: usize) -> [V; 4] {
        let b = check(block, 136);
        let q = q % 4;
        // SAFETY: codes `8 + 32q .. 40 + 32q` ≤ 136; AVX2 (the token).
        unsafe {
            let kv = kv_table();
            let [(a, b2), (c, d)] = unroll!(h in 2 => {
                let j = 2 * q + h;
                let d = _mm256_set1_ps(dl[j]);
                let (lo, hi) = nibbles(b.add(8 + 16 * j));
                (
                    mul(i8x16(_mm_shuffle_epi8(kv, lo)), d),
                    mul(i8x16(_mm_shuffle_epi8(kv, hi)), d),
                )
            });
            [a, b2, c, d]
        }
    }
}
