//! A running node: builds the pieces from the config, serves until told to stop, and shuts
//! down in order (stop accepting, tell sessions to drain, wait for them, flush the store).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use client_proto::http::{NodeInfo, PresenceInfo};
use client_proto::ids::UserId;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::{task_tracker::TaskTrackerToken, TaskTracker};

use crate::accounts::Accounts;
use crate::auth::Tokens;
use crate::chat::Chat;
use crate::config::Config;
use crate::friends::Friends;
use crate::groups::Groups;
use crate::hub::Hub;
use crate::mesh::{GossipDirectory, Mesh};
use crate::presence::{Feed, Presence};
use crate::push::Push;
use crate::store::Store;

/// How long shutdown waits for sessions to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a request or session needs; shared behind an `Arc`.
pub struct Node {
    pub cfg: Config,
    pub store: Store,
    pub hub: Hub,
    pub accounts: Accounts,
    pub chat: Chat,
    pub groups: Groups,
    pub presence: Arc<Presence>,
    pub friends: Friends,
    pub mesh: Arc<Mesh>,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    pub metrics: Option<PrometheusHandle>,
    sessions: TaskTracker,
}

impl Node {
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
        for &u in users {
            out.push(self.presence.status(u).await);
        }
        out
    }

    /// Held by each live session so that shutdown can wait for them.
    pub fn connection_guard(&self) -> TaskTrackerToken {
        self.sessions.token()
    }

    /// Runs a session task that shutdown waits for.
    pub fn spawn_session(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        self.sessions.spawn(fut);
    }
}

/// Installs the Prometheus recorder once per process.
fn metrics_recorder() -> Option<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<Option<PrometheusHandle>> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "metrics are off");
                None
            }
        })
        .clone()
}

/// Runs a node until `stop` resolves, then shuts it down.
pub async fn serve(
    mut cfg: Config,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create the data dir {}", cfg.data_dir.display()))?;
    let cert_name = format!("node-{}", cfg.node_id);
    let hosts = vec![
        cfg.advertise_host.clone(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    let (tls, secret) = cluster::certs::ensure_node(&cfg.cluster_dir, &cert_name, &hosts)
        .with_context(|| {
            format!(
                "cannot set up the cluster dir {}",
                cfg.cluster_dir.display()
            )
        })?;
    let db_dir = cfg.data_dir.join("db");
    let (store, flusher) = Store::open(&db_dir, cfg.node_id, cfg.partitions, cfg.write_timeout)
        .with_context(|| {
            format!(
                "cannot open the store in {} (is another chatnode using this data dir?)",
                db_dir.display()
            )
        })?;
    let ids = store.ids();

    let listener = tokio::net::TcpListener::bind(cfg.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} for HTTP and WebSocket", cfg.http_addr))?;
    let http_addr = listener.local_addr()?;
    cfg.http_addr = http_addr; // port 0 means "any": advertise the real one
    let quic_endpoint = crate::quic::bind(cfg.quic_addr, &tls)?;
    cfg.quic_addr = quic_endpoint.local_addr()?;

    let hub = Hub::default();
    let shutdown = CancellationToken::new();
    let feed = Arc::new(Feed::default());
    let started = Mesh::start(
        &cfg,
        &tls,
        &secret,
        &store,
        hub.clone(),
        feed.clone(),
        shutdown.child_token(),
    )
    .await?;
    cfg.peer_addr = started.peer_addr;
    let mesh = started.mesh;
    let presence = Arc::new(Presence::new(
        Arc::new(GossipDirectory::new(mesh.clone())),
        feed,
        store.clone(),
    ));
    let fanout = presence.spawn_fanout(shutdown.clone());
    let push = Arc::new(Push::new(store.clone(), ids.clone(), cfg.push.clone()));
    let push_worker = push.spawn(shutdown.clone());
    let node = Arc::new(Node {
        accounts: Accounts::new(
            store.clone(),
            Tokens::new(secret.as_bytes()),
            ids.clone(),
            hub.clone(),
            mesh.clone(),
            cfg.token_ttl,
        ),
        chat: Chat::new(
            store.clone(),
            ids.clone(),
            hub.clone(),
            presence.clone(),
            push.clone(),
            mesh.clone(),
            cfg.sync_overlap,
        ),
        groups: Groups::new(store.clone(), ids),
        friends: Friends::new(store.clone(), hub.clone(), presence.clone()),
        presence,
        mesh: mesh.clone(),
        store: store.clone(),
        hub,
        shutdown: shutdown.clone(),
        metrics: metrics_recorder(),
        sessions: TaskTracker::new(),
        cfg,
    });

    let quic = crate::quic::spawn_accept(node.clone(), quic_endpoint, shutdown.clone());
    let app = crate::http::router(node.clone()).into_make_service_with_connect_info::<SocketAddr>();
    let http_shutdown = shutdown.clone();
    // Frames are small and latency-bound: no Nagle delay on client sockets.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp: &mut tokio::net::TcpStream| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { http_shutdown.cancelled().await })
            .await
    });

    // The bench and the test harness parse this line (`ReadyLine::parse`).
    let ready = client_proto::ReadyLine {
        node_id: node.cfg.node_id,
        http: http_addr,
        quic: node.cfg.quic_addr,
        peer: node.cfg.peer_addr,
        gossip: node.cfg.gossip_addr,
        data_dir: node.cfg.data_dir.clone(),
    };
    tracing::info!("{ready}");

    tokio::select! {
        _ = stop => tracing::info!("shutting down"),
        r = &mut Box::pin(async { shutdown.cancelled().await }) => r,
    }
    shutdown.cancel();
    node.sessions.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, node.sessions.wait())
        .await
        .is_err()
    {
        tracing::warn!("some sessions did not finish within {DRAIN_TIMEOUT:?}");
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server ended with an error"),
        Err(_) => tracing::warn!("HTTP server did not stop within {DRAIN_TIMEOUT:?}"),
        _ => {}
    }
    let _ = quic.await;
    mesh.shutdown().await;
    let _ = fanout.await;
    let _ = push_worker.await;
    store.flush().await.context("final flush of the store")?;
    // Everything is on disk. The flusher would end only once every handle to the store is
    // gone, and the replication service's peers may still hold one: stop it here.
    flusher.abort();
    drop(node);
    drop(store);
    tracing::info!("stopped");
    Ok(())
}
