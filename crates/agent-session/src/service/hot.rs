//! The hot tier: agents' KV kept in the engine between turns, accounted in blocks of a
//! [`block_pool::BlockPool`]-style budget; idle sessions leave in LRU order (pinned last)
//! when a new turn needs room.

use crate::agent::AgentKey;
use crate::ports::SequenceId;
use crate::TokenId;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};

static NEXT_OWNER: AtomicU64 = AtomicU64::new(1);

/// Who holds a reservation: an agent, or an anonymous request (unique nonce).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
    session: HotSession,
    blocks: usize,
    last_used: u64,
}

#[derive(Debug)]
pub(crate) struct HotTier {
    capacity: usize,
    sessions: HashMap<AgentKey, Entry>,
    reservations: HashMap<Owner, usize>,
    tick: u64,
    evictions: u64,
}

impl HotTier {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            sessions: HashMap::new(),
            reservations: HashMap::new(),
            tick: 0,
            evictions: 0,
        }
    }

    fn used(&self) -> usize {
        self.sessions.values().map(|e| e.blocks).sum::<usize>()
            + self.reservations.values().sum::<usize>()
    }

    /// Reserves `blocks` for a turn of `owner`, all or nothing. The owner's own hot session
    /// counts toward it. Idle sessions are evicted (LRU, pinned last) to make room; their
    /// sequences are returned for release. Fails when even that is not enough.
    pub(crate) fn reserve(
        &mut self,
        owner: &Owner,
        blocks: usize,
    ) -> Result<Vec<SequenceId>, String> {
        if blocks > self.capacity {
            return Err(format!(
                "the turn needs {blocks} KV blocks; the hot tier holds {} in all",
                self.capacity
            ));
        }
        let own = owner
            .key
            .as_ref()
            .and_then(|k| self.sessions.get(k))
            .map_or(0, |e| e.blocks);
        let mut evicted = Vec::new();
        loop {
            let free = self.capacity.saturating_sub(self.used());
            if free + own >= blocks {
                break;
            }
            let victim = self
                .sessions
                .iter()
                .filter(|(k, _)| Some(*k) != owner.key.as_ref())
                .min_by_key(|(_, e)| (e.session.pinned, e.last_used))
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => {
                    if let Some(e) = self.sessions.remove(&k) {
                        self.evictions += 1;
                        evicted.push(e.session.seq);
                    }
                }
                None => {
                    // Nothing idle left: undo nothing (evictions stand; their KV is on disk).
                    return Err(format!(
                        "all {} KV blocks are in use by running requests",
                        self.capacity
                    ));
                }
            }
        }
        // The owner's session blocks move into the reservation.
        if let Some(e) = owner.key.as_ref().and_then(|k| self.sessions.get_mut(k)) {
            e.blocks = 0;
        }
        self.reservations.insert(owner.clone(), blocks);
        Ok(evicted)
    }

    /// Takes an agent's session out for a turn.
    pub(crate) fn take_session(&mut self, key: &AgentKey) -> Option<HotSession> {
        self.sessions.remove(key).map(|e| e.session)
    }

    /// Records the sequence a reservation is using (bookkeeping only).
    pub(crate) fn set_active_sequence(&mut self, _owner: &Owner, _seq: SequenceId) {}

    /// Ends a turn: the reservation is replaced by the session's `blocks`.
    pub(crate) fn commit(
        &mut self,
        owner: &Owner,
        session: HotSession,
        blocks: usize,
    ) -> Vec<SequenceId> {
        self.reservations.remove(owner);
        self.tick += 1;
        let mut evicted = Vec::new();
        if let Some(key) = owner.key.clone() {
            if let Some(old) = self.sessions.insert(
                key,
                Entry {
                    session,
                    blocks,
                    last_used: self.tick,
                },
            ) {
                evicted.push(old.session.seq);
            }
        } else {
            evicted.push(session.seq);
        }
        evicted
    }

    /// Drops a reservation (turn failed or anonymous turn ended).
    pub(crate) fn release_owner(&mut self, owner: &Owner) {
        self.reservations.remove(owner);
    }

    pub(crate) fn set_pinned(&mut self, key: &AgentKey, pinned: bool) {
        if let Some(e) = self.sessions.get_mut(key) {
            e.session.pinned = pinned;
        }
    }

    pub(crate) fn hot_keys(&self) -> HashSet<AgentKey> {
        self.sessions.keys().cloned().collect()
    }

    /// (blocks used, capacity, hot agents, evictions so far).
    pub(crate) fn usage(&self) -> (usize, usize, usize, u64) {
        (self.used(), self.capacity, self.sessions.len(), self.evictions)
    }
}
