//! The block pool state machine.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use model_cache_spec::ModelCacheSpec;

use crate::{BlockHash, BlockId, OwnerId, PoolError};

/// Counts of blocks by state; `used + idle_cached + free == total` always.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PoolStats {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks held by at least one owner.
    pub used: usize,
    /// Hashed blocks nobody holds, kept for reuse until evicted.
    pub idle_cached: usize,
    /// Blocks ready for allocation.
    pub free: usize,
}

/// The public state of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockState {
    /// Ready for allocation.
    Free,
    /// Held by owners, `refcount` references in total (≥ 1).
    Used {
        /// Total references over all owners.
        refcount: u32,
    },
    /// Hashed, unheld, still valid; evicted in LRU order.
    IdleCached,
}

/// Result of [`BlockPool::allocate`]: the new blocks, and the idle blocks that were evicted to
/// make room (the caller persists or drops their content before overwriting it: an evicted
/// block may be among `blocks`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Allocation {
    /// The allocated blocks, each held once by the owner.
    pub blocks: Vec<BlockId>,
    /// Idle cached blocks evicted for room, with their (now unregistered) hashes, LRU first.
    pub evicted: Vec<(BlockId, BlockHash)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Free,
    Used,
    Idle,
}

/// Bookkeeping of one block that has been used at least once.
#[derive(Debug, Clone)]
struct Slot<O> {
    phase: Phase,
    /// References per owner (only while used; each count ≥ 1).
    holders: BTreeMap<O, u32>,
    /// Sum of `holders` counts.
    refcount: u32,
    hash: Option<BlockHash>,
    /// Logical time of the last use.
    tick: u64,
    /// Owners that held the block since it was last allocated or revived from idle; an idle
    /// block counts as pinned while any of them is pinned.
    recent_holders: BTreeSet<O>,
}

impl<O> Slot<O> {
    fn fresh() -> Self {
        Self {
            phase: Phase::Free,
            holders: BTreeMap::new(),
            refcount: 0,
            hash: None,
            tick: 0,
            recent_holders: BTreeSet::new(),
        }
    }
}

/// A fixed pool of `total` blocks with owners, reference counts, content hashes and LRU
/// eviction of idle cached blocks (see the crate docs for the state machine).
///
/// Generic over the owner key `O` (default [`OwnerId`]); errors never mention owners, so the
/// owner type needs no `Debug` or `Display`. Per-block bookkeeping is created lazily, so a pool
/// costs memory in proportion to the blocks actually used, not to its size.
#[derive(Debug, Clone)]
pub struct BlockPool<O = OwnerId> {
    total: u32,
    /// Slots of blocks `0..slots.len()`; blocks at or beyond it are free and never used.
    slots: Vec<Slot<O>>,
    /// Free blocks below `slots.len()`, reused last-freed first.
    free_list: Vec<BlockId>,
    by_hash: HashMap<BlockHash, BlockId>,
    /// Idle cached blocks ordered by (last use, id): LRU first.
    idle: BTreeSet<(u64, BlockId)>,
    /// Blocks each owner holds at least one reference to.
    owned: BTreeMap<O, BTreeSet<BlockId>>,
    pinned: BTreeSet<O>,
    used: usize,
    clock: u64,
}

impl<O: Clone + Ord> BlockPool<O> {
    /// A pool of `total_blocks` free blocks.
    #[must_use]
    pub fn new(total_blocks: u32) -> Self {
        Self {
            total: total_blocks,
            slots: Vec::new(),
            free_list: Vec::new(),
            by_hash: HashMap::new(),
            idle: BTreeSet::new(),
            owned: BTreeMap::new(),
            pinned: BTreeSet::new(),
            used: 0,
            clock: 0,
        }
    }

    /// A pool of as many blocks of `spec` as fit in `budget_bytes`.
    ///
    /// Errors: [`PoolError::BudgetTooSmall`] when not even one block fits,
    /// [`PoolError::TooManyBlocks`] beyond `u32::MAX` blocks.
    pub fn from_budget(spec: &ModelCacheSpec, budget_bytes: u64) -> Result<Self, PoolError> {
        let blocks = spec.blocks_for_budget(budget_bytes);
        if blocks == 0 {
            return Err(PoolError::BudgetTooSmall {
                budget: budget_bytes,
                bytes_per_block: spec.bytes_per_block(),
            });
        }
        let total = u32::try_from(blocks).map_err(|_| PoolError::TooManyBlocks {
            blocks,
            max: u64::from(u32::MAX),
        })?;
        Ok(Self::new(total))
    }

    /// Blocks in the pool.
    #[must_use]
    pub fn total_blocks(&self) -> u32 {
        self.total
    }

    /// Counts by state.
    #[must_use]
    pub fn stats(&self) -> PoolStats {
        let total = self.total as usize;
        let idle_cached = self.idle.len();
        PoolStats {
            total,
            used: self.used,
            idle_cached,
            free: self.free_count(),
        }
    }

    /// Blocks an allocation can get right now: free plus evictable idle cached blocks.
    #[must_use]
    pub fn available_blocks(&self) -> usize {
        self.free_count().saturating_add(self.idle.len())
    }

    fn free_count(&self) -> usize {
        let never_used = (self.total as usize).saturating_sub(self.slots.len());
        never_used.saturating_add(self.free_list.len())
    }

    fn tick(&mut self) -> u64 {
        self.clock = self.clock.saturating_add(1);
        self.clock
    }

    fn check(&self, block: BlockId) -> Result<(), PoolError> {
        if block.get() < self.total {
            Ok(())
        } else {
            Err(PoolError::UnknownBlock { block })
        }
    }

    /// The state of `block`.
    pub fn state(&self, block: BlockId) -> Result<BlockState, PoolError> {
        self.check(block)?;
        Ok(match self.slots.get(block.index()) {
            None => BlockState::Free,
            Some(slot) => match slot.phase {
                Phase::Free => BlockState::Free,
                Phase::Used => BlockState::Used {
                    refcount: slot.refcount,
                },
                Phase::Idle => BlockState::IdleCached,
            },
        })
    }

    /// References `owner` holds to `block` (0 when none or when the block is unknown).
    #[must_use]
    pub fn refs_of(&self, block: BlockId, owner: &O) -> u32 {
        self.slots
            .get(block.index())
            .and_then(|s| s.holders.get(owner).copied())
            .unwrap_or(0)
    }

    /// The owners holding `block`, with their reference counts.
    #[must_use]
    pub fn holders(&self, block: BlockId) -> Vec<(O, u32)> {
        self.slots
            .get(block.index())
            .map(|s| s.holders.iter().map(|(o, n)| (o.clone(), *n)).collect())
            .unwrap_or_default()
    }

    /// The blocks `owner` holds at least one reference to, in id order.
    #[must_use]
    pub fn blocks_of(&self, owner: &O) -> Vec<BlockId> {
        self.owned
            .get(owner)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The content hash registered for `block`, if any.
    #[must_use]
    pub fn hash_of(&self, block: BlockId) -> Option<BlockHash> {
        self.slots.get(block.index()).and_then(|s| s.hash)
    }

    /// The used or idle cached block whose content has `hash`. Does not change recency:
    /// `retain` the block to use it.
    #[must_use]
    pub fn lookup(&self, hash: &BlockHash) -> Option<BlockId> {
        self.by_hash.get(hash).copied()
    }

    /// Allocates `n` blocks to `owner`, all or nothing, each with one reference.
    ///
    /// When free blocks are short, idle cached blocks are evicted first (LRU, unpinned
    /// owners' before pinned) and reported in [`Allocation::evicted`]. Errors with
    /// [`PoolError::InsufficientBlocks`], changing nothing, when free plus idle blocks are
    /// fewer than `n`.
    pub fn allocate(&mut self, n: usize, owner: &O) -> Result<Allocation, PoolError> {
        let free = self.free_count();
        let available = self.available_blocks();
        if n > available {
            return Err(PoolError::InsufficientBlocks {
                requested: n,
                available,
            });
        }
        let evicted = if n > free {
            self.evict(n - free)
        } else {
            Vec::new()
        };
        let mut blocks = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(block) = self.take_free() else {
                // Unreachable: n ≤ free + evicted was checked above.
                break;
            };
            let tick = self.tick();
            let Some(slot) = self.slots.get_mut(block.index()) else {
                // Unreachable: `take_free` only returns blocks that have a slot.
                break;
            };
            slot.phase = Phase::Used;
            slot.holders.insert(owner.clone(), 1);
            slot.refcount = 1;
            slot.hash = None;
            slot.tick = tick;
            slot.recent_holders.clear();
            slot.recent_holders.insert(owner.clone());
            self.owned.entry(owner.clone()).or_default().insert(block);
            self.used += 1;
            blocks.push(block);
        }
        Ok(Allocation { blocks, evicted })
    }

    /// Takes a free block: last freed first, else the next never-used one.
    fn take_free(&mut self) -> Option<BlockId> {
        if let Some(block) = self.free_list.pop() {
            return Some(block);
        }
        let next = u32::try_from(self.slots.len()).ok()?;
        if next >= self.total {
            return None;
        }
        self.slots.push(Slot::fresh());
        Some(BlockId::new(next))
    }

    /// The slot of a block for an operation on a held/idle block; `Free` blocks error with
    /// `on_free(block)`.
    fn live_slot(
        &self,
        block: BlockId,
        on_free: fn(BlockId) -> PoolError,
    ) -> Result<&Slot<O>, PoolError> {
        self.check(block)?;
        match self.slots.get(block.index()) {
            Some(slot) if slot.phase != Phase::Free => Ok(slot),
            _ => Err(on_free(block)),
        }
    }

    /// Moves a block with no references to free (unregistering its hash) or, when hashed and
    /// `keep_cached`, to idle cached.
    fn retire(&mut self, block: BlockId, keep_cached: bool) {
        let tick = self.tick();
        let Some(slot) = self.slots.get_mut(block.index()) else {
            return;
        };
        slot.holders.clear();
        slot.refcount = 0;
        slot.tick = tick;
        match (keep_cached, slot.hash) {
            (true, Some(_)) => {
                slot.phase = Phase::Idle;
                self.idle.insert((tick, block));
            }
            (_, hash) => {
                slot.phase = Phase::Free;
                slot.hash = None;
                slot.recent_holders.clear();
                if let Some(h) = hash {
                    self.by_hash.remove(&h);
                }
                self.free_list.push(block);
            }
        }
    }

    fn forget_owned(&mut self, owner: &O, block: BlockId) {
        if let Some(set) = self.owned.get_mut(owner) {
            set.remove(&block);
            if set.is_empty() {
                self.owned.remove(owner);
            }
        }
    }

    /// Returns a block that only `owner` holds straight to free, discarding its content: its
    /// hash is unregistered, so `lookup` will not find it (use after a failed or truncated
    /// write). To drop a reference and keep valid content cached, use [`BlockPool::release`].
    ///
    /// Errors: `DoubleFree` (nobody holds it), `NotHeld` (this owner does not), `Shared`
    /// (other owners hold it too).
    pub fn free(&mut self, block: BlockId, owner: &O) -> Result<(), PoolError> {
        let slot = self.live_slot(block, |block| PoolError::DoubleFree { block })?;
        if slot.phase == Phase::Idle {
            return Err(PoolError::DoubleFree { block });
        }
        if !slot.holders.contains_key(owner) {
            return Err(PoolError::NotHeld { block });
        }
        if slot.holders.len() > 1 {
            return Err(PoolError::Shared {
                block,
                holders: slot.holders.len(),
            });
        }
        self.forget_owned(owner, block);
        self.used -= 1;
        self.retire(block, false);
        Ok(())
    }

    /// Adds one reference of `owner` to a used or idle cached block (an idle block becomes used
    /// again). A block without a content hash may only gain references from the owner that
    /// holds it (`Exclusive` otherwise).
    ///
    /// Errors: `NotAllocated` (free block), `Exclusive`, `RefCountOverflow`.
    pub fn retain(&mut self, block: BlockId, owner: &O) -> Result<(), PoolError> {
        let slot = self.live_slot(block, |block| PoolError::NotAllocated { block })?;
        let phase = slot.phase;
        if phase == Phase::Used {
            if slot.hash.is_none() && !slot.holders.contains_key(owner) {
                return Err(PoolError::Exclusive { block });
            }
            if slot.refcount == u32::MAX {
                return Err(PoolError::RefCountOverflow { block });
            }
        }
        let tick = self.tick();
        let Some(slot) = self.slots.get_mut(block.index()) else {
            // Unreachable: `live_slot` found it.
            return Err(PoolError::NotAllocated { block });
        };
        let old_tick = slot.tick;
        if phase == Phase::Idle {
            slot.phase = Phase::Used;
            slot.recent_holders.clear();
        }
        *slot.holders.entry(owner.clone()).or_insert(0) += 1;
        slot.refcount += 1;
        slot.tick = tick;
        slot.recent_holders.insert(owner.clone());
        if phase == Phase::Idle {
            self.idle.remove(&(old_tick, block));
            self.used += 1;
        }
        self.owned.entry(owner.clone()).or_default().insert(block);
        Ok(())
    }

    /// Drops one reference of `owner`. When the last reference goes, a hashed block becomes
    /// idle cached (most recently used) and an unhashed block becomes free.
    ///
    /// Errors: `DoubleFree` (nobody holds it), `NotHeld` (this owner does not).
    pub fn release(&mut self, block: BlockId, owner: &O) -> Result<(), PoolError> {
        let slot = self.live_slot(block, |block| PoolError::DoubleFree { block })?;
        if slot.phase == Phase::Idle {
            return Err(PoolError::DoubleFree { block });
        }
        if !slot.holders.contains_key(owner) {
            return Err(PoolError::NotHeld { block });
        }
        let tick = self.tick();
        let Some(slot) = self.slots.get_mut(block.index()) else {
            // Unreachable: `live_slot` found it.
            return Err(PoolError::DoubleFree { block });
        };
        slot.tick = tick;
        slot.refcount = slot.refcount.saturating_sub(1);
        let mut owner_done = false;
        if let Some(count) = slot.holders.get_mut(owner) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                slot.holders.remove(owner);
                owner_done = true;
            }
        }
        let last = slot.refcount == 0;
        if owner_done {
            self.forget_owned(owner, block);
        }
        if last {
            self.used -= 1;
            self.retire(block, true);
        }
        Ok(())
    }

    /// Drops every reference `owner` holds (an agent deleted or reset), as repeated
    /// [`BlockPool::release`]. Returns the blocks it held.
    pub fn release_all(&mut self, owner: &O) -> Vec<BlockId> {
        let blocks = self.blocks_of(owner);
        for &block in &blocks {
            for _ in 0..self.refs_of(block, owner) {
                // Cannot fail: the owner holds the block.
                let _ = self.release(block, owner);
            }
        }
        blocks
    }

    /// Registers the content hash of a used block, making it shareable (`retain` by other
    /// owners), findable (`lookup`) and cacheable after its last release. Registering the same
    /// hash again is a no-op.
    ///
    /// Errors: `NotAllocated` (free block), `AlreadyHashed` (a different hash), `HashConflict`
    /// (another block has this hash: retain that one instead).
    pub fn register_hash(&mut self, block: BlockId, hash: BlockHash) -> Result<(), PoolError> {
        let slot = self.live_slot(block, |block| PoolError::NotAllocated { block })?;
        match slot.hash {
            Some(existing) if existing == hash => return Ok(()),
            Some(existing) => return Err(PoolError::AlreadyHashed { block, existing }),
            None => {}
        }
        if let Some(&existing) = self.by_hash.get(&hash) {
            return Err(PoolError::HashConflict { hash, existing });
        }
        if let Some(slot) = self.slots.get_mut(block.index()) {
            slot.hash = Some(hash);
            self.by_hash.insert(hash, block);
        }
        Ok(())
    }

    /// Marks `block` as just used (moves an idle block to the most recent end of the LRU).
    ///
    /// Errors: `NotAllocated` (free block).
    pub fn touch(&mut self, block: BlockId) -> Result<(), PoolError> {
        let phase = self
            .live_slot(block, |block| PoolError::NotAllocated { block })?
            .phase;
        let tick = self.tick();
        let Some(slot) = self.slots.get_mut(block.index()) else {
            // Unreachable: `live_slot` found it.
            return Err(PoolError::NotAllocated { block });
        };
        let old = slot.tick;
        slot.tick = tick;
        if phase == Phase::Idle {
            self.idle.remove(&(old, block));
            self.idle.insert((tick, block));
        }
        Ok(())
    }

    /// Pins or unpins `owner`: idle blocks that a pinned owner held are evicted last.
    pub fn set_pinned(&mut self, owner: &O, pinned: bool) {
        if pinned {
            self.pinned.insert(owner.clone());
        } else {
            self.pinned.remove(owner);
        }
    }

    /// Whether `owner` is pinned.
    #[must_use]
    pub fn is_pinned(&self, owner: &O) -> bool {
        self.pinned.contains(owner)
    }

    fn idle_is_pinned(&self, block: BlockId) -> bool {
        self.slots
            .get(block.index())
            .is_some_and(|s| s.recent_holders.iter().any(|o| self.pinned.contains(o)))
    }

    /// Up to `n` idle cached blocks in eviction order: least recently used first, blocks of
    /// unpinned owners before blocks of pinned owners. Changes nothing.
    #[must_use]
    pub fn eviction_candidates(&self, n: usize) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(n.min(self.idle.len()));
        for want_pinned in [false, true] {
            for &(_, block) in &self.idle {
                if out.len() >= n {
                    return out;
                }
                if self.idle_is_pinned(block) == want_pinned {
                    out.push(block);
                }
            }
        }
        out
    }

    /// Evicts up to `n` idle cached blocks in [`BlockPool::eviction_candidates`] order: they
    /// become free and their hashes are unregistered. Returns them with their hashes so the
    /// caller can persist or drop their content.
    pub fn evict(&mut self, n: usize) -> Vec<(BlockId, BlockHash)> {
        let victims = self.eviction_candidates(n);
        let mut out = Vec::with_capacity(victims.len());
        for block in victims {
            let Some(slot) = self.slots.get(block.index()) else {
                continue;
            };
            let (tick, hash) = (slot.tick, slot.hash);
            self.idle.remove(&(tick, block));
            self.retire(block, false);
            if let Some(hash) = hash {
                out.push((block, hash));
            }
        }
        out
    }
}
