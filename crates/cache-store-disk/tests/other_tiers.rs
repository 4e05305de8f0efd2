//! What the disk store offers a tier behind it (the object store): a block's exact file
//! bytes, adopting a verified file from elsewhere byte for byte, quarantining bad bytes.

mod common;

use cache_store_disk::{decode_block, QUARANTINE_DIR};
use common::*;

#[test]
fn file_bytes_of_a_queued_block_are_the_bytes_written_to_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let blocks = chain(
        &tokens(1, 2 * BLOCK),
        FP,
        "",
        Kind::Float(agent_session::TensorDtype::F32),
    );
    store.save_blocks_blocking(blocks.clone()).expect("save");
    // Possibly still queued: the call waits for the writer, so both reads agree.
    let first = store
        .block_file_bytes_blocking(&blocks[0].meta.hash)
        .expect("read")
        .expect("stored");
    let on_disk = std::fs::read(store.block_path(&blocks[0].meta.hash)).expect("file");
    assert!(first == on_disk, "the bytes of the file");
    let unknown = chain(
        &tokens(2, BLOCK),
        FP,
        "",
        Kind::Float(agent_session::TensorDtype::F32),
    );
    assert_eq!(
        store
            .block_file_bytes_blocking(&unknown[0].meta.hash)
            .expect("read"),
        None
    );
}

#[test]
fn an_adopted_file_is_kept_byte_for_byte_and_read_back_verified() {
    let (src_dir, dst_dir) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let (src, dst) = (open(src_dir.path()), open(dst_dir.path()));
    let blocks = chain(&tokens(3, 2 * BLOCK), FP, "", Kind::Quantized { bits: 4 });
    src.save_blocks_blocking(blocks.clone()).expect("save");
    for b in &blocks {
        let bytes = src
            .block_file_bytes_blocking(&b.meta.hash)
            .expect("read")
            .expect("stored");
        let decoded = decode_block(&bytes, &b.meta.hash, FP).expect("verified");
        assert!(dst
            .adopt_block_file_blocking(std::sync::Arc::new(decoded), bytes.clone())
            .expect("adopt"));
        // Readable at once, before the writer ran.
        assert_eq!(dst.stored_prefix_blocking(&[b.meta.hash]), 1);
        dst.flush_blocking().expect("flush");
        let kept = std::fs::read(dst.block_path(&b.meta.hash)).expect("file");
        assert!(kept == bytes, "the same bytes as the source file");
    }
    // Adopting a stored block again is a no-op.
    let bytes = src
        .block_file_bytes_blocking(&blocks[0].meta.hash)
        .expect("read")
        .expect("stored");
    let decoded = decode_block(&bytes, &blocks[0].meta.hash, FP).expect("verified");
    assert!(!dst
        .adopt_block_file_blocking(std::sync::Arc::new(decoded), bytes)
        .expect("adopt"));
    drop(dst);
    let dst = open(dst_dir.path());
    assert_blocks_eq(&dst.load_blocks_blocking(FP, &hashes(&blocks)), &blocks);
}

#[test]
fn quarantined_bytes_are_kept_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let blocks = chain(
        &tokens(4, BLOCK),
        FP,
        "",
        Kind::Float(agent_session::TensorDtype::F32),
    );
    store.quarantine_bytes_blocking(&blocks[0].meta.hash, b"not a block");
    assert_eq!(store.stats_blocking().quarantined, 1);
    let kept = files_with_suffix(&dir.path().join(QUARANTINE_DIR), ".safetensors");
    assert_eq!(kept.len(), 1);
    assert_eq!(store.stored_prefix_blocking(&hashes(&blocks)), 0);
}
