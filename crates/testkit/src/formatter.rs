use agent_session::{ChatFormatter, Conversation, FormatError, TokenId};

/// A byte-level ChatML formatter: `<|im_start|>` is token 1, `<|im_end|>` token 2 (the stop
/// token), every other byte `b` is token `b + 4`. Tools are listed in the system turn.
#[derive(Debug, Default, Clone)]
pub struct ToyFormatter;

/// Token id of `<|im_start|>`.
pub const IM_START: TokenId = 1;
/// Token id of `<|im_end|>` (ends a turn).
pub const IM_END: TokenId = 2;
/// First id of byte tokens.
pub const BYTE_OFFSET: TokenId = 4;

impl ToyFormatter {
    /// The formatter.
    pub fn new() -> Self {
        Self
    }
}

impl ChatFormatter for ToyFormatter {
    fn render(
        &self,
        conversation: &Conversation,
        add_generation_prompt: bool,
    ) -> Result<String, FormatError> {
        let mut out = String::new();
        if !conversation.tools.is_empty() {
            out.push_str("<|im_start|>system\nTools:");
            for t in &conversation.tools {
                out.push_str(&format!(" {} ({})", t.name, t.description));
            }
            out.push_str("<|im_end|>\n");
        }
        for m in &conversation.messages {
            out.push_str("<|im_start|>");
            out.push_str(m.role.as_str());
            out.push('\n');
            out.push_str(&m.content);
            for c in &m.tool_calls {
                out.push_str(&format!(
                    "<tool_call>{{\"name\":\"{}\",\"arguments\":{}}}</tool_call>",
                    c.name, c.arguments
                ));
            }
            out.push_str("<|im_end|>\n");
        }
        if add_generation_prompt {
            out.push_str("<|im_start|>assistant\n");
        }
        Ok(out)
    }

    fn encode(&self, text: &str) -> Result<Vec<TokenId>, FormatError> {
        let mut ids = Vec::with_capacity(text.len());
        let mut rest = text;
        while !rest.is_empty() {
            if let Some(r) = rest.strip_prefix("<|im_start|>") {
                ids.push(IM_START);
                rest = r;
            } else if let Some(r) = rest.strip_prefix("<|im_end|>") {
                ids.push(IM_END);
                rest = r;
            } else {
                // Byte tokens, a whole character at a time (a character may take several).
                let n = rest.chars().next().map_or(1, char::len_utf8);
                ids.extend(
                    rest.as_bytes()[..n]
                        .iter()
                        .map(|&b| TokenId::from(b) + BYTE_OFFSET),
                );
                rest = &rest[n..];
            }
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[TokenId]) -> Result<String, FormatError> {
        let bytes: Vec<u8> = ids
            .iter()
            .filter(|&&id| (BYTE_OFFSET..BYTE_OFFSET + 256).contains(&id))
            .map(|&id| (id - BYTE_OFFSET) as u8)
            .collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn stop_token_ids(&self) -> Vec<TokenId> {
        vec![IM_END]
    }

    fn fingerprint(&self) -> String {
        "toy-bytes-chatml-v1".to_string()
    }
}
