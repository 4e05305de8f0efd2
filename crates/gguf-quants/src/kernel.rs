//! The generic matmul and dequantization drivers over per-format block decoders.
//!
//! A decoder turns one block into 16-lane weight vectors, bit-identical to the reference
//! dequantizer ([`crate::TypeTraits::dequantize`]); the drivers do everything else (the
//! lane accumulators of the determinism contract, the reduction, the float tails), the
//! same code for every instruction set. Each instruction set supplies its decoders as a
//! module of items with the same names (see [`impl_kernels`]); formats without a
//! dedicated decoder use [`refdec`], which goes through the reference dequantizer.

use crate::isa::Simd;
use crate::TypeTraits;

/// Accumulator chains per input row: element `i` goes to lane `i % 16` of chain
/// `(i / 16) % 4`, i.e. lane `i % 64` of 64 lanes.
pub(crate) const CHAINS: usize = 4;

/// Decoder of 32-element blocks (legacy formats, IQ4_NL; float types in tiles of 32).
pub(crate) trait Dec32<S: Simd>: Copy {
    /// Bytes of one block (tile).
    fn bytes(self) -> usize;
    /// The 32 weights of `block` (`bytes()` long; shorter panics), elements `0..16` and
    /// `16..32`, bit-identical to the reference.
    fn block(self, s: S, block: &[u8]) -> [S::V; 2];
}

/// Decoder of 256-element super-blocks (K-quants, IQ4_XS).
pub(crate) trait Dec256<S: Simd>: Copy {
    /// What `begin` computes once per block (scales).
    type State;
    /// Bytes of one block.
    fn bytes(self) -> usize;
    /// The per-block state of `block` (`bytes()` long; shorter panics).
    fn begin(self, s: S, block: &[u8]) -> Self::State;
    /// Weights `64q..64q + 64` (`q < 4`) of `block`, as four vectors of 16, bit-identical
    /// to the reference.
    fn quarter(self, s: S, st: &Self::State, block: &[u8], q: usize) -> [S::V; 4];
}

/// The fixed reduction of a row's 64 lanes: lane `l` with `l + 32` (chains 0+2, 1+3),
/// then `l + 16`, `l + 8`, `l + 4`, `l + 2`, `l + 1`.
#[inline(always)]
pub(crate) fn reduce64(c: [[f32; 16]; CHAINS]) -> f32 {
    let a: [f32; 16] = unroll!(l in 16 => (c[0][l] + c[2][l]) + (c[1][l] + c[3][l]));
    let s8: [f32; 8] = unroll!(l in 8 => a[l] + a[l + 8]);
    let s4: [f32; 4] = unroll!(l in 4 => s8[l] + s8[l + 4]);
    let s2: [f32; 2] = unroll!(l in 2 => s4[l] + s4[l + 2]);
    s2[0] + s2[1]
}

/// `acc[r][c] += w[c] · x[r][16c..16c + 16]` for the rows of one 64-element step.
#[inline(always)]
fn fma_step<S: Simd, const R: usize, const K: usize>(
    s: S,
    acc: &mut [[S::V; CHAINS]; R],
    w: [S::V; K],
    x: [&[f32]; R],
    chain0: usize,
) {
    for r in 0..R {
        for (c, &wc) in w.iter().enumerate() {
            let a = &mut acc[r][chain0 + c];
            *a = s.fma(wc, s.load(&x[r][16 * c..]), *a);
        }
    }
}

/// Chunk `k` of every row.
#[inline(always)]
fn rows_at<'a, const R: usize>(xs: &[&'a [[f32; 64]]; R], k: usize) -> [&'a [f32]; R] {
    let mut out: [&[f32]; R] = [&[]; R];
    for (o, x) in out.iter_mut().zip(xs) {
        *o = &x[k];
    }
    out
}

/// The reduced results of the accumulators.
#[inline(always)]
fn finish<S: Simd, const R: usize>(s: S, acc: [[S::V; CHAINS]; R]) -> [f32; R] {
    let mut out = [0.0f32; R];
    for (o, a) in out.iter_mut().zip(acc) {
        *o = reduce64([
            s.to_array(a[0]),
            s.to_array(a[1]),
            s.to_array(a[2]),
            s.to_array(a[3]),
        ]);
    }
    out
}

/// One weight row of 32-element blocks (or float tiles) against `R` input rows of equal
/// length `cols`; `traits` dequantizes the float tail (fewer than 32 elements).
// Inlined into the instruction set's entry point in release builds (where the intrinsics
// must inline); out of line in debug builds, whose unoptimized frames of every format
// inlined together would overflow a test thread's stack.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline(never))]
pub(crate) fn drive32<S: Simd, D: Dec32<S>, const R: usize>(
    s: S,
    d: D,
    traits: &TypeTraits,
    row: &[u8],
    x: [&[f32]; R],
) -> [f32; R] {
    let cols = x[0].len();
    let bb = d.bytes();
    let nb = cols / 32;
    let mut acc = [[s.zero(); CHAINS]; R];
    let mut xs: [&[[f32; 64]]; R] = [&[]; R];
    for (c, r) in xs.iter_mut().zip(x) {
        *c = r.as_chunks::<64>().0;
    }
    for (k, pair) in row[..nb / 2 * 2 * bb].chunks_exact(2 * bb).enumerate() {
        let (b0, b1) = pair.split_at(bb);
        let [w0, w1] = d.block(s, b0);
        let [w2, w3] = d.block(s, b1);
        fma_step(s, &mut acc, [w0, w1, w2, w3], rows_at(&xs, k), 0);
    }
    if nb % 2 == 1 {
        let start = (nb - 1) * 32;
        let w = d.block(s, &row[(nb - 1) * bb..nb * bb]);
        let mut xr: [&[f32]; R] = [&[]; R];
        for (c, r) in xr.iter_mut().zip(x) {
            *c = &r[start..];
        }
        fma_step(s, &mut acc, w, xr, 0);
    }
    // The tail of a float row (quantized rows are whole blocks): zero-padded to 16 lanes.
    let base = nb * 32;
    let rem = cols - base;
    if rem > 0 {
        let mut buf = [0.0f32; 32];
        (traits.dequantize)(&row[nb * bb..], &mut buf[..rem]);
        let chain0 = (2 * nb) % CHAINS;
        for c in 0..rem.div_ceil(16) {
            let w = s.load(&buf[16 * c..]);
            let take = (rem - 16 * c).min(16);
            for r in 0..R {
                let mut xv = [0.0f32; 16];
                xv[..take].copy_from_slice(&x[r][base + 16 * c..base + 16 * c + take]);
                let a = &mut acc[r][chain0 + c];
                *a = s.fma(w, s.load(&xv), *a);
            }
        }
    }
    finish(s, acc)
}

/// One weight row of 256-element super-blocks against `R` input rows of length `cols`.
// Inlined into the instruction set's entry point in release builds (where the intrinsics
// must inline); out of line in debug builds, whose unoptimized frames of every format
// inlined together would overflow a test thread's stack.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline(never))]
pub(crate) fn drive256<S: Simd, D: Dec256<S>, const R: usize>(
    s: S,
    d: D,
    row: &[u8],
    x: [&[f32]; R],
) -> [f32; R] {
    let bb = d.bytes();
    let mut acc = [[s.zero(); CHAINS]; R];
    let mut xs: [&[[f32; 64]]; R] = [&[]; R];
    for (c, r) in xs.iter_mut().zip(x) {
        *c = r.as_chunks::<64>().0;
    }
    for (b, block) in row.chunks_exact(bb).enumerate() {
        let st = d.begin(s, block);
        for q in 0..4 {
            let w = d.quarter(s, &st, block, q);
            fma_step(s, &mut acc, w, rows_at(&xs, 4 * b + q), 0);
        }
    }
    finish(s, acc)
}

/// Dequantizes whole 32-element blocks (tiles) through the decoder; a float tail through
/// `traits`.
// Inlined into the instruction set's entry point in release builds (where the intrinsics
// must inline); out of line in debug builds, whose unoptimized frames of every format
// inlined together would overflow a test thread's stack.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline(never))]
pub(crate) fn store32<S: Simd, D: Dec32<S>>(
    s: S,
    d: D,
    traits: &TypeTraits,
    src: &[u8],
    dst: &mut [f32],
) {
    let mut src = src.chunks_exact(d.bytes());
    let mut dst = dst.chunks_exact_mut(32);
    for (b, o) in (&mut src).zip(&mut dst) {
        for (c, w) in d.block(s, b).into_iter().enumerate() {
            o[16 * c..16 * c + 16].copy_from_slice(&s.to_array(w));
        }
    }
    (traits.dequantize)(src.remainder(), dst.into_remainder());
}

/// Dequantizes whole super-blocks through the decoder.
// Inlined into the instruction set's entry point in release builds (where the intrinsics
// must inline); out of line in debug builds, whose unoptimized frames of every format
// inlined together would overflow a test thread's stack.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline(never))]
pub(crate) fn store256<S: Simd, D: Dec256<S>>(s: S, d: D, src: &[u8], dst: &mut [f32]) {
    for (b, o) in src.chunks_exact(d.bytes()).zip(dst.chunks_exact_mut(256)) {
        let st = d.begin(s, b);
        for q in 0..4 {
            for (c, w) in d.quarter(s, &st, b, q).into_iter().enumerate() {
                let at = 64 * q + 16 * c;
                o[at..at + 16].copy_from_slice(&s.to_array(w));
            }
        }
    }
}

/// Decoders through the reference dequantizer (any instruction set): the scalar path's
/// decoders, and the fallback of formats without a SIMD decoder.
pub(crate) mod refdec {
    use super::{unroll, Dec256, Dec32};
    use crate::isa::Simd;
    use crate::{float, iq, kquants, legacy, TypeTraits};

    /// A format's reference dequantizer as a decoder.
    #[derive(Clone, Copy)]
    pub(crate) struct Ref(pub(crate) &'static TypeTraits);

    impl<S: Simd> Dec32<S> for Ref {
        #[inline(always)]
        fn bytes(self) -> usize {
            32 / self.0.block_elems * self.0.block_bytes
        }
        #[inline(always)]
        fn block(self, s: S, block: &[u8]) -> [S::V; 2] {
            let mut buf = [0.0f32; 32];
            (self.0.dequantize)(&block[..Dec32::<S>::bytes(self)], &mut buf);
            [s.load(&buf), s.load(&buf[16..])]
        }
    }

    impl<S: Simd> Dec256<S> for Ref {
        type State = [f32; 256];
        #[inline(always)]
        fn bytes(self) -> usize {
            self.0.block_bytes
        }
        #[inline(always)]
        fn begin(self, _s: S, block: &[u8]) -> [f32; 256] {
            let mut buf = [0.0f32; 256];
            (self.0.dequantize)(&block[..self.0.block_bytes], &mut buf);
            buf
        }
        #[inline(always)]
        fn quarter(self, s: S, st: &[f32; 256], _block: &[u8], q: usize) -> [S::V; 4] {
            unroll!(c in 4 => s.load(&st[64 * q + 16 * c..]))
        }
    }

    pub(crate) const F32: Ref = Ref(&float::F32_TRAITS);
    pub(crate) const F16: Ref = Ref(&float::F16_TRAITS);
    pub(crate) const BF16: Ref = Ref(&float::BF16_TRAITS);
    pub(crate) const Q4_0: Ref = Ref(&legacy::Q4_0_TRAITS);
    pub(crate) const Q4_1: Ref = Ref(&legacy::Q4_1_TRAITS);
    pub(crate) const Q5_0: Ref = Ref(&legacy::Q5_0_TRAITS);
    pub(crate) const Q5_1: Ref = Ref(&legacy::Q5_1_TRAITS);
    pub(crate) const Q8_0: Ref = Ref(&legacy::Q8_0_TRAITS);
    pub(crate) const IQ4_NL: Ref = Ref(&iq::IQ4_NL_TRAITS);
    pub(crate) const Q2K: Ref = Ref(&kquants::Q2K_TRAITS);
    pub(crate) const Q3K: Ref = Ref(&kquants::Q3K_TRAITS);
    pub(crate) const Q4K: Ref = Ref(&kquants::Q4K_TRAITS);
    pub(crate) const Q5K: Ref = Ref(&kquants::Q5K_TRAITS);
    pub(crate) const Q6K: Ref = Ref(&kquants::Q6K_TRAITS);
    pub(crate) const Q8K: Ref = Ref(&kquants::Q8K_TRAITS);
    pub(crate) const IQ4_XS: Ref = Ref(&iq::IQ4_XS_TRAITS);
}

/// The `dot` and `dequant` methods of a [`Simd`] implementation, dispatching each format
/// to the decoder of the same name in the module `$m` (see [`refdec`] for the names).
macro_rules! impl_kernels {
    ($($m:ident)::+) => {
        #[inline(always)]
        fn dot<const R: usize>(
            self,
            t: &'static $crate::TypeTraits,
            row: &[u8],
            x: [&[f32]; R],
        ) -> [f32; R] {
            use $crate::kernel::{drive256, drive32};
            use $crate::QuantType as T;
            match t.ty {
                T::F32 => drive32(self, $($m)::+::F32, t, row, x),
                T::F16 => drive32(self, $($m)::+::F16, t, row, x),
                T::Bf16 => drive32(self, $($m)::+::BF16, t, row, x),
                T::Q4_0 => drive32(self, $($m)::+::Q4_0, t, row, x),
                T::Q4_1 => drive32(self, $($m)::+::Q4_1, t, row, x),
                T::Q5_0 => drive32(self, $($m)::+::Q5_0, t, row, x),
                T::Q5_1 => drive32(self, $($m)::+::Q5_1, t, row, x),
                T::Q8_0 => drive32(self, $($m)::+::Q8_0, t, row, x),
                T::Iq4Nl => drive32(self, $($m)::+::IQ4_NL, t, row, x),
                T::Q2K => drive256(self, $($m)::+::Q2K, row, x),
                T::Q3K => drive256(self, $($m)::+::Q3K, row, x),
                T::Q4K => drive256(self, $($m)::+::Q4K, row, x),
                T::Q5K => drive256(self, $($m)::+::Q5K, row, x),
                T::Q6K => drive256(self, $($m)::+::Q6K, row, x),
                T::Q8K => drive256(self, $($m)::+::Q8K, row, x),
                T::Iq4Xs => drive256(self, $($m)::+::IQ4_XS, row, x),
                // Only supported types reach the kernels.
                _ => [0.0; R],
            }
        }

        #[inline(always)]
        fn dequant(self, t: &'static $crate::TypeTraits, src: &[u8], dst: &mut [f32]) {
            use $crate::kernel::{store256, store32};
            use $crate::QuantType as T;
            match t.ty {
                T::F32 => store32(self, $($m)::+::F32, t, src, dst),
                T::F16 => store32(self, $($m)::+::F16, t, src, dst),
                T::Bf16 => store32(self, $($m)::+::BF16, t, src, dst),
                T::Q4_0 => store32(self, $($m)::+::Q4_0, t, src, dst),
                T::Q4_1 => store32(self, $($m)::+::Q4_1, t, src, dst),
                T::Q5_0 => store32(self, $($m)::+::Q5_0, t, src, dst),
                T::Q5_1 => store32(self, $($m)::+::Q5_1, t, src, dst),
                T::Q8_0 => store32(self, $($m)::+::Q8_0, t, src, dst),
                T::Iq4Nl => store32(self, $($m)::+::IQ4_NL, t, src, dst),
                T::Q2K => store256(self, $($m)::+::Q2K, src, dst),
                T::Q3K => store256(self, $($m)::+::Q3K, src, dst),
                T::Q4K => store256(self, $($m)::+::Q4K, src, dst),
                T::Q5K => store256(self, $($m)::+::Q5K, src, dst),
                T::Q6K => store256(self, $($m)::+::Q6K, src, dst),
                T::Q8K => store256(self, $($m)::+::Q8K, src, dst),
                T::Iq4Xs => store256(self, $($m)::+::IQ4_XS, src, dst),
                _ => (t.dequantize)(src, dst),
            }
        }
    };
}
pub(crate) use impl_kernels;

/// `[e(0), e(1), ...]` for a literal count of 2, 4, 8 or 16, written out (no closures, which
/// may stay out of line where intrinsics must inline).
macro_rules! unroll {
    ($i:ident in 2 => $e:expr) => {
        [{ let $i = 0usize; $e }, { let $i = 1usize; $e }]
    };
    ($i:ident in 4 => $e:expr) => {
        [{ let $i = 0usize; $e }, { let $i = 1usize; $e }, { let $i = 2usize; $e }, { let $i = 3usize; $e }]
    };
    ($i:ident in 8 => $e:expr) => {{
        let [a, b, c, d] = $crate::kernel::unroll!($i in 4 => $e);
        let [e, f, g, h] = $crate::kernel::unroll!($i in 4 => { let $i = $i + 4; $e });
        [a, b, c, d, e, f, g, h]
    }};
    ($i:ident in 16 => $e:expr) => {{
        let [a, b, c, d, e, f, g, h] = $crate::kernel::unroll!($i in 8 => $e);
        let [i, j, k, l, m, n, o, p] = $crate::kernel::unroll!($i in 8 => { let $i = $i + 8; $e });
        [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p]
    }};
}
pub(crate) use unroll;
