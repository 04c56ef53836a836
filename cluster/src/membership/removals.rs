//! The removal map: which nodes are leaving placement for good, as every node gossips it.
//!
//! An operator's `decommission` (a live node leaves) or `remove` (a dead node will not come
//! back) becomes one entry, `node -> (version, state)`, that the node taking the request
//! publishes under the `removals` key. Every node merges every member's map (newest version
//! wins; [`RemovalState::Done`] wins over everything: it is final) and republishes the
//! merged map, so the request outlives the node that took it. Versions are logical (one more
//! than the highest version seen for that node), never clock readings: a cancel issued after
//! a removal, anywhere, wins over it whatever the clocks say.
//!
//! Wire form: `id:version:state` entries, comma-separated, state one letter (`l` leave, `r`
//! remove, `c` cancelled, `d` done). An entry that does not parse is skipped.

use std::collections::BTreeMap;
use std::fmt;

use crate::placement::NodeId;

/// Where a node's removal stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RemovalState {
    /// Cancelled: the node keeps (or gets back) its place.
    Cancelled,
    /// The node decommissions itself: it stays a replica while the nodes that take over its
    /// partitions pull them, then it stops.
    Leaving,
    /// The node is dead for good: the nodes that take over pull from the surviving replicas.
    Removing,
    /// The move is complete: the node holds no partition and its id cannot come back.
    Done,
}

impl RemovalState {
    fn letter(self) -> char {
        match self {
            RemovalState::Cancelled => 'c',
            RemovalState::Leaving => 'l',
            RemovalState::Removing => 'r',
            RemovalState::Done => 'd',
        }
    }

    fn from_letter(c: &str) -> Option<Self> {
        Some(match c {
            "c" => RemovalState::Cancelled,
            "l" => RemovalState::Leaving,
            "r" => RemovalState::Removing,
            "d" => RemovalState::Done,
            _ => return None,
        })
    }

    /// Whether the node is on its way out (its partitions are moving).
    pub fn is_outgoing(self) -> bool {
        matches!(self, RemovalState::Leaving | RemovalState::Removing)
    }

    /// The word status tables show.
    pub fn as_str(self) -> &'static str {
        match self {
            RemovalState::Cancelled => "cancelled",
            RemovalState::Leaving => "decommissioning",
            RemovalState::Removing => "removing",
            RemovalState::Done => "removed",
        }
    }
}

/// One node's entry: its state and the logical version that set it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Removal {
    /// The logical version (higher wins, except against [`RemovalState::Done`]).
    pub version: u64,
    /// Where the removal stands.
    pub state: RemovalState,
}

impl Removal {
    /// Whether `self` wins over `other` in a merge.
    fn beats(&self, other: &Removal) -> bool {
        let final_rank = |r: &Removal| r.state == RemovalState::Done;
        (final_rank(self), self.version, self.state)
            > (final_rank(other), other.version, other.state)
    }
}

/// The removal map (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Removals(BTreeMap<NodeId, Removal>);

impl Removals {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the wire form, skipping entries that do not parse.
    pub fn parse(s: &str) -> Self {
        let mut map = Self::new();
        for entry in s.split(',').filter(|e| !e.is_empty()) {
            let mut parts = entry.split(':');
            let (Some(id), Some(version), Some(state), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(id), Ok(version), Some(state)) = (
                id.parse::<NodeId>(),
                version.parse::<u64>(),
                RemovalState::from_letter(state),
            ) else {
                continue;
            };
            map.merge_entry(id, Removal { version, state });
        }
        map
    }

    /// Merges one entry in (the winner of the two stays).
    pub fn merge_entry(&mut self, node: NodeId, entry: Removal) {
        match self.0.get(&node) {
            Some(have) if !entry.beats(have) => {}
            _ => {
                self.0.insert(node, entry);
            }
        }
    }

    /// Merges every entry of `other` in.
    pub fn merge(&mut self, other: &Removals) {
        for (&node, &entry) in &other.0 {
            self.merge_entry(node, entry);
        }
    }

    /// `node`'s entry, if any.
    pub fn get(&self, node: NodeId) -> Option<Removal> {
        self.0.get(&node).copied()
    }

    /// `node`'s state, if it has an entry.
    pub fn state(&self, node: NodeId) -> Option<RemovalState> {
        self.get(node).map(|r| r.state)
    }

    /// Sets `node` to `state` with a version above any seen for it: what an operator's
    /// request does. A node already [`RemovalState::Done`] stays done (returns false).
    pub fn request(&mut self, node: NodeId, state: RemovalState) -> bool {
        let version = self.get(node).map_or(1, |r| r.version + 1);
        if self.state(node) == Some(RemovalState::Done) {
            return false;
        }
        self.0.insert(node, Removal { version, state });
        true
    }

    /// Every entry, by node id.
    pub fn iter(&self) -> impl Iterator<Item = (NodeId, Removal)> + '_ {
        self.0.iter().map(|(&n, &r)| (n, r))
    }

    /// The nodes on their way out.
    pub fn outgoing(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.iter()
            .filter(|(_, r)| r.state.is_outgoing())
            .map(|(n, _)| n)
    }

    /// The nodes whose removal is complete.
    pub fn done(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.iter()
            .filter(|(_, r)| r.state == RemovalState::Done)
            .map(|(n, _)| n)
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for Removals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (node, r)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{node}:{}:{}", r.version, r.state.letter())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_round_trips_and_skips_garbage() {
        let mut m = Removals::new();
        assert!(m.request(4, RemovalState::Removing));
        assert!(m.request(7, RemovalState::Leaving));
        let s = m.to_string();
        assert_eq!(s, "4:1:r,7:1:l");
        assert_eq!(Removals::parse(&s), m);
        let garbage = Removals::parse("x,4:1:r,5:z:r,6:1:q,7:1:l:9,,8:2:c");
        assert_eq!(garbage.to_string(), "4:1:r,8:2:c");
        assert!(Removals::parse("").is_empty());
    }

    #[test]
    fn newer_versions_win_and_done_is_final() {
        let mut a = Removals::new();
        a.request(4, RemovalState::Removing);
        let mut b = a.clone();
        b.request(4, RemovalState::Cancelled);
        // Merging either way gives the cancel (version 2).
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.state(4), Some(RemovalState::Cancelled));
        // A removal asked again after the cancel wins over it.
        ab.request(4, RemovalState::Removing);
        assert_eq!(ab.get(4).map(|r| r.version), Some(3));
        // Done wins over any version, and cannot be taken back.
        let mut done = a.clone();
        done.0.insert(
            4,
            Removal {
                version: 1,
                state: RemovalState::Done,
            },
        );
        ab.merge(&done);
        assert_eq!(ab.state(4), Some(RemovalState::Done));
        assert!(!ab.request(4, RemovalState::Cancelled));
        assert_eq!(ab.done().collect::<Vec<_>>(), [4]);
        assert_eq!(ab.outgoing().count(), 0);
    }
}
