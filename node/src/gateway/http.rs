//! The HTTP API of `docs/protocol.md` (`/v1/...`), health and metrics, and how an
//! [`ApiError`] becomes an HTTP answer. Every refusal of the API is the protocol's JSON
//! error body, the router's own included (no route, wrong method, bad path or query string,
//! a body that is not a JSON object).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use client_proto::http::{
    AddMemberRequest, CreateGroupRequest, FriendResponse, HistoryPage, LoginRequest,
    PatchMeRequest, PrivacyPatch, SignupRequest,
};
use client_proto::ids::{ConversationId, GroupId, MessageId, UserId};
use client_proto::{ErrorBody, ErrorCode};
use serde::Deserialize;

use crate::domain::auth::Identity;
use crate::domain::error::ApiError;
use crate::node::Node;

/// Largest HTTP request body (no API body is anywhere near this).
const MAX_BODY: usize = 16 * 1024;

type AppState = State<Arc<Node>>;

/// Every route of the node.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/signup", post(signup))
        .route("/v1/login", post(login))
        .route("/v1/logout", post(logout))
        .route("/v1/me", get(me).patch(patch_me))
        .route("/v1/me/privacy", get(get_privacy).put(put_privacy))
        .route("/v1/users/{username}", get(user))
        .route("/v1/users/id/{user}", get(user_by_id))
        .route("/v1/friends", get(list_friends))
        .route("/v1/friends/requests", get(friend_requests))
        .route(
            "/v1/friends/{user}",
            post(add_friend).put(add_friend).delete(remove_friend),
        )
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{device}", delete(revoke_device))
        .route("/v1/devices/{device}/push", put(set_push))
        .route("/v1/groups", post(create_group).get(list_groups))
        .route("/v1/groups/{group}", get(get_group))
        .route("/v1/groups/{group}/members", post(add_member))
        .route("/v1/groups/{group}/members/{user}", delete(remove_member))
        .route("/v1/conversations/{conversation}/messages", get(history))
        .route("/v1/discover", get(discover))
        .route("/v1/cluster", get(cluster))
        .route("/v1/ws", get(crate::gateway::ws::upgrade))
        .route("/", get(crate::gateway::web::index))
        .route("/assets/{file}", get(crate::gateway::web::asset))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async {
            let body = ErrorBody::new(
                ErrorCode::BadRequest,
                "method not allowed on this route (see docs/protocol.md)",
            );
            (StatusCode::METHOD_NOT_ALLOWED, Json(body))
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(node)
}

/// A JSON object body ([`client_proto::http::decode_body`]) whose rejections are protocol
/// errors.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase())
            .is_some_and(|m| m == "application/json" || m.ends_with("+json"));
        if !json {
            return Err(ApiError::bad_request("send the body as application/json"));
        }
        let bytes = bytes::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        client_proto::http::decode_body(&bytes)
            .map(Body)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

/// Path parameters whose rejections are protocol errors.
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(v)| Path(v))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// A query string whose rejections are protocol errors.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| Query(v))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// The authenticated caller (`Authorization: Bearer <token>`).
pub struct Caller(pub Identity);

impl FromRequestParts<Arc<Node>> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, node: &Arc<Node>) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <token>"))?;
        node.accounts.authenticate(token.trim()).await.map(Caller)
    }
}

async fn signup(
    State(node): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Body(req): Body<SignupRequest>,
) -> Result<Response, ApiError> {
    let p = node.accounts.signup(req, peer.ip()).await?;
    let body = serde_json::json!({"user_id": p.user_id, "username": p.username});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// The source address is the TCP peer's: behind a proxy every client shares the proxy's
/// (see the README on `--login-*` and `--signups-per-ip-per-hour`).
async fn login(
    State(node): AppState,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Body(req): Body<LoginRequest>,
) -> Result<Response, ApiError> {
    let recommended = node.recommended().await;
    Ok(Json(node.accounts.login(req, recommended, peer.ip()).await?).into_response())
}

async fn logout(State(node): AppState, Caller(who): Caller) -> Result<StatusCode, ApiError> {
    node.accounts.logout(who).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn me(State(node): AppState, Caller(who): Caller) -> Result<Response, ApiError> {
    Ok(Json(node.accounts.me(who).await?).into_response())
}

async fn patch_me(
    State(node): AppState,
    Caller(who): Caller,
    Body(req): Body<PatchMeRequest>,
) -> Result<Response, ApiError> {
    let profile = match req.display_name {
        Some(name) => node.accounts.set_display_name(who, name).await?,
        None => node.accounts.me(who).await?,
    };
    Ok(Json(profile).into_response())
}

async fn user(
    State(node): AppState,
    Caller(_): Caller,
    Path(username): Path<String>,
) -> Result<Response, ApiError> {
    Ok(Json(node.accounts.by_username(&username).await?).into_response())
}

/// A profile by user id (a client names a sender it has not looked up by username).
async fn user_by_id(
    State(node): AppState,
    Caller(_): Caller,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    let user = path_id(&user, "user")?;
    Ok(Json(node.accounts.profile(UserId(user)).await?).into_response())
}

/// Parses an id from a path segment: canonical decimal digits only (docs/protocol.md 2.1),
/// whatever type it is parsed into.
fn path_id<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "{what} must be a decimal id (digits only, no sign or leading zeros)"
        ))
    };
    client_proto::ids::parse_id(s).map_err(|_| bad())?;
    s.parse().map_err(|_| bad())
}

#[derive(Deserialize)]
struct PushRequest {
    kind: String,
    target: String,
}

async fn set_push(
    State(node): AppState,
    Caller(who): Caller,
    Path(device): Path<String>,
    Body(req): Body<PushRequest>,
) -> Result<StatusCode, ApiError> {
    if req.kind != "webhook" {
        return Err(ApiError::bad_request("kind must be \"webhook\""));
    }
    let device = path_id(&device, "device id")?;
    node.accounts
        .set_push_target(who, device, req.target)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_friends(State(node): AppState, Caller(who): Caller) -> Result<Response, ApiError> {
    Ok(Json(node.friends.list(who.user).await?).into_response())
}

async fn add_friend(
    State(node): AppState,
    Caller(who): Caller,
    Path(user): Path<String>,
) -> Result<Response, ApiError> {
    let user_id = path_id(&user, "user id")?;
    let state = node.friends.request(who.user, user_id).await?;
    Ok(Json(FriendResponse { user_id, state }).into_response())
}

async fn friend_requests(State(node): AppState, Caller(who): Caller) -> Result<Response, ApiError> {
    Ok(Json(node.friends.requests(who.user).await?).into_response())
}

async fn list_devices(State(node): AppState, Caller(who): Caller) -> Result<Response, ApiError> {
    Ok(Json(node.accounts.devices(who).await?).into_response())
}

async fn revoke_device(
    State(node): AppState,
    Caller(who): Caller,
    Path(device): Path<String>,
) -> Result<StatusCode, ApiError> {
    node.accounts
        .revoke_device(who, path_id(&device, "device id")?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_privacy(State(node): AppState, Caller(who): Caller) -> Result<Response, ApiError> {
    Ok(Json(node.accounts.privacy(who).await?).into_response())
}

async fn put_privacy(
    State(node): AppState,
    Caller(who): Caller,
    Body(patch): Body<PrivacyPatch>,
) -> Result<Response, ApiError> {
    let settings = node.accounts.set_privacy(who, patch).await?;
    node.chat.settings_changed(who.user);
    Ok(Json(settings).into_response())
}

async fn remove_friend(
    State(node): AppState,
    Caller(who): Caller,
    Path(user): Path<String>,
) -> Result<StatusCode, ApiError> {
    node.friends
        .remove(who.user, path_id(&user, "user id")?)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn create_group(
    State(node): AppState,
    Caller(who): Caller,
    Body(req): Body<CreateGroupRequest>,
) -> Result<Response, ApiError> {
    let rec = node.groups.create(who.user, req.name, req.members).await?;
    Ok((StatusCode::CREATED, Json(crate::domain::groups::info(&rec))).into_response())
}

async fn list_groups(State(node): AppState, Caller(who): Caller) -> Result<Response, ApiError> {
    let groups: Vec<_> = node
        .groups
        .list(who.user)
        .await?
        .iter()
        .map(crate::domain::groups::info)
        .collect();
    Ok(Json(groups).into_response())
}

async fn get_group(
    State(node): AppState,
    Caller(who): Caller,
    Path(group): Path<String>,
) -> Result<Response, ApiError> {
    let rec = node
        .groups
        .get(who.user, path_id(&group, "group id")?)
        .await?;
    let mut info = crate::domain::groups::info(&rec);
    info.presence = Some(node.presence_of(&info.members).await);
    Ok(Json(info).into_response())
}

async fn add_member(
    State(node): AppState,
    Caller(who): Caller,
    Path(group): Path<String>,
    Body(req): Body<AddMemberRequest>,
) -> Result<StatusCode, ApiError> {
    let group: GroupId = path_id(&group, "group id")?;
    node.groups.add(who.user, group, req.user_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remove_member(
    State(node): AppState,
    Caller(who): Caller,
    Path((group, user)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let group: GroupId = path_id(&group, "group id")?;
    let user: UserId = path_id(&user, "user id")?;
    node.groups.remove(who.user, group, user).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct HistoryQuery {
    before: Option<String>,
    limit: Option<String>,
}

async fn history(
    State(node): AppState,
    Caller(who): Caller,
    Path(conversation): Path<String>,
    Query(q): Query<HistoryQuery>,
) -> Result<Response, ApiError> {
    let conversation: ConversationId =
        conversation
            .parse()
            .map_err(|e: client_proto::ids::InvalidConversationId| {
                ApiError::bad_request(e.to_string())
            })?;
    let before = q
        .before
        .map(|b| b.parse::<MessageId>())
        .transpose()
        .map_err(|_| ApiError::bad_request("before must be a message id"))?;
    let limit = q
        .limit
        .map(|l| l.parse::<u32>())
        .transpose()
        .map_err(|_| ApiError::bad_request("limit must be a number from 1 to 200"))?;
    // The user's allowance of read reply bytes, shared with their sessions' `sync` and
    // `history` (a page is up to the frame limit: without it one small request after another
    // would make the node send hundreds of MB).
    let allowance = node.limits.register(who.user, std::time::Instant::now());
    if let Err(wait) = allowance.try_read_bytes(std::time::Instant::now()) {
        metrics::counter!("gateway_rate_limited_total").increment(1);
        let secs = wait.as_secs() + 1;
        let body = ErrorBody::new(
            ErrorCode::RateLimited,
            format!("too many history and sync bytes; retry in {secs} s"),
        );
        return Ok((
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, secs.to_string())],
            Json(body),
        )
            .into_response());
    }
    let page = node
        .chat
        .history(who.user, conversation, before, limit)
        .await?;
    allowance.charge_read_bytes(
        crate::gateway::session::reply_bytes(&page.messages),
        std::time::Instant::now(),
    );
    Ok(Json(HistoryPage {
        messages: page.messages,
        next_before: page.next_before,
    })
    .into_response())
}

/// `/v1/discover` and `/v1/cluster` are public and carry no credentials, so any page may read
/// them: the web client asks another member where to go when its own node is gone.
const ANY_ORIGIN: [(header::HeaderName, &str); 1] = [(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*")];

async fn discover(State(node): AppState) -> Response {
    (ANY_ORIGIN, Json(node.recommended().await)).into_response()
}

async fn cluster(State(node): AppState) -> Response {
    let members = node.members().await;
    let body = serde_json::json!({ "node_id": node.cfg.node_id, "members": members });
    (ANY_ORIGIN, Json(body)).into_response()
}

async fn ready(State(node): AppState) -> Response {
    match node.readiness() {
        Ok(()) => "ready".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why.to_string()).into_response(),
    }
}

async fn metrics(State(node): AppState) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.render_metrics(),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(ErrorBody::new(self.code, self.message))).into_response();
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up.
            let secs = after.as_millis().div_ceil(1000).max(1);
            if let Ok(v) = header::HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}
