//! Clients over QUIC (issue 6): QUIC and WebSocket users chat with each other, the limits
//! hold on QUIC as on WebSocket, and the client library survives a node restart.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chat_tests::{next_message, to};
use chat_tests::{TestNode, TestUser};
use client_proto::client::{
    ChatClient, ClientError, ClientOptions, ConnectOptions, Connection, Event,
};
use client_proto::codec::{self, Codec};
use client_proto::{ClientFrame, ErrorCode, MessageId, ServerFrame, UserId};

use chat_tests::WAIT;

fn quic_opts(node: &TestNode) -> ConnectOptions {
    ConnectOptions {
        codec: Codec::Binary,
        ca_pem: Some(node.ca_pem()),
    }
}

async fn quic(node: &TestNode, user: &TestUser) -> Connection {
    Connection::connect_with(&node.quic, &user.login.token, &quic_opts(node))
        .await
        .unwrap()
}

#[tokio::test]
async fn quic_and_websocket_users_chat_both_ways() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a_quic = quic(&node, &alice).await;
    assert!(a_quic.is_quic());
    let mut b_ws = node.connect(&bob.login).await;
    // bob has a QUIC device too.
    let bob2 = node
        .api()
        .login(&bob.name, &bob.password, None)
        .await
        .unwrap();
    let mut b_quic = Connection::connect_with(&node.quic, &bob2.token, &quic_opts(&node))
        .await
        .unwrap();

    let ack = a_quic
        .send_message("q1", to(bob.id), "over quic")
        .await
        .unwrap();
    let m1 = next_message(&mut b_ws).await;
    let m2 = next_message(&mut b_quic).await;
    assert_eq!(
        (m1.message_id, m2.message_id),
        (ack.message_id, ack.message_id)
    );
    assert_eq!(m1.body, "over quic");

    let back = b_ws
        .send_message("w1", to(alice.id), "over websocket")
        .await
        .unwrap();
    assert_eq!(next_message(&mut a_quic).await.message_id, back.message_id);
    assert_eq!(
        next_message(&mut b_quic).await.message_id,
        back.message_id,
        "bob's other device"
    );

    // sync over QUIC equals sync over WebSocket.
    let over_quic = b_quic.sync_all(None, Some(1)).await.unwrap();
    let over_ws = b_ws.sync_all(None, Some(1)).await.unwrap();
    assert_eq!(over_quic.messages, over_ws.messages);
    assert_eq!(over_quic.messages.len(), 2);
}

#[tokio::test]
async fn limits_and_bad_input_hold_over_quic() {
    let node = TestNode::start(&["--rate-limit-per-sec", "1", "--rate-limit-burst", "30"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = quic(&node, &alice).await;

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
    assert_eq!(e.code(), Some(ErrorCode::MessageTooLarge));
    let e = a.send_message("empty", to(bob.id), "").await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::BadRequest));
    let e = a
        .send_message("nobody", to(UserId(99)), "hi")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::NotFound));
    // Garbage in a well-formed frame: invalid_frame, the connection stays.
    a.send_bytes(vec![0xff, 0xfe, 0x00]).await.unwrap();
    let code = a
        .wait_for(WAIT, |f| match f {
            ServerFrame::Error { code, .. } => Some(*code),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(code, ErrorCode::InvalidFrame);
    // The same client id again: the same ack, nothing new stored.
    assert_eq!(
        a.send_message("max", to(bob.id), "again").await.unwrap(),
        ok
    );

    // A burst past the rate limit (30 tokens, 5 of them spent above): rate_limited, not stored.
    for i in 0..40 {
        let frame = ClientFrame::Send {
            id: format!("r{i}"),
            to: to(bob.id),
            body: "burst".into(),
        };
        a.send(&frame).await.unwrap();
    }
    let mut acked = vec![ok.message_id];
    let mut limited = 0;
    for i in 0..40 {
        match a.wait_ack(&format!("r{i}")).await {
            Ok(ack) => acked.push(ack.message_id),
            Err(e) if e.code() == Some(ErrorCode::RateLimited) => limited += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(limited >= 10, "{limited} limited");
    let bob_conn = quic(&node, &bob).await;
    let mut bob_conn = bob_conn;
    // In inbox-position order; the retried "max" was written again at a new position (and
    // its first entry deleted), so sort by id to compare.
    let mut stored: Vec<MessageId> = bob_conn
        .sync_all(None, None)
        .await
        .unwrap()
        .ids()
        .into_iter()
        .collect();
    stored.sort();
    acked.sort();
    assert_eq!(stored, acked, "exactly the acked sends are stored");

    // An oversized frame closes the connection with 1009.
    let mut big = (131_073u32).to_be_bytes().to_vec();
    big.extend(std::iter::repeat_n(0u8, 131_073));
    a.send_raw_quic(&big).await.unwrap();
    let closed = a.recv(WAIT).await;
    assert!(
        matches!(closed, Err(ClientError::Closed(Some((1009, _))))),
        "{closed:?}"
    );

    // A bad token: unauthorized, then close 1008.
    let err = Connection::connect_with(&node.quic, "bad-token", &quic_opts(&node))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    // Not authenticating within 10 s: close 1008.
    let mut silent = Connection::connect_unauthenticated(&node.quic, &quic_opts(&node))
        .await
        .unwrap();
    let closed = silent.recv(Duration::from_secs(15)).await;
    assert!(
        matches!(closed, Err(ClientError::Closed(Some((1008, _))))),
        "{closed:?}"
    );
    // A client that does not trust the cluster CA cannot connect.
    let untrusted = ConnectOptions {
        codec: Codec::Binary,
        ca_pem: None,
    };
    assert!(
        Connection::connect_with(&node.quic, &alice.login.token, &untrusted)
            .await
            .is_err()
    );
    // The binary codec is the same on both transports.
    let f = ClientFrame::Heartbeat;
    assert_eq!(
        codec::decode::<ClientFrame>(Codec::Binary, &codec::encode(Codec::Binary, &f)).unwrap(),
        f
    );
}

#[tokio::test]
async fn the_client_library_loses_nothing_across_a_node_restart() {
    let mut node = TestNode::start(&["--rate-limit-burst", "1000"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    for (name, opts) in [("websocket", None), ("quic", Some(quic_opts(&node)))] {
        let url = if opts.is_some() {
            node.quic.clone()
        } else {
            node.ws_url()
        };
        let mut options = ClientOptions::new(url, bob.login.token.clone());
        if let Some(o) = opts {
            options.connect = o;
        }
        let mut bob_client = ChatClient::start(options);
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
        // The client keeps the cursor the server handed out; a sync from it (on a new
        // device) brings back every acked message it does not cover.
        let cursor = bob_client
            .cursor()
            .expect("a cursor from the sync after the reconnect");
        let (_, mut fresh) = node.device(&bob).await;
        let rest = fresh.sync_all(Some(cursor), None).await.unwrap().ids();
        for id in &acked {
            assert!(
                client_proto::Position(id.0) <= cursor || rest.contains(id),
                "{name}: {id} is neither covered by the cursor {cursor} nor after it"
            );
        }
        bob_client.shutdown().await;
        alice_client.shutdown().await;
    }
}
