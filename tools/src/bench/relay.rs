//! The baseline: a minimal in-process WebSocket relay on the same crates (axum, tungstenite,
//! the client-proto codecs) with none of the node's work: no auth (the token is the user id),
//! no storage, no routing beyond a map of receivers. Each `send` is acked at once and
//! forwarded to the receiver. What the node achieves is reported as a ratio of this.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::ws::{Message as AxMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use client_proto::codec::{self, Codec};
use client_proto::ids::{ConversationId, GroupId, MessageId, UserId};
use client_proto::{ClientFrame, Message, Recipient, ServerFrame};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Room in one relay connection's outbound queue (senders wait when it is full).
const QUEUE: usize = 1024;

#[derive(Default)]
struct Shared {
    receivers: Mutex<HashMap<UserId, mpsc::Sender<ServerFrame>>>,
    /// Groups made with [`Relay::add_group`]: a send to one goes to every other member.
    groups: Mutex<HashMap<GroupId, Arc<Vec<UserId>>>>,
    next_id: AtomicU64,
}

/// A running relay; [`Relay::shutdown`] stops it.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
}

impl Relay {
    /// Binds 127.0.0.1 on a free port and serves `/v1/ws`.
    pub async fn start() -> Result<Relay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the relay")?;
        let addr = listener.local_addr().context("relay address")?;
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/v1/ws", get(upgrade))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let token = stop.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await
        });
        Ok(Relay {
            addr,
            shared,
            stop,
            server,
        })
    }

    /// Makes group `id` of `members`: the relay fans a send to it out to the others, as a
    /// node does (no storage, no membership checks).
    pub fn add_group(&self, id: GroupId, members: Vec<UserId>) {
        self.shared.groups.lock().insert(id, Arc::new(members));
    }

    /// `ws://127.0.0.1:PORT/v1/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Stops accepting and waits (briefly) for the server task.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let mut server = self.server;
        if tokio::time::timeout(std::time::Duration::from_secs(2), &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
}

async fn upgrade(State(shared): State<Arc<Shared>>, ws: WebSocketUpgrade) -> Response {
    ws.on_upgrade(move |socket| serve(shared, socket))
}

fn to_ws(codec: Codec, frame: &ServerFrame) -> AxMessage {
    let bytes = codec::encode(codec, frame);
    match codec {
        Codec::Json => AxMessage::Text(String::from_utf8(bytes).unwrap_or_default().into()),
        Codec::Binary => AxMessage::Binary(bytes.into()),
    }
}

/// One connection: the first frame names the user; then sends are acked and forwarded.
async fn serve(shared: Arc<Shared>, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<ServerFrame>(QUEUE);
    // Shared by the reader and the writer futures of this one task.
    let binary = AtomicBool::new(false);
    let codec = || {
        if binary.load(Ordering::Relaxed) {
            Codec::Binary
        } else {
            Codec::Json
        }
    };
    let mut me: Option<UserId> = None;
    let reader = async {
        while let Some(Ok(msg)) = stream.next().await {
            let (c, frame) = match msg {
                AxMessage::Text(t) => (Codec::Json, codec::decode(Codec::Json, t.as_bytes())),
                AxMessage::Binary(b) => (Codec::Binary, codec::decode(Codec::Binary, &b)),
                AxMessage::Close(_) => break,
                _ => continue,
            };
            binary.store(c == Codec::Binary, Ordering::Relaxed);
            let Ok(frame) = frame else { break };
            match frame {
                ClientFrame::Auth { token } => {
                    let Ok(id) = token.parse::<u64>() else { break };
                    let user = UserId(id);
                    me = Some(user);
                    shared.receivers.lock().insert(user, tx.clone());
                    let ready = ServerFrame::Ready {
                        user_id: user,
                        device_id: client_proto::ids::DeviceId(id),
                        node_id: 0,
                        heartbeat_interval_ms: 5000,
                    };
                    if tx.send(ready).await.is_err() {
                        break;
                    }
                }
                ClientFrame::Send {
                    id,
                    to: Recipient::User(to),
                    body,
                } => {
                    let Some(from) = me else { break };
                    let message_id = MessageId(shared.next_id.fetch_add(1, Ordering::Relaxed));
                    let conversation = ConversationId::direct(from, to);
                    let ts = now_unix_ms();
                    let ack = ServerFrame::Ack {
                        reference: id.clone(),
                        message_id,
                        conversation,
                        ts,
                    };
                    if tx.send(ack).await.is_err() {
                        break;
                    }
                    let peer = shared.receivers.lock().get(&to).cloned();
                    if let Some(peer) = peer {
                        let message = Message {
                            message_id,
                            conversation,
                            from,
                            to: Some(to),
                            group: None,
                            body,
                            ts,
                            client_id: id,
                        };
                        // Waits when the receiver is slow: the relay never drops.
                        let _ = peer
                            .send(ServerFrame::Message {
                                message: Arc::new(message),
                            })
                            .await;
                    }
                }
                ClientFrame::Send {
                    id,
                    to: Recipient::Group(group),
                    body,
                } => {
                    let Some(from) = me else { break };
                    let message_id = MessageId(shared.next_id.fetch_add(1, Ordering::Relaxed));
                    let conversation = ConversationId::Group(group);
                    let ts = now_unix_ms();
                    let ack = ServerFrame::Ack {
                        reference: id.clone(),
                        message_id,
                        conversation,
                        ts,
                    };
                    if tx.send(ack).await.is_err() {
                        break;
                    }
                    let members = shared.groups.lock().get(&group).cloned();
                    let Some(members) = members else { continue };
                    // One message, shared by every member's frame (as the node's hub does).
                    let frame = ServerFrame::Message {
                        message: Arc::new(Message {
                            message_id,
                            conversation,
                            from,
                            to: None,
                            group: Some(group),
                            body,
                            ts,
                            client_id: id,
                        }),
                    };
                    for member in members.iter().filter(|m| **m != from) {
                        let peer = shared.receivers.lock().get(member).cloned();
                        if let Some(peer) = peer {
                            let _ = peer.send(frame.clone()).await;
                        }
                    }
                }
                _ => {}
            }
        }
    };
    let writer = async {
        while let Some(frame) = rx.recv().await {
            if sink.feed(to_ws(codec(), &frame)).await.is_err() {
                break;
            }
            while let Ok(more) = rx.try_recv() {
                if sink.feed(to_ws(codec(), &more)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        _ = reader => {}
        _ = writer => {}
    }
    if let Some(user) = me {
        shared.receivers.lock().remove(&user);
    }
}

/// The wall clock in Unix milliseconds (the relay's message timestamps).
fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
