//! Files are 0600 and directories 0700; the default cache directory.

mod common;

use agent_session::TensorDtype;
use cache_store_disk::{cache_dir_from, DIR_MODE, FILE_MODE};
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

#[test]
fn files_are_0600_and_directories_0700() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("cache");
    let store = open(&root);
    let blocks = chain(&tokens(1, 2 * BLOCK), FP, "", Kind::Float(TensorDtype::F32));
    store.save_blocks_blocking(blocks.clone()).expect("save");
    store
        .save_manifest_blocking(&manifest("a", "", &blocks, &[], false))
        .expect("manifest");
    store
        .save_manifest_blocking(&manifest("a", "ns1", &blocks, &[], false))
        .expect("manifest");
    store.flush_blocking().expect("flush");

    let mut dirs = vec![root.clone()];
    let mut files = 0;
    while let Some(dir) = dirs.pop() {
        assert_eq!(mode(&dir), DIR_MODE, "{}", dir.display());
        for entry in std::fs::read_dir(&dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                assert_eq!(mode(&path), FILE_MODE, "{}", path.display());
                files += 1;
            }
        }
    }
    assert_eq!(files, 4);
}

#[test]
fn existing_store_directories_are_tightened() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let blocks = tmp.path().join("blocks");
    std::fs::create_dir(&blocks).expect("mkdir");
    std::fs::set_permissions(&blocks, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let _store = open(tmp.path());
    assert_eq!(mode(&blocks), DIR_MODE);
}

#[test]
fn default_cache_dir_precedence() {
    let s = |v: &str| Some(v.into());
    assert_eq!(
        cache_dir_from(s("/x/cache"), s("/h"), s("/home/u")),
        PathBuf::from("/x/cache")
    );
    assert_eq!(
        cache_dir_from(s(""), s("/h"), s("/home/u")),
        PathBuf::from("/h/caches")
    );
    assert_eq!(
        cache_dir_from(None, None, s("/home/u")),
        PathBuf::from("/home/u/.semantic/caches")
    );
    assert_eq!(
        cache_dir_from(None, None, None),
        PathBuf::from(".semantic/caches")
    );
}
