//! [`ChatClient`]: a connection that heals itself. A driver task owns the connection; it
//! reconnects with jittered exponential backoff (first retry within 1–5 s), tells the node
//! the largest message id it has seen (`seen`, so what it sends next sorts after it), sends
//! `sync` from its cursor after every (re)connect, keeps the cursor the server hands out
//! (`sync_batch` and `cursor` frames: an inbox position, never a message id), drops messages
//! it has already delivered (by message id), heartbeats, and re-sends unacknowledged sends
//! with their original client ids (the server acks a retried id with the first message's id,
//! without storing a second message).
//!
//! A `draining` frame (the node is about to stop) moves the client at once, without backoff,
//! to the node it names (`reconnect_to`, same transport and token); without a hint it
//! reconnects as after a lost connection (asking `discover` first). Either way the new
//! connection syncs from the cursor and re-sends every unacknowledged send with its client
//! id. [`ChatClient::stats`] counts moves and retries.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::conn::{Ack, ConnectOptions, Connection};
use super::ClientError;
use crate::codec::CloseCode;
use crate::error::{ErrorBody, ErrorCode};
use crate::frames::{ClientFrame, Message, PresenceStatus, Recipient, ServerFrame};
use crate::ids::{MessageId, Position, UserId};

/// Message ids remembered for dedup; older ones are below the cursor and never resent.
const DEDUP_WINDOW: usize = 20_000;
/// Events waiting for the application; when full, the driver stops reading (backpressure).
const EVENT_QUEUE: usize = 1024;

/// What a [`ChatClient`] reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Connected (again) to node `node_id`.
    Connected { node_id: u16 },
    /// The connection was lost; the client reconnects by itself.
    Disconnected { reason: String },
    /// The node said it is draining (`draining` frame): the client closed that connection
    /// and now connects to `to` (`None`: the node named no other node; it reconnects as
    /// after a lost connection).
    Moving { to: Option<String> },
    /// A message for this user, delivered once per message id.
    Message(Message),
    /// A watched user's status changed.
    Presence {
        user_id: UserId,
        status: PresenceStatus,
        last_seen: Option<u64>,
    },
    /// The server refused something that was not a send (sends report through their future).
    Error(ErrorBody),
}

/// How a [`ChatClient`] connects.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// `ws://host:port/v1/ws` or `quic://host:port`.
    pub url: String,
    pub token: String,
    pub connect: ConnectOptions,
    /// The cursor from an earlier run (the last one [`ChatClient::cursor`] returned), to
    /// sync from.
    pub cursor: Option<Position>,
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// HTTP roots of nodes to ask `GET /v1/discover` when the current node cannot be
    /// reached; the client then connects to the node they recommend (its WebSocket URL, or
    /// its QUIC address when `url` is `quic://`). Empty: always reconnect to `url`.
    pub discover: Vec<String>,
}

impl ClientOptions {
    pub fn new(url: impl Into<String>, token: impl Into<String>) -> Self {
        ClientOptions {
            url: url.into(),
            token: token.into(),
            connect: ConnectOptions::default(),
            cursor: None,
            max_backoff: Duration::from_secs(30),
            discover: Vec::new(),
        }
    }
}

/// What a [`ChatClient`] has done so far (counters since it started).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Connections made (the first one included).
    pub connects: u64,
    /// Connections left because the node sent `draining` with a `reconnect_to` hint.
    pub moves_by_hint: u64,
    /// Connections left because the node sent `draining` without a hint.
    pub moves_without_hint: u64,
    /// Connections that ended otherwise (closed by the node, a network failure, a failed
    /// send), after which the client reconnected.
    pub lost: u64,
    /// Attempts to connect that failed.
    pub connect_failures: u64,
    /// Sends the node refused with `unavailable` (retried with the same client id).
    pub sends_unavailable: u64,
    /// Sends the node refused with `rate_limited` (retried with the same client id).
    pub sends_rate_limited: u64,
    /// Sends re-sent on a new connection because the last one ended before their ack.
    pub resent: u64,
}

/// The live counters behind [`ClientStats`], shared by the driver and the handle.
#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    moves_by_hint: AtomicU64,
    moves_without_hint: AtomicU64,
    lost: AtomicU64,
    connect_failures: AtomicU64,
    sends_unavailable: AtomicU64,
    sends_rate_limited: AtomicU64,
    resent: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> ClientStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClientStats {
            connects: get(&self.connects),
            moves_by_hint: get(&self.moves_by_hint),
            moves_without_hint: get(&self.moves_without_hint),
            lost: get(&self.lost),
            connect_failures: get(&self.connect_failures),
            sends_unavailable: get(&self.sends_unavailable),
            sends_rate_limited: get(&self.sends_rate_limited),
            resent: get(&self.resent),
        }
    }
}

struct PendingSend {
    frame: ClientFrame,
    reply: oneshot::Sender<Result<Ack, ClientError>>,
}

enum Cmd {
    Send(String, PendingSend),
    Frame(ClientFrame),
}

/// A self-healing chat connection. Dropping it stops the driver.
pub struct ChatClient {
    sender: ChatSender,
    events: mpsc::Receiver<Event>,
    cursor: Arc<AtomicU64>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// The sending half of a [`ChatClient`]: cheap to clone, so sends can wait for their acks
/// while another task keeps reading the client's events.
#[derive(Clone)]
pub struct ChatSender {
    cmds: mpsc::Sender<Cmd>,
    next_id: Arc<AtomicU64>,
    id_prefix: Arc<str>,
}

impl ChatSender {
    /// Sends a message with a fresh client id; resolves with the ack once it is durably
    /// stored, retrying across reconnects.
    pub async fn send(&self, to: Recipient, body: impl Into<String>) -> Result<Ack, ClientError> {
        let id = format!(
            "{}-{}",
            self.id_prefix,
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        self.send_with_id(id, to, body).await
    }

    /// Sends with a client id of the caller's choosing (an id used before returns the first
    /// message's ack).
    pub async fn send_with_id(
        &self,
        client_id: String,
        to: Recipient,
        body: impl Into<String>,
    ) -> Result<Ack, ClientError> {
        let (reply, rx) = oneshot::channel();
        let frame = ClientFrame::Send {
            id: client_id.clone(),
            to,
            body: body.into(),
        };
        self.cmds
            .send(Cmd::Send(client_id, PendingSend { frame, reply }))
            .await
            .map_err(|_| ClientError::Closed(None))?;
        rx.await.map_err(|_| ClientError::Closed(None))?
    }
}

impl ChatClient {
    /// Starts the driver; it connects in the background (watch for [`Event::Connected`]).
    pub fn start(opts: ClientOptions) -> Self {
        let (cmds, cmd_rx) = mpsc::channel(256);
        let (ev_tx, events) = mpsc::channel(EVENT_QUEUE);
        let cursor = Arc::new(AtomicU64::new(opts.cursor.map_or(0, |c| c.0)));
        let stop = CancellationToken::new();
        let stats = Arc::new(Stats::default());
        let driver = Driver {
            stats: stats.clone(),
            opts,
            cmds: cmd_rx,
            events: ev_tx,
            cursor: cursor.clone(),
            seen_max: 0,
            told_seen: 0,
            syncing: false,
            unacked: HashMap::new(),
            order: Vec::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            stop: stop.clone(),
        };
        let id_prefix = format!("{:016x}", rand::thread_rng().gen::<u64>());
        ChatClient {
            sender: ChatSender {
                cmds,
                next_id: Arc::new(AtomicU64::new(0)),
                id_prefix: id_prefix.into(),
            },
            events,
            cursor,
            stats,
            stop,
            task: Some(tokio::spawn(driver.run())),
        }
    }

    /// Sends a message with a fresh client id; resolves with the ack once it is durably
    /// stored, retrying across reconnects.
    pub async fn send(&self, to: Recipient, body: impl Into<String>) -> Result<Ack, ClientError> {
        self.sender.send(to, body).await
    }

    /// Sends with a client id of the caller's choosing (an id used before returns the first
    /// message's ack).
    pub async fn send_with_id(
        &self,
        client_id: String,
        to: Recipient,
        body: impl Into<String>,
    ) -> Result<Ack, ClientError> {
        self.sender.send_with_id(client_id, to, body).await
    }

    /// A sending handle that can be moved to another task.
    pub fn sender(&self) -> ChatSender {
        self.sender.clone()
    }

    /// Sends any other frame (subscribe_presence, history...) on the current connection.
    pub async fn send_frame(&self, frame: ClientFrame) -> Result<(), ClientError> {
        self.sender
            .cmds
            .send(Cmd::Frame(frame))
            .await
            .map_err(|_| ClientError::Closed(None))
    }

    /// The next event; `None` once the client has stopped (bad token, or shut down).
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The cursor the server handed out last: store it to resume after a restart.
    pub fn cursor(&self) -> Option<Position> {
        Some(Position(self.cursor.load(Ordering::Relaxed))).filter(|c| c.0 > 0)
    }

    /// What the client has done so far: connections, moves, retried sends.
    pub fn stats(&self) -> ClientStats {
        self.stats.snapshot()
    }

    /// Stops the driver and closes the connection.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for ChatClient {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Driver {
    opts: ClientOptions,
    cmds: mpsc::Receiver<Cmd>,
    events: mpsc::Sender<Event>,
    cursor: Arc<AtomicU64>,
    /// The largest message id acked or received (told to each node connected to).
    seen_max: u64,
    /// The largest message id told to the current connection's node in a `seen` frame.
    told_seen: u64,
    /// A `sync` is under way on this connection (sent, no `done` batch yet).
    syncing: bool,
    unacked: HashMap<String, PendingSend>,
    /// Client ids of `unacked`, in send order (for re-sending in order).
    order: Vec<String>,
    seen: HashSet<MessageId>,
    seen_order: VecDeque<MessageId>,
    stop: CancellationToken,
    stats: Arc<Stats>,
}

/// Why a connected session ended.
enum End {
    Stop,
    Lost(String),
    /// The node is draining; move to this address (the same transport), if it gave one.
    Moved(Option<String>),
}

impl Driver {
    async fn run(mut self) {
        let mut failures = 0u32;
        loop {
            let connected = tokio::select! {
                _ = self.stop.cancelled() => return,
                c = Connection::connect_with(&self.opts.url, &self.opts.token, &self.opts.connect) => c,
            };
            match connected {
                Ok(conn) => {
                    failures = 0;
                    Stats::bump(&self.stats.connects);
                    let _ = self
                        .events
                        .send(Event::Connected {
                            node_id: conn.node_id,
                        })
                        .await;
                    match self.session(conn).await {
                        End::Stop => return,
                        End::Lost(reason) => {
                            Stats::bump(&self.stats.lost);
                            let _ = self.events.send(Event::Disconnected { reason }).await;
                        }
                        End::Moved(Some(to)) => {
                            Stats::bump(&self.stats.moves_by_hint);
                            self.opts.url = self.hinted_url(&to);
                            let _ = self.events.send(Event::Moving { to: Some(to) }).await;
                            // The hint names a node that takes clients now: no backoff.
                            continue;
                        }
                        End::Moved(None) => {
                            Stats::bump(&self.stats.moves_without_hint);
                            let _ = self.events.send(Event::Moving { to: None }).await;
                            self.rediscover().await;
                        }
                    }
                }
                Err(ClientError::Refused(body)) if body.code == ErrorCode::Unauthorized => {
                    let _ = self.events.send(Event::Error(body)).await;
                    self.fail_all(|| {
                        ClientError::Closed(Some((
                            CloseCode::PolicyViolation.code(),
                            "unauthorized".into(),
                        )))
                    });
                    return;
                }
                Err(_) => {
                    failures += 1;
                    Stats::bump(&self.stats.connect_failures);
                    self.rediscover().await;
                }
            }
            // Jittered exponential backoff: 1–5 s first, doubling up to the cap.
            let base = Duration::from_secs(1).saturating_mul(1 << failures.min(5));
            let wait = base
                .min(self.opts.max_backoff)
                .mul_f64(rand::thread_rng().gen_range(1.0..5.0))
                .min(self.opts.max_backoff);
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Asks the discover nodes for a live node and points `url` at it.
    async fn rediscover(&mut self) {
        for base in self.opts.discover.clone() {
            let api = super::HttpClient::new(base);
            let found: Result<crate::http::NodeInfo, _> = api
                .request(reqwest::Method::GET, "/v1/discover", None, None::<&()>)
                .await;
            if let Ok(node) = found {
                self.opts.url = if self.opts.url.starts_with("quic://") {
                    format!("quic://{}", node.quic_addr)
                } else {
                    node.ws_url
                };
                return;
            }
        }
    }

    /// The URL to connect to for a `reconnect_to` hint: a WebSocket URL as is; a QUIC
    /// address (`host:port`, or a `quic://` URL) as a `quic://` URL.
    fn hinted_url(&self, to: &str) -> String {
        if self.opts.url.starts_with("quic://") && !to.starts_with("quic://") {
            format!("quic://{to}")
        } else {
            to.to_string()
        }
    }

    fn fail_all(&mut self, err: impl Fn() -> ClientError) {
        for (_, p) in self.unacked.drain() {
            let _ = p.reply.send(Err(err()));
        }
        self.order.clear();
    }

    async fn session(&mut self, mut conn: Connection) -> End {
        self.told_seen = 0;
        if let Err(e) = self.tell_seen(&mut conn).await {
            return End::Lost(e.to_string());
        }
        if let Err(e) = conn.send(&self.sync_frame()).await {
            return End::Lost(e.to_string());
        }
        self.syncing = true;
        for id in self.order.clone() {
            if let Some(p) = self.unacked.get(&id) {
                Stats::bump(&self.stats.resent);
                if let Err(e) = conn.send(&p.frame).await {
                    return End::Lost(e.to_string());
                }
            }
        }
        let beat = Duration::from_millis(conn.heartbeat_interval_ms.max(100));
        let mut next_beat = tokio::time::Instant::now() + beat;
        loop {
            let left = next_beat.saturating_duration_since(tokio::time::Instant::now());
            let step = tokio::select! {
                _ = self.stop.cancelled() => {
                    conn.close().await;
                    return End::Stop;
                }
                cmd = self.cmds.recv() => Step::Cmd(cmd),
                frame = conn.recv(left) => Step::Frame(frame),
            };
            let sent = match step {
                Step::Cmd(None) => {
                    conn.close().await;
                    return End::Stop;
                }
                Step::Cmd(Some(Cmd::Send(id, p))) => {
                    let frame = p.frame.clone();
                    if !self.unacked.contains_key(&id) {
                        self.order.push(id.clone());
                    }
                    self.unacked.insert(id, p);
                    // What this client has seen sorts before what it sends now.
                    match self.tell_seen(&mut conn).await {
                        Ok(()) => conn.send(&frame).await,
                        Err(e) => Err(e),
                    }
                }
                Step::Cmd(Some(Cmd::Frame(f))) => conn.send(&f).await,
                Step::Frame(Err(ClientError::Timeout(_))) => {
                    next_beat = tokio::time::Instant::now() + beat;
                    conn.send(&ClientFrame::Heartbeat).await
                }
                Step::Frame(Err(e)) => return End::Lost(e.to_string()),
                Step::Frame(Ok(ServerFrame::Draining { reconnect_to })) => {
                    // Sends without an ack yet are re-sent on the next connection with the
                    // same client ids (the server acks a repeat with the first message).
                    conn.close().await;
                    return End::Moved(reconnect_to);
                }
                Step::Frame(Ok(f)) => match self.handle(f).await {
                    Some(retry) => conn.send(&retry).await,
                    None => Ok(()),
                },
            };
            if let Err(e) = sent {
                return End::Lost(e.to_string());
            }
        }
    }

    /// Handles one server frame; returns a frame to send when a send must be retried.
    async fn handle(&mut self, frame: ServerFrame) -> Option<ClientFrame> {
        match frame {
            ServerFrame::Message { message } => self.deliver((*message).clone()).await,
            ServerFrame::SyncBatch {
                messages,
                cursor,
                done,
                ..
            } => {
                if done {
                    self.syncing = false;
                }
                for m in messages {
                    self.deliver(m).await;
                }
                // After the batch's messages: a cursor covers only what came before it.
                if let Some(c) = cursor {
                    self.cursor.fetch_max(c.0, Ordering::Relaxed);
                }
            }
            ServerFrame::Cursor { cursor } => {
                self.cursor.fetch_max(cursor.0, Ordering::Relaxed);
            }
            ServerFrame::Ack {
                reference,
                message_id,
                conversation,
                ts,
            } => {
                self.seen_max = self.seen_max.max(message_id.0);
                if let Some(p) = self.unacked.remove(&reference) {
                    self.order.retain(|id| *id != reference);
                    let _ = p.reply.send(Ok(Ack {
                        message_id,
                        conversation,
                        ts,
                    }));
                }
            }
            ServerFrame::Error {
                code,
                message,
                reference: Some(r),
                retry_after_ms,
            } => {
                if matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited) {
                    Stats::bump(if code == ErrorCode::Unavailable {
                        &self.stats.sends_unavailable
                    } else {
                        &self.stats.sends_rate_limited
                    });
                    tracing::debug!(client_id = %r, %code, %message, "send refused; retrying it");
                    // Safe to retry with the same client id, after a pause (at least what the
                    // node asked for).
                    let jitter = rand::thread_rng().gen_range(200..1000);
                    let pause = Duration::from_millis(retry_after_ms.0.unwrap_or(0).max(jitter));
                    tokio::time::sleep(pause).await;
                    return self.unacked.get(&r).map(|p| p.frame.clone());
                }
                if let Some(p) = self.unacked.remove(&r) {
                    self.order.retain(|id| *id != r);
                    let _ = p
                        .reply
                        .send(Err(ClientError::Refused(ErrorBody { code, message })));
                }
            }
            ServerFrame::Error {
                code,
                message,
                reference: None,
                retry_after_ms,
            } => {
                if self.syncing
                    && matches!(
                        code,
                        ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::RateLimited
                    )
                {
                    // The sync stopped part-way (the batches so far moved the cursor) or was
                    // refused: sync again from the cursor after a pause.
                    let jitter = rand::thread_rng().gen_range(1000..3000);
                    let pause = Duration::from_millis(retry_after_ms.0.unwrap_or(0).max(jitter));
                    tokio::time::sleep(pause).await;
                    return Some(self.sync_frame());
                }
                let _ = self
                    .events
                    .send(Event::Error(ErrorBody { code, message }))
                    .await;
            }
            ServerFrame::Presence {
                user_id,
                status,
                last_seen,
            } => {
                let _ = self
                    .events
                    .send(Event::Presence {
                        user_id,
                        status,
                        last_seen,
                    })
                    .await;
            }
            ServerFrame::Ready { .. }
            | ServerFrame::History { .. }
            | ServerFrame::Draining { .. } => {}
        }
        None
    }

    /// Tells the node the largest message id seen, when it has grown since last told.
    async fn tell_seen(&mut self, conn: &mut Connection) -> Result<(), ClientError> {
        if self.seen_max <= self.told_seen {
            return Ok(());
        }
        let seen = ClientFrame::Seen {
            message_id: MessageId(self.seen_max),
        };
        conn.send(&seen).await?;
        self.told_seen = self.seen_max;
        Ok(())
    }

    /// A `sync` from the cursor.
    fn sync_frame(&self) -> ClientFrame {
        let after = Some(Position(self.cursor.load(Ordering::Relaxed))).filter(|c| c.0 > 0);
        ClientFrame::Sync { after, limit: None }
    }

    async fn deliver(&mut self, m: Message) {
        if !self.seen.insert(m.message_id) {
            return;
        }
        self.seen_order.push_back(m.message_id);
        if self.seen_order.len() > DEDUP_WINDOW {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        self.seen_max = self.seen_max.max(m.message_id.0);
        let _ = self.events.send(Event::Message(m)).await;
    }
}

enum Step {
    Cmd(Option<Cmd>),
    Frame(Result<ServerFrame, ClientError>),
}

#[cfg(test)]
#[path = "chat_tests.rs"]
mod tests;
