//! The commit log: where a replica apply becomes durable.
//!
//! Every replica apply (and conditional apply that passed its condition) first goes into
//! sled's memory, then its ops are appended as one checksummed record (`format`) to the
//! current segment file (`segment`), and the apply is acknowledged once the log writer's
//! group-committed `fdatasync` covers it (`writer`). sled is flushed only by the checkpointer,
//! off the acknowledgement path: it rotates to a new segment, flushes sled, and deletes the
//! older segments. Because every op is in sled's memory before its record is appended, a
//! flush that starts after a rotation covers every record of the segments before it.
//!
//! At start (`replay`) the store applies every remaining segment to sled, oldest first, with
//! the replicas' newer-version-wins rule (so replaying a record that sled already holds is
//! harmless), flushes sled and deletes them. A segment is cut at its first bad record (torn
//! or corrupt); records after a corrupt one are lost from this node's log, and the other
//! replicas and anti-entropy still hold them.
//!
//! Node-local tables (the id lease, the push outbox) go through the log too, as plain writes
//! (a `Versioned` at version 0, put or delete) that replay applies in log order; `Store::write`
//! queues them right after their sled writes so that the order matches.

mod format;
mod replay;
mod segment;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use super::index::Index;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use format::{LoggedOp, RecordBuilder};
pub use replay::{replay, ReplayError, Replayed};
pub use writer::{CommitLog, LogError, Rotation, Synced, WriterHandle, START_PREALLOC};

/// Where the log lives and how often it is checkpointed.
#[derive(Clone, Debug)]
pub struct LogOptions {
    /// The directory of the segment files (`<data dir>/db-log`).
    pub dir: PathBuf,
    /// Time between checkpoints while writes arrive (`--checkpoint-interval-ms`).
    pub checkpoint_interval: Duration,
    /// A segment this large starts a checkpoint at once (`--checkpoint-mib`). It bounds the
    /// log to replay after a crash to about this plus what arrives during one checkpoint.
    pub checkpoint_bytes: u64,
}

impl LogOptions {
    /// Defaults in `dir`: a checkpoint every 10 s or 64 MiB of log.
    pub fn new(dir: PathBuf) -> Self {
        LogOptions {
            dir,
            checkpoint_interval: DEFAULT_CHECKPOINT_INTERVAL,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
        }
    }
}

/// Time between checkpoints. Each costs one sled flush, which writes everything sled holds
/// dirty and competes for the disk with the log's syncs; every 10 s it is a small share of the
/// disk's time, and the log keeps at most ~10 s of writes unless the size limit comes first.
pub const DEFAULT_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(10);
/// Log size that forces a checkpoint. The log replays at ~48 MiB/s (docs/benchmarks.md,
/// "Session 2026-12-07: commit log"), so a crash under full load costs about a second and a
/// half of replay at start, not minutes.
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 64 << 20;

type CheckpointReply = oneshot::Sender<Result<(), CheckpointError>>;

/// Why a checkpoint failed (the log keeps the segments, so nothing is lost).
#[derive(Debug, Clone, thiserror::Error)]
pub enum CheckpointError {
    #[error("{0}")]
    Log(LogError),
    #[error("sled flush: {0}")]
    Flush(Arc<sled::Error>),
    #[error("fjall persist: {0}")]
    Persist(Arc<fjall::Error>),
    #[error("deleting covered segments: {0}")]
    Delete(Arc<std::io::Error>),
    /// The checkpointer has stopped (shutdown).
    #[error("the checkpointer has stopped")]
    Stopped,
}

/// Asks the checkpointer for a checkpoint now; cheap to clone.
#[derive(Clone)]
pub struct Checkpoints {
    tx: mpsc::Sender<CheckpointReply>,
}

impl Checkpoints {
    /// Rotates, flushes sled and deletes the covered segments; resolves when done.
    pub async fn now(&self) -> Result<(), CheckpointError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(done)
            .await
            .map_err(|_| CheckpointError::Stopped)?;
        wait.await.map_err(|_| CheckpointError::Stopped)?
    }
}

/// Owns the checkpointer task.
pub struct CheckpointerHandle {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl CheckpointerHandle {
    /// Stops the checkpointer (after a checkpoint in progress) and waits for it.
    pub async fn shutdown(self) {
        self.stop.cancel();
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "the checkpointer task failed");
        }
    }
}

/// Flushes sled durably: `Db::flush` writes its buffers with `sync_file_range`, which neither
/// flushes the disk's write cache nor the file's metadata, so an `fsync` of sled's data file
/// (`<db dir>/db`) follows before anything relies on it (deleting log segments).
pub fn flush_sled(db: &sled::Db, db_dir: &Path) -> Result<(), CheckpointError> {
    db.flush()
        .map_err(|e| CheckpointError::Flush(Arc::new(e)))?;
    std::fs::File::open(db_dir.join("db"))
        .and_then(|f| f.sync_all())
        .map_err(|e| CheckpointError::Flush(Arc::new(sled::Error::Io(e))))
}

/// Makes the index and sled durable: fjall's journal synced (`--index fjall`), then sled
/// flushed ([`flush_sled`]).
pub fn flush_index(db: &sled::Db, index: &Index, db_dir: &Path) -> Result<(), CheckpointError> {
    index
        .persist()
        .map_err(|e| CheckpointError::Persist(Arc::new(e)))?;
    flush_sled(db, db_dir)
}

/// Starts the checkpointer of `log` over `db` and `index` (in `db_dir`). `full` is the
/// writer's size cue.
pub fn spawn_checkpointer(
    db: sled::Db,
    index: Arc<Index>,
    db_dir: &Path,
    log: CommitLog,
    opts: &LogOptions,
    full: Arc<Notify>,
) -> (Checkpoints, CheckpointerHandle) {
    let (tx, rx) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let checkpointer = Checkpointer {
        db,
        index,
        db_dir: db_dir.to_path_buf(),
        log,
        dir: opts.dir.clone(),
        interval: opts.checkpoint_interval,
        full,
    };
    let task = tokio::spawn(checkpointer.run(rx, stop.clone()));
    (Checkpoints { tx }, CheckpointerHandle { stop, task })
}

/// What the checkpointer task owns.
struct Checkpointer {
    db: sled::Db,
    index: Arc<Index>,
    db_dir: PathBuf,
    log: CommitLog,
    /// The log's directory.
    dir: PathBuf,
    interval: Duration,
    /// The writer's cue that a segment is full.
    full: Arc<Notify>,
}

impl Checkpointer {
    async fn run(self, mut requests: mpsc::Receiver<CheckpointReply>, stop: CancellationToken) {
        let (interval, full) = (self.interval, self.full.clone());
        let mut waiters = Vec::new();
        loop {
            let forced = tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => false,
                _ = full.notified() => false,
                request = requests.recv() => match request {
                    Some(done) => {
                        waiters.push(done);
                        true
                    }
                    None => return,
                },
            };
            while let Ok(done) = requests.try_recv() {
                waiters.push(done);
            }
            let result = self.checkpoint(forced || !waiters.is_empty()).await;
            if let Err(e) = &result {
                tracing::error!(error = %e, "checkpoint failed; the log keeps its segments");
            }
            for w in waiters.drain(..) {
                let _ = w.send(result.clone()); // the caller may have timed out and gone
            }
        }
    }

    /// One checkpoint: rotate, flush sled, delete the segments before the rotation. Without
    /// `always`, an idle log (no record since the last rotation) skips the flush.
    async fn checkpoint(&self, always: bool) -> Result<(), CheckpointError> {
        let started = Instant::now();
        let rotation = self.log.rotate().await.map_err(CheckpointError::Log)?;
        if !rotation.rotated && !always {
            return Ok(());
        }
        let db = self.db.clone();
        let index = self.index.clone();
        let db_dir = self.db_dir.clone();
        let dir = self.dir.clone();
        let current = rotation.current;
        tracing::debug!(segment = current, "checkpoint begins");
        let (flush, deleted) = tokio::task::spawn_blocking(move || {
            let flush_started = Instant::now();
            flush_index(&db, &index, &db_dir)?;
            let flush = flush_started.elapsed();
            let deleted = segment::delete_below(&dir, current)
                .map_err(|e| CheckpointError::Delete(Arc::new(e)))?;
            Ok::<_, CheckpointError>((flush, deleted))
        })
        .await
        .map_err(|e| {
            CheckpointError::Flush(Arc::new(sled::Error::ReportableBug(format!(
                "checkpoint task: {e}"
            ))))
        })??;
        metrics::histogram!("store_checkpoint_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(
            segment = current,
            deleted,
            flush_ms = flush.as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "checkpoint done"
        );
        Ok(())
    }
}

/// Deletes the segments numbered below `seq` in `dir` (after a replay made them durable in
/// sled); returns how many.
pub fn delete_segments_below(dir: &std::path::Path, seq: u64) -> std::io::Result<usize> {
    segment::delete_below(dir, seq)
}
