//! The BLAS library under MLX's CPU matmuls: which kernels it runs, and the fix for a CPU it
//! does not recognise.
//!
//! On Linux, MLX's CPU backend hands every matmul to the system BLAS (OpenBLAS on Debian).
//! OpenBLAS picks its kernels once, when it is loaded, from the CPU model number; a CPU newer
//! than the library (for example the development VM's Xeon, family 6 model 207, with OpenBLAS
//! 0.3.21) falls back to the *Prescott* (SSE3) kernels. Measured there with the default model:
//! prefill of a 512-token prompt 166 tokens/s with Prescott, 367 with the SkylakeX (AVX-512)
//! kernels. OpenBLAS reads `OPENBLAS_CORETYPE` only at load time, so the fix is to start the
//! process again with it set ([`reexec_with_native_kernels`]), before any thread exists.
//!
//! The kernels change the last bits of every matmul, so the core name is part of the model
//! fingerprint: KV computed under one never meets a run under another.

// The one FFI call of this module: look up and call OpenBLAS's `openblas_get_corename`.
#![allow(unsafe_code)]

use std::ffi::CStr;

/// Environment variable through which OpenBLAS takes its core type.
pub const CORETYPE_VAR: &str = "OPENBLAS_CORETYPE";

/// The kernel set of the BLAS library in this process, as OpenBLAS names it (for example
/// `SkylakeX`, `Haswell`, `Prescott`), or `None` when the BLAS is not OpenBLAS (Accelerate on
/// macOS, reference BLAS, BLIS...).
pub fn core_name() -> Option<String> {
    #[cfg(unix)]
    {
        type CoreName = unsafe extern "C" fn() -> *const std::ffi::c_char;
        // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only looks a symbol up.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"openblas_get_corename".as_ptr()) };
        if sym.is_null() {
            return None;
        }
        // SAFETY: OpenBLAS exports `char *openblas_get_corename(void)`, returning a static
        // NUL-terminated string.
        let name = unsafe {
            let f: CoreName = std::mem::transmute::<*mut libc::c_void, CoreName>(sym);
            let p = f();
            if p.is_null() {
                return None;
            }
            CStr::from_ptr(p).to_string_lossy().into_owned()
        };
        Some(name)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// What this CPU can run, as far as OpenBLAS's x86 kernel sets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX-512 F, BW, DQ, VL and CD (OpenBLAS's SkylakeX kernels).
    pub avx512: bool,
    /// AVX2 and FMA (OpenBLAS's Haswell kernels).
    pub avx2_fma: bool,
}

impl CpuFeatures {
    /// The features of the CPU this process runs on.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            Self {
                avx512: std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512cd"),
                avx2_fma: std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            Self {
                avx512: false,
                avx2_fma: false,
            }
        }
    }
}

/// OpenBLAS x86 core types whose kernels use AVX-512.
const AVX512_CORES: &[&str] = &["SkylakeX", "Cooperlake", "SapphireRapids"];
/// OpenBLAS x86 core types whose kernels use at least AVX2 and FMA.
const AVX2_CORES: &[&str] = &["Haswell", "Zen", "SkylakeX", "Cooperlake", "SapphireRapids"];

/// The core type OpenBLAS should use instead of `current` on a CPU with `cpu`, when it picked
/// kernels older than the CPU supports; `None` when its choice is fine (or not x86).
pub fn better_core(current: &str, cpu: CpuFeatures) -> Option<&'static str> {
    if cpu.avx512 && !AVX512_CORES.contains(&current) {
        Some("SkylakeX")
    } else if cpu.avx2_fma && !cpu.avx512 && !AVX2_CORES.contains(&current) {
        Some("Haswell")
    } else {
        None
    }
}

/// The core type to restart with, when this process's OpenBLAS misdetected the CPU and the
/// user did not choose one (`OPENBLAS_CORETYPE` unset).
pub fn override_needed() -> Option<&'static str> {
    if std::env::var_os(CORETYPE_VAR).is_some() {
        return None;
    }
    better_core(&core_name()?, CpuFeatures::detect())
}

/// When OpenBLAS misdetected this CPU, replaces the process with itself (same executable,
/// arguments and environment) plus `OPENBLAS_CORETYPE`. Call it first thing in `main`, before
/// any thread is started. Returns only when nothing needs doing or the exec failed (the
/// error is returned; the process can go on with the slower kernels).
pub fn reexec_with_native_kernels() -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some(core) = override_needed() {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe()?;
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(CORETYPE_VAR, core)
            .exec();
        return Err(err);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AVX512: CpuFeatures = CpuFeatures {
        avx512: true,
        avx2_fma: true,
    };
    const AVX2: CpuFeatures = CpuFeatures {
        avx512: false,
        avx2_fma: true,
    };
    const OLD: CpuFeatures = CpuFeatures {
        avx512: false,
        avx2_fma: false,
    };

    #[test]
    fn a_misdetected_cpu_gets_the_kernels_it_supports() {
        assert_eq!(better_core("Prescott", AVX512), Some("SkylakeX"));
        assert_eq!(better_core("Haswell", AVX512), Some("SkylakeX"));
        assert_eq!(better_core("Sandybridge", AVX2), Some("Haswell"));
        assert_eq!(better_core("Prescott", AVX2), Some("Haswell"));
    }

    #[test]
    fn a_right_or_unknown_choice_is_kept() {
        assert_eq!(better_core("SkylakeX", AVX512), None);
        assert_eq!(better_core("Cooperlake", AVX512), None);
        assert_eq!(better_core("Haswell", AVX2), None);
        assert_eq!(better_core("Zen", AVX2), None);
        assert_eq!(better_core("Prescott", OLD), None);
        assert_eq!(better_core("ARMV8", OLD), None);
    }

    #[test]
    fn the_core_name_is_readable_when_openblas_is_loaded() {
        // MLX is linked into this test binary; on Linux its BLAS is OpenBLAS.
        let _ = mlx_rs::Array::from_slice(&[1.0f32], &[1]);
        if let Some(name) = core_name() {
            assert!(!name.is_empty());
        }
    }
}
