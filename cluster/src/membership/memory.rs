//! An in-memory twin of gossip membership, for tests: [`MemoryGossip`] is the whole
//! cluster's gossip state, and each [`MemoryMembership`] is one node incarnation reading and
//! writing it, as a [`MembershipPort`]. Gossip is instant: a change is seen by every node
//! that has heard of its author as soon as it is made. A test decides the rest: who has been
//! heard of ([`MemoryGossip::join_unheard`], [`MemoryGossip::hear`]), what the failure
//! detector says ([`MemoryGossip::set_live`]), and when a node restarts (joining again with
//! the same id starts a new generation).
//!
//! Like chitchat, it keeps every generation of a node (older ones dead), versions a node's
//! keys with one counter that grows on every change (so `pending_version` changes exactly
//! when the list does), and counts a node as live in its own view.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::{Lifecycle, Member, NodeAddrs, Removals};
use crate::lifecycle::MembershipPort;
use crate::placement::NodeId;

/// The gossip state of a cluster of in-memory nodes. Clones share it.
#[derive(Clone, Default)]
pub struct MemoryGossip {
    // A plain mutex: never held across an await, and every critical section is short.
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// Every incarnation ever started, by `(node, generation)`.
    incarnations: BTreeMap<(NodeId, u64), Incarnation>,
    /// The last generation handed out (one counter for all nodes, so generations grow).
    generation: u64,
}

struct Incarnation {
    /// What it publishes; `live` is the failure detector's verdict as the others see it.
    member: Member,
    /// Whether the others have heard of it.
    heard: bool,
    /// The version of its newest key (chitchat's `max_version`).
    version: u64,
    /// Its own view of the live members.
    live_members: watch::Sender<Vec<Member>>,
}

impl MemoryGossip {
    /// A cluster with nobody in it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts an incarnation of `node` (state `joining`, load 0) that every node hears of at
    /// once, as if its seeds answered immediately. Older generations of `node` are dead (the
    /// process they stood for is gone) but remembered, as gossip does.
    pub fn join(&self, node: NodeId) -> MemoryMembership {
        self.start(node, true)
    }

    /// Like [`MemoryGossip::join`], but nobody hears of it, and it hears of nobody, until
    /// [`MemoryGossip::hear`]: a node whose seeds have not answered yet.
    pub fn join_unheard(&self, node: NodeId) -> MemoryMembership {
        self.start(node, false)
    }

    fn start(&self, node: NodeId, heard: bool) -> MemoryMembership {
        let mut state = self.state.lock();
        state.generation += 1;
        let generation = state.generation;
        for ((_, _), older) in state.incarnations.range_mut((node, 0)..(node, generation)) {
            older.member.live = false;
        }
        let addrs = NodeAddrs {
            http: addr(node, 8080),
            quic: addr(node, 8443),
            peer: addr(node, 9443),
        };
        let member = Member::new(
            node,
            generation,
            addr(node, 7946),
            addrs,
            Lifecycle::Joining,
            true,
        );
        state.incarnations.insert(
            (node, generation),
            Incarnation {
                member,
                heard,
                version: 0,
                live_members: watch::channel(Vec::new()).0,
            },
        );
        state.notify();
        drop(state);
        MemoryMembership {
            gossip: self.clone(),
            node,
            generation,
        }
    }

    /// The cluster hears of `node`'s newest incarnation (its seeds answered).
    pub fn hear(&self, node: NodeId) {
        self.update_newest(node, |inc| inc.heard = true);
    }

    /// What every other node's failure detector says of `node`'s newest incarnation. The
    /// node itself still sees everyone (it does not know it is cut off).
    pub fn set_live(&self, node: NodeId, live: bool) {
        self.update_newest(node, |inc| inc.member.live = live);
    }

    /// Every incarnation the cluster has heard of, as an outside observer sees them.
    pub fn members(&self) -> Vec<Member> {
        let state = self.state.lock();
        state
            .incarnations
            .values()
            .filter(|inc| inc.heard)
            .map(|inc| inc.member.clone())
            .collect()
    }

    /// What `node`'s newest incarnation publishes.
    pub fn member(&self, node: NodeId) -> Option<Member> {
        let state = self.state.lock();
        state
            .newest(node)
            .and_then(|key| state.incarnations.get(&key))
            .map(|inc| inc.member.clone())
    }

    fn update_newest(&self, node: NodeId, change: impl FnOnce(&mut Incarnation)) {
        let mut state = self.state.lock();
        let Some(key) = state.newest(node) else {
            return;
        };
        if let Some(inc) = state.incarnations.get_mut(&key) {
            change(inc);
        }
        state.notify();
    }

    fn update_own(&self, key: (NodeId, u64), change: impl FnOnce(&mut Incarnation)) {
        let mut state = self.state.lock();
        if let Some(inc) = state.incarnations.get_mut(&key) {
            change(inc);
        }
        state.notify();
    }
}

/// A node's stand-in address: 10.0.x.y with the node id in x.y.
fn addr(node: NodeId, port: u16) -> SocketAddr {
    let [hi, lo] = node.to_be_bytes();
    SocketAddr::from((Ipv4Addr::new(10, 0, hi, lo), port))
}

impl State {
    fn newest(&self, node: NodeId) -> Option<(NodeId, u64)> {
        self.incarnations
            .range((node, 0)..=(node, u64::MAX))
            .next_back()
            .map(|(key, _)| *key)
    }

    /// What incarnation `key` sees: itself (live), and if it has been heard of, every
    /// other incarnation that has been heard of.
    fn view_of(&self, key: (NodeId, u64)) -> Vec<Member> {
        let heard = self.incarnations.get(&key).is_some_and(|inc| inc.heard);
        self.incarnations
            .iter()
            .filter_map(|(k, inc)| {
                if *k == key {
                    Some(Member {
                        live: true,
                        ..inc.member.clone()
                    })
                } else if heard && inc.heard {
                    Some(inc.member.clone())
                } else {
                    None
                }
            })
            .collect()
    }

    /// Brings every incarnation's live-member watch up to date (a watch fires only when its
    /// list changed).
    fn notify(&self) {
        for (key, inc) in &self.incarnations {
            let live: Vec<Member> = self.view_of(*key).into_iter().filter(|m| m.live).collect();
            inc.live_members.send_if_modified(|current| {
                if *current == live {
                    false
                } else {
                    *current = live;
                    true
                }
            });
        }
    }
}

/// One incarnation of a node in a [`MemoryGossip`].
pub struct MemoryMembership {
    gossip: MemoryGossip,
    node: NodeId,
    generation: u64,
}

impl MemoryMembership {
    /// This incarnation's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn key(&self) -> (NodeId, u64) {
        (self.node, self.generation)
    }
}

impl MembershipPort for MemoryMembership {
    fn node_id(&self) -> NodeId {
        self.node
    }

    async fn members(&self) -> Vec<Member> {
        self.gossip.state.lock().view_of(self.key())
    }

    fn watch_members(&self) -> watch::Receiver<Vec<Member>> {
        let state = self.gossip.state.lock();
        match state.incarnations.get(&self.key()) {
            Some(inc) => inc.live_members.subscribe(),
            // Unreachable: an incarnation is never removed. A closed channel says "stopped".
            None => watch::channel(Vec::new()).1,
        }
    }

    async fn set_state(&self, state: Lifecycle) {
        self.gossip.update_own(self.key(), |inc| {
            if inc.member.state != state {
                inc.version += 1;
                inc.member.state = state;
            }
        });
    }

    async fn set_pending(&self, pending: &[NodeId]) {
        self.gossip.update_own(self.key(), |inc| {
            if inc.member.pending != pending {
                inc.version += 1;
                inc.member.pending = pending.to_vec();
                inc.member.pending_version = inc.version;
            }
        });
    }

    async fn set_removals(&self, removals: &Removals) {
        self.gossip.update_own(self.key(), |inc| {
            if inc.member.removals != *removals {
                inc.version += 1;
                inc.member.removals = removals.clone();
            }
        });
    }

    async fn set_move_progress(&self, progress: super::MoveProgress) {
        self.gossip.update_own(self.key(), |inc| {
            if inc.member.move_progress != Some(progress) {
                inc.version += 1;
                inc.member.move_progress = Some(progress);
            }
        });
    }

    async fn set_moved(&self, mark: &str) {
        self.gossip.update_own(self.key(), |inc| {
            if inc.member.moved != mark {
                inc.version += 1;
                inc.member.moved = mark.to_string();
            }
        });
    }
}
