//! Reads never panic and never lie: corruption, foreign models, bad files and bad ids.

mod common;

use agent_session::{AgentId, AgentIdError, Namespace, StoreError, TensorDtype};
use cache_store_disk::{DiskCacheStore, DiskStoreError};
use common::*;
use std::fs;

const KIND: Kind = Kind::Float(TensorDtype::F16);

#[test]
fn a_flipped_byte_is_a_miss_from_that_block_on_and_is_quarantined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = chain(&tokens(1, 4 * BLOCK), FP, "", KIND);
    {
        let store = open(dir.path());
        store.save_blocks_blocking(blocks.clone()).expect("save");
    }
    let victim = dir
        .path()
        .join("blocks")
        .join(cache_store_disk::block_file_name(&blocks[2].meta.hash));
    let mut bytes = fs::read(&victim).expect("read");
    let i = bytes.len() - 10; // inside tensor data
    bytes[i] ^= 0x01;
    fs::write(&victim, &bytes).expect("write");

    let store = open(dir.path());
    let loaded = store.load_blocks_blocking(FP, &hashes(&blocks));
    assert_blocks_eq(&loaded, &blocks[..2]); // the prefix before the bad block
    assert!(!victim.exists());
    let quarantined = files_with_suffix(&dir.path().join("quarantine"), ".safetensors");
    assert_eq!(quarantined.len(), 1);
    assert!(quarantined[0].starts_with(&blocks[2].meta.hash.to_string()));
    assert_eq!(store.stats_blocking().quarantined, 1);
    // Now simply not stored: the next save writes it again and it loads fully.
    assert_eq!(store.stored_prefix_blocking(&hashes(&blocks)), 2);
    assert_eq!(
        store.save_blocks_blocking(blocks.clone()).expect("resave"),
        1
    );
    store.flush_blocking().expect("flush");
    assert_blocks_eq(&store.load_blocks_blocking(FP, &hashes(&blocks)), &blocks);
}

#[test]
fn a_corrupt_header_or_truncated_file_is_quarantined_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = chain(&tokens(2, 3 * BLOCK), FP, "", KIND);
    let store = open(dir.path());
    store.save_blocks_blocking(blocks.clone()).expect("save");
    store.flush_blocking().expect("flush");
    let path0 = store.block_path(&blocks[0].meta.hash);
    let mut bytes = fs::read(&path0).expect("read");
    bytes[20] ^= 0x40; // inside the JSON header
    fs::write(&path0, &bytes).expect("write");
    let path1 = store.block_path(&blocks[1].meta.hash);
    let len = fs::metadata(&path1).expect("meta").len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path1)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate");

    assert!(store.load_blocks_blocking(FP, &hashes(&blocks)).is_empty());
    assert!(store
        .load_blocks_blocking(FP, &hashes(&blocks[1..]))
        .is_empty());
    assert_eq!(store.stats_blocking().quarantined, 2);
    assert_eq!(
        files_with_suffix(&dir.path().join("quarantine"), ".safetensors").len(),
        2
    );
}

#[test]
fn a_block_of_another_model_is_never_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let toks = tokens(3, 2 * BLOCK);
    let ours = chain(&toks, FP, "", KIND);
    let theirs = chain(&toks, "other-model", "", KIND);
    store.save_blocks_blocking(theirs.clone()).expect("save");
    // Queued (not yet written) and written blocks alike.
    assert!(store.load_blocks_blocking(FP, &hashes(&theirs)).is_empty());
    store.flush_blocking().expect("flush");
    assert!(store.load_blocks_blocking(FP, &hashes(&theirs)).is_empty());
    assert!(store.load_blocks_blocking(FP, &hashes(&ours)).is_empty());

    // A file for our hash whose content belongs to another model: the hash chain of the
    // other model's file is copied under our block's name.
    let src = store.block_path(&theirs[0].meta.hash);
    let dst = store.block_path(&ours[0].meta.hash);
    fs::copy(&src, &dst).expect("copy");
    drop(store);
    let store = open(dir.path());
    assert!(store.load_blocks_blocking(FP, &hashes(&ours)).is_empty());
    // The other model still gets its own blocks.
    assert_blocks_eq(
        &store.load_blocks_blocking("other-model", &hashes(&theirs)),
        &theirs,
    );
}

#[test]
fn a_block_that_does_not_follow_its_predecessor_ends_the_prefix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let a = chain(&tokens(4, 2 * BLOCK), FP, "", KIND);
    let b = chain(&tokens(5, 2 * BLOCK), FP, "", KIND);
    store.save_blocks_blocking(a.clone()).expect("save");
    store.save_blocks_blocking(b.clone()).expect("save");
    store.flush_blocking().expect("flush");
    let mixed = [a[0].meta.hash, b[1].meta.hash];
    assert_blocks_eq(&store.load_blocks_blocking(FP, &mixed), &[a[0].clone()]);
}

#[test]
fn write_errors_are_logged_and_the_store_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let blocks = chain(&tokens(6, 3 * BLOCK), FP, "", KIND);
    // A directory squatting on block 1's final name makes its rename fail (even as root).
    fs::create_dir(store.block_path(&blocks[1].meta.hash)).expect("squat");
    assert_eq!(store.save_blocks_blocking(blocks.clone()).expect("save"), 3);
    store.flush_blocking().expect("flush");
    assert_eq!(store.write_errors(), 1);
    assert_blocks_eq(
        &store.load_blocks_blocking(FP, &hashes(&blocks)),
        &blocks[..1],
    );
    assert_eq!(store.stored_prefix_blocking(&hashes(&blocks)), 1);
    // No leftover temporary file, and the others were written.
    let names = files_with_suffix(&dir.path().join("blocks"), "");
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(names.iter().all(|n| !n.starts_with(".tmp-")));
}

#[test]
fn bad_agent_ids_are_rejected_with_a_typed_error() {
    for (bad, want) in [
        ("", AgentIdError::Empty),
        ("..", AgentIdError::DotName),
        (".", AgentIdError::DotName),
        ("../etc/passwd", AgentIdError::BadChar('/')),
        ("a/b", AgentIdError::BadChar('/')),
        ("a\\b", AgentIdError::BadChar('\\')),
        ("a\0b", AgentIdError::BadChar('\0')),
        ("a b", AgentIdError::BadChar(' ')),
    ] {
        match DiskCacheStore::agent_key(Namespace::default(), bad) {
            Err(DiskStoreError::AgentId(e)) => assert_eq!(e, want, "{bad:?}"),
            other => panic!("{bad:?}: {other:?}"),
        }
        let mapped = StoreError::from(DiskStoreError::AgentId(want.clone()));
        assert!(matches!(mapped, StoreError::Invalid(_)));
    }
    let long = "x".repeat(513);
    assert!(matches!(
        DiskCacheStore::agent_key(Namespace::default(), &long),
        Err(DiskStoreError::AgentId(AgentIdError::TooLong(513)))
    ));
    // The longest valid id still maps inside the agents directory.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let key = DiskCacheStore::agent_key(Namespace::default(), &"x".repeat(512)).expect("key");
    let path = store.manifest_path(&key).expect("path");
    assert_eq!(path.parent(), Some(dir.path().join("agents").as_path()));
    assert!(AgentId::new("ok.id-1_x").is_ok());
}

#[test]
fn invalid_manifest_files_are_skipped_in_listings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let blocks = chain(&tokens(7, BLOCK), FP, "", KIND);
    store
        .save_manifest_blocking(&manifest("good", "", &blocks, &[1, 2], true))
        .expect("save");
    let agents = dir.path().join("agents");
    let path_of = |id: &str| {
        store
            .manifest_path(&DiskCacheStore::agent_key(Namespace::default(), id).expect("key"))
            .expect("path")
    };
    fs::write(path_of("broken"), b"{ not json").expect("write");
    fs::write(agents.join("bad name!.json"), b"{}").expect("write");
    // Valid JSON, but the file name and the agent inside disagree.
    let mut renamed = manifest("someone-else", "", &blocks, &[], false);
    renamed.block_hashes = vec![blocks[0].meta.hash.to_string()];
    fs::write(
        path_of("impostor"),
        serde_json::to_vec(&renamed).expect("json"),
    )
    .expect("write");
    // An agent id that would escape, inside the JSON.
    let text = serde_json::to_string(&renamed)
        .expect("json")
        .replace("someone-else", "../../escape");
    fs::write(path_of("escape"), text).expect("write");
    // A default-namespace manifest claiming another namespace.
    let foreign = manifest("wrong-ns", "tenant", &blocks, &[], false);
    fs::write(
        path_of("wrong-ns"),
        serde_json::to_vec(&foreign).expect("json"),
    )
    .expect("write");

    let listed = store.list_manifests_blocking(None).expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].agent.as_str(), "good");
    assert!(listed[0].pinned);
    assert_eq!(listed[0].tail_tokens(), &[1, 2]);
    let broken = DiskCacheStore::agent_key(Namespace::default(), "broken").expect("key");
    assert_eq!(store.load_manifest_blocking(&broken).expect("load"), None);
    let absent = DiskCacheStore::agent_key(Namespace::default(), "absent").expect("key");
    assert_eq!(store.load_manifest_blocking(&absent).expect("load"), None);
    // `agents rm` can still remove a broken manifest.
    assert!(store.delete_manifest_blocking(&broken).expect("delete"));
    // Reopening (which scans manifests) copes with the junk too.
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.stats_blocking().agents, 1);
}

#[test]
fn parallel_reads_stop_at_the_same_block_as_sequential_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = chain(&tokens(8, 12 * BLOCK), FP, "", KIND);
    {
        let store = open(dir.path());
        store.save_blocks_blocking(blocks.clone()).expect("save");
    }
    for threads in [1, 3, 8] {
        let mut config = cache_store_disk::DiskStoreConfig::new(dir.path());
        config.read_threads = threads;
        let store = DiskCacheStore::open(config).expect("open");
        assert_blocks_eq(&store.load_blocks_blocking(FP, &hashes(&blocks)), &blocks);
        assert_eq!(store.stats_blocking().blocks_read, 12);
    }
    // Block 7 corrupt, block 9 missing: every thread count returns blocks 0..7.
    let path7 = dir
        .path()
        .join("blocks")
        .join(cache_store_disk::block_file_name(&blocks[7].meta.hash));
    let mut bytes = fs::read(&path7).expect("read");
    bytes[100] ^= 0x10;
    fs::write(&path7, &bytes).expect("write");
    let path9 = dir
        .path()
        .join("blocks")
        .join(cache_store_disk::block_file_name(&blocks[9].meta.hash));
    fs::remove_file(&path9).expect("remove");
    let mut config = cache_store_disk::DiskStoreConfig::new(dir.path());
    config.read_threads = 4;
    let store = DiskCacheStore::open(config).expect("open");
    let loaded = store.load_blocks_blocking(FP, &hashes(&blocks));
    assert_blocks_eq(&loaded, &blocks[..7]);
    assert_eq!(store.stats_blocking().quarantined, 1);
    assert_eq!(store.stats_blocking().blocks_read, 7);
    let loaded = store.load_blocks_blocking(FP, &hashes(&blocks));
    assert_blocks_eq(&loaded, &blocks[..7]);
}
