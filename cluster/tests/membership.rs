#![allow(clippy::unwrap_used)]
//! Gossip membership with real UDP on 127.0.0.1: discovery, failure detection, user keys,
//! duplicate node ids.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cluster::lifecycle::MembershipPort;
use cluster::membership::memory::MemoryGossip;
use cluster::membership::{Lifecycle, Member, Membership, MembershipConfig, NodeAddrs};
use cluster::NodeId;

/// A free UDP port on 127.0.0.1: bind port 0, read it back, release it.
fn free_udp_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

fn addrs(node: NodeId) -> NodeAddrs {
    let port = 10_000 + node;
    NodeAddrs {
        http: format!("127.0.0.1:{port}").parse().unwrap(),
        quic: format!("127.0.0.1:{}", port + 1000).parse().unwrap(),
        peer: format!("127.0.0.1:{}", port + 2000).parse().unwrap(),
    }
}

fn config(node: NodeId, gossip: SocketAddr, seeds: &[SocketAddr]) -> MembershipConfig {
    let mut config = MembershipConfig::new(node, "test-cluster".into(), gossip, addrs(node));
    config.seeds = seeds.iter().map(|s| s.to_string()).collect();
    config.gossip_interval = Duration::from_millis(100);
    config
}

async fn spawn(node: NodeId, seeds: &[SocketAddr]) -> (Membership, SocketAddr) {
    let gossip = free_udp_addr();
    let membership = Membership::spawn(config(node, gossip, seeds))
        .await
        .unwrap();
    (membership, gossip)
}

/// Waits until the live members satisfy `ready`, or fails after `within`.
async fn wait_members(
    m: &Membership,
    within: Duration,
    ready: impl Fn(&[Member]) -> bool,
) -> Vec<Member> {
    let mut rx = m.watch_members();
    let members = tokio::time::timeout(within, rx.wait_for(|members| ready(members)))
        .await
        .unwrap_or_else(|_| panic!("node {}: members never matched", m.node_id()))
        .unwrap()
        .clone();
    members
}

fn ids(members: &[Member]) -> Vec<NodeId> {
    let mut ids: Vec<NodeId> = members.iter().map(|m| m.node_id).collect();
    ids.sort_unstable();
    ids
}

#[tokio::test]
async fn three_members_see_each_other_and_a_stopped_one_dies() {
    let (a, a_gossip) = spawn(1, &[]).await;
    let (b, _) = spawn(2, &[a_gossip]).await;
    let (c, _) = spawn(3, &[a_gossip]).await;
    for m in [&a, &b, &c] {
        let members = wait_members(m, Duration::from_secs(5), |ms| ids(ms) == [1, 2, 3]).await;
        let three = members.iter().find(|m| m.node_id == 3).unwrap();
        assert_eq!(three.addrs, addrs(3));
        assert_eq!(three.state, Lifecycle::Joining);
        assert!(three.live);
    }

    c.set_state(Lifecycle::Active).await;
    c.set_load(17).await;
    let members = wait_members(&a, Duration::from_secs(5), |ms| {
        ms.iter()
            .any(|m| m.node_id == 3 && m.state == Lifecycle::Active && m.load == 17)
    })
    .await;
    assert_eq!(ids(&members), [1, 2, 3]);

    let stopped = Instant::now();
    c.shutdown().await.unwrap();
    for m in [&a, &b] {
        wait_members(m, Duration::from_secs(6), |ms| ids(ms) == [1, 2]).await;
    }
    let took = stopped.elapsed();
    eprintln!("node 3 seen dead after {took:?}");
    assert!(took < Duration::from_secs(5), "death took {took:?}");
    let all = a.members().await;
    let dead = all.iter().find(|m| m.node_id == 3).unwrap();
    assert!(!dead.live);
    assert!(all.iter().filter(|m| m.node_id != 3).all(|m| m.live));

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn duplicate_node_id_is_detected() {
    let (a, a_gossip) = spawn(1, &[]).await;
    let (b, b_gossip) = spawn(2, &[a_gossip]).await;
    let dup_gossip = free_udp_addr();
    let mut dup_config = config(1, dup_gossip, &[a_gossip]);
    dup_config.generation = Some(a.generation() + 1);
    let dup = Membership::spawn(dup_config).await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen_by_a = a.duplicate().await;
        let seen_by_dup = dup.duplicate().await;
        if let (Some(x), Some(y)) = (&seen_by_a, &seen_by_dup) {
            assert_eq!(x.gossip_addr, dup_gossip);
            assert_eq!(y.gossip_addr, a_gossip);
            break;
        }
        assert!(Instant::now() < deadline, "duplicate never detected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(b.duplicate().await, None);
    dup.shutdown().await.unwrap();

    // A restart on the same address with a newer generation is not a duplicate of its
    // previous run, even while others may still see that run alive.
    let old_generation = b.generation();
    b.shutdown().await.unwrap();
    let mut again = config(2, b_gossip, &[a_gossip]);
    again.generation = Some(old_generation + 1);
    let b2 = Membership::spawn(again).await.unwrap();
    wait_members(&b2, Duration::from_secs(5), |ms| ids(ms).contains(&1)).await;
    for _ in 0..10 {
        assert_eq!(b2.duplicate().await, None);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b2.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

async fn spawn_sealed(
    node: NodeId,
    secret: Option<[u8; 32]>,
    seeds: &[SocketAddr],
) -> (Membership, SocketAddr) {
    let gossip = free_udp_addr();
    let mut config = config(node, gossip, seeds);
    config.secret = secret.map(cluster::ClusterSecret::from_bytes);
    (Membership::spawn(config).await.unwrap(), gossip)
}

#[tokio::test]
async fn sealed_gossip_admits_only_holders_of_the_secret() {
    // Same cluster id everywhere: only the seal tells them apart.
    let (a, a_gossip) = spawn_sealed(1, Some([7; 32]), &[]).await;
    let (b, _) = spawn_sealed(2, Some([7; 32]), &[a_gossip]).await;
    let (wrong, _) = spawn_sealed(3, Some([8; 32]), &[a_gossip]).await;
    let (plain, _) = spawn_sealed(4, None, &[a_gossip]).await;
    wait_members(&a, Duration::from_secs(5), |ms| ids(ms) == [1, 2]).await;
    b.set_load(42).await;
    wait_members(&a, Duration::from_secs(5), |ms| {
        ms.iter().any(|m| m.node_id == 2 && m.load == 42)
    })
    .await;
    // Give the intruders many gossip rounds: they never get in, and change nothing.
    wrong.set_load(666).await;
    plain.set_load(667).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for m in [&a, &b] {
        let all: Vec<Member> = m.members().await;
        assert_eq!(ids(&all), [1, 2]);
        assert!(all.iter().all(|m| m.load != 666 && m.load != 667));
    }
    for intruder in [&wrong, &plain] {
        let seen: Vec<NodeId> = intruder.members().await.iter().map(|m| m.node_id).collect();
        assert_eq!(seen, [intruder.node_id()]);
    }
    for m in [a, b, wrong, plain] {
        m.shutdown().await.unwrap();
    }
}

/// What the lifecycle relies on from any [`MembershipPort`], checked against real gossip and
/// against the in-memory twin (so the twin stays honest): `b` hears of `a` (which sees
/// itself live) through its watch, sees `a`'s state and pending list, and `a`'s pending
/// version changes exactly when its list does.
async fn port_contract<M: MembershipPort>(a: &M, b: &M, within: Duration) {
    let (a_id, b_id) = (a.node_id(), b.node_id());
    let me = |members: &[Member]| members.iter().find(|m| m.node_id == a_id).cloned();
    let own = me(&a.members().await).expect("a node sees itself");
    assert!(own.live);
    assert_eq!(own.state, Lifecycle::Joining);
    // Its own watch shows it too (real gossip: after its first round).
    let in_own_watch = seen_by(&a.watch_members(), a_id, a_id, within, |m, _| m.live).await;
    assert_eq!(in_own_watch, own);

    let mut watch = b.watch_members();
    let seen = |want: fn(&Member, NodeId) -> bool| seen_by(&watch, a_id, b_id, within, want);
    seen(|m, _| m.live).await;
    assert!(b.members().await.iter().any(|m| m.node_id == a_id));

    a.set_state(Lifecycle::Active).await;
    a.set_pending(&[b_id, 9]).await;
    let published = seen(|m, b_id| m.state == Lifecycle::Active && m.pending == [b_id, 9]).await;
    assert!(published.pending_version > 0);
    assert_eq!(
        published.pending_version,
        me(&a.members().await).unwrap().pending_version
    );

    // The same list again: no new version. Another list: a newer one.
    a.set_pending(&[b_id, 9]).await;
    let same = me(&a.members().await).unwrap();
    assert_eq!(same.pending_version, published.pending_version);
    a.set_pending(&[b_id]).await;
    let newer = seen(|m, b_id| m.pending == [b_id]).await;
    assert!(newer.pending_version > published.pending_version);
    // The watch had fired for it.
    assert!(watch.has_changed().unwrap());
    watch.borrow_and_update();
}

#[tokio::test]
async fn gossip_membership_keeps_the_lifecycle_port_contract() {
    let (a, a_gossip) = spawn(1, &[]).await;
    let (b, _) = spawn(2, &[a_gossip]).await;
    port_contract(&a, &b, Duration::from_secs(5)).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_memory_twin_keeps_the_lifecycle_port_contract() {
    let gossip = MemoryGossip::new();
    let (a, b) = (gossip.join(1), gossip.join(2));
    port_contract(&a, &b, Duration::from_secs(5)).await;
}

/// Waits until `watch` shows node `node` satisfying `want(member, other)`; returns it.
async fn seen_by(
    watch: &tokio::sync::watch::Receiver<Vec<Member>>,
    node: NodeId,
    other: NodeId,
    within: Duration,
    want: fn(&Member, NodeId) -> bool,
) -> Member {
    let mut watch = watch.clone();
    let members = tokio::time::timeout(
        within,
        watch.wait_for(|ms| ms.iter().any(|m| m.node_id == node && want(m, other))),
    )
    .await
    .expect("the change was never seen")
    .unwrap()
    .clone();
    members.into_iter().find(|m| m.node_id == node).unwrap()
}
