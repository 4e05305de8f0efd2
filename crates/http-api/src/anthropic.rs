//! `POST /v1/messages` and `POST /v1/messages/count_tokens` (Anthropic Messages).

use crate::auth::Access;
use crate::error::{ApiError, Flavor};
use crate::generation;
use crate::identity;
use crate::json::read_json;
use crate::request::{
    check_range, max_tokens, offered_tools, split_answer, stop_sequence, stops, ToolMode,
};
use crate::sse::{self, Translator};
use crate::stream_text::StreamText;
use crate::tools::ParsedToolCall;
use crate::util::random_id;
use crate::Shared;
use agent_session::{
    CacheReport, Completion, Conversation, FinishReason, GenerateRequest, Message, Role,
    SamplingParams, ToolCall, ToolDefinition,
};
use axum::extract::{Request, State};
use axum::response::sse::{Event, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::time::Instant;

/// The request body of both routes (`count_tokens` ignores the sampling fields).
#[derive(Debug, Deserialize)]
pub(crate) struct MessagesRequest {
    #[allow(dead_code)] // any model name is accepted: one model is served
    model: Option<String>,
    messages: Vec<InMessage>,
    max_tokens: Option<u64>,
    system: Option<SystemField>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u64>,
    stop_sequences: Option<Vec<String>>,
    stream: Option<bool>,
    tools: Option<Vec<InTool>>,
    tool_choice: Option<Value>,
    metadata: Option<InMetadata>,
    mcp_servers: Option<Vec<Value>>,
    /// Accepted and ignored: no thinking blocks are produced (`enabled`, `disabled` and
    /// `adaptive` alike).
    #[allow(dead_code)]
    thinking: Option<Value>,
    /// Accepted and ignored (Claude Code's `clear_thinking` edits: nothing to clear).
    #[allow(dead_code)]
    context_management: Option<Value>,
    /// Accepted and ignored (`effort`, output format hints).
    #[allow(dead_code)]
    output_config: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SystemField {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    content: BlocksOrText,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum BlocksOrText {
    Text(String),
    Blocks(Vec<Block>),
}

/// A content block; which fields matter depends on `type` (unknown fields such as
/// `cache_control` or `citations` are ignored).
#[derive(Debug, Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    id: Option<String>,
    name: Option<String>,
    input: Option<Value>,
    tool_use_id: Option<String>,
    content: Option<BlocksOrText>,
    is_error: Option<bool>,
    /// The tool a `tool_reference` block names.
    tool_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct InTool {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    description: Option<String>,
    input_schema: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct InMetadata {
    user_id: Option<String>,
}

/// How Claude Code's billing line starts: a text block it puts first in `system`
/// (`x-anthropic-billing-header: cc_version=2.1.332.573; cc_entrypoint=sdk-cli;`), whose
/// `cc_version` suffix changes with the prompt. It is request metadata, not instructions:
/// left in the prompt it would make the very first block of every run differ, so that no
/// run would read the cached system prompt and tools of the one before. It is dropped from
/// the top-level `system` (generation and `count_tokens` alike).
const BILLING_HEADER_PREFIX: &str = "x-anthropic-billing-header:";

fn system_text(system: Option<SystemField>) -> Result<Option<String>, ApiError> {
    match system {
        None => Ok(None),
        Some(SystemField::Text(t)) => Ok(Some(t).filter(|t| !t.is_empty())),
        Some(SystemField::Blocks(blocks)) => {
            Ok(Some(system_blocks_text(blocks, "system", true)?).filter(|t| !t.is_empty()))
        }
    }
}

/// The text of system blocks (text blocks only; `cache_control` and the like ignored),
/// without billing-header blocks when `drop_billing`.
fn system_blocks_text(
    blocks: Vec<Block>,
    param: &str,
    drop_billing: bool,
) -> Result<String, ApiError> {
    let mut texts = Vec::new();
    for (j, b) in blocks.into_iter().enumerate() {
        if b.kind != "text" {
            return Err(ApiError::invalid(
                format!("{param}[{j}].type"),
                format!("system blocks must be text, not '{}'", b.kind),
            ));
        }
        let text = b.text.unwrap_or_default();
        if drop_billing && text.starts_with(BILLING_HEADER_PREFIX) {
            continue;
        }
        texts.push(text);
    }
    Ok(texts.join("\n"))
}

fn unsupported_block(param: String, kind: &str) -> ApiError {
    match kind {
        "image" | "document" => ApiError::invalid(
            param,
            format!("'{kind}' blocks are not supported: the served model reads text only"),
        ),
        other => ApiError::invalid(
            param,
            format!("content block type '{other}' is not supported here"),
        ),
    }
}

fn tool_result_text(content: Option<BlocksOrText>, param: &str) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(BlocksOrText::Text(t)) => Ok(t),
        Some(BlocksOrText::Blocks(blocks)) => {
            let mut texts = Vec::new();
            for (k, b) in blocks.into_iter().enumerate() {
                match b.kind.as_str() {
                    "text" => texts.push(b.text.unwrap_or_default()),
                    // What a tool search returns: the tool is offered already (every tool is
                    // in the prompt, `defer_loading` or not), so it is only noted.
                    "tool_reference" => {
                        texts.push(format!("Tool loaded: {}", b.tool_name.unwrap_or_default()))
                    }
                    kind => {
                        return Err(unsupported_block(
                            format!("{param}.content[{k}].type"),
                            kind,
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
    }
}

/// Converts the Anthropic messages to the API-neutral conversation. A user turn's
/// `tool_result` blocks become tool messages (before the turn's text, as Anthropic requires
/// them first); an assistant turn's `tool_use` blocks become its tool calls; thinking blocks
/// are dropped (the server does not produce them). A `system` message (text or text blocks,
/// as Claude Code sends mid-conversation) stays a system message where it stands.
fn conversation_messages(
    system: Option<String>,
    input: Vec<InMessage>,
) -> Result<Vec<Message>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "at least one message is required",
        ));
    }
    let mut out = Vec::with_capacity(input.len() + 1);
    if let Some(s) = system {
        out.push(Message::text(Role::System, s));
    }
    let mut call_names: HashMap<String, String> = HashMap::new();
    for (i, m) in input.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "system" => {
                let text = match m.content {
                    BlocksOrText::Text(t) => t,
                    BlocksOrText::Blocks(b) => {
                        system_blocks_text(b, &format!("messages[{i}].content"), false)?
                    }
                };
                out.push(Message::text(Role::System, text));
                continue;
            }
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("role must be \"user\", \"assistant\" or \"system\", not '{other}'"),
                ))
            }
        };
        let blocks = match m.content {
            BlocksOrText::Text(t) => {
                out.push(Message::text(role, t));
                continue;
            }
            BlocksOrText::Blocks(b) => b,
        };
        let mut texts: Vec<String> = Vec::new();
        let mut calls: Vec<ToolCall> = Vec::new();
        for (j, b) in blocks.into_iter().enumerate() {
            let param = format!("messages[{i}].content[{j}]");
            match (role, b.kind.as_str()) {
                (_, "text") => texts.push(b.text.unwrap_or_default()),
                (_, "thinking" | "redacted_thinking") => {}
                (Role::Assistant, "tool_use") => {
                    let name = b.name.filter(|n| !n.is_empty()).ok_or_else(|| {
                        ApiError::invalid(format!("{param}.name"), "a tool_use block needs a name")
                    })?;
                    let id = b.id.unwrap_or_else(|| format!("toolu_{i}_{j}"));
                    call_names.insert(id.clone(), name.clone());
                    calls.push(ToolCall {
                        id,
                        name,
                        arguments: b.input.unwrap_or_else(|| Value::Object(Map::new())),
                    });
                }
                (Role::User, "tool_result") => {
                    let id = b.tool_use_id.ok_or_else(|| {
                        ApiError::invalid(
                            format!("{param}.tool_use_id"),
                            "a tool_result block needs tool_use_id",
                        )
                    })?;
                    let mut text = tool_result_text(b.content, &param)?;
                    if b.is_error == Some(true) {
                        text = format!("Error: {text}");
                    }
                    let mut tool = Message::text(Role::Tool, text);
                    tool.name = call_names.get(&id).cloned();
                    tool.tool_call_id = Some(id);
                    out.push(tool);
                }
                (_, kind) => return Err(unsupported_block(format!("{param}.type"), kind)),
            }
        }
        if role == Role::Assistant || !texts.is_empty() {
            let mut message = Message::text(role, texts.join("\n"));
            message.tool_calls = calls;
            out.push(message);
        }
    }
    Ok(out)
}

fn tool_mode(choice: Option<&Value>) -> Result<ToolMode, ApiError> {
    let bad = || {
        ApiError::invalid(
            "tool_choice",
            "must be {\"type\": \"auto\" | \"any\" | \"none\"} or {\"type\": \"tool\", \"name\": ...}",
        )
    };
    let Some(choice) = choice.filter(|c| !c.is_null()) else {
        return Ok(ToolMode::Auto);
    };
    match choice.get("type").and_then(Value::as_str) {
        Some("auto") => Ok(ToolMode::Auto),
        Some("any") => Ok(ToolMode::Required),
        Some("none") => Ok(ToolMode::None),
        Some("tool") => choice
            .get("name")
            .and_then(Value::as_str)
            .map(|n| ToolMode::Named(n.to_string()))
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

fn tools(
    input: Option<Vec<InTool>>,
    choice: Option<&Value>,
) -> Result<Vec<ToolDefinition>, ApiError> {
    let mut tools = Vec::new();
    for (i, t) in input.unwrap_or_default().into_iter().enumerate() {
        if let Some(kind) = t.kind.as_deref().filter(|k| *k != "custom") {
            return Err(ApiError::invalid(
                format!("tools[{i}].type"),
                format!(
                    "server tool '{kind}' is not supported: only custom tools (with input_schema)"
                ),
            ));
        }
        if t.name.trim().is_empty() {
            return Err(ApiError::invalid(
                format!("tools[{i}].name"),
                "the name may not be empty",
            ));
        }
        let schema = t.input_schema.ok_or_else(|| {
            ApiError::invalid(
                format!("tools[{i}].input_schema"),
                "a custom tool needs input_schema",
            )
        })?;
        tools.push(ToolDefinition {
            name: t.name,
            description: t.description.unwrap_or_default(),
            parameters: crate::request::tool_schema(&format!("tools[{i}].input_schema"), schema)?,
        });
    }
    offered_tools(tools, &tool_mode(choice)?, "tool_choice")
}

/// A validated request, ready to run.
struct Plan {
    request: GenerateRequest,
    stream: bool,
    tool_names: Vec<String>,
}

fn plan(
    ctx: &Shared,
    headers: &axum::http::HeaderMap,
    r: MessagesRequest,
    namespace: agent_session::Namespace,
) -> Result<Plan, ApiError> {
    let max = max_tokens(
        "max_tokens",
        r.max_tokens
            .ok_or_else(|| ApiError::invalid("max_tokens", "field required"))?,
    )?;
    check_range("temperature", r.temperature, 0.0, 1.0)?;
    check_range("top_p", r.top_p, 0.0, 1.0)?;
    if r.mcp_servers.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(ApiError::invalid(
            "mcp_servers",
            "MCP servers are not supported",
        ));
    }
    let tools = tools(r.tools, r.tool_choice.as_ref())?;
    let messages = conversation_messages(system_text(r.system)?, r.messages)?;
    let user_id = r.metadata.as_ref().and_then(|m| m.user_id.as_deref());
    let agent = identity::resolve(headers, &[("metadata.user_id", user_id)])?;
    let params = SamplingParams {
        temperature: r.temperature.unwrap_or(ctx.defaults.temperature),
        top_p: r.top_p.unwrap_or(1.0),
        top_k: r.top_k.map_or(0, |k| u32::try_from(k).unwrap_or(u32::MAX)),
        ..SamplingParams::greedy()
    };
    let tool_names = tools.iter().map(|t| t.name.clone()).collect();
    Ok(Plan {
        request: GenerateRequest {
            agent,
            namespace,
            conversation: Conversation { messages, tools },
            params,
            max_tokens: Some(max),
            stop: stops(r.stop_sequences.unwrap_or_default()),
        },
        stream: r.stream.unwrap_or(false),
        tool_names,
    })
}

/// `POST /v1/messages`.
pub(crate) async fn messages(State(ctx): State<Shared>, req: Request) -> Response {
    match handle(ctx, req).await {
        Ok(r) => r,
        Err(e) => e.into_response_for(Flavor::Anthropic),
    }
}

/// `POST /v1/messages/count_tokens`: the exact prompt length generation would see.
pub(crate) async fn count_tokens(State(ctx): State<Shared>, req: Request) -> Response {
    let result = async {
        ctx.check_ready()?;
        ctx.keys.authorize(req.headers(), Access::Generate)?;
        let r: MessagesRequest = read_json(req, ctx.limits.max_body_bytes).await?;
        let tools = tools(r.tools, r.tool_choice.as_ref())?;
        let messages = conversation_messages(system_text(r.system)?, r.messages)?;
        let tokens = ctx
            .service
            .prompt_tokens(&Conversation { messages, tools })
            .await
            .map_err(ApiError::from)?;
        Ok::<_, ApiError>(Json(json!({"input_tokens": tokens.len()})).into_response())
    }
    .await;
    result.unwrap_or_else(|e| e.into_response_for(Flavor::Anthropic))
}

async fn handle(ctx: Shared, req: Request) -> Result<Response, ApiError> {
    let start = Instant::now();
    ctx.check_ready()?;
    let caller = ctx.keys.authorize(req.headers(), Access::Generate)?;
    let headers = req.headers().clone();
    let body: MessagesRequest = read_json(req, ctx.limits.max_body_bytes).await?;
    let plan = plan(&ctx, &headers, body, caller.namespace())?;
    let agent = plan.request.agent.clone();
    let running = generation::start(&ctx, plan.request, "anthropic", start).await?;
    let response_headers = generation::response_headers(&running.report, agent.as_ref());
    let id = format!("msg_{}", random_id(24));
    let model = ctx.service.model().id.clone();
    if plan.stream {
        let translator = StreamTranslator {
            answer: StreamText::new(!plan.tool_names.is_empty()),
            tool_names: plan.tool_names,
            text_index: None,
            next_index: 0,
        };
        let start_message = json!({
            "type": "message_start",
            "message": {
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage(&running.report, 0),
            }
        });
        let initial = vec![sse::named("message_start", &start_message), ping()];
        Ok(sse::response(
            running,
            translator,
            initial,
            KeepAlive::new()
                .interval(ctx.limits.sse_keep_alive)
                .event(ping()),
            response_headers,
        ))
    } else {
        let completion = running.collect().await?;
        let parsed = split_answer(&completion.text, &plan.tool_names);
        let mut content: Vec<Value> = Vec::new();
        if !parsed.text.is_empty() || parsed.calls.is_empty() {
            content.push(json!({"type": "text", "text": parsed.text}));
        }
        content.extend(
            parsed
                .calls
                .iter()
                .map(|c| tool_use_block(c, c.arguments.clone())),
        );
        let body = json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason(&completion.finish_reason, !parsed.calls.is_empty()),
            "stop_sequence": stop_sequence(&completion.finish_reason),
            "usage": usage(&completion.cache, completion.token_ids.len()),
        });
        let headers = generation::with_persistence(response_headers, &completion.persistence);
        Ok((headers, Json(body)).into_response())
    }
}

fn ping() -> Event {
    sse::named("ping", &json!({"type": "ping"}))
}

/// Anthropic usage: the three input counts are disjoint and add up to the prompt length.
/// `cache_read_input_tokens` were reused, `cache_creation_input_tokens` were computed and
/// written to the cache as whole blocks, `input_tokens` are the rest.
fn usage(report: &CacheReport, output_tokens: usize) -> Value {
    json!({
        "input_tokens": report.uncached_tokens(),
        "cache_creation_input_tokens": report.created_tokens,
        "cache_read_input_tokens": report.reused_tokens,
        "output_tokens": output_tokens,
    })
}

fn stop_reason(reason: &FinishReason, tool_use: bool) -> &'static str {
    if tool_use {
        return "tool_use";
    }
    match reason {
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::StopSequence(_) => "stop_sequence",
    }
}

fn tool_use_block(call: &ParsedToolCall, input: Value) -> Value {
    json!({
        "type": "tool_use",
        "id": format!("toolu_{}", random_id(24)),
        "name": call.name,
        "input": input,
    })
}

struct StreamTranslator {
    answer: StreamText,
    tool_names: Vec<String>,
    /// Index of the open text block, if one is open.
    text_index: Option<usize>,
    next_index: usize,
}

impl StreamTranslator {
    fn text(&mut self, text: String, events: &mut Vec<Event>) {
        if text.is_empty() {
            return;
        }
        let index = match self.text_index {
            Some(i) => i,
            None => {
                let i = self.next_index;
                self.next_index += 1;
                self.text_index = Some(i);
                events.push(sse::named(
                    "content_block_start",
                    &json!({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}),
                ));
                i
            }
        };
        events.push(sse::named(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}}),
        ));
    }

    fn close_text(&mut self, events: &mut Vec<Event>) {
        if let Some(i) = self.text_index.take() {
            events.push(sse::named(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": i}),
            ));
        }
    }
}

impl Translator for StreamTranslator {
    fn on_delta(&mut self, text: String) -> Vec<Event> {
        let out = self.answer.push(&text);
        let mut events = Vec::new();
        self.text(out, &mut events);
        events
    }

    fn on_finished(&mut self, c: Completion) -> Vec<Event> {
        let mut events = Vec::new();
        let text = std::mem::replace(&mut self.answer, StreamText::new(false));
        let parsed = text.finish(&c.text, &self.tool_names);
        self.text(parsed.text, &mut events);
        let calls = parsed.calls;
        if self.next_index == 0 && calls.is_empty() {
            // Always at least one (possibly empty) text block, as the API does.
            let i = self.next_index;
            self.next_index += 1;
            events.push(sse::named(
                "content_block_start",
                &json!({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}),
            ));
            events.push(sse::named(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": i}),
            ));
        }
        self.close_text(&mut events);
        for call in &calls {
            let i = self.next_index;
            self.next_index += 1;
            events.push(sse::named(
                "content_block_start",
                &json!({"type": "content_block_start", "index": i, "content_block": tool_use_block(call, json!({}))}),
            ));
            events.push(sse::named(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": call.arguments.to_string()}}),
            ));
            events.push(sse::named(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": i}),
            ));
        }
        events.push(sse::named(
            "message_delta",
            &json!({
                "type": "message_delta",
                "delta": {
                    "stop_reason": stop_reason(&c.finish_reason, !calls.is_empty()),
                    "stop_sequence": stop_sequence(&c.finish_reason),
                },
                // The real API repeats the input counts here (LangChain reads them here).
                "usage": usage(&c.cache, c.token_ids.len()),
            }),
        ));
        events.push(sse::named("message_stop", &json!({"type": "message_stop"})));
        events
    }

    fn on_error(&mut self, error: ApiError) -> Vec<Event> {
        vec![sse::named("error", &error.body(Flavor::Anthropic))]
    }
}
