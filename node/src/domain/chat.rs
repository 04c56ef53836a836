//! Chat logic: sending, syncing and reading history. It validates, decides who a message is
//! for, and calls the store and the delivery port; it never touches sled, sockets or peers.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client_proto::ids::{ConversationId, GroupId, MessageId, UserId};
use client_proto::limits::{
    DEFAULT_HISTORY_LIMIT, FRAME_PAYLOAD_BUDGET, MAX_BODY_BYTES, MAX_CLIENT_ID_BYTES,
    MAX_HISTORY_LIMIT, MAX_SYNC_LIMIT,
};
use client_proto::{ErrorCode, Message, Recipient};

use crate::domain::auth::Identity;
use crate::domain::delivery::Delivery;
use crate::domain::error::ApiError;
use crate::domain::presence::Presence;
use crate::domain::push::Push;
use crate::ids::{now_unix_ms, IdGen};
use crate::store::{HistoryPage, SendOutcome, Store, SyncPage};

/// The chat service.
pub struct Chat {
    store: Store,
    ids: Arc<IdGen>,
    delivery: Delivery,
    presence: Arc<Presence>,
    push: Arc<Push>,
    sync_overlap: Duration,
    /// Users known to exist (see [`Chat::user_exists`]).
    known_users: parking_lot::Mutex<HashSet<UserId>>,
}

/// How many known users [`Chat::user_exists`] remembers before it starts over.
const KNOWN_USERS: usize = 100_000;

/// Who a new message is for (see [`Chat::recipients`]).
struct Recipients {
    conversation: ConversationId,
    to_user: Option<UserId>,
    group: Option<GroupId>,
    /// The sender's and every recipient's inbox.
    inboxes: Vec<UserId>,
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
        sync_overlap: Duration,
    ) -> Self {
        Chat {
            store,
            ids,
            delivery,
            presence,
            push,
            sync_overlap,
            known_users: parking_lot::Mutex::new(HashSet::new()),
        }
    }

    /// Stores a message durably and delivers it to the recipients' connected devices and the
    /// sender's other devices (never `sender_conn`). Returns the stored message for the ack;
    /// a retried client id returns the first message and stores nothing new.
    pub async fn send(
        &self,
        sender: Identity,
        sender_conn: Option<u64>,
        client_id: String,
        to: Recipient,
        body: String,
    ) -> Result<Message, ApiError> {
        validate_send(&client_id, &body)?;
        let started = Instant::now();
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
                    Some(first) => self.complete(first).await,
                    None => Err(refused),
                }
            }
        };
        let msg = Message {
            message_id: self.ids.next(),
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
        let offline: Vec<UserId> = inboxes
            .iter()
            .copied()
            .filter(|u| *u != msg.from && !self.presence.is_online(*u))
            .collect();
        let jobs = self.push.jobs_for(&msg, &offline).await?;
        let outcome = self.store.store_message(msg, &inboxes, &jobs).await?;
        let m = match outcome {
            SendOutcome::New(m) => m,
            SendOutcome::Duplicate(first) => return self.complete(first).await,
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
    /// for a group, every current member's). Refuses unknown recipients and non-members.
    async fn recipients(&self, sender: UserId, to: Recipient) -> Result<Recipients, ApiError> {
        match to {
            Recipient::User(u) => {
                if !self.user_exists(u).await? {
                    return Err(ApiError::not_found(format!("no user {u}")));
                }
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

    /// Whether user `u` exists. Accounts are never deleted, so a user once read stays known
    /// (up to [`KNOWN_USERS`] ids) and is not read again for every message sent to them.
    async fn user_exists(&self, u: UserId) -> Result<bool, ApiError> {
        if self.known_users.lock().contains(&u) {
            return Ok(true);
        }
        let exists = self.store.user(u).await?.is_some();
        if exists {
            let mut known = self.known_users.lock();
            if known.len() >= KNOWN_USERS {
                known.clear();
            }
            known.insert(u);
        }
        Ok(exists)
    }

    /// Acks a send whose client id was claimed before: makes sure the first message's
    /// records are complete (the first attempt may have died halfway), stores nothing new.
    async fn complete(&self, first: Message) -> Result<Message, ApiError> {
        let inboxes = self.inboxes_of(&first).await?;
        self.store.complete_message(&first, &inboxes).await?;
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

    /// Where a `sync` with cursor `after` starts reading: the overlap before the cursor, so
    /// that a message that got its id just before the cursor but was stored just after the
    /// client saw the cursor is not missed. Clients drop what they already have by id.
    pub fn sync_start(&self, after: Option<MessageId>) -> MessageId {
        match after {
            None => MessageId(0),
            Some(c) => c.minus_ms(self.sync_overlap.as_millis() as u64),
        }
    }

    /// One batch of `user`'s inbox from `from` (inclusive).
    pub async fn sync_page(
        &self,
        user: UserId,
        from: MessageId,
        limit: Option<u32>,
    ) -> Result<SyncPage, ApiError> {
        let limit = limit.unwrap_or(MAX_SYNC_LIMIT).clamp(1, MAX_SYNC_LIMIT) as usize;
        Ok(self
            .store
            .inbox_page(user, from, limit, FRAME_PAYLOAD_BUDGET)
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
