//! What a sync cursor is, in one place: an inbox position that only the server hands out
//! (a `sync_batch` or `cursor` frame). Everything acknowledged at or below it has been sent;
//! a sync from it brings everything after. A new message's first inbox position is its id,
//! so a test can still name "after message m" as `Position(m)`.

use chat_tests::{TestNode, TestUser, Transport};
use client_proto::client::SyncResult;
use client_proto::{MessageId, Position};

/// The position just after message `m` was first written (its id).
pub fn after(m: MessageId) -> Position {
    Position(m.0)
}

/// A whole sync, run after the node's seal window had passed since `last` was acked, ended
/// with a cursor that covers it.
pub fn assert_sync_covers(sync: &SyncResult, last: MessageId) {
    let cursor = sync.cursor.expect("a sync hands out a cursor");
    assert!(cursor >= after(last), "{cursor} covers {last}");
}

/// A sync resumed from `cursor` returned `got`: exactly `want`, in order (nothing at or below
/// the cursor comes back).
pub fn assert_resumed_from(got: &[MessageId], want: &[MessageId]) {
    assert_eq!(got, want);
}

/// `cursor` (a client's, from the server) is usable: a sync from it on a new device of
/// `user` brings back every message of `acked` it does not cover.
pub async fn assert_a_sync_from_it_brings_the_rest(
    t: Transport,
    node: &TestNode,
    user: &TestUser,
    cursor: Option<Position>,
    acked: &[MessageId],
) {
    let cursor = cursor.expect("the client kept the cursor the server handed out");
    let (_, mut fresh) = t.device(node, user).await;
    let rest = fresh.sync_all(Some(cursor), None).await.unwrap().ids();
    for id in acked {
        assert!(
            after(*id) <= cursor || rest.contains(id),
            "{id} is neither covered by the cursor {cursor} nor after it"
        );
    }
}
