//! Instruction sets of the matmul kernels and the 16-lane vector each one computes with.
//!
//! The only module with `unsafe`: x86-64 intrinsics and the `#[target_feature]` entry
//! points that compile the generic kernel once per instruction set.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// The instruction set a kernel runs with. All give bit-identical results (see the crate
/// doc); they differ only in speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// x86-64 AVX-512 (F, BW, VL) with FMA: the 16 lanes in one register.
    Avx512,
    /// x86-64 AVX2 with FMA and F16C: the 16 lanes in two registers.
    Avx2,
    /// Plain Rust (any CPU; `f32::mul_add`, which is a library call on x86-64 without FMA).
    Scalar,
}

impl Isa {
    /// Every instruction set, best first.
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Scalar];

    /// The best instruction set this CPU supports (detected once per process).
    pub fn detected() -> Isa {
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            Isa::ALL
                .into_iter()
                .find(|isa| isa.supported())
                .unwrap_or(Isa::Scalar)
        })
    }

    /// Whether this CPU can run kernels for `self` (runtime feature detection).
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The instruction sets this CPU supports, best first.
    pub fn all_supported() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|isa| isa.supported()).collect()
    }

    /// Short name for logs: `"avx512"`, `"avx2"`, `"scalar"`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Scalar => "scalar",
        }
    }
}

impl std::fmt::Display for Isa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Sixteen f32 lanes and the operations of the kernel on them. Implementations must give
/// the same bits lane by lane (`fma` is a correctly rounded fused multiply-add).
pub(crate) trait Simd: Copy {
    /// The 16-lane vector.
    type V: Copy;
    /// All lanes `+0.0`.
    fn zero(self) -> Self::V;
    /// Lanes `x[0..16]` (panics if `x` is shorter).
    fn load(self, x: &[f32]) -> Self::V;
    /// `a·b + c` per lane, rounded once.
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// The lanes.
    fn to_array(self, v: Self::V) -> [f32; 16];
    /// `[Σ_i W[i]·x[r][i] for r in 0..R]` for one weight row `row` of `t` and `R` input
    /// rows of the row's length, in the lane order of the crate doc (the kernel's inner
    /// loop, through this instruction set's block decoders).
    fn dot<const R: usize>(
        self,
        t: &'static crate::TypeTraits,
        row: &[u8],
        x: [&[f32]; R],
    ) -> [f32; R];
    /// Dequantizes `src` into `dst` (whole blocks) through this instruction set's block
    /// decoders: the same bits as [`crate::TypeTraits::dequantize`].
    fn dequant(self, t: &'static crate::TypeTraits, src: &[u8], dst: &mut [f32]);
}

/// A generic kernel to compile once per instruction set.
pub(crate) trait Kernel {
    /// Runs the kernel with the vector type `s`; must be `#[inline(always)]` so that it is
    /// compiled with the caller's target features.
    fn run<S: Simd>(self, s: S);
}

/// Runs `k` with `isa`'s vectors. The caller has checked `isa.supported()`.
pub(crate) fn dispatch<K: Kernel>(isa: Isa, k: K) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if isa.supported() => {
            // SAFETY: the CPU supports every feature `run_avx512` enables (checked above).
            unsafe { x86::run_avx512(k) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if isa.supported() => {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked above).
            unsafe { x86::run_avx2(k) }
        }
        _ => k.run(Scalar),
    }
}

/// The plain-Rust vector: an array.
#[derive(Clone, Copy)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    type V = [f32; 16];
    #[inline(always)]
    fn zero(self) -> [f32; 16] {
        [0.0; 16]
    }
    #[inline(always)]
    fn load(self, x: &[f32]) -> [f32; 16] {
        let x = &x[..16];
        std::array::from_fn(|l| x[l])
    }
    #[inline(always)]
    fn fma(self, a: [f32; 16], b: [f32; 16], c: [f32; 16]) -> [f32; 16] {
        std::array::from_fn(|l| a[l].mul_add(b[l], c[l]))
    }
    #[inline(always)]
    fn to_array(self, v: [f32; 16]) -> [f32; 16] {
        v
    }
    crate::kernel::impl_kernels!(crate::kernel::refdec);
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! AVX2 and AVX-512 vectors and entry points.
    use super::{Kernel, Simd};
    use std::arch::x86_64::*;

    /// Compiles `k` with AVX-512.
    ///
    /// # Safety
    /// The CPU must support avx512f, avx512bw, avx512vl, fma and f16c.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn run_avx512<K: Kernel>(k: K) {
        k.run(Avx512(()))
    }

    /// Compiles `k` with AVX2.
    ///
    /// # Safety
    /// The CPU must support avx2, fma and f16c.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn run_avx2<K: Kernel>(k: K) {
        k.run(Avx2(()))
    }

    /// AVX-512 vectors; only constructed inside `run_avx512` (the token proves support).
    #[derive(Clone, Copy)]
    pub(crate) struct Avx512(());

    /// AVX2 vectors; only constructed inside `run_avx2`.
    #[derive(Clone, Copy)]
    pub(crate) struct Avx2(());

    impl Simd for Avx512 {
        type V = __m512;
        #[inline(always)]
        fn zero(self) -> __m512 {
            // SAFETY: an Avx512 value exists only where AVX-512F is available.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        fn load(self, x: &[f32]) -> __m512 {
            let x = &x[..16];
            // SAFETY: AVX-512F available (see `zero`); `x` has 16 readable f32.
            unsafe { _mm512_loadu_ps(x.as_ptr()) }
        }
        #[inline(always)]
        fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
            // SAFETY: AVX-512F available (see `zero`).
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        fn to_array(self, v: __m512) -> [f32; 16] {
            let mut out = [0.0f32; 16];
            // SAFETY: AVX-512F available (see `zero`); `out` has room for 16 f32.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
            out
        }
        crate::kernel::impl_kernels!(crate::avx512);
    }

    impl Simd for Avx2 {
        type V = (__m256, __m256);
        #[inline(always)]
        fn zero(self) -> Self::V {
            // SAFETY: an Avx2 value exists only where AVX2 and FMA are available.
            unsafe { (_mm256_setzero_ps(), _mm256_setzero_ps()) }
        }
        #[inline(always)]
        fn load(self, x: &[f32]) -> Self::V {
            let x = &x[..16];
            // SAFETY: AVX available (see `zero`); `x` has 16 readable f32.
            unsafe {
                (
                    _mm256_loadu_ps(x.as_ptr()),
                    _mm256_loadu_ps(x.as_ptr().add(8)),
                )
            }
        }
        #[inline(always)]
        fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V {
            // SAFETY: FMA available (see `zero`).
            unsafe {
                (
                    _mm256_fmadd_ps(a.0, b.0, c.0),
                    _mm256_fmadd_ps(a.1, b.1, c.1),
                )
            }
        }
        #[inline(always)]
        fn to_array(self, v: Self::V) -> [f32; 16] {
            let mut out = [0.0f32; 16];
            // SAFETY: AVX available (see `zero`); `out` has room for 16 f32.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), v.0);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), v.1);
            }
            out
        }
        crate::kernel::impl_kernels!(crate::avx2);
    }
}
