//! The client library across a node restart: a `ChatClient` reconnects, retries unacked sends
//! and syncs, so every acked message arrives exactly once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chat_tests::{to, TestNode, Transport};
use client_proto::client::{ChatClient, ClientOptions, Event};
use client_proto::MessageId;

use crate::cursor;

/// bob's client connects over `t`; alice's over WebSocket JSON, as before (so over QUIC and
/// binary WebSocket the two users are on different transports).
async fn the_client_library_loses_nothing_across_a_node_restart(t: Transport) {
    let mut node = TestNode::start(&["--rate-limit-burst", "1000"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let name = t.to_string();
    let mut bob_client = ChatClient::start(t.client_options(&node, &bob.login.token));
    assert!(matches!(
        bob_client.next_event().await,
        Some(Event::Connected { .. })
    ));
    let alice_client =
        ChatClient::start(ClientOptions::new(node.ws_url(), alice.login.token.clone()));

    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(
            alice_client
                .send(to(bob.id), format!("{name} before {i}"))
                .await
                .unwrap()
                .message_id,
        );
    }
    node.kill(); // SIGKILL mid-conversation
    node.restart();
    // alice's sends made while the node restarts are retried by her client until acked.
    for i in 0..20 {
        acked.push(
            alice_client
                .send(to(bob.id), format!("{name} after {i}"))
                .await
                .unwrap()
                .message_id,
        );
    }
    let mut got: HashMap<MessageId, usize> = HashMap::new();
    let want: HashSet<MessageId> = acked.iter().copied().collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while !want.iter().all(|id| got.contains_key(id)) {
        let ev = tokio::time::timeout_at(deadline, bob_client.next_event())
            .await
            .expect("all acked messages arrive");
        if let Some(Event::Message(m)) = ev {
            if m.from == alice.id {
                *got.entry(m.message_id).or_default() += 1;
            }
        }
    }
    // A moment for duplicates to show, then: every acked message exactly once.
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Some(ev) = bob_client.next_event().await {
            if let Event::Message(m) = ev {
                *got.entry(m.message_id).or_default() += 1;
            }
        }
    })
    .await;
    let from_this_round: Vec<_> = got.iter().filter(|(id, _)| want.contains(id)).collect();
    assert_eq!(from_this_round.len(), 40, "{name}");
    assert!(
        from_this_round.iter().all(|(_, n)| **n == 1),
        "{name}: duplicates {from_this_round:?}"
    );
    cursor::assert_a_sync_from_it_brings_the_rest(t, &node, &bob, bob_client.cursor(), &acked)
        .await;
    bob_client.shutdown().await;
    alice_client.shutdown().await;
}
over_each_transport!(the_client_library_loses_nothing_across_a_node_restart =>
    the_client_library_loses_nothing_across_a_node_restart_over_ws_json,
    the_client_library_loses_nothing_across_a_node_restart_over_ws_binary,
    the_client_library_loses_nothing_across_a_node_restart_over_quic,
);
