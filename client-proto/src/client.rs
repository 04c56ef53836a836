//! An async client: the HTTP API ([`HttpClient`]) and one WebSocket connection
//! ([`WsConnection`]). Used by the tests, the terminal client and the load generator.

use std::collections::VecDeque;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::codec::{self, Codec};
use crate::error::{ErrorBody, ErrorCode};
use crate::frames::{ClientFrame, Recipient, ServerFrame};
use crate::http::*;
use crate::ids::{ConversationId, DeviceId, GroupId, MessageId, UserId};

/// Anything that can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the server refused: {0}")]
    Refused(ErrorBody),
    #[error("HTTP {status}: {body}")]
    Http { status: u16, body: String },
    #[error("transport: {0}")]
    Transport(String),
    #[error("the connection closed{}", .0.as_ref().map(|(c, r)| format!(" with code {c}: {r}")).unwrap_or_default())]
    Closed(Option<(u16, String)>),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("unexpected frame: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// The server's error code, if the server refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused(b) => Some(b.code),
            _ => None,
        }
    }
}

/// The HTTP API of one node.
#[derive(Clone, Debug)]
pub struct HttpClient {
    base: String,
    http: reqwest::Client,
}

impl HttpClient {
    /// `base` is the node's HTTP root, such as `http://127.0.0.1:8080`.
    pub fn new(base: impl Into<String>) -> Self {
        HttpClient {
            base: base.into().trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
        }
    }

    /// The node's HTTP root.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The WebSocket URL of this node (`ws://.../v1/ws`).
    pub fn ws_url(&self) -> String {
        format!("{}/v1/ws", self.base.replacen("http", "ws", 1))
    }

    /// Sends a request and decodes a JSON answer, turning error bodies into [`ClientError`].
    pub async fn request<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&(impl serde::Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let text = self.request_raw(method, path, token, body).await?;
        let text = if text.is_empty() {
            "null".to_string()
        } else {
            text
        };
        serde_json::from_str(&text).map_err(|e| ClientError::Unexpected(format!("{e}: {text}")))
    }

    /// Like [`HttpClient::request`] but returns the body text unparsed.
    pub async fn request_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&(impl serde::Serialize + ?Sized)>,
    ) -> Result<String, ClientError> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        if (200..300).contains(&status) {
            return Ok(text);
        }
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(b) => Err(ClientError::Refused(b)),
            Err(_) => Err(ClientError::Http { status, body: text }),
        }
    }

    pub async fn signup(
        &self,
        username: &str,
        password: &str,
    ) -> Result<SignupResponse, ClientError> {
        let req = SignupRequest {
            username: username.into(),
            password: password.into(),
            display_name: None,
        };
        self.request(reqwest::Method::POST, "/v1/signup", None, Some(&req))
            .await
    }

    pub async fn login(
        &self,
        username: &str,
        password: &str,
        device_id: Option<DeviceId>,
    ) -> Result<LoginResponse, ClientError> {
        let req = LoginRequest {
            username: username.into(),
            password: password.into(),
            device_id,
            device_name: None,
        };
        self.request(reqwest::Method::POST, "/v1/login", None, Some(&req))
            .await
    }

    pub async fn logout(&self, token: &str) -> Result<(), ClientError> {
        self.request_raw(
            reqwest::Method::POST,
            "/v1/logout",
            Some(token),
            None::<&()>,
        )
        .await
        .map(|_| ())
    }

    pub async fn me(&self, token: &str) -> Result<UserProfile, ClientError> {
        self.request(reqwest::Method::GET, "/v1/me", Some(token), None::<&()>)
            .await
    }

    pub async fn user(&self, token: &str, username: &str) -> Result<UserProfile, ClientError> {
        let path = format!("/v1/users/{username}");
        self.request(reqwest::Method::GET, &path, Some(token), None::<&()>)
            .await
    }

    pub async fn create_group(
        &self,
        token: &str,
        name: &str,
        members: &[UserId],
    ) -> Result<GroupInfo, ClientError> {
        let req = CreateGroupRequest {
            name: name.into(),
            members: members.to_vec(),
        };
        self.request(reqwest::Method::POST, "/v1/groups", Some(token), Some(&req))
            .await
    }

    pub async fn groups(&self, token: &str) -> Result<Vec<GroupInfo>, ClientError> {
        self.request(reqwest::Method::GET, "/v1/groups", Some(token), None::<&()>)
            .await
    }

    pub async fn group(&self, token: &str, group: GroupId) -> Result<GroupInfo, ClientError> {
        let path = format!("/v1/groups/{group}");
        self.request(reqwest::Method::GET, &path, Some(token), None::<&()>)
            .await
    }

    pub async fn add_member(
        &self,
        token: &str,
        group: GroupId,
        user: UserId,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/groups/{group}/members");
        let req = AddMemberRequest { user_id: user };
        self.request_raw(reqwest::Method::POST, &path, Some(token), Some(&req))
            .await
            .map(|_| ())
    }

    pub async fn remove_member(
        &self,
        token: &str,
        group: GroupId,
        user: UserId,
    ) -> Result<(), ClientError> {
        let path = format!("/v1/groups/{group}/members/{user}");
        self.request_raw(reqwest::Method::DELETE, &path, Some(token), None::<&()>)
            .await
            .map(|_| ())
    }

    /// One page of a conversation's history, newest first.
    pub async fn history(
        &self,
        token: &str,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, ClientError> {
        let mut path = format!("/v1/conversations/{conversation}/messages?");
        if let Some(b) = before {
            path.push_str(&format!("before={b}&"));
        }
        if let Some(l) = limit {
            path.push_str(&format!("limit={l}"));
        }
        self.request(reqwest::Method::GET, &path, Some(token), None::<&()>)
            .await
    }
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One authenticated WebSocket connection. Frames that arrive while a call waits for a
/// specific answer are kept, in order, for [`WsConnection::recv`].
pub struct WsConnection {
    ws: Ws,
    codec: Codec,
    pending: VecDeque<ServerFrame>,
    /// What `ready` said.
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub node_id: u16,
    pub heartbeat_interval_ms: u64,
}

/// How long the helpers wait for an answer.
const WAIT: Duration = Duration::from_secs(20);

/// Opens a WebSocket without authenticating (for tests of the handshake itself).
pub async fn connect_raw(url: &str) -> Result<Ws, ClientError> {
    let mut cfg = WebSocketConfig::default();
    // Server frames are bounded by the protocol; accept a little slack.
    cfg.max_message_size = Some(4 * crate::limits::MAX_FRAME_BYTES);
    cfg.max_frame_size = Some(4 * crate::limits::MAX_FRAME_BYTES);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(cfg), true)
        .await
        .map_err(|e| ClientError::Transport(e.to_string()))?;
    Ok(ws)
}

impl WsConnection {
    /// Connects, authenticates with `token` and waits for `ready`.
    pub async fn connect(url: &str, token: &str, codec: Codec) -> Result<Self, ClientError> {
        let ws = connect_raw(url).await?;
        let mut conn = WsConnection {
            ws,
            codec,
            pending: VecDeque::new(),
            user_id: UserId(0),
            device_id: DeviceId(0),
            node_id: 0,
            heartbeat_interval_ms: 0,
        };
        conn.send(&ClientFrame::Auth {
            token: token.into(),
        })
        .await?;
        match conn.next_frame(WAIT).await? {
            ServerFrame::Ready {
                user_id,
                device_id,
                node_id,
                heartbeat_interval_ms,
            } => {
                conn.user_id = user_id;
                conn.device_id = device_id;
                conn.node_id = node_id;
                conn.heartbeat_interval_ms = heartbeat_interval_ms;
                Ok(conn)
            }
            ServerFrame::Error { code, message, .. } => {
                Err(ClientError::Refused(ErrorBody { code, message }))
            }
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let bytes = codec::encode(self.codec, frame);
        let msg = match self.codec {
            Codec::Json => WsMessage::Text(String::from_utf8(bytes).unwrap_or_default().into()),
            Codec::Binary => WsMessage::Binary(bytes.into()),
        };
        self.send_raw(msg).await
    }

    /// Sends a raw WebSocket message (for tests of bad input).
    pub async fn send_raw(&mut self, msg: WsMessage) -> Result<(), ClientError> {
        self.ws
            .send(msg)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))
    }

    /// The next server frame, kept ones first.
    pub async fn recv(&mut self, timeout: Duration) -> Result<ServerFrame, ClientError> {
        if let Some(f) = self.pending.pop_front() {
            return Ok(f);
        }
        self.next_frame(timeout).await
    }

    /// Reads the socket for the next frame (ignoring what is kept).
    async fn next_frame(&mut self, timeout: Duration) -> Result<ServerFrame, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| ClientError::Timeout("a frame"))?;
            let msg = match msg {
                None => return Err(ClientError::Closed(None)),
                Some(Err(e)) => return Err(ClientError::Transport(e.to_string())),
                Some(Ok(m)) => m,
            };
            let decoded = match msg {
                WsMessage::Text(t) => codec::decode(Codec::Json, t.as_bytes()),
                WsMessage::Binary(b) => codec::decode(Codec::Binary, &b),
                WsMessage::Close(c) => {
                    return Err(ClientError::Closed(
                        c.map(|c| (u16::from(c.code), c.reason.to_string())),
                    ))
                }
                _ => continue,
            };
            return decoded.map_err(|e| ClientError::Unexpected(e.to_string()));
        }
    }

    /// Waits for the first frame that `pick` accepts, keeping the others for `recv`.
    pub async fn wait_for<T>(
        &mut self,
        timeout: Duration,
        mut pick: impl FnMut(&ServerFrame) -> Option<T>,
    ) -> Result<T, ClientError> {
        if let Some(pos) = self.pending.iter().position(|f| pick(f).is_some()) {
            let f = self
                .pending
                .remove(pos)
                .ok_or(ClientError::Timeout("a frame"))?;
            return pick(&f).ok_or(ClientError::Timeout("a frame"));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let f = self.next_frame(left).await?;
            if let Some(t) = pick(&f) {
                return Ok(t);
            }
            self.pending.push_back(f);
        }
    }

    /// Sends a message and waits for its `ack` (or the `error` that refers to it).
    pub async fn send_message(
        &mut self,
        client_id: &str,
        to: Recipient,
        body: &str,
    ) -> Result<Ack, ClientError> {
        self.send(&ClientFrame::Send {
            id: client_id.into(),
            to,
            body: body.into(),
        })
        .await?;
        self.wait_ack(client_id).await
    }

    /// Waits for the `ack` or `error` whose `ref` is `client_id`.
    pub async fn wait_ack(&mut self, client_id: &str) -> Result<Ack, ClientError> {
        let answer = self
            .wait_for(WAIT, |f| match f {
                ServerFrame::Ack {
                    reference,
                    message_id,
                    conversation,
                    ts,
                } if reference == client_id => Some(Ok(Ack {
                    message_id: *message_id,
                    conversation: *conversation,
                    ts: *ts,
                })),
                ServerFrame::Error {
                    code,
                    message,
                    reference: Some(r),
                } if r == client_id => Some(Err(ErrorBody::new(*code, message.clone()))),
                _ => None,
            })
            .await?;
        answer.map_err(ClientError::Refused)
    }

    /// Runs a whole `sync` from `after` and returns every message of every batch, in order,
    /// with the final cursor.
    pub async fn sync_all(
        &mut self,
        after: Option<MessageId>,
        limit: Option<u32>,
    ) -> Result<SyncResult, ClientError> {
        self.send(&ClientFrame::Sync { after, limit }).await?;
        let mut out = SyncResult::default();
        loop {
            let (messages, cursor, done, gap) = self
                .wait_for(WAIT, |f| match f {
                    ServerFrame::SyncBatch {
                        messages,
                        cursor,
                        done,
                        gap,
                    } => Some((messages.clone(), *cursor, *done, *gap)),
                    ServerFrame::Error { code, message, .. } => {
                        Some((Vec::new(), Some(MessageId(0)), true, {
                            tracing::warn!(%code, %message, "sync refused");
                            false
                        }))
                    }
                    _ => None,
                })
                .await?;
            out.batches += 1;
            out.gap |= gap;
            out.messages.extend(messages);
            out.cursor = cursor.or(out.cursor);
            if done {
                return Ok(out);
            }
        }
    }

    /// Closes the connection politely.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// What an `ack` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub message_id: MessageId,
    pub conversation: ConversationId,
    pub ts: u64,
}

/// Everything a `sync` returned.
#[derive(Clone, Debug, Default)]
pub struct SyncResult {
    pub messages: Vec<crate::frames::Message>,
    pub cursor: Option<MessageId>,
    pub batches: usize,
    pub gap: bool,
}
