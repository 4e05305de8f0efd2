//! The crate's error type and its rendering in each API's own shape.
//!
//! Every failure a client can cause or observe is an [`ApiError`]; handlers render it with
//! [`ApiError::into_response_for`] in the shape of the API the route belongs to
//! ([`Flavor`]): OpenAI's `{"error":{message,type,param,code}}` or Anthropic's
//! `{"type":"error","error":{type,message}}`. [`ServiceError`] is mapped to HTTP here only.

use agent_session::{EngineError, FormatError, ServiceError};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// Anthropic's status for "overloaded" (not a standard HTTP code).
pub const STATUS_OVERLOADED_ANTHROPIC: u16 = 529;

/// Which API's error shape a route uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// OpenAI shape; also used by the agents, models, stats and health routes.
    OpenAi,
    /// Anthropic shape (`/v1/messages...`).
    Anthropic,
}

impl Flavor {
    /// The flavor of a request path: Anthropic for `/v1/messages` and below, else OpenAI.
    pub fn for_path(path: &str) -> Self {
        if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            Flavor::Anthropic
        } else {
            Flavor::OpenAi
        }
    }
}

/// Every error of the HTTP adapter.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request that is well-formed JSON but asks for something invalid or unsupported (400).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The offending field (`messages[1].content[0].type`), when one is to blame.
        param: Option<String>,
    },
    /// The body is not JSON at all (400).
    #[error("could not parse the JSON body of the request: {0}")]
    MalformedJson(String),
    /// The body is JSON but does not fit the request's schema: wrong type, missing field (422).
    #[error("{message}")]
    Unprocessable {
        /// What is wrong.
        message: String,
        /// The path of the offending field.
        param: Option<String>,
    },
    /// The prompt does not fit the model's context window (400).
    #[error("prompt is too long: {prompt_tokens} tokens, but the model's context window is {context_length} tokens")]
    ContextTooLong {
        /// Tokens of the rendered prompt.
        prompt_tokens: usize,
        /// The model's context window.
        context_length: usize,
    },
    /// The prompt cannot fit the context window by its byte length alone (400, refused
    /// before tokenizing it).
    #[error("prompt is too long: {prompt_bytes} bytes, at least {min_tokens} tokens, but the model's context window is {context_length} tokens")]
    PromptTooLarge {
        /// Bytes of the rendered prompt.
        prompt_bytes: usize,
        /// A lower bound of its tokens.
        min_tokens: usize,
        /// The model's context window.
        context_length: usize,
    },
    /// Any other client or server error with its status (a framework rejection of a
    /// request, re-shaped into the API's error body).
    #[error("{message}")]
    Status {
        /// The HTTP status (4xx or 5xx).
        status: u16,
        /// What went wrong.
        message: String,
    },
    /// No API key, or a wrong one (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key that may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// Unknown route, agent or model (404).
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body exceeds the configured limit (413).
    #[error("the request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The limit in bytes.
        limit: usize,
    },
    /// No capacity now: OpenAI 429, Anthropic 529 `overloaded_error`, with `Retry-After`.
    #[error("server overloaded: {reason}")]
    Overloaded {
        /// What is exhausted.
        reason: String,
        /// Seconds the client should wait.
        retry_after_secs: u64,
    },
    /// The server is loading or shutting down (503, with `Retry-After`).
    #[error("service unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
        /// Seconds the client should wait.
        retry_after_secs: u64,
    },
    /// The request ran past the configured time limit (504); its generation was cancelled.
    #[error("the request took longer than the limit of {limit_secs} s")]
    Timeout {
        /// The limit in seconds.
        limit_secs: u64,
    },
    /// A failure of the server itself (500).
    #[error("internal error: {0}")]
    Internal(String),
    /// Listening or serving failed (only returned by [`crate::serve`], never rendered).
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl ApiError {
    /// A 400 naming the offending field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// The HTTP status of this error when rendered for `flavor`.
    pub fn status(&self, flavor: Flavor) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::MalformedJson(_)
            | ApiError::ContextTooLong { .. }
            | ApiError::PromptTooLarge { .. } => StatusCode::BAD_REQUEST,
            ApiError::Status { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded { .. } => match flavor {
                Flavor::OpenAi => StatusCode::TOO_MANY_REQUESTS,
                Flavor::Anthropic => StatusCode::from_u16(STATUS_OVERLOADED_ANTHROPIC)
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            },
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) | ApiError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } | ApiError::Unprocessable { param, .. } => {
                param.as_deref()
            }
            ApiError::ContextTooLong { .. } | ApiError::PromptTooLarge { .. } => Some("messages"),
            _ => None,
        }
    }

    /// OpenAI's `(type, code)` for this error.
    fn openai_kind(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::InvalidRequest { .. } => ("invalid_request_error", None),
            ApiError::MalformedJson(_) => ("invalid_request_error", Some("invalid_json")),
            ApiError::Unprocessable { .. } => ("invalid_request_error", Some("invalid_body")),
            ApiError::ContextTooLong { .. } | ApiError::PromptTooLarge { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            ApiError::Status { status, .. } => match *status {
                404 => ("not_found_error", Some("not_found")),
                405 => ("invalid_request_error", Some("method_not_allowed")),
                413 => ("invalid_request_error", Some("request_too_large")),
                s if s >= 500 => ("server_error", Some("internal_error")),
                _ => ("invalid_request_error", None),
            },
            ApiError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::Forbidden(_) => ("permission_error", Some("forbidden")),
            ApiError::NotFound(_) => ("not_found_error", Some("not_found")),
            ApiError::MethodNotAllowed => ("invalid_request_error", Some("method_not_allowed")),
            ApiError::PayloadTooLarge { .. } => {
                ("invalid_request_error", Some("request_too_large"))
            }
            ApiError::Overloaded { .. } => ("rate_limit_error", Some("server_overloaded")),
            ApiError::Unavailable { .. } => ("server_error", Some("service_unavailable")),
            ApiError::Timeout { .. } => ("server_error", Some("timeout")),
            ApiError::Internal(_) | ApiError::Io(_) => ("server_error", Some("internal_error")),
        }
    }

    /// Anthropic's error `type` for this error.
    fn anthropic_kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. }
            | ApiError::MalformedJson(_)
            | ApiError::Unprocessable { .. }
            | ApiError::ContextTooLong { .. }
            | ApiError::PromptTooLarge { .. }
            | ApiError::MethodNotAllowed => "invalid_request_error",
            ApiError::Status { status, .. } => match *status {
                404 => "not_found_error",
                413 => "request_too_large",
                s if s >= 500 => "api_error",
                _ => "invalid_request_error",
            },
            ApiError::Unauthorized(_) => "authentication_error",
            ApiError::Forbidden(_) => "permission_error",
            ApiError::NotFound(_) => "not_found_error",
            ApiError::PayloadTooLarge { .. } => "request_too_large",
            ApiError::Overloaded { .. } => "overloaded_error",
            ApiError::Timeout { .. } => "timeout_error",
            ApiError::Unavailable { .. } | ApiError::Internal(_) | ApiError::Io(_) => "api_error",
        }
    }

    /// The message shown to the client (with the field named, when there is one).
    fn client_message(&self) -> String {
        match self {
            ApiError::InvalidRequest {
                message,
                param: Some(p),
            }
            | ApiError::Unprocessable {
                message,
                param: Some(p),
            } if !message.starts_with(p.as_str()) => format!("{p}: {message}"),
            other => other.to_string(),
        }
    }

    /// The JSON error body in `flavor`'s shape.
    pub fn body(&self, flavor: Flavor) -> serde_json::Value {
        let message = self.client_message();
        match flavor {
            Flavor::OpenAi => {
                let (kind, code) = self.openai_kind();
                json!({
                    "error": {
                        "message": message,
                        "type": kind,
                        "param": self.param(),
                        "code": code,
                    }
                })
            }
            Flavor::Anthropic => json!({
                "type": "error",
                "error": { "type": self.anthropic_kind(), "message": message },
            }),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Overloaded {
                retry_after_secs, ..
            }
            | ApiError::Unavailable {
                retry_after_secs, ..
            } => Some((*retry_after_secs).max(1)),
            _ => None,
        }
    }

    /// Renders the error as a response in `flavor`'s shape (status, JSON body, `Retry-After`).
    pub fn into_response_for(self, flavor: Flavor) -> Response {
        let status = self.status(flavor);
        if status.is_server_error() {
            tracing::warn!(error = %self, status = status.as_u16(), "request failed");
        } else {
            tracing::debug!(error = %self, status = status.as_u16(), "request rejected");
        }
        let mut response = (status, axum::Json(self.body(flavor))).into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidRequest(message) => ApiError::InvalidRequest {
                message,
                param: None,
            },
            ServiceError::ContextTooLong {
                prompt_tokens,
                context_length,
            } => ApiError::ContextTooLong {
                prompt_tokens,
                context_length,
            },
            ServiceError::PromptTooLarge {
                prompt_bytes,
                min_tokens,
                context_length,
            } => ApiError::PromptTooLarge {
                prompt_bytes,
                min_tokens,
                context_length,
            },
            ServiceError::Overloaded {
                reason,
                retry_after_secs,
            } => ApiError::Overloaded {
                reason,
                retry_after_secs,
            },
            ServiceError::AgentNotFound(agent) => {
                ApiError::NotFound(format!("agent not found: {agent}"))
            }
            // A template that refuses a conversation (for example roles out of order) is the
            // request's fault; a tokenizer failure is ours.
            ServiceError::Format(FormatError::Template(m)) => ApiError::InvalidRequest {
                message: format!("the model's chat template rejected the conversation: {m}"),
                param: Some("messages".into()),
            },
            ServiceError::Format(e @ FormatError::Tokenizer(_)) => {
                ApiError::Internal(e.to_string())
            }
            ServiceError::Engine(EngineError::OutOfMemory(reason)) => ApiError::Overloaded {
                reason: format!("out of engine memory: {reason}"),
                retry_after_secs: 2,
            },
            ServiceError::Engine(e) => ApiError::Internal(e.to_string()),
            ServiceError::Store(e) => ApiError::Internal(e.to_string()),
            ServiceError::Cancelled => ApiError::Internal("the request was cancelled".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_statuses() {
        let e = ApiError::invalid("n", "only n = 1 is supported");
        assert_eq!(e.status(Flavor::OpenAi), StatusCode::BAD_REQUEST);
        let b = e.body(Flavor::OpenAi);
        assert_eq!(b["error"]["param"], "n");
        assert_eq!(b["error"]["type"], "invalid_request_error");
        assert!(b["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("n: ")));
        let a = e.body(Flavor::Anthropic);
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "invalid_request_error");

        let o = ApiError::from(ServiceError::Overloaded {
            reason: "queue full".into(),
            retry_after_secs: 0,
        });
        assert_eq!(o.status(Flavor::OpenAi).as_u16(), 429);
        assert_eq!(o.status(Flavor::Anthropic).as_u16(), 529);
        assert_eq!(
            o.body(Flavor::Anthropic)["error"]["type"],
            "overloaded_error"
        );
        let r = o.into_response_for(Flavor::Anthropic);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn service_errors_map() {
        let cases: Vec<(ServiceError, u16)> = vec![
            (ServiceError::InvalidRequest("x".into()), 400),
            (
                ServiceError::ContextTooLong {
                    prompt_tokens: 10,
                    context_length: 5,
                },
                400,
            ),
            (ServiceError::AgentNotFound("a".into()), 404),
            (ServiceError::Format(FormatError::Template("t".into())), 400),
            (
                ServiceError::Format(FormatError::Tokenizer("t".into())),
                500,
            ),
            (ServiceError::Engine(EngineError::Stopped), 500),
            (
                ServiceError::Engine(EngineError::OutOfMemory("m".into())),
                429,
            ),
            (
                ServiceError::Store(agent_session::StoreError::Io("io".into())),
                500,
            ),
            (ServiceError::Cancelled, 500),
        ];
        for (e, status) in cases {
            assert_eq!(ApiError::from(e).status(Flavor::OpenAi).as_u16(), status);
        }
        let long = ApiError::from(ServiceError::ContextTooLong {
            prompt_tokens: 9000,
            context_length: 8192,
        });
        let m = long.body(Flavor::Anthropic)["error"]["message"].to_string();
        assert!(m.contains("9000") && m.contains("8192"), "{m}");
        assert_eq!(
            long.body(Flavor::OpenAi)["error"]["code"],
            "context_length_exceeded"
        );
    }

    #[test]
    fn flavor_by_path() {
        assert_eq!(Flavor::for_path("/v1/messages"), Flavor::Anthropic);
        assert_eq!(
            Flavor::for_path("/v1/messages/count_tokens"),
            Flavor::Anthropic
        );
        assert_eq!(Flavor::for_path("/v1/messagesx"), Flavor::OpenAi);
        assert_eq!(Flavor::for_path("/v1/chat/completions"), Flavor::OpenAi);
    }
}
