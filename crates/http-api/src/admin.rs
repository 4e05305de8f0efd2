//! Models, agents admin, stats, health and metrics routes (OpenAI error shape).

use crate::auth::{Access, Caller};
use crate::error::{ApiError, Flavor};
use crate::metrics::pool_utilization;
use crate::util::rfc3339;
use crate::util::Path;
use crate::Shared;
use agent_session::service::AgentInfo;
use agent_session::{AgentId, AgentKey, Namespace};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(|e| e.into_response_for(Flavor::OpenAi))
}

fn model_entry(ctx: &Shared) -> Value {
    let m = ctx.service.model();
    json!({
        "id": m.id,
        "object": "model",
        "created": ctx.created,
        "owned_by": "semantic",
        // Anthropic's model object, for the Anthropic SDK's models.list().
        "type": "model",
        "display_name": m.id,
        "created_at": rfc3339(ctx.created),
        // Extensions.
        "architecture": m.architecture,
        "weight_format": m.weight_format,
        "fingerprint": m.fingerprint,
        "context_length": m.context_length,
        "vocab_size": m.vocab_size,
        "spec": m.spec,
        "block_tokens": m.spec.block_tokens(),
        "bytes_per_block": m.spec.bytes_per_block(),
        "bytes_per_token": m.spec.bytes_per_token(),
    })
}

/// `GET /v1/models`: the served model, with its cache spec.
pub(crate) async fn list_models(State(ctx): State<Shared>, headers: HeaderMap) -> Response {
    respond((|| {
        ctx.keys.authorize(&headers, Access::Read)?;
        let id = ctx.service.model().id.clone();
        Ok(Json(json!({
            "object": "list",
            "data": [model_entry(&ctx)],
            "has_more": false,
            "first_id": id,
            "last_id": id,
        }))
        .into_response())
    })())
}

/// `GET /v1/models/{id}`.
pub(crate) async fn get_model(
    State(ctx): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    respond((|| {
        ctx.keys.authorize(&headers, Access::Read)?;
        if id != ctx.service.model().id {
            return Err(ApiError::NotFound(format!(
                "model '{id}' is not served; this server serves '{}'",
                ctx.service.model().id
            )));
        }
        Ok(Json(model_entry(&ctx)).into_response())
    })())
}

#[derive(Debug, Deserialize, Default)]
struct AgentQuery {
    namespace: Option<String>,
    keep_on_disk: Option<bool>,
}

fn query(uri: &Uri) -> Result<AgentQuery, ApiError> {
    match uri.query() {
        None => Ok(AgentQuery::default()),
        Some(_) => axum::extract::Query::<AgentQuery>::try_from_uri(uri)
            .map(|q| q.0)
            .map_err(|e| ApiError::InvalidRequest {
                message: format!("invalid query string: {}", e.body_text()),
                param: None,
            }),
    }
}

/// The namespace an agent route acts on: the tenant's own; the admin's `?namespace=`
/// (default namespace when absent); the default one on an open server.
fn namespace_of(caller: &Caller, q: &AgentQuery) -> Result<Namespace, ApiError> {
    match caller {
        Caller::Admin => Ok(Namespace(q.namespace.clone().unwrap_or_default())),
        Caller::Tenant(ns) => {
            if q.namespace.as_ref().is_some_and(|n| n != ns.as_str()) {
                return Err(ApiError::Forbidden(
                    "only the admin key may name another namespace".into(),
                ));
            }
            Ok(ns.clone())
        }
        Caller::Open => Ok(Namespace(q.namespace.clone().unwrap_or_default())),
    }
}

fn agent_key(id: &str, namespace: Namespace) -> Result<AgentKey, ApiError> {
    let agent = AgentId::new(id)
        .map_err(|e| ApiError::invalid("agent_id", format!("invalid agent id: {e}")))?;
    Ok(AgentKey { namespace, agent })
}

fn agent_json(a: &AgentInfo) -> Value {
    json!({
        "id": a.agent,
        "object": "agent",
        "namespace": a.namespace,
        "tier": a.tier,
        "tokens": a.tokens,
        "blocks": a.blocks,
        "pinned": a.pinned,
        "last_used_at_ms": a.last_used_at_ms,
        "persisted": a.persisted,
        "persist_error": a.persist_error,
    })
}

/// `GET /v1/agents`.
pub(crate) async fn list_agents(
    State(ctx): State<Shared>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    respond(
        async {
            let caller = ctx.keys.authorize(&headers, Access::Read)?;
            let q = query(&uri)?;
            let ns = match (&caller, &q.namespace) {
                (Caller::Admin, None) => None,
                _ => Some(namespace_of(&caller, &q)?),
            };
            let agents = ctx.service.list_agents(ns.as_ref()).await?;
            Ok(Json(json!({
                "object": "list",
                "data": agents.iter().map(agent_json).collect::<Vec<_>>(),
            }))
            .into_response())
        }
        .await,
    )
}

/// `GET /v1/agents/{id}`.
pub(crate) async fn get_agent(
    State(ctx): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    respond(
        async {
            let caller = ctx.keys.authorize(&headers, Access::Read)?;
            let key = agent_key(&id, namespace_of(&caller, &query(&uri)?)?)?;
            let agent = ctx.service.agent(&key).await?;
            Ok(Json(agent_json(&agent)).into_response())
        }
        .await,
    )
}

/// `DELETE /v1/agents/{id}` (`?keep_on_disk=true`: evict from RAM only).
pub(crate) async fn delete_agent(
    State(ctx): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    respond(
        async {
            let caller = ctx.keys.authorize(&headers, Access::Admin)?;
            let q = query(&uri)?;
            let key = agent_key(&id, namespace_of(&caller, &q)?)?;
            let keep = q.keep_on_disk.unwrap_or(false);
            ctx.service.delete_agent(&key, keep).await?;
            Ok(Json(json!({
                "id": key.agent,
                "object": "agent.deleted",
                "deleted": !keep,
                "evicted": true,
                "kept_on_disk": keep,
            }))
            .into_response())
        }
        .await,
    )
}

async fn set_pin(ctx: Shared, id: String, headers: HeaderMap, uri: Uri, pinned: bool) -> Response {
    respond(
        async {
            let caller = ctx.keys.authorize(&headers, Access::Admin)?;
            let key = agent_key(&id, namespace_of(&caller, &query(&uri)?)?)?;
            ctx.service.set_pinned(&key, pinned).await?;
            let agent = ctx.service.agent(&key).await?;
            Ok(Json(agent_json(&agent)).into_response())
        }
        .await,
    )
}

/// `POST /v1/agents/{id}/pin`.
pub(crate) async fn pin_agent(
    State(ctx): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    set_pin(ctx, id, headers, uri, true).await
}

/// `POST /v1/agents/{id}/unpin`.
pub(crate) async fn unpin_agent(
    State(ctx): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    set_pin(ctx, id, headers, uri, false).await
}

/// `GET /v1/stats`.
pub(crate) async fn stats(State(ctx): State<Shared>, headers: HeaderMap) -> Response {
    respond(
        async {
            ctx.keys.authorize(&headers, Access::Admin)?;
            let stats = ctx.service.stats().await;
            let mut v =
                serde_json::to_value(&stats).map_err(|e| ApiError::Internal(e.to_string()))?;
            v["object"] = json!("stats");
            v["pool_utilization"] = json!(pool_utilization(&stats));
            v["model"] = json!(ctx.service.model().id);
            v["ready"] = json!(ctx.ready.load(Ordering::Acquire));
            Ok(Json(v).into_response())
        }
        .await,
    )
}

/// `GET /health`: `ok` while the process serves; with a shared object-store tier, its state
/// too (`down`: turns are served from RAM and the local disk while uploads wait).
pub(crate) async fn health(State(ctx): State<Shared>) -> Response {
    let stats = ctx.service.stats().await;
    let mut body = json!({"status": "ok"});
    if let Some(r) = &stats.store.remote {
        body["object_store"] = json!({
            "status": if r.up { "up" } else { "down" },
            "upload_queue": r.upload_queue,
            "outages": r.outages,
            "last_error": r.last_error,
        });
    }
    Json(body).into_response()
}

/// `GET /health/live`.
pub(crate) async fn live() -> Response {
    Json(json!({"status": "alive"})).into_response()
}

/// `GET /health/ready`: 503 while loading / shutting down, when the hot pool is near
/// exhaustion, or when the admission queue is full.
pub(crate) async fn ready(State(ctx): State<Shared>) -> Response {
    let stats = ctx.service.stats().await;
    let utilization = pool_utilization(&stats);
    let config = ctx.service.config();
    let reason = if !ctx.ready.load(Ordering::Acquire) {
        Some("loading_or_shutting_down")
    } else if utilization > ctx.limits.ready_max_pool_utilization {
        Some("pool_near_exhaustion")
    } else if stats.active >= config.max_batch_size as u64
        && stats.queued >= config.max_queue as u64
    {
        Some("queue_full")
    } else {
        None
    };
    let body = json!({
        "status": if reason.is_some() { "not_ready" } else { "ready" },
        "reason": reason,
        "pool_utilization": (utilization * 1000.0).round() / 1000.0,
        "active": stats.active,
        "queued": stats.queued,
    });
    let status = if reason.is_some() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(State(ctx): State<Shared>, headers: HeaderMap) -> Response {
    respond(
        async {
            ctx.keys.authorize(&headers, Access::Read)?;
            let stats = ctx.service.stats().await;
            ctx.metrics
                .gauge("semantic_connections_open", &[])
                .set(ctx.shutdown.open_connections() as f64);
            ctx.metrics
                .counter("semantic_connections_limited_total", &[])
                .absolute(ctx.shutdown.limited());
            let text = ctx.metrics.render(&stats);
            Ok((
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                text,
            )
                .into_response())
        }
        .await,
    )
}
