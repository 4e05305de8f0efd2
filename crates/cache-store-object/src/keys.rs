//! Where things live in the bucket.
//!
//! ```text
//! <prefix>/blocks/<hash>.safetensors              the block file, byte for byte
//! <prefix>/agents/default/a-<digest>.json         a manifest envelope (default namespace)
//! <prefix>/agents/ns-<digest>/a-<digest>.json     a manifest envelope of an API key's namespace
//! ```
//!
//! Block hashes already include the namespace (`BlockHash::chain`), so namespaces never
//! share a block; manifest directories are the disk store's digests of the namespace and
//! of the agent id, so no API key or agent id appears in a key.

use agent_session::AgentKey;
use block_pool::BlockHash;
use cache_store_disk::{block_file_name, manifest_file_name, namespace_dir_name};
use object_store::path::Path;

/// Directory of the default namespace's manifests (`ns-<digest>` for the others).
pub const DEFAULT_NAMESPACE_DIR: &str = "default";

/// Object keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (slashes at either end are ignored; empty: the bucket's root).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.trim_matches('/').to_owned(),
        }
    }

    fn join(&self, rest: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.prefix))
        }
    }

    /// A block's object.
    pub fn block(&self, hash: &BlockHash) -> Path {
        self.join(&format!("blocks/{}", block_file_name(hash)))
    }

    /// An agent's manifest envelope.
    pub fn manifest(&self, key: &AgentKey) -> Path {
        self.join(&format!("agents/{}", Self::agent_name(key)))
    }

    /// `<namespace dir>/<manifest file>`: the agent's name in the bucket and in the tier's
    /// generation table.
    pub fn agent_name(key: &AgentKey) -> String {
        let ns = namespace_dir_name(&key.namespace).unwrap_or_else(|| DEFAULT_NAMESPACE_DIR.into());
        format!("{ns}/{}", manifest_file_name(&key.agent))
    }

    /// The object the reachability probe asks for (absent is fine: the store answered).
    pub fn probe(&self) -> Path {
        self.join("probe")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_session::{AgentId, Namespace};

    #[test]
    fn namespaces_get_separate_manifest_directories_without_the_key_in_the_name() {
        let keys = Keys::new("/team/semantic/");
        let agent = AgentId::new("agent-a").expect("valid id");
        let a = AgentKey {
            namespace: Namespace("sk-secret-one".into()),
            agent: agent.clone(),
        };
        let b = AgentKey {
            namespace: Namespace("sk-secret-two".into()),
            agent: agent.clone(),
        };
        let d = AgentKey {
            namespace: Namespace::default(),
            agent,
        };
        let (pa, pb, pd) = (keys.manifest(&a), keys.manifest(&b), keys.manifest(&d));
        assert_ne!(pa, pb);
        assert!(pd.as_ref().starts_with("team/semantic/agents/default/a-"));
        for p in [&pa, &pb, &pd] {
            assert!(!p.as_ref().contains("secret"), "{p}");
            assert!(!p.as_ref().contains("agent-a"), "{p}");
        }
    }

    #[test]
    fn blocks_are_named_by_their_hash() {
        let h = BlockHash::chain(None, &[1, 2, 3], "fp", "");
        assert_eq!(
            Keys::new("").block(&h).as_ref(),
            format!("blocks/{h}.safetensors")
        );
    }
}
