//! Data placement: `partition = hash(key) mod P`, replicas by rendezvous hashing.
//!
//! Both functions are pure, so every node computes the same placement from the same
//! membership, and tests need no network.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// A node's id (0..1024), from config.
pub type NodeId = u16;

/// A partition number, `0..P`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Partition(pub u32);

/// The partition of a partition key. The hash (xxh3, seed 0) is part of the on-disk format:
/// changing it moves every record.
pub fn partition_of(key: &[u8], partitions: u32) -> Partition {
    Partition((xxh3_64(key) % u64::from(partitions.max(1))) as u32)
}

/// The replica set of `partition`: the `rf` nodes of `members` with the highest rendezvous
/// score, best first. Fewer when there are fewer members.
pub fn replicas(partition: Partition, members: &[NodeId], rf: usize) -> Vec<NodeId> {
    let mut scored: Vec<(u64, NodeId)> = members
        .iter()
        .map(|&n| {
            let mut buf = [0u8; 6];
            buf[..4].copy_from_slice(&partition.0.to_be_bytes());
            buf[4..].copy_from_slice(&n.to_be_bytes());
            (xxh3_64_with_seed(&buf, 0x6368_6174), n)
        })
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.dedup_by_key(|s| s.1);
    scored.into_iter().take(rf).map(|(_, n)| n).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_stable_and_in_range() {
        assert_eq!(partition_of(b"alice", 1024), partition_of(b"alice", 1024));
        for i in 0u32..1000 {
            assert!(partition_of(&i.to_be_bytes(), 1024).0 < 1024);
        }
    }

    #[test]
    fn replicas_move_minimally() {
        let five = [1, 2, 3, 4, 5];
        let four = [1, 2, 3, 5];
        let mut moved = 0;
        for p in 0..1024 {
            let a = replicas(Partition(p), &five, 3);
            let b = replicas(Partition(p), &four, 3);
            assert_eq!(a.len(), 3);
            if !a.contains(&4) {
                assert_eq!(a, b, "a partition without node 4 must not move");
            } else {
                moved += 1;
            }
        }
        // About 3/5 of the partitions had node 4.
        assert!((400..830).contains(&moved), "{moved}");
        assert_eq!(replicas(Partition(0), &[7], 3), vec![7]);
    }
}
