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
    match cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("semantic: error: {e}");
            ExitCode::from(2)
        }
    }
}
