//! Single-thread speed of `matmul_transposed` on a 896x4864 matrix (Qwen2.5-0.5B's
//! down projection) per type, n = 1 and n = 4: ns per call and GB/s of weight bytes.
//!
//! `cargo run --release -p gguf-quants --example kernel_bench [isa...] [type...]`
//! (isa: avx512, avx2, scalar; default: the detected one; type names such as Q4_K to pick
//! types, default all; `rows=N` for another row count, e.g. one whose matrix fits in L2 to
//! time the kernel without the memory system).

use std::time::Instant;

use gguf_quants::{Isa, QuantMatrix, QuantType, SUPPORTED};

/// This thread's CPU time in seconds (Linux `/proc/thread-self/schedstat`), so that other
/// processes sharing the cores do not inflate the numbers; wall time elsewhere.
fn cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1e9)
}

/// Seconds since `start` (CPU time where available).
fn now() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    cpu_seconds().unwrap_or_else(|| START.get_or_init(Instant::now).elapsed().as_secs_f64())
}

fn bytes(n: usize, seed: &mut u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            (*seed >> 24) as u8
        })
        .collect()
}

/// Random blocks with a small finite f16 at every offset a scale may sit (any finite bytes
/// are fine for timing; this keeps the values ordinary).
fn matrix(ty: QuantType, rows: usize, cols: usize, seed: &mut u64) -> QuantMatrix {
    let bb = ty.block_bytes();
    let mut data = bytes(rows * cols / ty.block_elems() * bb, seed);
    for b in data.chunks_exact_mut(bb) {
        for v in b.chunks_exact_mut(2) {
            v[1] &= 0x3B; // exponent well below the maximum: finite f16 / bf16 / f32 values
        }
    }
    QuantMatrix::new(ty, rows, cols, data).expect("valid matrix")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows = args
        .iter()
        .find_map(|a| a.strip_prefix("rows=")?.parse().ok())
        .unwrap_or(896);
    let cols = 4864;
    let types: Vec<QuantType> = SUPPORTED
        .iter()
        .copied()
        .filter(|t| args.iter().any(|a| a == t.name()))
        .collect();
    let types = if types.is_empty() {
        SUPPORTED.to_vec()
    } else {
        types
    };
    let isas: Vec<Isa> = {
        if !args.iter().any(|a| Isa::ALL.iter().any(|i| i.name() == a)) {
            vec![Isa::detected()]
        } else {
            Isa::ALL
                .into_iter()
                .filter(|i| args.iter().any(|a| a == i.name()) && i.supported())
                .collect()
        }
    };
    let mut seed = 0x1234_5678_9abc_def1u64;
    let clock = if cpu_seconds().is_some() {
        "thread CPU time"
    } else {
        "wall time"
    };
    println!("{rows}x{cols}, single thread, {clock}");
    for ty in types {
        let m = matrix(ty, rows, cols, &mut seed);
        for &isa in &isas {
            let mut line = format!("{:>6} {:>6} {:>8} B:", ty.name(), isa.name(), m.byte_len());
            for n in [1usize, 4] {
                let x: Vec<f32> = bytes(n * cols, &mut seed)
                    .into_iter()
                    .map(|b| f32::from(b) / 128.0 - 1.0)
                    .collect();
                let mut yt = vec![0.0f32; rows * n];
                let mut best = f64::INFINITY;
                for _ in 0..5 {
                    let start = now();
                    let mut iters = 0u32;
                    while iters < 3 || now() - start < 0.05 {
                        m.matmul_transposed(isa, &x, n, 0..rows, &mut yt)
                            .expect("matmul");
                        iters += 1;
                    }
                    best = best.min((now() - start) / f64::from(iters));
                }
                let gbs = m.byte_len() as f64 / best / 1e9;
                line += &format!("  n={n}: {:>9.0} ns {:>6.1} GB/s", best * 1e9, gbs);
            }
            println!("{line}");
        }
    }
}
