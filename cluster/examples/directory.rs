//! Measures the partitioned directory (`cluster::directory`) at a given number of online
//! users: what it costs every node, how fast a change reaches a watcher on another node, and
//! what routing costs once routes are known.
//!
//! `cargo run --release -p cluster --example directory -- 1000000 [changes] [watched]`
//!
//! Three nodes run in this process, each with its own mutual-TLS QUIC peer endpoint on
//! loopback (as real nodes talk), two home replicas per user, 1024 partitions. The N users
//! are spread over the three (user `u`'s devices on node `u % 3`). It reports:
//!
//! - how long until every user is registered at both home replicas;
//! - directory memory per online user per node: the process's resident growth over three
//!   nodes, and the entry tables' own estimate;
//! - over a 10 s window with nothing changing: directory requests and CPU per node;
//! - `watched` (default 1,000) users of node 0 watched from node 1, then `changes`
//!   (default 200) of them going offline on node 0, one every 20 ms: the time until node 1
//!   is told, p50 / p99 / max;
//! - routing: node 2 resolves 10,000 users' routes once, then looks them up 1,000,000
//!   times; the requests that cost (0 expected).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cluster::certs;
use cluster::directory::{
    Directory, DirectoryConfig, DirectoryHooks, EndpointPeers, KIND_DIRECTORY,
};
use cluster::lifecycle::ClusterView;
use cluster::replication::{ReplicaNode, Topology};
use cluster::transport::{BoxFuture, RemoteError};
use cluster::{
    Lifecycle, Member, NodeAddrs, PeerConfig, PeerEndpoint, Request, Response, RpcHandler,
};
use parking_lot::Mutex;
use tokio::sync::watch;

const PARTITIONS: u32 = 1024;

struct Handler {
    dir: OnceLock<Directory>,
}

impl RpcHandler for Handler {
    fn handle(
        &self,
        _: SocketAddr,
        request: Request,
    ) -> BoxFuture<'_, Result<Response, RemoteError>> {
        match (request.kind, self.dir.get()) {
            (KIND_DIRECTORY, Some(dir)) => dir.handle(request),
            _ => Box::pin(async { Err(RemoteError::new(2, "not the directory")) }),
        }
    }
}

/// When node 1 was told of each user (the first report after `armed` was set).
#[derive(Default)]
struct Hooks {
    armed: Mutex<HashMap<u64, Option<Instant>>>,
}

impl DirectoryHooks for Hooks {
    fn changed(&self, users: &[u64]) {
        let now = Instant::now();
        let mut armed = self.armed.lock();
        for u in users {
            if let Some(slot) = armed.get_mut(u) {
                slot.get_or_insert(now);
            }
        }
    }
    fn gained(&self, _: &[(u64, cluster::NodeId)]) {}
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// This process's CPU time (user + system), in clock ticks (1/100 s on Linux).
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let changes: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(200);
    let watched: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1_000);
    let changes = changes.min(watched);

    let tmp = tempfile::tempdir()?;
    certs::init_cluster_dir(tmp.path())?;
    let mut endpoints = Vec::new();
    let mut handlers = Vec::new();
    for id in 0..3u16 {
        let name = cluster::lifecycle::node_cert_name(id);
        certs::issue_node_cert(tmp.path(), &name, &["127.0.0.1".to_string()])?;
        let tls = certs::load(tmp.path(), &name)?;
        let handler = Arc::new(Handler {
            dir: OnceLock::new(),
        });
        let endpoint = PeerEndpoint::bind(
            "127.0.0.1:0".parse()?,
            &tls,
            PeerConfig::default(),
            handler.clone(),
        )?;
        endpoints.push(endpoint);
        handlers.push(handler);
    }
    let mut members = Vec::new();
    for (id, e) in endpoints.iter().enumerate() {
        let peer = e.local_addr()?;
        let addrs = NodeAddrs {
            http: peer,
            quic: peer,
            peer,
        };
        members.push(Member::new(
            id as u16,
            1,
            peer,
            addrs,
            Lifecycle::Active,
            true,
        ));
    }
    let base_rss = rss_kib();
    let mut dirs = Vec::new();
    let mut views = Vec::new();
    let mut hooks = Vec::new();
    for id in 0..3u16 {
        let nodes = members.iter().map(|m| ReplicaNode {
            id: m.node_id,
            addr: m.addrs.peer,
            server_name: cluster::lifecycle::node_cert_name(m.node_id),
            live: true,
        });
        let view = ClusterView {
            members: members.clone().into(),
            topology: Arc::new(Topology::new(id, 3, nodes)),
        };
        let (tx, rx) = watch::channel(view);
        let h = Arc::new(Hooks::default());
        let dir = Directory::start(
            DirectoryConfig {
                generation: 1,
                ..DirectoryConfig::new(id, PARTITIONS)
            },
            Arc::new(EndpointPeers::new(
                endpoints[id as usize].clone(),
                rx.clone(),
            )),
            h.clone(),
            rx,
        );
        let _ = handlers[id as usize].dir.set(dir.clone());
        dirs.push(dir);
        views.push(tx);
        hooks.push(h);
    }

    // Registration.
    let started = Instant::now();
    let cpu0 = cpu_ticks();
    for u in 1..=n {
        dirs[(u % 3) as usize].publish(u, true);
    }
    let want = n as usize * 2;
    loop {
        let entries: usize = dirs.iter().map(|d| d.stats().entries).sum();
        if entries >= want {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            println!("registration did not finish: {entries} of {want} entries");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let registered_in = started.elapsed();
    let cpu_register = cpu_ticks() - cpu0;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let grown_kib = rss_kib().saturating_sub(base_rss);
    let table_bytes: usize = dirs.iter().map(|d| d.stats().entry_bytes).sum();
    println!("online users                 {n}");
    println!(
        "registered everywhere in     {:.2} s ({:.1} s CPU, all three nodes)",
        registered_in.as_secs_f64(),
        cpu_register as f64 / 100.0
    );
    println!(
        "memory per user per node     {:.0} B resident growth / 3, {:.0} B by the tables' estimate",
        grown_kib as f64 * 1024.0 / 3.0 / n as f64,
        table_bytes as f64 / 3.0 / n as f64
    );
    for (id, d) in dirs.iter().enumerate() {
        let s = d.stats();
        println!(
            "  node {id}: {} entries, {} local users, {:.1} MiB of entries",
            s.entries,
            s.local,
            s.entry_bytes as f64 / (1 << 20) as f64
        );
    }

    // Steady state.
    let sent0: u64 = dirs.iter().map(|d| d.stats().requests_sent).sum();
    let cpu0 = cpu_ticks();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let sent = dirs.iter().map(|d| d.stats().requests_sent).sum::<u64>() - sent0;
    let cpu = cpu_ticks() - cpu0;
    println!(
        "steady state (10 s)          {sent} requests, {:.1} % of a core per node",
        cpu as f64 / 3.0 / 10.0
    );

    // A watcher on node 1 of users on node 0.
    let users: Vec<u64> = (1..=n)
        .filter(|u| u % 3 == 0)
        .take(watched as usize)
        .collect();
    dirs[1].watch(&users);
    let unknown = dirs[1].resolve(&users).await;
    let online = users
        .iter()
        .filter(|u| dirs[1].known(**u) == Some(vec![0]))
        .count();
    println!(
        "watching {} users of node 0 from node 1: {online} seen online, {unknown} unknown",
        users.len()
    );
    let mut sent_at = HashMap::new();
    for &u in users.iter().take(changes as usize) {
        hooks[1].armed.lock().insert(u, None);
        sent_at.insert(u, Instant::now());
        dirs[0].publish(u, false);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut lags = Vec::new();
    let mut missing = 0;
    for (u, t0) in &sent_at {
        loop {
            let seen = hooks[1].armed.lock().get(u).copied().flatten();
            if let Some(t) = seen {
                if dirs[1].known(*u) == Some(vec![]) {
                    lags.push(t.saturating_duration_since(*t0));
                    break;
                }
            }
            if Instant::now() > deadline {
                missing += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    lags.sort_unstable();
    println!(
        "offline seen on node 1       p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} changes, {missing} not seen)",
        percentile(&lags, 0.5).as_secs_f64() * 1e3,
        percentile(&lags, 0.99).as_secs_f64() * 1e3,
        lags.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        lags.len()
    );

    // Routing from node 2.
    let routed: Vec<u64> = (1..=n).filter(|u| u % 3 != 2).take(10_000).collect();
    let t0 = Instant::now();
    let unknown = dirs[2].resolve(&routed).await;
    let resolve_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Let the pushes of the changes above settle: node 2 is a home replica too, and what it
    // sends as one is not routing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let sent0 = dirs[2].stats().requests_sent;
    let t0 = Instant::now();
    let mut hits = 0u64;
    for i in 0..1_000_000usize {
        if dirs[2]
            .known(routed[i % routed.len()])
            .is_some_and(|v| !v.is_empty())
        {
            hits += 1;
        }
    }
    let lookups = t0.elapsed();
    let cost = dirs[2].stats().requests_sent - sent0;
    println!(
        "routes from node 2           {} resolved in {resolve_ms:.0} ms ({unknown} unknown); 1,000,000 lookups in {:.0} ms ({hits} hits), {cost} requests",
        routed.len(),
        lookups.as_secs_f64() * 1e3
    );

    for d in &dirs {
        d.shutdown().await;
    }
    for e in endpoints {
        e.shutdown().await;
    }
    drop(views);
    Ok(())
}
