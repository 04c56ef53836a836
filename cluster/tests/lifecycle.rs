#![allow(clippy::unwrap_used)]
//! The cluster lifecycle (first node, returning member, join barrier and pull, catch-up)
//! over in-memory gossip, replicas and network, on paused time: no processes, no sockets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cluster::lifecycle::{
    ClusterLifecycle, ClusterView, LifecycleConfig, LifecycleHandle, MemberMarker, MembershipPort,
    MemoryMarker, Phase, StartedAs,
};
use cluster::membership::memory::{MemoryGossip, MemoryMembership};
use cluster::membership::Lifecycle;
use cluster::placement::{partition_of, NodeId, Partition};
use cluster::replication::memory::{Link, MemoryEndpoint, MemoryNetwork, MemoryReplica};
use cluster::replication::{
    read_quorum, Coordinator, CoordinatorConfig, HintLimits, PullPlan, ReplicaNode, ReplicaOp,
    ReplicaService, RpcReplicaClient, Topology,
};
use parking_lot::Mutex;
use tokio::time::{sleep, timeout, Instant};

type Coord = Coordinator<MemoryReplica, RpcReplicaClient<MemoryEndpoint>>;
type Lc = ClusterLifecycle<MemoryReplica, RpcReplicaClient<MemoryEndpoint>, MemoryMembership>;

const USERS: u8 = 1;
const PARTITIONS: u32 = 64;
/// Long enough for anything these tests wait for (paused time: it costs nothing).
const PATIENCE: Duration = Duration::from_secs(120);

/// One node: its store and marker outlive its incarnations, like a data dir.
struct Node {
    store: Arc<MemoryReplica>,
    marker: MemoryMarker,
    coord: Coord,
    membership: Arc<MemoryMembership>,
    lifecycle: Option<LifecycleHandle>,
}

/// In-memory nodes over one gossip and one network.
struct Cluster {
    gossip: MemoryGossip,
    net: Arc<MemoryNetwork>,
    rf: usize,
    coord_config: CoordinatorConfig,
    nodes: BTreeMap<NodeId, Node>,
}

impl Cluster {
    fn new(rf: usize) -> Self {
        Self::with_coordinators(
            rf,
            CoordinatorConfig {
                write_timeout: Duration::from_secs(1),
                read_timeout: Duration::from_secs(1),
                ..CoordinatorConfig::default()
            },
        )
    }

    fn with_coordinators(rf: usize, coord_config: CoordinatorConfig) -> Self {
        Self {
            gossip: MemoryGossip::new(),
            net: MemoryNetwork::new(),
            rf,
            coord_config,
            nodes: BTreeMap::new(),
        }
    }

    fn config(&self) -> LifecycleConfig {
        LifecycleConfig {
            anti_entropy: None,
            ..LifecycleConfig::new(self.rf, PullPlan::new(vec![USERS], PARTITIONS))
        }
    }

    /// A new incarnation of node `id` (heard of by everyone at once, or not until
    /// `gossip.hear`), with a new coordinator over its store, ready to start.
    fn incarnate(&mut self, id: NodeId, heard: bool, config: LifecycleConfig) -> Lc {
        let membership = Arc::new(if heard {
            self.gossip.join(id)
        } else {
            self.gossip.join_unheard(id)
        });
        let (store, marker) = match self.nodes.remove(&id) {
            Some(old) => {
                assert!(old.lifecycle.is_none(), "stop node {id} first");
                (old.store, old.marker)
            }
            None => (Arc::new(MemoryReplica::new()), MemoryMarker::new(false)),
        };
        let me = ReplicaNode {
            id,
            // The memory network routes by node id: any address will do.
            addr: std::net::SocketAddr::from(([10, 0, 0, 0], id)),
            server_name: format!("node-{id}"),
            live: true,
        };
        let coord = Coordinator::new(
            store.clone(),
            RpcReplicaClient::new(self.net.endpoint(id)),
            Topology::new(id, self.rf, [me]),
            self.coord_config.clone(),
        );
        let service = Arc::new(ReplicaService::new(store.clone()));
        service.attach(&coord);
        self.net.register(id, service);
        self.nodes.insert(
            id,
            Node {
                store,
                marker: marker.clone(),
                coord: coord.clone(),
                membership: membership.clone(),
                lifecycle: None,
            },
        );
        ClusterLifecycle {
            config,
            membership,
            coordinator: coord,
            marker: Box::new(marker),
        }
    }

    /// Starts (or restarts) node `id` with the default config and returns how it entered.
    async fn start(&mut self, id: NodeId) -> StartedAs {
        let config = self.config();
        let lifecycle = self.incarnate(id, true, config);
        let handle = lifecycle.start().await.unwrap();
        let started_as = handle.started_as();
        self.set_handle(id, handle);
        started_as
    }

    fn set_handle(&mut self, id: NodeId, handle: LifecycleHandle) {
        self.node_mut(id).lifecycle = Some(handle);
    }

    /// Stops node `id`'s lifecycle (the process goes on being seen until `set_live`).
    async fn stop(&mut self, id: NodeId) {
        let handle = self.node_mut(id).lifecycle.take().unwrap();
        handle.shutdown().await.unwrap();
    }

    async fn stop_all(mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            if self.nodes[&id].lifecycle.is_some() {
                self.stop(id).await;
            }
        }
    }

    fn node(&self, id: NodeId) -> &Node {
        &self.nodes[&id]
    }

    fn node_mut(&mut self, id: NodeId) -> &mut Node {
        self.nodes.get_mut(&id).unwrap()
    }

    fn lifecycle(&self, id: NodeId) -> &LifecycleHandle {
        self.node(id).lifecycle.as_ref().unwrap()
    }

    fn coord(&self, id: NodeId) -> &Coord {
        &self.node(id).coord
    }

    async fn wait_active(&self, id: NodeId) {
        timeout(PATIENCE, self.lifecycle(id).wait_active())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "node {id} never turned active: {:?}",
                    self.lifecycle(id).phase()
                )
            })
            .unwrap();
    }

    async fn wait_phase(&self, id: NodeId, want: Phase) {
        let mut phase = self.lifecycle(id).watch_phase();
        timeout(PATIENCE, phase.wait_for(|p| *p == want))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "node {id} never reached {want:?}: {:?}",
                    self.lifecycle(id).phase()
                )
            })
            .unwrap();
    }

    /// Waits until every running node's view has exactly `members` as placement members and
    /// nobody pending, and returns one of those views.
    async fn wait_settled_view(&self, members: &[NodeId]) -> Arc<Topology> {
        let mut last = None;
        for (id, node) in &self.nodes {
            let Some(handle) = &node.lifecycle else {
                continue;
            };
            let mut view = handle.watch_view();
            let settled = |v: &ClusterView| {
                v.topology.pending().count() == 0
                    && v.topology.nodes().map(|n| n.id).collect::<Vec<_>>() == members
            };
            timeout(PATIENCE, view.wait_for(settled))
                .await
                .unwrap_or_else(|_| panic!("node {id} never settled on {members:?}"))
                .unwrap();
            last = Some(view.borrow().topology.clone());
        }
        for node in self.nodes.values() {
            node.coord.settle().await;
        }
        last.unwrap()
    }
}

fn part_of(key: &str) -> Partition {
    partition_of(key.as_bytes(), PARTITIONS)
}

async fn write(coord: &Coord, key: &str) {
    coord
        .write(
            part_of(key),
            vec![ReplicaOp::put(USERS, key.into(), "v".into(), 1)],
        )
        .await
        .unwrap_or_else(|e| panic!("write {key}: {e}"));
}

/// Writes `count` keys `prefix0..` through `coord`; returns them.
async fn write_keys(coord: &Coord, prefix: &str, count: usize) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0..count {
        let key = format!("{prefix}{i}");
        write(coord, &key).await;
        keys.push(key);
    }
    keys
}

/// The keys some read quorum of their replica set in `view` would miss: those that at least
/// `R` of the set's replicas lack (a read quorum of exactly those sees nothing).
fn missed_by_some_read_quorum(cluster: &Cluster, view: &Topology, keys: &[String]) -> Vec<String> {
    keys.iter()
        .filter(|key| {
            let set = view.replica_set(part_of(key));
            let lacking = set
                .iter()
                .filter(|n| {
                    cluster
                        .node(n.id)
                        .store
                        .record(USERS, key.as_bytes())
                        .is_none()
                })
                .count();
            lacking >= read_quorum(set.len())
        })
        .cloned()
        .collect()
}

/// Two active members, RF 2, with `count` keys written through node 1.
async fn two_members_with_data(cluster: &mut Cluster, count: usize) -> Vec<String> {
    assert_eq!(cluster.start(1).await, StartedAs::First);
    assert_eq!(cluster.start(2).await, StartedAs::Joining);
    cluster.wait_active(2).await;
    cluster.wait_settled_view(&[1, 2]).await;
    write_keys(cluster.coord(1), "a", count).await
}

fn pending_of(gossip: &MemoryGossip, id: NodeId) -> Vec<NodeId> {
    gossip.member(id).unwrap().pending
}

#[tokio::test(start_paused = true)]
async fn a_node_joins_behind_the_barrier_and_every_acked_write_survives() {
    let mut cluster = Cluster::with_coordinators(
        2,
        CoordinatorConfig {
            write_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            read_repair: false,
            ..CoordinatorConfig::default()
        },
    );
    let mut acked = two_members_with_data(&mut cluster, 100).await;

    // A write node 2 coordinates under the old view, slow to be acked (node 1 answers after
    // 3 s): node 2 cannot publish node 3 as pending before it ends.
    cluster
        .net
        .set_link(2, 1, Link::Delay(Duration::from_secs(3)));
    let slow = {
        let coord = cluster.coord(2).clone();
        tokio::spawn(async move { write(&coord, "slow").await })
    };
    sleep(Duration::from_millis(10)).await;

    assert_eq!(cluster.start(3).await, StartedAs::Joining);
    // Writes keep coming through node 1 during the join.
    let during = Arc::new(Mutex::new(Vec::new()));
    let stop_writing = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (coord, during, stop) = (
            cluster.coord(1).clone(),
            during.clone(),
            stop_writing.clone(),
        );
        tokio::spawn(async move {
            for i in 0.. {
                let key = format!("d{i}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = write(&coord, &key) => during.lock().push(key),
                }
                sleep(Duration::from_millis(50)).await;
            }
        })
    };

    // The barrier: node 1 publishes node 3 as pending at once, node 2 only once its slow
    // write is done, and node 3 waits for both.
    sleep(Duration::from_secs(1)).await;
    assert_eq!(cluster.lifecycle(3).phase(), Phase::AwaitingBarrier);
    assert_eq!(pending_of(&cluster.gossip, 1), [3]);
    assert!(pending_of(&cluster.gossip, 2).is_empty());
    assert!(!slow.is_finished());

    cluster.wait_active(3).await;
    slow.await.unwrap();
    acked.push("slow".into());
    assert!(
        !during.lock().is_empty(),
        "no write was acked during the join"
    );
    assert_eq!(cluster.gossip.member(3).unwrap().state, Lifecycle::Active);
    assert!(cluster.node(3).marker.get());
    sleep(Duration::from_secs(1)).await;
    stop_writing.cancel();
    writer.await.unwrap();
    cluster.net.heal();
    acked.extend(during.lock().iter().cloned());

    // Every member now places partitions over all three, and every read quorum of the new
    // replica sets sees every write acked before and during the join.
    let view = cluster.wait_settled_view(&[1, 2, 3]).await;
    assert!(view.nodes().all(|n| n.live));
    let missed = missed_by_some_read_quorum(&cluster, &view, &acked);
    assert!(missed.is_empty(), "lost after the join: {missed:?}");
    // Node 3 holds partitions now, and got them by pulling.
    assert!(cluster.node(3).store.len() > 50);
    cluster.stop_all().await;
}

/// What happens to the barrier while the joining node pulls.
enum Disturbance {
    /// Node 1's view changes and changes back (another node came and went): it publishes
    /// the same pending list again, with a new version.
    Republish,
    /// Node 2 restarts (on its data dir): a new generation.
    Restart,
}

/// Node 3 joins nodes 1 and 2 with slow links to them (each pull request takes 2 s), and
/// `disturbance` happens while its first pull is under way: it pulls again before it turns
/// active, and loses nothing.
async fn join_disturbed_during_the_pull(disturbance: Disturbance) {
    let mut cluster = Cluster::new(2);
    let acked = two_members_with_data(&mut cluster, 40).await;
    cluster
        .net
        .set_link(3, 1, Link::Delay(Duration::from_secs(2)));
    cluster
        .net
        .set_link(3, 2, Link::Delay(Duration::from_secs(2)));
    assert_eq!(cluster.start(3).await, StartedAs::Joining);
    cluster.wait_phase(3, Phase::Pulling { attempt: 1 }).await;
    match disturbance {
        Disturbance::Republish => {
            let before = cluster.gossip.member(1).unwrap();
            let m = cluster.node(1).membership.clone();
            m.set_pending(&[3, 4]).await;
            m.set_pending(&[3]).await;
            let after = cluster.gossip.member(1).unwrap();
            assert_eq!(after.pending, before.pending);
            assert!(after.pending_version > before.pending_version);
        }
        Disturbance::Restart => {
            let before = cluster.gossip.member(2).unwrap().generation;
            cluster.stop(2).await;
            assert_eq!(cluster.start(2).await, StartedAs::Returning);
            assert!(cluster.gossip.member(2).unwrap().generation > before);
        }
    }
    assert_eq!(cluster.lifecycle(3).phase(), Phase::Pulling { attempt: 1 });
    cluster.wait_phase(3, Phase::Pulling { attempt: 2 }).await;
    cluster.wait_active(3).await;
    let view = cluster.wait_settled_view(&[1, 2, 3]).await;
    let missed = missed_by_some_read_quorum(&cluster, &view, &acked);
    assert!(missed.is_empty(), "lost after the join: {missed:?}");
    cluster.stop_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_member_republishing_its_pending_list_during_the_pull_makes_the_join_pull_again() {
    join_disturbed_during_the_pull(Disturbance::Republish).await;
}

#[tokio::test(start_paused = true)]
async fn a_member_restarting_during_the_pull_makes_the_join_pull_again() {
    join_disturbed_during_the_pull(Disturbance::Restart).await;
}

#[tokio::test(start_paused = true)]
async fn a_node_that_cannot_pull_a_read_quorum_stays_joining() {
    let mut cluster = Cluster::new(2);
    let acked = two_members_with_data(&mut cluster, 40).await;
    // Gossip says nodes 1 and 2 are live and list node 3 as pending, but node 3 cannot
    // reach their replicas.
    cluster.net.set_link(3, 1, Link::Down);
    cluster.net.set_link(3, 2, Link::Down);
    assert_eq!(cluster.start(3).await, StartedAs::Joining);
    sleep(Duration::from_secs(30)).await;
    let phase = cluster.lifecycle(3).phase();
    assert!(
        matches!(phase, Phase::PullIncomplete { attempt } | Phase::Pulling { attempt } if attempt > 5),
        "{phase:?}"
    );
    assert_eq!(cluster.gossip.member(3).unwrap().state, Lifecycle::Joining);
    assert!(!cluster.node(3).marker.get());
    // Pending in every view, never a placement member.
    assert!(!cluster.coord(1).topology().is_member(3));
    assert!(cluster.coord(1).topology().node(3).is_some());

    // Once it can reach them, it joins.
    cluster.net.heal();
    cluster.wait_active(3).await;
    let view = cluster.wait_settled_view(&[1, 2, 3]).await;
    assert!(missed_by_some_read_quorum(&cluster, &view, &acked).is_empty());
    cluster.stop_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_returning_member_starts_active_and_catches_up_once() {
    // Hints off: what node 3 misses, only the catch-up pull brings back (as after the other
    // coordinators restarted).
    let mut cluster = Cluster::with_coordinators(
        3,
        CoordinatorConfig {
            write_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            hints: HintLimits {
                max_batches: 0,
                max_bytes: 0,
            },
            ..CoordinatorConfig::default()
        },
    );
    assert_eq!(cluster.start(1).await, StartedAs::First);
    for id in [2, 3] {
        assert_eq!(cluster.start(id).await, StartedAs::Joining);
        cluster.wait_active(id).await;
    }
    cluster.wait_settled_view(&[1, 2, 3]).await;
    let before = write_keys(cluster.coord(1), "a", 20).await;

    // Node 3 goes down; writes go on with W = 2 of 3.
    cluster.stop(3).await;
    cluster.gossip.set_live(3, false);
    cluster.net.set_node(3, Link::Down);
    let missed = write_keys(cluster.coord(1), "m", 30).await;
    cluster.net.heal();
    assert!(missed
        .iter()
        .all(|k| cluster.node(3).store.record(USERS, k.as_bytes()).is_none()));

    // It comes back on its data dir: active at once, no pull first.
    let started = Instant::now();
    assert_eq!(cluster.start(3).await, StartedAs::Returning);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(cluster.lifecycle(3).is_active());
    assert_eq!(cluster.gossip.member(3).unwrap().state, Lifecycle::Active);
    assert!(cluster.coord(3).topology().is_member(3));
    assert!(cluster.node(3).store.record(USERS, b"m0").is_none());

    // The catch-up pull, after the configured delay, brings back what it missed.
    sleep(cluster.config().catch_up_delay + Duration::from_secs(1)).await;
    for k in missed.iter().chain(&before) {
        assert!(
            cluster.node(3).store.record(USERS, k.as_bytes()).is_some(),
            "{k} not caught up"
        );
    }
    // Once only (no anti-entropy interval): nothing missed later is pulled.
    cluster.net.set_node(3, Link::Down);
    let later = write_keys(cluster.coord(1), "l", 10).await;
    cluster.net.heal();
    sleep(Duration::from_secs(60)).await;
    assert!(later
        .iter()
        .all(|k| cluster.node(3).store.record(USERS, k.as_bytes()).is_none()));
    cluster.stop_all().await;
}

#[tokio::test(start_paused = true)]
async fn the_first_node_starts_at_once_and_a_seeded_one_waits_for_the_cluster() {
    // No seeds elsewhere: the first node of a new cluster, active without waiting.
    let mut cluster = Cluster::new(2);
    let started = Instant::now();
    assert_eq!(cluster.start(1).await, StartedAs::First);
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(cluster.lifecycle(1).is_active());
    assert!(cluster.node(1).marker.get());
    assert_eq!(cluster.gossip.member(1).unwrap().state, Lifecycle::Active);
    assert!(cluster.coord(1).topology().is_member(1));

    // Seeded with node 1's address, node 2 hears from it after 2.05 s: it waits that long
    // (woken by the membership change, not by polling), then joins instead of taking
    // itself for the first node.
    let config = LifecycleConfig {
        seeded: true,
        ..cluster.config()
    };
    let lifecycle = cluster.incarnate(2, false, config.clone());
    let started = Instant::now();
    let heard_after = Duration::from_millis(2050);
    let (handle, ()) = tokio::join!(lifecycle.start(), async {
        sleep(heard_after).await;
        cluster.gossip.hear(2);
    });
    let handle = handle.unwrap();
    assert_eq!(started.elapsed(), heard_after);
    assert_eq!(handle.started_as(), StartedAs::Joining);
    // Its first view is in place before start returns: node 1 holds everything, node 2 is
    // pending.
    let first = cluster.coord(2).topology();
    assert_eq!(first.nodes().map(|n| n.id).collect::<Vec<_>>(), [1]);
    assert_eq!(first.joining_ids(), [2]);
    cluster.set_handle(2, handle);
    cluster.wait_active(2).await;
    cluster.stop_all().await;

    // Seeded, but nobody answers: it waits the configured time, then starts a new cluster.
    let mut alone = Cluster::new(2);
    let lifecycle = alone.incarnate(1, false, config.clone());
    let started = Instant::now();
    let handle = lifecycle.start().await.unwrap();
    assert_eq!(started.elapsed(), config.seed_wait);
    assert_eq!(handle.started_as(), StartedAs::First);
    assert!(handle.is_active());
    alone.set_handle(1, handle);
    alone.stop_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_joining_node_that_stops_never_becomes_a_member() {
    let mut cluster = Cluster::new(2);
    let acked = two_members_with_data(&mut cluster, 40).await;
    cluster.net.set_link(3, 1, Link::Down);
    cluster.net.set_link(3, 2, Link::Down);
    assert_eq!(cluster.start(3).await, StartedAs::Joining);
    sleep(Duration::from_secs(5)).await;
    // It stops before it could pull: `leaving` would make it a placement member (a live
    // replica with none of its partitions' data) in every other node's view.
    cluster.stop(3).await;
    assert_eq!(cluster.gossip.member(3).unwrap().state, Lifecycle::Joining);
    sleep(Duration::from_secs(1)).await;
    for id in [1, 2] {
        let view = cluster.coord(id).topology();
        assert!(!view.is_member(3), "node {id} places data on node 3");
        assert!(missed_by_some_read_quorum(&cluster, &view, &acked).is_empty());
    }
    // An active member that stops does say `leaving` (it keeps its place).
    cluster.stop(2).await;
    assert_eq!(cluster.gossip.member(2).unwrap().state, Lifecycle::Leaving);
    sleep(Duration::from_secs(1)).await;
    assert!(cluster.coord(1).topology().is_member(2));
    cluster.stop_all().await;
}

/// A membership that panics on reads once told to (a bug in a task).
struct Panicky {
    inner: MemoryMembership,
    panic: std::sync::atomic::AtomicBool,
}

impl MembershipPort for Panicky {
    fn node_id(&self) -> NodeId {
        self.inner.node_id()
    }

    async fn members(&self) -> Vec<cluster::Member> {
        assert!(
            !self.panic.load(std::sync::atomic::Ordering::SeqCst),
            "a bug in a lifecycle task"
        );
        self.inner.members().await
    }

    fn watch_members(&self) -> tokio::sync::watch::Receiver<Vec<cluster::Member>> {
        self.inner.watch_members()
    }

    async fn set_state(&self, state: Lifecycle) {
        self.inner.set_state(state).await;
    }

    async fn set_pending(&self, pending: &[NodeId]) {
        self.inner.set_pending(pending).await;
    }

    async fn set_removals(&self, removals: &cluster::membership::Removals) {
        self.inner.set_removals(removals).await;
    }

    async fn set_moved(&self, mark: &str) {
        self.inner.set_moved(mark).await;
    }

    async fn set_move_progress(&self, progress: cluster::membership::MoveProgress) {
        self.inner.set_move_progress(progress).await;
    }
}

#[tokio::test(start_paused = true)]
async fn shutdown_reports_a_task_that_panicked() {
    let gossip = MemoryGossip::new();
    let net = MemoryNetwork::new();
    let membership = Arc::new(Panicky {
        inner: gossip.join(1),
        panic: false.into(),
    });
    let store = Arc::new(MemoryReplica::new());
    let coordinator = Coordinator::new(
        store,
        RpcReplicaClient::new(net.endpoint(1)),
        Topology::new(1, 2, []),
        CoordinatorConfig::default(),
    );
    let handle = ClusterLifecycle {
        config: LifecycleConfig::new(2, PullPlan::new(vec![USERS], PARTITIONS)),
        membership: membership.clone(),
        coordinator,
        marker: Box::new(MemoryMarker::new(false)),
    }
    .start()
    .await
    .unwrap();
    // The follower reads members on the next change, and panics.
    membership
        .panic
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let _other = gossip.join(2);
    sleep(Duration::from_millis(10)).await;
    let failed = handle.shutdown().await.unwrap_err();
    // Both tasks that follow membership read it on the change, and both panic.
    assert_eq!(failed.panicked, ["topology follower", "moves"]);
    assert!(failed.timed_out.is_empty());
}

/// Four active members, RF 3, with `count` keys written through node 1.
async fn four_members_with_data(cluster: &mut Cluster, count: usize) -> Vec<String> {
    assert_eq!(cluster.start(1).await, StartedAs::First);
    for id in 2..=4 {
        assert_eq!(cluster.start(id).await, StartedAs::Joining);
        cluster.wait_active(id).await;
    }
    cluster.wait_settled_view(&[1, 2, 3, 4]).await;
    write_keys(cluster.coord(1), "a", count).await
}

/// Writes through node 1 every 50 ms until cancelled; every write must be acked (a refused
/// one panics the task, which the caller's `await` reports).
fn steady_writes(
    cluster: &Cluster,
    prefix: &'static str,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let stop = tokio_util::sync::CancellationToken::new();
    let coord = cluster.coord(1).clone();
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0.. {
                let key = format!("{prefix}{i}");
                tokio::select! {
                    _ = stop.cancelled() => return acked,
                    _ = write(&coord, &key) => acked.push(key),
                }
                sleep(Duration::from_millis(50)).await;
            }
            acked
        })
    };
    (stop, task)
}

/// The keys some replica of their set in `view` lacks.
fn not_on_every_replica(cluster: &Cluster, view: &Topology, keys: &[String]) -> Vec<String> {
    keys.iter()
        .filter(|key| {
            view.replica_set(part_of(key)).iter().any(|n| {
                cluster
                    .node(n.id)
                    .store
                    .record(USERS, key.as_bytes())
                    .is_none()
            })
        })
        .cloned()
        .collect()
}

/// Waits until every running node places partitions over nodes 1 to 3 only, and checks
/// that every key of `acked` is on all 3 replicas of its set; returns the view.
async fn settled_on_three_with_every_key(cluster: &Cluster, acked: &[String]) -> Arc<Topology> {
    let view = cluster.wait_settled_view(&[1, 2, 3]).await;
    let missing = not_on_every_replica(cluster, &view, acked);
    assert!(
        missing.is_empty(),
        "{} acked keys not on all 3 replicas: {missing:?}",
        missing.len()
    );
    view
}

async fn ask(
    cluster: &Cluster,
    at: NodeId,
    what: cluster::lifecycle::Request,
) -> Result<(), cluster::lifecycle::RequestError> {
    let view = cluster.lifecycle(at).watch_view().borrow().topology.clone();
    cluster::lifecycle::request(
        &*cluster.node(at).membership,
        &view,
        cluster.lifecycle(at).is_active(),
        what,
    )
    .await
}

#[tokio::test(start_paused = true)]
async fn a_decommissioned_node_hands_its_partitions_over_under_load_and_stops() {
    use cluster::lifecycle::{Request, RequestError};
    let mut cluster = Cluster::new(3);
    let mut acked = four_members_with_data(&mut cluster, 200).await;
    let held_by_4 = cluster.node(4).store.len();
    assert!(held_by_4 > 50, "node 4 holds {held_by_4} records");

    let (stop, writer) = steady_writes(&cluster, "d");
    sleep(Duration::from_secs(1)).await;
    // Refusals: removing a live node, or this node through `remove`.
    assert_eq!(
        ask(&cluster, 1, Request::Remove(4)).await,
        Err(RequestError::Alive(4))
    );
    assert_eq!(
        ask(&cluster, 4, Request::Remove(4)).await,
        Err(RequestError::IsSelf(4))
    );
    ask(&cluster, 4, Request::Decommission).await.unwrap();
    assert!(matches!(
        ask(&cluster, 4, Request::Decommission).await,
        Err(RequestError::AlreadyOutgoing(4, _))
    ));
    // Three would remain: a second decommission would leave fewer than RF.
    assert_eq!(
        ask(&cluster, 3, Request::Decommission).await,
        Err(RequestError::TooFew { left: 2, rf: 3 })
    );

    cluster.wait_phase(4, Phase::Left).await;
    sleep(Duration::from_secs(1)).await;
    stop.cancel();
    let during = writer.await.unwrap();
    assert!(
        during.len() > 20,
        "only {} writes during the move",
        during.len()
    );
    acked.extend(during);
    // Node 4 stops, as the node process does.
    cluster.stop(4).await;
    cluster.gossip.set_live(4, false);
    cluster.net.set_node(4, Link::Down);

    let view = settled_on_three_with_every_key(&cluster, &acked).await;
    assert_eq!(
        view.removals().state(4),
        Some(cluster::membership::RemovalState::Done)
    );
    // Every remaining node recorded the map on its "disk", so the removal outlives a
    // restart of the whole cluster (gossip alone would forget it).
    for id in [1, 2, 3] {
        let recorded = cluster.node(id).marker.removals().unwrap().unwrap();
        assert_eq!(
            cluster::membership::Removals::parse(&recorded).state(4),
            Some(cluster::membership::RemovalState::Done),
            "node {id} recorded {recorded:?}"
        );
    }
    // A done id cannot be cancelled, and cannot start again.
    assert_eq!(
        ask(&cluster, 1, Request::Cancel(4)).await,
        Err(RequestError::Done(4))
    );
    let lifecycle = cluster.incarnate(4, true, cluster.config());
    assert!(matches!(
        lifecycle.start().await,
        Err(cluster::lifecycle::StartError::Removed(4))
    ));
    cluster.stop_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_dead_node_removed_for_good_leaves_every_partition_with_three_live_replicas() {
    use cluster::lifecycle::Request;
    let mut cluster = Cluster::new(3);
    let mut acked = four_members_with_data(&mut cluster, 200).await;
    // Node 4 dies for good (kill -9: no shutdown, its gossip state stays `active`).
    cluster.node_mut(4).lifecycle.take();
    cluster.gossip.set_live(4, false);
    cluster.net.set_node(4, Link::Down);
    acked.extend(write_keys(cluster.coord(1), "m", 50).await);

    let (stop, writer) = steady_writes(&cluster, "r");
    sleep(Duration::from_secs(1)).await;
    ask(&cluster, 2, Request::Remove(4)).await.unwrap();
    let view = cluster.wait_settled_view(&[1, 2, 3]).await;
    sleep(Duration::from_secs(1)).await;
    stop.cancel();
    acked.extend(writer.await.unwrap());
    let view = {
        // Settled again after the last writes.
        let _ = view;
        cluster.wait_settled_view(&[1, 2, 3]).await
    };
    assert!(view.nodes().all(|n| n.live));
    assert_eq!(view.replica_set(Partition(0)).len(), 3);
    let missing = not_on_every_replica(&cluster, &view, &acked);
    assert!(
        missing.is_empty(),
        "{} acked keys not on all 3 replicas: {missing:?}",
        missing.len()
    );
    cluster.stop_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_removal_keeps_the_node_in_place() {
    use cluster::lifecycle::{Request, RequestError};
    let mut cluster = Cluster::new(3);
    let acked = four_members_with_data(&mut cluster, 50).await;
    // Node 3 cannot pull from anyone, so the move cannot complete before the cancel.
    for other in [1, 2, 4] {
        cluster.net.set_link(3, other, Link::Down);
    }
    ask(&cluster, 4, Request::Decommission).await.unwrap();
    sleep(Duration::from_secs(10)).await;
    assert!(cluster.coord(1).topology().is_outgoing(4));
    assert_eq!(cluster.lifecycle(4).phase(), Phase::Active);
    ask(&cluster, 1, Request::Cancel(4)).await.unwrap();
    sleep(Duration::from_millis(100)).await;
    assert_eq!(
        ask(&cluster, 1, Request::Cancel(4)).await,
        Err(RequestError::NotOutgoing(4))
    );
    cluster.net.heal();
    cluster.wait_settled_view(&[1, 2, 3, 4]).await;
    sleep(Duration::from_secs(10)).await;
    // Looked at after the wait: no late `done` took node 4 out meanwhile.
    let view = cluster.coord(1).topology();
    assert!(view.is_member(4) && !view.is_outgoing(4));
    assert_eq!(
        view.removals().state(4),
        Some(cluster::membership::RemovalState::Cancelled)
    );
    assert_eq!(cluster.lifecycle(4).phase(), Phase::Active);
    assert!(missed_by_some_read_quorum(&cluster, &view, &acked).is_empty());
    cluster.stop_all().await;
}

#[tokio::test(start_paused = true)]
async fn a_removal_cancelled_and_asked_again_is_pulled_again_before_it_completes() {
    use cluster::lifecycle::Request;
    let mut cluster = Cluster::new(3);
    let mut acked = four_members_with_data(&mut cluster, 50).await;
    // Node 3 cannot pull, so the first attempt cannot complete; nodes 1 and 2 do pull and
    // publish their marks.
    for other in [1, 2, 4] {
        cluster.net.set_link(3, other, Link::Down);
    }
    ask(&cluster, 4, Request::Decommission).await.unwrap();
    sleep(Duration::from_secs(10)).await;
    let first_marks: Vec<String> = [1, 2]
        .iter()
        .map(|id| cluster.gossip.member(*id).unwrap().moved)
        .collect();
    assert!(first_marks.iter().all(|m| !m.is_empty()), "{first_marks:?}");
    ask(&cluster, 1, Request::Cancel(4)).await.unwrap();
    sleep(Duration::from_secs(1)).await;
    // Written while node 4 holds its place again: only its old sets get them.
    acked.extend(write_keys(cluster.coord(1), "c", 50).await);
    ask(&cluster, 4, Request::Decommission).await.unwrap();
    cluster.net.heal();
    cluster.wait_phase(4, Phase::Left).await;
    // The marks of the first attempt did not count: they name the old version.
    for id in [1, 2] {
        let mark = cluster.gossip.member(id).unwrap().moved;
        assert!(!first_marks.contains(&mark), "node {id} kept {mark}");
    }
    cluster.stop(4).await;
    cluster.gossip.set_live(4, false);
    cluster.net.set_node(4, Link::Down);
    settled_on_three_with_every_key(&cluster, &acked).await;
    cluster.stop_all().await;
}
