//! The API-neutral conversation a chat template renders: messages, tool calls, tools.

use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the model.
    System,
    /// The user (or the calling agent).
    User,
    /// The model's earlier answers.
    Assistant,
    /// The result of a tool call.
    Tool,
}

impl Role {
    /// The role's name as chat templates expect it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// A tool call the assistant made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, echoed back by the tool result.
    pub id: String,
    /// The tool's name.
    pub name: String,
    /// The arguments as a JSON value.
    pub arguments: serde_json::Value,
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// Its text (text parts joined).
    pub content: String,
    /// Tool calls made by an assistant message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// For a tool message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// For a tool message: the tool's name, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    /// A plain text message.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolDefinition {
    /// The tool's name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// JSON Schema of its arguments.
    #[serde(default)]
    pub parameters: serde_json::Value,
}

/// Messages plus the tools offered: everything the chat template renders.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Conversation {
    /// The messages, oldest first.
    pub messages: Vec<Message>,
    /// Tools offered to the model (empty: none).
    #[serde(default)]
    pub tools: Vec<ToolDefinition>,
}

/// What a system message after the first message starts with when the chat template cannot
/// render it in place (see [`Conversation::with_inline_system_as_user`]).
pub const INLINE_SYSTEM_PREFIX: &str = "System: ";

impl Conversation {
    /// The same conversation with every system message after the first message turned into a
    /// user message whose text starts with [`INLINE_SYSTEM_PREFIX`]; `None` when there is no
    /// such message. The fallback for chat templates that accept a system message only first.
    pub fn with_inline_system_as_user(&self) -> Option<Conversation> {
        let inline = |(i, m): (usize, &Message)| i > 0 && m.role == Role::System;
        if !self.messages.iter().enumerate().any(inline) {
            return None;
        }
        let messages = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if inline((i, m)) {
                    Message::text(Role::User, format!("{INLINE_SYSTEM_PREFIX}{}", m.content))
                } else {
                    m.clone()
                }
            })
            .collect();
        Some(Conversation {
            messages,
            tools: self.tools.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_system_messages_become_prefixed_user_messages() {
        let c = Conversation {
            messages: vec![
                Message::text(Role::System, "first"),
                Message::text(Role::User, "hi"),
                Message::text(Role::System, "environment"),
            ],
            tools: Vec::new(),
        };
        let f = c
            .with_inline_system_as_user()
            .expect("an inline system message");
        assert_eq!(f.messages[0], Message::text(Role::System, "first"));
        assert_eq!(f.messages[1], Message::text(Role::User, "hi"));
        assert_eq!(
            f.messages[2],
            Message::text(Role::User, "System: environment")
        );
        let plain = Conversation {
            messages: vec![
                Message::text(Role::System, "s"),
                Message::text(Role::User, "u"),
            ],
            tools: Vec::new(),
        };
        assert!(plain.with_inline_system_as_user().is_none());
    }
}
