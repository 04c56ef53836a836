use std::sync::Arc;
use std::time::Duration;

use cluster::replication::Versioned;
use tokio::sync::Notify;

use super::format::{RecordBuilder, SEGMENT_HEADER};
use super::*;
use crate::store::index::sled_at;
use crate::store::{replay_log, Index, IndexKind, Table, TABLES};

/// A record of one op: `key = value` at `version` in the history table.
fn record(key: &[u8], version: u64, value: &[u8]) -> Vec<u8> {
    let mut r = RecordBuilder::default();
    r.push(
        Table::History.id(),
        key,
        &Versioned::live(version, value.to_vec()).to_bytes(),
    );
    r.finish()
}

/// Everything a replay of `dir` applies, as `(key, version)`.
fn replayed(dir: &std::path::Path) -> (Vec<(Vec<u8>, u64)>, Replayed) {
    replayed_on(dir, 1)
}

/// Everything a replay of `dir` on `lanes` threads applies, as `(key, version)`, in the
/// order applied.
///
/// Before it, the same replay reading small blocks (so that records straddle blocks, and
/// some are larger than one) runs on copies of `dir`, and must apply the same ops in the same
/// order per key, report the same and cut the files to the same lengths.
fn replayed_on(dir: &std::path::Path, lanes: usize) -> (Vec<(Vec<u8>, u64)>, Replayed) {
    let log_bytes: u64 = segment::list(dir)
        .expect("list")
        .iter()
        .map(|s| std::fs::metadata(segment::path(dir, *s)).map_or(0, |m| m.len()))
        .sum();
    let blocks: &[usize] = if log_bytes <= 100_000 {
        &[1, 333, 4096]
    } else {
        &[4096]
    };
    let mut in_blocks = Vec::new();
    for block in blocks {
        let copy = tempfile::tempdir().expect("tempdir");
        for s in segment::list(dir).expect("list") {
            std::fs::copy(segment::path(dir, s), segment::path(copy.path(), s)).expect("copy");
        }
        in_blocks.push((*block, replayed_in(copy.path(), lanes, *block), copy));
    }
    let whole = replayed_in(dir, lanes, super::replay::BLOCK_FOR_TESTS);
    for (block, (ops, report), copy) in in_blocks {
        assert_eq!(per_key(&ops), per_key(&whole.0), "ops, blocks of {block}");
        let same = |r: &Replayed| Replayed {
            applying: Duration::ZERO,
            ..r.clone()
        };
        assert_eq!(same(&report), same(&whole.1), "report, blocks of {block}");
        for s in segment::list(dir).expect("list") {
            let len =
                |d: &std::path::Path| std::fs::metadata(segment::path(d, s)).map(|m| m.len()).ok();
            assert_eq!(len(copy.path()), len(dir), "segment {s}, blocks of {block}");
        }
    }
    whole
}

fn replayed_in(
    dir: &std::path::Path,
    lanes: usize,
    block: usize,
) -> (Vec<(Vec<u8>, u64)>, Replayed) {
    let ops = std::sync::Mutex::new(Vec::new());
    let report = super::replay::replay_in_blocks(dir, lanes, block, |op| {
        let v = Versioned::from_bytes(op.versioned).map_err(|e| e.to_string())?;
        ops.lock().unwrap().push((op.key.to_vec(), v.version));
        Ok::<_, String>(())
    })
    .expect("replay");
    (ops.into_inner().unwrap(), report)
}

/// Each key's versions in the order applied (the order a replay keeps).
fn per_key(ops: &[(Vec<u8>, u64)]) -> std::collections::BTreeMap<Vec<u8>, Vec<u64>> {
    let mut m: std::collections::BTreeMap<Vec<u8>, Vec<u64>> = Default::default();
    for (k, v) in ops {
        m.entry(k.clone()).or_default().push(*v);
    }
    m
}

async fn write_log(dir: &std::path::Path, records: &[Vec<u8>]) {
    let full = Arc::new(Notify::new());
    let (log, writer) = CommitLog::start(dir.to_path_buf(), 1, 0, u64::MAX, full).expect("start");
    for r in records {
        log.append(r.clone()).await.expect("append");
    }
    writer.shutdown().await;
}

fn records(n: u64) -> Vec<Vec<u8>> {
    (1..=n)
        .map(|i| record(format!("key-{i}").as_bytes(), i, &[i as u8; 200]))
        .collect()
}

fn keys(n: u64) -> Vec<(Vec<u8>, u64)> {
    (1..=n)
        .map(|i| (format!("key-{i}").into_bytes(), i))
        .collect()
}

#[tokio::test]
async fn appended_records_replay_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &records(50)).await;
    let (ops, report) = replayed(dir.path());
    assert_eq!(ops, keys(50));
    assert_eq!(report.records, 50);
    assert_eq!(report.bytes_cut, 0);
    assert_eq!(report.segments, vec![1]);
    assert_eq!(report.next_seq(), 2);
}

/// On several lanes every op is applied once, and the ops of one key in log order, also
/// across the chunks a long log is applied in.
#[tokio::test]
async fn a_replay_on_several_lanes_keeps_each_key_s_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 10 records of 7,000 ops: 70,000 ops over 13 keys, more than one chunk.
    let mut version = 0;
    let logged: Vec<Vec<u8>> = (0..10)
        .map(|_| {
            let mut r = RecordBuilder::default();
            for _ in 0..7_000 {
                version += 1;
                let key = format!("key-{}", version % 13);
                let value = Versioned::live(version, vec![1; 8]).to_bytes();
                r.push(Table::History.id(), key.as_bytes(), &value);
            }
            r.finish()
        })
        .collect();
    write_log(dir.path(), &logged).await;
    let (ops, report) = replayed_on(dir.path(), 3);
    assert_eq!(report.ops, 70_000);
    assert_eq!(ops.len(), 70_000);
    let mut last: std::collections::HashMap<Vec<u8>, u64> = Default::default();
    for (key, version) in ops {
        let before = last.insert(key.clone(), version).unwrap_or(0);
        assert!(
            version > before,
            "{key:?}: version {version} applied after {before}"
        );
    }
    assert_eq!(last.len(), 13);
}

/// An op that fails on one lane fails the replay with its error, and the segment is left as
/// it was (nothing cut, nothing deleted).
#[tokio::test]
async fn a_failed_op_on_one_lane_fails_the_replay_and_cuts_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_log(dir.path(), &records(50)).await;
    let segment = segment::path(dir.path(), 1);
    let len = std::fs::metadata(&segment).expect("segment").len();
    let result = replay(dir.path(), 3, |op| {
        if op.key == b"key-25" {
            return Err("no such table".to_string());
        }
        Ok(())
    });
    match result {
        Err(ReplayError::Apply(e)) => assert_eq!(e, "no such table"),
        other => panic!("expected the op's error, got {other:?}"),
    }
    assert_eq!(std::fs::metadata(&segment).expect("segment").len(), len);
}

#[tokio::test]
async fn concurrent_appends_share_syncs_and_all_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let full = Arc::new(Notify::new());
    let (log, writer) =
        CommitLog::start(dir.path().to_path_buf(), 1, 0, u64::MAX, full).expect("start");
    let tasks: Vec<_> = records(200)
        .into_iter()
        .map(|r| {
            let log = log.clone();
            tokio::spawn(async move { log.append(r).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("join").expect("append");
    }
    writer.shutdown().await;
    let (mut ops, _) = replayed(dir.path());
    ops.sort_by_key(|(_, v)| *v);
    assert_eq!(ops, keys(200));
}

#[tokio::test]
async fn a_torn_tail_is_cut_at_the_last_good_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recs = records(10);
    write_log(dir.path(), &recs).await;
    let path = segment::path(dir.path(), 1);
    let len = std::fs::metadata(&path).expect("stat").len();
    // The last record lost its final 7 bytes.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    file.set_len(len - 7).expect("truncate");
    let (ops, report) = replayed(dir.path());
    assert_eq!(ops, keys(9));
    assert_eq!(report.bytes_cut, recs[9].len() as u64 - 7);
    assert!(report.corrupt_segments.is_empty());
    // The file was cut there, so a second replay finds nothing to cut.
    let good = SEGMENT_HEADER + recs[..9].iter().map(Vec::len).sum::<usize>();
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), good as u64);
    let (again, report) = replayed(dir.path());
    assert_eq!(again, keys(9));
    assert_eq!(report.bytes_cut, 0);
}

#[tokio::test]
async fn a_flipped_byte_in_the_middle_cuts_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recs = records(10);
    write_log(dir.path(), &recs).await;
    let path = segment::path(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    // A byte inside the payload of the fourth record.
    let at = SEGMENT_HEADER + recs[..3].iter().map(Vec::len).sum::<usize>() + 40;
    bytes[at] ^= 0x20;
    std::fs::write(&path, &bytes).expect("write");
    let (ops, report) = replayed(dir.path());
    assert_eq!(ops, keys(3));
    assert_eq!(report.corrupt_segments, vec![1]);
    assert_eq!(
        report.bytes_cut,
        recs[3..].iter().map(Vec::len).sum::<usize>() as u64
    );
}

#[tokio::test]
async fn a_flipped_length_is_caught_by_the_checksum() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recs = records(5);
    write_log(dir.path(), &recs).await;
    let path = segment::path(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    let at = SEGMENT_HEADER + recs[..2].iter().map(Vec::len).sum::<usize>();
    bytes[at] ^= 0x01; // the length of the third record, one byte off
    std::fs::write(&path, &bytes).expect("write");
    let (ops, _) = replayed(dir.path());
    assert_eq!(ops, keys(2));
}

/// Writes `records` into a segment preallocated to `prealloc` bytes.
async fn write_preallocated(dir: &std::path::Path, prealloc: u64, records: &[Vec<u8>]) {
    let full = Arc::new(Notify::new());
    let (log, writer) =
        CommitLog::start(dir.to_path_buf(), 1, prealloc, u64::MAX, full).expect("start");
    for r in records {
        log.append(r.clone()).await.expect("append");
    }
    writer.shutdown().await;
}

#[tokio::test]
async fn a_preallocated_segment_is_written_in_place_and_its_zeros_are_not_a_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recs = records(20);
    let used: usize = recs.iter().map(Vec::len).sum();
    write_preallocated(dir.path(), 64 << 10, &recs).await;
    let path = segment::path(dir.path(), 1);
    // Written into the zeros, not after them.
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), 64 << 10);
    let (ops, report) = replayed(dir.path());
    assert_eq!(ops, keys(20));
    assert_eq!(report.bytes_cut, 0);
    assert!(report.corrupt_segments.is_empty());
    // Replay leaves the segment at its last record.
    let good = (SEGMENT_HEADER + used) as u64;
    assert_eq!(std::fs::metadata(&path).expect("stat").len(), good);

    // Records beyond the preallocation are appended.
    let dir = tempfile::tempdir().expect("tempdir");
    write_preallocated(dir.path(), 1024, &recs).await;
    let (ops, report) = replayed(dir.path());
    assert_eq!((ops, report.bytes_cut), (keys(20), 0));
}

#[tokio::test]
async fn a_torn_record_inside_preallocated_space_is_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recs = records(10);
    write_preallocated(dir.path(), 64 << 10, &recs).await;
    let path = segment::path(dir.path(), 1);
    let mut bytes = std::fs::read(&path).expect("read");
    // The last record's final page never reached the disk: its last 30 bytes are still the
    // preallocated zeros.
    let end = SEGMENT_HEADER + recs.iter().map(Vec::len).sum::<usize>();
    bytes[end - 30..end].fill(0);
    std::fs::write(&path, &bytes).expect("write");
    let (ops, report) = replayed(dir.path());
    assert_eq!(ops, keys(9));
    assert_eq!(
        report.bytes_cut,
        (bytes.len() - (end - recs[9].len())) as u64
    );
    assert!(report.corrupt_segments.is_empty());
}

/// A store's sled and its index of replicated tables, as `Store::open` makes them.
fn open_store(dir: &std::path::Path, kind: IndexKind) -> (sled::Db, Vec<sled::Tree>, Arc<Index>) {
    let (db, trees) = sled_at(dir);
    let index = Arc::new(Index::open(dir, Some(kind), &trees).expect("index"));
    (db, trees, index)
}

/// An index over sled's trees (the default).
fn sled_index(db: &sled::Db) -> Arc<Index> {
    let trees = TABLES
        .iter()
        .map(|t| db.open_tree(t.tree_name()).expect("tree"))
        .collect();
    Arc::new(Index::Sled(trees))
}

fn stored(index: &Index, key: &[u8]) -> Option<u64> {
    Some(index.get(Table::History.id(), key).expect("get")?.version)
}

/// Stores a history record as a replica apply does (before its log record).
fn put(index: &Index, key: &[u8], version: u64, value: &[u8]) {
    let v = Versioned::live(version, value.to_vec());
    index
        .store_versioned(Table::History.id(), key, &v.to_bytes(), &v)
        .expect("store");
}

const KINDS: [IndexKind; 2] = [IndexKind::Sled, IndexKind::Fjall];

#[tokio::test]
async fn replay_is_idempotent_and_newer_versions_win() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (db_dir, log_dir) = (tmp.path().join("db"), tmp.path().join("log"));
    std::fs::create_dir(&log_dir).expect("mkdir");
    // Two writes of `a` (versions 5 then 3: the older one arrived later) and one of `b`.
    write_log(
        &log_dir,
        &[
            record(b"a", 5, b"five"),
            record(b"a", 3, b"three"),
            record(b"b", 1, b"x"),
        ],
    )
    .await;
    let keep = tmp.path().join("copy");
    std::fs::create_dir(&keep).expect("mkdir");
    std::fs::copy(segment::path(&log_dir, 1), segment::path(&keep, 1)).expect("copy");
    for kind in KINDS {
        // Each engine replays copies of the segment (a replay deletes what it replayed).
        let (db_dir, log_dir, keep) = (
            db_dir.join(format!("{kind:?}")),
            keep.join(format!("log-{kind:?}")),
            keep.join(format!("keep-{kind:?}")),
        );
        for dir in [&log_dir, &keep] {
            std::fs::create_dir_all(dir).expect("mkdir");
            std::fs::copy(
                segment::path(&tmp.path().join("log"), 1),
                segment::path(dir, 1),
            )
            .expect("copy");
        }
        {
            let (db, trees, index) = open_store(&db_dir, kind);
            // `b` already holds a newer version than the log's.
            put(&index, b"b", 9, b"new");
            let next = replay_log(&db, &db_dir, &trees, &index, &log_dir).expect("replay");
            assert_eq!(next, 2);
            assert_eq!(stored(&index, b"a"), Some(5), "{kind:?}");
            assert_eq!(stored(&index, b"b"), Some(9), "{kind:?}");
            // Replayed segments are gone once the index holds them durably.
            assert_eq!(segment::list(&log_dir).expect("list"), Vec::<u64>::new());
            // Replaying the same segment again changes nothing.
            let next = replay_log(&db, &db_dir, &trees, &index, &keep).expect("replay again");
            assert_eq!(next, 2);
            assert_eq!(stored(&index, b"a"), Some(5), "{kind:?}");
            assert_eq!(stored(&index, b"b"), Some(9), "{kind:?}");
        }
        // The flush after the replay made it durable: a reopened index has it without the log.
        let (_db, trees, index) = open_store(&db_dir, kind);
        assert_eq!(stored(&index, b"a"), Some(5), "{kind:?}");
        assert_eq!(stored(&index, b"b"), Some(9), "{kind:?}");
        // The directory is that engine's: the other one is refused, not opened empty.
        let other = if kind == IndexKind::Sled {
            IndexKind::Fjall
        } else {
            IndexKind::Sled
        };
        assert!(
            Index::open(&db_dir, Some(other), &trees).is_err(),
            "{kind:?}"
        );
    }
}

#[tokio::test]
async fn a_checkpoint_deletes_the_segments_it_covers() {
    for kind in KINDS {
        checkpoint_deletes_covered_segments(kind).await;
    }
}

async fn checkpoint_deletes_covered_segments(kind: IndexKind) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db_dir = tmp.path().join("db");
    let (db, trees, index) = open_store(&db_dir, kind);
    let log_dir = tmp.path().join("log");
    std::fs::create_dir(&log_dir).expect("mkdir");
    let opts = LogOptions {
        checkpoint_interval: std::time::Duration::from_secs(3600),
        ..LogOptions::new(log_dir.clone())
    };
    let full = Arc::new(Notify::new());
    let (log, writer) =
        CommitLog::start(log_dir.clone(), 1, 0, u64::MAX, full.clone()).expect("start");
    let (checkpoints, checkpointer) =
        spawn_checkpointer(db.clone(), index.clone(), &db_dir, log.clone(), &opts, full);
    for i in 1..=3u64 {
        // As a replica apply does: the index's memory first, then the log.
        let key = format!("key-{i}");
        put(&index, key.as_bytes(), i, &[1; 10]);
        log.append(record(key.as_bytes(), i, &[1; 10]))
            .await
            .expect("append");
        assert_eq!(log.rotate().await.expect("rotate").current, i + 1);
    }
    assert_eq!(segment::list(&log_dir).expect("list"), vec![1, 2, 3, 4]);
    // Rotating an empty segment does nothing.
    assert_eq!(
        log.rotate().await.expect("rotate"),
        Rotation {
            current: 4,
            rotated: false
        }
    );
    // ... and leaves no prepared segment behind.
    assert_eq!(segment::list(&log_dir).expect("list"), vec![1, 2, 3, 4]);

    // A crash after those rotations but before a checkpoint deleted anything: the
    // segments replay over a sled that already holds them, harmlessly.
    let copy = tmp.path().join("crashed");
    std::fs::create_dir(&copy).expect("mkdir");
    for s in 1..=3 {
        std::fs::copy(segment::path(&log_dir, s), segment::path(&copy, s)).expect("copy");
    }
    replay_log(&db, &db_dir, &trees, &index, &copy).expect("replay");
    for i in 1..=3u64 {
        assert_eq!(
            stored(&index, format!("key-{i}").as_bytes()),
            Some(i),
            "{kind:?}"
        );
    }

    log.append(record(b"key-4", 4, &[1; 10]))
        .await
        .expect("append");
    checkpoints.now().await.expect("checkpoint");
    // Segments 1-4 are covered by the flush; the writer is on segment 5.
    assert_eq!(segment::list(&log_dir).expect("list"), vec![5]);
    checkpointer.shutdown().await;
    writer.shutdown().await;
    assert!(matches!(
        log.append(record(b"late", 1, b"")).await,
        Err(LogError::Stopped)
    ));
}

#[tokio::test]
async fn a_full_segment_starts_a_checkpoint() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let db_dir = tmp.path().join("db");
    let (db, _trees) = sled_at(&db_dir);
    let log_dir = tmp.path().join("log");
    std::fs::create_dir(&log_dir).expect("mkdir");
    let opts = LogOptions {
        checkpoint_interval: std::time::Duration::from_secs(3600),
        checkpoint_bytes: 1_000,
        dir: log_dir.clone(),
    };
    let full = Arc::new(Notify::new());
    let (log, writer) =
        CommitLog::start(log_dir.clone(), 1, 0, opts.checkpoint_bytes, full.clone())
            .expect("start");
    let (_checkpoints, checkpointer) = spawn_checkpointer(
        db.clone(),
        sled_index(&db),
        &db_dir,
        log.clone(),
        &opts,
        full,
    );
    for r in records(10) {
        log.append(r).await.expect("append"); // ~2.3 KiB in all
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while segment::list(&log_dir).expect("list").first() == Some(&1) {
        assert!(tokio::time::Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    checkpointer.shutdown().await;
    writer.shutdown().await;
}
