//! `connections`: open N authenticated WebSocket (or QUIC) connections that heartbeat, hold
//! them, and report the node's resident memory per connection (VmRSS from /proc before and
//! after). Users are few (signup is argon2): each logs in once and its token serves many
//! connections. Past one source address's ephemeral ports, sockets are bound to 127.0.0.2,
//! 127.0.0.3, ... QUIC connections share one UDP socket per source address (the node takes
//! at most 10,000 QUIC connections from one address), so they need no file descriptor each.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use client_proto::codec::Codec;
use client_proto::ClientFrame;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::conn;
use super::report::{int, Table};
use super::{Account, Outcome, Target, TargetArgs};

/// Connections per source address before the next 127.0.0.x is used.
const PER_SOURCE: usize = 20_000;

/// `chatnode bench connections`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionsArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Users to sign up (each connection uses one user's token).
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// How long to hold the connections once all are open.
    #[arg(long, default_value_t = 30)]
    pub hold_secs: u64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// WebSocket (`--codec` applies) or client QUIC (binary frames).
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub transport: Transport,
    /// QUIC: the node's client QUIC address, `IP:port` [default with --spawn-node: the
    /// spawned node's].
    #[arg(long)]
    pub quic_addr: Option<std::net::SocketAddr>,
    /// QUIC: the cluster CA certificate (PEM) to trust [default with --spawn-node: the
    /// spawned node's].
    #[arg(long)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// How the held connections reach the node.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket over TCP.
    Ws,
    /// The client protocol over QUIC.
    Quic,
}

/// QUIC connections per source address (under the node's per-address limit of 10,000).
const PER_QUIC_SOURCE: usize = 8_000;

/// Where QUIC connections go, and the endpoints (one per source address) they share.
#[derive(Clone)]
struct QuicTarget {
    addr: std::net::SocketAddr,
    endpoints: Vec<quinn::Endpoint>,
}

impl QuicTarget {
    fn open(addr: std::net::SocketAddr, ca_pem: &[u8], connections: usize) -> Result<Self> {
        let config = client_proto::client::quic::client_config(Some(ca_pem))
            .map_err(|e| anyhow::anyhow!("QUIC client configuration: {e}"))?;
        let sources = connections.div_ceil(PER_QUIC_SOURCE).max(1);
        let endpoints = (0..sources)
            .map(|k| {
                let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + k as u8));
                let mut endpoint = quinn::Endpoint::client(std::net::SocketAddr::new(ip, 0))
                    .with_context(|| format!("binding a QUIC endpoint on {ip}"))?;
                endpoint.set_default_client_config(config.clone());
                Ok(endpoint)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { addr, endpoints })
    }
}

/// The scenario's figures.
#[derive(Debug, Default, Serialize)]
pub struct ConnectionsResult {
    pub requested: usize,
    pub opened: u64,
    pub failed: u64,
    pub dropped_while_held: u64,
    pub open_secs: f64,
    pub node_rss_before_kib: Option<u64>,
    pub node_rss_after_kib: Option<u64>,
    pub node_kib_per_connection: Option<f64>,
    pub bench_rss_kib: Option<u64>,
    pub first_error: Option<String>,
    pub transport: Option<Transport>,
}

/// VmRSS of `pid` ("self" for this process), in KiB.
fn vm_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `chatnode bench connections`.
pub async fn run(args: ConnectionsArgs) -> Result<Outcome> {
    if args.users == 0 || args.connections == 0 {
        bail!("--users and --connections must be at least 1");
    }
    let mut target = Target::open(&args.target)?;
    let result = measure(&mut target, &args).await;
    target.check_alive()?;
    let r = result?;
    let mut table = Table::new(
        format!(
            "connections: {} requested, held {} s",
            int(r.requested as f64),
            args.hold_secs
        ),
        &["figure", "value"],
    );
    let opt = |v: Option<u64>| v.map_or("-".into(), |v| int(v as f64));
    table.row(vec!["opened".into(), int(r.opened as f64)]);
    table.row(vec!["failed to open".into(), int(r.failed as f64)]);
    table.row(vec![
        "dropped while held".into(),
        int(r.dropped_while_held as f64),
    ]);
    table.row(vec![
        "time to open (s)".into(),
        format!("{:.1}", r.open_secs),
    ]);
    table.row(vec![
        "node VmRSS before (KiB)".into(),
        opt(r.node_rss_before_kib),
    ]);
    table.row(vec![
        "node VmRSS held (KiB)".into(),
        opt(r.node_rss_after_kib),
    ]);
    table.row(vec![
        "node KiB per connection".into(),
        r.node_kib_per_connection
            .map_or("-".into(), |v| format!("{v:.2}")),
    ]);
    table.row(vec!["bench VmRSS (KiB)".into(), opt(r.bench_rss_kib)]);
    let mut failures = Vec::new();
    if r.failed > 0 {
        failures.push(format!(
            "{} connections failed to open (first: {})",
            r.failed,
            r.first_error.as_deref().unwrap_or("?")
        ));
    }
    if r.dropped_while_held > 0 {
        failures.push(format!(
            "{} connections dropped while held",
            r.dropped_while_held
        ));
    }
    Ok(Outcome {
        scenario: "connections",
        tables: vec![table],
        lost: 0,
        json: serde_json::json!({ "result": r }),
        failures,
    })
}

#[derive(Default)]
struct Shared {
    opened: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    first_error: parking_lot::Mutex<Option<String>>,
}

async fn measure(target: &mut Target, args: &ConnectionsArgs) -> Result<ConnectionsResult> {
    let users = args.users.min(args.connections);
    let mut accounts = target.endpoint.accounts(users, "bc").await?;
    // Signups and logins run argon2, whose freed memory the allocator keeps and would later
    // hand to connections; a spawned node is restarted so the baseline holds none of it.
    if let Some(node) = target.node.as_mut() {
        node.restart()?;
        target.node_pid = Some(node.pid);
        let ws_url = client_proto::client::HttpClient::new(node.http.clone()).ws_url();
        for a in &mut accounts {
            a.ws_url = ws_url.clone();
        }
        // Let the fresh process settle before the baseline reading.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let quic = match args.transport {
        Transport::Ws => None,
        Transport::Quic => {
            let spawned = target.node.as_ref();
            let addr = match (args.quic_addr, spawned) {
                (Some(addr), _) => addr,
                (None, Some(node)) => node
                    .quic
                    .parse()
                    .context("the spawned node's QUIC address")?,
                (None, None) => bail!("--transport quic against --server needs --quic-addr"),
            };
            let ca = match (&args.ca_file, spawned) {
                (Some(path), _) => {
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
                }
                (None, Some(node)) => node.ca_pem()?,
                (None, None) => bail!("--transport quic against --server needs --ca-file"),
            };
            Some(QuicTarget::open(addr, &ca, args.connections)?)
        }
    };
    let pid = target.node_pid.map(|p| p.to_string());
    let before = pid.as_deref().and_then(vm_rss_kib);
    let shared = Arc::new(Shared::default());
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
    let spread = args.connections > PER_SOURCE;
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for i in 0..args.connections {
        let account = accounts[i % accounts.len()].clone();
        let (gate, shared, stop) = (gate.clone(), shared.clone(), stop.clone());
        match &quic {
            Some(q) => {
                let endpoint = q.endpoints[(i / PER_QUIC_SOURCE) % q.endpoints.len()].clone();
                tasks.spawn(hold_quic(endpoint, q.addr, account, gate, shared, stop));
            }
            None => {
                let source = spread
                    .then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i / PER_SOURCE) as u8)));
                tasks.spawn(hold(account, source, target.codec, gate, shared, stop));
            }
        }
    }
    // Wait for every attempt, one progress line a second.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let (o, f) = (
            shared.opened.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
        );
        eprintln!(
            "[connections] t={:>3}s opened {} failed {} of {}",
            started.elapsed().as_secs(),
            o,
            f,
            args.connections
        );
        if (o + f) as usize >= args.connections {
            break;
        }
    }
    let open_secs = started.elapsed().as_secs_f64();
    let hold_start = Instant::now();
    while hold_start.elapsed() < Duration::from_secs(args.hold_secs) {
        tick.tick().await;
        eprintln!(
            "[connections] holding t={:>3}s open {} dropped {} node VmRSS {} KiB",
            hold_start.elapsed().as_secs(),
            shared.opened.load(Ordering::Relaxed) - shared.dropped.load(Ordering::Relaxed),
            shared.dropped.load(Ordering::Relaxed),
            pid.as_deref()
                .and_then(vm_rss_kib)
                .map_or("?".into(), |v| int(v as f64)),
        );
    }
    let after = pid.as_deref().and_then(vm_rss_kib);
    let bench_rss = vm_rss_kib("self");
    stop.cancel();
    while let Some(j) = tasks.join_next().await {
        j.context("a connection task panicked")?;
    }
    let opened = shared.opened.load(Ordering::Relaxed);
    let per_conn = match (before, after) {
        (Some(b), Some(a)) if opened > 0 => Some(a.saturating_sub(b) as f64 / opened as f64),
        _ => None,
    };
    let first_error = shared.first_error.lock().clone();
    Ok(ConnectionsResult {
        requested: args.connections,
        opened,
        failed: shared.failed.load(Ordering::Relaxed),
        dropped_while_held: shared.dropped.load(Ordering::Relaxed),
        open_secs,
        node_rss_before_kib: before,
        node_rss_after_kib: after,
        node_kib_per_connection: per_conn,
        bench_rss_kib: bench_rss,
        first_error,
        transport: Some(args.transport),
    })
}

/// Opens one connection (at most `gate` at a time), then heartbeats until `stop`.
async fn hold(
    account: Account,
    source: Option<IpAddr>,
    codec: Codec,
    gate: Arc<Semaphore>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let opened = {
        let Ok(_permit) = gate.acquire().await else {
            return;
        };
        match source {
            Some(ip) => conn::connect_from(&account.ws_url, ip, &account.token, codec).await,
            None => conn::connect(&account.ws_url, &account.token, codec).await,
        }
    };
    let mut c = match opened {
        Ok(c) => c,
        Err(e) => return open_failed(&shared, format!("{e:#}")),
    };
    shared.opened.fetch_add(1, Ordering::Relaxed);
    let mut hb = heartbeats(c.heartbeat_interval_ms);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = hb.tick() => {
                if c.sink.send(conn::encode(codec, &ClientFrame::Heartbeat)).await.is_err() {
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            msg = c.stream.next() => {
                if let Err(e) = conn::decode(msg) {
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    shared.first_error.lock().get_or_insert_with(|| format!("dropped: {e:#}"));
                    return;
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), c.sink.close()).await;
}

/// A heartbeat timer at the interval the node announced, started at a random point of the
/// first interval so that many connections spread their heartbeats.
fn heartbeats(interval_ms: u64) -> tokio::time::Interval {
    let every = Duration::from_millis(interval_ms.clamp(500, 60_000));
    let offset = Duration::from_millis(rand::random::<u64>() % every.as_millis().max(1) as u64);
    tokio::time::interval_at(Instant::now() + offset, every)
}

/// Records a failed open.
fn open_failed(shared: &Shared, error: String) {
    shared.failed.fetch_add(1, Ordering::Relaxed);
    shared.first_error.lock().get_or_insert(error);
}

/// Opens one QUIC connection on `endpoint` (at most `gate` at a time), authenticates, then
/// heartbeats until `stop`.
async fn hold_quic(
    endpoint: quinn::Endpoint,
    addr: std::net::SocketAddr,
    account: Account,
    gate: Arc<Semaphore>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    use client_proto::ServerFrame;
    let encode =
        |frame: &ClientFrame| bytes::Bytes::from(client_proto::codec::encode(Codec::Binary, frame));
    let opened = {
        let Ok(_permit) = gate.acquire().await else {
            return;
        };
        let open = async {
            let mut link =
                client_proto::client::quic::connect_on(endpoint, addr, &addr.ip().to_string())
                    .await
                    .map_err(|e| format!("{e}"))?;
            let auth = ClientFrame::Auth {
                token: account.token.clone(),
            };
            link.send
                .send(encode(&auth))
                .await
                .map_err(|e| format!("sending auth: {e}"))?;
            match link.recv.next().await {
                Some(Ok(bytes)) => match client_proto::codec::decode(Codec::Binary, &bytes) {
                    Ok(ServerFrame::Ready {
                        heartbeat_interval_ms,
                        ..
                    }) => Ok((link, heartbeat_interval_ms)),
                    Ok(other) => Err(format!("unexpected frame before ready: {other:?}")),
                    Err(e) => Err(format!("undecodable frame: {e}")),
                },
                Some(Err(e)) => Err(format!("reading ready: {e}")),
                None => Err("closed before ready".to_string()),
            }
        };
        tokio::time::timeout(Duration::from_secs(30), open)
            .await
            .unwrap_or_else(|_| Err("QUIC connect and auth timed out".to_string()))
    };
    let (mut link, interval_ms) = match opened {
        Ok(opened) => opened,
        Err(e) => return open_failed(&shared, e),
    };
    shared.opened.fetch_add(1, Ordering::Relaxed);
    let mut hb = heartbeats(interval_ms);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = hb.tick() => {
                if link.send.send(encode(&ClientFrame::Heartbeat)).await.is_err() {
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            frame = link.recv.next() => {
                let ok = matches!(&frame, Some(Ok(b)) if client_proto::codec::decode::<ServerFrame>(Codec::Binary, b).is_ok());
                if !ok {
                    shared.dropped.fetch_add(1, Ordering::Relaxed);
                    shared.first_error.lock().get_or_insert_with(|| format!("dropped: {frame:?}"));
                    return;
                }
            }
        }
    }
    link.conn.close(0u32.into(), b"bench done");
}
