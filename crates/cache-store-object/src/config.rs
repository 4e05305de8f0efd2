//! Settings of the tier and the S3-compatible client built from them.

use crate::error::ObjectTierError;
use object_store::aws::AmazonS3Builder;
use object_store::{ClientOptions, ObjectStore, RetryConfig};
use std::sync::Arc;
use std::time::Duration;

/// How the tier talks to the object store and how patient it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectTierConfig {
    /// Key prefix inside the bucket (empty: the bucket's root). Replicas that share a warm
    /// tier use the same bucket and prefix.
    pub prefix: String,
    /// Longest wait for one remote read on a turn's path (a manifest GET, the HEADs of a
    /// prefix, one block GET); beyond it the store counts as down and the turn goes on from
    /// RAM and the local disk.
    pub read_timeout: Duration,
    /// Longest wait for one upload (a block is megabytes).
    pub upload_timeout: Duration,
    /// While the store is down, how often the uploader asks whether it is back.
    pub probe_interval: Duration,
    /// Longest a `flush` waits for queued uploads (shutdown must not hang on a dead store).
    pub flush_timeout: Duration,
    /// Blocks downloaded (or checked with HEAD) at once.
    pub concurrency: usize,
}

impl Default for ObjectTierConfig {
    /// No prefix, 2 s reads, 60 s uploads, a probe every 2 s, 30 s flush, 4 at once.
    fn default() -> Self {
        Self {
            prefix: String::new(),
            read_timeout: Duration::from_secs(2),
            upload_timeout: Duration::from_secs(60),
            probe_interval: Duration::from_secs(2),
            flush_timeout: Duration::from_secs(30),
            concurrency: 4,
        }
    }
}

/// Where the S3-compatible store is. Credentials come from the usual AWS variables
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, …)
/// unless given here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// Endpoint URL (`http://127.0.0.1:9000`, `https://s3.example.com`); `None`: AWS itself
    /// (or `AWS_ENDPOINT_URL`).
    pub endpoint: Option<String>,
    /// Bucket name (required).
    pub bucket: String,
    /// Region (`None`: `AWS_REGION` or `us-east-1`).
    pub region: Option<String>,
    /// Access key id (`None`: from the environment).
    pub access_key_id: Option<String>,
    /// Secret access key (`None`: from the environment).
    pub secret_access_key: Option<String>,
}

/// Builds the S3 client: path-style requests (what self-hosted servers such as Garage,
/// MinIO or s3s-fs expect), plain HTTP allowed for an `http://` endpoint, and few fast
/// retries (the tier has its own outage handling: a store that does not answer is skipped,
/// not waited for).
pub fn build_s3(
    s: &S3Settings,
    cfg: &ObjectTierConfig,
) -> Result<Arc<dyn ObjectStore>, ObjectTierError> {
    if s.bucket.trim().is_empty() {
        return Err(ObjectTierError::Config("the bucket name is empty".into()));
    }
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(s.bucket.trim())
        .with_virtual_hosted_style_request(false);
    if let Some(endpoint) = &s.endpoint {
        b = b.with_endpoint(endpoint.trim_end_matches('/'));
    }
    if let Some(region) = &s.region {
        b = b.with_region(region);
    } else if std::env::var_os("AWS_REGION").is_none()
        && std::env::var_os("AWS_DEFAULT_REGION").is_none()
    {
        b = b.with_region("us-east-1");
    }
    if let Some(id) = &s.access_key_id {
        b = b.with_access_key_id(id);
    }
    if let Some(secret) = &s.secret_access_key {
        b = b.with_secret_access_key(secret);
    }
    let retry = RetryConfig {
        max_retries: 2,
        retry_timeout: cfg.read_timeout,
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
        },
    };
    // The client options replace the builder's, so plain HTTP is allowed here.
    let options = ClientOptions::new()
        .with_allow_http(
            s.endpoint
                .as_deref()
                .is_some_and(|e| e.starts_with("http://")),
        )
        .with_connect_timeout(cfg.read_timeout.min(Duration::from_secs(2)))
        .with_timeout(cfg.upload_timeout);
    let store = b.with_retry(retry).with_client_options(options).build()?;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_required() {
        let err = build_s3(&S3Settings::default(), &ObjectTierConfig::default())
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("object store configuration: the bucket name is empty")
        );
    }

    #[test]
    fn a_local_endpoint_builds_without_contacting_it() {
        let s = S3Settings {
            endpoint: Some("http://127.0.0.1:9/".into()),
            bucket: "kv".into(),
            access_key_id: Some("id".into()),
            secret_access_key: Some("secret".into()),
            ..S3Settings::default()
        };
        assert!(build_s3(&s, &ObjectTierConfig::default()).is_ok());
    }
}
