//! What gossip says, read back: members parsed from chitchat node states.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::str::FromStr;

use chitchat::{ChitchatId, NodeState};
use tokio::sync::watch;

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

/// The live-member list, fed with chitchat's live-node snapshots.
pub(crate) struct View {
    members: watch::Sender<Vec<Member>>,
}

impl View {
    pub(crate) fn new(members: watch::Sender<Vec<Member>>) -> Self {
        Self { members }
    }

    /// Brings the view up to date with a snapshot of the live nodes.
    pub(crate) fn apply(&mut self, live: &BTreeMap<ChitchatId, NodeState>) {
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
}
