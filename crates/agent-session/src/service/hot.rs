//! The hot tier: agents' KV kept in the engine between turns, accounted in blocks of a
//! [`BlockPool`]. A turn reserves its blocks all or nothing; idle sessions leave in LRU
//! order (pinned last) when a new turn needs room.

use crate::agent::AgentKey;
use crate::ports::SequenceId;
use crate::TokenId;
use block_pool::{BlockId, BlockPool};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// Who holds blocks: an agent, or an anonymous request (unique nonce per turn).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Owner {
    key: Option<AgentKey>,
    nonce: u64,
}

impl Owner {
    pub(crate) fn new(key: Option<AgentKey>) -> Self {
        Self {
            key,
            nonce: NEXT_OWNER.fetch_add(1, Ordering::Relaxed),
        }
    }
}

/// An agent's KV kept in RAM between turns.
#[derive(Debug)]
pub(crate) struct HotSession {
    pub(crate) seq: SequenceId,
    /// Tokens whose KV the sequence holds (whole chunks only).
    pub(crate) tokens: Vec<TokenId>,
    pub(crate) pinned: bool,
}

#[derive(Debug)]
struct Entry {
    session: Option<HotSession>,
    owner: Owner,
    last_used: u64,
}

#[derive(Debug)]
pub(crate) struct HotTier {
    pool: BlockPool<Owner>,
    sessions: HashMap<AgentKey, Entry>,
    /// Owners of running turns.
    active: HashSet<Owner>,
    tick: u64,
    evictions: u64,
}

impl HotTier {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            pool: BlockPool::new(u32::try_from(capacity).unwrap_or(u32::MAX)),
            sessions: HashMap::new(),
            active: HashSet::new(),
            tick: 0,
            evictions: 0,
        }
    }

    fn capacity(&self) -> usize {
        self.pool.total_blocks() as usize
    }

    /// Reserves `blocks` for a turn of `owner`, all or nothing. The agent's own session keeps
    /// its blocks and they count toward the reservation. Idle sessions of other agents are
    /// evicted (LRU, pinned last) to make room; their sequences are returned for release.
    pub(crate) fn reserve(
        &mut self,
        owner: &Owner,
        blocks: usize,
    ) -> Result<Vec<SequenceId>, String> {
        if blocks > self.capacity() {
            return Err(format!(
                "the turn needs {blocks} KV blocks; the hot tier holds {} in all",
                self.capacity()
            ));
        }
        // Blocks the agent's previous session holds move to this turn's owner.
        let mut held: Vec<BlockId> = Vec::new();
        if let Some(e) = owner.key.as_ref().and_then(|k| self.sessions.get_mut(k)) {
            held = self.pool.release_all(&e.owner);
            e.owner = owner.clone();
        }
        let own = held.len();
        let mut evicted = Vec::new();
        while self.pool.available_blocks() < blocks.saturating_sub(own) {
            let victim = self
                .sessions
                .iter()
                .filter(|(k, e)| Some(*k) != owner.key.as_ref() && e.session.is_some())
                .min_by_key(|(_, e)| (e.session.as_ref().is_some_and(|s| s.pinned), e.last_used))
                .map(|(k, _)| k.clone());
            let Some(k) = victim else {
                // Give the agent its blocks back before refusing.
                self.reacquire(owner, own);
                return Err(format!(
                    "all {} KV blocks are in use by running requests",
                    self.capacity()
                ));
            };
            if let Some(e) = self.sessions.remove(&k) {
                self.pool.release_all(&e.owner);
                self.evictions += 1;
                if let Some(s) = e.session {
                    evicted.push(s.seq);
                }
            }
        }
        self.reacquire(owner, blocks);
        self.active.insert(owner.clone());
        Ok(evicted)
    }

    fn reacquire(&mut self, owner: &Owner, blocks: usize) {
        // Cannot fail: availability was checked (or the blocks were just released).
        let _ = self.pool.allocate(blocks, owner);
    }

    /// Takes an agent's session out for a turn (its blocks stay reserved by the turn).
    pub(crate) fn take_session(&mut self, key: &AgentKey) -> Option<HotSession> {
        self.sessions.get_mut(key).and_then(|e| e.session.take())
    }

    /// Ends a turn: the session keeps `blocks` of the reservation, the rest go back.
    pub(crate) fn commit(
        &mut self,
        owner: &Owner,
        session: HotSession,
        blocks: usize,
    ) -> Vec<SequenceId> {
        self.tick += 1;
        self.active.remove(owner);
        let mine = self.pool.blocks_of(owner);
        for b in mine.iter().skip(blocks) {
            let _ = self.pool.free(*b, owner);
        }
        let mut evicted = Vec::new();
        match owner.key.clone() {
            Some(key) => {
                let entry = Entry {
                    session: Some(session),
                    owner: owner.clone(),
                    last_used: self.tick,
                };
                if let Some(old) = self.sessions.insert(key, entry) {
                    if old.owner != *owner {
                        self.pool.release_all(&old.owner);
                    }
                    if let Some(s) = old.session {
                        evicted.push(s.seq);
                    }
                }
            }
            None => {
                self.pool.release_all(owner);
                evicted.push(session.seq);
            }
        }
        evicted
    }

    /// Drops a turn's reservation (the turn failed, or an anonymous turn ended).
    pub(crate) fn release_owner(&mut self, owner: &Owner) {
        self.active.remove(owner);
        self.pool.release_all(owner);
        if let Some(k) = &owner.key {
            if self
                .sessions
                .get(k)
                .is_some_and(|e| e.owner == *owner && e.session.is_none())
            {
                self.sessions.remove(k);
            }
        }
    }

    pub(crate) fn set_pinned(&mut self, key: &AgentKey, pinned: bool) {
        if let Some(e) = self.sessions.get_mut(key) {
            if let Some(s) = e.session.as_mut() {
                s.pinned = pinned;
            }
            self.pool.set_pinned(&e.owner, pinned);
        }
    }

    /// (tokens held, pinned) of an agent's idle hot session, if it has one.
    pub(crate) fn session_summary(&self, key: &AgentKey) -> Option<(usize, bool)> {
        self.sessions
            .get(key)
            .and_then(|e| e.session.as_ref())
            .map(|s| (s.tokens.len(), s.pinned))
    }

    pub(crate) fn hot_keys(&self) -> HashSet<AgentKey> {
        self.sessions
            .iter()
            .filter(|(_, e)| e.session.is_some())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Blocks reserved by running turns (idle sessions excluded).
    pub(crate) fn active_blocks(&self) -> usize {
        self.active
            .iter()
            .map(|o| self.pool.blocks_of(o).len())
            .sum()
    }

    /// (blocks used, capacity, hot agents, evictions so far).
    pub(crate) fn usage(&self) -> (usize, usize, usize, u64) {
        let s = self.pool.stats();
        (
            s.used,
            s.total,
            self.sessions
                .values()
                .filter(|e| e.session.is_some())
                .count(),
            self.evictions,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{AgentId, Namespace};

    fn key(s: &str) -> AgentKey {
        AgentKey {
            namespace: Namespace::default(),
            agent: AgentId::new(s).expect("valid"),
        }
    }

    fn session(seq: u64) -> HotSession {
        HotSession {
            seq: SequenceId(seq),
            tokens: vec![],
            pinned: false,
        }
    }

    #[test]
    fn reserve_evicts_lru_pinned_last_and_counts_add_up() {
        let mut t = HotTier::new(10);
        for (i, name) in ["a", "b", "c"].iter().enumerate() {
            let o = Owner::new(Some(key(name)));
            assert!(t.reserve(&o, 4).map(|e| e.is_empty()).unwrap_or(false) || i == 2);
            t.commit(&o, session(i as u64), 3);
        }
        // a (oldest) was pinned: b goes first.
        t.set_pinned(&key("a"), true);
        let o = Owner::new(Some(key("d")));
        let ev = t.reserve(&o, 3).expect("room after eviction");
        assert_eq!(ev, vec![SequenceId(1)]);
        assert_eq!(t.usage().0, 9);
        // Too big for the whole tier: refused, nothing changes.
        let o2 = Owner::new(None);
        assert!(t.reserve(&o2, 11).is_err());
        // Running reservations are never evicted.
        let o3 = Owner::new(None);
        let ev = t.reserve(&o3, 4).expect("evicts idle sessions only");
        assert_eq!(ev, vec![SequenceId(2)], "c goes before pinned a");
        assert!(t.reserve(&Owner::new(None), 4).is_err());
        t.release_owner(&o3);
        assert_eq!(t.usage().0, 3);
    }

    #[test]
    fn own_session_counts_toward_the_reservation() {
        let mut t = HotTier::new(4);
        let o = Owner::new(Some(key("a")));
        t.reserve(&o, 4).expect("fits");
        t.commit(&o, session(1), 3);
        let o2 = Owner::new(Some(key("a")));
        assert!(t.reserve(&o2, 4).expect("own blocks count").is_empty());
        assert!(t.take_session(&key("a")).is_some());
        t.commit(&o2, session(1), 2);
        assert_eq!(t.usage().0, 2);
    }
}
