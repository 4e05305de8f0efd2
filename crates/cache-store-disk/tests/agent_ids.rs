//! Issue 22: every valid agent id, whatever its length, is persisted and survives a reopen;
//! manifests of the older `<agent_id>.json` layout are migrated at open.

mod common;

use agent_session::TensorDtype;
use agent_session::{AgentId, Namespace, MAX_AGENT_ID_LEN};
use cache_store_disk::{manifest_file_name, DiskCacheStore, MANIFEST_FILE_PREFIX};
use common::*;
use std::fs;

const KIND: Kind = Kind::Float(TensorDtype::F16);

#[test]
fn ids_of_every_length_up_to_the_limit_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = chain(&tokens(3, BLOCK), FP, "", KIND);
    // 230-256 bytes broke the old `<id>.json` temp file name (255-byte limit).
    let lengths = [1, 200, 230, 250, 256, 300, MAX_AGENT_ID_LEN];
    {
        let store = open(dir.path());
        store.save_blocks_blocking(blocks.clone()).expect("blocks");
        for (i, n) in lengths.iter().enumerate() {
            let id = format!("{i}{}", "a".repeat(n - 1));
            store
                .save_manifest_blocking(&manifest(&id, "", &blocks, &[9], false))
                .expect("a valid id is always persisted");
            store
                .save_manifest_blocking(&manifest(&id, "tenant", &blocks, &[9], false))
                .expect("also in a namespace");
        }
        store.flush_blocking().expect("flush");
    }
    let store = open(dir.path());
    for (i, n) in lengths.iter().enumerate() {
        let id = format!("{i}{}", "a".repeat(n - 1));
        for ns in ["", "tenant"] {
            let key = DiskCacheStore::agent_key(Namespace(ns.into()), &id).expect("key");
            let m = store
                .load_manifest_blocking(&key)
                .expect("load")
                .unwrap_or_else(|| panic!("{n}-byte id lost after reopen"));
            assert_eq!(m.agent.as_str(), id);
            let name = store.manifest_path(&key).expect("path");
            let name = name.file_name().and_then(|s| s.to_str()).expect("name");
            assert!(
                name.starts_with(MANIFEST_FILE_PREFIX) && name.len() < 64,
                "{name}"
            );
        }
    }
    assert_eq!(
        store.list_manifests_blocking(None).expect("list").len(),
        2 * lengths.len()
    );
    assert_eq!(store.stats_blocking().agents, 2 * lengths.len() as u64);
}

#[test]
fn old_layout_manifests_are_renamed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = chain(&tokens(4, BLOCK), FP, "", KIND);
    {
        let store = open(dir.path());
        store.save_blocks_blocking(blocks.clone()).expect("blocks");
        store.flush_blocking().expect("flush");
    }
    let agents = dir.path().join("agents");
    let old = manifest("legacy-agent", "", &blocks, &[1], true);
    fs::write(
        agents.join("legacy-agent.json"),
        serde_json::to_vec(&old).expect("json"),
    )
    .expect("write");
    // A file whose name and content disagree is not migrated (nor listed).
    let other = manifest("someone", "", &blocks, &[], false);
    fs::write(
        agents.join("impostor.json"),
        serde_json::to_vec(&other).expect("json"),
    )
    .expect("write");

    let store = open(dir.path());
    let key = DiskCacheStore::agent_key(Namespace::default(), "legacy-agent").expect("key");
    let m = store
        .load_manifest_blocking(&key)
        .expect("load")
        .expect("migrated");
    assert!(m.pinned);
    assert!(!agents.join("legacy-agent.json").exists());
    let id = AgentId::new("legacy-agent").expect("id");
    assert!(agents.join(manifest_file_name(&id)).exists());
    assert!(agents.join("impostor.json").exists());
    let listed = store.list_manifests_blocking(None).expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
}
