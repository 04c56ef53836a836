//! What an operator asks of the cluster through this node: its status (members, states,
//! partitions held now and after the moves under way, hint backlog) and the requests that
//! move partitions (decommission, remove, cancel; see `cluster::lifecycle::request`).

use cluster::lifecycle::{
    current_mark, moving_partitions, waiting_for, Phase, Request, RequestError,
};
use cluster::membership::RemovalState;
use cluster::placement::Partition;
use cluster::NodeId;
use serde::{Deserialize, Serialize};

use super::Mesh;

/// One member in [`MoveStatus`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MemberStatus {
    /// Its node id.
    pub node_id: NodeId,
    /// `joining`, `active`, `leaving` (restarting), `decommissioning`, `removing`, `dead`.
    pub state: String,
    /// Whether the failure detector holds it alive.
    pub live: bool,
    /// Its HTTP address (where `chatnode admin` can ask it).
    pub http_addr: String,
    /// Connected devices, as it publishes.
    pub load: u64,
    /// Partitions whose replica set holds it now.
    pub partitions: usize,
    /// Partitions it will hold once the moves under way are done.
    pub partitions_after: usize,
    /// Whether it has pulled every partition it takes over (`None`: nothing is moving).
    pub moved: Option<bool>,
    /// Writes this node holds for it as hints (it was unreachable).
    pub hints: usize,
    /// Its pull of the partitions it takes over, as it last published it (`None`: it has
    /// not pulled for a move since it started).
    pub pulling: Option<PullProgress>,
}

/// A member's progress pulling the partitions it takes over.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PullProgress {
    /// Partitions pulled so far.
    pub partitions_done: u32,
    /// Partitions it takes over.
    pub partitions_total: u32,
    /// Records received so far.
    pub records: u64,
}

/// The cluster as this node sees it, for `chatnode admin status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MoveStatus {
    /// The node that answered.
    pub node_id: NodeId,
    /// The replication factor.
    pub replication_factor: usize,
    /// The cluster's partition count.
    pub partitions: u32,
    /// Placement members (and joining nodes), by id.
    pub members: Vec<MemberStatus>,
    /// Nodes on their way out.
    pub outgoing: Vec<NodeId>,
    /// Nodes whose removal is done (they hold nothing and cannot come back).
    pub removed: Vec<NodeId>,
    /// Partitions whose replica set changes.
    pub moving_partitions: usize,
    /// Remaining members that have not yet pulled what they take over.
    pub waiting_for: Vec<NodeId>,
}

impl Mesh {
    /// Publishes an operator's request (see `cluster::lifecycle::request`).
    /// Returns once this node's view shows it (at most a second later), so the status that
    /// follows shows it too.
    pub async fn admin_request(&self, request: Request) -> Result<(), RequestError> {
        let topology = self.view.borrow().topology.clone();
        cluster::lifecycle::request(&*self.membership, &topology, self.is_active(), request)
            .await?;
        let (node, state) = match request {
            Request::Decommission => (self.self_id, RemovalState::Leaving),
            Request::Remove(node) => (node, RemovalState::Removing),
            Request::Cancel(node) => (node, RemovalState::Cancelled),
        };
        let mut view = self.view.clone();
        let seen = view.wait_for(|v| v.topology.removals().state(node) == Some(state));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), seen).await;
        Ok(())
    }

    /// Waits until this node's removal is done (it was decommissioned, or removed while it
    /// was away); never returns otherwise.
    pub async fn left(&self) {
        let mut phase = self.phase.clone();
        if phase.wait_for(|p| *p == Phase::Left).await.is_err() {
            // The lifecycle stopped (shutdown under way): nothing more to wait for.
            std::future::pending::<()>().await;
        }
    }

    /// The cluster as this node sees it now.
    pub async fn move_status(&self) -> MoveStatus {
        let view = self.view.borrow().clone();
        let topology = &view.topology;
        let members = self.membership.members().await;
        let newest = cluster::membership::newest_generations(members.clone());
        let outgoing: Vec<NodeId> = topology.outgoing().collect();
        let mark = current_mark(topology, &members);
        let count = self.partitions;
        let mut held = std::collections::BTreeMap::<NodeId, (usize, usize)>::new();
        for p in (0..count).map(Partition) {
            for n in topology.replica_set(p) {
                held.entry(n.id).or_default().0 += 1;
            }
            for n in topology.future_set(p) {
                held.entry(n.id).or_default().1 += 1;
            }
        }
        let removals = topology.removals();
        let members_status = newest
            .iter()
            .filter(|m| removals.state(m.node_id) != Some(RemovalState::Done))
            .map(|m| {
                let (partitions, partitions_after) =
                    held.get(&m.node_id).copied().unwrap_or_default();
                let state = match removals.state(m.node_id) {
                    Some(s) if s.is_outgoing() => s.as_str().to_string(),
                    _ if !m.live => "dead".to_string(),
                    _ => m.state.as_str().to_string(),
                };
                let moved = (!outgoing.is_empty() && !topology.is_outgoing(m.node_id))
                    .then(|| mark.as_deref() == Some(m.moved.as_str()));
                MemberStatus {
                    node_id: m.node_id,
                    state,
                    live: m.live,
                    http_addr: m.addrs.http.to_string(),
                    load: m.load,
                    partitions,
                    partitions_after,
                    moved,
                    hints: self.coord.hints_pending(m.node_id),
                    pulling: m.move_progress.map(|p| PullProgress {
                        partitions_done: p.partitions_done,
                        partitions_total: p.partitions_total,
                        records: p.records,
                    }),
                }
            })
            .collect();
        MoveStatus {
            node_id: self.self_id,
            replication_factor: topology.rf(),
            partitions: count,
            members: members_status,
            waiting_for: match &mark {
                Some(mark) => waiting_for(topology, &members, mark),
                // The barrier does not hold yet: every remaining member still has to pull.
                None => topology
                    .nodes()
                    .filter(|n| !topology.is_outgoing(n.id))
                    .map(|n| n.id)
                    .filter(|_| !outgoing.is_empty())
                    .collect(),
            },
            outgoing,
            removed: removals.done().collect(),
            moving_partitions: moving_partitions(topology, count),
        }
    }
}
