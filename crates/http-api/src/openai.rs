//! `POST /v1/chat/completions` (OpenAI Chat Completions).

use crate::auth::Access;
use crate::error::{ApiError, Flavor};
use crate::generation;
use crate::identity;
use crate::json::read_json;
use crate::request::{check_range, max_tokens, offered_tools, split_answer, stops, ToolMode};
use crate::sse::{self, Translator};
use crate::stream_text::StreamText;
use crate::tools::ParsedToolCall;
use crate::util::{random_id, unix_now};
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

/// The request body (fields the server does not know are ignored).
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    #[allow(dead_code)] // any model name is accepted: one model is served
    model: Option<String>,
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<i64>,
    stop: Option<StopField>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    tools: Option<Vec<ToolSpec>>,
    tool_choice: Option<Value>,
    user: Option<String>,
    prompt_cache_key: Option<String>,
    n: Option<u64>,
    logprobs: Option<bool>,
    top_logprobs: Option<u64>,
    response_format: Option<Value>,
    logit_bias: Option<Map<String, Value>>,
    functions: Option<Value>,
    function_call: Option<Value>,
    audio: Option<Value>,
    modalities: Option<Vec<String>>,
    prediction: Option<Value>,
    // Extensions (as vLLM and llama.cpp accept them).
    top_k: Option<u32>,
    min_p: Option<f32>,
    repetition_penalty: Option<f32>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
    name: Option<String>,
    tool_calls: Option<Vec<ToolCallIn>>,
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
    refusal: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ToolCallIn {
    id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    function: FunctionIn,
}

#[derive(Debug, Deserialize)]
struct FunctionIn {
    name: String,
    arguments: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct ToolSpec {
    #[serde(rename = "type")]
    kind: String,
    function: Option<FunctionSpec>,
}

#[derive(Debug, Deserialize)]
struct FunctionSpec {
    name: String,
    description: Option<String>,
    parameters: Option<Value>,
}

/// A validated request, ready to run.
struct Plan {
    request: GenerateRequest,
    stream: bool,
    include_usage: bool,
    tool_names: Vec<String>,
}

fn content_text(content: Option<Content>, i: usize) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.into_iter().enumerate() {
                let param = format!("messages[{i}].content[{j}]");
                match p.kind.as_str() {
                    "text" => texts.push(p.text.unwrap_or_default()),
                    "refusal" => texts.push(p.refusal.unwrap_or_default()),
                    "image_url" | "input_image" => {
                        return Err(ApiError::invalid(
                            format!("{param}.type"),
                            "image inputs are not supported: the served model reads text only",
                        ))
                    }
                    "input_audio" | "file" => {
                        return Err(ApiError::invalid(
                            format!("{param}.type"),
                            format!("'{}' content parts are not supported: text only", p.kind),
                        ))
                    }
                    other => {
                        return Err(ApiError::invalid(
                            format!("{param}.type"),
                            format!("unknown content part type '{other}'"),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
    }
}

fn arguments_value(arguments: Option<Value>) -> Value {
    match arguments {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) => serde_json::from_str::<Value>(&s).unwrap_or(Value::String(s)),
        Some(v) => v,
    }
}

fn tool_mode(choice: Option<&Value>) -> Result<ToolMode, ApiError> {
    let bad = || {
        ApiError::invalid(
            "tool_choice",
            "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    };
    match choice {
        None | Some(Value::Null) => Ok(ToolMode::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(ToolMode::None),
            "auto" => Ok(ToolMode::Auto),
            "required" => Ok(ToolMode::Required),
            _ => Err(bad()),
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|_| o.get("type").and_then(Value::as_str) == Some("function"));
            name.map(|n| ToolMode::Named(n.to_string())).ok_or_else(bad)
        }
        Some(_) => Err(bad()),
    }
}

fn reject_unsupported(r: &ChatRequest) -> Result<(), ApiError> {
    if r.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    if r.logprobs == Some(true) {
        return Err(ApiError::invalid(
            "logprobs",
            "log probabilities are not supported",
        ));
    }
    if r.top_logprobs.is_some_and(|n| n > 0) {
        return Err(ApiError::invalid(
            "top_logprobs",
            "log probabilities are not supported",
        ));
    }
    if let Some(f) = &r.response_format {
        if !f.is_null() && f.get("type").and_then(Value::as_str) != Some("text") {
            return Err(ApiError::invalid(
                "response_format",
                "only {\"type\": \"text\"} is supported (no JSON mode or schemas)",
            ));
        }
    }
    if r.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(ApiError::invalid(
            "logit_bias",
            "logit bias is not supported",
        ));
    }
    if r.functions.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            "functions",
            "deprecated and not supported: use tools",
        ));
    }
    if r.function_call.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            "function_call",
            "deprecated and not supported: use tool_choice",
        ));
    }
    if r.audio.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid("audio", "audio output is not supported"));
    }
    if let Some(m) = &r.modalities {
        if m.iter().any(|x| x != "text") {
            return Err(ApiError::invalid(
                "modalities",
                "only [\"text\"] is supported",
            ));
        }
    }
    if r.prediction.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            "prediction",
            "predicted outputs are not supported",
        ));
    }
    Ok(())
}

fn plan(
    ctx: &Shared,
    headers: &axum::http::HeaderMap,
    r: ChatRequest,
    namespace: agent_session::Namespace,
) -> Result<Plan, ApiError> {
    reject_unsupported(&r)?;
    if r.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "at least one message is required",
        ));
    }
    check_range("temperature", r.temperature, 0.0, 2.0)?;
    check_range("top_p", r.top_p, 0.0, 1.0)?;
    check_range("min_p", r.min_p, 0.0, 1.0)?;
    check_range("presence_penalty", r.presence_penalty, -2.0, 2.0)?;
    check_range("frequency_penalty", r.frequency_penalty, -2.0, 2.0)?;
    check_range("repetition_penalty", r.repetition_penalty, 0.0, 10.0)?;
    if r.repetition_penalty == Some(0.0) {
        return Err(ApiError::invalid(
            "repetition_penalty",
            "must be greater than 0",
        ));
    }
    let max = match (r.max_completion_tokens, r.max_tokens) {
        (Some(v), _) => Some(max_tokens("max_completion_tokens", v)?),
        (None, Some(v)) => Some(max_tokens("max_tokens", v)?),
        (None, None) => None,
    };

    // Tools.
    let mut tools = Vec::new();
    for (i, t) in r.tools.unwrap_or_default().into_iter().enumerate() {
        if t.kind != "function" {
            return Err(ApiError::invalid(
                format!("tools[{i}].type"),
                format!("tool type '{}' is not supported: only \"function\"", t.kind),
            ));
        }
        let f = t.function.ok_or_else(|| {
            ApiError::invalid(
                format!("tools[{i}].function"),
                "a function tool needs a function",
            )
        })?;
        if f.name.trim().is_empty() {
            return Err(ApiError::invalid(
                format!("tools[{i}].function.name"),
                "the name may not be empty",
            ));
        }
        tools.push(ToolDefinition {
            name: f.name,
            description: f.description.unwrap_or_default(),
            parameters: match f.parameters {
                Some(p) => {
                    crate::request::tool_schema(&format!("tools[{i}].function.parameters"), p)?
                }
                None => json!({"type": "object", "properties": {}}),
            },
        });
    }
    let mode = tool_mode(r.tool_choice.as_ref())?;
    let tools = offered_tools(tools, &mode, "tool_choice")?;

    // Messages.
    let mut messages = Vec::with_capacity(r.messages.len());
    let mut call_names: HashMap<String, String> = HashMap::new();
    for (i, m) in r.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" | "function" => Role::Tool,
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("unknown role '{other}'"),
                ))
            }
        };
        let content = content_text(m.content, i)?;
        let mut message = Message::text(role, content);
        match role {
            Role::Assistant => {
                for (j, c) in m.tool_calls.unwrap_or_default().into_iter().enumerate() {
                    if c.kind.as_deref().is_some_and(|k| k != "function") {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].tool_calls[{j}].type"),
                            "only function tool calls are supported",
                        ));
                    }
                    let id = c.id.unwrap_or_else(|| format!("call_{i}_{j}"));
                    call_names.insert(id.clone(), c.function.name.clone());
                    message.tool_calls.push(ToolCall {
                        id,
                        name: c.function.name,
                        arguments: arguments_value(c.function.arguments),
                    });
                }
            }
            Role::Tool => {
                message.name = m.name.or_else(|| {
                    m.tool_call_id
                        .as_ref()
                        .and_then(|id| call_names.get(id).cloned())
                });
                message.tool_call_id = m.tool_call_id;
            }
            _ => message.name = m.name,
        }
        messages.push(message);
    }

    let agent = identity::resolve(
        headers,
        &[
            ("prompt_cache_key", r.prompt_cache_key.as_deref()),
            ("user", r.user.as_deref()),
        ],
    )?;
    let stop = match r.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    let params = SamplingParams {
        temperature: r.temperature.unwrap_or(ctx.defaults.temperature),
        top_p: r.top_p.unwrap_or(1.0),
        top_k: r.top_k.unwrap_or(0),
        min_p: r.min_p.unwrap_or(0.0),
        seed: r.seed.map(|s| s as u64),
        repetition_penalty: r.repetition_penalty.unwrap_or(1.0),
        presence_penalty: r.presence_penalty.unwrap_or(0.0),
        frequency_penalty: r.frequency_penalty.unwrap_or(0.0),
    };
    let tool_names = tools.iter().map(|t| t.name.clone()).collect();
    Ok(Plan {
        request: GenerateRequest {
            agent,
            namespace,
            conversation: Conversation { messages, tools },
            params,
            max_tokens: max,
            stop: stops(stop),
        },
        stream: r.stream.unwrap_or(false),
        include_usage: r
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        tool_names,
    })
}

/// The handler.
pub(crate) async fn chat_completions(State(ctx): State<Shared>, req: Request) -> Response {
    match handle(ctx, req).await {
        Ok(r) => r,
        Err(e) => e.into_response_for(Flavor::OpenAi),
    }
}

async fn handle(ctx: Shared, req: Request) -> Result<Response, ApiError> {
    let start = Instant::now();
    ctx.check_ready()?;
    let caller = ctx.keys.authorize(req.headers(), Access::Generate)?;
    let headers = req.headers().clone();
    let body: ChatRequest = read_json(req, ctx.limits.max_body_bytes).await?;
    let plan = plan(&ctx, &headers, body, caller.namespace())?;
    let agent = plan.request.agent.clone();
    let running = generation::start(&ctx, plan.request, "openai", start).await?;
    let response_headers = generation::response_headers(&running.report, agent.as_ref());
    let meta = Meta {
        id: format!("chatcmpl-{}", random_id(24)),
        created: unix_now(),
        model: ctx.service.model().id.clone(),
        fingerprint: format!("fp_{}", short(&ctx.service.model().fingerprint)),
    };
    if plan.stream {
        let mut translator = StreamTranslator {
            meta,
            include_usage: plan.include_usage,
            answer: StreamText::new(!plan.tool_names.is_empty()),
            tool_names: plan.tool_names,
            report: running.report.clone(),
            role_sent: false,
        };
        // Without tools the answer is text: its role chunk goes out at once. With tools the
        // answer may be only tool calls, whose role chunk carries `content: null` (as the
        // real API sends it, and as the non-streamed message has it), so it waits.
        let initial = if !translator.answer.tools() {
            translator.role_chunk().into_iter().collect()
        } else {
            Vec::new()
        };
        Ok(sse::response(
            running,
            translator,
            initial,
            KeepAlive::new().interval(ctx.limits.sse_keep_alive),
            response_headers,
        ))
    } else {
        let completion = running.collect().await?;
        let body = completion_body(&meta, &completion, &plan.tool_names);
        let headers = generation::with_persistence(response_headers, &completion.persistence);
        Ok((headers, Json(body)).into_response())
    }
}

fn short(s: &str) -> String {
    s.chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect()
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    fingerprint: String,
}

/// OpenAI usage: `cached_tokens` are the prompt tokens read from the cache (a subset of
/// `prompt_tokens`).
fn usage(report: &CacheReport, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": report.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": report.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": report.reused_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

fn finish_reason(reason: &FinishReason, tool_calls: bool) -> &'static str {
    if tool_calls {
        return "tool_calls";
    }
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop | FinishReason::StopSequence(_) => "stop",
    }
}

fn tool_call_json(call: &ParsedToolCall) -> Value {
    json!({
        "id": format!("call_{}", random_id(24)),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments.to_string()},
    })
}

fn completion_body(meta: &Meta, c: &Completion, tool_names: &[String]) -> Value {
    let parsed = split_answer(&c.text, tool_names);
    let has_calls = !parsed.calls.is_empty();
    let mut message = json!({
        "role": "assistant",
        "content": if has_calls && parsed.text.is_empty() { Value::Null } else { Value::String(parsed.text) },
        "refusal": null,
    });
    if has_calls {
        message["tool_calls"] = parsed.calls.iter().map(tool_call_json).collect();
    }
    json!({
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": meta.fingerprint,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": finish_reason(&c.finish_reason, has_calls),
        }],
        "usage": usage(&c.cache, c.token_ids.len()),
    })
}

struct StreamTranslator {
    meta: Meta,
    include_usage: bool,
    answer: StreamText,
    tool_names: Vec<String>,
    report: CacheReport,
    /// Whether the first chunk (the one with `role`) went out.
    role_sent: bool,
}

impl StreamTranslator {
    /// The first chunk of a text answer, `{"role": "assistant", "content": "", "refusal":
    /// null}`, unless it went out already.
    fn role_chunk(&mut self) -> Option<Event> {
        if self.role_sent {
            return None;
        }
        self.role_sent = true;
        Some(self.chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
        ))
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Event {
        let mut v = json!({
            "id": self.meta.id,
            "object": "chat.completion.chunk",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": self.meta.fingerprint,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        sse::data(&v)
    }
}

impl Translator for StreamTranslator {
    fn on_delta(&mut self, text: String) -> Vec<Event> {
        let out = self.answer.push(&text);
        if out.is_empty() {
            Vec::new()
        } else {
            let mut events: Vec<Event> = self.role_chunk().into_iter().collect();
            events.push(self.chunk(json!({"content": out}), None));
            events
        }
    }

    fn on_finished(&mut self, c: Completion) -> Vec<Event> {
        let mut events = Vec::new();
        let mut has_calls = false;
        let text = std::mem::replace(&mut self.answer, StreamText::new(false));
        if text.tools() {
            let parsed = text.finish(&c.text, &self.tool_names);
            has_calls = !parsed.calls.is_empty();
            if !parsed.text.is_empty() {
                events.extend(self.role_chunk());
                events.push(self.chunk(json!({"content": parsed.text}), None));
            }
            for (index, call) in parsed.calls.iter().enumerate() {
                let full = tool_call_json(call);
                let mut delta = json!({"tool_calls": [{
                    "index": index,
                    "id": full["id"],
                    "type": "function",
                    "function": {"name": call.name, "arguments": ""},
                }]});
                if !self.role_sent {
                    // A tool-call-only answer: no text, so `content` is null, not "".
                    self.role_sent = true;
                    delta["role"] = json!("assistant");
                    delta["content"] = Value::Null;
                    delta["refusal"] = Value::Null;
                }
                events.push(self.chunk(delta, None));
                events.push(self.chunk(
                    json!({"tool_calls": [{
                        "index": index,
                        "function": {"arguments": full["function"]["arguments"]},
                    }]}),
                    None,
                ));
            }
        }
        events.extend(self.role_chunk());
        events.push(self.chunk(json!({}), Some(finish_reason(&c.finish_reason, has_calls))));
        if self.include_usage {
            events.push(sse::data(&json!({
                "id": self.meta.id,
                "object": "chat.completion.chunk",
                "created": self.meta.created,
                "model": self.meta.model,
                "system_fingerprint": self.meta.fingerprint,
                "choices": [],
                "usage": usage(&self.report, c.token_ids.len()),
            })));
        }
        events.push(Event::default().data("[DONE]"));
        events
    }

    fn on_error(&mut self, error: ApiError) -> Vec<Event> {
        // The OpenAI SDKs raise on a data payload with an "error" member.
        vec![sse::data(&error.body(Flavor::OpenAi))]
    }
}
