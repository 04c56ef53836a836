//! What changed between two member lists: [`member_changes`], a pure diff for whoever
//! reacts to peers coming and going (a node heals its client sessions when a peer dies,
//! comes back, or restarts). Follow [`super::LifecycleHandle::watch_view`] and diff each
//! list against the last one seen: a watch never loses the latest state, so a slow
//! subscriber sees several changes folded into one, never a stale picture.

use crate::membership::Member;
use crate::placement::NodeId;

/// How one node changed between two member lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemberChange {
    /// The node.
    pub node: NodeId,
    /// Whether its newest generation was live before (false when it was unknown).
    pub was_live: bool,
    /// Whether its newest generation is live now (false when it is forgotten).
    pub now_live: bool,
    /// Its newest generation is another one: it restarted (even if it looks live
    /// throughout, its connections and in-memory state are new). False when it was unknown
    /// before or is forgotten now.
    pub generation_changed: bool,
}

/// The nodes whose liveness or newest generation differs between `before` and `after`
/// (member lists as [`super::MembershipPort::members`] gives them: any order, several
/// generations of a node allowed), ascending by node id. Other changes (state, load,
/// pending list) are not reported.
pub fn member_changes(before: &[Member], after: &[Member]) -> Vec<MemberChange> {
    let before = crate::membership::newest_by_node(before);
    let after = crate::membership::newest_by_node(after);
    let mut ids: Vec<NodeId> = before.keys().chain(after.keys()).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .filter_map(|node| {
            let (old, new) = (before.get(&node), after.get(&node));
            let change = MemberChange {
                node,
                was_live: old.is_some_and(|m| m.live),
                now_live: new.is_some_and(|m| m.live),
                generation_changed: matches!((old, new), (Some(o), Some(n)) if o.generation != n.generation),
            };
            (change.was_live != change.now_live || change.generation_changed).then_some(change)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::membership::{Lifecycle, NodeAddrs};

    fn member(node: NodeId, generation: u64, live: bool) -> Member {
        let addr = SocketAddr::from(([127, 0, 0, 1], 7000 + node));
        let addrs = NodeAddrs {
            http: addr,
            quic: addr,
            peer: addr,
        };
        Member::new(node, generation, addr, addrs, Lifecycle::Active, live)
    }

    fn change(node: NodeId, was_live: bool, now_live: bool, restarted: bool) -> MemberChange {
        MemberChange {
            node,
            was_live,
            now_live,
            generation_changed: restarted,
        }
    }

    #[test]
    fn nothing_changes_between_equal_lists_or_on_other_fields() {
        let before = [member(1, 1, true), member(2, 1, false)];
        assert!(member_changes(&before, &before).is_empty());
        let mut after = before.clone();
        after[0].load = 9;
        after[0].state = Lifecycle::Leaving;
        after[0].pending = vec![3];
        after.reverse();
        assert!(member_changes(&before, &after).is_empty());
    }

    #[test]
    fn liveness_flips_appearances_and_disappearances() {
        let before = [member(1, 1, true), member(2, 1, true), member(4, 1, false)];
        let after = [member(1, 1, true), member(2, 1, false), member(3, 1, true)];
        assert_eq!(
            member_changes(&before, &after),
            [
                change(2, true, false, false),
                change(3, false, true, false),
                // Node 4 was dead and is forgotten: nothing to report.
            ]
        );
        // A live node forgotten at once (its dead state was never seen) went down.
        assert_eq!(
            member_changes(&after, &[member(1, 1, true)]),
            [change(3, true, false, false)]
        );
    }

    #[test]
    fn a_restart_is_a_new_generation_even_when_live_throughout() {
        let before = [member(1, 1, true), member(2, 5, true)];
        // Node 2 restarted: gossip still remembers its old generation, now dead.
        let after = [member(1, 1, true), member(2, 5, false), member(2, 7, true)];
        assert_eq!(
            member_changes(&before, &after),
            [change(2, true, true, true)]
        );
        // Restarted and already dead again.
        let after = [member(1, 1, true), member(2, 8, false)];
        assert_eq!(
            member_changes(&before, &after),
            [change(2, true, false, true)]
        );
    }

    #[test]
    fn the_diff_agrees_with_a_naive_oracle() {
        // Every combination of two nodes each absent / dead / live, in generations 1 or 2.
        let states: Vec<Option<(u64, bool)>> = std::iter::once(None)
            .chain([(1, false), (1, true), (2, false), (2, true)].map(Some))
            .collect();
        let list = |a: Option<(u64, bool)>, b: Option<(u64, bool)>| {
            [(1, a), (2, b)]
                .into_iter()
                .filter_map(|(n, s)| s.map(|(g, live)| member(n, g, live)))
                .collect::<Vec<_>>()
        };
        for &a0 in &states {
            for &b0 in &states {
                for &a1 in &states {
                    for &b1 in &states {
                        let got = member_changes(&list(a0, b0), &list(a1, b1));
                        let mut want = Vec::new();
                        for (node, old, new) in [(1, a0, a1), (2, b0, b1)] {
                            let was = old.is_some_and(|(_, l)| l);
                            let now = new.is_some_and(|(_, l)| l);
                            let restarted =
                                matches!((old, new), (Some((g0, _)), Some((g1, _))) if g0 != g1);
                            if was != now || restarted {
                                want.push(change(node, was, now, restarted));
                            }
                        }
                        assert_eq!(got, want, "{a0:?} {b0:?} -> {a1:?} {b1:?}");
                    }
                }
            }
        }
    }
}
