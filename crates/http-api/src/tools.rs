//! Tool calls in generated text: the parser and the streaming filter.
//!
//! Models write tool calls as text. Recognised forms (anywhere in the answer, several per
//! answer allowed):
//!
//! - a JSON object `{"name": "...", "arguments": {...}}` (also `"parameters"`, `"input"` or
//!   `"args"` for the arguments, which may be an object or a string holding one);
//! - the same inside `<tool_call>...</tool_call>` tags (Qwen / Hermes style);
//! - the original system's `{"tool_use": {"name", "input"}}` and `{"function_call": {"name",
//!   "arguments"}}`, and OpenAI's own `{"type": "function", "function": {...}}`;
//! - `{"tool_calls": [...]}` and a JSON array of calls;
//! - any of these inside a Markdown code fence (the fence is removed with the call).
//!
//! A call must name one of the offered tools; anything else (unknown name, arguments that are
//! not a JSON object, truncated JSON) stays in the text: nothing the model wrote is dropped.

use serde_json::{Map, Value};

/// One tool call found in generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedToolCall {
    /// The tool's name.
    pub name: String,
    /// The arguments (always a JSON object).
    pub arguments: Value,
}

/// Generated text split into tool calls and the remaining text.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedOutput {
    /// The text with the calls (and their tags or fences) removed; trimmed when calls were found.
    pub text: String,
    /// The calls, in order.
    pub calls: Vec<ParsedToolCall>,
}

const TAG_OPEN: &str = "<tool_call>";
const TAG_CLOSE: &str = "</tool_call>";

/// Splits `text` into tool calls and remaining text. `tool_names` are the offered tools; a
/// call naming another tool stays text (an empty list accepts any name).
pub fn parse_tool_calls(text: &str, tool_names: &[String]) -> ParsedOutput {
    parse_after(text, tool_names, 0)
}

/// [`parse_tool_calls`] for text that follows `fences_before` Markdown fences (```` ``` ````)
/// already sent.
fn parse_after(text: &str, tool_names: &[String], fences_before: usize) -> ParsedOutput {
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut calls = Vec::new();
    let mut i = 0;
    let bytes = text.as_bytes();
    while i < text.len() {
        let rest = &text[i..];
        if rest.starts_with(TAG_OPEN) {
            let inner_start = i + TAG_OPEN.len();
            let (inner_end, end) = match text[inner_start..].find(TAG_CLOSE) {
                Some(k) => (inner_start + k, inner_start + k + TAG_CLOSE.len()),
                None => (text.len(), text.len()),
            };
            if let Some(found) = calls_from_str(text[inner_start..inner_end].trim(), tool_names) {
                spans.push((i, end));
                calls.extend(found);
                i = end;
                continue;
            }
        } else if bytes[i] == b'{'
            || (bytes[i] == b'[' && text[i + 1..].trim_start().starts_with('{'))
        {
            if let Some(end) = balanced_end(text, i) {
                if let Ok(value) = serde_json::from_str::<Value>(&text[i..end]) {
                    if let Some(found) = calls_from_value(&value, tool_names) {
                        let floor = spans.last().map_or(0, |x| x.1);
                        let (s, e) = with_fence(text, i, end, floor, fences_before);
                        spans.push((s, e));
                        calls.extend(found);
                        i = e;
                        continue;
                    }
                    // Well-formed JSON that is not a call is data: skip it whole so a nested
                    // object is not mistaken for a call.
                    i = end;
                    continue;
                }
            }
        }
        i += rest.chars().next().map_or(1, char::len_utf8);
    }
    if calls.is_empty() {
        return ParsedOutput {
            text: text.to_string(),
            calls,
        };
    }
    let mut remaining = String::new();
    let mut pos = 0;
    for (s, e) in spans {
        remaining.push_str(&text[pos..s]);
        pos = e;
    }
    remaining.push_str(&text[pos..]);
    ParsedOutput {
        text: remaining.trim().to_string(),
        calls,
    }
}

/// Extends a call's span over a Markdown code fence around it (```` ```json ... ``` ````).
fn with_fence(
    text: &str,
    start: usize,
    end: usize,
    floor: usize,
    fences_before: usize,
) -> (usize, usize) {
    // Only inside an open fence: an odd number of fences before the call.
    if (fences_before + text[..start].matches("```").count()).is_multiple_of(2) {
        return (start, end);
    }
    let before = text[floor..start].trim_end();
    let open = ["```json", "```JSON", "```"]
        .iter()
        .find(|f| before.ends_with(*f))
        .map(|f| floor + before.len() - f.len());
    let after = &text[end..];
    let trimmed = after.trim_start();
    match open {
        Some(s) if trimmed.starts_with("```") => (s, end + (after.len() - trimmed.len()) + 3),
        _ => (start, end),
    }
}

/// End (exclusive) of the JSON object or array starting at `start`, by bracket balance
/// outside strings; `None` when it never closes.
fn balanced_end(text: &str, start: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (k, &b) in text.as_bytes()[start..].iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => depth += 1,
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(start + k + 1);
                }
            }
            _ => {}
        }
    }
    None
}

fn calls_from_str(s: &str, tool_names: &[String]) -> Option<Vec<ParsedToolCall>> {
    let value: Value = serde_json::from_str(s).ok()?;
    calls_from_value(&value, tool_names)
}

/// Interprets a JSON value as one or more tool calls (all or nothing).
fn calls_from_value(value: &Value, tool_names: &[String]) -> Option<Vec<ParsedToolCall>> {
    match value {
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|v| v.as_object().and_then(|o| call_from_object(o, tool_names)))
            .collect(),
        Value::Object(o) => {
            if let Some(Value::Array(items)) = o.get("tool_calls") {
                if o.len() == 1 && !items.is_empty() {
                    return calls_from_value(&Value::Array(items.clone()), tool_names);
                }
            }
            call_from_object(o, tool_names).map(|c| vec![c])
        }
        _ => None,
    }
}

fn call_from_object(o: &Map<String, Value>, tool_names: &[String]) -> Option<ParsedToolCall> {
    for wrapper in ["tool_use", "function_call", "function"] {
        if let Some(Value::Object(inner)) = o.get(wrapper) {
            return call_from_object(inner, tool_names);
        }
    }
    let name = o.get("name")?.as_str()?.trim();
    if name.is_empty() || (!tool_names.is_empty() && !tool_names.iter().any(|t| t == name)) {
        return None;
    }
    let args = ["arguments", "parameters", "input", "args"]
        .iter()
        .find_map(|k| o.get(*k));
    let arguments = match args {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(Value::String(s)) if s.trim().is_empty() => Value::Object(Map::new()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => v,
            _ => return None,
        },
        Some(_) => return None,
    };
    Some(ParsedToolCall {
        name: name.to_string(),
        arguments,
    })
}

/// Whether the text from a position on may still become a tool call.
#[derive(Debug, PartialEq, Eq)]
enum Hold {
    /// It cannot: the text may be sent.
    No,
    /// It might, depending on what comes next.
    Maybe,
    /// It starts a form the parser tries: hold everything from here to the end.
    Definitely,
}

fn classify(s: &str) -> Hold {
    let prefix_of = |full: &str, s: &str| -> Hold {
        if s.starts_with(full) {
            Hold::Definitely
        } else if full.starts_with(s) {
            Hold::Maybe
        } else {
            Hold::No
        }
    };
    match s.as_bytes().first() {
        Some(b'{') => Hold::Definitely,
        Some(b'<') => prefix_of(TAG_OPEN, s),
        Some(b'[') => {
            let t = s[1..].trim_start();
            match t.as_bytes().first() {
                None => Hold::Maybe,
                Some(b'{') => Hold::Definitely,
                Some(_) => Hold::No,
            }
        }
        Some(b'`') => {
            let fence = prefix_of("```", s);
            if fence != Hold::Definitely {
                return fence;
            }
            let mut t = &s[3..];
            for tag in ["json", "JSON"] {
                if tag.starts_with(t) && t.len() < tag.len() {
                    return Hold::Maybe;
                }
                if let Some(r) = t.strip_prefix(tag) {
                    t = r;
                    break;
                }
            }
            let t = t.trim_start();
            match t.as_bytes().first() {
                None => Hold::Maybe,
                Some(b'{') | Some(b'[') => Hold::Definitely,
                Some(_) => Hold::No,
            }
        }
        _ => Hold::No,
    }
}

/// Streams text while holding back anything that may become a tool call, so calls never
/// leak into streamed text. Text before the first possible call is released at once; from a
/// definite start (`{`, `<tool_call>`, a fence or array opening a JSON object) everything is
/// held and handed to [`parse_tool_calls`] at the end.
#[derive(Debug, Default)]
pub struct ToolStreamFilter {
    pending: String,
    holding: bool,
    /// Markdown fences in the text already released.
    fences_sent: usize,
}

impl ToolStreamFilter {
    /// A filter with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds generated text; returns the part that is safe to send now.
    pub fn push(&mut self, delta: &str) -> String {
        self.pending.push_str(delta);
        if self.holding {
            return String::new();
        }
        let mut cut = self.pending.len();
        for (p, c) in self.pending.char_indices() {
            if !matches!(c, '{' | '<' | '[' | '`') {
                continue;
            }
            match classify(&self.pending[p..]) {
                Hold::No => continue,
                Hold::Maybe => {
                    cut = p;
                    break;
                }
                Hold::Definitely => {
                    cut = p;
                    self.holding = true;
                    break;
                }
            }
        }
        let rest = self.pending.split_off(cut);
        let sent = std::mem::replace(&mut self.pending, rest);
        self.fences_sent += sent.matches("```").count();
        sent
    }

    /// At the end of generation: the held text split into text and tool calls, exactly as
    /// [`parse_tool_calls`] splits the whole answer.
    pub fn finish(self, tool_names: &[String]) -> ParsedOutput {
        parse_after(&self.pending, tool_names, self.fences_sent)
    }

    /// The held text, unparsed.
    pub fn held(&self) -> &str {
        &self.pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "search".into()]
    }

    fn one(text: &str) -> ParsedOutput {
        parse_tool_calls(text, &names())
    }

    #[test]
    fn plain_json_object() {
        let out = one(r#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#);
        assert_eq!(out.calls.len(), 1);
        assert_eq!(out.calls[0].name, "get_weather");
        assert_eq!(out.calls[0].arguments, json!({"city": "Paris"}));
        assert_eq!(out.text, "");
    }

    #[test]
    fn text_around_and_string_arguments() {
        let out = one(
            "Let me check. {\"name\":\"search\",\"arguments\":\"{\\\"q\\\": \\\"rust }\\\"}\"} Done.",
        );
        assert_eq!(out.calls.len(), 1);
        assert_eq!(out.calls[0].arguments, json!({"q": "rust }"}));
        assert_eq!(out.text, "Let me check.  Done.");
    }

    #[test]
    fn tags_and_multiple_calls() {
        let out = one(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>{\"name\": \"search\", \"parameters\": {\"q\": \"x\"}}</tool_call>",
        );
        assert_eq!(out.calls.len(), 2);
        assert_eq!(out.calls[1].name, "search");
        assert_eq!(out.calls[1].arguments, json!({"q": "x"}));
        assert_eq!(out.text, "");
    }

    #[test]
    fn unclosed_tag_at_the_end() {
        let out = one("<tool_call>{\"name\": \"search\", \"arguments\": {}}");
        assert_eq!(out.calls.len(), 1);
        assert_eq!(out.calls[0].arguments, json!({}));
    }

    #[test]
    fn original_system_forms() {
        let out = one(r#"{"tool_use": {"name": "search", "input": {"q": "a"}}}"#);
        assert_eq!(out.calls[0].arguments, json!({"q": "a"}));
        let out = one(r#"{"function_call": {"name": "get_weather", "arguments": {"city": "b"}}}"#);
        assert_eq!(out.calls[0].arguments, json!({"city": "b"}));
        let out = one(
            r#"{"type": "function", "function": {"name": "search", "arguments": "{\"q\":1}"}}"#,
        );
        assert_eq!(out.calls[0].arguments, json!({"q": 1}));
    }

    #[test]
    fn arrays_and_wrappers_and_fences() {
        let out = one(
            r#"[{"name": "search", "arguments": {}}, {"name": "get_weather", "arguments": {}}]"#,
        );
        assert_eq!(out.calls.len(), 2);
        let out = one(r#"{"tool_calls": [{"name": "search", "arguments": {"q": "z"}}]}"#);
        assert_eq!(out.calls.len(), 1);
        let out =
            one("Sure:\n```json\n{\"name\": \"search\", \"arguments\": {\"q\": \"f\"}}\n```\n");
        assert_eq!(out.calls.len(), 1);
        assert_eq!(out.text, "Sure:");
        // A closing fence before the call is not its opener.
        let text =
            "```rust\nfn x() {}\n```\n{\"name\": \"search\", \"arguments\": {}}\n```py\nx\n```";
        let out = one(text);
        assert_eq!(out.calls.len(), 1);
        assert_eq!(out.text, "```rust\nfn x() {}\n```\n\n```py\nx\n```");
    }

    #[test]
    fn malformed_or_unknown_stays_text() {
        for text in [
            r#"{"name": "get_weather", "arguments": {"city": "Par"#,
            r#"{"name": "rm_rf", "arguments": {}}"#,
            r#"{"name": "search", "arguments": "not json"}"#,
            r#"{"name": "search", "arguments": [1, 2]}"#,
            r#"{"city": "Paris"}"#,
            "<tool_call>{oops}</tool_call>",
            "just words [with brackets] and {braces}",
        ] {
            let out = one(text);
            assert!(out.calls.is_empty(), "{text}");
            assert_eq!(out.text, text);
        }
    }

    #[test]
    fn nested_data_is_not_a_call() {
        let text = r#"{"result": {"name": "search", "arguments": {}}}"#;
        assert!(one(text).calls.is_empty());
    }

    #[test]
    fn any_name_when_no_tools_listed() {
        let out = parse_tool_calls(r#"{"name": "x", "arguments": {}}"#, &[]);
        assert_eq!(out.calls.len(), 1);
    }

    fn stream(pieces: &[&str]) -> (String, String) {
        let mut f = ToolStreamFilter::new();
        let mut sent = String::new();
        for p in pieces {
            sent.push_str(&f.push(p));
        }
        (sent, f.held().to_string())
    }

    #[test]
    fn filter_releases_plain_text_and_holds_calls() {
        let (sent, held) = stream(&["Hello ", "world. ", "{\"na", "me\": 1}", " tail"]);
        assert_eq!(sent, "Hello world. ");
        assert_eq!(held, "{\"name\": 1} tail");

        let (sent, held) = stream(&["a <", "b> c [", "x] d `", "code` e"]);
        assert_eq!(sent, "a <b> c [x] d `code` e");
        assert_eq!(held, "");

        let (sent, held) = stream(&["x <tool", "_call>{}"]);
        assert_eq!(sent, "x ");
        assert_eq!(held, "<tool_call>{}");

        let (sent, held) = stream(&["Sure:\n``", "`json\n", "{}"]);
        assert_eq!(sent, "Sure:\n");
        assert_eq!(held, "```json\n{}");

        let (sent, held) = stream(&["ends with <tool"]);
        assert_eq!(sent, "ends with ");
        assert_eq!(held, "<tool");
    }

    #[test]
    fn streaming_equals_whole_parse() {
        for text in [
            "I will look. ```json\n{\"name\": \"search\", \"arguments\": {\"q\": \"é\"}}\n``` <tool_call>{\"name\":\"get_weather\",\"arguments\":{}}</tool_call> bye",
            "```rust\nfn x() {}\n```\n{\"name\": \"search\", \"arguments\": {}}\n```py\nx\n``` and <tool_call>{\"name\":\"get_weather\",\"arguments\":{}}</tool_call>",
        ] {
            check_stream(text);
        }
    }

    fn check_stream(text: &str) {
        let whole = one(text);
        // Feed it one character at a time.
        let mut f = ToolStreamFilter::new();
        let mut sent = String::new();
        for c in text.chars() {
            sent.push_str(&f.push(&c.to_string()));
        }
        let tail = f.finish(&names());
        assert_eq!(tail.calls, whole.calls);
        assert_eq!(whole.calls.len(), 2);
        let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        assert_eq!(
            words(&format!("{} {}", sent, tail.text)),
            words(&whole.text)
        );
    }

    use proptest::prelude::*;

    const FRAGMENTS: &[&str] = &[
        "{",
        "}",
        "[",
        "]",
        "\"",
        "```",
        "json",
        "<tool_call>",
        "</tool_call>",
        "<",
        "`",
        "name",
        ":",
        ",",
        " ",
        "\n",
        "é",
        "a",
        "\\",
        "{\"name\": \"search\", \"arguments\": {}}",
        "{\"tool_use\": {\"name\": \"get_weather\", \"input\": {\"c\": 1}}}",
    ];

    proptest! {
        /// Never panics, never drops text, and streaming (any split) finds the same calls as
        /// parsing the whole answer.
        #[test]
        fn parse_and_stream_agree(parts in proptest::collection::vec(0..FRAGMENTS.len(), 0..24), split in 1usize..5) {
            let text: String = parts.iter().map(|&i| FRAGMENTS[i]).collect();
            let whole = one(&text);
            if whole.calls.is_empty() {
                prop_assert_eq!(&whole.text, &text);
            }
            let mut f = ToolStreamFilter::new();
            let mut sent = String::new();
            let chars: Vec<char> = text.chars().collect();
            for chunk in chars.chunks(split) {
                sent.push_str(&f.push(&chunk.iter().collect::<String>()));
            }
            prop_assert!(text.starts_with(&sent));
            let tail = f.finish(&names());
            prop_assert_eq!(&tail.calls, &whole.calls);
            if tail.calls.is_empty() {
                prop_assert_eq!(format!("{sent}{}", tail.text), text);
            }
        }
    }
}
