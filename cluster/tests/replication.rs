#![allow(clippy::unwrap_used)]
//! Quorum replication: coordinators over in-memory replicas and an in-memory network with
//! faulty links (time paused, so timeouts cost nothing), and once over the real QUIC
//! transport on 127.0.0.1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cluster::placement::{NodeId, Partition};
use cluster::replication::memory::{Link, MemoryEndpoint, MemoryNetwork, MemoryReplica};
use cluster::replication::{
    Cas, CasError, CasOutcome, Coordinator, CoordinatorConfig, FailureReason, QuorumError,
    ReplicaNode, ReplicaOp, ReplicaService, RpcReplicaClient, ScanSpec, Topology, Versioned,
};

type Coord = Coordinator<MemoryReplica, RpcReplicaClient<MemoryEndpoint>>;

const MESSAGES: u8 = 3;
const USERS: u8 = 1;
const USERNAMES: u8 = 2;
const TIMEOUT: Duration = Duration::from_secs(1);

struct Node {
    store: Arc<MemoryReplica>,
    coordinator: Coord,
}

/// N coordinators, each with its own replica, over one in-memory network.
struct Cluster {
    net: Arc<MemoryNetwork>,
    rf: usize,
    ids: Vec<NodeId>,
    nodes: BTreeMap<NodeId, Node>,
}

fn replica_node(id: NodeId, live: bool) -> ReplicaNode {
    ReplicaNode {
        id,
        addr: SocketAddr::from(([127, 0, 0, 1], 9000 + id)),
        server_name: format!("node-{id}"),
        live,
    }
}

fn config() -> CoordinatorConfig {
    CoordinatorConfig {
        write_timeout: TIMEOUT,
        read_timeout: TIMEOUT,
        ..CoordinatorConfig::default()
    }
}

impl Cluster {
    fn new(n: NodeId, rf: usize) -> Self {
        Self::with_config(n, rf, config())
    }

    fn with_config(n: NodeId, rf: usize, config: CoordinatorConfig) -> Self {
        let net = MemoryNetwork::new();
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut nodes = BTreeMap::new();
        for &id in &ids {
            let store = Arc::new(MemoryReplica::new());
            let service = Arc::new(ReplicaService::new(store.clone()));
            let topology = Topology::new(id, rf, ids.iter().map(|&i| replica_node(i, true)));
            let coordinator = Coordinator::new(
                store.clone(),
                RpcReplicaClient::new(net.endpoint(id)),
                topology,
                config.clone(),
            );
            service.attach(&coordinator);
            net.register(id, service);
            nodes.insert(id, Node { store, coordinator });
        }
        Self {
            net,
            rf,
            ids,
            nodes,
        }
    }

    fn coordinator(&self, id: NodeId) -> &Coord {
        &self.nodes[&id].coordinator
    }

    fn store(&self, id: NodeId) -> &MemoryReplica {
        &self.nodes[&id].store
    }

    /// Tells every coordinator which nodes the failure detector considers down.
    fn set_down(&self, down: &[NodeId]) {
        for (&id, node) in &self.nodes {
            let members = self
                .ids
                .iter()
                .map(|&i| replica_node(i, !down.contains(&i)));
            node.coordinator
                .set_topology(Topology::new(id, self.rf, members));
        }
    }

    /// Kills `id` as far as everyone can tell: its links fail and membership says dead.
    fn kill(&self, id: NodeId) {
        self.net.set_node(id, Link::Down);
    }

    fn replica_set(&self, partition: Partition) -> Vec<NodeId> {
        self.coordinator(self.ids[0])
            .topology()
            .replica_set(partition)
            .iter()
            .map(|n| n.id)
            .collect()
    }

    /// A partition whose replicas do not include `outsider` (for a coordinator with no
    /// local replica).
    fn partition_without(&self, outsider: NodeId) -> Partition {
        (0..)
            .map(Partition)
            .find(|p| !self.replica_set(*p).contains(&outsider))
            .unwrap()
    }

    async fn settle(&self) {
        for node in self.nodes.values() {
            node.coordinator.settle().await;
        }
    }
}

fn put(table: u8, key: &str, value: &str, version: u64) -> ReplicaOp {
    ReplicaOp::put(table, key.into(), value.into(), version)
}

fn all_messages() -> ScanSpec {
    ScanSpec {
        table: MESSAGES,
        start: vec![],
        end: vec![0xff; 8],
        after: None,
        descending: false,
        limit: 1000,
    }
}

fn keys_of(entries: &[cluster::replication::ScanEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| String::from_utf8(e.key.clone()).unwrap())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn one_replica_down_writes_succeed_and_reads_see_them() {
    let cluster = Cluster::new(3, 3);
    let p = Partition(7);
    let set = cluster.replica_set(p);
    let (a, c) = (set[0], set[2]);

    // Down in membership: not even contacted.
    cluster.kill(c);
    cluster.set_down(&[c]);
    let ack = cluster
        .coordinator(a)
        .write(p, vec![put(MESSAGES, "m1", "hello", 1)])
        .await
        .unwrap();
    assert_eq!(ack.acked.len(), 2);
    assert!(!ack.acked.contains(&c));
    // Unreachable although membership still says live, and a replica that never answers:
    // the quorum is reached without waiting for it.
    cluster.set_down(&[]);
    let started = tokio::time::Instant::now();
    cluster
        .coordinator(a)
        .write(p, vec![put(MESSAGES, "m2", "again", 2)])
        .await
        .unwrap();
    cluster.net.set_node(c, Link::Hang);
    cluster
        .coordinator(a)
        .write(p, vec![put(MESSAGES, "m3", "and again", 3)])
        .await
        .unwrap();
    assert!(started.elapsed() < TIMEOUT);

    // Reads fail over from the hung replica in time, wherever they start.
    for id in set.iter().copied().filter(|&id| id != c) {
        let got = cluster
            .coordinator(id)
            .get(p, MESSAGES, b"m1")
            .await
            .unwrap();
        assert_eq!(got, Some(Versioned::live(1, b"hello".to_vec())));
        let scanned = cluster
            .coordinator(id)
            .scan(p, all_messages())
            .await
            .unwrap();
        assert_eq!(keys_of(&scanned), ["m1", "m2", "m3"]);
    }
    let outsider = Cluster::new(4, 3);
    let p = outsider.partition_without(4);
    let hung = outsider.replica_set(p)[0];
    outsider.net.set_node(hung, Link::Hang);
    let started = tokio::time::Instant::now();
    outsider
        .coordinator(4)
        .write(p, vec![put(MESSAGES, "m", "x", 1)])
        .await
        .unwrap();
    let got = outsider
        .coordinator(4)
        .get(p, MESSAGES, b"m")
        .await
        .unwrap();
    assert!(got.is_some());
    assert!(started.elapsed() < TIMEOUT);
    assert!(cluster.store(c).is_empty());
}

#[tokio::test(start_paused = true)]
async fn two_replicas_down_is_unavailable_and_reports_who_failed() {
    let cluster = Cluster::new(3, 3);
    let p = Partition(3);
    let set = cluster.replica_set(p);
    let (a, b, c) = (set[0], set[1], set[2]);

    cluster.kill(b);
    cluster.kill(c);
    cluster.set_down(&[b, c]);
    let started = tokio::time::Instant::now();
    let err = cluster
        .coordinator(a)
        .write(p, vec![put(MESSAGES, "m1", "lost?", 1)])
        .await
        .unwrap_err();
    // Known-dead replicas fail the write at once.
    assert_eq!(started.elapsed(), Duration::ZERO);
    let QuorumError::Unavailable {
        acked,
        needed,
        failed,
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!(needed, 2);
    assert!(acked <= 1);
    let mut failed_nodes: Vec<NodeId> = failed.iter().map(|f| f.node).collect();
    failed_nodes.sort_unstable();
    assert_eq!(failed_nodes, {
        let mut v = vec![b, c];
        v.sort_unstable();
        v
    });
    assert!(failed
        .iter()
        .all(|f| matches!(f.reason, FailureReason::NotLive)));
    assert!(matches!(
        cluster.coordinator(a).get(p, MESSAGES, b"m1").await,
        Err(QuorumError::Unavailable { needed: 2, .. })
    ));

    // Replicas membership thinks are alive but that never answer: the write fails at the
    // write timeout, naming them as timed out.
    cluster.set_down(&[]);
    cluster.net.set_node(b, Link::Hang);
    cluster.net.set_node(c, Link::Hang);
    let started = tokio::time::Instant::now();
    let err = cluster
        .coordinator(a)
        .write(p, vec![put(MESSAGES, "m2", "lost?", 2)])
        .await
        .unwrap_err();
    assert_eq!(started.elapsed(), TIMEOUT);
    let QuorumError::Unavailable { failed, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(failed.len(), 2);
    assert!(failed
        .iter()
        .all(|f| matches!(f.reason, FailureReason::TimedOut)));
    assert!(err.to_string().contains("only 1 of the 2"), "{err}");
}

/// W + R > RF: for every choice of the replica that missed an acked write and every read
/// quorum, the read returns the write (new key, overwrite and delete alike).
#[tokio::test(start_paused = true)]
async fn every_read_quorum_sees_every_acked_write() {
    let probe = Cluster::new(4, 3);
    let outsider = 4;
    let p = probe.partition_without(outsider);
    let set = probe.replica_set(p);
    assert_eq!(set.len(), 3);
    let mut cases = 0;
    for lagging in set.clone() {
        for unread in set.clone() {
            let cluster = Cluster::with_config(
                4,
                3,
                CoordinatorConfig {
                    read_repair: false,
                    ..config()
                },
            );
            let coordinator = cluster.coordinator(outsider);
            // The old state, everywhere.
            coordinator
                .write(
                    p,
                    vec![put(USERS, "u", "old", 10), put(USERS, "gone", "old", 10)],
                )
                .await
                .unwrap();
            // The new state, acked by the two replicas other than `lagging`.
            cluster.net.set_node(lagging, Link::Down);
            let ack = coordinator
                .write(
                    p,
                    vec![
                        put(USERS, "u", "new", 11),
                        ReplicaOp::delete(USERS, b"gone".to_vec(), 11),
                        put(USERS, "fresh", "new", 11),
                    ],
                )
                .await
                .unwrap();
            assert!(!ack.acked.contains(&lagging));
            cluster.net.heal();
            // Read from the two replicas other than `unread`.
            cluster.net.set_node(unread, Link::Down);
            let got = coordinator.get(p, USERS, b"u").await.unwrap();
            assert_eq!(got, Some(Versioned::live(11, b"new".to_vec())));
            let gone = coordinator.get(p, USERS, b"gone").await.unwrap();
            assert_eq!(gone, Some(Versioned::tombstone(11)));
            let spec = ScanSpec {
                table: USERS,
                ..all_messages()
            };
            let scanned = coordinator.scan(p, spec).await.unwrap();
            assert_eq!(
                keys_of(&scanned),
                ["fresh", "u"],
                "lagging {lagging}, unread {unread}"
            );
            assert!(scanned.iter().all(|e| e.record.version == 11));
            cases += 1;
        }
    }
    assert_eq!(cases, 9);
}

#[tokio::test(start_paused = true)]
async fn scans_are_a_union_and_points_take_the_highest_version() {
    let cluster = Cluster::new(3, 3);
    let p = Partition(11);
    let set = cluster.replica_set(p);
    // Each message misses a different replica.
    for (i, missing) in set.iter().enumerate() {
        cluster.net.heal();
        cluster.net.set_node(*missing, Link::Down);
        let writer = set[(i + 1) % 3];
        let key = format!("m{i}");
        cluster
            .coordinator(writer)
            .write(p, vec![put(MESSAGES, &key, "text", 0)])
            .await
            .unwrap();
    }
    cluster.net.heal();
    for &id in &set {
        assert_eq!(
            cluster.store(id).len(),
            2,
            "each replica holds two of three"
        );
    }
    let newest_first = ScanSpec {
        descending: true,
        ..all_messages()
    };
    let scanned = cluster
        .coordinator(set[0])
        .scan(p, newest_first)
        .await
        .unwrap();
    assert_eq!(keys_of(&scanned), ["m2", "m1", "m0"]);

    // A late, older write does not undo a newer one.
    let a = cluster.coordinator(set[0]);
    a.write(p, vec![put(USERS, "u", "v2", 2)]).await.unwrap();
    a.write(p, vec![put(USERS, "u", "v1", 1)]).await.unwrap();
    assert_eq!(
        a.get(p, USERS, b"u").await.unwrap(),
        Some(Versioned::live(2, b"v2".to_vec()))
    );
}

#[tokio::test(start_paused = true)]
async fn scans_page_through_truncated_replies_and_hide_deletes() {
    let cluster = Cluster::with_config(
        3,
        3,
        CoordinatorConfig {
            scan_max_bytes: 60,
            read_repair: false,
            ..config()
        },
    );
    let p = Partition(5);
    let set = cluster.replica_set(p);
    let a = cluster.coordinator(set[0]);
    let ops = (0..20u64)
        .map(|i| put(MESSAGES, &format!("k{i:02}"), "0123456789", 1))
        .collect();
    a.write(p, ops).await.unwrap();
    // Deletes that one replica missed.
    cluster.net.set_node(set[2], Link::Down);
    let deletes = (0..20u64)
        .filter(|i| i % 3 == 0)
        .map(|i| ReplicaOp::delete(MESSAGES, format!("k{i:02}").into_bytes(), 2))
        .collect();
    a.write(p, deletes).await.unwrap();
    cluster.net.heal();
    let expected: Vec<String> = (0..20u64)
        .filter(|i| i % 3 != 0)
        .map(|i| format!("k{i:02}"))
        .collect();
    for reader in &set {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = cluster
                .coordinator(*reader)
                .scan(
                    p,
                    ScanSpec {
                        after: after.clone(),
                        limit: 4,
                        ..all_messages()
                    },
                )
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            after = page.last().map(|e| e.key.clone());
            seen.extend(keys_of(&page));
        }
        assert_eq!(seen, expected, "read through {reader}");
    }
}

#[tokio::test(start_paused = true)]
async fn racing_claims_through_the_primary_have_exactly_one_winner() {
    let cluster = Cluster::new(3, 3);
    for round in 0..20u32 {
        let name = format!("user{round}");
        let p = Partition(round);
        // Uneven delays so the forwarded claims interleave differently each round.
        let primary = cluster.coordinator(1).topology().primary(p).unwrap().id;
        for from in &cluster.ids {
            let delay = Duration::from_micros(u64::from((round * 7 + u32::from(*from)) % 5));
            cluster.net.set_link(*from, primary, Link::Delay(delay));
        }
        let claim = |id: NodeId| {
            let coordinator = cluster.coordinator(id).clone();
            let name = name.clone();
            async move {
                let cas = Cas {
                    table: USERNAMES,
                    key: name.into_bytes(),
                    expected: None,
                    new: Some(vec![id as u8]),
                    min_version: 1,
                };
                (id, coordinator.compare_and_swap(p, cas).await.unwrap())
            }
        };
        let outcomes =
            futures_util::future::join_all(cluster.ids.iter().map(|&id| claim(id))).await;
        let winners: Vec<NodeId> = outcomes
            .iter()
            .filter(|(_, o)| matches!(o, CasOutcome::Swapped { .. }))
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        let winner = winners[0];
        for (_, outcome) in &outcomes {
            if let CasOutcome::Mismatch { current } = outcome {
                assert_eq!(
                    current.as_ref().and_then(|c| c.value.clone()),
                    Some(vec![winner as u8])
                );
            }
        }
        let stored = cluster
            .coordinator(2)
            .get(p, USERNAMES, name.as_bytes())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.value, Some(vec![winner as u8]));
    }
    cluster.net.heal();

    // Swap an existing value: expected must match.
    let p = Partition(0);
    let key = b"user0".to_vec();
    let current = cluster
        .coordinator(3)
        .get(p, USERNAMES, &key)
        .await
        .unwrap()
        .unwrap();
    let swap = |expected: Option<Vec<u8>>| Cas {
        table: USERNAMES,
        key: key.clone(),
        expected,
        new: None,
        min_version: 0,
    };
    let wrong = cluster
        .coordinator(3)
        .compare_and_swap(p, swap(Some(b"nope".to_vec())))
        .await
        .unwrap();
    assert!(matches!(wrong, CasOutcome::Mismatch { .. }));
    let released = cluster
        .coordinator(3)
        .compare_and_swap(p, swap(current.value.clone()))
        .await
        .unwrap();
    assert_eq!(
        released,
        CasOutcome::Swapped {
            version: current.version + 1
        }
    );
}

/// Two nodes that both believe they are the primary (membership views differ): the
/// replicas' version check lets at most one claim reach a write quorum.
#[tokio::test(start_paused = true)]
async fn two_primaries_cannot_both_win_a_claim() {
    let mut decided = 0;
    for round in 0..16u32 {
        let cluster = Cluster::new(3, 3);
        let p = Partition(round);
        let set = cluster.replica_set(p);
        let (first, second) = (set[0], set[1]);
        // `second` believes `first` is dead; `first` believes itself primary.
        let members = cluster.ids.iter().map(|&i| replica_node(i, i != first));
        cluster
            .coordinator(second)
            .set_topology(Topology::new(second, 3, members));
        for (i, to) in set.iter().enumerate() {
            let delay = Duration::from_micros(u64::from((round >> i) & 1));
            cluster.net.set_link(first, *to, Link::Delay(delay));
            let delay = Duration::from_micros(u64::from((round >> (i + 1)) & 1));
            cluster.net.set_link(second, *to, Link::Delay(delay));
        }
        let claim = |id: NodeId| Cas {
            table: USERNAMES,
            key: b"alice".to_vec(),
            expected: None,
            new: Some(vec![id as u8]),
            min_version: u64::from(id),
        };
        let (a, b) = tokio::join!(
            cluster.coordinator(first).compare_and_swap(p, claim(first)),
            cluster
                .coordinator(second)
                .compare_and_swap(p, claim(second)),
        );
        let won = |r: &Result<CasOutcome, CasError>| matches!(r, Ok(CasOutcome::Swapped { .. }));
        assert!(!(won(&a) && won(&b)), "round {round}: {a:?} {b:?}");
        decided += usize::from(won(&a) || won(&b));
        for (result, id) in [(&a, first), (&b, second)] {
            if won(result) {
                cluster.net.heal();
                let stored = cluster
                    .coordinator(set[2])
                    .get(p, USERNAMES, b"alice")
                    .await
                    .unwrap();
                assert_eq!(stored.unwrap().value, Some(vec![id as u8]));
            }
        }
    }
    // Not every race ends undecided: the check is not just refusing everything.
    assert!(decided > 0);
}

#[tokio::test(start_paused = true)]
async fn a_swap_sent_to_a_node_that_names_another_primary_follows_it_once() {
    for round in 0..8u32 {
        let cluster = Cluster::new(3, 3);
        let p = Partition(round);
        let set = cluster.replica_set(p);
        let (first, second, third) = (set[0], set[1], set[2]);
        // `first` has left placement in the views of `first` and `second` (so `first` names
        // `second`); `third` still takes `first` for the primary, one gossip round behind.
        for id in [first, second] {
            let others = cluster
                .ids
                .iter()
                .filter(|&&i| i != first)
                .map(|&i| replica_node(i, true));
            cluster
                .coordinator(id)
                .set_topology(Topology::new(id, 3, others));
        }
        let claim = Cas {
            table: USERNAMES,
            key: format!("user{round}").into_bytes(),
            expected: None,
            new: Some(vec![7]),
            min_version: 1,
        };
        let outcome = cluster
            .coordinator(third)
            .compare_and_swap(p, claim)
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(matches!(outcome, CasOutcome::Swapped { .. }), "{outcome:?}");
        let stored = cluster
            .coordinator(second)
            .get(p, USERNAMES, format!("user{round}").as_bytes())
            .await
            .unwrap();
        assert_eq!(stored.unwrap().value, Some(vec![7]));
    }
}

#[tokio::test(start_paused = true)]
async fn missed_writes_are_handed_off_when_the_replica_returns() {
    let cluster = Cluster::new(3, 3);
    let p = Partition(9);
    let set = cluster.replica_set(p);
    let (a, c) = (set[0], set[2]);
    cluster.kill(c);
    cluster.set_down(&[c]);
    for i in 0..5u64 {
        cluster
            .coordinator(a)
            .write(p, vec![put(MESSAGES, &format!("m{i}"), "x", i)])
            .await
            .unwrap();
    }
    // A reply lost after the request ran: hinted too, and harmless to replay.
    cluster.set_down(&[]);
    cluster.net.set_node(c, Link::DropReplies);
    cluster
        .coordinator(a)
        .write(p, vec![put(MESSAGES, "m5", "x", 5)])
        .await
        .unwrap();
    cluster.settle().await;
    // (Marking `c` live already started a replay, which lost its replies too: the hint
    // stays.)
    assert_eq!(cluster.coordinator(a).hints_pending(c), 6);
    assert!(cluster.store(c).record(MESSAGES, b"m5").is_some());

    cluster.net.heal();
    cluster.set_down(&[]);
    cluster.settle().await;
    assert_eq!(cluster.coordinator(a).hints_pending(c), 0);
    assert_eq!(cluster.store(c).len(), 6);
    assert_eq!(
        cluster.store(c).record(MESSAGES, b"m3"),
        Some(Versioned::live(3, b"x".to_vec()))
    );
}

#[tokio::test(start_paused = true)]
async fn read_repair_brings_a_stale_replica_up_to_date() {
    let cluster = Cluster::new(3, 3);
    let p = Partition(2);
    let set = cluster.replica_set(p);
    let (a, b, c) = (set[0], set[1], set[2]);
    cluster.net.set_node(b, Link::Down);
    cluster
        .coordinator(a)
        .write(p, vec![put(USERS, "u", "v", 4)])
        .await
        .unwrap();
    cluster.net.heal();
    // Drop the hint path: only read repair can fix `b` now.
    cluster.kill(c);
    cluster.set_down(&[c]);
    let got = cluster.coordinator(b).get(p, USERS, b"u").await.unwrap();
    assert_eq!(got, Some(Versioned::live(4, b"v".to_vec())));
    cluster.settle().await;
    assert_eq!(
        cluster.store(b).record(USERS, b"u"),
        Some(Versioned::live(4, b"v".to_vec()))
    );
}

#[tokio::test(start_paused = true)]
async fn small_clusters_and_failing_disks() {
    // One node, RF 3: a replica set of one, W = R = 1.
    let single = Cluster::new(1, 3);
    let c = single.coordinator(1);
    c.write(Partition(0), vec![put(USERS, "u", "v", 1)])
        .await
        .unwrap();
    assert!(c.get(Partition(0), USERS, b"u").await.unwrap().is_some());
    single.store(1).set_failing(true);
    let err = c
        .write(Partition(0), vec![put(USERS, "u", "w", 2)])
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        QuorumError::Unavailable {
            acked: 0,
            needed: 1,
            ..
        }
    ));

    // No members at all.
    let empty: Coord = Coordinator::new(
        Arc::new(MemoryReplica::new()),
        RpcReplicaClient::new(MemoryNetwork::new().endpoint(1)),
        Topology::new(1, 3, []),
        config(),
    );
    assert!(matches!(
        empty.write(Partition(0), vec![]).await,
        Err(QuorumError::NoReplicas(0))
    ));
    assert!(matches!(
        empty
            .compare_and_swap(
                Partition(0),
                Cas {
                    table: 1,
                    key: vec![],
                    expected: None,
                    new: None,
                    min_version: 0
                }
            )
            .await,
        Err(CasError::NoPrimary(0))
    ));

    // Coordinator futures are Send: the node can spawn them.
    let cluster = Cluster::new(3, 3);
    let c = cluster.coordinator(1).clone();
    tokio::spawn(async move { c.write(Partition(1), vec![put(USERS, "s", "v", 1)]).await })
        .await
        .unwrap()
        .unwrap();
    cluster.coordinator(1).clone().shutdown().await;
}

mod over_quic {
    use super::*;
    use cluster::certs;
    use cluster::replication::PeerReplicaClient;
    use cluster::transport::{PeerConfig, PeerEndpoint};

    type QuicCoord = Coordinator<MemoryReplica, PeerReplicaClient>;

    /// Three nodes in-process, each with a real mutual-TLS QUIC endpoint serving its replica.
    #[tokio::test]
    async fn the_peer_transport_carries_replication() {
        let dir = tempfile::tempdir().unwrap();
        certs::init_cluster_dir(dir.path()).unwrap();
        let ids: [NodeId; 3] = [1, 2, 3];
        let mut bound = Vec::new();
        for id in ids {
            let name = format!("node-{id}");
            certs::issue_node_cert(dir.path(), &name, &["127.0.0.1".to_string()]).unwrap();
            let tls = certs::load(dir.path(), &name).unwrap();
            let store = Arc::new(MemoryReplica::new());
            let service: Arc<ReplicaService<MemoryReplica, PeerReplicaClient>> =
                Arc::new(ReplicaService::new(store.clone()));
            let endpoint = PeerEndpoint::bind(
                "127.0.0.1:0".parse().unwrap(),
                &tls,
                PeerConfig::default(),
                service.clone(),
            )
            .unwrap();
            bound.push((id, store, service, endpoint));
        }
        let members: Vec<ReplicaNode> = bound
            .iter()
            .map(|(id, _, _, endpoint)| ReplicaNode {
                id: *id,
                addr: endpoint.local_addr().unwrap(),
                server_name: format!("node-{id}"),
                live: true,
            })
            .collect();
        let mut nodes: BTreeMap<NodeId, (Arc<MemoryReplica>, QuicCoord, PeerEndpoint)> =
            BTreeMap::new();
        for (id, store, service, endpoint) in bound {
            let coordinator = Coordinator::new(
                store.clone(),
                PeerReplicaClient::new(endpoint.clone()),
                Topology::new(id, 3, members.clone()),
                CoordinatorConfig::default(),
            );
            service.attach(&coordinator);
            nodes.insert(id, (store, coordinator, endpoint));
        }

        let p = Partition(42);
        let topology = nodes[&1].1.topology();
        let primary = topology.primary(p).unwrap().id;
        let other = ids.into_iter().find(|&id| id != primary).unwrap();

        // A write from one node is read back through another.
        let ack = nodes[&other]
            .1
            .write(p, vec![put(MESSAGES, "m1", "over quic", 7)])
            .await
            .unwrap();
        assert!(ack.acked.len() >= 2);
        let reader = ids.into_iter().find(|&id| id != other).unwrap();
        let got = nodes[&reader].1.get(p, MESSAGES, b"m1").await.unwrap();
        assert_eq!(got, Some(Versioned::live(7, b"over quic".to_vec())));
        let scanned = nodes[&reader].1.scan(p, all_messages()).await.unwrap();
        assert_eq!(keys_of(&scanned), ["m1"]);

        // A claim from a non-primary is forwarded to the primary; a second one loses.
        let claim = |v: &[u8]| Cas {
            table: USERNAMES,
            key: b"alice".to_vec(),
            expected: None,
            new: Some(v.to_vec()),
            min_version: 1,
        };
        let first = nodes[&other]
            .1
            .compare_and_swap(p, claim(b"1"))
            .await
            .unwrap();
        assert!(matches!(first, CasOutcome::Swapped { .. }));
        let second = nodes[&primary]
            .1
            .compare_and_swap(p, claim(b"2"))
            .await
            .unwrap();
        assert!(matches!(second, CasOutcome::Mismatch { .. }));

        // One node gone: writes still reach a quorum.
        let (_, gone_coordinator, gone_endpoint) = nodes.remove(&3).unwrap();
        gone_coordinator.shutdown().await;
        gone_endpoint.shutdown().await;
        nodes[&1]
            .1
            .write(p, vec![put(MESSAGES, "m2", "still", 8)])
            .await
            .unwrap();
        let got = nodes[&2].1.get(p, MESSAGES, b"m2").await.unwrap();
        assert!(got.is_some());

        for (_, (_, coordinator, endpoint)) in nodes {
            coordinator.shutdown().await;
            endpoint.shutdown().await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn multi_partition_writes_need_the_quorum_of_every_partition() {
    let cluster = Cluster::new(5, 3);
    let partitions: Vec<Partition> = (0..40).map(Partition).collect();
    let batches = |tag: &str| {
        partitions
            .iter()
            .map(|p| (*p, vec![put(MESSAGES, &format!("{tag}-{}", p.0), "v", 1)]))
            .collect::<Vec<_>>()
    };
    // All up: every partition's replicas hold their ops (and only theirs).
    cluster
        .coordinator(1)
        .write_all(batches("a"))
        .await
        .unwrap();
    cluster.settle().await;
    for p in &partitions {
        for id in 1..=5 {
            let got = cluster
                .coordinator(id)
                .get(*p, MESSAGES, format!("a-{}", p.0).as_bytes())
                .await
                .unwrap();
            assert_eq!(
                got,
                Some(Versioned::live(1, b"v".to_vec())),
                "partition {p:?} read on {id}"
            );
        }
    }
    // One node down: every partition still has 2 of 3 replicas, so the write succeeds.
    cluster.kill(5);
    cluster.set_down(&[5]);
    cluster
        .coordinator(1)
        .write_all(batches("b"))
        .await
        .unwrap();
    // Two nodes down: some partition has only 1 of 3 replicas left: unavailable.
    cluster.kill(4);
    cluster.set_down(&[4, 5]);
    let err = cluster
        .coordinator(1)
        .write_all(batches("c"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QuorumError::Unavailable { needed: 2, .. }),
        "{err:?}"
    );
}

/// Partition count of the join tests (the memory replica maps a key to
/// `partition_of(key, count)`).
const JOIN_PARTITIONS: u32 = 64;

fn part_of(key: &str) -> Partition {
    cluster::placement::partition_of(key.as_bytes(), JOIN_PARTITIONS)
}

/// Gives every coordinator the same view: placement `members`, joining `pending`.
fn set_view(cluster: &Cluster, members: &[NodeId], pending: &[NodeId]) {
    for (&id, node) in &cluster.nodes {
        let view = Topology::with_pending(
            id,
            cluster.rf,
            members.iter().map(|&i| replica_node(i, true)),
            pending.iter().map(|&i| replica_node(i, true)),
        );
        node.coordinator.set_topology(view);
    }
}

/// Writes `count` keys `prefix0..` through node 1's coordinator, each to its partition.
async fn write_keys(cluster: &Cluster, prefix: &str, count: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..count {
        let key = format!("{prefix}{i}");
        cluster
            .coordinator(1)
            .write(part_of(&key), vec![put(USERS, &key, "v", 1)])
            .await
            .unwrap();
        keys.push(key);
    }
    keys
}

/// Node 4 joins a 3-node, RF=3 cluster: writes acked before (some while node 3 was down, so
/// on two replicas only: hints are off, as after a coordinator restart) and during the join.
/// Returns the cluster in its final view (4 members) and every acked key.
async fn join_fourth_node(pull: bool) -> (Cluster, Vec<String>) {
    let cluster = Cluster::with_config(
        4,
        3,
        CoordinatorConfig {
            read_repair: false,
            hints: cluster::replication::HintLimits {
                max_batches: 0,
                max_bytes: 0,
            },
            ..config()
        },
    );
    set_view(&cluster, &[1, 2, 3], &[]);
    let mut acked = write_keys(&cluster, "a", 100).await;
    cluster.net.set_node(3, Link::Down);
    acked.extend(write_keys(&cluster, "b", 100).await);
    cluster.net.heal();
    cluster.settle().await;

    // Node 4 is pending: every write needs a quorum of the current and the future set.
    set_view(&cluster, &[1, 2, 3], &[4]);
    acked.extend(write_keys(&cluster, "c", 100).await);
    if pull {
        let joiner = cluster.coordinator(4);
        let view = joiner.topology();
        let owned: Vec<Partition> = (0..JOIN_PARTITIONS)
            .map(Partition)
            .filter(|p| view.future_set(*p).iter().any(|n| n.id == 4))
            .collect();
        assert!(!owned.is_empty());
        let plan = cluster::replication::PullPlan {
            max_keys: 7, // many pages
            ..cluster::replication::PullPlan::new(vec![USERS], JOIN_PARTITIONS)
        };
        let report = joiner
            .pull(&owned, &plan, cluster::replication::PullMode::Join)
            .await;
        assert!(report.incomplete.is_empty(), "{report:?}");
        // A read quorum (2 of 3) per partition: the third source is asked only for the
        // partitions the first two did not both hold.
        assert!(report.sources_done >= 2, "{report:?}");
    }
    cluster.settle().await;
    set_view(&cluster, &[1, 2, 3, 4], &[]);
    (cluster, acked)
}

/// Reads `key` through the one node outside its replica set with each replica down in turn
/// (so through every read quorum); the keys some read quorum did not return.
async fn missed_by_some_read_quorum(cluster: &Cluster, keys: &[String]) -> Vec<String> {
    let mut missed = Vec::new();
    for key in keys {
        let p = part_of(key);
        let set = cluster.replica_set(p);
        assert_eq!(set.len(), 3);
        let outsider = *cluster.ids.iter().find(|i| !set.contains(i)).unwrap();
        for down in &set {
            cluster.net.set_node(*down, Link::Down);
            let got = cluster
                .coordinator(outsider)
                .get(p, USERS, key.as_bytes())
                .await
                .unwrap();
            cluster.net.heal();
            if got.is_none() {
                missed.push(key.clone());
                break;
            }
        }
    }
    missed
}

#[tokio::test(start_paused = true)]
async fn a_joining_node_pulls_its_partitions_before_it_serves_them() {
    let (cluster, acked) = join_fourth_node(true).await;
    assert_eq!(acked.len(), 300);
    let missed = missed_by_some_read_quorum(&cluster, &acked).await;
    assert!(missed.is_empty(), "lost after the join: {missed:?}");
    // The joined node holds what it owns, including writes made while it was pending.
    for key in &acked {
        if cluster.replica_set(part_of(key)).contains(&4) {
            assert!(
                cluster.store(4).record(USERS, key.as_bytes()).is_some(),
                "{key}"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn without_the_pull_a_joined_node_would_lose_acked_writes() {
    // The control for the test above: the same history without the pull loses writes
    // acked before the join (the ones that only two replicas got).
    let (cluster, acked) = join_fourth_node(false).await;
    let missed = missed_by_some_read_quorum(&cluster, &acked).await;
    assert!(!missed.is_empty());
    assert!(missed.iter().all(|k| !k.starts_with('c')), "{missed:?}");
}

#[tokio::test(start_paused = true)]
async fn while_a_node_joins_writes_need_both_quorums() {
    let cluster = Cluster::new(4, 3);
    set_view(&cluster, &[1, 2, 3], &[4]);
    let view = cluster.coordinator(1).topology();
    // A partition that moves to node 4: its future set drops one current replica.
    let p = (0..JOIN_PARTITIONS)
        .map(Partition)
        .find(|p| view.quorums(*p).in_transition())
        .unwrap();
    let q = view.quorums(p);
    assert_eq!(q.nodes.len(), 4);
    // With node 4 and one more member of the future set down, the current set still has
    // its quorum but the future one does not: the write must fail.
    let other = *q.sets[1].iter().find(|id| **id != 4 && **id != 1).unwrap();
    cluster.net.set_node(4, Link::Down);
    cluster.net.set_node(other, Link::Down);
    let err = cluster
        .coordinator(1)
        .write(p, vec![put(USERS, "x", "v", 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, QuorumError::Unavailable { .. }), "{err:?}");
    cluster.net.heal();
    cluster
        .coordinator(1)
        .write(p, vec![put(USERS, "x", "v", 2)])
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_missed_writes_catches_up_by_pulling() {
    // Node 3 is down while writes are acked by the other two, and the hints are gone (as
    // after a coordinator restart): a catch-up pull from the other replicas restores them.
    let cluster = Cluster::with_config(
        3,
        3,
        CoordinatorConfig {
            hints: cluster::replication::HintLimits {
                max_batches: 0,
                max_bytes: 0,
            },
            ..config()
        },
    );
    set_view(&cluster, &[1, 2, 3], &[]);
    cluster.net.set_node(3, Link::Down);
    let missed = write_keys(&cluster, "m", 50).await;
    cluster.net.heal();
    cluster.settle().await;
    assert!(missed
        .iter()
        .all(|k| cluster.store(3).record(USERS, k.as_bytes()).is_none()));
    let all: Vec<Partition> = (0..JOIN_PARTITIONS).map(Partition).collect();
    let plan = cluster::replication::PullPlan::new(vec![USERS], JOIN_PARTITIONS);
    let report = cluster
        .coordinator(3)
        .pull(&all, &plan, cluster::replication::PullMode::CatchUp)
        .await;
    assert!(report.incomplete.is_empty(), "{report:?}");
    // A member needs R - 1 = 1 other replica: every acked write it missed is on both others.
    assert_eq!(report.records, 50);
    assert_eq!(report.sources_done, 1);
    for k in &missed {
        assert_eq!(
            cluster.store(3).record(USERS, k.as_bytes()),
            Some(Versioned::live(1, b"v".to_vec()))
        );
    }
}
