//! The store through the `CacheStore` port (as the service sees it), without a runtime.

mod common;

use agent_session::{CacheStore, Namespace, StoreError, TensorDtype};
use cache_store_disk::DiskCacheStore;
use common::*;
use futures::executor::block_on;
use std::sync::Arc;

#[test]
fn the_port_round_trips_blocks_and_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn CacheStore> = Arc::new(open(dir.path()));
    let toks = tokens(1, 3 * BLOCK + 10);
    let blocks = chain(&toks, FP, "", Kind::Float(TensorDtype::Bf16));
    block_on(async {
        assert_eq!(store.save_blocks(blocks.clone()).await.expect("save"), 3);
        assert_eq!(
            store.stored_prefix(&hashes(&blocks)).await.expect("prefix"),
            3
        );
        store.flush().await.expect("flush");
        let loaded = store.load_blocks(FP, &hashes(&blocks)).await.expect("load");
        assert_blocks_eq(&loaded, &blocks);

        let m = manifest("agent-1", "", &blocks, &toks[3 * BLOCK..], false);
        store.save_manifest(&m).await.expect("save manifest");
        let key = DiskCacheStore::agent_key(Namespace::default(), "agent-1").expect("key");
        assert_eq!(
            store.load_manifest(&key).await.expect("load"),
            Some(m.clone())
        );
        assert_eq!(store.list_manifests(None).await.expect("list"), vec![m]);
        let stats = store.stats().await.expect("stats");
        assert_eq!(
            (stats.blocks, stats.agents, stats.blocks_written),
            (3, 1, 3)
        );
        assert!(stats.bytes > 0);

        assert!(store.delete_manifest(&key).await.expect("delete"));
        store.flush().await.expect("flush");
        assert_eq!(
            store.stored_prefix(&hashes(&blocks)).await.expect("prefix"),
            0
        );
        assert!(store.list_manifests(None).await.expect("list").is_empty());
    });
    assert!(block_files(dir.path()).is_empty());
}

#[test]
fn port_errors_are_typed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn CacheStore> = Arc::new(open(dir.path()));
    let blocks = chain(&tokens(2, BLOCK), FP, "", Kind::Float(TensorDtype::F32));
    let mut m = manifest("agent-2", "", &blocks, &[], false);
    m.block_hashes.push("../../not-a-hash".into());
    let err = block_on(store.save_manifest(&m)).expect_err("bad hash");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    let mut bad = (*blocks[0]).clone();
    bad.payload.tensors.clear();
    let err = block_on(store.save_blocks(vec![Arc::new(bad)])).expect_err("no tensors");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
}
