//! The store: every record the node keeps, addressed by partition key.
//!
//! Chat logic calls the typed methods (in `messages` and `users`); they build [`WriteBatch`]es
//! and reads that name each record's partition key. Today the node holds every partition in
//! its own sled database; replication replaces the bodies of [`Store::write`],
//! [`Store::compare_and_swap`], [`Store::get`] and [`Store::scan`] (send each partition's
//! operations to its replicas, wait for a quorum) without touching chat logic.
//!
//! Durability: a write returns only after a group-committed flush that covers it (see
//! `commit`), or fails with [`StoreError::Timeout`] after the write timeout.

mod commit;
mod friends;
mod groups;
pub mod keys;
mod messages;
mod push;
pub mod records;
mod users;

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cluster::{partition_of, Partition};
use tokio::task::JoinHandle;

pub use commit::GroupCommit;
pub use messages::{HistoryPage, SendOutcome, SyncPage};

/// The sled trees, one per record kind (DESIGN.md, "Data and where it lives").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    /// Node-local facts (id lease, format version). Not replicated.
    Meta,
    Users,
    Usernames,
    History,
    Inbox,
    Idempotency,
    Groups,
    /// `user | group`: the groups a user belongs to (an index; the group record decides).
    UserGroups,
    /// `user | friend`: friendships, written on both users.
    Friends,
    /// `due ms | job id`: pending push notifications. Node-local, not replicated.
    PushOutbox,
}

const TABLES: [Table; 10] = [
    Table::Meta,
    Table::Users,
    Table::Usernames,
    Table::History,
    Table::Inbox,
    Table::Idempotency,
    Table::Groups,
    Table::UserGroups,
    Table::Friends,
    Table::PushOutbox,
];

impl Table {
    fn tree_name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Users => "users",
            Table::Usernames => "usernames",
            Table::History => "history",
            Table::Inbox => "inbox",
            Table::Idempotency => "idempotency",
            Table::Groups => "groups",
            Table::UserGroups => "user_groups",
            Table::Friends => "friends",
            Table::PushOutbox => "push_outbox",
        }
    }
}

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage engine: {0}")]
    Engine(#[from] sled::Error),
    #[error("flush failed: {0}")]
    Flush(Arc<sled::Error>),
    #[error("the write was not durable within {0:?}")]
    Timeout(Duration),
    #[error("a stored record is unreadable: {0}")]
    Corrupt(String),
    #[error("too much contention on one record")]
    Contention,
}

/// How often a read-modify-write of one record retries under contention.
const MAX_CAS_RETRIES: usize = 64;

/// A set of writes to apply and make durable together. Each write names its partition key.
#[derive(Default, Debug)]
pub struct WriteBatch {
    ops: Vec<Op>,
}

#[derive(Debug)]
struct Op {
    table: Table,
    partition: Partition,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

impl WriteBatch {
    /// Adds `key = value` in `table`, in the partition of `partition_key`.
    pub fn put(
        &mut self,
        store: &Store,
        table: Table,
        partition_key: &[u8],
        key: impl Into<Vec<u8>>,
        value: Vec<u8>,
    ) {
        self.ops.push(Op {
            table,
            partition: store.partition(partition_key),
            key: key.into(),
            value: Some(value),
        });
    }

    /// Removes `key` from `table`, in the partition of `partition_key`.
    pub fn delete(
        &mut self,
        store: &Store,
        table: Table,
        partition_key: &[u8],
        key: impl Into<Vec<u8>>,
    ) {
        self.ops.push(Op {
            table,
            partition: store.partition(partition_key),
            key: key.into(),
            value: None,
        });
    }

    /// How many distinct partitions this batch touches: the number of replica round trips
    /// it will cost once the store is replicated.
    pub fn partitions(&self) -> usize {
        self.ops
            .iter()
            .map(|o| o.partition)
            .collect::<BTreeSet<_>>()
            .len()
    }
}

struct Inner {
    db: sled::Db,
    trees: Vec<sled::Tree>,
    partitions: u32,
    commit: GroupCommit,
    write_timeout: Duration,
}

/// The store handle; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Opens (or creates) the store in `dir`. The returned task is the group-commit flusher; it
    /// ends once every clone of the store is dropped.
    pub fn open(
        dir: &Path,
        partitions: u32,
        write_timeout: Duration,
    ) -> Result<(Store, JoinHandle<()>), StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(256 * 1024 * 1024)
            // Durability comes from our own group-committed flushes.
            .flush_every_ms(None)
            .open()?;
        let trees = TABLES
            .iter()
            .map(|t| db.open_tree(t.tree_name()))
            .collect::<Result<Vec<_>, _>>()?;
        let (commit, task) = GroupCommit::spawn(db.clone());
        let store = Store {
            inner: Arc::new(Inner {
                db,
                trees,
                partitions,
                commit,
                write_timeout,
            }),
        };
        Ok((store, task))
    }

    fn tree(&self, t: Table) -> &sled::Tree {
        &self.inner.trees[TABLES.iter().position(|x| *x == t).unwrap_or(0)]
    }

    /// The partition of a partition key.
    pub fn partition(&self, partition_key: &[u8]) -> Partition {
        partition_of(partition_key, self.inner.partitions)
    }

    /// Where a record lives. Every partition is local on a single node; the replicated store
    /// routes by this.
    fn locate(&self, partition_key: &[u8]) -> Partition {
        self.partition(partition_key)
    }

    /// Applies `batch` and returns once it is durable.
    pub async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        metrics::counter!("store_partition_writes_total").increment(batch.partitions() as u64);
        let mut per_table: Vec<(Table, sled::Batch)> = Vec::new();
        for op in batch.ops {
            let idx = match per_table.iter().position(|(t, _)| *t == op.table) {
                Some(i) => i,
                None => {
                    per_table.push((op.table, sled::Batch::default()));
                    per_table.len() - 1
                }
            };
            match op.value {
                Some(v) => per_table[idx].1.insert(op.key, v),
                None => per_table[idx].1.remove(op.key),
            }
        }
        for (table, b) in per_table {
            self.tree(table).apply_batch(b)?;
        }
        self.durable().await
    }

    /// Sets `key` to `new` if it currently holds `old` (`None`: absent), durably. Returns
    /// `Ok(Err(current))` when the comparison failed.
    pub async fn compare_and_swap(
        &self,
        table: Table,
        partition_key: &[u8],
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<Result<(), Option<sled::IVec>>, StoreError> {
        self.locate(partition_key);
        metrics::counter!("store_partition_writes_total").increment(1);
        match self.tree(table).compare_and_swap(key, old, new)? {
            Ok(()) => {
                self.durable().await?;
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(e.current)),
        }
    }

    /// Reads one record.
    pub fn get(
        &self,
        table: Table,
        partition_key: &[u8],
        key: &[u8],
    ) -> Result<Option<sled::IVec>, StoreError> {
        self.locate(partition_key);
        Ok(self.tree(table).get(key)?)
    }

    /// Reads the records with keys in `range` (all in the partition of `partition_key`),
    /// ascending or descending, calling `visit` until it returns false.
    pub fn scan(
        &self,
        table: Table,
        partition_key: &[u8],
        range: RangeInclusive<Vec<u8>>,
        descending: bool,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        self.locate(partition_key);
        let iter = self.tree(table).range(range);
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = if descending {
            Box::new(iter.rev())
        } else {
            Box::new(iter)
        };
        for item in iter {
            let (k, v) = item?;
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Waits until everything written so far is on disk, or the write timeout passes.
    async fn durable(&self) -> Result<(), StoreError> {
        match tokio::time::timeout(self.inner.write_timeout, self.inner.commit.durable()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Flush(e)),
            Err(_) => Err(StoreError::Timeout(self.inner.write_timeout)),
        }
    }

    /// Applies `change` to the record at `key` atomically (compare-and-swap, retried on
    /// contention) and durably. `change` returns `Err` to abort without writing, `Ok(None)` to
    /// delete the record, `Ok(Some(new))` to replace it. Returns the new record (`None` when
    /// deleted), or `Err` from `change`; a missing record is passed to `change` as `None`.
    pub async fn update<T, E>(
        &self,
        table: Table,
        partition_key: &[u8],
        key: &[u8],
        mut change: impl FnMut(Option<T>) -> Result<Option<T>, E>,
    ) -> Result<Option<T>, E>
    where
        T: bincode::Encode + bincode::Decode<()>,
        E: From<StoreError>,
    {
        for _ in 0..MAX_CAS_RETRIES {
            let old = self.get(table, partition_key, key)?;
            let current = old.as_ref().map(|v| records::decode::<T>(v)).transpose()?;
            let new = change(current)?;
            let encoded = new.as_ref().map(records::encode);
            let swapped = self
                .compare_and_swap(table, partition_key, key, old.as_deref(), encoded)
                .await?;
            if swapped.is_ok() {
                return Ok(new);
            }
        }
        Err(StoreError::Contention.into())
    }

    /// Reads a node-local value.
    pub fn meta_get(&self, key: &str) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.tree(Table::Meta).get(key)?)
    }

    /// Writes a node-local value (durable with the next flush).
    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tree(Table::Meta).insert(key, value)?;
        Ok(())
    }

    /// Flushes everything to disk (used at shutdown).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.inner.commit.durable().await.map_err(StoreError::Flush)
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }
}
