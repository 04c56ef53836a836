#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use super::join::{join_barrier, Barrier};
use super::*;
use crate::membership::NodeAddrs;

fn member(node: NodeId, generation: u64, state: Lifecycle, live: bool) -> Member {
    let addr = SocketAddr::from(([127, 0, 0, 1], 7000 + node));
    let addrs = NodeAddrs {
        http: addr,
        quic: addr,
        peer: addr,
    };
    Member::new(node, generation, addr, addrs, state, live)
}

#[test]
fn a_node_enters_as_first_returning_or_joining() {
    use Lifecycle::*;
    let me = member(1, 1, Joining, true);
    assert_eq!(
        decide(1, false, std::slice::from_ref(&me)),
        StartedAs::First
    );
    assert_eq!(
        decide(1, true, std::slice::from_ref(&me)),
        StartedAs::Returning
    );
    // Other new nodes hold no data: still the first.
    let other_new = member(2, 1, Joining, true);
    assert_eq!(decide(1, false, &[me.clone(), other_new]), StartedAs::First);
    // A member, live or not, active or leaving, means the cluster has data.
    for state in [Active, Leaving] {
        for live in [true, false] {
            let members = [me.clone(), member(2, 1, state, live)];
            assert_eq!(decide(1, false, &members), StartedAs::Joining);
            assert_eq!(decide(1, true, &members), StartedAs::Returning);
        }
    }
    // This node's own earlier generation does not count (it lost its data dir).
    let old_me = member(1, 0, Active, false);
    assert_eq!(decide(1, false, &[me, old_me]), StartedAs::First);
}

#[test]
fn seeds_elsewhere_ignores_only_this_node_own_addresses() {
    let listen: SocketAddr = "0.0.0.0:7946".parse().unwrap();
    let advertise: SocketAddr = "10.0.0.1:7946".parse().unwrap();
    let seeds = |s: &[&str]| s.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert!(!seeds_elsewhere(&[], listen, advertise));
    assert!(!seeds_elsewhere(
        &seeds(&["0.0.0.0:7946", "10.0.0.1:7946"]),
        listen,
        advertise
    ));
    assert!(seeds_elsewhere(
        &seeds(&["10.0.0.2:7946"]),
        listen,
        advertise
    ));
    assert!(seeds_elsewhere(
        &seeds(&["10.0.0.1:7946", "node-2:7946"]),
        listen,
        advertise
    ));
}

#[test]
fn the_barrier_needs_every_other_live_node_to_list_this_one() {
    use Lifecycle::*;
    let with_pending = |mut m: Member, pending: &[NodeId], version: u64| {
        m.pending = pending.to_vec();
        m.pending_version = version;
        m
    };
    let me = member(3, 1, Joining, true);
    let one = with_pending(member(1, 1, Active, true), &[3], 4);
    let two = with_pending(member(2, 1, Active, true), &[], 2);
    assert_eq!(
        join_barrier(3, &[me.clone(), one.clone(), two.clone()]),
        None
    );
    // A dead node, and an older generation, do not hold it up.
    let two_dead = Member {
        live: false,
        ..two.clone()
    };
    let snapshot = join_barrier(3, &[me.clone(), one.clone(), two_dead]).unwrap();
    assert_eq!(snapshot, Barrier([(1, (1, 4))].into()));
    // Once both list it, the snapshot holds each generation and pending version.
    let two = with_pending(two, &[3, 4], 5);
    let both = join_barrier(3, &[me.clone(), one.clone(), two.clone()]).unwrap();
    assert_eq!(both, Barrier([(1, (1, 4)), (2, (1, 5))].into()));
    // Republished (same list, new version) or restarted: another snapshot.
    let republished = with_pending(one.clone(), &[3], 6);
    assert_ne!(
        join_barrier(3, &[me.clone(), republished, two.clone()]),
        Some(both.clone())
    );
    let restarted = Member {
        generation: 2,
        ..one
    };
    assert_ne!(join_barrier(3, &[me.clone(), restarted, two]), Some(both));
    // Alone, the barrier holds trivially (and the pull then finds no source).
    assert_eq!(join_barrier(3, &[me]), Some(Barrier(Default::default())));
}

#[test]
fn own_partitions_are_the_sets_holding_this_node_now_or_later() {
    use crate::replication::ReplicaNode;
    let node = |id: NodeId| ReplicaNode {
        id,
        addr: SocketAddr::from(([127, 0, 0, 1], 7000 + id)),
        server_name: node_cert_name(id),
        live: true,
    };
    let view = Topology::with_pending(3, 2, [node(1), node(2)], [node(3)]);
    assert!(own_partitions(&view, 64, false).is_empty());
    let later = own_partitions(&view, 64, true);
    let after = Topology::new(3, 2, [node(1), node(2), node(3)]);
    assert_eq!(later, own_partitions(&after, 64, false));
    // Node 3 takes about 2/3 of the partitions.
    assert!(later.len() > 25 && later.len() < 60, "{}", later.len());
}
