//! History over a connection: `history` frames page through a conversation, newest first,
//! every message once; a non-participant is refused. (Paging over HTTP, and bad paging input,
//! are tested once, in `single_node.rs`.)

use chat_tests::{to, TestNode, Transport, WAIT};
use client_proto::{ClientFrame, ConversationId, ErrorCode, ServerFrame};

use crate::support::expect_error;

async fn history_frames_cover_every_message_once(t: Transport) {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    let mut a = t.connect(&node, &alice.login).await;
    let mut b = t.connect(&node, &bob.login).await;
    let mut sent = Vec::new();
    for i in 0..60 {
        let (conn, peer) = if i % 3 == 0 {
            (&mut b, alice.id)
        } else {
            (&mut a, bob.id)
        };
        sent.push(
            conn.send_message(&format!("h{i}"), to(peer), &format!("history {i}"))
                .await
                .unwrap()
                .message_id,
        );
    }
    let conv = ConversationId::direct(alice.id, bob.id);
    let mut want = sent.clone();
    want.reverse();

    // Pages of 11.
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        b.send(&ClientFrame::History {
            conversation: conv,
            before,
            limit: Some(11),
        })
        .await
        .unwrap();
        let (msgs, next) = b
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
        seen.extend(msgs.iter().map(|m| m.message_id));
        match next {
            Some(nb) => before = Some(nb),
            None => break,
        }
    }
    assert_eq!(seen, want);

    // Not a participant: forbidden.
    let mut c = t.connect(&node, &carol.login).await;
    expect_error(
        &mut c,
        ClientFrame::History {
            conversation: conv,
            before: None,
            limit: None,
        },
        ErrorCode::Forbidden,
    )
    .await;
}
over_each_transport!(history_frames_cover_every_message_once =>
    history_frames_cover_every_message_once_over_ws_json,
    history_frames_cover_every_message_once_over_ws_binary,
    history_frames_cover_every_message_once_over_quic,
);
