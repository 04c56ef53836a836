//! The cluster (issue 5): real `chatnode` processes gossiping on loopback, replicating over
//! mutual-TLS QUIC. What a failure may cost is stated in each test: an acked message never.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chat_tests::{collect_messages, next_message, send_until_acked, stored_ids, to};
use chat_tests::{TestCluster, TestNode, TestUser};
use client_proto::client::{ChatClient, ClientOptions as ChatClientOptions, Connection, Event};
use client_proto::{MessageId, PresenceStatus, Recipient, ServerFrame, UserId};

use chat_tests::WAIT;

/// Logs `user` in on `node` and connects there.
async fn device_on(node: &TestNode, user: &TestUser) -> Connection {
    node.device(user).await.1
}

#[tokio::test]
async fn messages_presence_and_sync_cross_nodes() {
    let cluster = TestCluster::start(3, &[]).await;
    let [n1, n2, n3] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    // Accounts made on one node work on every node.
    let alice = n1.user("alice").await;
    let bob = n2.user("bob").await;
    assert_eq!(n3.api().me(&bob.login.token).await.unwrap().user_id, bob.id);

    // Mutual friends: alice asks on node 1, bob accepts on node 2.
    n1.api().befriend(&alice.login.token, bob.id).await.unwrap();
    let state = n2.api().befriend(&bob.login.token, alice.id).await.unwrap();
    assert_eq!(state, client_proto::http::FriendState::Friends);
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
        let seen = collect_messages(dev, &[ack.message_id], Duration::from_secs(4)).await;
        assert_eq!(seen.get(&ack.message_id), Some(&1), "{name}: {seen:?}");
    }
    // The peer connections' gauges: node 1 forwarded and replicated to both other nodes over
    // QUIC, with a measured round trip; loopback loses nothing to a 4 MiB socket buffer.
    assert_eq!(n1.metric("cluster_peer_connections").await, 2.0);
    assert!(n1.metric("cluster_peer_rtt_seconds_max").await > 0.0);
    assert!(n1.metric("cluster_peer_cwnd_bytes_min").await > 0.0);
    assert_eq!(n1.metric("cluster_peer_reconnects_total").await, 0.0);

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
    let mut cursors = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let mut d = cluster.nodes[i % 3].connect(&u.login).await;
        // Where each member's sync stands before the sends.
        cursors.push(d.sync_all(None, None).await.unwrap().cursor);
        devices.push(d);
    }
    let ack = send_until_acked(&mut devices[0], "g1", Recipient::Group(g), "hello all").await;
    // The largest body allowed: stored once per replica in the group's history, its ~100
    // inbox entries refer to it (they would make ~10 MB per replica as copies).
    let largest: String = (0..client_proto::limits::MAX_BODY_BYTES)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let ack2 = send_until_acked(&mut devices[0], "g2", Recipient::Group(g), &largest).await;
    let want = [ack.message_id, ack2.message_id];
    let bodies = [
        ("hello all", ack.message_id),
        (largest.as_str(), ack2.message_id),
    ];
    for (i, d) in devices.iter_mut().enumerate().skip(1) {
        // Linger on the first device only: by then every device's catch-up has run.
        let linger = if i == 1 {
            Duration::from_secs(4)
        } else {
            Duration::from_millis(50)
        };
        let seen = collect_messages(d, &want, linger).await;
        assert!(
            want.iter().all(|id| seen.get(id) == Some(&1)),
            "member {i}: {seen:?}"
        );
        assert_eq!(seen.len(), 2, "member {i}: {seen:?}");
    }
    // Every member (the sender too) syncs both from where it stood, through the store: the
    // inline body, and the large one read back from the history entry it refers to.
    for (i, d) in devices.iter_mut().enumerate() {
        let synced = d.sync_all(cursors[i], None).await.unwrap();
        for (body, id) in bodies {
            // At least once (a retried or re-positioned write may appear twice; clients
            // drop copies by id), and every copy with the message's body.
            let got: Vec<_> = synced
                .messages
                .iter()
                .filter(|m| m.message_id == id)
                .collect();
            assert!(!got.is_empty(), "member {i}: message {id} not synced");
            for m in got {
                assert!(
                    m.body == body,
                    "member {i}: message {id} synced with another body ({} bytes)",
                    m.body.len()
                );
            }
        }
    }
}

#[tokio::test]
async fn sigkill_of_one_node_loses_no_acked_message() {
    let mut cluster = TestCluster::start(3, &["--rate-limit-burst", "1000"]).await;
    let alice = cluster.nodes[0].user("alice").await;
    let bob = cluster.nodes[1].user("bob").await;
    let carol = cluster.nodes[2].user("carol").await;
    // Presence is for friends: alice and carol befriend each other.
    let api = cluster.nodes[0].api();
    api.befriend(&alice.login.token, carol.id).await.unwrap();
    api.befriend(&carol.login.token, alice.id).await.unwrap();
    let mut a = cluster.nodes[0].connect(&alice.login).await;
    let mut watcher = cluster.nodes[0].connect(&alice.login).await;
    watcher
        .send(&client_proto::ClientFrame::SubscribePresence {
            users: vec![carol.id],
        })
        .await
        .unwrap();
    // carol's client library is on node 3 and knows the other nodes for /v1/discover.
    let mut options = ChatClientOptions::new(cluster.nodes[2].ws_url(), carol.login.token.clone());
    options.discover = vec![cluster.nodes[0].http.clone(), cluster.nodes[1].http.clone()];
    let mut carol_client = ChatClient::start(options);
    assert!(matches!(
        carol_client.next_event().await,
        Some(Event::Connected { node_id: 2 })
    ));

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
    // Sends between users on the surviving nodes keep being acked (W = 2 of 3). What the
    // kill may cost: until the failure detector marks node 3 dead (about 2 s), a send whose
    // idempotency claim needs node 3 as its partition's primary is answered `unavailable`;
    // retried with the same client id (as the client library does) it is acked once.
    let mut unavailable = 0;
    for i in 0..30 {
        let id = format!("a{i}");
        let ack = loop {
            match a.send_message(&id, to(bob.id), &format!("after {i}")).await {
                Ok(ack) => break ack,
                Err(e) if e.code() == Some(client_proto::ErrorCode::Unavailable) => {
                    unavailable += 1;
                    assert!(
                        killed_at.elapsed() < Duration::from_secs(15),
                        "still unavailable: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        acked.push(ack.message_id);
    }
    println!("unavailable answers while node 3 was being detected dead: {unavailable}");
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
        let got: HashSet<MessageId> = node.sync_on_new_device(&bob).await.into_iter().collect();
        let missing: Vec<_> = acked.iter().filter(|id| !got.contains(id)).collect();
        assert!(missing.is_empty(), "missing after the kill: {missing:?}");
    }

    // carol's client finds a live node through /v1/discover by itself, reconnects there and
    // syncs: a message sent to her after the kill reaches her event stream.
    let for_carol = a
        .send_message("c1", to(carol.id), "after the kill")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut reconnected_to = None;
    loop {
        let ev = tokio::time::timeout_at(deadline.into(), carol_client.next_event())
            .await
            .expect("carol's client reconnects and syncs");
        match ev {
            Some(Event::Connected { node_id }) => reconnected_to = Some(node_id),
            Some(Event::Message(m)) if m.message_id == for_carol.message_id => break,
            Some(_) => {}
            None => panic!("carol's client stopped"),
        }
    }
    assert!(matches!(reconnected_to, Some(0 | 1)), "{reconnected_to:?}");
    carol_client.shutdown().await;
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
        let loser = match (x, y) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => e,
            other => panic!("round {round}: {other:?}"),
        };
        assert_eq!(
            loser.code(),
            Some(client_proto::ErrorCode::Conflict),
            "{loser}"
        );
    }
}

#[tokio::test]
async fn with_five_nodes_and_rf_3_every_acked_message_is_on_exactly_three() {
    let mut cluster = TestCluster::start(
        5,
        &["--replication-factor", "3", "--rate-limit-burst", "1000"],
    )
    .await;
    let alice = cluster.nodes[0].user("alice").await;
    let bob = cluster.nodes[3].user("bob").await;
    let mut a = cluster.nodes[1].connect(&alice.login).await;
    let mut acked = Vec::new();
    for i in 0..40 {
        acked.push(
            a.send_message(&format!("r{i}"), to(bob.id), &format!("replicated {i}"))
                .await
                .unwrap()
                .message_id,
        );
    }
    drop(a);
    // An ack needs 2 of 3 replicas; the third copy is written in the background right after.
    // Give it a moment, stop every node cleanly, then read their stores directly.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for node in cluster.nodes.iter_mut() {
        assert_eq!(node.terminate(), Some(0));
    }
    let conv = client_proto::ConversationId::direct(alice.id, bob.id);
    let mut conv_prefix = vec![b'd'];
    if let client_proto::ConversationId::Direct { low, high } = conv {
        conv_prefix.extend_from_slice(&low.0.to_be_bytes());
        conv_prefix.extend_from_slice(&high.0.to_be_bytes());
    }
    let mut inbox_holders = 0;
    let mut history_holders = 0;
    for node in &cluster.nodes {
        let ids_in = |tree: &str, prefix: &[u8]| stored_ids(&node.data_dir(), tree, prefix);
        let inbox = ids_in("inbox", &bob.id.0.to_be_bytes());
        let history = ids_in("history", &conv_prefix);
        for (name, got, holders) in [
            ("inbox", inbox, &mut inbox_holders),
            ("history", history, &mut history_holders),
        ] {
            if !got.is_empty() {
                *holders += 1;
                let missing: Vec<_> = acked.iter().filter(|id| !got.contains(id)).collect();
                assert!(missing.is_empty(), "a {name} replica lacks {missing:?}");
            }
        }
    }
    assert_eq!(
        inbox_holders, 3,
        "bob's inbox partition is on exactly 3 of 5 nodes"
    );
    assert_eq!(
        history_holders, 3,
        "the conversation's partition is on exactly 3 of 5 nodes"
    );
}

/// A base port whose block of 400 (HTTP, QUIC, peer, gossip for up to 100 nodes) looks free.
fn free_base_port() -> u16 {
    for _ in 0..50 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let base = 20_000 + (nanos % 400) as u16 * 100;
        let free = (0..3u16).all(|i| {
            [base + i, base + 100 + i, base + 200 + i, base + 300 + i]
                .iter()
                .all(|p| {
                    std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()
                        && std::net::UdpSocket::bind(("127.0.0.1", *p)).is_ok()
                })
        });
        if free {
            return base;
        }
    }
    panic!("no free block of ports");
}

#[tokio::test]
async fn the_deploy_script_brings_up_three_active_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster.sh");
    let run = |args: &[&str]| {
        std::process::Command::new("bash")
            .arg(&script)
            .args(args)
            .env("CHATNODE", chat_tests::chatnode_bin())
            .output()
            .unwrap()
    };
    let dir_s = dir.path().to_str().unwrap();
    let out = run(&[
        "start",
        "3",
        "--base-port",
        &base.to_string(),
        "--dir",
        dir_s,
    ]);
    let stop = || run(&["stop", "--dir", dir_s]);
    if !out.status.success() {
        stop();
        panic!(
            "start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut ok = true;
    for i in 0..3u16 {
        let api = client_proto::client::HttpClient::new(format!("http://127.0.0.1:{}", base + i));
        let deadline = Instant::now() + WAIT;
        loop {
            let (active, view) = chat_tests::live_active_members(&api).await;
            if active == 3 {
                break;
            }
            if Instant::now() > deadline {
                ok = false;
                eprintln!("node {i} sees {active} active members: {view}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let stopped = stop();
    assert!(ok);
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
}

#[tokio::test]
async fn a_killed_node_rejoins_with_a_new_generation_and_serves_what_it_missed() {
    let mut cluster = TestCluster::start(3, &["--rate-limit-burst", "1000"]).await;
    let alice = cluster.nodes[0].user("alice").await;
    let bob = cluster.nodes[1].user("bob").await;
    let mut a = cluster.nodes[0].connect(&alice.login).await;
    let mut acked = Vec::new();
    for i in 0..10 {
        acked.push(
            a.send_message(&format!("b{i}"), to(bob.id), "before")
                .await
                .unwrap()
                .message_id,
        );
    }
    cluster.nodes[2].kill();
    cluster.wait_members(2).await;
    for i in 0..10 {
        acked.push(
            a.send_message(&format!("d{i}"), to(bob.id), "while down")
                .await
                .unwrap()
                .message_id,
        );
    }
    // Same data dir, same addresses, a new gossip generation: it is live and active again.
    cluster.nodes[2].restart();
    cluster.wait_members(3).await;
    let got: HashSet<MessageId> = cluster.nodes[2]
        .sync_on_new_device(&bob)
        .await
        .into_iter()
        .collect();
    let missing: Vec<_> = acked.iter().filter(|id| !got.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "the rejoined node's sync misses {missing:?}"
    );
    // It came back as a member (no join) and caught up its partitions in the background.
    let deadline = Instant::now() + WAIT;
    while !cluster.nodes[2]
        .log_text()
        .contains("anti-entropy pass done")
    {
        assert!(Instant::now() < deadline, "no catch-up after the restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Its log holds both runs: the first joined the new cluster, the restart did not.
    let log = cluster.nodes[2].log_text();
    assert_eq!(log.matches("joining: pulling").count(), 1, "{log}");
}

/// Sends one message from each user to the next (by index) with client ids `<tag>-<i>`,
/// retrying `unavailable` with the same client id; records each acked id for both ends.
async fn send_round(
    conns: &mut [Connection],
    users: &[TestUser],
    tag: &str,
    acked: &mut std::collections::HashMap<UserId, Vec<MessageId>>,
) {
    for i in 0..users.len() {
        let to_user = &users[(i + 1) % users.len()];
        let client_id = format!("{tag}-{i}");
        let deadline = Instant::now() + WAIT;
        let ack = loop {
            match conns[i].send_message(&client_id, to(to_user.id), tag).await {
                Ok(ack) => break ack,
                Err(e) if e.code() == Some(client_proto::ErrorCode::Unavailable) => {
                    assert!(Instant::now() < deadline, "still unavailable: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("{e}"),
            }
        };
        acked.entry(users[i].id).or_default().push(ack.message_id);
        acked.entry(to_user.id).or_default().push(ack.message_id);
    }
}

#[tokio::test]
async fn a_node_that_joins_pulls_its_partitions_before_serving_them() {
    // RF=2, so W=2 and R=1, and a read asks this node first: a node that joined without
    // pulling would answer sync for the partitions it took over from its own empty store.
    // With 8 users, some inbox partition moves to the new node but for odds of 1 in 3^8.
    let extra = ["--replication-factor", "2", "--rate-limit-burst", "1000"];
    let mut cluster = TestCluster::start(2, &extra).await;
    let users = cluster.nodes[0].users("joiner", 8).await;
    let mut conns = Vec::new();
    for u in &users {
        conns.push(cluster.nodes[0].connect(&u.login).await);
    }
    let mut acked = std::collections::HashMap::new();
    for round in 0..5 {
        send_round(&mut conns, &users, &format!("before{round}"), &mut acked).await;
    }

    // Node 2 joins while messages keep being sent (those need the quorums of the current
    // and the future replica sets).
    let started = Instant::now();
    let joiner = cluster.add_node(&extra);
    let mut during = 0;
    loop {
        send_round(&mut conns, &users, &format!("during{during}"), &mut acked).await;
        during += 1;
        let (active, view) = chat_tests::live_active_members(&cluster.nodes[joiner].api()).await;
        if active == 3 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "joined in {:?}, {during} rounds sent meanwhile",
        started.elapsed()
    );
    cluster.wait_members(3).await;
    send_round(&mut conns, &users, "after", &mut acked).await;

    // Every acked message, before, during and after the join, is returned by sync on the
    // node that joined.
    for u in &users {
        let got: HashSet<MessageId> = cluster.nodes[joiner]
            .sync_on_new_device(u)
            .await
            .into_iter()
            .collect();
        let missing: Vec<_> = acked[&u.id].iter().filter(|id| !got.contains(id)).collect();
        assert!(missing.is_empty(), "{} misses {missing:?}", u.name);
    }
    let log = cluster.nodes[joiner].log_text();
    assert!(log.contains("join: every partition pulled"), "{log}");
}

#[tokio::test]
async fn a_node_restarted_on_an_empty_disk_joins_again_and_pulls_what_it_lost() {
    let mut cluster = TestCluster::start(3, &["--rate-limit-burst", "1000"]).await;
    let alice = cluster.nodes[0].user("alice").await;
    let bob = cluster.nodes[1].user("bob").await;
    let mut a = cluster.nodes[0].connect(&alice.login).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let ack = a.send_message(&format!("k{i}"), to(bob.id), "kept").await;
        acked.push(ack.unwrap().message_id);
    }
    // The disk of node 2 is lost: SIGKILL, wipe its data dir, restart it with the same id.
    cluster.nodes[2].kill();
    std::fs::remove_dir_all(cluster.nodes[2].data_dir()).unwrap();
    cluster.wait_members(2).await;
    for i in 0..10 {
        let ack = a
            .send_message(&format!("w{i}"), to(bob.id), "while down")
            .await;
        acked.push(ack.unwrap().message_id);
    }
    cluster.nodes[2].restart();
    // It is no member's replica until it has pulled: meanwhile it counts as down, and sends
    // keep being acked by the other two.
    for i in 0..10 {
        let ack = a
            .send_message(&format!("j{i}"), to(bob.id), "while joining")
            .await;
        acked.push(ack.unwrap().message_id);
    }
    cluster.wait_members(3).await;
    let log = cluster.nodes[2].log_text();
    assert_eq!(log.matches("joined: active").count(), 2, "{log}");
    // Its own store holds every acked message of bob's inbox: the 20 from before the loss
    // can only have come from the pull (hints cover only what was sent while it was away).
    assert_eq!(cluster.nodes[2].terminate(), Some(0));
    let held = stored_ids(
        &cluster.nodes[2].data_dir(),
        "inbox",
        &bob.id.0.to_be_bytes(),
    );
    let missing: Vec<_> = acked[..20].iter().filter(|id| !held.contains(id)).collect();
    assert!(missing.is_empty(), "the rejoined node lacks {missing:?}");
}

#[tokio::test]
async fn a_node_without_a_read_quorum_to_pull_from_stays_joining_and_not_ready() {
    // RF=3 on 3 nodes: every partition needs 2 replicas' complete answers. With two of the
    // three killed, a fourth node can pull from one only, so it must never turn active.
    let mut cluster = TestCluster::start(3, &[]).await;
    cluster.nodes[1].kill();
    cluster.nodes[2].kill();
    cluster.wait_members(1).await;
    let joiner = cluster.add_node(&[]);
    let api = cluster.nodes[joiner].api();
    let url = format!("{}/readyz", cluster.nodes[joiner].http);
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut saw_joining = false;
    while Instant::now() < deadline {
        let (_, view) = chat_tests::live_active_members(&api).await;
        let me = view["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["node_id"] == joiner)
            .cloned()
            .unwrap_or_default();
        assert_ne!(
            me["state"], "active",
            "joined without a read quorum: {view}"
        );
        saw_joining |= me["state"] == "joining";
        let ready = reqwest::get(&url).await.unwrap();
        assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ready.text().await.unwrap(), "joining");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(saw_joining);
    let log = cluster.nodes[joiner].log_text();
    assert!(log.contains("pulling again"), "{log}");
}

/// A node started with another cluster secret than its seed's (its own fresh cluster dir)
/// used to form a one-node cluster of its own, silently. Now the seed answers its sealed
/// gossip with a refusal, and the node exits non-zero saying why; the cluster serves on.
#[tokio::test]
async fn a_node_with_the_wrong_secret_refuses_to_start_and_says_why() {
    let cluster = TestCluster::start(1, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let gossip = format!("127.0.0.1:{}", chat_tests::free_udp_port());
    let peer = format!("127.0.0.1:{}", chat_tests::free_udp_port());
    let mut child = std::process::Command::new(chat_tests::chatnode_bin())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--node-id", "1", "--seed", &cluster.nodes[0].gossip])
        .args(["--http-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
        .args(["--gossip-addr", &gossip, "--peer-addr", &peer])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the node with the wrong secret kept running:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("cluster secret differs"),
        "stderr: {stderr}\nstdout: {stdout}"
    );
    assert!(
        !stdout
            .lines()
            .any(|l| client_proto::ReadyLine::parse(l).is_some()),
        "it never served: {stdout}"
    );
    // The cluster is untouched and serves.
    let (live, view) = chat_tests::live_active_members(&cluster.nodes[0].api()).await;
    assert_eq!(live, 1, "{view}");
    cluster.nodes[0].user("still-serving").await;
}
