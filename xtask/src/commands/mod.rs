//! One module per `cargo xtask` command (besides `setup`, which lives in `crate::setup`).
//!
//! To add a command: a module here with an `Args` struct (clap) and a `run(&Args)`
//! function, and a variant in `Command` in `main.rs` whose doc comment is its help.

pub mod bench;
pub mod build;
pub mod golden;
pub mod lint;
pub mod serve;
pub mod test;
