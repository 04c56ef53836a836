//! The sync contract, checked against the three ways it broke (issue 12), each reproduced on
//! its own, deterministically, with real node processes on their own loopback addresses:
//!
//! 1. a node that was briefly unreachable (paused, or cut off from the other nodes) must
//!    still get, on a device that stayed connected to it, what was acknowledged meanwhile,
//!    without the client doing anything;
//! 2. a retried send that completes its first attempt must reach the connected devices and
//!    every device that syncs from a cursor handed out after the first attempt;
//! 3. a node whose clock is behind must either refuse to issue ids (and say why, also in
//!    `/readyz`) or issue ids that a cursor sync sees and that sort after what came before.
//!
//! The clusters are the chaos suite's (`chat_tests::chaos`): nodes on 127.0.0.10.., one run
//! at a time on a machine (they share the addresses), partitions with iptables between the
//! nodes' addresses only (skipped, with a message, where iptables cannot be used).

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use chat_tests::chaos::cluster::ChaosCluster;
use chat_tests::chaos::firewall::Firewall;
use chat_tests::chaos::lock::RunLock;
use chat_tests::chatnode_bin;
use client_proto::client::{ClientError, Connection, HttpClient};
use client_proto::codec::Codec;
use client_proto::http::LoginResponse;
use client_proto::{ErrorCode, MessageId, Position, Recipient, ServerFrame, UserId};
use cluster::placement::{partition_of, replicas, Partition};

/// Everything a test needs that outlives its cluster: the run lock and the run dir.
struct Run {
    _lock: RunLock,
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Run {
    async fn new() -> Run {
        Run {
            _lock: RunLock::acquire().await.unwrap(),
            dir: tempfile::tempdir().unwrap(),
            bin: chatnode_bin(),
        }
    }

    async fn cluster(&self, n: usize, clock_files: bool, extra: &[&str]) -> ChaosCluster {
        ChaosCluster::start_with(self.dir.path(), &self.bin, n, clock_files, extra)
            .await
            .unwrap()
    }
}

struct User {
    id: UserId,
    name: String,
    login: LoginResponse,
}

async fn signup(api: &HttpClient, name: &str) -> User {
    let password = format!("password-{name}");
    let s = api.signup(name, &password).await.unwrap();
    let login = api.login(name, &password, None).await.unwrap();
    User {
        id: s.user_id,
        name: name.into(),
        login,
    }
}

async fn connect(cluster: &ChaosCluster, node: usize, user: &User) -> Connection {
    let url = HttpClient::new(cluster.http_url(node)).ws_url();
    Connection::connect(&url, &user.login.token, Codec::Json)
        .await
        .unwrap()
}

/// Waits for message `id` on `conn`, skipping other frames; fails if the connection drops
/// (the device must have stayed connected) or it does not come within `within`.
async fn expect_message(conn: &mut Connection, id: MessageId, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: message {id} never arrived");
        match conn.recv(left).await {
            Ok(ServerFrame::Message { message }) if message.message_id == id => return,
            Ok(_) => {}
            Err(ClientError::Timeout(_)) => panic!("{what}: message {id} never arrived"),
            Err(e) => panic!("{what}: the connection dropped: {e}"),
        }
    }
}

/// How a node is made unreachable for a while.
#[derive(Clone, Copy, Debug)]
enum Cut {
    Pause,
    Partition,
}

/// A device connected to node 0 the whole time gets a message acknowledged through node 2
/// while node 0 could not be reached.
async fn a_device_on_an_unreachable_node_gets_what_was_acked_meanwhile(cut: Cut) {
    let firewall = match cut {
        Cut::Partition => match Firewall::probe() {
            Ok(f) => Some(f),
            Err(why) => {
                eprintln!("skipped partition: {why}");
                return;
            }
        },
        Cut::Pause => None,
    };
    let run = Run::new().await;
    let mut cluster = run.cluster(3, false, &[]).await;
    let api = HttpClient::new(cluster.http_url(2));
    let alice = signup(&api, "alice").await;
    let bob = signup(&api, "bob").await;
    let mut b = connect(&cluster, 0, &bob).await;
    let mut a = connect(&cluster, 2, &alice).await;
    // Node 2 knows where bob is: a first message reaches him live.
    let first = a
        .send_message("m0", Recipient::User(bob.id), "before")
        .await
        .unwrap();
    expect_message(&mut b, first.message_id, Duration::from_secs(20), "warm-up").await;

    let others = [cluster.ip(1), cluster.ip(2)];
    let partition = match cut {
        Cut::Pause => {
            cluster.pause(0).unwrap();
            None
        }
        Cut::Partition => Some(
            firewall
                .as_ref()
                .unwrap()
                .isolate(cluster.ip(0), &others)
                .unwrap(),
        ),
    };
    // Long enough for the other nodes to call node 0 dead (nothing is forwarded to it then).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let meanwhile = a
        .send_message(
            "m1",
            Recipient::User(bob.id),
            "while node 0 was unreachable",
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    match partition {
        None => cluster.resume(0).unwrap(),
        Some(p) => p.heal().unwrap(),
    }
    // bob's device did nothing but wait: the node catches it up by itself.
    expect_message(
        &mut b,
        meanwhile.message_id,
        Duration::from_secs(20),
        &format!("after the {cut:?}"),
    )
    .await;
}

#[tokio::test]
async fn a_device_on_a_paused_node_gets_what_was_acked_meanwhile() {
    a_device_on_an_unreachable_node_gets_what_was_acked_meanwhile(Cut::Pause).await;
}

#[tokio::test]
async fn a_device_on_a_cut_off_node_gets_what_was_acked_meanwhile() {
    a_device_on_an_unreachable_node_gets_what_was_acked_meanwhile(Cut::Partition).await;
}

/// The replicas of a user's partition (the inbox and idempotency records live there) on
/// five nodes, as every node computes them.
fn replicas_of(user: UserId) -> Vec<u16> {
    let p: Partition = partition_of(&user.0.to_be_bytes(), 1024);
    replicas(p, &[0, 1, 2, 3, 4], 3)
}

/// alice's first attempt claims its client id (her partition's replicas are all up) but
/// cannot store the message (two of bob's inbox replicas are down): `unavailable`. bob's
/// device syncs after that (its cursor passes the first attempt's id). The retry, once the
/// nodes are back, is acked with the first attempt's id and must reach bob's connected
/// device and a sync from bob's cursor.
#[tokio::test]
async fn a_retry_that_completes_an_earlier_attempt_is_delivered() {
    let run = Run::new().await;
    let mut cluster = run.cluster(5, false, &["--seal-window-ms", "1000"]).await;
    let api = HttpClient::new(cluster.http_url(0));
    // Find alice and bob whose partitions share at most one replica: two of bob's can go
    // down while all of alice's stay up.
    let mut users = Vec::new();
    let (alice, bob, down) = 'found: loop {
        let u = signup(&api, &format!("user{}", users.len())).await;
        for other in &users {
            for (a, b) in [(other, &u), (&u, other)] {
                let (ra, rb) = (replicas_of(a.id), replicas_of(b.id));
                let down: Vec<u16> = rb.iter().copied().filter(|n| !ra.contains(n)).collect();
                if down.len() >= 2 {
                    break 'found (a.clone_user(), b.clone_user(), down[..2].to_vec());
                }
            }
        }
        users.push(u);
        assert!(
            users.len() < 30,
            "no pair of users with the placement needed"
        );
    };
    let up = (0..5u16).find(|n| !down.contains(n)).unwrap() as usize;
    let mut a = connect(&cluster, up, &alice).await;
    let mut b = connect(&cluster, up, &bob).await;
    // A first message: the node learns that bob exists (it does not read his record again,
    // which lives on his partition's replicas).
    let warm = a
        .send_message("warm-up", Recipient::User(bob.id), "hello")
        .await
        .unwrap();
    expect_message(&mut b, warm.message_id, Duration::from_secs(20), "warm-up").await;
    for n in &down {
        cluster.kill(usize::from(*n));
    }
    let refused = a
        .send_message("retried", Recipient::User(bob.id), "first attempt")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Unavailable), "{refused}");
    for n in &down {
        cluster.restart(usize::from(*n)).await.unwrap();
    }
    cluster
        .wait_members(5, Duration::from_secs(60))
        .await
        .unwrap();
    // bob's device syncs once the seal window has passed the first attempt's id (its inbox
    // replicas are back): its cursor is past that id.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let synced_at_ms = cluster::clock::wall_ms();
    let cursor = b.sync_all(None, None).await.unwrap().cursor;
    let cursor = cursor.expect("a cursor");
    let ack = a
        .send_message("retried", Recipient::User(bob.id), "first attempt")
        .await
        .unwrap();
    assert!(
        ack.message_id.unix_ms() < synced_at_ms,
        "the retry completed the first attempt (its id is older than bob's sync)"
    );
    assert!(
        Position(ack.message_id.0) <= cursor,
        "bob's cursor passed the first id"
    );
    expect_message(
        &mut b,
        ack.message_id,
        Duration::from_secs(20),
        "bob's device",
    )
    .await;
    let login = api
        .login(&bob.name, &bob_password(&bob), None)
        .await
        .unwrap();
    let mut fresh = Connection::connect(
        &HttpClient::new(cluster.http_url(up)).ws_url(),
        &login.token,
        Codec::Json,
    )
    .await
    .unwrap();
    let after_cursor = fresh.sync_all(Some(cursor), None).await.unwrap().ids();
    assert!(
        after_cursor.contains(&ack.message_id),
        "a sync from bob's cursor brings the completed message: {after_cursor:?}"
    );
}

fn bob_password(u: &User) -> String {
    format!("password-{}", u.name)
}

impl User {
    fn clone_user(&self) -> User {
        User {
            id: self.id,
            name: self.name.clone(),
            login: self.login.clone(),
        }
    }
}

/// With the clock bound above the skew, a node 30 s behind still issues ids that a cursor
/// sync sees and that sort after what bob had seen.
#[tokio::test]
async fn a_message_through_a_node_whose_clock_is_behind_is_seen_by_cursor_sync() {
    let run = Run::new().await;
    let mut cluster = run
        .cluster(3, true, &["--max-clock-skew-ms", "60000"])
        .await;
    let api = HttpClient::new(cluster.http_url(0));
    let alice = signup(&api, "alice").await;
    let bob = signup(&api, "bob").await;
    cluster.set_clock_offset(2, -30_000).unwrap();
    // The offset is read every half second; let gossip carry the others' clocks to node 2.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let mut a0 = connect(&cluster, 0, &alice).await;
    let mut b = connect(&cluster, 0, &bob).await;
    let m1 = a0
        .send_message(
            "m1",
            Recipient::User(bob.id),
            "via a node with a good clock",
        )
        .await
        .unwrap();
    expect_message(&mut b, m1.message_id, Duration::from_secs(10), "m1").await;
    let cursor = b
        .sync_all(None, None)
        .await
        .unwrap()
        .cursor
        .expect("a cursor");
    b.close().await;

    let mut a2 = connect(&cluster, 2, &alice).await;
    let m2 = a2
        .send_message("m2", Recipient::User(bob.id), "via the node 30 s behind")
        .await
        .unwrap();
    assert!(
        m2.message_id > m1.message_id,
        "m2 ({}) sorts after m1 ({})",
        m2.message_id,
        m1.message_id
    );
    let mut b = connect(&cluster, 0, &bob).await;
    let got = b.sync_all(Some(cursor), None).await.unwrap().ids();
    assert!(
        got.contains(&m2.message_id),
        "sync from the cursor: {got:?}"
    );
}

/// With the default bound (10 s), a node 30 s behind refuses to issue ids, says why, and
/// `/readyz` says so; once its clock is right again it serves.
#[tokio::test]
async fn a_node_whose_clock_is_far_behind_refuses_to_issue_ids_and_says_why() {
    let run = Run::new().await;
    let mut cluster = run.cluster(3, true, &[]).await;
    let api0 = HttpClient::new(cluster.http_url(0));
    let alice = signup(&api0, "alice").await;
    let bob = signup(&api0, "bob").await;
    cluster.set_clock_offset(2, -30_000).unwrap();
    let readyz = format!("{}/readyz", cluster.http_url(2));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let why = loop {
        let resp = http.get(&readyz).send().await.unwrap();
        if resp.status() == 503 {
            break resp.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "node 2 never noticed its clock");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(why.contains("clock") && why.contains("behind"), "{why}");
    let mut a2 = connect(&cluster, 2, &alice).await;
    let refused = a2
        .send_message("skewed", Recipient::User(bob.id), "hello")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::Unavailable), "{refused}");
    assert!(refused.to_string().contains("clock"), "{refused}");
    // The other nodes are fine.
    let mut a0 = connect(&cluster, 0, &alice).await;
    a0.send_message("fine", Recipient::User(bob.id), "hello")
        .await
        .unwrap();
    // The clock is fixed: node 2 serves again (its clock never went back: ids keep growing).
    cluster.set_clock_offset(2, 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if http.get(&readyz).send().await.unwrap().status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "node 2 stayed unready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a2.send_message("skewed", Recipient::User(bob.id), "hello")
        .await
        .unwrap();
}
