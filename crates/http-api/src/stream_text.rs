//! The text of a streamed answer when tools are offered: what may go out now, and at the
//! end the rest and the tool calls, so that the streamed text adds up to exactly the text
//! of the non-streamed answer.

use crate::tools::{parse_tool_calls, ParsedOutput, ToolStreamFilter};

/// Releases streamed text as it comes, holding back what may start a tool call (see
/// [`ToolStreamFilter`]) and whitespace at the end of the released text: the non-streamed
/// answer's text is trimmed when it holds tool calls, so whitespace before a call must not
/// go out until the end shows whether one follows.
#[derive(Debug)]
pub(crate) struct StreamText {
    /// `None` when no tools are offered: everything goes out as it comes.
    filter: Option<ToolStreamFilter>,
    /// Text sent so far.
    sent: String,
    /// Released by the filter, not sent yet (whitespace only).
    held: String,
}

impl StreamText {
    /// A stream with (`tools`) or without tool calls to recognise.
    pub(crate) fn new(tools: bool) -> Self {
        Self {
            filter: tools.then(ToolStreamFilter::new),
            sent: String::new(),
            held: String::new(),
        }
    }

    /// Whether tool calls are recognised (tools were offered).
    pub(crate) fn tools(&self) -> bool {
        self.filter.is_some()
    }

    /// Adds generated text; returns the part to send now.
    pub(crate) fn push(&mut self, delta: &str) -> String {
        let Some(filter) = &mut self.filter else {
            return delta.to_string();
        };
        self.held.push_str(&filter.push(delta));
        let keep = self.held.trim_end().len();
        let tail = self.held.split_off(keep);
        let out = std::mem::replace(&mut self.held, tail);
        self.sent.push_str(&out);
        out
    }

    /// At the end, given the whole answer: the text still to send and the tool calls, the
    /// same calls as [`parse_tool_calls`] finds in the whole answer (nothing without tools).
    pub(crate) fn finish(self, answer: &str, tool_names: &[String]) -> ParsedOutput {
        let Some(filter) = self.filter else {
            return ParsedOutput {
                text: String::new(),
                calls: Vec::new(),
            };
        };
        let whole = parse_tool_calls(answer, tool_names);
        let text = match whole.text.strip_prefix(&self.sent) {
            Some(rest) => rest.to_string(),
            // Only when whitespace at the very start went out before a call: send the rest
            // as the filter splits it.
            None => {
                let rest = filter.finish(tool_names).text;
                if whole.calls.is_empty() {
                    format!("{}{rest}", self.held)
                } else {
                    rest
                }
            }
        };
        ParsedOutput {
            text,
            calls: whole.calls,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into()]
    }

    /// Streams `answer` in pieces of `n` bytes (on char boundaries) and returns the text sent
    /// and the calls found.
    fn stream(answer: &str, n: usize) -> (String, usize) {
        let mut s = StreamText::new(true);
        let mut sent = String::new();
        let mut piece = String::new();
        for c in answer.chars() {
            piece.push(c);
            if piece.len() >= n {
                sent.push_str(&s.push(&piece));
                piece.clear();
            }
        }
        sent.push_str(&s.push(&piece));
        let end = s.finish(answer, &names());
        sent.push_str(&end.text);
        (sent, end.calls.len())
    }

    #[test]
    fn streamed_text_adds_up_to_the_parsed_text() {
        let call = r#"{"name": "get_weather", "arguments": {"city": "Oslo"}}"#;
        let answers = [
            format!("Checking. {call}"),
            format!("Checking.\n\n{call}\n"),
            format!("Checking. {call} Done."),
            format!("  \n{call}"),
            "Just text, with a trailing space ".to_string(),
            "   ".to_string(),
            format!("Before {{not a call}} after. {call}"),
        ];
        for answer in &answers {
            let whole = parse_tool_calls(answer, &names());
            for n in [1, 3, 7, 1000] {
                let (sent, calls) = stream(answer, n);
                assert_eq!(sent, whole.text, "answer {answer:?} in pieces of {n}");
                assert_eq!(calls, whole.calls.len());
            }
        }
    }

    #[test]
    fn without_tools_everything_goes_out_at_once() {
        let mut s = StreamText::new(false);
        assert_eq!(s.push("a {"), "a {");
        assert_eq!(s.finish("a {", &[]).text, "");
    }
}
