//! The adapter's error type and its mapping onto the port's [`StoreError`].

use agent_session::StoreError;
use cache_store_disk::DiskStoreError;

/// Everything that can go wrong in the object-store tier.
///
/// Remote failures never reach the port's callers as errors: the tier marks the store
/// down and serves from RAM and the local disk. These variants are what opening the tier
/// and the local tier report.
#[derive(Debug, thiserror::Error)]
pub enum ObjectTierError {
    /// A setting of the object store is missing or invalid.
    #[error("object store configuration: {0}")]
    Config(String),
    /// The object-store client could not be built.
    #[error("object store client: {0}")]
    Client(#[from] object_store::Error),
    /// The local tier failed.
    #[error(transparent)]
    Local(#[from] DiskStoreError),
    /// The tier's runtime or its state file could not be set up.
    #[error("object tier I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<ObjectTierError> for StoreError {
    fn from(e: ObjectTierError) -> Self {
        match e {
            ObjectTierError::Local(e) => e.into(),
            ObjectTierError::Config(_) => StoreError::Invalid(e.to_string()),
            ObjectTierError::Client(_) | ObjectTierError::Io(_) => StoreError::Io(e.to_string()),
        }
    }
}
