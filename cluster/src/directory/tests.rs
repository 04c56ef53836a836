//! The directory over an in-memory network: registrations, subscriptions, pushes, and what
//! deaths, restarts and returns do to them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::wire::MAX_USERS_PER_REQUEST;
use super::*;
use crate::membership::{Lifecycle, Member, NodeAddrs};
use crate::replication::{ReplicaNode, Topology};

/// The nodes' directories, and which nodes cannot be reached.
#[derive(Default)]
struct Net {
    dirs: Mutex<HashMap<NodeId, Directory>>,
    down: Mutex<HashSet<NodeId>>,
}

struct Peers {
    net: Arc<Net>,
    from: NodeId,
}

impl DirPeers for Peers {
    fn call(&self, node: NodeId, body: Vec<u8>) -> BoxFuture<'_, Result<Vec<u8>, String>> {
        Box::pin(async move {
            let down = self.net.down.lock().clone();
            if down.contains(&node) || down.contains(&self.from) {
                return Err(format!("node {node} unreachable"));
            }
            let dir = self.net.dirs.lock().get(&node).cloned();
            let dir = dir.ok_or_else(|| format!("no node {node}"))?;
            let request = Request {
                kind: KIND_DIRECTORY,
                body,
            };
            dir.handle(request)
                .await
                .map(|r| r.body)
                .map_err(|e| e.to_string())
        })
    }
}

#[derive(Default)]
struct Hooks {
    changed: Mutex<Vec<u64>>,
    gained: Mutex<Vec<(u64, NodeId)>>,
}

impl DirectoryHooks for Hooks {
    fn changed(&self, users: &[u64]) {
        self.changed.lock().extend_from_slice(users);
    }
    fn gained(&self, gained: &[(u64, NodeId)]) {
        self.gained.lock().extend_from_slice(gained);
    }
}

fn addr(n: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 10_000 + n))
}

/// `self_id`'s view: `live` nodes (with their generations) and dead `dead` ones.
fn view(self_id: NodeId, live: &[(NodeId, u64)], dead: &[(NodeId, u64)]) -> ClusterView {
    let member = |&(n, generation): &(NodeId, u64), is_live: bool| {
        let addrs = NodeAddrs {
            http: addr(n),
            quic: addr(n),
            peer: addr(n),
        };
        Member::new(n, generation, addr(n), addrs, Lifecycle::Active, is_live)
    };
    let members: Vec<Member> = live
        .iter()
        .map(|m| member(m, true))
        .chain(dead.iter().map(|m| member(m, false)))
        .collect();
    let nodes: Vec<ReplicaNode> = members
        .iter()
        .map(|m| ReplicaNode {
            id: m.node_id,
            addr: addr(m.node_id),
            server_name: format!("node-{}", m.node_id),
            live: m.live,
        })
        .collect();
    ClusterView {
        members: members.into(),
        topology: Arc::new(Topology::new(self_id, 3, nodes)),
    }
}

struct Cluster {
    net: Arc<Net>,
    views: HashMap<NodeId, watch::Sender<ClusterView>>,
    hooks: HashMap<NodeId, Arc<Hooks>>,
}

const PARTITIONS: u32 = 64;

impl Cluster {
    fn start(n: u16) -> Cluster {
        let net = Arc::new(Net::default());
        let all: Vec<(NodeId, u64)> = (0..n).map(|i| (i, 1)).collect();
        let mut views = HashMap::new();
        let mut hooks = HashMap::new();
        for id in 0..n {
            let (tx, rx) = watch::channel(view(id, &all, &[]));
            let h = Arc::new(Hooks::default());
            let cfg = DirectoryConfig {
                resolve_timeout: Duration::from_secs(1),
                push_wait: Duration::from_millis(500),
                generation: 1,
                ..DirectoryConfig::new(id, PARTITIONS)
            };
            let peers = Arc::new(Peers {
                net: net.clone(),
                from: id,
            });
            let dir = Directory::start(cfg, peers, h.clone(), rx);
            net.dirs.lock().insert(id, dir);
            views.insert(id, tx);
            hooks.insert(id, h);
        }
        Cluster { net, views, hooks }
    }

    fn dir(&self, id: NodeId) -> Directory {
        self.net.dirs.lock()[&id].clone()
    }

    /// Sets `id`'s view of the others.
    fn set_view(&self, id: NodeId, live: &[(NodeId, u64)], dead: &[(NodeId, u64)]) {
        self.views[&id].send_replace(view(id, live, dead));
    }

    /// A user whose home replicas (two of three) are `homes`.
    fn user_homed_at(&self, homes: &[NodeId]) -> u64 {
        let all = [0u16, 1, 2];
        (1u64..)
            .find(|u| {
                let p = partition_of(&u.to_be_bytes(), PARTITIONS);
                let mut h = replicas(p, &all, 2);
                h.sort_unstable();
                h == homes
            })
            .expect("some user is homed there")
    }

    async fn shutdown(self) {
        let dirs: Vec<Directory> = self.net.dirs.lock().values().cloned().collect();
        for d in dirs {
            d.shutdown().await;
        }
    }
}

/// Waits until `f` holds (the directory works in the background).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test]
async fn a_watcher_on_another_node_sees_a_user_come_and_go() {
    let c = Cluster::start(3);
    let user = c.user_homed_at(&[0, 1]);
    let (d0, d2) = (c.dir(0), c.dir(2));
    d2.watch(&[user]);
    until("node 2 knows the user is offline", || {
        d2.known(user) == Some(vec![])
    })
    .await;
    d0.publish(user, true);
    until("node 2 sees the user on node 0", || {
        d2.known(user) == Some(vec![0])
    })
    .await;
    assert!(c.hooks[&2].changed.lock().contains(&user));
    d0.publish(user, false);
    until("node 2 sees the user offline", || {
        d2.known(user) == Some(vec![])
    })
    .await;
    assert_eq!(d2.stats().wanted, 1);
    c.shutdown().await;
}

#[tokio::test]
async fn a_route_is_resolved_once_and_then_kept_current_by_pushes() {
    let c = Cluster::start(3);
    let user = c.user_homed_at(&[1, 2]);
    let (d0, d1) = (c.dir(0), c.dir(1));
    d1.publish(user, true);
    until("both home replicas hold the user", || {
        c.dir(1).stats().entries + c.dir(2).stats().entries == 2
    })
    .await;
    assert_eq!(d0.known(user), None, "not wanted yet");
    assert_eq!(d0.resolve(&[user]).await, 0);
    assert_eq!(d0.known(user), Some(vec![1]));
    let sent = d0.stats().requests_sent;
    for _ in 0..100 {
        assert_eq!(d0.resolve(&[user]).await, 0);
        assert_eq!(d0.known(user), Some(vec![1]));
    }
    assert_eq!(
        d0.stats().requests_sent,
        sent,
        "a known route costs no request"
    );
    // The user's second device connects on node 0 itself: the route follows by push.
    d0.publish(user, true);
    until("node 0 sees both nodes", || {
        d0.known(user) == Some(vec![0, 1])
    })
    .await;
    c.shutdown().await;
}

#[tokio::test]
async fn the_users_of_a_dead_node_go_offline_everywhere_at_once() {
    let c = Cluster::start(3);
    let user = c.user_homed_at(&[0, 2]);
    let (d1, d2) = (c.dir(1), c.dir(2));
    d1.publish(user, true);
    d2.watch(&[user]);
    until("node 2 sees the user on node 1", || {
        d2.known(user) == Some(vec![1])
    })
    .await;
    c.hooks[&2].changed.lock().clear();
    // Node 1 dies in node 2's view: its devices stop counting there at once.
    c.net.down.lock().insert(1);
    c.set_view(2, &[(0, 1), (2, 1)], &[(1, 1)]);
    until("node 2 sees the user offline", || {
        d2.known(user) == Some(vec![])
    })
    .await;
    assert!(c.hooks[&2].changed.lock().contains(&user));
    // The home replicas forget node 1 when they see it dead.
    c.set_view(0, &[(0, 1), (2, 1)], &[(1, 1)]);
    until("node 0's entry forgets node 1", || {
        c.dir(0).stats().entries == 1 // node 2's subscription stays
    })
    .await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_dead_home_replica_loses_nothing() {
    let c = Cluster::start(3);
    // Homed at 0 and 1; the device is on node 2; node 1 watches.
    let user = c.user_homed_at(&[0, 1]);
    let (d1, d2) = (c.dir(1), c.dir(2));
    d2.publish(user, true);
    d1.watch(&[user]);
    until("node 1 sees the user on node 2", || {
        d1.known(user) == Some(vec![2])
    })
    .await;
    // Home replica 0 dies: the user is now homed at 1 and 2, which learn it from statements.
    c.net.down.lock().insert(0);
    for id in [1, 2] {
        c.set_view(id, &[(1, 1), (2, 1)], &[(0, 1)]);
    }
    until("node 1 applied its view", || d1.live_nodes() == [1, 2]).await;
    assert_eq!(
        d1.known(user),
        Some(vec![2]),
        "no flap: replica 1 still answers"
    );
    until("node 1's own table holds the user", || {
        d1.stats().entries >= 1
    })
    .await;
    // The user goes offline on node 2: node 1 sees it through the remaining replicas.
    d2.publish(user, false);
    until("node 1 sees the user offline", || {
        d1.known(user) == Some(vec![])
    })
    .await;
    d2.publish(user, true);
    until("node 1 sees the user online again", || {
        d1.known(user) == Some(vec![2])
    })
    .await;
    c.shutdown().await;
}

#[tokio::test]
async fn a_node_that_was_forgotten_is_asked_for_its_statement_when_back() {
    let c = Cluster::start(3);
    let user = c.user_homed_at(&[0, 1]);
    let (d0, d1, d2) = (c.dir(0), c.dir(1), c.dir(2));
    d2.publish(user, true);
    d1.watch(&[user]);
    until("node 1 sees the user on node 2", || {
        d1.known(user) == Some(vec![2])
    })
    .await;
    // Nodes 0 and 1 think node 2 died (it did not: it was cut off) and forget it.
    for id in [0, 1] {
        c.set_view(id, &[(0, 1), (1, 1)], &[(2, 1)]);
    }
    until("node 1 sees the user offline", || {
        d1.known(user) == Some(vec![])
    })
    .await;
    // Node 2 never noticed anything. It is back: the others ask for its statement.
    for id in [0, 1] {
        c.set_view(id, &[(0, 1), (1, 1), (2, 1)], &[]);
    }
    until("node 1 sees the user on node 2 again", || {
        d1.known(user) == Some(vec![2])
    })
    .await;
    let _ = d0;
    c.shutdown().await;
}

#[tokio::test]
async fn a_restarted_node_s_old_devices_are_forgotten() {
    let c = Cluster::start(3);
    let user = c.user_homed_at(&[0, 1]);
    let d1 = c.dir(1);
    c.dir(2).publish(user, true);
    d1.watch(&[user]);
    until("node 1 sees the user on node 2", || {
        d1.known(user) == Some(vec![2])
    })
    .await;
    // Node 2 restarts (generation 2) with a fresh directory and no devices.
    let old = c.dir(2);
    old.shutdown().await;
    let (tx, rx) = watch::channel(view(2, &[(0, 1), (1, 1), (2, 2)], &[]));
    let fresh = Directory::start(
        DirectoryConfig {
            generation: 2,
            ..DirectoryConfig::new(2, PARTITIONS)
        },
        Arc::new(Peers {
            net: c.net.clone(),
            from: 2,
        }),
        Arc::new(Hooks::default()),
        rx,
    );
    c.net.dirs.lock().insert(2, fresh);
    for id in [0, 1] {
        c.set_view(id, &[(0, 1), (1, 1), (2, 2)], &[]);
    }
    until("node 1 sees the user offline", || {
        d1.known(user) == Some(vec![])
    })
    .await;
    drop(tx);
    c.shutdown().await;
}

#[tokio::test]
async fn a_node_routing_to_a_user_is_told_when_the_route_gains_a_node() {
    let c = Cluster::start(3);
    let user = c.user_homed_at(&[0, 1]);
    let (d0, d1, d2) = (c.dir(0), c.dir(1), c.dir(2));
    d1.publish(user, true);
    until("both home replicas hold the user", || {
        d0.stats().entries + d1.stats().entries == 2
    })
    .await;
    assert_eq!(d0.resolve(&[user]).await, 0);
    assert_eq!(d0.known(user), Some(vec![1]));
    assert!(
        c.hooks[&0].gained.lock().is_empty(),
        "a first answer is no gain"
    );
    // A second device on node 2: node 0 routed by {1} until now, so node 2 must catch
    // the user up.
    d2.publish(user, true);
    until("node 0 is told the route gained node 2", || {
        c.hooks[&0].gained.lock().contains(&(user, 2))
    })
    .await;
    assert_eq!(d0.known(user), Some(vec![1, 2]));
    // Its own devices are no gain to tell anyone about.
    d0.publish(user, true);
    until("node 0 sees itself", || {
        d0.known(user) == Some(vec![0, 1, 2])
    })
    .await;
    assert!(!c.hooks[&0].gained.lock().contains(&(user, 0)));
    c.shutdown().await;
}

#[tokio::test]
async fn a_restarted_node_that_registered_first_keeps_its_registration() {
    let c = Cluster::start(3);
    let user = c.user_homed_at(&[0, 1]);
    let d1 = c.dir(1);
    d1.watch(&[user]);
    until("node 1 knows the user", || d1.known(user) == Some(vec![])).await;
    // Node 2 restarts (generation 2), and a device reconnects there before gossip has told
    // the home replicas of the new generation.
    c.dir(2).shutdown().await;
    let (_tx, rx) = watch::channel(view(2, &[(0, 1), (1, 1), (2, 2)], &[]));
    let fresh = Directory::start(
        DirectoryConfig {
            generation: 2,
            ..DirectoryConfig::new(2, PARTITIONS)
        },
        Arc::new(Peers {
            net: c.net.clone(),
            from: 2,
        }),
        Arc::new(Hooks::default()),
        rx,
    );
    c.net.dirs.lock().insert(2, fresh.clone());
    fresh.publish(user, true);
    until("node 1 sees the user on node 2", || {
        d1.known(user) == Some(vec![2])
    })
    .await;
    // Now the home replicas see the new generation. Node 2 cannot be reached, so nothing it
    // could restate helps: the registration its new generation made must stay.
    c.net.down.lock().insert(2);
    for id in [0, 1] {
        c.set_view(id, &[(0, 1), (1, 1), (2, 2)], &[]);
    }
    until("node 1 applied its view", || {
        c.dir(0).live_nodes() == [0, 1, 2]
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(d1.known(user), Some(vec![2]));
    c.shutdown().await;
}

#[tokio::test]
async fn pushes_queued_out_of_order_keep_the_newest() {
    let mut out = super::pipeline::Outbox::default();
    out.add_push(7, vec![2], 11);
    out.add_push(7, vec![], 10);
    assert_eq!(out.pushes[&7], (vec![2], 11));
    let mut newer = super::pipeline::Outbox::default();
    newer.add_push(7, vec![3], 9);
    newer.merge_older(out);
    assert_eq!(
        newer.pushes[&7],
        (vec![2], 11),
        "merged back, the newer counter wins"
    );
}

#[tokio::test]
async fn an_oversized_request_is_refused_before_any_work() {
    let c = Cluster::start(1);
    let d0 = c.dir(0);
    let request = DirRequest::Update {
        from: 9,
        gen: 1,
        regs: (0..=MAX_USERS_PER_REQUEST as u64)
            .map(|u| (u, true))
            .collect(),
        subs: Vec::new(),
    };
    let body = wire::encode(&request).expect("encode");
    let refused = d0
        .handle(Request {
            kind: KIND_DIRECTORY,
            body,
        })
        .await;
    assert!(refused.is_err());
    assert_eq!(d0.stats().entries, 0);
    let garbage = d0
        .handle(Request {
            kind: KIND_DIRECTORY,
            body: vec![0xFF; 16],
        })
        .await;
    assert!(garbage.is_err());
    c.shutdown().await;
}

#[test]
fn an_older_answer_does_not_undo_a_newer_push() {
    // A push (counter 10) overtook the answer to the subscription (counter 9).
    let mut w = Want::default();
    assert!(set_answer(&mut w, 1, NodeSet::from_ids(&[2]), 10));
    assert!(!set_answer(&mut w, 1, NodeSet::default(), 9));
    assert_eq!(w.answers[0].1.to_vec(), vec![2]);
    assert!(
        set_answer(&mut w, 1, NodeSet::default(), 10),
        "the same counter: same state"
    );
    assert!(
        set_answer(&mut w, 2, NodeSet::from_ids(&[3]), 1),
        "each replica's counter is its own"
    );
    assert_eq!(w.answers.len(), 2);
}

#[tokio::test]
async fn a_user_whose_home_replicas_cannot_answer_is_not_waited_for_again_at_once() {
    let c = Cluster::start(3);
    let user = c.user_homed_at(&[1, 2]);
    c.net.down.lock().extend([1, 2]);
    let d0 = c.dir(0);
    let first = std::time::Instant::now();
    assert_eq!(d0.resolve(&[user]).await, 1);
    assert!(
        first.elapsed() >= Duration::from_millis(900),
        "it waited the timeout"
    );
    // Every send to the user would wait again: within the backoff, it does not.
    let second = std::time::Instant::now();
    assert_eq!(d0.resolve(&[user]).await, 1);
    assert!(second.elapsed() < Duration::from_millis(500));
    // Once a home replica answers, the user is known.
    c.net.down.lock().clear();
    until("the subscription went through", || d0.known(user).is_some()).await;
    c.shutdown().await;
}
