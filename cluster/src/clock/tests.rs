use std::time::{Duration, Instant};

use client_proto::ids::{MessageId, ID_EPOCH_MS};

use super::*;

const T0: u64 = ID_EPOCH_MS + 1_000_000_000;

fn ms(reading: u64) -> u64 {
    MessageId(reading).ms_since_epoch()
}

#[test]
fn readings_never_go_back_when_the_wall_clock_does() {
    let c = Hlc::unleased(5);
    let a = c.tick_at(T0);
    let b = c.tick_at(T0 - 60_000);
    let p = c.peek_at(T0 - 60_000);
    let d = c.tick_at(T0 - 59_000);
    let e = c.tick_at(T0 + 1);
    assert!(a < b && b <= p && p < d && d < e, "{a} {b} {p} {d} {e}");
    assert_eq!(MessageId(a).node(), 5);
}

#[test]
fn a_full_counter_borrows_the_next_millisecond() {
    let c = Hlc::unleased(1);
    let mut last = c.tick_at(T0);
    for _ in 0..10_000 {
        let r = c.tick_at(T0);
        assert!(r > last);
        last = r;
    }
    assert!(ms(last) > T0 - ID_EPOCH_MS);
}

#[test]
fn observing_a_peer_pulls_the_clock_past_it() {
    let slow = Hlc::unleased(2);
    // A peer 5 s ahead: its reading is followed, and the next tick is above it (whatever
    // the node bits: the counter moves).
    let peer = Hlc::unleased(900);
    let theirs = peer.tick_at(T0 + 5_000);
    assert!(slow.observe_at(theirs, T0));
    let next = slow.tick_at(T0);
    assert!(next > theirs, "{next} > {theirs}");
    assert!(slow.peek_at(T0) >= theirs);
}

#[test]
fn a_peer_too_far_ahead_is_followed_only_to_the_bound() {
    let c = Hlc::unleased(2).with_max_ahead(10_000);
    let far = MessageId::from_parts(T0 - ID_EPOCH_MS + 3_600_000, 7, 0).0;
    assert!(!c.observe_at(far, T0));
    let next = c.tick_at(T0);
    assert!(next < far);
    assert!(ms(next) <= T0 - ID_EPOCH_MS + 10_001);
    assert!(ms(next) >= T0 - ID_EPOCH_MS + 9_999);
}

#[test]
fn a_node_behind_its_peers_follows_them_from_the_cluster_time() {
    // The cluster's readings run 7 s ahead of true time (a node that was 7 s ahead pulled
    // them there); this node's clock is 7 s behind: 14 s between them, past the 10 s cap
    // counted from its own clock, but within it counted from its peers' (7 s ahead of it).
    let c = Hlc::unleased(2).with_max_ahead(10_000);
    let cluster = MessageId::from_parts(T0 - ID_EPOCH_MS + 7_000, 1, 3).0;
    let mine = T0 - 7_000;
    assert!(!c.observe_at(cluster, mine), "from its own clock: capped");
    assert!(c.tick_at(mine) < cluster);
    c.set_peers_ahead_ms(7_000);
    assert!(c.observe_at(cluster, mine));
    assert!(
        c.tick_at(mine) > cluster,
        "its next id sorts after the cluster's"
    );
}

#[test]
fn peek_is_monotone_and_below_the_next_tick() {
    let c = Hlc::unleased(3);
    let mut last = 0;
    for (i, wall) in [T0, T0 + 5, T0 - 100, T0 + 5, T0 + 6]
        .into_iter()
        .enumerate()
    {
        let p = c.peek_at(wall);
        assert!(p >= last, "step {i}");
        let t = c.tick_at(wall);
        assert!(t > p, "step {i}");
        last = t;
    }
}

#[test]
fn the_lease_is_wanted_ahead_and_a_restart_starts_above_it() {
    let c = Hlc::new(4, 0);
    // A fresh clock wants a lease before it serves.
    let lease = c.lease_wanted_at(T0).expect("a first lease");
    assert_eq!(lease, T0 - ID_EPOCH_MS + 3_000);
    c.lease_granted(lease);
    assert_eq!(
        c.lease_wanted_at(T0),
        None,
        "a fresh lease is far enough ahead"
    );
    let before = c.tick_at(T0 + 400);
    // Within the margin, a new one is wanted.
    assert!(c.lease_wanted_at(T0 + 600).is_some());
    assert_eq!(c.lease_overruns(), 0);
    // The process dies; it restarts with the durable lease and a wall clock an hour behind.
    let restarted = Hlc::new(4, lease);
    let after = restarted.tick_at(T0 - 3_600_000);
    assert!(after > before);
    assert!(restarted.peek_at(T0 - 3_600_000) >= before);
}

#[test]
fn running_past_the_lease_is_counted_not_hidden() {
    let c = Hlc::new(4, T0 - ID_EPOCH_MS + 10);
    let a = c.tick_at(T0 + 20);
    let b = c.tick_at(T0 + 20);
    assert!(b > a, "readings stay unique");
    assert_eq!(c.lease_overruns(), 2);
}

#[test]
fn a_node_behind_its_peers_is_told_so_and_two_nodes_never_refuse() {
    let guard = SkewGuard::new(10_000);
    let now = Instant::now();
    let (a, b) = (
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
    );
    assert_eq!(guard.skew_ms_at(now), None);
    assert!(guard.check_at(now).is_ok(), "no peers: nothing to compare");
    // One peer 30 s ahead: two clocks disagree, nobody can tell which is wrong.
    guard.record_at(a, T0 + 30_000, T0, now);
    assert!(guard.check_at(now).is_ok());
    // Two peers both 30 s ahead: this node is the odd one out.
    guard.record_at(b, T0 + 30_050, T0, now);
    let err = guard.check_at(now).unwrap_err();
    assert_eq!(err.skew_ms, -30_000);
    assert_eq!(guard.peers_ahead_ms(), 30_000);
    assert!(err.to_string().contains("30.0 s behind"), "{err}");
    // Old samples stop counting.
    assert!(guard.check_at(now + Duration::from_secs(31)).is_ok());
}

#[test]
fn a_node_whose_peer_is_off_keeps_serving() {
    let guard = SkewGuard::new(10_000);
    let now = Instant::now();
    // Peer a is 30 s behind, peer b agrees with this node.
    guard.record_at("127.0.0.1:1".parse().unwrap(), T0 - 30_000, T0, now);
    guard.record_at("127.0.0.1:2".parse().unwrap(), T0 + 20, T0, now);
    assert_eq!(guard.skew_ms_at(now), Some(0));
    assert!(guard.check_at(now).is_ok());
}

#[test]
fn the_test_offset_shifts_the_wall_clock() {
    // (The process-wide offset itself is not changed here: other tests read the clock.)
    assert_eq!(shifted(T0 as i64, -30_000), T0 - 30_000);
    assert_eq!(shifted(T0 as i64, 5), T0 + 5);
    assert_eq!(shifted(10, -30_000), 0);
    assert_eq!(offset_ms(), 0);
}
