//! Operating a cluster (issue 15): decommission a live node under load, remove a dead one,
//! replace a dead one with an empty node, all through `chatnode admin` against real
//! processes. What each may cost is stated per test: an acked message never, a send refused
//! never (decommission).

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use chat_tests::{to, TestCluster, TestUser};
use client_proto::MessageId;

const FLAGS: &[&str] = &[
    "--replication-factor",
    "3",
    "--rate-limit-burst",
    "100000",
    "--rate-limit-per-sec",
    "100000",
];

/// What a steady sender saw.
#[derive(Default)]
struct Sent {
    acked: BTreeMap<u64, Vec<MessageId>>,
    refused: Vec<String>,
}

/// Sends from `from` (connected to node `at`) to each of `to_users` in turn, one at a time,
/// until `stop`; records every ack per recipient and every refusal.
fn steady_sender(
    cluster: &TestCluster,
    at: usize,
    from: &TestUser,
    to_users: Vec<u64>,
    stop: tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<Sent> {
    let node_url = cluster.nodes[at].http.clone();
    let login = from.login.clone();
    tokio::spawn(async move {
        let api = client_proto::client::HttpClient::new(node_url);
        let mut conn = client_proto::client::WsConnection::connect(
            &api.ws_url(),
            &login.token,
            client_proto::codec::Codec::Json,
        )
        .await
        .unwrap();
        let mut sent = Sent::default();
        for i in 0u64.. {
            if stop.is_cancelled() {
                break;
            }
            let user = to_users[i as usize % to_users.len()];
            let client_id = format!("s{i}");
            match conn
                .send_message(&client_id, to(client_proto::UserId(user)), "steady")
                .await
            {
                Ok(ack) => sent.acked.entry(user).or_default().push(ack.message_id),
                Err(e) => sent.refused.push(format!("{client_id}: {e}")),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    })
}

/// The message ids in `user`'s inbox of a stopped node's store.
fn inbox_ids(data_dir: &std::path::Path, user: u64) -> HashSet<MessageId> {
    chat_tests::stored_ids(data_dir, "inbox", &user.to_be_bytes())
}

/// `chatnode admin status` on node `at`, asked again (for up to 15 s) until it says `what`.
async fn removal_seen(cluster: &TestCluster, at: usize, what: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let status = ok(&cluster.admin(at, &["status"]));
        if status.contains(what) || std::time::Instant::now() > deadline {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn ok(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "chatnode admin failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Four nodes, RF 3, with alice on node 0 sending steadily to six recipients spread over
/// nodes 0 to 2.
struct Loaded {
    cluster: TestCluster,
    alice: TestUser,
    rcpts: Vec<TestUser>,
    stop: tokio_util::sync::CancellationToken,
    sender: tokio::task::JoinHandle<Sent>,
}

async fn loaded_cluster() -> Loaded {
    let cluster = TestCluster::start(4, FLAGS).await;
    let alice = cluster.nodes[0].user("alice").await;
    let rcpts = recipients(&cluster, 6).await;
    let ids: Vec<u64> = rcpts.iter().map(|u| u.id.0).collect();
    let stop = tokio_util::sync::CancellationToken::new();
    let sender = steady_sender(&cluster, 0, &alice, ids, stop.clone());
    Loaded {
        cluster,
        alice,
        rcpts,
        stop,
        sender,
    }
}

async fn recipients(cluster: &TestCluster, n: usize) -> Vec<TestUser> {
    let mut users = Vec::new();
    for i in 0..n {
        users.push(cluster.nodes[i % 3].user(&format!("rcpt{i}")).await);
    }
    users
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_decommissioned_under_load_hands_over_every_message_and_stops_by_itself() {
    let Loaded {
        mut cluster,
        alice,
        rcpts: _,
        stop,
        sender,
    } = loaded_cluster().await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Refused: removing a live node.
    let out = cluster.admin(0, &["remove", "3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("alive"));
    // Unauthenticated admin requests are refused.
    let anon = reqwest::Client::new()
        .post(format!("{}/v1/admin/decommission", cluster.nodes[3].http))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    let forged = reqwest::Client::new()
        .get(format!("{}/v1/admin/status", cluster.nodes[3].http))
        .bearer_auth("0".repeat(64))
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    // A client's token is no admin token either.
    let as_client = reqwest::Client::new()
        .post(format!("{}/v1/admin/drain", cluster.nodes[3].http))
        .bearer_auth(&alice.login.token)
        .send()
        .await
        .unwrap();
    assert_eq!(as_client.status(), 401);

    let said = ok(&cluster.admin(3, &["decommission", "--wait"]));
    assert!(said.contains("decommissioning"), "{said}");
    assert!(said.contains("holds no partitions any more"), "{said}");
    // It stops by itself, cleanly.
    let code = tokio::task::block_in_place(|| cluster.nodes[3].wait_exit(Duration::from_secs(60)));
    assert_eq!(code, Some(0), "{}", cluster.nodes[3].log_text());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let sent = sender.await.unwrap();
    let acked: usize = sent.acked.values().map(Vec::len).sum();
    assert!(
        sent.refused.is_empty(),
        "refused during the move: {:?}",
        sent.refused
    );
    assert!(acked > 50, "only {acked} sends acked");

    let status = removal_seen(&cluster, 0, "removed for good: [3]").await;
    assert!(status.contains("removed for good: [3]"), "{status}");
    cluster.wait_members(3).await;
    // Every acked message is on all 3 remaining nodes (RF 3 of 3).
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..3 {
        assert_eq!(cluster.nodes[i].terminate(), Some(0));
        let data_dir = cluster.nodes[i].data_dir();
        for (user, want) in &sent.acked {
            let held = inbox_ids(&data_dir, *user);
            let missing: Vec<_> = want.iter().filter(|id| !held.contains(id)).collect();
            assert!(
                missing.is_empty(),
                "node {i} lacks {missing:?} of user {user}"
            );
        }
    }
}

/// Reads every acked message of each recipient on a new device at node `at`, by sync.
async fn assert_all_readable(
    cluster: &TestCluster,
    at: usize,
    rcpts: &[TestUser],
    acked: &BTreeMap<u64, Vec<MessageId>>,
) {
    for user in rcpts {
        let got: HashSet<MessageId> = cluster.nodes[at]
            .sync_on_new_device(user)
            .await
            .into_iter()
            .collect();
        let want = acked.get(&user.id.0).cloned().unwrap_or_default();
        let missing: Vec<_> = want.iter().filter(|id| !got.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "node {at} cannot read {missing:?} of {}",
            user.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_removed_for_good_leaves_every_message_readable_with_any_node_down() {
    let Loaded {
        mut cluster,
        alice: _,
        rcpts,
        stop,
        sender,
    } = loaded_cluster().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.nodes[3].kill();
    cluster.wait_members(3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let said = ok(&cluster.admin(1, &["remove", "3", "--wait"]));
    assert!(said.contains("holds no partitions any more"), "{said}");
    stop.cancel();
    let sent = sender.await.unwrap();
    let acked: usize = sent.acked.values().map(Vec::len).sum();
    assert!(acked > 50, "only {acked} sends acked");
    // A send may be refused while node 3 is dead and not yet removed: its partitions' writes
    // need 2 of the other 2 replicas. None may be lost: only acked ones are checked.
    // `--wait` followed node 1; node 0 learns of the removal by gossip, a moment later.
    let status = removal_seen(&cluster, 0, "removed for good: [3]").await;
    assert!(status.contains("removed for good: [3]"), "{status}");

    // With any single node down, every acked message is still readable.
    for down in 0..3 {
        assert_eq!(cluster.nodes[down].terminate(), Some(0));
        let at = (down + 1) % 3;
        assert_all_readable(&cluster, at, &rcpts, &sent.acked).await;
        cluster.nodes[down].restart();
        cluster.wait_members(3).await;
    }
    // The removed id cannot come back.
    let out = cluster.admin(0, &["replace", "3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("removed for good"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_node_replaces_a_dead_one_and_serves_its_partitions() {
    let Loaded {
        mut cluster,
        alice: _,
        rcpts,
        stop,
        sender,
    } = loaded_cluster().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Node 3's machine is lost, disk and all.
    cluster.nodes[3].kill();
    cluster.wait_members(3).await;
    let said = ok(&cluster.admin(0, &["replace", "3"]));
    assert!(said.contains("--node-id 3"), "{said}");
    cluster.start_replacement(3, 3, 0, FLAGS);
    let said = ok(&cluster.admin(0, &["replace", "3", "--wait"]));
    assert!(said.contains("is back, active"), "{said}");
    cluster.wait_members(4).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let sent = sender.await.unwrap();
    let log = cluster.nodes[3].log_text();
    assert!(log.contains("joined: active"), "{log}");
    // It serves its partitions: with one old node down at a time, every partition whose set
    // holds node 3 and the downed node needs node 3 for a read quorum.
    for down in [1, 2] {
        assert_eq!(cluster.nodes[down].terminate(), Some(0));
        assert_all_readable(&cluster, 0, &rcpts, &sent.acked).await;
        cluster.nodes[down].restart();
        cluster.wait_members(4).await;
    }
}
