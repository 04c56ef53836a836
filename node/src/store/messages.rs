//! Messages: conversation history, inboxes (the message sync queue) and idempotency records.

use client_proto::ids::{ConversationId, MessageId, Position, UserId};
use client_proto::Message;

use super::records::{decode, encode, InboxEntry, InboxRef, PushJob};
use super::{keys, Store, StoreError, Table, WriteBatch};
use crate::logging::RateLimitedLog;

/// What storing a send did.
#[derive(Debug)]
pub enum SendOutcome {
    /// The message is new and now durable.
    New(Message),
    /// The sender already sent this client id: this is the first message, and nothing was
    /// written for this attempt. Its records may be incomplete (the first attempt may have
    /// died halfway): [`Store::complete_message`] writes them again.
    Duplicate(Message),
}

/// Part of an inbox, in position order.
#[derive(Debug, Default)]
pub struct SyncPage {
    pub messages: Vec<Message>,
    /// The position of the last message returned.
    pub last: Option<Position>,
    /// Whether the inbox holds more after the last message returned.
    pub more: bool,
    /// The smallest seal of the replicas read: every message acknowledged at a position at
    /// or below it is in this page, or after `last` when `more` is set.
    pub seal: Option<Position>,
}

/// Part of a conversation's history, newest first.
#[derive(Debug, Default)]
pub struct HistoryPage {
    pub messages: Vec<Message>,
    /// Where the next (older) page starts, if there is one.
    pub next_before: Option<MessageId>,
}

/// A bound on a message's encoded size in any frame (JSON escaping at its worst), for
/// keeping `sync_batch` and `history` frames under the protocol's frame limit.
fn weight(body_len: usize, client_id: &str) -> usize {
    client_proto::limits::message_weight(body_len, client_id.len())
}

/// Gathers messages up to a count and a byte budget; always takes the first one, so a
/// single message at the body limit still makes a page.
struct Collector {
    messages: Vec<Message>,
    used: usize,
    limit: usize,
    budget: usize,
}

impl Collector {
    fn new(limit: usize, budget: usize) -> Self {
        Collector {
            messages: Vec::new(),
            used: 0,
            limit,
            budget,
        }
    }

    /// Whether a message of this weight fits.
    fn fits(&self, weight: usize) -> bool {
        self.messages.len() < self.limit
            && (self.messages.is_empty() || self.used + weight <= self.budget)
    }

    /// Takes `m`, which [`Collector::fits`] said fits, counting it at `weight`.
    fn take(&mut self, m: Message, weight: usize) {
        self.used += weight;
        self.messages.push(m);
    }

    /// Takes `m` if it fits; false means the page is full (and `m` was not taken).
    fn offer(&mut self, m: Message) -> bool {
        let w = weight(m.body.len(), &m.client_id);
        if !self.fits(w) {
            return false;
        }
        self.take(m, w);
        true
    }
}

impl InboxRef {
    /// The reference to `msg`'s history entry.
    fn to(msg: &Message) -> Self {
        InboxRef {
            header: Message {
                message_id: msg.message_id,
                conversation: msg.conversation,
                from: msg.from,
                to: msg.to,
                group: msg.group,
                body: String::new(),
                ts: msg.ts,
                client_id: msg.client_id.clone(),
            },
            // A body is at most MAX_BODY_BYTES (checked before any work).
            body_len: u32::try_from(msg.body.len()).unwrap_or(u32::MAX),
        }
    }
}

/// Warnings about inbox references to nothing (each sync of the user meets them again).
static DANGLING_LOG: RateLimitedLog = RateLimitedLog::new(10, std::time::Duration::from_secs(60));

/// How many times a message's entries are written at a new position when replicas refuse
/// the position as sealed (the coordinator's clock was behind, or the write was delayed).
const SEAL_RETRIES: usize = 3;

impl Store {
    /// The message an earlier send with this client id stored, if any.
    pub async fn sent_before(
        &self,
        sender: UserId,
        client_id: &str,
    ) -> Result<Option<Message>, StoreError> {
        let key = keys::idempotency(sender, client_id);
        self.get(Table::Idempotency, &keys::user(sender), &key)
            .await?
            .map(|v| decode(&v))
            .transpose()
    }

    /// Stores a new message: the idempotency record (claimed first with a compare-and-swap,
    /// so that two racing sends of one client id store one message), then the conversation's
    /// history entry and an inbox entry for each of `inboxes` (at the position of the
    /// message's id), with `push_jobs` in the push outbox, in one batch. Returns once all of
    /// it is durable. When the client id was claimed before, returns the first message and
    /// writes nothing.
    pub async fn store_message(
        &self,
        msg: Message,
        inboxes: &[UserId],
        push_jobs: &[PushJob],
    ) -> Result<SendOutcome, StoreError> {
        let idem_key = keys::idempotency(msg.from, &msg.client_id);
        let encoded = encode(&msg);
        let claimed = self
            .compare_and_swap(
                Table::Idempotency,
                &keys::user(msg.from),
                &idem_key,
                None,
                Some(encoded.clone()),
            )
            .await?;
        if let Err(current) = claimed {
            let current = current.ok_or(StoreError::Contention)?;
            return Ok(SendOutcome::Duplicate(decode(&current)?));
        }
        let pos = Position(msg.message_id.0);
        self.write_message(&msg, encoded, inboxes, push_jobs, pos)
            .await?;
        Ok(SendOutcome::New(msg))
    }

    /// Writes an already claimed message again: its history entry (the same key and bytes as
    /// its first attempt, so writing it twice is harmless) and its inbox entries at a **new**
    /// position, so that every device that syncs from a cursor handed out meanwhile gets it.
    /// Once that is durable, the entries at the first attempt's position are deleted (best
    /// effort: a sync may otherwise return the message twice, which clients drop by id).
    /// Returns the new position.
    pub async fn complete_message(
        &self,
        msg: &Message,
        inboxes: &[UserId],
    ) -> Result<Position, StoreError> {
        let pos = Position(self.ids().next()?.0);
        let pos = self
            .write_message(msg, encode(msg), inboxes, &[], pos)
            .await?;
        let first = Position(msg.message_id.0);
        if first != pos {
            let mut old = WriteBatch::default();
            for user in inboxes {
                let key = keys::inbox(*user, first);
                old.delete(self, Table::Inbox, &keys::user(*user), key);
            }
            if let Err(e) = self.write(old).await {
                tracing::debug!(error = %e, message = %msg.message_id, "could not delete a completed message's first inbox entries; syncs may return it twice");
            }
        }
        Ok(pos)
    }

    /// Writes a message's history entry, its inbox entries at `pos` and `push_jobs`; when
    /// the inbox replicas refuse `pos` as sealed, writes them again at a new position.
    /// Returns the position written, once durable.
    async fn write_message(
        &self,
        msg: &Message,
        encoded: Vec<u8>,
        inboxes: &[UserId],
        push_jobs: &[PushJob],
        mut pos: Position,
    ) -> Result<Position, StoreError> {
        let mut attempt = 0;
        loop {
            let mut batch = self.message_batch(msg, encoded.clone(), inboxes, pos);
            for job in push_jobs {
                self.queue_push(&mut batch, job, job.ts);
            }
            match self.write(batch).await {
                Ok(()) => return Ok(pos),
                Err(StoreError::Quorum(e)) if e.any_sealed() && attempt < SEAL_RETRIES => {
                    attempt += 1;
                    metrics::counter!("store_sealed_retries_total").increment(1);
                    tracing::debug!(message = %msg.message_id, %pos, "inbox position sealed on the replicas; writing at a new one");
                    // The replicas' answers pulled this node's clock forward.
                    pos = Position(self.ids().next()?.0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The history entry and the inbox entries (at `pos`) of a message. A body longer than
    /// the inline limit is not copied into the inbox entries, which refer to the history
    /// entry (a 100 KB message to a group of 100 writes its body to the history entry and the
    /// idempotency record, ~200 KB per replica, not ~10 MB).
    fn message_batch(
        &self,
        msg: &Message,
        encoded: Vec<u8>,
        inboxes: &[UserId],
        pos: Position,
    ) -> WriteBatch {
        let mut batch = WriteBatch::default();
        let history_key = keys::history(&msg.conversation, msg.message_id);
        let entry = if msg.body.len() > self.inner.inline_body_bytes {
            encode(&InboxRef::to(msg))
        } else {
            encoded.clone()
        };
        for user in inboxes {
            let key = keys::inbox(*user, pos);
            batch.put(self, Table::Inbox, &keys::user(*user), key, entry.clone());
        }
        let conv_key = keys::conversation(&msg.conversation);
        batch.put(self, Table::History, &conv_key, history_key, encoded);
        batch
    }

    /// Up to `limit` messages of `user`'s inbox at positions after `after` (all when
    /// `None`), in position order, within a byte budget (at least one message), with the
    /// seal that closes the page (see [`SyncPage`]).
    pub async fn inbox_page(
        &self,
        user: UserId,
        after: Option<Position>,
        limit: usize,
        budget: usize,
    ) -> Result<SyncPage, StoreError> {
        let mut page = Collector::new(limit, budget);
        let mut last = None;
        let mut more = false;
        let from = after.map_or(Position(0), |a| Position(a.0.saturating_add(1)));
        let range =
            keys::inbox(user, from).to_vec()..=keys::inbox(user, Position(u64::MAX)).to_vec();
        // The page's entries that refer to their history entry for the body, and each
        // message's position.
        let mut refs = Vec::new();
        let mut positions = Vec::new();
        let seal = self
            .scan(Table::Inbox, &keys::user(user), range, false, |k, v| {
                let entry = InboxEntry::decode(v)?;
                let w = weight(entry.body_len(), entry.client_id());
                if !page.fits(w) {
                    more = true;
                    return Ok(false);
                }
                last = keys::position_suffix(k);
                positions.push(last);
                match entry {
                    InboxEntry::Inline(m) => page.take(m, w),
                    InboxEntry::Ref(r) => {
                        refs.push((page.messages.len(), r.body_len));
                        page.take(r.header, w);
                    }
                }
                Ok(true)
            })
            .await?;
        if let Some(cut) = self
            .fill_bodies(&mut page.messages, &mut positions, &refs)
            .await?
        {
            // The page ends before a message whose body could not be read: its position is
            // not passed, so the next sync reads it again.
            last = cut;
            more = true;
        }
        Ok(SyncPage {
            messages: page.messages,
            last,
            more,
            seal: seal.map(Position),
        })
    }

    /// Reads the body of `messages[i]` for each `(i, body_len)` in `refs` (ascending: the
    /// page's references) from the message's history entry, all at once.
    ///
    /// A history entry no read quorum holds yet may belong to a send still being written (its
    /// partitions reach their quorums one by one): the body is then read from the sender's
    /// idempotency record, which holds the whole message and reached a write quorum before
    /// any of the send's inbox entries was written. An entry that neither names is left out of
    /// the page (no send, acknowledged or in flight, leaves such an entry). When a read fails,
    /// the page is cut before that message and `Some` of the position of the message before
    /// it is returned (the page's new `last`); when the first message's read fails, the error.
    async fn fill_bodies(
        &self,
        messages: &mut Vec<Message>,
        positions: &mut Vec<Option<Position>>,
        refs: &[(usize, u32)],
    ) -> Result<Option<Option<Position>>, StoreError> {
        if refs.is_empty() {
            return Ok(None);
        }
        let wanted: Vec<(Vec<u8>, Vec<u8>)> = refs
            .iter()
            .map(|&(i, _)| {
                let m = &messages[i];
                (
                    keys::conversation(&m.conversation),
                    keys::history(&m.conversation, m.message_id),
                )
            })
            .collect();
        let read = wanted
            .iter()
            .map(|(conv, key)| self.get(Table::History, conv, key));
        let found = futures_util::future::join_all(read).await;
        let mut dangling = Vec::new();
        let mut failed = None;
        for (&(i, body_len), got) in refs.iter().zip(found) {
            let m = &messages[i];
            let full = match got {
                Ok(Some(bytes)) => Ok(Some(decode::<Message>(&bytes)?)),
                Ok(None) => self
                    .sent_before(m.from, &m.client_id)
                    .await
                    .map(|claimed| claimed.filter(|c| c.message_id == m.message_id)),
                Err(e) => Err(e),
            };
            match full {
                Ok(Some(full)) => {
                    if full.message_id != m.message_id
                        || full.conversation != m.conversation
                        || full.body.len() != body_len as usize
                    {
                        return Err(StoreError::Corrupt(format!(
                            "an inbox reference to message {} does not match its stored message",
                            m.message_id
                        )));
                    }
                    messages[i].body = full.body;
                }
                Ok(None) => dangling.push(i),
                Err(e) => {
                    failed = Some((i, e));
                    break;
                }
            }
        }
        let cut = match failed {
            Some((0, e)) => return Err(e),
            Some((i, e)) => {
                tracing::debug!(error = %e, message = %messages[i].message_id, "could not read a synced message's body; the page ends before it");
                messages.truncate(i);
                positions.truncate(i);
                Some(positions[i - 1])
            }
            None => None,
        };
        for i in dangling.into_iter().rev() {
            let m = messages.remove(i);
            positions.remove(i);
            metrics::counter!("store_inbox_dangling_refs_total").increment(1);
            if let Some(suppressed) = DANGLING_LOG.allow() {
                tracing::warn!(message = %m.message_id, suppressed, "an inbox entry refers to a message that neither its history entry nor its sender's idempotency record holds; left out of the page");
            }
        }
        Ok(cut)
    }

    /// Up to `limit` messages of a conversation newer than `after` and older than `before`
    /// (no bound when `None`), newest first, within a byte budget (at least one message).
    pub async fn history_page(
        &self,
        conv: &ConversationId,
        after: MessageId,
        before: Option<MessageId>,
        limit: usize,
        budget: usize,
    ) -> Result<HistoryPage, StoreError> {
        let upper = match before {
            Some(MessageId(0)) => return Ok(HistoryPage::default()),
            Some(b) => MessageId(b.0 - 1),
            None => MessageId(u64::MAX),
        };
        if upper <= after {
            return Ok(HistoryPage::default());
        }
        let mut page = Collector::new(limit, budget);
        let mut full = false;
        let range = keys::history(conv, MessageId(after.0 + 1))..=keys::history(conv, upper);
        self.scan(
            Table::History,
            &keys::conversation(conv),
            range,
            true,
            |_, v| {
                full = !page.offer(decode(v)?);
                Ok(!full)
            },
        )
        .await?;
        let next_before = if full {
            page.messages.last().map(|m| m.message_id)
        } else {
            None
        };
        Ok(HistoryPage {
            messages: page.messages,
            next_before,
        })
    }
}
