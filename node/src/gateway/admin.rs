//! The operator's API, `/v1/admin/*`: cluster status, decommission, remove, cancel, drain.
//!
//! Never open to clients: every request carries `Authorization: Bearer <admin token>`, a
//! key derived from the cluster secret ([`derive_admin_token`]; `chatnode admin` derives it
//! from the cluster dir), checked in constant time. Every request is logged with its source
//! address and outcome.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use client_proto::ErrorCode;
use cluster::lifecycle::{Request, RequestError};
use cluster::NodeId;

use super::http::Path;
use crate::domain::error::ApiError;
use crate::node::Node;

/// The admin token for a cluster secret: HMAC-SHA256(secret, "chatnode admin v1"), hex.
pub fn derive_admin_token(cluster_secret: &[u8]) -> String {
    crate::domain::auth::derive_hex(cluster_secret, b"chatnode admin v1")
}

/// The admin routes (the server merges them with `gateway::http::router`).
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/admin/status", get(status))
        .route("/v1/admin/decommission", post(decommission))
        .route("/v1/admin/remove/{node}", post(remove))
        .route("/v1/admin/cancel/{node}", post(cancel))
        .route("/v1/admin/drain", post(drain))
        .with_state(node)
}

/// An operator, authenticated by the admin token.
pub struct Operator {
    from: Option<SocketAddr>,
}

impl FromRequestParts<Arc<Node>> for Operator {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        let from = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(a)| *a);
        let given = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .unwrap_or("");
        let want = node.admin_token();
        // Constant time over the token's length (both are hex of one fixed length).
        let same = given.len() == want.len()
            && given
                .bytes()
                .zip(want.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            metrics::counter!("admin_requests_total", "outcome" => "unauthorized").increment(1);
            tracing::warn!(?from, path = %parts.uri.path(), "admin request without the admin token refused");
            return Err(ApiError::unauthorized(
                "admin requests need Authorization: Bearer <admin token> (chatnode admin derives it from the cluster dir)",
            ));
        }
        Ok(Operator { from })
    }
}

type AppState = State<Arc<Node>>;

fn refused(e: RequestError) -> ApiError {
    let code = match e {
        RequestError::NotAMember(_) => ErrorCode::NotFound,
        RequestError::NotActive => ErrorCode::Unavailable,
        _ => ErrorCode::Conflict,
    };
    ApiError::new(code, e.to_string())
}

async fn act(
    node: &Node,
    op: Operator,
    what: &'static str,
    request: Request,
) -> Result<Response, ApiError> {
    let result = node.mesh_admin(request).await;
    let outcome = if result.is_ok() {
        "accepted"
    } else {
        "refused"
    };
    metrics::counter!("admin_requests_total", "outcome" => outcome).increment(1);
    match &result {
        Ok(()) => tracing::info!(from = ?op.from, what, ?request, "admin request accepted"),
        Err(e) => {
            tracing::warn!(from = ?op.from, what, ?request, error = %e, "admin request refused")
        }
    }
    result.map_err(refused)?;
    Ok((StatusCode::ACCEPTED, Json(node.move_status().await)).into_response())
}

async fn status(State(node): AppState, _op: Operator) -> Response {
    Json(node.move_status().await).into_response()
}

async fn decommission(State(node): AppState, op: Operator) -> Result<Response, ApiError> {
    act(&node, op, "decommission", Request::Decommission).await
}

async fn remove(
    State(node): AppState,
    op: Operator,
    Path(id): Path<NodeId>,
) -> Result<Response, ApiError> {
    act(&node, op, "remove", Request::Remove(id)).await
}

async fn cancel(
    State(node): AppState,
    op: Operator,
    Path(id): Path<NodeId>,
) -> Result<Response, ApiError> {
    act(&node, op, "cancel", Request::Cancel(id)).await
}

async fn drain(State(node): AppState, op: Operator) -> Response {
    tracing::info!(from = ?op.from, "admin request accepted: drain and stop");
    metrics::counter!("admin_requests_total", "outcome" => "accepted").increment(1);
    node.request_stop();
    (
        StatusCode::ACCEPTED,
        "draining; the node stops once its clients have moved\n",
    )
        .into_response()
}
