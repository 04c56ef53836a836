//! Delivery: a message reaches every other device of both users exactly once and never the
//! device that sent it, and users on different transports chat with each other.

use chat_tests::{next_message, to, TestNode, Transport};

use crate::support::messages_until;

async fn a_message_reaches_every_other_device_once(t: Transport) {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a1 = t.connect(&node, &alice.login).await;
    let (_, mut a2) = t.device(&node, &alice).await;
    let mut b1 = t.connect(&node, &bob.login).await;
    assert_ne!(a1.device_id, a2.device_id);

    let ack = a1
        .send_message("m1", to(bob.id), "hello bob")
        .await
        .unwrap();
    assert_eq!(
        ack.conversation.to_string(),
        format!("d:{}:{}", alice.id.min(bob.id), alice.id.max(bob.id))
    );
    assert!(ack.message_id.0 > 0);

    // bob replies; his reply is the sentinel that shows everything before it has arrived.
    b1.send_message("r1", to(alice.id), "sentinel")
        .await
        .unwrap();
    let at_bob = messages_until(&mut b1, "hello bob").await;
    assert!(at_bob.is_empty());
    let at_a2 = messages_until(&mut a2, "sentinel").await;
    let at_a1 = messages_until(&mut a1, "sentinel").await;
    assert_eq!(at_a2.len(), 1, "alice's other device gets her message once");
    assert_eq!(at_a2[0].message_id, ack.message_id);
    assert_eq!(at_a2[0].client_id, "m1");
    assert_eq!(at_a2[0].from, alice.id);
    assert!(
        at_a1.is_empty(),
        "the sending device never gets its own message: {at_a1:?}"
    );

    // And bob got it exactly once: a second sentinel from alice closes his stream.
    a1.send_message("m2", to(bob.id), "sentinel").await.unwrap();
    let b_stream = messages_until(&mut b1, "sentinel").await;
    assert!(b_stream.is_empty(), "bob got a duplicate: {b_stream:?}");
}
over_each_transport!(a_message_reaches_every_other_device_once =>
    a_message_reaches_every_other_device_once_over_ws_json,
    a_message_reaches_every_other_device_once_over_ws_binary,
    a_message_reaches_every_other_device_once_over_quic,
);

/// alice on `t`; bob with a device on every transport, replying from WebSocket JSON. (Over
/// QUIC this is the former `quic_and_websocket_users_chat_both_ways`, with bob's binary
/// WebSocket device added.)
async fn users_on_different_transports_chat_both_ways(t: Transport) {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = t.connect(&node, &alice.login).await;
    assert_eq!(a.is_quic(), t.is_quic());
    let mut b_ws = Transport::WsJson.connect(&node, &bob.login).await;
    // bob's other devices, one per other transport.
    let mut b_others = Vec::new();
    for bt in [Transport::WsBinary, Transport::Quic] {
        b_others.push((bt, bt.device(&node, &bob).await.1));
    }

    let body = format!("over {t}");
    let ack = a.send_message("q1", to(bob.id), &body).await.unwrap();
    let m1 = next_message(&mut b_ws).await;
    for (bt, b) in &mut b_others {
        let m2 = next_message(b).await;
        assert_eq!(
            (m1.message_id, m2.message_id),
            (ack.message_id, ack.message_id),
            "bob's {bt} device"
        );
    }
    assert_eq!(m1.body, body);

    let back = b_ws
        .send_message("w1", to(alice.id), "over websocket")
        .await
        .unwrap();
    assert_eq!(next_message(&mut a).await.message_id, back.message_id);
    for (bt, b) in &mut b_others {
        assert_eq!(
            next_message(b).await.message_id,
            back.message_id,
            "bob's other device ({bt})"
        );
    }

    // sync over every transport returns the same.
    let over_ws = b_ws.sync_all(None, Some(1)).await.unwrap();
    for (bt, b) in &mut b_others {
        let over_bt = b.sync_all(None, Some(1)).await.unwrap();
        assert_eq!(over_bt.messages, over_ws.messages, "sync over {bt}");
    }
    assert_eq!(over_ws.messages.len(), 2);
}
over_each_transport!(users_on_different_transports_chat_both_ways =>
    users_on_different_transports_chat_both_ways_over_ws_json,
    users_on_different_transports_chat_both_ways_over_ws_binary,
    users_on_different_transports_chat_both_ways_over_quic,
);
