//! Deterministic prompt text and prompts of an exact token count.
//!
//! Text is a seeded stream of common English words, so every run and every agent gets its
//! own text (no accidental prefix sharing between measurements) and every server gets the
//! same text for the same seed. Lengths are fitted with our server's
//! `POST /v1/messages/count_tokens` (the same tokenizer and chat template as the GGUF the
//! peers load).

use anyhow::{bail, Result};

use super::client::{Client, Message};

const WORDS: &[&str] = &[
    "the",
    "system",
    "agent",
    "reads",
    "a",
    "file",
    "and",
    "writes",
    "report",
    "about",
    "data",
    "model",
    "cache",
    "memory",
    "block",
    "token",
    "server",
    "request",
    "answer",
    "question",
    "small",
    "large",
    "quick",
    "careful",
    "review",
    "change",
    "test",
    "build",
    "error",
    "value",
    "table",
    "river",
    "mountain",
    "city",
    "history",
    "music",
    "garden",
    "window",
    "light",
    "paper",
    "every",
    "morning",
    "people",
    "work",
    "together",
    "under",
    "over",
    "before",
    "after",
    "during",
    "simple",
    "complex",
    "function",
    "module",
    "library",
    "network",
    "packet",
    "storage",
    "disk",
    "record",
    "update",
    "delete",
    "insert",
    "search",
    "result",
    "number",
    "string",
    "list",
    "map",
    "tree",
    "graph",
    "node",
    "edge",
    "path",
    "route",
    "plan",
    "step",
    "task",
    "goal",
    "team",
    "project",
    "issue",
    "comment",
    "line",
    "code",
    "review",
    "merge",
    "branch",
    "commit",
    "green",
    "blue",
    "red",
    "yellow",
    "winter",
    "summer",
    "spring",
    "autumn",
    "ocean",
    "forest",
    "teacher",
    "student",
    "book",
    "chapter",
    "story",
    "letter",
    "word",
    "sentence",
    "idea",
    "problem",
    "solution",
    "method",
    "process",
    "energy",
    "water",
    "stone",
    "bridge",
    "road",
    "market",
    "price",
    "trade",
    "money",
    "bank",
    "office",
    "room",
    "door",
    "table",
    "chair",
    "because",
    "while",
    "when",
    "where",
    "which",
    "should",
    "could",
    "would",
    "might",
    "will",
    "is",
    "was",
    "are",
    "has",
    "had",
    "does",
    "did",
    "makes",
    "takes",
    "gives",
    "finds",
    "keeps",
    "new",
    "old",
    "first",
    "last",
    "next",
    "other",
    "same",
    "different",
    "important",
    "useful",
];

/// A small seeded generator (splitmix64): the same seed gives the same text everywhere.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `n` words of text for `seed`, as sentences (a capital first word, a period every 8–15
/// words), starting with `tag` so that texts of different seeds differ from the first token.
pub fn words(seed: u64, tag: &str, n: usize) -> String {
    let mut rng = Rng::new(seed);
    let mut out = String::with_capacity(n * 7 + tag.len());
    out.push_str(tag);
    let mut in_sentence = 0u64;
    let mut sentence_len = 8 + rng.next_u64() % 8;
    for _ in 0..n {
        let idx = usize::try_from(rng.next_u64() % WORDS.len() as u64).unwrap_or(0);
        let word = WORDS.get(idx).copied().unwrap_or("the");
        if !out.is_empty() {
            out.push(' ');
        }
        if in_sentence == 0 {
            let mut chars = word.chars();
            if let Some(c) = chars.next() {
                out.extend(c.to_uppercase());
                out.push_str(chars.as_str());
            }
        } else {
            out.push_str(word);
        }
        in_sentence += 1;
        if in_sentence >= sentence_len {
            out.push('.');
            in_sentence = 0;
            sentence_len = 8 + rng.next_u64() % 8;
        }
    }
    out
}

/// A conversation whose prompt is exactly `target` tokens: `before` followed by a user
/// message of seeded words (and single-token padding), fitted with count_tokens. Returns
/// the messages and the length reached (equal to `target` unless the target is shorter
/// than `before` plus the template's own tokens).
pub fn fit(
    client: &Client,
    before: &[Message],
    target: u64,
    seed: u64,
    tag: &str,
) -> Result<(Vec<Message>, u64)> {
    let build = |n: usize, pad: usize| -> Vec<Message> {
        let mut text = words(seed, tag, n);
        for _ in 0..pad {
            text.push_str(" x");
        }
        let mut msgs = before.to_vec();
        msgs.push(Message::user(text));
        msgs
    };
    let base = client.count_tokens(&build(0, 0))?;
    if base >= target {
        let msgs = build(0, 0);
        return Ok((msgs, base));
    }
    // Words are about 1.1 tokens each here; converge on the largest count not above target.
    let mut n = usize::try_from((target - base) * 9 / 10).unwrap_or(0);
    let mut best: Option<(usize, u64)> = None;
    for _ in 0..12 {
        let count = client.count_tokens(&build(n, 0))?;
        if count <= target && best.is_none_or(|(_, c)| count > c) {
            best = Some((n, count));
        }
        if count == target {
            break;
        }
        let diff = i64::try_from(target).unwrap_or(i64::MAX) - i64::try_from(count).unwrap_or(0);
        let step = if diff > 0 {
            (diff * 9 / 10).max(1)
        } else {
            (diff * 11 / 10).min(-1)
        };
        let next = i64::try_from(n).unwrap_or(0) + step;
        n = usize::try_from(next.max(0)).unwrap_or(0);
        if best.is_some_and(|(_, c)| target - c <= 3) && count > target {
            break;
        }
    }
    let Some((n, count)) = best else {
        bail!("could not fit a prompt of {target} tokens");
    };
    // Pad with " x" (one token each) up to the target.
    let mut pad = usize::try_from(target - count).unwrap_or(0);
    for _ in 0..6 {
        let msgs = build(n, pad);
        let count = client.count_tokens(&msgs)?;
        if count == target {
            return Ok((msgs, count));
        }
        if count < target {
            pad += usize::try_from(target - count).unwrap_or(1);
        } else {
            if pad == 0 {
                return Ok((msgs, count));
            }
            pad -= 1;
        }
    }
    let msgs = build(n, pad);
    let count = client.count_tokens(&msgs)?;
    Ok((msgs, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_deterministic_and_seed_dependent() {
        assert_eq!(words(7, "T:", 50), words(7, "T:", 50));
        assert_ne!(words(7, "", 50), words(8, "", 50));
        let t = words(1, "Run 3:", 40);
        assert!(t.starts_with("Run 3: "));
        assert_eq!(t.split_whitespace().count(), 42);
        assert!(t.contains('.'));
        assert_eq!(words(1, "", 0), "");
    }
}
