//! Scenario tests of the pool's state machine.

use block_pool::{
    Allocation, BlockHash, BlockId, BlockPool, BlockState, OwnerId, PoolError, PoolStats,
};
use model_cache_spec::ModelCacheSpec;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn owner(s: &str) -> OwnerId {
    OwnerId::from(s)
}

fn h(n: u32) -> BlockHash {
    BlockHash::chain(None, &[n], "model", "ns")
}

fn stats(total: usize, used: usize, idle_cached: usize, free: usize) -> PoolStats {
    PoolStats {
        total,
        used,
        idle_cached,
        free,
    }
}

#[test]
fn from_budget_divides_by_bytes_per_block() -> TestResult {
    let spec = ModelCacheSpec::uniform(30, 3, 64, 256)?; // SmolLM2-135M: 5,898,240 B/block
    let pool: BlockPool = BlockPool::from_budget(&spec, 1 << 30)?;
    assert_eq!(pool.total_blocks(), 182);
    assert_eq!(pool.stats(), stats(182, 0, 0, 182));
    assert!(matches!(
        BlockPool::<OwnerId>::from_budget(&spec, 1000),
        Err(PoolError::BudgetTooSmall {
            budget: 1000,
            bytes_per_block: 5_898_240
        })
    ));
    let tiny = ModelCacheSpec::uniform(1, 1, 32, 64)?; // 8,192 B/block
    assert!(matches!(
        BlockPool::<OwnerId>::from_budget(&tiny, u64::MAX),
        Err(PoolError::TooManyBlocks { .. })
    ));
    Ok(())
}

#[test]
fn allocation_is_all_or_nothing() -> TestResult {
    let mut pool = BlockPool::new(4);
    let a = pool.allocate(3, &owner("a"))?;
    assert_eq!(a.blocks.len(), 3);
    assert!(a.evicted.is_empty());
    assert_eq!(
        pool.allocate(2, &owner("b")),
        Err(PoolError::InsufficientBlocks {
            requested: 2,
            available: 1
        })
    );
    assert_eq!(pool.stats(), stats(4, 3, 0, 1));
    assert!(pool.blocks_of(&owner("b")).is_empty());
    assert_eq!(pool.allocate(0, &owner("b"))?, Allocation::default());
    Ok(())
}

#[test]
fn free_errors_are_typed() -> TestResult {
    let mut pool = BlockPool::new(2);
    let (a, b) = (owner("a"), owner("b"));
    let block = pool.allocate(1, &a)?.blocks[0];
    assert_eq!(pool.free(block, &b), Err(PoolError::NotHeld { block }));
    pool.free(block, &a)?;
    assert_eq!(pool.free(block, &a), Err(PoolError::DoubleFree { block }));
    assert_eq!(
        pool.release(block, &a),
        Err(PoolError::DoubleFree { block })
    );
    assert_eq!(
        pool.retain(block, &a),
        Err(PoolError::NotAllocated { block })
    );
    let outside = BlockId::new(2);
    assert_eq!(
        pool.free(outside, &a),
        Err(PoolError::UnknownBlock { block: outside })
    );
    assert_eq!(pool.stats(), stats(2, 0, 0, 2));
    Ok(())
}

#[test]
fn unhashed_blocks_are_exclusive_hashed_blocks_are_shared() -> TestResult {
    let mut pool = BlockPool::new(4);
    let (a, b) = (owner("a"), owner("b"));
    let block = pool.allocate(1, &a)?.blocks[0];
    assert_eq!(pool.retain(block, &b), Err(PoolError::Exclusive { block }));
    pool.register_hash(block, h(1))?;
    pool.register_hash(block, h(1))?; // idempotent
    assert_eq!(
        pool.register_hash(block, h(2)),
        Err(PoolError::AlreadyHashed {
            block,
            existing: h(1)
        })
    );
    assert_eq!(pool.lookup(&h(1)), Some(block));
    pool.retain(block, &b)?;
    assert_eq!(pool.state(block)?, BlockState::Used { refcount: 2 });
    assert_eq!(
        pool.free(block, &a),
        Err(PoolError::Shared { block, holders: 2 })
    );
    // A second block may not claim the same content hash.
    let other = pool.allocate(1, &b)?.blocks[0];
    assert_eq!(
        pool.register_hash(other, h(1)),
        Err(PoolError::HashConflict {
            hash: h(1),
            existing: block
        })
    );
    pool.release(block, &a)?;
    assert_eq!(pool.state(block)?, BlockState::Used { refcount: 1 });
    pool.release(block, &b)?;
    // Last reference gone: idle cached, still found by hash.
    assert_eq!(pool.state(block)?, BlockState::IdleCached);
    assert_eq!(pool.lookup(&h(1)), Some(block));
    assert_eq!(pool.stats(), stats(4, 1, 1, 2));
    // Reviving it from idle.
    pool.retain(block, &a)?;
    assert_eq!(pool.state(block)?, BlockState::Used { refcount: 1 });
    assert_eq!(pool.stats(), stats(4, 2, 0, 2));
    Ok(())
}

#[test]
fn free_discards_content() -> TestResult {
    let mut pool = BlockPool::new(1);
    let a = owner("a");
    let block = pool.allocate(1, &a)?.blocks[0];
    pool.register_hash(block, h(1))?;
    pool.free(block, &a)?;
    assert_eq!(pool.lookup(&h(1)), None);
    assert_eq!(pool.state(block)?, BlockState::Free);
    Ok(())
}

#[test]
fn unhashed_release_frees() -> TestResult {
    let mut pool = BlockPool::new(1);
    let a = owner("a");
    let block = pool.allocate(1, &a)?.blocks[0];
    pool.retain(block, &a)?; // same owner may hold it twice
    pool.release(block, &a)?;
    assert_eq!(pool.state(block)?, BlockState::Used { refcount: 1 });
    pool.release(block, &a)?;
    assert_eq!(pool.state(block)?, BlockState::Free);
    Ok(())
}

/// Allocates `n` single blocks for `who`, hashes them and releases them: `n` idle blocks in
/// that order (first = least recently used).
fn idle_blocks(
    pool: &mut BlockPool,
    who: &OwnerId,
    n: u32,
    seed: u32,
) -> Result<Vec<BlockId>, PoolError> {
    let mut out = Vec::new();
    for i in 0..n {
        let b = pool.allocate(1, who)?.blocks[0];
        pool.register_hash(b, h(seed + i))?;
        out.push(b);
    }
    for &b in &out {
        pool.release(b, who)?;
    }
    Ok(out)
}

#[test]
fn eviction_is_lru_with_pinned_owners_last() -> TestResult {
    let mut pool = BlockPool::new(6);
    let (a, p) = (owner("a"), owner("pinned"));
    pool.set_pinned(&p, true);
    let pb = idle_blocks(&mut pool, &p, 2, 100)?; // oldest, but pinned
    let ab = idle_blocks(&mut pool, &a, 3, 200)?;
    assert_eq!(pool.stats(), stats(6, 0, 5, 1));
    // Touch moves ab[0] to the most recent end.
    pool.touch(ab[0])?;
    assert_eq!(
        pool.eviction_candidates(10),
        vec![ab[1], ab[2], ab[0], pb[0], pb[1]]
    );
    assert_eq!(pool.eviction_candidates(2), vec![ab[1], ab[2]]);
    // Allocating 3 with 1 free evicts the 2 least recently used unpinned blocks.
    let alloc = pool.allocate(3, &a)?;
    assert_eq!(alloc.evicted, vec![(ab[1], h(201)), (ab[2], h(202))]);
    assert_eq!(pool.lookup(&h(201)), None);
    assert_eq!(pool.stats(), stats(6, 3, 3, 0));
    // Unpinning makes the pinned blocks ordinary LRU again (they are older).
    pool.set_pinned(&p, false);
    assert_eq!(pool.eviction_candidates(3), vec![pb[0], pb[1], ab[0]]);
    let evicted = pool.evict(2);
    assert_eq!(evicted, vec![(pb[0], h(100)), (pb[1], h(101))]);
    assert_eq!(pool.stats(), stats(6, 3, 1, 2));
    Ok(())
}

#[test]
fn shared_prefix_block_serves_several_agents() -> TestResult {
    // Two agents with the same system prompt: the second finds the first's block by hash.
    let mut pool = BlockPool::new(8);
    let (a, b) = (owner("coder"), owner("reviewer"));
    let system: Vec<u32> = (0..256).collect();
    let hash = BlockHash::chain(None, &system, "fp", "default");
    let block = pool.allocate(1, &a)?.blocks[0];
    pool.register_hash(block, hash)?;
    let found = pool.lookup(&BlockHash::chain(None, &system, "fp", "default"));
    assert_eq!(found, Some(block));
    pool.retain(block, &b)?;
    assert_eq!(pool.holders(block), vec![(a.clone(), 1), (b.clone(), 1)]);
    assert_eq!(pool.release_all(&a), vec![block]);
    assert_eq!(pool.blocks_of(&b), vec![block]);
    assert_eq!(pool.state(block)?, BlockState::Used { refcount: 1 });
    Ok(())
}

#[test]
fn chained_hashes() {
    let t1: Vec<u32> = (0..64).collect();
    let t2: Vec<u32> = (64..128).collect();
    let a1 = BlockHash::chain(None, &t1, "fp", "ns");
    let a2 = BlockHash::chain(Some(&a1), &t2, "fp", "ns");
    // Equal prefixes, equal hashes.
    assert_eq!(
        a2,
        BlockHash::chain(
            Some(&BlockHash::chain(None, &t1, "fp", "ns")),
            &t2,
            "fp",
            "ns"
        )
    );
    // Any differing field changes the hash.
    assert_ne!(a1, BlockHash::chain(None, &t1, "fp2", "ns"));
    assert_ne!(a1, BlockHash::chain(None, &t1, "fp", "ns2"));
    assert_ne!(a1, BlockHash::chain(None, &t1[..63], "fp", "ns"));
    assert_ne!(a2, BlockHash::chain(None, &t2, "fp", "ns"));
    let b1 = BlockHash::chain(None, &t2, "fp", "ns");
    assert_ne!(a2, BlockHash::chain(Some(&b1), &t2, "fp", "ns"));
}

#[test]
fn generic_owner_type() -> Result<(), PoolError> {
    let mut pool: BlockPool<u64> = BlockPool::new(2);
    let blocks = pool.allocate(2, &7)?.blocks;
    assert_eq!(pool.blocks_of(&7), blocks);
    Ok(())
}

#[test]
fn huge_pool_is_lazy() -> Result<(), PoolError> {
    let mut pool: BlockPool = BlockPool::new(u32::MAX);
    let a = pool.allocate(3, &owner("a"))?;
    assert_eq!(
        a.blocks,
        vec![BlockId::new(0), BlockId::new(1), BlockId::new(2)]
    );
    assert_eq!(pool.stats().free, u32::MAX as usize - 3);
    Ok(())
}
