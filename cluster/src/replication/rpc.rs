//! The replica RPC messages: what a coordinator asks a replica, and what it answers. Bodies
//! of [`crate::transport::Request`]s, bincode 2 (standard configuration, bounded by the
//! transport's frame limit), routed by `kind`.
//!
//! The kinds `0x0100..=0x01ff` belong to replication ([`is_replication_kind`]); the node
//! routes them to [`super::ReplicaService`]. The kind numbers version the format: a change
//! to a message gets a new kind, and a node answers a kind it does not know with
//! [`codes::UNKNOWN_KIND`].

use std::ops::Bound;

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bincode::{Decode, Encode};

use super::record::{ReplicaOp, ScanEntry, TableId, Versioned};
use crate::placement::{NodeId, Partition};
use crate::transport::HARD_MAX_FRAME;

/// `kind` of [`ApplyBatch`]; replies with an [`ApplyReply`] once the ops are durable.
/// (0x0100 was the first version, without `fresh` and the clock readings.)
pub const KIND_APPLY: u16 = 0x0106;
/// `kind` of [`ConditionalApply`]; replies with a [`ConditionalOutcome`].
pub const KIND_APPLY_IF: u16 = 0x0101;
/// `kind` of [`ReadRequest`]; replies with an `Option<`[`Versioned`]`>`.
pub const KIND_READ: u16 = 0x0102;
/// `kind` of [`ScanRequest`]; replies with a [`ScanReply`]. (0x0103 was the first version,
/// without the seal.)
pub const KIND_SCAN: u16 = 0x0107;
/// `kind` of [`CasRequest`] (sent to the partition's primary); replies with a [`CasReply`].
pub const KIND_CAS: u16 = 0x0104;

/// `kind` of [`PullRequest`]; replies with a [`PullReply`]. (0x0105 was the first version,
/// without `since`.)
pub const KIND_PULL: u16 = 0x0108;

/// `kind` of several [`ApplyBatch`]es to one node in one request (a `Vec`, at most
/// [`MAX_APPLY_MANY`]): concurrent applies to one peer travel together
/// ([`super::lanes`]); replies with an [`ApplyManyReply`] once every batch is durable or
/// failed. A node that answers [`codes::UNKNOWN_KIND`] (an older one) gets them one by one.
pub const KIND_APPLY_MANY: u16 = 0x010b;

/// Batches in one [`KIND_APPLY_MANY`] request at most.
pub const MAX_APPLY_MANY: usize = 64;

/// What a replica did with each batch of a [`KIND_APPLY_MANY`] request, in order.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ApplyManyReply {
    /// One per batch.
    pub outcomes: Vec<ManyOutcome>,
    /// Its clock reading, as in [`ApplyReply`].
    pub hlc: u64,
}

/// One batch's answer in an [`ApplyManyReply`].
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ManyOutcome {
    /// As a single apply's [`ApplyOutcome`].
    Done(ApplyOutcome),
    /// The local store failed on this batch (the others may have succeeded).
    Failed(String),
}

/// True for request kinds the replication service handles.
pub fn is_replication_kind(kind: u16) -> bool {
    (0x0100..=0x01ff).contains(&kind)
}

/// Error codes a replica sends back as a [`crate::transport::RemoteError`].
pub mod codes {
    /// The request body could not be decoded.
    pub const BAD_REQUEST: u16 = 0x0100;
    /// The kind is in the replication range but unknown to this node (a newer peer).
    pub const UNKNOWN_KIND: u16 = 0x0101;
    /// The local store failed (disk error, flush timeout): the op may not be durable.
    pub const STORAGE: u16 = 0x0102;
    /// The node cannot coordinate yet (its coordinator is not attached).
    pub const NOT_READY: u16 = 0x0103;
}

/// Apply `ops` (in `partition`, or in several partitions the receiver replicates, for a
/// grouped write) and answer once they are durable. Ops merge by
/// [`Versioned::should_store`], so applying twice, or out of order, is harmless.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ApplyBatch {
    /// The partition the ops belong to (the first one, for a grouped write).
    pub partition: u32,
    /// The writes.
    pub ops: Vec<ReplicaOp>,
    /// A coordinator's first attempt at a write, as opposed to a copy of records a write
    /// already placed (a hint, a read repair, a pull): fresh writes to a sealed table are
    /// refused at or below the replica's seal ([`super::seal`]); copies never are.
    pub fresh: bool,
    /// The sender's clock reading: the receiver's clock is pulled past it.
    pub hlc: u64,
}

impl ApplyBatch {
    /// A batch of copies (hints, repairs, pulls) for `partition`.
    pub fn new(partition: Partition, ops: Vec<ReplicaOp>) -> Self {
        Self {
            partition: partition.0,
            ops,
            fresh: false,
            hlc: 0,
        }
    }

    /// A batch of fresh writes (a coordinator's first attempt) for `partition`.
    pub fn fresh(partition: Partition, ops: Vec<ReplicaOp>) -> Self {
        Self {
            fresh: true,
            ..Self::new(partition, ops)
        }
    }
}

/// What a replica did with an [`ApplyBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ApplyOutcome {
    /// Every op is stored (or a newer copy was) and durable.
    Applied,
    /// The fresh ops at sealed positions were refused (the others are stored and durable):
    /// this replica does not count towards the write's quorum.
    Sealed {
        /// The replica's seal.
        seal: u64,
    },
}

/// A replica's answer to an [`ApplyBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ApplyReply {
    /// What it did.
    pub outcome: ApplyOutcome,
    /// Its clock reading: the coordinator's clock is pulled past it (so a write refused as
    /// sealed is retried at a position the replica takes).
    pub hlc: u64,
}

/// Store `op` only if this replica's copy of its key has a version of at most
/// `if_version_at_most` (the version the CAS primary read at a quorum); durable before the
/// answer. A replica accepts at most one of several writes racing from the same observed
/// version, since each accepted one raises its version past it.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ConditionalApply {
    /// The partition of the key.
    pub partition: u32,
    /// The write (its version is above `if_version_at_most`).
    pub op: ReplicaOp,
    /// The highest version the replica may hold for the write to apply.
    pub if_version_at_most: u64,
}

/// What a replica did with a [`ConditionalApply`].
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ConditionalOutcome {
    /// Stored and durable.
    Applied,
    /// Refused: the replica holds a newer copy.
    Stale {
        /// The replica's copy.
        current: Versioned,
    },
}

/// Read one key. The answer includes tombstones, so the coordinator can merge.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ReadRequest {
    /// The key's partition.
    pub partition: u32,
    /// The table.
    pub table: TableId,
    /// The key.
    pub key: Vec<u8>,
}

/// Read the keys of `table` in `start..=end`, in key order (or reversed), resuming strictly
/// after `after` when set, up to `limit` entries or about `max_bytes` (at least one entry).
/// Tombstones are returned and count towards the limits.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ScanRequest {
    /// The partition all the keys are in.
    pub partition: u32,
    /// The table.
    pub table: TableId,
    /// Lowest key, inclusive.
    pub start: Vec<u8>,
    /// Highest key, inclusive.
    pub end: Vec<u8>,
    /// Resume point, exclusive, in scan direction (the last key of the previous page).
    pub after: Option<Vec<u8>>,
    /// Highest key first.
    pub descending: bool,
    /// At most this many entries (0 is read as 1).
    pub limit: u32,
    /// Stop once the entries take about this many bytes.
    pub max_bytes: u32,
}

impl ScanRequest {
    /// The bounds to iterate in key order, or `None` when the range is empty. (Range types
    /// of `BTreeMap` and sled panic or misbehave on inverted ranges; check this first.)
    pub fn key_bounds(&self) -> Option<KeyBounds<'_>> {
        let (lower, upper) = match (&self.after, self.descending) {
            (Some(after), false) => (Bound::Excluded(&after[..]), Bound::Included(&self.end[..])),
            (Some(after), true) => (
                Bound::Included(&self.start[..]),
                Bound::Excluded(&after[..]),
            ),
            (None, _) => (
                Bound::Included(&self.start[..]),
                Bound::Included(&self.end[..]),
            ),
        };
        let (lo, lo_inclusive) = match lower {
            Bound::Included(k) => (k, true),
            Bound::Excluded(k) => (k, false),
            Bound::Unbounded => return Some((lower, upper)),
        };
        let (hi, hi_inclusive) = match upper {
            Bound::Included(k) => (k, true),
            Bound::Excluded(k) => (k, false),
            Bound::Unbounded => return Some((lower, upper)),
        };
        let empty = lo > hi || (lo == hi && !(lo_inclusive && hi_inclusive));
        (!empty).then_some((lower, upper))
    }

    /// Collects a scan reply from `entries` (already in scan order and within
    /// [`ScanRequest::key_bounds`]), applying `limit` and `max_bytes`. Replica implementations
    /// can feed their iterator straight into this.
    pub fn collect<E>(
        &self,
        entries: impl IntoIterator<Item = Result<ScanEntry, E>>,
    ) -> Result<ScanReply, E> {
        let limit = self.limit.max(1) as usize;
        let mut bytes = 0usize;
        let mut out = Vec::new();
        let mut iter = entries.into_iter();
        while let Some(entry) = iter.next() {
            let entry = entry?;
            bytes += entry.key.len() + entry.record.value.as_ref().map_or(0, Vec::len) + 16;
            out.push(entry);
            if out.len() >= limit || bytes >= self.max_bytes as usize {
                let truncated = iter.next().is_some();
                return Ok(ScanReply {
                    entries: out,
                    truncated,
                    seal: None,
                });
            }
        }
        Ok(ScanReply {
            entries: out,
            truncated: false,
            seal: None,
        })
    }
}

/// Lower and upper bounds of a scan, in key order.
pub type KeyBounds<'a> = (Bound<&'a [u8]>, Bound<&'a [u8]>);

/// A replica's answer to a [`ScanRequest`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct ScanReply {
    /// The entries, in scan order, tombstones included.
    pub entries: Vec<ScanEntry>,
    /// True when the replica stopped at a limit before the end of the range: keys past the
    /// last entry were not looked at.
    pub truncated: bool,
    /// For a sealed table ([`super::seal`]): the seal the scan was taken under. Every fresh
    /// write this replica accepts later is above it.
    pub seal: Option<u64>,
}

/// Compare-and-swap one key, executed by the partition's primary (see
/// [`super::Coordinator::compare_and_swap`]).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct CasRequest {
    /// The key's partition.
    pub partition: u32,
    /// The table.
    pub table: TableId,
    /// The key.
    pub key: Vec<u8>,
    /// The value the key must hold (`None`: absent or deleted) for the swap to happen.
    pub expected: Option<Vec<u8>>,
    /// The value to store (`None`: delete).
    pub new: Option<Vec<u8>>,
    /// The lowest version to store it at (the caller's clock); the primary uses at least
    /// one more than the current version.
    pub min_version: u64,
}

/// The primary's answer to a [`CasRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum CasReply {
    /// Stored at a write quorum with this version.
    Swapped {
        /// The version written.
        version: u64,
    },
    /// The key did not hold the expected value; nothing was written.
    Mismatch {
        /// What the read quorum found (tombstones included; `None`: never written).
        current: Option<Versioned>,
    },
    /// The receiver is not the first live replica of the partition in its own view.
    NotPrimary {
        /// Who it thinks is.
        primary: Option<NodeId>,
    },
    /// A concurrent write to the key won at some replicas; this one may be partly applied.
    Conflict,
    /// A read or write quorum could not be reached; the write may be partly applied.
    Unavailable {
        /// Replicas that answered or acked.
        acked: u32,
        /// Replicas needed.
        needed: u32,
    },
}

/// Most partitions a cluster can be configured with (bounds [`PullRequest::partitions`]).
pub const MAX_PARTITIONS: u32 = 1 << 16;

/// Every record (tombstones too) of `table` whose key falls in one of `partitions`, for a
/// node that takes partitions over or catches up ([`super::Coordinator::pull`]). The replica
/// walks its table in key order strictly after `after`, looks at no more than `max_keys`
/// keys, and stops at about `max_bytes` of entries.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct PullRequest {
    /// The table.
    pub table: TableId,
    /// The cluster's partition count (how keys map to partitions).
    pub partition_count: u32,
    /// The partitions wanted, ascending, no repeats.
    pub partitions: Vec<u32>,
    /// Resume strictly after this key (from [`PullReply::next`]).
    pub after: Option<Vec<u8>>,
    /// Keys to look at, at most (0 is read as 1).
    pub max_keys: u32,
    /// Bytes of entries to return, about.
    pub max_bytes: u32,
    /// Only records whose version is above this (a catch-up after a restart asks for what
    /// was written since the node went down); `None`: every record.
    pub since: Option<u64>,
}

impl PullRequest {
    /// Whether the request is well formed: a sane partition count, and `partitions`
    /// ascending, unique and below it.
    pub fn is_valid(&self) -> bool {
        (1..=MAX_PARTITIONS).contains(&self.partition_count)
            && self.partitions.windows(2).all(|w| w[0] < w[1])
            && self
                .partitions
                .last()
                .is_none_or(|p| *p < self.partition_count)
    }

    /// Whether `partition` is wanted.
    pub fn wants(&self, partition: Partition) -> bool {
        self.partitions.binary_search(&partition.0).is_ok()
    }

    /// Collects a reply from `(key, record)` pairs in key order after [`PullRequest::after`];
    /// `partition_of_key` names a key's partition (`None`: not a replicated key, skipped).
    pub fn collect<E>(
        &self,
        entries: impl IntoIterator<Item = Result<(Vec<u8>, Versioned), E>>,
        partition_of_key: impl Fn(&[u8]) -> Option<Partition>,
    ) -> Result<PullReply, E> {
        let max_keys = self.max_keys.max(1) as usize;
        let mut bytes = 0usize;
        let mut reply = PullReply::default();
        for (looked, entry) in entries.into_iter().enumerate() {
            let (key, record) = entry?;
            let full = looked + 1 >= max_keys;
            let recent = self.since.is_none_or(|since| record.version > since);
            if recent && partition_of_key(&key).is_some_and(|p| self.wants(p)) {
                bytes += key.len() + record.value.as_ref().map_or(0, Vec::len) + 16;
                let stop = full || bytes >= self.max_bytes as usize;
                if stop {
                    reply.next = Some(key.clone());
                }
                reply.entries.push(ScanEntry { key, record });
                if stop {
                    return Ok(reply);
                }
            } else if full {
                reply.next = Some(key);
                return Ok(reply);
            }
        }
        Ok(reply)
    }
}

/// A replica's answer to a [`PullRequest`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Encode, Decode)]
pub struct PullReply {
    /// The wanted entries among the keys looked at, in key order.
    pub entries: Vec<ScanEntry>,
    /// Where to resume (the last key looked at); `None` when the table is done.
    pub next: Option<Vec<u8>>,
}

type WireConfig = Configuration<LittleEndian, Varint, Limit<HARD_MAX_FRAME>>;

const fn wire_config() -> WireConfig {
    bincode::config::standard().with_limit::<HARD_MAX_FRAME>()
}

/// Encodes a replication message body.
pub fn encode<T: Encode>(value: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::encode_to_vec(value, wire_config())
}

/// Decodes a replication message body; trailing bytes are an error.
pub fn decode<T: Decode<()>>(body: &[u8]) -> Result<T, bincode::error::DecodeError> {
    let (value, used) = bincode::decode_from_slice(body, wire_config())?;
    if used != body.len() {
        return Err(bincode::error::DecodeError::OtherString(format!(
            "{} trailing bytes after a replication message",
            body.len() - used
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(after: Option<&[u8]>, descending: bool) -> ScanRequest {
        ScanRequest {
            partition: 1,
            table: 2,
            start: b"b".to_vec(),
            end: b"d".to_vec(),
            after: after.map(<[u8]>::to_vec),
            descending,
            limit: 2,
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn messages_round_trip() {
        let batch = ApplyBatch::new(
            Partition(3),
            vec![
                ReplicaOp::put(1, b"k".to_vec(), b"v".to_vec(), 9),
                ReplicaOp::delete(1, b"j".to_vec(), 10),
            ],
        );
        assert_eq!(
            decode::<ApplyBatch>(&encode(&batch).unwrap()).unwrap(),
            batch
        );
        let s = scan(Some(b"c"), true);
        assert_eq!(decode::<ScanRequest>(&encode(&s).unwrap()).unwrap(), s);
        for reply in [
            CasReply::Swapped { version: 1 },
            CasReply::Mismatch {
                current: Some(Versioned::tombstone(4)),
            },
            CasReply::Unavailable {
                acked: 1,
                needed: 2,
            },
        ] {
            assert_eq!(decode::<CasReply>(&encode(&reply).unwrap()).unwrap(), reply);
        }
        let mut bytes = encode(&batch).unwrap();
        bytes.push(0);
        assert!(decode::<ApplyBatch>(&bytes).is_err());
        for len in 0..48u8 {
            let junk: Vec<u8> = (0..len).map(|i| i.wrapping_mul(91)).collect();
            let _ = decode::<ScanRequest>(&junk);
            let _ = decode::<CasReply>(&junk);
        }
    }

    #[test]
    fn scan_bounds_resume_in_direction_and_never_invert() {
        use Bound::*;
        let b: &[u8] = b"b";
        let c: &[u8] = b"c";
        let d: &[u8] = b"d";
        assert_eq!(
            scan(None, false).key_bounds(),
            Some((Included(b), Included(d)))
        );
        assert_eq!(
            scan(Some(c), false).key_bounds(),
            Some((Excluded(c), Included(d)))
        );
        assert_eq!(
            scan(Some(c), true).key_bounds(),
            Some((Included(b), Excluded(c)))
        );
        assert_eq!(scan(Some(d), false).key_bounds(), None);
        assert_eq!(scan(Some(b), true).key_bounds(), None);
        assert_eq!(scan(Some(b"z"), false).key_bounds(), None);
    }

    #[test]
    fn collect_applies_limits_and_reports_truncation() {
        let entry = |k: &str| {
            Ok::<_, ()>(ScanEntry {
                key: k.as_bytes().to_vec(),
                record: Versioned::live(1, vec![0; 10]),
            })
        };
        let reply = scan(None, false)
            .collect([entry("b"), entry("c"), entry("d")])
            .unwrap();
        assert_eq!(reply.entries.len(), 2);
        assert!(reply.truncated);
        let reply = scan(None, false).collect([entry("b"), entry("c")]).unwrap();
        assert!(!reply.truncated);
        let mut tiny = scan(None, false);
        tiny.max_bytes = 1;
        let reply = tiny.collect([entry("b"), entry("c")]).unwrap();
        assert_eq!(reply.entries.len(), 1);
        assert!(reply.truncated);
    }
}

#[cfg(test)]
mod pull_tests {
    use super::*;

    fn entries(n: u8) -> Vec<Result<(Vec<u8>, Versioned), ()>> {
        (0..n)
            .map(|i| Ok((vec![i], Versioned::live(1, vec![0; 10]))))
            .collect()
    }

    #[test]
    fn pull_pages_filter_by_partition_and_resume_after_the_last_key_looked_at() {
        let request = PullRequest {
            table: 1,
            partition_count: 2,
            partitions: vec![1],
            after: None,
            max_keys: 4,
            max_bytes: 1 << 20,
            since: None,
        };
        assert!(request.is_valid());
        let odd = |k: &[u8]| Some(Partition(u32::from(k[0] % 2)));
        let reply = request.collect(entries(10), odd).unwrap();
        let keys: Vec<u8> = reply.entries.iter().map(|e| e.key[0]).collect();
        assert_eq!(keys, [1, 3]);
        assert_eq!(reply.next, Some(vec![3]));
        // The last page ends the table.
        let reply = request.collect(entries(3), odd).unwrap();
        assert_eq!(reply.next, None);
        // The byte bound stops after the entry that crosses it.
        let small = PullRequest {
            max_keys: 100,
            max_bytes: 30,
            ..request.clone()
        };
        let reply = small.collect(entries(10), odd).unwrap();
        assert_eq!(reply.entries.len(), 2);
        assert_eq!(reply.next, Some(vec![3]));
        // A catch-up asks only for what was written since: older records are looked at (and
        // count towards the page) but not sent.
        let versioned = |v: &[u64]| -> Vec<Result<(Vec<u8>, Versioned), ()>> {
            v.iter()
                .enumerate()
                .map(|(i, v)| Ok((vec![2 * i as u8 + 1], Versioned::live(*v, vec![0; 10]))))
                .collect()
        };
        let recent = PullRequest {
            since: Some(5),
            max_keys: 100,
            ..request.clone()
        };
        let reply = recent.collect(versioned(&[3, 9, 5, 6]), odd).unwrap();
        let keys: Vec<u8> = reply.entries.iter().map(|e| e.key[0]).collect();
        assert_eq!(keys, [3, 7], "versions 9 and 6, not 3 and 5");
        // Malformed requests are refused before any work.
        for bad in [
            PullRequest {
                partitions: vec![2, 1],
                ..request.clone()
            },
            PullRequest {
                partitions: vec![1, 1],
                ..request.clone()
            },
            PullRequest {
                partitions: vec![2],
                ..request.clone()
            },
            PullRequest {
                partition_count: 0,
                partitions: vec![],
                ..request.clone()
            },
            PullRequest {
                partition_count: MAX_PARTITIONS + 1,
                ..request.clone()
            },
        ] {
            assert!(!bad.is_valid(), "{bad:?}");
        }
    }
}
