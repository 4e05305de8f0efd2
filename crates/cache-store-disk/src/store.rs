//! The disk cache store: block files, manifests, the background writer, the disk budget.

use crate::error::DiskStoreError;
use crate::format::{self, BLOCK_EXTENSION};
use crate::fsutil;
use agent_session::{AgentId, AgentKey, AgentManifest, KvBlock, Namespace, StoreStats};
use block_pool::BlockHash;
use futures::channel::oneshot;
use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, info, warn};

/// Environment variable naming the cache directory.
pub const ENV_CACHE_DIR: &str = "SEMANTIC_AGENT_CACHE_DIR";
/// Environment variable naming semantic's home (the cache is `$SEMANTIC_HOME/caches`).
pub const ENV_SEMANTIC_HOME: &str = "SEMANTIC_HOME";

/// Name of the block directory under the cache directory.
pub const BLOCKS_DIR: &str = "blocks";
/// Name of the manifest directory under the cache directory.
pub const AGENTS_DIR: &str = "agents";
/// Name of the quarantine directory under the cache directory.
pub const QUARANTINE_DIR: &str = "quarantine";
/// Prefix of per-namespace manifest directories (`agents/ns-<hash>/`).
pub const NAMESPACE_DIR_PREFIX: &str = "ns-";

/// Most quarantined files kept (the oldest beyond this are deleted).
pub const QUARANTINE_KEEP: usize = 64;

/// Temporary files younger than this are left alone at open (another process sharing the
/// directory, such as the CLI next to a running server, may be writing them).
const TEMP_FILE_MAX_AGE: Duration = Duration::from_secs(60);

/// The default cache directory: `$SEMANTIC_AGENT_CACHE_DIR`, else `$SEMANTIC_HOME/caches`,
/// else `~/.semantic/caches` (`$HOME`), else `.semantic/caches` relative to the working
/// directory when no home is known. Empty variables count as unset.
pub fn default_cache_dir() -> PathBuf {
    cache_dir_from(
        std::env::var_os(ENV_CACHE_DIR),
        std::env::var_os(ENV_SEMANTIC_HOME),
        std::env::var_os("HOME"),
    )
}

/// [`default_cache_dir`] from explicit values of `SEMANTIC_AGENT_CACHE_DIR`,
/// `SEMANTIC_HOME` and `HOME` (testable without touching the environment).
pub fn cache_dir_from(
    agent_cache_dir: Option<OsString>,
    semantic_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    let set = |v: Option<OsString>| v.filter(|s| !s.is_empty());
    if let Some(dir) = set(agent_cache_dir) {
        PathBuf::from(dir)
    } else if let Some(home) = set(semantic_home) {
        PathBuf::from(home).join("caches")
    } else if let Some(home) = set(home) {
        PathBuf::from(home).join(".semantic").join("caches")
    } else {
        PathBuf::from(".semantic").join("caches")
    }
}

/// Settings of a [`DiskCacheStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStoreConfig {
    /// Root of the store (holds `blocks/`, `agents/`, `quarantine/`).
    pub cache_dir: PathBuf,
    /// Most bytes of block files to keep; least-recently-used blocks no pinned manifest
    /// references are deleted beyond it. `None`: unlimited.
    pub disk_budget_bytes: Option<u64>,
    /// Blocks that may wait for the background writer; `save_blocks` blocks when it is full
    /// (back-pressure). At least 1.
    pub write_queue_capacity: usize,
    /// Most blocks the writer commits together (one directory fsync per group). At least 1.
    pub write_batch_max: usize,
    /// Threads that read and verify block files in parallel during one `load_blocks`
    /// (0: one per CPU, between 2 and 4; 1: sequential). A warm read is CPU work (page-cache
    /// copy into fresh memory, BLAKE3) that spreads over the cores while the engine waits for
    /// the restore; a cold one also keeps more than one file's I/O in flight. On the 2-core
    /// development VM a 16-block (189 MB) load took, in a fresh process: warm 145–165 ms with
    /// 1 reader, 80–105 with 2, 100–120 with 3, 120 with 4 (faulting fresh memory contends);
    /// cold (dropped page cache) 180–195 ms with 1, 160–170 with 2, 135–150 with 3 or 4.
    pub read_threads: usize,
}

impl DiskStoreConfig {
    /// Defaults with the given cache directory: no budget, a queue of 64 blocks, groups of
    /// 16, parallel reads on one thread per CPU (2 to 4 threads).
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            disk_budget_bytes: None,
            write_queue_capacity: 64,
            write_batch_max: 16,
            read_threads: 0,
        }
    }
}

impl Default for DiskStoreConfig {
    /// Defaults in [`default_cache_dir`].
    fn default() -> Self {
        Self::new(default_cache_dir())
    }
}

/// The name of a namespace's manifest directory: `ns-` + 32 hex digits of a keyed BLAKE3
/// hash of the namespace (so a raw API key never appears on disk). `None` for the default
/// (empty) namespace, whose manifests live directly in `agents/`.
pub fn namespace_dir_name(namespace: &Namespace) -> Option<String> {
    if namespace.as_str().is_empty() {
        return None;
    }
    let mut h = blake3::Hasher::new_derive_key("semantic cache-store-disk namespace dir v1");
    h.update(namespace.as_str().as_bytes());
    let hex = h.finalize().to_hex();
    Some(format!(
        "{NAMESPACE_DIR_PREFIX}{}",
        hex.as_str().get(..32).unwrap_or(hex.as_str())
    ))
}

/// Prefix of manifest file names (`a-<digest>.json`).
pub const MANIFEST_FILE_PREFIX: &str = "a-";

/// The file name of an agent's manifest: `a-` + 32 hex digits of a keyed BLAKE3 hash of the
/// id + `.json`. Derived from the id, never the id itself: any valid id (up to
/// [`agent_session::MAX_AGENT_ID_LEN`] bytes) gives a 39-byte name, and the temporary file
/// of an atomic write stays far below the 255-byte file-name limit. The manifest holds the
/// id itself, checked on every read.
pub fn manifest_file_name(agent: &AgentId) -> String {
    let mut h = blake3::Hasher::new_derive_key("semantic cache-store-disk manifest name v1");
    h.update(agent.as_str().as_bytes());
    let hex = h.finalize().to_hex();
    format!(
        "{MANIFEST_FILE_PREFIX}{}.json",
        hex.as_str().get(..32).unwrap_or(hex.as_str())
    )
}

/// File name of a block: `<hash>.safetensors`.
pub fn block_file_name(hash: &BlockHash) -> String {
    format!("{hash}.{BLOCK_EXTENSION}")
}

/// Where things live under the cache directory.
#[derive(Debug, Clone)]
struct Layout {
    root: PathBuf,
    blocks: PathBuf,
    agents: PathBuf,
    quarantine: PathBuf,
}

impl Layout {
    fn new(root: PathBuf) -> Self {
        Self {
            blocks: root.join(BLOCKS_DIR),
            agents: root.join(AGENTS_DIR),
            quarantine: root.join(QUARANTINE_DIR),
            root,
        }
    }

    fn block_path(&self, hash: &BlockHash) -> PathBuf {
        self.blocks.join(block_file_name(hash))
    }

    fn namespace_dir(&self, namespace: &Namespace) -> PathBuf {
        match namespace_dir_name(namespace) {
            Some(name) => self.agents.join(name),
            None => self.agents.clone(),
        }
    }

    /// The manifest's directory and file name ([`manifest_file_name`]: a digest of the id,
    /// so it never leaves the directory and never meets a file-name length limit).
    fn manifest_location(&self, key: &AgentKey) -> Result<(PathBuf, String), DiskStoreError> {
        let dir = self.namespace_dir(&key.namespace);
        Ok((dir, manifest_file_name(&key.agent)))
    }
}

/// One block file on disk.
#[derive(Debug, Clone, Copy)]
struct IndexEntry {
    bytes: u64,
    last_use: u64,
}

/// What the store remembers of a manifest (for pinning and shared-block deletion).
#[derive(Debug, Clone)]
struct ManifestRefs {
    pinned: bool,
    /// Last use (unix ms) and TTL: an expired manifest's pin no longer protects its blocks.
    last_used_at_ms: u64,
    ttl_secs: Option<u64>,
    blocks: Vec<BlockHash>,
}

impl ManifestRefs {
    fn of(m: &AgentManifest, blocks: Vec<BlockHash>) -> Self {
        Self {
            pinned: m.pinned,
            last_used_at_ms: m.last_used_at_ms,
            ttl_secs: m.ttl_secs,
            blocks,
        }
    }

    /// Pinned and not expired at `now_ms`.
    fn protects(&self, now_ms: u64) -> bool {
        self.pinned
            && !self.ttl_secs.is_some_and(|ttl| {
                now_ms.saturating_sub(self.last_used_at_ms) > ttl.saturating_mul(1000)
            })
    }
}

#[derive(Debug, Default)]
struct State {
    /// Block files on disk (as far as this process knows).
    index: HashMap<BlockHash, IndexEntry>,
    /// Sum of `index` bytes.
    disk_bytes: u64,
    /// Blocks accepted but not yet written (served to readers from memory).
    pending: HashMap<BlockHash, Arc<KvBlock>>,
    /// Valid manifests on disk.
    manifests: HashMap<AgentKey, ManifestRefs>,
    /// Recency clock (nanoseconds since the epoch, strictly increasing).
    clock: u64,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock = now_nanos().max(self.clock.saturating_add(1));
        self.clock
    }

    fn insert_block(&mut self, hash: BlockHash, bytes: u64, last_use: u64) {
        if let Some(old) = self.index.insert(hash, IndexEntry { bytes, last_use }) {
            self.disk_bytes = self.disk_bytes.saturating_sub(old.bytes);
        }
        self.disk_bytes = self.disk_bytes.saturating_add(bytes);
    }

    fn remove_block(&mut self, hash: &BlockHash) -> bool {
        match self.index.remove(hash) {
            Some(old) => {
                self.disk_bytes = self.disk_bytes.saturating_sub(old.bytes);
                true
            }
            None => false,
        }
    }

    /// Removes (from the index) least-recently-used unpinned blocks until the budget holds.
    fn pick_victims(&mut self, budget: Option<u64>) -> Vec<BlockHash> {
        let Some(budget) = budget else {
            return Vec::new();
        };
        if self.disk_bytes <= budget {
            return Vec::new();
        }
        let now_ms = now_nanos() / 1_000_000;
        let pinned: HashSet<BlockHash> = self
            .manifests
            .values()
            .filter(|m| m.protects(now_ms))
            .flat_map(|m| m.blocks.iter().copied())
            .collect();
        let mut candidates: Vec<(u64, BlockHash)> = self
            .index
            .iter()
            .filter(|(h, _)| !pinned.contains(h))
            .map(|(h, e)| (e.last_use, *h))
            .collect();
        candidates.sort_unstable();
        let mut victims = Vec::new();
        for (_, hash) in candidates {
            if self.disk_bytes <= budget {
                break;
            }
            self.remove_block(&hash);
            victims.push(hash);
        }
        if self.disk_bytes > budget {
            warn!(
                disk_bytes = self.disk_bytes,
                budget, "pinned agents' blocks alone exceed the disk budget"
            );
        }
        victims
    }
}

#[derive(Debug, Default)]
struct Counters {
    blocks_written: AtomicU64,
    blocks_read: AtomicU64,
    bytes_read: AtomicU64,
    quarantined: AtomicU64,
    evicted: AtomicU64,
    write_errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Shared between the store handle and its writer thread.
#[derive(Debug)]
struct Inner {
    layout: Layout,
    budget: Option<u64>,
    state: Mutex<State>,
    counters: Counters,
}

/// Work for the background writer, processed in order.
enum Job {
    /// Write one block file: encoded from the block, or these exact bytes (a verified file
    /// that came from another tier).
    Write(Arc<KvBlock>, Option<Vec<u8>>),
    /// Delete block files no manifest needs any more (unless re-added since).
    Delete(Vec<BlockHash>),
    /// Acknowledge once everything before is durable.
    Flush(oneshot::Sender<()>),
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn mtime_nanos(meta: &fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Outcome of reading one block file.
enum ReadMiss {
    /// No such file: a plain miss.
    Missing,
    /// Unreadable, corrupt, foreign or inconsistent: a miss, already logged (and quarantined
    /// when the file itself is bad).
    Rejected,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // breaks correctness (every update is a single insert/remove), so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writer thread: takes jobs until every sender is gone and the queue is drained.
    fn run_writer(&self, rx: Receiver<Job>, batch_max: usize) {
        while let Ok(first) = rx.recv() {
            let mut group: Vec<(Arc<KvBlock>, Option<Vec<u8>>)> = Vec::new();
            let mut next = Some(first);
            let mut taken = 1usize;
            while let Some(job) = next.take() {
                match job {
                    Job::Write(block, bytes) => group.push((block, bytes)),
                    Job::Delete(hashes) => {
                        self.commit_writes(std::mem::take(&mut group));
                        self.delete_unneeded(hashes);
                    }
                    Job::Flush(ack) => {
                        self.commit_writes(std::mem::take(&mut group));
                        let _ = ack.send(());
                    }
                }
                if taken < batch_max {
                    match rx.try_recv() {
                        Ok(job) => {
                            next = Some(job);
                            taken += 1;
                        }
                        Err(TryRecvError::Empty | TryRecvError::Disconnected) => {}
                    }
                }
            }
            self.commit_writes(group);
        }
    }

    /// Writes a group of blocks: each to a temp file (fsynced), then renames them all into
    /// place in order and fsyncs the directory once. Failures are logged and the block is
    /// dropped (the server goes on without persisting it).
    fn commit_writes(&self, group: Vec<(Arc<KvBlock>, Option<Vec<u8>>)>) {
        if group.is_empty() {
            return;
        }
        let dir = &self.layout.blocks;
        let mut failed = Vec::new();
        let mut staged = Vec::with_capacity(group.len());
        for (block, bytes) in group {
            let hash = block.meta.hash;
            let name = block_file_name(&hash);
            let tmp = fsutil::temp_path(dir, &name);
            let encoded = match bytes {
                Some(bytes) => Ok(bytes),
                None => format::encode_block(&block),
            };
            let written = encoded.and_then(|bytes| {
                fsutil::write_temp(&tmp, &bytes)?;
                Ok(bytes.len() as u64)
            });
            match written {
                Ok(len) => staged.push((hash, tmp, dir.join(name), len)),
                Err(e) => {
                    warn!(block = %hash, error = %e, "block not persisted; continuing without it");
                    failed.push(hash);
                }
            }
        }
        let mut done = Vec::with_capacity(staged.len());
        for (hash, tmp, dest, len) in staged {
            match fsutil::rename_into_place(&tmp, &dest) {
                Ok(()) => done.push((hash, len)),
                Err(e) => {
                    warn!(block = %hash, error = %e, "block not persisted; continuing without it");
                    failed.push(hash);
                }
            }
        }
        if !done.is_empty() {
            if let Err(e) = fsutil::sync_dir(dir) {
                warn!(error = %e, "fsync of the block directory failed");
            }
        }
        bump(&self.counters.blocks_written, done.len() as u64);
        bump(&self.counters.write_errors, failed.len() as u64);
        let victims = {
            let mut st = self.lock();
            for (hash, len) in done {
                let now = st.tick();
                st.pending.remove(&hash);
                st.insert_block(hash, len, now);
            }
            for hash in &failed {
                st.pending.remove(hash);
            }
            st.pick_victims(self.budget)
        };
        self.remove_files(&victims, "evicted by the disk budget");
        bump(&self.counters.evicted, victims.len() as u64);
    }

    /// Deletes block files, skipping those that were saved again since they were dropped
    /// from the index (this runs on the writer thread, the only one that creates block files).
    fn delete_unneeded(&self, hashes: Vec<BlockHash>) {
        let hashes: Vec<BlockHash> = {
            let st = self.lock();
            hashes
                .into_iter()
                .filter(|h| !st.index.contains_key(h) && !st.pending.contains_key(h))
                .collect()
        };
        self.remove_files(&hashes, "no manifest needs it");
    }

    fn remove_files(&self, hashes: &[BlockHash], why: &str) {
        if hashes.is_empty() {
            return;
        }
        for hash in hashes {
            let path = self.layout.block_path(hash);
            match fs::remove_file(&path) {
                Ok(()) => debug!(block = %hash, why, "block file deleted"),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => warn!(path = %path.display(), error = %e, "could not delete block file"),
            }
        }
        if let Err(e) = fsutil::sync_dir(&self.layout.blocks) {
            warn!(error = %e, "fsync of the block directory failed");
        }
    }

    /// Moves a bad block file aside to `quarantine/` (or deletes it if that fails).
    fn quarantine(&self, hash: &BlockHash, path: &Path) {
        self.lock().remove_block(hash);
        let dest =
            self.layout
                .quarantine
                .join(format!("{}-{}.{BLOCK_EXTENSION}", hash, now_nanos()));
        let moved = fsutil::ensure_private_dir(&self.layout.quarantine, true)
            .and_then(|()| fsutil::rename_into_place_keep(path, &dest));
        match moved {
            Ok(()) => warn!(path = %path.display(), to = %dest.display(), "block file quarantined"),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "could not quarantine; deleting the file");
                let _ = fs::remove_file(path);
            }
        }
        bump(&self.counters.quarantined, 1);
        self.trim_quarantine();
    }

    /// Keeps only the [`QUARANTINE_KEEP`] most recent quarantined files (they are evidence
    /// for debugging, not data, and must not fill the disk).
    fn trim_quarantine(&self) {
        let Ok(entries) = fs::read_dir(&self.layout.quarantine) else {
            return;
        };
        let mut files: Vec<(SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let meta = e.metadata().ok().filter(fs::Metadata::is_file)?;
                Some((meta.modified().unwrap_or(UNIX_EPOCH), e.path()))
            })
            .collect();
        if files.len() <= QUARANTINE_KEEP {
            return;
        }
        files.sort();
        let excess = files.len() - QUARANTINE_KEEP;
        for (_, path) in files.into_iter().take(excess) {
            let _ = fs::remove_file(path);
        }
    }

    /// Reads and verifies one block file; returns it with its file size.
    fn read_block(&self, hash: &BlockHash, fingerprint: &str) -> Result<(KvBlock, u64), ReadMiss> {
        let path = self.layout.block_path(hash);
        match format::read_block_file(&path, hash, fingerprint) {
            Ok((block, len)) => {
                let mut st = self.lock();
                if !st.index.contains_key(hash) {
                    // Written by another process sharing the directory.
                    let now = st.tick();
                    st.insert_block(*hash, len, now);
                }
                Ok((block, len))
            }
            Err(DiskStoreError::Io { source, .. }) if source.kind() == ErrorKind::NotFound => {
                self.lock().remove_block(hash);
                Err(ReadMiss::Missing)
            }
            Err(e @ DiskStoreError::Io { .. }) => {
                warn!(path = %path.display(), error = %e, "block file unreadable: cache miss");
                Err(ReadMiss::Rejected)
            }
            Err(e @ DiskStoreError::ForeignModel { .. }) => {
                // Intact, but for another model: not ours to destroy.
                warn!(block = %hash, error = %e, "block of another model: cache miss");
                Err(ReadMiss::Rejected)
            }
            Err(e) => {
                warn!(block = %hash, error = %e, "bad block file: cache miss");
                self.quarantine(hash, &path);
                Err(ReadMiss::Rejected)
            }
        }
    }

    /// See [`DiskCacheStore::load_blocks_blocking`].
    fn load_blocks(
        &self,
        model_fingerprint: &str,
        hashes: &[BlockHash],
        read_threads: usize,
    ) -> Vec<Arc<KvBlock>> {
        // Queued blocks come from memory; the rest from disk, several files at a time.
        let queued: Vec<Option<Arc<KvBlock>>> = {
            let st = self.lock();
            hashes.iter().map(|h| st.pending.get(h).cloned()).collect()
        };
        let wanted: Vec<usize> = (0..hashes.len())
            .filter(|&i| queued.get(i).is_some_and(Option::is_none))
            .collect();
        let mut read = self.read_many(hashes, &wanted, model_fingerprint, read_threads);

        let mut out: Vec<Arc<KvBlock>> = Vec::with_capacity(hashes.len());
        let (mut blocks_read, mut bytes_read) = (0u64, 0u64);
        for (i, (hash, queued)) in hashes.iter().zip(queued).enumerate() {
            let block = match queued {
                Some(block) => block,
                None => match read.remove(&i) {
                    Some(Ok((block, len))) => {
                        blocks_read += 1;
                        bytes_read += len;
                        Arc::new(block)
                    }
                    Some(Err(ReadMiss::Missing)) | None => {
                        debug!(block = %hash, "block not stored: cache miss");
                        break;
                    }
                    Some(Err(ReadMiss::Rejected)) => break,
                },
            };
            if block.meta.hash != *hash || block.meta.model_fingerprint != model_fingerprint {
                warn!(block = %hash, "queued block of another model: cache miss");
                break;
            }
            if let Some(prev) = i.checked_sub(1).and_then(|p| hashes.get(p)) {
                if block.meta.parent.as_ref() != Some(prev) {
                    warn!(block = %hash, "block does not follow the previous one: cache miss");
                    break;
                }
            }
            out.push(block);
        }
        bump(&self.counters.blocks_read, blocks_read);
        bump(&self.counters.bytes_read, bytes_read);
        if !out.is_empty() {
            let mut st = self.lock();
            for block in &out {
                let now = st.tick();
                if let Some(entry) = st.index.get_mut(&block.meta.hash) {
                    entry.last_use = now;
                }
            }
        }
        out
    }

    /// Reads the blocks at `wanted` (indices into `hashes`) from disk, on up to
    /// `max_threads` threads. Reading stops early past the first index that fails, since
    /// the prefix ends there.
    fn read_many(
        &self,
        hashes: &[BlockHash],
        wanted: &[usize],
        fingerprint: &str,
        max_threads: usize,
    ) -> HashMap<usize, Result<(KvBlock, u64), ReadMiss>> {
        let threads = max_threads.min(wanted.len());
        if threads <= 1 {
            let mut out = HashMap::with_capacity(wanted.len());
            for &i in wanted {
                let r = match hashes.get(i) {
                    Some(h) => self.read_block(h, fingerprint),
                    None => Err(ReadMiss::Missing),
                };
                let failed = r.is_err();
                out.insert(i, r);
                if failed {
                    break;
                }
            }
            return out;
        }
        let next = AtomicUsize::new(0);
        let first_failure = AtomicUsize::new(usize::MAX);
        let results = Mutex::new(HashMap::with_capacity(wanted.len()));
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    while let Some(&i) = wanted.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if i > first_failure.load(Ordering::Relaxed) {
                            break;
                        }
                        let r = match hashes.get(i) {
                            Some(h) => self.read_block(h, fingerprint),
                            None => Err(ReadMiss::Missing),
                        };
                        if r.is_err() {
                            first_failure.fetch_min(i, Ordering::Relaxed);
                        }
                        results
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(i, r);
                    }
                });
            }
        });
        results.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads and validates one manifest file. `expected` is the key its location implies
    /// (when known); otherwise `dir_name` is the namespace directory it was found in.
    fn read_manifest(
        &self,
        path: &Path,
        expected: Option<&AgentKey>,
        dir_name: Option<&str>,
    ) -> Result<Option<(AgentManifest, Vec<BlockHash>)>, String> {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("unreadable: {e}")),
        };
        let m: AgentManifest = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
        if m.version != AgentManifest::VERSION {
            return Err(format!("manifest version {}", m.version));
        }
        let name = path.file_name().and_then(|s| s.to_str());
        if name != Some(manifest_file_name(&m.agent).as_str()) {
            return Err(format!("names agent {:?}", m.agent.as_str()));
        }
        match expected {
            Some(key) if key.namespace != m.namespace => {
                return Err("belongs to another namespace".into());
            }
            Some(_) => {}
            None => {
                if namespace_dir_name(&m.namespace).as_deref() != dir_name {
                    return Err("namespace does not match its directory".into());
                }
            }
        }
        let hashes = parse_hashes(&m)?;
        Ok(Some((m, hashes)))
    }

    /// Every valid manifest in one directory (invalid ones are logged and skipped).
    fn scan_manifest_dir(
        &self,
        dir: &Path,
        dir_name: Option<&str>,
        out: &mut Vec<(AgentManifest, Vec<BlockHash>)>,
    ) -> Result<(), DiskStoreError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(DiskStoreError::io(dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| DiskStoreError::io(dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                warn!(path = %path.display(), "skipping a manifest file with a non-UTF-8 name");
                continue;
            };
            if fsutil::is_temp_name(name) {
                fsutil::remove_if_stale(&path, TEMP_FILE_MAX_AGE);
                continue;
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(stem) = name.strip_suffix(".json") else {
                continue;
            };
            if !stem.starts_with(MANIFEST_FILE_PREFIX) {
                // A manifest of an older layout (`<agent_id>.json`) not migrated at open (the
                // store was opened read-only by another process meanwhile): skipped.
                warn!(path = %path.display(), "skipping a manifest file of the old layout");
                continue;
            }
            match self.read_manifest(&path, None, dir_name) {
                Ok(Some(found)) => out.push(found),
                Ok(None) => {}
                Err(reason) => {
                    warn!(path = %path.display(), reason, "skipping an invalid manifest");
                }
            }
        }
        Ok(())
    }

    /// Renames manifests of the old layout (`<agent_id>.json`, named by the raw id) in `dir`
    /// to their digest names ([`manifest_file_name`]); a file that does not hold the manifest
    /// of the agent its name gives is left alone (and skipped by scans). When both names
    /// exist the digest-named file is the newer one and the old file is removed.
    fn migrate_legacy_manifests(&self, dir: &Path) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let mut moved = 0usize;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if stem.starts_with(MANIFEST_FILE_PREFIX) || fsutil::is_temp_name(stem) {
                continue;
            }
            let Ok(agent) = AgentId::new(stem) else {
                continue;
            };
            let path = entry.path();
            let holds_it = fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<AgentManifest>(&b).ok())
                .is_some_and(|m| m.agent == agent);
            if !holds_it {
                continue;
            }
            let dest = dir.join(manifest_file_name(&agent));
            let result = if dest.exists() {
                fs::remove_file(&path).map_err(|e| DiskStoreError::io(&path, e))
            } else {
                fsutil::rename_into_place_keep(&path, &dest)
            };
            match result {
                Ok(()) => moved += 1,
                Err(e) => {
                    warn!(agent = %agent, error = %e, "cannot migrate a manifest to its digest name")
                }
            }
        }
        if moved > 0 {
            if let Err(e) = fsutil::sync_dir(dir) {
                warn!(error = %e, "fsync of a manifest directory failed");
            }
            info!(dir = %dir.display(), moved, "manifests renamed to digest file names");
        }
    }

    /// [`Inner::migrate_legacy_manifests`] in `agents/` and every namespace directory.
    fn migrate_all_legacy_manifests(&self) {
        let agents = &self.layout.agents;
        self.migrate_legacy_manifests(agents);
        let Ok(entries) = fs::read_dir(agents) else {
            return;
        };
        for entry in entries.flatten() {
            let is_ns = entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(NAMESPACE_DIR_PREFIX));
            if is_ns && entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.migrate_legacy_manifests(&entry.path());
            }
        }
    }

    /// Every valid manifest of a namespace, or of all namespaces.
    fn scan_manifests(
        &self,
        namespace: Option<&Namespace>,
    ) -> Result<Vec<(AgentManifest, Vec<BlockHash>)>, DiskStoreError> {
        let mut out = Vec::new();
        match namespace {
            Some(ns) => {
                let name = namespace_dir_name(ns);
                self.scan_manifest_dir(&self.layout.namespace_dir(ns), name.as_deref(), &mut out)?;
            }
            None => {
                let agents = &self.layout.agents;
                self.scan_manifest_dir(agents, None, &mut out)?;
                let entries = match fs::read_dir(agents) {
                    Ok(e) => e,
                    Err(e) if e.kind() == ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(DiskStoreError::io(agents, e)),
                };
                for entry in entries {
                    let entry = entry.map_err(|e| DiskStoreError::io(agents, e))?;
                    let name = entry.file_name();
                    let Some(name) = name.to_str() else { continue };
                    if name.starts_with(NAMESPACE_DIR_PREFIX)
                        && entry.file_type().is_ok_and(|t| t.is_dir())
                    {
                        self.scan_manifest_dir(&entry.path(), Some(name), &mut out)?;
                    }
                }
            }
        }
        out.sort_by(|(a, _), (b, _)| (&a.namespace, &a.agent).cmp(&(&b.namespace, &b.agent)));
        Ok(out)
    }
}

fn parse_hashes(m: &AgentManifest) -> Result<Vec<BlockHash>, String> {
    m.block_hashes
        .iter()
        .map(|h| {
            BlockHash::from_str(h)
                .ok()
                .filter(|p| p.to_string() == *h)
                .ok_or_else(|| format!("bad block hash {h:?}"))
        })
        .collect()
}

fn key_of(m: &AgentManifest) -> AgentKey {
    AgentKey {
        namespace: m.namespace.clone(),
        agent: m.agent.clone(),
    }
}

/// KV blocks and agent manifests on the local disk: the disk adapter of
/// [`agent_session::CacheStore`].
///
/// Layout under the cache directory (directories 0700, files 0600):
/// - `blocks/<hash>.safetensors`: one block each (format: [`crate::format`](mod@crate::format));
///   agents that share a prefix share its block files;
/// - `agents/a-<digest>.json`: manifests of the default namespace;
///   `agents/ns-<hash>/a-<digest>.json`: manifests of other namespaces
///   ([`namespace_dir_name`], [`manifest_file_name`]; manifests of the older
///   `<agent_id>.json` layout are renamed at open);
/// - `quarantine/`: block files that failed verification, kept for inspection (the
///   [`QUARANTINE_KEEP`] most recent).
///
/// Block writes go through a bounded queue to one background thread; blocks waiting there
/// are served to readers from memory. Manifest writes are synchronous. Every write is
/// atomic and durable (temp file, fsync, rename, directory fsync). Reads verify everything
/// and end the loaded prefix at the first bad block.
///
/// Threading: all methods do blocking file I/O on the calling thread (the async port
/// methods too: call them from a blocking-friendly thread, e.g. `spawn_blocking`, when that
/// matters); `save_blocks` blocks while the write queue is full. One server process should
/// own a cache directory; other processes (the CLI) may list, show and delete manifests
/// (a running server learns of such changes only when it reopens the directory: its
/// in-memory index of pins and block recency is built at open).
///
/// Dropping the store flushes every queued write.
#[derive(Debug)]
pub struct DiskCacheStore {
    inner: Arc<Inner>,
    sender: Option<SyncSender<Job>>,
    writer: Option<JoinHandle<()>>,
    read_threads: usize,
}

impl DiskCacheStore {
    /// Opens (creating if needed) a store: creates the directories, indexes existing block
    /// files (recency = file mtime), removes stale temporary files, loads the manifests'
    /// block references, applies the disk budget and starts the writer thread.
    pub fn open(config: DiskStoreConfig) -> Result<Self, DiskStoreError> {
        let layout = Layout::new(config.cache_dir.clone());
        fsutil::ensure_private_dir(&layout.root, false)?;
        for dir in [&layout.blocks, &layout.agents, &layout.quarantine] {
            fsutil::ensure_private_dir(dir, true)?;
        }
        let inner = Arc::new(Inner {
            layout,
            budget: config.disk_budget_bytes,
            state: Mutex::new(State::default()),
            counters: Counters::default(),
        });
        let mut state = State::default();
        scan_blocks(&inner.layout.blocks, &mut state)?;
        inner.migrate_all_legacy_manifests();
        for (m, blocks) in inner.scan_manifests(None)? {
            state
                .manifests
                .insert(key_of(&m), ManifestRefs::of(&m, blocks));
        }
        let victims = state.pick_victims(inner.budget);
        info!(
            cache_dir = %inner.layout.root.display(),
            blocks = state.index.len(),
            bytes = state.disk_bytes,
            agents = state.manifests.len(),
            evicted = victims.len(),
            "disk cache store opened"
        );
        *inner.lock() = state;
        inner.remove_files(&victims, "evicted by the disk budget");
        bump(&inner.counters.evicted, victims.len() as u64);

        let (sender, rx) = std::sync::mpsc::sync_channel(config.write_queue_capacity.max(1));
        let worker = Arc::clone(&inner);
        let batch_max = config.write_batch_max.max(1);
        let writer = std::thread::Builder::new()
            .name("cache-store-disk-writer".into())
            .spawn(move || worker.run_writer(rx, batch_max))
            .map_err(|e| DiskStoreError::io(&inner.layout.blocks, e))?;
        let read_threads = if config.read_threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
        } else {
            config.read_threads
        };
        Ok(Self {
            inner,
            sender: Some(sender),
            writer: Some(writer),
            read_threads,
        })
    }

    /// The cache directory.
    pub fn cache_dir(&self) -> &Path {
        &self.inner.layout.root
    }

    /// The path a block's file has (whether or not it exists).
    pub fn block_path(&self, hash: &BlockHash) -> PathBuf {
        self.inner.layout.block_path(hash)
    }

    /// Validates an agent id for this store (a typed error for the CLI and HTTP edges).
    pub fn agent_key(namespace: Namespace, agent: &str) -> Result<AgentKey, DiskStoreError> {
        Ok(AgentKey {
            namespace,
            agent: AgentId::new(agent)?,
        })
    }

    /// The path of an agent's manifest (whether or not it exists), checked to stay inside
    /// the agents directory.
    pub fn manifest_path(&self, key: &AgentKey) -> Result<PathBuf, DiskStoreError> {
        let (dir, name) = self.inner.layout.manifest_location(key)?;
        Ok(dir.join(name))
    }

    /// Number of block writes that failed since open (the blocks stayed RAM-only).
    pub fn write_errors(&self) -> u64 {
        self.inner.counters.write_errors.load(Ordering::Relaxed)
    }

    fn send(&self, job: Job) -> Result<(), DiskStoreError> {
        self.sender
            .as_ref()
            .ok_or(DiskStoreError::WriterStopped)?
            .send(job)
            .map_err(|_| DiskStoreError::WriterStopped)
    }

    /// Accepts blocks for writing; returns how many were new (not on disk nor queued).
    /// Blocks already stored count as used now (recency). Validates every block first and
    /// accepts none if one is malformed. Blocks while the write queue is full.
    pub fn save_blocks_blocking(&self, blocks: Vec<Arc<KvBlock>>) -> Result<usize, DiskStoreError> {
        for block in &blocks {
            format::validate_block(block)?;
        }
        let mut new = Vec::new();
        {
            let mut st = self.inner.lock();
            for block in blocks {
                let hash = block.meta.hash;
                if st.pending.contains_key(&hash) {
                    continue;
                }
                let now = st.tick();
                if let Some(entry) = st.index.get_mut(&hash) {
                    entry.last_use = now;
                    continue;
                }
                st.pending.insert(hash, Arc::clone(&block));
                new.push(block);
            }
        }
        let count = new.len();
        let mut jobs = new.into_iter();
        while let Some(block) = jobs.next() {
            let hash = block.meta.hash;
            if let Err(e) = self.send(Job::Write(block, None)) {
                let mut st = self.inner.lock();
                st.pending.remove(&hash);
                for rest in jobs {
                    st.pending.remove(&rest.meta.hash);
                }
                return Err(e);
            }
        }
        Ok(count)
    }

    /// How many of `hashes`, from the first, are stored or queued (not verified: a later
    /// `load_blocks` may still find a bad file).
    pub fn stored_prefix_blocking(&self, hashes: &[BlockHash]) -> usize {
        let st = self.inner.lock();
        hashes
            .iter()
            .take_while(|h| st.pending.contains_key(h) || st.index.contains_key(h))
            .count()
    }

    /// Loads blocks in order, stopping at the first one that is missing, corrupt, of another
    /// model fingerprint or not the child of the previous one: the longest verified prefix.
    /// Queued blocks come from memory. Files are read on up to `read_threads` threads, each
    /// straight into the tensors' buffers (no whole-file intermediate copy), and verified.
    /// Bad files are moved to `quarantine/`.
    pub fn load_blocks_blocking(
        &self,
        model_fingerprint: &str,
        hashes: &[BlockHash],
    ) -> Vec<Arc<KvBlock>> {
        self.inner
            .load_blocks(model_fingerprint, hashes, self.read_threads)
    }

    /// [`DiskCacheStore::load_blocks_blocking`] on a thread of its own; the result arrives
    /// on the returned channel (closed without a value only if that thread could not
    /// start or panicked). Lets an async caller overlap a load with other work, for
    /// example importing the previous blocks into the engine, without blocking its
    /// executor.
    pub(crate) fn load_blocks_background(
        &self,
        model_fingerprint: &str,
        hashes: &[BlockHash],
    ) -> oneshot::Receiver<Vec<Arc<KvBlock>>> {
        let (tx, rx) = oneshot::channel();
        let inner = Arc::clone(&self.inner);
        let (fp, hashes, threads) = (
            model_fingerprint.to_owned(),
            hashes.to_vec(),
            self.read_threads,
        );
        let spawned = std::thread::Builder::new()
            .name("kv-load".into())
            .spawn(move || {
                let _ = tx.send(inner.load_blocks(&fp, &hashes, threads));
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start a block load thread: cache miss");
        }
        rx
    }

    /// Creates or replaces an agent's manifest (atomic, durable, synchronous).
    pub fn save_manifest_blocking(&self, manifest: &AgentManifest) -> Result<(), DiskStoreError> {
        let key = key_of(manifest);
        let invalid = |reason: String| DiskStoreError::InvalidManifest {
            name: key.to_string(),
            reason,
        };
        if manifest.version != AgentManifest::VERSION {
            return Err(invalid(format!("version {}", manifest.version)));
        }
        let blocks = parse_hashes(manifest).map_err(invalid)?;
        let (dir, name) = self.inner.layout.manifest_location(&key)?;
        fsutil::ensure_private_dir(&dir, true)?;
        let bytes = serde_json::to_vec_pretty(manifest)?;
        fsutil::write_atomic(&dir, &name, &bytes)?;
        self.inner
            .lock()
            .manifests
            .insert(key, ManifestRefs::of(manifest, blocks));
        Ok(())
    }

    /// An agent's manifest, if there is a valid one (an invalid file is logged and reads as
    /// none).
    pub fn load_manifest_blocking(
        &self,
        key: &AgentKey,
    ) -> Result<Option<AgentManifest>, DiskStoreError> {
        let (dir, name) = self.inner.layout.manifest_location(key)?;
        let path = dir.join(name);
        match self.inner.read_manifest(&path, Some(key), None) {
            Ok(found) => Ok(found.map(|(m, _)| m)),
            Err(reason) => {
                warn!(path = %path.display(), reason, "invalid manifest: treated as absent");
                Ok(None)
            }
        }
    }

    /// Deletes an agent's manifest (valid or not) and the block files that no other
    /// manifest references. True if a manifest file existed.
    pub fn delete_manifest_blocking(&self, key: &AgentKey) -> Result<bool, DiskStoreError> {
        let (dir, name) = self.inner.layout.manifest_location(key)?;
        let path = dir.join(name);
        let existed = match fs::remove_file(&path) {
            Ok(()) => {
                fsutil::sync_dir(&dir)?;
                true
            }
            Err(e) if e.kind() == ErrorKind::NotFound => false,
            Err(e) => return Err(DiskStoreError::io(path, e)),
        };
        let orphans: Vec<BlockHash> = {
            let mut st = self.inner.lock();
            let Some(refs) = st.manifests.remove(key) else {
                return Ok(existed);
            };
            let still_used: HashSet<BlockHash> = st
                .manifests
                .values()
                .flat_map(|m| m.blocks.iter().copied())
                .collect();
            let orphans: Vec<BlockHash> = refs
                .blocks
                .into_iter()
                .filter(|h| !still_used.contains(h) && !st.pending.contains_key(h))
                .collect::<HashSet<_>>()
                .into_iter()
                .filter(|h| st.remove_block(h))
                .collect();
            orphans
        };
        if !orphans.is_empty() {
            self.send(Job::Delete(orphans))?;
        }
        Ok(existed)
    }

    /// Every valid manifest of a namespace (`None`: all namespaces), sorted by namespace and
    /// agent. Invalid manifest files are logged and skipped.
    pub fn list_manifests_blocking(
        &self,
        namespace: Option<&Namespace>,
    ) -> Result<Vec<AgentManifest>, DiskStoreError> {
        Ok(self
            .inner
            .scan_manifests(namespace)?
            .into_iter()
            .map(|(m, _)| m)
            .collect())
    }

    /// Counters and sizes. `blocks` and `bytes` count block files on disk plus blocks still
    /// queued for writing (their payload bytes).
    pub fn stats_blocking(&self) -> StoreStats {
        let st = self.inner.lock();
        let c = &self.inner.counters;
        let pending_bytes: u64 = st
            .pending
            .values()
            .map(|b| b.payload.byte_len() as u64)
            .sum();
        StoreStats {
            blocks: (st.index.len() + st.pending.len()) as u64,
            bytes: st.disk_bytes.saturating_add(pending_bytes),
            agents: st.manifests.len() as u64,
            blocks_written: c.blocks_written.load(Ordering::Relaxed),
            blocks_read: c.blocks_read.load(Ordering::Relaxed),
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            quarantined: c.quarantined.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
            write_errors: c.write_errors.load(Ordering::Relaxed),
            remote: None,
        }
    }

    /// The exact bytes of a block's file, or `None` when the store has no such block (a
    /// block still waiting for the writer is written first: this waits for a flush, since
    /// two encodings of a block may order the header differently). Not verified: the
    /// object-store tier uploads these bytes, and every reader verifies what it reads.
    pub fn block_file_bytes_blocking(
        &self,
        hash: &BlockHash,
    ) -> Result<Option<Vec<u8>>, DiskStoreError> {
        if self.inner.lock().pending.contains_key(hash) {
            self.flush_blocking()?;
        }
        let path = self.inner.layout.block_path(hash);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DiskStoreError::io(path, e)),
        }
    }

    /// Stores a block whose file bytes came from elsewhere (the object-store tier's
    /// download), byte for byte: `bytes` must be a file that [`crate::decode_block`]
    /// accepted as `block` (every later read verifies it again). Written by the background
    /// writer like any block and readable at once. Returns false when the block was
    /// already stored or queued.
    pub fn adopt_block_file_blocking(
        &self,
        block: Arc<KvBlock>,
        bytes: Vec<u8>,
    ) -> Result<bool, DiskStoreError> {
        let hash = block.meta.hash;
        {
            let mut st = self.inner.lock();
            if st.pending.contains_key(&hash) || st.index.contains_key(&hash) {
                return Ok(false);
            }
            st.pending.insert(hash, Arc::clone(&block));
        }
        if let Err(e) = self.send(Job::Write(block, Some(bytes))) {
            self.inner.lock().pending.remove(&hash);
            return Err(e);
        }
        Ok(true)
    }

    /// Keeps the bytes of a bad block that came from elsewhere (a download that failed
    /// verification) in `quarantine/`, like a local bad file, and counts it as quarantined.
    pub fn quarantine_bytes_blocking(&self, hash: &BlockHash, bytes: &[u8]) {
        let q = &self.inner.layout.quarantine;
        let name = format!("{}-{}.{BLOCK_EXTENSION}", hash, now_nanos());
        match fsutil::ensure_private_dir(q, true)
            .and_then(|()| fsutil::write_atomic(q, &name, bytes))
        {
            Ok(()) => {
                warn!(block = %hash, to = %q.join(&name).display(), "downloaded block quarantined")
            }
            Err(e) => warn!(block = %hash, error = %e, "could not keep a bad downloaded block"),
        }
        bump(&self.inner.counters.quarantined, 1);
        self.inner.trim_quarantine();
    }

    /// Queues a flush marker; the receiver completes once everything queued before is
    /// durable (written, fsynced, renamed, directory fsynced) or has failed and been logged.
    pub(crate) fn flush_request(&self) -> Result<oneshot::Receiver<()>, DiskStoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Job::Flush(tx))?;
        Ok(rx)
    }

    /// Waits until every accepted block write is durable.
    pub fn flush_blocking(&self) -> Result<(), DiskStoreError> {
        let rx = self.flush_request()?;
        futures::executor::block_on(rx).map_err(|_| DiskStoreError::WriterStopped)
    }
}

impl Drop for DiskCacheStore {
    /// Closes the queue and waits for the writer to drain it (every queued block is written).
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                warn!("the block writer thread panicked; queued blocks may be lost");
            }
        }
    }
}

/// Indexes `blocks/`: canonical `<hash>.safetensors` files (recency = mtime); stale
/// temporary files are removed; anything else is ignored.
fn scan_blocks(dir: &Path, state: &mut State) -> Result<(), DiskStoreError> {
    let entries = fs::read_dir(dir).map_err(|e| DiskStoreError::io(dir, e))?;
    let suffix = format!(".{BLOCK_EXTENSION}");
    for entry in entries {
        let entry = entry.map_err(|e| DiskStoreError::io(dir, e))?;
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if fsutil::is_temp_name(name) {
            fsutil::remove_if_stale(&path, TEMP_FILE_MAX_AGE);
            continue;
        }
        let Some(hash) = name.strip_suffix(&suffix).and_then(|stem| {
            BlockHash::from_str(stem)
                .ok()
                .filter(|h| h.to_string() == stem)
        }) else {
            debug!(path = %path.display(), "ignoring a file that is not a block");
            continue;
        };
        let last_use = mtime_nanos(&meta);
        state.clock = state.clock.max(last_use);
        state.insert_block(hash, meta.len(), last_use);
    }
    Ok(())
}
