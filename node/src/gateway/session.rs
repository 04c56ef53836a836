//! One device session, whatever the transport: authentication, the frame loop, heartbeat
//! timeout, rate limit, and the writer. WebSocket (and later QUIC) only adapt their socket to
//! a stream of [`Inbound`] and a sink of [`OutFrame`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_proto::codec::{self, CloseCode, Codec, DecodeError};
use client_proto::ids::ID_EPOCH_MS;
use client_proto::limits::{AUTH_TIMEOUT_MS, MAX_SUBSCRIBE_USERS};
use client_proto::{ClientFrame, ErrorCode, MessageId, ServerFrame};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::domain::auth::Identity;
use crate::domain::error::ApiError;
use crate::domain::hub::{Outbound, OUTBOUND_QUEUE};
use crate::domain::presence::MAX_WATCHED_PER_CONNECTION;
use crate::gateway::ratelimit::TokenBucket;
use crate::ids::now_unix_ms;
use crate::node::Node;

/// Sends of one connection being stored at once; past this the session stops reading.
const MAX_INFLIGHT_SENDS: usize = 64;

/// How long after connecting a session in a cluster re-reads its inbox: time for its
/// presence key to reach every node (a few gossip rounds). A message stored by another node
/// before that node learned where this device is was not forwarded here; the catch-up sends
/// it. Without it such a message would wait for the device's next `sync`.
const CATCH_UP_DELAY: Duration = Duration::from_secs(3);

/// How long after the catch-up a connection still drops a live delivery of a message it
/// was already sent: a forward from another node can arrive after the catch-up sent it.
const DEDUP_AFTER_CATCH_UP: Duration = Duration::from_secs(30);
/// Ids remembered per connection at most; past this it stops deduplicating (clients dedup
/// by message id anyway).
const MAX_DEDUP_IDS: usize = 4096;

/// Message ids a connection was sent (live, in sync batches, or acked as its own) during its
/// first moments. The writer drops a `message` frame whose id is already here, so the
/// catch-up and a late live delivery of the same message reach the device once.
#[derive(Clone, Default)]
struct SentIds(Arc<parking_lot::Mutex<Option<Recorded>>>);

/// The ids sent so far, and until when to keep recording them.
type Recorded = (HashSet<MessageId>, tokio::time::Instant);

impl SentIds {
    fn recording() -> Self {
        let until = tokio::time::Instant::now() + CATCH_UP_DELAY + DEDUP_AFTER_CATCH_UP;
        SentIds(Arc::new(parking_lot::Mutex::new(Some((
            HashSet::new(),
            until,
        )))))
    }

    /// Records what `frame` sends; false when it is a message this connection already had.
    fn pass(&self, frame: &ServerFrame) -> bool {
        let mut guard = self.0.lock();
        let Some((set, until)) = guard.as_mut() else {
            return true;
        };
        if tokio::time::Instant::now() > *until || set.len() > MAX_DEDUP_IDS {
            *guard = None;
            return true;
        }
        match frame {
            ServerFrame::Message { message } => set.insert(message.message_id),
            ServerFrame::SyncBatch { messages, .. } => {
                set.extend(messages.iter().map(|m| m.message_id));
                true
            }
            ServerFrame::Ack { message_id, .. } => {
                set.insert(*message_id);
                true
            }
            _ => true,
        }
    }
}

/// What a transport hands the session.
#[derive(Debug)]
pub enum Inbound {
    /// One frame's bytes and the codec they are in.
    Data(Codec, bytes::Bytes),
    /// The peer sent a frame over the protocol's size limit.
    TooLarge,
    /// The peer closed or the transport failed.
    Closed,
}

/// What the session hands the transport.
#[derive(Debug)]
pub enum OutFrame {
    Data(Codec, Vec<u8>),
    /// Close with a WebSocket close code and reason.
    Close(u16, String),
}

/// Runs one connection to its end.
pub async fn run<R, W>(node: Arc<Node>, peer: SocketAddr, mut reader: R, mut writer: W)
where
    R: Stream<Item = Inbound> + Unpin + Send,
    W: Sink<OutFrame> + Unpin + Send,
{
    let span = tracing::info_span!("conn", %peer, user = tracing::field::Empty, device = tracing::field::Empty);
    async move {
        // The rarely taken, deep paths below are boxed: an idle connection's task then holds
        // only the state of the loops it waits in, not the largest of every future it might
        // ever await (the state machine reserves room for that), which is per-connection memory.
        let Some((who, codec)) = Box::pin(authenticate(&node, &mut reader, &mut writer)).await
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
        let sent = SentIds::recording();
        let session = Session {
            node: node.clone(),
            who,
            conn_id,
            kick: kick.clone(),
            bucket: TokenBucket::new(
                node.cfg.rate_limit_per_sec,
                node.cfg.rate_limit_burst,
                Instant::now(),
            ),
            out: tx,
            connected_at: MessageId::from_parts(now_unix_ms().saturating_sub(ID_EPOCH_MS), 0, 0),
        };
        let reader_done = CancellationToken::new();
        let writing = write_loop(rx, writer, codec, kick.clone(), reader_done.clone(), sent);
        let reading = async {
            session.read_loop(reader, &kick).await;
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

/// Waits for the `auth` frame. On failure tells the client why and closes (1008).
async fn authenticate<R, W>(
    node: &Node,
    reader: &mut R,
    writer: &mut W,
) -> Option<(Identity, Codec)>
where
    R: Stream<Item = Inbound> + Unpin,
    W: Sink<OutFrame> + Unpin,
{
    let first = tokio::time::timeout(Duration::from_millis(AUTH_TIMEOUT_MS), reader.next()).await;

    let (codec, bytes) = match first {
        Err(_) => {
            let _ = writer
                .send(OutFrame::Close(
                    CloseCode::PolicyViolation.code(),
                    "authenticate within 10 s".into(),
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
        Ok(Some(Inbound::Closed)) | Ok(None) => return None,
    };
    let result = match codec::decode::<ClientFrame>(codec, &bytes) {
        Ok(ClientFrame::Auth { token }) => node.accounts.authenticate(&token).await,
        Ok(other) => Err(ApiError::unauthorized(format!(
            "the first frame must be auth, not {}",
            other.kind()
        ))),
        Err(e) => Err(ApiError::new(ErrorCode::InvalidFrame, e.to_string())),
    };
    match result {
        Ok(who) => Some((who, codec)),
        Err(e) => {
            tracing::debug!(error = %e, "authentication refused");
            let frame = ServerFrame::error(e.code, e.message, None);
            let _ = writer
                .send(OutFrame::Data(codec, codec::encode(codec, &frame)))
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

/// Drains the outbound queue into the transport until the session is kicked, or the reader
/// is done and what was queued has been written. Each frame is flushed as it is written:
/// feeding what is queued and flushing once was tried and made group deliveries slower
/// (last member p50 +5 ms at 400 msgs/s) without a measurable CPU gain.
async fn write_loop<W>(
    mut rx: mpsc::Receiver<Outbound>,
    mut writer: W,
    codec: Codec,
    kick: CancellationToken,
    reader_done: CancellationToken,
    sent: SentIds,
) where
    W: Sink<OutFrame> + Unpin,
{
    loop {
        let next = tokio::select! {
            biased;
            next = rx.recv() => next,
            _ = reader_done.cancelled() => rx.try_recv().ok(),
            _ = kick.cancelled() => {
                // Shutdown or a kicked slow consumer: say goodbye if the socket still takes it.
                let bye = writer.send(OutFrame::Close(CloseCode::GoingAway.code(), "going away".into()));
                let _ = Box::pin(tokio::time::timeout(Duration::from_secs(1), bye)).await;
                return;
            }
        };
        let data = match next {
            None => return,
            Some(Outbound::Frame(f)) => {
                if !sent.pass(&f) {
                    metrics::counter!("gateway_duplicates_dropped_total").increment(1);
                    continue;
                }
                codec::encode(codec, &f)
            }
            Some(Outbound::Shared(shared)) => {
                if !sent.pass(shared.frame()) {
                    metrics::counter!("gateway_duplicates_dropped_total").increment(1);
                    continue;
                }
                shared.encoded(codec).to_vec()
            }
            Some(Outbound::Close(close)) => {
                let (code, reason) = *close;
                let _ = writer.send(OutFrame::Close(code, reason)).await;
                kick.cancel();
                return;
            }
        };
        if writer.send(OutFrame::Data(codec, data)).await.is_err() {
            kick.cancel();
            return;
        }
    }
}

struct Session {
    node: Arc<Node>,
    who: Identity,
    conn_id: u64,
    kick: CancellationToken,
    bucket: TokenBucket,
    out: mpsc::Sender<Outbound>,
    /// The smallest message id issued when the session started.
    connected_at: MessageId,
}

impl Session {
    async fn read_loop<R>(mut self, mut reader: R, kick: &CancellationToken)
    where
        R: Stream<Item = Inbound> + Unpin,
    {
        let timeout = self.node.cfg.heartbeat_timeout;
        let mut deadline = tokio::time::Instant::now() + timeout;
        let mut inflight: FuturesUnordered<BoxFuture<'static, ()>> = FuturesUnordered::new();
        let catch_up_at = tokio::time::Instant::now() + CATCH_UP_DELAY;
        let mut caught_up = false;
        loop {
            tokio::select! {
                _ = kick.cancelled() => break,
                _ = tokio::time::sleep_until(catch_up_at), if !caught_up => {
                    caught_up = true;
                    Box::pin(self.catch_up()).await;
                }
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::info!("no heartbeat within {timeout:?}; dropping the device");
                    self.emit(Outbound::close(CloseCode::GoingAway.code(), "heartbeat timeout")).await;
                    break;
                }
                Some(()) = inflight.next(), if !inflight.is_empty() => {}
                item = reader.next(), if inflight.len() < MAX_INFLIGHT_SENDS => {
                    match item {
                        None | Some(Inbound::Closed) => break,
                        Some(Inbound::TooLarge) => {
                            self.emit(Outbound::close(CloseCode::TooBig.code(), "frame too large")).await;
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
    }

    async fn emit(&self, out: Outbound) {
        let _ = self.out.send(out).await; // fails only when the writer has gone
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
                    self.error(e, Some(id)).await;
                    return None;
                }
                if !self.bucket.try_take(Instant::now()) {
                    metrics::counter!("gateway_rate_limited_total").increment(1);
                    self.error(
                        ApiError::new(ErrorCode::RateLimited, "too many sends; slow down"),
                        Some(id),
                    )
                    .await;
                    return None;
                }
                let node = self.node.clone();
                let out = self.out.clone();
                let (who, conn) = (self.who, self.conn_id);
                let span = tracing::debug_span!("send", client_id = %id);
                Some(Box::pin(
                    async move {
                        let frame =
                            match node.chat.send(who, Some(conn), id.clone(), to, body).await {
                                Ok(m) => ServerFrame::Ack {
                                    reference: id,
                                    message_id: m.message_id,
                                    conversation: m.conversation,
                                    ts: m.ts,
                                },
                                Err(e) => ServerFrame::error(e.code, e.message, Some(id)),
                            };
                        let _ = out.send(Outbound::Frame(Box::new(frame))).await;
                    }
                    .instrument(span),
                ))
            }
            ClientFrame::Sync { after, limit } => {
                self.sync(after, limit).await;
                None
            }
            ClientFrame::History {
                conversation,
                before,
                limit,
            } => {
                let frame = match self
                    .node
                    .chat
                    .history(self.who.user, conversation, before, limit)
                    .await
                {
                    Ok(page) => ServerFrame::History {
                        conversation,
                        messages: page.messages,
                        next_before: page.next_before,
                    },
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
                } else if !self
                    .node
                    .presence
                    .watch(self.conn_id, &self.out, &self.kick, &users)
                {
                    let msg = format!(
                        "a connection may watch at most {MAX_WATCHED_PER_CONNECTION} users"
                    );
                    self.error(ApiError::bad_request(msg), None).await;
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

    /// Sends what reached this user's inbox since the session started and was not sent to
    /// this connection yet (only in a cluster: on one node every delivery is local).
    async fn catch_up(&self) {
        if self.node.live_members() < 2 {
            return;
        }
        let mut from = self.node.chat.sync_start(Some(self.connected_at));
        loop {
            let page = match self.node.chat.sync_page(self.who.user, from, None).await {
                Ok(p) => p,
                Err(e) => {
                    return tracing::warn!(error = %e, "catch-up read failed; the client's next sync covers it")
                }
            };
            // The writer drops what this connection was already sent (`SentIds`).
            for m in page.messages {
                from = MessageId(m.message_id.0 + 1);
                self.emit(Outbound::Frame(Box::new(ServerFrame::Message {
                    message: Arc::new(m),
                })))
                .await;
            }
            if !page.more {
                return;
            }
        }
    }

    /// Streams the inbox after the cursor (minus the overlap) in batches until done.
    async fn sync(&self, after: Option<client_proto::MessageId>, limit: Option<u32>) {
        let mut from = self.node.chat.sync_start(after);
        let mut cursor = after;
        loop {
            let page = match self.node.chat.sync_page(self.who.user, from, limit).await {
                Ok(p) => p,
                Err(e) => return self.error(e, None).await,
            };
            if let Some(last) = page.messages.last() {
                from = client_proto::MessageId(last.message_id.0 + 1);
                cursor = Some(cursor.map_or(last.message_id, |c| c.max(last.message_id)));
            }
            let done = !page.more;
            self.emit(Outbound::Frame(Box::new(ServerFrame::SyncBatch {
                messages: page.messages,
                cursor,
                done,
                gap: false,
            })))
            .await;
            if done {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use client_proto::ids::{ConversationId, UserId};
    use client_proto::Message;

    use super::*;

    fn message(id: u64) -> Message {
        Message {
            message_id: MessageId(id),
            conversation: ConversationId::direct(UserId(1), UserId(2)),
            from: UserId(1),
            to: Some(UserId(2)),
            group: None,
            body: "hi".into(),
            ts: 0,
            client_id: format!("c{id}"),
        }
    }

    fn live(id: u64) -> ServerFrame {
        ServerFrame::Message {
            message: Arc::new(message(id)),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_reaches_a_connection_once_while_ids_are_recorded() {
        let sent = SentIds::recording();
        assert!(sent.pass(&live(1)));
        assert!(!sent.pass(&live(1)), "a late second delivery is dropped");
        // What a sync batch carried is not delivered again live; the batch itself always goes.
        let batch = ServerFrame::SyncBatch {
            messages: vec![message(2)],
            cursor: None,
            done: true,
            gap: false,
        };
        assert!(sent.pass(&batch) && sent.pass(&batch));
        assert!(!sent.pass(&live(2)));
        // Long after the catch-up, recording stops and everything passes.
        tokio::time::advance(CATCH_UP_DELAY + DEDUP_AFTER_CATCH_UP + Duration::from_secs(1)).await;
        assert!(sent.pass(&live(1)) && sent.pass(&live(1)));
    }
}
