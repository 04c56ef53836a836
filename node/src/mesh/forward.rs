//! Node-to-node delivery: the peer request kinds this node serves besides replication
//! ([`Handler`]), and [`Forwarder`], the [`Forward`] port of the domain: one task per peer
//! with a bounded queue, many deliveries per request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use client_proto::ids::{DeviceId, UserId};
use client_proto::{Message, ServerFrame};
use cluster::lifecycle::node_cert_name as cert_name;
use cluster::replication::{is_replication_kind, PeerReplicaClient, ReplicaService};
use cluster::transport::{BoxFuture, RemoteError};
use cluster::{Membership, NodeId, PeerEndpoint, Request, Response, RpcHandler};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::domain::delivery::Forward;
use crate::domain::hub::Hub;
use crate::store::SledReplica;

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

/// Requests from other nodes: replication goes to the replica service, the rest is ours.
pub(super) struct Handler {
    pub(super) replication: ReplicaService<SledReplica, PeerReplicaClient>,
    pub(super) hub: Hub,
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

/// Forwards deliveries and logouts to the nodes that hold the users' devices; cheap to clone.
#[derive(Clone)]
pub struct Forwarder {
    inner: Arc<Inner>,
}

struct Inner {
    membership: Arc<Membership>,
    endpoint: PeerEndpoint,
    self_id: NodeId,
    /// One queue per peer, drained by that peer's forwarding task.
    queues: parking_lot::Mutex<HashMap<NodeId, mpsc::Sender<Deliver>>>,
    /// The forwarding tasks and one-off requests.
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Forwarder {
    pub(super) fn new(
        membership: Arc<Membership>,
        endpoint: PeerEndpoint,
        self_id: NodeId,
        stop: CancellationToken,
    ) -> Self {
        Forwarder {
            inner: Arc::new(Inner {
                membership,
                endpoint,
                self_id,
                queues: parking_lot::Mutex::new(HashMap::new()),
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
        let mut per_node: HashMap<NodeId, Vec<UserId>> = HashMap::new();
        for u in users {
            for n in inner.membership.user_nodes(u.0) {
                if n != inner.self_id {
                    per_node.entry(n).or_default().push(*u);
                }
            }
        }
        for (node, users) in per_node {
            let delivery = Deliver {
                users,
                message: message.clone(),
            };
            inner.queue(node, delivery);
        }
    }

    fn close_device(&self, user: UserId, device: DeviceId) {
        let inner = &self.inner;
        for node in inner.membership.user_nodes(user.0) {
            if node != inner.self_id {
                inner.send(node, KIND_CLOSE_DEVICE, &CloseDevice { user, device });
            }
        }
    }
}

impl Inner {
    /// Hands `delivery` to `node`'s forwarding task (started on first use).
    fn queue(self: &Arc<Self>, node: NodeId, delivery: Deliver) {
        let tx = {
            let mut queues = self.queues.lock();
            queues
                .entry(node)
                .or_insert_with(|| self.spawn_peer_task(node))
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
                self.queues.lock().remove(&node);
            }
        }
    }

    /// The task that sends `node` its deliveries, in order, many per request.
    fn spawn_peer_task(self: &Arc<Self>, node: NodeId) -> mpsc::Sender<Deliver> {
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
                tracing::warn!(node, error = %e, "a request to a peer failed");
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
}
