//! The node's place in the cluster: gossip membership, the peer endpoint (replication and
//! node-to-node delivery), the coordinator's view of the members, and the gossip-backed
//! presence directory.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use client_proto::http::NodeInfo;
use client_proto::ids::{DeviceId, UserId};
use client_proto::{Message, PresenceStatus, ServerFrame};
use cluster::replication::{
    is_replication_kind, Coordinator, CoordinatorConfig, PeerReplicaClient, PullMode, PullPlan,
    ReplicaService, RpcReplicaClient, Topology,
};
use cluster::transport::{BoxFuture, RemoteError};
use cluster::{
    ClusterSecret, Lifecycle, Member, Membership, MembershipConfig, NodeAddrs, NodeId, NodeTls,
    Partition, PeerConfig, PeerEndpoint, Request, Response, RpcHandler,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::Hub;
use crate::ids::now_unix_ms;
use crate::presence::{Directory, Feed};
use crate::store::{SledReplica, Store, TABLES};

/// File in the data dir whose presence says this node has been a placement member (it holds
/// partitions): it comes back as a member after a restart instead of joining again.
const MEMBER_MARKER: &str = "placement-member";

/// Request kind: close a device's connections (logout).
const KIND_CLOSE_DEVICE: u16 = 0x0201;
/// Request kind: deliver stored messages to local devices of some users (a batch of
/// [`Deliver`]s, in the order they were sent).
const KIND_DELIVER_BATCH: u16 = 0x0202;

/// Deliveries queued for one peer; past that, new ones are dropped and counted (the devices
/// get those messages at their next sync, as after any missed live delivery).
const FORWARD_QUEUE: usize = 8192;
/// Deliveries one request carries at most.
const FORWARD_BATCH: usize = 256;
/// Bytes of messages one request carries, about (a bigger single message goes alone).
const FORWARD_REQUEST_BYTES: usize = 1 << 20;

/// The bincode configuration of this module's peer messages, bounded like a peer frame.
fn peer_bincode() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ cluster::transport::HARD_MAX_FRAME }>()
}

#[derive(bincode::Encode, bincode::Decode)]
struct Deliver {
    users: Vec<UserId>,
    message: Message,
}

#[derive(bincode::Encode, bincode::Decode)]
struct CloseDevice {
    user: UserId,
    device: DeviceId,
}

fn cert_name(node: NodeId) -> String {
    format!("node-{node}")
}

/// Requests from other nodes: replication goes to the replica service, the rest is ours.
struct Handler {
    replication: ReplicaService<SledReplica, PeerReplicaClient>,
    hub: Hub,
}

impl RpcHandler for Handler {
    fn handle(
        &self,
        from: SocketAddr,
        request: Request,
    ) -> BoxFuture<'_, Result<Response, RemoteError>> {
        if is_replication_kind(request.kind) {
            return self.replication.handle(from, request);
        }
        Box::pin(async move {
            let bad = |e: bincode::error::DecodeError| RemoteError::new(1, e.to_string());
            let config = peer_bincode();
            match request.kind {
                KIND_DELIVER_BATCH => {
                    let (batch, _): (Vec<Deliver>, _) =
                        bincode::decode_from_slice(&request.body, config).map_err(bad)?;
                    for d in batch {
                        let frame = ServerFrame::Message {
                            message: Arc::new(d.message),
                        };
                        self.hub.deliver(&d.users, &frame, None);
                    }
                }
                KIND_CLOSE_DEVICE => {
                    let (c, _): (CloseDevice, _) =
                        bincode::decode_from_slice(&request.body, config).map_err(bad)?;
                    self.hub.close_device(c.user, c.device, "logged out");
                }
                other => return Err(RemoteError::new(2, format!("unknown request kind {other}"))),
            }
            Ok(Response { body: Vec::new() })
        })
    }
}

/// The cluster side of a node.
pub struct Mesh {
    membership: Membership,
    coord: Coordinator<SledReplica, PeerReplicaClient>,
    endpoint: PeerEndpoint,
    self_id: NodeId,
    /// Whether this node is an active member (false while it joins).
    active: std::sync::atomic::AtomicBool,
    /// One queue per peer, drained by that peer's forwarding task.
    forwarders: parking_lot::Mutex<HashMap<NodeId, mpsc::Sender<Deliver>>>,
    /// Forwarding tasks, requests and the watcher tasks.
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

        let mesh = Arc::new(Mesh {
            membership,
            coord: coord.clone(),
            endpoint,
            self_id: cfg.node_id,
            active: std::sync::atomic::AtomicBool::new(!joining),
            forwarders: parking_lot::Mutex::new(HashMap::new()),
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

    /// Queues delivery of `message` to the devices of `users` on other nodes.
    pub fn forward(self: &Arc<Self>, users: &[UserId], message: &Message) {
        let mut per_node: HashMap<NodeId, Vec<UserId>> = HashMap::new();
        for u in users {
            for n in self.membership.user_nodes(u.0) {
                if n != self.self_id {
                    per_node.entry(n).or_default().push(*u);
                }
            }
        }
        for (node, users) in per_node {
            let delivery = Deliver {
                users,
                message: message.clone(),
            };
            self.queue_delivery(node, delivery);
        }
    }

    /// Hands `delivery` to `node`'s forwarding task (started on first use).
    fn queue_delivery(self: &Arc<Self>, node: NodeId, delivery: Deliver) {
        let tx = {
            let mut forwarders = self.forwarders.lock();
            forwarders
                .entry(node)
                .or_insert_with(|| self.spawn_forwarder(node))
                .clone()
        };
        match tx.try_send(delivery) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("cluster_forward_dropped_total").increment(1);
                tracing::debug!(node, "forward queue full; the devices will get it at sync");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // Shutting down.
                self.forwarders.lock().remove(&node);
            }
        }
    }

    /// The task that sends `node` its deliveries, in order, many per request.
    fn spawn_forwarder(self: &Arc<Self>, node: NodeId) -> mpsc::Sender<Deliver> {
        let (tx, mut rx) = mpsc::channel::<Deliver>(FORWARD_QUEUE);
        let this = self.clone();
        self.tasks.spawn(async move {
            let mut batch = Vec::with_capacity(FORWARD_BATCH);
            loop {
                let got = tokio::select! {
                    _ = this.stop.cancelled() => break,
                    got = rx.recv_many(&mut batch, FORWARD_BATCH) => got,
                };
                if got == 0 {
                    break;
                }
                // Requests stay well under the peer frame limit: at most about 1 MiB each.
                while !batch.is_empty() {
                    let mut bytes = 0;
                    let take = batch
                        .iter()
                        .take_while(|d| {
                            bytes += d.message.body.len() + d.users.len() * 8 + 256;
                            bytes <= FORWARD_REQUEST_BYTES
                        })
                        .count()
                        .max(1);
                    let part: Vec<Deliver> = batch.drain(..take).collect();
                    this.forward_now(node, &part).await;
                }
            }
        });
        tx
    }

    /// Tells every node holding `user`'s devices to close `device` (logout).
    pub fn close_device(self: &Arc<Self>, user: UserId, device: DeviceId) {
        for node in self.membership.user_nodes(user.0) {
            if node != self.self_id {
                self.send(node, KIND_CLOSE_DEVICE, &CloseDevice { user, device });
            }
        }
    }

    fn send<T: bincode::Encode>(self: &Arc<Self>, node: NodeId, kind: u16, body: &T) {
        let Ok(body) = bincode::encode_to_vec(body, peer_bincode()) else {
            return;
        };
        let this = self.clone();
        self.tasks.spawn(async move {
            let Some(addr) = this.peer_addr_of(node).await else { return };
            let request = Request { kind, body };
            if let Err(e) = this.endpoint.request(addr, &cert_name(node), request).await {
                metrics::counter!("cluster_forward_failures_total").increment(1);
                tracing::warn!(node, error = %e, "forwarding to a peer failed (its devices will sync)");
            }
        });
    }

    /// Sends `node` one request with `batch`; failures are counted and logged (the devices
    /// get those messages at their next sync).
    async fn forward_now(&self, node: NodeId, batch: &[Deliver]) {
        let sent = batch.len() as u64;
        let Ok(body) = bincode::encode_to_vec(batch, peer_bincode()) else {
            return;
        };
        let Some(addr) = self.peer_addr_of(node).await else {
            metrics::counter!("cluster_forward_failures_total").increment(sent);
            return;
        };
        let request = Request {
            kind: KIND_DELIVER_BATCH,
            body,
        };
        match self.endpoint.request(addr, &cert_name(node), request).await {
            Ok(_) => metrics::counter!("cluster_forwarded_total").increment(sent),
            Err(e) => {
                metrics::counter!("cluster_forward_failures_total").increment(sent);
                tracing::warn!(node, messages = sent, error = %e, "forwarding to a peer failed (its devices will sync)");
            }
        }
    }

    async fn peer_addr_of(&self, node: NodeId) -> Option<SocketAddr> {
        self.membership
            .members()
            .await
            .into_iter()
            .find(|m| m.node_id == node && m.live)
            .map(|m| m.addrs.peer)
    }

    /// Leaves the cluster: marks this node leaving, stops the tasks and the endpoint.
    pub async fn shutdown(&self) {
        self.membership.set_state(Lifecycle::Leaving).await;
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

/// The gossip-backed presence directory: a user is online while any live node publishes
/// their key. Local transitions are coalesced in a feed and published by one task.
pub struct GossipDirectory {
    mesh: Arc<Mesh>,
    outgoing: Arc<Feed>,
}

impl GossipDirectory {
    /// Starts the publisher task (owned by the mesh's tracker).
    pub fn new(mesh: Arc<Mesh>) -> Self {
        let outgoing = Arc::new(Feed::default());
        let (m, out) = (mesh.clone(), outgoing.clone());
        mesh.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = m.stop.cancelled() => break,
                    _ = out.notified() => {}
                }
                for (user, (status, _)) in out.take() {
                    match status {
                        PresenceStatus::Online => m.membership.set_user_online(user.0).await,
                        PresenceStatus::Offline => m.membership.set_user_offline(user.0).await,
                    }
                }
            }
        });
        GossipDirectory { mesh, outgoing }
    }
}

impl Directory for GossipDirectory {
    fn publish(&self, user: UserId, online: bool) {
        let status = if online {
            PresenceStatus::Online
        } else {
            PresenceStatus::Offline
        };
        self.outgoing.push(user, status, now_unix_ms());
    }

    fn online_elsewhere(&self, user: UserId) -> bool {
        let me = self.mesh.self_id;
        self.mesh
            .membership
            .user_nodes(user.0)
            .iter()
            .any(|n| *n != me)
    }
}
