//! f32 matrix products on the host through the process's CBLAS `sgemm` (OpenBLAS, which
//! MLX's CPU backend links on Linux; Accelerate on macOS).
//!
//! Why: weights kept as the file's blocks ([`crate::weights::WeightFormat::Host`]) have no
//! MLX array to multiply. A prefill chunk multiplies many rows by each weight matrix, so the
//! weights are dequantized a panel of output rows at a time into a scratch buffer that stays
//! in cache, and each panel goes through the same BLAS kernel MLX's f32 matmul would call:
//! f32 speed from quantized memory. Decode-sized products (a few rows) use the block kernels
//! of `gguf-quants` instead, which read each weight once.

// The one FFI call of this module: look up `cblas_sgemm` with dlsym and call it on slices
// whose lengths are checked first.
#![allow(unsafe_code)]

use std::sync::OnceLock;

/// `cblas_sgemm`'s C signature.
type Sgemm = unsafe extern "C" fn(
    layout: i32,
    trans_a: i32,
    trans_b: i32,
    m: i32,
    n: i32,
    k: i32,
    alpha: f32,
    a: *const f32,
    lda: i32,
    b: *const f32,
    ldb: i32,
    beta: f32,
    c: *mut f32,
    ldc: i32,
) -> ();

const ROW_MAJOR: i32 = 101;
const NO_TRANS: i32 = 111;
const TRANS: i32 = 112;

/// The process's `cblas_sgemm`, looked up once.
fn sgemm() -> Option<Sgemm> {
    static SGEMM: OnceLock<Option<usize>> = OnceLock::new();
    let addr = *SGEMM.get_or_init(|| {
        #[cfg(unix)]
        {
            // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
            let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"cblas_sgemm".as_ptr()) };
            (!sym.is_null()).then_some(sym as usize)
        }
        #[cfg(not(unix))]
        {
            None
        }
    });
    // SAFETY: the address is the `cblas_sgemm` symbol, whose C signature is `Sgemm`.
    addr.map(|a| unsafe { std::mem::transmute::<usize, Sgemm>(a) })
}

/// Whether a CBLAS `sgemm` is loaded in this process.
pub fn available() -> bool {
    sgemm().is_some()
}

/// `c[r][j] = Σ_i a[r][i] · b[j][i]` for `r < m`, `j < n`: `a` is `[m, k]` and `b` `[n, k]`,
/// row-major; row `r` of the result is written at `c[r * ldc..][..n]`. Returns `false`
/// (writing nothing) when no BLAS is loaded or the slices do not hold the shapes.
pub fn sgemm_nt(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
) -> bool {
    let Some(f) = sgemm() else {
        return false;
    };
    if m == 0 || n == 0 {
        return true;
    }
    let fits = a.len() >= m * k
        && b.len() >= n * k
        && ldc >= n
        && c.len() >= (m - 1) * ldc + n
        && [m, n, k, ldc].iter().all(|&d| i32::try_from(d).is_ok());
    if !fits || k == 0 {
        return false;
    }
    // SAFETY: the slices hold `[m, k]`, `[n, k]` and `m` rows of stride `ldc` with `n`
    // values each (checked above); sgemm reads and writes only within them.
    unsafe {
        f(
            ROW_MAJOR,
            NO_TRANS,
            TRANS,
            m as i32,
            n as i32,
            k as i32,
            1.0,
            a.as_ptr(),
            k as i32,
            b.as_ptr(),
            k as i32,
            0.0,
            c.as_mut_ptr(),
            ldc as i32,
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgemm_matches_a_plain_product_with_a_stride() {
        // MLX (and so its BLAS) is linked into this test binary.
        let _ = mlx_rs::Array::from_slice(&[1.0f32], &[1]);
        if !available() {
            return;
        }
        let (m, n, k, ldc) = (5, 3, 7, 8);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5).collect();
        let mut c = vec![-1.0f32; m * ldc];
        assert!(sgemm_nt(m, n, k, &a, &b, &mut c, ldc));
        for r in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|i| a[r * k + i] * b[j * k + i]).sum();
                assert_eq!(c[r * ldc + j], want, "({r}, {j})");
            }
            assert!(c[r * ldc + n..r * ldc + ldc].iter().all(|&v| v == -1.0));
        }
        assert!(
            !sgemm_nt(m, n, k, &a[..3], &b, &mut c, ldc),
            "short input refused"
        );
    }
}
