//! Tokenizer and chat template of the loaded model: the [`ChatFormatter`] port.
//!
//! The tokenizer is built with the `tokenizers` crate, from GGUF metadata (byte-level BPE:
//! `tokenizer.ggml.tokens`, `merges`, `token_type`, the `tokenizer.ggml.pre` pre-tokenizer;
//! or SentencePiece, `tokenizer.ggml.model` `llama`: see [`sentencepiece_from_gguf`])
//! or from a `tokenizer.json`. The chat template (`tokenizer.chat_template` or
//! `tokenizer_config.json`'s `chat_template`) is rendered with minijinja plus the
//! Python-compat string/dict methods, `raise_exception`, `strftime_now` and `tojson`.

use crate::error::{Error, Result};
use crate::gguf::GgufHeader;
use agent_session::{ChatFormatter, Conversation, FormatError, Role, TokenId};
use serde_json::{json, Value};
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Pre-tokenizers (`tokenizer.ggml.pre`) this crate can rebuild from GGUF metadata, for
/// byte-level BPE vocabularies (`tokenizer.ggml.model` `gpt2`): `default` / `gpt2` (GPT-2's
/// byte level), `smollm` (digits apart), `llama-bpe` / `llama3` (Llama 3's split),
/// `qwen2` and `deepseek-r1-qwen` (Qwen2's split: DeepSeek-R1-Distill-Qwen keeps Qwen's
/// vocabulary and regex). SentencePiece vocabularies (`llama`) need no pre-tokenizer.
pub const SUPPORTED_PRE_TOKENIZERS: &[&str] = &[
    "default",
    "gpt2",
    "smollm",
    "llama-bpe",
    "llama3",
    "qwen2",
    "deepseek-r1-qwen",
];

/// Llama 3's split regex.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// End-of-turn / end-of-text tokens that stop generation when the vocabulary has them.
const END_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<end_of_turn>",
    "<|end|>",
    "</s>",
];

/// A ChatML template used when a model ships none and its vocabulary has ChatML's tokens.
pub const FALLBACK_CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// The plain template of a model that ships none and has no ChatML tokens (a base model such
/// as Gemma 3 270M): BOS when the model wants one, the system text, then `User: …` and
/// `Assistant: …` lines, and `Assistant:` to answer.
pub const FALLBACK_PLAIN_TEMPLATE: &str = "{% if add_bos %}{{ bos_token }}{% endif %}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n' }}{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '\n' }}{% else %}{{ message['role'] + ': ' + message['content'] + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";

/// Tokenizer + chat template of one model.
pub struct MlxChatFormatter {
    tokenizer: Tokenizer,
    env: minijinja::Environment<'static>,
    template_source: String,
    supports_tools: bool,
    bos_token: String,
    eos_token: String,
    add_bos: bool,
    stop_ids: Vec<TokenId>,
    fingerprint: String,
}

impl std::fmt::Debug for MlxChatFormatter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlxChatFormatter")
            .field("vocab", &self.tokenizer.get_vocab_size(true))
            .field("stop_ids", &self.stop_ids)
            .field("supports_tools", &self.supports_tools)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn tok_err(path: &Path, reason: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Builds the byte-level BPE tokenizer described by GGUF metadata.
pub fn tokenizer_from_gguf(h: &GgufHeader) -> Result<Tokenizer> {
    let path = h.path.as_path();
    let model = h
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::MissingField {
            path: path.to_path_buf(),
            field: "tokenizer.ggml.model".into(),
        })?;
    if model == "llama" {
        return sentencepiece_from_gguf(h);
    }
    if model != "gpt2" {
        return Err(tok_err(
            path,
            format!(
                "tokenizer.ggml.model `{model}` is not supported from GGUF metadata (supported: \
                 gpt2 byte-level BPE, llama SentencePiece); use a model directory with \
                 tokenizer.json instead"
            ),
        ));
    }
    let tokens = gguf_strings(h, "tokenizer.ggml.tokens")?;
    let merges = gguf_strings(h, "tokenizer.ggml.merges")?;
    let types: Vec<u64> = match h
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
    {
        Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut pairs = Vec::with_capacity(merges.len());
    for (i, m) in merges.iter().enumerate() {
        let (a, b) = m.split_once(' ').ok_or_else(|| {
            tok_err(
                path,
                format!("tokenizer.ggml.merges[{i}] `{m}` has no space"),
            )
        })?;
        pairs.push((a.to_owned(), b.to_owned()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, pairs)
        .build()
        .map_err(|e| tok_err(path, e))?;
    let mut tok = Tokenizer::new(bpe);
    let pre = h
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let byte_level = ByteLevel::new(false, true, true);
    let split = |re: &str| -> Result<Split> {
        Split::new(
            SplitPattern::Regex(re.to_owned()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| tok_err(path, e))
    };
    match pre {
        "default" | "gpt2" => {
            tok.with_pre_tokenizer(Some(byte_level));
        }
        "smollm" => {
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])));
        }
        "llama-bpe" | "llama3" => {
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                split(LLAMA3_SPLIT)?.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
        }
        "qwen2" | "deepseek-r1-qwen" => {
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                split(QWEN2_SPLIT)?.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
        }
        other => {
            return Err(tok_err(
                path,
                format!(
                    "pre-tokenizer `{other}` (tokenizer.ggml.pre) is not supported (supported: {})",
                    SUPPORTED_PRE_TOKENIZERS.join(", ")
                ),
            ))
        }
    }
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
    add_typed_tokens(&mut tok, &tokens, &types);
    Ok(tok)
}

/// GGUF token types (`tokenizer.ggml.token_type`), as llama.cpp writes them.
mod token_type {
    pub const NORMAL: u64 = 1;
    pub const CONTROL: u64 = 3;
    pub const USER_DEFINED: u64 = 4;
}

/// The strings of a GGUF array field.
fn gguf_strings(h: &GgufHeader, key: &str) -> Result<Vec<String>> {
    let path = h.path.as_path();
    let arr = h
        .get(key)
        .ok_or_else(|| Error::MissingField {
            path: path.to_path_buf(),
            field: key.into(),
        })?
        .as_array()
        .ok_or_else(|| tok_err(path, format!("`{key}` is not an array")))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| tok_err(path, format!("`{key}` has a non-string entry")))
        })
        .collect()
}

/// Merges that make a score-driven SentencePiece BPE of `pieces`: for every normal piece,
/// each split into two pieces of the vocabulary, ordered by the merged piece's score (highest
/// first, then by id), and within one piece by the ids of its halves. Merging the
/// lowest-ranked pair first is then SentencePiece's (and llama.cpp's) rule of merging the
/// adjacent pair whose union scores highest.
fn sentencepiece_merges(pieces: &[String], scores: &[f32], types: &[u64]) -> Vec<(String, String)> {
    let ids: std::collections::HashMap<&str, usize> = pieces
        .iter()
        .enumerate()
        .filter(|(i, _)| types.get(*i).copied().unwrap_or(token_type::NORMAL) == token_type::NORMAL)
        .map(|(i, p)| (p.as_str(), i))
        .collect();
    let mut order: Vec<usize> = (0..pieces.len())
        .filter(|&i| types.get(i).copied().unwrap_or(token_type::NORMAL) == token_type::NORMAL)
        .collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (
            scores.get(a).copied().unwrap_or(0.0),
            scores.get(b).copied().unwrap_or(0.0),
        );
        sb.total_cmp(&sa).then(a.cmp(&b))
    });
    let mut merges = Vec::new();
    let mut local = Vec::new();
    for i in order {
        let piece = pieces[i].as_str();
        local.clear();
        for (at, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(at);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                local.push((li, ri));
            }
        }
        local.sort_unstable();
        merges.extend(
            local
                .iter()
                .map(|&(l, r)| (pieces[l].clone(), pieces[r].clone())),
        );
    }
    merges
}

/// A SentencePiece tokenizer from GGUF metadata (`tokenizer.ggml.model` `llama`: Gemma,
/// Llama 2, Mistral v0.1–0.3, Phi-3): the pieces, their scores and types, byte fallback to
/// `<0xNN>`, spaces as `▁`, a leading `▁` when `tokenizer.ggml.add_space_prefix` (default
/// true) says so. Control and user-defined pieces are matched in the text as special tokens,
/// as llama.cpp does; BOS is added by the chat template, not here.
pub fn sentencepiece_from_gguf(h: &GgufHeader) -> Result<Tokenizer> {
    use tokenizers::decoders::byte_fallback::ByteFallback;
    use tokenizers::decoders::fuse::Fuse;
    use tokenizers::decoders::sequence::Sequence as DecoderSequence;
    use tokenizers::decoders::strip::Strip;
    use tokenizers::normalizers::prepend::Prepend;
    use tokenizers::normalizers::replace::Replace;
    use tokenizers::normalizers::Sequence as NormalizerSequence;

    let path = h.path.as_path();
    let pieces = gguf_strings(h, "tokenizer.ggml.tokens")?;
    let scores: Vec<f32> = match h.get("tokenizer.ggml.scores").and_then(|v| v.as_array()) {
        Some(a) => a.iter().map(|v| v.as_f64().unwrap_or(0.0) as f32).collect(),
        None => {
            return Err(tok_err(
                path,
                "a SentencePiece vocabulary needs `tokenizer.ggml.scores`",
            ))
        }
    };
    let types: Vec<u64> = match h
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
    {
        Some(a) => a
            .iter()
            .map(|v| v.as_u64().unwrap_or(token_type::NORMAL))
            .collect(),
        None => vec![token_type::NORMAL; pieces.len()],
    };
    if scores.len() != pieces.len() || types.len() != pieces.len() {
        return Err(tok_err(
            path,
            format!(
                "{} tokens, {} scores and {} token types",
                pieces.len(),
                scores.len(),
                types.len()
            ),
        ));
    }
    let add_prefix = h
        .get("tokenizer.ggml.add_space_prefix")
        .and_then(|v| v.as_bool())
        .unwrap_or(true);
    let unk = h
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.as_u64())
        .and_then(|i| pieces.get(i as usize))
        .cloned();
    let vocab: tokenizers::models::bpe::Vocab = pieces
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = sentencepiece_merges(&pieces, &scores, &types);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(|e| tok_err(path, e))?;
    let mut tok = Tokenizer::new(bpe);
    let space = Replace::new(" ", "\u{2581}").map_err(|e| tok_err(path, e))?;
    if add_prefix {
        tok.with_normalizer(Some(NormalizerSequence::new(vec![
            Prepend::new("\u{2581}".into()).into(),
            space.into(),
        ])));
    } else {
        tok.with_normalizer(Some(space));
    }
    let mut decoders = vec![
        Replace::new("\u{2581}", " ")
            .map_err(|e| tok_err(path, e))?
            .into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    add_typed_tokens(&mut tok, &pieces, &types);
    Ok(tok)
}

/// Control pieces as special tokens and user-defined ones as added tokens: both are matched
/// whole in the text before the model splits it (llama.cpp's `parse_special`).
fn add_typed_tokens(tok: &mut Tokenizer, pieces: &[String], types: &[u64]) {
    let of = |ty: u64, special: bool| -> Vec<AddedToken> {
        pieces
            .iter()
            .zip(types)
            .filter(|(_, &t)| t == ty)
            .map(|(s, _)| AddedToken::from(s.clone(), special).normalized(false))
            .collect()
    };
    tok.add_special_tokens(&of(token_type::CONTROL, true));
    tok.add_tokens(&of(token_type::USER_DEFINED, false));
}

/// Special-token strings and stop ids of a model.
#[derive(Debug, Clone, Default)]
pub struct SpecialTokens {
    /// Beginning-of-sequence text (for templates).
    pub bos_token: String,
    /// End-of-sequence text (for templates).
    pub eos_token: String,
    /// Ids that end generation, besides the end-of-turn tokens found in the vocabulary.
    pub eos_ids: Vec<TokenId>,
    /// Whether a prompt starts with BOS (`tokenizer.ggml.add_bos_token`,
    /// `tokenizer_config.json`'s `add_bos_token`): used by the plain fallback template.
    pub add_bos: bool,
}

impl SpecialTokens {
    /// From GGUF metadata (`tokenizer.ggml.bos_token_id` / `eos_token_id`).
    pub fn from_gguf(h: &GgufHeader) -> Self {
        let tokens = h.get("tokenizer.ggml.tokens").and_then(|v| v.as_array());
        let text = |key: &str| -> (Option<u64>, String) {
            let id = h.get(key).and_then(|v| v.as_u64());
            let s = id
                .and_then(|i| tokens.and_then(|t| t.get(i as usize)))
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned();
            (id, s)
        };
        let (_, bos_token) = text("tokenizer.ggml.bos_token_id");
        let (eos_id, eos_token) = text("tokenizer.ggml.eos_token_id");
        let mut eos_ids: Vec<TokenId> = eos_id.map(|i| i as TokenId).into_iter().collect();
        if let Some(i) = h
            .get("tokenizer.ggml.eot_token_id")
            .and_then(|v| v.as_u64())
        {
            eos_ids.push(i as TokenId);
        }
        Self {
            bos_token,
            eos_token,
            eos_ids,
            add_bos: h
                .get("tokenizer.ggml.add_bos_token")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        }
    }
}

/// Renders `strftime` formats for `strftime_now` (UTC; common directives only).
fn strftime_utc(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 4).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
    ];
    let month = MONTHS[(m as usize).saturating_sub(1).min(11)];
    let day_name = DAYS[weekday];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(ch) = chars.next() {
        if ch != '%' {
            out.push(ch);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(other) => {
                    out.push_str("%-");
                    out.push(other);
                }
                None => out.push_str("%-"),
            },
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(day_name),
            Some('a') => out.push_str(&day_name[..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// The instruction added to the system prompt when tools are offered to a template that
/// does not render them.
pub fn tool_instruction(conversation: &Conversation) -> String {
    let mut s = String::from(
        "You can call tools. To call one, reply with only this, on one line: \
         <tool_call>{\"name\": \"<tool name>\", \"arguments\": {<arguments as JSON>}}</tool_call>\n\
         Available tools:\n",
    );
    for t in &conversation.tools {
        let line =
            json!({"name": t.name, "description": t.description, "parameters": t.parameters});
        s.push_str(&line.to_string());
        s.push('\n');
    }
    s
}

impl MlxChatFormatter {
    /// Builds a formatter from a tokenizer, a template and the special tokens.
    pub fn new(
        tokenizer: Tokenizer,
        template: Option<String>,
        special: SpecialTokens,
        source: &Path,
    ) -> Result<Self> {
        let template_source = template.unwrap_or_else(|| {
            if tokenizer.token_to_id("<|im_start|>").is_some() {
                tracing::warn!(path = %source.display(), "model has no chat template; using ChatML");
                FALLBACK_CHATML_TEMPLATE.to_owned()
            } else {
                tracing::warn!(
                    path = %source.display(),
                    "model has no chat template and no ChatML tokens (a base model?); using the \
                     plain `User:` / `Assistant:` fallback"
                );
                FALLBACK_PLAIN_TEMPLATE.to_owned()
            }
        });
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| strftime_utc(&fmt));
        env.add_template_owned("chat", template_source.clone())
            .map_err(|e| Error::Template {
                path: source.to_path_buf(),
                reason: e.to_string(),
            })?;
        let supports_tools = template_source.contains("tools");

        let mut stop_ids = special.eos_ids.clone();
        // Only where the vocabulary makes them special tokens: Gemma's `</s>` (id 212) is
        // an ordinary piece of HTML, not an end of turn.
        let specials: std::collections::HashSet<u32> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        for t in END_TOKENS {
            if let Some(id) = tokenizer.token_to_id(t).filter(|id| specials.contains(id)) {
                stop_ids.push(id);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();

        let serialized = tokenizer.to_string(false).map_err(|e| tok_err(source, e))?;
        let mut h = blake3::Hasher::new();
        h.update(b"semantic-formatter-v1\0");
        h.update(serialized.as_bytes());
        h.update(b"\0template\0");
        h.update(template_source.as_bytes());
        h.update(b"\0special\0");
        h.update(special.bos_token.as_bytes());
        h.update(b"\0");
        h.update(special.eos_token.as_bytes());
        h.update(&[u8::from(special.add_bos)]);
        for id in &stop_ids {
            h.update(&id.to_le_bytes());
        }
        let fingerprint = h.finalize().to_hex().to_string();

        Ok(Self {
            tokenizer,
            env,
            template_source,
            supports_tools,
            bos_token: special.bos_token,
            eos_token: special.eos_token,
            add_bos: special.add_bos,
            stop_ids,
            fingerprint,
        })
    }

    /// From a GGUF header: tokenizer, `tokenizer.chat_template`, special tokens.
    pub fn from_gguf(h: &GgufHeader) -> Result<Self> {
        let tok = tokenizer_from_gguf(h)?;
        let template = h
            .get("tokenizer.chat_template")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        Self::new(tok, template, SpecialTokens::from_gguf(h), &h.path)
    }

    /// From a model directory: `tokenizer.json`, `tokenizer_config.json` (chat template,
    /// bos/eos tokens) and `generation_config.json` (eos ids), the last two optional.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(Error::MissingField {
                path: dir.to_path_buf(),
                field: "tokenizer.json".into(),
            });
        }
        let tok = Tokenizer::from_file(&tok_path).map_err(|e| tok_err(&tok_path, e))?;
        let read_json = |name: &str| -> Result<Option<Value>> {
            let p = dir.join(name);
            if !p.is_file() {
                return Ok(None);
            }
            let text = std::fs::read_to_string(&p).map_err(|source| Error::Io {
                path: p.clone(),
                source,
            })?;
            serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| Error::Invalid {
                    path: p,
                    field: "(file)".into(),
                    reason: e.to_string(),
                })
        };
        let tc = read_json("tokenizer_config.json")?.unwrap_or(Value::Null);
        let gc = read_json("generation_config.json")?.unwrap_or(Value::Null);
        let token_text = |v: Option<&Value>| -> String {
            match v {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => o
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                _ => String::new(),
            }
        };
        let bos_token = token_text(tc.get("bos_token"));
        let eos_token = token_text(tc.get("eos_token"));
        let mut eos_ids: Vec<TokenId> = match gc.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as TokenId).into_iter().collect(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_u64().map(|x| x as TokenId))
                .collect(),
            _ => Vec::new(),
        };
        if let Some(id) = tok.token_to_id(&eos_token) {
            eos_ids.push(id);
        }
        let mut template = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            _ => None,
        };
        if template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.is_file() {
                template = Some(std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
                    path: jinja.clone(),
                    source,
                })?);
            }
        }
        Self::new(
            tok,
            template,
            SpecialTokens {
                bos_token,
                eos_token,
                eos_ids,
                add_bos: tc
                    .get("add_bos_token")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            },
            &tok_path,
        )
    }

    /// The underlying tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template's source.
    pub fn template_source(&self) -> &str {
        &self.template_source
    }

    /// Whether the template renders `tools` itself.
    pub fn supports_tools(&self) -> bool {
        self.supports_tools
    }

    /// The template context of a conversation (messages in the Hugging Face shape).
    fn context(&self, conversation: &Conversation, add_generation_prompt: bool) -> Value {
        let mut messages: Vec<Value> = conversation
            .messages
            .iter()
            .map(|m| {
                let mut o = json!({"role": m.role.as_str(), "content": m.content});
                if !m.tool_calls.is_empty() {
                    o["tool_calls"] = Value::Array(
                        m.tool_calls
                            .iter()
                            .map(|c| {
                                json!({"id": c.id, "type": "function",
                                       "function": {"name": c.name, "arguments": c.arguments}})
                            })
                            .collect(),
                    );
                }
                if let Some(id) = &m.tool_call_id {
                    o["tool_call_id"] = json!(id);
                }
                if let Some(n) = &m.name {
                    o["name"] = json!(n);
                }
                o
            })
            .collect();
        let tools = if conversation.tools.is_empty() {
            Value::Null
        } else if self.supports_tools {
            Value::Array(
                conversation
                    .tools
                    .iter()
                    .map(|t| {
                        json!({"type": "function", "function": {
                            "name": t.name, "description": t.description,
                            "parameters": t.parameters}})
                    })
                    .collect(),
            )
        } else {
            let instruction = tool_instruction(conversation);
            match conversation.messages.first() {
                Some(m) if m.role == Role::System => {
                    messages[0]["content"] = json!(format!("{}\n\n{instruction}", m.content));
                }
                _ => messages.insert(0, json!({"role": "system", "content": instruction})),
            }
            Value::Null
        };
        json!({
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "add_bos": self.add_bos,
        })
    }
}

impl ChatFormatter for MlxChatFormatter {
    fn render(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> std::result::Result<String, FormatError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| FormatError::Template(e.to_string()))?;
        tmpl.render(self.context(conversation, add_generation_prompt))
            .map_err(|e| FormatError::Template(e.to_string()))
    }

    fn encode(&self, text: &str) -> std::result::Result<Vec<TokenId>, FormatError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| FormatError::Tokenizer(e.to_string()))
    }

    fn decode(&self, ids: &[TokenId]) -> std::result::Result<String, FormatError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| FormatError::Tokenizer(e.to_string()))
    }

    fn stop_token_ids(&self) -> Vec<TokenId> {
        self.stop_ids.clone()
    }

    fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_session::{Message, ToolCall, ToolDefinition};

    fn formatter(template: &str) -> MlxChatFormatter {
        let tok = Tokenizer::new(BPE::default());
        MlxChatFormatter::new(
            tok,
            Some(template.to_owned()),
            SpecialTokens {
                bos_token: "<s>".into(),
                eos_token: "</s>".into(),
                eos_ids: vec![2],
                add_bos: false,
            },
            Path::new("test"),
        )
        .expect("formatter")
    }

    fn conversation() -> Conversation {
        let mut assistant = Message::text(Role::Assistant, "");
        assistant.tool_calls = vec![ToolCall {
            id: "c1".into(),
            name: "get_weather".into(),
            arguments: json!({"city": "Paris"}),
        }];
        let mut tool = Message::text(Role::Tool, "sunny");
        tool.tool_call_id = Some("c1".into());
        Conversation {
            messages: vec![
                Message::text(Role::System, "Be brief."),
                Message::text(Role::User, "Weather?"),
                assistant,
                tool,
            ],
            tools: vec![ToolDefinition {
                name: "get_weather".into(),
                description: "Current weather".into(),
                parameters: json!({"type": "object"}),
            }],
        }
    }

    #[test]
    fn strftime_formats_known_directives() {
        let s = strftime_utc("%Y-%m-%d|%B|%%|%Q");
        let parts: Vec<&str> = s.split('|').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0].len(), 10);
        assert!(parts[0].starts_with("20"));
        assert_eq!(parts[2], "%");
        assert_eq!(parts[3], "%Q");
    }

    #[test]
    fn templates_with_tools_get_them_in_hf_shape() {
        let f = formatter(
            "{{ bos_token }}{% if tools %}{% for t in tools %}[{{ t.function.name }}:{{ t.function.parameters | tojson }}]{% endfor %}{% endif %}\
             {% for m in messages %}<{{ m.role }}>{{ m.content | trim }}\
             {% if m.tool_calls %}{% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments | tojson }}){% endfor %}{% endif %}\
             {% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}{% endfor %}\
             {% if add_generation_prompt %}<assistant>{% endif %}{{ strftime_now('%Y')[:2] }}",
        );
        assert!(f.supports_tools());
        let out = f.render(&conversation(), true).expect("render");
        assert_eq!(
            out,
            "<s>[get_weather:{\"type\":\"object\"}]<system>Be brief.<user>Weather?\
             <assistant>get_weather({\"city\":\"Paris\"})<tool>sunny#c1<assistant>20"
        );
    }

    #[test]
    fn templates_without_tools_get_an_instruction_in_the_system_prompt() {
        let f = formatter("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}");
        assert!(!f.supports_tools());
        let out = f.render(&conversation(), false).expect("render");
        assert!(
            out.starts_with("<system>Be brief.\n\nYou can call tools."),
            "{out}"
        );
        assert!(out.contains("\"name\":\"get_weather\""), "{out}");
        let mut no_system = conversation();
        no_system.messages.remove(0);
        let out = f.render(&no_system, false).expect("render");
        assert!(out.starts_with("<system>You can call tools."), "{out}");
    }

    /// A template in the shape of Llama 3.1 / 3.2's (written here from their documented
    /// prompt format, with the constructs their templates use: a date from `strftime_now`
    /// unless `date_string` is given, the system message lifted out of `messages` and
    /// trimmed, tools as indented JSON, one call per assistant turn or `raise_exception`,
    /// tool results as `ipython` turns).
    const LLAMA3_STYLE: &str = r#"{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools %}{{- "Environment: ipython\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools %}{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\n\n" }}{%- endfor %}{%- endif %}
{{- system_message }}{{- "<|eot_id|>" }}
{%- for message in messages %}
{%- if message.role in ['user', 'assistant'] and not message.tool_calls %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- elif message.tool_calls %}
{%- if message.tool_calls|length != 1 %}{{- raise_exception("one tool call per turn") }}{%- endif %}
{%- set call = message.tool_calls[0].function %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}' }}{{- "<|eom_id|>" }}
{%- elif message.role == "tool" %}
{{- "<|start_header_id|>ipython<|end_header_id|>\n\n" + message.content + "<|eot_id|>" }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"#;

    fn llama3_formatter() -> MlxChatFormatter {
        let mut tok = Tokenizer::new(BPE::default());
        tok.add_special_tokens(&[
            AddedToken::from("<|begin_of_text|>", true),
            AddedToken::from("<|end_of_text|>", true),
            AddedToken::from("<|eot_id|>", true),
            AddedToken::from("<|eom_id|>", true),
        ]);
        MlxChatFormatter::new(
            tok,
            Some(LLAMA3_STYLE.to_owned()),
            SpecialTokens {
                bos_token: "<|begin_of_text|>".into(),
                eos_token: "<|eot_id|>".into(),
                eos_ids: vec![2],
                add_bos: false,
            },
            Path::new("test"),
        )
        .expect("formatter")
    }

    #[test]
    fn llama3_style_templates_render_the_documented_prompt_format() {
        let f = llama3_formatter();
        let today = strftime_utc("%d %b %Y");
        let chat = Conversation {
            messages: vec![
                Message::text(Role::System, "  Be brief. "),
                Message::text(Role::User, "Capital of France?"),
            ],
            tools: Vec::new(),
        };
        assert_eq!(
            f.render(&chat, true).expect("render"),
            format!(
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
                 Cutting Knowledge Date: December 2023\nToday Date: {today}\n\n\
                 Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n\
                 Capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        );
        // Tools: indented JSON in the system turn, the call as JSON ending in <|eom_id|>,
        // the result as an ipython turn.
        let out = f.render(&conversation(), true).expect("render");
        assert!(out.contains("Environment: ipython\n"), "{out}");
        assert!(out.contains("\n    \"function\": {\n"), "{out}");
        assert!(
            out.contains(
                "<|start_header_id|>assistant<|end_header_id|>\n\n\
                 {\"name\": \"get_weather\", \"parameters\": {\"city\":\"Paris\"}}<|eom_id|>\
                 <|start_header_id|>ipython<|end_header_id|>\n\nsunny<|eot_id|>"
            ),
            "{out}"
        );
        // Two calls in one turn: the template's own error, as a format error.
        let mut two = conversation();
        let call = two.messages[2].tool_calls[0].clone();
        two.messages[2].tool_calls.push(call);
        let e = f.render(&two, true).expect_err("two calls");
        assert!(e.to_string().contains("one tool call per turn"), "{e}");
        // Both end-of-turn tokens stop generation (a tool call ends in <|eom_id|>).
        let stops = f.stop_token_ids();
        for t in ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"] {
            let id = f.tokenizer.token_to_id(t).expect("special token");
            assert!(stops.contains(&id), "{t} stops: {stops:?}");
        }
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let f = formatter(
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}\
             {{ messages[0].content.strip().upper() }}",
        );
        let c = Conversation {
            messages: vec![Message::text(Role::User, "  hi ")],
            tools: vec![],
        };
        assert_eq!(f.render(&c, false).expect("render"), "HI");
        let c = Conversation {
            messages: vec![Message::text(Role::Assistant, "x")],
            tools: vec![],
        };
        let e = f.render(&c, false).expect_err("raises");
        assert!(e.to_string().contains("first must be user"), "{e}");
    }

    #[test]
    fn bad_template_is_a_typed_error() {
        let tok = Tokenizer::new(BPE::default());
        let e = MlxChatFormatter::new(
            tok,
            Some("{% for %}".into()),
            SpecialTokens::default(),
            Path::new("m.gguf"),
        )
        .expect_err("does not compile");
        assert!(matches!(e, Error::Template { .. }), "{e}");
    }
}
