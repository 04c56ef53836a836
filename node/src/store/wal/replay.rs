//! Reading the log back at start: every record of every segment, oldest first, up to the first
//! bad one of each segment, which is cut off.
//!
//! The records are read and checked in order on one thread; their ops are applied by several
//! threads ("lanes") meanwhile, each op in the lane of its key, so that the ops of one key are
//! applied in log order (which node-local writes need) while different keys, whose order does
//! not matter, are applied at once.
//!
//! A segment is read in blocks of [`BLOCK`] bytes into one buffer, reused for every block and
//! segment, so a replay holds about one block, not a whole segment: replaying 1.1 GB of log in
//! one segment peaked at 1.56 GB of RSS read whole, 0.57 GB in blocks (docs/benchmarks.md).
//! After the last record (a torn tail, corruption, or the preallocated zeros, at most
//! ~96 MiB) the rest of the segment is read whole, to tell which. A record cut by a block's
//! end is carried over to the next block. The lanes get the ops in
//! chunks of [`CHUNK_OPS`], small next to a block, so that they wait little for the first
//! chunk of each block.

use std::fs::{File, OpenOptions};
use std::hash::{Hash, Hasher};
use std::io::{self, Read};
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
    /// The busiest lane's time applying ops, summed over blocks (the lanes apply while the
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
const CHUNK_OPS: usize = 1 << 13;

/// Bytes of a segment read at a time.
const BLOCK: usize = 64 << 20;

/// [`BLOCK`], for tests that compare other block sizes with it.
#[cfg(test)]
pub(super) const BLOCK_FOR_TESTS: usize = BLOCK;

/// Replays every segment in `dir` through `apply` on `lanes` threads (at least one), oldest
/// first, cutting each segment at its first bad record (the file is truncated there and the
/// cut logged). The ops of one key are applied in log order, on one lane.
pub fn replay<E: Send>(
    dir: &Path,
    lanes: usize,
    apply: impl Fn(LoggedOp<'_>) -> Result<(), E> + Sync,
) -> Result<Replayed, ReplayError<E>> {
    replay_in_blocks(dir, lanes, BLOCK, apply)
}

/// [`replay`], reading `block` bytes at a time (tests vary it).
pub(super) fn replay_in_blocks<E: Send>(
    dir: &Path,
    lanes: usize,
    block: usize,
    apply: impl Fn(LoggedOp<'_>) -> Result<(), E> + Sync,
) -> Result<Replayed, ReplayError<E>> {
    let mut lanes = Lanes {
        lanes: lanes.max(1),
        apply,
        applying: Duration::ZERO,
    };
    let block = block.max(1);
    let mut out = Replayed::default();
    // The bytes of the segment from file offset `base` on (one buffer for the whole replay).
    let mut buf = Vec::new();
    for seq in segment::list(dir)? {
        let path = segment::path(dir, seq);
        let mut file = File::open(&path)?;
        // Set to where the reads really ended if that is sooner.
        let mut len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
        out.segments.push(seq);
        buf.clear();
        read_up_to(&mut file, &mut buf, SEGMENT_HEADER)?;
        let mut base = 0;
        let good_end = match buf.get(..SEGMENT_HEADER) {
            Some(h) if h[..format::MAGIC.len()] == format::MAGIC[..] => {
                let version = h[format::MAGIC.len()];
                if version != format::FORMAT_VERSION {
                    return Err(ReplayError::Version {
                        seq,
                        version,
                        expected: format::FORMAT_VERSION,
                    });
                }
                buf.clear();
                base = SEGMENT_HEADER;
                if !read_up_to(&mut file, &mut buf, block)? {
                    len = base + buf.len();
                }
                loop {
                    let eof = base + buf.len() >= len;
                    match replay_records(seq, base, &buf, eof, &mut lanes, &mut out)? {
                        Stop::End(at) => break base + at,
                        // A record goes on past the buffer: carry it over, read on.
                        Stop::More { at, need } => {
                            buf.drain(..at);
                            base += at;
                            if !read_up_to(&mut file, &mut buf, need.max(block))? {
                                len = base + buf.len();
                            }
                        }
                        // A bad record (or the preallocated zeros) before the end of the
                        // file: whether it is a torn tail, corruption or the end of the
                        // records takes the rest of the file to tell.
                        Stop::Unsure(at) => {
                            buf.drain(..at);
                            base += at;
                            file.read_to_end(&mut buf)?;
                            len = base + buf.len();
                        }
                    }
                }
            }
            // A segment whose header never reached the disk (a crash while it was created)
            // or is not ours: nothing in it can be read.
            _ => {
                file.read_to_end(&mut buf)?;
                len = buf.len();
                0
            }
        };
        if good_end < len {
            // The rest of the file is in `buf` from `good_end - base` on. Zeros after the
            // last record are the segment's preallocated space, not a cut (a record never
            // starts with a zero length). Truncated all the same: the replayed segment is not
            // written again.
            let rest = buf.get(good_end - base..).unwrap_or_default();
            let cut = if rest.iter().all(|b| *b == 0) {
                0
            } else {
                len - good_end
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

/// Appends up to `n` more bytes of `file` to `buf`; false if the file ended first.
fn read_up_to(file: &mut File, buf: &mut Vec<u8>, n: usize) -> io::Result<bool> {
    let read = file.by_ref().take(n as u64).read_to_end(buf)?;
    Ok(read == n)
}

/// Where the records of a buffer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The good records end at this offset: the end of the file's records (a cut, if any,
    /// was reported), or an op failed to apply.
    End(usize),
    /// The record at this offset needs `need` bytes from there, more than the buffer holds
    /// (the file goes on).
    More { at: usize, need: usize },
    /// The record at this offset is bad, or zeros, and the file goes on past the buffer.
    Unsure(usize),
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

/// Applies the records in `bytes`, the part of segment `seq` from file offset `base` on
/// (through the end of the file if `eof`); returns where they stopped. This thread reads and
/// checks the records and hands each op to its lane's thread, in chunks, while the lanes apply
/// the chunks before.
fn replay_records<'a, E: Send, F>(
    seq: u64,
    base: usize,
    bytes: &'a [u8],
    eof: bool,
    lanes: &mut Lanes<F>,
    out: &mut Replayed,
) -> Result<Stop, ReplayError<E>>
where
    F: Fn(LoggedOp<'_>) -> Result<(), E> + Sync,
{
    let n = lanes.lanes;
    let per_lane = CHUNK_OPS / n + 1;
    let this = &*lanes;
    let (stop, busiest) = std::thread::scope(|s| {
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
        let mut at = 0;
        let stop = loop {
            if at >= bytes.len() {
                break match eof {
                    true => Stop::End(at),
                    false => Stop::More { at, need: 0 },
                };
            }
            let rest = &bytes[at..];
            let (payload, used) = match format::read_record(rest) {
                Ok(r) => r,
                Err(BadRecord::Short) if !eof => {
                    break Stop::More {
                        at,
                        need: format::record_len(rest).unwrap_or(format::RECORD_HEADER),
                    }
                }
                Err(_) if !eof => break Stop::Unsure(at),
                Err(_) if rest.iter().all(|b| *b == 0) => break Stop::End(at),
                Err(bad) => {
                    let corrupt = followed_by_good(rest);
                    report_cut(seq, base + at, bytes.len() - at, bad, corrupt);
                    if corrupt {
                        out.corrupt_segments.push(seq);
                    }
                    break Stop::End(at);
                }
            };
            let ops = match format::ops(payload) {
                Ok(ops) => ops,
                Err(bad) => {
                    // The rest of the file, for the size of the cut.
                    if !eof {
                        break Stop::Unsure(at);
                    }
                    report_cut(seq, base + at, bytes.len() - at, bad, true);
                    out.corrupt_segments.push(seq);
                    break Stop::End(at);
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
                    // A lane's op failed: its error is returned below.
                    break Stop::End(at);
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
        (stop, busiest)
    });
    lanes.applying += busiest.map_err(ReplayError::Apply)?;
    Ok(stop)
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
