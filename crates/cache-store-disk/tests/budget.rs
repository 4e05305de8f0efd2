//! Disk budget: least-recently-used unpinned blocks go first; pinned agents' blocks stay.

mod common;

use agent_session::TensorDtype;
use cache_store_disk::{DiskCacheStore, DiskStoreConfig};
use common::*;
use std::path::Path;

const KIND: Kind = Kind::Float(TensorDtype::F32);

/// Size of the largest block file (test blocks differ only by the parent field, empty for
/// the first block of a chain).
fn block_size() -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let b = chain(&tokens(9, 2 * BLOCK), FP, "", KIND);
    store.save_blocks_blocking(b.clone()).expect("save");
    store.flush_blocking().expect("flush");
    std::fs::metadata(store.block_path(&b[1].meta.hash))
        .expect("meta")
        .len()
}

fn open_with_budget(dir: &Path, blocks: u64) -> DiskCacheStore {
    let mut config = DiskStoreConfig::new(dir);
    let size = block_size();
    config.disk_budget_bytes = Some(blocks * size + size / 2);
    DiskCacheStore::open(config).expect("open")
}

fn exists(store: &DiskCacheStore, blocks: &[std::sync::Arc<agent_session::KvBlock>]) -> Vec<bool> {
    blocks
        .iter()
        .map(|b| store.block_path(&b.meta.hash).exists())
        .collect()
}

#[test]
fn oldest_unpinned_blocks_go_first_and_pinned_blocks_stay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_budget(dir.path(), 6);
    let a = chain(&tokens(1, 2 * BLOCK), FP, "", KIND); // pinned, oldest
    let b = chain(&tokens(2, 3 * BLOCK), FP, "", KIND);
    let c = chain(&tokens(3, 3 * BLOCK), FP, "", KIND);
    store
        .save_manifest_blocking(&manifest("pinned", "", &a, &[], true))
        .expect("manifest");
    store
        .save_manifest_blocking(&manifest("b", "", &b, &[], false))
        .expect("manifest");
    for blocks in [&a, &b, &c] {
        store.save_blocks_blocking(blocks.clone()).expect("save");
        store.flush_blocking().expect("flush");
    }
    // 8 blocks for a budget of 6: B's two oldest go; A is older but pinned.
    assert_eq!(exists(&store, &a), [true, true]);
    assert_eq!(exists(&store, &b), [false, false, true]);
    assert_eq!(exists(&store, &c), [true, true, true]);
    let stats = store.stats_blocking();
    assert_eq!((stats.blocks, stats.evicted), (6, 2));
    assert_eq!(block_files(dir.path()).len(), 6);
    assert!(store.load_blocks_blocking(FP, &hashes(&b)).is_empty());
    assert_blocks_eq(&store.load_blocks_blocking(FP, &hashes(&a)), &a);
}

#[test]
fn loading_a_block_makes_it_recent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_budget(dir.path(), 6);
    let a = chain(&tokens(1, 2 * BLOCK), FP, "", KIND);
    let b = chain(&tokens(2, 2 * BLOCK), FP, "", KIND);
    let c = chain(&tokens(3, 2 * BLOCK), FP, "", KIND);
    let d = chain(&tokens(4, 2 * BLOCK), FP, "", KIND);
    store
        .save_manifest_blocking(&manifest("pinned", "", &a, &[], true))
        .expect("manifest");
    for blocks in [&a, &b, &c] {
        store.save_blocks_blocking(blocks.clone()).expect("save");
        store.flush_blocking().expect("flush");
    }
    assert_blocks_eq(&store.load_blocks_blocking(FP, &hashes(&b)), &b); // B is now newer than C
    store.save_blocks_blocking(d.clone()).expect("save");
    store.flush_blocking().expect("flush");
    assert_eq!(exists(&store, &a), [true, true]);
    assert_eq!(exists(&store, &b), [true, true]);
    assert_eq!(exists(&store, &c), [false, false]);
    assert_eq!(exists(&store, &d), [true, true]);
}

#[test]
fn the_budget_applies_at_open_with_file_age_as_recency() {
    let dir = tempfile::tempdir().expect("tempdir");
    let old = chain(&tokens(1, 2 * BLOCK), FP, "", KIND);
    let new = chain(&tokens(2, 2 * BLOCK), FP, "", KIND);
    {
        let store = open(dir.path());
        store.save_blocks_blocking(old.clone()).expect("save");
        store.flush_blocking().expect("flush");
        std::thread::sleep(std::time::Duration::from_millis(20));
        store.save_blocks_blocking(new.clone()).expect("save");
    }
    let store = open_with_budget(dir.path(), 2);
    assert_eq!(exists(&store, &old), [false, false]);
    assert_eq!(exists(&store, &new), [true, true]);
    assert_eq!(store.stats_blocking().evicted, 2);
}

#[test]
fn pinned_blocks_stay_even_over_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_budget(dir.path(), 1);
    let a = chain(&tokens(1, 3 * BLOCK), FP, "", KIND);
    store
        .save_manifest_blocking(&manifest("pinned", "", &a, &[], true))
        .expect("manifest");
    store.save_blocks_blocking(a.clone()).expect("save");
    store.flush_blocking().expect("flush");
    assert_eq!(exists(&store, &a), [true, true, true]);
}

#[test]
fn an_expired_pin_no_longer_protects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_with_budget(dir.path(), 2);
    let a = chain(&tokens(1, 2 * BLOCK), FP, "", KIND);
    let b = chain(&tokens(2, 2 * BLOCK), FP, "", KIND);
    let mut m = manifest("expired", "", &a, &[], true);
    m.ttl_secs = Some(1); // last used at 2 ms after the epoch: long expired
    store.save_manifest_blocking(&m).expect("manifest");
    for blocks in [&a, &b] {
        store.save_blocks_blocking(blocks.clone()).expect("save");
        store.flush_blocking().expect("flush");
    }
    assert_eq!(exists(&store, &a), [false, false]);
    assert_eq!(exists(&store, &b), [true, true]);
}
