//! The store: every record the node keeps, addressed by partition key.
//!
//! Chat logic calls the typed methods (`messages`, `users`, `groups`, `friends`, `push`); they
//! build [`WriteBatch`]es and reads that name each record's partition key. [`Store::write`],
//! [`Store::compare_and_swap`], [`Store::get`] and [`Store::scan`] go through the replication
//! coordinator (`cluster::replication`): each partition's operations go to its replicas and
//! return at a write quorum; reads merge a read quorum. This node's own replica is `replica`
//! (sled). Node-local tables (`Meta`, `PushOutbox`) are written here directly.
//!
//! Durability: a write returns only after its ops are durable on a write quorum of replicas,
//! or fails (`Timeout`, `Quorum`, ...; see [`StoreError::is_unavailable`]) and is safe to
//! retry. On each replica (and for node-local writes) "durable" means: in sled's memory, then
//! appended to the commit log and covered by one of its group-committed `fdatasync`s (`wal`).
//! sled itself is flushed only by the log's checkpoints, every `--checkpoint-interval-ms` or
//! `--checkpoint-mib` of log, and at shutdown; at start the log's remaining segments are
//! replayed into sled before anything is served.
//!
//! # Layout
//!
//! - `mod.rs`: [`Store`], batches, the coordinator calls, opening and replay at start.
//! - `replica`: [`StoreReplica`], this node's `LocalReplica` (the index's memory, then the log).
//! - `index`: where the replicated tables live between checkpoints: sled, or fjall
//!   (`--index`).
//! - `wal/`: the commit log (record format, segments, the writer, replay, checkpoints).
//! - `keys`, `records`: key layouts and record encodings; `messages`, `users`, `groups`,
//!   `friends`, `push`: the typed operations.
//!
//! Inbox entries live at *positions* (`user | position`): the inbox table is sealed
//! (`cluster::replication::seal`), so a sync's cursor is closed; a message refused as sealed
//! is written again at a new position (`messages`).

mod friends;
mod groups;
mod index;
pub mod keys;
mod messages;
mod push;
pub mod records;
mod replica;
mod users;
pub mod wal;

use std::collections::BTreeSet;
use std::ops::RangeInclusive;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cluster::clock::{Hlc, SkewGuard};
use cluster::replication::{
    CallError, Cas, CasError, CasOutcome, Coordinator, FailureReason, PeerReplicaClient,
    QuorumError, ReplicaOp, ScanSpec, SealPolicy, Sealer,
};
use cluster::{partition_of, Partition, PeerError};
use std::sync::OnceLock;

use crate::ids::{ClockSkew, IdGen};

pub use friends::Link;
pub use index::{Index, IndexKind};
pub use messages::{HistoryPage, SendOutcome, SyncPage};
pub use replica::StoreReplica;

/// The sled trees, one per record kind (README, "Architecture").
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
    /// `user | other`: friendships and friend requests, written on both users (value: a
    /// [`Link`] tag, see `friends`).
    Friends,
    /// `due ms | job id`: pending push notifications. Node-local, not replicated.
    PushOutbox,
}

pub(crate) const TABLES: [Table; 10] = [
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
    Engine(sled::Error),
    /// The fjall index failed (`--index fjall`).
    #[error("storage engine (fjall): {0}")]
    Fjall(fjall::Error),
    /// The commit log could not make a write durable.
    #[error("{0}")]
    Log(wal::LogError),
    /// The commit log could not be read or checkpointed at start or shutdown.
    #[error("commit log: {0}")]
    Checkpoint(wal::CheckpointError),
    /// The commit log's directory could not be set up or read at start.
    #[error("commit log {what} in {dir}: {source}")]
    LogDir {
        what: &'static str,
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the write was not durable within {0:?}")]
    Timeout(Duration),
    #[error("a stored record is unreadable: {0}")]
    Corrupt(String),
    #[error("too much contention on one record")]
    Contention,
    /// A read or write could not reach its quorum of replicas.
    #[error("the replicas needed are not reachable: {0}")]
    Quorum(QuorumError),
    /// A compare-and-swap got no definite answer from its partition's primary.
    #[error("the replicas needed are not reachable: {0}")]
    Cas(CasError),
    /// This node's clock is too far from its peers' to issue the write's version.
    #[error("{0}")]
    ClockSkew(ClockSkew),
    /// The store is not attached to the cluster yet (start-up).
    #[error("the store is not attached to the cluster yet")]
    NotAttached,
}

// The causes are part of each variant's message, so they are not also reported as a
// `source()` (that printed every store error twice in `{:#}` chains).
macro_rules! store_error_from {
    ($($variant:ident($cause:ty)),*) => {$(
        impl From<$cause> for StoreError {
            fn from(e: $cause) -> Self {
                StoreError::$variant(e)
            }
        }
    )*};
}
store_error_from!(
    Engine(sled::Error),
    Fjall(fjall::Error),
    Quorum(QuorumError),
    Cas(CasError),
    ClockSkew(ClockSkew)
);

impl StoreError {
    /// Whether the operation failed for want of replicas or time, so that retrying later is
    /// safe and may succeed (as opposed to a broken disk or record).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Timeout(_)
                | StoreError::Contention
                | StoreError::Quorum(_)
                | StoreError::Cas(_)
                | StoreError::ClockSkew(_)
                | StoreError::NotAttached
        )
    }
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

/// What [`Store::open`] needs besides the folder.
pub struct StoreOptions {
    /// This node's id (part of every id it issues).
    pub node_id: u16,
    /// The cluster's partition count.
    pub partitions: u32,
    /// How long a write may take to be durable.
    pub write_timeout: Duration,
    /// How far the inbox seal trails the clock (`--seal-window-ms`).
    pub seal_window: Duration,
    /// How far a peer's timestamp may pull the clock past the wall clock
    /// (`--max-clock-skew-ms`).
    pub max_clock_skew: Duration,
    /// The clock-skew guard (fed by gossip).
    pub guard: Arc<SkewGuard>,
    /// The commit log's directory and checkpoint pacing.
    pub log: wal::LogOptions,
    /// Bodies longer than this are stored once, in the history; inbox entries refer to them
    /// (`--inline-body-bytes`).
    pub inline_body_bytes: usize,
    /// The engine of the replicated tables for a new store (`--index`; `None`: the
    /// default). An existing store keeps its own, and refuses another one asked for.
    pub index: Option<IndexKind>,
}

/// The store's background tasks: the commit log's writer and checkpointer. Stop them with
/// [`StoreTasks::shutdown`] after [`Store::flush`].
pub struct StoreTasks {
    writer: wal::WriterHandle,
    checkpointer: wal::CheckpointerHandle,
}

impl StoreTasks {
    /// Stops the checkpointer, then the log writer (after the appends already queued), and
    /// waits for both. Peers may still hold handles to the store: their writes now fail
    /// (`Log(Stopped)`).
    pub async fn shutdown(self) {
        self.checkpointer.shutdown().await;
        self.writer.shutdown().await;
    }
}

/// The replication coordinator the store writes and reads through.
pub type Coord = Coordinator<StoreReplica, PeerReplicaClient>;

struct Inner {
    db: sled::Db,
    /// sled's trees by table id; the replicated ones are used only with `--index sled`
    /// (through `index`).
    trees: Vec<sled::Tree>,
    index: Arc<index::Index>,
    partitions: u32,
    log: wal::CommitLog,
    checkpoints: wal::Checkpoints,
    write_timeout: Duration,
    local: Arc<StoreReplica>,
    coord: OnceLock<Coord>,
    ids: Arc<IdGen>,
    /// The clock's durable lease found at open (ms since the id epoch; 0: a new store): the
    /// last run's clock never passed it.
    lease_at_open: u64,
    /// See [`StoreOptions::inline_body_bytes`].
    inline_body_bytes: usize,
}

/// The store handle; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

/// Meta key of the id generator's lease.
const ID_LEASE_KEY: &str = "id_lease_ms";
/// Tries of a compare-and-swap that reached a node that was not (yet) the primary, or did
/// not reach the primary at all (100 ms more pause before each: 1.5 s in all, about as long
/// as the others take to stop naming a node that has stopped as the primary).
const CAS_ATTEMPTS: u64 = 5;

/// No compare-and-swap is tried again after this long (an attempt that waits for a
/// connection to time out takes seconds).
const CAS_RETRY_WITHIN: Duration = Duration::from_secs(3);

/// Whether a failed compare-and-swap certainly did nothing, so that it may be sent again
/// (to whichever node is the primary then): the node asked was not the primary, or the
/// request never reached the primary (a connection it refused, or could not be made: a
/// primary that is stopping, after a drain, before the others stop naming it).
fn cas_did_nothing(e: &CasError) -> bool {
    match e {
        CasError::NotPrimary { .. } => true,
        CasError::Forward {
            reason: FailureReason::Failed(err),
            ..
        } => err
            .downcast_ref::<CallError<PeerError>>()
            .is_some_and(|c| matches!(c, CallError::Transport(p) if p.not_sent())),
        _ => false,
    }
}
/// Live records fetched per page of a scan.
const SCAN_PAGE: usize = 128;

/// Makes `dir` and everything in it private to this user (directories 0700, files 0600)
/// whatever the umask: the store holds password hashes and every message body. sled creates
/// files with the process umask; files it makes later are inside the 0700 directory.
pub fn restrict_permissions(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir)?;
    if meta.is_dir() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(dir)? {
            restrict_permissions(&entry?.path())?;
        }
    } else if meta.is_file() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

impl Store {
    /// Opens (or creates) the store in `dir` with this node's id generator (`node_id`), and
    /// replays the commit log (`opts.log`) into it before anything is served. The returned
    /// tasks are the log's writer and checkpointer; stop them
    /// with [`StoreTasks::shutdown`]. Replicated reads and writes work once [`Store::attach`]
    /// gave the store a coordinator.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<(Store, StoreTasks), StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(256 * 1024 * 1024)
            // Durability comes from the commit log and its checkpoints.
            .flush_every_ms(None)
            .open()?;
        restrict_permissions(dir).map_err(|e| StoreError::Engine(sled::Error::Io(e)))?;
        let trees = TABLES
            .iter()
            .map(|t| db.open_tree(t.tree_name()))
            .collect::<Result<Vec<_>, _>>()?;
        let index = Arc::new(index::Index::open(dir, opts.index, &trees)?);
        // Again for the index's files (fjall's directory, the engine's name).
        restrict_permissions(dir).map_err(|e| StoreError::Engine(sled::Error::Io(e)))?;
        let next_seq = replay_log(&db, dir, &trees, &index, &opts.log.dir)?;
        let full = Arc::new(tokio::sync::Notify::new());
        let (log, writer) = wal::CommitLog::start(
            opts.log.dir.clone(),
            next_seq,
            wal::START_PREALLOC.min(opts.log.checkpoint_bytes),
            opts.log.checkpoint_bytes,
            full.clone(),
        )
        .map_err(StoreError::Log)?;
        let (checkpoints, checkpointer) =
            wal::spawn_checkpointer(db.clone(), index.clone(), dir, log.clone(), &opts.log, full);
        let lease = trees[0]
            .get(ID_LEASE_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        let hlc = Arc::new(
            Hlc::new(opts.node_id, lease).with_max_ahead(opts.max_clock_skew.as_millis() as u64),
        );
        let sealer = Sealer::new(
            SealPolicy {
                table: Table::Inbox.id(),
                window_ms: opts.seal_window.as_millis() as u64,
            },
            hlc.clone(),
        );
        let ids = Arc::new(IdGen::new(hlc, opts.guard));
        let local = Arc::new(StoreReplica::new(
            index.clone(),
            log.clone(),
            opts.write_timeout,
            sealer,
        ));
        let store = Store {
            inner: Arc::new(Inner {
                db,
                trees,
                index,
                partitions: opts.partitions,
                log,
                checkpoints,
                write_timeout: opts.write_timeout,
                local,
                coord: OnceLock::new(),
                ids,
                lease_at_open: lease,
                inline_body_bytes: opts.inline_body_bytes,
            }),
        };
        let tasks = StoreTasks {
            writer,
            checkpointer,
        };
        Ok((store, tasks))
    }

    /// A clock reading (record version) older than every write this node can have missed
    /// while it was down: the last run's lease, less the lease's lead, the clock skew other
    /// nodes may have, and a margin for writes in flight when it stopped. `None` for a new
    /// store. A returning member's first catch-up pulls only records versioned after it.
    pub fn down_since(&self, max_clock_skew: Duration) -> Option<u64> {
        const IN_FLIGHT_MARGIN_MS: u64 = 60_000;
        let lease = self.inner.lease_at_open;
        if lease == 0 {
            return None;
        }
        let back = cluster::clock::LEASE_AHEAD_MS
            + IN_FLIGHT_MARGIN_MS
            + max_clock_skew.as_millis() as u64;
        Some(client_proto::MessageId::from_parts(lease.saturating_sub(back), 0, 0).0)
    }

    /// Keeps the clock's lease ahead of it (see `cluster::clock::Hlc`): persists the next
    /// lease durably when the clock asks for one. Call before serving and then about every
    /// half second.
    pub async fn keep_lease(&self) -> Result<(), StoreError> {
        let hlc = self.inner.ids.hlc();
        let Some(lease) = hlc.lease_wanted() else {
            return Ok(());
        };
        let mut record = wal::RecordBuilder::default();
        self.put_local(
            &mut record,
            Table::Meta,
            ID_LEASE_KEY.into(),
            Some(lease.to_be_bytes().into()),
        )?;
        self.durable(self.log_local(record).await?).await?;
        hlc.lease_granted(lease);
        Ok(())
    }

    /// This node's replica, for the replication service and the coordinator.
    pub fn local_replica(&self) -> Arc<StoreReplica> {
        self.inner.local.clone()
    }

    /// Gives the store its coordinator (once, at start).
    pub fn attach(&self, coord: Coord) {
        let _ = self.inner.coord.set(coord);
    }

    fn coord(&self) -> Result<&Coord, StoreError> {
        self.inner.coord.get().ok_or(StoreError::NotAttached)
    }

    /// The node's id generator (message, user, group ids and record versions).
    pub fn ids(&self) -> Arc<IdGen> {
        self.inner.ids.clone()
    }

    fn tree(&self, t: Table) -> &sled::Tree {
        &self.inner.trees[usize::from(t.id())]
    }

    /// The partition of a partition key.
    pub fn partition(&self, partition_key: &[u8]) -> Partition {
        partition_of(partition_key, self.inner.partitions)
    }

    /// Applies `batch` and returns once it is durable: node-local tables here, replicated
    /// ones at a write quorum of each partition's replicas.
    pub async fn write(&self, batch: WriteBatch) -> Result<(), StoreError> {
        let version = self.inner.ids.next()?.0;
        let mut local = wal::RecordBuilder::default();
        let mut per_partition: Vec<(Partition, Vec<ReplicaOp>)> = Vec::new();
        for op in batch.ops {
            if !op.table.replicated() {
                self.put_local(&mut local, op.table, op.key, op.value)?;
                continue;
            }
            let rop = match op.value {
                Some(v) => ReplicaOp::put(op.table.id(), op.key, v, version),
                None => ReplicaOp::delete(op.table.id(), op.key, version),
            };
            match per_partition.iter_mut().find(|(p, _)| *p == op.partition) {
                Some((_, ops)) => ops.push(rop),
                None => per_partition.push((op.partition, vec![rop])),
            }
        }
        // Queued for the log right after the sled writes, so that the log's order of writes
        // to one local key is the order they reached sled's memory (replay applies local ops
        // in log order).
        let local = self.log_local(local).await?;
        metrics::counter!("store_partition_writes_total").increment(per_partition.len() as u64);
        if !per_partition.is_empty() {
            self.coord()?
                .write_all(per_partition)
                .await
                .map_err(quorum_failed)?;
        }
        self.durable(local).await?;
        Ok(())
    }

    /// Sets `key` to `new` if it currently holds `old` (`None`: absent), durably at a write
    /// quorum (through the partition's primary). Returns `Ok(Err(current))` when the
    /// comparison failed.
    pub async fn compare_and_swap(
        &self,
        table: Table,
        partition_key: &[u8],
        key: &[u8],
        old: Option<&[u8]>,
        new: Option<Vec<u8>>,
    ) -> Result<Result<(), Option<Vec<u8>>>, StoreError> {
        metrics::counter!("store_partition_writes_total").increment(1);
        let cas = Cas {
            table: table.id(),
            key: key.to_vec(),
            expected: old.map(<[u8]>::to_vec),
            new,
            min_version: self.inner.ids.next()?.0,
        };
        // Views of who is primary differ for a moment while membership changes; a swap the
        // wrong node refused, or that never reached the primary, did nothing, so it is
        // retried after a pause.
        let partition = self.partition(partition_key);
        let mut attempt = 0;
        let started = tokio::time::Instant::now();
        let outcome = loop {
            match self.coord()?.compare_and_swap(partition, cas.clone()).await {
                Ok(o) => break o,
                Err(e)
                    if cas_did_nothing(&e)
                        && attempt < CAS_ATTEMPTS
                        && started.elapsed() < CAS_RETRY_WITHIN =>
                {
                    if !matches!(e, CasError::NotPrimary { .. }) {
                        metrics::counter!("store_cas_primary_unreachable_total").increment(1);
                        tracing::debug!(error = %e, attempt, "compare-and-swap did not reach the primary; retrying");
                    }
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => {
                    metrics::counter!("store_quorum_failures_total").increment(1);
                    return Err(StoreError::Cas(e));
                }
            }
        };
        Ok(match outcome {
            CasOutcome::Swapped { .. } => Ok(()),
            CasOutcome::Mismatch { current } => Err(current.and_then(|v| v.value)),
        })
    }

    /// Reads one record from a read quorum.
    pub async fn get(
        &self,
        table: Table,
        partition_key: &[u8],
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let got = self
            .coord()?
            .get(self.partition(partition_key), table.id(), key)
            .await
            .map_err(quorum_failed)?;
        Ok(got.and_then(|v| v.value))
    }

    /// Reads the records with keys in `range` (all in the partition of `partition_key`),
    /// ascending or descending, from read quorums, calling `visit` until it returns false.
    /// Returns the smallest seal among the replica answers read (for a sealed table: every
    /// write acknowledged at or below it was offered to `visit`, or lies beyond the last key
    /// visited when `visit` stopped early).
    pub async fn scan(
        &self,
        table: Table,
        partition_key: &[u8],
        range: RangeInclusive<Vec<u8>>,
        descending: bool,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<Option<u64>, StoreError> {
        let partition = self.partition(partition_key);
        let (start, end) = range.into_inner();
        let mut after = None;
        let mut seal: Option<Option<u64>> = None;
        loop {
            let spec = ScanSpec {
                table: table.id(),
                start: start.clone(),
                end: end.clone(),
                after: after.take(),
                descending,
                limit: SCAN_PAGE,
            };
            let page = self
                .coord()?
                .scan_sealed(partition, spec)
                .await
                .map_err(quorum_failed)?;
            let page_seal = page.seal;
            seal = Some(match (seal, page_seal) {
                (None, s) => s,
                (Some(Some(a)), Some(b)) => Some(a.min(b)),
                (Some(_), _) => None,
            });
            let full = page.entries.len() >= SCAN_PAGE;
            for entry in &page.entries {
                let Some(value) = &entry.record.value else {
                    continue;
                };
                if !visit(&entry.key, value)? {
                    return Ok(seal.flatten());
                }
            }
            match page.entries.last() {
                Some(last) if full => after = Some(last.key.clone()),
                _ => return Ok(seal.flatten()),
            }
        }
    }

    /// Scans a node-local table (no quorum), calling `visit` until it returns false.
    fn scan_local(
        &self,
        table: Table,
        range: RangeInclusive<Vec<u8>>,
        mut visit: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        for item in self.tree(table).range(range) {
            let (k, v) = item?;
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }

    /// Writes `key = value` (`None`: removes it) in a node-local table: into sled's memory,
    /// and into `record` for the commit log (as a `Versioned` at version 0; replay applies
    /// local ops in log order).
    fn put_local(
        &self,
        record: &mut wal::RecordBuilder,
        table: Table,
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    ) -> Result<(), StoreError> {
        let tree = self.tree(table);
        match &value {
            Some(v) => tree.insert(&key, v.as_slice())?,
            None => tree.remove(&key)?,
        };
        let logged = cluster::replication::Versioned { version: 0, value };
        record.push(table.id(), &key, &logged.to_bytes());
        Ok(())
    }

    /// Queues the node-local writes in `record` for the commit log (nothing if empty).
    async fn log_local(
        &self,
        record: wal::RecordBuilder,
    ) -> Result<Option<wal::Synced>, StoreError> {
        if record.is_empty() {
            return Ok(None);
        }
        let queued = self.inner.log.enqueue(record.finish());
        match tokio::time::timeout(self.inner.write_timeout, queued).await {
            Ok(Ok(synced)) => Ok(Some(synced)),
            Ok(Err(e)) => Err(StoreError::Log(e)),
            Err(_) => Err(StoreError::Timeout(self.inner.write_timeout)),
        }
    }

    /// Waits until a queued record is durable in the commit log, or the write timeout passes.
    async fn durable(&self, synced: Option<wal::Synced>) -> Result<(), StoreError> {
        let Some(synced) = synced else {
            return Ok(());
        };
        match tokio::time::timeout(self.inner.write_timeout, synced.wait()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Log(e)),
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
        T: records::Record,
        E: From<StoreError>,
    {
        for _ in 0..MAX_CAS_RETRIES {
            let old = self.get(table, partition_key, key).await?;
            let current = old.as_deref().map(records::decode::<T>).transpose()?;
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

    /// Flushes everything to disk and checkpoints the commit log (used at shutdown, so that
    /// the next start has nothing to replay).
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.inner
            .checkpoints
            .now()
            .await
            .map_err(StoreError::Checkpoint)
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0) + self.inner.index.extra_size_on_disk()
    }

    /// Refreshes the index's gauges (see [`Index::export_gauges`]).
    pub fn export_index_gauges(&self) {
        self.inner.index.export_gauges();
    }

    /// The engine of the replicated tables.
    pub fn index_kind(&self) -> IndexKind {
        self.inner.index.kind()
    }
}

/// Replays the commit log in `dir` into `index` and the node-local `trees` (newer versions
/// win, as in a replica apply; node-local writes in log order), flushes both and deletes the replayed segments. Returns the number of the next segment.
fn replay_log(
    db: &sled::Db,
    db_dir: &Path,
    trees: &[sled::Tree],
    index: &index::Index,
    dir: &Path,
) -> Result<u64, StoreError> {
    let dir_err = |what| {
        move |source| StoreError::LogDir {
            what,
            dir: dir.to_path_buf(),
            source,
        }
    };
    std::fs::create_dir_all(dir).map_err(dir_err("create the directory"))?;
    restrict_permissions(dir).map_err(dir_err("restrict permissions"))?;
    let started = std::time::Instant::now();
    let lanes = std::thread::available_parallelism().map_or(1, |n| n.get());
    let replayed = wal::replay(dir, lanes, |op| {
        let (Some(table), Some(tree)) = (
            TABLES.get(usize::from(op.table)),
            trees.get(usize::from(op.table)),
        ) else {
            return Err(StoreError::Corrupt(format!(
                "the commit log names table {}, which this build does not have",
                op.table
            )));
        };
        let incoming = cluster::replication::Versioned::from_bytes(op.versioned)
            .map_err(|e| StoreError::Corrupt(format!("a logged record: {e}")))?;
        if table.replicated() {
            return index.store_versioned(op.table, op.key, op.versioned, &incoming);
        }
        // A node-local write, replayed in log order (see `Store::put_local`).
        match incoming.value {
            Some(v) => tree.insert(op.key, v)?,
            None => tree.remove(op.key)?,
        };
        Ok(())
    })
    .map_err(|e| match e {
        wal::ReplayError::Apply(e) => e,
        wal::ReplayError::Io(source) => StoreError::LogDir {
            what: "read a segment",
            dir: dir.to_path_buf(),
            source,
        },
        e @ wal::ReplayError::Version { .. } => StoreError::Corrupt(e.to_string()),
    })?;
    metrics::counter!("store_log_replayed_records_total").increment(replayed.records);
    let next = replayed.next_seq();
    let flush_started = std::time::Instant::now();
    if !replayed.segments.is_empty() {
        wal::flush_index(db, index, db_dir).map_err(StoreError::Checkpoint)?;
        wal::delete_segments_below(dir, next).map_err(dir_err("delete replayed segments"))?;
    }
    tracing::info!(
        segments = replayed.segments.len(),
        records = replayed.records,
        ops = replayed.ops,
        bytes = replayed.bytes,
        bytes_cut = replayed.bytes_cut,
        lanes,
        apply_ms = replayed.applying.as_millis() as u64,
        flush_ms = flush_started.elapsed().as_millis() as u64,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "replayed the commit log into the store"
    );
    Ok(next)
}

fn quorum_failed(e: QuorumError) -> StoreError {
    metrics::counter!("store_quorum_failures_total").increment(1);
    StoreError::Quorum(e)
}
