//! Stamp files: the inputs a generated artefact was made from, as `key = value` lines.
//!
//! A step is skipped when the stamp on disk equals the stamp of the current inputs, and
//! redone (with a message naming what changed) when any input differs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;

use crate::util;

/// The inputs of one generated artefact, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stamp {
    entries: BTreeMap<String, String>,
}

impl Stamp {
    /// An empty stamp.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) one input. Line breaks in the value are flattened to spaces.
    pub fn with(mut self, key: &str, value: impl AsRef<str>) -> Self {
        let value = value.as_ref().replace(['\n', '\r'], " ");
        self.entries
            .insert(key.trim().to_owned(), value.trim().to_owned());
        self
    }

    /// The text written to disk: a comment line, then `key = value` lines.
    pub fn render(&self) -> String {
        let mut text =
            String::from("# written by `cargo xtask setup`; delete to force a rebuild\n");
        for (key, value) in &self.entries {
            let _ = writeln!(text, "{key} = {value}");
        }
        text
    }

    /// Parse [`Stamp::render`]'s output; comments, blank and malformed lines are ignored.
    pub fn parse(text: &str) -> Self {
        let entries = text
            .lines()
            .filter(|line| !line.trim_start().starts_with('#'))
            .filter_map(|line| line.split_once(" = "))
            .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
            .collect();
        Self { entries }
    }

    /// The stamp stored at `path`, or `None` when there is none (or it is unreadable).
    pub fn read(path: &Path) -> Option<Self> {
        std::fs::read_to_string(path)
            .ok()
            .map(|text| Self::parse(&text))
    }

    /// Store the stamp at `path` atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        util::write_atomic(path, self.render().as_bytes())
    }

    /// What differs from `old`, one human-readable item per changed key
    /// (empty when the stamps are equal).
    pub fn changes_since(&self, old: &Stamp) -> Vec<String> {
        let mut keys: Vec<&String> = self.entries.keys().chain(old.entries.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter_map(|key| {
                let new = self.entries.get(key);
                let before = old.entries.get(key);
                (new != before).then(|| {
                    format!(
                        "{key}: {} -> {}",
                        before.map_or("(none)", String::as_str),
                        new.map_or("(none)", String::as_str)
                    )
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stamp {
        Stamp::new()
            .with("mlx", "0.32.2")
            .with("mlx-sys", "0.7.0")
            .with("blas", "openblas")
    }

    #[test]
    fn render_then_parse_round_trips() {
        let stamp = sample().with("path", "/a b/c = d");
        assert_eq!(Stamp::parse(&stamp.render()), stamp);
    }

    #[test]
    fn equal_inputs_have_no_changes() {
        assert!(sample().changes_since(&sample()).is_empty());
    }

    #[test]
    fn a_version_bump_is_a_change() {
        let old = sample();
        let new = sample().with("mlx", "0.33.0");
        assert_eq!(new.changes_since(&old), ["mlx: 0.32.2 -> 0.33.0"]);
    }

    #[test]
    fn added_and_removed_keys_are_changes() {
        let old = sample();
        let new = sample().with("bindgen", "0.72.1");
        assert_eq!(new.changes_since(&old), ["bindgen: (none) -> 0.72.1"]);
        assert_eq!(old.changes_since(&new), ["bindgen: 0.72.1 -> (none)"]);
    }

    #[test]
    fn line_breaks_cannot_forge_entries() {
        let stamp = Stamp::new().with("a", "x\nb = y");
        assert_eq!(Stamp::parse(&stamp.render()), stamp);
        assert_eq!(
            stamp
                .changes_since(&Stamp::new().with("a", "x b = y"))
                .len(),
            0
        );
    }

    #[test]
    fn a_missing_or_empty_stamp_differs() {
        assert!(!sample().changes_since(&Stamp::parse("")).is_empty());
        assert_eq!(Stamp::read(Path::new("/nonexistent/xtask.stamp")), None);
    }
}
