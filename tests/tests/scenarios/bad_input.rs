//! Bad input: over-long bodies and client ids, empty bodies, unknown recipients, frames that do
//! not decode and a second `auth` are refused, the connection stays, and nothing is stored.

use chat_tests::{to, TestNode, Transport};
use client_proto::client::Connection;
use client_proto::{ClientFrame, ErrorCode, MessageId, UserId};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::support::{expect_error, next_error};

/// Sends frames that do not decode, as this transport carries them, and returns how many. On
/// WebSocket: malformed JSON and an unknown frame type in text frames and garbage in a binary
/// frame (the node decodes each WebSocket message by its kind, whatever codec the session
/// answers in). On QUIC, whose frames are all binary: the same bytes, and more garbage.
async fn send_undecodable_frames(conn: &mut Connection, t: Transport) -> usize {
    match t {
        Transport::WsJson | Transport::WsBinary => {
            conn.send_raw(WsMessage::Text("{not json".into()))
                .await
                .unwrap();
            conn.send_raw(WsMessage::Text(r#"{"type":"dance"}"#.into()))
                .await
                .unwrap();
            conn.send_raw(WsMessage::Binary(vec![0xff, 0x00, 0x13].into()))
                .await
                .unwrap();
            3
        }
        Transport::Quic => {
            let frames = [
                b"{not json".to_vec(),
                br#"{"type":"dance"}"#.to_vec(),
                vec![0xff, 0x00, 0x13],
                vec![0xff, 0xfe, 0x00],
            ];
            for f in &frames {
                conn.send_bytes(f.clone()).await.unwrap();
            }
            frames.len()
        }
    }
}

async fn bad_input_is_refused_and_nothing_is_stored(t: Transport) {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = t.connect(&node, &alice.login).await;

    // The body limit is in bytes, and exactly 100,000 is fine.
    let ok = a
        .send_message("max", to(bob.id), &"x".repeat(100_000))
        .await
        .unwrap();
    let e = a
        .send_message("over", to(bob.id), &"x".repeat(100_001))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::MessageTooLarge));
    let e = a
        .send_message("utf8", to(bob.id), &"é".repeat(50_001))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(ErrorCode::MessageTooLarge),
        "100,002 bytes in 50,001 chars"
    );
    let ok_utf8 = a
        .send_message("utf8ok", to(bob.id), &"é".repeat(50_000))
        .await
        .unwrap();
    let e = a.send_message("empty", to(bob.id), "").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));
    // (The WebSocket test asked for user 12345, the QUIC test for user 99.)
    for (i, nobody) in [UserId(12345), UserId(99)].into_iter().enumerate() {
        let e = a
            .send_message(&format!("nobody{i}"), to(nobody), "hi")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::NotFound), "{nobody:?}");
    }
    let e = a
        .send_message(&"i".repeat(65), to(bob.id), "hi")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));

    // Frames that do not decode: invalid_frame, the connection stays.
    let undecodable = send_undecodable_frames(&mut a, t).await;
    for _ in 0..undecodable {
        let code = next_error(&mut a).await;
        assert_eq!(code, ErrorCode::InvalidFrame);
    }
    expect_error(
        &mut a,
        ClientFrame::Auth {
            token: "again".into(),
        },
        ErrorCode::InvalidFrame,
    )
    .await;

    // A retried client id returns the same ack and stores no new message (its inbox entries
    // are written again at a new position, the first ones deleted).
    let again = a
        .send_message("max", to(bob.id), "a different body")
        .await
        .unwrap();
    assert_eq!(again, ok);

    // The connection still works after all of that.
    let last = a
        .send_message("fine", to(bob.id), "still here")
        .await
        .unwrap();

    // Exactly three messages were stored, in both inboxes. (The retried "max" now sits at a
    // later inbox position, so sync order is not id order here.)
    let (_, mut b) = t.device(&node, &bob).await;
    let got = b.sync_all(None, None).await.unwrap();
    let mut ids: Vec<MessageId> = got.messages.iter().map(|m| m.message_id).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![ok.message_id, ok_utf8.message_id, last.message_id]
    );
    let max = got.messages.iter().find(|m| m.message_id == ok.message_id);
    assert_eq!(max.map(|m| m.body.len()), Some(100_000));
    let mine = a.sync_all(None, None).await.unwrap();
    assert_eq!(mine.messages.len(), 3);
}
over_each_transport!(bad_input_is_refused_and_nothing_is_stored =>
    bad_input_is_refused_and_nothing_is_stored_over_ws_json,
    bad_input_is_refused_and_nothing_is_stored_over_ws_binary,
    bad_input_is_refused_and_nothing_is_stored_over_quic,
);
