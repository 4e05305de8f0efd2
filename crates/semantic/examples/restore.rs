//! Restore throughput measured in process (no HTTP): the disk store's `load_blocks` and the
//! MLX engine's `import_blocks` of an agent's blocks, next to a plain sequential read of the
//! same files.
//!
//! ```text
//! cargo run --release -p semantic --example restore --config <mlx cargo config> -- \
//!     CACHE_DIR [--model GGUF] [--runs N] [--cold] [--read-threads N]
//! ```
//! `CACHE_DIR` is a store written by a server of the same model (for example the one
//! `cargo xtask bench store` leaves under `bench-results/work-*/store-cache`); the agent with
//! the most blocks is restored. `--cold` drops the page cache before each run (root only).
//! Prints, per run: load ms (read + verify), import ms, their CPU time (all threads), restore
//! MB/s over the payload bytes,
//! and the plain read's MB/s of the same files right after in the same page-cache state.

use agent_session::InferenceEngine;
use block_pool::BlockHash;
use cache_store_disk::{DiskCacheStore, DiskStoreConfig};
use engine_mlx::{EngineConfig, MlxEngine};
use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Instant;

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn drop_caches() -> bool {
    let _ = std::process::Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn plain_read(files: &[PathBuf]) -> AnyResult<f64> {
    let mut buf = vec![0u8; 1 << 20];
    let started = Instant::now();
    let mut bytes = 0u64;
    for path in files {
        let mut f = std::fs::File::open(path)?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// CPU seconds used by the whole process so far (all threads, exited ones included), from
/// /proc (Linux; 10 ms ticks); 0 elsewhere.
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> AnyResult<()> {
    // Same BLAS kernels as the server (see engine_mlx::blas).
    engine_mlx::blas::reexec_with_native_kernels()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let cold = args.iter().any(|a| a == "--cold");
    let runs: usize = value("--runs").and_then(|s| s.parse().ok()).unwrap_or(3);
    let read_threads: usize = value("--read-threads")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let cache_dir = args
        .first()
        .filter(|a| !a.starts_with("--"))
        .ok_or("usage: restore CACHE_DIR [--model GGUF] [--runs N] [--cold]")?;
    let model = value("--model").unwrap_or_else(|| {
        format!(
            "{}/.semantic/models/SmolLM2-135M-Instruct.Q4_1.gguf",
            std::env::var("HOME").unwrap_or_default()
        )
    });

    let mut config = DiskStoreConfig::new(cache_dir);
    config.read_threads = read_threads;
    let store = DiskCacheStore::open(config)?;
    let manifest = store
        .list_manifests_blocking(None)?
        .into_iter()
        .max_by_key(|m| m.block_hashes.len())
        .ok_or("no agent manifest in the store")?;
    let hashes: Vec<BlockHash> = manifest
        .block_hashes
        .iter()
        .map(|h| BlockHash::from_str(h))
        .collect::<Result<_, _>>()
        .map_err(|_| "bad block hash in the manifest")?;
    let files: Vec<PathBuf> = hashes.iter().map(|h| store.block_path(h)).collect();
    let (engine, _fmt) = MlxEngine::load(&model, EngineConfig::default())?;
    let fp = engine.model().fingerprint.clone();
    println!(
        "agent {}: {} blocks; cold {cold}",
        manifest.agent.as_str(),
        hashes.len()
    );
    if cold && !drop_caches() {
        return Err("cannot drop the page cache (root only)".into());
    }

    let (mut loads, mut imports, mut rates, mut reads, mut ratios, mut cpu) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for run in 0..runs + 1 {
        if cold {
            drop_caches();
        }
        let c0 = cpu_seconds();
        let t0 = Instant::now();
        let blocks = store.load_blocks_blocking(&fp, &hashes);
        let t1 = Instant::now();
        let c1 = cpu_seconds();
        if blocks.len() != hashes.len() {
            return Err(format!("loaded {} of {} blocks", blocks.len(), hashes.len()).into());
        }
        let bytes: usize = blocks.iter().map(|b| b.payload.byte_len()).sum();
        let seq = futures::executor::block_on(async {
            let s = engine.open_sequence().await?;
            engine.import_blocks(s, blocks).await?;
            Ok::<_, agent_session::EngineError>(s)
        })?;
        let t2 = Instant::now();
        let c2 = cpu_seconds();
        futures::executor::block_on(engine.release(seq))?;
        if cold {
            drop_caches();
        }
        let read = plain_read(&files)?;
        let load = (t1 - t0).as_secs_f64();
        let import = (t2 - t1).as_secs_f64();
        let rate = bytes as f64 / (load + import) / 1e6;
        println!(
            "run {run}{}: {:.1} MB: load {:.1} ms (CPU {:.0} ms), import {:.1} ms (CPU {:.0} ms), \
             restore {rate:.0} MB/s; plain read {read:.0} MB/s; {:.0} %",
            if run == 0 {
                " (first in the process, not counted)"
            } else {
                ""
            },
            bytes as f64 / 1e6,
            load * 1e3,
            (c1 - c0) * 1e3,
            import * 1e3,
            (c2 - c1) * 1e3,
            rate / read * 100.0
        );
        if run > 0 {
            loads.push(load * 1e3);
            imports.push(import * 1e3);
            rates.push(rate);
            reads.push(read);
            ratios.push(rate / read * 100.0);
            cpu.push((c2 - c0) * 1e3);
        }
    }
    println!(
        "median: load {:.1} ms, import {:.1} ms (CPU {:.0} ms in all), restore {:.0} MB/s, \
         plain read {:.0} MB/s, ratio {:.0} %",
        median(loads),
        median(imports),
        median(cpu),
        median(rates),
        median(reads),
        median(ratios)
    );
    Ok(())
}
