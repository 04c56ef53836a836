//! Moving partitions off outgoing nodes: decommission (a live node leaves) and remove (a
//! dead node will not come back), the reverse of joining.
//!
//! An operator's request becomes an entry of the removal map ([`Removals`], see [`request`]).
//! From then on every topology built from gossip holds the node *outgoing*: it stays in its
//! partitions' current sets, the future sets leave it out, and every read and write of a
//! partition whose set changes needs its quorum in both sets (as for a joining node, see
//! [`crate::replication::Topology::quorums`]).
//!
//! Every node runs [`run`]:
//!
//! 1. It republishes the merged removal map, so a request outlives the node that took it.
//! 2. **The move barrier**: once every live node publishes every outgoing id in its pending
//!    list (which it does only after the operations of its older view have drained), no
//!    write that bypasses the future sets is in flight. Then each remaining member pulls a
//!    read quorum of the current set of every partition it *gains* (in its future set, not
//!    in its current one), checks that the barrier stayed in place, and publishes the
//!    *move mark* it pulled for (`moved`, see [`current_mark`]: the outgoing removals with
//!    their versions and a digest of the barrier).
//! 3. **Completion**: when every remaining placement member (dead ones too: a dead member
//!    that gains a partition must pull it before it counts) publishes the current mark, the
//!    first node to see it marks those removals done. A done node is out of every topology
//!    for good; a decommissioned node that sees itself done stops ([`super::Phase::Left`])
//!    once every other view has dropped it.
//!
//! Several removals at once complete together (the mark covers the whole outgoing set), so
//! partitions never reach a set whose new members did not pull them. A removal cancelled
//! and asked again, or a node restarting or changing its view mid-move, changes the mark:
//! the members pull again before the move can complete, as a joining node does when its
//! barrier moves.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{MemberMarker, MembershipPort, Phase, Shared};
use crate::membership::{Member, MoveProgress, RemovalState, Removals};
use crate::placement::{NodeId, Partition};
use crate::replication::{LocalReplica, PullMode, ReplicaClient, Topology};

/// Partitions pulled per step of a move (progress is published after each).
const PULL_CHUNK: usize = 64;

/// How often the move task looks again without a membership change.
const RECHECK: Duration = Duration::from_secs(5);

/// How long a node whose removal is done waits for every other view to drop it.
const LEAVE_WAIT: Duration = Duration::from_secs(30);

/// The move barrier as seen once: each live node's generation and the gossip version of its
/// pending list (see [`super::join`]'s barrier, of which this is the twin).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Barrier(BTreeMap<NodeId, (u64, u64)>);

/// The barrier, if it holds: every live member lists every `outgoing` id as pending.
fn move_barrier(outgoing: &[NodeId], members: &[Member]) -> Option<Barrier> {
    let mut snapshot = BTreeMap::new();
    for m in members.iter().filter(|m| m.live) {
        if !outgoing.iter().all(|id| m.pending.contains(id)) {
            return None;
        }
        snapshot.insert(m.node_id, (m.generation, m.pending_version));
    }
    Some(Barrier(snapshot))
}

/// The mark a remaining member publishes once it has pulled what it gains behind the move
/// barrier as it holds now: every outgoing node with its removal's version, and a digest
/// of the barrier (each live node's generation and pending-list version). `None` while
/// nothing moves or the barrier does not hold.
///
/// Any change makes every published mark stale, so the members pull again before the move
/// can complete: a removal cancelled and asked again (a new version), a node that restarts
/// or changes its view (the barrier moves), a node coming back from the dead that may have
/// acked writes with an older view before it learned of the move.
pub fn current_mark(view: &Topology, members: &[Member]) -> Option<String> {
    let outgoing: Vec<NodeId> = view.outgoing().collect();
    if outgoing.is_empty() {
        return None;
    }
    let barrier = move_barrier(&outgoing, members)?;
    let mut text = String::new();
    for (id, (generation, pending)) in &barrier.0 {
        text.push_str(&format!("{id}:{generation}:{pending},"));
    }
    let digest = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
    let removals: Vec<String> = outgoing
        .iter()
        .map(|id| format!("{id}:{}", view.removals().get(*id).map_or(0, |r| r.version)))
        .collect();
    Some(format!("{digest:016x};{}", removals.join(",")))
}

/// The remaining placement members whose published mark is not `mark` (empty: every one
/// has pulled what it gains behind the current barrier, and the move is complete).
pub fn waiting_for(view: &Topology, members: &[Member], mark: &str) -> Vec<NodeId> {
    let newest = crate::membership::newest_by_node(members);
    view.nodes()
        .filter(|n| !view.is_outgoing(n.id))
        .filter(|n| newest.get(&n.id).is_none_or(|m| m.moved != mark))
        .map(|n| n.id)
        .collect()
}

/// The partitions of `0..count` this node gains: in its future set, not in its current one.
pub fn gained_partitions(view: &Topology, count: u32) -> Vec<Partition> {
    let me = view.self_id();
    (0..count)
        .map(Partition)
        .filter(|p| {
            view.future_set(*p).iter().any(|n| n.id == me)
                && !view.replica_set(*p).iter().any(|n| n.id == me)
        })
        .collect()
}

/// The partitions of `0..count` whose replica set changes.
pub fn moving_partitions(view: &Topology, count: u32) -> usize {
    (0..count)
        .filter(|p| view.quorums(Partition(*p)).in_transition())
        .count()
}

/// Why an operator's request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The node is not a placement member.
    #[error("node {0} holds no partitions (not a placement member)")]
    NotAMember(NodeId),
    /// `remove` of a node the failure detector holds alive.
    #[error("node {0} is alive: decommission it on that node instead, or stop it first")]
    Alive(NodeId),
    /// `remove` of this node.
    #[error("node {0} is this node: decommission it instead")]
    IsSelf(NodeId),
    /// The removal is complete; nothing can change it.
    #[error("node {0} is already removed")]
    Done(NodeId),
    /// Already on its way out.
    #[error("node {0} is already {1}")]
    AlreadyOutgoing(NodeId, &'static str),
    /// `cancel` of a node that is not on its way out.
    #[error("node {0} is not being removed or decommissioned")]
    NotOutgoing(NodeId),
    /// `cancel` of a move every remaining member has pulled for: it is completing.
    #[error(
        "node {0}'s move is completing (every remaining node has pulled); it cannot be cancelled"
    )]
    Completing(NodeId),
    /// A version that cannot grow any more (a peer gossiped the highest one).
    #[error("node {0}'s removal version cannot grow")]
    Exhausted(NodeId),
    /// The cluster would keep fewer nodes than its replication factor.
    #[error("only {left} nodes would remain, fewer than the replication factor {rf}")]
    TooFew {
        /// Placement members that would remain.
        left: usize,
        /// The replication factor.
        rf: usize,
    },
    /// This node is not an active member yet.
    #[error("this node is still joining; ask an active member")]
    NotActive,
}

/// What an operator asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// The node that takes the request leaves (it must be `view`'s own node).
    Decommission,
    /// A dead node's partitions move to the others; its id can never come back.
    Remove(NodeId),
    /// An outgoing node keeps its place (before its move completes).
    Cancel(NodeId),
}

/// Checks `request` against `view` and publishes it in this node's removal map. The map
/// merged from every member's is the base, so the request's version is above any seen for
/// that node.
pub async fn request<M: MembershipPort>(
    membership: &M,
    view: &Topology,
    active: bool,
    request: Request,
) -> Result<(), RequestError> {
    if !active {
        return Err(RequestError::NotActive);
    }
    let me = view.self_id();
    let (node, state) = match request {
        Request::Decommission => (me, RemovalState::Leaving),
        Request::Remove(node) => (node, RemovalState::Removing),
        Request::Cancel(node) => (node, RemovalState::Cancelled),
    };
    // The map as gossip has it now (this node's own last request included), not as `view`
    // last read it: a request repeated at once sees the first one.
    let mut map = view.removals().clone();
    for m in membership.members().await {
        map.merge(&m.removals);
    }
    let current = map.state(node);
    if current == Some(RemovalState::Done) {
        return Err(RequestError::Done(node));
    }
    match request {
        Request::Cancel(_) => {
            if !current.is_some_and(RemovalState::is_outgoing) {
                return Err(RequestError::NotOutgoing(node));
            }
            // Once every remaining member has pulled, some node may be marking the move
            // done right now; a cancel racing it would lose (done is final).
            let members = membership.members().await;
            if let Some(mark) = current_mark(view, &members) {
                if waiting_for(view, &members, &mark).is_empty() {
                    return Err(RequestError::Completing(node));
                }
            }
        }
        Request::Decommission | Request::Remove(_) => {
            let Some(member) = view.node(node).filter(|_| view.is_member(node)) else {
                return Err(RequestError::NotAMember(node));
            };
            if let Some(state) = current.filter(|s| s.is_outgoing()) {
                return Err(RequestError::AlreadyOutgoing(node, state.as_str()));
            }
            if let Request::Remove(_) = request {
                if node == me {
                    return Err(RequestError::IsSelf(node));
                }
                if member.live {
                    return Err(RequestError::Alive(node));
                }
            }
            let left = view
                .nodes()
                .filter(|n| n.id != node && !map.state(n.id).is_some_and(RemovalState::is_outgoing))
                .count();
            if left < view.rf() {
                return Err(RequestError::TooFew {
                    left,
                    rf: view.rf(),
                });
            }
        }
    }
    if map.get(node).is_some_and(|r| r.version == u64::MAX) {
        return Err(RequestError::Exhausted(node));
    }
    if !map.request(node, state) {
        return Err(RequestError::Done(node));
    }
    info!(node, state = state.as_str(), "operator request: published");
    membership.set_removals(&map).await;
    Ok(())
}

/// The move task (see the module docs); ends when the lifecycle stops, or when this node's
/// own removal is done (it then moves to [`Phase::Left`]).
pub(super) async fn run<L: LocalReplica, C: ReplicaClient, M: MembershipPort>(
    shared: Arc<Shared<L, C, M>>,
    marker: Arc<dyn MemberMarker>,
    mut recorded: Removals,
) {
    let mut watch = shared.membership.watch_members();
    let mut published_map: Option<Removals> = None;
    let mut moved = String::new();
    let count = shared.config.plan.partition_count;
    loop {
        watch.borrow_and_update();
        let members = shared.membership.members().await;
        let view = shared.topology_of(&members);
        let map = view.removals().clone();
        if published_map.as_ref() != Some(&map) {
            let own = members
                .iter()
                .filter(|m| m.node_id == shared.self_id)
                .max_by_key(|m| m.generation)
                .map(|m| m.removals.clone());
            if own.as_ref() != Some(&map) {
                shared.membership.set_removals(&map).await;
            }
            published_map = Some(map.clone());
        }
        if map != recorded {
            match marker.set_removals(&map.to_string()) {
                Ok(()) => recorded = map.clone(),
                Err(e) => {
                    warn!(error = %e, "cannot record the removal map; it lives in gossip only")
                }
            }
        }
        if map.state(shared.self_id) == Some(RemovalState::Done) {
            info!("this node's partitions have moved to the others; waiting for every view to drop it");
            // Other coordinators may still run operations that reach this node (it was the
            // primary of its partitions): it serves them until every live member has
            // republished its pending list without this node, which each does only once
            // the operations of its older view have ended.
            let dropped = async {
                loop {
                    watch.borrow_and_update();
                    let members = shared.membership.members().await;
                    if members
                        .iter()
                        .filter(|m| m.live && m.node_id != shared.self_id)
                        .all(|m| {
                            m.removals.state(shared.self_id) == Some(RemovalState::Done)
                                && !m.pending.contains(&shared.self_id)
                        })
                    {
                        return;
                    }
                    if watch.changed().await.is_err() {
                        return;
                    }
                }
            };
            tokio::select! {
                _ = shared.cancel.cancelled() => return,
                _ = dropped => {}
                _ = tokio::time::sleep(LEAVE_WAIT) => warn!(wait = ?LEAVE_WAIT, "some member still lists this node; leaving anyway"),
            }
            info!("every view has dropped this node: it has left the cluster");
            shared.phase.send_replace(Phase::Left);
            return;
        }
        let outgoing: Vec<NodeId> = view.outgoing().collect();
        metrics::gauge!("cluster_outgoing_nodes").set(outgoing.len() as f64);
        metrics::gauge!("cluster_partitions_moving").set(moving_partitions(&view, count) as f64);
        if outgoing.is_empty() && !moved.is_empty() {
            shared.membership.set_moved("").await;
            moved.clear();
        }
        let mut retry = false;
        let me_remains = view.is_member(shared.self_id) && !view.is_outgoing(shared.self_id);
        let active = *shared.phase.borrow() == Phase::Active;
        let mark = current_mark(&view, &members);
        if let Some(mark) = mark.as_ref().filter(|m| **m != moved) {
            if me_remains && active {
                match pull_gained(&shared, &view, mark).await {
                    Some(true) => {
                        shared.membership.set_moved(mark).await;
                        moved = mark.clone();
                        continue;
                    }
                    Some(false) => retry = true,
                    None => return,
                }
            }
        }
        if mark
            .as_ref()
            .is_some_and(|m| waiting_for(&view, &members, m).is_empty())
        {
            let mut done = map.clone();
            for &id in &outgoing {
                if let Some(entry) = map.get(id) {
                    done.merge_entry(
                        id,
                        crate::membership::Removal {
                            version: entry.version,
                            state: RemovalState::Done,
                        },
                    );
                }
            }
            info!(nodes = ?outgoing, "every remaining member holds its new partitions: the move is complete");
            metrics::counter!("cluster_moves_completed_total").increment(outgoing.len() as u64);
            shared.membership.set_removals(&done).await;
            published_map = Some(done);
            continue;
        }
        // Liveness and gossip changes wake the watch; the timer re-checks a pull that fell
        // short, and otherwise only guards against a missed wake-up.
        let pause = if retry {
            shared.config.join_retry
        } else {
            RECHECK
        };
        tokio::select! {
            _ = shared.cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            changed = watch.changed() => if changed.is_err() {
                warn!("membership stopped; the move task stops");
                return;
            },
        }
    }
}

/// Pulls the partitions this node gains behind the barrier `mark` names: `Some(true)` when
/// every one got a read quorum of complete answers and the mark still holds after the pull,
/// `Some(false)` to try again, `None` when the lifecycle stops.
async fn pull_gained<L: LocalReplica, C: ReplicaClient, M: MembershipPort>(
    shared: &Shared<L, C, M>,
    view: &Topology,
    mark: &str,
) -> Option<bool> {
    let gained = gained_partitions(view, shared.config.plan.partition_count);
    let started = Instant::now();
    info!(
        partitions = gained.len(),
        outgoing = ?view.outgoing().collect::<Vec<_>>(),
        "move: pulling the partitions this node takes over"
    );
    // In chunks, so that progress shows (`chatnode admin status`, gossip `move_progress`).
    let total = gained.len() as u32;
    let mut progress = MoveProgress {
        partitions_done: 0,
        partitions_total: total,
        records: 0,
    };
    shared.membership.set_move_progress(progress).await;
    let mut incomplete = 0;
    for chunk in gained.chunks(PULL_CHUNK) {
        let report = tokio::select! {
            _ = shared.cancel.cancelled() => return None,
            r = shared.coord.pull(chunk, &shared.config.plan, PullMode::Join) => r,
        };
        metrics::counter!("cluster_pulled_records_total").increment(report.records);
        metrics::counter!("cluster_move_pulled_records_total").increment(report.records);
        incomplete += report.incomplete.len();
        progress.partitions_done += (chunk.len() - report.incomplete.len()) as u32;
        progress.records += report.records;
        shared.membership.set_move_progress(progress).await;
    }
    if incomplete > 0 {
        warn!(
            incomplete,
            "move: some partitions lack a read quorum of complete answers; pulling again"
        );
        return Some(false);
    }
    let members = shared.membership.members().await;
    let after = shared.topology_of(&members);
    if current_mark(&after, &members).as_deref() != Some(mark) {
        info!("move: a node's view changed during the pull; pulling again");
        return Some(false);
    }
    info!(
        partitions = total,
        records = progress.records,
        ms = started.elapsed().as_millis() as u64,
        "move: every partition this node takes over is pulled"
    );
    Some(true)
}
