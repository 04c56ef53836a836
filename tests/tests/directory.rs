//! The partitioned directory (issue 16) on real `chatnode` processes: a user's connected
//! nodes live on the user's two home replicas, and the nodes that watch or route to the
//! user subscribe there. What each device *received* is checked, not only what a node
//! says.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use chat_tests::{
    collect_messages, live_active_members, next_message, to, TestCluster, TestNode, TestUser,
};
use client_proto::client::Connection;
use client_proto::http::FriendState;
use client_proto::{MessageId, PresenceStatus, ServerFrame, UserId};

/// Partitions of a default cluster, and home replicas per user (the directory's defaults).
const PARTITIONS: u32 = 1024;
const COPIES: usize = 2;

async fn befriend(node: &TestNode, a: &TestUser, b: &TestUser) {
    let api = node.api();
    assert_eq!(
        api.befriend(&a.login.token, b.id).await.unwrap(),
        FriendState::Requested
    );
    assert_eq!(
        api.befriend(&b.login.token, a.id).await.unwrap(),
        FriendState::Friends
    );
}

/// Waits for a presence frame about `user` with `status`; how long it took.
async fn wait_presence(c: &mut Connection, user: UserId, status: PresenceStatus) -> Duration {
    let started = Instant::now();
    c.wait_for(Duration::from_secs(30), |f| match f {
        ServerFrame::Presence {
            user_id, status: s, ..
        } if *user_id == user && *s == status => Some(()),
        _ => None,
    })
    .await
    .unwrap_or_else(|e| panic!("no {status:?} for {user}: {e:?}"));
    started.elapsed()
}

/// Presence frames about `user` arriving within `within`.
async fn presence_within(
    c: &mut Connection,
    user: UserId,
    within: Duration,
) -> Vec<PresenceStatus> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return seen;
        }
        match c
            .wait_for(left, |f| match f {
                ServerFrame::Presence {
                    user_id, status, ..
                } if *user_id == user => Some(*status),
                _ => None,
            })
            .await
        {
            Ok(s) => seen.push(s),
            Err(_) => return seen,
        }
    }
}

/// Waits until node `i` sees `live` live active members.
async fn until_members(cluster: &TestCluster, i: usize, live: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (n, view) = live_active_members(&cluster.nodes[i].api()).await;
        if n == live {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {i} sees {n} live members: {view}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn watchers_on_two_nodes_follow_a_user_on_a_third_until_it_is_killed() {
    let mut cluster = TestCluster::start(3, &[]).await;
    let (n0, n1, n2) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let alice = n0.user("alice").await;
    let bob = n1.user("bob").await;
    let carol = n2.user("carol").await;
    befriend(n0, &alice, &bob).await;
    befriend(n2, &carol, &bob).await;
    let mut a = n0.device(&alice).await.1;
    let mut c = n2.device(&carol).await.1;

    // bob comes and goes on node 1: both watchers see each transition.
    let b = n1.device(&bob).await.1;
    for w in [&mut a, &mut c] {
        wait_presence(w, bob.id, PresenceStatus::Online).await;
    }
    b.close().await;
    for w in [&mut a, &mut c] {
        wait_presence(w, bob.id, PresenceStatus::Offline).await;
    }
    let _b = n1.device(&bob).await.1;
    for w in [&mut a, &mut c] {
        wait_presence(w, bob.id, PresenceStatus::Online).await;
    }

    // Node 1 is killed: bob goes offline for both, within the failure detection time.
    cluster.nodes[1].kill();
    let killed = Instant::now();
    for (name, w) in [("node 0", &mut a), ("node 2", &mut c)] {
        wait_presence(w, bob.id, PresenceStatus::Offline).await;
        eprintln!("{name}: bob offline {:?} after the kill", killed.elapsed());
    }
}

#[tokio::test]
async fn a_killed_home_replica_costs_no_presence_and_no_route() {
    let mut cluster = TestCluster::start(3, &[]).await;
    // Node 2 is killed; bob's devices are on node 1 and alice watches from node 0. Pick a
    // bob whose home replicas include node 2 (and so exactly one of the survivors).
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let alice = n0.user("alice").await;
    let mut bob = None;
    for i in 0..40 {
        let u = n1.user(&format!("bob{i}")).await;
        let homes = cluster::directory::home_replicas(u.id.0, PARTITIONS, &[0, 1, 2], COPIES);
        if homes.contains(&2) {
            bob = Some(u);
            break;
        }
    }
    let bob = bob.expect("one of 40 users is homed at node 2");
    befriend(n0, &alice, &bob).await;
    let mut a = n0.device(&alice).await.1;
    let mut b = n1.device(&bob).await.1;
    wait_presence(&mut a, bob.id, PresenceStatus::Online).await;
    let first = a.send_message("m1", to(bob.id), "before").await.unwrap();
    assert_eq!(next_message(&mut b).await.message_id, first.message_id);

    cluster.nodes[2].kill();
    until_members(&cluster, 0, 2).await;
    until_members(&cluster, 1, 2).await;
    // No flap: bob stays online for alice while his entry moves.
    let flaps = presence_within(&mut a, bob.id, Duration::from_secs(3)).await;
    assert!(flaps.is_empty(), "bob flapped: {flaps:?}");

    // Routing: alice's messages reach bob once each.
    let mut sent = Vec::new();
    for i in 0..5 {
        let ack = a
            .send_message(&format!("r{i}"), to(bob.id), "after")
            .await
            .unwrap();
        sent.push(ack.message_id);
    }
    let seen = collect_messages(&mut b, &sent, Duration::from_secs(2)).await;
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");

    // Presence: bob's transitions still reach alice.
    b.close().await;
    wait_presence(&mut a, bob.id, PresenceStatus::Offline).await;
    let (n0, n1) = (&cluster.nodes[0], &cluster.nodes[1]);
    let mut b = n1.device(&bob).await.1;
    wait_presence(&mut a, bob.id, PresenceStatus::Online).await;
    let last = a.send_message("m2", to(bob.id), "after all").await.unwrap();
    let seen = collect_messages(&mut b, &[last.message_id], Duration::from_secs(2)).await;
    assert_eq!(seen.get(&last.message_id), Some(&1));
    let _ = n0;
}

#[tokio::test]
async fn messages_sent_while_a_route_is_stale_are_delivered_exactly_once() {
    let cluster = TestCluster::start(3, &[]).await;
    let (n0, n1, n2) = (&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]);
    let alice = n0.user("alice").await;
    let bob = n1.user("bob").await;
    let mut a = n0.device(&alice).await.1;
    let mut b1 = n1.device(&bob).await.1;
    // Node 0 learns bob's route (node 1 only).
    let ack = a.send_message("w", to(bob.id), "warm").await.unwrap();
    assert_eq!(next_message(&mut b1).await.message_id, ack.message_id);

    // alice sends without pause while bob's second device connects on node 2: for a
    // moment node 0's route is stale (node 1 only). The device never syncs: what it gets
    // comes live, or from the node's own catch-up.
    let sender = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..120 {
            let ack = a
                .send_message(&format!("s{i}"), to(bob.id), "during")
                .await
                .unwrap();
            acked.push((Instant::now(), ack.message_id));
        }
        acked
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut b2 = n2.device(&bob).await.1;
    let connected = Instant::now();
    let acked = sender.await.unwrap();
    let after: Vec<MessageId> = acked
        .iter()
        .filter(|(t, _)| *t > connected)
        .map(|(_, id)| *id)
        .collect();
    assert!(
        after.len() >= 10,
        "only {} sends after the connect; the race was not exercised",
        after.len()
    );
    let all: Vec<MessageId> = acked.iter().map(|(_, id)| *id).collect();
    let on_b1 = collect_messages(&mut b1, &all, Duration::from_secs(2)).await;
    assert!(on_b1.values().all(|n| *n == 1), "node 1: {on_b1:?}");
    let on_b2 = collect_messages(&mut b2, &after, Duration::from_secs(4)).await;
    assert!(
        on_b2.values().all(|n| *n == 1),
        "node 2 duplicated: {on_b2:?}"
    );
}
