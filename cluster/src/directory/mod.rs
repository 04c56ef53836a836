//! The partitioned presence and routing directory: which nodes hold a user's devices.
//!
//! Gossip carries membership only. Every node computes, from the same membership, each
//! user's *home replicas*: the first [`DirectoryConfig::copies`] live active members in
//! rendezvous order of the user's home partition (`partition_of(user id)`). Those nodes
//! keep the user's entry: the nodes holding the user's devices, and the nodes *subscribed*
//! to changes of that. So a node keeps entries for its share of the cluster's online users
//! (`copies / members` of them), not for all of them.
//!
//! - **Registration.** A node that gains its first device of a user, or loses its last one,
//!   tells the user's home replicas ([`Directory::publish`]), with its generation (a
//!   restarted node's older registrations are forgotten when its newer generation speaks,
//!   not when a view change says it restarted). Per peer, one task sends the latest state of
//!   each changed user in batches, one request in flight, retried until the peer answers or
//!   is declared dead; so registrations are never reordered or lost while both sides live.
//! - **Subscription.** A node that needs a user's nodes (a local connection watches the user,
//!   or a message is routed to them) subscribes at the home replicas
//!   ([`Directory::watch`], [`Directory::resolve`]); the answer carries the current node
//!   set, and every later change is pushed. Answers and pushes carry the home replica's
//!   change counter; the subscriber keeps each replica's newest and uses their union,
//!   filtered by its own view of which nodes are live. Routes nobody
//!   watches are dropped after [`DirectoryConfig::route_idle`] without use. In steady
//!   state, routing a message costs no request.
//! - **Stale routes.** When a subscriber learns that a user's nodes gained a node, it tells
//!   its owner ([`DirectoryHooks::gained`]), which asks that node to catch the user up: a
//!   message the subscriber routed by the stale route was stored before that catch-up reads
//!   the inbox, and everything after goes to the new node. (A home replica also answers a
//!   registration only after its pushes were sent, or [`DirectoryConfig::push_wait`]
//!   passed, so routes are usually current before the device is served.)
//! - **Failures.** A dead node's devices stop counting at once on every node (unions are
//!   filtered by liveness), and home replicas forget it. When membership changes, each node
//!   sends every home replica that gained partitions a *statement*: everything it holds
//!   and watches there, which replaces what that replica knew of it. A node that comes back
//!   (or restarts) is asked for its statement by the nodes that had forgotten it, and sends
//!   its own to them. So a home replica that dies loses nothing: the next one in rendezvous
//!   order is told everything by the nodes that hold the devices.

mod home;
mod pipeline;
mod table;
#[cfg(test)]
mod tests;
pub(crate) mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::lifecycle::ClusterView;
use crate::membership::newest_by_node;
use crate::placement::{partition_of, replicas, NodeId, Partition};
use crate::transport::{BoxFuture, RemoteError, Request, Response};
use pipeline::{Lane, PeerQueue};
use table::{HomeTable, NodeSet};
use wire::{DirReply, DirRequest};

/// The peer request kind of the directory.
pub const KIND_DIRECTORY: u16 = 0x0301;

/// Whether a peer request is the directory's.
pub fn is_directory_kind(kind: u16) -> bool {
    kind == KIND_DIRECTORY
}

/// How often unused routes are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Sends directory requests to other nodes.
pub trait DirPeers: Send + Sync + 'static {
    /// Sends `body` (a [`KIND_DIRECTORY`] request) to `node`; its answer's body.
    fn call(&self, node: NodeId, body: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, String>>;
}

/// Directory requests over the peer endpoint, at the addresses the view gives.
pub struct EndpointPeers {
    endpoint: crate::transport::PeerEndpoint,
    view: watch::Receiver<ClusterView>,
}

impl EndpointPeers {
    /// Calls go through `endpoint` to the peer address `view` lists for each node.
    pub fn new(
        endpoint: crate::transport::PeerEndpoint,
        view: watch::Receiver<ClusterView>,
    ) -> Self {
        EndpointPeers { endpoint, view }
    }
}

impl DirPeers for EndpointPeers {
    fn call(&self, node: NodeId, body: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let addr = {
                let view = self.view.borrow();
                newest_by_node(&view.members)
                    .get(&node)
                    .map(|m| m.addrs.peer)
            };
            let addr = addr.ok_or_else(|| format!("node {node} is not a member"))?;
            let request = Request {
                kind: KIND_DIRECTORY,
                body,
            };
            self.endpoint
                .request(addr, &crate::lifecycle::node_cert_name(node), request)
                .await
                .map(|r| r.body)
                .map_err(|e| e.to_string())
        })
    }
}

/// What the directory tells its owner.
pub trait DirectoryHooks: Send + Sync + 'static {
    /// The known node sets of these watched or routed users may have changed (or they are
    /// no longer known here: routes dropped unused).
    fn changed(&self, users: &[u64]);
    /// The known nodes of these users gained these nodes (a device connected there, and
    /// this node just learned it): what this node routed to the user before went
    /// elsewhere, so the owner tells each gained node to catch the user up. Everything
    /// stored before this call is then read by that catch-up; everything after is routed
    /// there.
    fn gained(&self, gained: &[(u64, NodeId)]);
}

/// Timers and sizes of the directory.
#[derive(Clone, Debug)]
pub struct DirectoryConfig {
    /// This node.
    pub self_id: NodeId,
    /// This node's generation (its gossip incarnation), sent with its registrations.
    pub generation: u64,
    /// The cluster's partition count (a user's home partition is `partition_of(id)`).
    pub partitions: u32,
    /// Home replicas per user.
    pub copies: usize,
    /// How long [`Directory::resolve`] waits for a home replica's answer.
    pub resolve_timeout: Duration,
    /// How long a home replica waits for its pushes before answering a registration.
    pub push_wait: Duration,
    /// Routes nobody watches are dropped after this long unused.
    pub route_idle: Duration,
}

impl DirectoryConfig {
    /// The defaults for `self_id` in a cluster of `partitions` partitions.
    pub fn new(self_id: NodeId, partitions: u32) -> Self {
        DirectoryConfig {
            self_id,
            generation: 0,
            partitions,
            copies: 2,
            resolve_timeout: Duration::from_secs(2),
            push_wait: Duration::from_secs(1),
            route_idle: Duration::from_secs(600),
        }
    }
}

/// Sizes, for metrics and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectoryStats {
    /// Users homed here (entries).
    pub entries: usize,
    /// Bytes those entries take, about.
    pub entry_bytes: usize,
    /// Users this node watches or routes to.
    pub wanted: usize,
    /// Users with devices here.
    pub local: usize,
    /// Directory requests this node sent.
    pub requests_sent: u64,
}

/// A user this node watches or routes to.
#[derive(Default)]
struct Want {
    /// Each home replica's newest answer, with the replica's change counter.
    answers: Vec<(NodeId, NodeSet, u64)>,
    /// Local watchers (connections watching the user, counted by the owner).
    watchers: u32,
    /// When it was last used as a route (seconds since the directory started).
    used: u32,
    /// When a resolve of it last timed out (seconds since the start, plus one; 0: never).
    /// For [`RESOLVE_BACKOFF`] after that, resolves do not wait for it again.
    timed_out: u32,
}

/// How long after a resolve of a user timed out the next ones do not wait for it (its home
/// replicas cannot be reached: every send to the user would wait the timeout again).
const RESOLVE_BACKOFF: u32 = 5;

/// The membership the directory works from.
#[derive(Default, Clone)]
struct Placement {
    /// Live members, with their generation.
    live: BTreeMap<NodeId, u64>,
    /// Each partition's home replicas.
    homes: Vec<Vec<NodeId>>,
}

struct State {
    placement: Placement,
    /// The generation each node registered here with (see `home.rs`, `serve`).
    reg_gen: HashMap<NodeId, u64>,
    /// This node's change counter as a home replica: bumped with every change it pushes
    /// (it starts at the wall clock in microseconds, so a restarted node's counter is
    /// normally ahead of its old one; when it is not, subscribers drop the old answers
    /// once they see the restart).
    seq: u64,
    table: HomeTable,
    /// Users with devices on this node.
    local: HashSet<u64>,
    wanted: HashMap<u64, Want>,
}

struct Inner {
    cfg: DirectoryConfig,
    peers: Arc<dyn DirPeers>,
    hooks: Arc<dyn DirectoryHooks>,
    state: Mutex<State>,
    /// Per peer and lane: the control lane (updates, statements, resend requests) and the
    /// push lane. Pushes never wait on anything, so a home replica waiting for its pushes
    /// before answering cannot wait on a peer that waits on it.
    queues: Mutex<HashMap<(NodeId, Lane), PeerQueue>>,
    /// Notified whenever a home replica answered a subscription.
    answered: Notify,
    started: Instant,
    sent: std::sync::atomic::AtomicU64,
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// The directory; cheap to clone.
#[derive(Clone)]
pub struct Directory {
    inner: Arc<Inner>,
}

impl Directory {
    /// Starts the directory: it follows `view` (membership and topology) from now on.
    pub fn start(
        cfg: DirectoryConfig,
        peers: Arc<dyn DirPeers>,
        hooks: Arc<dyn DirectoryHooks>,
        view: watch::Receiver<ClusterView>,
    ) -> Self {
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                placement: Placement::default(),
                reg_gen: HashMap::new(),
                seq: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64),
                table: HomeTable::default(),
                local: HashSet::new(),
                wanted: HashMap::new(),
            }),
            cfg,
            peers,
            hooks,
            queues: Mutex::new(HashMap::new()),
            answered: Notify::new(),
            started: Instant::now(),
            sent: std::sync::atomic::AtomicU64::new(0),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        });
        inner.follow(view);
        inner.spawn_sweeper();
        Directory { inner }
    }

    /// This node gained its first device of `user` (`true`) or lost its last one.
    pub fn publish(&self, user: u64, online: bool) {
        let inner = &self.inner;
        // Queued under the state lock, so queued changes follow the order of the state's.
        let mut s = inner.state.lock();
        if online {
            s.local.insert(user);
        } else {
            s.local.remove(&user);
        }
        for node in inner.homes_of(&s.placement, user) {
            inner.queue(node, Lane::Control, |out| {
                out.regs.insert(user, online);
            });
        }
    }

    /// A local connection started watching `users`: keep their node sets current here.
    pub fn watch(&self, users: &[u64]) {
        self.want(users, true);
    }

    /// A local connection stopped watching `users`. They stay known as routes until
    /// unused for [`DirectoryConfig::route_idle`].
    pub fn unwatch(&self, users: &[u64]) {
        let mut s = self.inner.state.lock();
        let now = self.inner.now_secs();
        for u in users {
            if let Some(w) = s.wanted.get_mut(u) {
                w.watchers = w.watchers.saturating_sub(1);
                w.used = now;
            }
        }
    }

    /// The live nodes holding `user`'s devices, this one included, when known here (watched
    /// or routed, and answered by a home replica); `None` when not known yet.
    pub fn known(&self, user: u64) -> Option<Vec<NodeId>> {
        let mut s = self.inner.state.lock();
        let now = self.inner.now_secs();
        let State {
            placement, wanted, ..
        } = &mut *s;
        let w = wanted.get_mut(&user)?;
        w.used = now;
        known_nodes(&self.inner.cfg, placement, user, w)
    }

    /// Makes `users` known here (subscribing where needed), waiting at most
    /// [`DirectoryConfig::resolve_timeout`]; returns how many are still unknown.
    pub async fn resolve(&self, users: &[u64]) -> usize {
        self.want(users, false);
        {
            // Wanted before but not answered (its subscription was lost, or its home
            // replicas changed): ask again. Subscribing twice is harmless.
            let s = self.inner.state.lock();
            let unanswered: Vec<u64> = users
                .iter()
                .copied()
                .filter(|u| {
                    s.wanted.get(u).is_some_and(|w| {
                        known_nodes(&self.inner.cfg, &s.placement, *u, w).is_none()
                    })
                })
                .collect();
            self.inner.subscribe_locked(&s, &unanswered, true);
        }
        let deadline = tokio::time::Instant::now() + self.inner.cfg.resolve_timeout;
        loop {
            let answered = self.inner.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            let (unknown, worth_waiting) = {
                let s = self.inner.state.lock();
                let now = self.inner.now_secs();
                let mut unknown = 0;
                let mut worth_waiting = false;
                for u in users {
                    match s.wanted.get(u) {
                        Some(w) if known_nodes(&self.inner.cfg, &s.placement, *u, w).is_some() => {}
                        Some(w) => {
                            unknown += 1;
                            let recent = w.timed_out > 0
                                && now.saturating_sub(w.timed_out - 1) < RESOLVE_BACKOFF;
                            worth_waiting |= !recent;
                        }
                        None => {
                            unknown += 1;
                            worth_waiting = true;
                        }
                    }
                }
                (unknown, worth_waiting)
            };
            if unknown == 0 || !worth_waiting {
                return unknown;
            }
            tokio::select! {
                _ = answered => {}
                _ = tokio::time::sleep_until(deadline) => {
                    metrics::counter!("directory_resolve_timeouts_total").increment(1);
                    let mut s = self.inner.state.lock();
                    let now = self.inner.now_secs() + 1;
                    let State {
                        placement, wanted, ..
                    } = &mut *s;
                    for u in users {
                        if let Some(w) = wanted.get_mut(u) {
                            if known_nodes(&self.inner.cfg, placement, *u, w).is_none() {
                                w.timed_out = now;
                            }
                        }
                    }
                    return unknown;
                }
                _ = self.inner.stop.cancelled() => return unknown,
            }
        }
    }

    /// The live nodes in this node's view.
    pub fn live_nodes(&self) -> Vec<NodeId> {
        self.inner
            .state
            .lock()
            .placement
            .live
            .keys()
            .copied()
            .collect()
    }

    /// Sizes, for metrics and the benchmark.
    pub fn stats(&self) -> DirectoryStats {
        let s = self.inner.state.lock();
        DirectoryStats {
            entries: s.table.len(),
            entry_bytes: s.table.approx_bytes(),
            wanted: s.wanted.len(),
            local: s.local.len(),
            requests_sent: self.inner.sent.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Serves a [`KIND_DIRECTORY`] request from a peer.
    pub fn handle(&self, request: Request) -> BoxFuture<'_, Result<Response, RemoteError>> {
        Box::pin(async move {
            let req: DirRequest =
                wire::decode(&request.body).map_err(|e| RemoteError::new(1, e))?;
            if let Err(why) = req.check(self.inner.cfg.partitions) {
                metrics::counter!("directory_requests_refused_total").increment(1);
                return Err(RemoteError::new(1, format!("directory: {why}")));
            }
            let reply = self.inner.serve(req).await;
            let body = wire::encode(&reply).map_err(|e| RemoteError::new(1, e))?;
            Ok(Response { body })
        })
    }

    /// Stops the directory's tasks and waits for them.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }

    fn want(&self, users: &[u64], watch: bool) {
        let inner = &self.inner;
        let mut s = inner.state.lock();
        let now = inner.now_secs();
        let mut new = Vec::new();
        for &u in users {
            let w = s.wanted.entry(u).or_insert_with(|| {
                new.push(u);
                Want::default()
            });
            w.used = now;
            if watch {
                w.watchers += 1;
            }
        }
        if !new.is_empty() {
            metrics::gauge!("directory_wanted_users").set(s.wanted.len() as f64);
        }
        inner.subscribe_locked(&s, &new, true);
    }
}

/// `user`'s live nodes from the answers of its current home replicas; `None` before any of
/// them answered.
fn known_nodes(
    cfg: &DirectoryConfig,
    placement: &Placement,
    user: u64,
    w: &Want,
) -> Option<Vec<NodeId>> {
    let homes = placement.homes.get(home_partition(cfg, user).0 as usize)?;
    let mut answered = false;
    let mut nodes = NodeSet::default();
    for (replica, set, _) in &w.answers {
        if homes.contains(replica) {
            answered = true;
            for n in set.iter().filter(|n| placement.live.contains_key(n)) {
                nodes.insert(n);
            }
        }
    }
    answered.then(|| nodes.to_vec())
}

fn home_partition(cfg: &DirectoryConfig, user: u64) -> Partition {
    partition_of(&user.to_be_bytes(), cfg.partitions)
}

/// `user`'s home replicas among the live active `members` (best first), as every node
/// computes them: the first `copies` in rendezvous order of the user's home partition.
pub fn home_replicas(user: u64, partitions: u32, members: &[NodeId], copies: usize) -> Vec<NodeId> {
    replicas(
        partition_of(&user.to_be_bytes(), partitions),
        members,
        copies,
    )
}

impl Inner {
    fn now_secs(&self) -> u32 {
        self.started.elapsed().as_secs() as u32
    }

    fn homes_of(&self, placement: &Placement, user: u64) -> Vec<NodeId> {
        placement
            .homes
            .get(home_partition(&self.cfg, user).0 as usize)
            .cloned()
            .unwrap_or_default()
    }

    /// Queues subscriptions (`on`) or their end for `users` at their home replicas. The
    /// caller holds the state lock (`s`), so that queued subscriptions follow the order of
    /// the changes to `wanted` (a route dropped and wanted again at once ends subscribed).
    fn subscribe_locked(self: &Arc<Self>, s: &State, users: &[u64], on: bool) {
        if users.is_empty() {
            return;
        }
        let mut per_node: HashMap<NodeId, Vec<u64>> = HashMap::new();
        for &u in users {
            for n in self.homes_of(&s.placement, u) {
                per_node.entry(n).or_default().push(u);
            }
        }
        for (node, users) in per_node {
            self.queue(node, Lane::Control, |out| {
                for u in users {
                    out.subs.insert(u, on);
                }
            });
        }
    }

    /// Records `node`'s answers to subscriptions.
    fn take_answers(&self, node: NodeId, reply: DirReply) {
        let seq = reply.seq;
        let answers = reply.current.into_iter().map(|(u, nodes)| (u, nodes, seq));
        self.apply_answers(node, answers.collect());
    }

    /// Records what home replica `replica` says of wanted users (newest per replica wins),
    /// wakes the resolvers and tells the owner.
    fn apply_answers(&self, replica: NodeId, answers: Vec<(u64, Vec<NodeId>, u64)>) {
        if answers.is_empty() {
            return;
        }
        let me = self.cfg.self_id;
        let mut users = Vec::with_capacity(answers.len());
        let mut gained = Vec::new();
        {
            let mut s = self.state.lock();
            let State {
                placement, wanted, ..
            } = &mut *s;
            for (u, nodes, seq) in answers {
                let Some(w) = wanted.get_mut(&u) else {
                    continue;
                };
                let before = known_nodes(&self.cfg, placement, u, w);
                if set_answer(w, replica, NodeSet::from_ids(&nodes), seq) {
                    users.push(u);
                    // A first answer is not a gain: nothing was routed by this one yet.
                    if let (Some(before), Some(after)) =
                        (before, known_nodes(&self.cfg, placement, u, w))
                    {
                        gained.extend(
                            after
                                .into_iter()
                                .filter(|n| *n != me && !before.contains(n))
                                .map(|n| (u, n)),
                        );
                    }
                }
            }
        }
        self.answered.notify_waiters();
        self.hooks.changed(&users);
        if !gained.is_empty() {
            self.hooks.gained(&gained);
        }
    }

    /// Drops routes nobody watches that were not used for `route_idle`.
    fn spawn_sweeper(self: &Arc<Self>) {
        let this = self.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = this.stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                let idle = this.cfg.route_idle.as_secs() as u32;
                let now = this.now_secs();
                let dropped: Vec<u64> = {
                    let mut s = this.state.lock();
                    let old: Vec<u64> = s
                        .wanted
                        .iter()
                        .filter(|(_, w)| w.watchers == 0 && now.saturating_sub(w.used) > idle)
                        .map(|(u, _)| *u)
                        .collect();
                    for u in &old {
                        s.wanted.remove(u);
                    }
                    metrics::gauge!("directory_wanted_users").set(s.wanted.len() as f64);
                    this.subscribe_locked(&s, &old, false);
                    old
                };
                // No longer known here: the owner forgets what it derived from them.
                if !dropped.is_empty() {
                    this.hooks.changed(&dropped);
                }
            }
        });
    }
}

/// Records `replica`'s answer as of its counter `seq`, unless it already gave a newer one;
/// true when recorded.
fn set_answer(w: &mut Want, replica: NodeId, nodes: NodeSet, seq: u64) -> bool {
    match w.answers.iter_mut().find(|(r, _, _)| *r == replica) {
        Some((_, _, known)) if *known > seq => false,
        Some(answer) => {
            *answer = (replica, nodes, seq);
            true
        }
        None => {
            w.answers.push((replica, nodes, seq));
            true
        }
    }
}
