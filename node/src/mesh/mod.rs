//! The node's place in the cluster.
//!
//! - this module: start-up (peer endpoint, gossip membership, the replication coordinator
//!   attached to the store, the cluster lifecycle: join, anti-entropy, following membership)
//!   and discovery (which node a new client should use);
//! - [`forward`]: delivering stored messages and logouts to the nodes holding the devices
//!   (the domain's `Forward` port), and the peer requests this node serves;
//! - [`directory`]: the gossip-backed presence directory (the domain's `Directory` port).

mod directory;
mod forward;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use client_proto::http::NodeInfo;
use client_proto::ids::UserId;
use client_proto::PresenceStatus;
use cluster::replication::{
    Coordinator, CoordinatorConfig, PeerReplicaClient, PullMode, PullPlan, ReplicaService,
    RpcReplicaClient, Topology,
};
use cluster::{
    ClusterSecret, Lifecycle, Member, Membership, MembershipConfig, NodeAddrs, NodeId, NodeTls,
    Partition, PeerConfig, PeerEndpoint,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use directory::GossipDirectory;
pub use forward::Forwarder;

use crate::config::Config;
use crate::domain::hub::Hub;
use crate::domain::presence::Feed;
use crate::ids::now_unix_ms;
use crate::store::{SledReplica, Store, TABLES};
use forward::{cert_name, Handler};

/// File in the data dir whose presence says this node has been a placement member (it holds
/// partitions): it comes back as a member after a restart instead of joining again.
const MEMBER_MARKER: &str = "placement-member";

/// The cluster side of a node.
pub struct Mesh {
    membership: Arc<Membership>,
    coord: Coordinator<SledReplica, PeerReplicaClient>,
    endpoint: PeerEndpoint,
    self_id: NodeId,
    /// Whether this node is an active member (false while it joins).
    active: std::sync::atomic::AtomicBool,
    /// Forwards deliveries and logouts to other nodes.
    forwarder: Forwarder,
    /// The lifecycle, presence and watcher tasks.
    tasks: TaskTracker,
    stop: CancellationToken,
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
        let handler = Arc::new(Handler {
            replication,
            hub: hub.clone(),
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
        let coord_config = CoordinatorConfig {
            write_timeout: cfg.write_timeout,
            read_timeout: cfg.write_timeout,
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
        let membership = Membership::spawn(mc)
            .await
            .with_context(|| format!("cannot start gossip on {}", cfg.gossip_addr))?;
        if !cfg.seeds.is_empty() {
            // Give gossip a few rounds to hear about a live node with our id.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            if let Some(dup) = membership.duplicate().await {
                anyhow::bail!(
                    "node id {} is already held by a live node ({dup:?}); give this node another --node-id",
                    cfg.node_id
                );
            }
        }
        // A node that has held partitions comes back as a member (and catches up in the
        // background); the first node of a new cluster starts as one; any other node joins:
        // it stays pending until it has pulled the partitions it will hold.
        let marker = cfg.data_dir.join(MEMBER_MARKER);
        let was_member = marker.exists();
        // A new node seeded with another node's address must not take itself for the first
        // node of a new cluster (and skip the pull) just because gossip was slow: it waits to
        // hear from someone first.
        let seeds_elsewhere = cfg.seeds.iter().any(|s| {
            s.parse::<SocketAddr>()
                .map_or(true, |a| a != cfg.gossip_addr && a != gossip_advertise)
        });
        if seeds_elsewhere && !was_member {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while membership
                .members()
                .await
                .iter()
                .all(|m| m.node_id == cfg.node_id)
            {
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(seeds = ?cfg.seeds, "no other node answered through the seeds within 10 s; starting as the first node of a new cluster");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let members = membership.members().await;
        let cluster_has_data = members.iter().any(|m| {
            m.node_id != cfg.node_id && matches!(m.state, Lifecycle::Active | Lifecycle::Leaving)
        });
        let joining = !was_member && cluster_has_data;
        if !joining {
            write_marker(&marker)?;
            membership.set_state(Lifecycle::Active).await;
        }
        // The first view, before any client is served (no operation may run on a view that
        // knows only this node).
        let members = membership.members().await;
        let first = Topology::from_members(cfg.node_id, cfg.replication_factor, &members, |m| {
            cert_name(m.node_id)
        });
        let pending = first.joining_ids();
        coord.set_topology(first);
        membership.set_pending(&pending).await;

        let membership = Arc::new(membership);
        let mesh = Arc::new(Mesh {
            coord: coord.clone(),
            self_id: cfg.node_id,
            active: std::sync::atomic::AtomicBool::new(!joining),
            forwarder: Forwarder::new(
                membership.clone(),
                endpoint.clone(),
                cfg.node_id,
                stop.child_token(),
            ),
            endpoint,
            membership,
            tasks: TaskTracker::new(),
            stop,
        });
        mesh.spawn_topology(coord, cfg.replication_factor, hub, pending);
        mesh.spawn_presence(feed);
        let plan = PullPlan::new(
            TABLES
                .iter()
                .filter(|t| t.replicated())
                .map(|t| t.id())
                .collect(),
            cfg.partitions,
        );
        if joining {
            tracing::info!(
                node = cfg.node_id,
                "joining: pulling partitions before serving them"
            );
            mesh.spawn_join(plan.clone(), cfg.partitions, marker);
        }
        mesh.spawn_anti_entropy(plan, cfg.partitions, was_member, cfg.anti_entropy);
        Ok(Started { mesh, peer_addr })
    }

    /// The partitions this node is (or, while it joins, will be) a replica of.
    fn own_partitions(&self, count: u32, future: bool) -> Vec<Partition> {
        let view = self.coord.topology();
        (0..count)
            .map(Partition)
            .filter(|p| {
                let set = if future {
                    view.future_set(*p)
                } else {
                    view.replica_set(*p)
                };
                set.iter().any(|n| n.id == self.self_id)
            })
            .collect()
    }

    /// The join barrier: `Some` when every other live node (any node coordinates writes,
    /// joining ones too) treats this node as joining and has drained the operations of its
    /// older view, so no write can count on this node's old place any more. The snapshot
    /// (each such node's generation and the gossip version of its `pending` key) tells
    /// whether the barrier stayed in place while the partitions were pulled.
    async fn join_barrier(&self) -> Option<BTreeMap<NodeId, (u64, u64)>> {
        let mut snapshot = BTreeMap::new();
        for m in self.membership.members().await {
            if m.node_id == self.self_id || !m.live {
                continue;
            }
            if !m.pending.contains(&self.self_id) {
                return None;
            }
            snapshot.insert(m.node_id, (m.generation, m.pending_version));
        }
        Some(snapshot)
    }

    /// Joins: waits for the barrier, pulls a read quorum of every partition this node will
    /// hold, checks the barrier still holds (no member dropped it meanwhile), then turns
    /// active. Retries until it succeeds or the node stops.
    fn spawn_join(self: &Arc<Self>, plan: PullPlan, partitions: u32, marker: std::path::PathBuf) {
        let this = self.clone();
        self.tasks.spawn(async move {
            let started = std::time::Instant::now();
            loop {
                let pause = tokio::select! {
                    _ = this.stop.cancelled() => return,
                    pause = this.try_join(&plan, partitions) => pause,
                };
                let Some(pause) = pause else { break };
                tokio::select! {
                    _ = this.stop.cancelled() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            if let Err(e) = write_marker(&marker) {
                tracing::error!(error = %e, "pulled every partition but cannot record membership; staying joining");
                return;
            }
            this.membership.set_state(Lifecycle::Active).await;
            this.active.store(true, std::sync::atomic::Ordering::Release);
            tracing::info!(
                ms = started.elapsed().as_millis() as u64,
                "joined: active, serving reads of its partitions"
            );
        });
    }

    /// One join attempt: `None` when done, or how long to wait before the next.
    async fn try_join(&self, plan: &PullPlan, partitions: u32) -> Option<Duration> {
        let Some(barrier) = self.join_barrier().await else {
            return Some(Duration::from_millis(100));
        };
        let owned = self.own_partitions(partitions, true);
        let report = self.coord.pull(&owned, plan, PullMode::Join).await;
        metrics::counter!("cluster_pulled_records_total").increment(report.records);
        if !report.incomplete.is_empty() {
            tracing::warn!(
                incomplete = report.incomplete.len(),
                failed_sources = report.sources_failed,
                "join: some partitions lack a read quorum of complete answers; pulling again"
            );
            return Some(Duration::from_secs(2));
        }
        if self.join_barrier().await.as_ref() != Some(&barrier) {
            tracing::info!("join: a node's view changed during the pull; pulling again");
            return Some(Duration::from_millis(100));
        }
        tracing::info!(
            partitions = report.partitions,
            records = report.records,
            sources = report.sources_done,
            "join: every partition pulled"
        );
        None
    }

    /// Anti-entropy: after a restart, one catch-up pass over this node's partitions (it
    /// missed writes while down, and hints live in memory), then one pass every `every`.
    fn spawn_anti_entropy(
        self: &Arc<Self>,
        plan: PullPlan,
        partitions: u32,
        restarted: bool,
        every: Option<Duration>,
    ) {
        if !restarted && every.is_none() {
            return;
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            // Let gossip find the other replicas first.
            let mut wait = if restarted {
                Duration::from_secs(3)
            } else {
                every.unwrap_or(Duration::from_secs(3600))
            };
            loop {
                tokio::select! {
                    _ = this.stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                let is_member = this.coord.topology().is_member(this.self_id);
                if is_member && this.live_members() > 1 {
                    let owned = this.own_partitions(partitions, false);
                    let started = std::time::Instant::now();
                    let report = tokio::select! {
                        _ = this.stop.cancelled() => return,
                        r = this.coord.pull(&owned, &plan, PullMode::CatchUp) => r,
                    };
                    metrics::counter!("cluster_pulled_records_total").increment(report.records);
                    tracing::info!(
                        partitions = report.partitions,
                        records = report.records,
                        incomplete = report.incomplete.len(),
                        ms = started.elapsed().as_millis() as u64,
                        "anti-entropy pass done"
                    );
                }
                match every {
                    Some(every) => wait = every,
                    None => return,
                }
            }
        });
    }

    /// Follows membership: the coordinator's topology and this node's load in gossip.
    fn spawn_topology(
        self: &Arc<Self>,
        coord: Coordinator<SledReplica, PeerReplicaClient>,
        rf: usize,
        hub: Hub,
        mut published: Vec<NodeId>,
    ) {
        let this = self.clone();
        let mut watch = self.membership.watch_members();
        self.tasks.spawn(async move {
            let mut load_tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = this.stop.cancelled() => break,
                    changed = watch.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let members = this.membership.members().await;
                        metrics::gauge!("cluster_members_live").set(members.iter().filter(|m| m.live).count() as f64);
                        let topo = Topology::from_members(this.self_id, rf, &members, |m| cert_name(m.node_id));
                        let pending = topo.joining_ids();
                        // Published only once operations of the older view have ended: the
                        // joining nodes' barrier.
                        if coord.set_topology_drained(topo).await && pending != published {
                            this.membership.set_pending(&pending).await;
                            published = pending;
                        }
                    }
                    _ = load_tick.tick() => this.membership.set_load(hub.connections()).await,
                }
            }
        });
    }

    /// Publishes local presence transitions into gossip and turns gossip presence events
    /// into the fan-out feed.
    fn spawn_presence(self: &Arc<Self>, feed: Arc<Feed>) {
        let this = self.clone();
        let mut events = self.membership.subscribe_presence();
        self.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = this.stop.cancelled() => break,
                    ev = events.recv() => {
                        use cluster::membership::PresenceEvent;
                        // Only other nodes' changes: this node's own are fed directly.
                        let (user, status) = match ev {
                            Ok(PresenceEvent::Online { user, node }) if node != this.self_id => {
                                (user, PresenceStatus::Online)
                            }
                            Ok(PresenceEvent::Offline { user, node }) if node != this.self_id => {
                                (user, PresenceStatus::Offline)
                            }
                            Ok(_) => continue,
                            Err(e) => {
                                tracing::warn!(error = %e, "presence events lagged");
                                continue;
                            }
                        };
                        feed.push(UserId(user), status, now_unix_ms());
                    }
                }
            }
        });
    }

    /// The domain's `Forward` port: deliveries and logouts to other nodes.
    pub fn forwarder(&self) -> Forwarder {
        self.forwarder.clone()
    }

    /// Whether this node is an active member: false while it joins (`/readyz` says so).
    pub fn is_active(&self) -> bool {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }

    /// How many members are live, this node included.
    pub fn live_members(&self) -> usize {
        self.membership.watch_members().borrow().len()
    }

    /// The members, newest generation of each node id, for `/v1/cluster`.
    pub async fn members(&self) -> Vec<Member> {
        cluster::membership::newest_generations(self.membership.members().await)
    }

    /// The least-loaded live active member.
    pub async fn recommend(&self) -> Option<NodeInfo> {
        let members = self.membership.members().await;
        members
            .iter()
            .filter(|m| m.live && m.state == Lifecycle::Active)
            .min_by_key(|m| (m.load, m.node_id))
            .map(node_info)
    }

    /// Leaves the cluster: marks this node leaving, stops the tasks and the endpoint.
    pub async fn shutdown(&self) {
        self.membership.set_state(Lifecycle::Leaving).await;
        self.forwarder.shutdown().await;
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.tasks.wait()).await;
        // Let writes past their quorum reach the remaining replicas before stopping them.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.coord.settle()).await;
        self.coord.clone().shutdown().await;
        self.endpoint.clone().shutdown().await;
    }
}

/// Records, durably, that this node holds partitions.
fn write_marker(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(
        b"this node holds partitions; delete the whole data dir to make it join anew\n",
    )?;
    file.sync_all()?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
