//! Agent identity: validated agent ids and cache namespaces.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest accepted agent id, in bytes. Stores must persist every valid id (the disk store
/// names manifest files by a digest of the id, never by the id itself, so the length of an
/// id never meets a file-name limit).
pub const MAX_AGENT_ID_LEN: usize = 512;

/// Why a string is not a valid [`AgentId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentIdError {
    /// The id is empty.
    #[error("agent id is empty")]
    Empty,
    /// The id is longer than [`MAX_AGENT_ID_LEN`].
    #[error("agent id is {0} bytes long; at most {MAX_AGENT_ID_LEN} are allowed")]
    TooLong(usize),
    /// The id is `.` or `..`, which would name a directory.
    #[error("agent id may not be '.' or '..'")]
    DotName,
    /// The id holds a character outside `[A-Za-z0-9_.-]`.
    #[error("agent id holds {0:?}; only A-Z, a-z, 0-9, '_', '.' and '-' are allowed")]
    BadChar(char),
}

/// An agent's id: `[A-Za-z0-9_.-]{1,512}`, never `.` or `..`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AgentId(String);

impl AgentId {
    /// Validates and wraps an agent id.
    pub fn new(id: impl Into<String>) -> Result<Self, AgentIdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(AgentIdError::Empty);
        }
        if id.len() > MAX_AGENT_ID_LEN {
            return Err(AgentIdError::TooLong(id.len()));
        }
        if id == "." || id == ".." {
            return Err(AgentIdError::DotName);
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
        {
            return Err(AgentIdError::BadChar(c));
        }
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for AgentId {
    type Error = AgentIdError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<AgentId> for String {
    fn from(value: AgentId) -> Self {
        value.0
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for AgentId {
    type Err = AgentIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A cache namespace (one per API key / tenant): blocks are never shared across namespaces.
/// The empty namespace is the default (no authentication).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Namespace(pub String);

impl Namespace {
    /// The namespace as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// An agent within its namespace: the key of sessions and manifests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AgentKey {
    /// The tenant the agent belongs to.
    pub namespace: Namespace,
    /// The agent's id.
    pub agent: AgentId,
}

impl fmt::Display for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.0.is_empty() {
            write!(f, "{}", self.agent)
        } else {
            write!(f, "{}/{}", self.namespace.0, self.agent)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_and_rejects() {
        assert!(AgentId::new("coder-1.v2_x").is_ok());
        assert_eq!(AgentId::new(""), Err(AgentIdError::Empty));
        assert_eq!(AgentId::new(".."), Err(AgentIdError::DotName));
        assert_eq!(AgentId::new("."), Err(AgentIdError::DotName));
        assert_eq!(AgentId::new("a/b"), Err(AgentIdError::BadChar('/')));
        assert_eq!(AgentId::new("a\\b"), Err(AgentIdError::BadChar('\\')));
        assert_eq!(AgentId::new("a\0b"), Err(AgentIdError::BadChar('\0')));
        assert_eq!(
            AgentId::new("x".repeat(513)),
            Err(AgentIdError::TooLong(513))
        );
        assert!(AgentId::new("x".repeat(512)).is_ok());
    }

    proptest! {
        #[test]
        fn valid_ids_are_safe_file_names(s in "\\PC{0,600}") {
            if let Ok(id) = AgentId::new(s) {
                prop_assert!(!id.as_str().contains(['/', '\\', '\0']));
                prop_assert!(id.as_str() != "." && id.as_str() != "..");
            }
        }
    }
}
