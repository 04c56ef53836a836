//! Chat logic: sending, syncing and reading history. It validates, decides who a message is
//! for, and calls the store and the delivery port; it never touches sled, sockets or peers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_proto::ids::{ConversationId, GroupId, MessageId, Position, UserId};
use client_proto::limits::{
    DEFAULT_HISTORY_LIMIT, FRAME_PAYLOAD_BUDGET, MAX_BODY_BYTES, MAX_CLIENT_ID_BYTES,
    MAX_HISTORY_LIMIT, MAX_SYNC_LIMIT,
};
use client_proto::{ErrorCode, Message, Recipient};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::domain::auth::Identity;
use crate::domain::delivery::Delivery;
use crate::domain::error::ApiError;
use crate::domain::presence::Presence;
use crate::domain::privacy::{self, Action};
use crate::domain::push::Push;
use crate::ids::{now_unix_ms, ClockSkew, IdGen};
use crate::store::records::Audience;
use crate::store::{HistoryPage, SendOutcome, Store, SyncPage};

/// The chat service.
pub struct Chat {
    store: Store,
    ids: Arc<IdGen>,
    delivery: Delivery,
    presence: Arc<Presence>,
    push: Arc<Push>,
    /// Recent recipients' `messages` settings (see [`Chat::messages_setting`]). A std-like
    /// mutex is fine: it is held for a map lookup or insert, never across an await.
    recipient_settings: parking_lot::Mutex<HashMap<UserId, (Audience, Instant)>>,
    /// Slots for sends being stored at once (see [`Chat::admit`]).
    admission: Semaphore,
}

/// How many recipients' settings [`Chat::messages_setting`] remembers before it starts over.
const KNOWN_USERS: usize = 100_000;
/// How long a recipient's `messages` setting is used before it is read again: a change of
/// the setting takes effect within this time on every node.
const SETTING_TTL: Duration = Duration::from_secs(5);

/// Who a new message is for (see [`Chat::recipients`]).
struct Recipients {
    conversation: ConversationId,
    to_user: Option<UserId>,
    group: Option<GroupId>,
    /// The sender's and every recipient's inbox.
    inboxes: Vec<UserId>,
}

/// The cursor to hand out after a page of a sync (or a catch-up) that read positions after
/// `after`, whose last message is at `last`, read under replicas' smallest seal `seal`
/// (`SyncPage`), `done` when nothing was left after the page.
///
/// A cursor is *closed*: every message acknowledged at a position at or below it has been
/// sent. That holds for the seal (see `cluster::replication::seal`) when the page read to
/// the end, and for `min(last, seal)` when it stopped early. A cursor never goes back
/// (`after` is closed too); with no seal nothing new is known closed, so it stays at `after`.
pub fn cursor_after(
    after: Option<Position>,
    last: Option<Position>,
    seal: Option<Position>,
    done: bool,
) -> Option<Position> {
    let closed = match (seal, last, done) {
        (None, _, _) => None,
        (Some(seal), _, true) | (Some(seal), None, false) => Some(seal),
        (Some(seal), Some(last), false) => Some(seal.min(last)),
    };
    match (after, closed) {
        (Some(a), Some(c)) => Some(a.max(c)),
        (a, c) => a.or(c),
    }
}

/// Checks a `send` before any work is done.
pub fn validate_send(client_id: &str, body: &str) -> Result<(), ApiError> {
    if client_id.is_empty() || client_id.len() > MAX_CLIENT_ID_BYTES {
        return Err(ApiError::bad_request(format!(
            "the client message id must be 1 to {MAX_CLIENT_ID_BYTES} bytes"
        )));
    }
    if body.is_empty() {
        return Err(ApiError::bad_request("the message body is empty"));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(ApiError::new(
            ErrorCode::MessageTooLarge,
            format!(
                "body is {} bytes; the limit is {MAX_BODY_BYTES}",
                body.len()
            ),
        ));
    }
    Ok(())
}

impl Chat {
    pub fn new(
        store: Store,
        ids: Arc<IdGen>,
        delivery: Delivery,
        presence: Arc<Presence>,
        push: Arc<Push>,
        max_concurrent_sends: usize,
    ) -> Self {
        Chat {
            store,
            ids,
            delivery,
            presence,
            push,
            recipient_settings: parking_lot::Mutex::new(HashMap::new()),
            admission: Semaphore::new(max_concurrent_sends.clamp(1, Semaphore::MAX_PERMITS)),
        }
    }

    /// Waits for one of the node's send slots (`--max-concurrent-sends`). Past that many
    /// sends being stored at once, a send waits here, in arrival order, before it does any
    /// work: its ack is later, and its connection stops reading sends at its own window
    /// (back pressure to the client). Without the bound, an overloaded cluster queues the
    /// sends inside replication, where their reads and writes time out and the sends fail
    /// with `unavailable`.
    async fn admit(&self) -> Option<SemaphorePermit<'_>> {
        if let Ok(slot) = self.admission.try_acquire() {
            return Some(slot);
        }
        /// Counts the send in `chat_sends_waiting` while it waits, also if it is dropped.
        struct Waiting;
        impl Drop for Waiting {
            fn drop(&mut self) {
                metrics::gauge!("chat_sends_waiting").decrement(1.0);
            }
        }
        metrics::gauge!("chat_sends_waiting").increment(1.0);
        let waiting = Waiting;
        let since = Instant::now();
        // `acquire` fails only on a closed semaphore; this one is never closed.
        let slot = self.admission.acquire().await.ok();
        drop(waiting);
        metrics::histogram!("chat_send_admission_wait_seconds")
            .record(since.elapsed().as_secs_f64());
        slot
    }

    /// Stores a message durably and delivers it to the recipients' connected devices and the
    /// sender's other devices (never `sender_conn`). Returns the stored message for the ack;
    /// a retried client id returns the first message and stores nothing new. `seen` is the
    /// largest message id the sending client has seen: a new message gets a larger id, or the
    /// send is refused (`unavailable`) rather than stored out of causal order.
    pub async fn send(
        &self,
        sender: Identity,
        sender_conn: Option<u64>,
        client_id: String,
        to: Recipient,
        body: String,
        seen: Option<MessageId>,
    ) -> Result<Message, ApiError> {
        validate_send(&client_id, &body)?;
        let started = Instant::now();
        let _slot = self.admit().await;
        // A retry is caught by the idempotency claim in `store_message`; only a refused send
        // looks for an earlier attempt first, so that a retry of a send stored before the
        // sender lost the right to send it (left the group) still gets its first ack.
        let Recipients {
            conversation,
            to_user,
            group,
            inboxes,
        } = match self.recipients(sender.user, to).await {
            Ok(r) => r,
            Err(refused) => {
                return match self.store.sent_before(sender.user, &client_id).await? {
                    Some(first) => self.complete(first, sender_conn).await,
                    None => Err(refused),
                }
            }
        };
        let message_id = self.ids.next()?;
        if let Some(seen) = seen.filter(|s| message_id <= *s) {
            metrics::counter!("chat_causal_refusals_total").increment(1);
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "this node's clock is behind a message you have seen ({seen}); it cannot \
                     order your message after it yet: retry, or use another node"
                ),
            ));
        }
        let msg = Message {
            message_id,
            conversation,
            from: sender.user,
            to: to_user,
            group,
            body,
            ts: now_unix_ms(),
            client_id,
        };
        // Recipients with no device connected anywhere get a push notification, queued
        // durably with the message.
        let others: Vec<UserId> = inboxes.iter().copied().filter(|u| *u != msg.from).collect();
        let offline = self.presence.offline_among(&others).await;
        let jobs = self.push.jobs_for(&msg, &offline).await?;
        let outcome = self.store.store_message(msg, &inboxes, &jobs).await?;
        let m = match outcome {
            SendOutcome::New(m) => m,
            SendOutcome::Duplicate(first) => return self.complete(first, sender_conn).await,
        };
        if !jobs.is_empty() {
            self.push.wake();
        }
        metrics::histogram!("chat_ack_latency_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("chat_messages_total").increment(1);
        self.delivery.deliver(&inboxes, &m, sender_conn);
        Ok(m)
    }

    /// Who a new message from `sender` to `to` is for: its conversation, its direct
    /// recipient or group, and the inboxes it goes to (the sender's and every recipient's;
    /// for a group, every current member's). Refuses unknown recipients, recipients whose
    /// `messages` setting excludes the sender, and non-members.
    async fn recipients(&self, sender: UserId, to: Recipient) -> Result<Recipients, ApiError> {
        match to {
            Recipient::User(u) => {
                let Some(setting) = self.messages_setting(u).await? else {
                    return Err(ApiError::not_found(format!("no user {u}")));
                };
                privacy::check(&self.store, setting, Action::Message, u, sender).await?;
                let inboxes = if u == sender {
                    vec![u]
                } else {
                    vec![sender, u]
                };
                Ok(Recipients {
                    conversation: ConversationId::direct(sender, u),
                    to_user: Some(u),
                    group: None,
                    inboxes,
                })
            }
            Recipient::Group(g) => {
                let rec = self
                    .store
                    .group(g)
                    .await?
                    .ok_or_else(|| ApiError::not_found(format!("no group {g}")))?;
                if rec.member(sender).is_none() {
                    return Err(ApiError::forbidden("only members may send to a group"));
                }
                Ok(Recipients {
                    conversation: ConversationId::Group(g),
                    to_user: None,
                    group: Some(g),
                    inboxes: rec.member_ids(),
                })
            }
        }
    }

    /// User `u`'s `messages` setting, `None` if there is no such user. Read at most every
    /// [`SETTING_TTL`] per recipient (up to [`KNOWN_USERS`] of them), so that sends to one
    /// user do not all read the user's record.
    async fn messages_setting(&self, u: UserId) -> Result<Option<Audience>, ApiError> {
        if let Some((setting, at)) = self.recipient_settings.lock().get(&u) {
            if at.elapsed() < SETTING_TTL {
                return Ok(Some(*setting));
            }
        }
        let Some(rec) = self.store.user(u).await? else {
            return Ok(None);
        };
        let setting = rec.privacy.messages;
        let mut known = self.recipient_settings.lock();
        if known.len() >= KNOWN_USERS {
            known.clear();
        }
        known.insert(u, (setting, Instant::now()));
        Ok(Some(setting))
    }

    /// `u` changed their privacy settings: this node reads them again at the next send to
    /// them (other nodes within [`SETTING_TTL`]).
    pub fn settings_changed(&self, u: UserId) {
        self.recipient_settings.lock().remove(&u);
    }

    /// Acks a send whose client id was claimed before, like a new send: writes the first
    /// message's inbox entries again at a new position (the first attempt may have died
    /// halfway, or stored them at a position that cursors handed out since have passed) and
    /// delivers it to the connected devices. No second message is made: the ack carries the
    /// first message's id, and devices that had it drop the repeat by id.
    async fn complete(
        &self,
        first: Message,
        sender_conn: Option<u64>,
    ) -> Result<Message, ApiError> {
        let inboxes = self.inboxes_of(&first).await?;
        self.store.complete_message(&first, &inboxes).await?;
        metrics::counter!("chat_completed_retries_total").increment(1);
        self.delivery.deliver(&inboxes, &first, sender_conn);
        Ok(first)
    }

    /// Whose inboxes an already stored message goes to (to complete a retried send): the
    /// sender's and the recipient's, or every current member's for a group.
    async fn inboxes_of(&self, msg: &Message) -> Result<Vec<UserId>, ApiError> {
        let mut users = vec![msg.from];
        if let Some(to) = msg.to {
            if to != msg.from {
                users.push(to);
            }
        }
        if let Some(g) = msg.group {
            if let Some(rec) = self.store.group(g).await? {
                users.extend(
                    rec.members
                        .iter()
                        .map(|m| m.user)
                        .filter(|u| *u != msg.from),
                );
            }
        }
        Ok(users)
    }

    /// The node's clock now, as an inbox position (where a connection's own coverage of
    /// its inbox starts).
    pub fn clock_now(&self) -> Position {
        Position(self.ids.hlc().peek())
    }

    /// `Err` while this node's clock is too far from its peers' to issue ids.
    pub fn clock_check(&self) -> Result<(), ClockSkew> {
        self.ids.check()
    }

    /// A client has seen message `id`: what it sends next must get a larger id, even on a
    /// node whose clock is a little behind the one that issued `id` (the clock follows at
    /// most `--max-clock-skew-ms` past its own).
    pub fn observe_seen(&self, id: MessageId) {
        self.ids.hlc().observe(id.0);
    }

    /// One batch of `user`'s inbox after position `after` (all of it when `None`).
    pub async fn sync_page(
        &self,
        user: UserId,
        after: Option<Position>,
        limit: Option<u32>,
    ) -> Result<SyncPage, ApiError> {
        let limit = limit.unwrap_or(MAX_SYNC_LIMIT).clamp(1, MAX_SYNC_LIMIT) as usize;
        Ok(self
            .store
            .inbox_page(user, after, limit, FRAME_PAYLOAD_BUDGET)
            .await?)
    }

    /// A page of a conversation's history, newest first; only for participants.
    pub async fn history(
        &self,
        who: UserId,
        conversation: ConversationId,
        before: Option<MessageId>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, ApiError> {
        let limit = match limit {
            None => DEFAULT_HISTORY_LIMIT,
            Some(l) if (1..=MAX_HISTORY_LIMIT).contains(&l) => l,
            Some(l) => {
                return Err(ApiError::bad_request(format!(
                    "limit is {l}; it must be 1 to {MAX_HISTORY_LIMIT}"
                )))
            }
        };
        let forbidden = || ApiError::forbidden("only participants may read a conversation");
        // Members read a group's history from when they joined.
        let after = match conversation {
            ConversationId::Direct { .. } if conversation.is_direct_participant(who) => {
                MessageId(0)
            }
            ConversationId::Direct { .. } => return Err(forbidden()),
            ConversationId::Group(g) => {
                let rec = self.store.group(g).await?.ok_or_else(forbidden)?;
                rec.member(who).ok_or_else(forbidden)?.joined_at
            }
        };
        Ok(self
            .store
            .history_page(
                &conversation,
                after,
                before,
                limit as usize,
                FRAME_PAYLOAD_BUDGET,
            )
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(n: u64) -> Option<Position> {
        Some(Position(n))
    }

    #[test]
    fn a_cursor_is_closed_and_never_goes_back() {
        // A sync read to the end: the seal closes everything up to it, even past the last
        // message (nothing acked at or below it is missing).
        assert_eq!(cursor_after(None, p(40), p(50), true), p(50));
        // ... and messages above the seal are sent but not covered: the next sync sends them
        // again (the client drops them by id).
        assert_eq!(cursor_after(None, p(70), p(50), true), p(50));
        // A page that stopped early is closed only up to its last message.
        assert_eq!(cursor_after(None, p(40), p(50), false), p(40));
        assert_eq!(cursor_after(None, p(60), p(50), false), p(50));
        // Never below where the client already was.
        assert_eq!(cursor_after(p(80), p(90), p(50), true), p(80));
        assert_eq!(cursor_after(p(80), None, p(50), true), p(80));
        // No seal (not a sealed read): nothing new is closed.
        assert_eq!(cursor_after(p(80), p(90), None, true), p(80));
        assert_eq!(cursor_after(None, p(90), None, true), None);
        // An empty inbox read to the end: the seal.
        assert_eq!(cursor_after(None, None, p(50), true), p(50));
    }
}
