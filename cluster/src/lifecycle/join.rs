//! Joining: wait for the join barrier, pull a read quorum of every partition this node will
//! hold, check that the barrier stayed in place during the pull, record the marker, turn
//! active.
//!
//! **The barrier** holds when every other live node (any node coordinates writes, joining
//! ones too) publishes this node in its pending list. A node publishes that list only once
//! the operations of its older view have drained
//! ([`crate::replication::Coordinator::set_topology_drained`]), so from then on every write
//! of a partition this node will hold reaches it, and no write that bypasses it is still in
//! flight. Everything acked before is on a write quorum of the current set, which the pull
//! reads a read quorum of.
//!
//! The barrier must stay in place across the pull: if a member republished its pending list
//! (its view changed) or restarted (a new generation, whose first writes may predate its
//! pending list), writes may have bypassed this node meanwhile, so it pulls again.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{MemberMarker, MembershipPort, Phase, Shared};
use crate::membership::{Lifecycle, Member};
use crate::placement::NodeId;
use crate::replication::{LocalReplica, PullMode, ReplicaClient};

/// The join barrier as seen once: each other live node's generation and the gossip version
/// of its pending list. Equal snapshots before and after a pull mean no node changed the
/// view it treats this node in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Barrier(pub(super) BTreeMap<NodeId, (u64, u64)>);

/// The barrier, if it holds in `members`: every other live node lists `self_id` as pending.
pub(super) fn join_barrier(self_id: NodeId, members: &[Member]) -> Option<Barrier> {
    let mut snapshot = BTreeMap::new();
    for m in members {
        if m.node_id == self_id || !m.live {
            continue;
        }
        if !m.pending.contains(&self_id) {
            return None;
        }
        snapshot.insert(m.node_id, (m.generation, m.pending_version));
    }
    Some(Barrier(snapshot))
}

/// How one pull behind the barrier ended.
enum Pulled {
    /// Every partition got a read quorum of complete answers, and the barrier held.
    Done,
    /// Some partition lacks a read quorum of complete answers.
    Incomplete,
    /// A node changed its view during the pull.
    BarrierMoved,
}

/// The join task: retries until this node is active or the lifecycle stops.
pub(super) async fn run<L: LocalReplica, C: ReplicaClient, M: MembershipPort>(
    shared: Arc<Shared<L, C, M>>,
    marker: Arc<dyn MemberMarker>,
) {
    let started = Instant::now();
    let mut watch = shared.membership.watch_members();
    let mut attempt = 0;
    loop {
        // Marked seen before reading, so a change after the read wakes the wait below.
        watch.borrow_and_update();
        let members = shared.membership.members().await;
        let Some(barrier) = join_barrier(shared.self_id, &members) else {
            shared.phase.send_replace(Phase::AwaitingBarrier);
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                changed = watch.changed() => if changed.is_err() {
                    warn!("membership stopped; the join stops");
                    return;
                },
            }
            continue;
        };
        attempt += 1;
        shared.phase.send_replace(Phase::Pulling { attempt });
        let pulled = tokio::select! {
            _ = shared.cancel.cancelled() => return,
            pulled = pull_behind(&shared, &barrier) => pulled,
        };
        match pulled {
            Pulled::Done => break,
            Pulled::BarrierMoved => {}
            Pulled::Incomplete => {
                shared.phase.send_replace(Phase::PullIncomplete { attempt });
                tokio::select! {
                    _ = shared.cancel.cancelled() => return,
                    _ = tokio::time::sleep(shared.config.join_retry) => {}
                }
            }
        }
    }
    if let Err(e) = marker.set() {
        error!(error = %e, "pulled every partition but cannot record membership; staying joining");
        return;
    }
    shared.membership.set_state(Lifecycle::Active).await;
    shared.phase.send_replace(Phase::Active);
    info!(
        ms = started.elapsed().as_millis() as u64,
        attempts = attempt,
        "joined: active, serving reads of its partitions"
    );
}

/// One pull of the partitions this node will hold, behind `barrier`.
async fn pull_behind<L: LocalReplica, C: ReplicaClient, M: MembershipPort>(
    shared: &Shared<L, C, M>,
    barrier: &Barrier,
) -> Pulled {
    let owned = shared.own_partitions(true);
    let report = shared
        .coord
        .pull(&owned, &shared.config.plan, PullMode::Join)
        .await;
    metrics::counter!("cluster_pulled_records_total").increment(report.records);
    if !report.incomplete.is_empty() {
        warn!(
            incomplete = report.incomplete.len(),
            failed_sources = report.sources_failed,
            "join: some partitions lack a read quorum of complete answers; pulling again"
        );
        return Pulled::Incomplete;
    }
    let members = shared.membership.members().await;
    if join_barrier(shared.self_id, &members).as_ref() != Some(barrier) {
        info!("join: a node's view changed during the pull; pulling again");
        return Pulled::BarrierMoved;
    }
    info!(
        partitions = report.partitions,
        records = report.records,
        sources = report.sources_done,
        "join: every partition pulled"
    );
    Pulled::Done
}
