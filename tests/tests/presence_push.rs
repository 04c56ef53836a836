//! Presence, friends and push notifications (issue 4): real `chatnode` processes, real
//! WebSocket, and a real HTTP receiver standing in for the push provider.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use chat_tests::{TestNode, TestUser};
use client_proto::client::WsConnection;
use client_proto::http::FriendState;
use client_proto::{ClientFrame, PresenceStatus, Recipient, ServerFrame, UserId};

const WAIT: Duration = Duration::from_secs(20);
/// The webhook signing secret of the tests that set one.
const SIGNING_SECRET: &str = "test-push-signing-secret-0123456789";

/// Waits for the next presence or message frame (skipping acks and the like).
async fn next_event(ws: &mut WsConnection) -> ServerFrame {
    ws.wait_for(WAIT, |f| match f {
        ServerFrame::Presence { .. } | ServerFrame::Message { .. } => Some(f.clone()),
        _ => None,
    })
    .await
    .unwrap()
}

fn presence(f: &ServerFrame) -> Option<(UserId, PresenceStatus)> {
    match f {
        ServerFrame::Presence {
            user_id, status, ..
        } => Some((*user_id, *status)),
        _ => None,
    }
}

/// `GET /v1/friends` as `user` sees it.
async fn friends_of(node: &TestNode, user: &TestUser) -> serde_json::Value {
    node.api()
        .request(
            reqwest::Method::GET,
            "/v1/friends",
            Some(&user.login.token),
            None::<&()>,
        )
        .await
        .unwrap()
}

/// Makes `a` and `b` friends: `a` asks, `b` accepts.
async fn befriend(node: &TestNode, a: &TestUser, b: &TestUser) {
    let api = node.api();
    let asked = api.befriend(&a.login.token, b.id).await.unwrap();
    assert_eq!(asked, FriendState::Requested);
    let accepted = api.befriend(&b.login.token, a.id).await.unwrap();
    assert_eq!(accepted, FriendState::Friends);
}

#[tokio::test]
async fn friends_see_transitions_once_per_watching_device() {
    let node = TestNode::start(&[]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    befriend(&node, &alice, &bob).await;
    // Mutual: bob sees alice in his list too.
    let bobs: serde_json::Value = friends_of(&node, &bob).await;
    assert_eq!(bobs[0]["user_id"], alice.id.to_string());

    let mut a = node.connect(&alice.login).await;
    let mut b1 = node.connect(&bob.login).await;
    assert_eq!(
        presence(&next_event(&mut a).await),
        Some((bob.id, PresenceStatus::Online))
    );
    let friends: serde_json::Value = friends_of(&node, &alice).await;
    assert_eq!(friends[0]["status"], "online");

    // A second device, then closing it: bob stays online, alice hears nothing.
    let (_, b2) = node.device(&bob).await;
    b2.close().await;
    b1.send_message("s1", Recipient::User(alice.id), "sentinel")
        .await
        .unwrap();
    let f = next_event(&mut a).await;
    assert!(
        matches!(&f, ServerFrame::Message { message } if message.body == "sentinel"),
        "got {f:?} first"
    );

    // The last device closes: offline, with last_seen stored.
    b1.close().await;
    assert_eq!(
        presence(&next_event(&mut a).await),
        Some((bob.id, PresenceStatus::Offline))
    );
    let friends: serde_json::Value = friends_of(&node, &alice).await;
    assert_eq!(friends[0]["status"], "offline");
    assert!(friends[0]["last_seen"].as_u64().unwrap() > 0);

    // A group co-member can be watched explicitly, and unwatched.
    node.api()
        .create_group(&carol.login.token, "co", &[alice.id])
        .await
        .unwrap();
    a.send(&ClientFrame::SubscribePresence {
        users: vec![carol.id],
    })
    .await
    .unwrap();
    // Frames are handled in order: once this ack is back, the subscription is in place.
    a.send_message("barrier1", Recipient::User(alice.id), "barrier")
        .await
        .unwrap();
    let c = node.connect(&carol.login).await;
    assert_eq!(
        presence(&next_event(&mut a).await),
        Some((carol.id, PresenceStatus::Online))
    );
    a.send(&ClientFrame::UnsubscribePresence {
        users: vec![carol.id],
    })
    .await
    .unwrap();
    a.send_message("barrier2", Recipient::User(alice.id), "barrier")
        .await
        .unwrap();
    c.close().await;
    let b1 = node.connect(&bob.login).await;
    assert_eq!(
        presence(&next_event(&mut a).await),
        Some((bob.id, PresenceStatus::Online)),
        "no carol offline frame"
    );
    drop(b1);

    // Unfriending stops the frames.
    node.api()
        .request_raw(
            reqwest::Method::DELETE,
            &format!("/v1/friends/{}", bob.id),
            Some(&alice.login.token),
            None::<&()>,
        )
        .await
        .unwrap();
    let friends: serde_json::Value = friends_of(&node, &bob).await;
    assert_eq!(friends, serde_json::json!([]));
}

#[tokio::test]
async fn a_silent_device_goes_offline_after_the_heartbeat_timeout() {
    let node = TestNode::start(&[
        "--heartbeat-interval-ms",
        "200",
        "--heartbeat-timeout-ms",
        "1500",
    ]);
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    befriend(&node, &alice, &bob).await;
    let mut a = node.connect(&alice.login).await;
    assert_eq!(a.heartbeat_interval_ms, 200);
    let silent = node.connect(&bob.login).await; // never sends another frame
    let since = Instant::now();
    let mut saw_online = false;
    let went_offline = loop {
        a.send(&ClientFrame::Heartbeat).await.unwrap();
        if let Ok(f) = a.recv(Duration::from_millis(150)).await {
            match presence(&f) {
                Some((u, PresenceStatus::Online)) if u == bob.id => saw_online = true,
                Some((u, PresenceStatus::Offline)) if u == bob.id => break since.elapsed(),
                _ => {}
            }
        }
        assert!(
            since.elapsed() < Duration::from_secs(15),
            "bob never went offline"
        );
    };
    assert!(saw_online);
    println!("silent device reported offline after {went_offline:?} (timeout 1.5 s)");
    assert!(
        went_offline >= Duration::from_millis(1400),
        "dropped before the timeout: {went_offline:?}"
    );
    assert!(
        went_offline < Duration::from_millis(1500 + 2500),
        "dropped too late: {went_offline:?}"
    );
    drop(silent);
}

/// A request's `X-Chat-Signature` header and raw body.
type Signed = (String, Vec<u8>);

/// A webhook receiver: records every body and its `X-Chat-Signature` header; fails the
/// first `fail_first` requests, or all of them while `down` is set.
#[derive(Clone, Default)]
struct Receiver {
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    /// `(signature header, raw body)` of every request.
    signed: Arc<Mutex<Vec<Signed>>>,
    requests: Arc<AtomicUsize>,
    fail_first: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl Receiver {
    async fn start(self) -> String {
        async fn hook(
            State(r): State<Receiver>,
            headers: axum::http::HeaderMap,
            body: axum::body::Bytes,
        ) -> StatusCode {
            let sig = headers
                .get("x-chat-signature")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            r.signed.lock().unwrap().push((sig, body.to_vec()));
            let n = r.requests.fetch_add(1, Ordering::SeqCst);
            if r.down.load(Ordering::SeqCst) || n < r.fail_first.load(Ordering::SeqCst) {
                return StatusCode::INTERNAL_SERVER_ERROR;
            }
            let Ok(json) = serde_json::from_slice(&body) else {
                return StatusCode::BAD_REQUEST;
            };
            r.bodies.lock().unwrap().push(json);
            StatusCode::OK
        }
        let app = axum::Router::new()
            .route("/hook/{device}", axum::routing::post(hook))
            .with_state(self);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/hook")
    }

    /// Checks every request's signature as a receiver would (see the README): HMAC-SHA256
    /// keyed by `key` over `"<t>." + body`, with `t` recent.
    fn assert_all_signed(&self, key: &[u8]) {
        use hmac::Mac;
        let signed = self.signed.lock().unwrap().clone();
        assert!(!signed.is_empty());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        for (header, body) in signed {
            let (t, v1) = header
                .split_once(',')
                .and_then(|(t, v)| Some((t.strip_prefix("t=")?, v.strip_prefix("v1=")?)))
                .unwrap_or_else(|| panic!("bad signature header {header:?}"));
            let t: u64 = t.parse().unwrap();
            assert!(now.abs_diff(t) < 600, "stale timestamp {t}");
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
            mac.update(format!("{t}.").as_bytes());
            mac.update(&body);
            let want: String = mac
                .finalize()
                .into_bytes()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(v1, want, "signature of {}", String::from_utf8_lossy(&body));
        }
    }

    fn delivered(&self) -> Vec<serde_json::Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// Waits until `n` notifications were delivered.
    async fn wait_delivered(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.delivered();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} notifications arrived",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn register_push(
    node: &TestNode,
    user: &TestUser,
    device: client_proto::DeviceId,
    base: &str,
) {
    let body = serde_json::json!({"kind": "webhook", "target": format!("{base}/{device}")});
    node.api()
        .request_raw(
            reqwest::Method::PUT,
            &format!("/v1/devices/{device}/push"),
            Some(&user.login.token),
            Some(&body),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn offline_users_get_one_push_per_target_online_users_none() {
    // The receiver is on loopback: the operator allows it.
    let node = TestNode::start(&[
        "--push-allow-hosts",
        "127.0.0.1",
        "--push-signing-secret",
        SIGNING_SECRET,
    ]);
    let receiver = Receiver::default();
    let base = receiver.clone().start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let carol = node.user("carol").await;
    let bob2 = node
        .api()
        .login(&bob.name, &bob.password, None)
        .await
        .unwrap();
    register_push(&node, &bob, bob.login.device_id, &base).await;
    register_push(&node, &bob, bob2.device_id, &base).await;
    register_push(&node, &carol, carol.login.device_id, &base).await;
    // Bad targets are refused.
    let bad = serde_json::json!({"kind": "webhook", "target": "ftp://x"});
    let e = node
        .api()
        .request_raw(
            reqwest::Method::PUT,
            &format!("/v1/devices/{}/push", bob.login.device_id),
            Some(&bob.login.token),
            Some(&bad),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(client_proto::ErrorCode::BadRequest));

    let mut a = node.connect(&alice.login).await;
    let long = "x".repeat(300);
    let m1 = a
        .send_message("p1", Recipient::User(bob.id), &long)
        .await
        .unwrap();
    let m2 = a
        .send_message("p2", Recipient::User(bob.id), "second")
        .await
        .unwrap();
    let got = receiver.wait_delivered(4).await;
    for m in [m1, m2] {
        let for_m: Vec<_> = got
            .iter()
            .filter(|b| b["message_id"] == m.message_id.to_string())
            .collect();
        assert_eq!(for_m.len(), 2, "one POST per target for {m:?}");
        let devices: std::collections::HashSet<_> =
            for_m.iter().map(|b| b["device_id"].clone()).collect();
        assert_eq!(devices.len(), 2);
    }
    let first = got
        .iter()
        .find(|b| b["message_id"] == m1.message_id.to_string())
        .unwrap();
    assert_eq!(first["preview"].as_str().unwrap().chars().count(), 100);
    assert_eq!(first["sender"], alice.id.to_string());
    assert_eq!(first["recipient"], bob.id.to_string());
    println!("notification body: {first}");

    // bob online: no push for him. carol, offline, is the sentinel.
    let _b = node.connect(&bob.login).await;
    let m3 = a
        .send_message("p3", Recipient::User(bob.id), "you are online")
        .await
        .unwrap();
    a.send_message("p4", Recipient::User(carol.id), "sentinel")
        .await
        .unwrap();
    let got = receiver.wait_delivered(5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got_after = receiver.delivered();
    assert_eq!(got.len(), got_after.len());
    assert!(got_after
        .iter()
        .all(|b| b["message_id"] != m3.message_id.to_string()));
    assert_eq!(got_after.last().unwrap()["recipient"], carol.id.to_string());
    receiver.assert_all_signed(SIGNING_SECRET.as_bytes());
}

#[tokio::test]
async fn failing_receivers_get_the_notification_once_even_across_a_restart() {
    let mut node = TestNode::start(&[
        "--push-retry-base-ms",
        "100",
        "--push-allow-hosts",
        "127.0.0.0/8",
    ]);
    let receiver = Receiver::default();
    receiver.fail_first.store(3, Ordering::SeqCst);
    let base = receiver.clone().start().await;
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    register_push(&node, &bob, bob.login.device_id, &base).await;
    let mut a = node.connect(&alice.login).await;
    let m = a
        .send_message("f1", Recipient::User(bob.id), "after failures")
        .await
        .unwrap();
    let got = receiver.wait_delivered(1).await;
    assert_eq!(got[0]["message_id"], m.message_id.to_string());
    assert_eq!(
        receiver.requests.load(Ordering::SeqCst),
        4,
        "three 500s, then one success"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.delivered().len(), 1, "delivered once");

    // The receiver is down; the node is killed with the notification pending.
    receiver.down.store(true, Ordering::SeqCst);
    let m2 = a
        .send_message("f2", Recipient::User(bob.id), "across a restart")
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while receiver.requests.load(Ordering::SeqCst) < 5 {
        assert!(Instant::now() < deadline, "no attempt was made");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.kill();
    receiver.down.store(false, Ordering::SeqCst);
    node.restart();
    let got = receiver.wait_delivered(2).await;
    assert_eq!(got[1]["message_id"], m2.message_id.to_string());
    // Signed with the key derived from the cluster secret, as `certs push-secret` prints it.
    let out = std::process::Command::new(chat_tests::chatnode_bin())
        .args(["certs", "push-secret", "--cluster-dir"])
        .arg(node.data_dir().join("cluster"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let key = String::from_utf8(out.stdout).unwrap();
    receiver.assert_all_signed(key.trim().as_bytes());
}

/// Webhooks could target the node's own ports and the private network. Now internal
/// targets are refused at registration (400 with a sentence) however the address is
/// written, a host name is checked against every address it resolves to when the POST is
/// made, and the log names a target by scheme and host only. The node serves on.
#[tokio::test]
async fn webhooks_to_internal_addresses_are_refused_without_the_allowlist() {
    let node = TestNode::start(&["--push-retry-base-ms", "100"]);
    let receiver = Receiver::default();
    let base = receiver.clone().start().await;
    let port = base
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/hook")
        .to_string();
    let alice = node.user("alice").await;
    let bob = node.user("bob").await;
    let device = bob.login.device_id;
    for target in [
        format!("http://127.0.0.1:{port}/hook/{device}"),
        format!("http://[::1]:{port}/hook/{device}"),
        format!("http://0x7f000001:{port}/hook/{device}"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://10.0.0.1/".to_string(),
        "http://[fe80::1]/".to_string(),
    ] {
        let body = serde_json::json!({"kind": "webhook", "target": target});
        let e = node
            .api()
            .request_raw(
                reqwest::Method::PUT,
                &format!("/v1/devices/{device}/push"),
                Some(&bob.login.token),
                Some(&body),
            )
            .await
            .unwrap_err();
        assert_eq!(
            e.code(),
            Some(client_proto::ErrorCode::BadRequest),
            "{target}: {e}"
        );
        assert!(e.to_string().contains("public addresses"), "{target}: {e}");
    }

    // A host name that resolves to loopback passes registration and is refused when sent.
    register_push(
        &node,
        &bob,
        device,
        &format!("http://localhost:{port}/hook/SECRET-PATH"),
    )
    .await;
    let mut a = node.connect(&alice.login).await;
    a.send_message("r1", Recipient::User(bob.id), "to a rebinding name")
        .await
        .unwrap();
    let deadline = Instant::now() + WAIT;
    while !node.log_text().contains("push target refused") {
        assert!(
            Instant::now() < deadline,
            "no refusal logged:\n{}",
            node.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        receiver.requests.load(Ordering::SeqCst),
        0,
        "nothing was POSTed"
    );
    let log = node.log_text();
    assert!(
        !log.contains("SECRET-PATH"),
        "the log holds the target's path:\n{log}"
    );
    assert!(log.contains(&format!("http://localhost:{port}")), "{log}");

    // The node serves on: another user's message is stored and delivered.
    let carol = node.user("carol").await;
    let mut c = node.connect(&carol.login).await;
    a.send_message("r2", Recipient::User(carol.id), "still serving")
        .await
        .unwrap();
    let got = next_event(&mut c).await;
    assert!(matches!(got, ServerFrame::Message { .. }), "{got:?}");
}
