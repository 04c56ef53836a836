//! The cluster lifecycle of a node: how it enters the cluster and keeps its place there.
//!
//! [`ClusterLifecycle::start`] decides how this node enters ([`StartedAs`], see [`decide`]):
//!
//! - **first**: no other node is (or was) an active member: the first node of a new
//!   cluster, active at once. A new node seeded with another node's address first waits up
//!   to [`LifecycleConfig::seed_wait`] to hear from the cluster, so slow gossip does not
//!   make it skip the pull;
//! - **returning**: its [`MemberMarker`] says it has held partitions: active at once, and it
//!   catches up on what it missed with one pull after [`LifecycleConfig::catch_up_delay`];
//! - **joining**: any other node. It stays `joining`, pending in every member's topology (so
//!   every write of a partition it will hold reaches it), until it has pulled a read quorum
//!   of each of those partitions behind the join barrier (`join.rs`).
//!
//! It installs the first topology in the coordinator before it returns (no operation may
//! run on a view that knows only this node), and then runs three tasks owned by the
//! [`LifecycleHandle`]: the join (joining nodes only), anti-entropy (a pass over this
//! node's partitions every [`LifecycleConfig::anti_entropy`]), and the topology follower
//! (membership changes become the coordinator's topology, and the pending list this node
//! publishes for joining nodes once the older view has drained).
//!
//! # Layout
//!
//! - `port.rs`: [`MembershipPort`], what the lifecycle needs from gossip; implemented by
//!   [`crate::Membership`] and by the in-memory twin [`crate::membership::memory`].
//! - `marker.rs`: [`MemberMarker`], the durable "has held partitions" fact.
//! - `join.rs`: the join barrier and the join task.
//! - `background.rs`: the topology follower and anti-entropy.
//! - `handle.rs`: [`LifecycleHandle`]: state, waiting, the membership view, shutdown.
//! - `changes.rs`: [`member_changes`], a pure diff of member lists for the node's own
//!   reactions to peers coming and going.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::membership::{Lifecycle, Member};
use crate::placement::{NodeId, Partition};
use crate::replication::{Coordinator, LocalReplica, PullPlan, ReplicaClient, Topology};

mod background;
mod changes;
mod handle;
mod join;
mod marker;
mod moves;
mod port;

pub use changes::{member_changes, MemberChange};
pub use handle::{LifecycleHandle, NeverActive, TasksFailed};
pub use marker::{FileMarker, MarkerError, MemberMarker, MemoryMarker};
pub use moves::{
    current_mark, gained_partitions, moving_partitions, request, waiting_for, Request, RequestError,
};
pub use port::MembershipPort;

/// The name a node's peer certificate is issued for (its TLS server name).
pub fn node_cert_name(node: NodeId) -> String {
    format!("node-{node}")
}

/// Timers and cluster constants of the lifecycle.
#[derive(Clone, Debug)]
pub struct LifecycleConfig {
    /// Replicas per partition (sets are smaller while the cluster has fewer members).
    pub replication_factor: usize,
    /// What a pull copies: the replicated tables and the cluster's partition count
    /// (`plan.partition_count`, fixed when the cluster is created), with page sizes.
    pub plan: PullPlan,
    /// Time between anti-entropy passes (a pull of this node's partitions from their other
    /// replicas); `None`: only the catch-up pass after a restart. Default: one hour.
    pub anti_entropy: Option<Duration>,
    /// Whether this node was given another node's gossip address as a seed
    /// ([`seeds_elsewhere`]). Default: false.
    pub seeded: bool,
    /// How long a new, seeded node waits to hear from another node before it takes itself
    /// for the first node of a new cluster. Default: 10 s.
    pub seed_wait: Duration,
    /// How long a returning member waits before its catch-up pull, so that gossip finds the
    /// other replicas first. Default: 3 s.
    pub catch_up_delay: Duration,
    /// What a returning member's catch-up pulls: only records versioned after this clock
    /// reading (about when it went down, less a margin), so a restart costs what changed
    /// meanwhile, not every record again; `None`: everything. Later anti-entropy passes pull
    /// everything. Default: `None`.
    pub catch_up_since: Option<u64>,
    /// Pause before the next join pull after one that lacked a read quorum of complete
    /// answers for some partition. Default: 2 s.
    pub join_retry: Duration,
    /// How long [`LifecycleHandle::shutdown`] waits for the tasks before aborting them.
    /// Default: 3 s.
    pub shutdown_timeout: Duration,
    /// The name each member's peer certificate is valid for. Default: [`node_cert_name`].
    pub server_name: fn(NodeId) -> String,
}

impl LifecycleConfig {
    /// The defaults for a cluster of replication factor `replication_factor` whose pulls
    /// follow `plan`.
    pub fn new(replication_factor: usize, plan: PullPlan) -> Self {
        Self {
            replication_factor,
            plan,
            anti_entropy: Some(Duration::from_secs(3600)),
            seeded: false,
            seed_wait: Duration::from_secs(10),
            catch_up_delay: Duration::from_secs(3),
            catch_up_since: None,
            join_retry: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(3),
            server_name: node_cert_name,
        }
    }
}

/// Whether any of `seeds` names another node than this one (whose gossip socket listens on
/// `listen` and is advertised as `advertise`). A seed that is not an `ip:port` (a host
/// name) counts as another node.
pub fn seeds_elsewhere(seeds: &[String], listen: SocketAddr, advertise: SocketAddr) -> bool {
    seeds.iter().any(|s| {
        s.parse::<SocketAddr>()
            .map_or(true, |a| a != listen && a != advertise)
    })
}

/// How this node entered the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartedAs {
    /// The first node of a new cluster: no other node is or was an active member.
    First,
    /// A member coming back (its marker is set): active at once, catching up.
    Returning,
    /// A new node in a cluster that holds data: it pulls its partitions before it counts.
    Joining,
}

/// How a node enters, from its marker and the members it knows of (dead ones included: a
/// cluster whose members are all down still has data).
pub fn decide(self_id: NodeId, was_member: bool, members: &[Member]) -> StartedAs {
    let cluster_has_data = members
        .iter()
        .any(|m| m.node_id != self_id && matches!(m.state, Lifecycle::Active | Lifecycle::Leaving));
    if was_member {
        StartedAs::Returning
    } else if cluster_has_data {
        StartedAs::Joining
    } else {
        StartedAs::First
    }
}

/// Where this node is in its lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Joining: waiting until every other live member publishes this node as pending.
    AwaitingBarrier,
    /// Joining: pulling the partitions it will hold; `attempt` counts pulls from 1.
    Pulling {
        /// Which pull this is.
        attempt: u32,
    },
    /// Joining: pull `attempt` lacked a read quorum of complete answers for some partition;
    /// the next one starts after [`LifecycleConfig::join_retry`].
    PullIncomplete {
        /// The pull that fell short.
        attempt: u32,
    },
    /// An active member: it holds its partitions and serves their reads.
    Active,
    /// Its removal is done (it was decommissioned, or removed while it was away): it holds
    /// no partition any more and should stop.
    Left,
}

/// What the topology follower last read from membership.
#[derive(Clone, Debug)]
pub struct ClusterView {
    /// Every member gossip knows of, dead ones and older generations included.
    pub members: Arc<[Member]>,
    /// The topology built from them (the coordinator switches to it at the same time).
    pub topology: Arc<Topology>,
}

/// What starting the lifecycle needs. Start it with [`ClusterLifecycle::start`].
pub struct ClusterLifecycle<L: LocalReplica, C: ReplicaClient, M: MembershipPort> {
    /// Timers and cluster constants.
    pub config: LifecycleConfig,
    /// This node's membership (gossip), already running.
    pub membership: Arc<M>,
    /// This node's coordinator; the lifecycle sets its topology from now on.
    pub coordinator: Coordinator<L, C>,
    /// Where "this node has held partitions" is recorded.
    pub marker: Box<dyn MemberMarker>,
}

/// The lifecycle could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The member marker could not be read or written.
    #[error(transparent)]
    Marker(#[from] MarkerError),
    /// This node id was removed from the cluster (decommissioned or removed): it can never
    /// hold partitions again.
    #[error("node id {0} was removed from this cluster and cannot come back; start this node on an empty data dir with a new --node-id")]
    Removed(NodeId),
}

/// What the lifecycle's tasks share.
struct Shared<L: LocalReplica, C: ReplicaClient, M: MembershipPort> {
    self_id: NodeId,
    config: LifecycleConfig,
    coord: Coordinator<L, C>,
    membership: Arc<M>,
    phase: Arc<watch::Sender<Phase>>,
    cancel: CancellationToken,
}

impl<L: LocalReplica, C: ReplicaClient, M: MembershipPort> Shared<L, C, M> {
    /// The topology gossip's `members` describe.
    fn topology_of(&self, members: &[Member]) -> Topology {
        let name = self.config.server_name;
        Topology::from_members(self.self_id, self.config.replication_factor, members, |m| {
            name(m.node_id)
        })
    }

    /// The partitions this node is (`future`: will be, once the pending nodes are active) a
    /// replica of, in the coordinator's current topology.
    fn own_partitions(&self, future: bool) -> Vec<Partition> {
        own_partitions(
            &self.coord.topology(),
            self.config.plan.partition_count,
            future,
        )
    }
}

/// The partitions of `0..count` whose replica set in `view` (`future`: future set) holds
/// `view`'s own node.
fn own_partitions(view: &Topology, count: u32, future: bool) -> Vec<Partition> {
    (0..count)
        .map(Partition)
        .filter(|p| {
            let set = if future {
                view.future_set(*p)
            } else {
                view.replica_set(*p)
            };
            set.iter().any(|n| n.id == view.self_id())
        })
        .collect()
}

impl<L: LocalReplica, C: ReplicaClient, M: MembershipPort> ClusterLifecycle<L, C, M> {
    /// Decides how this node enters ([`decide`]; a new seeded node first waits to hear from
    /// the cluster), publishes `active` unless it joins, installs the first topology and
    /// this node's pending list, and starts the tasks. Returns once the first view is in
    /// place.
    pub async fn start(self) -> Result<LifecycleHandle, StartError> {
        let Self {
            config,
            membership,
            coordinator,
            marker,
        } = self;
        let self_id = membership.node_id();
        let marker: Arc<dyn MemberMarker> = Arc::from(marker);
        let was_member = marker.is_set()?;
        // Removals this node recorded go back into gossip first: they outlive a restart of
        // the whole cluster (gossip alone forgets them).
        let recorded = marker
            .removals()?
            .map(|s| crate::membership::Removals::parse(&s))
            .unwrap_or_default();
        if !recorded.is_empty() {
            membership.set_removals(&recorded).await;
        }
        // A new node seeded with another node's address must not take itself for the first
        // node of a new cluster (and skip the pull) just because gossip was slow.
        if config.seeded && !was_member && !hear_from_cluster(&*membership, config.seed_wait).await
        {
            warn!(
                wait = ?config.seed_wait,
                "no other node answered through the seeds in time; starting as the first node of a new cluster"
            );
        }
        let known = membership.members().await;
        let mut removals = recorded.clone();
        for m in &known {
            removals.merge(&m.removals);
        }
        if removals.state(self_id) == Some(crate::membership::RemovalState::Done) {
            return Err(StartError::Removed(self_id));
        }
        let started_as = decide(self_id, was_member, &known);
        if started_as != StartedAs::Joining {
            marker.set()?;
            membership.set_state(Lifecycle::Active).await;
        }
        // The first view, before any client is served. The follower's watch is taken first,
        // so no change after this read goes unseen.
        let mut members_rx = membership.watch_members();
        members_rx.borrow_and_update();
        let members: Arc<[Member]> = membership.members().await.into();
        let phase = if started_as == StartedAs::Joining {
            Phase::AwaitingBarrier
        } else {
            Phase::Active
        };
        let shared = Arc::new(Shared {
            self_id,
            config,
            coord: coordinator,
            membership,
            phase: Arc::new(watch::channel(phase).0),
            cancel: CancellationToken::new(),
        });
        let first = shared.topology_of(&members);
        let pending = first.joining_ids();
        shared.coord.set_topology(first.clone());
        shared.membership.set_pending(&pending).await;
        let (view_tx, view_rx) = watch::channel(ClusterView {
            members,
            topology: Arc::new(first),
        });

        let tracker = TaskTracker::new();
        let mut tasks = Vec::new();
        tasks.push((
            "topology follower",
            tracker.spawn(background::follow_topology(
                shared.clone(),
                members_rx,
                view_tx,
                pending,
            )),
        ));
        if started_as == StartedAs::Joining {
            info!(
                node = self_id,
                "joining: pulling partitions before serving them"
            );
            tasks.push((
                "join",
                tracker.spawn(join::run(shared.clone(), marker.clone())),
            ));
        }
        tasks.push((
            "moves",
            tracker.spawn(moves::run(shared.clone(), marker, recorded)),
        ));
        let restarted = started_as == StartedAs::Returning;
        if restarted || shared.config.anti_entropy.is_some() {
            tasks.push((
                "anti-entropy",
                tracker.spawn(background::anti_entropy(shared.clone(), restarted)),
            ));
        }
        Ok(LifecycleHandle::new(handle::Parts {
            started_as,
            phase: shared.phase.clone(),
            view: view_rx,
            tracker,
            tasks,
            cancel: shared.cancel.clone(),
            publisher: shared.membership.clone(),
            shutdown_timeout: shared.config.shutdown_timeout,
        }))
    }
}

/// Waits until membership knows of another node, at most `wait`; whether it does.
async fn hear_from_cluster<M: MembershipPort>(membership: &M, wait: Duration) -> bool {
    let self_id = membership.node_id();
    let mut watch = membership.watch_members();
    let deadline = tokio::time::sleep(wait);
    tokio::pin!(deadline);
    loop {
        watch.borrow_and_update();
        if membership
            .members()
            .await
            .iter()
            .any(|m| m.node_id != self_id)
        {
            return true;
        }
        tokio::select! {
            _ = &mut deadline => return false,
            changed = watch.changed() => if changed.is_err() { return false },
        }
    }
}

#[cfg(test)]
mod tests;
