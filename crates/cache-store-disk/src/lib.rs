//! Cache store adapter: KV blocks and agent manifests on disk, verified on read.
//!
//! [`DiskCacheStore`] implements [`agent_session::CacheStore`]:
//!
//! - **blocks** are content-addressed files `blocks/<hash>.safetensors` (format and metadata
//!   keys: [`format`](mod@format)), written once and shared by every agent whose prefix contains them;
//! - **manifests** are `agents/[ns-<hash>/]a-<digest of the id>.json` ([`agent_session::AgentManifest`]
//!   as JSON);
//! - every write is atomic and durable (temp file, fsync, rename, directory fsync), files are
//!   0600 and directories 0700; block writes run on a background thread behind a bounded
//!   queue, and queued blocks are readable at once;
//! - every read is verified (format version, model fingerprint, checksum, declared shapes
//!   and byte lengths, hash chain); a bad block ends the loaded prefix (a cache miss) and
//!   its file is moved to `quarantine/`; nothing read from disk can panic the store or be
//!   returned unverified;
//! - an optional disk budget deletes least-recently-used blocks that no pinned manifest
//!   references.
//!
//! Write failures (disk full, permissions) are logged and the server continues without
//! persisting the affected blocks.

mod error;
pub mod format;
mod fsutil;
mod port;
mod prefault;
mod store;

pub use error::DiskStoreError;
pub use format::{decode_block, encode_block, read_block_file, FORMAT_NAME, FORMAT_VERSION};
pub use fsutil::{DIR_MODE, FILE_MODE};
pub use store::{
    block_file_name, cache_dir_from, default_cache_dir, manifest_file_name, namespace_dir_name,
    DiskCacheStore, DiskStoreConfig, AGENTS_DIR, BLOCKS_DIR, ENV_CACHE_DIR, ENV_SEMANTIC_HOME,
    MANIFEST_FILE_PREFIX, NAMESPACE_DIR_PREFIX, QUARANTINE_DIR, QUARANTINE_KEEP,
};
