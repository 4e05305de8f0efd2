//! Streaming text: incremental detokenization that never splits a UTF-8 character, and
//! stop strings that may straddle streamed pieces.

use crate::ports::{ChatFormatter, FormatError};
use crate::TokenId;

/// Turns a growing list of token ids into text deltas. A delta is held back while the
/// decoded text ends in an incomplete character (U+FFFD), so streamed pieces are always
/// whole characters.
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<TokenId>,
    /// Bytes of text already emitted.
    emitted: usize,
}

impl IncrementalDecoder {
    /// A decoder with no tokens yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token; returns the new text, if a complete piece is available.
    pub fn push(
        &mut self,
        formatter: &dyn ChatFormatter,
        id: TokenId,
    ) -> Result<Option<String>, FormatError> {
        self.ids.push(id);
        let text = formatter.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        Ok(self.take_new(&text))
    }

    /// Whatever is still held back (at the end of generation).
    pub fn finish(&mut self, formatter: &dyn ChatFormatter) -> Result<Option<String>, FormatError> {
        let text = formatter.decode(&self.ids)?;
        Ok(self.take_new(&text))
    }

    fn take_new(&mut self, text: &str) -> Option<String> {
        if text.len() <= self.emitted || !text.is_char_boundary(self.emitted) {
            return None;
        }
        let new = text[self.emitted..].to_string();
        self.emitted = text.len();
        Some(new)
    }
}

/// Finds stop strings in streamed text. Text that could be the start of a stop string is held
/// back until it is known not to be one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What the matcher says about a piece of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopScan {
    /// Emit this text (may be empty) and go on.
    Continue(String),
    /// A stop string matched: emit this text (the part before it) and stop.
    Stopped {
        /// Text before the stop string.
        text: String,
        /// The stop string that matched.
        stop: String,
    },
}

impl StopMatcher {
    /// A matcher for these stop strings (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Scans a new piece of text.
    pub fn push(&mut self, piece: &str) -> StopScan {
        self.pending.push_str(piece);
        if self.stops.is_empty() {
            return StopScan::Continue(std::mem::take(&mut self.pending));
        }
        // The stop string completed first wins (the one generation reaches first, whatever
        // the pieces), and of those ending together the longest; earlier pushes found none.
        let mut first: Option<(usize, usize, &String)> = None;
        for s in &self.stops {
            if let Some(i) = self.pending.find(s.as_str()) {
                let end = i + s.len();
                if first.is_none_or(|(e, j, _)| (end, i) < (e, j)) {
                    first = Some((end, i, s));
                }
            }
        }
        if let Some((_, i, s)) = first {
            let stop = s.clone();
            let text = self.pending[..i].to_string();
            self.pending.clear();
            return StopScan::Stopped { text, stop };
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.pending.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopScan::Continue(out)
    }

    /// Text held back at the end of generation (no stop string matched).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn stop_across_pieces() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("hello ST"), StopScan::Continue("hello ".into()));
        assert_eq!(
            m.push("OP and more"),
            StopScan::Stopped {
                text: "".into(),
                stop: "STOP".into()
            }
        );
        let mut m = StopMatcher::new(&["STOP".to_string(), "TO".to_string()]);
        assert_eq!(
            m.push("aOSSTOP"),
            StopScan::Stopped {
                text: "aOSS".into(),
                stop: "TO".into()
            }
        );
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("ST"), StopScan::Continue("".into()));
        assert_eq!(m.push("AY"), StopScan::Continue("STAY".into()));
    }

    proptest! {
        /// Whatever the split, the emitted text is the text before the stop string that is
        /// complete first ("aOSSTOP" with stops "STOP" and "TO" stops at "TO").
        #[test]
        fn split_invariant(text in "[abS TOP]{0,40}", cuts in proptest::collection::vec(0usize..40, 0..6)) {
            let stops = vec!["STOP".to_string(), "TO".to_string()];
            // Generation stops when the first stop string is complete: the earliest end.
            let expected = {
                let first = stops
                    .iter()
                    .filter_map(|s| text.find(s.as_str()).map(|i| (i + s.len(), i)))
                    .min();
                first.map(|(_, i)| text[..i].to_string()).unwrap_or_else(|| text.clone())
            };
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.sort_unstable();
            let mut m = StopMatcher::new(&stops);
            let mut out = String::new();
            let mut prev = 0;
            let mut stopped = false;
            for c in cuts.into_iter().chain(std::iter::once(text.len())) {
                match m.push(&text[prev..c]) {
                    StopScan::Continue(t) => out.push_str(&t),
                    StopScan::Stopped { text: t, .. } => { out.push_str(&t); stopped = true; break; }
                }
                prev = c;
            }
            if !stopped { out.push_str(&m.finish()); }
            prop_assert_eq!(out, expected);
        }
    }
}
