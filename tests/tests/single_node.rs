//! Single-node behaviour (issue 2): real `chatnode` processes, real HTTP and WebSocket.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use chat_tests::TestNode;
use chat_tests::{next_message, to};
use client_proto::client::{connect_raw, ClientError, WsConnection};
use client_proto::codec::Codec;
use client_proto::{ClientFrame, ErrorCode, Message, MessageId, Position, ServerFrame, UserId};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

use chat_tests::WAIT;

/// Every `message` frame that arrives until one with `body == sentinel`, sentinel excluded.
async fn messages_until(ws: &mut WsConnection, sentinel: &str) -> Vec<Message> {
    let mut seen = Vec::new();
    loop {
        let m = next_message(ws).await;
        if m.body == sentinel {
            return seen;
        }
        seen.push(m);
    }
}

#[tokio::test]
async fn a_message_reaches_every_other_device_once() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a1 = node.connect(&alice.login).await;
    let (_, mut a2) = node.device(&alice).await;
    let mut b1 = node.connect(&bob.login).await;
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

#[tokio::test]
async fn an_offline_user_syncs_everything_in_order() {
    // A short seal window: a second after the last send, a sync's cursor covers it all.
    let node = TestNode::start(&["--seal-window-ms", "500"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = node.connect(&alice.login).await;
    let mut acks = Vec::new();
    for i in 0..50 {
        acks.push(
            a.send_message(&format!("c{i}"), to(bob.id), &format!("msg {i}"))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // bob logs in on a new device and syncs from nothing, in small batches.
    let (_, mut b) = node.device(&bob).await;
    let all = b.sync_all(None, Some(7)).await.unwrap();
    assert!(all.batches >= 8, "{} batches", all.batches);
    let ids: Vec<MessageId> = all.messages.iter().map(|m| m.message_id).collect();
    let want: Vec<MessageId> = acks.iter().map(|a| a.message_id).collect();
    assert_eq!(ids, want, "all 50, in order, once");
    // The cursor is an inbox position that covers everything sent (a new message's first
    // position is its id).
    let cursor = all.cursor.expect("a cursor");
    assert!(
        cursor >= Position(want[49].0),
        "{cursor} covers the last message"
    );
    for (i, m) in all.messages.iter().enumerate() {
        assert_eq!(m.body, format!("msg {i}"));
    }
    // Nothing comes back from the cursor: it is closed.
    assert!(b
        .sync_all(Some(cursor), None)
        .await
        .unwrap()
        .messages
        .is_empty());

    // From the 25th message's position: exactly 26..50, once.
    let part = b.sync_all(Some(Position(want[24].0)), None).await.unwrap();
    let got: Vec<MessageId> = part.messages.iter().map(|m| m.message_id).collect();
    assert_eq!(got, want[25..].to_vec());
    assert_eq!(
        got.len(),
        got.iter().collect::<HashSet<_>>().len(),
        "no duplicates"
    );
}

#[tokio::test]
async fn acked_messages_survive_sigkill() {
    let mut node = TestNode::start(&["--rate-limit-burst", "1000"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = node.connect(&alice.login).await;
    // Pipelined sends: many in flight at once, acked by shared flushes.
    for i in 0..300 {
        a.send(&ClientFrame::Send {
            id: format!("k{i}"),
            to: to(bob.id),
            body: format!("durable {i}"),
        })
        .await
        .unwrap();
    }
    let mut acked = HashSet::new();
    for i in 0..300 {
        acked.insert(a.wait_ack(&format!("k{i}")).await.unwrap().message_id);
    }
    node.kill(); // SIGKILL right after the last ack: no shutdown flush
    node.restart();
    let synced: HashSet<MessageId> = node.sync_on_new_device(&bob).await.into_iter().collect();
    let missing: Vec<_> = acked.difference(&synced).collect();
    assert!(
        missing.is_empty(),
        "acked but lost after SIGKILL: {missing:?}"
    );
    assert_eq!(synced.len(), 300);
}

#[tokio::test]
async fn message_ids_keep_increasing_across_a_restart() {
    let mut node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let mut a = node.connect(&alice.login).await;
    let first = a
        .send_message("x1", to(alice.id), "note to self")
        .await
        .unwrap();
    node.restart();
    let login = node
        .api()
        .login(&alice.name, &alice.password, None)
        .await
        .unwrap();
    let mut a = node.connect(&login).await;
    let second = a
        .send_message("x2", to(alice.id), "note again")
        .await
        .unwrap();
    assert!(second.message_id > first.message_id);
}

async fn expect_error(ws: &mut WsConnection, frame: ClientFrame, code: ErrorCode) {
    ws.send(&frame).await.unwrap();
    let got = ws
        .wait_for(WAIT, |f| match f {
            ServerFrame::Error { code, .. } => Some(*code),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(got, code, "for {frame:?}");
}

async fn expect_close(
    mut raw: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    code: u16,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let next = tokio::time::timeout_at(deadline, raw.next())
            .await
            .expect("the server should close");
        match next {
            Some(Ok(WsMessage::Close(Some(c)))) => {
                assert_eq!(u16::from(c.code), code, "close reason: {}", c.reason);
                return;
            }
            Some(Ok(_)) => continue,
            other => panic!("expected close {code}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn bad_input_is_refused_and_nothing_is_stored() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = node.connect(&alice.login).await;

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
    let e = a
        .send_message("nobody", to(UserId(12345)), "hi")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    let e = a
        .send_message(&"i".repeat(65), to(bob.id), "hi")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));

    // Malformed JSON and unknown frame types: invalid_frame, the connection stays.
    a.send_raw(WsMessage::Text("{not json".into()))
        .await
        .unwrap();
    a.send_raw(WsMessage::Text(r#"{"type":"dance"}"#.into()))
        .await
        .unwrap();
    a.send_raw(WsMessage::Binary(vec![0xff, 0x00, 0x13].into()))
        .await
        .unwrap();
    for _ in 0..3 {
        let code = a
            .wait_for(WAIT, |f| match f {
                ServerFrame::Error { code, .. } => Some(*code),
                _ => None,
            })
            .await
            .unwrap();
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

    // A retried client id returns the same ack and stores nothing new.
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

    // Exactly three messages were stored, in both inboxes. (The retried client id wrote
    // "max" again at a new inbox position, so sync order is not id order here.)
    let (_, mut b) = node.device(&bob).await;
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

#[tokio::test]
async fn oversized_frames_bad_tokens_and_silence_close_the_connection() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;

    // An oversized frame after auth: close 1009.
    let mut raw = connect_raw(&node.ws_url()).await.unwrap();
    raw.send(WsMessage::Text(
        format!(r#"{{"type":"auth","token":"{}"}}"#, alice.login.token).into(),
    ))
    .await
    .unwrap();
    let _ready = raw.next().await.unwrap().unwrap();
    raw.send(WsMessage::Text("x".repeat(131_073).into()))
        .await
        .unwrap();
    expect_close(raw, 1009).await;

    // A frame of exactly the limit is read (and refused as JSON, not as a size).
    let mut a = node.connect(&alice.login).await;
    let mut body = r#"{"type":"heartbeat","pad":""#.to_string();
    body.push_str(&"p".repeat(131_072 - body.len() - 2));
    body.push_str("\"}");
    assert_eq!(body.len(), 131_072);
    a.send_raw(WsMessage::Text(body.into())).await.unwrap();
    a.send_message("alive", to(alice.id), "still open")
        .await
        .unwrap();

    // A bad token: unauthorized, then close 1008.
    let err = WsConnection::connect(&node.ws_url(), "not-a-token", Codec::Json)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    let mut forged = alice.login.token.clone();
    forged.pop();
    let err = WsConnection::connect(&node.ws_url(), &forged, Codec::Json)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));

    // No auth within 10 s: close 1008.
    let raw = connect_raw(&node.ws_url()).await.unwrap();
    expect_close(raw, 1008).await;

    // A revoked token: logout closes the device's socket and the token stops working.
    let (login2, mut d2) = node.device(&alice).await;
    node.api().logout(&login2.token).await.unwrap();
    let closed = d2.recv(WAIT).await;
    assert!(
        matches!(closed, Err(ClientError::Closed(Some((1008, _))))),
        "{closed:?}"
    );
    let err = WsConnection::connect(&node.ws_url(), &login2.token, Codec::Json)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    let err = node.api().me(&login2.token).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    // The other device is untouched.
    assert_eq!(
        node.api().me(&alice.login.token).await.unwrap().username,
        "alice"
    );
}

#[tokio::test]
async fn a_burst_past_the_rate_limit_is_refused_and_not_stored() {
    let node = TestNode::start(&["--rate-limit-per-sec", "1", "--rate-limit-burst", "20"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = node.connect(&alice.login).await;
    for i in 0..40 {
        a.send(&ClientFrame::Send {
            id: format!("b{i}"),
            to: to(bob.id),
            body: "burst".into(),
        })
        .await
        .unwrap();
    }
    let mut acked = Vec::new();
    let mut limited = 0;
    for i in 0..40 {
        match a.wait_ack(&format!("b{i}")).await {
            Ok(ack) => acked.push(ack.message_id),
            Err(e) if e.code() == Some(ErrorCode::RateLimited) => limited += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!((20..=22).contains(&acked.len()), "{} acked", acked.len());
    assert_eq!(acked.len() + limited, 40);
    let (_, mut b) = node.device(&bob).await;
    let stored: Vec<MessageId> = b
        .sync_all(None, None)
        .await
        .unwrap()
        .ids()
        .into_iter()
        .collect();
    acked.sort();
    assert_eq!(stored, acked, "only acked sends are stored");
}

#[tokio::test]
async fn history_pages_cover_every_message_once() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    let mut a = node.connect(&alice.login).await;
    let mut b = node.connect(&bob.login).await;
    let mut sent = Vec::new();
    for i in 0..60 {
        let (ws, peer) = if i % 3 == 0 {
            (&mut b, alice.id)
        } else {
            (&mut a, bob.id)
        };
        sent.push(
            ws.send_message(&format!("h{i}"), to(peer), &format!("history {i}"))
                .await
                .unwrap()
                .message_id,
        );
    }
    let conv = client_proto::ConversationId::direct(alice.id, bob.id);

    // Over HTTP, pages of 7, newest first.
    let api = node.api();
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = api
            .history(&alice.login.token, conv, before, Some(7))
            .await
            .unwrap();
        assert!(page.messages.len() <= 7);
        seen.extend(page.messages.iter().map(|m| m.message_id));
        match page.next_before {
            Some(nb) => before = Some(nb),
            None => break,
        }
    }
    let mut want = sent.clone();
    want.reverse();
    assert_eq!(seen, want, "every message exactly once, newest first");

    // Over WebSocket, pages of 11.
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

    // Not a participant: 403 over HTTP, forbidden over WebSocket.
    let err = api
        .history(&carol.login.token, conv, None, None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Forbidden));
    let mut c = node.connect(&carol.login).await;
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
    // Bad paging input.
    let err = api
        .history(&alice.login.token, conv, None, Some(201))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    let raw = api
        .request_raw(
            reqwest::Method::GET,
            "/v1/conversations/d:9:1/messages",
            Some(&alice.login.token),
            None::<&()>,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(raw, ClientError::Refused(ref b) if b.code == ErrorCode::BadRequest),
        "{raw:?}"
    );
}

#[tokio::test]
async fn accounts_http_api() {
    let node = TestNode::start(&[]);
    let api = node.api();
    let alice = node.user("alice").await;
    let e = api.signup("alice", "another-password").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Conflict));
    for (name, pw) in [
        ("al", "password1"),
        ("Alice2", "password1"),
        ("carol", "short"),
        ("with space", "password1"),
    ] {
        let e = api.signup(name, pw).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{name}");
    }
    let e = api
        .login("alice", "wrong-password", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    let me = api.me(&alice.login.token).await.unwrap();
    assert_eq!(me.user_id, alice.id);
    assert_eq!(
        api.user(&alice.login.token, "alice").await.unwrap().user_id,
        alice.id
    );
    let e = api.user(&alice.login.token, "nobody").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    let e = api.me("garbage").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    let raw = api
        .request_raw(
            reqwest::Method::POST,
            "/v1/signup",
            None,
            Some(&serde_json::json!({"username": 5})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(raw, ClientError::Refused(ref b) if b.code == ErrorCode::BadRequest),
        "{raw:?}"
    );
    assert_eq!(
        alice.login.node.ws_url,
        node.ws_url(),
        "login names a node to use"
    );
}
