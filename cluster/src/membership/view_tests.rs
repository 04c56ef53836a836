//! The presence index without sockets: node states are built with chitchat's sans-IO
//! `Chitchat` and fed to `View::apply` directly.

use std::collections::HashSet;
use std::time::Duration;

use chitchat::{Chitchat, ChitchatConfig, FailureDetectorConfig, ProtocolVersion};

use super::*;

/// A node's gossip state as `node` (generation `gen`, gossip port `port`) with `users`.
fn node(node: NodeId, gen: u64, port: u16, users: &[u64]) -> (ChitchatId, NodeState) {
    let id = ChitchatId::new(node.to_string(), gen, ([127, 0, 0, 1], port).into());
    let (_seeds_tx, seeds) = watch::channel(HashSet::new());
    let config = ChitchatConfig {
        chitchat_id: id.clone(),
        cluster_id: "t".into(),
        gossip_interval: Duration::from_millis(100),
        listen_addr: id.gossip_advertise_addr,
        seed_nodes: Vec::new(),
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(60),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V0,
    };
    let addr = "127.0.0.1:1".to_string();
    let initial = vec![
        (keys::NODE_ID.to_string(), node.to_string()),
        (keys::HTTP_ADDR.to_string(), addr.clone()),
        (keys::QUIC_ADDR.to_string(), addr.clone()),
        (keys::PEER_ADDR.to_string(), addr),
        (keys::STATE.to_string(), "active".to_string()),
        (keys::LOAD.to_string(), users.len().to_string()),
    ];
    let mut chitchat = Chitchat::with_chitchat_id_and_seeds(config, seeds, initial);
    for &user in users {
        chitchat.self_node_state().set(keys::user(user), "1");
    }
    let state = chitchat.node_state(&id).unwrap().clone();
    (id, state)
}

fn view() -> (
    View,
    watch::Receiver<Vec<Member>>,
    broadcast::Receiver<PresenceEvent>,
) {
    let (members_tx, members) = watch::channel(Vec::new());
    let (events_tx, events) = broadcast::channel(64);
    (View::new(members_tx, events_tx), members, events)
}

fn drain(events: &mut broadcast::Receiver<PresenceEvent>) -> Vec<PresenceEvent> {
    let mut out = Vec::new();
    while let Ok(event) = events.try_recv() {
        out.push(event);
    }
    out.sort_by_key(|e| match *e {
        PresenceEvent::Online { user, node } => (user, node, 1),
        PresenceEvent::Offline { user, node } => (user, node, 0),
    });
    out
}

use PresenceEvent::{Offline, Online};

#[test]
fn joins_changes_and_deaths_produce_exact_events() {
    let (mut view, members, mut events) = view();
    let one = node(1, 1, 7001, &[10, 11]);
    let two = node(2, 1, 7002, &[11]);
    view.apply(&[one.clone(), two.clone()].into_iter().collect());
    assert_eq!(members.borrow().len(), 2);
    assert_eq!(view.user_nodes(11), [1, 2]);
    assert_eq!(
        drain(&mut events),
        [
            Online { user: 10, node: 1 },
            Online { user: 11, node: 1 },
            Online { user: 11, node: 2 },
        ]
    );

    // Same snapshot again: nothing.
    view.apply(&[one.clone(), two.clone()].into_iter().collect());
    assert!(drain(&mut events).is_empty());

    // Node 1 drops user 10 and gains 12.
    let one_b = node(1, 1, 7001, &[11, 12, 13]);
    view.apply(&[one_b.clone(), two.clone()].into_iter().collect());
    assert_eq!(
        drain(&mut events),
        [
            Offline { user: 10, node: 1 },
            Online { user: 12, node: 1 },
            Online { user: 13, node: 1 },
        ]
    );

    // Node 2 dies.
    view.apply(&[one_b].into_iter().collect());
    assert_eq!(drain(&mut events), [Offline { user: 11, node: 2 }]);
    assert_eq!(view.user_nodes(11), [1]);
    assert!(view.user_nodes(10).is_empty());
    assert_eq!(members.borrow().len(), 1);
}

#[test]
fn two_incarnations_of_a_node_count_once() {
    let (mut view, _members, mut events) = view();
    let old = node(1, 1, 7001, &[5]);
    let new = node(1, 2, 7001, &[5]);
    view.apply(&[old.clone(), new.clone()].into_iter().collect());
    assert_eq!(drain(&mut events), [Online { user: 5, node: 1 }]);
    // The old run dies: the user is still on node 1 through the new one.
    view.apply(&[new].into_iter().collect());
    assert!(drain(&mut events).is_empty());
    assert_eq!(view.user_nodes(5), [1]);
}

#[test]
fn members_with_bad_keys_are_left_out() {
    let (id, mut state) = node(4, 1, 7004, &[]);
    assert!(Member::parse(&id, &state, true).is_some());
    state.set(keys::STATE, "exploding");
    assert!(Member::parse(&id, &state, true).is_none());
    state.set(keys::STATE, "leaving");
    state.set(keys::PEER_ADDR, "not an address");
    assert!(Member::parse(&id, &state, true).is_none());
}
