//! `semantic`: an inference server for many agents sharing one local model, with each agent's
//! KV cache kept in blocks in RAM and on disk across restarts.
//!
//! This crate is the thin entrypoint: command line, layered configuration, logging, and the
//! one place where the adapters (MLX engine, disk store, HTTP API) are wired together.

mod cli;
mod settings;
mod wiring;

use std::process::ExitCode;

fn main() -> ExitCode {
    // First, before any thread: OpenBLAS picks its kernels at load time and falls back to
    // SSE3 ones on CPUs newer than itself (2.2x slower prefill); restart with the right ones.
    if let Err(e) = engine_mlx::blas::reexec_with_native_kernels() {
        eprintln!("semantic: warning: could not restart with native BLAS kernels: {e}");
    }
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("semantic: error: {e}");
            ExitCode::from(2)
        }
    }
}
