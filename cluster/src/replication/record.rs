//! Replicated records: the versioned value every replica stores, the operation that carries
//! one to a replica, and the one merge rule all copies converge by.
//!
//! There is a single rule for every table: the copy with the highest [`Versioned::rank`]
//! wins (version first; at equal versions a tombstone beats a value, then the larger value
//! bytes win, so any two replicas that saw the same writes agree, in any order).
//!
//! - **Mutable records** (users, groups, username claims) carry a version the caller supplies
//!   (an HLC / message-id-like number that grows with every change): last writer wins, and a
//!   delete is a tombstone with its own version, so an older value on a lagging replica cannot
//!   come back.
//! - **Immutable records** (history, inbox, idempotency entries) are written once under a key
//!   that names them (e.g. `conversation | message id`): use any fixed version (the message
//!   id, or 0) and never delete. Merging copies is then a union by key.

use bincode::{Decode, Encode};

/// A table number on the wire. The node maps its tables to these; they are part of the
/// replication wire format.
pub type TableId = u8;

/// A value with the version that orders it against other copies; `value: None` is a
/// tombstone (a delete that must win over older values).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Encode, Decode)]
pub struct Versioned {
    /// Orders writes of one key; supplied by the writer (higher is newer).
    pub version: u64,
    /// The record, or `None` for a tombstone.
    pub value: Option<Vec<u8>>,
}

impl Versioned {
    /// A live value.
    pub fn live(version: u64, value: Vec<u8>) -> Self {
        Self {
            version,
            value: Some(value),
        }
    }

    /// A tombstone.
    pub fn tombstone(version: u64) -> Self {
        Self {
            version,
            value: None,
        }
    }

    /// True for a delete marker.
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }

    /// The total order copies merge by: version, then tombstone over value, then value bytes.
    pub fn rank(&self) -> (u64, bool, Option<&[u8]>) {
        (self.version, self.is_tombstone(), self.value.as_deref())
    }

    /// True when `self` must replace `other` (strictly ranks higher).
    pub fn supersedes(&self, other: &Versioned) -> bool {
        self.rank() > other.rank()
    }

    /// The winner of two copies. Commutative, associative and idempotent.
    pub fn merge(self, other: Versioned) -> Versioned {
        if other.supersedes(&self) {
            other
        } else {
            self
        }
    }

    /// What a replica holding `stored` must keep after receiving `incoming`: `true` when
    /// `incoming` should be written. Replica implementations call this (under their own
    /// per-key atomicity) so applying is idempotent and order-independent.
    pub fn should_store(stored: Option<&Versioned>, incoming: &Versioned) -> bool {
        match stored {
            Some(s) => incoming.supersedes(s),
            None => true,
        }
    }

    /// Encodes for storage on a replica (the node's sled value): bincode, standard config.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Encoding into a Vec cannot fail for this type.
        bincode::encode_to_vec(self, bincode::config::standard()).unwrap_or_default()
    }

    /// Decodes what [`Versioned::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, bincode::error::DecodeError> {
        let (v, used) = bincode::decode_from_slice(bytes, bincode::config::standard())?;
        if used != bytes.len() {
            return Err(bincode::error::DecodeError::OtherString(format!(
                "{} trailing bytes after a versioned record",
                bytes.len() - used
            )));
        }
        Ok(v)
    }
}

/// One write to one key of a partition, as sent to its replicas.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ReplicaOp {
    /// The table ([`TableId`]).
    pub table: TableId,
    /// The record's key inside the table (which embeds its partition key).
    pub key: Vec<u8>,
    /// The new value, or `None` to delete (stored as a tombstone).
    pub value: Option<Vec<u8>>,
    /// The write's version (see the module docs).
    pub version: u64,
}

impl ReplicaOp {
    /// Sets `key` to `value` at `version`.
    pub fn put(table: TableId, key: Vec<u8>, value: Vec<u8>, version: u64) -> Self {
        Self {
            table,
            key,
            value: Some(value),
            version,
        }
    }

    /// Deletes `key` at `version` (a tombstone).
    pub fn delete(table: TableId, key: Vec<u8>, version: u64) -> Self {
        Self {
            table,
            key,
            value: None,
            version,
        }
    }

    /// The versioned record this op stores.
    pub fn record(&self) -> Versioned {
        Versioned {
            version: self.version,
            value: self.value.clone(),
        }
    }

    /// Rebuilds an op from a key and a record (read repair, hinted handoff).
    pub fn from_record(table: TableId, key: Vec<u8>, record: Versioned) -> Self {
        Self {
            table,
            key,
            value: record.value,
            version: record.version,
        }
    }

    /// Bytes this op takes on the wire, roughly (for batching limits).
    pub fn size(&self) -> usize {
        self.key.len() + self.value.as_ref().map_or(0, Vec::len) + 16
    }
}

/// One record a scan returned: its key and versioned value (tombstones included on the
/// replica wire; [`crate::replication::Coordinator::scan`] drops them).
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub struct ScanEntry {
    /// The record's key.
    pub key: Vec<u8>,
    /// Its value and version.
    pub record: Versioned,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn versioned() -> impl Strategy<Value = Versioned> {
        (
            0u64..4,
            proptest::option::of(proptest::collection::vec(0u8..3, 0..3)),
        )
            .prop_map(|(version, value)| Versioned { version, value })
    }

    #[test]
    fn higher_version_wins_and_tombstones_beat_values_at_a_tie() {
        let old = Versioned::live(1, b"old".to_vec());
        let new = Versioned::live(2, b"new".to_vec());
        assert_eq!(old.clone().merge(new.clone()), new);
        assert_eq!(new.clone().merge(old.clone()), new);
        let gone = Versioned::tombstone(2);
        assert_eq!(new.clone().merge(gone.clone()), gone);
        assert_eq!(gone.clone().merge(Versioned::live(1, vec![])), gone);
        assert!(Versioned::should_store(None, &old));
        assert!(!Versioned::should_store(Some(&new), &old));
        assert!(!Versioned::should_store(Some(&new), &new));
    }

    #[test]
    fn storage_bytes_round_trip() {
        for v in [
            Versioned::live(7, b"x".to_vec()),
            Versioned::tombstone(u64::MAX),
        ] {
            assert_eq!(Versioned::from_bytes(&v.to_bytes()).unwrap(), v);
        }
        let mut bytes = Versioned::tombstone(1).to_bytes();
        bytes.push(0);
        assert!(Versioned::from_bytes(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn merge_is_a_semilattice(a in versioned(), b in versioned(), c in versioned()) {
            prop_assert_eq!(a.clone().merge(b.clone()), b.clone().merge(a.clone()));
            prop_assert_eq!(
                a.clone().merge(b.clone()).merge(c.clone()),
                a.clone().merge(b.clone().merge(c.clone()))
            );
            prop_assert_eq!(a.clone().merge(a.clone()), a);
        }
    }
}
