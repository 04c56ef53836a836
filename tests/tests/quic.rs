//! Clients over QUIC (issue 6), what only QUIC has: the client must trust the cluster CA.
//! Everything a QUIC client shares with WebSocket clients (chatting with WebSocket users,
//! limits, bad input, oversized frames, tokens, the auth timeout, the rate limit, sync,
//! history, groups, the client library across a restart) runs over every transport in
//! `scenarios/`.

#![allow(clippy::unwrap_used)]

use chat_tests::{TestNode, Transport};
use client_proto::client::{ConnectOptions, Connection};
use client_proto::codec::{self, Codec};
use client_proto::ClientFrame;

#[tokio::test]
async fn a_client_must_trust_the_cluster_ca_over_quic() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    // Trusting the cluster CA, it connects.
    let conn = Transport::Quic.connect(&node, &alice.login).await;
    assert!(conn.is_quic());
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
