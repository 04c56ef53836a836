//! The lifecycle's standing tasks: the topology follower and anti-entropy.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{ClusterView, MembershipPort, Shared};
use crate::membership::Member;
use crate::placement::NodeId;
use crate::replication::{LocalReplica, PullMode, ReplicaClient};

/// Follows membership: each change becomes the coordinator's topology and the view
/// subscribers see, and once the operations of the older view have drained, this node's
/// pending list in gossip (the joining nodes' barrier). `published` is the pending list
/// published last.
pub(super) async fn follow_topology<L: LocalReplica, C: ReplicaClient, M: MembershipPort>(
    shared: Arc<Shared<L, C, M>>,
    mut members_rx: watch::Receiver<Vec<Member>>,
    view: watch::Sender<ClusterView>,
    mut published: Vec<NodeId>,
) {
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            changed = members_rx.changed() => if changed.is_err() {
                warn!("membership stopped; the topology follower stops");
                return;
            },
        }
        let members = shared.membership.members().await;
        metrics::gauge!("cluster_members_live")
            .set(members.iter().filter(|m| m.live).count() as f64);
        record_members_by_state(&members);
        let topology = shared.topology_of(&members);
        let pending = topology.joining_ids();
        view.send_replace(ClusterView {
            members: members.into(),
            topology: Arc::new(topology.clone()),
        });
        // Published only once operations of the older view have ended: the joining nodes'
        // barrier.
        let changed = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            changed = shared.coord.set_topology_drained(topology) => changed,
        };
        if changed && pending != published {
            shared.membership.set_pending(&pending).await;
            published = pending;
        }
    }
}

/// `cluster_members{state, live}`: the members this node sees, per published state and
/// failure-detector verdict (every combination is set, so a state that empties reads 0).
fn record_members_by_state(members: &[Member]) {
    use crate::membership::Lifecycle;
    for state in [Lifecycle::Joining, Lifecycle::Active, Lifecycle::Leaving] {
        for live in [true, false] {
            let n = members
                .iter()
                .filter(|m| m.state == state && m.live == live)
                .count();
            metrics::gauge!(
                "cluster_members",
                "state" => state.as_str(),
                "live" => if live { "true" } else { "false" }
            )
            .set(n as f64);
        }
    }
}

/// Anti-entropy: after a restart (`restarted`), one catch-up pass over this node's
/// partitions once gossip had time to find the other replicas (it missed writes while down,
/// and hints live in the other nodes' memory), then one pass every
/// [`super::LifecycleConfig::anti_entropy`].
pub(super) async fn anti_entropy<L: LocalReplica, C: ReplicaClient, M: MembershipPort>(
    shared: Arc<Shared<L, C, M>>,
    restarted: bool,
) {
    let every = shared.config.anti_entropy;
    let mut wait = match (restarted, every) {
        (true, _) => shared.config.catch_up_delay,
        (false, Some(every)) => every,
        (false, None) => return,
    };
    // The first pass after a restart pulls only what changed since the node went down.
    let mut plan = if restarted {
        shared.config.plan.since(shared.config.catch_up_since)
    } else {
        shared.config.plan.clone()
    };
    loop {
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let is_member = shared.coord.topology().is_member(shared.self_id);
        let live_members = shared.membership.watch_members().borrow().len();
        if is_member && live_members > 1 {
            let owned = shared.own_partitions(false);
            let started = Instant::now();
            let report = tokio::select! {
                _ = shared.cancel.cancelled() => return,
                r = shared.coord.pull(&owned, &plan, PullMode::CatchUp) => r,
            };
            metrics::counter!("cluster_pulled_records_total").increment(report.records);
            info!(
                partitions = report.partitions,
                records = report.records,
                incomplete = report.incomplete.len(),
                since = ?plan.since,
                ms = started.elapsed().as_millis() as u64,
                "anti-entropy pass done"
            );
        }
        plan = shared.config.plan.clone();
        match every {
            Some(every) => wait = every,
            None => return,
        }
    }
}
