//! Node-to-node delivery: the peer request kinds this node serves besides replication
//! ([`Handler`]), and [`Forwarder`], the [`Forward`] port of the domain: one task per peer
//! with a bounded queue, many deliveries per request.
//!
//! A forward that cannot be made is never dropped silently. When a request to a peer fails
//! (it is paused, cut off, overloaded) or its queue is full, the users whose deliveries were
//! lost are *owed* to that peer: its task keeps trying (with backoff, for as long as it
//! takes) to send the peer a `resync` naming them (or "everyone", past a bound), and the
//! peer then catches those users' connections up with their inboxes.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use client_proto::ids::{DeviceId, UserId};
use client_proto::{Message, ServerFrame};
use cluster::directory::{is_directory_kind, Directory};
use cluster::lifecycle::node_cert_name as cert_name;
use cluster::replication::{is_replication_kind, PeerReplicaClient, ReplicaService};
use cluster::transport::{BoxFuture, RemoteError};
use cluster::{Membership, NodeId, PeerEndpoint, Request, Response, RpcHandler};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::delivery::Forward;
use crate::domain::friends::apply_friendship;
use crate::domain::hub::Hub;
use crate::domain::presence::Presence;
use crate::logging::RateLimitedLog;
use crate::store::StoreReplica;

/// Failed peer requests logged: 10 per 10 s (a down peer fails every one), the rest counted.
static PEER_REQUEST_LOG: RateLimitedLog = RateLimitedLog::new(10, Duration::from_secs(10));
/// Failed forwards logged: 10 per 10 s, the rest counted.
static FORWARD_LOG: RateLimitedLog = RateLimitedLog::new(10, Duration::from_secs(10));

/// Request kind: close a device's connections (logout).
const KIND_CLOSE_DEVICE: u16 = 0x0201;
/// Request kind: deliver stored messages to local devices of some users (a batch of
/// [`Deliver`]s, in the order they were sent).
const KIND_DELIVER_BATCH: u16 = 0x0202;
/// Request kind: deliveries to these users (or to anyone) were lost; catch their
/// connections up with their inboxes ([`Resync`]).
const KIND_RESYNC: u16 = 0x0203;
/// Request kind: two users became friends or stopped being friends; their connections here
/// start or stop watching each other ([`FriendshipChanged`]).
const KIND_FRIENDSHIP: u16 = 0x0204;

/// Users owed to one peer, past which the peer is told to catch everyone up.
const MAX_OWED_USERS: usize = 10_000;
/// Longest wait between attempts to tell a peer what it missed.
const MAX_RESYNC_BACKOFF: Duration = Duration::from_secs(10);

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
struct Resync {
    /// Everyone connected to the receiver.
    all: bool,
    /// These users (when not `all`); at most [`MAX_OWED_USERS`].
    users: Vec<UserId>,
}

/// Deliveries lost on the way to one peer.
#[derive(Debug, Default)]
enum Owed {
    #[default]
    Nothing,
    Users(HashSet<UserId>),
    Everyone,
}

impl Owed {
    fn add(&mut self, users: impl IntoIterator<Item = UserId>) {
        let set = match self {
            Owed::Everyone => return,
            Owed::Nothing => {
                *self = Owed::Users(HashSet::new());
                let Owed::Users(set) = self else { return };
                set
            }
            Owed::Users(set) => set,
        };
        set.extend(users);
        if set.len() > MAX_OWED_USERS {
            *self = Owed::Everyone;
        }
    }

    fn merge(&mut self, other: Owed) {
        match other {
            Owed::Nothing => {}
            Owed::Everyone => *self = Owed::Everyone,
            Owed::Users(users) => self.add(users),
        }
    }

    fn is_nothing(&self) -> bool {
        matches!(self, Owed::Nothing)
    }

    fn request(&self) -> Resync {
        match self {
            Owed::Users(users) => Resync {
                all: false,
                users: users.iter().copied().collect(),
            },
            Owed::Nothing | Owed::Everyone => Resync {
                all: true,
                users: Vec::new(),
            },
        }
    }
}

#[derive(bincode::Encode, bincode::Decode)]
struct FriendshipChanged {
    a: UserId,
    b: UserId,
    friends: bool,
}

#[derive(bincode::Encode, bincode::Decode)]
struct CloseDevice {
    user: UserId,
    device: DeviceId,
}

/// Requests from other nodes: replication goes to the replica service, the rest is ours.
pub(super) struct Handler {
    pub(super) replication: ReplicaService<StoreReplica, PeerReplicaClient>,
    pub(super) hub: Hub,
    /// The presence service, once the node made it (it is built after the mesh, whose
    /// directory it uses): until then there are no connections to update.
    pub(super) presence: Arc<OnceLock<Arc<Presence>>>,
    /// The directory, once started (after the lifecycle, which gives it its view).
    pub(super) directory: Arc<OnceLock<Directory>>,
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
        if is_directory_kind(request.kind) {
            return match self.directory.get() {
                Some(directory) => directory.handle(request),
                None => Box::pin(async { Err(RemoteError::new(3, "directory not started yet")) }),
            };
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
                KIND_RESYNC => {
                    let (r, _): (Resync, _) =
                        bincode::decode_from_slice(&request.body, config).map_err(bad)?;
                    if r.users.len() > MAX_OWED_USERS {
                        return Err(RemoteError::new(1, "resync: too many users"));
                    }
                    metrics::counter!("cluster_resyncs_received_total").increment(1);
                    if r.all {
                        self.hub
                            .catch_up_all("a peer could not forward deliveries here");
                    } else {
                        let n = self.hub.catch_up_users(&r.users);
                        tracing::info!(
                            users = r.users.len(),
                            connections = n,
                            "a peer could not forward deliveries here; catching those users up"
                        );
                    }
                }
                KIND_FRIENDSHIP => {
                    let (c, _): (FriendshipChanged, _) =
                        bincode::decode_from_slice(&request.body, config).map_err(bad)?;
                    if let Some(presence) = self.presence.get() {
                        apply_friendship(&self.hub, presence, c.a, c.b, c.friends);
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

/// Forwards deliveries and logouts to the nodes that hold the users' devices; cheap to clone.
#[derive(Clone)]
pub struct Forwarder {
    inner: Arc<Inner>,
}

struct Inner {
    membership: Arc<Membership>,
    /// Where users' devices are.
    directory: Directory,
    endpoint: PeerEndpoint,
    self_id: NodeId,
    /// One queue per peer, drained by that peer's forwarding task.
    queues: parking_lot::Mutex<HashMap<NodeId, PeerQueue>>,
    /// Deliveries lost on the way to each peer, until the peer has been told.
    owed: parking_lot::Mutex<HashMap<NodeId, Owed>>,
    /// The forwarding tasks and one-off requests.
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// A peer's forwarding task: its queue, and a wake-up for when it owes the peer a resync
/// without a delivery to send.
#[derive(Clone)]
struct PeerQueue {
    tx: mpsc::Sender<Deliver>,
    kick: Arc<tokio::sync::Notify>,
}

impl Forwarder {
    /// `node` came back (or restarted) in this node's view. While it was down here, this
    /// node forwarded nothing to it (its devices did not count here), and it may have
    /// caught up its own devices before this node saw it again: so it is told to catch up
    /// everyone once it answers, after everything this node stored meanwhile is durable.
    pub(super) fn peer_back(&self, node: NodeId) {
        let inner = &self.inner;
        if node == inner.self_id {
            return;
        }
        inner.owed.lock().insert(node, Owed::Everyone);
        inner.peer_queue(node).kick.notify_one();
    }

    /// `node` gained `users` in this node's routes: what this node forwarded to them before
    /// went elsewhere, so `node` is told (retried until it answers) to catch them up.
    pub(super) fn catch_up_at(&self, node: NodeId, users: Vec<UserId>) {
        let inner = &self.inner;
        if node == inner.self_id {
            return;
        }
        metrics::counter!("cluster_route_gains_total").increment(users.len() as u64);
        inner.owe(node, users);
        inner.peer_queue(node).kick.notify_one();
    }

    pub(super) fn new(
        membership: Arc<Membership>,
        directory: Directory,
        endpoint: PeerEndpoint,
        self_id: NodeId,
        stop: CancellationToken,
    ) -> Self {
        Forwarder {
            inner: Arc::new(Inner {
                membership,
                directory,
                endpoint,
                self_id,
                queues: parking_lot::Mutex::new(HashMap::new()),
                owed: parking_lot::Mutex::new(HashMap::new()),
                tasks: TaskTracker::new(),
                stop,
            }),
        }
    }

    /// Stops the forwarding tasks (what is still queued is dropped: those devices sync) and
    /// waits for them.
    pub(super) async fn shutdown(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

impl Forward for Forwarder {
    fn forward(&self, users: &[UserId], message: &Message) {
        let inner = &self.inner;
        let (per_node, unknown) = inner.routes(users);
        for (node, users) in per_node {
            let delivery = Deliver {
                users,
                message: message.clone(),
            };
            inner.queue(node, delivery);
        }
        if unknown.is_empty() {
            return;
        }
        // Not known here yet (the send path looks its recipients up first, so this is
        // rare): ask their home replicas, then forward; when they cannot answer in time,
        // every live node gets it (those without the users' devices drop it).
        let this = inner.clone();
        let message = message.clone();
        inner.tasks.spawn(async move {
            let ids: Vec<u64> = unknown.iter().map(|u| u.0).collect();
            let still = this.directory.resolve(&ids).await;
            let (per_node, unknown) = this.routes(&unknown);
            for (node, users) in per_node {
                let delivery = Deliver {
                    users,
                    message: message.clone(),
                };
                this.queue(node, delivery);
            }
            if still > 0 && !unknown.is_empty() {
                metrics::counter!("cluster_forward_unrouted_total").increment(unknown.len() as u64);
                for node in this.directory.live_nodes() {
                    if node != this.self_id {
                        let delivery = Deliver {
                            users: unknown.clone(),
                            message: message.clone(),
                        };
                        this.queue(node, delivery);
                    }
                }
            }
        });
    }

    fn close_device(&self, user: UserId, device: DeviceId) {
        // Every live node: a logout is rare, and must reach a device whose route is not
        // known here.
        let inner = &self.inner;
        for node in inner.directory.live_nodes() {
            if node != inner.self_id {
                inner.send(node, KIND_CLOSE_DEVICE, &CloseDevice { user, device });
            }
        }
    }

    fn friendship_changed(&self, a: UserId, b: UserId, friends: bool) {
        // Every live member, not only those the directory names as holding a or b: it may
        // not have told this node yet of a device that connected a moment ago. Friendship
        // changes are rare and the request is a few bytes.
        let inner = &self.inner;
        let mut nodes: Vec<NodeId> = inner
            .membership
            .watch_members()
            .borrow()
            .iter()
            .filter(|m| m.live)
            .map(|m| m.node_id)
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        let change = FriendshipChanged { a, b, friends };
        for node in nodes.into_iter().filter(|n| *n != inner.self_id) {
            inner.send(node, KIND_FRIENDSHIP, &change);
        }
    }
}

impl Inner {
    /// The other nodes holding devices of `users`, as far as the directory knows here, and
    /// the users it does not know yet.
    fn routes(&self, users: &[UserId]) -> (HashMap<NodeId, Vec<UserId>>, Vec<UserId>) {
        let mut per_node: HashMap<NodeId, Vec<UserId>> = HashMap::new();
        let mut unknown = Vec::new();
        for u in users {
            match self.directory.known(u.0) {
                Some(nodes) => {
                    for n in nodes.into_iter().filter(|n| *n != self.self_id) {
                        per_node.entry(n).or_default().push(*u);
                    }
                }
                None => unknown.push(*u),
            }
        }
        (per_node, unknown)
    }

    /// Hands `delivery` to `node`'s forwarding task (started on first use).
    fn queue(self: &Arc<Self>, node: NodeId, delivery: Deliver) {
        let tx = self.peer_queue(node).tx;
        match tx.try_send(delivery) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(lost)) => {
                metrics::counter!("cluster_forward_dropped_total").increment(1);
                tracing::debug!(
                    node,
                    "forward queue full; the peer will be told to catch up"
                );
                self.owe(node, lost.users);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                // Shutting down.
                self.queues.lock().remove(&node);
            }
        }
    }

    /// `node`'s forwarding task, started on first use.
    fn peer_queue(self: &Arc<Self>, node: NodeId) -> PeerQueue {
        let mut queues = self.queues.lock();
        queues
            .entry(node)
            .or_insert_with(|| self.spawn_peer_task(node))
            .clone()
    }

    /// The task that sends `node` its deliveries, in order, many per request, and tells it
    /// what was lost on the way.
    fn spawn_peer_task(self: &Arc<Self>, node: NodeId) -> PeerQueue {
        let (tx, mut rx) = mpsc::channel::<Deliver>(FORWARD_QUEUE);
        let kick = Arc::new(tokio::sync::Notify::new());
        let kicked = kick.clone();
        let this = self.clone();
        self.tasks.spawn(async move {
            let mut batch = Vec::with_capacity(FORWARD_BATCH);
            let mut retry_at: Option<Instant> = None;
            let mut failures = 0u32;
            loop {
                let far = Instant::now() + Duration::from_secs(3600);
                tokio::select! {
                    _ = this.stop.cancelled() => break,
                    got = rx.recv_many(&mut batch, FORWARD_BATCH) => {
                        if got == 0 {
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(retry_at.unwrap_or(far)), if retry_at.is_some() => {}
                    _ = kicked.notified() => {}
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
                    if !this.forward_now(node, &part).await {
                        this.owe(node, part.into_iter().flat_map(|d| d.users));
                    }
                }
                // Tell the peer what it missed, once it answers again.
                let owed = this.owed.lock().remove(&node).unwrap_or_default();
                if owed.is_nothing() {
                    retry_at = None;
                    failures = 0;
                    continue;
                }
                if this.resync_now(node, &owed).await {
                    retry_at = None;
                    failures = 0;
                } else {
                    this.owed.lock().entry(node).or_default().merge(owed);
                    failures += 1;
                    let backoff = Duration::from_millis(250) * 2u32.saturating_pow(failures.min(6));
                    retry_at = Some(Instant::now() + backoff.min(MAX_RESYNC_BACKOFF));
                }
            }
        });
        PeerQueue { tx, kick }
    }

    /// Records that deliveries to `users` were lost on the way to `node`.
    fn owe(&self, node: NodeId, users: impl IntoIterator<Item = UserId>) {
        self.owed.lock().entry(node).or_default().add(users);
    }

    /// Tells `node` to catch up the connections of the users it is owed; true once it has.
    async fn resync_now(&self, node: NodeId, owed: &Owed) -> bool {
        let request = owed.request();
        let Ok(body) = bincode::encode_to_vec(&request, peer_bincode()) else {
            return false;
        };
        let Some(addr) = self.peer_addr_of(node).await else {
            return false;
        };
        let request = Request {
            kind: KIND_RESYNC,
            body,
        };
        match self.endpoint.request(addr, &cert_name(node), request).await {
            Ok(_) => {
                metrics::counter!("cluster_resyncs_sent_total").increment(1);
                tracing::info!(node, "told a peer to catch up what it missed");
                true
            }
            Err(e) => {
                tracing::debug!(node, error = %e, "cannot tell a peer what it missed yet");
                false
            }
        }
    }

    fn send<T: bincode::Encode>(self: &Arc<Self>, node: NodeId, kind: u16, body: &T) {
        let Ok(body) = bincode::encode_to_vec(body, peer_bincode()) else {
            return;
        };
        let this = self.clone();
        self.tasks.spawn(async move {
            let Some(addr) = this.peer_addr_of(node).await else {
                return;
            };
            let request = Request { kind, body };
            if let Err(e) = this.endpoint.request(addr, &cert_name(node), request).await {
                metrics::counter!("cluster_forward_failures_total").increment(1);
                if let Some(suppressed) = PEER_REQUEST_LOG.allow() {
                    tracing::warn!(node, error = %e, suppressed, "a request to a peer failed");
                }
            }
        });
    }

    /// Sends `node` one request with `batch`; false when it failed (counted and logged;
    /// the caller owes those users to the peer).
    async fn forward_now(&self, node: NodeId, batch: &[Deliver]) -> bool {
        let sent = batch.len() as u64;
        let Ok(body) = bincode::encode_to_vec(batch, peer_bincode()) else {
            return false;
        };
        let Some(addr) = self.peer_addr_of(node).await else {
            metrics::counter!("cluster_forward_failures_total").increment(sent);
            return false;
        };
        let request = Request {
            kind: KIND_DELIVER_BATCH,
            body,
        };
        match self.endpoint.request(addr, &cert_name(node), request).await {
            Ok(_) => {
                metrics::counter!("cluster_forwarded_total").increment(sent);
                true
            }
            Err(e) => {
                metrics::counter!("cluster_forward_failures_total").increment(sent);
                if let Some(suppressed) = FORWARD_LOG.allow() {
                    tracing::warn!(node, messages = sent, error = %e, suppressed, "forwarding to a peer failed; it will be told to catch up");
                }
                false
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_owed_grows_to_everyone_past_the_bound() {
        let mut owed = Owed::default();
        assert!(owed.is_nothing());
        assert!(
            owed.request().all,
            "nothing owed asks for nothing in particular"
        );
        owed.add([UserId(1), UserId(2), UserId(1)]);
        let r = owed.request();
        assert!(!r.all);
        assert_eq!(r.users.len(), 2);
        owed.merge(Owed::Users([UserId(3)].into_iter().collect()));
        assert_eq!(owed.request().users.len(), 3);
        owed.add((100..=100 + MAX_OWED_USERS as u64).map(UserId));
        assert!(matches!(owed, Owed::Everyone));
        owed.add([UserId(9)]);
        assert!(owed.request().all);
        let mut other = Owed::default();
        other.merge(Owed::Everyone);
        assert!(matches!(other, Owed::Everyone));
    }
}
