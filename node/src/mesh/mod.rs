//! The node's place in the cluster.
//!
//! - this module: start-up (peer endpoint, gossip membership, the replication coordinator
//!   attached to the store, the cluster lifecycle: join, anti-entropy, following membership)
//!   and discovery (which node a new client should use);
//! - [`forward`]: delivering stored messages and logouts to the nodes holding the devices
//!   (the domain's `Forward` port), and the peer requests this node serves;
//! - [`directory`]: the domain's presence `Directory` port over the cluster's partitioned
//!   directory, which also routes forwards.

mod admin;
mod directory;
mod forward;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use client_proto::http::NodeInfo;
use cluster::clock::ClusterClock;
use cluster::lifecycle::{
    member_changes, seeds_elsewhere, ClusterLifecycle, ClusterView, FileMarker, LifecycleConfig,
    LifecycleHandle,
};
use cluster::membership::auth::GossipHealth;
use cluster::membership::Duplicate;
use cluster::replication::{
    Coordinator, CoordinatorConfig, PeerReplicaClient, PullPlan, ReplicaService, RpcReplicaClient,
    Topology,
};
use cluster::{
    ClusterSecret, Lifecycle, Member, Membership, MembershipConfig, NodeAddrs, NodeId, NodeTls,
    PeerConfig, PeerEndpoint,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use admin::{MemberStatus, MoveStatus};
pub use directory::PartitionedDirectory;
pub use forward::Forwarder;

use crate::config::Config;
use crate::domain::hub::Hub;
use crate::domain::presence::{Feed, Presence};
use crate::store::{Store, StoreReplica, TABLES};
use cluster::lifecycle::node_cert_name as cert_name;
use forward::Handler;

/// How long a seeded node listens to gossip for another live node with its id before it
/// serves (a few gossip rounds).
const DUPLICATE_CHECK: Duration = Duration::from_millis(1500);
/// How long a seeded node waits, after the duplicate check, for its first verified gossip
/// datagram or a refusal before it serves.
const SECRET_CHECK: Duration = Duration::from_millis(1500);
/// How often this node's load goes into gossip.
const LOAD_EVERY: Duration = Duration::from_secs(1);
/// How often the pause detector looks at the clock.
const PAUSE_TICK: Duration = Duration::from_millis(200);
/// A tick this late means the process was stopped (SIGSTOP, a VM pause) or starved: long
/// enough that peers may have given up forwarding to it.
const PAUSE_THRESHOLD: Duration = Duration::from_millis(1500);

/// The cluster side of a node.
pub struct Mesh {
    membership: Arc<Membership>,
    coord: Coordinator<StoreReplica, PeerReplicaClient>,
    endpoint: PeerEndpoint,
    self_id: NodeId,
    /// The cluster lifecycle (join, anti-entropy, topology follower); taken at shutdown.
    lifecycle: parking_lot::Mutex<Option<LifecycleHandle>>,
    /// Forwards deliveries and logouts to other nodes.
    forwarder: Forwarder,
    /// The presence service the peer request handler updates watches in.
    presence: Arc<OnceLock<Arc<Presence>>>,
    /// Where users' devices are (presence and routing).
    directory: cluster::directory::Directory,
    /// The lifecycle, presence and watcher tasks.
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Membership and topology as the lifecycle last read them.
    view: watch::Receiver<ClusterView>,
    /// Where the lifecycle is (`Left` once this node's removal is done).
    phase: watch::Receiver<cluster::lifecycle::Phase>,
    /// The cluster's partition count.
    partitions: u32,
}

/// What [`Mesh::start`] binds and learns.
pub struct Started {
    pub mesh: Arc<Mesh>,
    pub peer_addr: SocketAddr,
}

impl Mesh {
    /// Binds the peer endpoint, joins gossip, and attaches a coordinator to `store`.
    pub async fn start(
        cfg: &Config,
        tls: &NodeTls,
        secret: &ClusterSecret,
        store: &Store,
        hub: Hub,
        feed: Arc<Feed>,
        stop: CancellationToken,
    ) -> anyhow::Result<Started> {
        let replication = ReplicaService::new(store.local_replica());
        let presence = Arc::new(OnceLock::new());
        let started_directory = Arc::new(OnceLock::new());
        let handler = Arc::new(Handler {
            replication,
            hub: hub.clone(),
            presence: presence.clone(),
            directory: started_directory.clone(),
        });
        let peer_config = PeerConfig {
            reset_secret: Some(secret.clone()),
            ..PeerConfig::default()
        };
        let endpoint = PeerEndpoint::bind(cfg.peer_addr, tls, peer_config, handler.clone())
            .with_context(|| format!("cannot listen on {} for peers", cfg.peer_addr))?;
        let peer_addr = endpoint.local_addr()?;
        let self_node = cluster::replication::ReplicaNode {
            id: cfg.node_id,
            addr: peer_addr,
            server_name: cert_name(cfg.node_id),
            live: true,
        };
        let ids = store.ids();
        let coord_config = CoordinatorConfig {
            write_timeout: cfg.write_timeout,
            read_timeout: cfg.write_timeout,
            clock: Some(ids.hlc().clone()),
            ..CoordinatorConfig::default()
        };
        let coord = Coordinator::new(
            store.local_replica(),
            RpcReplicaClient::new(endpoint.clone()),
            Topology::new(cfg.node_id, cfg.replication_factor, [self_node]),
            coord_config,
        );
        handler.replication.attach(&coord);
        store.attach(coord.clone());

        let addrs = NodeAddrs {
            http: advertised(cfg, cfg.http_addr),
            quic: advertised(cfg, cfg.quic_addr),
            peer: advertised(cfg, peer_addr),
        };
        let gossip_advertise = advertised(cfg, cfg.gossip_addr);
        let mut mc = MembershipConfig::new(
            cfg.node_id,
            cluster::membership::cluster_id_for(secret),
            cfg.gossip_addr,
            addrs,
        );
        mc.advertise_addr = gossip_advertise;
        mc.seeds = cfg.seeds.clone();
        mc.secret = Some(secret.clone());
        mc.clock = Some(ClusterClock {
            hlc: ids.hlc().clone(),
            guard: ids.guard().clone(),
        });
        let membership = Membership::spawn(mc)
            .await
            .with_context(|| format!("cannot start gossip on {}", cfg.gossip_addr))?;
        if !cfg.seeds.is_empty() {
            if let Some(dup) = wait_for_duplicate(&membership, DUPLICATE_CHECK).await {
                anyhow::bail!(
                    "node id {} is already held by a live node ({dup:?}); give this node another --node-id",
                    cfg.node_id
                );
            }
            if seeds_elsewhere(&cfg.seeds, cfg.gossip_addr, gossip_advertise) {
                if let Some(health) = membership.gossip_health() {
                    check_secret(&health, SECRET_CHECK).await?;
                }
            }
        }
        let membership = Arc::new(membership);
        let plan = PullPlan::new(
            TABLES
                .iter()
                .filter(|t| t.replicated())
                .map(|t| t.id())
                .collect(),
            cfg.partitions,
        );
        let config = LifecycleConfig {
            anti_entropy: cfg.anti_entropy,
            catch_up_since: store.down_since(cfg.max_clock_skew),
            seeded: seeds_elsewhere(&cfg.seeds, cfg.gossip_addr, gossip_advertise),
            ..LifecycleConfig::new(cfg.replication_factor, plan)
        };
        let lifecycle = ClusterLifecycle {
            config,
            membership: membership.clone(),
            coordinator: coord.clone(),
            marker: Box::new(FileMarker::in_dir(&cfg.data_dir)),
        }
        .start()
        .await
        .context("cannot start the cluster lifecycle")?;

        let view = lifecycle.watch_view();
        let phase = lifecycle.watch_phase();
        let routed_by = Arc::new(OnceLock::new());
        let directory = cluster::directory::Directory::start(
            cluster::directory::DirectoryConfig {
                generation: membership.generation(),
                ..cluster::directory::DirectoryConfig::new(cfg.node_id, cfg.partitions)
            },
            Arc::new(cluster::directory::EndpointPeers::new(
                endpoint.clone(),
                view.clone(),
            )),
            Arc::new(directory::Hooks {
                feed,
                forwarder: routed_by.clone(),
            }),
            view.clone(),
        );
        let _ = started_directory.set(directory.clone());
        let forwarder = Forwarder::new(
            membership.clone(),
            directory.clone(),
            endpoint.clone(),
            cfg.node_id,
            stop.child_token(),
        );
        let _ = routed_by.set(forwarder.clone());
        let mesh = Arc::new(Mesh {
            view: view.clone(),
            phase,
            partitions: cfg.partitions,
            coord,
            self_id: cfg.node_id,
            lifecycle: parking_lot::Mutex::new(Some(lifecycle)),
            forwarder,
            presence,
            directory,
            endpoint,
            membership,
            tasks: TaskTracker::new(),
            stop,
        });
        mesh.spawn_load(hub.clone());
        mesh.spawn_catch_up_triggers(hub, view);
        Ok(Started { mesh, peer_addr })
    }

    /// Publishes this node's load (connected devices) into gossip every second.
    fn spawn_load(self: &Arc<Self>, hub: Hub) {
        let this = self.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(LOAD_EVERY);
            loop {
                tokio::select! {
                    _ = this.stop.cancelled() => break,
                    _ = tick.tick() => this.membership.set_load(hub.connections()).await,
                }
            }
        });
    }

    /// This node starts draining: an active member publishes `leaving` at once (no node
    /// recommends it or sends its devices there any more, and the others stop choosing it
    /// as a partition's primary while it still answers), and returns the other live, active
    /// members its devices can move to, with their published load.
    pub async fn start_drain(&self) -> Vec<(u64, NodeInfo)> {
        if self.is_active() {
            self.membership.set_state(Lifecycle::Leaving).await;
        }
        self.members()
            .await
            .iter()
            .filter(|m| m.live && m.state == Lifecycle::Active && m.node_id != self.self_id)
            .map(|m| (m.load, node_info(m)))
            .collect()
    }

    /// Starts catch-ups of every connected device whenever this node may have missed
    /// deliveries that nobody will tell it about:
    ///
    /// - a peer died (what it acknowledged but had not forwarded yet is never forwarded), came
    ///   back, or restarted (while it was unreachable, its forwards here failed, and if this
    ///   node was the one cut off, nobody could forward to it either);
    /// - this node was paused or starved (a stopped process misses forwards, and peers give
    ///   up on it).
    ///
    /// And it tells a peer that comes back in its view to catch up everyone
    /// ([`Forwarder::peer_back`]): the two sides see each other again at different moments,
    /// and what this node stored in between was forwarded nowhere.
    ///
    /// (Forwards that fail while both sides are up are reported by the sender: `forward.rs`.)
    fn spawn_catch_up_triggers(self: &Arc<Self>, hub: Hub, mut view: watch::Receiver<ClusterView>) {
        let this = self.clone();
        let peers_hub = hub.clone();
        self.tasks.spawn(async move {
            let mut last = view.borrow_and_update().members.clone();
            loop {
                tokio::select! {
                    _ = this.stop.cancelled() => break,
                    changed = view.changed() => if changed.is_err() { break },
                }
                let now = view.borrow_and_update().members.clone();
                let changes: Vec<_> = member_changes(&last, &now)
                    .into_iter()
                    .filter(|c| c.node != this.self_id)
                    .filter(|c| c.was_live != c.now_live || c.generation_changed)
                    .collect();
                for c in &changes {
                    if c.now_live {
                        this.forwarder.peer_back(c.node);
                    }
                }
                let moved: Vec<String> = changes
                    .into_iter()
                    .map(|c| match (c.now_live, c.generation_changed) {
                        (_, true) => format!("node {} restarted", c.node),
                        (true, false) => format!("node {} is back", c.node),
                        (false, false) => format!("node {} is down", c.node),
                    })
                    .collect();
                last = now;
                if !moved.is_empty() {
                    peers_hub.catch_up_all(&moved.join(", "));
                }
            }
        });
        let this = self.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(PAUSE_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = this.stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let now = std::time::Instant::now();
                let gap = now.duration_since(last);
                last = now;
                if gap > PAUSE_THRESHOLD {
                    metrics::counter!("node_pauses_detected_total").increment(1);
                    tracing::warn!(
                        ms = gap.as_millis() as u64,
                        "this node was paused or starved"
                    );
                    hub.catch_up_all("this node was paused or starved");
                }
            }
        });
    }

    /// The domain's presence `Directory` port.
    pub fn presence_directory(&self) -> PartitionedDirectory {
        PartitionedDirectory {
            dir: self.directory.clone(),
            self_id: self.self_id,
        }
    }

    /// The directory's sizes (for `/metrics` and the benchmark).
    pub fn directory_stats(&self) -> cluster::directory::DirectoryStats {
        self.directory.stats()
    }

    /// The domain's `Forward` port: deliveries and logouts to other nodes.
    /// Refreshes the gauges of the QUIC connections to peers (see
    /// [`PeerEndpoint::export_gauges`]).
    pub fn export_gauges(&self) {
        self.endpoint.export_gauges();
    }

    pub fn forwarder(&self) -> Forwarder {
        self.forwarder.clone()
    }

    /// Gives the peer request handler the presence service (once, at start), so that
    /// friendship changes made on other nodes reach the watches of this node's connections.
    pub fn attach_presence(&self, presence: Arc<Presence>) {
        let _ = self.presence.set(presence);
    }

    /// Whether this node is an active member: false while it joins (`/readyz` says so).
    pub fn is_active(&self) -> bool {
        self.lifecycle
            .lock()
            .as_ref()
            .is_some_and(LifecycleHandle::is_active)
    }

    /// How many members are live, this node included.
    pub fn live_members(&self) -> usize {
        self.membership.watch_members().borrow().len()
    }

    /// The members, newest generation of each node id, for `/v1/cluster`.
    pub async fn members(&self) -> Vec<Member> {
        cluster::membership::newest_generations(self.membership.members().await)
    }

    /// The least-loaded live active member (a draining one is `leaving`, so never chosen).
    pub async fn recommend(&self) -> Option<NodeInfo> {
        let members = self.membership.members().await;
        members
            .iter()
            .filter(|m| m.live && m.state == Lifecycle::Active)
            .min_by_key(|m| (m.load, m.node_id))
            .map(node_info)
    }

    /// Leaves the cluster: stops the lifecycle (an active member publishes `leaving`), the
    /// forwarders and the other tasks, lets writes past their quorum reach the remaining
    /// replicas, then stops the coordinator and the endpoint.
    pub async fn shutdown(&self) {
        let lifecycle = self.lifecycle.lock().take();
        if let Some(lifecycle) = lifecycle {
            if let Err(e) = lifecycle.shutdown().await {
                tracing::error!(error = %e, "cluster lifecycle tasks failed");
            }
        }
        self.forwarder.shutdown().await;
        self.directory.shutdown().await;
        self.stop.cancel();
        self.tasks.close();
        if tokio::time::timeout(Duration::from_secs(3), self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("mesh tasks did not stop within 3 s");
        }
        // Let writes past their quorum reach the remaining replicas before stopping them.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.coord.settle()).await;
        self.coord.clone().shutdown().await;
        self.endpoint.clone().shutdown().await;
    }
}

/// Waits (at most `within`) for gossip to report another live node with this node's id.
/// Refuses to serve when the seeds refused this node's gossip and none was verified: the
/// node holds another cluster secret than its seeds, and serving would form a cluster of
/// its own. Seeds that are down (nothing heard at all) do not stop it.
async fn check_secret(health: &GossipHealth, within: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + within;
    while health.verified() == 0
        && health.refused_by_peers() == 0
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if health.verified() == 0 && health.refused_by_peers() > 0 {
        let peer = health
            .last_refuser()
            .map_or_else(|| "the seeds".to_string(), |a| a.to_string());
        tracing::error!(%peer, "the seeds refuse this node's gossip: its cluster secret is not theirs");
        anyhow::bail!(
            "the seed {peer} refuses this node's gossip: this node's cluster secret differs from the cluster's; \
             give it the cluster dir (secret, CA and a node certificate) of the cluster it should join (--cluster-dir)"
        );
    }
    if health.verified() == 0 {
        tracing::warn!("no seed answered gossip yet; serving alone until one does");
    }
    Ok(())
}

async fn wait_for_duplicate(membership: &Membership, within: Duration) -> Option<Duplicate> {
    let mut watch = membership.watch_members();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(dup) = membership.duplicate().await {
            return Some(dup);
        }
        match tokio::time::timeout_at(deadline, watch.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => return membership.duplicate().await,
        }
    }
}

/// `addr` with the advertised host instead of an unspecified listen IP.
fn advertised(cfg: &Config, addr: SocketAddr) -> SocketAddr {
    match cfg.advertise_host.parse::<std::net::IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, addr.port()),
        Err(_) => addr,
    }
}

/// Where clients of member `m` connect.
pub fn node_info(m: &Member) -> NodeInfo {
    NodeInfo {
        node_id: m.node_id,
        ws_url: format!("ws://{}/v1/ws", m.addrs.http),
        quic_addr: m.addrs.quic.to_string(),
    }
}
