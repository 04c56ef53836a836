//! Draining a node before it stops (issue 15): SIGTERM makes a node refuse new client
//! connections, tell every connected device where to go (`draining` with `reconnect_to`),
//! wait for them to move, close what stays with 1001, and only then stop.
//!
//! - [`rolling_restart_under_load_loses_nothing_and_refuses_nothing`]: a 3-node cluster
//!   (RF = 3) under a steady send load from `ChatClient`s over the three transports; every
//!   node in turn is drained (SIGTERM), restarted on its data dir and ports and waited for
//!   (`/readyz` 200). Every acknowledged send reaches every device of its recipient (what the
//!   devices *received*), no send is refused (not even `unavailable`, which the library would
//!   retry: its counters see it), and every device moved only because of a `draining` hint,
//!   to the node the hint named.
//! - [`a_draining_node_refuses_newcomers_and_closes_stayers_with_1001`]: what a client that
//!   ignores the hint sees: the hint (the other node's address for its transport), new
//!   connections refused, sends still answered, then a 1001 close on WebSocket and QUIC.
//!
//! No timing is asserted beyond generous bounds (the machine is slow and shared): waits are
//! on conditions with deadlines.

#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chat_tests::{live_active_members, TestCluster, Transport};
use client_proto::client::{
    ChatClient, ChatSender, ClientError, ClientOptions, ClientStats, ConnectOptions, Connection,
    Event,
};
use client_proto::{MessageId, Recipient, ServerFrame, UserId};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The nodes' drain timeout. Devices that follow the hint leave within a second or two; the
/// timeout only bounds a drain whose devices do not.
const DRAIN_TIMEOUT_SECS: u64 = 30;
/// Margin on top of the drain timeout for a node to finish stopping (mesh, store flush).
const EXIT_MARGIN: Duration = Duration::from_secs(60);
/// Users in the rolling-restart test; each has two devices.
const USERS: usize = 6;
/// Sends of one user in flight at once.
const SENDS_IN_FLIGHT: usize = 4;
/// Pause between one user's sends.
const SEND_EVERY: Duration = Duration::from_millis(150);
/// How long the load runs on the whole cluster before each drain (and after the last).
const LOAD_BETWEEN: Duration = Duration::from_secs(4);

/// What one device's `ChatClient` did.
#[derive(Default)]
struct DeviceLog {
    received: HashSet<MessageId>,
    /// `Connected` node ids and `Moving` targets, in order.
    links: Vec<Link>,
    /// `Disconnected` reasons and `Error` events.
    troubles: Vec<String>,
}

#[derive(Clone, Debug)]
enum Link {
    Connected(u16),
    Moving(Option<String>),
}

/// One device: a `ChatClient` whose events a task records.
struct Device {
    user: usize,
    transport: Transport,
    sender: ChatSender,
    log: Arc<Mutex<DeviceLog>>,
    /// Ends the event task, which returns the client's counters.
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<ClientStats>,
}

fn start_device(user: usize, transport: Transport, mut client: ChatClient) -> Device {
    let log = Arc::new(Mutex::new(DeviceLog::default()));
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let sender = client.sender();
    let task_log = log.clone();
    let task = tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                _ = &mut stopped => break,
                ev = client.next_event() => ev,
            };
            let Some(ev) = ev else { break };
            let mut log = task_log.lock().unwrap();
            match ev {
                Event::Message(m) => {
                    log.received.insert(m.message_id);
                }
                Event::Connected { node_id } => log.links.push(Link::Connected(node_id)),
                Event::Moving { to } => log.links.push(Link::Moving(to)),
                Event::Disconnected { reason } => log.troubles.push(format!("lost: {reason}")),
                Event::Error(e) => log.troubles.push(format!("error: {e}")),
                Event::Presence { .. } => {}
            }
        }
        let stats = client.stats();
        client.shutdown().await;
        stats
    });
    Device {
        user,
        transport,
        sender,
        log,
        stop,
        task,
    }
}

/// An acknowledged send.
struct Acked {
    to: usize,
    message_id: MessageId,
}

/// One user's steady load: a send every [`SEND_EVERY`], at most [`SENDS_IN_FLIGHT`] waiting
/// for their acks, until `stop`; then waits for the ones in flight.
async fn load(
    from: usize,
    to: (usize, UserId),
    sender: ChatSender,
    mut stop: watch::Receiver<bool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    refused: Arc<Mutex<Vec<String>>>,
) -> usize {
    let mut inflight = JoinSet::new();
    let mut n = 0usize;
    while !*stop.borrow() {
        while inflight.len() >= SENDS_IN_FLIGHT {
            inflight.join_next().await;
        }
        let id = format!("u{from}-{n}");
        n += 1;
        let (sender, acked, refused) = (sender.clone(), acked.clone(), refused.clone());
        inflight.spawn(async move {
            match sender
                .send_with_id(
                    id.clone(),
                    Recipient::User(to.1),
                    format!("{id} for u{}", to.0),
                )
                .await
            {
                Ok(ack) => acked.lock().unwrap().push(Acked {
                    to: to.0,
                    message_id: ack.message_id,
                }),
                Err(e) => refused.lock().unwrap().push(format!("{id}: {e}")),
            }
        });
        tokio::select! {
            _ = tokio::time::sleep(SEND_EVERY) => {}
            _ = stop.changed() => {}
        }
    }
    while inflight.join_next().await.is_some() {}
    n
}

/// Waits until every node sees all three members live and active (with no pending joiner).
async fn wait_all_active(cluster: &TestCluster, within: Duration) {
    let deadline = Instant::now() + within;
    for node in &cluster.nodes {
        loop {
            let (n, view) = live_active_members(&node.api()).await;
            if n == cluster.nodes.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} sees {n} live active members: {view}",
                node.http
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_under_load_loses_nothing_and_refuses_nothing() {
    let timeout = DRAIN_TIMEOUT_SECS.to_string();
    let mut cluster = TestCluster::start(
        3,
        &[
            "--replication-factor",
            "3",
            "--drain-timeout-secs",
            &timeout,
        ],
    )
    .await;
    let ca = std::fs::read(cluster.cluster_dir.path().join("ca.pem")).unwrap();
    let discover: Vec<String> = cluster.nodes.iter().map(|n| n.http.clone()).collect();

    // Six users, two devices each, spread over the three nodes and the three transports:
    // device d is on node d % 3 over transport (d / 3) % 3.
    let mut users = Vec::new();
    for u in 0..USERS {
        users.push(cluster.nodes[u % 3].user(&format!("drainer{u}")).await);
    }
    let mut devices = Vec::new();
    for d in 0..USERS * 2 {
        let (user, node) = (d / 2, d % 3);
        let transport = Transport::ALL[(d / 3) % 3];
        let u = &users[user];
        let login = cluster.nodes[node]
            .api()
            .login(&u.name, &u.password, None)
            .await
            .unwrap();
        let mut options = ClientOptions::new(transport.url(&cluster.nodes[node]), login.token);
        options.connect = ConnectOptions {
            codec: transport.codec(),
            ca_pem: transport.is_quic().then(|| ca.clone()),
        };
        options.discover = discover.clone();
        devices.push(start_device(user, transport, ChatClient::start(options)));
    }
    // Every device is connected before the load starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    while devices.iter().any(|d| {
        !d.log
            .lock()
            .unwrap()
            .links
            .iter()
            .any(|l| matches!(l, Link::Connected(_)))
    }) {
        assert!(Instant::now() < deadline, "devices did not connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The load: user u sends to user u + 1 (whose devices are on other nodes than u's
    // sending device), from u's first device.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let refused = Arc::new(Mutex::new(Vec::new()));
    let (stop_load, stop_rx) = watch::channel(false);
    let mut senders = JoinSet::new();
    for u in 0..USERS {
        let to = (u + 1) % USERS;
        senders.spawn(load(
            u,
            (to, users[to].id),
            devices[u * 2].sender.clone(),
            stop_rx.clone(),
            acked.clone(),
            refused.clone(),
        ));
    }

    // The rolling restart: drain, restart, wait for ready; one node at a time.
    let started = Instant::now();
    for i in 0..cluster.nodes.len() {
        tokio::time::sleep(LOAD_BETWEEN).await;
        let t = Instant::now();
        cluster.nodes[i].sigterm();
        let exit = cluster.nodes[i]
            .exit_within(Duration::from_secs(DRAIN_TIMEOUT_SECS) + EXIT_MARGIN)
            .await;
        assert_eq!(
            exit,
            Some(Some(0)),
            "node {i} did not stop cleanly within the drain timeout + {EXIT_MARGIN:?}"
        );
        println!("node {i} drained and stopped in {:?}", t.elapsed());
        let log = cluster.nodes[i].log_text();
        if let Some(line) = log.lines().rev().find(|l| l.contains("drained")) {
            println!("  {line}");
        }
        let t = Instant::now();
        tokio::task::block_in_place(|| cluster.nodes[i].restart());
        assert!(
            cluster.nodes[i].wait_ready(Duration::from_secs(180)).await,
            "node {i} did not become ready after its restart"
        );
        wait_all_active(&cluster, Duration::from_secs(180)).await;
        println!("node {i} restarted and ready in {:?}", t.elapsed());
    }
    tokio::time::sleep(LOAD_BETWEEN).await;
    stop_load.send(true).unwrap();
    let mut sent = 0;
    let all_answered = tokio::time::timeout(Duration::from_secs(180), async {
        while let Some(n) = senders.join_next().await {
            sent += n.unwrap();
        }
    })
    .await;
    assert!(
        all_answered.is_ok(),
        "some sends were never answered (neither acked nor refused)"
    );
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    println!(
        "rolling restart took {:?}; {sent} sends, {} acked",
        started.elapsed(),
        acked.len()
    );

    // Every acked send reaches every device of its recipient (they dedup by message id).
    let expected: Vec<(usize, HashSet<MessageId>)> = devices
        .iter()
        .enumerate()
        .map(|(d, dev)| {
            let want = acked
                .iter()
                .filter(|a| a.to == dev.user)
                .map(|a| a.message_id)
                .collect();
            (d, want)
        })
        .collect();
    let missing = |devices: &[Device]| -> Vec<(usize, usize)> {
        expected
            .iter()
            .filter_map(|(d, want)| {
                let got = &devices[*d].log.lock().unwrap().received;
                let n = want.iter().filter(|id| !got.contains(id)).count();
                (n > 0).then_some((*d, n))
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !missing(&devices).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let missing = missing(&devices);

    // Stop the clients and collect their counters.
    let mut logs = Vec::new();
    for dev in devices {
        let _ = dev.stop.send(());
        let stats = dev.task.await.unwrap();
        let log = std::mem::take(&mut *dev.log.lock().unwrap());
        logs.push((dev.user, dev.transport, stats, log));
    }
    let addr_of = |i: usize| {
        (
            cluster.nodes[i].ws_url(),
            cluster.nodes[i]
                .quic
                .trim_start_matches("quic://")
                .to_string(),
        )
    };
    let node_of: HashMap<String, u16> = (0..cluster.nodes.len())
        .flat_map(|i| {
            let (ws, quic) = addr_of(i);
            [(ws, i as u16), (quic, i as u16)]
        })
        .collect();
    let mut problems = Vec::new();
    for (d, (user, transport, stats, log)) in logs.iter().enumerate() {
        println!(
            "device {d} (user {user}, {}): {stats:?}, links {:?}",
            transport.name(),
            log.links
        );
        if stats.moves_by_hint == 0 {
            problems.push(format!("device {d} never moved by a hint"));
        }
        if stats.lost > 0 || stats.moves_without_hint > 0 || stats.connect_failures > 0 {
            problems.push(format!(
                "device {d} moved other than by a hint: {stats:?} {:?}",
                log.troubles
            ));
        }
        if stats.sends_unavailable > 0 || stats.sends_rate_limited > 0 {
            problems.push(format!("device {d} had sends refused: {stats:?}"));
        }
        // After each hint, the next connection is to the node it named.
        for pair in log.links.windows(2) {
            if let [Link::Moving(Some(to)), next] = pair {
                let want = node_of.get(to.trim_start_matches("quic://"));
                match next {
                    Link::Connected(n) if Some(n) == want => {}
                    other => problems.push(format!(
                        "device {d} was told to go to {to} ({want:?}) and then: {other:?}"
                    )),
                }
            }
        }
    }
    let refused = refused.lock().unwrap().clone();
    assert!(refused.is_empty(), "refused sends: {refused:?}");
    assert!(
        missing.is_empty(),
        "acked messages not received (device, how many): {missing:?}"
    );
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(
        acked.len() > 100,
        "too little load to mean anything: {}",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_refuses_newcomers_and_closes_stayers_with_1001() {
    // A short drain timeout: these clients ignore the hint, so the drain runs out.
    let mut cluster = TestCluster::start(2, &["--drain-timeout-secs", "4"]).await;
    let ca = std::fs::read(cluster.cluster_dir.path().join("ca.pem")).unwrap();
    let alice = cluster.nodes[0].user("stayer").await;
    let bob = cluster.nodes[1].user("elsewhere").await;
    let connect = |transport: Transport, token: String| {
        let url = transport.url(&cluster.nodes[0]);
        let opts = ConnectOptions {
            codec: transport.codec(),
            ca_pem: Some(ca.clone()),
        };
        async move { Connection::connect_with(&url, &token, &opts).await }
    };
    let mut ws = connect(Transport::WsJson, alice.login.token.clone())
        .await
        .unwrap();
    let mut quic = connect(Transport::Quic, alice.login.token.clone())
        .await
        .unwrap();
    // Both carry traffic before the drain (a plain close used to reach only fresh ones).
    ws.send_message("before-ws", Recipient::User(bob.id), "hi")
        .await
        .unwrap();
    quic.send_message("before-quic", Recipient::User(bob.id), "hi")
        .await
        .unwrap();

    cluster.nodes[0].sigterm();
    let hint = |f: &ServerFrame| match f {
        ServerFrame::Draining { reconnect_to } => Some(reconnect_to.clone()),
        _ => None,
    };
    let ws_hint = ws.wait_for(Duration::from_secs(30), hint).await.unwrap();
    let quic_hint = quic.wait_for(Duration::from_secs(30), hint).await.unwrap();
    assert_eq!(ws_hint, Some(cluster.nodes[1].ws_url()), "WebSocket hint");
    assert_eq!(
        quic_hint,
        Some(
            cluster.nodes[1]
                .quic
                .trim_start_matches("quic://")
                .to_string()
        ),
        "QUIC hint"
    );

    // While it drains: /readyz says so, new connections are refused, sends are still served.
    let readyz = reqwest::get(format!("{}/readyz", cluster.nodes[0].http))
        .await
        .unwrap();
    assert_eq!(readyz.status(), 503);
    assert_eq!(readyz.text().await.unwrap(), "draining");
    match connect(Transport::WsJson, alice.login.token.clone()).await {
        Err(ClientError::Transport(e)) => assert!(e.contains("503"), "{e}"),
        other => panic!(
            "a new WebSocket during the drain: {:?}",
            other.map(|c| c.node_id)
        ),
    }
    match connect(Transport::Quic, alice.login.token.clone()).await {
        Err(e) => assert!(e.to_string().contains("refused"), "{e}"),
        Ok(c) => panic!(
            "a new QUIC connection during the drain got node {}",
            c.node_id
        ),
    }
    ws.send_message("during-ws", Recipient::User(bob.id), "still here")
        .await
        .unwrap();

    // The drain timeout passes: both are closed with 1001, after what was queued for them.
    for (name, conn) in [("WebSocket", &mut ws), ("QUIC", &mut quic)] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let end = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = conn.recv(left).await {
                break e;
            }
        };
        match end {
            ClientError::Closed(Some((1001, reason))) => {
                println!("{name} closed with 1001 ({reason})")
            }
            other => panic!("{name} ended with {other:?}, not a 1001 close"),
        }
    }
    let exit = cluster.nodes[0]
        .exit_within(Duration::from_secs(4) + EXIT_MARGIN)
        .await;
    assert_eq!(exit, Some(Some(0)), "the drained node did not stop cleanly");
    let log = cluster.nodes[0].log_text();
    assert!(
        log.contains("drain timeout: closing the remaining sessions"),
        "the drain did not run out as expected"
    );
}
