//! KV blocks as plain bytes (what crosses from the engine to the store and back) and the
//! per-agent manifest.

use crate::agent::{AgentId, Namespace};
use crate::TokenId;
use block_pool::BlockHash;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TensorDtype {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    Bf16,
    /// 32-bit words of packed quantized values.
    U32,
}

impl TensorDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TensorDtype::F32 | TensorDtype::U32 => 4,
            TensorDtype::F16 | TensorDtype::Bf16 => 2,
        }
    }
}

/// One named tensor of a block (for example `l3.k`, `l3.v`, `l3.k.scales`), row-major bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvTensor {
    /// Name, unique within the block; the engine defines the scheme.
    pub name: String,
    /// Element type.
    pub dtype: TensorDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// Little-endian row-major bytes; `len == product(shape) * dtype.size()`. Shared and
    /// cheap to clone: the tensors of a block read from disk are slices of one buffer.
    pub data: Bytes,
}

impl KvTensor {
    /// True when the byte length matches shape and dtype.
    pub fn is_consistent(&self) -> bool {
        self.shape
            .iter()
            .try_fold(self.dtype.size(), |acc, d| acc.checked_mul(*d))
            .is_some_and(|n| n == self.data.len())
    }
}

/// How a block's KV is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum KvEncoding {
    /// The live dtype, bit-exact.
    Float {
        /// Element type of K and V.
        dtype: TensorDtype,
    },
    /// MLX affine quantization (packed `u32` values plus scales and biases).
    Quantized {
        /// Bits per element (8 or 4).
        bits: u8,
        /// Elements per scale/bias group.
        group_size: u32,
    },
}

/// The engine's side of a block: its tensors for every layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPayload {
    /// How the tensors are encoded.
    pub encoding: KvEncoding,
    /// K and V (and scales/biases) of every layer.
    pub tensors: Vec<KvTensor>,
}

impl KvPayload {
    /// Total tensor bytes.
    pub fn byte_len(&self) -> usize {
        self.tensors.iter().map(|t| t.data.len()).sum()
    }
}

/// Identity of a block: its chained content hash, its parent and the tokens it covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMeta {
    /// hash(parent, token ids, model fingerprint, namespace).
    pub hash: BlockHash,
    /// The previous block's hash (`None` for the first block of a sequence).
    pub parent: Option<BlockHash>,
    /// The block's token ids (exactly `block_tokens` of them).
    pub token_ids: Vec<TokenId>,
    /// The model fingerprint the KV belongs to.
    pub model_fingerprint: String,
}

/// A full block: identity plus KV payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvBlock {
    /// Identity.
    pub meta: BlockMeta,
    /// KV bytes.
    pub payload: KvPayload,
}

/// What the store keeps per agent: enough to list, show, pin and restore it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentManifest {
    /// Manifest format version.
    pub version: u32,
    /// The agent.
    pub agent: AgentId,
    /// Its tenant.
    pub namespace: Namespace,
    /// The model fingerprint its blocks belong to.
    pub model_fingerprint: String,
    /// Block size in tokens.
    pub block_tokens: u32,
    /// Every token of the agent's last prompt (whole blocks and the partial tail).
    pub token_ids: Vec<TokenId>,
    /// Hex hashes of the whole blocks, in order (they cover `token_ids[..n * block_tokens]`).
    pub block_hashes: Vec<String>,
    /// Creation time, unix milliseconds.
    pub created_at_ms: u64,
    /// Last use, unix milliseconds.
    pub last_used_at_ms: u64,
    /// Pinned agents' blocks are evicted last and never garbage-collected.
    #[serde(default)]
    pub pinned: bool,
    /// Time to live after the last use, in seconds (`None`: no expiry).
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

impl AgentManifest {
    /// Current manifest format version.
    pub const VERSION: u32 = 1;

    /// The tokens of the partial tail block (not stored as KV: re-prefilled on the next turn).
    pub fn tail_tokens(&self) -> &[TokenId] {
        let whole = self.block_hashes.len() * self.block_tokens as usize;
        self.token_ids.get(whole..).unwrap_or(&[])
    }

    /// True when the TTL has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.ttl_secs.is_some_and(|ttl| {
            now_ms.saturating_sub(self.last_used_at_ms) > ttl.saturating_mul(1000)
        })
    }
}
