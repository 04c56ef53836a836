//! One device session, whatever the transport: authentication, the frame loop, heartbeat
//! timeout, token expiry, the user's rate limits (`ratelimit.rs`), the inbox (`sync` and the node's own catch-ups, `catchup.rs`) and
//! the writer (`writer.rs`). WebSocket and QUIC only adapt their socket to a stream of
//! [`Inbound`] and a sink of [`OutFrame`].

mod catchup;
mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_proto::codec::{self, CloseCode, Codec, DecodeError};
use client_proto::limits::MAX_SUBSCRIBE_USERS;
use client_proto::{ClientFrame, ErrorCode, MessageId, ServerFrame};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::auth::Identity;
use crate::domain::error::ApiError;
use crate::domain::hub::{Outbound, OUTBOUND_QUEUE};
use crate::domain::presence::MAX_WATCHED_PER_CONNECTION;
use crate::gateway::drain::Transport;
use crate::gateway::ratelimit::UserLimit;
use crate::node::Node;
use catchup::CatchUp;

/// Sends of one connection being stored at once; past this the session stops reading.
const MAX_INFLIGHT_SENDS: usize = 64;

/// What a transport hands the session.
#[derive(Debug)]
pub enum Inbound {
    /// One frame's bytes and the codec they are in.
    Data(Codec, bytes::Bytes),
    /// The peer sent a frame over the protocol's size limit.
    TooLarge,
    /// The peer broke the transport's rules (WebSocket: invalid UTF-8 in a text frame, a
    /// reserved opcode, an unmasked frame): close with this code and reason.
    Violation(CloseCode, &'static str),
    /// The peer closed or the transport failed.
    Closed,
}

/// What the session hands the transport.
#[derive(Debug)]
pub enum OutFrame {
    /// A frame, encoded (JSON as text).
    Data(codec::Encoded),
    /// Close with a WebSocket close code and reason.
    Close(u16, String),
}

/// Runs one connection of `transport` to its end.
pub async fn run<R, W>(
    node: Arc<Node>,
    peer: SocketAddr,
    transport: Transport,
    mut reader: R,
    mut writer: W,
) where
    R: Stream<Item = Inbound> + Unpin + Send,
    W: Sink<OutFrame> + Unpin + Send,
{
    let span = tracing::info_span!("conn", %peer, user = tracing::field::Empty, device = tracing::field::Empty);
    async move {
        // The rarely taken, deep paths below are boxed: an idle connection's task then holds
        // only the state of the loops it waits in, not the largest of every future it might
        // ever await (the state machine reserves room for that), which is per-connection memory.
        let Some((who, codec, expires_at)) =
            Box::pin(authenticate(&node, &mut reader, &mut writer)).await
        else {
            return;
        };
        tracing::Span::current().record("user", tracing::field::display(who.user));
        tracing::Span::current().record("device", tracing::field::display(who.device));
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        // `ready` is the first frame in the queue, ahead of anything delivered once the
        // connection is registered below; the queue is new and empty, so this cannot fail.
        let ready = ServerFrame::Ready {
            user_id: who.user,
            device_id: who.device,
            node_id: node.cfg.node_id,
            heartbeat_interval_ms: node.cfg.heartbeat_interval.as_millis() as u64,
        };
        let _ = tx.try_send(Outbound::Frame(Box::new(ready)));
        let kick = node.shutdown.child_token();
        let registration = node
            .hub
            .register(who.user, who.device, tx.clone(), kick.clone());
        // Online (and watching friends) before the writer starts sending `ready`, so that
        // whatever the client does after `ready` already sees it connected. From here on every
        // path ends in the cleanup below.
        node.presence.device_up(who.user);
        match Box::pin(node.friends.ids(who.user)).await {
            Ok(friends) => {
                node.presence
                    .watch(registration.conn_id(), &tx, &kick, &friends);
            }
            Err(e) => tracing::warn!(error = %e, "could not load friends for presence"),
        }
        tracing::debug!("session ready");
        let conn_id = registration.conn_id();
        let catch_up_asked = registration.catch_up();
        let session = Session {
            node: node.clone(),
            who,
            conn_id,
            kick: kick.clone(),
            limit: node.limits.register(who.user, Instant::now()),
            expires_at,
            out: tx,
            catch_up: CatchUp::new(node.chat.clock_now(), node.cfg.seal_window),
            seen: None,
            transport,
        };
        let reader_done = CancellationToken::new();
        let writing = writer::write_loop(rx, writer, codec, kick.clone(), reader_done.clone());
        let reading = async {
            session.read_loop(reader, &kick, &catch_up_asked).await;
            // Unregister everywhere, then let the writer drain what is queued and stop.
            drop(registration);
            node.presence.forget(conn_id);
            reader_done.cancel();
        };
        tokio::join!(reading, writing);
        Box::pin(node.presence.device_down(who.user)).await;
        tracing::debug!("session ended");
    }
    .instrument(span)
    .await
}

/// Waits for the `auth` frame. On failure tells the client why and closes (1008). Returns
/// who it is, the codec, and when the token expires (an instant of this process's clock).
async fn authenticate<R, W>(
    node: &Node,
    reader: &mut R,
    writer: &mut W,
) -> Option<(Identity, Codec, tokio::time::Instant)>
where
    R: Stream<Item = Inbound> + Unpin,
    W: Sink<OutFrame> + Unpin,
{
    // Pings do not count: the transports filter them out of `reader`.
    let budget = node.cfg.auth_timeout;
    let first = tokio::time::timeout(budget, reader.next()).await;

    let (codec, bytes) = match first {
        Err(_) => {
            let _ = writer
                .send(OutFrame::Close(
                    CloseCode::PolicyViolation.code(),
                    format!("authenticate within {} ms", budget.as_millis()),
                ))
                .await;
            return None;
        }
        Ok(Some(Inbound::Data(codec, bytes))) => (codec, bytes),
        Ok(Some(Inbound::TooLarge)) => {
            let _ = writer
                .send(OutFrame::Close(
                    CloseCode::TooBig.code(),
                    "frame too large".into(),
                ))
                .await;
            return None;
        }
        Ok(Some(Inbound::Violation(code, reason))) => {
            let _ = writer
                .send(OutFrame::Close(code.code(), reason.into()))
                .await;
            return None;
        }
        Ok(Some(Inbound::Closed)) | Ok(None) => return None,
    };
    let result = match codec::decode::<ClientFrame>(codec, &bytes) {
        Ok(ClientFrame::Auth { token }) => match node.accounts.authenticate(&token).await {
            Ok(who) => match node.accounts.token_expires_at(&token) {
                Some(at) => Ok((who, expiry_instant(at))),
                None => Err(ApiError::unauthorized("the token expired")),
            },
            Err(e) => Err(e),
        },
        Ok(other) => Err(ApiError::unauthorized(format!(
            "the first frame must be auth, not {}",
            other.kind()
        ))),
        Err(e) => Err(ApiError::new(ErrorCode::InvalidFrame, e.to_string())),
    };
    match result {
        Ok((who, expires)) => Some((who, codec, expires)),
        Err(e) => {
            tracing::debug!(error = %e, "authentication refused");
            let frame = ServerFrame::error(e.code, e.message, None);
            let _ = writer
                .send(OutFrame::Data(codec::encode_as(codec, &frame)))
                .await;
            let _ = writer
                .send(OutFrame::Close(
                    CloseCode::PolicyViolation.code(),
                    "authentication failed".into(),
                ))
                .await;
            None
        }
    }
}

/// The instant of this process's clock at Unix time `unix_ms`.
fn expiry_instant(unix_ms: u64) -> tokio::time::Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    // At most a year ahead (a far deadline that cannot overflow the clock).
    let left = unix_ms.saturating_sub(now_ms).min(365 * 86_400_000);
    tokio::time::Instant::now() + Duration::from_millis(left)
}

struct Session {
    node: Arc<Node>,
    who: Identity,
    conn_id: u64,
    kick: CancellationToken,
    /// The user's rate limits on this node, shared with their other connections.
    limit: UserLimit,
    /// When the token this session authenticated with expires: the session ends then.
    expires_at: tokio::time::Instant,
    out: mpsc::Sender<Outbound>,
    /// Where the connection is in its inbox, and when it next catches up.
    catch_up: CatchUp,
    /// The largest message id the client said it has seen (`seen` frames): its next
    /// messages must sort after it.
    seen: Option<MessageId>,
    /// WebSocket or QUIC: a `draining` frame names another node's address for the same.
    transport: Transport,
}

impl Session {
    async fn read_loop<R>(mut self, mut reader: R, kick: &CancellationToken, asked: &Notify)
    where
        R: Stream<Item = Inbound> + Unpin,
    {
        let timeout = self.node.cfg.heartbeat_timeout;
        let mut deadline = tokio::time::Instant::now() + timeout;
        let mut inflight: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
        let far = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
        let node = self.node.clone();
        let drain = &node.drain;
        let mut told_draining = false;
        // Set when the session ends with a close of its own, sent after its in-flight sends.
        let mut close_after: Option<Outbound> = None;
        loop {
            let catch_up_at = self.catch_up.due();
            tokio::select! {
                _ = kick.cancelled() => break,
                _ = drain.started().cancelled(), if !told_draining => {
                    told_draining = true;
                    let reconnect_to = drain.pick(self.transport);
                    tracing::debug!(?reconnect_to, "node draining: telling the device to move");
                    self.emit(Outbound::Frame(Box::new(ServerFrame::Draining { reconnect_to }))).await;
                }
                _ = drain.closing().cancelled() => {
                    tracing::info!("drain timeout: closing the session");
                    drain.session_closed();
                    close_after = Some(Outbound::close(CloseCode::GoingAway.code(), "going away"));
                    break;
                }
                _ = tokio::time::sleep_until(catch_up_at.unwrap_or(far)), if catch_up_at.is_some() => {
                    Box::pin(self.run_catch_up()).await;
                }
                _ = asked.notified() => self.catch_up.ask(),
                _ = tokio::time::sleep_until(self.expires_at) => {
                    tracing::info!("token expired; closing the session");
                    metrics::counter!("gateway_token_expired_total").increment(1);
                    self.emit(Outbound::close(CloseCode::PolicyViolation.code(), "token expired")).await;
                    break;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::info!("no heartbeat within {timeout:?}; dropping the device");
                    self.emit(Outbound::close(CloseCode::GoingAway.code(), "heartbeat timeout")).await;
                    break;
                }
                Some(()) = inflight.next(), if !inflight.is_empty() => {}
                item = reader.next(), if inflight.len() < MAX_INFLIGHT_SENDS => {
                    match item {
                        None | Some(Inbound::Closed) => {
                            if told_draining {
                                tracing::debug!("the device left the draining node");
                                drain.session_moved();
                            }
                            break;
                        }
                        Some(Inbound::TooLarge) => {
                            self.emit(Outbound::close(CloseCode::TooBig.code(), "frame too large")).await;
                            break;
                        }
                        Some(Inbound::Violation(code, reason)) => {
                            tracing::debug!(reason, "transport protocol violation");
                            self.emit(Outbound::close(code.code(), reason)).await;
                            break;
                        }
                        Some(Inbound::Data(codec, bytes)) => {
                            deadline = tokio::time::Instant::now() + timeout;
                            match codec::decode::<ClientFrame>(codec, &bytes) {
                                Ok(frame) => {
                                    if let Some(fut) = Box::pin(self.handle(frame)).await {
                                        inflight.push(fut);
                                    }
                                }
                                Err(e) => {
                                    let code = match e {
                                        DecodeError::TooLarge(_) => {
                                            self.emit(Outbound::close(CloseCode::TooBig.code(), "frame too large")).await;
                                            break;
                                        }
                                        _ => ErrorCode::InvalidFrame,
                                    };
                                    self.error(ApiError::new(code, e.to_string()), None).await;
                                }
                            }
                        }
                    }
                }
            }
        }
        // Sends already accepted finish (and are acked if the socket still takes it).
        while inflight.next().await.is_some() {}
        if let Some(close) = close_after {
            // Behind the acks of those sends in the queue.
            self.emit(close).await;
        }
    }

    async fn emit(&self, out: Outbound) {
        let _ = self.out.send(out).await; // fails only when the writer has gone
    }

    /// Refuses a request over the user's rate limit, saying when to retry.
    async fn rate_limited(&self, what: &str, wait: Duration, reference: Option<String>) {
        metrics::counter!("gateway_rate_limited_total").increment(1);
        let ms = (wait.as_millis() as u64).max(1);
        let frame =
            ServerFrame::rate_limited(format!("too many {what}; retry in {ms} ms"), reference, ms);
        self.emit(Outbound::Frame(Box::new(frame))).await;
    }

    async fn error(&self, e: ApiError, reference: Option<String>) {
        self.emit(Outbound::Frame(Box::new(ServerFrame::error(
            e.code, e.message, reference,
        ))))
        .await;
    }

    /// Handles one frame. A `send` becomes a future that runs alongside further frames.
    async fn handle(&mut self, frame: ClientFrame) -> Option<BoxFuture<'static, ()>> {
        match frame {
            ClientFrame::Send { id, to, body } => {
                if let Err(e) = crate::domain::chat::validate_send(&id, &body) {
                    send_refused(e.code.as_str());
                    self.error(e, Some(id)).await;
                    return None;
                }
                if let Err(wait) = self.limit.try_send(Instant::now()) {
                    send_refused("rate_limited");
                    self.rate_limited("sends", wait, Some(id)).await;
                    return None;
                }
                let node = self.node.clone();
                let out = self.out.clone();
                let (who, conn, seen) = (self.who, self.conn_id, self.seen);
                let span = tracing::debug_span!("send", client_id = %id);
                Some(Box::pin(
                    async move {
                        let frame = match node
                            .chat
                            .send(who, Some(conn), id.clone(), to, body, seen)
                            .await
                        {
                            Ok(m) => ServerFrame::Ack {
                                reference: id,
                                message_id: m.message_id,
                                conversation: m.conversation,
                                ts: m.ts,
                            },
                            Err(e) => {
                                send_refused(e.code.as_str());
                                ServerFrame::error(e.code, e.message, Some(id))
                            }
                        };
                        let _ = out.send(Outbound::Frame(Box::new(frame))).await;
                    }
                    .instrument(span),
                ))
            }
            ClientFrame::Sync { after, limit } => {
                if let Err(wait) = self.limit.try_read(Instant::now()) {
                    self.rate_limited("sync and history requests", wait, None)
                        .await;
                    return None;
                }
                Box::pin(self.sync(after, limit)).await;
                None
            }
            ClientFrame::Seen { message_id } => {
                self.node.chat.observe_seen(message_id);
                self.seen = self.seen.max(Some(message_id));
                None
            }
            ClientFrame::History {
                conversation,
                before,
                limit,
            } => {
                if let Err(wait) = self.limit.try_read(Instant::now()) {
                    self.rate_limited("sync and history requests", wait, None)
                        .await;
                    return None;
                }
                let frame = match self
                    .node
                    .chat
                    .history(self.who.user, conversation, before, limit)
                    .await
                {
                    Ok(page) => {
                        self.limit
                            .charge_read_bytes(reply_bytes(&page.messages), Instant::now());
                        ServerFrame::History {
                            conversation,
                            messages: page.messages,
                            next_before: page.next_before,
                        }
                    }
                    Err(e) => ServerFrame::error(e.code, e.message, None),
                };
                self.emit(Outbound::Frame(Box::new(frame))).await;
                None
            }
            ClientFrame::Heartbeat => None,
            ClientFrame::Auth { .. } => {
                self.error(
                    ApiError::new(ErrorCode::InvalidFrame, "already authenticated"),
                    None,
                )
                .await;
                None
            }
            ClientFrame::SubscribePresence { users } => {
                if users.len() > MAX_SUBSCRIBE_USERS {
                    let msg = format!("at most {MAX_SUBSCRIBE_USERS} users per subscribe_presence");
                    self.error(ApiError::bad_request(msg), None).await;
                    return None;
                }
                // Presence is for friends and group co-members only: the others are not
                // watched, and one `forbidden` error says so.
                let (users, hidden) =
                    match Box::pin(self.node.friends.visible(self.who.user, &users)).await {
                        Ok(split) => split,
                        Err(e) => {
                            self.error(e, None).await;
                            return None;
                        }
                    };
                if !self
                    .node
                    .presence
                    .watch(self.conn_id, &self.out, &self.kick, &users)
                {
                    let msg = format!(
                        "a connection may watch at most {MAX_WATCHED_PER_CONNECTION} users"
                    );
                    self.error(ApiError::bad_request(msg), None).await;
                } else if let Some(first) = hidden.first() {
                    let msg = format!(
                        "not watching {} of these users (the first: {first}): presence is \
                         visible only to friends and fellow group members",
                        hidden.len()
                    );
                    self.error(ApiError::forbidden(msg), None).await;
                }
                None
            }
            ClientFrame::UnsubscribePresence { users } => {
                if users.len() > MAX_SUBSCRIBE_USERS {
                    let msg =
                        format!("at most {MAX_SUBSCRIBE_USERS} users per unsubscribe_presence");
                    self.error(ApiError::bad_request(msg), None).await;
                } else {
                    self.node.presence.unwatch(self.conn_id, &users);
                }
                None
            }
        }
    }
}

/// Roughly what `messages` take in a reply, for the user's read-bytes allowance.
pub(crate) fn reply_bytes(messages: &[client_proto::Message]) -> usize {
    messages
        .iter()
        .map(|m| m.body.len() + m.client_id.len() + 100)
        .sum()
}

/// Counts a refused send, by the error code the client got (`chat_sends_refused_total`).
fn send_refused(reason: &'static str) {
    metrics::counter!("chat_sends_refused_total", "reason" => reason).increment(1);
}
