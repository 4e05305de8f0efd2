//! Crash safety: a writer killed with SIGKILL mid-stream leaves only whole, valid blocks.
//!
//! The test binary re-runs itself as the child: `child_writer` does nothing unless
//! `CHILD_DIR_ENV` is set, in which case it writes blocks until killed.

mod common;

use agent_session::{BlockMeta, KvBlock, TensorDtype};
use block_pool::BlockHash;
use common::*;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_DIR_ENV: &str = "CACHE_STORE_DISK_CRASH_CHILD_DIR";
const BLOCKS: usize = 2000;

/// The first `n` blocks of the child's deterministic stream: one long chain, ~24 KiB each.
fn stream(n: usize) -> Vec<Arc<agent_session::KvBlock>> {
    let toks = tokens(42, n * BLOCK);
    chain(&toks, FP, "", Kind::Float(TensorDtype::F16))
        .into_iter()
        .enumerate()
        .map(|(i, b)| {
            let mut big = (*b).clone();
            big.payload = payload(Kind::Float(TensorDtype::F16), 2, 24, i as u64);
            Arc::new(big)
        })
        .collect()
}

#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        return; // only meaningful as the child of `sigkill_mid_write_leaves_only_whole_blocks`
    };
    let store = open(std::path::Path::new(&dir));
    // Generated in chunks so writing starts at once.
    let all = tokens(42, BLOCKS * BLOCK);
    let mut parent = None;
    for (i, chunk) in all.chunks_exact(BLOCK).enumerate() {
        let hash = BlockHash::chain(parent.as_ref(), chunk, FP, "");
        let block = KvBlock {
            meta: BlockMeta {
                hash,
                parent,
                token_ids: chunk.to_vec(),
                model_fingerprint: FP.to_owned(),
            },
            payload: payload(Kind::Float(TensorDtype::F16), 2, 24, i as u64),
        };
        parent = Some(hash);
        store
            .save_blocks_blocking(vec![Arc::new(block)])
            .expect("save");
    }
    store.flush_blocking().expect("flush");
}

#[test]
fn sigkill_mid_write_leaves_only_whole_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "child_writer",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(CHILD_DIR_ENV, dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let deadline = Instant::now() + Duration::from_secs(20);
    while block_files(dir.path()).len() < 20 {
        assert!(Instant::now() < deadline, "child wrote nothing");
        std::thread::sleep(Duration::from_millis(2));
    }
    let still_running = child.try_wait().expect("try_wait").is_none();
    child.kill().expect("SIGKILL"); // std sends SIGKILL on Unix
    child.wait().expect("wait");
    assert!(still_running, "the child finished before it was killed");
    let seen_before = block_files(dir.path()).len();

    let present = block_files(dir.path());
    let blocks = stream(present.len() + 1);
    assert!(present.len() >= seen_before && present.len() < BLOCKS);
    // Writes are committed in order: exactly a prefix of the stream is on disk.
    let expected: Vec<String> = blocks[..present.len()]
        .iter()
        .map(|b| cache_store_disk::block_file_name(&b.meta.hash))
        .collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(present, expected_sorted);

    // Every block under its final name is whole and valid.
    let store = open(dir.path());
    let loaded = store.load_blocks_blocking(FP, &hashes(&blocks));
    assert_eq!(loaded.len(), present.len());
    assert_blocks_eq(&loaded, &blocks[..present.len()]);
    assert_eq!(store.stats_blocking().quarantined, 0);
    // Whatever else is left is a hidden temporary file, never a final name.
    for name in files_with_suffix(&dir.path().join("blocks"), "") {
        assert!(
            name.ends_with(".safetensors")
                || (name.starts_with(".tmp-") && name.ends_with(".partial")),
            "{name}"
        );
    }
}
