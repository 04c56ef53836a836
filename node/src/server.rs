//! A running node: builds every part from the config, serves until told to stop, and shuts
//! down in order. This is the only module that knows every part.
//!
//! Start-up: the HTTP listener is bound and the UDP ports probed before any file is made (a
//! taken port leaves nothing behind), then the data dir and cluster credentials, the store,
//! the client QUIC endpoint, the mesh (peer endpoint, gossip, the
//! cluster lifecycle), presence and push, the domain services, then the gateways.
//!
//! Shutdown, in this order: drain the client connections (`Node::drain`: refuse new ones,
//! send every session a `draining` frame naming another node, wait up to
//! `--drain-timeout-secs` for the devices to move, close the rest with 1001 after their
//! in-flight sends), stop accepting (HTTP and QUIC listeners), end what is left of the
//! sessions and wait for them, stop the mesh (it leaves gossip and lets writes past their quorum
//! reach the other replicas), stop presence fan-out and the push worker, flush the store.
//! Every task's result is checked; a task that panicked is reported.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cluster::clock::SkewGuard;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::domain::accounts::Accounts;
use crate::domain::auth::Tokens;
use crate::domain::chat::Chat;
use crate::domain::delivery::Delivery;
use crate::domain::friends::Friends;
use crate::domain::groups::Groups;
use crate::domain::hub::Hub;
use crate::domain::presence::{Feed, Presence};
use crate::domain::push::{Push, TargetPolicy};
use crate::mesh::Mesh;
use crate::node::{Node, Parts};
use crate::store::wal::LogOptions;
use crate::store::{Store, StoreOptions};

/// How long shutdown waits for sessions to finish once the drain is over.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the clock's lease is checked (it is renewed about every half second of clock
/// time, and has 2.5 s to become durable).
const LEASE_EVERY: Duration = Duration::from_millis(250);

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

/// Waits for a background task and reports how it ended.
async fn join(name: &str, task: JoinHandle<()>) {
    match task.await {
        Ok(()) => {}
        Err(e) if e.is_panic() => tracing::error!(task = name, error = %e, "task panicked"),
        Err(e) => tracing::warn!(task = name, error = %e, "task was cancelled"),
    }
}

/// Keeps the clock's lease ahead of it (`Store::keep_lease`) until shutdown.
fn spawn_lease_keeper(store: Store, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(LEASE_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = store.keep_lease().await {
                tracing::warn!(error = %e, "cannot persist the clock's lease; retrying");
            }
        }
    })
}

/// Tests only: follows the wall-clock offset written in `path` (`--clock-offset-file`). The
/// task never ends by itself; shutdown aborts it (it holds nothing).
fn spawn_clock_offset(path: std::path::PathBuf) -> JoinHandle<()> {
    let read = move || {
        std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .unwrap_or(0)
    };
    cluster::clock::set_offset_ms(read());
    tokio::spawn(async move {
        let mut last = cluster::clock::offset_ms();
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = read();
            if now != last {
                tracing::warn!(offset_ms = now, "test clock offset changed");
                cluster::clock::set_offset_ms(now);
                last = now;
            }
        }
    })
}

/// Creates `dir` (and missing parents) as 0700 whatever the umask, and makes an existing
/// one 0700: it holds the store (password hashes, message bodies) and usually the cluster
/// dir with the node's key.
fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Runs a node until `stop` resolves, then shuts it down.
pub async fn serve(
    mut cfg: Config,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    // A taken or wrong address fails here, before any file is made: the HTTP listener is
    // kept; the UDP ports are probed and released (QUIC and gossip bind them again below, once
    // their credentials exist; a port taken in between still fails start-up, after the
    // files).
    let listener = tokio::net::TcpListener::bind(cfg.http_addr)
        .await
        .with_context(|| format!("cannot listen on {} for HTTP and WebSocket", cfg.http_addr))?;
    for (addr, what) in [
        (cfg.quic_addr, "client QUIC"),
        (cfg.peer_addr, "peers (QUIC)"),
        (cfg.gossip_addr, "gossip"),
    ] {
        if addr.port() != 0 {
            std::net::UdpSocket::bind(addr)
                .with_context(|| format!("cannot listen on {addr} for {what}"))?;
        }
    }
    create_private_dir(&cfg.data_dir)
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
    let clock_offset = cfg
        .clock_offset_file
        .as_ref()
        .map(|path| spawn_clock_offset(path.clone()));
    let db_dir = cfg.data_dir.join("db");
    let options = StoreOptions {
        node_id: cfg.node_id,
        partitions: cfg.partitions,
        write_timeout: cfg.write_timeout,
        seal_window: cfg.seal_window,
        max_clock_skew: cfg.max_clock_skew,
        guard: Arc::new(SkewGuard::new(cfg.max_clock_skew.as_millis() as u64)),
        log: LogOptions {
            dir: cfg.data_dir.join("db-log"),
            checkpoint_interval: cfg.checkpoint_interval,
            checkpoint_bytes: cfg.checkpoint_bytes,
        },
        inline_body_bytes: cfg.inline_body_bytes,
        index: cfg.index,
    };
    // Installed before the store opens, so that the replay's counters are recorded.
    let metrics = metrics_recorder();
    let (store, store_tasks) = Store::open(&db_dir, options).with_context(|| {
        format!(
            "cannot open the store in {} (is another chatnode using this data dir?)",
            db_dir.display()
        )
    })?;
    // The clock's lease is durable before any id is issued.
    store
        .keep_lease()
        .await
        .context("cannot persist the clock's lease")?;
    let ids = store.ids();

    let http_addr = listener.local_addr()?;
    cfg.http_addr = http_addr; // port 0 means "any": advertise the real one
    let quic_endpoint = crate::gateway::quic::bind(cfg.quic_addr, &tls)?;
    cfg.quic_addr = quic_endpoint.local_addr()?;

    let hub = Hub::default();
    let shutdown = CancellationToken::new();
    let lease_keeper = spawn_lease_keeper(store.clone(), shutdown.clone());
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
        Arc::new(mesh.presence_directory()),
        feed,
        store.clone(),
    ));
    mesh.attach_presence(presence.clone());
    let fanout = presence.spawn_fanout(shutdown.clone());
    let push_targets =
        Arc::new(TargetPolicy::parse(&cfg.push.allow_hosts).map_err(|e| anyhow::anyhow!(e))?);
    let signing_key = match &cfg.push.signing_secret {
        Some(s) => s.0.as_bytes().to_vec(),
        None => crate::domain::push::derive_signing_key(secret.as_bytes()).into_bytes(),
    };
    let push = Arc::new(Push::new(
        store.clone(),
        ids.clone(),
        cfg.push.clone(),
        push_targets.clone(),
        &signing_key,
    ));
    let push_worker = push.spawn(shutdown.clone());
    let delivery = Delivery::new(hub.clone(), Arc::new(mesh.forwarder()));
    let node = Arc::new(Node::new(Parts {
        accounts: Accounts::new(
            store.clone(),
            Tokens::new(secret.as_bytes()),
            ids.clone(),
            delivery.clone(),
            cfg.token_ttl,
            cfg.device_idle,
            &cfg.login,
        )
        .with_push_targets(push_targets),
        chat: Chat::new(
            store.clone(),
            ids.clone(),
            delivery.clone(),
            presence.clone(),
            push.clone(),
            cfg.max_concurrent_sends,
        ),
        groups: Groups::new(store.clone(), ids),
        friends: Friends::new(
            store.clone(),
            hub.clone(),
            presence.clone(),
            delivery.clone(),
        ),
        presence,
        mesh: mesh.clone(),
        store: store.clone(),
        hub,
        shutdown: shutdown.clone(),
        metrics,
        admin_token: crate::gateway::admin::derive_admin_token(secret.as_bytes()),
        cfg,
    }));

    let quic = crate::gateway::quic::spawn_accept(node.clone(), quic_endpoint, shutdown.clone());
    // Connection caps, head and idle timeouts: `gateway::listener`.
    let server = crate::gateway::listener::spawn(
        listener,
        crate::gateway::http::router(node.clone())
            .merge(crate::gateway::admin::router(node.clone())),
        node.cfg.conn.clone(),
        shutdown.clone(),
    );

    // The bench and the test harness parse this line (`ReadyLine::parse`); its target is
    // fixed so that they can turn it on alone (`--log warn,chatnode::ready=info`).
    let ready = client_proto::ReadyLine {
        node_id: node.cfg.node_id,
        http: http_addr,
        quic: node.cfg.quic_addr,
        peer: node.cfg.peer_addr,
        gossip: node.cfg.gossip_addr,
        data_dir: node.cfg.data_dir.clone(),
    };
    tracing::info!(target: "chatnode::ready", "{ready}");

    let stopped = tokio::select! {
        _ = stop => Some("a signal"),
        why = node.stop_requested() => Some(why),
        _ = shutdown.cancelled() => None,
    };
    if let Some(why) = stopped {
        // Move the clients elsewhere before anything stops (an admin drain may have done it
        // already: then this returns its report at once).
        tracing::info!(why, "stopping: draining client connections first");
        tokio::select! {
            _ = node.drain(node.cfg.drain_timeout) => {}
            _ = shutdown.cancelled() => tracing::warn!("shutdown requested during the drain"),
        }
    }
    tracing::info!("shutting down");
    shutdown.cancel();
    if !node.drain_sessions(DRAIN_TIMEOUT).await {
        tracing::warn!("some sessions did not finish within {DRAIN_TIMEOUT:?}");
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, server).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "HTTP server task failed"),
        Err(_) => tracing::warn!("HTTP server did not stop within {DRAIN_TIMEOUT:?}"),
    }
    join("client QUIC accept loop", quic).await;
    mesh.shutdown().await;
    join("presence fan-out", fanout).await;
    join("push worker", push_worker).await;
    join("clock lease keeper", lease_keeper).await;
    if let Some(task) = clock_offset {
        task.abort();
    }
    store.flush().await.context("final flush of the store")?;
    // Everything is on disk and the log is checkpointed: stop the store's tasks (peers may
    // still hold handles to the store, so they would not end by themselves).
    store_tasks.shutdown().await;
    drop(node);
    drop(store);
    tracing::info!("stopped");
    Ok(())
}
