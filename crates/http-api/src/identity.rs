//! Which agent a request belongs to. First match wins: the `X-Agent-Id` header, the
//! `X-Session-ID` header, then the API's own body fields (OpenAI `prompt_cache_key`, then
//! `user`; Anthropic `metadata.user_id`). None: anonymous (shared prefix blocks only).

use crate::error::ApiError;
use agent_session::AgentId;
use axum::http::HeaderMap;

/// Header naming the agent (this server's extension).
pub const AGENT_ID_HEADER: &str = "x-agent-id";
/// Header naming the session (used by several agent frameworks); an agent id too.
pub const SESSION_ID_HEADER: &str = "x-session-id";

/// Resolves the agent of a request. Header values must be valid agent ids
/// (`[A-Za-z0-9_.-]{1,512}`, not `.` or `..`): anything else is a 400 naming the header. Body
/// fields are free-form strings in the real APIs (an e-mail address as `user` is common), so
/// a body value that is not a valid id is mapped to `h-` + 32 hex digits of its digest
/// instead of being refused: the same value always names the same agent.
pub(crate) fn resolve(
    headers: &HeaderMap,
    body_fields: &[(&'static str, Option<&str>)],
) -> Result<Option<AgentId>, ApiError> {
    for name in [AGENT_ID_HEADER, SESSION_ID_HEADER] {
        if let Some(value) = headers.get(name) {
            let value = value
                .to_str()
                .map_err(|_| ApiError::invalid(name, "the header is not valid visible ASCII"))?;
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            return AgentId::new(value)
                .map(Some)
                .map_err(|e| ApiError::invalid(name, format!("invalid agent id: {e}")));
        }
    }
    for (_field, value) in body_fields {
        if let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) {
            return body_agent_id(value).map(Some);
        }
    }
    Ok(None)
}

/// A body field's value as an agent id: verbatim when valid, else `h-` + its digest.
pub(crate) fn body_agent_id(value: &str) -> Result<AgentId, ApiError> {
    if let Ok(id) = AgentId::new(value) {
        return Ok(id);
    }
    let d = blake3::hash(value.as_bytes());
    let hex: String = d.as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    AgentId::new(format!("h-{hex}")).map_err(|e| ApiError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn precedence() {
        let mut h = HeaderMap::new();
        h.insert(SESSION_ID_HEADER, HeaderValue::from_static("sess-1"));
        let got = resolve(&h, &[("user", Some("u1"))]).expect("valid");
        assert_eq!(got.map(|a| a.to_string()), Some("sess-1".into()));
        h.insert(AGENT_ID_HEADER, HeaderValue::from_static("coder"));
        let got = resolve(&h, &[("user", Some("u1"))]).expect("valid");
        assert_eq!(got.map(|a| a.to_string()), Some("coder".into()));

        let got = resolve(
            &HeaderMap::new(),
            &[("prompt_cache_key", None), ("user", Some("u1"))],
        )
        .expect("valid");
        assert_eq!(got.map(|a| a.to_string()), Some("u1".into()));
        let got = resolve(&HeaderMap::new(), &[("user", Some(""))]).expect("valid");
        assert_eq!(got, None);
    }

    #[test]
    fn invalid_header_is_400_and_body_is_hashed() {
        let mut h = HeaderMap::new();
        h.insert(AGENT_ID_HEADER, HeaderValue::from_static("../etc"));
        let err = resolve(&h, &[]).expect_err("invalid");
        assert!(
            matches!(err, ApiError::InvalidRequest { ref param, .. } if param.as_deref() == Some(AGENT_ID_HEADER))
        );

        let id = |v: &str| body_agent_id(v).expect("always an id");
        let a = id("alice@example.com");
        assert!(a.as_str().starts_with("h-"));
        assert_eq!(a, id("alice@example.com"));
        assert_ne!(a, id("bob@example.com"));
        assert_eq!(id("bob").as_str(), "bob");
        assert_eq!(id(&"x".repeat(300)).as_str(), "x".repeat(300));
        assert!(id(&"x".repeat(513)).as_str().starts_with("h-"));
    }
}
