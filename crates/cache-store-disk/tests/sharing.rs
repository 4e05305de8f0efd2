//! Content addressing: shared prefixes are stored once, a turn writes only its new blocks.

mod common;

use agent_session::TensorDtype;
use common::*;

const KIND: Kind = Kind::Float(TensorDtype::Bf16);

#[test]
fn two_agents_with_the_same_system_prompt_share_its_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let system = tokens(1, 512); // 2 blocks of 256
    let mut a_tokens = system.clone();
    a_tokens.extend(tokens(2, 100));
    let mut b_tokens = system.clone();
    b_tokens.extend(tokens(3, 200));
    let a = chain(&a_tokens, FP, "", KIND);
    let b = chain(&b_tokens, FP, "", KIND);
    assert_eq!((a.len(), b.len()), (2, 2));

    assert_eq!(store.save_blocks_blocking(a.clone()).expect("save a"), 2);
    store
        .save_manifest_blocking(&manifest("agent-a", "", &a, &a_tokens[512..], false))
        .expect("manifest a");
    // Same prefix: nothing new, whether A's writes are still queued or not.
    assert_eq!(store.save_blocks_blocking(b.clone()).expect("save b"), 0);
    store
        .save_manifest_blocking(&manifest("agent-b", "", &b, &b_tokens[512..], false))
        .expect("manifest b");
    store.flush_blocking().expect("flush");
    assert_eq!(
        store.save_blocks_blocking(b.clone()).expect("save b again"),
        0
    );
    store.flush_blocking().expect("flush");

    assert_eq!(block_files(dir.path()).len(), 2, "blocks stored once");
    assert_eq!(store.stats_blocking().blocks_written, 2);
    assert_eq!(
        files_with_suffix(&dir.path().join("agents"), ".json").len(),
        2
    );

    // Deleting A keeps the blocks B still needs.
    let key_a =
        cache_store_disk::DiskCacheStore::agent_key(Default::default(), "agent-a").expect("key");
    assert!(store.delete_manifest_blocking(&key_a).expect("delete a"));
    store.flush_blocking().expect("flush");
    assert_eq!(block_files(dir.path()).len(), 2);
    assert_blocks_eq(&store.load_blocks_blocking(FP, &hashes(&b)), &b);
    // Deleting B too frees them.
    let key_b =
        cache_store_disk::DiskCacheStore::agent_key(Default::default(), "agent-b").expect("key");
    assert!(store.delete_manifest_blocking(&key_b).expect("delete b"));
    assert!(!store
        .delete_manifest_blocking(&key_b)
        .expect("delete b twice"));
    store.flush_blocking().expect("flush");
    assert!(block_files(dir.path()).is_empty());
    assert_eq!(store.stored_prefix_blocking(&hashes(&b)), 0);
}

#[test]
fn namespaces_do_not_share_blocks_or_manifest_dirs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let prompt = tokens(1, 512);
    let a = chain(&prompt, FP, "", KIND);
    let b = chain(&prompt, FP, "tenant-secret-key", KIND);
    assert_eq!(store.save_blocks_blocking(a.clone()).expect("save"), 2);
    assert_eq!(store.save_blocks_blocking(b.clone()).expect("save"), 2);
    store
        .save_manifest_blocking(&manifest("same-id", "", &a, &[], false))
        .expect("manifest");
    store
        .save_manifest_blocking(&manifest("same-id", "tenant-secret-key", &b, &[], false))
        .expect("manifest");
    store.flush_blocking().expect("flush");
    assert_eq!(block_files(dir.path()).len(), 4);

    // The namespace never appears on disk in clear.
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir.path().join("agents")).expect("agents") {
        names.push(
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned(),
        );
    }
    names.sort();
    assert_eq!(names.len(), 2);
    assert!(names.iter().all(|n| !n.contains("tenant")), "{names:?}");
    let same = agent_session::AgentId::new("same-id").expect("id");
    assert!(names.contains(&cache_store_disk::manifest_file_name(&same)));

    let ns = agent_session::Namespace("tenant-secret-key".into());
    let listed = store.list_manifests_blocking(Some(&ns)).expect("list ns");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].namespace, ns);
    let default_only = store
        .list_manifests_blocking(Some(&Default::default()))
        .expect("list default");
    assert_eq!(default_only.len(), 1);
    assert_eq!(
        store.list_manifests_blocking(None).expect("list all").len(),
        2
    );
    let key = cache_store_disk::DiskCacheStore::agent_key(ns, "same-id").expect("key");
    let loaded = store
        .load_manifest_blocking(&key)
        .expect("load")
        .expect("present");
    assert_eq!(
        loaded,
        manifest("same-id", "tenant-secret-key", &b, &[], false)
    );
}

#[test]
fn a_turn_of_300_tokens_on_a_4096_token_conversation_writes_at_most_2_blocks() {
    for start in [4096usize, 4000, 4090] {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(dir.path());
        let conversation = tokens(5, start + 300);
        let before = chain(&conversation[..start], FP, "", KIND);
        store.save_blocks_blocking(before.clone()).expect("turn 1");
        store.flush_blocking().expect("flush");
        let files_before = block_files(dir.path()).len();
        assert_eq!(files_before, start / BLOCK);

        // The next turn: the whole conversation's blocks are offered again.
        let after = chain(&conversation, FP, "", KIND);
        let new = store.save_blocks_blocking(after.clone()).expect("turn 2");
        store.flush_blocking().expect("flush");
        let files_after = block_files(dir.path()).len();
        assert!(
            new <= 2 && files_after - files_before == new,
            "start {start}: {new}"
        );
        assert_eq!(files_after, (start + 300) / BLOCK);
        assert_blocks_eq(&store.load_blocks_blocking(FP, &hashes(&after)), &after);
    }
}
