//! Times the host decode kernel ([`engine_mlx::host_linear`]) on the default model's shapes
//! (SmolLM2-135M: hidden 576, MLP 1536, vocab 49152), 1 to 8 rows, per instruction set and
//! thread split, on random weights.
//!
//! ```text
//! cargo run --release -p engine-mlx --example host_linear_bench --config <mlx cargo config>
//! ```

use engine_mlx::host_linear::{Isa, PackedMatrix};
use std::time::Instant;

fn matrix(bits: u32, out: usize, inp: usize) -> PackedMatrix {
    let per_word = 32 / bits as usize;
    let words: Vec<u32> = (0..out * inp / per_word)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761))
        .collect();
    let groups = out * inp / 32;
    let scales: Vec<f32> = (0..groups).map(|i| (i % 7) as f32 * 0.01).collect();
    let biases: Vec<f32> = (0..groups).map(|i| (i % 5) as f32 * -0.02).collect();
    PackedMatrix::from_affine(bits, 32, out, inp, &words, &scales, &biases).expect("a valid matrix")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let shapes = [
        ("qkv", 4, 960, 576),
        ("o", 4, 576, 576),
        ("gate_up", 4, 3072, 576),
        ("down", 4, 576, 1536),
        ("head q8", 8, 49152, 576),
    ];
    let isa = Isa::detected();
    println!("isa {}", isa.name());
    // A whole decode step's products in model order (30 layers, then the head): the weights
    // stream from memory as in a real step.
    let layers: Vec<[PackedMatrix; 4]> = (0..30)
        .map(|_| {
            [
                matrix(4, 960, 576),
                matrix(4, 576, 576),
                matrix(4, 3072, 576),
                matrix(4, 576, 1536),
            ]
        })
        .collect();
    let head = matrix(8, 49152, 576);
    for rows in [1usize, 2, 4, 8] {
        let x: Vec<f32> = (0..rows * 1536)
            .map(|i| (i % 13) as f32 * 0.1 - 0.6)
            .collect();
        let mut y = vec![0.0f32; rows * 49152];
        let mut best = f64::INFINITY;
        for _ in 0..10 {
            let t = Instant::now();
            for l in &layers {
                for m in l {
                    let (i, o) = (m.in_features(), m.out_features());
                    m.matmul(&x[..rows * i], rows, &mut y[..rows * o])?;
                }
            }
            head.matmul(&x[..rows * 576], rows, &mut y)?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("model step, {rows} rows: {:.2} ms (best of 10)", best * 1e3);
    }
    for (name, bits, out, inp) in shapes {
        let w = matrix(bits, out, inp);
        for rows in [1usize, 4, 8] {
            let x: Vec<f32> = (0..rows * inp)
                .map(|i| (i % 13) as f32 * 0.1 - 0.6)
                .collect();
            let mut y = vec![0.0f32; rows * out];
            let mut line = format!("{name:8} {out:5}x{inp:4} rows {rows}:");
            for parts in [1usize, 2] {
                let reps = 2_000_000_000 / (out * inp * rows * 4) + 3;
                w.matmul_with(isa, parts, &x, rows, &mut y)?;
                let t = Instant::now();
                for _ in 0..reps {
                    w.matmul_with(isa, parts, &x, rows, &mut y)?;
                }
                let us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
                let gbs = w.byte_len() as f64 / us / 1e3;
                line += &format!("  {parts} thr {us:8.1} us ({gbs:5.1} GB/s)");
            }
            let t = Instant::now();
            let reps = 200;
            for _ in 0..reps {
                w.matmul(&x, rows, &mut y)?;
            }
            line += &format!(
                "  auto {:8.1} us",
                t.elapsed().as_secs_f64() * 1e6 / reps as f64
            );
            println!("{line}");
        }
    }
    Ok(())
}
