//! The [`CacheStore`] port implemented by [`DiskCacheStore`].
//!
//! Each method runs the matching `*_blocking` method on the calling thread (blocking file
//! I/O, no runtime needed) and maps [`DiskStoreError`](crate::DiskStoreError) to
//! [`StoreError`], except two that truly await: `load_blocks` (the blocks are read on a
//! thread of their own, so that a restore can import one group of blocks while the next
//! is read) and `flush` (the writer's acknowledgement).

use crate::store::DiskCacheStore;
use agent_session::{
    AgentKey, AgentManifest, CacheStore, KvBlock, Namespace, StoreError, StoreStats,
};
use async_trait::async_trait;
use block_pool::BlockHash;
use std::sync::Arc;

#[async_trait]
impl CacheStore for DiskCacheStore {
    async fn save_blocks(&self, blocks: Vec<Arc<KvBlock>>) -> Result<usize, StoreError> {
        Ok(self.save_blocks_blocking(blocks)?)
    }

    async fn stored_prefix(&self, hashes: &[BlockHash]) -> Result<usize, StoreError> {
        Ok(self.stored_prefix_blocking(hashes))
    }

    async fn load_blocks(
        &self,
        model_fingerprint: &str,
        hashes: &[BlockHash],
    ) -> Result<Vec<Arc<KvBlock>>, StoreError> {
        // A load thread that could not run is a miss, like any other failed read.
        Ok(self
            .load_blocks_background(model_fingerprint, hashes)
            .await
            .unwrap_or_default())
    }

    async fn save_manifest(&self, manifest: &AgentManifest) -> Result<(), StoreError> {
        Ok(self.save_manifest_blocking(manifest)?)
    }

    async fn load_manifest(&self, key: &AgentKey) -> Result<Option<AgentManifest>, StoreError> {
        Ok(self.load_manifest_blocking(key)?)
    }

    async fn delete_manifest(&self, key: &AgentKey) -> Result<bool, StoreError> {
        Ok(self.delete_manifest_blocking(key)?)
    }

    async fn list_manifests(
        &self,
        namespace: Option<&Namespace>,
    ) -> Result<Vec<AgentManifest>, StoreError> {
        Ok(self.list_manifests_blocking(namespace)?)
    }

    async fn stats(&self) -> Result<StoreStats, StoreError> {
        Ok(self.stats_blocking())
    }

    async fn flush(&self) -> Result<(), StoreError> {
        let ack = self.flush_request()?;
        ack.await
            .map_err(|_| StoreError::from(crate::DiskStoreError::WriterStopped))
    }
}
