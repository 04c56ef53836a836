//! The coordinator's picture of the cluster: which nodes hold data (placement members), how
//! to reach them, and which of them are live right now.
//!
//! Placement is computed over every placement member, live or not: a replica that is down
//! still owns its partitions (its writes are hinted, its reads go elsewhere in the set), so a
//! failure detector's verdict never moves data. Only membership changes (a node added or
//! removed for good) move partitions, and moving data for them is not done yet (see the
//! module docs of [`super`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::membership::{Lifecycle, Member};
use crate::placement::{replicas, NodeId, Partition};

/// A node that may hold replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaNode {
    /// Its node id.
    pub id: NodeId,
    /// Its peer QUIC address.
    pub addr: SocketAddr,
    /// The name its peer certificate must be valid for.
    pub server_name: String,
    /// Whether the failure detector considers it alive.
    pub live: bool,
}

/// Placement members, this node's id, and the replication factor. Cheap to share behind an
/// `Arc`; replace it whole when membership changes ([`super::Coordinator::set_topology`]).
#[derive(Clone, Debug)]
pub struct Topology {
    self_id: NodeId,
    rf: usize,
    nodes: BTreeMap<NodeId, ReplicaNode>,
    ids: Vec<NodeId>,
}

impl Topology {
    /// A topology of `nodes` (placement members) as seen from `self_id`, with replication
    /// factor `rf` (at least 1). A later duplicate id replaces an earlier one.
    pub fn new(self_id: NodeId, rf: usize, nodes: impl IntoIterator<Item = ReplicaNode>) -> Self {
        let nodes: BTreeMap<NodeId, ReplicaNode> = nodes.into_iter().map(|n| (n.id, n)).collect();
        let ids = nodes.keys().copied().collect();
        Self {
            self_id,
            rf: rf.max(1),
            nodes,
            ids,
        }
    }

    /// The topology gossip describes: members that are `active` or `leaving` (a `joining`
    /// node holds no data yet), with `server_name` naming each member's certificate.
    pub fn from_members(
        self_id: NodeId,
        rf: usize,
        members: &[Member],
        server_name: impl Fn(&Member) -> String,
    ) -> Self {
        let nodes = members
            .iter()
            .filter(|m| matches!(m.state, Lifecycle::Active | Lifecycle::Leaving))
            .map(|m| ReplicaNode {
                id: m.node_id,
                addr: m.addrs.peer,
                server_name: server_name(m),
                live: m.live,
            });
        Self::new(self_id, rf, nodes)
    }

    /// This node's id.
    pub fn self_id(&self) -> NodeId {
        self.self_id
    }

    /// The replication factor asked for (replica sets are smaller in smaller clusters).
    pub fn rf(&self) -> usize {
        self.rf
    }

    /// A node by id.
    pub fn node(&self, id: NodeId) -> Option<&ReplicaNode> {
        self.nodes.get(&id)
    }

    /// Every placement member, by id.
    pub fn nodes(&self) -> impl Iterator<Item = &ReplicaNode> {
        self.nodes.values()
    }

    /// The replica set of `partition`, rendezvous order (best first), live or not.
    pub fn replica_set(&self, partition: Partition) -> Vec<ReplicaNode> {
        replicas(partition, &self.ids, self.rf)
            .into_iter()
            .filter_map(|id| self.nodes.get(&id).cloned())
            .collect()
    }

    /// The partition's primary: its first live replica in rendezvous order (this node counts
    /// as live). Compare-and-swaps of the partition run there.
    pub fn primary(&self, partition: Partition) -> Option<ReplicaNode> {
        self.replica_set(partition)
            .into_iter()
            .find(|n| n.live || n.id == self.self_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: NodeId, live: bool) -> ReplicaNode {
        ReplicaNode {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id)),
            server_name: format!("node-{id}"),
            live,
        }
    }

    #[test]
    fn dead_replicas_keep_their_place_and_lose_the_primary_role() {
        let all = Topology::new(1, 3, (1..=5).map(|i| node(i, true)));
        for p in 0..64 {
            let p = Partition(p);
            let set = all.replica_set(p);
            assert_eq!(set.len(), 3);
            let first = set[0].id;
            let down = Topology::new(1, 3, (1..=5).map(|i| node(i, i != first)));
            assert_eq!(down.replica_set(p), {
                let mut s = set.clone();
                s[0].live = false;
                s
            });
            let primary = down.primary(p).unwrap().id;
            assert!(primary == set[1].id || first == 1);
        }
        assert_eq!(
            Topology::new(1, 3, [node(1, true)])
                .replica_set(Partition(9))
                .len(),
            1
        );
        assert!(Topology::new(1, 3, []).primary(Partition(0)).is_none());
    }
}
