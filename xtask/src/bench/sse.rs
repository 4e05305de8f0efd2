//! Server-sent events: a line parser and the reading of OpenAI and Anthropic stream events
//! (content deltas, usage, errors), so that TTFT can be taken at the first content byte.

use serde_json::Value;

/// One SSE event: its `event:` name (if any) and its `data:` lines joined by newlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field (Anthropic names every event; OpenAI sends data only).
    pub name: Option<String>,
    /// The data lines, joined with `\n`.
    pub data: String,
}

/// Incremental SSE parser: feed it lines, it returns an event at each blank line.
#[derive(Debug, Default)]
pub struct Parser {
    name: Option<String>,
    data: Option<String>,
}

impl Parser {
    /// Feed one line (with or without its line ending); returns the event it completes.
    pub fn push_line(&mut self, line: &str) -> Option<Event> {
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            let data = self.data.take();
            let name = self.name.take();
            return data.map(|data| Event { name, data });
        }
        if line.starts_with(':') {
            return None; // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.name = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {} // id, retry: not used
        }
        None
    }

    /// The event still pending at the end of the stream (no trailing blank line).
    pub fn finish(&mut self) -> Option<Event> {
        self.push_line("")
    }
}

/// What an event means to a benchmark client.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Answer text (non-empty): the first one is the first content byte.
    Content(String),
    /// A usage object (OpenAI's final chunk, Anthropic's message_start / message_delta) or
    /// llama.cpp's `timings`, as sent.
    Usage(Value),
    /// The end of the stream (`[DONE]`, `message_stop`).
    Done,
    /// An error event, with its message.
    Error(String),
}

/// Read one event of either API; events that carry nothing of interest give nothing.
/// Data that is not JSON (other than `[DONE]`) is an error piece.
pub fn interpret(event: &Event) -> Vec<Piece> {
    let data = event.data.trim();
    if data == "[DONE]" {
        return vec![Piece::Done];
    }
    let value: Value = match serde_json::from_str(data) {
        Ok(v) => v,
        Err(err) => {
            return vec![Piece::Error(format!(
                "event data is not JSON ({err}): {data}"
            ))]
        }
    };
    let mut pieces = Vec::new();
    if let Some(err) = value.get("error").filter(|e| !e.is_null()) {
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| err.to_string(), str::to_owned);
        pieces.push(Piece::Error(message));
        return pieces;
    }
    match value.get("type").and_then(Value::as_str) {
        // Anthropic.
        Some("content_block_delta") => {
            let delta = value.get("delta");
            let text = delta
                .and_then(|d| d.get("text").or_else(|| d.get("partial_json")))
                .and_then(Value::as_str)
                .unwrap_or("");
            if !text.is_empty() {
                pieces.push(Piece::Content(text.to_owned()));
            }
        }
        Some("message_start") => {
            if let Some(usage) = value.pointer("/message/usage") {
                pieces.push(Piece::Usage(usage.clone()));
            }
        }
        Some("message_delta") => {
            if let Some(usage) = value.get("usage") {
                pieces.push(Piece::Usage(usage.clone()));
            }
        }
        Some("message_stop") => pieces.push(Piece::Done),
        _ => {
            // OpenAI chat completion chunk.
            if let Some(choice) = value.pointer("/choices/0") {
                let delta = choice.get("delta");
                let text = delta
                    .and_then(|d| d.get("content"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if !text.is_empty() {
                    pieces.push(Piece::Content(text.to_owned()));
                } else if delta
                    .and_then(|d| d.get("tool_calls"))
                    .is_some_and(|t| !t.is_null())
                {
                    pieces.push(Piece::Content(String::new()));
                }
            }
            for key in ["usage", "timings"] {
                if let Some(usage) = value.get(key).filter(|u| u.is_object()) {
                    let mut usage = usage.clone();
                    if key == "timings" {
                        usage = serde_json::json!({ "timings": usage });
                    }
                    pieces.push(Piece::Usage(usage));
                }
            }
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(text: &str) -> Vec<Event> {
        let mut p = Parser::default();
        let mut out: Vec<Event> = text
            .split_inclusive('\n')
            .filter_map(|l| p.push_line(l))
            .collect();
        out.extend(p.finish());
        out
    }

    fn first_content(text: &str) -> Option<(usize, String)> {
        events(text).iter().enumerate().find_map(|(i, e)| {
            interpret(e).into_iter().find_map(|p| match p {
                Piece::Content(t) => Some((i, t)),
                _ => None,
            })
        })
    }

    #[test]
    fn openai_first_content_skips_the_role_chunk_and_keep_alives() {
        let stream = ": keep-alive\n\n\
            data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n\
            : keepalive 3/25\n\n\
            data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Par\"}}]}\r\n\r\n\
            data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"is\"}}]}\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2}}\n\n\
            data: [DONE]\n\n";
        assert_eq!(first_content(stream), Some((1, "Par".to_owned())));
        let all: Vec<Piece> = events(stream).iter().flat_map(interpret).collect();
        assert!(matches!(all.last(), Some(Piece::Done)));
        assert!(all
            .iter()
            .any(|p| matches!(p, Piece::Usage(u) if u["prompt_tokens"] == 9)));
    }

    #[test]
    fn anthropic_first_content_is_the_first_text_delta() {
        let stream = "event: message_start\n\
            data: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":5,\"cache_read_input_tokens\":256}}}\n\n\
            event: ping\ndata: {\"type\":\"ping\"}\n\n\
            event: content_block_start\n\
            data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n\
            event: content_block_delta\n\
            data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n\
            event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";
        assert_eq!(first_content(stream), Some((3, "Hi".to_owned())));
        let evs = events(stream);
        assert_eq!(evs[0].name.as_deref(), Some("message_start"));
        assert!(
            matches!(&interpret(&evs[0])[..], [Piece::Usage(u)] if u["cache_read_input_tokens"] == 256)
        );
    }

    #[test]
    fn multi_line_data_errors_and_a_missing_final_blank_line() {
        let evs = events("data: a\ndata: b\n\ndata: [DONE]");
        assert_eq!(evs[0].data, "a\nb");
        assert_eq!(interpret(&evs[1]), vec![Piece::Done]);
        let err = events("data: {\"error\":{\"message\":\"boom\"}}\n\n");
        assert_eq!(interpret(&err[0]), vec![Piece::Error("boom".to_owned())]);
        let bad = events("data: not json\n\n");
        assert!(matches!(&interpret(&bad[0])[..], [Piece::Error(_)]));
        // A stream with no content at all has no first content.
        assert_eq!(first_content("data: [DONE]\n\n"), None);
    }

    #[test]
    fn llama_cpp_timings_are_reported_as_usage() {
        let ev = Event {
            name: None,
            data: "{\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"timings\":{\"cache_n\":500,\"prompt_n\":12}}".into(),
        };
        assert!(matches!(&interpret(&ev)[..], [Piece::Usage(u)] if u["timings"]["cache_n"] == 500));
    }
}
