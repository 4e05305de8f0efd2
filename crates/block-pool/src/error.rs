//! The one error type of this crate.

use crate::{BlockHash, BlockId};

/// Why a pool operation was refused. A refused operation changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// Not enough free plus evictable idle blocks for an all-or-nothing allocation.
    #[error("cannot allocate {requested} blocks: only {available} free or evictable")]
    InsufficientBlocks {
        /// Blocks asked for.
        requested: usize,
        /// Free plus idle-cached blocks at the time.
        available: usize,
    },
    /// The block id is outside the pool.
    #[error("block {block} is not in this pool")]
    UnknownBlock {
        /// The id.
        block: BlockId,
    },
    /// The block is free, so it cannot be retained, touched or hashed.
    #[error("block {block} is not allocated")]
    NotAllocated {
        /// The block.
        block: BlockId,
    },
    /// `free` or `release` of a block nobody holds (free or idle-cached): a double free.
    #[error("block {block} has no holders (double free)")]
    DoubleFree {
        /// The block.
        block: BlockId,
    },
    /// The owner holds no reference to this block (others do).
    #[error("block {block} is not held by this owner")]
    NotHeld {
        /// The block.
        block: BlockId,
    },
    /// `free` of a block that other owners still hold; use `release`.
    #[error("block {block} is shared by {holders} owners; release it instead of freeing it")]
    Shared {
        /// The block.
        block: BlockId,
        /// Number of distinct owners holding it.
        holders: usize,
    },
    /// `retain` by another owner of a block without a content hash: only content-addressed
    /// (full, immutable) blocks may be shared.
    #[error("block {block} has no content hash, so only its owner may hold it")]
    Exclusive {
        /// The block.
        block: BlockId,
    },
    /// The reference count would overflow `u32`.
    #[error("reference count of block {block} would overflow")]
    RefCountOverflow {
        /// The block.
        block: BlockId,
    },
    /// The hash is already registered for another block (reuse that block instead).
    #[error("hash {hash} is already registered for block {existing}")]
    HashConflict {
        /// The hash.
        hash: BlockHash,
        /// The block that holds it.
        existing: BlockId,
    },
    /// The block already has a different hash (content is immutable once hashed).
    #[error("block {block} already has hash {existing}")]
    AlreadyHashed {
        /// The block.
        block: BlockId,
        /// Its hash.
        existing: BlockHash,
    },
    /// The budget does not hold a single block.
    #[error("budget of {budget} bytes is smaller than one block of {bytes_per_block} bytes")]
    BudgetTooSmall {
        /// The budget in bytes.
        budget: u64,
        /// Bytes of one block.
        bytes_per_block: u64,
    },
    /// The budget holds more blocks than a pool can index (`u32::MAX`).
    #[error("budget holds {blocks} blocks, more than the maximum {max}")]
    TooManyBlocks {
        /// Blocks the budget holds.
        blocks: u64,
        /// The largest pool size.
        max: u64,
    },
    /// Text that is not a block hash (64 hex digits).
    #[error("invalid block hash: {reason}")]
    InvalidHash {
        /// What is wrong.
        reason: &'static str,
    },
}
