//! The tier: the local disk store in front, the object store behind it, and the uploader.

use crate::config::ObjectTierConfig;
use crate::error::ObjectTierError;
use crate::generations::Generations;
use crate::keys::Keys;
use agent_session::{AgentKey, AgentManifest, CacheStore, KvBlock, RemoteTierStats};
use block_pool::BlockHash;
use bytes::Bytes;
use cache_store_disk::{decode_block, DiskCacheStore, DiskStoreError};
use futures::channel::oneshot;
use object_store::path::Path;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// Value of an envelope's `format` field.
pub const MANIFEST_FORMAT: &str = "semantic-agent-manifest";

/// What the bucket holds for an agent: its manifest and the manifest's generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestEnvelope {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// Turns of the agent across every replica (see [`crate::generations`]).
    pub generation: u64,
    /// The manifest, exactly as the local store keeps it.
    pub manifest: AgentManifest,
}

/// Why a remote request did not give an answer.
#[derive(Debug)]
pub(crate) enum RemoteError {
    /// No answer within the tier's timeout.
    Timeout(Duration),
    /// The store answered with an error or could not be reached.
    Store(object_store::Error),
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoteError::Timeout(d) => write!(f, "no answer within {} ms", d.as_millis()),
            RemoteError::Store(e) => {
                write!(f, "{e}")?;
                // The client's errors wrap the transport's: say the whole chain once.
                let mut source = std::error::Error::source(e);
                while let Some(cause) = source {
                    write!(f, ": {cause}")?;
                    source = cause.source();
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    outages: AtomicU64,
    errors: AtomicU64,
    blocks_uploaded: AtomicU64,
    bytes_uploaded: AtomicU64,
    blocks_downloaded: AtomicU64,
    bytes_downloaded: AtomicU64,
    manifests_uploaded: AtomicU64,
    stale_manifests: AtomicU64,
    quarantined: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A manifest waiting for the uploader (only the latest per agent is kept).
#[derive(Debug, Clone)]
struct PendingManifest {
    generation: u64,
    manifest: AgentManifest,
}

#[derive(Debug, Default)]
struct Queue {
    blocks: VecDeque<BlockHash>,
    queued: HashSet<BlockHash>,
    manifests: BTreeMap<String, PendingManifest>,
    /// An upload taken from the queue and not finished.
    busy: bool,
}

impl Queue {
    fn len(&self) -> usize {
        self.blocks.len() + self.manifests.len() + usize::from(self.busy)
    }
}

enum Upload {
    Block(BlockHash),
    Manifest(String, PendingManifest),
}

/// State shared by the store handle, the requests on the tier's runtime and the uploader.
pub(crate) struct Shared {
    pub(crate) local: Arc<DiskCacheStore>,
    remote: Arc<dyn ObjectStore>,
    keys: Keys,
    cfg: ObjectTierConfig,
    up: AtomicBool,
    gens: Mutex<Generations>,
    queue: Mutex<Queue>,
    wake: tokio::sync::Notify,
    stop: AtomicBool,
    counters: Counters,
    last_error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update under these locks is a single insert or remove: keep going after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// True while the store answers (reads skip it otherwise).
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn succeeded(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            info!(
                queued = lock(&self.queue).len(),
                "object store reachable again: uploading what waited"
            );
        }
    }

    /// Counts a failure; the first of an outage is logged as a warning, the others at debug.
    fn failed(&self, what: &str, e: &RemoteError) {
        bump(&self.counters.errors, 1);
        *lock(&self.last_error) = Some(format!("{what}: {e}"));
        if self.up.swap(false, Ordering::Relaxed) {
            bump(&self.counters.outages, 1);
            warn!(
                error = %e,
                request = what,
                "object store unreachable: serving from RAM and the local disk; uploads wait until it is back"
            );
        } else {
            debug!(error = %e, request = what, "object store still unreachable");
        }
    }

    async fn timed<T>(
        &self,
        limit: Duration,
        fut: impl Future<Output = object_store::Result<T>>,
    ) -> Result<T, RemoteError> {
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r.map_err(RemoteError::Store),
            Err(_) => Err(RemoteError::Timeout(limit)),
        }
    }

    /// GET; `None` when there is no such object.
    async fn get(&self, path: &Path, limit: Duration) -> Result<Option<Bytes>, RemoteError> {
        let got = self
            .timed(limit, async {
                match self.remote.get(path).await {
                    Ok(r) => r.bytes().await.map(Some),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .await;
        if got.is_ok() {
            self.succeeded();
        }
        got
    }

    /// HEAD: whether the object exists.
    async fn exists(&self, path: &Path) -> Result<bool, RemoteError> {
        let found = self
            .timed(self.cfg.read_timeout, async {
                match self.remote.head(path).await {
                    Ok(_) => Ok(true),
                    Err(object_store::Error::NotFound { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            })
            .await;
        if found.is_ok() {
            self.succeeded();
        }
        found
    }

    async fn put(&self, path: &Path, bytes: Bytes) -> Result<(), RemoteError> {
        // One PUT: the object appears whole or not at all, so a writer that dies mid-upload
        // leaves nothing behind (and every reader verifies what it downloads anyway).
        let put = self
            .timed(self.cfg.upload_timeout, self.remote.put(path, bytes.into()))
            .await
            .map(|_| ());
        if put.is_ok() {
            self.succeeded();
        }
        put
    }

    async fn delete(&self, path: &Path) -> Result<(), RemoteError> {
        self.timed(self.cfg.read_timeout, async {
            match self.remote.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// How many of `hashes`, from the first, the object store has (HEADs, a few at once).
    pub(crate) async fn remote_prefix(&self, hashes: &[BlockHash]) -> usize {
        let mut found = 0;
        for chunk in hashes.chunks(self.cfg.concurrency.max(1)) {
            let answers = futures::future::join_all(
                chunk
                    .iter()
                    .map(|h| async move { self.exists(&self.keys.block(h)).await }),
            )
            .await;
            for answer in answers {
                match answer {
                    Ok(true) => found += 1,
                    Ok(false) => return found,
                    Err(e) => {
                        self.failed("HEAD block", &e);
                        return found;
                    }
                }
            }
        }
        found
    }

    /// Downloads blocks in order and verifies each with the disk store's own code; stops at
    /// the first that is missing, bad, foreign or out of chain. Bad objects are quarantined
    /// locally and deleted remotely (a good writer may upload them again); good ones are
    /// written into the local disk store, the same bytes.
    pub(crate) async fn download(
        self: &Arc<Self>,
        fingerprint: &str,
        hashes: &[BlockHash],
        mut prev: Option<BlockHash>,
    ) -> Vec<Arc<KvBlock>> {
        let mut out = Vec::with_capacity(hashes.len());
        for chunk in hashes.chunks(self.cfg.concurrency.max(1)) {
            let fetched = futures::future::join_all(chunk.iter().map(|h| {
                let shared = Arc::clone(self);
                let (hash, fp) = (*h, fingerprint.to_owned());
                async move {
                    let bytes = shared
                        .get(&shared.keys.block(&hash), shared.cfg.read_timeout)
                        .await?;
                    let Some(bytes) = bytes else { return Ok(None) };
                    let verified = tokio::task::spawn_blocking(move || {
                        let decoded = decode_block(&bytes, &hash, &fp);
                        (bytes, decoded)
                    })
                    .await
                    .map_err(|e| {
                        RemoteError::Store(object_store::Error::JoinError { source: e })
                    })?;
                    Ok::<_, RemoteError>(Some(verified))
                }
            }))
            .await;
            for (hash, result) in chunk.iter().zip(fetched) {
                let (bytes, decoded) = match result {
                    Ok(Some(v)) => v,
                    Ok(None) => return out,
                    Err(e) => {
                        self.failed("GET block", &e);
                        return out;
                    }
                };
                let block = match decoded {
                    Ok(block) => block,
                    Err(e @ DiskStoreError::ForeignModel { .. }) => {
                        warn!(block = %hash, error = %e, "remote block of another model: cache miss");
                        return out;
                    }
                    Err(e) => {
                        warn!(block = %hash, error = %e, "remote block failed verification: quarantined, deleted remotely, cache miss");
                        bump(&self.counters.quarantined, 1);
                        let shared = Arc::clone(self);
                        let h = *hash;
                        let _ = tokio::task::spawn_blocking(move || {
                            shared.local.quarantine_bytes_blocking(&h, &bytes)
                        })
                        .await;
                        if let Err(e) = self.delete(&self.keys.block(hash)).await {
                            self.failed("DELETE bad block", &e);
                        }
                        return out;
                    }
                };
                if prev.is_some() && block.meta.parent != prev {
                    warn!(block = %hash, "remote block does not continue the chain: cache miss");
                    return out;
                }
                prev = Some(*hash);
                bump(&self.counters.blocks_downloaded, 1);
                bump(&self.counters.bytes_downloaded, bytes.len() as u64);
                let block = Arc::new(block);
                let (shared, adopted) = (Arc::clone(self), Arc::clone(&block));
                // The writer's queue may be full (back-pressure): off the runtime's threads.
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = shared
                        .local
                        .adopt_block_file_blocking(adopted, bytes.to_vec())
                    {
                        warn!(error = %e, "downloaded block not kept on the local disk");
                    }
                });
                out.push(block);
            }
        }
        out
    }

    /// The newest manifest envelope in the bucket (`Ok(None)`: none; an invalid one is
    /// logged and counts as none).
    pub(crate) async fn remote_manifest(
        &self,
        key: &AgentKey,
    ) -> Result<Option<ManifestEnvelope>, RemoteError> {
        let Some(bytes) = self
            .get(&self.keys.manifest(key), self.cfg.read_timeout)
            .await?
        else {
            return Ok(None);
        };
        match serde_json::from_slice::<ManifestEnvelope>(&bytes) {
            Ok(env)
                if env.format == MANIFEST_FORMAT
                    && env.manifest.agent == key.agent
                    && env.manifest.namespace == key.namespace
                    && env.manifest.version == AgentManifest::VERSION =>
            {
                Ok(Some(env))
            }
            Ok(_) => {
                warn!(agent = %key, "remote manifest is not this agent's or of another version: ignored");
                Ok(None)
            }
            Err(e) => {
                warn!(agent = %key, error = %e, "remote manifest is not valid JSON: ignored");
                Ok(None)
            }
        }
    }

    /// The local manifest, or the bucket's when it is of a newer generation (another
    /// replica's later turn); the newer one is then kept locally too.
    pub(crate) async fn load_manifest(
        &self,
        key: &AgentKey,
        local: Option<AgentManifest>,
    ) -> Option<AgentManifest> {
        if !self.is_up() {
            return local;
        }
        let env = match self.remote_manifest(key).await {
            Ok(Some(env)) => env,
            Ok(None) => return local,
            Err(e) => {
                self.failed("GET manifest", &e);
                return local;
            }
        };
        let name = Keys::agent_name(key);
        let known = lock(&self.gens).get(&name);
        lock(&self.gens).seen_remote(&name, env.generation);
        if env.generation > known.current || local.is_none() {
            debug!(agent = %key, generation = env.generation, "newer manifest from the object store");
            if let Err(e) = self.local.save_manifest_blocking(&env.manifest) {
                warn!(agent = %key, error = %e, "remote manifest not kept on the local disk");
            }
            Some(env.manifest)
        } else {
            local
        }
    }

    pub(crate) fn enqueue_blocks(&self, hashes: impl IntoIterator<Item = BlockHash>) {
        let mut q = lock(&self.queue);
        for h in hashes {
            if q.queued.insert(h) {
                q.blocks.push_back(h);
            }
        }
        drop(q);
        self.wake.notify_one();
    }

    /// Records a new turn of `manifest` and queues its upload; returns its generation.
    pub(crate) fn enqueue_manifest(&self, manifest: &AgentManifest) -> u64 {
        let name = Keys::agent_name(&key_of(manifest));
        let generation = lock(&self.gens).next(&name);
        lock(&self.queue).manifests.insert(
            name,
            PendingManifest {
                generation,
                manifest: manifest.clone(),
            },
        );
        self.wake.notify_one();
        generation
    }

    pub(crate) async fn delete_remote(&self, key: &AgentKey) -> bool {
        let name = Keys::agent_name(key);
        lock(&self.queue).manifests.remove(&name);
        lock(&self.gens).remove(&name);
        let path = self.keys.manifest(key);
        let existed = match self.exists(&path).await {
            Ok(e) => e,
            Err(e) => {
                self.failed("HEAD manifest", &e);
                return false;
            }
        };
        if let Err(e) = self.delete(&path).await {
            self.failed("DELETE manifest", &e);
        }
        existed
    }

    pub(crate) fn stats(&self) -> RemoteTierStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RemoteTierStats {
            up: self.is_up(),
            outages: get(&c.outages),
            errors: get(&c.errors),
            upload_queue: lock(&self.queue).len() as u64,
            blocks_uploaded: get(&c.blocks_uploaded),
            bytes_uploaded: get(&c.bytes_uploaded),
            blocks_downloaded: get(&c.blocks_downloaded),
            bytes_downloaded: get(&c.bytes_downloaded),
            manifests_uploaded: get(&c.manifests_uploaded),
            stale_manifests: get(&c.stale_manifests),
            quarantined: get(&c.quarantined),
            last_error: lock(&self.last_error).clone(),
        }
    }

    /// Waits until the upload queue is empty, the store is down, or `flush_timeout` passed.
    pub(crate) async fn drain(&self) {
        let start = Instant::now();
        loop {
            let queued = lock(&self.queue).len();
            if queued == 0 {
                return;
            }
            if !self.is_up() {
                warn!(
                    queued,
                    "object store down: uploads stay queued (and in the local store)"
                );
                return;
            }
            if start.elapsed() > self.cfg.flush_timeout {
                warn!(queued, "uploads still queued after the flush timeout");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The uploader: blocks first (in order), then the latest manifest of each agent.
    /// While the store is down it only probes, every `probe_interval`.
    async fn run_uploader(self: Arc<Self>) {
        while !self.stop.load(Ordering::Relaxed) {
            if !self.is_up() {
                tokio::time::sleep(self.cfg.probe_interval).await;
                if let Err(e) = self.exists(&self.keys.probe()).await {
                    self.failed("probe", &e);
                }
                continue;
            }
            let job = {
                let mut q = lock(&self.queue);
                let job = match q.blocks.pop_front() {
                    Some(h) => Some(Upload::Block(h)),
                    None => q.manifests.pop_first().map(|(n, p)| Upload::Manifest(n, p)),
                };
                q.busy = job.is_some();
                job
            };
            let Some(job) = job else {
                let _ = tokio::time::timeout(self.cfg.probe_interval, self.wake.notified()).await;
                continue;
            };
            match job {
                Upload::Block(hash) => {
                    let done = self.upload_block(&hash).await;
                    let mut q = lock(&self.queue);
                    match done {
                        Ok(()) => {
                            q.queued.remove(&hash);
                        }
                        Err(e) => {
                            q.blocks.push_front(hash);
                            drop(q);
                            self.failed("PUT block", &e);
                            q = lock(&self.queue);
                        }
                    }
                    q.busy = false;
                }
                Upload::Manifest(name, pending) => {
                    let done = self.upload_manifest(&name, &pending).await;
                    let mut q = lock(&self.queue);
                    if let Err(e) = done {
                        // Put back unless a newer turn of the agent is already waiting.
                        q.manifests.entry(name).or_insert(pending);
                        drop(q);
                        self.failed("PUT manifest", &e);
                        q = lock(&self.queue);
                    }
                    q.busy = false;
                }
            }
        }
    }

    async fn upload_block(self: &Arc<Self>, hash: &BlockHash) -> Result<(), RemoteError> {
        let shared = Arc::clone(self);
        let h = *hash;
        let bytes = tokio::task::spawn_blocking(move || shared.local.block_file_bytes_blocking(&h))
            .await
            .map_err(|e| RemoteError::Store(object_store::Error::JoinError { source: e }))?;
        let bytes = match bytes {
            Ok(Some(b)) => b,
            Ok(None) => {
                debug!(block = %hash, "block no longer on the local disk: not uploaded");
                return Ok(());
            }
            Err(e) => {
                warn!(block = %hash, error = %e, "cannot read the local block file: not uploaded");
                return Ok(());
            }
        };
        let path = self.keys.block(hash);
        // Blocks are immutable and named by their content: one already there is the same.
        if self.exists(&path).await? {
            return Ok(());
        }
        let len = bytes.len() as u64;
        self.put(&path, Bytes::from(bytes)).await?;
        bump(&self.counters.blocks_uploaded, 1);
        bump(&self.counters.bytes_uploaded, len);
        Ok(())
    }

    async fn upload_manifest(&self, name: &str, p: &PendingManifest) -> Result<(), RemoteError> {
        let key = key_of(&p.manifest);
        if let Some(remote) = self.remote_manifest(&key).await? {
            if remote.generation >= p.generation {
                bump(&self.counters.stale_manifests, 1);
                warn!(
                    agent = %key,
                    ours = p.generation,
                    theirs = remote.generation,
                    "the object store has a newer turn of this agent: not overwritten"
                );
                lock(&self.gens).seen_remote(name, remote.generation);
                return Ok(());
            }
        }
        let env = ManifestEnvelope {
            format: MANIFEST_FORMAT.into(),
            generation: p.generation,
            manifest: p.manifest.clone(),
        };
        let bytes = serde_json::to_vec(&env).map_err(|e| {
            RemoteError::Store(object_store::Error::Generic {
                store: "object-tier",
                source: Box::new(e),
            })
        })?;
        self.put(&self.keys.manifest(&key), Bytes::from(bytes))
            .await?;
        bump(&self.counters.manifests_uploaded, 1);
        lock(&self.gens).seen_remote(name, p.generation);
        Ok(())
    }
}

pub(crate) fn key_of(m: &AgentManifest) -> AgentKey {
    AgentKey {
        namespace: m.namespace.clone(),
        agent: m.agent.clone(),
    }
}

/// The object-store tier: a [`CacheStore`] that keeps the local [`DiskCacheStore`] in front
/// and an object store (S3-compatible) shared by replicas behind it.
///
/// - **Reads** go to the local disk first; blocks it lacks are looked up (HEAD) and
///   downloaded from the object store, verified by the disk store's own
///   [`decode_block`] (bad ones are quarantined like local files and deleted remotely),
///   and written into the local store as the same bytes. A manifest is read from the
///   bucket too, and the bucket's wins when its generation is newer.
/// - **Writes** go to the local disk (as before) and are uploaded in the background: blocks
///   by their hash (immutable, so any number of writers is safe), then each agent's latest
///   manifest in an envelope with its generation, refused when the bucket already has a
///   generation at least as high.
/// - **Outages**: a failed or slow (beyond `read_timeout`) request marks the store down,
///   logged once; reads then skip it, uploads wait, the uploader probes every
///   `probe_interval` and catches up when it answers. Turns never fail because of it.
///
/// The tier runs the object-store client on a small runtime of its own, so the port's
/// futures can be polled by any executor.
pub struct ObjectTierStore {
    pub(crate) shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for ObjectTierStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTierStore")
            .field("remote", &self.shared.remote.to_string())
            .field("up", &self.shared.is_up())
            .finish_non_exhaustive()
    }
}

impl ObjectTierStore {
    /// Puts `remote` behind `local`. Loads the generation table from the local cache
    /// directory, queues the turns a previous run did not upload (their blocks and
    /// manifests, still on the local disk) and starts the uploader. Contacts nothing yet.
    pub fn open(
        local: DiskCacheStore,
        remote: Arc<dyn ObjectStore>,
        cfg: ObjectTierConfig,
    ) -> Result<Self, ObjectTierError> {
        let gens = Generations::open(local.cache_dir())?;
        Self::with_generations(local, remote, cfg, gens)
    }

    fn with_generations(
        local: DiskCacheStore,
        remote: Arc<dyn ObjectStore>,
        cfg: ObjectTierConfig,
        gens: Generations,
    ) -> Result<Self, ObjectTierError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(8)
            .thread_name("object-tier")
            .enable_all()
            .build()?;
        let shared = Arc::new(Shared {
            local: Arc::new(local),
            remote,
            keys: Keys::new(&cfg.prefix),
            cfg,
            up: AtomicBool::new(true),
            gens: Mutex::new(gens),
            queue: Mutex::new(Queue::default()),
            wake: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
            counters: Counters::default(),
            last_error: Mutex::new(None),
        });
        shared.queue_unuploaded_turns();
        runtime.spawn(Arc::clone(&shared).run_uploader());
        Ok(Self {
            shared,
            runtime: Some(runtime),
        })
    }

    /// The local tier.
    pub fn local(&self) -> &DiskCacheStore {
        &self.shared.local
    }

    /// State and counters of the remote tier.
    pub fn remote_stats(&self) -> RemoteTierStats {
        self.shared.stats()
    }

    /// Runs `fut` on the tier's runtime and awaits it from any executor (`None` only if
    /// the runtime is shutting down).
    pub(crate) async fn on_runtime<T, F>(&self, fut: F) -> Option<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let runtime = self.runtime.as_ref()?;
        let (tx, rx) = oneshot::channel();
        runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.await.ok()
    }

    /// The uploader and the local writer are idle (or the store is down): for tests.
    pub async fn wait_uploaded(&self) {
        let shared = Arc::clone(&self.shared);
        let _ = self.on_runtime(async move { shared.drain().await }).await;
    }

    /// The port's `flush`: the local writer's, then the uploads (bounded).
    pub(crate) async fn flush_all(&self) -> Result<(), DiskStoreError> {
        self.shared.local.flush_blocking()?;
        self.wait_uploaded().await;
        Ok(())
    }

    /// The port's `load_blocks`: the local disk's verified prefix, then downloads.
    pub(crate) async fn load_blocks_tiered(
        &self,
        fingerprint: &str,
        hashes: &[BlockHash],
    ) -> Vec<Arc<KvBlock>> {
        let mut blocks = CacheStore::load_blocks(&*self.shared.local, fingerprint, hashes)
            .await
            .unwrap_or_default();
        if blocks.len() >= hashes.len() || !self.shared.is_up() {
            return blocks;
        }
        let prev = blocks.last().map(|b| b.meta.hash);
        let rest = hashes.get(blocks.len()..).unwrap_or_default().to_vec();
        let (shared, fp) = (Arc::clone(&self.shared), fingerprint.to_owned());
        let downloaded = self
            .on_runtime(async move { shared.download(&fp, &rest, prev).await })
            .await
            .unwrap_or_default();
        blocks.extend(downloaded);
        blocks
    }
}

impl Shared {
    /// Queues what the generation table says never reached the bucket (a previous run was
    /// stopped or the store was down): the agents' blocks and manifests from the local disk.
    fn queue_unuploaded_turns(&self) {
        let pending = lock(&self.gens).not_uploaded();
        if pending.is_empty() {
            return;
        }
        let wanted: BTreeMap<String, u64> =
            pending.into_iter().map(|(n, g)| (n, g.current)).collect();
        let manifests = match self.local.list_manifests_blocking(None) {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot list local manifests: earlier turns are not uploaded");
                return;
            }
        };
        let mut queued = 0;
        for m in manifests {
            let name = Keys::agent_name(&key_of(&m));
            let Some(&generation) = wanted.get(&name) else {
                continue;
            };
            self.enqueue_blocks(
                m.block_hashes
                    .iter()
                    .filter_map(|h| BlockHash::from_str(h).ok()),
            );
            lock(&self.queue).manifests.insert(
                name,
                PendingManifest {
                    generation,
                    manifest: m,
                },
            );
            queued += 1;
        }
        if queued > 0 {
            info!(
                agents = queued,
                "queued turns an earlier run did not upload"
            );
        }
    }
}

impl Drop for ObjectTierStore {
    /// Stops the uploader without waiting (call `flush` first to wait for the queue; what
    /// is left stays on the local disk and is uploaded by the next run).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_one();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
pub(crate) fn open_for_test(
    local: DiskCacheStore,
    remote: Arc<dyn ObjectStore>,
    cfg: ObjectTierConfig,
) -> ObjectTierStore {
    match ObjectTierStore::with_generations(local, remote, cfg, Generations::in_memory()) {
        Ok(s) => s,
        Err(e) => panic!("cannot open the tier: {e}"),
    }
}
