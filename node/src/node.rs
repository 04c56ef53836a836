//! [`Node`]: the handles the gateways share, behind one `Arc`. It holds the domain services
//! and answers the few questions a gateway has about the node itself (its address, whether
//! it is ready, the cluster's members) without handing out the store or the cluster.
//! Building and stopping a node is [`crate::server`]'s job.

use std::sync::Arc;

use client_proto::http::{NodeInfo, PresenceInfo};
use client_proto::ids::UserId;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};
use tracing::Instrument;

use crate::config::Config;
use crate::domain::accounts::Accounts;
use crate::domain::chat::Chat;
use crate::domain::friends::Friends;
use crate::domain::groups::Groups;
use crate::domain::hub::Hub;
use crate::domain::presence::Presence;
use crate::gateway::drain::{Drain, DrainReport, Targets};
use crate::ids::ClockSkew;
use crate::mesh::Mesh;
use crate::store::Store;

/// Everything a request or session needs.
pub struct Node {
    pub cfg: Config,
    pub hub: Hub,
    pub accounts: Accounts,
    pub chat: Chat,
    pub groups: Groups,
    pub presence: Arc<Presence>,
    pub friends: Friends,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    /// Per-user rate limits of this node's sessions.
    pub limits: crate::gateway::ratelimit::UserLimits,
    store: Store,
    mesh: Arc<Mesh>,
    metrics: Option<PrometheusHandle>,
    admin_token: String,
    /// Cancelled when an operator asks this node to drain and stop (`POST /v1/admin/drain`).
    stop_requested: CancellationToken,
    sessions: TaskTracker,
    /// Drain state: new connections refused, sessions told to move ([`Node::drain`]).
    pub drain: Drain,
    /// Connections catching up with their inboxes at once (a node-wide catch-up asks every
    /// connection; this keeps their reads from swamping the replicas).
    catch_ups: tokio::sync::Semaphore,
}

/// How often a drain logs how many sessions are left.
const DRAIN_PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);
/// How long after publishing `leaving` a drained node keeps serving its peers (eight gossip
/// rounds of 250 ms), so that every view has stopped choosing it as a primary before it
/// stops.
const LEAVE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// How long a drain waits, after its timeout, for the remaining sessions to finish their
/// in-flight sends and close (a send takes at most the write timeout, 2 s by default; a
/// connection still authenticating has up to 10 s).
const DRAIN_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(12);

/// Catch-ups that read their inboxes at once, node-wide.
const CONCURRENT_CATCH_UPS: usize = 32;

/// One member as `GET /v1/cluster` shows it.
#[derive(Debug, Serialize)]
pub struct MemberInfo {
    pub node_id: u16,
    /// `joining`, `active`, `leaving`, or `dead` when the failure detector says so.
    pub state: &'static str,
    pub live: bool,
    pub load: u64,
    pub ws_url: String,
    pub quic_addr: String,
    pub peer_addr: String,
    pub gossip_addr: String,
    /// The joining nodes this member's coordinator treats as pending.
    pub pending: Vec<u16>,
}

/// Why a node is not ready to serve (`/readyz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotReady {
    /// It is shutting down.
    Draining,
    /// It is pulling the partitions it will hold before it counts as a member.
    Joining,
    /// Its clock is too far from its peers': it refuses to issue ids.
    Clock(ClockSkew),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotReady::Draining => f.write_str("draining"),
            NotReady::Joining => f.write_str("joining"),
            NotReady::Clock(skew) => write!(f, "clock: {skew}"),
        }
    }
}

/// The parts [`Node::new`] puts together (see [`crate::server`]).
pub struct Parts {
    pub cfg: Config,
    pub hub: Hub,
    pub accounts: Accounts,
    pub chat: Chat,
    pub groups: Groups,
    pub presence: Arc<Presence>,
    pub friends: Friends,
    pub shutdown: CancellationToken,
    pub store: Store,
    pub mesh: Arc<Mesh>,
    pub metrics: Option<PrometheusHandle>,
    /// The token `/v1/admin/*` requests carry (see `gateway::admin`).
    pub admin_token: String,
}

impl Node {
    pub fn new(p: Parts) -> Self {
        let limits = crate::gateway::ratelimit::UserLimits::new(crate::gateway::ratelimit::Rates {
            sends: (p.cfg.rate_limit_per_sec, p.cfg.rate_limit_burst),
            reads: (p.cfg.read_rate_limit_per_sec, p.cfg.read_rate_limit_burst),
            read_bytes: (f64::from(p.cfg.read_bytes_per_sec), p.cfg.read_bytes_burst),
        });
        Node {
            limits,
            cfg: p.cfg,
            hub: p.hub,
            accounts: p.accounts,
            chat: p.chat,
            groups: p.groups,
            presence: p.presence,
            friends: p.friends,
            shutdown: p.shutdown,
            store: p.store,
            mesh: p.mesh,
            metrics: p.metrics,
            admin_token: p.admin_token,
            stop_requested: CancellationToken::new(),
            sessions: TaskTracker::new(),
            drain: Drain::default(),
            catch_ups: tokio::sync::Semaphore::new(CONCURRENT_CATCH_UPS),
        }
    }

    /// The token admin requests must carry.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// Asks the node to drain and stop, as SIGTERM does (`serve` waits on it).
    pub fn request_stop(&self) {
        self.stop_requested.cancel();
    }

    /// Resolves once an operator asked this node to stop, or its removal is done (it was
    /// decommissioned): either way, `serve` drains and stops.
    pub async fn stop_requested(&self) -> &'static str {
        tokio::select! {
            _ = self.stop_requested.cancelled() => "an operator asked this node to drain and stop",
            _ = self.mesh.left() => "decommissioned: its partitions are held by the other nodes now",
        }
    }

    /// Publishes an operator's request (decommission, remove, cancel).
    pub async fn mesh_admin(
        &self,
        request: cluster::lifecycle::Request,
    ) -> Result<(), cluster::lifecycle::RequestError> {
        self.mesh.admin_request(request).await
    }

    /// The cluster as this node sees it, for `chatnode admin status`.
    pub async fn move_status(&self) -> crate::mesh::MoveStatus {
        self.mesh.move_status().await
    }

    /// Where a new client should connect: the least-loaded live node, else this one.
    pub async fn recommended(&self) -> NodeInfo {
        self.mesh
            .recommend()
            .await
            .unwrap_or_else(|| self.node_info())
    }

    /// Where clients of this node connect.
    pub fn node_info(&self) -> NodeInfo {
        NodeInfo {
            node_id: self.cfg.node_id,
            ws_url: self.cfg.ws_url(),
            quic_addr: self.cfg.quic_url(),
        }
    }

    /// Presence of `users`, for group views.
    pub async fn presence_of(&self, users: &[UserId]) -> Vec<PresenceInfo> {
        let mut out = Vec::with_capacity(users.len());
        self.presence.look_up(users).await;
        for &u in users {
            out.push(self.presence.status(u).await);
        }
        out
    }

    /// `Ok` when the node serves, else why not.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if self.shutdown.is_cancelled() || self.drain.is_draining() {
            Err(NotReady::Draining)
        } else if !self.mesh.is_active() {
            Err(NotReady::Joining)
        } else {
            self.chat.clock_check().map_err(NotReady::Clock)
        }
    }

    /// How many members are live, this node included.
    pub fn live_members(&self) -> usize {
        self.mesh.live_members()
    }

    /// The cluster's members, newest generation of each node id.
    pub async fn members(&self) -> Vec<MemberInfo> {
        self.mesh
            .members()
            .await
            .iter()
            .map(|m| {
                let info = crate::mesh::node_info(m);
                MemberInfo {
                    node_id: m.node_id,
                    state: if m.live { m.state.as_str() } else { "dead" },
                    live: m.live,
                    load: m.load,
                    ws_url: info.ws_url,
                    quic_addr: info.quic_addr,
                    peer_addr: m.addrs.peer.to_string(),
                    gossip_addr: m.gossip_addr.to_string(),
                    pending: m.pending.clone(),
                }
            })
            .collect()
    }

    /// The Prometheus exposition of every metric, with the store's size refreshed.
    pub fn render_metrics(&self) -> String {
        metrics::gauge!("store_disk_bytes").set(self.store.size_on_disk() as f64);
        self.store.export_index_gauges();
        self.mesh.export_gauges();
        self.metrics
            .as_ref()
            .map(|m| m.render())
            .unwrap_or_default()
    }

    /// Waits for a turn to read an inbox for a catch-up; the turn ends when the permit is
    /// dropped. (The semaphore is never closed, so there is always a permit to wait for.)
    pub async fn catch_up_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.catch_ups.acquire().await.ok()
    }

    /// Held by each live session so that shutdown can wait for them.
    pub fn connection_guard(&self) -> TaskTrackerToken {
        self.sessions.token()
    }

    /// Runs a session task that shutdown waits for.
    pub fn spawn_session(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        self.sessions.spawn(fut);
    }

    /// Drains this node's client connections before it stops (or is upgraded): refuses new
    /// WebSocket and QUIC connections (`/readyz` says `draining`, gossip state
    /// `leaving`), sends every session a `draining` frame naming the
    /// least-loaded other active member, waits up to `within` for the clients to leave
    /// (their sends already taken are stored and acked), then closes the rest with 1001
    /// after their in-flight sends finish. Returns what happened.
    ///
    /// Idempotent: a second call (SIGTERM after an admin drain) waits for the first and
    /// returns its report. The node stays draining afterwards; stopping it is the caller's
    /// job (`server::serve` goes on with the shutdown).
    pub async fn drain(&self, within: std::time::Duration) -> DrainReport {
        self.drain
            .report
            .get_or_init(|| self.run_drain(within))
            .await
            .clone()
    }

    async fn run_drain(&self, within: std::time::Duration) -> DrainReport {
        let span = tracing::info_span!("drain", node = self.cfg.node_id);
        async {
            let started = tokio::time::Instant::now();
            let sessions_at_start = self.hub.connections();
            let targets = Targets::new(self.mesh.start_drain().await);
            self.drain.start(targets);
            let moved_to = self.drain.target_ids();
            tracing::info!(
                sessions = sessions_at_start,
                targets = ?moved_to,
                timeout_s = within.as_secs_f64(),
                "draining: refusing new connections and moving devices"
            );
            metrics::gauge!("gateway_drain_sessions").set(sessions_at_start as f64);
            self.sessions.close();
            let deadline = started + within;
            let mut timed_out = false;
            loop {
                let progress = tokio::time::Instant::now() + DRAIN_PROGRESS_EVERY;
                tokio::select! {
                    _ = self.sessions.wait() => break,
                    _ = tokio::time::sleep_until(progress.min(deadline)) => {}
                }
                let left = self.hub.connections();
                metrics::gauge!("gateway_drain_sessions").set(left as f64);
                if tokio::time::Instant::now() >= deadline {
                    timed_out = true;
                    break;
                }
                let (moved, _) = self.drain.counts();
                tracing::info!(sessions = left, moved, "draining");
            }
            let mut left_over = 0;
            if timed_out {
                tracing::info!(
                    sessions = self.hub.connections(),
                    "drain timeout: closing the remaining sessions (1001)"
                );
                self.drain.close_remaining();
                if tokio::time::timeout(DRAIN_CLOSE_GRACE, self.sessions.wait())
                    .await
                    .is_err()
                {
                    left_over = self.sessions.len() as u64;
                }
            }
            metrics::gauge!("gateway_drain_sessions").set(self.hub.connections() as f64);
            // `leaving` went into gossip when the drain started; until every peer has it,
            // some still choose this node as a partition's primary. It keeps serving them
            // for a few gossip rounds before the caller stops it.
            if self.mesh.live_members() > 1 {
                tokio::time::sleep_until(started + LEAVE_GRACE).await;
            }
            let (moved, closed) = self.drain.counts();
            let report = DrainReport {
                sessions_at_start,
                moved,
                closed,
                left_over,
                timed_out,
                moved_to,
                elapsed_ms: started.elapsed().as_millis() as u64,
            };
            tracing::info!(?report, "drained");
            report
        }
        .instrument(span)
        .await
    }

    /// Stops taking sessions and waits (at most `within`) for the running ones to end;
    /// false when some did not.
    pub async fn drain_sessions(&self, within: std::time::Duration) -> bool {
        self.sessions.close();
        tokio::time::timeout(within, self.sessions.wait())
            .await
            .is_ok()
    }
}
