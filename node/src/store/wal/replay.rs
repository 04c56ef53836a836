//! Reading the log back at start: every record of every segment, oldest first, up to the first
//! bad one of each segment, which is cut off.
//!
//! The records are read and checked in order on one thread; their ops are applied by several
//! threads ("lanes") meanwhile, each op in the lane of its key, so that the ops of one key are
//! applied in log order (which node-local writes need) while different keys, whose order does
//! not matter, are applied at once.

use std::fs::OpenOptions;
use std::hash::{Hash, Hasher};
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use super::format::{self, BadRecord, LoggedOp, SEGMENT_HEADER};
use super::segment;

/// What a replay found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// The segments read, oldest first (delete them once their ops are durable elsewhere).
    pub segments: Vec<u64>,
    /// Records (applies) and ops applied.
    pub records: u64,
    pub ops: u64,
    /// Bytes of good records read.
    pub bytes: u64,
    /// Bytes cut off at bad records (a torn tail, or corruption and everything after it).
    pub bytes_cut: u64,
    /// Segments in which a bad record was followed by a good one (corruption, not a torn
    /// write): the good records after it were cut too.
    pub corrupt_segments: Vec<u64>,
    /// The busiest lane's time applying ops, summed over segments (the lanes apply while the
    /// records are read and checked).
    pub applying: Duration,
}

impl Replayed {
    /// The number for the next segment to start.
    pub fn next_seq(&self) -> u64 {
        self.segments.last().map_or(1, |s| s + 1)
    }
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError<E> {
    #[error("reading the commit log: {0}")]
    Io(#[from] io::Error),
    /// A segment of another format version.
    #[error("segment {seq} has format version {version}; this build reads only {expected}")]
    Version { seq: u64, version: u8, expected: u8 },
    /// A good record that names something this store cannot apply.
    #[error("applying a logged op: {0}")]
    Apply(E),
}

/// Ops read before they are handed to the lanes.
const CHUNK_OPS: usize = 1 << 16;

/// Replays every segment in `dir` through `apply` on `lanes` threads (at least one), oldest
/// first, cutting each segment at its first bad record (the file is truncated there and the
/// cut logged). The ops of one key are applied in log order, on one lane.
pub fn replay<E: Send>(
    dir: &Path,
    lanes: usize,
    apply: impl Fn(LoggedOp<'_>) -> Result<(), E> + Sync,
) -> Result<Replayed, ReplayError<E>> {
    let mut lanes = Lanes {
        lanes: lanes.max(1),
        apply,
        applying: Duration::ZERO,
    };
    let mut out = Replayed::default();
    for seq in segment::list(dir)? {
        let path = segment::path(dir, seq);
        let bytes = std::fs::read(&path)?;
        out.segments.push(seq);
        let good_end = match bytes.get(..SEGMENT_HEADER) {
            Some(h) if h[..format::MAGIC.len()] == format::MAGIC[..] => {
                let version = h[format::MAGIC.len()];
                if version != format::FORMAT_VERSION {
                    return Err(ReplayError::Version {
                        seq,
                        version,
                        expected: format::FORMAT_VERSION,
                    });
                }
                replay_records(seq, &bytes, &mut lanes, &mut out)?
            }
            // A segment whose header never reached the disk (a crash while it was created)
            // or is not ours: nothing in it can be read.
            _ => 0,
        };
        if good_end < bytes.len() {
            // Zeros after the last record are the segment's preallocated space, not a cut
            // (a record never starts with a zero length). Truncated all the same: the
            // replayed segment is not written again.
            let cut = if bytes[good_end..].iter().all(|b| *b == 0) {
                0
            } else {
                bytes.len() - good_end
            };
            out.bytes_cut += cut as u64;
            let file = OpenOptions::new().write(true).open(&path)?;
            file.set_len(good_end as u64)?;
            file.sync_all()?;
        }
    }
    out.applying = lanes.applying;
    Ok(out)
}

/// The lanes a replay applies ops on.
struct Lanes<F> {
    lanes: usize,
    apply: F,
    /// The longest time one lane spent applying, summed over segments.
    applying: Duration,
}

impl<F> Lanes<F> {
    /// The lane of the ops on `key` of `table`.
    fn lane_of(&self, op: &LoggedOp<'_>) -> usize {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (op.table, op.key).hash(&mut h);
        (h.finish() % self.lanes as u64) as usize
    }
}

/// Chunks of a lane's ops in flight to it at most (bounds the memory a replay holds).
const CHUNKS_IN_FLIGHT: usize = 2;

/// Applies the records of one segment; returns where the good records end. This thread reads
/// and checks the records and hands each op to its lane's thread, in chunks, while the lanes
/// apply the chunks before.
fn replay_records<'a, E: Send, F>(
    seq: u64,
    bytes: &'a [u8],
    lanes: &mut Lanes<F>,
    out: &mut Replayed,
) -> Result<usize, ReplayError<E>>
where
    F: Fn(LoggedOp<'_>) -> Result<(), E> + Sync,
{
    let n = lanes.lanes;
    let per_lane = CHUNK_OPS / n + 1;
    let this = &*lanes;
    let (end, busiest) = std::thread::scope(|s| {
        let mut senders = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<LoggedOp<'a>>>(CHUNKS_IN_FLIGHT);
            senders.push(tx);
            workers.push(s.spawn(move || {
                let mut busy = Duration::ZERO;
                for chunk in rx {
                    let started = Instant::now();
                    chunk.into_iter().try_for_each(|op| (this.apply)(op))?;
                    busy += started.elapsed();
                }
                Ok::<_, E>(busy)
            }));
        }
        let mut chunks: Vec<Vec<LoggedOp<'a>>> =
            (0..n).map(|_| Vec::with_capacity(per_lane)).collect();
        let mut queued = 0;
        // Hands the chunks to the lanes; false if a lane has stopped (its op failed).
        let hand_over = |chunks: &mut Vec<Vec<LoggedOp<'a>>>| {
            senders.iter().zip(chunks.iter_mut()).all(|(tx, chunk)| {
                let full = std::mem::replace(chunk, Vec::with_capacity(per_lane));
                full.is_empty() || tx.send(full).is_ok()
            })
        };
        let mut at = SEGMENT_HEADER;
        let end = loop {
            if at >= bytes.len() {
                break at;
            }
            let rest = &bytes[at..];
            let (payload, used) = match format::read_record(rest) {
                Ok(r) => r,
                Err(_) if rest.iter().all(|b| *b == 0) => break at,
                Err(bad) => {
                    report_cut(seq, at, bytes.len() - at, bad, followed_by_good(rest));
                    if followed_by_good(rest) {
                        out.corrupt_segments.push(seq);
                    }
                    break at;
                }
            };
            let ops = match format::ops(payload) {
                Ok(ops) => ops,
                Err(bad) => {
                    report_cut(seq, at, bytes.len() - at, bad, true);
                    out.corrupt_segments.push(seq);
                    break at;
                }
            };
            out.ops += ops.len() as u64;
            queued += ops.len();
            for op in ops {
                chunks[this.lane_of(&op)].push(op);
            }
            out.records += 1;
            out.bytes += used as u64;
            at += used;
            if queued >= CHUNK_OPS {
                queued = 0;
                if !hand_over(&mut chunks) {
                    break at;
                }
            }
        };
        hand_over(&mut chunks);
        drop(senders);
        let mut busiest = Ok(Duration::ZERO);
        for w in workers {
            let lane = w
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            busiest = match (busiest, lane) {
                (Ok(a), Ok(b)) => Ok(a.max(b)),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        (end, busiest)
    });
    lanes.applying += busiest.map_err(ReplayError::Apply)?;
    Ok(end)
}

/// Whether a good record starts right after the bad one at the start of `rest` (its length
/// field read as written): the bad record is corruption inside the log, not a torn tail.
fn followed_by_good(rest: &[u8]) -> bool {
    let Some(len) = rest.get(..4) else {
        return false;
    };
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > format::MAX_PAYLOAD {
        return false;
    }
    rest.get(format::RECORD_HEADER + len..)
        .is_some_and(|next| format::read_record(next).is_ok())
}

fn report_cut(seq: u64, at: usize, cut: usize, bad: BadRecord, corrupt: bool) {
    if corrupt {
        tracing::warn!(
            segment = seq,
            offset = at,
            bytes_cut = cut,
            %bad,
            "commit log: a corrupt record is followed by good ones; the log is cut at the \
             corrupt record and the records after it are lost from this node's log (other \
             replicas and anti-entropy still hold them)"
        );
    } else {
        tracing::warn!(
            segment = seq,
            offset = at,
            bytes_cut = cut,
            %bad,
            "commit log: cut a torn tail at the last good record"
        );
    }
}
