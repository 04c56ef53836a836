//! Sync: a user who was offline gets everything, in order, once, in batches, and again from a
//! cursor part-way.

use std::collections::HashSet;

use chat_tests::{to, TestNode, Transport};
use client_proto::MessageId;

use crate::cursor;

async fn an_offline_user_syncs_everything_in_order(t: Transport) {
    // A short seal window: a moment after the last send, a sync's cursor covers it all.
    let node = TestNode::start(&["--seal-window-ms", "500"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = t.connect(&node, &alice.login).await;
    let mut acks = Vec::new();
    for i in 0..50 {
        acks.push(
            a.send_message(&format!("c{i}"), to(bob.id), &format!("msg {i}"))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // bob logs in on a new device and syncs from nothing, in small batches.
    let (_, mut b) = t.device(&node, &bob).await;
    let all = b.sync_all(None, Some(7)).await.unwrap();
    assert!(all.batches >= 8, "{} batches", all.batches);
    let ids: Vec<MessageId> = all.messages.iter().map(|m| m.message_id).collect();
    let want: Vec<MessageId> = acks.iter().map(|a| a.message_id).collect();
    assert_eq!(ids, want, "all 50, in order, once");
    cursor::assert_sync_covers(&all, want[49]);
    // Nothing comes back from the cursor: it is closed.
    let closed = b.sync_all(all.cursor, None).await.unwrap();
    assert!(closed.messages.is_empty(), "{:?}", closed.ids());
    for (i, m) in all.messages.iter().enumerate() {
        assert_eq!(m.body, format!("msg {i}"));
    }

    // From the 25th message's position: exactly 26..50.
    let from = cursor::after(want[24]);
    let part = b.sync_all(Some(from), None).await.unwrap();
    let got: Vec<MessageId> = part.messages.iter().map(|m| m.message_id).collect();
    cursor::assert_resumed_from(&got, &want[25..]);
    assert_eq!(
        got.len(),
        got.iter().collect::<HashSet<_>>().len(),
        "no duplicates"
    );
}
over_each_transport!(an_offline_user_syncs_everything_in_order =>
    an_offline_user_syncs_everything_in_order_over_ws_json,
    an_offline_user_syncs_everything_in_order_over_ws_binary,
    an_offline_user_syncs_everything_in_order_over_quic,
);
