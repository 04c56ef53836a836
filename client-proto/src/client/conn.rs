//! One authenticated connection to a node, over WebSocket (JSON or binary frames) or QUIC
//! (binary frames), with helpers that wait for specific answers.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::quic::{self, QuicLink};
use super::ClientError;
use crate::codec::{self, CloseCode, Codec, DecodeError};
use crate::error::ErrorBody;
use crate::frames::{ClientFrame, Recipient, ServerFrame};
use crate::ids::{ConversationId, DeviceId, MessageId, Position, UserId};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The older name of [`Connection`], from when it only spoke WebSocket.
pub type WsConnection = Connection;

enum Link {
    Ws(Box<Ws>),
    Quic(Box<QuicLink>),
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Frame encoding on WebSocket (QUIC is always binary).
    pub codec: Codec,
    /// PEM of the CA that signed the node's certificate (the cluster CA) for `quic://` URLs;
    /// `None` trusts the public web roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            codec: Codec::Json,
            ca_pem: None,
        }
    }
}

/// One authenticated connection. Frames that arrive while a call waits for a specific answer
/// are kept, in order, for [`Connection::recv`].
pub struct Connection {
    link: Link,
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
    // A conforming client: server frames are at most the protocol's frame limit, escaping
    // included, so nothing larger is accepted.
    cfg.max_message_size = Some(crate::limits::MAX_FRAME_BYTES);
    cfg.max_frame_size = Some(crate::limits::MAX_FRAME_BYTES);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(cfg), true)
        .await
        .map_err(|e| ClientError::Transport(e.to_string()))?;
    Ok(ws)
}

impl Connection {
    /// Connects to `url` (`ws://`, `wss://` or `quic://`), authenticates with `token` and
    /// waits for `ready`.
    pub async fn connect(url: &str, token: &str, codec: Codec) -> Result<Self, ClientError> {
        let opts = ConnectOptions {
            codec,
            ca_pem: None,
        };
        Self::connect_with(url, token, &opts).await
    }

    /// Opens the transport without authenticating (for tests of the handshake itself).
    pub async fn connect_unauthenticated(
        url: &str,
        opts: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let (link, codec) = if url.starts_with("quic://") {
            let q = quic::connect(url, opts.ca_pem.as_deref()).await?;
            (Link::Quic(Box::new(q)), Codec::Binary)
        } else {
            (Link::Ws(Box::new(connect_raw(url).await?)), opts.codec)
        };
        Ok(Connection {
            link,
            codec,
            pending: VecDeque::new(),
            user_id: UserId(0),
            device_id: DeviceId(0),
            node_id: 0,
            heartbeat_interval_ms: 0,
        })
    }

    /// Like [`Connection::connect`], with options (the CA for QUIC).
    pub async fn connect_with(
        url: &str,
        token: &str,
        opts: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let mut conn = Self::connect_unauthenticated(url, opts).await?;
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

    /// Whether this connection runs over QUIC.
    pub fn is_quic(&self) -> bool {
        matches!(self.link, Link::Quic(_))
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ClientError> {
        let bytes = codec::encode(self.codec, frame);
        self.send_bytes(bytes).await
    }

    /// Sends one already-encoded frame in this connection's codec (for tests of bad input).
    pub async fn send_bytes(&mut self, bytes: Vec<u8>) -> Result<(), ClientError> {
        match &mut self.link {
            Link::Ws(_) => {
                let msg = match self.codec {
                    Codec::Json => {
                        WsMessage::Text(String::from_utf8_lossy(&bytes).into_owned().into())
                    }
                    Codec::Binary => WsMessage::Binary(bytes.into()),
                };
                self.send_raw(msg).await
            }
            Link::Quic(q) => q
                .send
                .send(Bytes::from(bytes))
                .await
                .map_err(|e| ClientError::Transport(e.to_string())),
        }
    }

    /// Sends a raw WebSocket message (for tests of bad input; WebSocket only).
    pub async fn send_raw(&mut self, msg: WsMessage) -> Result<(), ClientError> {
        match &mut self.link {
            Link::Ws(ws) => ws
                .send(msg)
                .await
                .map_err(|e| ClientError::Transport(e.to_string())),
            Link::Quic(_) => Err(ClientError::Transport(
                "send_raw is for WebSocket connections".into(),
            )),
        }
    }

    /// Writes raw bytes onto the QUIC stream, bypassing the length prefix (for tests of bad
    /// input; QUIC only).
    pub async fn send_raw_quic(&mut self, raw: &[u8]) -> Result<(), ClientError> {
        match &mut self.link {
            Link::Quic(q) => q
                .send
                .get_mut()
                .write_all(raw)
                .await
                .map_err(|e| ClientError::Transport(e.to_string())),
            Link::Ws(_) => Err(ClientError::Transport(
                "send_raw_quic is for QUIC connections".into(),
            )),
        }
    }

    /// The next server frame, kept ones first.
    pub async fn recv(&mut self, timeout: Duration) -> Result<ServerFrame, ClientError> {
        if let Some(f) = self.pending.pop_front() {
            return Ok(f);
        }
        self.next_frame(timeout).await
    }

    /// Reads the transport for the next frame (ignoring what is kept).
    async fn next_frame(&mut self, timeout: Duration) -> Result<ServerFrame, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match &mut self.link {
                Link::Ws(ws) => {
                    let msg = tokio::time::timeout_at(deadline, ws.next())
                        .await
                        .map_err(|_| ClientError::Timeout("a frame"))?;
                    let decoded = match msg {
                        None => return Err(ClientError::Closed(None)),
                        Some(Err(e)) => return Err(ClientError::Transport(e.to_string())),
                        Some(Ok(WsMessage::Text(t))) => codec::decode(Codec::Json, t.as_bytes()),
                        Some(Ok(WsMessage::Binary(b))) => codec::decode(Codec::Binary, &b),
                        Some(Ok(WsMessage::Close(c))) => {
                            return Err(ClientError::Closed(
                                c.map(|c| (u16::from(c.code), c.reason.to_string())),
                            ))
                        }
                        Some(Ok(_)) => continue,
                    };
                    match decoded {
                        // A frame type added to the protocol after this client: skipped.
                        Err(DecodeError::UnknownType(t)) => {
                            tracing::debug!(frame = %t, "skipping a frame of an unknown type");
                            continue;
                        }
                        other => return other.map_err(|e| ClientError::Unexpected(e.to_string())),
                    }
                }
                Link::Quic(q) => {
                    let next = tokio::time::timeout_at(deadline, q.recv.next())
                        .await
                        .map_err(|_| ClientError::Timeout("a frame"))?;
                    return match next {
                        Some(Ok(bytes)) => match codec::decode(Codec::Binary, &bytes) {
                            Err(DecodeError::UnknownType(t)) => {
                                tracing::debug!(frame = %t, "skipping a frame of an unknown type");
                                continue;
                            }
                            other => other.map_err(|e| ClientError::Unexpected(e.to_string())),
                        },
                        Some(Err(_)) | None => {
                            // Give the close frame a moment to be processed.
                            let _ =
                                tokio::time::timeout(Duration::from_millis(200), q.conn.closed())
                                    .await;
                            Err(quic::close_reason(&q.conn))
                        }
                    };
                }
            }
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
                    ..
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
        after: Option<Position>,
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
                    ServerFrame::Error { code, message, .. } => Some((Vec::new(), None, true, {
                        tracing::warn!(%code, %message, "sync refused");
                        false
                    })),
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
    pub async fn close(self) {
        match self.link {
            Link::Ws(mut ws) => {
                let _ = WebSocketStream::close(&mut ws, None).await;
            }
            Link::Quic(mut q) => {
                let _ = q.send.get_mut().finish();
                q.conn.close(CloseCode::Normal.code().into(), b"bye");
                // Let the close reach the server before the endpoint goes away (a process
                // that exits right after would otherwise leave the server to time out).
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), q.endpoint.wait_idle()).await;
            }
        }
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
    /// The cursor of the last batch: sync from it next time.
    pub cursor: Option<Position>,
    pub batches: usize,
    pub gap: bool,
}

impl SyncResult {
    /// The message ids, in the order they came.
    pub fn ids(&self) -> Vec<MessageId> {
        self.messages.iter().map(|m| m.message_id).collect()
    }
}
