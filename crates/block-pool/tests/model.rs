//! State-machine property test: random operation sequences applied to the pool and to a
//! simple reference model, compared after every step.
//!
//! The model keeps per-block holders in plain maps and idle recency as a `Vec` (front = least
//! recently used), independent of the pool's logical clock and indexes.

use std::collections::{BTreeMap, BTreeSet};

use block_pool::{BlockHash, BlockId, BlockPool, BlockState, PoolError, PoolStats};
use proptest::prelude::*;

type Owner = u8;

#[derive(Debug, Clone)]
enum Op {
    Allocate { n: usize, owner: Owner },
    Free { block: u32, owner: Owner },
    Retain { block: u32, owner: Owner },
    Release { block: u32, owner: Owner },
    Register { block: u32, content: u8 },
    Touch { block: u32 },
    Evict { n: usize },
    Pin { owner: Owner, pinned: bool },
    ReleaseAll { owner: Owner },
}

const OWNERS: Owner = 3;

fn op(total: u32) -> impl Strategy<Value = Op> {
    let block = 0..=total; // one past the end exercises UnknownBlock
    let owner = 0..OWNERS;
    prop_oneof![
        3 => (0usize..4, owner.clone()).prop_map(|(n, owner)| Op::Allocate { n, owner }),
        1 => (block.clone(), owner.clone()).prop_map(|(block, owner)| Op::Free { block, owner }),
        2 => (block.clone(), owner.clone()).prop_map(|(block, owner)| Op::Retain { block, owner }),
        3 => (block.clone(), owner.clone()).prop_map(|(block, owner)| Op::Release { block, owner }),
        3 => (block.clone(), 0u8..8).prop_map(|(block, content)| Op::Register { block, content }),
        1 => block.prop_map(|block| Op::Touch { block }),
        1 => (0usize..4).prop_map(|n| Op::Evict { n }),
        1 => (owner.clone(), any::<bool>()).prop_map(|(owner, pinned)| Op::Pin { owner, pinned }),
        1 => owner.prop_map(|owner| Op::ReleaseAll { owner }),
    ]
}

fn hash(content: u8) -> BlockHash {
    BlockHash::chain(None, &[u32::from(content)], "model", "ns")
}

#[derive(Debug, Clone, Default)]
struct MBlock {
    holders: BTreeMap<Owner, u32>,
    hash: Option<u8>,
    idle: bool,
    recent: BTreeSet<Owner>,
}

impl MBlock {
    fn is_free(&self) -> bool {
        self.holders.is_empty() && !self.idle
    }
    fn refcount(&self) -> u32 {
        self.holders.values().sum()
    }
}

#[derive(Debug)]
struct Model {
    blocks: Vec<MBlock>,
    idle_order: Vec<u32>,
    pinned: BTreeSet<Owner>,
}

impl Model {
    fn new(total: u32) -> Self {
        Self {
            blocks: vec![MBlock::default(); total as usize],
            idle_order: Vec::new(),
            pinned: BTreeSet::new(),
        }
    }

    fn stats(&self) -> PoolStats {
        let used = self.blocks.iter().filter(|b| !b.holders.is_empty()).count();
        let idle = self.blocks.iter().filter(|b| b.idle).count();
        PoolStats {
            total: self.blocks.len(),
            used,
            idle_cached: idle,
            free: self.blocks.len() - used - idle,
        }
    }

    fn candidates(&self, n: usize) -> Vec<u32> {
        let pinned = |b: &u32| {
            self.blocks[*b as usize]
                .recent
                .iter()
                .any(|o| self.pinned.contains(o))
        };
        let unp = self.idle_order.iter().filter(|b| !pinned(b));
        let pin = self.idle_order.iter().filter(|b| pinned(b));
        unp.chain(pin).take(n).copied().collect()
    }

    fn make_free(&mut self, b: u32) {
        self.blocks[b as usize] = MBlock::default();
        self.idle_order.retain(|x| *x != b);
    }

    fn evict(&mut self, n: usize) -> Vec<(BlockId, BlockHash)> {
        let victims = self.candidates(n);
        let mut out = Vec::new();
        for b in victims {
            let h = self.blocks[b as usize].hash;
            self.make_free(b);
            if let Some(h) = h {
                out.push((BlockId::new(b), hash(h)));
            }
        }
        out
    }

    fn drop_ref(&mut self, b: u32, owner: Owner) {
        let blk = &mut self.blocks[b as usize];
        if let Some(c) = blk.holders.get_mut(&owner) {
            *c -= 1;
            if *c == 0 {
                blk.holders.remove(&owner);
            }
        }
        if blk.holders.is_empty() {
            if blk.hash.is_some() {
                blk.idle = true;
                self.idle_order.push(b);
            } else {
                self.make_free(b);
            }
        }
    }
}

fn kind(r: &Result<(), PoolError>) -> String {
    match r {
        Ok(()) => "ok".into(),
        Err(e) => format!("{:?}", std::mem::discriminant(e)),
    }
}

fn expect(e: PoolError) -> Result<(), PoolError> {
    Err(e)
}

/// Applies one op to both; returns an error message on divergence.
fn step(pool: &mut BlockPool<Owner>, m: &mut Model, op: &Op) -> Result<(), TestCaseError> {
    let total = m.blocks.len() as u32;
    match *op {
        Op::Allocate { n, owner } => {
            let free = m.blocks.iter().filter(|b| b.is_free()).count();
            let available = free + m.idle_order.len();
            let got = pool.allocate(n, &owner);
            if n > available {
                prop_assert_eq!(
                    got,
                    Err(PoolError::InsufficientBlocks {
                        requested: n,
                        available
                    })
                );
                return Ok(());
            }
            let got = got.map_err(|e| TestCaseError::fail(format!("allocate failed: {e}")))?;
            let evicted = if n > free {
                m.evict(n - free)
            } else {
                Vec::new()
            };
            prop_assert_eq!(
                &got.evicted,
                &evicted,
                "eviction must follow LRU, unpinned first"
            );
            prop_assert_eq!(got.blocks.len(), n);
            let distinct: BTreeSet<_> = got.blocks.iter().collect();
            prop_assert_eq!(distinct.len(), n);
            for b in &got.blocks {
                let blk = &mut m.blocks[b.index()];
                prop_assert!(blk.is_free(), "allocated a non-free block {}", b);
                blk.holders.insert(owner, 1);
                blk.recent = BTreeSet::from([owner]);
            }
        }
        Op::Free { block, owner } => {
            let got = pool.free(BlockId::new(block), &owner);
            let id = BlockId::new(block);
            let want = if block >= total {
                expect(PoolError::UnknownBlock { block: id })
            } else {
                let b = &m.blocks[block as usize];
                if b.holders.is_empty() {
                    expect(PoolError::DoubleFree { block: id })
                } else if !b.holders.contains_key(&owner) {
                    expect(PoolError::NotHeld { block: id })
                } else if b.holders.len() > 1 {
                    expect(PoolError::Shared {
                        block: id,
                        holders: b.holders.len(),
                    })
                } else {
                    m.make_free(block);
                    Ok(())
                }
            };
            prop_assert_eq!(got, want);
        }
        Op::Retain { block, owner } => {
            let id = BlockId::new(block);
            let got = pool.retain(id, &owner);
            let want = if block >= total {
                expect(PoolError::UnknownBlock { block: id })
            } else {
                let b = &mut m.blocks[block as usize];
                if b.is_free() {
                    expect(PoolError::NotAllocated { block: id })
                } else if !b.idle && b.hash.is_none() && !b.holders.contains_key(&owner) {
                    expect(PoolError::Exclusive { block: id })
                } else {
                    if b.idle {
                        b.idle = false;
                        b.recent.clear();
                        m.idle_order.retain(|x| *x != block);
                    }
                    let b = &mut m.blocks[block as usize];
                    *b.holders.entry(owner).or_insert(0) += 1;
                    b.recent.insert(owner);
                    Ok(())
                }
            };
            prop_assert_eq!(got, want);
        }
        Op::Release { block, owner } => {
            let id = BlockId::new(block);
            let got = pool.release(id, &owner);
            let want = if block >= total {
                expect(PoolError::UnknownBlock { block: id })
            } else {
                let b = &m.blocks[block as usize];
                if b.holders.is_empty() {
                    expect(PoolError::DoubleFree { block: id })
                } else if !b.holders.contains_key(&owner) {
                    expect(PoolError::NotHeld { block: id })
                } else {
                    m.drop_ref(block, owner);
                    Ok(())
                }
            };
            prop_assert_eq!(got, want);
        }
        Op::Register { block, content } => {
            let id = BlockId::new(block);
            let got = pool.register_hash(id, hash(content));
            let want = if block >= total {
                expect(PoolError::UnknownBlock { block: id })
            } else if m.blocks[block as usize].is_free() {
                expect(PoolError::NotAllocated { block: id })
            } else {
                match m.blocks[block as usize].hash {
                    Some(c) if c == content => Ok(()),
                    Some(c) => expect(PoolError::AlreadyHashed {
                        block: id,
                        existing: hash(c),
                    }),
                    None => match m.blocks.iter().position(|b| b.hash == Some(content)) {
                        Some(other) => expect(PoolError::HashConflict {
                            hash: hash(content),
                            existing: BlockId::new(other as u32),
                        }),
                        None => {
                            m.blocks[block as usize].hash = Some(content);
                            Ok(())
                        }
                    },
                }
            };
            prop_assert_eq!(got, want);
        }
        Op::Touch { block } => {
            let id = BlockId::new(block);
            let got = pool.touch(id);
            let want = if block >= total {
                expect(PoolError::UnknownBlock { block: id })
            } else if m.blocks[block as usize].is_free() {
                expect(PoolError::NotAllocated { block: id })
            } else {
                if m.blocks[block as usize].idle {
                    m.idle_order.retain(|x| *x != block);
                    m.idle_order.push(block);
                }
                Ok(())
            };
            prop_assert_eq!(kind(&got), kind(&want));
        }
        Op::Evict { n } => {
            let candidates: Vec<BlockId> = m.candidates(n).into_iter().map(BlockId::new).collect();
            prop_assert_eq!(pool.eviction_candidates(n), candidates);
            let got = pool.evict(n);
            let want = m.evict(n);
            prop_assert_eq!(got, want);
        }
        Op::Pin { owner, pinned } => {
            pool.set_pinned(&owner, pinned);
            if pinned {
                m.pinned.insert(owner);
            } else {
                m.pinned.remove(&owner);
            }
        }
        Op::ReleaseAll { owner } => {
            let got = pool.release_all(&owner);
            let held: Vec<u32> = (0..total)
                .filter(|b| m.blocks[*b as usize].holders.contains_key(&owner))
                .collect();
            for &b in &held {
                while m.blocks[b as usize].holders.contains_key(&owner) {
                    m.drop_ref(b, owner);
                }
            }
            let held: Vec<BlockId> = held.into_iter().map(BlockId::new).collect();
            prop_assert_eq!(got, held);
        }
    }
    Ok(())
}

/// Invariants checked after every step.
fn check(pool: &BlockPool<Owner>, m: &Model) -> Result<(), TestCaseError> {
    let s = pool.stats();
    prop_assert_eq!(s.used + s.idle_cached + s.free, s.total, "counts add up");
    prop_assert_eq!(s, m.stats());
    prop_assert_eq!(pool.available_blocks(), s.free + s.idle_cached);
    for (i, b) in m.blocks.iter().enumerate() {
        let id = BlockId::new(i as u32);
        let want = if b.idle {
            BlockState::IdleCached
        } else if b.holders.is_empty() {
            BlockState::Free
        } else {
            BlockState::Used {
                refcount: b.refcount(),
            }
        };
        prop_assert_eq!(pool.state(id).ok(), Some(want));
        let holders: Vec<(Owner, u32)> = b.holders.iter().map(|(o, c)| (*o, *c)).collect();
        prop_assert_eq!(pool.holders(id), holders);
        // No block without a content hash has two owners (exclusive blocks stay exclusive).
        if b.hash.is_none() {
            prop_assert!(pool.holders(id).len() <= 1);
        }
        prop_assert_eq!(pool.hash_of(id), b.hash.map(hash));
        if let Some(c) = b.hash {
            prop_assert_eq!(pool.lookup(&hash(c)), Some(id));
        }
    }
    for owner in 0..OWNERS {
        let held: Vec<BlockId> = (0..m.blocks.len())
            .filter(|b| m.blocks[*b].holders.contains_key(&owner))
            .map(|b| BlockId::new(b as u32))
            .collect();
        prop_assert_eq!(pool.blocks_of(&owner), held);
    }
    Ok(())
}

fn scenario() -> impl Strategy<Value = (u32, Vec<Op>)> {
    (1u32..8).prop_flat_map(|total| (Just(total), prop::collection::vec(op(total), 1..80)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_model((total, ops) in scenario()) {
        let mut pool: BlockPool<Owner> = BlockPool::new(total);
        let mut model = Model::new(total);
        for op in &ops {
            let before = pool.stats();
            step(&mut pool, &mut model, op)?;
            check(&pool, &model)?;
            // A refused allocation changes nothing.
            if let Op::Allocate { n, .. } = op {
                if *n > before.free + before.idle_cached {
                    prop_assert_eq!(pool.stats(), before);
                }
            }
        }
    }
}
