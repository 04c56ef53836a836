//! The writing half of a session: drains the connection's outbound queue into the
//! transport, and drops a `message` frame the connection was already sent lately
//! ([`SentIds`]): a catch-up re-reads the last seal window of the inbox, and a forward from
//! another node can arrive after a catch-up or a sync sent the same message.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use client_proto::codec::{self, CloseCode, Codec};
use client_proto::{MessageId, ServerFrame};
use futures_util::{Sink, SinkExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::OutFrame;
use crate::domain::hub::{CatchUpPage, Outbound};

/// How long a sent message id is remembered: a catch-up reads from the last closed cursor,
/// which trails the newest positions by the seal window and is at most one periodic
/// catch-up old; this covers both with room to spare.
const REMEMBER_FOR: Duration = Duration::from_secs(150);
/// Ids remembered per connection at most; the oldest go first (clients dedup by message id
/// anyway: this only saves them the duplicates). Nothing is allocated until a message is
/// sent, so an idle connection pays nothing.
const MAX_REMEMBERED: usize = 4096;

/// The message ids a connection was sent lately (live, in sync batches and catch-ups, or
/// acked as its own).
#[derive(Default)]
pub(super) struct SentIds {
    ids: HashSet<MessageId>,
    order: VecDeque<(Instant, MessageId)>,
}

impl SentIds {
    /// Records what `frame` sends; false when it is a `message` this connection was already
    /// sent lately (the frame is then dropped). Sync batches always go.
    pub(super) fn pass(&mut self, frame: &ServerFrame) -> bool {
        let now = Instant::now();
        self.forget_before(now);
        match frame {
            ServerFrame::Message { message } => self.remember(now, message.message_id),
            ServerFrame::SyncBatch { messages, .. } => {
                for m in messages {
                    self.remember(now, m.message_id);
                }
                true
            }
            ServerFrame::Ack { message_id, .. } => {
                self.remember(now, *message_id);
                true
            }
            _ => true,
        }
    }

    /// Remembers `id`; false when it was remembered already.
    fn remember(&mut self, now: Instant, id: MessageId) -> bool {
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back((now, id));
        if self.order.len() > MAX_REMEMBERED {
            if let Some((_, old)) = self.order.pop_front() {
                self.ids.remove(&old);
            }
        }
        true
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some((at, id)) = self.order.front() {
            if now.duration_since(*at) < REMEMBER_FOR {
                break;
            }
            self.ids.remove(id);
            self.order.pop_front();
        }
        if self.order.is_empty() && self.ids.capacity() > 64 {
            // A burst is over: give its memory back.
            self.ids = HashSet::new();
            self.order = VecDeque::new();
        }
    }
}

/// Frames written before a flush at most, when more are queued (a flush is one `send` to
/// the socket; a burst of acks and messages then costs one system call per batch, not per
/// frame). The WebSocket layer also flushes by itself once its 4 KiB buffer is full.
const MAX_UNFLUSHED: usize = 32;

/// What to do with one item of the outbound queue.
enum Step {
    Write(codec::Encoded),
    /// The frames of a catch-up page this connection was not sent lately (maybe none).
    WriteAll(Vec<codec::Encoded>),
    /// A message this connection was sent lately.
    Skip,
    Close(u16, String),
}

fn step(item: Outbound, sent: &mut SentIds, codec: Codec) -> Step {
    let data = match item {
        Outbound::Frame(f) => {
            if !sent.pass(&f) {
                dropped(1);
                return Step::Skip;
            }
            codec::encode_as(codec, &f)
        }
        Outbound::Shared(shared) => {
            if !sent.pass(shared.frame()) {
                dropped(1);
                return Step::Skip;
            }
            shared.encoded(codec).clone()
        }
        Outbound::CatchUp(page) => {
            // `taken` is dropped here, with the page's messages encoded.
            let CatchUpPage { messages, taken: _ } = *page;
            let total = messages.len();
            let frames: Vec<_> = messages
                .into_iter()
                .map(|m| ServerFrame::Message {
                    message: std::sync::Arc::new(m),
                })
                .filter(|f| sent.pass(f))
                .map(|f| codec::encode_as(codec, &f))
                .collect();
            dropped(total - frames.len());
            return Step::WriteAll(frames);
        }
        Outbound::Close(close) => {
            let (code, reason) = *close;
            return Step::Close(code, reason);
        }
    };
    Step::Write(data)
}

fn dropped(n: usize) {
    if n > 0 {
        metrics::counter!("gateway_duplicates_dropped_total").increment(n as u64);
    }
}

/// Drains the outbound queue into the transport until the session is kicked, or the reader
/// is done and what was queued has been written. Frames already queued are written together
/// and flushed once (at most [`MAX_UNFLUSHED`]); a lone frame is flushed at once.
pub(super) async fn write_loop<W>(
    mut rx: mpsc::Receiver<Outbound>,
    mut writer: W,
    codec: Codec,
    kick: CancellationToken,
    reader_done: CancellationToken,
) where
    W: Sink<OutFrame> + Unpin,
{
    let mut sent = SentIds::default();
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
        let Some(mut item) = next else { return };
        let mut unflushed = 0;
        loop {
            match step(item, &mut sent, codec) {
                Step::Skip => {}
                Step::Close(code, reason) => {
                    let _ = writer.send(OutFrame::Close(code, reason)).await;
                    kick.cancel();
                    return;
                }
                Step::Write(data) => {
                    if !feed(&mut writer, data, &kick).await {
                        return;
                    }
                    unflushed += 1;
                }
                Step::WriteAll(frames) => {
                    for data in frames {
                        if !feed(&mut writer, data, &kick).await {
                            return;
                        }
                        unflushed += 1;
                    }
                }
            }
            if unflushed >= MAX_UNFLUSHED {
                break;
            }
            match rx.try_recv() {
                Ok(more) => item = more,
                Err(_) => break,
            }
        }
        if unflushed > 0 {
            tokio::select! {
                flushed = writer.flush() => if flushed.is_err() {
                    kick.cancel();
                    return;
                },
                _ = kick.cancelled() => return,
            }
        }
    }
}

/// Writes one frame without flushing; false when the session is over. A reader that stopped
/// reading blocks the write: a kick must still end the session (it used to stay registered,
/// and every delivery to it logged a warning).
async fn feed<W>(writer: &mut W, data: codec::Encoded, kick: &CancellationToken) -> bool
where
    W: Sink<OutFrame> + Unpin,
{
    tokio::select! {
        fed = writer.feed(OutFrame::Data(data)) => if fed.is_err() {
            kick.cancel();
            false
        } else {
            true
        },
        _ = kick.cancelled() => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

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

    /// The message ids of the `message` frames written, in order.
    fn written_ids(frames: &[OutFrame]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| match f {
                OutFrame::Data(codec::Encoded::Text(t)) => Some(t),
                _ => None,
            })
            .filter_map(|t| match codec::decode(Codec::Json, t.as_bytes()) {
                Ok(ServerFrame::Message { message }) => Some(message.message_id.0),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_catch_up_page_takes_one_slot_and_only_its_new_messages_are_written() {
        // A queue of 4 slots takes a catch-up page of 300 messages and three live deliveries:
        // the page's messages no longer each take a slot, which filled the queue and got the
        // device disconnected as a slow consumer while live deliveries kept coming.
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(Outbound::Frame(Box::new(live(5))))
            .expect("slot");
        let (taken, page_taken) = tokio::sync::oneshot::channel();
        let page = CatchUpPage {
            messages: (1..=300).map(message).collect(),
            taken,
        };
        tx.try_send(Outbound::CatchUp(Box::new(page)))
            .expect("slot");
        tx.try_send(Outbound::Frame(Box::new(live(7))))
            .expect("slot");
        tx.try_send(Outbound::Frame(Box::new(live(301))))
            .expect("slot");
        drop(tx);
        let mut frames: Vec<OutFrame> = Vec::new();
        let done = CancellationToken::new();
        done.cancel();
        write_loop(rx, &mut frames, Codec::Json, CancellationToken::new(), done).await;
        // The catch-up that queued the page learns it was taken (and reads its next page).
        assert!(page_taken.await.is_err(), "the sender is dropped, not used");
        // Live 5 first; the page without 5 (sent live); 7 was in the page, so only 301 after.
        let mut want = vec![5];
        want.extend((1..=300).filter(|i| *i != 5));
        want.push(301);
        assert_eq!(written_ids(&frames), want);
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_reaches_a_connection_once_while_it_is_remembered() {
        let mut sent = SentIds::default();
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
        // Long after, ids are forgotten and their memory given back.
        tokio::time::advance(REMEMBER_FOR + Duration::from_secs(1)).await;
        assert!(sent.pass(&live(1)) && !sent.pass(&live(1)));
        for i in 10..(10 + MAX_REMEMBERED as u64 + 5) {
            assert!(sent.pass(&live(i)));
        }
        assert!(sent.order.len() <= MAX_REMEMBERED);
        assert!(sent.pass(&live(10)), "the oldest went first");
        tokio::time::advance(REMEMBER_FOR + Duration::from_secs(1)).await;
        assert!(sent.pass(&ServerFrame::Cursor {
            cursor: client_proto::Position(5)
        }));
        assert!(sent.order.is_empty() && sent.ids.capacity() == 0);
    }
}
