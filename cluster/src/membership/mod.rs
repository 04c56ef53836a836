//! Cluster membership over gossip (chitchat): who is in the cluster, where they serve, in
//! which state, how loaded, and where each is in a join or a move.
//!
//! Each node publishes `node_id`, `http_addr`, `quic_addr`, `peer_addr`, `state`
//! (`joining`/`active`/`leaving`), `load`, its pending list, removal map and move marks.
//! Which nodes hold which users' devices is not gossiped: that is the partitioned
//! directory's ([`crate::directory`]), whose cost per node does not grow with the whole
//! cluster's online users.
//!
//! With [`MembershipConfig::secret`] set (the node always sets it), every gossip datagram is
//! sealed with an HMAC keyed by the cluster secret ([`auth`]): a process without the secret
//! can neither join nor alter anyone's state. Gossip is not encrypted (members' addresses
//! and states are readable on the wire), so it still belongs on a private network. The chitchat cluster id
//! is derived from the secret too ([`cluster_id_for`]).
//!
//! [`memory`] is an in-memory twin for tests (instant gossip between in-memory nodes).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::transport::{Transport, UdpTransport};
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, NodeState,
    ProtocolVersion,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::certs::ClusterSecret;
use crate::clock::ClusterClock;
use crate::placement::NodeId;

pub mod auth;
pub mod memory;
mod removals;
mod view;

pub use removals::{Removal, RemovalState, Removals};

use view::{keys, View};
pub use view::{Lifecycle, Member, MoveProgress, NodeAddrs};

/// How a node joins and gossips. `Default` is not provided: addresses must be chosen.
#[derive(Clone, Debug)]
pub struct MembershipConfig {
    /// This node's id; must be unique in the cluster (see [`Membership::duplicate`]).
    pub node_id: NodeId,
    /// Nodes gossip only with nodes of the same cluster id (see [`cluster_id_for`]).
    pub cluster_id: String,
    /// UDP address to bind for gossip (with a real port: chitchat advertises what it is
    /// given, so port 0 cannot be used).
    pub listen_addr: SocketAddr,
    /// Gossip address other nodes use to reach this one (often `listen_addr`).
    pub advertise_addr: SocketAddr,
    /// Other nodes' gossip addresses (`ip:port` or `host:port`, re-resolved periodically).
    pub seeds: Vec<String>,
    /// What this node serves on.
    pub addrs: NodeAddrs,
    /// Incarnation number; higher is newer. `None` uses the start time in milliseconds.
    pub generation: Option<u64>,
    /// Time between gossip rounds. Failure detection takes about 8 of them.
    pub gossip_interval: Duration,
    /// Phi-accrual threshold: a node is dead after about `phi_threshold` times its mean
    /// heartbeat interval without news.
    pub phi_threshold: f64,
    /// How long a dead node's state is kept. A dead placement member keeps its partitions
    /// (its replicas are just down) for this long; after it, gossip forgets it and its
    /// partitions move to other nodes *without* their data being streamed, so keep it longer
    /// than any outage you expect to repair by restarting the node (default: 7 days).
    pub dead_node_grace: Duration,
    /// How long deleted keys are remembered for peers that missed them.
    pub tombstone_grace: Duration,
    /// Seal every gossip datagram with this secret ([`auth`]); `None`: plain chitchat UDP
    /// (tests and tools only).
    pub secret: Option<ClusterSecret>,
    /// This node's clock and skew guard: sealed datagrams carry its readings and feed it
    /// the peers' (only with a `secret`).
    pub clock: Option<ClusterClock>,
}

impl MembershipConfig {
    /// A configuration with the timing defaults (gossip every 250 ms, dead after ~2 s of
    /// silence) for the given identity and addresses.
    pub fn new(
        node_id: NodeId,
        cluster_id: String,
        listen_addr: SocketAddr,
        addrs: NodeAddrs,
    ) -> Self {
        Self {
            node_id,
            cluster_id,
            listen_addr,
            advertise_addr: listen_addr,
            seeds: Vec::new(),
            addrs,
            generation: None,
            gossip_interval: Duration::from_millis(250),
            phi_threshold: 8.0,
            dead_node_grace: Duration::from_secs(7 * 24 * 3600),
            tombstone_grace: Duration::from_secs(600),
            secret: None,
            clock: None,
        }
    }
}

/// The chitchat cluster id for a cluster secret: nodes with another secret do not merge.
pub fn cluster_id_for(secret: &ClusterSecret) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"chat-gossip cluster id\0");
    ctx.update(secret.as_bytes());
    let digest = ctx.finish();
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("chat-{hex}")
}

/// Membership could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// Gossip could not start (typically: the UDP address is in use).
    #[error("cannot start gossip on {addr}: {source}")]
    Start {
        /// The gossip listen address.
        addr: SocketAddr,
        /// The reason chitchat gave.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The gossip task ended with an error (its socket broke).
    #[error("gossip stopped with an error: {0}")]
    Stopped(Box<dyn std::error::Error + Send + Sync>),
}

/// Another live instance claiming this node's id, from [`Membership::duplicate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duplicate {
    /// Its gossip address.
    pub gossip_addr: SocketAddr,
    /// Its generation.
    pub generation: u64,
}

/// This node's membership: publishes its own state and reads everyone else's.
pub struct Membership {
    handle: ChitchatHandle,
    self_id: ChitchatId,
    node_id: NodeId,
    members: watch::Receiver<Vec<Member>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    health: Option<auth::GossipHealth>,
}

impl Membership {
    /// Binds the gossip socket, publishes this node (state `joining`, load 0) and starts
    /// gossiping with the seeds.
    pub async fn spawn(config: MembershipConfig) -> Result<Self, MembershipError> {
        let generation = config.generation.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        });
        let self_id = ChitchatId::new(
            config.node_id.to_string(),
            generation,
            config.advertise_addr,
        );
        let interval = config.gossip_interval;
        let chitchat_config = ChitchatConfig {
            chitchat_id: self_id.clone(),
            cluster_id: config.cluster_id.clone(),
            gossip_interval: interval,
            listen_addr: config.listen_addr,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                sampling_window_size: 1000,
                max_interval: (interval * 40).max(Duration::from_secs(2)),
                initial_interval: interval * 2,
                dead_node_grace_period: config.dead_node_grace,
            },
            marked_for_deletion_grace_period: config.tombstone_grace,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V1,
        };
        let initial = vec![
            (keys::NODE_ID.to_string(), config.node_id.to_string()),
            (keys::HTTP_ADDR.to_string(), config.addrs.http.to_string()),
            (keys::QUIC_ADDR.to_string(), config.addrs.quic.to_string()),
            (keys::PEER_ADDR.to_string(), config.addrs.peer.to_string()),
            (
                keys::STATE.to_string(),
                Lifecycle::Joining.as_str().to_string(),
            ),
            (keys::LOAD.to_string(), "0".to_string()),
        ];
        let mut health = None;
        let transport: Box<dyn Transport> = match &config.secret {
            Some(secret) => {
                let t = auth::AuthTransport::new(secret).with_clock(config.clock.clone());
                health = Some(t.health());
                Box::new(t)
            }
            None => Box::new(UdpTransport),
        };
        let handle = spawn_chitchat(chitchat_config, initial, transport.as_ref())
            .await
            .map_err(|e| MembershipError::Start {
                addr: config.listen_addr,
                source: e.into(),
            })?;
        let live_rx = handle.with_chitchat(|c| c.live_nodes_watcher()).await;
        let (members_tx, members) = watch::channel(Vec::new());
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(follow(live_rx, View::new(members_tx), cancel.clone()));
        Ok(Self {
            handle,
            self_id,
            node_id: config.node_id,
            members,
            cancel,
            tasks,
            health,
        })
    }

    /// What the sealed gossip transport has seen (`None` without a secret): verified
    /// datagrams, replays, and refusals of this node's datagrams by peers with another
    /// secret.
    pub fn gossip_health(&self) -> Option<auth::GossipHealth> {
        self.health.clone()
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// This node's generation (incarnation number).
    pub fn generation(&self) -> u64 {
        self.self_id.generation_id
    }

    /// Every member gossip knows of, live or dead (dead ones until `dead_node_grace`), this
    /// node included; a restarted node appears once per generation gossip still remembers
    /// ([`newest_generations`] keeps the newest). Members whose keys are missing or malformed
    /// are left out.
    pub async fn members(&self) -> Vec<Member> {
        self.handle
            .with_chitchat(|c| {
                let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
                c.node_states()
                    .iter()
                    .filter_map(|(id, state)| Member::parse(id, state, live.contains(id)))
                    .collect()
            })
            .await
    }

    /// The live members (this node included), updated after each gossip round that changed
    /// something. Await `changed()` on it to follow membership.
    pub fn watch_members(&self) -> watch::Receiver<Vec<Member>> {
        self.members.clone()
    }

    /// Publishes this node's lifecycle state.
    pub async fn set_state(&self, state: Lifecycle) {
        self.set(keys::STATE, state.as_str().to_string()).await;
    }

    /// Publishes the joining nodes this node's coordinator treats as pending (see
    /// [`crate::replication::Coordinator::set_topology_drained`]).
    pub async fn set_pending(&self, pending: &[NodeId]) {
        let ids: Vec<String> = pending.iter().map(ToString::to_string).collect();
        self.set(keys::PENDING, ids.join(",")).await;
    }

    /// Publishes the removal map this node knows (merged from every member's).
    pub async fn set_removals(&self, removals: &Removals) {
        self.set(keys::REMOVALS, removals.to_string()).await;
    }

    /// Publishes the move mark of the last move this node pulled for (empty: none).
    pub async fn set_moved(&self, mark: &str) {
        self.set(keys::MOVED, mark.to_string()).await;
    }

    /// Publishes this node's progress pulling the partitions it takes over.
    pub async fn set_move_progress(&self, progress: MoveProgress) {
        self.set(keys::MOVE_PROGRESS, progress.to_value()).await;
    }

    /// Publishes this node's load (connected devices).
    pub async fn set_load(&self, load: u64) {
        self.set(keys::LOAD, load.to_string()).await;
    }

    async fn set(&self, key: &str, value: String) {
        self.handle
            .with_chitchat(|c| c.self_node_state().set(key, &value))
            .await;
    }

    /// Another live instance that claims this node's id, if gossip has seen one: one with a
    /// different gossip address, or a newer generation on ours. An older generation on our
    /// own address is our previous run, not a duplicate. Call it after a few gossip rounds.
    pub async fn duplicate(&self) -> Option<Duplicate> {
        let me = self.self_id.clone();
        self.handle
            .with_chitchat(|c| {
                c.live_nodes()
                    .find(|id| {
                        id.node_id == me.node_id
                            && **id != me
                            && (id.gossip_advertise_addr != me.gossip_advertise_addr
                                || id.generation_id > me.generation_id)
                    })
                    .map(|id| Duplicate {
                        gossip_addr: id.gossip_advertise_addr,
                        generation: id.generation_id,
                    })
            })
            .await
    }

    /// Stops gossiping and waits for the tasks. Others see this node dead after their
    /// failure-detection delay (publish [`Lifecycle::Leaving`] first for a planned stop).
    pub async fn shutdown(self) -> Result<(), MembershipError> {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.handle
            .shutdown()
            .await
            .map_err(|e| MembershipError::Stopped(e.into()))
    }
}

/// Of several generations of one node id (a restarted node, its dead predecessor), keeps
/// only the newest.
pub fn newest_generations(members: Vec<Member>) -> Vec<Member> {
    newest_by_node(&members).into_values().cloned().collect()
}

/// The newest generation of each node id, by id.
pub fn newest_by_node(members: &[Member]) -> std::collections::BTreeMap<NodeId, &Member> {
    let mut newest: std::collections::BTreeMap<NodeId, &Member> = std::collections::BTreeMap::new();
    for m in members {
        match newest.get(&m.node_id) {
            Some(seen) if seen.generation >= m.generation => {}
            _ => {
                newest.insert(m.node_id, m);
            }
        }
    }
    newest
}

/// Feeds chitchat's live-node snapshots into the view until cancelled.
async fn follow(
    mut live: watch::Receiver<std::collections::BTreeMap<ChitchatId, NodeState>>,
    mut view: View,
    cancel: CancellationToken,
) {
    loop {
        {
            let snapshot = live.borrow_and_update();
            view.apply(&snapshot);
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            changed = live.changed() => if changed.is_err() { break },
        }
    }
}
