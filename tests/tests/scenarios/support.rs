//! Helpers the scenarios share: read a connection until a sentinel, expect an error, expect
//! the close.

use std::time::Duration;

use chat_tests::{next_message, WAIT};
use client_proto::client::{ClientError, Connection};
use client_proto::{ClientFrame, ErrorCode, Message, ServerFrame};

/// Every `message` frame that arrives until one with `body == sentinel`, sentinel excluded.
pub async fn messages_until(conn: &mut Connection, sentinel: &str) -> Vec<Message> {
    let mut seen = Vec::new();
    loop {
        let m = next_message(conn).await;
        if m.body == sentinel {
            return seen;
        }
        seen.push(m);
    }
}

/// The code of the next `error` frame (other frames are kept for later).
pub async fn next_error(conn: &mut Connection) -> ErrorCode {
    conn.wait_for(WAIT, |f| match f {
        ServerFrame::Error { code, .. } => Some(*code),
        _ => None,
    })
    .await
    .unwrap()
}

/// Sends `frame` and checks that the next `error` has `code`.
pub async fn expect_error(conn: &mut Connection, frame: ClientFrame, code: ErrorCode) {
    conn.send(&frame).await.unwrap();
    let got = next_error(conn).await;
    assert_eq!(got, code, "for {frame:?}");
}

/// Checks that the next thing on `conn`, within 15 s, is the node closing it with `code` (a
/// WebSocket close frame, or the QUIC connection's application close code).
pub async fn expect_close(conn: &mut Connection, code: u16) {
    let closed = conn.recv(Duration::from_secs(15)).await;
    assert!(
        matches!(closed, Err(ClientError::Closed(Some((c, _)))) if c == code),
        "expected close {code}, got {closed:?}"
    );
}
