//! The coordinator's picture of the cluster: which nodes hold data (placement members), how
//! to reach them, and which of them are live right now.
//!
//! Placement is computed over every placement member, live or not: a replica that is down
//! still owns its partitions (its writes are hinted, its reads go elsewhere in the set), so a
//! failure detector's verdict never moves data.
//!
//! A node that joins is *pending* until it has streamed the partitions it will hold
//! ([`super::pull`]). While it is pending, a partition whose replica set changes with it has
//! two sets, the current one and the one it will have ([`Topology::quorums`]), and every read
//! and write of that partition needs its quorum in **both**. So whichever set a node's view
//! uses during the change, every acked write meets every read quorum:
//!
//! - a write acked with the old view has `W` in the current set, and the joining node pulls a
//!   read quorum of the current set before it becomes active;
//! - a write acked during the change has `W` in both sets;
//! - a write acked with the new view has `W` in the new set, and a reader with the old
//!   view also reads `R` of the new set.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::membership::{Lifecycle, Member, Removals};
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

/// Placement members, pending (joining) nodes, this node's id, and the replication factor.
/// Cheap to share behind an `Arc`; replace it whole when membership changes
/// ([`super::Coordinator::set_topology`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    self_id: NodeId,
    rf: usize,
    nodes: BTreeMap<NodeId, ReplicaNode>,
    ids: Vec<NodeId>,
    /// Live nodes that are joining: not placement members yet, but every write of a partition
    /// they will hold reaches them too.
    pending: BTreeMap<NodeId, ReplicaNode>,
    /// `ids` plus the pending ones: placement once they are active.
    future_ids: Vec<NodeId>,
    /// Members that restarted empty and are joining again (held as down meanwhile).
    rejoining: BTreeSet<NodeId>,
    /// Members on their way out (decommissioning or removed): still in their partitions'
    /// current sets, left out of the future ones.
    outgoing: BTreeSet<NodeId>,
    /// The removal map gossip agrees on (merged from every member's).
    removals: Removals,
    /// Live members that announced `leaving` (draining before a stop): still replicas, but
    /// not chosen as a partition's primary while another replica is live.
    leaving: BTreeSet<NodeId>,
}

/// The replicas one read or write of a partition must reach: its replica set, and while a
/// node joins that changes it, also the set it will have (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quorums {
    /// Every node of the sets, no repeats: the current set in rendezvous order first.
    pub nodes: Vec<ReplicaNode>,
    /// The sets, as node ids: one, or the current and the future set.
    pub sets: Vec<Vec<NodeId>>,
}

impl Quorums {
    /// True while the partition changes hands (two sets).
    pub fn in_transition(&self) -> bool {
        self.sets.len() > 1
    }
}

impl Topology {
    /// A topology of `nodes` (placement members) as seen from `self_id`, with replication
    /// factor `rf` (at least 1). A later duplicate id replaces an earlier one.
    pub fn new(self_id: NodeId, rf: usize, nodes: impl IntoIterator<Item = ReplicaNode>) -> Self {
        Self::with_pending(self_id, rf, nodes, [])
    }

    /// A topology of placement members `nodes` and joining nodes `pending` (a pending id
    /// that is also a member is ignored).
    pub fn with_pending(
        self_id: NodeId,
        rf: usize,
        nodes: impl IntoIterator<Item = ReplicaNode>,
        pending: impl IntoIterator<Item = ReplicaNode>,
    ) -> Self {
        let nodes: BTreeMap<NodeId, ReplicaNode> = nodes.into_iter().map(|n| (n.id, n)).collect();
        let pending: BTreeMap<NodeId, ReplicaNode> = pending
            .into_iter()
            .filter(|n| !nodes.contains_key(&n.id))
            .map(|n| (n.id, n))
            .collect();
        let ids: Vec<NodeId> = nodes.keys().copied().collect();
        let mut future_ids: Vec<NodeId> = ids.iter().chain(pending.keys()).copied().collect();
        future_ids.sort_unstable();
        Self {
            self_id,
            rf: rf.max(1),
            nodes,
            ids,
            pending,
            future_ids,
            rejoining: BTreeSet::new(),
            outgoing: BTreeSet::new(),
            removals: Removals::new(),
            leaving: BTreeSet::new(),
        }
    }

    /// This topology with `outgoing` members on their way out: they stay in their
    /// partitions' current sets and are left out of the future ones (ids that are not
    /// members are ignored).
    pub fn with_outgoing(mut self, outgoing: impl IntoIterator<Item = NodeId>) -> Self {
        self.outgoing = outgoing
            .into_iter()
            .filter(|id| self.nodes.contains_key(id))
            .collect();
        self.future_ids = self
            .ids
            .iter()
            .chain(self.pending.keys())
            .copied()
            .filter(|id| !self.outgoing.contains(id))
            .collect();
        self.future_ids.sort_unstable();
        self
    }

    /// Whether some partition may have a future set: a node joins or leaves.
    fn changing(&self) -> bool {
        !self.pending.is_empty() || !self.outgoing.is_empty()
    }

    /// The topology gossip describes, from every generation of every member gossip knows:
    ///
    /// - a node id whose newest generation is `active` or `leaving` is a placement member;
    /// - a live `joining` node that no generation ever had in placement is pending;
    /// - a `joining` node whose older generation was a member (restarted on an empty data
    ///   dir) stays a member but counts as down (`live: false`) until it is active again:
    ///   it is written to through hints and read from nowhere, so its emptiness is never
    ///   mistaken for a replica's answer, and its partitions do not move meanwhile.
    ///
    /// A dead joining node is left out (it joins again when it comes back). The removal
    /// maps of all members are merged ([`Removals`]): a node whose removal is done is left
    /// out whatever it publishes; a member being decommissioned or removed is outgoing
    /// ([`Topology::with_outgoing`]). `server_name` names each member's certificate.
    pub fn from_members(
        self_id: NodeId,
        rf: usize,
        members: &[Member],
        server_name: impl Fn(&Member) -> String,
    ) -> Self {
        let placed = |m: &Member| matches!(m.state, Lifecycle::Active | Lifecycle::Leaving);
        let mut removals = Removals::new();
        for m in members {
            removals.merge(&m.removals);
        }
        // A node's own removal being done does not take it out of its own view: until it
        // stops, coordinators whose view is a round behind still send it swaps as the
        // primary of its partitions, and it serves them as an outgoing member.
        let gone: BTreeSet<NodeId> = removals.done().filter(|&id| id != self_id).collect();
        let mut newest: BTreeMap<NodeId, &Member> = BTreeMap::new();
        let mut ever_placed = std::collections::BTreeSet::new();
        for m in members.iter().filter(|m| !gone.contains(&m.node_id)) {
            if placed(m) {
                ever_placed.insert(m.node_id);
            }
            match newest.get(&m.node_id) {
                Some(seen) if seen.generation >= m.generation => {}
                _ => {
                    newest.insert(m.node_id, m);
                }
            }
        }
        let node = |m: &Member, live: bool| ReplicaNode {
            id: m.node_id,
            addr: m.addrs.peer,
            server_name: server_name(m),
            live,
        };
        let mut nodes = Vec::new();
        let mut pending = Vec::new();
        let mut rejoining = BTreeSet::new();
        let leaving: BTreeSet<NodeId> = newest
            .values()
            .filter(|m| m.state == Lifecycle::Leaving && m.live)
            .map(|m| m.node_id)
            .collect();
        for m in newest.values() {
            if placed(m) {
                nodes.push(node(m, m.live || m.node_id == self_id));
            } else if ever_placed.contains(&m.node_id) {
                rejoining.insert(m.node_id);
                nodes.push(node(m, false));
            } else if m.live || m.node_id == self_id {
                pending.push(node(m, m.live || m.node_id == self_id));
            }
        }
        let mut outgoing: Vec<NodeId> = removals.outgoing().collect();
        if removals.state(self_id) == Some(crate::membership::RemovalState::Done) {
            outgoing.push(self_id);
        }
        let mut topology = Self::with_pending(self_id, rf, nodes, pending).with_outgoing(outgoing);
        topology.rejoining = rejoining;
        topology.removals = removals;
        topology.leaving = leaving;
        topology
    }

    /// The removal map gossip agrees on (empty for a topology not built from gossip).
    pub fn removals(&self) -> &Removals {
        &self.removals
    }

    /// The members on their way out, ascending.
    pub fn outgoing(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.outgoing.iter().copied()
    }

    /// Whether `id` is a member on its way out.
    pub fn is_outgoing(&self, id: NodeId) -> bool {
        self.outgoing.contains(&id)
    }

    /// This node's id.
    pub fn self_id(&self) -> NodeId {
        self.self_id
    }

    /// The replication factor asked for (replica sets are smaller in smaller clusters).
    pub fn rf(&self) -> usize {
        self.rf
    }

    /// A node by id, placement member or pending.
    pub fn node(&self, id: NodeId) -> Option<&ReplicaNode> {
        self.nodes.get(&id).or_else(|| self.pending.get(&id))
    }

    /// Whether `id` is a placement member (holds data and serves reads).
    pub fn is_member(&self, id: NodeId) -> bool {
        self.nodes.contains_key(&id)
    }

    /// The joining nodes, by id.
    pub fn pending(&self) -> impl Iterator<Item = &ReplicaNode> {
        self.pending.values()
    }

    /// Every node whose partitions change hands: pending ones, members joining again after
    /// a restart on an empty data dir, and outgoing ones. What a member publishes for the
    /// join and move barriers.
    pub fn joining_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.pending.keys().copied().collect();
        ids.extend(self.rejoining.iter().copied());
        ids.extend(self.outgoing.iter().copied());
        ids.sort_unstable();
        ids
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

    /// The replica set `partition` will have once the pending nodes are active (the current
    /// one when nothing is pending).
    pub fn future_set(&self, partition: Partition) -> Vec<ReplicaNode> {
        if !self.changing() {
            return self.replica_set(partition);
        }
        replicas(partition, &self.future_ids, self.rf)
            .into_iter()
            .filter_map(|id| self.node(id).cloned())
            .collect()
    }

    /// What a read or write of `partition` must reach (see [`Quorums`]).
    pub fn quorums(&self, partition: Partition) -> Quorums {
        let current = self.replica_set(partition);
        let mut sets = vec![current.iter().map(|n| n.id).collect::<Vec<_>>()];
        let mut nodes = current;
        if self.changing() {
            let future = self.future_set(partition);
            let future_ids: Vec<NodeId> = future.iter().map(|n| n.id).collect();
            if future_ids.iter().any(|id| !sets[0].contains(id)) {
                for n in future {
                    if !nodes.iter().any(|m| m.id == n.id) {
                        nodes.push(n);
                    }
                }
                sets.push(future_ids);
            }
        }
        Quorums { nodes, sets }
    }

    /// The partition's primary: its first live replica in rendezvous order that is not
    /// leaving (draining before a stop), else its first live one. Compare-and-swaps of the
    /// partition run there. This node is live in its own view ([`Topology::from_members`])
    /// unless it is joining again after losing its data, and then it must not be primary.
    pub fn primary(&self, partition: Partition) -> Option<ReplicaNode> {
        let set = self.replica_set(partition);
        set.iter()
            .find(|n| n.live && !self.leaving.contains(&n.id))
            .or_else(|| set.iter().find(|n| n.live))
            .cloned()
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

    /// A member as gossip describes it: node `id`'s generation `generation`, addresses
    /// derived from both.
    fn gossip_member(id: NodeId, generation: u64, state: Lifecycle, live: bool) -> Member {
        use crate::membership::NodeAddrs;
        let addrs = NodeAddrs {
            http: SocketAddr::from(([127, 0, 0, 1], 8000 + id)),
            quic: SocketAddr::from(([127, 0, 0, 1], 8100 + id)),
            peer: SocketAddr::from(([127, 0, 0, 1], 8200 + id + generation as u16)),
        };
        let gossip = SocketAddr::from(([127, 0, 0, 1], 6000 + id));
        Member::new(id, generation, gossip, addrs, state, live)
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

    #[test]
    fn a_pending_node_adds_a_future_set_only_where_it_changes_one() {
        let now = Topology::new(1, 3, (1..=3).map(|i| node(i, true)));
        let joining = Topology::with_pending(1, 3, (1..=3).map(|i| node(i, true)), [node(4, true)]);
        let after = Topology::new(1, 3, (1..=4).map(|i| node(i, true)));
        assert!(joining.node(4).is_some() && !joining.is_member(4));
        let (mut moved, mut kept) = (0, 0);
        for p in (0..256).map(Partition) {
            let q = joining.quorums(p);
            let ids = |set: Vec<ReplicaNode>| set.into_iter().map(|n| n.id).collect::<Vec<_>>();
            assert_eq!(q.sets[0], ids(now.replica_set(p)));
            assert_eq!(joining.replica_set(p), now.replica_set(p));
            assert_eq!(joining.future_set(p), after.replica_set(p));
            if q.in_transition() {
                moved += 1;
                assert_eq!(q.sets[1], ids(after.replica_set(p)));
                assert_eq!(q.nodes.len(), 4);
            } else {
                kept += 1;
                assert_eq!(q.nodes.len(), 3);
            }
        }
        // Node 4 takes about 3/4 of the partitions.
        assert!(moved > 150 && kept > 20, "moved {moved}, kept {kept}");
        // A pending id that is already a member is ignored.
        let dup = Topology::with_pending(1, 3, (1..=3).map(|i| node(i, true)), [node(2, true)]);
        assert_eq!(dup.pending().count(), 0);
        assert_eq!(dup, now);
    }

    #[test]
    fn gossip_members_become_members_pending_or_rejoining() {
        let member = gossip_member;
        let members = [
            member(1, 1, Lifecycle::Active, true),
            // Node 2 restarted on its data dir: its newest generation is active.
            member(2, 1, Lifecycle::Active, false),
            member(2, 2, Lifecycle::Active, true),
            // Node 3 restarted on an empty data dir and is joining again.
            member(3, 1, Lifecycle::Active, false),
            member(3, 2, Lifecycle::Joining, true),
            // Node 4 is new; node 5 was joining and died.
            member(4, 1, Lifecycle::Joining, true),
            member(5, 1, Lifecycle::Joining, false),
        ];
        let t = Topology::from_members(1, 3, &members, |m| format!("node-{}", m.node_id));
        let ids: Vec<NodeId> = t.nodes().map(|n| n.id).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert!(t.node(2).unwrap().live);
        assert_eq!(
            t.node(2).unwrap().addr.port(),
            8200 + 2 + 2,
            "newest generation"
        );
        let three = t.node(3).unwrap();
        assert!(!three.live, "a member joining again counts as down");
        assert_eq!(three.addr.port(), 8200 + 3 + 2);
        let pending: Vec<NodeId> = t.pending().map(|n| n.id).collect();
        assert_eq!(pending, [4]);
        assert_eq!(t.joining_ids(), [3, 4]);
        // Seen from node 3 itself: it is a member that reads nothing from its own store.
        let own = Topology::from_members(3, 3, &members, |m| format!("node-{}", m.node_id));
        assert!(own.is_member(3) && !own.node(3).unwrap().live);
        // ...and never the primary of a partition, even in its own view.
        assert!((0..64).all(|p| own.primary(Partition(p)).is_some_and(|n| n.id != 3)));
    }

    #[test]
    fn removals_make_members_outgoing_then_gone_except_in_their_own_view() {
        use crate::membership::{RemovalState, Removals};
        let member = |id: NodeId, removals: &Removals| Member {
            removals: removals.clone(),
            ..gossip_member(id, 1, Lifecycle::Active, true)
        };
        let mut leaving = Removals::new();
        leaving.request(4, RemovalState::Leaving);
        // One member's map is enough: maps merge.
        let empty = Removals::new();
        let members: Vec<Member> = (1..=4)
            .map(|id| member(id, if id == 2 { &leaving } else { &empty }))
            .collect();
        let t = Topology::from_members(1, 3, &members, |m| format!("node-{}", m.node_id));
        assert!(t.is_member(4) && t.is_outgoing(4));
        assert_eq!(t.joining_ids(), [4]);
        let after = Topology::new(1, 3, (1..=3).map(|i| node(i, true)));
        for p in (0..64).map(Partition) {
            let ids = |set: Vec<ReplicaNode>| set.into_iter().map(|n| n.id).collect::<Vec<_>>();
            assert_eq!(ids(t.future_set(p)), ids(after.replica_set(p)));
            assert_eq!(
                t.quorums(p).in_transition(),
                t.replica_set(p).iter().any(|n| n.id == 4)
            );
        }
        // Done: gone from every view but its own, where it stays an outgoing member.
        let mut done = Removals::new();
        done.merge_entry(
            4,
            crate::membership::Removal {
                version: 1,
                state: RemovalState::Done,
            },
        );
        let members: Vec<Member> = (1..=4).map(|id| member(id, &done)).collect();
        let t = Topology::from_members(1, 3, &members, |m| format!("node-{}", m.node_id));
        assert!(t.node(4).is_none());
        assert_eq!(t.outgoing().count(), 0);
        let own = Topology::from_members(4, 3, &members, |m| format!("node-{}", m.node_id));
        assert!(own.is_member(4) && own.is_outgoing(4));
    }

    #[test]
    fn a_leaving_member_stays_a_replica_and_hands_the_primary_role_on() {
        let member = |id: NodeId, state: Lifecycle| gossip_member(id, 1, state, true);
        let all = [1, 2, 3].map(|id| member(id, Lifecycle::Active));
        let mut one_leaving = all.clone();
        one_leaving[0].state = Lifecycle::Leaving;
        let name = |m: &Member| format!("node-{}", m.node_id);
        let before = Topology::from_members(2, 3, &all, name);
        let during = Topology::from_members(2, 3, &one_leaving, name);
        let mut moved = 0;
        for p in (0..64).map(Partition) {
            assert_eq!(during.replica_set(p), before.replica_set(p));
            let primary = during.primary(p).unwrap().id;
            assert_ne!(primary, 1);
            moved += usize::from(before.primary(p).unwrap().id == 1);
        }
        assert!(moved > 0);
        // Alone, a leaving member is still the primary.
        let alone = Topology::from_members(1, 3, &one_leaving[..1], name);
        assert_eq!(alone.primary(Partition(0)).unwrap().id, 1);
    }
}
