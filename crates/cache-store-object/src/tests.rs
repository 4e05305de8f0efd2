//! Unit tests of the tier logic against `object_store`'s in-memory backend, wrapped in a
//! store that can be switched down or slow.

use crate::tier::open_for_test;
use crate::{keys::Keys, ManifestEnvelope, ObjectTierConfig, ObjectTierStore};
use agent_session::{
    AgentId, AgentKey, AgentManifest, BlockMeta, CacheStore, KvBlock, KvEncoding, KvPayload,
    KvTensor, Namespace, TensorDtype,
};
use async_trait::async_trait;
use block_pool::BlockHash;
use bytes::Bytes;
use cache_store_disk::{DiskCacheStore, DiskStoreConfig};
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FP: &str = "test-model/fp";
const BLOCK: usize = 64;

/// An in-memory object store that can be taken down (every request fails) or made slow.
#[derive(Debug, Default)]
struct Flaky {
    inner: InMemory,
    down: AtomicBool,
    delay_ms: AtomicU64,
    requests: AtomicU64,
}

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Flaky")
    }
}

impl Flaky {
    async fn gate(&self) -> object_store::Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.down.load(Ordering::Relaxed) {
            return Err(object_store::Error::Generic {
                store: "flaky",
                source: "connection refused".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for Flaky {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.gate().await?;
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.gate().await?;
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.gate().await?;
        self.inner.get_opts(location, options).await
    }
    async fn delete(&self, location: &Path) -> object_store::Result<()> {
        self.gate().await?;
        self.inner.delete(location).await
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.gate().await?;
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.gate().await?;
        self.inner.copy(from, to).await
    }
    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
        self.gate().await?;
        self.inner.copy_if_not_exists(from, to).await
    }
}

fn bytes(seed: u64, n: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// `n` chained blocks of `tokens` (a few layers of f32 K/V each).
fn chain(n: usize, namespace: &str, seed: u32) -> Vec<Arc<KvBlock>> {
    let mut out = Vec::new();
    let mut parent: Option<BlockHash> = None;
    for i in 0..n {
        let token_ids: Vec<u32> = (0..BLOCK as u32)
            .map(|t| seed * 10_000 + i as u32 * 100 + t)
            .collect();
        let hash = BlockHash::chain(parent.as_ref(), &token_ids, FP, namespace);
        let tensors = (0..2)
            .flat_map(|l| ["k", "v"].map(move |kv| (l, kv)))
            .map(|(l, kv)| KvTensor {
                name: format!("l{l}.{kv}"),
                dtype: TensorDtype::F32,
                shape: vec![2, BLOCK, 16],
                data: bytes(
                    u64::from(seed) * 1000 + i as u64 * 10 + l,
                    2 * BLOCK * 16 * 4,
                ),
            })
            .collect();
        out.push(Arc::new(KvBlock {
            meta: BlockMeta {
                hash,
                parent,
                token_ids,
                model_fingerprint: FP.into(),
            },
            payload: KvPayload {
                encoding: KvEncoding::Float {
                    dtype: TensorDtype::F32,
                },
                tensors,
            },
        }));
        parent = Some(hash);
    }
    out
}

fn key(agent: &str) -> AgentKey {
    AgentKey {
        namespace: Namespace::default(),
        agent: AgentId::new(agent).expect("valid id"),
    }
}

fn manifest(key: &AgentKey, blocks: &[Arc<KvBlock>], now: u64) -> AgentManifest {
    AgentManifest {
        version: AgentManifest::VERSION,
        agent: key.agent.clone(),
        namespace: key.namespace.clone(),
        model_fingerprint: FP.into(),
        block_tokens: BLOCK as u32,
        token_ids: blocks
            .iter()
            .flat_map(|b| b.meta.token_ids.clone())
            .collect(),
        block_hashes: blocks.iter().map(|b| b.meta.hash.to_string()).collect(),
        created_at_ms: 1,
        last_used_at_ms: now,
        pinned: false,
        ttl_secs: None,
    }
}

fn hashes(blocks: &[Arc<KvBlock>]) -> Vec<BlockHash> {
    blocks.iter().map(|b| b.meta.hash).collect()
}

fn fast() -> ObjectTierConfig {
    ObjectTierConfig {
        read_timeout: Duration::from_millis(300),
        upload_timeout: Duration::from_secs(5),
        probe_interval: Duration::from_millis(50),
        flush_timeout: Duration::from_secs(10),
        ..ObjectTierConfig::default()
    }
}

struct Replica {
    _dir: tempfile::TempDir,
    store: ObjectTierStore,
}

fn replica(remote: &Arc<Flaky>) -> Replica {
    let dir = tempfile::tempdir().expect("tempdir");
    let local = DiskCacheStore::open(DiskStoreConfig::new(dir.path())).expect("open disk store");
    let store = open_for_test(local, Arc::clone(remote) as Arc<dyn ObjectStore>, fast());
    Replica { _dir: dir, store }
}

async fn remote_bytes(remote: &Flaky, path: &Path) -> Option<Bytes> {
    match remote.inner.get(path).await {
        Ok(r) => Some(r.bytes().await.expect("object bytes")),
        Err(_) => None,
    }
}

async fn envelope(remote: &Flaky, key: &AgentKey) -> ManifestEnvelope {
    let bytes = remote_bytes(remote, &Keys::new("").manifest(key))
        .await
        .expect("a remote manifest");
    serde_json::from_slice(&bytes).expect("an envelope")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_uploaded_in_the_background_as_the_local_file_bytes() {
    let remote = Arc::new(Flaky::default());
    let a = replica(&remote);
    let blocks = chain(3, "", 1);
    assert_eq!(a.store.save_blocks(blocks.clone()).await.expect("save"), 3);
    let k = key("agent-a");
    a.store
        .save_manifest(&manifest(&k, &blocks, 10))
        .await
        .expect("manifest");
    a.store.flush().await.expect("flush");
    for b in &blocks {
        let local = a
            .store
            .local()
            .block_file_bytes_blocking(&b.meta.hash)
            .expect("read")
            .expect("local file");
        let uploaded = remote_bytes(&remote, &Keys::new("").block(&b.meta.hash))
            .await
            .expect("uploaded");
        assert!(
            uploaded.as_ref() == local.as_slice(),
            "the object is the local file, byte for byte"
        );
    }
    let env = envelope(&remote, &k).await;
    assert_eq!(env.generation, 1);
    assert_eq!(env.manifest.block_hashes.len(), 3);
    let stats = a
        .store
        .stats()
        .await
        .expect("stats")
        .remote
        .expect("remote stats");
    assert!(stats.up);
    assert_eq!(
        (
            stats.blocks_uploaded,
            stats.manifests_uploaded,
            stats.upload_queue
        ),
        (3, 1, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replica_reads_through_to_the_object_store_and_keeps_the_same_bytes() {
    let remote = Arc::new(Flaky::default());
    let a = replica(&remote);
    let blocks = chain(4, "", 2);
    a.store.save_blocks(blocks.clone()).await.expect("save");
    let k = key("agent-a");
    a.store
        .save_manifest(&manifest(&k, &blocks, 10))
        .await
        .expect("manifest");
    a.store.flush().await.expect("flush");

    let b = replica(&remote);
    let want = hashes(&blocks);
    assert_eq!(b.store.stored_prefix(&want).await.expect("prefix"), 4);
    let loaded = b.store.load_blocks(FP, &want).await.expect("load");
    assert_eq!(loaded.len(), 4);
    for (got, sent) in loaded.iter().zip(&blocks) {
        assert_eq!(
            got.as_ref(),
            sent.as_ref(),
            "restored block equals the written one"
        );
    }
    // Kept on B's disk as the same file bytes: the next read is local.
    b.store.local().flush_blocking().expect("flush");
    for h in &want {
        let on_b = b
            .store
            .local()
            .block_file_bytes_blocking(h)
            .expect("read")
            .expect("adopted");
        let on_a = a
            .store
            .local()
            .block_file_bytes_blocking(h)
            .expect("read")
            .expect("written");
        assert!(on_a == on_b, "the same file bytes on both replicas");
    }
    assert_eq!(b.store.local().stored_prefix_blocking(&want), 4);
    let stats = b
        .store
        .stats()
        .await
        .expect("stats")
        .remote
        .expect("remote");
    assert_eq!(stats.blocks_downloaded, 4);
    // Only the missing tail is downloaded; a different namespace's chain is not there.
    assert_eq!(
        b.store
            .stored_prefix(&hashes(&chain(2, "tenant", 2)))
            .await
            .expect("prefix"),
        0
    );
    // The manifest is read from the bucket and kept locally.
    let m = b
        .store
        .load_manifest(&k)
        .await
        .expect("load")
        .expect("a manifest");
    assert_eq!(m.block_hashes.len(), 4);
    assert!(b
        .store
        .local()
        .load_manifest_blocking(&k)
        .expect("local")
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_never_overwrites_a_newer_turn() {
    let remote = Arc::new(Flaky::default());
    let (a, b) = (replica(&remote), replica(&remote));
    let k = key("agent-a");
    let blocks = chain(2, "", 3);
    // Turn 1 on A.
    assert_eq!(a.store.load_manifest(&k).await.expect("load"), None);
    a.store
        .save_manifest(&manifest(&k, &blocks[..1], 1))
        .await
        .expect("save");
    a.store.flush().await.expect("flush");
    // Turns 2 and 3 on B (A was unreachable for the client).
    for now in [2, 3] {
        assert!(b.store.load_manifest(&k).await.expect("load").is_some());
        b.store
            .save_manifest(&manifest(&k, &blocks, now))
            .await
            .expect("save");
        b.store.flush().await.expect("flush");
    }
    assert_eq!(envelope(&remote, &k).await.generation, 3);
    // A, still believing generation 1 is the latest, writes "generation 2": refused.
    a.store
        .save_manifest(&manifest(&k, &blocks[..1], 99))
        .await
        .expect("save");
    a.store.flush().await.expect("flush");
    let env = envelope(&remote, &k).await;
    assert_eq!((env.generation, env.manifest.last_used_at_ms), (3, 3));
    let stats = a
        .store
        .stats()
        .await
        .expect("stats")
        .remote
        .expect("remote");
    assert_eq!(stats.stale_manifests, 1);
    // A now knows generation 3: its next turn is generation 4 and is uploaded.
    a.store
        .save_manifest(&manifest(&k, &blocks, 100))
        .await
        .expect("save");
    a.store.flush().await.expect("flush");
    assert_eq!(envelope(&remote, &k).await.generation, 4);
    // And reading prefers the newer remote manifest over a stale local one.
    assert_eq!(
        b.store
            .load_manifest(&k)
            .await
            .expect("load")
            .map(|m| m.last_used_at_ms),
        Some(100)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_serves_locally_warns_once_and_catches_up_when_it_returns() {
    let remote = Arc::new(Flaky::default());
    let a = replica(&remote);
    remote.down.store(true, Ordering::Relaxed);
    let k = key("agent-a");
    let mut all = Vec::new();
    for turn in 0..3u32 {
        let blocks = chain(2, "", 10 + turn);
        a.store
            .save_blocks(blocks.clone())
            .await
            .expect("saving works while down");
        a.store
            .save_manifest(&manifest(&k, &blocks, u64::from(turn)))
            .await
            .expect("manifest works while down");
        assert!(a.store.load_manifest(&k).await.expect("load").is_some());
        let loaded = a
            .store
            .load_blocks(FP, &hashes(&blocks))
            .await
            .expect("load");
        assert_eq!(loaded.len(), 2, "local reads go on");
        all.extend(blocks);
    }
    let start = Instant::now();
    a.store
        .flush()
        .await
        .expect("flush returns while the store is down");
    assert!(start.elapsed() < Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stats = a
        .store
        .stats()
        .await
        .expect("stats")
        .remote
        .expect("remote");
    assert!(!stats.up);
    assert_eq!(stats.outages, 1, "one outage, however many failed requests");
    assert!(stats.errors >= 2);
    assert_eq!(
        stats.upload_queue, 7,
        "6 blocks and the latest manifest wait"
    );
    // A read of a block only the bucket could have does not wait for the dead store.
    let start = Instant::now();
    assert_eq!(
        a.store
            .stored_prefix(&hashes(&chain(1, "", 77)))
            .await
            .expect("prefix"),
        0
    );
    assert!(start.elapsed() < Duration::from_millis(100));

    remote.down.store(false, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while a
        .store
        .stats()
        .await
        .expect("stats")
        .remote
        .is_some_and(|r| !r.up || r.upload_queue > 0)
    {
        assert!(Instant::now() < deadline, "caught up in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for b in &all {
        assert!(remote_bytes(&remote, &Keys::new("").block(&b.meta.hash))
            .await
            .is_some());
    }
    let env = envelope(&remote, &k).await;
    assert_eq!(
        (env.generation, env.manifest.last_used_at_ms),
        (3, 2),
        "only the latest turn"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_costs_a_turn_at_most_the_read_timeout() {
    let remote = Arc::new(Flaky::default());
    let a = replica(&remote);
    let k = key("agent-a");
    let blocks = chain(1, "", 4);
    a.store.save_blocks(blocks.clone()).await.expect("save");
    a.store
        .save_manifest(&manifest(&k, &blocks, 1))
        .await
        .expect("save");
    a.store.flush().await.expect("flush");
    remote.delay_ms.store(2_000, Ordering::Relaxed);
    let start = Instant::now();
    let m = a.store.load_manifest(&k).await.expect("load");
    assert!(m.is_some(), "the local manifest");
    let took = start.elapsed();
    assert!(took < Duration::from_millis(1_500), "{took:?}");
    assert!(
        !a.store
            .stats()
            .await
            .expect("stats")
            .remote
            .expect("remote")
            .up
    );
    // Later reads skip the store altogether until it answers again.
    let start = Instant::now();
    assert!(a.store.load_manifest(&k).await.expect("load").is_some());
    assert!(start.elapsed() < Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_partial_object_is_never_read_as_a_block() {
    let remote = Arc::new(Flaky::default());
    let a = replica(&remote);
    let blocks = chain(3, "", 5);
    a.store.save_blocks(blocks.clone()).await.expect("save");
    a.store.flush().await.expect("flush");
    let keys = Keys::new("");
    // Block 1: a partial upload (the first half of the file); block 2 stays good.
    let full = remote_bytes(&remote, &keys.block(&blocks[1].meta.hash))
        .await
        .expect("uploaded");
    remote
        .inner
        .put(
            &keys.block(&blocks[1].meta.hash),
            full.slice(..full.len() / 2).into(),
        )
        .await
        .expect("overwrite");

    let b = replica(&remote);
    let loaded = b
        .store
        .load_blocks(FP, &hashes(&blocks))
        .await
        .expect("load");
    assert_eq!(
        loaded.len(),
        1,
        "the verified prefix ends before the partial block"
    );
    assert_eq!(loaded[0].as_ref(), blocks[0].as_ref());
    let stats = b.store.stats().await.expect("stats");
    assert_eq!(stats.quarantined, 1, "quarantined like a local bad file");
    assert_eq!(stats.remote.as_ref().map(|r| r.quarantined), Some(1));
    assert!(
        remote_bytes(&remote, &keys.block(&blocks[1].meta.hash))
            .await
            .is_none(),
        "deleted remotely"
    );
    let quarantine = b._dir.path().join(cache_store_disk::QUARANTINE_DIR);
    assert_eq!(
        std::fs::read_dir(quarantine)
            .expect("quarantine dir")
            .count(),
        1
    );
    // A foreign model's block is a miss, not quarantined.
    let again = b
        .store
        .load_blocks("another-model", &hashes(&blocks[..1]))
        .await
        .expect("load");
    assert!(again.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_a_stopped_replica_did_not_upload_are_sent_by_its_next_run() {
    let remote = Arc::new(Flaky::default());
    let dir = tempfile::tempdir().expect("tempdir");
    let open = || {
        let local = DiskCacheStore::open(DiskStoreConfig::new(dir.path())).expect("open");
        ObjectTierStore::open(local, Arc::clone(&remote) as Arc<dyn ObjectStore>, fast())
            .expect("tier")
    };
    let k = key("agent-a");
    let blocks = chain(2, "", 6);
    remote.down.store(true, Ordering::Relaxed);
    {
        let a = open();
        a.store_turn(&k, &blocks).await;
        // Stopped before the store came back.
    }
    remote.down.store(false, Ordering::Relaxed);
    let a = open();
    a.flush().await.expect("flush");
    assert_eq!(envelope(&remote, &k).await.generation, 1);
    for b in &blocks {
        assert!(remote_bytes(&remote, &Keys::new("").block(&b.meta.hash))
            .await
            .is_some());
    }
}

impl ObjectTierStore {
    async fn store_turn(&self, k: &AgentKey, blocks: &[Arc<KvBlock>]) {
        self.save_blocks(blocks.to_vec()).await.expect("save");
        self.save_manifest(&manifest(k, blocks, 1))
            .await
            .expect("manifest");
        self.local().flush_blocking().expect("local flush");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_agent_deletes_its_remote_manifest() {
    let remote = Arc::new(Flaky::default());
    let a = replica(&remote);
    let k = key("agent-a");
    a.store
        .save_manifest(&manifest(&k, &[], 1))
        .await
        .expect("save");
    a.store.flush().await.expect("flush");
    assert!(a.store.delete_manifest(&k).await.expect("delete"));
    assert!(remote_bytes(&remote, &Keys::new("").manifest(&k))
        .await
        .is_none());
    let b = replica(&remote);
    assert_eq!(b.store.load_manifest(&k).await.expect("load"), None);
}
