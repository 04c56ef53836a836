//! What a sync cursor is, in one place. Today a cursor is the largest message id a client has
//! seen: a test can name "after message m" itself, and a sync or a client's cursor compares
//! with message ids. When the cursor becomes an inbox position that only the server hands
//! out, this file is what changes.

use client_proto::client::SyncResult;
use client_proto::MessageId;

/// The cursor of a client that has seen every message up to `m`: a sync from it resumes
/// after `m`.
pub fn after(m: MessageId) -> MessageId {
    m
}

/// A whole sync ended with the cursor of `last`, the last message it returned.
pub fn assert_sync_ended_at(sync: &SyncResult, last: MessageId) {
    assert_eq!(sync.cursor, Some(after(last)));
}

/// A sync resumed from `cursor` returned `got`: after the cursor exactly `want`, in order, and
/// nothing older than the node's overlap (`overlap_ms`) before the cursor.
pub fn assert_resumed_from(
    cursor: MessageId,
    overlap_ms: u64,
    got: &[MessageId],
    want: &[MessageId],
) {
    let after: Vec<MessageId> = got.iter().copied().filter(|id| *id > cursor).collect();
    assert_eq!(after, want.to_vec());
    let floor = cursor.minus_ms(overlap_ms);
    assert!(
        got.iter().all(|id| *id >= floor),
        "nothing older than the overlap"
    );
}

/// A [`client_proto::client::ChatClient`]'s cursor has moved past every message of `acked`.
pub fn assert_client_cursor_covers(cursor: Option<MessageId>, acked: &[MessageId]) {
    assert!(cursor.unwrap() >= after(*acked.iter().max().unwrap()));
}
