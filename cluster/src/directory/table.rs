//! The directory's compact tables: [`NodeSet`] (a few node ids in one word) and
//! [`HomeTable`], the entries of the users homed at this node, grouped by partition.

use std::collections::HashMap;

use crate::placement::NodeId;

/// Node ids, as a set. Up to four live in one word (each stored as `id + 1` in 16 bits, 0
/// meaning empty); more spill to the heap. Most users have devices on one node and are
/// watched from a few, so nearly every set is inline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NodeSet {
    Inline(u64),
    Heap(Box<[NodeId]>),
}

impl Default for NodeSet {
    fn default() -> Self {
        NodeSet::Inline(0)
    }
}

const SLOTS: usize = 4;

impl NodeSet {
    pub(crate) fn from_ids(ids: &[NodeId]) -> Self {
        let mut set = NodeSet::default();
        for &id in ids {
            set.insert(id);
        }
        set
    }

    pub(crate) fn is_empty(&self) -> bool {
        match self {
            NodeSet::Inline(w) => *w == 0,
            NodeSet::Heap(ids) => ids.is_empty(),
        }
    }

    pub(crate) fn contains(&self, id: NodeId) -> bool {
        self.iter().any(|n| n == id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = NodeId> + '_ {
        let (inline, heap): (Option<u64>, &[NodeId]) = match self {
            NodeSet::Inline(w) => (Some(*w), &[]),
            NodeSet::Heap(ids) => (None, ids),
        };
        inline
            .into_iter()
            .flat_map(|w| (0..SLOTS).map(move |i| ((w >> (16 * i)) & 0xFFFF) as u16))
            .filter(|slot| *slot != 0)
            .map(|slot| slot - 1)
            .chain(heap.iter().copied())
    }

    pub(crate) fn to_vec(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self.iter().collect();
        v.sort_unstable();
        v
    }

    /// Adds `id`; true when it was not there. Ids above `u16::MAX - 1` do not exist
    /// (`NodeId` is below 1024), but are kept on the heap rather than lost.
    pub(crate) fn insert(&mut self, id: NodeId) -> bool {
        if self.contains(id) {
            return false;
        }
        match self {
            NodeSet::Inline(w) => {
                let free = (0..SLOTS).find(|i| (*w >> (16 * i)) & 0xFFFF == 0);
                match free {
                    Some(i) if id < u16::MAX => *w |= u64::from(id + 1) << (16 * i),
                    _ => {
                        let mut ids = self.to_vec();
                        ids.push(id);
                        *self = NodeSet::Heap(ids.into_boxed_slice());
                    }
                }
            }
            NodeSet::Heap(ids) => {
                let mut v = ids.to_vec();
                v.push(id);
                *ids = v.into_boxed_slice();
            }
        }
        true
    }

    /// Removes `id`; true when it was there.
    pub(crate) fn remove(&mut self, id: NodeId) -> bool {
        if !self.contains(id) {
            return false;
        }
        let rest: Vec<NodeId> = self.iter().filter(|n| *n != id).collect();
        *self = NodeSet::from_ids(&rest);
        true
    }
}

/// One user homed at this node: the nodes holding their devices, and the nodes subscribed to
/// changes of that.
#[derive(Clone, Debug, Default)]
pub(crate) struct Entry {
    pub(crate) nodes: NodeSet,
    pub(crate) subs: NodeSet,
}

/// The users homed at this node, by home partition (so that a partition moves or is
/// replaced by a snapshot as a whole).
#[derive(Default)]
pub(crate) struct HomeTable {
    partitions: HashMap<u32, HashMap<u64, Entry>>,
    entries: usize,
}

/// A user whose node set changed, and the subscribers to tell.
pub(crate) struct Changed {
    pub(crate) user: u64,
    pub(crate) nodes: Vec<NodeId>,
    pub(crate) subs: Vec<NodeId>,
}

impl HomeTable {
    pub(crate) fn len(&self) -> usize {
        self.entries
    }

    pub(crate) fn get(&self, partition: u32, user: u64) -> Option<&Entry> {
        self.partitions.get(&partition)?.get(&user)
    }

    /// Applies `f` to `user`'s entry (made if missing, dropped if left empty). Returns the
    /// change to push when the node set changed.
    pub(crate) fn update(
        &mut self,
        partition: u32,
        user: u64,
        f: impl FnOnce(&mut Entry) -> bool,
    ) -> Option<Changed> {
        let map = self.partitions.entry(partition).or_default();
        let before = map.len();
        let entry = map.entry(user).or_default();
        let changed = f(entry).then(|| Changed {
            user,
            nodes: entry.nodes.to_vec(),
            subs: entry.subs.to_vec(),
        });
        if entry.nodes.is_empty() && entry.subs.is_empty() {
            map.remove(&user);
        }
        let after = map.len();
        if map.is_empty() {
            self.partitions.remove(&partition);
        }
        self.entries = self.entries + after - before;
        changed
    }

    /// Sets whether `node` holds devices of, and subscribes to, each user of `partitions`,
    /// from a full statement of that node (`regs`, `subs`: the users of those partitions it
    /// holds and wants). Returns the users whose node set changed.
    pub(crate) fn replace(
        &mut self,
        node: NodeId,
        partitions: &[u32],
        regs: &std::collections::HashSet<u64>,
        subs: &std::collections::HashSet<u64>,
        partition_of: impl Fn(u64) -> u32,
    ) -> Vec<Changed> {
        let listed: std::collections::HashSet<u32> = partitions.iter().copied().collect();
        let mut out = Vec::new();
        // Users the statement names.
        for &u in regs.iter().chain(subs.iter()) {
            let p = partition_of(u);
            if !listed.contains(&p) {
                continue;
            }
            let (reg, sub) = (regs.contains(&u), subs.contains(&u));
            out.extend(self.update(p, u, |e| {
                if sub {
                    e.subs.insert(node);
                } else {
                    e.subs.remove(node);
                }
                if reg {
                    e.nodes.insert(node)
                } else {
                    e.nodes.remove(node)
                }
            }));
        }
        // Users it no longer names.
        for &p in partitions {
            let stale: Vec<u64> = self
                .partitions
                .get(&p)
                .into_iter()
                .flatten()
                .filter(|(u, e)| {
                    (e.nodes.contains(node) && !regs.contains(u))
                        || (e.subs.contains(node) && !subs.contains(u))
                })
                .map(|(u, _)| *u)
                .collect();
            for u in stale {
                out.extend(self.update(p, u, |e| {
                    if !subs.contains(&u) {
                        e.subs.remove(node);
                    }
                    !regs.contains(&u) && e.nodes.remove(node)
                }));
            }
        }
        out
    }

    /// Forgets `node` everywhere (it died or restarted). Returns the users whose node set
    /// changed.
    pub(crate) fn forget_node(&mut self, node: NodeId) -> Vec<Changed> {
        let mut touched = Vec::new();
        for (p, map) in &self.partitions {
            for (u, e) in map {
                if e.nodes.contains(node) || e.subs.contains(node) {
                    touched.push((*p, *u));
                }
            }
        }
        let mut out = Vec::new();
        for (p, u) in touched {
            out.extend(self.update(p, u, |e| {
                e.subs.remove(node);
                e.nodes.remove(node)
            }));
        }
        out
    }

    /// Drops the partitions `keep` says are no longer homed here.
    pub(crate) fn retain_partitions(&mut self, keep: impl Fn(u32) -> bool) {
        self.partitions.retain(|p, _| keep(*p));
        self.entries = self.partitions.values().map(HashMap::len).sum();
    }

    /// Bytes the table holds, about: the maps' buckets (key, entry, control byte) and heap
    /// sets.
    pub(crate) fn approx_bytes(&self) -> usize {
        let bucket = std::mem::size_of::<(u64, Entry)>() + 1;
        self.partitions
            .values()
            .map(|m| {
                let heap: usize = m
                    .values()
                    .map(|e| heap_bytes(&e.nodes) + heap_bytes(&e.subs))
                    .sum();
                m.capacity() * bucket + heap + 64
            })
            .sum()
    }
}

fn heap_bytes(s: &NodeSet) -> usize {
    match s {
        NodeSet::Inline(_) => 0,
        NodeSet::Heap(ids) => ids.len() * std::mem::size_of::<NodeId>(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn a_node_set_holds_four_inline_and_more_on_the_heap() {
        assert_eq!(std::mem::size_of::<NodeSet>(), 16);
        let mut s = NodeSet::default();
        assert!(s.is_empty());
        for id in [0u16, 7, 1023, 3] {
            assert!(s.insert(id));
            assert!(!s.insert(id), "a second insert changes nothing");
        }
        assert!(matches!(s, NodeSet::Inline(_)));
        assert_eq!(s.to_vec(), vec![0, 3, 7, 1023]);
        assert!(s.insert(9));
        assert!(matches!(s, NodeSet::Heap(_)));
        assert_eq!(s.to_vec(), vec![0, 3, 7, 9, 1023]);
        assert!(s.remove(7));
        assert!(!s.remove(7));
        assert!(matches!(s, NodeSet::Inline(_)), "back inline once it fits");
        assert_eq!(s.to_vec(), vec![0, 3, 9, 1023]);
        for id in [0, 3, 9, 1023] {
            assert!(s.remove(id));
        }
        assert!(s.is_empty());
    }

    #[test]
    fn updates_report_node_set_changes_and_drop_empty_entries() {
        let mut t = HomeTable::default();
        assert!(t
            .update(1, 10, |e| {
                e.subs.insert(2);
                false
            })
            .is_none());
        assert_eq!(t.len(), 1);
        let c = t.update(1, 10, |e| e.nodes.insert(3)).expect("a change");
        assert_eq!((c.nodes, c.subs), (vec![3], vec![2]));
        assert!(t.update(1, 10, |e| e.nodes.insert(3)).is_none());
        let c = t.forget_node(3);
        assert_eq!(c.len(), 1);
        assert!(c[0].nodes.is_empty());
        assert_eq!(t.len(), 1, "the subscription stays");
        assert!(
            t.forget_node(2).is_empty(),
            "a subscriber is not a node set change"
        );
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_statement_replaces_what_a_node_holds_in_its_partitions_only() {
        let mut t = HomeTable::default();
        let part = |u: u64| (u % 2) as u32;
        for u in [2u64, 4, 3] {
            t.update(part(u), u, |e| e.nodes.insert(5));
        }
        t.update(part(6), 6, |e| e.subs.insert(5));
        // Node 5 now holds 4 and 8 in partition 0 and subscribes to nothing; partition 1 is
        // not in the statement.
        let regs: HashSet<u64> = [4u64, 8].into();
        let changed = t.replace(5, &[0], &regs, &HashSet::new(), part);
        let mut users: Vec<u64> = changed.iter().map(|c| c.user).collect();
        users.sort_unstable();
        assert_eq!(users, vec![2, 8]);
        assert!(t.get(0, 2).is_none());
        assert!(t.get(0, 6).is_none(), "the subscription went too");
        assert_eq!(t.get(0, 4).map(|e| e.nodes.to_vec()), Some(vec![5]));
        assert_eq!(t.get(1, 3).map(|e| e.nodes.to_vec()), Some(vec![5]));
        t.retain_partitions(|p| p != 1);
        assert_eq!(t.len(), 2);
        assert!(t.approx_bytes() > 0);
    }
}
