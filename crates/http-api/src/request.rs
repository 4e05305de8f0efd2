//! Pieces of request handling shared by the OpenAI and Anthropic routes.

use crate::error::ApiError;
use crate::tools::{parse_tool_calls, ParsedOutput};
use agent_session::{FinishReason, ToolDefinition};

/// How the client wants tools used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ToolMode {
    /// No tools in the prompt (`none`).
    None,
    /// The model decides (`auto`, the default).
    Auto,
    /// The model should call some tool (`required` / `any`): all tools offered; not enforced
    /// by decoding.
    Required,
    /// The model should call this tool: only it is offered.
    Named(String),
}

/// The tools to put into the conversation for `mode`.
pub(crate) fn offered_tools(
    tools: Vec<ToolDefinition>,
    mode: &ToolMode,
    choice_param: &str,
) -> Result<Vec<ToolDefinition>, ApiError> {
    match mode {
        ToolMode::None => Ok(Vec::new()),
        ToolMode::Auto => Ok(tools),
        ToolMode::Required => {
            if tools.is_empty() {
                Err(ApiError::invalid(
                    choice_param,
                    "a tool call is required but no tools are given",
                ))
            } else {
                Ok(tools)
            }
        }
        ToolMode::Named(name) => {
            let chosen: Vec<ToolDefinition> =
                tools.into_iter().filter(|t| &t.name == name).collect();
            if chosen.is_empty() {
                Err(ApiError::invalid(
                    choice_param,
                    format!("tool '{name}' is not among the given tools"),
                ))
            } else {
                Ok(chosen)
            }
        }
    }
}

/// A tool's JSON Schema (OpenAI `function.parameters`, Anthropic `input_schema`): it must
/// be a JSON object (a 400 naming the field otherwise).
pub(crate) fn tool_schema(
    param: &str,
    schema: serde_json::Value,
) -> Result<serde_json::Value, ApiError> {
    if schema.is_object() {
        Ok(schema)
    } else {
        let kind = match &schema {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "a boolean",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::Object(_) => "an object",
        };
        Err(ApiError::invalid(
            param,
            format!("must be a JSON Schema object, not {kind}"),
        ))
    }
}

/// Checks that an optional number lies in `lo..=hi`.
pub(crate) fn check_range(
    param: &str,
    value: Option<f32>,
    lo: f32,
    hi: f32,
) -> Result<(), ApiError> {
    match value {
        Some(v) if !(lo..=hi).contains(&v) || v.is_nan() => Err(ApiError::invalid(
            param,
            format!("{v} is out of range: must be between {lo} and {hi}"),
        )),
        _ => Ok(()),
    }
}

/// A `max_tokens` value: at least 1; very large values are capped (the service also caps it
/// to the context window).
pub(crate) fn max_tokens(param: &str, value: u64) -> Result<u32, ApiError> {
    if value == 0 {
        return Err(ApiError::invalid(param, "must be at least 1"));
    }
    Ok(u32::try_from(value).unwrap_or(u32::MAX))
}

/// Stop strings without empty ones.
pub(crate) fn stops(list: Vec<String>) -> Vec<String> {
    list.into_iter().filter(|s| !s.is_empty()).collect()
}

/// Splits the answer into text and tool calls when tools were offered.
pub(crate) fn split_answer(text: &str, tool_names: &[String]) -> ParsedOutput {
    if tool_names.is_empty() {
        ParsedOutput {
            text: text.to_string(),
            calls: Vec::new(),
        }
    } else {
        parse_tool_calls(text, tool_names)
    }
}

/// The stop string that ended generation, if one did.
pub(crate) fn stop_sequence(reason: &FinishReason) -> Option<&str> {
    match reason {
        FinishReason::StopSequence(s) => Some(s),
        _ => None,
    }
}
