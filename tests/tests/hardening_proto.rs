//! Protocol hygiene of issue 13, each an attack on a real node followed by the expected
//! refusal and a check that the node still serves others: binary sends near the old frame
//! limit, malformed `to`, ids that are numbers or signed, HTTP errors that were not JSON,
//! WebSocket protocol violations (close codes 1002 and 1007), per-user rate limits on sends
//! and on `sync`/`history`, sessions outliving their token, and the WebSocket `Origin`.
//! (Bodies that JSON-escape to six times their size run over every transport in
//! `scenarios/escaping.rs`.)

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use chat_tests::{next_message, to, TestNode, TestUser, Transport, WAIT};
use client_proto::client::{ClientError, Connection};
use client_proto::codec::{self, Codec};
use client_proto::limits::{MAX_BODY_BYTES, MAX_FRAME_BYTES};
use client_proto::{ClientFrame, ErrorCode, ServerFrame, UserId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// The next `error` frame: its code, message and retry hint.
async fn next_error(conn: &mut Connection) -> (ErrorCode, String, Option<u64>) {
    conn.wait_for(WAIT, |f| match f {
        ServerFrame::Error {
            code,
            message,
            retry_after_ms,
            ..
        } => Some((*code, message.clone(), retry_after_ms.0)),
        _ => None,
    })
    .await
    .unwrap()
}

/// The node still takes and delivers a message from `from` to `to_user`.
async fn still_serves(node: &TestNode, from: &TestUser, to_user: &TestUser) {
    let mut a = node.connect(&from.login).await;
    let mut b = node.connect(&to_user.login).await;
    let body = format!("still here {}", rand::random::<u32>());
    a.send_message(
        &format!("alive{}", rand::random::<u32>()),
        to(to_user.id),
        &body,
    )
    .await
    .unwrap();
    loop {
        if next_message(&mut b).await.body == body {
            break;
        }
    }
}

/// A binary `send` of exactly `len` bytes on the wire, to `user`.
fn binary_send_of(len: usize, user: UserId) -> Vec<u8> {
    let frame = |body: String| ClientFrame::Send {
        id: "big".into(),
        to: to(user),
        body,
    };
    // The body's length prefix is a varint: find the body length that makes `len` exactly.
    let mut body_len = len - codec::encode(Codec::Binary, &frame(String::new())).len();
    loop {
        let bytes = codec::encode(Codec::Binary, &frame("x".repeat(body_len)));
        match bytes.len().cmp(&len) {
            std::cmp::Ordering::Equal => return bytes,
            std::cmp::Ordering::Greater => body_len -= 1,
            std::cmp::Ordering::Less => body_len += 1,
        }
    }
}

#[tokio::test]
async fn binary_sends_up_to_the_frame_limit_are_judged_by_the_body_rule() {
    let node = TestNode::start(&["--rate-limit-burst", "1000"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    for t in [Transport::WsBinary, Transport::Quic] {
        let mut a = t.connect(&node, &alice.login).await;
        // Where bincode's own limit used to say `invalid_frame`, and up to the frame limit.
        for len in [131_058, 131_065, 131_072, 200_000, MAX_FRAME_BYTES] {
            a.send_bytes(binary_send_of(len, bob.id)).await.unwrap();
            let (code, message, _) = next_error(&mut a).await;
            assert_eq!(code, ErrorCode::MessageTooLarge, "{t} {len}: {message}");
        }
        // A body at the limit is fine.
        a.send_message(&format!("ok-{t}"), to(bob.id), &"x".repeat(MAX_BODY_BYTES))
            .await
            .unwrap();
    }
    still_serves(&node, &bob, &alice).await;
}

#[tokio::test]
async fn a_malformed_field_is_named_and_ids_are_canonical_strings() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut a = Transport::WsJson.connect(&node, &alice.login).await;
    let bob_id = bob.id.0;
    let frames = [
        r#"{"type":"send","id":"m1","to":{"usr":"1"},"body":"x"}"#.to_string(),
        r#"{"type":"send","id":"m2","to":"1","body":"x"}"#.to_string(),
        format!(r#"{{"type":"send","id":"m3","to":{{"user":{bob_id}}},"body":"x"}}"#),
        format!(r#"{{"type":"send","id":"m4","to":{{"user":"+{bob_id}"}},"body":"x"}}"#),
        format!(r#"{{"type":"send","id":"m5","to":{{"user":"0{bob_id}"}},"body":"x"}}"#),
    ];
    for f in &frames {
        a.send_raw(WsMessage::Text(f.clone().into())).await.unwrap();
        let (code, message, _) = next_error(&mut a).await;
        assert_eq!(code, ErrorCode::InvalidFrame, "{f}: {message}");
        assert!(message.contains("send frame: field `to`"), "{f}: {message}");
    }
    for f in [
        r#"{"type":"seen","message_id":5}"#,
        r#"{"type":"sync","after":"+5"}"#,
        r#"{"type":"subscribe_presence","users":[1]}"#,
    ] {
        a.send_raw(WsMessage::Text(f.into())).await.unwrap();
        let (code, message, _) = next_error(&mut a).await;
        assert_eq!(code, ErrorCode::InvalidFrame, "{f}: {message}");
        assert!(message.contains("field `"), "{f}: {message}");
    }
    // Nothing was sent: bob's inbox is empty.
    let (_, mut b) = Transport::WsJson.device(&node, &bob).await;
    assert!(b.sync_all(None, None).await.unwrap().messages.is_empty());

    // Ids in HTTP paths and bodies too.
    let api = node.api();
    let token = alice.login.token.as_str();
    let group = api.create_group(token, "g", &[]).await.unwrap();
    for body in [
        serde_json::json!({ "user_id": bob_id }),
        serde_json::json!({ "user_id": format!("+{bob_id}") }),
    ] {
        let e = api
            .request_raw(
                reqwest::Method::POST,
                &format!("/v1/groups/{}/members", group.group_id),
                Some(token),
                Some(&body),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{body}");
    }
    for path in [
        format!("/v1/groups/+{}", group.group_id),
        format!("/v1/groups/0{}", group.group_id),
        format!("/v1/users/id/+{bob_id}"),
    ] {
        let e = api
            .request_raw(reqwest::Method::GET, &path, Some(token), None::<&()>)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::BadRequest), "{path}");
    }
    still_serves(&node, &alice, &bob).await;
}

/// Sends a raw HTTP request and returns the status, the `Content-Type` and the body.
async fn raw_http(node: &TestNode, request: &str) -> (u16, String, String) {
    let addr = node.http.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let request = request.replace("{host}", addr);
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let content_type = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

fn assert_json_error(what: &str, got: (u16, String, String), status: u16, code: &str) {
    let (s, ct, body) = got;
    assert_eq!(s, status, "{what}: {body}");
    assert!(ct.starts_with("application/json"), "{what}: {ct}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| {
        panic!("{what}: not JSON ({e}): {body}");
    });
    assert_eq!(v["code"], code, "{what}: {body}");
    assert!(v["message"].is_string(), "{what}: {body}");
}

#[tokio::test]
async fn http_errors_are_json_and_bodies_must_be_objects() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let close = "Connection: close\r\n";
    let got = raw_http(
        &node,
        &format!("DELETE /v1/signup HTTP/1.1\r\nHost: {{host}}\r\n{close}\r\n"),
    )
    .await;
    assert_json_error("405", got, 405, "bad_request");
    let got = raw_http(
        &node,
        &format!("GET /v1/ws HTTP/1.1\r\nHost: {{host}}\r\n{close}\r\n"),
    )
    .await;
    assert_json_error("ws without upgrade", got, 400, "bad_request");
    let conversation = client_proto::ConversationId::direct(alice.id, bob.id);
    let got = raw_http(
        &node,
        &format!(
            "GET /v1/conversations/{conversation}/messages?limit=1&limit=2 HTTP/1.1\r\nHost: {{host}}\r\nAuthorization: Bearer {}\r\n{close}\r\n",
            alice.login.token
        ),
    )
    .await;
    assert_json_error("bad query", got, 400, "bad_request");
    let got = raw_http(
        &node,
        &format!("GET /v1/users/%FF%FE HTTP/1.1\r\nHost: {{host}}\r\nAuthorization: Bearer {}\r\n{close}\r\n", alice.login.token),
    )
    .await;
    assert_json_error("bad path", got, 400, "bad_request");
    let got = raw_http(
        &node,
        &format!("GET /nowhere HTTP/1.1\r\nHost: {{host}}\r\n{close}\r\n"),
    )
    .await;
    assert_json_error("no route", got, 404, "not_found");

    // A signup as an array (fields by position) is refused, and nothing is created.
    for (body, what) in [
        (r#"["mallory","password-mallory"]"#, "array"),
        (r#""mallory""#, "string"),
        ("{\"username\":", "truncated"),
    ] {
        let got = raw_http(
            &node,
            &format!(
                "POST /v1/signup HTTP/1.1\r\nHost: {{host}}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{close}\r\n{body}",
                body.len()
            ),
        )
        .await;
        assert_json_error(what, got, 400, "bad_request");
    }
    let e = node
        .api()
        .login("mallory", "password-mallory", None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    still_serves(&node, &alice, &bob).await;
}

/// Opens a WebSocket by hand (so that frames can break the rules) with `origin`, and returns
/// the stream and the status of the answer with its body when it is not 101.
async fn raw_ws(node: &TestNode, origin: Option<&str>) -> (TcpStream, u16, String) {
    let addr = node.http.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.unwrap();
    let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
    let req = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{origin}\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    // Read the head byte by byte (what follows it is WebSocket frames).
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let b = tokio::time::timeout(WAIT, s.read_u8())
            .await
            .unwrap()
            .unwrap();
        head.push(b);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = String::new();
    if status != 101 {
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0);
        let mut buf = vec![0; len];
        s.read_exact(&mut buf).await.unwrap();
        body = String::from_utf8_lossy(&buf).into_owned();
    }
    (s, status, body)
}

/// A frame header byte and payload, masked with a zero key (a valid mask) or not.
fn ws_frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![first, payload.len() as u8 | if masked { 0x80 } else { 0 }];
    if masked {
        f.extend([0, 0, 0, 0]);
    }
    f.extend(payload);
    f
}

/// Reads frames until a close frame and returns its code; `None` if the connection ends
/// without one.
async fn close_code(s: &mut TcpStream) -> Option<u16> {
    loop {
        let mut h = [0u8; 2];
        tokio::time::timeout(WAIT, s.read_exact(&mut h))
            .await
            .ok()?
            .ok()?;
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            len = u64::from(s.read_u16().await.ok()?);
        } else if len == 127 {
            len = s.read_u64().await.ok()?;
        }
        let mut payload = vec![0; len as usize];
        s.read_exact(&mut payload).await.ok()?;
        if h[0] & 0x0f == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

#[tokio::test]
async fn websocket_protocol_violations_are_closed_with_their_code() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let auth = serde_json::json!({"type": "auth", "token": alice.login.token}).to_string();
    let cases: [(&str, Vec<u8>, u16); 4] = [
        (
            "invalid UTF-8",
            ws_frame(0x81, &[b'{', 0xff, 0xfe, b'}'], true),
            1007,
        ),
        ("reserved data opcode", ws_frame(0x83, b"{}", true), 1002),
        ("reserved control opcode", ws_frame(0x8b, b"", true), 1002),
        (
            "unmasked frame",
            ws_frame(0x81, br#"{"type":"heartbeat"}"#, false),
            1002,
        ),
    ];
    for authenticated in [false, true] {
        for (what, frame, code) in &cases {
            let (mut s, status, _) = raw_ws(&node, None).await;
            assert_eq!(status, 101);
            if authenticated {
                let mut f = vec![0x81, 0x80 | 126];
                f.extend((auth.len() as u16).to_be_bytes());
                f.extend([0, 0, 0, 0]);
                f.extend(auth.as_bytes());
                s.write_all(&f).await.unwrap();
            }
            s.write_all(frame).await.unwrap();
            assert_eq!(
                close_code(&mut s).await,
                Some(*code),
                "{what} (authenticated: {authenticated})"
            );
        }
    }
    still_serves(&node, &alice, &bob).await;
}

#[tokio::test]
async fn websocket_origins_are_checked() {
    let node = TestNode::start(&["--allowed-origins", "https://app.example"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let own = format!("http://{}", node.http.trim_start_matches("http://"));
    for (origin, allowed) in [
        (None, true),
        (Some(own.as_str()), true),
        (Some("https://app.example"), true),
        (Some("https://evil.example"), false),
        (Some("http://app.example"), false),
        (Some("null"), false),
    ] {
        let (_s, status, body) = raw_ws(&node, origin).await;
        if allowed {
            assert_eq!(status, 101, "{origin:?}: {body}");
        } else {
            assert_eq!(status, 403, "{origin:?}: {body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["code"], "forbidden", "{body}");
        }
    }
    // A node with the default (its own origin only).
    let plain = TestNode::start(&[]);
    let (_s, status, _) = raw_ws(&plain, Some("https://app.example")).await;
    assert_eq!(status, 403);
    still_serves(&node, &alice, &bob).await;
}

#[tokio::test]
async fn the_send_rate_limit_is_per_user_across_connections() {
    let node = TestNode::start(&["--rate-limit-per-sec", "0.1", "--rate-limit-burst", "20"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(node.connect(&alice.login).await);
    }
    for (c, conn) in conns.iter_mut().enumerate() {
        for i in 0..20 {
            conn.send(&ClientFrame::Send {
                id: format!("c{c}m{i}"),
                to: to(bob.id),
                body: "burst".into(),
            })
            .await
            .unwrap();
        }
    }
    let (mut acked, mut limited) = (0, 0);
    for (c, conn) in conns.iter_mut().enumerate() {
        for i in 0..20 {
            match conn.wait_ack(&format!("c{c}m{i}")).await {
                Ok(_) => acked += 1,
                Err(e) if e.code() == Some(ErrorCode::RateLimited) => limited += 1,
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert!(
        (20..=22).contains(&acked),
        "{acked} acked over 5 connections"
    );
    assert_eq!(acked + limited, 100);
    // The refusal says when to retry.
    conns[0]
        .send(&ClientFrame::Send {
            id: "again".into(),
            to: to(bob.id),
            body: "x".into(),
        })
        .await
        .unwrap();
    let (code, _, retry) = next_error(&mut conns[0]).await;
    assert_eq!(code, ErrorCode::RateLimited);
    assert!(retry.is_some_and(|ms| ms > 0 && ms <= 10_000), "{retry:?}");
    // Another user is not affected.
    still_serves(&node, &bob, &alice).await;
}

#[tokio::test]
async fn sync_and_history_are_rate_limited_per_user_by_requests_and_bytes() {
    let node = TestNode::start(&[
        "--read-rate-limit-per-sec",
        "0.1",
        "--read-rate-limit-burst",
        "10",
        "--read-bytes-per-sec",
        "10000",
        "--read-bytes-burst",
        "250000",
    ]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    // Requests: 30 tiny syncs and histories over two connections; about 10 are answered.
    let mut a1 = node.connect(&alice.login).await;
    let mut a2 = node.connect(&alice.login).await;
    let conversation = client_proto::ConversationId::direct(alice.id, bob.id);
    for _ in 0..15 {
        a1.send(&ClientFrame::Sync {
            after: None,
            limit: None,
        })
        .await
        .unwrap();
        a2.send(&ClientFrame::History {
            conversation,
            before: None,
            limit: Some(1),
        })
        .await
        .unwrap();
    }
    let mut answered = 0;
    let mut limited = 0;
    for conn in [&mut a1, &mut a2] {
        for _ in 0..15 {
            let got = conn
                .wait_for(WAIT, |f| match f {
                    ServerFrame::SyncBatch { .. } | ServerFrame::History { .. } => Some(None),
                    ServerFrame::Error {
                        code,
                        retry_after_ms,
                        ..
                    } => Some(Some((*code, retry_after_ms.0))),
                    _ => None,
                })
                .await
                .unwrap();
            match got {
                None => answered += 1,
                Some((ErrorCode::RateLimited, Some(ms))) if ms > 0 => limited += 1,
                Some(other) => panic!("{other:?}"),
            }
        }
    }
    assert!((10..=12).contains(&answered), "{answered} answered");
    assert_eq!(answered + limited, 30);

    // Bytes: bob has ~200 KB in his inbox; syncing it from scratch again and again is refused
    // once the replies pass the byte allowance, though requests are left.
    let mut b = node.connect(&bob.login).await;
    let mut c = node.connect(&carol.login).await;
    for i in 0..2 {
        c.send_message(&format!("fat{i}"), to(bob.id), &"y".repeat(MAX_BODY_BYTES))
            .await
            .unwrap();
    }
    let mut full_syncs = 0;
    let mut refused = false;
    for _ in 0..6 {
        b.send(&ClientFrame::Sync {
            after: None,
            limit: None,
        })
        .await
        .unwrap();
        let got = b
            .wait_for(WAIT, |f| match f {
                ServerFrame::SyncBatch { done: true, .. } => Some(None),
                ServerFrame::Error { code, .. } => Some(Some(*code)),
                _ => None,
            })
            .await
            .unwrap();
        match got {
            None => full_syncs += 1,
            Some(ErrorCode::RateLimited) => {
                refused = true;
                break;
            }
            Some(other) => panic!("{other:?}"),
        }
    }
    assert!(refused, "{full_syncs} full syncs of 200 KB, never refused");
    assert!((1..=2).contains(&full_syncs), "{full_syncs}");
    // The same allowance covers history over HTTP.
    let e = node
        .api()
        .history(
            &bob.login.token,
            client_proto::ConversationId::direct(bob.id, carol.id),
            None,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RateLimited), "{e}");
    // Others are served.
    still_serves(&node, &carol, &alice).await;
}

#[tokio::test]
async fn a_session_ends_when_its_token_expires() {
    let node = TestNode::start(&["--token-ttl-secs", "3"]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    for t in Transport::ALL {
        let (_, mut conn) = t.device(&node, &alice).await;
        let closed = loop {
            match conn.recv(Duration::from_secs(15)).await {
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(
            matches!(&closed, ClientError::Closed(Some((1008, reason))) if reason == "token expired"),
            "{t}: {closed:?}"
        );
    }
    // A fresh login works (and the node serves others).
    let login = node
        .api()
        .login(&alice.name, &alice.password, None)
        .await
        .unwrap();
    let mut a = node.connect(&login).await;
    let bob_login = node
        .api()
        .login(&bob.name, &bob.password, None)
        .await
        .unwrap();
    let mut b = node.connect(&bob_login).await;
    a.send_message("fresh", to(bob.id), "hello again")
        .await
        .unwrap();
    assert_eq!(next_message(&mut b).await.body, "hello again");
}
