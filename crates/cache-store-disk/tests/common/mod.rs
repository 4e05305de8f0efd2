//! Shared helpers: fake KV blocks with chained hashes, manifests, file counting.
#![allow(dead_code)]

use agent_session::{
    AgentId, AgentManifest, BlockMeta, KvBlock, KvEncoding, KvPayload, KvTensor, Namespace,
    TensorDtype,
};
use block_pool::BlockHash;
use cache_store_disk::{DiskCacheStore, DiskStoreConfig};
use std::path::Path;
use std::sync::Arc;

/// The fingerprint used by most tests.
pub const FP: &str = "test-model/spec-v1/tokenizer-abc";
/// Tokens per block in these tests.
pub const BLOCK: usize = 256;

/// Deterministic pseudo-random bytes (xorshift64*).
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

/// Layout of a fake payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Float K/V in this dtype.
    Float(TensorDtype),
    /// MLX-style affine quantization: packed u32 + bf16 scales and biases.
    Quantized { bits: u8 },
}

/// A fake payload: `layers` layers of K and V, 2 heads, `tokens` tokens, head dim 64.
pub fn payload(kind: Kind, layers: usize, tokens: usize, seed: u64) -> KvPayload {
    let heads = 2;
    let head_dim = 64;
    let mut tensors = Vec::new();
    let mut s = seed;
    let mut t = |name: String, dtype: TensorDtype, shape: Vec<usize>| {
        s = s.wrapping_add(1);
        let n: usize = shape.iter().product::<usize>() * dtype.size();
        KvTensor {
            name,
            dtype,
            shape,
            data: bytes(s, n).into(),
        }
    };
    for l in 0..layers {
        for kv in ["k", "v"] {
            match kind {
                Kind::Float(dtype) => tensors.push(t(
                    format!("l{l}.{kv}"),
                    dtype,
                    vec![heads, tokens, head_dim],
                )),
                Kind::Quantized { bits } => {
                    let words = head_dim * bits as usize / 32;
                    let groups = head_dim / 64;
                    tensors.push(t(
                        format!("l{l}.{kv}"),
                        TensorDtype::U32,
                        vec![heads, tokens, words],
                    ));
                    tensors.push(t(
                        format!("l{l}.{kv}.scales"),
                        TensorDtype::Bf16,
                        vec![heads, tokens, groups],
                    ));
                    tensors.push(t(
                        format!("l{l}.{kv}.biases"),
                        TensorDtype::Bf16,
                        vec![heads, tokens, groups],
                    ));
                }
            }
        }
    }
    let encoding = match kind {
        Kind::Float(dtype) => KvEncoding::Float { dtype },
        Kind::Quantized { bits } => KvEncoding::Quantized {
            bits,
            group_size: 64,
        },
    };
    KvPayload { encoding, tensors }
}

/// Blocks of a token sequence (whole blocks only), chained, with small fake payloads.
pub fn chain(tokens: &[u32], fp: &str, ns: &str, kind: Kind) -> Vec<Arc<KvBlock>> {
    let mut parent: Option<BlockHash> = None;
    tokens
        .chunks_exact(BLOCK)
        .map(|chunk| {
            let hash = BlockHash::chain(parent.as_ref(), chunk, fp, ns);
            let seed = u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap_or([0; 8]));
            let block = Arc::new(KvBlock {
                meta: BlockMeta {
                    hash,
                    parent,
                    token_ids: chunk.to_vec(),
                    model_fingerprint: fp.to_owned(),
                },
                // One layer, 4 tokens' worth of KV: enough to test, small on disk.
                payload: payload(kind, 1, 4, seed),
            });
            parent = Some(hash);
            block
        })
        .collect()
}

/// Hashes of blocks.
pub fn hashes(blocks: &[Arc<KvBlock>]) -> Vec<BlockHash> {
    blocks.iter().map(|b| b.meta.hash).collect()
}

/// Tokens `start..start + n` (distinct per `salt`).
pub fn tokens(salt: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 10_000 + salt * 1_000_000 + i)
        .collect()
}

/// A manifest for `agent` covering `blocks` and `tail` extra tokens.
pub fn manifest(
    agent: &str,
    ns: &str,
    blocks: &[Arc<KvBlock>],
    tail: &[u32],
    pinned: bool,
) -> AgentManifest {
    let mut token_ids: Vec<u32> = blocks
        .iter()
        .flat_map(|b| b.meta.token_ids.iter().copied())
        .collect();
    token_ids.extend_from_slice(tail);
    AgentManifest {
        version: AgentManifest::VERSION,
        agent: AgentId::new(agent).expect("test agent id"),
        namespace: Namespace(ns.to_owned()),
        model_fingerprint: FP.to_owned(),
        block_tokens: BLOCK as u32,
        token_ids,
        block_hashes: blocks.iter().map(|b| b.meta.hash.to_string()).collect(),
        created_at_ms: 1,
        last_used_at_ms: 2,
        pinned,
        ttl_secs: None,
    }
}

/// Opens a store in `dir` with defaults.
pub fn open(dir: &Path) -> DiskCacheStore {
    DiskCacheStore::open(DiskStoreConfig::new(dir)).expect("open store")
}

/// Names of the `*.safetensors` files in `dir/blocks`.
pub fn block_files(dir: &Path) -> Vec<String> {
    files_with_suffix(&dir.join("blocks"), ".safetensors")
}

/// Names of the files in `dir` ending with `suffix`, sorted.
pub fn files_with_suffix(dir: &Path, suffix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                .filter(|n| n.ends_with(suffix))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Asserts two block lists are equal, printing only hashes on failure (payloads are big).
#[track_caller]
pub fn assert_blocks_eq(got: &[Arc<KvBlock>], want: &[Arc<KvBlock>]) {
    if got != want {
        let names = |bs: &[Arc<KvBlock>]| -> Vec<String> {
            bs.iter()
                .map(|b| b.meta.hash.to_string()[..12].to_owned())
                .collect()
        };
        panic!(
            "blocks differ:\n got  {:?}\n want {:?}",
            names(got),
            names(want)
        );
    }
}
