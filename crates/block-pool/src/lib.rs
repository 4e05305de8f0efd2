//! Fixed pool of KV blocks: allocation, owners, reference counts, content hashes, LRU (pure domain).
//!
//! The pool does the bookkeeping for a fixed number of cache blocks (sized from a memory budget
//! and a [`model_cache_spec::ModelCacheSpec`]); it holds no KV data. Each block is in one of
//! three states:
//!
//! - **free**: holds nothing useful, ready for [`BlockPool::allocate`];
//! - **used**: held by one or more owners (reference counted). A block without a content hash
//!   is exclusive to the owner that allocated it (it is still being written); once its content
//!   hash is registered ([`BlockPool::register_hash`]) other owners may
//!   [`retain`](BlockPool::retain) it, which is how agents share a common prefix;
//! - **idle cached**: a hashed block whose last reference was released. It still holds valid
//!   content, can be found with [`BlockPool::lookup`] and re-used with `retain`, and is
//!   reclaimed (evicted) in LRU order, unpinned owners' blocks first, only when an allocation
//!   needs room or [`BlockPool::evict`] is called.
//!
//! Recency is a logical clock (a `u64` counter bumped by every operation on a block), never
//! wall time, so the pool is deterministic and pure.

mod error;
mod hash;
mod pool;

pub use error::PoolError;
pub use hash::BlockHash;
pub use pool::{Allocation, BlockPool, BlockState, PoolStats};

use std::fmt;

/// Index of a block in its pool (`0..total_blocks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

impl BlockId {
    /// Wraps a raw index (validity is checked by the pool on use).
    #[must_use]
    pub const fn new(index: u32) -> Self {
        Self(index)
    }

    /// The raw index.
    #[must_use]
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The raw index as `usize`, for indexing per-block buffers.
    #[must_use]
    pub fn index(self) -> usize {
        // u32 → usize is lossless on every supported (≥ 32-bit) target.
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Default owner key of a [`BlockPool`]: a string (typically an agent id).
///
/// The pool is generic over its owner type (`BlockPool<O>` for any `O: Clone + Ord`), so an
/// application can use its own validated id type directly; `OwnerId` is the default for callers
/// that have none.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(String);

impl OwnerId {
    /// Wraps any string.
    #[must_use]
    pub fn new(id: impl Into<String>) -> Self {
        Self(id.into())
    }

    /// The string.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for OwnerId {
    fn from(id: &str) -> Self {
        Self(id.to_owned())
    }
}

impl From<String> for OwnerId {
    fn from(id: String) -> Self {
        Self(id)
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
