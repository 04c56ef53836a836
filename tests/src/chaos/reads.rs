//! The final reads, after every fault is healed: each user's whole inbox (a `sync` from
//! nothing on a fresh connection of an existing device, every batch until `done`) and each
//! conversation's whole history (`GET /v1/conversations/{id}/messages`, paged with `before`),
//! through EACH node, for the checker to compare.

use std::time::Duration;

use client_proto::client::{Connection, HttpClient};
use client_proto::codec::Codec;
use client_proto::{ClientFrame, ConversationId, MessageId, ServerFrame};
use futures_util::StreamExt;

use super::history::{HistoryRead, InboxRead};

/// How long one sync batch or history page may take.
const READ_WAIT: Duration = Duration::from_secs(20);
/// Attempts per read: one failure right after a heal may be a node still settling.
const ATTEMPTS: usize = 3;
/// Reads in flight at once.
const PARALLEL: usize = 8;
/// History page size (the protocol's largest).
const PAGE: u32 = 200;

/// Reads every `(user, token)`'s inbox and every `(conversation, token)`'s history through
/// every node of `http` (HTTP roots).
pub async fn read_all(
    http: &[String],
    users: &[(usize, String)],
    conversations: &[(ConversationId, String)],
) -> (Vec<InboxRead>, Vec<HistoryRead>) {
    let inbox_jobs = users.iter().flat_map(|(user, token)| {
        http.iter().enumerate().map(move |(node, url)| async move {
            let ids = attempt(|| read_inbox(url, token)).await;
            InboxRead {
                user: *user,
                node,
                ids,
            }
        })
    });
    let mut inboxes: Vec<InboxRead> = futures_util::stream::iter(inbox_jobs)
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    inboxes.sort_by_key(|r| (r.user, r.node));
    let history_jobs = conversations.iter().flat_map(|(conversation, token)| {
        http.iter().enumerate().map(move |(node, url)| async move {
            let ids = attempt(|| read_history(url, token, *conversation)).await;
            HistoryRead {
                conversation: *conversation,
                node,
                ids,
            }
        })
    });
    let mut histories: Vec<HistoryRead> = futures_util::stream::iter(history_jobs)
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    histories.sort_by_key(|r| (r.conversation.to_string(), r.node));
    (inboxes, histories)
}

/// Runs `read` up to [`ATTEMPTS`] times, a second apart, until it succeeds.
async fn attempt<F, Fut>(mut read: F) -> Result<Vec<MessageId>, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Vec<MessageId>, String>>,
{
    let mut last = Err("not tried".to_string());
    for i in 0..ATTEMPTS {
        if i > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        last = read().await;
        if last.is_ok() {
            break;
        }
    }
    last
}

/// One user's whole inbox through the node at `http`.
async fn read_inbox(http: &str, token: &str) -> Result<Vec<MessageId>, String> {
    let url = HttpClient::new(http).ws_url();
    let mut conn = Connection::connect(&url, token, Codec::Json)
        .await
        .map_err(|e| format!("connect to {url}: {e}"))?;
    let result = sync_from_nothing(&mut conn).await;
    conn.close().await;
    result
}

/// `sync` with no cursor, every batch until `done`; an `error` frame fails the read (unlike
/// `Connection::sync_all`, which would end it quietly).
async fn sync_from_nothing(conn: &mut Connection) -> Result<Vec<MessageId>, String> {
    conn.send(&ClientFrame::Sync {
        after: None,
        limit: None,
    })
    .await
    .map_err(|e| format!("send sync: {e}"))?;
    let mut ids = Vec::new();
    loop {
        let batch = conn
            .wait_for(READ_WAIT, |f| match f {
                ServerFrame::SyncBatch { messages, done, .. } => Some(Ok((
                    messages.iter().map(|m| m.message_id).collect::<Vec<_>>(),
                    *done,
                ))),
                ServerFrame::Error { code, message, .. } => Some(Err(format!("{code}: {message}"))),
                _ => None,
            })
            .await
            .map_err(|e| format!("wait for a sync batch: {e}"))?;
        let (batch, done) = batch.map_err(|e| format!("sync refused: {e}"))?;
        ids.extend(batch);
        if done {
            return Ok(ids);
        }
    }
}

/// One conversation's whole history through the node at `http`, newest first.
async fn read_history(
    http: &str,
    token: &str,
    conversation: ConversationId,
) -> Result<Vec<MessageId>, String> {
    let api = HttpClient::new(http);
    let mut ids = Vec::new();
    let mut before = None;
    // Bounded: a page holds at least one message, and no run stores a million.
    for _ in 0..1_000_000 / PAGE {
        let page = tokio::time::timeout(
            READ_WAIT,
            api.history(token, conversation, before, Some(PAGE)),
        )
        .await
        .map_err(|_| format!("history page of {conversation} took over {READ_WAIT:?}"))?
        .map_err(|e| format!("history of {conversation}: {e}"))?;
        ids.extend(page.messages.iter().map(|m| m.message_id));
        match page.next_before {
            Some(next) if !page.messages.is_empty() => {
                if before.is_some_and(|b| next >= b) {
                    return Err(format!(
                        "history of {conversation}: next_before {next} does not move back from {before:?}"
                    ));
                }
                before = Some(next);
            }
            _ => return Ok(ids),
        }
    }
    Err(format!("history of {conversation}: too many pages"))
}
