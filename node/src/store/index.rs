//! The index of the replicated tables: where a replica's records live between checkpoints of
//! the commit log. fjall, an LSM engine (the default for a new store since it was measured
//! against sled, docs/benchmarks.md: on 3 nodes ~40% more sends per second at ~25% less CPU
//! each, and no refusals), or sled (`--index sled`, and every store made before the setting
//! existed). The node-local tables (`meta`, `push_outbox`) stay in sled whatever the index.
//!
//! Both keep the replicas' merge rule: a record replaces the stored one only if it is newer
//! (`Versioned::should_store`). sled does it with compare-and-swap; fjall has none, so each
//! write holds one of [`STRIPES`] locks (chosen by key) across its read and its insert.
//!
//! The index is never the durability point: the commit log is. A checkpoint makes the index
//! durable ([`Index::persist`]) before it deletes the log segments it covers.

use std::ops::Bound;
use std::path::Path;

use cluster::replication::{TableId, Versioned};

use super::{StoreError, TABLES};

/// Which engine holds the replicated tables (`--index`).
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IndexKind {
    /// sled 0.34, a B-tree: every record a compare-and-swap.
    Sled,
    /// fjall 3, an LSM tree: records go to a memtable and its journal.
    #[default]
    Fjall,
}

impl IndexKind {
    fn name(self) -> &'static str {
        match self {
            IndexKind::Sled => "sled",
            IndexKind::Fjall => "fjall",
        }
    }
}

/// Locks that serialize fjall writes to one key (read, compare versions, insert).
const STRIPES: usize = 256;

/// The longest key fjall takes (it asserts on longer ones; sled takes any). Keys a peer sends
/// are checked against it, and against being empty, for both engines alike.
const MAX_KEY: usize = u16::MAX as usize;

/// Refuses a key no record of this store has: empty, or longer than fjall takes. A peer can
/// send any key; fjall would panic on these (and an empty one, journaled before the panic,
/// would poison its journal and fail every start after).
fn check_key(key: &[u8]) -> Result<(), StoreError> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(StoreError::Corrupt(format!(
            "a key of {} bytes: keys are 1 to {MAX_KEY} bytes",
            key.len()
        )));
    }
    Ok(())
}

/// Refuses a range bound longer than fjall takes (an empty bound is fine).
fn check_bound(bound: &Bound<Vec<u8>>) -> Result<(), StoreError> {
    match bound {
        Bound::Included(k) | Bound::Excluded(k) if k.len() > MAX_KEY => Err(StoreError::Corrupt(
            format!("a range bound of {} bytes: at most {MAX_KEY}", k.len()),
        )),
        _ => Ok(()),
    }
}

/// The file in the data directory that names the index its replicated records are in.
const KIND_FILE: &str = "index";

/// The replicated tables' records, in one engine.
pub enum Index {
    /// sled's trees, indexed by table id (node-local tables included, never used here).
    Sled(Vec<sled::Tree>),
    Fjall {
        db: fjall::Database,
        /// Indexed by table id; `None` for node-local tables.
        keyspaces: Vec<Option<fjall::Keyspace>>,
        stripes: Box<[parking_lot::Mutex<()>]>,
    },
}

fn decode(bytes: &[u8]) -> Result<Versioned, StoreError> {
    Versioned::from_bytes(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// Records of one range, in key order or reversed.
pub type Records<'a> = Box<dyn Iterator<Item = Result<(Vec<u8>, Versioned), StoreError>> + 'a>;

impl Index {
    /// Opens the index of the store in `dir` (whose sled trees are `trees`): the engine the
    /// store was made with, recorded in `dir` (sled for a store made before the setting
    /// existed, which has records in sled). A new store is made with `wanted`, or the
    /// default. A `wanted` engine other than the store's is refused rather than opened empty.
    pub fn open(
        dir: &Path,
        wanted: Option<IndexKind>,
        trees: &[sled::Tree],
    ) -> Result<Index, StoreError> {
        let kind = match read_kind(dir)? {
            Some(k) => k,
            None => {
                // Not recorded: a store with fjall's directory is fjall's (its record was
                // lost); one made before the setting existed is sled's (it has records in
                // sled: a node that ever served has its clock's lease there); only a new store
                // takes `wanted`. Recorded now, so that the choice never changes.
                let kind = if dir.join("fjall").exists() {
                    IndexKind::Fjall
                } else if trees.iter().any(|t| !t.is_empty()) {
                    IndexKind::Sled
                } else {
                    wanted.unwrap_or_default()
                };
                write_kind(dir, kind)?;
                kind
            }
        };
        if let Some(wanted) = wanted.filter(|w| *w != kind) {
            return Err(StoreError::Corrupt(format!(
                "this data directory's replicated records are in the {} index; \
                 it cannot be opened with --index {} (the records would not be found)",
                kind.name(),
                wanted.name()
            )));
        }
        match kind {
            IndexKind::Sled => Ok(Index::Sled(trees.to_vec())),
            IndexKind::Fjall => {
                let db = fjall::Database::builder(dir.join("fjall"))
                    .cache_size(256 * 1024 * 1024)
                    // Durability comes from the commit log and its checkpoints.
                    .manual_journal_persist(true)
                    .open()?;
                let keyspaces = TABLES
                    .iter()
                    .map(|t| {
                        t.replicated()
                            .then(|| {
                                db.keyspace(t.tree_name(), || {
                                    // Each insert would otherwise write its journal entry to
                                    // the OS at once (a `write` per insert, ~8% of a node's
                                    // CPU at max rate); buffered, the journal is written in
                                    // 8 KiB blocks and synced by `persist`. A keyspace keeps
                                    // the setting it was created with.
                                    fjall::KeyspaceCreateOptions::default()
                                        .manual_journal_persist(true)
                                })
                            })
                            .transpose()
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let stripes = (0..STRIPES).map(|_| parking_lot::Mutex::new(())).collect();
                Ok(Index::Fjall {
                    db,
                    keyspaces,
                    stripes,
                })
            }
        }
    }

    /// Stores `incoming` (encoded as `bytes`) at `key` if it is newer than the stored copy:
    /// the replicas' merge rule, also used by the log's replay. Most keys are new (history
    /// and inbox entries are written once), so sled's first try inserts only if the key is
    /// absent, which saves reading it first.
    pub fn store_versioned(
        &self,
        table: TableId,
        key: &[u8],
        bytes: &[u8],
        incoming: &Versioned,
    ) -> Result<(), StoreError> {
        check_key(key)?;
        match self {
            Index::Sled(trees) => {
                let tree = sled_tree(trees, table)?;
                let mut old = match tree.compare_and_swap(key, None::<&[u8]>, Some(bytes))? {
                    Ok(()) => return Ok(()),
                    Err(conflict) => conflict.current,
                };
                loop {
                    let stored = old.as_deref().map(decode).transpose()?;
                    if !Versioned::should_store(stored.as_ref(), incoming) {
                        return Ok(());
                    }
                    match tree.compare_and_swap(key, old, Some(bytes))? {
                        Ok(()) => return Ok(()),
                        Err(conflict) => old = conflict.current,
                    }
                }
            }
            Index::Fjall {
                keyspaces, stripes, ..
            } => fjall_update(keyspaces, stripes, table, key, |ks, stored| {
                if Versioned::should_store(stored.as_ref(), incoming) {
                    ks.insert(key, bytes)?;
                }
                Ok(())
            }),
        }
    }

    /// Stores `bytes` at `key` if the stored copy's version is at most `if_version_at_most`
    /// (or there is none); otherwise returns the stored copy.
    pub fn store_if(
        &self,
        table: TableId,
        key: &[u8],
        bytes: &[u8],
        if_version_at_most: u64,
    ) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        match self {
            Index::Sled(trees) => {
                let tree = sled_tree(trees, table)?;
                loop {
                    let old = tree.get(key)?;
                    let stored = old.as_deref().map(decode).transpose()?;
                    if let Some(current) = stored.filter(|s| s.version > if_version_at_most) {
                        return Ok(Some(current));
                    }
                    if tree.compare_and_swap(key, old, Some(bytes))?.is_ok() {
                        return Ok(None);
                    }
                }
            }
            Index::Fjall {
                keyspaces, stripes, ..
            } => fjall_update(keyspaces, stripes, table, key, |ks, stored| {
                if let Some(current) = stored.filter(|s| s.version > if_version_at_most) {
                    return Ok(Some(current));
                }
                ks.insert(key, bytes)?;
                Ok(None)
            }),
        }
    }

    /// The stored copy of one key, tombstones included.
    pub fn get(&self, table: TableId, key: &[u8]) -> Result<Option<Versioned>, StoreError> {
        check_key(key)?;
        match self {
            Index::Sled(trees) => sled_tree(trees, table)?
                .get(key)?
                .map(|v| decode(&v))
                .transpose(),
            Index::Fjall { keyspaces, .. } => keyspace(keyspaces, table)?
                .get(key)?
                .map(|v| decode(&v))
                .transpose(),
        }
    }

    /// The records of `table` with keys within the bounds, ascending or descending.
    pub fn range(
        &self,
        table: TableId,
        lower: Bound<Vec<u8>>,
        upper: Bound<Vec<u8>>,
        descending: bool,
    ) -> Result<Records<'_>, StoreError> {
        check_bound(&lower)?;
        check_bound(&upper)?;
        fn boxed<'a, I>(iter: I, descending: bool) -> Records<'a>
        where
            I: DoubleEndedIterator<Item = Result<(Vec<u8>, Versioned), StoreError>> + 'a,
        {
            if descending {
                Box::new(iter.rev())
            } else {
                Box::new(iter)
            }
        }
        match self {
            Index::Sled(trees) => {
                let range = sled_tree(trees, table)?.range::<Vec<u8>, _>((lower, upper));
                Ok(boxed(
                    range.map(|item| {
                        let (k, v) = item?;
                        Ok((k.to_vec(), decode(&v)?))
                    }),
                    descending,
                ))
            }
            Index::Fjall { keyspaces, .. } => {
                let range = keyspace(keyspaces, table)?.range::<Vec<u8>, _>((lower, upper));
                Ok(boxed(
                    range.map(|guard| {
                        let (k, v) = guard.into_inner()?;
                        Ok((k.to_vec(), decode(&v)?))
                    }),
                    descending,
                ))
            }
        }
    }

    /// Makes everything stored so far durable (a checkpoint's step before the log segments
    /// it covers are deleted). sled's trees are flushed with the node-local tables'
    /// (`wal::flush_sled`), so only fjall has work here.
    pub fn persist(&self) -> Result<(), fjall::Error> {
        match self {
            Index::Sled(_) => Ok(()),
            Index::Fjall { db, .. } => db.persist(fjall::PersistMode::SyncAll),
        }
    }

    /// Bytes fjall's files take (sled's are counted with the node-local tables').
    pub fn extra_size_on_disk(&self) -> u64 {
        match self {
            Index::Sled(_) => 0,
            Index::Fjall { db, .. } => db.disk_space().unwrap_or(0),
        }
    }

    /// Sets the gauges of the index's own work, for the metrics endpoint: fjall's write
    /// buffer, its sealed memtables waiting for a flush and its level-0 tables (writes are
    /// slowed at 20 and halted at 30 level-0 runs, and at 4 sealed memtables).
    pub fn export_gauges(&self) {
        let Index::Fjall { db, keyspaces, .. } = self else {
            return;
        };
        let open = keyspaces.iter().flatten();
        let sealed: usize = open.clone().map(|k| k.sealed_memtable_count()).sum();
        let l0 = open.map(|k| k.l0_table_count()).max().unwrap_or(0);
        metrics::gauge!("store_index_write_buffer_bytes").set(db.write_buffer_size() as f64);
        metrics::gauge!("store_index_sealed_memtables").set(sealed as f64);
        metrics::gauge!("store_index_l0_tables_max").set(l0 as f64);
        metrics::gauge!("store_index_flushes_queued").set(db.outstanding_flushes() as f64);
    }

    /// The engine.
    pub fn kind(&self) -> IndexKind {
        match self {
            Index::Sled(_) => IndexKind::Sled,
            Index::Fjall { .. } => IndexKind::Fjall,
        }
    }
}

fn sled_tree(trees: &[sled::Tree], table: TableId) -> Result<&sled::Tree, StoreError> {
    match TABLES.get(usize::from(table)) {
        Some(t) if t.replicated() => trees
            .get(usize::from(table))
            .ok_or_else(|| StoreError::Corrupt(format!("no tree for table {table}"))),
        _ => Err(StoreError::Corrupt(format!(
            "table {table} is not replicated"
        ))),
    }
}

fn keyspace(
    keyspaces: &[Option<fjall::Keyspace>],
    table: TableId,
) -> Result<&fjall::Keyspace, StoreError> {
    keyspaces
        .get(usize::from(table))
        .and_then(Option::as_ref)
        .ok_or_else(|| StoreError::Corrupt(format!("table {table} is not replicated")))
}

/// Runs `update` with the stored copy of `key` in `table`, holding the key's stripe lock (no
/// other fjall write to the key can come between its read and its write).
fn fjall_update<T>(
    keyspaces: &[Option<fjall::Keyspace>],
    stripes: &[parking_lot::Mutex<()>],
    table: TableId,
    key: &[u8],
    update: impl FnOnce(&fjall::Keyspace, Option<Versioned>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let ks = keyspace(keyspaces, table)?;
    let _key_lock = stripe(stripes, key).lock();
    let stored = ks.get(key)?.as_deref().map(decode).transpose()?;
    // fjall holds back writes by sleeping in the writer's thread (10–100 ms at a time) when
    // its flushes or compactions fall behind; here that is a tokio worker holding a stripe.
    // Slow writes are recorded so that an operator sees it. On a busy machine most are the
    // thread descheduled instead: the gauges of [`Index::export_gauges`] tell the two apart.
    let started = std::time::Instant::now();
    let updated = update(ks, stored);
    let took = started.elapsed();
    if took >= SLOW_WRITE {
        metrics::histogram!("store_index_slow_write_seconds").record(took.as_secs_f64());
    }
    updated
}

/// An index write slower than this is recorded in `store_index_slow_write_seconds`.
const SLOW_WRITE: std::time::Duration = std::time::Duration::from_millis(5);

fn stripe<'a>(stripes: &'a [parking_lot::Mutex<()>], key: &[u8]) -> &'a parking_lot::Mutex<()> {
    // FNV-1a: cheap, and spreads keys that differ only in their last bytes.
    let hash = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    &stripes[(hash % stripes.len() as u64) as usize]
}

fn read_kind(dir: &Path) -> Result<Option<IndexKind>, StoreError> {
    let path = dir.join(KIND_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => match s.trim() {
            "sled" => Ok(Some(IndexKind::Sled)),
            "fjall" => Ok(Some(IndexKind::Fjall)),
            other => Err(StoreError::Corrupt(format!(
                "{}: unknown index {other:?}",
                path.display()
            ))),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Engine(sled::Error::Io(e))),
    }
}

fn write_kind(dir: &Path, kind: IndexKind) -> Result<(), StoreError> {
    let path = dir.join(KIND_FILE);
    let tmp = dir.join(format!("{KIND_FILE}.tmp"));
    let io = |e| StoreError::Engine(sled::Error::Io(e));
    std::fs::write(&tmp, format!("{}\n", kind.name())).map_err(io)?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)
}

/// A store's sled and its trees as `Store::open` opens them (tests). A sled just dropped may
/// hold its file lock a moment longer (its threads let go of it), so opening is retried for
/// up to 2 s.
#[cfg(test)]
pub(super) fn sled_at(dir: &Path) -> (sled::Db, Vec<sled::Tree>) {
    let open = || sled::Config::new().path(dir).flush_every_ms(None).open();
    let mut tries = 0;
    let db = loop {
        match open() {
            Ok(db) => break db,
            Err(_) if tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("sled: {e}"),
        }
    };
    let trees = TABLES
        .iter()
        .map(|t| db.open_tree(t.tree_name()).expect("tree"))
        .collect();
    (db, trees)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Table;

    const KINDS: [IndexKind; 2] = [IndexKind::Sled, IndexKind::Fjall];

    fn open(dir: &Path, kind: IndexKind) -> (sled::Db, Index) {
        let (db, trees) = sled_at(dir);
        let index = Index::open(dir, Some(kind), &trees).expect("index");
        (db, index)
    }

    fn put(index: &Index, key: &[u8], v: &Versioned) {
        index
            .store_versioned(Table::History.id(), key, &v.to_bytes(), v)
            .expect("store");
    }

    fn version(index: &Index, key: &[u8]) -> Option<(u64, bool)> {
        let v = index.get(Table::History.id(), key).expect("get")?;
        Some((v.version, v.value.is_some()))
    }

    #[test]
    fn both_engines_keep_the_newer_copy_and_tombstones() {
        for kind in KINDS {
            let tmp = tempfile::tempdir().expect("tempdir");
            let (_db, index) = open(tmp.path(), kind);
            assert_eq!(index.kind(), kind);
            put(&index, b"k", &Versioned::live(5, b"five".to_vec()));
            put(&index, b"k", &Versioned::live(3, b"three".to_vec()));
            assert_eq!(version(&index, b"k"), Some((5, true)), "{kind:?}");
            put(&index, b"k", &Versioned::live(7, b"seven".to_vec()));
            assert_eq!(version(&index, b"k"), Some((7, true)), "{kind:?}");
            put(&index, b"k", &Versioned::tombstone(8));
            assert_eq!(version(&index, b"k"), Some((8, false)), "{kind:?}");
            put(&index, b"k", &Versioned::live(6, b"late".to_vec()));
            assert_eq!(version(&index, b"k"), Some((8, false)), "{kind:?}");
            // Node-local tables are not the index's.
            assert!(index.get(Table::Meta.id(), b"k").is_err(), "{kind:?}");
        }
    }

    #[test]
    fn both_engines_store_conditionally() {
        for kind in KINDS {
            let tmp = tempfile::tempdir().expect("tempdir");
            let (_db, index) = open(tmp.path(), kind);
            let t = Table::Idempotency.id();
            let v = |n: u64| Versioned::live(n, vec![n as u8]).to_bytes();
            assert_eq!(index.store_if(t, b"c", &v(4), 0).expect("first"), None);
            // The stored copy (4) is newer than allowed (3): refused, and the copy returned.
            let stale = index.store_if(t, b"c", &v(9), 3).expect("stale");
            assert_eq!(stale.map(|s| s.version), Some(4), "{kind:?}");
            assert_eq!(index.store_if(t, b"c", &v(9), 4).expect("swap"), None);
            assert_eq!(index.get(t, b"c").expect("get").map(|s| s.version), Some(9));
        }
    }

    #[test]
    fn both_engines_range_both_ways_within_bounds() {
        for kind in KINDS {
            let tmp = tempfile::tempdir().expect("tempdir");
            let (_db, index) = open(tmp.path(), kind);
            for (i, k) in [b"a", b"b", b"c", b"d"].iter().enumerate() {
                put(&index, *k, &Versioned::live(i as u64 + 1, vec![1]));
            }
            let keys = |descending| -> Vec<Vec<u8>> {
                index
                    .range(
                        Table::History.id(),
                        Bound::Excluded(b"a".to_vec()),
                        Bound::Included(b"c".to_vec()),
                        descending,
                    )
                    .expect("range")
                    .map(|r| r.expect("record").0)
                    .collect()
            };
            assert_eq!(keys(false), vec![b"b".to_vec(), b"c".to_vec()], "{kind:?}");
            assert_eq!(keys(true), vec![b"c".to_vec(), b"b".to_vec()], "{kind:?}");
        }
    }

    #[test]
    fn both_engines_refuse_keys_no_record_has_and_keep_working() {
        for kind in KINDS {
            let tmp = tempfile::tempdir().expect("tempdir");
            let (_db, index) = open(tmp.path(), kind);
            let v = Versioned::live(1, b"x".to_vec());
            let t = Table::History.id();
            for key in [Vec::new(), vec![7; MAX_KEY + 1]] {
                assert!(index.store_versioned(t, &key, &v.to_bytes(), &v).is_err());
                assert!(index.store_if(t, &key, &v.to_bytes(), 0).is_err());
                assert!(index.get(t, &key).is_err());
            }
            let long = Bound::Included(vec![7; MAX_KEY + 1]);
            assert!(index.range(t, long, Bound::Unbounded, false).is_err());
            // The longest key is fine, and the index still takes writes and makes them durable.
            put(&index, &[7; MAX_KEY], &v);
            put(&index, b"k", &v);
            assert_eq!(version(&index, b"k"), Some((1, true)), "{kind:?}");
            assert_eq!(version(&index, &[7; MAX_KEY]), Some((1, true)), "{kind:?}");
            index.persist().expect("persist");
        }
    }

    #[test]
    fn a_store_made_before_the_setting_stays_on_sled() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let (_db, trees) = sled_at(tmp.path());
        // An older node's store: replicated records in sled, no engine recorded.
        let v = Versioned::live(5, b"five".to_vec());
        Index::Sled(trees.clone())
            .store_versioned(Table::History.id(), b"k", &v.to_bytes(), &v)
            .expect("store");
        assert!(Index::open(tmp.path(), Some(IndexKind::Fjall), &trees).is_err());
        let index = Index::open(tmp.path(), None, &trees).expect("open");
        assert_eq!(index.kind(), IndexKind::Sled);
        assert_eq!(version(&index, b"k"), Some((5, true)));
        // The choice is recorded: it holds even once the records are gone.
        assert_eq!(read_kind(tmp.path()).expect("read"), Some(IndexKind::Sled));
        // A store that has only run (its clock's lease in `meta`), no replicated record yet,
        // is sled's too.
        let ran = tempfile::tempdir().expect("tempdir");
        let (_db3, trees) = sled_at(ran.path());
        trees[usize::from(Table::Meta.id())]
            .insert(b"id_lease_ms", &[1u8; 8])
            .expect("insert");
        let index = Index::open(ran.path(), None, &trees).expect("open ran");
        assert_eq!(index.kind(), IndexKind::Sled);
        // A new store without `--index` takes the default.
        let new = tempfile::tempdir().expect("tempdir");
        let (_db2, trees) = sled_at(new.path());
        let index = Index::open(new.path(), None, &trees).expect("open new");
        assert_eq!(index.kind(), IndexKind::default());
    }

    #[test]
    fn a_persisted_fjall_index_survives_a_reopen() {
        // One sled for the whole test: a dropped sled may hold its file lock a moment longer.
        let tmp = tempfile::tempdir().expect("tempdir");
        let (db, trees) = sled_at(tmp.path());
        {
            let index = Index::open(tmp.path(), Some(IndexKind::Fjall), &trees).expect("open");
            put(&index, b"k", &Versioned::live(5, b"five".to_vec()));
            index.persist().expect("persist");
        }
        let index = Index::open(tmp.path(), Some(IndexKind::Fjall), &trees).expect("reopen");
        assert_eq!(version(&index, b"k"), Some((5, true)));
        // A store made by fjall is not opened as sled's, even with its record of the engine
        // lost and records in sled's node-local tables.
        drop(index);
        std::fs::remove_file(tmp.path().join(KIND_FILE)).expect("remove the record");
        db.open_tree(Table::Meta.tree_name())
            .expect("meta")
            .insert(b"id_lease_ms", &[1u8; 8])
            .expect("insert");
        assert!(Index::open(tmp.path(), Some(IndexKind::Sled), &trees).is_err());
        // Without `--index`, the store's own engine.
        let index = Index::open(tmp.path(), None, &trees).expect("reopen without --index");
        assert_eq!(index.kind(), IndexKind::Fjall);
        assert_eq!(version(&index, b"k"), Some((5, true)));
    }
}
