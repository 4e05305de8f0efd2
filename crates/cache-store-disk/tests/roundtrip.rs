//! Bit-exact round trips of every encoding, through the store and through the file format.

mod common;

use agent_session::{KvBlock, TensorDtype};
use block_pool::BlockHash;
use cache_store_disk::{decode_block, encode_block, read_block_file, DiskStoreError};
use common::*;
use proptest::prelude::*;
use std::sync::Arc;

fn round_trip(kind: Kind) {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = chain(&tokens(1, 3 * BLOCK), FP, "", kind);
    // Realistic payload size for the first block: 4 layers x 256 tokens.
    let mut big = (*blocks[0]).clone();
    big.payload = payload(kind, 4, BLOCK, 99);
    let blocks = vec![Arc::new(big), blocks[1].clone(), blocks[2].clone()];
    {
        let store = open(dir.path());
        assert_eq!(store.save_blocks_blocking(blocks.clone()).expect("save"), 3);
        // Queued blocks are readable at once, before any flush.
        let early = store.load_blocks_blocking(FP, &hashes(&blocks));
        assert_blocks_eq(&early, &blocks);
        store.flush_blocking().expect("flush");
    }
    let store = open(dir.path());
    let loaded = store.load_blocks_blocking(FP, &hashes(&blocks));
    assert_eq!(loaded.len(), 3);
    for (a, b) in loaded.iter().zip(&blocks) {
        assert!(**a == **b, "bit-exact round trip");
    }
    assert_eq!(store.stats_blocking().blocks_read, 3);
}

#[test]
fn round_trip_f32() {
    round_trip(Kind::Float(TensorDtype::F32));
}

#[test]
fn round_trip_f16() {
    round_trip(Kind::Float(TensorDtype::F16));
}

#[test]
fn round_trip_bf16() {
    round_trip(Kind::Float(TensorDtype::Bf16));
}

#[test]
fn round_trip_quantized_q8_and_q4() {
    round_trip(Kind::Quantized { bits: 8 });
    round_trip(Kind::Quantized { bits: 4 });
}

#[test]
fn drop_flushes_queued_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = chain(&tokens(2, 8 * BLOCK), FP, "", Kind::Float(TensorDtype::F16));
    {
        let store = open(dir.path());
        store.save_blocks_blocking(blocks.clone()).expect("save");
    } // no explicit flush
    assert_eq!(block_files(dir.path()).len(), 8);
    let store = open(dir.path());
    assert_blocks_eq(&store.load_blocks_blocking(FP, &hashes(&blocks)), &blocks);
}

#[test]
fn malformed_blocks_are_refused_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(dir.path());
    let blocks = chain(&tokens(3, 2 * BLOCK), FP, "", Kind::Float(TensorDtype::F32));
    let mut bad = (*blocks[1]).clone();
    let t = &mut bad.payload.tensors[0];
    t.data.truncate(t.data.len() - 1);
    let err = store
        .save_blocks_blocking(vec![blocks[0].clone(), Arc::new(bad)])
        .expect_err("inconsistent tensor");
    assert!(matches!(err, DiskStoreError::InvalidBlock { .. }), "{err}");
    store.flush_blocking().expect("flush");
    assert!(block_files(dir.path()).is_empty());
}

fn small_block(kind: Kind, seed: u64) -> KvBlock {
    let blocks = chain(&tokens(seed as u32 % 1000, BLOCK), FP, "ns", kind);
    let mut b = (*blocks[0]).clone();
    b.payload = payload(kind, 1, 2, seed);
    b
}

fn any_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Float(TensorDtype::F32)),
        Just(Kind::Float(TensorDtype::F16)),
        Just(Kind::Float(TensorDtype::Bf16)),
        Just(Kind::Quantized { bits: 4 }),
        Just(Kind::Quantized { bits: 8 }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any block survives encode/decode unchanged.
    #[test]
    fn encode_decode_is_identity(kind in any_kind(), seed in any::<u64>(), parent in any::<bool>()) {
        let mut block = small_block(kind, seed);
        if !parent {
            block.meta.parent = None;
        }
        let bytes = encode_block(&block).expect("encode");
        let back = decode_block(&bytes, &block.meta.hash, FP).expect("decode");
        prop_assert_eq!(back, block);
    }

    /// Flipping any single bit of a block file is detected (or, for whitespace padding in
    /// the header, harmless): decoding never yields a different block.
    #[test]
    fn single_bit_flips_never_give_a_wrong_answer(
        kind in any_kind(),
        seed in any::<u64>(),
        pos in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let block = small_block(kind, seed);
        let mut bytes = encode_block(&block).expect("encode");
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        if let Ok(back) = decode_block(&bytes, &block.meta.hash, FP) {
            prop_assert_eq!(back, block);
        }
    }
}

/// Exhaustive: every byte position of one small file, flipped, is caught or harmless.
#[test]
fn every_byte_flip_is_caught() {
    let block = small_block(Kind::Quantized { bits: 4 }, 7);
    let clean = encode_block(&block).expect("encode");
    let mut caught = 0;
    for i in 0..clean.len() {
        let mut bytes = clean.clone();
        bytes[i] ^= 0xFF;
        match decode_block(&bytes, &block.meta.hash, FP) {
            Ok(back) => assert_eq!(back, block, "flip at {i} changed the block"),
            Err(_) => caught += 1,
        }
    }
    // Only header padding may be harmless.
    assert!(caught >= clean.len() - 8, "{caught} of {}", clean.len());
}

#[test]
fn decode_rejects_garbage_and_wrong_names() {
    let block = small_block(Kind::Float(TensorDtype::F32), 1);
    let bytes = encode_block(&block).expect("encode");
    for cut in [0, 7, 8, 20, bytes.len() / 2, bytes.len() - 1] {
        assert!(decode_block(&bytes[..cut], &block.meta.hash, FP).is_err());
    }
    assert!(decode_block(b"not a safetensors file at all", &block.meta.hash, FP).is_err());
    let other = BlockHash::chain(None, &[1, 2, 3], FP, "");
    assert!(matches!(
        decode_block(&bytes, &other, FP),
        Err(DiskStoreError::Corrupt(_))
    ));
    assert!(matches!(
        decode_block(&bytes, &block.meta.hash, "another-model"),
        Err(DiskStoreError::ForeignModel { .. })
    ));
}

#[test]
fn files_of_an_older_format_version_are_refused() {
    let block = small_block(Kind::Float(TensorDtype::F32), 1);
    let bytes = encode_block(&block).expect("encode");
    let current = format!(
        "\"format_version\":\"{}\"",
        cache_store_disk::FORMAT_VERSION
    );
    let at = bytes
        .windows(current.len())
        .position(|w| w == current.as_bytes())
        .expect("the version is in the header");
    // Version 1 (BLAKE3 tensor digests), same header length.
    let mut old = bytes.clone();
    old[at..at + current.len()].copy_from_slice(b"\"format_version\":\"1\"");
    assert!(matches!(
        decode_block(&old, &block.meta.hash, FP),
        Err(DiskStoreError::Version { .. })
    ));
}

/// Writes `bytes` as a new file (not truncating an old one, which ext4 flushes on close).
fn fresh_write(path: &std::path::Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).expect("write");
}

/// The streaming file reader applies the same checks: every byte flip and every truncation
/// of a file is caught (or, for header padding, harmless).
#[test]
fn every_byte_flip_and_truncation_is_caught_when_reading_a_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("block.safetensors");
    let block = small_block(Kind::Float(TensorDtype::Bf16), 11);
    let clean = encode_block(&block).expect("encode");
    fresh_write(&path, &clean);
    let (back, len) = read_block_file(&path, &block.meta.hash, FP).expect("clean read");
    assert_eq!((back == block, len), (true, clean.len() as u64));
    let mut caught = 0;
    for i in 0..clean.len() {
        let mut bytes = clean.clone();
        bytes[i] ^= 0xA5;
        fresh_write(&path, &bytes);
        match read_block_file(&path, &block.meta.hash, FP) {
            Ok((back, _)) => assert!(back == block, "flip at {i} changed the block"),
            Err(_) => caught += 1,
        }
    }
    assert!(caught >= clean.len() - 8, "{caught} of {}", clean.len());
    for cut in 0..clean.len() {
        fresh_write(&path, &clean[..cut]);
        assert!(
            read_block_file(&path, &block.meta.hash, FP).is_err(),
            "cut {cut}"
        );
    }
    let mut longer = clean.clone();
    longer.push(0);
    fresh_write(&path, &longer);
    assert!(read_block_file(&path, &block.meta.hash, FP).is_err());
}
