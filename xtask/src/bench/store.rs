//! `store`: restore throughput of a 4,096-token cache of the default model from the disk
//! store, next to a plain sequential read of the same block files.
//!
//! A 4,096 + ~60-token prompt is sent once (16 whole blocks are written) and the server is
//! stopped (SIGTERM flushes the writes). Then, per run: start the server, (cold: drop the
//! page cache), send the same 4,096-token prefix with a different short ending on a new
//! agent: the 16 blocks are restored from disk. The server's `semantic_restore_seconds`
//! (load, verify, import into the engine) and `semantic_cache_restored_bytes_total` give
//! the restore throughput. The plain read reads the same files with 1 MiB `read` calls.

use std::fs::{self, File};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use serde_json::json;

use super::client::{metric, Chat, Message};
use super::prompts;
use super::report::{fmt_summary, Table};
use super::server::Server;
use super::stats::Summary;
use super::{Ctx, Scenario};
use crate::util::log;

/// Fewest runs per page-cache state: a run takes seconds, and the VM's disk speed varies
/// from run to run by up to a third, so the medians get more samples than `--runs` gives.
const MIN_RUNS: usize = 5;

/// Tokens of the cached prefix (16 blocks of 256).
const PREFIX_TOKENS: u64 = 4096;
/// The fitted prompt is this much longer than the prefix, so that the varying ending
/// appended to it falls after the 16th block (and every request restores all 16).
const SLACK_TOKENS: u64 = 48;

#[derive(Debug, Clone, Serialize)]
struct Restore {
    cold: bool,
    restored_tokens: u64,
    restored_bytes: f64,
    restore_s: f64,
    mb_s: f64,
    ttft_s: f64,
}

#[derive(Debug, Clone, Serialize)]
struct PlainRead {
    cold: bool,
    bytes: u64,
    seconds: f64,
    mb_s: f64,
}

/// Drop the page cache (needs root); `false` when not allowed.
fn drop_caches() -> bool {
    let _ = std::process::Command::new("sync").status();
    fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

fn block_files(cache: &Path) -> Result<Vec<PathBuf>> {
    let dir = cache.join("blocks");
    let mut files = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let entry = entry?;
            let ty = entry.file_type()?;
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    if files.is_empty() {
        bail!("no block files under {}", dir.display());
    }
    Ok(files)
}

fn plain_read(files: &[PathBuf], cold: bool) -> Result<PlainRead> {
    let mut buf = vec![0u8; 1 << 20];
    let started = Instant::now();
    let mut bytes = 0u64;
    for path in files {
        let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(PlainRead {
        cold,
        bytes,
        seconds,
        mb_s: bytes as f64 / seconds / 1e6,
    })
}

/// Run the scenario.
pub fn run(ctx: &Ctx) -> Result<()> {
    let cache = ctx.fresh_dir("store-cache")?;
    let spec = ctx.ours(&cache, "store", &[])?;
    let mut server = Server::start(spec)?;
    let client = server.client();
    let system = [Message::system("You are a careful assistant.")];
    let (prefix, tokens) = prompts::fit(
        &client,
        &system,
        PREFIX_TOKENS + SLACK_TOKENS,
        77,
        &format!("Archive {}:", ctx.stamp),
    )?;
    let ending = |k: usize| {
        let mut m = prefix.clone();
        if let Some(last) = m.last_mut() {
            last.content.push_str(&format!(
                " Variant {k}: summarise the archive in five words."
            ));
        }
        m
    };
    let prime = client.chat(&Chat {
        messages: &ending(0),
        max_tokens: 1,
        agent: Some("store-prime"),
        extra: None,
    })?;
    log(
        "bench",
        format_args!("store: primed {tokens}+ tokens: {:?}", prime.cache),
    );
    server.stop()?;
    let files = block_files(&cache)?;
    let file_bytes: u64 = files
        .iter()
        .filter_map(|p| fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    log(
        "bench",
        format_args!(
            "store: {} block files, {:.1} MB",
            files.len(),
            file_bytes as f64 / 1e6
        ),
    );

    let can_drop = drop_caches();
    if !can_drop {
        log(
            "bench",
            "store: cannot drop the page cache (needs root); measuring warm only",
        );
    }
    let runs = ctx.runs.max(MIN_RUNS);
    let mut restores = Vec::new();
    let mut reads = Vec::new();
    let mut k = 1;
    for cold in [true, false] {
        if cold && !can_drop {
            continue;
        }
        for _ in 0..runs {
            server.restart()?;
            if cold && !drop_caches() {
                bail!("dropping the page cache worked once and then failed");
            }
            let client = server.client();
            let before = client.get_text("/metrics")?;
            let agent = format!("store-{}-{k}", ctx.stamp);
            let s = client.chat(&Chat {
                messages: &ending(k),
                max_tokens: 1,
                agent: Some(&agent),
                extra: None,
            })?;
            k += 1;
            let after = client.get_text("/metrics")?;
            let delta = |name: &str| {
                metric(&after, name).unwrap_or(0.0) - metric(&before, name).unwrap_or(0.0)
            };
            let restored_bytes = delta("semantic_cache_restored_bytes_total");
            let restore_s = delta("semantic_restore_seconds_sum");
            let restored_tokens = s.cache.map_or(0, |c| c.restored);
            if restored_tokens == 0 || restore_s <= 0.0 {
                bail!("the request restored nothing from disk (cache report {:?}); is the store working?", s.cache);
            }
            let r = Restore {
                cold,
                restored_tokens,
                restored_bytes,
                restore_s,
                mb_s: restored_bytes / restore_s / 1e6,
                ttft_s: s.ttft_s,
            };
            log(
                "bench",
                format_args!(
                    "store: restore ({}) {:.0} MB/s, {} tokens in {:.1} ms",
                    if cold { "cold" } else { "warm" },
                    r.mb_s,
                    restored_tokens,
                    restore_s * 1e3
                ),
            );
            restores.push(r);
            // The plain read right after, in the same page-cache state.
            if cold && !drop_caches() {
                bail!("dropping the page cache failed");
            }
            reads.push(plain_read(&files, cold)?);
        }
    }
    drop(server);

    let mut t = Table::new([
        "page cache",
        "restore MB/s",
        "plain read MB/s",
        "restore / plain read",
        "restore ms (16 blocks)",
        "TTFT ms",
    ]);
    for cold in [true, false] {
        let rs: Vec<&Restore> = restores.iter().filter(|r| r.cold == cold).collect();
        if rs.is_empty() {
            continue;
        }
        let ps: Vec<&PlainRead> = reads.iter().filter(|r| r.cold == cold).collect();
        let rm = Summary::of(&rs.iter().map(|r| r.mb_s).collect::<Vec<_>>());
        let pm = Summary::of(&ps.iter().map(|r| r.mb_s).collect::<Vec<_>>());
        // Ratio per run (restore and read measured back to back), then the median.
        let ratios: Vec<f64> = rs
            .iter()
            .zip(&ps)
            .map(|(r, p)| r.mb_s / p.mb_s * 100.0)
            .collect();
        t.row([
            if cold { "cold (dropped)" } else { "warm" }.to_owned(),
            fmt_summary(rm, 0),
            fmt_summary(pm, 0),
            format!("{} %", fmt_summary(Summary::of(&ratios), 0)),
            fmt_summary(
                Summary::of(&rs.iter().map(|r| r.restore_s * 1e3).collect::<Vec<_>>()),
                1,
            ),
            fmt_summary(
                Summary::of(&rs.iter().map(|r| r.ttft_s * 1e3).collect::<Vec<_>>()),
                0,
            ),
        ]);
    }
    let restored_bytes = restores.first().map_or(0.0, |r| r.restored_bytes);
    let restored_tokens = restores.first().map_or(0, |r| r.restored_tokens);
    let mut md = format!(
        "Restore of a {restored_tokens}-token cache ({} block files, {:.1} MB on disk, {:.1} MB of KV \
         payload) through the disk store, against a plain sequential read of the same files \
         (goal: restore ≥ 70 % of the plain read; median of {runs} runs per page-cache state):\n\n",
        files.len(),
        file_bytes as f64 / 1e6,
        restored_bytes / 1e6
    );
    md.push_str(&t.render());
    md.push_str(
        "\n*Restore* is the server's own timing (`semantic_restore_seconds`: read, verify the \
         checksum, decode and import the blocks into the engine's KV buffers) over the payload \
         bytes it reports (`semantic_cache_restored_bytes_total`); *plain read* is `read(2)` of \
         the same files in 1 MiB chunks, right after, in the same page-cache state. *TTFT* \
         includes the restore, the prefill of the last partial block and the first token.\n",
    );
    if !can_drop {
        md.push_str(
            "\nThe page cache could not be dropped (not root), so only warm figures are shown.\n",
        );
    }
    let json = json!({
        "scenario": "store", "date": ctx.date, "command": ctx.command, "machine": ctx.machine,
        "runs": runs, "prefix_tokens": tokens, "block_files": files.len(), "file_bytes": file_bytes,
        "restores": restores, "plain_reads": reads,
    });
    ctx.publish(Scenario::Store, &json, &md)
}
