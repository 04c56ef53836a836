//! Quorum bookkeeping, without I/O: quorum sizes, the tally of a write, and how the answers
//! of a read quorum merge (and which replicas they show to be stale, for read repair).

use std::collections::BTreeMap;

use super::error::{FailureReason, QuorumError, ReplicaFailure};
use super::record::{ScanEntry, Versioned};
use super::rpc::ScanReply;
use crate::placement::NodeId;

/// Acks a write needs from a replica set of `n`: a majority, `n / 2 + 1`.
pub fn write_quorum(n: usize) -> usize {
    n / 2 + 1
}

/// Answers a read needs from a replica set of `n`: `n - W + 1`, so every read quorum
/// overlaps every write quorum (`W + R > n`).
pub fn read_quorum(n: usize) -> usize {
    n.max(1) - write_quorum(n.max(1)) + 1
}

/// Where a tally stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Still waiting for answers that could make the quorum.
    Pending,
    /// Enough replicas acked.
    Reached,
    /// Too many failed: the quorum cannot be reached any more.
    Impossible,
}

/// Acks and failures of one write to a replica set.
#[derive(Clone, Debug)]
pub struct WriteTally {
    needed: usize,
    total: usize,
    acked: Vec<NodeId>,
    failed: Vec<ReplicaFailure>,
}

impl WriteTally {
    /// A tally for a write to `total` replicas that needs `needed` acks.
    pub fn new(total: usize, needed: usize) -> Self {
        Self {
            needed,
            total,
            acked: Vec::new(),
            failed: Vec::new(),
        }
    }

    /// Records an ack from `node`.
    pub fn ack(&mut self, node: NodeId) -> Decision {
        if !self.acked.contains(&node) {
            self.acked.push(node);
        }
        self.decision()
    }

    /// Records that `node` failed.
    pub fn fail(&mut self, node: NodeId, reason: FailureReason) -> Decision {
        self.failed.push(ReplicaFailure { node, reason });
        self.decision()
    }

    /// Where the tally stands.
    pub fn decision(&self) -> Decision {
        if self.acked.len() >= self.needed {
            Decision::Reached
        } else if self.total.saturating_sub(self.failed.len()) < self.needed {
            Decision::Impossible
        } else {
            Decision::Pending
        }
    }

    /// The replicas that acked so far.
    pub fn acked(&self) -> &[NodeId] {
        &self.acked
    }

    /// The replicas that failed so far.
    pub fn failed(&self) -> &[ReplicaFailure] {
        &self.failed
    }

    /// The error for a write that ends now without its quorum; `still_pending` (replicas
    /// that have not answered) are reported as timed out.
    pub fn unavailable(mut self, still_pending: impl IntoIterator<Item = NodeId>) -> QuorumError {
        for node in still_pending {
            if !self.acked.contains(&node) && !self.failed.iter().any(|f| f.node == node) {
                self.failed.push(ReplicaFailure {
                    node,
                    reason: FailureReason::TimedOut,
                });
            }
        }
        QuorumError::Unavailable {
            acked: self.acked.len(),
            needed: self.needed,
            failed: self.failed,
        }
    }
}

/// The tally of a write that needs its quorum in each of several replica sets (one set
/// normally, two while a node joins: see [`super::topology::Quorums`]). A node's answer
/// counts in every set it belongs to.
#[derive(Clone, Debug)]
pub struct JointTally {
    parts: Vec<(Vec<NodeId>, WriteTally)>,
}

impl JointTally {
    /// A tally needing `W = n/2 + 1` acks of each set of `n`.
    pub fn new(sets: &[Vec<NodeId>]) -> Self {
        Self {
            parts: sets
                .iter()
                .map(|set| {
                    (
                        set.clone(),
                        WriteTally::new(set.len(), write_quorum(set.len())),
                    )
                })
                .collect(),
        }
    }

    /// Records an ack from `node`.
    pub fn ack(&mut self, node: NodeId) -> Decision {
        for (set, tally) in &mut self.parts {
            if set.contains(&node) {
                tally.ack(node);
            }
        }
        self.decision()
    }

    /// Records that `node` failed.
    pub fn fail(&mut self, node: NodeId, reason: FailureReason) -> Decision {
        for (set, tally) in &mut self.parts {
            if set.contains(&node) {
                tally.fail(node, reason.clone());
            }
        }
        self.decision()
    }

    /// Reached when every set reached its quorum; impossible as soon as one cannot.
    pub fn decision(&self) -> Decision {
        let mut all = Decision::Reached;
        for (_, tally) in &self.parts {
            match tally.decision() {
                Decision::Impossible => return Decision::Impossible,
                Decision::Pending => all = Decision::Pending,
                Decision::Reached => {}
            }
        }
        all
    }

    /// Every replica that acked so far, in ack order, no repeats.
    pub fn acked(&self) -> Vec<NodeId> {
        let mut out: Vec<NodeId> = Vec::new();
        for (_, tally) in &self.parts {
            for id in tally.acked() {
                if !out.contains(id) {
                    out.push(*id);
                }
            }
        }
        out
    }

    /// The error for a write that ends now: the first set without its quorum, with its
    /// replicas in `still_pending` reported as timed out.
    pub fn unavailable(self, still_pending: &[NodeId]) -> QuorumError {
        let mut fallback = None;
        for (set, tally) in self.parts {
            if tally.decision() != Decision::Reached {
                let waiting = still_pending.iter().copied().filter(|n| set.contains(n));
                return tally.unavailable(waiting);
            }
            fallback.get_or_insert(tally);
        }
        match fallback {
            Some(tally) => tally.unavailable([]),
            None => QuorumError::NoReplicas(0),
        }
    }
}

/// The newest copy among a read quorum's answers (`None` when no replica has the key).
pub fn merge_reads(replies: &[(NodeId, Option<Versioned>)]) -> Option<Versioned> {
    replies
        .iter()
        .filter_map(|(_, v)| v.clone())
        .reduce(Versioned::merge)
}

/// The replicas whose answer is older than `merged` (missing or lower rank): read repair
/// sends them `merged`.
pub fn stale_replicas(
    replies: &[(NodeId, Option<Versioned>)],
    merged: Option<&Versioned>,
) -> Vec<NodeId> {
    let Some(merged) = merged else {
        return Vec::new();
    };
    replies
        .iter()
        .filter(|(_, v)| match v {
            Some(v) => merged.supersedes(v),
            None => true,
        })
        .map(|(n, _)| *n)
        .collect()
}

/// A read quorum's scan answers merged: the union by key, the newest copy of each,
/// tombstones included, in scan order, cut at `frontier`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MergedScan {
    /// Entries known complete: every answering replica looked at every key up to here.
    pub entries: Vec<ScanEntry>,
    /// Set when some replica stopped at a limit: the merge is complete only up to this key
    /// (inclusive, in scan direction); continue after it.
    pub frontier: Option<Vec<u8>>,
}

/// Merges the scan answers of a read quorum (see [`MergedScan`]).
///
/// A replica that stopped early (`truncated`) has not looked past its last key, so a key
/// beyond it that another replica returns might be deleted or newer there: the merge keeps
/// only keys up to the nearest such stopping point.
pub fn merge_scans(replies: &[(NodeId, ScanReply)], descending: bool) -> MergedScan {
    let before_or_at = |key: &[u8], bound: &[u8]| {
        if descending {
            key >= bound
        } else {
            key <= bound
        }
    };
    let mut frontier: Option<Vec<u8>> = None;
    for (_, reply) in replies {
        let Some(last) = reply.entries.last().filter(|_| reply.truncated) else {
            continue;
        };
        if match frontier.as_deref() {
            Some(f) => before_or_at(&last.key, f),
            None => true,
        } {
            frontier = Some(last.key.clone());
        }
    }
    let mut merged: BTreeMap<&[u8], Versioned> = BTreeMap::new();
    for (_, reply) in replies {
        for entry in &reply.entries {
            if frontier
                .as_deref()
                .is_some_and(|f| !before_or_at(&entry.key, f))
            {
                continue;
            }
            match merged.get_mut(&entry.key[..]) {
                Some(existing) => {
                    if entry.record.supersedes(existing) {
                        *existing = entry.record.clone();
                    }
                }
                None => {
                    merged.insert(&entry.key, entry.record.clone());
                }
            }
        }
    }
    let to_entry = |(key, record): (&[u8], Versioned)| ScanEntry {
        key: key.to_vec(),
        record,
    };
    let entries = if descending {
        merged.into_iter().rev().map(to_entry).collect()
    } else {
        merged.into_iter().map(to_entry).collect()
    };
    MergedScan { entries, frontier }
}

/// For each answering replica, the merged entries it lacks or holds older copies of (all
/// merged entries lie within what every replica looked at).
pub fn scan_repairs(
    replies: &[(NodeId, ScanReply)],
    merged: &MergedScan,
) -> Vec<(NodeId, Vec<ScanEntry>)> {
    replies
        .iter()
        .filter_map(|(node, reply)| {
            let had: BTreeMap<&[u8], &Versioned> = reply
                .entries
                .iter()
                .map(|e| (&e.key[..], &e.record))
                .collect();
            let missing: Vec<ScanEntry> = merged
                .entries
                .iter()
                .filter(|e| match had.get(&e.key[..]) {
                    Some(mine) => e.record.supersedes(mine),
                    None => true,
                })
                .cloned()
                .collect();
            (!missing.is_empty()).then_some((*node, missing))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, version: u64, value: Option<&str>) -> ScanEntry {
        ScanEntry {
            key: key.as_bytes().to_vec(),
            record: Versioned {
                version,
                value: value.map(|v| v.as_bytes().to_vec()),
            },
        }
    }

    fn keys(merged: &MergedScan) -> Vec<&str> {
        merged
            .entries
            .iter()
            .map(|e| std::str::from_utf8(&e.key).unwrap())
            .collect()
    }

    #[test]
    fn quorum_sizes_overlap() {
        for (n, w, r) in [(1, 1, 1), (2, 2, 1), (3, 2, 2), (4, 3, 2), (5, 3, 3)] {
            assert_eq!((write_quorum(n), read_quorum(n)), (w, r), "n = {n}");
            assert!(write_quorum(n) + read_quorum(n) > n);
        }
    }

    #[test]
    fn tally_reaches_or_gives_up_as_soon_as_it_knows() {
        let mut t = WriteTally::new(3, 2);
        assert_eq!(t.ack(1), Decision::Pending);
        assert_eq!(t.fail(2, FailureReason::NotLive), Decision::Pending);
        assert_eq!(t.ack(3), Decision::Reached);
        let mut t = WriteTally::new(3, 2);
        assert_eq!(t.fail(2, FailureReason::NotLive), Decision::Pending);
        assert_eq!(t.fail(3, FailureReason::TimedOut), Decision::Impossible);
        let QuorumError::Unavailable {
            acked,
            needed,
            failed,
        } = t.unavailable([1])
        else {
            panic!("expected unavailable");
        };
        assert_eq!((acked, needed), (0, 2));
        let nodes: Vec<_> = failed.iter().map(|f| f.node).collect();
        assert_eq!(nodes, vec![2, 3, 1]);
    }

    #[test]
    fn point_reads_take_the_newest_and_name_the_stale() {
        let replies = vec![
            (1, Some(Versioned::live(1, b"a".to_vec()))),
            (2, Some(Versioned::live(3, b"c".to_vec()))),
            (3, None),
        ];
        let merged = merge_reads(&replies);
        assert_eq!(merged, Some(Versioned::live(3, b"c".to_vec())));
        assert_eq!(stale_replicas(&replies, merged.as_ref()), vec![1, 3]);
        assert_eq!(merge_reads(&[(1, None)]), None);
    }

    #[test]
    fn scans_union_by_key_with_the_newest_copy_and_stop_at_the_frontier() {
        let a = ScanReply {
            entries: vec![entry("a", 1, Some("x")), entry("b", 2, None)],
            truncated: true,
            seal: None,
        };
        let b = ScanReply {
            entries: vec![
                entry("b", 1, Some("old")),
                entry("c", 1, Some("y")),
                entry("d", 1, Some("z")),
            ],
            truncated: false,
            seal: None,
        };
        let merged = merge_scans(&[(1, a.clone()), (2, b.clone())], false);
        // "c" and "d" lie past where replica 1 stopped: not yet known complete.
        assert_eq!(keys(&merged), vec!["a", "b"]);
        assert_eq!(merged.entries[1].record, Versioned::tombstone(2));
        assert_eq!(merged.frontier.as_deref(), Some(&b"b"[..]));
        let repairs = scan_repairs(&[(1, a), (2, b)], &merged);
        assert_eq!(repairs.len(), 1);
        assert_eq!(repairs[0].0, 2);
        assert_eq!(
            repairs[0]
                .1
                .iter()
                .map(|e| e.key.clone())
                .collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );

        let full = |entries| ScanReply {
            entries,
            truncated: false,
            seal: None,
        };
        let merged = merge_scans(
            &[
                (
                    1,
                    full(vec![entry("c", 0, Some("m3")), entry("a", 0, Some("m1"))]),
                ),
                (
                    2,
                    full(vec![entry("b", 0, Some("m2")), entry("a", 0, Some("m1"))]),
                ),
            ],
            true,
        );
        assert_eq!(keys(&merged), vec!["c", "b", "a"]);
        assert_eq!(merged.frontier, None);
    }
}
