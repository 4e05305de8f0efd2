//! Optional API-key authentication, the admin key, and the cache namespace of each key.

use crate::error::ApiError;
use agent_session::Namespace;
use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

/// Who may call the server. With no keys configured the server is open.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Keys accepted on the API routes (`Authorization: Bearer <key>` or `x-api-key: <key>`).
    /// Each key is its own cache namespace: tenants never share KV blocks. Empty: no API auth.
    pub api_keys: Vec<String>,
    /// Key for the admin routes (agent deletion, pin / unpin, stats). `None`: those routes
    /// follow the API-key rule instead.
    pub admin_key: Option<String>,
}

/// Precomputed digests of the configured keys (compared in constant time).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    api: Vec<[u8; 32]>,
    admin: Option<[u8; 32]>,
}

/// The authenticated caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Caller {
    /// No API keys are configured: the default namespace.
    Open,
    /// An API key holder: its namespace.
    Tenant(Namespace),
    /// The admin key holder: may name any namespace.
    Admin,
}

impl Caller {
    /// The namespace generation runs in: the tenant's, else the default one.
    pub(crate) fn namespace(&self) -> Namespace {
        match self {
            Caller::Tenant(ns) => ns.clone(),
            Caller::Open | Caller::Admin => Namespace::default(),
        }
    }
}

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Generation and token counting: an API key when API keys are configured.
    Generate,
    /// Reading models and agents: an API key or the admin key (when any key is configured).
    Read,
    /// Deleting and pinning agents, stats: the admin key when one is configured.
    Admin,
}

fn digest(key: &str) -> [u8; 32] {
    *blake3::hash(key.as_bytes()).as_bytes()
}

/// The cache namespace of an API key: a keyed digest, never the key itself.
pub fn namespace_for_key(key: &str) -> Namespace {
    let d = blake3::derive_key("semantic http-api cache namespace v1", key.as_bytes());
    let hex: String = d[..16].iter().map(|b| format!("{b:02x}")).collect();
    Namespace(hex)
}

impl Keys {
    pub(crate) fn new(config: &AuthConfig) -> Self {
        Self {
            api: config
                .api_keys
                .iter()
                .filter(|k| !k.is_empty())
                .map(|k| digest(k))
                .collect(),
            admin: config
                .admin_key
                .as_deref()
                .filter(|k| !k.is_empty())
                .map(digest),
        }
    }

    fn enabled(&self) -> bool {
        !self.api.is_empty() || self.admin.is_some()
    }

    /// Checks the request's keys against what `access` needs.
    pub(crate) fn authorize(
        &self,
        headers: &HeaderMap,
        access: Access,
    ) -> Result<Caller, ApiError> {
        if !self.enabled() {
            return Ok(Caller::Open);
        }
        let presented = presented_keys(headers);
        let mut is_admin = false;
        let mut tenant: Option<Namespace> = None;
        for key in &presented {
            let d = digest(key);
            if let Some(admin) = &self.admin {
                is_admin |= bool::from(admin.ct_eq(&d));
            }
            // Compare with every key (no early exit) so timing does not tell which matched.
            let mut hit = subtle::Choice::from(0u8);
            for k in &self.api {
                hit |= k.ct_eq(&d);
            }
            if bool::from(hit) {
                tenant = Some(namespace_for_key(key));
            }
        }
        let missing = || {
            if presented.is_empty() {
                ApiError::Unauthorized(
                    "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
                        .into(),
                )
            } else {
                ApiError::Unauthorized("invalid API key".into())
            }
        };
        let api_open = self.api.is_empty();
        match access {
            Access::Generate => match tenant {
                Some(ns) => Ok(Caller::Tenant(ns)),
                None if api_open => Ok(Caller::Open),
                None if is_admin => Err(ApiError::Forbidden(
                    "the admin key is not an API key; generation needs an API key".into(),
                )),
                None => Err(missing()),
            },
            Access::Read => {
                if is_admin {
                    Ok(Caller::Admin)
                } else if let Some(ns) = tenant {
                    Ok(Caller::Tenant(ns))
                } else if api_open && presented.is_empty() {
                    Ok(Caller::Open)
                } else {
                    Err(missing())
                }
            }
            Access::Admin => {
                if is_admin {
                    Ok(Caller::Admin)
                } else if self.admin.is_some() {
                    if tenant.is_some() {
                        Err(ApiError::Forbidden("this route needs the admin key".into()))
                    } else {
                        Err(missing())
                    }
                } else if let Some(ns) = tenant {
                    Ok(Caller::Tenant(ns))
                } else if api_open {
                    Ok(Caller::Open)
                } else {
                    Err(missing())
                }
            }
        }
    }
}

/// Keys sent with a request: `Authorization: Bearer <key>` and `x-api-key: <key>`.
fn presented_keys(headers: &HeaderMap) -> Vec<String> {
    let mut keys = Vec::new();
    for value in headers.get_all(header::AUTHORIZATION) {
        if let Ok(v) = value.to_str() {
            let v = v.trim();
            let token = v
                .strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
                .unwrap_or(v)
                .trim();
            if !token.is_empty() {
                keys.push(token.to_string());
            }
        }
    }
    for value in headers.get_all("x-api-key") {
        if let Ok(v) = value.to_str() {
            let v = v.trim();
            if !v.is_empty() {
                keys.push(v.to_string());
            }
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("valid header"));
        }
        h
    }

    #[test]
    fn open_when_unconfigured() {
        let keys = Keys::new(&AuthConfig::default());
        for access in [Access::Generate, Access::Read, Access::Admin] {
            assert_eq!(
                keys.authorize(&headers(&[("x-api-key", "whatever")]), access)
                    .ok(),
                Some(Caller::Open)
            );
        }
    }

    #[test]
    fn api_keys_and_admin() {
        let keys = Keys::new(&AuthConfig {
            api_keys: vec!["k1".into(), "k2".into()],
            admin_key: Some("adm".into()),
        });
        let t1 = keys.authorize(
            &headers(&[("authorization", "Bearer k1")]),
            Access::Generate,
        );
        assert_eq!(t1.ok(), Some(Caller::Tenant(namespace_for_key("k1"))));
        let t2 = keys.authorize(&headers(&[("x-api-key", "k2")]), Access::Generate);
        assert_eq!(t2.ok(), Some(Caller::Tenant(namespace_for_key("k2"))));
        assert_ne!(namespace_for_key("k1"), namespace_for_key("k2"));
        assert!(!namespace_for_key("k1").as_str().contains("k1"));
        assert!(matches!(
            keys.authorize(&HeaderMap::new(), Access::Generate),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            keys.authorize(&headers(&[("x-api-key", "nope")]), Access::Generate),
            Err(ApiError::Unauthorized(_))
        ));
        assert!(matches!(
            keys.authorize(&headers(&[("x-api-key", "k1")]), Access::Admin),
            Err(ApiError::Forbidden(_))
        ));
        assert_eq!(
            keys.authorize(&headers(&[("x-api-key", "adm")]), Access::Admin)
                .ok(),
            Some(Caller::Admin)
        );
        assert!(matches!(
            keys.authorize(&headers(&[("x-api-key", "adm")]), Access::Generate),
            Err(ApiError::Forbidden(_))
        ));
    }

    #[test]
    fn admin_only_config_leaves_generation_open() {
        let keys = Keys::new(&AuthConfig {
            api_keys: vec![],
            admin_key: Some("adm".into()),
        });
        assert_eq!(
            keys.authorize(&HeaderMap::new(), Access::Generate).ok(),
            Some(Caller::Open)
        );
        assert!(matches!(
            keys.authorize(&HeaderMap::new(), Access::Admin),
            Err(ApiError::Unauthorized(_))
        ));
    }
}
