//! Sampling parameters of one request.

use serde::{Deserialize, Serialize};

/// How the next token is chosen. `temperature == 0` is greedy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: u32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// Seed for reproducible sampling; `None` draws one per request.
    pub seed: Option<u64>,
    /// Multiplicative penalty (> 1 discourages) on tokens already in the context (1 = off).
    pub repetition_penalty: f32,
    /// Subtracted from the logit of every token already generated (0 = off).
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a token already generated (0 = off).
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Greedy decoding: deterministic, the reference for warm == cold.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            min_p: 0.0,
            seed: None,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }

    /// True when the choice is the argmax of the (penalised) logits.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }
}
