//! The log writer: one thread that owns the current segment and group-commits appends.
//!
//! An apply sends its framed record and waits. The writer takes every append queued while its
//! previous `fdatasync` ran, writes them with one `write`, calls `fdatasync` once and wakes
//! their waiters; so under load the number of syncs grows with time, not with applies. It is a
//! plain thread, not a tokio task, because it spends its life in blocking file calls.
//!
//! A failed write or sync leaves the file's state unknown (the kernel may have dropped the
//! dirty pages), so the writer then refuses every later append: the node stops acknowledging
//! writes until it is restarted and replays what did reach the disk.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use super::format::SEGMENT_HEADER;
use super::segment;

/// Appends found queued at once from which the writer gathers more before it syncs: a lone
/// append (one send in flight) is synced at once.
const LINGER_FROM: usize = 2;
/// How long the writer waits for more appends each time, while more keep arriving: at most
/// [`LINGER`] in all. Syncs then cover tens of appends instead of a few under load; each sync
/// costs this machine ~60–100 µs of CPU whatever it covers.
const LINGER_STEP: Duration = Duration::from_micros(100);
const LINGER: Duration = Duration::from_micros(1000);

/// Appends that may wait for the writer at once; more wait for room (backpressure).
const MAX_QUEUED: usize = 65_536;

/// What went wrong in the log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// A file operation failed (this one, or an earlier write or sync: the log then takes no
    /// more appends).
    #[error("commit log {what}: {source}")]
    Io {
        what: &'static str,
        source: Arc<io::Error>,
    },
    /// The writer has stopped (shutdown).
    #[error("the commit log writer has stopped")]
    Stopped,
}

impl LogError {
    fn io(what: &'static str) -> impl FnOnce(io::Error) -> LogError {
        move |e| LogError::Io {
            what,
            source: Arc::new(e),
        }
    }
}

/// The outcome of a rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The segment now being written: every older one holds only records appended before the
    /// rotation.
    pub current: u64,
    /// Whether a new segment was started (`false`: the current one had no records yet).
    pub rotated: bool,
}

enum Cmd {
    Append(Vec<u8>, oneshot::Sender<Result<(), LogError>>),
    /// Switch to the prepared segment `(seq, file)` if the current one has records; the file
    /// comes back unused otherwise.
    Rotate(
        u64,
        File,
        oneshot::Sender<Result<(Rotation, Option<File>), LogError>>,
    ),
    Stop,
}

/// The handle appliers use; cheap to clone.
#[derive(Clone)]
pub struct CommitLog {
    tx: mpsc::Sender<Cmd>,
    dir: PathBuf,
    /// The segment being written (set by the writer).
    current: Arc<AtomicU64>,
    /// Record bytes in that segment (set by the writer): the next segment is preallocated
    /// for about as much.
    written: Arc<AtomicU64>,
}

/// Owns the writer thread.
pub struct WriterHandle {
    tx: mpsc::Sender<Cmd>,
    thread: std::thread::JoinHandle<()>,
}

impl WriterHandle {
    /// Stops the writer after the appends queued before this call, and waits for it.
    pub async fn shutdown(self) {
        // The writer may already be gone (it stops on its own when every handle is dropped).
        let _ = self.tx.send(Cmd::Stop).await;
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(())) => {}
            _ => tracing::error!("the commit log writer panicked"),
        }
    }
}

impl CommitLog {
    /// Starts a new segment `seq` in `dir`, preallocated to `prealloc` bytes (see
    /// [`segment::create`]), and the writer thread. `full` is notified once per segment when
    /// it grows past `segment_bytes` (the checkpointer's cue).
    pub fn start(
        dir: PathBuf,
        seq: u64,
        prealloc: u64,
        segment_bytes: u64,
        full: Arc<Notify>,
    ) -> Result<(CommitLog, WriterHandle), LogError> {
        let file =
            segment::create(&dir, seq, prealloc).map_err(LogError::io("create a segment"))?;
        let (tx, rx) = mpsc::channel(MAX_QUEUED);
        let current = Arc::new(AtomicU64::new(seq));
        let written = Arc::new(AtomicU64::new(0));
        let log = CommitLog {
            tx: tx.clone(),
            dir,
            current: current.clone(),
            written: written.clone(),
        };
        let writer = Writer {
            file,
            seq,
            current,
            written,
            bytes: 0,
            segment_bytes,
            full,
            failed: None,
        };
        let thread = std::thread::Builder::new()
            .name("commit-log".into())
            .spawn(move || writer.run(rx))
            .map_err(LogError::io("start the writer thread"))?;
        Ok((log, WriterHandle { tx, thread }))
    }

    /// Appends one framed record; resolves once it is durable.
    pub async fn append(&self, record: Vec<u8>) -> Result<(), LogError> {
        self.enqueue(record).await?.wait().await
    }

    /// Queues one framed record for the writer (waiting only for room in the queue) and
    /// returns the wait for its sync. Records are written in the order they are queued.
    pub async fn enqueue(&self, record: Vec<u8>) -> Result<Synced, LogError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::Append(record, done))
            .await
            .map_err(|_| LogError::Stopped)?;
        Ok(Synced(wait))
    }

    /// Starts a new segment once every append queued before this call is written, unless the
    /// current segment has none. The new file is created here, before the writer is asked,
    /// so that appends wait only for a swap of files, not for its creation and syncs. One
    /// caller at a time (the checkpointer).
    pub async fn rotate(&self) -> Result<Rotation, LogError> {
        let next = self.current.load(Ordering::Acquire) + 1;
        let dir = self.dir.clone();
        let prealloc = prealloc_after(self.written.load(Ordering::Acquire));
        let file = tokio::task::spawn_blocking(move || segment::create(&dir, next, prealloc))
            .await
            .map_err(|e| LogError::io("create a segment")(io::Error::other(e)))?
            .map_err(LogError::io("create a segment"))?;
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Cmd::Rotate(next, file, done))
            .await
            .map_err(|_| LogError::Stopped)?;
        let outcome = wait.await.map_err(|_| LogError::Stopped)?;
        let unused = match &outcome {
            Ok((_, unused)) => unused.is_some(),
            Err(_) => true,
        };
        if unused {
            // Empty but for its header; removed so that the next rotation can create it.
            if let Err(e) = std::fs::remove_file(segment::path(&self.dir, next)) {
                tracing::warn!(error = %e, segment = next, "cannot remove an unused segment");
            }
        }
        outcome.map(|(rotation, _)| rotation)
    }
}

/// The wait for one queued record's sync.
pub struct Synced(oneshot::Receiver<Result<(), LogError>>);

impl Synced {
    /// Resolves once the record is durable.
    pub async fn wait(self) -> Result<(), LogError> {
        self.0.await.map_err(|_| LogError::Stopped)?
    }
}

/// How much to preallocate for the next segment when the current one holds `written` record
/// bytes: a little more than that, in 64 KiB steps (a node that logs little preallocates
/// little), at most [`MAX_PREALLOC`]. A segment outgrowing its preallocation is appended to.
fn prealloc_after(written: u64) -> u64 {
    const STEP: u64 = 64 << 10;
    if written == 0 {
        return 0;
    }
    let wanted = written.saturating_add(written / 4);
    wanted.div_ceil(STEP).saturating_mul(STEP).min(MAX_PREALLOC)
}

/// What the first segment after a start is preallocated to (later ones follow what their
/// predecessor held).
pub const START_PREALLOC: u64 = 4 << 20;

/// The most a segment is preallocated (the default checkpoint starts a new segment at 64 MiB).
const MAX_PREALLOC: u64 = 96 << 20;

struct Writer {
    file: File,
    seq: u64,
    /// `seq`, for [`CommitLog::rotate`].
    current: Arc<AtomicU64>,
    /// `bytes`, for [`CommitLog::rotate`].
    written: Arc<AtomicU64>,
    /// Record bytes in the current segment (written from offset [`SEGMENT_HEADER`] on: the
    /// file may be longer, preallocated with zeros).
    bytes: u64,
    segment_bytes: u64,
    full: Arc<Notify>,
    /// Set by a failed write or sync; every later append gets it.
    failed: Option<LogError>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut buf = Vec::new();
        let mut waiters = Vec::new();
        let mut queued = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            queued.push(first);
            while let Ok(cmd) = rx.try_recv() {
                queued.push(cmd);
            }
            if queued.len() >= LINGER_FROM {
                // Appends are arriving together: gather the ones on their way into this sync
                // instead of the next, for as long as more keep coming (at most `LINGER`).
                let until = Instant::now() + LINGER;
                loop {
                    std::thread::sleep(LINGER_STEP);
                    let before = queued.len();
                    while let Ok(cmd) = rx.try_recv() {
                        queued.push(cmd);
                    }
                    if queued.len() == before || Instant::now() >= until {
                        break;
                    }
                }
            }
            for cmd in queued.drain(..) {
                match cmd {
                    Cmd::Append(record, done) => {
                        buf.extend_from_slice(&record);
                        waiters.push(done);
                    }
                    Cmd::Rotate(seq, file, done) => {
                        self.commit(&mut buf, &mut waiters);
                        // The caller may have timed out and gone.
                        let _ = done.send(self.rotate(seq, file));
                    }
                    Cmd::Stop => {
                        self.commit(&mut buf, &mut waiters);
                        return;
                    }
                }
            }
            self.commit(&mut buf, &mut waiters);
        }
    }

    /// Writes `buf` and syncs it once, then answers its waiters.
    fn commit(
        &mut self,
        buf: &mut Vec<u8>,
        waiters: &mut Vec<oneshot::Sender<Result<(), LogError>>>,
    ) {
        if waiters.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = match &self.failed {
            Some(e) => Err(e.clone()),
            None => self
                .file
                .write_all_at(buf, SEGMENT_HEADER as u64 + self.bytes)
                .map_err(LogError::io("write"))
                .and_then(|()| self.file.sync_data().map_err(LogError::io("fdatasync"))),
        };
        match &result {
            Ok(()) => {
                self.bytes += buf.len() as u64;
                self.written.store(self.bytes, Ordering::Release);
                metrics::counter!("store_log_bytes_total").increment(buf.len() as u64);
                metrics::counter!("store_log_syncs_total").increment(1);
                metrics::histogram!("store_flush_seconds").record(started.elapsed().as_secs_f64());
                metrics::histogram!("store_flush_batch_writers").record(waiters.len() as f64);
                if self.bytes >= self.segment_bytes {
                    self.full.notify_one();
                }
            }
            Err(e) if self.failed.is_none() => {
                tracing::error!(error = %e, segment = self.seq,
                    "commit log write failed; this node acknowledges no more writes until restarted");
                self.failed = Some(e.clone());
            }
            Err(_) => {}
        }
        buf.clear();
        for w in waiters.drain(..) {
            let _ = w.send(result.clone()); // the applier may have timed out and gone
        }
    }

    fn rotate(&mut self, seq: u64, file: File) -> Result<(Rotation, Option<File>), LogError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if seq != self.seq + 1 {
            return Err(LogError::Io {
                what: "rotate",
                source: Arc::new(io::Error::other(format!(
                    "segment {seq} offered while writing {}",
                    self.seq
                ))),
            });
        }
        if self.bytes == 0 {
            let rotation = Rotation {
                current: self.seq,
                rotated: false,
            };
            return Ok((rotation, Some(file)));
        }
        self.file = file;
        self.seq = seq;
        self.current.store(seq, Ordering::Release);
        self.bytes = 0;
        self.written.store(0, Ordering::Release);
        let rotation = Rotation {
            current: seq,
            rotated: true,
        };
        Ok((rotation, None))
    }
}
