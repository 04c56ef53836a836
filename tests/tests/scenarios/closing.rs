//! When the node closes a connection: a frame over the size limit (1009), no `auth` in time
//! (1008), a logout (1008); and bad tokens are refused. The close is a WebSocket close frame or
//! a QUIC application close code, with the same numbers ([`crate::support::expect_close`]).

use chat_tests::{to, TestNode, Transport, WAIT};
use client_proto::client::{ClientError, Connection};
use client_proto::limits::MAX_FRAME_BYTES;
use client_proto::ErrorCode;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use crate::support::expect_close;

/// Sends one frame of `len` bytes of content that is not a valid frame, in this transport's
/// framing: a text (JSON) or binary WebSocket message, or a length-prefixed QUIC frame (the
/// prefix written by hand, since the client's own framing refuses what is too large).
async fn send_frame_of(conn: &mut Connection, t: Transport, len: usize) {
    match t {
        Transport::WsJson => conn
            .send_raw(WsMessage::Text("x".repeat(len).into()))
            .await
            .unwrap(),
        Transport::WsBinary => conn
            .send_raw(WsMessage::Binary(vec![0xff; len].into()))
            .await
            .unwrap(),
        Transport::Quic => {
            let mut raw = u32::try_from(len).unwrap().to_be_bytes().to_vec();
            raw.extend(std::iter::repeat_n(0u8, len));
            conn.send_raw_quic(&raw).await.unwrap();
        }
    }
}

/// Sends one frame of exactly the size limit, as this transport carries it: on JSON a padded
/// heartbeat, on the binary codec garbage.
async fn send_frame_at_the_limit(conn: &mut Connection, t: Transport) {
    match t {
        Transport::WsJson => {
            let mut body = r#"{"type":"heartbeat","pad":""#.to_string();
            body.push_str(&"p".repeat(MAX_FRAME_BYTES - body.len() - 2));
            body.push_str("\"}");
            assert_eq!(body.len(), MAX_FRAME_BYTES);
            conn.send_raw(WsMessage::Text(body.into())).await.unwrap();
        }
        Transport::WsBinary | Transport::Quic => {
            conn.send_bytes(vec![0xff; MAX_FRAME_BYTES]).await.unwrap()
        }
    }
}

async fn an_oversized_frame_closes_the_connection(t: Transport) {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;

    // An oversized frame after auth: close 1009.
    let mut a = t.connect(&node, &alice.login).await;
    send_frame_of(&mut a, t, MAX_FRAME_BYTES + 1).await;
    expect_close(&mut a, 1009).await;

    // A frame of exactly the limit is read (and refused as a frame, not as a size).
    let mut a = t.connect(&node, &alice.login).await;
    send_frame_at_the_limit(&mut a, t).await;
    a.send_message("alive", to(alice.id), "still open")
        .await
        .unwrap();
}
over_each_transport!(an_oversized_frame_closes_the_connection =>
    an_oversized_frame_closes_the_connection_over_ws_json,
    an_oversized_frame_closes_the_connection_over_ws_binary,
    an_oversized_frame_closes_the_connection_over_quic,
);

async fn silence_before_auth_closes_the_connection(t: Transport) {
    let node = TestNode::start(&[]);
    // No auth within 10 s: close 1008.
    let mut silent = t.connect_unauthenticated(&node).await;
    expect_close(&mut silent, 1008).await;
}
over_each_transport!(silence_before_auth_closes_the_connection =>
    silence_before_auth_closes_the_connection_over_ws_json,
    silence_before_auth_closes_the_connection_over_ws_binary,
    silence_before_auth_closes_the_connection_over_quic,
);

async fn bad_tokens_are_refused_and_a_logout_closes_the_device(t: Transport) {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;

    // A bad token: unauthorized.
    let mut forged = alice.login.token.clone();
    forged.pop();
    for token in ["not-a-token", &forged] {
        let err = t.try_connect(&node, token).await.err().unwrap();
        assert_eq!(err.code(), Some(ErrorCode::Unauthorized), "{token}");
    }

    // A revoked token: logout closes the device's connection and the token stops working.
    let (login2, mut d2) = t.device(&node, &alice).await;
    node.api().logout(&login2.token).await.unwrap();
    let closed = d2.recv(WAIT).await;
    assert!(
        matches!(closed, Err(ClientError::Closed(Some((1008, _))))),
        "{closed:?}"
    );
    let err = t.try_connect(&node, &login2.token).await.err().unwrap();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    let err = node.api().me(&login2.token).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    // The other device is untouched.
    assert_eq!(
        node.api().me(&alice.login.token).await.unwrap().username,
        "alice"
    );
}
over_each_transport!(bad_tokens_are_refused_and_a_logout_closes_the_device =>
    bad_tokens_are_refused_and_a_logout_closes_the_device_over_ws_json,
    bad_tokens_are_refused_and_a_logout_closes_the_device_over_ws_binary,
    bad_tokens_are_refused_and_a_logout_closes_the_device_over_quic,
);
