//! What gossip says, read back: members parsed from chitchat node states, and the presence
//! index (which live nodes hold which users), kept up to date incrementally.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::str::FromStr;

use chitchat::{ChitchatId, NodeState};
use tokio::sync::{broadcast, watch};

use crate::placement::NodeId;

/// Gossip keys a node publishes. Part of the wire format between nodes.
pub(crate) mod keys {
    pub const NODE_ID: &str = "node_id";
    pub const HTTP_ADDR: &str = "http_addr";
    pub const QUIC_ADDR: &str = "quic_addr";
    pub const PEER_ADDR: &str = "peer_addr";
    pub const STATE: &str = "state";
    pub const LOAD: &str = "load";
    /// The joining nodes this node's coordinator treats as pending, comma-separated ids,
    /// published once no operation of its older view still runs (the join barrier).
    pub const PENDING: &str = "pending";
    /// The removal map this node knows ([`super::super::removals::Removals`], merged).
    pub const REMOVALS: &str = "removals";
    /// The move mark of the last move this node pulled for (see `lifecycle/moves.rs`).
    pub const MOVED: &str = "moved";
    /// This node's pull of the partitions it takes over: `done/total/records`.
    pub const MOVE_PROGRESS: &str = "move_progress";
    /// Prefix of per-user keys: `u:<user id in decimal>`, set while a device of that user is
    /// connected to the node.
    pub const USER_PREFIX: &str = "u:";

    /// The key for `user`.
    pub fn user(user: u64) -> String {
        format!("{USER_PREFIX}{user}")
    }
}

/// A node's place in its lifecycle, as it publishes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lifecycle {
    /// Started, not yet serving (catching up, checking for a duplicate id).
    Joining,
    /// Serving.
    Active,
    /// Draining before a planned stop.
    Leaving,
}

impl Lifecycle {
    /// The gossip value.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::Joining => "joining",
            Lifecycle::Active => "active",
            Lifecycle::Leaving => "leaving",
        }
    }
}

impl FromStr for Lifecycle {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "joining" => Ok(Lifecycle::Joining),
            "active" => Ok(Lifecycle::Active),
            "leaving" => Ok(Lifecycle::Leaving),
            _ => Err(()),
        }
    }
}

/// The addresses a node advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeAddrs {
    /// HTTP and WebSocket for clients.
    pub http: SocketAddr,
    /// QUIC for clients.
    pub quic: SocketAddr,
    /// QUIC for peers ([`crate::transport`]).
    pub peer: SocketAddr,
}

/// One cluster member as gossip describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// Its node id.
    pub node_id: NodeId,
    /// Its incarnation: start time in milliseconds (higher is newer).
    pub generation: u64,
    /// Where it gossips.
    pub gossip_addr: SocketAddr,
    /// Where it serves.
    pub addrs: NodeAddrs,
    /// Its published lifecycle state.
    pub state: Lifecycle,
    /// Whether the failure detector considers it alive.
    pub live: bool,
    /// Its published load (connected devices).
    pub load: u64,
    /// The joining nodes it treats as pending (and has drained older operations for).
    pub pending: Vec<NodeId>,
    /// The gossip version of `pending`: it changes whenever the member republishes it, so a
    /// joining node can tell that a view it relied on stayed in place.
    pub pending_version: u64,
    /// The removal map it publishes (see [`super::Removals`]).
    pub removals: super::Removals,
    /// The move mark it published last (`lifecycle::current_mark`): the outgoing removals
    /// (id and version) and the digest of the move barrier it pulled behind; empty when none.
    pub moved: String,
    /// Its pull of the partitions it takes over, as it last published it.
    pub move_progress: Option<MoveProgress>,
}

/// A node's pull of the partitions it takes over from outgoing nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MoveProgress {
    /// Partitions pulled so far in this pull.
    pub partitions_done: u32,
    /// Partitions this node takes over.
    pub partitions_total: u32,
    /// Records received so far in this pull.
    pub records: u64,
}

impl MoveProgress {
    /// The gossip value.
    pub fn to_value(self) -> String {
        format!(
            "{}/{}/{}",
            self.partitions_done, self.partitions_total, self.records
        )
    }

    /// Parses a gossip value.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('/');
        let p = Self {
            partitions_done: it.next()?.parse().ok()?,
            partitions_total: it.next()?.parse().ok()?,
            records: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(p)
    }
}

impl Member {
    /// A member with these identities and state, and nothing else published yet: load 0, no
    /// pending list, no removals, no move under way (in-memory gossip and tests).
    pub fn new(
        node_id: NodeId,
        generation: u64,
        gossip_addr: SocketAddr,
        addrs: NodeAddrs,
        state: Lifecycle,
        live: bool,
    ) -> Self {
        Member {
            node_id,
            generation,
            gossip_addr,
            addrs,
            state,
            live,
            load: 0,
            pending: Vec::new(),
            pending_version: 0,
            removals: super::Removals::new(),
            moved: String::new(),
            move_progress: None,
        }
    }

    /// Reads a member from its gossip state; `None` when a required key is missing or
    /// malformed (a node still starting, or one speaking another format).
    pub(crate) fn parse(id: &ChitchatId, state: &NodeState, live: bool) -> Option<Member> {
        let addr = |key| state.get(key)?.parse::<SocketAddr>().ok();
        Some(Member {
            node_id: state.get(keys::NODE_ID)?.parse().ok()?,
            generation: id.generation_id,
            gossip_addr: id.gossip_advertise_addr,
            addrs: NodeAddrs {
                http: addr(keys::HTTP_ADDR)?,
                quic: addr(keys::QUIC_ADDR)?,
                peer: addr(keys::PEER_ADDR)?,
            },
            state: state.get(keys::STATE)?.parse().ok()?,
            live,
            load: state.get(keys::LOAD)?.parse().ok()?,
            pending: state
                .get(keys::PENDING)
                .map(|v| v.split(',').filter_map(|id| id.parse().ok()).collect())
                .unwrap_or_default(),
            pending_version: state.get_versioned(keys::PENDING).map_or(0, |v| v.version),
            removals: state
                .get(keys::REMOVALS)
                .map(super::Removals::parse)
                .unwrap_or_default(),
            moved: state.get(keys::MOVED).unwrap_or_default().to_string(),
            move_progress: state.get(keys::MOVE_PROGRESS).and_then(MoveProgress::parse),
        })
    }
}

/// A change in where a user is online, derived from gossip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PresenceEvent {
    /// `user` now has a device on live node `node`.
    Online {
        /// The user id.
        user: u64,
        /// The node.
        node: NodeId,
    },
    /// `user` no longer has a device on `node` (it went offline there, or `node` died).
    Offline {
        /// The user id.
        user: u64,
        /// The node.
        node: NodeId,
    },
}

/// What is remembered about each live node between two gossip snapshots.
struct Tracked {
    max_version: u64,
    node: Option<NodeId>,
    users: HashSet<u64>,
}

/// The presence index and the live-member list, fed with chitchat's live-node snapshots.
pub(crate) struct View {
    tracked: HashMap<ChitchatId, Tracked>,
    /// user -> node -> number of live chitchat instances of that node holding the user
    /// (more than one only while an old incarnation or a duplicate is still seen alive).
    presence: HashMap<u64, BTreeMap<NodeId, u32>>,
    members: watch::Sender<Vec<Member>>,
    events: broadcast::Sender<PresenceEvent>,
}

impl View {
    pub(crate) fn new(
        members: watch::Sender<Vec<Member>>,
        events: broadcast::Sender<PresenceEvent>,
    ) -> Self {
        Self {
            tracked: HashMap::new(),
            presence: HashMap::new(),
            members,
            events,
        }
    }

    /// The live nodes where `user` is online, ascending.
    pub(crate) fn user_nodes(&self, user: u64) -> Vec<NodeId> {
        self.presence
            .get(&user)
            .map(|nodes| nodes.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Brings the view up to date with a snapshot of the live nodes. Only nodes whose state
    /// version changed are re-read.
    pub(crate) fn apply(&mut self, live: &BTreeMap<ChitchatId, NodeState>) {
        let gone: Vec<ChitchatId> = self
            .tracked
            .keys()
            .filter(|id| !live.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(old) = self.tracked.remove(&id) {
                if let Some(node) = old.node {
                    for user in old.users {
                        self.remove(user, node);
                    }
                }
            }
        }
        for (id, state) in live {
            if let Some(old) = self.tracked.get(id) {
                if old.max_version == state.max_version() {
                    continue;
                }
            }
            let node = state.get(keys::NODE_ID).and_then(|v| v.parse().ok());
            let users: HashSet<u64> = state
                .iter_prefix(keys::USER_PREFIX)
                .filter_map(|(key, _)| key.strip_prefix(keys::USER_PREFIX)?.parse().ok())
                .collect();
            let old = self.tracked.insert(
                id.clone(),
                Tracked {
                    max_version: state.max_version(),
                    node,
                    users: HashSet::new(),
                },
            );
            let (old_node, old_users) = match old {
                Some(old) => (old.node, old.users),
                None => (None, HashSet::new()),
            };
            if let Some(old_node) = old_node {
                for &user in &old_users {
                    if Some(old_node) != node || !users.contains(&user) {
                        self.remove(user, old_node);
                    }
                }
            }
            if let Some(node) = node {
                for &user in &users {
                    if Some(node) != old_node || !old_users.contains(&user) {
                        self.add(user, node);
                    }
                }
            }
            if let Some(tracked) = self.tracked.get_mut(id) {
                tracked.users = users;
            }
        }
        let members: Vec<Member> = live
            .iter()
            .filter_map(|(id, state)| Member::parse(id, state, true))
            .collect();
        self.members.send_if_modified(|current| {
            if *current == members {
                false
            } else {
                *current = members;
                true
            }
        });
    }

    fn add(&mut self, user: u64, node: NodeId) {
        let count = self
            .presence
            .entry(user)
            .or_default()
            .entry(node)
            .or_insert(0);
        *count += 1;
        if *count == 1 {
            self.publish(PresenceEvent::Online { user, node });
        }
    }

    fn remove(&mut self, user: u64, node: NodeId) {
        let Some(nodes) = self.presence.get_mut(&user) else {
            return;
        };
        let Some(count) = nodes.get_mut(&node) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count == 0 {
            nodes.remove(&node);
            if nodes.is_empty() {
                self.presence.remove(&user);
            }
            self.publish(PresenceEvent::Offline { user, node });
        }
    }

    fn publish(&self, event: PresenceEvent) {
        // An error only means nobody subscribes right now; the index above stays the truth,
        // and a subscriber that falls behind is told so (see `PresenceEvents::recv`).
        let _ = self.events.send(event);
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
