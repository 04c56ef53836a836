//! The cluster (issue 5): real `chatnode` processes gossiping on loopback, replicating over
//! mutual-TLS QUIC. What a failure may cost is stated in each test: an acked message never.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chat_tests::{TestCluster, TestNode, TestUser};
use client_proto::client::Connection;
use client_proto::{Message, MessageId, PresenceStatus, Recipient, ServerFrame, UserId};

const WAIT: Duration = Duration::from_secs(20);

async fn next_message(c: &mut Connection) -> Message {
    c.wait_for(WAIT, |f| match f {
        ServerFrame::Message { message } => Some((**message).clone()),
        _ => None,
    })
    .await
    .unwrap()
}

/// Logs `user` in on `node` and connects there.
async fn device_on(node: &TestNode, user: &TestUser) -> Connection {
    node.device(user).await.1
}

/// Collects `message` frames until every id of `want` has arrived, then for `linger` more
/// (long enough for a duplicate to show); returns how often each id came.
async fn collect(
    c: &mut Connection,
    want: &[MessageId],
    linger: Duration,
) -> std::collections::HashMap<MessageId, usize> {
    let mut seen = std::collections::HashMap::new();
    let deadline = Instant::now() + WAIT;
    while !want.iter().all(|id| seen.contains_key(id)) {
        assert!(
            Instant::now() < deadline,
            "only {seen:?} of {want:?} arrived"
        );
        let m = next_message(c).await;
        *seen.entry(m.message_id).or_insert(0) += 1;
    }
    while let Ok(m) = c
        .wait_for(linger, |f| match f {
            ServerFrame::Message { message } => Some(message.message_id),
            _ => None,
        })
        .await
    {
        *seen.entry(m).or_insert(0) += 1;
    }
    seen
}

fn to(u: UserId) -> Recipient {
    Recipient::User(u)
}

#[tokio::test]
async fn messages_presence_and_sync_cross_nodes() {
    let cluster = TestCluster::start(3, &[]).await;
    let [n1, n2, n3] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    // Accounts made on one node work on every node.
    let alice = n1.user("alice").await;
    let bob = n2.user("bob").await;
    assert_eq!(n3.api().me(&bob.login.token).await.unwrap().user_id, bob.id);

    let put = format!("/v1/friends/{}", bob.id);
    n1.api()
        .request_raw(
            reqwest::Method::PUT,
            &put,
            Some(&alice.login.token),
            None::<&()>,
        )
        .await
        .unwrap();
    let mut a = device_on(n1, &alice).await;

    // bob only on node 2: presence crosses to alice on node 1.
    let mut b2 = device_on(n2, &bob).await;
    let p = a
        .wait_for(WAIT, |f| match f {
            ServerFrame::Presence {
                user_id, status, ..
            } if *user_id == bob.id => Some(*status),
            _ => None,
        })
        .await
        .unwrap();
    assert_eq!(p, PresenceStatus::Online);
    let early = a
        .send_message("e1", to(bob.id), "while bob is on node 2")
        .await
        .unwrap();
    assert_eq!(next_message(&mut b2).await.message_id, early.message_id);

    // bob on node 3 too: syncs what came while he was only on node 2.
    let mut b3 = device_on(n3, &bob).await;
    let synced = b3.sync_all(None, None).await.unwrap();
    assert!(synced
        .messages
        .iter()
        .any(|m| m.message_id == early.message_id));

    // alice on node 1 reaches both of bob's devices, once each (live, or by the catch-up
    // for a device whose location had not reached node 1 yet).
    let ack = a
        .send_message("x1", to(bob.id), "to both devices")
        .await
        .unwrap();
    for (name, dev) in [("node 2", &mut b2), ("node 3", &mut b3)] {
        let seen = collect(dev, &[ack.message_id], Duration::from_secs(4)).await;
        assert_eq!(seen.get(&ack.message_id), Some(&1), "{name}: {seen:?}");
    }

    // bob closes both devices: alice sees him offline across nodes.
    b2.close().await;
    b3.close().await;
    let p = a
        .wait_for(WAIT, |f| match f {
            ServerFrame::Presence {
                user_id,
                status: PresenceStatus::Offline,
                ..
            } if *user_id == bob.id => Some(()),
            _ => None,
        })
        .await;
    assert!(p.is_ok(), "{p:?}");
}

#[tokio::test]
async fn a_hundred_member_group_spread_over_three_nodes() {
    let cluster = TestCluster::start(3, &[]).await;
    let users = cluster.nodes[0].users("g", 100).await;
    let ids: Vec<UserId> = users.iter().map(|u| u.id).collect();
    let g = cluster.nodes[1]
        .api()
        .create_group(&users[0].login.token, "spread", &ids[1..])
        .await
        .unwrap()
        .group_id;
    let mut devices = Vec::new();
    for (i, u) in users.iter().enumerate() {
        devices.push(cluster.nodes[i % 3].connect(&u.login).await);
    }
    let ack = devices[0]
        .send_message("g1", Recipient::Group(g), "hello all")
        .await
        .unwrap();
    let ack2 = devices[0]
        .send_message("g2", Recipient::Group(g), "second")
        .await
        .unwrap();
    let want = [ack.message_id, ack2.message_id];
    for (i, d) in devices.iter_mut().enumerate().skip(1) {
        // Linger on the first device only: by then every device's catch-up has run.
        let linger = if i == 1 {
            Duration::from_secs(4)
        } else {
            Duration::from_millis(50)
        };
        let seen = collect(d, &want, linger).await;
        assert!(
            want.iter().all(|id| seen.get(id) == Some(&1)),
            "member {i}: {seen:?}"
        );
        assert_eq!(seen.len(), 2, "member {i}: {seen:?}");
    }
}

#[tokio::test]
async fn sigkill_of_one_node_loses_no_acked_message() {
    let mut cluster = TestCluster::start(3, &["--rate-limit-burst", "1000"]).await;
    let alice = cluster.nodes[0].user("alice").await;
    let bob = cluster.nodes[1].user("bob").await;
    let carol = cluster.nodes[2].user("carol").await;
    let mut a = cluster.nodes[0].connect(&alice.login).await;
    let mut watcher = cluster.nodes[0].connect(&alice.login).await;
    watcher
        .send(&client_proto::ClientFrame::SubscribePresence {
            users: vec![carol.id],
        })
        .await
        .unwrap();
    let mut c = cluster.nodes[2].connect(&carol.login).await;
    let _ = c.recv(Duration::from_millis(10)).await;

    let mut acked = Vec::new();
    for i in 0..30 {
        acked.push(
            a.send_message(&format!("b{i}"), to(bob.id), &format!("before {i}"))
                .await
                .unwrap()
                .message_id,
        );
    }
    // SIGKILL node 3 (carol's): nothing of it is flushed or handed over.
    let killed_at = Instant::now();
    cluster.nodes[2].kill();
    // Sends between users on the surviving nodes keep being acked (W = 2 of 3).
    for i in 0..30 {
        acked.push(
            a.send_message(&format!("a{i}"), to(bob.id), &format!("after {i}"))
                .await
                .unwrap()
                .message_id,
        );
    }
    // carol goes offline within failure detection plus a margin.
    let offline = watcher
        .wait_for(Duration::from_secs(15), |f| match f {
            ServerFrame::Presence {
                user_id,
                status: PresenceStatus::Offline,
                ..
            } if *user_id == carol.id => Some(()),
            _ => None,
        })
        .await;
    assert!(offline.is_ok(), "carol still online: {offline:?}");
    println!("dead node's user offline after {:?}", killed_at.elapsed());

    // Every acked message is on the survivors, from either of them.
    for node in &cluster.nodes[..2] {
        let login = node
            .api()
            .login(&bob.name, &bob.password, None)
            .await
            .unwrap();
        let mut b = node.connect(&login).await;
        let got: HashSet<MessageId> = b
            .sync_all(None, None)
            .await
            .unwrap()
            .messages
            .iter()
            .map(|m| m.message_id)
            .collect();
        let missing: Vec<_> = acked.iter().filter(|id| !got.contains(id)).collect();
        assert!(missing.is_empty(), "missing after the kill: {missing:?}");
    }

    // carol's client finds a live node through /v1/discover and syncs there.
    let found: client_proto::http::NodeInfo = cluster.nodes[0]
        .api()
        .request(reqwest::Method::GET, "/v1/discover", None, None::<&()>)
        .await
        .unwrap();
    assert_ne!(found.node_id, 2, "the dead node is not recommended");
    let survivor = &cluster.nodes[usize::from(found.node_id)];
    let login = survivor
        .api()
        .login(&carol.name, &carol.password, None)
        .await
        .unwrap();
    let mut c = survivor.connect(&login).await;
    c.sync_all(None, None).await.unwrap();
}

#[tokio::test]
async fn two_nodes_racing_for_one_username_one_wins() {
    let cluster = TestCluster::start(3, &[]).await;
    for round in 0..5 {
        let name = format!("racer{round}");
        let (api0, api1) = (cluster.nodes[0].api(), cluster.nodes[1].api());
        let (x, y) = tokio::join!(
            api0.signup(&name, "password-1"),
            api1.signup(&name, "password-2")
        );
        assert_eq!(
            x.is_ok() as u8 + y.is_ok() as u8,
            1,
            "round {round}: {x:?} {y:?}"
        );
        let loser = if x.is_ok() {
            y.unwrap_err()
        } else {
            x.unwrap_err()
        };
        assert_eq!(
            loser.code(),
            Some(client_proto::ErrorCode::Conflict),
            "{loser}"
        );
    }
}
