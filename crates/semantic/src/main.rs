//! `semantic` binary entrypoint.
fn main() {}
