//! Frames stay under the frame limit whatever a body holds (issue 13): a body at the limit
//! made of the characters JSON escapes the most (U+0001 becomes `\u0001`, six bytes) or
//! that it escapes in two (`\n`) is sent, delivered live, synced and read from history by a
//! conforming client (one that closes with 1009 on any frame over 655,360 bytes), and the
//! conversation goes on after it; `sync_batch` and `history` frames are split by their
//! encoded size, not their raw one. Whatever the sender's transport, a JSON device of the
//! recipient gets it too (a binary sender's body is a JSON client's six-fold frame).

use chat_tests::{next_message, to, TestNode, Transport, WAIT};
use client_proto::limits::MAX_BODY_BYTES;
use client_proto::{ClientFrame, ServerFrame};

async fn maximal_escaped_bodies_arrive_live_by_sync_and_by_history(t: Transport) {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = t.connect(&node, &alice.login).await;
    let mut b = t.connect(&node, &bob.login).await;
    let mut bj = Transport::WsJson.connect(&node, &bob.login).await;
    let bodies = [
        "\u{1}".repeat(MAX_BODY_BYTES),
        "\n".repeat(MAX_BODY_BYTES),
        "\"\\".repeat(MAX_BODY_BYTES / 2),
        // Two that fit one frame by their raw size (the old budget) but not escaped: a
        // `sync_batch` or `history` frame must split them.
        "\u{1}".repeat(54_790),
        "\u{1}".repeat(54_790),
    ];
    let mut sent = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let ack = a
            .send_message(&format!("big{i}"), to(bob.id), body)
            .await
            .unwrap();
        for conn in [&mut b, &mut bj] {
            let got = next_message(conn).await;
            assert_eq!(got.message_id, ack.message_id);
            assert!(got.body == *body, "body {i} arrived changed");
        }
        sent.push(ack.message_id);
    }
    // A later message still arrives.
    let later = a.send_message("later", to(bob.id), "after").await.unwrap();
    assert_eq!(next_message(&mut b).await.message_id, later.message_id);
    sent.push(later.message_id);

    // A new device syncs all of it (several frames: each is kept under the limit).
    let (_, mut b2) = t.device(&node, &bob).await;
    let synced = b2.sync_all(None, None).await.unwrap();
    assert_eq!(synced.ids(), sent);
    assert!(synced.batches >= 2, "{} batches", synced.batches);
    for (m, body) in synced.messages.iter().zip(&bodies) {
        assert!(m.body == *body);
    }
    let synced_json = bj.sync_all(None, None).await.unwrap();
    assert_eq!(synced_json.ids(), sent);

    // History over the connection, page by page.
    let conversation = client_proto::ConversationId::direct(alice.id, bob.id);
    let mut before = None;
    let mut read = Vec::new();
    loop {
        b2.send(&ClientFrame::History {
            conversation,
            before,
            limit: None,
        })
        .await
        .unwrap();
        let (messages, next) = b2
            .wait_for(WAIT, |f| match f {
                ServerFrame::History {
                    messages,
                    next_before,
                    ..
                } => Some((messages.clone(), *next_before)),
                _ => None,
            })
            .await
            .unwrap();
        read.extend(messages);
        match next {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    let mut ids: Vec<_> = read.iter().map(|m| m.message_id).collect();
    ids.reverse();
    assert_eq!(ids, sent);
    assert!(read
        .iter()
        .rev()
        .zip(&bodies)
        .all(|(m, body)| m.body == *body));

    // And over HTTP (paged by the same bound).
    let mut before = None;
    let mut over_http = Vec::new();
    loop {
        let page = node
            .api()
            .history(&bob.login.token, conversation, before, Some(200))
            .await
            .unwrap();
        over_http.extend(page.messages.into_iter().map(|m| m.message_id));
        match page.next_before {
            Some(n) => before = Some(n),
            None => break,
        }
    }
    over_http.reverse();
    assert_eq!(over_http, sent);
}
over_each_transport!(maximal_escaped_bodies_arrive_live_by_sync_and_by_history =>
    maximal_escaped_bodies_arrive_live_by_sync_and_by_history_over_ws_json,
    maximal_escaped_bodies_arrive_live_by_sync_and_by_history_over_ws_binary,
    maximal_escaped_bodies_arrive_live_by_sync_and_by_history_over_quic,
);
