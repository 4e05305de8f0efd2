//! Chained content hashes of blocks.

use std::fmt;
use std::str::FromStr;

use crate::PoolError;

/// blake3 key-derivation context: separates these hashes from any other use of blake3.
const CONTEXT: &str = "semantic block-pool BlockHash::chain v1";

/// Content hash of a full block: 32 bytes of blake3 over the parent's hash, the block's token
/// ids, the model fingerprint and a namespace.
///
/// Chaining the parent makes the hash identify the whole prefix up to and including this
/// block, so equal hashes mean equal prefixes (and equal KV). Displays as 64 lowercase hex
/// digits and parses back from them ([`FromStr`], either case).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash([u8; 32]);

fn put_len(hasher: &mut blake3::Hasher, len: usize) {
    // usize ≤ 64 bits on every supported target; saturation is unreachable.
    hasher.update(&u64::try_from(len).unwrap_or(u64::MAX).to_le_bytes());
}

impl BlockHash {
    /// Hash of a block holding `token_ids` after the prefix whose last block hashed to
    /// `parent` (`None` for the first block), for one model and namespace.
    ///
    /// Each field is length-prefixed (and the parent tagged present/absent), so no two
    /// different inputs encode the same byte stream.
    #[must_use]
    pub fn chain(
        parent: Option<&BlockHash>,
        token_ids: &[u32],
        model_fingerprint: &str,
        namespace: &str,
    ) -> BlockHash {
        let mut hasher = blake3::Hasher::new_derive_key(CONTEXT);
        match parent {
            None => {
                hasher.update(&[0]);
            }
            Some(p) => {
                hasher.update(&[1]);
                hasher.update(&p.0);
            }
        }
        put_len(&mut hasher, token_ids.len());
        let mut tokens = Vec::with_capacity(token_ids.len().saturating_mul(4));
        for t in token_ids {
            tokens.extend_from_slice(&t.to_le_bytes());
        }
        hasher.update(&tokens);
        put_len(&mut hasher, model_fingerprint.len());
        hasher.update(model_fingerprint.as_bytes());
        put_len(&mut hasher, namespace.len());
        hasher.update(namespace.as_bytes());
        BlockHash(*hasher.finalize().as_bytes())
    }

    /// Wraps 32 raw bytes (for example read from a manifest).
    #[must_use]
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The 32 raw bytes.
    #[must_use]
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({self})")
    }
}

impl FromStr for BlockHash {
    type Err = PoolError;

    fn from_str(s: &str) -> Result<Self, PoolError> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(PoolError::InvalidHash {
                reason: "expected 64 hex digits",
            });
        }
        let digit = |c: u8| -> Result<u8, PoolError> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(PoolError::InvalidHash {
                    reason: "non-hex character",
                }),
            }
        };
        let mut out = [0u8; 32];
        for (slot, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            if let [hi, lo] = pair {
                *slot = (digit(*hi)? << 4) | digit(*lo)?;
            }
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_round_trips() -> Result<(), PoolError> {
        let h = BlockHash::chain(None, &[1, 2, 3], "model", "ns");
        let s = h.to_string();
        assert_eq!(s.len(), 64);
        assert!(s
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(s.parse::<BlockHash>()?, h);
        assert_eq!(s.to_uppercase().parse::<BlockHash>()?, h);
        assert!("zz".parse::<BlockHash>().is_err());
        assert!(s.replace('a', "g").parse::<BlockHash>().is_err() || !s.contains('a'));
        Ok(())
    }

    #[test]
    fn fields_are_unambiguous() {
        // Moving bytes between fields must change the hash.
        let a = BlockHash::chain(None, &[], "ab", "c");
        let b = BlockHash::chain(None, &[], "a", "bc");
        assert_ne!(a, b);
        let root = BlockHash::chain(None, &[7], "m", "n");
        assert_ne!(BlockHash::chain(Some(&root), &[7], "m", "n"), root);
        assert_eq!(
            BlockHash::chain(Some(&root), &[8, 9], "m", "n"),
            BlockHash::chain(Some(&root), &[8, 9], "m", "n")
        );
    }
}
