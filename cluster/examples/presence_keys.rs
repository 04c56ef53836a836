//! Measures what DESIGN.md asks of per-user presence keys in gossip: how long N online users
//! published on one node take to show on the others, and the memory it costs.
//!
//! `cargo run --release -p cluster --example presence_keys -- 10000`
//!
//! Three members run in this process on loopback with the default gossip timing; node 0
//! publishes N user keys at once; the run reports when nodes 1 and 2 see all of them, and the
//! process's resident memory before and after (three copies of the state live here).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster::{Membership, MembershipConfig, NodeAddrs};

fn free_udp_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP port");
    socket.local_addr().expect("read the port")
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

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u64 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let gossip: Vec<SocketAddr> = (0..3).map(|_| free_udp_addr()).collect();
    let mut members = Vec::new();
    for (i, g) in gossip.iter().enumerate() {
        let local = SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16));
        let addrs = NodeAddrs {
            http: local,
            quic: local,
            peer: local,
        };
        let mut config = MembershipConfig::new(i as u16, "bench".into(), *g, addrs);
        config.seeds = vec![gossip[0].to_string()];
        config.secret = Some(cluster::ClusterSecret::from_bytes([42; 32]));
        members.push(Membership::spawn(config).await?);
    }
    for m in &members {
        m.set_state(cluster::Lifecycle::Active).await;
    }
    // Wait for the three to see each other.
    let deadline = Instant::now() + Duration::from_secs(30);
    while members[2].watch_members().borrow().len() < 3
        || members[1].watch_members().borrow().len() < 3
    {
        if Instant::now() > deadline {
            return Err("members did not converge".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = rss_kib();
    let started = Instant::now();
    for user in 1..=n {
        members[0].set_user_online(user).await;
    }
    let published = started.elapsed();
    let mut seen = [None, None];
    while seen.iter().any(Option::is_none) {
        for (slot, m) in seen.iter_mut().zip(&members[1..]) {
            if slot.is_none() && m.user_nodes(n) == vec![0] && m.user_nodes(1) == vec![0] {
                *slot = Some(started.elapsed());
            }
        }
        if started.elapsed() > Duration::from_secs(300) {
            return Err("keys did not spread within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let after = rss_kib();
    println!("users                 {n}");
    println!("published on node 0   {published:?}");
    println!("visible on node 1     {:?}", seen[0].unwrap_or_default());
    println!("visible on node 2     {:?}", seen[1].unwrap_or_default());
    println!(
        "resident memory       {before} KiB -> {after} KiB (+{} KiB for 3 copies, ~{} bytes per user per node)",
        after.saturating_sub(before),
        after.saturating_sub(before) * 1024 / (3 * n.max(1))
    );
    for m in members {
        m.shutdown().await?;
    }
    Ok(())
}
