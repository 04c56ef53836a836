//! Measures today's presence directory (one chitchat key per online user per node, see
//! `Membership::set_user_online`) at a given number of online users: what it costs every node
//! and how fast a change spreads.
//!
//! `cargo run --release -p cluster --example presence_keys -- 100000 [changes] [limit secs]`
//!
//! Three members run in this process on loopback with the default gossip timing (the
//! cluster secret set, as every node runs). The N users are spread over the three (user `u`
//! on node `u % 3`, as a real cluster holds each user's devices on one node). It reports:
//!
//! - how long until every node sees all N users;
//! - resident memory per online user per node (the process's growth over three nodes);
//! - over a 10 s window after that, with nothing changing: gossip bytes sent per second per
//!   node and CPU per node (the process's utime + stime over three nodes);
//! - `changes` (default 200) users going offline on node 0, one every 20 ms: the time until
//!   nodes 1 and 2 see each one, p50 / p99 / max.

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

/// This process's CPU time (user + system), in clock ticks (1/100 s on Linux).
fn cpu_ticks() -> u64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) start after ')'.
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

/// Whether `m` sees every one of the `n` users on its node.
fn sees_all(m: &Membership, n: u64) -> bool {
    (1..=n).all(|u| m.user_nodes(u) == [(u % 3) as u16])
}

/// How many of the `n` users `m` sees on their node.
fn seen_count(m: &Membership, n: u64) -> u64 {
    (1..=n)
        .filter(|&u| m.user_nodes(u) == [(u % 3) as u16])
        .count() as u64
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
    let limit = Duration::from_secs(args.next().map(|a| a.parse()).transpose()?.unwrap_or(900));
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
    while members.iter().any(|m| m.watch_members().borrow().len() < 3) {
        if Instant::now() > deadline {
            return Err("members did not converge".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = rss_kib();
    let started = Instant::now();
    for user in 1..=n {
        members[(user % 3) as usize].set_user_online(user).await;
    }
    let published = started.elapsed();
    let mut seen: Vec<Option<Duration>> = vec![None; 3];
    while seen.iter().any(Option::is_none) {
        for (slot, m) in seen.iter_mut().zip(&members) {
            if slot.is_none() && sees_all(m, n) {
                *slot = Some(started.elapsed());
            }
        }
        if started.elapsed() > limit {
            println!("online users                      {n} (spread over 3 nodes)");
            println!("published                         {published:.2?}");
            for (i, m) in members.iter().enumerate() {
                println!(
                    "node {i} sees after {limit:?}         {} of {n} on their node",
                    seen_count(m, n)
                );
            }
            println!(
                "resident memory                   {before} KiB -> {} KiB (not converged)",
                rss_kib()
            );
            return Err(format!("the keys did not spread within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = rss_kib();

    // Steady state: nothing changes for 10 s.
    let window = Duration::from_secs(10);
    let health: Vec<_> = members.iter().filter_map(|m| m.gossip_health()).collect();
    let bytes_before: u64 = health.iter().map(|h| h.sent_bytes()).sum();
    let cpu_before = cpu_ticks();
    tokio::time::sleep(window).await;
    let cpu = cpu_ticks() - cpu_before;
    let bytes = health.iter().map(|h| h.sent_bytes()).sum::<u64>() - bytes_before;

    // Changes: users of node 0 go offline one every 20 ms; each is timed until nodes 1
    // and 2 see it.
    let mut pending: Vec<(u64, Instant, [bool; 2])> = Vec::new();
    let mut latencies = Vec::new();
    let mut next_user = 3;
    let mut issued = 0;
    let mut last_issue = Instant::now() - Duration::from_millis(20);
    while issued < changes || !pending.is_empty() {
        if issued < changes && last_issue.elapsed() >= Duration::from_millis(20) {
            if next_user > n {
                break;
            }
            members[0].set_user_offline(next_user).await;
            pending.push((next_user, Instant::now(), [false, false]));
            next_user += 3;
            issued += 1;
            last_issue = Instant::now();
        }
        for (user, at, done) in &mut pending {
            for (k, m) in members[1..].iter().enumerate() {
                if !done[k] && m.user_nodes(*user).is_empty() {
                    done[k] = true;
                    latencies.push(at.elapsed());
                }
            }
        }
        pending.retain(|(_, at, done)| {
            !(done[0] && done[1]) && at.elapsed() < Duration::from_secs(120)
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    latencies.sort();

    println!("online users                      {n} (spread over 3 nodes)");
    println!("published                         {published:.2?}");
    println!(
        "every node sees all of them       {:.2?}",
        seen.iter().flatten().max().copied().unwrap_or_default()
    );
    println!(
        "resident memory                   {before} KiB -> {after} KiB: {} bytes per online user per node",
        after.saturating_sub(before) * 1024 / (3 * n.max(1))
    );
    println!(
        "gossip sent, steady state         {:.0} bytes/s per node",
        bytes as f64 / window.as_secs_f64() / 3.0
    );
    println!(
        "CPU, steady state                 {:.1}% of a core per node",
        cpu as f64 / window.as_secs_f64() / 3.0
    );
    println!(
        "a change seen on another node     p50 {:.0?}, p99 {:.0?}, max {:.0?} ({} of {} seen)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        latencies.len(),
        issued * 2
    );
    for m in members {
        m.shutdown().await?;
    }
    Ok(())
}
