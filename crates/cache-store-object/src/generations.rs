//! Manifest generations: what this replica last wrote or read for each agent, and what of
//! it reached the object store.
//!
//! A manifest's generation counts its agent's turns across every replica: a replica writes
//! the generation it knows plus one, and the uploader refuses to replace a remote manifest
//! whose generation is at least as high (a stale replica never overwrites a newer turn).
//! The table is kept in `<cache_dir>/object-tier/generations.json` (atomic writes), so a
//! restarted replica still knows which of its turns were never uploaded and sends them when
//! the store is reachable.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Name of the tier's directory under the cache directory.
pub const TIER_DIR: &str = "object-tier";
/// Name of the generation table in [`TIER_DIR`].
pub const GENERATIONS_FILE: &str = "generations.json";

/// One agent's generations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    /// The generation of the manifest this replica last wrote or adopted.
    pub current: u64,
    /// The highest generation known to be in the object store (uploaded by this replica
    /// or read from it).
    pub uploaded: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    agents: BTreeMap<String, Generation>,
}

/// The table, by agent name ([`crate::keys::Keys::agent_name`]).
#[derive(Debug)]
pub struct Generations {
    path: Option<PathBuf>,
    agents: BTreeMap<String, Generation>,
}

impl Generations {
    /// Loads the table of `cache_dir` (a missing or unreadable file is an empty table,
    /// logged: every agent then starts from what the object store says).
    pub fn open(cache_dir: &Path) -> std::io::Result<Self> {
        let dir = cache_dir.join(TIER_DIR);
        fs::create_dir_all(&dir)?;
        let path = dir.join(GENERATIONS_FILE);
        let agents = match fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<File>(&bytes) {
                Ok(f) => f.agents,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable generation table: starting empty");
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        Ok(Self {
            path: Some(path),
            agents,
        })
    }

    /// A table that is never written (tests).
    pub fn in_memory() -> Self {
        Self {
            path: None,
            agents: BTreeMap::new(),
        }
    }

    /// An agent's generations (zero when unknown).
    pub fn get(&self, agent: &str) -> Generation {
        self.agents.get(agent).copied().unwrap_or_default()
    }

    /// Agents with a turn that never reached the object store.
    pub fn not_uploaded(&self) -> Vec<(String, Generation)> {
        self.agents
            .iter()
            .filter(|(_, g)| g.uploaded < g.current)
            .map(|(a, g)| (a.clone(), *g))
            .collect()
    }

    /// Records a new local turn: returns its generation (the known one plus one).
    pub fn next(&mut self, agent: &str) -> u64 {
        let g = self.agents.entry(agent.to_owned()).or_default();
        g.current = g.current.max(g.uploaded) + 1;
        let current = g.current;
        self.save();
        current
    }

    /// Records that `generation` is in the object store (uploaded or read from it); a
    /// higher remote generation also becomes the current one.
    pub fn seen_remote(&mut self, agent: &str, generation: u64) {
        let g = self.agents.entry(agent.to_owned()).or_default();
        let before = *g;
        g.uploaded = g.uploaded.max(generation);
        g.current = g.current.max(generation);
        // Read on every turn (the manifest GET): the file is written only when it changes.
        if *g != before {
            self.save();
        }
    }

    /// Forgets an agent (deleted).
    pub fn remove(&mut self, agent: &str) {
        if self.agents.remove(agent).is_some() {
            self.save();
        }
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let file = File {
            version: 1,
            agents: self.agents.clone(),
        };
        if let Err(e) = write_atomic(path, &file) {
            tracing::warn!(path = %path.display(), error = %e, "cannot save the generation table");
        }
    }
}

fn write_atomic(path: &Path, file: &File) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(file).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.partial");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_count_up_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut g = Generations::open(dir.path()).expect("open");
            assert_eq!(g.next("a"), 1);
            assert_eq!(g.next("a"), 2);
            g.seen_remote("a", 1);
            assert_eq!(
                g.not_uploaded(),
                vec![(
                    "a".into(),
                    Generation {
                        current: 2,
                        uploaded: 1
                    }
                )]
            );
        }
        let mut g = Generations::open(dir.path()).expect("reopen");
        assert_eq!(
            g.get("a"),
            Generation {
                current: 2,
                uploaded: 1
            }
        );
        // A newer remote turn (another replica) moves the current generation past it.
        g.seen_remote("a", 7);
        assert_eq!(g.next("a"), 8);
        g.remove("a");
        assert_eq!(g.get("a"), Generation::default());
    }

    #[test]
    fn an_unreadable_table_starts_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join(TIER_DIR)).expect("mkdir");
        fs::write(
            dir.path().join(TIER_DIR).join(GENERATIONS_FILE),
            b"{not json",
        )
        .expect("write");
        let g = Generations::open(dir.path()).expect("open");
        assert_eq!(g.get("a"), Generation::default());
    }
}
