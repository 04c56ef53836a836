//! This node's replica of the partitions it holds: `cluster::replication::LocalReplica` over
//! the store's index (`index`: sled, or fjall with `--index fjall`). Every replicated record
//! is stored as a `Versioned` (value or tombstone with its version); an incoming copy replaces
//! the stored one only if it is newer, so applying a batch twice or out of order is harmless.
//! An apply is durable once its record is in the commit log (`wal`).

use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use cluster::replication::{
    ApplyBatch, ApplyOutcome, ConditionalApply, ConditionalOutcome, LocalReplica, PullReply,
    PullRequest, ReadRequest, ScanEntry, ScanReply, ScanRequest, Sealed, Sealer, TableId,
    Versioned,
};
use cluster::{partition_of, Partition};

use super::index::Index;
use super::wal::{CommitLog, RecordBuilder};
use super::{StoreError, Table, TABLES};

/// This node's replica of the replicated tables.
pub struct StoreReplica {
    index: Arc<Index>,
    log: CommitLog,
    write_timeout: Duration,
    /// Seals the inbox table (`cluster::replication::seal`).
    sealer: Sealer,
}

impl StoreReplica {
    pub(super) fn new(
        index: Arc<Index>,
        log: CommitLog,
        write_timeout: Duration,
        sealer: Sealer,
    ) -> Self {
        StoreReplica {
            index,
            log,
            write_timeout,
            sealer,
        }
    }

    /// Waits until `record` (the ops just stored) is durable in the commit log.
    async fn log(&self, record: RecordBuilder) -> Result<(), StoreError> {
        if record.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(self.write_timeout, self.log.append(record.finish())).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Log(e)),
            Err(_) => Err(StoreError::Timeout(self.write_timeout)),
        }
    }
}

impl LocalReplica for StoreReplica {
    type Error = StoreError;

    /// Stores each op in the index's memory, then logs every op stored or found superseded
    /// (logged anyway, so that this write is durable on its own whether or not the newer
    /// copy's apply reaches the log) and waits for the log. Ops refused by the seal are not
    /// logged.
    async fn apply(&self, batch: ApplyBatch) -> Result<ApplyOutcome, StoreError> {
        let mut outcome = ApplyOutcome::Applied;
        let mut record = RecordBuilder::default();
        for op in &batch.ops {
            let incoming = op.record();
            let bytes = incoming.to_bytes();
            let store = || {
                self.index
                    .store_versioned(op.table, &op.key, &bytes, &incoming)
            };
            if batch.fresh && op.value.is_some() && self.sealer.seals(op.table) {
                match self.sealer.insert_fresh(&op.key, store) {
                    Ok(stored) => stored?,
                    Err(Sealed { seal }) => {
                        outcome = ApplyOutcome::Sealed { seal };
                        continue; // not stored, so not logged
                    }
                }
            } else {
                store()?;
            }
            record.push(op.table, &op.key, &bytes);
        }
        self.log(record).await?;
        Ok(outcome)
    }

    async fn apply_if(&self, request: ConditionalApply) -> Result<ConditionalOutcome, StoreError> {
        let bytes = request.op.record().to_bytes();
        let stale = self.index.store_if(
            request.op.table,
            &request.op.key,
            &bytes,
            request.if_version_at_most,
        )?;
        if let Some(current) = stale {
            return Ok(ConditionalOutcome::Stale { current });
        }
        let mut record = RecordBuilder::default();
        record.push(request.op.table, &request.op.key, &bytes);
        self.log(record).await?;
        Ok(ConditionalOutcome::Applied)
    }

    async fn read(&self, request: ReadRequest) -> Result<Option<Versioned>, StoreError> {
        self.index.get(request.table, &request.key)
    }

    async fn pull(&self, request: PullRequest) -> Result<PullReply, StoreError> {
        let table = TABLES
            .get(usize::from(request.table))
            .copied()
            .ok_or_else(|| StoreError::Corrupt(format!("no table {}", request.table)))?;
        let start = match &request.after {
            Some(after) => Bound::Excluded(after.clone()),
            None => Bound::Unbounded,
        };
        let count = request.partition_count;
        let iter = self
            .index
            .range(request.table, start, Bound::Unbounded, false)?;
        request.collect(iter, |key| -> Option<Partition> {
            Some(partition_of(table.partition_key(key)?, count))
        })
    }

    async fn scan(&self, request: ScanRequest) -> Result<ScanReply, StoreError> {
        let Some((lower, upper)) = request.key_bounds() else {
            return Ok(ScanReply::default());
        };
        let owned = |b: Bound<&[u8]>| match b {
            Bound::Included(k) => Bound::Included(k.to_vec()),
            Bound::Excluded(k) => Bound::Excluded(k.to_vec()),
            Bound::Unbounded => Bound::Unbounded,
        };
        let read = || {
            let iter = self.index.range(
                request.table,
                owned(lower),
                owned(upper),
                request.descending,
            )?;
            request.collect(iter.map(|item| {
                let (key, record) = item?;
                Ok(ScanEntry { key, record })
            }))
        };
        if self.sealer.seals(request.table) {
            // One stream (a user's inbox) per scan: the seal is taken under its lock.
            let (reply, seal) = self.sealer.scan(&request.start, read);
            return reply.map(|r| ScanReply {
                seal: Some(seal),
                ..r
            });
        }
        read()
    }
}

impl Table {
    /// The partition key inside a key of this table (see `keys`): the whole key for user,
    /// username and group records, the conversation before the message id for history, the
    /// owning user's 8 bytes for the per-user tables. `None` for node-local tables and keys
    /// too short to be this table's.
    pub fn partition_key(self, key: &[u8]) -> Option<&[u8]> {
        match self {
            Table::Users | Table::Usernames | Table::Groups => Some(key),
            Table::History => key.get(..key.len().checked_sub(8).filter(|n| *n > 0)?),
            Table::Inbox | Table::Idempotency | Table::UserGroups | Table::Friends => key.get(..8),
            Table::Meta | Table::PushOutbox => None,
        }
    }

    /// Whether the table is replicated (the others are node-local).
    pub fn replicated(self) -> bool {
        !matches!(self, Table::Meta | Table::PushOutbox)
    }

    /// The table's id on the wire and in replica messages.
    pub fn id(self) -> TableId {
        TABLES.iter().position(|t| *t == self).unwrap_or(0) as TableId
    }
}

#[cfg(test)]
mod tests {
    use client_proto::ids::{ConversationId, GroupId, MessageId, Position, UserId};

    use super::super::keys;
    use super::*;

    #[test]
    fn every_replicated_key_names_its_partition_key() {
        let (u, v, m) = (UserId(7), UserId(9), MessageId(1 << 40));
        let conv = ConversationId::direct(u, v);
        let group = ConversationId::Group(GroupId(5));
        let user = keys::user(u);
        let cases: Vec<(Table, Vec<u8>, Vec<u8>)> = vec![
            (Table::Users, user.to_vec(), user.to_vec()),
            (Table::Usernames, b"alice".to_vec(), b"alice".to_vec()),
            (
                Table::History,
                keys::history(&conv, m),
                keys::conversation(&conv),
            ),
            (
                Table::History,
                keys::history(&group, m),
                keys::conversation(&group),
            ),
            (
                Table::Inbox,
                keys::inbox(u, Position(m.0)).to_vec(),
                user.to_vec(),
            ),
            (
                Table::Idempotency,
                keys::idempotency(u, "c-1"),
                user.to_vec(),
            ),
            (
                Table::Groups,
                keys::group(GroupId(5)).to_vec(),
                keys::group(GroupId(5)).to_vec(),
            ),
            (
                Table::UserGroups,
                keys::user_group(u, GroupId(5)).to_vec(),
                user.to_vec(),
            ),
            (Table::Friends, keys::pair(u, v).to_vec(), user.to_vec()),
        ];
        for (table, key, partition_key) in cases {
            assert_eq!(
                table.partition_key(&key),
                Some(&partition_key[..]),
                "{table:?}"
            );
        }
        assert_eq!(Table::Meta.partition_key(b"x"), None);
        assert_eq!(Table::PushOutbox.partition_key(b"x"), None);
        assert_eq!(Table::History.partition_key(&[1; 8]), None);
    }
}
