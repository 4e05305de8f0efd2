//! The [`CacheStore`] port implemented by [`ObjectTierStore`].

use crate::tier::ObjectTierStore;
use agent_session::{
    AgentKey, AgentManifest, CacheStore, KvBlock, Namespace, StoreError, StoreStats,
};
use async_trait::async_trait;
use block_pool::BlockHash;
use std::sync::Arc;

#[async_trait]
impl CacheStore for ObjectTierStore {
    async fn save_blocks(&self, blocks: Vec<Arc<KvBlock>>) -> Result<usize, StoreError> {
        let hashes: Vec<BlockHash> = blocks.iter().map(|b| b.meta.hash).collect();
        let new = self.shared.local.save_blocks_blocking(blocks)?;
        self.shared.enqueue_blocks(hashes);
        Ok(new)
    }

    async fn stored_prefix(&self, hashes: &[BlockHash]) -> Result<usize, StoreError> {
        let local = self.shared.local.stored_prefix_blocking(hashes);
        if local >= hashes.len() || !self.shared.is_up() {
            return Ok(local);
        }
        let rest = hashes.get(local..).unwrap_or_default().to_vec();
        let shared = Arc::clone(&self.shared);
        let remote = self
            .on_runtime(async move { shared.remote_prefix(&rest).await })
            .await
            .unwrap_or(0);
        Ok(local + remote)
    }

    async fn load_blocks(
        &self,
        model_fingerprint: &str,
        hashes: &[BlockHash],
    ) -> Result<Vec<Arc<KvBlock>>, StoreError> {
        Ok(self.load_blocks_tiered(model_fingerprint, hashes).await)
    }

    async fn save_manifest(&self, manifest: &AgentManifest) -> Result<(), StoreError> {
        self.shared.local.save_manifest_blocking(manifest)?;
        self.shared.enqueue_manifest(manifest);
        Ok(())
    }

    async fn load_manifest(&self, key: &AgentKey) -> Result<Option<AgentManifest>, StoreError> {
        let local = self.shared.local.load_manifest_blocking(key)?;
        if !self.shared.is_up() {
            return Ok(local);
        }
        let (shared, key) = (Arc::clone(&self.shared), key.clone());
        let fallback = local.clone();
        Ok(self
            .on_runtime(async move { shared.load_manifest(&key, local).await })
            .await
            .unwrap_or(fallback))
    }

    async fn delete_manifest(&self, key: &AgentKey) -> Result<bool, StoreError> {
        let local = self.shared.local.delete_manifest_blocking(key)?;
        let (shared, key) = (Arc::clone(&self.shared), key.clone());
        let remote = self
            .on_runtime(async move { shared.delete_remote(&key).await })
            .await
            .unwrap_or(false);
        Ok(local || remote)
    }

    async fn list_manifests(
        &self,
        namespace: Option<&Namespace>,
    ) -> Result<Vec<AgentManifest>, StoreError> {
        Ok(self.shared.local.list_manifests_blocking(namespace)?)
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut stats = self.shared.local.stats_blocking();
        stats.remote = Some(self.shared.stats());
        Ok(stats)
    }

    async fn flush(&self) -> Result<(), StoreError> {
        Ok(self.flush_all().await?)
    }
}
