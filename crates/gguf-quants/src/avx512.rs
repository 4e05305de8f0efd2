//! AVX-512 block decoders, bit-identical to the scalar reference dequantizers (checked by
//! `dequantize_matches_gguf_py`, `kernel_weights_match_reference_dequant` and the
//! determinism tests).
//!
//! The trick for most formats: within a (sub-)block every weight is one of at most 32
//! values `f(q)` of its code `q`, so the table `f(0..32)` is computed with the reference's
//! own float operations (a vector of the same scalar expressions, lane by lane) and each
//! weight is a table lookup (`vpermps` / `vpermi2ps`, which read only the low 4 / 5 index
//! bits, so most codes need no masking), no per-weight arithmetic. Q6_K, Q8_0 and Q8_K
//! convert their codes and multiply, as the reference does.
//!
//! Every decoder reads its block through a raw pointer after checking the block's length
//! (one compare per block); the CPU features are guaranteed by the [`Avx512`] token, which
//! exists only inside `run_avx512`, where these `#[inline(always)]` functions inline.
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::avx2::{scales_k4, scales_q6k};
use crate::iq::{scales_iq4xs, KVALUES};
use crate::isa::x86::Avx512;
use crate::kernel::{unroll, Dec256, Dec32};
use crate::kquants::scales_q3k;

/// Panics unless `block` holds at least `n` bytes: the bound of every raw read below.
#[inline(always)]
fn check(block: &[u8], n: usize) -> *const u8 {
    assert!(block.len() >= n, "block of {} bytes, need {n}", block.len());
    block.as_ptr()
}

/// Declares a unit decoder type.
macro_rules! decoder {
    ($($name:ident),*) => {$(
        /// The AVX-512 decoder of the format of the same name.
        #[derive(Clone, Copy)]
        #[allow(non_camel_case_types)]
        pub(crate) struct $name;
    )*};
}
decoder!(
    F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q2K, Q3K, Q4K, Q5K, Q6K, Q8K, IQ4_XS
);

impl Dec32<Avx512> for F32 {
    #[inline(always)]
    fn bytes(self) -> usize {
        128
    }
    #[inline(always)]
    fn block(self, _: Avx512, block: &[u8]) -> [__m512; 2] {
        let b = check(block, 128);
        // SAFETY: 128 bytes at `b` (checked); AVX-512F (the token).
        unsafe { [_mm512_loadu_ps(b.cast()), _mm512_loadu_ps(b.add(64).cast())] }
    }
}

impl Dec32<Avx512> for F16 {
    #[inline(always)]
    fn bytes(self) -> usize {
        64
    }
    #[inline(always)]
    fn block(self, _: Avx512, block: &[u8]) -> [__m512; 2] {
        let b = check(block, 64);
        // SAFETY: 64 bytes at `b` (checked); AVX-512F (the token).
        unsafe {
            [
                _mm512_cvtph_ps(_mm256_loadu_si256(b.cast())),
                _mm512_cvtph_ps(_mm256_loadu_si256(b.add(32).cast())),
            ]
        }
    }
}

impl Dec32<Avx512> for BF16 {
    #[inline(always)]
    fn bytes(self) -> usize {
        64
    }
    #[inline(always)]
    fn block(self, _: Avx512, block: &[u8]) -> [__m512; 2] {
        let b = check(block, 64);
        // SAFETY: 64 bytes at `b` (checked); AVX-512F (the token).
        unsafe {
            unroll!(c in 2 => {
                let h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(b.add(32 * c).cast()));
                _mm512_castsi512_ps(_mm512_slli_epi32(h, 16))
            })
        }
    }
}

impl Dec32<Avx512> for Q4_0 {
    #[inline(always)]
    fn bytes(self) -> usize {
        18
    }
    #[inline(always)]
    fn block(self, _: Avx512, block: &[u8]) -> [__m512; 2] {
        let b = check(block, 18);
        // SAFETY: 18 bytes at `b` (checked); AVX-512 (the token).
        unsafe {
            let t = _mm512_mul_ps(_mm512_set1_ps(f16_at(b, 0)), iota_minus(8.0));
            nibbles16(t, t, b.add(2))
        }
    }
}

impl Dec32<Avx512> for Q4_1 {
    #[inline(always)]
    fn bytes(self) -> usize {
        20
    }
    #[inline(always)]
    fn block(self, _: Avx512, block: &[u8]) -> [__m512; 2] {
        let b = check(block, 20);
        // SAFETY: 20 bytes at `b` (checked); AVX-512 (the token).
        unsafe {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let t = _mm512_add_ps(
                _mm512_mul_ps(_mm512_set1_ps(d), iota_minus(0.0)),
                _mm512_set1_ps(m),
            );
            nibbles16(t, t, b.add(4))
        }
    }
}

impl Dec32<Avx512> for IQ4_NL {
    #[inline(always)]
    fn bytes(self) -> usize {
        18
    }
    #[inline(always)]
    fn block(self, _: Avx512, block: &[u8]) -> [__m512; 2] {
        let b = check(block, 18);
        // SAFETY: 18 bytes at `b` (checked); AVX-512 (the token).
        unsafe {
            let t = _mm512_mul_ps(_mm512_set1_ps(f16_at(b, 0)), kvalues());
            nibbles16(t, t, b.add(2))
        }
    }
}

/// The 32 weights of a Q5 block: tables `t0` (codes 0..16) and `t1` (16..32), the fifth
/// bits `qh` (bit `j` for element `j`), the 16 nibble bytes at `qs`.
///
/// # Safety
/// AVX-512F/BW and 16 readable bytes at `qs`.
#[inline(always)]
unsafe fn q5(t0: __m512, t1: __m512, qh: u32, qs: *const u8) -> [__m512; 2] {
    // SAFETY: the caller's guarantees.
    unsafe {
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.cast()));
        let hi = _mm512_srli_epi32(q, 4);
        // `vpermps` reads the low 4 index bits; the fifth bit picks the second table.
        let w0 = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(q, t0), qh as u16, q, t1);
        let w1 =
            _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(hi, t0), (qh >> 16) as u16, hi, t1);
        [w0, w1]
    }
}

impl Dec32<Avx512> for Q5_0 {
    #[inline(always)]
    fn bytes(self) -> usize {
        22
    }
    #[inline(always)]
    fn block(self, _: Avx512, block: &[u8]) -> [__m512; 2] {
        let b = check(block, 22);
        // SAFETY: 22 bytes at `b` (checked); AVX-512 (the token).
        unsafe {
            let d = _mm512_set1_ps(f16_at(b, 0));
            let qh = std::ptr::read_unaligned(b.add(2).cast::<u32>()).to_le();
            q5(
                _mm512_mul_ps(d, iota_minus(16.0)),
                _mm512_mul_ps(d, iota_minus(0.0)),
                qh,
                b.add(6),
            )
        }
    }
}

impl Dec32<Avx512> for Q5_1 {
    #[inline(always)]
    fn bytes(self) -> usize {
        24
    }
    #[inline(always)]
    fn block(self, _: Avx512, block: &[u8]) -> [__m512; 2] {
        let b = check(block, 24);
        // SAFETY: 24 bytes at `b` (checked); AVX-512 (the token).
        unsafe {
            let d = _mm512_set1_ps(f16_at(b, 0));
            let m = _mm512_set1_ps(f16_at(b, 2));
            let qh = std::ptr::read_unaligned(b.add(4).cast::<u32>()).to_le();
            q5(
                _mm512_add_ps(_mm512_mul_ps(d, iota_minus(0.0)), m),
                _mm512_add_ps(_mm512_mul_ps(d, iota_minus(-16.0)), m),
                qh,
                b.add(8),
            )
        }
    }
}

impl Dec32<Avx512> for Q8_0 {
    #[inline(always)]
    fn bytes(self) -> usize {
        34
    }
    #[inline(always)]
    fn block(self, _: Avx512, block: &[u8]) -> [__m512; 2] {
        let b = check(block, 34);
        // SAFETY: 34 bytes at `b` (checked); AVX-512 (the token).
        unsafe {
            let d = _mm512_set1_ps(f16_at(b, 0));
            unroll!(c in 2 => {
                let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2 + 16 * c).cast()));
                _mm512_mul_ps(_mm512_cvtepi32_ps(q), d)
            })
        }
    }
}

impl Dec256<Avx512> for Q8K {
    type State = __m512;
    #[inline(always)]
    fn bytes(self) -> usize {
        292
    }
    #[inline(always)]
    fn begin(self, _: Avx512, block: &[u8]) -> __m512 {
        check(block, 292);
        let d = f32::from_le_bytes([block[0], block[1], block[2], block[3]]);
        // SAFETY: AVX-512F (the token).
        unsafe { _mm512_set1_ps(d) }
    }
    #[inline(always)]
    fn quarter(self, _: Avx512, d: &__m512, block: &[u8], q: usize) -> [__m512; 4] {
        let b = check(block, 292);
        // SAFETY: bytes `4 + 64q .. 4 + 64q + 64` < 260 (q < 4); AVX-512 (the token).
        unsafe {
            unroll!(c in 4 => {
                let at = 4 + 64 * (q % 4) + 16 * c;
                let v = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(at).cast()));
                _mm512_mul_ps(*d, _mm512_cvtepi32_ps(v))
            })
        }
    }
}

impl Dec256<Avx512> for Q4K {
    type State = ([f32; 8], [f32; 8]);
    #[inline(always)]
    fn bytes(self) -> usize {
        144
    }
    #[inline(always)]
    fn begin(self, _: Avx512, block: &[u8]) -> Self::State {
        // SAFETY: AVX-512 CPUs have AVX2 and F16C (the token).
        unsafe { scales_k4(block) }
    }
    #[inline(always)]
    fn quarter(self, _: Avx512, st: &Self::State, block: &[u8], q: usize) -> [__m512; 4] {
        let b = check(block, 144);
        let q = q % 4;
        let (dl, ml) = st;
        // SAFETY: bytes `16 + 32q .. 48 + 32q` ≤ 144; AVX-512 (the token).
        unsafe {
            let iota = iota_minus(0.0);
            let t0 = _mm512_sub_ps(
                _mm512_mul_ps(_mm512_set1_ps(dl[2 * q]), iota),
                _mm512_set1_ps(ml[2 * q]),
            );
            let t1 = _mm512_sub_ps(
                _mm512_mul_ps(_mm512_set1_ps(dl[2 * q + 1]), iota),
                _mm512_set1_ps(ml[2 * q + 1]),
            );
            let qs = b.add(16 + 32 * q);
            let c0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.cast()));
            let c1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(16).cast()));
            [
                _mm512_permutexvar_ps(c0, t0),
                _mm512_permutexvar_ps(c1, t0),
                _mm512_permutexvar_ps(_mm512_srli_epi32(c0, 4), t1),
                _mm512_permutexvar_ps(_mm512_srli_epi32(c1, 4), t1),
            ]
        }
    }
}

impl Dec256<Avx512> for Q5K {
    type State = ([f32; 8], [f32; 8]);
    #[inline(always)]
    fn bytes(self) -> usize {
        176
    }
    #[inline(always)]
    fn begin(self, _: Avx512, block: &[u8]) -> Self::State {
        // SAFETY: AVX-512 CPUs have AVX2 and F16C (the token).
        unsafe { scales_k4(block) }
    }
    #[inline(always)]
    fn quarter(self, _: Avx512, st: &Self::State, block: &[u8], q: usize) -> [__m512; 4] {
        let b = check(block, 176);
        let q = q % 4;
        let (dl, ml) = st;
        // SAFETY: qh is bytes 16..48, qs `48 + 32q .. 80 + 32q` ≤ 176; AVX-512 (the token).
        unsafe {
            macro_rules! table {
                ($j:expr, $k:expr) => {
                    _mm512_sub_ps(
                        _mm512_mul_ps(_mm512_set1_ps(dl[$j]), iota_minus($k)),
                        _mm512_set1_ps(ml[$j]),
                    )
                };
            }
            let qs = b.add(48 + 32 * q);
            let c = [
                _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.cast())),
                _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(16).cast())),
            ];
            let qh = [
                _mm_loadu_si128(b.add(16).cast()),
                _mm_loadu_si128(b.add(32).cast()),
            ];
            let mut out = [_mm512_setzero_ps(); 4];
            for h in 0..2 {
                let j = 2 * q + h;
                let (lo, hi) = (table!(j, 0.0), table!(j, -16.0));
                let bit = _mm_set1_epi8((1u8 << j) as i8);
                for (v, (&cv, &hv)) in c.iter().zip(&qh).enumerate() {
                    let cv = if h == 1 { _mm512_srli_epi32(cv, 4) } else { cv };
                    let k = _mm_test_epi8_mask(hv, bit);
                    out[2 * h + v] =
                        _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(cv, lo), k, cv, hi);
                }
            }
            out
        }
    }
}

impl Dec256<Avx512> for Q6K {
    type State = [f32; 16];
    #[inline(always)]
    fn bytes(self) -> usize {
        210
    }
    #[inline(always)]
    fn begin(self, _: Avx512, block: &[u8]) -> [f32; 16] {
        // SAFETY: AVX-512 CPUs have AVX2 and F16C (the token).
        unsafe { scales_q6k(block) }
    }
    #[inline(always)]
    fn quarter(self, _: Avx512, dl: &[f32; 16], block: &[u8], q: usize) -> [__m512; 4] {
        let b = check(block, 210);
        let q = q % 4;
        let (chunk, h) = (q / 2, q % 2);
        // SAFETY: ql bytes `64·chunk .. +64` < 128, qh `128 + 32·chunk .. +32` ≤ 192;
        // AVX-512F/BW (the token); `codes` has 64 bytes.
        unsafe {
            let m4 = _mm512_set1_epi8(0x0F);
            let ql = _mm512_loadu_si512(b.add(64 * chunk).cast());
            let lo = if h == 1 {
                _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4)
            } else {
                _mm512_and_si512(ql, m4)
            };
            // Elements 0..32 of the quarter take qh bits `4h..4h+2`, 32..64 bits `4h+2..`.
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(b.add(128 + 32 * chunk).cast()));
            let sh = 4 * h as i16;
            let counts = _mm512_inserti64x4(_mm512_set1_epi16(sh), _mm256_set1_epi16(sh + 2), 1);
            let hi = _mm512_and_si512(_mm512_srlv_epi16(qh, counts), _mm512_set1_epi8(3));
            let code = _mm512_sub_epi8(
                _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4)),
                _mm512_set1_epi8(32),
            );
            let mut codes = [0i8; 64];
            _mm512_storeu_si512(codes.as_mut_ptr().cast(), code);
            unroll!(c in 4 => {
                let v = _mm512_cvtepi8_epi32(_mm_loadu_si128(codes.as_ptr().add(16 * c).cast()));
                _mm512_mul_ps(_mm512_set1_ps(dl[4 * q + c]), _mm512_cvtepi32_ps(v))
            })
        }
    }
}

impl Dec256<Avx512> for Q2K {
    type State = ();
    #[inline(always)]
    fn bytes(self) -> usize {
        84
    }
    #[inline(always)]
    fn begin(self, _: Avx512, block: &[u8]) {
        check(block, 84);
    }
    #[inline(always)]
    fn quarter(self, _: Avx512, _: &(), block: &[u8], q: usize) -> [__m512; 4] {
        let b = check(block, 84);
        let q = q % 4;
        let (d, dmin) = (crate::f16_at(block, 80), crate::f16_at(block, 82));
        // SAFETY: code bytes `16 + 32·chunk + l .. +16` ≤ 80; AVX-512 (the token).
        unsafe {
            let mask = _mm512_set1_epi32(3);
            unroll!(v in 4 => {
                let c = 4 * q + v;
                let sc = block[c];
                let e = c * 16;
                let (chunk, s, l) = (e / 128, (e / 32) % 4, e % 32);
                let dl = _mm512_set1_ps(d * f32::from(sc & 0x0F));
                let ml = _mm512_set1_ps(dmin * f32::from(sc >> 4));
                let t = _mm512_sub_ps(_mm512_mul_ps(dl, iota_minus(0.0)), ml);
                let qv = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(16 + chunk * 32 + l).cast()));
                let qv =
                    _mm512_and_si512(_mm512_srl_epi32(qv, _mm_cvtsi32_si128(2 * s as i32)), mask);
                _mm512_permutexvar_ps(qv, t)
            })
        }
    }
}

impl Dec256<Avx512> for Q3K {
    type State = [f32; 16];
    #[inline(always)]
    fn bytes(self) -> usize {
        110
    }
    #[inline(always)]
    fn begin(self, _: Avx512, block: &[u8]) -> [f32; 16] {
        check(block, 110);
        let scales = scales_q3k(&block[96..108]);
        let d = crate::f16_at(block, 108);
        unroll!(c in 16 => d * f32::from(scales[c]))
    }
    #[inline(always)]
    fn quarter(self, _: Avx512, dl: &[f32; 16], block: &[u8], q: usize) -> [__m512; 4] {
        let b = check(block, 110);
        let q = q % 4;
        // SAFETY: hmask bytes `l .. l + 16` ≤ 32, qs `32 + 32·chunk + l .. +16` ≤ 96;
        // AVX-512 (the token).
        unsafe {
            let (hmask, qs) = (b, b.add(32));
            let mask = _mm512_set1_epi32(3);
            let one = _mm512_set1_epi32(1);
            unroll!(v in 4 => {
                let c = 4 * q + v;
                let e = c * 16;
                let (chunk, s, l) = (e / 128, (e / 32) % 4, e % 32);
                // Code `ql | qh << 2` (0..8) stands for `ql - 4·(1 - qh)` = code - 4.
                let t = _mm512_mul_ps(_mm512_set1_ps(dl[c]), iota_minus(4.0));
                let ql = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.add(chunk * 32 + l).cast()));
                let ql =
                    _mm512_and_si512(_mm512_srl_epi32(ql, _mm_cvtsi32_si128(2 * s as i32)), mask);
                let qh = _mm512_cvtepu8_epi32(_mm_loadu_si128(hmask.add(l).cast()));
                let qh =
                    _mm512_and_si512(_mm512_srl_epi32(qh, _mm_cvtsi32_si128((e / 32) as i32)), one);
                let code = _mm512_or_si512(ql, _mm512_slli_epi32(qh, 2));
                _mm512_permutexvar_ps(code, t)
            })
        }
    }
}

impl Dec256<Avx512> for IQ4_XS {
    type State = [f32; 8];
    #[inline(always)]
    fn bytes(self) -> usize {
        136
    }
    #[inline(always)]
    fn begin(self, _: Avx512, block: &[u8]) -> [f32; 8] {
        check(block, 136);
        let d = crate::f16_at(block, 0);
        let scales = scales_iq4xs(block);
        unroll!(j in 8 => d * f32::from(scales[j]))
    }
    #[inline(always)]
    fn quarter(self, _: Avx512, dl: &[f32; 8], block: &[u8], q: usize) -> [__m512; 4] {
        let b = check(block, 136);
        let q = q % 4;
        // SAFETY: codes `8 + 32q .. 40 + 32q` ≤ 136; AVX-512 (the token).
        unsafe {
            let kv = kvalues();
            let t0 = _mm512_mul_ps(_mm512_set1_ps(dl[2 * q]), kv);
            let t1 = _mm512_mul_ps(_mm512_set1_ps(dl[2 * q + 1]), kv);
            let [a, b2] = nibbles16(t0, t0, b.add(8 + 32 * q));
            let [c, d] = nibbles16(t1, t1, b.add(24 + 32 * q));
            [a, b2, c, d]
        }
    }
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
/// looked up in `t_lo`; element `j + 16` its high nibble, in `t_hi`).
#[inline(always)]
unsafe fn nibbles16(t_lo: __m512, t_hi: __m512, qs: *const u8) -> [__m512; 2] {
    // SAFETY: callers guarantee 16 readable bytes at `qs` and AVX-512F; `vpermps` reads
    // only the low 4 bits of each index.
    unsafe {
        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(qs.cast()));
        [
            _mm512_permutexvar_ps(q, t_lo),
            _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t_hi),
        ]
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
