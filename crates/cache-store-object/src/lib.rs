//! Cache store adapter: a shared object-store tier (S3-compatible) behind the local disk
//! store, so that replicas share the warm tier.
//!
//! [`ObjectTierStore`] implements [`agent_session::CacheStore`] over a
//! [`cache_store_disk::DiskCacheStore`] and an [`object_store::ObjectStore`]:
//!
//! - reads go RAM (the service's hot tier) → local disk → object store; a downloaded block
//!   is the same bytes as a local block file, verified by the disk store's
//!   [`cache_store_disk::decode_block`] (a bad one is quarantined and is a miss) and written
//!   into the local store;
//! - writes go to the local disk and are uploaded in the background: blocks under their
//!   hash (immutable: several writers are safe), manifests in an envelope with a generation
//!   (a stale replica never overwrites a newer turn; see [`generations`]);
//! - when the object store is down or slow, turns are served from RAM and the local disk,
//!   a warning is logged once, [`agent_session::StoreStats::remote`] says so, and the
//!   uploader catches up when the store answers again (also after a restart).
//!
//! Layout in the bucket: [`keys`].

mod config;
mod error;
pub mod generations;
pub mod keys;
mod port;
pub mod test_server;
mod tier;

pub use config::{build_s3, ObjectTierConfig, S3Settings};
pub use error::ObjectTierError;
pub use object_store;
pub use tier::{ManifestEnvelope, ObjectTierStore, MANIFEST_FORMAT};

#[cfg(test)]
mod tests;
