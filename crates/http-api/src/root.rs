//! `GET /` and `HEAD /`: who answers here. Clients probe the base URL before their first
//! request (Claude Code sends `HEAD /`); a 200 with a small JSON body tells them a server is
//! up. Public like `/health`: it names the server, its version and its APIs, nothing else.

use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// The server's name in `GET /`.
pub(crate) const SERVER_NAME: &str = "semantic";

/// `GET /` (axum answers `HEAD /` with the same status and headers, no body).
pub(crate) async fn root() -> Response {
    Json(json!({
        "name": SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "apis": {
            "openai": "/v1/chat/completions",
            "anthropic": "/v1/messages",
        },
    }))
    .into_response()
}
