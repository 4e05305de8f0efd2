use agent_session::{
    AgentKey, AgentManifest, CacheStore, KvBlock, Namespace, StoreError, StoreStats,
};
use async_trait::async_trait;
use block_pool::BlockHash;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
struct Inner {
    blocks: HashMap<BlockHash, Arc<KvBlock>>,
    manifests: BTreeMap<AgentKey, AgentManifest>,
    stats: StoreStats,
    writes: u64,
}

/// A cache store in memory. It keeps blocks as the disk store would (by content hash, each
/// stored once), verifies the model fingerprint on load, and can be shared between two
/// services to simulate a restart.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of distinct blocks stored.
    pub fn block_count(&self) -> usize {
        self.lock().blocks.len()
    }

    /// Number of block writes performed (a block already stored is not written again).
    pub fn block_writes(&self) -> u64 {
        self.lock().writes
    }

    /// Replaces a stored block's bytes with garbage (to test that corruption is a miss).
    pub fn corrupt_block(&self, hash: &BlockHash) -> bool {
        let mut g = self.lock();
        match g.blocks.get(hash).cloned() {
            Some(b) => {
                let mut b = (*b).clone();
                for t in &mut b.payload.tensors {
                    t.data.truncate(t.data.len() / 2);
                }
                g.blocks.insert(*hash, Arc::new(b));
                true
            }
            None => false,
        }
    }

    /// The stored blocks' hashes.
    pub fn block_hashes(&self) -> Vec<BlockHash> {
        self.lock().blocks.keys().copied().collect()
    }
}

#[async_trait]
impl CacheStore for MemoryStore {
    async fn save_blocks(&self, blocks: Vec<Arc<KvBlock>>) -> Result<usize, StoreError> {
        let mut g = self.lock();
        let mut new = 0;
        for b in blocks {
            if !g.blocks.contains_key(&b.meta.hash) {
                g.stats.bytes += b.payload.byte_len() as u64;
                g.blocks.insert(b.meta.hash, b);
                g.writes += 1;
                new += 1;
            }
        }
        g.stats.blocks_written += new as u64;
        Ok(new)
    }

    async fn stored_prefix(&self, hashes: &[BlockHash]) -> Result<usize, StoreError> {
        let g = self.lock();
        Ok(hashes
            .iter()
            .take_while(|h| g.blocks.contains_key(h))
            .count())
    }

    async fn load_blocks(
        &self,
        model_fingerprint: &str,
        hashes: &[BlockHash],
    ) -> Result<Vec<Arc<KvBlock>>, StoreError> {
        let mut g = self.lock();
        let mut out = Vec::new();
        for h in hashes {
            let Some(b) = g.blocks.get(h).cloned() else {
                break;
            };
            let intact = b.meta.hash == *h
                && b.meta.model_fingerprint == model_fingerprint
                && b.payload.tensors.iter().all(|t| t.is_consistent());
            if !intact {
                // Quarantine: drop it, count it, and miss from here on.
                g.blocks.remove(h);
                g.stats.quarantined += 1;
                break;
            }
            g.stats.blocks_read += 1;
            g.stats.bytes_read += b.payload.byte_len() as u64;
            out.push(b);
        }
        Ok(out)
    }

    async fn save_manifest(&self, manifest: &AgentManifest) -> Result<(), StoreError> {
        let key = AgentKey {
            namespace: manifest.namespace.clone(),
            agent: manifest.agent.clone(),
        };
        self.lock().manifests.insert(key, manifest.clone());
        Ok(())
    }

    async fn load_manifest(&self, key: &AgentKey) -> Result<Option<AgentManifest>, StoreError> {
        Ok(self.lock().manifests.get(key).cloned())
    }

    async fn delete_manifest(&self, key: &AgentKey) -> Result<bool, StoreError> {
        Ok(self.lock().manifests.remove(key).is_some())
    }

    async fn list_manifests(
        &self,
        namespace: Option<&Namespace>,
    ) -> Result<Vec<AgentManifest>, StoreError> {
        Ok(self
            .lock()
            .manifests
            .values()
            .filter(|m| namespace.is_none_or(|ns| &m.namespace == ns))
            .cloned()
            .collect())
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let g = self.lock();
        let mut s = g.stats.clone();
        s.blocks = g.blocks.len() as u64;
        s.agents = g.manifests.len() as u64;
        Ok(s)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}
