//! The adapter's error type and its mapping onto the port's [`StoreError`].

use agent_session::{AgentIdError, StoreError};
use std::path::PathBuf;

/// Everything that can go wrong in the disk cache store.
///
/// Reads never surface corruption as an error to the port's callers: a bad block ends the
/// loaded prefix (a cache miss). These variants are what the internals and the blocking API
/// report; [`From<DiskStoreError> for StoreError`](StoreError) maps them at the port boundary.
#[derive(Debug, thiserror::Error)]
pub enum DiskStoreError {
    /// A file-system operation failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An agent id was rejected (see [`agent_session::AgentId`]).
    #[error("invalid agent id: {0}")]
    AgentId(#[from] AgentIdError),
    /// A manifest path would leave the agents directory (defence in depth behind `AgentId`).
    #[error("agent id {0:?} does not name a file inside the agents directory")]
    PathEscape(String),
    /// A block handed to `save_blocks` is inconsistent (bad tensor sizes, duplicate names, ...).
    #[error("invalid block {hash}: {reason}")]
    InvalidBlock {
        /// The block's hash (hex).
        hash: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A manifest handed to `save_manifest`, or found on disk, is invalid.
    #[error("invalid manifest {name}: {reason}")]
    InvalidManifest {
        /// The manifest's agent key or file name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A block file failed verification (unparseable, checksum mismatch, wrong hash, ...).
    #[error("corrupt block file: {0}")]
    Corrupt(String),
    /// A block file has another format version.
    #[error("block file format {found:?} is not the supported version {expected}")]
    Version {
        /// The format name and version found in the file.
        found: String,
        /// The supported version.
        expected: u32,
    },
    /// A block file belongs to another model fingerprint.
    #[error("block belongs to model fingerprint {found:?}, not {expected:?}")]
    ForeignModel {
        /// The fingerprint asked for.
        expected: String,
        /// The fingerprint in the file.
        found: String,
    },
    /// JSON (de)serialization of a manifest failed.
    #[error("manifest JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The background writer thread is gone (the store is shutting down).
    #[error("the background block writer stopped")]
    WriterStopped,
}

impl DiskStoreError {
    /// Wraps an I/O error with the path it happened on.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<DiskStoreError> for StoreError {
    fn from(e: DiskStoreError) -> Self {
        match e {
            DiskStoreError::AgentId(_)
            | DiskStoreError::PathEscape(_)
            | DiskStoreError::InvalidBlock { .. }
            | DiskStoreError::InvalidManifest { .. } => StoreError::Invalid(e.to_string()),
            DiskStoreError::Corrupt(_)
            | DiskStoreError::Version { .. }
            | DiskStoreError::ForeignModel { .. }
            | DiskStoreError::Json(_) => StoreError::Corrupt(e.to_string()),
            DiskStoreError::Io { .. } | DiskStoreError::WriterStopped => {
                StoreError::Io(e.to_string())
            }
        }
    }
}
