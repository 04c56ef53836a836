//! Messages: conversation history, inboxes (the message sync queue) and idempotency records.

use client_proto::ids::{ConversationId, MessageId, UserId};
use client_proto::Message;

use super::records::{decode, encode, PushJob};
use super::{keys, Store, StoreError, Table, WriteBatch};

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

/// Part of an inbox, ascending.
#[derive(Debug, Default)]
pub struct SyncPage {
    pub messages: Vec<Message>,
    /// Whether the inbox holds more after the last message returned.
    pub more: bool,
}

/// Part of a conversation's history, newest first.
#[derive(Debug, Default)]
pub struct HistoryPage {
    pub messages: Vec<Message>,
    /// Where the next (older) page starts, if there is one.
    pub next_before: Option<MessageId>,
}

/// Rough encoded size of a message, for keeping frames under the protocol limit.
fn weight(m: &Message) -> usize {
    m.body.len() + m.client_id.len() + 200
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

    /// Takes `m` if it fits; false means the page is full (and `m` was not taken).
    fn offer(&mut self, m: Message) -> bool {
        let w = weight(&m);
        if self.messages.len() >= self.limit
            || (!self.messages.is_empty() && self.used + w > self.budget)
        {
            return false;
        }
        self.used += w;
        self.messages.push(m);
        true
    }
}

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
    /// history entry and an inbox entry for each of `inboxes`, with `push_jobs` in the push
    /// outbox, in one batch. Returns once all of it is durable. When the client id was
    /// claimed before, returns the first message and writes nothing.
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
        let mut batch = self.message_batch(&msg, encoded, inboxes);
        for job in push_jobs {
            self.queue_push(&mut batch, job, job.ts);
        }
        self.write(batch).await?;
        Ok(SendOutcome::New(msg))
    }

    /// Writes an already claimed message's history and inbox entries (the same keys and bytes
    /// as its first attempt, so writing them twice is harmless), durably.
    pub async fn complete_message(
        &self,
        msg: &Message,
        inboxes: &[UserId],
    ) -> Result<(), StoreError> {
        self.write(self.message_batch(msg, encode(msg), inboxes))
            .await
    }

    /// The history entry and the inbox entries of a message.
    fn message_batch(&self, msg: &Message, encoded: Vec<u8>, inboxes: &[UserId]) -> WriteBatch {
        let mut batch = WriteBatch::default();
        let history_key = keys::history(&msg.conversation, msg.message_id);
        for user in inboxes {
            let key = keys::inbox(*user, msg.message_id);
            batch.put(self, Table::Inbox, &keys::user(*user), key, encoded.clone());
        }
        let conv_key = keys::conversation(&msg.conversation);
        batch.put(self, Table::History, &conv_key, history_key, encoded);
        batch
    }

    /// Up to `limit` messages of `user`'s inbox with ids from `from` on (inclusive), in id
    /// order, within a byte budget (at least one message).
    pub async fn inbox_page(
        &self,
        user: UserId,
        from: MessageId,
        limit: usize,
        budget: usize,
    ) -> Result<SyncPage, StoreError> {
        let mut page = Collector::new(limit, budget);
        let mut more = false;
        let range =
            keys::inbox(user, from).to_vec()..=keys::inbox(user, MessageId(u64::MAX)).to_vec();
        self.scan(Table::Inbox, &keys::user(user), range, false, |_, v| {
            more = !page.offer(decode(v)?);
            Ok(!more)
        })
        .await?;
        Ok(SyncPage {
            messages: page.messages,
            more,
        })
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
